//! End to end: fragments and ICMP errors through the real `lb-agent` in the namespace topology.
//!
//! - UDP datagrams larger than the MTU, over IPv4 and IPv6, are fragmented by the client's stack;
//!   every fragment reaches the backend of the first, which reassembles them, and its equally large
//!   answer, fragmented by the backend's stack, reaches the client as one datagram from the VIP. The
//!   same through a SNAT service: the backends see the node's address, and the answers' fragments
//!   come back through the node's SNAT port.
//! - A "fragmentation needed" / "packet too big" error sent towards the VIP about a reply (as a
//!   router on the client's path would) reaches the backend that sent the reply: its kernel matches
//!   it to its UDP socket and lowers its path MTU towards the client (seen in its route cache),
//!   which it only does for a valid ICMP checksum and a quote naming its own socket.
//! - A backend's "port unreachable" about a client's datagram reaches the client translated: its
//!   connected UDP socket (connected to the VIP) gets "connection refused".
//! - Both errors also through a SNAT service, where the backend knows the flow by the node's
//!   address and port: the error about a reply reaches the backend from the node, quoting the
//!   answer it sent to the node (its path MTU towards the node drops), and the backend's error
//!   reaches the client from the VIP, both sent to the next hop by the datapath itself.
//!
//! Each runs with the balancer attached as XDP (the default) and as TC (`--attach tc`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::Arc,
    thread,
    time::Duration,
};

use lb_common::counters::Counter;
use lb_tests::{
    agent::{logged_counters, AgentProcess, ConfigFile},
    frames::inject_too_big_about_an_answer,
    modes::XdpPass,
    netns::{Netns, TEST_PREFIX},
    servers::ServerLoops,
    topology::{
        Topology, BALANCER_CLIENT_SIDE_ADDR, BALANCER_CLIENT_SIDE_ADDR6, CLIENT_ADDR, CLIENT_ADDR6,
        VIP, VIP6,
    },
};

const ECHO_PORT: u16 = 5353;
/// A port nothing listens on in the backends.
const CLOSED_PORT: u16 = 9;
const CLIENT_ROUTER: &str = "192.0.2.254";
const CLIENT_ROUTER6: &str = "2001:db8:2::fe";

/// The forwarding mode of the services.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Dnat,
    /// From the node's client-side addresses.
    Snat,
}

/// `dns` (UDP 53 → backends' echo servers) and `closed` (UDP 7 → a port nothing listens on), on
/// the IPv4 and the IPv6 VIP, over every backend, all in `dns_mode`.
fn config(topology: &Topology, dns_mode: Mode) -> String {
    let mut yaml = String::new();
    if dns_mode == Mode::Snat {
        yaml += &format!(
            "node:\n  ipv4: {BALANCER_CLIENT_SIDE_ADDR}\n  ipv6: {BALANCER_CLIENT_SIDE_ADDR6}\n"
        );
    }
    yaml += "services:\n";
    for (name, vip, port, backend_port, v6) in [
        ("dns", IpAddr::from(VIP), 53, ECHO_PORT, false),
        ("dns6", IpAddr::from(VIP6), 53, ECHO_PORT, true),
        ("closed", IpAddr::from(VIP), 7, CLOSED_PORT, false),
        ("closed6", IpAddr::from(VIP6), 7, CLOSED_PORT, true),
    ] {
        let mode = if dns_mode == Mode::Snat {
            "    mode: snat\n"
        } else {
            ""
        };
        yaml += &format!(
            "  - name: {name}\n    vip: \"{vip}\"\n    port: {port}\n    protocol: udp\n{mode}    backends:\n"
        );
        for b in &topology.backends {
            let addr: IpAddr = if v6 { b.addr6.into() } else { b.addr.into() };
            yaml += &format!("      - {{ address: \"{addr}\", port: {backend_port} }}\n");
        }
    }
    yaml
}

/// A UDP server answering every datagram with `"<name>:"` followed by the datagram, and recording
/// the sender and size of every datagram it received (whole, after the kernel reassembled it).
struct EchoServer {
    name: String,
    received: Arc<std::sync::Mutex<Vec<(SocketAddr, usize)>>>,
    _loops: ServerLoops,
}

impl EchoServer {
    fn start(ns: &Netns, addr: IpAddr, name: &str) -> Self {
        let socket = ns
            .run(move || UdpSocket::bind(SocketAddr::new(addr, ECHO_PORT)))
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut loops = ServerLoops::default();
        let (recorded, prefix) = (received.clone(), format!("{name}:"));
        let mut buf = vec![0u8; 65536];
        loops.spawn(move || {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                recorded.lock().unwrap().push((peer, n));
                let mut answer = prefix.as_bytes().to_vec();
                answer.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&answer, peer);
            }
        });
        Self {
            name: name.to_string(),
            received,
            _loops: loops,
        }
    }

    fn sizes(&self) -> Vec<usize> {
        self.received().into_iter().map(|(_, n)| n).collect()
    }

    /// Sender and size of every datagram received.
    fn received(&self) -> Vec<(SocketAddr, usize)> {
        self.received.lock().unwrap().clone()
    }
}

/// Echo servers on every backend, IPv4 and IPv6, named `backend-<i>`.
fn echo_servers(topology: &Topology) -> Vec<EchoServer> {
    let mut servers = Vec::new();
    for (i, b) in topology.backends.iter().enumerate() {
        for addr in [IpAddr::from(b.addr), IpAddr::from(b.addr6)] {
            servers.push(EchoServer::start(
                &b.ns,
                addr,
                &format!("backend-{}", i + 1),
            ));
        }
    }
    servers
}

/// A UDP socket in the client namespace, bound to the client's address of `target`'s family.
fn client_socket(ns: &Netns, target: SocketAddr) -> UdpSocket {
    let local: IpAddr = if target.is_ipv4() {
        CLIENT_ADDR.into()
    } else {
        CLIENT_ADDR6.into()
    };
    let socket = ns
        .run(move || UdpSocket::bind(SocketAddr::new(local, 0)))
        .expect("bind client socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    socket
}

/// Sends `payload` to `target` and returns the answer, checking it came from `target` and echoes
/// `payload`; returns the name of the backend that answered.
fn ask(socket: &UdpSocket, target: SocketAddr, payload: &[u8]) -> String {
    socket.send_to(payload, target).expect("send");
    let mut buf = vec![0u8; 65536];
    let (n, from) = lb_tests::servers::recv_from(socket, &mut buf)
        .unwrap_or_else(|e| panic!("no answer from {target} to {} bytes: {e}", payload.len()));
    assert_eq!(from, target, "the answer comes from the VIP");
    let answer = &buf[..n];
    let colon = answer.iter().position(|&b| b == b':').expect("name:");
    assert!(
        answer[colon + 1..] == *payload,
        "{target}: the whole datagram came back ({} of {} bytes)",
        n - colon - 1,
        payload.len()
    );
    String::from_utf8_lossy(&answer[..colon]).into_owned()
}

fn count(counters: &BTreeMap<String, u64>, which: Counter) -> u64 {
    counters.get(which.name()).copied().unwrap_or(0)
}

fn assert_count(counters: &BTreeMap<String, u64>, which: Counter, want: u64) {
    assert_eq!(
        count(counters, which),
        want,
        "{}: {counters:?}",
        which.name()
    );
}

/// The agent balancing [`config`]'s services in `mode`, attached by `agent_args`, with what the
/// topology needs for it ([`prepare`]).
struct Balancer {
    agent: AgentProcess,
    _config: ConfigFile,
    _xdp_pass: Vec<XdpPass>,
}

impl Balancer {
    fn start(topology: &Topology, mode: Mode, agent_args: &[&str]) -> Self {
        let xdp_pass = prepare(topology, mode, agent_args);
        let config = ConfigFile::new(&config(topology, mode));
        let agent = AgentProcess::start_with(
            &topology.balancer,
            config.path(),
            &topology.balancer_interfaces(),
            agent_args,
        )
        .expect("agent starts");
        Self {
            agent,
            _config: config,
            _xdp_pass: xdp_pass,
        }
    }

    /// Stops the agent; returns its final counters (name → value).
    fn stop(self) -> BTreeMap<String, u64> {
        let (log, _) = self.agent.stop_cleanly();
        logged_counters(&log)
    }
}

/// The four tests of `$scenario`: a DNAT and a SNAT service, each with the balancer attached as
/// XDP (the default) and as TC (`--attach tc`).
macro_rules! tests_in_each_mode {
    (
        $scenario:ident:
        $(#[$dnat_doc:meta])* dnat: $dnat:ident,
        $(#[$dnat_tc_doc:meta])* dnat_tc: $dnat_tc:ident,
        $(#[$snat_doc:meta])* snat: $snat:ident,
        $(#[$snat_tc_doc:meta])* snat_tc: $snat_tc:ident,
    ) => {
        $(#[$dnat_doc])*
        #[test]
        fn $dnat() {
            $scenario(Mode::Dnat, &[]);
        }

        $(#[$dnat_tc_doc])*
        #[test]
        fn $dnat_tc() {
            $scenario(Mode::Dnat, &["--attach", "tc"]);
        }

        $(#[$snat_doc])*
        #[test]
        fn $snat() {
            $scenario(Mode::Snat, &[]);
        }

        $(#[$snat_tc_doc])*
        #[test]
        fn $snat_tc() {
            $scenario(Mode::Snat, &["--attach", "tc"]);
        }
    };
}

tests_in_each_mode! {
    fragments_both_ways:
    dnat: large_udp_datagrams_cross_the_vip_in_fragments_both_ways,
    /// The same through `lb_tc` (`--attach tc`): first fragments redirected to the next hop, later
    /// ones rewritten and left to the stack's forwarding.
    dnat_tc: large_udp_datagrams_cross_the_vip_in_fragments_both_ways_through_tc,
    /// Through a SNAT service: every fragment, both ways, is translated on both ends and sent to
    /// the FIB's next hop as its first fragment was.
    snat: large_udp_datagrams_cross_a_snat_vip_in_fragments_both_ways,
    snat_tc: large_udp_datagrams_cross_a_snat_vip_in_fragments_both_ways_through_tc,
}

/// What the topology needs for `mode` with the balancer attached by `agent_args`: for SNAT, whose
/// address is one of the node's own, packets the fast path hands to the stack (next hop not
/// resolved yet) must not be taken for spoofed; and XDP redirects into the client's and backends'
/// veths, whose peers then need an XDP program (kept while the returned value lives).
fn prepare(topology: &Topology, mode: Mode, agent_args: &[&str]) -> Vec<XdpPass> {
    let mut xdp_pass = Vec::new();
    if mode == Mode::Snat {
        topology
            .balancer
            .sysctl("net.ipv4.conf.all.accept_local", "1")
            .unwrap();
        if agent_args.is_empty() {
            xdp_pass.push(XdpPass::attach(&topology.client, "eth0"));
            for b in &topology.backends {
                xdp_pass.push(XdpPass::attach(&b.ns, "eth0"));
            }
        }
    }
    xdp_pass
}

fn fragments_both_ways(mode: Mode, agent_args: &[&str]) {
    let topology = Topology::new(TEST_PREFIX, 2).expect("topology");
    let servers = echo_servers(&topology);
    let balancer = Balancer::start(&topology, mode, agent_args);

    // 3000 bytes: three fragments on a 1500-byte link, both ways, for both families.
    const REQUESTS: usize = 16;
    for vip in [SocketAddr::from((VIP, 53)), SocketAddr::from((VIP6, 53))] {
        let mut by_backend = BTreeMap::<String, usize>::new();
        for i in 0..REQUESTS {
            // A fresh socket (a new flow) each time, so the requests spread over the backends.
            let socket = client_socket(&topology.client, vip);
            let payload: Vec<u8> = (0..3000).map(|j| (i * 7 + j) as u8).collect();
            *by_backend.entry(ask(&socket, vip, &payload)).or_default() += 1;
        }
        assert_eq!(
            by_backend.len(),
            2,
            "{vip}: both backends answered: {by_backend:?}"
        );
    }
    thread::sleep(Duration::from_millis(100));
    let sizes: Vec<usize> = servers.iter().flat_map(|s| s.sizes()).collect();
    assert_eq!(
        sizes.len(),
        2 * REQUESTS,
        "every datagram reached one backend"
    );
    assert!(
        sizes.iter().all(|&n| n == 3000),
        "every datagram arrived whole: {sizes:?}"
    );
    for s in &servers {
        assert!(s.sizes().len() < 2 * REQUESTS, "{} not alone", s.name);
        for (peer, _) in s.received() {
            let (client, node): (IpAddr, IpAddr) = if peer.is_ipv4() {
                (CLIENT_ADDR.into(), BALANCER_CLIENT_SIDE_ADDR.into())
            } else {
                (CLIENT_ADDR6.into(), BALANCER_CLIENT_SIDE_ADDR6.into())
            };
            let want = if mode == Mode::Snat { node } else { client };
            assert_eq!(peer.ip(), want, "{mode:?}: {} saw {peer}", s.name);
        }
    }

    let counters = balancer.stop();
    // Each request and each answer: a first fragment (tracked) and two later ones.
    let datagrams = (2 * 2 * REQUESTS) as u64;
    assert_count(&counters, Counter::FragmentTracked, datagrams);
    assert_count(&counters, Counter::ForwardFragment, 2 * datagrams);
    assert_count(&counters, Counter::PassFragment, 0);
    if mode == Mode::Snat {
        // Every answer's first fragment came back through the node's SNAT port.
        assert_count(
            &counters,
            Counter::SnatReplyTranslated,
            (2 * REQUESTS) as u64,
        );
    }
}

tests_in_each_mode! {
    fragmentation_needed_about_a_reply:
    dnat: fragmentation_needed_about_a_reply_reaches_the_backend_that_sent_it,
    /// The same through `lb_tc` (`--attach tc`), which translates the error on the skb and leaves
    /// it to the stack's forwarding.
    dnat_tc: fragmentation_needed_about_a_reply_reaches_the_backend_that_sent_it_through_tc,
    /// Through a SNAT service: the backend answered the node's address and port, and the error
    /// reaches it quoting that answer, from the node, so it lowers its path MTU towards the node.
    snat: fragmentation_needed_about_a_snat_reply_reaches_the_backend_that_sent_it,
    snat_tc: fragmentation_needed_about_a_snat_reply_reaches_the_backend_that_sent_it_through_tc,
}

fn fragmentation_needed_about_a_reply(mode: Mode, agent_args: &[&str]) {
    let topology = Topology::new(TEST_PREFIX, 2).expect("topology");
    let _servers = echo_servers(&topology);
    let balancer = Balancer::start(&topology, mode, agent_args);

    for (vip, client, node, router, mtu) in [
        (
            SocketAddr::from((VIP, 53)),
            IpAddr::from(CLIENT_ADDR),
            IpAddr::from(BALANCER_CLIENT_SIDE_ADDR),
            CLIENT_ROUTER,
            1200u16,
        ),
        (
            SocketAddr::from((VIP6, 53)),
            IpAddr::from(CLIENT_ADDR6),
            IpAddr::from(BALANCER_CLIENT_SIDE_ADDR6),
            CLIENT_ROUTER6,
            1300,
        ),
    ] {
        // Where the backend sent its answer: the client, or the node's SNAT address.
        let client = if mode == Mode::Snat { node } else { client };
        let socket = client_socket(&topology.client, vip);
        let local = socket.local_addr().unwrap();
        let question = b"how big may answers be?";
        let name = ask(&socket, vip, question);
        let index: usize = name.trim_start_matches("backend-").parse().unwrap();
        let (sender, other) = (&topology.backends[index - 1], &topology.backends[2 - index]);
        assert_eq!(sender.ns.learnt_mtu(client), None, "no PMTU yet");

        // The answer as the client received it, quoted by a router on the client's side that
        // could not forward it (RFC 1812: up to 576 bytes in all; IPv6: up to 1280).
        let mut answer = format!("{name}:").into_bytes();
        answer.extend_from_slice(question);
        let router = router.parse().unwrap();
        inject_too_big_about_an_answer(&topology, router, (vip, local), &answer, mtu);
        assert!(
            sender.ns.learns_mtu(client, mtu),
            "{vip}: {name} did not learn the path MTU towards {client}"
        );
        assert_eq!(
            other.ns.learnt_mtu(client),
            None,
            "{vip}: only the backend that sent the answer hears of it"
        );
    }

    let counters = balancer.stop();
    assert_count(&counters, Counter::IcmpErrorToBackend, 2);
}

tests_in_each_mode! {
    port_unreachable_from_a_backend:
    dnat: port_unreachable_from_a_backend_reaches_the_client_as_the_vips,
    /// The same through `lb_tc` (`--attach tc`).
    dnat_tc: port_unreachable_from_a_backend_reaches_the_client_as_the_vips_through_tc,
    /// Through a SNAT service: the backend's error goes to the node's SNAT address and port, and
    /// reaches the client as the VIP's.
    snat: port_unreachable_from_a_snat_backend_reaches_the_client_as_the_vips,
    snat_tc: port_unreachable_from_a_snat_backend_reaches_the_client_as_the_vips_through_tc,
}

fn port_unreachable_from_a_backend(mode: Mode, agent_args: &[&str]) {
    let topology = Topology::new(TEST_PREFIX, 2).expect("topology");
    let balancer = Balancer::start(&topology, mode, agent_args);

    for vip in [SocketAddr::from((VIP, 7)), SocketAddr::from((VIP6, 7))] {
        let result = topology.client.run(move || {
            let local: SocketAddr = if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                .parse()
                .unwrap();
            let socket = UdpSocket::bind(local)?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            socket.connect(vip)?;
            socket.send(b"anyone?")?;
            let mut buf = [0u8; 64];
            socket.recv(&mut buf).map(|_| ())
        });
        let err = result.expect_err("nothing answers on the closed port");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{vip}: the backend's port unreachable reached the client as the VIP's ({err})"
        );
    }

    let counters = balancer.stop();
    assert_count(&counters, Counter::IcmpErrorToClient, 2);
}
