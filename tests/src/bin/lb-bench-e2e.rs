//! End-to-end benchmark: the same traffic through the same veth topology (client — balancer node —
//! N backends), balanced in turn by nothing (baseline: the client talks straight to one backend,
//! routed by the balancer's kernel; baseline-spread: the same, with the client spreading over every
//! backend itself), kube-proxy's iptables mode, its nftables mode, HAProxy in TCP mode, and lb (the
//! real `lb-agent`, DNAT mode) attached as XDP (`lb`) and as TC (`lb-tc`). Workloads: TCP
//! connections/s (wrk with `Connection: close` against nginx), bulk TCP throughput both ways
//! (iperf3) and small-packet UDP (a `sendmmsg` sender; datagrams counted by `recvmmsg` receivers on
//! the backends).
//!
//! Every figure is also given as a ratio to the baseline measured in the same run. Rounds are
//! interleaved (the order reverses every round) and each cell reports the median over rounds.
//! Prints a table and writes JSON to target/bench/bench-e2e.json.
//!
//! Only one contender is active at a time: before each one the balancer namespace is checked for
//! leftovers (netfilter rules, a VIP on an interface, an XDP program); after activation, probes
//! through the VIP must reach several backends with the client address the contender implies, and
//! the contender's own counters must have seen the traffic.
//!
//! ```text
//! LB_AGENT_BIN=target/release/lb-agent target/release/lb-bench-e2e            # ~3.5 min
//! LB_AGENT_BIN=target/release/lb-agent target/release/lb-bench-e2e --quick    # ~30 s smoke run
//! ```
//! Then, edit to move (`--edits`, `--only-edits` for nothing else): the real agent with a watched
//! config file in a two-backend topology; the file is saved `--edits` times, switching the service
//! between backend 1 and backend 2, and each time the bench opens connections until one lands on
//! the new backend (as that backend's greeting says): p50/p99 of the time from the save.
//!
//! Diagnostics: `--contenders iptables,nftables,haproxy,lb,lb-idle` adds lb-agent attached with no
//! service under the baseline's traffic (what XDP on veth costs by itself); `--bpf-stats` reports
//! the XDP program's own ns per packet; `--wire-frames` turns TSO/GSO off on the senders so that
//! every contender sees MTU-sized frames, as from a physical link.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use lb_tests::{
    agent::AgentProcess,
    baselines::{self, BpfStats, Haproxy, Proto, Service},
    loadgen::{self, TempDir, UdpSink},
    netns::{Netns, BENCH_PREFIX},
    procs::{self, Server},
    servers::{tcp_requests, tcp_servers_on_backends, TcpCountingServer},
    topology::{Topology, CLIENT_ADDR, VIP},
};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    about = "End-to-end benchmark: lb against no balancer, kube-proxy (iptables, nftables) and HAProxy"
)]
struct Args {
    /// CI smoke run: one round, 1 s per TCP workload (wrk and iperf3 count whole seconds), 300 ms of
    /// UDP.
    #[arg(long)]
    quick: bool,
    /// Seconds per wrk and iperf3 measurement [default: 5, --quick: 1].
    #[arg(long)]
    seconds: Option<u64>,
    /// Milliseconds per UDP measurement [default: as --seconds, --quick: 300].
    #[arg(long)]
    udp_ms: Option<u64>,
    /// Rounds over all contenders; each cell is the median [default: 2, --quick: 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// Backends in the topology.
    #[arg(long, default_value_t = 4)]
    backends: usize,
    /// Contenders to run, comma-separated (baseline is always run: it is the reference). Also
    /// available: lb-idle (lb-agent attached with no service, baseline traffic: the cost of XDP on
    /// veth by itself).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "baseline-spread,iptables,nftables,haproxy,lb,lb-tc"
    )]
    contenders: Vec<String>,
    /// Workloads to run, comma-separated: cps, bulk-up, bulk-down, udp.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cps,bulk-up,bulk-down,udp"
    )]
    workloads: Vec<String>,
    /// wrk threads (baseline-spread takes at least one per backend; the default gives every
    /// contender that many with 4 backends).
    #[arg(long, default_value_t = 4)]
    wrk_threads: usize,
    /// wrk concurrent connections.
    #[arg(long, default_value_t = 50)]
    wrk_connections: usize,
    /// nginx worker processes per backend.
    #[arg(long, default_value_t = 2)]
    nginx_workers: usize,
    /// UDP flows (sender sockets, one source port each).
    #[arg(long, default_value_t = 64)]
    udp_flows: usize,
    /// Datagrams per sendmmsg call.
    #[arg(long, default_value_t = 64)]
    udp_batch: usize,
    /// UDP payload bytes.
    #[arg(long, default_value_t = 64)]
    udp_payload: usize,
    /// Receiver threads (SO_REUSEPORT sockets) per backend.
    #[arg(long, default_value_t = 2)]
    udp_receivers: usize,
    /// Diagnostic: turn on kernel.bpf_stats_enabled (machine-wide, restored at the end) and report
    /// the XDP program's own ns per packet for lb and lb-idle.
    #[arg(long)]
    bpf_stats: bool,
    /// Turn TSO and GSO off on the client's and the backends' eth0, so every contender gets
    /// MTU-sized frames as from a physical link. Otherwise veth carries 64 KB TSO frames end to end
    /// through the kernel's forwarding and NAT, which XDP cannot take: attaching XDP to a veth turns
    /// TSO off on its peer, so only lb's senders segment.
    #[arg(long)]
    wire_frames: bool,
    /// Niceness for the bench and everything it starts (servers, clients, agent), so that other
    /// work on a shared machine disturbs the measurements less; 0 leaves it alone.
    #[arg(long, default_value_t = -10, allow_hyphen_values = true)]
    nice: i32,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/bench-e2e.json")]
    json: PathBuf,
    /// Config file saves of the edit-to-move measurement (0 = skip it).
    #[arg(long, default_value_t = 20)]
    edits: usize,
    /// Only the edit-to-move measurement (JSON to target/bench/bench-edit.json).
    #[arg(long)]
    only_edits: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Contender {
    Baseline,
    /// No balancer either, but the client spreads over every backend itself (wrk thread i to
    /// backend i mod n, UDP flow i likewise): the same backend processes at work as behind a
    /// balancer. Bulk is one stream, to backend 1 as in the baseline.
    BaselineSpread,
    Iptables,
    Nftables,
    Haproxy,
    Lb,
    /// lb-agent with `--attach tc`: `lb_tc` at tcx ingress of every balancer interface.
    LbTc,
    /// Diagnostic, not run by default: lb-agent attached with no service, and the baseline's
    /// traffic (straight to backend 1). Measures what XDP on veth costs by itself.
    LbIdle,
}

const ALL_CONTENDERS: [Contender; 8] = [
    Contender::Baseline,
    Contender::BaselineSpread,
    Contender::Iptables,
    Contender::Nftables,
    Contender::Haproxy,
    Contender::Lb,
    Contender::LbTc,
    Contender::LbIdle,
];

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Baseline => "baseline",
            Contender::BaselineSpread => "baseline-spread",
            Contender::Iptables => "iptables",
            Contender::Nftables => "nftables",
            Contender::Haproxy => "haproxy",
            Contender::Lb => "lb",
            Contender::LbTc => "lb-tc",
            Contender::LbIdle => "lb-idle",
        }
    }

    /// Traffic goes straight to the backends (backend 1 unless spread), not to the VIP.
    fn direct(self) -> bool {
        matches!(
            self,
            Contender::Baseline | Contender::BaselineSpread | Contender::LbIdle
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    Cps,
    BulkUp,
    BulkDown,
    Udp,
}

const ALL_WORKLOADS: [Workload; 4] = [
    Workload::Cps,
    Workload::BulkUp,
    Workload::BulkDown,
    Workload::Udp,
];

impl Workload {
    fn id(self) -> &'static str {
        match self {
            Workload::Cps => "cps",
            Workload::BulkUp => "bulk-up",
            Workload::BulkDown => "bulk-down",
            Workload::Udp => "udp",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Workload::Cps => "TCP connections/s (wrk, Connection: close)",
            Workload::BulkUp => "TCP bulk client->backend, Gbit/s (iperf3)",
            Workload::BulkDown => "TCP bulk backend->client, Gbit/s (iperf3 -R)",
            Workload::Udp => "UDP small packets, received pkt/s",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Workload::Cps => "connections/s",
            Workload::BulkUp | Workload::BulkDown => "Gbit/s",
            Workload::Udp => "packets/s",
        }
    }

    fn applies_to(self, c: Contender) -> bool {
        !(self == Workload::Udp && c == Contender::Haproxy)
    }
}

const WEB_PORT: u16 = 80;
const NGINX_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
const UDP_PORT: u16 = 9000;

fn services() -> Vec<Service> {
    vec![
        Service {
            name: "web",
            proto: Proto::Tcp,
            vip_port: WEB_PORT,
            backend_port: NGINX_PORT,
            affinity: false,
        },
        // iperf3 opens a control and a data connection that must reach the same server:
        // client-IP affinity, as a Kubernetes Service would need (sessionAffinity: ClientIP).
        Service {
            name: "bulk",
            proto: Proto::Tcp,
            vip_port: IPERF_PORT,
            backend_port: IPERF_PORT,
            affinity: true,
        },
        Service {
            name: "udp",
            proto: Proto::Udp,
            vip_port: UDP_PORT,
            backend_port: UDP_PORT,
            affinity: false,
        },
    ]
}

struct Settings {
    seconds: u64,
    udp: Duration,
    rounds: usize,
}

/// One measurement: the figure, and what else was seen (errors, spread, retransmits).
struct Sample {
    value: f64,
    details: Value,
}

/// A workload's sample, or why there is none.
type Outcome = (Workload, Result<Sample, String>);

/// Servers on the backends, alive for the whole run.
struct Backends {
    nginx: Vec<Result<Server, String>>,
    iperf: Vec<Result<Server, String>>,
    udp: Vec<UdpSink>,
    addrs: Vec<Ipv4Addr>,
}

/// Kills whatever still runs in the bench's namespaces when dropped (before the topology is).
struct Sweep(Vec<String>);

impl Drop for Sweep {
    fn drop(&mut self) {
        for ns in &self.0 {
            procs::kill_all_in(ns);
        }
    }
}

fn main() {
    procs::install_interrupt_handler();
    match run() {
        Ok(()) => {}
        Err(e) => {
            eprintln!("lb-bench-e2e: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    let settings = Settings {
        seconds: args
            .seconds
            .unwrap_or(if args.quick { 1 } else { 5 })
            .max(1),
        udp: Duration::from_millis(args.udp_ms.unwrap_or(if args.quick {
            300
        } else {
            args.seconds.unwrap_or(5) * 1000
        })),
        rounds: args.rounds.unwrap_or(if args.quick { 1 } else { 2 }).max(1),
    };
    let contenders: Vec<Contender> = std::iter::once(Ok(Contender::Baseline))
        .chain(args.contenders.iter().map(|c| {
            ALL_CONTENDERS
                .iter()
                .copied()
                .find(|k| k.name() == c.trim())
                .with_context(|| format!("unknown contender {c:?}"))
        }))
        .collect::<Result<BTreeSet<_>>>()?
        .into_iter()
        .collect();
    let workloads: Vec<Workload> = args
        .workloads
        .iter()
        .map(|w| {
            ALL_WORKLOADS
                .iter()
                .copied()
                .find(|k| k.id() == w.trim())
                .with_context(|| format!("unknown workload {w:?}"))
        })
        .collect::<Result<BTreeSet<_>>>()?
        .into_iter()
        .collect();
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "run as root: the bench creates network namespaces and loads eBPF"
    );
    if args.nice != 0 {
        // Linux applies this to the calling thread; threads and processes started later inherit it.
        // SAFETY: setpriority has no memory-safety preconditions.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, args.nice) } != 0 {
            eprintln!(
                "lb-bench-e2e: setpriority({}): {}",
                args.nice,
                std::io::Error::last_os_error()
            );
        }
    }
    let started = Instant::now();
    let machine = machine();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("Machine: {machine}");
    println!(
        "Load average at start: {}",
        load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if !args.only_edits {
        println!(
            "Settings: {} round(s), {} s per wrk/iperf3 run, {} ms per UDP run, {} backends",
            settings.rounds,
            settings.seconds,
            settings.udp.as_millis(),
            args.backends
        );
    }

    let _bpf_stats = if args.bpf_stats {
        Some(BpfStats::enable().context("enabling kernel.bpf_stats_enabled")?)
    } else {
        None
    };
    procs::kill_orphans_of_dead_runs(BENCH_PREFIX);
    if args.only_edits {
        let report = json!({ "machine": machine, "edit_to_move": edit_to_move(args.edits)? });
        let path = args.json.with_file_name("bench-edit.json");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        println!("JSON: {}", path.display());
        return Ok(());
    }
    let dir = TempDir::new("bench-e2e")?;
    let topo = Topology::new(BENCH_PREFIX, args.backends)?;
    let _sweep = Sweep(
        [topo.client.name(), topo.balancer.name()]
            .into_iter()
            .chain(topo.backends.iter().map(|b| b.ns.name()))
            .map(String::from)
            .collect(),
    );
    tune(&topo, args.wire_frames)?;
    let backends = start_backends(&topo, &args, &settings, &dir, &workloads)?;
    // Forwarding works and every neighbour is resolved before anything is timed.
    for (i, b) in topo.backends.iter().enumerate() {
        if backends.nginx[i].is_ok() {
            let body = loadgen::http_get(
                &topo.client,
                SocketAddr::from((b.addr, NGINX_PORT)),
                Duration::from_secs(3),
            )
            .with_context(|| format!("direct probe of backend {}", i + 1))?;
            let (_, client) = loadgen::parse_probe(&body);
            ensure!(
                client == CLIENT_ADDR.to_string(),
                "backend {} saw client {client}",
                i + 1
            );
        }
    }

    let mut samples: BTreeMap<(Workload, Contender), Vec<Result<Sample, String>>> = BTreeMap::new();
    let mut checks: Vec<Value> = Vec::new();
    for round in 0..settings.rounds {
        let order: Vec<Contender> = if round % 2 == 0 {
            contenders.clone()
        } else {
            contenders.iter().rev().copied().collect()
        };
        for &c in &order {
            procs::check_interrupted()?;
            println!("round {}/{}: {} ...", round + 1, settings.rounds, c.name());
            let (results, check) =
                run_contender(c, &topo, &backends, &args, &settings, &dir, &workloads);
            let mut failed: Vec<(String, Vec<&str>)> = Vec::new();
            for (w, r) in &results {
                if let Err(e) = r {
                    match failed.iter_mut().find(|(m, _)| m == e) {
                        Some((_, ws)) => ws.push(w.id()),
                        None => failed.push((e.clone(), vec![w.id()])),
                    }
                }
            }
            for (e, ws) in failed {
                println!("  {} ({}): {}", c.name(), ws.join(", "), shorten(&e));
            }
            for (w, r) in results {
                samples.entry((w, c)).or_default().push(r);
            }
            let mut check = check;
            check["round"] = json!(round + 1);
            checks.push(check);
        }
    }

    drop(backends);
    drop(_sweep);
    drop(topo);
    let edits = if args.edits > 0 {
        edit_to_move(args.edits)?
    } else {
        Value::Null
    };
    let elapsed = started.elapsed().as_secs_f64();
    report(
        &args,
        &settings,
        &machine,
        &load_before,
        &contenders,
        &workloads,
        &samples,
        &checks,
        edits,
        elapsed,
    )
}

/// Namespace-local sysctls for a connection-rate test: ports and backlogs that do not run out.
fn tune(topo: &Topology, wire_frames: bool) -> Result<()> {
    if wire_frames {
        for ns in std::iter::once(&topo.client).chain(topo.backends.iter().map(|b| &b.ns)) {
            ns.exec("ethtool", &["-K", "eth0", "tso", "off", "gso", "off"])?;
        }
    }
    for ns in [&topo.client, &topo.balancer] {
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    }
    for b in &topo.backends {
        // One client cycling through its ports at tens of thousands of connections/s meets the
        // backends' TIME_WAIT sockets of the same 4-tuples; with balancing (or XDP on the veths)
        // some of its SYNs then fail PAWS in TIME_WAIT and are retransmitted, in the baseline
        // none. Many clients would not collide: keep no TIME_WAIT on the backends, so the
        // connection rate measures the path. (Client SYN retransmits are reported per run.)
        b.ns.sysctl("net.ipv4.tcp_max_tw_buckets", "0")?;
        b.ns.sysctl("net.core.somaxconn", "4096")?;
        b.ns.sysctl("net.ipv4.tcp_max_syn_backlog", "4096")?;
    }
    Ok(())
}

fn require(tool: &str, package: &str) -> Result<()> {
    if !procs::have(tool) {
        bail!(
            "{tool} is not installed (Debian package {package}; `cargo xtask bench` installs it)"
        );
    }
    Ok(())
}

fn start_backends(
    topo: &Topology,
    args: &Args,
    settings: &Settings,
    dir: &TempDir,
    workloads: &[Workload],
) -> Result<Backends> {
    let mut nginx = Vec::new();
    let mut iperf = Vec::new();
    let mut udp = Vec::new();
    let want = |w: Workload| workloads.contains(&w);
    for (i, b) in topo.backends.iter().enumerate() {
        let name = format!("b{}", i + 1);
        nginx.push(if want(Workload::Cps) {
            require("nginx", "nginx-light")
                .and_then(|()| {
                    loadgen::start_nginx(
                        &b.ns,
                        &name,
                        b.addr,
                        NGINX_PORT,
                        args.nginx_workers,
                        dir.path(),
                    )
                })
                .map_err(|e| format!("{e:#}"))
        } else {
            Err("not run".into())
        });
        iperf.push(if want(Workload::BulkUp) || want(Workload::BulkDown) {
            require("iperf3", "iperf3")
                .and_then(|()| loadgen::start_iperf3(&b.ns, &name, b.addr, IPERF_PORT, dir.path()))
                .map_err(|e| format!("{e:#}"))
        } else {
            Err("not run".into())
        });
        if want(Workload::Udp) {
            // Bounded even if never dropped: the whole run cannot outlast this.
            let lifetime =
                Duration::from_secs(600 + settings.rounds as u64 * 5 * 4 * (settings.seconds + 20));
            udp.push(UdpSink::start(
                &b.ns,
                SocketAddr::from((b.addr, UDP_PORT)),
                args.udp_receivers,
                lifetime,
            )?);
        }
    }
    Ok(Backends {
        nginx,
        iperf,
        udp,
        addrs: topo.backends.iter().map(|b| b.addr).collect(),
    })
}

/// What is running for one contender; torn down on drop (HAProxy and the agent by their own guards).
enum Active {
    Nothing,
    Netfilter,
    Haproxy(#[allow(dead_code)] Haproxy),
    Lb(AgentProcess),
}

fn agent_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LB_AGENT_BIN") {
        let p = PathBuf::from(p);
        ensure!(p.is_file(), "LB_AGENT_BIN={} is not a file", p.display());
        return Ok(p);
    }
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("lb-agent"))
        .find(|p| p.is_file())
        .context(
            "lb-agent not found: build it (cargo build --release -p lb-agent) or set LB_AGENT_BIN",
        )
}

fn activate(c: Contender, topo: &Topology, backends: &Backends, dir: &TempDir) -> Result<Active> {
    let services = services();
    let lb_ns = &topo.balancer;
    match c {
        Contender::Baseline | Contender::BaselineSpread => Ok(Active::Nothing),
        Contender::Iptables => {
            require("iptables-restore", "iptables")?;
            let file = dir.path().join("kube-proxy.iptables");
            std::fs::write(
                &file,
                baselines::kube_proxy_iptables(VIP, &services, &backends.addrs),
            )?;
            let active = Active::Netfilter;
            baselines::iptables_restore(lb_ns, &file)?;
            Ok(active)
        }
        Contender::Nftables => {
            require("nft", "nftables")?;
            let file = dir.path().join("kube-proxy.nft");
            std::fs::write(
                &file,
                baselines::kube_proxy_nftables(VIP, &services, &backends.addrs),
            )?;
            let active = Active::Netfilter;
            baselines::nft_load(lb_ns, &file)?;
            Ok(active)
        }
        Contender::Haproxy => {
            require("haproxy", "haproxy")?;
            Ok(Active::Haproxy(Haproxy::start(
                lb_ns,
                VIP,
                &services,
                &backends.addrs,
                dir.path(),
            )?))
        }
        Contender::Lb | Contender::LbTc | Contender::LbIdle => {
            agent_binary()?;
            let file = dir.path().join("lb.yaml");
            let config = if c != Contender::LbIdle {
                baselines::lb_config(VIP, &services, &backends.addrs)
            } else {
                "services: []\n".to_string()
            };
            std::fs::write(&file, config)?;
            let attach: &[&str] = if c == Contender::LbTc {
                &["--attach", "tc"]
            } else {
                &[]
            };
            Ok(Active::Lb(AgentProcess::start_with(
                lb_ns,
                &file,
                &topo.balancer_interfaces(),
                attach,
            )?))
        }
    }
}

/// Sets up `c`, checks that it (and only it) balances, runs every workload, tears it down.
fn run_contender(
    c: Contender,
    topo: &Topology,
    backends: &Backends,
    args: &Args,
    settings: &Settings,
    dir: &TempDir,
    workloads: &[Workload],
) -> (Vec<Outcome>, Value) {
    let mut check = json!({ "contender": c.name() });
    let applicable: Vec<Workload> = workloads
        .iter()
        .copied()
        .filter(|w| w.applies_to(c))
        .collect();
    let fail_all = |msg: String| -> Vec<Outcome> {
        applicable.iter().map(|&w| (w, Err(msg.clone()))).collect()
    };

    // Nothing left from the previous contender.
    let _ = baselines::netfilter_flush(&topo.balancer);
    match baselines::leftover_state(&topo.balancer, VIP) {
        Ok(left) if left.is_empty() => {}
        Ok(left) => {
            let msg = format!(
                "balancer not clean before {}: {}",
                c.name(),
                left.join("; ")
            );
            check["error"] = json!(msg);
            return (fail_all(msg), check);
        }
        Err(e) => {
            let msg = format!("checking the balancer: {e:#}");
            check["error"] = json!(msg);
            return (fail_all(msg), check);
        }
    }

    let mut active = match activate(c, topo, backends, dir) {
        Ok(a) => a,
        Err(e) => {
            let _ = baselines::netfilter_flush(&topo.balancer);
            let msg = format!("setting up {}: {e:#}", c.name());
            check["error"] = json!(msg);
            return (fail_all(msg), check);
        }
    };

    let mut results = Vec::new();
    match verify(c, topo, backends, &active) {
        Ok(v) => {
            check["probe"] = v;
            for &w in &applicable {
                if procs::interrupted() {
                    results.push((w, Err("interrupted".to_string())));
                    continue;
                }
                let r = measure(w, c, topo, backends, args, settings).map_err(|e| format!("{e:#}"));
                results.push((w, r));
                let _ = procs::sleep(Duration::from_millis(300));
            }
        }
        Err(e) => {
            let msg = format!("{} does not balance as expected: {e:#}", c.name());
            check["error"] = json!(msg);
            results = fail_all(msg);
        }
    }

    // The contender's own view of the traffic.
    match c {
        Contender::Iptables => {
            let mut seen = serde_json::Map::new();
            for svc in services() {
                let chain = format!("KUBE-SVC-{}", svc.name.to_uppercase());
                if let Ok(n) = baselines::iptables_chain_packets(&topo.balancer, &chain) {
                    seen.insert(chain, json!(n));
                }
            }
            check["iptables_packets_to_service_chains"] = Value::Object(seen);
            check["conntrack_entries_after"] = json!(conntrack_count(&topo.balancer));
        }
        Contender::Nftables => {
            check["conntrack_entries_after"] = json!(conntrack_count(&topo.balancer));
        }
        _ => {}
    }
    check["offloads"] = json!({
        "client eth0": offloads(&topo.client, "eth0"),
        "balancer to-client": offloads(&topo.balancer, lb_tests::topology::BALANCER_CLIENT_IFACE),
        "balancer to-b1": offloads(&topo.balancer, "to-b1"),
        "backend 1 eth0": offloads(&topo.backends[0].ns, "eth0"),
    });
    if let Active::Lb(agent) = std::mem::replace(&mut active, Active::Nothing) {
        match agent.stop() {
            Ok((code, lines)) => {
                let counters = lb_tests::agent::logged_counters(&lines);
                check["lb_exit_code"] = json!(code);
                check["lb_counters"] = json!(counters);
                let get = |k: &str| counters.get(k).copied().unwrap_or(0);
                let (seen, what) = if c != Contender::LbIdle {
                    (
                        get("forward_new_flow") + get("forward_conntrack_hit"),
                        "forwarded",
                    )
                } else {
                    (get("pass_not_service"), "passed")
                };
                if seen == 0 {
                    let msg = format!("lb's datapath counted no {what} packet");
                    check["error"] = json!(msg);
                    results = results
                        .into_iter()
                        .map(|(w, _)| (w, Err(msg.clone())))
                        .collect();
                }
            }
            Err(e) => check["lb_stop_error"] = json!(format!("{e:#}")),
        }
    }
    drop(active);
    if let Err(e) = baselines::netfilter_flush(&topo.balancer) {
        check["teardown_error"] = json!(format!("{e:#}"));
    }
    (results, check)
}

/// The offloads that decide how many packets a TCP stream becomes on a veth (XDP on a veth turns
/// GSO off on its peer and GRO on for itself).
fn offloads(ns: &Netns, iface: &str) -> Value {
    let Ok(out) = ns.exec("ethtool", &["-k", iface]) else {
        return Value::Null;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut m = serde_json::Map::new();
    for key in [
        "tx-checksumming",
        "tcp-segmentation-offload",
        "generic-segmentation-offload",
        "generic-receive-offload",
    ] {
        if let Some(v) = text
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(&format!("{key}:")))
            .and_then(|v| v.split_whitespace().next())
        {
            m.insert(key.to_string(), json!(v));
        }
    }
    Value::Object(m)
}

fn conntrack_count(ns: &Netns) -> Option<u64> {
    ns.exec("cat", &["/proc/sys/net/netfilter/nf_conntrack_count"])
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
}

/// Probes: the baseline must find the VIP dead and the backend direct; every balancer must answer
/// on the VIP from several backends, with the client's own address (DNAT) or the balancer's
/// (HAProxy, a proxy) as the peer the backend saw.
fn verify(c: Contender, topo: &Topology, backends: &Backends, active: &Active) -> Result<Value> {
    let vip_web = SocketAddr::from((VIP, WEB_PORT));
    let timeout = Duration::from_secs(2);
    let mut out = json!({});
    if c.direct() {
        ensure!(
            loadgen::http_get(&topo.client, vip_web, Duration::from_millis(500)).is_err(),
            "the VIP answers with no balancer set up: something else is active"
        );
        out["vip"] = json!("no answer, as expected");
    }
    if matches!(c, Contender::Baseline | Contender::BaselineSpread) {
        return Ok(out);
    }
    let probes = 24;
    let mut seen_backends = BTreeMap::<String, u32>::new();
    let mut peers = BTreeSet::new();
    let web_up = !c.direct() && backends.nginx.iter().all(|n| n.is_ok());
    if web_up {
        for _ in 0..probes {
            let body = loadgen::http_get(&topo.client, vip_web, timeout)?;
            let (backend, client) = loadgen::parse_probe(&body);
            *seen_backends.entry(backend).or_default() += 1;
            peers.insert(client);
        }
        let expect_peer_client = c != Contender::Haproxy;
        for p in &peers {
            let ip: IpAddr = p.parse().with_context(|| format!("peer {p:?}"))?;
            if expect_peer_client {
                ensure!(
                    ip == IpAddr::from(CLIENT_ADDR),
                    "a backend saw {ip}, not the client: not a DNAT path"
                );
            } else {
                ensure!(
                    ip != IpAddr::from(CLIENT_ADDR),
                    "a backend saw the client's own address: not through the proxy"
                );
            }
        }
        if backends.addrs.len() > 1 {
            ensure!(
                seen_backends.len() > 1,
                "{probes} connections all reached {:?}: not balancing",
                seen_backends
            );
        }
        out["web_probes"] = json!(seen_backends);
        out["peers_seen_by_backends"] = json!(peers);
    }
    match c {
        Contender::Iptables => {
            let n = baselines::iptables_chain_packets(&topo.balancer, "KUBE-SVC-WEB")?;
            ensure!(
                !web_up || n > 0,
                "the probes did not go through KUBE-SVC-WEB"
            );
        }
        Contender::Nftables => {
            let mut cmd = topo.balancer.command("nft");
            cmd.args(["list", "table", "ip", "kube-proxy"]);
            procs::run_ok(cmd, Duration::from_secs(10))?;
            let mut cmd = topo.balancer.command("iptables-save");
            cmd.args(["-t", "nat"]);
            if let Ok(nat) = procs::run_ok(cmd, Duration::from_secs(10)) {
                ensure!(
                    !nat.lines().any(|l| l.starts_with("-A ")),
                    "iptables nat rules present alongside nftables"
                );
            }
        }
        Contender::Lb | Contender::LbIdle => {
            let modes = baselines::xdp_modes(&topo.balancer)?;
            let attached: BTreeSet<String> = modes.iter().map(|(i, _)| i.clone()).collect();
            for iface in topo.balancer_interfaces() {
                ensure!(attached.contains(&iface), "no XDP program on {iface}");
            }
            let left = baselines::leftover_state(&topo.balancer, VIP)?;
            ensure!(
                left.iter().all(|l| l.starts_with("XDP attached")),
                "other state alongside lb: {}",
                left.join("; ")
            );
            out["xdp_modes"] = json!(modes.into_iter().collect::<BTreeMap<String, String>>());
        }
        Contender::LbTc => {
            // tcx links are not listed per namespace by every bpftool: the agent's pinned links
            // are the evidence (the kernel keeps a pinned link attached).
            let Active::Lb(agent) = active else {
                bail!("lb-tc without an agent");
            };
            let links = agent.pins().path().join("links");
            for iface in topo.balancer_interfaces() {
                ensure!(
                    links.join(format!("tc_{iface}")).exists(),
                    "no pinned TC link for {iface}"
                );
            }
            let left = baselines::leftover_state(&topo.balancer, VIP)?;
            ensure!(
                left.iter().all(|l| l.starts_with("TC attached")),
                "other state alongside lb-tc: {}",
                left.join("; ")
            );
            out["tc_links"] = json!(topo.balancer_interfaces());
        }
        _ => {}
    }
    Ok(out)
}

fn measure(
    w: Workload,
    c: Contender,
    topo: &Topology,
    backends: &Backends,
    args: &Args,
    settings: &Settings,
) -> Result<Sample> {
    let xdp_ids = if args.bpf_stats && matches!(c, Contender::Lb | Contender::LbIdle) {
        baselines::xdp_prog_ids(&topo.balancer).unwrap_or_default()
    } else {
        Vec::new()
    };
    let stats_before = baselines::bpf_run_stats(&xdp_ids).ok();
    let mut sample = measure_once(w, c, topo, backends, args, settings)?;
    if let (false, Some((ns0, n0)), Ok((ns1, n1))) = (
        xdp_ids.is_empty(),
        stats_before,
        baselines::bpf_run_stats(&xdp_ids),
    ) {
        let packets = n1.saturating_sub(n0);
        sample.details["xdp_packets"] = json!(packets);
        sample.details["xdp_ns_per_packet"] =
            json!((ns1.saturating_sub(ns0)) as f64 / packets.max(1) as f64);
    }
    // How busy the machine was (it is shared): the 1-minute load average after the run.
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    sample.details["loadavg_1m"] = json!(load
        .split_whitespace()
        .next()
        .and_then(|l| l.parse::<f64>().ok()));
    Ok(sample)
}

fn measure_once(
    w: Workload,
    c: Contender,
    topo: &Topology,
    backends: &Backends,
    args: &Args,
    settings: &Settings,
) -> Result<Sample> {
    let first = backends.addrs[0];
    let target = |vip_port: u16, backend_port: u16| -> SocketAddr {
        if c.direct() {
            SocketAddr::from((first, backend_port))
        } else {
            SocketAddr::from((VIP, vip_port))
        }
    };
    // Connections and datagrams: every backend for the spread baseline, else the one target.
    let targets = |vip_port: u16, backend_port: u16| -> Vec<SocketAddr> {
        if c == Contender::BaselineSpread {
            backends
                .addrs
                .iter()
                .map(|&a| SocketAddr::from((a, backend_port)))
                .collect()
        } else {
            vec![target(vip_port, backend_port)]
        }
    };
    match w {
        Workload::Cps => {
            require("wrk", "wrk")?;
            if let Some(Err(e)) = backends.nginx.iter().find(|n| n.is_err()) {
                bail!("nginx: {e}");
            }
            let tcp_before = loadgen::tcp_counters(&topo.client);
            let b1_before = loadgen::tcp_counters(&topo.backends[0].ns);
            let drops_before = loadgen::link_drops(&topo.balancer);
            let web = targets(WEB_PORT, NGINX_PORT);
            let r = loadgen::run_wrk(
                &topo.client,
                &web,
                // One thread per target at least, so every backend gets connections.
                args.wrk_threads.max(web.len()),
                args.wrk_connections,
                settings.seconds,
            )?;
            ensure!(r.requests > 0, "wrk completed no request");
            let tcp_after = loadgen::tcp_counters(&topo.client);
            let b1_after = loadgen::tcp_counters(&topo.backends[0].ns);
            let drops_after = loadgen::link_drops(&topo.balancer);
            let delta = |k: &str| {
                tcp_after
                    .get(k)
                    .zip(tcp_before.get(k))
                    .map(|(a, b)| a.saturating_sub(*b))
            };
            Ok(Sample {
                value: r.requests_per_sec,
                details: json!({
                    "requests": r.requests,
                    "socket_errors": r.socket_errors,
                    "non_2xx": r.non_2xx,
                    "latency_avg": r.latency_avg,
                    "latency_max": r.latency_max,
                    "client_syn_retransmits": delta("TcpExt.TCPSynRetrans"),
                    "client_retransmitted_segments": delta("Tcp.RetransSegs"),
                    "client_resets_received": delta("Tcp.EstabResets"),
                    "balancer_link_drops": drops_after.zip(drops_before).map(|(a, b)| a.saturating_sub(b)),
                    "client_tcp_counters_grown": loadgen::grown(&tcp_before, &tcp_after),
                    "backend1_tcp_counters_grown": loadgen::grown(&b1_before, &b1_after),
                }),
            })
        }
        Workload::BulkUp | Workload::BulkDown => {
            if let Some(Err(e)) = backends.iperf.iter().find(|n| n.is_err()) {
                bail!("iperf3 server: {e}");
            }
            let run = || {
                loadgen::run_iperf3(
                    &topo.client,
                    target(IPERF_PORT, IPERF_PORT),
                    settings.seconds,
                    w == Workload::BulkDown,
                )
            };
            // One retry: an iperf3 server may be between two tests (or resetting after an idle
            // timeout) for a moment.
            let r = match run() {
                Ok(r) => r,
                Err(e) => {
                    println!("  {} {}: {e:#}; retrying once", c.name(), w.id());
                    procs::sleep(Duration::from_secs(1))?;
                    run()?
                }
            };
            Ok(Sample {
                value: r.gbit_per_sec,
                details: json!({"retransmits": r.retransmits}),
            })
        }
        Workload::Udp => {
            ensure!(!backends.udp.is_empty(), "no UDP receivers");
            let before: Vec<u64> = backends.udp.iter().map(UdpSink::datagrams).collect();
            let sent = loadgen::udp_blast(
                &topo.client,
                &targets(UDP_PORT, UDP_PORT),
                args.udp_flows,
                args.udp_batch,
                args.udp_payload,
                settings.udp,
            )?;
            // Let the receivers drain their queues.
            procs::sleep(Duration::from_millis(300))?;
            let per_backend: Vec<u64> = backends
                .udp
                .iter()
                .zip(&before)
                .map(|(s, b)| s.datagrams() - b)
                .collect();
            let received: u64 = per_backend.iter().sum();
            ensure!(
                received > 0,
                "no datagram reached a backend ({} sent)",
                sent.datagrams
            );
            let loss = 1.0 - received as f64 / sent.datagrams.max(1) as f64;
            Ok(Sample {
                value: received as f64 / sent.seconds,
                details: json!({
                    "sent": sent.datagrams,
                    "received": received,
                    "loss": loss,
                    "sender_errors": sent.errors,
                    "received_per_backend": per_backend,
                    "seconds": sent.seconds,
                }),
            })
        }
    }
}

/// A long error (a verifier log) cut to its head and tail for the terminal.
fn shorten(msg: &str) -> String {
    const KEEP: usize = 240;
    let chars: Vec<char> = msg.chars().collect();
    if chars.len() <= 2 * KEEP {
        return msg.replace('\n', " | ");
    }
    let head: String = chars[..KEEP].iter().collect();
    let tail: String = chars[chars.len() - KEEP..].iter().collect();
    format!(
        "{} [...] {}",
        head.replace('\n', " | "),
        tail.replace('\n', " | ")
    )
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn fmt_value(w: Workload, v: f64) -> String {
    match w {
        Workload::Cps | Workload::Udp => format!("{v:.0}"),
        Workload::BulkUp | Workload::BulkDown => format!("{v:.2}"),
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &Args,
    settings: &Settings,
    machine: &str,
    load_before: &str,
    contenders: &[Contender],
    workloads: &[Workload],
    samples: &BTreeMap<(Workload, Contender), Vec<Result<Sample, String>>>,
    checks: &[Value],
    edits: Value,
    elapsed: f64,
) -> Result<()> {
    const W0: usize = 45;
    const W: usize = 17;
    println!();
    println!(
        "End to end through the veth topology ({} backends), median of {} round(s); (x) = ratio to baseline",
        args.backends, settings.rounds
    );
    let mut header = format!("{:<W0$}", "workload");
    for c in contenders {
        header += &format!(" {:>W$}", c.name());
    }
    println!("{header}");
    let mut json_workloads = Vec::new();
    let mut errors = Vec::new();
    let mut udp_loss_line = format!("{:<W0$}", "  UDP loss at the receivers");
    let mut verdicts = Vec::new();
    for &w in workloads {
        let mut line = format!("{:<W0$}", w.title());
        let base = samples
            .get(&(w, Contender::Baseline))
            .and_then(|s| median(&mut s.iter().flatten().map(|x| x.value).collect::<Vec<_>>()));
        let mut per = serde_json::Map::new();
        let mut medians = BTreeMap::new();
        for &c in contenders {
            let cell_samples = samples.get(&(w, c));
            let cell = if !w.applies_to(c) {
                per.insert(c.name().into(), json!({"applicable": false}));
                "n/a".to_string()
            } else if let Some(s) = cell_samples {
                let mut values: Vec<f64> = s.iter().flatten().map(|x| x.value).collect();
                let errs: Vec<&String> = s.iter().filter_map(|r| r.as_ref().err()).collect();
                for e in &errs {
                    errors.push((c.name(), w.id(), e.to_string()));
                }
                let m = median(&mut values);
                let ratio = match (m, base) {
                    (Some(m), Some(b)) if b > 0.0 => Some(m / b),
                    _ => None,
                };
                if let Some(m) = m {
                    medians.insert(c, m);
                }
                per.insert(
                    c.name().into(),
                    json!({
                        "median": m,
                        "ratio_to_baseline": ratio,
                        "samples": s.iter().flatten().map(|x| x.value).collect::<Vec<_>>(),
                        "details": s.iter().flatten().map(|x| x.details.clone()).collect::<Vec<_>>(),
                        "errors": errs,
                    }),
                );
                if w == Workload::Udp {
                    let mut losses: Vec<f64> = s
                        .iter()
                        .flatten()
                        .filter_map(|x| x.details["loss"].as_f64())
                        .collect();
                    udp_loss_line += &format!(
                        " {:>W$}",
                        median(&mut losses).map_or("-".into(), |l| format!("{:.1}%", l * 100.0))
                    );
                }
                match (m, ratio) {
                    (Some(m), Some(r)) if c != Contender::Baseline => {
                        format!("{} ({r:.2}x)", fmt_value(w, m))
                    }
                    (Some(m), _) => fmt_value(w, m),
                    (None, _) => "error".to_string(),
                }
            } else {
                "-".to_string()
            };
            if w == Workload::Udp && !w.applies_to(c) {
                udp_loss_line += &format!(" {:>W$}", "n/a");
            }
            line += &format!(" {cell:>W$}");
        }
        println!("{line}");
        if w == Workload::Udp {
            println!("{udp_loss_line}");
        }
        for ours in [Contender::Lb, Contender::LbTc] {
            let Some(&lb) = medians.get(&ours) else {
                continue;
            };
            let best_other = medians
                .iter()
                .filter(|(c, _)| {
                    !matches!(
                        c,
                        Contender::Lb
                            | Contender::LbTc
                            | Contender::LbIdle
                            | Contender::Baseline
                            | Contender::BaselineSpread
                    )
                })
                .map(|(c, v)| (*c, *v))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            let mut v = format!("{}: {}", w.id(), ours.name());
            if let Some(b) = base {
                v += &format!(" {:.2}x baseline", lb / b);
            }
            if let Some(b) = medians.get(&Contender::BaselineSpread) {
                v += &format!(", {:.2}x baseline-spread", lb / b);
            }
            // The rounds' own spread: each round's value against that round's baseline.
            let per_round = |c: Contender| -> Vec<Option<f64>> {
                samples
                    .get(&(w, c))
                    .map(|s| s.iter().map(|r| r.as_ref().ok().map(|x| x.value)).collect())
                    .unwrap_or_default()
            };
            let ratios: Vec<f64> = per_round(ours)
                .iter()
                .zip(per_round(Contender::Baseline))
                .filter_map(|(a, b)| Some(a.as_ref()? / b?))
                .collect();
            if let (Some(lo), Some(hi)) = (
                ratios.iter().copied().reduce(f64::min),
                ratios.iter().copied().reduce(f64::max),
            ) {
                v += &format!(" (rounds {lo:.2}-{hi:.2}x baseline)");
            }
            if let Some((c, o)) = best_other {
                v += &format!(", {:.2}x the best other ({})", lb / o, c.name());
            }
            verdicts.push(v);
        }
        json_workloads.push(json!({
            "id": w.id(),
            "title": w.title(),
            "unit": w.unit(),
            "higher_is_better": true,
            "baseline_median": base,
            "results": Value::Object(per),
        }));
    }
    println!();
    for v in &verdicts {
        println!("{v}");
    }
    if !errors.is_empty() {
        println!();
        println!("Errors (in full in the JSON):");
        let mut grouped: Vec<(&str, &str, Vec<&str>)> = Vec::new();
        for (c, w, e) in &errors {
            match grouped.iter_mut().find(|(gc, ge, _)| gc == c && ge == e) {
                Some((_, _, ws)) => ws.push(w),
                None => grouped.push((c, e, vec![w])),
            }
        }
        for (c, e, ws) in grouped {
            println!("  {c} ({}): {}", ws.join(", "), shorten(e));
        }
    }
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!();
    println!(
        "Took {elapsed:.0} s; load average before {} / after {}",
        load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        load_after
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    let report = json!({
        "machine": machine,
        "load_average_before": load_before.trim(),
        "load_average_after": load_after.trim(),
        "seconds_total": elapsed,
        "settings": {
            "rounds": settings.rounds,
            "tcp_seconds": settings.seconds,
            "udp_ms": settings.udp.as_millis() as u64,
            "backends": args.backends,
            "wrk_threads": args.wrk_threads,
            "wrk_connections": args.wrk_connections,
            "nginx_workers": args.nginx_workers,
            "udp_flows": args.udp_flows,
            "udp_batch": args.udp_batch,
            "udp_payload": args.udp_payload,
            "udp_receivers_per_backend": args.udp_receivers,
            "quick": args.quick,
            "nice": args.nice,
            "wire_frames": args.wire_frames,
        },
        "method": {
            "baseline": "no balancer: the client talks to backend 1's address, routed by the balancer namespace's kernel (no NAT)",
            "iptables": "kube-proxy iptables mode: nat KUBE-SERVICES -> KUBE-SVC (statistic --mode random) -> KUBE-SEP DNAT; ClientIP affinity (recent) on the iperf3 service",
            "nftables": "kube-proxy nftables mode: service-ips vmap -> numgen random mod N vmap -> endpoint dnat; ClientIP affinity (dynamic set) on the iperf3 service",
            "haproxy": "HAProxy in TCP mode on the VIP (balance roundrobin; source for iperf3); UDP not applicable",
            "lb": "lb-agent, XDP on every balancer interface, DNAT mode (five-tuple Maglev; source-ip for iperf3)",
            "lb-tc": "lb-agent --attach tc: lb_tc at tcx ingress of every balancer interface, DNAT mode, the stack forwards (TC_ACT_OK)",
            "rounds": "contender order reverses every round; each cell is the median over rounds",
        },
        "contenders": contenders.iter().map(|c| c.name()).collect::<Vec<_>>(),
        "workloads": json_workloads,
        "checks": checks,
        "errors": errors
            .iter()
            .map(|(c, w, e)| json!({"contender": c, "workload": w, "error": e}))
            .collect::<Vec<_>>(),
        "edit_to_move": edits,
    });
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)?;
    println!("JSON: {}", args.json.display());
    Ok(())
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

/// The edit-to-move measurement (see the module documentation): per save, the time until a new
/// connection lands on the backend the saved file names. Connections are opened one after another
/// (each about a millisecond), so that is the resolution.
fn edit_to_move(edits: usize) -> Result<Value> {
    agent_binary()?;
    println!("Edit to move: {edits} saves of the config file, switching between two backends");
    let topo = Topology::new(BENCH_PREFIX, 2)?;
    let _sweep = Sweep(
        [topo.client.name(), topo.balancer.name()]
            .into_iter()
            .chain(topo.backends.iter().map(|b| b.ns.name()))
            .map(String::from)
            .collect(),
    );
    let _servers: Vec<TcpCountingServer> = tcp_servers_on_backends(&topo, NGINX_PORT);
    let dir = TempDir::new("bench-edit")?;
    let path = dir.path().join("lb.yaml");
    let save = |i: usize| -> Result<()> {
        // Both backends stay; the other one is drained (weight 0: no new flows, its connections
        // finish), as an operator moves traffic without breaking it.
        let weight = |b: usize| u32::from(b == i);
        let yaml = format!(
            "services:\n  - {{ name: web, vip: {VIP}, port: {WEB_PORT}, protocol: tcp, \
             backends: [{{ address: {}, port: {NGINX_PORT}, weight: {} }}, \
             {{ address: {}, port: {NGINX_PORT}, weight: {} }}] }}\n",
            topo.backends[0].addr,
            weight(1),
            topo.backends[1].addr,
            weight(2)
        );
        // As editors save: a new file renamed over the old one.
        let tmp = dir.path().join("lb.yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    };
    save(1)?;
    let _agent = AgentProcess::start(&topo.balancer, &path, &topo.balancer_interfaces())?;
    let vip = SocketAddr::from((VIP, WEB_PORT));
    let lands = |name: &str| {
        tcp_requests(&topo.client, vip, 1, b"x")
            .pop()
            .and_then(|r| r.ok())
            .is_some_and(|greeting| greeting == name)
    };
    ensure!(
        lands("backend-1"),
        "the first backend does not answer through the VIP"
    );
    let mut times = Vec::with_capacity(edits);
    let mut failed_during_switch = 0;
    for edit in 0..edits {
        procs::check_interrupted()?;
        let target = 2 - edit % 2;
        let name = format!("backend-{target}");
        save(target)?;
        let saved = Instant::now();
        loop {
            match tcp_requests(&topo.client, vip, 1, b"x").pop().expect("one") {
                Ok(greeting) if greeting == name => break,
                Ok(_) => {}
                // The old backend is drained, not removed: its connections finish.
                Err(_) => failed_during_switch += 1,
            }
            ensure!(
                saved.elapsed() < Duration::from_secs(10),
                "edit {edit}: no connection reached {name} within 10 s"
            );
        }
        let moved = saved.elapsed();
        // Every new connection now goes there.
        for _ in 0..5 {
            ensure!(
                lands(&name),
                "edit {edit}: a connection after the move missed {name}"
            );
        }
        times.push(moved.as_secs_f64() * 1000.0);
        // Saves at varying offsets from the agent's file poll (the fallback of its watch).
        std::thread::sleep(Duration::from_millis(100 + (edit as u64 * 137) % 400));
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let rank =
        |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
    let (p50, p99) = (rank(0.50), rank(0.99));
    println!(
        "  new connections on the new backend after the save: p50 {p50:.0} ms, p99 {p99:.0} ms, \
         min {:.0} ms, max {:.0} ms ({} connections failed during switches)",
        sorted[0],
        sorted[sorted.len() - 1],
        failed_during_switch
    );
    Ok(json!({
        "edits": edits,
        "p50_ms": p50,
        "p99_ms": p99,
        "samples_ms": times,
        "failed_during_switch": failed_during_switch,
        "file_poll_interval_ms": 2000,
    }))
}
