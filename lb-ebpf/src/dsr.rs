//! Direct server return: the backend answers the client itself, with the VIP as source, so replies
//! never cross the node (no `NAT_REPLY` entry, no reverse translation). Backends hold the VIP on a
//! loopback (and, on a shared L2 segment, must not answer ARP/ND for it: `arp_ignore=1`,
//! `arp_announce=2`). The backend port is the service port (the config enforces it).
//!
//! **L2** ([`l2`]): the IP packet is left exactly as it came; only the Ethernet header changes:
//! destination = the backend's MAC, source = the egress interface's, both from `bpf_fib_lookup` on
//! the backend address, which must be on-link (a segment shared with the node). Then `XDP_TX` or
//! redirect. On failure the packet is dropped and counted, never passed: the unchanged packet is
//! addressed to the VIP, which the node's stack would route back where it came from or answer itself.
//! The first packets to a backend whose MAC the node has not resolved yet are dropped
//! (`drop_dsr_no_neigh`); the agent resolves the backends of non-DNAT services when it programs
//! them, and health checks keep the entries fresh.
//!
//! **IPIP** ([`ipip`]): an outer header is put in front of the unchanged packet with
//! `bpf_xdp_adjust_head`: IPv4 in IPv4 (protocol 4) or IPv6 in IPv6 (next header 41); mixed families
//! are not produced. Outer source = the node address of the service (`SERVICE_MODES`), outer
//! destination = the backend. Outer IPv4: TOS, identification and DF copied from the inner header
//! (RFC 2003), TTL 64, checksum computed in full (a new header); outer IPv6: traffic class copied,
//! flow label = a hash of the inner flow (ECMP and RSS entropy), hop limit 64. Then
//! `bpf_fib_lookup` on the backend (which may be routed) and `XDP_TX` or redirect; when the fast path
//! cannot send it, the encapsulated packet goes to the kernel (see `snat.rs` about `accept_local`),
//! except when it exceeds the egress MTU: the client is answered "fragmentation needed" / "packet
//! too big" (`icmp_answer`), or the packet dropped (`drop_encap_too_big`) when it cannot be.
//! The backend runs `lb_decap` (decap.rs), since the kernel has no tunnel devices to rely on.
//!
//! **MTU**: encapsulation adds 20 (IPv4) or 40 (IPv6) bytes. Production links between balancers and
//! backends need that much MTU headroom over the client-facing MTU, or TCP MSS clamping on the
//! path (and UDP payloads that fit). Otherwise a full-sized packet is answered with "fragmentation
//! needed" / "packet too big" (`icmp_answer`), so that its sender's path MTU discovery lowers what it
//! sends by the outer header; one that cannot be answered is dropped and counted.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    checksum,
    conntrack::FlowKey,
    counters::Counter,
    fragments::field,
    modes::encap::{self, IPPROTO_IPIP, IPPROTO_IPV6, IPV4_OUTER_LEN, IPV6_OUTER_LEN, OUTER_TTL},
    service::{family, mode, Addr, Backend, ServiceInfo},
};

use crate::{
    context::PacketContext,
    flow_events, fragments, icmp_answer,
    maps::count,
    packet::{header::ETH_LEN, Flow},
    xmit::{self, fib_xmit, opts, Unsent, Xmit},
};

/// DSR on a shared segment: MAC rewrite towards `backend` (of service `service_id`), packet
/// otherwise unchanged. A packet the FIB cannot settle is dropped, and reported with flow events.
// A function of its own (a BPF subprogram): its stack does not add to the other paths'.
#[inline(never)]
pub fn l2(ctx: &XdpContext, flow: &Flow, service_id: u32, backend: &Backend) -> u32 {
    fragments::track_first(ctx, &flow.key, mode::DSR_L2, None, Some(&backend.addr));
    let (family, protocol) = (flow.key.family, flow.key.protocol);
    match fib_xmit(
        ctx,
        family,
        protocol,
        &flow.key.src,
        &backend.addr,
        0,
        opts::ON_LINK_ONLY,
    ) {
        Xmit::Sent(action) => action,
        unsent => flow_events::unsent(Unsent::dsr_l2(unsent), &flow.key, service_id, mode::DSR_L2)
            .xdp_action(),
    }
}

/// The unchanged packet from `src` (`protocol` inside) to the MAC of the on-link `backend`; also
/// the later fragments of a DSR L2 datagram (`fragments::forward`).
#[inline(always)]
pub fn send_l2(ctx: &XdpContext, family: u8, protocol: u8, src: &Addr, backend: &Addr) -> u32 {
    match fib_xmit(ctx, family, protocol, src, backend, 0, opts::ON_LINK_ONLY) {
        Xmit::Sent(action) => action,
        unsent => Unsent::dsr_l2(unsent).xdp_action(),
    }
}

/// DSR through IP-in-IP / IPv6-in-IPv6 towards `backend`.
// A function of its own (a BPF subprogram): its stack does not add to the other paths'.
#[inline(never)]
pub fn ipip(ctx: &XdpContext, flow: &Flow, service: &ServiceInfo, backend: &Backend) -> u32 {
    let Some(source) = crate::service::source_address(service.id) else {
        count(Counter::DropModeUnconfigured);
        flow_events::not_forwarded(
            &flow.key,
            service.id,
            mode::DSR_IPIP,
            Counter::DropModeUnconfigured,
        );
        return xdp_action::XDP_DROP;
    };
    // Everything needed from `flow` is read now: its packet offsets are void once the head moves
    // (its key, a copy in the caller's frame, stays).
    let family = flow.key.family;
    let label = before_encapsulation(ctx, &flow.key, source, &backend.addr);
    let (action, reason) = match encapsulate(ctx, family, source, &backend.addr, label) {
        TOO_BIG => {
            match icmp_answer::answer(ctx, family, icmp_answer::message::TOO_BIG_ENCAPSULATED) {
                xdp_action::XDP_TX => (xdp_action::XDP_TX, Counter::IcmpTooBigSent),
                icmp_answer::UNANSWERED => (
                    Unsent::dsr_ipip(Xmit::TooBig).xdp_action(),
                    Counter::DropEncapTooBig,
                ),
                // Counted `drop_encap_too_big` there.
                action => (action, Counter::DropEncapTooBig),
            }
        }
        xdp_action::XDP_DROP => (xdp_action::XDP_DROP, Counter::DropEncapFailed),
        action => return action,
    };
    flow_events::not_forwarded(&flow.key, service.id, mode::DSR_IPIP, reason);
    action
}

/// What an IP-in-IP packet of the flow `arrived` needs before its encapsulation moves the header
/// (in `lb_xdp` and `lb_tc`): a first fragment is recorded for the datagram's later fragments
/// (outer `source` → `backend`), and the IPv6 outer flow label is computed from the ports, which
/// later fragments lack (returned; 0 for IPv4).
#[inline(always)]
pub fn before_encapsulation<C: PacketContext>(
    ctx: &C,
    arrived: &FlowKey,
    source: &Addr,
    backend: &Addr,
) -> u32 {
    let label = if arrived.family == family::IPV4 {
        0
    } else {
        encap::flow_label(arrived)
    };
    fragments::track_first(ctx, arrived, mode::DSR_IPIP, Some(source), Some(backend));
    label
}

/// What [`encapsulate`] returns, instead of an XDP action, for a packet that no longer fits the
/// egress MTU once encapsulated (nothing sent, nothing counted): [`ipip`] answers the client
/// (`icmp_answer`), [`encapsulate_or_drop`] drops it.
pub const TOO_BIG: u32 = u32::MAX;

/// Puts an outer header from `source` to `backend` (IPv6: with flow `label`) in front of the packet
/// (an IP packet of `family`) and sends it: the XDP action, or [`TOO_BIG`].
// A BPF function of its own: the packet pointers the caller derived from `ctx` (LLVM would reuse
// them after the head moved, which the verifier refuses) do not reach it.
#[inline(never)]
pub fn encapsulate(ctx: &XdpContext, family: u8, source: &Addr, backend: &Addr, label: u32) -> u32 {
    let v4 = family == family::IPV4;
    let outer_len = if v4 { IPV4_OUTER_LEN } else { IPV6_OUTER_LEN };
    // SAFETY: plain helper call on this program's context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        count(Counter::DropEncapFailed);
        return xdp_action::XDP_DROP;
    }

    // Packet pointers are re-derived from the context after the move, and bounds proven again.
    let data = ctx.data();
    if v4 {
        if data + ETH_LEN + IPV4_OUTER_LEN + 20 > ctx.data_end() {
            count(Counter::DropEncapFailed);
            return xdp_action::XDP_DROP;
        }
        // SAFETY: the Ethernet header, the outer header and the inner IPv4 header are in bounds.
        unsafe {
            move_ethernet(data, IPV4_OUTER_LEN);
            write_outer_ipv4(data + ETH_LEN, &source.0, &backend.0);
        }
    } else {
        if data + ETH_LEN + IPV6_OUTER_LEN + 40 > ctx.data_end() {
            count(Counter::DropEncapFailed);
            return xdp_action::XDP_DROP;
        }
        // SAFETY: the Ethernet header, the outer header and the inner IPv6 header are in bounds.
        unsafe {
            move_ethernet(data, IPV6_OUTER_LEN);
            write_outer_ipv6(data + ETH_LEN, &source.0, &backend.0, label);
        }
    }

    let tot_len = xmit::ip_len(ctx, family);
    match fib_xmit(
        ctx,
        family,
        if v4 { IPPROTO_IPIP } else { IPPROTO_IPV6 },
        source,
        backend,
        tot_len,
        0,
    ) {
        Xmit::Sent(action) => action,
        Xmit::TooBig => TOO_BIG,
        unsent => Unsent::dsr_ipip(unsent).xdp_action(),
    }
}

/// [`encapsulate`] for packets nobody is answered about, the later fragments of a DSR IPIP
/// datagram (`fragments::forward`) and ICMP errors of its flows (`icmp`): one too big for the
/// egress MTU is dropped (`drop_encap_too_big`).
#[inline(always)]
pub fn encapsulate_or_drop(
    ctx: &XdpContext,
    family: u8,
    source: &Addr,
    backend: &Addr,
    label: u32,
) -> u32 {
    match encapsulate(ctx, family, source, backend, label) {
        TOO_BIG => Unsent::dsr_ipip(Xmit::TooBig).xdp_action(),
        action => action,
    }
}

/// Copies the Ethernet header from `data + by` (where it was before the head moved) to `data`; the
/// EtherType stays (same family inside and out). The MACs are kept so that a packet handed to the
/// stack is still addressed to this host.
///
/// # Safety
/// `data .. data + by + 14` must be inside the packet, `by >= 14`.
#[inline(always)]
unsafe fn move_ethernet(data: usize, by: usize) {
    unsafe {
        let from = data + by;
        for i in 0..3 {
            let w = core::ptr::read_unaligned((from + 4 * i) as *const u32);
            core::ptr::write_unaligned((data + 4 * i) as *mut u32, w);
        }
        let w = core::ptr::read_unaligned((from + 12) as *const u16);
        core::ptr::write_unaligned((data + 12) as *mut u16, w);
    }
}

/// Writes an outer IPv4 header at `outer`, in front of the inner IPv4 header at `outer + 20`.
///
/// # Safety
/// `outer .. outer + 40` must be inside the packet.
#[inline(always)]
pub unsafe fn write_outer_ipv4(outer: usize, src: &[u32; 4], dst: &[u32; 4]) {
    unsafe {
        let inner = outer + IPV4_OUTER_LEN;
        let tos = *((inner + 1) as *const u8);
        let inner_len = u16::from_be(read16(inner + 2));
        // Words as they sit in the header (native loads of network-order bytes, see `checksum`).
        let version_tos = u16::from_ne_bytes([0x45, tos]);
        let total_len = inner_len.wrapping_add(IPV4_OUTER_LEN as u16).to_be();
        // Identification and DF copied (RFC 2003); the outer header of a fragment is no fragment
        // (offset and MF 0): the backend decapsulates each on its own.
        let id = read16(inner + 4);
        let frags = read16(inner + 6) & u16::to_be(field::IPV4_DONT_FRAGMENT);
        let ttl_protocol = u16::from_ne_bytes([OUTER_TTL, IPPROTO_IPIP]);
        write16(outer, version_tos);
        write16(outer + 2, total_len);
        write16(outer + 4, id);
        write16(outer + 6, frags);
        write16(outer + 8, ttl_protocol);
        core::ptr::write_unaligned((outer + 12) as *mut u32, src[0]);
        core::ptr::write_unaligned((outer + 16) as *mut u32, dst[0]);
        let sum = version_tos as u32
            + total_len as u32
            + id as u32
            + frags as u32
            + ttl_protocol as u32
            + (src[0] & 0xffff)
            + (src[0] >> 16)
            + (dst[0] & 0xffff)
            + (dst[0] >> 16);
        write16(outer + 10, !checksum::fold(sum));
    }
}

#[inline(always)]
unsafe fn read16(at: usize) -> u16 {
    unsafe { core::ptr::read_unaligned(at as *const u16) }
}

#[inline(always)]
unsafe fn write16(at: usize, value: u16) {
    unsafe { core::ptr::write_unaligned(at as *mut u16, value) }
}

/// Writes an outer IPv6 header at `outer`, in front of the inner IPv6 header at `outer + 40`.
///
/// # Safety
/// `outer .. outer + 80` must be inside the packet.
#[inline(always)]
pub unsafe fn write_outer_ipv6(outer: usize, src: &[u32; 4], dst: &[u32; 4], label: u32) {
    unsafe {
        let inner = outer + IPV6_OUTER_LEN;
        let first = u32::from_be(core::ptr::read_unaligned(inner as *const u32));
        let traffic_class = first & 0x0ff0_0000;
        let inner_payload = u16::from_be(read16(inner + 4));
        core::ptr::write_unaligned(
            outer as *mut u32,
            (0x6000_0000 | traffic_class | label).to_be(),
        );
        write16(
            outer + 4,
            inner_payload.wrapping_add(IPV6_OUTER_LEN as u16).to_be(),
        );
        *((outer + 6) as *mut u8) = IPPROTO_IPV6;
        *((outer + 7) as *mut u8) = OUTER_TTL;
        for i in 0..4 {
            core::ptr::write_unaligned((outer + 8 + 4 * i) as *mut u32, src[i]);
            core::ptr::write_unaligned((outer + 24 + 4 * i) as *mut u32, dst[i]);
        }
    }
}
