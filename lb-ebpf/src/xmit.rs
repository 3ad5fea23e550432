//! Next hop without the stack: `bpf_fib_lookup` finds the egress interface and the MAC addresses, the
//! Ethernet header is rewritten, and the packet leaves by `XDP_TX` (same interface) or `bpf_redirect`
//! (another one). Used by SNAT (both directions), DSR L2 and DSR IPIP; DNAT stays on `XDP_PASS`.
//! `tc::xmit` is the same on an skb: it shares the query ([`fib_query`]), the reading of the answer
//! ([`unsendable`]) and what each mode does with a packet it cannot send ([`Unsent`]).
//!
//! The lookup runs as the kernel's forwarding path would for a packet received on the ingress
//! interface: forwarding must be enabled on it (`net.ipv4.ip_forward`, `net.ipv6.conf.*.forwarding`)
//! and FIB rules apply. What happens when it fails is the caller's choice (see [`Xmit`]).
//!
//! For `bpf_redirect` into a veth, the peer must run an XDP program (or have GRO on); real NICs need
//! nothing. Ethernet without VLAN tags is assumed, as in `packet.rs`.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_BLACKHOLE,
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_PROHIBIT,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LKUP_RET_UNREACHABLE,
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{
    checksum,
    counters::Counter,
    fragments::FragmentEntry,
    service::{family, mode, Addr},
};

use crate::{
    dsr,
    maps::{count, scratch},
    packet::{
        header::{
            ETH_LEN, IPV4_CHECK, IPV4_LEN, IPV4_TOTAL_LEN, IPV4_TTL, IPV6_HOP_LIMIT, IPV6_LEN,
            IPV6_PAYLOAD_LEN,
        },
        load16, store16,
    },
    snat,
};

/// Address families of `bpf_fib_lookup`.
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Options of [`fib_xmit`].
pub mod opts {
    /// The destination must be on-link (no gateway): DSR L2 rewrites only the MAC, so the next hop
    /// must be the backend itself.
    pub const ON_LINK_ONLY: u8 = 1 << 0;
    /// Decrement the IPv4 TTL / IPv6 hop limit as a router does (SNAT); a packet that would expire
    /// is not sent (`Xmit::Expiring`).
    pub const DECREMENT_TTL: u8 = 1 << 1;
}

/// Outcome of [`fib_xmit`].
pub enum Xmit {
    /// Ethernet header rewritten; return this action (`XDP_TX` or `XDP_REDIRECT`; `lb_tc`:
    /// `TC_ACT_REDIRECT`). Counted.
    Sent(u32),
    /// Route found, next hop's MAC not known (yet). Nothing rewritten.
    NoNeigh,
    /// The packet is larger than the egress MTU. Nothing rewritten.
    TooBig,
    /// [`opts::ON_LINK_ONLY`] and the route goes through a gateway. Nothing rewritten.
    NotOnLink,
    /// No usable route (no route at all, forwarding disabled, not a unicast route). Nothing
    /// rewritten.
    NoRoute,
    /// The route says the destination cannot be reached: an unreachable, blackhole or prohibit
    /// route. Nothing rewritten.
    Unreachable,
    /// [`opts::DECREMENT_TTL`] and a TTL / hop limit that would expire (1 or 0). Nothing
    /// rewritten, the FIB not asked.
    Expiring,
}

/// The `bpf_fib_lookup` query for a packet from `src` to `dst` received on `ifindex`, in per-CPU
/// scratch space (64 bytes the stack cannot spare). `tot_len` is the IP length for the MTU check
/// (0 skips it). `None` if the scratch slot is unavailable.
#[inline(always)]
pub fn fib_query(
    v4: bool,
    l4_protocol: u8,
    tot_len: u16,
    ifindex: u32,
    src: &Addr,
    dst: &Addr,
) -> Option<&'static mut FibParams> {
    let params = &mut scratch()?.fib;
    // An all-zero bpf_fib_lookup is valid input (no mark, no table id, no VLAN). Volatile 8-byte
    // stores: LLVM would turn a plain loop or `write_bytes` into a call to a byte-wise `memset`.
    let words = params as *mut FibParams as *mut u64;
    for i in 0..core::mem::size_of::<FibParams>() / 8 {
        // SAFETY: inside the 64-byte struct, 8-byte aligned (map values are).
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    params.family = if v4 { AF_INET } else { AF_INET6 };
    params.l4_protocol = l4_protocol;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ifindex;
    if v4 {
        params.__bindgen_anon_3.ipv4_src = src.0[0];
        params.__bindgen_anon_4.ipv4_dst = dst.0[0];
    } else {
        params.__bindgen_anon_3.ipv6_src = src.0;
        params.__bindgen_anon_4.ipv6_dst = dst.0;
    }
    Some(params)
}

/// Routes the packet at `ctx` (an IP packet of `family` behind a 14-byte Ethernet header) from `src`
/// to `dst`. `tot_len` is its IP length for the MTU check (0 skips the check).
#[inline(always)]
pub fn fib_xmit(
    ctx: &XdpContext,
    family: u8,
    l4_protocol: u8,
    src: &Addr,
    dst: &Addr,
    tot_len: u16,
    options: u8,
) -> Xmit {
    match fib_route(ctx, family, l4_protocol, src, dst, tot_len, options) {
        Ok(params) => fib_send(ctx, family, params, options),
        Err(unsent) => unsent,
    }
}

/// The first half of [`fib_xmit`]: asks the FIB for the next hop of the packet at `ctx` (as it
/// will be: SNAT asks before it translates, to answer a packet too big as it came); `Ok` with the
/// FIB's answer (in the per-CPU scratch space) when it can be sent. Nothing is written.
#[inline(always)]
pub fn fib_route(
    ctx: &XdpContext,
    family: u8,
    l4_protocol: u8,
    src: &Addr,
    dst: &Addr,
    tot_len: u16,
    options: u8,
) -> Result<&'static FibParams, Xmit> {
    let v4 = family == family::IPV4;
    let l3 = ctx.data() + ETH_LEN;
    if options & opts::DECREMENT_TTL != 0 {
        let ttl_at = l3 + if v4 { IPV4_TTL } else { IPV6_HOP_LIMIT };
        if ttl_at + 1 > ctx.data_end() {
            return Err(Xmit::NoRoute);
        }
        // SAFETY: bounds checked just above.
        if unsafe { *(ttl_at as *const u8) } <= 1 {
            return Err(Xmit::Expiring);
        }
    }

    let Some(params) = fib_query(
        v4,
        l4_protocol,
        tot_len,
        ctx.ingress_ifindex() as u32,
        src,
        dst,
    ) else {
        return Err(Xmit::NoRoute);
    };
    // SAFETY: params is a valid, fully sized struct.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    } as u32;
    match unsendable(rc, params, v4, dst, options) {
        Some(unsent) => Err(unsent),
        None => Ok(params),
    }
}

/// The second half of [`fib_xmit`]: sends the packet at `ctx` to the next hop [`fib_route`] found
/// (`params`), the TTL decremented if `options` say so, the MACs written.
#[inline(always)]
pub fn fib_send(ctx: &XdpContext, family: u8, params: &FibParams, options: u8) -> Xmit {
    let v4 = family == family::IPV4;
    let data = ctx.data();
    if data + ETH_LEN + if v4 { IPV4_LEN } else { IPV6_LEN } > ctx.data_end() {
        return Xmit::NoRoute;
    }
    // SAFETY: the Ethernet header and the fixed IP header were bounds-checked just above.
    unsafe {
        if options & opts::DECREMENT_TTL != 0 {
            let l3 = data + ETH_LEN;
            if v4 {
                // TTL and protocol form one 16-bit word of the header checksum.
                let word = load16(l3 + IPV4_TTL);
                let mut bytes = word.to_ne_bytes();
                bytes[0] = bytes[0].wrapping_sub(1);
                let new = u16::from_ne_bytes(bytes);
                store16(l3 + IPV4_TTL, new);
                let check = load16(l3 + IPV4_CHECK);
                store16(l3 + IPV4_CHECK, checksum::replace_u16(check, word, new));
            } else {
                let hop_limit = (l3 + IPV6_HOP_LIMIT) as *mut u8;
                *hop_limit = (*hop_limit).wrapping_sub(1);
            }
        }
        write_mac(data, &params.dmac);
        write_mac(data + 6, &params.smac);
    }
    if params.ifindex == ctx.ingress_ifindex() as u32 {
        count(Counter::XmitTx);
        Xmit::Sent(xdp_action::XDP_TX)
    } else {
        count(Counter::XmitRedirect);
        // SAFETY: plain helper call; returns XDP_REDIRECT, or XDP_ABORTED on bad flags.
        Xmit::Sent(unsafe { bpf_redirect(params.ifindex, 0) } as u32)
    }
}

/// Keeps `route`, what [`fib_route`] (or `tc::xmit::route`) found for a packet about to change,
/// in the per-CPU scratch space, for [`kept_route`] after the change. Volatile: kept in a register
/// instead, each outcome would be followed separately through the change by the verifier, which
/// `lb_xdp` cannot afford (its million instructions).
#[inline(always)]
pub fn keep_route(route: &Result<&'static FibParams, Xmit>) {
    let code = match route {
        Ok(_) => 0,
        Err(Xmit::NoNeigh) => 1,
        Err(Xmit::TooBig) => 2,
        Err(Xmit::NotOnLink) => 3,
        Err(_) => 4,
    };
    if let Some(s) = scratch() {
        // SAFETY: a plain integer of this CPU's scratch space.
        unsafe { core::ptr::write_volatile(&mut s.route, code) };
    }
}

/// What [`keep_route`] kept: the FIB's answer (in the scratch space still) or why not.
#[inline(always)]
pub fn kept_route() -> Result<&'static FibParams, Xmit> {
    let Some(s) = scratch() else {
        return Err(Xmit::NoRoute);
    };
    // SAFETY: a plain integer of this CPU's scratch space.
    match unsafe { core::ptr::read_volatile(&s.route) } {
        0 => Ok(&s.fib),
        1 => Err(Xmit::NoNeigh),
        2 => Err(Xmit::TooBig),
        3 => Err(Xmit::NotOnLink),
        _ => Err(Xmit::NoRoute),
    }
}

/// Why the answer `rc` of `bpf_fib_lookup` on `params` (a query for `dst`) does not let the
/// packet go out, or `None` if it does (the MACs and egress interface are in `params`). Shared by
/// `lb_xdp` ([`fib_xmit`]) and `lb_tc` (`tc::xmit`).
#[inline(always)]
pub fn unsendable(rc: u32, params: &FibParams, v4: bool, dst: &Addr, options: u8) -> Option<Xmit> {
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        return Some(Xmit::TooBig);
    }
    if rc == BPF_FIB_LKUP_RET_UNREACHABLE
        || rc == BPF_FIB_LKUP_RET_BLACKHOLE
        || rc == BPF_FIB_LKUP_RET_PROHIBIT
    {
        return Some(Xmit::Unreachable);
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return Some(Xmit::NoRoute);
    }
    // The lookup replaces the destination by the gateway when there is one.
    if options & opts::ON_LINK_ONLY != 0 {
        // SAFETY: union fields of plain integers, written by the helper for this family.
        let next_hop_is_dst = unsafe {
            if v4 {
                params.__bindgen_anon_4.ipv4_dst == dst.0[0]
            } else {
                params.__bindgen_anon_4.ipv6_dst == dst.0
            }
        };
        if !next_hop_is_dst {
            return Some(Xmit::NotOnLink);
        }
    }
    (rc == BPF_FIB_LKUP_RET_NO_NEIGH).then_some(Xmit::NoNeigh)
}

/// What becomes of a packet [`fib_xmit`] (or `tc::xmit`) did not send, by forwarding mode: the
/// counter that says why, and whether the stack may have it. One table for both programs.
pub enum Unsent {
    /// The finished packet goes to the stack, which resolves, routes or answers with ICMP.
    Pass(Counter),
    Drop(Counter),
}

impl Unsent {
    /// A translated packet (SNAT both ways, DNAT on `lb_tc`): the stack can route it.
    #[inline(always)]
    pub fn translated(unsent: Xmit) -> Self {
        match unsent {
            Xmit::NoNeigh => Unsent::Pass(Counter::PassFibNoNeigh),
            _ => Unsent::Pass(Counter::PassFibFailed),
        }
    }

    /// DSR L2: the unchanged packet is addressed to the VIP, which the stack would route back or
    /// answer itself: never passed.
    #[inline(always)]
    pub fn dsr_l2(unsent: Xmit) -> Self {
        Unsent::Drop(match unsent {
            Xmit::NoNeigh => Counter::DropDsrNoNeigh,
            Xmit::NotOnLink => Counter::DropDsrNotOnLink,
            _ => Counter::DropDsrNoRoute,
        })
    }

    /// DSR IPIP: the encapsulated packet is routable, unless it is too big (the stack would
    /// fragment the outer packet or answer nobody useful).
    #[inline(always)]
    pub fn dsr_ipip(unsent: Xmit) -> Self {
        match unsent {
            Xmit::TooBig => Unsent::Drop(Counter::DropEncapTooBig),
            Xmit::NoNeigh => Unsent::Pass(Counter::PassFibNoNeigh),
            _ => Unsent::Pass(Counter::PassFibFailed),
        }
    }

    /// The XDP action, counted.
    #[inline(always)]
    pub fn xdp_action(self) -> u32 {
        match self {
            Unsent::Pass(reason) => {
                count(reason);
                xdp_action::XDP_PASS
            }
            Unsent::Drop(reason) => {
                count(reason);
                xdp_action::XDP_DROP
            }
        }
    }
}

/// The IP length of the packet at `ctx` (header included), from its header; 0 if unreadable.
#[inline(always)]
pub fn ip_len(ctx: &XdpContext, family: u8) -> u16 {
    let l3 = ctx.data() + ETH_LEN;
    if l3 + 8 > ctx.data_end() {
        return 0;
    }
    // SAFETY: bounds checked just above (both length fields are in the first 8 bytes).
    unsafe {
        if family == family::IPV4 {
            u16::from_be(load16(l3 + IPV4_TOTAL_LEN))
        } else {
            u16::from_be(load16(l3 + IPV6_PAYLOAD_LEN)).wrapping_add(IPV6_LEN as u16)
        }
    }
}

/// # Safety
/// `at .. at + 6` must be inside the packet.
#[inline(always)]
unsafe fn write_mac(at: usize, mac: &[u8; 6]) {
    unsafe {
        core::ptr::write_unaligned(
            at as *mut u32,
            u32::from_ne_bytes([mac[0], mac[1], mac[2], mac[3]]),
        );
        core::ptr::write_unaligned((at + 4) as *mut u16, u16::from_ne_bytes([mac[4], mac[5]]));
    }
}

/// Sends the packet (an IP packet of `family`, `protocol` inside, rewritten already) the way its
/// flow's packets leave, as `how` records it: SNAT to the FIB's next hop with the TTL decremented,
/// DSR L2 unchanged to the backend's MAC, DSR IPIP encapsulated towards the backend; DNAT to the
/// stack. Later fragments (`fragments::forward`) and ICMP errors (`icmp::departure`) of SNAT and
/// DSR flows.
#[inline(always)]
pub fn leave(ctx: &XdpContext, family: u8, protocol: u8, how: &FragmentEntry) -> u32 {
    match how.mode {
        mode::SNAT => snat::send(ctx, family, protocol, &how.src, &how.dst),
        mode::DSR_L2 => dsr::send_l2(ctx, family, protocol, &how.src, &how.dst),
        mode::DSR_IPIP => dsr::encapsulate_or_drop(ctx, family, &how.src, &how.dst, how.label),
        _ => xdp_action::XDP_PASS,
    }
}
