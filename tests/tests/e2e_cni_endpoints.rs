//! The agent's side of the CNI plugin, end to end: the real `lb-agent run` in the node namespace of
//! the three-workload topology (`lb_tests::policy_topology`), with a policy whose workloads name
//! no interface. Registering db's host veth through gRPC `RegisterEndpoint` (what `lb-cni ADD`
//! sends) makes the agent enforce db's rules there at runtime; the registration survives an
//! agent restart (`--state-dir`); `ReleaseEndpoint` (`lb-cni DEL`) lifts the enforcement. What the
//! clients get is real TCP connections to db's server.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use lb_agent::grpc::{client::connect_unix, pb};
use lb_tests::{
    agent::{AgentProcess, ConfigFile},
    netns::Netns,
    policy_topology::{PolicyTopology, EXTERNAL},
    servers::{tcp_request, TcpCountingServer},
};

const DB_PORT: u16 = 6379;

/// db accepts TCP 6379 from frontend only; no workload names its interface (registering does).
fn config() -> String {
    let mut workloads = PolicyTopology::workloads_yaml(&[]);
    for iface in ["wl-frontend", "wl-db", "wl-other"] {
        workloads = workloads.replace(&format!(", interface: {iface}"), "");
    }
    let policy = workloads
        + "rules:\n\
           \x20 - {name: db-from-frontend, endpoints: {match_labels: {app: db}}, direction: ingress,\n\
           \x20    action: allow, peers: [{selector: {match_labels: {app: frontend}}}], ports: [{port: 6379}]}\n";
    let indented: Vec<String> = policy.lines().map(|l| format!("  {l}")).collect();
    format!("services: []\npolicy:\n{}\n", indented.join("\n"))
}

fn connects(ns: &Netns, target: SocketAddr) -> bool {
    ns.run(move || TcpStream::connect_timeout(&target, Duration::from_millis(500)).is_ok())
}

/// Waits up to 10 s for `other → db` to connect (`true`) or to be refused (`false`).
fn other_reaches_db_becomes(topology: &PolicyTopology, target: SocketAddr, wanted: bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = connects(topology.ns("other"), target);
        if now == wanted || Instant::now() > deadline {
            return now;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

fn db_endpoint() -> pb::Endpoint {
    pb::Endpoint {
        container_id: "c0ffee-db".into(),
        interface_name: "eth0".into(),
        pod_namespace: "default".into(),
        pod_name: "db".into(),
        host_interface: "wl-db".into(),
        addresses: [false, true]
            .map(|v6| PolicyTopology::addr("db", v6).to_string())
            .to_vec(),
        placement: 0,
        network: "pods".into(),
    }
}

#[test]
fn a_registered_endpoint_is_enforced_kept_across_a_restart_and_released() {
    let topology = PolicyTopology::with_external_interface().expect("topology");
    let db: IpAddr = PolicyTopology::addr("db", false);
    let target = SocketAddr::new(db, DB_PORT);
    let _server = TcpCountingServer::start(topology.ns("db"), db, DB_PORT, "db");

    let file = ConfigFile::new(&config());
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let state_dir = dir.path().join("state");
    let args = [
        "--grpc-socket",
        socket.to_str().unwrap(),
        "--state-dir",
        state_dir.to_str().unwrap(),
    ];
    let interfaces = [EXTERNAL.to_string()];
    let agent = AgentProcess::start_with(&topology.node, file.path(), &interfaces, &args)
        .expect("agent starts");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // No interface for db yet: nothing enforces its rules, other reaches it.
    assert!(
        connects(topology.ns("other"), target),
        "before registration"
    );

    let response = rt
        .block_on(async {
            connect_unix(&socket)
                .await?
                .register_endpoint(pb::RegisterEndpointRequest {
                    endpoint: Some(db_endpoint()),
                })
                .await
                .map_err(anyhow::Error::from)
        })
        .expect("RegisterEndpoint")
        .into_inner();
    assert!(response.created, "{response:?}");
    assert!(
        !other_reaches_db_becomes(&topology, target, false),
        "db's ingress rule enforced on its registered veth"
    );
    assert_eq!(
        tcp_request(topology.ns("frontend"), target, b"hello").expect("frontend -> db"),
        "db"
    );
    let state = rt
        .block_on(async {
            connect_unix(&socket)
                .await?
                .list_state(pb::ListStateRequest {})
                .await
                .map_err(anyhow::Error::from)
        })
        .expect("ListState")
        .into_inner();
    assert_eq!(state.endpoints.len(), 1, "{:?}", state.endpoints);
    assert_eq!(
        state.endpoints[0].placement,
        pb::EndpointPlacement::SourceWorkload as i32,
        "placed on the config's db workload"
    );

    // A restarted agent keeps the registration (and the enforcement) from its state dir.
    let pins = agent.pins();
    agent.stop().expect("agent stops");
    let agent = AgentProcess::start_pinned(&topology.node, file.path(), &interfaces, &args, pins)
        .expect("agent restarts");
    assert!(
        !connects(topology.ns("other"), target),
        "still enforced after the restart"
    );

    rt.block_on(async {
        connect_unix(&socket)
            .await?
            .release_endpoint(pb::ReleaseEndpointRequest {
                container_id: "c0ffee-db".into(),
                interface_name: "eth0".into(),
            })
            .await
            .map_err(anyhow::Error::from)
    })
    .expect("ReleaseEndpoint");
    assert!(
        other_reaches_db_becomes(&topology, target, true),
        "released: db's veth no longer enforced"
    );
    agent.stop().expect("agent stops");
}
