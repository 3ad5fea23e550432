//! The reply path of NAT flows: a backend's packet to the client (DNAT) leaves with the VIP as its
//! source; one to the node's SNAT address and port (SNAT) also goes back to the client's address and
//! port. DSR replies never come here: backends send them to the client directly. Replies of flows
//! translated on their client's workload veth are left to `lb_tc_reply` there (see
//! `lb_common::conntrack::reply_flags::AT_CLIENT_VETH`, in the flow's conntrack entry and, when
//! it has one, its `NAT_REPLY` entry).
//!
//! A DNAT reply finds its VIP from its source (`BACKEND_REPLY`) when the backend serves one frontend,
//! and is translated only if that names a tracked flow to this backend (`conntrack::lookup`, the key
//! reversed): a new flow then writes one LRU entry instead of two. When several frontends share the
//! backend, the flow's own `NAT_REPLY` entry says (`lb_common::conntrack::BackendReply` has the
//! rules).

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    conntrack::{backend_reply_flags, reply_flags, BackendReply, FlowKey, NatReply},
    counters::Counter,
    service::{mode, Addr, ServiceKey},
};

use crate::{
    conntrack, fragments,
    maps::{count, scratch, BACKENDS, BACKEND_REPLY, NAT_REPLY},
    nat,
    packet::Flow,
    snat,
};

/// What a packet from a backend is the reply of.
pub enum Origin {
    /// A DNAT flow: the VIP and port the reply leaves from, and the flow's `reply_flags`.
    Dnat(Addr, u16, u8),
    /// A SNAT flow, with its `NAT_REPLY` entry (read in place: the SNAT path's stack is tight).
    Snat(&'static NatReply),
}

/// The flow `key` (backend → client, or backend → node address and SNAT port) is the reply of, if
/// any.
#[inline(always)]
pub fn origin(key: &FlowKey) -> Option<Origin> {
    let backend = ServiceKey {
        addr: key.src,
        port: key.src_port,
        protocol: key.protocol,
        family: key.family,
    };
    // SAFETY (both lookups): plain integers, copied out at once (SNAT's entry is read in place).
    let alone = unsafe { BACKEND_REPLY.get(&backend) };
    if let Some(frontend) = alone {
        if frontend.flags & backend_reply_flags::SHARED == 0 {
            return tracked(key, frontend);
        }
    }
    if let Some(reply) = unsafe { NAT_REPLY.get(key) } {
        return Some(if reply.mode == mode::SNAT {
            Origin::Snat(reply)
        } else {
            Origin::Dnat(reply.vip, reply.vip_port, reply.flags)
        });
    }
    // A shared backend's flow from before it was shared has no entry of its own.
    tracked(key, alone?)
}

/// The reply `key` of a flow to `frontend`, if that flow is tracked to the backend `key` comes from.
#[inline(always)]
fn tracked(key: &FlowKey, frontend: &BackendReply) -> Option<Origin> {
    let (vip, vip_port) = (frontend.vip, frontend.vip_port);
    // Built in per-CPU scratch space: the stack is needed by the paths around.
    let scratch = scratch()?;
    let flow = &mut scratch.flow;
    flow.src = key.dst;
    flow.dst = vip;
    flow.src_port = key.dst_port;
    flow.dst_port = vip_port;
    flow.protocol = key.protocol;
    flow.family = key.family;
    flow._pad = [0; 2];
    // SAFETY: plain integers, read at once.
    let entry = unsafe { &*conntrack::lookup_via(flow, &mut scratch.flow_v4)? };
    let backend = BACKENDS.get(entry.backend_id)?;
    (backend.addr == key.src && backend.port == key.src_port).then_some(Origin::Dnat(
        vip,
        vip_port,
        entry.flags,
    ))
}

/// Rewrites `flow` if it is the reply of a tracked NAT connection and returns the verdict (counted;
/// a first fragment recorded for its datagram); `None` if it is not one.
#[inline(always)]
pub fn translate(ctx: &XdpContext, flow: &Flow) -> Option<u32> {
    match origin(&flow.key)? {
        Origin::Snat(reply) => Some(snat::reply(ctx, flow, reply)),
        Origin::Dnat(_, _, flags) if flags & reply_flags::AT_CLIENT_VETH != 0 => None,
        Origin::Dnat(vip, vip_port, _) => {
            nat::rewrite_source(ctx, flow, &vip, vip_port);
            count(Counter::ReplyTranslated);
            fragments::track_first(ctx, &flow.key, mode::DNAT, None, None);
            Some(xdp_action::XDP_PASS)
        }
    }
}
