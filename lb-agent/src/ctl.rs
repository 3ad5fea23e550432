//! `lbctl`'s commands that change state. They go through the agent's gRPC API (its unix socket, or
//! TCP with mutual TLS: [`crate::grpc::client`]),
//! never to the maps directly: the agent owns the maps and would reconcile a hand-edited entry
//! back. So a change made here is validated as a config file edit would be, merged with the other
//! sources (the config file's services shadow the API's with the same key, the API's shadow
//! Kubernetes'), applied with the same ordering guarantees, and kept by the agent across restarts
//! of `lbctl`. Services the API did not create (file, Kubernetes) cannot be changed from here.
//!
//! The policy is set whole, as YAML of the config file's `policy:` section.
//!
//! Arguments name services as `VIP:PORT/PROTOCOL` (`198.51.100.10:80/tcp`, `[2001:db8::10]:53/udp`)
//! and backends as `ADDRESS:PORT[=WEIGHT]` (`203.0.113.11:8080=2`; weight 0 drains).

use std::{error::Error as _, fmt, net::SocketAddr, str::FromStr};

use anyhow::{bail, Context, Result};
use tonic::{transport::Channel, Code};

use crate::{
    config::{self, BackendConfig, ForwardingMode, HashFields, Protocol},
    grpc::{
        convert::{key_to_pb, service_to_pb},
        pb::{self, load_balancer_client::LoadBalancerClient},
        source::ServiceKey,
    },
    maglev,
};

type Client = LoadBalancerClient<Channel>;

/// A service as `VIP:PORT/PROTOCOL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceArg(pub ServiceKey);

impl FromStr for ServiceArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, protocol) = text.rsplit_once('/').ok_or_else(|| {
            format!("{text:?}: expected VIP:PORT/PROTOCOL, e.g. 198.51.100.10:80/tcp")
        })?;
        let address: SocketAddr = address
            .parse()
            .map_err(|_| format!("{address:?}: expected VIP:PORT ([VIP]:PORT for IPv6)"))?;
        let protocol = match protocol {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => return Err(format!("{other:?}: the protocol is tcp or udp")),
        };
        Ok(Self(ServiceKey::new(
            address.ip(),
            address.port(),
            protocol,
        )))
    }
}

impl fmt::Display for ServiceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = &self.0;
        let protocol = match key.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        write!(f, "{}/{protocol}", SocketAddr::new(key.vip, key.port))
    }
}

/// A backend as `ADDRESS:PORT[=WEIGHT]` (weight 1 when absent, as in the config file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendArg(pub BackendConfig);

impl FromStr for BackendArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, weight) = match text.split_once('=') {
            Some((address, weight)) => (
                address,
                weight
                    .parse()
                    .map_err(|_| format!("{weight:?}: the weight is a whole number (0 drains)"))?,
            ),
            None => (text, 1),
        };
        let address: SocketAddr = address.parse().map_err(|_| {
            format!("{address:?}: expected ADDRESS:PORT[=WEIGHT] ([ADDRESS]:PORT for IPv6)")
        })?;
        Ok(Self(BackendConfig {
            address: address.ip(),
            port: address.port(),
            weight,
        }))
    }
}

/// What `lbctl service add` sets besides the key and the backends.
pub struct ServiceOptions {
    pub name: String,
    pub mode: ForwardingMode,
    pub hash: HashFields,
    pub table_size: Option<u32>,
}

/// A call that failed below gRPC: the connection to the agent broke before an answer (the agent
/// stopped, or refused a TLS client certificate: TLS 1.3 shows that at the first call). Its
/// sources are the transport's errors.
#[derive(Debug, thiserror::Error)]
#[error("{what}: the connection to the agent failed: {cause}")]
pub struct ConnectionFailed {
    what: String,
    /// The innermost error (tonic's own says only "transport error").
    cause: String,
    #[source]
    status: tonic::Status,
}

/// A request the agent refused: its message names the offending field, as the API's do.
fn refused(what: &str, status: tonic::Status) -> anyhow::Error {
    if let Some(transport) = status
        .source()
        .filter(|source| source.is::<tonic::transport::Error>())
    {
        let mut innermost: &dyn std::error::Error = transport;
        while let Some(source) = innermost.source() {
            innermost = source;
        }
        let cause = innermost.to_string();
        return ConnectionFailed {
            what: what.to_string(),
            cause,
            status,
        }
        .into();
    }
    match status.code() {
        Code::InvalidArgument => anyhow::anyhow!("{what} refused: {}", status.message()),
        Code::NotFound => anyhow::anyhow!(
            "{what}: {} (only services created through the API can be changed here)",
            status.message()
        ),
        _ => anyhow::anyhow!("{what}: {status}"),
    }
}

/// Creates or replaces a service with these backends. Returns what changed, for the user.
pub async fn add_service(
    client: &mut Client,
    key: ServiceArg,
    options: ServiceOptions,
    backends: &[BackendArg],
) -> Result<String> {
    let service = config::Service {
        name: options.name,
        vip: key.0.vip,
        port: key.0.port,
        protocol: key.0.protocol,
        mode: options.mode,
        snat_address: None,
        hash: options.hash,
        maglev_table_size: options.table_size.unwrap_or(maglev::DEFAULT_TABLE_SIZE),
        backends: backends.iter().map(|b| b.0).collect(),
        health_check: None,
    };
    upsert(client, &service).await
}

/// Creates or replaces every service of a config file's `services:` list (the file's format,
/// health checks included), one request each; stops at the first refusal.
pub async fn upsert_file(client: &mut Client, yaml: &str) -> Result<Vec<String>> {
    let file = config::Config::from_yaml(yaml)?;
    if file.services.is_empty() {
        bail!("no services in the file (expected a `services:` list as in the config file)");
    }
    let mut done = Vec::new();
    for service in &file.services {
        done.push(upsert(client, service).await?);
    }
    Ok(done)
}

async fn upsert(client: &mut Client, service: &config::Service) -> Result<String> {
    let key = ServiceArg(ServiceKey::new(service.vip, service.port, service.protocol));
    let response = client
        .upsert_service(pb::UpsertServiceRequest {
            service: Some(service_to_pb(service)),
        })
        .await
        .map_err(|status| refused(&format!("service {key}"), status))?
        .into_inner();
    let outcome = match (response.created, response.changed) {
        (true, _) => "created",
        (false, true) => "replaced",
        (false, false) => "unchanged",
    };
    Ok(format!("service {key} ({}) {outcome}", service.name))
}

pub async fn delete_service(client: &mut Client, key: ServiceArg) -> Result<String> {
    client
        .delete_service(pb::DeleteServiceRequest {
            key: Some(key_to_pb(key.0)),
        })
        .await
        .map_err(|status| refused(&format!("service {key}"), status))?;
    Ok(format!("service {key} deleted"))
}

/// Replaces the backends (and weights) of a service.
pub async fn set_backends(
    client: &mut Client,
    key: ServiceArg,
    backends: &[BackendArg],
) -> Result<String> {
    let request = pb::SetBackendsRequest {
        key: Some(key_to_pb(key.0)),
        backends: backends
            .iter()
            .map(|b| crate::grpc::convert::backend_to_pb(&b.0))
            .collect(),
    };
    let response = client
        .set_backends(request)
        .await
        .map_err(|status| refused(&format!("service {key}"), status))?
        .into_inner();
    Ok(format!(
        "service {key}: {} backends{}",
        backends.len(),
        if response.changed { "" } else { " (unchanged)" }
    ))
}

/// Sets one backend's weight (0: drain it: no new flows, its connections continue), keeping the
/// service's other backends as the API holds them.
pub async fn set_weight(
    client: &mut Client,
    key: ServiceArg,
    backend: SocketAddr,
    weight: u32,
) -> Result<String> {
    let state = client
        .list_state(pb::ListStateRequest {})
        .await
        .map_err(|status| refused("listing the API's services", status))?
        .into_inner();
    let wanted = key_to_pb(key.0);
    let service = state
        .services
        .into_iter()
        .find(|s| s.vip == wanted.vip && s.port == wanted.port && s.protocol == wanted.protocol)
        .with_context(|| {
            format!("service {key}: not defined through the API (file and Kubernetes services are changed at their source)")
        })?;
    let mut backends = service.backends;
    let address = backend.ip().to_string();
    let Some(entry) = backends
        .iter_mut()
        .find(|b| b.address == address && b.port == u32::from(backend.port()))
    else {
        bail!("service {key}: no backend {backend}");
    };
    entry.weight = Some(weight);
    client
        .set_backends(pb::SetBackendsRequest {
            key: Some(wanted),
            backends,
        })
        .await
        .map_err(|status| refused(&format!("service {key}"), status))?;
    Ok(format!(
        "service {key}: backend {backend} weight {weight}{}",
        if weight == 0 { " (draining)" } else { "" }
    ))
}

/// The API's services, one line each with their backends, how many services the agent last
/// applied from every source (or, while a restarted agent keeps the services an earlier one
/// pinned, those services), and the retired backends it keeps for their tracked flows.
pub async fn state(client: &mut Client) -> Result<Vec<String>> {
    let state = client
        .list_state(pb::ListStateRequest {})
        .await
        .map_err(|status| refused("listing the state", status))?
        .into_inner();
    let mut lines: Vec<String> = state.services.iter().map(describe).collect();
    if let Some(applied) = state.applied {
        if applied.adopted {
            lines.push(format!(
                "adopted: {} services pinned by an earlier agent, served as they are until the \
                 sources are listed (Kubernetes); weights are table slots:",
                applied.services.len()
            ));
            lines.extend(
                applied
                    .services
                    .iter()
                    .map(|s| format!("  {}", describe(s))),
            );
        } else {
            lines.push(format!(
                "applied (file, API and Kubernetes merged): {} services",
                applied.services.len()
            ));
        }
        if !applied.retired_backends.is_empty() {
            let retired: Vec<String> = applied.retired_backends.iter().map(endpoint).collect();
            lines.push(format!(
                "retired (no service names them, kept while their tracked flows live): {}",
                retired.join(" ")
            ));
        }
    }
    if let Some(flow_events) = &state.flow_events {
        lines.push(describe_flow_events(flow_events));
    }
    Ok(lines)
}

/// The endpoints the CNI plugin registered, one line each: host interface, addresses, pod
/// (namespace/name), the attachment (container id/interface in the pod) and where the agent put
/// it in the policy.
pub async fn endpoints(client: &mut Client) -> Result<Vec<String>> {
    let state = client
        .list_state(pb::ListStateRequest {})
        .await
        .map_err(|status| refused("listing the state", status))?
        .into_inner();
    Ok(state.endpoints.iter().map(describe_endpoint).collect())
}

fn describe_endpoint(endpoint: &pb::Endpoint) -> String {
    let policy = match pb::EndpointPlacement::try_from(endpoint.placement) {
        Ok(pb::EndpointPlacement::SourceWorkload) => "its workload",
        Ok(pb::EndpointPlacement::OwnWorkload) => "own workload (no labels)",
        Ok(pb::EndpointPlacement::NotPlaced) => "not enforced (a conflict, see the agent's log)",
        Ok(pb::EndpointPlacement::Unspecified) | Err(_) => "unknown",
    };
    let network = if endpoint.network.is_empty() {
        String::new()
    } else {
        format!(" network={}", endpoint.network)
    };
    format!(
        "{} {} pod={}/{} container={}/{}{network} policy: {policy}",
        endpoint.host_interface,
        endpoint.addresses.join(","),
        endpoint.pod_namespace,
        endpoint.pod_name,
        endpoint.container_id,
        endpoint.interface_name,
    )
}

/// Switches flow events on or off through the API (`None`: resets the API's setting). Returns the
/// switch after the call, for the user.
pub async fn set_flow_events(client: &mut Client, enabled: Option<bool>) -> Result<Vec<String>> {
    let response = client
        .set_flow_events(pb::SetFlowEventsRequest { enabled })
        .await
        .map_err(|status| refused("flow events", status))?
        .into_inner();
    let state = response
        .flow_events
        .context("the agent's answer has no flow_events")?;
    let mut lines = flow_events_lines(&state);
    if !response.changed {
        lines[0].push_str(" (unchanged, no reload)");
    }
    Ok(lines)
}

/// The flow events switch: whether the programs report them, which setting decides, and each
/// source's setting.
pub async fn flow_events(client: &mut Client) -> Result<Vec<String>> {
    let state = client
        .list_state(pb::ListStateRequest {})
        .await
        .map_err(|status| refused("listing the state", status))?
        .into_inner()
        .flow_events
        .context("the server reports no flow events switch (not an agent)")?;
    Ok(flow_events_lines(&state))
}

/// `flow events: on (gRPC API)`, and why not when the programs do not run as the deciding setting
/// asks.
fn describe_flow_events(state: &pb::FlowEvents) -> String {
    let source = match pb::FlowEventsSource::try_from(state.source) {
        Ok(pb::FlowEventsSource::Api) => "gRPC API",
        Ok(pb::FlowEventsSource::ConfigFile) => "config file",
        Ok(pb::FlowEventsSource::Flag) => "--flow-events",
        _ => "unknown source",
    };
    let mut line = format!("flow events: {} ({source})", on_off(state.enabled));
    if state.wanted != state.enabled {
        line.push_str(&format!(
            ", {} wanted but reloading the programs failed (see `lbctl events`)",
            on_off(state.wanted)
        ));
    }
    line
}

fn flow_events_lines(state: &pb::FlowEvents) -> Vec<String> {
    let setting = |value: Option<bool>| value.map_or("unset", on_off);
    vec![
        describe_flow_events(state),
        format!(
            "  gRPC API: {}, config file: {}, --flow-events: {} (the API's setting holds until \
             reset or until the file's flow_events changes)",
            setting(state.api),
            setting(state.config_file),
            on_off(state.flag)
        ),
    ]
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// A backend's `address:port`.
fn endpoint(backend: &pb::Backend) -> String {
    backend
        .address
        .parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, backend.port as u16).to_string())
        .unwrap_or_else(|_| format!("{}:{}", backend.address, backend.port))
}

fn describe(service: &pb::Service) -> String {
    let protocol = if service.protocol == pb::Protocol::Udp as i32 {
        "udp"
    } else {
        "tcp"
    };
    let vip = service
        .vip
        .parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, service.port as u16).to_string())
        .unwrap_or_else(|_| format!("{}:{}", service.vip, service.port));
    let backends: Vec<String> = service
        .backends
        .iter()
        .map(|b| format!("{}={}", endpoint(b), b.weight.unwrap_or(1)))
        .collect();
    format!(
        "{vip}/{protocol} {} mode={} backends: {}",
        service.name,
        pb::ForwardingMode::try_from(service.mode)
            .map(|m| m
                .as_str_name()
                .trim_start_matches("FORWARDING_MODE_")
                .to_lowercase())
            .unwrap_or_else(|_| service.mode.to_string()),
        if backends.is_empty() {
            "none".to_string()
        } else {
            backends.join(" ")
        }
    )
}

/// Sets the API's policy: `yaml` is the config file's `policy:` section (its content, not the
/// `policy:` key); empty text clears it.
pub async fn set_policy(client: &mut Client, yaml: String) -> Result<String> {
    let clearing = yaml.trim().is_empty();
    let response = client
        .set_policy(pb::SetPolicyRequest { yaml })
        .await
        .map_err(|status| refused("policy", status))?
        .into_inner();
    Ok(match (clearing, response.changed) {
        (_, false) => "policy unchanged".to_string(),
        (true, true) => "policy cleared".to_string(),
        (false, true) => "policy set".to_string(),
    })
}

/// The policy set through the API, as YAML (empty when none).
pub async fn policy(client: &mut Client) -> Result<String> {
    let state = client
        .list_state(pb::ListStateRequest {})
        .await
        .map_err(|status| refused("listing the state", status))?
        .into_inner();
    Ok(state.policy_yaml)
}

/// Prints the agent's events as they come (`count`: stop after that many).
pub async fn events(client: &mut Client, count: Option<usize>) -> Result<()> {
    let mut stream = client
        .stream_events(pb::StreamEventsRequest {})
        .await
        .map_err(|status| refused("streaming events", status))?
        .into_inner();
    let mut seen = 0;
    while count.is_none_or(|n| seen < n) {
        let Some(event) = stream.message().await.context("reading the event stream")? else {
            break;
        };
        let kind = pb::EventKind::try_from(event.kind)
            .map(|k| {
                k.as_str_name()
                    .trim_start_matches("EVENT_KIND_")
                    .to_lowercase()
            })
            .unwrap_or_else(|_| event.kind.to_string());
        println!("{} {kind} {}", event.unix_time_ms, event.text);
        seen += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_and_backend_arguments_parse_both_families() {
        let key: ServiceArg = "198.51.100.10:80/tcp".parse().unwrap();
        assert_eq!(
            key.0,
            ServiceKey::new("198.51.100.10".parse().unwrap(), 80, Protocol::Tcp)
        );
        assert_eq!(key.to_string(), "198.51.100.10:80/tcp");
        let key6: ServiceArg = "[2001:db8::10]:53/udp".parse().unwrap();
        assert_eq!(key6.to_string(), "[2001:db8::10]:53/udp");

        let b: BackendArg = "203.0.113.11:8080=0".parse().unwrap();
        assert_eq!((b.0.port, b.0.weight), (8080, 0));
        let b6: BackendArg = "[2001:db8::11]:8443".parse().unwrap();
        assert_eq!(
            (b6.0.address.to_string(), b6.0.weight),
            ("2001:db8::11".into(), 1)
        );
    }

    #[test]
    fn an_endpoint_line_names_interface_addresses_and_pod() {
        let endpoint = pb::Endpoint {
            container_id: "c0ffee".into(),
            interface_name: "eth0".into(),
            pod_namespace: "prod".into(),
            pod_name: "api-1".into(),
            host_interface: "veth6c1e1a3b".into(),
            addresses: vec!["198.51.100.7".into(), "2001:db8::7".into()],
            placement: pb::EndpointPlacement::OwnWorkload as i32,
            network: "pods".into(),
        };
        assert_eq!(
            describe_endpoint(&endpoint),
            "veth6c1e1a3b 198.51.100.7,2001:db8::7 pod=prod/api-1 container=c0ffee/eth0 \
             network=pods policy: own workload (no labels)"
        );
    }

    #[test]
    fn malformed_arguments_say_what_was_expected() {
        for (text, says) in [
            ("198.51.100.10:80", "VIP:PORT/PROTOCOL"),
            ("198.51.100.10/tcp", "VIP:PORT"),
            ("198.51.100.10:80/sctp", "tcp or udp"),
            ("2001:db8::10:53/udp", "[VIP]:PORT"),
        ] {
            let err = text.parse::<ServiceArg>().unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
        for (text, says) in [
            ("203.0.113.11", "ADDRESS:PORT"),
            ("203.0.113.11:8080=heavy", "whole number"),
            ("203.0.113.11:80800", "ADDRESS:PORT"),
        ] {
            let err = text.parse::<BackendArg>().unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
        }
    }
}
