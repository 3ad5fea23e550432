//! Connection tracking entries: which backend a flow uses, and how replies are translated back.

use crate::service::Addr;

/// A flow as the datapath sees it on the way in: client → VIP. Also the key of `NAT_REPLY`, there
/// as backend → client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Connection states kept in [`ConntrackEntry::state`].
pub mod state {
    /// Seen a SYN (TCP) or a first packet (UDP).
    pub const OPEN: u8 = 0;
    /// A FIN or RST was seen: the entry expires after [`super::timeouts::CLOSING_NS`].
    pub const CLOSING: u8 = 1;
}

/// Idle times after which an entry no longer pins its flow to a backend.
pub mod timeouts {
    pub const TCP_ESTABLISHED_NS: u64 = 3600 * 1_000_000_000;
    pub const CLOSING_NS: u64 = 10 * 1_000_000_000;
    pub const UDP_NS: u64 = 60 * 1_000_000_000;
}

/// Value of the `CONNTRACK` LRU map, keyed by the client → VIP [`FlowKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackEntry {
    pub backend_id: u32,
    pub service_id: u32,
    /// `bpf_ktime_get_ns` of the last packet.
    pub last_seen_ns: u64,
    pub state: u8,
    /// [`reply_flags`] of the flow (also in its `NAT_REPLY` entry when it has one).
    pub flags: u8,
    /// SNAT flows: the node's source port allocated to the flow (network byte order); 0 otherwise.
    pub snat_port: u16,
    pub _pad: [u8; 4],
}

/// Value of the `NAT_REPLY` LRU map, keyed by the reply's [`FlowKey`] as it arrives from the backend:
/// backend → client for DNAT, backend → node address and allocated port for SNAT. The reply's source
/// is rewritten to the VIP and port; for SNAT its destination also goes back to the client and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatReply {
    pub vip: Addr,
    pub vip_port: u16,
    /// `service::mode::DNAT` or `service::mode::SNAT`.
    pub mode: u8,
    /// [`reply_flags`].
    pub flags: u8,
    pub service_id: u32,
    /// SNAT: the client address and port the reply goes back to (unused for DNAT: the reply is
    /// already addressed to the client).
    pub client: Addr,
    pub client_port: u16,
    pub _pad2: [u8; 6],
}

/// Bits of [`NatReply::flags`] and [`ConntrackEntry::flags`].
pub mod reply_flags {
    /// The request was translated on its client's workload veth (`lb_tc_request`, before the
    /// policy checked the client's egress against the chosen backend): the reply is translated
    /// back only at that veth's egress (`lb_tc_reply`, after the policy matched it to the
    /// connection client → backend); the balancer's ingress programs pass it untranslated.
    pub const AT_CLIENT_VETH: u8 = 1;
}

/// Value of the `BACKEND_REPLY` hash map, keyed by a backend's address, port, protocol and family
/// (a [`crate::service::ServiceKey`] of the backend, never port 0): the frontend its DNAT replies
/// come from. A backend serving one DNAT frontend (VIP, port, protocol) needs nothing per flow: its
/// replies leave as that VIP and port, and a new flow to it writes no `NAT_REPLY` entry. A backend
/// several frontends share (or a SNAT one, or one with port 0) is marked
/// `service::backend_flags::SHARED_REPLIES`: its new flows write `NAT_REPLY` entries, and
/// [`backend_reply_flags::SHARED`] here makes the reply path look there first; `vip` then is the
/// frontend it served alone before, for the flows of that time (they have no `NAT_REPLY` entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendReply {
    pub vip: Addr,
    pub vip_port: u16,
    pub flags: u8,
    pub _pad: u8,
}

/// Flags of a [`BackendReply`].
pub mod backend_reply_flags {
    /// The backend is shared now: a reply's `NAT_REPLY` entry decides, `vip` is the fallback.
    pub const SHARED: u8 = 1 << 0;
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: #[repr(C)], Copy, integers only, explicit padding.
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for ConntrackEntry {}
    unsafe impl aya::Pod for NatReply {}
    unsafe impl aya::Pod for BackendReply {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<FlowKey>(), 40);
        assert_eq!(core::mem::size_of::<ConntrackEntry>(), 24);
        assert_eq!(core::mem::size_of::<NatReply>(), 48);
        assert_eq!(core::mem::size_of::<BackendReply>(), 20);
    }
}
