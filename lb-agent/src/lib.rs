//! lb-agent as a library: the config model and the datapath loader, shared by the `lb-agent` binary,
//! the integration tests and xtask.

pub mod agent;
mod applied;
pub mod cni;
pub mod config;
pub mod config_watch;
pub mod ctl;
pub mod datapath;
pub mod decap;
pub mod desired;
pub mod ebpf_log;
pub mod endpoints;
pub mod flow_events;
pub mod grpc;
pub mod health;
pub mod http;
pub mod inspect;
pub mod k8s;
pub mod maglev;
pub mod map_batch;
pub mod metrics;
pub mod pins;
pub mod policy;
pub mod prefilter;
pub mod reply_routes;
pub mod resize;
mod retired;
pub mod state_file;
