//! The TC policy programs on real veths: three workloads in their own namespaces (frontend, db,
//! other), each linked to a node namespace that routes between them, with `policy_from_endpoint` /
//! `policy_to_endpoint` on the node side of every veth. What the servers receive is counted by the
//! servers themselves; denials must also appear in the ring buffer naming the rule.
//!
//! Rules: db accepts TCP 6379 and UDP 5353 from frontend only; db's egress and frontend's ingress
//! are selected with nothing allowed, so replies pass only through the policy conntrack; other is
//! in audit mode and would accept only db.

use std::{
    net::{IpAddr, SocketAddr},
    thread,
    time::Duration,
};

use lb_agent::{
    datapath::{Datapath, LoadOptions},
    policy::{
        compile,
        datapath::{
            read_counters, write_cidr_deny, PolicyDatapath, PolicyEvent, PolicyLoadOptions,
        },
        model::Cidr,
        CompiledPolicy, IdentityAllocator, PolicyConfig,
    },
};
use lb_common::policy::{Direction, Reason, Verdict};
use lb_tests::{
    frames::{
        fragments, frame, inject, mac_of, with_ipv4_options, with_ipv6_extension_headers, Sniffer,
        L4, SYN,
    },
    netns::Netns,
    policy_topology::{PolicyTopology, WORKLOADS},
    servers::{
        greeted_and_refused, parallel_tcp_requests, tcp_request, udp_requests, TcpCountingServer,
        UdpCountingServer,
    },
};

const RULES: &str = "
rules:
  - {name: db-from-frontend, endpoints: {match_labels: {app: db}}, direction: ingress,
     action: allow, peers: [{selector: {match_labels: {app: frontend}}}],
     ports: [{port: 6379}, {protocol: udp, port: 5353}]}
  - {name: db-egress-isolated, endpoints: {match_labels: {app: db}}, direction: egress,
     action: allow, peers: []}
  - {name: frontend-ingress-isolated, endpoints: {match_labels: {app: frontend}},
     direction: ingress, action: allow, peers: []}
  - {name: other-from-db, endpoints: {match_labels: {app: other}}, direction: ingress,
     action: allow, peers: [{selector: {match_labels: {app: db}}}]}
";

struct Cluster {
    // Dropped first: detaches the programs before the namespaces go.
    datapath: PolicyDatapath,
    compiled: CompiledPolicy,
    topology: PolicyTopology,
}

impl Cluster {
    fn new() -> Self {
        Self::with(|_| ()).0
    }

    /// The cluster, with `before` run once the topology exists and before the policy programs
    /// are attached (e.g. to attach other programs first).
    fn with<T>(before: impl FnOnce(&PolicyTopology) -> T) -> (Self, T) {
        Self::with_rules(RULES, before)
    }

    /// [`Self::with`] under `rules` instead of [`RULES`].
    fn with_rules<T>(rules: &str, before: impl FnOnce(&PolicyTopology) -> T) -> (Self, T) {
        let topology = PolicyTopology::new().unwrap();
        let done_before = before(&topology);
        let yaml = PolicyTopology::workloads_yaml(&["other"]) + rules;
        let config: PolicyConfig = serde_yaml_ng::from_str(&yaml).unwrap();
        let ifindexes = topology.ifindexes();
        let ifindex_of = |name: &str| ifindexes.iter().find(|(n, _)| n == name).map(|(_, i)| *i);
        let compiled = compile(&config, &mut IdentityAllocator::new(), &ifindex_of).unwrap();
        let mut datapath = PolicyDatapath::load(&PolicyLoadOptions::default()).unwrap();
        datapath.apply(&compiled).unwrap();
        // Attaching resolves interface names in the caller's namespace.
        let datapath = topology.node.run(move || {
            for w in WORKLOADS {
                datapath.attach(w.4).unwrap();
            }
            datapath
        });
        let cluster = Self {
            datapath,
            compiled,
            topology,
        };
        (cluster, done_before)
    }

    fn ns(&self, name: &str) -> &Netns {
        self.topology.ns(name)
    }

    fn addr(name: &str, v6: bool) -> IpAddr {
        PolicyTopology::addr(name, v6)
    }

    /// Events drained so far that match `f`.
    fn events(&mut self, f: impl Fn(&PolicyEvent) -> bool) -> Vec<PolicyEvent> {
        // The ring buffer is filled as packets cross; give the last ones a moment.
        thread::sleep(Duration::from_millis(50));
        self.datapath.drain_events().into_iter().filter(f).collect()
    }

    fn rule_name(&self, id: u32) -> &str {
        self.compiled.rule(id).map_or("", |r| r.name.as_str())
    }
}

#[test]
fn three_workloads_connect_as_the_rules_say() {
    let mut c = Cluster::new();
    for v6 in [false, true] {
        let db = Cluster::addr("db", v6);
        let other = Cluster::addr("other", v6);
        let tcp = TcpCountingServer::start(c.ns("db"), db, 6379, "db");
        let udp = UdpCountingServer::start(c.ns("db"), db, 5353, "db-udp");
        let audited = TcpCountingServer::start(c.ns("other"), other, 7000, "other");

        // Allowed: frontend → db, TCP and UDP; the replies come back through two selected
        // directions (db's egress, frontend's ingress) on the policy conntrack alone.
        let greeting = tcp_request(c.ns("frontend"), SocketAddr::new(db, 6379), b"hello")
            .unwrap_or_else(|e| panic!("frontend -> db:6379 (v6 {v6}): {e}"));
        assert_eq!(greeting, "db");
        let answers = udp_requests(c.ns("frontend"), SocketAddr::new(db, 5353), 3, b"query");
        assert!(
            answers.iter().all(|a| a.as_deref().ok() == Some("db-udp")),
            "{answers:?}"
        );
        assert_eq!(udp.datagrams(), 3);
        assert!(
            c.events(|e| e.verdict != Verdict::Allow).is_empty(),
            "nothing denied on allowed connections"
        );

        // Denied: other → db, TCP and UDP; nothing reaches db's servers, and every denial is
        // reported with the rule that selected db (the default deny's rule).
        let connections = tcp.connections();
        assert!(tcp_request(c.ns("other"), SocketAddr::new(db, 6379), b"hello").is_err());
        assert!(udp_requests(c.ns("other"), SocketAddr::new(db, 5353), 1, b"query")[0].is_err());
        assert_eq!(tcp.connections(), connections, "denied TCP reached db");
        assert_eq!(udp.datagrams(), 3, "denied UDP reached db");
        let denials = c.events(|e| e.verdict == Verdict::Deny && e.src == Some(other));
        for port in [6379, 5353] {
            let e = denials
                .iter()
                .find(|e| e.dst_port == port)
                .unwrap_or_else(|| panic!("no denial of other -> db:{port} in {denials:?}"));
            assert_eq!(
                (e.direction, e.reason, e.dst, c.rule_name(e.rule_id)),
                (
                    Direction::Ingress,
                    Reason::DefaultDeny,
                    Some(db),
                    "db-from-frontend"
                )
            );
        }
        // db cannot open connections either (its egress allows nothing).
        assert!(tcp_request(c.ns("db"), SocketAddr::new(other, 7000), b"x").is_err());
        assert_eq!(audited.connections(), 0);

        // Audit: other would accept only db; frontend's connection passes and is reported.
        let greeting = tcp_request(c.ns("frontend"), SocketAddr::new(other, 7000), b"hello")
            .unwrap_or_else(|e| panic!("audited frontend -> other:7000 (v6 {v6}): {e}"));
        assert_eq!(greeting, "other");
        let audits = c.events(|e| e.verdict == Verdict::Audit && e.dst == Some(other));
        assert!(
            audits.iter().any(|e| e.reason == Reason::DefaultDeny
                && e.dst_port == 7000
                && c.rule_name(e.rule_id) == "other-from-db"),
            "{audits:?}"
        );
    }
}

#[test]
fn xdp_cidr_deny_drops_a_listed_source_on_the_node() {
    let c = Cluster::new();
    let db = Cluster::addr("db", false);
    let frontend = Cluster::addr("frontend", false);
    let server = TcpCountingServer::start(c.ns("db"), db, 6379, "db");
    let target = SocketAddr::new(db, 6379);
    assert_eq!(tcp_request(c.ns("frontend"), target, b"x").unwrap(), "db");

    // lb_xdp with the CIDR deny list enabled, on the interface frontend's packets arrive on.
    let mut xdp = Datapath::load_with_cidr_deny(&LoadOptions::default(), true).unwrap();
    let listed = vec![Cidr::host(frontend)];
    write_cidr_deny(xdp.ebpf_mut(), &[], &listed).unwrap();
    let mut xdp = c.topology.node.run(move || {
        xdp.attach(WORKLOADS[0].4).unwrap();
        xdp
    });
    let connections = server.connections();
    assert!(tcp_request(c.ns("frontend"), target, b"x").is_err());
    assert_eq!(
        server.connections(),
        connections,
        "a listed source reached db"
    );
    let dropped = read_counters(xdp.ebpf_mut())
        .unwrap()
        .into_iter()
        .find(|(v, r, _)| (*v, *r) == (Verdict::Deny, Reason::CidrDeny))
        .unwrap()
        .2;
    assert!(dropped >= 1, "drops counted");

    // Off the list: through again (the policy allows it).
    write_cidr_deny(xdp.ebpf_mut(), &listed, &[]).unwrap();
    assert_eq!(tcp_request(c.ns("frontend"), target, b"x").unwrap(), "db");
    drop(xdp);
}

/// The frame with the MACs of the sender's `eth0` and the node side of its veth (`iface`).
fn addressed(c: &Cluster, sender: &str, iface: &str, mut frame: Vec<u8>) -> Vec<u8> {
    frame[..6].copy_from_slice(&mac_of(&c.topology.node, iface));
    frame[6..12].copy_from_slice(&mac_of(c.ns(sender), "eth0"));
    frame
}

/// Frames from `src` other than ICMP/ICMPv6 (the senders' own ARP, neighbour discovery and MLD);
/// VLAN-tagged frames always count.
fn from_source(frames: &[Vec<u8>], src: IpAddr) -> Vec<&Vec<u8>> {
    frames
        .iter()
        .filter(|f| match (&f[12..14], src) {
            ([0x81, 0x00], _) => true,
            ([0x08, 0x00], IpAddr::V4(a)) => f[26..30] == a.octets() && f[23] != 1,
            ([0x86, 0xdd], IpAddr::V6(a)) => f[22..38] == a.octets() && f[20] != 58,
            _ => false,
        })
        .collect()
}

/// An IPv4 frame cut after `keep` bytes of its L4 header, with its IP header saying so.
fn truncated(frame: &[u8], keep: usize) -> Vec<u8> {
    let (mut ip, _) = etherparse::Ipv4Header::from_slice(&frame[14..]).unwrap();
    let l4 = &frame[14 + ip.header_len()..][..keep];
    ip.set_payload_len(keep).unwrap();
    let mut out = frame[..14].to_vec();
    ip.write(&mut out).unwrap();
    out.extend_from_slice(l4);
    out
}

/// An 802.1Q tag (VLAN 100) in front of the frame's ethertype.
fn vlan_tagged(frame: &[u8]) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&[0x81, 0x00, 0x00, 100]);
    out.extend_from_slice(&frame[12..]);
    out
}

/// Crafted frames sent with an AF_PACKET socket from the workloads' namespaces through the veths
/// and the routing node, with the TC programs attached: what arrives at db is counted on db's
/// interface (every frame, before reassembly) and by its UDP servers (whole datagrams). From
/// `other` (denied at db) nothing of any trick arrives; from `frontend` (allowed UDP 5353)
/// fragmented datagrams, in order and out of order, with IPv4 options or IPv6 extension headers,
/// are reassembled and delivered; its tricks towards denied ports deliver nothing there.
#[test]
fn fragment_and_header_tricks_do_not_bypass_a_deny() {
    let c = Cluster::new();
    let sniffer = Sniffer::start(c.ns("db"), "eth0");
    let servers = [false, true]
        .map(|v6| UdpCountingServer::start(c.ns("db"), Cluster::addr("db", v6), 5353, "db"));
    let closed_port = UdpCountingServer::start(c.ns("db"), Cluster::addr("db", false), 9999, "x");
    let payload = vec![0x5a; 2000];
    let mut next_id = 0x4000u32;
    let mut id = || {
        next_id += 1;
        next_id
    };

    // Sends `frames` from `sender`; returns (frames of `sender` seen at db, datagrams delivered).
    let send = |sender: &str, v6: bool, frames: Vec<Vec<u8>>| -> (usize, u64) {
        let iface = WORKLOADS.iter().find(|w| w.0 == sender).unwrap().4;
        sniffer.take();
        let before = servers[v6 as usize].datagrams();
        for frame in frames {
            inject(c.ns(sender), "eth0", addressed(&c, sender, iface, frame));
        }
        thread::sleep(Duration::from_millis(300));
        let seen = from_source(&sniffer.take(), Cluster::addr(sender, v6)).len();
        (seen, servers[v6 as usize].datagrams() - before)
    };

    for v6 in [false, true] {
        let db = SocketAddr::new(Cluster::addr("db", v6), 5353);
        for (sender, allowed) in [("other", false), ("frontend", true)] {
            let src = SocketAddr::new(Cluster::addr(sender, v6), 40000);
            let whole = frame(L4::Udp, src, db, &payload);
            let fragments = |id| fragments(&whole, id, 1000);
            // Unfragmented tricks fit the MTU.
            let small = frame(L4::Udp, src, db, &payload[..500]);
            let with_headers = if v6 {
                // Hop-by-hop and destination options, each padding only (PadN).
                let padn = vec![0, 0, 1, 4, 0, 0, 0, 0];
                with_ipv6_extension_headers(&small, &[(0, padn.clone()), (60, padn)])
            } else {
                with_ipv4_options(&small, &[1, 1, 1, 0])
            };
            let mut first_last = fragments(id());
            first_last.rotate_left(1);
            let mut rest_reversed = fragments(id());
            rest_reversed[1..].reverse();
            // (what, frames, for the allowed sender: frames seen at db, datagrams delivered).
            let cases = [
                ("fragments in order", fragments(id()), (3, 1)),
                (
                    "first fragment first, the rest reversed",
                    rest_reversed,
                    (3, 1),
                ),
                ("options / extension headers", vec![with_headers], (1, 1)),
                // Later fragments are dropped until their first passed: the datagram is lost.
                ("first fragment last", first_last, (1, 0)),
                (
                    "later fragments without the first",
                    fragments(id())[1..].to_vec(),
                    (0, 0),
                ),
                ("VLAN-tagged", vec![vlan_tagged(&small)], (0, 0)),
            ];
            for (what, frames, expected) in cases {
                let sent = frames.len();
                let got = send(sender, v6, frames);
                println!(
                    "{sender} v6 {v6}: {what}: {sent} sent, {} seen at db, {} delivered",
                    got.0, got.1
                );
                let expected = if allowed { expected } else { (0, 0) };
                assert_eq!(
                    got, expected,
                    "{sender} v6 {v6}: {what}: (seen at db, delivered)"
                );
            }
        }
    }

    // IPv4 tricks of the allowed sender towards ports it may not reach.
    let fe = SocketAddr::new(Cluster::addr("frontend", false), 40001);
    let db = Cluster::addr("db", false);
    let to_closed = frame(L4::Udp, fe, SocketAddr::new(db, 9999), &payload[..32]);
    // A UDP header cut short, and a TCP SYN whose first fragment holds 8 bytes of its header.
    let syn = frame(SYN, fe, SocketAddr::new(db, 7777), &[]);
    for (what, frames) in [
        ("truncated UDP header", vec![truncated(&to_closed, 4)]),
        ("tiny first fragment (TCP)", fragments(&syn, id(), 8)),
    ] {
        let (seen, _) = send("frontend", false, frames);
        println!("frontend: {what}: {seen} seen at db");
        assert_eq!(seen, 0, "frontend: {what}: nothing reaches db");
    }
    // Overlapping fragments: an allowed first fragment (to 5353), then another first fragment of
    // the same datagram rewriting the header to the closed port 9999, then the rest.
    let to_open = frame(L4::Udp, fe, SocketAddr::new(db, 5353), &payload[..32]);
    let overlap_id = id();
    let (open, closed) = (
        fragments(&to_open, overlap_id, 16),
        fragments(&to_closed, overlap_id, 16),
    );
    sniffer.take();
    let before = closed_port.datagrams();
    for frame in [&open[0], &closed[0], &open[1], &open[2]] {
        inject(
            c.ns("frontend"),
            "eth0",
            addressed(&c, "frontend", WORKLOADS[0].4, frame.clone()),
        );
    }
    thread::sleep(Duration::from_millis(300));
    let rewritten = from_source(&sniffer.take(), fe.ip())
        .into_iter()
        .filter(|f| f[20..22] == [0x20, 0x00] && f[36..38] == 9999u16.to_be_bytes())
        .count();
    assert_eq!(
        rewritten, 0,
        "the overlapping first fragment to 9999 never reaches db"
    );
    assert_eq!(closed_port.datagrams(), before, "nothing delivered to 9999");
}

/// The balancer and the policy on the same workload veths: `lb_tc` (tcx, after the policy
/// programs, which pass with `TCX_NEXT`) translates a VIP to its backend, and the policy checks the
/// connection against that backend: frontend reaches db through the VIP, other is refused by db's
/// ingress rule — the denial names db (the chosen backend), not the VIP. Replies pass the policy
/// conntrack before `lb_tc` turns their source back into the VIP.
#[test]
fn a_vip_connection_is_checked_against_the_backend_it_chose() {
    use lb_agent::{config::Config, datapath::AttachMode};
    use lb_common::counters::Counter;
    use lb_tests::test_run::counter;

    let db = Cluster::addr("db", false);
    let other = Cluster::addr("other", false);
    let vip: IpAddr = "198.51.100.80".parse().unwrap();
    // The balancer is attached first, as the agent does (services before policy): the policy
    // programs still go to the head of each chain.
    let (mut c, lb) = Cluster::with(|topology| {
        let mut lb = Datapath::load_with(&LoadOptions::default()).unwrap();
        lb.apply(
            &Config::from_yaml(&format!(
                "services:\n  - name: cache\n    vip: {vip}\n    port: 80\n    protocol: tcp\n    \
                 backends:\n      - {{ address: {db}, port: 6379 }}\n"
            ))
            .unwrap(),
        )
        .unwrap();
        topology.node.run(move || {
            for w in WORKLOADS {
                lb.attach_with(w.4, AttachMode::Tc).unwrap();
            }
            lb
        })
    });
    let _tcp = TcpCountingServer::start(c.ns("db"), db, 6379, "db");

    let greeting = tcp_request(c.ns("frontend"), SocketAddr::new(vip, 80), b"hello")
        .unwrap_or_else(|e| panic!("frontend -> VIP: {e}"));
    assert_eq!(greeting, "db");
    assert!(
        counter(&lb, Counter::ForwardNewFlow) >= 1,
        "the VIP was translated"
    );
    assert!(
        counter(&lb, Counter::ReplyTranslated) >= 1,
        "replies were translated back"
    );
    assert!(
        c.events(|e| e.verdict == Verdict::Deny).is_empty(),
        "nothing denied on the allowed connection"
    );

    assert!(tcp_request(c.ns("other"), SocketAddr::new(vip, 80), b"hello").is_err());
    let denials = c.events(|e| e.verdict == Verdict::Deny && e.src == Some(other));
    let e = denials
        .first()
        .unwrap_or_else(|| panic!("no denial of other -> VIP's backend: {denials:?}"));
    assert_eq!(
        (
            e.direction,
            e.reason,
            e.dst,
            e.dst_port,
            c.rule_name(e.rule_id)
        ),
        (
            Direction::Ingress,
            Reason::DefaultDeny,
            Some(db),
            6379,
            "db-from-frontend"
        )
    );
    drop(lb);
}

/// A workload client's requests to SNAT and DSR services are served as DNAT at its veth
/// (`lb_tc_request`): frontend reaches db through a SNAT, a DSR-L2 and a DSR-IPIP VIP of each
/// family, db's ingress rule (frontend only) sees frontend's own address (SNAT would have shown
/// the node's, and been denied), and the replies are turned back into each VIP at frontend's veth.
/// Until the ninth session `lb_tc_request` dropped these requests (`drop_tc_mode_unsupported`).
#[test]
fn a_workload_client_reaches_snat_and_dsr_services_as_dnat() {
    use lb_agent::{config::Config, datapath::AttachMode};
    use lb_common::counters::Counter;
    use lb_tests::test_run::counter;

    let modes = ["snat", "dsr-l2", "dsr-ipip"];
    let vips: Vec<(IpAddr, &str)> = modes
        .iter()
        .enumerate()
        .flat_map(|(i, mode)| {
            [
                (format!("198.51.100.{}", 81 + i).parse().unwrap(), *mode),
                (format!("2001:db8:100::{}", 81 + i).parse().unwrap(), *mode),
            ]
        })
        .collect();
    let services: String = vips
        .iter()
        .map(|(vip, mode)| {
            format!(
                "  - name: \"{mode}-{vip}\"\n    vip: \"{vip}\"\n    port: 6379\n    protocol: tcp\n    \
                 mode: {mode}\n    backends:\n      - {{ address: \"{}\", port: 6379 }}\n",
                Cluster::addr("db", vip.is_ipv6())
            )
        })
        .collect();
    let config =
        format!("node: {{ipv4: 192.0.2.1, ipv6: \"2001:db8:1::1\"}}\nservices:\n{services}");
    let (mut c, lb) = Cluster::with(|topology| {
        let mut lb = Datapath::load_with(&LoadOptions::default()).unwrap();
        lb.apply(&Config::from_yaml(&config).unwrap()).unwrap();
        topology.node.run(move || {
            for w in WORKLOADS {
                lb.attach_with(w.4, AttachMode::Workload).unwrap();
            }
            lb
        })
    });
    let db_servers = [false, true]
        .map(|v6| TcpCountingServer::start(c.ns("db"), Cluster::addr("db", v6), 6379, "db"));

    for (vip, mode) in vips {
        let server = &db_servers[usize::from(vip.is_ipv6())];
        let (bytes, translated) = (server.bytes(), counter(&lb, Counter::ReplyTranslated));
        let greeting = tcp_request(c.ns("frontend"), SocketAddr::new(vip, 6379), b"hello")
            .unwrap_or_else(|e| panic!("frontend -> {mode} VIP {vip}: {e}"));
        assert_eq!(greeting, "db", "{mode} {vip}");
        // The server counts the payload after its greeting went out.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while server.bytes() < bytes + 5 && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(server.bytes(), bytes + 5, "{mode} {vip}: db's bytes");
        assert!(
            counter(&lb, Counter::ReplyTranslated) > translated,
            "{mode} {vip}: replies turned back into the VIP"
        );
    }
    assert_eq!(counter(&lb, Counter::DropTcModeUnsupported), 0);
    assert!(
        c.events(|e| e.verdict == Verdict::Deny).is_empty(),
        "db's ingress rule saw frontend's address on every connection"
    );
    drop(lb);
}

/// Fragmented datagrams through a VIP from a workload client, with the policy on both veths: a
/// 4000-byte request reaches db whole (its later fragments got the backend before the policy,
/// like its first), and db's 3000-byte answer reaches frontend from the VIP (its later fragments
/// got the VIP after the policy, like its first), over IPv4 and IPv6. Before the ninth session the
/// later fragments crossed the split programs untranslated and neither datagram arrived.
#[test]
fn fragmented_datagrams_cross_a_workload_veth_through_a_vip() {
    use lb_agent::{config::Config, datapath::AttachMode};
    use lb_common::counters::Counter;
    use lb_tests::test_run::counter;

    static REQUEST: [u8; 4000] = [b'q'; 4000];
    let answer = format!("db{}", "a".repeat(2998));
    let vips: [IpAddr; 2] = [
        "198.51.100.90".parse().unwrap(),
        "2001:db8:100::90".parse().unwrap(),
    ];
    let services: String = vips
        .iter()
        .map(|vip| {
            format!(
                "  - name: \"dns-{vip}\"\n    vip: \"{vip}\"\n    port: 5353\n    protocol: udp\n    \
                 backends:\n      - {{ address: \"{}\", port: 5353 }}\n",
                Cluster::addr("db", vip.is_ipv6())
            )
        })
        .collect();
    let config = format!("services:\n{services}");
    let (mut c, lb) = Cluster::with(|topology| {
        let mut lb = Datapath::load_with(&LoadOptions::default()).unwrap();
        lb.apply(&Config::from_yaml(&config).unwrap()).unwrap();
        topology.node.run(move || {
            for w in WORKLOADS {
                lb.attach_with(w.4, AttachMode::Workload).unwrap();
            }
            lb
        })
    });
    for vip in vips {
        let v6 = vip.is_ipv6();
        let server = UdpCountingServer::start(c.ns("db"), Cluster::addr("db", v6), 5353, &answer);
        let forwarded = counter(&lb, Counter::ForwardFragment);
        let answers = udp_requests(c.ns("frontend"), SocketAddr::new(vip, 5353), 1, &REQUEST);
        // The client reads the first 256 bytes of the answer: it arrived whole, from the VIP.
        let got = answers[0].as_ref().unwrap_or_else(|e| {
            panic!(
                "v6 {v6}: no answer from the VIP: {e}; db got {} datagrams; counters {:?}; \
                     policy events {:?}",
                server.datagrams(),
                lb.counters()
                    .unwrap()
                    .into_iter()
                    .filter(|(_, n)| *n > 0)
                    .collect::<Vec<_>>(),
                c.events(|_| true)
            )
        });
        assert!(got.starts_with("dbaaa"), "v6 {v6}: {got}");
        assert_eq!(
            (server.datagrams(), server.bytes()),
            (1, 4000),
            "v6 {v6}: db got the request whole"
        );
        // Two later fragments each way at least (1500-byte links).
        assert!(
            counter(&lb, Counter::ForwardFragment) >= forwarded + 4,
            "v6 {v6}: later fragments translated on the veths"
        );
    }
    assert!(
        c.events(|e| e.verdict == Verdict::Deny).is_empty(),
        "the policy matched every fragment to its datagram"
    );
    drop(lb);
}

/// frontend's egress: db and the service range allowed, other denied (deny wins).
const FRONTEND_EGRESS_RULES: &str = "
  - {name: frontend-to-db-and-services, endpoints: {match_labels: {app: frontend}},
     direction: egress, action: allow,
     peers: [{selector: {match_labels: {app: db}}}, {cidr: 198.51.100.0/24},
             {cidr: \"2001:db8:100::/48\"}]}
  - {name: frontend-not-to-other, endpoints: {match_labels: {app: frontend}}, direction: egress,
     action: deny, peers: [{selector: {match_labels: {app: other}}}]}
";

/// With the balancer attached to the workload veths as `AttachMode::Workload` (`lb_tc_request`
/// before the policy, `lb_tc` after it, `lb_tc_reply` at egress after it), a client's egress
/// rules see the backend Maglev chose, not the VIP: frontend may reach db but not other, and a VIP
/// over db:6379 and other:7000 cannot be used to reach other. Connections Maglev sends to other
/// are refused (nothing reaches other's server) and each denial names other:7000 and the deny
/// rule; those it sends to db succeed, with replies turned back into the VIP at frontend's veth
/// egress after the policy matched them. Direct connections get the same verdicts. With `lb_tc`
/// alone after the policy (the arrangement before `AttachMode::Workload`) the policy saw the VIP,
/// which the service range allows, and frontend reached other through it.
#[test]
fn a_client_egress_deny_holds_for_the_backend_a_vip_chose() {
    use lb_agent::{config::Config, datapath::AttachMode};
    use lb_common::{counters::Counter, protocol, service::ServiceKey};
    use lb_tests::test_run::{counter, expected_backend};

    /// Connections to the VIP per family, opened at once: each goes to db or other (half each),
    /// so all going to one of them is a 2^-11 chance.
    const ATTEMPTS: usize = 12;
    let rules = format!("{RULES}{FRONTEND_EGRESS_RULES}");
    let vips: [IpAddr; 2] = [
        "198.51.100.80".parse().unwrap(),
        "2001:db8:100::80".parse().unwrap(),
    ];
    let services: String = vips
        .iter()
        .enumerate()
        .map(|(i, vip)| {
            let v6 = i == 1;
            format!(
                "  - name: mixed{i}\n    vip: \"{vip}\"\n    port: 80\n    protocol: tcp\n    \
                 backends:\n      - {{ address: \"{}\", port: 6379 }}\n      \
                 - {{ address: \"{}\", port: 7000 }}\n",
                Cluster::addr("db", v6),
                Cluster::addr("other", v6)
            )
        })
        .collect();
    // The balancer is attached first, as the agent does on a fresh node; the policy's ingress
    // program still goes right after `lb_tc_request`.
    let (mut c, lb) = Cluster::with_rules(&rules, |topology| {
        let mut lb = Datapath::load_with(&LoadOptions::default()).unwrap();
        lb.apply(&Config::from_yaml(&format!("services:\n{services}")).unwrap())
            .unwrap();
        topology.node.run(move || {
            for w in WORKLOADS {
                lb.attach_with(w.4, AttachMode::Workload).unwrap();
            }
            lb
        })
    });

    for (i, vip) in vips.into_iter().enumerate() {
        let v6 = i == 1;
        let (frontend, db, other) = (
            Cluster::addr("frontend", v6),
            Cluster::addr("db", v6),
            Cluster::addr("other", v6),
        );
        let db_server = TcpCountingServer::start(c.ns("db"), db, 6379, "db");
        let other_server = TcpCountingServer::start(c.ns("other"), other, 7000, "other");
        let translated = counter(&lb, Counter::ReplyTranslated);

        let results = parallel_tcp_requests(
            c.ns("frontend"),
            SocketAddr::new(vip, 80),
            ATTEMPTS,
            b"hello",
        );
        let (greeted, refused) = greeted_and_refused(&results, "db", &format!("v6 {v6}"));

        // What crossed the wire: db got every greeted connection and its payload, other nothing.
        assert_eq!(db_server.connections(), greeted as u64, "v6 {v6}");
        assert_eq!(db_server.bytes(), 5 * greeted as u64, "v6 {v6}: db's bytes");
        assert_eq!(
            other_server.connections(),
            0,
            "v6 {v6}: other reached through the VIP"
        );
        assert!(
            counter(&lb, Counter::ReplyTranslated) > translated,
            "v6 {v6}: replies turned back into the VIP"
        );

        // Every refused connection was one Maglev sent to other, denied by frontend's egress rule
        // naming other:7000.
        let denials = c.events(|e| e.verdict == Verdict::Deny && e.src == Some(frontend));
        let mut ports: Vec<u16> = denials.iter().map(|e| e.src_port).collect();
        ports.sort();
        ports.dedup();
        assert_eq!(
            ports.len(),
            refused,
            "v6 {v6}: one denied connection each: {denials:?}"
        );
        let key = ServiceKey::new(vip, 80, protocol::TCP);
        for e in &denials {
            assert_eq!(
                (
                    e.direction,
                    e.reason,
                    e.dst,
                    e.dst_port,
                    c.rule_name(e.rule_id)
                ),
                (
                    Direction::Egress,
                    Reason::DeniedByRule,
                    Some(other),
                    7000,
                    "frontend-not-to-other"
                ),
                "v6 {v6}"
            );
            let client = SocketAddr::new(frontend, e.src_port);
            let chosen = expected_backend(
                &lb,
                &key,
                protocol::TCP,
                client,
                SocketAddr::new(vip, 80),
                false,
            );
            assert_eq!(
                chosen,
                SocketAddr::new(other, 7000),
                "v6 {v6}: Maglev's choice"
            );
        }

        // Direct connections: the same verdicts.
        let greeting = tcp_request(c.ns("frontend"), SocketAddr::new(db, 6379), b"hello")
            .unwrap_or_else(|e| panic!("frontend -> db (v6 {v6}): {e}"));
        assert_eq!(greeting, "db");
        assert!(tcp_request(c.ns("frontend"), SocketAddr::new(other, 7000), b"hello").is_err());
        assert_eq!(
            other_server.connections(),
            0,
            "v6 {v6}: other reached directly"
        );
        let direct = c.events(|e| e.verdict == Verdict::Deny && e.src == Some(frontend));
        assert!(
            !direct.is_empty()
                && direct
                    .iter()
                    .all(|e| (e.dst, e.dst_port, c.rule_name(e.rule_id))
                        == (Some(other), 7000, "frontend-not-to-other")),
            "v6 {v6}: {direct:?}"
        );
    }
    drop(lb);
}
