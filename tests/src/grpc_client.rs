//! A tonic client of the agent's gRPC API (`lb.v1.LoadBalancer`) over its unix socket or TCP with
//! TLS, and test certificates for the latter.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

pub use lb_agent::grpc::client::connect_unix;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A CA, a server certificate for `localhost`/127.0.0.1 and a client certificate, by `openssl`.
pub fn make_certificates(dir: &Path) -> PathBuf {
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl (package openssl)");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    run(&[
        &[
            "req",
            "-x509",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=lb test CA",
        ][..],
        &ec,
        &["-keyout", "ca.key", "-out", "ca.pem"],
    ]
    .concat());
    for (name, extension) in [
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        let subject = format!("/CN={name}");
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        run(&[
            &["req", "-new", "-nodes", "-subj", &subject][..],
            &ec,
            &["-keyout", &key, "-out", &csr],
        ]
        .concat());
        let extfile = format!("{name}.ext");
        std::fs::write(dir.join(&extfile), format!("{extension}\n")).unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &extfile,
            "-out",
            &pem,
        ]);
    }
    dir.to_path_buf()
}

/// An endpoint for the API on TCP `addr` with TLS, trusting `certs`' CA for server name
/// `localhost`, presenting the client certificate if `with_identity`.
pub fn tls_endpoint(addr: SocketAddr, certs: &Path, with_identity: bool) -> Endpoint {
    let read = |name: &str| std::fs::read(certs.join(name)).expect("test certificate");
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .domain_name("localhost");
    if with_identity {
        tls = tls.identity(Identity::from_pem(read("client.pem"), read("client.key")));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("URI")
        .tls_config(tls)
        .expect("TLS config")
        .connect_timeout(Duration::from_secs(5))
}
