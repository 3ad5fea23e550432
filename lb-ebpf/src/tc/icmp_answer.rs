//! `crate::icmp_answer`'s answers from `lb_tc`: a DSR IPIP skb that would not fit the link to its
//! backend once encapsulated, or a SNAT request that does not fit it (`tc::snat`, asked before its
//! translation), becomes, in place, "fragmentation needed" (IPv4 with DF, no options) / "packet
//! too big" (IPv6) from the VIP to the client, announcing the link's MTU (DSR IPIP: less the outer
//! header), back out of the interface it came in on (counted `icmp_too_big_sent`, as in `lb_xdp`).
//! A SNAT request whose TTL / hop limit would expire here becomes "time exceeded" the same way
//! (`icmp_time_exceeded_sent`), one whose backend cannot be reached "destination unreachable"
//! (`icmp_unreachable_sent`; `crate::icmp_answer::message`).
//!
//! `tc::dsr::encapsulate` asks the FIB before it encapsulates, with the MTU check on the
//! encapsulated length, so the skb is still the client's packet here: once `bpf_skb_adjust_room`
//! has marked an skb encapsulated, `bpf_skb_change_tail` refuses to cut it. The skb is cut after the
//! quote (`bpf_skb_change_tail`), room for the new IP and ICMP headers is opened between the
//! Ethernet header and the quote (`bpf_skb_adjust_room`, no encapsulation flags), `crate::icmp_answer`
//! writes them, and `bpf_redirect` sends the answer out of the ingress interface.
//!
//! GSO skbs (a local sender's burst, GRO's merge) are never answered: segmented on the way out,
//! TCP segments are made shorter by the outer header so that each fits (`tc::dsr`), and the FIB
//! check lets them through. A UDP GSO skb keeps its segment size, so its segments need the link's
//! headroom, as they did before.
//!
//! The skb's checksum state, which a program cannot read, shapes the quote:
//! - `CHECKSUM_COMPLETE` (a NIC's sum of the packet): the helpers keep the sum for what they cut
//!   and for the zeros they insert; what is written here is added with `bpf_csum_update`.
//! - `CHECKSUM_PARTIAL` (a local sender on a veth, or a VM's tap): the skb still asks for its
//!   transport checksum to be finished, over everything from the transport header (now in the
//!   quote) to the end, and the interface the answer leaves through (or its NIC) finishes it.
//!   So the quote holds 20 bytes of the transport header, its checksum field included (for such
//!   an skb `bpf_skb_change_tail` refuses to cut before it), and that field gets the value that
//!   finishing leaves as it is (`lb_common::checksum::completion_fixed_point`): the answer's bytes,
//!   and its ICMP checksum, are the same whether or not anything finishes it. The quoted checksum
//!   is then not the client's; nobody checks a quote's (it is cut short), the client's stack
//!   matches the quote to its socket by addresses and ports.
//!
//! So the quote is the IP header and the first 20 bytes after it, a transport header that must
//! follow it directly: IPv4 without options, IPv6 without extension headers. Other packets are
//! left as they are ([`UNANSWERED`]): DSR IPIP drops them (`drop_encap_too_big`), SNAT translates
//! them for the stack as before. So are packets shorter than the quote (a TCP header always
//! fills it; a UDP datagram needs 12 bytes of payload): only a packet too big for its link is sure
//! to be long enough, a request whose TTL would expire or backend cannot be reached may not be.

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, TC_ACT_SHOT},
    helpers::{bpf_csum_update, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use lb_common::{checksum, protocol, service::family};

use crate::{
    icmp_answer::{self, answer_len, IcmpHeader, ICMP_HEADER_LEN},
    maps::count,
    packet::{
        header::{ETH_LEN, IPV4_FLAGS, IPV4_LEN, IPV6_LEN, IPV6_NEXT_HEADER, TCP_CHECK, UDP_CHECK},
        load16, store16,
    },
};

/// What the quote holds after its IP header: a TCP header without options, or a UDP header and
/// 12 bytes of its payload; either way the transport checksum field (see the module's doc).
const QUOTED_L4_BYTES: usize = 20;

/// What [`answer`] returns for a packet it cannot answer and left as it was (nothing counted).
pub const UNANSWERED: i32 = i32::MIN;

/// Answers the client of the packet at `ctx`, a `protocol` packet of `family`, with `message`
/// (`crate::icmp_answer::message`): too big for the egress MTU (the FIB's answer in the per-CPU
/// scratch space) once encapsulated (DSR IPIP: the MTU announced is the link's less the outer
/// header) or as it is (a SNAT request, asked before its translation), or a SNAT request whose
/// TTL would expire or whose backend cannot be reached. Returns the verdict (counted `crate::icmp_answer::sent`), [`UNANSWERED`], or
/// `TC_ACT_SHOT` when a helper refused halfway (counted `crate::icmp_answer::refused`).
// A BPF function of its own, called from `tc::dsr::ipip` beside `tc::dsr::encapsulate`, and from
// `tc::snat::forward`.
#[inline(never)]
pub fn answer(ctx: &TcContext, family: u8, protocol: u8, message: u8) -> i32 {
    let v4 = family == family::IPV4;
    let Some(header) = IcmpHeader::of(message, v4) else {
        return UNANSWERED;
    };
    let ip_len = if v4 { IPV4_LEN } else { IPV6_LEN };
    let keep = ETH_LEN + ip_len + QUOTED_L4_BYTES;
    if (ctx.len() as usize) < keep || ctx.pull_data(keep as u32).is_err() {
        return UNANSWERED;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let ip = data + ETH_LEN;
    // SAFETY (both branches): reads inside the IP header, checked first.
    let answerable = if v4 {
        ip + IPV4_LEN <= end
            && unsafe {
                icmp_answer::ipv4_answerable(*(ip as *const u8), load16(ip + IPV4_FLAGS), message)
            }
    } else {
        ip + IPV6_LEN <= end && unsafe { *((ip + IPV6_NEXT_HEADER) as *const u8) } == protocol
    };
    if !answerable {
        return UNANSWERED;
    }

    // Cut the skb after the quote, then open the room for the new IP and ICMP headers in front
    // of it. The helpers move the data: pointers are derived again after them.
    // SAFETY: plain helper call on this program's context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, keep as u32, 0) } != 0
        || ctx
            .adjust_room((ip_len + ICMP_HEADER_LEN) as i32, BPF_ADJ_ROOM_MAC, 0)
            .is_err()
    {
        return refused(message);
    }
    let check_at = if protocol == protocol::TCP {
        TCP_CHECK
    } else {
        UDP_CHECK
    };
    // Bounds proven per family, with constant lengths (what the verifier can follow).
    let (data, end) = (ctx.data(), ctx.data_end());
    // SAFETY (both branches): every access is inside the answer's bytes, checked first; the
    // Ethernet header is where it was (the room opened behind it).
    let added = if v4 {
        if data + answer_len(IPV4_LEN, QUOTED_L4_BYTES) > end {
            return refused(message);
        }
        unsafe {
            let l4 = data + answer_len(IPV4_LEN, 0);
            let quote_changed = set_quoted_checksum(l4, check_at);
            icmp_answer::write_ipv4(data, data, QUOTED_L4_BYTES, header);
            quote_changed + icmp_answer::sum_words(data + ETH_LEN, IPV4_LEN + ICMP_HEADER_LEN)
        }
    } else {
        if data + answer_len(IPV6_LEN, QUOTED_L4_BYTES) > end {
            return refused(message);
        }
        unsafe {
            let l4 = data + answer_len(IPV6_LEN, 0);
            let quote_changed = set_quoted_checksum(l4, check_at);
            icmp_answer::write_ipv6(data, data, QUOTED_L4_BYTES, header);
            quote_changed + icmp_answer::sum_words(data + ETH_LEN, IPV6_LEN + ICMP_HEADER_LEN)
        }
    };
    // SAFETY: plain helper calls on this program's context. The new headers replaced zeros: the
    // packet's sum grows by theirs and by the quote's change (`CHECKSUM_COMPLETE`; else a no-op).
    unsafe {
        bpf_csum_update(ctx.skb.skb, checksum::fold(added) as u32);
        count(icmp_answer::sent(message));
        bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32
    }
}

/// Gives the quoted transport checksum at `l4 + check_at` the value finishing it leaves as it is
/// (see the module's doc); returns the change of the quote's sum.
///
/// # Safety
/// `l4 .. l4 + 20` must be inside the packet, `check_at` 6 or 16.
#[inline(always)]
unsafe fn set_quoted_checksum(l4: usize, check_at: usize) -> u32 {
    unsafe {
        let old = load16(l4 + check_at);
        // The sum of the rest: the whole less the field (plus its complement).
        let rest = icmp_answer::sum_words(l4, QUOTED_L4_BYTES) + u32::from(!old);
        let new = checksum::completion_fixed_point(rest);
        store16(l4 + check_at, new);
        u32::from(new) + u32::from(!old)
    }
}

/// The verdict of a packet a helper refused to turn into an answer that says `message` halfway:
/// dropped.
#[inline(always)]
fn refused(message: u8) -> i32 {
    count(icmp_answer::refused(message));
    TC_ACT_SHOT
}
