//! ICMP errors, IP fragments, IPv4 options and IPv6 extension headers through BPF_PROG_TEST_RUN, as
//! fixtures: description, input frame, expected action, expected output frame (built from scratch,
//! so every checksum in it is computed in full), and the exact set of counters the packet moves.
//! Rows run in order against one datapath: the fragment rows are the pieces of datagrams, sent one
//! after the other as a sender would.
//!
//! The ICMP error fixtures also run through `lb_tc` (the same translation on an skb, after its
//! flows were opened by `lb_xdp`: both programs share the conntrack maps).

use std::net::{IpAddr, SocketAddr};

use lb_agent::{
    config::Config,
    datapath::{Datapath, TC_PROGRAM},
};
use lb_common::{counters::Counter, protocol, service::ServiceKey};
use lb_tests::{
    frames::{
        echo_request, fragments, frame, icmp_error, inspect, ip_packet, with_ipv4_options,
        with_ipv6_extension_headers, IcmpError, ACK, L4, SYN,
    },
    test_run::{
        expected_backend, run, run_tc_frame, sa, TC_ACT_OK, TC_ACT_SHOT, XDP_DROP, XDP_PASS,
    },
};

/// The shared `dns` and `web6` services, with `web` and `dns6` of two backends each.
const CONFIG: &str = concat!(
    "
services:
  - name: web
    vip: 198.51.100.10
    port: 80
    protocol: tcp
    backends:
      - { address: 203.0.113.11, port: 8080 }
      - { address: 203.0.113.12, port: 8080 }
",
    lb_tests::dns_service!(),
    lb_tests::web6_service!(),
    "  - name: dns6
    vip: 2001:db8:100::10
    port: 53
    protocol: udp
    backends:
      - { address: 2001:db8:203::11, port: 0 }
      - { address: 2001:db8:203::12, port: 0 }
"
);

const VIP_WEB: &str = "198.51.100.10:80";
const VIP_DNS: &str = "198.51.100.10:53";
const VIP_WEB6: &str = "[2001:db8:100::10]:443";
const VIP_DNS6: &str = "[2001:db8:100::10]:53";
/// Routers on the client's side and on the backends' side, which send ICMP errors.
const CLIENT_ROUTER: &str = "192.0.2.254";
const CLIENT_ROUTER6: &str = "2001:db8:2::fe";
const BACKEND_ROUTER: &str = "203.0.113.1";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn load() -> Datapath {
    let mut datapath = Datapath::load().expect("load datapath");
    datapath
        .apply(&Config::from_yaml(CONFIG).unwrap())
        .expect("apply config");
    datapath
}

fn counters(datapath: &Datapath) -> Vec<(Counter, u64)> {
    datapath.counters().unwrap()
}

/// Counters that moved between two snapshots, with how much.
fn moved(before: &[(Counter, u64)], after: &[(Counter, u64)]) -> Vec<(Counter, u64)> {
    before
        .iter()
        .zip(after)
        .filter(|((_, b), (_, a))| a != b)
        .map(|((c, b), (_, a))| (*c, a - b))
        .collect()
}

/// The backend a new flow `client → vip` goes to (the Maglev table and the shared hash say which).
fn backend_of(datapath: &Datapath, l4: L4, client: SocketAddr, vip: SocketAddr) -> SocketAddr {
    let proto = if l4 == L4::Udp {
        protocol::UDP
    } else {
        protocol::TCP
    };
    let key = ServiceKey::new(vip.ip(), vip.port(), proto);
    expected_backend(datapath, &key, proto, client, vip, false)
}

/// Opens a flow with one packet and returns the backend it went to.
fn open_flow(datapath: &mut Datapath, l4: L4, client: SocketAddr, vip: SocketAddr) -> SocketAddr {
    let (action, out) = run(datapath.xdp_program(), &frame(l4, client, vip, b"open"));
    assert_eq!(action, XDP_PASS);
    inspect(&out).dst
}

enum Expect {
    /// Passed, rewritten to exactly this frame.
    Frame(Vec<u8>),
    /// Passed byte-identical.
    Unchanged,
    Dropped,
}

struct Fixture {
    what: String,
    input: Vec<u8>,
    expect: Expect,
    /// Every counter the packet moves, each by one.
    counters: Vec<Counter>,
}

fn fixture(
    what: impl Into<String>,
    input: Vec<u8>,
    expect: Expect,
    counters: &[Counter],
) -> Fixture {
    Fixture {
        what: what.into(),
        input,
        expect,
        counters: counters.to_vec(),
    }
}

/// The program a fixture runs through.
#[derive(Clone, Copy, Debug)]
enum Program {
    Xdp,
    Tc,
}

impl Program {
    fn run(self, datapath: &mut Datapath, input: &[u8]) -> (u32, Vec<u8>) {
        match self {
            Program::Xdp => run(datapath.xdp_program(), input),
            Program::Tc => run_tc_frame(datapath.tc_program_named(TC_PROGRAM).unwrap(), input),
        }
    }

    /// The verdicts of a packet that goes on and of a dropped one.
    fn verdicts(self) -> (u32, u32) {
        match self {
            Program::Xdp => (XDP_PASS, XDP_DROP),
            Program::Tc => (TC_ACT_OK, TC_ACT_SHOT),
        }
    }
}

fn run_fixtures(datapath: &mut Datapath, fixtures: Vec<Fixture>) {
    run_fixtures_through(datapath, Program::Xdp, fixtures)
}

fn run_fixtures_through(datapath: &mut Datapath, program: Program, fixtures: Vec<Fixture>) {
    let (goes_on, dropped) = program.verdicts();
    for f in fixtures {
        let what = format!("{program:?}: {}", f.what);
        let before = counters(datapath);
        let (action, out) = program.run(datapath, &f.input);
        match f.expect {
            Expect::Frame(want) => {
                assert_eq!(action, goes_on, "{what}: action");
                assert_eq!(out, want, "{what}: byte-exact output");
            }
            Expect::Unchanged => {
                assert_eq!(action, goes_on, "{what}: action");
                assert_eq!(out, f.input, "{what}: untouched");
            }
            Expect::Dropped => assert_eq!(action, dropped, "{what}: action"),
        }
        let want: Vec<(Counter, u64)> = f.counters.iter().map(|c| (*c, 1)).collect();
        let mut got = moved(&before, &counters(datapath));
        got.sort_by_key(|(c, _)| *c as u32);
        let mut want_sorted = want.clone();
        want_sorted.sort_by_key(|(c, _)| *c as u32);
        assert_eq!(got, want_sorted, "{what}: counters");
    }
}

/// `quoted` cut to `len` bytes, as the sender of an ICMP error does.
fn cut(quoted: Vec<u8>, len: usize) -> Vec<u8> {
    quoted[..len.min(quoted.len())].to_vec()
}

#[test]
fn icmp_errors_reach_the_side_that_holds_the_flow() {
    icmp_errors_through(Program::Xdp);
}

#[test]
fn icmp_errors_reach_the_side_that_holds_the_flow_through_tc() {
    icmp_errors_through(Program::Tc);
}

fn icmp_errors_through(program: Program) {
    let mut datapath = load();
    let client = sa("192.0.2.2:40000");
    let client_udp = sa("192.0.2.2:5000");
    let client6 = sa("[2001:db8:2::2]:40000");
    let client6_udp = sa("[2001:db8:2::2]:5000");
    let (web, dns, web6, dns6) = (sa(VIP_WEB), sa(VIP_DNS), sa(VIP_WEB6), sa(VIP_DNS6));
    let b_web = open_flow(&mut datapath, SYN, client, web);
    let b_dns = open_flow(&mut datapath, L4::Udp, client_udp, dns);
    let b_web6 = open_flow(&mut datapath, SYN, client6, web6);
    let b_dns6 = open_flow(&mut datapath, L4::Udp, client6_udp, dns6);
    assert_eq!(b_dns6.port(), 53, "dns6 backends keep the service port");
    let reply = vec![0x5a; 1400];

    // A reply as the node sent it to the client (VIP view) and as the backend sent it: the quote
    // of an error about it before and after translation.
    let quote = |l4, vip_or_backend: SocketAddr, client: SocketAddr, len: usize| {
        cut(ip_packet(&frame(l4, vip_or_backend, client, &reply)), len)
    };
    let to_backend = |kind, router: &str, vip: SocketAddr, backend: SocketAddr, l4, client, len| {
        (
            icmp_error(kind, ip(router), vip.ip(), &quote(l4, vip, client, len)),
            Expect::Frame(icmp_error(
                kind,
                ip(router),
                backend.ip(),
                &quote(l4, backend, client, len),
            )),
        )
    };
    // A client's request as the node sent it to the backend, and as the client sent it.
    let request = |l4, client: SocketAddr, to: SocketAddr| ip_packet(&frame(l4, client, to, b"q"));

    let mut rows = Vec::new();
    let too_big = IcmpError::TooBig { mtu: 1200 };
    for (what, kind, router, vip, backend, l4, client, len) in [
        (
            "IPv4 fragmentation needed about a TCP reply, quoted up to 576 bytes in all",
            too_big,
            CLIENT_ROUTER,
            web,
            b_web,
            ACK,
            client,
            548,
        ),
        (
            "IPv4 fragmentation needed about a TCP reply, RFC 792 minimum quote (no TCP checksum)",
            too_big,
            CLIENT_ROUTER,
            web,
            b_web,
            ACK,
            client,
            28,
        ),
        (
            "IPv4 time exceeded about a UDP reply",
            IcmpError::TimeExceeded,
            CLIENT_ROUTER,
            dns,
            b_dns,
            L4::Udp,
            client_udp,
            548,
        ),
        (
            "IPv4 error sent by the client itself about a UDP reply",
            IcmpError::PortUnreachable,
            "192.0.2.2",
            dns,
            b_dns,
            L4::Udp,
            client_udp,
            548,
        ),
        (
            "IPv6 packet too big about a TCP reply, quoted up to 1280 bytes in all",
            IcmpError::TooBig { mtu: 1280 },
            CLIENT_ROUTER6,
            web6,
            b_web6,
            ACK,
            client6,
            1232,
        ),
        (
            "IPv6 time exceeded about a UDP reply (backend keeps the port)",
            IcmpError::TimeExceeded,
            CLIENT_ROUTER6,
            dns6,
            b_dns6,
            L4::Udp,
            client6_udp,
            1232,
        ),
    ] {
        let (input, expect) = to_backend(kind, router, vip, backend, l4, client, len);
        rows.push(fixture(
            format!("{what} → backend {backend}"),
            input,
            expect,
            &[Counter::IcmpErrorToBackend],
        ));
    }

    // Errors about the client's requests, from the backend or a router on its side.
    for (what, kind, from, expected_from, client, vip, backend, l4) in [
        (
            "IPv4 port unreachable from the backend → client, from the VIP",
            IcmpError::PortUnreachable,
            b_dns.ip(),
            dns.ip(),
            client_udp,
            dns,
            b_dns,
            L4::Udp,
        ),
        (
            "IPv4 fragmentation needed from a router behind the node → client, router kept",
            too_big,
            ip(BACKEND_ROUTER),
            ip(BACKEND_ROUTER),
            client,
            web,
            b_web,
            ACK,
        ),
        (
            "IPv6 port unreachable from the backend → client, from the VIP",
            IcmpError::PortUnreachable,
            b_dns6.ip(),
            dns6.ip(),
            client6_udp,
            dns6,
            b_dns6,
            L4::Udp,
        ),
        (
            "IPv6 packet too big from the backend about a TCP request",
            IcmpError::TooBig { mtu: 1280 },
            b_web6.ip(),
            web6.ip(),
            client6,
            web6,
            b_web6,
            ACK,
        ),
    ] {
        rows.push(fixture(
            what,
            icmp_error(kind, from, client.ip(), &request(l4, client, backend)),
            Expect::Frame(icmp_error(
                kind,
                expected_from,
                client.ip(),
                &request(l4, client, vip),
            )),
            &[Counter::IcmpErrorToClient],
        ));
    }

    // Errors that are not about a tracked DNAT flow, and ICMP that is not an error.
    let untracked = [Counter::PassIcmpErrorUntracked];
    rows.extend([
        fixture(
            "IPv4 error about a reply of a flow the node does not track",
            icmp_error(
                too_big,
                ip(CLIENT_ROUTER),
                web.ip(),
                &quote(ACK, web, sa("192.0.2.2:40999"), 548),
            ),
            Expect::Unchanged,
            &untracked,
        ),
        fixture(
            "IPv4 error about traffic that is not balanced",
            icmp_error(
                too_big,
                ip(CLIENT_ROUTER),
                ip("192.0.2.2"),
                &quote(ACK, sa("192.0.2.2:22"), sa("198.51.100.99:5000"), 548),
            ),
            Expect::Unchanged,
            &untracked,
        ),
        fixture(
            "IPv6 error about traffic that is not balanced",
            icmp_error(
                IcmpError::PortUnreachable,
                ip(CLIENT_ROUTER6),
                ip("2001:db8:2::2"),
                &quote(
                    L4::Udp,
                    sa("[2001:db8:2::2]:5000"),
                    sa("[2001:db8::99]:53"),
                    500,
                ),
            ),
            Expect::Unchanged,
            &untracked,
        ),
        fixture(
            "IPv4 error not addressed to the source of the packet it quotes",
            icmp_error(
                too_big,
                ip(CLIENT_ROUTER),
                ip("198.51.100.77"),
                &quote(ACK, web, client, 548),
            ),
            Expect::Unchanged,
            &untracked,
        ),
        fixture(
            "IPv4 error quoting 4 bytes of TCP (no ports to be sure of)",
            icmp_error(
                too_big,
                ip(CLIENT_ROUTER),
                web.ip(),
                &quote(ACK, web, client, 24),
            ),
            Expect::Unchanged,
            &untracked,
        ),
        fixture(
            "IPv4 echo request to a VIP",
            echo_request(ip("192.0.2.2"), web.ip()),
            Expect::Unchanged,
            &[Counter::PassNotTcpUdp],
        ),
        fixture(
            "IPv6 echo request to a VIP",
            echo_request(ip("2001:db8:2::2"), web6.ip()),
            Expect::Unchanged,
            &[Counter::PassNotTcpUdp],
        ),
        fixture(
            "ICMP header cut short",
            cut(echo_request(ip("192.0.2.2"), web.ip()), 14 + 20 + 4),
            Expect::Dropped,
            &[Counter::DropMalformed],
        ),
    ]);
    run_fixtures_through(&mut datapath, program, rows);
}

#[test]
fn fragments_of_a_datagram_all_reach_the_backend_of_its_first() {
    let mut datapath = load();
    let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let mut rows = Vec::new();
    // Fragments of `client → to` (the input) and of the same datagram after translation.
    let pieces = |l4, from, to, id| fragments(&frame(l4, from, to, &payload), id, 1480);

    for (family, l4, client, vip, id) in [
        (
            "IPv4 UDP",
            L4::Udp,
            sa("192.0.2.2:6000"),
            sa(VIP_DNS),
            0x1234,
        ),
        ("IPv4 TCP", ACK, sa("192.0.2.2:41000"), sa(VIP_WEB), 0x1235),
        (
            "IPv6 UDP",
            L4::Udp,
            sa("[2001:db8:2::2]:6000"),
            sa(VIP_DNS6),
            0xabcd_0001,
        ),
        (
            "IPv6 TCP",
            ACK,
            sa("[2001:db8:2::2]:41000"),
            sa(VIP_WEB6),
            0xabcd_0002,
        ),
    ] {
        let backend = backend_of(&datapath, l4, client, vip);
        let input = pieces(l4, client, vip, id);
        let output = pieces(l4, client, backend, id);
        assert_eq!(input.len(), 3);
        let first_counters: &[Counter] = if l4 == L4::Udp {
            &[Counter::ForwardNewFlow, Counter::FragmentTracked]
        } else {
            // A TCP datagram that is not a SYN, with no conntrack entry: balanced by the table.
            &[
                Counter::ForwardNewFlow,
                Counter::ConntrackMidflowMiss,
                Counter::FragmentTracked,
            ]
        };
        for (i, (input, output)) in input.into_iter().zip(output).enumerate() {
            rows.push(fixture(
                format!("{family} fragment {} of 3 → {backend}", i + 1),
                input,
                Expect::Frame(output),
                if i == 0 {
                    first_counters
                } else {
                    &[Counter::ForwardFragment]
                },
            ));
        }
        // The next datagram of the flow: a conntrack hit, tracked under its own identification.
        let next = pieces(l4, client, vip, id + 1);
        let next_out = pieces(l4, client, backend, id + 1);
        rows.push(fixture(
            format!("{family} next datagram, first fragment"),
            next[0].clone(),
            Expect::Frame(next_out[0].clone()),
            &[Counter::ForwardConntrackHit, Counter::FragmentTracked],
        ));
        rows.push(fixture(
            format!("{family} next datagram, last fragment"),
            next[2].clone(),
            Expect::Frame(next_out[2].clone()),
            &[Counter::ForwardFragment],
        ));
    }
    run_fixtures(&mut datapath, rows);

    // Replies: a backend's fragmented datagram leaves with the VIP as source on every fragment.
    let mut rows = Vec::new();
    for (family, client, vip, id) in [
        ("IPv4", sa("192.0.2.2:6001"), sa(VIP_DNS), 0x2222),
        (
            "IPv6",
            sa("[2001:db8:2::2]:6001"),
            sa(VIP_DNS6),
            0x2222_0000,
        ),
    ] {
        let backend = open_flow(&mut datapath, L4::Udp, client, vip);
        let input = pieces(L4::Udp, backend, client, id);
        let output = pieces(L4::Udp, vip, client, id);
        for (i, (input, output)) in input.into_iter().zip(output).enumerate() {
            rows.push(fixture(
                format!("{family} reply fragment {} of 3 from {backend}", i + 1),
                input,
                Expect::Frame(output),
                if i == 0 {
                    &[Counter::ReplyTranslated, Counter::FragmentTracked]
                } else {
                    &[Counter::ForwardFragment]
                },
            ));
        }
    }
    run_fixtures(&mut datapath, rows);
}

#[test]
fn fragments_without_a_balanced_first_fragment_go_to_the_stack() {
    let mut datapath = load();
    let payload = vec![7u8; 3000];
    let client = sa("192.0.2.2:7000");
    let client6 = sa("[2001:db8:2::2]:7000");
    let v4 = fragments(&frame(L4::Udp, client, sa(VIP_DNS), &payload), 0x77, 1480);
    let v6 = fragments(&frame(L4::Udp, client6, sa(VIP_DNS6), &payload), 0x77, 1480);
    let mut icmp = fragments(&frame(L4::Udp, client, sa(VIP_DNS), &payload), 0x78, 1480);
    icmp[1][14 + 9] = 1; // protocol ICMP (the IPv4 header checksum does not matter here)
    let not_vip = fragments(
        &frame(L4::Udp, client, sa("198.51.100.99:53"), &payload),
        0x79,
        1480,
    );
    let backend = backend_of(&datapath, L4::Udp, client, sa(VIP_DNS));
    let out = fragments(&frame(L4::Udp, client, backend, &payload), 0x77, 1480);
    let pass = [Counter::PassFragment];
    run_fixtures(
        &mut datapath,
        vec![
            // Out of order: a later fragment before the first is not balanced (its datagram is
            // lost, as without the datapath); those after the first are.
            fixture(
                "IPv4 later fragment before its first",
                v4[2].clone(),
                Expect::Unchanged,
                &pass,
            ),
            fixture(
                "IPv4 first fragment, arriving second",
                v4[0].clone(),
                Expect::Frame(out[0].clone()),
                &[Counter::ForwardNewFlow, Counter::FragmentTracked],
            ),
            fixture(
                "IPv4 later fragment after its first",
                v4[1].clone(),
                Expect::Frame(out[1].clone()),
                &[Counter::ForwardFragment],
            ),
            fixture(
                "IPv6 later fragment of a datagram never seen",
                v6[1].clone(),
                Expect::Unchanged,
                &pass,
            ),
            fixture(
                "IPv4 later fragment of ICMP",
                icmp[1].clone(),
                Expect::Unchanged,
                &pass,
            ),
            fixture(
                "IPv4 first fragment to a non-VIP address",
                not_vip[0].clone(),
                Expect::Unchanged,
                &[Counter::PassNotService],
            ),
            fixture(
                "IPv4 later fragment to a non-VIP address",
                not_vip[1].clone(),
                Expect::Unchanged,
                &pass,
            ),
        ],
    );
}

/// Extension header bytes: `len` bytes (a multiple of 8) of a header whose first byte is filled in
/// by the builder and second is its length field; the rest padding (PadN for option headers).
fn options_header(len: usize) -> Vec<u8> {
    let mut h = vec![0u8; len];
    h[1] = (len / 8 - 1) as u8;
    // PadN covering the rest of the header.
    h[2] = 1;
    h[3] = (len - 4) as u8;
    h
}

/// A routing header (type 4, segment routing) with one segment and `segments_left`.
fn routing_header(segments_left: u8) -> Vec<u8> {
    let mut h = vec![0u8; 24];
    h[1] = 2;
    h[2] = 4;
    h[3] = segments_left;
    h[8..24].copy_from_slice(
        &"2001:db8:100::10"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    h
}

#[test]
fn ipv4_options_and_ipv6_extension_headers_are_balanced_or_passed() {
    let mut datapath = load();
    let (web, web6) = (sa(VIP_WEB), sa(VIP_WEB6));
    let client = sa("192.0.2.2:42000");
    let client6 = sa("[2001:db8:2::2]:42000");
    let b = backend_of(&datapath, SYN, client, web);
    let b6 = backend_of(&datapath, SYN, client6, web6);
    let routed = sa("[2001:db8:2::2]:42001");
    let b6_routed = backend_of(&datapath, SYN, routed, web6);
    let syn = |from, to| frame(SYN, from, to, b"hello");
    // NOP, NOP, then a timestamp option with room for one entry.
    let timestamp = [1, 1, 0x44, 8, 5, 0, 0, 0, 0, 0, 0, 0];
    let record_route = [7, 7, 4, 0, 0, 0, 0, 0];
    let loose_source_route = [0x83, 7, 4, 203, 0, 113, 11, 0];
    let zero_length = [0x94, 0, 0, 0];
    let mut short_header = syn(client, web);
    short_header[14] = 0x44;
    let hop_by_hop = (0u8, options_header(8));
    let destination = (60u8, options_header(16));
    let mut ah = vec![0u8; 16];
    ah[1] = 2;
    let reply_backend = {
        let client = sa("192.0.2.2:42001");
        open_flow(&mut datapath, SYN, client, web)
    };
    let beyond = {
        let mut f = with_ipv6_extension_headers(&syn(client6, web6), &[(0, options_header(8))]);
        f[14 + 40 + 1] = 200; // claims 1608 bytes
        f
    };
    run_fixtures(
        &mut datapath,
        vec![
            fixture(
                "IPv4 with NOP and timestamp options → backend, options kept",
                with_ipv4_options(&syn(client, web), &timestamp),
                Expect::Frame(with_ipv4_options(&syn(client, b), &timestamp)),
                &[Counter::ForwardNewFlow],
            ),
            fixture(
                "IPv4 reply with a record-route option → translated, option kept",
                with_ipv4_options(
                    &frame(ACK, reply_backend, sa("192.0.2.2:42001"), b"r"),
                    &record_route,
                ),
                Expect::Frame(with_ipv4_options(
                    &frame(ACK, web, sa("192.0.2.2:42001"), b"r"),
                    &record_route,
                )),
                &[Counter::ReplyTranslated],
            ),
            fixture(
                "IPv4 loose source route to a VIP",
                with_ipv4_options(&syn(sa("192.0.2.2:42002"), web), &loose_source_route),
                Expect::Unchanged,
                &[Counter::PassIpv4Options],
            ),
            fixture(
                "IPv4 option with length 0",
                with_ipv4_options(&syn(sa("192.0.2.2:42003"), web), &zero_length),
                Expect::Unchanged,
                &[Counter::PassIpv4Options],
            ),
            fixture(
                "IPv4 header length below 20 bytes",
                short_header,
                Expect::Dropped,
                &[Counter::DropMalformed],
            ),
            fixture(
                "IPv6 hop-by-hop and destination options → backend, headers kept",
                with_ipv6_extension_headers(
                    &syn(client6, web6),
                    &[hop_by_hop.clone(), destination.clone()],
                ),
                Expect::Frame(with_ipv6_extension_headers(
                    &syn(client6, b6),
                    &[hop_by_hop.clone(), destination.clone()],
                )),
                &[Counter::ForwardNewFlow],
            ),
            fixture(
                "IPv6 routing header with no segment left → backend",
                with_ipv6_extension_headers(&syn(routed, web6), &[(43, routing_header(0))]),
                Expect::Frame(with_ipv6_extension_headers(
                    &syn(routed, b6_routed),
                    &[(43, routing_header(0))],
                )),
                &[Counter::ForwardNewFlow],
            ),
            fixture(
                "IPv6 routing header with a segment left",
                with_ipv6_extension_headers(
                    &syn(sa("[2001:db8:2::2]:42002"), web6),
                    &[(43, routing_header(1))],
                ),
                Expect::Unchanged,
                &[Counter::PassIpv6ExtensionHeader],
            ),
            fixture(
                "IPv6 authentication header",
                with_ipv6_extension_headers(&syn(sa("[2001:db8:2::2]:42003"), web6), &[(51, ah)]),
                Expect::Unchanged,
                &[Counter::PassIpv6ExtensionHeader],
            ),
            fixture(
                "IPv6 five destination options headers (more than walked)",
                with_ipv6_extension_headers(
                    &syn(sa("[2001:db8:2::2]:42004"), web6),
                    &vec![destination.clone(); 5],
                ),
                Expect::Unchanged,
                &[Counter::PassIpv6ExtensionHeader],
            ),
            fixture(
                "IPv6 hop-by-hop header running past the packet",
                beyond,
                Expect::Dropped,
                &[Counter::DropMalformed],
            ),
        ],
    );
}
