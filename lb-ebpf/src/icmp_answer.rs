//! ICMP errors the datapath answers itself, in place of a packet it cannot forward: "fragmentation
//! needed" / "packet too big", and for SNAT requests also "time exceeded" and "destination
//! unreachable" ([`message`]). First, too big, for packets that do not fit the link to their
//! backend: DSR IPIP packets once encapsulated (as Katran answers its own too-big packets), and SNAT
//! requests, which the stack would answer too, but towards the node's SNAT address. Without an answer
//! the client never learns that its packets are too big for this path: it retransmits full-sized
//! segments into a black hole, and a TCP connection stalls after its handshake.
//!
//! When the FIB reports the encapsulated packet larger than the egress MTU (`dsr::encapsulate`), the
//! frame becomes, in place, an ICMP error from the VIP to the client: the outer header is dropped,
//! the packet cut to its inner IP header and 8 bytes after it (what RFC 792 asks a quote to hold;
//! the client's stack matches it to its socket by those), a new IP and ICMP header are written in
//! front, and it leaves through the interface it came in on, with the MAC addresses swapped
//! (`XDP_TX`, counted `icmp_too_big_sent`). The MTU it announces is the link's less the outer
//! header: what the inner packet may be.
//!
//! A SNAT request (`snat::forward`) is answered the same way before its translation, from the
//! FIB's answer for the translated packet (same length): no outer header to drop or subtract, the
//! link's MTU announced as it is. So is a SNAT request whose TTL / hop limit would expire here
//! (1 or 0), with "time exceeded" / "hop limit exceeded in transit" ([`message::TIME_EXCEEDED`],
//! counted `icmp_time_exceeded_sent`): the stack would answer the translated packet, towards the
//! SNAT address, and a client's traceroute or its socket's error queue would never hear of it. The
//! same quote and headers, another ICMP type and code, the second word unused (zero); IPv4 needs
//! no "don't fragment" for it. A traceroute through the node then names the VIP as the hop.
//! And so is a SNAT request whose backend the FIB says cannot be reached (an unreachable,
//! blackhole or prohibit route): "destination unreachable", host unreachable / address
//! unreachable ([`message::UNREACHABLE`], `icmp_unreachable_sent`), where the stack would answer
//! the SNAT address (or, for a blackhole, nobody): the client's connection fails at once instead
//! of retrying into silence.
//!
//! - IPv4: only for a packet whose header has no options (a 28-byte quote), and for a too-big
//!   answer with "don't fragment" set; others are left as they are ([`UNANSWERED`]): DSR IPIP
//!   drops them as before
//!   (`drop_encap_too_big`: without DF a sender expects the path to fragment, and the outer
//!   packet is never fragmented here), SNAT hands them translated to the stack, which fragments
//!   (or answers towards the SNAT address, for a TTL).
//! - IPv6: ICMPv6 "packet too big" (a 48-byte quote, the fixed header and 8 bytes). An announced
//!   MTU below 1280 means a link to backends without IPv6's minimum headroom; the client's stack
//!   then keeps 1280 and its packets stay too big, as they would on any such path.
//! - No rate limit (the stack limits its own ICMP errors per destination): a too-big answer is
//!   smaller than the packet it answers; a time-exceeded or unreachable one is at most 28 (IPv4)
//!   / 48 (IPv6) bytes longer than a short request (in `lb_tc` too), and goes only to the
//!   request's source, which a request with a forged source could point elsewhere, as a SYN's
//!   answer can.
//! - `lb_tc` answers single skbs the same way (`tc::icmp_answer`, sharing the headers written here),
//!   with a longer quote; GSO skbs are segmented to fit.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    checksum,
    counters::Counter,
    fragments::field,
    icmp::{PROTOCOL_ICMP, PROTOCOL_ICMPV6},
    modes::encap::{IPV4_OUTER_LEN, IPV6_OUTER_LEN},
    service::family,
};

use crate::{
    maps::{count, scratch},
    packet::{
        header::{ETH_LEN, IPV4_DST, IPV4_FLAGS, IPV4_LEN, IPV4_SRC, IPV6_DST, IPV6_LEN, IPV6_SRC},
        load16, load32, store16, store32,
    },
    xmit::Xmit,
};

/// The ICMP and ICMPv6 header: type, code, checksum, then 4 bytes (unused and MTU / MTU).
pub const ICMP_HEADER_LEN: usize = 8;
/// What follows the quoted IP header in `lb_xdp`'s quote (`tc::icmp_answer` quotes more).
const QUOTED_L4_BYTES: usize = 8;
/// ICMP destination unreachable, code fragmentation needed; ICMPv6 packet too big.
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_FRAGMENTATION_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// ICMP / ICMPv6 time exceeded, code 0 for both: in transit (TTL / hop limit).
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// ICMP destination unreachable, code host unreachable; ICMPv6 destination unreachable, code
/// address unreachable.
const ICMP_HOST_UNREACHABLE: u8 = 1;
const ICMPV6_UNREACHABLE: u8 = 1;
const ICMPV6_ADDRESS_UNREACHABLE: u8 = 3;
/// TTL / hop limit of the answer.
const ANSWER_TTL: u8 = 64;

/// What [`answer`] (and `tc::icmp_answer::answer`, as an `i32`) returns for a packet it cannot answer
/// and left as it was (nothing counted): the caller settles it as it did before answers.
pub const UNANSWERED: u32 = u32::MAX;

/// What an answer tells the client: [`answer`]'s (and `tc::icmp_answer::answer`'s) `message`.
pub mod message {
    /// "Fragmentation needed" / "packet too big", announcing the link's MTU (a SNAT request).
    pub const TOO_BIG: u8 = 0;
    /// The same about a packet behind the outer header `dsr::encapsulate` put in front of it
    /// (DSR IPIP): the MTU announced is the link's less that header.
    pub const TOO_BIG_ENCAPSULATED: u8 = 1;
    /// "Time exceeded" / "hop limit exceeded" in transit: a SNAT request whose TTL / hop limit
    /// would expire here.
    pub const TIME_EXCEEDED: u8 = 2;
    /// "Destination unreachable", host / address unreachable: a SNAT request whose backend the
    /// FIB says cannot be reached.
    pub const UNREACHABLE: u8 = 3;

    /// Whether `message` announces an MTU (and, for IPv4, answers only packets with "don't
    /// fragment").
    #[inline(always)]
    pub const fn too_big(message: u8) -> bool {
        message == TOO_BIG || message == TOO_BIG_ENCAPSULATED
    }
}

/// An answer's ICMP header but its checksum: type, code and the second word (the MTU of a
/// too-big answer; unused, zero, in the others).
#[derive(Clone, Copy)]
pub struct IcmpHeader {
    pub icmp_type: u8,
    pub code: u8,
    pub word: u32,
}

impl IcmpHeader {
    /// The header of `message` for the family `v4`; `None` for a too-big answer when the FIB's
    /// MTU cannot be read.
    #[inline(always)]
    pub fn of(message: u8, v4: bool) -> Option<Self> {
        let without_word = |icmp_type, code| {
            Some(Self {
                icmp_type,
                code,
                word: 0,
            })
        };
        match (message, v4) {
            (message::TIME_EXCEEDED, true) => return without_word(ICMP_TIME_EXCEEDED, 0),
            (message::TIME_EXCEEDED, false) => return without_word(ICMPV6_TIME_EXCEEDED, 0),
            (message::UNREACHABLE, true) => {
                return without_word(ICMP_UNREACHABLE, ICMP_HOST_UNREACHABLE)
            }
            (message::UNREACHABLE, false) => {
                return without_word(ICMPV6_UNREACHABLE, ICMPV6_ADDRESS_UNREACHABLE)
            }
            _ => {}
        }
        let outer = outer_len(message == message::TOO_BIG_ENCAPSULATED, v4);
        let mtu = link_mtu()?.saturating_sub(outer as u16) as u32;
        Some(if v4 {
            Self {
                icmp_type: ICMP_UNREACHABLE,
                code: ICMP_FRAGMENTATION_NEEDED,
                word: mtu,
            }
        } else {
            Self {
                icmp_type: ICMPV6_PACKET_TOO_BIG,
                code: 0,
                word: mtu,
            }
        })
    }
}

/// The answer a SNAT request gets when `route`, the FIB's answer asked before its translation
/// (`xmit::fib_route`, `tc::xmit::route`), does not let it through: too big, a TTL that would
/// expire, an unreachable backend. `None` for the rest (translated, to the stack).
#[inline(always)]
pub fn for_request<T>(route: &Result<T, Xmit>) -> Option<u8> {
    match route {
        Err(Xmit::TooBig) => Some(message::TOO_BIG),
        Err(Xmit::Expiring) => Some(message::TIME_EXCEEDED),
        Err(Xmit::Unreachable) => Some(message::UNREACHABLE),
        _ => None,
    }
}

/// The counter of an answer that says `message`.
#[inline(always)]
pub fn sent(message: u8) -> Counter {
    match message {
        message::TIME_EXCEEDED => Counter::IcmpTimeExceededSent,
        message::UNREACHABLE => Counter::IcmpUnreachableSent,
        _ => Counter::IcmpTooBigSent,
    }
}

/// The drop reason of a packet a helper refused to turn into an answer that says `message`,
/// halfway (the packet already changed).
#[inline(always)]
pub fn refused(message: u8) -> Counter {
    if message::too_big(message) {
        Counter::DropEncapTooBig
    } else {
        Counter::DropMalformed
    }
}

/// The outer header in front of the client's packet that [`answer`] finds, and by which the MTU it
/// announces is lower than the link's.
#[inline(always)]
pub const fn outer_len(encapsulated: bool, v4: bool) -> usize {
    match (encapsulated, v4) {
        (false, _) => 0,
        (true, true) => IPV4_OUTER_LEN,
        (true, false) => IPV6_OUTER_LEN,
    }
}

/// Answers the client of the packet at `ctx`, a packet of `family`, with `message`: found too big
/// for the egress MTU (the FIB's answer in the per-CPU scratch space), behind the outer header
/// `dsr::encapsulate` put in front of it ([`message::TOO_BIG_ENCAPSULATED`]) or as it came (a
/// SNAT request, [`message::TOO_BIG`]), or a SNAT request whose TTL would expire
/// ([`message::TIME_EXCEEDED`]) or whose backend cannot be reached ([`message::UNREACHABLE`]).
/// Returns `XDP_TX` (counted [`sent`]), [`UNANSWERED`], or `XDP_DROP` when a helper refused
/// halfway (counted [`refused`]).
// A BPF function of its own, called from `dsr::ipip` and `snat::forward`: the packet moves under it.
#[inline(never)]
pub fn answer(ctx: &XdpContext, family: u8, message: u8) -> u32 {
    if family == family::IPV4 {
        answer_family::<true>(ctx, message)
    } else {
        answer_family::<false>(ctx, message)
    }
}

/// [`answer`] for one family (`V4`): every length a constant of the branch it is used in, which
/// the verifier follows (lengths chosen once and used after another test of the family are not).
#[inline(always)]
fn answer_family<const V4: bool>(ctx: &XdpContext, message: u8) -> u32 {
    let refused = || {
        count(refused(message));
        xdp_action::XDP_DROP
    };
    let Some(header) = IcmpHeader::of(message, V4) else {
        return UNANSWERED;
    };
    let ip_len = if V4 { IPV4_LEN } else { IPV6_LEN };
    let outer_len = outer_len(message == message::TOO_BIG_ENCAPSULATED, V4);
    let quote_len = ip_len + QUOTED_L4_BYTES;
    let (data, end) = (ctx.data(), ctx.data_end());
    let inner = data + ETH_LEN + outer_len;
    if inner + quote_len > end {
        return UNANSWERED;
    }
    // SAFETY: inside the quote, checked just above.
    if V4 && !unsafe { ipv4_answerable(*(inner as *const u8), load16(inner + IPV4_FLAGS), message) }
    {
        return UNANSWERED;
    }

    // Cut the packet after the quote, then open the room the new IP and ICMP headers need in
    // front (an outer header, as long as the new IP header, gives all but the ICMP header's);
    // pointers are derived again after each move.
    let keep = ETH_LEN + outer_len + quote_len;
    let grow = ip_len + ICMP_HEADER_LEN - outer_len;
    // SAFETY: plain helper calls on this program's context.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, keep as i32 - (end - data) as i32) } != 0
        || unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0
    {
        return refused();
    }
    // Bounds proven again, with constant lengths (what the verifier can follow).
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + answer_len(ip_len, QUOTED_L4_BYTES) > end {
        return refused();
    }
    // SAFETY: every access is inside the answer's bytes, checked just above; the MAC addresses
    // are `grow` bytes further (inside them), where they were before the head moved.
    unsafe {
        if V4 {
            write_ipv4(data, data + grow, QUOTED_L4_BYTES, header);
        } else {
            write_ipv6(data, data + grow, QUOTED_L4_BYTES, header);
        }
    }
    count(sent(message));
    xdp_action::XDP_TX
}

/// The egress MTU `bpf_fib_lookup` reported with FRAG_NEEDED, in the per-CPU scratch space.
#[inline(always)]
pub fn link_mtu() -> Option<u16> {
    // SAFETY: a union of two u16, the helper's answer (the egress MTU) after FRAG_NEEDED.
    scratch().map(|s| unsafe { s.fib.__bindgen_anon_1.mtu_result })
}

/// Whether an IPv4 packet whose header begins with `version_ihl` and holds `flags` (the word at
/// `IPV4_FLAGS`, as loaded) is answered with `message`: no options, and for a too-big answer
/// "don't fragment" set (without it the sender lets the path fragment).
#[inline(always)]
pub fn ipv4_answerable(version_ihl: u8, flags: u16, message: u8) -> bool {
    version_ihl == 0x45
        && (!message::too_big(message) || flags & u16::to_be(field::IPV4_DONT_FRAGMENT) != 0)
}

/// The length of an answer, Ethernet header included, whose quote holds an IP header of `ip_len`
/// bytes and `quoted_l4` bytes after it.
#[inline(always)]
pub const fn answer_len(ip_len: usize, quoted_l4: usize) -> usize {
    ETH_LEN + ip_len + ICMP_HEADER_LEN + ip_len + quoted_l4
}

/// Writes an answer's headers in front of its quote (an IPv4 header and `quoted_l4` bytes at
/// `data + 42`): the Ethernet header from the one at `macs` with the addresses swapped, an IPv4
/// header from the quoted destination (the VIP) to its source (the client), and the ICMP
/// `header` ("fragmentation needed" announcing the MTU, "time exceeded"), checksums included.
///
/// # Safety
/// `data .. data + answer_len(IPV4_LEN, quoted_l4)` and `macs .. macs + 14` must be inside the
/// packet; `quoted_l4` even and constant.
#[inline(always)]
pub unsafe fn write_ipv4(data: usize, macs: usize, quoted_l4: usize, header: IcmpHeader) {
    let (ip, icmp) = (data + ETH_LEN, data + ETH_LEN + IPV4_LEN);
    unsafe {
        swap_macs(data, macs);
        write_ipv4_header(ip, icmp + ICMP_HEADER_LEN, quoted_l4);
        // A next-hop MTU is in the last 16 bits of the ICMP header's second word.
        write_icmp(icmp, header);
        let sum = sum_words(icmp, ICMP_HEADER_LEN + IPV4_LEN + quoted_l4);
        store16(icmp + 2, !checksum::fold(sum));
    }
}

/// [`write_ipv4`] for IPv6: an IPv6 header and the ICMPv6 `header` ("packet too big", "time
/// exceeded") in front of the quote (an IPv6 header and `quoted_l4` bytes at `data + 62`).
///
/// # Safety
/// `data .. data + answer_len(IPV6_LEN, quoted_l4)` and `macs .. macs + 14` must be inside the
/// packet; `quoted_l4` even and constant.
#[inline(always)]
pub unsafe fn write_ipv6(data: usize, macs: usize, quoted_l4: usize, header: IcmpHeader) {
    let (ip, icmp) = (data + ETH_LEN, data + ETH_LEN + IPV6_LEN);
    let icmp_len = ICMP_HEADER_LEN + IPV6_LEN + quoted_l4;
    unsafe {
        swap_macs(data, macs);
        write_ipv6_header(ip, icmp + ICMP_HEADER_LEN, quoted_l4);
        write_icmp(icmp, header);
        // The pseudo-header: both addresses, the ICMPv6 length and its next header.
        let pseudo = sum_words(ip + IPV6_SRC, 32)
            + u32::from(u16::to_be(icmp_len as u16))
            + u32::from(u16::to_be(PROTOCOL_ICMPV6 as u16));
        let sum = pseudo + sum_words(icmp, icmp_len);
        store16(icmp + 2, !checksum::fold(sum));
    }
}

/// Writes the Ethernet header at `data` from the one at `old` (`lb_xdp`: further, before the
/// room for the new headers opened; `lb_tc`: the same): destination and source swapped, the same
/// EtherType.
///
/// # Safety
/// `data .. data + 14` and `old .. old + 14` must be inside the packet.
#[inline(always)]
unsafe fn swap_macs(data: usize, old: usize) {
    unsafe {
        let (dst_hi, dst_lo) = (load32(old), load16(old + 4));
        let (src_hi, src_lo) = (load32(old + 6), load16(old + 10));
        let ethertype = load16(old + 12);
        store32(data, src_hi);
        store16(data + 4, src_lo);
        store32(data + 6, dst_hi);
        store16(data + 10, dst_lo);
        store16(data + 12, ethertype);
    }
}

/// An IPv4 header at `ip` from the quoted packet's destination (the VIP) to its source (the
/// client), carrying the ICMP message (a quote of `quoted_l4` bytes after its IPv4 header).
///
/// # Safety
/// `ip .. ip + 20` and the quoted IPv4 header at `quote` must be inside the packet.
#[inline(always)]
unsafe fn write_ipv4_header(ip: usize, quote: usize, quoted_l4: usize) {
    unsafe {
        let (vip, client) = (load32(quote + IPV4_DST), load32(quote + IPV4_SRC));
        let total = ((IPV4_LEN + ICMP_HEADER_LEN + IPV4_LEN + quoted_l4) as u16).to_be();
        let words = [
            u16::from_ne_bytes([0x45, 0]),
            total,
            0,
            0,
            u16::from_ne_bytes([ANSWER_TTL, PROTOCOL_ICMP]),
            0,
        ];
        for (i, word) in words.iter().enumerate() {
            store16(ip + 2 * i, *word);
        }
        store32(ip + IPV4_SRC, vip);
        store32(ip + IPV4_DST, client);
        store16(ip + 10, !checksum::fold(sum_words(ip, IPV4_LEN)));
    }
}

/// An IPv6 header at `ip` from the quoted packet's destination (the VIP) to its source (the
/// client), carrying the ICMPv6 message (a quote of `quoted_l4` bytes after its IPv6 header).
///
/// # Safety
/// `ip .. ip + 40` and the quoted IPv6 header at `quote` must be inside the packet.
#[inline(always)]
unsafe fn write_ipv6_header(ip: usize, quote: usize, quoted_l4: usize) {
    unsafe {
        store32(ip, u32::to_be(0x6000_0000));
        let payload = ((ICMP_HEADER_LEN + IPV6_LEN + quoted_l4) as u16).to_be();
        store16(ip + 4, payload);
        store16(ip + 6, u16::from_ne_bytes([PROTOCOL_ICMPV6, ANSWER_TTL]));
        for i in 0..4 {
            let (vip, client) = (
                load32(quote + IPV6_DST + 4 * i),
                load32(quote + IPV6_SRC + 4 * i),
            );
            store32(ip + IPV6_SRC + 4 * i, vip);
            store32(ip + IPV6_DST + 4 * i, client);
        }
    }
}

/// The ICMP header at `icmp`: `header`'s type, code and second word, a zero checksum (summed,
/// then written by the caller).
///
/// # Safety
/// `icmp .. icmp + 8` must be inside the packet.
#[inline(always)]
unsafe fn write_icmp(icmp: usize, header: IcmpHeader) {
    unsafe {
        store16(icmp, u16::from_ne_bytes([header.icmp_type, header.code]));
        store16(icmp + 2, 0);
        store32(icmp + 4, header.word.to_be());
    }
}

/// The one's-complement sum (unfolded) of the `len` bytes at `at`, `len` even and constant.
///
/// # Safety
/// `at .. at + len` must be inside the packet.
#[inline(always)]
pub unsafe fn sum_words(at: usize, len: usize) -> u32 {
    let mut sum = 0u32;
    for i in 0..len / 2 {
        // SAFETY: the caller's bounds. Volatile: LLVM would load every word first, then add
        // them, spilling most to the stack (lb_tc's chains have no room for that).
        sum += unsafe { core::ptr::read_volatile((at + 2 * i) as *const u16) } as u32;
    }
    sum
}
