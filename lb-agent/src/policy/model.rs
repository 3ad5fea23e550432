//! The policy section of the agent's YAML config (top-level key `policy:`): workloads, namespaces and
//! rules in a format of our own, plus Kubernetes NetworkPolicy manifests that are translated into it.
//!
//! ```yaml
//! policy:
//!   audit: false                       # true: nothing is dropped, would-be drops are reported
//!   host_addresses: [192.0.2.1]        # this node's addresses: the `host` entity
//!   namespaces:                        # labels for namespace selectors (name label is implicit)
//!     - name: prod
//!       labels: {team: shop}
//!   workloads:                         # every workload the node must know, local or not
//!     - name: api-1
//!       namespace: prod
//!       labels: {app: api}
//!       addresses: [198.51.100.7, "2001:db8::7"]
//!       interface: lxc-api-1           # set: runs here, so its traffic is enforced here
//!       enforcement: enforce           # enforce | audit
//!       ports: [{name: http, port: 8080}]   # for named ports in rules
//!   rules:
//!     - name: api-from-web             # reported with every verdict it decides
//!       namespace: prod                # omitted: the rule applies in every namespace
//!       endpoints: {match_labels: {app: api}}   # the local side; {} = all
//!       direction: ingress             # ingress | egress
//!       action: allow                  # allow | deny (deny wins)
//!       peers:                         # [] = nothing (the rule then only isolates)
//!         - selector: {match_labels: {app: web}}        # same namespace as the rule
//!         - namespaces: {match_labels: {team: ops}}     # all workloads there
//!           selector: {match_expressions: [{key: tier, operator: in, values: [probe]}]}
//!         - cidr: 203.0.113.0/24
//!           except: [203.0.113.128/25]
//!         - entity: world              # all | world | host | unmanaged | init
//!       ports:                         # omitted or []: every protocol and port
//!         - {protocol: tcp, port: 8080}
//!         - {protocol: udp, port: 30000, end_port: 30100}
//!         - {protocol: tcp, name: http}
//!       default_deny: true             # false: the rule does not isolate its endpoints
//!   network_policies: []               # Kubernetes NetworkPolicy manifests (networking.k8s.io/v1)
//!   cidr_deny: [203.0.113.0/24, "2001:db8:bad::/48"]  # sources lb_xdp drops on the node's interfaces
//! ```
//!
//! Semantics, as Kubernetes NetworkPolicy: a local endpoint that no rule selects in a direction is
//! open in that direction; once one rule (with `default_deny`, the default) selects it, only what some
//! allow rule allows passes; a deny rule wins over every allow. Parsing rejects unknown fields, and
//! [`PolicyConfig::validate`] names the offending field, e.g.
//! `policy.rules[3].peers[0].except[0]: 10.1.0.0/16 is not inside cidr 10.2.0.0/16`.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    str::FromStr,
};

use lb_common::policy::Direction;
use serde::{Deserialize, Serialize};

use super::k8s;

pub type Labels = BTreeMap<String, String>;

/// The label Kubernetes puts on every namespace, so selectors can name a namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Global audit mode: every endpoint behaves as `enforcement: audit`.
    #[serde(default)]
    pub audit: bool,
    /// Addresses of this node: the `host` entity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_addresses: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Namespace>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<Workload>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// Kubernetes NetworkPolicies, translated into rules after `rules` (see [`k8s`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_policies: Vec<k8s::NetworkPolicyManifest>,
    /// Sources `lb_xdp` drops on the node's interfaces (`--iface`) before an skb exists, whatever
    /// the rules say: floods, known bad ranges. Counted (`cidr_deny`), not reported per packet. See
    /// [`super::cidr_deny`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidr_deny: Vec<Cidr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

/// A workload (pod): its labels give its identity, its addresses put that identity in the ipcache.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<IpAddr>,
    /// Host-side interface: set for workloads on this node, which are enforced here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(default)]
    pub enforcement: Enforcement,
    #[serde(default)]
    pub status: WorkloadStatus,
    /// Named container ports, for rules that name ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<NamedPort>,
}

impl Workload {
    pub fn is_local(&self) -> bool {
        self.interface.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// Denials drop.
    #[default]
    Enforce,
    /// Denials pass and are reported as audit verdicts.
    Audit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadStatus {
    /// Labels known: identity from namespace and labels.
    #[default]
    Ready,
    /// Labels not known yet: the reserved `init` identity; a local one is in default deny.
    Init,
    /// Not managed by this agent: the reserved `unmanaged` identity, never enforced.
    Unmanaged,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique; reported with every verdict the rule decides.
    pub name: String,
    /// Restricts `endpoints` (and peer selectors without `namespaces`) to one namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Local workloads the rule applies to; `{}` selects all (of `namespace`, if set).
    pub endpoints: Selector,
    #[serde(with = "direction_serde")]
    pub direction: Direction,
    pub action: Action,
    /// Required, so that "no peer" is written on purpose: `[]` matches nothing.
    pub peers: Vec<Peer>,
    /// Empty: every protocol and port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    /// Whether selecting an endpoint puts it into default deny in `direction` (Kubernetes: always).
    #[serde(default = "yes")]
    pub default_deny: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Allow,
    Deny,
}

/// One peer: exactly one of a workload selector (`selector` and/or `namespaces`), a `cidr` (with
/// optional `except`), or an `entity`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Workloads by label; without `namespaces`, in the rule's namespace (all, if the rule has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// Namespaces by label; with `selector`, both must match (AND).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Selector>,
    /// Addresses outside the cluster; never selects workload or host addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<Cidr>,
    /// Holes in `cidr`, each strictly inside it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<Entity>,
}

/// Reserved peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Entity {
    /// Every peer, known or not.
    All,
    /// Everything outside the cluster, including every CIDR.
    World,
    /// This node.
    Host,
    /// Workloads the agent does not manage.
    Unmanaged,
    /// Workloads whose labels are not known yet.
    Init,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    #[serde(default)]
    pub protocol: Protocol,
    /// First (or only) port; omitted with `name` omitted: every port of `protocol`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Last port of a range (inclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u16>,
    /// A named port, resolved on the workload that listens (see [`Workload::ports`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Deserialize, Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::protocol::TCP,
            Protocol::Udp => lb_common::protocol::UDP,
            Protocol::Sctp => 132,
        }
    }
}

/// A label selector: every `match_labels` pair and every expression must hold. Empty selects all.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: Labels,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            // As Kubernetes: a missing key is "not in" any set.
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// An IPv4 or IPv6 prefix such as `10.0.0.0/8`, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// Strict: host bits must be zero.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, String> {
        let cidr = Self::masked(addr, len)?;
        if cidr.addr != addr {
            return Err(format!(
                "{addr}/{len} has host bits set (did you mean {cidr}?)"
            ));
        }
        Ok(cidr)
    }

    /// Lenient, as Kubernetes: host bits are cleared.
    pub fn masked(addr: IpAddr, len: u8) -> Result<Self, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("prefix length {len} is longer than {max}"));
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Ok(Self { addr, len })
    }

    /// The single-address prefix of `addr`.
    pub fn host(addr: IpAddr) -> Self {
        Self {
            addr,
            len: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// First and last address as 128-bit numbers (IPv4 in the low 32 bits).
    pub fn range(&self) -> (u128, u128) {
        let (start, bits) = match self.addr {
            IpAddr::V4(a) => (u32::from(a) as u128, 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        };
        let host_bits = bits - self.len as u32;
        let span = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        (start, start + span)
    }

    /// Whether `other` lies inside this prefix (or equals it).
    pub fn contains(&self, other: &Cidr) -> bool {
        if self.is_ipv4() != other.is_ipv4() || other.len < self.len {
            return false;
        }
        let (start, end) = self.range();
        let (o_start, _) = other.range();
        (start..=end).contains(&o_start)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = parse_cidr(s)?;
        Cidr::new(addr, len)
    }
}

/// Splits `addr/len` without judging the host bits.
pub(crate) fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("`{s}` is not a CIDR (address/prefix length)"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|e| format!("`{s}`: invalid address: {e}"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("`{s}`: invalid prefix length"))?;
    Ok((addr, len))
}

impl TryFrom<String> for Cidr {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

mod direction_serde {
    use lb_common::policy::Direction;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Direction, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(d.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Direction, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum Dir {
            Ingress,
            Egress,
        }
        Ok(match Dir::deserialize(d)? {
            Dir::Ingress => Direction::Ingress,
            Dir::Egress => Direction::Egress,
        })
    }
}

/// A semantic error, naming the field: `policy.rules[2].ports[0].end_port: ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PolicyError {
    pub path: String,
    pub message: String,
}

impl PolicyError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

fn err<T>(path: impl Into<String>, message: impl Into<String>) -> Result<T, PolicyError> {
    Err(PolicyError::new(path, message))
}

impl PolicyConfig {
    /// Own rules, then every NetworkPolicy translated, each with the config path it came from.
    pub fn rules_with_paths(&self) -> Result<Vec<(String, Rule)>, PolicyError> {
        let mut rules: Vec<(String, Rule)> = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("policy.rules[{i}]"), r.clone()))
            .collect();
        for (i, manifest) in self.network_policies.iter().enumerate() {
            let path = format!("policy.network_policies[{i}]");
            let translated = k8s::translate(&manifest.0)
                .map_err(|e| PolicyError::new(format!("{path}.{}", e.path), e.message))?;
            rules.extend(translated.into_iter().map(|r| (path.clone(), r)));
        }
        Ok(rules)
    }

    /// Checks what the types cannot: uniqueness, ranges, one kind per peer, CIDR containment.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let mut namespaces = HashMap::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            let path = format!("policy.namespaces[{i}]");
            if ns.name.is_empty() {
                return err(format!("{path}.name"), "must not be empty");
            }
            if let Some(first) = namespaces.insert(&ns.name, i) {
                return err(path, format!("duplicate of policy.namespaces[{first}]"));
            }
            validate_labels(&format!("{path}.labels"), &ns.labels)?;
        }

        // Every address resolves to one identity: no address in two places.
        let mut owners: HashMap<IpAddr, String> = HashMap::new();
        for (i, addr) in self.host_addresses.iter().enumerate() {
            let path = format!("policy.host_addresses[{i}]");
            if let Some(first) = owners.insert(*addr, path.clone()) {
                return err(path, format!("{addr} is also {first}"));
            }
        }
        let mut workloads = HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let path = format!("policy.workloads[{i}]");
            if w.name.is_empty() {
                return err(format!("{path}.name"), "must not be empty");
            }
            if w.namespace.is_empty() {
                return err(format!("{path}.namespace"), "must not be empty");
            }
            if let Some(first) = workloads.insert((&w.namespace, &w.name), i) {
                return err(path, format!("duplicate of policy.workloads[{first}]"));
            }
            validate_labels(&format!("{path}.labels"), &w.labels)?;
            for (j, addr) in w.addresses.iter().enumerate() {
                let apath = format!("{path}.addresses[{j}]");
                if let Some(first) = owners.insert(*addr, apath.clone()) {
                    return err(apath, format!("{addr} is also {first}"));
                }
            }
            if w.interface.as_deref() == Some("") {
                return err(format!("{path}.interface"), "must not be empty");
            }
            if w.enforcement == Enforcement::Audit && !w.is_local() {
                return err(
                    format!("{path}.enforcement"),
                    "applies to workloads on this node only (set interface)",
                );
            }
            let mut names = HashMap::new();
            for (j, p) in w.ports.iter().enumerate() {
                let ppath = format!("{path}.ports[{j}]");
                if p.name.is_empty() {
                    return err(format!("{ppath}.name"), "must not be empty");
                }
                if p.port == 0 {
                    return err(format!("{ppath}.port"), "must be 1..65535");
                }
                if let Some(first) = names.insert((&p.name, p.protocol), j) {
                    return err(ppath, format!("duplicate of {path}.ports[{first}]"));
                }
            }
        }

        let mut denied = HashMap::new();
        for (i, cidr) in self.cidr_deny.iter().enumerate() {
            let path = format!("policy.cidr_deny[{i}]");
            if cidr.prefix_len() == 0 {
                return err(path, format!("{cidr} would drop every packet"));
            }
            if let Some(first) = denied.insert(cidr, i) {
                return err(path, format!("duplicate of policy.cidr_deny[{first}]"));
            }
        }
        let limit = lb_common::policy::state_limits::CIDR_DENY_ENTRIES as usize;
        if self.cidr_deny.len() > limit {
            return err(
                "policy.cidr_deny",
                format!("{} prefixes, at most {limit}", self.cidr_deny.len()),
            );
        }

        let mut rule_names: HashMap<String, String> = HashMap::new();
        for (path, rule) in self.rules_with_paths()? {
            // Translated rules share their manifest's path; name the rule too.
            let path = if path.starts_with("policy.rules[") {
                path
            } else {
                format!("{path} (rule {})", rule.name)
            };
            validate_rule(&path, &rule)?;
            if let Some(first) = rule_names.insert(rule.name.clone(), path.clone()) {
                return err(
                    format!("{path}.name"),
                    format!("`{}` is already the name of {first}", rule.name),
                );
            }
        }
        Ok(())
    }
}

fn validate_labels(path: &str, labels: &Labels) -> Result<(), PolicyError> {
    if labels.keys().any(String::is_empty) {
        return err(path, "label keys must not be empty");
    }
    Ok(())
}

fn validate_selector(path: &str, selector: &Selector) -> Result<(), PolicyError> {
    validate_labels(&format!("{path}.match_labels"), &selector.match_labels)?;
    for (i, r) in selector.match_expressions.iter().enumerate() {
        let path = format!("{path}.match_expressions[{i}]");
        if r.key.is_empty() {
            return err(format!("{path}.key"), "must not be empty");
        }
        let needs_values = matches!(r.operator, Operator::In | Operator::NotIn);
        if needs_values == r.values.is_empty() {
            let message = if needs_values {
                "in and not_in need at least one value"
            } else {
                "exists and does_not_exist take no values"
            };
            return err(format!("{path}.values"), message);
        }
    }
    Ok(())
}

fn validate_rule(path: &str, rule: &Rule) -> Result<(), PolicyError> {
    if rule.name.is_empty() {
        return err(format!("{path}.name"), "must not be empty");
    }
    if rule.namespace.as_deref() == Some("") {
        return err(
            format!("{path}.namespace"),
            "must not be empty (omit it instead)",
        );
    }
    validate_selector(&format!("{path}.endpoints"), &rule.endpoints)?;
    for (i, peer) in rule.peers.iter().enumerate() {
        validate_peer(&format!("{path}.peers[{i}]"), peer)?;
    }
    for (i, port) in rule.ports.iter().enumerate() {
        let path = format!("{path}.ports[{i}]");
        match (&port.name, port.port, port.end_port) {
            (Some(_), Some(_), _) => return err(path, "set either name or port, not both"),
            (Some(_), None, Some(_)) => {
                return err(format!("{path}.end_port"), "cannot follow a named port")
            }
            (Some(name), None, None) if name.is_empty() => {
                return err(format!("{path}.name"), "must not be empty")
            }
            (None, None, Some(_)) => return err(format!("{path}.end_port"), "needs port"),
            (None, Some(0), _) => return err(format!("{path}.port"), "must be 1..65535"),
            (None, Some(first), Some(last)) if last < first => {
                return err(
                    format!("{path}.end_port"),
                    format!("{last} is below port {first}"),
                )
            }
            _ => {}
        }
    }
    Ok(())
}

fn validate_peer(path: &str, peer: &Peer) -> Result<(), PolicyError> {
    let kinds = [
        peer.selector.is_some() || peer.namespaces.is_some(),
        peer.cidr.is_some(),
        peer.entity.is_some(),
    ];
    if kinds.iter().filter(|k| **k).count() != 1 {
        return err(
            path,
            "set exactly one of selector/namespaces, cidr or entity",
        );
    }
    if let Some(s) = &peer.selector {
        validate_selector(&format!("{path}.selector"), s)?;
    }
    if let Some(s) = &peer.namespaces {
        validate_selector(&format!("{path}.namespaces"), s)?;
    }
    match &peer.cidr {
        None if !peer.except.is_empty() => err(format!("{path}.except"), "needs cidr"),
        None => Ok(()),
        Some(cidr) => {
            for (i, hole) in peer.except.iter().enumerate() {
                if !cidr.contains(hole) || hole.prefix_len() == cidr.prefix_len() {
                    return err(
                        format!("{path}.except[{i}]"),
                        format!("{hole} is not strictly inside cidr {cidr}"),
                    );
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
audit: false
host_addresses: [192.0.2.1]
namespaces:
  - name: prod
    labels: {team: shop}
workloads:
  - name: api-1
    namespace: prod
    labels: {app: api}
    addresses: [198.51.100.7, \"2001:db8::7\"]
    interface: lxc-api-1
    ports: [{name: http, port: 8080}]
rules:
  - name: api-from-web
    namespace: prod
    endpoints: {match_labels: {app: api}}
    direction: ingress
    action: allow
    peers:
      - selector: {match_labels: {app: web}}
      - namespaces: {match_labels: {team: ops}}
        selector: {match_expressions: [{key: tier, operator: in, values: [probe]}]}
      - cidr: 203.0.113.0/24
        except: [203.0.113.128/25]
      - entity: world
    ports:
      - {protocol: tcp, port: 8080}
      - {protocol: udp, port: 30000, end_port: 30100}
      - {protocol: tcp, name: http}
";

    fn parse(text: &str) -> Result<PolicyConfig, String> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let config: PolicyConfig =
            serde_path_to_error::deserialize(de).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    #[test]
    fn parses_the_documented_example() {
        let config = parse(GOOD).unwrap();
        let rule = &config.rules[0];
        assert_eq!(rule.direction, Direction::Ingress);
        assert_eq!(rule.peers.len(), 4);
        assert!(rule.default_deny);
        assert_eq!(rule.peers[2].cidr.unwrap().to_string(), "203.0.113.0/24");
        assert_eq!(rule.ports[1].end_port, Some(30100));
        assert_eq!(config.workloads[0].enforcement, Enforcement::Enforce);
        // And the module doc's example, which is the same plus comments.
        let doc = include_str!("model.rs");
        let start = doc.find("//! policy:\n").unwrap();
        let end = doc[start..].find("//! ```").unwrap() + start;
        let yaml: String = doc[start..end]
            .lines()
            .map(|l| l.strip_prefix("//! ").unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        #[derive(Deserialize)]
        struct Top {
            policy: PolicyConfig,
        }
        let top: Top = serde_yaml_ng::from_str(&yaml).unwrap();
        top.policy.validate().unwrap();
    }

    #[test]
    fn round_trips_through_yaml() {
        let config = parse(GOOD).unwrap();
        let again = parse(&serde_yaml_ng::to_string(&config).unwrap()).unwrap();
        assert_eq!(config, again);
    }

    #[test]
    fn unknown_fields_and_bad_values_name_the_field() {
        let e =
            parse(&GOOD.replace("action: allow", "action: allow\n    colour: red")).unwrap_err();
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = parse(&GOOD.replace("203.0.113.0/24", "203.0.113.1/24")).unwrap_err();
        assert!(e.starts_with("rules[0].peers[2].cidr"), "{e}");
        assert!(
            e.contains("host bits set (did you mean 203.0.113.0/24?)"),
            "{e}"
        );
        let e = parse(&GOOD.replace("direction: ingress", "direction: inbound")).unwrap_err();
        assert!(e.starts_with("rules[0].direction"), "{e}");
        let e = parse(&GOOD.replace("    peers:\n", "    peerz:\n")).unwrap_err();
        assert!(e.contains("unknown field `peerz`"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let cases = [
            (
                GOOD.replace("[203.0.113.128/25]", "[198.51.100.0/25]"),
                "policy.rules[0].peers[2].except[0]: 198.51.100.0/25 is not strictly inside cidr 203.0.113.0/24",
            ),
            (
                GOOD.replace("port: 30000, end_port: 30100", "port: 30000, end_port: 29999"),
                "policy.rules[0].ports[1].end_port: 29999 is below port 30000",
            ),
            (
                GOOD.replace("{protocol: tcp, name: http}", "{protocol: tcp, name: http, port: 1}"),
                "policy.rules[0].ports[2]: set either name or port, not both",
            ),
            (
                GOOD.replace("      - entity: world\n", "      - entity: world\n        cidr: 10.0.0.0/8\n"),
                "policy.rules[0].peers[3]: set exactly one of selector/namespaces, cidr or entity",
            ),
            (
                GOOD.replace("values: [probe]", "values: []"),
                "policy.rules[0].peers[1].selector.match_expressions[0].values: in and not_in need at least one value",
            ),
            (
                GOOD.replace("[192.0.2.1]", "[198.51.100.7]"),
                "policy.workloads[0].addresses[0]: 198.51.100.7 is also policy.host_addresses[0]",
            ),
            (
                format!("{GOOD}  - name: api-from-web\n    endpoints: {{}}\n    direction: egress\n    action: deny\n    peers: []\n"),
                "policy.rules[1].name: `api-from-web` is already the name of policy.rules[0]",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(&text).unwrap_err(), expected);
        }
    }

    #[test]
    fn cidr_deny_list_is_checked() {
        let with = |list: &str| parse(&format!("{GOOD}cidr_deny: {list}\n"));
        let config = with("[203.0.113.0/24, \"2001:db8:bad::/48\", 192.0.2.9/32]").unwrap();
        assert_eq!(config.cidr_deny.len(), 3);
        let cases = [
            (
                "[203.0.113.0/24, 203.0.113.0/24]",
                "policy.cidr_deny[1]: duplicate of policy.cidr_deny[0]",
            ),
            (
                "[\"::/0\"]",
                "policy.cidr_deny[0]: ::/0 would drop every packet",
            ),
        ];
        for (list, expected) in cases {
            assert_eq!(with(list).unwrap_err(), expected);
        }
        let e = with("[203.0.113.1/24]").unwrap_err();
        assert!(
            e.starts_with("cidr_deny[0]") && e.contains("did you mean 203.0.113.0/24?"),
            "{e}"
        );
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let labels: Labels = [("app".into(), "api".into()), ("tier".into(), "be".into())].into();
        let sel = |yaml: &str| serde_yaml_ng::from_str::<Selector>(yaml).unwrap();
        assert!(sel("{}").matches(&labels));
        assert!(sel("{match_labels: {app: api}}").matches(&labels));
        assert!(!sel("{match_labels: {app: api, x: y}}").matches(&labels));
        let expr = |op: &str, vals: &str| {
            sel(&format!(
                "{{match_expressions: [{{key: tier, operator: {op}, values: {vals}}}]}}"
            ))
        };
        assert!(expr("in", "[fe, be]").matches(&labels));
        assert!(!expr("not_in", "[be]").matches(&labels));
        assert!(expr("exists", "[]").matches(&labels));
        assert!(!expr("does_not_exist", "[]").matches(&labels));
        // A missing key is "not in" every set.
        assert!(expr("not_in", "[be]").matches(&Labels::new()));
    }

    #[test]
    fn cidr_containment() {
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        assert!(c("10.0.0.0/8").contains(&c("10.1.0.0/16")));
        assert!(c("10.0.0.0/8").contains(&c("10.0.0.0/8")));
        assert!(!c("10.1.0.0/16").contains(&c("10.0.0.0/8")));
        assert!(!c("10.0.0.0/8").contains(&c("11.0.0.0/16")));
        assert!(c("0.0.0.0/0").contains(&c("255.255.255.255/32")));
        assert!(!c("0.0.0.0/0").contains(&c("::/0")));
        assert!(c("::/0").contains(&c("2001:db8::/32")));
        assert_eq!(c("::/0").range(), (0, u128::MAX));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert_eq!(
            Cidr::masked("172.17.1.9".parse().unwrap(), 24).unwrap(),
            c("172.17.1.0/24")
        );
    }
}
