//! Loads the embedded eBPF datapath, attaches it to interfaces, and reconciles its maps with the
//! desired configuration: backends, weighted Maglev tables (swapped atomically) and services.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, VecDeque},
    net::IpAddr,
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, ArrayOfMaps, HashMap, MapData, PerCpuArray},
    programs::{xdp::XdpLinkId, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::{
    conntrack::{ConntrackEntry, FlowKey, NatReply},
    counters::Counter,
    modes::ModeInfo,
    service::{limits, mode, service_flags, Addr, Backend, ServiceInfo, ServiceKey, TrafficStats},
};
use tracing::{debug, info, warn};

use crate::{
    config::{Config, ForwardingMode, HashFields, Service},
    maglev::{self, MaglevBackend},
};

/// The datapath object built from `lb-ebpf` by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Name of the balancing XDP program in the object.
pub const XDP_PROGRAM: &str = "lb_xdp";
/// A program that only returns XDP_PASS, the baseline of per-packet benchmarks.
pub const XDP_PASS_PROGRAM: &str = "xdp_pass";

/// `BPF_F_INNER_MAP`: inner maps of `MAGLEV_TABLES` may have any number of entries.
const BPF_F_INNER_MAP: u32 = 1 << 12;

/// Load-time settings.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Entries of the `CONNTRACK` and `NAT_REPLY` LRU maps.
    pub conntrack_entries: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conntrack_entries: limits::DEFAULT_CONNTRACK_ENTRIES,
        }
    }
}

/// What the agent wrote for one service, so the next reconcile writes only differences.
#[derive(Debug, Clone)]
struct ProgrammedService {
    info: ServiceInfo,
    /// Backend ids of the live Maglev table (empty when `info.table_size` is 0).
    table: Vec<u32>,
    /// The service's `SERVICE_MODES` entry (all zero for DNAT and DSR L2).
    mode: ModeInfo,
}

/// What one `apply` changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub services_written: usize,
    pub services_removed: usize,
    pub tables_swapped: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
}

/// A loaded datapath. Dropping it detaches the program from every interface and frees the maps.
pub struct Datapath {
    ebpf: Ebpf,
    attached: Vec<(String, XdpLinkId)>,
    services: BTreeMap<ServiceKey, ProgrammedService>,
    backend_ids: StdHashMap<(IpAddr, u16), u32>,
    backends: StdHashMap<u32, Backend>,
    /// Freed backend ids, reused oldest first so conntrack entries naming a removed backend are
    /// long gone before its id means another backend.
    free_backend_ids: VecDeque<u32>,
    next_backend_id: u32,
    neighbours: Neighbours,
}

impl Datapath {
    /// Loads the object and the XDP program into the kernel (the verifier runs here).
    pub fn load() -> Result<Self> {
        Self::load_with(&LoadOptions::default())
    }

    pub fn load_with(options: &LoadOptions) -> Result<Self> {
        Self::load_with_cidr_deny(options, false)
    }

    /// `cidr_deny`: enables `lb_xdp`'s CIDR deny list (`policy::datapath::write_cidr_deny`); without
    /// it the verifier removes the check from the program.
    pub fn load_with_cidr_deny(options: &LoadOptions, cidr_deny: bool) -> Result<Self> {
        let cidr_deny = cidr_deny as u32;
        let mut ebpf = EbpfLoader::new()
            .override_global(
                crate::policy::datapath::XDP_CIDR_DENY_GLOBAL,
                &cidr_deny,
                true,
            )
            .map_max_entries("CONNTRACK", options.conntrack_entries)
            .map_max_entries("NAT_REPLY", options.conntrack_entries)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .context("XDP program missing from the object")?
            .try_into()?;
        program
            .load()
            .context("loading the XDP program (verifier)")?;
        Ok(Self {
            ebpf,
            attached: Vec::new(),
            services: BTreeMap::new(),
            backend_ids: StdHashMap::new(),
            backends: StdHashMap::new(),
            free_backend_ids: VecDeque::new(),
            // Id 0 is never used: a zeroed BACKENDS slot means "no backend".
            next_backend_id: 1,
            neighbours: Neighbours::default(),
        })
    }

    /// The balancing XDP program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn xdp_program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(XDP_PROGRAM)
            .expect("checked in load")
            .try_into()
            .expect("checked in load")
    }

    /// The loaded object, for the policy maps `lb_xdp` reads (`policy::datapath::write_cidr_deny`).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The XDP_PASS baseline program, loaded on first use.
    pub fn xdp_pass_program(&mut self) -> Result<&mut Xdp> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(XDP_PASS_PROGRAM)
            .context("xdp_pass missing from the object")?
            .try_into()?;
        if program.fd().is_err() {
            program.load()?;
        }
        Ok(program)
    }

    /// Attaches to `interface` (in the calling thread's network namespace): native (driver) mode
    /// where the driver supports it, generic (skb) mode otherwise.
    pub fn attach(&mut self, interface: &str) -> Result<()> {
        let program = self.xdp_program();
        let link = match program.attach(interface, XdpMode::Driver) {
            Ok(link) => {
                info!(interface, mode = "driver", "XDP attached");
                link
            }
            Err(err) => {
                warn!(interface, error = %err, "native XDP unavailable, using generic (skb) mode");
                let link = program
                    .attach(interface, XdpMode::Skb)
                    .with_context(|| format!("attaching XDP to {interface}"))?;
                info!(interface, mode = "skb", "XDP attached");
                link
            }
        };
        self.attached.push((interface.to_string(), link));
        Ok(())
    }

    /// Detaches from every interface (also done on drop).
    pub fn detach_all(&mut self) {
        for (interface, link) in std::mem::take(&mut self.attached) {
            match self.xdp_program().detach(link) {
                Ok(()) => info!(interface, "XDP detached"),
                Err(err) => warn!(interface, error = %err, "XDP detach failed"),
            }
        }
    }

    /// Makes the maps match `config` with configured weights (see [`Datapath::apply_with`]).
    pub fn apply(&mut self, config: &Config) -> Result<ApplyReport> {
        self.apply_with(config, |_, backend| backend.weight)
    }

    /// Makes the maps match `config`, writing only what differs. `weight_of` gives each backend's
    /// effective weight (0 takes it out of new-flow selection, e.g. when a health check fails).
    ///
    /// Order matters for packets in flight: backends are written before the tables that name them,
    /// a table is complete before the service flips to it, and backends are removed only once no
    /// table names them. Conntrack is never flushed: tracked flows keep their backend while it exists.
    pub fn apply_with(
        &mut self,
        config: &Config,
        weight_of: impl Fn(&Service, &crate::config::BackendConfig) -> u32,
    ) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();

        // 1. Backend ids and BACKENDS entries for every backend of the desired state.
        let mut wanted_backends: StdHashMap<u32, Backend> = StdHashMap::new();
        for service in &config.services {
            for b in &service.backends {
                let id = self.backend_id_for(b.address, b.port)?;
                wanted_backends.insert(id, Backend::new(b.address, b.port));
            }
        }
        {
            let mut backends: Array<&mut MapData, Backend> =
                Array::try_from(self.ebpf.map_mut("BACKENDS").context("BACKENDS map")?)?;
            for (id, backend) in &wanted_backends {
                if self.backends.get(id) != Some(backend) {
                    backends.set(*id, backend, 0).context("writing BACKENDS")?;
                    self.backends.insert(*id, *backend);
                    report.backends_written += 1;
                }
            }
        }

        // 2. Maglev tables and services.
        let mut wanted_keys = Vec::with_capacity(config.services.len());
        for service in &config.services {
            let key = ServiceKey::new(service.vip, service.port, service.protocol.number());
            wanted_keys.push(key);
            let backend_ids: Vec<u32> = service
                .backends
                .iter()
                .map(|b| self.backend_ids[&(b.address, b.port)])
                .collect();
            let maglev_backends: Vec<MaglevBackend> = service
                .backends
                .iter()
                .map(|b| MaglevBackend {
                    id: maglev::backend_id(b.address, b.port),
                    weight: weight_of(service, b),
                })
                .collect();
            let owners = maglev::build_table(
                &maglev_backends,
                service.maglev_table_size,
                config.maglev_seed,
            )
            .with_context(|| format!("service {}: Maglev table", service.name))?;
            let table: Vec<u32> = owners.iter().map(|&i| backend_ids[i as usize]).collect();

            let id = match self.services.get(&key) {
                Some(p) => p.info.id,
                None => self.free_service_id()?,
            };
            let previous = self.services.get(&key).cloned();
            let mut info = ServiceInfo {
                id,
                table_slot: previous.as_ref().map_or(2 * id, |p| p.info.table_slot),
                table_size: table.len() as u32,
                mode: mode_of(service.mode),
                flags: flags_of(service.hash),
                _pad: [0; 2],
            };
            let table_changed = previous.as_ref().is_none_or(|p| p.table != table);
            if table_changed && !table.is_empty() {
                // Fill the spare slot, then flip to it below.
                let spare = if previous.is_some() && info.table_slot == 2 * id {
                    2 * id + 1
                } else {
                    2 * id
                };
                self.install_table(spare, &table)?;
                info.table_slot = spare;
                report.tables_swapped += 1;
            }
            // The mode's parameters are in place before the service entry that names the mode.
            let mode = mode_info_of(config, service);
            if previous.as_ref().map(|p| p.mode) != Some(mode) {
                let mut modes: Array<&mut MapData, ModeInfo> = Array::try_from(
                    self.ebpf
                        .map_mut("SERVICE_MODES")
                        .context("SERVICE_MODES map")?,
                )?;
                modes.set(id, mode, 0).context("writing SERVICE_MODES")?;
            }
            if service.mode != ForwardingMode::Dnat {
                for backend in &service.backends {
                    self.neighbours.warm(backend.address);
                }
            }
            if previous.as_ref().map(|p| p.info) != Some(info) {
                let mut services: HashMap<&mut MapData, ServiceKey, ServiceInfo> =
                    HashMap::try_from(self.ebpf.map_mut("SERVICES").context("SERVICES map")?)?;
                services.insert(key, info, 0).with_context(|| {
                    format!(
                        "writing SERVICES for {} (map full? {} services max)",
                        service.name,
                        limits::MAX_SERVICES
                    )
                })?;
                report.services_written += 1;
                debug!(service = %service.name, vip = %service.vip, port = service.port,
                       slots = info.table_size, "service programmed");
            }
            self.services
                .insert(key, ProgrammedService { info, table, mode });
        }

        // 3. Services no longer wanted.
        let stale: Vec<ServiceKey> = self
            .services
            .keys()
            .filter(|k| !wanted_keys.contains(k))
            .copied()
            .collect();
        if !stale.is_empty() {
            let mut services: HashMap<&mut MapData, ServiceKey, ServiceInfo> =
                HashMap::try_from(self.ebpf.map_mut("SERVICES").context("SERVICES map")?)?;
            for key in stale {
                services.remove(&key).context("removing from SERVICES")?;
                self.services.remove(&key);
                report.services_removed += 1;
                info!(vip = %key.vip(), port = key.port_host(), "service removed");
            }
        }

        // 4. Backends no service names any more: zeroed, so conntrack entries re-balance.
        let unused: Vec<u32> = self
            .backends
            .keys()
            .filter(|id| !wanted_backends.contains_key(id))
            .copied()
            .collect();
        if !unused.is_empty() {
            let mut backends: Array<&mut MapData, Backend> =
                Array::try_from(self.ebpf.map_mut("BACKENDS").context("BACKENDS map")?)?;
            for id in unused {
                backends
                    .set(id, Backend::default(), 0)
                    .context("clearing BACKENDS")?;
                let removed = self.backends.remove(&id).expect("listed above");
                self.backend_ids
                    .remove(&(removed.ip(), removed.port_host()));
                self.free_backend_ids.push_back(id);
                report.backends_removed += 1;
            }
        }
        Ok(report)
    }

    fn backend_id_for(&mut self, address: IpAddr, port: u16) -> Result<u32> {
        if let Some(id) = self.backend_ids.get(&(address, port)) {
            return Ok(*id);
        }
        let id = match self.free_backend_ids.pop_front() {
            Some(id) => id,
            None if self.next_backend_id < limits::MAX_BACKENDS => {
                self.next_backend_id += 1;
                self.next_backend_id - 1
            }
            None => bail!(
                "more than {} backends in total: BACKENDS is full",
                limits::MAX_BACKENDS - 1
            ),
        };
        self.backend_ids.insert((address, port), id);
        Ok(id)
    }

    fn free_service_id(&self) -> Result<u32> {
        let used: std::collections::BTreeSet<u32> =
            self.services.values().map(|p| p.info.id).collect();
        (0..limits::MAX_SERVICES)
            .find(|id| !used.contains(id))
            .with_context(|| format!("more than {} services", limits::MAX_SERVICES))
    }

    /// Creates a complete inner table and puts it in `MAGLEV_TABLES[slot]`.
    fn install_table(&mut self, slot: u32, table: &[u32]) -> Result<()> {
        let mut inner: Array<MapData, u32> = Array::create(table.len() as u32, BPF_F_INNER_MAP)
            .context("creating a Maglev table map")?;
        for (i, backend_id) in table.iter().enumerate() {
            inner
                .set(i as u32, backend_id, 0)
                .context("filling a Maglev table")?;
        }
        let mut tables: ArrayOfMaps<&mut MapData, Array<MapData, u32>> = ArrayOfMaps::try_from(
            self.ebpf
                .map_mut("MAGLEV_TABLES")
                .context("MAGLEV_TABLES map")?,
        )?;
        tables
            .set(slot, &inner, 0)
            .context("installing a Maglev table")?;
        Ok(())
    }

    /// The live Maglev table of a service, as backend addresses (for tests and `lbctl`).
    pub fn table_of(&self, key: &ServiceKey) -> Option<Vec<(IpAddr, u16)>> {
        let programmed = self.services.get(key)?;
        Some(
            programmed
                .table
                .iter()
                .map(|id| {
                    let b = self.backends[id];
                    (b.ip(), b.port_host())
                })
                .collect(),
        )
    }

    /// Forgets one tracked flow (client → VIP) and its reply translation, if present; the flow's
    /// next packet is balanced as new. Returns whether an entry existed.
    pub fn forget_flow(&mut self, flow: &FlowKey, reply: &FlowKey) -> Result<bool> {
        let mut conntrack: HashMap<&mut MapData, FlowKey, ConntrackEntry> =
            HashMap::try_from(self.ebpf.map_mut("CONNTRACK").context("CONNTRACK map")?)?;
        let existed = conntrack.remove(flow).is_ok();
        let mut replies: HashMap<&mut MapData, FlowKey, NatReply> =
            HashMap::try_from(self.ebpf.map_mut("NAT_REPLY").context("NAT_REPLY map")?)?;
        let _ = replies.remove(reply);
        Ok(existed)
    }

    /// Number of tracked flows (walks the `CONNTRACK` keys: about one syscall per entry, so call it
    /// every few seconds, not per packet or per scrape).
    pub fn conntrack_entries(&self) -> Result<u64> {
        let conntrack: HashMap<&MapData, FlowKey, ConntrackEntry> =
            HashMap::try_from(self.ebpf.map("CONNTRACK").context("CONNTRACK map")?)?;
        Ok(conntrack.keys().filter(|k| k.is_ok()).count() as u64)
    }

    /// Number of reply translations (`NAT_REPLY` entries: DNAT and SNAT flows; DSR writes none).
    /// Walks the keys, like [`Datapath::conntrack_entries`].
    pub fn nat_reply_entries(&self) -> Result<u64> {
        let replies: HashMap<&MapData, FlowKey, NatReply> =
            HashMap::try_from(self.ebpf.map("NAT_REPLY").context("NAT_REPLY map")?)?;
        Ok(replies.keys().filter(|k| k.is_ok()).count() as u64)
    }

    /// Sum over CPUs of every datapath counter.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        let counters: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("COUNTERS").context("COUNTERS map")?)?;
        Counter::ALL
            .iter()
            .map(|c| {
                let per_cpu = counters.get(&(*c as u32), 0)?;
                Ok((*c, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Traffic of one service (summed over CPUs).
    pub fn service_stats(&self, key: &ServiceKey) -> Result<Option<TrafficStats>> {
        let Some(programmed) = self.services.get(key) else {
            return Ok(None);
        };
        self.traffic("SERVICE_STATS", programmed.info.id).map(Some)
    }

    /// Traffic of one backend (summed over CPUs).
    pub fn backend_stats(&self, address: IpAddr, port: u16) -> Result<Option<TrafficStats>> {
        let Some(id) = self.backend_ids.get(&(address, port)) else {
            return Ok(None);
        };
        self.traffic("BACKEND_STATS", *id).map(Some)
    }

    fn traffic(&self, map: &str, index: u32) -> Result<TrafficStats> {
        let stats: PerCpuArray<_, TrafficStats> =
            PerCpuArray::try_from(self.ebpf.map(map).with_context(|| format!("{map} map"))?)?;
        Ok(stats
            .get(&index, 0)?
            .iter()
            .fold(TrafficStats::default(), |a, s| TrafficStats {
                packets: a.packets + s.packets,
                bytes: a.bytes + s.bytes,
                new_flows: a.new_flows + s.new_flows,
            }))
    }
}

fn mode_of(forwarding: ForwardingMode) -> u8 {
    match forwarding {
        ForwardingMode::Dnat => mode::DNAT,
        ForwardingMode::Snat => mode::SNAT,
        ForwardingMode::DsrL2 => mode::DSR_L2,
        ForwardingMode::DsrIpip => mode::DSR_IPIP,
    }
}

/// `SERVICE_MODES` entry of `service`: its source address (SNAT, DSR-IPIP) and SNAT port range.
fn mode_info_of(config: &Config, service: &Service) -> ModeInfo {
    match config.mode_source(service) {
        None => ModeInfo::default(),
        Some(source) => {
            let ports = config.node.snat_ports;
            ModeInfo {
                source: Addr::from_ip(source),
                port_first: ports.first,
                _pad: 0,
                port_count: (ports.last - ports.first) as u32 + 1,
            }
        }
    }
}

/// Makes the node resolve the MAC address of backends of non-DNAT services, which the datapath sends
/// to with `bpf_fib_lookup` and cannot resolve by itself: DSR L2 drops packets to a backend without
/// a neighbour entry. One empty UDP datagram to the discard port (9) per new backend address makes
/// the kernel resolve it (ARP / neighbour discovery); entries then stay usable (stale entries count)
/// while the node has few neighbours, and health checks keep them fresh.
#[derive(Default)]
struct Neighbours {
    warmed: std::collections::HashSet<IpAddr>,
}

impl Neighbours {
    fn warm(&mut self, address: IpAddr) {
        if !self.warmed.insert(address) {
            return;
        }
        let bind: std::net::SocketAddr = if address.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sent = std::net::UdpSocket::bind(bind).and_then(|s| s.send_to(&[], (address, 9)));
        if let Err(err) = sent {
            debug!(%address, error = %err, "neighbour warm-up datagram not sent");
        }
    }
}

fn flags_of(hash: HashFields) -> u8 {
    match hash {
        HashFields::FiveTuple => 0,
        HashFields::SourceIp => service_flags::HASH_SOURCE_IP,
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.detach_all();
    }
}
