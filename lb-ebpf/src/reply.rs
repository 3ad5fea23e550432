//! The reply path of DNAT flows: a backend's packet to the client leaves with the VIP as its source.

use aya_ebpf::programs::XdpContext;

use crate::{maps::NAT_REPLY, nat, packet::Flow};

/// Rewrites `flow` if it is the reply of a tracked DNAT connection; returns whether it did.
#[inline(always)]
pub fn translate(ctx: &XdpContext, flow: &Flow) -> bool {
    // SAFETY: plain integers, copied out at once.
    let Some(reply) = (unsafe { NAT_REPLY.get(&flow.key) }).copied() else {
        return false;
    };
    nat::rewrite_source(ctx, flow, &reply.vip, reply.vip_port);
    true
}
