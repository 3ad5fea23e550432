//! What a CNI runtime hands the plugin: the network configuration on stdin (with the previous
//! plugin's result, `prevResult`) and the `CNI_*` environment variables. Parsed into plain values;
//! every problem is a [`CniError`] naming the field or variable.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::{CniError, ErrorCode};

/// The agent's gRPC socket when the config names none (the DaemonSet's `--grpc-socket`).
pub const DEFAULT_AGENT_SOCKET: &str = "/run/lb/api.sock";

/// The policy namespace of a pod whose runtime passes no `K8S_POD_NAMESPACE`.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The spec versions this plugin reads and writes, oldest first (the result formats with
/// `interfaces` and `ips`; CHECK from 0.4.0 on, GC and STATUS from 1.1.0 on).
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The network configuration on stdin. Fields other plugins or the runtime add (`runtimeConfig`,
/// `args`, `capabilities`, ...) are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin: String,
    /// Our own field: the agent's gRPC unix socket.
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    /// The result of the plugins before this one, kept byte for byte: ADD prints it unchanged.
    #[serde(default)]
    pub prev_result: Option<Box<RawValue>>,
    /// GC: the attachments the runtime still has on this network; any other is released.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
}

/// An entry of `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

impl NetConf {
    /// Parses stdin; the version must be one of [`SUPPORTED_VERSIONS`].
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|err| {
            CniError::new(
                ErrorCode::DecodeFailure,
                "cannot read the network configuration on stdin",
                err.to_string(),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!("cniVersion {:?} is not supported", conf.cni_version),
                format!("lb-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        Ok(conf)
    }

    /// Whether the configuration's version is `since` or later (both in [`SUPPORTED_VERSIONS`]).
    pub fn version_at_least(&self, since: &str) -> bool {
        let index = |v: &str| SUPPORTED_VERSIONS.iter().position(|s| *s == v);
        index(&self.cni_version) >= index(since)
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.agent_socket
            .clone()
            .unwrap_or_else(|| DEFAULT_AGENT_SOCKET.into())
    }

    /// The previous result, required: lb-cni is a chained plugin.
    pub fn prev_result(&self) -> Result<(&RawValue, PrevResult), CniError> {
        let raw = self.prev_result.as_deref().ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidNetworkConfig,
                "prevResult is missing: lb-cni is a chained plugin, list it after the plugin \
                 that creates the pod's veth (ptp, bridge)",
                "",
            )
        })?;
        let parsed = serde_json::from_str(raw.get()).map_err(|err| {
            CniError::new(
                ErrorCode::DecodeFailure,
                "cannot read prevResult",
                err.to_string(),
            )
        })?;
        Ok((raw, parsed))
    }
}

/// The parts of a previous result lb-cni reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PrevResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Interface {
    pub name: String,
    /// The container's netns path; absent (or empty) for host-side interfaces.
    #[serde(default)]
    pub sandbox: Option<String>,
}

impl Interface {
    fn on_host(&self) -> bool {
        self.sandbox.as_deref().is_none_or(str::is_empty)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IpConfig {
    /// CIDR notation: `198.51.100.7/24`.
    pub address: String,
    /// Index into `interfaces`.
    #[serde(default)]
    pub interface: Option<usize>,
}

impl PrevResult {
    /// The host side of the pod's veth: the one interface without `sandbox` that is not a bridge
    /// (`is_bridge`: the bridge plugin lists its bridge, e.g. `cni0`, too).
    pub fn host_interface(&self, is_bridge: impl Fn(&str) -> bool) -> Result<String, CniError> {
        let candidates: Vec<&str> = self
            .interfaces
            .iter()
            .filter(|i| i.on_host() && !is_bridge(&i.name))
            .map(|i| i.name.as_str())
            .collect();
        match candidates[..] {
            [one] => Ok(one.to_string()),
            [] => Err(CniError::new(
                ErrorCode::InvalidNetworkConfig,
                "prevResult names no host-side interface (an entry of interfaces without sandbox)",
                "lb-cni needs a plugin that creates a veth pair (ptp, bridge) before it",
            )),
            _ => Err(CniError::new(
                ErrorCode::InvalidNetworkConfig,
                "prevResult names several host-side interfaces",
                candidates.join(", "),
            )),
        }
    }

    /// The pod's addresses on `ifname` (the container interface): the `ips` whose `interface` is
    /// that entry of `interfaces`, or names none.
    pub fn addresses(&self, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
        let container = self
            .interfaces
            .iter()
            .position(|i| i.name == ifname && !i.on_host());
        let mut addresses = Vec::new();
        for (n, ip) in self.ips.iter().enumerate() {
            if ip.interface.is_some() && ip.interface != container {
                continue;
            }
            let text = ip.address.split('/').next().unwrap_or_default();
            let address: IpAddr = text.parse().map_err(|_| {
                CniError::new(
                    ErrorCode::DecodeFailure,
                    format!(
                        "prevResult.ips[{n}].address: {:?} is not an address",
                        ip.address
                    ),
                    "",
                )
            })?;
            if !addresses.contains(&address) {
                addresses.push(address);
            }
        }
        if addresses.is_empty() {
            return Err(CniError::new(
                ErrorCode::InvalidNetworkConfig,
                format!("prevResult gives {ifname} no address"),
                "lb-cni needs the pod's addresses (an IPAM plugin in the plugin before it)",
            ));
        }
        Ok(addresses)
    }
}

/// The `CNI_*` environment variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
    pub args: BTreeMap<String, String>,
}

impl CniEnv {
    /// Reads them with `var` (the process environment, or a test's map).
    pub fn read(var: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let command = var("CNI_COMMAND").unwrap_or_default();
        if command.is_empty() {
            return Err(missing("CNI_COMMAND"));
        }
        let args = var("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter(|pair| !pair.is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((key, value)) => Ok((key.to_string(), value.to_string())),
                None => Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
                    "",
                )),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            command,
            container_id: var("CNI_CONTAINERID").unwrap_or_default(),
            netns: var("CNI_NETNS").unwrap_or_default(),
            ifname: var("CNI_IFNAME").unwrap_or_default(),
            args,
        })
    }

    /// Checks that the variables `command` needs are set (`CNI_NETNS` may be empty on DEL).
    pub fn require(&self, netns: bool) -> Result<(), CniError> {
        for (name, value) in [
            ("CNI_CONTAINERID", &self.container_id),
            ("CNI_IFNAME", &self.ifname),
        ] {
            if value.is_empty() {
                return Err(missing(name));
            }
        }
        if netns && self.netns.is_empty() {
            return Err(missing("CNI_NETNS"));
        }
        Ok(())
    }

    /// The pod's policy workload, (namespace, name): `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from
    /// `CNI_ARGS` (the kubelet's runtime sets them). Without them (another runtime), the
    /// container id (lower-cased) in namespace [`DEFAULT_NAMESPACE`]: a workload of its own.
    pub fn workload(&self) -> (String, String) {
        let arg = |key: &str| self.args.get(key).filter(|v| !v.is_empty()).cloned();
        (
            arg("K8S_POD_NAMESPACE").unwrap_or_else(|| DEFAULT_NAMESPACE.to_string()),
            arg("K8S_POD_NAME").unwrap_or_else(|| self.container_id.to_ascii_lowercase()),
        )
    }
}

fn missing(name: &str) -> CniError {
    CniError::new(
        ErrorCode::InvalidEnvironment,
        format!("{name} is not set"),
        "",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What ptp (host-local IPAM) hands the next plugin, as a runtime passes it.
    const PTP: &str = r#"{
        "cniVersion": "1.0.0", "name": "pods", "type": "lb-cni",
        "agentSocket": "/run/test/api.sock",
        "runtimeConfig": {"portMappings": []},
        "prevResult": {"cniVersion":"1.0.0",
            "interfaces":[{"name":"veth6c1e1a3b","mac":"8a:1c:f1:2d:3e:4f"},
                          {"name":"eth0","mac":"c2:11:22:33:44:55","sandbox":"/run/netns/pod"}],
            "ips":[{"interface":1,"address":"192.0.2.10/24","gateway":"192.0.2.1"},
                   {"interface":1,"address":"2001:db8::10/64"}],
            "routes":[{"dst":"0.0.0.0/0"}],"dns":{}}
    }"#;

    #[test]
    fn a_ptp_result_gives_the_host_veth_and_the_pod_addresses() {
        let conf = NetConf::parse(PTP.as_bytes()).unwrap();
        assert_eq!(conf.agent_socket(), PathBuf::from("/run/test/api.sock"));
        let (raw, prev) = conf.prev_result().unwrap();
        assert!(raw
            .get()
            .starts_with("{\"cniVersion\":\"1.0.0\",\n            \"interfaces\""));
        assert_eq!(prev.host_interface(|_| false).unwrap(), "veth6c1e1a3b");
        let addresses: Vec<String> = prev
            .addresses("eth0")
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(addresses, ["192.0.2.10", "2001:db8::10"]);
    }

    #[test]
    fn a_bridge_result_skips_the_bridge() {
        let prev: PrevResult = serde_json::from_str(
            r#"{"interfaces":[{"name":"cni0"},{"name":"veth1"},{"name":"eth0","sandbox":"/x"}],
                "ips":[{"address":"192.0.2.10/24","interface":2},{"address":"192.0.2.99/24","interface":0}]}"#,
        )
        .unwrap();
        assert_eq!(prev.host_interface(|name| name == "cni0").unwrap(), "veth1");
        let err = prev.host_interface(|_| false).unwrap_err();
        assert_eq!(err.msg, "prevResult names several host-side interfaces");
        assert_eq!(err.details, "cni0, veth1");
        assert_eq!(
            prev.addresses("eth0").unwrap(),
            ["192.0.2.10".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn bad_configs_are_errors_with_their_code() {
        let code = |stdin: &str| NetConf::parse(stdin.as_bytes()).unwrap_err().code;
        assert_eq!(code("not json"), ErrorCode::DecodeFailure);
        assert_eq!(
            code(r#"{"name":"x","type":"lb-cni"}"#),
            ErrorCode::DecodeFailure
        );
        assert_eq!(
            code(r#"{"cniVersion":"0.2.0","name":"x","type":"lb-cni"}"#),
            ErrorCode::IncompatibleVersion
        );
        let conf = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"x","type":"lb-cni"}"#).unwrap();
        assert_eq!(conf.agent_socket(), PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(
            conf.prev_result().unwrap_err().code,
            ErrorCode::InvalidNetworkConfig
        );
        let no_veth: PrevResult =
            serde_json::from_str(r#"{"interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[]}"#)
                .unwrap();
        assert_eq!(
            no_veth.host_interface(|_| false).unwrap_err().code,
            ErrorCode::InvalidNetworkConfig
        );
        assert_eq!(
            no_veth.addresses("eth0").unwrap_err().msg,
            "prevResult gives eth0 no address"
        );
        let bad_ip: PrevResult =
            serde_json::from_str(r#"{"ips":[{"address":"192.0.2.300/24"}]}"#).unwrap();
        assert_eq!(
            bad_ip.addresses("eth0").unwrap_err().msg,
            "prevResult.ips[0].address: \"192.0.2.300/24\" is not an address"
        );
    }

    #[test]
    fn the_environment_and_cni_args() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let env = CniEnv::read(vars(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/run/netns/pod"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=api-1;K8S_POD_UID=u",
            ),
        ]))
        .unwrap();
        env.require(true).unwrap();
        assert_eq!(env.workload(), ("prod".into(), "api-1".into()));
        let err = CniEnv::read(vars(&[])).unwrap_err();
        assert_eq!(
            (err.code, err.msg.as_str()),
            (ErrorCode::InvalidEnvironment, "CNI_COMMAND is not set")
        );
        let del = CniEnv::read(vars(&[("CNI_COMMAND", "DEL"), ("CNI_IFNAME", "eth0")])).unwrap();
        assert_eq!(
            del.require(false).unwrap_err().msg,
            "CNI_CONTAINERID is not set"
        );
        assert_eq!(del.workload(), ("default".into(), String::new()));
        let err = CniEnv::read(vars(&[("CNI_COMMAND", "ADD"), ("CNI_ARGS", "oops")])).unwrap_err();
        assert_eq!(err.msg, "CNI_ARGS: \"oops\" is not KEY=VALUE");
    }
}
