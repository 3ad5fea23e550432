//! The API's way to the agent's endpoint registrations ([`crate::endpoints`]): `RegisterEndpoint`
//! and `ReleaseEndpoint` are calls into the agent's loop, which owns the datapath and attaches or
//! detaches before it answers (so a CNI ADD returns with the pod's programs in place); `ListState`
//! reads the registrations the agent last published.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use super::source::Change;
use crate::endpoints::{Endpoint, EndpointKey, Placement};

/// How long a call waits for the agent (a first policy load takes a few hundred milliseconds).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A request to the agent's loop.
#[derive(Debug)]
pub enum EndpointRequest {
    Register(Endpoint),
    Release(EndpointKey),
}

/// The agent's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointReply {
    Registered(Change),
    /// `false`: none was registered.
    Released(bool),
}

/// A request and where its answer goes.
pub type EndpointCall = (
    EndpointRequest,
    oneshot::Sender<Result<EndpointReply, Status>>,
);

/// The API's end of the channel to the agent's loop. Cloning shares it.
#[derive(Debug, Clone)]
pub struct EndpointChannel {
    calls: mpsc::Sender<EndpointCall>,
    registered: watch::Receiver<Vec<(Endpoint, Placement)>>,
}

impl EndpointChannel {
    /// The channel, the receiver of calls the agent's loop answers, and the sender it publishes
    /// the registrations (with their placement in the policy) on.
    #[allow(clippy::type_complexity)]
    pub fn new() -> (
        Self,
        mpsc::Receiver<EndpointCall>,
        watch::Sender<Vec<(Endpoint, Placement)>>,
    ) {
        let (calls, receiver) = mpsc::channel(64);
        let (published, registered) = watch::channel(Vec::new());
        (Self { calls, registered }, receiver, published)
    }

    /// Sends `request` to the agent's loop and waits for its answer.
    pub async fn call(&self, request: EndpointRequest) -> Result<EndpointReply, Status> {
        let (reply, answer) = oneshot::channel();
        let stopped = || Status::unavailable("the agent is stopping");
        self.calls
            .send((request, reply))
            .await
            .map_err(|_| stopped())?;
        match tokio::time::timeout(CALL_TIMEOUT, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the agent did not answer within {CALL_TIMEOUT:?}"
            ))),
        }
    }

    /// The registrations the agent last published, ordered by key.
    pub fn registered(&self) -> Vec<(Endpoint, Placement)> {
        self.registered.borrow().clone()
    }
}
