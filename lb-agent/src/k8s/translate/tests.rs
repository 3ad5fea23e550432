use serde_json::{json, Value};

use super::*;
use crate::config::Config;

fn service(value: Value) -> Service {
    serde_json::from_value(value).expect("a valid Service")
}

fn slice(value: Value) -> EndpointSlice {
    serde_json::from_value(value).expect("a valid EndpointSlice")
}

/// A ClusterIP Service `ns/name` with the given spec fields merged in.
fn svc(ns: &str, name: &str, spec: Value) -> Service {
    service(json!({
        "metadata": { "namespace": ns, "name": name },
        "spec": spec,
    }))
}

/// An EndpointSlice of Service `ns/service` with the given address type, ports and endpoints.
fn eps(
    ns: &str,
    name: &str,
    service: &str,
    family: &str,
    ports: Value,
    endpoints: Value,
) -> EndpointSlice {
    slice(json!({
        "metadata": {
            "namespace": ns,
            "name": name,
            "labels": { SERVICE_NAME_LABEL: service },
        },
        "addressType": family,
        "ports": ports,
        "endpoints": endpoints,
    }))
}

fn ready(address: &str) -> Value {
    json!({ "addresses": [address], "conditions": { "ready": true, "serving": true, "terminating": false } })
}

fn terminating(address: &str) -> Value {
    json!({ "addresses": [address], "conditions": { "ready": false, "serving": true, "terminating": true } })
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn backend(address: &str, port: u16, weight: u32) -> BackendConfig {
    BackendConfig {
        address: ip(address),
        port,
        weight,
    }
}

fn find<'a>(
    out: &'a [config::Service],
    vip: &str,
    port: u16,
    protocol: Protocol,
) -> &'a config::Service {
    out.iter()
        .find(|s| s.vip == ip(vip) && s.port == port && s.protocol == protocol)
        .unwrap_or_else(|| panic!("no service {vip}:{port}/{protocol} in {out:#?}"))
}

fn keys(out: &[config::Service]) -> Vec<(String, u16, Protocol, String)> {
    out.iter()
        .map(|s| (s.vip.to_string(), s.port, s.protocol, s.name.clone()))
        .collect()
}

/// A row of [`keys`].
fn key(vip: &str, port: u16, protocol: Protocol, name: &str) -> (String, u16, Protocol, String) {
    (vip.into(), port, protocol, name.into())
}

/// The notes of a translation (what it left out, and why), as text.
fn notes(translation: &Translation) -> Vec<String> {
    translation.notes.iter().map(ToString::to_string).collect()
}

#[track_caller]
fn assert_a_note_contains(notes: &[String], text: &str) {
    assert!(
        notes.iter().any(|n| n.contains(text)),
        "no note contains {text:?}: {notes:?}"
    );
}

/// The output must always be a valid agent config.
fn assert_valid(out: &[config::Service]) {
    let config = Config {
        services: out.to_vec(),
        ..Default::default()
    };
    Config::from_yaml(&config.to_yaml()).expect("translation is a valid config");
}

const NO_SLICES: &[EndpointSlice] = &[];

#[test]
fn cluster_ip_with_named_ports() {
    let services = [svc(
        "shop",
        "web",
        json!({
            "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
            "ports": [
                { "name": "http", "port": 80, "targetPort": 8080 },
                { "name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353 },
            ],
        }),
    )];
    let slices = [eps(
        "shop",
        "web-abc",
        "web",
        "IPv4",
        json!([
            { "name": "dns", "port": 5353, "protocol": "UDP" },
            { "name": "http", "port": 8080, "protocol": "TCP" },
        ]),
        json!([ready("10.1.0.2"), ready("10.1.0.1")]),
    )];
    let out = services_from(&services, &slices, &NodeOptions::default());
    assert_eq!(
        keys(&out),
        [
            key("10.96.0.10", 53, Protocol::Udp, "shop/web:dns"),
            key("10.96.0.10", 80, Protocol::Tcp, "shop/web:http"),
        ]
    );
    let http = find(&out, "10.96.0.10", 80, Protocol::Tcp);
    assert_eq!(
        http.backends,
        [backend("10.1.0.1", 8080, 1), backend("10.1.0.2", 8080, 1)]
    );
    assert_eq!(http.mode, ForwardingMode::Dnat);
    assert_eq!(http.hash, HashFields::FiveTuple);
    assert_eq!(http.maglev_table_size, maglev::DEFAULT_TABLE_SIZE);
    assert!(http.health_check.is_none());
    let dns = find(&out, "10.96.0.10", 53, Protocol::Udp);
    assert_eq!(
        dns.backends,
        [backend("10.1.0.1", 5353, 1), backend("10.1.0.2", 5353, 1)]
    );
    assert_valid(&out);
}

#[test]
fn unnamed_port_is_named_by_number_and_matches_unnamed_slice_port() {
    let services = [svc(
        "default",
        "api",
        json!({ "clusterIP": "10.96.0.20", "ports": [{ "port": 443, "targetPort": 8443 }] }),
    )];
    // The slice controller writes `name: ""` for an unnamed port; absent must match too.
    for ports in [
        json!([{ "name": "", "port": 8443 }]),
        json!([{ "port": 8443 }]),
    ] {
        let slices = [eps(
            "default",
            "api-1",
            "api",
            "IPv4",
            ports,
            json!([ready("10.1.0.5")]),
        )];
        let out = services_from(&services, &slices, &NodeOptions::default());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].name, "default/api:443");
        assert_eq!(out[0].backends, [backend("10.1.0.5", 8443, 1)]);
    }
}

#[test]
fn slice_ports_match_by_name_and_protocol_not_position() {
    let services = [svc(
        "default",
        "multi",
        json!({
            "clusterIP": "10.96.0.30",
            "ports": [
                { "name": "a", "port": 1000 },
                { "name": "b", "port": 2000 },
                { "name": "c", "port": 3000, "protocol": "UDP" },
            ],
        }),
    )];
    let slices = [eps(
        "default",
        "multi-1",
        "multi",
        "IPv4",
        // "c" only exists as TCP in the slice: the UDP service port has no backends.
        json!([
            { "name": "b", "port": 2222 },
            { "name": "a", "port": 1111 },
            { "name": "c", "port": 3333, "protocol": "TCP" },
        ]),
        json!([ready("10.1.0.7")]),
    )];
    let out = services_from(&services, &slices, &NodeOptions::default());
    assert_eq!(
        find(&out, "10.96.0.30", 1000, Protocol::Tcp).backends,
        [backend("10.1.0.7", 1111, 1)]
    );
    assert_eq!(
        find(&out, "10.96.0.30", 2000, Protocol::Tcp).backends,
        [backend("10.1.0.7", 2222, 1)]
    );
    assert!(find(&out, "10.96.0.30", 3000, Protocol::Udp)
        .backends
        .is_empty());
}

#[test]
fn dual_stack_frontends_get_backends_of_their_own_family() {
    let services = [svc(
        "default",
        "web",
        json!({
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10", "fd00:96::10"],
            "ipFamilies": ["IPv4", "IPv6"],
            "ipFamilyPolicy": "RequireDualStack",
            "ports": [{ "name": "http", "port": 80 }],
        }),
    )];
    let slices = [
        eps(
            "default",
            "web-v4",
            "web",
            "IPv4",
            json!([{ "name": "http", "port": 8080 }]),
            json!([ready("10.1.0.1")]),
        ),
        eps(
            "default",
            "web-v6",
            "web",
            "IPv6",
            json!([{ "name": "http", "port": 8080 }]),
            json!([ready("fd00:1::1")]),
        ),
    ];
    let out = services_from(&services, &slices, &NodeOptions::default());
    assert_eq!(out.len(), 2);
    let v4 = find(&out, "10.96.0.10", 80, Protocol::Tcp);
    let v6 = find(&out, "fd00:96::10", 80, Protocol::Tcp);
    assert_eq!(v4.name, "default/web:http");
    assert_eq!(v6.name, "default/web:http");
    assert_eq!(v4.backends, [backend("10.1.0.1", 8080, 1)]);
    assert_eq!(v6.backends, [backend("fd00:1::1", 8080, 1)]);
    assert_valid(&out);
}

#[test]
fn endpoint_conditions_decide_weight() {
    let services = [svc(
        "default",
        "web",
        json!({ "clusterIP": "10.96.0.10", "ports": [{ "port": 80 }] }),
    )];
    let endpoints = json!([
        ready("10.1.0.1"),
        // Terminating but still serving: draining.
        terminating("10.1.0.2"),
        // Terminating and no longer serving: gone.
        { "addresses": ["10.1.0.3"], "conditions": { "ready": false, "serving": false, "terminating": true } },
        // Not ready yet (starting): not a backend.
        { "addresses": ["10.1.0.4"], "conditions": { "ready": false, "serving": false, "terminating": false } },
        // Nil conditions mean ready.
        { "addresses": ["10.1.0.5"] },
        { "addresses": ["10.1.0.6"], "conditions": {} },
        // Ready wins over terminating (publishNotReadyAddresses).
        { "addresses": ["10.1.0.7"], "conditions": { "ready": true, "serving": true, "terminating": true } },
        // Not ready, serving unknown (nil = true), terminating: draining.
        { "addresses": ["10.1.0.8"], "conditions": { "ready": false, "terminating": true } },
        // Not ready and not terminating, though serving: not a backend.
        { "addresses": ["10.1.0.9"], "conditions": { "ready": false, "serving": true } },
    ]);
    let slices = [eps(
        "default",
        "web-1",
        "web",
        "IPv4",
        json!([{ "port": 8080 }]),
        endpoints,
    )];
    let out = services_from(&services, &slices, &NodeOptions::default());
    assert_eq!(
        out[0].backends,
        [
            backend("10.1.0.1", 8080, 1),
            backend("10.1.0.2", 8080, 0),
            backend("10.1.0.5", 8080, 1),
            backend("10.1.0.6", 8080, 1),
            backend("10.1.0.7", 8080, 1),
            backend("10.1.0.8", 8080, 0),
        ]
    );
    assert_valid(&out);
}

#[test]
fn multiple_slices_are_merged_and_duplicates_keep_the_highest_weight() {
    let services = [svc(
        "default",
        "web",
        json!({ "clusterIP": "10.96.0.10", "ports": [{ "port": 80 }] }),
    )];
    let ports = json!([{ "port": 8080 }]);
    let slices = [
        eps(
            "default",
            "web-a",
            "web",
            "IPv4",
            ports.clone(),
            json!([ready("10.1.0.3"), terminating("10.1.0.1")]),
        ),
        // 10.1.0.1 moved to this slice, ready here: ready wins.
        eps(
            "default",
            "web-b",
            "web",
            "IPv4",
            ports.clone(),
            json!([ready("10.1.0.2"), ready("10.1.0.1")]),
        ),
        // A slice of another Service, and one of a same-named Service in another namespace.
        eps(
            "default",
            "api-a",
            "api",
            "IPv4",
            ports.clone(),
            json!([ready("10.1.9.1")]),
        ),
        eps(
            "other",
            "web-a",
            "web",
            "IPv4",
            ports,
            json!([ready("10.1.9.2")]),
        ),
    ];
    let out = services_from(&services, &slices, &NodeOptions::default());
    assert_eq!(
        out[0].backends,
        [
            backend("10.1.0.1", 8080, 1),
            backend("10.1.0.2", 8080, 1),
            backend("10.1.0.3", 8080, 1)
        ]
    );
}

#[test]
fn a_service_without_slices_has_no_backends() {
    let services = [svc(
        "default",
        "web",
        json!({ "clusterIP": "10.96.0.10", "ports": [{ "port": 80 }] }),
    )];
    let out = services_from(&services, NO_SLICES, &NodeOptions::default());
    assert_eq!(
        keys(&out),
        [key("10.96.0.10", 80, Protocol::Tcp, "default/web:80")]
    );
    assert!(out[0].backends.is_empty());
    // A slice without the service-name label belongs to no one.
    let orphan = slice(json!({
        "metadata": { "namespace": "default", "name": "orphan" },
        "addressType": "IPv4", "ports": [{ "port": 8080 }], "endpoints": [ready("10.1.0.1")],
    }));
    let translation = translate(&services, &[orphan], &NodeOptions::default());
    assert!(translation.services[0].backends.is_empty());
    assert!(
        translation.notes[0].reason.contains(SERVICE_NAME_LABEL),
        "{:?}",
        translation.notes
    );
}

#[test]
fn load_balancer_external_ips_and_node_ports() {
    let services = [service(json!({
        "metadata": { "namespace": "edge", "name": "gw" },
        "spec": {
            "type": "LoadBalancer",
            "clusterIP": "10.96.0.50", "clusterIPs": ["10.96.0.50"], "ipFamilies": ["IPv4"],
            "externalIPs": ["198.51.100.7"],
            "ports": [
                { "name": "https", "port": 443, "targetPort": 8443, "nodePort": 30443 },
                { "name": "quic", "port": 443, "protocol": "UDP", "targetPort": 8443, "nodePort": 30443 },
            ],
        },
        "status": { "loadBalancer": { "ingress": [
            { "ip": "198.51.100.80", "ipMode": "VIP" },
            { "ip": "198.51.100.81", "ipMode": "Proxy" },
            { "hostname": "lb.example.com" },
        ] } },
    }))];
    let slices = [eps(
        "edge",
        "gw-1",
        "gw",
        "IPv4",
        json!([{ "name": "https", "port": 8443 }, { "name": "quic", "port": 8443, "protocol": "UDP" }]),
        json!([ready("10.1.0.1"), ready("10.1.0.2")]),
    )];
    let node = NodeOptions {
        node_name: Some("node-a".into()),
        addresses: vec![ip("192.0.2.10"), ip("2001:db8::10")],
        ..Default::default()
    };
    let translation = translate(&services, &slices, &node);
    let out = &translation.services;
    let tcp = |vip: &str, port: u16| find(out, vip, port, Protocol::Tcp);
    assert_eq!(tcp("10.96.0.50", 443).name, "edge/gw:https");
    assert_eq!(tcp("198.51.100.7", 443).name, "edge/gw:https/external");
    assert_eq!(tcp("198.51.100.80", 443).name, "edge/gw:https/loadbalancer");
    assert_eq!(tcp("192.0.2.10", 30443).name, "edge/gw:https/nodeport");
    assert_eq!(
        find(out, "192.0.2.10", 30443, Protocol::Udp).name,
        "edge/gw:quic/nodeport"
    );
    // 4 frontends × 2 protocols; not the Proxy-mode ingress, not the IPv6 node address.
    assert_eq!(out.len(), 8, "{:#?}", keys(out));
    assert!(out
        .iter()
        .all(|s| s.vip != ip("198.51.100.81") && s.vip != ip("2001:db8::10")));
    for s in out {
        assert_eq!(
            s.backends,
            [backend("10.1.0.1", 8443, 1), backend("10.1.0.2", 8443, 1)],
            "{}",
            s.name
        );
    }
    let reasons = notes(&translation);
    assert_a_note_contains(&reasons, "ipMode Proxy");
    assert_a_note_contains(&reasons, "2001:db8::10 is not of the service's IP families");
    assert_valid(out);
}

#[test]
fn node_ports_only_for_node_port_and_load_balancer_types() {
    let spec = |kind: &str| json!({ "type": kind, "clusterIP": "10.96.0.60", "ports": [{ "port": 80, "nodePort": 30080 }] });
    let node = NodeOptions {
        node_name: None,
        addresses: vec![ip("192.0.2.10"), ip("192.0.2.11")],
        ..Default::default()
    };
    let nodeport = services_from(&[svc("default", "np", spec("NodePort"))], NO_SLICES, &node);
    assert_eq!(
        keys(&nodeport),
        [
            key("10.96.0.60", 80, Protocol::Tcp, "default/np:80"),
            key("192.0.2.10", 30080, Protocol::Tcp, "default/np:80/nodeport"),
            key("192.0.2.11", 30080, Protocol::Tcp, "default/np:80/nodeport"),
        ]
    );
    let cluster_ip = services_from(&[svc("default", "np", spec("ClusterIP"))], NO_SLICES, &node);
    assert_eq!(cluster_ip.len(), 1);
    // LoadBalancer without allocated node ports (allocateLoadBalancerNodePorts: false).
    let lb = svc(
        "default",
        "lb",
        json!({ "type": "LoadBalancer", "clusterIP": "10.96.0.61", "ports": [{ "port": 80 }] }),
    );
    assert_eq!(services_from(&[lb], NO_SLICES, &node).len(), 1);
}

#[test]
fn headless_external_name_and_sctp_are_skipped_with_a_reason() {
    let services = [
        svc(
            "default",
            "headless",
            json!({ "clusterIP": "None", "clusterIPs": ["None"], "ports": [{ "port": 80 }] }),
        ),
        svc(
            "default",
            "alias",
            json!({ "type": "ExternalName", "externalName": "db.example.com" }),
        ),
        svc(
            "default",
            "signal",
            json!({ "clusterIP": "10.96.0.70", "ports": [
                { "name": "sctp", "port": 3868, "protocol": "SCTP" },
                { "name": "tcp", "port": 3868 },
            ] }),
        ),
        service(json!({ "metadata": { "namespace": "default", "name": "nospec" } })),
    ];
    let slices = [eps(
        "default",
        "headless-1",
        "headless",
        "IPv4",
        json!([{ "port": 80 }]),
        json!([ready("10.1.0.1")]),
    )];
    let translation = translate(&services, &slices, &NodeOptions::default());
    assert_eq!(
        keys(&translation.services),
        [key("10.96.0.70", 3868, Protocol::Tcp, "default/signal:tcp")]
    );
    let notes = notes(&translation);
    for want in [
        "default/headless: headless service",
        "default/alias: ExternalName service",
        "default/signal:sctp: protocol SCTP is not balanced",
        "default/nospec: no spec",
    ] {
        assert!(
            notes.iter().any(|n| n.starts_with(want)),
            "{want:?} not in {notes:?}"
        );
    }
}

#[test]
fn session_affinity_selects_source_ip_hashing() {
    let services = [svc(
        "default",
        "sticky",
        json!({ "clusterIP": "10.96.0.80", "sessionAffinity": "ClientIP", "ports": [{ "port": 80 }] }),
    )];
    let out = services_from(&services, NO_SLICES, &NodeOptions::default());
    assert_eq!(out[0].hash, HashFields::SourceIp);
}

#[test]
fn local_traffic_policies_keep_only_this_nodes_endpoints() {
    let services = [svc(
        "default",
        "web",
        json!({
            "type": "NodePort",
            "clusterIP": "10.96.0.90",
            "externalTrafficPolicy": "Local",
            "ports": [{ "port": 80, "nodePort": 30090 }],
        }),
    )];
    let on = |address: &str, node: &str| json!({ "addresses": [address], "nodeName": node, "conditions": { "ready": true } });
    let slices = [eps(
        "default",
        "web-1",
        "web",
        "IPv4",
        json!([{ "port": 8080 }]),
        json!([
            on("10.1.0.1", "node-a"),
            on("10.1.0.2", "node-b"),
            ready("10.1.0.3")
        ]),
    )];
    let node = NodeOptions {
        node_name: Some("node-a".into()),
        addresses: vec![ip("192.0.2.10")],
        ..Default::default()
    };
    let out = services_from(&services, &slices, &node);
    // The cluster IP (internalTrafficPolicy: Cluster by default) balances to all.
    assert_eq!(
        find(&out, "10.96.0.90", 80, Protocol::Tcp).backends.len(),
        3
    );
    // The node port (externalTrafficPolicy: Local) only to this node's.
    assert_eq!(
        find(&out, "192.0.2.10", 30090, Protocol::Tcp).backends,
        [backend("10.1.0.1", 8080, 1)]
    );
    // Without a node name the policy cannot be applied: all endpoints.
    let anonymous = NodeOptions {
        node_name: None,
        ..node
    };
    let out = services_from(&services, &slices, &anonymous);
    assert_eq!(
        find(&out, "192.0.2.10", 30090, Protocol::Tcp)
            .backends
            .len(),
        3
    );
}

#[test]
fn colliding_frontends_keep_one_with_a_reason() {
    // Two Services claim the same external IP and port; a third's external IP is another's
    // cluster IP. Cluster IPs win, then the lowest namespace/name.
    let services = [
        svc(
            "b",
            "two",
            json!({ "clusterIP": "10.96.1.2", "externalIPs": ["198.51.100.9"], "ports": [{ "port": 80 }] }),
        ),
        svc(
            "a",
            "one",
            json!({ "clusterIP": "10.96.1.1", "externalIPs": ["198.51.100.9"], "ports": [{ "port": 80 }] }),
        ),
        svc(
            "c",
            "three",
            json!({ "clusterIP": "10.96.1.3", "externalIPs": ["10.96.1.1"], "ports": [{ "port": 80 }] }),
        ),
    ];
    let translation = translate(&services, NO_SLICES, &NodeOptions::default());
    let out = &translation.services;
    assert_eq!(
        find(out, "198.51.100.9", 80, Protocol::Tcp).name,
        "a/one:80/external"
    );
    assert_eq!(find(out, "10.96.1.1", 80, Protocol::Tcp).name, "a/one:80");
    assert_eq!(out.len(), 4, "{:#?}", keys(out));
    let notes = notes(&translation);
    assert!(
        notes.contains(
            &"b/two:80/external: 198.51.100.9:80/tcp is already served for a/one:80/external"
                .into()
        ),
        "{notes:?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("c/three:80/external: 10.96.1.1:80/tcp")),
        "{notes:?}"
    );
    assert_valid(out);
}

#[test]
fn output_is_sorted_and_independent_of_input_order() {
    let mut services = vec![
        svc(
            "default",
            "z",
            json!({ "clusterIP": "10.96.0.3", "ports": [{ "port": 80 }, { "port": 53, "protocol": "UDP" }] }),
        ),
        svc(
            "default",
            "a",
            json!({ "clusterIP": "10.96.0.2", "clusterIPs": ["10.96.0.2", "fd00::2"], "ports": [{ "port": 443 }] }),
        ),
        svc(
            "kube-system",
            "m",
            json!({ "clusterIP": "10.96.0.1", "ports": [{ "port": 53, "protocol": "UDP" }, { "port": 53 }] }),
        ),
    ];
    let mut slices = vec![
        eps(
            "default",
            "z-1",
            "z",
            "IPv4",
            json!([{ "port": 8080 }]),
            json!([ready("10.1.0.9"), ready("10.1.0.1")]),
        ),
        eps(
            "default",
            "z-2",
            "z",
            "IPv4",
            json!([{ "port": 8080 }]),
            json!([ready("10.1.0.5")]),
        ),
        eps(
            "default",
            "a-1",
            "a",
            "IPv6",
            json!([{ "port": 8443 }]),
            json!([ready("fd00:1::2"), ready("fd00:1::1")]),
        ),
    ];
    let first = services_from(&services, &slices, &NodeOptions::default());
    let mut sorted = first.clone();
    sorted.sort_by_key(|s| (s.vip, s.port, s.protocol));
    assert_eq!(first, sorted);
    for s in &first {
        let mut backends = s.backends.clone();
        backends.sort_by_key(|b| (b.address, b.port));
        assert_eq!(s.backends, backends);
    }
    services.reverse();
    slices.reverse();
    assert_eq!(
        services_from(&services, &slices, &NodeOptions::default()),
        first
    );
    services.rotate_left(1);
    slices.rotate_left(1);
    assert_eq!(
        services_from(&services, &slices, &NodeOptions::default()),
        first
    );
    // Arcs (as the reflector stores hold) are accepted as well.
    let arcs: Vec<std::sync::Arc<Service>> =
        services.into_iter().map(std::sync::Arc::new).collect();
    assert_eq!(
        services_from(&arcs, &slices, &NodeOptions::default()),
        first
    );
}

#[test]
fn backends_beyond_the_datapath_limit_are_cut_keeping_ready_ones() {
    let services = [svc(
        "default",
        "big",
        json!({ "clusterIP": "10.96.0.99", "ports": [{ "port": 80 }] }),
    )];
    let max = limits::MAX_BACKENDS_PER_SERVICE as usize;
    // Draining endpoints have the lowest addresses, so an address-only cut would keep them.
    let mut endpoints: Vec<Value> = (0..10)
        .map(|i| terminating(&format!("10.1.0.{i}")))
        .collect();
    endpoints.extend((0..max).map(|i| ready(&format!("10.2.{}.{}", i / 250, i % 250 + 1))));
    let slices = [eps(
        "default",
        "big-1",
        "big",
        "IPv4",
        json!([{ "port": 8080 }]),
        Value::Array(endpoints),
    )];
    let translation = translate(&services, &slices, &NodeOptions::default());
    let backends = &translation.services[0].backends;
    assert_eq!(backends.len(), max);
    assert!(backends.iter().all(|b| b.weight == 1));
    assert!(translation
        .notes
        .iter()
        .any(|n| n.reason.contains("at most 256")));
    assert_valid(&translation.services);
}

/// Services beyond the datapath's capacity (`--max-services`, `--max-backends`) are left out in
/// (VIP, port, protocol) order with a note, so that the rest applies (a state beyond the capacity
/// would be refused whole).
#[test]
fn services_beyond_the_datapath_capacity_are_left_out() {
    let services: Vec<Service> = (0..4)
        .map(|i| {
            svc(
                "default",
                &format!("web{i}"),
                json!({ "clusterIP": format!("10.96.0.{}", 10 + i), "ports": [{ "port": 80 }] }),
            )
        })
        .collect();
    // Each service has two backends of its own and shares 10.1.0.1.
    let slices: Vec<EndpointSlice> = (0..4)
        .map(|i| {
            eps(
                "default",
                &format!("web{i}-1"),
                &format!("web{i}"),
                "IPv4",
                json!([{ "port": 8080 }]),
                json!([
                    ready("10.1.0.1"),
                    ready(&format!("10.1.1.{}", i + 1)),
                    ready(&format!("10.1.2.{}", i + 1))
                ]),
            )
        })
        .collect();
    let with = |services, backends| NodeOptions {
        capacity: Capacity { services, backends },
        ..Default::default()
    };
    let names =
        |t: &Translation| -> Vec<String> { t.services.iter().map(|s| s.name.clone()).collect() };

    let all = translate(&services, &slices, &with(4, 9));
    assert_eq!(
        names(&all),
        [
            "default/web0:80",
            "default/web1:80",
            "default/web2:80",
            "default/web3:80"
        ]
    );
    assert!(all.notes.is_empty(), "{:?}", all.notes);

    let three = translate(&services, &slices, &with(3, 100));
    assert_eq!(
        names(&three),
        ["default/web0:80", "default/web1:80", "default/web2:80"]
    );
    let by_backends = translate(&services, &slices, &with(100, 8));
    assert_eq!(
        names(&by_backends),
        names(&three),
        "1 shared + 2 per service: 9 for four"
    );
    for t in [&three, &by_backends] {
        let notes = notes(t);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with("default/web3:80: 10.96.0.13:80/tcp left out: the datapath holds")
                && notes[0].contains("(--max-services, --max-backends)"),
            "{notes:?}"
        );
        assert_valid(&t.services);
    }
}

#[test]
fn invalid_addresses_are_noted_not_fatal() {
    let services = [svc(
        "default",
        "web",
        json!({ "clusterIP": "10.96.0.10", "externalIPs": ["not-an-ip"], "ports": [{ "port": 80 }] }),
    )];
    let slices = [eps(
        "default",
        "web-1",
        "web",
        "IPv4",
        json!([{ "port": 8080 }]),
        json!([ready("10.1.0.1"), ready("10.1.0.300")]),
    )];
    let translation = translate(&services, &slices, &NodeOptions::default());
    assert_eq!(translation.services.len(), 1);
    assert_eq!(
        translation.services[0].backends,
        [backend("10.1.0.1", 8080, 1)]
    );
    let notes = notes(&translation);
    assert_a_note_contains(&notes, "invalid IP address \"not-an-ip\"");
    assert_a_note_contains(&notes, "invalid endpoint address \"10.1.0.300\"");
}
