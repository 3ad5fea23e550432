//! The agent's desired state: what each source asks for, and their merge into the one [`Config`]
//! that the reconciler applies.
//!
//! **Precedence: the config file, then the gRPC API, then Kubernetes.** The file is the operator's
//! override on this node, the API is a controller acting on purpose, and Kubernetes is the cluster's
//! default. What a higher source defines shadows the same thing from a lower one, whole:
//! - services by (VIP, port, protocol);
//! - policy namespaces by name, workloads by (namespace, name) — and a workload is also shadowed
//!   when one of its addresses already belongs to a workload or host address of a higher source —
//!   rules by name, NetworkPolicies by (namespace, name);
//! - `policy.audit` is on when the file or the API turns it on; host addresses and `cidr_deny`
//!   are the union.
//!
//! The endpoints the CNI plugin registered ([`crate::endpoints`]) come last: they name no workload
//! of their own but the host interface of a pod. Each goes on the merged workload of its pod's
//! namespace/name (its addresses too, when that workload has none); a pod no source defines gets a
//! workload of its own, in its namespace, with no labels (so rules selecting every endpoint of
//! the namespace, `endpoints: {}`, apply to it, label selectors do not). An endpoint is left out
//! (a conflict) when that workload already names another interface, or when a workload of its own
//! would take an address another workload or host already has.
//!
//! Every shadowed item is reported as a [`Conflict`] (the agent logs each one once, and sends it
//! on the gRPC event stream). The top-level settings (`maglev_seed`, `node`) come from the file.

use std::{
    collections::{BTreeSet, HashSet},
    fmt,
    net::IpAddr,
};

use crate::{
    config::{self, Config},
    endpoints::{Endpoint, Placement},
    policy::{model::Workload, PolicyConfig},
};

/// A source of desired state, highest precedence first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    File,
    Grpc,
    Kubernetes,
    /// Endpoints registered by the CNI plugin.
    Cni,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::File => "config file",
            Source::Grpc => "gRPC API",
            Source::Kubernetes => "Kubernetes",
            Source::Cni => "CNI registration",
        })
    }
}

/// Something a lower source defines that a higher one already does; the lower one's is left out.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Conflict {
    /// E.g. `service 198.51.100.10:80/tcp (web)` or `policy workload prod/api-1`.
    pub what: String,
    pub shadowed: Source,
    pub by: Source,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} from the {} is shadowed by the {}",
            self.what, self.shadowed, self.by
        )
    }
}

/// The desired state from every source.
#[derive(Debug, Clone, Default)]
pub struct Desired {
    pub file: Config,
    pub grpc_services: Vec<config::Service>,
    pub grpc_policy: Option<PolicyConfig>,
    pub kubernetes_services: Vec<config::Service>,
    pub kubernetes_policy: PolicyConfig,
    /// Registered by the CNI plugin, ordered by key.
    pub endpoints: Vec<Endpoint>,
}

/// The merge of every source, and what it left out.
#[derive(Debug, Clone, Default)]
pub struct Merged {
    pub config: Config,
    pub conflicts: BTreeSet<Conflict>,
}

impl Desired {
    pub fn new(file: Config) -> Self {
        Self {
            file,
            ..Self::default()
        }
    }

    /// Merges the sources by precedence (see the module documentation).
    pub fn merged(&self) -> Merged {
        let mut conflicts = BTreeSet::new();
        let mut config = self.file.clone();
        config.services = merge_services(
            [
                (Source::File, &self.file.services),
                (Source::Grpc, &self.grpc_services),
                (Source::Kubernetes, &self.kubernetes_services),
            ],
            &mut conflicts,
        );
        config.policy = self.merge_policy_sources(&mut conflicts);
        Merged { config, conflicts }
    }

    /// The policy part of [`Desired::merged`] alone (conflicts are reported by the full merge).
    pub fn merged_policy(&self) -> PolicyConfig {
        self.merge_policy_sources(&mut BTreeSet::new())
    }

    /// Where each of [`Desired::endpoints`] went in the merged policy, in their order.
    pub fn endpoint_placements(&self) -> Vec<Placement> {
        self.merge_policy_and_place(&mut BTreeSet::new()).1
    }

    fn merge_policy_sources(&self, conflicts: &mut BTreeSet<Conflict>) -> PolicyConfig {
        self.merge_policy_and_place(conflicts).0
    }

    fn merge_policy_and_place(
        &self,
        conflicts: &mut BTreeSet<Conflict>,
    ) -> (PolicyConfig, Vec<Placement>) {
        let empty = PolicyConfig::default();
        merge_policies(
            [
                (Source::File, &self.file.policy),
                (Source::Grpc, self.grpc_policy.as_ref().unwrap_or(&empty)),
                (Source::Kubernetes, &self.kubernetes_policy),
            ],
            &self.endpoints,
            conflicts,
        )
    }
}

/// Keeps the first definition of every name in `items` (in source order) and reports the rest.
struct FirstWins<K> {
    seen: std::collections::HashMap<K, Source>,
}

impl<K: std::hash::Hash + Eq> FirstWins<K> {
    fn new() -> Self {
        Self {
            seen: Default::default(),
        }
    }

    /// `true` if `key` is new (and now taken by `source`); otherwise records a conflict.
    fn take(
        &mut self,
        key: K,
        source: Source,
        what: impl FnOnce() -> String,
        conflicts: &mut BTreeSet<Conflict>,
    ) -> bool {
        match self.seen.get(&key) {
            Some(&by) => {
                conflicts.insert(Conflict {
                    what: what(),
                    shadowed: source,
                    by,
                });
                false
            }
            None => {
                self.seen.insert(key, source);
                true
            }
        }
    }
}

fn merge_services(
    sources: [(Source, &Vec<config::Service>); 3],
    conflicts: &mut BTreeSet<Conflict>,
) -> Vec<config::Service> {
    let mut taken = FirstWins::new();
    let mut out = Vec::new();
    for (source, services) in sources {
        for service in services {
            let key = (service.vip, service.port, service.protocol);
            let what = || {
                let vip = match service.vip {
                    IpAddr::V4(ip) => ip.to_string(),
                    IpAddr::V6(ip) => format!("[{ip}]"),
                };
                format!(
                    "service {vip}:{}/{} ({})",
                    service.port, service.protocol, service.name
                )
            };
            if taken.take(key, source, what, conflicts) {
                out.push(service.clone());
            }
        }
    }
    out
}

fn merge_policies(
    sources: [(Source, &PolicyConfig); 3],
    endpoints: &[Endpoint],
    conflicts: &mut BTreeSet<Conflict>,
) -> (PolicyConfig, Vec<Placement>) {
    let mut out = PolicyConfig::default();
    let mut namespaces = FirstWins::new();
    let mut workloads = FirstWins::new();
    let mut addresses: FirstWins<IpAddr> = FirstWins::new();
    let mut rules = FirstWins::new();
    let mut network_policies = FirstWins::new();
    let mut host_addresses = HashSet::new();
    let mut cidr_deny = HashSet::new();
    for (source, policy) in sources {
        if source != Source::Kubernetes {
            out.audit |= policy.audit;
        }
        for cidr in &policy.cidr_deny {
            if cidr_deny.insert(*cidr) {
                out.cidr_deny.push(*cidr);
            }
        }
        for addr in &policy.host_addresses {
            if host_addresses.insert(*addr) {
                out.host_addresses.push(*addr);
                addresses.seen.entry(*addr).or_insert(source);
            }
        }
        for ns in &policy.namespaces {
            let what = || format!("policy namespace {}", ns.name);
            if namespaces.take(ns.name.clone(), source, what, conflicts) {
                out.namespaces.push(ns.clone());
            }
        }
        for w in &policy.workloads {
            let what = || format!("policy workload {}/{}", w.namespace, w.name);
            let key = (w.namespace.clone(), w.name.clone());
            if !workloads.take(key, source, what, conflicts) {
                continue;
            }
            if let Some(conflict) = address_conflict(w, source, &addresses) {
                conflicts.insert(conflict);
                continue;
            }
            for addr in &w.addresses {
                addresses.seen.insert(*addr, source);
            }
            out.workloads.push(w.clone());
        }
        for rule in &policy.rules {
            let what = || format!("policy rule {}", rule.name);
            if rules.take(rule.name.clone(), source, what, conflicts) {
                out.rules.push(rule.clone());
            }
        }
        for manifest in &policy.network_policies {
            let meta = &manifest.0.metadata;
            let key = (meta.namespace.clone(), meta.name.clone());
            let what = || {
                format!(
                    "NetworkPolicy {}/{}",
                    meta.namespace.as_deref().unwrap_or("default"),
                    meta.name.as_deref().unwrap_or("")
                )
            };
            if network_policies.take(key, source, what, conflicts) {
                out.network_policies.push(manifest.clone());
            }
        }
    }
    let placements = endpoints
        .iter()
        .map(|endpoint| place_endpoint(&mut out, endpoint, &workloads, &mut addresses, conflicts))
        .collect();
    (out, placements)
}

/// Puts a registered endpoint's interface on its pod's workload in `policy`, or on a workload of
/// its own (see the module documentation).
fn place_endpoint(
    policy: &mut PolicyConfig,
    endpoint: &Endpoint,
    workloads: &FirstWins<(String, String)>,
    addresses: &mut FirstWins<IpAddr>,
    conflicts: &mut BTreeSet<Conflict>,
) -> Placement {
    let pod = format!("{}/{}", endpoint.namespace, endpoint.pod);
    let key = (endpoint.namespace.clone(), endpoint.pod.clone());
    let existing = policy
        .workloads
        .iter_mut()
        .find(|w| w.namespace == endpoint.namespace && w.name == endpoint.pod);
    if let Some(workload) = existing {
        let by = workloads.seen.get(&key).copied().unwrap_or(Source::Cni);
        match &workload.interface {
            Some(interface) if *interface != endpoint.host_interface => {
                conflicts.insert(Conflict {
                    what: format!(
                        "endpoint {} of pod {pod} (its workload names interface {interface})",
                        endpoint.host_interface
                    ),
                    shadowed: Source::Cni,
                    by,
                });
                return Placement::NotPlaced;
            }
            Some(_) => {}
            None if workload.addresses.is_empty() => {
                if let Some(conflict) = address_taken(endpoint, &pod, addresses) {
                    conflicts.insert(conflict);
                    return Placement::NotPlaced;
                }
                workload.addresses = endpoint.addresses.clone();
                workload.interface = Some(endpoint.host_interface.clone());
            }
            None => workload.interface = Some(endpoint.host_interface.clone()),
        }
        return Placement::SourceWorkload;
    }
    if let Some(conflict) = address_taken(endpoint, &pod, addresses) {
        conflicts.insert(conflict);
        return Placement::NotPlaced;
    }
    for address in &endpoint.addresses {
        addresses.seen.insert(*address, Source::Cni);
    }
    policy.workloads.push(Workload {
        name: endpoint.pod.clone(),
        namespace: endpoint.namespace.clone(),
        labels: Default::default(),
        addresses: endpoint.addresses.clone(),
        interface: Some(endpoint.host_interface.clone()),
        enforcement: Default::default(),
        status: Default::default(),
        ports: Vec::new(),
    });
    Placement::OwnWorkload
}

/// The conflict of an endpoint of `pod` (`namespace/name`) when a workload or host address
/// already has one of its addresses (the first such address names it).
fn address_taken(
    endpoint: &Endpoint,
    pod: &str,
    addresses: &FirstWins<IpAddr>,
) -> Option<Conflict> {
    endpoint.addresses.iter().find_map(|address| {
        addresses.seen.get(address).map(|&by| Conflict {
            what: format!(
                "endpoint {} of pod {pod} (address {address} is taken)",
                endpoint.host_interface
            ),
            shadowed: Source::Cni,
            by,
        })
    })
}

/// A workload whose address a higher (or earlier) source already gave to another workload or host.
fn address_conflict(
    workload: &Workload,
    source: Source,
    addresses: &FirstWins<IpAddr>,
) -> Option<Conflict> {
    workload.addresses.iter().find_map(|addr| {
        addresses.seen.get(addr).map(|&by| Conflict {
            what: format!(
                "policy workload {}/{} (address {addr} is taken)",
                workload.namespace, workload.name
            ),
            shadowed: source,
            by,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, vip: &str, backend: &str) -> config::Service {
        serde_yaml_ng::from_str(&format!(
            "{{name: {name}, vip: \"{vip}\", port: 80, protocol: tcp, \
             backends: [{{address: \"{backend}\", port: 8080}}]}}"
        ))
        .unwrap()
    }

    fn policy(yaml: &str) -> PolicyConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn cidr_deny_lists_are_the_union_of_file_and_grpc() {
        let mut desired = Desired::new(Config {
            policy: policy("{cidr_deny: [203.0.113.0/24]}"),
            ..Config::default()
        });
        desired.grpc_policy = Some(policy(
            "{cidr_deny: [\"2001:db8:bad::/48\", 203.0.113.0/24]}",
        ));
        let merged: Vec<String> = desired
            .merged_policy()
            .cidr_deny
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(merged, ["203.0.113.0/24", "2001:db8:bad::/48"]);
    }

    #[test]
    fn file_then_grpc_then_kubernetes_with_conflicts_reported() {
        let mut desired = Desired::new(Config {
            services: vec![service("file-web", "198.51.100.10", "203.0.113.1")],
            ..Config::default()
        });
        desired.grpc_services = vec![
            service("grpc-web", "198.51.100.10", "203.0.113.2"),
            service("grpc-api", "198.51.100.11", "203.0.113.2"),
        ];
        desired.kubernetes_services = vec![
            service("k8s-api", "198.51.100.11", "203.0.113.3"),
            service("k8s-db", "198.51.100.12", "203.0.113.3"),
        ];
        let merged = desired.merged();
        let names: Vec<&str> = merged
            .config
            .services
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, ["file-web", "grpc-api", "k8s-db"]);
        let conflicts: Vec<String> = merged.conflicts.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            conflicts,
            [
                "service 198.51.100.10:80/tcp (grpc-web) from the gRPC API is shadowed by the config file",
                "service 198.51.100.11:80/tcp (k8s-api) from the Kubernetes is shadowed by the gRPC API",
            ]
        );
        merged.config.validate().unwrap();
    }

    #[test]
    fn policies_merge_by_name_and_address() {
        let mut desired = Desired::new(Config {
            policy: policy(
                "{host_addresses: [192.0.2.1], namespaces: [{name: prod, labels: {team: a}}], \
                 workloads: [{name: api-1, namespace: prod, addresses: [198.51.100.7]}], \
                 rules: [{name: r, endpoints: {}, direction: ingress, action: allow, peers: []}]}",
            ),
            ..Config::default()
        });
        desired.grpc_policy = Some(policy("{audit: true, rules: [{name: r, endpoints: {}, direction: egress, action: allow, peers: []}]}"));
        desired.kubernetes_policy = policy(
            "{namespaces: [{name: prod, labels: {team: b}}, {name: dev}], \
             workloads: [{name: api-1, namespace: prod, addresses: [198.51.100.8]}, \
                         {name: web-1, namespace: dev, addresses: [198.51.100.7]}, \
                         {name: node, namespace: dev, addresses: [192.0.2.1]}, \
                         {name: db-1, namespace: dev, labels: {app: db}, addresses: [198.51.100.9]}]}",
        );
        let merged = desired.merged();
        let p = &merged.config.policy;
        assert!(p.audit);
        assert_eq!(
            p.namespaces
                .iter()
                .map(|n| (n.name.as_str(), n.labels.get("team").map(String::as_str)))
                .collect::<Vec<_>>(),
            [("prod", Some("a")), ("dev", None)]
        );
        assert_eq!(
            p.workloads
                .iter()
                .map(|w| w.name.as_str())
                .collect::<Vec<_>>(),
            ["api-1", "db-1"]
        );
        assert_eq!(
            p.workloads[0].addresses,
            ["198.51.100.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(p.rules.len(), 1);
        assert_eq!(merged.conflicts.len(), 5, "{:#?}", merged.conflicts);
        merged.config.validate().unwrap();
    }
}
