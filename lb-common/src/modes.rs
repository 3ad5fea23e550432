//! Forwarding modes other than DNAT: the per-service parameters they need (`SERVICE_MODES`), the
//! SNAT source-port choice, the outer flow label of IPv6 encapsulation, and the endpoints the backend
//! side's decapsulation program accepts (`DECAP_ENDPOINTS`).
//!
//! | mode | to the backend | replies |
//! |---|---|---|
//! | DNAT | destination → backend; `XDP_PASS`, the kernel routes | source → VIP, by the node |
//! | SNAT | destination → backend, source → node address and an allocated port; next hop by `bpf_fib_lookup`, `XDP_TX`/redirect | back to client:port and VIP:port, by the node |
//! | DSR L2 | only the MACs: backend's and the egress interface's; IP packet unchanged | by the backend, directly (VIP on its loopback) |
//! | DSR IPIP | an outer IPv4 (IP-in-IP) or IPv6 (IPv6-in-IPv6) header, node → backend | by the backend, directly, after `lb_decap` removed the outer header |

use crate::{conntrack::FlowKey, flow_hash::flow_hash, service::Addr};

/// Value of the `SERVICE_MODES` array, indexed by service id. Read only for SNAT and DSR-IPIP
/// services; all zero for the others.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModeInfo {
    /// SNAT: the source address of packets sent to backends. DSR-IPIP: the outer source address.
    /// All zero = not configured: the service's packets are dropped and counted.
    pub source: Addr,
    /// SNAT: first source port of the range, host byte order.
    pub port_first: u16,
    pub _pad: u16,
    /// SNAT: ports in the range, at least 1.
    pub port_count: u32,
}

impl ModeInfo {
    pub fn has_source(&self) -> bool {
        self.source.0 != [0; 4]
    }
}

/// SNAT source ports.
pub mod snat {
    use super::*;

    /// Candidate ports tried for a new flow before it is dropped as `drop_snat_ports_exhausted`.
    /// Only taken candidates cost an attempt (a map insert that fails), so a busy range pays for
    /// them, not the common case: with a quarter of the range in use, all 8 are taken for about
    /// 1 in 65,000 new flows (0.25^8), all 4 for 1 in 256.
    pub const ALLOCATION_ATTEMPTS: u32 = 8;
    /// Default port range: below Linux's default ephemeral range (32768–60999), so that the node's
    /// own connections from the same address do not collide with translated flows.
    pub const DEFAULT_PORT_FIRST: u16 = 1024;
    pub const DEFAULT_PORT_LAST: u16 = 32767;
    const SEED: u32 = 0x5eed_5a47;

    /// Hash of the client → VIP flow that the candidates derive from. The first candidate is a pure
    /// function of the flow, so a flow whose conntrack entry was evicted gets its old port back if
    /// that port's reply entry still names it.
    #[inline(always)]
    pub fn port_hash(flow: &FlowKey) -> u32 {
        flow_hash(flow, SEED)
    }

    /// The `attempt`-th candidate port (host byte order) in `first .. first + count`. Double
    /// hashing: each flow walks the range with a stride of its own (odd, from the hash's high
    /// bits). With one stride for every flow, flows whose first candidates are taken would pile
    /// onto the same next ones, as in linear probing (about 3.4x the failed allocations at a
    /// quarter of the range in use).
    #[inline(always)]
    pub fn candidate_port(hash: u32, first: u16, count: u32, attempt: u32) -> u16 {
        if count == 0 {
            return first;
        }
        let stride = (hash >> 16 | 1) as u64;
        let offset = (hash as u64 + attempt as u64 * stride) % count as u64;
        first.wrapping_add(offset as u16)
    }
}

/// IP-in-IP encapsulation.
pub mod encap {
    use super::*;

    /// IP protocol numbers of the inner packet, as the outer header names them.
    pub const IPPROTO_IPIP: u8 = 4;
    pub const IPPROTO_IPV6: u8 = 41;
    /// TTL / hop limit of the outer header.
    pub const OUTER_TTL: u8 = 64;
    pub const IPV4_OUTER_LEN: usize = 20;
    pub const IPV6_OUTER_LEN: usize = 40;
    const SEED: u32 = 0x1abe_1f10;

    /// The 20-bit flow label of an outer IPv6 header: a hash of the inner flow, so that ECMP routers
    /// and the backend's RSS spread flows although every outer header has the same addresses.
    #[inline(always)]
    pub fn flow_label(flow: &FlowKey) -> u32 {
        flow_hash(flow, SEED) & 0x000f_ffff
    }
}

/// The decapsulation program on backends (`lb_decap`).
pub mod decap {
    use super::*;

    /// Entries of `DECAP_ENDPOINTS`.
    pub const MAX_ENDPOINTS: u32 = 256;

    /// What an endpoint entry allows.
    pub mod role {
        /// An outer source address that may send encapsulated packets (a balancer).
        pub const BALANCER: u8 = 1;
        /// An outer destination address to decapsulate for (this backend).
        pub const LOCAL: u8 = 2;
    }

    /// Key of the `DECAP_ENDPOINTS` hash map (value: `u8`, 1). The all-zero address of a family and
    /// role is the wildcard: any address of that family is accepted in that role.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct EndpointKey {
        pub addr: Addr,
        pub family: u8,
        pub role: u8,
        pub _pad: [u8; 2],
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: #[repr(C)], Copy, integers only, explicit padding.
    unsafe impl aya::Pod for ModeInfo {}
    unsafe impl aya::Pod for decap::EndpointKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<ModeInfo>(), 24);
        assert_eq!(core::mem::size_of::<decap::EndpointKey>(), 20);
    }

    #[test]
    fn candidates_stay_in_range_and_differ() {
        let flow = FlowKey {
            src: Addr::from_v4_word(0x0200_00c0),
            dst: Addr::from_v4_word(0x0a64_33c6),
            src_port: 40000u16.to_be(),
            dst_port: 80u16.to_be(),
            protocol: 6,
            family: 4,
            _pad: [0; 2],
        };
        let hash = snat::port_hash(&flow);
        let ports: [u16; snat::ALLOCATION_ATTEMPTS as usize] =
            core::array::from_fn(|i| snat::candidate_port(hash, 1024, 32767 - 1024 + 1, i as u32));
        for (i, p) in ports.iter().enumerate() {
            assert!((1024..=32767).contains(p), "{p}");
            for q in &ports[..i] {
                assert_ne!(p, q, "attempts give distinct ports: {ports:?}");
            }
        }
        // A one-port range always yields that port; the full range reaches 65535.
        assert_eq!(snat::candidate_port(hash, 5000, 1, 3), 5000);
        assert!(snat::candidate_port(u32::MAX, 1, 65535, 0) >= 1);
        assert!(encap::flow_label(&flow) <= 0xfffff);
    }

    /// Allocation as the datapath does it (first free candidate) for 16,000 flows of 4 clients
    /// with consecutive source ports into a 64,512-port range (a quarter used at the end): at
    /// most 1 fails (about 41 with one stride for every flow and 4 attempts).
    #[test]
    fn a_quarter_full_range_still_allocates() {
        let (first, count) = (1024u16, 64512u32);
        let mut taken = [0u64; 1024];
        let mut failed = 0;
        for client in 0..4u32 {
            for port in 0..4000u32 {
                let flow = FlowKey {
                    src: Addr::from_v4_word((0x6400_00c0 + client * 0x0100_0000).to_be()),
                    dst: Addr::from_v4_word(0x3364_33c6),
                    src_port: (10000 + port as u16).to_be(),
                    dst_port: 80u16.to_be(),
                    protocol: 6,
                    family: 4,
                    _pad: [0; 2],
                };
                let hash = snat::port_hash(&flow);
                let free = (0..snat::ALLOCATION_ATTEMPTS).find_map(|attempt| {
                    let p = snat::candidate_port(hash, first, count, attempt) as usize;
                    let (word, bit) = (p / 64, 1u64 << (p % 64));
                    (taken[word] & bit == 0).then(|| taken[word] |= bit)
                });
                if free.is_none() {
                    failed += 1;
                }
            }
        }
        assert!(failed <= 1, "{failed} of 16000 allocations failed");
    }
}
