//! Identity-based policy: the ipcache, endpoint and policy map entries, the reserved identities, the
//! verdicts and reasons, and the decision logic the datapath and the agent's reference evaluator share.
//!
//! # Maps
//!
//! | map | type | key → value | entries |
//! |---|---|---|---|
//! | `POLICY_STATE` | array | 0 → [`PolicyState`] (active epoch) | 1 |
//! | `IPCACHE_V4` | LPM trie | [`IpKeyV4`] (epoch, CIDR) → [`IpcacheEntry`] (identity) | [`limits::IPCACHE_MAP_ENTRIES`] |
//! | `IPCACHE_V6` | LPM trie | [`IpKeyV6`] (epoch, CIDR) → [`IpcacheEntry`] | [`limits::IPCACHE_MAP_ENTRIES`] |
//! | `ENDPOINTS_V4` | hash | [`IpKeyV4`] (epoch, address) → [`EndpointInfo`] | [`limits::ENDPOINT_MAP_ENTRIES`] |
//! | `ENDPOINTS_V6` | hash | [`IpKeyV6`] (epoch, address) → [`EndpointInfo`] | [`limits::ENDPOINT_MAP_ENTRIES`] |
//! | `POLICY` | LPM trie | [`PolicyKey`] → [`PolicyEntry`] (kind, rule id) | [`limits::POLICY_MAP_ENTRIES`] |
//! | `POLICY_EVENTS` | ring buffer | [`VerdictEvent`] | [`limits::EVENT_RING_BYTES`] bytes |
//! | `POLICY_COUNTERS` | per-CPU array | [`counter_index`] → packets; [`EVENTS_LOST_SLOT`] | [`COUNTER_ARRAY_LEN`] |
//! | `POLICY_CONNTRACK` | LRU hash | `FlowKey` (as the originator sent it) → [`PolicyConntrackEntry`] | [`state_limits::CONNTRACK_ENTRIES`] |
//! | `POLICY_FRAGMENTS` | LRU hash | `FragmentKey` → [`PolicyFragmentEntry`] | [`state_limits::FRAGMENT_ENTRIES`] |
//! | `POLICY_DECISIONS` | LRU hash | [`DecisionKey`] → [`CachedDecision`] (steps 4–5, cached) | [`state_limits::DECISION_ENTRIES`] |
//! | `CIDR_DENY_V4` / `_V6` | LPM trie | [`IpKeyV4`] / [`IpKeyV6`] (epoch 0, CIDR) → list index | [`state_limits::CIDR_DENY_ENTRIES`] |
//!
//! LPM keys are a `u32` prefix length followed by the key struct (`aya::maps::lpm_trie::Key` in
//! userspace, `aya_ebpf::maps::lpm_trie::Key` in the datapath, both `repr(C, packed)`); [`Lpm`] is
//! that pair, and the constructors here are the only place prefix lengths are computed. Prefix bits
//! are counted from the first byte of the key struct, most significant bit first, so every field a
//! prefix may cut (addresses, ports) is in network byte order. Identities are never cut, so they are
//! native `u32`s.
//!
//! # Atomic updates: epochs
//!
//! Every key that affects a verdict starts with an `epoch` byte (0 or 1). The agent writes a complete
//! new rule set (ipcache, endpoints, policy) under the inactive epoch, then flips
//! `POLICY_STATE.epoch` (one aligned 4-byte store), then deletes the old epoch's entries. A packet
//! reads the epoch once and does every lookup under it, so it sees either the old or the new rule set,
//! never a mix, and an endpoint never exists without its policy (no window of default-allow). The
//! price: maps hold two rule sets during a swap, so their `max_entries` are twice the logical limits.
//!
//! # Datapath lookup order (one direction)
//!
//! A packet is checked at most twice: **egress** of its source if the source is a local endpoint, then
//! **ingress** of its destination if that is a local endpoint. For one direction, with `local` the
//! enforced address (source for egress, destination for ingress) and `peer` the other (replies of
//! allowed connections are meant to be passed by connection tracking before step 1, as NetworkPolicy
//! is connection-oriented):
//!
//! 1. `epoch = POLICY_STATE[0].epoch` (a missing entry counts as epoch 0).
//! 2. `ep = ENDPOINTS_Vx[IpKeyVx::exact(epoch, local)]`. Miss: not a local endpoint, no policy here:
//!    pass, [`Reason::NoLocalEndpoint`].
//! 3. `peer_id = IPCACHE_Vx[IpKeyVx::lookup(epoch, peer)].identity` (longest prefix match). Miss:
//!    [`identity::WORLD`]. (Userspace always installs `/0` entries, so a miss means a bug.)
//! 4. Up to three `POLICY` lookups, each a longest prefix match with
//!    `PolicyKey::lookup(epoch, dir, ep.identity, PEER, proto, dport)` (`dport` is 0 for protocols
//!    without ports), all done whatever the first ones return:
//!    - `exact`: `PEER = peer_id`;
//!    - `world`: `PEER = identity::WORLD`, only if [`identity::world_class`]`(peer_id)` says the peer
//!      is outside the cluster (a CIDR identity, world-ipv4/6, or a miss); otherwise `None`;
//!    - `any`: `PEER = identity::ANY`.
//! 5. `decide([exact, world, any], ep.flags)` ([`decide`]): an explicit deny in any of them wins;
//!    then an allow (the first in that order is reported); then a [`EntryKind::DefaultDeny`] (the
//!    endpoint is selected in this direction and nothing allowed the packet); with none of these, the
//!    endpoint is not selected in this direction: pass, [`Reason::NotSelected`]. A would-be deny on an
//!    endpoint with [`endpoint_flags::AUDIT`] becomes [`Verdict::Audit`]: passed, counted and
//!    reported with the same reason and rule.
//!
//! That is one array, one hash and at most four LPM lookups, whatever the number of rules or
//! identities. The datapath caches the outcome of steps 4–5 (before the audit flag) in
//! `POLICY_DECISIONS` under a [`DecisionKey`], so repeated (peer identity, port) pairs skip the three
//! `POLICY` walks, whose depth grows (logarithmically) with the rules of an endpoint identity.
//!
//! # How userspace makes those lookups correct
//!
//! Within one (epoch, direction, endpoint identity) the `POLICY` trie holds, from short to long:
//! - prefix [`PolicyKey::PREFIX_ENDPOINT`]: the `DefaultDeny` entry, present iff some rule selects the
//!   endpoint in this direction. It is an ancestor of every peer key, so any lookup for a selected
//!   endpoint that matches nothing longer returns it.
//! - prefix [`PolicyKey::PREFIX_PEER`]: a peer identity (or `ANY`), all protocols and ports;
//! - prefix [`PolicyKey::PREFIX_PROTOCOL`]: a peer and protocol, all ports;
//! - prefix `PREFIX_PROTOCOL + bits`: a peer, protocol and an aligned block of 2^(16 - bits) ports.
//!   Port ranges are split into such blocks ([`PortBlocks`]).
//!
//! Longest-prefix match returns the most specific entry, but deny must beat allow whatever their
//! specificity. Prefixes are nested or disjoint, so userspace enforces it by dropping every allow that
//! has an explicit deny among its ancestors (for the same peer key): the lookup then falls through to
//! that deny. Deny-over-allow across the three lookups is step 5's job. Keys for the same entry from
//! two rules merge: deny over allow, then the lowest rule id.
//!
//! CIDR peers never reach `POLICY`: every CIDR a rule mentions (including `except` CIDRs) gets an
//! ipcache entry with its own CIDR identity, so step 3 turns an address into the identity of the most
//! specific policy CIDR that holds it. A CIDR rule `C except E…` selects the CIDR identities of the
//! policy CIDRs inside `C` and not inside any `E`, plus the family's world identity if `C` is `/0`.
//! Workload, host and node addresses are exact entries with their own identities, so CIDR rules never
//! select them (as in Cilium). The `world` entity, which includes every CIDR, is one entry with peer
//! [`identity::WORLD`], reached by the `world` lookup, rather than one entry per CIDR identity. A
//! CIDR rule, `/0` included, costs one entry per CIDR identity inside it (per port block and endpoint
//! identity): `0.0.0.0/0` therefore costs as many as the IPv4 policy CIDRs; prefer `entity: world`
//! where both families and no `except` are meant.

use core::net::{Ipv4Addr, Ipv6Addr};

/// Capacity of the policy maps, in one place. `*_MAP_ENTRIES` are the `max_entries` to create the
/// maps with: twice the logical limit, because a swap holds two epochs. When a limit is reached the
/// agent refuses the new rule set and keeps the old one (it never writes a partial one); raise the
/// limit, or reduce CIDR rules (each distinct CIDR is an ipcache entry) and wide port ranges (a range
/// costs up to 30 entries per peer).
pub mod limits {
    /// Epochs held at once during a swap.
    pub const EPOCHS: u32 = 2;
    /// ipcache prefixes per address family (workload and host addresses, policy CIDRs, `/0`).
    pub const MAX_IPCACHE_ENTRIES: u32 = 262_144;
    /// Local endpoint addresses per address family.
    pub const MAX_ENDPOINTS: u32 = 4096;
    /// `POLICY` entries: (endpoint identity, direction) roots plus (peer, protocol, port block) entries.
    pub const MAX_POLICY_ENTRIES: u32 = 1_048_576;

    pub const IPCACHE_MAP_ENTRIES: u32 = EPOCHS * MAX_IPCACHE_ENTRIES;
    pub const ENDPOINT_MAP_ENTRIES: u32 = EPOCHS * MAX_ENDPOINTS;
    pub const POLICY_MAP_ENTRIES: u32 = EPOCHS * MAX_POLICY_ENTRIES;
    /// Bytes of the `POLICY_EVENTS` ring buffer (a power of two, a multiple of the page size).
    pub const EVENT_RING_BYTES: u32 = 1 << 20;
}

/// Numeric identities. Reserved ones follow Cilium's numbering so operators can read them alike.
pub mod identity {
    /// Wildcard peer in `POLICY` keys ("any peer"); never assigned, never in the ipcache.
    pub const ANY: u32 = 0;
    /// The node itself (its own addresses).
    pub const HOST: u32 = 1;
    /// Outside the cluster: the ipcache-miss identity, and the peer of `world` entries, which the
    /// datapath's `world` lookup reaches for every peer outside the cluster (see [`world_class`]).
    pub const WORLD: u32 = 2;
    /// Workloads the agent knows but does not manage.
    pub const UNMANAGED: u32 = 3;
    /// Local endpoints whose labels are not resolved yet: always in default deny.
    pub const INIT: u32 = 5;
    /// World, IPv4 (`0.0.0.0/0` in the ipcache), so a `0.0.0.0/0` rule does not open IPv6.
    pub const WORLD_IPV4: u32 = 9;
    /// World, IPv6 (`::/0` in the ipcache).
    pub const WORLD_IPV6: u32 = 10;
    /// Identities `0..=RESERVED_MAX` are reserved.
    pub const RESERVED_MAX: u32 = 255;
    /// Label-set (workload) identities: `WORKLOAD_MIN..=WORKLOAD_MAX` (24 bits, fits a VXLAN VNI).
    pub const WORKLOAD_MIN: u32 = 256;
    pub const WORKLOAD_MAX: u32 = 0x00FF_FFFF;
    /// Node-local CIDR identities: bit 24 set, as Cilium's local scope.
    pub const CIDR_MIN: u32 = 0x0100_0000;
    pub const CIDR_MAX: u32 = 0x01FF_FFFF;

    pub const fn is_reserved(id: u32) -> bool {
        id <= RESERVED_MAX
    }

    pub const fn is_cidr(id: u32) -> bool {
        id >= CIDR_MIN && id <= CIDR_MAX
    }

    /// The peer of the `world` lookup (step 4): [`WORLD`] for every address outside the cluster,
    /// `None` for workloads, the host and the other reserved identities.
    pub const fn world_class(peer: u32) -> Option<u32> {
        if peer == WORLD || peer == WORLD_IPV4 || peer == WORLD_IPV6 || is_cidr(peer) {
            Some(WORLD)
        } else {
            None
        }
    }

    /// Name of a reserved identity, for logs and the CLI.
    pub const fn reserved_name(id: u32) -> Option<&'static str> {
        match id {
            ANY => Some("any"),
            HOST => Some("host"),
            WORLD => Some("world"),
            UNMANAGED => Some("unmanaged"),
            INIT => Some("init"),
            WORLD_IPV4 => Some("world-ipv4"),
            WORLD_IPV6 => Some("world-ipv6"),
            _ => None,
        }
    }
}

/// Flags of [`EndpointInfo::flags`].
pub mod endpoint_flags {
    /// Audit mode: would-be denials are passed and reported as [`super::Verdict::Audit`]. Set for
    /// endpoints in audit mode and for all endpoints when audit is global.
    pub const AUDIT: u32 = 1 << 0;
}

/// Direction of a check, seen from the local endpoint.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Towards the local endpoint; the peer is the source.
    Ingress = 0,
    /// From the local endpoint; the peer is the destination.
    Egress = 1,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    pub const fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// The (prefix length, key) pair of an LPM trie entry or lookup. On the wire it is
/// `lpm_trie::Key::new(prefix_len, data)` of aya (userspace) or aya-ebpf (datapath).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lpm<K> {
    pub prefix_len: u32,
    pub data: K,
}

/// Key of the IPv4 ipcache (LPM, prefix `EPOCH_BITS + address prefix`) and of `ENDPOINTS_V4` (hash,
/// exact address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpKeyV4 {
    pub epoch: u8,
    pub _pad: [u8; 3],
    /// Network byte order.
    pub addr: u32,
}

impl IpKeyV4 {
    /// Bits before the address: the epoch byte and its padding, always matched.
    pub const EPOCH_BITS: u32 = 32;
    pub const FULL_PREFIX: u32 = Self::EPOCH_BITS + 32;
    pub const SIZE: usize = 8;

    /// The endpoint key of an address.
    pub fn exact(epoch: u8, addr: Ipv4Addr) -> Self {
        Self::from_be(epoch, u32::from_ne_bytes(addr.octets()))
    }

    /// From an address as read from a packet (network byte order).
    pub const fn from_be(epoch: u8, addr: u32) -> Self {
        Self {
            epoch,
            _pad: [0; 3],
            addr,
        }
    }

    /// An ipcache entry for `addr/len` (host bits cleared; `len` at most 32).
    pub fn prefix(epoch: u8, addr: Ipv4Addr, len: u8) -> Lpm<Self> {
        let len = len.min(32);
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        let masked = Ipv4Addr::from(u32::from(addr) & mask);
        Lpm {
            prefix_len: Self::EPOCH_BITS + len as u32,
            data: Self::exact(epoch, masked),
        }
    }

    /// The ipcache lookup for an address read from a packet.
    pub const fn lookup(epoch: u8, addr_be: u32) -> Lpm<Self> {
        Lpm {
            prefix_len: Self::FULL_PREFIX,
            data: Self::from_be(epoch, addr_be),
        }
    }

    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.addr.to_ne_bytes())
    }

    /// The key as it lies in memory, which is what the kernel's LPM trie compares.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        b[0] = self.epoch;
        b[1..4].copy_from_slice(&self._pad);
        b[4..8].copy_from_slice(&self.addr.to_ne_bytes());
        b
    }
}

/// Key of the IPv6 ipcache (LPM) and of `ENDPOINTS_V6` (hash). See [`IpKeyV4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpKeyV6 {
    pub epoch: u8,
    pub _pad: [u8; 3],
    /// Network-order bytes read as four native words (as `struct in6_addr` is read by the datapath).
    pub addr: [u32; 4],
}

impl IpKeyV6 {
    pub const EPOCH_BITS: u32 = 32;
    pub const FULL_PREFIX: u32 = Self::EPOCH_BITS + 128;
    pub const SIZE: usize = 20;

    pub fn exact(epoch: u8, addr: Ipv6Addr) -> Self {
        let o = addr.octets();
        let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        Self::from_words(epoch, [w(0), w(4), w(8), w(12)])
    }

    /// From an address as read from a packet (four words of network-order bytes).
    pub const fn from_words(epoch: u8, addr: [u32; 4]) -> Self {
        Self {
            epoch,
            _pad: [0; 3],
            addr,
        }
    }

    /// An ipcache entry for `addr/len` (host bits cleared; `len` at most 128).
    pub fn prefix(epoch: u8, addr: Ipv6Addr, len: u8) -> Lpm<Self> {
        let len = len.min(128);
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        let masked = Ipv6Addr::from(u128::from(addr) & mask);
        Lpm {
            prefix_len: Self::EPOCH_BITS + len as u32,
            data: Self::exact(epoch, masked),
        }
    }

    pub const fn lookup(epoch: u8, addr: [u32; 4]) -> Lpm<Self> {
        Lpm {
            prefix_len: Self::FULL_PREFIX,
            data: Self::from_words(epoch, addr),
        }
    }

    pub fn addr(&self) -> Ipv6Addr {
        let mut o = [0u8; 16];
        for (i, w) in self.addr.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        Ipv6Addr::from(o)
    }

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        b[0] = self.epoch;
        b[1..4].copy_from_slice(&self._pad);
        for (i, w) in self.addr.iter().enumerate() {
            b[4 + 4 * i..8 + 4 * i].copy_from_slice(&w.to_ne_bytes());
        }
        b
    }
}

/// Value of the ipcache maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpcacheEntry {
    pub identity: u32,
}

/// Value of the endpoint maps: a workload on this node whose traffic is enforced.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointInfo {
    pub identity: u32,
    /// Host-side interface of the workload; 0 while unknown.
    pub ifindex: u32,
    /// [`endpoint_flags`].
    pub flags: u32,
}

/// Key of the `POLICY` LPM trie. 16 bytes, no hidden padding; see [`PolicyKey::PREFIX_ENDPOINT`] and
/// the following constants for where prefixes end.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub epoch: u8,
    /// [`Direction`] as `u8`.
    pub direction: u8,
    pub _pad: u16,
    /// Identity of the local endpoint.
    pub endpoint_identity: u32,
    /// Identity of the peer, or [`identity::ANY`].
    pub peer_identity: u32,
    pub protocol: u8,
    pub _pad2: u8,
    /// Destination port, network byte order.
    pub dport: u16,
}

impl PolicyKey {
    pub const SIZE: usize = 16;
    /// Epoch, direction, endpoint identity: the "selected in this direction" root.
    pub const PREFIX_ENDPOINT: u32 = 64;
    /// ... and peer identity: all protocols and ports.
    pub const PREFIX_PEER: u32 = 96;
    /// ... and protocol (with its padding byte): all ports of that protocol.
    pub const PREFIX_PROTOCOL: u32 = 112;
    /// ... and the whole port: what lookups use.
    pub const FULL_PREFIX: u32 = 128;

    const fn key(
        epoch: u8,
        dir: Direction,
        endpoint: u32,
        peer: u32,
        proto: u8,
        dport: u16,
    ) -> Self {
        Self {
            epoch,
            direction: dir as u8,
            _pad: 0,
            endpoint_identity: endpoint,
            peer_identity: peer,
            protocol: proto,
            _pad2: 0,
            dport,
        }
    }

    /// The root entry of an endpoint identity selected in `dir`.
    pub const fn endpoint_root(epoch: u8, dir: Direction, endpoint: u32) -> Lpm<Self> {
        Lpm {
            prefix_len: Self::PREFIX_ENDPOINT,
            data: Self::key(epoch, dir, endpoint, 0, 0, 0),
        }
    }

    /// A peer on all protocols and ports.
    pub const fn peer(epoch: u8, dir: Direction, endpoint: u32, peer: u32) -> Lpm<Self> {
        Lpm {
            prefix_len: Self::PREFIX_PEER,
            data: Self::key(epoch, dir, endpoint, peer, 0, 0),
        }
    }

    /// A peer on one protocol and one aligned port block (`PortBlock::ALL` for every port).
    pub const fn ports(
        epoch: u8,
        dir: Direction,
        endpoint: u32,
        peer: u32,
        protocol: u8,
        block: PortBlock,
    ) -> Lpm<Self> {
        Lpm {
            prefix_len: Self::PREFIX_PROTOCOL + block.prefix_bits as u32,
            data: Self::key(epoch, dir, endpoint, peer, protocol, block.start.to_be()),
        }
    }

    /// The lookup for one packet; `dport_be` as read from the packet (0 for protocols without ports).
    pub const fn lookup(
        epoch: u8,
        dir: Direction,
        endpoint: u32,
        peer: u32,
        protocol: u8,
        dport_be: u16,
    ) -> Lpm<Self> {
        Lpm {
            prefix_len: Self::FULL_PREFIX,
            data: Self::key(epoch, dir, endpoint, peer, protocol, dport_be),
        }
    }

    pub fn dport_host(&self) -> u16 {
        u16::from_be(self.dport)
    }

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0; Self::SIZE];
        b[0] = self.epoch;
        b[1] = self.direction;
        b[2..4].copy_from_slice(&self._pad.to_ne_bytes());
        b[4..8].copy_from_slice(&self.endpoint_identity.to_ne_bytes());
        b[8..12].copy_from_slice(&self.peer_identity.to_ne_bytes());
        b[12] = self.protocol;
        b[13] = self._pad2;
        b[14..16].copy_from_slice(&self.dport.to_ne_bytes());
        b
    }
}

/// What a `POLICY` entry says. Stored as `u8`; an unknown value is read as [`EntryKind::Deny`] so a
/// corrupt entry fails closed.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EntryKind {
    Allow = 1,
    Deny = 2,
    /// The endpoint is selected in this direction; nothing more specific matched.
    DefaultDeny = 3,
}

impl EntryKind {
    pub const fn from_u8(v: u8) -> Self {
        match v {
            1 => EntryKind::Allow,
            3 => EntryKind::DefaultDeny,
            _ => EntryKind::Deny,
        }
    }
}

/// Value of the `POLICY` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntry {
    /// [`EntryKind`] as `u8`.
    pub kind: u8,
    pub _pad: [u8; 3],
    /// The rule reported in verdicts (1-based index into the agent's rule table of this epoch; 0 for
    /// built-in entries such as the default deny of `init` endpoints).
    pub rule_id: u32,
}

impl PolicyEntry {
    pub const fn new(kind: EntryKind, rule_id: u32) -> Self {
        Self {
            kind: kind as u8,
            _pad: [0; 3],
            rule_id,
        }
    }

    pub const fn kind(&self) -> EntryKind {
        EntryKind::from_u8(self.kind)
    }
}

/// Value of `POLICY_STATE[0]`: which epoch is live.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// 0 or 1; keys use it as their `epoch` byte.
    pub epoch: u32,
}

/// An aligned block of 2^(16 - `prefix_bits`) ports starting at `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortBlock {
    pub start: u16,
    pub prefix_bits: u8,
}

impl PortBlock {
    pub const ALL: PortBlock = PortBlock {
        start: 0,
        prefix_bits: 0,
    };

    /// The last port of the block.
    pub const fn last(&self) -> u16 {
        (self.start as u32 + (1u32 << (16 - self.prefix_bits as u32)) - 1) as u16
    }
}

/// Splits the inclusive port range `first..=last` into the fewest aligned [`PortBlock`]s (at most 30
/// for a 16-bit range), lowest first.
#[derive(Clone, Debug)]
pub struct PortBlocks {
    next: u32,
    last: u32,
}

impl PortBlocks {
    pub const fn new(first: u16, last: u16) -> Self {
        Self {
            next: first as u32,
            last: last as u32,
        }
    }
}

impl Iterator for PortBlocks {
    type Item = PortBlock;

    fn next(&mut self) -> Option<PortBlock> {
        if self.next > self.last {
            return None;
        }
        // The largest block aligned at `next` that does not pass `last`.
        let mut size_bits = if self.next == 0 {
            16
        } else {
            self.next.trailing_zeros().min(16)
        };
        while self.next + (1 << size_bits) - 1 > self.last {
            size_bits -= 1;
        }
        let block = PortBlock {
            start: self.next as u16,
            prefix_bits: (16 - size_bits) as u8,
        };
        self.next += 1 << size_bits;
        Some(block)
    }
}

/// Outcome of a check.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow = 0,
    Deny = 1,
    /// Would have been denied; passed because the endpoint (or the node) is in audit mode.
    Audit = 2,
}

impl Verdict {
    pub const ALL: [Verdict; 3] = [Verdict::Allow, Verdict::Deny, Verdict::Audit];

    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Audit => "audit",
        }
    }

    /// Whether the packet goes on.
    pub const fn passes(self) -> bool {
        !matches!(self, Verdict::Deny)
    }
}

/// Why a check ended as it did. Keep in sync with [`Reason::ALL`]. The first five come from the
/// lookup order above; the others are the datapath's own (connection tracking, fragments and packets
/// it refuses to interpret), described in `lb-ebpf/src/policy`.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The enforced address is not a local endpoint: no policy applies here.
    NoLocalEndpoint = 0,
    /// No rule selects the endpoint in this direction: open.
    NotSelected = 1,
    /// An allow rule matched.
    AllowedByRule = 2,
    /// A deny rule matched (deny wins over allow).
    DeniedByRule = 3,
    /// The endpoint is selected in this direction and no rule allowed the packet.
    DefaultDeny = 4,
    /// A reply (or related ICMP error) of a connection allowed earlier: policy conntrack.
    Established = 5,
    /// ARP and IPv6 neighbour discovery / MLD: link control traffic, always passed.
    Control = 6,
    /// A fragment after the first: passed if its first fragment passed this check, else dropped.
    Fragment = 7,
    /// Truncated or inconsistent headers, or an IPv6 extension header chain that does not end in an
    /// upper-layer header within the walk: never interpreted, always dropped.
    Malformed = 8,
    /// IPv4 source route option or IPv6 routing header with segments left: the destination in the
    /// header is not the final one, so no check on it is meaningful; dropped.
    SourceRoute = 9,
    /// A VLAN-tagged frame on a workload interface (which carries none); dropped.
    VlanTagged = 10,
    /// Neither IPv4, IPv6 nor ARP; dropped.
    UnknownL3 = 11,
    /// Leaving a workload with a source address that is not one of its own; dropped.
    Spoofed = 12,
    /// The source is in the XDP CIDR deny list; dropped before an skb exists.
    CidrDeny = 13,
}

impl Reason {
    pub const ALL: [Reason; 14] = [
        Reason::NoLocalEndpoint,
        Reason::NotSelected,
        Reason::AllowedByRule,
        Reason::DeniedByRule,
        Reason::DefaultDeny,
        Reason::Established,
        Reason::Control,
        Reason::Fragment,
        Reason::Malformed,
        Reason::SourceRoute,
        Reason::VlanTagged,
        Reason::UnknownL3,
        Reason::Spoofed,
        Reason::CidrDeny,
    ];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            Reason::NoLocalEndpoint => "no_local_endpoint",
            Reason::NotSelected => "not_selected",
            Reason::AllowedByRule => "allowed_by_rule",
            Reason::DeniedByRule => "denied_by_rule",
            Reason::DefaultDeny => "default_deny",
            Reason::Established => "established",
            Reason::Control => "control",
            Reason::Fragment => "fragment",
            Reason::Malformed => "malformed",
            Reason::SourceRoute => "source_route",
            Reason::VlanTagged => "vlan_tagged",
            Reason::UnknownL3 => "unknown_l3",
            Reason::Spoofed => "spoofed",
            Reason::CidrDeny => "cidr_deny",
        }
    }

    pub const fn from_u8(v: u8) -> Option<Self> {
        if (v as usize) < Self::ALL.len() {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }
}

/// Slots of a per-CPU verdict counter array: one per (verdict, reason).
pub const COUNTER_SLOTS: u32 = Verdict::ALL.len() as u32 * Reason::COUNT;

/// Slot of `POLICY_COUNTERS` counting verdict events lost because the ring buffer was full.
pub const EVENTS_LOST_SLOT: u32 = COUNTER_SLOTS;
/// Entries of the `POLICY_COUNTERS` per-CPU array: the (verdict, reason) slots, then events lost.
pub const COUNTER_ARRAY_LEN: u32 = COUNTER_SLOTS + 1;

/// The counter slot of a (verdict, reason) pair.
pub const fn counter_index(verdict: Verdict, reason: Reason) -> u32 {
    verdict as u32 * Reason::COUNT + reason as u32
}

/// The result of one direction's check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub reason: Reason,
    /// The rule that decided (0: none, or a built-in entry).
    pub rule_id: u32,
}

/// Step 5 of the lookup order: combines the `POLICY` lookups `[exact, world, any]` with the
/// endpoint's flags. Deny beats allow beats default deny; among equals the first lookup is reported.
pub fn decide(lookups: [Option<&PolicyEntry>; 3], endpoint_flags: u32) -> Decision {
    let pick = |kind: EntryKind| {
        let mut i = 0;
        while i < lookups.len() {
            if let Some(e) = lookups[i] {
                if e.kind() == kind {
                    return Some(e.rule_id);
                }
            }
            i += 1;
        }
        None
    };
    let (reason, rule_id) = if let Some(rule) = pick(EntryKind::Deny) {
        (Reason::DeniedByRule, rule)
    } else if let Some(rule) = pick(EntryKind::Allow) {
        (Reason::AllowedByRule, rule)
    } else if let Some(rule) = pick(EntryKind::DefaultDeny) {
        (Reason::DefaultDeny, rule)
    } else {
        (Reason::NotSelected, 0)
    };
    with_endpoint_flags(reason, rule_id, endpoint_flags)
}

/// The decision of a rule outcome (`reason`, `rule_id`, as [`decide`] finds them) for an endpoint
/// with `endpoint_flags`: a would-be deny of an audited endpoint is an audit. Also applied to
/// decisions taken from `POLICY_DECISIONS`, which are cached without the flags.
pub const fn with_endpoint_flags(reason: Reason, rule_id: u32, endpoint_flags: u32) -> Decision {
    let denied = matches!(reason, Reason::DeniedByRule | Reason::DefaultDeny);
    let verdict = match (denied, endpoint_flags & endpoint_flags::AUDIT != 0) {
        (false, _) => Verdict::Allow,
        (true, false) => Verdict::Deny,
        (true, true) => Verdict::Audit,
    };
    Decision {
        verdict,
        reason,
        rule_id,
    }
}

/// Key of the `POLICY_DECISIONS` LRU map: everything steps 4–5 depend on except the endpoint's
/// flags. The datapath caches each outcome of the three `POLICY` lookups under it, so the steady
/// state of a (peer, port) pair costs one hash lookup instead of three trie walks whose depth grows
/// with the rules. Entries carry the epoch they were decided under; the agent deletes a epoch's
/// entries before making that epoch live again (see the writer), so a hit is always the decision
/// of the rule set live under its epoch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DecisionKey {
    pub epoch: u8,
    /// [`Direction`] as `u8`.
    pub direction: u8,
    pub protocol: u8,
    pub _pad: u8,
    pub endpoint_identity: u32,
    pub peer_identity: u32,
    /// Network byte order; 0 for protocols without ports.
    pub dport: u16,
    pub _pad2: u16,
}

/// Value of `POLICY_DECISIONS`: a rule outcome before the endpoint's flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedDecision {
    /// [`Reason`] as `u8`: `DeniedByRule`, `AllowedByRule`, `DefaultDeny` or `NotSelected`.
    pub reason: u8,
    pub _pad: [u8; 3],
    pub rule_id: u32,
}

/// A verdict report sent to userspace through `POLICY_EVENTS` (denials and audits; allows when
/// sampled). Addresses and ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictEvent {
    /// `bpf_ktime_get_ns` (monotonic, since boot) when the packet was checked.
    pub timestamp_ns: u64,
    /// IPv4 in the first word, the rest zero.
    pub src_addr: [u32; 4],
    pub dst_addr: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    /// 4 or 6.
    pub family: u8,
    pub protocol: u8,
    /// [`Direction`] as `u8`.
    pub direction: u8,
    /// [`Verdict`] as `u8`.
    pub verdict: u8,
    /// [`Reason`] as `u8`.
    pub reason: u8,
    /// Epoch of the rule set that decided: `rule_id` indexes that epoch's rule table.
    pub epoch: u8,
    pub _pad: u16,
    pub endpoint_identity: u32,
    pub peer_identity: u32,
    pub rule_id: u32,
}

/// Value of the `POLICY_CONNTRACK` LRU map, keyed by a connection's first packet as its originator
/// sent it (`conntrack::FlowKey`). Forward packets are checked against the rules every time; the
/// entry only lets replies through, and only at the checks its flags name.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyConntrackEntry {
    /// [`conntrack_flags`]: which checks passed the connection's forward packets.
    pub flags: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the last forward packet or reply.
    pub last_seen_ns: u64,
}

/// Flags of [`PolicyConntrackEntry::flags`] and [`PolicyFragmentEntry::flags`].
pub mod conntrack_flags {
    /// The originator's egress check passed it: replies may enter the originator.
    pub const EGRESS_PASSED: u32 = 1 << 0;
    /// The responder's ingress check passed it: replies may leave the responder.
    pub const INGRESS_PASSED: u32 = 1 << 1;

    /// The flag a check of `dir` sets when it passes a packet.
    pub const fn passed(dir: super::Direction) -> u32 {
        match dir {
            super::Direction::Egress => EGRESS_PASSED,
            super::Direction::Ingress => INGRESS_PASSED,
        }
    }

    /// The flag a reply needs at a check of `dir`: the opposite check passed the connection.
    pub const fn reply_needs(dir: super::Direction) -> u32 {
        match dir {
            super::Direction::Egress => INGRESS_PASSED,
            super::Direction::Ingress => EGRESS_PASSED,
        }
    }
}

/// Sizes and lifetimes of the policy datapath's own state.
pub mod state_limits {
    /// Default entries of `POLICY_CONNTRACK` (LRU; configurable at load time).
    pub const CONNTRACK_ENTRIES: u32 = 65_536;
    /// Entries of `POLICY_FRAGMENTS` (LRU): datagrams in flight whose first fragment passed.
    pub const FRAGMENT_ENTRIES: u32 = 8192;
    /// Default entries of `POLICY_DECISIONS` (LRU): (endpoint, peer identity, port) outcomes kept.
    pub const DECISION_ENTRIES: u32 = 65_536;
    /// Entries of each XDP CIDR deny trie.
    pub const CIDR_DENY_ENTRIES: u32 = 65_536;
}

/// Value of the `POLICY_FRAGMENTS` LRU map, keyed by `fragments::FragmentKey`: which checks passed
/// the datagram's first fragment.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyFragmentEntry {
    /// [`conntrack_flags`].
    pub flags: u32,
    pub _pad: u32,
    pub first_seen_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, made of integers, with explicit padding fields.
    unsafe impl aya::Pod for IpKeyV4 {}
    unsafe impl aya::Pod for IpKeyV6 {}
    unsafe impl aya::Pod for IpcacheEntry {}
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyEntry {}
    unsafe impl aya::Pod for PolicyState {}
    unsafe impl aya::Pod for VerdictEvent {}
    unsafe impl aya::Pod for PolicyConntrackEntry {}
    unsafe impl aya::Pod for PolicyFragmentEntry {}
    unsafe impl aya::Pod for DecisionKey {}
    unsafe impl aya::Pod for CachedDecision {}
}

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<IpKeyV4>(), IpKeyV4::SIZE);
        assert_eq!(size_of::<IpKeyV6>(), IpKeyV6::SIZE);
        assert_eq!(size_of::<PolicyKey>(), PolicyKey::SIZE);
        assert_eq!(size_of::<IpcacheEntry>(), 4);
        assert_eq!(size_of::<EndpointInfo>(), 12);
        assert_eq!(size_of::<PolicyEntry>(), 8);
        assert_eq!(size_of::<PolicyState>(), 4);
        assert_eq!(size_of::<VerdictEvent>(), 64);
        assert_eq!(size_of::<PolicyConntrackEntry>(), 16);
        assert_eq!(size_of::<PolicyFragmentEntry>(), 16);
        assert_eq!(size_of::<DecisionKey>(), 16);
        assert_eq!(size_of::<CachedDecision>(), 8);
        // The kernel's LPM key is a u32 prefix length then the data: data must be 4-aligned so the
        // packed key and a repr(C) pair agree.
        assert_eq!(core::mem::align_of::<IpKeyV4>(), 4);
        assert_eq!(core::mem::align_of::<IpKeyV6>(), 4);
        assert_eq!(core::mem::align_of::<PolicyKey>(), 4);
    }

    #[test]
    fn to_bytes_follows_the_memory_layout() {
        // The prefix constants and the userspace LPM emulation rely on these offsets.
        assert_eq!(offset_of!(IpKeyV4, addr), 4);
        assert_eq!(offset_of!(IpKeyV6, addr), 4);
        assert_eq!(offset_of!(PolicyKey, direction), 1);
        assert_eq!(offset_of!(PolicyKey, endpoint_identity), 4);
        assert_eq!(offset_of!(PolicyKey, peer_identity), 8);
        assert_eq!(offset_of!(PolicyKey, protocol), 12);
        assert_eq!(offset_of!(PolicyKey, dport), 14);
        assert_eq!(PolicyKey::PREFIX_ENDPOINT, 8 * 8);
        assert_eq!(PolicyKey::PREFIX_PEER, 8 * 12);
        assert_eq!(PolicyKey::PREFIX_PROTOCOL, 8 * 14);
        assert_eq!(PolicyKey::FULL_PREFIX as usize, 8 * PolicyKey::SIZE);
        assert_eq!(IpKeyV4::FULL_PREFIX as usize, 8 * IpKeyV4::SIZE);
        assert_eq!(IpKeyV6::FULL_PREFIX as usize, 8 * IpKeyV6::SIZE);

        let key = PolicyKey::lookup(
            1,
            Direction::Egress,
            0x0102_0304,
            0x0A0B_0C0D,
            6,
            8080u16.to_be(),
        );
        let b = key.data.to_bytes();
        assert_eq!(&b[..4], &[1, 1, 0, 0]);
        assert_eq!(b[4..8], 0x0102_0304u32.to_ne_bytes());
        assert_eq!(b[8..12], 0x0A0B_0C0Du32.to_ne_bytes());
        assert_eq!(&b[12..], &[6, 0, 0x1f, 0x90], "port in wire order");
    }

    #[test]
    fn addresses_are_network_order_and_masked() {
        let key = IpKeyV4::prefix(0, Ipv4Addr::new(172, 17, 1, 9), 24);
        assert_eq!(key.prefix_len, 32 + 24);
        assert_eq!(key.data.addr.to_ne_bytes(), [172, 17, 1, 0]);
        assert_eq!(key.data.addr(), Ipv4Addr::new(172, 17, 1, 0));
        assert_eq!(
            IpKeyV4::prefix(0, Ipv4Addr::new(1, 2, 3, 4), 0).data.addr,
            0
        );

        let v6: Ipv6Addr = "2001:db8:1:2::7".parse().unwrap();
        let key = IpKeyV6::prefix(1, v6, 48);
        assert_eq!(key.prefix_len, 32 + 48);
        assert_eq!(key.data.addr(), "2001:db8:1::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(&key.data.to_bytes()[4..8], &[0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(IpKeyV6::exact(0, v6).addr(), v6);
    }

    #[test]
    fn port_ranges_split_into_aligned_blocks() {
        let blocks = |a, b| PortBlocks::new(a, b).map(|p| (p.start, p.prefix_bits));
        assert!(blocks(80, 80).eq([(80, 16)]));
        assert!(blocks(0, 65535).eq([(0, 0)]));
        assert!(blocks(1, 65535).count() == 16);
        assert!(blocks(1, 65534).count() == 30);
        // The Kubernetes documentation's endPort example: 32000..=32768 is three blocks.
        assert!(blocks(32000, 32768).eq([(32000, 8), (32256, 7), (32768, 16)]));
        // Every range: blocks are aligned, disjoint, contiguous and cover exactly the range.
        for (first, last) in [
            (0, 0),
            (1, 2),
            (3, 17),
            (1000, 1999),
            (32000, 32768),
            (65535, 65535),
            (5, 65535),
        ] {
            let mut expect = first as u32;
            for b in PortBlocks::new(first, last) {
                let size = 1u32 << (16 - b.prefix_bits);
                assert_eq!(b.start as u32, expect, "{first}..={last}");
                assert_eq!(b.start as u32 % size, 0, "aligned");
                assert_eq!(b.last() as u32, b.start as u32 + size - 1);
                expect += size;
            }
            assert_eq!(expect, last as u32 + 1, "{first}..={last}");
        }
    }

    #[test]
    fn deny_beats_allow_beats_default_deny() {
        let allow = PolicyEntry::new(EntryKind::Allow, 7);
        let deny = PolicyEntry::new(EntryKind::Deny, 9);
        let root = PolicyEntry::new(EntryKind::DefaultDeny, 1);
        let d = |lookups, f| {
            let d = decide(lookups, f);
            (d.verdict, d.reason, d.rule_id)
        };
        let allowed = |rule| (Verdict::Allow, Reason::AllowedByRule, rule);
        let denied = |rule| (Verdict::Deny, Reason::DeniedByRule, rule);
        assert_eq!(
            d([None, None, None], 0),
            (Verdict::Allow, Reason::NotSelected, 0)
        );
        // A deny in any lookup beats an allow in any other.
        assert_eq!(d([Some(&allow), None, Some(&deny)], 0), denied(9));
        assert_eq!(d([Some(&allow), Some(&deny), None], 0), denied(9));
        assert_eq!(d([Some(&deny), None, Some(&allow)], 0), denied(9));
        assert_eq!(d([Some(&root), Some(&allow), Some(&root)], 0), allowed(7));
        assert_eq!(
            d([Some(&root), None, Some(&root)], 0),
            (Verdict::Deny, Reason::DefaultDeny, 1)
        );
        // The exact peer's entry is reported first.
        let other = PolicyEntry::new(EntryKind::Allow, 8);
        assert_eq!(d([Some(&other), Some(&allow), Some(&allow)], 0), allowed(8));
        let audit = endpoint_flags::AUDIT;
        assert_eq!(
            d([Some(&root), None, None], audit),
            (Verdict::Audit, Reason::DefaultDeny, 1)
        );
        assert_eq!(
            d([None, None, Some(&deny)], audit),
            (Verdict::Audit, Reason::DeniedByRule, 9)
        );
        assert_eq!(d([Some(&allow), None, None], audit), allowed(7));
        // A corrupt kind fails closed.
        let corrupt = PolicyEntry {
            kind: 0,
            _pad: [0; 3],
            rule_id: 4,
        };
        assert_eq!(d([Some(&corrupt), None, Some(&allow)], 0), denied(4));
    }

    #[test]
    fn reasons_and_counters_are_dense() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.name());
            assert_eq!(Reason::from_u8(i as u8), Some(*r));
        }
        let mut seen = [false; COUNTER_SLOTS as usize];
        for v in Verdict::ALL {
            for r in Reason::ALL {
                let i = counter_index(v, r) as usize;
                assert!(!seen[i]);
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn identity_ranges_do_not_overlap() {
        use identity::*;
        for id in [ANY, HOST, WORLD, UNMANAGED, INIT, WORLD_IPV4, WORLD_IPV6] {
            assert!(is_reserved(id) && !is_cidr(id));
            assert!(reserved_name(id).is_some());
        }
        const { assert!(RESERVED_MAX < WORKLOAD_MIN && WORKLOAD_MAX < CIDR_MIN) };
        assert!(!is_cidr(WORKLOAD_MAX) && is_cidr(CIDR_MIN) && is_cidr(CIDR_MAX));
        for id in [WORLD, WORLD_IPV4, WORLD_IPV6, CIDR_MIN, CIDR_MAX] {
            assert_eq!(world_class(id), Some(WORLD));
        }
        for id in [ANY, HOST, UNMANAGED, INIT, WORKLOAD_MIN, WORKLOAD_MAX] {
            assert_eq!(world_class(id), None);
        }
    }
}
