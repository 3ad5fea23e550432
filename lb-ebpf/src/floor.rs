//! What the kernel's conntrack map costs by itself: programs that do nothing but one operation on
//! `CONNTRACK_V4`, measured by `lb-bench` next to `lb_xdp` (never attached by the agent). Every
//! balancer that tracks each new flow in an LRU map pays at least `floor_conntrack_insert` per
//! new flow, and `floor_conntrack_lookup` per tracked packet.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::conntrack::{ConntrackEntry, FlowKeyV4};

use crate::maps::CONNTRACK_V4;

/// The key both programs use: all zeros, which no real flow has (address 0.0.0.0, port 0).
const FLOOR_KEY: FlowKeyV4 = FlowKeyV4 {
    src: 0,
    dst: 0,
    src_port: 0,
    dst_port: 0,
    protocol: 0,
    _pad: [0; 3],
};

/// One insert of [`FLOOR_KEY`] (the bench removes it between calls, so every call inserts).
#[xdp]
pub fn floor_conntrack_insert(_ctx: XdpContext) -> u32 {
    let entry = ConntrackEntry {
        backend_id: 1,
        service_id: 1,
        last_seen_ns: 0,
        state: 0,
        flags: 0,
        snat_port: 0,
        _pad: [0; 4],
    };
    match CONNTRACK_V4.insert(&FLOOR_KEY, &entry, 0) {
        Ok(()) => xdp_action::XDP_PASS,
        Err(_) => xdp_action::XDP_ABORTED,
    }
}

/// One lookup of [`FLOOR_KEY`] (present: the bench inserts it first).
#[xdp]
pub fn floor_conntrack_lookup(_ctx: XdpContext) -> u32 {
    match CONNTRACK_V4.get_ptr(&FLOOR_KEY) {
        Some(_) => xdp_action::XDP_PASS,
        None => xdp_action::XDP_ABORTED,
    }
}
