//! The XDP datapath on crafted frames through BPF_PROG_TEST_RUN. Single-packet cases are a table of
//! fixtures (description, input frame, expected action, expected output frame); flow behaviour
//! (conntrack, draining, backend removal, a full conntrack table) is tested as packet sequences.
//! Every case also checks the counter that names the path the packet took.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use lb_agent::{
    config::Config,
    datapath::{
        ApplyReport, Datapath, LoadOptions, PinOptions, FLOOR_INSERT_PROGRAM, FLOOR_LOOKUP_PROGRAM,
    },
    inspect::{BackendState, Pinned},
    map_batch::read_array,
};
use lb_common::{
    conntrack::BackendReply,
    counters::Counter,
    flow_events::{choice, kind},
    modes::ModeInfo,
    prefilter::{self, role},
    protocol,
    service::{limits, mode, Addr, Backend, ServiceInfo, ServiceKey},
};
use lb_tests::{
    agent::TestPins,
    frames::{frame, inspect, ACK, FIN_ACK, L4, SYN},
    netns::{Netns, TEST_PREFIX},
    test_run::{
        assert_drop_event, assert_new_flow_event, assert_not_forwarded_event,
        check_not_forwarded_after_the_choice, counter, drain_flow_events, expected_backend,
        flow_key, load_with_flow_events, run, sa, Conntrack, NotForwardedVerdicts,
        UNDELIVERABLE_BACKENDS, XDP_DROP, XDP_PASS, XDP_TX,
    },
};

const CONFIG: &str = concat!(
    "services:\n",
    lb_tests::web_and_dns_services!(),
    "
  - name: all-ports
    vip: 198.51.100.20
    port: 0
    protocol: tcp
    backends:
      - { address: 203.0.113.21, port: 0 }
  - name: affinity
    vip: 198.51.100.30
    port: 80
    protocol: tcp
    hash: source-ip
    backends:
      - { address: 203.0.113.31, port: 80 }
      - { address: 203.0.113.32, port: 80 }
      - { address: 203.0.113.33, port: 80 }
  - name: empty
    vip: 198.51.100.11
    port: 80
    protocol: tcp
",
);

fn load(config: &str) -> Datapath {
    let mut datapath = Datapath::load().expect("load datapath");
    datapath
        .apply(&Config::from_yaml(config).unwrap())
        .expect("apply config");
    datapath
}

fn key(vip: SocketAddr, proto: u8) -> ServiceKey {
    ServiceKey::new(vip.ip(), vip.port(), proto)
}

/// Sends `l4` from `src` to `vip` and returns the backend it was rewritten to, checking that the
/// output is byte-identical to the same frame built from scratch for that backend.
fn send_to_vip(datapath: &mut Datapath, l4: L4, src: SocketAddr, vip: SocketAddr) -> SocketAddr {
    let input = frame(l4, src, vip, b"payload");
    let (action, out) = run(datapath.xdp_program(), &input);
    assert_eq!(action, XDP_PASS, "{src} -> {vip}");
    let got = inspect(&out);
    assert_eq!(got.src, src, "client address and port are kept");
    assert_eq!(
        out,
        frame(l4, src, got.dst, b"payload"),
        "byte-exact rewrite {src} -> {vip}"
    );
    got.dst
}

enum Expect {
    /// Rewritten towards the backend the Maglev table and hash predict.
    ToBackend {
        source_ip_only: bool,
    },
    /// Rewritten to exactly this frame.
    Frame(Vec<u8>),
    /// Passed byte-identical.
    Unchanged,
    Dropped,
}

struct Fixture {
    what: &'static str,
    input: Vec<u8>,
    expect: Expect,
    counter: Counter,
}

fn truncate(mut f: Vec<u8>, len: usize) -> Vec<u8> {
    f.truncate(len);
    f
}

#[test]
fn single_packet_fixtures() {
    let mut datapath = load(CONFIG);
    // A DNAT flow whose reply the table below expects to be translated.
    let v4_backend = send_to_vip(
        &mut datapath,
        SYN,
        sa("192.0.2.2:40000"),
        sa("198.51.100.10:80"),
    );
    let v6_backend = send_to_vip(
        &mut datapath,
        SYN,
        sa("[2001:db8:2::2]:40000"),
        sa("[2001:db8:100::10]:443"),
    );

    let mut ipv4_options = frame(SYN, sa("192.0.2.2:40001"), sa("198.51.100.10:80"), b"");
    ipv4_options[14] = 0x46;
    // Fragments, options and extension headers that are balanced: xdp_icmp_fragments.rs.
    let mut fragment = frame(SYN, sa("192.0.2.2:40001"), sa("198.51.100.10:80"), b"");
    fragment[20] |= 0x20; // more fragments
    fragment[21] = 0xb9; // at offset 1480: a later fragment, its first never seen
    let mut arp = frame(SYN, sa("192.0.2.2:1"), sa("198.51.100.10:80"), b"");
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    let mut hop_by_hop = frame(
        SYN,
        sa("[2001:db8:2::2]:40001"),
        sa("[2001:db8:100::10]:443"),
        b"",
    );
    hop_by_hop[14 + 6] = 51; // authentication header: a rewrite would break it
    let mut icmp = frame(L4::Udp, sa("192.0.2.2:1"), sa("198.51.100.10:53"), b"");
    icmp[14 + 9] = 1;

    let fixtures = vec![
        Fixture {
            what: "IPv4 TCP SYN to VIP",
            input: frame(SYN, sa("192.0.2.2:40002"), sa("198.51.100.10:80"), b"x"),
            expect: Expect::ToBackend {
                source_ip_only: false,
            },
            counter: Counter::ForwardNewFlow,
        },
        Fixture {
            what: "IPv4 UDP to VIP",
            input: frame(L4::Udp, sa("192.0.2.2:33333"), sa("198.51.100.10:53"), b"q"),
            expect: Expect::ToBackend {
                source_ip_only: false,
            },
            counter: Counter::ForwardNewFlow,
        },
        Fixture {
            what: "IPv6 TCP SYN to VIP",
            input: frame(
                SYN,
                sa("[2001:db8:2::2]:40002"),
                sa("[2001:db8:100::10]:443"),
                b"x",
            ),
            expect: Expect::ToBackend {
                source_ip_only: false,
            },
            counter: Counter::ForwardNewFlow,
        },
        Fixture {
            what: "IPv6 UDP to VIP, backend keeps the port",
            input: frame(
                L4::Udp,
                sa("[2001:db8:2::2]:5000"),
                sa("[2001:db8:100::10]:53"),
                b"q",
            ),
            expect: Expect::ToBackend {
                source_ip_only: false,
            },
            counter: Counter::ForwardNewFlow,
        },
        Fixture {
            what: "all-ports service keeps the port",
            input: frame(SYN, sa("192.0.2.2:40003"), sa("198.51.100.20:6379"), b""),
            expect: Expect::Frame(frame(
                SYN,
                sa("192.0.2.2:40003"),
                sa("203.0.113.21:6379"),
                b"",
            )),
            counter: Counter::ForwardNewFlow,
        },
        Fixture {
            what: "source-IP affinity",
            input: frame(SYN, sa("192.0.2.7:1234"), sa("198.51.100.30:80"), b""),
            expect: Expect::ToBackend {
                source_ip_only: true,
            },
            counter: Counter::ForwardNewFlow,
        },
        Fixture {
            what: "IPv4 reply from backend",
            input: frame(ACK, v4_backend, sa("192.0.2.2:40000"), b"r"),
            expect: Expect::Frame(frame(
                ACK,
                sa("198.51.100.10:80"),
                sa("192.0.2.2:40000"),
                b"r",
            )),
            counter: Counter::ReplyTranslated,
        },
        Fixture {
            what: "IPv6 reply from backend",
            input: frame(ACK, v6_backend, sa("[2001:db8:2::2]:40000"), b"r"),
            expect: Expect::Frame(frame(
                ACK,
                sa("[2001:db8:100::10]:443"),
                sa("[2001:db8:2::2]:40000"),
                b"r",
            )),
            counter: Counter::ReplyTranslated,
        },
        Fixture {
            what: "backend traffic to a client it has no flow with",
            input: frame(ACK, v4_backend, sa("192.0.2.9:40000"), b"r"),
            expect: Expect::Unchanged,
            counter: Counter::PassNotService,
        },
        Fixture {
            what: "IPv4 non-VIP",
            input: frame(SYN, sa("192.0.2.2:40000"), sa("198.51.100.99:80"), b""),
            expect: Expect::Unchanged,
            counter: Counter::PassNotService,
        },
        Fixture {
            what: "IPv6 non-VIP",
            input: frame(
                SYN,
                sa("[2001:db8:2::2]:40000"),
                sa("[2001:db8:100::99]:443"),
                b"",
            ),
            expect: Expect::Unchanged,
            counter: Counter::PassNotService,
        },
        Fixture {
            what: "VIP, other port",
            input: frame(SYN, sa("192.0.2.2:40000"), sa("198.51.100.10:81"), b""),
            expect: Expect::Unchanged,
            counter: Counter::PassNotService,
        },
        Fixture {
            what: "VIP port, other protocol",
            input: frame(L4::Udp, sa("192.0.2.2:40000"), sa("198.51.100.10:80"), b""),
            expect: Expect::Unchanged,
            counter: Counter::PassNotService,
        },
        Fixture {
            what: "ARP",
            input: arp,
            expect: Expect::Unchanged,
            counter: Counter::PassNotIp,
        },
        Fixture {
            what: "IPv4 options that do not parse",
            input: ipv4_options,
            expect: Expect::Unchanged,
            counter: Counter::PassIpv4Options,
        },
        Fixture {
            what: "IPv4 later fragment of an untracked datagram",
            input: fragment,
            expect: Expect::Unchanged,
            counter: Counter::PassFragment,
        },
        Fixture {
            what: "IPv6 authentication header",
            input: hop_by_hop,
            expect: Expect::Unchanged,
            counter: Counter::PassIpv6ExtensionHeader,
        },
        Fixture {
            what: "ICMP",
            input: icmp,
            expect: Expect::Unchanged,
            counter: Counter::PassNotTcpUdp,
        },
        Fixture {
            what: "truncated TCP header",
            input: truncate(
                frame(SYN, sa("192.0.2.2:1"), sa("198.51.100.10:80"), b""),
                14 + 20 + 10,
            ),
            expect: Expect::Dropped,
            counter: Counter::DropMalformed,
        },
        Fixture {
            what: "truncated IPv6 header",
            input: truncate(
                frame(
                    SYN,
                    sa("[2001:db8:2::2]:1"),
                    sa("[2001:db8:100::10]:443"),
                    b"",
                ),
                14 + 30,
            ),
            expect: Expect::Dropped,
            counter: Counter::DropMalformed,
        },
        Fixture {
            what: "VIP without backends",
            input: frame(SYN, sa("192.0.2.2:40000"), sa("198.51.100.11:80"), b""),
            expect: Expect::Dropped,
            counter: Counter::DropNoBackend,
        },
    ];

    for fixture in fixtures {
        let before = counter(&datapath, fixture.counter);
        let (action, out) = run(datapath.xdp_program(), &fixture.input);
        let what = fixture.what;
        match fixture.expect {
            Expect::ToBackend { source_ip_only } => {
                assert_eq!(action, XDP_PASS, "{what}");
                let input = inspect(&fixture.input);
                let proto = fixture.input[if input.src.is_ipv4() { 14 + 9 } else { 14 + 6 }];
                let vip = key(input.dst, proto);
                let want =
                    expected_backend(&datapath, &vip, proto, input.src, input.dst, source_ip_only);
                let got = inspect(&out);
                assert_eq!(got.dst, want, "{what}: backend chosen by the Maglev table");
                assert_eq!(got.src, input.src, "{what}: client kept");
                assert!(got.checksums_ok, "{what}: checksums");
            }
            Expect::Frame(want) => {
                assert_eq!(action, XDP_PASS, "{what}");
                assert_eq!(out, want, "{what}: byte-exact output");
            }
            Expect::Unchanged => {
                assert_eq!(action, XDP_PASS, "{what}");
                assert_eq!(out, fixture.input, "{what}: untouched");
            }
            Expect::Dropped => assert_eq!(action, XDP_DROP, "{what}"),
        }
        assert_eq!(
            counter(&datapath, fixture.counter),
            before + 1,
            "{what}: counted as {}",
            fixture.counter.name()
        );
    }
}

/// Every backend `lbctl backends` lists from the pins: its state and live tracked flows.
fn listed_backends(pins: &TestPins) -> BTreeMap<SocketAddr, (BackendState, u64)> {
    Pinned::new(pins.path())
        .backends()
        .expect("lbctl's listing of the pinned backends")
        .into_iter()
        .map(|row| {
            (
                SocketAddr::new(row.address, row.port),
                (row.state, row.flows),
            )
        })
        .collect()
}

#[test]
fn conntrack_keeps_a_flow_on_its_backend_through_table_changes() {
    // Pinned, so that `lbctl`'s reading of the maps shows each backend's state.
    let pins = TestPins::new();
    let mut datapath = Datapath::load_with(&LoadOptions {
        pins: Some(PinOptions {
            dir: pins.path().into(),
            replace_incompatible_state: false,
        }),
        ..Default::default()
    })
    .expect("load pinned datapath");
    datapath.apply(&Config::from_yaml(CONFIG).unwrap()).unwrap();
    let vip = sa("198.51.100.10:80");
    let client = sa("192.0.2.2:41000");
    let first = send_to_vip(&mut datapath, SYN, client, vip);
    let hits = counter(&datapath, Counter::ForwardConntrackHit);
    assert_eq!(send_to_vip(&mut datapath, ACK, client, vip), first);
    assert_eq!(
        counter(&datapath, Counter::ForwardConntrackHit),
        hits + 1,
        "second packet is a conntrack hit"
    );

    // Add a backend and drain the flow's backend (weight 0): the flow stays, new flows avoid it.
    let drained = CONFIG.replace(
        &format!("      - {{ address: {}, port: 8080 }}\n", first.ip()),
        &format!("      - {{ address: {}, port: 8080, weight: 0 }}\n      - {{ address: 203.0.113.14, port: 8080 }}\n", first.ip()),
    );
    let report = datapath
        .apply(&Config::from_yaml(&drained).unwrap())
        .unwrap();
    assert_eq!(
        report.tables_swapped, 1,
        "only web's table changed: {report:?}"
    );
    for _ in 0..3 {
        assert_eq!(
            send_to_vip(&mut datapath, ACK, client, vip),
            first,
            "tracked flow keeps its draining backend"
        );
    }
    let added: SocketAddr = sa("203.0.113.14:8080");
    let mut new_backends = std::collections::BTreeSet::new();
    let mut to_added = 0;
    for port in 42000..42100u16 {
        let b = send_to_vip(&mut datapath, SYN, SocketAddr::new(client.ip(), port), vip);
        assert_ne!(b, first, "no new flow goes to a draining backend");
        new_backends.insert(b);
        to_added += u64::from(b == added);
    }
    assert_eq!(
        new_backends.len(),
        3,
        "new flows use the 2 remaining and the added backend"
    );
    let listed = listed_backends(&pins);
    assert_eq!(
        listed[&first],
        (BackendState::Drained, 1),
        "no table names the drained backend, its one flow does: {listed:?}"
    );
    assert_eq!(listed[&added].0, BackendState::Active, "{listed:?}");

    // Remove the backend (and the added one): both are retired, not removed, while flows tracked
    // to them live. The flow stays on its backend; new flows still avoid it.
    let removed = CONFIG.replace(
        &format!("      - {{ address: {}, port: 8080 }}\n", first.ip()),
        "",
    );
    let removed = Config::from_yaml(&removed).unwrap();
    let report = datapath.apply(&removed).unwrap();
    assert_eq!(
        (report.backends_retired, report.backends_removed),
        (2, 0),
        "{report:?}"
    );
    let retired = |datapath: &Datapath| {
        let mut r = datapath.retired_backends();
        r.sort();
        r
    };
    assert_eq!(retired(&datapath), [(first.ip(), 8080), (added.ip(), 8080)]);
    assert_eq!(
        send_to_vip(&mut datapath, ACK, client, vip),
        first,
        "the tracked flow keeps its removed backend"
    );
    for port in 43000..43050u16 {
        let b = send_to_vip(&mut datapath, SYN, SocketAddr::new(client.ip(), port), vip);
        assert!(b != first && b != added, "no new flow to a removed backend");
    }
    // The flows to the added backend still live: a sweep keeps both, and `lbctl backends` lists
    // both as retired with the flows that keep them.
    assert_eq!(datapath.release_retired_backends().unwrap(), 0);
    let listed = listed_backends(&pins);
    assert_eq!(listed[&first], (BackendState::Retired, 1), "{listed:?}");
    assert_eq!(
        listed[&added],
        (BackendState::Retired, to_added),
        "{listed:?}"
    );

    // The flow ends (its entry goes): the next sweep removes its backend, whose id is free; a
    // late packet of that flow is re-balanced. The added backend's flows still live.
    let reply = lb_tests::test_run::flow_key(lb_common::protocol::TCP, first, client);
    let flow = lb_tests::test_run::flow_key(lb_common::protocol::TCP, client, vip);
    assert!(datapath.forget_flow(&flow, &reply).unwrap());
    assert_eq!(datapath.release_retired_backends().unwrap(), 1);
    assert_eq!(retired(&datapath), [(added.ip(), 8080)]);
    let listed = listed_backends(&pins);
    assert!(!listed.contains_key(&first), "released: {listed:?}");
    assert_eq!(listed[&added].0, BackendState::Retired, "{listed:?}");
    let misses = counter(&datapath, Counter::ConntrackMidflowMiss);
    assert_ne!(send_to_vip(&mut datapath, ACK, client, vip), first);
    assert_eq!(
        counter(&datapath, Counter::ConntrackMidflowMiss),
        misses + 1
    );

    // Both named again: the retired one is the same backend (its id and flows kept, its entry
    // rewritten without the retired flag), the removed one is written anew.
    let report = datapath
        .apply(&Config::from_yaml(&drained).unwrap())
        .unwrap();
    assert_eq!(
        (report.backends_written, report.backends_retired),
        (2, 0),
        "{report:?}"
    );
    assert!(retired(&datapath).is_empty());
    let listed = listed_backends(&pins);
    assert_eq!(
        listed[&added],
        (BackendState::Active, to_added),
        "{listed:?}"
    );
    assert_eq!(listed[&first], (BackendState::Drained, 0), "{listed:?}");
}

/// The tracked flows of `datapath`, per family map.
fn conntrack(datapath: &mut Datapath) -> Conntrack {
    let ebpf = datapath.ebpf_mut();
    Conntrack::read(
        ebpf.map("CONNTRACK_V4").expect("CONNTRACK_V4"),
        ebpf.map("CONNTRACK_V6").expect("CONNTRACK_V6"),
    )
}

#[test]
fn each_family_is_tracked_in_its_own_map_and_keeps_its_backend() {
    let mut datapath = load(CONFIG);
    let (vip4, client4) = (sa("198.51.100.10:80"), sa("192.0.2.2:48000"));
    let (vip6, client6) = (sa("[2001:db8:100::10]:443"), sa("[2001:db8:1::2]:48000"));
    let (flow4, flow6) = (
        flow_key(protocol::TCP, client4, vip4),
        flow_key(protocol::TCP, client6, vip6),
    );
    let first4 = send_to_vip(&mut datapath, SYN, client4, vip4);
    let first6 = send_to_vip(&mut datapath, SYN, client6, vip6);

    let tracked = conntrack(&mut datapath);
    assert_eq!(
        tracked.v4.keys().collect::<Vec<_>>(),
        [&flow4],
        "the IPv4 flow, alone in CONNTRACK_V4"
    );
    assert_eq!(
        tracked.v6.keys().collect::<Vec<_>>(),
        [&flow6],
        "the IPv6 flow, alone in CONNTRACK_V6"
    );
    assert_ne!(
        tracked.v4[&flow4].backend_id, tracked.v6[&flow6].backend_id,
        "each entry names its own family's backend"
    );

    // Drain both backends: only the entries keep the flows on them.
    let drained = CONFIG
        .replace(
            &format!("      - {{ address: {}, port: 8080 }}\n", first4.ip()),
            &format!(
                "      - {{ address: {}, port: 8080, weight: 0 }}\n",
                first4.ip()
            ),
        )
        .replace(
            &format!("      - {{ address: {}, port: 8443 }}\n", first6.ip()),
            &format!(
                "      - {{ address: {}, port: 8443, weight: 0 }}\n",
                first6.ip()
            ),
        );
    let report = datapath
        .apply(&Config::from_yaml(&drained).unwrap())
        .unwrap();
    assert_eq!(report.tables_swapped, 2, "web and web6 drained: {report:?}");
    assert_eq!(send_to_vip(&mut datapath, ACK, client4, vip4), first4);
    assert_eq!(send_to_vip(&mut datapath, ACK, client6, vip6), first6);

    // Forgetting the IPv4 flow empties CONNTRACK_V4 alone: that flow moves, the IPv6 one stays.
    assert!(
        datapath.forget_flow(&flow4, &flow4).unwrap(),
        "IPv4 entry found"
    );
    let tracked = conntrack(&mut datapath);
    assert!(tracked.v4.is_empty(), "{:?}", tracked.v4);
    assert_eq!(tracked.v6.len(), 1);
    assert_ne!(send_to_vip(&mut datapath, ACK, client4, vip4), first4);
    assert_eq!(send_to_vip(&mut datapath, ACK, client6, vip6), first6);
    assert!(
        datapath.forget_flow(&flow6, &flow6).unwrap(),
        "IPv6 entry found"
    );
    assert_ne!(send_to_vip(&mut datapath, ACK, client6, vip6), first6);
}

#[test]
fn fin_then_syn_on_the_same_ports_is_a_new_connection() {
    let mut datapath = load(CONFIG);
    let (vip, client) = (sa("198.51.100.10:80"), sa("192.0.2.2:43000"));
    send_to_vip(&mut datapath, SYN, client, vip);
    send_to_vip(&mut datapath, FIN_ACK, client, vip);
    let new_flows = counter(&datapath, Counter::ForwardNewFlow);
    send_to_vip(&mut datapath, SYN, client, vip);
    assert_eq!(counter(&datapath, Counter::ForwardNewFlow), new_flows + 1);
}

#[test]
fn midflow_packet_without_entry_is_balanced_by_the_table_and_counted() {
    let mut datapath = load(CONFIG);
    let (vip, client) = (sa("198.51.100.10:80"), sa("192.0.2.2:44000"));
    let want = expected_backend(
        &datapath,
        &key(vip, protocol::TCP),
        protocol::TCP,
        client,
        vip,
        false,
    );
    assert_eq!(send_to_vip(&mut datapath, ACK, client, vip), want);
    assert_eq!(counter(&datapath, Counter::ConntrackMidflowMiss), 1);
}

#[test]
fn flow_events_report_new_flows_and_drops_only_when_enabled() {
    let (vip, empty) = (sa("198.51.100.10:80"), sa("198.51.100.11:80"));
    let (client, midflow) = (sa("192.0.2.2:45000"), sa("192.0.2.2:45001"));
    for enabled in [true, false] {
        let (mut datapath, mut ring) = load_with_flow_events(CONFIG, enabled);

        let backend = send_to_vip(&mut datapath, SYN, client, vip);
        let new_flow = drain_flow_events(&mut ring);
        // The same flow again: a conntrack hit, never reported.
        assert_eq!(send_to_vip(&mut datapath, ACK, client, vip), backend);
        assert_eq!(counter(&datapath, Counter::ForwardConntrackHit), 1);
        assert_eq!(drain_flow_events(&mut ring), []);
        // Mid-flow without an entry (evicted): balanced by the table, reported as such.
        let midflow_backend = send_to_vip(&mut datapath, ACK, midflow, vip);
        let midflow_event = drain_flow_events(&mut ring);
        let (action, _) = run(
            datapath.xdp_program(),
            &frame(SYN, client, empty, b"payload"),
        );
        assert_eq!(action, XDP_DROP);
        let dropped = drain_flow_events(&mut ring);
        // Traffic to no VIP is never reported.
        let (action, _) = run(
            datapath.xdp_program(),
            &frame(SYN, client, sa("192.0.2.99:80"), b""),
        );
        assert_eq!(action, XDP_PASS);
        assert_eq!(drain_flow_events(&mut ring), []);

        if !enabled {
            assert_eq!(new_flow, []);
            assert_eq!(midflow_event, []);
            assert_eq!(dropped, []);
            continue;
        }
        let tcp = protocol::TCP;
        assert_eq!(new_flow.len(), 1, "{new_flow:?}");
        assert_new_flow_event(
            &mut datapath,
            &new_flow[0],
            (client, vip, tcp),
            backend,
            (mode::DNAT, choice::NEW),
        );
        assert_eq!(midflow_event.len(), 1, "{midflow_event:?}");
        assert_new_flow_event(
            &mut datapath,
            &midflow_event[0],
            (midflow, vip, tcp),
            midflow_backend,
            (mode::DNAT, choice::CONNTRACK_MISS),
        );
        assert_eq!(dropped.len(), 1, "{dropped:?}");
        assert_drop_event(
            &mut datapath,
            &dropped[0],
            (client, empty, tcp),
            Counter::DropNoBackend,
        );
        assert_eq!(counter(&datapath, Counter::FlowEventsLost), 0);
    }
}

/// Packets of flows whose backend was chosen but that the fast path did not send to it are
/// reported once each, with that backend, only with flow events on: DSR L2 without the backend's
/// neighbour entry (dropped), and a full-sized DSR IPIP packet too big once encapsulated (answered
/// with "fragmentation needed"); a small IPIP packet the stack takes over is not reported.
#[test]
fn flow_events_report_packets_not_forwarded_after_the_choice() {
    let ns = Netns::new(TEST_PREFIX, "xdp").expect("namespace");
    for command in UNDELIVERABLE_BACKENDS {
        ns.ip_cmd(command).expect(command);
    }
    ns.run(not_forwarded_in_namespace);
}

fn not_forwarded_in_namespace() {
    check_not_forwarded_after_the_choice(
        |datapath, input| run(datapath.xdp_program(), input).0,
        NotForwardedVerdicts {
            no_neighbour: XDP_DROP,
            small_ipip: XDP_PASS,
            too_big: XDP_TX,
        },
    );
}

/// A new SNAT flow that finds no free source port is dropped after Maglev chose its backend: its
/// flow event says so with that backend (`not_forwarded`, `drop_snat_ports_exhausted`), and no
/// new flow is reported (it is not tracked).
#[test]
fn flow_events_name_the_backend_of_a_snat_flow_without_a_free_port() {
    let yaml = "
node: { ipv4: 192.0.2.1, snat_ports: { first: 5000, last: 5000 } }
services:
  - { name: web, vip: 198.51.100.40, port: 80, protocol: tcp, mode: snat,
      backends: [ { address: 203.0.113.6, port: 8080 } ] }
";
    let (mut datapath, mut ring) = load_with_flow_events(yaml, true);
    let vip = sa("198.51.100.40:80");
    let (first, second) = (sa("192.0.2.2:10000"), sa("192.0.2.3:20000"));
    // The range's one port goes to the first flow (outside a namespace with routes the
    // translated packet goes to the stack).
    let (action, _) = run(datapath.xdp_program(), &frame(SYN, first, vip, b""));
    assert_eq!(action, XDP_PASS);
    let events = drain_flow_events(&mut ring);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, kind::NEW_FLOW);

    let (action, _) = run(datapath.xdp_program(), &frame(SYN, second, vip, b""));
    assert_eq!(action, XDP_DROP);
    assert_eq!(counter(&datapath, Counter::DropSnatPortsExhausted), 1);
    let events = drain_flow_events(&mut ring);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_not_forwarded_event(
        &mut datapath,
        &events[0],
        (second, vip, protocol::TCP),
        (sa("203.0.113.6:8080"), mode::SNAT),
        Counter::DropSnatPortsExhausted,
    );
    assert_eq!(counter(&datapath, Counter::FlowEventsLost), 0);
}

#[test]
fn full_conntrack_still_forwards_consistently_and_counts_pressure() {
    // Each family's table has its own size.
    let mut datapath = Datapath::load_with(&LoadOptions {
        conntrack_entries: 64,
        conntrack_entries_v6: Some(16),
        ..Default::default()
    })
    .unwrap();
    datapath.apply(&Config::from_yaml(CONFIG).unwrap()).unwrap();
    let vip = sa("198.51.100.10:80");
    let first_client = sa("192.0.2.2:45000");
    let first = send_to_vip(&mut datapath, SYN, first_client, vip);
    // 2000 more flows through a 64-entry table evict the first flow's entry.
    for port in 45001..47001u16 {
        send_to_vip(
            &mut datapath,
            SYN,
            SocketAddr::new(first_client.ip(), port),
            vip,
        );
    }
    assert_eq!(
        send_to_vip(&mut datapath, ACK, first_client, vip),
        first,
        "same backend from the table"
    );
    assert!(
        counter(&datapath, Counter::ConntrackMidflowMiss) >= 1,
        "the eviction shows as pressure"
    );

    // The IPv4 table is full; 40 IPv6 flows fill the 16 entries of theirs.
    let vip6 = sa("[2001:db8:100::10]:443");
    for port in 45000..45040u16 {
        send_to_vip(
            &mut datapath,
            SYN,
            sa(&format!("[2001:db8:2::2]:{port}")),
            vip6,
        );
    }
    let fill = datapath.conntrack_fill().unwrap();
    assert_eq!(
        fill.map(|t| (t.map, t.capacity)),
        [("CONNTRACK_V4", 64), ("CONNTRACK_V6", 16)]
    );
    // Full, though an LRU map may hold fewer entries than its size (it keeps free nodes per
    // CPU: 50 of 64 were seen).
    for table in fill {
        assert!(
            table.entries > u64::from(table.capacity) / 2
                && table.entries <= u64::from(table.capacity),
            "{fill:?}"
        );
    }
}

#[test]
fn weights_are_honoured_for_new_flows() {
    let weighted = "
services:
  - name: web
    vip: 198.51.100.10
    port: 80
    protocol: tcp
    backends:
      - { address: 203.0.113.11, port: 8080, weight: 1 }
      - { address: 203.0.113.12, port: 8080, weight: 3 }
";
    let mut datapath = load(weighted);
    let vip = sa("198.51.100.10:80");
    let mut heavy = 0;
    for port in 10000..14000u16 {
        if send_to_vip(
            &mut datapath,
            SYN,
            SocketAddr::new("192.0.2.2".parse().unwrap(), port),
            vip,
        )
        .ip()
            == "203.0.113.12".parse::<std::net::IpAddr>().unwrap()
        {
            heavy += 1;
        }
    }
    assert!(
        (2850..3150).contains(&heavy),
        "weight 3 of 4 should take ~3000 of 4000 flows, took {heavy}"
    );
    let stats = datapath
        .backend_stats("203.0.113.12".parse().unwrap(), 8080)
        .unwrap()
        .unwrap();
    assert_eq!(stats.new_flows, heavy, "per-backend new-flow counter");
}

#[test]
fn service_and_backend_traffic_is_counted() {
    let mut datapath = load(CONFIG);
    let vip = sa("198.51.100.10:53");
    let backend = send_to_vip(&mut datapath, L4::Udp, sa("192.0.2.2:5000"), vip);
    send_to_vip(&mut datapath, L4::Udp, sa("192.0.2.2:5000"), vip);
    let s = datapath
        .service_stats(&key(vip, protocol::UDP))
        .unwrap()
        .unwrap();
    assert_eq!((s.packets, s.new_flows), (2, 1));
    assert_eq!(
        s.bytes,
        2 * frame(L4::Udp, sa("192.0.2.2:5000"), vip, b"payload").len() as u64
    );
    let b = datapath
        .backend_stats(backend.ip(), backend.port())
        .unwrap()
        .unwrap();
    assert_eq!((b.packets, b.new_flows), (2, 1));
}

/// The first pair (one of `vips`, one of `others`) whose prefilter slots are equal.
fn colliding_pair(vips: &[IpAddr], others: &[IpAddr]) -> (IpAddr, IpAddr) {
    let slot = |ip: &IpAddr| prefilter::slot(&Addr::from_ip(*ip));
    for vip in vips {
        if let Some(other) = others.iter().find(|o| *o != vip && slot(o) == slot(vip)) {
            return (*vip, *other);
        }
    }
    panic!("no prefilter collision among the candidates");
}

/// Expects `input` to leave untouched as non-service traffic.
fn assert_passed_as_non_service(datapath: &mut Datapath, input: &[u8], what: &str) {
    let before = counter(datapath, Counter::PassNotService);
    let (action, out) = run(datapath.xdp_program(), input);
    assert_eq!(action, XDP_PASS, "{what}");
    assert_eq!(out, input, "{what}: unchanged");
    assert_eq!(
        counter(datapath, Counter::PassNotService),
        before + 1,
        "{what}: counted pass_not_service"
    );
}

#[test]
fn address_prefilter_follows_the_services_and_collisions_still_pass() {
    let v4 = |net: [u8; 3], i: u8| IpAddr::from([net[0], net[1], net[2], i]);
    let test_net_v4: Vec<IpAddr> = [[192, 0, 2], [198, 51, 100], [203, 0, 113]]
        .iter()
        .flat_map(|net| (1..=254).map(move |i| v4(*net, i)))
        .collect();
    let v6 = |prefix: u16, j: u16, i: u16| IpAddr::from([0x2001, 0xdb8, prefix, 0, 0, 0, j, i]);
    // 2^20 addresses of a /64: about 16 share a given address's slot.
    let many_v6 = |prefix: u16| -> Vec<IpAddr> {
        (0..16)
            .flat_map(|j| (0..=u16::MAX).map(move |i| v6(prefix, j, i)))
            .collect()
    };
    // TEST-NET's three /24s share no slot (a /24's addresses never do), so the IPv4 destination
    // that collides is one sharing an IPv6 VIP's slot.
    let (collides4, vip_near4) = colliding_pair(&test_net_v4, &many_v6(0x101));
    let (vip6, collides6) = colliding_pair(&[v6(0x100, 0, 0x10)], &many_v6(0x100));
    let backend6 = v6(0x203, 0, 0x11);
    let (_, client_collides6) = colliding_pair(&[backend6], &many_v6(2));
    let config = format!(
        "
services:
  - {{ name: near4, vip: {vip_near4}, port: 80, protocol: tcp, backends: [{{ address: 2001:db8:203::12, port: 8080 }}] }}
  - {{ name: v6, vip: {vip6}, port: 80, protocol: tcp, backends: [{{ address: {backend6}, port: 8080 }}] }}
"
    );
    let mut datapath = load(&config);

    // Destinations sharing a VIP's slot, and a source sharing a backend's: the exact lookups decide.
    let client_of = |ip: IpAddr| {
        if ip.is_ipv4() {
            sa("192.0.2.2:40000")
        } else {
            sa("[2001:db8:2::2]:40000")
        }
    };
    for (vip, other) in [(vip_near4, collides4), (vip6, collides6)] {
        let roles = datapath.address_filter_roles(other).unwrap();
        assert_eq!(roles, role::VIP_PORT, "{other} shares {vip}'s slot");
        send_to_vip(&mut datapath, SYN, client_of(vip), SocketAddr::new(vip, 80));
        let input = frame(SYN, client_of(other), SocketAddr::new(other, 80), b"");
        assert_passed_as_non_service(&mut datapath, &input, &format!("to {other}"));
    }
    assert_eq!(
        datapath.address_filter_roles(client_collides6).unwrap(),
        role::BACKEND,
        "{client_collides6} shares {backend6}'s slot"
    );
    let input = frame(
        ACK,
        SocketAddr::new(client_collides6, 8080),
        sa("[2001:db8:2::2]:40000"),
        b"",
    );
    assert_passed_as_non_service(&mut datapath, &input, "from a backend's slot");

    // A VIP added is balanced at once; removed, it is passed and its slot cleared.
    let added_vip = sa("198.51.100.250:80");
    assert_eq!(datapath.address_filter_roles(added_vip.ip()).unwrap(), 0);
    let to_added = frame(SYN, sa("192.0.2.2:40001"), added_vip, b"payload");
    assert_passed_as_non_service(&mut datapath, &to_added, "before the VIP exists");
    let with_added = format!(
        "{config}  - {{ name: added, vip: {}, port: 80, protocol: tcp, backends: [{{ address: 203.0.113.99, port: 8080 }}] }}\n",
        added_vip.ip()
    );
    datapath
        .apply(&Config::from_yaml(&with_added).unwrap())
        .unwrap();
    assert_eq!(
        datapath.address_filter_roles(added_vip.ip()).unwrap(),
        role::VIP_PORT
    );
    let backend = sa("203.0.113.99:8080");
    assert_eq!(
        send_to_vip(&mut datapath, SYN, sa("192.0.2.2:40001"), added_vip),
        backend
    );
    let reply = frame(ACK, backend, sa("192.0.2.2:40001"), b"");
    let translated = counter(&datapath, Counter::ReplyTranslated);
    let (action, out) = run(datapath.xdp_program(), &reply);
    assert_eq!(action, XDP_PASS);
    assert_eq!(out, frame(ACK, added_vip, sa("192.0.2.2:40001"), b""));
    assert_eq!(counter(&datapath, Counter::ReplyTranslated), translated + 1);

    datapath
        .apply(&Config::from_yaml(&config).unwrap())
        .unwrap();
    assert_eq!(datapath.address_filter_roles(added_vip.ip()).unwrap(), 0);
    assert_eq!(datapath.address_filter_roles(backend.ip()).unwrap(), 0);
    let to_removed = frame(SYN, sa("192.0.2.2:40002"), added_vip, b"payload");
    assert_passed_as_non_service(&mut datapath, &to_removed, "after the VIP is removed");
}

/// A tracked flow finds its service through the id in its conntrack entry (`SERVICE_SLOTS`): once
/// the service is removed, also when another VIP's service takes over its id, the flow's packets
/// are passed as non-service traffic, as a new flow's would be.
#[test]
fn tracked_flow_of_a_removed_service_is_no_longer_balanced() {
    let web = "  - { name: web, vip: 198.51.100.10, port: 80, protocol: tcp, backends: [{ address: 203.0.113.11, port: 8080 }] }\n";
    let dns = "  - { name: dns, vip: 198.51.100.10, port: 53, protocol: udp, backends: [{ address: 203.0.113.12, port: 53 }] }\n";
    let other = "  - { name: other, vip: 198.51.100.40, port: 80, protocol: tcp, backends: [{ address: 203.0.113.13, port: 8080 }] }\n";
    let mut datapath = load(&format!("services:\n{web}{dns}"));
    let (client, vip) = (sa("192.0.2.2:45000"), sa("198.51.100.10:80"));
    send_to_vip(&mut datapath, SYN, client, vip);
    let hits = counter(&datapath, Counter::ForwardConntrackHit);
    send_to_vip(&mut datapath, ACK, client, vip);
    assert_eq!(counter(&datapath, Counter::ForwardConntrackHit), hits + 1);

    datapath
        .apply(&Config::from_yaml(&format!("services:\n{dns}{other}")).unwrap())
        .unwrap();
    assert_eq!(
        datapath
            .service_stats(&key(sa("198.51.100.40:80"), protocol::TCP))
            .unwrap()
            .map(|_| ()),
        Some(()),
        "the other service exists"
    );
    let ack = frame(ACK, client, vip, b"payload");
    assert_passed_as_non_service(&mut datapath, &ack, "tracked flow of a removed service");
    assert_eq!(
        send_to_vip(
            &mut datapath,
            SYN,
            sa("192.0.2.2:45001"),
            sa("198.51.100.40:80")
        ),
        sa("203.0.113.13:8080"),
        "the service that took the id balances its own VIP"
    );
}

/// Tables are placed in batches; when an apply fails part-way (here: one service more than the
/// datapath has ids for), a changed service whose new table was not placed yet keeps its old
/// table in the kernel and in the agent's bookkeeping, and the next good apply works.
#[test]
fn a_failed_apply_keeps_the_previous_table_of_services_not_yet_placed() {
    let service = |name: &str, vip: &str, backend: &str| {
        format!(
            "  - name: {name}\n    vip: {vip}\n    port: 80\n    protocol: tcp\n    \
             maglev_table_size: 251\n    backends:\n      - {{ address: {backend}, port: 8080 }}\n"
        )
    };
    let changed = sa("198.51.100.10:80");
    let before = format!(
        "services:\n{}{}",
        service("changed", "198.51.100.10", "203.0.113.1"),
        service("kept", "198.51.100.11", "203.0.113.1")
    );
    let mut datapath = load(&before);
    let client = sa("192.0.2.1:40000");
    assert_eq!(
        send_to_vip(&mut datapath, SYN, client, changed),
        sa("203.0.113.1:8080")
    );

    // 300 new services, then `changed` moves to another backend (its table waits in the last,
    // partial batch: the first 256 tables are placed), then a service whose table cannot be built
    // fails the apply. (Validation refuses its table size; it is built past it here, as the
    // stand-in for a write the kernel refuses part-way.)
    let new_services = 300;
    let mut yaml = String::from("services:\n");
    yaml += &service("kept", "198.51.100.11", "203.0.113.1");
    for i in 0..new_services {
        let vip = format!("2001:db8:ffff::{:x}", i + 1);
        yaml += &service(&format!("s{i}"), &vip, "2001:db8:1::2");
    }
    yaml += &service("changed", "198.51.100.10", "203.0.113.3");
    let mut failing = Config::from_yaml(&yaml).unwrap();
    let mut broken = failing.services.last().unwrap().clone();
    broken.name = "broken".into();
    broken.vip = "198.51.100.12".parse().unwrap();
    broken.maglev_table_size = 4;
    failing.services.push(broken);
    let error = datapath
        .apply(&failing)
        .expect_err("a table that cannot be built");
    assert!(
        format!("{error:#}").contains("service broken: Maglev table"),
        "{error:#}"
    );
    let backend_of_changed = datapath
        .table_of(&key(changed, protocol::TCP))
        .expect("still programmed");
    assert!(
        backend_of_changed
            .iter()
            .all(|(ip, _)| *ip == "203.0.113.1".parse::<IpAddr>().unwrap()),
        "bookkeeping kept the old table"
    );
    let other_client = sa("192.0.2.2:40001");
    assert_eq!(
        send_to_vip(&mut datapath, SYN, other_client, changed),
        sa("203.0.113.1:8080"),
        "the kernel kept the old table"
    );

    // The next good apply moves `changed` and removes the services of the failed one.
    let after = format!(
        "services:\n{}{}",
        service("changed", "198.51.100.10", "203.0.113.3"),
        service("kept", "198.51.100.11", "203.0.113.1")
    );
    let report = datapath.apply(&Config::from_yaml(&after).unwrap()).unwrap();
    assert!(report.services_removed > 0, "{report:?}");
    let placed = sa("[2001:db8:ffff::1]:80");
    assert!(datapath.table_of(&key(placed, protocol::TCP)).is_none());
    assert_passed_as_non_service(
        &mut datapath,
        &frame(SYN, sa("[2001:db8:2::1]:40000"), placed, b"payload"),
        "a service of the failed apply, removed",
    );
    assert_eq!(
        send_to_vip(&mut datapath, SYN, sa("192.0.2.3:40002"), changed),
        sa("203.0.113.3:8080")
    );
}

/// Replies of a backend that serves one frontend are translated from its address and port (no
/// per-flow `NAT_REPLY` entry), and only for tracked flows; once a second frontend shares it, new
/// flows get their own entry, its flows from before keep the first VIP, and it stays shared after
/// the second frontend leaves (that frontend's flows still reach it).
#[test]
fn replies_of_exclusive_and_shared_backends_keep_their_vip() {
    let first = "  - { name: first, vip: 198.51.100.50, port: 80, protocol: tcp, backends: [{ address: 203.0.113.51, port: 8080 }] }\n";
    let second = "  - { name: second, vip: 198.51.100.51, port: 81, protocol: tcp, backends: [{ address: 203.0.113.51, port: 8080 }] }\n";
    let backend = sa("203.0.113.51:8080");
    let (vip1, vip2) = (sa("198.51.100.50:80"), sa("198.51.100.51:81"));
    let mut datapath = load(&format!("services:\n{first}"));
    let reply_of = |datapath: &mut Datapath, client: SocketAddr| {
        let translated = counter(datapath, Counter::ReplyTranslated);
        let (action, out) = run(datapath.xdp_program(), &frame(ACK, backend, client, b"r"));
        assert_eq!(action, XDP_PASS);
        let got = inspect(&out);
        assert_eq!(got.dst, client, "reply still to the client");
        let moved = counter(datapath, Counter::ReplyTranslated) - translated;
        assert_eq!(
            moved,
            u64::from(got.src != backend),
            "counted iff translated"
        );
        got.src
    };

    let a = sa("192.0.2.2:40000");
    assert_eq!(send_to_vip(&mut datapath, SYN, a, vip1), backend);
    assert_eq!(
        datapath.nat_reply_entries().unwrap(),
        0,
        "served alone: no entry"
    );
    assert_eq!(reply_of(&mut datapath, a), vip1);
    let stranger = sa("192.0.2.9:40000");
    assert_eq!(
        reply_of(&mut datapath, stranger),
        backend,
        "no tracked flow: untouched"
    );

    datapath
        .apply(&Config::from_yaml(&format!("services:\n{first}{second}")).unwrap())
        .unwrap();
    let b = sa("192.0.2.3:40001");
    assert_eq!(send_to_vip(&mut datapath, SYN, b, vip2), backend);
    assert_eq!(
        datapath.nat_reply_entries().unwrap(),
        1,
        "shared: the new flow's entry"
    );
    assert_eq!(reply_of(&mut datapath, b), vip2);
    assert_eq!(
        reply_of(&mut datapath, a),
        vip1,
        "flow from before the sharing"
    );
    assert_eq!(reply_of(&mut datapath, stranger), backend);

    // The second frontend leaves; its flow still reaches the backend (tracked while it exists).
    datapath
        .apply(&Config::from_yaml(&format!("services:\n{first}")).unwrap())
        .unwrap();
    assert_eq!(reply_of(&mut datapath, b), vip2, "sharing is sticky");
    assert_eq!(reply_of(&mut datapath, a), vip1);
}

/// `n` services 198.51.100.(10+i):80, each with backends 203.0.113.(10+i):8080 and, when
/// `backends` > 1, more on ports 8081...
fn many_services(n: u8, backends: u16) -> Config {
    let mut yaml = String::from("services:\n");
    for i in 0..n {
        yaml += &format!(
            "  - {{ name: s{i}, vip: 198.51.100.{}, port: 80, protocol: tcp, maglev_table_size: 251, backends: [",
            10 + i
        );
        for b in 0..backends {
            yaml += &format!("{{ address: 203.0.113.{}, port: {} }},", 10 + i, 8080 + b);
        }
        yaml += "] }\n";
    }
    Config::from_yaml(&yaml).unwrap()
}

#[test]
fn capacity_sizes_the_id_maps_and_a_config_beyond_it_is_refused_whole() {
    use aya::maps::{Array, PerCpuArray};
    use lb_agent::datapath::Capacity;
    use lb_common::service::{Backend, ServiceSlot, TrafficStats};

    let capacity = Capacity {
        services: 4,
        backends: 8,
    };
    let mut datapath = Datapath::load_with(&LoadOptions {
        capacity,
        ..Default::default()
    })
    .unwrap();
    let ebpf = datapath.ebpf_mut();
    let len = |name: &str, ebpf: &mut aya::Ebpf| -> u32 {
        let map = ebpf.map(name).unwrap();
        match name {
            "SERVICE_STATS" | "BACKEND_STATS" => {
                PerCpuArray::<_, TrafficStats>::try_from(map).unwrap().len()
            }
            "SERVICE_SLOTS" => Array::<_, ServiceSlot>::try_from(map).unwrap().len(),
            _ => Array::<_, Backend>::try_from(map).unwrap().len(),
        }
    };
    assert_eq!(len("SERVICE_STATS", ebpf), 4);
    assert_eq!(len("SERVICE_SLOTS", ebpf), 4);
    assert_eq!(len("BACKENDS", ebpf), 9, "ids 1..=8, 0 unused");
    assert_eq!(len("BACKEND_STATS", ebpf), 9);
    assert_eq!(datapath.capacity(), capacity);

    // Full: 4 services with 2 backends each.
    datapath.apply(&many_services(4, 2)).unwrap();
    let vip = sa("198.51.100.13:80");
    let backend = send_to_vip(&mut datapath, SYN, sa("192.0.2.2:40000"), vip);
    assert_eq!(backend.ip(), "203.0.113.13".parse::<IpAddr>().unwrap());

    // One service more, or one backend more: refused before anything is written, naming the
    // option; what was programmed keeps balancing.
    for (config, says) in [
        (
            many_services(5, 1),
            "5 services, the datapath holds 4 (--max-services)",
        ),
        (
            many_services(3, 3),
            "9 distinct backends, the datapath holds 8 (--max-backends)",
        ),
    ] {
        let err = datapath.apply(&config).expect_err("beyond capacity");
        assert!(format!("{err:#}").contains(says), "{err:#}");
        assert_eq!(
            send_to_vip(&mut datapath, SYN, sa("192.0.2.2:40001"), vip).ip(),
            backend.ip(),
            "the last good state stays"
        );
    }
    assert_eq!(
        datapath
            .apply(&many_services(4, 2))
            .unwrap()
            .services_written,
        0
    );

    // At capacity, a service swapped for another: the leaving one frees its id first.
    let mut swapped = many_services(4, 2);
    swapped.services[0].vip = "198.51.100.99".parse().unwrap();
    let report = datapath.apply(&swapped).unwrap();
    assert_eq!((report.services_removed, report.services_written), (1, 1));
    let moved = send_to_vip(
        &mut datapath,
        SYN,
        sa("192.0.2.2:40002"),
        sa("198.51.100.99:80"),
    );
    assert_eq!(moved.ip(), "203.0.113.10".parse::<IpAddr>().unwrap());

    // Backends being replaced serve until the new tables are in place: at capacity, replacing
    // one needs two steps (take it out, then add the new one).
    let mut replaced = swapped.clone();
    replaced.services[3].backends[1].port = 9000;
    let err = datapath
        .apply(&replaced)
        .expect_err("no room for old and new");
    assert!(
        format!("{err:#}").contains("8 distinct backends and 1 they replace"),
        "{err:#}"
    );
    let mut step = swapped.clone();
    step.services[3].backends.pop();
    datapath.apply(&step).unwrap();
    datapath.apply(&replaced).unwrap();

    // Above the compiled-in sizes: the maps are made bigger at load.
    let bigger = Capacity {
        services: 2 * limits::DEFAULT_SERVICES,
        backends: 2 * limits::DEFAULT_BACKENDS,
    };
    let big = Datapath::load_with(&LoadOptions {
        capacity: bigger,
        ..Default::default()
    })
    .expect("a capacity above the compiled-in sizes");
    assert_eq!(big.capacity(), bigger);
    drop(big);

    // Beyond the limits, or zero: refused at load.
    for capacity in [
        Capacity {
            services: limits::SERVICES_LIMIT + 1,
            backends: 8,
        },
        Capacity {
            services: 4,
            backends: limits::BACKENDS_LIMIT,
        },
        Capacity {
            services: 0,
            backends: 8,
        },
    ] {
        let err = Datapath::load_with(&LoadOptions {
            capacity,
            ..Default::default()
        })
        .err()
        .expect("refused");
        assert!(format!("{err:#}").contains("are possible"), "{err:#}");
    }
}

/// The same config and weights as the last successful apply are skipped (nothing to write); a
/// weight change is not; after a failed apply the same good config is applied in full again.
#[test]
fn an_unchanged_state_is_skipped_and_a_failed_apply_is_redone() {
    let config = many_services(3, 2);
    let mut datapath = Datapath::load().unwrap();
    let first = datapath.apply(&config).unwrap();
    assert_eq!(first.services_written, 3);
    let again = datapath.apply(&config).unwrap();
    assert_eq!(
        (
            again.services_written,
            again.backends_written,
            again.tables_swapped
        ),
        (0, 0, 0)
    );

    // Backend 203.0.113.11:8081 drained through the effective weight (as a health check does).
    let drained = |_: &lb_agent::config::Service, b: &lb_agent::config::BackendConfig| {
        if b.port == 8081 && b.address == "203.0.113.11".parse::<IpAddr>().unwrap() {
            0
        } else {
            b.weight
        }
    };
    let report = datapath.apply_with(&config, drained).unwrap();
    assert_eq!(report.tables_swapped, 1, "{report:?}");
    let vip = sa("198.51.100.11:80");
    for port in 40000..40020 {
        let backend = send_to_vip(
            &mut datapath,
            SYN,
            SocketAddr::new("192.0.2.2".parse().unwrap(), port),
            vip,
        );
        assert_eq!(backend.port(), 8080, "drained backend avoided");
    }

    // A failed apply (a table that cannot be built), then the drained state again: redone in
    // full, so the service the failed apply added is removed.
    let mut failing = config.clone();
    let mut broken = failing.services[0].clone();
    broken.name = "broken".into();
    broken.vip = "198.51.100.50".parse().unwrap();
    broken.maglev_table_size = 4;
    failing.services.insert(0, broken);
    failing
        .services
        .push(many_services(5, 1).services[4].clone());
    datapath
        .apply_with(&failing, drained)
        .expect_err("unbuildable table");
    let report = datapath.apply_with(&config, drained).unwrap();
    // Its backend was written before the failure: removed now (a skipped apply would leave it).
    assert_eq!(report.backends_removed, 1, "{report:?}");
    assert_passed_as_non_service(
        &mut datapath,
        &frame(SYN, sa("192.0.2.2:40100"), sa("198.51.100.14:80"), b""),
        "the failed apply's service is gone",
    );
}

/// A service's entries: mode, flags, `SERVICE_MODES` entry and Maglev table (backend per slot).
type ProgrammedService = (u8, u8, ModeInfo, Vec<(IpAddr, u16)>);

/// What the maps hold, by address rather than by id (ids depend on the history of applies).
#[derive(Debug, PartialEq)]
struct Programmed {
    services: BTreeMap<ServiceKey, ProgrammedService>,
    /// Per backend: whether its replies need flow entries (`SHARED_REPLIES`).
    backends: BTreeMap<(IpAddr, u16), bool>,
    /// `BACKEND_REPLY` (the route's part that depends on which frontends a backend served).
    replies: BTreeMap<ServiceKey, BackendReply>,
    filter: Vec<u64>,
}

impl Programmed {
    fn read(datapath: &mut Datapath) -> Self {
        use aya::maps::{Array, ArrayOfMaps, HashMap, MapData};
        let ebpf = datapath.ebpf_mut();
        let backends: Vec<Backend> =
            read_array(&Array::<_, Backend>::try_from(ebpf.map("BACKENDS").unwrap()).unwrap())
                .unwrap();
        let address = |id: u32| {
            let b = backends[id as usize];
            assert_ne!(b, Backend::default(), "a table names backend id {id}");
            (b.ip(), b.port_host())
        };
        let modes = Array::<_, ModeInfo>::try_from(ebpf.map("SERVICE_MODES").unwrap()).unwrap();
        let tables: ArrayOfMaps<&MapData, Array<MapData, u32>> =
            ArrayOfMaps::try_from(ebpf.map("MAGLEV_TABLES").unwrap()).unwrap();
        let services =
            HashMap::<_, ServiceKey, ServiceInfo>::try_from(ebpf.map("SERVICES").unwrap())
                .unwrap()
                .iter()
                .map(|entry| {
                    let (key, info) = entry.unwrap();
                    let table = if info.table_size == 0 {
                        Vec::new()
                    } else {
                        let table = tables.get(&info.table_slot, 0).unwrap();
                        read_array(&table)
                            .unwrap()
                            .into_iter()
                            .map(address)
                            .collect()
                    };
                    let mode = modes.get(&info.id, 0).unwrap();
                    (key, (info.mode, info.flags, mode, table))
                })
                .collect();
        let replies =
            HashMap::<_, ServiceKey, BackendReply>::try_from(ebpf.map("BACKEND_REPLY").unwrap())
                .unwrap()
                .iter()
                .map(Result::unwrap)
                .collect();
        let filter = Array::<_, prefilter::Words>::try_from(
            ebpf.map(lb_agent::prefilter::AddressFilter::MAP).unwrap(),
        )
        .unwrap()
        .get(&0, 0)
        .unwrap()
        .to_vec();
        Self {
            services,
            backends: backends
                .iter()
                .filter(|b| **b != Backend::default())
                .map(|b| ((b.ip(), b.port_host()), b.has_shared_replies()))
                .collect(),
            replies,
            filter,
        }
    }

    /// What any history of applies ending with the same config holds: reply routes stay shared
    /// once shared while a backend keeps its id (`lb_agent::reply_routes`), so they are left out.
    fn without_history(mut self) -> Self {
        self.backends
            .values_mut()
            .for_each(|shared| *shared = false);
        self.replies.clear();
        self
    }
}

/// Changes to one service (weights, backends moved between services, a shared backend's service
/// changing modes, services added, removed, renamed or reordered) are applied incrementally to one
/// datapath, and walking every service to another: the maps and what the applies wrote must be
/// the same, and the incremental apply must have looked at the changed services only. A datapath
/// loaded fresh for each config holds the same, but for the reply routes' history. A changed seed
/// or node section walks every service.
#[test]
fn an_incremental_apply_programs_what_a_full_one_does() {
    let options = LoadOptions {
        conntrack_entries: 1024,
        capacity: lb_agent::datapath::Capacity {
            services: 16,
            backends: 64,
        },
        ..LoadOptions::default()
    };
    let base = Config::from_yaml(
        "
maglev_seed: 7
node: { ipv4: 192.0.2.1, snat_ports: { first: 20000, last: 29999 } }
services:
  - { name: s0, vip: 198.51.100.10, port: 80, protocol: tcp, maglev_table_size: 251, backends: [
      { address: 203.0.113.10, port: 8080 }, { address: 203.0.113.10, port: 8081 },
      { address: 203.0.113.99, port: 8080 }] }
  - { name: s1, vip: 198.51.100.11, port: 81, protocol: tcp, maglev_table_size: 251, backends: [
      { address: 203.0.113.11, port: 8080 }, { address: 203.0.113.99, port: 8080 }] }
  - { name: s2, vip: 198.51.100.12, port: 0, protocol: tcp, maglev_table_size: 251, backends: [
      { address: 203.0.113.12, port: 0 }] }
  - { name: s3, vip: 198.51.100.13, port: 53, protocol: udp, mode: snat, maglev_table_size: 251,
      backends: [{ address: 203.0.113.13, port: 53 }, { address: 203.0.113.14, port: 53 }] }
  - { name: s4, vip: '2001:db8::14', port: 80, protocol: tcp, mode: dsr-l2, maglev_table_size: 251,
      backends: [{ address: '2001:db8::1:14', port: 80 }] }
",
    )
    .unwrap();
    // Each step: what it does to the previous config, and how many services it changes.
    type Step = (&'static str, fn(&mut Config), Option<usize>);
    let steps: Vec<Step> = vec![
        ("the first apply", |_| {}, Some(5)),
        (
            "a weight",
            |c| c.services[0].backends[1].weight = 3,
            Some(1),
        ),
        (
            "a backend moved to another service",
            |c| {
                let moved = c.services[0].backends.remove(1);
                c.services[1].backends.push(moved);
            },
            Some(2),
        ),
        (
            "the service sharing a backend becomes SNAT",
            |c| {
                c.services[1].mode = lb_agent::config::ForwardingMode::Snat;
            },
            Some(1),
        ),
        (
            "back to DNAT, the other sharer removed",
            |c| {
                c.services[1].mode = lb_agent::config::ForwardingMode::Dnat;
                c.services.remove(0);
            },
            Some(1),
        ),
        (
            "a service added with new and shared backends",
            |c| {
                let mut added = c.services[0].clone();
                added.name = "s5".into();
                added.vip = "198.51.100.15".parse().unwrap();
                added.backends[0].address = "203.0.113.15".parse().unwrap();
                c.services.insert(1, added);
            },
            Some(1),
        ),
        (
            "the all-ports service removed",
            |c| {
                let i = c.services.iter().position(|s| s.port == 0).unwrap();
                c.services.remove(i);
            },
            Some(0),
        ),
        ("the services reordered", |c| c.services.reverse(), None),
        (
            "a service renamed",
            |c| c.services[0].name = "renamed".into(),
            Some(1),
        ),
        (
            "an IPv6 DSR service becomes DNAT",
            |c| {
                let s = c.services.iter_mut().find(|s| s.vip.is_ipv6()).unwrap();
                s.mode = lb_agent::config::ForwardingMode::Dnat;
            },
            Some(1),
        ),
        ("the seed", |c| c.maglev_seed = 8, Some(4)),
        (
            "the SNAT ports",
            |c| c.node.snat_ports.last = 20999,
            Some(4),
        ),
    ];

    let mut incremental = Datapath::load_with(&options).unwrap();
    let mut walked = Datapath::load_with(&options).unwrap();
    let mut config = base;
    // A drained backend (a health check's weight) on every apply of both.
    let drained = |_: &lb_agent::config::Service, b: &lb_agent::config::BackendConfig| {
        if (b.address, b.port) == ("203.0.113.11".parse().unwrap(), 8080) {
            0
        } else {
            b.weight
        }
    };
    for (what, change, examined) in steps {
        change(&mut config);
        let report = incremental.apply_with(&config, drained).unwrap();
        walked.redo_next_apply_in_full();
        let full = walked.apply_with(&config, drained).unwrap();
        assert_eq!(full.services_examined, config.services.len(), "{what}");
        assert_eq!(
            ApplyReport {
                services_examined: report.services_examined,
                ..full.clone()
            },
            report,
            "{what}: the same writes"
        );
        match examined {
            Some(n) => assert_eq!(report.services_examined, n, "{what}: {report:?}"),
            None => assert_eq!(report, ApplyReport::default(), "{what}"),
        }
        let programmed = Programmed::read(&mut incremental);
        assert_eq!(programmed, Programmed::read(&mut walked), "{what}");
        assert_eq!(
            programmed.services.len(),
            config.services.len(),
            "{what}: every service"
        );

        let mut fresh = Datapath::load_with(&options).unwrap();
        fresh.apply_with(&config, drained).unwrap();
        assert_eq!(
            programmed.without_history(),
            Programmed::read(&mut fresh).without_history(),
            "{what}: as from scratch"
        );
    }

    // The drained backend gets its weight back: one service, one table.
    let report = incremental.apply(&config).unwrap();
    assert_eq!(
        (report.services_examined, report.tables_swapped),
        (1, 1),
        "{report:?}"
    );

    // A service named twice is refused; the next apply walks everything and finds nothing to do.
    let mut twice = config.clone();
    twice.services.push(twice.services[0].clone());
    let err = incremental.apply(&twice).unwrap_err();
    assert!(
        format!("{err:#}").contains("another service has"),
        "{err:#}"
    );
    let report = incremental.apply(&config).unwrap();
    assert_eq!(report.services_examined, config.services.len());
    assert!(!report.wrote_anything(), "{report:?}");
}

/// The benchmark's floor programs (the floor rows of `lb-bench`) load and do what their rows
/// claim: the insert program tracks the all-zero key in `CONNTRACK_V4`, the lookup program finds
/// it, and aborts without it.
#[test]
fn floor_programs_insert_and_find_their_key() {
    const XDP_ABORTED: u32 = 0;
    let mut datapath = load(CONFIG);
    let any = sa("0.0.0.0:0");
    let floor_key = flow_key(0, any, any);
    let input = frame(SYN, sa("192.0.2.2:40000"), sa("198.51.100.99:80"), b"");
    let run_floor = |datapath: &mut Datapath, program| {
        run(
            datapath
                .bench_program(program)
                .expect("floor program loads"),
            &input,
        )
        .0
    };
    assert_eq!(run_floor(&mut datapath, FLOOR_LOOKUP_PROGRAM), XDP_ABORTED);
    assert_eq!(run_floor(&mut datapath, FLOOR_INSERT_PROGRAM), XDP_PASS);
    assert_eq!(run_floor(&mut datapath, FLOOR_LOOKUP_PROGRAM), XDP_PASS);
    assert!(
        datapath.forget_flow(&floor_key, &floor_key).unwrap(),
        "the insert program tracked the all-zero key"
    );
    assert_eq!(run_floor(&mut datapath, FLOOR_LOOKUP_PROGRAM), XDP_ABORTED);
}
