//! The maps userspace fills (services, backends, reverse NAT) and the counters it reads.
//! Their names are the names the agent and `lbctl` use.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use lb_common::{
    counters::Counter,
    service::{limits, Backend, BackendSlotKey, ReverseNatKey, ServiceInfo, ServiceKey},
};

#[map(name = "SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceInfo> =
    HashMap::with_max_entries(limits::MAX_SERVICES, 0);

#[map(name = "BACKENDS")]
pub static BACKENDS: HashMap<BackendSlotKey, Backend> =
    HashMap::with_max_entries(limits::MAX_BACKEND_SLOTS, 0);

#[map(name = "REVERSE_NAT")]
pub static REVERSE_NAT: HashMap<ReverseNatKey, ServiceKey> =
    HashMap::with_max_entries(limits::MAX_BACKEND_SLOTS, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Adds one to this CPU's slot for `counter`.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *slot += 1 };
    }
}
