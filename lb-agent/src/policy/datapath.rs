//! The kernel side of policy: loads the TC policy programs from the embedded object, attaches them
//! to workload interfaces, writes compiled rule sets with the epoch swap of `lb_common::policy`, and
//! drains verdict events and counters.
//!
//! A rule set is written completely under the inactive epoch, then made live by one store to
//! `POLICY_STATE`, then the previous epoch's entries are deleted. If writing fails (a map full,
//! above all) the partial new epoch is deleted again and the error returned: the live rule set never
//! changed. Capacity is checked against `lb_common::policy::limits` before anything is written.
//!
//! With a pin directory (`PolicyLoadOptions::pins`; layout in `crate::pins`, under `policy/`) the
//! maps, programs and tcx links are pinned: enforcement and its state (`POLICY_CONNTRACK`, the live
//! epoch, counters) outlive the agent, and the next load adopts the maps, reads back the live rule
//! set ([`PolicyDatapath::live`]) and puts its programs into the pinned links with
//! `BPF_LINK_UPDATE` (no moment without a program).
//!
//! The XDP CIDR deny list lives in the balancer's object (`lb_xdp` reads it), so its writer,
//! [`write_cidr_deny`], takes that object's [`Ebpf`].

use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData, PerCpuArray, RingBuf,
    },
    programs::{
        links::{FdLink, LinkOrder, PinnedLink},
        tc::{self, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions},
        ProgramId, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{
    policy::{
        counter_index, limits, state_limits, CachedDecision, DecisionKey, Direction, EndpointInfo,
        IpKeyV4, IpKeyV6, IpcacheEntry, Lpm, PolicyEntry, PolicyKey, PolicyState, Reason, Verdict,
        VerdictEvent, EVENTS_LOST_SLOT,
    },
    service::{family, Addr},
};

use tracing::{info, warn};

use super::{compile::CompiledPolicy, model::Cidr};
use crate::{
    datapath::{PinOptions, EBPF_OBJECT, TC_REQUEST_PROGRAM},
    pins::{self, PinDir},
};

/// Packets a workload sends (attached at TC ingress of its host-side veth): its egress.
pub const FROM_ENDPOINT_PROGRAM: &str = "policy_from_endpoint";
/// Packets going into a workload (TC egress of its host-side veth): its ingress.
pub const TO_ENDPOINT_PROGRAM: &str = "policy_to_endpoint";
/// A TC program that only passes: the baseline of the policy benchmark.
pub const TC_PASS_PROGRAM: &str = "tc_pass";
/// Load-time global of the TC programs: report allows too.
const REPORT_ALLOWS_GLOBAL: &str = "POLICY_REPORT_ALLOWS";
/// Load-time global of the TC programs: use the `POLICY_DECISIONS` cache.
const DECISION_CACHE_GLOBAL: &str = "POLICY_DECISION_CACHE";
/// Load-time global of `lb_xdp`: a CIDR deny list is configured.
pub const XDP_CIDR_DENY_GLOBAL: &str = "POLICY_XDP_CIDR_DENY";

/// Load-time settings.
#[derive(Debug, Clone)]
pub struct PolicyLoadOptions {
    /// Report allowed packets as well as denials and audits (every packet: for debugging).
    pub report_allows: bool,
    /// Entries of the `POLICY_CONNTRACK` LRU map.
    pub conntrack_entries: u32,
    /// `max_entries` of the `POLICY` trie (both epochs); below the default only to test a full map.
    pub policy_map_entries: u32,
    /// Cache rule outcomes in `POLICY_DECISIONS` (off only to measure the lookups themselves).
    pub decision_cache: bool,
    /// Pin under `<dir>/policy` and adopt what is pinned there; `None`: everything goes with the
    /// `PolicyDatapath`.
    pub pins: Option<PinOptions>,
}

impl Default for PolicyLoadOptions {
    fn default() -> Self {
        Self {
            report_allows: false,
            conntrack_entries: state_limits::CONNTRACK_ENTRIES,
            policy_map_entries: limits::POLICY_MAP_ENTRIES,
            decision_cache: true,
            pins: None,
        }
    }
}

/// A verdict event, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyEvent {
    /// Monotonic clock (`CLOCK_MONOTONIC`, since boot) of the check.
    pub timestamp_ns: u64,
    /// `None` for packets refused before their addresses were read (e.g. malformed).
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub direction: Direction,
    pub verdict: Verdict,
    pub reason: Reason,
    pub epoch: u8,
    pub endpoint_identity: u32,
    pub peer_identity: u32,
    /// Rule id in the rule table of `epoch` (`CompiledPolicy::rule`); 0 for none.
    pub rule_id: u32,
}

impl PolicyEvent {
    /// Decodes a `VerdictEvent`; `None` if a field holds a value no datapath writes.
    pub fn decode(e: &VerdictEvent) -> Option<Self> {
        let addr = |words: [u32; 4]| match e.family {
            family::IPV4 | family::IPV6 => Some(Addr(words).to_ip(e.family)),
            _ => None,
        };
        Some(Self {
            timestamp_ns: e.timestamp_ns,
            src: addr(e.src_addr),
            dst: addr(e.dst_addr),
            src_port: u16::from_be(e.src_port),
            dst_port: u16::from_be(e.dst_port),
            protocol: e.protocol,
            direction: match e.direction {
                0 => Direction::Ingress,
                1 => Direction::Egress,
                _ => return None,
            },
            verdict: *Verdict::ALL.get(e.verdict as usize)?,
            reason: Reason::from_u8(e.reason)?,
            epoch: e.epoch,
            endpoint_identity: e.endpoint_identity,
            peer_identity: e.peer_identity,
            rule_id: e.rule_id,
        })
    }
}

/// How a program is attached to one interface.
enum Attachment {
    /// Detached by [`PolicyDatapath::detach`] and on drop.
    Owned(SchedClassifierLinkId),
    /// A pinned tcx link: stays attached until its pin is removed.
    Pinned,
}

/// The programs and the hook each one attaches to: the workload's egress at TC ingress of its
/// host-side veth, its ingress at TC egress.
const HOOKS: [(&str, TcAttachType, &str); 2] = [
    (FROM_ENDPOINT_PROGRAM, TcAttachType::Ingress, "ingress"),
    (TO_ENDPOINT_PROGRAM, TcAttachType::Egress, "egress"),
];

/// The loaded policy programs and their maps. Dropping it detaches the programs and frees the maps,
/// unless they are pinned.
pub struct PolicyDatapath {
    ebpf: Ebpf,
    events: RingBuf<MapData>,
    attached: Vec<(String, &'static str, Attachment)>,
    /// The live epoch and the rule set written under it (after adopting pinned maps: their entries,
    /// without rule and identity descriptions).
    epoch: u8,
    live: CompiledPolicy,
    pins: Option<PinDir>,
    /// Whether the maps were adopted from pins.
    adopted: bool,
    /// Held while this datapath lives: one agent per pin directory.
    _pin_lock: Option<std::fs::File>,
}

impl PolicyDatapath {
    pub fn load(options: &PolicyLoadOptions) -> Result<Self> {
        let report_allows = options.report_allows as u32;
        let decision_cache = options.decision_cache as u32;
        let max_entries = [
            ("POLICY_CONNTRACK", options.conntrack_entries),
            ("POLICY", options.policy_map_entries),
            // The balancer's state is not used by the policy programs: keep it small.
            ("CONNTRACK_V4", 1),
            ("CONNTRACK_V6", 1),
            ("NAT_REPLY", 1),
            ("BACKEND_REPLY", 1),
            ("FRAGMENTS", 1),
            // Unused by the policy programs too: one page.
            ("FLOW_EVENTS", 1),
        ];
        let mut loader = EbpfLoader::new();
        loader
            .override_global(REPORT_ALLOWS_GLOBAL, &report_allows, true)
            .override_global(DECISION_CACHE_GLOBAL, &decision_cache, true);
        for (name, entries) in max_entries {
            loader.map_max_entries(name, entries);
        }
        let pins = options.pins.as_ref().map(|p| PinDir::new(&p.dir).policy());
        let mut pin_lock = None;
        let mut map_paths = Vec::new();
        if let (Some(pins), Some(options)) = (&pins, &options.pins) {
            let wanted = pins::object_maps(EBPF_OBJECT, &max_entries)?;
            let claim = pins.claim(
                &wanted,
                &[],
                options.replace_incompatible_state,
                "policy datapath",
            )?;
            // Its map sizes are compiled in: another size is another agent's layout.
            anyhow::ensure!(
                claim.resized.is_empty(),
                "pinned policy maps {:?} have other sizes than this agent's; restart with \
                 --replace-incompatible-state to replace them",
                claim.resized
            );
            pin_lock = Some((claim.lock, claim.adopt));
            map_paths = wanted
                .into_iter()
                .map(|(name, _)| {
                    let path = pins.map(&name);
                    (name, path)
                })
                .collect();
        }
        for (name, path) in &map_paths {
            loader.map_pin_path(name.as_str(), path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        for name in [FROM_ENDPOINT_PROGRAM, TO_ENDPOINT_PROGRAM] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("{name} missing from the object"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("loading {name} (verifier)"))?;
            if let Some(pins) = &pins {
                let path = pins.program(name);
                let _ = std::fs::remove_file(&path);
                program
                    .pin(&path)
                    .with_context(|| format!("pinning {}", path.display()))?;
            }
        }
        let events = RingBuf::try_from(
            ebpf.take_map("POLICY_EVENTS")
                .context("POLICY_EVENTS missing")?,
        )?;
        let mut datapath = Self {
            ebpf,
            events,
            attached: Vec::new(),
            epoch: 0,
            live: CompiledPolicy::default(),
            pins,
            adopted: pin_lock.as_ref().is_some_and(|(_, adopt)| *adopt),
            _pin_lock: pin_lock.map(|(lock, _)| lock),
        };
        if datapath.adopted {
            datapath.adopt_live_rule_set()?;
        }
        Ok(datapath)
    }

    /// Whether pinned policy maps were adopted (their rule set is [`Self::live`]).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Reads the live epoch and its entries back from adopted maps, so that an unchanged rule set
    /// is not written again; deletes what the inactive epoch holds (a swap cut short by the end of
    /// the previous agent), which the next swap would otherwise make live.
    fn adopt_live_rule_set(&mut self) -> Result<()> {
        let state: Array<_, PolicyState> =
            Array::try_from(self.ebpf.map("POLICY_STATE").context("POLICY_STATE")?)?;
        let epoch = state.get(&0, 0).context("reading POLICY_STATE")?.epoch;
        if epoch > 1 {
            bail!("POLICY_STATE names epoch {epoch}; only 0 and 1 exist");
        }
        let epoch = epoch as u8;
        let [live, stale] = [epoch, 1 - epoch].map(|e| self.read_epoch(e));
        let (live, stale) = (live?, stale?);
        self.delete_epoch(&stale, 1 - epoch);
        info!(
            epoch,
            endpoints = live.endpoints_v4.len() + live.endpoints_v6.len(),
            ipcache = live.ipcache_v4.len() + live.ipcache_v6.len(),
            policy = live.policy.len(),
            stale_entries = stale.entries(),
            "adopted the pinned policy rule set"
        );
        self.epoch = epoch;
        self.live = live;
        Ok(())
    }

    /// The ipcache, endpoint and policy entries the kernel holds under `epoch`, keyed as the
    /// compiler keys them (epoch 0), rules and identities left empty: equal to the
    /// [`CompiledPolicy`] written under it, whatever the maps held before.
    pub fn read_epoch(&self, epoch: u8) -> Result<CompiledPolicy> {
        let map = |name: &str| {
            self.ebpf
                .map(name)
                .with_context(|| format!("{name} missing"))
        };
        let mut out = CompiledPolicy::default();
        for entry in LpmTrie::<_, IpKeyV4, IpcacheEntry>::try_from(map("IPCACHE_V4")?)?.iter() {
            let (k, v) = entry.context("reading IPCACHE_V4")?;
            if k.data().epoch == epoch {
                out.ipcache_v4.insert(
                    from_key(
                        &k,
                        IpKeyV4 {
                            epoch: 0,
                            ..k.data()
                        },
                    ),
                    v,
                );
            }
        }
        for entry in LpmTrie::<_, IpKeyV6, IpcacheEntry>::try_from(map("IPCACHE_V6")?)?.iter() {
            let (k, v) = entry.context("reading IPCACHE_V6")?;
            if k.data().epoch == epoch {
                out.ipcache_v6.insert(
                    from_key(
                        &k,
                        IpKeyV6 {
                            epoch: 0,
                            ..k.data()
                        },
                    ),
                    v,
                );
            }
        }
        for entry in LpmTrie::<_, PolicyKey, PolicyEntry>::try_from(map("POLICY")?)?.iter() {
            let (k, v) = entry.context("reading POLICY")?;
            if k.data().epoch == epoch {
                out.policy.insert(
                    from_key(
                        &k,
                        PolicyKey {
                            epoch: 0,
                            ..k.data()
                        },
                    ),
                    v,
                );
            }
        }
        for entry in HashMap::<_, IpKeyV4, EndpointInfo>::try_from(map("ENDPOINTS_V4")?)?.iter() {
            let (k, v) = entry.context("reading ENDPOINTS_V4")?;
            if k.epoch == epoch {
                out.endpoints_v4.insert(IpKeyV4 { epoch: 0, ..k }, v);
            }
        }
        for entry in HashMap::<_, IpKeyV6, EndpointInfo>::try_from(map("ENDPOINTS_V6")?)?.iter() {
            let (k, v) = entry.context("reading ENDPOINTS_V6")?;
            if k.epoch == epoch {
                out.endpoints_v6.insert(IpKeyV6 { epoch: 0, ..k }, v);
            }
        }
        Ok(out)
    }

    /// Takes `compiled`'s rule and identity descriptions for the rule set in force, whose entries
    /// it equals (see [`CompiledPolicy::same_entries`]): after adopting pinned maps, verdicts are
    /// described without writing anything.
    pub fn describe_live(&mut self, compiled: &CompiledPolicy) {
        debug_assert!(compiled.same_entries(&self.live));
        self.live = compiled.clone();
    }

    /// A loaded policy program by name ([`FROM_ENDPOINT_PROGRAM`], [`TO_ENDPOINT_PROGRAM`], or
    /// [`TC_PASS_PROGRAM`], loaded on first use), e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing from the object"))?
            .try_into()?;
        if program.fd().is_err() {
            program.load()?;
        }
        Ok(program)
    }

    /// Attaches both programs to the host side of a workload's veth (tcx, or clsact on kernels
    /// before 6.6). With pins, a pinned link of the interface gets this program atomically (no
    /// moment without one) and a new link is pinned.
    pub fn attach(&mut self, interface: &str) -> Result<()> {
        // Needed before tcx (kernel 6.6), harmless after; EEXIST: the qdisc is there already.
        let _ = tc::qdisc_add_clsact(interface);
        for (name, attach_type, direction) in HOOKS {
            let attachment = match self.pins.clone() {
                None => Attachment::Owned(attach_first(
                    self.program(name)?,
                    name,
                    interface,
                    attach_type,
                )?),
                Some(pins) => {
                    self.attach_pinned(
                        name,
                        interface,
                        attach_type,
                        &pins.tc_link(interface, direction),
                    )?;
                    Attachment::Pinned
                }
            };
            self.attached
                .push((interface.to_string(), name, attachment));
        }
        Ok(())
    }

    /// Puts program `name` into the pinned link at `path`, or attaches it anew and pins the link
    /// there (see [`pins::replace_or_attach_pinned`]).
    fn attach_pinned(
        &mut self,
        name: &str,
        interface: &str,
        attach_type: TcAttachType,
        path: &std::path::Path,
    ) -> Result<()> {
        pins::replace_or_attach_pinned(
            self,
            path,
            interface,
            // The link's path names the interface and direction, hence the program.
            "tcx",
            |this| {
                let link: FdLink = PinnedLink::from_pin(path)?.into();
                let program = this.program(name)?;
                let id = program.attach_to_link(SchedClassifierLink::try_from(link)?)?;
                // The pin keeps the link; dropping our descriptor does not detach it.
                drop(program.take_link(id)?);
                Ok(())
            },
            |this| {
                let program = this.program(name)?;
                let id = attach_first(program, name, interface, attach_type)?;
                FdLink::try_from(program.take_link(id)?).with_context(|| {
                    format!(
                        "{name} on {interface} is attached through netlink, which cannot be pinned"
                    )
                })
            },
        )
    }

    /// Detaches every program from `interface`, pinned links included (also those of an earlier
    /// agent).
    pub fn detach(&mut self, interface: &str) {
        let (gone, kept) = std::mem::take(&mut self.attached)
            .into_iter()
            .partition(|(i, _, _)| i == interface);
        self.attached = kept;
        for (_, name, attachment) in gone {
            if let (Attachment::Owned(link), Ok(program)) = (attachment, self.program(name)) {
                let _ = program.detach(link);
            }
        }
        if let Some(pins) = &self.pins {
            for (_, _, direction) in HOOKS {
                let path = pins.tc_link(interface, direction);
                if let Err(err) = std::fs::remove_file(&path) {
                    if err.kind() != std::io::ErrorKind::NotFound {
                        warn!(link = %path.display(), error = %err, "removing a pinned tcx link");
                    }
                }
            }
        }
    }

    /// Interfaces with a pinned link (of this or an earlier agent).
    pub fn pinned_interfaces(&self) -> Result<Vec<String>> {
        let Some(pins) = &self.pins else {
            return Ok(Vec::new());
        };
        let mut interfaces: Vec<String> = pins
            .tc_linked_interfaces()?
            .into_iter()
            .map(|(interface, _)| interface)
            .collect();
        interfaces.dedup();
        Ok(interfaces)
    }

    /// The live epoch.
    pub fn epoch(&self) -> u8 {
        self.epoch
    }

    /// The rule set in force.
    pub fn live(&self) -> &CompiledPolicy {
        &self.live
    }

    /// Makes `compiled` the rule set in force, atomically for every packet. On error the previous
    /// rule set stays in force, unchanged.
    pub fn apply(&mut self, compiled: &CompiledPolicy) -> Result<()> {
        if let Err(e) = compiled.check_capacity() {
            bail!("{}; the previous rule set stays in force", e.message);
        }
        let next = 1 - self.epoch;
        // Outcomes cached under this epoch number belong to the rule set before the previous one;
        // no packet looks them up until the flip.
        let written = self
            .write_epoch(compiled, next)
            .and_then(|()| self.forget_decisions(next));
        if let Err(e) = written {
            self.delete_epoch(compiled, next);
            return Err(e.context("writing the new policy epoch; the previous one stays in force"));
        }
        let mut state: Array<_, PolicyState> = Array::try_from(self.map_mut("POLICY_STATE")?)?;
        state
            .set(0, PolicyState { epoch: next as u32 }, 0)
            .context("switching the policy epoch")?;
        let old = std::mem::replace(&mut self.live, compiled.clone());
        let old_epoch = std::mem::replace(&mut self.epoch, next);
        self.delete_epoch(&old, old_epoch);
        Ok(())
    }

    /// Deletes the cached rule outcomes of `epoch`.
    fn forget_decisions(&mut self, epoch: u8) -> Result<()> {
        let mut cache: HashMap<_, DecisionKey, CachedDecision> =
            HashMap::try_from(self.map_mut("POLICY_DECISIONS")?)?;
        let stale: Vec<DecisionKey> = cache
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.epoch == epoch)
            .collect();
        for k in stale {
            // Already evicted is fine.
            let _ = cache.remove(&k);
        }
        Ok(())
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf
            .map_mut(name)
            .with_context(|| format!("{name} missing from the object"))
    }

    fn write_epoch(&mut self, compiled: &CompiledPolicy, epoch: u8) -> Result<()> {
        let mut ipcache_v4: LpmTrie<_, IpKeyV4, IpcacheEntry> =
            LpmTrie::try_from(self.map_mut("IPCACHE_V4")?)?;
        for (k, v) in &compiled.ipcache_v4 {
            let key = lpm(k, IpKeyV4 { epoch, ..k.data });
            ipcache_v4.insert(&key, v, 0).context("IPCACHE_V4")?;
        }
        let mut ipcache_v6: LpmTrie<_, IpKeyV6, IpcacheEntry> =
            LpmTrie::try_from(self.map_mut("IPCACHE_V6")?)?;
        for (k, v) in &compiled.ipcache_v6 {
            let key = lpm(k, IpKeyV6 { epoch, ..k.data });
            ipcache_v6.insert(&key, v, 0).context("IPCACHE_V6")?;
        }
        let mut policy: LpmTrie<_, PolicyKey, PolicyEntry> =
            LpmTrie::try_from(self.map_mut("POLICY")?)?;
        for (k, v) in &compiled.policy {
            let key = lpm(k, PolicyKey { epoch, ..k.data });
            policy.insert(&key, v, 0).context("POLICY")?;
        }
        // Endpoints last: an endpoint is never visible before its policy (within the epoch, which
        // is not live yet anyway).
        let mut endpoints_v4: HashMap<_, IpKeyV4, EndpointInfo> =
            HashMap::try_from(self.map_mut("ENDPOINTS_V4")?)?;
        for (k, v) in &compiled.endpoints_v4 {
            endpoints_v4
                .insert(IpKeyV4 { epoch, ..*k }, v, 0)
                .context("ENDPOINTS_V4")?;
        }
        let mut endpoints_v6: HashMap<_, IpKeyV6, EndpointInfo> =
            HashMap::try_from(self.map_mut("ENDPOINTS_V6")?)?;
        for (k, v) in &compiled.endpoints_v6 {
            endpoints_v6
                .insert(IpKeyV6 { epoch, ..*k }, v, 0)
                .context("ENDPOINTS_V6")?;
        }
        Ok(())
    }

    /// Deletes `compiled`'s entries under `epoch`; missing ones are fine (a partial write).
    fn delete_epoch(&mut self, compiled: &CompiledPolicy, epoch: u8) {
        macro_rules! delete {
            ($map:literal, $ty:ty, $entries:expr, $key:expr) => {
                if let Ok(map) = self.map_mut($map) {
                    if let Ok(mut map) = <$ty>::try_from(map) {
                        for k in $entries.keys() {
                            let _ = map.remove(&$key(k));
                        }
                    }
                }
            };
        }
        delete!(
            "ENDPOINTS_V4",
            HashMap<_, IpKeyV4, EndpointInfo>,
            compiled.endpoints_v4,
            |k: &IpKeyV4| IpKeyV4 { epoch, ..*k }
        );
        delete!(
            "ENDPOINTS_V6",
            HashMap<_, IpKeyV6, EndpointInfo>,
            compiled.endpoints_v6,
            |k: &IpKeyV6| IpKeyV6 { epoch, ..*k }
        );
        delete!(
            "IPCACHE_V4",
            LpmTrie<_, IpKeyV4, IpcacheEntry>,
            compiled.ipcache_v4,
            |k: &Lpm<IpKeyV4>| lpm(k, IpKeyV4 { epoch, ..k.data })
        );
        delete!(
            "IPCACHE_V6",
            LpmTrie<_, IpKeyV6, IpcacheEntry>,
            compiled.ipcache_v6,
            |k: &Lpm<IpKeyV6>| lpm(k, IpKeyV6 { epoch, ..k.data })
        );
        delete!(
            "POLICY",
            LpmTrie<_, PolicyKey, PolicyEntry>,
            compiled.policy,
            |k: &Lpm<PolicyKey>| lpm(k, PolicyKey { epoch, ..k.data })
        );
    }

    /// Entries of the verdict-affecting maps (ipcache, endpoints, policy) per epoch: after a swap
    /// the inactive epoch holds none.
    pub fn entries_per_epoch(&self) -> Result<[usize; 2]> {
        let mut counts = [0usize; 2];
        let mut add = |epoch: u8| {
            if let Some(c) = counts.get_mut(epoch as usize) {
                *c += 1;
            }
        };
        let map = |name: &str| {
            self.ebpf
                .map(name)
                .with_context(|| format!("{name} missing"))
        };
        for k in LpmTrie::<_, IpKeyV4, IpcacheEntry>::try_from(map("IPCACHE_V4")?)?.keys() {
            add(k?.data().epoch);
        }
        for k in LpmTrie::<_, IpKeyV6, IpcacheEntry>::try_from(map("IPCACHE_V6")?)?.keys() {
            add(k?.data().epoch);
        }
        for k in LpmTrie::<_, PolicyKey, PolicyEntry>::try_from(map("POLICY")?)?.keys() {
            add(k?.data().epoch);
        }
        for k in HashMap::<_, IpKeyV4, EndpointInfo>::try_from(map("ENDPOINTS_V4")?)?.keys() {
            add(k?.epoch);
        }
        for k in HashMap::<_, IpKeyV6, EndpointInfo>::try_from(map("ENDPOINTS_V6")?)?.keys() {
            add(k?.epoch);
        }
        Ok(counts)
    }

    /// Takes every verdict event waiting in the ring buffer.
    pub fn drain_events(&mut self) -> Vec<PolicyEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            if item.len() < size_of::<VerdictEvent>() {
                continue;
            }
            // SAFETY: the datapath writes whole `VerdictEvent`s; read unaligned to be safe.
            let raw = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const VerdictEvent) };
            if let Some(event) = PolicyEvent::decode(&raw) {
                out.push(event);
            }
        }
        out
    }

    /// Packets per (verdict, reason) so far, summed over CPUs; zero counts left out.
    pub fn counters(&self) -> Result<Vec<(Verdict, Reason, u64)>> {
        let mut out = Vec::new();
        for (verdict, reason, n) in read_counters(&self.ebpf)? {
            if n > 0 {
                out.push((verdict, reason, n));
            }
        }
        Ok(out)
    }

    /// Events the datapath could not report because the ring buffer was full.
    pub fn events_lost(&self) -> Result<u64> {
        counter_sum(&self.ebpf, EVENTS_LOST_SLOT)
    }
}

impl Drop for PolicyDatapath {
    /// Detaches what is not pinned; pinned links keep enforcing for the next agent.
    fn drop(&mut self) {
        for (_, name, attachment) in std::mem::take(&mut self.attached) {
            if let (Attachment::Owned(link), Ok(program)) = (attachment, self.program(name)) {
                let _ = program.detach(link);
            }
        }
    }
}

fn lpm<K: aya::Pod, T>(k: &Lpm<T>, data: K) -> Key<K> {
    Key::new(k.prefix_len, data)
}

fn from_key<K: aya::Pod, T>(k: &Key<K>, data: T) -> Lpm<T> {
    Lpm {
        prefix_len: k.prefix_len(),
        data,
    }
}

fn counter_sum(ebpf: &Ebpf, slot: u32) -> Result<u64> {
    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(ebpf.map("POLICY_COUNTERS").context("POLICY_COUNTERS")?)?;
    Ok(counters.get(&slot, 0)?.iter().sum())
}

/// Every (verdict, reason) counter of an object holding the policy maps (the policy programs' or
/// the balancer's, whose `lb_xdp` counts CIDR denials).
pub fn read_counters(ebpf: &Ebpf) -> Result<Vec<(Verdict, Reason, u64)>> {
    let mut out = Vec::new();
    for verdict in Verdict::ALL {
        for reason in Reason::ALL {
            out.push((
                verdict,
                reason,
                counter_sum(ebpf, counter_index(verdict, reason))?,
            ));
        }
    }
    Ok(out)
}

/// Replaces the XDP CIDR deny list of the balancer's object (loaded with `XDP_CIDR_DENY_GLOBAL`
/// set, see `datapath::LoadOptions::cidr_deny`): inserts the new prefixes, then removes those no
/// longer listed, so a prefix in both lists is never absent.
pub fn write_cidr_deny(ebpf: &mut Ebpf, previous: &[Cidr], cidrs: &[Cidr]) -> Result<()> {
    if cidrs.len() > state_limits::CIDR_DENY_ENTRIES as usize {
        bail!(
            "CIDR deny list: {} entries, the limit is {}",
            cidrs.len(),
            state_limits::CIDR_DENY_ENTRIES
        );
    }
    let key4 = |c: &Cidr| match c.addr() {
        IpAddr::V4(a) => Some(IpKeyV4::prefix(0, a, c.prefix_len())),
        IpAddr::V6(_) => None,
    };
    let key6 = |c: &Cidr| match c.addr() {
        IpAddr::V6(a) => Some(IpKeyV6::prefix(0, a, c.prefix_len())),
        IpAddr::V4(_) => None,
    };
    {
        let mut v4: LpmTrie<_, IpKeyV4, u32> =
            LpmTrie::try_from(ebpf.map_mut("CIDR_DENY_V4").context("CIDR_DENY_V4")?)?;
        for (i, k) in cidrs
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i, key4(c)?)))
        {
            v4.insert(&Key::new(k.prefix_len, k.data), i as u32, 0)
                .context("CIDR_DENY_V4")?;
        }
        for k in previous
            .iter()
            .filter(|c| !cidrs.contains(c))
            .filter_map(key4)
        {
            let _ = v4.remove(&Key::new(k.prefix_len, k.data));
        }
    }
    let mut v6: LpmTrie<_, IpKeyV6, u32> =
        LpmTrie::try_from(ebpf.map_mut("CIDR_DENY_V6").context("CIDR_DENY_V6")?)?;
    for (i, k) in cidrs
        .iter()
        .enumerate()
        .filter_map(|(i, c)| Some((i, key6(c)?)))
    {
        v6.insert(&Key::new(k.prefix_len, k.data), i as u32, 0)
            .context("CIDR_DENY_V6")?;
    }
    for k in previous
        .iter()
        .filter(|c| !cidrs.contains(c))
        .filter_map(key6)
    {
        let _ = v6.remove(&Key::new(k.prefix_len, k.data));
    }
    Ok(())
}

/// Attaches `program` at the head of the interface's tcx chain: the policy runs before the
/// balancer's `lb_tc`, so it sees a backend's reply from the backend's own address (before the
/// reverse translation to the VIP), and passes with `TCX_NEXT` so `lb_tc` still runs. On a
/// workload's veth (`AttachMode::Workload`) it goes right after the balancer's `lb_tc_request`
/// at ingress, whichever is attached first, so the client's egress rules see the backend a request
/// to a VIP was translated to. Kernels without tcx (before 6.6) get a clsact filter.
fn attach_first(
    program: &mut SchedClassifier,
    name: &str,
    interface: &str,
    attach_type: TcAttachType,
) -> Result<SchedClassifierLinkId> {
    let order = match request_translator(interface, attach_type) {
        // SAFETY: an id the kernel just listed; an id gone since makes the attach fail.
        Some(id) => LinkOrder::after_program_id(unsafe { ProgramId::new(id) }),
        None => LinkOrder::first(),
    };
    match program.attach_with_options(interface, attach_type, TcAttachOptions::TcxOrder(order)) {
        Ok(id) => Ok(id),
        Err(_) => program
            .attach(interface, attach_type)
            .with_context(|| format!("attaching {name} to {interface}")),
    }
}

/// The id of the balancer's `lb_tc_request` in the interface's tcx chain, if attached there.
fn request_translator(interface: &str, attach_type: TcAttachType) -> Option<u32> {
    if attach_type != TcAttachType::Ingress {
        return None;
    }
    let (_, programs) = SchedClassifier::query_tcx(interface, attach_type).ok()?;
    programs
        .iter()
        .find(|p| p.name_as_str() == Some(TC_REQUEST_PROGRAM))
        .map(|p| p.id())
}
