//! Address and port rewrites with incremental checksum updates (IPv4 header, TCP/UDP including the
//! pseudo-header). IPv6 has no header checksum; its L4 checksum covers all 16 address bytes.
//! SNAT rewrites both ends, one after the other: each update is incremental on the previous one.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    checksum,
    conntrack::NatReply,
    protocol,
    service::{family, Addr, Backend},
};

use crate::packet::{
    header::{
        IPV4_CHECK, IPV4_DST, IPV4_LEN, IPV4_SRC, IPV6_DST, IPV6_LEN, IPV6_SRC, TCP_CHECK, TCP_LEN,
        UDP_CHECK, UDP_LEN,
    },
    load16, store16, store32, Flow,
};

/// DNAT: destination becomes the backend (its port, or the original one when the backend's is 0).
#[inline(always)]
pub fn to_backend(ctx: &XdpContext, flow: &Flow, backend: &Backend) {
    let port = backend.port_for(flow.key.dst_port);
    rewrite(
        ctx,
        flow,
        &flow.key.dst,
        &backend.addr,
        flow.key.dst_port,
        port,
        false,
    );
}

/// Reply of a DNAT flow: source becomes the VIP and its port.
#[inline(always)]
pub fn rewrite_source(ctx: &XdpContext, flow: &Flow, vip: &Addr, vip_port: u16) {
    rewrite(
        ctx,
        flow,
        &flow.key.src,
        vip,
        flow.key.src_port,
        vip_port,
        true,
    );
}

/// SNAT towards the backend: the source becomes the node address and the flow's allocated port, the
/// destination the backend (as for DNAT).
#[inline(always)]
pub fn snat_to_backend(
    ctx: &XdpContext,
    flow: &Flow,
    source: &Addr,
    source_port: u16,
    backend: &Backend,
) {
    rewrite(
        ctx,
        flow,
        &flow.key.src,
        source,
        flow.key.src_port,
        source_port,
        true,
    );
    to_backend(ctx, flow, backend);
}

/// Reply of a SNAT flow: the source becomes the VIP and its port, the destination the client and
/// its port.
#[inline(always)]
pub fn snat_reply(ctx: &XdpContext, flow: &Flow, reply: &NatReply) {
    rewrite_source(ctx, flow, &reply.vip, reply.vip_port);
    rewrite(
        ctx,
        flow,
        &flow.key.dst,
        &reply.client,
        flow.key.dst_port,
        reply.client_port,
        false,
    );
}

#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    flow: &Flow,
    old: &Addr,
    new: &Addr,
    old_port: u16,
    new_port: u16,
    source: bool,
) {
    let v4 = flow.key.family == family::IPV4;
    let tcp = flow.key.protocol == protocol::TCP;
    // `parse` checked these bounds already, but the verifier cannot relate the family and protocol
    // kept in `flow` to that check, so the extent written here is proven again (two compares).
    let l3_end = flow.l3 + if v4 { IPV4_LEN } else { IPV6_LEN };
    let l4_end = flow.l4 + if tcp { TCP_LEN } else { UDP_LEN };
    if l3_end > ctx.data_end() || l4_end > ctx.data_end() {
        return;
    }
    let l4_check = flow.l4 + if tcp { TCP_CHECK } else { UDP_CHECK };
    // SAFETY: bounds checked just above.
    unsafe {
        let mut l4 = load16(l4_check);
        if v4 {
            let field = flow.l3 + if source { IPV4_SRC } else { IPV4_DST };
            store32(field, new.0[0]);
            let ip_check = flow.l3 + IPV4_CHECK;
            store16(
                ip_check,
                checksum::replace_u32(load16(ip_check), old.0[0], new.0[0]),
            );
            l4 = l4_replace32(flow, l4, old.0[0], new.0[0]);
        } else {
            let field = flow.l3 + if source { IPV6_SRC } else { IPV6_DST };
            for i in 0..4 {
                store32(field + 4 * i, new.0[i]);
                l4 = l4_replace32(flow, l4, old.0[i], new.0[i]);
            }
        }
        let port_field = flow.l4 + if source { 0 } else { 2 };
        store16(port_field, new_port);
        l4 = if flow.key.protocol == protocol::UDP {
            checksum::replace_u16_udp(l4, old_port, new_port)
        } else {
            checksum::replace_u16(l4, old_port, new_port)
        };
        store16(l4_check, l4);
    }
}

#[inline(always)]
fn l4_replace32(flow: &Flow, check: u16, old: u32, new: u32) -> u16 {
    if flow.key.protocol == protocol::UDP {
        checksum::replace_u32_udp(check, old, new)
    } else {
        checksum::replace_u32(check, old, new)
    }
}
