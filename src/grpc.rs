//! gRPC front end: the `sigil.v1.Issuer` and `sigil.v1.Admin` services.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::issuance::{Issuance, IssueError, RequestContext};
use crate::proto::admin_server::Admin;
use crate::proto::issuer_server::Issuer;
use crate::proto::{
    AcmeEabKey, AddNodeRequest, CaStatus, CreateAcmeEabKeyRequest, CreateAcmeEabKeyResponse, DeleteAcmeEabKeyRequest,
    DeleteAcmeEabKeyResponse, GetStatusRequest, GetStatusResponse, GetTrustBundleRequest, GetTrustBundleResponse,
    HsmStatus, InstallCaVersionRequest, IssueNodeCertificateRequest, IssueNodeCertificateResponse,
    ListAcmeEabKeysRequest, ListAcmeEabKeysResponse, MembershipResponse, NodeStatus, PrepareCaKeyRequest,
    PrepareCaKeyResponse, RemoveNodeRequest, RotateCaRequest, RotateCaResponse, SignX509SvidRequest,
    SignX509SvidResponse, TaintCaRootRequest, TaintCaRootResponse,
};
use crate::replica::MembershipError;
use crate::tls::caller_spiffe_id;

/// Maps an issuance error to its gRPC status. The match is exhaustive so a new error variant
/// must choose its status.
pub fn status_from(error: &IssueError) -> Status {
    let message = error.to_string();
    match error {
        IssueError::Unauthenticated { .. } => Status::unauthenticated(message),
        IssueError::InvalidCsr(_) | IssueError::InvalidTtl { .. } | IssueError::InvalidRequest(_) => {
            Status::invalid_argument(message)
        }
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

pub(crate) fn request_context<T>(request: &Request<T>) -> RequestContext {
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
    node_cert_ttl: std::time::Duration,
    /// The node configuration and HSM that CA rotation uses.
    rotation: Option<(Arc<crate::config::Config>, sigil_hsm::Hsm)>,
}

impl AdminService {
    pub fn new(
        issuance: Arc<Issuance>,
        node: NodeInfo,
        health: crate::metrics::Health,
        node_cert_ttl: std::time::Duration,
    ) -> AdminService {
        AdminService { issuance, node, health, node_cert_ttl, rotation: None }
    }

    /// Lets the service rotate the CA with the node's configuration and HSM.
    #[must_use]
    pub fn with_rotation(mut self, config: Arc<crate::config::Config>, hsm: sigil_hsm::Hsm) -> AdminService {
        self.rotation = Some((config, hsm));
        self
    }
}

impl AdminService {
    /// Checks that the caller is an administrator and returns its request ID and SPIFFE ID.
    fn admin<T>(&self, request: &Request<T>) -> Result<(String, crate::spiffe_id::SpiffeId), Status> {
        let context = request_context(request);
        let caller = context.caller.map_err(|reason| {
            Status::unauthenticated(format!("no client certificate with a SPIFFE ID was presented: {reason}"))
        })?;
        if !self.issuance.policy().is_admin(&caller) {
            return Err(Status::permission_denied(format!(
                "caller {caller} is not an administrator; set admin = true in its policy entry"
            )));
        }
        Ok((context.request_id, caller))
    }

    /// Returns the membership once this node's published status shows node `id` as a voter
    /// (`voter` true) or as gone, waiting at most one second for the node's next status update.
    async fn membership(&self, id: u64, voter: bool) -> MembershipResponse {
        let mut status = self.issuance.replica().status();
        for _ in 0..50 {
            if status.voters.contains(&id) == voter {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            status = self.issuance.replica().status();
        }
        MembershipResponse { voters: status.voters, learners: status.learners }
    }
}

/// Maps an ACME problem from an administrative call to its gRPC status.
fn problem_status(problem: sigil_acme::Problem) -> Status {
    match problem.status {
        404 => Status::not_found(problem.detail),
        400 => Status::invalid_argument(problem.detail),
        503 => Status::unavailable(problem.detail),
        _ => Status::internal(problem.detail),
    }
}

fn rotated_response(rotated: crate::rotation::Rotated) -> RotateCaResponse {
    RotateCaResponse {
        version: rotated.version,
        root_fingerprint_sha256: hex::encode(ring::digest::digest(&ring::digest::SHA256, &rotated.root_der)),
        activate_at: rotated.activate_at,
        intermediate: rotated.intermediate_der,
        root: rotated.root_der,
    }
}

/// Maps a membership error to its gRPC status.
fn membership_status(error: &MembershipError) -> Status {
    let message = error.to_string();
    match error {
        MembershipError::NotLeader { .. } | MembershipError::HandedOver { .. } => Status::failed_precondition(message),
        MembershipError::Invalid(_) => Status::invalid_argument(message),
        MembershipError::CatchUp { .. } => Status::deadline_exceeded(message),
        MembershipError::Raft(_) => Status::unavailable(message),
    }
}

/// Maximum wait for a new node to catch up when the request sets none.
const DEFAULT_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(120);

#[tonic::async_trait]
impl Admin for AdminService {
    async fn add_node(&self, request: Request<AddNodeRequest>) -> Result<Response<MembershipResponse>, Status> {
        let (request_id, caller) = self.admin(&request)?;
        let request = request.into_inner();
        if request.node_id == 0 {
            return Err(Status::invalid_argument("node_id 0 is invalid: node IDs start at 1"));
        }
        let address = request.raft_address.trim();
        if address.is_empty() || !address.contains(':') {
            return Err(Status::invalid_argument(format!(
                "raft_address {:?} is invalid: expected host:port of the new node's Raft listener",
                request.raft_address
            )));
        }
        let catch_up = match request.catch_up_seconds {
            0 => DEFAULT_CATCH_UP,
            seconds => std::time::Duration::from_secs(u64::from(seconds)),
        };
        tracing::info!(request_id, %caller, new_node = request.node_id, address, "add node requested");
        self.issuance.replica().add_node(request.node_id, address, catch_up).await.map_err(|error| {
            tracing::warn!(request_id, new_node = request.node_id, %error, "add node failed");
            membership_status(&error)
        })?;
        Ok(Response::new(self.membership(request.node_id, true).await))
    }

    async fn remove_node(&self, request: Request<RemoveNodeRequest>) -> Result<Response<MembershipResponse>, Status> {
        let (request_id, caller) = self.admin(&request)?;
        let node_id = request.into_inner().node_id;
        tracing::info!(request_id, %caller, node = node_id, "remove node requested");
        self.issuance.replica().remove_node(node_id).await.map_err(|error| {
            tracing::warn!(request_id, node = node_id, %error, "remove node failed");
            membership_status(&error)
        })?;
        Ok(Response::new(self.membership(node_id, false).await))
    }

    async fn issue_node_certificate(
        &self,
        request: Request<IssueNodeCertificateRequest>,
    ) -> Result<Response<IssueNodeCertificateResponse>, Status> {
        let (request_id, caller) = self.admin(&request)?;
        let request = request.into_inner();
        if request.node_id == 0 {
            return Err(Status::invalid_argument("node_id 0 is invalid: node IDs start at 1"));
        }
        crate::node_tls::check_p256_spki(&request.public_key)
            .map_err(|reason| Status::invalid_argument(format!("public_key is invalid: {reason}")))?;
        let mut ip_addresses = Vec::with_capacity(request.ip_addresses.len());
        for text in &request.ip_addresses {
            let address = text
                .parse::<std::net::IpAddr>()
                .map_err(|_| Status::invalid_argument(format!("ip_addresses entry {text:?} is not an IP address")))?;
            ip_addresses.push(address);
        }
        for name in &request.dns_names {
            if name.is_empty()
                || name.len() > 253
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                return Err(Status::invalid_argument(format!("dns_names entry {name:?} is not a DNS name")));
            }
        }
        let settings = self.issuance.settings();
        let spiffe_id = crate::peer_tls::node_spiffe_id(&settings.trust_domain, request.node_id);
        tracing::info!(request_id, %caller, node = request.node_id, "node certificate requested");
        let issued = self
            .issuance
            .issue_internal(
                crate::issuance::PROFILE_NODE_TLS,
                &request.public_key,
                &spiffe_id,
                &request.dns_names,
                &ip_addresses,
                self.node_cert_ttl,
            )
            .await
            .map_err(|error| {
                tracing::warn!(request_id, node = request.node_id, %error, "node certificate failed");
                status_from(&error)
            })?;
        let mut certificates = vec![issued.leaf.der];
        certificates.extend(issued.intermediates_der);
        Ok(Response::new(IssueNodeCertificateResponse { chain: certificates, roots: issued.roots_der }))
    }

    async fn create_acme_eab_key(
        &self,
        request: Request<CreateAcmeEabKeyRequest>,
    ) -> Result<Response<CreateAcmeEabKeyResponse>, Status> {
        let (request_id, caller) = self.admin(&request)?;
        let label = request.into_inner().label;
        let store = crate::acme::LedgerStore::new(Arc::clone(self.issuance.replica()));
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let created = sigil_acme::eab::create(&store, &label, now).await.map_err(problem_status)?;
        tracing::info!(request_id, %caller, key_id = %created.key_id, "ACME external account binding key created");
        Ok(Response::new(CreateAcmeEabKeyResponse { key_id: created.key_id, hmac_key: created.hmac_key }))
    }

    async fn list_acme_eab_keys(
        &self,
        request: Request<ListAcmeEabKeysRequest>,
    ) -> Result<Response<ListAcmeEabKeysResponse>, Status> {
        self.admin(&request)?;
        self.issuance.replica().sync_read().await.map_err(|error| Status::unavailable(error.to_string()))?;
        let store = crate::acme::LedgerStore::new(Arc::clone(self.issuance.replica()));
        let keys = sigil_acme::eab::list(&store).map_err(problem_status)?;
        let keys = keys
            .into_iter()
            .map(|key| AcmeEabKey {
                key_id: key.key_id.clone(),
                label: key.label.clone(),
                created_unix: key.created_unix,
                account: key.account.clone().map(|id| format!("/acme/account/{id}")).unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(ListAcmeEabKeysResponse { keys }))
    }

    async fn delete_acme_eab_key(
        &self,
        request: Request<DeleteAcmeEabKeyRequest>,
    ) -> Result<Response<DeleteAcmeEabKeyResponse>, Status> {
        let (request_id, caller) = self.admin(&request)?;
        let key_id = request.into_inner().key_id;
        self.issuance.replica().sync_read().await.map_err(|error| Status::unavailable(error.to_string()))?;
        let store = crate::acme::LedgerStore::new(Arc::clone(self.issuance.replica()));
        sigil_acme::eab::remove(&store, &key_id).await.map_err(problem_status)?;
        tracing::info!(request_id, %caller, key_id, "ACME external account binding key removed");
        Ok(Response::new(DeleteAcmeEabKeyResponse {}))
    }

    async fn rotate_ca(&self, request: Request<RotateCaRequest>) -> Result<Response<RotateCaResponse>, Status> {
        let (request_id, caller) = self.admin(&request)?;
        let request = request.into_inner();
        let (config, hsm) =
            self.rotation.clone().ok_or_else(|| Status::unimplemented("this node cannot rotate its CA"))?;
        let activate_after = match request.activate_after_seconds {
            0 => crate::rotation::DEFAULT_ACTIVATE_AFTER,
            seconds => std::time::Duration::from_secs(seconds),
        };
        let validity = (request.validity_seconds > 0).then(|| std::time::Duration::from_secs(request.validity_seconds));
        if validity.is_some_and(|validity| validity < std::time::Duration::from_secs(3600)) {
            return Err(Status::invalid_argument(format!(
                "validity_seconds {} is too short: a CA must be valid for at least 3600 seconds",
                request.validity_seconds
            )));
        }
        tracing::info!(request_id, %caller, activate_after_s = activate_after.as_secs(), "CA rotation requested");
        let rotated = crate::rotation::rotate(config, hsm, Arc::clone(&self.issuance), activate_after, validity)
            .await
            .map_err(|error| {
                tracing::warn!(request_id, error = format!("{error:#}"), "CA rotation failed");
                Status::failed_precondition(format!("{error:#}"))
            })?;
        Ok(Response::new(rotated_response(rotated)))
    }

    async fn prepare_ca_key(
        &self,
        request: Request<PrepareCaKeyRequest>,
    ) -> Result<Response<PrepareCaKeyResponse>, Status> {
        let (request_id, caller) = self.admin(&request)?;
        let (config, hsm) =
            self.rotation.clone().ok_or_else(|| Status::unimplemented("this node cannot rotate its CA"))?;
        tracing::info!(request_id, %caller, "next CA key requested");
        let prepared = tokio::task::spawn_blocking(move || crate::rotation::prepare_key(&config, &hsm))
            .await
            .map_err(|error| Status::internal(format!("key task failed: {error}")))?;
        let (key_label, csr) = prepared.map_err(|error| {
            tracing::warn!(request_id, error = format!("{error:#}"), "preparing the next CA key failed");
            Status::unavailable(format!("{error:#}"))
        })?;
        Ok(Response::new(PrepareCaKeyResponse { key_label, csr, node_id: self.issuance.settings().node_id }))
    }

    async fn install_ca_version(
        &self,
        request: Request<InstallCaVersionRequest>,
    ) -> Result<Response<RotateCaResponse>, Status> {
        let (request_id, caller) = self.admin(&request)?;
        let request = request.into_inner();
        let (config, hsm) =
            self.rotation.clone().ok_or_else(|| Status::unimplemented("this node cannot rotate its CA"))?;
        if request.key_label.is_empty() || request.intermediates.is_empty() || request.roots.is_empty() {
            return Err(Status::invalid_argument(
                "key_label, intermediates and roots are required; key_label comes from PrepareCaKey",
            ));
        }
        let activate_after = match request.activate_after_seconds {
            0 => crate::rotation::DEFAULT_ACTIVATE_AFTER,
            seconds => std::time::Duration::from_secs(seconds),
        };
        tracing::info!(request_id, %caller, key_label = %request.key_label, "CA version install requested");
        let chain = crate::ca::CaChain { intermediates_der: request.intermediates, roots_der: request.roots };
        let rotated = crate::rotation::install_prepared(
            config,
            hsm,
            Arc::clone(&self.issuance),
            request.key_label,
            chain,
            activate_after,
        )
        .await
        .map_err(|error| {
            tracing::warn!(request_id, error = format!("{error:#}"), "CA version install failed");
            Status::failed_precondition(format!("{error:#}"))
        })?;
        Ok(Response::new(rotated_response(rotated)))
    }

    async fn taint_ca_root(
        &self,
        request: Request<TaintCaRootRequest>,
    ) -> Result<Response<TaintCaRootResponse>, Status> {
        let (request_id, caller) = self.admin(&request)?;
        let fingerprint = request.into_inner().root_fingerprint_sha256;
        self.issuance.replica().sync_read().await.map_err(|error| Status::unavailable(error.to_string()))?;
        let signing_version =
            crate::rotation::taint_root(&self.issuance, &fingerprint, caller.as_str()).await.map_err(|error| {
                tracing::warn!(request_id, error = format!("{error:#}"), "tainting a root failed");
                Status::failed_precondition(format!("{error:#}"))
            })?;
        Ok(Response::new(TaintCaRootResponse { signing_version }))
    }

    async fn get_status(&self, request: Request<GetStatusRequest>) -> Result<Response<GetStatusResponse>, Status> {
        self.admin(&request)?;

        let ledger = self.issuance.ledger();
        let ca = self.issuance.ca();
        let summary = ca.summary();
        let ca_version = self.issuance.ca_version();
        let raft = self.issuance.replica().status();
        let (applied_index, digest) = ledger.applied_state();
        let node = NodeStatus {
            id: self.issuance.settings().node_id,
            role: raft.role.as_str().to_owned(),
            ready: self.health.is_ready() && raft.is_ready(),
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
