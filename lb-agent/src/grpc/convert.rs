//! Protobuf messages ↔ the config model. Decoding checks what the types cannot carry (addresses,
//! port ranges, known enum values) and names the request field; the model's own rules
//! ([`crate::config::Config::validate`]) run afterwards, in [`super::source`].
//!
//! Absent optional fields take the config file's defaults, read from the model's serde defaults so
//! that they cannot drift apart.

use std::{
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use super::{
    events::{Event, EventKind},
    pb,
    source::{ApiError, ServiceKey},
};
use crate::{
    config::{
        self, BackendConfig, ForwardingMode, HashFields, HealthCheck, HealthCheckKind, Protocol,
    },
    endpoints::{Endpoint, Placement},
    maglev,
    policy::PolicyConfig,
};

fn ip(text: &str, field: &str) -> Result<IpAddr, ApiError> {
    text.parse()
        .map_err(|_| ApiError::invalid(field, format!("invalid IP address {text:?}")))
}

fn port(value: u32, field: &str) -> Result<u16, ApiError> {
    u16::try_from(value)
        .map_err(|_| ApiError::invalid(field, format!("{value} is not a port (0..=65535)")))
}

fn protocol(value: i32, field: &str) -> Result<Protocol, ApiError> {
    match pb::Protocol::try_from(value) {
        Ok(pb::Protocol::Tcp) => Ok(Protocol::Tcp),
        Ok(pb::Protocol::Udp) => Ok(Protocol::Udp),
        Ok(pb::Protocol::Unspecified) => Err(ApiError::invalid(
            field,
            "required: PROTOCOL_TCP or PROTOCOL_UDP",
        )),
        Err(_) => Err(ApiError::invalid(
            field,
            format!("unknown protocol {value}: PROTOCOL_TCP (1) or PROTOCOL_UDP (2)"),
        )),
    }
}

fn mode(value: i32, field: &str) -> Result<ForwardingMode, ApiError> {
    match pb::ForwardingMode::try_from(value) {
        Ok(pb::ForwardingMode::Unspecified | pb::ForwardingMode::Dnat) => Ok(ForwardingMode::Dnat),
        Ok(pb::ForwardingMode::Snat) => Ok(ForwardingMode::Snat),
        Ok(pb::ForwardingMode::DsrL2) => Ok(ForwardingMode::DsrL2),
        Ok(pb::ForwardingMode::DsrIpip) => Ok(ForwardingMode::DsrIpip),
        Err(_) => Err(ApiError::invalid(
            field,
            format!("unknown forwarding mode {value}"),
        )),
    }
}

fn hash(value: i32, field: &str) -> Result<HashFields, ApiError> {
    match pb::HashFields::try_from(value) {
        Ok(pb::HashFields::Unspecified | pb::HashFields::FiveTuple) => Ok(HashFields::FiveTuple),
        Ok(pb::HashFields::SourceIp) => Ok(HashFields::SourceIp),
        Err(_) => Err(ApiError::invalid(field, format!("unknown hash {value}"))),
    }
}

/// `path` of the request field, e.g. `service.backends[0]`.
fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// A service key; `path` names it in errors (e.g. `key`).
pub fn key_from_pb(key: Option<pb::ServiceKey>, path: &str) -> Result<ServiceKey, ApiError> {
    let key = key.ok_or_else(|| ApiError::invalid(path, "required"))?;
    Ok(ServiceKey::new(
        ip(&key.vip, &join(path, "vip"))?,
        port(key.port, &join(path, "port"))?,
        protocol(key.protocol, &join(path, "protocol"))?,
    ))
}

pub fn key_to_pb(key: ServiceKey) -> pb::ServiceKey {
    pb::ServiceKey {
        vip: key.vip.to_string(),
        port: key.port.into(),
        protocol: protocol_to_pb(key.protocol) as i32,
    }
}

/// Backends; `path` names the list in errors (e.g. `service.backends`).
pub fn backends_from_pb(
    backends: Vec<pb::Backend>,
    path: &str,
) -> Result<Vec<BackendConfig>, ApiError> {
    backends
        .into_iter()
        .enumerate()
        .map(|(i, backend)| {
            let path = format!("{path}[{i}]");
            Ok(BackendConfig {
                address: ip(&backend.address, &join(&path, "address"))?,
                port: port(backend.port, &join(&path, "port"))?,
                weight: backend.weight.unwrap_or(DEFAULT_WEIGHT),
            })
        })
        .collect()
}

/// The config file's default backend weight.
const DEFAULT_WEIGHT: u32 = 1;

/// The config file's health check defaults for `kind`.
fn default_health_check(kind: HealthCheckKind) -> HealthCheck {
    let kind = match kind {
        HealthCheckKind::Tcp => "tcp",
        HealthCheckKind::Http => "http",
    };
    serde_yaml_ng::from_str(&format!("type: {kind}")).expect("a health check with defaults")
}

fn health_check_from_pb(check: pb::HealthCheck, path: &str) -> Result<HealthCheck, ApiError> {
    let kind = match pb::HealthCheckKind::try_from(check.kind) {
        Ok(pb::HealthCheckKind::Tcp) => HealthCheckKind::Tcp,
        Ok(pb::HealthCheckKind::Http) => HealthCheckKind::Http,
        Ok(pb::HealthCheckKind::Unspecified) => {
            return Err(ApiError::invalid(
                join(path, "kind"),
                "required: HEALTH_CHECK_KIND_TCP or HEALTH_CHECK_KIND_HTTP",
            ))
        }
        Err(_) => {
            return Err(ApiError::invalid(
                join(path, "kind"),
                format!("unknown health check kind {}", check.kind),
            ))
        }
    };
    let defaults = default_health_check(kind);
    Ok(HealthCheck {
        kind,
        port: check
            .port
            .map(|p| port(p, &join(path, "port")))
            .transpose()?,
        path: check.path.unwrap_or(defaults.path),
        interval_ms: check.interval_ms.unwrap_or(defaults.interval_ms),
        timeout_ms: check.timeout_ms.unwrap_or(defaults.timeout_ms),
        rise: check.rise.unwrap_or(defaults.rise),
        fall: check.fall.unwrap_or(defaults.fall),
    })
}

/// A service; `path` names it in errors (e.g. `service`).
pub fn service_from_pb(
    service: Option<pb::Service>,
    path: &str,
) -> Result<config::Service, ApiError> {
    let service = service.ok_or_else(|| ApiError::invalid(path, "required"))?;
    let snat_address = match service.snat_address.as_str() {
        "" => None,
        text => Some(ip(text, &join(path, "snat_address"))?),
    };
    Ok(config::Service {
        name: service.name,
        vip: ip(&service.vip, &join(path, "vip"))?,
        port: port(service.port, &join(path, "port"))?,
        protocol: protocol(service.protocol, &join(path, "protocol"))?,
        mode: mode(service.mode, &join(path, "mode"))?,
        snat_address,
        hash: hash(service.hash, &join(path, "hash"))?,
        maglev_table_size: service
            .maglev_table_size
            .unwrap_or(maglev::DEFAULT_TABLE_SIZE),
        backends: backends_from_pb(service.backends, &join(path, "backends"))?,
        health_check: service
            .health_check
            .map(|check| health_check_from_pb(check, &join(path, "health_check")))
            .transpose()?,
    })
}

fn protocol_to_pb(protocol: Protocol) -> pb::Protocol {
    match protocol {
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
    }
}

pub fn backend_to_pb(backend: &BackendConfig) -> pb::Backend {
    pb::Backend {
        address: backend.address.to_string(),
        port: backend.port.into(),
        weight: Some(backend.weight),
    }
}

/// Every field explicit (no defaults left for the reader to know).
pub fn service_to_pb(service: &config::Service) -> pb::Service {
    pb::Service {
        name: service.name.clone(),
        vip: service.vip.to_string(),
        port: service.port.into(),
        protocol: protocol_to_pb(service.protocol) as i32,
        mode: match service.mode {
            ForwardingMode::Dnat => pb::ForwardingMode::Dnat,
            ForwardingMode::Snat => pb::ForwardingMode::Snat,
            ForwardingMode::DsrL2 => pb::ForwardingMode::DsrL2,
            ForwardingMode::DsrIpip => pb::ForwardingMode::DsrIpip,
        } as i32,
        hash: match service.hash {
            HashFields::FiveTuple => pb::HashFields::FiveTuple,
            HashFields::SourceIp => pb::HashFields::SourceIp,
        } as i32,
        maglev_table_size: Some(service.maglev_table_size),
        backends: service.backends.iter().map(backend_to_pb).collect(),
        health_check: service.health_check.as_ref().map(|check| pb::HealthCheck {
            kind: match check.kind {
                HealthCheckKind::Tcp => pb::HealthCheckKind::Tcp,
                HealthCheckKind::Http => pb::HealthCheckKind::Http,
            } as i32,
            port: check.port.map(u32::from),
            path: Some(check.path.clone()),
            interval_ms: Some(check.interval_ms),
            timeout_ms: Some(check.timeout_ms),
            rise: Some(check.rise),
            fall: Some(check.fall),
        }),
        snat_address: service
            .snat_address
            .map(|a| a.to_string())
            .unwrap_or_default(),
    }
}

/// The `policy:` section as YAML; `None` for empty text (or an empty policy). Errors name the field
/// as the config file would (`policy.rules[0].action at line 3 column 13: ...`).
pub fn policy_from_yaml(text: &str) -> Result<Option<PolicyConfig>, ApiError> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let deserializer = serde_yaml_ng::Deserializer::from_str(text);
    let policy: PolicyConfig = serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let location = inner
            .location()
            .map(|l| format!(" at line {} column {}", l.line(), l.column()))
            .unwrap_or_default();
        // serde_yaml_ng appends " at line N column M" and sometimes prefixes the path.
        let message = inner.to_string();
        let message = message
            .find(" at line ")
            .map_or(&message[..], |i| &message[..i]);
        let message = message
            .strip_prefix(&format!("{path}: "))
            .unwrap_or(message);
        let field = if path == "." {
            "policy".to_string()
        } else {
            format!("policy.{path}")
        };
        ApiError::invalid(format!("{field}{location}"), message)
    })?;
    Ok(Some(policy).filter(|p| *p != PolicyConfig::default()))
}

pub fn policy_to_yaml(policy: &PolicyConfig) -> String {
    if *policy == PolicyConfig::default() {
        String::new()
    } else {
        serde_yaml_ng::to_string(policy).expect("policy serialises")
    }
}

pub fn event_to_pb(event: &Event) -> pb::Event {
    pb::Event {
        kind: match event.kind {
            EventKind::ServiceChanged => pb::EventKind::ServiceChanged,
            EventKind::Reconciled => pb::EventKind::Reconciled,
            EventKind::ReconcileFailed => pb::EventKind::ReconcileFailed,
            EventKind::HealthChanged => pb::EventKind::HealthChanged,
            EventKind::ConfigRejected => pb::EventKind::ConfigRejected,
            EventKind::PolicyVerdict => pb::EventKind::PolicyVerdict,
            EventKind::Flow => pb::EventKind::Flow,
        } as i32,
        text: event.text.clone(),
        service: event.service.clone().unwrap_or_default(),
        backend: event.backend.clone().unwrap_or_default(),
        unix_time_ms: unix_ms(event.at),
    }
}

/// Decodes a `RegisterEndpoint` request's endpoint and checks it ([`Endpoint::validate`]); errors
/// name `{path}.<field>`.
pub fn endpoint_from_pb(endpoint: Option<pb::Endpoint>, path: &str) -> Result<Endpoint, ApiError> {
    let endpoint = endpoint.ok_or_else(|| ApiError::invalid(path, "required"))?;
    let addresses = endpoint
        .addresses
        .iter()
        .enumerate()
        .map(|(i, text)| ip(text, &format!("{path}.addresses[{i}]")))
        .collect::<Result<_, _>>()?;
    let endpoint = Endpoint {
        container_id: endpoint.container_id,
        interface_name: endpoint.interface_name,
        namespace: endpoint.pod_namespace,
        pod: endpoint.pod_name,
        host_interface: endpoint.host_interface,
        addresses,
        network: endpoint.network,
    };
    endpoint.validate(path)?;
    Ok(endpoint)
}

pub fn endpoint_to_pb(endpoint: &Endpoint, placement: Placement) -> pb::Endpoint {
    pb::Endpoint {
        container_id: endpoint.container_id.clone(),
        interface_name: endpoint.interface_name.clone(),
        pod_namespace: endpoint.namespace.clone(),
        pod_name: endpoint.pod.clone(),
        host_interface: endpoint.host_interface.clone(),
        addresses: endpoint.addresses.iter().map(ToString::to_string).collect(),
        network: endpoint.network.clone(),
        placement: match placement {
            Placement::SourceWorkload => pb::EndpointPlacement::SourceWorkload,
            Placement::OwnWorkload => pb::EndpointPlacement::OwnWorkload,
            Placement::NotPlaced => pb::EndpointPlacement::NotPlaced,
        } as i32,
    }
}

/// A `ListState` endpoint's placement; `None` when the agent did not say (unspecified, or a value
/// this client does not know).
pub fn placement_from_pb(placement: i32) -> Option<Placement> {
    match pb::EndpointPlacement::try_from(placement).ok()? {
        pb::EndpointPlacement::SourceWorkload => Some(Placement::SourceWorkload),
        pb::EndpointPlacement::OwnWorkload => Some(Placement::OwnWorkload),
        pb::EndpointPlacement::NotPlaced => Some(Placement::NotPlaced),
        pb::EndpointPlacement::Unspecified => None,
    }
}

pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const YAML: &str = "\
services:
  - name: v6
    vip: 2001:db8:100::10
    port: 443
    protocol: tcp
    hash: source-ip
    maglev_table_size: 65537
    backends:
      - { address: 2001:db8:203::11, port: 443, weight: 3 }
      - { address: 2001:db8:203::12, port: 0, weight: 0 }
    health_check: { type: http, path: /healthz, interval_ms: 500, rise: 1, fall: 2 }
  - name: dns
    vip: 198.51.100.53
    port: 53
    protocol: udp
    backends:
      - { address: 203.0.113.53, port: 5353 }
    health_check: { type: tcp, port: 5354 }
";

    #[test]
    fn services_round_trip_through_protobuf() {
        let config = Config::from_yaml(YAML).unwrap();
        for service in &config.services {
            let message = service_to_pb(service);
            assert_eq!(
                service_from_pb(Some(message), "service").as_ref(),
                Ok(service)
            );
        }
    }

    #[test]
    fn absent_fields_take_the_config_file_defaults() {
        let message = pb::Service {
            name: "web".into(),
            vip: "198.51.100.10".into(),
            port: 80,
            protocol: pb::Protocol::Tcp as i32,
            backends: vec![pb::Backend {
                address: "203.0.113.1".into(),
                port: 8080,
                weight: None,
            }],
            health_check: Some(pb::HealthCheck {
                kind: pb::HealthCheckKind::Http as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let from_yaml = Config::from_yaml(
            "services:\n  - name: web\n    vip: 198.51.100.10\n    port: 80\n    protocol: tcp\n    \
             backends: [{address: 203.0.113.1, port: 8080}]\n    health_check: {type: http}\n",
        )
        .unwrap()
        .services
        .remove(0);
        assert_eq!(service_from_pb(Some(message), "service"), Ok(from_yaml));
    }

    #[test]
    fn decoding_errors_name_the_request_field() {
        let good = service_to_pb(&Config::from_yaml(YAML).unwrap().services[1]);
        type Edit = Box<dyn Fn(&mut pb::Service)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|s| s.vip = "300.1.2.3".into()),
                "service.vip: invalid IP address \"300.1.2.3\"",
            ),
            (
                Box::new(|s| s.port = 70000),
                "service.port: 70000 is not a port (0..=65535)",
            ),
            (
                Box::new(|s| s.protocol = 0),
                "service.protocol: required: PROTOCOL_TCP or PROTOCOL_UDP",
            ),
            (
                Box::new(|s| s.protocol = 17),
                "service.protocol: unknown protocol 17: PROTOCOL_TCP (1) or PROTOCOL_UDP (2)",
            ),
            (
                Box::new(|s| s.mode = 9),
                "service.mode: unknown forwarding mode 9",
            ),
            (
                Box::new(|s| s.backends[0].address = "db8::zz".into()),
                "service.backends[0].address: invalid IP address \"db8::zz\"",
            ),
            (
                Box::new(|s| s.health_check.as_mut().unwrap().kind = 0),
                "service.health_check.kind: required: HEALTH_CHECK_KIND_TCP or \
                 HEALTH_CHECK_KIND_HTTP",
            ),
            (
                Box::new(|s| s.snat_address = "node".into()),
                "service.snat_address: invalid IP address \"node\"",
            ),
        ];
        for (edit, expected) in cases {
            let mut message = good.clone();
            edit(&mut message);
            let err = service_from_pb(Some(message), "service").unwrap_err();
            assert_eq!(err.to_string(), expected);
        }
        assert_eq!(
            service_from_pb(None, "service").unwrap_err().to_string(),
            "service: required"
        );
        let key = pb::ServiceKey {
            vip: "198.51.100.10".into(),
            port: 80,
            protocol: 3,
        };
        assert_eq!(
            key_from_pb(Some(key), "key").unwrap_err().to_string(),
            "key.protocol: unknown protocol 3: PROTOCOL_TCP (1) or PROTOCOL_UDP (2)"
        );
    }

    #[test]
    fn policy_yaml_errors_name_field_and_line() {
        assert_eq!(policy_from_yaml("  \n"), Ok(None));
        assert_eq!(policy_from_yaml("{}"), Ok(None));
        let policy = policy_from_yaml("audit: true\nhost_addresses: [192.0.2.1]\n")
            .unwrap()
            .unwrap();
        assert!(policy.audit);
        assert_eq!(policy_from_yaml(&policy_to_yaml(&policy)), Ok(Some(policy)));
        let err = policy_from_yaml("audit: true\nhost_addresses: [192.0.2.300]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("policy.host_addresses[0] at line 2"),
            "{err}"
        );
        let err = policy_from_yaml("audit: true\nbogus: 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `bogus`"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }
}
