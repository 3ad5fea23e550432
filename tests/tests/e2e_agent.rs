//! The agent as an operator runs it: a real `lb-agent` process in the balancer namespace with a
//! config file it watches, health checks and a metrics endpoint; traffic from the client namespace.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use lb_tests::{
    agent::{AgentProcess, ConfigFile},
    netns::{Netns, TEST_PREFIX},
    servers::{tcp_requests, tcp_servers_on_backends, TcpCountingServer},
    topology::{Topology, VIP},
};

const PORT: u16 = 8080;
const METRICS: &str = "127.0.0.1:9469";

fn config(topology: &Topology, backends: &[usize], health_check: bool) -> String {
    let mut yaml =
        format!("services:\n  - name: web\n    vip: {VIP}\n    port: 80\n    protocol: tcp\n");
    if health_check {
        yaml += "    health_check: { type: tcp, interval_ms: 100, timeout_ms: 100, rise: 1, fall: 2 }\n";
    }
    yaml += "    backends:\n";
    for &i in backends {
        yaml += &format!(
            "      - {{ address: {}, port: {PORT} }}\n",
            topology.backends[i - 1].addr
        );
    }
    yaml
}

fn tally(ns: &Netns, n: usize) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for r in tcp_requests(ns, SocketAddr::from((VIP, 80)), n, b"x") {
        *by.entry(r.expect("request through the VIP")).or_default() += 1;
    }
    by
}

/// Tallies of `n` requests, each by the backend that answered (a failed request as `failed: ..`),
/// until one is served by exactly the backends `wanted` or `within` has passed (the agent
/// reprograms after it logs a health change; until then a stopped backend still gets flows, and
/// a loaded machine takes longer); returns the last tally.
fn tally_until(ns: &Netns, n: usize, wanted: &[&str], within: Duration) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + within;
    loop {
        let mut by = BTreeMap::new();
        for r in tcp_requests(ns, SocketAddr::from((VIP, 80)), n, b"x") {
            let key = r.unwrap_or_else(|err| format!("failed: {err}"));
            *by.entry(key).or_default() += 1;
        }
        if by.keys().map(String::as_str).eq(wanted.iter().copied()) || Instant::now() > deadline {
            return by;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// GET `path` from the agent's HTTP endpoint inside the balancer namespace.
fn http_get(balancer: &Netns, path: &'static str) -> (u16, String) {
    balancer.run(move || {
        let mut stream = TcpStream::connect(METRICS).expect("metrics endpoint");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    })
}

#[test]
fn editing_the_config_file_moves_new_flows_and_metrics_count_real_traffic() {
    let topology = Topology::new(TEST_PREFIX, 3).expect("topology");
    let _servers: Vec<_> = tcp_servers_on_backends(&topology, PORT);
    let file = ConfigFile::new(&config(&topology, &[1, 2], false));
    let mut agent = AgentProcess::start_with(
        &topology.balancer,
        file.path(),
        &topology.balancer_interfaces(),
        // An hour between polls: only the watch on the file's directory can notice the edit.
        &[
            "--metrics-addr",
            METRICS,
            "--stats-interval",
            "1",
            "--config-poll-ms",
            "3600000",
            "--conntrack-entries-v6",
            "1024",
            "--max-services",
            "64",
            "--max-backends",
            "256",
        ],
    )
    .expect("agent starts");

    assert_eq!(http_get(&topology.balancer, "/healthz").0, 200);
    assert_eq!(http_get(&topology.balancer, "/readyz").0, 200);
    let before = tally(&topology.client, 30);
    assert_eq!(
        before.keys().cloned().collect::<Vec<_>>(),
        ["backend-1", "backend-2"]
    );

    // Edit the file (no signal, no poll): new flows move to backend 3 only.
    let edited = Instant::now();
    file.rewrite(&config(&topology, &[3], false));
    let deadline = edited + Duration::from_secs(10);
    // Backends 1 and 2 are removed (not drained): a connection they accepted just before the
    // switch is re-balanced to backend 3 and reset (counted as conntrack_backend_gone) when the
    // client sends; a client still waiting for the greeting waits until its read timeout (the
    // removed backend's packets are no longer translated; see "Draining" in the README). Such
    // failures are allowed during the switch only; every request after it must succeed.
    let mut failed_during_switch = 0;
    loop {
        match tcp_requests(&topology.client, SocketAddr::from((VIP, 80)), 1, b"x")
            .pop()
            .unwrap()
        {
            Ok(name) if name == "backend-3" => break,
            Ok(_) => {}
            // A reset that arrives before the request is written surfaces as "not connected", a
            // read timeout as "would block".
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::NotConnected
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                ) =>
            {
                failed_during_switch += 1
            }
            Err(e) => {
                while let Ok(line) = agent.log.try_recv() {
                    eprintln!("agent: {line}");
                }
                panic!(
                    "a request during the switch failed {:?} after the save: {e}",
                    edited.elapsed()
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "the edit was not applied within 10 s"
        );
        assert!(
            failed_during_switch <= 2,
            "more failures than connections in flight at the switch"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let moved_after = edited.elapsed();
    agent
        .wait_for_log("config reloaded", Duration::from_secs(5))
        .expect("reload logged");
    let after = tally(&topology.client, 30);
    assert_eq!(after.keys().cloned().collect::<Vec<_>>(), ["backend-3"]);
    eprintln!(
        "new flows moved {:.0} ms after the file was saved",
        moved_after.as_secs_f64() * 1000.0
    );

    // /metrics parses with a Prometheus text-format parser and counts the traffic above.
    std::thread::sleep(Duration::from_millis(1500)); // one stats interval
    let (status, body) = http_get(&topology.balancer, "/metrics");
    assert_eq!(status, 200);
    let scrape =
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parses");
    let value = |name: &str, label: Option<(&str, &str)>| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    let new_flows = value(
        "lb_datapath_packets_total",
        Some(("reason", "forward_new_flow")),
    );
    assert!(
        new_flows >= 61.0,
        "61+ connections were opened, metrics say {new_flows}\n{body}"
    );
    assert!(
        value("lb_service_new_flows_total", Some(("service", "web"))) >= 30.0,
        "{body}"
    );
    assert!(
        value("lb_reconcile_duration_seconds_count", None) >= 2.0,
        "{body}"
    );
    // Each family's conntrack table shows its fill (counted every 10 s: the values may predate
    // the traffic).
    for map in ["CONNTRACK_V4", "CONNTRACK_V6"] {
        assert!(
            scrape
                .samples
                .iter()
                .any(|s| s.metric == "lb_map_fill_ratio" && s.labels.get("map") == Some(map)),
            "no fill of {map}\n{body}"
        );
    }
    // The capacity the agent was started with: one service of 64.
    let services_fill = scrape
        .samples
        .iter()
        .find(|s| s.metric == "lb_map_fill_ratio" && s.labels.get("map") == Some("SERVICES"))
        .map(|s| s.value.clone());
    assert_eq!(
        services_fill,
        Some(prometheus_parse::Value::Gauge(1.0 / 64.0)),
        "{body}"
    );
}

#[test]
fn a_backend_whose_server_stops_is_taken_out_by_health_checks() {
    let topology = Topology::new(TEST_PREFIX, 3).expect("topology");
    let mut servers: Vec<Option<TcpCountingServer>> = topology
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            Some(TcpCountingServer::start(
                &b.ns,
                b.addr,
                PORT,
                &format!("backend-{}", i + 1),
            ))
        })
        .collect();
    let file = ConfigFile::new(&config(&topology, &[1, 2, 3], true));
    let mut agent = AgentProcess::start(
        &topology.balancer,
        file.path(),
        &topology.balancer_interfaces(),
    )
    .expect("agent starts");
    assert_eq!(tally(&topology.client, 45).len(), 3);

    // Stop backend 2's server: after `fall` failed probes it gets no new flows.
    let stopped = Instant::now();
    servers[1] = None;
    agent
        .wait_for_log("healthy -> unhealthy", Duration::from_secs(10))
        .expect("health check fails");
    let without = tally_until(
        &topology.client,
        45,
        &["backend-1", "backend-3"],
        Duration::from_secs(5),
    );
    assert_eq!(
        without.keys().cloned().collect::<Vec<_>>(),
        ["backend-1", "backend-3"],
        "{without:?}"
    );
    eprintln!(
        "backend taken out {:.0} ms after its server stopped",
        stopped.elapsed().as_secs_f64() * 1000.0
    );

    // Start it again: after `rise` successful probes it takes new flows again.
    let b = &topology.backends[1];
    servers[1] = Some(TcpCountingServer::start(&b.ns, b.addr, PORT, "backend-2"));
    agent
        .wait_for_log("unhealthy -> healthy", Duration::from_secs(10))
        .expect("health check recovers");
    let all = ["backend-1", "backend-2", "backend-3"];
    let with = tally_until(&topology.client, 45, &all, Duration::from_secs(5));
    assert_eq!(with.len(), 3, "{with:?}");
}

/// The datapath's own log records (aya-log, through its `AYA_LOGS` ring buffer) reach the agent's
/// log: a service without backends drops the client's SYNs, and each drop is reported with its
/// service.
#[test]
fn datapath_log_records_reach_the_agent_log() {
    let topology = Topology::new(TEST_PREFIX, 1).expect("topology");
    let file = ConfigFile::new(&format!(
        "services:\n  - name: web\n    vip: {VIP}\n    port: 80\n    protocol: tcp\n    backends: []\n"
    ));
    let mut agent = AgentProcess::start(
        &topology.balancer,
        file.path(),
        &topology.balancer_interfaces(),
    )
    .expect("agent starts");
    let vip = SocketAddr::new(VIP.into(), 80);
    let connected = topology
        .client
        .run(move || TcpStream::connect_timeout(&vip, Duration::from_millis(300)).is_ok());
    assert!(
        !connected,
        "a service without backends accepted a connection"
    );
    let line = agent
        .wait_for_log("dropped a packet to service", Duration::from_secs(5))
        .expect("the datapath's drop reaches the agent's log");
    // The reason is named by its counter's number (the log line serves both reasons it covers).
    let reason = format!(
        "counter {} ",
        lb_common::counters::Counter::DropNoBackend as u32
    );
    assert!(line.contains(&reason), "{line}");
}

/// `lbctl` (found next to the `lb-agent` binary) reads the pinned maps of a running agent: the service, each
/// connection made through the VIP with the backend that served it, and the counters.
#[test]
fn lbctl_shows_the_services_flows_and_counters() {
    let topology = Topology::new(TEST_PREFIX, 2).expect("topology");
    let _servers: Vec<_> = tcp_servers_on_backends(&topology, PORT);
    let file = ConfigFile::new(&config(&topology, &[1, 2], false));
    let agent = AgentProcess::start(
        &topology.balancer,
        file.path(),
        &topology.balancer_interfaces(),
    )
    .expect("agent starts");
    let served = tally(&topology.client, 10);

    let pins = agent.pins();
    let lbctl = |args: &[&str]| -> String {
        let lbctl = lb_tests::agent::lbctl_binary();
        let out = std::process::Command::new(&lbctl)
            .arg("--bpffs-dir")
            .arg(pins.path())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", lbctl.display()));
        assert!(out.status.success(), "lbctl {args:?}: {out:?}");
        String::from_utf8(out.stdout).expect("utf-8")
    };

    let services = lbctl(&["services"]);
    assert!(
        services.contains(&format!("{VIP}:80"))
            && services.contains("tcp")
            && services.contains("dnat"),
        "{services}"
    );
    // Every connection is tracked (closing after its FIN), through the VIP, via the backend whose
    // server counted it.
    let flows = lbctl(&["flows"]);
    let lines: Vec<&str> = flows.lines().collect();
    assert_eq!(lines.len(), 10, "{flows}");
    let mut via = BTreeMap::<String, usize>::new();
    for line in &lines {
        assert!(line.contains(&format!("-> {VIP}:80")), "{line}");
        let backend = topology
            .backends
            .iter()
            .position(|b| line.contains(&format!("via {}:{PORT}", b.addr)))
            .unwrap_or_else(|| panic!("no backend named: {line}"));
        *via.entry(format!("backend-{}", backend + 1)).or_default() += 1;
    }
    assert_eq!(via, served, "the backends named are those that served");
    let counters = lbctl(&["counters"]);
    assert!(
        counters
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["forward_new_flow", "10"]),
        "{counters}"
    );
}
