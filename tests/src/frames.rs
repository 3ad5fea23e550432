//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN`, and checks on what comes out.

use std::net::Ipv4Addr;

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// An IPv4 TCP SYN frame.
pub fn tcp_v4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 64240)
        .syn();
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("build frame");
    frame
}

/// An IPv4 UDP frame.
pub fn udp_v4(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .udp(src.1, dst.1);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("build frame");
    frame
}

/// What a frame carries, with every checksum verified from scratch.
#[derive(Debug, PartialEq, Eq)]
pub struct Ipv4L4 {
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub ip_checksum_ok: bool,
    pub l4_checksum_ok: bool,
}

/// Parses an Ethernet/IPv4/TCP-or-UDP frame and recomputes its checksums.
pub fn inspect_ipv4(frame: &[u8]) -> Ipv4L4 {
    let packet = SlicedPacket::from_ethernet(frame).expect("parsable frame");
    let Some(NetSlice::Ipv4(ip)) = packet.net else {
        panic!("not IPv4")
    };
    let header = ip.header().to_header();
    let ip_checksum_ok = header.calc_header_checksum() == header.header_checksum;
    let (src_addr, dst_addr) = (
        Ipv4Addr::from(header.source),
        Ipv4Addr::from(header.destination),
    );
    match packet.transport.expect("transport") {
        TransportSlice::Tcp(tcp) => {
            let expected = tcp
                .to_header()
                .calc_checksum_ipv4(&header, tcp.payload())
                .expect("checksum");
            Ipv4L4 {
                src: (src_addr, tcp.source_port()),
                dst: (dst_addr, tcp.destination_port()),
                ip_checksum_ok,
                l4_checksum_ok: expected == tcp.checksum(),
            }
        }
        TransportSlice::Udp(udp) => {
            let expected = udp
                .to_header()
                .calc_checksum_ipv4(&header, udp.payload())
                .expect("checksum");
            Ipv4L4 {
                src: (src_addr, udp.source_port()),
                dst: (dst_addr, udp.destination_port()),
                ip_checksum_ok,
                l4_checksum_ok: expected == udp.checksum(),
            }
        }
        other => panic!("unexpected transport {other:?}"),
    }
}
