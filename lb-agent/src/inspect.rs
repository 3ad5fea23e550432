//! What the pinned datapath holds, read straight from its maps (`lbctl`): the services, the tracked
//! flows with the backend each one uses, and the counters. It needs only the pin directory, not a
//! running agent, and never writes: it shows what the datapath decides with, as it is now.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::{
    conntrack::{state, ConntrackEntry, FlowKey, FlowKeyV4},
    counters::Counter,
    protocol,
    service::{mode, Addr, Backend, ServiceInfo, ServiceKey},
};

use crate::{datapath::sum_counters, pins::PinDir};

/// One `SERVICES` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRow {
    pub vip: IpAddr,
    /// 0: every port.
    pub port: u16,
    pub protocol: u8,
    pub info: ServiceInfo,
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
        let path = self.pins.map(name);
        let data = MapData::from_pin(&path).with_context(|| {
            format!("opening {} (is the datapath pinned there?)", path.display())
        })?;
        Ok(Map::from_map_data(data)?)
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
                        let port = if b.port == 0 { key.dst_port } else { b.port };
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

impl fmt::Display for ServiceRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vip = match self.vip {
            IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        let port = if self.port == 0 {
            "*".to_string()
        } else {
            self.port.to_string()
        };
        write!(
            f,
            "{:<28} {:<5} {:<9} id {:<5} table {}",
            format!("{vip}:{port}"),
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
