//! The `sigil.v1.Authority` gRPC service: CA certificates for downstream CAs, the JWT
//! authorities of their trust domains, and the trust bundle, once or as a stream of changes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::audit::{AuditEvent, Decision};
use crate::bundle::{self, Bundle, JwtAuthority, PublishError, X509Root};
use crate::config::DownstreamSection;
use crate::grpc::{request_context, status_from};
use crate::issuance::{Issuance, IssueError, MintRequest};
use crate::proto;
use crate::proto::authority_server::Authority;

/// Audit kind of JWT authority publications.
pub const KIND_JWT_AUTHORITY: &str = "jwt-authority";

/// Maximum wait between two bundle reads of a watch, so that time-based changes such as
/// expiring JWT authorities are seen even when their expiry is far off.
const WATCH_RECHECK: Duration = Duration::from_secs(3600);

/// Serves `sigil.v1.Authority`.
pub struct AuthorityService {
    issuance: Arc<Issuance>,
    downstream: DownstreamSection,
    shutdown: watch::Receiver<bool>,
}

impl AuthorityService {
    pub fn new(
        issuance: Arc<Issuance>,
        downstream: DownstreamSection,
        shutdown: watch::Receiver<bool>,
    ) -> AuthorityService {
        AuthorityService { issuance, downstream, shutdown }
    }

    fn trust_domain_or_own(&self, requested: &str) -> Result<String, Status> {
        if requested.is_empty() {
            return Ok(self.issuance.settings().trust_domain.clone());
        }
        crate::spiffe_id::check_trust_domain(requested)
            .map_err(|error| Status::invalid_argument(format!("trust_domain is invalid: {error}")))?;
        Ok(requested.to_owned())
    }

    async fn publish(
        &self,
        request_id: &str,
        caller: Result<crate::spiffe_id::SpiffeId, String>,
        body: proto::PublishJwtAuthorityRequest,
        event: &mut AuditEvent,
    ) -> Result<Vec<JwtAuthority>, Status> {
        let caller = caller.map_err(|reason| status_from(&IssueError::Unauthenticated { reason }))?;
        event.caller = Some(caller.to_string());
        let trust_domain = self.trust_domain_or_own(&body.trust_domain)?;
        event.spiffe_id = Some(format!("spiffe://{trust_domain}"));
        let authority = body.authority.map(jwt_from_proto).ok_or_else(|| {
            Status::invalid_argument("authority is missing; send the JWT key to publish in the authority field")
        })?;
        event.serial = Some(authority.key_id.clone());
        self.issuance.apply_downstream_policy(&caller, &trust_domain, event).map_err(|error| status_from(&error))?;

        let publication = bundle::Publication {
            trust_domain: &trust_domain,
            authority: &authority,
            publisher: caller.as_str(),
            max_authorities: self.downstream.max_jwt_authorities,
        };
        let authorities =
            bundle::publish(self.issuance.replica(), &publication).await.map_err(|error| publish_status(&error))?;
        info!(request_id, %caller, trust_domain, key_id = %authority.key_id, "JWT authority published");
        Ok(authorities)
    }
}

fn publish_status(error: &PublishError) -> Status {
    let message = error.to_string();
    match error {
        PublishError::Invalid(_) => Status::invalid_argument(message),
        PublishError::KeyIdTaken { .. } => Status::already_exists(message),
        PublishError::Full { .. } => Status::resource_exhausted(message),
        PublishError::Unavailable(_) | PublishError::Ledger(_) => Status::unavailable(message),
    }
}

fn jwt_from_proto(authority: proto::JwtAuthority) -> JwtAuthority {
    JwtAuthority {
        public_key: authority.public_key,
        key_id: authority.key_id,
        expires_at: authority.expires_at,
        tainted: authority.tainted,
    }
}

fn jwt_to_proto(authority: JwtAuthority) -> proto::JwtAuthority {
    proto::JwtAuthority {
        public_key: authority.public_key,
        key_id: authority.key_id,
        expires_at: authority.expires_at,
        tainted: authority.tainted,
    }
}

fn root_to_proto(root: X509Root) -> proto::X509Authority {
    proto::X509Authority { certificate: root.der, tainted: root.tainted }
}

fn bundle_to_proto(bundle: Bundle) -> proto::Bundle {
    proto::Bundle {
        trust_domain: bundle.trust_domain,
        version: bundle.version,
        x509_authorities: bundle.x509_roots.into_iter().map(root_to_proto).collect(),
        jwt_authorities: bundle.jwt_authorities.into_iter().map(jwt_to_proto).collect(),
    }
}

fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn read_bundle(issuance: &Issuance, trust_domain: &str) -> Result<Bundle, Status> {
    bundle::read(issuance.ledger(), trust_domain, now_unix())
        .map_err(|error| Status::unavailable(format!("read the trust bundle: {error}")))
}

type BundleStream = Pin<Box<dyn Stream<Item = Result<proto::Bundle, Status>> + Send>>;

#[tonic::async_trait]
impl Authority for AuthorityService {
    async fn mint_x509_ca(
        &self,
        request: Request<proto::MintX509CaRequest>,
    ) -> Result<Response<proto::MintX509CaResponse>, Status> {
        let context = request_context(&request);
        let body = request.into_inner();
        let mint = MintRequest {
            csr: &body.csr,
            preferred_ttl_seconds: body.preferred_ttl_seconds,
            trust_domain: &body.trust_domain,
            max_ttl: self.downstream.max_ttl,
            path_len: self.downstream.path_len,
        };
        let minted = self.issuance.mint_x509_ca(&context, &mint).await.map_err(|error| status_from(&error))?;
        let bundle = read_bundle(&self.issuance, &minted.trust_domain)?;
        Ok(Response::new(proto::MintX509CaResponse {
            serial: hex::encode(&minted.certificate.serial),
            not_after: minted.certificate.not_after.unix_timestamp(),
            certificate: minted.certificate.der,
            intermediates: minted.intermediates_der,
            roots: bundle.x509_roots.into_iter().map(root_to_proto).collect(),
            warnings: minted.warnings,
        }))
    }

    async fn publish_jwt_authority(
        &self,
        request: Request<proto::PublishJwtAuthorityRequest>,
    ) -> Result<Response<proto::PublishJwtAuthorityResponse>, Status> {
        let context = request_context(&request);
        let node_id = self.issuance.settings().node_id;
        let mut event = AuditEvent::new(node_id, &context.request_id, KIND_JWT_AUTHORITY, Decision::Issued);
        let result = self.publish(&context.request_id, context.caller, request.into_inner(), &mut event).await;
        if let Err(status) = &result {
            event.decision = Decision::Refused;
            event.status = Some(crate::grpc::code_name(status.code()).to_owned());
            event.reason = Some(status.message().to_owned());
            info!(request_id = %context.request_id, caller = ?event.caller, error = %status.message(), "JWT authority publication rejected");
        }
        self.issuance.audit().log(event);
        let authorities = result?;
        Ok(Response::new(proto::PublishJwtAuthorityResponse {
            authorities: authorities.into_iter().map(jwt_to_proto).collect(),
        }))
    }

    async fn get_bundle(&self, request: Request<proto::GetBundleRequest>) -> Result<Response<proto::Bundle>, Status> {
        let context = request_context(&request);
        context.caller.map_err(|reason| status_from(&IssueError::Unauthenticated { reason }))?;
        let trust_domain = self.trust_domain_or_own(&request.get_ref().trust_domain)?;
        self.issuance.replica().sync_read().await.map_err(|error| Status::unavailable(error.to_string()))?;
        Ok(Response::new(bundle_to_proto(read_bundle(&self.issuance, &trust_domain)?)))
    }

    type WatchBundleStream = BundleStream;

    async fn watch_bundle(
        &self,
        request: Request<proto::GetBundleRequest>,
    ) -> Result<Response<Self::WatchBundleStream>, Status> {
        let context = request_context(&request);
        let caller = context.caller.map_err(|reason| status_from(&IssueError::Unauthenticated { reason }))?;
        let trust_domain = self.trust_domain_or_own(&request.get_ref().trust_domain)?;
        let first = read_bundle(&self.issuance, &trust_domain)?;
        info!(request_id = %context.request_id, %caller, trust_domain, version = first.version, "bundle watch started");

        let (sender, receiver) = mpsc::channel(4);
        let watch = BundleWatch {
            issuance: Arc::clone(&self.issuance),
            trust_domain,
            request_id: context.request_id,
            sender,
            shutdown: self.shutdown.clone(),
        };
        tokio::spawn(watch.run(first));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

/// One open `WatchBundle` stream.
struct BundleWatch {
    issuance: Arc<Issuance>,
    trust_domain: String,
    request_id: String,
    sender: mpsc::Sender<Result<proto::Bundle, Status>>,
    shutdown: watch::Receiver<bool>,
}

impl BundleWatch {
    /// Sends `first`, then every bundle whose material differs from the last one sent, until
    /// the client goes away or the node stops.
    async fn run(mut self, first: Bundle) {
        let mut changes = self.issuance.ledger().watch_bundle();
        changes.borrow_and_update();
        let mut sent = first.clone();
        if self.sender.send(Ok(bundle_to_proto(first))).await.is_err() {
            return;
        }
        loop {
            let wait = next_wait(&sent);
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = tokio::time::sleep(wait) => {}
                () = self.sender.closed() => break,
                _ = self.shutdown.changed() => {
                    let status = Status::unavailable("the node is stopping; watch the bundle on another node");
                    let _ = self.sender.send(Err(status)).await;
                    break;
                }
            }
            let bundle = match read_bundle(&self.issuance, &self.trust_domain) {
                Ok(bundle) => bundle,
                Err(status) => {
                    warn!(request_id = %self.request_id, error = %status.message(), "bundle watch cannot read the bundle");
                    let _ = self.sender.send(Err(status)).await;
                    break;
                }
            };
            if bundle.same_material(&sent) {
                continue;
            }
            debug!(request_id = %self.request_id, version = bundle.version, "bundle changed; sending it");
            sent = bundle.clone();
            if self.sender.send(Ok(bundle_to_proto(bundle))).await.is_err() {
                break;
            }
        }
        info!(request_id = %self.request_id, trust_domain = %self.trust_domain, "bundle watch ended");
    }
}

/// Returns how long a watch may sleep before the bundle can change without a ledger write: until
/// the next JWT authority expires, and at most [`WATCH_RECHECK`].
fn next_wait(bundle: &Bundle) -> Duration {
    let now = now_unix();
    bundle
        .next_expiry(now)
        .map_or(WATCH_RECHECK, |at| Duration::from_secs((at - now).unsigned_abs() + 1).min(WATCH_RECHECK))
}
