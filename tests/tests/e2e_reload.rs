//! Flow events switched on and off while the agent runs: the real agent in the namespace topology,
//! a bulk TCP transfer through a DNAT VIP that spans two edits of the config's `flow_events`, each
//! reloading `lb_xdp` into the pinned links (`lb_agent::datapath::reload`). The transfer delivers
//! every byte to the backend it started on, with no reset, and keeps its conntrack entry's backend;
//! the program on the interfaces changes at each reload; new connections are reported as flow
//! events (`lb_flow_events_total{kind="new_flow"}`) only while events are on.

use std::{
    io::Write,
    net::SocketAddr,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData};
use lb_agent::pins::PinDir;
use lb_common::{conntrack::ConntrackEntry, protocol};
use lb_tests::{
    agent::{metric_sum, scrape_metrics, AgentProcess, ConfigFile, TestPins},
    netns::{Netns, TEST_PREFIX},
    servers::{tcp_connect, tcp_request, tcp_servers_on_backends},
    test_run::{flow_key, Conntrack},
    topology::{Topology, BALANCER_CLIENT_IFACE, VIP},
};

const PORT: u16 = 8080;
const METRICS: &str = "127.0.0.1:9481";
const CHUNK: usize = 64 * 1024;

fn config(topology: &Topology, flow_events: bool) -> String {
    let mut yaml = format!(
        "flow_events: {flow_events}\nservices:\n  - name: web\n    vip: {VIP}\n    port: 80\n    \
         protocol: tcp\n    backends:\n"
    );
    for b in &topology.backends {
        yaml += &format!("      - {{ address: {}, port: {PORT} }}\n", b.addr);
    }
    yaml
}

/// Id of the XDP program attached to `iface` in `ns`, as `ip link` reports it.
fn xdp_program_id(ns: &Netns, iface: &str) -> u32 {
    let output = Command::new("ip")
        .args(["-n", ns.name(), "link", "show", "dev", iface])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&output.stdout);
    text.split("prog/xdp id ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("no XDP program on {iface}: {text}"))
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

#[test]
fn flow_events_switched_at_runtime_keep_a_long_lived_connection() {
    let topology = Topology::new(TEST_PREFIX, 3).expect("topology");
    let servers = tcp_servers_on_backends(&topology, PORT);
    let file = ConfigFile::new(&config(&topology, false));
    let interfaces = topology.balancer_interfaces();
    let mut agent = AgentProcess::start_with(
        &topology.balancer,
        file.path(),
        &interfaces,
        &["--metrics-addr", METRICS],
    )
    .expect("agent starts");
    let pins = agent.pins();
    let vip = SocketAddr::from((VIP, 80));
    let (mut bulk, bulk_backend) = tcp_connect(&topology.client, vip).expect("bulk connects");
    bulk.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let bulk_flow = flow_key(protocol::TCP, bulk.local_addr().unwrap(), vip);
    let bulk_entry = tracked(&pins, &bulk_flow);

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

        let programs = || xdp_program_id(&topology.balancer, BALANCER_CLIENT_IFACE);
        // Off (the config says so): no event for new connections.
        thread::sleep(Duration::from_millis(300));
        connections(&topology, 5);
        assert_eq!(new_flow_events(&topology.balancer), 0.0, "off at start");
        let first_program = programs();

        // On by an edit: the programs are reloaded, new connections reported.
        file.rewrite(&config(&topology, true));
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
        file.rewrite(&config(&topology, false));
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

        stop.store(true, Ordering::Relaxed);
        transfer.join().expect("transfer thread")
    });

    assert_eq!(
        tracked(&pins, &bulk_flow).backend_id,
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
    assert!(
        !agent
            .history
            .iter()
            .any(|l| l.contains("programs not reloaded")),
        "{:#?}",
        agent.history
    );
    println!("transfer: {sent} bytes delivered to {bulk_backend} across two reloads");
}
