//! Prometheus metrics of the agent and its datapath, rendered in the text exposition format
//! (version 0.0.4) for `GET /metrics` (see [`crate::http`]).
//!
//! Names follow `lb_<subsystem>_<name>_<unit>`, with `_total` on counters; labels are `service`,
//! `backend` (`ip:port`, IPv6 as `[ip]:port`), `reason`, `verdict` and `map`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `lb_datapath_packets_total` | counter | `reason` |
//! | `lb_service_packets_total`, `lb_service_bytes_total`, `lb_service_new_flows_total` | counter | `service` |
//! | `lb_backend_packets_total`, `lb_backend_bytes_total`, `lb_backend_new_flows_total` | counter | `service`, `backend` |
//! | `lb_policy_verdicts_total` | counter | `verdict`, `reason` |
//! | `lb_conntrack_entries` | gauge | |
//! | `lb_backends_retired` | gauge | |
//! | `lb_map_fill_ratio` | gauge | `map` |
//! | `lb_backend_healthy` | gauge | `service`, `backend` |
//! | `lb_reconcile_duration_seconds` | histogram | |
//! | `lb_reconcile_errors_total` | counter | |
//! | `lb_policy_reconcile_errors_total` | counter | |
//! | `lb_flow_events_total` | counter | `kind` (`new_flow`, `drop`, `not_forwarded`) |
//!
//! # Kernel counters
//!
//! The datapath's counters live in per-CPU BPF maps and are cumulative since the datapath was
//! loaded: the kernel is the source of truth, the agent only reads them. They are therefore not
//! mirrored into `prometheus` counter objects (which only go up by `inc_by` and would need a
//! reset-then-add that a concurrent scrape could observe half done). Instead the agent hands a
//! plain-data [`DatapathSnapshot`] to [`Metrics::update_datapath`] (periodically, or on each scrape
//! through [`Metrics::set_scrape_hook`]), and a custom [`Collector`] builds counter-typed families
//! from the latest snapshot when scraped. A scrape thus always sees one consistent snapshot, series
//! of removed services and backends disappear with them, and a datapath reload (agent restart)
//! shows up as an ordinary counter reset, which Prometheus' `rate()` handles.
//!
//! Traffic counted by the datapath flows client → VIP → backend (`lb_service_*`, `lb_backend_*`);
//! `lb_datapath_packets_total` counts every packet the XDP program saw, by what it did with it.
//! The `conntrack_midflow_miss` and `conntrack_backend_gone` reasons are events counted in addition
//! to the packet's verdict (`forward_new_flow`), so summing every reason over-counts packets.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use anyhow::{Context, Result};
use lb_common::{
    counters::Counter,
    service::{ServiceKey, TrafficStats},
};
use prometheus::{
    core::{Collector, Desc},
    proto::MetricFamily,
    GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::{
    config::Config,
    datapath::Datapath,
    health::{self, Target},
};

/// Content type of [`Metrics::render`]'s output: the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the reconcile duration histogram: from a no-op reconcile of a few
/// services (sub-millisecond) to rebuilding thousands of large Maglev tables.
pub const RECONCILE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Traffic of one service, as counted by the datapath since it was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTraffic {
    pub service: String,
    pub stats: TrafficStats,
}

/// Traffic of one backend, as counted by the datapath since it was loaded.
///
/// The datapath counts per backend address (`ip:port`), not per (service, backend): a backend
/// that several services name (e.g. a DNS pod behind a TCP and a UDP service) has one set of
/// counters. It is exported once, its `service` label listing those services, sorted and joined
/// with `,`, so that sums over backends never count a packet twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTraffic {
    pub service: String,
    pub backend: SocketAddr,
    pub stats: TrafficStats,
}

/// How full one BPF map is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapFill {
    /// The map's name in the object, e.g. `SERVICES`.
    pub map: String,
    pub entries: u64,
    pub capacity: u64,
}

impl MapFill {
    /// `entries / capacity`, 0 for a map of no capacity.
    pub fn ratio(&self) -> f64 {
        if self.capacity == 0 {
            0.0
        } else {
            self.entries as f64 / self.capacity as f64
        }
    }
}

/// Packets counted by one policy verdict and reason (the policy programs' `POLICY_COUNTERS`), fed
/// by [`Metrics::update_policy_verdicts`]; no series while no policy is enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyVerdicts {
    /// e.g. `allow`, `deny`.
    pub verdict: String,
    /// e.g. `default_deny`, `allowed_by_rule` (`lb_common::policy::Reason::name`).
    pub reason: String,
    pub packets: u64,
}

/// Plain data read from the datapath: everything `/metrics` shows about the kernel side. Filled by
/// [`DatapathSnapshot::read`] in the agent, or by hand in tests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DatapathSnapshot {
    /// Cumulative packets per counter reason, summed over CPUs ([`Datapath::counters`]).
    pub counters: Vec<(Counter, u64)>,
    pub services: Vec<ServiceTraffic>,
    pub backends: Vec<BackendTraffic>,
    /// Live entries of the `CONNTRACK_V4` and `CONNTRACK_V6` maps together; `None` = not known (no
    /// series is exported).
    pub conntrack_entries: Option<u64>,
    /// Backends no service names any more, kept while their tracked flows live
    /// (`Datapath::retired_backends`).
    pub retired_backends: u64,
    pub map_fill: Vec<MapFill>,
    /// Kept across [`Metrics::update_datapath`] calls; see [`Metrics::update_policy_verdicts`].
    pub policy_verdicts: Vec<PolicyVerdicts>,
}

impl DatapathSnapshot {
    /// Reads counters and per-service/backend traffic of every service of `config` that is
    /// programmed in `datapath` (a service that failed to program is skipped), and the fill of
    /// `SERVICES` and `BACKENDS` as implied by them. `config` must be the config last applied.
    ///
    /// Not read here: the conntrack entry count and the fill of its tables (a walk of every
    /// entry, which the agent does every 10 s: `Datapath::conntrack_fill`), and the Maglev table
    /// slots in use. The caller may set [`conntrack_entries`](Self::conntrack_entries) and push
    /// to [`map_fill`](Self::map_fill).
    pub fn read(datapath: &Datapath, config: &Config) -> Result<Self> {
        let counters = datapath.counters().context("reading datapath counters")?;
        let mut services = Vec::new();
        let mut programmed = BTreeSet::new();
        // Backend (address, port) → names of the programmed services that use it.
        let mut backend_services: BTreeMap<(IpAddr, u16), BTreeSet<&str>> = BTreeMap::new();
        for service in &config.services {
            let key = ServiceKey::new(service.vip, service.port, service.protocol.number());
            let Some(stats) = datapath
                .service_stats(&key)
                .with_context(|| format!("reading the traffic of service {}", service.name))?
            else {
                continue;
            };
            programmed.insert(key);
            services.push(ServiceTraffic {
                service: service.name.clone(),
                stats,
            });
            for backend in &service.backends {
                backend_services
                    .entry((backend.address, backend.port))
                    .or_default()
                    .insert(&service.name);
            }
        }
        let mut backends = Vec::with_capacity(backend_services.len());
        for ((address, port), names) in &backend_services {
            let backend = SocketAddr::new(*address, *port);
            if let Some(stats) = datapath
                .backend_stats(*address, *port)
                .with_context(|| format!("reading the traffic of backend {backend}"))?
            {
                backends.push(BackendTraffic {
                    service: names.iter().copied().collect::<Vec<_>>().join(","),
                    backend,
                    stats,
                });
            }
        }
        let map_fill = vec![
            MapFill {
                map: "SERVICES".into(),
                entries: programmed.len() as u64,
                capacity: u64::from(datapath.capacity().services),
            },
            MapFill {
                map: "BACKENDS".into(),
                entries: backend_services.len() as u64,
                capacity: u64::from(datapath.capacity().backends),
            },
        ];
        Ok(DatapathSnapshot {
            counters,
            services,
            backends,
            conntrack_entries: None,
            retired_backends: datapath.retired_backends().len() as u64,
            map_fill,
            policy_verdicts: Vec::new(),
        })
    }
}

/// Health of one health-checked backend of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendHealth {
    pub service: String,
    pub backend: SocketAddr,
    pub healthy: bool,
}

/// The health of every health-checked backend of `config`, per service. A backend whose target is
/// not in `snapshot` yet counts as healthy, as the checker starts it (see [`crate::health`]);
/// backends of services without a health check are left out (they have no health).
pub fn backend_health(config: &Config, snapshot: &health::Snapshot) -> Vec<BackendHealth> {
    config
        .services
        .iter()
        .flat_map(|service| {
            service.backends.iter().filter_map(move |backend| {
                let target = Target::for_backend(service, backend)?;
                Some(BackendHealth {
                    service: service.name.clone(),
                    backend: SocketAddr::new(backend.address, backend.port),
                    healthy: snapshot.get(&target).is_none_or(|h| h.healthy),
                })
            })
        })
        .collect()
}

/// Produces a fresh [`DatapathSnapshot`] when `/metrics` is scraped; `None` keeps the last one.
pub type ScrapeHook = Box<dyn Fn() -> Option<DatapathSnapshot> + Send + Sync>;

/// The agent's metrics: a registry holding the reconcile metrics and a collector of the latest
/// datapath and health snapshots. Share it as `Arc<Metrics>`; every method takes `&self`.
pub struct Metrics {
    registry: Registry,
    snapshots: Arc<SnapshotCollector>,
    reconcile_duration: Histogram,
    reconcile_errors: IntCounter,
    policy_reconcile_errors: IntCounter,
    flow_events: IntCounterVec,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "lb_reconcile_duration_seconds",
                "Time taken by one reconcile of the datapath maps with the desired state, \
                 failed ones included.",
            )
            .buckets(RECONCILE_BUCKETS.to_vec()),
        )
        .expect("valid histogram");
        let reconcile_errors = IntCounter::with_opts(Opts::new(
            "lb_reconcile_errors_total",
            "Reconciles that failed (the datapath keeps the last good state).",
        ))
        .expect("valid counter");
        let policy_reconcile_errors = IntCounter::with_opts(Opts::new(
            "lb_policy_reconcile_errors_total",
            "Policy reconciles that failed (the last good rule set stays in force).",
        ))
        .expect("valid counter");
        let flow_events = IntCounterVec::new(
            Opts::new(
                "lb_flow_events_total",
                "Flow events of the datapath published on the event stream (with --flow-events); \
                 those a full ring buffer lost are lb_datapath_packets_total{reason=\"flow_events_lost\"}.",
            ),
            &["kind"],
        )
        .expect("valid counter");
        let snapshots = Arc::new(SnapshotCollector::new());
        registry
            .register(Box::new(reconcile_duration.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(reconcile_errors.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(policy_reconcile_errors.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(flow_events.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(SharedCollector(snapshots.clone())))
            .expect("unique metrics");
        Metrics {
            registry,
            snapshots,
            reconcile_duration,
            reconcile_errors,
            policy_reconcile_errors,
            flow_events,
        }
    }

    /// The registry, for other subsystems to register their own metrics in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Replaces the datapath snapshot that scrapes show.
    pub fn update_datapath(&self, snapshot: DatapathSnapshot) {
        let mut state = self.snapshots.state();
        let policy_verdicts = std::mem::take(&mut state.datapath.policy_verdicts);
        state.datapath = snapshot;
        if state.datapath.policy_verdicts.is_empty() {
            state.datapath.policy_verdicts = policy_verdicts;
        }
    }

    /// Replaces the policy verdict counters that scrapes show (`lb_policy_verdicts_total`); they
    /// are read more often than the rest of the datapath snapshot, and kept when it is replaced.
    pub fn update_policy_verdicts(&self, verdicts: Vec<PolicyVerdicts>) {
        self.snapshots.state().datapath.policy_verdicts = verdicts;
    }

    /// Counts a policy reconcile that failed (the last good rule set stays in force).
    pub fn policy_reconcile_failed(&self) {
        self.policy_reconcile_errors.inc();
    }

    /// Counts a flow event published on the event stream (`kind`: `new_flow`, `drop` or
    /// `not_forwarded`).
    pub fn flow_event_published(&self, kind: &str) {
        self.flow_events.with_label_values(&[kind]).inc();
    }

    /// Called on every scrape before rendering; a `Some` result replaces the datapath snapshot.
    pub fn set_scrape_hook(&self, hook: ScrapeHook) {
        self.snapshots.state().hook = Some(Arc::new(hook));
    }

    /// Replaces the backend health that scrapes show (`lb_backend_healthy`).
    pub fn update_health(&self, health: Vec<BackendHealth>) {
        self.snapshots.state().health = health;
    }

    /// Records one reconcile: its duration, and whether it failed.
    pub fn observe_reconcile(&self, elapsed: Duration, succeeded: bool) {
        self.reconcile_duration.observe(elapsed.as_secs_f64());
        if !succeeded {
            self.reconcile_errors.inc();
        }
    }

    /// Every metric family, as of now (runs the scrape hook).
    pub fn gather(&self) -> Vec<MetricFamily> {
        self.registry.gather()
    }

    /// The text exposition (format 0.0.4, [`CONTENT_TYPE`]) of every metric.
    pub fn render(&self) -> Result<String> {
        TextEncoder::new()
            .encode_to_string(&self.gather())
            .context("encoding metrics")
    }
}

/// One metric family built from a snapshot.
struct Family {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
}

const DATAPATH_PACKETS: Family = Family {
    name: "lb_datapath_packets_total",
    help: "Packets seen by the XDP program, by what it did with them (reason), since the datapath \
           was loaded. conntrack_* reasons are events counted in addition to the packet's verdict.",
    labels: &["reason"],
};
const SERVICE_PACKETS: Family = Family {
    name: "lb_service_packets_total",
    help: "Packets to the service's VIP forwarded to a backend.",
    labels: &["service"],
};
const SERVICE_BYTES: Family = Family {
    name: "lb_service_bytes_total",
    help: "Bytes (frame lengths) of the packets counted by lb_service_packets_total.",
    labels: &["service"],
};
const SERVICE_NEW_FLOWS: Family = Family {
    name: "lb_service_new_flows_total",
    help: "Flows to the service that chose a backend through the Maglev table (conntrack misses).",
    labels: &["service"],
};
const BACKEND_PACKETS: Family = Family {
    name: "lb_backend_packets_total",
    help: "Packets forwarded to the backend. A backend named by several services is counted once, \
           its service label listing them joined by ','.",
    labels: &["service", "backend"],
};
const BACKEND_BYTES: Family = Family {
    name: "lb_backend_bytes_total",
    help: "Bytes (frame lengths) of the packets counted by lb_backend_packets_total.",
    labels: &["service", "backend"],
};
const BACKEND_NEW_FLOWS: Family = Family {
    name: "lb_backend_new_flows_total",
    help: "Flows that the Maglev table sent to the backend (conntrack misses).",
    labels: &["service", "backend"],
};
const POLICY_VERDICTS: Family = Family {
    name: "lb_policy_verdicts_total",
    help: "Packets checked by the policy programs, by verdict and reason (no series while no policy is enforced).",
    labels: &["verdict", "reason"],
};
const CONNTRACK_ENTRIES: Family = Family {
    name: "lb_conntrack_entries",
    help: "Live entries of the CONNTRACK_V4 and CONNTRACK_V6 maps (tracked flows).",
    labels: &[],
};
const BACKENDS_RETIRED: Family = Family {
    name: "lb_backends_retired",
    help: "Backends no service names any more, kept while their tracked flows live.",
    labels: &[],
};
const MAP_FILL: Family = Family {
    name: "lb_map_fill_ratio",
    help: "Entries of a BPF map divided by its capacity.",
    labels: &["map"],
};
const BACKEND_HEALTHY: Family = Family {
    name: "lb_backend_healthy",
    help: "1 while the backend's health check passes (new flows allowed), 0 while it fails. \
           Only health-checked backends.",
    labels: &["service", "backend"],
};

const COUNTER_FAMILIES: [&Family; 8] = [
    &DATAPATH_PACKETS,
    &SERVICE_PACKETS,
    &SERVICE_BYTES,
    &SERVICE_NEW_FLOWS,
    &BACKEND_PACKETS,
    &BACKEND_BYTES,
    &BACKEND_NEW_FLOWS,
    &POLICY_VERDICTS,
];
const GAUGE_FAMILIES: [&Family; 4] = [
    &CONNTRACK_ENTRIES,
    &BACKENDS_RETIRED,
    &MAP_FILL,
    &BACKEND_HEALTHY,
];

impl Family {
    fn counters(&self) -> IntCounterVec {
        IntCounterVec::new(Opts::new(self.name, self.help), self.labels).expect("valid family")
    }

    fn gauges(&self) -> GaugeVec {
        GaugeVec::new(Opts::new(self.name, self.help), self.labels).expect("valid family")
    }
}

#[derive(Default)]
struct SnapshotState {
    datapath: DatapathSnapshot,
    health: Vec<BackendHealth>,
    hook: Option<Arc<ScrapeHook>>,
}

/// Exposes the latest snapshots. Each scrape builds fresh, unregistered metric vectors from the
/// snapshot (cheap: one entry per series) and returns their families, so the output is exactly
/// the snapshot: counter-typed where the kernel value is cumulative, without ever decrementing or
/// resetting a live `prometheus` counter.
struct SnapshotCollector {
    descs: Vec<Desc>,
    state: Mutex<SnapshotState>,
}

impl SnapshotCollector {
    fn new() -> Self {
        let mut descs = Vec::new();
        for family in COUNTER_FAMILIES {
            descs.extend(family.counters().desc().into_iter().cloned());
        }
        for family in GAUGE_FAMILIES {
            descs.extend(family.gauges().desc().into_iter().cloned());
        }
        SnapshotCollector {
            descs,
            state: Mutex::new(SnapshotState::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, SnapshotState> {
        // The state is plain data replaced whole: a panic elsewhere cannot leave it half written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn backend_label(backend: &SocketAddr) -> String {
    backend.to_string()
}

impl Collector for SnapshotCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // Run the hook without holding the lock: it may be slow (map reads) or update the state.
        let hook = self.state().hook.clone();
        if let Some(snapshot) = hook.and_then(|hook| hook()) {
            self.state().datapath = snapshot;
        }
        let state = self.state();
        let dp = &state.datapath;

        let packets = DATAPATH_PACKETS.counters();
        for (counter, value) in &dp.counters {
            packets.with_label_values(&[counter.name()]).inc_by(*value);
        }

        let (service_packets, service_bytes, service_flows) = (
            SERVICE_PACKETS.counters(),
            SERVICE_BYTES.counters(),
            SERVICE_NEW_FLOWS.counters(),
        );
        for s in &dp.services {
            let labels = [s.service.as_str()];
            service_packets
                .with_label_values(&labels)
                .inc_by(s.stats.packets);
            service_bytes
                .with_label_values(&labels)
                .inc_by(s.stats.bytes);
            service_flows
                .with_label_values(&labels)
                .inc_by(s.stats.new_flows);
        }

        let (backend_packets, backend_bytes, backend_flows) = (
            BACKEND_PACKETS.counters(),
            BACKEND_BYTES.counters(),
            BACKEND_NEW_FLOWS.counters(),
        );
        for b in &dp.backends {
            let backend = backend_label(&b.backend);
            let labels = [b.service.as_str(), backend.as_str()];
            backend_packets
                .with_label_values(&labels)
                .inc_by(b.stats.packets);
            backend_bytes
                .with_label_values(&labels)
                .inc_by(b.stats.bytes);
            backend_flows
                .with_label_values(&labels)
                .inc_by(b.stats.new_flows);
        }

        let verdicts = POLICY_VERDICTS.counters();
        for v in &dp.policy_verdicts {
            verdicts
                .with_label_values(&[v.verdict.as_str(), v.reason.as_str()])
                .inc_by(v.packets);
        }

        let conntrack = CONNTRACK_ENTRIES.gauges();
        if let Some(entries) = dp.conntrack_entries {
            conntrack.with_label_values::<&str>(&[]).set(entries as f64);
        }

        let retired = BACKENDS_RETIRED.gauges();
        retired
            .with_label_values::<&str>(&[])
            .set(dp.retired_backends as f64);

        let fill = MAP_FILL.gauges();
        for m in &dp.map_fill {
            fill.with_label_values(&[m.map.as_str()]).set(m.ratio());
        }

        let healthy = BACKEND_HEALTHY.gauges();
        for h in &state.health {
            let backend = backend_label(&h.backend);
            healthy
                .with_label_values(&[h.service.as_str(), backend.as_str()])
                .set(if h.healthy { 1.0 } else { 0.0 });
        }

        let mut families = Vec::new();
        for vec in [
            &packets,
            &service_packets,
            &service_bytes,
            &service_flows,
            &backend_packets,
            &backend_bytes,
            &backend_flows,
            &verdicts,
        ] {
            families.extend(vec.collect());
        }
        for vec in [&conntrack, &retired, &fill, &healthy] {
            families.extend(vec.collect());
        }
        families
    }
}

/// Registers the shared collector while [`Metrics`] keeps a handle to feed it.
struct SharedCollector(Arc<SnapshotCollector>);

impl Collector for SharedCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        collections::{HashMap, HashSet},
        time::Instant,
    };

    use prometheus_parse::{LineInfo, Sample, Scrape, Value};

    use super::*;
    use crate::health::Health;
    use lb_common::service::limits;

    /// Parses an exposition with `prometheus-parse`, first checking every line strictly: the
    /// parser skips lines it does not understand, so a malformed line would otherwise go unseen.
    /// Also checks that every sample belongs to a family declared by `# TYPE` (histograms through
    /// their `_bucket`, `_sum` and `_count` samples) and that every family has a `# HELP`.
    pub(crate) fn parse(text: &str) -> Scrape {
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helps = HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                assert!(
                    types.insert(name.into(), kind.into()).is_none(),
                    "family {name} declared twice"
                );
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                helps.insert(rest.split_once(' ').expect("HELP line").0.to_string());
                continue;
            }
            match LineInfo::parse(line) {
                LineInfo::Sample {
                    metric_name, value, ..
                } => {
                    assert!(
                        value.parse::<f64>().is_ok(),
                        "value of {line:?} is not a number"
                    );
                    let family = std::iter::once(metric_name)
                        .chain(
                            ["_bucket", "_sum", "_count"]
                                .iter()
                                .filter_map(|s| metric_name.strip_suffix(s)),
                        )
                        .find(|name| types.contains_key(*name))
                        .unwrap_or_else(|| panic!("sample {line:?} of no declared family"));
                    if family != metric_name {
                        assert_eq!(types[family], "histogram", "{line:?}");
                    }
                }
                other => panic!("line {line:?} is not a sample but {other:?}"),
            }
        }
        for name in types.keys() {
            assert!(helps.contains(name), "family {name} has no HELP");
        }
        Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("exposition parses")
    }

    /// The `# TYPE` of every family in `text`.
    pub(crate) fn types(text: &str) -> HashMap<String, String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| {
                let (name, kind) = l.split_once(' ').unwrap();
                (name.to_string(), kind.to_string())
            })
            .collect()
    }

    /// The samples of `metric` whose labels are exactly `labels`.
    fn find<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
        scrape
            .samples
            .iter()
            .filter(|s| {
                s.metric == metric
                    && s.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
            })
            .collect()
    }

    /// The value of the one sample of `metric` with exactly `labels`.
    pub(crate) fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Value {
        let found = find(scrape, metric, labels);
        assert_eq!(found.len(), 1, "{metric} {labels:?}: {found:?}");
        found[0].value.clone()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn stats(packets: u64, bytes: u64, new_flows: u64) -> TrafficStats {
        TrafficStats {
            packets,
            bytes,
            new_flows,
        }
    }

    fn snapshot() -> DatapathSnapshot {
        DatapathSnapshot {
            counters: Counter::ALL
                .iter()
                .map(|c| (*c, 1000 + *c as u64))
                .collect(),
            services: vec![
                ServiceTraffic {
                    service: "web".into(),
                    stats: stats(300, 45_000, 30),
                },
                ServiceTraffic {
                    service: "web6".into(),
                    stats: stats(7, 1_000, 1),
                },
            ],
            backends: vec![
                BackendTraffic {
                    service: "web".into(),
                    backend: sa("203.0.113.11:8080"),
                    stats: stats(100, 15_000, 10),
                },
                BackendTraffic {
                    service: "web".into(),
                    backend: sa("203.0.113.12:8080"),
                    stats: stats(200, 30_000, 20),
                },
                BackendTraffic {
                    service: "web6".into(),
                    backend: sa("[2001:db8:203::11]:8443"),
                    stats: stats(7, 1_000, 1),
                },
            ],
            conntrack_entries: Some(42),
            retired_backends: 1,
            map_fill: vec![
                MapFill {
                    map: "SERVICES".into(),
                    entries: 2,
                    capacity: 4096,
                },
                MapFill {
                    map: "CONNTRACK_V4".into(),
                    entries: 42,
                    capacity: 168,
                },
            ],
            policy_verdicts: Vec::new(),
        }
    }

    #[test]
    fn snapshot_renders_as_typed_families() {
        let metrics = Metrics::new();
        metrics.update_datapath(snapshot());
        let text = metrics.render().unwrap();
        let scrape = parse(&text);

        let types = types(&text);
        for (name, kind) in [
            ("lb_datapath_packets_total", "counter"),
            ("lb_service_packets_total", "counter"),
            ("lb_service_bytes_total", "counter"),
            ("lb_service_new_flows_total", "counter"),
            ("lb_backend_packets_total", "counter"),
            ("lb_backend_bytes_total", "counter"),
            ("lb_backend_new_flows_total", "counter"),
            ("lb_conntrack_entries", "gauge"),
            ("lb_backends_retired", "gauge"),
            ("lb_map_fill_ratio", "gauge"),
            ("lb_reconcile_duration_seconds", "histogram"),
        ] {
            assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
        }
        // Naming convention: lb_ prefix, `_total` exactly on counters.
        for (name, kind) in &types {
            assert!(name.starts_with("lb_"), "{name}");
            assert_eq!(name.ends_with("_total"), kind == "counter", "{name} {kind}");
        }

        for c in Counter::ALL {
            assert_eq!(
                value(
                    &scrape,
                    "lb_datapath_packets_total",
                    &[("reason", c.name())]
                ),
                Value::Counter(1000.0 + *c as u64 as f64),
                "{}",
                c.name()
            );
        }
        let web = [("service", "web")];
        assert_eq!(
            value(&scrape, "lb_service_packets_total", &web),
            Value::Counter(300.0)
        );
        assert_eq!(
            value(&scrape, "lb_service_bytes_total", &web),
            Value::Counter(45_000.0)
        );
        assert_eq!(
            value(&scrape, "lb_service_new_flows_total", &web),
            Value::Counter(30.0)
        );
        let b2 = [("service", "web"), ("backend", "203.0.113.12:8080")];
        assert_eq!(
            value(&scrape, "lb_backend_packets_total", &b2),
            Value::Counter(200.0)
        );
        assert_eq!(
            value(&scrape, "lb_backend_bytes_total", &b2),
            Value::Counter(30_000.0)
        );
        assert_eq!(
            value(&scrape, "lb_backend_new_flows_total", &b2),
            Value::Counter(20.0)
        );
        // IPv6 backends are labelled [ip]:port.
        assert_eq!(
            value(
                &scrape,
                "lb_backend_packets_total",
                &[("service", "web6"), ("backend", "[2001:db8:203::11]:8443")]
            ),
            Value::Counter(7.0)
        );
        assert_eq!(
            value(&scrape, "lb_conntrack_entries", &[]),
            Value::Gauge(42.0)
        );
        assert_eq!(
            value(&scrape, "lb_backends_retired", &[]),
            Value::Gauge(1.0)
        );
        assert_eq!(
            value(&scrape, "lb_map_fill_ratio", &[("map", "CONNTRACK_V4")]),
            Value::Gauge(0.25)
        );
        // No policy verdicts fed: the family has no series; no health fed: neither.
        assert!(!text.contains("lb_policy_verdicts_total"));
        assert!(!text.contains("lb_backend_healthy"));
    }

    #[test]
    fn snapshot_replacement_drops_removed_series_and_unknown_conntrack() {
        let metrics = Metrics::new();
        metrics.update_datapath(snapshot());
        let mut next = snapshot();
        next.services.retain(|s| s.service == "web");
        next.backends.retain(|b| b.service == "web");
        next.services[0].stats.packets = 301;
        next.conntrack_entries = None;
        next.policy_verdicts = vec![PolicyVerdicts {
            verdict: "deny".into(),
            reason: "default".into(),
            packets: 9,
        }];
        metrics.update_datapath(next);
        let text = metrics.render().unwrap();
        let scrape = parse(&text);
        assert!(!text.contains("web6"), "{text}");
        assert!(!text.contains("lb_conntrack_entries"), "{text}");
        assert_eq!(
            value(&scrape, "lb_service_packets_total", &[("service", "web")]),
            Value::Counter(301.0)
        );
        assert_eq!(
            value(
                &scrape,
                "lb_policy_verdicts_total",
                &[("verdict", "deny"), ("reason", "default")]
            ),
            Value::Counter(9.0)
        );
        assert_eq!(types(&text)["lb_policy_verdicts_total"], "counter");
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::new();
        metrics.update_datapath(DatapathSnapshot {
            backends: vec![BackendTraffic {
                service: "dns-tcp,dns-udp".into(),
                backend: sa("203.0.113.11:53"),
                stats: stats(5, 500, 1),
            }],
            services: vec![ServiceTraffic {
                service: "we\"ird\\name\n".into(),
                stats: stats(1, 2, 3),
            }],
            ..Default::default()
        });
        let text = metrics.render().unwrap();
        assert!(
            text.contains(
                r#"lb_backend_packets_total{backend="203.0.113.11:53",service="dns-tcp,dns-udp"} 5"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"lb_service_packets_total{service="we\"ird\\name\n"} 1"#),
            "{text}"
        );
        let traffic_lines = text
            .lines()
            .filter(|l| l.starts_with("lb_service_") || l.starts_with("lb_backend_"));
        assert_eq!(traffic_lines.count(), 6, "{text}");
        parse(&text);
    }

    #[test]
    fn published_flow_events_are_counted_by_kind() {
        let metrics = Metrics::new();
        metrics.flow_event_published("new_flow");
        metrics.flow_event_published("new_flow");
        metrics.flow_event_published("drop");
        let text = metrics.render().unwrap();
        assert!(
            text.contains(r#"lb_flow_events_total{kind="new_flow"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"lb_flow_events_total{kind="drop"} 1"#),
            "{text}"
        );
        parse(&text);
    }

    #[test]
    fn reconcile_histogram_buckets_and_errors() {
        let metrics = Metrics::new();
        for (seconds, ok) in [(0.0005, true), (0.003, true), (0.2, false), (40.0, true)] {
            metrics.observe_reconcile(Duration::from_secs_f64(seconds), ok);
        }
        let text = metrics.render().unwrap();
        let scrape = parse(&text);
        let Value::Histogram(buckets) = value(&scrape, "lb_reconcile_duration_seconds", &[]) else {
            panic!("not a histogram: {text}");
        };
        let bounds: Vec<f64> = buckets.iter().map(|b| b.less_than).collect();
        let mut expected = RECONCILE_BUCKETS.to_vec();
        expected.push(f64::INFINITY);
        assert_eq!(bounds, expected);
        let count_at = |le: f64| {
            buckets
                .iter()
                .find(|b| b.less_than == le)
                .map(|b| b.count)
                .unwrap()
        };
        assert_eq!(count_at(0.001), 1.0);
        assert_eq!(count_at(0.0025), 1.0);
        assert_eq!(count_at(0.005), 2.0);
        assert_eq!(count_at(0.25), 3.0);
        assert_eq!(count_at(30.0), 3.0);
        assert_eq!(count_at(f64::INFINITY), 4.0);
        assert_eq!(
            value(&scrape, "lb_reconcile_duration_seconds_count", &[]),
            Value::Untyped(4.0)
        );
        let Value::Untyped(sum) = value(&scrape, "lb_reconcile_duration_seconds_sum", &[]) else {
            panic!()
        };
        assert!((sum - 40.2035).abs() < 1e-9, "{sum}");
        assert_eq!(
            value(&scrape, "lb_reconcile_errors_total", &[]),
            Value::Counter(1.0)
        );
        assert_eq!(types(&text)["lb_reconcile_errors_total"], "counter");
    }

    const HEALTH_CONFIG: &str = "
services:
  - name: web
    vip: 198.51.100.10
    port: 80
    protocol: tcp
    backends:
      - { address: 203.0.113.11, port: 8080 }
      - { address: 203.0.113.12, port: 8080 }
    health_check: { type: tcp }
  - name: unchecked
    vip: 198.51.100.11
    port: 80
    protocol: tcp
    backends:
      - { address: 203.0.113.21, port: 80 }
";

    #[test]
    fn backend_health_gauge_flips() {
        let config = Config::from_yaml(HEALTH_CONFIG).unwrap();
        let metrics = Metrics::new();
        let mut snapshot = health::Snapshot::new();
        let healthy_of = |metrics: &Metrics| {
            let scrape = parse(&metrics.render().unwrap());
            ["203.0.113.11:8080", "203.0.113.12:8080"].map(|b| {
                match value(
                    &scrape,
                    "lb_backend_healthy",
                    &[("service", "web"), ("backend", b)],
                ) {
                    Value::Gauge(v) => v,
                    other => panic!("{other:?}"),
                }
            })
        };

        // Not probed yet: healthy, as the checker starts them; unchecked backends have no series.
        metrics.update_health(backend_health(&config, &snapshot));
        assert_eq!(healthy_of(&metrics), [1.0, 1.0]);
        let text = metrics.render().unwrap();
        assert_eq!(types(&text)["lb_backend_healthy"], "gauge");
        assert!(!text.contains("unchecked"), "{text}");

        let target =
            Target::for_backend(&config.services[0], &config.services[0].backends[1]).unwrap();
        let mut down = Health::new(Instant::now());
        down.healthy = false;
        snapshot.insert(target.clone(), down);
        metrics.update_health(backend_health(&config, &snapshot));
        assert_eq!(healthy_of(&metrics), [1.0, 0.0]);

        snapshot.get_mut(&target).unwrap().healthy = true;
        metrics.update_health(backend_health(&config, &snapshot));
        assert_eq!(healthy_of(&metrics), [1.0, 1.0]);
    }

    #[test]
    fn scrape_hook_refreshes_the_snapshot() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let metrics = Metrics::new();
        let scrapes = Arc::new(AtomicU64::new(0));
        let seen = scrapes.clone();
        metrics.set_scrape_hook(Box::new(move || {
            let n = seen.fetch_add(1, Ordering::Relaxed) + 1;
            // Every other scrape has nothing new: the last snapshot stays.
            (n % 2 == 1).then(|| DatapathSnapshot {
                counters: vec![(Counter::ForwardNewFlow, n)],
                ..Default::default()
            })
        }));
        let reason = [("reason", "forward_new_flow")];
        for expected in [1.0, 1.0, 3.0] {
            let scrape = parse(&metrics.render().unwrap());
            assert_eq!(
                value(&scrape, "lb_datapath_packets_total", &reason),
                Value::Counter(expected)
            );
        }
    }

    /// Ethernet + IPv4 + TCP with `flags` (byte 13 of the TCP header), `src` → `dst`.
    fn tcp(src: SocketAddr, dst: SocketAddr, flags: u8) -> Vec<u8> {
        let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
            panic!("IPv4 only")
        };
        let mut frame = Vec::with_capacity(54);
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00]);
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&40u16.to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64;
        ip[9] = lb_common::protocol::TCP;
        ip[12..16].copy_from_slice(&s.octets());
        ip[16..20].copy_from_slice(&d.octets());
        let sum: u32 = ip
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        let folded = (sum & 0xffff) + (sum >> 16);
        let checksum = !(((folded & 0xffff) + (folded >> 16)) as u16);
        ip[10..12].copy_from_slice(&checksum.to_be_bytes());
        frame.extend_from_slice(&ip);
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&src.port().to_be_bytes());
        tcp[2..4].copy_from_slice(&dst.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
        tcp[12] = 0x50;
        tcp[13] = flags;
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        frame.extend_from_slice(&tcp);
        frame
    }

    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;

    /// Runs `frame` through the loaded XDP program (BPF_PROG_TEST_RUN).
    fn run(datapath: &Mutex<Datapath>, frame: &[u8]) {
        use aya::programs::{TestRun, TestRunOptions};
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        datapath
            .lock()
            .unwrap()
            .xdp_program()
            .test_run(opts)
            .expect("test run");
    }

    fn counter(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
        match value(scrape, metric, labels) {
            Value::Counter(v) => v,
            other => panic!("{metric} {labels:?}: {other:?}"),
        }
    }

    /// Real packets through the loaded XDP program (BPF_PROG_TEST_RUN; needs root, like the
    /// datapath tests), read by `DatapathSnapshot::read` from the scrape hook, fetched from
    /// `GET /metrics` and checked in the parsed output; then more traffic, and a second scrape sees
    /// it.
    #[tokio::test]
    async fn counts_real_datapath_traffic() {
        let config = Config::from_yaml(
            "
services:
  - name: web
    vip: 198.51.100.10
    port: 80
    protocol: tcp
    maglev_table_size: 251
    backends:
      - { address: 203.0.113.11, port: 8080 }
      - { address: 203.0.113.12, port: 8080 }
  - name: empty
    vip: 198.51.100.11
    port: 80
    protocol: tcp
",
        )
        .unwrap();
        let datapath = Datapath::load().expect("load datapath (as root)");
        let datapath = Arc::new(Mutex::new(datapath));
        datapath.lock().unwrap().apply(&config).expect("apply");

        const FLOWS: u16 = 40;
        let vip = sa("198.51.100.10:80");
        let client = |i: u16| sa(&format!("192.0.2.2:{}", 40000 + i));
        for i in 0..FLOWS {
            run(&datapath, &tcp(client(i), vip, SYN));
        }
        for _ in 0..3 {
            run(&datapath, &tcp(client(0), sa("198.51.100.11:80"), SYN));
        }
        let mut arp = vec![0xffu8; 6];
        arp.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x08, 0x06]);
        arp.resize(60, 0);
        run(&datapath, &arp);

        let metrics = Arc::new(Metrics::new());
        let (dp, cfg) = (datapath.clone(), config.clone());
        metrics.set_scrape_hook(Box::new(move || {
            Some(DatapathSnapshot::read(&dp.lock().unwrap(), &cfg).expect("read datapath"))
        }));
        let server = crate::http::HttpServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            metrics,
            crate::http::Readiness::new(),
        )
        .await
        .unwrap();
        let scrape_now = || async {
            let reply = crate::http::tests::get(server.local_addr(), "/metrics").await;
            assert_eq!(reply.status, 200);
            parse(&reply.body)
        };

        let scrape = scrape_now().await;
        let reason = |scrape: &Scrape, r: &str| {
            counter(scrape, "lb_datapath_packets_total", &[("reason", r)])
        };
        let flows = f64::from(FLOWS);
        assert_eq!(reason(&scrape, "forward_new_flow"), flows);
        assert_eq!(reason(&scrape, "forward_conntrack_hit"), 0.0);
        assert_eq!(reason(&scrape, "drop_no_backend"), 3.0);
        assert_eq!(reason(&scrape, "pass_not_ip"), 1.0);
        let web = [("service", "web")];
        assert_eq!(counter(&scrape, "lb_service_packets_total", &web), flows);
        assert_eq!(counter(&scrape, "lb_service_new_flows_total", &web), flows);
        assert_eq!(
            counter(&scrape, "lb_service_bytes_total", &web),
            flows * 54.0
        );
        assert_eq!(
            counter(&scrape, "lb_service_packets_total", &[("service", "empty")]),
            0.0
        );
        let backends = ["203.0.113.11:8080", "203.0.113.12:8080"];
        let per_backend = |scrape: &Scrape| {
            backends.map(|b| {
                counter(
                    scrape,
                    "lb_backend_packets_total",
                    &[("service", "web"), ("backend", b)],
                )
            })
        };
        let first = per_backend(&scrape);
        assert_eq!(first.iter().sum::<f64>(), flows);
        assert!(first.iter().all(|n| *n > 0.0), "{first:?}");
        assert_eq!(
            value(&scrape, "lb_map_fill_ratio", &[("map", "SERVICES")]),
            Value::Gauge(2.0 / f64::from(limits::DEFAULT_SERVICES))
        );
        assert_eq!(
            value(&scrape, "lb_map_fill_ratio", &[("map", "BACKENDS")]),
            Value::Gauge(2.0 / f64::from(limits::DEFAULT_BACKENDS - 1))
        );

        // Ten more packets of tracked flows: conntrack hits, no new flows; the next scrape reads
        // the datapath again.
        for i in 0..10 {
            run(&datapath, &tcp(client(i), vip, ACK));
        }
        let scrape = scrape_now().await;
        assert_eq!(reason(&scrape, "forward_conntrack_hit"), 10.0);
        assert_eq!(reason(&scrape, "forward_new_flow"), flows);
        assert_eq!(
            counter(&scrape, "lb_service_packets_total", &web),
            flows + 10.0
        );
        assert_eq!(counter(&scrape, "lb_service_new_flows_total", &web), flows);
        assert_eq!(per_backend(&scrape).iter().sum::<f64>(), flows + 10.0);
        server.shutdown().await;
    }
}
