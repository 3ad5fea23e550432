//! Active health checks of backends.
//!
//! A [`HealthChecker`] runs one tokio task per probe [`Target`] (backend address, probe port and
//! [`HealthCheck`] spec). Each task probes on its interval — a TCP connect, or an HTTP `GET` whose
//! status must be 2xx/3xx — bounded by the check's timeout, and feeds the result into a rise/fall state
//! machine ([`Health`]). The health of every target is published as a [`Snapshot`] through a
//! `tokio::sync::watch` channel; the reconciler gives an unhealthy backend weight 0 (see
//! [`effective_weight`]), which stops new flows to it while existing flows continue.
//!
//! Initial state: a target starts **healthy** (with no probe yet, `probes == 0`). A restarting agent
//! reprograms backends that were serving traffic a moment ago; starting them unhealthy, or excluding
//! them until a first probe succeeds, would withdraw every backend at once and turn an agent restart or
//! config reload into an outage. The price is that a dead *new* backend gets new flows for up to
//! `fall` probe intervals.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    hash::{Hash, Hasher},
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
    task::JoinHandle,
    time::{timeout_at, MissedTickBehavior},
};
use tracing::{debug, info, warn};

use crate::config::{BackendConfig, Config, HealthCheck, HealthCheckKind, Service};

/// What one probe task checks: a backend address, the port to probe and the check spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub address: IpAddr,
    pub port: u16,
    pub check: HealthCheck,
}

impl Target {
    /// The target probing `backend` of `service`, or `None` when the service has no health check.
    /// The probe port is the check's port, else the backend's port, else (backend port 0 = "the
    /// client's port") the service port.
    pub fn for_backend(service: &Service, backend: &BackendConfig) -> Option<Target> {
        let check = service.health_check.as_ref()?;
        let port = check
            .port
            .or(Some(backend.port).filter(|&p| p != 0))
            .unwrap_or(service.port);
        // Port 0 cannot be probed; config validation requires a check port in that case.
        (port != 0).then(|| Target {
            address: backend.address,
            port,
            check: check.clone(),
        })
    }

    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

/// Every distinct target of `config`: the argument of [`HealthChecker::update`].
pub fn targets(config: &Config) -> HashSet<Target> {
    config
        .services
        .iter()
        .flat_map(|s| s.backends.iter().filter_map(|b| Target::for_backend(s, b)))
        .collect()
}

// `HealthCheck` does not derive `Hash`; hash every field (the destructuring breaks the build when a
// field is added, so the hash cannot silently miss one).
impl Hash for Target {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let HealthCheck {
            kind,
            port,
            path,
            interval_ms,
            timeout_ms,
            rise,
            fall,
        } = &self.check;
        (self.address, self.port).hash(state);
        (std::mem::discriminant(kind), port, path).hash(state);
        (interval_ms, timeout_ms, rise, fall).hash(state);
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.check.kind {
            HealthCheckKind::Tcp => write!(f, "tcp {}", self.socket_addr()),
            HealthCheckKind::Http => write!(f, "http {}{}", self.socket_addr(), self.check.path),
        }
    }
}

/// Health of one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// False = no new flows (weight 0).
    pub healthy: bool,
    /// When `healthy` last flipped, or when probing started.
    pub last_change: Instant,
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
    /// Why the most recent failed probe failed (kept after recovery, for diagnosis).
    pub last_error: Option<String>,
    /// Probes completed since the target was added.
    pub probes: u64,
}

impl Health {
    /// A target that has not been probed yet: healthy (see the module documentation).
    pub fn new(now: Instant) -> Self {
        Health {
            healthy: true,
            last_change: now,
            consecutive_successes: 0,
            consecutive_failures: 0,
            last_error: None,
            probes: 0,
        }
    }

    /// Records a probe result; returns true when `healthy` flipped. `rise` and `fall` of 0 act as 1.
    pub fn record(
        &mut self,
        result: Result<(), String>,
        rise: u32,
        fall: u32,
        now: Instant,
    ) -> bool {
        self.probes += 1;
        let was = self.healthy;
        match result {
            Ok(()) => {
                self.consecutive_failures = 0;
                self.consecutive_successes = self.consecutive_successes.saturating_add(1);
                if self.consecutive_successes >= rise.max(1) {
                    self.healthy = true;
                }
            }
            Err(err) => {
                self.consecutive_successes = 0;
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.last_error = Some(err);
                if self.consecutive_failures >= fall.max(1) {
                    self.healthy = false;
                }
            }
        }
        if self.healthy != was {
            self.last_change = now;
        }
        self.healthy != was
    }
}

/// The weight to program for a backend: 0 (no new flows) when its health check says unhealthy.
/// `None` = not health-checked.
pub fn effective_weight(configured: u32, health: Option<&Health>) -> u32 {
    match health {
        Some(h) if !h.healthy => 0,
        _ => configured,
    }
}

/// Health of every current target.
pub type Snapshot = HashMap<Target, Health>;

/// Runs the probe tasks. Dropping it (or [`HealthChecker::shutdown`]) stops them all; receivers then
/// see `changed()` return an error once the last task has ended.
pub struct HealthChecker {
    tasks: HashMap<Target, ProbeTask>,
    state: watch::Sender<Snapshot>,
}

struct ProbeTask {
    /// Set before the target's entry leaves the snapshot, and read by the task under the snapshot's
    /// lock, so a task that is being aborted never writes into a later entry for the same target.
    stopped: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl ProbeTask {
    fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.handle.abort();
    }
}

impl Default for HealthChecker {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthChecker {
    /// A checker with no targets. [`update`](Self::update) must run inside a tokio runtime.
    pub fn new() -> Self {
        HealthChecker {
            tasks: HashMap::new(),
            state: watch::channel(Snapshot::new()).0,
        }
    }

    /// Receives the snapshot. Receivers are woken only when a target's `healthy` flips or the target
    /// set changes — what the reconciler acts on — not after every probe; the counters in the
    /// snapshot are nevertheless always current.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.state.subscribe()
    }

    /// A copy of the current snapshot.
    pub fn snapshot(&self) -> Snapshot {
        self.state.borrow().clone()
    }

    /// Makes `targets` the set being probed: stops the tasks of targets not in it, starts tasks for
    /// new ones and leaves the others (and their health) alone. A new target replacing a removed one
    /// at the same address and port (a changed check spec) inherits its `healthy` flag, so editing a
    /// check does not revive a dead backend.
    pub fn update(&mut self, targets: impl IntoIterator<Item = Target>) {
        let wanted: HashSet<Target> = targets.into_iter().collect();
        let removed: Vec<Target> = self
            .tasks
            .keys()
            .filter(|t| !wanted.contains(*t))
            .cloned()
            .collect();
        for target in &removed {
            if let Some(task) = self.tasks.remove(target) {
                task.stop();
            }
            debug!("health check {target}: removed");
        }
        let added: Vec<Target> = wanted
            .into_iter()
            .filter(|t| !self.tasks.contains_key(t))
            .collect();
        let now = Instant::now();
        self.state.send_if_modified(|snapshot| {
            let mut previous: HashMap<SocketAddr, Health> = HashMap::new();
            for target in &removed {
                if let Some(health) = snapshot.remove(target) {
                    previous.entry(target.socket_addr()).or_insert(health);
                }
            }
            for target in &added {
                let mut health = Health::new(now);
                if let Some(old) = previous.get(&target.socket_addr()) {
                    health.healthy = old.healthy;
                    health.last_change = old.last_change;
                    health.last_error = old.last_error.clone();
                }
                snapshot.insert(target.clone(), health);
            }
            !removed.is_empty() || !added.is_empty()
        });
        // Spawned after the entries exist: a task only ever updates its own entry.
        for target in added {
            debug!("health check {target}: added");
            let stopped = Arc::new(AtomicBool::new(false));
            let handle = tokio::spawn(probe_loop(
                target.clone(),
                stopped.clone(),
                self.state.clone(),
            ));
            self.tasks.insert(target, ProbeTask { stopped, handle });
        }
    }

    /// Stops every probe task and waits until they have ended: no probe runs after this returns.
    pub async fn shutdown(mut self) {
        let tasks: Vec<ProbeTask> = self.tasks.drain().map(|(_, task)| task).collect();
        for task in &tasks {
            task.stop();
        }
        for task in tasks {
            // A cancelled task returns a JoinError; a panicking one is already logged by tokio.
            let _ = task.handle.await;
        }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.stop();
        }
    }
}

/// `ms` as a duration that tokio's timers accept: at least 1 ms (a zero interval panics), at most a
/// day (a huge one overflows `Instant`).
fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms.clamp(1, 86_400_000))
}

async fn probe_loop(target: Target, stopped: Arc<AtomicBool>, state: watch::Sender<Snapshot>) {
    let check = &target.check;
    let timeout = millis(check.timeout_ms);
    let mut ticker = tokio::time::interval(millis(check.interval_ms));
    // A probe slower than the interval delays the next one instead of causing a burst.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = probe(&target, timeout).await;
        if let Err(err) = &result {
            debug!("health check {target}: probe failed: {err}");
        }
        let mut after = None;
        state.send_if_modified(|snapshot| {
            if stopped.load(Ordering::Relaxed) {
                return false;
            }
            let Some(health) = snapshot.get_mut(&target) else {
                return false;
            };
            let flipped = health.record(result, check.rise, check.fall, Instant::now());
            if flipped {
                after = Some(health.clone());
            }
            flipped
        });
        match after {
            Some(h) if h.healthy => info!(
                "health check {target}: unhealthy -> healthy ({} consecutive successes)",
                h.consecutive_successes
            ),
            Some(h) => warn!(
                "health check {target}: healthy -> unhealthy ({}; {} consecutive failures)",
                h.last_error.as_deref().unwrap_or("?"),
                h.consecutive_failures
            ),
            None => {}
        }
    }
}

/// One probe, bounded by `timeout` as a whole. `Err` says why it failed, for logs and `last_error`.
async fn probe(target: &Target, timeout: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let ms = timeout.as_millis();
    let addr = target.socket_addr();
    let mut stream = match timeout_at(deadline, TcpStream::connect(addr)).await {
        Err(_) => return Err(format!("timeout connecting ({ms} ms)")),
        Ok(Err(err)) if err.kind() == io::ErrorKind::ConnectionRefused => {
            return Err("connect refused".into())
        }
        Ok(Err(err)) => return Err(format!("connect: {err}")),
        Ok(Ok(stream)) => stream,
    };
    if target.check.kind == HealthCheckKind::Tcp {
        return Ok(());
    }
    match timeout_at(deadline, http_status(&mut stream, addr, &target.check.path)).await {
        Err(_) => Err(format!("timeout waiting for the HTTP status ({ms} ms)")),
        Ok(Err(err)) => Err(err),
        Ok(Ok(code)) if (200..400).contains(&code) => Ok(()),
        Ok(Ok(code)) => Err(format!("HTTP {code}")),
    }
}

/// Sends `GET path` and returns the status code of the response. The rest is not read: the status
/// is all the check needs, and a backend can stream a body for as long as it likes.
async fn http_status(stream: &mut TcpStream, addr: SocketAddr, path: &str) -> Result<u16, String> {
    // The path goes verbatim into the request line: no spaces, controls or non-ASCII.
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("invalid HTTP path {path:?}"));
    }
    // `SocketAddr` formats IPv6 as `[addr]:port`, as the Host header wants.
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: lb-agent-health-check\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|err| io_failure("sending the request", err))?;
    let mut buf = [0u8; 256];
    let mut len = 0;
    loop {
        if let Some(end) = buf[..len].iter().position(|&b| b == b'\n') {
            return parse_status_line(&buf[..end]);
        }
        if len == buf.len() {
            return parse_status_line(&buf);
        }
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(|err| io_failure("reading the response", err))?;
        if n == 0 {
            return match len {
                0 => Err("connection closed without a response".into()),
                _ => parse_status_line(&buf[..len]),
            };
        }
        len += n;
    }
}

fn io_failure(what: &str, err: io::Error) -> String {
    match err.kind() {
        io::ErrorKind::ConnectionReset => format!("connection reset while {what}"),
        _ => format!("{what}: {err}"),
    }
}

/// The code of a status line such as `HTTP/1.1 200 OK` (trailing CR allowed).
fn parse_status_line(line: &[u8]) -> Result<u16, String> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.splitn(3, |&b| b == b' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if version.starts_with(b"HTTP/") && code.len() == 3 && code.iter().all(u8::is_ascii_digit) {
        return Ok(code
            .iter()
            .fold(0, |acc, &d| acc * 10 + u16::from(d - b'0')));
    }
    // Debug formatting escapes whatever the backend sent before it reaches the logs.
    let shown = String::from_utf8_lossy(&line[..line.len().min(64)]);
    Err(format!("malformed HTTP status line {shown:?}"))
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicU16, AtomicUsize},
        Mutex,
    };

    use tokio::net::{TcpListener, TcpSocket};

    use super::*;

    const INTERVAL_MS: u64 = 40;

    fn check(kind: HealthCheckKind, rise: u32, fall: u32, timeout_ms: u64) -> HealthCheck {
        HealthCheck {
            kind,
            port: None,
            path: "/healthz".into(),
            interval_ms: INTERVAL_MS,
            timeout_ms,
            rise,
            fall,
        }
    }

    fn target(addr: SocketAddr, check: HealthCheck) -> Target {
        Target {
            address: addr.ip(),
            port: addr.port(),
            check,
        }
    }

    /// Binds with SO_REUSEADDR so that a test can listen again on the port it just closed.
    fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(128)
    }

    async fn sleep_ms(ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// Accepts and counts connections, closing them at once.
    struct TcpServer {
        addr: SocketAddr,
        accepts: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl TcpServer {
        fn start(addr: &str) -> io::Result<Self> {
            let listener = listen(addr.parse().unwrap())?;
            let addr = listener.local_addr()?;
            let accepts = Arc::new(AtomicUsize::new(0));
            let counter = accepts.clone();
            let task = tokio::spawn(async move {
                while listener.accept().await.is_ok() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
            Ok(TcpServer {
                addr,
                accepts,
                task,
            })
        }

        fn accepts(&self) -> usize {
            self.accepts.load(Ordering::Relaxed)
        }

        /// Closes the listener (connects are refused from then on).
        async fn stop(self) {
            self.task.abort();
            let _ = self.task.await;
        }
    }

    // What `HttpServer` answers: a status code, or one of these.
    const GARBAGE: u16 = 1;
    const SILENT: u16 = 2;
    const CLOSE: u16 = 3;

    /// Reads a request head, logs it with the reply chosen, and answers with `reply`.
    struct HttpServer {
        addr: SocketAddr,
        reply: Arc<AtomicU16>,
        log: Arc<Mutex<Vec<(u16, String)>>>,
    }

    impl HttpServer {
        fn start(addr: &str, reply: u16) -> io::Result<Self> {
            let listener = listen(addr.parse().unwrap())?;
            let server = HttpServer {
                addr: listener.local_addr()?,
                reply: Arc::new(AtomicU16::new(reply)),
                log: Arc::default(),
            };
            let (reply, log) = (server.reply.clone(), server.log.clone());
            // Ends with the test's runtime.
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(Self::serve(stream, reply.clone(), log.clone()));
                }
            });
            Ok(server)
        }

        async fn serve(
            mut stream: TcpStream,
            reply: Arc<AtomicU16>,
            log: Arc<Mutex<Vec<(u16, String)>>>,
        ) {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let reply = reply.load(Ordering::Relaxed);
            let head = String::from_utf8_lossy(&head).into_owned();
            log.lock().unwrap().push((reply, head));
            let response = match reply {
                GARBAGE => "\u{0}\u{ff}SSH-2.0-OpenSSH_9.6\r\n\r\n".to_string(),
                SILENT => return sleep_ms(60_000).await,
                CLOSE => return,
                code => format!("HTTP/1.1 {code} Whatever\r\nContent-Length: 0\r\n\r\n"),
            };
            let _ = stream.write_all(response.as_bytes()).await;
        }

        fn set_reply(&self, reply: u16) {
            self.reply.store(reply, Ordering::Relaxed);
        }

        fn served(&self, reply: u16) -> usize {
            let log = self.log.lock().unwrap();
            log.iter().filter(|(r, _)| *r == reply).count()
        }

        fn first_request(&self) -> String {
            self.log.lock().unwrap()[0].1.clone()
        }
    }

    /// Waits (at most 5 s) until `target`'s health satisfies `pred`, and returns it.
    async fn wait_for(
        rx: &mut watch::Receiver<Snapshot>,
        target: &Target,
        what: &str,
        mut pred: impl FnMut(&Health) -> bool,
    ) -> Health {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(health) = rx.borrow_and_update().get(target).filter(|h| pred(h)) {
                return health.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{target}: timed out waiting for {what}; now {:?}",
                rx.borrow().get(target)
            );
            // Flips wake us; counters change silently, so poll as well.
            tokio::select! {
                _ = rx.changed() => {}
                _ = sleep_ms(2) => {}
            }
        }
    }

    #[test]
    fn state_machine_flips_after_exactly_fall_and_rise() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        assert!(h.healthy, "starts healthy");
        let fail = || Err::<(), _>("timeout".to_string());
        let (rise, fall) = (2, 3);
        // A success in the middle resets the failure count.
        for result in [fail(), fail(), Ok(()), fail(), fail()] {
            assert!(!h.record(result, rise, fall, t0));
        }
        assert!(h.healthy);
        let t1 = t0 + Duration::from_secs(1);
        assert!(
            h.record(fail(), rise, fall, t1),
            "third consecutive failure"
        );
        assert_eq!(
            (h.healthy, h.consecutive_failures, h.last_change),
            (false, 3, t1)
        );
        assert!(!h.record(fail(), rise, fall, t1), "stays unhealthy");
        assert!(!h.record(Ok(()), rise, fall, t1));
        assert!(
            h.record(Ok(()), rise, fall, t1),
            "second consecutive success"
        );
        assert_eq!((h.healthy, h.consecutive_successes, h.probes), (true, 2, 9));
        assert_eq!(
            h.last_error.as_deref(),
            Some("timeout"),
            "kept for diagnosis"
        );
        // rise/fall of 0 (rejected by config validation) act as 1 instead of misbehaving.
        assert!(h.record(fail(), 0, 0, t1));
    }

    #[test]
    fn effective_weight_is_zero_only_when_unhealthy() {
        let mut health = Health::new(Instant::now());
        assert_eq!(effective_weight(5, None), 5);
        assert_eq!(effective_weight(5, Some(&health)), 5);
        assert_eq!(
            effective_weight(0, Some(&health)),
            0,
            "draining stays draining"
        );
        health.healthy = false;
        assert_eq!(effective_weight(5, Some(&health)), 0);
    }

    #[test]
    fn status_lines() {
        for (line, want) in [
            (&b"HTTP/1.1 200 OK\r"[..], Ok(200)),
            (b"HTTP/1.0 302 Found", Ok(302)),
            (b"HTTP/1.1 503", Ok(503)),
            (b"HTTP/2 204 ", Ok(204)),
        ] {
            assert_eq!(parse_status_line(line), want);
        }
        for line in [
            &b""[..],
            b"garbage",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 +20 OK",
            b"ICY 200 OK",
            b"\xff\xfe\x00 HTTP/1.1 200",
        ] {
            let err = parse_status_line(line).unwrap_err();
            assert!(err.starts_with("malformed HTTP status line"), "{err}");
        }
    }

    #[test]
    fn targets_from_config() {
        let yaml = "
services:
  - { name: a, vip: 198.51.100.1, port: 80, protocol: tcp,
      backends: [ { address: 203.0.113.1, port: 8080 }, { address: 203.0.113.2, port: 0 } ],
      health_check: { type: tcp } }
  - { name: b, vip: 198.51.100.2, port: 80, protocol: tcp,
      backends: [ { address: 203.0.113.1, port: 8080 } ],
      health_check: { type: tcp } }
  - { name: c, vip: 198.51.100.3, port: 0, protocol: tcp,
      backends: [ { address: 203.0.113.3, port: 0 } ],
      health_check: { type: http, port: 9000 } }
  - { name: d, vip: 198.51.100.4, port: 80, protocol: tcp,
      backends: [ { address: 203.0.113.4, port: 80 } ] }
";
        let config = Config::from_yaml(yaml).unwrap();
        let mut got: Vec<String> = targets(&config).iter().map(Target::to_string).collect();
        got.sort();
        // Backend port 0 probes the service port; services a and b share one target; d has no check.
        assert_eq!(
            got,
            [
                "http 203.0.113.3:9000/",
                "tcp 203.0.113.1:8080",
                "tcp 203.0.113.2:80"
            ]
        );
        let d = &config.services[3];
        assert_eq!(Target::for_backend(d, &d.backends[0]), None);
    }

    #[tokio::test]
    async fn tcp_check_falls_after_fall_failures_and_rises_after_rise_successes() {
        let server = TcpServer::start("127.0.0.1:0").unwrap();
        let addr = server.addr;
        let t = target(addr, check(HealthCheckKind::Tcp, 2, 3, 200));
        let mut checker = HealthChecker::new();
        let mut rx = checker.subscribe();
        checker.update([t.clone()]);

        let h = wait_for(&mut rx, &t, "2 successes", |h| h.consecutive_successes >= 2).await;
        assert!(h.healthy && h.last_error.is_none(), "{h:?}");
        assert!(server.accepts() >= 1, "the probe really connected");

        server.stop().await;
        let mut failures_seen_while_healthy = Vec::new();
        let h = wait_for(&mut rx, &t, "unhealthy", |h| {
            if h.healthy {
                failures_seen_while_healthy.push(h.consecutive_failures);
            }
            !h.healthy
        })
        .await;
        assert_eq!(
            h.consecutive_failures, 3,
            "flipped after exactly `fall` failures: {h:?}"
        );
        assert!(failures_seen_while_healthy.iter().all(|&n| n < 3));
        assert_eq!(h.last_error.as_deref(), Some("connect refused"));

        let server = TcpServer::start(&addr.to_string()).unwrap();
        let h = wait_for(&mut rx, &t, "healthy again", |h| h.healthy).await;
        assert_eq!(
            h.consecutive_successes, 2,
            "flipped after exactly `rise` successes: {h:?}"
        );
        sleep_ms(10).await;
        assert!(server.accepts() >= 2);
        checker.shutdown().await;
    }

    #[tokio::test]
    async fn http_check_status_garbage_and_timeout() {
        let server = HttpServer::start("127.0.0.1:0", 200).unwrap();
        let t = target(server.addr, check(HealthCheckKind::Http, 1, 2, 150));
        let mut checker = HealthChecker::new();
        let mut rx = checker.subscribe();
        checker.update([t.clone()]);

        let h = wait_for(&mut rx, &t, "a success", |h| h.consecutive_successes >= 1).await;
        assert!(h.healthy, "{h:?}");
        let request = server.first_request();
        let host = format!("Host: 127.0.0.1:{}\r\n", server.addr.port());
        assert!(
            request.starts_with("GET /healthz HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains(&host) && request.contains("Connection: close\r\n"),
            "{request}"
        );

        server.set_reply(503);
        let h = wait_for(&mut rx, &t, "unhealthy on 503", |h| !h.healthy).await;
        assert_eq!(h.last_error.as_deref(), Some("HTTP 503"));
        assert_eq!(
            (h.consecutive_failures, server.served(503)),
            (2, 2),
            "{h:?}"
        );

        // 3xx is healthy; rise = 1.
        server.set_reply(302);
        wait_for(&mut rx, &t, "healthy on 302", |h| h.healthy).await;

        server.set_reply(GARBAGE);
        let h = wait_for(&mut rx, &t, "unhealthy on garbage", |h| !h.healthy).await;
        let err = h.last_error.unwrap();
        assert!(err.starts_with("malformed HTTP status line"), "{err}");

        server.set_reply(200);
        wait_for(&mut rx, &t, "healthy on 200", |h| h.healthy).await;

        server.set_reply(SILENT);
        let h = wait_for(&mut rx, &t, "unhealthy on silence", |h| !h.healthy).await;
        let err = h.last_error.unwrap();
        assert_eq!(err, "timeout waiting for the HTTP status (150 ms)");
        checker.shutdown().await;
    }

    #[tokio::test]
    async fn http_probe_failures_are_reported_not_panics() {
        let server = HttpServer::start("127.0.0.1:0", CLOSE).unwrap();
        let mut t = target(server.addr, check(HealthCheckKind::Http, 1, 1, 200));
        let timeout = Duration::from_millis(200);
        assert_eq!(
            probe(&t, timeout).await.unwrap_err(),
            "connection closed without a response"
        );
        for path in ["/a b", "/\r\nX-Injected: 1", "relative", "/ü"] {
            t.check.path = path.into();
            let err = probe(&t, timeout).await.unwrap_err();
            assert!(err.starts_with("invalid HTTP path"), "{err}");
        }
        // Nothing listens on a port we just closed.
        let closed = listen("127.0.0.1:0".parse().unwrap())
            .unwrap()
            .local_addr()
            .unwrap();
        let t = target(closed, check(HealthCheckKind::Http, 1, 1, 200));
        assert_eq!(probe(&t, timeout).await.unwrap_err(), "connect refused");
    }

    #[tokio::test]
    async fn update_keeps_stops_and_starts_targets() {
        let a = TcpServer::start("127.0.0.1:0").unwrap();
        let b = TcpServer::start("127.0.0.1:0").unwrap();
        let closed = listen("127.0.0.1:0".parse().unwrap())
            .unwrap()
            .local_addr()
            .unwrap();
        let ta = target(a.addr, check(HealthCheckKind::Tcp, 1, 1, 200));
        let tb = target(b.addr, check(HealthCheckKind::Tcp, 1, 1, 200));
        let tdead = target(closed, check(HealthCheckKind::Tcp, 1, 1, 200));
        let mut checker = HealthChecker::new();
        let mut rx = checker.subscribe();

        checker.update([ta.clone(), tdead.clone()]);
        let ha = wait_for(&mut rx, &ta, "2 successes", |h| {
            h.consecutive_successes >= 2
        })
        .await;
        let hdead = wait_for(&mut rx, &tdead, "unhealthy", |h| !h.healthy).await;
        assert_eq!(b.accepts(), 0);

        // Same targets again plus b: a and the dead one keep their state, b starts.
        checker.update([ta.clone(), tdead.clone(), tb.clone()]);
        let snapshot = checker.snapshot();
        let (ha2, hdead2) = (&snapshot[&ta], &snapshot[&tdead]);
        assert_eq!(ha2.last_change, ha.last_change);
        assert!(ha2.probes >= ha.probes && ha2.consecutive_successes >= ha.consecutive_successes);
        assert!(
            !hdead2.healthy && hdead2.last_change == hdead.last_change,
            "{hdead2:?}"
        );
        assert_eq!(snapshot[&tb].probes, 0);
        wait_for(&mut rx, &tb, "a probe of b", |h| {
            h.consecutive_successes >= 1
        })
        .await;
        sleep_ms(10).await;
        assert!(b.accepts() >= 1);

        // A changed spec for the dead backend replaces its target but not its verdict.
        let mut tdead_slower = tdead.clone();
        tdead_slower.check.interval_ms += 10;
        checker.update([ta.clone(), tdead_slower.clone(), tb.clone()]);
        let snapshot = checker.snapshot();
        assert!(!snapshot.contains_key(&tdead));
        assert!(
            !snapshot[&tdead_slower].healthy,
            "not revived by a config edit"
        );

        // Removing a stops its probes: after one interval for a probe in flight, no more connects.
        checker.update([tb.clone()]);
        assert_eq!(checker.snapshot().keys().collect::<Vec<_>>(), [&tb]);
        sleep_ms(INTERVAL_MS + 20).await;
        let stopped_at = a.accepts();
        let b_at = b.accepts();
        sleep_ms(5 * INTERVAL_MS).await;
        assert_eq!(a.accepts(), stopped_at, "removed target still probed");
        assert!(b.accepts() >= b_at + 3, "kept target still probed");

        // shutdown() returns once no probe runs; receivers then see the channel closed.
        checker.shutdown().await;
        sleep_ms(10).await;
        let b_at = b.accepts();
        sleep_ms(3 * INTERVAL_MS).await;
        assert_eq!(b.accepts(), b_at);
        rx.borrow_and_update();
        assert!(rx.changed().await.is_err());
    }

    #[tokio::test]
    async fn dropping_the_checker_stops_probing() {
        let server = TcpServer::start("127.0.0.1:0").unwrap();
        let t = target(server.addr, check(HealthCheckKind::Tcp, 1, 1, 200));
        let mut checker = HealthChecker::new();
        let mut rx = checker.subscribe();
        checker.update([t.clone()]);
        wait_for(&mut rx, &t, "a success", |h| h.probes >= 1).await;
        drop(checker);
        // The aborted tasks drop their senders: the channel closes.
        let closed = tokio::time::timeout(Duration::from_secs(2), async {
            while rx.changed().await.is_ok() {}
        });
        closed.await.expect("channel closed after drop");
        sleep_ms(10).await;
        let at = server.accepts();
        sleep_ms(3 * INTERVAL_MS).await;
        assert_eq!(server.accepts(), at);
    }

    #[tokio::test]
    async fn ipv6_loopback_targets() {
        let (tcp, http) = match (
            TcpServer::start("[::1]:0"),
            HttpServer::start("[::1]:0", 200),
        ) {
            (Ok(tcp), Ok(http)) => (tcp, http),
            (Err(err), _) | (_, Err(err)) => {
                eprintln!("note: skipping the IPv6 test, cannot listen on [::1]: {err}");
                return;
            }
        };
        let tt = target(tcp.addr, check(HealthCheckKind::Tcp, 1, 1, 200));
        let th = target(http.addr, check(HealthCheckKind::Http, 1, 1, 200));
        let mut checker = HealthChecker::new();
        let mut rx = checker.subscribe();
        checker.update([tt.clone(), th.clone()]);
        for t in [&tt, &th] {
            let h = wait_for(&mut rx, t, "a success", |h| h.consecutive_successes >= 1).await;
            assert!(h.healthy && h.last_error.is_none(), "{t}: {h:?}");
        }
        let host = format!("Host: [::1]:{}\r\n", http.addr.port());
        assert!(
            http.first_request().contains(&host),
            "{}",
            http.first_request()
        );

        http.set_reply(500);
        let h = wait_for(&mut rx, &th, "unhealthy", |h| !h.healthy).await;
        assert_eq!(h.last_error.as_deref(), Some("HTTP 500"));
        tcp.stop().await;
        let h = wait_for(&mut rx, &tt, "unhealthy", |h| !h.healthy).await;
        assert_eq!(h.last_error.as_deref(), Some("connect refused"));
        checker.shutdown().await;
    }
}
