//! TLS: system roots by default, or a certificate pinned by SHA-256 thumbprint.
//!
//! Pinning is the one opt-in for self-signed hosts (ESXi's default certificate): the server is
//! trusted if and only if its end-entity certificate hashes to the configured thumbprint, and
//! its handshake signature is still verified against that certificate's key. There is no
//! "accept anything" mode. A mismatch fails the handshake, so nothing — no password — is sent.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Accepts exactly one certificate, by SHA-256 of its DER bytes.
#[derive(Debug)]
pub struct PinnedVerifier {
    thumbprint: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedVerifier {
    /// A verifier for `thumbprint`.
    pub fn new(thumbprint: [u8; 32], provider: &CryptoProvider) -> Self {
        PinnedVerifier {
            thumbprint,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

/// Hex with colons, as vSphere prints thumbprints.
pub fn format_thumbprint(t: &[u8]) -> String {
    t.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.thumbprint {
            Ok(ServerCertVerified::assertion())
        } else {
            tracing::warn!(
                presented = %format_thumbprint(&got),
                "vSphere server certificate does not match the pinned thumbprint"
            );
            Err(rustls::Error::General(format!(
                "server certificate thumbprint {} does not match the pinned one",
                format_thumbprint(&got)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A rustls client configuration that trusts only the certificate with `thumbprint`.
pub fn pinned_config(thumbprint: [u8; 32]) -> virtrigaud_core::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(PinnedVerifier::new(thumbprint, &provider));
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| virtrigaud_core::Error::invalid(format!("TLS setup failed: {e}")))?;
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_vsphere() {
        assert_eq!(format_thumbprint(&[0xab, 0x01]), "AB:01");
    }

    #[test]
    fn wrong_certificate_is_refused() {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let der = CertificateDer::from(vec![1u8, 2, 3]);
        let good: [u8; 32] = Sha256::digest([1u8, 2, 3]).into();
        let name = ServerName::try_from("h").unwrap();
        let v = PinnedVerifier::new(good, &provider);
        assert!(
            v.verify_server_cert(&der, &[], &name, &[], UnixTime::now())
                .is_ok()
        );
        let v = PinnedVerifier::new([0; 32], &provider);
        assert!(
            v.verify_server_cert(&der, &[], &name, &[], UnixTime::now())
                .is_err()
        );
    }
}
