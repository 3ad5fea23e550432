//! Hitless restarts end to end: the real agent in the namespace topology, a bulk TCP transfer and a
//! stream of new TCP connections through a DNAT VIP, while the agent is killed with SIGKILL (or
//! stopped with SIGTERM), stays down, and a new agent adopts its pinned datapath. Nothing may be
//! lost: every connection of the stream succeeds (also while no agent runs), the transfer delivers
//! every byte to the backend it started on, connection tracking keeps its entries, and the new
//! agent's program replaced the old one on every interface. An agent facing pinned state of another
//! layout refuses to start (the datapath keeps serving) unless told to replace it.

use std::{
    collections::HashMap as StdHashMap,
    io::Write,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData};
use lb_agent::pins::PinDir;
use lb_common::{
    conntrack::{ConntrackEntry, FlowKey},
    protocol,
    service::Backend,
};
use lb_tests::{
    agent::{lbctl, AgentProcess, ConfigFile, TestPins},
    netns::{Netns, TEST_PREFIX},
    servers::{tcp_connect, tcp_request, tcp_servers_on_backends, TcpCountingServer},
    test_run::{flow_key, Conntrack},
    topology::{Topology, BALANCER_CLIENT_IFACE, VIP},
};

const PORT: u16 = 8080;
/// The transfer writes this much every few milliseconds, so it runs through the whole restart.
const CHUNK: usize = 64 * 1024;
/// How long the datapath runs without an agent.
const DOWN: Duration = Duration::from_millis(1500);

fn config(topology: &Topology) -> String {
    let mut yaml = format!(
        "services:\n  - name: web\n    vip: {VIP}\n    port: 80\n    protocol: tcp\n    backends:\n"
    );
    for b in &topology.backends {
        yaml += &format!("      - {{ address: {}, port: {PORT} }}\n", b.addr);
    }
    yaml
}

/// The entries of the pinned `CONNTRACK_V4` and `CONNTRACK_V6` maps, by flow.
fn conntrack(pins: &TestPins) -> StdHashMap<FlowKey, ConntrackEntry> {
    let pinned = |name: &str| {
        let data = MapData::from_pin(PinDir::new(pins.path()).map(name))
            .unwrap_or_else(|err| panic!("{name} pin: {err}"));
        Map::from_map_data(data).unwrap()
    };
    Conntrack::read(&pinned("CONNTRACK_V4"), &pinned("CONNTRACK_V6")).all()
}

fn pinned_backend(pins: &TestPins, id: u32) -> Backend {
    let data = MapData::from_pin(PinDir::new(pins.path()).map("BACKENDS")).expect("BACKENDS pin");
    let map: Array<MapData, Backend> = Array::try_from(Map::from_map_data(data).unwrap()).unwrap();
    map.get(&id, 0).unwrap()
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs the traffic through a restart; `stop` ends the first agent (which must leave the datapath
/// pinned and attached).
/// `second_args`: more options of the second agent (other map sizes are carried over).
fn restart_under_traffic(stop: impl FnOnce(AgentProcess), second_args: &[&str]) {
    let topology = Topology::new(TEST_PREFIX, 3).expect("topology");
    let servers: Vec<_> = tcp_servers_on_backends(&topology, PORT);
    let config = ConfigFile::new(&config(&topology));
    let interfaces = topology.balancer_interfaces();
    let first = AgentProcess::start(&topology.balancer, config.path(), &interfaces)
        .expect("first agent starts");
    let pins = first.pins();
    let first_program = topology.balancer.xdp_program_id(BALANCER_CLIENT_IFACE);
    let vip = SocketAddr::from((VIP, 80));

    let (mut bulk, bulk_backend) = tcp_connect(&topology.client, vip).expect("bulk connects");
    bulk.set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let bulk_flow = flow_key(protocol::TCP, bulk.local_addr().unwrap(), vip);

    let stop_traffic = AtomicBool::new(false);
    let agent_down = AtomicBool::new(false);
    let (succeeded, succeeded_while_down) = (AtomicU64::new(0), AtomicU64::new(0));
    let failures = Mutex::new(Vec::new());
    let started = Instant::now();
    let (sent, second) = thread::scope(|scope| {
        // A new connection every 20 ms, each answered by some backend.
        scope.spawn(|| {
            while !stop_traffic.load(Ordering::Relaxed) {
                let down = agent_down.load(Ordering::Relaxed);
                match tcp_request(&topology.client, vip, b"") {
                    Ok(_) => {
                        succeeded.fetch_add(1, Ordering::Relaxed);
                        if down && agent_down.load(Ordering::Relaxed) {
                            succeeded_while_down.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => failures
                        .lock()
                        .unwrap()
                        .push(format!("{:?}: {e}", started.elapsed())),
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        // The bulk transfer, paced so that it spans the restart.
        let transfer = scope.spawn(|| {
            let chunk = vec![0x5a_u8; CHUNK];
            let mut sent = 0u64;
            while !stop_traffic.load(Ordering::Relaxed) {
                bulk.write_all(&chunk).expect("bulk transfer write");
                sent += CHUNK as u64;
                thread::sleep(Duration::from_millis(5));
            }
            bulk.shutdown(std::net::Shutdown::Write).unwrap();
            sent
        });

        // A failed check below stops the traffic threads, so the scope ends and the test fails
        // instead of waiting for them forever.
        let _stop_on_panic = StopOnDrop(&stop_traffic);
        thread::sleep(Duration::from_secs(1));
        let tracked_before = conntrack(&pins);
        let bulk_entry = tracked_before[&bulk_flow];
        stop(first);
        agent_down.store(true, Ordering::Relaxed);
        thread::sleep(DOWN);
        agent_down.store(false, Ordering::Relaxed);

        let second = AgentProcess::start_pinned(
            &topology.balancer,
            config.path(),
            &interfaces,
            second_args,
            pins.clone(),
        )
        .expect("second agent starts");
        let tracked_after = conntrack(&pins);
        assert!(
            tracked_after.len() >= tracked_before.len(),
            "conntrack entries dropped from {} to {}",
            tracked_before.len(),
            tracked_after.len()
        );
        assert_eq!(
            tracked_after[&bulk_flow].backend_id, bulk_entry.backend_id,
            "the transfer's flow keeps its backend id"
        );
        let backend = pinned_backend(&pins, bulk_entry.backend_id);
        let index: usize = bulk_backend["backend-".len()..].parse().unwrap();
        assert_eq!(
            backend.ip(),
            IpAddr::from(topology.backends[index - 1].addr),
            "backend id {} still names {bulk_backend}",
            bulk_entry.backend_id
        );

        thread::sleep(Duration::from_secs(1));
        stop_traffic.store(true, Ordering::Relaxed);
        (transfer.join().expect("transfer thread"), second)
    });

    // Adopted, not rebuilt: maps and links reused, the program replaced on every interface.
    let adopted_maps = second
        .history
        .iter()
        .any(|l| l.contains("adopting pinned datapath maps"));
    let adopted_links = second
        .history
        .iter()
        .filter(|l| l.contains("adopted the pinned XDP link"))
        .count();
    assert!(
        adopted_maps && adopted_links == interfaces.len(),
        "{:#?}",
        second.history
    );
    if !second_args.is_empty() {
        let carried = second
            .history
            .iter()
            .filter(|l| l.contains("pinned map carried over into its new size"))
            .count();
        assert!(carried >= 3, "{:#?}", second.history);
    }
    assert!(
        !second
            .history
            .iter()
            .any(|l| l.contains("datapath reconciled")),
        "the first reconcile after adoption writes nothing: {:#?}",
        second.history
    );
    assert_ne!(
        topology.balancer.xdp_program_id(BALANCER_CLIENT_IFACE),
        first_program,
        "the new agent's program is attached"
    );

    // Every byte reached the transfer's backend (the connection stream sends none).
    let deadline = Instant::now() + Duration::from_secs(10);
    let received = |name: &str| {
        servers
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.bytes())
            .unwrap()
    };
    while received(&bulk_backend) < sent && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let total: u64 = servers.iter().map(|s| s.bytes()).sum();
    assert_eq!(received(&bulk_backend), sent, "bytes of the transfer");
    assert_eq!(total, sent, "no bytes elsewhere");

    let failures = failures.into_inner().unwrap();
    let (succeeded, while_down) = (succeeded.into_inner(), succeeded_while_down.into_inner());
    assert!(failures.is_empty(), "failed connections: {failures:?}");
    assert!(
        while_down >= 10,
        "only {while_down} connections while no agent ran"
    );
    eprintln!(
        "transfer {sent} bytes delivered; {succeeded} connections succeeded ({while_down} while \
         no agent ran), none failed"
    );
    drop(second);
}

#[test]
fn kill_9_of_the_agent_loses_no_connection_and_no_byte() {
    restart_under_traffic(|agent| agent.kill9().expect("SIGKILL"), &[]);
}

/// Another conntrack size and capacity than the pinned maps': carried over into maps of the new
/// sizes (`lb_agent::resize`), still without losing a connection or a byte.
#[test]
fn a_restart_with_other_map_sizes_loses_no_connection_and_no_byte() {
    let resized = &[
        "--conntrack-entries",
        "131072",
        "--max-services",
        "512",
        "--max-backends",
        "4096",
    ];
    restart_under_traffic(|agent| agent.kill9().expect("SIGKILL"), resized);
}

#[test]
fn sigterm_leaves_the_datapath_running_for_the_next_agent() {
    restart_under_traffic(
        |agent| {
            let (code, log) = agent.stop().expect("agent stops");
            assert_eq!(code, 0);
            assert!(
                log.iter()
                    .any(|l| l.contains("datapath left attached and pinned")),
                "{log:#?}"
            );
        },
        &[],
    );
}

#[test]
fn an_incompatible_layout_is_refused_until_its_replacement_is_asked_for() {
    let topology = Topology::new(TEST_PREFIX, 1).expect("topology");
    let b = &topology.backends[0];
    let _server = TcpCountingServer::start(&b.ns, b.addr, PORT, "backend-1");
    let config = ConfigFile::new(&config(&topology));
    let interfaces = topology.balancer_interfaces();
    let vip = SocketAddr::from((VIP, 80));
    let first = AgentProcess::start(&topology.balancer, config.path(), &interfaces)
        .expect("first agent starts");
    let pins = first.pins();
    assert_eq!(first.stop().expect("first agent stops").0, 0);

    // Another layout version (another agent's meaning of the same bytes): refused before anything
    // changes; the pinned datapath keeps serving.
    let layout = MapData::from_pin(pins.path().join("LAYOUT")).unwrap();
    let mut layout: Array<MapData, u32> =
        Array::try_from(Map::from_map_data(layout).unwrap()).unwrap();
    let version = layout.get(&0, 0).unwrap();
    layout.set(0, version + 1, 0).unwrap();
    let refused = AgentProcess::start_pinned(
        &topology.balancer,
        config.path(),
        &interfaces,
        &[],
        pins.clone(),
    )
    .err()
    .expect("incompatible state refused");
    let message = format!("{refused:#}");
    assert!(
        message.contains("is incompatible with this agent")
            && message.contains(&format!("pinned map layout version {}", version + 1))
            && message.contains("--replace-incompatible-state"),
        "{message}"
    );
    assert_eq!(
        tcp_request(&topology.client, vip, b"").expect("VIP served after the refusal"),
        "backend-1"
    );

    let replaced = AgentProcess::start_pinned(
        &topology.balancer,
        config.path(),
        &interfaces,
        &["--replace-incompatible-state"],
        pins,
    )
    .expect("replacing agent starts");
    assert!(
        replaced
            .history
            .iter()
            .any(|l| l.contains("REPLACING incompatible pinned datapath state")),
        "{:#?}",
        replaced.history
    );
    assert_eq!(
        tcp_request(&topology.client, vip, b"").expect("VIP served after the replacement"),
        "backend-1"
    );
}

/// With Kubernetes as a source, a restarted agent leaves the services it adopted alone until the
/// API server has been listed: while the API server is unreachable, the cluster's service keeps
/// forwarding (the merged state without it would remove it), and `lbctl state` (gRPC `ListState`)
/// reports it as adopted, read back from the maps. Once listed, it is applied and changes apply
/// again.
#[test]
fn a_restart_keeps_the_pinned_kubernetes_services_until_the_api_server_is_listed() {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    use lb_tests::{
        fake_apiserver::FakeApiServer,
        k8s_objects::{endpoint_slice, service, State},
    };

    let topology = Topology::new(TEST_PREFIX, 2).expect("topology");
    let _servers: Vec<_> = tcp_servers_on_backends(&topology, PORT);
    // Bound in the balancer's namespace: the agent reaches it on its own loopback.
    let api = topology
        .balancer
        .run(FakeApiServer::start)
        .expect("fake API server");
    api.apply::<Service>(&service("web", &VIP.to_string(), None));
    let endpoints: Vec<(String, State)> = topology
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), State::Ready))
        .collect();
    let endpoints: Vec<(&str, State)> = endpoints.iter().map(|(a, s)| (a.as_str(), *s)).collect();
    api.apply::<EndpointSlice>(&endpoint_slice("web-v4", "web", "IPv4", &endpoints));
    let file = ConfigFile::new("services: []\n");
    let interfaces = topology.balancer_interfaces();
    let extra = ["--kube-api-url", &api.url()];
    let vip = SocketAddr::new(VIP.into(), 80);
    let answers = || tcp_request(&topology.client, vip, b"").is_ok();

    let first = AgentProcess::start_with(&topology.balancer, file.path(), &interfaces, &extra)
        .expect("first agent starts");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !answers() {
        assert!(
            Instant::now() < deadline,
            "the Kubernetes service did not answer within 15 s"
        );
        thread::sleep(Duration::from_millis(100));
    }
    let pins = first.pins();
    first.kill9().expect("SIGKILL");

    let mut api = api;
    api.stop();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let extra = [
        extra[0],
        extra[1],
        "--grpc-socket",
        socket.to_str().unwrap(),
    ];
    let mut second =
        AgentProcess::start_pinned(&topology.balancer, file.path(), &interfaces, &extra, pins)
            .expect("second agent starts without the API server");
    let state = || {
        let out = Command::new(lb_tests::agent::lbctl_binary())
            .arg("--socket")
            .arg(&socket)
            .arg("state")
            .output()
            .expect("running lbctl state");
        assert!(out.status.success(), "lbctl state: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    // What the datapath serves, marked as not applied from the sources: the Service's VIP over
    // both endpoints, sharing the table's slots.
    let adopted = state();
    assert!(adopted.starts_with("adopted: 1 services"), "{adopted}");
    let line = adopted
        .lines()
        .find(|l| l.starts_with(&format!("  {vip}/tcp pinned-")))
        .unwrap_or_else(|| panic!("the pinned service is not listed: {adopted}"));
    let weights: StdHashMap<String, u32> = line
        .split_once("backends: ")
        .expect("backends")
        .1
        .split_whitespace()
        .map(|b| {
            let (backend, slots) = b.split_once('=').expect("backend=slots");
            (backend.to_string(), slots.parse().expect("slots"))
        })
        .collect();
    let mut listed: Vec<&String> = weights.keys().collect();
    listed.sort();
    let mut expected: Vec<String> = topology
        .backends
        .iter()
        .map(|b| format!("{}:{PORT}", b.addr))
        .collect();
    expected.sort();
    assert_eq!(listed, expected.iter().collect::<Vec<_>>(), "{line}");
    assert_eq!(
        weights.values().sum::<u32>(),
        lb_agent::maglev::DEFAULT_TABLE_SIZE,
        "every slot of the table: {line}"
    );
    assert!(
        second
            .history
            .iter()
            .any(|l| l.contains("pinned services stay as they are until Kubernetes is listed")),
        "{:#?}",
        second.history
    );
    for _ in 0..10 {
        assert!(
            answers(),
            "the service stopped answering while Kubernetes was unreachable"
        );
        thread::sleep(Duration::from_millis(200));
    }

    let api = topology
        .balancer
        .run(move || api.restart().map(|()| api))
        .expect("API server back");
    second
        .wait_for_log("Kubernetes listed", Duration::from_secs(30))
        .expect("Kubernetes is listed again");
    assert!(answers(), "the listed state keeps the service");
    // The listing is logged just before the reconcile that applies it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut applied = state();
    while applied.starts_with("adopted") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        applied = state();
    }
    assert!(
        applied.starts_with("applied (file, API and Kubernetes merged): 1 services"),
        "{applied}"
    );
    // Changes apply again: deleting the Service takes the VIP out.
    assert!(api.delete::<Service>("default", "web"));
    let deadline = Instant::now() + Duration::from_secs(15);
    while connects_quickly(&topology.client, vip) {
        assert!(
            Instant::now() < deadline,
            "the deleted service still answers after 15 s"
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(second.stop().expect("stops").0, 0);
}

/// Whether a TCP connection to `target` from `ns` is accepted within 300 ms.
fn connects_quickly(ns: &Netns, target: SocketAddr) -> bool {
    ns.run(move || {
        std::net::TcpStream::connect_timeout(&target, Duration::from_millis(300)).is_ok()
    })
}

/// The gRPC API's flow events setting outlives the agent (`<state dir>/flow-events.json`): the
/// next agent, adopting the pins with the same flag and config file, runs with flow events as
/// `lbctl flow-events` last set them. An agent started with another `--flow-events` follows its
/// flag instead (the newer instruction) and drops the saved setting for good.
#[test]
fn the_api_flow_events_setting_outlives_the_agent_until_the_flag_changes() {
    let topology = Topology::new(TEST_PREFIX, 1).expect("topology");
    let file = ConfigFile::new(&config(&topology));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let socket = socket.to_str().unwrap();
    let start = |extra: &[&str], pins| {
        AgentProcess::start_pinned(
            &topology.balancer,
            file.path(),
            &topology.balancer_interfaces(),
            &[&["--grpc-socket", socket], extra].concat(),
            pins,
        )
        .expect("agent starts")
    };
    let status = || lbctl(Path::new(socket), &["flow-events", "status"]);

    let agent = start(&[], TestPins::new());
    let pins = agent.pins();
    let saved = pins.state_dir().join("flow-events.json");
    assert!(status().starts_with("flow events: off (--flow-events)\n"));
    let on = lbctl(Path::new(socket), &["flow-events", "on"]);
    assert!(on.starts_with("flow events: on (gRPC API)\n"), "{on}");
    assert!(saved.exists(), "the API's setting is saved");
    agent.stop().expect("SIGTERM");

    // Same flag, same file: the API's setting holds, and the programs run with it.
    let agent = start(&[], pins.clone());
    assert!(
        agent
            .history
            .iter()
            .any(|line| line.contains("saved by the previous agent, holds")),
        "{:#?}",
        agent.history
    );
    let restored = status();
    assert!(
        restored.starts_with("flow events: on (gRPC API)\n"),
        "{restored}"
    );
    agent.stop().expect("SIGTERM");

    // Another flag is the newer instruction: it decides, and the saved setting is gone.
    let agent = start(&["--flow-events"], pins.clone());
    let flagged = status();
    assert!(
        flagged.starts_with("flow events: on (--flow-events)\n"),
        "{flagged}"
    );
    assert!(!saved.exists(), "the dropped setting is removed");
    agent.stop().expect("SIGTERM");
    let agent = start(&[], pins);
    let after = status();
    assert!(
        after.starts_with("flow events: off (--flow-events)\n"),
        "{after}"
    );
    agent.stop().expect("SIGTERM");
}
