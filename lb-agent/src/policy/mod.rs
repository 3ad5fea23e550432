//! Identity-based policy, userspace half: from the config's `policy:` section to the entries of the
//! datapath's ipcache, endpoint and policy maps, and a reference evaluator of those maps.
//!
//! Read in this order:
//! - [`model`]: the rule format (workloads, namespaces, rules, NetworkPolicy manifests), validation;
//! - [`k8s`]: NetworkPolicy → rules ([`k8s_examples`]: the Kubernetes documentation's examples);
//! - [`identity`]: numeric identities for label sets and CIDRs, stable across restarts;
//! - [`compile`]: model + identities → [`CompiledPolicy`], the exact map entries;
//! - [`evaluate`]: the datapath's lookup sequence on those entries: the spec of the eBPF side and the
//!   tests' oracle;
//! - [`datapath`]: the kernel side: loads and attaches the TC programs (pinned, so enforcement
//!   outlives the agent), writes a [`CompiledPolicy`] with the epoch swap, drains verdict events;
//! - [`enforcer`]: the agent's reconcile of the policy datapath, and its verdict reports;
//! - [`cidr_deny`]: the agent's reconcile of `lb_xdp`'s CIDR deny list (`policy.cidr_deny`).
//!
//! The map layouts, the lookup order and how deny-over-allow and default deny are encoded are
//! documented once, in `lb_common::policy`.

pub mod cidr_deny;
pub mod compile;
pub mod datapath;
pub mod enforcer;
pub mod evaluate;
pub mod identity;
pub mod k8s;
pub mod k8s_examples;
pub mod model;

#[cfg(test)]
mod tests;

pub use compile::{compile, CompiledPolicy, RuleInfo};
pub use evaluate::{Check, Maps, Packet};
pub use identity::{IdentityAllocator, IdentityKey};
pub use model::{PolicyConfig, PolicyError};
