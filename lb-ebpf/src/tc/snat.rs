//! SNAT on an skb (`lb_tc`), both directions, as `crate::snat` does it in `lb_xdp`: the same port
//! allocation (`crate::snat::allocate`, through `conntrack::backend_for`) and `NAT_REPLY` entries,
//! the same fields rewritten, here with the checksum helpers of `tc::nat`, and the same next hop
//! (`tc::xmit`, TTL decremented as a router does).
//!
//! Client → VIP: the source becomes the service's SNAT address and the flow's port, the
//! destination the backend. The FIB is asked first, and a request too big for the link, whose
//! TTL / hop limit would expire here, or whose backend cannot be reached, is answered from the VIP
//! (`tc::icmp_answer`), as `lb_xdp` does. Backend → node:port (the reply): the source becomes the VIP and its
//! port, the destination the client and its port. A first fragment is recorded after the rewrite
//! (`crate::fragments`); later fragments get the same addresses and next hop (`tc::fragments`).

use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use lb_common::{
    conntrack::NatReply,
    counters::Counter,
    service::{family, mode, Addr},
};

use super::{icmp_answer, nat, nat::Offsets, xmit, Chosen};
use crate::{
    flow_events, fragments,
    maps::{count, SERVICE_MODES},
    packet::Flow,
    xmit::{opts, Unsent, Xmit},
};

/// Client → VIP packet of a SNAT flow (`chosen`: its backend and port): rewritten and sent to the
/// backend.
// A BPF function of its own, called from `lb_tc`: its stack does not add to `to_backend`'s.
#[inline(never)]
pub fn forward(ctx: &TcContext, flow: &Flow, at: &Offsets, chosen: &Chosen) -> i32 {
    let Some(info) = SERVICE_MODES.get(chosen.service_id) else {
        let reason = Counter::DropModeUnconfigured;
        count(reason);
        flow_events::not_forwarded(&flow.key, chosen.service_id, mode::SNAT, reason);
        return TC_ACT_SHOT;
    };
    // The FIB is asked before the translation, as in `lb_xdp` (`crate::snat::forward`): a request
    // too big for the link to the backend, whose TTL would expire or whose backend cannot be
    // reached, is answered as it came (`tc::icmp_answer`), else translated and sent with that
    // answer. A GSO skb is never too big here (`xmit::route`).
    let (family, protocol) = (flow.key.family, flow.key.protocol);
    let v4 = family == family::IPV4;
    let l3 = at.l3();
    let options = opts::DECREMENT_TTL;
    let routed = xmit::ttl_to_decrement(ctx, v4, l3, options)
        .and_then(|_| xmit::route(ctx, v4, protocol, &info.source, &chosen.backend, 0, options));
    if let Some(message) = crate::icmp_answer::for_request(&routed) {
        match icmp_answer::answer(ctx, family, protocol, message) {
            // Not answerable (IPv4 options, too big but may be fragmented, shorter than the
            // quote): translated, to the stack, as before.
            icmp_answer::UNANSWERED => {}
            verdict => {
                let reason = match verdict {
                    TC_ACT_SHOT => crate::icmp_answer::refused(message),
                    _ => crate::icmp_answer::sent(message),
                };
                flow_events::not_forwarded(&flow.key, chosen.service_id, mode::SNAT, reason);
                return verdict;
            }
        }
    }
    crate::xmit::keep_route(&routed);
    let (source, backend) = (
        (&info.source, chosen.snat_port),
        (&chosen.backend, chosen.port),
    );
    if rewrite_both_ends(ctx, flow, at, source, backend).is_err() {
        return super::refused();
    }
    fragments::track_first(ctx, &flow.key, mode::SNAT, None, None);
    // The TTL is read again (the rewrite did not change it).
    let sent = crate::xmit::kept_route().and_then(|params| {
        let ttl = xmit::ttl_to_decrement(ctx, v4, l3, options)?;
        Ok(xmit::redirect_routed(ctx, v4, l3, ttl, params, options))
    });
    match sent {
        Ok(Xmit::Sent(action)) => action as i32,
        Ok(unsent) | Err(unsent) => xmit::verdict(Unsent::translated(unsent)),
    }
}

/// Backend → node:port packet of a SNAT flow (`entry`: its `NAT_REPLY` entry): rewritten and sent
/// to the client.
// A BPF function of its own, called from `lb_tc`: its stack does not add to `reply`'s.
#[inline(never)]
pub fn reply(ctx: &TcContext, flow: &Flow, at: &Offsets, entry: &NatReply) -> i32 {
    let (vip, client) = (
        (&entry.vip, entry.vip_port),
        (&entry.client, entry.client_port),
    );
    if rewrite_both_ends(ctx, flow, at, vip, client).is_err() {
        return super::refused();
    }
    count(Counter::SnatReplyTranslated);
    onwards(ctx, flow, at, &entry.vip, &entry.client)
}

/// A rewritten packet of a SNAT flow (now `src` → `dst`): a first fragment is recorded for the
/// later fragments of its datagram, then it is sent.
#[inline(always)]
fn onwards(ctx: &TcContext, flow: &Flow, at: &Offsets, src: &Addr, dst: &Addr) -> i32 {
    fragments::track_first(ctx, &flow.key, mode::SNAT, None, None);
    send(ctx, flow.key.family, flow.key.protocol, at.l3(), src, dst)
}

/// Rewrites both ends of `flow`'s packet: the source to `src` and the destination to `dst`
/// (address and port, the port in network byte order). `Err` if a helper refused: the packet may be
/// partly rewritten, and the caller drops it.
#[inline(always)]
fn rewrite_both_ends(
    ctx: &TcContext,
    flow: &Flow,
    at: &Offsets,
    (src, src_port): (&Addr, u16),
    (dst, dst_port): (&Addr, u16),
) -> Result<(), i64> {
    let key = &flow.key;
    nat::rewrite(ctx, flow, *at, &key.src, src, key.src_port, src_port, true)?;
    nat::rewrite(ctx, flow, *at, &key.dst, dst, key.dst_port, dst_port, false)
}

/// The translated packet (an IP packet of `family` at offset `l3`, `protocol` inside) from `src`
/// to `dst`: to the FIB's next hop, TTL decremented, or (counted) to the stack. Also the later
/// fragments of a SNAT datagram (`tc::fragments`).
#[inline(always)]
pub fn send(ctx: &TcContext, family: u8, protocol: u8, l3: usize, src: &Addr, dst: &Addr) -> i32 {
    let v4 = family == family::IPV4;
    match xmit::fib_redirect(ctx, v4, protocol, src, dst, l3, opts::DECREMENT_TTL) {
        Xmit::Sent(action) => action as i32,
        unsent => xmit::verdict(Unsent::translated(unsent)),
    }
}
