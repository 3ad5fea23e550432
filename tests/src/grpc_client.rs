//! A tonic client of the agent's gRPC API (`lb.v1.LoadBalancer`) over its unix socket.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use lb_agent::grpc::pb::load_balancer_client::LoadBalancerClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Connects to the API on the unix socket at `path` (the URI is required by tonic and not used).
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
