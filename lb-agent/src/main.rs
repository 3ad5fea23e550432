//! `lb-agent`: loads the XDP datapath, attaches it, programs services from a YAML file, and detaches
//! on SIGINT/SIGTERM.

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lb_agent::{config::Config, datapath::Datapath};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

#[derive(Parser)]
#[command(version, about = "eBPF/XDP load balancer node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the datapath, attach it and program the services of CONFIG until SIGINT/SIGTERM.
    /// SIGHUP re-reads CONFIG.
    Run {
        /// Service configuration (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// Interface to attach to; repeat for every interface that receives client traffic or
        /// backend replies.
        #[arg(long = "iface", short, required = true)]
        interfaces: Vec<String>,
        /// How often to log the datapath counters (0 = never).
        #[arg(long, default_value = "10", value_name = "SECONDS")]
        stats_interval: u64,
    },
    /// Validate CONFIG and exit (0 = valid).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config } => Config::from_file(&config)
            .map(|c| println!("{}: {} services, valid", config.display(), c.services.len()))
            .with_context(|| format!("invalid config {}", config.display())),
        Command::Run {
            config,
            interfaces,
            stats_interval,
        } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting tokio")
            .and_then(|rt| rt.block_on(run(config, interfaces, stats_interval))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lb-agent: {err:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(config_path: PathBuf, interfaces: Vec<String>, stats_interval: u64) -> Result<()> {
    // Validate before touching the kernel: a bad file never half-programs the datapath.
    let config = Config::from_file(&config_path)
        .with_context(|| format!("invalid config {}", config_path.display()))?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;

    let mut datapath = Datapath::load()?;
    let report = datapath.apply(&config)?;
    info!(?report, "maps programmed");
    for interface in &interfaces {
        datapath.attach(interface)?;
    }
    info!(services = config.services.len(), interfaces = ?interfaces, "ready");

    let period = Duration::from_secs(stats_interval.max(1));
    let mut stats = tokio::time::interval(period);
    stats.tick().await;
    loop {
        tokio::select! {
            _ = sigint.recv() => { info!("SIGINT received"); break; }
            _ = sigterm.recv() => { info!("SIGTERM received"); break; }
            _ = sighup.recv() => reload(&config_path, &mut datapath),
            _ = stats.tick(), if stats_interval > 0 => log_counters(&datapath),
        }
    }
    datapath.detach_all();
    log_counters(&datapath);
    info!("stopped");
    Ok(())
}

/// Re-reads the config (SIGHUP). An invalid file is rejected and the last good state stays in force.
fn reload(config_path: &Path, datapath: &mut Datapath) {
    let config = match Config::from_file(config_path) {
        Ok(config) => config,
        Err(err) => {
            error!("config rejected, keeping the last good state: {err}");
            return;
        }
    };
    match datapath.apply(&config) {
        Ok(report) => info!(?report, services = config.services.len(), "config reloaded"),
        Err(err) => error!("applying the reloaded config failed: {err:#}"),
    }
}

fn log_counters(datapath: &Datapath) {
    match datapath.counters() {
        Ok(counters) => {
            let summary: Vec<String> = counters
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(c, n)| format!("{}={n}", c.name()))
                .collect();
            info!(counters = %summary.join(" "), "datapath counters");
        }
        Err(err) => error!("reading counters: {err:#}"),
    }
}
