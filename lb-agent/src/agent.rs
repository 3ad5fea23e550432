//! The `lb-agent run` daemon: merges the sources of desired state (the YAML file, the gRPC API,
//! Kubernetes; see [`crate::desired`] for their precedence), keeps backends' health, reconciles the
//! datapath, enforces the merged policy with the TC policy programs (see
//! [`crate::policy::enforcer`]), and serves metrics, readiness and the gRPC API.
//!
//! It must never be the reason a packet is dropped: an invalid file or a failed apply leaves the last
//! good state in the maps. With a pin directory (the binary's default) stopping the agent, by
//! SIGTERM, SIGINT or `kill -9`, leaves the datapath attached and its maps pinned: the next agent
//! adopts them (hitless restart and upgrade), and `lb-agent detach` removes them. Without one,
//! stopping the agent detaches the datapath.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    datapath::{AttachMode, Datapath, LoadOptions, PinOptions},
    desired::{Conflict, Desired},
    ebpf_log,
    grpc::{self, Event, EventBus, EventKind, GrpcServer, GrpcSource, TlsConfig},
    health::{self, HealthChecker, Target},
    http::{HttpServer, Readiness},
    k8s::{K8sOptions, K8sSource, NodeOptions},
    metrics::{self, DatapathSnapshot, Metrics},
    policy::{
        enforcer::{self, PolicyEnforcer},
        PolicyConfig,
    },
};

/// Where Kubernetes state comes from.
#[derive(Debug, Clone)]
pub enum KubeApi {
    /// In-cluster service account, else `$KUBECONFIG` / `~/.kube/config`.
    FromEnvironment,
    Kubeconfig(PathBuf),
    /// A plain URL, e.g. `kubectl proxy` or a test server.
    Url(String),
}

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub config_path: PathBuf,
    pub interfaces: Vec<String>,
    /// The program every interface gets (`lb_xdp` or `lb_tc`).
    pub attach_mode: AttachMode,
    pub metrics_addr: Option<SocketAddr>,
    /// How often to refresh metrics and log counters (0 = never log).
    pub stats_interval: Duration,
    pub conntrack_entries: u32,
    /// Pin the datapath here and adopt what an earlier agent pinned (see `crate::pins`).
    pub pins: Option<PinOptions>,
    pub kubernetes: Option<KubeApi>,
    pub node_name: Option<String>,
    pub node_addresses: Vec<IpAddr>,
    /// How often the config file is checked for changes.
    pub watch_interval: Duration,
    /// Serve the gRPC API on this unix socket (mode 0600).
    pub grpc_socket: Option<PathBuf>,
    /// Serve the gRPC API on this TCP address with TLS and required client certificates.
    pub grpc_tcp: Option<(SocketAddr, TlsConfig)>,
}

pub async fn run(options: AgentOptions) -> Result<()> {
    // Validate before touching the kernel: a bad file never half-programs the datapath.
    let file = Config::from_file(&options.config_path)
        .with_context(|| format!("invalid config {}", options.config_path.display()))?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;

    let metrics = Arc::new(Metrics::new());
    let readiness = Readiness::new();
    let http = match options.metrics_addr {
        Some(addr) => Some(
            HttpServer::bind(addr, metrics.clone(), readiness.clone())
                .await
                .with_context(|| format!("binding the metrics endpoint {addr}"))?,
        ),
        None => None,
    };

    let grpc_source = GrpcSource::new();
    grpc_source.set_base_config(&file);
    let events = EventBus::default();
    let (applied_tx, applied_rx) = watch::channel(Config::default());
    let mut grpc_servers: Vec<GrpcServer> = Vec::new();
    if let Some(path) = &options.grpc_socket {
        grpc_servers.push(grpc::serve_unix(
            path,
            grpc_source.clone(),
            events.clone(),
            Some(applied_rx.clone()),
        )?);
    }
    if let Some((addr, tls)) = &options.grpc_tcp {
        grpc_servers.push(grpc::serve_tcp_tls(
            *addr,
            tls,
            grpc_source.clone(),
            events.clone(),
            Some(applied_rx.clone()),
        )?);
    }
    let mut grpc_services = grpc_source.subscribe();
    let mut grpc_policy = grpc_source.subscribe_policy();

    let kubernetes = match &options.kubernetes {
        Some(api) => {
            let client = match api {
                KubeApi::FromEnvironment => K8sSource::client_from_env().await?,
                KubeApi::Kubeconfig(path) => K8sSource::client_from_kubeconfig(path).await?,
                KubeApi::Url(url) => K8sSource::client_from_url(url)?,
            };
            let node = NodeOptions {
                node_name: options.node_name.clone(),
                addresses: options.node_addresses.clone(),
            };
            Some(K8sSource::start(
                client,
                K8sOptions {
                    node,
                    ..Default::default()
                },
            ))
        }
        None => None,
    };
    let mut kube_updates = kubernetes.as_ref().map(|k| k.subscribe());
    let mut kube_policy = kubernetes.as_ref().map(|k| k.subscribe_policy());

    let mut datapath = Datapath::load_with(&LoadOptions {
        conntrack_entries: options.conntrack_entries,
        pins: options.pins.clone(),
    })?;
    // Not fatal: the datapath works without its log lines.
    let ebpf_log = ebpf_log::forward(datapath.ebpf_mut())
        .inspect_err(|err| warn!("eBPF log records not forwarded: {err:#}"))
        .ok();
    let mut checker = HealthChecker::new();
    let mut health_updates = checker.subscribe();
    let mut health_before = checker.snapshot();
    let mut desired = Desired::new(file);
    let mut reported = BTreeSet::new();
    let mut applied = reconcile(
        &mut datapath,
        &desired,
        &mut checker,
        &metrics,
        &events,
        &mut reported,
    )
    .context("programming the initial state")?;
    applied_tx.send_replace(applied.clone());
    let mut policy = PolicyEnforcer::new();
    reconcile_policy(&mut policy, &desired.merged_policy(), &metrics, &events);
    for interface in &options.interfaces {
        datapath.attach_with(interface, options.attach_mode)?;
    }
    datapath.release_links_except(&options.interfaces)?;
    readiness.set_ready();
    info!(services = applied.services.len(), interfaces = ?options.interfaces, "ready");

    let mut file_stamp = stamp(&options.config_path);
    let mut watch_tick = tokio::time::interval(options.watch_interval);
    let mut stats_tick = tokio::time::interval(options.stats_interval.max(Duration::from_secs(1)));
    stats_tick.tick().await;
    let mut policy_tick = tokio::time::interval(enforcer::DRAIN_INTERVAL);
    let mut last_conntrack_count = Instant::now() - Duration::from_secs(3600);
    loop {
        let file_changed = tokio::select! {
            _ = sigint.recv() => { info!("SIGINT received"); break; }
            _ = sigterm.recv() => { info!("SIGTERM received"); break; }
            _ = sighup.recv() => true,
            _ = watch_tick.tick() => {
                let now = stamp(&options.config_path);
                let changed = now != file_stamp;
                file_stamp = now;
                changed
            }
            Ok(()) = changed(&mut kube_updates) => {
                desired.kubernetes_services =
                    kube_updates.as_mut().expect("some").borrow_and_update().clone();
                info!(services = desired.kubernetes_services.len(), "Kubernetes services changed");
                events.publish(Event::new(EventKind::ServiceChanged, "Kubernetes services changed"));
                false
            }
            Ok(()) = changed(&mut kube_policy) => {
                desired.kubernetes_policy = kube_policy.as_mut().expect("some").borrow_and_update().clone();
                let policy = &desired.kubernetes_policy;
                info!(namespaces = policy.namespaces.len(), workloads = policy.workloads.len(),
                      network_policies = policy.network_policies.len(), "Kubernetes policy changed");
                events.publish(Event::new(EventKind::ServiceChanged, "Kubernetes policy changed"));
                false
            }
            Ok(()) = grpc_services.changed() => {
                desired.grpc_services = grpc_services.borrow_and_update().clone();
                events.publish(Event::new(EventKind::ServiceChanged, "gRPC services changed"));
                false
            }
            Ok(()) = grpc_policy.changed() => {
                desired.grpc_policy = grpc_policy.borrow_and_update().clone();
                events.publish(Event::new(EventKind::ServiceChanged, "gRPC policy changed"));
                false
            }
            Ok(()) = health_updates.changed() => {
                let now = health_updates.borrow_and_update().clone();
                for event in grpc::health_events(&health_before, &now, &applied) {
                    events.publish(event);
                }
                health_before = now;
                false
            }
            _ = policy_tick.tick() => {
                drain_policy(&mut policy, &metrics, &events);
                continue;
            }
            _ = stats_tick.tick() => {
                if policy.pending() {
                    if let Some(desired) = policy.desired() {
                        reconcile_policy(&mut policy, &desired, &metrics, &events);
                    }
                }
                let count = last_conntrack_count.elapsed() >= Duration::from_secs(10);
                if count {
                    last_conntrack_count = Instant::now();
                }
                refresh_metrics(&datapath, &applied, &checker, &metrics, count, !options.stats_interval.is_zero());
                continue;
            }
        };
        if file_changed {
            match Config::from_file(&options.config_path) {
                Ok(file) => {
                    info!(path = %options.config_path.display(), "config file changed");
                    grpc_source.set_base_config(&file);
                    desired.file = file;
                    events.publish(Event::new(EventKind::ServiceChanged, "config file changed"));
                }
                Err(err) => {
                    error!("config rejected, keeping the last good state: {err}");
                    events.publish(Event::new(EventKind::ConfigRejected, err.to_string()));
                    continue;
                }
            }
        }
        match reconcile(
            &mut datapath,
            &desired,
            &mut checker,
            &metrics,
            &events,
            &mut reported,
        ) {
            Ok(config) => {
                applied = config;
                applied_tx.send_replace(applied.clone());
                if file_changed {
                    info!(services = applied.services.len(), "config reloaded");
                }
            }
            Err(err) => {
                error!("reconcile failed, the datapath keeps its previous state: {err:#}");
                events.publish(Event::new(EventKind::ReconcileFailed, format!("{err:#}")));
            }
        }
        // After the services: loading the policy programs (first policy) takes a while.
        reconcile_policy(&mut policy, &desired.merged_policy(), &metrics, &events);
    }

    readiness.set_not_ready("stopping");
    if let Some(task) = ebpf_log {
        task.abort();
    }
    // The policy maps are not pinned: the programs go with them (see `crate::policy::enforcer`).
    drop(policy);
    datapath.detach_all();
    if let Some(pins) = datapath.pin_dir() {
        info!(dir = %pins.root().display(),
              "datapath left attached and pinned for the next agent (`lb-agent detach` removes it)");
    }
    refresh_metrics(&datapath, &applied, &checker, &metrics, false, true);
    checker.shutdown().await;
    for server in grpc_servers {
        server.shutdown().await;
    }
    if let Some(http) = http {
        http.shutdown().await;
    }
    info!("stopped");
    Ok(())
}

/// Waits for the next Kubernetes update; never resolves without a Kubernetes source.
async fn changed<T>(updates: &mut Option<watch::Receiver<T>>) -> Result<(), ()> {
    match updates {
        Some(rx) => rx.changed().await.map_err(|_| ()),
        None => std::future::pending().await,
    }
}

/// Applies the merged desired state with health-derived weights; returns the config applied.
/// Conflicts between sources are logged (and sent as events) when they first appear.
fn reconcile(
    datapath: &mut Datapath,
    desired: &Desired,
    checker: &mut HealthChecker,
    metrics: &Metrics,
    events: &EventBus,
    reported: &mut BTreeSet<Conflict>,
) -> Result<Config> {
    let started = Instant::now();
    let merged = desired.merged();
    for conflict in merged.conflicts.difference(reported) {
        warn!("{conflict}");
        events.publish(Event::new(EventKind::ServiceChanged, conflict.to_string()));
    }
    *reported = merged.conflicts;
    let config = merged.config;
    let result = config
        .validate()
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            checker.update(health::targets(&config));
            let health = checker.snapshot();
            datapath.apply_with(&config, |service, backend| {
                let health =
                    Target::for_backend(service, backend).and_then(|t| health.get(&t).cloned());
                health::effective_weight(backend.weight, health.as_ref())
            })
        });
    metrics.observe_reconcile(started.elapsed(), result.is_ok());
    let report = result?;
    if report != Default::default() {
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        info!(?report, elapsed_ms, "datapath reconciled");
        events.publish(Event::new(
            EventKind::Reconciled,
            format!(
                "{} services, {:.1} ms: {report:?}",
                config.services.len(),
                elapsed_ms
            ),
        ));
    }
    metrics.update_health(metrics::backend_health(&config, &checker.snapshot()));
    Ok(config)
}

/// Makes the policy datapath enforce `desired`; a failure is logged, counted and sent as an event,
/// and the last good rule set stays in force.
fn reconcile_policy(
    enforcer: &mut PolicyEnforcer,
    desired: &PolicyConfig,
    metrics: &Metrics,
    events: &EventBus,
) {
    let started = Instant::now();
    match enforcer.reconcile(desired) {
        Ok(change) if change.is_empty() => {}
        Ok(change) => {
            let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
            info!(applied = change.applied, attached = ?change.attached,
                  detached = ?change.detached, elapsed_ms, "policy reconciled");
            events.publish(Event::new(
                EventKind::Reconciled,
                format!("policy, {elapsed_ms:.1} ms: {change:?}"),
            ));
        }
        Err(err) => {
            error!("policy reconcile failed, the last good rule set stays in force: {err:#}");
            metrics.policy_reconcile_failed();
            events.publish(Event::new(
                EventKind::ReconcileFailed,
                format!("policy: {err:#}"),
            ));
        }
    }
}

/// Moves the policy datapath's verdict counters into the metrics, and its deny and audit events
/// into log lines and gRPC events.
fn drain_policy(enforcer: &mut PolicyEnforcer, metrics: &Metrics, events: &EventBus) {
    match enforcer.drain() {
        Ok(drained) => {
            for report in drained.reports {
                warn!("{}", report.text);
                events.publish(Event::new(EventKind::PolicyVerdict, report.text));
            }
            if drained.suppressed > 0 {
                let text = format!(
                    "{} more policy deny/audit verdicts not reported (rate limit; counted in lb_policy_verdicts_total)",
                    drained.suppressed
                );
                warn!("{text}");
                events.publish(Event::new(EventKind::PolicyVerdict, text));
            }
            metrics.update_policy_verdicts(enforcer.verdicts().to_vec());
        }
        Err(err) => error!("reading policy verdicts: {err:#}"),
    }
}

fn refresh_metrics(
    datapath: &Datapath,
    applied: &Config,
    checker: &HealthChecker,
    metrics: &Metrics,
    count_conntrack: bool,
    log: bool,
) {
    match DatapathSnapshot::read(datapath, applied) {
        Ok(mut snapshot) => {
            if count_conntrack {
                snapshot.conntrack_entries = datapath.conntrack_entries().ok();
            }
            if log {
                let summary: Vec<String> = snapshot
                    .counters
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(c, n)| format!("{}={n}", c.name()))
                    .collect();
                info!(counters = %summary.join(" "), "datapath counters");
            }
            metrics.update_datapath(snapshot);
        }
        Err(err) => error!("reading datapath statistics: {err:#}"),
    }
    metrics.update_health(metrics::backend_health(applied, &checker.snapshot()));
}

/// What identifies a version of the config file: editors often replace the file (new inode)
/// rather than rewrite it, so the inode is part of it.
fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len(), meta.ino()))
}
