//! Backend servers that count connections and bytes themselves, so tests check what reached each
//! backend on the wire.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::{netns::Netns, topology::Topology};

/// A server's loops (accepting, receiving), each on its own thread, run step after step until the
/// value is dropped, which stops and joins them.
pub struct ServerLoops {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Default for ServerLoops {
    fn default() -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }
}

impl ServerLoops {
    /// Runs `step` on a new thread, again and again until the loops are stopped; a step should
    /// return within a few milliseconds (a non-blocking accept, a receive with a short timeout).
    pub fn spawn(&mut self, mut step: impl FnMut() + Send + 'static) {
        let stop = self.stop.clone();
        self.threads.push(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                step();
            }
        }));
    }

    /// Accepts connections on `listener` (made non-blocking here) and hands each, with its peer,
    /// to `on_accept`.
    pub fn spawn_accepting(
        &mut self,
        listener: TcpListener,
        mut on_accept: impl FnMut(TcpStream, SocketAddr) + Send + 'static,
    ) {
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        self.spawn(move || match listener.accept() {
            Ok((stream, peer)) => on_accept(stream, peer),
            Err(_) => thread::sleep(Duration::from_millis(2)),
        });
    }
}

impl Drop for ServerLoops {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Serves one accepted connection on its own thread: sends `greeting`, then reads until the client
/// closes (or nothing comes for `read_timeout`), adding what it read to `bytes`.
pub fn greet_and_count_bytes(
    mut stream: TcpStream,
    greeting: String,
    bytes: Arc<AtomicU64>,
    read_timeout: Duration,
) {
    thread::spawn(move || {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(read_timeout));
        if stream.write_all(greeting.as_bytes()).is_err() {
            return;
        }
        let mut buf = [0u8; 16384];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
}

/// A TCP server in a namespace: every connection gets `"<name>\n"` back, then the server reads until
/// the client closes. Counts accepted connections and received bytes.
pub struct TcpCountingServer {
    pub name: String,
    connections: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    _loops: ServerLoops,
}

impl TcpCountingServer {
    pub fn start(ns: &Netns, addr: impl Into<IpAddr>, port: u16, name: &str) -> Self {
        let addr = addr.into();
        let listener = ns
            .run(move || TcpListener::bind(SocketAddr::from((addr, port))))
            .unwrap_or_else(|e| panic!("bind {addr}:{port}: {e}"));
        let connections = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let mut loops = ServerLoops::default();
        let (counted, received, greeting) =
            (connections.clone(), bytes.clone(), format!("{name}\n"));
        loops.spawn_accepting(listener, move |stream, _| {
            counted.fetch_add(1, Ordering::Relaxed);
            greet_and_count_bytes(
                stream,
                greeting.clone(),
                received.clone(),
                Duration::from_secs(30),
            );
        });
        Self {
            name: name.to_string(),
            connections,
            bytes,
            _loops: loops,
        }
    }

    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Connects from inside `ns` to `target`, sends `payload`, and returns the server's greeting line
/// (the backend's name).
pub fn tcp_request(
    ns: &Netns,
    target: SocketAddr,
    payload: &'static [u8],
) -> std::io::Result<String> {
    tcp_requests(ns, target, 1, payload)
        .pop()
        .expect("one result")
}

/// Opens `count` connections one after another from inside `ns` (one thread, one `setns`), each as
/// [`tcp_request`] does, and returns each greeting or error.
pub fn tcp_requests(
    ns: &Netns,
    target: SocketAddr,
    count: usize,
    payload: &'static [u8],
) -> Vec<std::io::Result<String>> {
    ns.run(move || {
        (0..count)
            .map(|_| {
                let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
                stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                stream.set_write_timeout(Some(Duration::from_secs(3)))?;
                let greeting = read_greeting(&mut stream)?;
                // A path that loses most of the payload fails the request in bounded time, not
                // after TCP has crawled through it one retransmission at a time.
                let deadline = Instant::now() + Duration::from_secs(10);
                for chunk in payload.chunks(64 * 1024) {
                    if Instant::now() > deadline {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "payload not sent within 10 s",
                        ));
                    }
                    stream.write_all(chunk)?;
                }
                stream.shutdown(std::net::Shutdown::Write)?;
                Ok(String::from_utf8_lossy(&greeting).into_owned())
            })
            .collect()
    })
}

/// Counts the connections of `results` greeted by the backend `greeter` and the refused ones
/// (failed), for connections through a VIP whose other backend the policy denies: checks that each
/// is one or the other and that there are both (Maglev used both backends). `what` prefixes the
/// assertion messages.
pub fn greeted_and_refused(
    results: &[std::io::Result<String>],
    greeter: &str,
    what: &str,
) -> (usize, usize) {
    let greeted = results
        .iter()
        .filter(|r| r.as_deref().ok() == Some(greeter))
        .count();
    let refused = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(
        greeted + refused,
        results.len(),
        "{what}: only {greeter} answers: {results:?}"
    );
    assert!(
        greeted > 0 && refused > 0,
        "{what}: Maglev used both backends: {results:?}"
    );
    (greeted, refused)
}

/// Opens `count` connections at once from inside `ns` (a thread each), each as [`tcp_request`]
/// does, and returns each greeting or error: refused connections time out together, not one after
/// another.
pub fn parallel_tcp_requests(
    ns: &Netns,
    target: SocketAddr,
    count: usize,
    payload: &'static [u8],
) -> Vec<std::io::Result<String>> {
    std::thread::scope(|scope| {
        let attempts: Vec<_> = (0..count)
            .map(|_| scope.spawn(move || tcp_request(ns, target, payload)))
            .collect();
        attempts.into_iter().map(|a| a.join().unwrap()).collect()
    })
}

/// Opens one connection from inside `ns` and returns it with the server's greeting; the stream can be
/// used from any thread and stays open until dropped.
pub fn tcp_connect(ns: &Netns, target: SocketAddr) -> std::io::Result<(TcpStream, String)> {
    ns.run(move || {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let greeting = read_greeting(&mut stream)?;
        Ok((stream, String::from_utf8_lossy(&greeting).into_owned()))
    })
}

/// A UDP server in a namespace that answers every datagram with `"<name>"` and counts datagrams
/// and bytes received.
pub struct UdpCountingServer {
    pub name: String,
    datagrams: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    _loops: ServerLoops,
}

impl UdpCountingServer {
    pub fn start(ns: &Netns, addr: impl Into<IpAddr>, port: u16, name: &str) -> Self {
        let addr = addr.into();
        let socket = ns
            .run(move || UdpSocket::bind(SocketAddr::from((addr, port))))
            .unwrap_or_else(|e| panic!("bind udp {addr}:{port}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let datagrams = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let mut loops = ServerLoops::default();
        let (counted, received, reply) = (datagrams.clone(), bytes.clone(), name.to_string());
        let mut buf = vec![0u8; 65536];
        loops.spawn(move || {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                counted.fetch_add(1, Ordering::Relaxed);
                received.fetch_add(n as u64, Ordering::Relaxed);
                let _ = socket.send_to(reply.as_bytes(), peer);
            }
        });
        Self {
            name: name.to_string(),
            datagrams,
            bytes,
            _loops: loops,
        }
    }

    pub fn datagrams(&self) -> u64 {
        self.datagrams.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Sends one datagram from each of `count` fresh sockets (so each is a new flow) inside `ns` and
/// returns each answer (the server's name) or error.
pub fn udp_requests(
    ns: &Netns,
    target: SocketAddr,
    count: usize,
    payload: &'static [u8],
) -> Vec<std::io::Result<String>> {
    ns.run(move || {
        (0..count)
            .map(|_| {
                let bind: SocketAddr = if target.is_ipv4() {
                    "0.0.0.0:0"
                } else {
                    "[::]:0"
                }
                .parse()
                .unwrap();
                let socket = UdpSocket::bind(bind)?;
                socket.set_read_timeout(Some(Duration::from_secs(2)))?;
                socket.send_to(payload, target)?;
                let mut buf = [0u8; 256];
                let (n, from) = recv_from(&socket, &mut buf)?;
                if from != target {
                    return Err(std::io::Error::other(format!(
                        "answer from {from}, not {target}"
                    )));
                }
                Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
            })
            .collect()
    })
}

/// A [`TcpCountingServer`] on every backend of `topology` (IPv4 address, `port`), greeting with
/// `backend-<N>` (1-based).
pub fn tcp_servers_on_backends(topology: &Topology, port: u16) -> Vec<TcpCountingServer> {
    topology
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| TcpCountingServer::start(&b.ns, b.addr, port, &format!("backend-{}", i + 1)))
        .collect()
}

/// `recv_from` that waits on through signals: a socket read with a timeout (`SO_RCVTIMEO`) is
/// never restarted after a signal handler ran (signal(7)), so a signal meant for another test's
/// thread or child process would otherwise fail it with `EINTR`. The timeout still applies to each
/// attempt.
pub fn recv_from(socket: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    loop {
        match socket.recv_from(buf) {
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            result => return result,
        }
    }
}

/// The server's greeting line (without its newline), read a byte at a time so nothing after it is
/// consumed; through signals, as [`recv_from`].
fn read_greeting(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut greeting = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(1) if byte[0] != b'\n' => greeting.push(byte[0]),
            Ok(_) => return Ok(greeting),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
}
