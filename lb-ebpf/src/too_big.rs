//! "Fragmentation needed" / "packet too big" for packets that do not fit the link to their backend:
//! DSR IPIP packets once encapsulated (as Katran answers its own too-big packets), and SNAT
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
//! link's MTU announced as it is.
//!
//! - IPv4: only for a packet with "don't fragment" set, whose header has no options (a 28-byte
//!   quote); others are left as they are ([`UNANSWERED`]): DSR IPIP drops them as before
//!   (`drop_encap_too_big`: without DF a sender expects the path to fragment, and the outer
//!   packet is never fragmented here), SNAT hands them translated to the stack, which fragments.
//! - IPv6: ICMPv6 "packet too big" (a 48-byte quote, the fixed header and 8 bytes). An announced
//!   MTU below 1280 means a link to backends without IPv6's minimum headroom; the client's stack
//!   then keeps 1280 and its packets stay too big, as they would on any such path.
//! - No rate limit: every answer is smaller than the packet it answers.
//! - `lb_tc` answers single skbs the same way (`tc::too_big`, sharing the headers written here),
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
};

/// The ICMP and ICMPv6 header: type, code, checksum, then 4 bytes (unused and MTU / MTU).
pub const ICMP_HEADER_LEN: usize = 8;
/// What follows the quoted IP header in `lb_xdp`'s quote (`tc::too_big` quotes more).
const QUOTED_L4_BYTES: usize = 8;
/// ICMP destination unreachable, code fragmentation needed; ICMPv6 packet too big.
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_FRAGMENTATION_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// TTL / hop limit of the answer.
const ANSWER_TTL: u8 = 64;

/// What [`answer`] (and `tc::too_big::answer`, as an `i32`) returns for a packet it cannot answer
/// and left as it was (nothing counted): the caller settles it as it did before answers.
pub const UNANSWERED: u32 = u32::MAX;

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

/// Answers the client of the packet at `ctx`, a packet of `family` found too big for the egress
/// MTU (the FIB's answer in the per-CPU scratch space): `encapsulated`, behind the outer header
/// `dsr::encapsulate` put in front of it, else as it came (a SNAT request). Returns `XDP_TX`
/// (counted `icmp_too_big_sent`), [`UNANSWERED`], or `XDP_DROP` when a helper refused halfway
/// (counted `drop_encap_too_big`).
// A BPF function of its own, called from `dsr::ipip` and `snat::forward`: the packet moves under it.
#[inline(never)]
pub fn answer(ctx: &XdpContext, family: u8, encapsulated: bool) -> u32 {
    if family == family::IPV4 {
        answer_family::<true>(ctx, encapsulated)
    } else {
        answer_family::<false>(ctx, encapsulated)
    }
}

/// [`answer`] for one family (`V4`): every length a constant of the branch it is used in, which
/// the verifier follows (lengths chosen once and used after another test of the family are not).
#[inline(always)]
fn answer_family<const V4: bool>(ctx: &XdpContext, encapsulated: bool) -> u32 {
    let refused = || {
        count(Counter::DropEncapTooBig);
        xdp_action::XDP_DROP
    };
    let Some(link_mtu) = link_mtu() else {
        return UNANSWERED;
    };
    let ip_len = if V4 { IPV4_LEN } else { IPV6_LEN };
    let outer_len = outer_len(encapsulated, V4);
    let mtu = link_mtu.saturating_sub(outer_len as u16);
    let quote_len = ip_len + QUOTED_L4_BYTES;
    let (data, end) = (ctx.data(), ctx.data_end());
    let inner = data + ETH_LEN + outer_len;
    if inner + quote_len > end {
        return UNANSWERED;
    }
    // SAFETY: inside the quote, checked just above.
    if V4 && !unsafe { ipv4_answerable(*(inner as *const u8), load16(inner + IPV4_FLAGS)) } {
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
            write_ipv4(data, data + grow, QUOTED_L4_BYTES, mtu);
        } else {
            write_ipv6(data, data + grow, QUOTED_L4_BYTES, mtu);
        }
    }
    count(Counter::IcmpTooBigSent);
    xdp_action::XDP_TX
}

/// The egress MTU `bpf_fib_lookup` reported with FRAG_NEEDED, in the per-CPU scratch space.
#[inline(always)]
pub fn link_mtu() -> Option<u16> {
    // SAFETY: a union of two u16, the helper's answer (the egress MTU) after FRAG_NEEDED.
    scratch().map(|s| unsafe { s.fib.__bindgen_anon_1.mtu_result })
}

/// Whether an IPv4 packet whose header begins with `version_ihl` and holds `flags` (the word at
/// `IPV4_FLAGS`, as loaded) is answered: "don't fragment" set, no options.
#[inline(always)]
pub fn ipv4_answerable(version_ihl: u8, flags: u16) -> bool {
    version_ihl == 0x45 && flags & u16::to_be(field::IPV4_DONT_FRAGMENT) != 0
}

/// The length of an answer, Ethernet header included, whose quote holds an IP header of `ip_len`
/// bytes and `quoted_l4` bytes after it.
#[inline(always)]
pub const fn answer_len(ip_len: usize, quoted_l4: usize) -> usize {
    ETH_LEN + ip_len + ICMP_HEADER_LEN + ip_len + quoted_l4
}

/// Writes an answer's headers in front of its quote (an IPv4 header and `quoted_l4` bytes at
/// `data + 42`): the Ethernet header from the one at `macs` with the addresses swapped, an IPv4
/// header from the quoted destination (the VIP) to its source (the client), and "fragmentation
/// needed" announcing `mtu`, checksums included.
///
/// # Safety
/// `data .. data + answer_len(IPV4_LEN, quoted_l4)` and `macs .. macs + 14` must be inside the
/// packet; `quoted_l4` even and constant.
#[inline(always)]
pub unsafe fn write_ipv4(data: usize, macs: usize, quoted_l4: usize, mtu: u16) {
    let (ip, icmp) = (data + ETH_LEN, data + ETH_LEN + IPV4_LEN);
    unsafe {
        swap_macs(data, macs);
        write_ipv4_header(ip, icmp + ICMP_HEADER_LEN, quoted_l4);
        // The next-hop MTU in the last 16 bits of the ICMP header's second word.
        write_icmp(
            icmp,
            ICMP_UNREACHABLE,
            ICMP_FRAGMENTATION_NEEDED,
            mtu as u32,
        );
        let sum = sum_words(icmp, ICMP_HEADER_LEN + IPV4_LEN + quoted_l4);
        store16(icmp + 2, !checksum::fold(sum));
    }
}

/// [`write_ipv4`] for IPv6: an IPv6 header and ICMPv6 "packet too big" in front of the quote (an
/// IPv6 header and `quoted_l4` bytes at `data + 62`).
///
/// # Safety
/// `data .. data + answer_len(IPV6_LEN, quoted_l4)` and `macs .. macs + 14` must be inside the
/// packet; `quoted_l4` even and constant.
#[inline(always)]
pub unsafe fn write_ipv6(data: usize, macs: usize, quoted_l4: usize, mtu: u16) {
    let (ip, icmp) = (data + ETH_LEN, data + ETH_LEN + IPV6_LEN);
    let icmp_len = ICMP_HEADER_LEN + IPV6_LEN + quoted_l4;
    unsafe {
        swap_macs(data, macs);
        write_ipv6_header(ip, icmp + ICMP_HEADER_LEN, quoted_l4);
        write_icmp(icmp, ICMPV6_PACKET_TOO_BIG, 0, mtu as u32);
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

/// The ICMP header at `icmp`: `icmp_type`, `code`, a zero checksum (summed, then written by the
/// caller) and `mtu` in the second word (IPv4: its low 16 bits, the high ones unused).
///
/// # Safety
/// `icmp .. icmp + 8` must be inside the packet.
#[inline(always)]
unsafe fn write_icmp(icmp: usize, icmp_type: u8, code: u8, mtu: u32) {
    unsafe {
        store16(icmp, u16::from_ne_bytes([icmp_type, code]));
        store16(icmp + 2, 0);
        store32(icmp + 4, mtu.to_be());
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
