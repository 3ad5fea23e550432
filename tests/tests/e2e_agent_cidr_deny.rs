//! The XDP CIDR deny list from the agent's config (`policy.cidr_deny`): the real `lb-agent run` in
//! the node namespace of the three-workload topology, `lb_xdp` on the interfaces frontend's and
//! other's packets arrive on. A listed source (frontend, IPv4 and IPv6) never reaches db's server
//! and the drops are counted (`lb_policy_verdicts_total{verdict="deny",reason="cidr_deny"}`); an
//! unlisted one (other) connects; an invalid edit is rejected with the list kept; an edit that
//! removes the source lets it through. An agent started without a list loads the check when an
//! edit adds one, reloading its programs into the pinned links without a restart (a connection
//! open across the reload goes on), and unloads it when the list is emptied again. The listed source is also dropped when the
//! balancer is attached as TC (`--attach tc`: `lb_tc` checks the same list).

use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{metric_sum, scrape_metrics, AgentProcess, ConfigFile},
    netns::Netns,
    policy_topology::{PolicyTopology, WORKLOADS},
    servers::{tcp_connect, tcp_request, TcpCountingServer},
};

const METRICS: &str = "127.0.0.1:9472";
const DB_PORT: u16 = 6379;

fn config(cidr_deny: &str) -> String {
    format!("services: []\npolicy:\n  cidr_deny: {cidr_deny}\n")
}

/// XDP CIDR drops as `/metrics` shows them, once at least `at_least` (the agent reads every 200 ms).
fn cidr_drops(node: &Netns, at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let scrape = scrape_metrics(node, METRICS.parse().unwrap()).expect("scrape /metrics");
        let n = metric_sum(
            &scrape,
            "lb_policy_verdicts_total",
            &[("verdict", "deny"), ("reason", "cidr_deny")],
        );
        if n >= at_least || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Does a TCP connection from `from` reach db's server (counted by the server)?
fn reaches(
    topology: &PolicyTopology,
    from: &str,
    servers: &[TcpCountingServer; 2],
    v6: bool,
) -> bool {
    let server = &servers[v6 as usize];
    let target = SocketAddr::new(PolicyTopology::addr("db", v6), DB_PORT);
    let before = server.connections();
    let result = tcp_request(topology.ns(from), target, b"x");
    let counted = server.connections() > before;
    assert_eq!(result.is_ok(), counted, "{from} -> {target}: {result:?}");
    counted
}

/// frontend (listed) reaches db over neither family; other (unlisted) over both.
fn only_the_listed_source_is_dropped(topology: &PolicyTopology, servers: &[TcpCountingServer; 2]) {
    for v6 in [false, true] {
        assert!(
            !reaches(topology, "frontend", servers, v6),
            "listed source, v6 {v6}"
        );
        assert!(
            reaches(topology, "other", servers, v6),
            "unlisted source, v6 {v6}"
        );
    }
}

fn start_agent(topology: &PolicyTopology, file: &ConfigFile) -> AgentProcess {
    start_agent_with(topology, file, &[])
}

fn start_agent_with(topology: &PolicyTopology, file: &ConfigFile, extra: &[&str]) -> AgentProcess {
    // The balancer on the node side of frontend's and other's veths: their "external" interfaces.
    let interfaces = [WORKLOADS[0].4.to_string(), WORKLOADS[2].4.to_string()];
    let mut args = vec!["--metrics-addr", METRICS, "--stats-interval", "1"];
    args.extend_from_slice(extra);
    AgentProcess::start_with(&topology.node, file.path(), &interfaces, &args).expect("agent starts")
}

#[test]
fn the_agent_drops_listed_sources_at_xdp_and_follows_edits() {
    let topology = PolicyTopology::new().expect("topology");
    let servers = [false, true].map(|v6| {
        let db: IpAddr = PolicyTopology::addr("db", v6);
        TcpCountingServer::start(topology.ns("db"), db, DB_PORT, "db")
    });

    let file = ConfigFile::new(&config("[192.0.2.2/32, \"2001:db8:1::/64\"]"));
    let mut agent = start_agent(&topology, &file);
    // Written before the agent reports ready.
    assert!(
        agent
            .history
            .iter()
            .any(|l| l.contains("XDP CIDR deny list applied") && l.contains("prefixes=2")),
        "{:#?}",
        agent.history
    );
    only_the_listed_source_is_dropped(&topology, &servers);
    // Each refused connect is its SYN and the kernel's retransmissions: at least one per family.
    let drops = cidr_drops(&topology.node, 2.0);
    assert!(drops >= 2.0, "XDP CIDR drops counted: {drops}");
    println!("XDP CIDR drops counted: {drops}");

    // An invalid edit: rejected, naming the field; the list stays in force.
    file.rewrite(&config("[192.0.2.2/24]"));
    let rejected = agent
        .wait_for_log("config rejected", Duration::from_secs(5))
        .unwrap();
    assert!(rejected.contains("policy.cidr_deny[0]"), "{rejected}");
    assert!(
        !reaches(&topology, "frontend", &servers, false),
        "list kept"
    );
    let drops = cidr_drops(&topology.node, drops + 1.0);

    // An edit that no longer lists frontend: through at once, both families.
    file.rewrite(&config("[203.0.113.0/24]"));
    agent
        .wait_for_log("XDP CIDR deny list applied", Duration::from_secs(5))
        .unwrap();
    for v6 in [false, true] {
        assert!(
            reaches(&topology, "frontend", &servers, v6),
            "unlisted now, v6 {v6}"
        );
    }
    assert_eq!(cidr_drops(&topology.node, 0.0), drops, "no new drops");
    drop(agent);

    // Without a list at start the check is not loaded; an edit adding one reloads the programs
    // with it (no restart): the listed source is dropped from then on, while other's connection,
    // open across the reload, goes on. Emptying the list reloads them without the check.
    let file = ConfigFile::new(&config("[]"));
    let mut agent = start_agent(&topology, &file);
    assert!(reaches(&topology, "frontend", &servers, false));
    let db = SocketAddr::new(PolicyTopology::addr("db", false), DB_PORT);
    let (mut open, _) = tcp_connect(topology.ns("other"), db).expect("other connects");
    let bytes_before = servers[0].bytes();
    open.write_all(b"before").unwrap();
    let program = topology.node.xdp_program_id(WORKLOADS[0].4);
    file.rewrite(&config("[192.0.2.2/32, \"2001:db8:1::/64\"]"));
    let reloaded = agent
        .wait_for_log("programs reloaded: ", Duration::from_secs(30))
        .unwrap();
    assert!(reloaded.contains("CIDR deny check on"), "{reloaded}");
    agent
        .wait_for_log("XDP CIDR deny list applied", Duration::from_secs(5))
        .unwrap();
    assert_ne!(
        topology.node.xdp_program_id(WORKLOADS[0].4),
        program,
        "the new program is attached"
    );
    only_the_listed_source_is_dropped(&topology, &servers);
    open.write_all(b"after")
        .expect("other's open connection goes on");
    // "before" and "after", and other's IPv4 request ("x"); nothing of frontend's.
    let deadline = Instant::now() + Duration::from_secs(5);
    while servers[0].bytes() < bytes_before + 12 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(servers[0].bytes(), bytes_before + 12, "bytes db received");
    file.rewrite(&config("[]"));
    let reloaded = agent
        .wait_for_log("programs reloaded: ", Duration::from_secs(30))
        .unwrap();
    assert!(reloaded.contains("CIDR deny check off"), "{reloaded}");
    assert!(reaches(&topology, "frontend", &servers, false));
    assert!(
        !agent.history.iter().any(|l| l.contains("not applied")),
        "{:#?}",
        agent.history
    );
}

#[test]
fn the_agent_drops_listed_sources_at_tc_when_attached_as_tc() {
    let topology = PolicyTopology::new().expect("topology");
    let servers = [false, true].map(|v6| {
        let db: IpAddr = PolicyTopology::addr("db", v6);
        TcpCountingServer::start(topology.ns("db"), db, DB_PORT, "db")
    });
    let file = ConfigFile::new(&config("[192.0.2.2/32, \"2001:db8:1::/64\"]"));
    let _agent = start_agent_with(&topology, &file, &["--attach", "tc"]);
    only_the_listed_source_is_dropped(&topology, &servers);
    let drops = cidr_drops(&topology.node, 2.0);
    assert!(drops >= 2.0, "TC CIDR drops counted: {drops}");
}
