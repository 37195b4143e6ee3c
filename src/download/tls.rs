//! TLS client configuration: rustls with the ring provider, the system's roots (or the
//! Mozilla roots when the system has none), an optional extra CA, or no verification at all.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::{DownloadError, TlsOptions};

/// The roots every config starts from, loaded once per process.
fn base_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::debug!(%error, "could not load some system CA certificates");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(added, ignored, "loaded system CA certificates");
        if roots.is_empty() {
            tracing::info!("no system CA certificates found; using the Mozilla root set");
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        roots
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client config for `options`, offering the ALPN protocols `alpn` (none for FTPS).
pub(crate) fn client_config(
    options: &TlsOptions,
    alpn: &[&[u8]],
) -> Result<ClientConfig, DownloadError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| DownloadError::InvalidCa {
            reason: format!("the TLS provider is unusable: {e}"),
        })?;
    let mut config = if options.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth()
    } else {
        let mut roots = base_roots().clone();
        if let Some(pem) = &options.extra_ca_pem {
            add_pem(&mut roots, pem)?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Adds every certificate of a PEM bundle; fails when there is none or one is invalid.
fn add_pem(roots: &mut RootCertStore, pem: &[u8]) -> Result<(), DownloadError> {
    let mut count = 0usize;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| DownloadError::InvalidCa {
            reason: format!("the PEM bundle does not parse: {e}"),
        })?;
        roots.add(cert).map_err(|e| DownloadError::InvalidCa {
            reason: format!("a certificate is not a usable CA: {e}"),
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(DownloadError::InvalidCa {
            reason: "the PEM bundle holds no certificate".into(),
        });
    }
    Ok(())
}

/// Accepts any server certificate (`insecure_skip_verify`) but still checks that the server
/// holds the key of the certificate it sent, so the handshake is at least well-formed.
#[derive(Debug)]
struct AcceptAnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_extra_ca() {
        let options = |pem: &[u8]| TlsOptions {
            extra_ca_pem: Some(pem.to_vec()),
            insecure_skip_verify: false,
        };
        assert!(matches!(
            client_config(&options(b"no pem here"), &[]),
            Err(DownloadError::InvalidCa { .. })
        ));
        assert!(matches!(
            client_config(
                &options(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
                &[]
            ),
            Err(DownloadError::InvalidCa { .. })
        ));
    }

    #[test]
    fn builds_default_and_insecure_configs() {
        let config = client_config(&TlsOptions::default(), &[b"http/1.1"]).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let insecure = TlsOptions {
            extra_ca_pem: None,
            insecure_skip_verify: true,
        };
        assert!(client_config(&insecure, &[]).is_ok());
    }
}
