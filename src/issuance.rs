//! The issuance path shared by every front end: authenticate, check the CSR, apply policy, build
//! and sign in the HSM off the async runtime, record in the ledger, then respond.

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tracing::{info, warn};

use crate::audit::{AuditEvent, AuditLog, Decision};
use crate::ca::{CaError, IssuedLeaf, IssuingCa, LeafRequest, LeafUsage, Publication};
use crate::config::PolicyMode;
use crate::csr::{CsrError, check_csr};
use crate::ledger::{IssuanceRecord, Ledger, LedgerError};
use crate::metrics::Metrics;
use crate::policy::{Policy, PolicyDenial, PolicyRequest, RateLimited};
use crate::replica::{Replica, WriteError};
use crate::spiffe_id::SpiffeId;

/// Profile name of X509-SVIDs in records, metrics and audit events.
pub const PROFILE_X509_SVID: &str = "x509-svid";
/// Profile name of the node's own TLS server certificates.
pub const PROFILE_NODE_TLS: &str = "node-tls";
/// Profile name of client credentials issued offline by `sigil ca issue-client`.
pub const PROFILE_CLIENT_BOOTSTRAP: &str = "client-bootstrap";

/// Profile name of ACME TLS server certificates with the directory's default validity.
pub const PROFILE_TLS_SERVER: &str = "tls-server";
/// Profile name of ACME TLS server certificates with a short validity.
pub const PROFILE_SHORT_LIVED: &str = "short-lived";

/// A TLS server certificate request from ACME, after the ACME server matched the CSR's names
/// against the order's validated identifiers.
#[derive(Debug, Clone)]
pub struct TlsServerRequest<'a> {
    pub request_id: &'a str,
    pub csr_der: &'a [u8],
    /// The profile name, recorded with the certificate.
    pub profile: &'a str,
    pub ttl: Duration,
    /// The ACME account URL, recorded as the requester.
    pub account: &'a str,
    pub publication: Option<&'a Publication>,
}

/// Failure of an issuance request. `grpc::status_from` maps each variant to a gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("no client certificate with a SPIFFE ID was presented: {reason}")]
    Unauthenticated { reason: String },
    #[error(transparent)]
    InvalidCsr(#[from] CsrError),
    #[error("ttl_seconds {value} is invalid: {reason}")]
    InvalidTtl { value: i64, reason: String },
    #[error(transparent)]
    Denied(#[from] PolicyDenial),
    #[error(transparent)]
    RateLimited(#[from] RateLimited),
    #[error("CA cannot issue: {0}")]
    CaUnavailable(#[source] CaError),
    #[error("sign certificate: {0}")]
    Signing(#[source] CaError),
    #[error("record issuance: {0}")]
    Ledger(#[source] LedgerError),
    #[error("record issuance: {0}")]
    NotCommitted(#[source] sigil_raft::RaftError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// An issued certificate with everything a caller needs to use and verify it.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    pub leaf: IssuedLeaf,
    pub intermediates_der: Vec<Vec<u8>>,
    pub roots_der: Vec<Vec<u8>>,
}

/// The caller and request ID, as established by the transport.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    /// The SPIFFE ID from the client certificate, or why there is none.
    pub caller: Result<SpiffeId, String>,
}

/// Settings of the issuance path that come from the node configuration.
#[derive(Debug, Clone)]
pub struct IssuanceSettings {
    pub node_id: u64,
    pub trust_domain: String,
    pub default_ttl: Duration,
}

/// The node's issuance service.
pub struct Issuance {
    ca: Arc<IssuingCa>,
    policy: Policy,
    replica: Arc<Replica>,
    audit: Arc<AuditLog>,
    metrics: Metrics,
    settings: IssuanceSettings,
}

impl Issuance {
    pub fn new(
        ca: Arc<IssuingCa>,
        policy: Policy,
        replica: Arc<Replica>,
        audit: Arc<AuditLog>,
        metrics: Metrics,
        settings: IssuanceSettings,
    ) -> Issuance {
        Issuance { ca, policy, replica, audit, metrics, settings }
    }

    pub fn ca(&self) -> &Arc<IssuingCa> {
        &self.ca
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn ledger(&self) -> &Ledger {
        self.replica.ledger()
    }

    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }

    pub fn settings(&self) -> &IssuanceSettings {
        &self.settings
    }

    /// Signs an X509-SVID for the CSR's SPIFFE ID and records it. Writes exactly one audit event.
    ///
    /// # Errors
    ///
    /// See [`IssueError`]; a refused request writes no issuance record.
    pub async fn sign_x509_svid(
        &self,
        context: &RequestContext,
        csr: &[u8],
        ttl_seconds: Option<i64>,
    ) -> Result<IssuedSvid, IssueError> {
        let started = Instant::now();
        let mut event =
            AuditEvent::new(self.settings.node_id, &context.request_id, PROFILE_X509_SVID, Decision::Issued);
        let result = self.sign_x509_svid_steps(context, csr, ttl_seconds, &mut event).await;

        match &result {
            Ok(issued) => {
                record_issued(&mut event, &issued.leaf);
                self.metrics.issued.with_label_values(&[PROFILE_X509_SVID, "issued"]).inc();
                self.metrics
                    .issuance_seconds
                    .with_label_values(&[PROFILE_X509_SVID])
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(error) => {
                let code = crate::grpc::code_name(crate::grpc::status_from(error).code());
                event.decision = Decision::Refused;
                event.status = Some(code.to_owned());
                event.reason = Some(error.to_string());
                self.metrics.issued.with_label_values(&[PROFILE_X509_SVID, code]).inc();
                info!(request_id = %context.request_id, caller = ?event.caller, %error, "x509-svid request rejected");
            }
        }
        self.audit.log(event);
        result
    }

    async fn sign_x509_svid_steps(
        &self,
        context: &RequestContext,
        csr: &[u8],
        ttl_seconds: Option<i64>,
        event: &mut AuditEvent,
    ) -> Result<IssuedSvid, IssueError> {
        let caller = context.caller.clone().map_err(|reason| IssueError::Unauthenticated { reason })?;
        event.caller = Some(caller.to_string());
        self.check_ca_valid()?;

        self.policy.take_token(&caller).inspect_err(|_| {
            self.metrics.policy_decisions.with_label_values(&["rate_limited"]).inc();
        })?;

        let checked = check_csr(csr, &self.settings.trust_domain)?;
        event.spiffe_id = Some(checked.spiffe_id.to_string());
        event.dns_names = checked.dns_names.clone();
        if crate::policy::is_reserved(&checked.spiffe_id) {
            self.metrics.policy_decisions.with_label_values(&["deny"]).inc();
            return Err(PolicyDenial::Reserved { requested: checked.spiffe_id.to_string() }.into());
        }

        let ttl = self.resolve_ttl(&caller, ttl_seconds)?;
        event.ttl_seconds = Some(ttl.as_secs());

        let request =
            PolicyRequest { caller: &caller, spiffe_id: &checked.spiffe_id, dns_names: &checked.dns_names, ttl };
        self.apply_policy(&request, event)?;

        let leaf_request = LeafRequest {
            usage: LeafUsage::Svid,
            spki_der: &checked.spki_der,
            key_kind: checked.key_kind,
            spiffe_id: checked.spiffe_id.as_str(),
            publication: None,
            dns_names: &checked.dns_names,
            ip_addresses: &[],
            ttl,
        };
        let leaf = self.sign_blocking(&leaf_request).await?;
        self.record(&leaf, checked.spiffe_id.as_str(), caller.as_str(), PROFILE_X509_SVID).await?;

        let chain = self.ca.chain();
        Ok(IssuedSvid { leaf, intermediates_der: chain.intermediates_der.clone(), roots_der: chain.roots_der.clone() })
    }

    /// Signs a TLS server certificate for an ACME order and records it. Writes exactly one audit
    /// event.
    ///
    /// # Errors
    ///
    /// See [`IssueError`]; a refused request writes no issuance record.
    pub async fn issue_tls_server(&self, request: &TlsServerRequest<'_>) -> Result<IssuedSvid, IssueError> {
        let started = Instant::now();
        let mut event = AuditEvent::new(self.settings.node_id, request.request_id, request.profile, Decision::Issued);
        event.caller = Some(request.account.to_owned());
        event.ttl_seconds = Some(request.ttl.as_secs());
        let result = self.issue_tls_server_steps(request, &mut event).await;
        match &result {
            Ok(issued) => {
                record_issued(&mut event, &issued.leaf);
                self.metrics.issued.with_label_values(&[request.profile, "issued"]).inc();
                self.metrics
                    .issuance_seconds
                    .with_label_values(&[request.profile])
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(error) => {
                let code = crate::grpc::code_name(crate::grpc::status_from(error).code());
                event.decision = Decision::Refused;
                event.status = Some(code.to_owned());
                event.reason = Some(error.to_string());
                self.metrics.issued.with_label_values(&[request.profile, code]).inc();
                info!(request_id = %request.request_id, account = %request.account, %error, "ACME certificate request rejected");
            }
        }
        self.audit.log(event);
        result
    }

    async fn issue_tls_server_steps(
        &self,
        request: &TlsServerRequest<'_>,
        event: &mut AuditEvent,
    ) -> Result<IssuedSvid, IssueError> {
        self.check_ca_valid()?;
        let checked = crate::csr::check_tls_csr(request.csr_der)?;
        event.dns_names = checked.dns_names.clone();
        let leaf_request = LeafRequest {
            usage: LeafUsage::TlsServer,
            spki_der: &checked.spki_der,
            key_kind: checked.key_kind,
            spiffe_id: "",
            publication: request.publication,
            dns_names: &checked.dns_names,
            ip_addresses: &checked.ip_addresses,
            ttl: request.ttl,
        };
        let leaf = self.sign_blocking(&leaf_request).await?;
        self.record(&leaf, "", request.account, request.profile).await?;
        let chain = self.ca.chain();
        Ok(IssuedSvid { leaf, intermediates_der: chain.intermediates_der.clone(), roots_der: chain.roots_der.clone() })
    }

    /// Rejects requests once the intermediate has expired, since every leaf would be invalid.
    fn check_ca_valid(&self) -> Result<(), IssueError> {
        let summary = self.ca.summary();
        if summary.not_after <= OffsetDateTime::now_utc() {
            return Err(IssueError::CaUnavailable(CaError::Expired {
                subject: summary.subject.clone(),
                not_after: summary.not_after.to_string(),
            }));
        }
        Ok(())
    }

    /// Picks the TTL: the request's if given, otherwise the node default capped at the caller's
    /// maximum. Policy checks the result against the maximum.
    fn resolve_ttl(&self, caller: &SpiffeId, ttl_seconds: Option<i64>) -> Result<Duration, IssueError> {
        match ttl_seconds {
            None => {
                let max = self.policy.max_ttl(caller).unwrap_or(self.settings.default_ttl);
                Ok(self.settings.default_ttl.min(max))
            }
            Some(value) if value <= 0 => Err(IssueError::InvalidTtl {
                value,
                reason: "it must be a positive number of seconds (omit it for the default)".to_owned(),
            }),
            Some(value) => Ok(Duration::from_secs(value.unsigned_abs())),
        }
    }

    fn apply_policy(&self, request: &PolicyRequest<'_>, event: &mut AuditEvent) -> Result<(), IssueError> {
        let Err(denial) = self.policy.check(request) else {
            self.metrics.policy_decisions.with_label_values(&["allow"]).inc();
            return Ok(());
        };
        if self.policy.mode() == PolicyMode::Monitor {
            self.metrics.policy_decisions.with_label_values(&["monitor_deny"]).inc();
            warn!(request_id = %event.request_id, caller = %request.caller, %denial, "policy would deny; issuing because policy mode is monitor");
            event.decision = Decision::WouldRefuseMonitor;
            event.reason = Some(denial.to_string());
            return Ok(());
        }
        self.metrics.policy_decisions.with_label_values(&["deny"]).inc();
        Err(denial.into())
    }

    /// Builds and signs a leaf on the blocking thread pool, since HSM calls block.
    async fn sign_blocking(&self, request: &LeafRequest<'_>) -> Result<IssuedLeaf, IssueError> {
        let ca = Arc::clone(&self.ca);
        let spki = request.spki_der.to_vec();
        let spiffe_id = request.spiffe_id.to_owned();
        let dns_names = request.dns_names.to_vec();
        let ip_addresses = request.ip_addresses.to_vec();
        let (usage, key_kind, ttl) = (request.usage, request.key_kind, request.ttl);
        let publication = request.publication.cloned();

        let signed = tokio::task::spawn_blocking(move || {
            let request = LeafRequest {
                usage,
                spki_der: &spki,
                key_kind,
                spiffe_id: &spiffe_id,
                publication: publication.as_ref(),
                dns_names: &dns_names,
                ip_addresses: &ip_addresses,
                ttl,
            };
            ca.issue_leaf(&request, OffsetDateTime::now_utc())
        })
        .await
        .map_err(|e| IssueError::Internal(format!("signing task failed: {e}")))?;
        signed.map_err(IssueError::Signing)
    }

    async fn record(&self, leaf: &IssuedLeaf, spiffe_id: &str, caller: &str, profile: &str) -> Result<(), IssueError> {
        let record = IssuanceRecord {
            serial: leaf.serial.clone(),
            spiffe_id: spiffe_id.to_owned(),
            not_after_unix: leaf.not_after.unix_timestamp(),
            issued_at_unix: OffsetDateTime::now_utc().unix_timestamp(),
            caller: caller.to_owned(),
            profile: profile.to_owned(),
            cert_sha256: leaf.sha256.to_vec(),
        };
        let started = Instant::now();
        let result = self.replica.record(record).await;
        self.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
        result.map_err(|error| match error {
            WriteError::Rejected(error) => IssueError::Ledger(error),
            WriteError::Unavailable(error) => IssueError::NotCommitted(error),
        })
    }

    /// Issues a certificate the node needs itself, such as its TLS server certificate or a bootstrap
    /// client credential, for an in-process P-256 key. Caller policy does not apply, but the
    /// certificate is recorded and audited like any other.
    ///
    /// # Errors
    ///
    /// Fails when the HSM cannot sign or the ledger cannot record.
    pub async fn issue_internal(
        &self,
        profile: &str,
        spki_der: &[u8],
        spiffe_id: &str,
        dns_names: &[String],
        ip_addresses: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<IssuedLeaf, IssueError> {
        let request = LeafRequest {
            usage: LeafUsage::Svid,
            spki_der,
            key_kind: crate::csr::KeyKind::EcP256,
            spiffe_id,
            publication: None,
            dns_names,
            ip_addresses,
            ttl,
        };
        let leaf = self.sign_blocking(&request).await?;
        self.record(&leaf, spiffe_id, spiffe_id, profile).await?;
        let request_id = format!("{profile}-{:016x}", rand::random::<u64>());
        let mut event = AuditEvent::new(self.settings.node_id, request_id, profile, Decision::Issued);
        event.caller = Some(spiffe_id.to_owned());
        event.spiffe_id = Some(spiffe_id.to_owned());
        event.dns_names = dns_names.to_vec();
        event.ttl_seconds = Some(ttl.as_secs());
        record_issued(&mut event, &leaf);
        self.audit.log(event);
        Ok(leaf)
    }
}

/// Adds the issued certificate's serial, notAfter and hash to an audit event. The decision stays as
/// set, because monitor mode issues with a would-be refusal.
fn record_issued(event: &mut AuditEvent, leaf: &IssuedLeaf) {
    event.serial = Some(hex::encode(&leaf.serial));
    event.not_after = crate::audit::rfc3339_from_unix(leaf.not_after.unix_timestamp());
    event.cert_sha256 = Some(hex::encode(leaf.sha256));
}
