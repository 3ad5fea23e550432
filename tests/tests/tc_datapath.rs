//! `lb_tc`, the TC datapath, on crafted frames through BPF_PROG_TEST_RUN: DNAT forward and reply
//! for IPv4 and IPv6, TCP and UDP, conntrack hits, fragmented datagrams both ways, UDP without a
//! checksum, SNAT without a route, and traffic it leaves alone; and the workload-veth split
//! (`lb_tc_request` before the policy, `lb_tc_reply` after it at egress; DNAT only, SNAT refused),
//! ICMP errors of its flows included; and `lb_tc_egress` (egress of client-facing interfaces),
//! which translates the node's own errors about translated requests. Outputs are compared byte for byte with frames built from
//! scratch (so every checksum is verified); each case also checks the counter naming its path.
//! `lb_tc`'s ICMP error fixtures are `xdp_icmp_fragments`'s, and its SNAT, DSR L2 and DSR IPIP
//! fixtures `xdp_modes`'s, run through both programs.
//!
//! Each test runs in a network namespace of its own, since `lb_tc` asks the FIB for the next hop:
//! an empty one (no route: the stack gets the packet, `TC_ACT_OK`) or one that knows the backends
//! (redirected to the backend's interface with its MAC addresses).
//!
//! BPF_PROG_TEST_RUN skbs carry full checksums (`CHECKSUM_NONE`); the partial checksums of locally
//! sent segments on a veth are covered end to end (`e2e_tc`).

use std::net::SocketAddr;

use lb_agent::{
    config::Config,
    datapath::{
        Datapath, LoadOptions, TC_EGRESS_PROGRAM, TC_PROGRAM, TC_REPLY_PROGRAM, TC_REQUEST_PROGRAM,
    },
};
use lb_common::{
    counters::Counter,
    flow_events::choice,
    modes::snat,
    protocol,
    service::{mode, ServiceKey},
};
use lb_tests::{
    frames::{fragments, frame, icmp_error, inspect, ip_packet, IcmpError, ACK, L4, SYN},
    netns::{Netns, TEST_PREFIX},
    test_run::{
        assert_drop_event, assert_new_flow_event, check_not_forwarded_after_the_choice,
        drain_flow_events, expected_backend, flow_key, load_with_flow_events, run as run_xdp,
        run_tc_frame, NotForwardedVerdicts, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC,
        UNDELIVERABLE_BACKENDS, XDP_PASS,
    },
};

const CONFIG: &str = concat!(
    "node:\n  ipv4: 192.0.2.1\n  ipv6: 2001:db8:2::1\nservices:\n",
    lb_tests::web_and_dns_services!(),
    "
  - name: snat
    vip: 198.51.100.40
    port: 80
    protocol: tcp
    mode: snat
    backends:
      - { address: 203.0.113.41, port: 8080 }
  - name: empty
    vip: 198.51.100.11
    port: 80
    protocol: tcp
  - name: dsr6
    vip: 2001:db8:100::40
    port: 53
    protocol: udp
    mode: dsr-ipip
    backends:
      - { address: 2001:db8:203::41, port: 53 }
",
);

/// `TC_ACT_REDIRECT`.
const TC_ACT_REDIRECT: u32 = 7;

/// Runs `test` on a thread inside a fresh namespace set up by the `ip` commands `setup`.
fn isolated(setup: &[&str], test: fn()) {
    let ns = Netns::new(TEST_PREFIX, "tc").expect("namespace");
    for command in setup {
        ns.ip_cmd(command).expect(command);
    }
    ns.run(test);
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn load() -> Datapath {
    let mut datapath = Datapath::load_with(&LoadOptions::default()).expect("load datapath");
    datapath
        .apply(&Config::from_yaml(CONFIG).unwrap())
        .expect("apply config");
    datapath
}

fn counter(datapath: &Datapath, which: Counter) -> u64 {
    datapath
        .counters()
        .unwrap()
        .into_iter()
        .find(|(c, _)| *c == which)
        .unwrap()
        .1
}

fn run(datapath: &mut Datapath, input: &[u8]) -> (u32, Vec<u8>) {
    run_program(datapath, TC_PROGRAM, input)
}

fn run_program(datapath: &mut Datapath, program: &str, input: &[u8]) -> (u32, Vec<u8>) {
    run_tc_frame(
        datapath
            .tc_program_named(program)
            .unwrap_or_else(|e| panic!("{program} loads: {e:#}")),
        input,
    )
}

fn proto(l4: L4) -> u8 {
    match l4 {
        L4::Tcp(_) => protocol::TCP,
        L4::Udp => protocol::UDP,
    }
}

/// Runs `input` through `lb_tc` and checks verdict, output frame and that `which` counted exactly
/// one packet.
fn expect(
    datapath: &mut Datapath,
    what: &str,
    input: &[u8],
    verdict: u32,
    output: &[u8],
    which: Counter,
) {
    expect_of(datapath, TC_PROGRAM, what, input, verdict, output, which);
}

/// [`expect`] for TC program `program`.
fn expect_of(
    datapath: &mut Datapath,
    program: &str,
    what: &str,
    input: &[u8],
    verdict: u32,
    output: &[u8],
    which: Counter,
) {
    let before = counter(datapath, which);
    let (got, out) = run_program(datapath, program, input);
    assert_eq!(got, verdict, "{what}: verdict");
    assert_eq!(out, output, "{what}: output frame");
    assert!(inspect(&out).checksums_ok, "{what}: checksums");
    assert_eq!(
        counter(datapath, which),
        before + 1,
        "{what}: {}",
        which.name()
    );
}

/// The backend Maglev gives a new flow `client → vip`.
fn maglev_backend(datapath: &Datapath, l4: L4, client: SocketAddr, vip: SocketAddr) -> SocketAddr {
    let key = ServiceKey::new(vip.ip(), vip.port(), proto(l4));
    expected_backend(datapath, &key, proto(l4), client, vip, false)
}

/// A flow's first two packets `client → vip` through `program`: each returns `verdict` and goes to
/// `backend`, the first counted as a new flow, the second as a conntrack hit. Returns the second
/// packet's L4 (TCP: an ACK), which the flow's later packets use.
fn expect_new_then_tracked(
    datapath: &mut Datapath,
    (program, verdict): (&str, u32),
    what: &str,
    (l4, client, vip): (L4, SocketAddr, SocketAddr),
    backend: SocketAddr,
) -> L4 {
    expect_of(
        datapath,
        program,
        &format!("{what}: new flow"),
        &frame(l4, client, vip, b"hello"),
        verdict,
        &frame(l4, client, backend, b"hello"),
        Counter::ForwardNewFlow,
    );
    let next = if l4 == SYN { ACK } else { l4 };
    expect_of(
        datapath,
        program,
        &format!("{what}: tracked"),
        &frame(next, client, vip, b"more"),
        verdict,
        &frame(next, client, backend, b"more"),
        Counter::ForwardConntrackHit,
    );
    next
}

#[test]
fn forward_reply_and_conntrack_hit_for_each_family_and_protocol() {
    isolated(
        &[],
        forward_reply_and_conntrack_hit_for_each_family_and_protocol_in_namespace,
    );
}

fn forward_reply_and_conntrack_hit_for_each_family_and_protocol_in_namespace() {
    let mut datapath = load();
    for (l4, client, vip) in [
        (SYN, "192.0.2.2:40000", "198.51.100.10:80"),
        (L4::Udp, "192.0.2.2:40001", "198.51.100.10:53"),
        (SYN, "[2001:db8:2::2]:40000", "[2001:db8:100::10]:443"),
        (L4::Udp, "[2001:db8:2::2]:40001", "[2001:db8:100::10]:53"),
    ] {
        let (client, vip) = (sa(client), sa(vip));
        let backend = maglev_backend(&datapath, l4, client, vip);
        let what = format!("{l4:?} {client} -> {vip}");
        let next = expect_new_then_tracked(
            &mut datapath,
            (TC_PROGRAM, TC_ACT_OK),
            &what,
            (l4, client, vip),
            backend,
        );
        expect(
            &mut datapath,
            &format!("{what}: reply"),
            &frame(next, backend, client, b"answer"),
            TC_ACT_OK,
            &frame(next, vip, client, b"answer"),
            Counter::ReplyTranslated,
        );
    }
}

#[test]
fn fragments_of_a_datagram_all_reach_the_backend_of_its_first() {
    isolated(&[], fragments_in_namespace);
}

/// As `xdp_icmp_fragments` for `lb_xdp`: the first fragment of a 3000-byte UDP datagram is balanced
/// and recorded, the later ones (no ports) get the same addresses; the same for a fragmented reply.
fn fragments_in_namespace() {
    let mut datapath = load();
    let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let pieces = |from, to, id| fragments(&frame(L4::Udp, from, to, &payload), id, 1480);
    for (client, vip, id) in [
        ("192.0.2.2:6000", "198.51.100.10:53", 0x1234),
        ("[2001:db8:2::2]:6000", "[2001:db8:100::10]:53", 0xabcd_0001),
    ] {
        let (client, vip) = (sa(client), sa(vip));
        let key = ServiceKey::new(vip.ip(), vip.port(), protocol::UDP);
        let backend = expected_backend(&datapath, &key, protocol::UDP, client, vip, false);
        let requests = pieces(client, vip, id)
            .into_iter()
            .zip(pieces(client, backend, id));
        let replies = pieces(backend, client, id + 1)
            .into_iter()
            .zip(pieces(vip, client, id + 1));
        for (direction, pairs, first_counter) in [
            (
                "request",
                requests.collect::<Vec<_>>(),
                Counter::ForwardNewFlow,
            ),
            ("reply", replies.collect(), Counter::ReplyTranslated),
        ] {
            assert_eq!(pairs.len(), 3);
            for (i, (input, output)) in pairs.into_iter().enumerate() {
                let what = format!("{client} -> {vip}: {direction} fragment {} of 3", i + 1);
                let counters: &[Counter] = if i == 0 {
                    &[first_counter, Counter::FragmentTracked]
                } else {
                    &[Counter::ForwardFragment]
                };
                let before: Vec<u64> = counters.iter().map(|c| counter(&datapath, *c)).collect();
                let (verdict, out) = run(&mut datapath, &input);
                assert_eq!(verdict, TC_ACT_OK, "{what}: verdict");
                assert_eq!(out, output, "{what}: output frame");
                for (c, before) in counters.iter().zip(before) {
                    assert_eq!(counter(&datapath, *c), before + 1, "{what}: {}", c.name());
                }
            }
        }
    }
    // A later fragment of a datagram never seen goes to the stack untouched.
    let lone = pieces(sa("192.0.2.2:6001"), sa("198.51.100.10:53"), 0x77);
    let before = counter(&datapath, Counter::PassFragment);
    assert_eq!(run(&mut datapath, &lone[1]), (TC_ACT_OK, lone[1].clone()));
    assert_eq!(counter(&datapath, Counter::PassFragment), before + 1);
}

/// On a client's workload veth, fragmented datagrams are translated on the side of the policy
/// their first fragment was: `lb_tc_request` gives every fragment of a request the backend (before
/// `policy_from_endpoint`), `lb_tc_reply` every fragment of a reply the VIP (after
/// `policy_to_endpoint`). `lb_tc` passes both untouched: the split programs record in scopes of
/// their own (`key_scope::CLIENT_REQUEST`, `CLIENT_REPLY`), which it does not look up, even once
/// `lb_tc_reply` has recorded the reply's first fragment. Until the ninth session the later fragments passed the
/// split programs untranslated: the policy saw them to (or the client got them from) another
/// address than their first fragment.
#[test]
fn fragments_on_a_workload_veth_follow_their_first_fragment() {
    isolated(&[], fragments_on_a_workload_veth_in_namespace);
}

fn fragments_on_a_workload_veth_in_namespace() {
    let mut datapath = load();
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let pieces = |from, to, id| fragments(&frame(L4::Udp, from, to, &payload), id, 1480);
    for (client, vip, id) in [
        ("192.0.2.2:6100", "198.51.100.10:53", 0x2345),
        ("[2001:db8:2::2]:6100", "[2001:db8:100::10]:53", 0xabcd_0101),
    ] {
        let (client, vip) = (sa(client), sa(vip));
        let key = ServiceKey::new(vip.ip(), vip.port(), protocol::UDP);
        let backend = expected_backend(&datapath, &key, protocol::UDP, client, vip, false);
        let mut step = |program, what: &str, input: &[u8], output: &[u8], counters: &[Counter]| {
            let what = format!("{client} -> {vip}: {what}");
            let before: Vec<u64> = counters.iter().map(|c| counter(&datapath, *c)).collect();
            let verdict = if program == TC_PROGRAM {
                TC_ACT_OK
            } else {
                TC_ACT_UNSPEC
            };
            assert_eq!(
                run_program(&mut datapath, program, input),
                (verdict, output.to_vec()),
                "{what}"
            );
            for (c, before) in counters.iter().zip(before) {
                assert_eq!(counter(&datapath, *c), before + 1, "{what}: {}", c.name());
            }
        };

        let (sent, translated) = (pieces(client, vip, id), pieces(client, backend, id));
        assert_eq!(sent.len(), 3);
        step(
            TC_REQUEST_PROGRAM,
            "request's first fragment",
            &sent[0],
            &translated[0],
            &[Counter::ForwardNewFlow, Counter::FragmentTracked],
        );
        for i in 1..3 {
            let what = format!("request fragment {}", i + 1);
            step(
                TC_REQUEST_PROGRAM,
                &what,
                &sent[i],
                &translated[i],
                &[Counter::ForwardFragment],
            );
            step(
                TC_PROGRAM,
                &format!("{what} at lb_tc"),
                &translated[i],
                &translated[i],
                &[Counter::PassFragment],
            );
        }

        let (reply, to_client) = (pieces(backend, client, id + 1), pieces(vip, client, id + 1));
        step(
            TC_PROGRAM,
            "reply's first fragment at lb_tc",
            &reply[0],
            &reply[0],
            &[Counter::PassNotService],
        );
        step(
            TC_REPLY_PROGRAM,
            "reply's first fragment at lb_tc_reply",
            &reply[0],
            &to_client[0],
            &[Counter::ReplyTranslated, Counter::FragmentTracked],
        );
        for i in 1..3 {
            let what = format!("reply fragment {}", i + 1);
            step(
                TC_PROGRAM,
                &format!("{what} at lb_tc"),
                &reply[i],
                &reply[i],
                &[Counter::PassFragment],
            );
            step(
                TC_REPLY_PROGRAM,
                &format!("{what} at lb_tc_reply"),
                &reply[i],
                &to_client[i],
                &[Counter::ForwardFragment],
            );
        }
    }
}

#[test]
fn udp_without_checksum_keeps_none() {
    isolated(&[], udp_without_checksum_keeps_none_in_namespace);
}

fn udp_without_checksum_keeps_none_in_namespace() {
    let mut datapath = load();
    let (client, vip) = (sa("192.0.2.3:40002"), sa("198.51.100.10:53"));
    let key = ServiceKey::new(vip.ip(), vip.port(), protocol::UDP);
    let backend = expected_backend(&datapath, &key, protocol::UDP, client, vip, false);
    let zero_checksum = |mut f: Vec<u8>| {
        // Ethernet 14 + IPv4 20 + UDP checksum at 6.
        f[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
        f
    };
    let (verdict, out) = run(
        &mut datapath,
        &zero_checksum(frame(L4::Udp, client, vip, b"x")),
    );
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, zero_checksum(frame(L4::Udp, client, backend, b"x")));
}

/// The SNAT port the datapath picks first for `client → vip` (the default range).
fn snat_port(client: SocketAddr, vip: SocketAddr) -> u16 {
    let hash = snat::port_hash(&flow_key(protocol::TCP, client, vip));
    snat::candidate_port(
        hash,
        snat::DEFAULT_PORT_FIRST,
        (snat::DEFAULT_PORT_LAST - snat::DEFAULT_PORT_FIRST) as u32 + 1,
        0,
    )
}

#[test]
fn snat_without_a_route_no_backend_and_other_traffic() {
    isolated(
        &[],
        snat_without_a_route_no_backend_and_other_traffic_in_namespace,
    );
}

/// In a namespace without routes: a SNAT flow is translated both ways and left to the stack
/// (`xdp_modes` has every mode redirected); a service without backends drops; other traffic
/// passes untouched.
fn snat_without_a_route_no_backend_and_other_traffic_in_namespace() {
    let mut datapath = load();
    let client = sa("192.0.2.2:40003");
    let vip = sa("198.51.100.40:80");
    let node = SocketAddr::new("192.0.2.1".parse().unwrap(), snat_port(client, vip));
    let backend = sa("203.0.113.41:8080");
    expect(
        &mut datapath,
        "SNAT service, no route to the backend: translated, to the stack",
        &frame(SYN, client, vip, b""),
        TC_ACT_OK,
        &frame(SYN, node, backend, b""),
        Counter::PassFibFailed,
    );
    expect(
        &mut datapath,
        "SNAT reply, no route to the client: translated, to the stack",
        &frame(ACK, backend, node, b"r"),
        TC_ACT_OK,
        &frame(ACK, vip, client, b"r"),
        Counter::SnatReplyTranslated,
    );
    let empty = frame(SYN, client, sa("198.51.100.11:80"), b"");
    expect(
        &mut datapath,
        "service without backends",
        &empty,
        TC_ACT_SHOT,
        &empty,
        Counter::DropNoBackend,
    );
    let other = frame(SYN, client, sa("198.51.100.99:80"), b"");
    expect(
        &mut datapath,
        "not a VIP",
        &other,
        TC_ACT_OK,
        &other,
        Counter::PassNotService,
    );
    let untracked_reply = frame(ACK, sa("203.0.113.11:8080"), sa("192.0.2.9:1234"), b"");
    expect(
        &mut datapath,
        "backend traffic of no tracked flow",
        &untracked_reply,
        TC_ACT_OK,
        &untracked_reply,
        Counter::PassNotService,
    );
}

#[test]
fn flow_events_report_new_flows_and_drops_only_when_enabled() {
    isolated(&[], flow_events_in_namespace);
}

/// `lb_tc` and `lb_tc_request` report new flows (DNAT and SNAT) and drops with flow events on, and
/// nothing for conntrack hits, other traffic, or anything with flow events off.
fn flow_events_in_namespace() {
    let client = sa("192.0.2.2:40004");
    let (web, snat_vip, empty) = (
        sa("198.51.100.10:80"),
        sa("198.51.100.40:80"),
        sa("198.51.100.11:80"),
    );
    let tcp = protocol::TCP;
    for enabled in [true, false] {
        let (mut datapath, mut ring) = load_with_flow_events(CONFIG, enabled);
        let key = ServiceKey::new(web.ip(), web.port(), tcp);
        let backend = expected_backend(&datapath, &key, tcp, client, web, false);

        // Runs `program` on an empty `l4` segment `from` → `to`, expecting `verdict`; returns
        // the flow events it emitted.
        let mut sent = |datapath: &mut Datapath, program, l4, from, to, verdict| {
            let input = frame(l4, from, to, b"");
            assert_eq!(run_program(datapath, program, &input).0, verdict);
            drain_flow_events(&mut ring)
        };
        let dnat = sent(&mut datapath, TC_PROGRAM, SYN, client, web, TC_ACT_OK);
        let hit = sent(&mut datapath, TC_PROGRAM, ACK, client, web, TC_ACT_OK);
        let snat = sent(&mut datapath, TC_PROGRAM, SYN, client, snat_vip, TC_ACT_OK);
        let no_backend = sent(&mut datapath, TC_PROGRAM, SYN, client, empty, TC_ACT_SHOT);
        let no_service = sa("198.51.100.99:80");
        let other = sent(
            &mut datapath,
            TC_PROGRAM,
            SYN,
            client,
            no_service,
            TC_ACT_OK,
        );
        // A workload client's request to a SNAT service is served as DNAT.
        let workload_client = sa("192.0.2.2:40005");
        let snat_key = ServiceKey::new(snat_vip.ip(), snat_vip.port(), tcp);
        let snat_backend =
            expected_backend(&datapath, &snat_key, tcp, workload_client, snat_vip, false);
        let workload_snat = sent(
            &mut datapath,
            TC_REQUEST_PROGRAM,
            SYN,
            workload_client,
            snat_vip,
            TC_ACT_UNSPEC,
        );
        assert_eq!(counter(&datapath, Counter::ForwardConntrackHit), 1);
        assert_eq!((hit, other), (vec![], vec![]));
        if !enabled {
            assert_eq!((dnat, snat), (vec![], vec![]));
            assert_eq!((no_backend, workload_snat), (vec![], vec![]));
            continue;
        }
        assert_eq!((dnat.len(), snat.len()), (1, 1), "{dnat:?} {snat:?}");
        assert_new_flow_event(
            &mut datapath,
            &dnat[0],
            (client, web, tcp),
            backend,
            (mode::DNAT, choice::NEW),
        );
        assert_new_flow_event(
            &mut datapath,
            &snat[0],
            (client, snat_vip, tcp),
            sa("203.0.113.41:8080"),
            (mode::SNAT, choice::NEW),
        );
        assert_eq!((no_backend.len(), workload_snat.len()), (1, 1));
        assert_drop_event(
            &mut datapath,
            &no_backend[0],
            (client, empty, tcp),
            Counter::DropNoBackend,
        );
        assert_new_flow_event(
            &mut datapath,
            &workload_snat[0],
            (workload_client, snat_vip, tcp),
            snat_backend,
            (mode::DNAT, choice::NEW),
        );
    }
}

/// `lb_tc` reports the packets of flows whose backend was chosen but that it did not send to it,
/// once each with that backend, only with flow events on: DSR L2 without the backend's neighbour
/// entry (dropped), a DSR IPIP packet too big once encapsulated (answered with "fragmentation
/// needed"); not a small IPIP packet the stack takes over.
#[test]
fn flow_events_report_packets_not_forwarded_after_the_choice() {
    isolated(&UNDELIVERABLE_BACKENDS, not_forwarded_in_namespace);
}

fn not_forwarded_in_namespace() {
    check_not_forwarded_after_the_choice(
        |datapath, input| run_program(datapath, TC_PROGRAM, input).0,
        NotForwardedVerdicts {
            no_neighbour: TC_ACT_SHOT,
            small_ipip: TC_ACT_OK,
            too_big: TC_ACT_REDIRECT,
        },
    );
}

const NEXT_HOP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const EGRESS_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];

/// `ip` commands of a namespace whose veth `tcv0` (MAC `EGRESS_MAC`) has the IPv4 backends of
/// `CONFIG` behind it, with permanent neighbour entries (`NEXT_HOP_MAC`): the FIB knows them.
const BACKENDS_ON_A_VETH: [&str; 8] = [
    "link add tcv0 address 02:00:00:00:00:0a type veth peer name tcv1",
    "link set tcv0 up",
    "link set tcv1 up",
    "addr add 203.0.113.1/24 dev tcv0",
    "addr add 2001:db8:203::1/64 dev tcv0 nodad",
    "neigh add 203.0.113.11 lladdr 02:00:00:00:00:0b dev tcv0 nud permanent",
    "neigh add 203.0.113.12 lladdr 02:00:00:00:00:0b dev tcv0 nud permanent",
    "neigh add 203.0.113.13 lladdr 02:00:00:00:00:0b dev tcv0 nud permanent",
];

#[test]
fn redirected_to_the_backend_when_the_fib_knows_it() {
    isolated(&BACKENDS_ON_A_VETH, redirected_in_namespace);
}

fn redirected_in_namespace() {
    std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1").expect("forwarding");
    let mut datapath = load();
    let (client, vip) = (sa("192.0.2.2:40010"), sa("198.51.100.10:80"));
    let key = ServiceKey::new(vip.ip(), vip.port(), protocol::TCP);
    let backend = expected_backend(&datapath, &key, protocol::TCP, client, vip, false);
    let mut expected = frame(SYN, client, backend, b"");
    expected[..6].copy_from_slice(&NEXT_HOP_MAC);
    expected[6..12].copy_from_slice(&EGRESS_MAC);
    expect(
        &mut datapath,
        "new flow to a backend with a neighbour entry",
        &frame(SYN, client, vip, b""),
        TC_ACT_REDIRECT,
        &expected,
        Counter::XmitRedirect,
    );
}

/// The sum of every counter: a program that passes a packet on "uncounted" leaves it unchanged.
/// Runs an ICMP message through `program`: verdict and byte-exact output (built from scratch, so
/// every checksum is checked), and `which` counted once, or (`None`) no counter moved.
fn icmp_case(
    datapath: &mut Datapath,
    program: &str,
    what: &str,
    input: &[u8],
    (verdict, output): (u32, &[u8]),
    which: Option<Counter>,
) {
    let before = (which.map(|c| counter(datapath, c)), all_counters(datapath));
    let (got, out) = run_program(datapath, program, input);
    assert_eq!(got, verdict, "{what}: verdict");
    assert_eq!(out, output, "{what}: output frame");
    match which {
        Some(c) => assert_eq!(
            counter(datapath, c),
            before.0.unwrap() + 1,
            "{what}: {}",
            c.name()
        ),
        None => assert_eq!(all_counters(datapath), before.1, "{what}: uncounted"),
    }
}

fn all_counters(datapath: &Datapath) -> u64 {
    datapath.counters().unwrap().iter().map(|(_, n)| n).sum()
}

/// On a workload's veth: `lb_tc_request` translates a request and passes it on with `TCX_NEXT`
/// (never redirected, though the FIB knows the backend: the policy after it must see it) and marks
/// the flow, so `lb_tc` and `lb_xdp` leave its reply untranslated; `lb_tc_reply` (egress, after the
/// policy) translates it. Other traffic passes both uncounted (counted once by `lb_tc`).
#[test]
fn workload_veth_requests_before_the_policy_replies_after_it() {
    isolated(&BACKENDS_ON_A_VETH, workload_veth_in_namespace);
}

fn workload_veth_in_namespace() {
    std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1").expect("forwarding");
    let mut datapath = load();
    // A SNAT or DSR service's request from a workload client is served as DNAT: the same
    // translations as a DNAT service's.
    for (l4, client, vip) in [
        (SYN, "192.0.2.2:40020", "198.51.100.10:80"),
        (L4::Udp, "[2001:db8:2::2]:40021", "[2001:db8:100::10]:53"),
        (SYN, "192.0.2.2:40023", "198.51.100.40:80"),
        (L4::Udp, "[2001:db8:2::2]:40024", "[2001:db8:100::40]:53"),
    ] {
        let (client, vip) = (sa(client), sa(vip));
        let backend = maglev_backend(&datapath, l4, client, vip);
        let what = format!("{l4:?} {client} -> {vip}");
        let next = expect_new_then_tracked(
            &mut datapath,
            (TC_REQUEST_PROGRAM, TC_ACT_UNSPEC),
            &what,
            (l4, client, vip),
            backend,
        );
        let reply = frame(next, backend, client, b"answer");
        expect(
            &mut datapath,
            &format!("{what}: reply at the backend's veth ingress (lb_tc)"),
            &reply,
            TC_ACT_OK,
            &reply,
            Counter::PassNotService,
        );
        let before = counter(&datapath, Counter::PassNotService);
        let (verdict, out) = run_xdp(datapath.xdp_program(), &reply);
        assert_eq!(
            (verdict, out == reply),
            (XDP_PASS, true),
            "{what}: reply through lb_xdp: passed untranslated"
        );
        assert_eq!(counter(&datapath, Counter::PassNotService), before + 1);
        expect_of(
            &mut datapath,
            TC_REPLY_PROGRAM,
            &format!("{what}: reply at the client's veth egress"),
            &reply,
            TC_ACT_UNSPEC,
            &frame(next, vip, client, b"answer"),
            Counter::ReplyTranslated,
        );

        // ICMP errors cross the policy as the flow does: between client and backend.
        let unreachable = IcmpError::PortUnreachable;
        let request_quote = |to| ip_packet(&frame(next, client, to, b"more"));
        let from_backend = icmp_error(
            unreachable,
            backend.ip(),
            client.ip(),
            &request_quote(backend),
        );
        icmp_case(
            &mut datapath,
            TC_PROGRAM,
            &format!("{what}: backend's error at its veth ingress (lb_tc), left"),
            &from_backend,
            (TC_ACT_OK, &from_backend),
            Some(Counter::PassIcmpErrorUntracked),
        );
        icmp_case(
            &mut datapath,
            TC_REPLY_PROGRAM,
            &format!("{what}: backend's error at the client's veth egress, from the VIP"),
            &from_backend,
            (
                TC_ACT_UNSPEC,
                &icmp_error(unreachable, vip.ip(), client.ip(), &request_quote(vip)),
            ),
            Some(Counter::IcmpErrorToClient),
        );
        let reply_quote = |from| ip_packet(&frame(next, from, client, b"answer"));
        let from_client = icmp_error(unreachable, client.ip(), vip.ip(), &reply_quote(vip));
        icmp_case(
            &mut datapath,
            TC_REQUEST_PROGRAM,
            &format!("{what}: client's error about a reply, before the policy, to the backend"),
            &from_client,
            (
                TC_ACT_UNSPEC,
                &icmp_error(
                    unreachable,
                    client.ip(),
                    backend.ip(),
                    &reply_quote(backend),
                ),
            ),
            Some(Counter::IcmpErrorToBackend),
        );
        icmp_case(
            &mut datapath,
            TC_REPLY_PROGRAM,
            &format!("{what}: client's error at egress (not for a client), uncounted"),
            &from_client,
            (TC_ACT_UNSPEC, &from_client),
            None,
        );
    }

    // A flow `lb_tc` translated (its client is not on a workload veth) has its reply translated by
    // `lb_tc` as before, and by `lb_tc_reply` too, should it leave through a workload veth.
    let (client, vip) = (sa("192.0.2.3:40022"), sa("198.51.100.10:80"));
    let key = ServiceKey::new(vip.ip(), vip.port(), protocol::TCP);
    let backend = expected_backend(&datapath, &key, protocol::TCP, client, vip, false);
    let (verdict, _) = run(&mut datapath, &frame(SYN, client, vip, b""));
    assert_eq!(verdict, TC_ACT_REDIRECT, "lb_tc redirects a request");
    expect_of(
        &mut datapath,
        TC_REPLY_PROGRAM,
        "reply of a flow lb_tc translated",
        &frame(ACK, backend, client, b"x"),
        TC_ACT_UNSPEC,
        &frame(ACK, vip, client, b"x"),
        Counter::ReplyTranslated,
    );

    // A SNAT reply leaving through a workload veth (a flow `lb_tc` translated for a client
    // elsewhere) is refused: `lb_tc_reply` translates DNAT only.
    let snat_vip = sa("198.51.100.40:80");
    let snat = frame(SYN, client, snat_vip, b"");
    let node = SocketAddr::new("192.0.2.1".parse().unwrap(), snat_port(client, snat_vip));
    let (verdict, _) = run(&mut datapath, &snat);
    assert_eq!(
        verdict, TC_ACT_OK,
        "lb_tc translates a SNAT request (no route)"
    );
    let snat_reply = frame(ACK, sa("203.0.113.41:8080"), node, b"");
    expect_of(
        &mut datapath,
        TC_REPLY_PROGRAM,
        "SNAT reply at a workload veth's egress",
        &snat_reply,
        TC_ACT_SHOT,
        &snat_reply,
        Counter::DropTcModeUnsupported,
    );

    // Anything else goes on unchanged and uncounted.
    for (program, input) in [
        (
            TC_REQUEST_PROGRAM,
            frame(SYN, client, sa("198.51.100.99:80"), b""),
        ),
        (
            TC_REQUEST_PROGRAM,
            frame(ACK, sa("203.0.113.11:8080"), sa("192.0.2.9:1234"), b""),
        ),
        (
            TC_REPLY_PROGRAM,
            frame(ACK, client, sa("203.0.113.11:8080"), b""),
        ),
        (
            TC_REPLY_PROGRAM,
            frame(ACK, sa("203.0.113.11:8080"), sa("192.0.2.9:1234"), b""),
        ),
    ] {
        let before = all_counters(&datapath);
        let (verdict, out) = run_program(&mut datapath, program, &input);
        assert_eq!((verdict, out == input), (TC_ACT_UNSPEC, true), "{program}");
        assert_eq!(all_counters(&datapath), before, "{program}: uncounted");
    }
}

/// `lb_tc_egress`, at egress of a client-facing interface: an error the node's stack sends a
/// client about its translated DNAT request (here "fragmentation needed" / "packet too big" for
/// the link towards the backend, from the node's address, quoting client → backend:port) leaves
/// quoting what the client sent (client → VIP:port), counted; everything else leaves untouched and
/// uncounted.
#[test]
fn node_errors_about_translated_requests_at_client_egress() {
    isolated(&[], node_errors_at_client_egress_in_namespace);
}

fn node_errors_at_client_egress_in_namespace() {
    let mut datapath = load();
    let payload = [0x5a; 600];
    for (client, vip, node) in [
        ("192.0.2.2:40030", "198.51.100.10:80", "192.0.2.1"),
        (
            "[2001:db8:2::2]:40031",
            "[2001:db8:100::10]:443",
            "2001:db8:2::1",
        ),
    ] {
        let (client, vip, node) = (sa(client), sa(vip), node.parse().unwrap());
        let key = ServiceKey::new(vip.ip(), vip.port(), protocol::TCP);
        let backend = expected_backend(&datapath, &key, protocol::TCP, client, vip, false);
        let what = format!("{client} -> {vip} (backend {backend})");
        // The flow, as `lb_xdp` tracks and translates it before passing it to the stack.
        let (verdict, out) = run_xdp(datapath.xdp_program(), &frame(SYN, client, vip, b""));
        assert_eq!(
            (verdict, out),
            (XDP_PASS, frame(SYN, client, backend, b"")),
            "{what}: SYN translated"
        );

        let too_big = IcmpError::TooBig { mtu: 1280 };
        let quote = |to| ip_packet(&frame(ACK, client, to, &payload));
        icmp_case(
            &mut datapath,
            TC_EGRESS_PROGRAM,
            &format!("{what}: the node's error about the translated request"),
            &icmp_error(too_big, node, client.ip(), &quote(backend)),
            (
                TC_ACT_UNSPEC,
                &icmp_error(too_big, node, client.ip(), &quote(vip)),
            ),
            Some(Counter::IcmpNodeErrorToClient),
        );
        let unknown = SocketAddr::new(client.ip(), 40099);
        let untracked = icmp_error(
            too_big,
            node,
            client.ip(),
            &ip_packet(&frame(ACK, unknown, backend, &payload)),
        );
        // Already translated at ingress (a backend's error `lb_xdp` turned to the VIP's view).
        let translated = icmp_error(
            IcmpError::PortUnreachable,
            vip.ip(),
            client.ip(),
            &quote(vip),
        );
        for (case, input) in [
            ("an error quoting an untracked flow", untracked),
            ("an error translated at ingress", translated),
            ("a reply", frame(ACK, vip, client, b"answer")),
            ("a request", frame(ACK, client, backend, b"more")),
        ] {
            icmp_case(
                &mut datapath,
                TC_EGRESS_PROGRAM,
                &format!("{what}: {case}, untouched"),
                &input,
                (TC_ACT_UNSPEC, &input),
                None,
            );
        }
    }
}
