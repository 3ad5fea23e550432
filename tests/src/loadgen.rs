//! Traffic for the end-to-end benchmark: nginx and iperf3 servers on the backends, wrk and iperf3
//! clients, and a `sendmmsg` UDP sender with `recvmmsg` receivers that count what arrives.
//!
//! Every server is a [`Server`] guard (killed with its process tree on drop); every client run is
//! bounded by a timeout; the UDP threads stop on a flag and have a hard lifetime of their own.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::{
    netns::Netns,
    procs::{self, Server},
};

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("lb-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `ss` in `ns` until something listens on `addr:port` (TCP), the server dies, or `timeout`.
pub fn wait_listening(
    ns: &Netns,
    addr: IpAddr,
    port: u16,
    server: Option<&mut Server>,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let want = SocketAddr::new(addr, port).to_string();
    let mut server = server;
    loop {
        procs::check_interrupted()?;
        if let Some(s) = server.as_deref_mut() {
            s.check_running()?;
        }
        let mut cmd = ns.command("ss");
        cmd.args(["-Hltn"]);
        let out = procs::run_ok(cmd, Duration::from_secs(5))?;
        if out
            .lines()
            .any(|l| l.split_whitespace().nth(3) == Some(want.as_str()))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "nothing listens on {want} in {} after {timeout:?}",
                ns.name()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// nginx on one backend: `worker_processes` workers, `access_log off`, on `addr:port`, answering
/// every request with a one-line body naming the backend, its address and the peer's address
/// (`backend=b1 server=203.0.113.6 client=192.0.2.2`), so a probe can tell who answered and whether
/// the client address survived (DNAT) or was replaced (a proxy).
pub fn start_nginx(
    ns: &Netns,
    name: &str,
    addr: Ipv4Addr,
    port: u16,
    workers: usize,
    dir: &Path,
) -> Result<Server> {
    let root = dir.join(format!("nginx-{name}"));
    std::fs::create_dir_all(&root)?;
    let r = root.display();
    let conf = format!(
        "worker_processes {workers};
daemon off;
master_process on;
pid {r}/nginx.pid;
error_log {r}/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {r}/body;
    proxy_temp_path {r}/proxy;
    fastcgi_temp_path {r}/fastcgi;
    uwsgi_temp_path {r}/uwsgi;
    scgi_temp_path {r}/scgi;
    server {{
        listen {addr}:{port} backlog=4096 reuseport;
        location / {{
            default_type text/plain;
            return 200 \"backend={name} server=$server_addr client=$remote_addr\\n\";
        }}
    }}
}}
"
    );
    let conf_path = root.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = ns.command("nginx");
    cmd.arg("-e")
        .arg(root.join("startup.log"))
        .arg("-p")
        .arg(&root)
        .arg("-c")
        .arg(&conf_path);
    let mut server = Server::spawn(&format!("nginx {name}"), cmd, &root.join("stdout.log"))?;
    wait_listening(
        ns,
        addr.into(),
        port,
        Some(&mut server),
        Duration::from_secs(10),
    )
    .with_context(|| format!("nginx {name}: {}", server.log_tail()))?;
    Ok(server)
}

/// A persistent iperf3 server bound to `addr:port`.
pub fn start_iperf3(
    ns: &Netns,
    name: &str,
    addr: Ipv4Addr,
    port: u16,
    dir: &Path,
) -> Result<Server> {
    let mut cmd = ns.command("iperf3");
    // --idle-timeout: a server left mid-test by a killed client resets itself.
    cmd.args([
        "-s",
        "-B",
        &addr.to_string(),
        "-p",
        &port.to_string(),
        "--idle-timeout",
        "60",
    ]);
    let mut server = Server::spawn(
        &format!("iperf3 {name}"),
        cmd,
        &dir.join(format!("iperf3-{name}.log")),
    )?;
    wait_listening(
        ns,
        addr.into(),
        port,
        Some(&mut server),
        Duration::from_secs(10),
    )?;
    Ok(server)
}

/// One plain HTTP/1.0 GET from inside `ns`; returns the body's first line.
pub fn http_get(ns: &Netns, target: SocketAddr, timeout: Duration) -> Result<String> {
    ns.run(move || -> Result<String> {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect_timeout(&target, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")?;
        let mut resp = Vec::new();
        s.take(64 * 1024).read_to_end(&mut resp)?;
        let text = String::from_utf8_lossy(&resp);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .context("no end of HTTP headers")?;
        ensure!(head.starts_with("HTTP/1.1 200"), "HTTP status: {head}");
        Ok(body.lines().next().unwrap_or_default().to_string())
    })
}

/// The fields of a probe answer `backend=b1 server=... client=...`.
pub fn parse_probe(body: &str) -> (String, String) {
    let field = |k: &str| {
        body.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_default()
            .to_string()
    };
    (field("backend="), field("client="))
}

/// The result of one wrk run.
#[derive(Debug, Clone)]
pub struct WrkResult {
    pub requests_per_sec: f64,
    pub requests: u64,
    pub socket_errors: u64,
    pub non_2xx: u64,
    /// The "Latency" line: average and maximum, as wrk prints them (e.g. "2.10ms", "1.02s").
    pub latency_avg: String,
    pub latency_max: String,
}

/// `wrk` from `ns` against `http://target/` with `Connection: close`, so every request is a new TCP
/// connection: requests/s = connections/s. With several targets thread i uses target i mod n.
pub fn run_wrk(
    ns: &Netns,
    targets: &[SocketAddr],
    threads: usize,
    connections: usize,
    seconds: u64,
) -> Result<WrkResult> {
    let first = *targets.first().context("wrk without a target")?;
    let mut cmd = ns.command("wrk");
    cmd.args([
        &format!("-t{threads}"),
        &format!("-c{connections}"),
        &format!("-d{seconds}s"),
        "--timeout",
        "2s",
        "-H",
        "Connection: close",
    ]);
    // Several targets: thread i connects to target i mod n (wrk's per-thread address), so the
    // client itself spreads its connections without anything balancing in between.
    let _script = if targets.len() > 1 {
        let dir = TempDir::new("wrk")?;
        let list: Vec<String> = targets
            .iter()
            .map(|t| format!("{{\"{}\", \"{}\"}}", t.ip(), t.port()))
            .collect();
        let path = dir.path().join("spread.lua");
        std::fs::write(
            &path,
            format!(
                "local targets = {{ {} }}\nlocal n = 0\n\
                 function setup(thread)\n\
                 \x20 local t = targets[n % #targets + 1]\n\
                 \x20 n = n + 1\n\
                 \x20 thread.addr = wrk.lookup(t[1], t[2])[1]\n\
                 end\n",
                list.join(", ")
            ),
        )?;
        cmd.arg("-s").arg(&path);
        Some(dir)
    } else {
        None
    };
    cmd.arg(format!("http://{first}/"));
    let done = procs::run_bounded(cmd, Duration::from_secs(seconds + 15))?;
    ensure!(
        done.status.success(),
        "wrk failed ({}): {}",
        done.status,
        done.stderr.trim()
    );
    parse_wrk(&done.stdout)
}

/// Parses wrk's text summary.
pub fn parse_wrk(out: &str) -> Result<WrkResult> {
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk output: {out}"))?;
    // "  12345 requests in 5.00s, 1.2MB read"
    let requests = out
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // "  Socket errors: connect 0, read 12, write 0, timeout 3"
    let socket_errors = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Socket errors:"))
        .map(|l| {
            l.split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    let non_2xx = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    // "    Latency     2.10ms    1.20ms  31.00ms   90.12%"
    let latency: Vec<&str> = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Latency"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    Ok(WrkResult {
        requests_per_sec: rps,
        requests,
        socket_errors,
        non_2xx,
        latency_avg: latency.first().copied().unwrap_or_default().to_string(),
        latency_max: latency.get(2).copied().unwrap_or_default().to_string(),
    })
}

/// TCP counters of namespace `ns` (`/proc/net/snmp` and `/proc/net/netstat`, read inside it), named
/// `Tcp.RetransSegs`, `TcpExt.TCPSynRetrans`, ...
pub fn tcp_counters(ns: &Netns) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for file in ["/proc/net/snmp", "/proc/net/netstat"] {
        let Ok(o) = ns.exec("cat", &[file]) else {
            continue;
        };
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        // Pairs of lines: "Tcp: Name1 Name2 ..." then "Tcp: 1 2 ...".
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            let (Some((prefix, names)), Some((_, values))) =
                (names.split_once(':'), values.split_once(':'))
            else {
                continue;
            };
            for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
                if let Ok(v) = v.parse::<u64>() {
                    out.insert(format!("{prefix}.{n}"), v);
                }
            }
        }
    }
    out
}

/// Packets dropped by the interfaces of `ns` (rx + tx, all interfaces), from `ip -s -j link`.
pub fn link_drops(ns: &Netns) -> Option<u64> {
    let out = ns.exec("ip", &["-s", "-j", "link", "show"]).ok()?;
    let links: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(
        links
            .as_array()?
            .iter()
            .map(|l| {
                ["rx", "tx"]
                    .iter()
                    .filter_map(|d| l["stats64"][d]["dropped"].as_u64())
                    .sum::<u64>()
            })
            .sum(),
    )
}

/// The counters of `after` that grew since `before`, with how much.
pub fn grown(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> std::collections::BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, a)| {
            let d = a.saturating_sub(before.get(k).copied().unwrap_or(0));
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// The result of one iperf3 run.
#[derive(Debug, Clone)]
pub struct IperfResult {
    /// Received by the receiving end (the server, or the client with `-R`).
    pub gbit_per_sec: f64,
    pub retransmits: u64,
}

/// `iperf3 -c` from `ns` to `target` for `seconds` (one TCP stream; `reverse` = the server sends).
pub fn run_iperf3(
    ns: &Netns,
    target: SocketAddr,
    seconds: u64,
    reverse: bool,
) -> Result<IperfResult> {
    let mut cmd = ns.command("iperf3");
    cmd.args([
        "-c",
        &target.ip().to_string(),
        "-p",
        &target.port().to_string(),
        "-t",
        &seconds.to_string(),
        "-J",
        "--connect-timeout",
        "3000",
    ]);
    if reverse {
        // The client receives: give up on a stalled stream instead of waiting 120 s.
        cmd.args(["-R", "--rcv-timeout", "5000"]);
    }
    let done = procs::run_bounded(cmd, Duration::from_secs(seconds + 15))?;
    let json: Value = serde_json::from_str(&done.stdout).with_context(|| {
        format!(
            "iperf3 output is not JSON ({}): {} {}",
            done.status,
            done.stdout.chars().take(200).collect::<String>(),
            done.stderr.trim()
        )
    })?;
    if let Some(err) = json.get("error").and_then(Value::as_str) {
        bail!("iperf3: {err}");
    }
    ensure!(done.status.success(), "iperf3 exited with {}", done.status);
    let bps = json
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .context("iperf3 JSON has no end.sum_received.bits_per_second")?;
    let retransmits = json
        .pointer("/end/sum_sent/retransmits")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Ok(IperfResult {
        gbit_per_sec: bps / 1e9,
        retransmits,
    })
}

/// UDP receivers on one address:port: `threads` sockets sharing the port with `SO_REUSEPORT`, each
/// read with `recvmmsg` on its own thread inside the namespace. Counts datagrams until dropped.
pub struct UdpSink {
    pub addr: SocketAddr,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

const RECV_BATCH: usize = 64;

impl UdpSink {
    /// Binds and starts the threads. `lifetime` bounds them even if the sink is leaked.
    pub fn start(ns: &Netns, addr: SocketAddr, threads: usize, lifetime: Duration) -> Result<Self> {
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        for _ in 0..threads.max(1) {
            let (count, stop, ready) = (count.clone(), stop.clone(), ready_tx.clone());
            handles.push(ns.spawn(move || {
                let socket = match reuseport_udp(addr) {
                    Ok(s) => {
                        let _ = ready.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                drop(ready);
                receive_loop(&socket, &count, &stop, Instant::now() + lifetime);
            }));
        }
        drop(ready_tx);
        let sink = Self {
            addr,
            count,
            stop,
            threads: handles,
        };
        for _ in 0..threads.max(1) {
            ready_rx
                .recv_timeout(Duration::from_secs(5))
                .context("UDP receiver did not start")?
                .with_context(|| format!("binding UDP {addr}"))?;
        }
        Ok(sink)
    }

    pub fn datagrams(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn reuseport_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket syscalls on a descriptor this function owns; the fd is wrapped in a
    // UdpSocket right away so it is closed on every path.
    let socket = unsafe {
        let fd = libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        <UdpSocket as std::os::fd::FromRawFd>::from_raw_fd(fd)
    };
    let fd = socket.as_raw_fd();
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    // Root may exceed net.core.rmem_max: 8 MiB of queue absorbs scheduling gaps on a busy box.
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20)?;
    bind_addr(fd, addr)?;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(socket)
}

fn bind_addr(fd: i32, addr: SocketAddr) -> std::io::Result<()> {
    let rc = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sin is a valid sockaddr_in for the length given.
            unsafe {
                libc::bind(
                    fd,
                    &sin as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sin6 is a valid sockaddr_in6 for the length given.
            unsafe {
                libc::bind(
                    fd,
                    &sin6 as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn setsockopt_int(fd: i32, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: value outlives the call and the length matches its type.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn receive_loop(socket: &UdpSocket, count: &AtomicU64, stop: &AtomicBool, until: Instant) {
    let mut bufs = vec![[0u8; 2048]; RECV_BATCH];
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data; zeroed is its empty state.
    let mut msgs: Vec<libc::mmsghdr> = (0..RECV_BATCH)
        .map(|_| unsafe { std::mem::zeroed::<libc::mmsghdr>() })
        .collect();
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let fd = socket.as_raw_fd();
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        // Blocks until at least one datagram (MSG_WAITFORONE) or the 50 ms SO_RCVTIMEO.
        // SAFETY: msgs and the buffers they point to live across the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                RECV_BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            count.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// What the sender did.
#[derive(Debug, Clone, Copy)]
pub struct UdpSent {
    pub datagrams: u64,
    pub seconds: f64,
    /// sendmmsg calls that failed (e.g. ENOBUFS, ECONNREFUSED after an ICMP error).
    pub errors: u64,
}

/// Sends `payload`-byte datagrams to `targets` from inside `ns` for `duration`: `flows` connected
/// sockets (one source port each, so flows spread over backends; flow i to target i mod n), `batch` datagrams per `sendmmsg`,
/// cycling through the sockets. Runs as fast as the sockets take them.
pub fn udp_blast(
    ns: &Netns,
    targets: &[SocketAddr],
    flows: usize,
    batch: usize,
    payload: usize,
    duration: Duration,
) -> Result<UdpSent> {
    let targets = targets.to_vec();
    ns.run(move || -> Result<UdpSent> {
        let first = *targets.first().context("UDP without a target")?;
        let bind: SocketAddr = if first.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        // Flow i goes to target i mod n.
        let sockets = (0..flows.max(1))
            .map(|i| {
                let s = UdpSocket::bind(bind)?;
                s.connect(targets[i % targets.len()])?;
                Ok(s)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let data = vec![0x5au8; payload];
        let mut iovs: Vec<libc::iovec> = (0..batch)
            .map(|_| libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; zeroed is its empty state (no address: connected).
        let mut msgs: Vec<libc::mmsghdr> = (0..batch)
            .map(|_| unsafe { std::mem::zeroed::<libc::mmsghdr>() })
            .collect();
        for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let (mut sent, mut errors) = (0u64, 0u64);
        let start = Instant::now();
        let deadline = start + duration;
        'outer: loop {
            for s in &sockets {
                if Instant::now() >= deadline || procs::interrupted() {
                    break 'outer;
                }
                // SAFETY: msgs, iovs and data live across the call; the kernel only reads them.
                let n = unsafe {
                    libc::sendmmsg(
                        s.as_raw_fd(),
                        msgs.as_mut_ptr(),
                        batch as u32,
                        libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 {
                    sent += n as u64;
                } else {
                    errors += 1;
                    if errors.is_multiple_of(64) {
                        thread::yield_now();
                    }
                }
            }
        }
        Ok(UdpSent {
            datagrams: sent,
            seconds: start.elapsed().as_secs_f64(),
            errors,
        })
    })
}
