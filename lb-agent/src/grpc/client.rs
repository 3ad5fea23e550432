//! Clients of the API, for `lbctl` and the tests: on the agent's unix socket ([`connect_unix`]),
//! or from another machine on its TCP listener with TLS ([`connect_tls`]), presenting a client
//! certificate as the agent requires.

use std::{path::Path, time::Duration};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use super::{pb::load_balancer_client::LoadBalancerClient, pem};

/// How long connecting (TCP, TLS and HTTP/2 handshakes) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the API on the unix socket at `path` (tonic requires a URI; it is not used).
pub async fn connect_unix(path: &Path) -> Result<LoadBalancerClient<Channel>> {
    let path = path.to_path_buf();
    let endpoint = Endpoint::from_static("http://lb-agent.invalid");
    let channel = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
    }));
    let channel = tokio::time::timeout(CONNECT_TIMEOUT, channel)
        .await
        .context("connecting to the gRPC unix socket: timed out")?
        .context("connecting to the gRPC unix socket")?;
    Ok(LoadBalancerClient::new(channel))
}

/// What a client of the agent's TCP listener (`lb-agent run --grpc-tcp`) presents and trusts,
/// PEM-encoded.
#[derive(Clone)]
pub struct ClientTls {
    /// The client's certificate chain: the agent accepts it if its `--grpc-tls-client-ca` signed
    /// it.
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// CA certificate(s) the agent's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// The name the agent's certificate must carry. `None`: the endpoint's host, a DNS name or an
    /// IP address (matched against the certificate's IP address entries).
    pub server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Reads and checks the files (PEM): a missing file or one without the expected block is an
    /// error naming it.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        ca: &Path,
        server_name: Option<String>,
    ) -> Result<Self> {
        Ok(Self {
            cert_pem: pem::certificates(cert, "the client certificate")?,
            key_pem: pem::private_key(key, "the client key")?,
            ca_pem: pem::certificates(ca, "the CA certificate")?,
            server_name,
        })
    }
}

/// The URI of the agent's TCP listener: `https://HOST:PORT`, the port required (the agent has no
/// default one), nothing after it.
pub fn parse_endpoint(text: &str) -> Result<Uri> {
    let expected = "expected https://HOST:PORT, e.g. https://192.0.2.1:50051";
    let uri: Uri = text
        .parse()
        .with_context(|| format!("{text:?}: not a URI ({expected})"))?;
    if uri.scheme_str() != Some("https") {
        bail!("{text:?}: {expected} (the agent serves TCP with TLS only)");
    }
    if uri.port_u16().is_none() {
        bail!("{text:?}: no port number ({expected})");
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        bail!("{text:?}: {expected}, without a path");
    }
    Ok(uri)
}

/// Connects to the API at `endpoint` (`https://HOST:PORT`) with TLS: verifies the agent's
/// certificate with `tls.ca_pem` and presents the client certificate. An agent that refuses the
/// client certificate does so after the handshake (TLS 1.3), so that shows at the first call.
pub async fn connect_tls(endpoint: &Uri, tls: &ClientTls) -> Result<LoadBalancerClient<Channel>> {
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&tls.ca_pem))
        .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
        .timeout(CONNECT_TIMEOUT);
    if let Some(name) = &tls.server_name {
        config = config.domain_name(name.clone());
    }
    let channel = Endpoint::from(endpoint.clone())
        .connect_timeout(CONNECT_TIMEOUT)
        .tls_config(config)
        .context("TLS configuration")?;
    let address = endpoint.authority().map_or("", |a| a.as_str());
    let channel = tokio::time::timeout(CONNECT_TIMEOUT * 2, channel.connect())
        .await
        .with_context(|| format!("connecting to {address} with TLS: timed out"))?
        .with_context(|| format!("connecting to {address} with TLS"))?;
    Ok(LoadBalancerClient::new(channel))
}

/// What a TLS error under a failed connection or call says about the certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsFailure {
    /// This client did not accept the agent's certificate (another CA, another name, expired),
    /// e.g. `invalid peer certificate: UnknownIssuer`.
    AgentCertificate(String),
    /// The agent ended the session with this alert, e.g. `DecryptError`. With TLS 1.3 the agent
    /// checks the client certificate after the client's half of the handshake, so a refused one
    /// shows this way, at the first call.
    AlertReceived(String),
}

/// The TLS failure `error` itself is or wraps (an I/O error carrying a TLS error), if any; not
/// its sources (walk them, e.g. `anyhow::Error::chain`).
pub fn tls_failure(error: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
    let io = error.downcast_ref::<std::io::Error>();
    let tls = match io {
        Some(io) => io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
        None => error.downcast_ref::<rustls::Error>(),
    };
    match tls {
        Some(rustls::Error::InvalidCertificate(_)) => {
            Some(TlsFailure::AgentCertificate(error.to_string()))
        }
        Some(rustls::Error::AlertReceived(alert)) => {
            Some(TlsFailure::AlertReceived(format!("{alert:?}")))
        }
        Some(_) => None,
        // After the handshake, I/O errors reach the caller through h2, which keeps only their
        // text: rustls' `received fatal alert: <alert>`.
        None => io?
            .to_string()
            .strip_prefix("received fatal alert: ")
            .map(|alert| TlsFailure::AlertReceived(alert.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_https_with_a_port() {
        let uri = parse_endpoint("https://192.0.2.1:50051").unwrap();
        assert_eq!(
            (uri.host(), uri.port_u16()),
            (Some("192.0.2.1"), Some(50051))
        );
        let uri = parse_endpoint("https://[2001:db8::1]:50051").unwrap();
        assert_eq!(uri.host(), Some("[2001:db8::1]"));
        assert!(parse_endpoint("https://lb-node.example:50051/").is_ok());
        for (text, says) in [
            ("http://192.0.2.1:50051", "TLS only"),
            ("192.0.2.1:50051", "expected https://HOST:PORT"),
            ("https://192.0.2.1", "no port number"),
            ("https://192.0.2.1:port", "no port number"),
            ("https://192.0.2.1:50051/lb.v1", "without a path"),
            ("https://[2001:db8::1:50051", "not a URI"),
        ] {
            let err = format!("{:#}", parse_endpoint(text).unwrap_err());
            assert!(err.contains(says), "{text}: {err}");
        }
    }

    #[test]
    fn tls_failures_are_told_apart_under_io_errors() {
        use std::io::{Error, ErrorKind};

        use rustls::{AlertDescription, CertificateError};

        let alert = Error::new(
            ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::DecryptError),
        );
        assert_eq!(
            tls_failure(&alert),
            Some(TlsFailure::AlertReceived("DecryptError".into()))
        );
        // As h2 passes it on: the text only.
        let text = Error::new(ErrorKind::BrokenPipe, alert.to_string());
        assert_eq!(tls_failure(&text), tls_failure(&alert));
        let theirs = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert!(matches!(
            tls_failure(&theirs),
            Some(TlsFailure::AgentCertificate(said)) if said.contains("UnknownIssuer")
        ));
        let closed = Error::new(ErrorKind::ConnectionReset, "connection reset by peer");
        assert_eq!(tls_failure(&closed), None);
    }
}
