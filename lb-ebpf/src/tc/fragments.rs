//! Later fragments on an skb (`lb_tc`): the addresses their datagram's first fragment left with
//! (`crate::fragments::recorded`), written with the skb helpers (the IPv4 header checksum with
//! `bpf_l3_csum_replace`; later fragments carry no L4 header). The fragment then goes to the stack
//! (`TC_ACT_OK`), which forwards it to its new destination as the XDP path does.
//!
//! Only `lb_tc` records and translates fragments: on a workload veth, `lb_tc_request` and
//! `lb_tc_reply` leave them alone, since a fragment translated on one side of the policy and its
//! first fragment on the other would not match the policy's own fragment tracking.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use lb_common::{counters::Counter, service::family};

use crate::{
    fragments::{header_of, recorded, Fragment},
    maps::count,
    packet::header::{ETH_LEN, IPV4_CHECK, IPV4_DST, IPV4_SRC, IPV6_DST, IPV6_SRC},
};

/// A later fragment: rewritten to its datagram's recorded addresses, or left to the stack untouched.
// A BPF function of its own: its stack does not add to `lb_tc`'s.
#[inline(never)]
pub fn forward(ctx: &TcContext, fragment: &Fragment) -> i32 {
    let Some(l3) = header_of(ctx, fragment) else {
        count(Counter::DropMalformed);
        return TC_ACT_SHOT;
    };
    // SAFETY: `l3` from `header_of`. The rewrite below goes by offset: its helpers may move the
    // skb's data.
    let Some(((src, dst), entry)) = (unsafe { recorded(l3, fragment) }) else {
        count(Counter::PassFragment);
        return TC_ACT_OK;
    };
    let rewritten = (|| -> Result<(), i64> {
        if fragment.family == family::IPV4 {
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
            if src != entry.src {
                ctx.store(ETH_LEN + IPV6_SRC, &entry.src, 0)?;
            }
            if dst != entry.dst {
                ctx.store(ETH_LEN + IPV6_DST, &entry.dst, 0)?;
            }
        }
        Ok(())
    })();
    if rewritten.is_err() {
        // A half-written header: dropped, as `lb_tc` drops any rewrite the helpers refused.
        count(Counter::DropMalformed);
        return TC_ACT_SHOT;
    }
    count(Counter::ForwardFragment);
    TC_ACT_OK
}
