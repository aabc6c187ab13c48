//! The issuance path shared by every front end: authenticate, check the CSR, apply policy, build
//! and sign in the HSM off the async runtime, record in the ledger, then respond.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use time::OffsetDateTime;
use tracing::{info, warn};

use crate::audit::{AuditEvent, AuditLog, Decision};
use crate::ca::{CaChain, CaError, DownstreamCaRequest, IssuedLeaf, IssuingCa, LeafRequest, LeafUsage, Publication};
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

/// Profile name of workload certificates issued through Istio's certificate API.
pub const PROFILE_ISTIO: &str = "istio-workload";
/// Profile name of CA certificates minted for downstream CAs such as SPIRE servers.
pub const PROFILE_DOWNSTREAM_CA: &str = "downstream-ca";

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
    #[error("{0}")]
    InvalidRequest(String),
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

/// A downstream CA request, with the limits that apply to it.
#[derive(Debug, Clone)]
pub struct MintRequest<'a> {
    pub csr: &'a [u8],
    /// Requested lifetime in seconds; 0 means `max_ttl`.
    pub preferred_ttl_seconds: i64,
    /// The trust domain the request names, or empty to take the CSR's.
    pub trust_domain: &'a str,
    pub max_ttl: Duration,
    pub path_len: u8,
}

/// A minted downstream CA certificate.
#[derive(Debug, Clone)]
pub struct MintedCa {
    pub certificate: IssuedLeaf,
    pub trust_domain: String,
    pub intermediates_der: Vec<Vec<u8>>,
    /// Conditions the caller should know about.
    pub warnings: Vec<String>,
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
    /// The CA that signs now. CA rotation replaces it while requests are in flight, so each
    /// request loads it once and returns the chain of the CA that signed.
    ca: ArcSwap<IssuingCa>,
    /// Ledger version of `ca`; 0 until the node sets it.
    ca_version: AtomicU64,
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
        Issuance { ca: ArcSwap::new(ca), ca_version: AtomicU64::new(0), policy, replica, audit, metrics, settings }
    }

    /// Returns the CA that signs now.
    pub fn ca(&self) -> Arc<IssuingCa> {
        self.ca.load_full()
    }

    /// Returns the ledger version of the CA that signs now.
    pub fn ca_version(&self) -> u64 {
        self.ca_version.load(Ordering::Acquire)
    }

    /// Makes `ca`, ledger version `version`, the CA that signs from now on.
    pub fn replace_ca(&self, version: u64, ca: Arc<IssuingCa>) {
        self.ca.store(ca);
        self.ca_version.store(version, Ordering::Release);
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

    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
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
        self.sign_svid(context, csr, ttl_seconds, PROFILE_X509_SVID, BTreeMap::new()).await
    }

    /// Signs an X509-SVID as [`Issuance::sign_x509_svid`] does, recorded and audited under
    /// `profile`, with the caller's request metadata in the audit event.
    ///
    /// # Errors
    ///
    /// See [`IssueError`]; a refused request writes no issuance record.
    pub async fn sign_svid(
        &self,
        context: &RequestContext,
        csr: &[u8],
        ttl_seconds: Option<i64>,
        profile: &str,
        metadata: BTreeMap<String, String>,
    ) -> Result<IssuedSvid, IssueError> {
        let started = Instant::now();
        let mut event = AuditEvent::new(self.settings.node_id, &context.request_id, profile, Decision::Issued);
        event.metadata = metadata;
        let result = self.sign_x509_svid_steps(context, csr, ttl_seconds, profile, &mut event).await;

        match &result {
            Ok(issued) => {
                record_issued(&mut event, &issued.leaf);
                self.metrics.issued.with_label_values(&[profile, "issued"]).inc();
                self.metrics.issuance_seconds.with_label_values(&[profile]).observe(started.elapsed().as_secs_f64());
            }
            Err(error) => {
                let code = crate::grpc::code_name(crate::grpc::status_from(error).code());
                event.decision = Decision::Refused;
                event.status = Some(code.to_owned());
                event.reason = Some(error.to_string());
                self.metrics.issued.with_label_values(&[profile, code]).inc();
                info!(request_id = %context.request_id, caller = ?event.caller, profile, %error, "x509-svid request rejected");
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
        profile: &str,
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
        let (leaf, chain) = self.sign_blocking(&leaf_request).await?;
        self.record(&leaf, checked.spiffe_id.as_str(), caller.as_str(), profile).await?;
        Ok(IssuedSvid { leaf, intermediates_der: chain.intermediates_der, roots_der: chain.roots_der })
    }

    /// Mints a CA certificate for a downstream CA, such as a SPIRE server, and records it. Writes
    /// exactly one audit event.
    ///
    /// # Errors
    ///
    /// See [`IssueError`]; a refused request writes no issuance record.
    pub async fn mint_x509_ca(
        &self,
        context: &RequestContext,
        request: &MintRequest<'_>,
    ) -> Result<MintedCa, IssueError> {
        let started = Instant::now();
        let mut event =
            AuditEvent::new(self.settings.node_id, &context.request_id, PROFILE_DOWNSTREAM_CA, Decision::Issued);
        let result = self.mint_x509_ca_steps(context, request, &mut event).await;
        match &result {
            Ok(minted) => {
                record_issued(&mut event, &minted.certificate);
                event.warnings.clone_from(&minted.warnings);
                self.metrics.issued.with_label_values(&[PROFILE_DOWNSTREAM_CA, "issued"]).inc();
                self.metrics
                    .issuance_seconds
                    .with_label_values(&[PROFILE_DOWNSTREAM_CA])
                    .observe(started.elapsed().as_secs_f64());
                for warning in &minted.warnings {
                    warn!(request_id = %context.request_id, caller = ?event.caller, warning, "downstream CA minted with a warning");
                }
            }
            Err(error) => {
                let code = crate::grpc::code_name(crate::grpc::status_from(error).code());
                event.decision = Decision::Refused;
                event.status = Some(code.to_owned());
                event.reason = Some(error.to_string());
                self.metrics.issued.with_label_values(&[PROFILE_DOWNSTREAM_CA, code]).inc();
                info!(request_id = %context.request_id, caller = ?event.caller, %error, "downstream CA request rejected");
            }
        }
        self.audit.log(event);
        result
    }

    async fn mint_x509_ca_steps(
        &self,
        context: &RequestContext,
        request: &MintRequest<'_>,
        event: &mut AuditEvent,
    ) -> Result<MintedCa, IssueError> {
        let caller = context.caller.clone().map_err(|reason| IssueError::Unauthenticated { reason })?;
        event.caller = Some(caller.to_string());
        self.check_ca_valid()?;
        self.policy.take_token(&caller).inspect_err(|_| {
            self.metrics.policy_decisions.with_label_values(&["rate_limited"]).inc();
        })?;

        let checked = crate::csr::check_ca_csr(request.csr)?;
        let trust_domain = mint_trust_domain(request.trust_domain, checked.trust_domain.as_deref())?;
        event.spiffe_id = Some(format!("spiffe://{trust_domain}"));
        self.apply_downstream_policy(&caller, &trust_domain, event)?;

        let mut warnings = Vec::new();
        let ttl = mint_ttl(request.preferred_ttl_seconds, request.max_ttl, &mut warnings)?;
        event.ttl_seconds = Some(ttl.as_secs());
        let now = OffsetDateTime::now_utc();
        let ca = self.ca();
        warn_if_long_lived(now, ttl, ca.summary().not_after, &mut warnings);

        let ca_request = DownstreamCaRequest {
            spki_der: &checked.spki_der,
            trust_domain: &trust_domain,
            subject: &checked.subject,
            path_len: request.path_len,
            ttl,
        };
        let certificate = self.sign_ca_blocking(Arc::clone(&ca), &ca_request).await?;
        let spiffe_id = format!("spiffe://{trust_domain}");
        self.record(&certificate, &spiffe_id, caller.as_str(), PROFILE_DOWNSTREAM_CA).await?;
        Ok(MintedCa { certificate, trust_domain, intermediates_der: ca.chain().intermediates_der.clone(), warnings })
    }

    /// Decides whether `caller` may act for `trust_domain`, honouring monitor mode.
    ///
    /// # Errors
    ///
    /// [`IssueError::Denied`] in enforce mode when policy does not allow it.
    pub fn apply_downstream_policy(
        &self,
        caller: &SpiffeId,
        trust_domain: &str,
        event: &mut AuditEvent,
    ) -> Result<(), IssueError> {
        let Err(denial) = self.policy.check_downstream(caller, trust_domain) else {
            self.metrics.policy_decisions.with_label_values(&["allow"]).inc();
            return Ok(());
        };
        if self.policy.mode() == PolicyMode::Monitor {
            self.metrics.policy_decisions.with_label_values(&["monitor_deny"]).inc();
            warn!(request_id = %event.request_id, %caller, %denial, "policy would deny; going on because policy mode is monitor");
            event.decision = Decision::WouldRefuseMonitor;
            event.reason = Some(denial.to_string());
            return Ok(());
        }
        self.metrics.policy_decisions.with_label_values(&["deny"]).inc();
        Err(denial.into())
    }

    async fn sign_ca_blocking(
        &self,
        ca: Arc<IssuingCa>,
        request: &DownstreamCaRequest<'_>,
    ) -> Result<IssuedLeaf, IssueError> {
        let spki = request.spki_der.to_vec();
        let trust_domain = request.trust_domain.to_owned();
        let subject = request.subject.to_vec();
        let (path_len, ttl) = (request.path_len, request.ttl);
        let signed = tokio::task::spawn_blocking(move || {
            let request =
                DownstreamCaRequest { spki_der: &spki, trust_domain: &trust_domain, subject: &subject, path_len, ttl };
            ca.issue_ca(&request, OffsetDateTime::now_utc())
        })
        .await
        .map_err(|e| IssueError::Internal(format!("signing task failed: {e}")))?;
        signed.map_err(|error| match error {
            CaError::PathLength { .. } => IssueError::CaUnavailable(error),
            other => IssueError::Signing(other),
        })
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
        let (leaf, chain) = self.sign_blocking(&leaf_request).await?;
        self.record(&leaf, "", request.account, request.profile).await?;
        Ok(IssuedSvid { leaf, intermediates_der: chain.intermediates_der, roots_der: chain.roots_der })
    }

    /// Rejects requests once the intermediate has expired, since every leaf would be invalid.
    fn check_ca_valid(&self) -> Result<(), IssueError> {
        let ca = self.ca();
        let summary = ca.summary();
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

    /// Builds and signs a leaf on the blocking thread pool, since HSM calls block. Returns the
    /// chain of the CA that signed it too.
    async fn sign_blocking(&self, request: &LeafRequest<'_>) -> Result<(IssuedLeaf, CaChain), IssueError> {
        let ca = self.ca();
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
            ca.issue_leaf(&request, OffsetDateTime::now_utc()).map(|leaf| (leaf, ca.chain().clone()))
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
    ) -> Result<IssuedSvid, IssueError> {
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
        let (leaf, chain) = self.sign_blocking(&request).await?;
        self.record(&leaf, spiffe_id, spiffe_id, profile).await?;
        let request_id = format!("{profile}-{:016x}", rand::random::<u64>());
        let mut event = AuditEvent::new(self.settings.node_id, request_id, profile, Decision::Issued);
        event.caller = Some(spiffe_id.to_owned());
        event.spiffe_id = Some(spiffe_id.to_owned());
        event.dns_names = dns_names.to_vec();
        event.ttl_seconds = Some(ttl.as_secs());
        record_issued(&mut event, &leaf);
        self.audit.log(event);
        Ok(IssuedSvid { leaf, intermediates_der: chain.intermediates_der, roots_der: chain.roots_der })
    }
}

/// Picks the trust domain of a downstream CA: the request's, the CSR's, or both when they agree.
fn mint_trust_domain(requested: &str, from_csr: Option<&str>) -> Result<String, IssueError> {
    if !requested.is_empty() {
        crate::spiffe_id::check_trust_domain(requested)
            .map_err(|error| IssueError::InvalidRequest(format!("trust_domain is invalid: {error}")))?;
    }
    match (requested, from_csr) {
        ("", Some(found)) => Ok(found.to_owned()),
        ("", None) => Err(IssueError::InvalidRequest(
            "trust_domain is empty and the CSR has no URI SAN to take it from".to_owned(),
        )),
        (requested, Some(found)) if requested != found => Err(IssueError::InvalidRequest(format!(
            "the CSR's URI SAN spiffe://{found} is for trust domain {found:?}, but the request names {requested:?}"
        ))),
        (requested, _) => Ok(requested.to_owned()),
    }
}

/// Shortest lifetime of a minted CA: a shorter one could expire before the caller uses it.
const MIN_CA_TTL: Duration = Duration::from_secs(60);

/// Picks the lifetime of a minted CA: the preferred TTL, or the policy maximum when none is given
/// or the preferred one is longer, which adds a warning.
fn mint_ttl(preferred_seconds: i64, max_ttl: Duration, warnings: &mut Vec<String>) -> Result<Duration, IssueError> {
    if preferred_seconds < 0 {
        return Err(IssueError::InvalidTtl {
            value: preferred_seconds,
            reason: "it must not be negative (0 asks for the policy maximum)".to_owned(),
        });
    }
    let preferred = Duration::from_secs(preferred_seconds.unsigned_abs());
    if preferred.is_zero() {
        return Ok(max_ttl);
    }
    if preferred < MIN_CA_TTL {
        return Err(IssueError::InvalidTtl {
            value: preferred_seconds,
            reason: format!("a CA must live at least {} seconds", MIN_CA_TTL.as_secs()),
        });
    }
    if preferred > max_ttl {
        warnings.push(format!(
            "preferred TTL {}s is above the policy maximum of {}s (downstream.max_ttl); the CA was minted with {}s",
            preferred.as_secs(),
            max_ttl.as_secs(),
            max_ttl.as_secs()
        ));
        return Ok(max_ttl);
    }
    Ok(preferred)
}

/// Warns when the minted CA lives longer than a sixth of the issuer's remaining lifetime. A nested
/// SPIRE server activates its next CA when a sixth of the current one's life is left, and the
/// issuer's expiry would then cut that CA short.
fn warn_if_long_lived(
    now: OffsetDateTime,
    ttl: Duration,
    issuer_not_after: OffsetDateTime,
    warnings: &mut Vec<String>,
) {
    let remaining = (issuer_not_after - now).max(time::Duration::ZERO);
    let not_after = (now + ttl).min(issuer_not_after);
    let lifetime = not_after - now;
    if ttl > remaining.unsigned_abs() {
        warnings.push(format!(
            "the CA's lifetime was cut to {}s, the issuing CA's remaining lifetime",
            lifetime.whole_seconds()
        ));
    }
    if lifetime * 6 > remaining {
        warnings.push(format!(
            "the CA's lifetime of {}s is more than a sixth of the issuing CA's remaining {}s; a downstream CA that \
             rotates at a sixth of its lifetime may activate a CA close to the issuer's expiry",
            lifetime.whole_seconds(),
            remaining.whole_seconds()
        ));
    }
}

/// Adds the issued certificate's serial, notAfter and hash to an audit event. The decision stays as
/// set, because monitor mode issues with a would-be refusal.
fn record_issued(event: &mut AuditEvent, leaf: &IssuedLeaf) {
    event.serial = Some(hex::encode(&leaf.serial));
    event.not_after = crate::audit::rfc3339_from_unix(leaf.not_after.unix_timestamp());
    event.cert_sha256 = Some(hex::encode(leaf.sha256));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_trust_domain_sources() {
        assert_eq!(mint_trust_domain("", Some("example.org")).expect("from the CSR"), "example.org");
        assert_eq!(mint_trust_domain("example.org", None).expect("from the request"), "example.org");
        assert_eq!(mint_trust_domain("example.org", Some("example.org")).expect("both agree"), "example.org");
        let mismatch = mint_trust_domain("example.org", Some("other.org")).expect_err("they differ").to_string();
        assert!(mismatch.contains("spiffe://other.org"), "{mismatch}");
        assert!(mismatch.contains("\"example.org\""), "{mismatch}");
        let neither = mint_trust_domain("", None).expect_err("none given").to_string();
        assert!(neither.contains("no URI SAN"), "{neither}");
        let bad = mint_trust_domain("Example.ORG", None).expect_err("upper case").to_string();
        assert!(bad.contains("Example.ORG"), "{bad}");
    }

    #[test]
    fn mint_ttl_above_maximum() {
        let max = Duration::from_secs(7200);
        let mut warnings = Vec::new();
        assert_eq!(mint_ttl(0, max, &mut warnings).expect("default"), max);
        assert_eq!(mint_ttl(600, max, &mut warnings).expect("short"), Duration::from_secs(600));
        assert!(warnings.is_empty());
        assert_eq!(mint_ttl(9000, max, &mut warnings).expect("long"), max);
        assert!(warnings[0].contains("9000s"), "{warnings:?}");
        assert!(warnings[0].contains("7200s"), "{warnings:?}");
        let negative = mint_ttl(-1, max, &mut warnings).expect_err("negative").to_string();
        assert!(negative.contains("-1"), "{negative}");
        let short = mint_ttl(1, max, &mut warnings).expect_err("too short").to_string();
        assert!(short.contains("at least 60 seconds"), "{short}");
    }

    #[test]
    fn long_lived_ca_warning() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(1000);
        let issuer_not_after = now + time::Duration::days(60);
        let mut warnings = Vec::new();
        warn_if_long_lived(now, Duration::from_secs(10 * 86_400), issuer_not_after, &mut warnings);
        assert!(warnings.is_empty(), "10 days is a sixth of 60: {warnings:?}");
        warn_if_long_lived(now, Duration::from_secs(11 * 86_400), issuer_not_after, &mut warnings);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("more than a sixth"), "{warnings:?}");
        warnings.clear();
        warn_if_long_lived(now, Duration::from_secs(90 * 86_400), issuer_not_after, &mut warnings);
        assert!(warnings.iter().any(|warning| warning.contains("cut to 5184000s")), "{warnings:?}");
    }
}
