//! TLS for the gRPC listener: the node's own server certificate, re-issued before it expires, and
//! client certificates verified against the trust bundle, with the caller's SPIFFE ID taken from
//! the certificate's URI SAN.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::spiffe_id::SpiffeId;

/// The node's current server certificate; swapping it affects new handshakes only.
#[derive(Debug)]
pub struct NodeCertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl NodeCertResolver {
    pub fn new(key: CertifiedKey) -> NodeCertResolver {
        NodeCertResolver { current: ArcSwap::from_pointee(key) }
    }

    pub fn replace(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for NodeCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Builds a rustls key from a certificate chain and a PKCS#8 private key.
///
/// # Errors
///
/// Fails when the key is not a type rustls's ring provider can sign with.
pub fn certified_key(chain: Vec<CertificateDer<'static>>, pkcs8_der: Vec<u8>) -> anyhow::Result<CertifiedKey> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8_der));
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| anyhow::anyhow!("load node TLS key: {e}"))?;
    Ok(CertifiedKey::new(chain, signing_key))
}

/// Builds the server configuration: any client certificate must chain to `roots`, and clients
/// without one may connect so that the service can return UNAUTHENTICATED with a reason.
///
/// # Errors
///
/// Fails when no root can be parsed.
#[expect(deprecated, reason = "ring keeps the build free of aws-lc; post-quantum key exchange is not yet needed here")]
pub fn server_config(roots_der: &[Vec<u8>], resolver: Arc<NodeCertResolver>) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut store = RootCertStore::empty();
    for der in roots_der {
        store
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| anyhow::anyhow!("add root to client trust store: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), Arc::clone(&provider))
        .allow_unauthenticated()
        .build()
        .map_err(|e| anyhow::anyhow!("build client certificate verifier: {e}"))?;

    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("select TLS versions: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Extracts the SPIFFE ID from a verified client certificate chain.
///
/// # Errors
///
/// Returns the reason when there is no certificate, or its leaf does not carry exactly one URI
/// SAN that is a valid SPIFFE ID.
pub fn caller_spiffe_id(chain: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId, String> {
    let Some(leaf) = chain.and_then(|c| c.first()) else {
        return Err("the TLS connection has no client certificate".to_owned());
    };
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| format!("parse client certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("client certificate SAN extension: {e}"))?
        .ok_or_else(|| "the client certificate has no subjectAltName with a SPIFFE ID".to_owned())?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| if let GeneralName::URI(uri) = name { Some(*uri) } else { None })
        .collect();
    match uris.as_slice() {
        [uri] => SpiffeId::parse(uri).map_err(|e| format!("client certificate URI SAN: {e}")),
        _ => Err(format!("the client certificate must have exactly one URI SAN, found {}", uris.len())),
    }
}
