//! Harness for the forwarding-mode tests (`xdp_modes.rs`, `e2e_modes.rs`): running code and
//! `BPF_PROG_TEST_RUN` inside a namespace (where `bpf_fib_lookup` resolves routes and neighbours),
//! interface facts, IP-in-IP frames, backends set up for DSR, and
//! servers that record who connected.

use std::{
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use aya::{
    programs::{xdp::XdpLinkId, SchedClassifier, TestRun, TestRunOptions, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use etherparse::{EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header};
use lb_agent::datapath::EBPF_OBJECT;

use crate::{
    netns::{self, Netns},
    servers::{greet_and_count_bytes, ServerLoops},
    test_run::xdp_md,
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
/// `TC_ACT_REDIRECT`: what `lb_tc` returns for a packet it sends to the FIB's next hop.
pub const TC_ACT_REDIRECT: u32 = 7;

/// Runs `f` on a thread that has entered `ns`, borrowing from the caller (unlike [`Netns::run`]).
pub fn in_netns<R: Send>(ns: &Netns, f: impl FnOnce() -> R + Send) -> R {
    let path = format!("/run/netns/{}", ns.name());
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                netns::enter(&path).unwrap_or_else(|e| panic!("entering {path}: {e:#}"));
                f()
            })
            .join()
            .expect("thread in namespace panicked")
    })
}

/// One `BPF_PROG_TEST_RUN` of `program` on `frame` as if received on interface `ingress_ifindex`
/// (0: the loopback of the calling thread's namespace). Returns the action and the output frame.
pub fn run_on(program: &mut Xdp, frame: &[u8], ingress_ifindex: u32) -> (u32, Vec<u8>) {
    let ctx = xdp_md(frame, ingress_ifindex);
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    if ingress_ifindex != 0 {
        opts.ctx_in = Some(&ctx);
    }
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// [`run_on`] for the TC `program`: the skb's device is interface `ifindex` of the calling
/// thread's namespace (what `lb_tc` asks the FIB from, as at that interface's ingress).
pub fn run_tc_on(program: &mut SchedClassifier, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
    let ctx = sk_buff_on(ifindex);
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = Some(&ctx);
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// The start of a `struct __sk_buff` up to `ifindex` (the 11th word), all else zero, as a test
/// run's context: the kernel gives the skb that device (`BPF_PROG_TEST_RUN` accepts a context
/// shorter than the struct).
fn sk_buff_on(ifindex: u32) -> Vec<u8> {
    let mut words = [0u32; 11];
    words[10] = ifindex;
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// Index and MAC address of `iface` in `ns`.
pub fn link_of(ns: &Netns, iface: &str) -> (u32, [u8; 6]) {
    let out = ns
        .exec("ip", &["-j", "link", "show", "dev", iface])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    let link = &json[0];
    let index = link["ifindex"].as_u64().expect("ifindex") as u32;
    let mut mac = [0u8; 6];
    for (i, part) in link["address"]
        .as_str()
        .expect("address")
        .split(':')
        .enumerate()
    {
        mac[i] = u8::from_str_radix(part, 16).expect("hex");
    }
    (index, mac)
}

/// A permanent neighbour entry: `ip neigh replace <addr> lladdr <mac> dev <iface> nud permanent`.
pub fn static_neighbour(ns: &Netns, addr: IpAddr, mac: [u8; 6], iface: &str) -> Result<()> {
    let mac = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    ns.ip_cmd(&format!(
        "neigh replace {addr} lladdr {mac} dev {iface} nud permanent"
    ))
}

/// `inner` (an Ethernet frame) with its IP packet wrapped in an outer IPv4 or IPv6 header from
/// `outer_src` to `outer_dst`, as the datapath builds it: IPv4 outer copies TOS, identification and
/// DF, TTL 64; IPv6 outer copies the traffic class, carries `flow_label`, hop limit 64. (Mixed
/// families, which only the decapsulation tests use, get zero TOS / traffic class.)
pub fn encapsulated(
    inner: &[u8],
    outer_src: IpAddr,
    outer_dst: IpAddr,
    flow_label: u32,
    macs: ([u8; 6], [u8; 6]),
) -> Vec<u8> {
    let packet = &inner[14..];
    let inner_protocol = match packet[0] >> 4 {
        4 => IpNumber::IPV4,
        _ => IpNumber::IPV6,
    };
    let mut out = Vec::new();
    let ether_type = if outer_src.is_ipv4() {
        EtherType::IPV4
    } else {
        EtherType::IPV6
    };
    Ethernet2Header {
        source: macs.0,
        destination: macs.1,
        ether_type,
    }
    .write(&mut out)
    .unwrap();
    match (outer_src, outer_dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut outer = Ipv4Header::new(
                packet.len() as u16,
                64,
                inner_protocol,
                s.octets(),
                d.octets(),
            )
            .unwrap();
            if let Ok((inner_header, _)) = Ipv4Header::from_slice(packet) {
                outer.dscp = inner_header.dscp;
                outer.ecn = inner_header.ecn;
                outer.identification = inner_header.identification;
                outer.dont_fragment = inner_header.dont_fragment;
            }
            outer.write(&mut out).unwrap();
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let traffic_class = if packet[0] >> 4 == 6 {
                ((packet[0] & 0x0f) << 4) | (packet[1] >> 4)
            } else {
                0
            };
            Ipv6Header {
                traffic_class,
                flow_label: Ipv6FlowLabel::try_new(flow_label).unwrap(),
                payload_length: packet.len() as u16,
                next_header: inner_protocol,
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
            }
            .write(&mut out)
            .unwrap();
        }
        _ => panic!("mixed families"),
    }
    out.extend_from_slice(packet);
    out
}

/// What the decapsulation program makes of [`encapsulated`]: the inner packet behind the outer
/// frame's Ethernet addresses.
pub fn decapsulated(inner: &[u8], macs: ([u8; 6], [u8; 6])) -> Vec<u8> {
    let mut out = inner.to_vec();
    out[..6].copy_from_slice(&macs.1);
    out[6..12].copy_from_slice(&macs.0);
    out
}

/// Loads a program of the datapath object with the balancer's big maps shrunk (for backends and
/// clients that only need `xdp_pass`, e.g. so that a veth accepts redirected frames).
pub fn load_small(program: &str) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    for map in [
        "CONNTRACK_V4",
        "CONNTRACK_V6",
        "NAT_REPLY",
        "BACKEND_REPLY",
        "BACKENDS",
        "SERVICE_STATS",
        "BACKEND_STATS",
    ] {
        loader.map_max_entries(map, 1);
    }
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    let prog: &mut Xdp = ebpf.program_mut(program).context("program")?.try_into()?;
    prog.load()?;
    Ok(ebpf)
}

/// `xdp_pass` attached to interfaces; detached on drop. A veth only takes frames another interface
/// redirects to it (XDP_REDIRECT) when its peer runs an XDP program (or has GRO on).
pub struct XdpPass {
    ebpf: Ebpf,
    links: Vec<XdpLinkId>,
}

impl XdpPass {
    /// Attaches `xdp_pass` (native mode) to `iface` in `ns`.
    pub fn attach(ns: &Netns, iface: &str) -> Self {
        let mut ebpf = load_small("xdp_pass").expect("load xdp_pass");
        let iface = iface.to_string();
        let link = in_netns(ns, || {
            let prog: &mut Xdp = ebpf.program_mut("xdp_pass").unwrap().try_into().unwrap();
            prog.attach(&iface, XdpMode::Driver)
                .unwrap_or_else(|e| panic!("attach xdp_pass to {iface}: {e}"))
        });
        Self {
            ebpf,
            links: vec![link],
        }
    }
}

impl Drop for XdpPass {
    fn drop(&mut self) {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut("xdp_pass")
            .unwrap()
            .try_into()
            .unwrap();
        for link in self.links.drain(..) {
            let _ = prog.detach(link);
        }
    }
}

/// Puts `vips` on the loopback of a DSR backend, which then accepts packets to them and answers
/// from them; on a shared segment it must not answer ARP / ND for them (`arp_ignore`,
/// `arp_announce`).
pub fn hold_vips_on_loopback(ns: &Netns, vips: &[IpAddr]) -> Result<()> {
    ns.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
    ns.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
    for vip in vips {
        let prefix = if vip.is_ipv4() { 32 } else { 128 };
        let extra = if vip.is_ipv4() { "" } else { " nodad" };
        ns.ip_cmd(&format!("addr add {vip}/{prefix} dev lo{extra}"))?;
    }
    Ok(())
}

/// A TCP and a UDP server on `addr` in a namespace that answer with their name (TCP: a greeting
/// line, then read until close; UDP: one datagram per datagram) and record every peer address.
pub struct RecordingServer {
    pub name: String,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    bytes: Arc<AtomicU64>,
    udp_bytes: Arc<AtomicU64>,
    _loops: ServerLoops,
}

impl RecordingServer {
    pub fn start(ns: &Netns, tcp: SocketAddr, udp: SocketAddr, name: &str) -> Self {
        let listener = ns
            .run(move || TcpListener::bind(tcp))
            .unwrap_or_else(|e| panic!("bind {tcp}: {e}"));
        let socket = ns
            .run(move || UdpSocket::bind(udp))
            .unwrap_or_else(|e| panic!("bind udp {udp}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let bytes = Arc::new(AtomicU64::new(0));
        let udp_bytes = Arc::new(AtomicU64::new(0));
        let mut loops = ServerLoops::default();
        let (tcp_peers, received, greeting) = (peers.clone(), bytes.clone(), format!("{name}\n"));
        loops.spawn_accepting(listener, move |stream, peer| {
            tcp_peers.lock().unwrap().push(peer);
            greet_and_count_bytes(
                stream,
                greeting.clone(),
                received.clone(),
                Duration::from_secs(10),
            );
        });
        let (udp_peers, received, answer) = (peers.clone(), udp_bytes.clone(), name.to_string());
        let mut buf = vec![0u8; 65536];
        loops.spawn(move || {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                udp_peers.lock().unwrap().push(peer);
                // Counted before the answer: a client that has its answer finds it here.
                received.fetch_add(n as u64, Ordering::Relaxed);
                let _ = socket.send_to(answer.as_bytes(), peer);
            }
        });
        Self {
            name: name.to_string(),
            peers,
            bytes,
            udp_bytes,
            _loops: loops,
        }
    }

    /// Peer addresses of every TCP connection and UDP datagram so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }

    /// TCP bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// UDP payload bytes received so far (whole datagrams, after reassembly).
    pub fn udp_bytes(&self) -> u64 {
        self.udp_bytes.load(Ordering::Relaxed)
    }
}
