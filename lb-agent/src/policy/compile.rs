//! Compiles the policy model and the identities into the exact entries of the datapath's maps.
//!
//! The result, [`CompiledPolicy`], is plain ordered collections of `lb_common::policy` keys and values
//! (keys stamped with epoch 0; the writer sets the epoch it writes), deterministic for a given config
//! and identity state, so the reconciler can compare two of them and write a whole new epoch. The
//! steps, in order:
//!
//! 1. identities: one per workload label set, one per policy CIDR (see [`super::identity`]);
//! 2. ipcache: `/0` → world-ipv4/6, policy CIDRs → CIDR identities, then exact workload and host
//!    addresses (which win over a CIDR of the same prefix);
//! 3. endpoints: local workload addresses, with the audit flag (per workload or global);
//! 4. policy: for every rule, every local endpoint identity it selects, every peer identity (`ANY`
//!    for `entity: all`, `WORLD` for `entity: world`) and port block, one entry; merged deny-over-allow; then every allow under an explicit deny is dropped so
//!    longest-prefix match cannot prefer it (see `lb_common::policy`, "How userspace makes those
//!    lookups correct"); then the default-deny roots of the selected (identity, direction) pairs.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    rc::Rc,
};

use lb_common::policy::{
    endpoint_flags, identity, limits, Direction, EndpointInfo, EntryKind, IpKeyV4, IpKeyV6,
    IpcacheEntry, Lpm, PolicyEntry, PolicyKey, PortBlock, PortBlocks,
};

use super::{
    identity::{IdentityAllocator, IdentityKey},
    model::{
        Action, Cidr, Enforcement, Entity, Labels, Peer, PolicyConfig, PolicyError, Protocol, Rule,
        Selector, WorkloadStatus, NAMESPACE_NAME_LABEL,
    },
};

/// Every map entry of one rule set, epoch 0.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CompiledPolicy {
    pub ipcache_v4: BTreeMap<Lpm<IpKeyV4>, IpcacheEntry>,
    pub ipcache_v6: BTreeMap<Lpm<IpKeyV6>, IpcacheEntry>,
    pub endpoints_v4: BTreeMap<IpKeyV4, EndpointInfo>,
    pub endpoints_v6: BTreeMap<IpKeyV6, EndpointInfo>,
    pub policy: BTreeMap<Lpm<PolicyKey>, PolicyEntry>,
    /// Rule table for verdict reports: `rules[id - 1]` is rule `id`.
    pub rules: Vec<RuleInfo>,
    /// What each non-reserved identity in the maps stands for.
    pub identities: BTreeMap<u32, IdentityKey>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub id: u32,
    pub name: String,
    /// Config path the rule came from, e.g. `policy.rules[3]` or `policy.network_policies[0]`.
    pub source: String,
    pub direction: Direction,
    pub action: Action,
}

impl CompiledPolicy {
    /// Whether both hold the same map entries (rule and identity descriptions aside).
    pub fn same_entries(&self, other: &Self) -> bool {
        self.ipcache_v4 == other.ipcache_v4
            && self.ipcache_v6 == other.ipcache_v6
            && self.endpoints_v4 == other.endpoints_v4
            && self.endpoints_v6 == other.endpoints_v6
            && self.policy == other.policy
    }

    /// Map entries of the rule set.
    pub fn entries(&self) -> usize {
        self.ipcache_v4.len()
            + self.ipcache_v6.len()
            + self.endpoints_v4.len()
            + self.endpoints_v6.len()
            + self.policy.len()
    }

    /// The rule a verdict names; `None` for 0 (no rule / built-in).
    pub fn rule(&self, id: u32) -> Option<&RuleInfo> {
        id.checked_sub(1).and_then(|i| self.rules.get(i as usize))
    }

    /// Readable name of an identity, for logs and test failures.
    pub fn identity_name(&self, id: u32) -> String {
        if let Some(name) = identity::reserved_name(id) {
            return name.to_string();
        }
        match self.identities.get(&id) {
            Some(IdentityKey::Workload { namespace, labels }) => {
                let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{id} ({namespace}: {})", labels.join(","))
            }
            Some(IdentityKey::Cidr(c)) => format!("{id} (cidr {c})"),
            None => format!("{id} (unknown)"),
        }
    }
}

/// Maps an interface name to its index; `None` while it does not exist (the entry then says 0).
pub type IfindexOf<'a> = &'a dyn Fn(&str) -> Option<u32>;

/// Compiles `config` (validated here) with `identities`, which keeps identities stable across calls
/// and forgets those no longer used.
pub fn compile(
    config: &PolicyConfig,
    identities: &mut IdentityAllocator,
    ifindex_of: IfindexOf<'_>,
) -> Result<CompiledPolicy, PolicyError> {
    config.validate()?;
    let rules = config.rules_with_paths()?;
    let mut out = CompiledPolicy::default();

    // 1. Identities. A CIDR that is exactly a workload or host address would be shadowed in the
    //    ipcache by that address, so it gets no identity.
    let exact_addrs: BTreeSet<IpAddr> = config
        .host_addresses
        .iter()
        .chain(config.workloads.iter().flat_map(|w| &w.addresses))
        .copied()
        .collect();
    let cidrs: BTreeSet<Cidr> = rules
        .iter()
        .flat_map(|(_, r)| &r.peers)
        .flat_map(|p| p.cidr.iter().chain(&p.except))
        .filter(|c| {
            c.prefix_len() != 0 && !(**c == Cidr::host(c.addr()) && exact_addrs.contains(&c.addr()))
        })
        .copied()
        .collect();
    let mut keys: BTreeSet<IdentityKey> = cidrs.iter().map(|c| IdentityKey::Cidr(*c)).collect();
    for w in &config.workloads {
        if w.status == WorkloadStatus::Ready {
            keys.insert(IdentityKey::workload(&w.namespace, &w.labels));
        }
    }
    let allocated = identities
        .allocate_all(&keys)
        .map_err(|e| PolicyError::new("policy", e.to_string()))?;
    identities.retain(&keys.iter().collect());
    out.identities = allocated.iter().map(|(k, id)| (*id, k.clone())).collect();
    let identity_of_workload = |w: &super::model::Workload| match w.status {
        WorkloadStatus::Ready => allocated[&IdentityKey::workload(&w.namespace, &w.labels)],
        WorkloadStatus::Init => identity::INIT,
        WorkloadStatus::Unmanaged => identity::UNMANAGED,
    };

    // 2. ipcache.
    let mut ipcache = Ipcache::default();
    ipcache.insert(
        Cidr::masked(IpAddr::from([0u8; 4]), 0).unwrap(),
        identity::WORLD_IPV4,
    );
    ipcache.insert(
        Cidr::masked(IpAddr::from([0u8; 16]), 0).unwrap(),
        identity::WORLD_IPV6,
    );
    for cidr in &cidrs {
        ipcache.insert(*cidr, allocated[&IdentityKey::Cidr(*cidr)]);
    }
    for addr in &config.host_addresses {
        ipcache.insert(Cidr::host(*addr), identity::HOST);
    }
    for w in &config.workloads {
        for addr in &w.addresses {
            ipcache.insert(Cidr::host(*addr), identity_of_workload(w));
        }
    }
    (out.ipcache_v4, out.ipcache_v6) = ipcache.into_maps();

    // 3. Endpoints, and what the selection step needs to know about identities.
    let mut workload_ids: BTreeMap<u32, IdentityFacts> = BTreeMap::new();
    let mut local_ids: BTreeSet<u32> = BTreeSet::new();
    for w in &config.workloads {
        let id = identity_of_workload(w);
        if w.status == WorkloadStatus::Ready {
            let facts = workload_ids.entry(id).or_insert_with(|| IdentityFacts {
                namespace: w.namespace.clone(),
                labels: w.labels.clone(),
                ports: BTreeMap::new(),
                local_ports: BTreeMap::new(),
            });
            for p in &w.ports {
                let key = (p.name.clone(), p.protocol);
                facts.ports.entry(key.clone()).or_default().insert(p.port);
                if w.is_local() {
                    facts.local_ports.entry(key).or_default().insert(p.port);
                }
            }
        }
        let Some(interface) = &w.interface else {
            continue;
        };
        if w.status == WorkloadStatus::Unmanaged {
            continue;
        }
        local_ids.insert(id);
        let audit = config.audit || w.enforcement == Enforcement::Audit;
        let info = EndpointInfo {
            identity: id,
            ifindex: ifindex_of(interface).unwrap_or(0),
            flags: if audit { endpoint_flags::AUDIT } else { 0 },
        };
        for addr in &w.addresses {
            match addr {
                IpAddr::V4(a) => out.endpoints_v4.insert(IpKeyV4::exact(0, *a), info),
                IpAddr::V6(a) => out.endpoints_v6.insert(IpKeyV6::exact(0, *a), info),
            };
        }
    }

    // 4. Policy entries.
    let namespace_labels = namespace_labels(config);
    let mut selection = Selection {
        workload_ids: &workload_ids,
        namespace_labels: &namespace_labels,
        cidr_ids: cidrs
            .iter()
            .map(|c| (cidr_order(c), allocated[&IdentityKey::Cidr(*c)]))
            .collect(),
        peer_cache: HashMap::new(),
    };
    let mut builder = PolicyBuilder::default();
    for (index, (source, rule)) in rules.iter().enumerate() {
        let rule_id = index as u32 + 1;
        out.rules.push(RuleInfo {
            id: rule_id,
            name: rule.name.clone(),
            source: source.clone(),
            direction: rule.direction,
            action: rule.action,
        });
        let endpoints: Vec<u32> = local_ids
            .iter()
            .copied()
            .filter(|id| {
                workload_ids.get(id).is_some_and(|f| {
                    rule.namespace.as_ref().is_none_or(|ns| *ns == f.namespace)
                        && rule.endpoints.matches(&f.labels)
                })
            })
            .collect();
        if endpoints.is_empty() {
            continue;
        }
        let peers: BTreeSet<u32> = rule
            .peers
            .iter()
            .flat_map(|p| {
                selection
                    .peer_identities(rule, p)
                    .iter()
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect();
        let kind = match rule.action {
            Action::Allow => EntryKind::Allow,
            Action::Deny => EntryKind::Deny,
        };
        let entry = PolicyEntry::new(kind, rule_id);
        for &endpoint in &endpoints {
            if rule.default_deny {
                builder.select(rule.direction, endpoint, rule_id);
            }
            for (peer, port) in rule_ports(rule, endpoint, &peers, &workload_ids) {
                let key = match port {
                    None => PolicyKey::peer(0, rule.direction, endpoint, peer),
                    Some((proto, block)) => {
                        PolicyKey::ports(0, rule.direction, endpoint, peer, proto, block)
                    }
                };
                builder.add(key, entry);
            }
        }
    }
    // Endpoints whose labels are not known yet are selected by nothing and open to nothing.
    if local_ids.contains(&identity::INIT) {
        for dir in Direction::ALL {
            builder.select(dir, identity::INIT, 0);
        }
    }
    out.policy = builder.finish();

    out.check_capacity()?;
    Ok(out)
}

/// What rules need to know about a workload identity.
struct IdentityFacts {
    namespace: String,
    labels: Labels,
    /// Named ports of all workloads of this identity (for egress rules towards them).
    ports: BTreeMap<(String, Protocol), BTreeSet<u16>>,
    /// ... of its workloads on this node (for ingress rules, which are enforced here).
    local_ports: BTreeMap<(String, Protocol), BTreeSet<u16>>,
}

/// Namespace labels, with Kubernetes' implicit name label, for every namespace named anywhere.
fn namespace_labels(config: &PolicyConfig) -> HashMap<String, Labels> {
    let mut out: HashMap<String, Labels> = HashMap::new();
    for w in &config.workloads {
        out.entry(w.namespace.clone()).or_default();
    }
    for ns in &config.namespaces {
        out.insert(ns.name.clone(), ns.labels.clone());
    }
    for (name, labels) in out.iter_mut() {
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.clone());
    }
    out
}

/// Sort key placing every prefix inside `c` in one contiguous range after `c`.
type CidrOrder = (bool, u128, u8);

fn cidr_order(c: &Cidr) -> CidrOrder {
    (!c.is_ipv4(), c.range().0, c.prefix_len())
}

/// Resolves peers to identities, caching selector results (many rules share selectors).
struct Selection<'a> {
    workload_ids: &'a BTreeMap<u32, IdentityFacts>,
    namespace_labels: &'a HashMap<String, Labels>,
    cidr_ids: BTreeMap<CidrOrder, u32>,
    peer_cache: HashMap<(Option<String>, Peer), Rc<BTreeSet<u32>>>,
}

impl Selection<'_> {
    fn peer_identities(&mut self, rule: &Rule, peer: &Peer) -> Rc<BTreeSet<u32>> {
        // Only selectors without `namespaces` depend on the rule's namespace.
        let scope = if peer.selector.is_some() && peer.namespaces.is_none() {
            rule.namespace.clone()
        } else {
            None
        };
        let key = (scope, peer.clone());
        if let Some(hit) = self.peer_cache.get(&key) {
            return hit.clone();
        }
        let ids = Rc::new(self.resolve(&key.0, peer));
        self.peer_cache.insert(key, ids.clone());
        ids
    }

    fn resolve(&self, scope: &Option<String>, peer: &Peer) -> BTreeSet<u32> {
        if let Some(entity) = peer.entity {
            return match entity {
                Entity::All => [identity::ANY].into(),
                // One class entry: the datapath's `world` lookup covers every CIDR identity.
                Entity::World => [identity::WORLD].into(),
                Entity::Host => [identity::HOST].into(),
                Entity::Unmanaged => [identity::UNMANAGED].into(),
                Entity::Init => [identity::INIT].into(),
            };
        }
        if let Some(cidr) = &peer.cidr {
            return self.cidr_identities(cidr, &peer.except);
        }
        let all = Selector::default();
        let selector = peer.selector.as_ref().unwrap_or(&all);
        let no_labels = Labels::new();
        self.workload_ids
            .iter()
            .filter(|(_, f)| {
                let in_namespace = match (&peer.namespaces, scope) {
                    (Some(ns), _) => ns.matches(
                        self.namespace_labels
                            .get(&f.namespace)
                            .unwrap_or(&no_labels),
                    ),
                    (None, Some(scope)) => *scope == f.namespace,
                    (None, None) => true,
                };
                in_namespace && selector.matches(&f.labels)
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// The CIDR identities of policy prefixes inside `cidr` and not inside any `except`, plus the
    /// family's world identity for `/0`.
    fn cidr_identities(&self, cidr: &Cidr, except: &[Cidr]) -> BTreeSet<u32> {
        let (start, end) = cidr.range();
        let v6 = !cidr.is_ipv4();
        let mut out: BTreeSet<u32> = self
            .cidr_ids
            .range((v6, start, 0)..=(v6, end, u8::MAX))
            .filter(|((_, s, len), _)| {
                // A shorter prefix starting at `start` contains `cidr` rather than lies in it.
                *len >= cidr.prefix_len()
                    && !except.iter().any(|e| {
                        let (es, ee) = e.range();
                        *len >= e.prefix_len() && (es..=ee).contains(s)
                    })
            })
            .map(|(_, id)| *id)
            .collect();
        if cidr.prefix_len() == 0 {
            out.insert(if v6 {
                identity::WORLD_IPV6
            } else {
                identity::WORLD_IPV4
            });
        }
        out
    }
}

/// (peer, optional (protocol, port block)) pairs of a rule for one local endpoint identity; `None`
/// is "every protocol and port".
fn rule_ports(
    rule: &Rule,
    endpoint: u32,
    peers: &BTreeSet<u32>,
    workload_ids: &BTreeMap<u32, IdentityFacts>,
) -> Vec<(u32, Option<(u8, PortBlock)>)> {
    let mut out = Vec::new();
    if rule.ports.is_empty() {
        out.extend(peers.iter().map(|p| (*p, None)));
        return out;
    }
    for spec in &rule.ports {
        let proto = spec.protocol.number();
        let Some(name) = &spec.name else {
            let blocks: Vec<PortBlock> = match spec.port {
                None => vec![PortBlock::ALL],
                Some(first) => PortBlocks::new(first, spec.end_port.unwrap_or(first)).collect(),
            };
            for peer in peers {
                out.extend(blocks.iter().map(|b| (*peer, Some((proto, *b)))));
            }
            continue;
        };
        // Named ports are resolved on the workload that listens: the local endpoint for ingress,
        // the peer for egress (only workloads have named ports; a wildcard peer means every
        // workload that has the name).
        let key = (name.clone(), spec.protocol);
        let single = |port: u16| {
            Some((
                proto,
                PortBlock {
                    start: port,
                    prefix_bits: 16,
                },
            ))
        };
        match rule.direction {
            Direction::Ingress => {
                let ports = workload_ids
                    .get(&endpoint)
                    .and_then(|f| f.local_ports.get(&key));
                for peer in peers {
                    out.extend(ports.into_iter().flatten().map(|p| (*peer, single(*p))));
                }
            }
            Direction::Egress => {
                let targets: Vec<u32> = if peers.contains(&identity::ANY) {
                    workload_ids.keys().copied().collect()
                } else {
                    peers.iter().copied().collect()
                };
                for peer in targets {
                    let ports = workload_ids.get(&peer).and_then(|f| f.ports.get(&key));
                    out.extend(ports.into_iter().flatten().map(|p| (peer, single(*p))));
                }
            }
        }
    }
    out
}

/// Collects policy entries and applies deny precedence.
#[derive(Default)]
struct PolicyBuilder {
    entries: HashMap<Lpm<PolicyKey>, PolicyEntry>,
    /// (direction, endpoint identity) → lowest id of the rules that select it.
    selected: BTreeMap<(u8, u32), u32>,
}

impl PolicyBuilder {
    fn select(&mut self, dir: Direction, endpoint: u32, rule_id: u32) {
        let slot = self
            .selected
            .entry((dir as u8, endpoint))
            .or_insert(rule_id);
        *slot = (*slot).min(rule_id);
    }

    /// Same key from two rules: deny over allow, then the lower rule id.
    fn add(&mut self, key: Lpm<PolicyKey>, entry: PolicyEntry) {
        let rank = |e: &PolicyEntry| (e.kind() != EntryKind::Deny, e.rule_id);
        self.entries
            .entry(key)
            .and_modify(|old| {
                if rank(&entry) < rank(old) {
                    *old = entry;
                }
            })
            .or_insert(entry);
    }

    fn finish(self) -> BTreeMap<Lpm<PolicyKey>, PolicyEntry> {
        let is_deny = |k: &Lpm<PolicyKey>| {
            self.entries
                .get(k)
                .is_some_and(|e| e.kind() == EntryKind::Deny)
        };
        let mut out: BTreeMap<_, _> = self
            .entries
            .iter()
            .filter(|(key, entry)| {
                entry.kind() != EntryKind::Allow || !ancestors(key).any(|a| is_deny(&a))
            })
            .map(|(k, e)| (*k, *e))
            .collect();
        for ((dir, endpoint), rule_id) in &self.selected {
            let dir = if *dir == Direction::Ingress as u8 {
                Direction::Ingress
            } else {
                Direction::Egress
            };
            out.insert(
                PolicyKey::endpoint_root(0, dir, *endpoint),
                PolicyEntry::new(EntryKind::DefaultDeny, *rule_id),
            );
        }
        out
    }
}

/// The shorter peer-level keys that contain `key` (the peer key and the port blocks around it).
fn ancestors(key: &Lpm<PolicyKey>) -> impl Iterator<Item = Lpm<PolicyKey>> + '_ {
    let k = key.data;
    let dir = if k.direction == Direction::Ingress as u8 {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    let peer = (key.prefix_len > PolicyKey::PREFIX_PEER)
        .then(|| PolicyKey::peer(k.epoch, dir, k.endpoint_identity, k.peer_identity));
    let port = k.dport_host();
    let port_bits = key.prefix_len.saturating_sub(PolicyKey::PREFIX_PROTOCOL);
    let blocks = (0..port_bits).map(move |bits| {
        let mask = if bits == 0 {
            0
        } else {
            u16::MAX << (16 - bits)
        };
        PolicyKey::ports(
            k.epoch,
            dir,
            k.endpoint_identity,
            k.peer_identity,
            k.protocol,
            PortBlock {
                start: port & mask,
                prefix_bits: bits as u8,
            },
        )
    });
    peer.into_iter().chain(blocks)
}

/// ipcache entries per family; a later insert for the same prefix wins (exact addresses last).
#[derive(Default)]
struct Ipcache {
    entries: BTreeMap<Cidr, u32>,
}

impl Ipcache {
    fn insert(&mut self, cidr: Cidr, id: u32) {
        self.entries.insert(cidr, id);
    }

    fn into_maps(
        self,
    ) -> (
        BTreeMap<Lpm<IpKeyV4>, IpcacheEntry>,
        BTreeMap<Lpm<IpKeyV6>, IpcacheEntry>,
    ) {
        let (mut v4, mut v6) = (BTreeMap::new(), BTreeMap::new());
        for (cidr, identity) in self.entries {
            let value = IpcacheEntry { identity };
            match cidr.addr() {
                IpAddr::V4(a) => v4.insert(IpKeyV4::prefix(0, a, cidr.prefix_len()), value),
                IpAddr::V6(a) => v6.insert(IpKeyV6::prefix(0, a, cidr.prefix_len()), value),
            };
        }
        (v4, v6)
    }
}

impl CompiledPolicy {
    /// Refuses a rule set that needs more entries than the datapath's maps hold (checked when
    /// compiling and again before writing, for rule sets built by other means).
    pub fn check_capacity(&self) -> Result<(), PolicyError> {
        let checks = [
            (
                "ipcache (IPv4)",
                self.ipcache_v4.len(),
                limits::MAX_IPCACHE_ENTRIES,
            ),
            (
                "ipcache (IPv6)",
                self.ipcache_v6.len(),
                limits::MAX_IPCACHE_ENTRIES,
            ),
            (
                "endpoints (IPv4)",
                self.endpoints_v4.len(),
                limits::MAX_ENDPOINTS,
            ),
            (
                "endpoints (IPv6)",
                self.endpoints_v6.len(),
                limits::MAX_ENDPOINTS,
            ),
            ("policy", self.policy.len(), limits::MAX_POLICY_ENTRIES),
        ];
        for (map, used, max) in checks {
            if used > max as usize {
                return Err(PolicyError::new(
                    "policy",
                    format!("needs {used} {map} entries, the datapath holds {max}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests_support {
    use super::*;

    /// Whether no explicit deny of the same peer trie contains `key`.
    pub fn ancestors_have_no_deny(compiled: &CompiledPolicy, key: &Lpm<PolicyKey>) -> bool {
        !ancestors(key).any(|a| {
            compiled
                .policy
                .get(&a)
                .is_some_and(|e| e.kind() == EntryKind::Deny)
        })
    }
}
