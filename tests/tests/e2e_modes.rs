//! End to end, one test per forwarding mode: the real `lb-agent` process attaches the datapath in the
//! balancer namespace; real TCP connections and UDP datagrams go from the client namespace through
//! IPv4 and IPv6 VIPs to two backends, whose own servers record who connected, and the answers come
//! back to the client from the VIP.
//!
//! - SNAT: the backends see the node address (and a port of the SNAT range), never the client; the
//!   replies come back through the node, which translates them (`snat_reply_translated`).
//! - DSR L2: the backends hold the VIPs on their loopback, see the client's own address, and answer
//!   it directly: the balancer translates nothing (no `reply_translated` / `snat_reply_translated`),
//!   it only routes the replies, untouched, as any router on the path would.
//! - DSR IPIP: as DSR L2, through IP-in-IP / IPv6-in-IPv6 to backends running `lb_decap` (loaded
//!   in-process in each backend's namespace with `lb_agent::decap`), over links with 100 bytes of
//!   MTU headroom, with TCP payloads large enough to need it.
//!
//! Every UDP datagram is larger than the client's MTU: the client's stack fragments it, and every
//! fragment must reach the backend of the first (each mode sends later fragments as their first),
//! whose stack reassembles the datagram; every byte is counted at the backends.
//!
//! Redirected frames enter a veth only when its peer runs XDP: the client's and backends' `eth0` get
//! `xdp_pass` (or `lb_decap`), as a NIC needs nothing.
//!
//! Each runs with the balancer attached as XDP (the default) and as TC (`--attach tc`, `lb_tc`).
//! Through TC the traffic is what veths really carry: the client and the backends send with
//! checksum offload and TSO (partial checksums, GSO packets of many segments, which `lb_tc`
//! rewrites, redirects and, for IPIP, encapsulates as one skb), the balancer's interfaces
//! finish checksums and segment in software on the way out (a wrong checksum update or
//! encapsulation shows as lost bytes), and every TCP connection carries 256 KiB. No `xdp_pass`
//! there: `bpf_redirect` of an skb needs nothing from the peer.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use lb_agent::decap::{Decap, DecapOptions};
use lb_common::{counters::Counter, modes::snat};
use lb_tests::{
    agent::{AgentProcess, ConfigFile},
    frames::{frame, icmp_error, inject, ip_packet, mac_of, IcmpError, L4},
    modes::{hold_vips_on_loopback, in_netns, RecordingServer, XdpPass},
    netns::TEST_PREFIX,
    servers::{recv_from, tcp_requests, udp_requests},
    topology::{
        Topology, BALANCER_CLIENT_IFACE, BALANCER_CLIENT_SIDE_ADDR, BALANCER_CLIENT_SIDE_ADDR6,
        CLIENT_ADDR, CLIENT_ADDR6, VIP, VIP6,
    },
};

const REQUESTS: usize = 30;
const SMALL: &[u8] = b"0123456789abcdef";
/// Two full-sized TCP segments and a bit: needs the MTU headroom once encapsulated.
static LARGE: [u8; 3000] = [7; 3000];
/// A transfer of hundreds of full-sized segments on one connection.
static TRANSFER: [u8; 512 * 1024] = [7; 512 * 1024];
/// UDP payload of every datagram: three fragments on a 1500-byte link.
static DATAGRAM: [u8; 3000] = [9; 3000];
/// TCP payload per connection through TC: bulk, sent as GSO packets of many segments.
static BULK: [u8; 256 * 1024] = [7; 256 * 1024];

/// How the agent attaches the datapath: `lb-agent run` arguments.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Attach {
    Xdp,
    Tc,
}

impl Attach {
    fn args(self) -> &'static [&'static str] {
        match self {
            Attach::Xdp => &[],
            Attach::Tc => &["--attach", "tc"],
        }
    }

    /// The TCP payload of each connection in `mode`.
    fn payload(self, mode: Mode) -> &'static [u8] {
        match (self, mode) {
            (Attach::Tc, _) => &BULK,
            (Attach::Xdp, Mode::DsrIpip) => &LARGE,
            (Attach::Xdp, _) => SMALL,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Snat,
    DsrL2,
    DsrIpip,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Snat => "snat",
            Mode::DsrL2 => "dsr-l2",
            Mode::DsrIpip => "dsr-ipip",
        }
    }

    /// Ports the backends serve TCP and UDP on: DSR keeps the service ports.
    fn backend_ports(self) -> (u16, u16) {
        match self {
            Mode::Snat => (8080, 5353),
            Mode::DsrL2 | Mode::DsrIpip => (80, 53),
        }
    }
}

fn config(topology: &Topology, mode: Mode) -> String {
    let (tcp_port, udp_port) = mode.backend_ports();
    let mut yaml = format!(
        "node:\n  ipv4: {BALANCER_CLIENT_SIDE_ADDR}\n  ipv6: {BALANCER_CLIENT_SIDE_ADDR6}\nservices:\n"
    );
    for (name, vip, port, proto, v6, backend_port) in [
        ("web", IpAddr::from(VIP), 80, "tcp", false, tcp_port),
        ("dns", IpAddr::from(VIP), 53, "udp", false, udp_port),
        ("web6", IpAddr::from(VIP6), 80, "tcp", true, tcp_port),
        ("dns6", IpAddr::from(VIP6), 53, "udp", true, udp_port),
    ] {
        yaml += &format!(
            "  - name: {name}\n    vip: \"{vip}\"\n    port: {port}\n    protocol: {proto}\n    mode: {}\n    backends:\n",
            mode.name()
        );
        for b in &topology.backends {
            let addr: IpAddr = if v6 { b.addr6.into() } else { b.addr.into() };
            yaml += &format!("      - {{ address: \"{addr}\", port: {backend_port} }}\n");
        }
    }
    yaml
}

/// Everything a mode's test runs on; torn down in reverse order on drop.
struct Setup {
    mode: Mode,
    attach: Attach,
    servers: Vec<RecordingServer>,
    decaps: Vec<Decap>,
    _xdp_pass: Vec<XdpPass>,
    agent: Option<AgentProcess>,
    _config: ConfigFile,
    topology: Topology,
}

impl Setup {
    fn new(mode: Mode, attach: Attach) -> Self {
        Self::with_headroom(mode, attach, true)
    }

    /// With `headroom` false, DSR IPIP runs over links of the client's MTU: full-sized packets no
    /// longer fit once encapsulated.
    fn with_headroom(mode: Mode, attach: Attach, headroom: bool) -> Self {
        let topology = Topology::new(TEST_PREFIX, 2).expect("topology");
        let vips = [IpAddr::from(VIP), IpAddr::from(VIP6)];
        let (tcp_port, udp_port) = mode.backend_ports();
        let mut servers = Vec::new();
        let mut decaps = Vec::new();
        let mut xdp_pass = Vec::new();
        if attach == Attach::Xdp {
            xdp_pass.push(XdpPass::attach(&topology.client, "eth0"));
        } else {
            topology.offload_checksums_to_the_edges();
        }
        if mode == Mode::Snat {
            // The SNAT address is one of the node's own: packets the fast path hands to the stack
            // (next hop not resolved yet) must not be taken for spoofed.
            topology
                .balancer
                .sysctl("net.ipv4.conf.all.accept_local", "1")
                .unwrap();
        }
        for (i, b) in topology.backends.iter().enumerate() {
            let name = format!("backend-{}", i + 1);
            let addrs = match mode {
                Mode::Snat => [IpAddr::from(b.addr), IpAddr::from(b.addr6)],
                Mode::DsrL2 | Mode::DsrIpip => {
                    hold_vips_on_loopback(&b.ns, &vips).unwrap();
                    vips
                }
            };
            for addr in addrs {
                servers.push(RecordingServer::start(
                    &b.ns,
                    SocketAddr::new(addr, tcp_port),
                    SocketAddr::new(addr, udp_port),
                    &name,
                ));
            }
            if mode == Mode::DsrIpip {
                if headroom {
                    // MTU headroom for the outer header on the balancer–backend links.
                    b.ns.ip_cmd("link set dev eth0 mtu 1600").unwrap();
                    topology
                        .balancer
                        .ip_cmd(&format!("link set dev {} mtu 1600", b.balancer_iface))
                        .unwrap();
                }
                let mut decap = Decap::load(&DecapOptions {
                    balancers: vec![
                        BALANCER_CLIENT_SIDE_ADDR.into(),
                        BALANCER_CLIENT_SIDE_ADDR6.into(),
                    ],
                    local: vec![b.addr.into(), b.addr6.into()],
                })
                .expect("load lb_decap");
                in_netns(&b.ns, || decap.attach("eth0")).expect("attach lb_decap");
                decaps.push(decap);
            } else if attach == Attach::Xdp {
                xdp_pass.push(XdpPass::attach(&b.ns, "eth0"));
            }
        }
        let file = ConfigFile::new(&config(&topology, mode));
        let agent = AgentProcess::start_with(
            &topology.balancer,
            file.path(),
            &topology.balancer_interfaces(),
            attach.args(),
        )
        .expect("agent starts");
        Self {
            mode,
            attach,
            servers,
            decaps,
            _xdp_pass: xdp_pass,
            agent: Some(agent),
            _config: file,
            topology,
        }
    }

    /// TCP connections and UDP datagrams through both VIPs: every one answered (from the VIP, for
    /// UDP), both backends used. Returns TCP bytes sent.
    fn traffic(&self) -> u64 {
        let payload = self.attach.payload(self.mode);
        let client = &self.topology.client;
        for vip in [IpAddr::from(VIP), IpAddr::from(VIP6)] {
            for (what, results) in [
                (
                    "TCP",
                    tcp_requests(client, SocketAddr::new(vip, 80), REQUESTS, payload),
                ),
                (
                    "UDP",
                    udp_requests(client, SocketAddr::new(vip, 53), REQUESTS, &DATAGRAM),
                ),
            ] {
                let mut by_backend = BTreeMap::<String, usize>::new();
                for r in results {
                    let name = r.unwrap_or_else(|e| {
                        panic!(
                            "{} ({:?}) {what} to {vip}: a request through the VIP failed: {e}",
                            self.mode.name(),
                            self.attach
                        )
                    });
                    *by_backend.entry(name).or_default() += 1;
                }
                assert_eq!(
                    by_backend.len(),
                    2,
                    "{} {what} to {vip} reaches both backends: {by_backend:?}",
                    self.mode.name()
                );
            }
        }
        let udp_bytes: u64 = self.servers.iter().map(|s| s.udp_bytes()).sum();
        assert_eq!(
            udp_bytes,
            (2 * REQUESTS * DATAGRAM.len()) as u64,
            "{} ({:?}): every fragmented datagram arrived whole",
            self.mode.name(),
            self.attach
        );
        2 * (REQUESTS * payload.len()) as u64
    }

    /// A "fragmentation needed" / "packet too big" about a reply a DSR backend sent straight to the
    /// client, sent to the VIP as a router on the client's path would: the balancer sends it to
    /// that backend as the flow's requests go (its MAC, or encapsulated to its `lb_decap`), and
    /// the backend's kernel, which matches it to its socket, lowers its path MTU towards the
    /// client; the other backend hears nothing.
    fn fragmentation_needed_about_a_reply(&self) {
        let topology = &self.topology;
        let client_mac = mac_of(&topology.client, "eth0");
        let node_mac = mac_of(&topology.balancer, BALANCER_CLIENT_IFACE);
        for (vip, client, router, mtu) in [
            (
                SocketAddr::from((VIP, 53)),
                IpAddr::from(CLIENT_ADDR),
                "192.0.2.254",
                1200u16,
            ),
            (
                SocketAddr::from((VIP6, 53)),
                IpAddr::from(CLIENT_ADDR6),
                "2001:db8:2::fe",
                1300,
            ),
        ] {
            let (local, name) = topology.client.run(move || {
                let socket = UdpSocket::bind(SocketAddr::new(client, 0)).expect("bind");
                socket
                    .set_read_timeout(Some(Duration::from_secs(3)))
                    .unwrap();
                socket.send_to(b"how big?", vip).expect("send");
                let mut buf = [0u8; 64];
                let (n, from) = recv_from(&socket, &mut buf).expect("an answer");
                assert_eq!(from, vip, "the answer comes from the VIP");
                (
                    socket.local_addr().unwrap(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                )
            });
            let index: usize = name.trim_start_matches("backend-").parse().unwrap();
            let (sender, other) = (&topology.backends[index - 1], &topology.backends[2 - index]);
            assert_eq!(sender.ns.learnt_mtu(client), None, "no PMTU yet");
            let quoted = ip_packet(&frame(L4::Udp, vip, local, name.as_bytes()));
            let mut error = icmp_error(
                IcmpError::TooBig { mtu },
                router.parse().unwrap(),
                vip.ip(),
                &quoted,
            );
            error[..6].copy_from_slice(&node_mac);
            error[6..12].copy_from_slice(&client_mac);
            inject(&topology.client, "eth0", error);
            let deadline = Instant::now() + Duration::from_secs(3);
            while sender.ns.learnt_mtu(client) != Some(mtu.into()) {
                assert!(
                    Instant::now() < deadline,
                    "{} ({:?}) {vip}: {name} did not learn the path MTU towards {client}",
                    self.mode.name(),
                    self.attach
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            assert_eq!(
                other.ns.learnt_mtu(client),
                None,
                "{vip}: only {name} hears of it"
            );
        }
    }

    /// Every peer the backends saw, once they have read everything.
    fn peers(&self) -> Vec<SocketAddr> {
        std::thread::sleep(Duration::from_millis(300));
        self.servers.iter().flat_map(|s| s.peers()).collect()
    }

    fn tcp_bytes(&self) -> u64 {
        self.servers.iter().map(|s| s.bytes()).sum()
    }

    /// Stops the agent; returns its final counters (name → value).
    fn stop_agent(&mut self) -> BTreeMap<String, u64> {
        let (code, log) = self.agent.take().unwrap().stop().expect("agent stops");
        assert_eq!(code, 0, "clean exit");
        let line = log
            .iter()
            .rev()
            .find(|l| l.contains("datapath counters"))
            .expect("final counters logged");
        let counters = line
            .split_whitespace()
            .filter_map(|word| {
                let word = word.trim_matches(|c| c == '"' || c == ',');
                let word = word.strip_prefix("counters=").unwrap_or(word);
                let (name, value) = word.split_once('=')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect();
        eprintln!(
            "{} ({:?}): balancer counters {counters:?}",
            self.mode.name(),
            self.attach
        );
        counters
    }
}

fn count(counters: &BTreeMap<String, u64>, which: Counter) -> u64 {
    counters.get(which.name()).copied().unwrap_or(0)
}

/// Every datagram to a VIP was three fragments: its first recorded, the two later ones sent after
/// it (none left to the stack untranslated); nothing else was fragmented.
fn check_fragments(counters: &BTreeMap<String, u64>) {
    let datagrams = 2 * REQUESTS as u64;
    assert_eq!(
        count(counters, Counter::FragmentTracked),
        datagrams,
        "{counters:?}"
    );
    assert_eq!(
        count(counters, Counter::ForwardFragment),
        2 * datagrams,
        "{counters:?}"
    );
    assert_eq!(count(counters, Counter::PassFragment), 0, "{counters:?}");
}

#[test]
fn snat_tcp_and_udp_over_ipv4_and_ipv6() {
    snat(Attach::Xdp);
}

#[test]
fn snat_tcp_and_udp_over_ipv4_and_ipv6_through_tc() {
    snat(Attach::Tc);
}

fn snat(attach: Attach) {
    let mut setup = Setup::new(Mode::Snat, attach);
    let sent = setup.traffic();
    let peers = setup.peers();
    assert_eq!(
        peers.len(),
        4 * REQUESTS,
        "one peer per connection or datagram"
    );
    let ports = snat::DEFAULT_PORT_FIRST..=snat::DEFAULT_PORT_LAST;
    for peer in &peers {
        let node: IpAddr = if peer.is_ipv4() {
            BALANCER_CLIENT_SIDE_ADDR.into()
        } else {
            BALANCER_CLIENT_SIDE_ADDR6.into()
        };
        assert_eq!(peer.ip(), node, "backends see the node address: {peer}");
        assert!(ports.contains(&peer.port()), "a SNAT port: {peer}");
    }
    assert_eq!(setup.tcp_bytes(), sent, "every TCP byte arrived");
    let counters = setup.stop_agent();
    check_fragments(&counters);
    assert!(
        count(&counters, Counter::SnatReplyTranslated) > 0,
        "{counters:?}"
    );
    assert!(count(&counters, Counter::XmitRedirect) > 0, "{counters:?}");
    assert_eq!(
        count(&counters, Counter::ReplyTranslated),
        0,
        "{counters:?}"
    );
}

/// DSR checks shared by both flavours: the client's own address at the backends, and a balancer
/// that forwarded without translating anything back.
fn check_dsr(setup: &mut Setup, sent: u64) -> BTreeMap<String, u64> {
    let peers = setup.peers();
    assert_eq!(
        peers.len(),
        4 * REQUESTS + 2,
        "one peer per connection or datagram (and the two of `fragmentation_needed_about_a_reply`)"
    );
    for peer in &peers {
        let client: IpAddr = if peer.is_ipv4() {
            CLIENT_ADDR.into()
        } else {
            CLIENT_ADDR6.into()
        };
        assert_eq!(peer.ip(), client, "backends see the client itself: {peer}");
    }
    assert_eq!(setup.tcp_bytes(), sent, "every TCP byte arrived");
    let counters = setup.stop_agent();
    check_fragments(&counters);
    let name = setup.mode.name();
    assert!(
        count(&counters, Counter::XmitRedirect) > 0,
        "{name}: {counters:?}"
    );
    assert_eq!(
        count(&counters, Counter::IcmpErrorToBackend),
        2,
        "{name}: both errors went to their backend: {counters:?}"
    );
    for untouched in [Counter::ReplyTranslated, Counter::SnatReplyTranslated] {
        assert_eq!(
            count(&counters, untouched),
            0,
            "{name}: replies go straight to the client, untranslated: {counters:?}"
        );
    }
    assert!(
        count(&counters, Counter::PassNotService) >= 2 * REQUESTS as u64,
        "{name}: the replies crossed the node as plain routed traffic: {counters:?}"
    );
    counters
}

#[test]
fn dsr_l2_tcp_and_udp_over_ipv4_and_ipv6() {
    dsr_l2(Attach::Xdp);
}

#[test]
fn dsr_l2_tcp_and_udp_over_ipv4_and_ipv6_through_tc() {
    dsr_l2(Attach::Tc);
}

fn dsr_l2(attach: Attach) {
    let mut setup = Setup::new(Mode::DsrL2, attach);
    let sent = setup.traffic();
    setup.fragmentation_needed_about_a_reply();
    check_dsr(&mut setup, sent);
}

#[test]
fn dsr_ipip_tcp_and_udp_over_ipv4_and_ipv6() {
    dsr_ipip(Attach::Xdp);
}

#[test]
fn dsr_ipip_tcp_and_udp_over_ipv4_and_ipv6_through_tc() {
    dsr_ipip(Attach::Tc);
}

fn dsr_ipip(attach: Attach) {
    let mut setup = Setup::new(Mode::DsrIpip, attach);
    let sent = setup.traffic();
    setup.fragmentation_needed_about_a_reply();
    let counters = check_dsr(&mut setup, sent);
    assert_eq!(
        count(&counters, Counter::DropEncapTooBig),
        0,
        "{counters:?}"
    );
    let decapsulated = |which| -> u64 {
        setup
            .decaps
            .iter()
            .map(|d| {
                d.counters()
                    .unwrap()
                    .into_iter()
                    .find(|(c, _)| *c == which)
                    .unwrap()
                    .1
            })
            .sum()
    };
    // At least one packet per TCP connection (SYN, data, ACKs, FIN) and per datagram.
    for (family, which) in [
        ("IPv4", Counter::DecapOuterIpv4),
        ("IPv6", Counter::DecapOuterIpv6),
    ] {
        assert!(
            decapsulated(which) >= 4 * REQUESTS as u64,
            "{family} packets decapsulated on the backends: {}",
            decapsulated(which)
        );
    }
    assert_eq!(decapsulated(Counter::DecapDropUnknownEndpoint), 0);
    let total = decapsulated(Counter::DecapOuterIpv4) + decapsulated(Counter::DecapOuterIpv6);
    eprintln!(
        "decapsulated: {} IPv4, {} IPv6",
        decapsulated(Counter::DecapOuterIpv4),
        decapsulated(Counter::DecapOuterIpv6)
    );
    if attach == Attach::Tc {
        // GSO packets were encapsulated whole and segmented on the way out: the backends
        // decapsulated several packets per packet `lb_tc` sent (every one of them encapsulated).
        let sent = count(&counters, Counter::XmitRedirect) + count(&counters, Counter::XmitTx);
        assert!(
            total > 2 * sent,
            "GSO through IPIP: {total} packets decapsulated for {sent} redirected"
        );
    }
}

/// DSR IPIP over links without headroom for the outer header: the client's full-sized TCP
/// segments no longer fit once encapsulated. `lb_xdp` answers each with "fragmentation needed" /
/// "packet too big" announcing the link's MTU less the outer header; the client's stack lowers its
/// path MTU towards the VIP to that, resends smaller segments, and every byte arrives (without the
/// answer they are dropped and the connections stall).
#[test]
fn dsr_ipip_without_mtu_headroom_lowers_the_clients_path_mtu() {
    lowers_the_clients_path_mtu(
        Setup::with_headroom(Mode::DsrIpip, Attach::Xdp, false),
        [1480, 1460],
        (REQUESTS, &LARGE),
    );
}

/// The same through `lb_tc`, from a client that sends every segment as an skb of its own (TSO and
/// GSO off: a GSO packet is cut into segments that fit, never answered) with partial checksums,
/// which the balancer's interfaces finish on the way out: the answer's quote carries the
/// transport checksum that finishing leaves unchanged, so that the answer arrives intact.
#[test]
fn dsr_ipip_without_mtu_headroom_lowers_the_clients_path_mtu_through_tc() {
    let setup = Setup::with_headroom(Mode::DsrIpip, Attach::Tc, false);
    let out = setup
        .topology
        .client
        .exec("ethtool", &["-K", "eth0", "tso", "off", "gso", "off"])
        .expect("ethtool");
    assert!(
        out.status.success(),
        "ethtool -K eth0 tso off gso off: {out:?}"
    );
    lowers_the_clients_path_mtu(setup, [1480, 1460], (REQUESTS, &LARGE));
}

/// SNAT over balancer–backend links of a smaller MTU (1400) than the client's (the backends' own
/// interfaces keep 1500: their MSS does not shrink the client's segments). `lb_xdp` asks the FIB
/// before it translates a request and answers one too big for the link itself, from the VIP,
/// announcing the link's MTU: the client lowers its path MTU towards the VIP, and a 512 KiB
/// transfer to each VIP arrives whole. (The node's stack would answer the translated packet,
/// towards the SNAT address: lost, the client learns nothing.)
#[test]
fn snat_over_a_narrower_backend_link_lowers_the_clients_path_mtu() {
    lowers_the_clients_path_mtu(
        narrower_backend_links(Attach::Xdp),
        [1400, 1400],
        (1, &TRANSFER),
    );
}

/// The same through `lb_tc` (`tc::snat`), from a client whose full-sized segments are single skbs
/// (TSO and GSO off, as for DSR IPIP above: a GSO skb is segmented for the link, never answered).
#[test]
fn snat_over_a_narrower_backend_link_lowers_the_clients_path_mtu_through_tc() {
    let setup = narrower_backend_links(Attach::Tc);
    let out = setup
        .topology
        .client
        .exec("ethtool", &["-K", "eth0", "tso", "off", "gso", "off"])
        .expect("ethtool");
    assert!(
        out.status.success(),
        "ethtool -K eth0 tso off gso off: {out:?}"
    );
    lowers_the_clients_path_mtu(setup, [1400, 1400], (1, &TRANSFER));
}

/// SNAT VIPs whose backends are behind balancer links of MTU 1400.
fn narrower_backend_links(attach: Attach) -> Setup {
    let setup = Setup::new(Mode::Snat, attach);
    for b in &setup.topology.backends {
        setup
            .topology
            .balancer
            .ip_cmd(&format!("link set dev {} mtu 1400", b.balancer_iface))
            .unwrap();
    }
    setup
}

/// `requests` connections per VIP, each sending `payload`.
fn lowers_the_clients_path_mtu(
    mut setup: Setup,
    mtus: [u32; 2],
    (requests, payload): (usize, &'static [u8]),
) {
    let client = &setup.topology.client;
    for (vip, mtu) in [IpAddr::from(VIP), IpAddr::from(VIP6)]
        .into_iter()
        .zip(mtus)
    {
        assert_eq!(client.learnt_mtu(vip), None, "no PMTU towards {vip} yet");
        for result in tcp_requests(client, SocketAddr::new(vip, 80), requests, payload) {
            result.unwrap_or_else(|e| panic!("a connection to {vip} failed: {e}"));
        }
        assert_eq!(
            client.learnt_mtu(vip),
            Some(mtu),
            "the client's path MTU towards {vip}"
        );
    }
    let sent = 2 * (requests * payload.len()) as u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while setup.tcp_bytes() < sent && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(setup.tcp_bytes(), sent, "every TCP byte arrived");
    let counters = setup.stop_agent();
    // One answer per connection until the path MTU is learnt, at least one per family.
    assert!(
        count(&counters, Counter::IcmpTooBigSent) >= 2,
        "{counters:?}"
    );
}

/// A SNAT request whose TTL expires at the balancer, as the first probe of a UDP traceroute: one
/// datagram with TTL / hop limit 1 from a socket connected to each VIP, with `IP_RECVERR` /
/// `IPV6_RECVERR`. The datapath answers "time exceeded" from the VIP, quoting the probe as the
/// client sent it: the socket's next `recv` fails with `EHOSTUNREACH`, and its error queue holds
/// an ICMP "time exceeded" from the VIP. (The node's stack would answer the translated probe,
/// towards the SNAT address: the client would hear nothing.) Then, with unreachable routes to
/// both backends on the balancer, a datagram with the default TTL gets "destination
/// unreachable" (host / address unreachable) from the VIP the same way.
#[test]
fn snat_time_exceeded_and_unreachable_reach_the_client_socket() {
    errors_at_the_client_socket(Attach::Xdp);
}

#[test]
fn snat_time_exceeded_and_unreachable_reach_the_client_socket_through_tc() {
    errors_at_the_client_socket(Attach::Tc);
}

fn errors_at_the_client_socket(attach: Attach) {
    let mut setup = Setup::new(Mode::Snat, attach);
    for (vip, icmp_type) in [(IpAddr::from(VIP), 11u8), (IpAddr::from(VIP6), 3)] {
        let (errno, error) = in_netns(&setup.topology.client, move || {
            probe(SocketAddr::new(vip, 53), 1)
        });
        assert_eq!(
            errno,
            libc::EHOSTUNREACH,
            "{attach:?}: a probe to {vip} with TTL 1 fails at the client's socket"
        );
        assert_eq!(
            error,
            Some(QueuedError {
                icmp_type,
                code: 0,
                offender: vip
            }),
            "{attach:?}: the client's error queue names time exceeded from {vip}"
        );
    }
    for b in &setup.topology.backends {
        let balancer = &setup.topology.balancer;
        balancer
            .ip_cmd(&format!("route add unreachable {}/32", b.addr))
            .unwrap();
        balancer
            .ip_cmd(&format!("-6 route add unreachable {}/128", b.addr6))
            .unwrap();
    }
    for (vip, icmp_type, code) in [(IpAddr::from(VIP), 3u8, 1u8), (IpAddr::from(VIP6), 1, 3)] {
        let (errno, error) = in_netns(&setup.topology.client, move || {
            probe(SocketAddr::new(vip, 53), 64)
        });
        assert_eq!(
            errno,
            libc::EHOSTUNREACH,
            "{attach:?}: a datagram to {vip}, its backends unreachable, fails at the socket"
        );
        assert_eq!(
            error,
            Some(QueuedError {
                icmp_type,
                code,
                offender: vip
            }),
            "{attach:?}: the client's error queue names destination unreachable from {vip}"
        );
    }
    let counters = setup.stop_agent();
    assert_eq!(
        count(&counters, Counter::IcmpTimeExceededSent),
        2,
        "{counters:?}"
    );
    assert_eq!(
        count(&counters, Counter::IcmpUnreachableSent),
        2,
        "{counters:?}"
    );
    assert_eq!(count(&counters, Counter::PassFibFailed), 0, "{counters:?}");
}

/// An ICMP error from a socket's error queue (`struct sock_extended_err` and its offender).
#[derive(Debug, PartialEq, Eq)]
struct QueuedError {
    icmp_type: u8,
    code: u8,
    offender: IpAddr,
}

/// Sends one UDP datagram with TTL / hop limit `ttl` from a socket (of the calling thread's
/// namespace) connected to `vip`, with ICMP errors reported; returns the errno of the next `recv`
/// and the ICMP error queued on the socket.
fn probe(vip: SocketAddr, ttl: libc::c_int) -> (i32, Option<QueuedError>) {
    use std::os::fd::AsRawFd;
    let any: SocketAddr = if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .unwrap();
    let socket = UdpSocket::bind(any).expect("bind");
    let fd = socket.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: an int option of a socket this function owns.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &value as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt({level}, {name})");
    };
    if vip.is_ipv4() {
        set(libc::IPPROTO_IP, libc::IP_RECVERR, 1);
        set(libc::IPPROTO_IP, libc::IP_TTL, ttl);
    } else {
        set(libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1);
        set(libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, ttl);
    }
    socket.connect(vip).expect("connect");
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    socket.send(b"traceroute probe").expect("send");
    let mut buf = [0u8; 64];
    let errno = match socket.recv(&mut buf) {
        Ok(n) => panic!("an answer of {n} bytes from {vip}"),
        Err(e) => e.raw_os_error().unwrap_or(0),
    };
    (errno, queued_error(fd, vip.is_ipv4()))
}

/// The ICMP error at the head of the error queue of the socket `fd`, if any.
fn queued_error(fd: std::os::fd::RawFd, v4: bool) -> Option<QueuedError> {
    let mut data = [0u8; 128];
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid; its buffers are set just below and outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: the buffers of `msg` are valid for their lengths.
    if unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) } < 0 {
        return None;
    }
    let (level, kind) = if v4 {
        (libc::IPPROTO_IP, libc::IP_RECVERR)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
    };
    // SAFETY: walking the control messages the kernel wrote into `msg`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` points into `control`, as the kernel laid it out.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == level && header.cmsg_type == kind {
            // struct sock_extended_err (16 bytes), then the offender's sockaddr.
            // SAFETY: the kernel's error message: the struct and a sockaddr after it.
            let bytes = unsafe { std::slice::from_raw_parts(libc::CMSG_DATA(cmsg), 16 + 28) };
            let offender: IpAddr = if v4 {
                <[u8; 4]>::try_from(&bytes[20..24]).unwrap().into()
            } else {
                <[u8; 16]>::try_from(&bytes[24..40]).unwrap().into()
            };
            return Some(QueuedError {
                icmp_type: bytes[5],
                code: bytes[6],
                offender,
            });
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    None
}
