//! The forwarding modes (SNAT, DSR L2, DSR IPIP) and the decapsulation program on crafted frames
//! through BPF_PROG_TEST_RUN. Each fixture is a description, an input frame and the interface it
//! arrives on, the expected action, the expected output frame (built from scratch, full checksums,
//! compared byte for byte) and the counters that name the path. The balancer's fixtures run
//! through `lb_xdp` and through `lb_tc` (the TC datapath): the same frames and counters, each
//! program's verdicts.
//!
//! `bpf_fib_lookup` answers from the namespace of the thread that runs the test, so the balancer's
//! fixtures run inside the balancer namespace of a real topology (routes, interfaces, and permanent
//! neighbour entries with the real MAC addresses), with the datapath attached to its interfaces as
//! in production.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use etherparse::Ipv4Header;
use lb_agent::{
    config::Config,
    datapath::{AttachMode, Datapath, TC_PROGRAM},
    decap::{Decap, DecapOptions},
};
use lb_common::{
    counters::Counter,
    modes::{encap, snat},
    protocol,
};
use lb_tests::{
    frames::{
        fragments, frame, frame_via, icmp_error_via, inspect, ip_packet,
        quote_unchanged_by_checksum_completion, with_ipv4_options, IcmpError, ACK, FIN_ACK, L4,
        SYN,
    },
    modes::{
        decapsulated, encapsulated, in_netns, link_of, run_on, run_tc_on, static_neighbour,
        TC_ACT_REDIRECT, XDP_REDIRECT, XDP_TX,
    },
    netns::TEST_PREFIX,
    test_run::{counter_in, flow_key, run, sa, TC_ACT_OK, TC_ACT_SHOT, XDP_DROP, XDP_PASS},
    topology::{
        Topology, BALANCER_CLIENT_IFACE, BALANCER_CLIENT_SIDE_ADDR, BALANCER_CLIENT_SIDE_ADDR6,
        CLIENT_ADDR, CLIENT_ADDR6,
    },
};

/// Node addresses: SNAT source and outer IPIP source.
const NODE4: Ipv4Addr = BALANCER_CLIENT_SIDE_ADDR;
const NODE6: Ipv6Addr = BALANCER_CLIENT_SIDE_ADDR6;
/// On-link behind to-b1 (a /32 route) but never resolved: no neighbour entry.
const UNRESOLVED4: &str = "203.0.113.200";
/// Routed through backend 1 as a gateway: not on-link.
const BEHIND_GATEWAY4: &str = "203.0.113.201";
/// Unreachable routes.
const UNREACHABLE4: &str = "203.0.113.202";
const UNREACHABLE6: &str = "2001:db8:203:3::1";
/// In to-b1's /64, never resolved.
const UNRESOLVED6: &str = "2001:db8:203:1::99";
/// SNAT backends routed through backend 1 on a path whose MTU is 1400 (a route's `mtu lock`),
/// smaller than the client's 1500.
const NARROW4: &str = "203.0.113.203";
const NARROW6: &str = "2001:db8:203:2::1";
const NARROW_MTU: u16 = 1400;
const PAYLOAD: &[u8] = b"payload";
/// Routers on the client's side, which send ICMP errors about replies.
const CLIENT_ROUTER4: &str = "192.0.2.254";
const CLIENT_ROUTER6: &str = "2001:db8:2::fe";

/// One service per mode, family and protocol on backend 1, and the failure cases.
fn config(b1: Ipv4Addr, b1_6: Ipv6Addr) -> String {
    let mut yaml = format!("node:\n  ipv4: {NODE4}\n  ipv6: {NODE6}\nservices:\n");
    let mut service = |name: &str,
                       vip: &str,
                       port: u16,
                       proto: &str,
                       mode: &str,
                       backend: &str,
                       backend_port: u16| {
        yaml += &format!(
            "  - {{ name: {name}, vip: \"{vip}\", port: {port}, protocol: {proto}, mode: {mode},\n      \
             backends: [ {{ address: \"{backend}\", port: {backend_port} }} ] }}\n"
        );
    };
    for (suffix, vip_net, backend) in [
        ("", "198.51.100.", IpAddr::from(b1)),
        ("6", "2001:db8:100::", IpAddr::from(b1_6)),
    ] {
        let backend = backend.to_string();
        for (mode, host, tcp_port, udp_port) in [
            ("snat", 40, 8080, 5353),
            ("dsr-l2", 41, 80, 0),
            ("dsr-ipip", 42, 80, 53),
        ] {
            let vip = format!("{vip_net}{host}");
            let tcp = format!("{mode}-tcp{suffix}");
            let udp = format!("{mode}-udp{suffix}");
            service(&tcp, &vip, 80, "tcp", mode, &backend, tcp_port);
            service(&udp, &vip, 53, "udp", mode, &backend, udp_port);
        }
    }
    // Failure cases.
    for (name, vip, mode, backend) in [
        ("l2-unresolved", "198.51.100.43", "dsr-l2", UNRESOLVED4),
        ("l2-gateway", "198.51.100.44", "dsr-l2", BEHIND_GATEWAY4),
        ("l2-unreachable", "198.51.100.45", "dsr-l2", UNREACHABLE4),
        ("snat-unresolved", "198.51.100.46", "snat", UNRESOLVED4),
        ("ipip-unresolved", "198.51.100.47", "dsr-ipip", UNRESOLVED4),
        ("l2-unresolved6", "2001:db8:100::43", "dsr-l2", UNRESOLVED6),
        ("snat-narrow", "198.51.100.48", "snat", NARROW4),
        ("snat-narrow6", "2001:db8:100::48", "snat", NARROW6),
        ("snat-unreachable", "198.51.100.49", "snat", UNREACHABLE4),
        (
            "snat-unreachable6",
            "2001:db8:100::49",
            "snat",
            UNREACHABLE6,
        ),
    ] {
        service(name, vip, 80, "tcp", mode, backend, 80);
    }
    yaml
}

enum Expect {
    /// This verdict and exactly this output frame.
    Frame(Verdict, Vec<u8>),
    Dropped,
}

/// What becomes of a packet that goes on, in terms of either program.
#[derive(Clone, Copy, Debug)]
enum Verdict {
    /// To the FIB's next hop on another interface.
    Redirect,
    /// Back out of the interface it came in on.
    Tx,
    /// To the stack.
    Pass,
}

/// The program a fixture runs through.
#[derive(Clone, Copy, Debug)]
enum Program {
    Xdp,
    Tc,
}

impl Program {
    /// Runs `input` as received on interface `ingress`.
    fn run(self, datapath: &mut Datapath, input: &[u8], ingress: u32) -> (u32, Vec<u8>) {
        match self {
            Program::Xdp => run_on(datapath.xdp_program(), input, ingress),
            Program::Tc => run_tc_on(
                datapath.tc_program_named(TC_PROGRAM).expect("lb_tc loads"),
                input,
                ingress,
            ),
        }
    }

    /// The program's action for `verdict` (`lb_tc` redirects to the ingress interface as to any).
    fn action(self, verdict: Verdict) -> u32 {
        match (self, verdict) {
            (Program::Xdp, Verdict::Redirect) => XDP_REDIRECT,
            (Program::Xdp, Verdict::Tx) => XDP_TX,
            (Program::Xdp, Verdict::Pass) => XDP_PASS,
            (Program::Tc, Verdict::Redirect | Verdict::Tx) => TC_ACT_REDIRECT,
            (Program::Tc, Verdict::Pass) => TC_ACT_OK,
        }
    }

    fn dropped(self) -> u32 {
        match self {
            Program::Xdp => XDP_DROP,
            Program::Tc => TC_ACT_SHOT,
        }
    }

    /// The ICMP `error` from `vip` this program answers the client's frame `input` with, back
    /// out of the interface it came in on (`macs`): the quote is the IP header and 8 bytes
    /// (`lb_xdp`), or 20 bytes whose transport checksum, `check_at` bytes into the transport
    /// header (16 TCP, 6 UDP), is the value finishing it leaves as it is (`lb_tc`).
    fn answer(
        self,
        input: &[u8],
        check_at: usize,
        error: IcmpError,
        vip: IpAddr,
        client: IpAddr,
        macs: ([u8; 6], [u8; 6]),
    ) -> Vec<u8> {
        let ip_len = if vip.is_ipv4() { 20 } else { 40 };
        let quote = match self {
            Program::Xdp => input[14..14 + ip_len + 8].to_vec(),
            Program::Tc => quote_unchanged_by_checksum_completion(&input[14..], ip_len, check_at),
        };
        may_fragment(icmp_error_via(error, vip, client, &quote, macs, 64))
    }

    fn attach_mode(self) -> AttachMode {
        match self {
            Program::Xdp => AttachMode::Xdp,
            Program::Tc => AttachMode::Tc,
        }
    }
}

struct Fixture {
    what: String,
    input: Vec<u8>,
    ingress: u32,
    expect: Expect,
    counters: Vec<Counter>,
}

/// `frame` (Ethernet, IPv4 or IPv6) with IPv4's "don't fragment" cleared: a sender that lets the
/// path fragment, and the datapath's own ICMP errors, sent without it as Linux sends its own.
fn may_fragment(mut frame: Vec<u8>) -> Vec<u8> {
    if let Ok((mut header, _)) = Ipv4Header::from_slice(&frame[14..]) {
        header.dont_fragment = false;
        header.header_checksum = header.calc_header_checksum();
        let mut bytes = Vec::new();
        header.write(&mut bytes).unwrap();
        frame[14..14 + bytes.len()].copy_from_slice(&bytes);
    }
    frame
}

/// The SNAT port the datapath picks first for `client → vip`.
fn snat_port(proto: u8, client: SocketAddr, vip: SocketAddr) -> u16 {
    let hash = snat::port_hash(&flow_key(proto, client, vip));
    snat::candidate_port(
        hash,
        snat::DEFAULT_PORT_FIRST,
        (snat::DEFAULT_PORT_LAST - snat::DEFAULT_PORT_FIRST) as u32 + 1,
        0,
    )
}

#[test]
fn balancer_fixtures_for_every_mode_family_and_protocol() {
    balancer_fixtures(Program::Xdp);
}

/// The same fixtures through `lb_tc`: every mode forwarded on the skb as `lb_xdp` forwards it.
#[test]
fn balancer_fixtures_for_every_mode_family_and_protocol_through_tc() {
    balancer_fixtures(Program::Tc);
}

/// The balancer of a one-backend topology, set up for fixtures: permanent neighbours with the
/// real MACs (deterministic next hops), the failure routes, and the facts the fixtures need.
struct Balancer {
    topology: Topology,
    to_client: u32,
    to_b1: u32,
    /// MAC pairs (source, destination) of frames client → balancer, backend 1 → balancer,
    /// balancer → backend 1 and balancer → client.
    from_client: ([u8; 6], [u8; 6]),
    from_b1: ([u8; 6], [u8; 6]),
    to_backend: ([u8; 6], [u8; 6]),
    to_client_macs: ([u8; 6], [u8; 6]),
}

impl Balancer {
    fn new() -> Self {
        let topology = Topology::new(TEST_PREFIX, 1).expect("topology");
        let (lb, b1) = (&topology.balancer, &topology.backends[0]);
        let (_, client_mac) = link_of(&topology.client, "eth0");
        let (to_client, to_client_mac) = link_of(lb, BALANCER_CLIENT_IFACE);
        let (to_b1, to_b1_mac) = link_of(lb, &b1.balancer_iface);
        let (_, b1_mac) = link_of(&b1.ns, "eth0");
        let iface = b1.balancer_iface.as_str();
        static_neighbour(lb, b1.addr.into(), b1_mac, iface).unwrap();
        static_neighbour(lb, b1.addr6.into(), b1_mac, iface).unwrap();
        static_neighbour(lb, CLIENT_ADDR.into(), client_mac, BALANCER_CLIENT_IFACE).unwrap();
        static_neighbour(lb, CLIENT_ADDR6.into(), client_mac, BALANCER_CLIENT_IFACE).unwrap();
        lb.ip_cmd(&format!("route add {UNRESOLVED4}/32 dev {iface}"))
            .unwrap();
        lb.ip_cmd(&format!("route add {BEHIND_GATEWAY4}/32 via {}", b1.addr))
            .unwrap();
        lb.ip_cmd(&format!("route add unreachable {UNREACHABLE4}/32"))
            .unwrap();
        lb.ip_cmd(&format!("-6 route add unreachable {UNREACHABLE6}/128"))
            .unwrap();
        lb.ip_cmd(&format!(
            "route add {NARROW4}/32 via {} mtu lock {NARROW_MTU}",
            b1.addr
        ))
        .unwrap();
        lb.ip_cmd(&format!(
            "-6 route add {NARROW6}/128 via {} mtu lock {NARROW_MTU}",
            b1.addr6
        ))
        .unwrap();
        Self {
            to_client,
            to_b1,
            from_client: (client_mac, to_client_mac),
            from_b1: (b1_mac, to_b1_mac),
            to_backend: (to_b1_mac, b1_mac),
            to_client_macs: (to_client_mac, client_mac),
            topology,
        }
    }

    fn b1(&self) -> &lb_tests::topology::Backend {
        &self.topology.backends[0]
    }

    /// Runs `fixtures` in order through `program`, attached to the balancer's interfaces with the
    /// config of [`config`]; then `after` on the datapath. Fails with every mismatch at once.
    fn run(&self, program: Program, fixtures: &[Fixture], after: impl FnOnce(&Datapath) + Send) {
        let yaml = config(self.b1().addr, self.b1().addr6);
        let interfaces = self.topology.balancer_interfaces();
        in_netns(&self.topology.balancer, move || {
            let mut datapath = Datapath::load().expect("load datapath");
            datapath
                .apply(&Config::from_yaml(&yaml).expect("config"))
                .expect("apply");
            for iface in &interfaces {
                datapath
                    .attach_with(iface, program.attach_mode())
                    .expect("attach");
            }
            let mut failures = Vec::new();
            for fixture in fixtures {
                let before = datapath.counters().unwrap();
                let (action, out) = program.run(&mut datapath, &fixture.input, fixture.ingress);
                let after = datapath.counters().unwrap();
                let what = format!("{program:?}: {}", fixture.what);
                match &fixture.expect {
                    Expect::Frame(verdict, want) => {
                        let want_action = program.action(*verdict);
                        if action != want_action || out != *want {
                            failures.push(format!(
                                "{what}: got action {action}, want {want_action} ({verdict:?})\n  got  {out:02x?}\n  want {want:02x?}"
                            ));
                        }
                    }
                    Expect::Dropped => {
                        if action != program.dropped() {
                            failures.push(format!("{what}: got action {action}, want a drop"));
                        }
                    }
                }
                for c in &fixture.counters {
                    let delta = counter_in(&after, *c) - counter_in(&before, *c);
                    if delta != 1 {
                        failures.push(format!("{what}: {} moved by {delta}, want 1", c.name()));
                    }
                }
            }
            assert!(failures.is_empty(), "{}", failures.join("\n"));
            after(&datapath);
        });
    }
}

fn balancer_fixtures(program: Program) {
    let balancer = Balancer::new();
    let b1 = balancer.b1();
    let (to_client, to_b1) = (balancer.to_client, balancer.to_b1);
    let (from_client, from_b1) = (balancer.from_client, balancer.from_b1);
    let (to_backend, to_client_macs) = (balancer.to_backend, balancer.to_client_macs);

    let mut fixtures = Vec::new();
    for (client_ip, b1_ip, node, vip_net) in [
        (
            IpAddr::from(CLIENT_ADDR),
            IpAddr::from(b1.addr),
            IpAddr::from(NODE4),
            "198.51.100.",
        ),
        (
            IpAddr::from(CLIENT_ADDR6),
            IpAddr::from(b1.addr6),
            IpAddr::from(NODE6),
            "2001:db8:100::",
        ),
    ] {
        let family = if client_ip.is_ipv4() { "IPv4" } else { "IPv6" };
        let vip = |host: u8, port: u16| {
            SocketAddr::new(format!("{vip_net}{host}").parse().unwrap(), port)
        };
        for (l4, proto, name, vport, snat_backend_port, client_port) in [
            (SYN, protocol::TCP, "TCP", 80, 8080, 40000),
            (L4::Udp, protocol::UDP, "UDP", 53, 5353, 40001),
        ] {
            let client = SocketAddr::new(client_ip, client_port);
            let reply_l4 = if proto == protocol::TCP { ACK } else { L4::Udp };

            // SNAT, both directions.
            let snat_vip = vip(40, vport);
            let port = snat_port(proto, client, snat_vip);
            let node_end = SocketAddr::new(node, port);
            let backend = SocketAddr::new(b1_ip, snat_backend_port);
            fixtures.push(Fixture {
                what: format!("SNAT {family} {name} to VIP"),
                input: frame_via(l4, client, snat_vip, PAYLOAD, from_client, 64),
                ingress: to_client,
                expect: Expect::Frame(
                    Verdict::Redirect,
                    frame_via(l4, node_end, backend, PAYLOAD, to_backend, 63),
                ),
                counters: vec![Counter::ForwardNewFlow, Counter::XmitRedirect],
            });
            fixtures.push(Fixture {
                what: format!("SNAT {family} {name} reply"),
                input: frame_via(reply_l4, backend, node_end, PAYLOAD, from_b1, 64),
                ingress: to_b1,
                expect: Expect::Frame(
                    Verdict::Redirect,
                    frame_via(reply_l4, snat_vip, client, PAYLOAD, to_client_macs, 63),
                ),
                counters: vec![Counter::SnatReplyTranslated, Counter::XmitRedirect],
            });

            // DSR L2: only the MACs change.
            let l2_vip = vip(41, vport);
            fixtures.push(Fixture {
                what: format!("DSR L2 {family} {name}"),
                input: frame_via(l4, client, l2_vip, PAYLOAD, from_client, 64),
                ingress: to_client,
                expect: Expect::Frame(
                    Verdict::Redirect,
                    frame_via(l4, client, l2_vip, PAYLOAD, to_backend, 64),
                ),
                counters: vec![Counter::ForwardNewFlow, Counter::XmitRedirect],
            });
            let one_armed = SocketAddr::new(client_ip, client_port + 100);
            fixtures.push(Fixture {
                what: format!("DSR L2 {family} {name}, client on the backends' segment"),
                input: frame_via(l4, one_armed, l2_vip, PAYLOAD, from_b1, 64),
                ingress: to_b1,
                expect: Expect::Frame(
                    Verdict::Tx,
                    frame_via(l4, one_armed, l2_vip, PAYLOAD, to_backend, 64),
                ),
                counters: vec![Counter::ForwardNewFlow, Counter::XmitTx],
            });

            // DSR IPIP: outer header in front of the unchanged packet.
            let ipip_vip = vip(42, vport);
            let inner = frame_via(l4, client, ipip_vip, PAYLOAD, from_client, 64);
            let label = if client_ip.is_ipv4() {
                0
            } else {
                encap::flow_label(&flow_key(proto, client, ipip_vip))
            };
            fixtures.push(Fixture {
                what: format!("DSR IPIP {family} {name}"),
                input: inner.clone(),
                ingress: to_client,
                expect: Expect::Frame(
                    Verdict::Redirect,
                    encapsulated(&inner, node, b1_ip, label, to_backend),
                ),
                counters: vec![Counter::ForwardNewFlow, Counter::XmitRedirect],
            });

            // ICMP errors about these flows leave as the flows' packets do.
            let v4 = client_ip.is_ipv4();
            let too_big = IcmpError::TooBig {
                mtu: if v4 { 1200 } else { 1280 },
            };
            let router: IpAddr = if v4 { CLIENT_ROUTER4 } else { CLIENT_ROUTER6 }
                .parse()
                .unwrap();
            let quote =
                |l4, src, dst| ip_packet(&frame_via(l4, src, dst, PAYLOAD, to_client_macs, 60));
            // A reply of each flow as its client got it, quoted by a router on the client's path.
            let reply_error = |vip: SocketAddr, client: SocketAddr| {
                let quoted = quote(reply_l4, vip, client);
                icmp_error_via(too_big, router, vip.ip(), &quoted, from_client, 64)
            };
            let to_backend_counters = vec![Counter::IcmpErrorToBackend, Counter::XmitRedirect];
            fixtures.push(Fixture {
                what: format!("SNAT {family} {name}: error about a reply → backend, from the node"),
                input: reply_error(snat_vip, client),
                ingress: to_client,
                expect: Expect::Frame(
                    Verdict::Redirect,
                    icmp_error_via(
                        too_big,
                        node,
                        b1_ip,
                        &quote(reply_l4, backend, node_end),
                        to_backend,
                        63,
                    ),
                ),
                counters: to_backend_counters.clone(),
            });
            fixtures.push(Fixture {
                what: format!("SNAT {family} {name}: the backend's error about a request → client, from the VIP"),
                input: icmp_error_via(
                    IcmpError::PortUnreachable,
                    b1_ip,
                    node,
                    &quote(l4, node_end, backend),
                    from_b1,
                    64,
                ),
                ingress: to_b1,
                expect: Expect::Frame(
                    Verdict::Redirect,
                    icmp_error_via(
                        IcmpError::PortUnreachable,
                        snat_vip.ip(),
                        client_ip,
                        &quote(l4, client, snat_vip),
                        to_client_macs,
                        63,
                    ),
                ),
                counters: vec![Counter::IcmpErrorToClient, Counter::XmitRedirect],
            });
            let input = reply_error(l2_vip, client);
            fixtures.push(Fixture {
                what: format!(
                    "DSR L2 {family} {name}: error about a reply → backend's MAC, unchanged"
                ),
                input: input.clone(),
                ingress: to_client,
                expect: Expect::Frame(
                    Verdict::Redirect,
                    [&to_backend.1[..], &to_backend.0, &input[12..]].concat(),
                ),
                counters: to_backend_counters.clone(),
            });
            let input = reply_error(ipip_vip, client);
            fixtures.push(Fixture {
                what: format!("DSR IPIP {family} {name}: error about a reply → backend, encapsulated as the flow"),
                input: input.clone(),
                ingress: to_client,
                expect: Expect::Frame(
                    Verdict::Redirect,
                    encapsulated(&input, node, b1_ip, label, to_backend),
                ),
                counters: to_backend_counters,
            });
            let unknown = reply_error(snat_vip, SocketAddr::new(client_ip, 39999));
            fixtures.push(Fixture {
                what: format!(
                    "SNAT {family} {name}: error about a reply of an unknown flow, untouched"
                ),
                input: unknown.clone(),
                ingress: to_client,
                expect: Expect::Frame(Verdict::Pass, unknown),
                counters: vec![Counter::PassIcmpErrorUntracked],
            });
        }
    }

    // What the fast path cannot send.
    let client = SocketAddr::new(CLIENT_ADDR.into(), 41000);
    let fail = |host: u8| SocketAddr::new(format!("198.51.100.{host}").parse().unwrap(), 80);
    let unresolved = SocketAddr::new(UNRESOLVED4.parse().unwrap(), 80);
    for (host, what, counter) in [
        (43, "DSR L2, backend MAC unknown", Counter::DropDsrNoNeigh),
        (
            44,
            "DSR L2, backend behind a gateway",
            Counter::DropDsrNotOnLink,
        ),
        (45, "DSR L2, backend unreachable", Counter::DropDsrNoRoute),
    ] {
        fixtures.push(Fixture {
            what: what.into(),
            input: frame_via(SYN, client, fail(host), PAYLOAD, from_client, 64),
            ingress: to_client,
            expect: Expect::Dropped,
            counters: vec![counter],
        });
    }
    let client6 = SocketAddr::new(CLIENT_ADDR6.into(), 41000);
    fixtures.push(Fixture {
        what: "DSR L2 IPv6, backend MAC unknown".into(),
        input: frame_via(
            SYN,
            client6,
            sa("[2001:db8:100::43]:80"),
            PAYLOAD,
            from_client,
            64,
        ),
        ingress: to_client,
        expect: Expect::Dropped,
        counters: vec![Counter::DropDsrNoNeigh],
    });
    let port = snat_port(protocol::TCP, client, fail(46));
    fixtures.push(Fixture {
        what: "SNAT, backend MAC unknown: translated, to the stack".into(),
        input: frame_via(SYN, client, fail(46), PAYLOAD, from_client, 64),
        ingress: to_client,
        expect: Expect::Frame(
            Verdict::Pass,
            frame_via(
                SYN,
                SocketAddr::new(NODE4.into(), port),
                SocketAddr::new(unresolved.ip(), 80),
                PAYLOAD,
                from_client,
                64,
            ),
        ),
        counters: vec![Counter::PassFibNoNeigh],
    });
    let inner = frame_via(SYN, client, fail(47), PAYLOAD, from_client, 64);
    fixtures.push(Fixture {
        what: "DSR IPIP, backend MAC unknown: encapsulated, to the stack".into(),
        input: inner.clone(),
        ingress: to_client,
        expect: Expect::Frame(
            Verdict::Pass,
            encapsulated(&inner, NODE4.into(), unresolved.ip(), 0, from_client),
        ),
        counters: vec![Counter::PassFibNoNeigh],
    });
    // Full-sized packets too big for the backend's link once encapsulated: each program answers
    // the client with the MTU that fits (the link's 1500 less the outer header), quoting the
    // packet's IP header and 8 bytes (`lb_xdp`), or 20 with the transport checksum that finishing
    // it leaves unchanged (`lb_tc`: see tc/too_big.rs); a packet that may be fragmented is dropped.
    for (client, vip, payload, mtu) in [
        (
            SocketAddr::new(CLIENT_ADDR.into(), 41001),
            sa("198.51.100.42:80"),
            1460,
            1480u16,
        ),
        (
            SocketAddr::new(CLIENT_ADDR6.into(), 41001),
            sa("[2001:db8:100::42]:80"),
            1440,
            1460,
        ),
    ] {
        for l4 in [ACK, L4::Udp] {
            // The same IP length for TCP and UDP.
            let payload = match l4 {
                L4::Udp => payload + 12,
                _ => payload,
            };
            let vip = match l4 {
                L4::Udp => SocketAddr::new(vip.ip(), 53),
                _ => vip,
            };
            let input = frame_via(l4, client, vip, &vec![7u8; payload], from_client, 64);
            let check_at = if l4 == L4::Udp { 6 } else { 16 };
            let answer = program.answer(
                &input,
                check_at,
                IcmpError::TooBig { mtu },
                vip.ip(),
                client.ip(),
                to_client_macs,
            );
            let proto = if l4 == L4::Udp { "UDP" } else { "TCP" };
            fixtures.push(Fixture {
                what: format!(
                    "DSR IPIP, full-sized {proto} packet to {vip} exceeds the MTU once encapsulated"
                ),
                input,
                ingress: to_client,
                expect: Expect::Frame(Verdict::Tx, answer),
                counters: vec![Counter::ForwardNewFlow, Counter::IcmpTooBigSent],
            });
        }
    }
    fixtures.push(Fixture {
        what: "DSR IPIP, a too-big IPv4 packet without \"don't fragment\": dropped".into(),
        input: may_fragment(frame_via(
            ACK,
            SocketAddr::new(CLIENT_ADDR.into(), 41003),
            sa("198.51.100.42:80"),
            &[7u8; 1460],
            from_client,
            64,
        )),
        ingress: to_client,
        expect: Expect::Dropped,
        counters: vec![Counter::DropEncapTooBig],
    });
    // SNAT requests too big for the path to their backend (MTU 1400): each program answers the
    // client before the translation, from the VIP, announcing the path's MTU (no outer header),
    // quoting as for DSR IPIP; the flow keeps its port, and the client's smaller retry goes
    // through. An IPv4 request that may be fragmented is translated and passed to the stack, which
    // fragments it.
    for (client, vip, narrow, payload) in [
        (
            SocketAddr::new(CLIENT_ADDR.into(), 41004),
            sa("198.51.100.48:80"),
            NARROW4,
            1460,
        ),
        (
            SocketAddr::new(CLIENT_ADDR6.into(), 41004),
            sa("[2001:db8:100::48]:80"),
            NARROW6,
            1440,
        ),
    ] {
        let input = frame_via(ACK, client, vip, &vec![7u8; payload], from_client, 64);
        let answer = program.answer(
            &input,
            16,
            IcmpError::TooBig { mtu: NARROW_MTU },
            vip.ip(),
            client.ip(),
            to_client_macs,
        );
        fixtures.push(Fixture {
            what: format!("SNAT, full-sized TCP packet to {vip} exceeds the path's MTU"),
            input,
            ingress: to_client,
            expect: Expect::Frame(Verdict::Tx, answer),
            counters: vec![Counter::ForwardNewFlow, Counter::IcmpTooBigSent],
        });
        let node: IpAddr = if vip.is_ipv4() {
            NODE4.into()
        } else {
            NODE6.into()
        };
        let node_end = SocketAddr::new(node, snat_port(protocol::TCP, client, vip));
        let backend = SocketAddr::new(narrow.parse().unwrap(), 80);
        fixtures.push(Fixture {
            what: format!("SNAT, the client's smaller retry to {vip}: same port, forwarded"),
            input: frame_via(ACK, client, vip, PAYLOAD, from_client, 64),
            ingress: to_client,
            expect: Expect::Frame(
                Verdict::Redirect,
                frame_via(ACK, node_end, backend, PAYLOAD, to_backend, 63),
            ),
            counters: vec![Counter::ForwardConntrackHit, Counter::XmitRedirect],
        });
    }
    let df_less_client = SocketAddr::new(CLIENT_ADDR.into(), 41005);
    let narrow_vip = sa("198.51.100.48:80");
    let port = snat_port(protocol::TCP, df_less_client, narrow_vip);
    fixtures.push(Fixture {
        what: "SNAT, a too-big IPv4 packet without \"don't fragment\": translated, to the stack"
            .into(),
        input: may_fragment(frame_via(
            ACK,
            df_less_client,
            narrow_vip,
            &[7u8; 1460],
            from_client,
            64,
        )),
        ingress: to_client,
        expect: Expect::Frame(
            Verdict::Pass,
            may_fragment(frame_via(
                ACK,
                SocketAddr::new(NODE4.into(), port),
                SocketAddr::new(NARROW4.parse().unwrap(), 80),
                &[7u8; 1460],
                from_client,
                64,
            )),
        ),
        counters: vec![Counter::PassFibFailed],
    });
    // SNAT requests whose TTL / hop limit would expire at the node: each program answers the
    // client "time exceeded" before the translation, from the VIP, quoting the request as it came
    // (as too-big answers do); the flow keeps its port, and the next request (TTL 2) goes through
    // with TTL 1. A UDP probe (traceroute's) the same, with enough payload for `lb_tc`'s quote.
    for (l4, client, vip, backend_port, payload) in [
        (SYN, client, sa("198.51.100.40:80"), 8080, PAYLOAD),
        (
            SYN,
            SocketAddr::new(CLIENT_ADDR6.into(), 41002),
            sa("[2001:db8:100::40]:80"),
            8080,
            PAYLOAD,
        ),
        (
            L4::Udp,
            SocketAddr::new(CLIENT_ADDR.into(), 41002),
            sa("198.51.100.40:53"),
            5353,
            &b"traceroute probe"[..],
        ),
    ] {
        let v4 = vip.is_ipv4();
        let (node, b1_ip): (IpAddr, IpAddr) = if v4 {
            (NODE4.into(), b1.addr.into())
        } else {
            (NODE6.into(), b1.addr6.into())
        };
        let (proto, name, check_at) = match l4 {
            L4::Udp => (protocol::UDP, "UDP", 6),
            _ => (protocol::TCP, "TCP", 16),
        };
        let input = frame_via(l4, client, vip, payload, from_client, 1);
        let answer = program.answer(
            &input,
            check_at,
            IcmpError::TimeExceeded,
            vip.ip(),
            client.ip(),
            to_client_macs,
        );
        fixtures.push(Fixture {
            what: format!("SNAT, {name} request to {vip} with TTL 1: answered time exceeded"),
            input,
            ingress: to_client,
            expect: Expect::Frame(Verdict::Tx, answer),
            counters: vec![Counter::ForwardNewFlow, Counter::IcmpTimeExceededSent],
        });
        let node_end = SocketAddr::new(node, snat_port(proto, client, vip));
        fixtures.push(Fixture {
            what: format!("SNAT, {name} request to {vip} with TTL 2: forwarded with TTL 1"),
            input: frame_via(l4, client, vip, payload, from_client, 2),
            ingress: to_client,
            expect: Expect::Frame(
                Verdict::Redirect,
                frame_via(
                    l4,
                    node_end,
                    SocketAddr::new(b1_ip, backend_port),
                    payload,
                    to_backend,
                    1,
                ),
            ),
            counters: vec![Counter::ForwardConntrackHit, Counter::XmitRedirect],
        });
    }
    // SNAT requests whose backend has an unreachable route: answered "destination unreachable"
    // (host / address unreachable) from the VIP, quoting the request as it came.
    for (client, vip) in [
        (client, sa("198.51.100.49:80")),
        (
            SocketAddr::new(CLIENT_ADDR6.into(), 41000),
            sa("[2001:db8:100::49]:80"),
        ),
    ] {
        let input = frame_via(SYN, client, vip, PAYLOAD, from_client, 64);
        let answer = program.answer(
            &input,
            16,
            IcmpError::HostUnreachable,
            vip.ip(),
            client.ip(),
            to_client_macs,
        );
        fixtures.push(Fixture {
            what: format!("SNAT, TCP request to {vip}, backend unreachable: answered so"),
            input,
            ingress: to_client,
            expect: Expect::Frame(Verdict::Tx, answer),
            counters: vec![Counter::ForwardNewFlow, Counter::IcmpUnreachableSent],
        });
    }
    // One that cannot be quoted (IPv4 options): translated, to the stack, as before (which
    // answers towards the node's SNAT address).
    let snat_vip = sa("198.51.100.40:80");
    let ttl_client = SocketAddr::new(CLIENT_ADDR.into(), 41003);
    let port = snat_port(protocol::TCP, ttl_client, snat_vip);
    let nops = [1u8; 4];
    fixtures.push(Fixture {
        what: "SNAT, TTL 1 with IPv4 options: translated, to the stack".into(),
        input: with_ipv4_options(
            &frame_via(SYN, ttl_client, snat_vip, PAYLOAD, from_client, 1),
            &nops,
        ),
        ingress: to_client,
        expect: Expect::Frame(
            Verdict::Pass,
            with_ipv4_options(
                &frame_via(
                    SYN,
                    SocketAddr::new(NODE4.into(), port),
                    SocketAddr::new(b1.addr.into(), 8080),
                    PAYLOAD,
                    from_client,
                    1,
                ),
                &nops,
            ),
        ),
        counters: vec![Counter::PassFibFailed],
    });

    balancer.run(program, &fixtures, |datapath| {
        // DSR never writes a reply translation: only the 4 SNAT flows, the 2 answered too big,
        // the 3 answered time exceeded and the 2 answered unreachable (kept for their retries),
        // and the 3 failure cases that were translated are in NAT_REPLY.
        assert_eq!(datapath.nat_reply_entries().unwrap(), 14);
    });
}

/// Fragmented UDP datagrams of every mode: each fragment leaves as its datagram's first did (the
/// first fragment is recorded after its rewrite, later ones, which have no ports, get the same
/// treatment from that record): SNAT both ways (addresses rewritten on both ends, TTL decremented,
/// to the FIB's next hop), DSR L2 (MACs of the backend), DSR IPIP (each fragment encapsulated, the
/// outer header itself never a fragment).
#[test]
fn fragments_of_every_mode_leave_as_their_first() {
    fragment_fixtures(Program::Xdp);
}

#[test]
fn fragments_of_every_mode_leave_as_their_first_through_tc() {
    fragment_fixtures(Program::Tc);
}

/// IP payload per fragment: an IPv6 fragment (40 + 8 + 1232 bytes) fits the 1500-byte MTU with
/// an outer IPv6 header in front.
const FRAGMENT_CHUNK: usize = 1232;

fn fragment_fixtures(program: Program) {
    let balancer = Balancer::new();
    let b1 = balancer.b1();
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let pieces = |from, to, macs, ttl, id| {
        fragments(
            &frame_via(L4::Udp, from, to, &payload, macs, ttl),
            id,
            FRAGMENT_CHUNK,
        )
    };
    let mut fixtures = Vec::new();
    let mut push =
        |what: String, input: Vec<Vec<u8>>, ingress, output: Vec<Vec<u8>>, first: &[Counter]| {
            assert_eq!(input.len(), 3);
            for (i, (input, output)) in input.into_iter().zip(output).enumerate() {
                let counters = if i == 0 {
                    first.to_vec()
                } else {
                    vec![Counter::ForwardFragment, Counter::XmitRedirect]
                };
                fixtures.push(Fixture {
                    what: format!("{what}, fragment {} of 3", i + 1),
                    input,
                    ingress,
                    expect: Expect::Frame(Verdict::Redirect, output),
                    counters,
                });
            }
        };
    let new_flow = [
        Counter::ForwardNewFlow,
        Counter::FragmentTracked,
        Counter::XmitRedirect,
    ];
    for (client_ip, b1_ip, node, vip_net, id) in [
        (
            IpAddr::from(CLIENT_ADDR),
            IpAddr::from(b1.addr),
            IpAddr::from(NODE4),
            "198.51.100.",
            0x4000,
        ),
        (
            IpAddr::from(CLIENT_ADDR6),
            IpAddr::from(b1.addr6),
            IpAddr::from(NODE6),
            "2001:db8:100::",
            0x6000_0000,
        ),
    ] {
        let family = if client_ip.is_ipv4() { "IPv4" } else { "IPv6" };
        let vip = |host: u8| SocketAddr::new(format!("{vip_net}{host}").parse().unwrap(), 53);
        let client = SocketAddr::new(client_ip, 42000);

        // SNAT, both directions.
        let snat_vip = vip(40);
        let node_end = SocketAddr::new(node, snat_port(protocol::UDP, client, snat_vip));
        let backend = SocketAddr::new(b1_ip, 5353);
        push(
            format!("SNAT {family} UDP to VIP"),
            pieces(client, snat_vip, balancer.from_client, 64, id),
            balancer.to_client,
            pieces(node_end, backend, balancer.to_backend, 63, id),
            &new_flow,
        );
        push(
            format!("SNAT {family} UDP reply"),
            pieces(backend, node_end, balancer.from_b1, 64, id + 1),
            balancer.to_b1,
            pieces(snat_vip, client, balancer.to_client_macs, 63, id + 1),
            &[
                Counter::SnatReplyTranslated,
                Counter::FragmentTracked,
                Counter::XmitRedirect,
            ],
        );

        // DSR L2: only the MACs change.
        let l2_vip = vip(41);
        push(
            format!("DSR L2 {family} UDP"),
            pieces(client, l2_vip, balancer.from_client, 64, id + 2),
            balancer.to_client,
            pieces(client, l2_vip, balancer.to_backend, 64, id + 2),
            &new_flow,
        );

        // DSR IPIP: every fragment encapsulated, with the first's flow label.
        let ipip_vip = vip(42);
        let label = if client_ip.is_ipv4() {
            0
        } else {
            encap::flow_label(&flow_key(protocol::UDP, client, ipip_vip))
        };
        let input = pieces(client, ipip_vip, balancer.from_client, 64, id + 3);
        let output = input
            .iter()
            .map(|inner| encapsulated(inner, node, b1_ip, label, balancer.to_backend))
            .collect();
        push(
            format!("DSR IPIP {family} UDP"),
            input,
            balancer.to_client,
            output,
            &new_flow,
        );
    }
    balancer.run(program, &fixtures, |_| {});
}

/// SNAT port allocation as a sequence: a flow keeps its port, candidates that are taken are skipped,
/// a full range drops (counted), a re-opened connection gets its own port back, and the port of a
/// flow that ended is reclaimed (counted). Outside a namespace with routes, `bpf_fib_lookup` fails
/// and the translated packets go to the stack, which is all this test needs to see the ports.
#[test]
fn snat_ports_are_kept_skipped_exhausted_and_reclaimed() {
    let yaml = "
node: { ipv4: 192.0.2.1, snat_ports: { first: 5000, last: 5001 } }
services:
  - { name: web, vip: 198.51.100.40, port: 80, protocol: tcp, mode: snat,
      backends: [ { address: 203.0.113.6, port: 8080 } ] }
";
    let mut datapath = Datapath::load().expect("load");
    datapath.apply(&Config::from_yaml(yaml).unwrap()).unwrap();
    let vip = sa("198.51.100.40:80");
    let counters = |d: &Datapath, c| counter_in(&d.counters().unwrap(), c);
    let send = |d: &mut Datapath, l4, client: SocketAddr| -> Option<SocketAddr> {
        let (action, out) = run(d.xdp_program(), &frame(l4, client, vip, b""));
        (action == XDP_PASS).then(|| inspect(&out).src)
    };
    let candidates = |client: SocketAddr| -> Vec<u16> {
        let hash = snat::port_hash(&flow_key(protocol::TCP, client, vip));
        (0..snat::ALLOCATION_ATTEMPTS)
            .map(|i| snat::candidate_port(hash, 5000, 2, i))
            .collect()
    };

    let a = sa("192.0.2.2:10000");
    let a_port = send(&mut datapath, SYN, a).expect("forwarded").port();
    assert_eq!(a_port, candidates(a)[0], "first candidate");
    assert_eq!(send(&mut datapath, ACK, a).unwrap().port(), a_port, "kept");

    // Another flow skips A's port.
    let b = (10001..11000)
        .map(|p| SocketAddr::new(a.ip(), p))
        .find(|c| candidates(*c)[0] == a_port)
        .expect("a client whose first candidate is taken");
    let b_port = send(&mut datapath, SYN, b).expect("forwarded").port();
    assert_ne!(b_port, a_port);
    assert_eq!(send(&mut datapath, ACK, b).unwrap().port(), b_port, "kept");

    // Both ports are in use: a third flow is dropped and counted.
    let c = sa("192.0.2.3:20000");
    let exhausted = counters(&datapath, Counter::DropSnatPortsExhausted);
    assert_eq!(send(&mut datapath, SYN, c), None, "range full");
    assert_eq!(
        counters(&datapath, Counter::DropSnatPortsExhausted),
        exhausted + 1
    );

    // A closes and re-opens on the same ports: a new connection with its own port back.
    send(&mut datapath, FIN_ACK, a);
    let new_flows = counters(&datapath, Counter::ForwardNewFlow);
    assert_eq!(send(&mut datapath, SYN, a).unwrap().port(), a_port);
    assert_eq!(counters(&datapath, Counter::ForwardNewFlow), new_flows + 1);

    // B's connection ends (its conntrack entry goes; its reply entry stays, as after an LRU
    // eviction or expiry): C reclaims B's port, and B's port now translates replies for C.
    let unrelated = flow_key(protocol::TCP, sa("192.0.2.99:1"), vip);
    assert!(datapath
        .forget_flow(&flow_key(protocol::TCP, b, vip), &unrelated)
        .unwrap());
    let reclaimed = counters(&datapath, Counter::SnatPortReclaimed);
    assert_eq!(send(&mut datapath, SYN, c).unwrap().port(), b_port);
    assert_eq!(
        counters(&datapath, Counter::SnatPortReclaimed),
        reclaimed + 1
    );
    let reply = frame(
        ACK,
        sa("203.0.113.6:8080"),
        SocketAddr::new("192.0.2.1".parse().unwrap(), b_port),
        b"",
    );
    let (action, out) = run(datapath.xdp_program(), &reply);
    assert_eq!(action, XDP_PASS);
    let got = inspect(&out);
    assert_eq!((got.src, got.dst), (vip, c), "reply goes to the new owner");
    assert!(got.checksums_ok);
}

/// DNAT keeps working next to the other modes, and its reply entries carry the DNAT mode.
#[test]
fn dnat_flows_are_untouched_by_the_new_modes() {
    let yaml = "
node: { ipv4: 192.0.2.1 }
services:
  - { name: dnat, vip: 198.51.100.10, port: 80, protocol: tcp,
      backends: [ { address: 203.0.113.6, port: 8080 } ] }
  - { name: snat, vip: 198.51.100.40, port: 80, protocol: tcp, mode: snat,
      backends: [ { address: 203.0.113.6, port: 8080 } ] }
";
    let mut datapath = Datapath::load().expect("load");
    datapath.apply(&Config::from_yaml(yaml).unwrap()).unwrap();
    let client = sa("192.0.2.2:40000");
    let (action, out) = run(
        datapath.xdp_program(),
        &frame(SYN, client, sa("198.51.100.10:80"), b"x"),
    );
    assert_eq!(action, XDP_PASS);
    assert_eq!(
        out,
        frame(SYN, client, sa("203.0.113.6:8080"), b"x"),
        "DNAT rewrite unchanged"
    );
    let (action, out) = run(
        datapath.xdp_program(),
        &frame(ACK, sa("203.0.113.6:8080"), client, b"r"),
    );
    assert_eq!(action, XDP_PASS);
    assert_eq!(out, frame(ACK, sa("198.51.100.10:80"), client, b"r"));
}

fn decap_frames() -> (Vec<u8>, Vec<u8>) {
    let inner4 = frame(SYN, sa("192.0.2.2:40000"), sa("198.51.100.42:80"), b"x");
    let inner6 = frame(
        L4::Udp,
        sa("[2001:db8:2::2]:40000"),
        sa("[2001:db8:100::42]:53"),
        b"q",
    );
    (inner4, inner6)
}

/// Description, input frame, expected inner frame (`None`: dropped), counter.
type DecapCase = (&'static str, Vec<u8>, Option<Vec<u8>>, Counter);

#[test]
fn decap_fixtures() {
    const MACS: ([u8; 6], [u8; 6]) = ([0x02, 0, 0, 0, 0, 0x11], [0x02, 0, 0, 0, 0, 0x12]);
    let balancer4: IpAddr = "203.0.113.5".parse().unwrap();
    let balancer6: IpAddr = "2001:db8:203:1::1".parse().unwrap();
    let local4: IpAddr = "203.0.113.6".parse().unwrap();
    let local6: IpAddr = "2001:db8:203:1::2".parse().unwrap();
    let mut decap = Decap::load(&DecapOptions {
        balancers: vec![balancer4, balancer6],
        local: vec![local4, local6],
    })
    .expect("load lb_decap");
    let (inner4, inner6) = decap_frames();
    let stranger4: IpAddr = "203.0.113.99".parse().unwrap();

    let mut truncated = encapsulated(&inner4, balancer4, local4, 0, MACS);
    truncated.truncate(14 + 20 + 10);
    let mut wrong_version = encapsulated(&inner4, balancer4, local4, 0, MACS);
    wrong_version[14 + 9] = 41; // says IPv6 inside, is IPv4
    let from_stranger = encapsulated(&inner4, stranger4, local4, 0, MACS);
    let to_stranger = encapsulated(&inner4, balancer4, stranger4, 0, MACS);

    use Counter::{DecapDropUnknownEndpoint, DecapOuterIpv4, DecapOuterIpv6, DropMalformed};
    let (tunnel4, tunnel6) = ((balancer4, local4), (balancer6, local6));
    // `inner` encapsulated in `tunnel` (outer source, destination), decapsulated byte-exact.
    let passes = |what, inner: &[u8], (src, dst), flow_label, counter| -> DecapCase {
        let input = encapsulated(inner, src, dst, flow_label, MACS);
        (what, input, Some(decapsulated(inner, MACS)), counter)
    };
    let dropped = |what, input, counter| -> DecapCase { (what, input, None, counter) };
    let cases: Vec<DecapCase> = vec![
        passes("IPv4 in IPv4", &inner4, tunnel4, 0, DecapOuterIpv4),
        passes("IPv6 in IPv6", &inner6, tunnel6, 0x12345, DecapOuterIpv6),
        passes("IPv6 in IPv4", &inner6, tunnel4, 0, DecapOuterIpv4),
        passes("IPv4 in IPv6", &inner4, tunnel6, 7, DecapOuterIpv6),
        dropped(
            "from an unknown source",
            from_stranger,
            DecapDropUnknownEndpoint,
        ),
        dropped("to another address", to_stranger, DecapDropUnknownEndpoint),
        dropped("inner header truncated", truncated, DropMalformed),
        dropped(
            "inner version differs from the outer protocol",
            wrong_version,
            DropMalformed,
        ),
    ];
    for (what, input, want, which) in cases {
        let before = counter_in(&decap.counters().unwrap(), which);
        let (action, out) = run(decap.program(), &input);
        match want {
            Some(want) => {
                assert_eq!(action, XDP_PASS, "{what}");
                assert_eq!(out, want, "{what}: byte-exact inner frame");
                assert!(inspect(&out).checksums_ok, "{what}");
            }
            None => assert_eq!(action, XDP_DROP, "{what}"),
        }
        assert_eq!(
            counter_in(&decap.counters().unwrap(), which),
            before + 1,
            "{what}: counted as {}",
            which.name()
        );
    }
    // Not encapsulated: untouched.
    for input in [inner4.clone(), inner6.clone()] {
        let before = counter_in(
            &decap.counters().unwrap(),
            Counter::DecapPassNotEncapsulated,
        );
        assert_eq!(run(decap.program(), &input), (XDP_PASS, input.clone()));
        assert_eq!(
            counter_in(
                &decap.counters().unwrap(),
                Counter::DecapPassNotEncapsulated
            ),
            before + 1
        );
    }
}

#[test]
fn decap_without_endpoint_lists_accepts_any() {
    let mut decap = Decap::load(&DecapOptions::default()).expect("load lb_decap");
    let (inner4, inner6) = decap_frames();
    let macs = ([0x02, 0, 0, 0, 0, 0x21], [0x02, 0, 0, 0, 0, 0x22]);
    for (inner, src, dst) in [
        (&inner4, "10.1.2.3", "10.4.5.6"),
        (&inner6, "2001:db8:9::1", "2001:db8:9::2"),
    ] {
        let input = encapsulated(inner, src.parse().unwrap(), dst.parse().unwrap(), 1, macs);
        assert_eq!(
            run(decap.program(), &input),
            (XDP_PASS, decapsulated(inner, macs))
        );
    }
}
