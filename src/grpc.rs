//! gRPC front end: the `sigil.v1.Issuer` and `sigil.v1.Admin` services.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::issuance::{Issuance, IssueError, RequestContext};
use crate::proto::admin_server::Admin;
use crate::proto::issuer_server::Issuer;
use crate::proto::{
    CaStatus, GetStatusRequest, GetStatusResponse, GetTrustBundleRequest, GetTrustBundleResponse, HsmStatus,
    NodeStatus, SignX509SvidRequest, SignX509SvidResponse,
};
use crate::tls::caller_spiffe_id;

/// Maps an issuance error to its gRPC status. The match is exhaustive so a new error variant
/// must choose its status.
pub fn status_from(error: &IssueError) -> Status {
    let message = error.to_string();
    match error {
        IssueError::Unauthenticated { .. } => Status::unauthenticated(message),
        IssueError::InvalidCsr(_) | IssueError::InvalidTtl { .. } => Status::invalid_argument(message),
        IssueError::Denied(_) => Status::permission_denied(message),
        IssueError::RateLimited(_) => Status::resource_exhausted(message),
        IssueError::CaUnavailable(_) => Status::failed_precondition(message),
        IssueError::Signing(_) | IssueError::Ledger(_) | IssueError::NotCommitted(_) => Status::unavailable(message),
        IssueError::Internal(_) => Status::internal(message),
    }
}

/// Returns the canonical upper-case name of a gRPC status code, as audit events and metrics use.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Takes the request ID from the `x-request-id` header, or makes one.
fn request_id<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 128)
        .map_or_else(|| format!("{:016x}", rand::random::<u64>()), str::to_owned)
}

fn request_context<T>(request: &Request<T>) -> RequestContext {
    let certs = request.peer_certs();
    RequestContext { request_id: request_id(request), caller: caller_spiffe_id(certs.as_deref().map(Vec::as_slice)) }
}

/// Serves `sigil.v1.Issuer`.
pub struct IssuerService {
    issuance: Arc<Issuance>,
}

impl IssuerService {
    pub fn new(issuance: Arc<Issuance>) -> IssuerService {
        IssuerService { issuance }
    }
}

#[tonic::async_trait]
impl Issuer for IssuerService {
    async fn sign_x509_svid(
        &self,
        request: Request<SignX509SvidRequest>,
    ) -> Result<Response<SignX509SvidResponse>, Status> {
        let context = request_context(&request);
        let body = request.into_inner();
        let issued = self
            .issuance
            .sign_x509_svid(&context, &body.csr, body.ttl_seconds)
            .await
            .map_err(|error| status_from(&error))?;

        Ok(Response::new(SignX509SvidResponse {
            certificate: issued.leaf.der,
            intermediates: issued.intermediates_der,
            trust_bundle: issued.roots_der,
            serial: hex::encode(&issued.leaf.serial),
            not_after: issued.leaf.not_after.unix_timestamp(),
        }))
    }

    async fn get_trust_bundle(
        &self,
        request: Request<GetTrustBundleRequest>,
    ) -> Result<Response<GetTrustBundleResponse>, Status> {
        let context = request_context(&request);
        context.caller.map_err(|reason| {
            Status::unauthenticated(format!("no client certificate with a SPIFFE ID was presented: {reason}"))
        })?;
        Ok(Response::new(GetTrustBundleResponse {
            roots: self.issuance.ca().chain().roots_der.clone(),
            trust_domain: self.issuance.settings().trust_domain.clone(),
        }))
    }
}

/// Node facts that the Admin service reports besides the issuance state.
pub struct NodeInfo {
    pub grpc_address: String,
    pub started: Instant,
    pub hsm: HsmStatus,
}

/// Serves `sigil.v1.Admin`.
pub struct AdminService {
    issuance: Arc<Issuance>,
    node: NodeInfo,
    health: crate::metrics::Health,
}

impl AdminService {
    pub fn new(issuance: Arc<Issuance>, node: NodeInfo, health: crate::metrics::Health) -> AdminService {
        AdminService { issuance, node, health }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_status(&self, request: Request<GetStatusRequest>) -> Result<Response<GetStatusResponse>, Status> {
        let context = request_context(&request);
        let caller = context.caller.map_err(|reason| {
            Status::unauthenticated(format!("no client certificate with a SPIFFE ID was presented: {reason}"))
        })?;
        if !self.issuance.policy().is_admin(&caller) {
            return Err(Status::permission_denied(format!(
                "caller {caller} is not an administrator; set admin = true in its policy entry"
            )));
        }

        let ledger = self.issuance.ledger();
        let summary = self.issuance.ca().summary();
        let ca_version = ledger.active_ca().ok().flatten().map_or(0, |ca| ca.version);
        let raft = self.issuance.replica().status();
        let (applied_index, digest) = ledger.applied_state();
        let node = NodeStatus {
            id: self.issuance.settings().node_id,
            role: raft.role.as_str().to_owned(),
            ready: self.health.is_ready(),
            grpc_address: self.node.grpc_address.clone(),
            applied_index,
            ledger_digest: hex::encode(digest),
            term: raft.term,
            commit_index: raft.commit_index,
            leader_id: raft.leader.unwrap_or(0),
            raft_address: raft.peers.get(&raft.id).cloned().unwrap_or_default(),
            voters: raft.voters,
            learners: raft.learners,
            halted: raft.halted.unwrap_or_default(),
            log_first_index: raft.first_index,
            snapshot_index: raft.snapshot_index,
            issued_total: ledger.issuance_count(),
            ca: Some(CaStatus {
                subject: summary.subject.clone(),
                key_label: summary.key_label.clone(),
                key_type: summary.key_type.to_string(),
                not_after: summary.not_after.unix_timestamp(),
                fingerprint_sha256: summary.fingerprint_sha256.clone(),
                version: ca_version,
            }),
            hsm: Some(self.node.hsm.clone()),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: i64::try_from(self.node.started.elapsed().as_secs()).unwrap_or(i64::MAX),
        };
        Ok(Response::new(GetStatusResponse {
            nodes: vec![node],
            trust_domain: self.issuance.settings().trust_domain.clone(),
        }))
    }
}
