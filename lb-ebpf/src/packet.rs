//! Bounds-checked parsing of Ethernet / IPv4 / TCP-UDP headers.

use aya_ebpf::programs::XdpContext;
use lb_common::{counters::Counter, protocol};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};

/// Where the fields a balancer needs live in the packet, and their values (network byte order).
pub struct Flow {
    pub ip: *mut Ipv4Hdr,
    /// Points at the TCP or UDP checksum field.
    pub l4_check: *mut [u8; 2],
    pub src_port_field: *mut [u8; 2],
    pub dst_port_field: *mut [u8; 2],
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
}

pub enum Parsed {
    Flow(Flow),
    Pass(Counter),
    Drop(Counter),
}

/// Returns a pointer to a `T` at `offset`, or `None` if it does not fit in the packet.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

const IPV4_MORE_FRAGMENTS_OR_OFFSET: u16 = 0x3fff;

#[inline(always)]
pub fn parse_ipv4_l4(ctx: &XdpContext) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::Pass(Counter::PassNotIpv4);
    };
    // SAFETY: every pointer below was bounds-checked by ptr_at.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Parsed::Pass(Counter::PassNotIpv4);
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return Parsed::Drop(Counter::DropMalformed);
    };
    let (vihl, frags, proto) =
        unsafe { ((*ip).vihl, u16::from_be_bytes((*ip).frags), (*ip).proto) };
    // Options and fragments are passed to the stack untouched rather than mis-balanced: a fragment
    // without ports would hash differently from its first fragment.
    if vihl != 0x45 || frags & IPV4_MORE_FRAGMENTS_OR_OFFSET != 0 {
        return Parsed::Pass(Counter::PassIpv4Unsupported);
    }
    let l4 = EthHdr::LEN + Ipv4Hdr::LEN;
    let (src_port_field, dst_port_field, l4_check) = match proto {
        protocol::TCP => {
            let Some(tcp) = ptr_at::<TcpHdr>(ctx, l4) else {
                return Parsed::Drop(Counter::DropMalformed);
            };
            unsafe {
                (
                    &raw mut (*tcp).source,
                    &raw mut (*tcp).dest,
                    &raw mut (*tcp).check,
                )
            }
        }
        protocol::UDP => {
            let Some(udp) = ptr_at::<UdpHdr>(ctx, l4) else {
                return Parsed::Drop(Counter::DropMalformed);
            };
            unsafe {
                (
                    &raw mut (*udp).src,
                    &raw mut (*udp).dst,
                    &raw mut (*udp).check,
                )
            }
        }
        _ => return Parsed::Pass(Counter::PassNotTcpUdp),
    };
    unsafe {
        Parsed::Flow(Flow {
            ip,
            l4_check,
            src_port_field,
            dst_port_field,
            src_addr: u32::from_ne_bytes((*ip).src_addr),
            dst_addr: u32::from_ne_bytes((*ip).dst_addr),
            src_port: u16::from_ne_bytes(*src_port_field),
            dst_port: u16::from_ne_bytes(*dst_port_field),
            protocol: proto,
        })
    }
}
