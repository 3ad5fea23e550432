//! [`K8sSource`]: watches Services and EndpointSlices and publishes the desired services; watches
//! Namespaces, Pods and NetworkPolicies (unless [`K8sOptions::watch_policy`] is off) and publishes
//! the desired policy.
//!
//! One kube-rs watcher per kind (LIST, then WATCH from the list's resourceVersion with bookmarks)
//! feeds a reflector store. Whenever a store changes, the translation it feeds — services from
//! Services and EndpointSlices ([`super::translate`]), policy from Namespaces, Pods and
//! NetworkPolicies ([`super::policy`]) — is recomputed, after a short debounce so that a burst of
//! events (a rollout, a re-list) gives one update, and sent on its `watch` channel if it differs
//! from the last one sent.
//!
//! Restarts are the watchers' business: a dropped watch resumes from the last resourceVersion seen
//! (events or bookmarks); a `410 Gone` (the resourceVersion is too old) re-lists, and the store
//! swaps to the new list atomically when it is complete, so a re-list never publishes a half-empty
//! state. Errors (API server down, 410, bad responses) are logged and retried with exponential
//! backoff; the task never ends on its own.

use std::{
    fmt,
    future::Future,
    path::Path,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use futures::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        reflector::{self, Store},
        utils::Backoff,
        watcher, WatchStreamExt,
    },
    Api, Client, Resource, ResourceExt,
};
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tracing::{debug, info, warn};

use super::{
    policy::translate_policy,
    translate::{translate, NodeOptions, Note},
};
use crate::{config, policy::PolicyConfig};

/// Settings of a [`K8sSource`].
#[derive(Debug, Clone)]
pub struct K8sOptions {
    pub node: NodeOptions,
    /// Time from the first change of a burst to the update that includes it.
    pub debounce: Duration,
    /// First retry delay after a watcher error; doubles per consecutive error up to `backoff_max`
    /// (with up to 25% subtracted at random, so that nodes do not retry in step).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Also watch Namespaces, Pods and NetworkPolicies for the policy.
    pub watch_policy: bool,
}

impl Default for K8sOptions {
    fn default() -> Self {
        Self {
            node: NodeOptions::default(),
            debounce: Duration::from_millis(50),
            backoff_min: Duration::from_millis(800),
            backoff_max: Duration::from_secs(30),
            watch_policy: true,
        }
    }
}

/// The running watchers. Dropping it stops them.
pub struct K8sSource {
    services: watch::Receiver<Vec<config::Service>>,
    policy: watch::Receiver<PolicyConfig>,
    synced: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl fmt::Debug for K8sSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("K8sSource")
            .field("synced", &*self.synced.borrow())
            .field("services", &self.services.borrow().len())
            .field("workloads", &self.policy.borrow().workloads.len())
            .finish()
    }
}

impl K8sSource {
    /// A client from the environment: in-cluster service account, else `$KUBECONFIG` or
    /// `~/.kube/config`.
    pub async fn client_from_env() -> Result<Client> {
        let config = kube::Config::infer()
            .await
            .context("no in-cluster config and no usable kubeconfig")?;
        Client::try_from(config).context("building the Kubernetes client")
    }

    /// A client from a kubeconfig file (its current context).
    pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
        let kubeconfig = Kubeconfig::read_from(path)
            .with_context(|| format!("reading kubeconfig {}", path.display()))?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?;
        Client::try_from(config).context("building the Kubernetes client")
    }

    /// A client for an API server at `url` without authentication, e.g. `http://127.0.0.1:8001`
    /// (`kubectl proxy`) or a test's fake API server.
    pub fn client_from_url(url: &str) -> Result<Client> {
        let uri: ::http::Uri = url
            .parse()
            .with_context(|| format!("API server URL {url:?}"))?;
        Client::try_from(kube::Config::new(uri)).context("building the Kubernetes client")
    }

    /// Starts watching through `client`. Must be called within a tokio runtime.
    pub fn start(client: Client, options: K8sOptions) -> Self {
        let (services_tx, services) = watch::channel(Vec::new());
        let (policy_tx, policy) = watch::channel(PolicyConfig::default());
        let (synced_tx, synced) = watch::channel(false);
        let published = Published {
            services: services_tx,
            policy: policy_tx,
            synced: synced_tx,
        };
        let task = tokio::spawn(run(client, options, published));
        Self {
            services,
            policy,
            synced,
            task,
        }
    }

    /// A receiver of the desired services. It holds an empty list until every kind is listed for
    /// the first time ([`K8sSource::wait_synced`]); after that, every change is one update.
    pub fn subscribe(&self) -> watch::Receiver<Vec<config::Service>> {
        self.services.clone()
    }

    /// The desired services now.
    pub fn services(&self) -> Vec<config::Service> {
        self.services.borrow().clone()
    }

    /// A receiver of the desired policy (namespaces, workloads, NetworkPolicies); empty until
    /// synced, and always without [`K8sOptions::watch_policy`].
    pub fn subscribe_policy(&self) -> watch::Receiver<PolicyConfig> {
        self.policy.clone()
    }

    /// The desired policy now.
    pub fn policy(&self) -> PolicyConfig {
        self.policy.borrow().clone()
    }

    /// Whether every kind has been listed and the result published.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until [`K8sSource::is_synced`]; `false` after `timeout`.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut synced = self.synced.clone();
        tokio::time::timeout(timeout, synced.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl Drop for K8sSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Exponential backoff with jitter for the watcher streams; reset by the first success.
#[derive(Debug, Clone)]
struct RetryBackoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl RetryBackoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
        }
    }
}

impl Iterator for RetryBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        // Up to 25% less, from the clock's nanoseconds: enough to spread nodes apart.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let jitter = delay.mul_f64(f64::from(nanos % 1000) / 4000.0);
        Some(delay - jitter)
    }
}

impl Backoff for RetryBackoff {
    fn reset(&mut self) {
        self.next = self.min;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Services,
    EndpointSlices,
    Namespaces,
    Pods,
    NetworkPolicies,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
            Kind::Namespaces => "namespaces",
            Kind::Pods => "pods",
            Kind::NetworkPolicies => "networkpolicies",
        }
    }

    /// Whether the kind feeds the policy (else the services).
    fn is_policy(self) -> bool {
        matches!(self, Kind::Namespaces | Kind::Pods | Kind::NetworkPolicies)
    }
}

/// The channels a [`K8sSource`] publishes on.
struct Published {
    services: watch::Sender<Vec<config::Service>>,
    policy: watch::Sender<PolicyConfig>,
    synced: watch::Sender<bool>,
}

/// The reflector stores of every kind.
struct Stores {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    network_policies: Store<NetworkPolicy>,
}

/// What one watcher step means for the published state.
enum Step {
    /// The store changed (an object applied or deleted, or a (re-)list completed).
    Changed { listed: bool },
    /// Nothing to publish (a list in progress).
    Nothing,
}

type Steps = Pin<Box<dyn Stream<Item = (Kind, Step)> + Send>>;

/// A watcher of `K` whose events are applied to `writer`, as [`Step`]s; errors are logged here.
fn reflect<K>(
    api: Api<K>,
    kind: Kind,
    writer: reflector::store::Writer<K>,
    options: &K8sOptions,
) -> Steps
where
    K: Resource<DynamicType = ()>
        + Clone
        + fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let backoff = RetryBackoff::new(options.backoff_min, options.backoff_max);
    watcher(api, watcher::Config::default())
        // Fields the translation never reads: less memory per object.
        .modify(|object: &mut K| {
            object.managed_fields_mut().clear();
            object.annotations_mut().clear();
        })
        .backoff(backoff)
        .reflect(writer)
        .map(move |event| {
            let step = match event {
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    Step::Changed { listed: false }
                }
                Ok(watcher::Event::InitDone) => {
                    debug!(resource = kind.name(), "listed");
                    Step::Changed { listed: true }
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => Step::Nothing,
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    // Normal when a watch falls behind the API server's history: the watcher
                    // re-lists by itself after the backoff.
                    info!(
                        resource = kind.name(),
                        message = %status.message,
                        "watch expired (410 Gone); re-listing"
                    );
                    Step::Nothing
                }
                Err(err) => {
                    warn!(resource = kind.name(), error = %err, "Kubernetes watch failed; retrying");
                    Step::Nothing
                }
            };
            (kind, step)
        })
        .boxed()
}

async fn run(client: Client, options: K8sOptions, published: Published) {
    let (services, service_writer) = reflector::store::<Service>();
    let (slices, slice_writer) = reflector::store::<EndpointSlice>();
    let (namespaces, namespace_writer) = reflector::store::<Namespace>();
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (network_policies, policy_writer) = reflector::store::<NetworkPolicy>();
    let stores = Stores {
        services,
        slices,
        namespaces,
        pods,
        network_policies,
    };
    let mut watched = vec![
        reflect(
            Api::<Service>::all(client.clone()),
            Kind::Services,
            service_writer,
            &options,
        ),
        reflect(
            Api::<EndpointSlice>::all(client.clone()),
            Kind::EndpointSlices,
            slice_writer,
            &options,
        ),
    ];
    if options.watch_policy {
        watched.push(reflect(
            Api::<Namespace>::all(client.clone()),
            Kind::Namespaces,
            namespace_writer,
            &options,
        ));
        watched.push(reflect(
            Api::<Pod>::all(client.clone()),
            Kind::Pods,
            pod_writer,
            &options,
        ));
        watched.push(reflect(
            Api::<NetworkPolicy>::all(client),
            Kind::NetworkPolicies,
            policy_writer,
            &options,
        ));
    }
    let mut listed: Vec<Kind> = Vec::new();
    let kinds = watched.len();
    let mut steps = futures::stream::select_all(watched);
    let mut deadline: Option<Instant> = None;
    // What changed since the last publication: (services, policy).
    let mut dirty = (false, false);
    let mut last_notes: Vec<Note> = Vec::new();
    let mut last_policy_notes: Vec<Note> = Vec::new();
    info!(
        policy = options.watch_policy,
        "watching Kubernetes Services and EndpointSlices{}",
        if options.watch_policy {
            ", Namespaces, Pods and NetworkPolicies"
        } else {
            ""
        }
    );
    loop {
        let publish_at = deadline;
        tokio::select! {
            step = steps.next() => {
                let Some((kind, step)) = step else {
                    // Watchers retry forever; ending means the runtime is shutting down.
                    return;
                };
                if let Step::Changed { listed: done } = step {
                    if done && !listed.contains(&kind) {
                        listed.push(kind);
                    }
                    if kind.is_policy() {
                        dirty.1 = true;
                    } else {
                        dirty.0 = true;
                    }
                    deadline.get_or_insert_with(|| Instant::now() + options.debounce);
                }
            }
            () = sleep_until(publish_at), if publish_at.is_some() => {
                deadline = None;
                if listed.len() < kinds {
                    continue; // the first list of the other kinds will trigger the first update
                }
                let first = !*published.synced.borrow();
                if dirty.0 || first {
                    publish(&stores, &options, &published.services, &mut last_notes);
                }
                if options.watch_policy && (dirty.1 || first) {
                    publish_policy(&stores, &published.policy, &mut last_policy_notes);
                }
                dirty = (false, false);
                published.synced.send_if_modified(|synced| !std::mem::replace(synced, true));
            }
        }
    }
}

fn sleep_until(deadline: Option<Instant>) -> impl Future<Output = ()> {
    // Only polled when `deadline` is Some.
    tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now))
}

/// Logs the notes not logged last time.
fn log_new_notes(notes: Vec<Note>, last_notes: &mut Vec<Note>) {
    if notes != *last_notes {
        for note in notes.iter().filter(|n| !last_notes.contains(n)) {
            info!(object = %note.object, reason = %note.reason, "left out of the desired state");
        }
        *last_notes = notes;
    }
}

fn publish(
    stores: &Stores,
    options: &K8sOptions,
    services_tx: &watch::Sender<Vec<config::Service>>,
    last_notes: &mut Vec<Note>,
) {
    let services: Vec<Arc<Service>> = stores.services.state();
    let slices: Vec<Arc<EndpointSlice>> = stores.slices.state();
    let translation = translate(&services, &slices, &options.node);
    log_new_notes(translation.notes, last_notes);
    let count = translation.services.len();
    let changed = services_tx.send_if_modified(|current| {
        if *current == translation.services {
            false
        } else {
            *current = translation.services;
            true
        }
    });
    if changed {
        info!(
            services = count,
            kubernetes_services = services.len(),
            endpoint_slices = slices.len(),
            "desired state from Kubernetes changed"
        );
    } else {
        debug!("Kubernetes events left the desired state unchanged");
    }
}

fn publish_policy(
    stores: &Stores,
    policy_tx: &watch::Sender<PolicyConfig>,
    last_notes: &mut Vec<Note>,
) {
    let translation = translate_policy(
        &stores.namespaces.state(),
        &stores.pods.state(),
        &stores.network_policies.state(),
    );
    log_new_notes(translation.notes, last_notes);
    let policy = translation.policy;
    let (namespaces, workloads, network_policies) = (
        policy.namespaces.len(),
        policy.workloads.len(),
        policy.network_policies.len(),
    );
    let changed = policy_tx.send_if_modified(|current| {
        if *current == policy {
            false
        } else {
            *current = policy;
            true
        }
    });
    if changed {
        info!(
            namespaces,
            workloads, network_policies, "desired policy from Kubernetes changed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_max_with_bounded_jitter_and_resets() {
        let mut backoff = RetryBackoff::new(Duration::from_millis(100), Duration::from_millis(700));
        let delays: Vec<Duration> = (0..5).map(|_| backoff.next().unwrap()).collect();
        for (delay, nominal) in delays.iter().zip([100, 200, 400, 700, 700]) {
            let nominal = Duration::from_millis(nominal);
            assert!(
                *delay <= nominal && *delay >= nominal.mul_f64(0.75),
                "{delays:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next().unwrap() <= Duration::from_millis(100));
    }
}
