//! Types and logic shared by the eBPF datapath (`lb-ebpf`) and userspace (`lb-agent`, tests).
//!
//! Everything here is `no_std` and `#[repr(C)]`, so one definition serves both sides. Addresses and
//! ports inside map keys and values are kept in **network byte order**, exactly as they appear in a
//! packet, so the datapath never converts; userspace converts with the constructors provided here.
//!
//! Maps outlive agents (they are pinned): a change that keeps a map type's size but changes the
//! meaning of its bytes must bump `MAP_LAYOUT_VERSION` in `lb-agent/src/pins.rs`.
#![no_std]

pub mod checksum;
pub mod conntrack;
pub mod counters;
pub mod flow_events;
pub mod flow_hash;
pub mod fragments;
pub mod icmp;
pub mod modes;
pub mod policy;
pub mod prefilter;
pub mod service;

/// IP protocol numbers the balancer understands.
pub mod protocol {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}
