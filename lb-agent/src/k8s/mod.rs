//! Kubernetes as a source of desired state: Services and EndpointSlices, watched through kube-rs
//! watchers and reflectors, translated into [`crate::config::Service`]s.
//!
//! - [`translate`]: the pure translation ([`services_from`]), with its rules.
//! - [`source`]: [`K8sSource`], which keeps reflector stores of both kinds current against an API
//!   server and publishes the translation on a `tokio::sync::watch` channel.

pub mod source;
pub mod translate;

pub use source::{K8sOptions, K8sSource};
pub use translate::{services_from, translate, NodeOptions, Note, Translation};
