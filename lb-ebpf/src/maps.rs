//! Every map of the datapath. Names are the names the agent and `lbctl` use; sizes come from
//! `lb_common::service::limits` (conntrack sizes can be changed by the agent at load time).

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_F_INNER_MAP},
    btf_maps::{Array as BtfArray, ArrayOfMaps},
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    conntrack::{BackendReply, ConntrackEntry, FlowKey, FlowKeyV4, NatReply},
    counters::Counter,
    modes::{
        decap::{self, EndpointKey},
        ModeInfo,
    },
    service::{limits, Backend, ServiceInfo, ServiceKey, ServiceSlot, TrafficStats},
};

/// The address prefilter (`lb_common::prefilter`): what an address may be (VIP, backend), by slot,
/// checked before the hash lookups so that other traffic leaves after two word reads.
///
/// A global, not a map: the program addresses a global directly (one instruction), where an array
/// lookup costs about a dozen on every packet. Its data section of its own becomes a one-entry
/// array map named after the section, `.data.address_filter`, which the agent writes whole and pins
/// by hand as `ADDRESS_FILTER` (aya recreates data sections zeroed at every load; see
/// `lb-agent/src/prefilter.rs`). `no_mangle` keeps it external, so the compiler never assumes the
/// zeros it starts with.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".data.address_filter")]
pub static mut ADDRESS_FILTER: lb_common::prefilter::Words =
    [0; lb_common::prefilter::WORDS as usize];

/// VIP, port, protocol → service. Port 0 entries match every port of their VIP.
#[map(name = "SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceInfo> =
    HashMap::with_max_entries(limits::DEFAULT_SERVICES, 0);

/// Service id → its `SERVICES` key and value (`ServiceSlot`), for tracked flows: written by the
/// agent with every `SERVICES` change, zeroed when the service goes.
#[map(name = "SERVICE_SLOTS")]
pub static SERVICE_SLOTS: Array<ServiceSlot> = Array::with_max_entries(limits::DEFAULT_SERVICES, 0);

/// Backend id → backend. Array: the lookup is a bounds check and an offset.
#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(limits::DEFAULT_BACKENDS, 0);

/// Maglev lookup tables (slot → backend id), one inner array per table. Userspace fills a new table
/// in the service's spare slot and then flips `ServiceInfo::table_slot`, so a packet never sees a
/// half-written table. Inner arrays may have any size (BPF_F_INNER_MAP).
#[btf_map]
pub static MAGLEV_TABLES: ArrayOfMaps<
    BtfArray<u32, 1, { BPF_F_INNER_MAP as usize }>,
    { limits::MAGLEV_TABLE_SLOTS as usize },
> = ArrayOfMaps::new();

/// Client → VIP IPv4 flow → its backend. Read and written through `conntrack::lookup` and
/// `conntrack::track`, which pick the family's map.
#[map(name = "CONNTRACK_V4")]
pub static CONNTRACK_V4: LruHashMap<FlowKeyV4, ConntrackEntry> =
    LruHashMap::with_max_entries(limits::DEFAULT_CONNTRACK_ENTRIES, 0);

/// Client → VIP IPv6 flow → its backend (see [`CONNTRACK_V4`]).
#[map(name = "CONNTRACK_V6")]
pub static CONNTRACK_V6: LruHashMap<FlowKey, ConntrackEntry> =
    LruHashMap::with_max_entries(limits::DEFAULT_CONNTRACK_ENTRIES, 0);

/// Backend → client flow of a DNAT connection to a backend marked `SHARED_REPLIES` → the VIP and
/// port its replies come from; SNAT flows' replies (see `snat`).
#[map(name = "NAT_REPLY")]
pub static NAT_REPLY: LruHashMap<FlowKey, NatReply> =
    LruHashMap::with_max_entries(limits::DEFAULT_CONNTRACK_ENTRIES, 0);

/// Backend address, port, protocol → the frontend its DNAT replies come from, for backends that
/// serve one (`lb_common::conntrack::BackendReply`): their flows need no `NAT_REPLY` entry.
#[map(name = "BACKEND_REPLY")]
pub static BACKEND_REPLY: HashMap<ServiceKey, BackendReply> =
    HashMap::with_max_entries(limits::DEFAULT_BACKENDS, 0);

/// Service id → what SNAT and DSR-IPIP need beyond `ServiceInfo` (source address, port range).
/// Written by the agent before the service's `SERVICES` entry; read only by those modes.
#[map(name = "SERVICE_MODES")]
pub static SERVICE_MODES: Array<ModeInfo> = Array::with_max_entries(limits::DEFAULT_SERVICES, 0);

/// `lb_decap` (backends): the balancers it accepts encapsulated packets from and the local
/// addresses it decapsulates for; an all-zero address is the wildcard of its family and role.
#[map(name = "DECAP_ENDPOINTS")]
pub static DECAP_ENDPOINTS: HashMap<EndpointKey, u8> =
    HashMap::with_max_entries(decap::MAX_ENDPOINTS, 0);

/// Per-CPU scratch space of the SNAT, DSR and reply paths: structures too big for the 512-byte BPF stack,
/// which the main path mostly uses already. One entry; a program run never changes CPU.
#[map(name = "MODE_SCRATCH")]
pub static MODE_SCRATCH: PerCpuArray<ModeScratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub struct ModeScratch {
    /// `bpf_fib_lookup` parameters and results (xmit.rs).
    pub fib: bpf_fib_lookup,
    /// SNAT port allocation (snat.rs): the reply key being claimed, its value, and the conntrack
    /// key of a taken port's owner.
    pub reply_key: FlowKey,
    pub reply: NatReply,
    pub owner: FlowKey,
    /// The conntrack key of a reply's flow (reply.rs).
    pub flow: FlowKey,
    /// A `CONNTRACK_V4` key: of a reply's flow (reply.rs) or of a new flow (conntrack.rs), built
    /// here for lack of stack (see `conntrack::lookup_via`).
    pub flow_v4: FlowKeyV4,
    /// The `FRAGMENTS` key and entry of a first fragment being recorded (fragments.rs): each
    /// mode's BPF function records, one frame deeper than the entry point.
    pub fragment_key: lb_common::fragments::FragmentKey,
    pub fragment: lb_common::fragments::FragmentEntry,
    /// The flow an ICMP error's quote names (icmp.rs).
    pub quote: FlowKey,
    /// How an ICMP error translated for a SNAT or DSR flow leaves (icmp.rs), as `FRAGMENTS`
    /// records it for a datagram's later fragments.
    pub departure: lb_common::fragments::FragmentEntry,
    /// What the FIB said about a SNAT request before its translation (`xmit::keep_route`), read
    /// after it: in a register, the verifier would follow each answer through the translation.
    pub route: u32,
}

/// This CPU's scratch space.
#[inline(always)]
pub fn scratch() -> Option<&'static mut ModeScratch> {
    // SAFETY: per-CPU slot, only this program run on this CPU uses it.
    MODE_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Flow events (`crate::flow_events`): new flows' backend choices and drops, for the agent. Written
/// only when flow events are enabled at load time.
#[map(name = "FLOW_EVENTS")]
pub static FLOW_EVENTS: RingBuf =
    RingBuf::with_byte_size(lb_common::flow_events::limits::RING_BYTES, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::SLOTS, 0);

#[map(name = "SERVICE_STATS")]
pub static SERVICE_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::with_max_entries(limits::DEFAULT_SERVICES, 0);

#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::with_max_entries(limits::DEFAULT_BACKENDS, 0);

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

/// First fragment of a balanced datagram (as it arrived) → how it left (mode and addresses), for
/// the datagram's later fragments, which carry no ports (`fragments.rs`).
#[map(name = "FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<
    lb_common::fragments::FragmentKey,
    lb_common::fragments::FragmentEntry,
> = LruHashMap::with_max_entries(lb_common::fragments::limits::MAX_TRACKED_DATAGRAMS, 0);
