//! Child processes for benchmarks: servers that are killed (with their whole process tree) on drop,
//! and bounded client runs that are killed when they outlive their timeout. Nothing here waits
//! without a deadline.
//!
//! Every child gets `PR_SET_PDEATHSIG(SIGKILL)`, so a bench that is killed outright does not leave
//! its direct children running; forked grandchildren (nginx workers) are found through `/proc` and
//! killed on drop, and [`kill_all_in`] kills whatever still runs in a namespace the bench made.

use std::{
    io::Read,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::{
    sys::signal::{kill, SigHandler, Signal},
    unistd::Pid,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT and SIGTERM into a flag that every wait here checks, so an interrupted bench unwinds
/// through its guards (killing children, deleting namespaces) instead of dying on the spot.
pub fn install_interrupt_handler() {
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let _ = nix::sys::signal::signal(signal, SigHandler::Handler(on_interrupt));
        }
    }
}

/// True once SIGINT or SIGTERM arrived (see [`install_interrupt_handler`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails if the bench was interrupted.
pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps up to `d`, returning early (with an error) when interrupted.
pub fn sleep(d: Duration) -> Result<()> {
    let deadline = Instant::now() + d;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        check_interrupted()?;
        thread::sleep(left.min(Duration::from_millis(50)));
    }
    check_interrupted()
}

/// Makes `cmd`'s process die with SIGKILL when the thread that spawned it exits. Spawn from a
/// long-lived thread (the main thread): the signal follows the spawning *thread*.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A long-running child (a server), stopped on drop with SIGTERM, then SIGKILL after a grace
/// period, together with every process it forked. Its stdout and stderr go to `log`.
pub struct Server {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Spawns `cmd` with output to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Fails with the tail of the log if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}): {}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// The last lines the process printed.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// Stops the process tree (also done on drop).
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = self.pid();
        let tree = descendants(pid);
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Workers that outlived their master (or were forked late): kill them by id.
        for p in tree.into_iter().chain(descendants(pid)) {
            if is_alive(p) {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The output of a bounded run.
pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion, killing it if it runs longer than `timeout` (or the bench is
/// interrupted). Fails on a timeout, not on a non-zero exit: callers judge the status.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Finished> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let program = format!("{:?}", cmd.get_args().collect::<Vec<_>>());
    let mut child = KillOnDrop(cmd.spawn().with_context(|| format!("spawning {program}"))?);
    let mut stdout = child.0.stdout.take().expect("piped");
    let mut stderr = child.0.stderr.take().expect("piped");
    let out_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        if interrupted() || Instant::now() > deadline {
            let pid = child.0.id() as i32;
            for p in descendants(pid) {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            let _ = child.0.kill();
            let _ = child.0.wait();
            check_interrupted()?;
            bail!("{program} did not finish within {timeout:?}; killed");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Ok(Finished {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// Runs `cmd` (bounded by `timeout`) and fails with its stderr unless it exits 0.
pub fn run_ok(cmd: Command, timeout: Duration) -> Result<String> {
    let what = format!("{:?}", cmd.get_args().collect::<Vec<_>>());
    let done = run_bounded(cmd, timeout)?;
    if !done.status.success() {
        bail!(
            "{what} failed ({}): {}",
            done.status,
            done.stderr.trim().lines().last().unwrap_or("")
        );
    }
    Ok(done.stdout)
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn is_alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; state Z counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// Every process below `pid` (children, grandchildren, ...), from `/proc/*/stat`.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut parents: Vec<(i32, i32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
                parents.push((p, ppid));
            }
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// Kills (SIGKILL) every process that lives in namespace `ns` (per `ip netns pids`), except this
/// one. Only for namespaces this process made: a last sweep after the servers' own guards.
pub fn kill_all_in(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    let me = std::process::id() as i32;
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|p| *p != me)
    {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Before namespaces of dead bench runs are swept: kills processes still running in namespaces
/// `<prefix><pid>-*` whose creating process `pid` is gone (servers orphaned by a bench that was
/// killed with SIGKILL). The namespaces themselves are deleted by `Topology::new`.
pub fn kill_orphans_of_dead_runs(prefix: &str) {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            kill_all_in(name);
        }
    }
}

/// True if `program` is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
