//! `K8sSource` against a fake Kubernetes API server over real HTTP on loopback: the kube-rs
//! watchers LIST and WATCH it, and the published desired services follow the Services and
//! EndpointSlices the test writes — through endpoint conditions, deletions, bookmarks, a 410 Gone
//! (re-list), a watch from a compacted resourceVersion, and dropped connections (reconnect and
//! resume). The last test programs the real datapath from the published services and checks the
//! Maglev tables. Namespaces, Pods and NetworkPolicies become the policy model, whose compiled
//! identities, ipcache and policy entries the last test checks with the reference evaluator.

use std::{net::IpAddr, time::Duration};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use lb_agent::{
    config::{self, Config, Protocol},
    datapath::Datapath,
    desired::Desired,
    k8s::{K8sOptions, K8sSource},
    policy::{CompiledPolicy, IdentityAllocator, IdentityKey, Maps, Packet, PolicyConfig},
};
use lb_common::policy::{Direction, Reason, Verdict};
use lb_common::service::ServiceKey;
use lb_tests::{
    fake_apiserver::{FakeApiServer, Stats},
    k8s_objects::{endpoint_slice as slice, service, State},
};
use serde_json::json;
use tokio::sync::watch;

/// Bound of every wait for the client to catch up.
const WAIT: Duration = Duration::from_secs(5);

fn options() -> K8sOptions {
    K8sOptions {
        debounce: Duration::from_millis(50),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
        ..Default::default()
    }
}

/// `(name, vip:port, [address:port weight])`, the shape of the published state.
type Summary = Vec<(String, String, Vec<String>)>;

fn summary(services: &[config::Service]) -> Summary {
    services
        .iter()
        .map(|s| {
            let vip = match s.vip {
                IpAddr::V4(ip) => format!("{ip}:{}", s.port),
                IpAddr::V6(ip) => format!("[{ip}]:{}", s.port),
            };
            let backends = s
                .backends
                .iter()
                .map(|b| format!("{} w{}", b.address, b.weight))
                .collect();
            (s.name.clone(), vip, backends)
        })
        .collect()
}

fn expect(entries: &[(&str, &str, &[&str])]) -> Summary {
    entries
        .iter()
        .map(|(name, vip, backends)| {
            (
                name.to_string(),
                vip.to_string(),
                backends.iter().map(|b| b.to_string()).collect(),
            )
        })
        .collect()
}

/// Service `default/web`'s IPv4 frontend with `backends` (`"address wN"`), for [`expect`].
fn web<'a>(backends: &'a [&'a str]) -> (&'static str, &'static str, &'a [&'a str]) {
    ("default/web:http", "198.51.100.10:80", backends)
}

/// Service `default/web`'s IPv6 frontend (see [`web`]).
fn web6<'a>(backends: &'a [&'a str]) -> (&'static str, &'static str, &'a [&'a str]) {
    ("default/web:http", "[2001:db8:100::10]:80", backends)
}

/// Service `default/api`'s frontend (see [`web`]).
fn api<'a>(backends: &'a [&'a str]) -> (&'static str, &'static str, &'a [&'a str]) {
    ("default/api:http", "198.51.100.20:80", backends)
}

/// An IPv4 EndpointSlice `name` of Service `service`.
fn v4_slice(name: &str, service: &str, endpoints: &[(&str, State)]) -> EndpointSlice {
    slice(name, service, "IPv4", endpoints)
}

/// Waits until the published state summarises to `want`.
async fn wait_state(rx: &mut watch::Receiver<Vec<config::Service>>, want: &Summary) {
    let reached = tokio::time::timeout(WAIT, rx.wait_for(|s| summary(s) == *want))
        .await
        .is_ok_and(|r| r.is_ok());
    if !reached {
        panic!(
            "published state did not become\n{want:#?}\nwithin {WAIT:?}; it is\n{:#?}",
            summary(&rx.borrow())
        );
    }
    rx.borrow_and_update();
}

/// Asserts that nothing is published for `quiet` (several debounce periods).
async fn assert_no_update(rx: &mut watch::Receiver<Vec<config::Service>>, what: &str) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !rx.has_changed().unwrap(),
        "{what}: unexpected update to {:#?}",
        summary(&rx.borrow())
    );
}

/// `RUST_LOG=lb_agent=debug,kube_runtime=debug` shows what the watchers did.
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

async fn start(server: &FakeApiServer) -> (K8sSource, watch::Receiver<Vec<config::Service>>) {
    init_logs();
    let client = K8sSource::client_from_url(&server.url()).unwrap();
    let source = K8sSource::start(client, options());
    assert!(source.wait_synced(WAIT).await, "not synced within {WAIT:?}");
    let rx = source.subscribe();
    (source, rx)
}

async fn wait_stats(server: &FakeApiServer, what: &str, condition: impl Fn(&Stats) -> bool) {
    assert!(
        server.wait_for(WAIT, condition).await,
        "{what} within {WAIT:?}; stats: {:#?}",
        server.stats()
    );
}

async fn wait_both_watches_open(server: &FakeApiServer) {
    wait_stats(server, "both watches open", |s| {
        s.open_watches("services") == 1 && s.open_watches("endpointslices") == 1
    })
    .await;
}

/// Asserts that Services and EndpointSlices were each listed once: nothing needed a re-list.
fn assert_listed_once(stats: &Stats) {
    assert_eq!(
        (stats.lists("services"), stats.lists("endpointslices")),
        (1, 1),
        "LISTs of (services, endpointslices)"
    );
}

/// Serves Service `web` with one ready backend, .11, starts the source and waits until it
/// publishes it and both watches are open: where most tests begin.
async fn start_with_web(
    server: &FakeApiServer,
) -> (K8sSource, watch::Receiver<Vec<config::Service>>) {
    server.apply(&service("web", "198.51.100.10", None));
    server.apply(&v4_slice("web-1", "web", &[("203.0.113.11", State::Ready)]));
    let (source, mut rx) = start(server).await;
    wait_state(&mut rx, &expect(&[web(&["203.0.113.11 w1"])])).await;
    wait_both_watches_open(server).await;
    (source, rx)
}

#[tokio::test]
async fn follows_services_and_endpoint_slices() {
    let server = FakeApiServer::start().unwrap();
    // Present before the client starts: the initial LIST.
    server.apply(&service("api", "198.51.100.20", None));
    server.apply(&v4_slice("api-1", "api", &[("203.0.113.21", State::Ready)]));

    let (_source, mut rx) = start(&server).await;
    let api = api(&["203.0.113.21 w1"]);
    wait_state(&mut rx, &expect(&[api])).await;
    assert_listed_once(&server.stats());
    wait_both_watches_open(&server).await;

    // A new Service, then its EndpointSlice.
    server.apply(&service("web", "198.51.100.10", None));
    wait_state(&mut rx, &expect(&[web(&[]), api])).await;
    let ready3 = [
        ("203.0.113.11", State::Ready),
        ("203.0.113.12", State::Ready),
        ("203.0.113.13", State::Ready),
    ];
    server.apply(&v4_slice("web-1", "web", &ready3));
    let all3: &[&str] = &["203.0.113.11 w1", "203.0.113.12 w1", "203.0.113.13 w1"];
    wait_state(&mut rx, &expect(&[web(all3), api])).await;

    // .12 terminating but serving: draining, weight 0.
    server.apply(&v4_slice(
        "web-1",
        "web",
        &[
            ("203.0.113.11", State::Ready),
            ("203.0.113.12", State::Terminating),
            ("203.0.113.13", State::Ready),
        ],
    ));
    let draining: &[&str] = &["203.0.113.11 w1", "203.0.113.12 w0", "203.0.113.13 w1"];
    wait_state(&mut rx, &expect(&[web(draining), api])).await;

    // .12 no longer serving, and .11 removed from the slice: only .13 is left.
    server.apply(&v4_slice(
        "web-1",
        "web",
        &[
            ("203.0.113.12", State::Gone),
            ("203.0.113.13", State::Ready),
        ],
    ));
    wait_state(&mut rx, &expect(&[web(&["203.0.113.13 w1"]), api])).await;

    // A second slice of the same Service adds to it.
    server.apply(&v4_slice("web-2", "web", &[("203.0.113.14", State::Ready)]));
    let two_slices: &[&str] = &["203.0.113.13 w1", "203.0.113.14 w1"];
    wait_state(&mut rx, &expect(&[web(two_slices), api])).await;

    // Deleting the Service removes it even while its slices remain (they go later).
    assert!(server.delete::<Service>("default", "web"));
    wait_state(&mut rx, &expect(&[api])).await;
    assert!(server.delete::<EndpointSlice>("default", "web-1"));
    assert!(server.delete::<EndpointSlice>("default", "web-2"));
    assert_no_update(&mut rx, "deleting slices of a deleted Service").await;

    // No re-list was needed for any of this.
    let stats = server.stats();
    assert_listed_once(&stats);
    assert_eq!(
        (stats.watches("services"), stats.watches("endpointslices")),
        (1, 1)
    );
}

#[tokio::test]
async fn bookmarks_move_the_resume_point_without_updates() {
    let server = FakeApiServer::start().unwrap();
    let (_source, mut rx) = start_with_web(&server).await;
    // The watches asked for bookmarks.
    assert!(server
        .stats()
        .requests
        .iter()
        .filter(|r| r.contains("watch=true"))
        .all(|r| r.contains("allowWatchBookmarks=true")));

    // Services change (unrelated to the published state: a port-less Service gives no frontend),
    // so the resourceVersion moves past the EndpointSlice watch's last event.
    let mut other = service("other", "198.51.100.99", None);
    other.spec.as_mut().unwrap().ports = None;
    server.apply(&other);
    server.bookmark();
    wait_stats(&server, "bookmarks sent on both watches", |s| {
        s.bookmarks_sent >= 2
    })
    .await;
    assert_no_update(&mut rx, "bookmarks and a translation-neutral change").await;
    let bookmarked = server.resource_version().to_string();

    // On reconnect, the EndpointSlice watch resumes from the bookmark, not its last event.
    server.disconnect();
    wait_stats(&server, "watches reopened", |s| {
        s.watches("endpointslices") == 2
            && s.open_watches("services") == 1
            && s.open_watches("endpointslices") == 1
    })
    .await;
    let stats = server.stats();
    for resource in ["endpointslices", "services"] {
        assert_eq!(
            stats.last_watch_version(resource),
            Some(bookmarked.as_str()),
            "{resource} watch resumed from"
        );
    }
    assert_listed_once(&stats);
    assert_no_update(&mut rx, "a reconnect").await;
}

#[tokio::test]
async fn gone_410_relists_and_catches_up_with_missed_changes() {
    let server = FakeApiServer::start().unwrap();
    let (_source, mut rx) = start_with_web(&server).await;

    // 1. An ERROR 410 Expired on the open watches. The changes before it are never delivered on
    //    a watch (delivery is paused and the history compacted): only a re-list can find them.
    server.pause_watches();
    server.apply(&v4_slice(
        "web-1",
        "web",
        &[
            ("203.0.113.11", State::Terminating),
            ("203.0.113.12", State::Ready),
        ],
    ));
    server.apply(&service("api", "198.51.100.20", None));
    server.apply(&v4_slice("api-1", "api", &[("203.0.113.21", State::Ready)]));
    assert_no_update(&mut rx, "paused watches").await;
    let before = server.stats();
    server.expire();
    let web_after_expire = web(&["203.0.113.11 w0", "203.0.113.12 w1"]);
    wait_state(
        &mut rx,
        &expect(&[web_after_expire, api(&["203.0.113.21 w1"])]),
    )
    .await;
    wait_stats(&server, "both re-listed and watching again", |s| {
        s.lists("services") > before.lists("services")
            && s.lists("endpointslices") > before.lists("endpointslices")
            && s.open_watches("services") == 1
            && s.open_watches("endpointslices") == 1
    })
    .await;
    assert!(server.stats().gone_sent >= before.gone_sent + 2);
    // Live events flow again after the re-list.
    server.apply(&v4_slice("api-1", "api", &[("203.0.113.22", State::Ready)]));
    wait_state(
        &mut rx,
        &expect(&[web_after_expire, api(&["203.0.113.22 w1"])]),
    )
    .await;

    // 2. A watch resumed from a resourceVersion that was compacted meanwhile: the server answers
    //    the new watch with 410, and the client re-lists.
    server.pause_watches();
    assert!(server.delete::<Service>("default", "api"));
    server.apply(&v4_slice("web-1", "web", &[("203.0.113.12", State::Ready)]));
    server.disconnect();
    server.compact();
    let before = server.stats();
    server.resume_watches();
    wait_state(&mut rx, &expect(&[web(&["203.0.113.12 w1"])])).await;
    wait_stats(&server, "re-listed after a 410 on reconnect", |s| {
        s.lists("services") > before.lists("services")
            && s.lists("endpointslices") > before.lists("endpointslices")
    })
    .await;
    assert!(server.stats().gone_sent > before.gone_sent);
}

#[tokio::test]
async fn disconnects_reconnect_and_resume_without_relisting() {
    let server = FakeApiServer::start().unwrap();
    let (_source, mut rx) = start_with_web(&server).await;
    let seen = server.resource_version().to_string();

    // Connections drop; changes happen while the client is between watches (not delivered until
    // it has reconnected and the server resumes).
    server.pause_watches();
    server.disconnect();
    server.apply(&v4_slice(
        "web-1",
        "web",
        &[
            ("203.0.113.11", State::Ready),
            ("203.0.113.12", State::Ready),
        ],
    ));
    server.apply(&service("api", "198.51.100.20", None));
    wait_stats(&server, "reconnected", |s| {
        s.watches("services") == 2
            && s.watches("endpointslices") == 2
            && s.open_watches("services") == 1
            && s.open_watches("endpointslices") == 1
    })
    .await;
    let stats = server.stats();
    // Resumed from the last resourceVersion the client saw, with no new LIST.
    assert_eq!(stats.last_watch_version("services"), Some(seen.as_str()));
    assert_listed_once(&stats);
    server.resume_watches();
    let web_both = web(&["203.0.113.11 w1", "203.0.113.12 w1"]);
    wait_state(&mut rx, &expect(&[web_both, api(&[])])).await;

    // Twice more, to show it is not a one-off; live events keep flowing.
    for round in 0..2 {
        server.disconnect();
        server.apply(&v4_slice("api-1", "api", &[("203.0.113.21", State::Ready)]));
        wait_state(&mut rx, &expect(&[web_both, api(&["203.0.113.21 w1"])])).await;
        assert!(server.delete::<EndpointSlice>("default", "api-1"));
        wait_state(&mut rx, &expect(&[web_both, api(&[])])).await;
        wait_stats(&server, "reconnected again", |s| {
            s.watches("endpointslices") == 3 + round && s.open_watches("endpointslices") == 1
        })
        .await;
    }
    let stats = server.stats();
    assert_listed_once(&stats);
    assert_eq!(stats.gone_sent, 0);
}

#[tokio::test]
async fn an_unreachable_api_server_is_retried_until_it_answers() {
    // A free loopback port with nothing listening on it (yet).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    init_logs();
    let client = K8sSource::client_from_url(&format!("http://{addr}")).unwrap();
    let source = K8sSource::start(client, options());
    let mut rx = source.subscribe();
    // Connection refused, retried with backoff: nothing is published meanwhile.
    assert!(!source.wait_synced(Duration::from_millis(400)).await);
    assert!(!rx.has_changed().unwrap());

    let server = FakeApiServer::start_at(addr).unwrap();
    server.apply(&service("web", "198.51.100.10", None));
    server.apply(&v4_slice("web-1", "web", &[("203.0.113.11", State::Ready)]));
    assert!(source.wait_synced(WAIT).await, "not synced within {WAIT:?}");
    wait_state(&mut rx, &expect(&[web(&["203.0.113.11 w1"])])).await;

    // The server goes down; a change happens meanwhile; it comes back with the same store
    // (an API server restarted on the same etcd): the client reconnects and resumes its watches.
    let mut server = server;
    let before = server.stats();
    server.stop();
    server.apply(&v4_slice("web-1", "web", &[("203.0.113.12", State::Ready)]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!rx.has_changed().unwrap());
    server.restart().unwrap();
    wait_state(&mut rx, &expect(&[web(&["203.0.113.12 w1"])])).await;
    let stats = server.stats();
    assert!(stats.watches("endpointslices") > before.watches("endpointslices"));
    assert_eq!(
        stats.lists("endpointslices"),
        before.lists("endpointslices")
    );
}

/// Waits until `condition` holds, polling every 10 ms, for at most [`WAIT`].
async fn settle(condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not settled within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The fake server serves the kinds the policy work watches (Namespaces, Pods, NetworkPolicies)
/// to plain kube-rs watchers and reflectors too, cluster-wide and namespaced.
#[tokio::test]
async fn fake_server_serves_namespaces_pods_and_network_policies() {
    use futures::StreamExt;
    use k8s_openapi::api::{
        core::v1::{Namespace, Pod},
        networking::v1::NetworkPolicy,
    };
    use kube::runtime::{reflector, watcher, WatchStreamExt};

    init_logs();
    let server = FakeApiServer::start().unwrap();
    let namespace = |name: &str, team: &str| -> Namespace {
        serde_json::from_value(json!({ "metadata": { "name": name, "labels": { "team": team } } }))
            .unwrap()
    };
    let pod = |ns: &str, name: &str, app: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": { "namespace": ns, "name": name, "labels": { "app": app } },
            "status": { "podIP": "10.1.0.1" },
        }))
        .unwrap()
    };
    server.apply(&namespace("shop", "a"));
    server.apply(&namespace("bank", "b"));
    server.apply(&pod("shop", "web-0", "web"));
    server.apply(&pod("bank", "db-0", "db"));
    let policy: NetworkPolicy = serde_json::from_value(json!({
        "metadata": { "namespace": "shop", "name": "web-ingress" },
        "spec": {
            "podSelector": { "matchLabels": { "app": "web" } },
            "policyTypes": ["Ingress"],
            "ingress": [{ "from": [{ "namespaceSelector": { "matchLabels": { "team": "a" } } }],
                          "ports": [{ "protocol": "TCP", "port": 8080 }] }],
        },
    }))
    .unwrap();
    server.apply(&policy);

    let client = K8sSource::client_from_url(&server.url()).unwrap();
    let (namespaces, writer) = reflector::store::<Namespace>();
    let namespaces_task = watcher(kube::Api::all(client.clone()), Default::default())
        .reflect(writer)
        .for_each(|_| async {});
    let (shop_pods, writer) = reflector::store::<Pod>();
    let pods_task = watcher(
        kube::Api::namespaced(client.clone(), "shop"),
        Default::default(),
    )
    .reflect(writer)
    .for_each(|_| async {});
    let (policies, writer) = reflector::store::<NetworkPolicy>();
    let policies_task = watcher(kube::Api::all(client), Default::default())
        .reflect(writer)
        .for_each(|_| async {});
    let tasks = [
        tokio::spawn(namespaces_task),
        tokio::spawn(pods_task),
        tokio::spawn(policies_task),
    ];

    let names = |pods: &reflector::Store<Pod>| {
        let mut names: Vec<String> = pods
            .state()
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        names.sort();
        names
    };
    settle(|| namespaces.len() == 2 && names(&shop_pods) == ["web-0"] && policies.len() == 1).await;
    let stored = policies.state()[0].clone();
    assert_eq!(stored.spec, policy.spec);
    // Only the namespaced collection was asked for pods.
    assert!(server
        .stats()
        .requests
        .iter()
        .filter(|r| r.contains("/pods"))
        .all(|r| r.starts_with("GET /api/v1/namespaces/shop/pods?")));

    // Watch events: a pod added in the namespace (and one elsewhere), a label change, a
    // policy deleted.
    server.apply(&pod("shop", "web-1", "web"));
    server.apply(&pod("bank", "db-1", "db"));
    server.apply(&namespace("shop", "c"));
    assert!(server.delete::<NetworkPolicy>("shop", "web-ingress"));
    settle(|| {
        let shop_team = namespaces
            .state()
            .iter()
            .find(|ns| ns.metadata.name.as_deref() == Some("shop"))
            .and_then(|ns| ns.metadata.labels.as_ref()?.get("team").cloned());
        shop_team.as_deref() == Some("c")
            && names(&shop_pods) == ["web-0", "web-1"]
            && policies.is_empty()
    })
    .await;
    for task in tasks {
        task.abort();
    }
}

/// Programs the datapath with `services`, as the agent does with each published update.
fn program(services: &[config::Service], datapath: &mut Datapath) {
    datapath
        .apply(&Config {
            services: services.to_vec(),
            ..Default::default()
        })
        .expect("apply");
}

/// The distinct backends of a service's live Maglev table.
fn table(datapath: &Datapath, key: &ServiceKey) -> Option<Vec<(IpAddr, u16)>> {
    datapath.table_of(key).map(|mut backends| {
        backends.sort();
        backends.dedup();
        backends
    })
}

/// Waits until `want` is published, then programs it into `datapath` as the agent would.
async fn program_when_published(
    rx: &mut watch::Receiver<Vec<config::Service>>,
    want: &Summary,
    datapath: &mut Datapath,
) {
    wait_state(rx, want).await;
    program(&rx.borrow(), datapath);
}

/// A Maglev table's backends (see [`table`]): `addresses`, each on port 8080.
fn on_8080(addresses: &[&str]) -> Option<Vec<(IpAddr, u16)>> {
    Some(
        addresses
            .iter()
            .map(|a| (a.parse().unwrap(), 8080))
            .collect(),
    )
}

/// Whether `address`:8080 is a backend in the datapath's maps (in a table or draining).
fn is_backend(datapath: &Datapath, address: &str) -> bool {
    datapath
        .backend_stats(address.parse().unwrap(), 8080)
        .unwrap()
        .is_some()
}

/// The published services, programmed into the real datapath: Maglev tables hold exactly the
/// ready backends; a draining one stays a backend (existing flows) but leaves the table.
#[tokio::test]
async fn datapath_maps_follow_kubernetes_events() {
    let server = FakeApiServer::start().unwrap();
    server.apply(&service("web", "198.51.100.10", Some("2001:db8:100::10")));
    let ready3 = [
        ("203.0.113.11", State::Ready),
        ("203.0.113.12", State::Ready),
        ("203.0.113.13", State::Ready),
    ];
    server.apply(&v4_slice("web-v4", "web", &ready3));
    let v6_slice = |address| slice("web-v6", "web", "IPv6", &[(address, State::Ready)]);
    server.apply(&v6_slice("2001:db8:203::11"));
    let (_source, mut rx) = start(&server).await;
    let mut datapath = Datapath::load().expect("load the datapath (needs root)");

    let v4 = ServiceKey::new("198.51.100.10".parse().unwrap(), 80, Protocol::Tcp.number());
    let v6 = ServiceKey::new(
        "2001:db8:100::10".parse().unwrap(),
        80,
        Protocol::Tcp.number(),
    );

    let all3: &[&str] = &["203.0.113.11 w1", "203.0.113.12 w1", "203.0.113.13 w1"];
    let web6_11 = web6(&["2001:db8:203::11 w1"]);
    program_when_published(&mut rx, &expect(&[web(all3), web6_11]), &mut datapath).await;
    assert_eq!(
        table(&datapath, &v4),
        on_8080(&["203.0.113.11", "203.0.113.12", "203.0.113.13"])
    );
    assert_eq!(table(&datapath, &v6), on_8080(&["2001:db8:203::11"]));

    // .12 terminating: out of the table, still a backend for its existing flows.
    server.apply(&v4_slice(
        "web-v4",
        "web",
        &[
            ("203.0.113.11", State::Ready),
            ("203.0.113.12", State::Terminating),
            ("203.0.113.13", State::Ready),
        ],
    ));
    let draining: &[&str] = &["203.0.113.11 w1", "203.0.113.12 w0", "203.0.113.13 w1"];
    program_when_published(&mut rx, &expect(&[web(draining), web6_11]), &mut datapath).await;
    assert_eq!(
        table(&datapath, &v4),
        on_8080(&["203.0.113.11", "203.0.113.13"])
    );
    assert!(is_backend(&datapath, "203.0.113.12"), "draining .12");

    // .11 removed and .12 gone: .13 alone; the removed backends are freed.
    server.apply(&v4_slice(
        "web-v4",
        "web",
        &[("203.0.113.13", State::Ready)],
    ));
    let web_13 = web(&["203.0.113.13 w1"]);
    program_when_published(&mut rx, &expect(&[web_13, web6_11]), &mut datapath).await;
    assert_eq!(table(&datapath, &v4), on_8080(&["203.0.113.13"]));
    for freed in ["203.0.113.11", "203.0.113.12"] {
        assert!(!is_backend(&datapath, freed), "{freed} freed");
    }

    // After a 410 and re-list the maps still match.
    server.pause_watches();
    server.apply(&v6_slice("2001:db8:203::12"));
    server.expire();
    let web6_12 = web6(&["2001:db8:203::12 w1"]);
    program_when_published(&mut rx, &expect(&[web_13, web6_12]), &mut datapath).await;
    assert_eq!(table(&datapath, &v6), on_8080(&["2001:db8:203::12"]));

    // The Service deleted: no service left in the maps.
    assert!(server.delete::<Service>("default", "web"));
    program_when_published(&mut rx, &Vec::new(), &mut datapath).await;
    assert_eq!(table(&datapath, &v4), None);
    assert_eq!(table(&datapath, &v6), None);
    assert!(!is_backend(&datapath, "203.0.113.13"), ".13 freed");
}

/// Ingress verdicts at a local workload, from each peer address, by the reference evaluator on
/// the compiled maps (the datapath's lookup sequence).
struct PolicyView {
    compiled: CompiledPolicy,
    maps: Maps,
}

impl PolicyView {
    /// The merged desired policy (the config file's local workload first, then Kubernetes, as the
    /// agent merges them), compiled with `identities`.
    fn compile(
        file: &PolicyConfig,
        kubernetes: &PolicyConfig,
        identities: &mut IdentityAllocator,
    ) -> Self {
        let mut desired = Desired::new(Config {
            policy: file.clone(),
            ..Default::default()
        });
        desired.kubernetes_policy = kubernetes.clone();
        let merged = desired.merged();
        let compiled = lb_agent::policy::compile(&merged.config.policy, identities, &|_| None)
            .expect("the merged policy compiles");
        let maps = Maps::load(&compiled);
        Self { compiled, maps }
    }

    /// (verdict, reason) of TCP `from` → `to:port`, ingress.
    fn ingress(&self, from: &str, to: &str, port: u16) -> (Verdict, Reason) {
        let check = self.maps.check(
            &Packet {
                src: from.parse().unwrap(),
                dst: to.parse().unwrap(),
                protocol: 6,
                dport: port,
            },
            Direction::Ingress,
        );
        (check.verdict(), check.reason())
    }

    /// The identity the ipcache gives `addr` (as the datapath resolves a peer).
    fn identity_of(&self, addr: &str) -> u32 {
        self.maps
            .check(
                &Packet {
                    src: addr.parse().unwrap(),
                    dst: LOCAL_WEB.parse().unwrap(),
                    protocol: 6,
                    dport: 8080,
                },
                Direction::Ingress,
            )
            .peer_identity
            .expect("a local endpoint")
    }

    /// The identity of a label set, if the compiled policy has it.
    fn identity_of_labels(&self, namespace: &str, labels: &[(&str, &str)]) -> Option<u32> {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let key = IdentityKey::workload(namespace, &labels);
        self.compiled
            .identities
            .iter()
            .find_map(|(id, k)| (*k == key).then_some(*id))
    }
}

const ALLOWED_BY_RULE: (Verdict, Reason) = (Verdict::Allow, Reason::AllowedByRule);
const DENIED_BY_DEFAULT: (Verdict, Reason) = (Verdict::Deny, Reason::DefaultDeny);

/// The workload on this node, from the config file (Kubernetes does not say which interface a pod
/// has); Kubernetes' own pod of the same name is shadowed.
const LOCAL_WEB: &str = "203.0.113.21";

fn namespace(name: &str, team: &str) -> Namespace {
    serde_json::from_value(json!({ "metadata": { "name": name, "labels": { "team": team } } }))
        .unwrap()
}

fn pod(ns: &str, name: &str, app: &str, ip: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "namespace": ns, "name": name, "labels": { "app": app } },
        "spec": { "containers": [{ "name": "c", "ports": [{ "name": "http", "containerPort": 8080 }] }] },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }] },
    }))
    .unwrap()
}

/// shop/web-ingress: pods `app: web` of `shop` accept TCP 8080 from namespaces `team: b` only.
fn web_ingress() -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": { "namespace": "shop", "name": "web-ingress" },
        "spec": {
            "podSelector": { "matchLabels": { "app": "web" } },
            "ingress": [{ "from": [{ "namespaceSelector": { "matchLabels": { "team": "b" } } }],
                          "ports": [{ "protocol": "TCP", "port": "http" }] }],
        },
    }))
    .unwrap()
}

/// Namespaces, Pods and NetworkPolicies from the fake API server become identities (label sets),
/// ipcache entries (pod addresses) and policy entries, and follow adds, label changes, deletes and
/// a 410 re-list.
#[tokio::test]
async fn policy_follows_namespaces_pods_and_network_policies() {
    let server = FakeApiServer::start().unwrap();
    server.apply(&namespace("shop", "a"));
    server.apply(&namespace("bank", "b"));
    server.apply(&pod("shop", "web-0", "web", LOCAL_WEB));
    server.apply(&pod("bank", "client-0", "client", "203.0.113.31"));
    server.apply(&pod("shop", "other-0", "other", "203.0.113.41"));
    server.apply(&web_ingress());
    let (source, _services) = start(&server).await;
    let mut rx = source.subscribe_policy();
    let file: PolicyConfig = serde_yaml_ng::from_str(&format!(
        "workloads: [{{name: web-0, namespace: shop, labels: {{app: web}}, addresses: [{LOCAL_WEB}], \
         interface: veth-web-0, ports: [{{name: http, port: 8080}}]}}]"
    ))
    .unwrap();
    let mut identities = IdentityAllocator::new();

    // Waits until the compiled policy satisfies `condition`; returns it.
    let mut wait = async |what: &str, condition: &dyn Fn(&PolicyView) -> bool| -> PolicyView {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let view = PolicyView::compile(&file, &rx.borrow_and_update(), &mut identities);
            if condition(&view) {
                return view;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if tokio::time::timeout(left, rx.changed()).await.is_err() {
                panic!(
                    "{what}: not reached within {WAIT:?}; Kubernetes policy:\n{:#?}",
                    rx.borrow()
                );
            }
        }
    };

    // The initial list: bank (team b) may reach web on http; shop's other pod may not.
    let view = wait("initial list", &|v| v.compiled.identities.len() >= 3).await;
    let kube = source.policy();
    assert_eq!(
        kube.workloads
            .iter()
            .map(|w| format!("{}/{}", w.namespace, w.name))
            .collect::<Vec<_>>(),
        ["bank/client-0", "shop/other-0", "shop/web-0"]
    );
    let client = view
        .identity_of_labels("bank", &[("app", "client")])
        .expect("client's identity");
    assert_eq!(
        client,
        IdentityAllocator::new()
            .allocate(&IdentityKey::workload(
                "bank",
                &[("app".to_string(), "client".to_string())].into()
            ))
            .unwrap(),
        "identities are the label set's hash, the same on every node"
    );
    assert_eq!(view.identity_of("203.0.113.31"), client);
    assert_eq!(
        view.identity_of("203.0.113.41"),
        view.identity_of_labels("shop", &[("app", "other")])
            .unwrap()
    );
    assert!(view
        .compiled
        .rules
        .iter()
        .any(|r| r.name == "k8s:shop/web-ingress:ingress[0]"));
    assert_eq!(
        view.ingress("203.0.113.31", LOCAL_WEB, 8080),
        ALLOWED_BY_RULE
    );
    assert_eq!(
        view.ingress("203.0.113.31", LOCAL_WEB, 9090),
        DENIED_BY_DEFAULT
    );
    assert_eq!(
        view.ingress("203.0.113.41", LOCAL_WEB, 8080),
        DENIED_BY_DEFAULT
    );

    // A pod's labels change: a new identity for its address, the old one released.
    server.apply(&pod("bank", "client-0", "client-v2", "203.0.113.31"));
    let view = wait("client relabelled", &|v| {
        v.identity_of_labels("bank", &[("app", "client-v2")])
            .is_some_and(|id| v.identity_of("203.0.113.31") == id)
    })
    .await;
    assert_eq!(view.identity_of_labels("bank", &[("app", "client")]), None);
    assert_eq!(
        view.ingress("203.0.113.31", LOCAL_WEB, 8080),
        ALLOWED_BY_RULE
    );

    // The namespace's labels change: bank no longer matches `team: b`.
    server.apply(&namespace("bank", "c"));
    let view = wait("bank relabelled", &|v| {
        v.ingress("203.0.113.31", LOCAL_WEB, 8080) == DENIED_BY_DEFAULT
    })
    .await;
    assert_eq!(
        view.ingress("203.0.113.41", LOCAL_WEB, 8080),
        DENIED_BY_DEFAULT
    );

    // The NetworkPolicy deleted: web is selected by nothing, open.
    assert!(server.delete::<NetworkPolicy>("shop", "web-ingress"));
    let view = wait("policy deleted", &|v| v.compiled.rules.is_empty()).await;
    assert_eq!(
        view.ingress("203.0.113.41", LOCAL_WEB, 8080),
        (Verdict::Allow, Reason::NotSelected)
    );

    // Changes missed while the watches were cut off, then a 410: the re-list brings them all.
    let before = server.stats();
    server.pause_watches();
    server.apply(&web_ingress());
    server.apply(&namespace("shop", "b")); // shop's own pods now match `team: b`
    assert!(server.delete::<Pod>("bank", "client-0"));
    server.expire();
    let view = wait("re-listed after 410", &|v| {
        !v.compiled.rules.is_empty()
            && v.ingress("203.0.113.41", LOCAL_WEB, 8080) == ALLOWED_BY_RULE
    })
    .await;
    let stats = server.stats();
    for kind in ["pods", "namespaces", "networkpolicies"] {
        assert!(
            stats.lists(kind) > before.lists(kind),
            "{kind} re-listed after 410"
        );
    }
    // The deleted pod's address is no workload's any more: world, and its identity is gone.
    assert_eq!(
        view.identity_of("203.0.113.31"),
        lb_common::policy::identity::WORLD_IPV4
    );
    assert_eq!(
        view.identity_of_labels("bank", &[("app", "client-v2")]),
        None
    );
    assert_eq!(
        view.ingress("203.0.113.31", LOCAL_WEB, 8080),
        DENIED_BY_DEFAULT
    );
}
