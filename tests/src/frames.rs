//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN` (and [`inject`] to send them through real
//! interfaces), and checks on what comes out.
//!
//! Expected output frames are built from scratch by the same builder (so their checksums are
//! computed in full), and compared byte for byte with what the datapath produced incrementally.

use std::net::{IpAddr, SocketAddr};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

use crate::netns::Netns;

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

/// An Ethernet / IPv4-or-IPv6 / TCP-or-UDP frame from `src` to `dst` (same family), from
/// [`CLIENT_MAC`] to [`NODE_MAC`] with TTL / hop limit 64.
pub fn frame(l4: L4, src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    frame_via(l4, src, dst, payload, (CLIENT_MAC, NODE_MAC), 64)
}

/// Like [`frame`], with chosen Ethernet addresses and TTL / hop limit.
pub fn frame_via(
    l4: L4,
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
    macs: ([u8; 6], [u8; 6]),
    ttl: u8,
) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(macs.0, macs.1);
    let ip = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), ttl),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), ttl),
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

// ---- ICMP errors, fragments, IPv4 options and IPv6 extension headers ----
//
// These start from a frame built by [`frame`] (so L4 checksums are computed in full over the whole
// datagram) and reshape its IP layer; every IP header they write gets its checksum computed from
// scratch too.

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;

/// The IP packet of a frame (everything after the Ethernet header): what an ICMP error quotes.
pub fn ip_packet(frame: &[u8]) -> Vec<u8> {
    frame[ETH_LEN..].to_vec()
}

/// ICMP errors, named independently of the family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpError {
    /// IPv4: destination unreachable, fragmentation needed (type 3 code 4); IPv6: packet too big
    /// (type 2). `mtu` is the next hop's.
    TooBig { mtu: u16 },
    /// Destination unreachable, port unreachable (IPv4 3/3, IPv6 1/4).
    PortUnreachable,
    /// Time exceeded in transit (IPv4 11/0, IPv6 3/0).
    TimeExceeded,
    /// Destination unreachable, host unreachable (IPv4 3/1) / address unreachable (IPv6 1/3).
    HostUnreachable,
}

/// What `lb_tc` quotes of a too-big packet: its IP header (`ip_len` bytes) and 20 bytes of the
/// transport header after it, whose checksum (at `check_at` in that header) holds the one value
/// that finishing the checksum (as a NIC or the kernel does for a `CHECKSUM_PARTIAL` skb: the
/// folded complement of the transport bytes, field included, 0 written as 0xffff) leaves as it is.
/// Found by trying every value, not by `lb_tc`'s arithmetic.
pub fn quote_unchanged_by_checksum_completion(
    packet: &[u8],
    ip_len: usize,
    check_at: usize,
) -> Vec<u8> {
    let mut quote = packet[..ip_len + 20].to_vec();
    let finish = |l4: &[u8]| {
        let mut sum: u32 = l4
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        match !(sum as u16) {
            0 => 0xffff,
            c => c,
        }
    };
    let at = ip_len + check_at;
    let field = (0..=u16::MAX)
        .find(|v| {
            quote[at..at + 2].copy_from_slice(&v.to_be_bytes());
            finish(&quote[ip_len..]) == *v
        })
        .expect("a value finishing leaves as it is");
    quote[at..at + 2].copy_from_slice(&field.to_be_bytes());
    quote
}

/// An ICMP or ICMPv6 error from `from` to `to` (same family) quoting `quoted` (an IP packet, usually
/// cut short as the sender of the error does).
pub fn icmp_error(kind: IcmpError, from: IpAddr, to: IpAddr, quoted: &[u8]) -> Vec<u8> {
    icmp_error_via(kind, from, to, quoted, (CLIENT_MAC, NODE_MAC), 64)
}

/// Like [`icmp_error`], with chosen Ethernet addresses and TTL / hop limit.
pub fn icmp_error_via(
    kind: IcmpError,
    from: IpAddr,
    to: IpAddr,
    quoted: &[u8],
    macs: ([u8; 6], [u8; 6]),
    ttl: u8,
) -> Vec<u8> {
    use etherparse::{icmpv4, icmpv6, Icmpv4Type, Icmpv6Type};
    let eth = PacketBuilder::ethernet2(macs.0, macs.1);
    let mut out = Vec::new();
    match (from, to) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let icmp_type = match kind {
                IcmpError::TooBig { mtu } => Icmpv4Type::DestinationUnreachable(
                    icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
                ),
                IcmpError::PortUnreachable => {
                    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port)
                }
                IcmpError::TimeExceeded => {
                    Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit)
                }
                IcmpError::HostUnreachable => {
                    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Host)
                }
            };
            eth.ipv4(s.octets(), d.octets(), ttl)
                .icmpv4(icmp_type)
                .write(&mut out, quoted)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let icmp_type = match kind {
                IcmpError::TooBig { mtu } => Icmpv6Type::PacketTooBig { mtu: mtu.into() },
                IcmpError::PortUnreachable => {
                    Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port)
                }
                IcmpError::TimeExceeded => {
                    Icmpv6Type::TimeExceeded(icmpv6::TimeExceededCode::HopLimitExceeded)
                }
                IcmpError::HostUnreachable => {
                    Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Address)
                }
            };
            eth.ipv6(s.octets(), d.octets(), ttl)
                .icmpv6(icmp_type)
                .write(&mut out, quoted)
        }
        _ => panic!("mixed families"),
    }
    .expect("build ICMP error");
    out
}

/// An ICMP (IPv4) or ICMPv6 echo request from `from` to `to`.
pub fn echo_request(from: IpAddr, to: IpAddr) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC);
    let mut out = Vec::new();
    match (from, to) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth
            .ipv4(s.octets(), d.octets(), 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut out, b"ping"),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth
            .ipv6(s.octets(), d.octets(), 64)
            .icmpv6_echo_request(7, 1)
            .write(&mut out, b"ping"),
        _ => panic!("mixed families"),
    }
    .expect("build echo request");
    out
}

/// The datagram of `whole` (a frame built by [`frame`], without IPv4 options or IPv6 extension
/// headers) split into fragments of `chunk` bytes of IP payload each (a multiple of 8; the last may
/// be shorter), identified by `id` (IPv4 uses its low 16 bits). IPv4 fragments clear DF and set MF
/// on all but the last; IPv6 fragments carry a fragment header.
pub fn fragments(whole: &[u8], id: u32, chunk: usize) -> Vec<Vec<u8>> {
    assert!(
        chunk > 0 && chunk.is_multiple_of(8),
        "fragment payloads are multiples of 8 bytes"
    );
    let v4 = whole[12..14] == [0x08, 0x00];
    let header_len = if v4 { IPV4_LEN } else { IPV6_LEN };
    let header = &whole[ETH_LEN..ETH_LEN + header_len];
    let payload = &whole[ETH_LEN + header_len..];
    let pieces: Vec<&[u8]> = payload.chunks(chunk).collect();
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let offset = (i * chunk / 8) as u16;
            let more = i + 1 < pieces.len();
            let mut out = whole[..ETH_LEN].to_vec();
            if v4 {
                let mut ip = etherparse::Ipv4Header::from_slice(header).unwrap().0;
                ip.identification = id as u16;
                ip.dont_fragment = false;
                ip.more_fragments = more;
                ip.fragment_offset = etherparse::IpFragOffset::try_new(offset).unwrap();
                ip.set_payload_len(piece.len()).unwrap();
                ip.write(&mut out).unwrap();
            } else {
                let mut ip = header.to_vec();
                let next_header = ip[6];
                ip[6] = 44;
                ip[4..6].copy_from_slice(&((8 + piece.len()) as u16).to_be_bytes());
                out.extend_from_slice(&ip);
                out.extend_from_slice(&[next_header, 0]);
                out.extend_from_slice(&(offset << 3 | more as u16).to_be_bytes());
                out.extend_from_slice(&id.to_be_bytes());
            }
            out.extend_from_slice(piece);
            out
        })
        .collect()
}

/// `frame` (IPv4, built by [`frame`]) with `options` (a multiple of 4 bytes) after its IP header.
pub fn with_ipv4_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    let (mut ip, payload) = etherparse::Ipv4Header::from_slice(&frame[ETH_LEN..]).unwrap();
    ip.options = options
        .try_into()
        .expect("options: at most 40 bytes, a multiple of 4");
    ip.set_payload_len(payload.len()).unwrap();
    let mut out = frame[..ETH_LEN].to_vec();
    ip.write(&mut out).unwrap();
    out.extend_from_slice(payload);
    out
}

/// `frame` (IPv6, built by [`frame`]) with extension headers between the fixed header and the L4
/// header: each is `(its header type, its bytes)`, bytes a multiple of 8 whose first byte (next
/// header) is filled in here.
pub fn with_ipv6_extension_headers(frame: &[u8], headers: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut ip = frame[ETH_LEN..ETH_LEN + IPV6_LEN].to_vec();
    let payload = &frame[ETH_LEN + IPV6_LEN..];
    let mut next = ip[6];
    let mut chain = Vec::new();
    for (kind, bytes) in headers.iter().rev() {
        assert!(bytes.len().is_multiple_of(8) && !bytes.is_empty());
        let mut header = bytes.clone();
        header[0] = next;
        next = *kind;
        chain.splice(0..0, header);
    }
    ip[6] = next;
    ip[4..6].copy_from_slice(&((chain.len() + payload.len()) as u16).to_be_bytes());
    let mut out = frame[..ETH_LEN].to_vec();
    out.extend_from_slice(&ip);
    out.extend_from_slice(&chain);
    out.extend_from_slice(payload);
    out
}

/// The MAC address of `iface` in `ns`.
pub fn mac_of(ns: &Netns, iface: &str) -> [u8; 6] {
    let out = ns
        .exec("ip", &["-o", "link", "show", "dev", iface])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_else(|| panic!("no MAC in {text}"));
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// Sends from the client of `topology` what a router on its path (`router`) sends the VIP when it
/// cannot forward the UDP datagram `answer` (`vip` → `client`, as the client got it) for its `mtu`:
/// "fragmentation needed" / "packet too big", quoting the datagram, to the balancer's MAC.
pub fn inject_too_big_about_an_answer(
    topology: &crate::topology::Topology,
    router: IpAddr,
    (vip, client): (SocketAddr, SocketAddr),
    answer: &[u8],
    mtu: u16,
) {
    let client_mac = mac_of(&topology.client, "eth0");
    let node_mac = mac_of(&topology.balancer, crate::topology::BALANCER_CLIENT_IFACE);
    let quoted = ip_packet(&frame(L4::Udp, vip, client, answer));
    let error = icmp_error_via(
        IcmpError::TooBig { mtu },
        router,
        vip.ip(),
        &quoted,
        (client_mac, node_mac),
        64,
    );
    inject(&topology.client, "eth0", error);
}

/// Sends `frame` as is out of `iface` of `ns` (an AF_PACKET socket: nothing of it is rewritten).
pub fn inject(ns: &Netns, iface: &'static str, frame: Vec<u8>) {
    ns.run(move || {
        let name = std::ffi::CString::new(iface).unwrap();
        // SAFETY: plain libc calls on a socket this closure owns; `addr` outlives `sendto`.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                (libc::ETH_P_ALL as u16).to_be() as i32,
            );
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&frame[..6]);
            let sent = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(sent, frame.len() as isize, "sendto: {err}");
        }
    });
}

/// Frames seen on an interface of a namespace (an AF_PACKET socket bound to it, both directions),
/// collected by a thread until dropped: what really arrived, before the stack reassembles or drops.
pub struct Sniffer {
    frames: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sniffer {
    pub fn start(ns: &Netns, iface: &'static str) -> Self {
        use std::sync::{atomic::AtomicBool, Arc, Mutex};
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (frames, stop) = (frames.clone(), stop.clone());
            ns.spawn(move || {
                let name = std::ffi::CString::new(iface).unwrap();
                // SAFETY: plain libc calls on a socket this thread owns; buffers outlive the calls.
                unsafe {
                    let protocol = (libc::ETH_P_ALL as u16).to_be();
                    let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol as i32);
                    assert!(
                        fd >= 0,
                        "AF_PACKET socket: {}",
                        std::io::Error::last_os_error()
                    );
                    let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                    addr.sll_family = libc::AF_PACKET as u16;
                    addr.sll_protocol = protocol;
                    addr.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
                    let bound = libc::bind(
                        fd,
                        (&addr as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                    assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
                    let timeout = libc::timeval {
                        tv_sec: 0,
                        tv_usec: 20_000,
                    };
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        (&timeout as *const libc::timeval).cast(),
                        std::mem::size_of::<libc::timeval>() as u32,
                    );
                    ready_tx.send(()).unwrap();
                    let mut buf = vec![0u8; 65536];
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                        if n > 0 {
                            frames.lock().unwrap().push(buf[..n as usize].to_vec());
                        }
                    }
                    libc::close(fd);
                }
            })
        };
        ready_rx.recv().expect("sniffer started");
        Self {
            frames,
            stop,
            thread: Some(thread),
        }
    }

    /// Takes the frames seen so far.
    pub fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.frames.lock().unwrap())
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
