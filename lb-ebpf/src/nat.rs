//! Address and port rewrites with incremental IPv4 and TCP/UDP checksum updates.

use lb_common::{checksum, protocol};

use crate::packet::Flow;

/// Rewrites the destination (VIP:port) to a backend's address and port.
#[inline(always)]
pub fn rewrite_destination(flow: &Flow, new_addr: u32, new_port: u16) {
    // SAFETY: all pointers in `flow` were bounds-checked when it was parsed.
    unsafe {
        (*flow.ip).dst_addr = new_addr.to_ne_bytes();
        *flow.dst_port_field = new_port.to_ne_bytes();
    }
    fix_checksums(flow, flow.dst_addr, new_addr, flow.dst_port, new_port);
}

/// Rewrites the source (backend address:port) of a reply to the VIP and its port.
#[inline(always)]
pub fn rewrite_source(flow: &Flow, new_addr: u32, new_port: u16) {
    unsafe {
        (*flow.ip).src_addr = new_addr.to_ne_bytes();
        *flow.src_port_field = new_port.to_ne_bytes();
    }
    fix_checksums(flow, flow.src_addr, new_addr, flow.src_port, new_port);
}

/// The IP checksum covers the address; the L4 checksum covers the address (pseudo-header) and the port.
#[inline(always)]
fn fix_checksums(flow: &Flow, old_addr: u32, new_addr: u32, old_port: u16, new_port: u16) {
    unsafe {
        let ip_check = u16::from_ne_bytes((*flow.ip).check);
        (*flow.ip).check = checksum::replace_u32(ip_check, old_addr, new_addr).to_ne_bytes();

        let l4 = u16::from_ne_bytes(*flow.l4_check);
        let l4 = if flow.protocol == protocol::UDP {
            let c = checksum::replace_u32_udp(l4, old_addr, new_addr);
            checksum::replace_u16_udp(c, old_port, new_port)
        } else {
            let c = checksum::replace_u32(l4, old_addr, new_addr);
            checksum::replace_u16(c, old_port, new_port)
        };
        *flow.l4_check = l4.to_ne_bytes();
    }
}
