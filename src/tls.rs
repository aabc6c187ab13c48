//! TLS for the gRPC listener: the node's own server certificate, re-issued before it expires, and
//! client certificates verified against the trust bundle, with the caller's SPIFFE ID taken from
//! the certificate's URI SAN.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
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

/// The roots client certificates must chain to. CA rotation adds roots while the node serves, so
/// the verifier is swapped whole, and new handshakes use the new one.
#[derive(Debug)]
pub struct ClientTrust {
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: ArcSwap<Arc<dyn ClientCertVerifier>>,
}

impl ClientTrust {
    /// Trusts client certificates that chain to `roots_der`.
    ///
    /// # Errors
    ///
    /// Fails when no root can be parsed.
    #[expect(
        deprecated,
        reason = "ring keeps the build free of aws-lc; post-quantum key exchange is not yet needed here"
    )]
    pub fn new(roots_der: &[Vec<u8>]) -> anyhow::Result<Arc<ClientTrust>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = build_verifier(roots_der, &provider)?;
        Ok(Arc::new(ClientTrust { provider, verifier: ArcSwap::from_pointee(verifier) }))
    }

    /// Trusts `roots_der` from the next handshake on.
    ///
    /// # Errors
    ///
    /// Fails when no root can be parsed; the previous roots stay.
    pub fn replace(&self, roots_der: &[Vec<u8>]) -> anyhow::Result<()> {
        self.verifier.store(Arc::new(build_verifier(roots_der, &self.provider)?));
        Ok(())
    }
}

fn build_verifier(
    roots_der: &[Vec<u8>],
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    let mut store = RootCertStore::empty();
    for der in roots_der {
        store
            .add(CertificateDer::from(der.clone()))
            .map_err(|e| anyhow::anyhow!("add root to client trust store: {e}"))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(store), Arc::clone(provider))
        .allow_unauthenticated()
        .build()
        .map_err(|e| anyhow::anyhow!("build client certificate verifier: {e}"))
}

impl ClientCertVerifier for ClientTrust {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // The roots can change, so no hint list is sent. Clients then offer their certificate
        // whatever its issuer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier.load().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier.load().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier.load().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.verifier.load().supported_verify_schemes()
    }
}

/// Builds the server configuration: any client certificate must chain to a root of `trust`, and
/// clients without one may connect so that the service can return UNAUTHENTICATED with a reason.
///
/// # Errors
///
/// Fails when the TLS versions cannot be selected.
pub fn server_config(
    trust: &Arc<ClientTrust>,
    resolver: Arc<NodeCertResolver>,
) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::clone(&trust.provider);
    let verifier: Arc<dyn ClientCertVerifier> = Arc::clone(trust) as Arc<dyn ClientCertVerifier>;
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
