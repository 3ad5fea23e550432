//! `cargo xtask`: the project's entry points. Each command first makes sure the machine has what it
//! needs (apt packages, nightly rust-src, bpf-linker 0.10, bpffs), idempotently, so a fresh machine
//! needs nothing else.
//!
//! xtask itself depends only on small crates: it must compile before bpf-linker exists.

mod prerequisites;

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, demo, test and benchmark the load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF datapath and the userspace crates.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Self-contained demo: namespaces, a client, the balancer, backends, traffic, a summary.
    Demo {
        /// Number of backends.
        #[arg(long, default_value = "4")]
        backends: usize,
        /// Number of TCP connections the client opens to the VIP.
        #[arg(long, default_value = "300")]
        connections: usize,
    },
    /// The whole test suite: formatting, lints, unit tests, BPF_PROG_TEST_RUN and namespace tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Benchmarks: per-packet cost against XDP_PASS, Maglev build times, reconcile time and memory
    /// of a full datapath, end to end against kube-proxy (iptables, nftables) and HAProxy, and
    /// config-edit-to-moved-flows latency (tables + JSON in target/bench/).
    Bench {
        /// Short end-to-end runs (about 30 s instead of about 4 min).
        #[arg(long)]
        quick: bool,
        /// Only the per-packet, Maglev and reconcile benchmarks.
        #[arg(long)]
        skip_e2e: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    // Where cargo puts binaries: $CARGO_TARGET_DIR if set, else target/ in the workspace.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    match cli.command {
        Cmd::Build { release } => {
            prerequisites::ensure(prerequisites::Need::Build)?;
            let mut args = vec!["build", "--bins", "--lib"];
            if release {
                args.push("--release");
            }
            cargo(&args)
        }
        Cmd::Demo {
            backends,
            connections,
        } => {
            prerequisites::ensure(prerequisites::Need::Run)?;
            cargo(&[
                "build",
                "--release",
                "--package",
                "lb-agent",
                "--package",
                "lb-tests",
                "--bins",
            ])?;
            run(Command::new(target.join("release/lb-demo"))
                .env("LB_AGENT_BIN", target.join("release/lb-agent"))
                .args([
                    "--backends",
                    &backends.to_string(),
                    "--connections",
                    &connections.to_string(),
                ]))
        }
        Cmd::Test { args } => {
            prerequisites::ensure(prerequisites::Need::Run)?;
            cargo(&["fmt", "--all", "--check"])?;
            // Host crates (the workspace's default members), then the datapath for its own target.
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            cargo(&[
                "+nightly",
                "clippy",
                "--package",
                "lb-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])?;
            // Integration tests start the real agent binary: build it first, then point them at it.
            cargo(&["build", "--bins"])?;
            let mut test = vec!["test"];
            if !args.is_empty() {
                test.push("--");
                test.extend(args.iter().map(String::as_str));
            }
            run(Command::new("cargo")
                .args(&test)
                .env("LB_AGENT_BIN", target.join("debug/lb-agent")))
        }
        Cmd::Bench { quick, skip_e2e } => {
            prerequisites::ensure(prerequisites::Need::Bench)?;
            cargo(&[
                "build",
                "--release",
                "--package",
                "lb-agent",
                "--package",
                "lb-tests",
                "--bins",
            ])?;
            run(&mut Command::new(target.join("release/lb-bench")))?;
            if skip_e2e {
                return Ok(());
            }
            let mut e2e = Command::new(target.join("release/lb-bench-e2e"));
            e2e.env("LB_AGENT_BIN", target.join("release/lb-agent"));
            if quick {
                e2e.arg("--quick");
            }
            run(&mut e2e)
        }
    }
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new("cargo").args(args))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
