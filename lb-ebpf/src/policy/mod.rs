//! Identity-based policy enforcement: the kernel half of `lb_common::policy`, whose module doc is
//! the specification (maps, epochs, lookup order).
//!
//! Where: TC on the host side of each workload's veth. `policy_from_endpoint` (TC ingress of the
//! host side: packets the workload sends) checks the workload's **egress**;
//! `policy_to_endpoint` (TC egress of the host side: packets going into the workload) checks its
//! **ingress**. Each packet crossing the node between two local workloads is thus checked once
//! per direction, at its source's and its destination's interface. `cidr_deny::cidr_denied` drops
//! sources of a configured CIDR deny list in `lb_xdp`, before an skb exists, and in `lb_tc`.
//!
//! Follow a packet: `parse` (what it is, or why it is refused) → `state` (reply of an allowed
//! connection? later fragment of an allowed datagram?) → `check` (the rules) → `report` (counters
//! and verdict events) → verdict here.
//!
//! Anti-spoofing: the egress check knows the packet comes from the workload behind this interface,
//! so a source address that is not a local endpoint, or an endpoint of another interface (when the
//! agent knows the interface), is dropped as [`Reason::Spoofed`] instead of passing as
//! "no local endpoint": otherwise a workload could leave around its egress policy by forging its
//! source.

mod check;
pub mod cidr_deny;
mod maps;
mod parse;
mod report;
mod state;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    conntrack::FlowKey,
    policy::{endpoint_flags, Decision, Direction, Reason, Verdict},
};

use self::{
    parse::{parse, Parsed, Shape},
    report::{count, record, Verdicts},
};

/// The verdict for a packet the policy lets through: `TC_ACT_UNSPEC`, which tcx reads as
/// `TCX_NEXT`, so the next program of the interface's chain still runs (the balancer's `lb_tc`
/// after the policy on a workload veth); at the end of the chain, or with clsact, it passes.
/// `TC_ACT_OK` would end the chain.
const PASS: i32 = TC_ACT_UNSPEC;

/// Packets a workload sends: its egress.
#[classifier]
pub fn policy_from_endpoint(ctx: TcContext) -> i32 {
    enforce(&ctx, Direction::Egress)
}

/// Packets going into a workload: its ingress.
#[classifier]
pub fn policy_to_endpoint(ctx: TcContext) -> i32 {
    enforce(&ctx, Direction::Ingress)
}

/// A trivial TC program measured next to the policy programs by the benchmarks.
#[classifier]
pub fn tc_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[inline(always)]
fn enforce(ctx: &TcContext, dir: Direction) -> i32 {
    let packet = match parse(ctx) {
        Parsed::Packet(packet) => packet,
        Parsed::Pass(reason) => {
            count(Verdict::Allow, reason);
            return PASS;
        }
        Parsed::Drop(reason) => {
            let refused = Verdicts {
                direction: dir,
                decision: Decision {
                    verdict: Verdict::Deny,
                    reason,
                    rule_id: 0,
                },
                endpoint_identity: 0,
                peer_identity: 0,
                epoch: check::live_epoch(),
            };
            record(&FlowKey::default(), &refused);
            return TC_ACT_SHOT;
        }
    };

    // Replies and related errors of connections passed earlier, and later fragments of passed
    // datagrams, need no rule.
    let later_fragment = match packet.shape {
        Shape::Later(id) => {
            if state::first_fragment_passed(&packet, id, dir) {
                count(Verdict::Allow, Reason::Fragment);
                return PASS;
            }
            true
        }
        _ => false,
    };
    if !later_fragment && state::is_reply(&packet, dir) {
        count(Verdict::Allow, Reason::Established);
        if let Shape::First(id) = packet.shape {
            state::remember_first_fragment(&packet, id, dir);
        }
        return PASS;
    }

    let check = check::check(&packet, dir);
    let mut decision = check.decision;
    if dir == Direction::Egress
        && (decision.reason == Reason::NoLocalEndpoint
            // SAFETY: the program's context.
            || (check.endpoint_ifindex != 0
                && check.endpoint_ifindex != unsafe { (*ctx.skb.skb).ifindex }))
    {
        decision = Decision {
            verdict: Verdict::Deny,
            reason: Reason::Spoofed,
            rule_id: 0,
        };
    } else if later_fragment
        && !matches!(
            decision.reason,
            Reason::NoLocalEndpoint | Reason::NotSelected
        )
    {
        // Without its first fragment's verdict a later fragment cannot be matched to a port: it
        // passes only where no rule applies at all.
        decision = Decision {
            verdict: if check.endpoint_flags & endpoint_flags::AUDIT != 0 {
                Verdict::Audit
            } else {
                Verdict::Deny
            },
            reason: Reason::Fragment,
            rule_id: 0,
        };
    }
    record(
        &packet.key,
        &Verdicts {
            direction: dir,
            decision,
            endpoint_identity: check.endpoint_identity,
            peer_identity: check.peer_identity,
            epoch: check.epoch,
        },
    );
    if !decision.verdict.passes() {
        return TC_ACT_SHOT;
    }
    match packet.shape {
        Shape::Whole => state::remember(&packet.key, dir),
        Shape::First(id) => {
            state::remember(&packet.key, dir);
            state::remember_first_fragment(&packet, id, dir);
        }
        Shape::Later(_) | Shape::IcmpError(_) => {}
    }
    PASS
}
