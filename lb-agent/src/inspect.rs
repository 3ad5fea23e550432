//! What the pinned datapath holds, read straight from its maps (`lbctl`): the services, the
//! backends with their state (active, drained, retired) and live flows, the tracked flows with the
//! backend each one uses, and the counters. It needs only the pin directory, not a
//! running agent, and never writes: it shows what the datapath decides with, as it is now.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context, Result};
use aya::maps::{Array, ArrayOfMaps, HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    conntrack::{state, ConntrackEntry, FlowKey, FlowKeyV4},
    counters::Counter,
    protocol,
    service::{mode, Addr, Backend, ServiceInfo, ServiceKey},
};

use crate::{datapath::sum_counters, map_batch, pins::PinDir, retired};

/// One `SERVICES` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRow {
    pub vip: IpAddr,
    /// 0: every port.
    pub port: u16,
    pub protocol: u8,
    pub info: ServiceInfo,
}

/// One `BACKENDS` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRow {
    pub id: u32,
    pub address: IpAddr,
    /// 0: the client's destination port is kept.
    pub port: u16,
    pub state: BackendState,
    /// Services whose live Maglev table names it: new flows reach it through them.
    pub services: usize,
    /// Live (not expired) tracked flows of programmed services that name it.
    pub flows: u64,
}

/// Why a backend is in `BACKENDS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    /// Some service's table names it.
    Active,
    /// Services name it, but no table does (weight 0 or failing its health check everywhere):
    /// only its tracked flows reach it.
    Drained,
    /// No service names it any more: kept only while its tracked flows live (the agent's
    /// `retired` module).
    Retired,
}

/// One tracked flow (`CONNTRACK_V4` or `CONNTRACK_V6`) and the backend its entry names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRow {
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub protocol: u8,
    /// `None`: the entry names a backend id no longer in `BACKENDS` (its next packet re-balances).
    pub backend: Option<SocketAddr>,
    pub closing: bool,
    /// Seconds since the flow's last packet.
    pub idle_s: u64,
}

/// The pinned datapath in `dir` (the agent's `--bpffs-dir`).
pub struct Pinned {
    pins: PinDir,
}

impl Pinned {
    pub fn new(dir: &std::path::Path) -> Self {
        Self {
            pins: PinDir::new(dir),
        }
    }

    fn map(&self, name: &str) -> Result<Map> {
        Ok(Map::from_map_data(self.map_data(name)?)?)
    }

    /// Every service, sorted by VIP, port and protocol.
    pub fn services(&self) -> Result<Vec<ServiceRow>> {
        let services: HashMap<MapData, ServiceKey, ServiceInfo> =
            HashMap::try_from(self.map("SERVICES")?)?;
        let mut rows = services
            .iter()
            .map(|entry| {
                let (key, info) = entry?;
                Ok(ServiceRow {
                    vip: key.addr.to_ip(key.family),
                    port: u16::from_be(key.port),
                    protocol: key.protocol,
                    info,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        rows.sort_by_key(|r| (r.vip, r.port, r.protocol));
        Ok(rows)
    }

    fn map_data(&self, name: &str) -> Result<MapData> {
        let path = self.pins.map(name);
        MapData::from_pin(&path)
            .with_context(|| format!("opening {} (is the datapath pinned there?)", path.display()))
    }

    /// Every backend, sorted by id: its state, how many services' tables name it and how many
    /// live tracked flows do.
    pub fn backends(&self) -> Result<Vec<BackendRow>> {
        let backends: Array<MapData, Backend> = Array::try_from(self.map("BACKENDS")?)?;
        let tables: ArrayOfMaps<MapData, Array<MapData, u32>> =
            ArrayOfMaps::try_from(self.map("MAGLEV_TABLES")?)?;
        let services = self.services()?;
        let mut in_tables: StdHashMap<u32, usize> = StdHashMap::new();
        for service in services.iter().filter(|s| s.info.table_size > 0) {
            let table = tables
                .get(&service.info.table_slot, 0)
                .with_context(|| format!("reading Maglev table {}", service.info.table_slot))?;
            let named: HashSet<u32> = map_batch::read_array(&table)
                .context("reading a Maglev table")?
                .into_iter()
                .collect();
            for id in named {
                *in_tables.entry(id).or_default() += 1;
            }
        }
        let service_ids = services.iter().map(|s| s.info.id).collect();
        let flows = retired::live_flows_per_backend(
            &self.map_data("CONNTRACK_V4")?,
            &self.map_data("CONNTRACK_V6")?,
            &service_ids,
        )?;
        Ok(map_batch::read_array(&backends)
            .context("reading BACKENDS")?
            .into_iter()
            .enumerate()
            .filter(|(_, backend)| backend.family != 0)
            .map(|(id, backend)| {
                let id = id as u32;
                let services = in_tables.get(&id).copied().unwrap_or(0);
                let state = if backend.is_retired() {
                    BackendState::Retired
                } else if services > 0 {
                    BackendState::Active
                } else {
                    BackendState::Drained
                };
                BackendRow {
                    id,
                    address: backend.ip(),
                    port: backend.port_host(),
                    state,
                    services,
                    flows: flows.get(&id).copied().unwrap_or(0),
                }
            })
            .collect())
    }

    /// Every tracked flow of both families (at most `limit`), sorted by VIP and client.
    pub fn flows(&self, limit: usize) -> Result<Vec<FlowRow>> {
        let backends: Array<MapData, Backend> = Array::try_from(self.map("BACKENDS")?)?;
        let v4: HashMap<MapData, FlowKeyV4, ConntrackEntry> =
            HashMap::try_from(self.map("CONNTRACK_V4")?)?;
        let v6: HashMap<MapData, FlowKey, ConntrackEntry> =
            HashMap::try_from(self.map("CONNTRACK_V6")?)?;
        let now = monotonic_coarse_ns();
        let mut entries = Vec::new();
        for entry in v4.iter().take(limit) {
            let (key, value) = entry?;
            entries.push((FlowKey::from(key), value));
        }
        for entry in v6.iter().take(limit.saturating_sub(entries.len())) {
            entries.push(entry?);
        }
        let mut rows = entries
            .into_iter()
            .map(|(key, entry)| {
                let backend = backends
                    .get(&entry.backend_id, 0)
                    .ok()
                    .filter(|b| b.family != 0)
                    .map(|b| {
                        // Port 0: the client's destination port is kept.
                        let port = b.port_for(key.dst_port);
                        SocketAddr::new(b.addr.to_ip(b.family), u16::from_be(port))
                    });
                FlowRow {
                    client: socket(&key.src, key.family, key.src_port),
                    vip: socket(&key.dst, key.family, key.dst_port),
                    protocol: key.protocol,
                    backend,
                    closing: entry.state == state::CLOSING,
                    idle_s: now.saturating_sub(entry.last_seen_ns) / 1_000_000_000,
                }
            })
            .collect::<Vec<_>>();
        rows.sort_by_key(|r| (r.vip, r.client));
        Ok(rows)
    }

    /// Every counter with its sum over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        let counters: PerCpuArray<MapData, u64> = PerCpuArray::try_from(self.map("COUNTERS")?)?;
        sum_counters(&counters)
    }
}

fn socket(addr: &Addr, family: u8, port_be: u16) -> SocketAddr {
    SocketAddr::new(addr.to_ip(family), u16::from_be(port_be))
}

/// The clock conntrack entries are stamped with (`bpf_ktime_get_coarse_ns`: CLOCK_MONOTONIC,
/// coarse).
pub(crate) fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; CLOCK_MONOTONIC_COARSE always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `tcp`, `udp` or the protocol number.
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        protocol::TCP => "tcp".into(),
        protocol::UDP => "udp".into(),
        other => other.to_string(),
    }
}

/// The forwarding mode's name, as in the config.
pub fn mode_name(value: u8) -> &'static str {
    match value {
        mode::DNAT => "dnat",
        mode::SNAT => "snat",
        mode::DSR_L2 => "dsr-l2",
        mode::DSR_IPIP => "dsr-ipip",
        _ => "unknown",
    }
}

/// `address:port`, `[address]:port` for IPv6, `*` for port 0 (every port, or the client's).
fn endpoint(address: IpAddr, port: u16) -> String {
    let address = match address {
        IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    };
    if port == 0 {
        format!("{address}:*")
    } else {
        format!("{address}:{port}")
    }
}

impl BackendState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Drained => "drained",
            Self::Retired => "retired",
        }
    }
}

impl fmt::Display for BackendRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<28} id {:<6} {:<8} services {:<4} flows {}",
            endpoint(self.address, self.port),
            self.id,
            self.state.name(),
            self.services,
            self.flows
        )
    }
}

impl fmt::Display for ServiceRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<28} {:<5} {:<9} id {:<5} table {}",
            endpoint(self.vip, self.port),
            protocol_name(self.protocol),
            mode_name(self.info.mode),
            self.info.id,
            self.info.table_size
        )
    }
}

impl fmt::Display for FlowRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backend = self
            .backend
            .map_or_else(|| "(backend removed)".to_string(), |b| b.to_string());
        write!(
            f,
            "{:<5} {:<28} -> {:<28} via {:<28} {:<7} idle {}s",
            protocol_name(self.protocol),
            self.client.to_string(),
            self.vip.to_string(),
            backend,
            if self.closing { "closing" } else { "open" },
            self.idle_s
        )
    }
}
