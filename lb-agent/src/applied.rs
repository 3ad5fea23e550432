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
        } = config;
        Self {
            maglev_seed: *maglev_seed,
            node: *node,
        }
    }
}

/// One service as applied: its config and each backend's effective weight.
struct AppliedService {
    service: Service,
    weights: Vec<u32>,
}

/// What the maps hold after an apply, by config: see the module doc.
pub(crate) struct Applied {
    globals: Globals,
    services: HashMap<ServiceKey, AppliedService>,
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
            services: HashMap::new(),
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
        let mut seen = HashSet::with_capacity(config.services.len());
        let mut changed = Vec::new();
        let mut added = 0;
        let mut weights = Vec::new();
        for service in &config.services {
            let key = key_of(service);
            if !seen.insert(key) {
                bail!(
                    "service {}: another service has VIP {} port {} {:?}",
                    service.name,
                    service.vip,
                    service.port,
                    service.protocol
                );
            }
            weights.clear();
            weights.extend(service.backends.iter().map(|b| weight_of(service, b)));
            match self.services.get(&key) {
                Some(applied) if applied.weights == weights && applied.service == *service => {}
                Some(_) => changed.push((service, weights.clone())),
                None => {
                    added += 1;
                    changed.push((service, weights.clone()));
                }
            }
        }
        // Every recorded service the config kept was seen; any other is gone.
        let removed: Vec<ServiceKey> = if self.services.len() > seen.len() - added {
            self.services
                .keys()
                .filter(|key| !seen.contains(key))
                .copied()
                .collect()
        } else {
            Vec::new()
        };

        let mut touched = Touched::default();
        for key in &removed {
            let gone = self.services.remove(key).expect("listed above");
            self.forget(&gone.service, &mut touched);
        }
        for (service, weights) in &changed {
            if let Some(old) = self.services.remove(&key_of(service)) {
                self.forget(&old.service, &mut touched);
            }
            self.remember(service, weights.clone(), &mut touched);
        }
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
        self.services.contains_key(key)
    }

    /// Distinct backends of the recorded services.
    pub fn backend_count(&self) -> usize {
        self.frontends.len()
    }

    /// The address filter of the recorded services.
    pub fn filter(&self) -> &AddressFilter {
        self.filter.filter()
    }

    fn remember(&mut self, service: &Service, weights: Vec<u32>, touched: &mut Touched) {
        let key = key_of(service);
        let frontend = (key, mode_of(service.mode));
        for b in &service.backends {
            let address = (b.address, b.port);
            let served = self.frontends.entry(address).or_default();
            if !served.contains(&frontend) {
                served.push(frontend);
            }
            touched.add(address);
        }
        self.count_filter_roles(service, CountedFilter::add);
        self.services.insert(
            key,
            AppliedService {
                service: service.clone(),
                weights,
            },
        );
    }

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

    /// Adds or removes the filter roles of `service`: its VIP, and its backends where the node
    /// translates their replies (DNAT and SNAT; DSR replies bypass it).
    fn count_filter_roles(&mut self, service: &Service, count: fn(&mut CountedFilter, &Addr, u8)) {
        let key = key_of(service);
        count(&mut self.filter, &key.addr, vip_role(&key));
        if matches!(service.mode, ForwardingMode::Dnat | ForwardingMode::Snat) {
            for b in &service.backends {
                count(&mut self.filter, &Addr::from_ip(b.address), role::BACKEND);
            }
        }
    }
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
