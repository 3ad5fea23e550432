//! The TC policy programs on real veths: three workloads in their own namespaces (frontend, db,
//! other), each linked to a node namespace that routes between them, with `policy_from_endpoint` /
//! `policy_to_endpoint` on the node side of every veth. What the servers receive is counted by the
//! servers themselves; denials must also appear in the ring buffer naming the rule.
//!
//! Rules: db accepts TCP 6379 and UDP 5353 from frontend only; db's egress and frontend's ingress
//! are selected with nothing allowed, so replies pass only through the policy conntrack; other is
//! in audit mode and would accept only db.

use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::Duration,
};

use lb_agent::{
    datapath::{Datapath, LoadOptions},
    policy::{
        compile,
        datapath::{
            read_counters, write_cidr_deny, PolicyDatapath, PolicyEvent, PolicyLoadOptions,
        },
        model::Cidr,
        CompiledPolicy, IdentityAllocator, PolicyConfig,
    },
};
use lb_common::policy::{Direction, Reason, Verdict};
use lb_tests::{
    netns::Netns,
    policy_topology::{PolicyTopology, WORKLOADS},
    servers::{tcp_request, udp_requests, TcpCountingServer, UdpCountingServer},
};

const RULES: &str = "
rules:
  - {name: db-from-frontend, endpoints: {match_labels: {app: db}}, direction: ingress,
     action: allow, peers: [{selector: {match_labels: {app: frontend}}}],
     ports: [{port: 6379}, {protocol: udp, port: 5353}]}
  - {name: db-egress-isolated, endpoints: {match_labels: {app: db}}, direction: egress,
     action: allow, peers: []}
  - {name: frontend-ingress-isolated, endpoints: {match_labels: {app: frontend}},
     direction: ingress, action: allow, peers: []}
  - {name: other-from-db, endpoints: {match_labels: {app: other}}, direction: ingress,
     action: allow, peers: [{selector: {match_labels: {app: db}}}]}
";

struct Cluster {
    // Dropped first: detaches the programs before the namespaces go.
    datapath: PolicyDatapath,
    compiled: CompiledPolicy,
    topology: PolicyTopology,
}

impl Cluster {
    fn new() -> Self {
        let topology = PolicyTopology::new().unwrap();
        let yaml = PolicyTopology::workloads_yaml(&["other"]) + RULES;
        let config: PolicyConfig = serde_yaml_ng::from_str(&yaml).unwrap();
        let ifindexes = topology.ifindexes();
        let ifindex_of = |name: &str| ifindexes.iter().find(|(n, _)| n == name).map(|(_, i)| *i);
        let compiled = compile(&config, &mut IdentityAllocator::new(), &ifindex_of).unwrap();
        let mut datapath = PolicyDatapath::load(&PolicyLoadOptions::default()).unwrap();
        datapath.apply(&compiled).unwrap();
        // Attaching resolves interface names in the caller's namespace.
        let datapath = topology.node.run(move || {
            for w in WORKLOADS {
                datapath.attach(w.4).unwrap();
            }
            datapath
        });
        Self {
            datapath,
            compiled,
            topology,
        }
    }

    fn ns(&self, name: &str) -> &Netns {
        self.topology.ns(name)
    }

    fn addr(name: &str, v6: bool) -> IpAddr {
        PolicyTopology::addr(name, v6)
    }

    /// Events drained so far that match `f`.
    fn events(&mut self, f: impl Fn(&PolicyEvent) -> bool) -> Vec<PolicyEvent> {
        // The ring buffer is filled as packets cross; give the last ones a moment.
        thread::sleep(Duration::from_millis(50));
        self.datapath.drain_events().into_iter().filter(f).collect()
    }

    fn rule_name(&self, id: u32) -> &str {
        self.compiled.rule(id).map_or("", |r| r.name.as_str())
    }
}

#[test]
fn three_workloads_connect_as_the_rules_say() {
    let mut c = Cluster::new();
    for v6 in [false, true] {
        let db = Cluster::addr("db", v6);
        let other = Cluster::addr("other", v6);
        let tcp = TcpCountingServer::start(c.ns("db"), db, 6379, "db");
        let udp = UdpCountingServer::start(c.ns("db"), db, 5353, "db-udp");
        let audited = TcpCountingServer::start(c.ns("other"), other, 7000, "other");

        // Allowed: frontend → db, TCP and UDP; the replies come back through two selected
        // directions (db's egress, frontend's ingress) on the policy conntrack alone.
        let greeting = tcp_request(c.ns("frontend"), SocketAddr::new(db, 6379), b"hello")
            .unwrap_or_else(|e| panic!("frontend -> db:6379 (v6 {v6}): {e}"));
        assert_eq!(greeting, "db");
        let answers = udp_requests(c.ns("frontend"), SocketAddr::new(db, 5353), 3, b"query");
        assert!(
            answers.iter().all(|a| a.as_deref().ok() == Some("db-udp")),
            "{answers:?}"
        );
        assert_eq!(udp.datagrams(), 3);
        assert!(
            c.events(|e| e.verdict != Verdict::Allow).is_empty(),
            "nothing denied on allowed connections"
        );

        // Denied: other → db, TCP and UDP; nothing reaches db's servers, and every denial is
        // reported with the rule that selected db (the default deny's rule).
        let connections = tcp.connections();
        assert!(tcp_request(c.ns("other"), SocketAddr::new(db, 6379), b"hello").is_err());
        assert!(udp_requests(c.ns("other"), SocketAddr::new(db, 5353), 1, b"query")[0].is_err());
        assert_eq!(tcp.connections(), connections, "denied TCP reached db");
        assert_eq!(udp.datagrams(), 3, "denied UDP reached db");
        let denials = c.events(|e| e.verdict == Verdict::Deny && e.src == Some(other));
        for port in [6379, 5353] {
            let e = denials
                .iter()
                .find(|e| e.dst_port == port)
                .unwrap_or_else(|| panic!("no denial of other -> db:{port} in {denials:?}"));
            assert_eq!(
                (e.direction, e.reason, e.dst, c.rule_name(e.rule_id)),
                (
                    Direction::Ingress,
                    Reason::DefaultDeny,
                    Some(db),
                    "db-from-frontend"
                )
            );
        }
        // db cannot open connections either (its egress allows nothing).
        assert!(tcp_request(c.ns("db"), SocketAddr::new(other, 7000), b"x").is_err());
        assert_eq!(audited.connections(), 0);

        // Audit: other would accept only db; frontend's connection passes and is reported.
        let greeting = tcp_request(c.ns("frontend"), SocketAddr::new(other, 7000), b"hello")
            .unwrap_or_else(|e| panic!("audited frontend -> other:7000 (v6 {v6}): {e}"));
        assert_eq!(greeting, "other");
        let audits = c.events(|e| e.verdict == Verdict::Audit && e.dst == Some(other));
        assert!(
            audits.iter().any(|e| e.reason == Reason::DefaultDeny
                && e.dst_port == 7000
                && c.rule_name(e.rule_id) == "other-from-db"),
            "{audits:?}"
        );
    }
}

#[test]
fn xdp_cidr_deny_drops_a_listed_source_on_the_node() {
    let c = Cluster::new();
    let db = Cluster::addr("db", false);
    let frontend = Cluster::addr("frontend", false);
    let server = TcpCountingServer::start(c.ns("db"), db, 6379, "db");
    let target = SocketAddr::new(db, 6379);
    assert_eq!(tcp_request(c.ns("frontend"), target, b"x").unwrap(), "db");

    // lb_xdp with the CIDR deny list enabled, on the interface frontend's packets arrive on.
    let mut xdp = Datapath::load_with_cidr_deny(&LoadOptions::default(), true).unwrap();
    let listed = vec![Cidr::host(frontend)];
    write_cidr_deny(xdp.ebpf_mut(), &[], &listed).unwrap();
    let mut xdp = c.topology.node.run(move || {
        xdp.attach(WORKLOADS[0].4).unwrap();
        xdp
    });
    let connections = server.connections();
    assert!(tcp_request(c.ns("frontend"), target, b"x").is_err());
    assert_eq!(
        server.connections(),
        connections,
        "a listed source reached db"
    );
    let dropped = read_counters(xdp.ebpf_mut())
        .unwrap()
        .into_iter()
        .find(|(v, r, _)| (*v, *r) == (Verdict::Deny, Reason::CidrDeny))
        .unwrap()
        .2;
    assert!(dropped >= 1, "drops counted");

    // Off the list: through again (the policy allows it).
    write_cidr_deny(xdp.ebpf_mut(), &listed, &[]).unwrap();
    assert_eq!(tcp_request(c.ns("frontend"), target, b"x").unwrap(), "db");
    drop(xdp);
}
