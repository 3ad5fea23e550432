//! Fragmented datagrams: the first fragment is balanced (or reply-translated) like any packet and how
//! it left is recorded in `FRAGMENTS` ([`track_first`]); later fragments, which have no ports, leave
//! the same way ([`forward`]), by the mode of their datagram's flow:
//! - DNAT (both ways): the first fragment's addresses, then the stack;
//! - SNAT (both ways): the first fragment's addresses, then the FIB's next hop with the TTL
//!   decremented, as the first fragment went (`snat::send`);
//! - DSR L2: unchanged, to the MAC of the first fragment's backend (`dsr::send_l2`);
//! - DSR IPIP: encapsulated towards the first fragment's backend, with its outer flow label
//!   (`dsr::encapsulate`). The outer header of a fragment is never a fragment itself.
//!
//! IPv4: the header checksum is updated for each changed address. The TCP/UDP checksum is only in the
//! first fragment and covers the whole datagram's pseudo-header, so the first fragment's rewrite
//! already fixed it; later fragments carry only payload. IPv6 has no header checksum.
//!
//! A later fragment without a live entry (the datagram's first fragment was not balanced, or has not
//! arrived yet, was lost, or its entry was evicted) is passed to the stack untouched, counted
//! `pass_fragment`: without ports the datapath cannot tell a VIP datagram from the node's own or
//! routed traffic, which must not be dropped. For a VIP datagram this is a loss (no socket on the
//! VIP reassembles it), as it would be without the datapath; the sender retransmits. Linux and
//! most stacks send fragments in order, so the first fragment is seen first.
//!
//! `lb_tc` uses [`track_first`], [`header_of`] and [`recorded`] too; `tc::fragments` sends later
//! fragments on an skb, with the same modes.

use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_ktime_get_coarse_ns, programs::XdpContext,
};
use lb_common::{
    checksum,
    conntrack::FlowKey,
    counters::Counter,
    fragments::{field, key_scope, limits, FragmentEntry, FragmentKey},
    modes::encap,
    service::{family, mode, Addr},
};

use crate::{
    context::PacketContext,
    maps::{count, scratch, FRAGMENTS},
    packet::{
        header::{
            ETH_LEN, IPV4_CHECK, IPV4_DST, IPV4_FLAGS, IPV4_ID, IPV4_LEN, IPV4_SRC, IPV6_DST,
            IPV6_LEN, IPV6_NEXT_HEADER, IPV6_SRC,
        },
        ipv6_extension_headers, load16, load_addr, store16, store32, store_addr6, Extent, Ipv6Walk,
    },
    xmit,
};

/// A fragment after the first of its datagram (its addresses are read from the packet).
pub struct Fragment {
    pub family: u8,
    /// IPv4: the protocol; IPv6: 0 (see `FragmentKey`).
    pub protocol: u8,
    /// Identification as on the wire, read natively.
    pub id: u32,
}

/// [`track_first`]'s `mode` recorded in `scope` (a `key_scope`, for the split programs of a
/// client's workload veth): `record` takes five arguments, the most a BPF function can, so the
/// scope rides in the mode's top bits.
#[inline(always)]
pub const fn in_scope(mode: u8, scope: u8) -> u8 {
    mode | scope << SCOPE_SHIFT
}

const SCOPE_SHIFT: u8 = 6;

/// If the packet of the flow `arrived` (as it arrived: before any rewrite) is the first fragment of
/// a datagram, records how it leaves for the rest of the datagram ([`record`]): by `mode`, to `src`
/// and `dst`, each `None` for the address the packet carries now (after its rewrite). Called after
/// an address rewrite, before an encapsulation (which moves the header).
#[inline(always)]
pub fn track_first<C: PacketContext>(
    ctx: &C,
    arrived: &FlowKey,
    mode: u8,
    src: Option<&Addr>,
    dst: Option<&Addr>,
) {
    if maybe_first(ctx, arrived) {
        record(ctx, arrived, mode, src, dst);
    }
}

/// Whether the packet of the flow `key` may be the first fragment of a datagram, told from its
/// header (read afresh from `ctx`: callers are BPF functions that cannot use the parser's packet
/// pointers): IPv4 "more fragments" (a flow is never a later fragment), or IPv6 with anything but
/// the L4 header after the fixed one ([`record`] walks the headers to be sure).
#[inline(always)]
fn maybe_first<C: PacketContext>(ctx: &C, key: &FlowKey) -> bool {
    let l3 = ctx.data() + ETH_LEN;
    if l3 + 8 > ctx.data_end() {
        return false;
    }
    // SAFETY: bounds checked just above.
    unsafe {
        if key.family == family::IPV4 {
            load16(l3 + IPV4_FLAGS) & u16::to_be(field::IPV4_MORE_FRAGMENTS) != 0
        } else {
            *((l3 + IPV6_NEXT_HEADER) as *const u8) != key.protocol
        }
    }
}

/// Records how a first fragment leaves (see [`track_first`]) for its datagram, keyed by the
/// addresses it `arrived` with. A separate BPF function, its key and entry in per-CPU scratch
/// space, so that it adds little to its callers' stack; the packet is read afresh here (`lb_tc`'s
/// rewrites move the skb's data).
#[inline(never)]
fn record<C: PacketContext>(
    ctx: &C,
    arrived: &FlowKey,
    mode: u8,
    src: Option<&Addr>,
    dst: Option<&Addr>,
) {
    let packet = Extent::of(ctx);
    let l3 = packet.start + ETH_LEN;
    let v4 = arrived.family == family::IPV4;
    if l3 + if v4 { IPV4_LEN } else { IPV6_LEN } > packet.end {
        return;
    }
    let id = if v4 {
        // SAFETY: bounds checked just above.
        unsafe { load16(l3 + IPV4_ID) as u32 }
    } else {
        let walk = ipv6_extension_headers(ctx, unsafe { *((l3 + IPV6_NEXT_HEADER) as *const u8) });
        match walk.first_fragment() {
            Some(id) if walk.outcome() == Ipv6Walk::UPPER_LAYER => id,
            _ => return,
        }
    };
    // Key and entry in per-CPU scratch space: this frame is one below each mode's.
    let Some(scratch) = scratch() else {
        return;
    };
    let entry = &mut scratch.fragment;
    // SAFETY: bounds checked just above.
    unsafe {
        entry.src = match src {
            Some(src) => *src,
            None => load_addr(l3 + if v4 { IPV4_SRC } else { IPV6_SRC }, v4),
        };
        entry.dst = match dst {
            Some(dst) => *dst,
            None => load_addr(l3 + if v4 { IPV4_DST } else { IPV6_DST }, v4),
        };
        entry.first_seen_ns = bpf_ktime_get_coarse_ns();
    }
    entry.label = if mode == mode::DSR_IPIP && !v4 {
        encap::flow_label(arrived)
    } else {
        0
    };
    entry.mode = mode & ((1 << SCOPE_SHIFT) - 1);
    entry._pad = [0; 3];
    let key = &mut scratch.fragment_key;
    *key = FragmentKey::new(
        arrived.family,
        arrived.src,
        arrived.dst,
        id,
        arrived.protocol,
    );
    key.scope = mode >> SCOPE_SHIFT;
    // An LRU insert evicts the least recently used entry when full; failing only under memory
    // pressure, it then leaves the later fragments to the stack (counted there).
    let _ = FRAGMENTS.insert(&*key, &*entry, 0);
    count(Counter::FragmentTracked);
}

/// The start of a later fragment's IP header, if its fixed header is inside the packet (else the
/// fragment is malformed).
#[inline(always)]
pub fn header_of<C: PacketContext>(ctx: &C, fragment: &Fragment) -> Option<usize> {
    let packet = Extent::of(ctx);
    let l3 = packet.start + ETH_LEN;
    let len = if fragment.family == family::IPV4 {
        IPV4_LEN
    } else {
        IPV6_LEN
    };
    (l3 + len <= packet.end).then_some(l3)
}

/// The addresses the later `fragment` (IP header at `l3`) carries, and the entry its datagram's
/// first fragment recorded in the caller's `scope` (`key_scope`); `None`
/// without a live entry (the fragment goes on untouched).
///
/// # Safety
/// `l3` must come from [`header_of`] for this packet: its fixed header is inside the packet.
#[inline(always)]
pub unsafe fn recorded(
    l3: usize,
    fragment: &Fragment,
    scope: u8,
) -> Option<((Addr, Addr), FragmentEntry)> {
    let v4 = fragment.family == family::IPV4;
    // SAFETY: the caller's bounds check.
    let (src, dst) = unsafe {
        (
            load_addr(l3 + if v4 { IPV4_SRC } else { IPV6_SRC }, v4),
            load_addr(l3 + if v4 { IPV4_DST } else { IPV6_DST }, v4),
        )
    };
    let mut key = FragmentKey::new(fragment.family, src, dst, fragment.id, fragment.protocol);
    key.scope = scope;
    // SAFETY: plain integers, copied out at once.
    let entry = (unsafe { FRAGMENTS.get(&key) }).copied()?;
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    (now.wrapping_sub(entry.first_seen_ns) <= limits::TIMEOUT_NS).then_some(((src, dst), entry))
}

/// A later fragment: leaves as its datagram's first fragment did (see the module's doc), or goes
/// to the stack untouched.
#[inline(never)]
pub fn forward(ctx: &XdpContext, fragment: &Fragment) -> u32 {
    let Some(l3) = header_of(ctx, fragment) else {
        count(Counter::DropMalformed);
        return xdp_action::XDP_DROP;
    };
    // SAFETY: `l3` from `header_of`.
    let Some(((src, dst), entry)) = (unsafe { recorded(l3, fragment, key_scope::NODE) }) else {
        count(Counter::PassFragment);
        return xdp_action::XDP_PASS;
    };
    count(Counter::ForwardFragment);
    let (family, protocol) = (fragment.family, fragment.protocol);
    if entry.mode == mode::DNAT || entry.mode == mode::SNAT {
        // SAFETY: inside the header checked above.
        unsafe { rewrite(l3, family, (&src, &dst), &entry) };
    }
    xmit::leave(ctx, family, protocol, &entry)
}

/// The fragment's addresses (`old`, its IP header at `l3`) become the entry's.
///
/// # Safety
/// The fixed IP header at `l3` must be inside the packet.
#[inline(always)]
unsafe fn rewrite(l3: usize, family: u8, (src, dst): (&Addr, &Addr), entry: &FragmentEntry) {
    // SAFETY: the caller's bounds.
    unsafe {
        if family == family::IPV4 {
            let mut check = load16(l3 + IPV4_CHECK);
            for (field, old, new) in [
                (IPV4_SRC, src.0[0], entry.src.0[0]),
                (IPV4_DST, dst.0[0], entry.dst.0[0]),
            ] {
                if old != new {
                    store32(l3 + field, new);
                    check = checksum::replace_u32(check, old, new);
                }
            }
            store16(l3 + IPV4_CHECK, check);
        } else {
            if *src != entry.src {
                store_addr6(l3 + IPV6_SRC, &entry.src);
            }
            if *dst != entry.dst {
                store_addr6(l3 + IPV6_DST, &entry.dst);
            }
        }
    }
}
