//! `BPF_PROG_TEST_RUN` helpers shared by the datapath tests and the benchmarks.

use std::{
    collections::HashMap as StdHashMap,
    net::{IpAddr, SocketAddr},
};

use anyhow::Result;
use aya::{
    maps::{Array, HashMap, Map, MapData, RingBuf},
    programs::{xdp::XdpMode, SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
};
use lb_agent::datapath::Datapath;
use lb_common::{
    conntrack::{ConntrackEntry, FlowKey, FlowKeyV4},
    counters::Counter,
    flow_events::{kind, FlowEvent},
    flow_hash::maglev_slot,
    service::{family_of, Addr, Backend, ServiceInfo, ServiceKey},
};

use crate::netns::Netns;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
/// TC verdicts (`TC_ACT_OK`, `TC_ACT_SHOT`).
pub const TC_ACT_OK: u32 = 0;
/// `TC_ACT_UNSPEC` (-1), which tcx reads as `TCX_NEXT`: what the policy programs return for a
/// packet they let through, so the next program of the chain runs.
pub const TC_ACT_UNSPEC: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;

/// Attaches `lb_xdp` and the XDP_PASS reference to veths of their own in `ns` (see
/// [`attach_on_new_veth`]), so that benchmark test runs call both the way the kernel calls an
/// attached XDP program: directly, through the XDP dispatcher. A program attached nowhere is called
/// through a retpoline on kernels that use them (this machine's does), about 10 ns more per single
/// call; measured for one program and not the other, that skews the ratio.
pub fn attach_both_as_in_production(datapath: &mut Datapath, ns: &Netns) -> Result<()> {
    attach_on_new_veth(ns, "bench-lb", |iface| datapath.attach(iface))?;
    attach_on_new_veth(ns, "bench-pass", |iface| {
        datapath
            .xdp_pass_program()?
            .attach(iface, XdpMode::Driver)?;
        Ok(())
    })
}

/// Makes a veth pair `name` / `<name>p` in `ns` (it goes when `ns` does) and runs `attach` with
/// `name` in `ns`: a place to attach a benchmarked XDP program.
pub fn attach_on_new_veth(
    ns: &Netns,
    name: &str,
    attach: impl FnOnce(&str) -> Result<()> + Send,
) -> Result<()> {
    let peer = format!("{name}p");
    ns.ip(&["link", "add", name, "type", "veth", "peer", "name", &peer])?;
    for end in [name, peer.as_str()] {
        ns.ip(&["link", "set", end, "up"])?;
    }
    crate::modes::in_netns(ns, || attach(name))
}

/// Runs `program` once on `frame`; returns the action and the output frame.
pub fn run(program: &mut Xdp, frame: &[u8]) -> (u32, Vec<u8>) {
    run_once(program, frame)
}

/// Runs `program` (XDP or TC) once on `frame`; returns its return value and the output frame
/// (with room to grow by 256 bytes, as encapsulation does).
fn run_once<P>(program: &P, frame: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// Runs the TC `program` once on `frame` (starting at its Ethernet header); returns the verdict.
pub fn run_tc(program: &mut SchedClassifier, frame: &[u8]) -> u32 {
    run_tc_frame(program, frame).0
}

/// Runs the TC `program` once on `frame`; returns the verdict and the output frame.
pub fn run_tc_frame(program: &mut SchedClassifier, frame: &[u8]) -> (u32, Vec<u8>) {
    run_once(program, frame)
}

/// Mean kernel-measured ns per run of `program` over `repeat` runs on `frame` (the kernel reruns
/// it on the same packet: right for programs that do not rewrite it).
pub fn tc_repeated_ns(program: &mut SchedClassifier, frame: &[u8], repeat: u32) -> f64 {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.repeat = repeat;
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    result.duration.as_nanos() as f64
}

/// This thread's CPU time in ns: unlike wall-clock time, it stops while other processes run.
fn thread_cpu_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// Fastest of three long `repeat` runs of an XDP program on `input`, in ns per iteration (for
/// paths that do not rewrite the packet). Timed as this thread's CPU time around the call: the
/// kernel reports whole nanoseconds per iteration, too coarse for a 5 ns program. The call's own
/// setup (a few microseconds) is nothing next to a million iterations, and CPU time leaves out
/// what other processes take, as the kernel's own timer does.
pub fn xdp_repeated_ns(program: &mut Xdp, input: &[u8], repeat: u32) -> f64 {
    let mut out = vec![0u8; input.len() + 256];
    (0..3)
        .map(|_| {
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(input);
            opts.data_out = Some(&mut out);
            opts.repeat = repeat;
            let start = thread_cpu_ns();
            program.test_run(opts).expect("test run");
            (thread_cpu_ns() - start) as f64 / repeat as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// Mean kernel-measured ns of `calls` `repeat = 1` runs of an XDP program, one per frame (frames
/// cycle), each as received on interface `ingress_ifindex` (0: none). Includes the fixed per-call
/// overhead, which the caller subtracts.
pub fn xdp_single_call_ns(
    program: &mut Xdp,
    frames: &[Vec<u8>],
    calls: u32,
    ingress_ifindex: u32,
) -> f64 {
    let mut total = 0u128;
    let mut out = vec![0u8; 2048];
    for i in 0..calls as usize {
        let frame = &frames[i % frames.len()];
        let md = xdp_md(frame, ingress_ifindex);
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        if ingress_ifindex != 0 {
            opts.ctx_in = Some(&md);
        }
        total += program
            .test_run(opts)
            .expect("test run")
            .duration
            .as_nanos();
    }
    total as f64 / calls as f64
}

/// The `struct xdp_md` context of a test run of `frame` received on `ingress_ifindex`: data,
/// data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
pub fn xdp_md(frame: &[u8], ingress_ifindex: u32) -> Vec<u8> {
    [0, frame.len() as u32, 0, ingress_ifindex, 0, 0]
        .iter()
        .flat_map(|w: &u32| w.to_ne_bytes())
        .collect()
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The backend the datapath must choose for a new flow `src → dst` of service `key`, computed in
/// userspace from the installed Maglev table and the shared packet hash.
pub fn expected_backend(
    datapath: &Datapath,
    key: &ServiceKey,
    protocol: u8,
    src: SocketAddr,
    dst: SocketAddr,
    source_ip_only: bool,
) -> SocketAddr {
    let table = datapath.table_of(key).expect("service programmed");
    let flow = flow_key(protocol, src, dst);
    let slot = maglev_slot(&flow, source_ip_only, table.len() as u32);
    let (ip, port): (IpAddr, u16) = table[slot as usize];
    SocketAddr::new(ip, if port == 0 { dst.port() } else { port })
}

/// The datapath's flow key for `src → dst`.
pub fn flow_key(protocol: u8, src: SocketAddr, dst: SocketAddr) -> FlowKey {
    FlowKey {
        src: Addr::from_ip(src.ip()),
        dst: Addr::from_ip(dst.ip()),
        src_port: src.port().to_be(),
        dst_port: dst.port().to_be(),
        protocol,
        family: family_of(src.ip()),
        _pad: [0; 2],
    }
}

/// Tracked flows, one map per family as the datapath keeps them.
pub struct Conntrack {
    /// `CONNTRACK_V4`'s entries (keys as the `FlowKey` they were built from).
    pub v4: StdHashMap<FlowKey, ConntrackEntry>,
    /// `CONNTRACK_V6`'s entries.
    pub v6: StdHashMap<FlowKey, ConntrackEntry>,
}

impl Conntrack {
    /// Reads the `CONNTRACK_V4` map `v4` and the `CONNTRACK_V6` map `v6`.
    pub fn read(v4: &Map, v6: &Map) -> Self {
        let v4: HashMap<_, FlowKeyV4, ConntrackEntry> =
            HashMap::try_from(v4).expect("CONNTRACK_V4 is a hash map of FlowKeyV4");
        let v6: HashMap<_, FlowKey, ConntrackEntry> =
            HashMap::try_from(v6).expect("CONNTRACK_V6 is a hash map of FlowKey");
        Self {
            v4: v4
                .iter()
                .map(|entry| entry.expect("CONNTRACK_V4 entry"))
                .map(|(key, entry)| (key.into(), entry))
                .collect(),
            v6: v6
                .iter()
                .map(|entry| entry.expect("CONNTRACK_V6 entry"))
                .collect(),
        }
    }

    /// Both families' entries, by flow.
    pub fn all(self) -> StdHashMap<FlowKey, ConntrackEntry> {
        self.v4.into_iter().chain(self.v6).collect()
    }
}

/// A socket address written as text, e.g. `"198.51.100.10:80"` (test constants).
pub fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// The value of `which` in a snapshot taken with `Datapath::counters`.
pub fn counter_in(counters: &[(Counter, u64)], which: Counter) -> u64 {
    counters
        .iter()
        .find(|(c, _)| *c == which)
        .expect("every counter is in the snapshot")
        .1
}

/// The datapath's counter `which` now.
pub fn counter(datapath: &Datapath, which: Counter) -> u64 {
    counter_in(&datapath.counters().expect("read counters"), which)
}

/// Services the datapath fixture suites share (`xdp_datapath`, `tc_datapath`), as YAML list items
/// for a `services:` list, so that a suite's config is `concat!`ed from them and its own services.
/// web (TCP, 3 backends, M = 251) and dns (UDP) on 198.51.100.10, web6 and dns6 (UDP, all ports
/// of one backend) on 2001:db8:100::10.
#[macro_export]
macro_rules! web_and_dns_services {
    () => {
        concat!(
            "  - name: web
    vip: 198.51.100.10
    port: 80
    protocol: tcp
    maglev_table_size: 251
    backends:
      - { address: 203.0.113.11, port: 8080 }
      - { address: 203.0.113.12, port: 8080 }
      - { address: 203.0.113.13, port: 8080 }
",
            $crate::dns_service!(),
            $crate::web6_service!(),
            "  - name: dns6
    vip: 2001:db8:100::10
    port: 53
    protocol: udp
    backends:
      - { address: 2001:db8:203::11, port: 0 }
"
        )
    };
}

/// Service `dns` of [`web_and_dns_services`] (UDP 53 on 198.51.100.10, two backends), as a YAML
/// list item, for suites whose other services differ.
#[macro_export]
macro_rules! dns_service {
    () => {
        "  - name: dns
    vip: 198.51.100.10
    port: 53
    protocol: udp
    backends:
      - { address: 203.0.113.11, port: 5353 }
      - { address: 203.0.113.12, port: 5353 }
"
    };
}

/// Service `web6` of [`web_and_dns_services`] (TCP 443 on 2001:db8:100::10, two backends), as a
/// YAML list item.
#[macro_export]
macro_rules! web6_service {
    () => {
        "  - name: web6
    vip: 2001:db8:100::10
    port: 443
    protocol: tcp
    backends:
      - { address: 2001:db8:203::11, port: 8443 }
      - { address: 2001:db8:203::12, port: 8443 }
"
    };
}

/// A datapath loaded with flow events `enabled` and `config` (YAML) applied, and its
/// `FLOW_EVENTS` ring buffer.
pub fn load_with_flow_events(config: &str, enabled: bool) -> (Datapath, RingBuf<MapData>) {
    let mut datapath = Datapath::load_with(&lb_agent::datapath::LoadOptions {
        flow_events: enabled,
        ..Default::default()
    })
    .expect("load datapath");
    datapath
        .apply(&lb_agent::config::Config::from_yaml(config).expect("config"))
        .expect("apply config");
    let ring = datapath.take_flow_events().expect("FLOW_EVENTS");
    (datapath, ring)
}

/// Every flow event waiting in `ring` (the datapath's `FLOW_EVENTS`, from
/// `Datapath::take_flow_events`), oldest first.
pub fn drain_flow_events(ring: &mut RingBuf<MapData>) -> Vec<FlowEvent> {
    let mut events = Vec::new();
    while let Some(record) = ring.next() {
        events.push(lb_agent::flow_events::decode(&record).expect("a whole FlowEvent"));
    }
    events
}

/// Checks that `event` reports the new flow `client → vip` (TCP/UDP: `protocol`) sent to
/// `backend` in `mode` for `choice` (`lb_common::flow_events::choice`), with the ids the
/// datapath's maps give its service and that backend.
pub fn assert_new_flow_event(
    datapath: &mut Datapath,
    event: &FlowEvent,
    (client, vip, protocol): (SocketAddr, SocketAddr, u8),
    backend: SocketAddr,
    (mode, choice): (u8, u8),
) {
    assert_eq!(event.kind, kind::NEW_FLOW, "{event:?}");
    assert_names_flow(datapath, event, (client, vip, protocol));
    assert_eq!((event.mode, event.choice, event.reason), (mode, choice, 0));
    assert_names_backend(datapath, event, backend);
}

/// Checks that `event` reports a packet `client → vip` dropped for `reason`.
pub fn assert_drop_event(
    datapath: &mut Datapath,
    event: &FlowEvent,
    (client, vip, protocol): (SocketAddr, SocketAddr, u8),
    reason: Counter,
) {
    assert_eq!(event.kind, kind::DROP, "{event:?}");
    assert_names_flow(datapath, event, (client, vip, protocol));
    assert_eq!(event.reason, reason as u8, "{event:?}");
    assert_eq!((event.backend_id, event.backend_port), (0, 0));
}

/// Checks that `event` is about the flow `client → vip` and names the service of `vip`.
fn assert_names_flow(
    datapath: &mut Datapath,
    event: &FlowEvent,
    (client, vip, protocol): (SocketAddr, SocketAddr, u8),
) {
    assert_eq!(event.flow, flow_key(protocol, client, vip), "{event:?}");
    assert_eq!(event.service_id, service_id(datapath, vip, protocol));
}

/// Checks that `event` names `backend`: its address and port, and the id `BACKENDS` gives it.
fn assert_names_backend(datapath: &mut Datapath, event: &FlowEvent, backend: SocketAddr) {
    assert_eq!(event.backend, Addr::from_ip(backend.ip()), "{event:?}");
    assert_eq!(u16::from_be(event.backend_port), backend.port());
    let backends: Array<_, Backend> =
        Array::try_from(datapath.ebpf_mut().map("BACKENDS").expect("BACKENDS")).unwrap();
    let by_id = backends
        .get(&event.backend_id, 0)
        .expect("backend id in BACKENDS");
    assert_eq!(by_id.ip(), backend.ip(), "backend id {}", event.backend_id);
}

/// The id of the service of `vip` (exact port) in the datapath's `SERVICES`.
fn service_id(datapath: &mut Datapath, vip: SocketAddr, protocol: u8) -> u32 {
    let services: HashMap<_, ServiceKey, ServiceInfo> =
        HashMap::try_from(datapath.ebpf_mut().map("SERVICES").expect("SERVICES")).unwrap();
    services
        .get(&ServiceKey::new(vip.ip(), vip.port(), protocol), 0)
        .expect("service of the VIP")
        .id
}

/// Services whose packets the fast path cannot deliver in a namespace set up by
/// [`UNDELIVERABLE_BACKENDS`]: DSR L2 to a backend without a neighbour entry (dropped,
/// `drop_dsr_no_neigh`) and DSR IPIP to one behind a 1280-byte MTU (a full-sized packet no longer
/// fits once encapsulated).
pub const UNDELIVERABLE_CONFIG: &str = "\
node: { ipv4: 203.0.113.1 }
services:
  - { name: l2, vip: 198.51.100.41, port: 80, protocol: tcp, mode: dsr-l2,
      backends: [{ address: 203.0.113.11, port: 80 }] }
  - { name: ipip, vip: 198.51.100.42, port: 80, protocol: tcp, mode: dsr-ipip,
      backends: [{ address: 203.0.113.12, port: 80 }] }
";

/// `ip` commands for [`UNDELIVERABLE_CONFIG`]: the backends on a veth of MTU 1280, no neighbour
/// entries (forwarding must be on as well).
pub const UNDELIVERABLE_BACKENDS: [&str; 5] = [
    "link set lo up",
    "link add tcv0 mtu 1280 type veth peer name tcv1",
    "link set tcv0 up",
    "link set tcv1 up",
    "addr add 203.0.113.1/24 dev tcv0",
];

/// Checks that `event` reports a packet `client → vip` of the flow Maglev sent to `backend` (in
/// `mode`) that did not go to it, for `reason`.
pub fn assert_not_forwarded_event(
    datapath: &mut Datapath,
    event: &FlowEvent,
    (client, vip, protocol): (SocketAddr, SocketAddr, u8),
    (backend, mode): (SocketAddr, u8),
    reason: Counter,
) {
    assert_eq!(event.kind, kind::NOT_FORWARDED, "{event:?}");
    assert_names_flow(datapath, event, (client, vip, protocol));
    assert_eq!(
        (event.mode, event.reason),
        (mode, reason as u8),
        "{event:?}"
    );
    assert_names_backend(datapath, event, backend);
}

/// What a balancer program returns for the three packets of
/// [`check_not_forwarded_after_the_choice`].
pub struct NotForwardedVerdicts {
    /// A DSR L2 SYN to a backend without a neighbour entry: dropped.
    pub no_neighbour: u32,
    /// A small DSR IPIP SYN: encapsulated and passed to the stack, which resolves the neighbour.
    pub small_ipip: u32,
    /// A full-sized DSR IPIP packet: answered with "fragmentation needed".
    pub too_big: u32,
}

/// The flow events of packets whose backend was chosen but that the fast path did not send to
/// it, for a program run by `run` (its verdict) in a namespace set up by [`UNDELIVERABLE_BACKENDS`]
/// (this turns forwarding on): with flow events on, each of the DSR L2 packet without neighbour and
/// the too-big IPIP one is reported after its new flow's choice, once, with that backend and the
/// counter that says why; the small IPIP packet only as a new flow; with them off, nothing. Either
/// way the packets get `verdicts` and the counters move once, and no event is lost.
pub fn check_not_forwarded_after_the_choice(
    run: impl Fn(&mut Datapath, &[u8]) -> u32,
    verdicts: NotForwardedVerdicts,
) {
    use crate::frames::{frame, ACK, SYN};
    use lb_common::{protocol, service::mode};

    std::fs::write("/proc/sys/net/ipv4/conf/all/forwarding", "1").expect("forwarding");
    let (l2, ipip) = (sa("198.51.100.41:80"), sa("198.51.100.42:80"));
    let (l2_backend, ipip_backend) = (sa("203.0.113.11:80"), sa("203.0.113.12:80"));
    let (client, big_client) = (sa("192.0.2.2:45100"), sa("192.0.2.2:45101"));
    let tcp = protocol::TCP;
    for enabled in [true, false] {
        let (mut datapath, mut ring) = load_with_flow_events(UNDELIVERABLE_CONFIG, enabled);
        let mut sent = |datapath: &mut Datapath, input: Vec<u8>, verdict, what: &str| {
            assert_eq!(run(datapath, &input), verdict, "{what}");
            drain_flow_events(&mut ring)
        };
        let no_neigh = sent(
            &mut datapath,
            frame(SYN, client, l2, b""),
            verdicts.no_neighbour,
            "DSR L2 without neighbour",
        );
        let small = sent(
            &mut datapath,
            frame(SYN, client, ipip, b""),
            verdicts.small_ipip,
            "small DSR IPIP",
        );
        let too_big = sent(
            &mut datapath,
            frame(ACK, big_client, ipip, &[7; 1400]),
            verdicts.too_big,
            "DSR IPIP too big",
        );
        assert_eq!(counter(&datapath, Counter::DropDsrNoNeigh), 1);
        assert_eq!(counter(&datapath, Counter::IcmpTooBigSent), 1);
        let not_forwarded = |events: &[FlowEvent]| {
            events
                .iter()
                .filter(|e| e.kind == kind::NOT_FORWARDED)
                .copied()
                .collect::<Vec<_>>()
        };
        if !enabled {
            assert_eq!((no_neigh, small, too_big), (vec![], vec![], vec![]));
            continue;
        }
        // Each: the new flow's choice, then (but for the small one) what became of the packet.
        assert_eq!(small.len(), 1, "{small:?}");
        assert_eq!(
            (no_neigh.len(), too_big.len()),
            (2, 2),
            "{no_neigh:?} {too_big:?}"
        );
        assert_eq!(not_forwarded(&small), []);
        assert_not_forwarded_event(
            &mut datapath,
            &not_forwarded(&no_neigh)[0],
            (client, l2, tcp),
            (l2_backend, mode::DSR_L2),
            Counter::DropDsrNoNeigh,
        );
        assert_not_forwarded_event(
            &mut datapath,
            &not_forwarded(&too_big)[0],
            (big_client, ipip, tcp),
            (ipip_backend, mode::DSR_IPIP),
            Counter::IcmpTooBigSent,
        );
        assert_eq!(counter(&datapath, Counter::FlowEventsLost), 0);
    }
}
