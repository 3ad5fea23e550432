//! Loads the embedded eBPF datapath, attaches it to interfaces, and reconciles its maps with the
//! desired configuration: backends, weighted Maglev tables (swapped atomically) and services.
//!
//! Attached as XDP (`lb_xdp`, the default, best on physical NICs) or TC (`lb_tc` at tcx ingress,
//! best on veths), both with every forwarding mode and `lb_tc_egress` at tcx egress (the node's
//! own ICMP errors about translated requests), or on a workload's veth where the policy also
//! runs, TC split around the policy programs (see [`AttachMode`]).
//!
//! With a pin directory (see [`crate::pins`]) maps, program and XDP/TC links are pinned: the
//! datapath outlives the `Datapath` (and the agent), and the next load adopts the pinned maps,
//! rebuilds its bookkeeping from their contents and replaces the program in the pinned links
//! atomically; [`reload`] does the same while the agent runs, to change the programs' load-time
//! settings ([`ProgramSettings`]).

use std::{
    collections::{BTreeMap, HashMap as StdHashMap, VecDeque},
    net::IpAddr,
    path::PathBuf,
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, ArrayOfMaps, HashMap, IterableMap as _, MapData, PerCpuArray},
    programs::{
        links::LinkOrder,
        links::{FdLink, PinnedLink},
        tc::{self, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions},
        xdp::{XdpLink, XdpLinkId},
        SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    conntrack::{BackendReply, ConntrackEntry, FlowKey, FlowKeyV4, NatReply},
    counters::Counter,
    modes::ModeInfo,
    prefilter, protocol,
    service::{
        backend_flags, family, limits, mode, service_flags, Addr, Backend, ServiceInfo, ServiceKey,
        ServiceSlot, TrafficStats,
    },
};
use tracing::{debug, info, warn};

use crate::{
    applied::{key_of, mode_of, Applied, BackendAddress},
    config::{Config, ForwardingMode, HashFields, Service},
    maglev::{self, MaglevBackend},
    map_batch,
    pins::{self, PinDir},
    prefilter::AddressFilter,
    reply_routes::ReplyRoute,
    resize::Resize,
    retired::{self, Retired},
};

mod reload;

/// Maps whose entries live for moments: another agent's definition of them is not an incompatible
/// layout, they are recreated empty (`FRAGMENTS`: a datagram being forwarded in fragments during
/// the upgrade may lose its later fragments, as when its entry is evicted; `MODE_SCRATCH`: one
/// packet's scratch space).
const TRANSIENT_MAPS: [&str; 2] = ["FRAGMENTS", "MODE_SCRATCH"];

/// The datapath object built from `lb-ebpf` by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// The read-only global that turns flow events on (`lb-ebpf/src/flow_events.rs`).
const FLOW_EVENTS_GLOBAL: &str = "LB_FLOW_EVENTS";
/// The ring buffer the datapath writes flow events to.
pub const FLOW_EVENTS_MAP: &str = "FLOW_EVENTS";

/// Name of the balancing XDP program in the object.
pub const XDP_PROGRAM: &str = "lb_xdp";
/// A program that only returns XDP_PASS, the baseline of per-packet benchmarks.
pub const XDP_PASS_PROGRAM: &str = "xdp_pass";
/// Benchmark programs that only insert into / look up in `CONNTRACK_V4`: the kernel's own cost
/// of tracking a flow, the floor under a new flow and a conntrack hit.
pub const FLOOR_INSERT_PROGRAM: &str = "floor_conntrack_insert";
pub const FLOOR_LOOKUP_PROGRAM: &str = "floor_conntrack_lookup";
/// Name of the balancing TC program (every forwarding mode) in the object.
pub const TC_PROGRAM: &str = "lb_tc";
/// Translates requests at the head of a workload veth's TC ingress, before the policy.
pub const TC_REQUEST_PROGRAM: &str = "lb_tc_request";
/// Translates replies at the end of a workload veth's TC egress, after the policy.
pub const TC_REPLY_PROGRAM: &str = "lb_tc_reply";

/// Translates, at the end of TC egress of a client-facing interface (`--iface`, both attach
/// modes), the ICMP errors the node's own stack sends a client about its translated DNAT request.
pub const TC_EGRESS_PROGRAM: &str = "lb_tc_egress";

/// A TC program an interface gets besides `lb_xdp`/`lb_tc`: its name, its hook, and whether it goes
/// to the head of the tcx chain (else the end).
type Hook = (&'static str, TcAttachType, bool);

/// Every such program, each with a pinned link of its own (`PinDir::tc_hook_link`).
const HOOKS: [Hook; 3] = [
    (TC_REQUEST_PROGRAM, TcAttachType::Ingress, true),
    (TC_REPLY_PROGRAM, TcAttachType::Egress, false),
    (TC_EGRESS_PROGRAM, TcAttachType::Egress, false),
];

/// The programs of [`HOOKS`] an interface attached in `mode` gets: a workload's veth the request
/// and reply programs (`lb_tc_reply` also translates the node's errors to its client); a
/// client-facing interface `lb_tc_egress`.
fn hooks_of(mode: AttachMode) -> &'static [Hook] {
    match mode {
        AttachMode::Workload => &HOOKS[..2],
        AttachMode::Xdp | AttachMode::Tc => &HOOKS[2..],
    }
}

/// Which program an interface gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttachMode {
    /// `lb_xdp`, native where the driver supports it: runs before an skb exists, every forwarding
    /// mode. The choice for physical NICs. Also `lb_tc_egress` at the end of tcx egress.
    #[default]
    Xdp,
    /// `lb_tc` at TC (tcx) ingress: every forwarding mode, as `lb_xdp`. The choice for veths,
    /// where XDP forces NAPI, copies cloned skbs and disables TSO on the peer. Also `lb_tc_egress`
    /// at the end of tcx egress.
    Tc,
    /// A workload's veth (host side), where the policy programs also run: `lb_tc` at the end of tcx
    /// ingress, `lb_tc_request` at its head (translates requests to VIPs before
    /// `policy_from_endpoint`, so the client's egress rules see the chosen backend) and
    /// `lb_tc_reply` at the end of tcx egress (turns the replies' source back into the VIP after
    /// `policy_to_endpoint` matched them). The request and reply programs translate DNAT only: a
    /// workload client's requests to SNAT/DSR services are served as DNAT (its replies reach the
    /// node by the pod's route anyway); `lb_tc` every mode, as with `Tc`.
    Workload,
}

impl std::str::FromStr for AttachMode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "xdp" => Ok(Self::Xdp),
            "tc" => Ok(Self::Tc),
            _ => bail!("attach mode {s:?}: expected `xdp` or `tc`"),
        }
    }
}

/// `BPF_F_INNER_MAP`: inner maps of `MAGLEV_TABLES` may have any number of entries.
const BPF_F_INNER_MAP: u32 = 1 << 12;

/// Filled Maglev tables placed into `MAGLEV_TABLES` per batch update. Every update of a
/// map-in-map waits for an RCU grace period (about 10 ms here), once per call: batching turns
/// 10,000 waits into 40. Each pending table is an open descriptor, so the batch stays well below
/// the usual 1024-descriptor limit.
const TABLE_FLIP_BATCH: usize = 256;

/// How full a map is: its live entries and the entries it was created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableFill {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u32,
}

/// Load-time settings.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Entries of each of the `CONNTRACK_V4` (IPv4 flows) and `NAT_REPLY` LRU maps, and of
    /// `CONNTRACK_V6` unless [`conntrack_entries_v6`](Self::conntrack_entries_v6) says otherwise.
    pub conntrack_entries: u32,
    /// Entries of `CONNTRACK_V6` (IPv6 flows); `None`: `conntrack_entries`. LRU maps are
    /// allocated whole at load, so a node with few IPv6 flows can keep this one small.
    pub conntrack_entries_v6: Option<u32>,
    /// Pin everything here and adopt what is pinned; `None`: nothing is pinned and the datapath
    /// goes away with the `Datapath`.
    pub pins: Option<PinOptions>,
    /// How many services and backends the maps hold (see [`Capacity`]).
    pub capacity: Capacity,
    /// Load `lb_xdp` and `lb_tc` reporting flow events (`lb_common::flow_events`) into
    /// `FLOW_EVENTS` ([`Datapath::take_flow_events`]); without it the verifier removes the
    /// reporting and the per-packet paths are unchanged.
    pub flow_events: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conntrack_entries: limits::DEFAULT_CONNTRACK_ENTRIES,
            conntrack_entries_v6: None,
            pins: None,
            capacity: Capacity::default(),
            flow_events: false,
        }
    }
}

/// The programs' load-time switches: read-only globals, so with one off the verifier removes its
/// code and the packets pay nothing for it. Changing them loads the programs again
/// ([`Datapath::reload`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProgramSettings {
    /// Report flow events (`lb_common::flow_events`) into `FLOW_EVENTS`.
    pub flow_events: bool,
    /// Check the CIDR deny list (`policy::datapath::write_cidr_deny`) in `lb_xdp` and `lb_tc`.
    pub cidr_deny: bool,
}

impl ProgramSettings {
    /// The globals' values, in the order [`new_loader`] sets them.
    fn globals(self) -> [u32; 2] {
        [self.cidr_deny as u32, self.flow_events as u32]
    }
}

/// A loader of the datapath object with the `globals` of [`ProgramSettings::globals`] and maps of
/// `max_entries` (the first load's and every reload's).
fn new_loader<'a>(globals: &'a [u32; 2], max_entries: &[(&'a str, u32)]) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    loader
        .override_global(
            crate::policy::datapath::XDP_CIDR_DENY_GLOBAL,
            &globals[0],
            true,
        )
        .override_global(FLOW_EVENTS_GLOBAL, &globals[1], true);
    for &(name, entries) in max_entries {
        loader.map_max_entries(name, entries);
    }
    loader
}

/// How many services and backends the datapath holds, chosen at load time. Every map indexed by
/// service or backend id is sized from it, the per-CPU statistics too: those cost 24 bytes per
/// service and per backend on every CPU (3.4 MiB per CPU at the defaults, 216 MiB on a 64-CPU
/// node), so a node with many CPUs and few services keeps them small. The defaults are the
/// compiled-in sizes, the most `SERVICES_LIMIT` and `BACKENDS_LIMIT - 1`
/// (`lb_common::service::limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// `SERVICES`, `SERVICE_SLOTS`, `SERVICE_MODES` and `SERVICE_STATS` entries (service ids
    /// `0..services`); `MAGLEV_TABLES` has two slots per service.
    pub services: u32,
    /// Backends of all services together: ids `1..=backends` (id 0 means "no backend"), so
    /// `BACKENDS` and `BACKEND_STATS` have one entry more; `BACKEND_REPLY` as many.
    pub backends: u32,
}

impl Default for Capacity {
    fn default() -> Self {
        Self {
            services: limits::DEFAULT_SERVICES,
            backends: limits::DEFAULT_BACKENDS - 1,
        }
    }
}

impl Capacity {
    /// `max_entries` of each map the capacity sizes.
    fn map_sizes(self) -> [(&'static str, u32); 8] {
        [
            ("SERVICES", self.services),
            ("SERVICE_SLOTS", self.services),
            ("SERVICE_MODES", self.services),
            ("SERVICE_STATS", self.services),
            ("MAGLEV_TABLES", 2 * self.services),
            ("BACKENDS", self.backends + 1),
            ("BACKEND_STATS", self.backends + 1),
            ("BACKEND_REPLY", self.backends + 1),
        ]
    }

    /// Refuses sizes beyond the compiled-in ones, or zero.
    pub fn check(self) -> Result<Self> {
        if !(1..=limits::SERVICES_LIMIT).contains(&self.services) {
            bail!(
                "capacity: {} services; 1 to {} are possible",
                self.services,
                limits::SERVICES_LIMIT
            );
        }
        if !(1..limits::BACKENDS_LIMIT).contains(&self.backends) {
            bail!(
                "capacity: {} backends; 1 to {} are possible",
                self.backends,
                limits::BACKENDS_LIMIT - 1
            );
        }
        Ok(self)
    }
}

#[derive(Debug, Clone)]
pub struct PinOptions {
    /// Directory on a BPF filesystem, e.g. `/sys/fs/bpf/lb`.
    pub dir: PathBuf,
    /// Pinned state of an incompatible layout is removed (flushing connection tracking) instead
    /// of refused.
    pub replace_incompatible_state: bool,
}

/// How the program is attached to one interface.
enum Attachment {
    /// Detached by [`Datapath::detach_all`] and on drop.
    Owned(XdpLinkId),
    OwnedTc(&'static str, SchedClassifierLinkId),
    /// A pinned `bpf_link`: stays attached until its pin is removed.
    Pinned,
}

/// What the agent wrote for one service, so the next reconcile writes only differences.
#[derive(Debug, Clone)]
struct ProgrammedService {
    info: ServiceInfo,
    /// Backend ids of the live Maglev table (empty when `info.table_size` is 0).
    table: Vec<u32>,
    /// What `table` was built from; `None` after adopting pinned maps (the table is then rebuilt
    /// once and compared).
    inputs: Option<TableInputs>,
    /// The service's `SERVICE_MODES` entry (all zero for DNAT and DSR L2).
    mode: ModeInfo,
}

/// Everything a Maglev table depends on: equal inputs build the same table, so an unchanged
/// service costs a comparison instead of a rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TableInputs {
    /// Per backend in configured order: its `BACKENDS` id and its Maglev identity and weight.
    backends: Vec<(u32, MaglevBackend)>,
    table_size: u32,
    seed: u64,
}

/// Tables filled but not yet placed in `MAGLEV_TABLES`, and the service entries that must wait for
/// them (a service never names a slot before its table is there).
#[derive(Default)]
struct PendingFlips {
    tables: Vec<(u32, Array<MapData, u32>)>,
    services: Vec<PendingService>,
}

struct PendingService {
    key: ServiceKey,
    name: String,
    info: ServiceInfo,
    /// The bookkeeping before this apply, restored if the flip fails (the maps still hold it).
    previous: Option<ProgrammedService>,
}

/// What one `apply` changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Services looked at: those whose config or weights differ from the last apply, or every
    /// service when everything is walked (see [`Datapath::apply_with`]).
    pub services_examined: usize,
    pub services_written: usize,
    pub services_removed: usize,
    pub tables_swapped: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
    /// Backends no service names any more, kept while tracked flows use them (`crate::retired`).
    pub backends_retired: usize,
}

impl ApplyReport {
    /// Whether the apply wrote or removed any entry.
    pub fn wrote_anything(&self) -> bool {
        *self
            != Self {
                services_examined: self.services_examined,
                ..Self::default()
            }
    }
}

/// A loaded datapath. Dropping it detaches the program from every interface and frees the maps,
/// unless they are pinned.
pub struct Datapath {
    ebpf: Ebpf,
    pins: Option<PinDir>,
    attached: Vec<(String, Attachment)>,
    services: BTreeMap<ServiceKey, ProgrammedService>,
    backend_ids: StdHashMap<(IpAddr, u16), u32>,
    backends: StdHashMap<u32, Backend>,
    /// Per backend id: how its replies find their VIP (`BACKEND_REPLY`, its `SHARED_REPLIES` flag).
    reply_routes: StdHashMap<u32, ReplyRoute>,
    /// Freed backend ids, reused oldest first so conntrack entries naming a removed backend are
    /// long gone before its id means another backend.
    free_backend_ids: VecDeque<u32>,
    next_backend_id: u32,
    neighbours: Neighbours,
    /// Held while this datapath lives: one agent per pin directory.
    _pin_lock: Option<std::fs::File>,
    /// The `ADDRESS_FILTER` words as written; `None` before the first write (also after adopting
    /// pinned maps: the first apply rewrites every word).
    address_filter: Option<AddressFilter>,
    capacity: Capacity,
    /// What the last apply that succeeded programmed, per service: the next apply touches only
    /// what differs (most reconciles are triggered by events that change nothing or one
    /// service). Taken while an apply runs, so a failed one is redone in full.
    applied: Option<Applied>,
    /// Pinned maps of another size carried over at load, pinned by [`Datapath::finish_resize`].
    resize: Option<Resize>,
    /// Backends no service names any more whose tracked flows still live, by id.
    retired: BTreeMap<u32, Retired>,
    /// The load-time globals the programs run with (changed by [`Datapath::reload`]).
    settings: ProgramSettings,
    /// `max_entries` of every map sized at load time, for a reload to find the same maps.
    max_entries: Vec<(&'static str, u32)>,
}

impl Datapath {
    /// Loads the object and the XDP program into the kernel (the verifier runs here).
    pub fn load() -> Result<Self> {
        Self::load_with(&LoadOptions::default())
    }

    /// Loads with `options`. With pins: adopts compatible pinned maps (their contents, connection
    /// tracking included, stay), refuses incompatible ones unless told to replace them, and pins
    /// maps and program.
    pub fn load_with(options: &LoadOptions) -> Result<Self> {
        Self::load_with_cidr_deny(options, false)
    }

    /// `cidr_deny`: enables the CIDR deny list of `lb_xdp` and `lb_tc`
    /// (`policy::datapath::write_cidr_deny`); without it the verifier removes the check from both.
    pub fn load_with_cidr_deny(options: &LoadOptions, cidr_deny: bool) -> Result<Self> {
        let max_entries = [
            ("CONNTRACK_V4", options.conntrack_entries),
            (
                "CONNTRACK_V6",
                options
                    .conntrack_entries_v6
                    .unwrap_or(options.conntrack_entries),
            ),
            ("NAT_REPLY", options.conntrack_entries),
        ];
        let settings = ProgramSettings {
            flow_events: options.flow_events,
            cidr_deny,
        };
        let globals = settings.globals();
        let capacity = options.capacity.check()?;
        let max_entries: Vec<(&'static str, u32)> = max_entries
            .into_iter()
            .chain(capacity.map_sizes())
            .collect();
        let mut loader = new_loader(&globals, &max_entries);
        let pins = options.pins.as_ref().map(|p| PinDir::new(&p.dir));
        let prepared = match (&pins, &options.pins) {
            (Some(pins), Some(pin_options)) => Some(prepare_pins(pins, pin_options, &max_entries)?),
            _ => None,
        };
        let map_pins = prepared.as_ref().map_or(&[][..], |p| &p.map_paths[..]);
        for (name, path) in map_pins {
            loader.map_pin_path(name.as_str(), path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let program: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .context("XDP program missing from the object")?
            .try_into()?;
        program
            .load()
            .context("loading the XDP program (verifier)")?;
        if let Some(pins) = &pins {
            let path = pins.program(XDP_PROGRAM);
            let _ = std::fs::remove_file(&path);
            program
                .pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
        }
        let resize = match (&pins, &prepared) {
            (Some(pins), Some(p)) if !p.resized.is_empty() || !p.recreated.is_empty() => {
                Some(Resize::start(pins, &p.resized, &p.recreated, &ebpf)?)
            }
            _ => None,
        };
        let (pin_lock, adopt) = prepared.map_or((None, false), |p| (Some(p.lock), p.adopt));
        let mut datapath = Self {
            ebpf,
            pins,
            attached: Vec::new(),
            services: BTreeMap::new(),
            backend_ids: StdHashMap::new(),
            reply_routes: StdHashMap::new(),
            backends: StdHashMap::new(),
            free_backend_ids: VecDeque::new(),
            // Id 0 is never used: a zeroed BACKENDS slot means "no backend".
            next_backend_id: 1,
            neighbours: Neighbours::default(),
            _pin_lock: pin_lock,
            address_filter: None,
            capacity,
            applied: None,
            resize,
            retired: BTreeMap::new(),
            settings,
            max_entries,
        };
        if adopt {
            datapath.adopt_programmed_state()?;
        }
        datapath.carry_over_address_filter(adopt)?;
        Ok(datapath)
    }

    /// Rebuilds the bookkeeping from adopted maps, so backend ids (which conntrack entries name)
    /// and service ids and table slots stay what they are, and the next reconcile writes only
    /// differences. Freed backend ids are reused lowest first (their release order is not stored).
    fn adopt_programmed_state(&mut self) -> Result<()> {
        let backends: Array<&MapData, Backend> =
            Array::try_from(self.ebpf.map("BACKENDS").context("BACKENDS map")?)?;
        let backend_replies: HashMap<&MapData, ServiceKey, BackendReply> = HashMap::try_from(
            self.ebpf
                .map("BACKEND_REPLY")
                .context("BACKEND_REPLY map")?,
        )?;
        let mut highest = 0;
        let all = map_batch::read_array(&backends).context("reading BACKENDS")?;
        for (id, backend) in all.into_iter().enumerate().skip(1) {
            let id = id as u32;
            if backend != Backend::default() {
                let entry = [protocol::TCP, protocol::UDP]
                    .into_iter()
                    .find_map(|protocol| {
                        let key = ServiceKey {
                            addr: backend.addr,
                            port: backend.port,
                            protocol,
                            family: backend.family,
                        };
                        backend_replies.get(&key, 0).ok().map(|reply| (key, reply))
                    });
                self.reply_routes
                    .insert(id, ReplyRoute::adopted(&backend, entry));
                self.backends.insert(id, backend);
                self.backend_ids
                    .insert((backend.ip(), backend.port_host()), id);
                highest = id;
            }
        }
        self.next_backend_id = highest + 1;
        self.free_backend_ids = (1..highest)
            .filter(|id| !self.backends.contains_key(id))
            .collect();

        let services: HashMap<&MapData, ServiceKey, ServiceInfo> =
            HashMap::try_from(self.ebpf.map("SERVICES").context("SERVICES map")?)?;
        let modes: Array<&MapData, ModeInfo> = Array::try_from(
            self.ebpf
                .map("SERVICE_MODES")
                .context("SERVICE_MODES map")?,
        )?;
        let tables: ArrayOfMaps<&MapData, Array<MapData, u32>> = ArrayOfMaps::try_from(
            self.ebpf
                .map("MAGLEV_TABLES")
                .context("MAGLEV_TABLES map")?,
        )?;
        for entry in services.iter() {
            let (key, info) = entry.context("reading SERVICES")?;
            let table = if info.table_size == 0 {
                Vec::new()
            } else {
                let live = tables
                    .get(&info.table_slot, 0)
                    .with_context(|| format!("reading Maglev table {}", info.table_slot))?;
                map_batch::read_array(&live).context("reading a Maglev table")?
            };
            let mode = modes.get(&info.id, 0).context("reading SERVICE_MODES")?;
            self.services.insert(
                key,
                ProgrammedService {
                    info,
                    table,
                    inputs: None,
                    mode,
                },
            );
        }
        info!(
            services = self.services.len(),
            backends = self.backends.len(),
            "adopted the programmed services and backends"
        );
        Ok(())
    }

    /// The balancing XDP program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn xdp_program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(XDP_PROGRAM)
            .expect("checked in load")
            .try_into()
            .expect("checked in load")
    }

    /// The loaded object: for the policy maps `lb_xdp` reads (`policy::datapath::write_cidr_deny`),
    /// and for tests that read the maps.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The `FLOW_EVENTS` ring buffer, taken out of the object for its reader
    /// (`crate::flow_events::forward`); an error once taken.
    pub fn take_flow_events(&mut self) -> Result<aya::maps::RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map(FLOW_EVENTS_MAP)
            .context("FLOW_EVENTS missing from the object (or already taken)")?;
        Ok(aya::maps::RingBuf::try_from(map)?)
    }

    /// The XDP_PASS baseline program, loaded on first use.
    pub fn xdp_pass_program(&mut self) -> Result<&mut Xdp> {
        self.bench_program(XDP_PASS_PROGRAM)
    }

    /// A benchmark-only XDP program of the object ([`XDP_PASS_PROGRAM`],
    /// [`FLOOR_INSERT_PROGRAM`], [`FLOOR_LOOKUP_PROGRAM`]), loaded (not pinned) on first use.
    pub fn bench_program(&mut self, name: &str) -> Result<&mut Xdp> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing from the object"))?
            .try_into()?;
        if program.fd().is_err() {
            program.load()?;
        }
        Ok(program)
    }

    /// The TC program `lb_tc`, loaded (and pinned) on first use.
    pub fn tc_program(&mut self) -> Result<&mut SchedClassifier> {
        self.tc_program_named(TC_PROGRAM)
    }

    /// A TC program of the object ([`TC_PROGRAM`], [`TC_REQUEST_PROGRAM`], [`TC_REPLY_PROGRAM`],
    /// [`TC_EGRESS_PROGRAM`]), loaded (and pinned) on first use.
    pub fn tc_program_named(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        let pin = self.pins.as_ref().map(|pins| pins.program(name));
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing from the object"))?
            .try_into()?;
        if program.fd().is_err() {
            program
                .load()
                .with_context(|| format!("loading {name} (verifier)"))?;
            if let Some(path) = pin {
                let _ = std::fs::remove_file(&path);
                program
                    .pin(&path)
                    .with_context(|| format!("pinning {}", path.display()))?;
            }
        }
        Ok(program)
    }

    /// Attaches `lb_xdp` to `interface` (see [`Datapath::attach_with`]).
    pub fn attach(&mut self, interface: &str) -> Result<()> {
        self.attach_with(interface, AttachMode::Xdp)
    }

    /// Attaches to `interface` (in the calling thread's network namespace). XDP: native (driver)
    /// mode where the driver supports it, generic (skb) mode otherwise; TC: tcx ingress; workload:
    /// TC plus the request and reply programs. With pins, a pinned link of the interface in the
    /// same mode gets this program atomically (no moment without a program), a new link is pinned,
    /// and a pinned link of the other mode is removed (one balancing program per interface).
    pub fn attach_with(&mut self, interface: &str, mode: AttachMode) -> Result<()> {
        let hooks = hooks_of(mode);
        self.release_hooks_except(interface, hooks)?;
        let balancer = match mode {
            AttachMode::Workload => AttachMode::Tc,
            other => other,
        };
        self.attach_balancer(interface, balancer)?;
        self.attach_hooks(interface, hooks)
    }

    /// [`Self::attach_with`] for `lb_xdp` or `lb_tc` (ingress) alone.
    fn attach_balancer(&mut self, interface: &str, mode: AttachMode) -> Result<()> {
        if mode == AttachMode::Tc {
            self.tc_program()?;
        }
        let Some(pins) = self.pins.clone() else {
            let attachment = match mode {
                AttachMode::Xdp => Attachment::Owned(self.attach_link(interface)?),
                _ => Attachment::OwnedTc(TC_PROGRAM, self.attach_tc_link(interface)?),
            };
            self.attached.push((interface.to_string(), attachment));
            return Ok(());
        };
        let (path, other) = match mode {
            AttachMode::Xdp => (pins.link(interface), pins.tc_ingress_link(interface)),
            _ => (pins.tc_ingress_link(interface), pins.link(interface)),
        };
        if other.exists() {
            std::fs::remove_file(&other)
                .with_context(|| format!("removing {}", other.display()))?;
            info!(interface, link = %other.display(),
                  "removed the pinned link of the other attach mode");
        }
        let kind = match mode {
            AttachMode::Xdp => "XDP",
            _ => "TC",
        };
        self.adopt_or_attach_pinned(
            interface,
            &path,
            kind,
            |this| this.replace_program_in(&path, mode),
            |this| match mode {
                AttachMode::Xdp => {
                    let id = this.attach_link(interface)?;
                    let link = this.xdp_program().take_link(id)?;
                    FdLink::try_from(link).with_context(|| {
                        format!(
                            "XDP on {interface} is attached through netlink, which cannot be pinned"
                        )
                    })
                }
                _ => {
                    let id = this.attach_tc_link(interface)?;
                    let link = this.tc_program()?.take_link(id)?;
                    FdLink::try_from(link).with_context(|| {
                        format!(
                            "TC on {interface} is attached through netlink (kernel before 6.6, no \
                             tcx), which cannot be pinned"
                        )
                    })
                }
            },
        )
    }

    /// [`pins::replace_or_attach_pinned`] for this datapath, which then keeps the link as pinned.
    fn adopt_or_attach_pinned(
        &mut self,
        interface: &str,
        path: &std::path::Path,
        kind: &str,
        replace: impl FnOnce(&mut Self) -> Result<()>,
        attach: impl FnOnce(&mut Self) -> Result<FdLink>,
    ) -> Result<()> {
        pins::replace_or_attach_pinned(self, path, interface, kind, replace, attach)?;
        self.attached
            .push((interface.to_string(), Attachment::Pinned));
        Ok(())
    }

    /// Puts this program into the pinned link at `path` (`BPF_LINK_UPDATE`).
    fn replace_program_in(&mut self, path: &std::path::Path, mode: AttachMode) -> Result<()> {
        let link: FdLink = PinnedLink::from_pin(path)?.into();
        match mode {
            AttachMode::Xdp => {
                let link = XdpLink::try_from(link)?;
                let program = self.xdp_program();
                let id = program.attach_to_link(link)?;
                // The pin keeps the link; dropping our descriptor does not detach it.
                drop(program.take_link(id)?);
            }
            _ => self.replace_tc_program_in(link, TC_PROGRAM)?,
        }
        Ok(())
    }

    /// Puts TC program `name` into the pinned tcx `link` (`BPF_LINK_UPDATE`).
    fn replace_tc_program_in(&mut self, link: FdLink, name: &str) -> Result<()> {
        let link = SchedClassifierLink::try_from(link)?;
        let program = self.tc_program_named(name)?;
        let id = program.attach_to_link(link)?;
        // The pin keeps the link; dropping our descriptor does not detach it.
        drop(program.take_link(id)?);
        Ok(())
    }

    /// Attaches the TC programs `hooks` (see [`hooks_of`]) to `interface`, next to the balancing
    /// program: on a workload's veth `lb_tc_request` (head of tcx ingress) and `lb_tc_reply` (end
    /// of tcx egress), where the policy's `policy_from_endpoint` goes after `lb_tc_request`
    /// whichever is attached first (see `crate::policy::datapath`); on a client-facing interface
    /// `lb_tc_egress` (end of tcx egress). With pins, as [`Self::attach_with`]: a pinned link keeps
    /// its place and gets this program atomically; a link an earlier agent did not pin is
    /// attached and pinned.
    fn attach_hooks(&mut self, interface: &str, hooks: &[Hook]) -> Result<()> {
        for &(name, attach_type, first) in hooks {
            let order = if first {
                LinkOrder::first()
            } else {
                LinkOrder::last()
            };
            let Some(pins) = self.pins.clone() else {
                let id = self.attach_tc_ordered(interface, name, attach_type, order)?;
                self.attached
                    .push((interface.to_string(), Attachment::OwnedTc(name, id)));
                continue;
            };
            let path = pins.tc_hook_link(interface, name);
            self.adopt_or_attach_pinned(
                interface,
                &path,
                "tcx",
                |this| {
                    let link: FdLink = PinnedLink::from_pin(&path)?.into();
                    this.replace_tc_program_in(link, name)
                },
                |this| {
                    let id = this.attach_tc_ordered(interface, name, attach_type, order)?;
                    FdLink::try_from(this.tc_program_named(name)?.take_link(id)?).with_context(
                        || {
                            format!(
                                "{name} on {interface} is attached through netlink, which cannot \
                                 be pinned"
                            )
                        },
                    )
                },
            )?;
        }
        Ok(())
    }

    /// Removes the pinned links of `interface` of the [`HOOKS`] programs other than `keep` (the
    /// interface is now attached in another mode).
    fn release_hooks_except(&self, interface: &str, keep: &[Hook]) -> Result<()> {
        let Some(pins) = &self.pins else {
            return Ok(());
        };
        for (name, _, _) in HOOKS {
            if keep.iter().any(|(kept, _, _)| *kept == name) {
                continue;
            }
            let path = pins.tc_hook_link(interface, name);
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                info!(interface, link = %path.display(),
                      "removed the pinned tcx link of the other attach mode");
            }
        }
        Ok(())
    }

    /// Attaches TC program `name` to `interface` at `order` in its tcx chain.
    fn attach_tc_ordered(
        &mut self,
        interface: &str,
        name: &str,
        attach_type: TcAttachType,
        order: LinkOrder,
    ) -> Result<SchedClassifierLinkId> {
        // Needed before tcx (kernel 6.6), harmless after; EEXIST: the qdisc is there already.
        let _ = tc::qdisc_add_clsact(interface);
        let program = self.tc_program_named(name)?;
        let id = match program.attach_with_options(
            interface,
            attach_type,
            TcAttachOptions::TcxOrder(order),
        ) {
            Ok(id) => id,
            // No tcx (before 6.6): a clsact filter.
            Err(_) => program
                .attach(interface, attach_type)
                .with_context(|| format!("attaching {name} to {interface}"))?,
        };
        info!(interface, program = name, "TC attached");
        Ok(id)
    }

    /// Removes the pinned links of interfaces other than `keep` (detaching the datapath there).
    pub fn release_links_except(&self, keep: &[String]) -> Result<()> {
        let Some(pins) = &self.pins else {
            return Ok(());
        };
        for interface in pins.linked_interfaces()? {
            if !keep.contains(&interface) {
                Self::remove_link_pins(pins, &interface)?;
                info!(interface, "detached: interface no longer configured");
            }
        }
        Ok(())
    }

    /// Detaches the datapath from `interface` at runtime (a released workload veth): its pinned
    /// links are removed, its own links detached. Nothing to do is no error; a vanished interface
    /// only leaves pins to remove.
    pub fn release_interface(&mut self, interface: &str) -> Result<()> {
        if let Some(pins) = &self.pins {
            Self::remove_link_pins(pins, interface)?;
        }
        let (released, kept) = std::mem::take(&mut self.attached)
            .into_iter()
            .partition(|(name, _)| name == interface);
        self.attached = kept;
        for (_, attachment) in released {
            let detached = match attachment {
                Attachment::Owned(link) => self.xdp_program().detach(link).map_err(Into::into),
                Attachment::OwnedTc(name, link) => self
                    .tc_program_named(name)
                    .and_then(|program| program.detach(link).map_err(Into::into)),
                Attachment::Pinned => Ok(()),
            };
            if let Err(err) = detached {
                // Gone with its interface: the kernel detached it already.
                debug!(interface, error = %format!("{err:#}"), "detach");
            }
        }
        info!(interface, "detached: interface released");
        Ok(())
    }

    /// Removes every pinned link of `interface` (the kernel detaches what no pin holds).
    fn remove_link_pins(pins: &PinDir, interface: &str) -> Result<()> {
        let hook_links = HOOKS.map(|(name, _, _)| pins.tc_hook_link(interface, name));
        for path in [pins.link(interface), pins.tc_ingress_link(interface)]
            .into_iter()
            .chain(hook_links)
        {
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Completes the load's resize of pinned maps, if it had one (see `crate::resize`): call it
    /// once the new programs are attached to every interface. Until then the pins name the maps
    /// the previous programs used.
    pub fn finish_resize(&mut self) -> Result<()> {
        match self.resize.take() {
            Some(resize) => resize.finish(&self.ebpf),
            None => Ok(()),
        }
    }

    /// The pin directory, if the datapath is pinned.
    pub fn pin_dir(&self) -> Option<&PinDir> {
        self.pins.as_ref()
    }

    fn attach_link(&mut self, interface: &str) -> Result<XdpLinkId> {
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
        Ok(link)
    }

    fn attach_tc_link(&mut self, interface: &str) -> Result<SchedClassifierLinkId> {
        // Needed before tcx (kernel 6.6), harmless after; EEXIST: the qdisc is there already.
        let _ = tc::qdisc_add_clsact(interface);
        let link = self
            .tc_program()?
            .attach(interface, TcAttachType::Ingress)
            .with_context(|| format!("attaching TC to {interface}"))?;
        info!(interface, mode = "tc", "TC attached");
        Ok(link)
    }

    /// Detaches from every interface attached without pins (also done on drop). Pinned links stay:
    /// remove them with [`PinDir::remove_all`].
    pub fn detach_all(&mut self) {
        for (interface, attachment) in std::mem::take(&mut self.attached) {
            let detached = match attachment {
                Attachment::Owned(link) => self.xdp_program().detach(link).map_err(Into::into),
                Attachment::OwnedTc(name, link) => self
                    .tc_program_named(name)
                    .and_then(|program| program.detach(link).map_err(Into::into)),
                Attachment::Pinned => continue,
            };
            match detached {
                Ok(()) => info!(interface, "detached"),
                Err(err) => warn!(interface, error = %format!("{err:#}"), "detach failed"),
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
    /// Only services that differ from the last successful apply (and the backends they name or
    /// named) are looked at, unless a global field (Maglev seed, node) changed: then, as after a
    /// failed apply, at load and after adopting pinned maps, every service is (see
    /// `crate::applied`). A config naming one service key twice is refused.
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
        // The record is out while the apply runs: a failed apply leaves none, and the next one
        // walks everything.
        let (mut applied, full) = match self.applied.take() {
            Some(applied) if applied.has_globals_of(config) => (applied, false),
            _ => (Applied::empty_for(config), true),
        };
        let changes = applied.update(config, weight_of)?;
        if !full && changes.is_empty() {
            // The agent is the maps' only writer: the same state again would write nothing.
            self.applied = Some(applied);
            return Ok(report);
        }
        // Backends no service names any more: after a full walk, any the maps hold beyond the
        // config (adopted, or left by a failed apply).
        let leaving: Vec<BackendAddress> = if full {
            self.backend_ids
                .keys()
                .filter(|b| applied.frontends_of(b).is_none())
                .copied()
                .collect()
        } else {
            changes
                .touched
                .iter()
                .filter(|b| applied.frontends_of(b).is_none() && self.backend_ids.contains_key(b))
                .copied()
                .collect()
        };
        // Retired backends stay retired: they leave when their flows end.
        let leaving: Vec<BackendAddress> = leaving
            .into_iter()
            .filter(|b| !self.retired.contains_key(&self.backend_ids[b]))
            .collect();
        self.check_capacity(config, applied.backend_count(), leaving.len())?;
        // Retired backends make room for new ones at --max-backends.
        let new_ids = changes
            .touched
            .iter()
            .filter(|b| applied.frontends_of(b).is_some() && !self.backend_ids.contains_key(b))
            .count();
        let excess =
            (self.backend_ids.len() + new_ids).saturating_sub(self.capacity.backends as usize);
        if excess > 0 {
            let making_room: Vec<(BackendAddress, u32)> = self
                .retired
                .iter()
                .take(excess)
                .map(|(id, retired)| (retired.address, *id))
                .collect();
            warn!(
                backends = making_room.len(),
                "retired backends removed before their flows ended, to make room (--max-backends)"
            );
            self.release_backends(&making_room)?;
        }
        report.services_examined = changes.changed.len();

        // 1. Backend ids, BACKENDS and BACKEND_REPLY entries for every backend the changed
        // services name (a backend's reply route before the tables that send it new flows).
        let mut wanted: Vec<(u32, Backend, ReplyRoute)> = Vec::new();
        for address in &changes.touched {
            let Some(frontends) = applied.frontends_of(address) else {
                continue;
            };
            let id = self.backend_id_for(address.0, address.1)?;
            // Named again while retired: the same backend, with its id and flows.
            self.retired.remove(&id);
            let backend = Backend::new(address.0, address.1);
            let route = ReplyRoute::next(self.reply_routes.get(&id).copied(), &backend, frontends);
            wanted.push((id, route.flagged(backend), route));
        }
        {
            let mut backends: Array<&mut MapData, Backend> =
                Array::try_from(self.ebpf.map_mut("BACKENDS").context("BACKENDS map")?)?;
            for (id, backend, _) in &wanted {
                if self.backends.get(id) != Some(backend) {
                    backends.set(*id, backend, 0).context("writing BACKENDS")?;
                    self.backends.insert(*id, *backend);
                    report.backends_written += 1;
                }
            }
        }
        {
            let mut replies: HashMap<&mut MapData, ServiceKey, BackendReply> = HashMap::try_from(
                self.ebpf
                    .map_mut("BACKEND_REPLY")
                    .context("BACKEND_REPLY map")?,
            )?;
            for (id, backend, route) in &wanted {
                let Some((key, reply)) = route.entry(backend) else {
                    continue;
                };
                let programmed = self.reply_routes.get(id).and_then(|r| r.entry(backend));
                if programmed != Some((key, reply)) {
                    replies
                        .insert(key, reply, 0)
                        .context("writing BACKEND_REPLY")?;
                }
                self.reply_routes.insert(*id, *route);
            }
        }

        // The prefilter admits the new VIPs and backends before their entries exist; stale roles
        // are cleared at the end, once their entries are gone.
        let wanted_filter = applied.filter().clone();
        let transition = match &self.address_filter {
            Some(programmed) => programmed.union(&wanted_filter),
            None => wanted_filter.clone(),
        };
        self.write_address_filter(transition)?;

        // 2. Services no longer wanted go first: their ids are free for the new services (a node
        // at its --max-services can swap a service for another). Their traffic would stop being
        // balanced at the end of this apply anyway; a flow tracked under a reused id is not
        // taken for the new service (`service::of_tracked` compares the key).
        let stale: Vec<ServiceKey> = if full {
            self.services
                .keys()
                .filter(|k| !applied.has_service(k))
                .copied()
                .collect()
        } else {
            changes.removed
        };
        if !stale.is_empty() {
            let mut services: HashMap<&mut MapData, ServiceKey, ServiceInfo> =
                HashMap::try_from(self.ebpf.map_mut("SERVICES").context("SERVICES map")?)?;
            let mut freed = Vec::new();
            for key in stale {
                services.remove(&key).context("removing from SERVICES")?;
                freed.extend(self.services.remove(&key).map(|p| p.info.id));
                report.services_removed += 1;
                info!(vip = %key.vip(), port = key.port_host(), "service removed");
            }
            for id in freed {
                self.write_service_slot(id, ServiceSlot::default())?;
            }
        }

        // 3. Maglev tables and services. A changed table is filled into a new inner map here and
        // placed with others in one batch (see TABLE_FLIP_BATCH); the service entry naming it is
        // written after that.
        let mut pending = PendingFlips::default();
        if let Err(err) = self.program_services(config, &changes.changed, &mut pending, &mut report)
        {
            // Tables not placed yet are dropped with `pending`; their services keep what the
            // maps hold.
            for service in std::mem::take(&mut pending.services) {
                self.restore(service);
            }
            return Err(err);
        }

        // 4. Backends no service names any more: those live conntrack entries name are retired
        // (kept, with their reply routes and filter roles, while those flows live; see
        // `crate::retired`); the others are zeroed and their reply routes go.
        let unused: Vec<u32> = leaving.iter().map(|b| self.backend_ids[b]).collect();
        let live = if unused.iter().any(|id| self.backends.contains_key(id)) {
            retired::live_backend_ids(&self.ebpf, &self.programmed_service_ids())?
        } else {
            Default::default()
        };
        let mut removed = Vec::new();
        for (address, id) in leaving.iter().zip(unused) {
            if live.contains(&id) && self.backends.contains_key(&id) {
                let programmed = self.address_filter.as_ref();
                let roles = programmed.map_or(0, |f| f.roles_of(&Addr::from_ip(address.0)))
                    & prefilter::role::BACKEND;
                self.retired.insert(
                    id,
                    Retired {
                        address: *address,
                        roles,
                    },
                );
                self.mark_retired(id)?;
                report.backends_retired += 1;
            } else {
                removed.push((*address, id));
            }
        }
        report.backends_removed += self.release_backends(&removed)?;
        let wanted_filter = self.with_retired_roles(wanted_filter);
        self.write_address_filter(wanted_filter)?;
        self.applied = Some(applied);
        Ok(report)
    }

    /// Removes the backends `ids` (no table names them): `BACKENDS` zeroed, so conntrack entries
    /// naming them re-balance, their reply routes removed, their ids freed. Returns how many had
    /// entries (an id allocated by a failed apply before its entry was written has none).
    fn release_backends(&mut self, ids: &[(BackendAddress, u32)]) -> Result<usize> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut backends: Array<&mut MapData, Backend> =
            Array::try_from(self.ebpf.map_mut("BACKENDS").context("BACKENDS map")?)?;
        for (_, id) in ids.iter().filter(|(_, id)| self.backends.contains_key(id)) {
            backends
                .set(*id, Backend::default(), 0)
                .context("clearing BACKENDS")?;
        }
        let mut replies: HashMap<&mut MapData, ServiceKey, BackendReply> = HashMap::try_from(
            self.ebpf
                .map_mut("BACKEND_REPLY")
                .context("BACKEND_REPLY map")?,
        )?;
        let mut released = 0;
        for &(address, id) in ids {
            if let Some(removed) = self.backends.remove(&id) {
                let route = self.reply_routes.remove(&id).unwrap_or_default();
                if let Some((key, _)) = route.entry(&removed) {
                    replies
                        .remove(&key)
                        .context("removing from BACKEND_REPLY")?;
                }
                released += 1;
            }
            self.retired.remove(&id);
            self.backend_ids.remove(&address);
            self.free_backend_ids.push_back(id);
        }
        Ok(released)
    }

    /// Flags backend `id`'s `BACKENDS` entry `RETIRED`, for readers of the maps (`lbctl
    /// backends`); the datapath ignores the flag. Named again, the backend is written without it.
    fn mark_retired(&mut self, id: u32) -> Result<()> {
        let Some(mut backend) = self.backends.get(&id).copied() else {
            return Ok(());
        };
        if backend.is_retired() {
            return Ok(());
        }
        backend.flags |= backend_flags::RETIRED;
        let mut backends: Array<&mut MapData, Backend> =
            Array::try_from(self.ebpf.map_mut("BACKENDS").context("BACKENDS map")?)?;
        backends
            .set(id, backend, 0)
            .context("flagging a retired backend in BACKENDS")?;
        self.backends.insert(id, backend);
        Ok(())
    }

    /// Ids of the programmed services.
    fn programmed_service_ids(&self) -> std::collections::HashSet<u32> {
        self.services.values().map(|p| p.info.id).collect()
    }

    /// `filter` with the roles retired backends keep.
    fn with_retired_roles(&self, filter: AddressFilter) -> AddressFilter {
        self.retired.values().fold(filter, |filter, retired| {
            filter.with_roles(&Addr::from_ip(retired.address.0), retired.roles)
        })
    }

    /// Removes the retired backends no live conntrack entry names any more (see
    /// `crate::retired`); returns how many. The agent calls it about every 10 s.
    pub fn release_retired_backends(&mut self) -> Result<usize> {
        if self.retired.is_empty() {
            return Ok(0);
        }
        let live = retired::live_backend_ids(&self.ebpf, &self.programmed_service_ids())?;
        let ended: Vec<(BackendAddress, u32)> = self
            .retired
            .iter()
            .filter(|(id, _)| !live.contains(id))
            .map(|(id, retired)| (retired.address, *id))
            .collect();
        let released = self.release_backends(&ended)?;
        // Their filter roles go with them (after a failed apply the next one rewrites it whole).
        if let Some(applied) = &self.applied {
            let filter = self.with_retired_roles(applied.filter().clone());
            self.write_address_filter(filter)?;
        }
        if released > 0 {
            info!(
                released,
                "retired backends removed: their last tracked flows ended"
            );
        }
        Ok(released)
    }

    /// Addresses and ports of the retired backends (see `crate::retired`).
    pub fn retired_backends(&self) -> Vec<(IpAddr, u16)> {
        self.retired.values().map(|r| r.address).collect()
    }

    /// The next apply walks every service and backend, as after a failed one (for tests comparing
    /// an apply of changes with one of the whole config).
    pub fn redo_next_apply_in_full(&mut self) {
        self.applied = None;
    }

    /// Refuses a config the maps cannot hold, before anything is written or an id allocated, so
    /// that the last good state stays whole. `backends`: distinct backends of `config`;
    /// `leaving`: backends it no longer names, which keep their ids until no table names them
    /// (the end of the apply).
    fn check_capacity(&self, config: &Config, backends: usize, leaving: usize) -> Result<()> {
        if config.services.len() > self.capacity.services as usize {
            bail!(
                "{} services, the datapath holds {} (--max-services)",
                config.services.len(),
                self.capacity.services
            );
        }
        if backends > self.capacity.backends as usize {
            bail!(
                "{} distinct backends, the datapath holds {} (--max-backends)",
                backends,
                self.capacity.backends
            );
        }
        if backends + leaving > self.capacity.backends as usize {
            bail!(
                "{} distinct backends and {} they replace, which serve until the new tables are \
                 in place: the datapath holds {} (--max-backends; or replace them in two steps)",
                backends,
                leaving,
                self.capacity.backends
            );
        }
        Ok(())
    }

    /// Step 3 of [`Self::apply_with`]: the tables and entries of the `changed` services (config,
    /// effective weights). On an error, `pending` holds the services whose tables were not placed.
    fn program_services(
        &mut self,
        config: &Config,
        changed: &[(&Service, Vec<u32>)],
        pending: &mut PendingFlips,
        report: &mut ApplyReport,
    ) -> Result<()> {
        // Only a new service needs them; listing them walks every service.
        let mut free_ids = None;
        for &(service, ref weights) in changed {
            let key = key_of(service);
            let inputs = TableInputs {
                backends: service
                    .backends
                    .iter()
                    .zip(weights)
                    .map(|(b, &weight)| {
                        let maglev = MaglevBackend {
                            id: maglev::backend_id(b.address, b.port),
                            weight,
                        };
                        (self.backend_ids[&(b.address, b.port)], maglev)
                    })
                    .collect(),
                table_size: service.maglev_table_size,
                seed: config.maglev_seed,
            };
            let previous = self.services.get(&key);
            // Unchanged inputs: the live table stays, nothing to build or compare.
            let rebuilt = if previous.is_some_and(|p| p.inputs.as_ref() == Some(&inputs)) {
                None
            } else {
                let maglev_backends: Vec<MaglevBackend> =
                    inputs.backends.iter().map(|(_, m)| *m).collect();
                let owners = maglev::build_table(&maglev_backends, inputs.table_size, inputs.seed)
                    .with_context(|| format!("service {}: Maglev table", service.name))?;
                let table: Vec<u32> = owners
                    .iter()
                    .map(|&i| inputs.backends[i as usize].0)
                    .collect();
                Some(table)
            };
            let table_changed = match (&rebuilt, previous) {
                (None, _) => false,
                (Some(table), Some(p)) => p.table != *table,
                (Some(_), None) => true,
            };

            let id = match previous {
                Some(p) => p.info.id,
                None => free_ids
                    .get_or_insert_with(|| self.free_service_ids())
                    .next()
                    .with_context(|| {
                        format!(
                            "more than {} services (--max-services)",
                            self.capacity.services
                        )
                    })?,
            };
            let previous_info = previous.map(|p| p.info);
            let previous_mode = previous.map(|p| p.mode);
            let table_size = rebuilt.as_ref().map_or_else(
                || previous.map_or(0, |p| p.info.table_size),
                |table| table.len() as u32,
            );
            let mut info = ServiceInfo {
                id,
                table_slot: previous_info.map_or(2 * id, |p| p.table_slot),
                table_size,
                mode: mode_of(service.mode),
                flags: flags_of(service.hash),
                _pad: [0; 2],
            };
            let mut flips_table = false;
            if let Some(table) = rebuilt.as_ref().filter(|t| table_changed && !t.is_empty()) {
                // Fill a table for the spare slot; the batch flip places it.
                let spare = if previous_info.is_some() && info.table_slot == 2 * id {
                    2 * id + 1
                } else {
                    2 * id
                };
                pending.tables.push((spare, filled_table(table)?));
                info.table_slot = spare;
                flips_table = true;
                report.tables_swapped += 1;
            }
            // The mode's parameters are in place before the service entry that names the mode.
            let mode = mode_info_of(config, service);
            if previous_mode != Some(mode) {
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
            if previous_info != Some(info) {
                if flips_table {
                    pending.services.push(PendingService {
                        key,
                        name: service.name.clone(),
                        info,
                        previous: previous.cloned(),
                    });
                } else {
                    self.write_service(key, info, &service.name)?;
                }
                report.services_written += 1;
                debug!(service = %service.name, vip = %service.vip, port = service.port,
                       slots = info.table_size, "service programmed");
            }
            match self.services.get_mut(&key) {
                Some(programmed) => {
                    programmed.info = info;
                    programmed.mode = mode;
                    if let Some(table) = rebuilt {
                        programmed.table = table;
                    }
                    programmed.inputs = Some(inputs);
                }
                None => {
                    let programmed = ProgrammedService {
                        info,
                        table: rebuilt.unwrap_or_default(),
                        inputs: Some(inputs),
                        mode,
                    };
                    self.services.insert(key, programmed);
                }
            }
            if pending.tables.len() >= TABLE_FLIP_BATCH {
                self.flip_tables(pending)?;
            }
        }
        self.flip_tables(pending)
    }

    /// Places the pending tables into `MAGLEV_TABLES` with one batch update, then writes the
    /// service entries that name them. Services not written on a failure get their previous
    /// bookkeeping back, as the maps still hold their previous state.
    fn flip_tables(&mut self, pending: &mut PendingFlips) -> Result<()> {
        let tables = std::mem::take(&mut pending.tables);
        let mut services = std::mem::take(&mut pending.services).into_iter();
        let mut result = self.place_tables(&tables);
        if result.is_ok() {
            for service in services.by_ref() {
                result = self.write_service(service.key, service.info, &service.name);
                if result.is_err() {
                    self.restore(service);
                    break;
                }
            }
        }
        for service in services {
            self.restore(service);
        }
        result
    }

    fn place_tables(&mut self, tables: &[(u32, Array<MapData, u32>)]) -> Result<()> {
        if tables.is_empty() {
            return Ok(());
        }
        let outer = self
            .ebpf
            .map("MAGLEV_TABLES")
            .context("MAGLEV_TABLES map")?;
        let aya::maps::Map::ArrayOfMaps(outer) = outer else {
            bail!("MAGLEV_TABLES is not an array of maps");
        };
        let entries: Vec<(u32, &MapData)> = tables
            .iter()
            .map(|(slot, table)| (*slot, table.map()))
            .collect();
        map_batch::place_inner_maps(outer, &entries).context("installing Maglev tables")
    }

    /// Puts back the bookkeeping of a service whose new table or entry was not written.
    fn restore(&mut self, service: PendingService) {
        match service.previous {
            Some(previous) => self.services.insert(service.key, previous),
            None => self.services.remove(&service.key),
        };
    }

    /// Writes a service's `SERVICE_SLOTS` and `SERVICES` entries.
    fn write_service(&mut self, key: ServiceKey, info: ServiceInfo, name: &str) -> Result<()> {
        self.write_service_slot(info.id, ServiceSlot { key, info })?;
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceInfo> =
            HashMap::try_from(self.ebpf.map_mut("SERVICES").context("SERVICES map")?)?;
        services.insert(key, info, 0).with_context(|| {
            format!(
                "writing SERVICES for {name} (map full? {} services max)",
                self.capacity.services
            )
        })
    }

    /// Writes `SERVICE_SLOTS[id]`: the service tracked flows of that id find (zero: none).
    fn write_service_slot(&mut self, id: u32, slot: ServiceSlot) -> Result<()> {
        let mut slots: Array<&mut MapData, ServiceSlot> = Array::try_from(
            self.ebpf
                .map_mut("SERVICE_SLOTS")
                .context("SERVICE_SLOTS map")?,
        )?;
        slots.set(id, slot, 0).context("writing SERVICE_SLOTS")
    }

    /// With pins: copies the pinned filter's words (those an earlier agent's program reads) into
    /// this load's filter, before any of its programs is attached, and pins this load's filter in
    /// its place (see `crate::prefilter`). The bookkeeping stays `None`, so the first apply still
    /// rewrites every word.
    fn carry_over_address_filter(&mut self, adopt: bool) -> Result<()> {
        let Some(pins) = &self.pins else {
            return Ok(());
        };
        let path = pins.map(AddressFilter::PIN_NAME);
        if adopt && path.exists() {
            let pinned =
                MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            let pinned: Array<MapData, prefilter::Words> =
                Array::try_from(aya::maps::Map::from_map_data(pinned)?)
                    .with_context(|| format!("{} is not an address filter", path.display()))?;
            let words = AddressFilter::read(&pinned)?;
            let mut map: Array<&mut MapData, prefilter::Words> = Array::try_from(
                self.ebpf
                    .map_mut(AddressFilter::MAP)
                    .context("address filter map")?,
            )?;
            words.write(&mut map)?;
        }
        pins::remove_if_present(&path)?;
        self.ebpf
            .map(AddressFilter::MAP)
            .context("address filter map")?
            .pin(&path)
            .with_context(|| format!("pinning {}", path.display()))
    }

    /// Makes the filter map hold `filter` (written only when it changes).
    fn write_address_filter(&mut self, filter: AddressFilter) -> Result<()> {
        if self.address_filter.as_ref() == Some(&filter) {
            return Ok(());
        }
        let mut map: Array<&mut MapData, prefilter::Words> = Array::try_from(
            self.ebpf
                .map_mut(AddressFilter::MAP)
                .context("address filter map")?,
        )?;
        filter.write(&mut map)?;
        self.address_filter = Some(filter);
        Ok(())
    }

    /// The prefilter roles (`lb_common::prefilter::role` bits) the datapath holds for `address`.
    pub fn address_filter_roles(&self, address: IpAddr) -> Result<u8> {
        let map: Array<&MapData, prefilter::Words> = Array::try_from(
            self.ebpf
                .map(AddressFilter::MAP)
                .context("address filter map")?,
        )?;
        Ok(AddressFilter::read(&map)?.roles_of(&Addr::from_ip(address)))
    }

    fn backend_id_for(&mut self, address: IpAddr, port: u16) -> Result<u32> {
        if let Some(id) = self.backend_ids.get(&(address, port)) {
            return Ok(*id);
        }
        let id = match self.free_backend_ids.pop_front() {
            Some(id) => id,
            None if self.next_backend_id <= self.capacity.backends => {
                self.next_backend_id += 1;
                self.next_backend_id - 1
            }
            None => bail!(
                "more than {} backends in total: BACKENDS is full (--max-backends)",
                self.capacity.backends
            ),
        };
        self.backend_ids.insert((address, port), id);
        Ok(id)
    }

    /// Service ids no programmed service holds, lowest first.
    fn free_service_ids(&self) -> std::vec::IntoIter<u32> {
        let used: std::collections::BTreeSet<u32> =
            self.services.values().map(|p| p.info.id).collect();
        (0..self.capacity.services)
            .filter(|id| !used.contains(id))
            .collect::<Vec<u32>>()
            .into_iter()
    }

    /// How many services and backends the maps hold.
    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// Services in the maps (after adopting pinned maps: those an earlier agent programmed).
    pub fn programmed_services(&self) -> usize {
        self.services.len()
    }

    /// The programmed services read back as config services, for `ListState` while the services
    /// an earlier agent pinned wait for their sources (`crate::agent`). Only what the maps keep:
    /// names are `pinned-<service id>`; each backend's weight is the number of live table slots it
    /// holds (its share of new flows), so backends without slots (drained) are left out; no
    /// health checks; `snat_address` is the SNAT source address in use.
    pub fn programmed_services_read_back(&self) -> Vec<Service> {
        self.services
            .iter()
            .filter_map(|(key, programmed)| {
                let protocol = match key.protocol {
                    protocol::TCP => crate::config::Protocol::Tcp,
                    protocol::UDP => crate::config::Protocol::Udp,
                    _ => return None,
                };
                let mode = match programmed.info.mode {
                    mode::SNAT => ForwardingMode::Snat,
                    mode::DSR_L2 => ForwardingMode::DsrL2,
                    mode::DSR_IPIP => ForwardingMode::DsrIpip,
                    _ => ForwardingMode::Dnat,
                };
                let hash = if programmed.info.flags & service_flags::HASH_SOURCE_IP != 0 {
                    HashFields::SourceIp
                } else {
                    HashFields::FiveTuple
                };
                let mut slots: BTreeMap<(IpAddr, u16), u32> = BTreeMap::new();
                for backend in programmed
                    .table
                    .iter()
                    .filter_map(|id| self.backends.get(id))
                {
                    *slots
                        .entry((backend.ip(), backend.port_host()))
                        .or_default() += 1;
                }
                Some(Service {
                    name: format!("pinned-{}", programmed.info.id),
                    vip: key.vip(),
                    port: key.port_host(),
                    protocol,
                    mode,
                    snat_address: (mode == ForwardingMode::Snat && programmed.mode.has_source())
                        .then(|| programmed.mode.source.to_ip(key.family)),
                    hash,
                    maglev_table_size: programmed.info.table_size,
                    backends: slots
                        .into_iter()
                        .map(|((address, port), weight)| crate::config::BackendConfig {
                            address,
                            port,
                            weight,
                        })
                        .collect(),
                    health_check: None,
                })
            })
            .collect()
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
        let existed = if flow.family == family::IPV4 {
            let mut conntrack: HashMap<&mut MapData, FlowKeyV4, ConntrackEntry> =
                HashMap::try_from(
                    self.ebpf
                        .map_mut("CONNTRACK_V4")
                        .context("CONNTRACK_V4 map")?,
                )?;
            conntrack.remove(&FlowKeyV4::of(flow)).is_ok()
        } else {
            let mut conntrack: HashMap<&mut MapData, FlowKey, ConntrackEntry> = HashMap::try_from(
                self.ebpf
                    .map_mut("CONNTRACK_V6")
                    .context("CONNTRACK_V6 map")?,
            )?;
            conntrack.remove(flow).is_ok()
        };
        let mut replies: HashMap<&mut MapData, FlowKey, NatReply> =
            HashMap::try_from(self.ebpf.map_mut("NAT_REPLY").context("NAT_REPLY map")?)?;
        let _ = replies.remove(reply);
        Ok(existed)
    }

    /// Number of tracked flows, both families (see [`Datapath::conntrack_fill`]).
    pub fn conntrack_entries(&self) -> Result<u64> {
        Ok(self.conntrack_fill()?.iter().map(|t| t.entries).sum())
    }

    /// Live entries and capacity of `CONNTRACK_V4` and `CONNTRACK_V6`, in that order. Walks the
    /// keys: about one syscall per entry, so call it every few seconds, not per packet or per
    /// scrape.
    pub fn conntrack_fill(&self) -> Result<[TableFill; 2]> {
        let v4: HashMap<&MapData, FlowKeyV4, ConntrackEntry> =
            HashMap::try_from(self.ebpf.map("CONNTRACK_V4").context("CONNTRACK_V4 map")?)?;
        let v6: HashMap<&MapData, FlowKey, ConntrackEntry> =
            HashMap::try_from(self.ebpf.map("CONNTRACK_V6").context("CONNTRACK_V6 map")?)?;
        Ok([
            TableFill {
                map: "CONNTRACK_V4",
                entries: v4.keys().filter(|k| k.is_ok()).count() as u64,
                capacity: v4.map().info()?.max_entries(),
            },
            TableFill {
                map: "CONNTRACK_V6",
                entries: v6.keys().filter(|k| k.is_ok()).count() as u64,
                capacity: v6.map().info()?.max_entries(),
            },
        ])
    }

    /// Number of per-flow reply translations (`NAT_REPLY` entries: SNAT flows and DNAT flows to
    /// backends several frontends share; DSR writes none).
    /// Walks the keys, like [`Datapath::conntrack_entries`].
    pub fn nat_reply_entries(&self) -> Result<u64> {
        let replies: HashMap<&MapData, FlowKey, NatReply> =
            HashMap::try_from(self.ebpf.map("NAT_REPLY").context("NAT_REPLY map")?)?;
        Ok(replies.keys().filter(|k| k.is_ok()).count() as u64)
    }

    /// Sum over CPUs of every datapath counter.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        read_counters(&self.ebpf)
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

/// The pin directory made ready for a load.
struct PreparedPins {
    lock: std::fs::File,
    /// Whether pinned maps are reused (their contents then tell the bookkeeping).
    adopt: bool,
    /// Where the loader finds or pins each map of the object.
    map_paths: Vec<(String, PathBuf)>,
    /// Pinned maps of another size, carried over into new ones (`crate::resize`).
    resized: Vec<String>,
    /// Transient pinned maps of another definition, replaced by empty ones.
    recreated: Vec<String>,
}

/// Locks the pin directory and decides what to do with what it holds: start fresh, adopt it,
/// replace it (if incompatible and asked to) or refuse with every reason.
/// A new inner map holding `table`, complete before any packet can see it.
fn filled_table(table: &[u32]) -> Result<Array<MapData, u32>> {
    let inner: Array<MapData, u32> = Array::create(table.len() as u32, BPF_F_INNER_MAP)
        .context("creating a Maglev table map")?;
    map_batch::write_array(&inner, table).context("filling a Maglev table")?;
    Ok(inner)
}

fn prepare_pins(
    pins: &PinDir,
    options: &PinOptions,
    max_entries: &[(&str, u32)],
) -> Result<PreparedPins> {
    let wanted = pins::object_maps(EBPF_OBJECT, max_entries)?;
    let claim = pins.claim(
        &wanted,
        &TRANSIENT_MAPS,
        options.replace_incompatible_state,
        "datapath",
    )?;
    // A resized or recreated map is created by the load and pinned once the new programs are
    // attached.
    let map_paths = wanted
        .into_iter()
        .filter(|(name, _)| !claim.resized.contains(name) && !claim.recreated.contains(name))
        .map(|(name, _)| {
            let path = pins.map(&name);
            (name, path)
        })
        .collect();
    Ok(PreparedPins {
        lock: claim.lock,
        adopt: claim.adopt,
        map_paths,
        resized: claim.resized,
        recreated: claim.recreated,
    })
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

/// Every counter of the `COUNTERS` map of `ebpf` (the balancer's or `lb_decap`'s object), summed
/// over CPUs.
pub(crate) fn read_counters(ebpf: &Ebpf) -> Result<Vec<(Counter, u64)>> {
    sum_counters(&PerCpuArray::try_from(
        ebpf.map("COUNTERS").context("COUNTERS map")?,
    )?)
}

/// Every counter of the `COUNTERS` map `counters`, summed over CPUs (also for a pinned map:
/// `crate::inspect`).
pub(crate) fn sum_counters(
    counters: &PerCpuArray<impl std::borrow::Borrow<MapData>, u64>,
) -> Result<Vec<(Counter, u64)>> {
    Counter::ALL
        .iter()
        .map(|c| {
            let per_cpu = counters.get(&(*c as u32), 0)?;
            Ok((*c, per_cpu.iter().sum()))
        })
        .collect()
}
