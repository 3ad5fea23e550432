//! Installs what the build and the tests need, only when it is missing.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Context, Result};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Toolchain only: nightly rust-src and bpf-linker.
    Build,
    /// Also root, bpffs and the network tools that tests and the demo call.
    Run,
    /// Everything `Run` needs, plus the servers, load generators and the balancers that the
    /// end-to-end benchmark compares lb with (`BENCH_TOOLS`).
    Bench,
}

/// Commands the tests and the demo call, and the Debian package that provides each.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ethtool", "ethtool"),
    ("sysctl", "procps"),
    ("bpftool", "bpftool"),
];

/// Files the tests run that are not commands on the PATH, and the Debian package of each: the CNI
/// reference plugins `e2e_cni_plugin` chains `lb-cni` after.
const FILES: &[(&str, &str)] = &[
    ("/usr/lib/cni/ptp", "containernetworking-plugins"),
    ("/usr/lib/cni/host-local", "containernetworking-plugins"),
];

/// Commands the end-to-end benchmark (`lb-bench-e2e`) calls, and the Debian package of each.
const BENCH_TOOLS: &[(&str, &str)] = &[
    ("wrk", "wrk"),
    ("nginx", "nginx-light"),
    ("haproxy", "haproxy"),
    ("iptables", "iptables"),
    ("iptables-restore", "iptables"),
    ("nft", "nftables"),
    ("conntrack", "conntrack"),
    ("iperf3", "iperf3"),
    ("ss", "iproute2"),
];

const BPF_LINKER_SERIES: &str = "0.10.";

/// How many times `apt-get update` and `install` are tried before the run gives up.
const APT_ATTEMPTS: u32 = 4;

pub fn ensure(need: Need) -> Result<()> {
    if matches!(need, Need::Run | Need::Bench) {
        if !is_root() {
            bail!(
                "the demo and the tests create network namespaces and load eBPF: run them as root"
            );
        }
        ensure_apt_packages(missing_packages(TOOLS, have).chain(missing_packages(FILES, exists)))?;
        if need == Need::Bench {
            ensure_apt_packages(missing_packages(BENCH_TOOLS, have))?;
        }
        ensure_bpffs()?;
    }
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn exists(path: &str) -> bool {
    Path::new(path).exists()
}

/// The packages of the `(what, package)` entries that `present` does not find.
fn missing_packages<'a>(
    entries: &'a [(&str, &'a str)],
    present: fn(&str) -> bool,
) -> impl Iterator<Item = &'a str> {
    entries
        .iter()
        .filter(move |(what, _)| !present(what))
        .map(|(_, package)| *package)
}

fn ensure_apt_packages<'a>(missing: impl Iterator<Item = &'a str>) -> Result<()> {
    let mut missing: Vec<&str> = missing.collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    // Debian's mirror answers 503 now and then (seen on a fresh machine): a failed attempt is
    // retried after a pause instead of failing the whole run.
    let mut attempt = 1;
    loop {
        let installed = run(Command::new("apt-get").arg("update").arg("-q")).and_then(|()| {
            run(Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"))
        });
        match installed {
            Ok(()) => return Ok(()),
            Err(e) if attempt < APT_ATTEMPTS => {
                let pause = Duration::from_secs(10 * attempt as u64);
                eprintln!("xtask: {e:#}; trying again in {}s", pause.as_secs());
                std::thread::sleep(pause);
                attempt += 1;
            }
            Err(e) => return Err(e.context(format!("{APT_ATTEMPTS} attempts"))),
        }
    }
}

fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    eprintln!("xtask: mounting bpffs at /sys/fs/bpf");
    if !Path::new("/sys/fs/bpf").exists() {
        std::fs::create_dir_all("/sys/fs/bpf")?;
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn ensure_rust_src() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup")?;
    if installed.status.success()
        && String::from_utf8_lossy(&installed.stdout)
            .lines()
            .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn ensure_bpf_linker() -> Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = version {
        // "bpf-linker 0.10.4"
        if String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .is_some_and(|v| v.starts_with(BPF_LINKER_SERIES))
        {
            return Ok(());
        }
    }
    // 0.10.x links with rustc's own LLVM; 0.11+ wants a system LLVM this machine does not have.
    eprintln!("xtask: installing bpf-linker {BPF_LINKER_SERIES}x (a few minutes, once)");
    run(Command::new("cargo").args([
        "+nightly",
        "install",
        "bpf-linker",
        "--version",
        "~0.10",
        "--locked",
        "--force",
    ]))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
