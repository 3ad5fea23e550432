//! `cargo xtask bench`: per-packet cost of the datapath paths through BPF_PROG_TEST_RUN, each as a
//! ratio to a trivial XDP_PASS program measured in the same run, Maglev table build times, and the
//! agent's reconcile time and memory for a datapath full of services (`--only reconcile`; see
//! [`reconcile`]), and the policy check's cost against rule counts (`lb_tests::policy_bench`;
//! `--only policy`), and the forwarding modes' per-packet cost inside a topology
//! (`lb_tests::modes_bench`; `--only modes`). Prints tables and writes JSON to target/bench/bench.json.
//!
//! How the per-packet figures are made. With `repeat` > 1 the kernel reruns the program on the
//! buffer the previous iteration rewrote, so only paths that do not rewrite (non-VIP pass) are timed
//! that way. Rewriting paths are timed with many `repeat = 1` calls; each such call's reported
//! duration includes a fixed per-call overhead (timer reads, setup) which is measured on the
//! XDP_PASS program both ways (repeat = 1 calls vs one long repeat) and subtracted. Each path's
//! counter must have grown by exactly the number of calls, or the bench fails: the figure is for the
//! path it claims. Both programs are attached to interfaces while measured, so the kernel calls
//! them as it calls an attached XDP program (`test_run::attach_both_as_in_production`).
//!
//! The machine is shared, so the per-packet measurement runs `--rounds N` times (default 3), each
//! round with its own baseline, and the tables show per-path medians of the rounds' ratios.
//! `--only per-packet` runs that section alone.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Instant,
};

use anyhow::{ensure, Context, Result};
use aya::programs::xdp::XdpMode;
use clap::{Parser, ValueEnum};
use lb_agent::{
    config::{self, Config},
    datapath::{ApplyReport, Datapath, LoadOptions, FLOOR_INSERT_PROGRAM, FLOOR_LOOKUP_PROGRAM},
    desired::Desired,
    maglev::{self, MaglevBackend},
};
use lb_common::counters::Counter;
use lb_tests::{
    frames::{frame, ACK, SYN},
    memory,
    netns::{Netns, BENCH_PREFIX},
    test_run::{
        attach_both_as_in_production, attach_on_new_veth, counter, median, run, sa,
        xdp_repeated_ns, xdp_single_call_ns, XDP_PASS,
    },
};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Datapath per-packet cost, Maglev build times, reconcile time and memory")]
struct Args {
    /// Rounds of the per-packet measurement (medians are reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Sections to run, comma-separated [default: all].
    #[arg(long, value_delimiter = ',')]
    only: Vec<Section>,
    /// Services of the reconcile benchmark.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Backends per service of the reconcile benchmark.
    #[arg(long, default_value_t = 10)]
    backends_per_service: usize,
    /// Maglev table size of the reconcile benchmark's services (a prime; M >= 100 x backends).
    #[arg(long, default_value_t = 1021)]
    table_size: u32,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/bench.json")]
    json: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    PerPacket,
    Modes,
    Maglev,
    Reconcile,
    Policy,
}

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
      - { address: 203.0.113.14, port: 8080 }
  # Its own backend: a conntrack hit rewrites the frame to what it was, so a long repeat reruns
  # the same hit (the steady-state row).
  - name: identity
    vip: 198.51.100.20
    port: 80
    protocol: tcp
    backends:
      - { address: 198.51.100.20, port: 80 }
";

/// Calls for the `repeat = 1` measurements and iterations of the long repeats.
const CALLS: u32 = 20_000;
const REPEAT: u32 = 1_000_000;

/// One round's measured rows (path, ns per packet, method).
type Rows = Vec<(&'static str, f64, &'static str)>;

/// One round's baseline and rows.
struct Round {
    pass_ns: f64,
    overhead_ns: f64,
    rows: Rows,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {} cores, kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel.trim()
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    let run = |section| args.only.is_empty() || args.only.contains(&section);
    let machine = machine();
    println!("Machine: {machine}");
    println!();
    let mut report = json!({ "machine": machine });
    if run(Section::PerPacket) {
        report["per_packet"] = per_packet(args.rounds as usize)?;
    }
    if run(Section::Modes) {
        report["modes"] = lb_tests::modes_bench::run(args.rounds as usize)?;
    }
    if run(Section::Maglev) {
        report["maglev_build"] = maglev_build()?;
    }
    if run(Section::Reconcile) {
        report["reconcile"] = reconcile(&args)?;
    }
    if run(Section::Policy) {
        report["policy"] = lb_tests::policy_bench::run(REPEAT)?;
    }
    if let Some(dir) = args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)?;
    println!();
    println!("JSON: {}", args.json.display());
    Ok(())
}

/// Per-packet cost of each path against XDP_PASS: `rounds` rounds, medians reported.
fn per_packet(rounds: usize) -> Result<Value> {
    let mut datapath = Datapath::load_with(&LoadOptions {
        conntrack_entries: 1 << 20,
        ..Default::default()
    })?;
    datapath.apply(&Config::from_yaml(CONFIG)?)?;
    let namespace = Netns::new(BENCH_PREFIX, "per-packet")?;
    attach_both_as_in_production(&mut datapath, &namespace)?;
    // The floor programs too, so that the kernel calls them as it calls the others.
    for (iface, program) in [
        ("bench-fins", FLOOR_INSERT_PROGRAM),
        ("bench-flook", FLOOR_LOOKUP_PROGRAM),
    ] {
        attach_on_new_veth(&namespace, iface, |iface| {
            datapath
                .bench_program(program)?
                .attach(iface, XdpMode::Driver)?;
            Ok(())
        })?;
    }

    println!("Per-packet cost, BPF_PROG_TEST_RUN ({REPEAT} repeats / {CALLS} single calls), {rounds} rounds:");
    let mut all = Vec::new();
    for round in 0..rounds {
        let r = measure_round(&mut datapath, round)?;
        println!(
            "  round {}: XDP_PASS {:.2} ns (repeat), per-call overhead {:.1} ns; {}",
            round + 1,
            r.pass_ns,
            r.overhead_ns,
            r.rows
                .iter()
                .map(|(_, ns, _)| format!("{:.1}", ns / r.pass_ns))
                .collect::<Vec<_>>()
                .join(" ")
        );
        all.push(r);
    }
    let pass_ns = median(all.iter().map(|r| r.pass_ns).collect());
    let overhead = median(all.iter().map(|r| r.overhead_ns).collect());
    println!();
    println!(
        "  XDP_PASS baseline: {pass_ns:.2} ns per packet (repeat); per-call overhead of repeat=1 calls: {overhead:.1} ns (medians)"
    );
    println!(
        "  {:<48} {:>10} {:>12}  method (medians of {rounds} rounds)",
        "path", "ns/packet", "x XDP_PASS"
    );
    let mut json_rows = Vec::new();
    for (i, (path, _, method)) in all[0].rows.iter().enumerate() {
        let ns = median(all.iter().map(|r| r.rows[i].1).collect());
        let ratio = median(all.iter().map(|r| r.rows[i].1 / r.pass_ns).collect());
        println!("  {path:<48} {ns:>10.1} {ratio:>12.2}  {method}");
        let per_round: Vec<f64> = all.iter().map(|r| r.rows[i].1 / r.pass_ns).collect();
        json_rows.push(json!({"path": path, "ns_per_packet": ns, "ratio_to_xdp_pass": ratio, "ratios_per_round": per_round, "method": method}));
    }
    println!();

    Ok(json!({
        "rounds": rounds,
        "xdp_pass_ns": pass_ns,
        "per_call_overhead_ns": overhead,
        "paths": json_rows,
    }))
}

/// One round of every per-packet measurement; `round` keeps its fresh flows apart from earlier
/// rounds' (other source addresses).
fn measure_round(datapath: &mut Datapath, round: usize) -> Result<Round> {
    // Baseline: XDP_PASS, both ways.
    let non_vip = frame(SYN, sa("192.0.2.2:40000"), sa("198.51.100.99:80"), b"");
    let pass = datapath.xdp_pass_program()?;
    let pass_repeat = xdp_repeated_ns(pass, &non_vip, REPEAT);
    let pass_single = xdp_single_call_ns(pass, std::slice::from_ref(&non_vip), CALLS, 0);
    let overhead = pass_single - pass_repeat;

    let mut rows = Rows::new();

    // Non-VIP traffic (no rewrite): one long repeat.
    let before = counter(datapath, Counter::PassNotService);
    let ns = xdp_repeated_ns(datapath.xdp_program(), &non_vip, REPEAT);
    ensure!(
        counter(datapath, Counter::PassNotService) - before == 3 * REPEAT as u64,
        "non-VIP path not taken every time"
    );
    rows.push(("non-VIP pass (IPv4 TCP)", ns, "repeat"));

    let non_vip6 = frame(
        SYN,
        sa("[2001:db8:2::2]:40000"),
        sa("[2001:db8:100::99]:80"),
        b"",
    );
    let before = counter(datapath, Counter::PassNotService);
    let ns = xdp_repeated_ns(datapath.xdp_program(), &non_vip6, REPEAT);
    ensure!(
        counter(datapath, Counter::PassNotService) - before == 3 * REPEAT as u64,
        "non-VIP path not taken every time"
    );
    rows.push(("non-VIP pass (IPv6 TCP)", ns, "repeat"));

    let client = sa("192.0.2.2:40000");
    let vip = sa("198.51.100.10:80");
    let syn = frame(SYN, client, vip, b"");
    let ack = frame(ACK, client, vip, b"");
    let flow = lb_tests::test_run::flow_key(lb_common::protocol::TCP, client, vip);
    let (_, first) = lb_tests::test_run::run(datapath.xdp_program(), &syn);
    let backend = lb_tests::frames::inspect(&first).dst;
    let reply_key = lb_tests::test_run::flow_key(lb_common::protocol::TCP, backend, client);

    // VIP, new flow: SYNs of flows never seen before (distinct source addresses and ports), so
    // every call misses conntrack and inserts, as a burst of new connections would.
    let new_flows: Vec<Vec<u8>> = (0..CALLS)
        .map(|i| {
            let src =
                std::net::Ipv4Addr::new(192, 0, 2, 100 + (round as u32 * 2 + i / 50000) as u8);
            frame(
                SYN,
                SocketAddr::new(src.into(), 10000 + (i % 50000) as u16),
                vip,
                b"",
            )
        })
        .collect();
    let before = counter(datapath, Counter::ForwardNewFlow);
    let ns = xdp_single_call_ns(datapath.xdp_program(), &new_flows, CALLS, 0) - overhead;
    ensure!(
        counter(datapath, Counter::ForwardNewFlow) - before == CALLS as u64,
        "new-flow path not taken every time"
    );
    rows.push((
        "VIP new flow, 20000 fresh flows (cold entries)",
        ns,
        "repeat=1 calls",
    ));

    // VIP, new flow with warm caches: the same SYN each call, its conntrack entry removed between
    // calls (outside the timed region).
    let before = counter(datapath, Counter::ForwardNewFlow);
    let mut total = 0.0;
    for _ in 0..CALLS {
        datapath.forget_flow(&flow, &reply_key)?;
        total += xdp_single_call_ns(datapath.xdp_program(), std::slice::from_ref(&syn), 1, 0);
    }
    ensure!(
        counter(datapath, Counter::ForwardNewFlow) - before == CALLS as u64,
        "new-flow path not taken every time"
    );
    rows.push((
        "VIP new flow, one flow re-created (warm)",
        total / CALLS as f64 - overhead,
        "repeat=1 calls",
    ));

    // VIP, conntrack hit: the same ACK each call.
    let before = counter(datapath, Counter::ForwardConntrackHit);
    let ns =
        xdp_single_call_ns(datapath.xdp_program(), std::slice::from_ref(&ack), CALLS, 0) - overhead;
    ensure!(
        counter(datapath, Counter::ForwardConntrackHit) - before == CALLS as u64,
        "conntrack-hit path not taken every time"
    );
    rows.push(("VIP conntrack hit (DNAT)", ns, "repeat=1 calls"));

    // The same hit in a long repeat, as back-to-back packets run: the `identity` service's
    // backend is its VIP, so the rewrite writes the frame's own bytes and every rerun is the
    // same hit. The repeat=1 calls above run after a syscall each, with colder caches.
    let identity = frame(ACK, client, sa("198.51.100.20:80"), b"");
    lb_tests::test_run::run(
        datapath.xdp_program(),
        &frame(SYN, client, sa("198.51.100.20:80"), b""),
    );
    let before = counter(datapath, Counter::ForwardConntrackHit);
    let ns = xdp_repeated_ns(datapath.xdp_program(), &identity, REPEAT);
    ensure!(
        counter(datapath, Counter::ForwardConntrackHit) - before == 3 * REPEAT as u64,
        "steady-state conntrack-hit path not taken every time"
    );
    rows.push((
        "VIP conntrack hit, steady state (identity DNAT)",
        ns,
        "repeat",
    ));

    // Reply path: backend → client of that flow.
    let reply = frame(ACK, backend, client, b"");
    let before = counter(datapath, Counter::ReplyTranslated);
    let ns = xdp_single_call_ns(
        datapath.xdp_program(),
        std::slice::from_ref(&reply),
        CALLS,
        0,
    ) - overhead;
    ensure!(
        counter(datapath, Counter::ReplyTranslated) - before == CALLS as u64,
        "reply path not taken every time"
    );
    rows.push(("reply from backend (reverse DNAT)", ns, "repeat=1 calls"));

    // The same conntrack hit over 20000 distinct flows: caches no longer hold every entry.
    let many: Vec<Vec<u8>> = (0..CALLS)
        .map(|i| {
            frame(
                ACK,
                SocketAddr::new(client.ip(), 1024 + (i % 60000) as u16),
                vip,
                b"",
            )
        })
        .collect();
    for f in &many {
        lb_tests::test_run::run(datapath.xdp_program(), f);
    }
    let before = counter(datapath, Counter::ForwardConntrackHit);
    let ns = xdp_single_call_ns(datapath.xdp_program(), &many, CALLS, 0) - overhead;
    ensure!(
        counter(datapath, Counter::ForwardConntrackHit) - before == CALLS as u64,
        "conntrack-hit path not taken every time"
    );
    rows.push((
        "VIP conntrack hit, 20000 flows round robin",
        ns,
        "repeat=1 calls",
    ));

    measure_floors(datapath, &non_vip, overhead, &mut rows)?;

    Ok(Round {
        pass_ns: pass_repeat,
        overhead_ns: overhead,
        rows,
    })
}

/// The floor rows: what the kernel's `CONNTRACK_V4` costs by itself, one insert (under every new
/// flow) and one lookup hit (under every tracked packet), timed by the methods of the rows they
/// bound. Their programs do nothing else (`lb-ebpf/src/floor.rs`).
fn measure_floors(
    datapath: &mut Datapath,
    frame: &[u8],
    overhead: f64,
    rows: &mut Rows,
) -> Result<()> {
    let any = sa("0.0.0.0:0");
    let floor_key = lb_tests::test_run::flow_key(0, any, any);
    let frames = [frame.to_vec()];
    // Warm, as the warm new-flow row: the key removed after each call (outside the timed region),
    // which also shows that the call inserted it.
    datapath.forget_flow(&floor_key, &floor_key)?;
    let mut total = 0.0;
    let mut inserted = 0;
    for _ in 0..CALLS {
        total += xdp_single_call_ns(datapath.bench_program(FLOOR_INSERT_PROGRAM)?, &frames, 1, 0);
        inserted += datapath.forget_flow(&floor_key, &floor_key)? as u32;
    }
    ensure!(
        inserted == CALLS,
        "floor insert: {inserted} of {CALLS} calls inserted"
    );
    rows.push((
        "floor: one CONNTRACK_V4 insert alone (warm)",
        total / CALLS as f64 - overhead,
        "repeat=1 calls",
    ));

    // Lookups of the key the insert program leaves in place.
    let (action, _) = run(datapath.bench_program(FLOOR_INSERT_PROGRAM)?, frame);
    ensure!(action == XDP_PASS, "floor insert failed");
    let lookup = datapath.bench_program(FLOOR_LOOKUP_PROGRAM)?;
    let ns = xdp_single_call_ns(lookup, &frames, CALLS, 0) - overhead;
    rows.push((
        "floor: one CONNTRACK_V4 lookup hit alone",
        ns,
        "repeat=1 calls",
    ));
    let ns = xdp_repeated_ns(lookup, frame, REPEAT);
    rows.push((
        "floor: one CONNTRACK_V4 lookup hit alone, back to back",
        ns,
        "repeat",
    ));
    // The lookup program aborts on a miss; the key is still there, so every call hit.
    ensure!(run(lookup, frame).0 == XDP_PASS, "floor lookup missed");
    datapath.forget_flow(&floor_key, &floor_key)?;
    Ok(())
}

/// Maglev table build times (userspace), printed and returned as JSON rows.
fn maglev_build() -> Result<Value> {
    println!("Maglev table build time (userspace, release build):");
    println!(
        "  {:>9} {:>9} {:>9} {:>9}",
        "backends", "M=16381", "M=65537", "M=131071"
    );
    let mut maglev_rows = Vec::new();
    for n in [10u64, 100, 1000] {
        let backends: Vec<MaglevBackend> = (0..n)
            .map(|i| MaglevBackend {
                id: 0x0a00_0000 + i,
                weight: 1,
            })
            .collect();
        let mut line = format!("  {n:>9}");
        for m in [16381u32, 65537, 131071] {
            let runs = 5;
            let start = Instant::now();
            for seed in 0..runs {
                std::hint::black_box(maglev::build_table(&backends, m, seed)?);
            }
            let ms = start.elapsed().as_secs_f64() * 1000.0 / runs as f64;
            line += &format!(" {:>7.2}ms", ms);
            maglev_rows.push(json!({"backends": n, "table_size": m, "ms": ms}));
        }
        println!("{line}");
    }
    println!();
    Ok(json!(maglev_rows))
}

/// The reconcile benchmark's services: `n` TCP services (VIPs in 198.51.100.0/24, ports from
/// 1000), each with `per_service` backends of its own (addresses in 203.0.113.0/24, ports from
/// 20000).
fn many_services(n: usize, per_service: usize, table_size: u32) -> Vec<config::Service> {
    (0..n)
        .map(|i| {
            let backends = (0..per_service)
                .map(|j| {
                    let k = i * per_service + j;
                    config::BackendConfig {
                        address: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1 + (k % 250) as u8)),
                        port: 20000 + (k / 250) as u16,
                        weight: 1,
                    }
                })
                .collect();
            let yaml = format!(
                "{{name: svc-{i}, vip: 198.51.100.{}, port: {}, protocol: tcp, maglev_table_size: {table_size}}}",
                i % 256,
                1000 + i / 256
            );
            let mut service: config::Service = serde_yaml_ng::from_str(&yaml).expect("service");
            service.backends = backends;
            service
        })
        .collect()
}

/// Map writes (`bpf()` calls) an apply made: each swapped table is written whole into a new inner
/// map (one batch write) and then placed in `MAGLEV_TABLES` (one more).
fn map_writes(report: &ApplyReport) -> usize {
    report.backends_written
        + report.backends_removed
        + report.services_written
        + report.services_removed
        + report.tables_swapped * 2
}

/// What the agent does on every change of the desired state: merge the sources, validate, apply.
/// Returns the whole time and the apply's share (ms).
fn agent_reconcile(datapath: &mut Datapath, desired: &Desired) -> Result<(f64, f64, ApplyReport)> {
    let started = Instant::now();
    let config = desired.merged().config;
    config.validate()?;
    let applying = Instant::now();
    let report = datapath.apply(&config)?;
    let ms = |since: Instant| since.elapsed().as_secs_f64() * 1000.0;
    Ok((ms(started), ms(applying), report))
}

/// Reconcile time and memory: a full apply of `--services` x `--backends-per-service` into a
/// freshly loaded datapath, the same state again (nothing to write: what every health or
/// Kubernetes event that changes nothing costs), and one backend's weight changed. Memory: this
/// process's resident set (the agent's userspace state is the same library) and the kernel
/// memory of the maps (the program's maps, held by descriptors, plus the Maglev inner tables,
/// held by `MAGLEV_TABLES`).
fn reconcile(args: &Args) -> Result<Value> {
    let (n, per, m) = (args.services, args.backends_per_service, args.table_size);
    println!(
        "Reconcile: {n} services x {per} backends, Maglev M = {m}, through merge + validate + apply"
    );
    let last_id = memory::last_map_id();
    let rss_start = memory::rss_bytes("self").context("VmRSS")?;
    let mut datapath = Datapath::load()?;
    let rss_loaded = memory::rss_bytes("self").context("VmRSS")?;
    let (maps_loaded, _) = memory::maps_held_by("self");

    let mut desired = Desired::new(Config {
        services: many_services(n, per, m),
        ..Config::default()
    });
    let (full_ms, _, full) = agent_reconcile(&mut datapath, &desired)?;
    ensure!(
        full.services_written == n && full.tables_swapped == n && full.backends_written == n * per,
        "the full apply did not program everything: {full:?}"
    );
    let rss_full = memory::rss_bytes("self").context("VmRSS")?;
    let (maps_held, held_ids) = memory::maps_held_by("self");
    let (inner, inner_count) = memory::maps_created_after(last_id, 1 << 12, &held_ids);

    let (mut same, mut same_apply) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (ms, apply_ms, report) = agent_reconcile(&mut datapath, &desired)?;
        ensure!(
            report == ApplyReport::default(),
            "an unchanged state wrote {report:?}"
        );
        same.push(ms);
        same_apply.push(apply_ms);
    }
    let (mut one, mut one_apply) = (Vec::new(), Vec::new());
    let mut one_report = ApplyReport::default();
    for weight in [2, 1, 3] {
        desired.file.services[n / 2].backends[0].weight = weight;
        let (ms, apply_ms, report) = agent_reconcile(&mut datapath, &desired)?;
        ensure!(
            report.tables_swapped == 1 && report.backends_written == 0,
            "one weight changed: {report:?}"
        );
        one.push(ms);
        one_apply.push(apply_ms);
        one_report = report;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (same_ms, one_ms) = (median(&mut same), median(&mut one));
    let (same_apply_ms, one_apply_ms) = (median(&mut same_apply), median(&mut one_apply));
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let full_writes = map_writes(&full);
    let one_writes = map_writes(&one_report);
    println!("  full apply:                {full_ms:>9.1} ms  {full_writes} map writes ({full:?})");
    println!(
        "  same state again (median): {same_ms:>9.1} ms  (apply {same_apply_ms:.1} ms)  0 map writes"
    );
    println!(
        "  one weight changed (median): {one_ms:>7.1} ms  (apply {one_apply_ms:.1} ms)  {one_writes} map writes ({one_report:?})"
    );
    println!(
        "  resident set: {:.1} MiB at start, {:.1} MiB with the datapath loaded, {:.1} MiB programmed",
        mib(rss_start),
        mib(rss_loaded),
        mib(rss_full)
    );
    println!(
        "  BPF map memory: {:.1} MiB loaded, {:.1} MiB programmed + {:.1} MiB in {inner_count} Maglev inner tables",
        mib(maps_loaded),
        mib(maps_held),
        mib(inner)
    );
    Ok(json!({
        "services": n,
        "backends_per_service": per,
        "table_size": m,
        "full_apply_ms": full_ms,
        "full_apply_map_writes": full_writes,
        "unchanged_ms": same_ms,
        "unchanged_apply_ms": same_apply_ms,
        "one_weight_apply_ms": one_apply_ms,
        "one_weight_ms": one_ms,
        "one_weight_map_writes": one_writes,
        "rss_start_bytes": rss_start,
        "rss_loaded_bytes": rss_loaded,
        "rss_programmed_bytes": rss_full,
        "map_bytes_loaded": maps_loaded,
        "map_bytes_programmed": maps_held,
        "maglev_inner_bytes": inner,
        "maglev_inner_tables": inner_count,
    }))
}
