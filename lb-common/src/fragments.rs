//! IP fragments of balanced datagrams. Only the first fragment of a datagram carries the TCP/UDP
//! ports, so only it can be balanced; the datapath records how it left (its flow's mode and the
//! addresses after the rewrite, or the backend a DSR fragment went to) under the datagram's
//! identity, and every later fragment of that datagram leaves the same way. The L4 checksum sits in
//! the first fragment and covers the whole datagram's pseudo-header, so the first fragment's usual
//! incremental update is the whole L4 fix; later fragments of NAT flows only need their addresses
//! (and the IPv4 header checksum) changed.

use crate::service::{family, Addr};

/// Capacity and lifetime of the `FRAGMENTS` map.
pub mod limits {
    /// Entries of the `FRAGMENTS` LRU map: datagrams whose fragments are in flight at once. An entry
    /// is needed only from a datagram's first fragment to its last (microseconds on one path), so
    /// a full map means the oldest datagrams lose their later fragments to the stack (counted as
    /// `pass_fragment`) — raise it if that counter grows with VIP traffic.
    pub const MAX_TRACKED_DATAGRAMS: u32 = 8192;
    /// Age after which an entry no longer applies (Linux's default IPv4 reassembly timeout,
    /// `ipfrag_time`): a receiver has discarded an incomplete datagram by then, so a later fragment
    /// reusing the identification belongs to a new datagram whose first fragment was lost.
    pub const TIMEOUT_NS: u64 = 30 * 1_000_000_000;
}

/// IPv4 "flags and fragment offset" field (host order) and IPv6 fragment header "offset and flags"
/// field (host order).
pub mod field {
    /// IPv4: don't fragment.
    pub const IPV4_DONT_FRAGMENT: u16 = 0x4000;
    /// IPv4: more fragments follow.
    pub const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
    /// IPv4: offset of this fragment, in 8-byte units.
    pub const IPV4_OFFSET: u16 = 0x1fff;
    /// IPv6 fragment header: more fragments follow.
    pub const IPV6_MORE_FRAGMENTS: u16 = 0x0001;
    /// IPv6 fragment header: offset of this fragment, in 8-byte units, shifted left by 3.
    pub const IPV6_OFFSET: u16 = 0xfff8;
}

/// Where a packet sits in its datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// Not fragmented (including IPv6 "atomic fragments": offset 0, no more fragments).
    Whole,
    /// Offset 0 with more fragments to come: carries the L4 header.
    First,
    /// Offset above 0: no L4 header, only payload.
    Later,
}

/// Position of an IPv4 packet from its flags and fragment offset field (host order).
#[inline(always)]
pub fn ipv4_position(flags_offset: u16) -> Position {
    if flags_offset & field::IPV4_OFFSET != 0 {
        Position::Later
    } else if flags_offset & field::IPV4_MORE_FRAGMENTS != 0 {
        Position::First
    } else {
        Position::Whole
    }
}

/// Position of an IPv6 packet from its fragment header's offset and flags field (host order).
#[inline(always)]
pub fn ipv6_position(offset_flags: u16) -> Position {
    if offset_flags & field::IPV6_OFFSET != 0 {
        Position::Later
    } else if offset_flags & field::IPV6_MORE_FRAGMENTS != 0 {
        Position::First
    } else {
        Position::Whole
    }
}

/// Key of the `FRAGMENTS` map: a datagram as it arrives, before any rewrite.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub src: Addr,
    pub dst: Addr,
    /// Identification as on the wire, read natively (IPv4: 16 bits, zero-extended).
    pub id: u32,
    /// IPv4: the protocol (part of a datagram's identity, RFC 791). IPv6: always 0, because a
    /// datagram is (source, destination, identification) and the next header of later fragments
    /// need not match the first's (RFC 8200, 4.5).
    pub protocol: u8,
    pub family: u8,
    /// Which programs recorded the datagram and translate its later fragments ([`key_scope`]).
    pub scope: u8,
    pub _pad: u8,
}

/// Scopes of a [`FragmentKey`] in `FRAGMENTS`: the same datagram may be recorded in each, and
/// each program looks up only its own.
pub mod key_scope {
    /// `lb_xdp` and `lb_tc`, on the node's interfaces.
    pub const NODE: u8 = 0;
    /// `lb_tc_request`, on a client's workload veth: a request's first fragment, recorded before
    /// `policy_from_endpoint`, and its later fragments translated there too, so that the policy's
    /// own fragment tracking sees one datagram. `lb_xdp` and `lb_tc` leave those untouched, as
    /// they leave the flow's other packets.
    pub const CLIENT_REQUEST: u8 = 1;
    /// `lb_tc_reply`, on a client's workload veth: a reply's first fragment, recorded after
    /// `policy_to_endpoint`, and its later fragments. Not `CLIENT_REQUEST`: the backend may be a
    /// workload of this node too, whose own `lb_tc_request` must leave its reply's fragments
    /// alone (they get the VIP only after the client's policy).
    pub const CLIENT_REPLY: u8 = 2;
}

impl FragmentKey {
    /// The key of a datagram in [`key_scope::NODE`].
    #[inline(always)]
    pub fn new(family: u8, src: Addr, dst: Addr, id: u32, protocol: u8) -> Self {
        Self {
            src,
            dst,
            id,
            protocol: if family == family::IPV6 { 0 } else { protocol },
            family,
            scope: key_scope::NODE,
            _pad: 0,
        }
    }
}

/// Value of the `FRAGMENTS` map: how the datagram's first fragment left, for its later fragments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentEntry {
    /// DNAT and SNAT: the addresses the first fragment left with. DSR L2: the client and the
    /// backend whose MAC the first fragment went to. DSR IPIP: the outer header's addresses.
    pub src: Addr,
    pub dst: Addr,
    /// `bpf_ktime_get_coarse_ns` when the first fragment was seen.
    pub first_seen_ns: u64,
    /// DSR IPIP over IPv6: the outer flow label of the first fragment (computed from its ports,
    /// which later fragments lack), so that all take the same path.
    pub label: u32,
    /// The forwarding mode of the datagram's flow (`service::mode`), which says what becomes of
    /// its later fragments.
    pub mode: u8,
    pub _pad: [u8; 3],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: #[repr(C)], Copy, integers only, explicit padding.
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for FragmentEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_positions() {
        assert_eq!(ipv4_position(0x0000), Position::Whole);
        assert_eq!(ipv4_position(0x4000), Position::Whole, "DF only");
        assert_eq!(ipv4_position(0x2000), Position::First);
        assert_eq!(ipv4_position(0x2001), Position::Later);
        assert_eq!(ipv4_position(0x00b9), Position::Later, "last fragment");
    }

    #[test]
    fn ipv6_positions() {
        assert_eq!(ipv6_position(0x0000), Position::Whole, "atomic fragment");
        assert_eq!(ipv6_position(0x0001), Position::First);
        assert_eq!(ipv6_position(0x0009), Position::Later);
        assert_eq!(ipv6_position(0x05c8), Position::Later, "last fragment");
        assert_eq!(
            ipv6_position(0x0006),
            Position::Whole,
            "reserved bits ignored"
        );
    }

    #[test]
    fn ipv6_keys_ignore_the_protocol() {
        let a = Addr([1, 2, 3, 4]);
        assert_eq!(
            FragmentKey::new(family::IPV6, a, a, 7, 17),
            FragmentKey::new(family::IPV6, a, a, 7, 44)
        );
        assert_ne!(
            FragmentKey::new(family::IPV4, a, a, 7, 17),
            FragmentKey::new(family::IPV4, a, a, 7, 6)
        );
    }

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<FragmentKey>(), 40);
        assert_eq!(core::mem::size_of::<FragmentEntry>(), 48);
    }
}
