//! End to end: the real `lb-agent` process attaches the datapath in the balancer namespace; real TCP
//! and UDP traffic over IPv4 and IPv6 goes from the client namespace through the VIPs, and the
//! backends count what reaches them.

use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lb_tests::{
    agent::{AgentProcess, ConfigFile},
    netns::TEST_PREFIX,
    servers::{tcp_connect, tcp_requests, udp_requests, TcpCountingServer, UdpCountingServer},
    topology::{Topology, SERVICE_TCP_PORT, SERVICE_UDP_PORT, VIP, VIP6},
};
use nix::sys::signal::Signal;

struct Servers {
    tcp: Vec<TcpCountingServer>,
    udp: Vec<UdpCountingServer>,
}

/// TCP and UDP servers on each backend's IPv4 and IPv6 address, named `backend-<i>`.
fn start_servers(topology: &Topology) -> Servers {
    let mut servers = Servers {
        tcp: Vec::new(),
        udp: Vec::new(),
    };
    for (i, b) in topology.backends.iter().enumerate() {
        let name = format!("backend-{}", i + 1);
        for addr in [IpAddr::from(b.addr), IpAddr::from(b.addr6)] {
            servers.tcp.push(TcpCountingServer::start(
                &b.ns,
                addr,
                SERVICE_TCP_PORT,
                &name,
            ));
            servers.udp.push(UdpCountingServer::start(
                &b.ns,
                addr,
                SERVICE_UDP_PORT,
                &name,
            ));
        }
    }
    servers
}

fn tally(results: &[std::io::Result<String>], what: &str) -> BTreeMap<String, usize> {
    let mut by_backend = BTreeMap::new();
    for r in results {
        let name = r
            .as_ref()
            .unwrap_or_else(|e| panic!("{what}: a request through the VIP failed: {e}"));
        *by_backend.entry(name.clone()).or_default() += 1;
    }
    by_backend
}

#[test]
fn tcp_and_udp_over_ipv4_and_ipv6_reach_every_backend() {
    let topology = Topology::new(TEST_PREFIX, 3).expect("topology");
    let servers = start_servers(&topology);
    let config = ConfigFile::new(&topology.dual_stack_services(&[1, 2, 3]));

    // Before the agent runs, nothing answers on the VIP.
    let before = tcp_requests(&topology.client, SocketAddr::from((VIP, 80)), 1, b"");
    assert!(
        before[0].is_err(),
        "VIP must not answer without the datapath"
    );

    let agent = AgentProcess::start(
        &topology.balancer,
        config.path(),
        &topology.balancer_interfaces(),
    )
    .expect("agent starts");

    const N: usize = 45;
    let payload: &'static [u8] = b"0123456789abcdef";
    let mut tcp_total = BTreeMap::<String, usize>::new();
    for vip in [IpAddr::from(VIP), IpAddr::from(VIP6)] {
        let tcp = tally(
            &tcp_requests(&topology.client, SocketAddr::new(vip, 80), N, payload),
            "tcp",
        );
        assert_eq!(
            tcp.len(),
            3,
            "TCP to {vip} spreads over all backends: {tcp:?}"
        );
        for (k, v) in tcp {
            *tcp_total.entry(k).or_default() += v;
        }
        let udp = tally(
            &udp_requests(&topology.client, SocketAddr::new(vip, 53), N, payload),
            "udp",
        );
        assert_eq!(
            udp.len(),
            3,
            "UDP to {vip} spreads over all backends: {udp:?}"
        );
    }

    // The backends' own counts agree with what the client saw, and every byte arrived.
    std::thread::sleep(Duration::from_millis(200));
    let mut per_backend = BTreeMap::<String, (u64, u64)>::new();
    for s in &servers.tcp {
        let e = per_backend.entry(s.name.clone()).or_default();
        e.0 += s.connections();
        e.1 += s.bytes();
    }
    for (name, (connections, bytes)) in per_backend {
        assert_eq!(connections as usize, tcp_total[&name], "{name} connections");
        assert_eq!(bytes, connections * payload.len() as u64, "{name} bytes");
    }
    let udp_datagrams: u64 = servers.udp.iter().map(|s| s.datagrams()).sum();
    assert_eq!(
        udp_datagrams,
        2 * N as u64,
        "every datagram reached exactly one backend"
    );

    let (_, counters) = agent.stop_cleanly();
    assert!(counters.contains("forward_new_flow="), "{counters}");
    assert!(counters.contains("reply_translated="), "{counters}");
    // Detached: the VIP no longer answers. The kernel releases a link shortly after its last pin
    // is removed (the agent's test pins go with it), not at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while tcp_requests(&topology.client, SocketAddr::from((VIP, 80)), 1, b"")[0].is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "VIP must stop answering once the agent detached"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn removing_one_of_four_backends_keeps_existing_connections_and_spreads_new_ones() {
    let topology = Topology::new(TEST_PREFIX, 4).expect("topology");
    let servers = start_servers(&topology);
    let config = ConfigFile::new(&topology.dual_stack_services(&[1, 2, 3, 4]));
    let mut agent = AgentProcess::start(
        &topology.balancer,
        config.path(),
        &topology.balancer_interfaces(),
    )
    .expect("agent starts");

    // 40 long-lived connections, open across the change.
    let vip = SocketAddr::from((VIP, 80));
    let mut open: Vec<_> = (0..40)
        .map(|_| tcp_connect(&topology.client, vip).expect("connect"))
        .collect();
    let mut before = BTreeMap::<String, usize>::new();
    for (_, name) in &open {
        *before.entry(name.clone()).or_default() += 1;
    }
    assert_eq!(before.len(), 4, "{before:?}");

    // Remove backend 4 and reload.
    config.rewrite(&topology.dual_stack_services(&[1, 2, 3]));
    agent.signal(Signal::SIGHUP);
    agent
        .wait_for_log("config reloaded", Duration::from_secs(10))
        .expect("reload");

    // Existing connections are untouched, those to the removed backend too (it is retired while
    // its tracked flows live): each delivers its bytes to the backend it started on.
    // A backend has a server per family, under its one name.
    let per_backend = || -> BTreeMap<String, u64> {
        let mut bytes = BTreeMap::new();
        for s in &servers.tcp {
            *bytes.entry(s.name.clone()).or_default() += s.bytes();
        }
        bytes
    };
    let bytes_before = per_backend();
    let mut sent = BTreeMap::<String, u64>::new();
    for (stream, name) in open.iter_mut() {
        stream
            .write_all(&[7u8; 1000])
            .unwrap_or_else(|e| panic!("connection to {name} broken: {e}"));
        *sent.entry(name.clone()).or_default() += 1000;
    }
    for (stream, _) in &open {
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let delivered = || -> BTreeMap<String, u64> {
        let before = &bytes_before;
        per_backend()
            .into_iter()
            .map(|(name, bytes)| (name.clone(), bytes - before[&name]))
            .filter(|(_, bytes)| *bytes > 0)
            .collect()
    };
    while delivered() != sent && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        delivered(),
        sent,
        "every byte of every connection reached the backend it started on"
    );
    assert!(sent.contains_key("backend-4"), "{sent:?}");

    // New connections spread over the three remaining backends only.
    let after = tally(
        &tcp_requests(&topology.client, vip, 60, b""),
        "after removal",
    );
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(!after.contains_key("backend-4"), "{after:?}");

    // An invalid edit is rejected and the last good state stays in force.
    config.rewrite("services:\n  - name: broken\n    vip: not-an-ip\n");
    agent.signal(Signal::SIGHUP);
    let line = agent
        .wait_for_log("config rejected", Duration::from_secs(10))
        .expect("rejection logged");
    assert!(line.contains("services[0].vip"), "{line}");
    let still = tally(
        &tcp_requests(&topology.client, vip, 60, b""),
        "after a bad reload",
    );
    assert_eq!(still.len(), 3, "{still:?}");
}

#[test]
fn agent_rejects_bad_yaml_naming_field_and_line() {
    let config = ConfigFile::new("services:\n  - name: web\n    vip: 198.51.100.10\n    port: 80\n    protocol: tcp\n    backends:\n      - { address: 203.0.113.300, port: 8080 }\n",
    );
    let output = std::process::Command::new(lb_tests::agent::agent_binary())
        .args(["run", "--iface", "lo", "--config"])
        .arg(config.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("services[0].backends[0].address at line 7"),
        "{stderr}"
    );
}
