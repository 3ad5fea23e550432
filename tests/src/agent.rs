//! The real `lb-agent` binary as a child process in a namespace; stopped with SIGTERM on drop.
//! Every agent pins its datapath in a [`TestPins`] directory of its own, removed (which detaches
//! the datapath) when the last agent using it is gone, also when the test panics.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc, Arc, Once,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_agent::pins::PinDir;
use nix::{
    sched::{setns, CloneFlags},
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::netns::{Netns, TEST_PREFIX};

/// A pin directory `/sys/fs/bpf/lbt<pid>-<seq>` for one test's datapath, and the agent state
/// directory (`--state-dir`) that goes with it, as a node keeps both across agent restarts.
/// Dropping it removes every pin in it, which detaches the datapath once no agent holds it, and
/// the state directory.
pub struct TestPins {
    dir: PathBuf,
    state: tempfile::TempDir,
}

impl TestPins {
    pub fn new() -> Arc<Self> {
        static SWEEP: Once = Once::new();
        static NEXT_SEQ: AtomicU32 = AtomicU32::new(0);
        SWEEP.call_once(remove_stale_pins);
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/{TEST_PREFIX}{}-{seq}",
            std::process::id()
        ));
        let state = tempfile::Builder::new()
            .prefix("lb-agent-state-")
            .tempdir()
            .expect("an agent state directory");
        Arc::new(Self { dir, state })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The agents' `--state-dir` (unless a test gives its own).
    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        if let Err(err) = PinDir::new(&self.dir).remove_all() {
            eprintln!("removing pins in {}: {err:#}", self.dir.display());
        }
    }
}

/// An agent config file `/tmp/lb-config-<pid>-<seq>.yaml`, removed on drop.
pub struct ConfigFile {
    path: PathBuf,
}

impl ConfigFile {
    pub fn new(yaml: &str) -> Self {
        static NEXT_SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("lb-config-{}-{seq}.yaml", std::process::id()));
        std::fs::write(&path, yaml).expect("write the agent config");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the content as an editor would: a temporary file renamed over it.
    pub fn rewrite(&self, yaml: &str) {
        let tmp = self.path.with_extension("yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write the agent config");
        std::fs::rename(&tmp, &self.path).expect("replace the agent config");
    }
}

/// GETs `/metrics` from the agent's HTTP endpoint `addr` inside `ns` and parses it with a
/// Prometheus text-format parser.
pub fn scrape_metrics(ns: &Netns, addr: SocketAddr) -> Result<prometheus_parse::Scrape> {
    let body = ns.run(move || -> Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("no HTTP header end")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("GET /metrics: {head}");
        }
        Ok(body.to_string())
    })?;
    Ok(prometheus_parse::Scrape::parse(
        body.lines().map(|l| Ok(l.to_string())),
    )?)
}

/// The sum of the samples of metric `name` whose labels include every pair of `labels`.
pub fn metric_sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes pin directories of test processes that no longer exist (killed runs skip destructors).
fn remove_stale_pins() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(TEST_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = PinDir::new(entry.path()).remove_all();
        }
    }
}

/// Path of the `lb-agent` binary: `$LB_AGENT_BIN`, else next to the test executable's target dir
/// (`cargo xtask test` builds it before running tests).
pub fn agent_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LB_AGENT_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("lb-agent");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("lb-agent binary not found next to {}; run `cargo xtask test` (or build it and set LB_AGENT_BIN)", exe.display());
}

/// Path of the `lbctl` binary: next to [`agent_binary`] (cargo builds both into one directory;
/// with `LB_AGENT_BIN`, copy `lbctl` next to that file).
pub fn lbctl_binary() -> PathBuf {
    agent_binary().with_file_name("lbctl")
}

/// Runs `lbctl --socket <socket> <args>`, which must succeed; returns what it printed.
pub fn lbctl(socket: &Path, args: &[&str]) -> String {
    let out = Command::new(lbctl_binary())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running lbctl {args:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "lbctl {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

pub struct AgentProcess {
    child: Child,
    /// Log lines the agent printed (stderr), for assertions and failure messages.
    pub log: mpsc::Receiver<String>,
    /// Lines [`AgentProcess::wait_for_log`] has read so far (startup included).
    pub history: Vec<String>,
    /// Dropped after the agent has stopped (field order).
    pins: Arc<TestPins>,
}

impl AgentProcess {
    /// Starts `lb-agent run` in `ns` and waits until it reports ready.
    pub fn start(ns: &Netns, config: &std::path::Path, interfaces: &[String]) -> Result<Self> {
        Self::start_with(ns, config, interfaces, &[])
    }

    /// Like [`AgentProcess::start`] with extra `lb-agent run` arguments.
    pub fn start_with(
        ns: &Netns,
        config: &std::path::Path,
        interfaces: &[String],
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_pinned(ns, config, interfaces, extra, TestPins::new())
    }

    /// Like [`AgentProcess::start_with`] with the datapath pinned in `pins`, e.g. the directory of
    /// an earlier agent, whose state this one adopts.
    pub fn start_pinned(
        ns: &Netns,
        config: &std::path::Path,
        interfaces: &[String],
        extra: &[&str],
        pins: Arc<TestPins>,
    ) -> Result<Self> {
        // Only the network namespace is switched (not `ip netns exec`, whose private /sys hides
        // the host's BPF filesystem and would make pins die with the agent).
        let netns_path = format!("/run/netns/{}", ns.name());
        let netns = File::open(&netns_path).with_context(|| format!("opening {netns_path}"))?;
        let mut cmd = Command::new(agent_binary());
        // SAFETY: only a setns syscall between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                setns(&netns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        cmd.args(["run", "--config"]).arg(config);
        cmd.arg("--bpffs-dir").arg(pins.path());
        // Not the node's default directory: tests must not see each other's saved state.
        if !extra.contains(&"--state-dir") {
            cmd.arg("--state-dir").arg(pins.state_dir());
        }
        for iface in interfaces {
            cmd.args(["--iface", iface]);
        }
        cmd.args(extra);
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning lb-agent")?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut agent = Self {
            child,
            log: rx,
            history: Vec::new(),
            pins,
        };
        agent.wait_for_log("ready", Duration::from_secs(30))?;
        Ok(agent)
    }

    /// Waits until a log line contains `needle`; returns that line.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let seen_from = self.history.len();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.history.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    bail!(
                        "lb-agent exited ({status:?}) before logging {needle:?}:\n{}",
                        self.history[seen_from..].join("\n")
                    );
                }
            }
        }
        bail!(
            "lb-agent did not log {needle:?} within {timeout:?}:\n{}",
            self.history[seen_from..].join("\n")
        )
    }

    /// Sends `signal` to the agent (e.g. SIGHUP to reload the config).
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signal the agent");
    }

    /// The agent's pin directory, for a successor to adopt.
    pub fn pins(&self) -> Arc<TestPins> {
        self.pins.clone()
    }

    /// Kills the agent with SIGKILL (no cleanup of its own runs) and waits for it to be gone.
    pub fn kill9(mut self) -> Result<()> {
        self.child.kill().context("SIGKILL the agent")?;
        self.child.wait().context("waiting for the killed agent")?;
        Ok(())
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit code and the log lines printed
    /// since the last wait (the final counters among them).
    pub fn stop(mut self) -> Result<(i32, Vec<String>)> {
        let code = self.terminate()?;
        let mut rest = Vec::new();
        while let Ok(line) = self.log.recv_timeout(Duration::from_secs(1)) {
            rest.push(line);
        }
        Ok((code, rest))
    }

    /// Stops the agent and checks that it exited cleanly on SIGTERM and logged its final datapath
    /// counters; returns what it logged meanwhile and that counters line.
    pub fn stop_cleanly(self) -> (Vec<String>, String) {
        let (code, log) = self.stop().expect("agent stops");
        assert_eq!(code, 0, "clean exit on SIGTERM");
        let counters = log
            .iter()
            .rev()
            .find(|l| l.contains("datapath counters"))
            .expect("final counters logged")
            .clone();
        (log, counters)
    }

    fn terminate(&mut self) -> Result<i32> {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("lb-agent did not exit within 10 s of SIGTERM");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.terminate();
        }
    }
}

/// The datapath counters of the agent's last "datapath counters" log line, by name (counters at
/// zero are not logged).
pub fn logged_counters(log: &[String]) -> std::collections::BTreeMap<String, u64> {
    let names: std::collections::BTreeSet<&str> = lb_common::counters::Counter::ALL
        .iter()
        .map(|c| c.name())
        .collect();
    let Some(line) = log.iter().rev().find(|l| l.contains("datapath counters")) else {
        return Default::default();
    };
    line.split_whitespace()
        .filter_map(|tok| {
            let (key, value) = tok.rsplit_once('=')?;
            let key = key.rsplit('=').next()?.trim_matches('"');
            let value: u64 = value.trim_matches(|c| c == '"' || c == ',').parse().ok()?;
            names.contains(key).then(|| (key.to_string(), value))
        })
        .collect()
}
