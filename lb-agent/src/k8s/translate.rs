//! Kubernetes Services and EndpointSlices → the agent's desired services ([`config::Service`]).
//!
//! A pure function of the objects, so that the rules are tested on hand-built objects and the
//! watchers only have to keep the objects current. The rules:
//!
//! - **Which Services**: every Service with a spec except `type: ExternalName` and headless ones
//!   (`clusterIP: None`).
//! - **Ports**: every `spec.ports[]` entry with protocol TCP (the default) or UDP; SCTP is skipped
//!   with a note (the datapath balances TCP and UDP only).
//! - **Frontends** of each port, the VIPs the datapath answers on:
//!   - every `spec.clusterIPs[]` (both families of a dual-stack Service; `spec.clusterIP` when the
//!     list is absent), named `<ns>/<name>:<port>`;
//!   - every `spec.externalIPs[]`, named `<ns>/<name>:<port>/external`;
//!   - every `status.loadBalancer.ingress[].ip`, named `<ns>/<name>:<port>/loadbalancer`, except
//!     entries with `ipMode: Proxy` (the load balancer proxies to the node ports itself, so the
//!     node must not capture that IP) and hostname-only entries;
//!   - for `type: NodePort` and `LoadBalancer`, the port's `nodePort` on each of the node's
//!     addresses ([`NodeOptions::addresses`]), named `<ns>/<name>:<port>/nodeport`.
//!
//!   `<port>` is the port's name, or its number when unnamed. A frontend whose family is not one
//!   of the Service's IP families (`spec.ipFamilies`, else the families of its cluster IPs) is
//!   skipped: no endpoint of that family can exist.
//! - **Backends** of a frontend: the endpoints of the Service's EndpointSlices (same namespace,
//!   label `kubernetes.io/service-name: <name>`) whose slice has a port of the same name (unnamed
//!   matches unnamed) and protocol; the backend is the endpoint's first address (as kube-proxy
//!   does) with that slice port's number, kept only when of the frontend's family. Conditions (nil
//!   `ready`/`serving` mean true, nil `terminating` means false):
//!   - `ready` → weight 1;
//!   - not ready but `serving` and `terminating` → weight 0: draining, existing flows continue,
//!     no new flows;
//!   - otherwise (not serving, or not ready and not terminating) → not a backend.
//!
//!   An address in several slices (slices are being rebalanced) is one backend with the highest
//!   weight. With `internalTrafficPolicy: Local` (cluster IPs) or `externalTrafficPolicy: Local`
//!   (external, load-balancer and node-port frontends) only endpoints whose `nodeName` is
//!   [`NodeOptions::node_name`] are backends; without a node name the policy is not applied.
//!   At most [`limits::MAX_BACKENDS_PER_SERVICE`] backends are kept per frontend (ready first,
//!   then by address), with a note.
//! - **Settings**: `sessionAffinity: ClientIP` → [`HashFields::SourceIp`], else five-tuple; mode
//!   DNAT, default Maglev table size, no health check (Kubernetes readiness is the health check).
//! - **Collisions**: two frontends on the same (IP, port, protocol) — e.g. an external IP claimed
//!   by two Services — keep one: cluster IP before load-balancer IP before external IP before
//!   node port, then the lowest `<ns>/<name>`; the other gets a note.
//! - **Order**: the output is sorted by (VIP, port, protocol), so equal inputs give equal outputs
//!   whatever order the objects came in. Services beyond the datapath's capacity
//!   ([`NodeOptions::capacity`]: services, and distinct backends of the services kept before) are
//!   left out in that order, with a note.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fmt,
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort, ServiceSpec},
    discovery::v1::{Endpoint, EndpointSlice},
};
use lb_common::service::limits;
use tracing::debug;

use crate::{
    config::{self, BackendConfig, ForwardingMode, HashFields, Protocol},
    datapath::Capacity,
    maglev,
};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the translation needs to know about the node it runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeOptions {
    /// The node's name (`spec.nodeName` of its pods); enables the `Local` traffic policies.
    pub node_name: Option<String>,
    /// Addresses that NodePort services are served on.
    pub addresses: Vec<IpAddr>,
    /// What the datapath holds (`--max-services`, `--max-backends`): services beyond it are left
    /// out, with a note.
    pub capacity: Capacity,
}

/// The kind of address a frontend is, in order of precedence when two collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    LoadBalancer,
    External,
    NodePort,
}

impl FrontendKind {
    /// Suffix of the service name (`""` for cluster IPs).
    fn suffix(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "",
            FrontendKind::LoadBalancer => "/loadbalancer",
            FrontendKind::External => "/external",
            FrontendKind::NodePort => "/nodeport",
        }
    }

    fn is_external(self) -> bool {
        self != FrontendKind::ClusterIp
    }
}

/// Something of the cluster's state that did not become (all of) a service, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Note {
    /// `<ns>/<name>` of the Service or EndpointSlice, with the port when it concerns one.
    pub object: String,
    pub reason: String,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.reason)
    }
}

/// The result of a translation: the services, and notes on what was left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    pub services: Vec<config::Service>,
    /// Sorted and deduplicated.
    pub notes: Vec<Note>,
}

/// Translates Services and EndpointSlices into desired services (see the module documentation for
/// the rules). Notes on what was skipped are logged at debug level; [`translate`] returns them.
pub fn services_from(
    services: &[impl Borrow<Service>],
    slices: &[impl Borrow<EndpointSlice>],
    node: &NodeOptions,
) -> Vec<config::Service> {
    let translation = translate(services, slices, node);
    for note in &translation.notes {
        debug!(object = %note.object, reason = %note.reason, "left out of the desired state");
    }
    translation.services
}

/// One candidate service before collisions are resolved.
struct Candidate {
    kind: FrontendKind,
    owner: String,
    service: config::Service,
}

/// [`services_from`] that also returns the notes.
pub fn translate(
    services: &[impl Borrow<Service>],
    slices: &[impl Borrow<EndpointSlice>],
    node: &NodeOptions,
) -> Translation {
    let mut notes = BTreeSet::new();
    let mut note = |object: &str, reason: String| {
        notes.insert(Note {
            object: object.to_string(),
            reason,
        });
    };

    // EndpointSlices by the (namespace, name) of their Service.
    let mut slices_of: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let slice = slice.borrow();
        let namespace = slice.metadata.namespace.as_deref().unwrap_or("");
        let owner = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL));
        match owner {
            Some(service) => slices_of
                .entry((namespace, service.as_str()))
                .or_default()
                .push(slice),
            None => note(
                &object_name(namespace, slice.metadata.name.as_deref()),
                format!("EndpointSlice without the {SERVICE_NAME_LABEL} label"),
            ),
        }
    }

    let mut candidates = Vec::new();
    for service in services {
        let service = service.borrow();
        let namespace = service.metadata.namespace.as_deref().unwrap_or("");
        let name = service.metadata.name.as_deref().unwrap_or("");
        let owner = object_name(namespace, Some(name));
        let Some(spec) = &service.spec else {
            note(&owner, "no spec".into());
            continue;
        };
        let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        if service_type == "ExternalName" {
            note(&owner, "ExternalName service: DNS only".into());
            continue;
        }
        if spec.cluster_ip.as_deref() == Some("None") {
            note(&owner, "headless service: DNS only".into());
            continue;
        }

        let frontends = frontends_of(service, spec, &owner, &mut note);
        let families = families_of(spec, &frontends);
        let my_slices = slices_of
            .get(&(namespace, name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let hash = match spec.session_affinity.as_deref() {
            Some("ClientIP") => HashFields::SourceIp,
            _ => HashFields::FiveTuple,
        };
        let local_only = |kind: FrontendKind| {
            let policy = if kind.is_external() {
                spec.external_traffic_policy.as_deref()
            } else {
                spec.internal_traffic_policy.as_deref()
            };
            match (policy, &node.node_name) {
                (Some("Local"), Some(node_name)) => Some(node_name.as_str()),
                _ => None,
            }
        };

        for port in spec.ports.iter().flatten() {
            let port_label = port_label(port);
            let port_owner = format!("{owner}:{port_label}");
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                other => {
                    note(
                        &port_owner,
                        format!("protocol {other} is not balanced (TCP and UDP only)"),
                    );
                    continue;
                }
            };
            let Some(service_port) = valid_port(port.port) else {
                note(&port_owner, format!("invalid port {}", port.port));
                continue;
            };

            let mut port_frontends: Vec<(FrontendKind, IpAddr, u16)> = frontends
                .iter()
                .map(|&(kind, ip)| (kind, ip, service_port))
                .collect();
            if matches!(service_type, "NodePort" | "LoadBalancer") {
                match port.node_port.map(valid_port) {
                    Some(Some(node_port)) => port_frontends.extend(
                        node.addresses
                            .iter()
                            .map(|&ip| (FrontendKind::NodePort, ip, node_port)),
                    ),
                    Some(None) => note(
                        &port_owner,
                        format!("invalid nodePort {}", port.node_port.unwrap_or_default()),
                    ),
                    // No node port allocated (yet, or allocateLoadBalancerNodePorts: false).
                    None => {}
                }
            }

            for (kind, vip, frontend_port) in port_frontends {
                if !families.contains(&is_v6(vip)) {
                    note(
                        &format!("{port_owner}{}", kind.suffix()),
                        format!("{vip} is not of the service's IP families"),
                    );
                    continue;
                }
                let backend_owner = format!("{port_owner}{}", kind.suffix());
                let backends = backends_of(
                    my_slices,
                    port,
                    protocol,
                    is_v6(vip),
                    local_only(kind),
                    &backend_owner,
                    &mut note,
                );
                candidates.push(Candidate {
                    kind,
                    owner: owner.clone(),
                    service: config::Service {
                        name: backend_owner,
                        vip,
                        port: frontend_port,
                        protocol,
                        mode: ForwardingMode::Dnat,
                        snat_address: None,
                        hash,
                        maglev_table_size: maglev::DEFAULT_TABLE_SIZE,
                        backends,
                        health_check: None,
                    },
                });
            }
        }
    }

    // Resolve collisions: by key, then precedence, then owner.
    candidates.sort_by(|a, b| {
        let key = |c: &Candidate| (c.service.vip, c.service.port, c.service.protocol);
        key(a)
            .cmp(&key(b))
            .then(a.kind.cmp(&b.kind))
            .then_with(|| a.owner.cmp(&b.owner))
            .then_with(|| a.service.name.cmp(&b.service.name))
    });
    let mut out: Vec<config::Service> = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        let service = candidate.service;
        if let Some(kept) = out.last() {
            if (kept.vip, kept.port, kept.protocol) == (service.vip, service.port, service.protocol)
            {
                note(
                    &service.name,
                    format!(
                        "{}:{}/{} is already served for {}",
                        service.vip, service.port, service.protocol, kept.name
                    ),
                );
                continue;
            }
        }
        out.push(service);
    }
    // A desired state beyond the datapath's capacity would be refused whole, so that no change of
    // the cluster would apply any more: the services that do not fit are left out instead.
    let capacity = node.capacity;
    let mut backends = HashSet::new();
    let mut kept = Vec::with_capacity(out.len());
    for service in out {
        let added: HashSet<(IpAddr, u16)> = service
            .backends
            .iter()
            .map(|b| (b.address, b.port))
            .filter(|b| !backends.contains(b))
            .collect();
        if kept.len() >= capacity.services as usize
            || backends.len() + added.len() > capacity.backends as usize
        {
            note(
                &service.name,
                format!(
                    "{}:{}/{} left out: the datapath holds {} services and {} backends \
                     (--max-services, --max-backends)",
                    service.vip,
                    service.port,
                    service.protocol,
                    capacity.services,
                    capacity.backends
                ),
            );
            continue;
        }
        backends.extend(added);
        kept.push(service);
    }
    Translation {
        services: kept,
        notes: notes.into_iter().collect(),
    }
}

fn object_name(namespace: &str, name: Option<&str>) -> String {
    format!("{namespace}/{}", name.unwrap_or(""))
}

fn port_label(port: &ServicePort) -> String {
    match port.name.as_deref() {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => port.port.to_string(),
    }
}

fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&p| p != 0)
}

fn is_v6(ip: IpAddr) -> bool {
    ip.is_ipv6()
}

/// The addresses a Service answers on besides node ports, in a stable order.
fn frontends_of(
    service: &Service,
    spec: &ServiceSpec,
    owner: &str,
    note: &mut impl FnMut(&str, String),
) -> Vec<(FrontendKind, IpAddr)> {
    let mut frontends = Vec::new();
    let mut add = |kind: FrontendKind, text: &str, note: &mut dyn FnMut(&str, String)| match text
        .parse::<IpAddr>(
    ) {
        Ok(ip) => {
            if !frontends.contains(&(kind, ip)) {
                frontends.push((kind, ip));
            }
        }
        Err(_) => note(
            &format!("{owner}{}", kind.suffix()),
            format!("invalid IP address {text:?}"),
        ),
    };
    let cluster_ips: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    for ip in cluster_ips.into_iter().filter(|ip| !ip.is_empty()) {
        add(FrontendKind::ClusterIp, ip, note);
    }
    for ip in spec.external_ips.iter().flatten() {
        add(FrontendKind::External, ip, note);
    }
    let ingress = service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for entry in ingress.into_iter().flatten() {
        let Some(ip) = entry.ip.as_deref() else {
            continue; // hostname-only: the load balancer resolves it, nothing to capture here
        };
        if entry.ip_mode.as_deref() == Some("Proxy") {
            note(
                &format!("{owner}{}", FrontendKind::LoadBalancer.suffix()),
                format!("{ip} has ipMode Proxy: the load balancer forwards to node ports"),
            );
            continue;
        }
        add(FrontendKind::LoadBalancer, ip, note);
    }
    frontends
}

/// The address families (`true` = IPv6) of a Service.
fn families_of(spec: &ServiceSpec, frontends: &[(FrontendKind, IpAddr)]) -> BTreeSet<bool> {
    let declared: BTreeSet<bool> = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|family| match family.as_str() {
            "IPv4" => Some(false),
            "IPv6" => Some(true),
            _ => None,
        })
        .collect();
    if !declared.is_empty() {
        return declared;
    }
    let from_cluster_ips: BTreeSet<bool> = frontends
        .iter()
        .filter(|(kind, _)| *kind == FrontendKind::ClusterIp)
        .map(|(_, ip)| is_v6(*ip))
        .collect();
    if !from_cluster_ips.is_empty() {
        return from_cluster_ips;
    }
    // Nothing says: accept both.
    [false, true].into_iter().collect()
}

/// `(ready, serving, terminating)` with the API's defaults for nil.
fn conditions(endpoint: &Endpoint) -> (bool, bool, bool) {
    let c = endpoint.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let serving = c.and_then(|c| c.serving).unwrap_or(true);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    (ready, serving, terminating)
}

fn backends_of(
    slices: &[&EndpointSlice],
    port: &ServicePort,
    protocol: Protocol,
    v6: bool,
    local_node: Option<&str>,
    owner: &str,
    note: &mut impl FnMut(&str, String),
) -> Vec<BackendConfig> {
    let port_name = port.name.as_deref().unwrap_or("");
    let mut weights: BTreeMap<(IpAddr, u16), u32> = BTreeMap::new();
    for slice in slices {
        match (slice.address_type.as_str(), v6) {
            ("IPv4", false) | ("IPv6", true) => {}
            _ => continue, // FQDN slices, or the other family
        }
        let slice_port = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == protocol_name(protocol)
        });
        let Some(slice_port) = slice_port else {
            continue;
        };
        let Some(target_port) = slice_port.port.and_then(valid_port) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            if local_node.is_some() && endpoint.node_name.as_deref() != local_node {
                continue; // a Local traffic policy, and not an endpoint of this node
            }
            let (ready, serving, terminating) = conditions(endpoint);
            let weight = if ready {
                1
            } else if serving && terminating {
                0
            } else {
                continue;
            };
            let Some(text) = endpoint.addresses.first() else {
                continue;
            };
            let Ok(address) = text.parse::<IpAddr>() else {
                note(
                    &object_name(
                        slice.metadata.namespace.as_deref().unwrap_or(""),
                        slice.metadata.name.as_deref(),
                    ),
                    format!("invalid endpoint address {text:?}"),
                );
                continue;
            };
            if is_v6(address) != v6 {
                continue;
            }
            let entry = weights.entry((address, target_port)).or_insert(weight);
            *entry = (*entry).max(weight);
        }
    }
    let mut backends: Vec<BackendConfig> = weights
        .into_iter()
        .map(|((address, port), weight)| BackendConfig {
            address,
            port,
            weight,
        })
        .collect();
    let max = limits::MAX_BACKENDS_PER_SERVICE as usize;
    if backends.len() > max {
        note(
            owner,
            format!(
                "{} endpoints, the datapath balances at most {max}: kept ready ones first",
                backends.len()
            ),
        );
        // Stable sort keeps address order within each weight.
        backends.sort_by_key(|b| std::cmp::Reverse(b.weight));
        backends.truncate(max);
        backends.sort_by_key(|b| (b.address, b.port));
    }
    backends
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

#[cfg(test)]
mod tests;
