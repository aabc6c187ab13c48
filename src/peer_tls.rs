//! Mutual TLS between the nodes of a cluster: each node presents its node
//! certificate (SPIFFE ID `spiffe://<trust domain>/sigil/node/<id>`), and
//! each end checks that the other is the node it expects.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sigil_raft::PeerTls;

use crate::spiffe_id::SpiffeId;
use crate::tls::{NodeCertResolver, caller_spiffe_id};

/// Returns the SPIFFE ID of node `id` in `trust_domain`.
pub fn node_spiffe_id(trust_domain: &str, id: u64) -> String {
    format!("spiffe://{trust_domain}/sigil/node/{id}")
}

/// Reads the node id from a node SPIFFE ID of `trust_domain`.
pub fn node_id_of(trust_domain: &str, spiffe_id: &SpiffeId) -> Option<u64> {
    let text = spiffe_id.to_string();
    let prefix = format!("spiffe://{trust_domain}/sigil/node/");
    let id: u64 = text.strip_prefix(&prefix)?.parse().ok()?;
    (id != 0 && node_spiffe_id(trust_domain, id) == text).then_some(id)
}

/// TLS for the Raft peer transport of one node. The identity is set once the node has a
/// certificate; until then, connections to peers fail and are retried.
#[derive(Debug)]
pub struct NodePeerTls {
    trust_domain: String,
    identity: ArcSwapOption<PeerIdentity>,
    provider: Arc<CryptoProvider>,
}

#[derive(Debug)]
struct PeerIdentity {
    roots: Arc<RootCertStore>,
    resolver: Arc<NodeCertResolver>,
}

impl NodePeerTls {
    #[expect(
        deprecated,
        reason = "ring keeps the build free of aws-lc; post-quantum key exchange is not yet needed here"
    )]
    pub fn new(trust_domain: &str) -> Self {
        NodePeerTls {
            trust_domain: trust_domain.to_owned(),
            identity: ArcSwapOption::empty(),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    /// Sets the roots that verify peers and the node's own certificate.
    ///
    /// # Errors
    ///
    /// Fails when a root cannot be parsed.
    pub fn set_identity(&self, roots_der: &[Vec<u8>], resolver: Arc<NodeCertResolver>) -> anyhow::Result<()> {
        let mut roots = RootCertStore::empty();
        for der in roots_der {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|e| anyhow::anyhow!("add root to peer trust store: {e}"))?;
        }
        self.identity.store(Some(Arc::new(PeerIdentity { roots: Arc::new(roots), resolver })));
        Ok(())
    }
}

impl PeerTls for NodePeerTls {
    fn client_config(&self, peer: u64) -> Result<Arc<rustls::ClientConfig>, String> {
        let identity = self.identity.load_full().ok_or("this node has no TLS certificate yet")?;
        let verifier = ExpectedNode {
            expected: node_spiffe_id(&self.trust_domain, peer),
            roots: Arc::clone(&identity.roots),
            algorithms: self.provider.signature_verification_algorithms,
        };
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("select TLS versions: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(ClientIdentity(Arc::clone(&identity.resolver))));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    fn server_name(&self, peer: u64) -> ServerName<'static> {
        ServerName::try_from(format!("node-{peer}.sigil.invalid")).unwrap_or_else(|_| {
            ServerName::IpAddress(rustls_pki_types::IpAddr::from(std::net::IpAddr::from([127, 0, 0, 1])))
        })
    }

    fn caller_node_id(&self, chain: Option<&[CertificateDer<'_>]>) -> Result<u64, String> {
        let spiffe_id = caller_spiffe_id(chain)?;
        node_id_of(&self.trust_domain, &spiffe_id)
            .ok_or_else(|| format!("{spiffe_id} is not a node of trust domain {}", self.trust_domain))
    }
}

/// Presents the node's current certificate as the client certificate.
#[derive(Debug)]
struct ClientIdentity(Arc<NodeCertResolver>);

impl ResolvesClientCert for ClientIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Accepts a server certificate that chains to the trust bundle and
/// carries exactly the expected node's SPIFFE ID; the DNS name is not used.
#[derive(Debug)]
struct ExpectedNode {
    expected: String,
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ExpectedNode {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&parsed, &self.roots, intermediates, now, self.algorithms.all)?;
        let found = caller_spiffe_id(Some(std::slice::from_ref(end_entity))).map_err(rustls::Error::General)?;
        if found.to_string() != self.expected {
            return Err(rustls::Error::General(format!("peer presented {found}, expected {}", self.expected)));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, signature, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, signature, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_parsed_from_exact_ids() {
        let parse = |text: &str| SpiffeId::parse(text).expect("valid SPIFFE ID");
        assert_eq!(node_id_of("example.org", &parse("spiffe://example.org/sigil/node/3")), Some(3));
        for other in [
            "spiffe://example.org/sigil/node/0",
            "spiffe://example.org/sigil/node/03",
            "spiffe://example.org/sigil/node/3/extra",
            "spiffe://other.org/sigil/node/3",
            "spiffe://example.org/sigil/admin",
        ] {
            assert_eq!(node_id_of("example.org", &parse(other)), None, "{other}");
        }
    }
}
