//! The API's way to the agent's flow events switch ([`crate::flow_events::switch`]):
//! `SetFlowEvents` is a call into the agent's loop, which owns the datapath and reloads the
//! programs before it answers; `ListState` reads the switch the agent last published.

use tokio::sync::{mpsc, watch};
use tonic::Status;

use super::agent_call::{self, AgentCall};
use super::pb;
use crate::flow_events::switch::{FlowEventsState, SwitchSource};

/// The agent's answer to a `SetFlowEvents`: the switch after it, and whether the programs were
/// reloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowEventsReply {
    pub state: FlowEventsState,
    pub changed: bool,
}

/// The API's setting (`None`: reset) and where the answer goes.
pub type FlowEventsCall = AgentCall<Option<bool>, FlowEventsReply>;

/// The API's end of the channel to the agent's loop. Cloning shares it.
#[derive(Debug, Clone)]
pub struct FlowEventsChannel {
    calls: mpsc::Sender<FlowEventsCall>,
    published: watch::Receiver<FlowEventsState>,
}

impl FlowEventsChannel {
    /// The channel, the receiver of calls the agent's loop answers, and the sender it publishes
    /// the switch on (starting with `initial`).
    pub fn new(
        initial: FlowEventsState,
    ) -> (
        Self,
        mpsc::Receiver<FlowEventsCall>,
        watch::Sender<FlowEventsState>,
    ) {
        let (calls, receiver) = mpsc::channel(16);
        let (publish, published) = watch::channel(initial);
        (Self { calls, published }, receiver, publish)
    }

    /// Sends the API's setting to the agent's loop and waits for its answer.
    pub async fn call(&self, enabled: Option<bool>) -> Result<FlowEventsReply, Status> {
        agent_call::call(&self.calls, enabled).await
    }

    /// The switch the agent last published.
    pub fn state(&self) -> FlowEventsState {
        *self.published.borrow()
    }
}

/// The switch as the API reports it.
pub fn state_to_pb(state: &FlowEventsState) -> pb::FlowEvents {
    pb::FlowEvents {
        enabled: state.running,
        source: match state.source {
            SwitchSource::Flag => pb::FlowEventsSource::Flag,
            SwitchSource::ConfigFile => pb::FlowEventsSource::ConfigFile,
            SwitchSource::Api => pb::FlowEventsSource::Api,
        } as i32,
        wanted: state.wanted,
        flag: state.flag,
        config_file: state.file,
        api: state.api,
    }
}
