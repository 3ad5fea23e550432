//! Flow events switched on and off while the agent runs: the real agent in the namespace topology,
//! a bulk TCP transfer through a DNAT VIP that spans two edits of the config's `flow_events` (or,
//! in the second test, `lbctl flow-events on|off` through the gRPC API and an edit), each
//! reloading `lb_xdp` into the pinned links (`lb_agent::datapath::reload`). The transfer delivers
//! every byte to the backend it started on, with no reset, and keeps its conntrack entry's backend;
//! the program on the interfaces changes at each reload; new connections are reported as flow
//! events (`lb_flow_events_total{kind="new_flow"}`) only while events are on.

use std::{
    io::Write,
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData};
use lb_agent::{grpc::pb, pins::PinDir};
use lb_common::{conntrack::ConntrackEntry, protocol};
use lb_tests::{
    agent::{lbctl, metric_sum, scrape_metrics, AgentProcess, ConfigFile, TestPins},
    grpc_client::connect_unix,
    netns::{Netns, TEST_PREFIX},
    servers::{tcp_connect, tcp_request, tcp_servers_on_backends, TcpCountingServer},
    test_run::{flow_key, Conntrack},
    topology::{Topology, BALANCER_CLIENT_IFACE, VIP},
};

const PORT: u16 = 8080;
const METRICS: &str = "127.0.0.1:9481";
const CHUNK: usize = 64 * 1024;

/// The `web` service over every backend, with `flow_events` when given.
fn config(topology: &Topology, flow_events: Option<bool>) -> String {
    let mut yaml = flow_events
        .map(|on| format!("flow_events: {on}\n"))
        .unwrap_or_default();
    yaml += &format!(
        "services:\n  - name: web\n    vip: {VIP}\n    port: 80\n    protocol: tcp\n    \
         backends:\n"
    );
    for b in &topology.backends {
        yaml += &format!("      - {{ address: {}, port: {PORT} }}\n", b.addr);
    }
    yaml
}

/// The pinned conntrack entry of `flow`.
fn tracked(pins: &TestPins, flow: &lb_common::conntrack::FlowKey) -> ConntrackEntry {
    let pinned = |name: &str| {
        let data = MapData::from_pin(PinDir::new(pins.path()).map(name))
            .unwrap_or_else(|err| panic!("{name} pin: {err}"));
        Map::from_map_data(data).unwrap()
    };
    Conntrack::read(&pinned("CONNTRACK_V4"), &pinned("CONNTRACK_V6")).all()[flow]
}

/// New-flow events the agent published so far.
fn new_flow_events(node: &Netns) -> f64 {
    let scrape = scrape_metrics(node, METRICS.parse().unwrap()).expect("scrape /metrics");
    metric_sum(&scrape, "lb_flow_events_total", &[("kind", "new_flow")])
}

/// Opens `n` connections to the VIP; every one must be answered.
fn connections(topology: &Topology, n: usize) {
    let vip = SocketAddr::from((VIP, 80));
    for i in 0..n {
        tcp_request(&topology.client, vip, b"")
            .unwrap_or_else(|e| panic!("connection {i} to the VIP: {e}"));
    }
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A bulk TCP transfer through the VIP, started before `switches` runs and stopped after it; then
/// checks that its flow kept its backend and that every byte reached that backend (a reset fails
/// the transfer's writes). Returns the bytes sent and the backend's name.
fn transfer_across(
    topology: &Topology,
    servers: &[TcpCountingServer],
    pins: &TestPins,
    switches: impl FnOnce(),
) -> (u64, String) {
    let vip = SocketAddr::from((VIP, 80));
    let (mut bulk, bulk_backend) = tcp_connect(&topology.client, vip).expect("bulk connects");
    bulk.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let bulk_flow = flow_key(protocol::TCP, bulk.local_addr().unwrap(), vip);
    let bulk_entry = tracked(pins, &bulk_flow);

    let stop = AtomicBool::new(false);
    let sent = thread::scope(|scope| {
        let transfer = scope.spawn(|| {
            let chunk = vec![0x5a_u8; CHUNK];
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                bulk.write_all(&chunk)
                    .expect("bulk transfer write (no reset)");
                sent += CHUNK as u64;
                thread::sleep(Duration::from_millis(5));
            }
            bulk.shutdown(std::net::Shutdown::Write).unwrap();
            sent
        });
        let _stop_on_panic = StopOnDrop(&stop);
        switches();
        stop.store(true, Ordering::Relaxed);
        transfer.join().expect("transfer thread")
    });

    assert_eq!(
        tracked(pins, &bulk_flow).backend_id,
        bulk_entry.backend_id,
        "the transfer's flow keeps its backend"
    );
    // Every byte reached the transfer's backend (the other connections send none).
    let received = |name: &str| {
        servers
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.bytes())
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while received(&bulk_backend) < sent && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(received(&bulk_backend), sent, "bytes of the transfer");
    let total: u64 = servers.iter().map(|s| s.bytes()).sum();
    assert_eq!(total, sent, "no bytes elsewhere");
    (sent, bulk_backend)
}

fn assert_no_failed_reload(agent: &AgentProcess) {
    assert!(
        !agent
            .history
            .iter()
            .any(|l| l.contains("programs not reloaded")),
        "{:#?}",
        agent.history
    );
}

#[test]
fn flow_events_switched_at_runtime_keep_a_long_lived_connection() {
    let topology = Topology::new(TEST_PREFIX, 3).expect("topology");
    let servers = tcp_servers_on_backends(&topology, PORT);
    let file = ConfigFile::new(&config(&topology, Some(false)));
    let interfaces = topology.balancer_interfaces();
    let mut agent = AgentProcess::start_with(
        &topology.balancer,
        file.path(),
        &interfaces,
        &["--metrics-addr", METRICS],
    )
    .expect("agent starts");
    let pins = agent.pins();

    let (sent, bulk_backend) = transfer_across(&topology, &servers, &pins, || {
        let programs = || topology.balancer.xdp_program_id(BALANCER_CLIENT_IFACE);
        // Off (the config says so): no event for new connections.
        thread::sleep(Duration::from_millis(300));
        connections(&topology, 5);
        assert_eq!(new_flow_events(&topology.balancer), 0.0, "off at start");
        let first_program = programs();

        // On by an edit: the programs are reloaded, new connections reported.
        file.rewrite(&config(&topology, Some(true)));
        let reloaded = agent
            .wait_for_log("programs reloaded: ", Duration::from_secs(30))
            .expect("reloaded with flow events");
        assert!(reloaded.contains("flow events on"), "{reloaded}");
        println!("{reloaded}");
        let on_program = programs();
        assert_ne!(on_program, first_program, "the new program is attached");
        connections(&topology, 5);
        let deadline = Instant::now() + Duration::from_secs(5);
        while new_flow_events(&topology.balancer) < 5.0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        let while_on = new_flow_events(&topology.balancer);
        assert!(while_on >= 5.0, "new flows reported while on: {while_on}");
        thread::sleep(Duration::from_millis(300));

        // Off again: nothing more.
        file.rewrite(&config(&topology, Some(false)));
        let reloaded = agent
            .wait_for_log("programs reloaded: ", Duration::from_secs(30))
            .expect("reloaded without flow events");
        assert!(reloaded.contains("flow events off"), "{reloaded}");
        println!("{reloaded}");
        assert_ne!(programs(), on_program, "the new program is attached");
        let after_off = new_flow_events(&topology.balancer);
        connections(&topology, 5);
        thread::sleep(Duration::from_millis(300));
        assert_eq!(new_flow_events(&topology.balancer), after_off, "off again");
        println!("new-flow events: {while_on} while on (of 5 connections), none while off");
    });
    assert_no_failed_reload(&agent);
    println!("transfer: {sent} bytes delivered to {bulk_backend} across two reloads");
}

/// Opens `n` connections to the VIP, each closed once greeted; returns their client addresses.
fn connections_from(topology: &Topology, n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| {
            let (stream, _) = tcp_connect(&topology.client, SocketAddr::from((VIP, 80)))
                .unwrap_or_else(|e| panic!("connection {i} to the VIP: {e}"));
            stream.local_addr().unwrap()
        })
        .collect()
}

/// The texts of the flow events `stream` delivers until `done` holds for them or `wait` has
/// passed.
fn flow_events_until(
    rt: &tokio::runtime::Runtime,
    stream: &mut tonic::Streaming<pb::Event>,
    wait: Duration,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut texts = Vec::new();
    rt.block_on(async {
        while !done(&texts) {
            match tokio::time::timeout_at(deadline, stream.message()).await {
                Err(_) => break,
                Ok(event) => {
                    let event = event.expect("event stream").expect("the stream goes on");
                    if event.kind == pb::EventKind::Flow as i32 {
                        texts.push(event.text);
                    }
                }
            }
        }
    });
    texts
}

/// Whether one of `events` is the new flow of the connection from `client`.
fn reported(events: &[String], client: SocketAddr) -> bool {
    let needle = format!("new flow tcp {client} -> {VIP}:80 ");
    events.iter().any(|text| text.contains(&needle))
}

/// Opens `n` connections to the VIP and checks that `stream` reports the new flow of each within
/// 5 s.
fn assert_new_flows_reported(
    topology: &Topology,
    rt: &tokio::runtime::Runtime,
    stream: &mut tonic::Streaming<pb::Event>,
    n: usize,
) {
    let clients = connections_from(topology, n);
    let events = flow_events_until(rt, stream, Duration::from_secs(5), |events| {
        clients.iter().all(|&c| reported(events, c))
    });
    for client in &clients {
        assert!(
            reported(&events, *client),
            "{client} not reported: {events:#?}"
        );
    }
}

/// Opens `n` connections to the VIP and checks that `stream` reports none of their flows within
/// 1 s.
fn assert_new_flows_not_reported(
    topology: &Topology,
    rt: &tokio::runtime::Runtime,
    stream: &mut tonic::Streaming<pb::Event>,
    n: usize,
) {
    let clients = connections_from(topology, n);
    let events = flow_events_until(rt, stream, Duration::from_secs(1), |_| false);
    for client in &clients {
        assert!(
            !reported(&events, *client),
            "{client} reported while off: {events:#?}"
        );
    }
}

/// `lbctl flow-events on|off` through the agent's API, with a long-lived transfer through the VIP:
/// the flow events of new connections arrive on the gRPC event stream only while on; a config
/// edit that leaves `flow_events` alone keeps the API's setting, one that changes it takes over
/// (the latest instruction wins).
#[test]
fn flow_events_switched_through_the_api_keep_a_long_lived_connection() {
    let topology = Topology::new(TEST_PREFIX, 3).expect("topology");
    let servers = tcp_servers_on_backends(&topology, PORT);
    // No `flow_events`: the flag (absent: off) decides.
    let file = ConfigFile::new(&config(&topology, None));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let mut agent = AgentProcess::start_with(
        &topology.balancer,
        file.path(),
        &topology.balancer_interfaces(),
        &["--grpc-socket", socket.to_str().unwrap()],
    )
    .expect("agent starts");
    let pins = agent.pins();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut client = rt.block_on(connect_unix(&socket)).expect("client");
    let mut stream = rt
        .block_on(client.stream_events(pb::StreamEventsRequest {}))
        .expect("StreamEvents")
        .into_inner();

    let (sent, bulk_backend) = transfer_across(&topology, &servers, &pins, || {
        let programs = || topology.balancer.xdp_program_id(BALANCER_CLIENT_IFACE);
        let status = lbctl(&socket, &["flow-events", "status"]);
        assert!(
            status.starts_with("flow events: off (--flow-events)"),
            "{status}"
        );
        let first_program = programs();

        let on = lbctl(&socket, &["flow-events", "on"]);
        assert!(on.starts_with("flow events: on (gRPC API)\n"), "{on}");
        assert_ne!(programs(), first_program, "the new program is attached");
        assert_new_flows_reported(&topology, &rt, &mut stream, 5);
        let again = lbctl(&socket, &["flow-events", "on"]);
        assert!(again.contains("(unchanged"), "{again}");

        // A config edit that leaves `flow_events` alone keeps the API's setting: still on.
        file.rewrite(&format!("# edited\n{}", config(&topology, None)));
        agent
            .wait_for_log("config file changed", Duration::from_secs(10))
            .expect("the edit is read");
        thread::sleep(Duration::from_millis(500));
        let status = lbctl(&socket, &["flow-events", "status"]);
        assert!(status.starts_with("flow events: on (gRPC API)"), "{status}");
        assert_new_flows_reported(&topology, &rt, &mut stream, 2);

        let on_program = programs();
        let off = lbctl(&socket, &["flow-events", "off"]);
        assert!(off.starts_with("flow events: off (gRPC API)\n"), "{off}");
        assert!(
            off.contains("gRPC API: off, config file: unset, --flow-events: off"),
            "{off}"
        );
        let off_program = programs();
        assert_ne!(off_program, on_program, "the new program is attached");
        // Events read from the ring buffer before the switch may still come: only the
        // connections opened after it must not be reported.
        assert_new_flows_not_reported(&topology, &rt, &mut stream, 5);
        // Reset: the flag decides again, which also says off (no reload).
        let reset = lbctl(&socket, &["flow-events", "reset"]);
        assert!(
            reset.starts_with("flow events: off (--flow-events) (unchanged, no reload)\n"),
            "{reset}"
        );
        assert_eq!(programs(), off_program, "no reload");

        // An edit that changes `flow_events` is the latest instruction: the file decides.
        file.rewrite(&config(&topology, Some(true)));
        agent
            .wait_for_log("programs reloaded: flow events on", Duration::from_secs(30))
            .expect("the file's flow_events switches them on");
        // The switch is published right after the reload's log line.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut status = lbctl(&socket, &["flow-events", "status"]);
        while !status.starts_with("flow events: on (config file)\n") && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
            status = lbctl(&socket, &["flow-events", "status"]);
        }
        assert!(
            status.starts_with("flow events: on (config file)\n"),
            "{status}"
        );
        assert!(
            status.contains("gRPC API: unset, config file: on"),
            "{status}"
        );
        assert_ne!(programs(), off_program, "the new program is attached");
        assert_new_flows_reported(&topology, &rt, &mut stream, 3);
    });
    let state = rt
        .block_on(client.list_state(pb::ListStateRequest {}))
        .expect("ListState")
        .into_inner();
    let flow_events = state.flow_events.expect("ListState has the switch");
    assert!(
        flow_events.enabled && flow_events.api.is_none(),
        "{flow_events:?}"
    );
    assert_eq!(flow_events.source, pb::FlowEventsSource::ConfigFile as i32);
    assert_no_failed_reload(&agent);
    println!("transfer: {sent} bytes delivered to {bulk_backend} across three reloads");
}
