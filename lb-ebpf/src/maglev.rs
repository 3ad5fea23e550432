//! Backend choice for a new flow: hash → slot of the service's Maglev table → backend id.

use lb_common::{
    flow_hash::{flow_hash, source_hash},
    service::{service_flags, Backend, ServiceInfo},
};

use crate::{
    maps::{BACKENDS, MAGLEV_TABLES},
    packet::Flow,
};

/// The packet hash seed. Fixed, so every node maps a flow to the same table slot.
const PACKET_HASH_SEED: u32 = 0;

/// Returns the backend id and backend for `flow`, or `None` if the table is empty or unreadable.
#[inline(always)]
pub fn pick(flow: &Flow, service: &ServiceInfo) -> Option<(u32, Backend)> {
    if service.table_size == 0 {
        return None;
    }
    let hash = if service.flags & service_flags::HASH_SOURCE_IP != 0 {
        source_hash(&flow.key.src.0, PACKET_HASH_SEED)
    } else {
        let ports = ((flow.key.src_port as u32) << 16) | flow.key.dst_port as u32;
        flow_hash(
            &flow.key.src.0,
            &flow.key.dst.0,
            ports,
            flow.key.protocol,
            PACKET_HASH_SEED,
        )
    };
    let slot = hash % service.table_size;
    let backend_id = *MAGLEV_TABLES.get_value(service.table_slot, &slot)?;
    let backend = *BACKENDS.get(backend_id)?;
    backend.is_active().then_some((backend_id, backend))
}
