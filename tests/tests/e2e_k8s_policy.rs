//! Kubernetes NetworkPolicies end to end: a fake API server serves Namespaces, Pods and the
//! NetworkPolicy examples of the Kubernetes documentation (`lb_agent::policy::k8s_examples`, CIDRs
//! moved to TEST-NET); `K8sSource` watches it, and every published policy is compiled and applied to
//! a real `PolicyDatapath` attached to the veths of three workloads living in their own namespaces
//! (the policy topology), as the agent's enforcer does. After each change the test
//! (a) reads the kernel maps back (ipcache, endpoints, `POLICY`, under the epoch in force) and
//! compares them with what the objects must produce, and (b) sends real TCP and UDP traffic and
//! checks that each pair connects or not as Kubernetes specifies (counted by the servers), with
//! every denial counted in `POLICY_COUNTERS` and reported in the ring buffer naming its rule.
//!
//! Examples used: test-network-policy, default-deny-ingress, allow-all-ingress, default-deny-egress,
//! allow-all-egress, multi-port-egress (`endPort`).
//!
//! The pods: `default/frontend` (role=frontend), `default/db` (role=db), `other/other`
//! (role=frontend, in a namespace without labels). The node namespace stands for everything outside
//! the cluster: it sends from 198.51.100.1 (in the ipBlock) and 198.51.100.129 (in its `except`), and
//! serves on 203.0.113.1 (the egress ipBlock).
//!
//! Kubernetes does not say which host-side interface a pod has (the CNI knows), and the agent takes
//! local interfaces from its config file or gRPC API; here the test plays the CNI and gives each
//! pod of the published policy its veth, so pod label changes reach the local endpoints too.

use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use lb_agent::{
    k8s::{K8sOptions, K8sSource},
    policy::{
        compile,
        datapath::{PolicyDatapath, PolicyEvent, PolicyLoadOptions},
        k8s_examples, CompiledPolicy, IdentityAllocator, IdentityKey, PolicyConfig,
    },
};
use lb_common::policy::{Direction, IpKeyV4, IpKeyV6, Reason, Verdict};
use lb_tests::{
    fake_apiserver::FakeApiServer,
    netns::Netns,
    policy_topology::{PolicyTopology, WORKLOADS},
    servers::{tcp_request, udp_requests, TcpCountingServer, UdpCountingServer},
};
use serde_json::json;
use tokio::sync::watch;

/// Bound of every wait for the watchers to publish a change.
const WAIT: Duration = Duration::from_secs(10);

/// The node's addresses: inside the ingress ipBlock, inside its `except`, inside the egress ipBlock.
const NODE_IN_BLOCK: &str = "198.51.100.1";
const NODE_IN_EXCEPT: &str = "198.51.100.129";
const NODE_SERVER: &str = "203.0.113.1";

/// The documentation's CIDRs, moved to TEST-NET.
fn test_net(manifest: &str) -> String {
    manifest
        .replace("172.17.0.0/16", "198.51.100.0/24")
        .replace("172.17.1.0/24", "198.51.100.128/25")
        .replace("10.0.0.0/24", "203.0.113.0/24")
}

/// A documentation example as the API server stores it, in `namespace`.
fn example(manifest: &str, namespace: &str) -> NetworkPolicy {
    let mut policy: NetworkPolicy =
        serde_yaml_ng::from_str(&test_net(manifest)).expect("a NetworkPolicy");
    policy.metadata.namespace = Some(namespace.to_string());
    policy
}

fn namespace(name: &str, labels: serde_json::Value) -> Namespace {
    serde_json::from_value(json!({ "metadata": { "name": name, "labels": labels } })).unwrap()
}

/// Pod `name` of the policy topology (its addresses), in `ns` with label `role`.
fn pod(ns: &str, name: &str, role: &str) -> Pod {
    let (v4, v6) = (addr(name, false), addr(name, true));
    serde_json::from_value(json!({
        "metadata": { "namespace": ns, "name": name, "labels": { "role": role } },
        "spec": { "containers": [{ "name": "c" }] },
        "status": { "phase": "Running", "podIP": v4.to_string(),
                    "podIPs": [{ "ip": v4.to_string() }, { "ip": v6.to_string() }] },
    }))
    .unwrap()
}

fn addr(workload: &str, v6: bool) -> IpAddr {
    PolicyTopology::addr(workload, v6)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The identity every node gives a pod with these labels (a hash of the label set).
fn identity_of(namespace: &str, role: &str) -> u32 {
    let labels = [("role".to_string(), role.to_string())].into();
    IdentityAllocator::new()
        .allocate(&IdentityKey::workload(namespace, &labels))
        .unwrap()
}

/// Where traffic comes from: a workload or the node (with its source address).
#[derive(Clone, Copy)]
enum Source {
    Pod(&'static str),
    Node(&'static str),
}

struct Cluster {
    // Dropped first: detaches the programs before the namespaces go.
    datapath: PolicyDatapath,
    identities: IdentityAllocator,
    ifindexes: Vec<(String, u32)>,
    rx: watch::Receiver<PolicyConfig>,
    _source: K8sSource,
    server: FakeApiServer,
    topology: PolicyTopology,
}

impl Cluster {
    async fn new() -> Self {
        let topology = PolicyTopology::new().unwrap();
        for a in [NODE_IN_BLOCK, NODE_IN_EXCEPT, NODE_SERVER] {
            topology
                .node
                .ip_cmd(&format!("addr add {a}/32 dev lo"))
                .unwrap();
        }
        let ifindexes = topology.ifindexes();
        let server = FakeApiServer::start().unwrap();
        server.apply(&namespace("default", json!({})));
        server.apply(&namespace("other", json!({})));
        server.apply(&pod("default", "frontend", "frontend"));
        server.apply(&pod("default", "db", "db"));
        server.apply(&pod("other", "other", "frontend"));
        server.apply(&example(k8s_examples::TEST_NETWORK_POLICY, "default"));
        let client = K8sSource::client_from_url(&server.url()).unwrap();
        let source = K8sSource::start(
            client,
            K8sOptions {
                debounce: Duration::from_millis(50),
                backoff_min: Duration::from_millis(50),
                backoff_max: Duration::from_millis(500),
                ..Default::default()
            },
        );
        assert!(source.wait_synced(WAIT).await, "not synced within {WAIT:?}");
        let rx = source.subscribe_policy();
        let mut datapath = PolicyDatapath::load(&PolicyLoadOptions::default()).unwrap();
        // An empty rule set until the first published policy: attached programs pass everything.
        datapath.apply(&CompiledPolicy::default()).unwrap();
        let datapath = topology.node.run(move || {
            for w in WORKLOADS {
                datapath.attach(w.4).unwrap();
            }
            datapath
        });
        Self {
            datapath,
            identities: IdentityAllocator::new(),
            ifindexes,
            rx,
            _source: source,
            server,
            topology,
        }
    }

    /// Waits until the published Kubernetes policy satisfies `condition`, then compiles and
    /// applies it (the test as the CNI: each pod gets its veth), reads the maps back and checks
    /// that the epoch in force holds exactly the compiled entries and the other epoch none.
    async fn follow(&mut self, what: &str, condition: impl Fn(&PolicyConfig) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut policy = loop {
            let policy = self.rx.borrow_and_update().clone();
            if condition(&policy) {
                break policy;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if tokio::time::timeout(left, self.rx.changed()).await.is_err() {
                panic!("{what}: not published within {WAIT:?}:\n{policy:#?}");
            }
        };
        for w in &mut policy.workloads {
            w.interface = WORKLOADS
                .iter()
                .find(|(name, ..)| *name == w.name)
                .map(|(.., iface)| iface.to_string());
        }
        let ifindex_of = |name: &str| {
            self.ifindexes
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, i)| *i)
        };
        let compiled = compile(&policy, &mut self.identities, &ifindex_of)
            .unwrap_or_else(|e| panic!("{what}: compile: {e}"));
        self.datapath.apply(&compiled).unwrap();
        let epoch = self.datapath.epoch();
        let kernel = self.datapath.read_epoch(epoch).unwrap();
        assert_eq!(
            (
                &kernel.ipcache_v4,
                &kernel.ipcache_v6,
                &kernel.endpoints_v4,
                &kernel.endpoints_v6,
                &kernel.policy
            ),
            (
                &compiled.ipcache_v4,
                &compiled.ipcache_v6,
                &compiled.endpoints_v4,
                &compiled.endpoints_v6,
                &compiled.policy
            ),
            "{what}: the kernel maps of epoch {epoch} hold the compiled entries"
        );
        assert_eq!(
            self.datapath.entries_per_epoch().unwrap()[1 - epoch as usize],
            0,
            "{what}: the previous epoch's entries are gone"
        );
        println!(
            "{what}: epoch {epoch}: {} + {} ipcache, {} + {} endpoint, {} policy entries",
            kernel.ipcache_v4.len(),
            kernel.ipcache_v6.len(),
            kernel.endpoints_v4.len(),
            kernel.endpoints_v6.len(),
            kernel.policy.len()
        );
    }

    /// The ipcache identity of an exact address under the epoch in force (`None`: not a pod).
    fn ipcache_identity(&self, a: IpAddr) -> Option<u32> {
        let live = self.datapath.live();
        match a {
            IpAddr::V4(a) => live.ipcache_v4.get(&IpKeyV4::prefix(0, a, 32)),
            IpAddr::V6(a) => live.ipcache_v6.get(&IpKeyV6::prefix(0, a, 128)),
        }
        .map(|e| e.identity)
    }

    /// (identity, ifindex) of a local endpoint address in the kernel's endpoint map.
    fn endpoint(&self, a: IpAddr) -> Option<(u32, u32)> {
        let kernel = self.datapath.read_epoch(self.datapath.epoch()).unwrap();
        match a {
            IpAddr::V4(a) => kernel.endpoints_v4.get(&IpKeyV4::exact(0, a)).copied(),
            IpAddr::V6(a) => kernel.endpoints_v6.get(&IpKeyV6::exact(0, a)).copied(),
        }
        .map(|e| (e.identity, e.ifindex))
    }

    fn ifindex(&self, workload: &str) -> u32 {
        let iface = WORKLOADS.iter().find(|w| w.0 == workload).unwrap().4;
        self.ifindexes.iter().find(|(n, _)| n == iface).unwrap().1
    }

    /// Pod addresses map to their label set's identity; local ones are endpoints on their veth.
    fn assert_pod(&self, workload: &str, namespace: &str, role: &str) {
        let id = identity_of(namespace, role);
        for v6 in [false, true] {
            let a = addr(workload, v6);
            assert_eq!(self.ipcache_identity(a), Some(id), "ipcache {a}");
            assert_eq!(
                self.endpoint(a),
                Some((id, self.ifindex(workload))),
                "endpoint {a}"
            );
        }
    }

    fn ns(&self, from: Source) -> &Netns {
        match from {
            Source::Pod(name) => self.topology.ns(name),
            Source::Node(_) => &self.topology.node,
        }
    }

    /// The node sends towards db from `source` (the route's preferred source).
    fn node_source(&self, from: Source) {
        if let Source::Node(source) = from {
            let (.., iface) = WORKLOADS[1];
            self.topology
                .node
                .ip_cmd(&format!(
                    "route replace 192.0.2.4/30 dev {iface} src {source}"
                ))
                .unwrap();
        }
    }

    fn source_addr(from: Source, v6: bool) -> IpAddr {
        match from {
            Source::Pod(name) => addr(name, v6),
            Source::Node(a) => ip(a),
        }
    }

    fn denials(&self) -> u64 {
        self.datapath
            .counters()
            .unwrap()
            .iter()
            .filter(|(v, ..)| *v == Verdict::Deny)
            .map(|(.., n)| n)
            .sum()
    }

    /// TCP from `from` to `server`: does it connect (and does the server count it)?
    fn tcp(&self, from: Source, server: &TcpCountingServer, target: SocketAddr) -> bool {
        self.node_source(from);
        let before = server.connections();
        let result = tcp_request(self.ns(from), target, b"x");
        let counted = server.connections() > before;
        assert_eq!(result.is_ok(), counted, "{target}: {result:?}");
        counted
    }

    /// One UDP datagram from `from` to `server`: answered (and counted by the server)?
    fn udp(&self, from: Source, server: &UdpCountingServer, target: SocketAddr) -> bool {
        self.node_source(from);
        let before = server.datagrams();
        let result = udp_requests(self.ns(from), target, 1, b"x").remove(0);
        let counted = server.datagrams() > before;
        assert_eq!(result.is_ok(), counted, "{target}: {result:?}");
        counted
    }

    /// The connection is allowed: TCP (or UDP) connects, nothing is denied.
    #[track_caller]
    fn allowed(&mut self, from: Source, target: SocketAddr, server: Server) {
        let denials = self.denials();
        let ok = match server {
            Server::Tcp(s) => self.tcp(from, s, target),
            Server::Udp(s) => self.udp(from, s, target),
        };
        assert!(
            ok,
            "{target} from {:?}: allowed",
            Self::source_addr(from, false)
        );
        assert_eq!(self.denials(), denials, "no denial counted for {target}");
    }

    /// The connection is denied: nothing reaches the server, the denial is counted and reported
    /// with `direction`, the default deny's reason, and one of `rules`.
    #[track_caller]
    fn denied(
        &mut self,
        from: Source,
        target: SocketAddr,
        server: Server,
        direction: Direction,
        rules: &[&str],
    ) {
        self.datapath.drain_events();
        let denials = self.denials();
        let ok = match server {
            Server::Tcp(s) => self.tcp(from, s, target),
            Server::Udp(s) => self.udp(from, s, target),
        };
        let src = Self::source_addr(from, target.is_ipv6());
        assert!(!ok, "{src} -> {target}: denied");
        assert!(
            self.denials() > denials,
            "{src} -> {target}: denial counted"
        );
        thread::sleep(Duration::from_millis(50));
        let events: Vec<PolicyEvent> = self.datapath.drain_events();
        let live = self.datapath.live();
        let found = events.iter().find(|e| {
            e.verdict == Verdict::Deny
                && e.src == Some(src)
                && e.dst == Some(target.ip())
                && e.dst_port == target.port()
        });
        let e = found.unwrap_or_else(|| panic!("{src} -> {target}: no denial in {events:?}"));
        let rule = live.rule(e.rule_id).map_or("", |r| r.name.as_str());
        assert_eq!(
            (e.direction, e.reason),
            (direction, Reason::DefaultDeny),
            "{src} -> {target}"
        );
        assert!(
            rules.contains(&rule),
            "{src} -> {target}: rule {rule}, not one of {rules:?}"
        );
    }
}

#[derive(Clone, Copy)]
enum Server<'a> {
    Tcp(&'a TcpCountingServer),
    Udp(&'a UdpCountingServer),
}

fn has_policy(p: &PolicyConfig, name: &str) -> bool {
    p.network_policies
        .iter()
        .any(|m| m.0.metadata.name.as_deref() == Some(name))
}

fn role_of(p: &PolicyConfig, pod: &str) -> Option<String> {
    p.workloads
        .iter()
        .find(|w| w.name == pod)
        .and_then(|w| w.labels.get("role").cloned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_policy_examples_behave_as_kubernetes_specifies() {
    let mut c = Cluster::new().await;
    let sock = |a: IpAddr, port| SocketAddr::new(a, port);
    let (db, db6) = (addr("db", false), addr("db", true));
    let (frontend, other) = (addr("frontend", false), addr("other", false));
    let node = ip(NODE_SERVER);
    let db_6379 = TcpCountingServer::start(c.ns(Source::Pod("db")), db, 6379, "db");
    let db_6380 = TcpCountingServer::start(c.ns(Source::Pod("db")), db, 6380, "db");
    let db_udp = UdpCountingServer::start(c.ns(Source::Pod("db")), db, 6379, "db");
    let db6_6379 = TcpCountingServer::start(c.ns(Source::Pod("db")), db6, 6379, "db");
    let frontend_80 = TcpCountingServer::start(c.ns(Source::Pod("frontend")), frontend, 80, "fe");
    let other_7000 = TcpCountingServer::start(c.ns(Source::Pod("other")), other, 7000, "other");
    let node_server = |port| TcpCountingServer::start(&c.topology.node, node, port, "node");
    let (node_5978, node_5979) = (node_server(5978), node_server(5979));
    let (node_32000, node_32768, node_32769) =
        (node_server(32000), node_server(32768), node_server(32769));
    let node_udp = UdpCountingServer::start(&c.topology.node, node, 32000, "node");

    let (fe, db_pod, other_pod) = (
        Source::Pod("frontend"),
        Source::Pod("db"),
        Source::Pod("other"),
    );
    let (in_block, in_except) = (Source::Node(NODE_IN_BLOCK), Source::Node(NODE_IN_EXCEPT));
    let ingress = "k8s:default/test-network-policy:ingress";
    let egress = "k8s:default/test-network-policy:egress";

    // ---- test-network-policy: db accepts TCP 6379 from role=frontend pods of its namespace,
    // pods of namespaces labelled project=myproject, and 198.51.100.0/24 except .128/25; db may
    // send only to 203.0.113.0/24 on TCP 5978.
    c.follow("test-network-policy", |p| {
        has_policy(p, "test-network-policy") && p.workloads.len() == 3
    })
    .await;
    c.assert_pod("frontend", "default", "frontend");
    c.assert_pod("db", "default", "db");
    c.assert_pod("other", "other", "frontend");
    let live = c.datapath.live();
    for rule in [
        "k8s:default/test-network-policy:ingress[0]",
        ingress,
        "k8s:default/test-network-policy:egress[0]",
        egress,
    ] {
        assert!(live.rules.iter().any(|r| r.name == rule), "rule {rule}");
    }
    // The ipBlocks are in the ipcache as prefixes (the `except` one with its own identity).
    for (block, len) in [
        ("198.51.100.0", 24),
        ("198.51.100.128", 25),
        ("203.0.113.0", 24),
    ] {
        let key = IpKeyV4::prefix(0, block.parse().unwrap(), len);
        assert!(
            live.ipcache_v4.contains_key(&key),
            "{block}/{len} in the ipcache"
        );
    }

    c.allowed(fe, sock(db, 6379), Server::Tcp(&db_6379));
    c.allowed(fe, sock(db6, 6379), Server::Tcp(&db6_6379));
    c.denied(
        fe,
        sock(db, 6380),
        Server::Tcp(&db_6380),
        Direction::Ingress,
        &[ingress],
    );
    c.denied(
        fe,
        sock(db, 6379),
        Server::Udp(&db_udp),
        Direction::Ingress,
        &[ingress],
    );
    // role=frontend in another namespace is not selected by a bare podSelector.
    c.denied(
        other_pod,
        sock(db, 6379),
        Server::Tcp(&db_6379),
        Direction::Ingress,
        &[ingress],
    );
    c.allowed(in_block, sock(db, 6379), Server::Tcp(&db_6379));
    c.denied(
        in_except,
        sock(db, 6379),
        Server::Tcp(&db_6379),
        Direction::Ingress,
        &[ingress],
    );
    // Egress: only 203.0.113.0/24 TCP 5978 (replies of allowed ingress pass through conntrack).
    c.allowed(db_pod, sock(node, 5978), Server::Tcp(&node_5978));
    c.denied(
        db_pod,
        sock(node, 5979),
        Server::Tcp(&node_5979),
        Direction::Egress,
        &[egress],
    );
    c.denied(
        db_pod,
        sock(frontend, 80),
        Server::Tcp(&frontend_80),
        Direction::Egress,
        &[egress],
    );
    // Not selected: open.
    c.allowed(fe, sock(other, 7000), Server::Tcp(&other_7000));
    c.allowed(other_pod, sock(frontend, 80), Server::Tcp(&frontend_80));

    // ---- Namespace `other` labelled project=myproject: its pods may reach db.
    c.server
        .apply(&namespace("other", json!({ "project": "myproject" })));
    c.follow("namespace relabelled", |p| {
        p.namespaces
            .iter()
            .any(|n| n.name == "other" && n.labels.contains_key("project"))
    })
    .await;
    c.allowed(other_pod, sock(db, 6379), Server::Tcp(&db_6379));

    // ---- frontend relabelled role=web: a new identity for its addresses, no longer allowed.
    c.server.apply(&pod("default", "frontend", "web"));
    c.follow("frontend relabelled", |p| {
        role_of(p, "frontend").as_deref() == Some("web")
    })
    .await;
    c.assert_pod("frontend", "default", "web");
    assert!(
        !c.datapath
            .live()
            .identities
            .contains_key(&identity_of("default", "frontend")),
        "the old identity is released"
    );
    c.denied(
        fe,
        sock(db, 6379),
        Server::Tcp(&db_6379),
        Direction::Ingress,
        &[ingress],
    );

    // ---- default-deny-ingress in `other`, then allow-all-ingress next to it: policies add up.
    c.server
        .apply(&example(k8s_examples::DEFAULT_DENY_INGRESS, "other"));
    c.follow("default-deny-ingress", |p| {
        has_policy(p, "default-deny-ingress")
    })
    .await;
    c.denied(
        fe,
        sock(other, 7000),
        Server::Tcp(&other_7000),
        Direction::Ingress,
        &["k8s:other/default-deny-ingress:ingress"],
    );
    c.server
        .apply(&example(k8s_examples::ALLOW_ALL_INGRESS, "other"));
    c.follow("allow-all-ingress", |p| has_policy(p, "allow-all-ingress"))
        .await;
    c.allowed(fe, sock(other, 7000), Server::Tcp(&other_7000));

    // ---- policyTypes [Egress]: default-deny-egress in `other`, then allow-all-egress.
    c.server
        .apply(&example(k8s_examples::DEFAULT_DENY_EGRESS, "other"));
    c.follow("default-deny-egress", |p| {
        has_policy(p, "default-deny-egress")
    })
    .await;
    c.denied(
        other_pod,
        sock(frontend, 80),
        Server::Tcp(&frontend_80),
        Direction::Egress,
        &["k8s:other/default-deny-egress:egress"],
    );
    c.server
        .apply(&example(k8s_examples::ALLOW_ALL_EGRESS, "other"));
    c.follow("allow-all-egress", |p| has_policy(p, "allow-all-egress"))
        .await;
    c.allowed(other_pod, sock(frontend, 80), Server::Tcp(&frontend_80));

    // ---- multi-port-egress (endPort): db may also send to TCP 32000-32768.
    c.server
        .apply(&example(k8s_examples::MULTI_PORT_EGRESS, "default"));
    c.follow("multi-port-egress", |p| has_policy(p, "multi-port-egress"))
        .await;
    c.allowed(db_pod, sock(node, 32000), Server::Tcp(&node_32000));
    c.allowed(db_pod, sock(node, 32768), Server::Tcp(&node_32768));
    c.allowed(db_pod, sock(node, 5978), Server::Tcp(&node_5978));
    // Both policies isolate db's egress; the denial names one of their default denies.
    let egress_multi = "k8s:default/multi-port-egress:egress";
    for (target, server) in [
        (sock(node, 32769), Server::Tcp(&node_32769)),
        (sock(node, 32000), Server::Udp(&node_udp)),
    ] {
        c.denied(
            db_pod,
            target,
            server,
            Direction::Egress,
            &[egress, egress_multi],
        );
    }

    // ---- Both db policies deleted: db is selected by nothing, open both ways.
    assert!(c
        .server
        .delete::<NetworkPolicy>("default", "test-network-policy"));
    assert!(c
        .server
        .delete::<NetworkPolicy>("default", "multi-port-egress"));
    c.follow("db policies deleted", |p| {
        !has_policy(p, "test-network-policy") && !has_policy(p, "multi-port-egress")
    })
    .await;
    assert!(
        c.datapath
            .live()
            .rules
            .iter()
            .all(|r| r.name.starts_with("k8s:other/")),
        "only other's rules left"
    );
    c.allowed(fe, sock(db, 6379), Server::Tcp(&db_6379));
    c.allowed(in_except, sock(db, 6379), Server::Tcp(&db_6379));
    c.allowed(db_pod, sock(frontend, 80), Server::Tcp(&frontend_80));
    c.allowed(db_pod, sock(node, 5979), Server::Tcp(&node_5979));

    // ---- The pod `other` deleted: its addresses leave the ipcache and the endpoint map.
    assert!(c.server.delete::<Pod>("other", "other"));
    c.follow("pod deleted", |p| p.workloads.len() == 2).await;
    for v6 in [false, true] {
        let a = addr("other", v6);
        assert_eq!(c.ipcache_identity(a), None, "{a} left the ipcache");
        assert_eq!(c.endpoint(a), None, "{a} left the endpoints");
    }
    assert!(c.datapath.live().identities.values().all(|k| *k
        != IdentityKey::workload(
            "other",
            &[("role".to_string(), "frontend".to_string())].into()
        )));
}
