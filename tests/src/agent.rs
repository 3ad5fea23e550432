//! The real `lb-agent` binary as a child process in a namespace; stopped with SIGTERM on drop.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::netns::Netns;

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

pub struct AgentProcess {
    child: Child,
    /// Log lines the agent printed (stderr), for assertions and failure messages.
    pub log: mpsc::Receiver<String>,
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
        let mut cmd = ns.command(agent_binary().to_str().context("utf-8 path")?);
        cmd.args(["run", "--config"]).arg(config);
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
        let mut agent = Self { child, log: rx };
        agent.wait_for_log("ready", Duration::from_secs(30))?;
        Ok(agent)
    }

    /// Waits until a log line contains `needle`; returns that line.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    if line.contains(needle) {
                        return Ok(line);
                    }
                    seen.push(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    bail!(
                        "lb-agent exited ({status:?}) before logging {needle:?}:\n{}",
                        seen.join("\n")
                    );
                }
            }
        }
        bail!(
            "lb-agent did not log {needle:?} within {timeout:?}:\n{}",
            seen.join("\n")
        )
    }

    /// Sends `signal` to the agent (e.g. SIGHUP to reload the config).
    pub fn signal(&self, signal: Signal) {
        // `ip netns exec` execs the agent, so the child's pid is the agent's.
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signal the agent");
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

    fn terminate(&mut self) -> Result<i32> {
        // `ip netns exec` execs the agent, so the child's pid is the agent's.
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
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
