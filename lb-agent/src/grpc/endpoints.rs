//! The API's way to the agent's endpoint registrations ([`crate::endpoints`]): `RegisterEndpoint`
//! and `ReleaseEndpoint` are calls into the agent's loop, which owns the datapath and attaches or
//! detaches before it answers (so a CNI ADD returns with the pod's programs in place); `ListState`
//! reads the registrations the agent last published.

use tokio::sync::{mpsc, watch};
use tonic::Status;

use super::agent_call::{self, AgentCall};
use super::source::Change;
use crate::endpoints::{Endpoint, EndpointKey, Placement};

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
pub type EndpointCall = AgentCall<EndpointRequest, EndpointReply>;

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
        agent_call::call(&self.calls, request).await
    }

    /// The registrations the agent last published, ordered by key.
    pub fn registered(&self) -> Vec<(Endpoint, Placement)> {
        self.registered.borrow().clone()
    }
}
