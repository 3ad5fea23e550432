//! The policy datapath's maps; names, keys and sizes are documented in `lb_common::policy`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    conntrack::FlowKey,
    fragments::FragmentKey,
    policy::{
        limits, state_limits, CachedDecision, DecisionKey, EndpointInfo, IpKeyV4, IpKeyV6,
        IpcacheEntry, PolicyConntrackEntry, PolicyEntry, PolicyFragmentEntry, PolicyKey,
        PolicyState, COUNTER_ARRAY_LEN,
    },
};

#[map(name = "POLICY_STATE")]
pub static POLICY_STATE: Array<PolicyState> = Array::with_max_entries(1, 0);

#[map(name = "IPCACHE_V4")]
pub static IPCACHE_V4: LpmTrie<IpKeyV4, IpcacheEntry> =
    LpmTrie::with_max_entries(limits::IPCACHE_MAP_ENTRIES, 0);

#[map(name = "IPCACHE_V6")]
pub static IPCACHE_V6: LpmTrie<IpKeyV6, IpcacheEntry> =
    LpmTrie::with_max_entries(limits::IPCACHE_MAP_ENTRIES, 0);

#[map(name = "ENDPOINTS_V4")]
pub static ENDPOINTS_V4: HashMap<IpKeyV4, EndpointInfo> =
    HashMap::with_max_entries(limits::ENDPOINT_MAP_ENTRIES, 0);

#[map(name = "ENDPOINTS_V6")]
pub static ENDPOINTS_V6: HashMap<IpKeyV6, EndpointInfo> =
    HashMap::with_max_entries(limits::ENDPOINT_MAP_ENTRIES, 0);

#[map(name = "POLICY")]
pub static POLICY: LpmTrie<PolicyKey, PolicyEntry> =
    LpmTrie::with_max_entries(limits::POLICY_MAP_ENTRIES, 0);

#[map(name = "POLICY_DECISIONS")]
pub static POLICY_DECISIONS: LruHashMap<DecisionKey, CachedDecision> =
    LruHashMap::with_max_entries(state_limits::DECISION_ENTRIES, 0);

#[map(name = "POLICY_EVENTS")]
pub static POLICY_EVENTS: RingBuf = RingBuf::with_byte_size(limits::EVENT_RING_BYTES, 0);

#[map(name = "POLICY_COUNTERS")]
pub static POLICY_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_ARRAY_LEN, 0);

#[map(name = "POLICY_CONNTRACK")]
pub static POLICY_CONNTRACK: LruHashMap<FlowKey, PolicyConntrackEntry> =
    LruHashMap::with_max_entries(state_limits::CONNTRACK_ENTRIES, 0);

#[map(name = "POLICY_FRAGMENTS")]
pub static POLICY_FRAGMENTS: LruHashMap<FragmentKey, PolicyFragmentEntry> =
    LruHashMap::with_max_entries(state_limits::FRAGMENT_ENTRIES, 0);

/// XDP CIDR deny list: source prefixes (epoch byte always 0) → index in the agent's list.
#[map(name = "CIDR_DENY_V4")]
pub static CIDR_DENY_V4: LpmTrie<IpKeyV4, u32> =
    LpmTrie::with_max_entries(state_limits::CIDR_DENY_ENTRIES, 0);

#[map(name = "CIDR_DENY_V6")]
pub static CIDR_DENY_V6: LpmTrie<IpKeyV6, u32> =
    LpmTrie::with_max_entries(state_limits::CIDR_DENY_ENTRIES, 0);
