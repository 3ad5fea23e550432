//! VIP lookup: the exact (VIP, port, protocol) entry, else the VIP's all-ports entry; each only when
//! the prefilter says the destination may be that kind of VIP.

use lb_common::{
    prefilter::role,
    service::{Addr, ServiceInfo, ServiceKey},
};

use crate::{
    maps::{SERVICES, SERVICE_MODES, SERVICE_SLOTS},
    packet::Flow,
};

/// The service of `flow`; `roles`: the prefilter's roles of its destination.
#[inline(always)]
pub fn lookup(flow: &Flow, roles: u8) -> Option<ServiceInfo> {
    let mut key = ServiceKey {
        addr: flow.key.dst,
        port: flow.key.dst_port,
        protocol: flow.key.protocol,
        family: flow.key.family,
    };
    if roles & role::VIP_PORT != 0 {
        // SAFETY: values are plain integers; copied out at once so a concurrent update cannot
        // tear them.
        if let Some(info) = unsafe { SERVICES.get(&key) } {
            return Some(*info);
        }
    }
    if roles & role::VIP_ALL_PORTS == 0 {
        return None;
    }
    key.port = 0;
    unsafe { SERVICES.get(&key) }.copied()
}

/// The service of a tracked `flow` from the id in its conntrack entry (`service_id`), without a
/// hash lookup: the one [`lookup`] would find, or `None` to leave the choice to [`lookup`]. The
/// slot must name the flow's VIP, protocol and port; an all-ports service only when the prefilter
/// (`roles`) rules out a service on the exact port, which would take precedence.
#[inline(always)]
pub fn of_tracked(flow: &Flow, service_id: u32, roles: u8) -> Option<ServiceInfo> {
    let slot = SERVICE_SLOTS.get(service_id)?;
    let key = &slot.key;
    let port_matches =
        key.port == flow.key.dst_port || (key.port == 0 && roles & role::VIP_PORT == 0);
    (port_matches
        && key.addr == flow.key.dst
        && key.protocol == flow.key.protocol
        && key.family == flow.key.family)
        .then_some(slot.info)
}

/// [`lookup`] for a key built elsewhere (the flow an ICMP error quotes), without the prefilter.
#[inline(always)]
pub fn lookup_key(mut key: ServiceKey) -> Option<ServiceInfo> {
    // SAFETY: as in `lookup`.
    if let Some(info) = unsafe { SERVICES.get(&key) } {
        return Some(*info);
    }
    key.port = 0;
    unsafe { SERVICES.get(&key) }.copied()
}

/// The source address service `service_id`'s translated packets leave with (`SERVICE_MODES`): the
/// SNAT address, or the outer source of DSR IPIP; `None` if it has none (a packet that needs it is
/// dropped, counted `drop_mode_unconfigured`).
#[inline(always)]
pub fn source_address(service_id: u32) -> Option<&'static Addr> {
    let info = SERVICE_MODES.get(service_id)?;
    info.has_source().then_some(&info.source)
}
