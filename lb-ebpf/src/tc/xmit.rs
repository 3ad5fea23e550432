//! The next hop of a rewritten packet without the stack's forwarding path: `bpf_fib_lookup` gives
//! the egress interface and the MAC addresses, and `bpf_redirect` hands the skb to that interface's
//! transmit path (no second routing decision, no netfilter hooks, no `ip_forward`). Anything the
//! lookup cannot settle (no neighbour entry yet, no route, forwarding disabled, too big for the
//! egress MTU) goes to the stack with `TC_ACT_OK`, counted, and the stack does what it always does.
//!
//! Like a NAT device and unlike a router, the TTL / hop limit is not decremented.

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK,
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::TcContext,
    EbpfContext,
};
use lb_common::{counters::Counter, service::family};

use crate::{
    maps::count,
    packet::{header::ETH_LEN, Flow},
    xmit::fib_query,
};

/// Sends the packet (already rewritten: `flow` holds its addresses before the rewrite, `dst` the
/// destination after it) towards `dst`; returns the verdict.
///
/// A separate BPF function: the FIB query's 64 bytes stay off its callers' stack frames (see
/// `tc::to_backend`).
#[inline(never)]
pub fn forward(
    ctx: &TcContext,
    flow: &Flow,
    src: &lb_common::service::Addr,
    dst: &lb_common::service::Addr,
) -> i32 {
    let v4 = flow.key.family == family::IPV4;
    // SAFETY: the program's context.
    let (ifindex, gso_size) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).gso_size) };
    // A GSO packet is segmented for the egress device; anything else must fit its MTU.
    let tot_len = if gso_size == 0 {
        (ctx.len() as usize - ETH_LEN) as u16
    } else {
        0
    };
    let Some(params) = fib_query(v4, flow.key.protocol, tot_len, ifindex, src, dst) else {
        return TC_ACT_OK;
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
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        count(if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
            Counter::PassFibNoNeigh
        } else {
            Counter::PassFibFailed
        });
        return TC_ACT_OK;
    }
    let macs: [u8; 12] = {
        let mut m = [0u8; 12];
        m[..6].copy_from_slice(&params.dmac);
        m[6..].copy_from_slice(&params.smac);
        m
    };
    if ctx.store(0, &macs, 0).is_err() {
        count(Counter::PassFibFailed);
        return TC_ACT_OK;
    }
    count(Counter::XmitRedirect);
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT, or TC_ACT_SHOT on bad flags.
    unsafe { bpf_redirect(params.ifindex, 0) as i32 }
}
