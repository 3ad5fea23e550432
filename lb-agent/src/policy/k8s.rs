//! Translation of Kubernetes NetworkPolicy (`networking.k8s.io/v1`) into our [`Rule`]s.
//!
//! A policy `NS/NAME` becomes, for each direction in its effective `policyTypes`:
//! - `k8s:NS/NAME:ingress` (or `:egress`): an allow rule with no peers that selects `podSelector` in
//!   `NS`. It allows nothing; it isolates the pods, and it is the rule a default-deny verdict names;
//! - `k8s:NS/NAME:ingress[i]`: one allow rule per entry of `spec.ingress` (`spec.egress`).
//!
//! Covered, with the API's semantics:
//! - `podSelector` (`{}` = every pod of the namespace); `matchLabels` and `matchExpressions`;
//! - `policyTypes`, and its default when omitted or empty: `Ingress`, plus `Egress` if `spec.egress`
//!   has at least one rule. A direction not in `policyTypes` is ignored even if rules are given;
//! - a missing or empty `ingress`/`egress` list under its policy type: isolation, nothing allowed;
//!   an empty rule (`- {}`) or a rule with missing or empty `from`/`to`: every peer;
//! - peers: `podSelector` alone (pods of the policy's namespace), `namespaceSelector` alone (every pod
//!   of the matching namespaces; namespaces carry `kubernetes.io/metadata.name`), both in one peer
//!   (AND: matching pods in matching namespaces), `ipBlock` with `except` (host bits are cleared as
//!   the API server tolerates; `except` must lie strictly inside `cidr`);
//! - ports: `protocol` (TCP default, UDP, SCTP), numeric `port`, `endPort` ranges (split into aligned
//!   blocks), no `port` (every port of the protocol), missing or empty `ports` (every port and
//!   protocol).
//!
//! Named ports (`port: http`) are resolved at compile time against the `ports` of the workloads
//! that listen: for ingress the selected pods on this node, for egress the peer pods (a peer that is
//! not a pod, such as an `ipBlock`, has no named ports, so the rule allows nothing to it). Pods of one
//! identity that give the same name different numbers all get every such number.
//!
//! Not covered / different:
//! - `ipBlock` never matches pod or node addresses, only addresses outside the cluster (as Cilium;
//!   the API leaves this to the implementation). Pods are selected by selectors.
//! - Reply traffic of an allowed connection is not matched here; it is passed by connection
//!   tracking before policy (the datapath's job), as NetworkPolicy requires.
//! - `status`, `metadata` beyond name and namespace, and admission-level validation that the API
//!   server performs (e.g. label syntax) are not checked; what is checked is named by field path.

use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use lb_common::policy::Direction;
use serde::{Deserialize, Serialize};

use super::model::{
    parse_cidr, Action, Cidr, Entity, Operator, Peer, PortSpec, Protocol, Requirement, Rule,
    Selector,
};

/// A NetworkPolicy manifest inside the agent's config (`apiVersion` and `kind` may be omitted).
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(transparent)]
pub struct NetworkPolicyManifest(pub NetworkPolicy);

// NetworkPolicy holds no floating-point fields, so its `PartialEq` is an equivalence.
impl Eq for NetworkPolicyManifest {}

/// An untranslatable manifest; `path` is relative to the manifest, e.g. `spec.ingress[0].ports[1]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TranslateError {
    pub path: String,
    pub message: String,
}

fn err<T>(path: impl Into<String>, message: impl Into<String>) -> Result<T, TranslateError> {
    Err(TranslateError {
        path: path.into(),
        message: message.into(),
    })
}

/// The peers (`from`/`to`) and ports of one ingress or egress rule.
type RuleParts<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

/// Translates one NetworkPolicy into rules named `k8s:NAMESPACE/NAME:...`.
pub fn translate(policy: &NetworkPolicy) -> Result<Vec<Rule>, TranslateError> {
    let namespace = policy.metadata.namespace.as_deref().unwrap_or("default");
    let name = match policy.metadata.name.as_deref() {
        Some(n) if !n.is_empty() => n,
        _ => return err("metadata.name", "required"),
    };
    let Some(spec) = &policy.spec else {
        return err("spec", "required");
    };
    let endpoints = selector("spec.podSelector", spec.pod_selector.as_ref())?;
    let ingress = spec.ingress.as_deref().unwrap_or_default();
    let egress = spec.egress.as_deref().unwrap_or_default();

    let directions = match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => {
            let mut dirs = Vec::new();
            for (i, t) in types.iter().enumerate() {
                let dir = match t.as_str() {
                    "Ingress" => Direction::Ingress,
                    "Egress" => Direction::Egress,
                    other => {
                        return err(
                            format!("spec.policyTypes[{i}]"),
                            format!("`{other}` is neither Ingress nor Egress"),
                        )
                    }
                };
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
            dirs
        }
        // The API server's default.
        _ if egress.is_empty() => vec![Direction::Ingress],
        _ => vec![Direction::Ingress, Direction::Egress],
    };

    let base = format!("k8s:{namespace}/{name}");
    let rule = |name: String, direction, peers, ports| Rule {
        name,
        namespace: Some(namespace.to_string()),
        endpoints: endpoints.clone(),
        direction,
        action: Action::Allow,
        peers,
        ports,
        default_deny: true,
    };
    let mut rules = Vec::new();
    for dir in directions {
        let dir_name = dir.name();
        rules.push(rule(
            format!("{base}:{dir_name}"),
            dir,
            Vec::new(),
            Vec::new(),
        ));
        let entries: Vec<RuleParts> = match dir {
            Direction::Ingress => ingress
                .iter()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect(),
            Direction::Egress => egress
                .iter()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect(),
        };
        let peer_field = match dir {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        };
        for (i, (k8s_peers, k8s_ports)) in entries.into_iter().enumerate() {
            let path = format!("spec.{dir_name}[{i}]");
            let peers = match k8s_peers {
                Some(list) if !list.is_empty() => list
                    .iter()
                    .enumerate()
                    .map(|(j, p)| peer(&format!("{path}.{peer_field}[{j}]"), p))
                    .collect::<Result<_, _>>()?,
                // Missing or empty: every source (destination).
                _ => vec![Peer {
                    entity: Some(Entity::All),
                    ..Peer::default()
                }],
            };
            let ports = k8s_ports
                .into_iter()
                .flatten()
                .enumerate()
                .map(|(j, p)| port(&format!("{path}.ports[{j}]"), p))
                .collect::<Result<_, _>>()?;
            rules.push(rule(format!("{base}:{dir_name}[{i}]"), dir, peers, ports));
        }
    }
    Ok(rules)
}

fn peer(path: &str, p: &NetworkPolicyPeer) -> Result<Peer, TranslateError> {
    if let Some(block) = &p.ip_block {
        if p.pod_selector.is_some() || p.namespace_selector.is_some() {
            return err(
                path,
                "ipBlock cannot be combined with podSelector or namespaceSelector",
            );
        }
        let cidr = cidr(&format!("{path}.ipBlock.cidr"), &block.cidr)?;
        let mut except = Vec::new();
        for (i, e) in block.except.iter().flatten().enumerate() {
            let epath = format!("{path}.ipBlock.except[{i}]");
            let hole = self::cidr(&epath, e)?;
            if !cidr.contains(&hole) || hole.prefix_len() == cidr.prefix_len() {
                return err(epath, format!("{hole} is not strictly inside cidr {cidr}"));
            }
            except.push(hole);
        }
        return Ok(Peer {
            cidr: Some(cidr),
            except,
            ..Peer::default()
        });
    }
    if p.pod_selector.is_none() && p.namespace_selector.is_none() {
        return err(path, "needs podSelector, namespaceSelector or ipBlock");
    }
    Ok(Peer {
        selector: p
            .pod_selector
            .as_ref()
            .map(|s| selector(&format!("{path}.podSelector"), Some(s)))
            .transpose()?,
        namespaces: p
            .namespace_selector
            .as_ref()
            .map(|s| selector(&format!("{path}.namespaceSelector"), Some(s)))
            .transpose()?,
        ..Peer::default()
    })
}

fn cidr(path: &str, text: &str) -> Result<Cidr, TranslateError> {
    parse_cidr(text)
        .and_then(|(addr, len)| Cidr::masked(addr, len))
        .or_else(|e| err(path, e))
}

fn port(path: &str, p: &NetworkPolicyPort) -> Result<PortSpec, TranslateError> {
    let protocol = match p.protocol.as_deref() {
        None | Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        Some(other) => {
            return err(
                format!("{path}.protocol"),
                format!("`{other}` is not TCP, UDP or SCTP"),
            )
        }
    };
    let number = |field: &str, n: i32| {
        u16::try_from(n).ok().filter(|n| *n != 0).map_or_else(
            || err(format!("{path}.{field}"), format!("{n} is not in 1..65535")),
            Ok,
        )
    };
    let mut spec = PortSpec {
        protocol,
        ..PortSpec::default()
    };
    match (&p.port, p.end_port) {
        (None, None) => {}
        (None, Some(_)) => return err(format!("{path}.endPort"), "needs port"),
        (Some(IntOrString::String(_)), Some(_)) => {
            return err(format!("{path}.endPort"), "cannot follow a named port")
        }
        (Some(IntOrString::String(name)), None) => spec.name = Some(name.clone()),
        (Some(IntOrString::Int(first)), end) => {
            let first = number("port", *first)?;
            spec.port = Some(first);
            if let Some(end) = end {
                let end = number("endPort", end)?;
                if end < first {
                    return err(
                        format!("{path}.endPort"),
                        format!("{end} is below port {first}"),
                    );
                }
                spec.end_port = Some(end);
            }
        }
    }
    Ok(spec)
}

/// A missing selector selects everything, as `{}`.
fn selector(path: &str, s: Option<&LabelSelector>) -> Result<Selector, TranslateError> {
    let Some(s) = s else {
        return Ok(Selector::default());
    };
    let mut out = Selector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: Vec::new(),
    };
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let operator = match e.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return err(
                    format!("{path}.matchExpressions[{i}].operator"),
                    format!("`{other}` is not In, NotIn, Exists or DoesNotExist"),
                )
            }
        };
        out.match_expressions.push(Requirement {
            key: e.key.clone(),
            operator,
            values: e.values.clone().unwrap_or_default(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate_yaml(yaml: &str) -> Result<Vec<Rule>, TranslateError> {
        translate(&serde_yaml_ng::from_str::<NetworkPolicy>(yaml).unwrap())
    }

    #[test]
    fn policy_types_default_from_the_egress_section() {
        let names = |yaml: &str| -> Vec<String> {
            translate_yaml(yaml)
                .unwrap()
                .into_iter()
                .map(|r| r.name)
                .collect()
        };
        let head = "metadata: {name: p, namespace: ns}\nspec:\n  podSelector: {}\n";
        assert_eq!(names(head), ["k8s:ns/p:ingress"]);
        // `egress: []` does not make an Egress policy; one egress rule does.
        assert_eq!(
            names(&format!("{head}  egress: []\n")),
            ["k8s:ns/p:ingress"]
        );
        assert_eq!(
            names(&format!("{head}  egress: [{{}}]\n")),
            ["k8s:ns/p:ingress", "k8s:ns/p:egress", "k8s:ns/p:egress[0]"]
        );
        // policyTypes given: rules of other directions are ignored.
        assert_eq!(
            names(&format!(
                "{head}  policyTypes: [Egress]\n  ingress: [{{}}]\n"
            )),
            ["k8s:ns/p:egress"]
        );
    }

    #[test]
    fn peers_and_ports_translate_field_by_field() {
        let rules = translate_yaml(
            "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: ns}
spec:
  podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [x]}]}
  ingress:
    - from:
        - podSelector: {matchLabels: {role: a}}
        - namespaceSelector: {matchLabels: {team: b}}
          podSelector: {matchLabels: {role: c}}
        - ipBlock: {cidr: 172.17.1.7/16, except: [172.17.1.0/24]}
      ports:
        - {port: 80}
        - {protocol: UDP, port: 53, endPort: 60}
        - {protocol: SCTP}
        - {port: http}
",
        )
        .unwrap();
        let r = &rules[1];
        assert_eq!(r.namespace.as_deref(), Some("ns"));
        assert_eq!(r.endpoints.match_expressions[0].operator, Operator::NotIn);
        assert!(r.peers[0].selector.is_some() && r.peers[0].namespaces.is_none());
        assert!(r.peers[1].selector.is_some() && r.peers[1].namespaces.is_some());
        assert_eq!(r.peers[2].cidr.unwrap().to_string(), "172.17.0.0/16");
        assert_eq!(r.peers[2].except[0].to_string(), "172.17.1.0/24");
        assert_eq!(r.ports[0].protocol, Protocol::Tcp);
        assert_eq!((r.ports[1].port, r.ports[1].end_port), (Some(53), Some(60)));
        assert_eq!(
            (r.ports[2].protocol, r.ports[2].port),
            (Protocol::Sctp, None)
        );
        assert_eq!(r.ports[3].name.as_deref(), Some("http"));
    }

    #[test]
    fn errors_name_the_manifest_field() {
        let e = |spec: &str| {
            translate_yaml(&format!("metadata: {{name: p}}\nspec:\n{spec}"))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            e("  ingress: [{ports: [{port: 80, endPort: 79}]}]\n"),
            "spec.ingress[0].ports[0].endPort: 79 is below port 80"
        );
        assert_eq!(
            e("  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]\n"),
            "spec.ingress[0].from[0].ipBlock.except[0]: 11.0.0.0/16 is not strictly inside cidr 10.0.0.0/8"
        );
        assert_eq!(
            e("  policyTypes: [Sideways]\n"),
            "spec.policyTypes[0]: `Sideways` is neither Ingress nor Egress"
        );
        assert_eq!(
            e("  egress: [{to: [{}]}]\n"),
            "spec.egress[0].to[0]: needs podSelector, namespaceSelector or ipBlock"
        );
        assert_eq!(
            e("  ingress: [{ports: [{protocol: ICMP}]}]\n"),
            "spec.ingress[0].ports[0].protocol: `ICMP` is not TCP, UDP or SCTP"
        );
    }
}
