//! `sigil serve`: opens the ledger and the HSM, proves the CA key, and serves gRPC and metrics
//! until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rustls_pki_types::CertificateDer;
use sigil_hsm::{Hsm, HsmMetrics};
use sigil_raft::{GrpcTransport, PeerService};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{Instrument as _, debug, error, info, info_span, warn};

use crate::audit::AuditLog;
use crate::authority::AuthorityService;
use crate::ca::IssuingCa;
use crate::config::Config;
use crate::grpc::{AdminService, IssuerService, NodeInfo};
use crate::issuance::{Issuance, IssuanceSettings};
use crate::istio::IstioService;
use crate::istio_proto::istio_certificate_service_server::IstioCertificateServiceServer;
use crate::ledger::Ledger;
use crate::metrics::{Health, Metrics};
use crate::peer_tls::NodePeerTls;
use crate::policy::Policy;
use crate::proto::HsmStatus;
use crate::proto::admin_server::AdminServer;
use crate::proto::authority_server::AuthorityServer;
use crate::proto::issuer_server::IssuerServer;
use crate::replica::{Replica, ReplicaSettings};
use crate::tls::{ClientTrust, NodeCertResolver, certified_key, server_config};

/// TLS handshakes that take longer than this are dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens the HSM named in `config` with its PIN, registering HSM metrics in `registry`.
///
/// # Errors
///
/// Fails when the PIN source, the module, the token or the login fails.
pub fn open_hsm(config: &Config, registry: Option<&prometheus::Registry>) -> anyhow::Result<Hsm> {
    let metrics = match registry {
        Some(registry) => HsmMetrics::new(registry).context("register HSM metrics")?,
        None => HsmMetrics::unregistered(),
    };
    let mut attempt = 1;
    loop {
        let pin = config.hsm_pin().context("read HSM PIN")?;
        match Hsm::open(&config.hsm_config(), pin, metrics.clone()) {
            Ok(hsm) => return Ok(hsm),
            // SoftHSM reports CKR_GENERAL_ERROR when another process writes the token folder
            // while this one reads it, as when several nodes on one machine start together.
            Err(error) if attempt < HSM_OPEN_ATTEMPTS && error.ckr_code() == Some("CKR_GENERAL_ERROR") => {
                warn!(attempt, %error, "open HSM failed; retrying");
                std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
                attempt += 1;
            }
            Err(error) => return Err(error).context("open HSM"),
        }
    }
}

/// Attempts to open the HSM when it reports a general error.
const HSM_OPEN_ATTEMPTS: u32 = 5;

/// Loads the active CA from the ledger and proves that the HSM contains its key.
///
/// # Errors
///
/// Fails when no CA is installed, the key is missing, or it does not match the certificate.
pub fn load_ca(config: &Config, ledger: &Ledger, hsm: &Hsm) -> anyhow::Result<(u64, IssuingCa)> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    // With no version able to sign, loading the installed one reports why: expired, or a key
    // that does not match.
    let version = match crate::rotation::signing_version(ledger, now)? {
        Some(version) => version,
        None => ledger.active_ca()?.ok_or(crate::ca::CaError::NotInstalled)?,
    };
    let ca = crate::rotation::load_version(config, hsm, &version)
        .context("refusing to start: the CA in the ledger is unusable")?;
    Ok((version.version, ca))
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
    info!(trust_domain = %config.trust_domain, grpc = %config.listen.grpc, raft = %config.listen.raft, metrics = %config.listen.metrics, "node starting");

    let registry = prometheus::Registry::new();
    let metrics = Metrics::new(registry.clone()).context("register metrics")?;
    let health = Health::default();
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let hsm = open_hsm(&config, Some(&registry))?;
    let identity = crate::node_tls::load(&config.node_tls_path()).context("load the node's TLS identity")?;
    let peer_tls = Arc::new(NodePeerTls::new(&config.trust_domain));
    let (replica, transport) = open_replica(&config, &peer_tls, &metrics)?;
    let replica = Arc::new(replica);

    let raft_listener = TcpListener::bind(config.listen.raft)
        .await
        .with_context(|| format!("bind Raft listener {}", config.listen.raft))?;
    if let Some(source) = config.listen.raft_source {
        // Every connection to a peer binds to this address, so an address this host does not have
        // stops the node here instead of failing each connection later.
        std::net::TcpListener::bind((source, 0))
            .with_context(|| format!("bind to listen.raft_source {source}, which must be an address of this host"))?;
    }
    let mut raft_listener = Some(raft_listener);
    let mut raft_server = None;
    let mut resolver = None;
    let mut client_trust = None;
    if let Some(identity) = &identity {
        let node_resolver = Arc::new(NodeCertResolver::new(identity.key.clone()));
        peer_tls.set_identity(&identity.roots_der, Arc::clone(&node_resolver))?;
        let trust = ClientTrust::new(&identity.roots_der)?;
        raft_server = Some(serve_raft(
            raft_listener.take(),
            &trust,
            &node_resolver,
            &replica,
            &peer_tls,
            &transport,
            &shutdown_rx,
        )?);
        resolver = Some(node_resolver);
        client_trust = Some(trust);
    }

    let committed = replica.status().commit_index;
    replica.wait_for_applied(committed, Duration::from_secs(30)).await;
    tokio::select! {
        waited = replica.wait_for_ca() => waited?,
        () = signals.wait() => {
            info!("stopped while waiting for the CA");
            let _ = shutdown_tx.send(true);
            return Ok(());
        }
    }

    let (ca_version, ca) = load_ca(&config, replica.ledger(), &hsm)?;
    let ca = Arc::new(ca);
    let trusted_roots = crate::rotation::trusted_roots(replica.ledger())?;
    let client_trust = match client_trust {
        Some(trust) => {
            trust.replace(&trusted_roots)?;
            trust
        }
        None => ClientTrust::new(&trusted_roots)?,
    };
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
        Arc::clone(&replica),
        Arc::clone(&audit),
        metrics.clone(),
        settings,
    ));
    issuance.replace_ca(ca_version, Arc::clone(&ca));

    let resolver = match resolver {
        Some(resolver) => resolver,
        None => {
            if !replica.wait_for_leader(Duration::from_secs(60)).await {
                anyhow::bail!(
                    "no Raft leader within 60 s, so the node cannot record its first TLS certificate; a node \
                     that joins a cluster needs its certificate in {} before it starts",
                    config.node_tls_path().display()
                );
            }
            let resolver = Arc::new(NodeCertResolver::new(issue_node_key(&config, &issuance).await?));
            peer_tls.set_identity(&trusted_roots, Arc::clone(&resolver))?;
            raft_server = Some(serve_raft(
                raft_listener.take(),
                &client_trust,
                &resolver,
                &replica,
                &peer_tls,
                &transport,
                &shutdown_rx,
            )?);
            resolver
        }
    };
    let tls = server_config(&client_trust, Arc::clone(&resolver))?;
    let grpc_listener = TcpListener::bind(config.listen.grpc)
        .await
        .with_context(|| format!("bind gRPC listener {}", config.listen.grpc))?;
    let metrics_listener = crate::metrics::bind(config.listen.metrics).await?;

    let purge = tokio::spawn(
        purge_expired_records(Arc::clone(&replica), config.issuance.retention, shutdown_rx.clone()).in_current_span(),
    );
    let acme = crate::acme::serve(
        &config,
        Arc::clone(&replica),
        Arc::clone(&issuance),
        Arc::clone(&resolver),
        shutdown_rx.clone(),
    )
    .await?;
    let renewal = tokio::spawn(
        renew_node_certificate(
            config.clone(),
            Arc::clone(&issuance),
            Arc::clone(&resolver),
            identity.map(|i| (i.not_before, i.not_after)),
            shutdown_rx.clone(),
        )
        .in_current_span(),
    );
    let http = tokio::spawn(
        crate::metrics::serve_http(
            metrics_listener,
            registry,
            health.clone(),
            crate::publication::router(Arc::clone(&issuance)),
            wait_for(shutdown_rx.clone()),
        )
        .in_current_span(),
    );
    let keep_trust = tokio::spawn(
        crate::rotation::keep_trust(
            Arc::clone(replica.ledger()),
            Arc::clone(&client_trust),
            Arc::clone(&peer_tls),
            Arc::clone(&resolver),
            shutdown_rx.clone(),
        )
        .in_current_span(),
    );
    let keep_signing_ca = tokio::spawn(
        crate::rotation::keep_signing_ca(
            Arc::new(config.clone()),
            hsm.clone(),
            Arc::clone(&issuance),
            shutdown_rx.clone(),
        )
        .in_current_span(),
    );
    let watch_health = tokio::spawn(
        report_raft_state(Arc::clone(&replica), health.clone(), metrics.clone(), shutdown_rx.clone()).in_current_span(),
    );

    let node = NodeInfo { grpc_address: config.listen.grpc.to_string(), started, hsm: hsm_status(&hsm) };
    let incoming = accept_tls(grpc_listener, TlsAcceptor::from(Arc::new(tls)), shutdown_rx.clone());
    let grpc = tonic::transport::Server::builder()
        .add_service(IssuerServer::new(IssuerService::new(Arc::clone(&issuance))))
        .add_service(AdminServer::new(
            AdminService::new(Arc::clone(&issuance), node, health.clone(), config.issuance.node_cert_ttl)
                .with_rotation(Arc::new(config.clone()), hsm.clone()),
        ))
        .add_service(AuthorityServer::new(AuthorityService::new(
            Arc::clone(&issuance),
            config.downstream.clone(),
            shutdown_rx.clone(),
        )))
        .add_service(IstioCertificateServiceServer::new(IstioService::new(Arc::clone(&issuance))))
        .serve_with_incoming_shutdown(incoming, wait_for(shutdown_rx.clone()));
    let grpc = tokio::spawn(grpc.in_current_span());

    info!(elapsed_ms = started.elapsed().as_millis() as u64, "node serving");

    signals.wait().await;
    info!("node stopping");
    health.set_ready(false);
    metrics.ready.set(0);
    let _ = shutdown_tx.send(true);

    // Peers and clients keep long-lived streams open, so graceful shutdown is bounded.
    finish_server("gRPC server", grpc).await;
    if let Some(raft_server) = raft_server {
        finish_server("Raft listener", raft_server).await;
    }
    if let Err(error) = http.await.context("metrics task")? {
        error!(%error, "metrics server stopped with an error");
    }
    if let Some(acme) = acme {
        acme.abort();
    }
    renewal.abort();
    purge.abort();
    watch_health.abort();
    keep_trust.abort();
    keep_signing_ca.abort();
    if let Err(error) = audit.flush() {
        error!(%error, "flush audit log failed");
    }
    drop(issuance);
    // The last reference to the replica stops the Raft node and syncs the ledger.
    drop(replica);
    info!("node stopped");
    Ok(())
}

/// Maximum wait for a server's connections to close at shutdown.
const SERVER_DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Waits for a server task to finish after shutdown was signalled, at most
/// [`SERVER_DRAIN_TIMEOUT`], then aborts it.
async fn finish_server(name: &str, mut task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) {
    match tokio::time::timeout(SERVER_DRAIN_TIMEOUT, &mut task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => error!(server = name, %error, "server stopped with an error"),
        Ok(Err(error)) => error!(server = name, %error, "server task failed"),
        Err(_) => {
            warn!(server = name, "connections still open after {SERVER_DRAIN_TIMEOUT:?}; closing them");
            task.abort();
        }
    }
}

/// Opens the node's replicated ledger with the gRPC peer transport.
fn open_replica(
    config: &Config,
    peer_tls: &Arc<NodePeerTls>,
    metrics: &Metrics,
) -> anyhow::Result<(Replica, Arc<GrpcTransport>)> {
    let peer_errors = metrics.raft_peer_errors.clone();
    let on_peer_error: Arc<dyn Fn(u64) + Send + Sync> =
        Arc::new(move |peer: u64| peer_errors.with_label_values(&[&peer.to_string()]).inc());
    let tls: Arc<dyn sigil_raft::PeerTls> = Arc::clone(peer_tls) as Arc<dyn sigil_raft::PeerTls>;
    let runtime = tokio::runtime::Handle::current();
    let (replica, transport) = Replica::open_with(&ReplicaSettings::from_config(config), false, |snapshots| {
        GrpcTransport::new(
            config.node_id,
            config.raft_address(),
            config.listen.raft_source,
            tls,
            snapshots,
            runtime,
            on_peer_error,
        )
    })?;
    transport.attach(replica.handle().clone());
    Ok((replica, transport))
}

/// Serves `sigil.raft.v1.RaftPeer` on the Raft listener.
fn serve_raft(
    listener: Option<TcpListener>,
    trust: &Arc<ClientTrust>,
    resolver: &Arc<NodeCertResolver>,
    replica: &Arc<Replica>,
    peer_tls: &Arc<NodePeerTls>,
    transport: &Arc<GrpcTransport>,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>> {
    let listener = listener.context("the Raft listener was already started")?;
    let tls = server_config(trust, Arc::clone(resolver))?;
    let incoming = accept_tls(listener, TlsAcceptor::from(Arc::new(tls)), shutdown.clone());
    let service = PeerService::new(
        replica.handle().clone(),
        Arc::clone(peer_tls) as Arc<dyn sigil_raft::PeerTls>,
        Arc::clone(transport),
    );
    let server = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, wait_for(shutdown.clone()));
    Ok(tokio::spawn(server.in_current_span()))
}

/// Keeps readiness and the Raft metrics in step with the Raft node, every 200 ms.
async fn report_raft_state(
    replica: Arc<Replica>,
    health: Health,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut was_ready = None;
    loop {
        let status = replica.status();
        let ready = status.is_ready();
        health.set_ready(ready);
        metrics.ready.set(i64::from(ready));
        metrics.observe_raft(&status);
        metrics.ledger_records.set(i64::try_from(replica.ledger().issuance_count()).unwrap_or(i64::MAX));
        if was_ready != Some(ready) {
            info!(ready, role = status.role.as_str(), leader = ?status.leader, term = status.term, "node readiness changed");
            was_ready = Some(ready);
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = shutdown.changed() => return,
        }
    }
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
    let issued = issuance
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
    let mut chain_der = vec![issued.leaf.der];
    chain_der.extend(issued.intermediates_der);
    crate::node_tls::save(&config.node_tls_path(), &chain_der, &key.serialize_pem(), &issued.roots_der)
        .context("save the node's TLS identity")?;
    let chain = chain_der.into_iter().map(CertificateDer::from).collect();
    certified_key(chain, key.serialize_der())
}

/// Re-issues the node's TLS certificate at half its lifetime and saves it for the next start,
/// retrying every minute on failure (for example while the cluster has no quorum).
async fn renew_node_certificate(
    config: Config,
    issuance: Arc<Issuance>,
    resolver: Arc<NodeCertResolver>,
    loaded_validity: Option<(i64, i64)>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut wait = match loaded_validity {
        Some((not_before, not_after)) => {
            let half_life = not_before + (not_after - not_before) / 2;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            Duration::from_secs(u64::try_from(half_life - now).unwrap_or(0))
        }
        None => config.issuance.node_cert_ttl / 2,
    };
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
async fn purge_expired_records(replica: Arc<Replica>, retention: Duration, mut shutdown: watch::Receiver<bool>) {
    // The first purge waits until the node has had time to learn the leader.
    let mut wait = Duration::from_secs(5);
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        purge_once(&replica, retention).await;
        wait = PURGE_INTERVAL;
    }
}

/// Proposes a purge of expired records when this node is the leader; one node purging is enough,
/// and a purge proposed twice removes nothing more.
async fn purge_once(replica: &Replica, retention: Duration) {
    if replica.status().role != sigil_raft::Role::Leader {
        debug!("not the leader; the leader purges expired issuance records");
        return;
    }
    let cutoff = time::OffsetDateTime::now_utc() - retention;
    let command = crate::ledger::Command::purge_expired(cutoff.unix_timestamp());
    let request_id = crate::replica::request_id_for(b"purge", &cutoff.unix_timestamp().to_be_bytes());
    match replica.write(request_id, &command).await {
        Ok(result) => info!(?result, "purged expired issuance records"),
        Err(error) => warn!(%error, "purge expired issuance records failed; retrying in an hour"),
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
