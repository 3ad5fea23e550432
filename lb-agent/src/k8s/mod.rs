//! Kubernetes as a source of desired state: Services and EndpointSlices, watched through kube-rs
//! watchers and reflectors, translated into [`crate::config::Service`]s; Namespaces, Pods and
//! NetworkPolicies translated into the policy model ([`crate::policy::PolicyConfig`]).
//!
//! - [`translate`]: the pure translation of services ([`services_from`]), with its rules.
//! - [`policy`]: the pure translation of the policy objects ([`translate_policy`]).
//! - [`source`]: [`K8sSource`], which keeps reflector stores of both kinds current against an API
//!   server and publishes the translation on a `tokio::sync::watch` channel.

pub mod policy;
pub mod source;
pub mod translate;

pub use policy::{translate_policy, PolicyTranslation};
pub use source::{K8sOptions, K8sSource};
pub use translate::{services_from, translate, NodeOptions, Note, Translation};
