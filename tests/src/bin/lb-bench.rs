//! `cargo xtask bench`: per-packet cost of the datapath paths through BPF_PROG_TEST_RUN, each as a
//! ratio to a trivial XDP_PASS program measured in the same run, Maglev table build times, and the
//! policy check's cost against rule counts (`lb_tests::policy_bench`; `--policy-only` runs just that).
//! Prints tables and writes JSON to target/bench/bench.json.
//!
//! How the per-packet figures are made. With `repeat` > 1 the kernel reruns the program on the
//! buffer the previous iteration rewrote, so only paths that do not rewrite (non-VIP pass) are timed
//! that way. Rewriting paths are timed with many `repeat = 1` calls; each such call's reported
//! duration includes a fixed per-call overhead (timer reads, setup) which is measured on the
//! XDP_PASS program both ways (repeat = 1 calls vs one long repeat) and subtracted. Each path's
//! counter must have grown by exactly the number of calls, or the bench fails: the figure is for the
//! path it claims.

use std::{net::SocketAddr, time::Instant};

use anyhow::{ensure, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_agent::{
    config::Config,
    datapath::{Datapath, LoadOptions},
    maglev::{self, MaglevBackend},
};
use lb_common::counters::Counter;
use lb_tests::frames::{frame, ACK, SYN};
use serde_json::json;

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
";

/// Calls for the `repeat = 1` measurements and iterations of the long repeats.
const CALLS: u32 = 20_000;
const REPEAT: u32 = 1_000_000;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Mean kernel-measured ns per iteration of one long `repeat` run.
fn repeated_ns(program: &mut Xdp, input: &[u8], repeat: u32) -> f64 {
    let mut out = vec![0u8; input.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(input);
    opts.data_out = Some(&mut out);
    opts.repeat = repeat;
    let result = program.test_run(opts).expect("test run");
    result.duration.as_nanos() as f64
}

/// Mean kernel-measured ns of `repeat = 1` calls, one per frame (frames cycle).
fn single_call_ns(program: &mut Xdp, frames: &[Vec<u8>], calls: u32) -> f64 {
    let mut total = 0u128;
    let mut out = vec![0u8; 2048];
    for i in 0..calls as usize {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&frames[i % frames.len()]);
        opts.data_out = Some(&mut out);
        total += program
            .test_run(opts)
            .expect("test run")
            .duration
            .as_nanos();
    }
    total as f64 / calls as f64
}

/// Measured rows, printed as they come.
struct Rows(Vec<(&'static str, f64, &'static str)>, f64);

impl Rows {
    fn push(&mut self, row: (&'static str, f64, &'static str)) {
        let (path, ns, method) = row;
        println!("  {path:<48} {ns:>10.1} {:>12.2}  {method}", ns / self.1);
        self.0.push(row);
    }
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
    let machine = machine();
    println!("Machine: {machine}");
    println!();
    if std::env::args().any(|a| a == "--policy-only") {
        lb_tests::policy_bench::run(REPEAT)?;
        return Ok(());
    }

    let mut datapath = Datapath::load_with(&LoadOptions {
        conntrack_entries: 1 << 20,
    })?;
    datapath.apply(&Config::from_yaml(CONFIG)?)?;

    // Baseline: XDP_PASS, both ways.
    let non_vip = frame(SYN, sa("192.0.2.2:40000"), sa("198.51.100.99:80"), b"");
    let pass = datapath.xdp_pass_program()?;
    let pass_repeat = repeated_ns(pass, &non_vip, REPEAT);
    let pass_single = single_call_ns(pass, std::slice::from_ref(&non_vip), CALLS);
    let overhead = pass_single - pass_repeat;

    println!("Per-packet cost, BPF_PROG_TEST_RUN ({REPEAT} repeats / {CALLS} single calls):");
    println!(
        "  XDP_PASS baseline: {pass_repeat:.1} ns per packet (repeat); per-call overhead of repeat=1 calls: {overhead:.1} ns"
    );
    println!();
    println!(
        "  {:<48} {:>10} {:>12}  method",
        "path", "ns/packet", "x XDP_PASS"
    );
    let mut json_rows = Vec::new();
    let mut rows = Rows(Vec::new(), pass_repeat);

    // Non-VIP traffic (no rewrite): one long repeat.
    let before = counter(&datapath, Counter::PassNotService);
    let ns = repeated_ns(datapath.xdp_program(), &non_vip, REPEAT);
    ensure!(
        counter(&datapath, Counter::PassNotService) - before == REPEAT as u64,
        "non-VIP path not taken every time"
    );
    rows.push(("non-VIP pass (IPv4 TCP)", ns, "repeat"));

    let non_vip6 = frame(
        SYN,
        sa("[2001:db8:2::2]:40000"),
        sa("[2001:db8:100::99]:80"),
        b"",
    );
    let ns = repeated_ns(datapath.xdp_program(), &non_vip6, REPEAT);
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
            let src = std::net::Ipv4Addr::new(192, 0, 2, 100 + (i / 50000) as u8);
            frame(
                SYN,
                SocketAddr::new(src.into(), 10000 + (i % 50000) as u16),
                vip,
                b"",
            )
        })
        .collect();
    let before = counter(&datapath, Counter::ForwardNewFlow);
    let ns = single_call_ns(datapath.xdp_program(), &new_flows, CALLS) - overhead;
    ensure!(
        counter(&datapath, Counter::ForwardNewFlow) - before == CALLS as u64,
        "new-flow path not taken every time"
    );
    rows.push((
        "VIP new flow, 20000 fresh flows (cold entries)",
        ns,
        "repeat=1 calls",
    ));

    // VIP, new flow with warm caches: the same SYN each call, its conntrack entry removed between
    // calls (outside the timed region).
    let before = counter(&datapath, Counter::ForwardNewFlow);
    let mut total = 0.0;
    for _ in 0..CALLS {
        datapath.forget_flow(&flow, &reply_key)?;
        total += single_call_ns(datapath.xdp_program(), std::slice::from_ref(&syn), 1);
    }
    ensure!(
        counter(&datapath, Counter::ForwardNewFlow) - before == CALLS as u64,
        "new-flow path not taken every time"
    );
    rows.push((
        "VIP new flow, one flow re-created (warm)",
        total / CALLS as f64 - overhead,
        "repeat=1 calls",
    ));

    // VIP, conntrack hit: the same ACK each call.
    let before = counter(&datapath, Counter::ForwardConntrackHit);
    let ns = single_call_ns(datapath.xdp_program(), std::slice::from_ref(&ack), CALLS) - overhead;
    ensure!(
        counter(&datapath, Counter::ForwardConntrackHit) - before == CALLS as u64,
        "conntrack-hit path not taken every time"
    );
    rows.push(("VIP conntrack hit (DNAT)", ns, "repeat=1 calls"));

    // Reply path: backend → client of that flow.
    let reply = frame(ACK, backend, client, b"");
    let before = counter(&datapath, Counter::ReplyTranslated);
    let ns = single_call_ns(datapath.xdp_program(), std::slice::from_ref(&reply), CALLS) - overhead;
    ensure!(
        counter(&datapath, Counter::ReplyTranslated) - before == CALLS as u64,
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
    let before = counter(&datapath, Counter::ForwardConntrackHit);
    let ns = single_call_ns(datapath.xdp_program(), &many, CALLS) - overhead;
    ensure!(
        counter(&datapath, Counter::ForwardConntrackHit) - before == CALLS as u64,
        "conntrack-hit path not taken every time"
    );
    rows.push((
        "VIP conntrack hit, 20000 flows round robin",
        ns,
        "repeat=1 calls",
    ));

    for (path, ns, method) in &rows.0 {
        json_rows.push(json!({"path": path, "ns_per_packet": ns, "ratio_to_xdp_pass": ns / pass_repeat, "method": method}));
    }
    println!();

    // Maglev table build times.
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
    let policy = lb_tests::policy_bench::run(REPEAT)?;

    let out_dir = std::path::Path::new("target/bench");
    std::fs::create_dir_all(out_dir)?;
    let report = json!({
        "machine": machine,
        "xdp_pass_ns": pass_repeat,
        "per_call_overhead_ns": overhead,
        "per_packet": json_rows,
        "maglev_build": maglev_rows,
        "policy": policy,
    });
    std::fs::write(
        out_dir.join("bench.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!();
    println!("JSON: target/bench/bench.json");
    Ok(())
}
