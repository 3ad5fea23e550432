//! The agent's YAML configuration: services (VIP, port, protocol, forwarding mode, Maglev table size,
//! health check) and their weighted backends. It is also the agent's desired-state model: the
//! Kubernetes and gRPC sources produce the same types.
//!
//! Parsing is strict: unknown fields are rejected, and every error names the field path and the line,
//! e.g. `services[0].backends[1].address at line 9 column 18: invalid IPv4 address syntax`.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use lb_common::{modes::snat, protocol, service::limits};
use serde::{Deserialize, Serialize};

use crate::{maglev, policy::PolicyConfig};

#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Seed of the Maglev hashes. Every node of a cluster must use the same seed so that they all
    /// pick the same backend for a flow.
    #[serde(default)]
    pub maglev_seed: u64,
    #[serde(default)]
    pub services: Vec<Service>,
    /// This node's addresses and SNAT port range, for the SNAT and DSR-IPIP forwarding modes.
    #[serde(default, skip_serializing_if = "is_default")]
    pub node: NodeConfig,
    /// Identity-based network policy (see `crate::policy`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub policy: PolicyConfig,
    /// Whether the datapath reports flow events (`crate::flow_events`): `true` or `false`; absent,
    /// the agent's `--flow-events` decides. An edit switches them without a restart (the agent
    /// reloads the programs into their links, `Datapath::reload`). Read from the file only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_events: Option<bool>,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Human name, used in logs and metrics.
    pub name: String,
    /// Virtual IP, IPv4 or IPv6; backends must be of the same family.
    pub vip: IpAddr,
    /// Destination port; 0 = every port of the VIP (backends then keep the client's port).
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default)]
    pub mode: ForwardingMode,
    /// SNAT mode: the source address of packets to the backends (VIP's family); default: the node
    /// address of that family (`node.ipv4` / `node.ipv6`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_address: Option<IpAddr>,
    #[serde(default)]
    pub hash: HashFields,
    /// Maglev lookup table size: a prime between 251 and 131071.
    #[serde(default = "default_table_size")]
    pub maglev_table_size: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

fn default_table_size() -> u32 {
    maglev::DEFAULT_TABLE_SIZE
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => protocol::TCP,
            Protocol::Udp => protocol::UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// How packets reach the backend and how replies return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardingMode {
    /// Destination rewritten to the backend, client address kept; replies translated back.
    #[default]
    Dnat,
    /// Source rewritten to the node too (full NAT), so replies return through the node from any
    /// network.
    Snat,
    /// Direct server return on a shared L2 segment: only the MAC is rewritten; the backends hold the
    /// VIP on a loopback and reply to the client directly.
    DsrL2,
    /// Direct server return through IP-in-IP (IPv6-in-IPv6) encapsulation, decapsulated on the backend
    /// by our own small program.
    DsrIpip,
}

/// The balancer node itself, as the SNAT and DSR-IPIP modes need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's IPv4 address: source of SNAT packets (unless a service sets `snat_address`) and
    /// outer source of DSR-IPIP packets; backends must route it back to this node. When it is
    /// configured on the node, set `net.ipv4.conf.all.accept_local=1` (see the datapath's `snat.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<Ipv4Addr>,
    /// The same for IPv6 services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
    /// Source ports SNAT allocates, per backend address and port. Keep it apart from the node's
    /// own ephemeral range (`net.ipv4.ip_local_port_range`, 32768–60999 by default).
    #[serde(default)]
    pub snat_ports: PortRange,
}

impl NodeConfig {
    /// The node address of `family_of`'s family.
    pub fn address_for(&self, family_of: IpAddr) -> Option<IpAddr> {
        if family_of.is_ipv4() {
            self.ipv4.map(IpAddr::V4)
        } else {
            self.ipv6.map(IpAddr::V6)
        }
    }
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        Self {
            first: snat::DEFAULT_PORT_FIRST,
            last: snat::DEFAULT_PORT_LAST,
        }
    }
}

/// Which packet fields choose the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HashFields {
    /// Source and destination address and port, and protocol.
    #[default]
    FiveTuple,
    /// Source address only: session affinity, all of a client's flows go to one backend.
    SourceIp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: IpAddr,
    /// Port on the backend; 0 = the client's destination port (required for port-0 services).
    pub port: u16,
    /// Relative share of new flows; 0 = draining (no new flows, existing flows continue).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// Active health check of a service's backends.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(rename = "type")]
    pub kind: HealthCheckKind,
    /// Port to probe; default: the backend's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// HTTP path (http checks only); a 2xx or 3xx status is healthy.
    #[serde(default = "default_http_path")]
    pub path: String,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive successes that make an unhealthy backend healthy.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that make a healthy backend unhealthy.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    Tcp,
    Http,
}

fn default_http_path() -> String {
    "/".into()
}
fn default_interval_ms() -> u64 {
    2000
}
fn default_timeout_ms() -> u64 {
    1000
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}{location}: {message}")]
    Syntax {
        /// Field path such as `services[0].backends[1].address`; empty for document-level errors.
        path: String,
        location: String,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("config serialises")
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            let location = inner
                .location()
                .map(|l| format!(" at line {} column {}", l.line(), l.column()))
                .unwrap_or_default();
            // serde_yaml_ng appends its own " at line N column M" to the message; keep ours only.
            let message = inner.to_string();
            let message = match message.find(" at line ") {
                Some(i) => &message[..i],
                None => &message[..],
            };
            // ... and sometimes prefixes the path, which we print once, first.
            let message = message
                .strip_prefix(&format!("{path}: "))
                .unwrap_or(message)
                .to_string();
            ConfigError::Syntax {
                path: if path == "." { "config".into() } else { path },
                location,
                message,
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the type system cannot: families, uniqueness, ranges and datapath capacity.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |path: String, message: String| Err(ConfigError::Invalid { path, message });
        if let Err(err) = self.policy.validate() {
            return invalid(err.path, err.message);
        }
        // The datapath's own capacity (`--max-services`) is checked when it applies the config.
        if self.services.len() > limits::SERVICES_LIMIT as usize {
            return invalid(
                "services".into(),
                format!(
                    "{} services, at most {} fit the datapath",
                    self.services.len(),
                    limits::SERVICES_LIMIT
                ),
            );
        }
        self.validate_node()?;
        let mut seen_services = HashMap::new();
        for (i, service) in self.services.iter().enumerate() {
            let path = format!("services[{i}]");
            if service.name.is_empty() {
                return invalid(format!("{path}.name"), "must not be empty".into());
            }
            let key = (service.vip, service.port, service.protocol);
            if let Some(first) = seen_services.insert(key, i) {
                return invalid(
                    path,
                    format!(
                        "{}:{}/{} is already defined by services[{first}]",
                        service.vip, service.port, service.protocol
                    ),
                );
            }
            if let Err(err) = maglev::validate_table_size(service.maglev_table_size) {
                return invalid(format!("{path}.maglev_table_size"), err.to_string());
            }
            if service.backends.len() > limits::MAX_BACKENDS_PER_SERVICE as usize {
                return invalid(
                    format!("{path}.backends"),
                    format!(
                        "{} backends, at most {} per service",
                        service.backends.len(),
                        limits::MAX_BACKENDS_PER_SERVICE
                    ),
                );
            }
            let dsr = matches!(
                service.mode,
                ForwardingMode::DsrL2 | ForwardingMode::DsrIpip
            );
            let mut seen_backends = HashMap::new();
            for (j, backend) in service.backends.iter().enumerate() {
                let bpath = format!("{path}.backends[{j}]");
                if backend.address.is_ipv4() != service.vip.is_ipv4() {
                    return invalid(
                        format!("{bpath}.address"),
                        format!("{} is not of the VIP's address family", backend.address),
                    );
                }
                if service.port == 0 && backend.port != 0 {
                    return invalid(
                        format!("{bpath}.port"),
                        "must be 0 (keep the client's port) for a service on all ports".into(),
                    );
                }
                // Replies bypass the node in DSR, so nothing could translate a changed port back.
                if dsr && backend.port != 0 && backend.port != service.port {
                    return invalid(
                        format!("{bpath}.port"),
                        format!(
                            "must be 0 or {} (the service port) in DSR mode",
                            service.port
                        ),
                    );
                }
                if let Some(first) = seen_backends.insert((backend.address, backend.port), j) {
                    return invalid(bpath, format!("duplicate of {path}.backends[{first}]"));
                }
            }
            self.validate_mode(service, &path)?;
            if let Some(check) = &service.health_check {
                let hpath = format!("{path}.health_check");
                if check.interval_ms == 0 || check.timeout_ms == 0 {
                    return invalid(hpath, "interval_ms and timeout_ms must be > 0".into());
                }
                if check.rise == 0 || check.fall == 0 {
                    return invalid(hpath, "rise and fall must be > 0".into());
                }
                if service.port == 0 && check.port.is_none() {
                    return invalid(
                        format!("{hpath}.port"),
                        "required for a service on all ports".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// The source address a service's packets leave with, when its mode rewrites it: SNAT (its
    /// `snat_address`, else the node address) and DSR-IPIP (outer source: the node address).
    pub fn mode_source(&self, service: &Service) -> Option<IpAddr> {
        match service.mode {
            ForwardingMode::Snat => service
                .snat_address
                .or_else(|| self.node.address_for(service.vip)),
            ForwardingMode::DsrIpip => self.node.address_for(service.vip),
            ForwardingMode::Dnat | ForwardingMode::DsrL2 => None,
        }
    }

    /// The `node` section: usable addresses and a non-empty port range.
    fn validate_node(&self) -> Result<(), ConfigError> {
        let invalid = |path: &str, message: String| {
            Err(ConfigError::Invalid {
                path: path.into(),
                message,
            })
        };
        let ports = self.node.snat_ports;
        if ports.first == 0 || ports.first > ports.last {
            return invalid(
                "node.snat_ports",
                format!(
                    "{}..{} is not a range of ports: need 1 <= first <= last",
                    ports.first, ports.last
                ),
            );
        }
        if self.node.ipv4.is_some_and(|a| a.is_unspecified()) {
            return invalid("node.ipv4", "must be an address of this node".into());
        }
        if self.node.ipv6.is_some_and(|a| a.is_unspecified()) {
            return invalid("node.ipv6", "must be an address of this node".into());
        }
        Ok(())
    }

    /// What each forwarding mode needs beyond the common checks.
    fn validate_mode(&self, service: &Service, path: &str) -> Result<(), ConfigError> {
        let invalid = |path: String, message: String| Err(ConfigError::Invalid { path, message });
        let family = if service.vip.is_ipv4() {
            "ipv4"
        } else {
            "ipv6"
        };
        match (service.mode, service.snat_address) {
            (ForwardingMode::Snat, Some(address)) if address.is_ipv4() != service.vip.is_ipv4() => {
                invalid(
                    format!("{path}.snat_address"),
                    format!("{address} is not of the VIP's address family"),
                )
            }
            (ForwardingMode::Snat, Some(address)) if address.is_unspecified() => invalid(
                format!("{path}.snat_address"),
                "must be a unicast address of this node".into(),
            ),
            (ForwardingMode::Snat, None) if self.mode_source(service).is_none() => invalid(
                format!("{path}.snat_address"),
                format!("snat mode needs a source address: set it, or node.{family}"),
            ),
            (ForwardingMode::DsrIpip, _) if self.mode_source(service).is_none() => invalid(
                format!("{path}.mode"),
                format!("dsr-ipip needs node.{family} (the outer source address)"),
            ),
            (mode, Some(_)) if mode != ForwardingMode::Snat => invalid(
                format!("{path}.snat_address"),
                "only used in snat mode".into(),
            ),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
services:
  - name: web
    vip: 198.51.100.10
    port: 80
    protocol: tcp
    backends:
      - address: 203.0.113.11
        port: 8080
      - address: 203.0.113.12
        port: 8080
";

    #[test]
    fn flow_events_is_a_boolean_or_absent() {
        assert_eq!(Config::from_yaml(GOOD).unwrap().flow_events, None);
        for (value, want) in [("true", true), ("false", false)] {
            let config = Config::from_yaml(&format!("flow_events: {value}\n{GOOD}")).unwrap();
            assert_eq!(config.flow_events, Some(want));
            config.validate().unwrap();
        }
        for bad in ["on", "1", "\"true\"", "[true]"] {
            let err = Config::from_yaml(&format!("{GOOD}flow_events: {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("flow_events at line 11 column 14: invalid type"),
                "{bad}: {err}"
            );
        }
        let err = Config::from_yaml(&format!("flow_event: true\n{GOOD}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `flow_event`"), "{err}");
    }

    #[test]
    fn parses_a_good_config() {
        let config = Config::from_yaml(GOOD).unwrap();
        assert_eq!(config.services.len(), 1);
        let web = &config.services[0];
        assert_eq!(web.vip, "198.51.100.10".parse::<IpAddr>().unwrap());
        assert_eq!(web.protocol, Protocol::Tcp);
        assert_eq!(
            web.backends[1].address,
            "203.0.113.12".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn bad_address_names_field_and_line() {
        let bad = GOOD.replace("203.0.113.12", "203.0.113.300");
        let err = Config::from_yaml(&bad).unwrap_err().to_string();
        assert!(
            err.starts_with("services[0].backends[1].address at line 9"),
            "{err}"
        );
        assert!(err.contains("invalid IP address"), "{err}");
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name() {
        let bad = GOOD.replace("    port: 80\n", "    port: 80\n    weight: 3\n");
        let err = Config::from_yaml(&bad).unwrap_err().to_string();
        assert!(err.contains("unknown field `weight`"), "{err}");
        assert!(err.contains("line 5"), "{err}");
    }

    #[test]
    fn bad_protocol_is_rejected() {
        let bad = GOOD.replace("protocol: tcp", "protocol: sctp");
        let err = Config::from_yaml(&bad).unwrap_err().to_string();
        assert!(err.starts_with("services[0].protocol at line 5"), "{err}");
    }

    #[test]
    fn duplicate_service_is_rejected() {
        let twice = format!(
            "{GOOD}{}",
            &GOOD["services:\n".len()..].replace("203.0.113.1", "203.0.113.2")
        );
        let err = Config::from_yaml(&twice).unwrap_err().to_string();
        assert!(
            err.contains("services[1]: 198.51.100.10:80/tcp is already defined by services[0]"),
            "{err}"
        );
    }

    #[test]
    fn defaults_are_filled_in() {
        let web = &Config::from_yaml(GOOD).unwrap().services[0];
        assert_eq!(web.mode, ForwardingMode::Dnat);
        assert_eq!(web.hash, HashFields::FiveTuple);
        assert_eq!(web.maglev_table_size, 16381);
        assert_eq!(web.backends[0].weight, 1);
        assert!(web.health_check.is_none());
    }

    #[test]
    fn ipv6_service_with_modes_weights_and_health_check() {
        let yaml = "\
maglev_seed: 7
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
";
        let config = Config::from_yaml(yaml).unwrap();
        assert_eq!(config.maglev_seed, 7);
        let v6 = &config.services[0];
        assert_eq!(v6.hash, HashFields::SourceIp);
        assert_eq!(v6.backends[1].weight, 0);
        let check = v6.health_check.as_ref().unwrap();
        assert_eq!(
            (check.kind, check.timeout_ms, check.fall),
            (HealthCheckKind::Http, 1000, 2)
        );
        // It survives a round trip through YAML.
        assert_eq!(Config::from_yaml(&config.to_yaml()).unwrap(), config);
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let cases = [
            (
                GOOD.replace("203.0.113.12", "2001:db8::12"),
                "services[0].backends[1].address",
            ),
            (
                GOOD.replace("port: 80\n", "port: 80\n    maglev_table_size: 1000\n"),
                "services[0].maglev_table_size",
            ),
            (
                GOOD.replace("port: 80\n", "port: 0\n"),
                "services[0].backends[0].port",
            ),
            (
                GOOD.replace("port: 80\n", "port: 80\n    mode: dsr-l2\n"),
                "services[0].backends[0].port",
            ),
            (
                GOOD.replace("203.0.113.12", "203.0.113.11"),
                "services[0].backends[1]: duplicate",
            ),
        ];
        for (yaml, want) in cases {
            let err = Config::from_yaml(&yaml).unwrap_err().to_string();
            assert!(err.starts_with(want), "want {want:?}, got {err}");
        }
    }

    #[test]
    fn forwarding_modes_and_their_addresses() {
        let with_mode = |mode: &str, extra: &str, node: &str| {
            format!(
                "{node}{}",
                GOOD.replace(
                    "port: 80\n",
                    &format!("port: 80\n    mode: {mode}\n{extra}")
                )
            )
        };
        let node = "node:\n  ipv4: 203.0.113.1\n  ipv6: 2001:db8:203::1\n  snat_ports: { first: 20000, last: 20999 }\n";
        let config = Config::from_yaml(&with_mode("snat", "", node)).unwrap();
        let web = &config.services[0];
        assert_eq!(web.mode, ForwardingMode::Snat);
        assert_eq!(
            config.mode_source(web),
            Some("203.0.113.1".parse().unwrap())
        );
        assert_eq!(
            config.node.snat_ports,
            PortRange {
                first: 20000,
                last: 20999
            }
        );
        let own =
            Config::from_yaml(&with_mode("snat", "    snat_address: 192.0.2.1\n", "")).unwrap();
        assert_eq!(
            own.mode_source(&own.services[0]),
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(
            own.node.snat_ports,
            PortRange {
                first: 1024,
                last: 32767
            }
        );
        let ipip =
            Config::from_yaml(&with_mode("dsr-ipip", "", node).replace("port: 8080", "port: 80"))
                .unwrap();
        assert_eq!(
            ipip.mode_source(&ipip.services[0]),
            Some("203.0.113.1".parse().unwrap())
        );
        let l2 = Config::from_yaml(&with_mode("dsr-l2", "", "").replace("port: 8080", "port: 0"))
            .unwrap();
        assert_eq!(l2.mode_source(&l2.services[0]), None);
        // Round trip with the node section.
        assert_eq!(Config::from_yaml(&config.to_yaml()).unwrap(), config);

        let cases = [
            (
                with_mode("snat", "", ""),
                "services[0].snat_address: snat mode needs a source address: set it, or node.ipv4",
            ),
            (
                with_mode("snat", "    snat_address: 2001:db8::1\n", ""),
                "services[0].snat_address: 2001:db8::1 is not of the VIP's address family",
            ),
            (
                with_mode("dnat", "    snat_address: 192.0.2.1\n", ""),
                "services[0].snat_address: only used in snat mode",
            ),
            (
                with_mode("dsr-ipip", "", "node: { ipv6: 2001:db8::1 }\n")
                    .replace("port: 8080", "port: 80"),
                "services[0].mode: dsr-ipip needs node.ipv4",
            ),
            (
                with_mode(
                    "snat",
                    "",
                    "node: { ipv4: 203.0.113.1, snat_ports: { first: 2000, last: 1999 } }\n",
                ),
                "node.snat_ports: 2000..1999 is not a range",
            ),
            (
                with_mode("snat", "", "node: { ipv4: 0.0.0.0 }\n"),
                "node.ipv4: must be an address",
            ),
        ];
        for (yaml, want) in cases {
            let err = Config::from_yaml(&yaml).unwrap_err().to_string();
            assert!(err.starts_with(want), "want {want:?}, got {err}");
        }
    }

    #[test]
    fn empty_document_means_no_services() {
        assert!(Config::from_yaml("services: []")
            .unwrap()
            .services
            .is_empty());
    }
}
