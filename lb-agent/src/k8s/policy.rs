//! Kubernetes Namespaces, Pods and NetworkPolicies → the agent's policy model ([`PolicyConfig`]),
//! which the policy compiler turns into identities and map entries.
//!
//! A pure function of the objects, like [`super::translate`]. The rules:
//!
//! - **Namespaces** → `namespaces` with their labels (the compiler adds
//!   `kubernetes.io/metadata.name`, which the API server also sets).
//! - **Pods** → `workloads`: namespace, name, labels (their identity is the namespace and labels,
//!   see [`crate::policy::identity`]), the addresses of `status.podIPs` (else `status.podIP`), and
//!   the named container ports (for named ports in NetworkPolicies). Left out, with a note: pods
//!   with `hostNetwork` (their address is the node's: the `host` entity), pods without an address
//!   yet, pods that ended (`Succeeded`/`Failed`: their address may already be another pod's), and
//!   a pod whose address another pod already has (the one first in (namespace, name) order keeps
//!   it). No pod gets an `interface`: the CNI's host-side interface is not in the Pod object, so
//!   Kubernetes pods are peers (identities in the ipcache), and local enforcement needs the
//!   workload's interface from the config file or the gRPC API.
//! - **NetworkPolicies** → `network_policies`, translated by [`crate::policy::k8s`]; one that
//!   cannot be translated is left out with a note naming the field (the others still apply).
//!
//! Every object is checked alone with the model's validation, so one bad object never takes the
//! whole policy down.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};

use super::translate::Note;
use crate::policy::{
    k8s::NetworkPolicyManifest,
    model::{self, NamedPort, Protocol, Workload, WorkloadStatus},
    PolicyConfig,
};

/// The policy of a cluster state, and notes on what was left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyTranslation {
    pub policy: PolicyConfig,
    pub notes: Vec<Note>,
}

/// Translates the objects; the result is ordered by (namespace, name) whatever the input order.
pub fn translate_policy(
    namespaces: &[Arc<Namespace>],
    pods: &[Arc<Pod>],
    network_policies: &[Arc<NetworkPolicy>],
) -> PolicyTranslation {
    let mut out = PolicyTranslation::default();
    let mut note = |object: String, reason: String| out.notes.push(Note { object, reason });

    let mut sorted_namespaces: Vec<&Namespace> = namespaces.iter().map(|n| &**n).collect();
    sorted_namespaces.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut policy = PolicyConfig::default();
    for ns in sorted_namespaces {
        let Some(name) = ns.metadata.name.clone().filter(|n| !n.is_empty()) else {
            continue;
        };
        let candidate = model::Namespace {
            name: name.clone(),
            labels: ns.metadata.labels.clone().unwrap_or_default(),
        };
        match alone(|p| p.namespaces.push(candidate.clone())) {
            Ok(()) => policy.namespaces.push(candidate),
            Err(reason) => note(format!("namespace {name}"), reason),
        }
    }

    let mut sorted_pods: Vec<&Pod> = pods.iter().map(|p| &**p).collect();
    sorted_pods.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    let mut owners: BTreeMap<IpAddr, String> = BTreeMap::new();
    for pod in sorted_pods {
        let object = format!(
            "pod {}/{}",
            pod.metadata.namespace.as_deref().unwrap_or(""),
            pod.metadata.name.as_deref().unwrap_or("")
        );
        let workload = match workload(pod) {
            Ok(w) => w,
            Err(reason) => {
                note(object, reason);
                continue;
            }
        };
        if let Some((addr, owner)) = workload
            .addresses
            .iter()
            .find_map(|a| owners.get(a).map(|o| (a, o)))
        {
            note(object, format!("address {addr} is also {owner}'s"));
            continue;
        }
        if let Err(reason) = alone(|p| p.workloads.push(workload.clone())) {
            note(object, reason);
            continue;
        }
        for addr in &workload.addresses {
            owners.insert(*addr, object.clone());
        }
        policy.workloads.push(workload);
    }

    let mut sorted_policies: Vec<&NetworkPolicy> = network_policies.iter().map(|p| &**p).collect();
    sorted_policies.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    for np in sorted_policies {
        let object = format!(
            "NetworkPolicy {}/{}",
            np.metadata.namespace.as_deref().unwrap_or(""),
            np.metadata.name.as_deref().unwrap_or("")
        );
        let manifest = NetworkPolicyManifest(np.clone());
        match alone(|p| p.network_policies.push(manifest.clone())) {
            Ok(()) => policy.network_policies.push(manifest),
            Err(reason) => note(object, reason),
        }
    }
    out.policy = policy;
    out
}

/// Validates a policy holding only what `add` puts in; the error without the index path prefix.
fn alone(add: impl FnOnce(&mut PolicyConfig)) -> Result<(), String> {
    let mut policy = PolicyConfig::default();
    add(&mut policy);
    policy.validate().map_err(|e| {
        let field = e
            .path
            .split_once("].")
            .map_or(e.path.as_str(), |(_, rest)| rest);
        format!("{field}: {}", e.message)
    })
}

fn workload(pod: &Pod) -> Result<Workload, String> {
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Err("hostNetwork: the node's address (the host entity)".into());
    }
    if let Some(phase @ ("Succeeded" | "Failed")) = status.and_then(|s| s.phase.as_deref()) {
        return Err(format!("phase {phase}: its address may be reused"));
    }
    let mut texts: Vec<&str> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|ip| ip.ip.as_str()).collect())
        .unwrap_or_default();
    if texts.is_empty() {
        texts.extend(status.and_then(|s| s.pod_ip.as_deref()));
    }
    let mut addresses = Vec::new();
    for text in texts {
        let addr: IpAddr = text
            .parse()
            .map_err(|_| format!("status.podIPs: invalid address {text:?}"))?;
        if !addresses.contains(&addr) {
            addresses.push(addr);
        }
    }
    if addresses.is_empty() {
        return Err("no address yet".into());
    }
    let mut ports: Vec<NamedPort> = Vec::new();
    for container in spec.map(|s| s.containers.as_slice()).unwrap_or_default() {
        for port in container.ports.iter().flatten() {
            let Some(name) = port.name.clone().filter(|n| !n.is_empty()) else {
                continue;
            };
            let protocol = match port.protocol.as_deref() {
                None | Some("TCP") => Protocol::Tcp,
                Some("UDP") => Protocol::Udp,
                Some("SCTP") => Protocol::Sctp,
                Some(_) => continue,
            };
            let Ok(port) = u16::try_from(port.container_port) else {
                continue;
            };
            let named = NamedPort {
                name,
                port,
                protocol,
            };
            if !ports
                .iter()
                .any(|p| p.name == named.name && p.protocol == named.protocol)
            {
                ports.push(named);
            }
        }
    }
    Ok(Workload {
        name: pod.metadata.name.clone().unwrap_or_default(),
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        addresses,
        interface: None,
        enforcement: Default::default(),
        status: WorkloadStatus::Ready,
        ports,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(ns: &str, name: &str, app: &str, ips: &[&str], extra: serde_json::Value) -> Arc<Pod> {
        let mut value = json!({
            "metadata": { "namespace": ns, "name": name, "labels": { "app": app } },
            "spec": { "containers": [{ "name": "c", "ports": [
                { "name": "http", "containerPort": 8080 },
                { "containerPort": 9090 },
                { "name": "dns", "containerPort": 53, "protocol": "UDP" },
            ] }] },
            "status": { "phase": "Running",
                        "podIPs": ips.iter().map(|ip| json!({ "ip": ip })).collect::<Vec<_>>() },
        });
        if let (Some(target), Some(extra)) = (value.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                target[k] = v.clone();
            }
        }
        Arc::new(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn pods_namespaces_and_policies_become_the_model_with_notes() {
        let namespaces: Vec<Arc<Namespace>> = vec![Arc::new(
            serde_json::from_value(
                json!({ "metadata": { "name": "shop", "labels": { "team": "a" } } }),
            )
            .unwrap(),
        )];
        let pods = vec![
            pod(
                "shop",
                "web-1",
                "web",
                &["198.51.100.2", "2001:db8::2"],
                json!({}),
            ),
            pod("shop", "web-0", "web", &["198.51.100.1"], json!({})),
            // Same address as web-0, later in order: left out.
            pod("shop", "web-9", "web", &["198.51.100.1"], json!({})),
            pod("shop", "pending", "web", &[], json!({})),
            pod(
                "shop",
                "done",
                "web",
                &["198.51.100.3"],
                json!({ "status": { "phase": "Succeeded", "podIP": "198.51.100.3" } }),
            ),
            pod(
                "kube-system",
                "proxy",
                "kp",
                &["192.0.2.1"],
                json!({ "spec": { "hostNetwork": true, "containers": [] } }),
            ),
        ];
        let good: Arc<NetworkPolicy> = Arc::new(
            serde_json::from_value(json!({
                "metadata": { "namespace": "shop", "name": "web" },
                "spec": { "podSelector": { "matchLabels": { "app": "web" } },
                          "ingress": [{ "ports": [{ "port": "http" }] }] },
            }))
            .unwrap(),
        );
        let bad: Arc<NetworkPolicy> = Arc::new(
            serde_json::from_value(json!({
                "metadata": { "namespace": "shop", "name": "bad" },
                "spec": { "podSelector": {}, "policyTypes": ["Sideways"] },
            }))
            .unwrap(),
        );
        let t = translate_policy(&namespaces, &pods, &[good.clone(), bad]);
        assert_eq!(t.policy.namespaces.len(), 1);
        assert_eq!(t.policy.namespaces[0].labels["team"], "a");
        let names: Vec<&str> = t.policy.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["web-0", "web-1"]);
        let web1 = &t.policy.workloads[1];
        assert_eq!(web1.addresses.len(), 2);
        assert_eq!(
            web1.ports
                .iter()
                .map(|p| (p.name.as_str(), p.port, p.protocol))
                .collect::<Vec<_>>(),
            [("http", 8080, Protocol::Tcp), ("dns", 53, Protocol::Udp)]
        );
        assert_eq!(
            t.policy.network_policies,
            [NetworkPolicyManifest((*good).clone())]
        );
        let notes: Vec<String> = t.notes.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            notes,
            [
                "pod kube-system/proxy: hostNetwork: the node's address (the host entity)",
                "pod shop/done: phase Succeeded: its address may be reused",
                "pod shop/pending: no address yet",
                "pod shop/web-9: address 198.51.100.1 is also pod shop/web-0's",
                "NetworkPolicy shop/bad: spec.policyTypes[0]: `Sideways` is neither Ingress nor Egress",
            ]
        );
        t.policy.validate().unwrap();
    }
}
