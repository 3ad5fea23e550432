//! A fake Kubernetes API server on 127.0.0.1 over plain HTTP/1.1, for testing watch clients (kube-rs
//! watchers and reflectors) against the real protocol rather than a mocked client.
//!
//! What it serves, for any registered kind (Services, EndpointSlices, Pods, Namespaces and
//! NetworkPolicies are registered from the start; [`FakeApiServer::apply`] registers others):
//!
//! - **LIST** `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, and the namespaced
//!   `/api/v1/namespaces/{ns}/services` forms: a `<Kind>List` with `metadata.resourceVersion` (the
//!   store's current one). `labelSelector` supports `k=v`, `k==v`, `k!=v`, `k` and `!k`;
//!   `fieldSelector` supports `metadata.name` and `metadata.namespace` equality; anything else is a
//!   400. `limit` is ignored (one page).
//! - **GET** of one object, `/api/v1/namespaces/{ns}/services/{name}`.
//! - **WATCH** (`?watch=true&resourceVersion=RV`): a chunked stream of newline-delimited JSON events.
//!   Events after RV are replayed from the history, then new ones follow as the test changes the
//!   store. RV `0` or empty starts with an ADDED event per current object. `allowWatchBookmarks`
//!   enables BOOKMARK events (on [`FakeApiServer::bookmark`]); `sendInitialEvents=true` ends the
//!   initial ADDED events with the `k8s.io/initial-events-end` bookmark; `timeoutSeconds` ends the
//!   stream cleanly. An RV older than the compacted history gets `200` and an `ERROR` event with
//!   status 410 `Expired`, as a real API server does, and the stream ends.
//!
//! The test drives failures: [`FakeApiServer::expire`] (every open watch gets a 410 ERROR and the
//! history is compacted, so the client must re-list), [`FakeApiServer::compact`] (history only),
//! [`FakeApiServer::disconnect`] (every open watch connection is dropped without ending its chunked
//! body, so the client must reconnect), [`FakeApiServer::pause_watches`] (events are recorded
//! but not delivered, as for a client cut off from the server), [`FakeApiServer::stop`] and
//! [`FakeApiServer::restart`] (down, then up again on the same address with the same store and
//! history, as an API server restarted on the same etcd). [`FakeApiServer::stats`] counts
//! LISTs and WATCHes per resource, the resourceVersions that watches started from, the open
//! watches, and the 410s and bookmarks sent, so a test can assert that a re-list or a reconnect
//! really happened.
//!
//! The server runs on its own thread and runtime, so it works under any test runtime (or none).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    },
    NamespaceResourceScope,
};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
};

/// Counters of what the server did, per resource (the plural, e.g. `services`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub lists: BTreeMap<String, usize>,
    pub watches: BTreeMap<String, usize>,
    /// The `resourceVersion` each watch asked for, in order.
    pub watch_versions: BTreeMap<String, Vec<String>>,
    pub open_watches: BTreeMap<String, usize>,
    /// 410 ERROR events sent (forced by `expire`, or for a too-old resourceVersion).
    pub gone_sent: usize,
    pub bookmarks_sent: usize,
    /// Every request line (`GET /path?query`), in order.
    pub requests: Vec<String>,
}

impl Stats {
    pub fn lists(&self, resource: &str) -> usize {
        self.lists.get(resource).copied().unwrap_or(0)
    }
    pub fn watches(&self, resource: &str) -> usize {
        self.watches.get(resource).copied().unwrap_or(0)
    }
    pub fn open_watches(&self, resource: &str) -> usize {
        self.open_watches.get(resource).copied().unwrap_or(0)
    }
    pub fn last_watch_version(&self, resource: &str) -> Option<&str> {
        self.watch_versions
            .get(resource)
            .and_then(|v| v.last())
            .map(String::as_str)
    }
}

/// A registered kind, by its collection path (e.g. `/apis/discovery.k8s.io/v1/endpointslices`).
#[derive(Debug, Clone)]
struct Kind {
    api_version: String,
    kind: String,
    plural: String,
}

#[derive(Debug, Clone)]
struct Entry {
    rv: u64,
    collection: String,
    event: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct State {
    /// The last resourceVersion given out.
    rv: u64,
    kinds: BTreeMap<String, Kind>,
    /// Collection path → (namespace, name) → object.
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    /// Every change after `compacted`, oldest first.
    history: Vec<Entry>,
    /// Watches from a resourceVersion older than this get 410 Gone.
    compacted: u64,
    paused: bool,
    disconnect_generation: u64,
    expire_generation: u64,
    bookmark_generation: u64,
    stats: Stats,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every change of `state` that open watches must look at.
    changed: watch::Sender<u64>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register<T: k8s_openapi::Resource>(&self) -> String {
        let collection = collection_of::<T>();
        self.state().kinds.insert(
            collection.clone(),
            Kind {
                api_version: T::API_VERSION.into(),
                kind: T::KIND.into(),
                plural: T::URL_PATH_SEGMENT.into(),
            },
        );
        collection
    }

    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let result = f(&mut self.state());
        self.changed.send_modify(|n| *n += 1);
        result
    }
}

/// The fake API server; stopped on drop.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts a server on an ephemeral port of 127.0.0.1.
    pub fn start() -> Result<Self> {
        Self::start_at(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Starts a server on `addr` (a loopback address; port 0 picks one).
    pub fn start_at(addr: SocketAddr) -> Result<Self> {
        let std_listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                ..Default::default()
            }),
            changed: watch::channel(0).0,
        });
        shared.register::<Service>();
        shared.register::<EndpointSlice>();
        shared.register::<Pod>();
        shared.register::<Namespace>();
        shared.register::<NetworkPolicy>();
        let (shutdown, thread) = spawn_server(std_listener, shared.clone())?;
        Ok(Self {
            addr,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Stops serving, as an API server that went down: open connections are dropped and new
    /// ones refused. The store is kept.
    pub fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Serves again on the same address with the same store (and history), as an API server
    /// restarted on the same etcd.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let std_listener = std::net::TcpListener::bind(self.addr)
            .with_context(|| format!("binding {}", self.addr))?;
        std_listener.set_nonblocking(true)?;
        let (shutdown, thread) = spawn_server(std_listener, self.shared.clone())?;
        self.shutdown = Some(shutdown);
        self.thread = Some(thread);
        Ok(())
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Creates or replaces an object (ADDED or MODIFIED to watchers); returns its new
    /// resourceVersion.
    pub fn apply<T: k8s_openapi::Resource + Serialize>(&self, object: &T) -> u64 {
        let collection = self.shared.register::<T>();
        let mut value = serde_json::to_value(object).expect("object serialises");
        value["apiVersion"] = json!(T::API_VERSION);
        value["kind"] = json!(T::KIND);
        let namespace = value["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = value["metadata"]["name"]
            .as_str()
            .expect("object has a name")
            .to_string();
        assert_eq!(
            namespace.is_empty(),
            !is_namespaced::<T>(),
            "{}: namespace must be set exactly for namespaced kinds",
            T::KIND
        );
        self.shared.update(|state| {
            state.rv += 1;
            let rv = state.rv;
            value["metadata"]["resourceVersion"] = json!(rv.to_string());
            if value["metadata"]["uid"].is_null() {
                value["metadata"]["uid"] = json!(format!("uid-{namespace}-{name}"));
            }
            let objects = state.objects.entry(collection.clone()).or_default();
            let event = match objects.insert((namespace, name), value.clone()) {
                Some(_) => "MODIFIED",
                None => "ADDED",
            };
            state.history.push(Entry {
                rv,
                collection,
                event,
                object: value,
            });
            rv
        })
    }

    /// Deletes an object (DELETED to watchers); `false` if there was none.
    pub fn delete<T: k8s_openapi::Resource>(&self, namespace: &str, name: &str) -> bool {
        let collection = self.shared.register::<T>();
        self.shared.update(|state| {
            let removed = state
                .objects
                .get_mut(&collection)
                .and_then(|objects| objects.remove(&(namespace.to_string(), name.to_string())));
            let Some(mut object) = removed else {
                return false;
            };
            state.rv += 1;
            object["metadata"]["resourceVersion"] = json!(state.rv.to_string());
            let rv = state.rv;
            state.history.push(Entry {
                rv,
                collection,
                event: "DELETED",
                object,
            });
            true
        })
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.state().rv
    }

    /// Sends a BOOKMARK at the current resourceVersion on every open watch that allows bookmarks.
    pub fn bookmark(&self) {
        self.shared.update(|state| state.bookmark_generation += 1);
    }

    /// Forgets the history: watches from an older resourceVersion get 410 Gone.
    pub fn compact(&self) {
        self.shared.update(|state| {
            state.compacted = state.rv;
            state.history.clear();
        });
    }

    /// Sends an ERROR event with status 410 Expired on every open watch, ends them, and compacts
    /// the history: the clients must re-list.
    pub fn expire(&self) {
        self.shared.update(|state| {
            state.compacted = state.rv;
            state.history.clear();
            state.expire_generation += 1;
            state.paused = false;
        });
    }

    /// Drops every open watch connection mid-stream (no terminating chunk).
    pub fn disconnect(&self) {
        self.shared.update(|state| state.disconnect_generation += 1);
    }

    /// Stops delivering events to watches (they are still recorded, and replayed on
    /// [`FakeApiServer::resume_watches`] unless the history is compacted first).
    pub fn pause_watches(&self) {
        self.shared.update(|state| state.paused = true);
    }

    pub fn resume_watches(&self) {
        self.shared.update(|state| state.paused = false);
    }

    pub fn stats(&self) -> Stats {
        self.shared.state().stats.clone()
    }

    /// Polls `condition` on the stats every 10 ms; `false` after `timeout`.
    pub async fn wait_for(&self, timeout: Duration, condition: impl Fn(&Stats) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if condition(&self.shared.state().stats) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves `listener` on a thread of its own with a current-thread runtime, until the returned
/// sender fires (or is dropped).
fn spawn_server(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
) -> Result<(oneshot::Sender<()>, thread::JoinHandle<()>)> {
    let (shutdown_tx, shutdown_rx) = oneshot::channel();
    let thread = thread::Builder::new()
        .name("fake-apiserver".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("fake API server runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("listener");
                serve(listener, shared, shutdown_rx).await;
            });
        })?;
    Ok((shutdown_tx, thread))
}

fn is_namespaced<T: k8s_openapi::Resource>() -> bool {
    std::any::type_name::<T::Scope>() == std::any::type_name::<NamespaceResourceScope>()
}

fn collection_of<T: k8s_openapi::Resource>() -> String {
    if T::GROUP.is_empty() {
        format!("/api/{}/{}", T::VERSION, T::URL_PATH_SEGMENT)
    } else {
        format!("/apis/{}/{}/{}", T::GROUP, T::VERSION, T::URL_PATH_SEGMENT)
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut shutdown: oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(handle(stream, shared.clone()));
                }
            }
            _ = &mut shutdown => return, // also when the sender is dropped
        }
    }
}

/// A parsed request target.
struct Target {
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
    query: BTreeMap<String, String>,
}

fn parse_target(target: &str) -> Option<Target> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => (format!("/api/{version}"), rest),
        ["apis", group, version, rest @ ..] => (format!("/apis/{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        [plural, name] if *plural == "namespaces" => (None, *plural, Some(*name)),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return None,
    };
    Some(Target {
        collection: format!("{prefix}/{plural}"),
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
        query,
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 2;
            }
            (byte, _) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A label or field selector, as a list of requirements.
#[derive(Debug, Default, Clone)]
struct Selector(Vec<(String, Requirement)>);

#[derive(Debug, Clone)]
enum Requirement {
    Equals(String),
    NotEquals(String),
    Exists,
    Absent,
}

impl Selector {
    fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let requirement = if let Some((k, v)) = part.split_once("!=") {
                (
                    k.trim().to_string(),
                    Requirement::NotEquals(v.trim().into()),
                )
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (k.trim().to_string(), Requirement::Equals(v.trim().into()))
            } else if part.contains(' ') || part.contains('(') {
                return Err(format!("unsupported selector {part:?}"));
            } else if let Some(k) = part.strip_prefix('!') {
                (k.to_string(), Requirement::Absent)
            } else {
                (part.to_string(), Requirement::Exists)
            };
            requirements.push(requirement);
        }
        Ok(Self(requirements))
    }

    fn matches(&self, value: impl Fn(&str) -> Option<String>) -> bool {
        self.0.iter().all(|(key, requirement)| {
            let actual = value(key);
            match requirement {
                Requirement::Equals(v) => actual.as_deref() == Some(v),
                Requirement::NotEquals(v) => actual.as_deref() != Some(v),
                Requirement::Exists => actual.is_some(),
                Requirement::Absent => actual.is_none(),
            }
        })
    }
}

/// Which objects of a collection a request sees.
#[derive(Debug, Clone)]
struct Filter {
    namespace: Option<String>,
    labels: Selector,
    fields: Selector,
}

impl Filter {
    fn from(target: &Target) -> Result<Self, String> {
        let fields = Selector::parse(target.query.get("fieldSelector").map_or("", |s| s))?;
        for (key, requirement) in &fields.0 {
            if !matches!(key.as_str(), "metadata.name" | "metadata.namespace")
                || !matches!(
                    requirement,
                    Requirement::Equals(_) | Requirement::NotEquals(_)
                )
            {
                return Err(format!("unsupported field selector on {key}"));
            }
        }
        Ok(Self {
            namespace: target.namespace.clone(),
            labels: Selector::parse(target.query.get("labelSelector").map_or("", |s| s))?,
            fields,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let metadata = &object["metadata"];
        let namespace = metadata["namespace"].as_str().unwrap_or("");
        if self.namespace.as_deref().is_some_and(|ns| ns != namespace) {
            return false;
        }
        let labels = self
            .labels
            .matches(|k| metadata["labels"][k].as_str().map(str::to_string));
        let fields = self.fields.matches(|k| match k {
            "metadata.name" => metadata["name"].as_str().map(str::to_string),
            "metadata.namespace" => Some(namespace.to_string()),
            _ => None,
        });
        labels && fields
    }
}

async fn handle(mut stream: TcpStream, shared: Arc<Shared>) {
    let Some(head) = read_head(&mut stream).await else {
        return;
    };
    let request_line = head.lines().next().unwrap_or("").to_string();
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    shared
        .state()
        .stats
        .requests
        .push(format!("{method} {target}"));
    if method != "GET" {
        let _ = respond_status(&mut stream, 405, "MethodNotAllowed", "only GET is served").await;
        return;
    }
    let Some(target) = parse_target(target) else {
        let _ = respond_status(&mut stream, 404, "NotFound", "no such path").await;
        return;
    };
    let Some(kind) = shared.state().kinds.get(&target.collection).cloned() else {
        let _ = respond_status(&mut stream, 404, "NotFound", "no such resource").await;
        return;
    };
    let filter = match Filter::from(&target) {
        Ok(filter) => filter,
        Err(message) => {
            let _ = respond_status(&mut stream, 400, "BadRequest", &message).await;
            return;
        }
    };
    let watching = matches!(
        target.query.get("watch").map(String::as_str),
        Some("true" | "1")
    );
    if watching {
        watch_objects(stream, shared, target, kind, filter).await;
    } else if let Some(name) = &target.name {
        let object = shared
            .state()
            .objects
            .get(&target.collection)
            .and_then(|o| {
                o.get(&(
                    target.namespace.clone().unwrap_or_default(),
                    name.to_string(),
                ))
            })
            .cloned();
        let _ = match object {
            Some(object) => respond_json(&mut stream, 200, &object).await,
            None => {
                respond_status(&mut stream, 404, "NotFound", &format!("{name} not found")).await
            }
        };
    } else {
        let list = {
            let mut state = shared.state();
            *state.stats.lists.entry(kind.plural.clone()).or_default() += 1;
            let items: Vec<Value> = state
                .objects
                .get(&target.collection)
                .into_iter()
                .flat_map(|o| o.values())
                .filter(|o| filter.matches(o))
                .cloned()
                .collect();
            json!({
                "apiVersion": kind.api_version,
                "kind": format!("{}List", kind.kind),
                "metadata": { "resourceVersion": state.rv.to_string() },
                "items": items,
            })
        };
        let _ = respond_json(&mut stream, 200, &list).await;
    }
}

/// Reads the request head (up to the blank line); GET requests have no body.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        _ => "Unknown",
    }
}

async fn respond_json(stream: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).expect("JSON serialises");
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason_phrase(code),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

async fn respond_status(
    stream: &mut TcpStream,
    code: u16,
    reason: &str,
    message: &str,
) -> std::io::Result<()> {
    respond_json(stream, code, &status(code, reason, message)).await
}

fn event_line(event: &str, object: &Value) -> String {
    let mut line = serde_json::to_string(&json!({ "type": event, "object": object }))
        .expect("JSON serialises");
    line.push('\n');
    line
}

fn gone_line(asked: u64, compacted: u64) -> String {
    event_line(
        "ERROR",
        &status(
            410,
            "Expired",
            &format!("too old resource version: {asked} ({compacted})"),
        ),
    )
}

fn bookmark_line(kind: &Kind, rv: u64, initial_end: bool) -> String {
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if initial_end {
        metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    event_line(
        "BOOKMARK",
        &json!({ "apiVersion": kind.api_version, "kind": kind.kind, "metadata": metadata }),
    )
}

/// How a watch stream ends.
enum End {
    /// Terminating chunk, connection closed.
    Clean,
    /// Connection dropped mid-body.
    Abrupt,
}

/// Counts a watch as open while it lives.
struct OpenWatch {
    shared: Arc<Shared>,
    plural: String,
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        let mut state = self.shared.state();
        if let Some(open) = state.stats.open_watches.get_mut(&self.plural) {
            *open -= 1;
        }
    }
}

async fn watch_objects(
    mut stream: TcpStream,
    shared: Arc<Shared>,
    target: Target,
    kind: Kind,
    filter: Filter,
) {
    let asked = target
        .query
        .get("resourceVersion")
        .cloned()
        .unwrap_or_default();
    let bookmarks = target.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let initial_events = target.query.get("sendInitialEvents").map(String::as_str) == Some("true");
    let timeout = target
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|&t| t > 0)
        .map(Duration::from_secs);
    let mut changed = shared.changed.subscribe();

    // Registration and the initial events, in one critical section.
    let mut lines = Vec::new();
    let (mut cursor, disconnects, expiries, mut bookmark_generation, gone) = {
        let mut state = shared.state();
        let stats = &mut state.stats;
        *stats.watches.entry(kind.plural.clone()).or_default() += 1;
        stats
            .watch_versions
            .entry(kind.plural.clone())
            .or_default()
            .push(asked.clone());
        *stats.open_watches.entry(kind.plural.clone()).or_default() += 1;
        let mut gone = false;
        let cursor = if asked.is_empty() || asked == "0" || initial_events {
            for object in state
                .objects
                .get(&target.collection)
                .into_iter()
                .flat_map(|o| o.values())
                .filter(|o| filter.matches(o))
            {
                lines.push(event_line("ADDED", object));
            }
            if initial_events {
                lines.push(bookmark_line(&kind, state.rv, true));
            }
            state.rv
        } else {
            match asked.parse::<u64>() {
                Ok(rv) if rv >= state.compacted => rv,
                Ok(rv) => {
                    lines.push(gone_line(rv, state.compacted));
                    state.stats.gone_sent += 1;
                    gone = true;
                    rv
                }
                Err(_) => {
                    lines.push(event_line(
                        "ERROR",
                        &status(
                            400,
                            "BadRequest",
                            &format!("invalid resourceVersion {asked:?}"),
                        ),
                    ));
                    gone = true;
                    0
                }
            }
        };
        (
            cursor,
            state.disconnect_generation,
            state.expire_generation,
            state.bookmark_generation,
            gone,
        )
    };
    let _open = OpenWatch {
        shared: shared.clone(),
        plural: kind.plural.clone(),
    };
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut end = gone.then_some(End::Clean);
    loop {
        // Look at the state: first right away (events since `asked`), then on every change.
        if end.is_none() {
            let mut state = shared.state();
            if state.disconnect_generation != disconnects {
                end = Some(End::Abrupt);
            } else if state.expire_generation != expiries || cursor < state.compacted {
                lines.push(gone_line(cursor, state.compacted));
                state.stats.gone_sent += 1;
                end = Some(End::Clean);
            } else if !state.paused {
                for entry in state.history.iter().filter(|e| {
                    e.rv > cursor && e.collection == target.collection && filter.matches(&e.object)
                }) {
                    lines.push(event_line(entry.event, &entry.object));
                }
                cursor = state.rv;
                if state.bookmark_generation != bookmark_generation {
                    bookmark_generation = state.bookmark_generation;
                    if bookmarks {
                        lines.push(bookmark_line(&kind, cursor, false));
                        state.stats.bookmarks_sent += 1;
                    }
                }
            }
        }
        for line in lines.drain(..) {
            let chunk = format!("{:x}\r\n{line}\r\n", line.len());
            if stream.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
        match end {
            Some(End::Clean) => {
                let _ = stream.write_all(b"0\r\n\r\n").await;
                let _ = stream.shutdown().await;
                return;
            }
            Some(End::Abrupt) => return, // dropping the socket mid-body
            None => {}
        }
        let woke = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, changed.changed())
                .await
                .ok(),
            None => Some(changed.changed().await),
        };
        match woke {
            None => end = Some(End::Clean), // timeoutSeconds reached
            Some(Err(_)) => return,         // server shutting down
            Some(Ok(())) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_parsed() {
        let t =
            parse_target("/api/v1/services?watch=true&resourceVersion=12&labelSelector=a%3Db%2Cc")
                .unwrap();
        assert_eq!(t.collection, "/api/v1/services");
        assert_eq!(t.namespace, None);
        assert_eq!(t.query["resourceVersion"], "12");
        assert_eq!(t.query["labelSelector"], "a=b,c");
        let t =
            parse_target("/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/web-1").unwrap();
        assert_eq!(t.collection, "/apis/discovery.k8s.io/v1/endpointslices");
        assert_eq!(t.namespace.as_deref(), Some("shop"));
        assert_eq!(t.name.as_deref(), Some("web-1"));
        let t = parse_target("/api/v1/namespaces/kube-system").unwrap();
        assert_eq!(t.collection, "/api/v1/namespaces");
        assert_eq!(t.name.as_deref(), Some("kube-system"));
        assert!(parse_target("/healthz").is_none());
    }

    #[test]
    fn selectors_match_labels() {
        let object = json!({ "metadata": { "namespace": "a", "name": "x", "labels": { "app": "web", "tier": "1" } } });
        let filter = |labels: &str| Filter {
            namespace: None,
            labels: Selector::parse(labels).unwrap(),
            fields: Selector::default(),
        };
        assert!(filter("app=web,tier").matches(&object));
        assert!(filter("app==web,!missing").matches(&object));
        assert!(!filter("app!=web").matches(&object));
        assert!(!filter("missing").matches(&object));
        assert!(Selector::parse("app in (web)").is_err());
    }
}
