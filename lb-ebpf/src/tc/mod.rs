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
//! TC-attached interface). Fragmented datagrams are handled as in `lb_xdp`: a first fragment is
//! recorded after its rewrite, later ones get the same addresses (`tc::fragments`). ICMP errors
//! are passed untranslated (`pass_icmp_error_untracked`); the XDP CIDR deny list is not checked
//! here.
//!
//! On a workload's veth, where the policy programs also run, the same translation is split around
//! them so that the policy sees the chosen backend on both sides (as Cilium does):
//! - `lb_tc_request` (head of tcx ingress, before `policy_from_endpoint`) translates a request to a
//!   VIP and passes it on with `TCX_NEXT` (no redirect: the policy after it must see it), marking
//!   the flow `AT_CLIENT_VETH` (its conntrack entry, and its `NAT_REPLY` entry when it has one);
//!   everything else it passes untouched and uncounted;
//! - `lb_tc` (end of tcx ingress) translates the replies of other flows, as on any interface; a
//!   reply marked `AT_CLIENT_VETH` it leaves to the stack untranslated, so the backend's policy and
//!   the client's policy both match it to the connection client → backend;
//! - `lb_tc_reply` (end of tcx egress, after `policy_to_endpoint`) turns the source of a reply
//!   reaching its client back into the VIP.

mod fragments;
mod nat;
mod xmit;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    conntrack::reply_flags, counters::Counter, prefilter::role, service::mode, service::Addr,
};

use self::nat::Offsets;
use crate::{
    conntrack,
    context::PacketContext,
    fragments::Fragment,
    maps::count,
    packet::{parse, Flow, Parsed},
    prefilter,
    reply::{self, Origin},
    service,
};

/// Headers pulled into an skb's linear part when they are not there: enough for Ethernet, IPv6
/// with extension headers and TCP.
const PULL_BYTES: u32 = 256;

/// The verdict that lets the next program of the tcx chain run (`TCX_NEXT`; the next filter on
/// clsact); at the end of the chain the packet goes on.
const NEXT: i32 = TC_ACT_UNSPEC;

/// Entry point, at TC ingress of the interfaces facing clients and those facing backends (on a
/// workload veth: after the policy).
#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    let flow = match flow_of(&ctx) {
        Ok(flow) => flow,
        Err(NotFlow::Drop(reason)) => {
            count(reason);
            return TC_ACT_SHOT;
        }
        Err(NotFlow::Pass(reason)) => {
            count(reason);
            return TC_ACT_OK;
        }
        Err(NotFlow::Fragment(fragment)) => return fragments::forward(&ctx, &fragment),
    };
    match to_backend(&ctx, &flow, 0) {
        Ok(Some(backend)) => return xmit::forward(&ctx, &flow, &flow.key.src, &backend),
        Ok(None) => {}
        Err(action) => return action,
    }
    if prefilter::roles_of(&flow.key.src, flow.key.family) & role::BACKEND != 0 {
        if let Some(action) = reply(&ctx, &flow, false) {
            return action;
        }
    }
    count(Counter::PassNotService);
    TC_ACT_OK
}

/// Entry point at the head of TC ingress of a workload's veth: requests to a VIP are translated
/// before `policy_from_endpoint` checks them, then go through the stack.
#[classifier]
pub fn lb_tc_request(ctx: TcContext) -> i32 {
    let flow = match flow_of(&ctx) {
        Ok(flow) => flow,
        Err(NotFlow::Drop(reason)) => {
            count(reason);
            return TC_ACT_SHOT;
        }
        // Counted by `lb_tc` at the end of the chain.
        Err(_) => return NEXT,
    };
    match to_backend(&ctx, &flow, reply_flags::AT_CLIENT_VETH) {
        Ok(_) => NEXT,
        Err(action) => action,
    }
}

/// Entry point at the end of TC egress of a workload's veth: a reply reaching its client leaves
/// with the VIP as its source, after `policy_to_endpoint` matched it. Anything else passes
/// untouched and uncounted (the ingress programs counted it).
#[classifier]
pub fn lb_tc_reply(ctx: TcContext) -> i32 {
    let Ok(flow) = flow_of(&ctx) else {
        return NEXT;
    };
    if prefilter::roles_of(&flow.key.src, flow.key.family) & role::BACKEND != 0 {
        if let Some(action) = reply(&ctx, &flow, true) {
            return action;
        }
    }
    NEXT
}

/// Why a packet is not a TCP/UDP flow `lb_tc` translates, and the counter that says it.
enum NotFlow {
    Pass(Counter),
    Drop(Counter),
    /// A later fragment (only `lb_tc` translates them: see `tc::fragments`).
    Fragment(Fragment),
}

/// The packet's TCP/UDP flow, or why not (uncounted: each entry point decides).
#[inline(always)]
fn flow_of(ctx: &TcContext) -> Result<Flow, NotFlow> {
    let parsed = match parse(ctx) {
        // Headers beyond the linear part (rare: a driver or GRO left them in fragments). Pulling
        // only here keeps the common case free of the copy.
        Parsed::Drop(Counter::DropMalformed) if linear_len(ctx) < ctx.len() => {
            if ctx.pull_data(ctx.len().min(PULL_BYTES)).is_err() {
                return Err(NotFlow::Drop(Counter::DropMalformed));
            }
            parse(ctx)
        }
        parsed => parsed,
    };
    match parsed {
        Parsed::Flow(mut flow) => {
            // The whole packet, not only the linear part, for the byte counters.
            flow.len = ctx.len() as u64;
            Ok(flow)
        }
        Parsed::Fragment(fragment) => Err(NotFlow::Fragment(fragment)),
        Parsed::Icmp { .. } => Err(NotFlow::Pass(Counter::PassIcmpErrorUntracked)),
        Parsed::Pass(reason) => Err(NotFlow::Pass(reason)),
        Parsed::Drop(reason) => Err(NotFlow::Drop(reason)),
    }
}

/// A request to a VIP gets its backend (conntrack, else Maglev; a new DNAT flow's reply entry gets
/// `flags`) and is rewritten to it: `Ok(Some(backend address))`. `Ok(None)`: not a request to a
/// service. `Err`: the verdict of a packet that cannot go on (counted).
#[inline(always)]
fn to_backend(ctx: &TcContext, flow: &Flow, flags: u8) -> Result<Option<Addr>, i32> {
    let to = prefilter::roles_of(&flow.key.dst, flow.key.family);
    if to & (role::VIP_PORT | role::VIP_ALL_PORTS) == 0 {
        return Ok(None);
    }
    let tracked = conntrack::entry_of(flow);
    // SAFETY: LRU value of plain integers, read once.
    let Some(service) = tracked
        .and_then(|entry| service::of_tracked(flow, unsafe { (*entry).service_id }, to))
        .or_else(|| service::lookup(flow, to))
    else {
        return Ok(None);
    };
    if service.mode != mode::DNAT {
        count(Counter::DropTcModeUnsupported);
        return Err(TC_ACT_SHOT);
    }
    let backend = match conntrack::backend_for(flow, &service, tracked, flags) {
        Ok(chosen) => chosen.backend,
        Err(reason) => {
            count(reason);
            return Err(TC_ACT_SHOT);
        }
    };
    let port = if backend.port == 0 {
        flow.key.dst_port
    } else {
        backend.port
    };
    let at = Offsets::of(ctx, flow);
    // Before the rewrite: its helpers void the packet pointers in `flow`.
    let first_fragment = flags & reply_flags::AT_CLIENT_VETH == 0
        && crate::fragments::maybe_first(flow, PacketContext::data_end(ctx));
    let (old, old_port) = (flow.key.dst, flow.key.dst_port);
    match verdict(nat::rewrite(
        ctx,
        flow,
        at,
        &old,
        &backend.addr,
        old_port,
        port,
        false,
    )) {
        TC_ACT_OK => {
            if first_fragment {
                crate::fragments::record(ctx, &flow.key);
            }
            Ok(Some(backend.addr))
        }
        action => Err(action),
    }
}

/// The reply of a tracked DNAT flow leaves with the VIP as its source; `None` if `flow` is not one,
/// or (`at_client_veth` false) if it is left to `lb_tc_reply` at its client's veth. At the client's
/// veth the packet goes on in the chain, elsewhere to the FIB's next hop.
#[inline(always)]
fn reply(ctx: &TcContext, flow: &Flow, at_client_veth: bool) -> Option<i32> {
    let Origin::Dnat(vip, vip_port, flags) = reply::origin(&flow.key)? else {
        count(Counter::DropTcModeUnsupported);
        return Some(TC_ACT_SHOT);
    };
    if !at_client_veth && flags & reply_flags::AT_CLIENT_VETH != 0 {
        return None;
    }
    let at = Offsets::of(ctx, flow);
    // As in `to_backend`; at the client's veth fragments are left alone (see `tc::fragments`).
    let first_fragment =
        !at_client_veth && crate::fragments::maybe_first(flow, PacketContext::data_end(ctx));
    let (old, old_port) = (flow.key.src, flow.key.src_port);
    let action = verdict(nat::rewrite(
        ctx, flow, at, &old, &vip, old_port, vip_port, true,
    ));
    if action != TC_ACT_OK {
        return Some(action);
    }
    if first_fragment {
        crate::fragments::record(ctx, &flow.key);
    }
    count(Counter::ReplyTranslated);
    Some(if at_client_veth {
        NEXT
    } else {
        xmit::forward(ctx, flow, &vip, &flow.key.dst)
    })
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
