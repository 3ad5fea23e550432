//! `lb_tc`: the datapath of `lb_xdp` as a TC (tcx/clsact ingress) program, for interfaces where
//! XDP costs more than it saves. On a veth, an XDP program makes the kernel receive through a NAPI
//! ring, copy every cloned skb (all TCP segments) and turn TSO off on the peer; a TC program runs
//! on the skb the stack already has. On a physical NIC XDP stays the better choice.
//!
//! Same parse, prefilter, service lookup, conntrack, Maglev choice, SNAT port allocation and
//! counters as `lb_xdp` (the shared modules, monomorphised for `TcContext`). Every forwarding mode,
//! each in a module of its own, as in `lb_xdp`:
//! - DNAT: `tc::nat` rewrites the destination (and a reply's source) with the checksum helpers, as
//!   skbs may carry partial checksums;
//! - SNAT, both directions: `tc::snat`, the same rewrites on both ends (TTL decremented, as by
//!   `lb_xdp`);
//! - DSR L2 and DSR IPIP: `tc::dsr` (MACs only; an outer header opened with
//!   `bpf_skb_adjust_room`, so GSO packets are segmented as IP-in-IP).
//!
//! Then `tc::xmit` redirects the packet to the next hop the FIB names (skipping the stack's
//! forwarding path); what the FIB cannot settle each mode settles as `lb_xdp` does
//! (`crate::xmit::Unsent`: a translated packet goes to the stack with `TC_ACT_OK`, a DSR L2 one is
//! dropped, ...), counted. Fragmented datagrams are handled as in `lb_xdp`, in every mode: a first
//! fragment is recorded after its rewrite (before an encapsulation), and later ones leave the same
//! way (`tc::fragments`).
//! ICMP errors about balanced flows are translated by `icmp`, the same code as in `lb_xdp`, then go
//! to the stack (DNAT; on a workload veth around the policy, as the flows are: see `icmp`) or leave
//! as their SNAT or DSR flow's packets do (`xmit::leave`). Sources in the
//! CIDR deny list are dropped first, as `lb_xdp` drops them (`policy::cidr_deny`).
//!
//! Stack: the deepest chains of BPF frames, `lb_tc` → `icmp::handle` and `lb_tc` → [`to_backend`]
//! → `snat::allocate`, take the 512 bytes exactly; hence the small `Offsets` and `Chosen`, and
//! each mode's work called from `lb_tc` itself. The verifier refuses the program if a change
//! makes either longer (`combined stack size ... Too large`).
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
//!
//! The split programs translate DNAT only: a workload client's request to a SNAT or DSR service
//! is translated as DNAT (see [`choose`]: its replies come back to this node by the pod's route
//! anyway, and the policy must see the backend), and a SNAT reply leaving through a workload veth
//! (`lb_tc_reply`: a SNAT flow `lb_tc` translated for a client elsewhere) is dropped and counted
//! `drop_tc_mode_unsupported`. Clients behind `--iface` interfaces get every mode.

mod dsr;
mod egress;
mod fragments;
mod icmp_answer;
mod nat;
mod snat;
mod xmit;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    conntrack::{reply_flags, NatReply},
    counters::Counter,
    fragments::key_scope,
    prefilter::role,
    service::mode,
    service::{Addr, ServiceInfo},
};

use self::nat::Offsets;
use crate::{
    conntrack,
    context::PacketContext,
    fragments::Fragment,
    icmp,
    maps::count,
    packet::{parse, Flow, Parsed},
    policy::cidr_deny,
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
    if cidr_denied(&ctx) {
        return TC_ACT_SHOT;
    }
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
        Err(NotFlow::Icmp { family, offset }) => {
            return match icmp::handle(&ctx, family, offset, icmp::Scope::Node) {
                icmp::Verdict::GoesOn => TC_ACT_OK,
                icmp::Verdict::Leaves => icmp_leaves(&ctx),
                icmp::Verdict::Drop => TC_ACT_SHOT,
            }
        }
    };
    let at = Offsets::of(&ctx, &flow);
    // Each mode's work is a BPF function of its own called from here, next to (not under)
    // `to_backend` and `reply`: chained, their frames would not fit the 512 bytes of stack.
    match to_backend(&flow) {
        Ok(Some(chosen)) => {
            return match chosen.mode {
                mode::DNAT => match nat::to_backend(&ctx, &flow, &at, &chosen) {
                    TC_ACT_OK => onwards(&ctx, &flow, &flow.key.src, &chosen.backend),
                    action => action,
                },
                mode::SNAT => snat::forward(&ctx, &flow, &at, &chosen),
                mode::DSR_L2 => dsr::l2(&ctx, &flow, &chosen),
                _ => dsr::ipip(&ctx, &flow, &chosen),
            }
        }
        Ok(None) => {}
        Err(action) => return action,
    }
    if prefilter::roles_of(&flow.key.src, flow.key.family) & role::BACKEND != 0 {
        match reply(&ctx, &flow, &at, false) {
            Ok(Some(Reply::Dnat(vip))) => return onwards(&ctx, &flow, &vip, &flow.key.dst),
            Ok(Some(Reply::Snat(entry))) => return snat::reply(&ctx, &flow, &at, entry),
            Ok(None) => {}
            Err(action) => return action,
        }
    }
    count(Counter::PassNotService);
    TC_ACT_OK
}

/// An ICMP error translated for a SNAT or DSR flow leaves as that flow's packets do.
// A BPF function of its own: its frame sits beside `icmp::handle`'s, not under it.
#[inline(never)]
fn icmp_leaves(ctx: &TcContext) -> i32 {
    let (family, protocol) = icmp::family_and_protocol(ctx);
    match icmp::departure() {
        Some(how) => xmit::leave(ctx, family, protocol, how),
        None => TC_ACT_OK,
    }
}

/// A DNAT packet `lb_tc` rewrote (now `src` → `dst`): a first fragment is recorded for the later
/// fragments of its datagram, then the packet goes to the FIB's next hop.
#[inline(always)]
fn onwards(ctx: &TcContext, flow: &Flow, src: &Addr, dst: &Addr) -> i32 {
    crate::fragments::track_first(ctx, &flow.key, mode::DNAT, None, None);
    xmit::forward(ctx, flow, src, dst)
}

/// Entry point at the head of TC ingress of a workload's veth: requests to a VIP, and ICMP errors
/// the client sends about their replies, are translated before `policy_from_endpoint` checks them,
/// then go through the stack.
#[classifier]
pub fn lb_tc_request(ctx: TcContext) -> i32 {
    let flow = match flow_of(&ctx) {
        Ok(flow) => flow,
        Err(NotFlow::Drop(reason)) => {
            count(reason);
            return TC_ACT_SHOT;
        }
        Err(NotFlow::Icmp { family, offset }) => {
            icmp::handle(&ctx, family, offset, icmp::Scope::ClientRequests);
            return NEXT;
        }
        Err(NotFlow::Fragment(fragment)) => {
            return fragments::at_client_veth(&ctx, &fragment, key_scope::CLIENT_REQUEST)
        }
        // Counted by `lb_tc` at the end of the chain.
        Err(_) => return NEXT,
    };
    match request(&ctx, &flow, &Offsets::of(&ctx, &flow)) {
        TC_ACT_OK => NEXT,
        action => action,
    }
}

/// Entry point at the end of TC egress of a workload's veth: a reply reaching its client leaves
/// with the VIP as its source, after `policy_to_endpoint` matched it, and so does an ICMP error
/// about the client's requests. Anything else passes untouched and uncounted (the ingress programs
/// counted it).
#[classifier]
pub fn lb_tc_reply(ctx: TcContext) -> i32 {
    let flow = match flow_of(&ctx) {
        Ok(flow) => flow,
        Err(NotFlow::Icmp { family, offset }) => {
            icmp::handle(&ctx, family, offset, icmp::Scope::ClientReplies);
            return NEXT;
        }
        Err(NotFlow::Fragment(fragment)) => {
            return fragments::at_client_veth(&ctx, &fragment, key_scope::CLIENT_REPLY)
        }
        Err(_) => return NEXT,
    };
    if prefilter::roles_of(&flow.key.src, flow.key.family) & role::BACKEND != 0 {
        match reply(&ctx, &flow, &Offsets::of(&ctx, &flow), true) {
            Ok(Some(_)) => crate::fragments::track_first(
                &ctx,
                &flow.key,
                crate::fragments::in_scope(mode::DNAT, key_scope::CLIENT_REPLY),
                None,
                None,
            ),
            Ok(None) => {}
            Err(action) => return action,
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
    /// An ICMP/ICMPv6 message at `offset` (only `lb_tc` translates errors: see `icmp`).
    Icmp {
        family: u8,
        offset: usize,
    },
}

/// Whether the packet's source is in the CIDR deny list (counted if so). The check reads the
/// fixed IP header, pulled into the linear part first if a driver left it outside: otherwise such
/// a packet would pass unchecked.
#[inline(always)]
fn cidr_denied(ctx: &TcContext) -> bool {
    if !cidr_deny::enabled() {
        return false;
    }
    if (linear_len(ctx) as usize) < cidr_deny::HEADER_BYTES && linear_len(ctx) < ctx.len() {
        // A failed pull leaves the packet as it was: checked on what is there.
        let _ = ctx.pull_data(ctx.len().min(PULL_BYTES));
    }
    cidr_deny::source_denied(ctx)
}

/// The packet's TCP/UDP flow, or why not (uncounted: each entry point decides).
#[inline(always)]
fn flow_of(ctx: &TcContext) -> Result<Flow, NotFlow> {
    let parsed = match parse(ctx) {
        // Headers beyond the linear part (rare: a driver or GRO left them in fragments), or an
        // ICMP message, whose quoted headers `icmp` reads directly too. Pulling only here keeps
        // the common case free of the copy.
        Parsed::Drop(Counter::DropMalformed) | Parsed::Icmp { .. }
            if linear_len(ctx) < ctx.len() =>
        {
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
        Parsed::Icmp { family, offset } => Err(NotFlow::Icmp { family, offset }),
        Parsed::Pass(reason) => Err(NotFlow::Pass(reason)),
        Parsed::Drop(reason) => Err(NotFlow::Drop(reason)),
    }
}

/// Where [`to_backend`] sends a request: the backend and what its service's mode needs.
#[derive(Clone, Copy)]
pub struct Chosen {
    pub backend: Addr,
    /// The backend's port (network byte order): its own, or the request's when it has none.
    pub port: u16,
    /// SNAT: the flow's source port on the node (network byte order).
    pub snat_port: u16,
    pub service_id: u32,
    /// `lb_common::service::mode`.
    pub mode: u8,
}

/// A request to a VIP gets its backend (conntrack, else Maglev; a new SNAT flow also gets its
/// port): `Ok(Some(Chosen))`, for `lb_tc` to rewrite and send as its mode says. `Ok(None)`: not
/// a request to a service. `Err`: the verdict of a packet that cannot go on (counted).
///
/// This, [`request`], [`reply`] and each mode's work are BPF functions of their own, so that the
/// entry points' frames hold little more than the parsed flow: the deepest chain of frames must
/// fit in 512 bytes, and they also call `icmp::handle` (and this one `snat::allocate`). For the
/// same reason they call nothing that has a large frame: first fragments are recorded by each
/// mode's work ([`onwards`] for DNAT), which the entry points call.
#[inline(never)]
fn to_backend(flow: &Flow) -> Result<Option<Chosen>, i32> {
    choose(flow, true, 0)
}

/// `lb_tc_request`'s [`to_backend`]: every service's request is translated as DNAT (see
/// [`choose`]), its flows marked `AT_CLIENT_VETH`, and the rewrite done here. Returns the verdict
/// (`TC_ACT_OK` for a packet that goes on, rewritten or not).
#[inline(never)]
fn request(ctx: &TcContext, flow: &Flow, at: &Offsets) -> i32 {
    match choose(flow, false, reply_flags::AT_CLIENT_VETH) {
        Ok(Some(chosen)) => {
            let verdict = nat::to_backend(ctx, flow, at, &chosen);
            if verdict == TC_ACT_OK {
                crate::fragments::track_first(
                    ctx,
                    &flow.key,
                    crate::fragments::in_scope(mode::DNAT, key_scope::CLIENT_REQUEST),
                    None,
                    None,
                );
            }
            verdict
        }
        Ok(None) => TC_ACT_OK,
        Err(action) => action,
    }
}

/// The backend of a request to a VIP (see [`to_backend`]). With `all_modes` false (a client on
/// a workload veth), every service is served as DNAT, whatever its mode, as Cilium serves pods'
/// requests to services: the replies reach this node anyway (the pod's address routes to it),
/// so SNAT's return path is not needed, and the policy on both sides sees the backend (a DSR
/// packet would still name the VIP). A new DNAT flow's reply entry gets `flags`.
#[inline(always)]
fn choose(flow: &Flow, all_modes: bool, flags: u8) -> Result<Option<Chosen>, i32> {
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
    let service = if all_modes {
        service
    } else {
        ServiceInfo {
            mode: mode::DNAT,
            ..service
        }
    };
    match conntrack::backend_for(flow, &service, tracked, flags) {
        Ok(chosen) => Ok(Some(Chosen {
            backend: chosen.backend.addr,
            port: chosen.backend.port_for(flow.key.dst_port),
            snat_port: chosen.snat_port,
            service_id: service.id,
            mode: service.mode,
        })),
        // Counted and reported by `backend_for`.
        Err(_) => Err(TC_ACT_SHOT),
    }
}

/// What a packet from a backend is the reply of (see [`reply`]).
enum Reply {
    /// A DNAT flow, rewritten: the VIP it now comes from.
    Dnat(Addr),
    /// A SNAT flow, not rewritten yet: its `NAT_REPLY` entry, for `snat::reply`.
    Snat(&'static NatReply),
}

/// The reply of a tracked DNAT flow gets the VIP as its source: `Ok(Some(Reply::Dnat(VIP)))`. The
/// reply of a SNAT flow is left to `snat::reply` (`lb_tc`; `lb_tc_reply` refuses it: dropped,
/// counted `drop_tc_mode_unsupported`). `Ok(None)`: `flow` is not a reply, or (`at_client_veth`
/// false) it is left to `lb_tc_reply` at its client's veth. `Err`: the verdict of a packet that
/// cannot go on (counted).
#[inline(never)]
fn reply(
    ctx: &TcContext,
    flow: &Flow,
    at: &Offsets,
    at_client_veth: bool,
) -> Result<Option<Reply>, i32> {
    let Some(origin) = reply::origin(&flow.key) else {
        return Ok(None);
    };
    let (vip, vip_port, flags) = match origin {
        Origin::Dnat(vip, vip_port, flags) => (vip, vip_port, flags),
        Origin::Snat(entry) if !at_client_veth => return Ok(Some(Reply::Snat(entry))),
        Origin::Snat(_) => {
            count(Counter::DropTcModeUnsupported);
            return Err(TC_ACT_SHOT);
        }
    };
    if !at_client_veth && flags & reply_flags::AT_CLIENT_VETH != 0 {
        return Ok(None);
    }
    let (old, old_port) = (flow.key.src, flow.key.src_port);
    match verdict(nat::rewrite(
        ctx, flow, *at, &old, &vip, old_port, vip_port, true,
    )) {
        TC_ACT_OK => {
            count(Counter::ReplyTranslated);
            Ok(Some(Reply::Dnat(vip)))
        }
        action => Err(action),
    }
}

/// A rewrite the helpers refused leaves a half-written packet: dropped, counted malformed.
#[inline(always)]
fn verdict(rewritten: Result<(), i64>) -> i32 {
    match rewritten {
        Ok(()) => TC_ACT_OK,
        Err(_) => refused(),
    }
}

/// The verdict of a packet whose rewrite the helpers refused (see [`verdict`]).
#[inline(always)]
fn refused() -> i32 {
    count(Counter::DropMalformed);
    TC_ACT_SHOT
}

#[inline(always)]
fn linear_len(ctx: &TcContext) -> u32 {
    (PacketContext::data_end(ctx) - PacketContext::data(ctx)) as u32
}
