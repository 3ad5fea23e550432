//! The plugin's way to the node's agent: `RegisterEndpoint`, `ReleaseEndpoint` and the `endpoints`
//! of `ListState`, on the agent's gRPC unix socket. [`Agent`] is what the commands
//! ([`super::command`]) call, so that they can be tested without an agent; [`GrpcAgent`] is the
//! real one, which connects at its first call (VERSION never connects).

use std::path::{Path, PathBuf};

use tonic::{transport::Channel, Code, Status};

use super::error::{CniError, ErrorCode};
use crate::{
    endpoints::{Endpoint, EndpointKey, Placement},
    grpc::{
        client::connect_unix,
        convert::{endpoint_from_pb, endpoint_to_pb, placement_from_pb},
        pb::{self, load_balancer_client::LoadBalancerClient},
    },
};

/// Why a call to the agent failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentError {
    /// No agent answers on the socket (not running, restarting, or the socket is elsewhere), or
    /// it stopped before answering.
    Unreachable(String),
    /// The agent answered with an error (its message names the offending field).
    Answered(Code, String),
}

impl AgentError {
    fn from_status(status: Status) -> Self {
        match status.code() {
            // tonic reports a broken connection as UNAVAILABLE; the agent says so when stopping.
            Code::Unavailable => Self::Unreachable(status.message().to_string()),
            code => Self::Answered(code, status.message().to_string()),
        }
    }

    /// The CNI error for the runtime: an agent that is away or slow is worth a retry (code 11),
    /// a refusal is not.
    pub fn into_cni(self, socket: &Path, what: &str) -> CniError {
        match self {
            Self::Unreachable(cause) => CniError::new(
                ErrorCode::TryAgainLater,
                format!(
                    "{what}: the lb agent is not reachable at {} (is lb-agent running on this \
                     node, with --grpc-socket there?)",
                    socket.display()
                ),
                cause,
            ),
            Self::Answered(Code::DeadlineExceeded, message) => CniError::new(
                ErrorCode::TryAgainLater,
                format!("{what}: the lb agent did not answer in time"),
                message,
            ),
            Self::Answered(code, message) => CniError::new(
                ErrorCode::AgentRefused,
                format!("{what}: the lb agent refused it ({code:?})"),
                message,
            ),
        }
    }
}

/// The calls the plugin makes.
pub trait Agent {
    /// `RegisterEndpoint`; `true` when no endpoint had this key before.
    fn register(&mut self, endpoint: &Endpoint) -> Result<bool, AgentError>;
    /// `ReleaseEndpoint`; `false` when none was registered.
    fn release(&mut self, key: &EndpointKey) -> Result<bool, AgentError>;
    /// The registered endpoints (`ListState`) and where each went in the policy (`None`: the
    /// agent did not say).
    fn endpoints(&mut self) -> Result<Vec<(Endpoint, Option<Placement>)>, AgentError>;
}

/// The agent on its unix socket.
pub struct GrpcAgent {
    socket: PathBuf,
    connected: Option<(tokio::runtime::Runtime, LoadBalancerClient<Channel>)>,
}

impl GrpcAgent {
    /// Does not connect yet.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            connected: None,
        }
    }

    /// Runs `call` with a connected client, connecting first if needed.
    fn call<T>(
        &mut self,
        call: impl AsyncFnOnce(&mut LoadBalancerClient<Channel>) -> Result<T, Status>,
    ) -> Result<T, AgentError> {
        if self.connected.is_none() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|err| AgentError::Unreachable(format!("starting tokio: {err}")))?;
            let client = runtime
                .block_on(connect_unix(&self.socket))
                .map_err(|err| AgentError::Unreachable(format!("{err:#}")))?;
            self.connected = Some((runtime, client));
        }
        let (runtime, client) = self.connected.as_mut().expect("connected above");
        runtime
            .block_on(call(client))
            .map_err(AgentError::from_status)
    }
}

impl Agent for GrpcAgent {
    fn register(&mut self, endpoint: &Endpoint) -> Result<bool, AgentError> {
        // The placement field is the agent's to fill (ListState); a request leaves it unspecified.
        let mut message = endpoint_to_pb(endpoint, Placement::NotPlaced);
        message.placement = pb::EndpointPlacement::Unspecified as i32;
        self.call(async move |client| {
            let request = pb::RegisterEndpointRequest {
                endpoint: Some(message),
            };
            Ok(client
                .register_endpoint(request)
                .await?
                .into_inner()
                .created)
        })
    }

    fn release(&mut self, key: &EndpointKey) -> Result<bool, AgentError> {
        let request = pb::ReleaseEndpointRequest {
            container_id: key.0.clone(),
            interface_name: key.1.clone(),
        };
        self.call(async move |client| {
            Ok(client
                .release_endpoint(request)
                .await?
                .into_inner()
                .released)
        })
    }

    fn endpoints(&mut self) -> Result<Vec<(Endpoint, Option<Placement>)>, AgentError> {
        let listed = self.call(async |client| {
            Ok(client
                .list_state(pb::ListStateRequest {})
                .await?
                .into_inner()
                .endpoints)
        })?;
        listed
            .into_iter()
            .enumerate()
            .map(|(i, endpoint)| {
                let placement = placement_from_pb(endpoint.placement);
                let endpoint = endpoint_from_pb(Some(endpoint), &format!("endpoints[{i}]"))
                    .map_err(|err| {
                        AgentError::Answered(Code::Internal, format!("ListState: {err}"))
                    })?;
                Ok((endpoint, placement))
            })
            .collect()
    }
}
