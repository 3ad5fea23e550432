//! The next hop of a rewritten packet without the stack's forwarding path: `bpf_fib_lookup` gives
//! the egress interface and the MAC addresses, and `bpf_redirect` hands the skb to that interface's
//! transmit path (no second routing decision, no netfilter hooks, no `ip_forward`). What the
//! lookup cannot settle (no neighbour entry yet, no route, forwarding disabled, too big for the
//! egress MTU) each mode settles as in `lb_xdp` (`crate::xmit::Unsent`): a translated packet goes
//! to the stack with `TC_ACT_OK`, counted, and the stack does what it always does.
//!
//! The skb counterpart of `crate::xmit::fib_xmit`, sharing its query and the reading of the answer.
//! Like a NAT device and unlike a router, DNAT does not decrement the TTL / hop limit; SNAT does,
//! as in `lb_xdp` ([`opts::DECREMENT_TTL`]).

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::TcContext,
    EbpfContext,
};
use lb_common::{
    counters::Counter,
    fragments::FragmentEntry,
    service::{family, mode, Addr},
};

use super::{dsr, snat};
use crate::{
    maps::{count, scratch},
    packet::{
        header::{ETH_LEN, IPV4_CHECK, IPV4_TTL, IPV6_HOP_LIMIT},
        Flow,
    },
    xmit::{fib_query, opts, unsendable, Unsent, Xmit},
};

/// Sends a DNAT packet (already rewritten: `flow` holds its addresses before the rewrite, `src`
/// and `dst` after it) towards `dst`; returns the verdict.
///
/// A separate BPF function: the FIB query stays off its callers' stack frames (see
/// `tc::to_backend`).
#[inline(never)]
pub fn forward(ctx: &TcContext, flow: &Flow, src: &Addr, dst: &Addr) -> i32 {
    let v4 = flow.key.family == family::IPV4;
    match fib_redirect(ctx, v4, flow.key.protocol, src, dst, 0, 0) {
        Xmit::Sent(action) => action as i32,
        unsent => verdict(Unsent::translated(unsent)),
    }
}

/// The TC verdict of a packet the fast path did not send, counted.
#[inline(always)]
pub fn verdict(unsent: Unsent) -> i32 {
    match unsent {
        Unsent::Pass(reason) => {
            count(reason);
            TC_ACT_OK
        }
        Unsent::Drop(reason) => {
            count(reason);
            TC_ACT_SHOT
        }
    }
}

/// Routes the packet (an IP packet of the family `v4` says, behind a 14-byte Ethernet header) from
/// `src` to `dst` (`l4_protocol`: what the IP header carries): on success, the MACs are written and
/// the verdict is `TC_ACT_REDIRECT` (`Xmit::Sent`, counted `xmit_redirect`, or `xmit_tx` when the
/// egress is the interface it came in on). `options` as for `crate::xmit::fib_xmit`; with
/// `DECREMENT_TTL`, `l3` is the IP header's offset.
#[inline(always)]
pub fn fib_redirect(
    ctx: &TcContext,
    v4: bool,
    l4_protocol: u8,
    src: &Addr,
    dst: &Addr,
    l3: usize,
    options: u8,
) -> Xmit {
    let ttl = match ttl_to_decrement(ctx, v4, l3, options) {
        Ok(ttl) => ttl,
        Err(unsent) => return unsent,
    };
    let params = match route(ctx, v4, l4_protocol, src, dst, 0, options) {
        Ok(params) => params,
        Err(unsent) => return unsent,
    };
    redirect_routed(ctx, v4, l3, ttl, params, options)
}

/// The TTL / hop limit of the IP header at `l3` that [`redirect_routed`] decrements (0 without
/// [`opts::DECREMENT_TTL`]); `Err(Xmit::Expiring)` for a packet that would expire.
#[inline(always)]
pub fn ttl_to_decrement(ctx: &TcContext, v4: bool, l3: usize, options: u8) -> Result<u8, Xmit> {
    if options & opts::DECREMENT_TTL == 0 {
        return Ok(0);
    }
    let ttl_at = l3 + if v4 { IPV4_TTL } else { IPV6_HOP_LIMIT };
    match ctx.load::<u8>(ttl_at) {
        Ok(ttl) if ttl > 1 => Ok(ttl),
        Ok(_) => Err(Xmit::Expiring),
        Err(_) => Err(Xmit::NoRoute),
    }
}

/// The end of [`fib_redirect`] once [`route`] found the next hop (`params`): the TTL decremented
/// from `ttl` ([`ttl_to_decrement`]) if `options` say so, then [`redirect`].
#[inline(always)]
pub fn redirect_routed(
    ctx: &TcContext,
    v4: bool,
    l3: usize,
    ttl: u8,
    params: &FibParams,
    options: u8,
) -> Xmit {
    if options & opts::DECREMENT_TTL != 0 && decrement_ttl(ctx, v4, l3, ttl).is_err() {
        return Xmit::NoRoute;
    }
    redirect(ctx, params)
}

/// Asks the FIB for the next hop of the packet from `src` to `dst` (as [`fib_redirect`]) once it
/// is `grows_by` bytes longer (an outer header to come; the MTU check is on that length): `Ok`
/// with the FIB's answer (in the per-CPU scratch space, also [`routed`]) when it can be sent.
///
/// A GSO skb is segmented for the egress device, so only other skbs must fit its MTU (with the
/// query's length 0 the helper lets GSO skbs through and checks the others as they are).
#[inline(always)]
pub fn route(
    ctx: &TcContext,
    v4: bool,
    l4_protocol: u8,
    src: &Addr,
    dst: &Addr,
    grows_by: usize,
    options: u8,
) -> Result<&'static FibParams, Xmit> {
    // SAFETY: the program's context.
    let (ifindex, gso_size) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).gso_size) };
    // Not saturated (it would cost `tc::fragments::forward` 8 bytes of stack it lacks): only an
    // skb of a 64 KiB MTU could wrap, and its packet would then be dropped by the link.
    let tot_len = if gso_size == 0 {
        (ctx.len() as usize - ETH_LEN + grows_by) as u16
    } else {
        0
    };
    let Some(params) = fib_query(v4, l4_protocol, tot_len, ifindex, src, dst) else {
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

/// The FIB's answer the last [`route`] left in the per-CPU scratch space.
#[inline(always)]
pub fn routed() -> Option<&'static FibParams> {
    scratch().map(|s| &s.fib)
}

/// Sends the packet to the next hop [`route`] found (`params`): its MACs written,
/// `TC_ACT_REDIRECT` (`Xmit::Sent`, counted `xmit_redirect`, or `xmit_tx` back out of the
/// interface it came in on).
#[inline(always)]
pub fn redirect(ctx: &TcContext, params: &FibParams) -> Xmit {
    let macs: [u8; 12] = {
        let mut m = [0u8; 12];
        m[..6].copy_from_slice(&params.dmac);
        m[6..].copy_from_slice(&params.smac);
        m
    };
    if ctx.store(0, &macs, 0).is_err() {
        return Xmit::NoRoute;
    }
    // SAFETY: the program's context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    count(if params.ifindex == ifindex {
        Counter::XmitTx
    } else {
        Counter::XmitRedirect
    });
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT, or TC_ACT_SHOT on bad flags.
    Xmit::Sent(unsafe { bpf_redirect(params.ifindex, 0) } as u32)
}

/// TTL (IPv4, with the header checksum) or hop limit (IPv6) one less than `ttl`, written with the
/// skb helpers. The IPv4 header's sum does not change (its checksum compensates), so an skb's
/// `CHECKSUM_COMPLETE` sum stays right; the IPv6 hop limit has no checksum, so the helper updates
/// that sum (`BPF_F_RECOMPUTE_CSUM`).
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, v4: bool, l3: usize, ttl: u8) -> Result<(), i64> {
    let new = ttl - 1;
    if v4 {
        // The TTL is the high byte of the 16-bit word it forms with the protocol.
        ctx.l3_csum_replace(
            l3 + IPV4_CHECK,
            ((ttl as u16) << 8).to_be() as u64,
            ((new as u16) << 8).to_be() as u64,
            2,
        )?;
        ctx.store(l3 + IPV4_TTL, &new, 0)
    } else {
        ctx.store(l3 + IPV6_HOP_LIMIT, &new, BPF_F_RECOMPUTE_CSUM as u64)
    }
}

/// Sends the packet (an IP packet of `family`, `protocol` inside, rewritten already) the way its
/// flow's packets leave, as `how` records it (see `crate::xmit::leave`): SNAT to the FIB's next hop
/// with the TTL decremented, DSR L2 unchanged to the backend's MAC, DSR IPIP encapsulated towards
/// the backend; DNAT to the stack.
#[inline(always)]
pub fn leave(ctx: &TcContext, family: u8, protocol: u8, how: &FragmentEntry) -> i32 {
    match how.mode {
        mode::SNAT => snat::send(ctx, family, protocol, ETH_LEN, &how.src, &how.dst),
        mode::DSR_L2 => dsr::send_l2(ctx, family, protocol, &how.src, &how.dst),
        mode::DSR_IPIP => {
            let room_flags = dsr::room_flags(family, protocol);
            dsr::encapsulate_or_drop(ctx, room_flags, &how.src, &how.dst, how.label)
        }
        _ => TC_ACT_OK,
    }
}
