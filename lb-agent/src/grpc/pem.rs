//! The PEM files of the API's TLS (the agent's `--grpc-tls-*`, `lbctl`'s `--tls-*`), read and
//! checked when they are loaded: tonic takes any bytes and fails later, at the handshake, without
//! naming the file. Here a missing file, a key where a certificate belongs, or a damaged block is
//! an error naming the file and its role.

use std::{fs, path::Path};

use anyhow::{bail, Context, Result};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

/// The PEM certificate(s) in `path` (`role`: what the file is for, e.g. "the client certificate").
pub(crate) fn certificates(path: &Path, role: &str) -> Result<Vec<u8>> {
    let pem = read(path, role)?;
    let count = CertificateDer::pem_slice_iter(&pem)
        .try_fold(0, |count, cert| cert.map(|_| count + 1))
        .with_context(|| format!("{role} {}: not valid PEM", path.display()))?;
    if count == 0 {
        bail!(
            "{role} {}: no certificate in it (expected a PEM `-----BEGIN CERTIFICATE-----` block)",
            path.display()
        );
    }
    Ok(pem)
}

/// The PEM private key in `path` (PKCS#8, SEC1 EC or PKCS#1 RSA).
pub(crate) fn private_key(path: &Path, role: &str) -> Result<Vec<u8>> {
    let pem = read(path, role)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(_) => Ok(pem),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => bail!(
            "{role} {}: no private key in it (expected a PEM `-----BEGIN PRIVATE KEY-----`, \
             `EC PRIVATE KEY` or `RSA PRIVATE KEY` block)",
            path.display()
        ),
        Err(err) => Err(err).with_context(|| format!("{role} {}: not valid PEM", path.display())),
    }
}

fn read(path: &Path, role: &str) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {role} {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIBAjCBqAIBADAKBggqhkjOPQQDAjAAMB4XDTI2MDEwMTAwMDAwMFoXDTI2MDEw\n-----END CERTIFICATE-----\n";

    #[test]
    fn missing_misplaced_and_damaged_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            fs::write(&path, text).unwrap();
            path
        };
        let err = |result: Result<Vec<u8>>| format!("{:#}", result.unwrap_err());

        let missing = dir.path().join("missing.pem");
        let said = err(certificates(&missing, "the CA certificate"));
        assert!(
            said.starts_with("reading the CA certificate ") && said.contains("missing.pem"),
            "{said}"
        );
        assert!(said.contains("No such file"), "{said}");

        let key = file(
            "key.pem",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        );
        let said = err(certificates(&key, "the client certificate"));
        assert!(said.contains("no certificate in it"), "{said}");
        let cert = file("cert.pem", CERT);
        let said = err(private_key(&cert, "the client key"));
        assert!(
            said.contains("the client key") && said.contains("no private key"),
            "{said}"
        );

        let truncated = file("truncated.pem", &CERT[..CERT.len() - 26]);
        let said = err(certificates(&truncated, "the client certificate"));
        assert!(said.contains("not valid PEM"), "{said}");

        assert_eq!(
            certificates(&cert, "a certificate").unwrap(),
            CERT.as_bytes()
        );
        assert!(private_key(&key, "a key").is_ok());
    }
}
