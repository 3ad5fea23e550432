//! Kubernetes objects the tests serve from the fake API server (`fake_apiserver`).

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::{json, Value};

/// Service `default/<name>` on cluster IP `vip` (and `vip6` if given), port `http` 80 → 8080.
pub fn service(name: &str, vip: &str, vip6: Option<&str>) -> Service {
    let mut ips = vec![vip];
    ips.extend(vip6);
    serde_json::from_value(json!({
        "metadata": { "namespace": "default", "name": name },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": vip,
            "clusterIPs": ips,
            "ipFamilies": if vip6.is_some() { json!(["IPv4", "IPv6"]) } else { json!(["IPv4"]) },
            "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080 }],
        },
    }))
    .unwrap()
}

/// An endpoint's conditions in an EndpointSlice.
#[derive(Clone, Copy)]
pub enum State {
    /// Ready and serving.
    Ready,
    /// Terminating, still serving (draining).
    Terminating,
    /// Terminating, no longer serving.
    Gone,
}

/// EndpointSlice `default/<name>` of Service `default/<service>`, port `http` 8080.
pub fn endpoint_slice(
    name: &str,
    service: &str,
    family: &str,
    endpoints: &[(&str, State)],
) -> EndpointSlice {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(address, state)| {
            let (ready, serving, terminating) = match state {
                State::Ready => (true, true, false),
                State::Terminating => (false, true, true),
                State::Gone => (false, false, true),
            };
            json!({
                "addresses": [address],
                "conditions": { "ready": ready, "serving": serving, "terminating": terminating },
            })
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "namespace": "default",
            "name": name,
            "labels": { "kubernetes.io/service-name": service },
        },
        "addressType": family,
        "ports": [{ "name": "http", "port": 8080, "protocol": "TCP" }],
        "endpoints": endpoints,
    }))
    .unwrap()
}
