//! Network namespaces owned by a test. Names are `<prefix><pid>-<seq>-<role>` so that parallel and
//! aborted runs never collide; [`remove_stale`] deletes those whose process is gone.

use std::{
    fs::File,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

/// Prefixes of namespaces made by tests, the demo and benchmarks.
pub const TEST_PREFIX: &str = "lbt";
pub const DEMO_PREFIX: &str = "lbd";
pub const BENCH_PREFIX: &str = "lbb";
const ALL_PREFIXES: [&str; 3] = [TEST_PREFIX, DEMO_PREFIX, BENCH_PREFIX];

static NEXT_SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace made with `ip netns add`, deleted (with every interface in it) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `<prefix><pid>-<seq>-<role>` with its loopback up.
    pub fn new(prefix: &str, role: &str) -> Result<Self> {
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}{}-{seq}-{role}", std::process::id());
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> <args>` and fails with its stderr if it fails.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Like [`Netns::ip`] with the arguments as one whitespace-separated string:
    /// `ns.ip_cmd(&format!("route add default via {gw}"))`.
    pub fn ip_cmd(&self, args: &str) -> Result<()> {
        self.ip(&args.split_whitespace().collect::<Vec<_>>())
    }

    /// A command that will run inside this namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `program args` inside the namespace and fails with its stderr if it fails.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut cmd = self.command(program);
        cmd.args(args);
        let output = cmd
            .output()
            .with_context(|| format!("spawning {program}"))?;
        if !output.status.success() {
            bail!(
                "{program} {} in {} failed: {}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(output)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(|_| ())
    }

    /// The path MTU this namespace has learnt towards `dst` (its route cache, from an ICMP
    /// "fragmentation needed" / "packet too big" its stack accepted), if any.
    pub fn learnt_mtu(&self, dst: std::net::IpAddr) -> Option<u32> {
        let family = if dst.is_ipv4() { "-4" } else { "-6" };
        let out = self
            .exec("ip", &[family, "route", "get", &dst.to_string()])
            .expect("ip route get");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut words = text.split_whitespace();
        while let Some(word) = words.next() {
            if word == "mtu" {
                return words.next()?.parse().ok();
            }
        }
        None
    }

    /// Whether this namespace learns the path MTU `mtu` towards `dst` within 3 seconds.
    pub fn learns_mtu(&self, dst: std::net::IpAddr, mtu: u16) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while self.learnt_mtu(dst) != Some(mtu.into()) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            thread::sleep(std::time::Duration::from_millis(20));
        }
        true
    }

    /// Id of the XDP program attached to `iface` in this namespace (`prog/xdp id N` in
    /// `ip link`); panics when it has none. A reload or a restart that replaces the program
    /// changes it.
    pub fn xdp_program_id(&self, iface: &str) -> u32 {
        let output = Command::new("ip")
            .args(["-n", &self.name, "link", "show", "dev", iface])
            .output()
            .expect("ip link show");
        let text = String::from_utf8_lossy(&output.stdout);
        text.split("prog/xdp id ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("no XDP program on {iface} in {}: {text}", self.name))
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets created there belong to the
    /// namespace for their whole life, so they can be handed back and used from any thread.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        self.spawn(f).join().expect("thread in namespace panicked")
    }

    /// Like [`Netns::run`] but returns the thread's handle.
    pub fn spawn<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> thread::JoinHandle<R> {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            enter(&path).unwrap_or_else(|e| panic!("entering {path}: {e:#}"));
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Moves the calling thread into the namespace bound at `path`.
pub fn enter(path: &str) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {path}"))?;
    setns(file, CloneFlags::CLONE_NEWNET).context("setns")?;
    Ok(())
}

/// Deletes namespaces left behind by test, demo or bench processes that no longer exist
/// (e.g. killed with SIGKILL, which skips destructors).
pub fn remove_stale() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = ALL_PREFIXES.iter().find_map(|p| name.strip_prefix(p)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    let output = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
