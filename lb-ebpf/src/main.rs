//! The XDP datapath. Follow a packet in file order: `packet` (parse; it asks the `prefilter` whether
//! the packet may be VIP traffic or a reply as soon as it has the addresses, and most traffic leaves
//! there after two array reads) → `service` (VIP lookup; a
//! tracked flow's service comes from its conntrack entry's id) → `conntrack` (existing flow?) →
//! `maglev` (backend for a new flow) → `nat` (rewrite) → verdict here. Replies from backends take
//! `reply` instead of `service`. Services in other forwarding modes leave through `snat` or `dsr`
//! instead of `nat`, with the next hop from `xmit`; `decap` is the separate program for DSR IPIP
//! backends. With flow events enabled at load time, `flow_events` reports each new flow's backend
//! (from `conntrack`) and each drop before one (from here and `tc`).
#![no_std]
#![no_main]
// Map keys are passed by reference on purpose: by value would copy them (up to 40 bytes) on the
// 512-byte BPF stack at every call.
#![allow(clippy::needless_borrows_for_generic_args)]

mod conntrack;
mod context;
mod decap;
mod dsr;
mod floor;
mod flow_events;
mod fragments;
mod icmp;
mod icmp_answer;
mod maglev;
mod maps;
mod mem;
mod nat;
mod packet;
mod policy;
mod prefilter;
mod reply;
mod service;
mod snat;
mod tc;
mod xmit;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use aya_log_ebpf::warn;
use lb_common::{counters::Counter, prefilter::role, service::mode};

use crate::{
    maps::count,
    packet::{parse, Parsed},
};

/// Entry point, attached to every interface the balancer node receives traffic on: the one facing
/// clients (VIP traffic goes to a backend) and those facing backends (replies go back as the VIP).
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    // Before parsing: it reads only the source address, and nothing parsed is live across it.
    if policy::cidr_deny::cidr_denied(&ctx) {
        return xdp_action::XDP_DROP;
    }
    let flow = match parse(&ctx) {
        Parsed::Flow(flow) => flow,
        Parsed::Fragment(fragment) => return fragments::forward(&ctx, &fragment),
        Parsed::Icmp { family, offset } => {
            return match icmp::handle(&ctx, family, offset, icmp::Scope::Node) {
                icmp::Verdict::GoesOn => xdp_action::XDP_PASS,
                icmp::Verdict::Leaves => icmp_leaves(&ctx),
                icmp::Verdict::Drop => xdp_action::XDP_DROP,
            }
        }
        Parsed::Pass(reason) => {
            count(reason);
            return xdp_action::XDP_PASS;
        }
        Parsed::Drop(reason) => {
            count(reason);
            return xdp_action::XDP_DROP;
        }
    };

    let roles = flow.roles;
    let (service, tracked) = if roles & prefilter::VIP != 0 {
        // A tracked flow names its service in its entry: one hash lookup instead of two.
        let tracked = conntrack::entry_of(&flow);
        // SAFETY: LRU value of plain integers, read once.
        let service = tracked
            .and_then(|entry| service::of_tracked(&flow, unsafe { (*entry).service_id }, roles))
            .or_else(|| service::lookup(&flow, roles));
        (service, tracked)
    } else {
        (None, None)
    };
    if let Some(service) = service {
        return match conntrack::backend_for(&flow, &service, tracked, 0) {
            Ok(chosen) if service.mode == mode::DNAT => {
                nat::to_backend(&ctx, &flow, &chosen.backend);
                fragments::track_first(&ctx, &flow.key, mode::DNAT, None, None);
                xdp_action::XDP_PASS
            }
            Ok(chosen) => match service.mode {
                mode::SNAT => {
                    snat::forward(&ctx, &flow, &service, &chosen.backend, chosen.snat_port)
                }
                mode::DSR_L2 => dsr::l2(&ctx, &flow, service.id, &chosen.backend),
                _ => dsr::ipip(&ctx, &flow, &service, &chosen.backend),
            },
            Err(reason) => {
                // Counted and reported by `backend_for`. Rare (a service without backends, no
                // SNAT port free) and worth a line in the agent's log.
                warn!(
                    &ctx,
                    "lb_xdp: dropped a packet to service {}: counter {} (no backend or no SNAT port)",
                    service.id,
                    reason as u32
                );
                xdp_action::XDP_DROP
            }
        };
    }

    // The address of a VIP without a service on this port and protocol may still be a backend's.
    let from_backend = roles & role::BACKEND != 0
        || (roles & prefilter::VIP != 0
            && prefilter::roles_of(&flow.key.src, flow.key.family) & role::BACKEND != 0);
    if from_backend {
        if let Some(action) = reply::translate(&ctx, &flow) {
            return action;
        }
    }

    count(Counter::PassNotService);
    xdp_action::XDP_PASS
}

/// An ICMP error translated for a SNAT or DSR flow leaves as that flow's packets do.
// A BPF function of its own: its frame sits beside `icmp::handle`'s, not under it.
#[inline(never)]
fn icmp_leaves(ctx: &XdpContext) -> u32 {
    let (family, protocol) = icmp::family_and_protocol(ctx);
    match icmp::departure() {
        Some(how) => xmit::leave(ctx, family, protocol, how),
        None => xdp_action::XDP_PASS,
    }
}

/// A trivial program measured next to `lb_xdp` by the benchmarks: the cost of XDP itself.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
