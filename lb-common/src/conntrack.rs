//! Connection tracking entries: which backend a flow uses, and how replies are translated back.
//!
//! Tracked flows live in two LRU maps of [`ConntrackEntry`], one per family: `CONNTRACK_V4`, keyed
//! by the 16-byte [`FlowKeyV4`], and `CONNTRACK_V6`, keyed by the 40-byte [`FlowKey`]. The kernel
//! hashes (jhash) and compares the whole key on every lookup and insert, so an IPv4 flow keyed by
//! 16 bytes instead of 40 costs one jhash round instead of three.

use crate::service::{family, Addr};

/// A flow as the datapath sees it on the way in: client → VIP. The key of `CONNTRACK_V6` (IPv6
/// flows; IPv4 ones are keyed by their [`FlowKeyV4`]) and of `NAT_REPLY`, there as backend → client.
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

/// Key of the `CONNTRACK_V4` map: an IPv4 [`FlowKey`] without the 12 zero bytes of each address
/// and the family. Addresses and ports as on the wire, like [`Addr::from_v4_word`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKeyV4 {
    pub src: u32,
    pub dst: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

impl FlowKeyV4 {
    /// The key of `flow`, which must be of family IPv4 (only the first word of each address is
    /// read).
    #[inline(always)]
    pub fn of(flow: &FlowKey) -> Self {
        // Built as four words, one stack store each (this is the datapath's per-packet path):
        // field by field, the BPF backend zeroes the 3 padding bytes with a call to `memset`.
        let (src_port, dst_port) = (u32::from(flow.src_port), u32::from(flow.dst_port));
        // The source port's two bytes first in memory.
        let ports = if cfg!(target_endian = "little") {
            src_port | dst_port << 16
        } else {
            src_port << 16 | dst_port
        };
        let words: [u32; 4] = [
            flow.src.0[0],
            flow.dst.0[0],
            ports,
            u32::from_ne_bytes([flow.protocol, 0, 0, 0]),
        ];
        // SAFETY: `Self` is #[repr(C)], 16 bytes of integers without hidden padding (tested), in
        // the order of these words' bytes.
        unsafe { core::mem::transmute::<[u32; 4], Self>(words) }
    }
}

impl From<FlowKeyV4> for FlowKey {
    fn from(key: FlowKeyV4) -> Self {
        Self {
            src: Addr::from_v4_word(key.src),
            dst: Addr::from_v4_word(key.dst),
            src_port: key.src_port,
            dst_port: key.dst_port,
            protocol: key.protocol,
            family: family::IPV4,
            _pad: [0; 2],
        }
    }
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

/// Value of the `CONNTRACK_V4` and `CONNTRACK_V6` LRU maps, keyed by the client → VIP flow.
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

impl ConntrackEntry {
    /// Whether the entry's flow has ended by `now_ns` (the clock of `last_seen_ns`,
    /// `bpf_ktime_get_coarse_ns`: CLOCK_MONOTONIC): idle longer than its state's timeout.
    #[inline(always)]
    pub fn expired(&self, now_ns: u64, is_tcp: bool) -> bool {
        let timeout = if self.state == state::CLOSING {
            timeouts::CLOSING_NS
        } else if is_tcp {
            timeouts::TCP_ESTABLISHED_NS
        } else {
            timeouts::UDP_NS
        };
        now_ns.wrapping_sub(self.last_seen_ns) > timeout
    }
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
    unsafe impl aya::Pod for FlowKeyV4 {}
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
        assert_eq!(core::mem::size_of::<FlowKeyV4>(), 16);
        assert_eq!(core::mem::size_of::<ConntrackEntry>(), 24);
        assert_eq!(core::mem::size_of::<NatReply>(), 48);
        assert_eq!(core::mem::size_of::<BackendReply>(), 20);
    }

    #[test]
    fn v4_key_keeps_the_wire_bytes_and_converts_back() {
        let flow = FlowKey {
            src: Addr::from_v4_word(u32::from_ne_bytes([192, 0, 2, 7])),
            dst: Addr::from_v4_word(u32::from_ne_bytes([198, 51, 100, 10])),
            src_port: 40000u16.to_be(),
            dst_port: 80u16.to_be(),
            protocol: crate::protocol::TCP,
            family: family::IPV4,
            _pad: [0; 2],
        };
        let key = FlowKeyV4::of(&flow);
        // SAFETY: repr(C), 16 bytes of integers, no hidden padding (checked above).
        let bytes: [u8; 16] = unsafe { core::mem::transmute(key) };
        assert_eq!(
            bytes,
            [192, 0, 2, 7, 198, 51, 100, 10, 0x9c, 0x40, 0, 80, 6, 0, 0, 0]
        );
        assert_eq!(FlowKey::from(key), flow);
    }
}
