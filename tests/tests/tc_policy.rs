//! The TC policy programs (`policy_from_endpoint`: a workload's egress, `policy_to_endpoint`: its
//! ingress) and the CIDR deny list (in `lb_xdp` and `lb_tc`) through BPF_PROG_TEST_RUN on crafted frames, in three steps
//! per case: the frame, the maps (a compiled rule set written by `PolicyDatapath::apply`), the
//! verdict and the verdict event. Rule decisions are compared field by field with the userspace
//! reference evaluator (`Maps::check`) and with an expectation written here, so the kernel, the
//! evaluator and the reader agree.

use std::net::SocketAddr;

use lb_agent::{
    datapath::{Datapath, LoadOptions, TC_PROGRAM},
    policy::{
        compile,
        datapath::{
            read_counters, write_cidr_deny, PolicyDatapath, PolicyEvent, PolicyLoadOptions,
            FROM_ENDPOINT_PROGRAM, TO_ENDPOINT_PROGRAM,
        },
        model::Cidr,
        CompiledPolicy, IdentityAllocator, Maps, Packet, PolicyConfig,
    },
};
use lb_common::policy::{Direction, Reason, Verdict};
use lb_tests::{
    frames::{
        fragments, frame, icmp_error, ip_packet, with_ipv4_options, with_ipv6_extension_headers,
        IcmpError, ACK, L4, SYN,
    },
    test_run::{run, run_tc, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC, XDP_DROP, XDP_PASS},
};

const IN: Direction = Direction::Ingress;
const OUT: Direction = Direction::Egress;
const TCP: L4 = SYN;
const UDP: L4 = L4::Udp;

/// db, web and audited run on this node (they have interfaces); frontend is elsewhere.
const CONFIG: &str = "
host_addresses: [192.0.2.1, \"2001:db8::1\"]
namespaces: [{name: default}]
workloads:
  - {name: db, namespace: default, labels: {role: db}, addresses: [192.0.2.10, \"2001:db8::10\"],
     interface: lxc-db}
  - {name: web, namespace: default, labels: {role: web}, addresses: [192.0.2.11, \"2001:db8::11\"],
     interface: lxc-web}
  - {name: audited, namespace: default, labels: {role: audited},
     addresses: [192.0.2.12, \"2001:db8::12\"], interface: lxc-audit, enforcement: audit}
  - {name: frontend, namespace: default, labels: {role: frontend},
     addresses: [198.51.100.20, \"2001:db8::20\"]}
rules:
  - {name: db-from-frontend, endpoints: {match_labels: {role: db}}, direction: ingress,
     action: allow, peers: [{selector: {match_labels: {role: frontend}}}],
     ports: [{port: 6379}, {port: 23}, {protocol: udp, port: 5353}]}
  - {name: db-from-net, endpoints: {match_labels: {role: db}}, direction: ingress, action: allow,
     peers: [{cidr: 203.0.113.0/24, except: [203.0.113.128/25]}, {cidr: \"2001:db8:cafe::/48\"}],
     ports: [{port: 8000, end_port: 8099}]}
  - {name: no-telnet, endpoints: {}, direction: ingress, action: deny, default_deny: false,
     peers: [{entity: all}], ports: [{port: 23}]}
  - {name: db-dns, endpoints: {match_labels: {role: db}}, direction: egress, action: allow,
     peers: [{entity: world}], ports: [{protocol: udp, port: 53}]}
  - {name: audited-web, endpoints: {match_labels: {role: audited}}, direction: ingress,
     action: allow, peers: [{selector: {match_labels: {role: frontend}}}], ports: [{port: 80}]}
";

const DB: &str = "192.0.2.10";
const DB6: &str = "2001:db8::10";
const WEB: &str = "192.0.2.11";
const AUDITED: &str = "192.0.2.12";
const FRONTEND: &str = "198.51.100.20";
const FRONTEND6: &str = "2001:db8::20";

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

fn config(yaml: &str) -> PolicyConfig {
    serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("config: {e}"))
}

fn compiled(yaml: &str, ifindex: u32) -> CompiledPolicy {
    let ifindex_of = move |_: &str| (ifindex != 0).then_some(ifindex);
    compile(&config(yaml), &mut IdentityAllocator::new(), &ifindex_of)
        .unwrap_or_else(|e| panic!("compile: {e}"))
}

/// A loaded policy datapath with a rule set, and the reference evaluator on the same rule set.
struct Fixture {
    datapath: PolicyDatapath,
    compiled: CompiledPolicy,
    reference: Maps,
}

impl Fixture {
    /// Allows are reported too, so every rule decision shows in an event.
    fn new(yaml: &str) -> Self {
        Self::with(
            yaml,
            0,
            PolicyLoadOptions {
                report_allows: true,
                ..Default::default()
            },
        )
    }

    fn with(yaml: &str, ifindex: u32, options: PolicyLoadOptions) -> Self {
        let compiled = compiled(yaml, ifindex);
        let mut datapath = PolicyDatapath::load(&options).expect("load the policy programs");
        datapath.apply(&compiled).expect("apply");
        let reference = Maps::load(&compiled);
        Self {
            datapath,
            compiled,
            reference,
        }
    }

    /// Runs the program of `dir` on `frame`: its verdict and the events it reported.
    fn send(&mut self, dir: Direction, frame: &[u8]) -> (u32, Vec<PolicyEvent>) {
        let name = match dir {
            Direction::Egress => FROM_ENDPOINT_PROGRAM,
            Direction::Ingress => TO_ENDPOINT_PROGRAM,
        };
        let rc = run_tc(self.datapath.program(name).unwrap(), frame);
        (rc, self.datapath.drain_events())
    }

    fn rule_name(&self, id: u32) -> &str {
        self.compiled.rule(id).map_or("", |r| r.name.as_str())
    }

    /// Sends a TCP SYN or UDP packet `src → dst` through the check of `dir`, checks the kernel's
    /// verdict and event against the reference evaluator, and returns (verdict, reason, rule name).
    #[track_caller]
    fn decide(&mut self, dir: Direction, l4: L4, src: SocketAddr, dst: SocketAddr) -> Outcome {
        let protocol = if l4 == UDP { 17 } else { 6 };
        let want = self.reference.check(
            &Packet {
                src: src.ip(),
                dst: dst.ip(),
                protocol,
                dport: dst.port(),
            },
            dir,
        );
        let (rc, events) = self.send(dir, &frame(l4, src, dst, b"payload"));
        let [event] = events[..] else {
            panic!("{src} -> {dst}: one event expected, got {events:?}");
        };
        let got = (
            event.verdict,
            event.reason,
            event.rule_id,
            event.endpoint_identity,
            event.peer_identity,
        );
        assert_eq!(
            got,
            (
                want.verdict(),
                want.reason(),
                want.decision.rule_id,
                want.endpoint_identity.unwrap_or(0),
                want.peer_identity.unwrap_or(0),
            ),
            "{} {src} -> {dst}: kernel vs reference ({})",
            dir.name(),
            self.compiled.explain(&want)
        );
        assert_eq!(
            (event.src, event.dst, event.src_port, event.dst_port),
            (Some(src.ip()), Some(dst.ip()), src.port(), dst.port())
        );
        assert_eq!(event.direction, dir);
        assert_eq!(event.protocol, protocol);
        assert_eq!(event.epoch, self.datapath.epoch());
        let passes = if want.verdict().passes() {
            TC_ACT_UNSPEC
        } else {
            TC_ACT_SHOT
        };
        assert_eq!(rc, passes, "{src} -> {dst}: TC verdict");
        (
            event.verdict,
            event.reason,
            self.rule_name(event.rule_id).to_string(),
        )
    }

    /// Sends `frame` expecting a drop reported with `reason` and no rule.
    #[track_caller]
    fn refused(&mut self, dir: Direction, frame: &[u8], reason: Reason) {
        let (rc, events) = self.send(dir, frame);
        assert_eq!(rc, TC_ACT_SHOT, "{reason:?}");
        assert!(
            matches!(events[..], [e] if e.verdict == Verdict::Deny && e.reason == reason && e.rule_id == 0),
            "{reason:?}: {events:?}"
        );
    }

    /// Packets counted for (verdict, reason) so far.
    fn counted(&self, verdict: Verdict, reason: Reason) -> u64 {
        self.datapath
            .counters()
            .unwrap()
            .into_iter()
            .find(|(v, r, _)| (*v, *r) == (verdict, reason))
            .map_or(0, |(_, _, n)| n)
    }
}

type Outcome = (Verdict, Reason, String);

fn outcome(verdict: Verdict, reason: Reason, rule: &str) -> Outcome {
    (verdict, reason, rule.to_string())
}

fn allowed(rule: &str) -> Outcome {
    outcome(Verdict::Allow, Reason::AllowedByRule, rule)
}

fn denied(rule: &str) -> Outcome {
    outcome(Verdict::Deny, Reason::DeniedByRule, rule)
}

fn open() -> Outcome {
    outcome(Verdict::Allow, Reason::NotSelected, "")
}

/// The rule a default deny names (the first rule selecting the endpoint in that direction).
fn default_deny(f: &Fixture, dir: Direction, local: &str) -> Outcome {
    let packet = Packet {
        src: local.parse().unwrap(),
        dst: local.parse().unwrap(),
        protocol: 6,
        dport: 1,
    };
    let rule = f.reference.check(&packet, dir).decision.rule_id;
    outcome(Verdict::Deny, Reason::DefaultDeny, f.rule_name(rule))
}

#[test]
fn rule_decisions_match_the_reference_evaluator() {
    let mut f = Fixture::new(CONFIG);
    let db_in = default_deny(&f, IN, DB);
    let db_out = default_deny(&f, OUT, DB);
    assert_eq!(db_in.1, Reason::DefaultDeny);
    for (db, frontend, net, net_except) in [
        (DB, FRONTEND, "203.0.113.7", "203.0.113.200"),
        (DB6, FRONTEND6, "2001:db8:cafe::7", "2001:db8:beef::7"),
    ] {
        let cases: Vec<(Direction, L4, SocketAddr, SocketAddr, Outcome)> = vec![
            // Allow by label, TCP and UDP; default deny on other ports and protocols.
            (
                IN,
                TCP,
                sa(frontend, 40000),
                sa(db, 6379),
                allowed("db-from-frontend"),
            ),
            (
                IN,
                UDP,
                sa(frontend, 40000),
                sa(db, 5353),
                allowed("db-from-frontend"),
            ),
            (IN, TCP, sa(frontend, 40000), sa(db, 6380), db_in.clone()),
            (IN, TCP, sa(frontend, 40000), sa(db, 5353), db_in.clone()),
            (IN, UDP, sa(frontend, 40000), sa(db, 6379), db_in.clone()),
            // Deny wins over an allow of the same port.
            (
                IN,
                TCP,
                sa(frontend, 40000),
                sa(db, 23),
                denied("no-telnet"),
            ),
            // CIDR (ipcache longest prefix) with except, and a port range 8000..=8099.
            (
                IN,
                TCP,
                sa(net, 40000),
                sa(db, 8000),
                allowed("db-from-net"),
            ),
            (
                IN,
                TCP,
                sa(net, 40000),
                sa(db, 8099),
                allowed("db-from-net"),
            ),
            (IN, TCP, sa(net, 40000), sa(db, 7999), db_in.clone()),
            (IN, TCP, sa(net, 40000), sa(db, 8100), db_in.clone()),
            (IN, TCP, sa(net_except, 40000), sa(db, 8050), db_in.clone()),
            // Egress to the world entity; a workload is not the world.
            (OUT, UDP, sa(db, 40000), sa(net, 53), allowed("db-dns")),
            (OUT, UDP, sa(db, 40000), sa(frontend, 53), db_out.clone()),
            (OUT, TCP, sa(db, 40000), sa(net, 53), db_out.clone()),
        ];
        for (dir, l4, src, dst, want) in cases {
            assert_eq!(
                f.decide(dir, l4, src, dst),
                want,
                "{} {src} -> {dst}",
                dir.name()
            );
        }
    }
    // Not selected: open (but the explicit deny still applies); audit passes and reports.
    let cases = [
        (IN, TCP, sa(FRONTEND, 40000), sa(WEB, 80), open()),
        (OUT, UDP, sa(WEB, 40000), sa(FRONTEND, 9), open()),
        (
            IN,
            TCP,
            sa(FRONTEND, 40000),
            sa(WEB, 23),
            denied("no-telnet"),
        ),
        (
            IN,
            TCP,
            sa(FRONTEND, 40000),
            sa(AUDITED, 80),
            allowed("audited-web"),
        ),
        (
            IN,
            TCP,
            sa(FRONTEND, 40000),
            sa(AUDITED, 81),
            outcome(Verdict::Audit, Reason::DefaultDeny, "audited-web"),
        ),
        (
            IN,
            TCP,
            sa(FRONTEND, 40000),
            sa(AUDITED, 23),
            outcome(Verdict::Audit, Reason::DeniedByRule, "no-telnet"),
        ),
        (
            IN,
            UDP,
            sa(FRONTEND6, 40000),
            sa("2001:db8::11", 53),
            open(),
        ),
    ];
    for (dir, l4, src, dst, want) in cases {
        assert_eq!(
            f.decide(dir, l4, src, dst),
            want,
            "{} {src} -> {dst}",
            dir.name()
        );
    }
    assert!(f.counted(Verdict::Audit, Reason::DefaultDeny) >= 1);
    assert!(f.counted(Verdict::Deny, Reason::DeniedByRule) >= 3);
}

#[test]
fn replies_and_related_errors_pass_through_conntrack() {
    let mut f = Fixture::new(CONFIG);
    for (db, frontend, world) in [
        (DB, FRONTEND, "198.51.100.99"),
        (DB6, FRONTEND6, "2001:db8:99::99"),
    ] {
        // An allowed connection into db: its replies leave db although db's egress is selected
        // and allows no such packet.
        let client = sa(frontend, 41000);
        let server = sa(db, 6379);
        assert_eq!(
            f.decide(IN, TCP, client, server),
            allowed("db-from-frontend")
        );
        let established = f.counted(Verdict::Allow, Reason::Established);
        let (rc, events) = f.send(OUT, &frame(ACK, server, client, b"reply"));
        assert_eq!(
            (rc, events.len()),
            (TC_ACT_UNSPEC, 0),
            "reply of an allowed connection"
        );
        assert_eq!(
            f.counted(Verdict::Allow, Reason::Established),
            established + 1
        );
        // The same ports towards another client port is no reply.
        let db_out = default_deny(&f, OUT, db);
        assert_eq!(f.decide(OUT, TCP, server, sa(frontend, 41001)), db_out);

        // A related ICMP error (db's stack refusing part of the connection) passes; one about a
        // connection that was never allowed is checked as ICMP, and db's egress denies it.
        let quoted = ip_packet(&frame(ACK, client, server, b"request"));
        let error = icmp_error(
            IcmpError::PortUnreachable,
            server.ip(),
            client.ip(),
            &quoted,
        );
        let (rc, events) = f.send(OUT, &error);
        assert_eq!((rc, events.len()), (TC_ACT_UNSPEC, 0), "related ICMP error");
        let stranger = ip_packet(&frame(ACK, sa(frontend, 41002), server, b"request"));
        let error = icmp_error(
            IcmpError::PortUnreachable,
            server.ip(),
            client.ip(),
            &stranger,
        );
        let (rc, events) = f.send(OUT, &error);
        assert_eq!(rc, TC_ACT_SHOT, "unrelated ICMP error");
        assert_eq!(
            (events[0].reason, events[0].protocol),
            (Reason::DefaultDeny, if db == DB { 1 } else { 58 })
        );

        // An allowed connection out of db: its replies enter db although db's ingress is
        // selected and allows no such packet; another port is denied.
        let local = sa(db, 45000);
        let resolver = sa(world, 53);
        assert_eq!(f.decide(OUT, UDP, local, resolver), allowed("db-dns"));
        let (rc, events) = f.send(IN, &frame(UDP, resolver, local, b"answer"));
        assert_eq!((rc, events.len()), (TC_ACT_UNSPEC, 0), "UDP reply");
        let db_in = default_deny(&f, IN, db);
        assert_eq!(f.decide(IN, UDP, resolver, sa(db, 45001)), db_in);
        // A reply is only a reply at the check opposite to the one that passed the connection:
        // the resolver's packet does not open db's egress towards it on other ports.
        assert_eq!(f.decide(OUT, UDP, local, sa(world, 54)), db_out);
    }
}

#[test]
fn later_fragments_follow_their_first_fragment() {
    let mut f = Fixture::new(CONFIG);
    let payload = [7u8; 64];
    for (db, web, frontend) in [(DB, WEB, FRONTEND), (DB6, "2001:db8::11", FRONTEND6)] {
        // Allowed datagram: the first fragment is decided by the rules, the rest follow it.
        let pieces = fragments(
            &frame(UDP, sa(frontend, 42000), sa(db, 5353), &payload),
            7,
            24,
        );
        assert_eq!(pieces.len(), 3);
        let (rc, events) = f.send(IN, &pieces[0]);
        assert_eq!(rc, TC_ACT_UNSPEC);
        assert_eq!(
            (events[0].reason, f.rule_name(events[0].rule_id)),
            (Reason::AllowedByRule, "db-from-frontend")
        );
        let followed = f.counted(Verdict::Allow, Reason::Fragment);
        for piece in &pieces[1..] {
            assert_eq!(f.send(IN, piece), (TC_ACT_UNSPEC, vec![]));
        }
        assert_eq!(f.counted(Verdict::Allow, Reason::Fragment), followed + 2);

        // Denied datagram: the first fragment is dropped, and the rest with it.
        let pieces = fragments(
            &frame(UDP, sa(frontend, 42000), sa(db, 5354), &payload),
            8,
            24,
        );
        let (rc, events) = f.send(IN, &pieces[0]);
        assert_eq!((rc, events[0].reason), (TC_ACT_SHOT, Reason::DefaultDeny));
        for piece in &pieces[1..] {
            f.refused_with_endpoint(IN, piece, Reason::Fragment);
        }
        // A later fragment whose first never came (or was sent to another check): dropped where
        // rules apply, passed where none do.
        let orphan = &fragments(
            &frame(UDP, sa(frontend, 42000), sa(db, 5353), &payload),
            9,
            24,
        )[1];
        f.refused_with_endpoint(IN, orphan, Reason::Fragment);
        let orphan = &fragments(
            &frame(UDP, sa(frontend, 42000), sa(web, 80), &payload),
            10,
            24,
        )[1];
        let (rc, events) = f.send(IN, orphan);
        assert_eq!((rc, events[0].reason), (TC_ACT_UNSPEC, Reason::NotSelected));
    }
}

impl Fixture {
    /// Sends `frame` expecting a drop reported with `reason`, naming the local endpoint.
    #[track_caller]
    fn refused_with_endpoint(&mut self, dir: Direction, frame: &[u8], reason: Reason) {
        let (rc, events) = self.send(dir, frame);
        assert_eq!(rc, TC_ACT_SHOT, "{reason:?}");
        assert!(
            matches!(events[..], [e] if e.verdict == Verdict::Deny && e.reason == reason && e.endpoint_identity != 0),
            "{reason:?}: {events:?}"
        );
    }
}

#[test]
fn header_tricks_do_not_get_around_a_deny() {
    let mut f = Fixture::new(CONFIG);
    let telnet = frame(TCP, sa(FRONTEND, 43000), sa(DB, 23), b"");
    let redis = frame(TCP, sa(FRONTEND, 43000), sa(DB, 6379), b"");

    // IPv4 options: the L4 header is found behind them and the rules apply as without.
    let nops = [1, 1, 1, 0];
    let (rc, events) = f.send(IN, &with_ipv4_options(&telnet, &nops));
    assert_eq!((rc, events[0].reason), (TC_ACT_SHOT, Reason::DeniedByRule));
    let (rc, events) = f.send(IN, &with_ipv4_options(&redis, &nops));
    assert_eq!(
        (rc, events[0].reason),
        (TC_ACT_UNSPEC, Reason::AllowedByRule)
    );
    // A loose source route: the header's destination is not the final one.
    let lsrr = [0x83, 7, 4, 192, 0, 2, 99, 0];
    f.refused(IN, &with_ipv4_options(&redis, &lsrr), Reason::SourceRoute);
    // An option running past the header.
    f.refused(
        IN,
        &with_ipv4_options(&redis, &[7, 9, 0, 0]),
        Reason::Malformed,
    );

    // IPv6 extension headers: walked to the real upper-layer header.
    let telnet6 = frame(TCP, sa(FRONTEND6, 43000), sa(DB6, 23), b"");
    let redis6 = frame(TCP, sa(FRONTEND6, 43000), sa(DB6, 6379), b"");
    let options = vec![0u8, 0, 1, 4, 0, 0, 0, 0];
    let hbh_dst = [(0u8, options.clone()), (60u8, options.clone())];
    let (rc, events) = f.send(IN, &with_ipv6_extension_headers(&telnet6, &hbh_dst));
    assert_eq!((rc, events[0].reason), (TC_ACT_SHOT, Reason::DeniedByRule));
    let (rc, events) = f.send(IN, &with_ipv6_extension_headers(&redis6, &hbh_dst));
    assert_eq!(
        (rc, events[0].reason),
        (TC_ACT_UNSPEC, Reason::AllowedByRule)
    );
    // More headers than walked: the upper layer is never guessed.
    let many: Vec<(u8, Vec<u8>)> = (0..7).map(|_| (60u8, options.clone())).collect();
    f.refused(
        IN,
        &with_ipv6_extension_headers(&redis6, &many),
        Reason::Malformed,
    );
    // A routing header with segments left.
    let routing = vec![0u8, 0, 4, 1, 0, 0, 0, 0];
    f.refused(
        IN,
        &with_ipv6_extension_headers(&redis6, &[(43, routing)]),
        Reason::SourceRoute,
    );

    // Truncated L4 headers (also to an endpoint no rule selects). A truncated IP header cannot be
    // crafted here: BPF_PROG_TEST_RUN refuses it (EINVAL) before the program runs.
    let web = frame(TCP, sa(FRONTEND, 43000), sa(WEB, 80), b"");
    f.refused(IN, &web[..14 + 20 + 12], Reason::Malformed);
    f.refused(IN, &redis6[..14 + 40 + 4], Reason::Malformed);

    // VLAN tags, unknown ethertypes; ARP passes.
    let mut tagged = redis.clone();
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    f.refused(IN, &tagged, Reason::VlanTagged);
    let mut other = redis.clone();
    other[12..14].copy_from_slice(&[0x88, 0xb5]);
    f.refused(IN, &other, Reason::UnknownL3);
    let mut arp = redis[..14].to_vec();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&[0; 20]);
    assert_eq!(f.send(IN, &arp), (TC_ACT_UNSPEC, vec![]));
    assert!(f.counted(Verdict::Allow, Reason::Control) >= 1);

    // An unknown upper-layer protocol has no ports: only rules for all protocols could allow it.
    let mut sctp = frame(UDP, sa(FRONTEND, 43000), sa(DB, 6379), b"payload");
    sctp[14 + 9] = 132;
    let (rc, events) = f.send(IN, &sctp);
    assert_eq!(
        (rc, events[0].reason, events[0].protocol),
        (TC_ACT_SHOT, Reason::DefaultDeny, 132)
    );
    sctp[14 + 16..14 + 20].copy_from_slice(&[192, 0, 2, 11]);
    let (rc, events) = f.send(IN, &sctp);
    assert_eq!((rc, events[0].reason), (TC_ACT_UNSPEC, Reason::NotSelected));
}

#[test]
fn egress_from_an_address_not_the_workloads_own_is_dropped() {
    let mut f = Fixture::new(CONFIG);
    let spoofed = frame(UDP, sa("192.0.2.99", 40000), sa(FRONTEND, 53), b"x");
    f.refused(OUT, &spoofed, Reason::Spoofed);
    // With interfaces known, an endpoint's address used behind another interface is spoofed too
    // (BPF_PROG_TEST_RUN runs on the loopback device, ifindex 1).
    let mut elsewhere = Fixture::with(CONFIG, 9999, PolicyLoadOptions::default());
    let web = frame(UDP, sa(WEB, 40000), sa(FRONTEND, 53), b"x");
    elsewhere.refused(OUT, &web, Reason::Spoofed);
    let mut here = Fixture::with(CONFIG, 1, PolicyLoadOptions::default());
    assert_eq!(here.send(OUT, &web), (TC_ACT_UNSPEC, vec![]));
}

#[test]
fn rule_set_swaps_are_atomic_and_a_failed_one_changes_nothing() {
    let restricted = CONFIG.replace("{port: 6379}, ", "");
    let before = compiled(CONFIG, 0);
    let after = compiled(&restricted, 0);
    // Room for the first rule set and the second, not for a bigger one.
    let options = PolicyLoadOptions {
        report_allows: true,
        policy_map_entries: (before.policy.len() + after.policy.len()) as u32,
        ..Default::default()
    };
    let mut f = Fixture::with(CONFIG, 0, options);
    let epoch = f.datapath.epoch();
    let live = f.datapath.entries_per_epoch().unwrap();
    assert_eq!(
        live[1 - epoch as usize],
        0,
        "old epoch deleted after the swap"
    );
    let redis = (sa(FRONTEND, 44000), sa(DB, 6379));
    assert_eq!(
        f.decide(IN, TCP, redis.0, redis.1),
        allowed("db-from-frontend")
    );

    let bigger = compiled(&format!("{CONFIG}  - {{name: extra, endpoints: {{match_labels: {{role: web}}}}, direction: egress, action: allow, peers: [{{entity: world}}], ports: [{{port: 1, end_port: 65534}}]}}\n"), 0);
    assert!(bigger.policy.len() > after.policy.len());
    let err = f.datapath.apply(&bigger).unwrap_err();
    assert!(format!("{err:#}").contains("POLICY"), "{err:#}");
    assert_eq!(f.datapath.epoch(), epoch, "failed swap keeps the epoch");
    assert_eq!(
        f.datapath.entries_per_epoch().unwrap(),
        live,
        "no partial epoch left"
    );
    assert_eq!(
        f.decide(IN, TCP, redis.0, redis.1),
        allowed("db-from-frontend")
    );

    // A swap that fits: the next packet sees the whole new rule set, under the new epoch.
    f.datapath.apply(&after).unwrap();
    f.reference = Maps::load(&after);
    f.compiled = after;
    assert_ne!(f.datapath.epoch(), epoch);
    let counts = f.datapath.entries_per_epoch().unwrap();
    assert_eq!(counts[epoch as usize], 0, "old epoch deleted");
    let db_in = default_deny(&f, IN, DB);
    assert_eq!(f.decide(IN, TCP, redis.0, redis.1), db_in);
    assert_eq!(
        f.decide(IN, UDP, sa(FRONTEND, 44000), sa(DB, 5353)),
        allowed("db-from-frontend")
    );

    // The same rule set again lands in the first epoch number, whose cached outcomes (redis
    // allowed, under the first rule set) must not be used.
    f.datapath.apply(&f.compiled.clone()).unwrap();
    assert_eq!(f.datapath.epoch(), epoch);
    assert_eq!(f.decide(IN, TCP, redis.0, redis.1), db_in);
}

#[test]
fn cidr_deny_drops_listed_sources_in_xdp_and_tc_only_when_enabled() {
    let listed: Vec<Cidr> = ["203.0.113.0/24", "2001:db8:bad::/48"]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    let from = |src: &str, dst: &str| frame(TCP, sa(src, 40000), sa(dst, 80), b"");
    let bad = from("203.0.113.9", "192.0.2.10");
    let bad6 = from("2001:db8:bad::9", DB6);
    let good = from("198.51.100.9", "192.0.2.10");
    let good6 = from("2001:db8:600d::9", DB6);

    let mut datapath = Datapath::load_with_cidr_deny(&LoadOptions::default(), true).unwrap();
    write_cidr_deny(datapath.ebpf_mut(), &[], &listed).unwrap();
    for (frame, xdp, tc) in [
        (&bad, XDP_DROP, TC_ACT_SHOT),
        (&bad6, XDP_DROP, TC_ACT_SHOT),
        (&good, XDP_PASS, TC_ACT_OK),
        (&good6, XDP_PASS, TC_ACT_OK),
    ] {
        assert_eq!(run(datapath.xdp_program(), frame).0, xdp);
        // `lb_tc`, when the balancer is attached as TC: the same list, the same counter.
        let lb_tc = datapath.tc_program_named(TC_PROGRAM).unwrap();
        assert_eq!(run_tc(lb_tc, frame), tc);
    }
    let cidr_denied = |dp: &mut Datapath| {
        read_counters(dp.ebpf_mut())
            .unwrap()
            .into_iter()
            .find(|(v, r, _)| (*v, *r) == (Verdict::Deny, Reason::CidrDeny))
            .unwrap()
            .2
    };
    assert_eq!(cidr_denied(&mut datapath), 4);
    // Emptied list: nothing dropped.
    write_cidr_deny(datapath.ebpf_mut(), &listed, &[]).unwrap();
    assert_eq!(run(datapath.xdp_program(), &bad).0, XDP_PASS);
    let lb_tc = datapath.tc_program_named(TC_PROGRAM).unwrap();
    assert_eq!(run_tc(lb_tc, &bad), TC_ACT_OK);

    // Not enabled at load time: the list is not consulted at all.
    let mut plain = Datapath::load().unwrap();
    write_cidr_deny(plain.ebpf_mut(), &[], &listed).unwrap();
    assert_eq!(run(plain.xdp_program(), &bad).0, XDP_PASS);
    let lb_tc = plain.tc_program_named(TC_PROGRAM).unwrap();
    assert_eq!(run_tc(lb_tc, &bad), TC_ACT_OK);
    assert_eq!(cidr_denied(&mut plain), 0);
}
