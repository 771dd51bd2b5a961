//! TLS to the master: the public roots, plus the certificate authorities the user names with
//! `--ca-cert` (a farm's private CA, or a master's self-signed certificate).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// The certificates in a PEM file; an error names the file and says what it should hold.
pub fn load_certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("--ca-cert {}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!(
            "--ca-cert {}: no certificate found; give a PEM file with \
             -----BEGIN CERTIFICATE----- blocks",
            path.display()
        );
    }
    Ok(certs)
}

/// A client configuration trusting the public roots and `extra`.
pub fn client_config(
    extra: &[CertificateDer<'static>],
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra {
        roots
            .add(cert.clone())
            .context("--ca-cert: a certificate that cannot be a trust anchor")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What to do about a TLS failure, from its message (empty when it is not one).
pub fn hint(error: &str) -> &'static str {
    if error.contains("CaUsedAsEndEntity") {
        " (the master's certificate is a CA certificate, which cannot identify a server; \
         make one with basicConstraints CA:FALSE, e.g. openssl req -x509 ... \
         -addext basicConstraints=critical,CA:FALSE)"
    } else if error.contains("UnknownIssuer") {
        " (the master's certificate is not signed by a trusted authority; give --ca-cert \
         with the CA that signed it, or the certificate itself if it is self-signed)"
    } else if error.contains("NotValidForName") {
        " (the master's certificate does not name the host in --master; use a name it has)"
    } else if error.contains("invalid peer certificate") {
        " (the master's certificate was refused)"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_certificates_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let error = load_certificates(&path).unwrap_err().to_string();
        assert!(error.contains("no certificate found"), "{error}");
        let error = load_certificates(&dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("missing.pem"), "{error}");
    }

    #[test]
    fn certificate_failures_say_what_to_do() {
        assert!(hint("invalid peer certificate: UnknownIssuer").contains("--ca-cert"));
        assert!(hint("invalid peer certificate: Other(CaUsedAsEndEntity)").contains("CA:FALSE"));
        assert_eq!(hint("connection refused"), "");
    }
}
