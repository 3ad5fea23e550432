//! Backend choice: a hash of the 5-tuple modulo the service's backend count. Stateless, so a flow keeps
//! its backend as long as the backend set does not change (connection tracking comes later).

use lb_common::{
    flow_hash::flow_hash,
    service::{Backend, BackendSlotKey, ServiceInfo},
};

use crate::{maps::BACKENDS, packet::Flow};

#[inline(always)]
pub fn pick_backend(service: &ServiceInfo, flow: &Flow) -> Option<Backend> {
    if service.backend_count == 0 {
        return None;
    }
    let ports = ((flow.src_port as u32) << 16) | flow.dst_port as u32;
    let hash = flow_hash(flow.src_addr, flow.dst_addr, ports, flow.protocol, 0);
    let key = BackendSlotKey {
        service_id: service.id,
        slot: hash % service.backend_count,
    };
    // SAFETY: plain integers written whole by userspace.
    unsafe { BACKENDS.get(key).copied() }
}
