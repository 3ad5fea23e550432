//! Connection tracking: a flow keeps its backend while it lives, whatever happens to the Maglev table
//! (backends added, removed, or draining with weight 0).
//!
//! Entries live in one LRU map per family (`CONNTRACK_V4` keyed by the 16-byte
//! `lb_common::conntrack::FlowKeyV4`, `CONNTRACK_V6` by the 40-byte `FlowKey`: the kernel hashes
//! and compares the whole key). [`lookup`], [`lookup_via`] and [`track`] pick the map; every other
//! module reads and writes conntrack through them, with the flow's `FlowKey`.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use lb_common::{
    conntrack::{state, ConntrackEntry, FlowKey, FlowKeyV4},
    counters::Counter,
    flow_events::choice,
    protocol,
    service::{family, mode, Backend, ServiceInfo},
};

use crate::{
    flow_events, maglev,
    maps::{
        add_traffic, count, scratch, BACKENDS, BACKEND_STATS, CONNTRACK_V4, CONNTRACK_V6,
        NAT_REPLY, SERVICE_STATS,
    },
    mem,
    packet::{tcp_flags, Flow},
    snat,
};

/// Where a flow goes: its backend and, for SNAT, its source port on the node (network byte order).
pub struct Chosen {
    pub backend: Backend,
    pub snat_port: u16,
}

/// The conntrack entry of `flow`, if tracked (looked up once, before the service: a tracked flow's
/// service comes from the id in its entry).
#[inline(always)]
pub fn entry_of(flow: &Flow) -> Option<*mut ConntrackEntry> {
    lookup(&flow.key)
}

/// The conntrack entry of the client → VIP flow `key`, in its family's map.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<*mut ConntrackEntry> {
    if key.family == family::IPV4 {
        CONNTRACK_V4.get_ptr_mut(&FlowKeyV4::of(key))
    } else {
        CONNTRACK_V6.get_ptr_mut(key)
    }
}

/// [`lookup`] for callers short of stack: an IPv4 key is built in `v4`, per-CPU scratch space.
/// (`lb_xdp` calls the ICMP path, and both inline the reply path and `lb_xdp` the new flow's
/// [`track`]: with a 16-byte key more on the stack of each, they no longer fit the 512 bytes of
/// BPF stack together. They fill it exactly now: frames of 248 and 256 bytes, which the verifier
/// rounds up to 16.)
#[inline(always)]
pub fn lookup_via(key: &FlowKey, v4: &mut FlowKeyV4) -> Option<*mut ConntrackEntry> {
    if key.family == family::IPV4 {
        *v4 = FlowKeyV4::of(key);
        CONNTRACK_V4.get_ptr_mut(v4)
    } else {
        CONNTRACK_V6.get_ptr_mut(key)
    }
}

/// Tracks the client → VIP flow `key` with `entry`, in its family's map; an IPv4 key is built in
/// `v4`, per-CPU scratch space (see [`lookup_via`]). An LRU insert evicts the least recently used
/// entry when full, so it only fails on memory pressure; the flow is still forwarded (by the
/// table) either way, hence no result.
#[inline(always)]
pub fn track(key: &FlowKey, entry: &ConntrackEntry, v4: &mut FlowKeyV4) {
    let _ = if key.family == family::IPV4 {
        *v4 = FlowKeyV4::of(key);
        CONNTRACK_V4.insert(v4, entry, 0)
    } else {
        CONNTRACK_V6.insert(key, entry, 0)
    };
}

/// The backend for `flow` (`tracked`: its [`entry_of`]): the tracked one while the entry is live,
/// else a new choice (tracked from now on; a new SNAT flow also gets its source port; a new DNAT
/// flow gets `reply_flags` in its entries, see `lb_common::conntrack::reply_flags`). `Err` names
/// the drop reason, already counted and reported as a flow event (with the chosen backend when
/// one was: a SNAT flow without a free source port).
#[inline(always)]
pub fn backend_for(
    flow: &Flow,
    service: &ServiceInfo,
    tracked: Option<*mut ConntrackEntry>,
    reply_flags: u8,
) -> Result<Chosen, Counter> {
    // The coarse clock (updated every tick) is plenty for idle timeouts of seconds, and much cheaper.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let is_tcp = flow.key.protocol == protocol::TCP;
    let syn_only = flow.tcp_flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
    let closing = is_tcp && flow.tcp_flags & (tcp_flags::FIN | tcp_flags::RST) != 0;

    // Why a new choice is made (reported with flow events).
    let mut why = choice::NEW;
    if let Some(entry) = tracked {
        // SAFETY: LRU value of plain integers; a torn read at worst re-balances one packet.
        let entry = unsafe { &mut *entry };
        // A SYN on a closing entry is a new connection reusing the port pair.
        let reused = syn_only && entry.state == state::CLOSING;
        why = choice::ENTRY_REPLACED;
        if !reused && !entry.expired(now, is_tcp) {
            if let Some(backend) = BACKENDS.get(entry.backend_id) {
                if backend.is_active() {
                    entry.last_seen_ns = now;
                    if closing {
                        entry.state = state::CLOSING;
                    }
                    add_traffic(&SERVICE_STATS, service.id, flow.len, false);
                    add_traffic(&BACKEND_STATS, entry.backend_id, flow.len, false);
                    count(Counter::ForwardConntrackHit);
                    return Ok(Chosen {
                        backend: *backend,
                        snat_port: entry.snat_port,
                    });
                }
            }
            count(Counter::ConntrackBackendGone);
            why = choice::BACKEND_GONE;
        }
    } else if is_tcp && !syn_only {
        count(Counter::ConntrackMidflowMiss);
        why = choice::CONNTRACK_MISS;
    }

    let Some((backend_id, backend)) = maglev::pick(flow, service) else {
        let reason = if service.table_size == 0 {
            Counter::DropNoBackend
        } else {
            Counter::DropTableMiss
        };
        flow_events::count_drop(flow, service, reason);
        return Err(reason);
    };
    let snat_port = if service.mode == mode::SNAT {
        match snat::allocate(flow, service, &backend, now) {
            Ok(port) => port,
            Err(reason) => {
                flow_events::count_drop_after_choice(flow, service, backend_id, reason);
                return Err(reason);
            }
        }
    } else {
        0
    };
    let entry = ConntrackEntry {
        backend_id,
        service_id: service.id,
        last_seen_ns: now,
        state: if closing { state::CLOSING } else { state::OPEN },
        flags: reply_flags,
        snat_port,
        _pad: [0; 4],
    };
    let mut scratch = scratch();
    if let Some(scratch) = scratch.as_deref_mut() {
        track(&flow.key, &entry, &mut scratch.flow_v4);
    }
    // A backend serving one frontend has its replies translated from `BACKEND_REPLY`; one that
    // several share needs the flow's own reply entry, built in per-CPU scratch space (the stack is
    // needed by the other paths).
    let dnat_scratch = if service.mode == mode::DNAT && backend.has_shared_replies() {
        scratch
    } else {
        None
    };
    if let Some(scratch) = dnat_scratch {
        let reply_key = &mut scratch.reply_key;
        reply_key.src = backend.addr;
        reply_key.dst = flow.key.src;
        reply_key.src_port = backend.port_for(flow.key.dst_port);
        reply_key.dst_port = flow.key.src_port;
        reply_key.protocol = flow.key.protocol;
        reply_key.family = flow.key.family;
        reply_key._pad = [0; 2];
        let reply = &mut scratch.reply;
        mem::zero(reply);
        reply.vip = flow.key.dst;
        reply.vip_port = flow.key.dst_port;
        reply.mode = mode::DNAT;
        reply.flags = reply_flags;
        reply.service_id = service.id;
        let _ = NAT_REPLY.insert(&*reply_key, &*reply, 0);
    }
    add_traffic(&SERVICE_STATS, service.id, flow.len, true);
    add_traffic(&BACKEND_STATS, backend_id, flow.len, true);
    count(Counter::ForwardNewFlow);
    if flow_events::enabled() {
        flow_events::new_flow(flow, service, backend_id, why);
    }
    Ok(Chosen { backend, snat_port })
}
