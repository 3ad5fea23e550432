//! Per-reason counters and verdict events (`POLICY_EVENTS`).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    conntrack::FlowKey,
    policy::{counter_index, Decision, Direction, Reason, Verdict, VerdictEvent, EVENTS_LOST_SLOT},
};

use super::maps::{POLICY_COUNTERS, POLICY_EVENTS};

/// Set at load time (`EbpfLoader::set_global`): non-zero to report allows as well as denials and
/// audits. Read with a volatile load so the compiler keeps the load the loader patches.
#[unsafe(no_mangle)]
static POLICY_REPORT_ALLOWS: u32 = 0;

#[inline(always)]
fn add(slot: u32) {
    if let Some(counter) = POLICY_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, only this program run on this CPU writes it.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn count(verdict: Verdict, reason: Reason) {
    add(counter_index(verdict, reason));
}

/// What an event says beyond the packet.
pub struct Verdicts {
    pub direction: Direction,
    pub decision: Decision,
    pub endpoint_identity: u32,
    pub peer_identity: u32,
    pub epoch: u8,
}

/// Counts the decision and reports it if it is a denial or an audit (or an allow, when enabled).
#[inline(always)]
pub fn record(key: &FlowKey, v: &Verdicts) {
    count(v.decision.verdict, v.decision.reason);
    // SAFETY: a global of this program.
    if v.decision.verdict == Verdict::Allow
        && unsafe { core::ptr::read_volatile(&POLICY_REPORT_ALLOWS) } == 0
    {
        return;
    }
    event(key, v);
}

/// A separate BPF function: the event's fields are written straight into the ring buffer.
#[inline(never)]
fn event(key: &FlowKey, v: &Verdicts) {
    let Some(mut entry) = POLICY_EVENTS.reserve::<VerdictEvent>(0) else {
        add(EVENTS_LOST_SLOT);
        return;
    };
    entry.write(VerdictEvent {
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        src_addr: key.src.0,
        dst_addr: key.dst.0,
        src_port: key.src_port,
        dst_port: key.dst_port,
        family: key.family,
        protocol: key.protocol,
        direction: v.direction as u8,
        verdict: v.decision.verdict as u8,
        reason: v.decision.reason as u8,
        epoch: v.epoch,
        _pad: 0,
        endpoint_identity: v.endpoint_identity,
        peer_identity: v.peer_identity,
        rule_id: v.decision.rule_id,
    });
    entry.submit(0);
}
