//! The XDP datapath. Follow a packet in file order: `packet` (parse) → `maps` (service lookup)
//! → `balance` (backend choice) → `nat` (rewrite) → verdict, here.
#![no_std]
#![no_main]

mod balance;
mod maps;
mod nat;
mod packet;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    counters::Counter,
    service::{ReverseNatKey, ServiceKey},
};

use crate::{
    maps::{count, REVERSE_NAT, SERVICES},
    packet::{parse_ipv4_l4, Parsed},
};

/// Entry point, attached to every interface the balancer node receives traffic on: the one facing
/// clients (VIP traffic is rewritten to a backend) and those facing backends (replies are rewritten
/// back to the VIP).
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let flow = match parse_ipv4_l4(&ctx) {
        Parsed::Flow(flow) => flow,
        Parsed::Pass(reason) => {
            count(reason);
            return xdp_action::XDP_PASS;
        }
        Parsed::Drop(reason) => {
            count(reason);
            return xdp_action::XDP_DROP;
        }
    };

    // SAFETY (for the map reads below): values are plain integers, written whole by userspace.
    let service_key = ServiceKey {
        vip: flow.dst_addr,
        port: flow.dst_port,
        protocol: flow.protocol,
        _pad: 0,
    };
    if let Some(service) = unsafe { SERVICES.get(service_key) } {
        let Some(backend) = balance::pick_backend(service, &flow) else {
            count(Counter::DropNoBackend);
            return xdp_action::XDP_DROP;
        };
        nat::rewrite_destination(&flow, backend.addr, backend.port);
        count(Counter::ForwardToBackend);
        return xdp_action::XDP_PASS;
    }

    let reverse_key = ReverseNatKey {
        backend_addr: flow.src_addr,
        backend_port: flow.src_port,
        protocol: flow.protocol,
        _pad: 0,
    };
    if let Some(service) = unsafe { REVERSE_NAT.get(reverse_key) } {
        nat::rewrite_source(&flow, service.vip, service.port);
        count(Counter::ReplyFromBackend);
        return xdp_action::XDP_PASS;
    }

    count(Counter::PassNotService);
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
