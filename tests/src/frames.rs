//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN`, and checks on what comes out.
//!
//! Expected output frames are built from scratch by the same builder (so their checksums are
//! computed in full), and compared byte for byte with what the datapath produced incrementally.

use std::net::{IpAddr, SocketAddr};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    /// TCP with these flags.
    Tcp(TcpFlags),
    Udp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpFlags {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

pub const SYN: L4 = L4::Tcp(TcpFlags {
    syn: true,
    ack: false,
    fin: false,
    rst: false,
});
pub const ACK: L4 = L4::Tcp(TcpFlags {
    syn: false,
    ack: true,
    fin: false,
    rst: false,
});
pub const FIN_ACK: L4 = L4::Tcp(TcpFlags {
    syn: false,
    ack: true,
    fin: true,
    rst: false,
});

/// An Ethernet / IPv4-or-IPv6 / TCP-or-UDP frame from `src` to `dst` (same family).
pub fn frame(l4: L4, src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC);
    let ip = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed families"),
    };
    let mut out = Vec::new();
    match l4 {
        L4::Tcp(f) => {
            let mut b = ip.tcp(src.port(), dst.port(), 1000, 64240);
            if f.syn {
                b = b.syn();
            }
            if f.ack {
                b = b.ack(1);
            }
            if f.fin {
                b = b.fin();
            }
            if f.rst {
                b = b.rst();
            }
            b.write(&mut out, payload).expect("build frame");
        }
        L4::Udp => ip
            .udp(src.port(), dst.port())
            .write(&mut out, payload)
            .expect("build frame"),
    }
    out
}

/// What a frame carries, with every checksum verified from scratch.
#[derive(Debug, PartialEq, Eq)]
pub struct Inspected {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub checksums_ok: bool,
}

/// Parses an Ethernet / IP / TCP-or-UDP frame and recomputes its checksums.
pub fn inspect(frame: &[u8]) -> Inspected {
    let packet = SlicedPacket::from_ethernet(frame).expect("parsable frame");
    let (src_ip, dst_ip, ip_ok): (IpAddr, IpAddr, bool) = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            (
                h.source.into(),
                h.destination.into(),
                h.calc_header_checksum() == h.header_checksum,
            )
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            (h.source_addr().into(), h.destination_addr().into(), true)
        }
        _ => panic!("not IP"),
    };
    let (sport, dport, l4_ok) = match (&packet.net, packet.transport.expect("transport")) {
        (Some(NetSlice::Ipv4(ip)), TransportSlice::Tcp(t)) => {
            let c = t
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), t.payload())
                .unwrap();
            (t.source_port(), t.destination_port(), c == t.checksum())
        }
        (Some(NetSlice::Ipv6(ip)), TransportSlice::Tcp(t)) => {
            let c = t
                .to_header()
                .calc_checksum_ipv6(&ip.header().to_header(), t.payload())
                .unwrap();
            (t.source_port(), t.destination_port(), c == t.checksum())
        }
        (Some(NetSlice::Ipv4(ip)), TransportSlice::Udp(u)) => {
            let c = u
                .to_header()
                .calc_checksum_ipv4(&ip.header().to_header(), u.payload())
                .unwrap();
            (u.source_port(), u.destination_port(), c == u.checksum())
        }
        (Some(NetSlice::Ipv6(ip)), TransportSlice::Udp(u)) => {
            let c = u
                .to_header()
                .calc_checksum_ipv6(&ip.header().to_header(), u.payload())
                .unwrap();
            (u.source_port(), u.destination_port(), c == u.checksum())
        }
        (_, other) => panic!("unexpected transport {other:?}"),
    };
    Inspected {
        src: SocketAddr::new(src_ip, sport),
        dst: SocketAddr::new(dst_ip, dport),
        checksums_ok: ip_ok && l4_ok,
    }
}
