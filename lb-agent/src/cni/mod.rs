//! The CNI chained plugin `lb-cni` (work in progress): its config, prevResult and environment
//! parsing ([`config`]) and its error result ([`error`]).

pub mod config;
pub mod error;
