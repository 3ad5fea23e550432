//! Per-packet cost of each forwarding mode (DNAT, SNAT, DSR L2, DSR IPIP and IPv6-in-IPv6) and of
//! the backends' decapsulation program, through BPF_PROG_TEST_RUN, as ratios to the XDP_PASS
//! program measured on the same thread in the same round.
//!
//! The balancer's paths run inside the balancer namespace of a real topology (one backend, with a
//! permanent neighbour entry), attached to its interfaces as in production, so `bpf_fib_lookup`
//! resolves the next hop and SNAT and DSR packets end in `XDP_REDIRECT` as forwarded packets do.
//! `lb_xdp` leaves DNAT packets to the stack's forwarding (`XDP_PASS`), as in the `per-packet`
//! section; its rows here are that section's paths on a topology's service, for comparison.
//!
//! Every path rewrites the packet, so each is timed with `repeat = 1` calls minus the per-call
//! overhead (XDP_PASS measured both ways), and each figure is checked against the counters of the
//! path it claims, the transmit counter included: the bench fails otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{bail, ensure, Context, Result};
use lb_agent::{
    config::Config,
    datapath::Datapath,
    decap::{Decap, DecapOptions},
};
use lb_common::counters::Counter;
use serde_json::{json, Value};

use crate::{
    frames::{frame, frame_via, inspect, ACK, SYN},
    modes::{encapsulated, in_netns, link_of, run_on, static_neighbour},
    netns::BENCH_PREFIX,
    test_run::{
        attach_both_as_in_production, attach_on_new_veth, counter_in, median, xdp_repeated_ns,
        xdp_single_call_ns,
    },
    topology::{
        Topology, BALANCER_CLIENT_IFACE, BALANCER_CLIENT_SIDE_ADDR, CLIENT_ADDR, CLIENT_ADDR6,
    },
};

/// Calls per conntrack-hit and reply figure.
const CALLS: u32 = 20_000;
/// Iterations of the XDP_PASS baseline's long repeat.
const REPEAT: u32 = 1_000_000;
/// Fresh flows per round and mode. SNAT takes a port for each from the range below (64512 ports),
/// picking among 4 hashed candidates, so it stays below 1/8 of the range over all rounds: fuller,
/// an allocation may fail (counted, and the bench would fail).
const FRESH_FLOWS_ALL_ROUNDS: u32 = 8_000;
const FRESH_FLOWS_MAX: u32 = 2_000;
const SNAT_PORTS: (u16, u16) = (1024, 65535);
/// The node's IPv6 address (SNAT source and outer IPv6 source); IPv4 is the client side's.
const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);

/// (mode in the config, VIP, label of its rows).
const MODES: [(&str, &str, &str); 5] = [
    ("dnat", "198.51.100.50", "DNAT"),
    ("snat", "198.51.100.51", "SNAT"),
    ("dsr-l2", "198.51.100.52", "DSR L2"),
    ("dsr-ipip", "198.51.100.53", "DSR IPIP (IPv4 in IPv4)"),
    ("dsr-ipip", "2001:db8:100::54", "DSR IPIP (IPv6 in IPv6)"),
];

/// One round: the baseline and (row, ns per packet) of every path.
struct Round {
    pass_ns: f64,
    rows: Vec<(String, f64)>,
}

/// Runs `rounds` rounds and prints per-path medians; returns them as JSON.
pub fn run(rounds: usize) -> Result<Value> {
    let fresh_flows = FRESH_FLOWS_MAX.min(FRESH_FLOWS_ALL_ROUNDS / rounds as u32);
    let topology = Topology::new(BENCH_PREFIX, 1)?;
    let (lb, b1) = (&topology.balancer, &topology.backends[0]);
    let (_, b1_mac) = link_of(&b1.ns, "eth0");
    let (_, client_mac) = link_of(&topology.client, "eth0");
    let (to_client, to_client_mac) = link_of(lb, BALANCER_CLIENT_IFACE);
    let (to_b1, b1_side_mac) = link_of(lb, &b1.balancer_iface);
    static_neighbour(lb, b1.addr.into(), b1_mac, &b1.balancer_iface)?;
    static_neighbour(lb, b1.addr6.into(), b1_mac, &b1.balancer_iface)?;
    static_neighbour(lb, CLIENT_ADDR.into(), client_mac, BALANCER_CLIENT_IFACE)?;
    static_neighbour(lb, CLIENT_ADDR6.into(), client_mac, BALANCER_CLIENT_IFACE)?;

    let mut yaml = format!(
        "node: {{ ipv4: {BALANCER_CLIENT_SIDE_ADDR}, ipv6: \"{NODE6}\", \
         snat_ports: {{ first: {}, last: {} }} }}\nservices:\n",
        SNAT_PORTS.0, SNAT_PORTS.1
    );
    for (mode, vip, _) in MODES {
        let backend: IpAddr = if vip.contains(':') {
            b1.addr6.into()
        } else {
            b1.addr.into()
        };
        // DNAT's backend port is its own: a backend serving one frontend needs no reply entry per
        // flow (SNAT's always has one; DSR's port is the VIP's).
        let backend_port = if mode == "dnat" { 8080 } else { 80 };
        yaml += &format!(
            "  - {{ name: {mode}-{vip}, vip: \"{vip}\", port: 80, protocol: tcp, mode: {mode},\n      \
             backends: [ {{ address: \"{backend}\", port: {backend_port} }} ] }}\n"
        );
    }
    let interfaces = topology.balancer_interfaces();
    let links = Links {
        to_client,
        to_b1,
        from_client: (client_mac, to_client_mac),
        from_b1: (b1_mac, b1_side_mac),
    };
    let all = in_netns(lb, move || -> Result<Vec<Round>> {
        let mut datapath = Datapath::load()?;
        datapath.apply(&Config::from_yaml(&yaml)?)?;
        for iface in &interfaces {
            datapath.attach(iface)?;
        }
        attach_both_as_in_production(&mut datapath, lb)?;
        let mut decap = Decap::load(&DecapOptions::default())?;
        attach_on_new_veth(lb, "bench-decap", |iface| decap.attach(iface))?;
        (0..rounds)
            .map(|round| measure_round(&mut datapath, &mut decap, &links, round, fresh_flows))
            .collect()
    })?;

    println!("Per-packet cost of the forwarding modes, inside a topology's balancer namespace ({CALLS} single calls; {fresh_flows} fresh flows per mode), {rounds} rounds:");
    println!("  {:<52} {:>10} {:>12}", "path", "ns/packet", "x XDP_PASS");
    let mut json_rows = Vec::new();
    for (i, (path, _)) in all[0].rows.iter().enumerate() {
        let ns = median(all.iter().map(|r| r.rows[i].1).collect());
        let per_round: Vec<f64> = all.iter().map(|r| r.rows[i].1 / r.pass_ns).collect();
        let ratio = median(per_round.clone());
        println!("  {path:<52} {ns:>10.1} {ratio:>12.2}");
        json_rows.push(json!({"path": path, "ns_per_packet": ns, "ratio_to_xdp_pass": ratio, "ratios_per_round": per_round}));
    }
    let pass_ns = median(all.iter().map(|r| r.pass_ns).collect());
    println!("  (XDP_PASS {pass_ns:.2} ns per packet, median)");
    println!();
    Ok(json!({ "rounds": rounds, "xdp_pass_ns": pass_ns, "paths": json_rows }))
}

/// Interface indexes and (source, destination) MACs of frames arriving on them.
struct Links {
    to_client: u32,
    to_b1: u32,
    from_client: ([u8; 6], [u8; 6]),
    from_b1: ([u8; 6], [u8; 6]),
}

/// `calls` repeat=1 runs of `frames` on `ingress`, minus the per-call overhead; fails unless every
/// counter in `path` grew by exactly `calls`.
fn timed(
    datapath: &mut Datapath,
    frames: &[Vec<u8>],
    calls: u32,
    ingress: u32,
    overhead: f64,
    path: &[Counter],
) -> Result<f64> {
    let before = datapath.counters()?;
    let ns = xdp_single_call_ns(datapath.xdp_program(), frames, calls, ingress) - overhead;
    let after = datapath.counters()?;
    for c in path {
        let grown = counter_in(&after, *c) - counter_in(&before, *c);
        if grown != calls as u64 {
            let moved: Vec<String> = after
                .iter()
                .zip(&before)
                .filter(|(a, b)| a.1 != b.1)
                .map(|(a, b)| format!("{} +{}", a.0.name(), a.1 - b.1))
                .collect();
            bail!(
                "{} grew by {grown}, not {calls}: the path was not taken every time (moved: {})",
                c.name(),
                moved.join(", ")
            );
        }
    }
    Ok(ns)
}

fn measure_round(
    datapath: &mut Datapath,
    decap: &mut Decap,
    links: &Links,
    round: usize,
    fresh_flows: u32,
) -> Result<Round> {
    let baseline_frame = frame(
        SYN,
        sa4(192, 0, 2, 9, 40000),
        sa4(198, 51, 100, 99, 80),
        b"",
    );
    let pass = datapath.xdp_pass_program()?;
    let pass_ns = xdp_repeated_ns(pass, &baseline_frame, REPEAT);
    let overhead = xdp_single_call_ns(pass, &[baseline_frame], CALLS, 0) - pass_ns;

    let mut rows = Vec::new();
    for (mode, vip, label) in MODES {
        let vip = SocketAddr::new(vip.parse().context("VIP")?, 80);
        let fresh_ip: IpAddr = if vip.is_ipv4() {
            Ipv4Addr::new(192, 0, 2, 100 + round as u8).into()
        } else {
            Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 1, round as u16).into()
        };
        // lb_xdp leaves a DNAT packet to the stack's forwarding; the other modes send it to the
        // next hop the FIB names.
        let path_of = |path: Counter| -> Vec<Counter> {
            if mode == "dnat" {
                vec![path]
            } else {
                vec![path, Counter::XmitRedirect]
            }
        };
        let fresh: Vec<Vec<u8>> = (0..fresh_flows)
            .map(|i| {
                let client = SocketAddr::new(fresh_ip, 10_000 + i as u16);
                frame_via(SYN, client, vip, b"", links.from_client, 64)
            })
            .collect();
        let new_flow = timed(
            datapath,
            &fresh,
            fresh_flows,
            links.to_client,
            overhead,
            &path_of(Counter::ForwardNewFlow),
        )?;
        rows.push((
            format!("{label}: new flow ({fresh_flows} fresh flows)"),
            new_flow,
        ));

        // A flow of the real client (its reply has a neighbour to go to), opened untimed.
        let client_ip: IpAddr = if vip.is_ipv4() {
            CLIENT_ADDR.into()
        } else {
            CLIENT_ADDR6.into()
        };
        let client = SocketAddr::new(client_ip, 50_000 + round as u16);
        let syn = frame_via(SYN, client, vip, b"", links.from_client, 64);
        run_on(datapath.xdp_program(), &syn, links.to_client);
        let ack = frame_via(ACK, client, vip, b"", links.from_client, 64);
        let hit = timed(
            datapath,
            std::slice::from_ref(&ack),
            CALLS,
            links.to_client,
            overhead,
            &path_of(Counter::ForwardConntrackHit),
        )?;
        rows.push((format!("{label}: conntrack hit"), hit));

        // Replies come back through the balancer only for DNAT and SNAT.
        let reply_path = match mode {
            "dnat" => Counter::ReplyTranslated,
            "snat" => Counter::SnatReplyTranslated,
            _ => continue,
        };
        let (_, forwarded) = run_on(datapath.xdp_program(), &ack, links.to_client);
        let sent = inspect(&forwarded);
        let reply = frame_via(ACK, sent.dst, sent.src, b"", links.from_b1, 64);
        let ns = timed(
            datapath,
            std::slice::from_ref(&reply),
            CALLS,
            links.to_b1,
            overhead,
            &path_of(reply_path),
        )?;
        rows.push((format!("{label}: reply from the backend"), ns));
    }

    // The backend side of DSR IPIP: `lb_decap` strips the outer header.
    for (label, inner, outer_src, outer_dst, counter) in [
        (
            "decap (backend side): IPv4 in IPv4",
            frame(
                SYN,
                sa4(192, 0, 2, 2, 40000),
                sa4(198, 51, 100, 53, 80),
                b"",
            ),
            IpAddr::from(BALANCER_CLIENT_SIDE_ADDR),
            IpAddr::from(Ipv4Addr::new(203, 0, 113, 2)),
            Counter::DecapOuterIpv4,
        ),
        (
            "decap (backend side): IPv6 in IPv6",
            frame(
                SYN,
                SocketAddr::new(CLIENT_ADDR6.into(), 40000),
                SocketAddr::new("2001:db8:100::54".parse()?, 80),
                b"",
            ),
            IpAddr::from(NODE6),
            IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 0x203, 1, 0, 0, 0, 2)),
            Counter::DecapOuterIpv6,
        ),
    ] {
        let outer = encapsulated(&inner, outer_src, outer_dst, 0, links.from_b1);
        let before = counter_in(&decap.counters()?, counter);
        let ns = xdp_single_call_ns(decap.program(), &[outer], CALLS, 0) - overhead;
        let grown = counter_in(&decap.counters()?, counter) - before;
        ensure!(
            grown == CALLS as u64,
            "{}: {grown} of {CALLS} calls decapsulated",
            counter.name()
        );
        rows.push((label.to_string(), ns));
    }
    Ok(Round { pass_ns, rows })
}

fn sa4(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::new(a, b, c, d).into(), port)
}
