//! Policy as an operator runs it: the real `lb-agent run` process in the node namespace of the
//! three-workload topology (`lb_tests::policy_topology`), with the policy in its YAML config. The
//! agent attaches the TC policy programs to the workloads' interfaces itself; what the servers
//! receive is counted by the servers, denials must show in `/metrics` and the agent's log, and an
//! edit of the file that allows a denied pair must let it connect.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use lb_agent::grpc::pb;
use lb_tests::{
    agent::{metric_sum, scrape_metrics, AgentProcess, ConfigFile},
    grpc_client::connect_unix,
    netns::Netns,
    policy_topology::PolicyTopology,
    servers::{tcp_request, TcpCountingServer},
};

const METRICS: &str = "127.0.0.1:9471";
/// The interface the balancer's XDP program attaches to (the agent requires one): an unused veth
/// (no dummy devices on the test kernel).
const EXTERNAL: &str = "ext0";
const DB_PORT: u16 = 6379;
const OTHER_PORT: u16 = 7000;

/// The agent's config: db accepts TCP 6379 from `db_peers` only; other (in audit mode) would accept
/// only db.
fn config(db_peers: &[&str]) -> String {
    let peers: Vec<String> = db_peers
        .iter()
        .map(|app| format!("{{selector: {{match_labels: {{app: {app}}}}}}}"))
        .collect();
    let policy = PolicyTopology::workloads_yaml(&["other"])
        + &format!(
            "rules:\n\
             \x20 - {{name: db-from-clients, endpoints: {{match_labels: {{app: db}}}}, direction: ingress,\n\
             \x20    action: allow, peers: [{}], ports: [{{port: {DB_PORT}}}]}}\n\
             \x20 - {{name: other-from-db, endpoints: {{match_labels: {{app: other}}}}, direction: ingress,\n\
             \x20    action: allow, peers: [{{selector: {{match_labels: {{app: db}}}}}}]}}\n",
            peers.join(", ")
        );
    let indented: Vec<String> = policy.lines().map(|l| format!("  {l}")).collect();
    format!("services: []\npolicy:\n{}\n", indented.join("\n"))
}

fn metrics_addr() -> SocketAddr {
    METRICS.parse().unwrap()
}

/// `lb_policy_verdicts_total{verdict, reason}` as scraped now.
fn verdicts(node: &Netns, verdict: &str, reason: &str) -> f64 {
    let scrape = scrape_metrics(node, metrics_addr()).expect("scrape /metrics");
    metric_sum(
        &scrape,
        "lb_policy_verdicts_total",
        &[("verdict", verdict), ("reason", reason)],
    )
}

/// Polls the verdict counter until it reaches `at_least` (the agent drains every 200 ms).
fn wait_for_verdicts(node: &Netns, verdict: &str, reason: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = verdicts(node, verdict, reason);
        if n >= at_least || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One TCP connect attempt from `ns` that gives up after `timeout` (a dropped SYN is not retried).
fn connects(ns: &Netns, target: SocketAddr, timeout: Duration) -> bool {
    ns.run(move || TcpStream::connect_timeout(&target, timeout).is_ok())
}

#[test]
fn the_agent_enforces_the_policy_of_its_config_file_and_applies_edits() {
    let topology = PolicyTopology::new().expect("topology");
    topology
        .node
        .ip_cmd(&format!(
            "link add {EXTERNAL} type veth peer name {EXTERNAL}p"
        ))
        .unwrap();
    topology
        .node
        .ip_cmd(&format!("link set {EXTERNAL} up"))
        .unwrap();
    let db: IpAddr = PolicyTopology::addr("db", false);
    let db6: IpAddr = PolicyTopology::addr("db", true);
    let other: IpAddr = PolicyTopology::addr("other", false);
    let server = TcpCountingServer::start(topology.ns("db"), db, DB_PORT, "db");
    let server6 = TcpCountingServer::start(topology.ns("db"), db6, DB_PORT, "db6");
    let audited = TcpCountingServer::start(topology.ns("other"), other, OTHER_PORT, "other");

    let file = ConfigFile::new(&config(&["frontend"]));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let mut agent = AgentProcess::start_with(
        &topology.node,
        file.path(),
        &[EXTERNAL.to_string()],
        &[
            "--metrics-addr",
            METRICS,
            "--stats-interval",
            "1",
            "--grpc-socket",
            socket.to_str().unwrap(),
        ],
    )
    .expect("agent starts");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut events = rt
        .block_on(async {
            connect_unix(&socket)
                .await?
                .stream_events(pb::StreamEventsRequest {})
                .await
                .map_err(anyhow::Error::from)
        })
        .expect("StreamEvents")
        .into_inner();
    // Logged before "ready".
    assert!(
        agent
            .history
            .iter()
            .any(|l| l.contains("policy reconciled")),
        "the agent attached the policy programs before it was ready"
    );

    // Allowed: frontend → db, IPv4 and IPv6.
    let db_target = SocketAddr::new(db, DB_PORT);
    assert_eq!(
        tcp_request(topology.ns("frontend"), db_target, b"hello").expect("frontend -> db"),
        "db"
    );
    assert_eq!(
        tcp_request(
            topology.ns("frontend"),
            SocketAddr::new(db6, DB_PORT),
            b"hello"
        )
        .expect("frontend -> db (IPv6)"),
        "db6"
    );
    assert_eq!(server6.connections(), 1);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        verdicts(&topology.node, "deny", "default_deny"),
        0.0,
        "allowed connections are not denied"
    );

    // Denied: other → db never reaches db's server, is counted by reason and logged with the rule.
    let connections = server.connections();
    assert!(tcp_request(topology.ns("other"), db_target, b"hello").is_err());
    assert_eq!(server.connections(), connections, "a denied SYN reached db");
    let denied = wait_for_verdicts(&topology.node, "deny", "default_deny", 1.0);
    assert!(denied >= 1.0, "denial not in /metrics");
    let line = agent
        .wait_for_log("policy deny ingress", Duration::from_secs(3))
        .expect("denial logged");
    assert!(
        line.contains(&format!("{other}:")) && line.contains("rule db-from-clients"),
        "{line}"
    );
    // And on the gRPC event stream.
    let verdict = loop {
        let event = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(5), events.message()).await
            })
            .expect("a policy verdict event within 5 s")
            .expect("event stream")
            .expect("stream open");
        if event.kind() == pb::EventKind::PolicyVerdict {
            break event.text;
        }
    };
    assert!(
        verdict.starts_with("policy deny ingress") && verdict.contains("rule db-from-clients"),
        "{verdict}"
    );
    eprintln!("denial reported: {verdict}");

    // Audit: other would accept only db; frontend's connection passes and is reported.
    assert_eq!(
        tcp_request(
            topology.ns("frontend"),
            SocketAddr::new(other, OTHER_PORT),
            b"hello"
        )
        .expect("audited frontend -> other"),
        "other"
    );
    assert_eq!(audited.connections(), 1);
    assert!(wait_for_verdicts(&topology.node, "audit", "default_deny", 1.0) >= 1.0);
    agent
        .wait_for_log("policy audit ingress", Duration::from_secs(3))
        .expect("audit logged");

    // Edit the file to allow other → db: new connections pass within a measured time.
    let edited = Instant::now();
    file.rewrite(&config(&["frontend", "other"]));
    let deadline = edited + Duration::from_secs(10);
    while !connects(topology.ns("other"), db_target, Duration::from_millis(100)) {
        assert!(
            Instant::now() < deadline,
            "the edit was not enforced within 10 s"
        );
    }
    let allowed_after = edited.elapsed();
    assert_eq!(
        tcp_request(topology.ns("other"), db_target, b"hello").expect("other -> db allowed"),
        "db"
    );
    eprintln!(
        "other -> db allowed {:.0} ms after the file was saved (watch interval 500 ms)",
        allowed_after.as_secs_f64() * 1000.0
    );
    let denied_after = verdicts(&topology.node, "deny", "default_deny");
    agent
        .wait_for_log("policy reconciled", Duration::from_secs(5))
        .expect("edit logged");

    // An invalid edit is rejected and the rule set in force stays.
    file.rewrite(
        &config(&["frontend", "other"]).replace("direction: ingress", "direction: inwards"),
    );
    agent
        .wait_for_log("config rejected", Duration::from_secs(5))
        .expect("invalid edit rejected");
    assert_eq!(
        tcp_request(topology.ns("other"), db_target, b"hello").expect("still allowed"),
        "db"
    );

    // And back: removing the allowance stops new connections again.
    file.rewrite(&config(&["frontend"]));
    agent
        .wait_for_log("policy reconciled", Duration::from_secs(5))
        .expect("edit back applied");
    let connections = server.connections();
    assert!(tcp_request(topology.ns("other"), db_target, b"hello").is_err());
    assert_eq!(server.connections(), connections, "denied again");
    assert!(
        wait_for_verdicts(&topology.node, "deny", "default_deny", denied_after + 1.0)
            > denied_after
    );

    let (code, _) = agent.stop().expect("agent stops");
    assert_eq!(code, 0);
}
