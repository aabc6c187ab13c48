//! SPIRE's UpstreamAuthority service, forwarded to Sigil's Authority service.
//!
//! Each RPC sends its first message from a unary Sigil call (or the first bundle of a watch) and
//! then keeps SPIRE's stream open, following Sigil's bundle watch and sending only what changed. A broken
//! watch is reconnected; SPIRE's stream ends only when SPIRE cancels it or the plugin stops,
//! because SPIRE reopens these streams only at its next CA or key rotation.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument as _, Span, debug, info, info_span, warn};
use x509_parser::prelude::FromDer as _;

use crate::bundle::{JwtSet, RootSet, jwt_authority_from_spire};
use crate::proto::sigil::v1::{Bundle, MintX509CaResponse as SigilMintResponse};
use crate::proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_server::UpstreamAuthority;
use crate::proto::spire::plugin::server::upstreamauthority::v1::{
    MintX509caRequest as MintX509CaRequest, MintX509caResponse as MintX509CaResponse, PublishJwtKeyRequest,
    PublishJwtKeyResponse, SubscribeToLocalBundleRequest, SubscribeToLocalBundleResponse,
};
use crate::proto::spire::plugin::types::X509Certificate;
use crate::sigil_client::{BundleWatch, ClientSlot, not_configured};

/// Messages a stream may queue for SPIRE before the follower waits.
const STREAM_BUFFER: usize = 4;

type SpireStream<T> = ReceiverStream<Result<T, Status>>;

pub struct Upstream {
    slot: ClientSlot,
    shutdown: CancellationToken,
    request_ids: AtomicU64,
}

impl Upstream {
    pub fn new(slot: ClientSlot, shutdown: CancellationToken) -> Upstream {
        Upstream { slot, shutdown, request_ids: AtomicU64::new(1) }
    }

    fn next_request_id(&self) -> u64 {
        self.request_ids.fetch_add(1, Ordering::Relaxed)
    }

    async fn mint(&self, request: MintX509CaRequest) -> Result<Response<SpireStream<MintX509CaResponse>>, Status> {
        let client = self.slot.get().ok_or_else(not_configured)?;
        let csr_public_key = csr_public_key(&request.csr)?;
        let preferred_ttl = request.preferred_ttl.max(0);
        info!(preferred_ttl, "minting an X.509 CA");
        let minted = client.mint_x509_ca(request.csr, i64::from(preferred_ttl)).await.inspect_err(log_failure)?;
        for warning in &minted.warnings {
            warn!(warning = warning.as_str(), "Sigil returned a warning with the X.509 CA");
        }
        let (serial, not_after) = (minted.serial.clone(), minted.not_after);
        let (first, mut last_roots) = first_mint_response(minted, &csr_public_key)?;
        info!(
            serial = serial.as_str(),
            not_after,
            chain_length = first.x509_ca_chain.len(),
            roots = last_roots.len(),
            tainted_roots = last_roots.tainted_count(),
            "minted an X.509 CA"
        );

        let follow_roots = move |bundle: Bundle| {
            let roots = RootSet::from_sigil(&bundle.x509_authorities);
            if !roots_changed(&roots, &last_roots, bundle.version) {
                return None;
            }
            last_roots = roots;
            let upstream_x509_roots = last_roots.to_spire();
            Some(MintX509CaResponse { x509_ca_chain: Vec::new(), upstream_x509_roots })
        };
        Ok(self.open_stream(first, follow_roots))
    }

    async fn publish(
        &self,
        request: PublishJwtKeyRequest,
    ) -> Result<Response<SpireStream<PublishJwtKeyResponse>>, Status> {
        let client = self.slot.get().ok_or_else(not_configured)?;
        let key = request.jwt_key.ok_or_else(|| Status::invalid_argument("jwt_key is missing"))?;
        check_jwt_key(&key.key_id, &key.public_key)?;
        info!(key_id = key.key_id.as_str(), expires_at = key.expires_at, "publishing a JWT authority");
        let authorities =
            client.publish_jwt_authority(jwt_authority_from_spire(&key)).await.inspect_err(log_failure)?;
        let mut last_keys = JwtSet::from_sigil(&authorities);
        if !last_keys.contains_key(&key.key_id, &key.public_key) {
            // SPIRE adds only the keys it receives, so its own key must be in the response.
            warn!(key_id = key.key_id.as_str(), "Sigil's JWT authorities lack the published key; adding it");
            last_keys.insert_spire(&key);
        }
        info!(key_id = key.key_id.as_str(), jwt_authorities = last_keys.len(), "published a JWT authority");
        let first = PublishJwtKeyResponse { upstream_jwt_keys: last_keys.to_spire() };

        let follow_keys = move |bundle: Bundle| {
            let keys = JwtSet::from_sigil(&bundle.jwt_authorities);
            if keys.is_empty() || keys == last_keys {
                return None;
            }
            info!(
                jwt_authorities = keys.len(),
                version = bundle.version,
                "JWT authorities changed; sending them to SPIRE"
            );
            last_keys = keys;
            Some(PublishJwtKeyResponse { upstream_jwt_keys: last_keys.to_spire() })
        };
        Ok(self.open_stream(first, follow_keys))
    }

    async fn subscribe(&self) -> Result<Response<SpireStream<SubscribeToLocalBundleResponse>>, Status> {
        let mut watch = BundleWatch::new(self.slot.clone()).ok_or_else(not_configured)?;
        let bundle = first_bundle_with_roots(&mut watch).await;
        let mut last_roots = RootSet::from_sigil(&bundle.x509_authorities);
        let mut last_keys = JwtSet::from_sigil(&bundle.jwt_authorities);
        info!(
            version = bundle.version,
            roots = last_roots.len(),
            tainted_roots = last_roots.tainted_count(),
            jwt_authorities = last_keys.len(),
            "sending the trust bundle to SPIRE"
        );
        let first = SubscribeToLocalBundleResponse {
            upstream_x509_roots: last_roots.to_spire(),
            upstream_jwt_keys: last_keys.to_spire(),
        };

        let follow_bundle = move |bundle: Bundle| {
            let roots = RootSet::from_sigil(&bundle.x509_authorities);
            let keys = JwtSet::from_sigil(&bundle.jwt_authorities);
            if roots.is_empty() || (roots == last_roots && keys == last_keys) {
                return None;
            }
            info!(
                version = bundle.version,
                roots = roots.len(),
                jwt_authorities = keys.len(),
                "sending the changed bundle to SPIRE"
            );
            (last_roots, last_keys) = (roots, keys);
            Some(SubscribeToLocalBundleResponse {
                upstream_x509_roots: last_roots.to_spire(),
                upstream_jwt_keys: last_keys.to_spire(),
            })
        };
        Ok(Response::new(self.follow(watch, first, follow_bundle)))
    }

    /// Returns SPIRE's stream with `first` queued, and follows Sigil's bundle from a new watch.
    fn open_stream<T: Send + 'static>(
        &self,
        first: T,
        on_bundle: impl FnMut(Bundle) -> Option<T> + Send + 'static,
    ) -> Response<SpireStream<T>> {
        match BundleWatch::new(self.slot.clone()) {
            Some(watch) => Response::new(self.follow(watch, first, on_bundle)),
            None => Response::new(single_message(first)),
        }
    }

    /// Queues `first`, then sends what `on_bundle` makes of each bundle until SPIRE closes the
    /// stream or the plugin stops.
    fn follow<T: Send + 'static>(
        &self,
        mut watch: BundleWatch,
        first: T,
        mut on_bundle: impl FnMut(Bundle) -> Option<T> + Send + 'static,
    ) -> SpireStream<T> {
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let shutdown = self.shutdown.clone();
        let task = async move {
            if sender.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                let bundle = tokio::select! {
                    () = sender.closed() => {
                        debug!("SPIRE closed the stream");
                        return;
                    }
                    () = shutdown.cancelled() => return,
                    bundle = watch.next() => bundle,
                };
                if let Some(message) = on_bundle(bundle)
                    && sender.send(Ok(message)).await.is_err()
                {
                    debug!("SPIRE closed the stream");
                    return;
                }
            }
        };
        tokio::spawn(task.instrument(Span::current()));
        ReceiverStream::new(receiver)
    }
}

#[tonic::async_trait]
impl UpstreamAuthority for Upstream {
    type MintX509CAAndSubscribeStream = SpireStream<MintX509CaResponse>;
    type PublishJWTKeyAndSubscribeStream = SpireStream<PublishJwtKeyResponse>;
    type SubscribeToLocalBundleStream = SpireStream<SubscribeToLocalBundleResponse>;

    async fn mint_x509ca_and_subscribe(
        &self,
        request: Request<MintX509CaRequest>,
    ) -> Result<Response<Self::MintX509CAAndSubscribeStream>, Status> {
        let span = info_span!("mint_x509_ca", request_id = self.next_request_id());
        self.mint(request.into_inner()).instrument(span).await
    }

    async fn publish_jwt_key_and_subscribe(
        &self,
        request: Request<PublishJwtKeyRequest>,
    ) -> Result<Response<Self::PublishJWTKeyAndSubscribeStream>, Status> {
        let span = info_span!("publish_jwt_key", request_id = self.next_request_id());
        self.publish(request.into_inner()).instrument(span).await
    }

    async fn subscribe_to_local_bundle(
        &self,
        _request: Request<SubscribeToLocalBundleRequest>,
    ) -> Result<Response<Self::SubscribeToLocalBundleStream>, Status> {
        let span = info_span!("subscribe_to_local_bundle", request_id = self.next_request_id());
        self.subscribe().instrument(span).await
    }
}

fn log_failure(status: &Status) {
    warn!(code = ?status.code(), error = status.message(), "request failed");
}

/// Returns a stream that sends one message and ends, for when no configuration exists to follow.
fn single_message<T: Send + 'static>(message: T) -> SpireStream<T> {
    let (sender, receiver) = mpsc::channel(1);
    let _ = sender.try_send(Ok(message));
    ReceiverStream::new(receiver)
}

/// Returns whether `roots` must be sent to SPIRE: a non-empty set that differs from the last one.
fn roots_changed(roots: &RootSet, last: &RootSet, version: u64) -> bool {
    if roots.is_empty() {
        warn!(version, "Sigil sent a bundle without X.509 roots; keeping the previous roots");
        return false;
    }
    if roots == last {
        return false;
    }
    info!(
        version,
        roots = roots.len(),
        tainted_roots = roots.tainted_count(),
        "X.509 roots changed; sending them to SPIRE"
    );
    true
}

/// Waits for a bundle that has X.509 roots, since SPIRE rejects a first message without them.
async fn first_bundle_with_roots(watch: &mut BundleWatch) -> Bundle {
    loop {
        let bundle = watch.next().await;
        if !bundle.x509_authorities.is_empty() {
            return bundle;
        }
        warn!(version = bundle.version, "Sigil's bundle has no X.509 roots yet; waiting for the next version");
    }
}

/// Returns the SubjectPublicKeyInfo of a DER PKCS#10 request.
fn csr_public_key(csr: &[u8]) -> Result<Vec<u8>, Status> {
    if csr.is_empty() {
        return Err(Status::invalid_argument("csr is missing"));
    }
    let (_, request) = x509_parser::certification_request::X509CertificationRequest::from_der(csr)
        .map_err(|error| Status::invalid_argument(format!("csr is not a DER PKCS#10 request: {error}")))?;
    Ok(request.certification_request_info.subject_pki.raw.to_vec())
}

/// Checks the parts of SPIRE's JWT key that Sigil stores.
fn check_jwt_key(key_id: &str, public_key: &[u8]) -> Result<(), Status> {
    if key_id.is_empty() {
        return Err(Status::invalid_argument("jwt_key.key_id is empty"));
    }
    if public_key.is_empty() {
        return Err(Status::invalid_argument(format!("jwt_key {key_id:?}: public_key is empty")));
    }
    if x509_parser::x509::SubjectPublicKeyInfo::from_der(public_key).is_err() {
        return Err(Status::invalid_argument(format!(
            "jwt_key {key_id:?}: public_key is not a DER SubjectPublicKeyInfo"
        )));
    }
    Ok(())
}

/// Builds SPIRE's first response from Sigil's: the minted CA, then Sigil's intermediates, with
/// the roots apart. Returns the roots as sent.
///
/// # Errors
///
/// INTERNAL when SPIRE would reject Sigil's response: no certificate, a certificate for
/// another key than the CSR's, or no roots.
fn first_mint_response(
    minted: SigilMintResponse,
    csr_public_key: &[u8],
) -> Result<(MintX509CaResponse, RootSet), Status> {
    if minted.certificate.is_empty() {
        return Err(Status::internal("Sigil returned no CA certificate"));
    }
    let (_, certificate) = x509_parser::parse_x509_certificate(&minted.certificate)
        .map_err(|error| Status::internal(format!("Sigil returned an invalid CA certificate: {error}")))?;
    if certificate.public_key().raw != csr_public_key {
        return Err(Status::internal("Sigil returned a CA certificate for another public key than the CSR's"));
    }
    let roots = RootSet::from_sigil(&minted.roots);
    if roots.is_empty() {
        return Err(Status::internal("Sigil returned no X.509 roots"));
    }

    let mut chain = vec![X509Certificate { asn1: minted.certificate, tainted: false }];
    for intermediate in minted.intermediates {
        // A root in the chain would be shipped inside every X509-SVID SPIRE issues.
        if roots.contains_certificate(&intermediate) {
            warn!("Sigil listed a root among the intermediates; leaving it out of the chain");
            continue;
        }
        chain.push(X509Certificate { asn1: intermediate, tainted: false });
    }
    let response = MintX509CaResponse { x509_ca_chain: chain, upstream_x509_roots: roots.to_spire() };
    Ok((response, roots))
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    use super::*;
    use crate::proto::sigil::v1::X509Authority;

    struct Pki {
        root: Vec<u8>,
        intermediate: Vec<u8>,
        minted: Vec<u8>,
        csr: Vec<u8>,
    }

    fn ca_params(name: &str) -> CertificateParams {
        let mut params = CertificateParams::new(Vec::new()).expect("empty SAN list");
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
    }

    fn key() -> KeyPair {
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate key")
    }

    /// Root, intermediate, and a CA minted by the intermediate for a CSR's key.
    fn pki() -> Pki {
        let root = CertifiedIssuer::self_signed(ca_params("root"), key()).expect("root");
        let intermediate = CertifiedIssuer::signed_by(ca_params("intermediate"), key(), &root).expect("intermediate");
        let spire_key = key();
        let csr = CertificateParams::new(Vec::new())
            .expect("empty SAN list")
            .serialize_request(&spire_key)
            .expect("CSR")
            .der()
            .to_vec();
        let minted = ca_params("spire").signed_by(&spire_key, &intermediate).expect("minted");
        Pki { root: root.der().to_vec(), intermediate: intermediate.der().to_vec(), minted: minted.der().to_vec(), csr }
    }

    fn sigil_response(pki: &Pki, intermediates: Vec<Vec<u8>>) -> SigilMintResponse {
        SigilMintResponse {
            certificate: pki.minted.clone(),
            intermediates,
            roots: vec![X509Authority { certificate: pki.root.clone(), tainted: false }],
            serial: "01".to_owned(),
            not_after: 0,
            warnings: Vec::new(),
        }
    }

    #[test]
    fn chain_is_minted_then_intermediates() {
        let pki = pki();
        let key = csr_public_key(&pki.csr).expect("CSR parses");
        let (response, roots) =
            first_mint_response(sigil_response(&pki, vec![pki.intermediate.clone()]), &key).expect("valid response");
        let chain: Vec<&[u8]> = response.x509_ca_chain.iter().map(|c| c.asn1.as_slice()).collect();
        assert_eq!(chain, [pki.minted.as_slice(), pki.intermediate.as_slice()]);
        assert_eq!(response.upstream_x509_roots.len(), 1);
        assert_eq!(response.upstream_x509_roots[0].asn1, pki.root);
        assert!(roots.contains_certificate(&pki.root));
    }

    #[test]
    fn root_among_intermediates_is_dropped() {
        let pki = pki();
        let key = csr_public_key(&pki.csr).expect("CSR parses");
        let intermediates = vec![pki.intermediate.clone(), pki.root.clone()];
        let (response, _) = first_mint_response(sigil_response(&pki, intermediates), &key).expect("valid response");
        assert_eq!(response.x509_ca_chain.len(), 2);
        assert!(response.x509_ca_chain.iter().all(|c| c.asn1 != pki.root));
    }

    #[test]
    fn certificate_for_other_key_is_internal_error() {
        let pki = pki();
        let other = pki_csr_key_of_another_request();
        let status = first_mint_response(sigil_response(&pki, Vec::new()), &other).expect_err("key mismatch");
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(status.message().contains("another public key"), "{}", status.message());
    }

    fn pki_csr_key_of_another_request() -> Vec<u8> {
        let csr = CertificateParams::new(Vec::new()).expect("empty SAN list").serialize_request(&key()).expect("CSR");
        csr_public_key(csr.der()).expect("CSR parses")
    }

    #[test]
    fn missing_roots_or_certificate_are_internal_errors() {
        let pki = pki();
        let key = csr_public_key(&pki.csr).expect("CSR parses");
        let mut no_roots = sigil_response(&pki, Vec::new());
        no_roots.roots.clear();
        let status = first_mint_response(no_roots, &key).expect_err("no roots");
        assert_eq!((status.code(), status.message()), (tonic::Code::Internal, "Sigil returned no X.509 roots"));
        let mut no_certificate = sigil_response(&pki, Vec::new());
        no_certificate.certificate.clear();
        let status = first_mint_response(no_certificate, &key).expect_err("no certificate");
        assert_eq!(status.message(), "Sigil returned no CA certificate");
    }

    #[test]
    fn bad_csr_is_invalid_argument() {
        assert_eq!(csr_public_key(&[]).expect_err("empty").message(), "csr is missing");
        let status = csr_public_key(&[0x30, 0x03, 0x02, 0x01, 0x00]).expect_err("not a CSR");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with("csr is not a DER PKCS#10 request"), "{}", status.message());
    }

    #[test]
    fn jwt_key_checks() {
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key());
        assert!(check_jwt_key("k1", &spki).is_ok());
        assert_eq!(check_jwt_key("", &spki).expect_err("no key ID").message(), "jwt_key.key_id is empty");
        assert!(check_jwt_key("k1", &[]).expect_err("no key").message().contains("public_key is empty"));
        let garbage = check_jwt_key("k1", b"garbage").expect_err("not SPKI");
        assert_eq!(garbage.code(), tonic::Code::InvalidArgument);
        assert!(garbage.message().contains("\"k1\""), "{}", garbage.message());
    }

    #[test]
    fn roots_change_detection() {
        let a = X509Authority { certificate: b"a".to_vec(), tainted: false };
        let a_tainted = X509Authority { certificate: b"a".to_vec(), tainted: true };
        let last = RootSet::from_sigil(std::slice::from_ref(&a));
        assert!(!roots_changed(&RootSet::from_sigil(std::slice::from_ref(&a)), &last, 2));
        assert!(roots_changed(&RootSet::from_sigil(&[a_tainted]), &last, 3));
        assert!(!roots_changed(&RootSet::default(), &last, 4), "an empty root set is never sent");
    }
}
