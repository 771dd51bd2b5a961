//! The master's certificate and key (`[master] tls_cert`, `tls_key`), loaded and checked when
//! the configuration loads, so a bad file is a configuration error naming the setting.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsFiles;

/// Loads and checks the certificate chain and key. The error names the setting at fault
/// (`tls_cert` or `tls_key`), the file, and the fix.
pub fn server_config(
    files: &TlsFiles,
) -> Result<Arc<rustls::ServerConfig>, (&'static str, String)> {
    let cert = files.cert.display();
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ("tls_cert", format!("{cert}: {e}")))?;
    if chain.is_empty() {
        return Err((
            "tls_cert",
            format!(
                "{cert}: no certificate found; give a PEM file with -----BEGIN CERTIFICATE----- \
                 blocks, the server's certificate first"
            ),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        (
            "tls_key",
            format!(
                "{}: {e}; give the PEM file of the certificate's private key \
                 (-----BEGIN PRIVATE KEY-----)",
                files.key.display()
            ),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("tls_cert", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            (
                "tls_key",
                format!(
                    "{cert} and {}: {e} (is the key the certificate's own?)",
                    files.key.display()
                ),
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
