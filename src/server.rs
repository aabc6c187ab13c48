//! `sigil serve`: opens the ledger and the HSM, proves the CA key, and serves gRPC and metrics
//! until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rustls_pki_types::CertificateDer;
use sigil_hsm::{Hsm, HsmMetrics};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use crate::audit::AuditLog;
use crate::ca::{CaChain, HsmSigner, IssuingCa};
use crate::config::Config;
use crate::grpc::{AdminService, IssuerService, NodeInfo};
use crate::issuance::{Issuance, IssuanceSettings};
use crate::ledger::Ledger;
use crate::metrics::{Health, Metrics};
use crate::policy::Policy;
use crate::proto::HsmStatus;
use crate::proto::admin_server::AdminServer;
use crate::proto::issuer_server::IssuerServer;
use crate::tls::{NodeCertResolver, certified_key, server_config};

/// TLS handshakes that take longer than this are dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens the HSM named in `config` with its PIN, registering HSM metrics in `registry`.
///
/// # Errors
///
/// Fails when the PIN source, the module, the token or the login fails.
pub fn open_hsm(config: &Config, registry: Option<&prometheus::Registry>) -> anyhow::Result<Hsm> {
    let pin = config.hsm_pin().context("read HSM PIN")?;
    let metrics = match registry {
        Some(registry) => HsmMetrics::new(registry).context("register HSM metrics")?,
        None => HsmMetrics::unregistered(),
    };
    Hsm::open(&config.hsm_config(), pin, metrics).context("open HSM")
}

/// Loads the active CA from the ledger and proves that the HSM contains its key.
///
/// # Errors
///
/// Fails when no CA is installed, the key is missing, or it does not match the certificate.
pub fn load_ca(config: &Config, ledger: &Ledger, hsm: &Hsm) -> anyhow::Result<IssuingCa> {
    let active = ledger.active_ca().context("read CA from ledger")?.ok_or(crate::ca::CaError::NotInstalled)?;
    let key =
        hsm.find_key(&active.key_label).with_context(|| format!("find CA key {:?} in the HSM", active.key_label))?;
    let signer = HsmSigner::new(hsm.clone(), key)?;
    let chain = CaChain { intermediates_der: active.intermediates_der.clone(), roots_der: active.roots_der.clone() };
    let ca = IssuingCa::load(signer, chain, &config.ca.organization, config.issuance.backdate)
        .context("refusing to start: the CA in the ledger is unusable")?;
    Ok(ca)
}

/// Runs a node until SIGINT or SIGTERM.
///
/// # Errors
///
/// Fails when start-up fails; the message names the step.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let span = info_span!("node", node_id = config.node_id);
    serve_node(config).instrument(span).await
}

async fn serve_node(config: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut signals = StopSignals::install()?;
    info!(trust_domain = %config.trust_domain, grpc = %config.listen.grpc, metrics = %config.listen.metrics, "node starting");

    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(registry.clone()).context("register metrics")?;
    let health = Health::default();

    let ledger = Arc::new(Ledger::open(config.ledger_path()).context("open ledger")?);
    let hsm = open_hsm(&config, Some(&registry))?;
    let ca = Arc::new(load_ca(&config, &ledger, &hsm)?);
    metrics
        .ca_not_after
        .with_label_values(&[&ca.summary().subject])
        .set(ca.summary().not_after.unix_timestamp() as f64);
    info!(subject = %ca.summary().subject, key_label = %ca.summary().key_label, not_after = crate::audit::rfc3339_from_unix(ca.summary().not_after.unix_timestamp()).unwrap_or_default(), "CA key matches the installed certificate");

    let audit = Arc::new(match &config.audit.path {
        Some(path) => AuditLog::open(path).with_context(|| format!("open audit log {}", path.display()))?,
        None => AuditLog::disabled(),
    });
    let settings = IssuanceSettings {
        node_id: config.node_id,
        trust_domain: config.trust_domain.clone(),
        default_ttl: config.issuance.default_ttl,
    };
    let issuance = Arc::new(Issuance::new(
        Arc::clone(&ca),
        Policy::new(&config.policy),
        Arc::clone(&ledger),
        Arc::clone(&audit),
        metrics.clone(),
        settings,
    ));

    let resolver = Arc::new(NodeCertResolver::new(issue_node_key(&config, &issuance).await?));
    let tls = server_config(&ca.chain().roots_der, Arc::clone(&resolver))?;
    let grpc_listener = TcpListener::bind(config.listen.grpc)
        .await
        .with_context(|| format!("bind gRPC listener {}", config.listen.grpc))?;
    let metrics_listener = crate::metrics::bind(config.listen.metrics).await?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    purge_once(&ledger, config.issuance.retention).await;
    let purge = tokio::spawn(
        purge_expired_records(Arc::clone(&ledger), config.issuance.retention, shutdown_rx.clone()).in_current_span(),
    );
    let renewal = tokio::spawn(
        renew_node_certificate(config.clone(), Arc::clone(&issuance), resolver, shutdown_rx.clone()).in_current_span(),
    );
    let http = tokio::spawn(
        crate::metrics::serve_http(metrics_listener, registry, health.clone(), wait_for(shutdown_rx.clone()))
            .in_current_span(),
    );

    let node = NodeInfo { grpc_address: config.listen.grpc.to_string(), started, hsm: hsm_status(&hsm) };
    let incoming = accept_tls(grpc_listener, TlsAcceptor::from(Arc::new(tls)), shutdown_rx.clone());
    let grpc = tonic::transport::Server::builder()
        .add_service(IssuerServer::new(IssuerService::new(Arc::clone(&issuance))))
        .add_service(AdminServer::new(AdminService::new(Arc::clone(&issuance), node, health.clone())))
        .serve_with_incoming_shutdown(incoming, wait_for(shutdown_rx.clone()));
    let grpc = tokio::spawn(grpc.in_current_span());

    health.set_ready(true);
    metrics.ready.set(1);
    info!(elapsed_ms = started.elapsed().as_millis() as u64, "node ready");

    signals.wait().await;
    info!("node stopping");
    health.set_ready(false);
    metrics.ready.set(0);
    let _ = shutdown_tx.send(true);

    if let Err(error) = grpc.await.context("gRPC task")?.context("gRPC server") {
        error!(%error, "gRPC server stopped with an error");
    }
    if let Err(error) = http.await.context("metrics task")? {
        error!(%error, "metrics server stopped with an error");
    }
    renewal.abort();
    purge.abort();
    if let Err(error) = audit.flush() {
        error!(%error, "flush audit log failed");
    }
    // Dropping the last reference to the ledger writes queued records and closes RocksDB.
    drop(issuance);
    drop(ledger);
    info!("node stopped");
    Ok(())
}

fn hsm_status(hsm: &Hsm) -> HsmStatus {
    let token = hsm.token_info();
    HsmStatus {
        token_label: token.label,
        token_serial: token.serial,
        manufacturer: token.manufacturer,
        model: token.model,
        sessions: u32::try_from(hsm.session_count()).unwrap_or(u32::MAX),
    }
}

/// Generates the node's TLS key in memory and has the CA certify it.
async fn issue_node_key(config: &Config, issuance: &Issuance) -> anyhow::Result<rustls::sign::CertifiedKey> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generate node TLS key")?;
    let leaf = issuance
        .issue_internal(
            crate::issuance::PROFILE_NODE_TLS,
            &rcgen::PublicKeyData::subject_public_key_info(&key),
            &config.node_spiffe_id(),
            &config.listen.tls_dns_names,
            &config.listen.tls_ip_addresses,
            config.issuance.node_cert_ttl,
        )
        .await
        .context("issue the node's TLS certificate")?;
    let mut chain = vec![CertificateDer::from(leaf.der)];
    chain.extend(issuance.ca().chain().intermediates_der.iter().cloned().map(CertificateDer::from));
    certified_key(chain, key.serialize_der())
}

/// Re-issues the node's TLS certificate at half its lifetime, retrying every minute on failure.
async fn renew_node_certificate(
    config: Config,
    issuance: Arc<Issuance>,
    resolver: Arc<NodeCertResolver>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut wait = config.issuance.node_cert_ttl / 2;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        match issue_node_key(&config, &issuance).await {
            Ok(key) => {
                resolver.replace(key);
                info!("node TLS certificate renewed");
                wait = config.issuance.node_cert_ttl / 2;
            }
            Err(error) => {
                warn!(error = format!("{error:#}"), "renew node TLS certificate failed; retrying in 60 s");
                wait = Duration::from_secs(60);
            }
        }
    }
}

/// How often the node drops issuance records older than the retention window.
const PURGE_INTERVAL: Duration = Duration::from_secs(3600);

/// Drops issuance records of certificates that expired more than `retention` ago, every hour
/// after the purge that start-up runs. The ledger deletes whole expiry buckets by range, so this
/// never scans records.
async fn purge_expired_records(ledger: Arc<Ledger>, retention: Duration, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(PURGE_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
        purge_once(&ledger, retention).await;
    }
}

async fn purge_once(ledger: &Arc<Ledger>, retention: Duration) {
    let cutoff = time::OffsetDateTime::now_utc() - retention;
    let command = crate::ledger::Command::purge_expired(cutoff.unix_timestamp());
    let task_ledger = Arc::clone(ledger);
    match tokio::task::spawn_blocking(move || task_ledger.apply(&command)).await {
        Ok(Ok(outcome)) => info!(result = ?outcome.result, index = outcome.index, "purged expired issuance records"),
        Ok(Err(error)) => warn!(%error, "purge expired issuance records failed; retrying in an hour"),
        Err(error) => error!(%error, "purge task failed; retrying in an hour"),
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently, yielding finished streams.
fn accept_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    mut shutdown: watch::Receiver<bool>,
) -> ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(256);
    let task = async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        warn!(%error, "accept TCP connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let sender = sender.clone();
            tokio::spawn(async move { handshake(acceptor, stream, peer, sender).await }.in_current_span());
        }
    };
    tokio::spawn(task.in_current_span());
    ReceiverStream::new(receiver)
}

async fn handshake(
    acceptor: TlsAcceptor,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    sender: tokio::sync::mpsc::Sender<std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>,
) {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let _ = sender.send(Ok(tls)).await;
        }
        Ok(Err(error)) => debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => debug!(%peer, "TLS handshake timed out"),
    }
}

async fn wait_for(mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// SIGINT and SIGTERM listeners. Install them before announcing readiness: a signal that
/// arrives before they exist kills the process with the default action.
pub struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Installs the listeners.
    ///
    /// # Errors
    ///
    /// Fails when the runtime cannot register a signal handler.
    pub fn install() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            interrupt: signal(SignalKind::interrupt()).context("install SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("install SIGTERM handler")?,
        })
    }

    /// Waits for SIGINT or SIGTERM.
    pub async fn wait(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => info!("SIGINT received"),
            _ = self.terminate.recv() => info!("SIGTERM received"),
        }
    }
}
