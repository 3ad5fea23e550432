//! The gRPC API end to end: a tonic client over the agent's unix socket (mode 0600) drives
//! services, backends, weights and policy through `lb.v1.LoadBalancer`; invalid requests are
//! refused with the field named and change nothing; `ListState` and `StreamEvents` report; and the
//! services the `GrpcSource` publishes — the same model the YAML file gives — program the real
//! datapath's Maglev tables (needs root). The last test serves TCP with TLS and client
//! certificates (made with the `openssl` command).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::Path,
    time::Duration,
};

use lb_agent::{
    config::{Config, Protocol},
    datapath::Datapath,
    grpc::{
        self,
        pb::{self, load_balancer_client::LoadBalancerClient},
        AppliedView, Event, EventBus, EventKind, GrpcSource, TlsConfig,
    },
};
use lb_common::service::ServiceKey;
use tokio::sync::watch;
use tonic::{transport::Channel, Code};

/// Bound of every wait.
const WAIT: Duration = Duration::from_secs(5);

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

async fn connect_unix(path: &Path) -> LoadBalancerClient<Channel> {
    lb_tests::grpc_client::connect_unix(path)
        .await
        .expect("connecting over the unix socket")
}

fn backend(address: &str, port: u32, weight: Option<u32>) -> pb::Backend {
    pb::Backend {
        address: address.into(),
        port,
        weight,
    }
}

fn service(name: &str, vip: &str, port: u32, backends: Vec<pb::Backend>) -> pb::Service {
    pb::Service {
        name: name.into(),
        vip: vip.into(),
        port,
        protocol: pb::Protocol::Tcp as i32,
        backends,
        ..Default::default()
    }
}

fn key(vip: &str, port: u32, protocol: pb::Protocol) -> pb::ServiceKey {
    pb::ServiceKey {
        vip: vip.into(),
        port,
        protocol: protocol as i32,
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// Backend → number of slots in a service's live Maglev table.
fn slots(datapath: &Datapath, key: &ServiceKey) -> Option<BTreeMap<(IpAddr, u16), usize>> {
    datapath.table_of(key).map(|table| {
        let mut counts = BTreeMap::new();
        for backend in table {
            *counts.entry(backend).or_default() += 1;
        }
        counts
    })
}

/// The invalid request `call` is refused with INVALID_ARGUMENT and `message`, and the published
/// services do not change.
async fn assert_refused<T: std::fmt::Debug>(
    what: &str,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    message: &str,
    source: &GrpcSource,
    updates: &watch::Receiver<Vec<lb_agent::config::Service>>,
) {
    let before = source.services();
    let status = within(what, call).await.expect_err(what);
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    assert_eq!(status.message(), message, "{what}");
    assert_eq!(source.services(), before, "{what} changed the services");
    assert!(
        !updates.has_changed().unwrap(),
        "{what} published an update"
    );
}

#[tokio::test]
async fn grpc_client_drives_services_policy_events_and_datapath_maps() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/lb/api.sock");
    let source = GrpcSource::new();
    let events = EventBus::default();
    let (applied_tx, applied_rx) = watch::channel(AppliedView::default());
    let server = grpc::serve_unix(&socket, source.clone(), events.clone(), Some(applied_rx))
        .expect("serve the API on a unix socket");

    // The socket: a socket file, mode 0600, owned by us (root).
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(meta.uid(), std::fs::metadata(dir.path()).unwrap().uid());

    let mut client = connect_unix(&socket).await;
    let mut updates = source.subscribe();

    // Two services, IPv4 and IPv6.
    let response = within(
        "upsert web4",
        client.upsert_service(pb::UpsertServiceRequest {
            service: Some(service(
                "web4",
                "198.51.100.10",
                80,
                vec![backend("203.0.113.11", 8080, None)],
            )),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(response.created && response.changed);
    let mut web6 = service(
        "web6",
        "2001:db8:100::10",
        443,
        vec![backend("2001:db8:203::11", 8443, Some(1))],
    );
    web6.maglev_table_size = Some(251);
    web6.health_check = Some(pb::HealthCheck {
        kind: pb::HealthCheckKind::Tcp as i32,
        interval_ms: Some(500),
        ..Default::default()
    });
    within(
        "upsert web6",
        client.upsert_service(pb::UpsertServiceRequest {
            service: Some(web6.clone()),
        }),
    )
    .await
    .unwrap();
    // The same definition again changes nothing.
    let again = within(
        "upsert web6 again",
        client.upsert_service(pb::UpsertServiceRequest {
            service: Some(web6),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(!again.created && !again.changed);

    // Backends and weights: .11 three times .12's share, .13 draining (weight 0).
    let set = within(
        "set web4 backends",
        client.set_backends(pb::SetBackendsRequest {
            key: Some(key("198.51.100.10", 80, pb::Protocol::Tcp)),
            backends: vec![
                backend("203.0.113.11", 8080, Some(3)),
                backend("203.0.113.12", 8080, Some(1)),
                backend("203.0.113.13", 8080, Some(0)),
            ],
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(set.changed);
    within(
        "set web6 backends",
        client.set_backends(pb::SetBackendsRequest {
            key: Some(key("2001:db8:100::10", 443, pb::Protocol::Tcp)),
            backends: vec![
                backend("2001:db8:203::11", 8443, None),
                backend("2001:db8:203::12", 8443, None),
            ],
        }),
    )
    .await
    .unwrap();

    // A third service, deleted again; deleting it twice is NOT_FOUND.
    let mut dns = service(
        "dns",
        "198.51.100.53",
        53,
        vec![backend("203.0.113.53", 53, None)],
    );
    dns.protocol = pb::Protocol::Udp as i32;
    within(
        "upsert dns",
        client.upsert_service(pb::UpsertServiceRequest { service: Some(dns) }),
    )
    .await
    .unwrap();
    let dns_key = key("198.51.100.53", 53, pb::Protocol::Udp);
    within(
        "delete dns",
        client.delete_service(pb::DeleteServiceRequest {
            key: Some(dns_key.clone()),
        }),
    )
    .await
    .unwrap();
    let status = within(
        "delete dns again",
        client.delete_service(pb::DeleteServiceRequest { key: Some(dns_key) }),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(
        status.message(),
        "no service 198.51.100.53:53/udp is defined through this API"
    );

    // What the gRPC calls built is what the same YAML file gives.
    let yaml = Config::from_yaml(
        "\
services:
  - name: web4
    vip: 198.51.100.10
    port: 80
    protocol: tcp
    backends:
      - { address: 203.0.113.11, port: 8080, weight: 3 }
      - { address: 203.0.113.12, port: 8080 }
      - { address: 203.0.113.13, port: 8080, weight: 0 }
  - name: web6
    vip: 2001:db8:100::10
    port: 443
    protocol: tcp
    maglev_table_size: 251
    backends:
      - { address: 2001:db8:203::11, port: 8443 }
      - { address: 2001:db8:203::12, port: 8443 }
    health_check: { type: tcp, interval_ms: 500 }
",
    )
    .unwrap();
    within("the source's update", updates.changed())
        .await
        .unwrap();
    assert_eq!(*updates.borrow_and_update(), yaml.services);
    let desired = source.services();

    // Invalid requests: refused, named, nothing changed.
    let mut bad_ip = service("bad", "198.51.100.300", 80, vec![]);
    assert_refused(
        "bad IP",
        client.upsert_service(pb::UpsertServiceRequest {
            service: Some(bad_ip.clone()),
        }),
        "service.vip: invalid IP address \"198.51.100.300\"",
        &source,
        &updates,
    )
    .await;
    bad_ip.vip = "198.51.100.30".into();
    bad_ip.maglev_table_size = Some(1000);
    assert_refused(
        "non-prime table size",
        client.upsert_service(pb::UpsertServiceRequest {
            service: Some(bad_ip.clone()),
        }),
        "service.maglev_table_size: maglev table size 1000 is not prime",
        &source,
        &updates,
    )
    .await;
    bad_ip.maglev_table_size = None;
    bad_ip.protocol = 99;
    assert_refused(
        "unknown protocol",
        client.upsert_service(pb::UpsertServiceRequest {
            service: Some(bad_ip),
        }),
        "service.protocol: unknown protocol 99: PROTOCOL_TCP (1) or PROTOCOL_UDP (2)",
        &source,
        &updates,
    )
    .await;
    assert_refused(
        "backend of the other family",
        client.set_backends(pb::SetBackendsRequest {
            key: Some(key("198.51.100.10", 80, pb::Protocol::Tcp)),
            backends: vec![
                backend("203.0.113.11", 8080, None),
                backend("2001:db8:203::11", 8080, None),
            ],
        }),
        "backends[1].address: 2001:db8:203::11 is not of the VIP's address family",
        &source,
        &updates,
    )
    .await;
    assert_refused(
        "backend port 70000",
        client.set_backends(pb::SetBackendsRequest {
            key: Some(key("198.51.100.10", 80, pb::Protocol::Tcp)),
            backends: vec![backend("203.0.113.11", 70000, None)],
        }),
        "backends[0].port: 70000 is not a port (0..=65535)",
        &source,
        &updates,
    )
    .await;

    // Policy: a small valid one, then invalid ones that leave it in place.
    let policy = "\
namespaces: [{name: prod}]
workloads:
  - {name: api, namespace: prod, labels: {app: api}, addresses: [10.1.0.5], interface: veth-api}
rules:
  - {name: allow-web, namespace: prod, endpoints: {match_labels: {app: api}}, direction: ingress,
     action: allow, peers: [{cidr: 192.0.2.0/24}], ports: [{port: 8080}]}
";
    let set = within(
        "set policy",
        client.set_policy(pb::SetPolicyRequest {
            yaml: policy.into(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    assert!(set.changed);
    let accepted = source.policy().expect("a policy");
    assert_eq!(accepted.rules[0].name, "allow-web");
    let policies = source.subscribe_policy();
    for (yaml, message) in [
        (
            "namespaces: [{name: prod}, {name: prod}]\n",
            "policy.namespaces[1]: duplicate of policy.namespaces[0]",
        ),
        (
            "namespaces: [{name: prod}]\nrules: [{name: r, endpoints: {}, direction: sideways}]\n",
            "policy.rules[0].direction at line 2 column 45: unknown variant `sideways`, expected \
             `ingress` or `egress`",
        ),
    ] {
        let status = within(
            "invalid policy",
            client.set_policy(pb::SetPolicyRequest { yaml: yaml.into() }),
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), message);
    }
    assert_eq!(source.policy().as_ref(), Some(&accepted));
    assert!(!policies.has_changed().unwrap());

    // ListState: this API's state, and the applied state once the "agent" publishes it.
    let state = within("list state", client.list_state(pb::ListStateRequest {}))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = state.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web4", "web6"]);
    assert_eq!(
        state.services[0].backends,
        [
            backend("203.0.113.11", 8080, Some(3)),
            backend("203.0.113.12", 8080, Some(1)),
            backend("203.0.113.13", 8080, Some(0)),
        ]
    );
    assert!(
        state.policy_yaml.contains("allow-web"),
        "{}",
        state.policy_yaml
    );
    let applied = state.applied.expect("the server has the applied state");
    assert!(applied.services.is_empty());

    // The agent's part: merge, apply to the real datapath, publish what was applied.
    let config = Config {
        maglev_seed: 7,
        services: desired.clone(),
        policy: accepted,
        ..Default::default()
    };
    config.validate().unwrap();
    let mut datapath = Datapath::load().expect("load the datapath (needs root)");
    datapath.apply(&config).expect("apply the gRPC services");
    applied_tx.send_replace(AppliedView {
        config: config.clone(),
        retired_backends: datapath.retired_backends(),
        adopted: false,
    });
    let state = within("list state", client.list_state(pb::ListStateRequest {}))
        .await
        .unwrap()
        .into_inner();
    let applied = state.applied.unwrap();
    assert_eq!(applied.maglev_seed, 7);
    assert_eq!(applied.services, state.services);

    // The maps: exactly the weighted backends, the draining one out of the table, 3:1 shares.
    let v4 = ServiceKey::new(ip("198.51.100.10"), 80, Protocol::Tcp.number());
    let v6 = ServiceKey::new(ip("2001:db8:100::10"), 443, Protocol::Tcp.number());
    let table4 = slots(&datapath, &v4).expect("web4 programmed");
    assert_eq!(
        table4.keys().copied().collect::<Vec<_>>(),
        [(ip("203.0.113.11"), 8080), (ip("203.0.113.12"), 8080)]
    );
    let (heavy, light) = (
        table4[&(ip("203.0.113.11"), 8080)],
        table4[&(ip("203.0.113.12"), 8080)],
    );
    assert_eq!(heavy + light, 16381);
    assert!(
        (2.5..3.5).contains(&(heavy as f64 / light as f64)),
        "{heavy}:{light}"
    );
    let table6 = slots(&datapath, &v6).expect("web6 programmed");
    assert_eq!(
        table6.keys().copied().collect::<Vec<_>>(),
        [
            (ip("2001:db8:203::11"), 8443),
            (ip("2001:db8:203::12"), 8443)
        ]
    );
    assert_eq!(table6.values().sum::<usize>(), 251);
    assert!(datapath
        .table_of(&ServiceKey::new(
            ip("198.51.100.53"),
            53,
            Protocol::Udp.number()
        ))
        .is_none());

    // Deleting web6 through the API takes it out of the maps at the next apply.
    within(
        "delete web6",
        client.delete_service(pb::DeleteServiceRequest {
            key: Some(key("2001:db8:100::10", 443, pb::Protocol::Tcp)),
        }),
    )
    .await
    .unwrap();
    within("the source's update", updates.changed())
        .await
        .unwrap();
    let config = Config {
        services: updates.borrow_and_update().clone(),
        ..Default::default()
    };
    datapath.apply(&config).unwrap();
    assert!(datapath.table_of(&v6).is_none());
    assert_eq!(slots(&datapath, &v4), Some(table4));

    // StreamEvents: what the agent publishes on the bus reaches the stream, in order.
    let mut stream = within(
        "open the event stream",
        client.stream_events(pb::StreamEventsRequest {}),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(events.subscribers(), 1);
    events.publish(
        Event::new(EventKind::Reconciled, "datapath reconciled: 1 service").with_service("web4"),
    );
    events.publish(
        Event::new(EventKind::HealthChanged, "unhealthy after 3 failed probes")
            .with_service("web4")
            .with_backend("203.0.113.12:8080"),
    );
    let first = within("first event", stream.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.kind(), pb::EventKind::Reconciled);
    assert_eq!(
        (
            first.text.as_str(),
            first.service.as_str(),
            first.backend.as_str()
        ),
        ("datapath reconciled: 1 service", "web4", "")
    );
    assert!(first.unix_time_ms > 1_700_000_000_000);
    let second = within("second event", stream.message())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.kind(), pb::EventKind::HealthChanged);
    assert_eq!(second.backend, "203.0.113.12:8080");

    // Shutdown ends the open stream and removes the socket file.
    within("shutdown", server.shutdown()).await;
    let end = within("the stream's end", stream.message()).await;
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    assert!(!socket.exists());
}

#[tokio::test]
async fn unix_socket_replaces_a_stale_socket_and_refuses_to_take_a_live_one() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    // A socket file nobody listens on any more, as a crashed agent leaves it.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let server = grpc::serve_unix(&socket, GrpcSource::new(), EventBus::default(), None)
        .expect("replaces the stale socket");
    let mut client = connect_unix(&socket).await;
    let state = within("list state", client.list_state(pb::ListStateRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(state.services.is_empty() && state.applied.is_none());

    // A second server on the same path: refused, and the first one keeps serving.
    let err = grpc::serve_unix(&socket, GrpcSource::new(), EventBus::default(), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another process is serving"), "{err}");
    within("list state", client.list_state(pb::ListStateRequest {}))
        .await
        .unwrap();
    within("shutdown", server.shutdown()).await;
    assert!(!socket.exists());

    // Any other file is left alone.
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "data").unwrap();
    let err = grpc::serve_unix(&file, GrpcSource::new(), EventBus::default(), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
}

#[tokio::test]
async fn tcp_with_tls_requires_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = lb_tests::grpc_client::make_certificates(dir.path());
    let tls = TlsConfig::from_files(
        &certs.join("server.pem"),
        &certs.join("server.key"),
        &certs.join("ca.pem"),
    )
    .unwrap();
    let source = GrpcSource::new();
    let server = grpc::serve_tcp_tls(
        "127.0.0.1:0".parse().unwrap(),
        &tls,
        source.clone(),
        EventBus::default(),
        None,
    )
    .expect("serve TCP with TLS");
    let addr = server.local_addr().unwrap();
    let endpoint = |with_identity| lb_tests::grpc_client::tls_endpoint(addr, &certs, with_identity);

    let channel = within("TLS connect", endpoint(true).connect())
        .await
        .expect("connect with a client certificate");
    let mut client = LoadBalancerClient::new(channel);
    within(
        "upsert over TLS",
        client.upsert_service(pb::UpsertServiceRequest {
            service: Some(service(
                "web",
                "198.51.100.10",
                80,
                vec![backend("203.0.113.11", 8080, None)],
            )),
        }),
    )
    .await
    .unwrap();
    assert_eq!(source.services().len(), 1);

    // Without a client certificate: no call gets through.
    let anonymous = async {
        let channel = endpoint(false).connect().await?;
        LoadBalancerClient::new(channel)
            .list_state(pb::ListStateRequest {})
            .await
            .map_err(|status| status.into())
            .map(|_| ())
    };
    let result: Result<(), Box<dyn std::error::Error + Send + Sync>> =
        within("anonymous TLS client", anonymous).await;
    // The server's TLS stack refuses it (TLS 1.3: after the client's half of the handshake).
    let refused = format!("{result:?}");
    assert!(refused.contains("CertificateRequired"), "{refused}");

    // Bad PEM fails at startup.
    let broken = TlsConfig {
        key_pem: b"not a key".to_vec(),
        ..tls
    };
    let err = grpc::serve_tcp_tls(
        "127.0.0.1:0".parse().unwrap(),
        &broken,
        GrpcSource::new(),
        EventBus::default(),
        None,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("TLS"), "{err:#}");
    within("shutdown", server.shutdown()).await;
}
