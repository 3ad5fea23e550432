//! What the last successful apply programmed, per service, and what a new config changes in it.
//! `Datapath::apply_with` then touches only the services that changed and the backends they name
//! or named, so an event that changes one service (a health check, an endpoint update) costs in
//! proportion to that service, not to the whole config.
//!
//! The record also keeps what depends on several services at once: the frontends each backend
//! serves (its reply route follows from all of them, `crate::reply_routes`) and how many VIPs and
//! backends hold each address filter role (`crate::prefilter::CountedFilter`).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use anyhow::{bail, Result};
use lb_common::{
    prefilter::role,
    service::{mode, Addr, ServiceKey},
};

use crate::{
    config::{BackendConfig, Config, ForwardingMode, NodeConfig, Service},
    prefilter::{vip_role, AddressFilter, CountedFilter},
};

/// A backend as the config names it: address and port.
pub(crate) type BackendAddress = (IpAddr, u16);

/// A frontend a backend serves: its service's key and forwarding mode (`lb_common::service::mode`).
pub(crate) type Frontend = (ServiceKey, u8);

/// The key of `service` in `SERVICES`.
pub(crate) fn key_of(service: &Service) -> ServiceKey {
    ServiceKey::new(service.vip, service.port, service.protocol.number())
}

/// The datapath's code of a forwarding mode.
pub(crate) fn mode_of(forwarding: ForwardingMode) -> u8 {
    match forwarding {
        ForwardingMode::Dnat => mode::DNAT,
        ForwardingMode::Snat => mode::SNAT,
        ForwardingMode::DsrL2 => mode::DSR_L2,
        ForwardingMode::DsrIpip => mode::DSR_IPIP,
    }
}

/// The config fields every service's entries depend on (Maglev seed, node addresses and SNAT
/// ports). The policy is not among them: `crate::policy` writes its own maps.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Globals {
    maglev_seed: u64,
    node: NodeConfig,
}

impl Globals {
    fn of(config: &Config) -> Self {
        // Spelled out whole, so a new config field has to be placed here or among the services.
        let Config {
            maglev_seed,
            services: _,
            node,
            policy: _,
            // A load-time setting of the programs (`Datapath::reload`), not of the maps.
            flow_events: _,
        } = config;
        Self {
            maglev_seed: *maglev_seed,
            node: *node,
        }
    }
}

/// One service as applied: its key, config and each backend's effective weight.
struct AppliedService {
    key: ServiceKey,
    service: Service,
    weights: Vec<u32>,
}

/// What the maps hold after an apply, by config: see the module doc.
pub(crate) struct Applied {
    globals: Globals,
    /// In the order of the last config: a config in the same order (the usual case) is compared
    /// side by side, without a lookup per service.
    services: Vec<AppliedService>,
    /// Position of each key in `services`.
    positions: HashMap<ServiceKey, usize>,
    /// Per backend: the frontends of the services naming it, one per service.
    frontends: HashMap<BackendAddress, Vec<Frontend>>,
    filter: CountedFilter,
}

/// What an apply has to do to go from the record to a new config.
pub(crate) struct Changes<'a> {
    /// Services of the new config that are new or differ (config, weights), in config order.
    pub changed: Vec<(&'a Service, Vec<u32>)>,
    /// Keys of recorded services the new config no longer has.
    pub removed: Vec<ServiceKey>,
    /// Backends the changed and removed services name or named (those whose reply route or
    /// existence may change), each once, in the order first met: a full record's are the
    /// config's backends in config order.
    pub touched: Vec<BackendAddress>,
}

impl Changes<'_> {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }
}

impl Applied {
    /// An empty record for `config`'s global fields: updating it with `config` lists every
    /// service as changed (a full apply).
    pub fn empty_for(config: &Config) -> Self {
        Self {
            globals: Globals::of(config),
            services: Vec::new(),
            positions: HashMap::new(),
            frontends: HashMap::new(),
            filter: CountedFilter::default(),
        }
    }

    /// Whether `config` has the global fields of this record, so only its services can differ.
    pub fn has_globals_of(&self, config: &Config) -> bool {
        self.globals == Globals::of(config)
    }

    /// Makes the record hold `config` with the effective weights `weight_of` gives, and returns
    /// what changed. Refuses a config naming one service key twice (before the record changes).
    pub fn update<'a>(
        &mut self,
        config: &'a Config,
        weight_of: impl Fn(&Service, &BackendConfig) -> u32,
    ) -> Result<Changes<'a>> {
        let same_keys = config.services.len() == self.services.len()
            && config
                .services
                .iter()
                .zip(&self.services)
                .all(|(service, applied)| key_of(service) == applied.key);
        let mut touched = Touched::default();
        // Filled per service, copied only for a changed one.
        let mut buffer = Vec::new();
        if same_keys {
            // The recorded keys are distinct, so these are.
            let mut changed = Vec::new();
            for (position, service) in config.services.iter().enumerate() {
                let weights = effective_weights(&mut buffer, service, &weight_of);
                let applied = &self.services[position];
                if applied.weights != weights || applied.service != *service {
                    changed.push((position, service, weights.to_vec()));
                }
            }
            for (position, service, weights) in &changed {
                let applied = &mut self.services[*position];
                let old = std::mem::replace(&mut applied.service, (*service).clone());
                applied.weights = weights.clone();
                self.forget(&old, &mut touched);
                self.remember(service, &mut touched);
            }
            return Ok(Changes {
                changed: changed.into_iter().map(|(_, s, w)| (s, w)).collect(),
                removed: Vec::new(),
                touched: touched.order,
            });
        }

        // Added, removed or reordered services: the record is rebuilt in the config's order.
        let mut seen = HashSet::with_capacity(config.services.len());
        for service in &config.services {
            if !seen.insert(key_of(service)) {
                bail!(
                    "service {}: another service has VIP {} port {} {:?}",
                    service.name,
                    service.vip,
                    service.port,
                    service.protocol
                );
            }
        }
        let mut previous: Vec<Option<AppliedService>> = std::mem::take(&mut self.services)
            .into_iter()
            .map(Some)
            .collect();
        let mut changed = Vec::new();
        for service in &config.services {
            let key = key_of(service);
            let weights = effective_weights(&mut buffer, service, &weight_of).to_vec();
            let old = self
                .positions
                .get(&key)
                .and_then(|&position| previous[position].take());
            match old {
                Some(old) if old.weights == weights && old.service == *service => {
                    self.services.push(old);
                    continue;
                }
                Some(old) => self.forget(&old.service, &mut touched),
                None => {}
            }
            self.remember(service, &mut touched);
            self.services.push(AppliedService {
                key,
                service: service.clone(),
                weights: weights.clone(),
            });
            changed.push((service, weights));
        }
        let mut removed = Vec::new();
        for gone in previous.into_iter().flatten() {
            self.forget(&gone.service, &mut touched);
            removed.push(gone.key);
        }
        self.positions = self
            .services
            .iter()
            .enumerate()
            .map(|(position, applied)| (applied.key, position))
            .collect();
        Ok(Changes {
            changed,
            removed,
            touched: touched.order,
        })
    }

    /// The frontends of the recorded services naming `backend` (`None`: no service names it).
    pub fn frontends_of(&self, backend: &BackendAddress) -> Option<&[Frontend]> {
        self.frontends.get(backend).map(Vec::as_slice)
    }

    /// Whether `key` is a recorded service.
    pub fn has_service(&self, key: &ServiceKey) -> bool {
        self.positions.contains_key(key)
    }

    /// Distinct backends of the recorded services.
    pub fn backend_count(&self) -> usize {
        self.frontends.len()
    }

    /// The address filter of the recorded services.
    pub fn filter(&self) -> &AddressFilter {
        self.filter.filter()
    }

    /// Adds `service` to the frontends of its backends and to the filter.
    fn remember(&mut self, service: &Service, touched: &mut Touched) {
        let frontend = (key_of(service), mode_of(service.mode));
        for b in &service.backends {
            let address = (b.address, b.port);
            let served = self.frontends.entry(address).or_default();
            if !served.contains(&frontend) {
                served.push(frontend);
            }
            touched.add(address);
        }
        self.count_filter_roles(service, CountedFilter::add);
    }

    /// Takes `service` (as recorded) out of the frontends of its backends and out of the filter.
    fn forget(&mut self, service: &Service, touched: &mut Touched) {
        let key = key_of(service);
        for b in &service.backends {
            let address = (b.address, b.port);
            if let Some(served) = self.frontends.get_mut(&address) {
                served.retain(|(k, _)| *k != key);
                if served.is_empty() {
                    self.frontends.remove(&address);
                }
            }
            touched.add(address);
        }
        self.count_filter_roles(service, CountedFilter::remove);
    }

    /// Adds or removes the filter roles of `service`: its VIP, and its backends, whose replies the
    /// node translates in every mode: DNAT and SNAT always, DSR those to clients on workload veths
    /// (served as DNAT there; DSR replies to other clients bypass the node).
    fn count_filter_roles(&mut self, service: &Service, count: fn(&mut CountedFilter, &Addr, u8)) {
        let key = key_of(service);
        count(&mut self.filter, &key.addr, vip_role(&key));
        for b in &service.backends {
            count(&mut self.filter, &Addr::from_ip(b.address), role::BACKEND);
        }
    }
}

/// The effective weight of each backend of `service`, in `buffer`.
fn effective_weights<'b>(
    buffer: &'b mut Vec<u32>,
    service: &Service,
    weight_of: &impl Fn(&Service, &BackendConfig) -> u32,
) -> &'b [u32] {
    buffer.clear();
    buffer.extend(service.backends.iter().map(|b| weight_of(service, b)));
    buffer
}

/// Backends in the order first touched, each once.
#[derive(Default)]
struct Touched {
    order: Vec<BackendAddress>,
    seen: HashSet<BackendAddress>,
}

impl Touched {
    fn add(&mut self, backend: BackendAddress) {
        if self.seen.insert(backend) {
            self.order.push(backend);
        }
    }
}
