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
//! the FIB's next hop.

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

use super::{xmit, Chosen};
use crate::{
    dsr::{before_encapsulation, write_outer_ipv4, write_outer_ipv6},
    fragments,
    maps::count,
    packet::{
        header::{ETH_LEN, IPV4_LEN, IPV6_LEN},
        Flow,
    },
    xmit::{opts, Unsent, Xmit},
};

/// DSR on a shared segment: MAC rewrite towards `backend`, packet otherwise unchanged.
// A BPF function of its own, called from `lb_tc`: its stack does not add to `to_backend`'s.
#[inline(never)]
pub fn l2(ctx: &TcContext, flow: &Flow, backend: &Addr) -> i32 {
    fragments::track_first(ctx, &flow.key, mode::DSR_L2, None, Some(backend));
    send_l2(
        ctx,
        flow.key.family,
        flow.key.protocol,
        &flow.key.src,
        backend,
    )
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
        count(Counter::DropModeUnconfigured);
        return TC_ACT_SHOT;
    };
    let label = before_encapsulation(ctx, &flow.key, source, &chosen.backend);
    let room_flags = room_flags(flow.key.family, flow.key.protocol);
    encapsulate(ctx, room_flags, source, &chosen.backend, label)
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

/// Puts an outer header from `source` to `backend` (IPv6: with flow `label`) in front of the packet
/// (its family and protocol in `room_flags`, from [`room_flags`]) and sends it; also the later
/// fragments of a DSR IPIP datagram (`tc::fragments`).
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
    // Fails on an skb already encapsulated, or without memory for the headroom.
    if ctx
        .adjust_room(outer_len as i32, BPF_ADJ_ROOM_MAC, room_flags)
        .is_err()
    {
        count(Counter::DropEncapFailed);
        return TC_ACT_SHOT;
    }
    // The headers were in the linear part and still are (the room opens in front of them);
    // pointers are derived again after the helper, and their bounds proven again, with constant
    // lengths per family (what the verifier can follow).
    let (data, end) = (ctx.data(), ctx.data_end());
    let outer = data + ETH_LEN;
    if v4 {
        if outer + IPV4_OUTER_LEN + IPV4_LEN > end {
            count(Counter::DropEncapFailed);
            return TC_ACT_SHOT;
        }
        // SAFETY: the outer header and the inner IPv4 header are in bounds (checked just above).
        // Its sum, checksum included, is 0: a `CHECKSUM_COMPLETE` sum of the packet stays right.
        unsafe { write_outer_ipv4(outer, &source.0, &backend.0) };
    } else {
        if outer + IPV6_OUTER_LEN + IPV6_LEN > end {
            count(Counter::DropEncapFailed);
            return TC_ACT_SHOT;
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
    match xmit::fib_redirect(ctx, v4, outer_protocol, source, backend, 0, 0) {
        Xmit::Sent(action) => action as i32,
        unsent => xmit::verdict(Unsent::dsr_ipip(unsent)),
    }
}
