//! VIP lookup: the exact (VIP, port, protocol) entry, else the VIP's all-ports entry.

use lb_common::service::{ServiceInfo, ServiceKey};

use crate::{maps::SERVICES, packet::Flow};

#[inline(always)]
pub fn lookup(flow: &Flow) -> Option<ServiceInfo> {
    lookup_key(ServiceKey {
        addr: flow.key.dst,
        port: flow.key.dst_port,
        protocol: flow.key.protocol,
        family: flow.key.family,
    })
}

/// [`lookup`] for a key built elsewhere (the flow an ICMP error quotes).
#[inline(always)]
pub fn lookup_key(mut key: ServiceKey) -> Option<ServiceInfo> {
    // SAFETY: values are plain integers; copied out at once so a concurrent update cannot tear them.
    if let Some(info) = unsafe { SERVICES.get(&key) } {
        return Some(*info);
    }
    key.port = 0;
    unsafe { SERVICES.get(&key) }.copied()
}
