//! SNAT (full NAT): the backend sees the node, not the client, so replies come back through the node
//! from any network.
//!
//! Packet walk, client → VIP: service lookup and conntrack as for DNAT; a new flow also gets a source
//! port ([`allocate`]); the destination becomes the backend and the source the service's SNAT address
//! (`SERVICE_MODES`) and the flow's port, with incremental checksum updates; the next hop comes from
//! `bpf_fib_lookup` with the TTL decremented, and the packet leaves by `XDP_TX` or redirect.
//! Reply, backend → node:port: the `NAT_REPLY` entry written at allocation gives the client and the
//! VIP; source becomes VIP:port, destination client:port; next hop as above.
//!
//! Port allocation: candidates are derived from a hash of the client flow
//! (`lb_common::modes::snat::candidate_port`), in the configured range. A candidate is free when no
//! `NAT_REPLY` entry has the key (backend, backend port, SNAT address, candidate, protocol), which is
//! claimed atomically with `BPF_NOEXIST`. A taken candidate is still usable when its entry belongs to
//! this very flow (a re-opened or evicted connection gets its port back) or to a flow that has ended
//! (no live conntrack entry holds that port: reclaimed and counted). After
//! `ALLOCATION_ATTEMPTS` taken candidates the packet is dropped and counted. Collisions are per
//! backend address and port, so each backend gets the whole range.
//!
//! When the fast path cannot send the finished packet (no neighbour entry yet, no route), it is
//! passed to the kernel, which resolves, routes or answers with ICMP. A request too big for the
//! link to its backend, whose TTL / hop limit would expire here, or whose backend has an
//! unreachable, blackhole or prohibit route, is answered by the balancer itself, before its
//! translation (the kernel's answer would go to the SNAT address): "fragmentation needed" /
//! "packet too big" from the VIP announcing the link's MTU, "time exceeded", or "destination
//! unreachable" (`icmp_answer`), unless it is IPv4 with options, or too big but may be fragmented:
//! that one is translated and passed, and the kernel fragments (or answers) it. The kernel treats a
//! received packet whose source is one of its own addresses as martian unless
//! `net.ipv4.conf.<iface>.accept_local=1`: set it when the SNAT address is a local address.
//!
//! Changing a service's SNAT address or mode breaks its established flows.

use aya_ebpf::{
    bindings::{xdp_action, BPF_ANY, BPF_NOEXIST},
    programs::XdpContext,
};
use lb_common::{
    conntrack::{FlowKey, NatReply},
    counters::Counter,
    modes::snat::{candidate_port, port_hash, ALLOCATION_ATTEMPTS},
    protocol,
    service::{mode, Addr, Backend, ServiceInfo},
};

use crate::{
    conntrack, flow_events, fragments, icmp_answer,
    maps::{count, scratch, NAT_REPLY, SERVICE_MODES},
    mem, nat,
    packet::Flow,
    xmit::{self, fib_route, fib_send, fib_xmit, opts, Unsent, Xmit},
};

/// Chooses the source port (network byte order) of a new SNAT flow to `backend` and records the
/// reply translation. `Err` names the drop reason.
// A function of its own (a BPF subprogram): its stack does not add to the other paths'. The keys
// and values it builds live in per-CPU scratch space.
#[inline(never)]
pub fn allocate(
    flow: &Flow,
    service: &ServiceInfo,
    backend: &Backend,
    now: u64,
) -> Result<u16, Counter> {
    let Some(info) = SERVICE_MODES.get(service.id) else {
        return Err(Counter::DropModeUnconfigured);
    };
    if !info.has_source() {
        return Err(Counter::DropModeUnconfigured);
    }
    let Some(scratch) = scratch() else {
        return Err(Counter::DropModeUnconfigured);
    };
    let key = &mut scratch.reply_key;
    key.src = backend.addr;
    mem::copy_addr(&mut key.dst, &info.source);
    key.src_port = backend.port_for(flow.key.dst_port);
    key.dst_port = 0;
    key.protocol = flow.key.protocol;
    key.family = flow.key.family;
    key._pad = [0; 2];
    let reply = &mut scratch.reply;
    mem::zero(reply);
    reply.vip = flow.key.dst;
    reply.vip_port = flow.key.dst_port;
    reply.mode = mode::SNAT;
    reply.service_id = service.id;
    reply.client = flow.key.src;
    reply.client_port = flow.key.src_port;

    let (first, ports) = (info.port_first, info.port_count);
    let hash = port_hash(&flow.key);
    for attempt in 0..ALLOCATION_ATTEMPTS {
        let port = candidate_port(hash, first, ports, attempt).to_be();
        key.dst_port = port;
        if NAT_REPLY.insert(&*key, &*reply, BPF_NOEXIST as u64).is_ok() {
            return Ok(port);
        }
        // SAFETY: plain integers, read in place.
        let Some(existing) = (unsafe { NAT_REPLY.get(&*key) }) else {
            continue;
        };
        if same_flow(existing, reply) {
            return Ok(port);
        }
        if existing.mode == mode::SNAT
            && !owner_alive(existing, key, &mut scratch.owner, now)
            && NAT_REPLY.insert(&*key, &*reply, BPF_ANY as u64).is_ok()
        {
            count(Counter::SnatPortReclaimed);
            return Ok(port);
        }
    }
    Err(Counter::DropSnatPortsExhausted)
}

#[inline(always)]
fn same_flow(a: &NatReply, b: &NatReply) -> bool {
    a.mode == b.mode
        && a.client == b.client
        && a.client_port == b.client_port
        && a.vip == b.vip
        && a.vip_port == b.vip_port
}

/// Whether the client flow that `entry` (at reply key `key`) translates for still holds that port.
#[inline(always)]
fn owner_alive(entry: &NatReply, key: &FlowKey, owner: &mut FlowKey, now: u64) -> bool {
    mem::copy_addr(&mut owner.src, &entry.client);
    mem::copy_addr(&mut owner.dst, &entry.vip);
    owner.src_port = entry.client_port;
    owner.dst_port = entry.vip_port;
    owner.protocol = key.protocol;
    owner.family = key.family;
    owner._pad = [0; 2];
    match conntrack::lookup(owner) {
        Some(tracked) => {
            // SAFETY: plain integers, read at once.
            let tracked = unsafe { &*tracked };
            tracked.snat_port == key.dst_port
                && !tracked.expired(now, key.protocol == protocol::TCP)
        }
        None => false,
    }
}

/// Client → VIP packet of a SNAT flow that owns `port`: rewritten and sent to `backend`.
// A function of its own (a BPF subprogram): its stack does not add to the other paths'.
#[inline(never)]
pub fn forward(
    ctx: &XdpContext,
    flow: &Flow,
    service: &ServiceInfo,
    backend: &Backend,
    port: u16,
) -> u32 {
    let Some(info) = SERVICE_MODES.get(service.id) else {
        let reason = Counter::DropModeUnconfigured;
        count(reason);
        flow_events::not_forwarded(&flow.key, service.id, mode::SNAT, reason);
        return xdp_action::XDP_DROP;
    };
    // The FIB is asked before the translation (the same length: only addresses and ports
    // change), so that a packet too big for the link to the backend, whose TTL would expire or
    // whose backend cannot be reached, can be answered as it came: the stack would answer the
    // translated one towards the SNAT address. Its port and `NAT_REPLY` entry stay: the
    // client's smaller retry (or next probe) is the same flow and gets them back.
    let family = flow.key.family;
    let route = fib_route(
        ctx,
        family,
        flow.key.protocol,
        &info.source,
        &backend.addr,
        xmit::ip_len(ctx, family),
        opts::DECREMENT_TTL,
    );
    if let Some(message) = icmp_answer::for_request(&route) {
        match icmp_answer::answer(ctx, family, message) {
            // Not answerable (IPv4 options, or too big but may be fragmented): translated, to
            // the stack, as before.
            icmp_answer::UNANSWERED => {}
            action => {
                let reason = match action {
                    xdp_action::XDP_TX => icmp_answer::sent(message),
                    _ => icmp_answer::refused(message),
                };
                flow_events::not_forwarded(&flow.key, service.id, mode::SNAT, reason);
                return action;
            }
        }
    }
    xmit::keep_route(&route);
    nat::snat_to_backend(ctx, flow, &info.source, port, backend);
    fragments::track_first(ctx, &flow.key, mode::SNAT, None, None);
    match xmit::kept_route().map(|params| fib_send(ctx, family, params, opts::DECREMENT_TTL)) {
        Ok(Xmit::Sent(action)) => action,
        Ok(unsent) | Err(unsent) => Unsent::translated(unsent).xdp_action(),
    }
}

/// Backend → node:port packet of a SNAT flow (`reply`: its `NAT_REPLY` entry): rewritten and sent
/// to the client.
// A function of its own (a BPF subprogram): its stack does not add to the other paths'.
#[inline(never)]
pub fn reply(ctx: &XdpContext, flow: &Flow, reply: &NatReply) -> u32 {
    nat::snat_reply(ctx, flow, reply);
    count(Counter::SnatReplyTranslated);
    fragments::track_first(ctx, &flow.key, mode::SNAT, None, None);
    send(
        ctx,
        flow.key.family,
        flow.key.protocol,
        &reply.vip,
        &reply.client,
    )
}

/// The translated packet (an IP packet of `family`, `protocol` inside) from `src` to `dst`: to the
/// FIB's next hop, TTL decremented, or (counted) to the stack. Also the later fragments of a SNAT
/// datagram (`fragments::forward`).
#[inline(always)]
pub fn send(ctx: &XdpContext, family: u8, protocol: u8, src: &Addr, dst: &Addr) -> u32 {
    let tot_len = xmit::ip_len(ctx, family);
    match fib_xmit(
        ctx,
        family,
        protocol,
        src,
        dst,
        tot_len,
        opts::DECREMENT_TTL,
    ) {
        Xmit::Sent(action) => action,
        unsent => Unsent::translated(unsent).xdp_action(),
    }
}
