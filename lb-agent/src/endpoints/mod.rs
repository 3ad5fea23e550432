//! Pods' endpoints on this node, registered by the CNI plugin (`lb-cni`, see [`crate::cni`]) over
//! the gRPC API: the container's network attachment (container id, interface name inside it), the
//! pod (namespace, name), the host side of its veth and its addresses.
//!
//! A registered endpoint makes the agent attach the workload programs
//! ([`crate::datapath::AttachMode::Workload`]) to its host interface and put the interface on the
//! pod's policy workload ([`crate::desired`] places it: the workload of the same namespace/name
//! from the file, the API or Kubernetes, else one of its own without labels). Registrations are
//! kept in a state file ([`store`]) so that a restarted agent adopts their pinned links instead of
//! removing them, and an endpoint whose interface is gone is collected.

pub mod store;

use std::{ffi::CString, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::grpc::ApiError;

/// What identifies an endpoint, as the CNI spec identifies an attachment: (container id,
/// interface name inside the container).
pub type EndpointKey = (String, String);

/// A pod's network attachment on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`: the interface inside the pod, e.g. `eth0`.
    pub interface_name: String,
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub pod: String,
    /// The host side of the pod's veth, where the programs are attached.
    pub host_interface: String,
    /// The pod's addresses on the attachment.
    pub addresses: Vec<IpAddr>,
    /// The CNI network (its configuration's `name`) that registered it, so that a CNI `GC` of
    /// one network leaves other networks' endpoints alone. Empty: not known (a registration made
    /// without it, e.g. by an older plugin).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
}

/// Where an endpoint's interface went in the merged policy (see [`crate::desired`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The workload of the same namespace/name that a source defines got the interface.
    SourceWorkload,
    /// No source defines the pod: a workload of its own, in its namespace, without labels.
    OwnWorkload,
    /// Left out of the policy (reported as a conflict): balanced, not enforced.
    NotPlaced,
}

impl Endpoint {
    /// `namespace/pod`.
    pub fn pod_name(&self) -> String {
        format!("{}/{}", self.namespace, self.pod)
    }

    pub fn key(&self) -> EndpointKey {
        (self.container_id.clone(), self.interface_name.clone())
    }

    /// Checks the fields; errors name `{root}.<field>` (the request's field path).
    pub fn validate(&self, root: &str) -> Result<(), ApiError> {
        let field = |name: &str| format!("{root}.{name}");
        cni_name(&self.container_id, "a container id")
            .map_err(|m| ApiError::invalid(field("container_id"), m))?;
        if !self.network.is_empty() {
            cni_name(&self.network, "a CNI network name")
                .map_err(|m| ApiError::invalid(field("network"), m))?;
        }
        interface(&self.interface_name)
            .map_err(|m| ApiError::invalid(field("interface_name"), m))?;
        interface(&self.host_interface)
            .map_err(|m| ApiError::invalid(field("host_interface"), m))?;
        kubernetes_name(&self.namespace, 63)
            .map_err(|m| ApiError::invalid(field("pod_namespace"), m))?;
        kubernetes_name(&self.pod, 253).map_err(|m| ApiError::invalid(field("pod_name"), m))?;
        if self.addresses.is_empty() {
            return Err(ApiError::invalid(
                field("addresses"),
                "at least one address: the policy drops what a workload sends from others",
            ));
        }
        for (i, address) in self.addresses.iter().enumerate() {
            let unusable = address.is_unspecified()
                || address.is_loopback()
                || address.is_multicast()
                || matches!(address, IpAddr::V4(v4) if v4.is_broadcast());
            if unusable {
                return Err(ApiError::invalid(
                    format!("{root}.addresses[{i}]"),
                    format!("{address} is not a unicast address"),
                ));
            }
            if self.addresses[..i].contains(address) {
                return Err(ApiError::invalid(
                    format!("{root}.addresses[{i}]"),
                    format!("{address} is listed twice"),
                ));
            }
        }
        Ok(())
    }
}

/// The CNI spec's container ids and network names (`what`): alphanumerics, `_`, `.` and `-`,
/// starting with an alphanumeric.
fn cni_name(text: &str, what: &str) -> Result<(), String> {
    let valid = text.len() <= 1024
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{text:?} is not {what} (alphanumerics, '_', '.', '-', starting with an alphanumeric)"
        ))
    }
}

/// A Linux interface name: 1 to 15 bytes, no `/`, `:` or whitespace, not `.` or `..`.
fn interface(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if valid {
        Ok(())
    } else {
        Err(format!("{name:?} is not an interface name"))
    }
}

/// A Kubernetes object name: lower-case alphanumerics, `-` and `.`, at most `limit` bytes,
/// starting and ending with an alphanumeric.
fn kubernetes_name(name: &str, limit: usize) -> Result<(), String> {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let valid = !name.is_empty()
        && name.len() <= limit
        && name.starts_with(alnum)
        && name.ends_with(alnum)
        && name.chars().all(|c| alnum(c) || c == '-' || c == '.');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a Kubernetes name (lower-case alphanumerics, '-', '.', at most {limit})"
        ))
    }
}

/// Whether an interface of this name exists in the calling thread's network namespace.
pub fn interface_exists(name: &str) -> bool {
    let Ok(name) = CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn endpoint() -> Endpoint {
        Endpoint {
            container_id: "0123abcd".into(),
            interface_name: "eth0".into(),
            namespace: "prod".into(),
            pod: "api-1".into(),
            host_interface: "veth1a2b3c4d".into(),
            addresses: vec!["198.51.100.7".parse().unwrap()],
            network: "pods".into(),
        }
    }

    #[test]
    fn validation_names_the_field() {
        endpoint().validate("endpoint").unwrap();
        type Case = (fn(&mut Endpoint), &'static str);
        let cases: [Case; 8] = [
            (|e| e.container_id = "a/b".into(), "endpoint.container_id"),
            (|e| e.network = "-pods".into(), "endpoint.network"),
            (
                |e| e.interface_name = String::new(),
                "endpoint.interface_name",
            ),
            (
                |e| e.host_interface = "a-very-long-interface".into(),
                "endpoint.host_interface",
            ),
            (|e| e.namespace = "Prod".into(), "endpoint.pod_namespace"),
            (|e| e.pod = "api-".into(), "endpoint.pod_name"),
            (|e| e.addresses.clear(), "endpoint.addresses"),
            (
                |e| e.addresses.push("198.51.100.7".parse().unwrap()),
                "endpoint.addresses[1]",
            ),
        ];
        for (change, field) in cases {
            let mut e = endpoint();
            change(&mut e);
            let err = e.validate("endpoint").unwrap_err().to_string();
            assert!(err.starts_with(&format!("{field}: ")), "{err}");
        }
    }
}
