//! TLS client configurations of the validator. Neither checks the server's
//! certificate chain: a tls-alpn-01 certificate is self-signed by design,
//! and an https redirect target of http-01 proves nothing with its
//! certificate because the key authorization in the body is the proof.
//! Handshake signatures are still verified, so the server must hold the
//! private key of the certificate it presents.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, PeerMisbehaved, SignatureScheme};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

/// The ALPN protocol name of tls-alpn-01 (RFC 8737).
pub(super) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

pub(super) struct TlsConfigs {
    /// Offers only the `acme-tls/1` ALPN protocol.
    pub(super) tls_alpn01: Arc<ClientConfig>,
    /// Offers only `http/1.1`, for https redirect targets of http-01.
    pub(super) https: Arc<ClientConfig>,
}

impl TlsConfigs {
    #[expect(deprecated, reason = "ring keeps the build free of aws-lc; validation needs no post-quantum key exchange")]
    pub(super) fn new() -> Result<TlsConfigs, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls_alpn01 = client_config(&provider, ACME_TLS_ALPN)?;
        let https = client_config(&provider, b"http/1.1")?;
        Ok(TlsConfigs { tls_alpn01: Arc::new(tls_alpn01), https: Arc::new(https) })
    }
}

fn client_config(provider: &Arc<CryptoProvider>, alpn: &[u8]) -> Result<ClientConfig, String> {
    let verifier = AnyCertificate { algorithms: provider.signature_verification_algorithms };
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("failed to configure the validation TLS client: {error}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    // A validation is one handshake to a host the client controls, so no
    // session is kept for a later one.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Accepts every certificate chain but checks handshake signatures with
/// the public key of the presented leaf certificate.
///
/// The signature check parses the certificate with x509-parser rather than
/// calling rustls' `verify_tls12_signature`: that one parses with webpki,
/// which rejects the unknown critical acmeIdentifier extension that every
/// tls-alpn-01 certificate carries.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl AnyCertificate {
    fn verify_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
        tls13: bool,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let unadvertised = || rustls::Error::PeerMisbehaved(PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme);
        if tls13 && !allowed_in_tls13(dss.scheme) {
            return Err(unadvertised());
        }
        let candidates = self
            .algorithms
            .mapping
            .iter()
            .find(|(scheme, _)| *scheme == dss.scheme)
            .map(|(_, candidates)| *candidates)
            .ok_or_else(unadvertised)?;
        // A TLS 1.3 scheme also fixes the curve, which only its first
        // algorithm checks; TLS 1.2 schemes may use any of them.
        let candidates = if tls13 { &candidates[..candidates.len().min(1)] } else { candidates };

        let bad_encoding = || rustls::Error::InvalidCertificate(CertificateError::BadEncoding);
        let (_, certificate) = X509Certificate::from_der(cert.as_ref()).map_err(|_| bad_encoding())?;
        let (algorithm_id, public_key) = spki_parts(certificate.public_key().raw).ok_or_else(bad_encoding)?;

        let algorithm = candidates
            .iter()
            .find(|candidate| candidate.public_key_alg_id().as_ref() == algorithm_id)
            .ok_or(rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
        algorithm
            .verify_signature(public_key, message, dss.signature())
            .map(|()| HandshakeSignatureValid::assertion())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))
    }
}

impl ServerCertVerifier for AnyCertificate {
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
        self.verify_signature(message, cert, dss, false)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_signature(message, cert, dss, true)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// True for the signature schemes that TLS 1.3 allows in CertificateVerify
/// (RFC 8446, section 4.2.3): no PKCS #1 v1.5 and no SHA-1.
fn allowed_in_tls13(scheme: SignatureScheme) -> bool {
    matches!(
        scheme,
        SignatureScheme::ECDSA_NISTP256_SHA256
            | SignatureScheme::ECDSA_NISTP384_SHA384
            | SignatureScheme::ECDSA_NISTP521_SHA512
            | SignatureScheme::RSA_PSS_SHA256
            | SignatureScheme::RSA_PSS_SHA384
            | SignatureScheme::RSA_PSS_SHA512
            | SignatureScheme::ED25519
            | SignatureScheme::ED448
    )
}

/// Splits a DER SubjectPublicKeyInfo into the content of its
/// AlgorithmIdentifier, as `SignatureVerificationAlgorithm::public_key_alg_id`
/// returns it, and the bytes of its subjectPublicKey bit string.
fn spki_parts(spki: &[u8]) -> Option<(&[u8], &[u8])> {
    let (SEQUENCE, body, _) = der_element(spki)? else {
        return None;
    };
    let (SEQUENCE, algorithm, rest) = der_element(body)? else {
        return None;
    };
    let (BIT_STRING, bits, _) = der_element(rest)? else {
        return None;
    };
    match bits.split_first()? {
        (0, key) => Some((algorithm, key)),
        _ => None,
    }
}

const SEQUENCE: u8 = 0x30;
const BIT_STRING: u8 = 0x03;

/// Splits the first DER element off `input` into its tag, its content and
/// the bytes after it.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (length_bytes, rest) = rest.split_at(count);
        (length_bytes.iter().fold(0_usize, |length, byte| (length << 8) | usize::from(*byte)), rest)
    };
    if rest.len() < length {
        return None;
    }
    let (content, rest) = rest.split_at(length);
    Some((tag, content, rest))
}
