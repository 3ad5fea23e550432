//! The agent's YAML configuration: services (VIP, port, protocol) and their backends.
//!
//! Parsing is strict: unknown fields are rejected, and every error names the field path and the line,
//! e.g. `services[0].backends[1].address at line 9 column 18: invalid IPv4 address syntax`.

use std::{collections::HashMap, fmt, net::Ipv4Addr, path::Path};

use lb_common::{protocol, service::limits};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub services: Vec<Service>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Human name, used in logs and metrics.
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: Ipv4Addr,
    pub port: u16,
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

    /// Checks what the type system cannot: uniqueness and datapath capacity.
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |path: String, message: String| Err(ConfigError::Invalid { path, message });
        if self.services.len() > limits::MAX_SERVICES as usize {
            return invalid(
                "services".into(),
                format!(
                    "{} services, at most {} fit the datapath",
                    self.services.len(),
                    limits::MAX_SERVICES
                ),
            );
        }
        let mut seen_services = HashMap::new();
        // A backend address:port answers for one service only: its replies are translated back to
        // exactly one VIP (the skeleton datapath's reverse NAT is keyed by the backend).
        let mut seen_backends = HashMap::new();
        for (i, service) in self.services.iter().enumerate() {
            let path = format!("services[{i}]");
            if service.name.is_empty() {
                return invalid(format!("{path}.name"), "must not be empty".into());
            }
            if service.port == 0 {
                return invalid(format!("{path}.port"), "must be 1..65535".into());
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
            for (j, backend) in service.backends.iter().enumerate() {
                let bpath = format!("{path}.backends[{j}]");
                if backend.port == 0 {
                    return invalid(format!("{bpath}.port"), "must be 1..65535".into());
                }
                let bkey = (backend.address, backend.port, service.protocol);
                if let Some(owner) = seen_backends.insert(bkey, (i, j)) {
                    return invalid(
                        bpath,
                        format!(
                            "{}:{}/{} is already a backend of services[{}].backends[{}]; \
                             a backend address:port may serve one service",
                            backend.address, backend.port, service.protocol, owner.0, owner.1
                        ),
                    );
                }
            }
        }
        Ok(())
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
    fn parses_a_good_config() {
        let config = Config::from_yaml(GOOD).unwrap();
        assert_eq!(config.services.len(), 1);
        let web = &config.services[0];
        assert_eq!(web.vip, Ipv4Addr::new(198, 51, 100, 10));
        assert_eq!(web.protocol, Protocol::Tcp);
        assert_eq!(web.backends[1].address, Ipv4Addr::new(203, 0, 113, 12));
    }

    #[test]
    fn bad_address_names_field_and_line() {
        let bad = GOOD.replace("203.0.113.12", "203.0.113.300");
        let err = Config::from_yaml(&bad).unwrap_err().to_string();
        assert!(
            err.starts_with("services[0].backends[1].address at line 9"),
            "{err}"
        );
        assert!(err.contains("invalid IPv4 address"), "{err}");
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
    fn shared_backend_is_rejected() {
        let two = format!(
            "{GOOD}{}",
            &GOOD["services:\n".len()..].replace("port: 80\n", "port: 81\n")
        );
        let err = Config::from_yaml(&two).unwrap_err().to_string();
        assert!(err.contains("services[1].backends[0]"), "{err}");
    }

    #[test]
    fn empty_document_means_no_services() {
        assert!(Config::from_yaml("services: []")
            .unwrap()
            .services
            .is_empty());
    }
}
