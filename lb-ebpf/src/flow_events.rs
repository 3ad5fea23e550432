//! Flow events (`lb_common::flow_events`): a new flow's backend choice (from `conntrack`), a
//! VIP packet dropped before it had a backend (from `conntrack::backend_for`), and a packet of a
//! flow whose backend was chosen that did not go to it (from the DSR and SNAT senders: no
//! neighbour or route, too big once encapsulated; from `backend_for`: no SNAT source port free),
//! reported through the `FLOW_EVENTS` ring buffer.
//!
//! Off unless the agent loads the programs with `LB_FLOW_EVENTS` set: a read-only global, so with
//! it 0 the verifier removes every call below and the paths cost what they did without events.
//! Only the new-flow and drop paths test it; conntrack hits and non-VIP packets never reach it.
//! The writers are BPF functions of their own that fill the reserved ring buffer memory in place:
//! nothing is built on the stack, which `lb_tc`'s deepest chains use whole (see `tc`).

use aya_ebpf::{helpers::generated::bpf_ktime_get_coarse_ns, maps::ring_buf::RingBufEntry};
use lb_common::{
    conntrack::FlowKey,
    counters::Counter,
    flow_events::{kind, FlowEvent},
    service::{Addr, ServiceInfo},
};

use crate::{
    conntrack,
    maps::{count, scratch, BACKENDS, FLOW_EVENTS},
    packet::Flow,
    xmit::Unsent,
};

/// Set at load time (`EbpfLoader::override_global`): non-zero to report flow events. Read with a
/// volatile load so the compiler keeps the load the loader patches.
#[unsafe(no_mangle)]
static LB_FLOW_EVENTS: u32 = 0;

/// Whether flow events were enabled at load time.
#[inline(always)]
pub fn enabled() -> bool {
    // SAFETY: a global of this program.
    unsafe { core::ptr::read_volatile(&LB_FLOW_EVENTS) != 0 }
}

/// Reports a new flow of `service` sent to backend `backend_id`; `choice` says why it was chosen
/// (`lb_common::flow_events::choice`). The backend is read again from `BACKENDS` (an array read,
/// only with events on) rather than passed: a pointer to the caller's copy would keep it on the
/// caller's stack, which `lb_tc`'s deepest chain cannot spare.
#[inline(never)]
pub fn new_flow(flow: &Flow, service: &ServiceInfo, backend_id: u32, choice: u8) {
    let Some(mut entry) = reserve(&flow.key, service.id, service.mode, kind::NEW_FLOW) else {
        return;
    };
    write_backend(&mut entry, &flow.key, backend_id);
    // SAFETY: `entry` is the reserved record, which `reserve` began to write.
    unsafe { (*entry.as_mut_ptr()).choice = choice };
    entry.submit(0);
}

/// Reports, when flow events are on, a packet of the flow `key` (to service `service_id`, in
/// `mode`) whose backend was chosen but that did not go to it: `reason` is the counter already
/// counted, a drop, `icmp_too_big_sent`, `icmp_time_exceeded_sent` or
/// `icmp_unreachable_sent`.
#[inline(always)]
pub fn not_forwarded(key: &FlowKey, service_id: u32, mode: u8, reason: Counter) {
    if enabled() {
        report_not_forwarded(key, service_id, mode, reason);
    }
}

/// [`not_forwarded`] for a packet the fast path did not send (`unsent`), when it is a drop.
#[inline(always)]
pub fn unsent(unsent: Unsent, key: &FlowKey, service_id: u32, mode: u8) -> Unsent {
    if let Unsent::Drop(reason) = unsent {
        not_forwarded(key, service_id, mode, reason);
    }
    unsent
}

/// The flow's backend is the one its conntrack entry names (written when it was chosen): the
/// callers, after the choice, need not keep its id on their stack.
#[inline(never)]
fn report_not_forwarded(key: &FlowKey, service_id: u32, mode: u8, reason: Counter) {
    let tracked = scratch().and_then(|s| conntrack::lookup_via(key, &mut s.flow_v4));
    // SAFETY: LRU value of plain integers.
    let backend_id = tracked.map_or(0, |entry| unsafe { (*entry).backend_id });
    write_not_forwarded(key, service_id, mode, backend_id, reason);
}

/// Counts `reason` for a packet of a new flow of `service` dropped after its backend
/// `backend_id` was chosen and before the flow was tracked (no SNAT source port was free), and
/// reports it, with that backend, when flow events are on.
#[inline(always)]
pub fn count_drop_after_choice(
    flow: &Flow,
    service: &ServiceInfo,
    backend_id: u32,
    reason: Counter,
) {
    count(reason);
    if enabled() {
        dropped_after_choice(flow, service, backend_id, reason);
    }
}

/// [`count_drop_after_choice`]'s report: the flow has no conntrack entry to name the backend.
#[inline(never)]
fn dropped_after_choice(flow: &Flow, service: &ServiceInfo, backend_id: u32, reason: Counter) {
    write_not_forwarded(&flow.key, service.id, service.mode, backend_id, reason);
}

/// Reports a packet of the flow `key` that did not go to its backend `backend_id`, for `reason`.
#[inline(always)]
fn write_not_forwarded(key: &FlowKey, service_id: u32, mode: u8, backend_id: u32, reason: Counter) {
    let Some(mut entry) = reserve(key, service_id, mode, kind::NOT_FORWARDED) else {
        return;
    };
    write_backend(&mut entry, key, backend_id);
    // SAFETY: `entry` is the reserved record, which `reserve` began to write.
    unsafe { (*entry.as_mut_ptr()).reason = reason as u8 };
    entry.submit(0);
}

/// Fills in the backend `backend_id` of the flow `key` (its `BACKENDS` entry: address, and the
/// port the packet goes to).
#[inline(always)]
fn write_backend(entry: &mut RingBufEntry<FlowEvent>, key: &FlowKey, backend_id: u32) {
    let backend = BACKENDS.get(backend_id);
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at the reserved record, which `reserve` began to write.
    unsafe {
        (*event).backend = backend.map_or(Addr([0; 4]), |b| b.addr);
        (*event).backend_id = backend_id;
        (*event).backend_port = backend.map_or(key.dst_port, |b| b.port_for(key.dst_port));
    }
}

/// Counts `reason` for a packet of `flow` to `service` dropped before it had a backend, and
/// reports it when flow events are on.
#[inline(always)]
pub fn count_drop(flow: &Flow, service: &ServiceInfo, reason: Counter) {
    count(reason);
    if enabled() {
        dropped(flow, service, reason);
    }
}

/// Reports a packet of `flow` to `service` dropped for `reason` before it had a backend.
#[inline(never)]
fn dropped(flow: &Flow, service: &ServiceInfo, reason: Counter) {
    let Some(mut entry) = reserve(&flow.key, service.id, service.mode, kind::DROP) else {
        return;
    };
    // SAFETY: as in `new_flow`.
    unsafe { (*entry.as_mut_ptr()).reason = reason as u8 };
    entry.submit(0);
}

/// A record of `kind` about the flow `key` to service `service_id` (in `mode`) reserved in
/// `FLOW_EVENTS`, every field written (the backend's and the choice or reason zero, for the caller
/// to fill in); `None`, counted `flow_events_lost`, when the ring buffer is full.
#[inline(always)]
fn reserve(key: &FlowKey, service_id: u32, mode: u8, kind: u8) -> Option<RingBufEntry<FlowEvent>> {
    let Some(mut entry) = FLOW_EVENTS.reserve::<FlowEvent>(0) else {
        count(Counter::FlowEventsLost);
        return None;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at the reserved record, written whole before it is submitted.
    unsafe {
        (*event).timestamp_ns = bpf_ktime_get_coarse_ns();
        (*event).flow = *key;
        (*event).backend = Addr([0; 4]);
        (*event).service_id = service_id;
        (*event).backend_id = 0;
        (*event).backend_port = 0;
        (*event).kind = kind;
        (*event).mode = mode;
        (*event).choice = 0;
        (*event).reason = 0;
        (*event)._pad = [0; 2];
    }
    Some(entry)
}
