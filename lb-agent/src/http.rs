//! The agent's HTTP endpoint (HTTP/1.1, hyper): `GET /metrics` (Prometheus text format 0.0.4),
//! `GET /healthz` (200 while the process runs) and `GET /readyz` (200 once the agent signalled
//! ready through [`Readiness`], 503 with the reason before). Other paths answer 404, other methods
//! on these paths 405. A malformed request gets hyper's 400 and closes only its own connection.
//!
//! [`serve`] runs until a `tokio::sync::watch` shutdown signal turns `true` (or its sender is
//! dropped): it then stops accepting, lets requests in flight finish, closes idle keep-alive
//! connections, and aborts whatever is still open after [`DRAIN_TIMEOUT`]. [`HttpServer`] binds,
//! spawns and owns such a signal for the common case.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{HeaderValue, ALLOW, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::watch,
    task::{JoinHandle, JoinSet},
};
use tracing::{debug, info, warn};

use crate::metrics::{self, Metrics};

/// How long a client may take to send a request's headers before its connection is closed.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for open connections before aborting them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the agent is ready to serve: datapath loaded and attached, first reconcile done.
/// Cloning shares the state.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<Mutex<Option<String>>>);

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// Not ready, with reason "starting".
    pub fn new() -> Self {
        Readiness(Arc::new(Mutex::new(Some("starting".into()))))
    }

    pub fn set_ready(&self) {
        *self.lock() = None;
    }

    /// Not ready; `reason` is the body of the 503 answer to `/readyz`.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.lock() = Some(reason.into());
    }

    /// `Ok` when ready, else the reason.
    pub fn status(&self) -> Result<(), String> {
        match &*self.lock() {
            None => Ok(()),
            Some(reason) => Err(reason.clone()),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.status().is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the handlers serve.
#[derive(Debug, Clone)]
struct State {
    metrics: Arc<Metrics>,
    readiness: Readiness,
}

/// Serves `listener` until `shutdown` holds `true` or its sender is dropped, then drains (see the
/// module documentation). Returns once every connection is closed and the listener is dropped.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    mut shutdown: watch::Receiver<bool>,
) {
    let state = State { metrics, readiness };
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let state = state.clone();
                    let shutdown = shutdown.clone();
                    connections.spawn(serve_connection(stream, peer, state, shutdown));
                }
                Err(err) => {
                    // EMFILE and the like: back off instead of spinning.
                    warn!(error = %err, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            // Reap finished connections so the set does not grow with every scrape.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    let open = connections.len();
    if open > 0 {
        debug!(open, "metrics endpoint: draining connections");
    }
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            open = connections.len(),
            "metrics endpoint: connections still open after the drain timeout, aborting them"
        );
        connections.shutdown().await;
    }
}

/// Resolves once `shutdown` holds `true` or its sender is gone.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    state: State,
    mut shutdown: watch::Receiver<bool>,
) {
    let service = service_fn(move |request| handle(state.clone(), request));
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = stopped(&mut shutdown) => {
            // Finishes the request in flight, if any, then closes.
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        debug!(%peer, error = %err, "metrics endpoint: connection ended with an error");
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn handle(
    state: State,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return Ok(text(StatusCode::NOT_FOUND, "not found\n"));
    }
    if request.method() != Method::GET {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return Ok(response);
    }
    Ok(match path {
        "/metrics" => {
            // Rendering may run the scrape hook, which reads BPF maps: keep it off the reactor.
            let metrics = state.metrics.clone();
            match tokio::task::spawn_blocking(move || metrics.render()).await {
                Ok(Ok(body)) => {
                    let mut response = text(StatusCode::OK, body);
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static(metrics::CONTENT_TYPE),
                    );
                    response
                }
                Ok(Err(err)) => {
                    warn!(error = %format!("{err:#}"), "rendering metrics failed");
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("rendering metrics failed: {err:#}\n"),
                    )
                }
                Err(err) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("rendering metrics failed: {err}\n"),
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        _ => match state.readiness.status() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {reason}\n"),
            ),
        },
    })
}

/// A running endpoint with its own shutdown signal. Dropping it without
/// [`shutdown`](Self::shutdown) also stops the server (the signal's sender is gone), without
/// waiting.
#[derive(Debug)]
pub struct HttpServer {
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Binds `addr` (port 0 = any free port; see [`local_addr`](Self::local_addr)) and serves on a
    /// spawned task. Binding errors are returned here, not logged later.
    pub async fn bind(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        readiness: Readiness,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let (shutdown, signal) = watch::channel(false);
        let task = tokio::spawn(serve(listener, metrics, readiness, signal));
        info!(%local_addr, "metrics endpoint listening");
        Ok(HttpServer {
            local_addr,
            shutdown,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, drains open connections and waits for the server task to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        if let Err(err) = self.task.await {
            warn!(error = %err, "metrics endpoint task failed");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use lb_common::{counters::Counter, service::TrafficStats};
    use prometheus_parse::Value;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
        time::timeout,
    };

    use super::*;
    use crate::metrics::{
        tests::{parse, value},
        DatapathSnapshot, ServiceTraffic,
    };

    const LIMIT: Duration = Duration::from_secs(10);

    pub(crate) struct Reply {
        pub status: u16,
        pub headers: HashMap<String, String>,
        pub body: String,
    }

    /// Reads one response (headers, then a `content-length` body) from `stream`.
    async fn read_reply(stream: &mut TcpStream) -> Reply {
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut chunk = [0u8; 4096];
            let n = timeout(LIMIT, stream.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "connection closed before a full response: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let headers: HashMap<String, String> = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        let length: usize = headers["content-length"].parse().unwrap();
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < length {
            let mut chunk = [0u8; 4096];
            let n = timeout(LIMIT, stream.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "connection closed in the body");
            body.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(body.len(), length);
        Reply {
            status,
            headers,
            body: String::from_utf8(body).unwrap(),
        }
    }

    async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let raw = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(raw.as_bytes()).await.unwrap();
        read_reply(&mut stream).await
    }

    pub(crate) async fn get(addr: SocketAddr, path: &str) -> Reply {
        request(addr, "GET", path).await
    }

    fn metrics() -> Arc<Metrics> {
        let metrics = Metrics::new();
        metrics.update_datapath(DatapathSnapshot {
            counters: vec![(Counter::ForwardNewFlow, 12)],
            services: vec![ServiceTraffic {
                service: "web".into(),
                stats: TrafficStats {
                    packets: 12,
                    bytes: 648,
                    new_flows: 12,
                },
            }],
            ..Default::default()
        });
        Arc::new(metrics)
    }

    async fn start(readiness: Readiness) -> HttpServer {
        HttpServer::bind("127.0.0.1:0".parse().unwrap(), metrics(), readiness)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn metrics_endpoint_serves_the_text_format() {
        let server = start(Readiness::new()).await;
        let reply = get(server.local_addr(), "/metrics").await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.headers["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        let scrape = parse(&reply.body);
        assert_eq!(
            value(&scrape, "lb_service_packets_total", &[("service", "web")]),
            Value::Counter(12.0)
        );
        assert_eq!(
            value(
                &scrape,
                "lb_datapath_packets_total",
                &[("reason", "forward_new_flow")]
            ),
            Value::Counter(12.0)
        );
        server.shutdown().await;
    }

    #[tokio::test]
    async fn healthz_and_readyz() {
        let readiness = Readiness::new();
        let server = start(readiness.clone()).await;
        let addr = server.local_addr();

        let health = get(addr, "/healthz").await;
        assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));

        let ready = get(addr, "/readyz").await;
        assert_eq!(
            (ready.status, ready.body.as_str()),
            (503, "not ready: starting\n")
        );
        readiness.set_not_ready("datapath not attached");
        let ready = get(addr, "/readyz").await;
        assert_eq!(
            (ready.status, ready.body.as_str()),
            (503, "not ready: datapath not attached\n")
        );
        readiness.set_ready();
        assert!(readiness.is_ready());
        let ready = get(addr, "/readyz").await;
        assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
        readiness.set_not_ready("reconcile failing");
        assert_eq!(get(addr, "/readyz").await.status, 503);
        // Liveness does not depend on readiness.
        assert_eq!(get(addr, "/healthz").await.status, 200);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn unknown_paths_and_methods() {
        let server = start(Readiness::new()).await;
        let addr = server.local_addr();
        assert_eq!(get(addr, "/").await.status, 404);
        assert_eq!(get(addr, "/metrics/extra").await.status, 404);
        let post = request(addr, "POST", "/metrics").await;
        assert_eq!(post.status, 405);
        assert_eq!(post.headers["allow"], "GET");
        // A query string does not change the path.
        assert_eq!(get(addr, "/healthz?verbose=1").await.status, 200);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn malformed_requests_do_not_break_the_server() {
        let server = start(Readiness::new()).await;
        let addr = server.local_addr();
        for garbage in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET /metrics HTTP/9.9\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
            b"\x00\xff\xfe\x16\x03\x01\x02\x00\r\n\r\n",
        ] {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(garbage).await.unwrap();
            let mut answer = Vec::new();
            // hyper answers 400 (or just closes); either way the connection ends.
            timeout(LIMIT, stream.read_to_end(&mut answer))
                .await
                .expect("connection closed")
                .ok();
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                answer.is_empty()
                    || answer.starts_with("HTTP/1.1 4")
                    || answer.starts_with("HTTP/1.1 505"),
                "{garbage:?}: {answer}"
            );
        }
        // A client that sends half a request and goes away.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET /metr").await.unwrap();
        drop(stream);
        assert_eq!(get(addr, "/healthz").await.status, 200);
        assert_eq!(get(addr, "/metrics").await.status, 200);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_stops_accepting() {
        let server = start(Readiness::new()).await;
        let addr = server.local_addr();
        // A keep-alive connection left idle after one request.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_reply(&mut idle).await.status, 200);

        timeout(LIMIT, server.shutdown())
            .await
            .expect("shutdown does not wait for idle connections");
        let mut rest = Vec::new();
        let n = timeout(LIMIT, idle.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "idle connection closed without a response");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still accepting after shutdown"
        );
    }

    #[tokio::test]
    async fn shutdown_lets_a_request_in_flight_finish() {
        let metrics = metrics();
        // A slow scrape: the request is in flight when the shutdown signal comes.
        metrics.set_scrape_hook(Box::new(|| {
            std::thread::sleep(Duration::from_millis(300));
            None
        }));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, signal) = watch::channel(false);
        let server = tokio::spawn(serve(listener, metrics, Readiness::new(), signal));

        let scrape = tokio::spawn(get(addr, "/metrics"));
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(true).unwrap();
        let reply = timeout(LIMIT, scrape).await.unwrap().unwrap();
        assert_eq!(reply.status, 200);
        parse(&reply.body);
        timeout(LIMIT, server).await.unwrap().unwrap();
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn dropping_the_signal_sender_stops_the_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (stop, signal) = watch::channel(false);
        let server = tokio::spawn(serve(listener, metrics(), Readiness::new(), signal));
        drop(stop);
        timeout(LIMIT, server).await.unwrap().unwrap();
    }
}
