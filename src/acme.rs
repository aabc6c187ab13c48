//! The ACME server on a Sigil node: the ledger as its store, the issuance path as its issuer, and
//! the HTTPS listener it is served on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sigil_acme::validation::{ResolverSetting, ValidationSettings, Validator};
use sigil_acme::{
    AcmeServer, AcmeSettings, CsrSummary, Identifier, IpRange, IssueRequest, IssuedCertificate, Issuer, Problem,
    ProblemType, ProfileInfo, Store, StoreError, Transaction, Versioned,
};
use sigil_raft::RequestId;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, info, warn};

use crate::ca::Publication;
use crate::config::Config;
use crate::csr::CsrError;
use crate::issuance::{Issuance, IssueError, PROFILE_SHORT_LIVED, PROFILE_TLS_SERVER, TlsServerRequest};
use crate::ledger::{Command, KvCondition, KvTransaction, KvWrite, LedgerError};
use crate::replica::{Replica, WriteError};
use crate::tls::NodeCertResolver;

/// The replicated ledger as the ACME server's store.
pub struct LedgerStore {
    replica: Arc<Replica>,
}

impl LedgerStore {
    pub fn new(replica: Arc<Replica>) -> LedgerStore {
        LedgerStore { replica }
    }
}

impl Store for LedgerStore {
    fn get(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        let stored = self.replica.ledger().kv_get(key).map_err(|error| StoreError::Internal(error.to_string()))?;
        Ok(stored.map(|stored| Versioned { value: stored.value, revision: stored.revision }))
    }

    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Versioned)>, StoreError> {
        let entries = self
            .replica
            .ledger()
            .kv_scan(prefix, after, limit)
            .map_err(|error| StoreError::Internal(error.to_string()))?;
        Ok(entries
            .into_iter()
            .map(|(key, stored)| (key, Versioned { value: stored.value, revision: stored.revision }))
            .collect())
    }

    async fn commit(&self, transaction: Transaction) -> Result<u64, StoreError> {
        let command = Command::kv_transaction(KvTransaction {
            conditions: transaction
                .conditions
                .into_iter()
                .map(|(key, revision)| KvCondition { key, revision })
                .collect(),
            writes: transaction
                .writes
                .into_iter()
                .map(|write| KvWrite {
                    key: write.key,
                    delete: write.value.is_none(),
                    value: write.value.unwrap_or_default(),
                    expires_unix: write.expires_unix,
                })
                .collect(),
        });
        match self.replica.write(RequestId::random(), &command).await {
            Ok(crate::ledger::CommandResult::KvCommitted { revision }) => Ok(revision),
            Ok(other) => Err(StoreError::Internal(format!("a key-value transaction returned {other:?}"))),
            Err(WriteError::Rejected(LedgerError::KvConflict { key, .. })) => Err(StoreError::Conflict { key }),
            Err(WriteError::Rejected(error)) => Err(StoreError::Internal(error.to_string())),
            Err(WriteError::Unavailable(error)) => Err(StoreError::Unavailable(error.to_string())),
        }
    }

    async fn barrier(&self) -> Result<(), StoreError> {
        self.replica.sync_read().await.map(|_| ()).map_err(|error| StoreError::Unavailable(error.to_string()))
    }
}

/// The node's issuance path as the ACME server's issuer.
#[derive(Clone)]
pub struct NodeIssuer {
    issuance: Arc<Issuance>,
    default_validity: Duration,
    short_lived_validity: Duration,
    publication: Publication,
}

impl NodeIssuer {
    pub fn new(issuance: Arc<Issuance>, config: &Config) -> NodeIssuer {
        NodeIssuer {
            issuance,
            default_validity: config.acme.default_validity,
            short_lived_validity: config.acme.short_lived_validity,
            publication: crate::publication::urls(config),
        }
    }

    fn validity(&self, profile: &str) -> Duration {
        if profile == PROFILE_SHORT_LIVED { self.short_lived_validity } else { self.default_validity }
    }
}

impl Issuer for NodeIssuer {
    fn check_csr(&self, csr_der: &[u8]) -> Result<CsrSummary, Problem> {
        let checked = crate::csr::check_tls_csr(csr_der).map_err(csr_problem)?;
        let mut identifiers: Vec<Identifier> = checked.dns_names.iter().map(Identifier::dns).collect();
        identifiers.extend(checked.ip_addresses.iter().map(|address| Identifier::ip(address.to_string())));
        Ok(CsrSummary { identifiers, spki_der: checked.spki_der })
    }

    async fn issue(&self, request: IssueRequest<'_>) -> Result<IssuedCertificate, Problem> {
        let mut ttl = self.validity(request.profile);
        if let Some(limit) = request.not_after {
            let remaining = limit - OffsetDateTime::now_utc();
            if remaining.is_positive() {
                ttl = ttl.min(remaining.unsigned_abs());
            }
        }
        let request_id = format!("acme-{:016x}", rand::random::<u64>());
        let tls_request = TlsServerRequest {
            request_id: &request_id,
            csr_der: request.csr_der,
            profile: request.profile,
            ttl,
            account: request.account,
            publication: Some(&self.publication),
        };
        let issued = self.issuance.issue_tls_server(&tls_request).await.map_err(issue_problem)?;
        let not_before = not_before_of(&issued.leaf.der)?;
        Ok(IssuedCertificate {
            leaf_der: issued.leaf.der,
            chains: vec![issued.intermediates_der],
            serial: issued.leaf.serial,
            not_before,
            not_after: issued.leaf.not_after,
        })
    }

    fn profiles(&self) -> Vec<ProfileInfo> {
        vec![
            ProfileInfo {
                name: PROFILE_TLS_SERVER.to_owned(),
                description: format!(
                    "TLS server certificate valid for {}",
                    humantime::format_duration(self.default_validity)
                ),
            },
            ProfileInfo {
                name: PROFILE_SHORT_LIVED.to_owned(),
                description: format!(
                    "TLS server certificate valid for {}",
                    humantime::format_duration(self.short_lived_validity)
                ),
            },
        ]
    }

    fn roots(&self) -> Vec<Vec<u8>> {
        self.issuance.ca().chain().roots_der.clone()
    }
}

fn not_before_of(der: &[u8]) -> Result<OffsetDateTime, Problem> {
    use x509_parser::prelude::FromDer;
    let (_, certificate) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|error| Problem::internal(format!("parse the issued certificate: {error}")))?;
    Ok(certificate.validity().not_before.to_datetime())
}

fn csr_problem(error: CsrError) -> Problem {
    Problem::new(ProblemType::BadCsr, error.to_string())
}

fn issue_problem(error: IssueError) -> Problem {
    match error {
        IssueError::InvalidCsr(error) => csr_problem(error),
        IssueError::NotCommitted(error) => {
            let mut problem =
                Problem::internal(format!("the certificate could not be recorded in the ledger: {error}"))
                    .with_status(503);
            problem.retry_after = Some(1);
            problem
        }
        other => Problem::internal(other.to_string()),
    }
}

/// Builds the ACME settings of a node from its configuration.
pub fn settings(config: &Config, listen: SocketAddr) -> anyhow::Result<AcmeSettings> {
    let acme = &config.acme;
    let base_url = acme.base_url.clone().unwrap_or_else(|| format!("https://{listen}"));
    let mut settings = AcmeSettings::new(base_url);
    settings.terms_of_service = acme.terms_of_service.clone();
    settings.website = acme.website.clone();
    settings.caa_identities = acme.caa_identities.clone();
    settings.external_account_required = acme.external_account_required;
    settings.allowed_dns_suffixes = acme.allowed_dns_suffixes.clone();
    settings.allowed_ip_ranges = acme
        .allowed_ip_ranges
        .iter()
        .map(|range| IpRange::parse(range).map_err(anyhow::Error::msg))
        .collect::<anyhow::Result<_>>()?;
    settings.max_validity = acme.default_validity.max(acme.short_lived_validity);
    settings.orders_per_account_per_hour = acme.orders_per_account_per_hour;
    Ok(settings)
}

fn validation_settings(config: &Config) -> ValidationSettings {
    let validation = &config.acme.validation;
    let resolver = if !validation.resolve_to.is_empty() {
        ResolverSetting::Fixed(validation.resolve_to.clone())
    } else if let Some(address) = validation.resolver {
        ResolverSetting::Server(address)
    } else {
        ResolverSetting::System
    };
    ValidationSettings {
        http01_port: validation.http01_port,
        tls_alpn01_port: validation.tls_alpn01_port,
        resolver,
        allow_private_addresses: validation.allow_private_addresses,
        timeout: validation.timeout,
        workers: validation.workers,
        queue: validation.queue,
    }
}

/// Starts the ACME server on `listen.acme` if it is set. The HTTPS certificate is the node's own
/// TLS server certificate.
pub async fn serve(
    config: &Config,
    replica: Arc<Replica>,
    issuance: Arc<Issuance>,
    resolver: Arc<NodeCertResolver>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(listen) = config.listen.acme else {
        return Ok(None);
    };
    let listener = TcpListener::bind(listen).await.with_context(|| format!("bind ACME listener {listen}"))?;
    let settings = settings(config, listen)?;
    let validator = Validator::new(validation_settings(config)).map_err(anyhow::Error::msg)?;
    let tls = TlsAcceptor::from(Arc::new(https_config(resolver)?));
    let issuer = NodeIssuer::new(issuance, config);
    let task = async move {
        let Some(server) = start_with_retries(settings, replica, issuer, validator, shutdown.clone()).await else {
            return;
        };
        info!(address = %listen, base_url = %server.settings().base_url, "ACME server listening");
        serve_https(listener, tls, server.router(), shutdown).await;
    };
    Ok(Some(tokio::spawn(task.in_current_span())))
}

/// Starts the ACME server, which needs one ledger write, retrying every second while the cluster
/// has no quorum. Returns `None` if the node stops first.
async fn start_with_retries(
    settings: AcmeSettings,
    replica: Arc<Replica>,
    issuer: NodeIssuer,
    validator: Validator,
    mut shutdown: watch::Receiver<bool>,
) -> Option<Arc<AcmeServer<LedgerStore, NodeIssuer>>> {
    let mut attempt = 0u32;
    loop {
        let store = LedgerStore::new(Arc::clone(&replica));
        match AcmeServer::start(settings.clone(), store, issuer.clone(), validator.clone()).await {
            Ok(server) => return Some(server),
            Err(problem) => {
                attempt += 1;
                if attempt == 1 || attempt.is_multiple_of(30) {
                    warn!(attempt, %problem, "ACME server cannot start yet; retrying every second");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => return None,
        }
    }
}

#[expect(deprecated, reason = "ring keeps the build free of aws-lc; post-quantum key exchange is not yet needed here")]
fn https_config(resolver: Arc<NodeCertResolver>) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("select TLS versions: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Time a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn serve_https(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "accept ACME connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "ACME TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "ACME TLS handshake timed out");
                    return;
                }
            };
            let io = hyper_util::rt::TokioIo::new(tls);
            let service = hyper_util::service::TowerToHyperService::new(router);
            if let Err(error) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!(%peer, %error, "ACME connection ended with an error");
            }
        });
    }
}
