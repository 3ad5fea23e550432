//! Load-balancing flow events: what the datapath decided for a new flow (its backend, and why a
//! choice was made) and which VIP packets it dropped before a backend was found, written by `lb_xdp`
//! and `lb_tc` into the `FLOW_EVENTS` ring buffer when the agent loads them with flow events on
//! (`--flow-events`, or `flow_events:` in the config, switched at runtime by reloading the
//! programs), and which packets of a flow whose backend was chosen did not reach it. Off by
//! default: the switch is a read-only global set at load time, so with it off the verifier removes
//! the event code and the per-packet path is unchanged. A full ring
//! buffer loses the event, counted in `Counter::FlowEventsLost`; the packet is never held up.
//!
//! Conntrack hits and non-VIP traffic never produce an event.

use crate::{conntrack::FlowKey, service::Addr};

pub mod limits {
    /// Bytes of the `FLOW_EVENTS` ring buffer (a power of two, a multiple of the page size): about
    /// 2900 events of [`super::FlowEvent`] (80 bytes and an 8-byte record header each).
    pub const RING_BYTES: u32 = 1 << 18;
}

/// What a [`FlowEvent`] reports (its `kind`).
pub mod kind {
    /// A backend was chosen and the flow tracked.
    pub const NEW_FLOW: u8 = 1;
    /// A packet to a service was dropped before it had a backend; `reason` says why.
    pub const DROP: u8 = 2;
    /// A packet of a flow whose backend was chosen (new or tracked) did not go to it; `reason`
    /// says why: a drop after the choice (`drop_dsr_no_neigh`, `drop_dsr_no_route`,
    /// `drop_dsr_not_on_link`, `drop_encap_too_big`, `drop_encap_failed`,
    /// `drop_mode_unconfigured`, and `drop_snat_ports_exhausted` for a new SNAT flow that got no
    /// source port, so was never tracked) or the "fragmentation needed" / "packet too big" answer
    /// sent to the client instead (`icmp_too_big_sent`), or the "time exceeded" or "destination
    /// unreachable" one (`icmp_time_exceeded_sent`, `icmp_unreachable_sent`: a SNAT request). The backend fields name the flow's backend.
    pub const NOT_FORWARDED: u8 = 3;

    /// Stable snake_case name, for metrics (`lb_flow_events_total{kind}`) and logs.
    pub const fn name(kind: u8) -> &'static str {
        match kind {
            NEW_FLOW => "new_flow",
            DROP => "drop",
            NOT_FORWARDED => "not_forwarded",
            _ => "unknown",
        }
    }
}

/// Why a new flow's backend was chosen (its `choice`). Every choice is the Maglev table's.
pub mod choice {
    /// The flow had no conntrack entry and this is its first packet (TCP SYN, or UDP): a new
    /// connection.
    pub const NEW: u8 = 0;
    /// A TCP packet other than a SYN without a conntrack entry: its entry was evicted (conntrack
    /// full) or the flow predates the datapath. The table picks the same backend as before while
    /// the backend set is unchanged (counted `conntrack_midflow_miss`).
    pub const CONNTRACK_MISS: u8 = 1;
    /// The tracked backend was removed or deactivated: a new one was chosen (counted
    /// `conntrack_backend_gone`).
    pub const BACKEND_GONE: u8 = 2;
    /// The tracked entry had expired, or a SYN reused the port pair of a closing connection.
    pub const ENTRY_REPLACED: u8 = 3;

    /// Stable snake_case name, for logs and events.
    pub const fn name(choice: u8) -> &'static str {
        match choice {
            NEW => "new",
            CONNTRACK_MISS => "conntrack_miss",
            BACKEND_GONE => "backend_gone",
            ENTRY_REPLACED => "entry_replaced",
            _ => "unknown",
        }
    }
}

/// One record of the `FLOW_EVENTS` ring buffer. 80 bytes, 8-byte aligned, no hidden padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_coarse_ns` (monotonic, since boot) when the packet was handled.
    pub timestamp_ns: u64,
    /// The packet as it arrived: client address and port → VIP and port, protocol, family.
    pub flow: FlowKey,
    /// The chosen backend's address (zero for a drop before the choice).
    pub backend: Addr,
    pub service_id: u32,
    /// The chosen backend's `BACKENDS` id (0 for a drop before the choice).
    pub backend_id: u32,
    /// The port the packet went (or was to go) to on the backend (network byte order; 0 for a
    /// drop before the choice).
    pub backend_port: u16,
    /// [`kind`].
    pub kind: u8,
    /// The service's `lb_common::service::mode`.
    pub mode: u8,
    /// [`choice`] (new flows).
    pub choice: u8,
    /// The `Counter` of a drop or of a packet not forwarded, else 0.
    pub reason: u8,
    pub _pad: [u8; 2],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: #[repr(C)], Copy, integers only, explicit padding.
    unsafe impl aya::Pod for FlowEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::Counter;

    #[test]
    fn layout_is_small_aligned_and_without_hidden_padding() {
        assert_eq!(core::mem::size_of::<FlowEvent>(), 80);
        assert_eq!(core::mem::align_of::<FlowEvent>(), 8);
        assert!(limits::RING_BYTES.is_power_of_two());
    }

    #[test]
    fn every_counter_fits_the_reason_byte() {
        assert!(Counter::SLOTS <= u8::MAX as u32 + 1);
    }
}
