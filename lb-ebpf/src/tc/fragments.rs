//! Later fragments on an skb (`lb_tc`): they leave as their datagram's first fragment did
//! (`crate::fragments::recorded`), by its flow's mode, as in `lb_xdp` (see `crate::fragments`):
//! DNAT and SNAT get the first fragment's addresses, written with the skb helpers (the IPv4 header
//! checksum with `bpf_l3_csum_replace`; later fragments carry no L4 header), then go to the stack
//! (DNAT) or to the FIB's next hop with the TTL decremented (SNAT, `tc::snat::send`); DSR L2 goes
//! unchanged to the backend's MAC (`tc::dsr::send_l2`); DSR IPIP is encapsulated towards the backend
//! (`tc::dsr::encapsulate`).
//!
//! Only `lb_tc` records and translates fragments: on a workload veth, `lb_tc_request` and
//! `lb_tc_reply` leave them alone, since a fragment translated on one side of the policy and its
//! first fragment on the other would not match the policy's own fragment tracking.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use lb_common::{
    counters::Counter,
    fragments::FragmentEntry,
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
    let Some(((src, dst), entry)) = (unsafe { recorded(l3, fragment) }) else {
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
            return dsr::encapsulate(ctx, room_flags, &entry.src, &entry.dst, entry.label);
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
