//! The XDP datapath. Follow a packet in file order: `packet` (parse) → `service` (VIP lookup) →
//! `conntrack` (existing flow?) → `maglev` (backend for a new flow) → `nat` (rewrite) → verdict here.
//! Replies from backends take `reply` instead of `service`.
#![no_std]
#![no_main]
// Map keys are passed by reference on purpose: by value would copy them (up to 40 bytes) on the
// 512-byte BPF stack at every call.
#![allow(clippy::needless_borrows_for_generic_args)]

mod conntrack;
mod maglev;
mod maps;
mod nat;
mod packet;
mod reply;
mod service;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::counters::Counter;

use crate::{
    maps::count,
    packet::{parse, Parsed},
};

/// Entry point, attached to every interface the balancer node receives traffic on: the one facing
/// clients (VIP traffic goes to a backend) and those facing backends (replies go back as the VIP).
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let flow = match parse(&ctx) {
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

    if let Some(service) = service::lookup(&flow) {
        return match conntrack::backend_for(&flow, &service) {
            Ok(backend) => {
                nat::to_backend(&ctx, &flow, &backend);
                xdp_action::XDP_PASS
            }
            Err(reason) => {
                count(reason);
                xdp_action::XDP_DROP
            }
        };
    }

    if reply::translate(&ctx, &flow) {
        count(Counter::ReplyTranslated);
        return xdp_action::XDP_PASS;
    }

    count(Counter::PassNotService);
    xdp_action::XDP_PASS
}

/// A trivial program measured next to `lb_xdp` by the benchmarks: the cost of XDP itself.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
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
