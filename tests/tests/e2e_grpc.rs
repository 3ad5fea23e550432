//! The gRPC API of a real `lb-agent run --grpc-socket` process in the balancer namespace: a client in
//! the test upserts a service, sets backends and weights, and deletes it, and the connections the
//! client namespace opens to the VIP follow — counted by the backends themselves. A service in the
//! config file shadows the API's service with the same VIP, port and protocol (file first), and
//! the API's shadows a Kubernetes Service's (from a fake API server).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::Path,
    time::{Duration, Instant},
};

use lb_agent::grpc::pb::{self, load_balancer_client::LoadBalancerClient};
use lb_tests::{
    agent::{lbctl_binary, AgentProcess},
    grpc_client::connect_unix,
    netns::TEST_PREFIX,
    procs::run_bounded,
    servers::{tcp_connect, tcp_requests, tcp_servers_on_backends, TcpCountingServer},
    topology::{Topology, VIP},
};
use tokio::runtime::Runtime;
use tonic::transport::Channel;

const PORT: u16 = 8080;

fn write_config(dir: &Path, yaml: &str) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    let tmp = dir.join("config.yaml.tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn backend(topology: &Topology, i: usize, weight: u32) -> pb::Backend {
    pb::Backend {
        address: topology.backends[i - 1].addr.to_string(),
        port: PORT.into(),
        weight: Some(weight),
    }
}

fn key() -> pb::ServiceKey {
    pb::ServiceKey {
        vip: VIP.to_string(),
        port: 80,
        protocol: pb::Protocol::Tcp as i32,
    }
}

/// Connections each backend accepted, by name (`backend-<i>`), as the servers count them.
fn accepted(servers: &[TcpCountingServer]) -> BTreeMap<String, u64> {
    servers
        .iter()
        .map(|s| (s.name.clone(), s.connections()))
        .collect()
}

/// Opens `n` connections to the VIP; returns how many each backend accepted meanwhile (by its own
/// count), after checking that every connection succeeded and that the greetings agree.
fn traffic(topology: &Topology, servers: &[TcpCountingServer], n: usize) -> BTreeMap<String, u64> {
    let before = accepted(servers);
    let mut greeted: BTreeMap<String, u64> = BTreeMap::new();
    for result in tcp_requests(&topology.client, SocketAddr::from((VIP, 80)), n, b"x") {
        *greeted
            .entry(result.expect("a connection through the VIP"))
            .or_default() += 1;
    }
    let counted: BTreeMap<String, u64> = accepted(servers)
        .into_iter()
        .map(|(name, now)| (name.clone(), now - before[&name]))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(
        counted, greeted,
        "the backends' counts and the greetings differ"
    );
    counted
}

/// `traffic` of `n` connections, checked to have reached exactly the backends `names` (sorted).
fn traffic_reaching(
    topology: &Topology,
    servers: &[TcpCountingServer],
    n: usize,
    names: &[&str],
) -> BTreeMap<String, u64> {
    let counted = traffic(topology, servers, n);
    assert_eq!(
        counted.keys().cloned().collect::<Vec<_>>(),
        names,
        "{counted:?}"
    );
    counted
}

/// `lbctl service add web` (through `ok`, which runs lbctl and asserts success) over backends 1
/// and 2 with the `extra` options: created, and the connections that follow reach both.
fn lbctl_adds_web_over_two_backends(
    ok: impl Fn(&[&str]) -> String,
    topology: &Topology,
    servers: &[TcpCountingServer],
    agent: &mut AgentProcess,
    extra: &[&str],
) {
    let b = |i: usize| format!("{}:{PORT}", topology.backends[i - 1].addr);
    let vip = format!("{VIP}:80/tcp");
    let mut args = vec!["service", "add", "web", &vip];
    let (b1, b2) = (b(1), b(2));
    args.extend([b1.as_str(), b2.as_str()]);
    args.extend(extra);
    let added = ok(&args);
    assert_eq!(added.trim(), format!("service {vip} (web) created"));
    until_lands_on(topology, "backend-1", agent);
    traffic_reaching(topology, servers, 60, &["backend-1", "backend-2"]);
}

/// Polls single connections until one lands on `name`; returns how long that took.
fn until_lands_on(topology: &Topology, name: &str, agent: &mut AgentProcess) -> Duration {
    let started = Instant::now();
    loop {
        let result = tcp_requests(&topology.client, SocketAddr::from((VIP, 80)), 1, b"x")
            .pop()
            .unwrap();
        if result.as_deref().ok() == Some(name) {
            return started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(10) {
            while let Ok(line) = agent.log.try_recv() {
                eprintln!("agent: {line}");
            }
            panic!("no connection reached {name} within 10 s (last: {result:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`until_lands_on`], then says how long after `since` (when `what` was asked for) that was.
fn until_lands_on_since(
    topology: &Topology,
    name: &str,
    agent: &mut AgentProcess,
    (what, since): (&str, Instant),
) {
    until_lands_on(topology, name, agent);
    eprintln!(
        "{what} balanced after {:.0} ms",
        since.elapsed().as_secs_f64() * 1000.0
    );
}

/// Polls single connections until the VIP no longer answers (`after`: what removed it).
/// Unbalanced SYNs to the VIP go unanswered: each attempt waits for its 3 s timeout.
fn until_unbalanced(topology: &Topology, after: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tcp_requests(&topology.client, SocketAddr::from((VIP, 80)), 1, b"x")[0].is_ok() {
        assert!(
            Instant::now() < deadline,
            "the VIP is still balanced 10 s after {after}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `command` (`lbctl` and its options) with `args`: whether it succeeded, its stdout and
/// stderr.
fn run_lbctl(mut command: std::process::Command, args: &[&str]) -> (bool, String, String) {
    let out = command
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap_or_else(|e| panic!("running lbctl {args:?}: {e}"));
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

fn call<T>(
    rt: &Runtime,
    what: &str,
    future: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> T {
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), future).await })
        .unwrap_or_else(|_| panic!("{what}: timed out"))
        .unwrap_or_else(|status| panic!("{what}: {status:?}"))
        .into_inner()
}

fn set_backends(
    rt: &Runtime,
    client: &mut LoadBalancerClient<Channel>,
    backends: Vec<pb::Backend>,
) {
    let response = call(
        rt,
        "SetBackends",
        client.set_backends(pb::SetBackendsRequest {
            key: Some(key()),
            backends,
        }),
    );
    assert!(response.changed);
}

/// Three backends with counting servers, and the agent with no service and its API on a socket
/// at `socket` (relative to the test's directory, which holds its config file).
struct Setup {
    topology: Topology,
    servers: Vec<TcpCountingServer>,
    dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    agent: AgentProcess,
}

fn setup(socket: &str, extra_args: &[&str]) -> Setup {
    let topology = Topology::new(TEST_PREFIX, 3).expect("topology");
    let servers = tcp_servers_on_backends(&topology, PORT);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "services: []\n");
    let socket = dir.path().join(socket);
    let agent = AgentProcess::start_with(
        &topology.balancer,
        &config,
        &topology.balancer_interfaces(),
        &[&["--grpc-socket", socket.to_str().unwrap()], extra_args].concat(),
    )
    .expect("agent starts");
    Setup {
        topology,
        servers,
        dir,
        socket,
        agent,
    }
}

#[test]
fn grpc_client_drives_real_traffic_through_the_agent() {
    let Setup {
        topology,
        servers,
        dir,
        socket,
        mut agent,
    } = setup("run/api.sock", &[]);
    let meta = std::fs::symlink_metadata(&socket).expect("the agent's socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut client = rt.block_on(connect_unix(&socket)).expect("client");
    let mut events = call(
        &rt,
        "StreamEvents",
        client.stream_events(pb::StreamEventsRequest {}),
    );

    // No service yet: the VIP answers nobody.
    assert!(
        tcp_requests(&topology.client, SocketAddr::from((VIP, 80)), 1, b"x")[0].is_err(),
        "the VIP answered before any service existed"
    );

    // Upsert: backends 1 and 2.
    let service = pb::Service {
        name: "web".into(),
        vip: VIP.to_string(),
        port: 80,
        protocol: pb::Protocol::Tcp as i32,
        maglev_table_size: Some(1021),
        backends: vec![backend(&topology, 1, 1), backend(&topology, 2, 1)],
        ..Default::default()
    };
    let upserted = Instant::now();
    let response = call(
        &rt,
        "UpsertService",
        client.upsert_service(pb::UpsertServiceRequest {
            service: Some(service),
        }),
    );
    assert!(response.created);
    until_lands_on_since(
        &topology,
        "backend-1",
        &mut agent,
        ("upserted service", upserted),
    );
    traffic_reaching(&topology, &servers, 60, &["backend-1", "backend-2"]);

    // The agent reports the change and the reconcile on the event stream.
    let mut kinds = Vec::new();
    while !kinds.contains(&pb::EventKind::Reconciled) {
        let event = rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(5), events.message()).await
            })
            .expect("an event within 5 s")
            .expect("event stream")
            .expect("stream open");
        kinds.push(event.kind());
    }
    assert!(kinds.contains(&pb::EventKind::ServiceChanged), "{kinds:?}");

    // SetBackends: backend 2 out, backend 3 in, backend 1 with three times its weight.
    let set = Instant::now();
    set_backends(
        &rt,
        &mut client,
        vec![backend(&topology, 1, 3), backend(&topology, 3, 1)],
    );
    until_lands_on_since(&topology, "backend-3", &mut agent, ("new backend set", set));
    let weighted = traffic_reaching(&topology, &servers, 400, &["backend-1", "backend-3"]);
    let share = weighted["backend-1"] as f64 / 400.0;
    assert!(
        (0.65..=0.85).contains(&share),
        "weights 3:1 gave backend-1 {share:.2} of new connections: {weighted:?}"
    );

    // Weight 0 drains backend 1: every new connection goes to backend 3.
    set_backends(
        &rt,
        &mut client,
        vec![backend(&topology, 1, 0), backend(&topology, 3, 1)],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while traffic(&topology, &servers, 20).contains_key("backend-1") {
        assert!(Instant::now() < deadline, "backend-1 was not drained");
        std::thread::sleep(Duration::from_millis(50));
    }
    traffic_reaching(&topology, &servers, 60, &["backend-3"]);

    // ListState: the API's service as set, and the same in what the agent applied.
    let state = call(&rt, "ListState", client.list_state(pb::ListStateRequest {}));
    assert_eq!(state.services.len(), 1);
    let listed = &state.services[0];
    assert_eq!(
        (listed.name.as_str(), listed.vip.as_str()),
        ("web", "198.51.100.10")
    );
    let weights: Vec<(String, Option<u32>)> = listed
        .backends
        .iter()
        .map(|b| (b.address.clone(), b.weight))
        .collect();
    let b1 = topology.backends[0].addr.to_string();
    let b3 = topology.backends[2].addr.to_string();
    assert_eq!(weights, [(b1, Some(0)), (b3, Some(1))]);
    let applied = state.applied.expect("applied state");
    assert_eq!(applied.services, state.services);

    // The config file defines the same VIP, port and protocol: the file wins (backend 2).
    write_config(
        dir.path(),
        &format!(
            "services:\n  - {{ name: file-web, vip: {VIP}, port: 80, protocol: tcp, \
             backends: [{{ address: {}, port: {PORT} }}] }}\n",
            topology.backends[1].addr
        ),
    );
    until_lands_on(&topology, "backend-2", &mut agent);
    agent
        .wait_for_log("shadowed by the config file", Duration::from_secs(5))
        .expect("conflict reported");
    traffic_reaching(&topology, &servers, 30, &["backend-2"]);
    // Without it, the API's service is back.
    write_config(dir.path(), "services: []\n");
    until_lands_on(&topology, "backend-3", &mut agent);

    // Delete: the VIP is no longer balanced, no backend gets a connection.
    call(
        &rt,
        "DeleteService",
        client.delete_service(pb::DeleteServiceRequest { key: Some(key()) }),
    );
    until_unbalanced(&topology, "DeleteService");
    let before = accepted(&servers);
    let results = tcp_requests(&topology.client, SocketAddr::from((VIP, 80)), 2, b"x");
    assert!(results.iter().all(|r| r.is_err()), "{results:?}");
    assert_eq!(
        accepted(&servers),
        before,
        "a backend accepted a connection"
    );
    let state = call(&rt, "ListState", client.list_state(pb::ListStateRequest {}));
    assert!(state.services.is_empty());
    assert!(state.applied.expect("applied").services.is_empty());

    let (code, _) = agent.stop().expect("agent stops");
    assert_eq!(code, 0);
    assert!(!socket.exists(), "the socket is removed on exit");
}

/// The agent with both a Kubernetes source (the fake API server, serving in the balancer
/// namespace) and the gRPC API: the Kubernetes Service is balanced; a gRPC service with the same
/// VIP, port and protocol shadows it (gRPC before Kubernetes) until deleted; the Kubernetes
/// Namespaces and Pods are in the policy the agent applied, as `ListState` reports it.
#[test]
fn grpc_shadows_kubernetes_and_the_applied_state_holds_kubernetes_policy() {
    use k8s_openapi::api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    };
    use lb_tests::fake_apiserver::FakeApiServer;

    let topology = Topology::new(TEST_PREFIX, 2).expect("topology");
    let servers: Vec<TcpCountingServer> = tcp_servers_on_backends(&topology, PORT);
    // Bound in the balancer namespace: the agent reaches it on its own loopback.
    let api = topology
        .balancer
        .run(FakeApiServer::start)
        .expect("fake API server");
    let service: Service = serde_json::from_value(serde_json::json!({
        "metadata": { "namespace": "default", "name": "web" },
        "spec": { "type": "ClusterIP", "clusterIP": VIP.to_string(), "clusterIPs": [VIP.to_string()],
                  "ports": [{ "name": "http", "port": 80, "protocol": "TCP", "targetPort": PORT }] },
    }))
    .unwrap();
    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": { "namespace": "default", "name": "web-1",
                      "labels": { "kubernetes.io/service-name": "web" } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": PORT, "protocol": "TCP" }],
        "endpoints": [{ "addresses": [topology.backends[0].addr.to_string()],
                        "conditions": { "ready": true } }],
    }))
    .unwrap();
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "default", "labels": { "team": "web" } },
    }))
    .unwrap();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "namespace": "default", "name": "web-0", "labels": { "app": "web" } },
        "status": { "phase": "Running", "podIPs": [{ "ip": topology.backends[0].addr.to_string() }] },
    }))
    .unwrap();
    api.apply(&service);
    api.apply(&slice);
    api.apply(&namespace);
    api.apply(&pod);

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "services: []\n");
    let socket = dir.path().join("api.sock");
    let mut agent = AgentProcess::start_with(
        &topology.balancer,
        &config,
        &topology.balancer_interfaces(),
        &[
            "--grpc-socket",
            socket.to_str().unwrap(),
            "--kube-api-url",
            &api.url(),
        ],
    )
    .expect("agent starts");
    until_lands_on(&topology, "backend-1", &mut agent);
    traffic_reaching(&topology, &servers, 30, &["backend-1"]);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut client = rt.block_on(connect_unix(&socket)).expect("client");
    // The applied policy holds the Kubernetes namespace and pod.
    let state = call(&rt, "ListState", client.list_state(pb::ListStateRequest {}));
    let applied = state.applied.expect("applied");
    assert_eq!(applied.services.len(), 1);
    let policy: lb_agent::policy::PolicyConfig =
        serde_yaml_ng::from_str(&applied.policy_yaml).expect("applied policy YAML");
    assert_eq!(
        policy
            .workloads
            .iter()
            .map(|w| (
                w.namespace.as_str(),
                w.name.as_str(),
                w.labels["app"].as_str()
            ))
            .collect::<Vec<_>>(),
        [("default", "web-0", "web")]
    );
    assert_eq!(policy.namespaces[0].labels["team"], "web");

    // gRPC defines the same VIP, port and protocol: it wins over Kubernetes.
    let response = call(
        &rt,
        "UpsertService",
        client.upsert_service(pb::UpsertServiceRequest {
            service: Some(pb::Service {
                name: "grpc-web".into(),
                vip: VIP.to_string(),
                port: 80,
                protocol: pb::Protocol::Tcp as i32,
                backends: vec![backend(&topology, 2, 1)],
                ..Default::default()
            }),
        }),
    );
    assert!(response.created);
    until_lands_on(&topology, "backend-2", &mut agent);
    agent
        .wait_for_log("shadowed by the gRPC API", Duration::from_secs(5))
        .expect("conflict reported");
    traffic_reaching(&topology, &servers, 30, &["backend-2"]);

    // Deleted through the API: Kubernetes' service is balanced again.
    call(
        &rt,
        "DeleteService",
        client.delete_service(pb::DeleteServiceRequest { key: Some(key()) }),
    );
    until_lands_on(&topology, "backend-1", &mut agent);
    traffic_reaching(&topology, &servers, 30, &["backend-1"]);
}

/// `--grpc-tcp` with TLS: the agent's API on TCP in the balancer namespace; a client with a
/// certificate of the CA drives a service that real traffic then follows; one without is refused.
/// The TCP flags go together.
#[test]
fn grpc_over_tcp_with_tls_requires_client_certificates() {
    use lb_tests::grpc_client::{make_certificates, tls_endpoint};

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "services: []\n");
    let certs = make_certificates(dir.path());
    let cert = |name: &str| certs.join(name).to_str().unwrap().to_string();

    // --grpc-tcp alone is refused before anything starts.
    let output = std::process::Command::new(lb_tests::agent::agent_binary())
        .args([
            "run",
            "--iface",
            "lo",
            "--grpc-tcp",
            "127.0.0.1:50051",
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--grpc-tls-cert"), "{stderr}");

    let topology = Topology::new(TEST_PREFIX, 1).expect("topology");
    let _server = TcpCountingServer::start(
        &topology.backends[0].ns,
        topology.backends[0].addr,
        PORT,
        "backend-1",
    );
    let addr: SocketAddr = "127.0.0.1:50051".parse().unwrap();
    let mut agent = AgentProcess::start_with(
        &topology.balancer,
        &config,
        &topology.balancer_interfaces(),
        &[
            "--grpc-tcp",
            &addr.to_string(),
            "--grpc-tls-cert",
            &cert("server.pem"),
            "--grpc-tls-key",
            &cert("server.key"),
            "--grpc-tls-client-ca",
            &cert("ca.pem"),
        ],
    )
    .expect("agent starts");

    // Clients in the balancer namespace, where the agent listens.
    let service = pb::Service {
        name: "web".into(),
        vip: VIP.to_string(),
        port: 80,
        protocol: pb::Protocol::Tcp as i32,
        backends: vec![backend(&topology, 1, 1)],
        ..Default::default()
    };
    let (with_certificate, without) = topology.balancer.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let call = |with_identity: bool, service: pb::Service| {
                let certs = certs.clone();
                async move {
                    let channel = tls_endpoint(addr, &certs, with_identity).connect().await?;
                    LoadBalancerClient::new(channel)
                        .upsert_service(pb::UpsertServiceRequest {
                            service: Some(service),
                        })
                        .await
                        .map(|r| r.into_inner().created)
                        .map_err(anyhow::Error::from)
                }
            };
            let with = call(true, service.clone())
                .await
                .map_err(|e| format!("{e:#}"));
            let mut other = service;
            other.port = 81;
            let without = call(false, other).await.map_err(|e| format!("{e:?}"));
            (with, without)
        })
    });
    assert_eq!(with_certificate, Ok(true));
    let refused = without.expect_err("a client without a certificate was served");
    // TLS 1.3: the server checks the client's certificate after the client has finished its
    // handshake and may already be writing the request, so the refusal reaches the client either as
    // the server's CertificateRequired alert or as the connection it closed under the request
    // (a write that fails, a reset, or hyper's "connection closed" for a request in flight).
    assert!(
        [
            "CertificateRequired",
            "BrokenPipe",
            "ConnectionReset",
            "connection closed",
        ]
        .iter()
        .any(|refusal| refused.contains(refusal)),
        "{refused}"
    );
    until_lands_on(&topology, "backend-1", &mut agent);
    let (code, _) = agent.stop().expect("agent stops");
    assert_eq!(code, 0);
}

/// `lbctl`'s commands that change state, run as a user would against a real agent's socket: the
/// service it adds is balanced (counted by the backends), a backend it drains gets no new
/// connection, a request the agent refuses names the field and changes nothing, a config-file
/// `services:` list replaces the service, the API's policy is set, shown and cleared, and a delete
/// stops the balancing.
#[test]
fn lbctl_changes_services_through_the_agent() {
    let Setup {
        topology,
        servers,
        dir,
        socket,
        mut agent,
    } = setup("api.sock", &["--flow-events"]);
    let lbctl = |args: &[&str]| {
        let mut command = std::process::Command::new(lbctl_binary());
        command.arg("--socket").arg(&socket);
        run_lbctl(command, args)
    };
    let ok = |args: &[&str]| -> String {
        let (success, stdout, stderr) = lbctl(args);
        assert!(success, "lbctl {args:?}: {stdout}{stderr}");
        stdout
    };
    let b = |i: usize| format!("{}:{PORT}", topology.backends[i - 1].addr);
    let vip = format!("{VIP}:80/tcp");

    lbctl_adds_web_over_two_backends(
        ok,
        &topology,
        &servers,
        &mut agent,
        &["--table-size", "1021"],
    );

    // Flow events (the agent runs with --flow-events): each connection's event names the backend
    // that greeted it, its client address and port, the service and the mode.
    flow_events_name_the_backends_of_connections(&topology, &socket, 3);

    // Drain backend 1: new connections all go to backend 2.
    let drained = ok(&["backend", "weight", &vip, &b(1), "0"]);
    assert!(drained.contains("draining"), "{drained}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while traffic(&topology, &servers, 20).contains_key("backend-1") {
        assert!(Instant::now() < deadline, "backend-1 was not drained");
        std::thread::sleep(Duration::from_millis(50));
    }
    traffic_reaching(&topology, &servers, 40, &["backend-2"]);
    let state = ok(&["state"]);
    assert!(
        state.contains(&format!(
            "{vip} web mode=dnat backends: {}=0 {}=1",
            b(1),
            b(2)
        )),
        "{state}"
    );

    // Refused by the agent (an IPv6 backend for an IPv4 VIP), or unknown to the API: an error
    // that says why, and nothing changes.
    let (success, _, stderr) = lbctl(&["service", "add", "bad", &vip, "[2001:db8::1]:80"]);
    assert!(!success);
    assert!(
        stderr.contains("refused") && stderr.contains("backends[0]"),
        "{stderr}"
    );
    let (success, _, stderr) = lbctl(&["backend", "weight", "198.51.100.99:80/tcp", &b(1), "1"]);
    assert!(!success);
    assert!(stderr.contains("not defined through the API"), "{stderr}");
    let (success, _, stderr) = lbctl(&["service", "delete", "198.51.100.10:80"]);
    assert!(!success);
    assert!(stderr.contains("VIP:PORT/PROTOCOL"), "{stderr}");
    assert_eq!(
        traffic(&topology, &servers, 20)
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        ["backend-2"],
        "refused requests changed nothing"
    );

    // A config-file `services:` list replaces the service: backend 3 alone.
    let file = dir.path().join("web.yaml");
    std::fs::write(
        &file,
        format!(
            "services:\n  - {{ name: web, vip: {VIP}, port: 80, protocol: tcp, \
             maglev_table_size: 1021, backends: [{{ address: {}, port: {PORT} }}] }}\n",
            topology.backends[2].addr
        ),
    )
    .unwrap();
    let upserted = ok(&["service", "upsert", file.to_str().unwrap()]);
    assert_eq!(upserted.trim(), format!("service {vip} (web) replaced"));
    until_lands_on(&topology, "backend-3", &mut agent);
    traffic_reaching(&topology, &servers, 20, &["backend-3"]);
    // Backend 2 served connections within the last seconds, whose conntrack entries live (10 s
    // after their FIN): no service names it, but it is retired rather than removed, and both the
    // agent's state and the pinned maps say so.
    let state = ok(&["state"]);
    let retired = state
        .lines()
        .find(|l| l.starts_with("retired"))
        .unwrap_or_else(|| panic!("no retired backends in: {state}"));
    assert!(
        retired.contains(&b(2)) && !retired.contains(&b(3)),
        "{state}"
    );
    let pins = agent.pins();
    let listed = ok(&["--bpffs-dir", pins.path().to_str().unwrap(), "backends"]);
    let line = |backend: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(&format!("{backend} ")))
            .unwrap_or_else(|| panic!("{backend} not listed: {listed}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    let backend2 = line(&b(2));
    assert_eq!(backend2[3..6], ["retired", "services", "0"], "{listed}");
    assert_ne!(backend2[7], "0", "its flows keep it: {listed}");
    assert_eq!(line(&b(3))[3..6], ["active", "services", "1"], "{listed}");

    // The API's policy: set from a file, shown back, refused when invalid (the agent names the
    // field, the policy stays), cleared.
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "namespaces: [{name: prod}]\n").unwrap();
    assert_eq!(
        ok(&["policy", "set", policy.to_str().unwrap()]).trim(),
        "policy set"
    );
    std::fs::write(&policy, "namespaces: [{name: prod}, {name: prod}]\n").unwrap();
    let (success, _, stderr) = lbctl(&["policy", "set", policy.to_str().unwrap()]);
    assert!(!success);
    assert!(
        stderr.contains("policy.namespaces[1]: duplicate of policy.namespaces[0]"),
        "{stderr}"
    );
    assert!(ok(&["policy", "show"]).contains("prod"));
    assert_eq!(ok(&["policy", "clear"]).trim(), "policy cleared");
    assert_eq!(ok(&["policy", "show"]).trim(), "");

    // Delete: the VIP is no longer balanced.
    assert_eq!(
        ok(&["service", "delete", &vip]).trim(),
        format!("service {vip} deleted")
    );
    until_unbalanced(&topology, "lbctl service delete");
    assert!(ok(&["state"]).contains("0 services"));
}

/// Runs `lbctl events --count n` on the agent's `socket` while connections to the VIP are opened
/// one at a time (lbctl only sees the events published after it subscribed), then checks that
/// each event it printed is the new flow of one of those connections and names the backend that
/// greeted it (by its address) with the client address and port the connection used.
fn flow_events_name_the_backends_of_connections(topology: &Topology, socket: &Path, n: usize) {
    let mut command = std::process::Command::new(lbctl_binary());
    command.arg("--socket").arg(socket);
    command.args(["events", "--count", &n.to_string()]);
    let events = std::thread::spawn(move || run_bounded(command, Duration::from_secs(30)));
    let mut connections = BTreeMap::new();
    while !events.is_finished() && connections.len() < 200 {
        let (stream, greeting) = tcp_connect(&topology.client, SocketAddr::from((VIP, 80)))
            .expect("a connection through the VIP");
        connections.insert(stream.local_addr().unwrap(), greeting);
        std::thread::sleep(Duration::from_millis(100));
    }
    let done = events
        .join()
        .unwrap()
        .expect("lbctl events --count finishes");
    assert!(done.status.success(), "{}", done.stderr);
    let lines: Vec<&str> = done.stdout.lines().collect();
    assert_eq!(lines.len(), n, "{}", done.stdout);
    for line in lines {
        let (client, greeting) = connections
            .iter()
            .find(|(client, _)| line.contains(&format!(" flow new flow tcp {client} -> ")))
            .unwrap_or_else(|| panic!("not the event of a connection opened here: {line}"));
        let i: usize = greeting.trim_start_matches("backend-").parse().unwrap();
        let backend = topology.backends[i - 1].addr;
        assert!(
            line.ends_with(&format!(
                "tcp {client} -> {VIP}:80 service web (id 0) backend {backend}:{PORT} (id {i}) \
                 dnat choice new"
            )),
            "{greeting} greeted {client}: {line}"
        );
    }
}

/// `lbctl` from another machine: in the client namespace, over the wire to the agent's TCP
/// listener on the balancer's client-side address, with mutual TLS. The agent's certificate names
/// `localhost`, so `--tls-server-name` says which name to expect. A service it adds is balanced
/// (counted by the backends) and listed by `state`; a client certificate of another CA, a CA that
/// did not sign the agent's certificate, the wrong server name, a missing file and the commands
/// that read the local maps are refused with a message saying why, and change nothing; a delete
/// stops the balancing.
#[test]
fn lbctl_changes_services_from_another_machine_over_mutual_tls() {
    use lb_tests::{grpc_client::make_certificates, topology::BALANCER_CLIENT_SIDE_ADDR};

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "services: []\n");
    let certificates = |name: &str| {
        let path = dir.path().join(name);
        std::fs::create_dir(&path).unwrap();
        make_certificates(&path)
    };
    let ours = certificates("ours");
    let other = certificates("other");
    let file = |certs: &Path, name: &str| certs.join(name).to_str().unwrap().to_string();

    let topology = Topology::new(TEST_PREFIX, 2).expect("topology");
    let servers = tcp_servers_on_backends(&topology, PORT);
    let listen = SocketAddr::from((BALANCER_CLIENT_SIDE_ADDR, 50051));
    let mut agent = AgentProcess::start_with(
        &topology.balancer,
        &config,
        &topology.balancer_interfaces(),
        &[
            "--grpc-tcp",
            &listen.to_string(),
            "--grpc-tls-cert",
            &file(&ours, "server.pem"),
            "--grpc-tls-key",
            &file(&ours, "server.key"),
            "--grpc-tls-client-ca",
            &file(&ours, "ca.pem"),
        ],
    )
    .expect("agent starts");

    let endpoint = format!("https://{listen}");
    // lbctl in the client namespace, with `tls`: its TLS options.
    let lbctl = |tls: &[String], args: &[&str]| {
        let mut command = topology.client.command(lbctl_binary().to_str().unwrap());
        command.args(["--endpoint", &endpoint]).args(tls);
        run_lbctl(command, args)
    };
    let tls = |cert: &str, key: &str, ca: &str, server_name: Option<&str>| -> Vec<String> {
        let mut options = vec![];
        for (option, value) in [
            ("--tls-cert", Some(cert)),
            ("--tls-key", Some(key)),
            ("--tls-ca", Some(ca)),
            ("--tls-server-name", server_name),
        ] {
            if let Some(value) = value {
                options.extend([option.to_string(), value.to_string()]);
            }
        }
        options
    };
    let (cert, key, ca) = (
        file(&ours, "client.pem"),
        file(&ours, "client.key"),
        file(&ours, "ca.pem"),
    );
    let good = tls(&cert, &key, &ca, Some("localhost"));
    let ok = |args: &[&str]| -> String {
        let (success, stdout, stderr) = lbctl(&good, args);
        assert!(success, "lbctl {args:?}: {stdout}{stderr}");
        stdout
    };
    let b = |i: usize| format!("{}:{PORT}", topology.backends[i - 1].addr);
    let vip = format!("{VIP}:80/tcp");

    lbctl_adds_web_over_two_backends(ok, &topology, &servers, &mut agent, &[]);
    let state = ok(&["state"]);
    assert!(
        state.contains(&format!(
            "{vip} web mode=dnat backends: {}=1 {}=1",
            b(1),
            b(2)
        )),
        "{state}"
    );

    // Refused, each with a message saying why; none of them deletes the service.
    let (other_cert, other_key, other_ca) = (
        file(&other, "client.pem"),
        file(&other, "client.key"),
        file(&other, "ca.pem"),
    );
    let missing = file(dir.path(), "missing.pem");
    let refusals: [(&str, Vec<String>, &[&str]); 5] = [
        // A client certificate the agent's CA did not sign: the agent refuses it (the other CA
        // has the same name as ours, so its signature is what fails).
        (
            "client certificate of another CA",
            tls(&other_cert, &other_key, &ca, Some("localhost")),
            &[
                "refused the client certificate (--tls-cert)",
                "--grpc-tls-client-ca",
            ],
        ),
        // A CA that did not sign the agent's certificate: lbctl refuses the agent.
        (
            "CA that did not sign the agent's certificate",
            tls(&cert, &key, &other_ca, Some("localhost")),
            &[
                "certificate this client does not accept",
                "invalid peer certificate",
            ],
        ),
        // By address, while the agent's certificate names localhost and 127.0.0.1 only.
        (
            "no server name",
            tls(&cert, &key, &ca, None),
            &[
                "certificate this client does not accept",
                "not valid for name",
            ],
        ),
        (
            "missing file",
            tls(&missing, &key, &ca, Some("localhost")),
            &["reading the client certificate", "missing.pem"],
        ),
        // Without a client certificate: not even tried.
        (
            "no client certificate",
            vec!["--tls-ca".into(), ca.clone()],
            &["required arguments were not provided", "--tls-cert"],
        ),
    ];
    for (what, tls, says) in refusals {
        let (success, stdout, stderr) = lbctl(&tls, &["service", "delete", &vip]);
        assert!(!success, "{what}: lbctl succeeded: {stdout}");
        assert!(
            says.iter().all(|s| stderr.contains(s)),
            "{what}: expected {says:?} in: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    }
    let (success, _, stderr) = lbctl(&good, &["flows"]);
    assert!(!success);
    assert!(
        stderr.contains("`lbctl flows` reads the datapath's pinned maps on this node"),
        "{stderr}"
    );
    assert_eq!(
        traffic(&topology, &servers, 20).values().sum::<u64>(),
        20,
        "the refused deletes left the service in place"
    );

    assert_eq!(
        ok(&["service", "delete", &vip]).trim(),
        format!("service {vip} deleted")
    );
    until_unbalanced(&topology, "lbctl service delete over TLS");
    let (code, _) = agent.stop().expect("agent stops");
    assert_eq!(code, 0);
}
