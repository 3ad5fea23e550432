//! `lb_tc`: the DNAT datapath of `lb_xdp` as a TC (tcx/clsact ingress) program, for interfaces
//! where XDP costs more than it saves. On a veth, an XDP program makes the kernel receive through a
//! NAPI ring, copy every cloned skb (all TCP segments) and turn TSO off on the peer; a TC program
//! runs on the skb the stack already has. On a physical NIC XDP stays the better choice.
//!
//! Same parse, prefilter, service lookup, conntrack, Maglev choice and counters as `lb_xdp` (the
//! shared modules, monomorphised for `TcContext`); the rewrite is `tc::nat` (checksum helpers, as
//! skbs may carry partial checksums). After the rewrite `tc::xmit` redirects the packet to the
//! next hop the FIB names (skipping the stack's forwarding path), or leaves it to the stack
//! (`TC_ACT_OK`) when the FIB cannot settle it.
//!
//! Only DNAT and its reverse: a packet of an SNAT or DSR service, or a reply of an SNAT flow, is
//! dropped and counted `drop_tc_mode_unsupported` (the agent warns when such a service meets a
//! TC-attached interface). Later fragments and ICMP errors are passed untranslated
//! (`pass_fragment`, `pass_icmp_error_untracked`); the XDP CIDR deny list is not checked here.

mod nat;
mod xmit;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{counters::Counter, prefilter::role, service::mode};

use self::nat::Offsets;
use crate::{
    conntrack,
    context::PacketContext,
    maps::count,
    packet::{parse, Flow, Parsed},
    prefilter,
    reply::{self, Origin},
    service,
};

/// Headers pulled into an skb's linear part when they are not there: enough for Ethernet, IPv6
/// with extension headers and TCP.
const PULL_BYTES: u32 = 256;

/// Entry point, at TC ingress of the interfaces facing clients and those facing backends.
#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    let parsed = match parse(&ctx) {
        // Headers beyond the linear part (rare: a driver or GRO left them in fragments). Pulling
        // only here keeps the common case free of the copy.
        Parsed::Drop(Counter::DropMalformed) if linear_len(&ctx) < ctx.len() => {
            if ctx.pull_data(ctx.len().min(PULL_BYTES)).is_err() {
                count(Counter::DropMalformed);
                return TC_ACT_SHOT;
            }
            parse(&ctx)
        }
        parsed => parsed,
    };
    let mut flow = match parsed {
        Parsed::Flow(flow) => flow,
        Parsed::Fragment(_) => {
            count(Counter::PassFragment);
            return TC_ACT_OK;
        }
        Parsed::Icmp { .. } => {
            count(Counter::PassIcmpErrorUntracked);
            return TC_ACT_OK;
        }
        Parsed::Pass(reason) => {
            count(reason);
            return TC_ACT_OK;
        }
        Parsed::Drop(reason) => {
            count(reason);
            return TC_ACT_SHOT;
        }
    };
    // The whole packet, not only the linear part, for the byte counters.
    flow.len = ctx.len() as u64;

    let to = prefilter::roles_of(&flow.key.dst, flow.key.family);
    let (service, tracked) = if to & (role::VIP_PORT | role::VIP_ALL_PORTS) != 0 {
        let tracked = conntrack::entry_of(&flow);
        // SAFETY: LRU value of plain integers, read once.
        let service = tracked
            .and_then(|entry| service::of_tracked(&flow, unsafe { (*entry).service_id }, to))
            .or_else(|| service::lookup(&flow, to));
        (service, tracked)
    } else {
        (None, None)
    };
    if let Some(service) = service {
        if service.mode != mode::DNAT {
            count(Counter::DropTcModeUnsupported);
            return TC_ACT_SHOT;
        }
        return match conntrack::backend_for(&flow, &service, tracked) {
            Ok(chosen) => {
                let backend = &chosen.backend;
                let port = if backend.port == 0 {
                    flow.key.dst_port
                } else {
                    backend.port
                };
                let at = Offsets::of(&ctx, &flow);
                let (old, old_port) = (flow.key.dst, flow.key.dst_port);
                match verdict(nat::rewrite(
                    &ctx,
                    &flow,
                    at,
                    &old,
                    &backend.addr,
                    old_port,
                    port,
                    false,
                )) {
                    TC_ACT_OK => xmit::forward(&ctx, &flow, &flow.key.src, &backend.addr),
                    action => action,
                }
            }
            Err(reason) => {
                count(reason);
                TC_ACT_SHOT
            }
        };
    }

    if prefilter::roles_of(&flow.key.src, flow.key.family) & role::BACKEND != 0 {
        if let Some(action) = reply(&ctx, &flow) {
            return action;
        }
    }

    count(Counter::PassNotService);
    TC_ACT_OK
}

/// The reply of a tracked DNAT flow leaves with the VIP as its source; `None` if `flow` is not one.
#[inline(always)]
fn reply(ctx: &TcContext, flow: &Flow) -> Option<i32> {
    let Origin::Dnat(vip, vip_port) = reply::origin(&flow.key)? else {
        count(Counter::DropTcModeUnsupported);
        return Some(TC_ACT_SHOT);
    };
    let at = Offsets::of(ctx, flow);
    let (old, old_port) = (flow.key.src, flow.key.src_port);
    let action = verdict(nat::rewrite(
        ctx, flow, at, &old, &vip, old_port, vip_port, true,
    ));
    if action != TC_ACT_OK {
        return Some(action);
    }
    count(Counter::ReplyTranslated);
    Some(xmit::forward(ctx, flow, &vip, &flow.key.dst))
}

/// A rewrite the helpers refused leaves a half-written packet: dropped, counted malformed.
#[inline(always)]
fn verdict(rewritten: Result<(), i64>) -> i32 {
    match rewritten {
        Ok(()) => TC_ACT_OK,
        Err(_) => {
            count(Counter::DropMalformed);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn linear_len(ctx: &TcContext) -> u32 {
    (PacketContext::data_end(ctx) - PacketContext::data(ctx)) as u32
}
