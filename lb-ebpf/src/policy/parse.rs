//! What the policy check reads from a frame at a workload's interface, and what it refuses to
//! interpret. The rule: anything this parser cannot take apart with certainty is dropped with a named
//! [`Reason`], never passed, so no header trick reaches a workload around a deny.
//!
//! - VLAN tags, in the frame or taken out by the stack (`skb->vlan_present`): dropped
//!   ([`Reason::VlanTagged`]); a workload's veth carries untagged frames only.
//! - ARP, IPv6 neighbour discovery and MLD: passed ([`Reason::Control`]); any other non-IP
//!   ethertype is dropped ([`Reason::UnknownL3`]).
//! - IPv4 options: walked (at most [`MAX_IPV4_OPTIONS`]); the L4 header follows them. Loose and
//!   strict source routes (the destination is only the next hop) are dropped
//!   ([`Reason::SourceRoute`]), options that do not parse as [`Reason::Malformed`].
//! - IPv6 extension headers: hop-by-hop, destination options, routing (no segments left, else
//!   [`Reason::SourceRoute`]), fragment and AH are walked (at most [`MAX_IPV6_EXTENSION_HEADERS`],
//!   within [`MAX_L4_OFFSET`]); a chain that does not end in an upper-layer header by then, or
//!   holds mobility, HIP or shim6 headers, is [`Reason::Malformed`]. So the protocol the rules see
//!   is always the real upper-layer one.
//! - Truncation: an IP header, or a TCP (20 bytes), UDP (8) or ICMP (8) header, that is not whole in
//!   the packet is [`Reason::Malformed`] — also in a first fragment, so a "tiny fragment" cannot
//!   move the ports or flags into a later one. Other protocols have no ports: rules match them by
//!   protocol only, with port 0.
//! - Fragments: the first is a packet like any other ([`Shape::First`]); later ones carry no L4
//!   header ([`Shape::Later`]) and follow their first fragment's verdict (see `fragments`).

use aya_ebpf::programs::TcContext;
use lb_common::{
    conntrack::FlowKey,
    fragments::{ipv4_position, ipv6_position, Position},
    icmp::{PROTOCOL_ICMP, PROTOCOL_ICMPV6},
    policy::Reason,
    protocol,
    service::{family, Addr},
};
use network_types::eth::EtherType;

/// A packet the policy check can judge.
pub struct Packet {
    /// Addresses, protocol and family as on the wire; ports as the conntrack key uses them: TCP/UDP
    /// ports, the ICMP echo identifier as a request's source port and a reply's destination port
    /// (so a reply reversed is its request), otherwise 0.
    pub key: FlowKey,
    /// The destination port rules match (network order): TCP/UDP only, else 0.
    pub dport: u16,
    pub shape: Shape,
}

pub enum Shape {
    Whole,
    /// First fragment of the datagram with this identification (read natively).
    First(u32),
    /// Later fragment: no L4 header.
    Later(u32),
    /// An ICMP error quoting a packet of the connection `key` (as that packet was sent).
    IcmpError(FlowKey),
}

pub enum Parsed {
    Packet(Packet),
    Pass(Reason),
    Drop(Reason),
}

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
/// Bytes the program pulls into the linear part of an skb, at most: every header it reads.
const PULL_BYTES: u32 = 256;
pub const MAX_IPV4_OPTIONS: usize = 8;
pub const MAX_IPV6_EXTENSION_HEADERS: usize = 6;
/// Furthest L4 header start accepted (IPv6 extension headers beyond are [`Reason::Malformed`]).
pub const MAX_L4_OFFSET: usize = ETH_LEN + IPV6_LEN + 200;

mod ipv6_extension {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const AUTHENTICATION: u8 = 51;
    pub const DESTINATION_OPTIONS: u8 = 60;
    pub const MOBILITY: u8 = 135;
    pub const HIP: u8 = 139;
    pub const SHIM6: u8 = 140;
}

mod icmp_type {
    pub const V4_ECHO_REPLY: u8 = 0;
    pub const V4_UNREACHABLE: u8 = 3;
    pub const V4_ECHO_REQUEST: u8 = 8;
    pub const V4_TIME_EXCEEDED: u8 = 11;
    pub const V4_PARAMETER_PROBLEM: u8 = 12;
    pub const V6_ERROR_MAX: u8 = 4;
    pub const V6_ECHO_REQUEST: u8 = 128;
    pub const V6_ECHO_REPLY: u8 = 129;
    /// MLD (130..=132), router/neighbour discovery and redirect (133..=137), MLDv2 report (143).
    pub const V6_CONTROL_FIRST: u8 = 130;
    pub const V6_CONTROL_LAST: u8 = 137;
    pub const V6_MLD2_REPORT: u8 = 143;
}

/// The linear part of the skb, read with volatile loads so LLVM keeps each packet-pointer check
/// next to its use.
#[derive(Clone, Copy)]
struct Extent {
    start: usize,
    end: usize,
}

impl Extent {
    #[inline(always)]
    fn of(ctx: &TcContext) -> Self {
        // SAFETY: the program's context, valid while it runs.
        unsafe {
            Self {
                start: core::ptr::read_volatile(&(*ctx.skb.skb).data) as usize,
                end: core::ptr::read_volatile(&(*ctx.skb.skb).data_end) as usize,
            }
        }
    }

    /// `N` bytes at `offset`, if the packet holds them.
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        if self.start + offset + N > self.end {
            return None;
        }
        // SAFETY: bounds checked just above.
        Some(unsafe { *((self.start + offset) as *const [u8; N]) })
    }
}

#[inline(always)]
fn word(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

#[inline(always)]
fn addr6(b: &[u8], i: usize) -> Addr {
    Addr([word(b, i), word(b, i + 4), word(b, i + 8), word(b, i + 12)])
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Parsed {
    // SAFETY: the program's context.
    if unsafe { core::ptr::read_volatile(&(*ctx.skb.skb).vlan_present) } != 0 {
        return Parsed::Drop(Reason::VlanTagged);
    }
    let want = ctx.len().min(PULL_BYTES);
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        // A failure leaves the headers short, which the checks below turn into a drop.
        let _ = ctx.pull_data(want);
    }
    let packet = Extent::of(ctx);
    let Some(eth) = packet.bytes::<ETH_LEN>(0) else {
        return Parsed::Drop(Reason::Malformed);
    };
    let ether_type = u16::from_ne_bytes([eth[12], eth[13]]);
    let mut key = FlowKey::default();
    let mut shape = Shape::Whole;
    let (l4, proto) = if ether_type == EtherType::Ipv4 as u16 {
        let Some(ip) = packet.bytes::<IPV4_LEN>(ETH_LEN) else {
            return Parsed::Drop(Reason::Malformed);
        };
        let header_len = ((ip[0] & 0x0f) as usize) * 4;
        if ip[0] >> 4 != 4 || header_len < IPV4_LEN {
            return Parsed::Drop(Reason::Malformed);
        }
        if header_len > IPV4_LEN {
            if let Err(reason) = ipv4_options(&packet, header_len) {
                return Parsed::Drop(reason);
            }
        }
        key.family = family::IPV4;
        key.src = Addr::from_v4_word(word(&ip, 12));
        key.dst = Addr::from_v4_word(word(&ip, 16));
        let id = u16::from_ne_bytes([ip[4], ip[5]]) as u32;
        match ipv4_position(u16::from_be_bytes([ip[6], ip[7]])) {
            Position::Whole => {}
            Position::First => shape = Shape::First(id),
            Position::Later => {
                key.protocol = ip[9];
                return Parsed::Packet(Packet {
                    key,
                    dport: 0,
                    shape: Shape::Later(id),
                });
            }
        }
        (ETH_LEN + header_len, ip[9])
    } else if ether_type == EtherType::Ipv6 as u16 {
        let Some(ip) = packet.bytes::<IPV6_LEN>(ETH_LEN) else {
            return Parsed::Drop(Reason::Malformed);
        };
        if ip[0] >> 4 != 6 {
            return Parsed::Drop(Reason::Malformed);
        }
        key.family = family::IPV6;
        key.src = addr6(&ip, 8);
        key.dst = addr6(&ip, 24);
        let mut next = ip[6];
        let mut offset = ETH_LEN + IPV6_LEN;
        for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
            if !is_walked_extension(next) {
                break;
            }
            if offset > MAX_L4_OFFSET {
                return Parsed::Drop(Reason::Malformed);
            }
            let Some(header) = packet.bytes::<8>(offset) else {
                return Parsed::Drop(Reason::Malformed);
            };
            match next {
                ipv6_extension::FRAGMENT => {
                    let id = word(&header, 4);
                    match ipv6_position(u16::from_be_bytes([header[2], header[3]])) {
                        Position::Whole => {}
                        Position::First => shape = Shape::First(id),
                        Position::Later => {
                            key.protocol = header[0];
                            return Parsed::Packet(Packet {
                                key,
                                dport: 0,
                                shape: Shape::Later(id),
                            });
                        }
                    }
                    offset += 8;
                }
                ipv6_extension::ROUTING if header[3] != 0 => {
                    return Parsed::Drop(Reason::SourceRoute)
                }
                ipv6_extension::AUTHENTICATION => offset += (header[1] as usize + 2) * 4,
                _ => offset += (header[1] as usize + 1) * 8,
            }
            next = header[0];
        }
        if is_walked_extension(next)
            || matches!(
                next,
                ipv6_extension::MOBILITY | ipv6_extension::HIP | ipv6_extension::SHIM6
            )
            || offset > MAX_L4_OFFSET
        {
            return Parsed::Drop(Reason::Malformed);
        }
        (offset, next)
    } else if ether_type == EtherType::Arp as u16 {
        return Parsed::Pass(Reason::Control);
    } else if ether_type == EtherType::Ieee8021q as u16
        || ether_type == EtherType::Ieee8021ad as u16
    {
        return Parsed::Drop(Reason::VlanTagged);
    } else {
        return Parsed::Drop(Reason::UnknownL3);
    };

    key.protocol = proto;
    let mut dport = 0;
    match proto {
        protocol::TCP => {
            let Some(tcp) = packet.bytes::<20>(l4) else {
                return Parsed::Drop(Reason::Malformed);
            };
            key.src_port = u16::from_ne_bytes([tcp[0], tcp[1]]);
            key.dst_port = u16::from_ne_bytes([tcp[2], tcp[3]]);
            dport = key.dst_port;
        }
        protocol::UDP => {
            let Some(udp) = packet.bytes::<8>(l4) else {
                return Parsed::Drop(Reason::Malformed);
            };
            key.src_port = u16::from_ne_bytes([udp[0], udp[1]]);
            key.dst_port = u16::from_ne_bytes([udp[2], udp[3]]);
            dport = key.dst_port;
        }
        PROTOCOL_ICMP | PROTOCOL_ICMPV6 => {
            let v4 = key.family == family::IPV4;
            if v4 != (proto == PROTOCOL_ICMP) {
                // ICMPv4 in IPv6 or ICMPv6 in IPv4: no ports, matched by protocol only.
                return Parsed::Packet(Packet { key, dport, shape });
            }
            let Some(icmp) = packet.bytes::<8>(l4) else {
                return Parsed::Drop(Reason::Malformed);
            };
            let echo_id = u16::from_ne_bytes([icmp[4], icmp[5]]);
            let kind = icmp[0];
            if v4 {
                match kind {
                    icmp_type::V4_ECHO_REQUEST => key.src_port = echo_id,
                    icmp_type::V4_ECHO_REPLY => key.dst_port = echo_id,
                    icmp_type::V4_UNREACHABLE
                    | icmp_type::V4_TIME_EXCEEDED
                    | icmp_type::V4_PARAMETER_PROBLEM => {
                        if let Some(quoted) = quoted_flow(&packet, l4 + 8, true) {
                            shape = Shape::IcmpError(quoted);
                        }
                    }
                    _ => {}
                }
            } else {
                match kind {
                    icmp_type::V6_ECHO_REQUEST => key.src_port = echo_id,
                    icmp_type::V6_ECHO_REPLY => key.dst_port = echo_id,
                    icmp_type::V6_CONTROL_FIRST..=icmp_type::V6_CONTROL_LAST
                    | icmp_type::V6_MLD2_REPORT => return Parsed::Pass(Reason::Control),
                    1..=icmp_type::V6_ERROR_MAX => {
                        if let Some(quoted) = quoted_flow(&packet, l4 + 8, false) {
                            shape = Shape::IcmpError(quoted);
                        }
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
    Parsed::Packet(Packet { key, dport, shape })
}

/// Checks IPv4 options (the header is `header_len` bytes, more than 20).
#[inline(always)]
fn ipv4_options(packet: &Extent, header_len: usize) -> Result<(), Reason> {
    const END: u8 = 0;
    const NOP: u8 = 1;
    const LOOSE_SOURCE_ROUTE: u8 = 0x83;
    const STRICT_SOURCE_ROUTE: u8 = 0x89;
    let end = ETH_LEN + header_len;
    let mut offset = ETH_LEN + IPV4_LEN;
    for _ in 0..MAX_IPV4_OPTIONS {
        if offset >= end {
            break;
        }
        // Bounded for the verifier: options end within 60 bytes of the IP header.
        if offset > ETH_LEN + 60 {
            return Err(Reason::Malformed);
        }
        let Some([kind, len]) = packet.bytes::<2>(offset) else {
            return Err(Reason::Malformed);
        };
        match kind {
            END => return Ok(()),
            NOP => offset += 1,
            LOOSE_SOURCE_ROUTE | STRICT_SOURCE_ROUTE => return Err(Reason::SourceRoute),
            _ if len < 2 => return Err(Reason::Malformed),
            _ => offset += len as usize,
        }
    }
    if offset == end {
        Ok(())
    } else {
        Err(Reason::Malformed)
    }
}

/// The TCP/UDP flow of the packet an ICMP error quotes at `offset` (its IP header); `None` if it is
/// cut too short or is not TCP/UDP.
#[inline(always)]
fn quoted_flow(packet: &Extent, offset: usize, v4: bool) -> Option<FlowKey> {
    let mut key = FlowKey::default();
    let l4 = if v4 {
        let ip = packet.bytes::<IPV4_LEN>(offset)?;
        key.family = family::IPV4;
        key.protocol = ip[9];
        key.src = Addr::from_v4_word(word(&ip, 12));
        key.dst = Addr::from_v4_word(word(&ip, 16));
        offset + ((ip[0] & 0x0f) as usize) * 4
    } else {
        let ip = packet.bytes::<IPV6_LEN>(offset)?;
        key.family = family::IPV6;
        key.protocol = ip[6];
        key.src = addr6(&ip, 8);
        key.dst = addr6(&ip, 24);
        offset + IPV6_LEN
    };
    if key.protocol != protocol::TCP && key.protocol != protocol::UDP {
        return None;
    }
    let ports = packet.bytes::<4>(l4)?;
    key.src_port = u16::from_ne_bytes([ports[0], ports[1]]);
    key.dst_port = u16::from_ne_bytes([ports[2], ports[3]]);
    Some(key)
}

#[inline(always)]
fn is_walked_extension(next: u8) -> bool {
    matches!(
        next,
        ipv6_extension::HOP_BY_HOP
            | ipv6_extension::ROUTING
            | ipv6_extension::FRAGMENT
            | ipv6_extension::AUTHENTICATION
            | ipv6_extension::DESTINATION_OPTIONS
    )
}
