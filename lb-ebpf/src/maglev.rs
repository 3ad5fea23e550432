//! Backend choice for a new flow: hash → slot of the service's Maglev table → backend id.

use lb_common::{
    flow_hash::maglev_slot,
    service::{service_flags, Backend, ServiceInfo},
};

use crate::{
    maps::{BACKENDS, MAGLEV_TABLES},
    packet::Flow,
};

/// Returns the backend id and backend for `flow`, or `None` if the table is empty or unreadable.
#[inline(always)]
pub fn pick(flow: &Flow, service: &ServiceInfo) -> Option<(u32, Backend)> {
    if service.table_size == 0 {
        return None;
    }
    let source_only = service.flags & service_flags::HASH_SOURCE_IP != 0;
    let slot = maglev_slot(&flow.key, source_only, service.table_size);
    let backend_id = *MAGLEV_TABLES.get_value(service.table_slot, &slot)?;
    let backend = *BACKENDS.get(backend_id)?;
    backend.is_active().then_some((backend_id, backend))
}
