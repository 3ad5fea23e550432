//! A client of the API on the agent's unix socket, for `lbctl` and the tests.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::pb::load_balancer_client::LoadBalancerClient;

/// Connects to the API on the unix socket at `path` (tonic requires a URI; it is not used).
pub async fn connect_unix(path: &Path) -> Result<LoadBalancerClient<Channel>> {
    let path = path.to_path_buf();
    let endpoint = Endpoint::from_static("http://lb-agent.invalid");
    let channel = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
    }));
    let channel = tokio::time::timeout(Duration::from_secs(5), channel)
        .await
        .context("connecting to the gRPC unix socket: timed out")?
        .context("connecting to the gRPC unix socket")?;
    Ok(LoadBalancerClient::new(channel))
}
