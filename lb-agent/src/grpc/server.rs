//! The tonic service ([`LoadBalancerApi`]) and its listeners: a unix socket ([`serve_unix`], mode
//! 0600) and TCP with TLS and required client certificates ([`serve_tcp_tls`]).

use std::{
    fs,
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    pin::Pin,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context, Result};
use futures::{Stream, StreamExt};
use tokio::{net::UnixListener, sync::watch, task::JoinHandle};
use tokio_stream::wrappers::{
    errors::BroadcastStreamRecvError, BroadcastStream, UnixListenerStream,
};
use tonic::{
    transport::{server::TcpIncoming, Certificate, Identity, Server, ServerTlsConfig},
    Request, Response, Status,
};
use tracing::{debug, info, warn};

use super::{
    convert,
    endpoints::{EndpointChannel, EndpointReply, EndpointRequest},
    events::EventBus,
    flow_events,
    pb::{self, load_balancer_server::LoadBalancerServer},
    pem,
    source::{ApiError, Change, GrpcSource},
};
use crate::config::Config;

/// How long [`GrpcServer::shutdown`] waits for calls in flight before aborting them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What the agent last applied, as `ListState` reports it.
#[derive(Debug, Clone, Default)]
pub struct AppliedView {
    /// The merged config (file, API, Kubernetes).
    pub config: Config,
    /// Backends no service names any more, kept while their tracked flows live
    /// (`Datapath::retired_backends`).
    pub retired_backends: Vec<(IpAddr, u16)>,
    /// `config` holds the services an earlier agent pinned, read back from the maps
    /// (`Datapath::programmed_services_read_back`): the agent keeps them until its sources are
    /// listed (Kubernetes), and has applied nothing yet.
    pub adopted: bool,
}

/// The `lb.v1.LoadBalancer` service: requests go to a [`GrpcSource`], `ListState` also reads the
/// applied state, `StreamEvents` relays an [`EventBus`].
#[derive(Debug, Clone)]
pub struct LoadBalancerApi {
    source: GrpcSource,
    events: EventBus,
    applied: Option<watch::Receiver<AppliedView>>,
    /// Turns `true` (or closes) when the server stops: ends the event streams, which would
    /// otherwise hold a graceful shutdown open forever.
    stopping: watch::Receiver<bool>,
}

impl LoadBalancerApi {
    /// `applied`: what the agent last applied (`None`: `ListState` leaves `applied` out).
    /// `stopping`: event streams end when it turns `true` or its sender is dropped.
    pub fn new(
        source: GrpcSource,
        events: EventBus,
        applied: Option<watch::Receiver<AppliedView>>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            source,
            events,
            applied,
            stopping,
        }
    }
}

impl LoadBalancerApi {
    fn endpoint_channel(&self) -> Result<EndpointChannel, Status> {
        self.source.endpoint_channel().ok_or_else(|| {
            Status::unimplemented("this server takes no endpoint registrations (not an agent)")
        })
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl pb::load_balancer_server::LoadBalancer for LoadBalancerApi {
    async fn upsert_service(
        &self,
        request: Request<pb::UpsertServiceRequest>,
    ) -> Result<Response<pb::UpsertServiceResponse>, Status> {
        let service = convert::service_from_pb(request.into_inner().service, "service")?;
        let (name, vip, port) = (service.name.clone(), service.vip, service.port);
        let change = self.source.upsert_service(service).inspect_err(|err| {
            debug!(error = %err, "gRPC UpsertService rejected");
        })?;
        if change != Change::Unchanged {
            info!(service = %name, %vip, port, ?change, "gRPC: service upserted");
        }
        Ok(Response::new(pb::UpsertServiceResponse {
            created: change == Change::Created,
            changed: change != Change::Unchanged,
        }))
    }

    async fn delete_service(
        &self,
        request: Request<pb::DeleteServiceRequest>,
    ) -> Result<Response<pb::DeleteServiceResponse>, Status> {
        let key = convert::key_from_pb(request.into_inner().key, "key")?;
        self.source.delete_service(key)?;
        info!(service = %key, "gRPC: service deleted");
        Ok(Response::new(pb::DeleteServiceResponse {}))
    }

    async fn set_backends(
        &self,
        request: Request<pb::SetBackendsRequest>,
    ) -> Result<Response<pb::SetBackendsResponse>, Status> {
        let request = request.into_inner();
        let key = convert::key_from_pb(request.key, "key")?;
        let backends = convert::backends_from_pb(request.backends, "backends")?;
        let count = backends.len();
        let change = self.source.set_backends(key, backends)?;
        if change != Change::Unchanged {
            info!(service = %key, backends = count, "gRPC: backends set");
        }
        Ok(Response::new(pb::SetBackendsResponse {
            changed: change != Change::Unchanged,
        }))
    }

    async fn set_policy(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::SetPolicyResponse>, Status> {
        let policy = convert::policy_from_yaml(&request.into_inner().yaml)?;
        let change = self.source.set_policy(policy)?;
        if change != Change::Unchanged {
            info!("gRPC: policy set");
        }
        Ok(Response::new(pb::SetPolicyResponse {
            changed: change != Change::Unchanged,
        }))
    }

    async fn list_state(
        &self,
        _request: Request<pb::ListStateRequest>,
    ) -> Result<Response<pb::ListStateResponse>, Status> {
        let applied = self.applied.as_ref().map(|applied| {
            let applied = applied.borrow();
            let config = &applied.config;
            pb::AppliedState {
                maglev_seed: config.maglev_seed,
                services: config.services.iter().map(convert::service_to_pb).collect(),
                policy_yaml: convert::policy_to_yaml(&config.policy),
                retired_backends: applied
                    .retired_backends
                    .iter()
                    .map(|&(address, port)| pb::Backend {
                        address: address.to_string(),
                        port: port.into(),
                        weight: None,
                    })
                    .collect(),
                adopted: applied.adopted,
            }
        });
        Ok(Response::new(pb::ListStateResponse {
            services: self
                .source
                .services()
                .iter()
                .map(convert::service_to_pb)
                .collect(),
            policy_yaml: self
                .source
                .policy()
                .map(|p| convert::policy_to_yaml(&p))
                .unwrap_or_default(),
            applied,
            flow_events: self
                .source
                .flow_events_channel()
                .map(|channel| flow_events::state_to_pb(&channel.state())),
            endpoints: self
                .source
                .endpoint_channel()
                .map(|channel| channel.registered())
                .unwrap_or_default()
                .iter()
                .map(|(endpoint, placement)| convert::endpoint_to_pb(endpoint, *placement))
                .collect(),
        }))
    }

    async fn register_endpoint(
        &self,
        request: Request<pb::RegisterEndpointRequest>,
    ) -> Result<Response<pb::RegisterEndpointResponse>, Status> {
        let endpoint = convert::endpoint_from_pb(request.into_inner().endpoint, "endpoint")
            .inspect_err(|err| debug!(error = %err, "gRPC RegisterEndpoint rejected"))?;
        let channel = self.endpoint_channel()?;
        let change = match channel.call(EndpointRequest::Register(endpoint)).await? {
            EndpointReply::Registered(change) => change,
            EndpointReply::Released(_) => return Err(Status::internal("unexpected answer")),
        };
        Ok(Response::new(pb::RegisterEndpointResponse {
            created: change == Change::Created,
            changed: change != Change::Unchanged,
        }))
    }

    async fn release_endpoint(
        &self,
        request: Request<pb::ReleaseEndpointRequest>,
    ) -> Result<Response<pb::ReleaseEndpointResponse>, Status> {
        let request = request.into_inner();
        for (field, value) in [
            ("container_id", &request.container_id),
            ("interface_name", &request.interface_name),
        ] {
            if value.is_empty() {
                return Err(ApiError::invalid(field, "required").into());
            }
        }
        let channel = self.endpoint_channel()?;
        let key = (request.container_id, request.interface_name);
        let released = match channel.call(EndpointRequest::Release(key)).await? {
            EndpointReply::Released(released) => released,
            EndpointReply::Registered(_) => return Err(Status::internal("unexpected answer")),
        };
        Ok(Response::new(pb::ReleaseEndpointResponse { released }))
    }

    async fn set_flow_events(
        &self,
        request: Request<pb::SetFlowEventsRequest>,
    ) -> Result<Response<pb::SetFlowEventsResponse>, Status> {
        let channel = self.source.flow_events_channel().ok_or_else(|| {
            Status::unimplemented("this server has no datapath to switch (not an agent)")
        })?;
        let reply = channel.call(request.into_inner().enabled).await?;
        Ok(Response::new(pb::SetFlowEventsResponse {
            flow_events: Some(flow_events::state_to_pb(&reply.state)),
            changed: reply.changed,
        }))
    }

    type StreamEventsStream = EventStream;

    async fn stream_events(
        &self,
        _request: Request<pb::StreamEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        // Subscribed before the response is sent: every event published after the caller sees
        // the response headers reaches it.
        let events = BroadcastStream::new(self.events.subscribe());
        let mut stopping = self.stopping.clone();
        let stream = events
            .map(|item| {
                Ok(match item {
                    Ok(event) => convert::event_to_pb(&event),
                    Err(BroadcastStreamRecvError::Lagged(missed)) => pb::Event {
                        kind: pb::EventKind::EventsLost as i32,
                        text: format!("{missed} events lost: this stream fell behind"),
                        unix_time_ms: convert::unix_ms(SystemTime::now()),
                        ..Default::default()
                    },
                })
            })
            .take_until(async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Where a [`GrpcServer`] listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listening {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// A running API server. [`GrpcServer::shutdown`] stops it and removes its socket file; dropping it
/// stops it too, but leaves the socket file.
#[derive(Debug)]
pub struct GrpcServer {
    listening: Listening,
    /// (device, inode) of our socket file: shutdown removes the path only while it is still ours.
    socket_id: Option<(u64, u64)>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl GrpcServer {
    pub fn listening(&self) -> &Listening {
        &self.listening
    }

    /// The TCP address, e.g. to learn the port after binding port 0.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self.listening {
            Listening::Tcp(addr) => Some(addr),
            Listening::Unix(_) => None,
        }
    }

    /// Stops accepting, ends event streams, waits up to [`DRAIN_TIMEOUT`] for calls in flight, and
    /// removes the socket file.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        match tokio::time::timeout(DRAIN_TIMEOUT, &mut self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => warn!(error = %err, "gRPC API server failed"),
            Ok(Err(err)) => warn!(error = %err, "gRPC API server task failed"),
            Err(_) => {
                warn!("gRPC API: calls still open after the drain timeout, aborting them");
                self.task.abort();
            }
        }
        if let (Listening::Unix(path), Some(id)) = (&self.listening, self.socket_id) {
            let ours = fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == id);
            if ours {
                let _ = fs::remove_file(path);
            }
        }
        info!(listening = ?self.listening, "gRPC API stopped");
    }
}

/// Serves the API on a unix socket at `path`, created with mode 0600 (only its owner, the agent's
/// user — root — can connect). The parent directory is created if missing. A stale socket file
/// (nothing accepts on it) is replaced; a socket another process serves, or any other kind of file,
/// is an error. The socket is bound under a temporary name, given its mode, then renamed to
/// `path`, so it never exists at `path` with a wider mode. Must be called within a tokio runtime.
pub fn serve_unix(
    path: impl AsRef<Path>,
    source: GrpcSource,
    events: EventBus,
    applied: Option<watch::Receiver<AppliedView>>,
) -> Result<GrpcServer> {
    let path = path.as_ref().to_path_buf();
    let (listener, socket_id) = bind_unix(&path)?;
    let (stop, stopping) = watch::channel(false);
    let api = LoadBalancerApi::new(source, events, applied, stopping.clone());
    let server = Server::builder().add_service(LoadBalancerServer::new(api));
    let task = tokio::spawn(
        server.serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped(stopping)),
    );
    info!(path = %path.display(), "gRPC API listening on a unix socket");
    Ok(GrpcServer {
        listening: Listening::Unix(path),
        socket_id: Some(socket_id),
        stop,
        task,
    })
}

fn bind_unix(path: &Path) -> Result<(UnixListener, (u64, u64))> {
    let shown = path.display();
    let name = path
        .file_name()
        .with_context(|| format!("{shown}: not a socket path"))?
        .to_string_lossy()
        .into_owned();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("{shown}: another process is serving on this socket");
            }
            fs::remove_file(path).with_context(|| format!("removing the stale socket {shown}"))?;
            debug!(path = %shown, "removed a stale socket");
        }
        Ok(_) => bail!("{shown} exists and is not a socket; not replacing it"),
        Err(err) if err.kind() == ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("checking {shown}")),
    }
    let temporary = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary)
        .with_context(|| format!("binding the unix socket {}", temporary.display()))?;
    let placed = fs::set_permissions(&temporary, fs::Permissions::from_mode(0o600))
        .and_then(|()| fs::rename(&temporary, path))
        .and_then(|()| fs::symlink_metadata(path));
    match placed {
        Ok(meta) => Ok((listener, (meta.dev(), meta.ino()))),
        Err(err) => {
            let _ = fs::remove_file(&temporary);
            Err(err).with_context(|| format!("placing the unix socket at {shown}"))
        }
    }
}

/// PEM-encoded TLS material of [`serve_tcp_tls`].
#[derive(Clone)]
pub struct TlsConfig {
    /// The server's certificate chain.
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// CA certificate(s) that client certificates must chain to. Required: the API reprograms
    /// the datapath, so a TCP client must authenticate.
    pub client_ca_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig").finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Reads and checks the files (PEM): a missing file or one without the expected block is
    /// an error naming it.
    pub fn from_files(cert: &Path, key: &Path, client_ca: &Path) -> Result<Self> {
        Ok(Self {
            cert_pem: pem::certificates(cert, "the server certificate")?,
            key_pem: pem::private_key(key, "the server key")?,
            client_ca_pem: pem::certificates(client_ca, "the client CA certificate")?,
        })
    }
}

/// Serves the API on TCP `addr` with TLS (rustls, ring); clients must present a certificate signed
/// by `tls.client_ca_pem`. Bad PEM is an error here, not at the first connection. Must be called
/// within a tokio runtime.
pub fn serve_tcp_tls(
    addr: SocketAddr,
    tls: &TlsConfig,
    source: GrpcSource,
    events: EventBus,
    applied: Option<watch::Receiver<AppliedView>>,
) -> Result<GrpcServer> {
    let tls_config = ServerTlsConfig::new()
        .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
        .client_ca_root(Certificate::from_pem(&tls.client_ca_pem));
    let mut builder = Server::builder()
        .tls_config(tls_config)
        .context("gRPC API TLS configuration")?;
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the gRPC API {addr}"))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let local = listener.local_addr()?;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (stop, stopping) = watch::channel(false);
    let api = LoadBalancerApi::new(source, events, applied, stopping.clone());
    let server = builder.add_service(LoadBalancerServer::new(api));
    let task = tokio::spawn(server.serve_with_incoming_shutdown(incoming, stopped(stopping)));
    info!(addr = %local, "gRPC API listening on TCP with TLS");
    Ok(GrpcServer {
        listening: Listening::Tcp(local),
        socket_id: None,
        stop,
        task,
    })
}

/// Resolves once `stop` holds `true` or its sender is gone.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc::{Event, EventKind};
    use pb::load_balancer_server::LoadBalancer;

    async fn next(stream: &mut EventStream) -> Option<Result<pb::Event, Status>> {
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an item within 5 s")
    }

    #[tokio::test]
    async fn event_streams_report_lost_events_and_end_when_the_server_stops() {
        let events = EventBus::new(2);
        let (stop, stopping) = watch::channel(false);
        let api = LoadBalancerApi::new(GrpcSource::new(), events.clone(), None, stopping);
        let mut stream = api
            .stream_events(Request::new(pb::StreamEventsRequest {}))
            .await
            .unwrap()
            .into_inner();
        // Five events before the stream is read, with room for two: three lost, then the last two.
        for i in 0..5 {
            events.publish(Event::new(EventKind::Reconciled, format!("{i}")));
        }
        let lost = next(&mut stream).await.unwrap().unwrap();
        assert_eq!(lost.kind(), pb::EventKind::EventsLost);
        assert_eq!(lost.text, "3 events lost: this stream fell behind");
        for text in ["3", "4"] {
            let event = next(&mut stream).await.unwrap().unwrap();
            assert_eq!(
                (event.kind(), event.text.as_str()),
                (pb::EventKind::Reconciled, text)
            );
        }
        stop.send(true).unwrap();
        assert!(next(&mut stream).await.is_none());
    }
}
