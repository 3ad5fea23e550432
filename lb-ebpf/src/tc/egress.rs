//! `lb_tc_egress`: at tcx egress of the interfaces facing clients (`--iface`, in both attach modes),
//! it translates the ICMP errors the node's own stack sends about a DNAT flow's translated request.
//!
//! `lb_xdp` and `lb_tc` hand a translated request (client → backend:port) to the stack when they do
//! not send it themselves (`lb_xdp`: every DNAT packet; `lb_tc`: one the FIB says is too big for
//! the link, `xmit::Unsent`). When the stack cannot forward it (too big with "don't fragment" for
//! the link towards the backend, TTL expired, backend unreachable), it answers the client with an
//! error quoting that translated packet, generated after XDP and TC ingress ran. The client's
//! socket is connected to the VIP and would ignore it: path MTU discovery would black-hole. Here,
//! on its way out, the quote becomes what the client sent (backend:port → VIP:port), as
//! `lb_tc_reply` does on workload veths: the same `icmp::handle`, the reply translation's lookup
//! (`reply::origin`), DNAT flows only, counted `icmp_node_error_to_client`.
//!
//! Everything else leaves untouched and uncounted, after as few instructions as possible: a
//! packet that is not ICMP after its EtherType and protocol byte.

use aya_ebpf::{macros::classifier, programs::TcContext};
use lb_common::{
    icmp::{PROTOCOL_ICMP, PROTOCOL_ICMPV6},
    service::family,
};
use network_types::eth::EtherType;

use super::{linear_len, NEXT, PULL_BYTES};
use crate::{
    icmp,
    packet::{
        header::{ETH_LEN, IPV4_LEN, IPV4_PROTOCOL, IPV6_LEN, IPV6_NEXT_HEADER},
        load16,
    },
};

/// Entry point at the end of TC egress of every interface facing clients.
#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    let Some((ip_family, offset)) = icmp_of(&ctx) else {
        return NEXT;
    };
    // The stack builds its errors in the linear part; pulled in case a driver feature moved them.
    if linear_len(&ctx) < ctx.len() && ctx.pull_data(ctx.len().min(PULL_BYTES)).is_err() {
        return NEXT;
    }
    icmp::handle(&ctx, ip_family, offset, icmp::Scope::NodeErrors);
    NEXT
}

/// The family and offset of an ICMP (IPv4) or ICMPv6 message, or `None` for anything else. ICMPv6
/// right after the fixed header only: the stack's errors carry no extension headers.
#[inline(always)]
fn icmp_of(ctx: &TcContext) -> Option<(u8, usize)> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + ETH_LEN + IPV4_LEN > end {
        return None;
    }
    let l3 = start + ETH_LEN;
    // SAFETY (all reads): within the bounds checked before each.
    let ether_type = unsafe { load16(start + ETH_LEN - 2) };
    if ether_type == EtherType::Ipv4 as u16 {
        if unsafe { *((l3 + IPV4_PROTOCOL) as *const u8) } != PROTOCOL_ICMP {
            return None;
        }
        let header_len = ((unsafe { *(l3 as *const u8) } & 0x0f) as usize) * 4;
        return (header_len >= IPV4_LEN).then_some((family::IPV4, ETH_LEN + header_len));
    }
    if ether_type == EtherType::Ipv6 as u16
        && start + ETH_LEN + IPV6_LEN <= end
        && unsafe { *((l3 + IPV6_NEXT_HEADER) as *const u8) } == PROTOCOL_ICMPV6
    {
        return Some((family::IPV6, ETH_LEN + IPV6_LEN));
    }
    None
}
