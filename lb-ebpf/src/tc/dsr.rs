//! Direct server return on an skb (`lb_tc`), as `crate::dsr` does it in `lb_xdp` (see there for
//! the backend's side and the MTU headroom encapsulation needs).
//!
//! **L2** ([`l2`]): only the MACs change, to the on-link backend's from the FIB; a backend the FIB
//! cannot settle is a counted drop, never a pass (the unchanged packet is addressed to the VIP).
//!
//! **IPIP** ([`ipip`]): `bpf_skb_adjust_room` opens room for the outer header between the Ethernet
//! and the IP header, with `BPF_F_ADJ_ROOM_ENCAP_L3_IPV4`/`_IPV6` so that the kernel knows the
//! skb is encapsulated: a GSO packet (a TCP burst from a local socket, or GRO's merge) is then
//! segmented as IP-in-IP (`SKB_GSO_IPXIP4`/`6`, inner headers copied into every segment), with its
//! segment size lowered by the outer header so that each segment is as long as before (TCP; a
//! UDP GSO packet keeps its segment size, which delimits its datagrams, so its segments need the
//! MTU headroom single packets need). The outer header is `crate::dsr`'s, written in place; then
//! the FIB's next hop, asked before the encapsulation with the MTU check on the encapsulated
//! length: a single packet (not GSO) that would not fit is answered "fragmentation needed" /
//! "packet too big" while it is still the client's packet (`tc::icmp_answer`), as `lb_xdp` answers it.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_SHOT,
    },
    helpers::{bpf_csum_diff, bpf_csum_update},
    programs::TcContext,
};
use lb_common::{
    counters::Counter,
    modes::encap::{IPPROTO_IPIP, IPPROTO_IPV6, IPV4_OUTER_LEN, IPV6_OUTER_LEN},
    protocol,
    service::{family, mode, Addr},
};

use super::{icmp_answer, xmit, Chosen};
use crate::{
    dsr::{before_encapsulation, write_outer_ipv4, write_outer_ipv6},
    flow_events, fragments,
    maps::count,
    packet::{
        header::{ETH_LEN, IPV4_LEN, IPV6_LEN},
        Flow,
    },
    xmit::{opts, Unsent, Xmit},
};

/// DSR on a shared segment: MAC rewrite towards the backend in `chosen`, packet otherwise
/// unchanged. A packet the FIB cannot settle is dropped, and reported with flow events.
// A BPF function of its own, called from `lb_tc`: its stack does not add to `to_backend`'s.
#[inline(never)]
pub fn l2(ctx: &TcContext, flow: &Flow, chosen: &Chosen) -> i32 {
    let backend = &chosen.backend;
    fragments::track_first(ctx, &flow.key, mode::DSR_L2, None, Some(backend));
    let (v4, protocol) = (flow.key.family == family::IPV4, flow.key.protocol);
    match xmit::fib_redirect(
        ctx,
        v4,
        protocol,
        &flow.key.src,
        backend,
        0,
        opts::ON_LINK_ONLY,
    ) {
        Xmit::Sent(action) => action as i32,
        unsent => xmit::verdict(flow_events::unsent(
            Unsent::dsr_l2(unsent),
            &flow.key,
            chosen.service_id,
            mode::DSR_L2,
        )),
    }
}

/// The unchanged packet from `src` (`protocol` inside) to the MAC of the on-link `backend`; also
/// the later fragments of a DSR L2 datagram (`tc::fragments`).
#[inline(always)]
pub fn send_l2(ctx: &TcContext, family: u8, protocol: u8, src: &Addr, backend: &Addr) -> i32 {
    let v4 = family == family::IPV4;
    match xmit::fib_redirect(ctx, v4, protocol, src, backend, 0, opts::ON_LINK_ONLY) {
        Xmit::Sent(action) => action as i32,
        unsent => xmit::verdict(Unsent::dsr_l2(unsent)),
    }
}

/// DSR through IP-in-IP / IPv6-in-IPv6 towards the backend in `chosen`.
// A BPF function of its own, called from `lb_tc`: its stack does not add to `to_backend`'s.
#[inline(never)]
pub fn ipip(ctx: &TcContext, flow: &Flow, chosen: &Chosen) -> i32 {
    let Some(source) = crate::service::source_address(chosen.service_id) else {
        let reason = Counter::DropModeUnconfigured;
        count(reason);
        flow_events::not_forwarded(&flow.key, chosen.service_id, mode::DSR_IPIP, reason);
        return TC_ACT_SHOT;
    };
    let label = before_encapsulation(ctx, &flow.key, source, &chosen.backend);
    let (family, protocol) = (flow.key.family, flow.key.protocol);
    let reason = match encapsulate(
        ctx,
        room_flags(family, protocol),
        source,
        &chosen.backend,
        label,
    ) {
        TOO_BIG => match icmp_answer::answer(
            ctx,
            family,
            protocol,
            crate::icmp_answer::message::TOO_BIG_ENCAPSULATED,
        ) {
            icmp_answer::UNANSWERED => {
                count(Counter::DropEncapTooBig);
                Counter::DropEncapTooBig
            }
            // A helper refused halfway (counted `drop_encap_too_big` there).
            TC_ACT_SHOT => Counter::DropEncapTooBig,
            answered => {
                flow_events::not_forwarded(
                    &flow.key,
                    chosen.service_id,
                    mode::DSR_IPIP,
                    Counter::IcmpTooBigSent,
                );
                return answered;
            }
        },
        // Counted `drop_encap_failed` (or the FIB's reason) where it happened.
        TC_ACT_SHOT => Counter::DropEncapFailed,
        action => return action,
    };
    flow_events::not_forwarded(&flow.key, chosen.service_id, mode::DSR_IPIP, reason);
    TC_ACT_SHOT
}

/// The `bpf_skb_adjust_room` flags that encapsulate a packet of `family` (`protocol` inside), for
/// [`encapsulate`].
#[inline(always)]
pub fn room_flags(family: u8, protocol: u8) -> u64 {
    let encap = if family == family::IPV4 {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    } else {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
    };
    // The segment size of a UDP GSO packet delimits its datagrams: kept (the kernel refuses to
    // lower it), so its segments grow by the outer header, as single packets do.
    let fixed_gso = if protocol == protocol::UDP {
        BPF_F_ADJ_ROOM_FIXED_GSO
    } else {
        0
    };
    (encap | fixed_gso) as u64
}

/// What [`encapsulate`] returns, instead of a TC verdict, for a packet that would not fit the egress
/// MTU once encapsulated (left as it came, nothing counted): [`ipip`] answers the client
/// (`tc::icmp_answer`).
pub const TOO_BIG: i32 = i32::MIN;

/// Puts an outer header from `source` to `backend` (IPv6: with flow `label`) in front of the packet
/// (its family and protocol in `room_flags`, from [`room_flags`]) and sends it: the verdict, or
/// [`TOO_BIG`], asked of the FIB before the encapsulation (once `bpf_skb_adjust_room` has marked
/// the skb encapsulated, `bpf_skb_change_tail` refuses to cut it for an answer).
// A BPF function of its own: the packet pointers the caller derived from `ctx` (LLVM would reuse
// them after the helper moved the data, which the verifier refuses) do not reach it. Hence also
// the family folded into the flags: five arguments at most.
#[inline(never)]
pub fn encapsulate(
    ctx: &TcContext,
    room_flags: u64,
    source: &Addr,
    backend: &Addr,
    label: u32,
) -> i32 {
    let v4 = room_flags & BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64 != 0;
    let (outer_len, outer_protocol) = if v4 {
        (IPV4_OUTER_LEN, IPPROTO_IPIP)
    } else {
        (IPV6_OUTER_LEN, IPPROTO_IPV6)
    };
    let route = xmit::route(ctx, v4, outer_protocol, source, backend, outer_len, 0);
    if let Err(Xmit::TooBig) = route {
        return TOO_BIG;
    }
    if let Err(verdict) = open_outer(ctx, room_flags, source, backend, label) {
        return verdict;
    }
    // The FIB's answer is read again from the scratch space: kept in a register, it would be
    // spilled around `bpf_skb_adjust_room`.
    let sent = route.and_then(|_| xmit::routed().ok_or(Xmit::NoRoute));
    match sent.map(|params| xmit::redirect(ctx, params)) {
        Ok(Xmit::Sent(action)) => action as i32,
        Ok(unsent) | Err(unsent) => xmit::verdict(Unsent::dsr_ipip(unsent)),
    }
}

/// [`encapsulate`] for packets nobody is answered about, the later fragments of a DSR IPIP
/// datagram (`tc::fragments`) and ICMP errors of its flows (`tc::xmit::leave`): the FIB is asked
/// after the encapsulation, and one too big for the egress MTU is dropped (`drop_encap_too_big`).
// A BPF function of its own, as `encapsulate`. Asking the FIB afterwards keeps its answer from
// living across `bpf_skb_adjust_room`: `lb_tc` → `tc::fragments::forward` → here is 512 bytes of
// stack exactly.
#[inline(never)]
pub fn encapsulate_or_drop(
    ctx: &TcContext,
    room_flags: u64,
    source: &Addr,
    backend: &Addr,
    label: u32,
) -> i32 {
    if let Err(verdict) = open_outer(ctx, room_flags, source, backend, label) {
        return verdict;
    }
    let v4 = room_flags & BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64 != 0;
    let outer_protocol = if v4 { IPPROTO_IPIP } else { IPPROTO_IPV6 };
    match xmit::fib_redirect(ctx, v4, outer_protocol, source, backend, 0, 0) {
        Xmit::Sent(action) => action as i32,
        unsent => xmit::verdict(Unsent::dsr_ipip(unsent)),
    }
}

/// Opens room for the outer header (`bpf_skb_adjust_room` with `room_flags`) and writes it; `Err`
/// holds the verdict of a packet that could not be encapsulated (counted).
#[inline(always)]
fn open_outer(
    ctx: &TcContext,
    room_flags: u64,
    source: &Addr,
    backend: &Addr,
    label: u32,
) -> Result<(), i32> {
    let v4 = room_flags & BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64 != 0;
    let outer_len = if v4 { IPV4_OUTER_LEN } else { IPV6_OUTER_LEN };
    let failed = || {
        count(Counter::DropEncapFailed);
        Err(TC_ACT_SHOT)
    };
    // Fails on an skb already encapsulated, or without memory for the headroom.
    if ctx
        .adjust_room(outer_len as i32, BPF_ADJ_ROOM_MAC, room_flags)
        .is_err()
    {
        return failed();
    }
    // The headers were in the linear part and still are (the room opens in front of them);
    // pointers are derived again after the helper, and their bounds proven again, with constant
    // lengths per family (what the verifier can follow).
    let (data, end) = (ctx.data(), ctx.data_end());
    let outer = data + ETH_LEN;
    if v4 {
        if outer + IPV4_OUTER_LEN + IPV4_LEN > end {
            return failed();
        }
        // SAFETY: the outer header and the inner IPv4 header are in bounds (checked just above).
        // Its sum, checksum included, is 0: a `CHECKSUM_COMPLETE` sum of the packet stays right.
        unsafe { write_outer_ipv4(outer, &source.0, &backend.0) };
    } else {
        if outer + IPV6_OUTER_LEN + IPV6_LEN > end {
            return failed();
        }
        // SAFETY: the outer header and the inner IPv6 header are in bounds (checked just above).
        unsafe {
            write_outer_ipv6(outer, &source.0, &backend.0, label);
            // The room was zeros; under `CHECKSUM_COMPLETE` the skb's sum of the packet must now
            // add the outer header, which has no checksum of its own (for other skbs, a no-op).
            let sum = bpf_csum_diff(
                core::ptr::null_mut(),
                0,
                outer as *mut u32,
                IPV6_OUTER_LEN as u32,
                0,
            );
            if sum >= 0 {
                bpf_csum_update(ctx.skb.skb, sum as u32);
            }
        }
    }
    Ok(())
}
