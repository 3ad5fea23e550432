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
use lb_common::policy::{Reason, Verdict};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};
use tracing::{debug, error, info, warn};

use crate::{
    config::Config,
    config_watch::{self, ConfigWatch},
    datapath::{
        AttachMode, Capacity, Datapath, LoadOptions, PinOptions, ProgramSettings, TableFill,
    },
    desired::{Conflict, Desired},
    ebpf_log,
    endpoints::{self, store::EndpointStore, Endpoint, Placement},
    flow_events::{self, saved::SavedSwitch, switch::FlowEventsSwitch},
    grpc::{
        self, AppliedView, Change, EndpointChannel, EndpointReply, EndpointRequest, Event,
        EventBus, EventKind, FlowEventsChannel, FlowEventsReply, GrpcServer, GrpcSource, TlsConfig,
    },
    health::{self, HealthChecker, Target},
    http::{HttpServer, Readiness},
    k8s::{K8sOptions, K8sSource, NodeOptions},
    metrics::{self, DatapathSnapshot, MapFill, Metrics},
    policy::{
        cidr_deny::{self, CidrDenyList},
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
    /// Host sides of workload veths: TC split around the policy programs
    /// ([`AttachMode::Workload`]), whatever `attach_mode` says.
    pub workload_interfaces: Vec<String>,
    pub metrics_addr: Option<SocketAddr>,
    /// How often to refresh metrics and log counters (0 = never log).
    pub stats_interval: Duration,
    pub conntrack_entries: u32,
    /// `CONNTRACK_V6` entries; `None`: `conntrack_entries` (see `LoadOptions`).
    pub conntrack_entries_v6: Option<u32>,
    /// Services and backends the maps hold.
    pub capacity: Capacity,
    /// Publish the datapath's flow events (`crate::flow_events`) on the event stream, unless the
    /// config file or the gRPC API says otherwise (`crate::flow_events::switch`).
    pub flow_events: bool,
    /// Pin the datapath here and adopt what an earlier agent pinned (see `crate::pins`).
    pub pins: Option<PinOptions>,
    pub kubernetes: Option<KubeApi>,
    pub node_name: Option<String>,
    pub node_addresses: Vec<IpAddr>,
    /// How often the config file is checked for changes besides the watch (`crate::config_watch`).
    pub watch_interval: Duration,
    /// Serve the gRPC API on this unix socket (mode 0600).
    pub grpc_socket: Option<PathBuf>,
    /// What outlives the agent process (`crate::state_file`): the endpoints the CNI plugin
    /// registers (`crate::endpoints::store`) and the gRPC API's flow events setting
    /// (`crate::flow_events::saved`).
    pub state_dir: PathBuf,
    /// Serve the gRPC API on this TCP address with TLS and required client certificates.
    pub grpc_tcp: Option<(SocketAddr, TlsConfig)>,
}

pub async fn run(options: AgentOptions) -> Result<()> {
    // Stamp and watch before the first read: an edit saved while the agent starts is then seen
    // as a change (at worst the same content is read twice), never lost.
    let mut file_stamp = stamp(&options.config_path);
    // Edits are noticed at once; the poll below stays as the fallback.
    let mut config_watch = ConfigWatch::new(&options.config_path)
        .inspect_err(|err| warn!("config file changes are only polled: {err:#}"))
        .ok();
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

    // Before the API serves: a registration is answered only once it is written here.
    let mut endpoint_store = EndpointStore::open(&options.state_dir)?;
    collect_vanished_endpoints(&mut endpoint_store, None);
    let (endpoint_channel, mut endpoint_calls, endpoints_published) = EndpointChannel::new();
    let grpc_source = GrpcSource::new();
    grpc_source.set_base_config(&file);
    grpc_source.set_endpoint_channel(endpoint_channel);
    // Flow events are on as the file (else the flag) says until the API switches them; an API
    // setting the previous agent saved holds while the flag and the file are unchanged.
    let mut flow_events_switch = FlowEventsSwitch::new(options.flow_events, file.flow_events);
    let saved_flow_events = SavedSwitch::new(&options.state_dir);
    resume_flow_events(&mut flow_events_switch, &saved_flow_events);
    let (flow_events_channel, mut flow_events_calls, flow_events_published) =
        FlowEventsChannel::new(flow_events_switch.state(flow_events_switch.wanted()));
    grpc_source.set_flow_events_channel(flow_events_channel);
    let events = EventBus::default();
    let (applied_tx, applied_rx) = watch::channel(AppliedView::default());
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
                capacity: options.capacity,
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

    // The CIDR deny check and flow events are compiled into the programs only while needed; an
    // edit that changes either reloads them (`reload_programs`).
    let settings = ProgramSettings {
        flow_events: flow_events_switch.wanted(),
        cidr_deny: !file.policy.cidr_deny.is_empty(),
    };
    let mut cidr_deny = CidrDenyList::new(settings.cidr_deny);
    let mut datapath = Datapath::load_with_cidr_deny(
        &LoadOptions {
            conntrack_entries: options.conntrack_entries,
            conntrack_entries_v6: options.conntrack_entries_v6,
            pins: options.pins.clone(),
            capacity: options.capacity,
            flow_events: settings.flow_events,
        },
        settings.cidr_deny,
    )?;
    // Read whether or not events are on: they may be switched on later.
    let flow_events = Some(flow_events::forward(
        datapath.take_flow_events()?,
        events.clone(),
        applied_rx.clone(),
        metrics.clone(),
    )?);
    // Not fatal: the datapath works without its log lines.
    let ebpf_log = ebpf_log::forward(datapath.ebpf_mut())
        .inspect_err(|err| warn!("eBPF log records not forwarded: {err:#}"))
        .ok();
    let mut checker = HealthChecker::new();
    let mut health_updates = checker.subscribe();
    let mut health_before = checker.snapshot();
    let mut desired = Desired::new(file);
    desired.endpoints = endpoint_store.list();
    let mut reported = BTreeSet::new();
    // Services an earlier agent left programmed stay as they are until Kubernetes is listed:
    // without the cluster's services the merged state would remove them from the maps.
    let mut services_wait_for_kubernetes =
        kubernetes.is_some() && datapath.programmed_services() > 0;
    let mut applied = if services_wait_for_kubernetes {
        info!(
            services = datapath.programmed_services(),
            "the pinned services stay as they are until Kubernetes is listed"
        );
        // `ListState` shows what the datapath serves meanwhile, marked as adopted.
        applied_tx.send_replace(AppliedView {
            config: Config {
                services: datapath.programmed_services_read_back(),
                ..Config::default()
            },
            retired_backends: Vec::new(),
            adopted: true,
        });
        Config::default()
    } else {
        let applied = reconcile(
            &mut datapath,
            &desired,
            &mut checker,
            &metrics,
            &events,
            &mut reported,
        )
        .context("programming the initial state")?;
        publish_applied(&applied_tx, &applied, &datapath);
        // The pinned list stays too while the services wait (it is reconciled with them).
        reconcile_cidr_deny(&mut cidr_deny, &mut datapath, &applied, &metrics, &events);
        applied
    };
    let mut policy = PolicyEnforcer::with_pins(options.pins.clone());
    // The rule set an earlier agent left enforcing stays until Kubernetes is listed: without its
    // pods and NetworkPolicies the merged policy would replace it with a partial one.
    let mut policy_waits_for_kubernetes = kubernetes.is_some() && policy.links_pinned();
    if policy_waits_for_kubernetes {
        info!("the pinned policy rule set stays in force until Kubernetes is listed");
    } else {
        reconcile_policy(&mut policy, &desired.merged_policy(), &metrics, &events);
    }
    for interface in &options.interfaces {
        datapath.attach_with(interface, options.attach_mode)?;
    }
    for interface in &options.workload_interfaces {
        datapath.attach_with(interface, AttachMode::Workload)?;
    }
    // Registered endpoints: their pinned links are adopted, not released below.
    for endpoint in &desired.endpoints {
        if let Err(err) = datapath.attach_with(&endpoint.host_interface, AttachMode::Workload) {
            error!(interface = %endpoint.host_interface, pod = %endpoint.pod_name(),
                   "registered endpoint not attached: {err:#}");
        }
    }
    publish_endpoints(&endpoints_published, &desired);
    if options.attach_mode == AttachMode::Tc {
        warn_policy_endpoints_on_plain_tc(&options.interfaces, &desired.merged_policy());
    }
    let attached: Vec<String> = options
        .interfaces
        .iter()
        .chain(&options.workload_interfaces)
        .cloned()
        .chain(desired.endpoints.iter().map(|e| e.host_interface.clone()))
        .collect();
    // Every link runs the new programs now: maps of another size than the pinned ones take the
    // flows started meanwhile and the pins (see `crate::resize`).
    datapath.finish_resize()?;
    datapath.release_links_except(&attached)?;
    readiness.set_ready();
    info!(services = applied.services.len(), interfaces = ?attached, "ready");

    let mut watch_tick = tokio::time::interval(options.watch_interval);
    let mut stats_tick = tokio::time::interval(options.stats_interval.max(Duration::from_secs(1)));
    stats_tick.tick().await;
    let mut policy_tick = tokio::time::interval(enforcer::DRAIN_INTERVAL);
    // Counting conntrack walks every entry, so it is done about every 10 s and the last count is
    // shown in between.
    let mut conntrack = ConntrackCount {
        fill: None,
        counted: Instant::now() - Duration::from_secs(3600),
    };
    // An endpoint call's answer, sent once the policy has been reconciled with it.
    let mut endpoint_answer = None;
    loop {
        let file_changed = tokio::select! {
            _ = sigint.recv() => { info!("SIGINT received"); break; }
            _ = sigterm.recv() => { info!("SIGTERM received"); break; }
            _ = sighup.recv() => true,
            () = config_watch::next_change(&mut config_watch) => {
                let now = stamp(&options.config_path);
                let changed = now != file_stamp;
                file_stamp = now;
                changed
            }
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
                policy_waits_for_kubernetes = false;
                false
            }
            () = listed(&kubernetes), if policy_waits_for_kubernetes || services_wait_for_kubernetes => {
                // Also when the cluster's policy is empty (no update of `kube_policy` then).
                if let Some(updates) = kube_policy.as_mut() {
                    desired.kubernetes_policy = updates.borrow_and_update().clone();
                }
                if let Some(updates) = kube_updates.as_mut() {
                    desired.kubernetes_services = updates.borrow_and_update().clone();
                }
                policy_waits_for_kubernetes = false;
                services_wait_for_kubernetes = false;
                info!("Kubernetes listed");
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
            Some((enabled, reply)) = flow_events_calls.recv() => {
                let result = set_flow_events(enabled, &mut flow_events_switch, &mut datapath,
                                             &mut cidr_deny, &metrics, &events);
                if result.is_ok() {
                    save_flow_events(&flow_events_switch, &saved_flow_events);
                }
                flow_events_published
                    .send_replace(flow_events_switch.state(datapath.settings().flow_events));
                let _ = reply.send(result);
                continue;
            }
            Some((request, reply)) = endpoint_calls.recv() => {
                let result = handle_endpoint_request(request, &mut endpoint_store, &mut datapath);
                desired.endpoints = endpoint_store.list();
                publish_endpoints(&endpoints_published, &desired);
                endpoint_answer = Some((reply, result));
                false
            }
            _ = policy_tick.tick() => {
                drain_policy(&mut policy, &cidr_deny, &mut datapath, &metrics, &events);
                continue;
            }
            _ = stats_tick.tick() => {
                if policy.pending() {
                    if let Some(desired) = policy.desired() {
                        reconcile_policy(&mut policy, &desired, &metrics, &events);
                    }
                }
                if collect_vanished_endpoints(&mut endpoint_store, Some(&mut datapath)) {
                    desired.endpoints = endpoint_store.list();
                    publish_endpoints(&endpoints_published, &desired);
                    if !policy_waits_for_kubernetes {
                        reconcile_policy(&mut policy, &desired.merged_policy(), &metrics, &events);
                    }
                }
                conntrack.refresh(&datapath);
                match datapath.release_retired_backends() {
                    Ok(0) => {}
                    Ok(_) => publish_applied(&applied_tx, &applied, &datapath),
                    Err(err) => warn!("removing retired backends: {err:#}"),
                }
                refresh_metrics(&datapath, &applied, &checker, &metrics, &conntrack, !options.stats_interval.is_zero());
                continue;
            }
        };
        if file_changed {
            match Config::from_file(&options.config_path) {
                Ok(file) => {
                    info!(path = %options.config_path.display(), "config file changed");
                    grpc_source.set_base_config(&file);
                    if flow_events_switch.set_file(file.flow_events) {
                        let text = "the config file's flow_events changed: it decides flow \
                                    events again, the gRPC API's setting is dropped";
                        info!("{text}");
                        events.publish(Event::new(EventKind::ServiceChanged, text));
                        save_flow_events(&flow_events_switch, &saved_flow_events);
                    }
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
        if services_wait_for_kubernetes {
            debug!("services unchanged until Kubernetes is listed");
        } else {
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
                    publish_applied(&applied_tx, &applied, &datapath);
                    if file_changed {
                        info!(services = applied.services.len(), "config reloaded");
                    }
                }
                Err(err) => {
                    error!("reconcile failed, the datapath keeps its previous state: {err:#}");
                    events.publish(Event::new(EventKind::ReconcileFailed, format!("{err:#}")));
                }
            }
        }
        // Flow events as the switch says (the API, the file or the flag) and a CIDR deny list in
        // the applied policy (kept as it is while the services wait for Kubernetes).
        let wanted = ProgramSettings {
            flow_events: flow_events_switch.wanted(),
            cidr_deny: if services_wait_for_kubernetes {
                datapath.settings().cidr_deny
            } else {
                !applied.policy.cidr_deny.is_empty()
            },
        };
        // A failure is reported by the call and tried again at the next change.
        let _ = reload_programs(&mut datapath, wanted, &mut cidr_deny, &metrics, &events);
        flow_events_published
            .send_replace(flow_events_switch.state(datapath.settings().flow_events));
        if !services_wait_for_kubernetes {
            reconcile_cidr_deny(&mut cidr_deny, &mut datapath, &applied, &metrics, &events);
        }
        // After the services: loading the policy programs (first policy) takes a while.
        if !policy_waits_for_kubernetes {
            reconcile_policy(&mut policy, &desired.merged_policy(), &metrics, &events);
        }
        if let Some((reply, result)) = endpoint_answer.take() {
            let _ = reply.send(result);
        }
    }

    readiness.set_not_ready("stopping");
    for task in [ebpf_log, flow_events].into_iter().flatten() {
        task.abort();
    }
    // Pinned policy links stay attached for the next agent (see `crate::policy::enforcer`).
    drop(policy);
    datapath.detach_all();
    if let Some(pins) = datapath.pin_dir() {
        info!(dir = %pins.root().display(),
              "datapath left attached and pinned for the next agent (`lb-agent detach` removes it)");
    }
    refresh_metrics(&datapath, &applied, &checker, &metrics, &conntrack, true);
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

/// Registers or releases an endpoint: attaches or detaches the workload programs and writes the
/// registrations; the caller then reconciles the policy, which puts the interface on the pod's
/// workload. A refused registration changes nothing.
fn handle_endpoint_request(
    request: EndpointRequest,
    store: &mut EndpointStore,
    datapath: &mut Datapath,
) -> Result<EndpointReply, tonic::Status> {
    match request {
        EndpointRequest::Register(endpoint) => {
            let interface = endpoint.host_interface.clone();
            if !endpoints::interface_exists(&interface) {
                return Err(tonic::Status::invalid_argument(format!(
                    "endpoint.host_interface: no interface {interface} on this node"
                )));
            }
            let key = endpoint.key();
            if let Some(other) = store.using_interface(&interface, &key) {
                return Err(tonic::Status::invalid_argument(format!(
                    "endpoint.host_interface: {interface} is registered for container {} ({})",
                    other.container_id, other.interface_name
                )));
            }
            let previous = store.get(&key).cloned();
            if previous.as_ref() == Some(&endpoint) {
                return Ok(EndpointReply::Registered(Change::Unchanged));
            }
            datapath
                .attach_with(&interface, AttachMode::Workload)
                .map_err(|err| {
                    tonic::Status::failed_precondition(format!("attaching to {interface}: {err:#}"))
                })?;
            let moved = previous
                .as_ref()
                .is_some_and(|p| p.host_interface != interface);
            if let Err(err) = store.insert(endpoint.clone()) {
                if previous.is_none() || moved {
                    let _ = datapath.release_interface(&interface);
                }
                return Err(tonic::Status::internal(format!("{err:#}")));
            }
            if let Some(old) = previous.as_ref().filter(|_| moved) {
                if let Err(err) = datapath.release_interface(&old.host_interface) {
                    warn!(interface = %old.host_interface,
                          "releasing the endpoint's previous interface: {err:#}");
                }
            }
            info!(pod = %endpoint.pod_name(), %interface, container = %endpoint.container_id,
                  addresses = ?endpoint.addresses, "endpoint registered");
            Ok(EndpointReply::Registered(match previous {
                None => Change::Created,
                Some(_) => Change::Changed,
            }))
        }
        EndpointRequest::Release(key) => {
            let Some(endpoint) = store.get(&key).cloned() else {
                return Ok(EndpointReply::Released(false));
            };
            store
                .remove(&key)
                .map_err(|err| tonic::Status::internal(format!("{err:#}")))?;
            if let Err(err) = datapath.release_interface(&endpoint.host_interface) {
                warn!(interface = %endpoint.host_interface, "releasing the endpoint: {err:#}");
            }
            info!(pod = %endpoint.pod_name(), interface = %endpoint.host_interface,
                  container = %endpoint.container_id, "endpoint released");
            Ok(EndpointReply::Released(true))
        }
    }
}

/// Releases the registered endpoints whose host interface is gone (the pod's veth was deleted
/// without a CNI DEL reaching the agent); `true` if any was. Without a datapath (at start, before
/// it is loaded) only the registrations are forgotten: their pinned links are released with the
/// other interfaces no longer configured.
fn collect_vanished_endpoints(
    store: &mut EndpointStore,
    mut datapath: Option<&mut Datapath>,
) -> bool {
    let mut collected = false;
    for endpoint in store.list() {
        if endpoints::interface_exists(&endpoint.host_interface) {
            continue;
        }
        if let Err(err) = store.remove(&endpoint.key()) {
            warn!("forgetting the endpoint of a vanished interface: {err:#}");
            continue;
        }
        if let Some(datapath) = datapath.as_deref_mut() {
            if let Err(err) = datapath.release_interface(&endpoint.host_interface) {
                warn!(interface = %endpoint.host_interface, "releasing the endpoint: {err:#}");
            }
        }
        info!(pod = %endpoint.pod_name(), interface = %endpoint.host_interface,
              container = %endpoint.container_id, "endpoint collected: its interface is gone");
        collected = true;
    }
    collected
}

/// Tells `ListState` the registered endpoints and where they went in the policy.
fn publish_endpoints(tx: &watch::Sender<Vec<(Endpoint, Placement)>>, desired: &Desired) {
    tx.send_replace(
        desired
            .endpoints
            .iter()
            .cloned()
            .zip(desired.endpoint_placements())
            .collect(),
    );
}

/// Tells `ListState` what is applied: `config` and the datapath's retired backends.
fn publish_applied(tx: &watch::Sender<AppliedView>, config: &Config, datapath: &Datapath) {
    tx.send_replace(AppliedView {
        config: config.clone(),
        retired_backends: datapath.retired_backends(),
        adopted: false,
    });
}

/// Waits for the next Kubernetes update; never resolves without a Kubernetes source.
async fn changed<T>(updates: &mut Option<watch::Receiver<T>>) -> Result<(), ()> {
    match updates {
        Some(rx) => rx.changed().await.map_err(|_| ()),
        None => std::future::pending().await,
    }
}

/// Resolves once Kubernetes has been listed; never without a Kubernetes source.
async fn listed(kubernetes: &Option<K8sSource>) {
    match kubernetes {
        Some(source) => {
            source
                .wait_synced(Duration::from_secs(u32::MAX as u64))
                .await;
        }
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
    if report.wrote_anything() {
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
    // The CIDR deny list is lb_xdp's (`reconcile_cidr_deny`): alone it needs no TC programs.
    let desired = PolicyConfig {
        cidr_deny: Vec::new(),
        ..desired.clone()
    };
    let started = Instant::now();
    match enforcer.reconcile(&desired) {
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

/// Takes up the gRPC API's flow events setting the previous agent saved, unless `--flow-events`
/// or the config file's `flow_events` changed since (a newer instruction: the saved setting is
/// dropped). An unreadable file is reported and left alone: the file and the flag decide.
fn resume_flow_events(switch: &mut FlowEventsSwitch, saved: &SavedSwitch) {
    match saved.load() {
        Ok(None) => {}
        Ok(Some(setting)) if switch.resume(setting) => {
            info!(flow_events = on_off(setting.enabled), path = %saved.path().display(),
                  "the gRPC API's flow events setting, saved by the previous agent, holds");
        }
        Ok(Some(_)) => {
            info!(path = %saved.path().display(),
                  "the saved gRPC API flow events setting is dropped: --flow-events or the \
                   config file's flow_events changed since it was made");
            save_flow_events(switch, saved);
        }
        Err(err) => warn!("{err:#}; flow events as the config file and the flag say"),
    }
}

/// Keeps the API's flow events setting for the next agent (`None`: removes it); a failure only
/// costs that, so it is logged.
fn save_flow_events(switch: &FlowEventsSwitch, saved: &SavedSwitch) {
    if let Err(err) = saved.save(switch) {
        warn!("{err:#}: the gRPC API's flow events setting will not outlive this agent");
    }
}

/// Applies the gRPC API's flow events setting (`None`: reset) to `switch` and reloads the programs
/// when that changes what they run with. A failed reload puts the switch back as it was and
/// answers the error (`FAILED_PRECONDITION`).
fn set_flow_events(
    enabled: Option<bool>,
    switch: &mut FlowEventsSwitch,
    datapath: &mut Datapath,
    cidr_deny: &mut CidrDenyList,
    metrics: &Metrics,
    events: &EventBus,
) -> Result<FlowEventsReply, tonic::Status> {
    let before = *switch;
    switch.set_api(enabled);
    let wanted = ProgramSettings {
        flow_events: switch.wanted(),
        ..datapath.settings()
    };
    match reload_programs(datapath, wanted, cidr_deny, metrics, events) {
        Ok(changed) => {
            info!(flow_events = on_off(switch.wanted()), source = ?switch.source(),
                  api = ?enabled, "flow events set through the gRPC API");
            Ok(FlowEventsReply {
                state: switch.state(datapath.settings().flow_events),
                changed,
            })
        }
        Err(err) => {
            *switch = before;
            Err(tonic::Status::failed_precondition(format!(
                "flow events not switched, the programs run as they were: {err:#}"
            )))
        }
    }
}

/// Reloads the balancer's programs when `wanted` differs from the settings they run with
/// (`crate::datapath::reload`: hitless, every pinned link updated atomically); `Ok(true)` when it
/// did. A failure is logged, counted and sent as an event, and the programs keep running as they
/// were; `cidr_deny` learns whether the check is loaded.
fn reload_programs(
    datapath: &mut Datapath,
    wanted: ProgramSettings,
    cidr_deny: &mut CidrDenyList,
    metrics: &Metrics,
    events: &EventBus,
) -> Result<bool> {
    let started = Instant::now();
    let result = datapath.reload(wanted);
    match &result {
        Ok(false) => {}
        Ok(true) => {
            let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
            let text = format!(
                "programs reloaded: flow events {}, CIDR deny check {}, {elapsed_ms:.1} ms",
                on_off(wanted.flow_events),
                on_off(wanted.cidr_deny)
            );
            info!("{text}");
            events.publish(Event::new(EventKind::Reconciled, text));
        }
        Err(err) => {
            error!("programs not reloaded, they keep their settings: {err:#}");
            metrics.observe_reconcile(started.elapsed(), false);
            events.publish(Event::new(EventKind::ReconcileFailed, format!("{err:#}")));
        }
    }
    cidr_deny.set_enabled(datapath.settings().cidr_deny);
    result
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// Makes `lb_xdp`'s CIDR deny list the applied config's; a failure is logged, counted and sent as
/// an event, and the maps keep the list they hold.
fn reconcile_cidr_deny(
    list: &mut CidrDenyList,
    datapath: &mut Datapath,
    applied: &Config,
    metrics: &Metrics,
    events: &EventBus,
) {
    let cidrs = &applied.policy.cidr_deny;
    match list.apply(datapath.ebpf_mut(), cidrs) {
        Ok(false) => {}
        Ok(true) => {
            info!(prefixes = cidrs.len(), "XDP CIDR deny list applied");
            events.publish(Event::new(
                EventKind::Reconciled,
                format!("XDP CIDR deny list: {} prefixes", cidrs.len()),
            ));
        }
        Err(err) => {
            error!("XDP CIDR deny list not applied: {err:#}");
            metrics.policy_reconcile_failed();
            events.publish(Event::new(EventKind::ReconcileFailed, format!("{err:#}")));
        }
    }
}

/// Moves the policy datapath's verdict counters (and `lb_xdp`'s CIDR deny drops) into the
/// metrics, and its deny and audit events into log lines and gRPC events.
fn drain_policy(
    enforcer: &mut PolicyEnforcer,
    cidr_deny: &CidrDenyList,
    datapath: &mut Datapath,
    metrics: &Metrics,
    events: &EventBus,
) {
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
            let mut verdicts = enforcer.verdicts().to_vec();
            if cidr_deny.enabled() {
                match cidr_deny::drops(datapath.ebpf_mut()) {
                    Ok(packets) => verdicts.push(metrics::PolicyVerdicts {
                        verdict: Verdict::Deny.name().into(),
                        reason: Reason::CidrDeny.name().into(),
                        packets,
                    }),
                    Err(err) => error!("reading the XDP CIDR deny counter: {err:#}"),
                }
            }
            metrics.update_policy_verdicts(verdicts);
        }
        Err(err) => error!("reading policy verdicts: {err:#}"),
    }
}

/// The last count of the conntrack tables (`Datapath::conntrack_fill`) and when it was taken.
struct ConntrackCount {
    fill: Option<[TableFill; 2]>,
    counted: Instant,
}

impl ConntrackCount {
    /// Counts again when the last count is 9 s old or more: on every tick of the default 10 s
    /// stats interval (a tick may come a little early), every 9 s or so with shorter intervals.
    fn refresh(&mut self, datapath: &Datapath) {
        if self.counted.elapsed() < Duration::from_secs(9) {
            return;
        }
        self.counted = Instant::now();
        match datapath.conntrack_fill() {
            Ok(fill) => self.fill = Some(fill),
            Err(err) => warn!("counting conntrack entries: {err:#}"),
        }
    }
}

fn refresh_metrics(
    datapath: &Datapath,
    applied: &Config,
    checker: &HealthChecker,
    metrics: &Metrics,
    conntrack: &ConntrackCount,
    log: bool,
) {
    match DatapathSnapshot::read(datapath, applied) {
        Ok(mut snapshot) => {
            if let Some(tables) = &conntrack.fill {
                snapshot.conntrack_entries = Some(tables.iter().map(|t| t.entries).sum());
                snapshot.map_fill.extend(tables.iter().map(|t| MapFill {
                    map: t.map.into(),
                    entries: t.entries,
                    capacity: u64::from(t.capacity),
                }));
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

/// Policy endpoints' interfaces attached with plain `lb_tc`: there the policy runs before the
/// translation, so a client's egress rules see the VIP, not the backend it balances to.
fn warn_policy_endpoints_on_plain_tc(interfaces: &[String], policy: &PolicyConfig) {
    for workload in &policy.workloads {
        if let Some(interface) = workload
            .interface
            .as_ref()
            .filter(|i| interfaces.contains(i))
        {
            warn!(interface, workload = %workload.name,
                  "policy endpoint attached with --attach tc: its egress rules see VIPs, not the \
                   backends they balance to; name it with --workload-iface instead");
        }
    }
}
