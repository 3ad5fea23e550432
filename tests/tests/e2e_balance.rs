//! End to end: the real `lb-agent` process attaches the datapath in the balancer namespace; TCP
//! connections from the client namespace to the VIP must succeed and be spread over the backends,
//! counted by the backends themselves.

use std::{collections::BTreeMap, net::SocketAddr};

use lb_tests::{
    agent::AgentProcess,
    netns::TEST_PREFIX,
    servers::{tcp_requests, TcpCountingServer},
    topology::{Topology, VIP},
};

const BACKEND_PORT: u16 = 8080;

fn config_for(topology: &Topology) -> String {
    let mut yaml = format!(
        "services:\n  - name: web\n    vip: {VIP}\n    port: 80\n    protocol: tcp\n    backends:\n"
    );
    for b in &topology.backends {
        yaml += &format!("      - {{ address: {}, port: {BACKEND_PORT} }}\n", b.addr);
    }
    yaml
}

#[test]
fn tcp_connections_through_the_vip_reach_every_backend() {
    let topology = Topology::new(TEST_PREFIX, 3).expect("topology");
    let servers: Vec<_> = topology
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            TcpCountingServer::start(&b.ns, b.addr, BACKEND_PORT, &format!("backend-{}", i + 1))
        })
        .collect();

    let dir = std::env::temp_dir().join(format!("lb-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.yaml");
    std::fs::write(&config, config_for(&topology)).unwrap();

    // Before the agent runs, nothing answers on the VIP.
    let before = tcp_requests(&topology.client, SocketAddr::from((VIP, 80)), 1, b"");
    assert!(
        before[0].is_err(),
        "VIP must not answer without the datapath"
    );

    let agent = AgentProcess::start(&topology.balancer, &config, &topology.balancer_interfaces())
        .expect("agent starts");

    const CONNECTIONS: usize = 60;
    let payload: &'static [u8] = b"0123456789abcdef";
    let results = tcp_requests(
        &topology.client,
        SocketAddr::from((VIP, 80)),
        CONNECTIONS,
        payload,
    );
    let mut by_backend = BTreeMap::<String, usize>::new();
    for r in &results {
        let greeting = r
            .as_ref()
            .expect("every connection through the VIP succeeds");
        *by_backend.entry(greeting.clone()).or_default() += 1;
    }
    assert_eq!(
        by_backend.len(),
        3,
        "connections spread over all backends: {by_backend:?}"
    );

    // The backends' own counts agree with what the client saw, and the bytes arrived.
    std::thread::sleep(std::time::Duration::from_millis(200));
    for server in &servers {
        assert_eq!(
            server.connections() as usize,
            by_backend[&server.name],
            "{}",
            server.name
        );
        assert_eq!(
            server.bytes(),
            (by_backend[&server.name] * payload.len()) as u64,
            "{}",
            server.name
        );
    }

    let (code, log) = agent.stop().expect("agent stops");
    assert_eq!(code, 0, "clean exit on SIGTERM");
    let counters = log
        .iter()
        .find(|l| l.contains("datapath counters"))
        .expect("final counters logged");
    assert!(counters.contains("forward_to_backend="), "{counters}");
    // Detached: the VIP no longer answers.
    let after = tcp_requests(&topology.client, SocketAddr::from((VIP, 80)), 1, b"");
    assert!(
        after[0].is_err(),
        "VIP must stop answering once the agent detached"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn agent_rejects_bad_yaml_naming_field_and_line() {
    let dir = std::env::temp_dir().join(format!("lb-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bad.yaml");
    std::fs::write(
        &config,
        "services:\n  - name: web\n    vip: 198.51.100.10\n    port: 80\n    protocol: tcp\n    backends:\n      - { address: 203.0.113.300, port: 8080 }\n",
    )
    .unwrap();
    let output = std::process::Command::new(lb_tests::agent::agent_binary())
        .args(["run", "--iface", "lo", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("services[0].backends[0].address at line 7"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
