//! Backends no service names any more whose tracked flows still live. Removing a backend from a
//! service stops new flows to it at once (no table names it), but its connections keep their
//! backend while they live, as when it is drained: its `BACKENDS` entry, reply route and address
//! filter role stay until no live conntrack entry of a service still programmed names it
//! (`Datapath::release_retired_backends`, which the agent runs about every 10 s). A backend nothing tracks is removed at once, as before.
//! Its `BACKENDS` entry is flagged `RETIRED` meanwhile, so that `lbctl backends` (which reads the
//! pinned maps) shows it with its live flows, and the agent reports it in gRPC `ListState`.
//! Re-added while retired, a backend keeps its id; at `--max-backends`, retired backends make
//! room for new ones (their flows then re-balance).

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use aya::{maps::MapData, Ebpf};
use lb_common::{
    conntrack::{ConntrackEntry, FlowKey, FlowKeyV4},
    protocol,
};

use crate::{applied::BackendAddress, inspect, map_batch};

/// A retired backend: its address and the address filter roles it keeps (`role::BACKEND`: its
/// flows' replies may still need translating).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retired {
    pub address: BackendAddress,
    pub roles: u8,
}

/// Ids of the backends that live (not expired) conntrack entries of either family name, counting
/// only flows of the `services` (ids) still programmed: a removed service's flows no longer reach
/// their backend (its VIP passes to the stack), so they keep nothing.
pub(crate) fn live_backend_ids(ebpf: &Ebpf, services: &HashSet<u32>) -> Result<HashSet<u32>> {
    let flows = live_flows_per_backend(
        map_batch::map_data(ebpf, "CONNTRACK_V4")?,
        map_batch::map_data(ebpf, "CONNTRACK_V6")?,
        services,
    )?;
    Ok(flows.into_keys().collect())
}

/// Per backend id: how many live flows of the `services` (ids) the conntrack maps `v4` and `v6`
/// name, as [`live_backend_ids`] counts them (also for `lbctl backends`).
pub(crate) fn live_flows_per_backend(
    v4: &MapData,
    v6: &MapData,
    services: &HashSet<u32>,
) -> Result<HashMap<u32, u64>> {
    let now = inspect::monotonic_coarse_ns();
    let v4: Vec<(FlowKeyV4, ConntrackEntry)> =
        map_batch::read_hash(v4).context("reading CONNTRACK_V4")?;
    let v6: Vec<(FlowKey, ConntrackEntry)> =
        map_batch::read_hash(v6).context("reading CONNTRACK_V6")?;
    let live = |protocol: u8, entry: &ConntrackEntry| {
        (!entry.expired(now, protocol == protocol::TCP) && services.contains(&entry.service_id))
            .then_some(entry.backend_id)
    };
    let mut flows = HashMap::new();
    for id in v4
        .iter()
        .filter_map(|(key, entry)| live(key.protocol, entry))
        .chain(
            v6.iter()
                .filter_map(|(key, entry)| live(key.protocol, entry)),
        )
    {
        *flows.entry(id).or_default() += 1;
    }
    Ok(flows)
}
