//! `cargo xtask demo`: a client, the balancer node running the real `lb-agent`, and backends, each in
//! its own network namespace. The client opens TCP connections to the VIP; the backends count what
//! reaches them; a table is printed; everything is torn down.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use lb_agent::config::Config;
use lb_tests::{
    agent::AgentProcess,
    netns::DEMO_PREFIX,
    servers::{tcp_requests, tcp_servers_on_backends},
    topology::{Topology, VIP},
};

/// The embedded example config (also shown in the README).
const DEMO_CONFIG: &str = include_str!("../demo.yaml");
const BACKEND_PORT: u16 = 8080;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "4")]
    backends: usize,
    #[arg(long, default_value = "300")]
    connections: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let mut config = Config::from_yaml(DEMO_CONFIG).context("embedded demo config")?;
    let available = config.services[0].backends.len();
    ensure!(
        (1..=available).contains(&args.backends),
        "--backends must be 1..={available}"
    );
    config.services[0].backends.truncate(args.backends);

    println!(
        "Building the topology: client, balancer node, {} backends (network namespaces)...",
        args.backends
    );
    let topology = Topology::new(DEMO_PREFIX, args.backends)?;
    for (b, want) in topology.backends.iter().zip(&config.services[0].backends) {
        ensure!(
            b.addr == want.address,
            "demo.yaml and the topology disagree on backend addresses"
        );
    }
    let servers: Vec<_> = tcp_servers_on_backends(&topology, BACKEND_PORT);

    let config_path = std::env::temp_dir().join(format!("lb-demo-{}.yaml", std::process::id()));
    std::fs::write(&config_path, config.to_yaml())?;

    println!(
        "Starting lb-agent on the balancer node (XDP on {})...",
        topology.balancer_interfaces().join(", ")
    );
    let agent = AgentProcess::start(
        &topology.balancer,
        &config_path,
        &topology.balancer_interfaces(),
    )?;

    let target = SocketAddr::from((VIP, 80));
    println!(
        "Client {} opens {} TCP connections to VIP {target}...",
        lb_tests::topology::CLIENT_ADDR,
        args.connections
    );
    let payload: &'static [u8] = b"GET / HTTP/1.0\r\n\r\n";
    let t0 = Instant::now();
    let results = tcp_requests(&topology.client, target, args.connections, payload);
    let elapsed = t0.elapsed();
    let failed = results.iter().filter(|r| r.is_err()).count();
    std::thread::sleep(Duration::from_millis(200));

    println!();
    println!(
        "{:<10} {:<18} {:>11} {:>7} {:>9}",
        "backend", "address", "connections", "share", "bytes"
    );
    let total: u64 = servers.iter().map(|s| s.connections()).sum();
    for (server, backend) in servers.iter().zip(&topology.backends) {
        let share = 100.0 * server.connections() as f64 / total.max(1) as f64;
        println!(
            "{:<10} {:<18} {:>11} {:>6.1}% {:>9}",
            server.name,
            format!("{}:{BACKEND_PORT}", backend.addr),
            server.connections(),
            share,
            server.bytes()
        );
    }
    println!("{:<10} {:<18} {:>11}", "total", "", total);
    println!();
    println!(
        "{} of {} connections succeeded in {:.2} s ({:.0} connections/s); counted by the backends themselves.",
        args.connections - failed,
        args.connections,
        elapsed.as_secs_f64(),
        (args.connections - failed) as f64 / elapsed.as_secs_f64()
    );

    let (agent_exit, agent_log) = agent.stop()?;
    if let Some(line) = agent_log.iter().find(|l| l.contains("datapath counters")) {
        let counters = line.split("counters=").nth(1).unwrap_or(line);
        println!("Datapath counters (per reason, all CPUs): {counters}");
    }
    std::fs::remove_file(&config_path).ok();
    let every_backend = servers.iter().all(|s| s.connections() > 0);
    println!(
        "Datapath detached, namespaces removed. {} in {:.1} s.",
        if failed == 0 && every_backend {
            "Demo OK"
        } else {
            "Demo FAILED"
        },
        started.elapsed().as_secs_f64()
    );
    ensure!(agent_exit == 0, "lb-agent exited with {agent_exit}");
    ensure!(failed == 0, "{failed} connections failed");
    ensure!(every_backend, "some backend received no connection");
    Ok(())
}
