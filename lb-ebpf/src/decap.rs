//! `lb_decap`: the backend side of DSR IPIP, as Katran pairs its balancer with a decapsulation
//! program. Attached with XDP to the backend's interface facing the balancers (the kernel here has no
//! ipip / ip6_tunnel / GRE / FOU devices to rely on).
//!
//! Packet walk: Ethernet → outer IPv4 (protocol 4 = IPv4 inside, 41 = IPv6 inside) or outer IPv6
//! (next header 41 or 4) → the outer source must be a configured balancer and the outer destination
//! a configured local address (`DECAP_ENDPOINTS`; an all-zero address of the family accepts any) →
//! the inner header must be present and of the announced version → the MACs move forward over the
//! outer header, the EtherType becomes the inner family's, `bpf_xdp_adjust_head` drops the outer
//! header, and the inner packet goes `XDP_PASS` to the stack, which delivers it to the VIP held on
//! the loopback. Replies go straight to the client.
//!
//! Everything else passes untouched (counted `decap_pass_not_encapsulated`; outer IPv4 with options
//! or fragments, which a balancer never sends, counts as `pass_ipv4_options` / `pass_fragment`).
//! Encapsulated packets from unknown endpoints are dropped: they would inject traffic to the VIP.

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_xdp_adjust_head, macros::xdp, programs::XdpContext,
};
use lb_common::{
    counters::Counter,
    modes::{
        decap::{role, EndpointKey},
        encap::{IPPROTO_IPIP, IPPROTO_IPV6, IPV4_OUTER_LEN, IPV6_OUTER_LEN},
    },
    service::{family, Addr},
};

use crate::{
    maps::{count, DECAP_ENDPOINTS},
    mem,
    packet::header::{ETH_LEN, IPV4_PROTOCOL, IPV6_NEXT_HEADER},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_MORE_FRAGMENTS_OR_OFFSET: u16 = 0x3fff;

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let (action, counter) = decap(&ctx);
    count(counter);
    action
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> (u32, Counter) {
    let pass = (xdp_action::XDP_PASS, Counter::DecapPassNotEncapsulated);
    let data = ctx.data();
    if data + ETH_LEN > ctx.data_end() {
        return pass;
    }
    // SAFETY (header reads): every read below is inside a range bounds-checked before it.
    let ether_type = u16::from_be(unsafe { read16(data + 12) });
    let l3 = data + ETH_LEN;
    let (outer_family, inner_protocol, outer_len, src, dst) = if ether_type == ETH_P_IP {
        if l3 + IPV4_OUTER_LEN > ctx.data_end() {
            return pass;
        }
        let protocol = unsafe { *((l3 + IPV4_PROTOCOL) as *const u8) };
        if protocol != IPPROTO_IPIP && protocol != IPPROTO_IPV6 {
            return pass;
        }
        if unsafe { *(l3 as *const u8) } != 0x45 {
            return (xdp_action::XDP_PASS, Counter::PassIpv4Options);
        }
        if u16::from_be(unsafe { read16(l3 + 6) }) & IPV4_MORE_FRAGMENTS_OR_OFFSET != 0 {
            return (xdp_action::XDP_PASS, Counter::PassFragment);
        }
        let src = Addr::from_v4_word(unsafe { read32(l3 + 12) });
        let dst = Addr::from_v4_word(unsafe { read32(l3 + 16) });
        (family::IPV4, protocol, IPV4_OUTER_LEN, src, dst)
    } else if ether_type == ETH_P_IPV6 {
        if l3 + IPV6_OUTER_LEN > ctx.data_end() {
            return pass;
        }
        let next = unsafe { *((l3 + IPV6_NEXT_HEADER) as *const u8) };
        if next != IPPROTO_IPIP && next != IPPROTO_IPV6 {
            return pass;
        }
        let word = |at: usize| unsafe { read32(at) };
        let src = Addr([word(l3 + 8), word(l3 + 12), word(l3 + 16), word(l3 + 20)]);
        let dst = Addr([word(l3 + 24), word(l3 + 28), word(l3 + 32), word(l3 + 36)]);
        (family::IPV6, next, IPV6_OUTER_LEN, src, dst)
    } else {
        return pass;
    };

    if !allowed(&src, outer_family, role::BALANCER) || !allowed(&dst, outer_family, role::LOCAL) {
        return (xdp_action::XDP_DROP, Counter::DecapDropUnknownEndpoint);
    }

    // The inner header must be there and be what the outer one announces.
    let (inner_len, inner_version, inner_ether_type) = if inner_protocol == IPPROTO_IPIP {
        (20, 4u8, ETH_P_IP)
    } else {
        (40, 6u8, ETH_P_IPV6)
    };
    let inner = l3 + outer_len;
    if inner + inner_len > ctx.data_end() {
        return (xdp_action::XDP_DROP, Counter::DropMalformed);
    }
    if unsafe { *(inner as *const u8) } >> 4 != inner_version {
        return (xdp_action::XDP_DROP, Counter::DropMalformed);
    }

    // MACs move forward over the outer header; the EtherType names the inner family.
    let eth = data + outer_len;
    // SAFETY: `data .. inner + inner_len` is in bounds and `eth + 14 == inner`.
    unsafe {
        for i in 0..3 {
            let w = read32(data + 4 * i);
            core::ptr::write_unaligned((eth + 4 * i) as *mut u32, w);
        }
        core::ptr::write_unaligned((eth + 12) as *mut u16, inner_ether_type.to_be());
    }
    // SAFETY: plain helper call on this program's context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        return (xdp_action::XDP_DROP, Counter::DropMalformed);
    }
    let counter = if outer_family == family::IPV4 {
        Counter::DecapOuterIpv4
    } else {
        Counter::DecapOuterIpv6
    };
    (xdp_action::XDP_PASS, counter)
}

/// Whether `addr` (of `addr_family`) may appear in `role`: listed, or its family's wildcard is.
#[inline(always)]
fn allowed(addr: &Addr, addr_family: u8, endpoint_role: u8) -> bool {
    let mut key = EndpointKey {
        addr: *addr,
        family: addr_family,
        role: endpoint_role,
        _pad: [0; 2],
    };
    // SAFETY: the value is never read, only its presence.
    if unsafe { DECAP_ENDPOINTS.get(&key) }.is_some() {
        return true;
    }
    mem::copy_addr(&mut key.addr, &Addr([0; 4]));
    unsafe { DECAP_ENDPOINTS.get(&key) }.is_some()
}

#[inline(always)]
unsafe fn read16(at: usize) -> u16 {
    unsafe { core::ptr::read_unaligned(at as *const u16) }
}

#[inline(always)]
unsafe fn read32(at: usize) -> u32 {
    unsafe { core::ptr::read_unaligned(at as *const u32) }
}
