//! The XDP datapath on crafted frames through BPF_PROG_TEST_RUN: build the frame, set up the maps,
//! check the verdict, the output frame and the counters.

use std::net::Ipv4Addr;

use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{config::Config, datapath::Datapath};
use lb_common::{counters::Counter, flow_hash::flow_hash, protocol};
use lb_tests::frames::{self, inspect_ipv4};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(203, 0, 113, 11),
    Ipv4Addr::new(203, 0, 113, 12),
    Ipv4Addr::new(203, 0, 113, 13),
];

const CONFIG: &str = "
services:
  - name: web
    vip: 198.51.100.10
    port: 80
    protocol: tcp
    backends:
      - { address: 203.0.113.11, port: 8080 }
      - { address: 203.0.113.12, port: 8080 }
      - { address: 203.0.113.13, port: 8080 }
  - name: dns
    vip: 198.51.100.10
    port: 53
    protocol: udp
    backends:
      - { address: 203.0.113.11, port: 5353 }
      - { address: 203.0.113.12, port: 5353 }
  - name: empty
    vip: 198.51.100.11
    port: 80
    protocol: tcp
";

fn datapath() -> Datapath {
    let mut datapath = Datapath::load().expect("load datapath");
    datapath
        .apply(&Config::from_yaml(CONFIG).unwrap())
        .expect("apply config");
    datapath
}

/// Runs the program once on `frame`; returns the action and the output frame.
fn run(datapath: &mut Datapath, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    let result = datapath
        .xdp_program()
        .test_run(opts)
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
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

/// The backend the datapath must pick, computed with the same shared hash.
fn expected_backend(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8, count: usize) -> usize {
    let ports = ((src.1.to_be() as u32) << 16) | dst.1.to_be() as u32;
    let hash = flow_hash(
        u32::from_ne_bytes(src.0.octets()),
        u32::from_ne_bytes(dst.0.octets()),
        ports,
        proto,
        0,
    );
    (hash % count as u32) as usize
}

#[test]
fn vip_tcp_frame_is_rewritten_to_the_hashed_backend_with_valid_checksums() {
    let mut datapath = datapath();
    let mut seen = std::collections::BTreeSet::new();
    for sport in 40000..40032u16 {
        let frame = frames::tcp_v4((CLIENT, sport), (VIP, 80), b"hello");
        let (action, out) = run(&mut datapath, &frame);
        assert_eq!(action, XDP_PASS);
        let got = inspect_ipv4(&out);
        let want = BACKENDS[expected_backend((CLIENT, sport), (VIP, 80), protocol::TCP, 3)];
        assert_eq!(got.dst, (want, 8080), "sport {sport}");
        assert_eq!(got.src, (CLIENT, sport), "client address must be kept");
        assert!(got.ip_checksum_ok, "IPv4 header checksum");
        assert!(got.l4_checksum_ok, "TCP checksum");
        assert_eq!(&out[out.len() - 5..], b"hello", "payload untouched");
        assert_eq!(out.len(), frame.len());
        seen.insert(want);
    }
    assert_eq!(seen.len(), 3, "32 flows must reach all 3 backends");
    assert_eq!(counter(&datapath, Counter::ForwardToBackend), 32);
}

#[test]
fn vip_udp_frame_is_rewritten_with_valid_checksum() {
    let mut datapath = datapath();
    let frame = frames::udp_v4((CLIENT, 33333), (VIP, 53), b"query");
    let (action, out) = run(&mut datapath, &frame);
    assert_eq!(action, XDP_PASS);
    let got = inspect_ipv4(&out);
    assert!(BACKENDS[..2].contains(&got.dst.0), "{got:?}");
    assert_eq!(got.dst.1, 5353);
    assert!(got.ip_checksum_ok && got.l4_checksum_ok, "{got:?}");
}

#[test]
fn backend_reply_is_translated_back_to_the_vip() {
    let mut datapath = datapath();
    let frame = frames::tcp_v4((BACKENDS[1], 8080), (CLIENT, 40000), b"world");
    let (action, out) = run(&mut datapath, &frame);
    assert_eq!(action, XDP_PASS);
    let got = inspect_ipv4(&out);
    assert_eq!(got.src, (VIP, 80));
    assert_eq!(got.dst, (CLIENT, 40000));
    assert!(got.ip_checksum_ok && got.l4_checksum_ok, "{got:?}");
    assert_eq!(counter(&datapath, Counter::ReplyFromBackend), 1);
}

#[test]
fn non_vip_frames_pass_untouched() {
    let mut datapath = datapath();
    let cases = [
        frames::tcp_v4((CLIENT, 40000), (Ipv4Addr::new(198, 51, 100, 99), 80), b"x"),
        frames::tcp_v4((CLIENT, 40000), (VIP, 81), b"x"),
        frames::udp_v4((CLIENT, 40000), (VIP, 80), b"x"),
    ];
    for frame in &cases {
        let (action, out) = run(&mut datapath, frame);
        assert_eq!(action, XDP_PASS);
        assert_eq!(&out, frame, "frame must not change");
    }
    assert_eq!(counter(&datapath, Counter::PassNotService), 3);
    assert_eq!(counter(&datapath, Counter::ForwardToBackend), 0);
}

#[test]
fn non_ipv4_and_odd_ipv4_pass_untouched() {
    let mut datapath = datapath();
    // ARP-ish ethertype.
    let mut arp = frames::tcp_v4((CLIENT, 1), (VIP, 80), b"");
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    // A non-first fragment to the VIP: must not be balanced on garbage "ports".
    let mut fragment = frames::tcp_v4((CLIENT, 40000), (VIP, 80), b"x");
    fragment[20..22].copy_from_slice(&[0x00, 0x10]);
    for frame in [&arp, &fragment] {
        let (action, out) = run(&mut datapath, frame);
        assert_eq!(action, XDP_PASS);
        assert_eq!(&out, frame);
    }
    assert_eq!(counter(&datapath, Counter::PassNotIpv4), 1);
    assert_eq!(counter(&datapath, Counter::PassIpv4Unsupported), 1);
}

#[test]
fn truncated_tcp_header_to_anything_is_dropped_and_counted() {
    let mut datapath = datapath();
    let frame = frames::tcp_v4((CLIENT, 40000), (VIP, 80), b"");
    let truncated = &frame[..14 + 20 + 10];
    let (action, _) = run(&mut datapath, truncated);
    assert_eq!(action, XDP_DROP);
    assert_eq!(counter(&datapath, Counter::DropMalformed), 1);
}

#[test]
fn vip_without_backends_drops_and_counts() {
    let mut datapath = datapath();
    let frame = frames::tcp_v4((CLIENT, 40000), (Ipv4Addr::new(198, 51, 100, 11), 80), b"x");
    let (action, _) = run(&mut datapath, &frame);
    assert_eq!(action, XDP_DROP);
    assert_eq!(counter(&datapath, Counter::DropNoBackend), 1);
}

#[test]
fn reapplying_a_changed_config_moves_flows_and_removes_stale_entries() {
    let mut datapath = datapath();
    let smaller = CONFIG
        .replace("      - { address: 203.0.113.12, port: 8080 }\n      - { address: 203.0.113.13, port: 8080 }\n", "");
    datapath
        .apply(&Config::from_yaml(&smaller).unwrap())
        .unwrap();
    for sport in 40000..40010u16 {
        let (_, out) = run(
            &mut datapath,
            &frames::tcp_v4((CLIENT, sport), (VIP, 80), b""),
        );
        assert_eq!(inspect_ipv4(&out).dst, (BACKENDS[0], 8080));
    }
    // The removed backend's replies are no longer translated.
    let (_, out) = run(
        &mut datapath,
        &frames::tcp_v4((BACKENDS[2], 8080), (CLIENT, 40000), b""),
    );
    assert_eq!(inspect_ipv4(&out).src, (BACKENDS[2], 8080));
}
