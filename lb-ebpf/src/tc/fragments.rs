//! Later fragments on an skb (`lb_tc`): they leave as their datagram's first fragment did
//! (`crate::fragments::recorded`), by its flow's mode, as in `lb_xdp` (see `crate::fragments`):
//! DNAT and SNAT get the first fragment's addresses, written with the skb helpers (the IPv4 header
//! checksum with `bpf_l3_csum_replace`; later fragments carry no L4 header), then go to the stack
//! (DNAT) or to the FIB's next hop with the TTL decremented (SNAT, `tc::snat::send`); DSR L2 goes
//! unchanged to the backend's MAC (`tc::dsr::send_l2`); DSR IPIP is encapsulated towards the backend
//! (`tc::dsr::encapsulate_or_drop`).
//!
//! On a client's workload veth, the split programs record and translate the fragments of its
//! flows themselves ([`at_client_veth`]), each on its side of the policy, so that the policy's own
//! fragment tracking sees a datagram's later fragments with the addresses of its first:
//! `lb_tc_request` a request's (before `policy_from_endpoint`: all of them get the backend),
//! `lb_tc_reply` a reply's (after `policy_to_endpoint`: all of them get the VIP). They record in a
//! scope of their own each (`key_scope::CLIENT_REQUEST`, `CLIENT_REPLY`), which `lb_tc` and `lb_xdp` do not look up (a
//! reply's later fragments pass them untouched, as its first fragment did).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use lb_common::{
    counters::Counter,
    fragments::{key_scope, FragmentEntry},
    service::{family, mode, Addr},
};

use super::{dsr, snat};
use crate::{
    fragments::{header_of, recorded, Fragment},
    maps::count,
    packet::header::{ETH_LEN, IPV4_CHECK, IPV4_DST, IPV4_SRC, IPV6_DST, IPV6_SRC},
};

/// A later fragment: sent as its datagram's first fragment was, or left to the stack untouched.
// A BPF function of its own: its stack does not add to `lb_tc`'s.
#[inline(never)]
pub fn forward(ctx: &TcContext, fragment: &Fragment) -> i32 {
    let Some(l3) = header_of(ctx, fragment) else {
        count(Counter::DropMalformed);
        return TC_ACT_SHOT;
    };
    // SAFETY: `l3` from `header_of`. What follows goes by offset: its helpers may move the skb's
    // data.
    let Some(((src, dst), entry)) = (unsafe { recorded(l3, fragment, key_scope::NODE) }) else {
        count(Counter::PassFragment);
        return TC_ACT_OK;
    };
    count(Counter::ForwardFragment);
    let (family, protocol) = (fragment.family, fragment.protocol);
    // The dispatch of `tc::xmit::leave`, written out: with that function inlined here this frame
    // grows by 8 bytes, past what `lb_tc` → here → `dsr::encapsulate` can take.
    match entry.mode {
        mode::DSR_L2 => return dsr::send_l2(ctx, family, protocol, &src, &entry.dst),
        mode::DSR_IPIP => {
            let room_flags = dsr::room_flags(family, protocol);
            return dsr::encapsulate_or_drop(ctx, room_flags, &entry.src, &entry.dst, entry.label);
        }
        _ => {}
    }
    if rewrite(ctx, family, (&src, &dst), &entry).is_err() {
        // A half-written header: dropped, as `lb_tc` drops any rewrite the helpers refused.
        return super::refused();
    }
    if entry.mode == mode::SNAT {
        snat::send(ctx, family, protocol, ETH_LEN, &entry.src, &entry.dst)
    } else {
        TC_ACT_OK
    }
}

/// A later fragment on a client's workload veth (`lb_tc_request`, `lb_tc_reply`): given the
/// addresses of its datagram's first fragment if that was recorded here (DNAT: the only mode of
/// these programs), then passed on with `TCX_NEXT`, rewritten or not.
#[inline(never)]
pub fn at_client_veth(ctx: &TcContext, fragment: &Fragment, scope: u8) -> i32 {
    let Some(l3) = header_of(ctx, fragment) else {
        return super::NEXT;
    };
    // SAFETY: `l3` from `header_of`.
    let Some(((src, dst), entry)) = (unsafe { recorded(l3, fragment, scope) }) else {
        return super::NEXT;
    };
    if rewrite(ctx, fragment.family, (&src, &dst), &entry).is_err() {
        return super::refused();
    }
    count(Counter::ForwardFragment);
    super::NEXT
}

/// The fragment's addresses (`old`) become the entry's.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    family: u8,
    (src, dst): (&Addr, &Addr),
    entry: &FragmentEntry,
) -> Result<(), i64> {
    if family == family::IPV4 {
        for (field, old, new) in [
            (IPV4_SRC, src.0[0], entry.src.0[0]),
            (IPV4_DST, dst.0[0], entry.dst.0[0]),
        ] {
            if old != new {
                ctx.l3_csum_replace(ETH_LEN + IPV4_CHECK, old as u64, new as u64, 4)?;
                ctx.store(ETH_LEN + field, &new, 0)?;
            }
        }
    } else {
        if *src != entry.src {
            ctx.store(ETH_LEN + IPV6_SRC, &entry.src, 0)?;
        }
        if *dst != entry.dst {
            ctx.store(ETH_LEN + IPV6_DST, &entry.dst, 0)?;
        }
    }
    Ok(())
}
