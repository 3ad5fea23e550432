//! A call from an API handler into the agent's loop, which owns the datapath and answers once
//! the change is applied (`RegisterEndpoint`, `ReleaseEndpoint`, `SetFlowEvents`).

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

/// How long a call waits for the agent: a first policy load takes a few hundred milliseconds, a
/// reload of the programs (the verifier again) a second or so.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A request to the agent's loop and where its answer goes.
pub type AgentCall<Request, Reply> = (Request, oneshot::Sender<Result<Reply, Status>>);

/// Sends `request` on `calls` and waits for the agent's answer: `unavailable` when the agent is
/// stopping, `deadline_exceeded` after [`CALL_TIMEOUT`].
pub async fn call<Request, Reply>(
    calls: &mpsc::Sender<AgentCall<Request, Reply>>,
    request: Request,
) -> Result<Reply, Status> {
    let (reply, answer) = oneshot::channel();
    let stopped = || Status::unavailable("the agent is stopping");
    calls.send((request, reply)).await.map_err(|_| stopped())?;
    match tokio::time::timeout(CALL_TIMEOUT, answer).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(stopped()),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "the agent did not answer within {CALL_TIMEOUT:?}"
        ))),
    }
}
