//! Every map of the datapath. Names are the names the agent and `lbctl` use; sizes come from
//! `lb_common::service::limits` (conntrack sizes can be changed by the agent at load time).

use aya_ebpf::{
    bindings::BPF_F_INNER_MAP,
    btf_maps::{Array as BtfArray, ArrayOfMaps},
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    conntrack::{ConntrackEntry, FlowKey, NatReply},
    counters::Counter,
    service::{limits, Backend, ServiceInfo, ServiceKey, TrafficStats},
};

/// VIP, port, protocol → service. Port 0 entries match every port of their VIP.
#[map(name = "SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceInfo> =
    HashMap::with_max_entries(limits::MAX_SERVICES, 0);

/// Backend id → backend. Array: the lookup is a bounds check and an offset.
#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(limits::MAX_BACKENDS, 0);

/// Maglev lookup tables (slot → backend id), one inner array per table. Userspace fills a new table
/// in the service's spare slot and then flips `ServiceInfo::table_slot`, so a packet never sees a
/// half-written table. Inner arrays may have any size (BPF_F_INNER_MAP).
#[btf_map]
pub static MAGLEV_TABLES: ArrayOfMaps<
    BtfArray<u32, 1, { BPF_F_INNER_MAP as usize }>,
    { limits::MAGLEV_TABLE_SLOTS as usize },
> = ArrayOfMaps::new();

/// Client → VIP flow → its backend.
#[map(name = "CONNTRACK")]
pub static CONNTRACK: LruHashMap<FlowKey, ConntrackEntry> =
    LruHashMap::with_max_entries(limits::DEFAULT_CONNTRACK_ENTRIES, 0);

/// Backend → client flow of a DNAT connection → the VIP and port its replies come from.
#[map(name = "NAT_REPLY")]
pub static NAT_REPLY: LruHashMap<FlowKey, NatReply> =
    LruHashMap::with_max_entries(limits::DEFAULT_CONNTRACK_ENTRIES, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map(name = "SERVICE_STATS")]
pub static SERVICE_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::with_max_entries(limits::MAX_SERVICES, 0);

#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::with_max_entries(limits::MAX_BACKENDS, 0);

/// Adds one to this CPU's slot for `counter`.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *slot += 1 };
    }
}

/// Adds a packet of `bytes` (and maybe a new flow) to a per-CPU traffic slot.
#[inline(always)]
pub fn add_traffic(stats: &PerCpuArray<TrafficStats>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(slot) = stats.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += bytes;
            (*slot).new_flows += new_flow as u64;
        }
    }
}
