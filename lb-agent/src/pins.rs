//! Datapath state pinned on a BPF filesystem, so that it outlives the agent: the datapath keeps
//! forwarding while no agent runs, and a restarted or upgraded agent adopts the maps (connection
//! tracking included) instead of starting empty.
//!
//! Layout of the pin directory (default `/sys/fs/bpf/lb`):
//! - `LAYOUT`: a one-entry array holding the map layout version ([`MAP_LAYOUT_VERSION`]);
//! - `maps/<NAME>`: every map of the datapath object (`SERVICES`, `BACKENDS`, `CONNTRACK_V4`, ...),
//!   and `ADDRESS_FILTER`, the address prefilter, a global of the object that the datapath pins by
//!   hand (`crate::prefilter`);
//! - `programs/<name>`: the XDP program last loaded (for inspection; the links hold it);
//! - `links/xdp_<interface>` or `links/tc_<interface>`: the XDP or TC (tcx ingress) `bpf_link` of
//!   each interface. The kernel keeps the program attached as long as this pin exists, whatever
//!   happens to the agent (also `kill -9`); a workload's veth also has
//!   `links/lb_tc_request_<interface>` (head of tcx ingress) and `links/lb_tc_reply_<interface>`
//!   (tcx egress), any other `links/lb_tc_egress_<interface>` (tcx egress: the node's ICMP errors
//!   about translated packets);
//! - `policy/`: the policy datapath (a separate instance of the object, see
//!   `crate::policy::datapath`), laid out the same way with its own `LAYOUT`, `maps/`, `programs/`
//!   and `links/tc_<interface>_<ingress|egress>` (its tcx links).
//!
//! Compatibility: pinned maps are adopted only if the pinned layout version equals this agent's and
//! every pinned map has the type, key size, value size, number of entries and flags of this
//! agent's definition, as the kernel reports them for the pinned map. Maps new in this agent's
//! object are created next to the adopted ones. A hash or array map that differs only in its
//! number of entries (another `--conntrack-entries`, `--max-services`, `--max-backends`) is
//! resized: created anew and its entries copied over (`crate::resize`). A map whose entries only
//! live for moments (`FRAGMENTS`: datagrams being reassembled) is recreated empty when its
//! definition changes. Anything else is refused with both sides named, unless the operator asks
//! to replace the state (which flushes connection tracking).

use std::{
    collections::HashMap,
    fmt,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, Map, MapData, MapInfo},
    programs::links::FdLink,
};
use tracing::{info, warn};

/// Version of what the datapath's map entries mean. Map definitions (type, key and value sizes,
/// entries, flags) are compared map by map with the kernel's view of the pinned maps, so a changed
/// size needs no bump. Bump this by hand when a change keeps the sizes but changes the meaning of
/// stored bytes: a field of an `lb-common` map type reordered or reinterpreted, a byte order
/// changed, a flag or mode number redefined, a table indexed differently, an inner map definition
/// changed. Pinned state of another version is refused.
pub const MAP_LAYOUT_VERSION: u32 = 3;
/// Where the agent pins by default (`--bpffs-dir`).
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/lb";
/// Subdirectory of the policy datapath's pins.
const POLICY_SUBDIR: &str = "policy";
/// `f_type` of a BPF filesystem (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What a map is, as far as adopting it is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapDefinition {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapDefinition {
    /// Whether a pinned map of this definition can be carried over into a map of `wanted`: the
    /// same but for the number of entries, and of a type whose entries `crate::resize` copies.
    pub fn resizes_to(&self, wanted: &MapDefinition) -> bool {
        use aya_obj::generated::bpf_map_type::{
            BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_HASH,
            BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY,
        };
        let copyable = [
            BPF_MAP_TYPE_HASH,
            BPF_MAP_TYPE_LRU_HASH,
            BPF_MAP_TYPE_ARRAY,
            BPF_MAP_TYPE_PERCPU_ARRAY,
            BPF_MAP_TYPE_ARRAY_OF_MAPS,
        ];
        *self != *wanted
            && MapDefinition {
                max_entries: wanted.max_entries,
                ..*self
            } == *wanted
            && copyable.iter().any(|t| *t as u32 == self.map_type)
    }
}

impl fmt::Display for MapDefinition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// The named maps of an eBPF object, with `max_entries` overridden as the loader will, sorted by
/// name. Data sections are left out: `.rodata` is not state, and the address filter's section is
/// pinned by hand (`Datapath::carry_over_address_filter`).
pub fn object_maps(
    object: &[u8],
    max_entries: &[(&str, u32)],
) -> Result<Vec<(String, MapDefinition)>> {
    let parsed = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    let overrides: HashMap<&str, u32> = max_entries.iter().copied().collect();
    let mut maps: Vec<(String, MapDefinition)> = parsed
        .maps
        .iter()
        .filter(|(name, _)| !name.starts_with('.'))
        .map(|(name, map)| {
            let definition = MapDefinition {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: overrides
                    .get(name.as_str())
                    .copied()
                    .unwrap_or(map.max_entries()),
                flags: map.map_flags(),
            };
            Ok((
                name.clone(),
                as_created(definition, page_size(), nr_cpus()?),
            ))
        })
        .collect::<Result<_>>()?;
    maps.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(maps)
}

/// `definition` as aya's loader creates it (its `max_entries_override` and `value_size_override`),
/// so that it compares equal to the same map pinned by an earlier agent.
fn as_created(mut definition: MapDefinition, page_size: u32, cpus: u32) -> MapDefinition {
    use aya_obj::generated::bpf_map_type::{BPF_MAP_TYPE_PERF_EVENT_ARRAY, BPF_MAP_TYPE_RINGBUF};
    if definition.map_type == BPF_MAP_TYPE_RINGBUF as u32 {
        // Bytes rounded up to a power-of-two number of pages.
        definition.value_size = 0;
        if definition.max_entries > 0 {
            definition.max_entries = page_size
                * definition
                    .max_entries
                    .div_ceil(page_size)
                    .next_power_of_two();
        }
    } else if definition.map_type == BPF_MAP_TYPE_PERF_EVENT_ARRAY as u32
        && definition.max_entries == 0
    {
        definition.max_entries = cpus;
    }
    definition
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u32 }
}

fn nr_cpus() -> Result<u32> {
    aya::util::nr_cpus()
        .map(|n| n as u32)
        .map_err(|(path, err)| anyhow::anyhow!("reading {path}: {err}"))
}

/// What the pin directory holds, compared with what this agent would pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinnedState {
    /// Nothing pinned yet.
    Fresh,
    /// Same layout: `adopted` maps are reused, `created` ones are new in this agent, `resized`
    /// ones are created with another number of entries and their entries copied over,
    /// `recreated` ones (transient, of another definition) start empty.
    Compatible {
        adopted: Vec<String>,
        created: Vec<String>,
        resized: Vec<String>,
        recreated: Vec<String>,
    },
    /// Not adoptable; one line per reason.
    Incompatible(Vec<String>),
}

/// What [`PinDir::claim`] decided.
#[derive(Debug)]
pub struct Claim {
    /// The directory's lock, held until dropped.
    pub lock: std::fs::File,
    /// Whether pinned maps are reused (their contents then tell the bookkeeping).
    pub adopt: bool,
    /// Pinned maps to carry over into maps of another size (see `crate::resize`).
    pub resized: Vec<String>,
    /// Transient pinned maps of another definition, replaced by empty ones (see `crate::resize`).
    pub recreated: Vec<String>,
}

/// A pin directory on a BPF filesystem.
#[derive(Debug, Clone)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.root.join("programs").join(name)
    }

    pub fn link(&self, interface: &str) -> PathBuf {
        self.root.join("links").join(format!("xdp_{interface}"))
    }

    /// The balancer's TC (tcx ingress) link on `interface` (`--attach tc`).
    pub fn tc_ingress_link(&self, interface: &str) -> PathBuf {
        self.root.join("links").join(format!("tc_{interface}"))
    }

    /// The tcx link of the balancer's TC program `program` next to `lb_xdp`/`lb_tc` on `interface`
    /// (`lb_tc_request`, `lb_tc_reply` on a workload's veth; `lb_tc_egress` on a client-facing
    /// interface).
    pub fn tc_hook_link(&self, interface: &str, program: &str) -> PathBuf {
        self.root
            .join("links")
            .join(format!("{program}_{interface}"))
    }

    /// The tcx link of a policy TC program on `interface` in `direction` (`ingress` or `egress`).
    pub fn tc_link(&self, interface: &str, direction: &str) -> PathBuf {
        self.root
            .join("links")
            .join(format!("tc_{interface}_{direction}"))
    }

    /// The policy datapath's pin directory, inside this one.
    pub fn policy(&self) -> PinDir {
        PinDir::new(self.root.join(POLICY_SUBDIR))
    }

    fn layout(&self) -> PathBuf {
        self.root.join("LAYOUT")
    }

    /// Creates the directories; fails clearly if they would not be on a BPF filesystem (pins there
    /// are impossible, and a bpffs mounted only in a private mount namespace dies with it).
    pub fn prepare(&self) -> Result<()> {
        let parent = self
            .root
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        if !is_bpffs(parent)? {
            bail!(
                "{} is not on a BPF filesystem, so nothing can be pinned there: mount one \
                 (`mount -t bpf bpf /sys/fs/bpf`; in a container, mount the host's /sys/fs/bpf) \
                 or choose another --bpffs-dir",
                self.root.display()
            );
        }
        for dir in ["maps", "programs", "links"] {
            let path = self.root.join(dir);
            std::fs::create_dir_all(&path)
                .with_context(|| format!("creating {}", path.display()))?;
        }
        Ok(())
    }

    /// Takes the directory's lock, held until the returned file is dropped (the process exits):
    /// one agent per pin directory, and no uninstall under a running agent.
    pub fn lock(&self) -> Result<std::fs::File> {
        use std::os::fd::AsRawFd;
        let dir = std::fs::File::open(&self.root)
            .with_context(|| format!("opening {}", self.root.display()))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!(
                    "another lb-agent is using {} (stop it first, or give this one another \
                     --bpffs-dir)",
                    self.root.display()
                );
            }
            return Err(err).with_context(|| format!("locking {}", self.root.display()));
        }
        Ok(dir)
    }

    /// Prepares and locks the directory and decides what to do with pinned state of the maps
    /// `wanted` (see [`object_maps`]) of `what` (e.g. "datapath", named in logs and errors):
    /// nothing pinned starts fresh, a compatible layout is adopted (`adopt`, some maps maybe
    /// `resized`, `transient` ones maybe `recreated`), an incompatible one is refused, or removed
    /// when `replace_incompatible` is set.
    pub fn claim(
        &self,
        wanted: &[(String, MapDefinition)],
        transient: &[&str],
        replace_incompatible: bool,
        what: &str,
    ) -> Result<Claim> {
        self.prepare()?;
        let lock = self.lock()?;
        let dir = self.root.display();
        let (mut resized_maps, mut recreated_maps) = (Vec::new(), Vec::new());
        let adopt = match self.inspect(wanted, transient)? {
            PinnedState::Fresh => {
                info!(%dir, "no pinned {what} state: starting fresh");
                self.write_layout_version()?;
                false
            }
            PinnedState::Compatible {
                adopted,
                created,
                resized,
                recreated,
            } => {
                info!(%dir, ?adopted, ?created, ?resized, ?recreated,
                      "adopting pinned {what} maps (connection tracking kept)");
                resized_maps = resized;
                recreated_maps = recreated;
                true
            }
            PinnedState::Incompatible(problems) if replace_incompatible => {
                for problem in &problems {
                    warn!(%dir, "incompatible pinned state: {problem}");
                }
                warn!(%dir,
                      "REPLACING incompatible pinned {what} state as requested: connection \
                       tracking is flushed, established connections through this node may reset");
                self.remove_state()?;
                self.write_layout_version()?;
                false
            }
            PinnedState::Incompatible(problems) => bail!(
                "pinned {what} state in {dir} is incompatible with this agent: {problems}. \
                 Adopting it would misread its maps. Run the agent version that pinned it, or \
                 restart with --replace-incompatible-state to remove it and start fresh \
                 (flushes connection tracking: established connections may reset)",
                problems = problems.join("; ")
            ),
        };
        Ok(Claim {
            lock,
            adopt,
            resized: resized_maps,
            recreated: recreated_maps,
        })
    }

    /// Compares the pinned state with `wanted` (see [`object_maps`]); `transient` maps may have
    /// changed in any way (they are recreated).
    pub fn inspect(
        &self,
        wanted: &[(String, MapDefinition)],
        transient: &[&str],
    ) -> Result<PinnedState> {
        let pinned_maps = self.pinned_map_names()?;
        let version = self.layout_version()?;
        if version.is_none() && pinned_maps.is_empty() {
            return Ok(PinnedState::Fresh);
        }
        let mut problems = Vec::new();
        match version {
            Some(v) if v == MAP_LAYOUT_VERSION => {}
            Some(v) => problems.push(format!(
                "pinned map layout version {v}, this agent uses version {MAP_LAYOUT_VERSION}"
            )),
            None => problems.push(format!(
                "maps pinned without a layout version ({} missing), this agent uses version \
                 {MAP_LAYOUT_VERSION}",
                self.layout().display()
            )),
        }
        let (mut adopted, mut created) = (Vec::new(), Vec::new());
        let (mut resized, mut recreated) = (Vec::new(), Vec::new());
        for (name, definition) in wanted {
            if !pinned_maps.contains(name) {
                created.push(name.clone());
                continue;
            }
            let pinned = pinned_definition(&self.map(name))?;
            if pinned == *definition {
                adopted.push(name.clone());
            } else if pinned.resizes_to(definition) {
                resized.push(name.clone());
            } else if transient.contains(&name.as_str()) {
                recreated.push(name.clone());
            } else {
                problems.push(format!(
                    "map {name}: pinned {pinned}; this agent needs {definition}"
                ));
            }
        }
        if !problems.is_empty() {
            return Ok(PinnedState::Incompatible(problems));
        }
        Ok(PinnedState::Compatible {
            adopted,
            created,
            resized,
            recreated,
        })
    }

    /// Records this agent's layout version (before any map is pinned, so that maps are never
    /// pinned without one).
    pub fn write_layout_version(&self) -> Result<()> {
        let path = self.layout();
        remove_if_present(&path)?;
        let mut layout: Array<MapData, u32> =
            Array::create(1, 0).context("creating the LAYOUT map")?;
        layout
            .set(0, MAP_LAYOUT_VERSION, 0)
            .context("writing the LAYOUT map")?;
        layout
            .pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        Ok(())
    }

    fn layout_version(&self) -> Result<Option<u32>> {
        let path = self.layout();
        if !path.exists() {
            return Ok(None);
        }
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let layout: Array<MapData, u32> = Array::try_from(Map::from_map_data(data)?)
            .with_context(|| format!("{} is not a layout version map", path.display()))?;
        Ok(Some(layout.get(&0, 0)?))
    }

    fn pinned_map_names(&self) -> Result<Vec<String>> {
        entries(&self.root.join("maps"))
    }

    /// Interfaces with a pinned XDP or TC link.
    pub fn linked_interfaces(&self) -> Result<Vec<String>> {
        let mut interfaces: Vec<String> = entries(&self.root.join("links"))?
            .into_iter()
            .filter_map(|name| {
                name.strip_prefix("xdp_")
                    .or_else(|| name.strip_prefix("tc_"))
                    .or_else(|| name.strip_prefix("lb_tc_request_"))
                    .or_else(|| name.strip_prefix("lb_tc_reply_"))
                    .or_else(|| name.strip_prefix("lb_tc_egress_"))
                    .map(str::to_string)
            })
            .collect();
        interfaces.sort();
        interfaces.dedup();
        Ok(interfaces)
    }

    /// Interfaces and directions (`ingress`, `egress`) with a pinned tcx link.
    pub fn tc_linked_interfaces(&self) -> Result<Vec<(String, String)>> {
        Ok(entries(&self.root.join("links"))?
            .into_iter()
            .filter_map(|name| {
                let (interface, direction) = name.strip_prefix("tc_")?.rsplit_once('_')?;
                Some((interface.to_string(), direction.to_string()))
            })
            .collect())
    }

    /// Unpins the maps, programs and layout version (links stay, so the datapath stays attached
    /// until a new program replaces the old one in them). Existing maps live on only as long as a
    /// program still attached uses them.
    pub fn remove_state(&self) -> Result<()> {
        for dir in ["maps", "programs"] {
            for name in entries(&self.root.join(dir))? {
                remove_if_present(&self.root.join(dir).join(name))?;
            }
        }
        remove_if_present(&self.layout())
    }

    /// Removes everything, the policy datapath's pins first: links first (which detaches the
    /// programs from every interface once no process holds them), then programs, maps, the layout
    /// version and the directories. Only names of this layout are removed; returns the number of
    /// pins removed.
    pub fn remove_all(&self) -> Result<usize> {
        if !self.root.exists() {
            return Ok(0);
        }
        let _lock = self.lock()?;
        let policy = self.policy();
        let mut removed = if policy.root.exists() {
            let _policy_lock = policy.lock()?;
            policy.remove_pins()?
        } else {
            0
        };
        removed += self.remove_pins()?;
        Ok(removed)
    }

    /// [`Self::remove_all`] of this directory alone, under a lock the caller holds.
    fn remove_pins(&self) -> Result<usize> {
        let mut removed = 0;
        for dir in ["links", "programs", "maps"] {
            let path = self.root.join(dir);
            for name in entries(&path)? {
                remove_if_present(&path.join(name))?;
                removed += 1;
            }
            remove_dir_if_present(&path)?;
        }
        if self.layout().exists() {
            remove_if_present(&self.layout())?;
            removed += 1;
        }
        remove_dir_if_present(&self.root)?;
        Ok(removed)
    }
}

fn pinned_definition(path: &Path) -> Result<MapDefinition> {
    let info = MapInfo::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(MapDefinition {
        map_type: info.map_type()? as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

fn is_bpffs(path: &Path) -> Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a statfs buffer owned by this frame.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

/// Names in `dir`, sorted; none if it does not exist.
fn entries(dir: &Path) -> Result<Vec<String>> {
    let read = match std::fs::read_dir(dir) {
        Ok(read) => read,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).with_context(|| format!("listing {}", dir.display())),
    };
    let mut names = Vec::new();
    for entry in read {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Puts a new program into the pinned link at `path` if that link is still usable (`replace`,
/// atomic: no moment without a program), else removes the pin (its interface was re-created, or
/// there was none), attaches anew (`attach` returns the new link) and pins that link, which then
/// outlives the agent. `target` is what both closures work on; `kind` names the link in the log.
/// Shared by the balancer's and the policy's datapaths.
pub(crate) fn replace_or_attach_pinned<T>(
    target: &mut T,
    path: &Path,
    interface: &str,
    kind: &str,
    replace: impl FnOnce(&mut T) -> Result<()>,
    attach: impl FnOnce(&mut T) -> Result<FdLink>,
) -> Result<()> {
    if path.exists() {
        match replace(target) {
            Ok(()) => {
                info!(interface, link = %path.display(),
                      "adopted the pinned {kind} link: program replaced atomically");
                return Ok(());
            }
            Err(err) => {
                warn!(interface, link = %path.display(), error = %format!("{err:#}"),
                      "pinned {kind} link unusable (interface re-created?), attaching anew");
                std::fs::remove_file(path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    let link = attach(target)?;
    // The pin owns the link from now on: closing our descriptor leaves it attached.
    link.pin(path)
        .with_context(|| format!("pinning {}", path.display()))?;
    Ok(())
}

pub(crate) fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn remove_dir_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_dir(path) {
        Err(err) if err.kind() != ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing {} (not empty?)", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_maps_are_the_named_maps_with_overrides() {
        let maps = object_maps(crate::datapath::EBPF_OBJECT, &[("CONNTRACK_V4", 1234)]).unwrap();
        let names: Vec<&str> = maps.iter().map(|(n, _)| n.as_str()).collect();
        for name in [
            "BACKENDS",
            "CONNTRACK_V4",
            "CONNTRACK_V6",
            "MAGLEV_TABLES",
            "NAT_REPLY",
            "SERVICES",
        ] {
            assert!(names.contains(&name), "{names:?}");
        }
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
        assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted");
        let definition = |name: &str| maps.iter().find(|(n, _)| n == name).unwrap().1;
        let (v4, v6) = (definition("CONNTRACK_V4"), definition("CONNTRACK_V6"));
        assert_eq!(v4.max_entries, 1234);
        assert_eq!(
            v6.max_entries,
            lb_common::service::limits::DEFAULT_CONNTRACK_ENTRIES
        );
        assert_eq!(
            v4.key_size as usize,
            size_of::<lb_common::conntrack::FlowKeyV4>()
        );
        assert_eq!(
            v6.key_size as usize,
            size_of::<lb_common::conntrack::FlowKey>()
        );
        for conntrack in [v4, v6] {
            assert_eq!(
                conntrack.value_size as usize,
                size_of::<lb_common::conntrack::ConntrackEntry>()
            );
        }
    }

    #[test]
    fn definitions_are_compared_as_the_loader_creates_them() {
        let ring = |entries| MapDefinition {
            map_type: 27,
            key_size: 0,
            value_size: 0,
            max_entries: entries,
            flags: 0,
        };
        assert_eq!(as_created(ring(5000), 4096, 2).max_entries, 8192);
        assert_eq!(as_created(ring(3 * 4096), 4096, 2).max_entries, 16384);
        assert_eq!(as_created(ring(4096), 4096, 2).max_entries, 4096);
        let perf = MapDefinition {
            map_type: 4,
            key_size: 4,
            value_size: 4,
            max_entries: 0,
            flags: 0,
        };
        assert_eq!(as_created(perf, 4096, 6).max_entries, 6);
        let hash = MapDefinition {
            map_type: 1,
            ..perf
        };
        assert_eq!(as_created(hash, 4096, 6), hash);
    }

    #[test]
    fn policy_pins_nest_and_tc_links_name_interface_and_direction() {
        let dir = tempfile::tempdir().unwrap();
        let policy = PinDir::new(dir.path()).policy();
        assert_eq!(policy.root(), dir.path().join("policy"));
        let links = policy.root().join("links");
        std::fs::create_dir_all(&links).unwrap();
        for path in [
            policy.tc_link("wl_db", "ingress"),
            policy.tc_link("wl_db", "egress"),
            policy.link("eth0"),
        ] {
            assert_eq!(path.parent(), Some(links.as_path()));
            std::fs::write(path, "").unwrap();
        }
        assert_eq!(
            policy.tc_linked_interfaces().unwrap(),
            [
                ("wl_db".into(), "egress".into()),
                ("wl_db".into(), "ingress".into())
            ]
        );
    }

    #[test]
    fn every_balancer_link_names_its_interface() {
        let dir = tempfile::tempdir().unwrap();
        let pins = PinDir::new(dir.path());
        std::fs::create_dir_all(dir.path().join("links")).unwrap();
        for path in [
            pins.link("eth0"),
            pins.tc_hook_link("eth0", "lb_tc_egress"),
            pins.tc_ingress_link("veth1"),
            pins.tc_hook_link("veth1", "lb_tc_request"),
            pins.tc_hook_link("veth1", "lb_tc_reply"),
            // An agent's pins with only the egress link left.
            pins.tc_hook_link("eth2", "lb_tc_egress"),
        ] {
            std::fs::write(path, "").unwrap();
        }
        assert_eq!(pins.linked_interfaces().unwrap(), ["eth0", "eth2", "veth1"]);
    }

    #[test]
    fn refuses_a_directory_off_bpffs() {
        let dir = tempfile::tempdir().unwrap();
        let err = PinDir::new(dir.path().join("lb")).prepare().unwrap_err();
        assert!(
            err.to_string().contains("is not on a BPF filesystem"),
            "{err:#}"
        );
        assert!(!dir.path().join("lb").exists());
    }
}
