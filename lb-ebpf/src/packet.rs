//! Bounds-checked parsing of Ethernet / IPv4 or IPv6 / TCP or UDP into a [`Flow`].

use aya_ebpf::programs::XdpContext;
use lb_common::{
    conntrack::FlowKey,
    counters::Counter,
    protocol,
    service::{family, Addr},
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

/// A TCP or UDP packet: its 5-tuple and where to rewrite it.
pub struct Flow {
    /// Addresses, ports (network byte order), protocol and family, as on the wire.
    pub key: FlowKey,
    /// Start of the IP header.
    pub l3: usize,
    /// Start of the TCP/UDP header (ports are its first 4 bytes).
    pub l4: usize,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// Frame length, for byte counters.
    pub len: u64,
}

pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

pub enum Parsed {
    Flow(Flow),
    Pass(Counter),
    Drop(Counter),
}

/// Returns the address of a `T` at `offset`, or `None` if it does not fit in the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<usize> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some(start + offset)
}

const IPV4_MORE_FRAGMENTS_OR_OFFSET: u16 = 0x3fff;

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::Pass(Counter::PassNotIp);
    };
    // SAFETY (all header reads below): every address was bounds-checked by ptr_at.
    let ether_type = unsafe { (*(eth as *const EthHdr)).ether_type };
    let mut key = FlowKey::default();
    let (l4_offset, proto) = if ether_type == EtherType::Ipv4 as u16 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
            return Parsed::Drop(Counter::DropMalformed);
        };
        let ip = unsafe { &*(ip as *const Ipv4Hdr) };
        // Options shift the L4 header; fragments after the first carry no ports. Neither is
        // balanced here: both go to the stack untouched and counted.
        if ip.vihl != 0x45 {
            return Parsed::Pass(Counter::PassIpv4Options);
        }
        if u16::from_be_bytes(ip.frags) & IPV4_MORE_FRAGMENTS_OR_OFFSET != 0 {
            return Parsed::Pass(Counter::PassFragment);
        }
        key.family = family::IPV4;
        key.src = Addr::from_v4_word(u32::from_ne_bytes(ip.src_addr));
        key.dst = Addr::from_v4_word(u32::from_ne_bytes(ip.dst_addr));
        (EthHdr::LEN + Ipv4Hdr::LEN, ip.proto)
    } else if ether_type == EtherType::Ipv6 as u16 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
            return Parsed::Drop(Counter::DropMalformed);
        };
        let ip = unsafe { &*(ip as *const Ipv6Hdr) };
        key.family = family::IPV6;
        key.src = addr6(&ip.src_addr);
        key.dst = addr6(&ip.dst_addr);
        (EthHdr::LEN + Ipv6Hdr::LEN, ip.next_hdr)
    } else {
        return Parsed::Pass(Counter::PassNotIp);
    };

    let tcp_flags = match proto {
        protocol::TCP => {
            let Some(tcp) = ptr_at::<TcpHdr>(ctx, l4_offset) else {
                return Parsed::Drop(Counter::DropMalformed);
            };
            // Byte 13 of the TCP header holds CWR..FIN.
            unsafe { *((tcp + 13) as *const u8) }
        }
        protocol::UDP => {
            if ptr_at::<UdpHdr>(ctx, l4_offset).is_none() {
                return Parsed::Drop(Counter::DropMalformed);
            }
            0
        }
        _ if key.family == family::IPV6 && is_ipv6_extension(proto) => {
            return Parsed::Pass(Counter::PassIpv6ExtensionHeader)
        }
        _ => return Parsed::Pass(Counter::PassNotTcpUdp),
    };
    let l4 = ctx.data() + l4_offset;
    let ports = unsafe { &*(l4 as *const [[u8; 2]; 2]) };
    key.src_port = u16::from_ne_bytes(ports[0]);
    key.dst_port = u16::from_ne_bytes(ports[1]);
    key.protocol = proto;
    Parsed::Flow(Flow {
        key,
        l3: ctx.data() + EthHdr::LEN,
        l4,
        tcp_flags,
        len: (ctx.data_end() - ctx.data()) as u64,
    })
}

#[inline(always)]
fn addr6(bytes: &[u8; 16]) -> Addr {
    let w = |i: usize| u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    Addr([w(0), w(4), w(8), w(12)])
}

/// Hop-by-hop, routing, fragment, destination options, AH, mobility, HIP, shim6.
#[inline(always)]
fn is_ipv6_extension(next_header: u8) -> bool {
    matches!(next_header, 0 | 43 | 44 | 60 | 51 | 135 | 139 | 140)
}
