//! The CNI chained plugin `lb-cni` (`src/bin/lb-cni.rs`): listed after the plugin that creates the
//! pod's veth (ptp, bridge) in a conflist, it registers the pod's host-side interface and
//! addresses with the node's agent, which enforces the pod's policy there
//! ([`crate::endpoints`]).
//!
//! - [`config`]: what the runtime hands the plugin: the network configuration (with
//!   `prevResult`) on stdin and the `CNI_*` variables;
//! - [`command`]: ADD, DEL, CHECK and VERSION;
//! - [`agent`]: the calls to the agent's gRPC API on its unix socket;
//! - [`error`]: the CNI error result and its codes.

pub mod agent;
pub mod command;
pub mod config;
pub mod error;
