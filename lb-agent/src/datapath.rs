//! Loads the embedded eBPF datapath, attaches it to interfaces and writes service state into its maps.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{xdp::XdpLinkId, Xdp, XdpMode},
    Ebpf,
};
use lb_common::{
    counters::Counter,
    service::{Backend, BackendSlotKey, ReverseNatKey, ServiceInfo, ServiceKey},
};
use tracing::{info, warn};

use crate::config::Config;

/// The datapath object built from `lb-ebpf` by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Name of the XDP program in the object.
pub const XDP_PROGRAM: &str = "lb_xdp";

/// A loaded datapath. Dropping it detaches the program from every interface and frees the maps.
pub struct Datapath {
    ebpf: Ebpf,
    attached: Vec<(String, XdpLinkId)>,
}

/// How a desired service translates into map entries.
struct DesiredService {
    backends: Vec<Backend>,
    protocol: u8,
}

impl Datapath {
    /// Loads the object and the XDP program into the kernel (verifier runs here), attached nowhere.
    pub fn load() -> Result<Self> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT).context("loading the eBPF object")?;
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
        })
    }

    /// The XDP program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn xdp_program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(XDP_PROGRAM)
            .expect("checked in load")
            .try_into()
            .expect("checked in load")
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

    /// Makes the service maps match `config`, writing only what differs.
    ///
    /// Order matters for packets in flight: backend slots are written before the service that counts
    /// them, and a service shrinks its count before its extra slots are removed, so the datapath never
    /// reads an empty slot.
    pub fn apply(&mut self, config: &Config) -> Result<()> {
        let desired: BTreeMap<ServiceKey, DesiredService> = config
            .services
            .iter()
            .map(|s| {
                let key = ServiceKey::new(s.vip, s.port, s.protocol.number());
                let backends = s
                    .backends
                    .iter()
                    .map(|b| Backend::new(b.address, b.port))
                    .collect();
                (
                    key,
                    DesiredService {
                        backends,
                        protocol: s.protocol.number(),
                    },
                )
            })
            .collect();

        let services: HashMap<_, ServiceKey, ServiceInfo> =
            HashMap::try_from(self.ebpf.map("SERVICES").context("SERVICES map")?)?;
        let current: StdHashMap<ServiceKey, ServiceInfo> = services
            .iter()
            .collect::<Result<_, _>>()
            .context("reading SERVICES")?;

        // Keep each service's id stable; new services take the lowest free ids.
        let mut used_ids: BTreeSet<u32> = current
            .iter()
            .filter(|(k, _)| desired.contains_key(k))
            .map(|(_, v)| v.id)
            .collect();
        let mut next_free = 0u32;
        let mut ids = BTreeMap::new();
        for key in desired.keys() {
            let id = match current.get(key) {
                Some(info) => info.id,
                None => {
                    while used_ids.contains(&next_free) {
                        next_free += 1;
                    }
                    used_ids.insert(next_free);
                    next_free
                }
            };
            ids.insert(*key, id);
        }

        let [services, backends, reverse] =
            self.ebpf
                .maps_disjoint_mut(["SERVICES", "BACKENDS", "REVERSE_NAT"]);
        let mut services: HashMap<&mut MapData, ServiceKey, ServiceInfo> =
            HashMap::try_from(services.context("SERVICES map")?)?;
        let mut backends: HashMap<&mut MapData, BackendSlotKey, Backend> =
            HashMap::try_from(backends.context("BACKENDS map")?)?;
        let mut reverse: HashMap<&mut MapData, ReverseNatKey, ServiceKey> =
            HashMap::try_from(reverse.context("REVERSE_NAT map")?)?;

        // 1. Backend slots and reverse NAT entries of desired services.
        for (key, want) in &desired {
            let id = ids[key];
            for (slot, backend) in want.backends.iter().enumerate() {
                let slot_key = BackendSlotKey {
                    service_id: id,
                    slot: slot as u32,
                };
                if backends.get(&slot_key, 0).ok().as_ref() != Some(backend) {
                    backends
                        .insert(slot_key, backend, 0)
                        .context("writing BACKENDS")?;
                }
                let rkey = ReverseNatKey::new(backend, want.protocol);
                if reverse.get(&rkey, 0).ok().as_ref() != Some(key) {
                    reverse
                        .insert(rkey, key, 0)
                        .context("writing REVERSE_NAT")?;
                }
            }
        }
        // 2. Services themselves (this publishes new slots).
        for (key, want) in &desired {
            let info = ServiceInfo {
                id: ids[key],
                backend_count: want.backends.len() as u32,
            };
            if current.get(key) != Some(&info) {
                services.insert(key, info, 0).context("writing SERVICES")?;
                info!(vip = %key.vip_addr(), port = key.port_host(), backends = info.backend_count, "service programmed");
            }
        }
        // 3. Services no longer wanted.
        for key in current.keys().filter(|k| !desired.contains_key(k)) {
            services.remove(key).context("removing from SERVICES")?;
            info!(vip = %key.vip_addr(), port = key.port_host(), "service removed");
        }
        // 4. Slots and reverse NAT entries nobody references any more.
        let wanted_slots: BTreeSet<BackendSlotKey> = desired
            .iter()
            .flat_map(|(key, want)| {
                let id = ids[key];
                (0..want.backends.len() as u32).map(move |slot| BackendSlotKey {
                    service_id: id,
                    slot,
                })
            })
            .collect();
        let stale_slots: Vec<_> = backends
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted_slots.contains(k))
            .collect();
        for k in stale_slots {
            backends.remove(&k).context("removing from BACKENDS")?;
        }
        let wanted_reverse: BTreeSet<(u32, u16, u8)> = desired
            .values()
            .flat_map(|want| {
                want.backends
                    .iter()
                    .map(move |b| (b.addr, b.port, want.protocol))
            })
            .collect();
        let stale_reverse: Vec<_> = reverse
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !wanted_reverse.contains(&(k.backend_addr, k.backend_port, k.protocol)))
            .collect();
        for k in stale_reverse {
            reverse.remove(&k).context("removing from REVERSE_NAT")?;
        }
        Ok(())
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
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.detach_all();
    }
}
