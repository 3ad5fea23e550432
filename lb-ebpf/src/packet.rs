//! Bounds-checked parsing of Ethernet / IPv4 or IPv6 / TCP or UDP into a [`Flow`]; later IP
//! fragments and ICMP errors, which carry no ports of their own, come out as their own cases
//! (handled by `fragments` and `icmp`).
//!
//! What is balanced and what is left to the stack:
//! - IPv4 options: walked (at most [`MAX_IPV4_OPTIONS`]) and carried through untouched, since the
//!   rewrite changes only addresses, ports and checksums. Source routes (LSRR/SSRR: the destination
//!   is only the next hop) and options that do not parse are passed, counted `pass_ipv4_options`.
//! - IPv6 extension headers: hop-by-hop, destination options, fragment and routing headers with no
//!   segments left are walked (at most [`MAX_IPV6_EXTENSION_HEADERS`]) to the TCP/UDP header; the
//!   rewrite changes only the fixed header's addresses and the L4 header. A routing header with
//!   segments left (the destination is not the final one), AH (a rewrite would break its integrity
//!   check), mobility, HIP and shim6 are passed, counted `pass_ipv6_extension_header`.
//! - Fragments: a first fragment is a [`Flow`] like any packet (it has the ports; `fragments`
//!   recognises it again after the rewrite, from its header); later fragments are
//!   [`Parsed::Fragment`]. Fragments of other protocols pass, counted `pass_fragment`.
//! - ICMP/ICMPv6 are [`Parsed::Icmp`]: `icmp` translates errors about DNAT flows and passes the rest.
//!
//! The fast path is the screen of plain packets (TCP/UDP right after a 20-byte IPv4 or 40-byte IPv6
//! header, not fragmented): it asks the prefilter straight from the frame, and builds the flow of
//! one the prefilter does not rule out without checking anything twice. Everything else takes the
//! full parse; its walks and the ICMP and fragment handling are separate BPF functions, so their
//! stack does not add to `lb_xdp`'s.

use lb_common::{
    conntrack::FlowKey,
    counters::Counter,
    fragments::{field, ipv4_position, ipv6_position, Position},
    icmp::{PROTOCOL_ICMP, PROTOCOL_ICMPV6},
    prefilter::fold,
    protocol,
    service::{family, Addr},
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{context::PacketContext, fragments::Fragment, prefilter};

/// A TCP or UDP packet: its 5-tuple and where to rewrite it.
pub struct Flow {
    /// Addresses, ports (network byte order), protocol and family, as on the wire.
    pub key: FlowKey,
    /// Start of the IP header.
    pub l3: usize,
    /// Start of the TCP/UDP header (ports are its first 4 bytes), after any IPv4 options or IPv6
    /// extension headers.
    pub l4: usize,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// What the prefilter says the addresses may be (`prefilter::of_packet`, never 0).
    pub roles: u8,
    /// Frame length, for byte counters.
    pub len: u64,
}

pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

pub enum Parsed {
    Flow(Flow),
    /// A fragment after the first: no ports, forwarded like its datagram's first fragment.
    Fragment(Fragment),
    /// An ICMP (`family` IPv4) or ICMPv6 message starting at `offset` of the frame.
    Icmp {
        family: u8,
        offset: usize,
    },
    Pass(Counter),
    Drop(Counter),
}

/// IPv4 options walked before giving up (40 bytes of options; real packets carry one or two).
pub const MAX_IPV4_OPTIONS: usize = 8;
/// IPv6 extension headers walked before giving up (hop-by-hop, routing, fragment and destination
/// options fit).
pub const MAX_IPV6_EXTENSION_HEADERS: usize = 4;

/// Header lengths and field offsets (from the start of their header): the one set every module that
/// reads or rewrites headers uses.
pub mod header {
    pub const ETH_LEN: usize = 14;
    pub const IPV4_LEN: usize = 20;
    pub const IPV6_LEN: usize = 40;
    pub const TCP_LEN: usize = 20;
    pub const UDP_LEN: usize = 8;

    pub const IPV4_TOTAL_LEN: usize = 2;
    pub const IPV4_ID: usize = 4;
    pub const IPV4_FLAGS: usize = 6;
    pub const IPV4_TTL: usize = 8;
    pub const IPV4_PROTOCOL: usize = 9;
    pub const IPV4_CHECK: usize = 10;
    pub const IPV4_SRC: usize = 12;
    pub const IPV4_DST: usize = 16;

    pub const IPV6_PAYLOAD_LEN: usize = 4;
    pub const IPV6_NEXT_HEADER: usize = 6;
    pub const IPV6_HOP_LIMIT: usize = 7;
    pub const IPV6_SRC: usize = 8;
    pub const IPV6_DST: usize = 24;

    /// TCP byte 13: CWR..FIN.
    pub const TCP_FLAGS: usize = 13;
    pub const TCP_CHECK: usize = 16;
    pub const UDP_CHECK: usize = 6;
}

/// Loads and stores of packet fields, one instruction each (callers check the bounds). IP fields
/// sit 2-byte aligned behind the 14-byte Ethernet header, and a load LLVM must assume unaligned
/// becomes byte loads, shifts and ors (an IPv6 address: 16 loads, 28 ALU instructions). A BPF
/// load or store may be unaligned on packet memory: the verifier checks packet alignment only with
/// `BPF_F_STRICT_ALIGNMENT` or where the architecture lacks efficient unaligned access, and the
/// JITs (x86-64, arm64) emit one plain move.
///
/// # Safety
/// `at .. at + size` must be inside the packet.
#[inline(always)]
pub unsafe fn load16(at: usize) -> u16 {
    unsafe { core::ptr::read(at as *const u16) }
}

/// See [`load16`].
#[inline(always)]
pub unsafe fn load32(at: usize) -> u32 {
    unsafe { core::ptr::read(at as *const u32) }
}

/// See [`load16`].
#[inline(always)]
pub unsafe fn store16(at: usize, value: u16) {
    unsafe { core::ptr::write(at as *mut u16, value) }
}

/// See [`load16`].
#[inline(always)]
pub unsafe fn store32(at: usize, value: u32) {
    unsafe { core::ptr::write(at as *mut u32, value) }
}

/// The address at `at` (4 bytes if `v4`, else 16). See [`load16`].
#[inline(always)]
pub unsafe fn load_addr(at: usize, v4: bool) -> Addr {
    let w = |i: usize| unsafe { load32(at + 4 * i) };
    if v4 {
        Addr::from_v4_word(w(0))
    } else {
        Addr([w(0), w(1), w(2), w(3)])
    }
}

/// Writes the 16-byte `addr` at `at`. See [`load16`].
#[inline(always)]
pub unsafe fn store_addr6(at: usize, addr: &Addr) {
    for i in 0..4 {
        unsafe { store32(at + 4 * i, addr.0[i]) };
    }
}

/// Returns the address of a `T` at `offset`, or `None` if it does not fit in the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl PacketContext, offset: usize) -> Option<usize> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some(start + offset)
}

/// The packet's extent as read by a separate BPF function (`#[inline(never)]`): with volatile reads,
/// which LLVM cannot hoist into the callers. Hoisted, the function would receive packet pointers as
/// arguments and zero-extend them (`xdp_md`'s fields are `u32`), pointer arithmetic the verifier
/// rejects.
#[derive(Clone, Copy)]
pub struct Extent {
    pub start: usize,
    pub end: usize,
}

impl Extent {
    #[inline(always)]
    pub fn of<C: PacketContext>(ctx: &C) -> Self {
        ctx.extent()
    }

    /// [`ptr_at`] within this extent.
    #[inline(always)]
    pub fn ptr_at<T>(&self, offset: usize) -> Option<usize> {
        if self.start + offset + core::mem::size_of::<T>() > self.end {
            return None;
        }
        Some(self.start + offset)
    }
}

/// `version 4, IHL 5`: no options, the common case, checked with one compare.
const IPV4_NO_OPTIONS: u8 = 0x45;

/// The IPv4 flags/offset field's More Fragments and offset bits, as a native load of the field
/// (network order) sees them: tested without a byte swap.
const IPV4_FRAGMENT_BITS_AS_LOADED: u16 = (field::IPV4_MORE_FRAGMENTS | field::IPV4_OFFSET).to_be();

/// What [`screen`] found.
#[derive(Clone, Copy)]
struct Screen {
    /// The family of a plain TCP/UDP packet; 0: not plain, left to the full parse.
    family: u8,
    /// Its protocol (TCP or UDP).
    protocol: u8,
    /// What the prefilter says its addresses may be (`prefilter::of_packet`); 0: neither to a VIP
    /// nor from a backend.
    roles: u8,
}

impl Screen {
    const NOT_PLAIN: Self = Self {
        family: 0,
        protocol: 0,
        roles: 0,
    };
}

/// Screens a plain TCP/UDP packet, the common case: IPv4 without options and not fragmented, or
/// IPv6 with TCP/UDP right after the fixed header. Read straight from the frame, apart from the
/// full parse, so that most of a node's traffic leaves after a short straight line: a few
/// compares, two multiplies, two word reads.
#[inline(always)]
fn screen<C: PacketContext>(ctx: &C) -> Screen {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + header::ETH_LEN + header::IPV4_LEN > end {
        return Screen::NOT_PLAIN;
    }
    let l3 = start + header::ETH_LEN;
    // SAFETY (all reads): within the bounds checked before each.
    let ether_type = unsafe { load16(start + header::ETH_LEN - 2) };
    if ether_type == EtherType::Ipv4 as u16 {
        let (vihl, protocol, fragment) = unsafe {
            (
                *(l3 as *const u8),
                *((l3 + header::IPV4_PROTOCOL) as *const u8),
                load16(l3 + header::IPV4_FLAGS),
            )
        };
        if vihl != IPV4_NO_OPTIONS
            || fragment & IPV4_FRAGMENT_BITS_AS_LOADED != 0
            || (protocol != protocol::TCP && protocol != protocol::UDP)
        {
            return Screen::NOT_PLAIN;
        }
        // An IPv4 address is its own fold (`lb_common::prefilter::fold`).
        let roles = unsafe {
            prefilter::of_packet(load32(l3 + header::IPV4_DST), load32(l3 + header::IPV4_SRC))
        };
        return Screen {
            family: family::IPV4,
            protocol,
            roles,
        };
    }
    if ether_type == EtherType::Ipv6 as u16 && start + header::ETH_LEN + header::IPV6_LEN <= end {
        let protocol = unsafe { *((l3 + header::IPV6_NEXT_HEADER) as *const u8) };
        if protocol != protocol::TCP && protocol != protocol::UDP {
            return Screen::NOT_PLAIN;
        }
        // `lb_common::prefilter::fold` of the address at `at`, read straight from the packet: going
        // through an `Addr` measured about 0.06x XDP_PASS slower on this path.
        let folded =
            |at: usize| unsafe { load32(at) ^ load32(at + 4) ^ load32(at + 8) ^ load32(at + 12) };
        let roles =
            prefilter::of_packet(folded(l3 + header::IPV6_DST), folded(l3 + header::IPV6_SRC));
        return Screen {
            family: family::IPV6,
            protocol,
            roles,
        };
    }
    Screen::NOT_PLAIN
}

/// The flow of a plain packet the prefilter did not rule out: its TCP/UDP header is at a fixed
/// offset, and nothing the screen checked is checked again.
#[inline(always)]
fn plain_flow<C: PacketContext>(ctx: &C, screen: Screen) -> Parsed {
    let v4 = screen.family == family::IPV4;
    let ip_len = if v4 {
        header::IPV4_LEN
    } else {
        header::IPV6_LEN
    };
    let Some((l4, tcp_flags)) = l4_header(ctx, header::ETH_LEN + ip_len, screen.protocol) else {
        return Parsed::Drop(Counter::DropMalformed);
    };
    // The IP header precedes the L4 header checked above (addressed from it, for the verifier).
    let l3 = l4 - ip_len;
    let (src, dst) = if v4 {
        (header::IPV4_SRC, header::IPV4_DST)
    } else {
        (header::IPV6_SRC, header::IPV6_DST)
    };
    // SAFETY: within the IP header.
    let key = unsafe {
        FlowKey {
            src: load_addr(l3 + src, v4),
            dst: load_addr(l3 + dst, v4),
            family: screen.family,
            ..FlowKey::default()
        }
    };
    flow(ctx, key, l4, screen.protocol, tcp_flags, screen.roles)
}

/// The TCP or UDP header (`protocol`) at `offset`, and its TCP flags (0 for UDP); `None` if it is
/// cut short. The L4 address is the one bounds-checked here: the verifier tracks the check on that
/// pointer, and the offset is not a constant when options or extension headers precede it.
#[inline(always)]
fn l4_header<C: PacketContext>(ctx: &C, offset: usize, protocol: u8) -> Option<(usize, u8)> {
    if protocol == protocol::TCP {
        let tcp = ptr_at::<TcpHdr>(ctx, offset)?;
        // SAFETY: bounds checked by ptr_at.
        Some((tcp, unsafe { *((tcp + header::TCP_FLAGS) as *const u8) }))
    } else {
        Some((ptr_at::<UdpHdr>(ctx, offset)?, 0))
    }
}

/// The [`Flow`] of `key` (addresses and family set) with its TCP/UDP header at `l4`.
#[inline(always)]
fn flow<C: PacketContext>(
    ctx: &C,
    mut key: FlowKey,
    l4: usize,
    protocol: u8,
    tcp_flags: u8,
    roles: u8,
) -> Parsed {
    // SAFETY: the ports are the first 4 bytes of the TCP/UDP header, bounds-checked by the caller.
    key.src_port = unsafe { load16(l4) };
    key.dst_port = unsafe { load16(l4 + 2) };
    key.protocol = protocol;
    Parsed::Flow(Flow {
        key,
        l3: ctx.data() + EthHdr::LEN,
        l4,
        tcp_flags,
        roles,
        len: (ctx.data_end() - ctx.data()) as u64,
    })
}

#[inline(always)]
pub fn parse<C: PacketContext>(ctx: &C) -> Parsed {
    // Most traffic is neither to a VIP nor from a backend: the prefilter tells from the addresses,
    // before the L4 header is read (one cut short then passes, as the stack would).
    let screen = screen(ctx);
    if screen.family != 0 {
        if screen.roles == 0 {
            return Parsed::Pass(Counter::PassNotService);
        }
        return plain_flow(ctx, screen);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::Pass(Counter::PassNotIp);
    };
    // SAFETY (all header reads below): every address was bounds-checked by ptr_at.
    let ether_type = unsafe { (*(eth as *const EthHdr)).ether_type };
    let mut key = FlowKey::default();
    let mut first_fragment = None;
    let (l4_offset, proto) = if ether_type == EtherType::Ipv4 as u16 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
            return Parsed::Drop(Counter::DropMalformed);
        };
        let l3 = ip;
        let ip = unsafe { &*(ip as *const Ipv4Hdr) };
        key.family = family::IPV4;
        key.src = Addr::from_v4_word(unsafe { load32(l3 + header::IPV4_SRC) });
        key.dst = Addr::from_v4_word(unsafe { load32(l3 + header::IPV4_DST) });
        let header_len = if ip.vihl == IPV4_NO_OPTIONS {
            Ipv4Hdr::LEN
        } else {
            match ipv4_header_len(ctx, ip.vihl) {
                Ok(len) => len,
                Err(parsed) => return parsed,
            }
        };
        let flags_offset = u16::from_be(unsafe { load16(l3 + header::IPV4_FLAGS) });
        if flags_offset & (field::IPV4_MORE_FRAGMENTS | field::IPV4_OFFSET) != 0 {
            let id = unsafe { load16(l3 + header::IPV4_ID) } as u32;
            if ipv4_position(flags_offset) == Position::Later {
                if ip.proto != protocol::TCP && ip.proto != protocol::UDP {
                    return Parsed::Pass(Counter::PassFragment);
                }
                return Parsed::Fragment(Fragment {
                    family: family::IPV4,
                    protocol: ip.proto,
                    id,
                });
            }
            first_fragment = Some(id);
        }
        (EthHdr::LEN + header_len, ip.proto)
    } else if ether_type == EtherType::Ipv6 as u16 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
            return Parsed::Drop(Counter::DropMalformed);
        };
        let l3 = ip;
        let ip = unsafe { &*(ip as *const Ipv6Hdr) };
        key.family = family::IPV6;
        key.src = unsafe { load_addr(l3 + header::IPV6_SRC, false) };
        key.dst = unsafe { load_addr(l3 + header::IPV6_DST, false) };
        let next = ip.next_hdr;
        if next == protocol::TCP || next == protocol::UDP {
            (EthHdr::LEN + Ipv6Hdr::LEN, next)
        } else {
            let walk = ipv6_extension_headers(ctx, next);
            match walk.outcome() {
                Ipv6Walk::UPPER_LAYER => {
                    first_fragment = walk.first_fragment();
                    (walk.offset(), walk.next())
                }
                Ipv6Walk::LATER_FRAGMENT => {
                    return Parsed::Fragment(Fragment {
                        family: family::IPV6,
                        protocol: 0,
                        id: walk.id(),
                    })
                }
                Ipv6Walk::NOT_WALKED => return Parsed::Pass(Counter::PassIpv6ExtensionHeader),
                _ => return Parsed::Drop(Counter::DropMalformed),
            }
        }
    } else {
        return Parsed::Pass(Counter::PassNotIp);
    };

    // Packets the screen left here (IPv4 options, IPv6 extension headers, first fragments) ask the
    // prefilter once their addresses are known, with the same answers.
    let roles = if proto == protocol::TCP || proto == protocol::UDP {
        match prefilter::of_packet(fold(&key.dst), fold(&key.src)) {
            0 => return Parsed::Pass(Counter::PassNotService),
            roles => roles,
        }
    } else {
        0
    };

    let (l4, tcp_flags) = match proto {
        protocol::TCP | protocol::UDP => match l4_header(ctx, l4_offset, proto) {
            Some(header) => header,
            None => return Parsed::Drop(Counter::DropMalformed),
        },
        // A fragmented ICMP message (never an error in practice: errors are small) is not
        // translated; neither is anything else that is fragmented and not TCP/UDP.
        _ if first_fragment.is_some() => return Parsed::Pass(Counter::PassFragment),
        PROTOCOL_ICMP if key.family == family::IPV4 => {
            return Parsed::Icmp {
                family: key.family,
                offset: l4_offset,
            }
        }
        PROTOCOL_ICMPV6 if key.family == family::IPV6 => {
            return Parsed::Icmp {
                family: key.family,
                offset: l4_offset,
            }
        }
        _ if key.family == family::IPV6 && is_ipv6_extension(proto) => {
            return Parsed::Pass(Counter::PassIpv6ExtensionHeader)
        }
        _ => return Parsed::Pass(Counter::PassNotTcpUdp),
    };
    flow(ctx, key, l4, proto, tcp_flags, roles)
}

/// IPv4 option kinds (RFC 791).
mod ipv4_option {
    pub const END: u8 = 0;
    pub const NOP: u8 = 1;
    pub const LOOSE_SOURCE_ROUTE: u8 = 0x83;
    pub const STRICT_SOURCE_ROUTE: u8 = 0x89;
}

/// Length of an IPv4 header that is not plain 20 bytes, after checking its options; `Err` is what
/// to do with the packet instead.
#[inline(always)]
fn ipv4_header_len<C: PacketContext>(ctx: &C, vihl: u8) -> Result<usize, Parsed> {
    let len = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || len < Ipv4Hdr::LEN {
        return Err(Parsed::Drop(Counter::DropMalformed));
    }
    let end = EthHdr::LEN + len;
    let mut offset = EthHdr::LEN + Ipv4Hdr::LEN;
    for _ in 0..MAX_IPV4_OPTIONS {
        if offset == end {
            return Ok(len);
        }
        if offset > end {
            // The last option runs past the header.
            return Err(Parsed::Pass(Counter::PassIpv4Options));
        }
        let Some(kind) = ptr_at::<[u8; 2]>(ctx, offset) else {
            return Err(Parsed::Drop(Counter::DropMalformed));
        };
        // SAFETY: bounds checked by ptr_at (an option other than END and NOP has a length byte;
        // END and NOP are followed by more header or by the L4 header the caller needs anyway).
        let [kind, option_len] = unsafe { *(kind as *const [u8; 2]) };
        match kind {
            ipv4_option::END => return Ok(len),
            ipv4_option::NOP => offset += 1,
            ipv4_option::LOOSE_SOURCE_ROUTE | ipv4_option::STRICT_SOURCE_ROUTE => {
                return Err(Parsed::Pass(Counter::PassIpv4Options))
            }
            _ if option_len < 2 => return Err(Parsed::Pass(Counter::PassIpv4Options)),
            _ => offset += option_len as usize,
        }
    }
    if offset == end {
        Ok(len)
    } else {
        // Options running past the header, or more of them than walked.
        Err(Parsed::Pass(Counter::PassIpv4Options))
    }
}

/// IPv6 extension header numbers the walk steps over.
mod ipv6_extension {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const DESTINATION_OPTIONS: u8 = 60;
}

/// What [`ipv6_extension_headers`] found, packed into one 64-bit register: the walk is a separate
/// BPF function (its loop then takes nothing from `lb_xdp`'s stack frame), and a register is what a
/// BPF function returns. Bits 0..4: outcome; bit 4: first fragment; 8..16: next header; 16..30:
/// offset of the upper-layer header; 32..64: fragment identification.
#[derive(Clone, Copy)]
pub struct Ipv6Walk(u64);

impl Ipv6Walk {
    /// Found the upper-layer header (TCP, UDP, ICMPv6, or anything else not walked).
    pub const UPPER_LAYER: u64 = 0;
    /// A fragment header with a non-zero offset: a later fragment.
    const LATER_FRAGMENT: u64 = 1;
    /// An extension header the datapath does not step over (see the module doc).
    const NOT_WALKED: u64 = 2;
    /// A header running past the end of the packet.
    const MALFORMED: u64 = 3;
    const FIRST_FRAGMENT: u64 = 1 << 4;
    /// Offsets fit in 14 bits (at most 54 + 4 x 2048 bytes); the mask also bounds the offset for
    /// the verifier once it comes back from the call.
    const OFFSET_MASK: u64 = 0x3fff;

    #[inline(always)]
    /// `fragment_id`: the identification of the fragment header walked over, if any.
    fn new(outcome: u64, offset: usize, next: u8, fragment_id: Option<u32>) -> Self {
        let (flag, id) = match fragment_id {
            Some(id) => (Self::FIRST_FRAGMENT, id),
            None => (0, 0),
        };
        Self(
            outcome
                | flag
                | (next as u64) << 8
                | ((offset as u64) & Self::OFFSET_MASK) << 16
                | (id as u64) << 32,
        )
    }

    #[inline(always)]
    pub fn outcome(self) -> u64 {
        self.0 & 0xf
    }

    #[inline(always)]
    fn next(self) -> u8 {
        (self.0 >> 8) as u8
    }

    #[inline(always)]
    fn offset(self) -> usize {
        ((self.0 >> 16) & Self::OFFSET_MASK) as usize
    }

    #[inline(always)]
    fn id(self) -> u32 {
        (self.0 >> 32) as u32
    }

    #[inline(always)]
    pub fn first_fragment(self) -> Option<u32> {
        (self.0 & Self::FIRST_FRAGMENT != 0).then_some(self.id())
    }
}

/// Walks IPv6 extension headers from `next` (the fixed header's next header) to the upper-layer
/// header. Only reached when that is not TCP or UDP directly.
#[inline(never)]
pub fn ipv6_extension_headers<C: PacketContext>(ctx: &C, mut next: u8) -> Ipv6Walk {
    let packet = Extent::of(ctx);
    let mut offset = EthHdr::LEN + Ipv6Hdr::LEN;
    let mut first_fragment = None;
    for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
        if !matches!(
            next,
            ipv6_extension::HOP_BY_HOP
                | ipv6_extension::ROUTING
                | ipv6_extension::FRAGMENT
                | ipv6_extension::DESTINATION_OPTIONS
        ) {
            break;
        }
        // Every extension header is at least 8 bytes; the walked ones keep what is read here.
        let Some(header) = packet.ptr_at::<[u8; 8]>(offset) else {
            return Ipv6Walk::new(Ipv6Walk::MALFORMED, 0, 0, None);
        };
        // SAFETY: bounds checked by ptr_at.
        let header = unsafe { *(header as *const [u8; 8]) };
        if next == ipv6_extension::FRAGMENT {
            let id = u32::from_ne_bytes([header[4], header[5], header[6], header[7]]);
            match ipv6_position(u16::from_be_bytes([header[2], header[3]])) {
                Position::Later => return Ipv6Walk::new(Ipv6Walk::LATER_FRAGMENT, 0, 0, Some(id)),
                Position::First => first_fragment = Some(id),
                Position::Whole => {}
            }
            offset += 8;
        } else {
            // Routing header byte 3: segments left.
            if next == ipv6_extension::ROUTING && header[3] != 0 {
                return Ipv6Walk::new(Ipv6Walk::NOT_WALKED, 0, 0, None);
            }
            offset += (header[1] as usize + 1) * 8;
        }
        next = header[0];
    }
    Ipv6Walk::new(Ipv6Walk::UPPER_LAYER, offset, next, first_fragment)
}

/// Hop-by-hop, routing, fragment, destination options, AH, mobility, HIP, shim6.
#[inline(always)]
fn is_ipv6_extension(next_header: u8) -> bool {
    matches!(next_header, 0 | 43 | 44 | 60 | 51 | 135 | 139 | 140)
}
