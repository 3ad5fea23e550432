//! End to end: the node's own ICMP errors about translated requests reach the client translated
//! (`lb_tc_egress`), through the real `lb-agent`.
//!
//! The balancer's link towards the backend has a smaller MTU (1280) than the client's path (1500),
//! and the backend's own interface does not (its MSS does not shrink the client's segments). The
//! client's full-sized TCP segments, translated to the backend by the datapath, are too big for
//! that link: the node's stack answers each with "fragmentation needed" / "packet too big" quoting
//! the translated segment (client → backend). Untranslated, the client's socket (connected to the
//! VIP) ignores it and the transfer stalls; translated at egress of the client-facing interface,
//! the client lowers its path MTU towards the VIP and every byte arrives.
//!
//! First without `lb_tc_egress`: its pinned link is removed (the test waits until the kernel has
//! detached it), as the pins of an agent from before it
//! would lack it, and a transfer stalls. Then a new agent adopts the pins, attaches the missing link
//! without an error, and transfers over IPv4 and IPv6 complete, counted
//! `icmp_node_error_to_client`. With the balancer attached as XDP (the default) and as TC.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use lb_agent::{datapath::TC_EGRESS_PROGRAM, pins::PinDir};
use lb_common::counters::Counter;
use lb_tests::{
    agent::{logged_counters, AgentProcess, ConfigFile},
    modes::in_netns,
    netns::{Netns, TEST_PREFIX},
    servers::TcpCountingServer,
    topology::{Topology, BALANCER_CLIENT_IFACE, SERVICE_TCP_PORT, VIP, VIP6},
};

/// The MTU of the balancer's link towards the backend.
const BACKEND_LINK_MTU: u32 = 1280;
/// Sent per connection: hundreds of full-sized segments.
static BULK: [u8; 512 * 1024] = [7; 512 * 1024];
/// How long a transfer may take before it counts as stalled.
const WITHIN: Duration = Duration::from_secs(5);

#[test]
fn node_errors_reach_the_client_translated() {
    run(&[]);
}

#[test]
fn node_errors_reach_the_client_translated_through_tc() {
    run(&["--attach", "tc"]);
}

fn run(attach: &[&str]) {
    let topology = Topology::new(TEST_PREFIX, 1).expect("topology");
    let backend = &topology.backends[0];
    topology
        .balancer
        .ip_cmd(&format!(
            "link set dev {} mtu {BACKEND_LINK_MTU}",
            backend.balancer_iface
        ))
        .unwrap();
    let servers = [IpAddr::from(backend.addr), IpAddr::from(backend.addr6)]
        .map(|addr| TcpCountingServer::start(&backend.ns, addr, SERVICE_TCP_PORT, "backend-1"));
    let received = || servers.iter().map(|s| s.bytes()).sum::<u64>();
    let config = ConfigFile::new(&topology.dual_stack_services(&[1]));
    let interfaces = topology.balancer_interfaces();
    let client = &topology.client;
    let (vip, vip6) = (
        SocketAddr::new(VIP.into(), 80),
        SocketAddr::new(VIP6.into(), 80),
    );

    // Without `lb_tc_egress`: the client never learns the MTU, the transfer stalls.
    let first = AgentProcess::start_with(&topology.balancer, config.path(), &interfaces, attach)
        .expect("first agent starts");
    let pins = first.pins();
    let egress_link =
        PinDir::new(pins.path()).tc_hook_link(BALANCER_CLIENT_IFACE, TC_EGRESS_PROGRAM);
    assert!(egress_link.exists(), "{} pinned", egress_link.display());
    assert!(egress_attached(&topology), "lb_tc_egress attached");
    // Detaches it (the pin is the link's only holder), after an RCU grace period and a work item.
    std::fs::remove_file(&egress_link).expect("remove the egress link's pin");
    let deadline = Instant::now() + Duration::from_secs(10);
    while egress_attached(&topology) {
        assert!(Instant::now() < deadline, "lb_tc_egress still attached");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !transfer(client, vip, &BULK),
        "without lb_tc_egress the transfer stalls"
    );
    assert_eq!(client.learnt_mtu(vip.ip()), None, "no path MTU learnt");
    assert!(
        received() < BULK.len() as u64,
        "stalled: {} bytes",
        received()
    );
    let (code, _) = first.stop().expect("first agent stops");
    assert_eq!(code, 0, "clean exit");

    // A new agent on those pins attaches the missing link.
    let second = AgentProcess::start_pinned(
        &topology.balancer,
        config.path(),
        &interfaces,
        attach,
        pins.clone(),
    )
    .expect("second agent starts on pins without the egress link");
    assert!(
        egress_link.exists(),
        "{} pinned again",
        egress_link.display()
    );
    assert!(egress_attached(&topology), "lb_tc_egress attached again");
    assert!(
        second
            .history
            .iter()
            .any(|l| l.contains("TC attached") && l.contains("lb_tc_egress")),
        "{:#?}",
        second.history
    );
    let before = received();
    for target in [vip, vip6] {
        assert!(
            transfer(client, target, &BULK),
            "the transfer to {target} completes"
        );
        assert_eq!(
            client.learnt_mtu(target.ip()),
            Some(BACKEND_LINK_MTU),
            "the client's path MTU towards {target}"
        );
    }
    assert_eq!(
        received() - before,
        2 * BULK.len() as u64,
        "every byte reached the backend"
    );
    let (code, log) = second.stop().expect("second agent stops");
    assert_eq!(code, 0, "clean exit");
    let counters = logged_counters(&log);
    let translated = counters
        .get(Counter::IcmpNodeErrorToClient.name())
        .copied()
        .unwrap_or(0);
    eprintln!("icmp_node_error_to_client: {translated}");
    // At least one per family: the first too-big segment of each transfer.
    assert!(translated >= 2, "{counters:?}");
}

/// Whether `lb_tc_egress` is in the tcx egress chain of the balancer's client-facing interface.
fn egress_attached(topology: &Topology) -> bool {
    let (_, programs) = in_netns(&topology.balancer, || {
        SchedClassifier::query_tcx(BALANCER_CLIENT_IFACE, TcAttachType::Egress)
    })
    .expect("query the tcx egress chain");
    programs
        .iter()
        .any(|p| p.name_as_str() == Some(TC_EGRESS_PROGRAM))
}

/// Sends `payload` to `target` over a new connection from `ns`; whether the server read every byte
/// (it closes once it has read to the end) within [`WITHIN`]. A connection that does not finish
/// is reset, so that nothing of it is retransmitted later.
fn transfer(ns: &Netns, target: SocketAddr, payload: &'static [u8]) -> bool {
    ns.run(move || {
        let Ok(mut stream) = TcpStream::connect_timeout(&target, Duration::from_secs(3)) else {
            return false;
        };
        let deadline = Instant::now() + WITHIN;
        let left = move || deadline.saturating_duration_since(Instant::now());
        let mut finish = || -> std::io::Result<bool> {
            for chunk in payload.chunks(16 * 1024) {
                if left().is_zero() {
                    return Ok(false);
                }
                stream.set_write_timeout(Some(left()))?;
                stream.write_all(chunk)?;
            }
            stream.shutdown(std::net::Shutdown::Write)?;
            let mut buf = [0u8; 256];
            while !left().is_zero() {
                stream.set_read_timeout(Some(left()))?;
                if stream.read(&mut buf)? == 0 {
                    return Ok(true);
                }
            }
            Ok(false)
        };
        let done = finish().unwrap_or(false);
        if !done {
            reset_on_close(&stream);
        }
        done
    })
}

/// `SO_LINGER` 0: closing sends a reset and drops unsent data.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a `linger` of the size given.
    let set = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "SO_LINGER");
}
