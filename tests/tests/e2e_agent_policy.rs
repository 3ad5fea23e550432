//! Policy as an operator runs it: the real `lb-agent run` process in the node namespace of the
//! three-workload topology (`lb_tests::policy_topology`), with the policy in its YAML config. The
//! agent attaches the TC policy programs to the workloads' interfaces itself; what the servers
//! receive is counted by the servers, denials must show in `/metrics` and the agent's log, and an
//! edit of the file that allows a denied pair must let it connect. Enforcement is pinned: it goes on
//! while no agent runs (also after `kill -9`) and the next agent adopts it without a gap.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType},
};
use lb_agent::{grpc::pb, pins::PinDir};
use lb_common::{
    conntrack::FlowKey,
    policy::{
        counter_index, EndpointInfo, IpKeyV4, PolicyConntrackEntry, PolicyState, Reason, Verdict,
    },
    protocol,
};
use lb_tests::{
    agent::{metric_sum, scrape_metrics, AgentProcess, ConfigFile, TestPins},
    grpc_client::connect_unix,
    netns::Netns,
    policy_topology::{PolicyTopology, EXTERNAL, WORKLOADS},
    servers::{
        greeted_and_refused, parallel_tcp_requests, tcp_connect, tcp_request, TcpCountingServer,
    },
    test_run::flow_key,
};

const METRICS: &str = "127.0.0.1:9471";
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

/// The topology with the unused interface the agent attaches its XDP program to.
fn topology() -> PolicyTopology {
    PolicyTopology::with_external_interface().expect("topology")
}

#[test]
fn the_agent_enforces_the_policy_of_its_config_file_and_applies_edits() {
    let topology = topology();
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

/// An open map of the pinned policy datapath of `pins`.
fn policy_map(pins: &TestPins, name: &str) -> Map {
    let path = PinDir::new(pins.path()).policy().map(name);
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Map::from_map_data(data).unwrap()
}

/// The live epoch of the pinned policy maps.
fn live_epoch(pins: &TestPins) -> u32 {
    let state: Array<MapData, PolicyState> =
        Array::try_from(policy_map(pins, "POLICY_STATE")).unwrap();
    state.get(&0, 0).unwrap().epoch
}

/// Identity of every local IPv4 endpoint under the live epoch, from the pinned `ENDPOINTS_V4`.
fn endpoint_identities(pins: &TestPins) -> BTreeMap<IpAddr, u32> {
    let epoch = live_epoch(pins) as u8;
    let endpoints: HashMap<MapData, IpKeyV4, EndpointInfo> =
        HashMap::try_from(policy_map(pins, "ENDPOINTS_V4")).unwrap();
    endpoints
        .iter()
        .map(|entry| entry.unwrap())
        .filter(|(k, _)| k.epoch == epoch)
        .map(|(k, v)| (IpAddr::from(k.addr.to_ne_bytes()), v.identity))
        .collect()
}

/// Packets the pinned `POLICY_COUNTERS` counted for (verdict, reason), all CPUs.
fn pinned_verdicts(pins: &TestPins, verdict: Verdict, reason: Reason) -> u64 {
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(policy_map(pins, "POLICY_COUNTERS")).unwrap();
    counters
        .get(&counter_index(verdict, reason), 0)
        .unwrap()
        .iter()
        .sum()
}

/// The pinned `POLICY_CONNTRACK` entry of a connection, if any.
fn policy_conntrack(pins: &TestPins, flow: &FlowKey) -> Option<PolicyConntrackEntry> {
    let conntrack: HashMap<MapData, FlowKey, PolicyConntrackEntry> =
        HashMap::try_from(policy_map(pins, "POLICY_CONNTRACK")).unwrap();
    conntrack.get(flow, 0).ok()
}

/// Ids of the tcx programs on `iface` in `direction`, as the kernel reports them.
fn tcx_programs(node: &Netns, iface: &'static str, direction: TcAttachType) -> Vec<u32> {
    node.run(move || {
        let (_, programs) = SchedClassifier::query_tcx(iface, direction).expect("query tcx");
        programs.iter().map(|p| p.id()).collect()
    })
}

#[test]
fn enforcement_survives_kill_9_and_the_next_agent_adopts_it() {
    const CHUNK: usize = 16 * 1024;
    const DOWN: Duration = Duration::from_millis(1500);
    let topology = topology();
    let db: IpAddr = PolicyTopology::addr("db", false);
    let db_target = SocketAddr::new(db, DB_PORT);
    let server = TcpCountingServer::start(topology.ns("db"), db, DB_PORT, "db");
    let file = ConfigFile::new(&config(&["frontend"]));
    let extra = ["--metrics-addr", METRICS, "--stats-interval", "1"];
    let first =
        AgentProcess::start_with(&topology.node, file.path(), &[EXTERNAL.to_string()], &extra)
            .expect("first agent starts");
    let pins = first.pins();
    let identities = endpoint_identities(&pins);
    assert_eq!(identities.len(), 3, "{identities:?}");
    let epoch = live_epoch(&pins);
    let programs = tcx_programs(&topology.node, "wl-db", TcAttachType::Egress);
    assert_eq!(programs.len(), 1, "one policy program on wl-db egress");

    // The long-lived allowed connection: frontend -> db, streaming through the restart.
    let (mut stream, greeting) =
        tcp_connect(topology.ns("frontend"), db_target).expect("frontend -> db");
    assert_eq!(greeting, "db");
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let flow = flow_key(protocol::TCP, stream.local_addr().unwrap(), db_target);

    let stop = AtomicBool::new(false);
    let agent_down = AtomicBool::new(false);
    let (denied_tries, denied_tries_down, denied_passed) =
        (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let (allowed_new, allowed_new_down, allowed_failed) =
        (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let (sent, second, denials_while_down) = thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let chunk = vec![0xa5_u8; CHUNK];
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                stream.write_all(&chunk).expect("stream write");
                sent += CHUNK as u64;
                thread::sleep(Duration::from_millis(5));
            }
            stream.shutdown(std::net::Shutdown::Write).unwrap();
            sent
        });
        // The denied pair keeps trying, and new allowed connections keep being made.
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let down = agent_down.load(Ordering::Relaxed);
                if connects(topology.ns("other"), db_target, Duration::from_millis(200)) {
                    denied_passed.fetch_add(1, Ordering::Relaxed);
                }
                denied_tries.fetch_add(1, Ordering::Relaxed);
                match tcp_request(topology.ns("frontend"), db_target, b"") {
                    Ok(_) => allowed_new.fetch_add(1, Ordering::Relaxed),
                    Err(_) => allowed_failed.fetch_add(1, Ordering::Relaxed),
                };
                if down && agent_down.load(Ordering::Relaxed) {
                    denied_tries_down.fetch_add(1, Ordering::Relaxed);
                    allowed_new_down.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop_on_panic = StopOnDrop(&stop);
        thread::sleep(Duration::from_secs(1));
        let tracked = policy_conntrack(&pins, &flow).expect("the stream is tracked");

        first.kill9().expect("SIGKILL");
        let denied_at_kill = pinned_verdicts(&pins, Verdict::Deny, Reason::DefaultDeny);
        agent_down.store(true, Ordering::Relaxed);
        thread::sleep(DOWN);
        agent_down.store(false, Ordering::Relaxed);
        let denials_while_down =
            pinned_verdicts(&pins, Verdict::Deny, Reason::DefaultDeny) - denied_at_kill;
        assert_eq!(
            tcx_programs(&topology.node, "wl-db", TcAttachType::Egress),
            programs,
            "the first agent's program stays attached while no agent runs"
        );

        let second = AgentProcess::start_pinned(
            &topology.node,
            file.path(),
            &[EXTERNAL.to_string()],
            &extra,
            pins.clone(),
        )
        .expect("second agent starts");
        let after = policy_conntrack(&pins, &flow).expect("the stream's entry survived");
        assert_eq!(after.flags, tracked.flags);
        assert!(after.last_seen_ns >= tracked.last_seen_ns);
        thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        (writer.join().expect("writer"), second, denials_while_down)
    });

    // Every byte of the stream reached db (the other connections send none).
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.bytes() < sent && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.bytes(), sent, "bytes of the long-lived connection");
    let (tries, tries_down) = (denied_tries.into_inner(), denied_tries_down.into_inner());
    assert_eq!(
        denied_passed.into_inner(),
        0,
        "a denied connection got through"
    );
    assert!(
        tries_down >= 3,
        "only {tries_down} denied attempts while no agent ran"
    );
    assert!(
        denials_while_down >= tries_down,
        "{denials_while_down} denials counted by the kernel for {tries_down} attempts while down"
    );
    let (new, new_down) = (allowed_new.into_inner(), allowed_new_down.into_inner());
    assert_eq!(allowed_failed.into_inner(), 0, "allowed connections failed");
    assert!(
        new_down >= 3,
        "{new_down} new allowed connections while no agent ran"
    );

    // Adopted, not rewritten: same epoch, same identities, programs replaced in the pinned links.
    let mut second = second;
    assert!(
        second
            .history
            .iter()
            .any(|l| l.contains("adopted the pinned policy rule set")),
        "{:#?}",
        second.history
    );
    let replaced = second
        .history
        .iter()
        .filter(|l| l.contains("adopted the pinned tcx link"))
        .count();
    // The policy's 3 interfaces x 2 directions, and `lb_tc_egress` on the client-facing one.
    assert_eq!(
        replaced, 7,
        "3 interfaces x 2 directions, and lb_tc_egress: {:#?}",
        second.history
    );
    assert!(
        second
            .history
            .iter()
            .filter(|l| l.contains("policy reconciled"))
            .all(|l| l.contains("applied=false")),
        "the first reconcile writes no rule set: {:#?}",
        second.history
    );
    assert_eq!(live_epoch(&pins), epoch, "no epoch swap");
    assert_eq!(endpoint_identities(&pins), identities, "identities kept");
    let programs_after = tcx_programs(&topology.node, "wl-db", TcAttachType::Egress);
    assert!(
        programs_after.len() == 1 && programs_after != programs,
        "the new program replaced the old one: {programs:?} -> {programs_after:?}"
    );

    // Still enforcing: allowed connects, denied does not, and /metrics counts the kernel's total,
    // denials while no agent ran included.
    assert_eq!(
        tcp_request(topology.ns("frontend"), db_target, b"").expect("frontend -> db after restart"),
        "db"
    );
    assert!(!connects(
        topology.ns("other"),
        db_target,
        Duration::from_millis(300)
    ));
    let kernel = pinned_verdicts(&pins, Verdict::Deny, Reason::DefaultDeny) as f64;
    assert!(
        wait_for_verdicts(&topology.node, "deny", "default_deny", kernel) >= kernel,
        "/metrics lags the pinned counters"
    );
    second
        .wait_for_log("policy deny ingress", Duration::from_secs(3))
        .expect("denials still reported");
    eprintln!(
        "stream {sent} bytes delivered through kill -9 and {} ms down; {tries} denied attempts \
         ({tries_down} while down, {denials_while_down} kernel denials then), none passed; {new} new \
         allowed connections ({new_down} while down), none failed; identities {identities:?}",
        DOWN.as_millis()
    );
    assert_eq!(second.stop().expect("stops").0, 0);
}

#[test]
fn a_policy_layout_mismatch_is_refused_and_enforcement_stays() {
    let topology = topology();
    let db: IpAddr = PolicyTopology::addr("db", false);
    let db_target = SocketAddr::new(db, DB_PORT);
    let _server = TcpCountingServer::start(topology.ns("db"), db, DB_PORT, "db");
    let file = ConfigFile::new(&config(&["frontend"]));
    let interfaces = [EXTERNAL.to_string()];
    let enforced = || {
        tcp_request(topology.ns("frontend"), db_target, b"").is_ok()
            && !connects(topology.ns("other"), db_target, Duration::from_millis(300))
    };
    let first =
        AgentProcess::start(&topology.node, file.path(), &interfaces).expect("agent starts");
    let pins = first.pins();
    let (code, log) = first.stop().expect("SIGTERM");
    assert_eq!(code, 0, "{log:#?}");
    assert!(enforced(), "enforced while no agent runs (after SIGTERM)");

    // Pinned by a (pretend) other layout version.
    let layout = PinDir::new(pins.path()).policy().root().join("LAYOUT");
    std::fs::remove_file(&layout).unwrap();
    let mut version: Array<MapData, u32> = Array::create(1, 0).unwrap();
    version.set(0, 999, 0).unwrap();
    version.pin(&layout).unwrap();

    let refused =
        AgentProcess::start_pinned(&topology.node, file.path(), &interfaces, &[], pins.clone())
            .expect("the agent starts (the balancer is fine)");
    // Logged before "ready".
    let line = refused
        .history
        .iter()
        .find(|l| l.contains("policy reconcile failed"))
        .unwrap_or_else(|| panic!("refusal logged: {:#?}", refused.history))
        .clone();
    assert!(
        line.contains("pinned policy datapath state")
            && line.contains("layout version 999")
            && line.contains("--replace-incompatible-state"),
        "{line}"
    );
    assert!(enforced(), "the pinned enforcement stays in force");
    assert_eq!(refused.stop().expect("stops").0, 0);

    let replaced = AgentProcess::start_pinned(
        &topology.node,
        file.path(),
        &interfaces,
        &["--replace-incompatible-state"],
        pins.clone(),
    )
    .expect("replacing agent starts");
    assert!(
        replaced
            .history
            .iter()
            .any(|l| l.contains("REPLACING incompatible pinned policy datapath state")),
        "{:#?}",
        replaced.history
    );
    assert!(enforced(), "enforced by the replacement");
    assert_eq!(replaced.stop().expect("stops").0, 0);

    // `lb-agent detach` removes the policy pins too, which detaches the programs.
    let output = std::process::Command::new(lb_tests::agent::agent_binary())
        .args(["detach", "--bpffs-dir"])
        .arg(pins.path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(!pins.path().exists());
    // The kernel releases an unpinned link in a deferred work item.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !tcx_programs(&topology.node, "wl-db", TcAttachType::Egress).is_empty() {
        assert!(
            Instant::now() < deadline,
            "policy programs still attached after detach"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        connects(topology.ns("other"), db_target, Duration::from_secs(1)),
        "nothing enforces after detach"
    );
}

/// With Kubernetes as a source, a restarted agent keeps the pinned rule set until the API server has
/// been listed: a pod the policy allows keeps its allowance while the API server is unreachable,
/// and once it is back the unchanged rule set is not written again.
#[test]
fn a_restart_keeps_the_pinned_rule_set_until_kubernetes_is_listed() {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use lb_tests::fake_apiserver::FakeApiServer;

    let topology = topology();
    let db: IpAddr = PolicyTopology::addr("db", false);
    let db_target = SocketAddr::new(db, DB_PORT);
    let _server = TcpCountingServer::start(topology.ns("db"), db, DB_PORT, "db");
    // Bound in the node namespace: the agent reaches it on its own loopback.
    let api = topology
        .node
        .run(FakeApiServer::start)
        .expect("fake API server");
    api.apply::<Namespace>(
        &serde_json::from_value(serde_json::json!({ "metadata": { "name": "default" } })).unwrap(),
    );
    // The frontend workload, known only as a Kubernetes pod.
    api.apply::<Pod>(
        &serde_json::from_value(serde_json::json!({
            "metadata": { "namespace": "default", "name": "client-0", "labels": { "app": "client" } },
            "status": { "phase": "Running",
                        "podIPs": [{ "ip": PolicyTopology::addr("frontend", false).to_string() }] },
        }))
        .unwrap(),
    );
    let file = ConfigFile::new(&format!(
        "services: []\npolicy:\n  namespaces: [{{name: default}}]\n  workloads:\n    \
         - {{name: db, namespace: default, labels: {{app: db}}, addresses: [{db}], interface: wl-db}}\n  \
         rules:\n    - {{name: db-from-client, endpoints: {{match_labels: {{app: db}}}}, direction: ingress,\n       \
         action: allow, peers: [{{selector: {{match_labels: {{app: client}}}}}}], ports: [{{port: {DB_PORT}}}]}}\n"
    ));
    let interfaces = [EXTERNAL.to_string()];
    let extra = ["--kube-api-url", &api.url()];
    let allowed = || tcp_request(topology.ns("frontend"), db_target, b"").is_ok();
    let denied = || !connects(topology.ns("other"), db_target, Duration::from_millis(300));

    let first = AgentProcess::start_with(&topology.node, file.path(), &interfaces, &extra)
        .expect("first agent starts");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !connects(
        topology.ns("frontend"),
        db_target,
        Duration::from_millis(200),
    ) {
        assert!(
            Instant::now() < deadline,
            "the pod was not allowed within 15 s"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(denied(), "other is not a pod the rule allows");
    let pins = first.pins();
    let epoch = live_epoch(&pins);
    first.kill9().expect("SIGKILL");

    let mut api = api;
    api.stop();
    let mut second = AgentProcess::start_pinned(
        &topology.node,
        file.path(),
        &interfaces,
        &extra,
        pins.clone(),
    )
    .expect("second agent starts without the API server");
    assert!(
        second
            .history
            .iter()
            .any(|l| l.contains("stays in force until Kubernetes is listed")),
        "{:#?}",
        second.history
    );
    // A while without the API server: the pod keeps its allowance (a partial policy would deny it).
    for _ in 0..5 {
        assert!(
            allowed(),
            "the pod lost its allowance while Kubernetes was unreachable"
        );
        assert!(denied());
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(live_epoch(&pins), epoch);

    let api = topology
        .node
        .run(move || api.restart().map(|()| api))
        .expect("API server back");
    let line = second
        .wait_for_log("policy reconciled", Duration::from_secs(30))
        .expect("the policy is reconciled once Kubernetes is listed");
    assert!(
        line.contains("applied=false"),
        "unchanged rule set rewritten: {line}"
    );
    assert_eq!(live_epoch(&pins), epoch, "no epoch swap");
    assert!(allowed() && denied());
    assert_eq!(second.stop().expect("stops").0, 0);
    drop(api);
}

/// A VIP over db:6379 and other:7000; frontend's egress allows db and the service range but denies
/// other (deny wins); db accepts frontend on 6379.
fn workload_config(vip: IpAddr) -> String {
    let policy = PolicyTopology::workloads_yaml(&["other"])
        + "rules:\n\
           \x20 - {name: db-from-frontend, endpoints: {match_labels: {app: db}}, direction: ingress,\n\
           \x20    action: allow, peers: [{selector: {match_labels: {app: frontend}}}], ports: [{port: 6379}]}\n\
           \x20 - {name: frontend-to-db-and-services, endpoints: {match_labels: {app: frontend}},\n\
           \x20    direction: egress, action: allow,\n\
           \x20    peers: [{selector: {match_labels: {app: db}}}, {cidr: 198.51.100.0/24}]}\n\
           \x20 - {name: frontend-not-to-other, endpoints: {match_labels: {app: frontend}},\n\
           \x20    direction: egress, action: deny, peers: [{selector: {match_labels: {app: other}}}]}\n";
    let indented: Vec<String> = policy.lines().map(|l| format!("  {l}")).collect();
    format!(
        "services:\n  - name: mixed\n    vip: {vip}\n    port: 80\n    protocol: tcp\n    backends:\n      \
         - {{ address: {}, port: {DB_PORT} }}\n      - {{ address: {}, port: {OTHER_PORT} }}\n\
         policy:\n{}\n",
        PolicyTopology::addr("db", false),
        PolicyTopology::addr("other", false),
        indented.join("\n")
    )
}

/// Names of the tcx programs on `iface` (ingress, egress), in chain order (as the kernel reports
/// them: at most 15 characters).
fn tcx_chain(node: &Netns, iface: &'static str) -> (Vec<String>, Vec<String>) {
    node.run(move || {
        let names = |direction| {
            let (_, programs) = SchedClassifier::query_tcx(iface, direction).expect("query tcx");
            programs
                .iter()
                .map(|p| p.name_as_str().unwrap_or("").to_string())
                .collect()
        };
        (names(TcAttachType::Ingress), names(TcAttachType::Egress))
    })
}

/// `--workload-iface`: on each workload veth the agent puts `lb_tc_request` before
/// `policy_from_endpoint` and `lb_tc` after it at ingress, and `lb_tc_reply` after
/// `policy_to_endpoint` at egress, and pins the new links; a restart keeps the chains (programs
/// replaced in the pinned links), and an interface switched to plain `--attach tc` loses the
/// request and reply programs, with a warning.
/// Through the VIP, frontend (whose egress denies other) reaches db only.
#[test]
fn workload_interfaces_split_the_balancer_around_the_policy() {
    /// Half go to each backend: all to one is a 2^-11 chance.
    const ATTEMPTS: usize = 12;
    let topology = topology();
    let vip: IpAddr = "198.51.100.80".parse().unwrap();
    let (db, other) = (
        PolicyTopology::addr("db", false),
        PolicyTopology::addr("other", false),
    );
    let db_server = TcpCountingServer::start(topology.ns("db"), db, DB_PORT, "db");
    let other_server = TcpCountingServer::start(topology.ns("other"), other, OTHER_PORT, "other");
    let file = ConfigFile::new(&workload_config(vip));
    let args_for = |workloads: &[&'static str]| -> Vec<&'static str> {
        workloads
            .iter()
            .flat_map(|iface| ["--workload-iface", *iface])
            .collect()
    };
    let all: Vec<&'static str> = WORKLOADS.iter().map(|w| w.4).collect();
    // The kernel keeps 15 characters of a program's name.
    let split = |ingress: &[&str], egress: &[&str]| {
        let short = |names: &[&str]| -> Vec<String> {
            names
                .iter()
                .map(|n| n.get(..15).unwrap_or(n).to_string())
                .collect()
        };
        (short(ingress), short(egress))
    };
    let expected = split(
        &["lb_tc_request", "policy_from_endpoint", "lb_tc"],
        &["policy_to_endpoint", "lb_tc_reply"],
    );

    let agent = AgentProcess::start_with(
        &topology.node,
        file.path(),
        &[EXTERNAL.to_string()],
        &args_for(&all),
    )
    .expect("agent starts");
    let pins = agent.pins();
    for iface in &all {
        assert_eq!(tcx_chain(&topology.node, iface), expected, "{iface}");
        for program in ["lb_tc_request", "lb_tc_reply"] {
            let pin = pins.path().join("links").join(format!("{program}_{iface}"));
            assert!(pin.exists(), "{} pinned", pin.display());
        }
    }

    let results = parallel_tcp_requests(
        topology.ns("frontend"),
        SocketAddr::new(vip, 80),
        ATTEMPTS,
        b"hello",
    );
    let (greeted, _) = greeted_and_refused(&results, "db", "through the VIP");
    assert_eq!(db_server.bytes(), 5 * greeted as u64, "bytes db received");
    assert_eq!(
        other_server.connections(),
        0,
        "other reached through the VIP"
    );

    // A restart adopts the pinned links in place; wl-other, now a plain `--attach tc` interface,
    // loses the request and reply programs (with a warning: its egress rules see VIPs).
    let (code, _) = agent.stop().expect("agent stops");
    assert_eq!(code, 0);
    let kept: Vec<&'static str> = all.iter().copied().filter(|i| *i != "wl-other").collect();
    let mut args = args_for(&kept);
    args.extend(["--attach", "tc"]);
    let again = AgentProcess::start_pinned(
        &topology.node,
        file.path(),
        &[EXTERNAL.to_string(), "wl-other".to_string()],
        &args,
        pins.clone(),
    )
    .expect("second agent starts");
    assert!(
        again
            .history
            .iter()
            .any(|l| l.contains("policy endpoint attached with --attach tc")
                && l.contains("wl-other")),
        "warned about wl-other"
    );
    for iface in &kept {
        assert_eq!(
            tcx_chain(&topology.node, iface),
            expected,
            "{iface} after the restart"
        );
    }
    for program in ["lb_tc_request", "lb_tc_reply"] {
        let adopted = again
            .history
            .iter()
            .filter(|l| l.contains("adopted the pinned tcx link") && l.contains(program));
        assert_eq!(
            adopted.count(),
            kept.len(),
            "{program} replaced in its pinned links"
        );
    }
    // The kernel releases a link shortly after its last pin goes, not at once.
    // A plain client-facing interface now: `lb_tc_egress` at the end of its egress.
    let plain_tc = split(
        &["policy_from_endpoint", "lb_tc"],
        &["policy_to_endpoint", "lb_tc_egress"],
    );
    let started = Instant::now();
    while tcx_chain(&topology.node, "wl-other") != plain_tc {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "wl-other: the policy and lb_tc: {:?}",
            tcx_chain(&topology.node, "wl-other")
        );
        thread::sleep(Duration::from_millis(100));
    }
    for program in ["lb_tc_request", "lb_tc_reply"] {
        assert!(!pins
            .path()
            .join("links")
            .join(format!("{program}_wl-other"))
            .exists());
    }
    assert_eq!(
        tcp_request(
            topology.ns("frontend"),
            SocketAddr::new(db, DB_PORT),
            b"hello"
        )
        .expect("frontend -> db after the restart"),
        "db"
    );
    drop(again);
}
