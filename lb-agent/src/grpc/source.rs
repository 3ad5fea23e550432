//! [`GrpcSource`]: the desired state set through the API — services keyed by (VIP, port, protocol),
//! and a policy — published on `tokio::sync::watch` channels like [`crate::k8s::K8sSource`] does.
//!
//! Every change is validated as the YAML file is (the candidate state is put in a
//! [`Config`] and [`Config::validate`] runs), before anything is stored: an invalid request
//! changes nothing and its error names the request field, e.g.
//! `service.backends[1].address: 2001:db8::1 is not of the VIP's address family`.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::watch;

use super::{endpoints::EndpointChannel, flow_events::FlowEventsChannel};
use crate::{
    config::{self, BackendConfig, Config, ConfigError, Protocol},
    policy::PolicyConfig,
};

/// What identifies a service: the datapath's key (VIP, port, protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl ServiceKey {
    pub fn new(vip: IpAddr, port: u16, protocol: Protocol) -> Self {
        Self {
            vip,
            port,
            protocol,
        }
    }

    pub fn of(service: &config::Service) -> Self {
        Self::new(service.vip, service.port, service.protocol)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.vip {
            IpAddr::V4(vip) => write!(f, "{vip}:{}/{}", self.port, self.protocol),
            IpAddr::V6(vip) => write!(f, "[{vip}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// Why a request was refused. Maps to gRPC `INVALID_ARGUMENT` and `NOT_FOUND`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// `field` is the request's field path, e.g. `service.maglev_table_size`.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("no service {0} is defined through this API")]
    NotFound(ServiceKey),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A validation error of a one-service [`Config`] (`services[0]...`), renamed to the request
    /// field that held that service: `services[0].port` → `{root}.port` (or `port` if `root` is
    /// empty).
    fn from_config(err: ConfigError, root: &str) -> Self {
        match err {
            ConfigError::Invalid { path, message } => {
                let rename = |text: &str| match text.strip_prefix("services[0]") {
                    Some(rest) if root.is_empty() => rest.trim_start_matches('.').to_string(),
                    Some(rest) => format!("{root}{rest}"),
                    None => text.to_string(),
                };
                // Messages may name other fields too ("duplicate of services[0].backends[0]").
                let message = message.split(' ').map(rename).collect::<Vec<_>>().join(" ");
                ApiError::Invalid {
                    field: rename(&path),
                    message,
                }
            }
            other => ApiError::invalid(root, other.to_string()),
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        match err {
            ApiError::Invalid { .. } => tonic::Status::invalid_argument(err.to_string()),
            ApiError::NotFound(_) => tonic::Status::not_found(err.to_string()),
        }
    }
}

/// Whether a call created, changed or left a service as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Changed,
    Unchanged,
}

#[derive(Debug, Default)]
struct State {
    services: BTreeMap<ServiceKey, config::Service>,
    policy: Option<PolicyConfig>,
    /// Top-level settings requests are validated with (see [`GrpcSource::set_base_config`]).
    base: Config,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    services: watch::Sender<Vec<config::Service>>,
    policy: watch::Sender<Option<PolicyConfig>>,
    /// Set by an agent that takes endpoint registrations (see [`super::endpoints`]).
    endpoints: Mutex<Option<EndpointChannel>>,
    /// Set by an agent, which owns the flow events switch (see [`super::flow_events`]).
    flow_events: Mutex<Option<FlowEventsChannel>>,
}

/// The desired state set through the gRPC API. Cloning shares it; every clone publishes on the
/// same channels.
#[derive(Debug, Clone)]
pub struct GrpcSource {
    inner: Arc<Inner>,
}

impl Default for GrpcSource {
    fn default() -> Self {
        Self::new()
    }
}

impl GrpcSource {
    /// No services, no policy.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                services: watch::Sender::new(Vec::new()),
                policy: watch::Sender::new(None),
                endpoints: Mutex::new(None),
                flow_events: Mutex::new(None),
            }),
        }
    }

    /// A receiver of the desired services, ordered by key; every accepted change that changes
    /// something is one update.
    pub fn subscribe(&self) -> watch::Receiver<Vec<config::Service>> {
        self.inner.services.subscribe()
    }

    /// A receiver of the desired policy (`None`: the API sets none).
    pub fn subscribe_policy(&self) -> watch::Receiver<Option<PolicyConfig>> {
        self.inner.policy.subscribe()
    }

    /// The desired services now, ordered by key.
    pub fn services(&self) -> Vec<config::Service> {
        self.inner.services.borrow().clone()
    }

    pub fn policy(&self) -> Option<PolicyConfig> {
        self.inner.policy.borrow().clone()
    }

    /// Makes `RegisterEndpoint` and `ReleaseEndpoint` calls into the agent's loop through
    /// `channel` (without one they are refused as unimplemented).
    pub fn set_endpoint_channel(&self, channel: EndpointChannel) {
        *self
            .inner
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(channel);
    }

    pub fn endpoint_channel(&self) -> Option<EndpointChannel> {
        self.inner
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes `SetFlowEvents` calls into the agent's loop through `channel` (without one they are
    /// refused as unimplemented, and `ListState` leaves `flow_events` out).
    pub fn set_flow_events_channel(&self, channel: FlowEventsChannel) {
        *self
            .inner
            .flow_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(channel);
    }

    pub fn flow_events_channel(&self) -> Option<FlowEventsChannel> {
        self.inner
            .flow_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The settings outside `services` and `policy` (the `node` section, the Maglev seed, ...)
    /// that requests are validated with: the agent passes its config file's whenever it loads
    /// it, so that e.g. an SNAT service without `snat_address` is accepted when the file sets
    /// `node.ipv4`. Services and policy already accepted are not re-checked: a file change that
    /// invalidates them makes the agent's reconcile fail, with the error, until one side changes.
    /// Default: [`Config::default`].
    pub fn set_base_config(&self, config: &Config) {
        let mut base = config.clone();
        base.services.clear();
        base.policy = PolicyConfig::default();
        self.lock().base = base;
    }

    /// Creates or replaces the service with `service`'s key, backends included.
    pub fn upsert_service(&self, service: config::Service) -> Result<Change, ApiError> {
        let key = ServiceKey::of(&service);
        let mut state = self.lock();
        validate_one(&state.base, &service, "service")?;
        let change = match state.services.get(&key) {
            None => Change::Created,
            Some(current) if *current == service => return Ok(Change::Unchanged),
            Some(_) => Change::Changed,
        };
        let mut candidate = state.services.clone();
        candidate.insert(key, service);
        validate_all(&state.base, &candidate)?;
        state.services = candidate;
        self.publish_services(&state);
        Ok(change)
    }

    /// Removes the service with `key`.
    pub fn delete_service(&self, key: ServiceKey) -> Result<(), ApiError> {
        let mut state = self.lock();
        if state.services.remove(&key).is_none() {
            return Err(ApiError::NotFound(key));
        }
        self.publish_services(&state);
        Ok(())
    }

    /// Replaces the backends of the service with `key`. Errors name `backends[i]...`.
    pub fn set_backends(
        &self,
        key: ServiceKey,
        backends: Vec<BackendConfig>,
    ) -> Result<Change, ApiError> {
        let mut state = self.lock();
        let Some(current) = state.services.get(&key) else {
            return Err(ApiError::NotFound(key));
        };
        if current.backends == backends {
            return Ok(Change::Unchanged);
        }
        let mut service = current.clone();
        service.backends = backends;
        validate_one(&state.base, &service, "")?;
        state.services.insert(key, service);
        self.publish_services(&state);
        Ok(Change::Changed)
    }

    /// Sets (`Some`) or clears (`None`) the policy. An empty policy is the same as none.
    pub fn set_policy(&self, policy: Option<PolicyConfig>) -> Result<Change, ApiError> {
        let policy = policy.filter(|p| *p != PolicyConfig::default());
        let mut state = self.lock();
        if let Some(policy) = &policy {
            let mut config = state.base.clone();
            config.policy = policy.clone();
            config
                .validate()
                .map_err(|err| ApiError::from_config(err, "policy"))?;
        }
        if state.policy == policy {
            return Ok(Change::Unchanged);
        }
        state.policy = policy.clone();
        self.inner.policy.send_replace(policy);
        Ok(Change::Changed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Called with the state locked, so that updates are published in the order they were made.
    fn publish_services(&self, state: &State) {
        self.inner
            .services
            .send_replace(state.services.values().cloned().collect());
    }
}

/// Validates `service` alone, as the only service of `base`; errors are renamed to `root`.
fn validate_one(base: &Config, service: &config::Service, root: &str) -> Result<(), ApiError> {
    let mut config = base.clone();
    config.services = vec![service.clone()];
    config
        .validate()
        .map_err(|err| ApiError::from_config(err, root))
}

/// Validates every service together (limits on the number of services).
fn validate_all(
    base: &Config,
    services: &BTreeMap<ServiceKey, config::Service>,
) -> Result<(), ApiError> {
    let mut config = base.clone();
    config.services = services.values().cloned().collect();
    config.validate().map_err(|err| match err {
        ConfigError::Invalid { path, message } => ApiError::Invalid {
            field: path,
            message,
        },
        other => ApiError::invalid("services", other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn service(vip: &str, port: u16, backends: &[(&str, u16, u32)]) -> config::Service {
        let yaml = format!(
            "name: svc-{port}\nvip: {vip}\nport: {port}\nprotocol: tcp\nbackends: [{}]\n",
            backends
                .iter()
                .map(|(a, p, w)| format!("{{address: \"{a}\", port: {p}, weight: {w}}}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        serde_yaml_ng::from_str(&yaml).unwrap()
    }

    #[test]
    fn upsert_publishes_ordered_services_and_reports_the_change() {
        let source = GrpcSource::new();
        let mut rx = source.subscribe();
        let b = service("198.51.100.20", 80, &[("203.0.113.2", 8080, 1)]);
        let a = service("198.51.100.10", 80, &[("203.0.113.1", 8080, 1)]);
        assert_eq!(source.upsert_service(b.clone()), Ok(Change::Created));
        assert!(rx.has_changed().unwrap());
        assert_eq!(source.upsert_service(a.clone()), Ok(Change::Created));
        assert_eq!(*rx.borrow_and_update(), vec![a.clone(), b.clone()]);
        // The same definition again: no update.
        assert_eq!(source.upsert_service(a.clone()), Ok(Change::Unchanged));
        assert!(!rx.has_changed().unwrap());
        let mut a2 = a.clone();
        a2.maglev_table_size = 251;
        assert_eq!(source.upsert_service(a2.clone()), Ok(Change::Changed));
        assert_eq!(source.services(), vec![a2, b]);
    }

    #[test]
    fn invalid_upserts_name_the_request_field_and_change_nothing() {
        let source = GrpcSource::new();
        let good = service("198.51.100.10", 80, &[("203.0.113.1", 8080, 1)]);
        source.upsert_service(good.clone()).unwrap();
        let rx = source.subscribe();

        let mut bad = good.clone();
        bad.maglev_table_size = 1000;
        let err = source.upsert_service(bad).unwrap_err();
        assert!(
            matches!(&err, ApiError::Invalid { field, .. } if field == "service.maglev_table_size"),
            "{err}"
        );

        let mixed = service(
            "198.51.100.10",
            80,
            &[("203.0.113.1", 8080, 1), ("2001:db8::1", 8080, 1)],
        );
        let err = source.upsert_service(mixed).unwrap_err().to_string();
        assert!(
            err.starts_with("service.backends[1].address: 2001:db8::1 is not of the VIP's"),
            "{err}"
        );

        let mut unnamed = good.clone();
        unnamed.name.clear();
        let err = source.upsert_service(unnamed).unwrap_err().to_string();
        assert_eq!(err, "service.name: must not be empty");

        assert!(!rx.has_changed().unwrap());
        assert_eq!(source.services(), vec![good]);
    }

    #[test]
    fn set_backends_and_delete() {
        let source = GrpcSource::new();
        let svc = service("2001:db8:100::10", 443, &[]);
        let key = ServiceKey::of(&svc);
        source.upsert_service(svc).unwrap();
        let backends = service(
            "2001:db8:100::10",
            443,
            &[("2001:db8:203::1", 443, 3), ("2001:db8:203::2", 443, 0)],
        )
        .backends;
        assert_eq!(
            source.set_backends(key, backends.clone()),
            Ok(Change::Changed)
        );
        assert_eq!(
            source.set_backends(key, backends.clone()),
            Ok(Change::Unchanged)
        );
        assert_eq!(source.services()[0].backends, backends);

        // Duplicate backend: refused, named without the service prefix.
        let twice = vec![backends[0], backends[0]];
        let err = source.set_backends(key, twice).unwrap_err().to_string();
        assert!(err == "backends[1]: duplicate of backends[0]", "{err}");
        assert_eq!(source.services()[0].backends, backends);

        let other = ServiceKey::new("2001:db8:100::10".parse().unwrap(), 443, Protocol::Udp);
        assert_eq!(
            source.set_backends(other, vec![]),
            Err(ApiError::NotFound(other))
        );
        assert_eq!(
            source.delete_service(other).unwrap_err().to_string(),
            "no service [2001:db8:100::10]:443/udp is defined through this API"
        );
        source.delete_service(key).unwrap();
        assert!(source.services().is_empty());
    }

    #[test]
    fn requests_are_validated_with_the_base_config() {
        let source = GrpcSource::new();
        let mut snat = service("198.51.100.10", 80, &[("203.0.113.1", 8080, 1)]);
        snat.mode = config::ForwardingMode::Snat;
        // No source address for SNAT: neither the service nor the (default) base gives one.
        let err = source.upsert_service(snat.clone()).unwrap_err();
        assert!(
            matches!(&err, ApiError::Invalid { field, .. } if field == "service.snat_address"),
            "{err}"
        );
        // The file's `node` section gives one; its services and policy are not taken along.
        let file = Config::from_yaml(
            "node: {ipv4: 192.0.2.1}\nservices:\n  - {name: f, vip: 198.51.100.10, port: 80, \
             protocol: tcp}\n",
        )
        .unwrap();
        source.set_base_config(&file);
        assert_eq!(source.upsert_service(snat), Ok(Change::Created));
    }

    #[test]
    fn policy_is_validated_and_empty_means_none() {
        let source = GrpcSource::new();
        let rx = source.subscribe_policy();
        let bad: PolicyConfig =
            serde_yaml_ng::from_str("namespaces: [{name: a}, {name: a}]").unwrap();
        let err = source.set_policy(Some(bad)).unwrap_err().to_string();
        assert!(err.starts_with("policy.namespaces[1]: duplicate"), "{err}");
        assert!(!rx.has_changed().unwrap());

        let good: PolicyConfig = serde_yaml_ng::from_str("audit: true").unwrap();
        assert_eq!(source.set_policy(Some(good.clone())), Ok(Change::Changed));
        assert_eq!(source.policy(), Some(good));
        assert_eq!(
            source.set_policy(Some(PolicyConfig::default())),
            Ok(Change::Changed)
        );
        assert_eq!(source.policy(), None);
        assert_eq!(source.set_policy(None), Ok(Change::Unchanged));
    }
}
