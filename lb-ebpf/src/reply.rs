//! The reply path of NAT flows: a backend's packet to the client (DNAT) leaves with the VIP as its
//! source; one to the node's SNAT address and port (SNAT) also goes back to the client's address and
//! port. DSR replies never come here: backends send them to the client directly. Replies of flows
//! translated on their client's workload veth are left to `lb_tc_reply` there (see
//! `lb_common::conntrack::reply_flags::AT_CLIENT_VETH`).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{conntrack::reply_flags, counters::Counter, service::mode};

use crate::{
    maps::{count, NAT_REPLY},
    nat,
    packet::Flow,
    snat,
};

/// Rewrites `flow` if it is the reply of a tracked NAT connection and returns the verdict (counted);
/// `None` if it is not one.
#[inline(always)]
pub fn translate(ctx: &XdpContext, flow: &Flow) -> Option<u32> {
    // SAFETY: plain integers; what DNAT needs is copied out at once, SNAT reads the entry in place
    // (its stack is tight).
    let reply = unsafe { NAT_REPLY.get(&flow.key) }?;
    if reply.flags & reply_flags::AT_CLIENT_VETH != 0 {
        return None;
    }
    if reply.mode == mode::SNAT {
        return Some(snat::reply(ctx, flow, reply));
    }
    let (vip, vip_port) = (reply.vip, reply.vip_port);
    nat::rewrite_source(ctx, flow, &vip, vip_port);
    count(Counter::ReplyTranslated);
    Some(xdp_action::XDP_PASS)
}
