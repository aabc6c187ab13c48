//! Prometheus metrics, and the plain-HTTP listener that serves them with the health probes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use sigil_raft::Role;

/// Issuance, policy and Raft metrics. Label names match the log fields: `profile`, `result`,
/// `decision`.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub issued: IntCounterVec,
    pub issuance_seconds: HistogramVec,
    pub policy_decisions: IntCounterVec,
    pub ca_not_after: GaugeVec,
    pub ready: IntGauge,
    pub raft_role: IntGaugeVec,
    pub raft_term: IntGauge,
    pub raft_commit_index: IntGauge,
    pub raft_applied_index: IntGauge,
    pub raft_entries_proposed: IntCounter,
    pub raft_records_proposed: IntCounter,
    pub raft_proposals_retried: IntCounter,
    pub raft_snapshots: IntCounterVec,
    pub raft_peer_errors: IntCounterVec,
    pub commit_seconds: prometheus::Histogram,
    pub ledger_records: IntGauge,
    /// Counters of the Raft node as last copied into the metrics above.
    last_stats: Arc<Mutex<sigil_raft::Stats>>,
}

impl Metrics {
    /// Registers Sigil's metrics in `registry`.
    ///
    /// # Errors
    ///
    /// Fails when a metric of the same name is already registered.
    pub fn new(registry: Registry) -> Result<Metrics, prometheus::Error> {
        let issued = IntCounterVec::new(
            Opts::new(
                "sigil_issued_total",
                "Issuance requests by profile and result (issued, or the gRPC status code)",
            ),
            &["profile", "result"],
        )?;
        let issuance_seconds = HistogramVec::new(
            HistogramOpts::new(
                "sigil_issuance_duration_seconds",
                "Time from request to answer for issued certificates",
            )
            .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            &["profile"],
        )?;
        let policy_decisions = IntCounterVec::new(
            Opts::new(
                "sigil_policy_decisions_total",
                "Policy decisions: allow, deny, monitor_deny (would deny, issued), rate_limited",
            ),
            &["decision"],
        )?;
        let ca_not_after = GaugeVec::new(
            Opts::new(
                "sigil_ca_not_after_seconds",
                "Expiry of the issuing CA certificate, seconds since the Unix epoch",
            ),
            &["subject"],
        )?;
        let ready = IntGauge::new(
            "sigil_ready",
            "1 when the node serves requests: CA key verified, listeners up and a Raft leader known",
        )?;
        let raft_role = IntGaugeVec::new(
            Opts::new("sigil_raft_role", "1 for the node's current Raft role, 0 for the others"),
            &["role"],
        )?;
        let raft_term = IntGauge::new("sigil_raft_term", "Current Raft term")?;
        let raft_commit_index = IntGauge::new("sigil_raft_commit_index", "Highest Raft log index known committed")?;
        let raft_applied_index =
            IntGauge::new("sigil_raft_applied_index", "Highest Raft log index applied to the ledger")?;
        let raft_entries_proposed =
            IntCounter::new("sigil_raft_entries_proposed_total", "Raft entries of ledger commands this node proposed")?;
        let raft_records_proposed = IntCounter::new(
            "sigil_raft_commands_proposed_total",
            "Ledger commands in the entries this node proposed; divided by the entries, the group-commit batch size",
        )?;
        let raft_proposals_retried = IntCounter::new(
            "sigil_raft_proposals_retried_total",
            "Ledger commands proposed again after a leader change or a lost message",
        )?;
        let raft_snapshots = IntCounterVec::new(
            Opts::new(
                "sigil_raft_snapshots_total",
                "Raft snapshots taken, sent to followers and received from the leader",
            ),
            &["event"],
        )?;
        let raft_peer_errors = IntCounterVec::new(
            Opts::new("sigil_raft_peer_errors_total", "Failed connections and streams to Raft peers, by peer node id"),
            &["peer"],
        )?;
        let commit_seconds = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "sigil_ledger_commit_duration_seconds",
                "Time from proposing an issuance record to its apply on this node after a Raft commit",
            )
            .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
        )?;

        registry.register(Box::new(issued.clone()))?;
        registry.register(Box::new(issuance_seconds.clone()))?;
        registry.register(Box::new(policy_decisions.clone()))?;
        registry.register(Box::new(ca_not_after.clone()))?;
        registry.register(Box::new(ready.clone()))?;
        registry.register(Box::new(raft_role.clone()))?;
        registry.register(Box::new(raft_term.clone()))?;
        registry.register(Box::new(raft_commit_index.clone()))?;
        registry.register(Box::new(raft_applied_index.clone()))?;
        registry.register(Box::new(raft_entries_proposed.clone()))?;
        registry.register(Box::new(raft_records_proposed.clone()))?;
        registry.register(Box::new(raft_proposals_retried.clone()))?;
        registry.register(Box::new(raft_snapshots.clone()))?;
        registry.register(Box::new(raft_peer_errors.clone()))?;
        let ledger_records = IntGauge::new("sigil_ledger_records", "Issuance records stored in this node's ledger")?;
        registry.register(Box::new(commit_seconds.clone()))?;
        registry.register(Box::new(ledger_records.clone()))?;
        Ok(Metrics {
            registry,
            issued,
            issuance_seconds,
            policy_decisions,
            ca_not_after,
            ready,
            raft_role,
            raft_term,
            raft_commit_index,
            raft_applied_index,
            raft_entries_proposed,
            raft_records_proposed,
            raft_proposals_retried,
            raft_snapshots,
            raft_peer_errors,
            commit_seconds,
            ledger_records,
            last_stats: Arc::default(),
        })
    }

    /// Copies a Raft node status into the Raft metrics.
    pub fn observe_raft(&self, status: &sigil_raft::NodeStatus) {
        for role in [Role::Follower, Role::PreCandidate, Role::Candidate, Role::Leader, Role::Learner] {
            self.raft_role.with_label_values(&[role.as_str()]).set(i64::from(status.role == role));
        }
        self.raft_term.set(i64::try_from(status.term).unwrap_or(i64::MAX));
        self.raft_commit_index.set(i64::try_from(status.commit_index).unwrap_or(i64::MAX));
        self.raft_applied_index.set(i64::try_from(status.applied_index).unwrap_or(i64::MAX));

        let mut last = self.last_stats.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let stats = &status.stats;
        self.raft_entries_proposed.inc_by(stats.batches_proposed.saturating_sub(last.batches_proposed));
        self.raft_records_proposed.inc_by(stats.proposals_batched.saturating_sub(last.proposals_batched));
        self.raft_proposals_retried.inc_by(stats.proposals_retried.saturating_sub(last.proposals_retried));
        for (event, now, before) in [
            ("taken", stats.snapshots_taken, last.snapshots_taken),
            ("sent", stats.snapshots_sent, last.snapshots_sent),
            ("received", stats.snapshots_received, last.snapshots_received),
        ] {
            self.raft_snapshots.with_label_values(&[event]).inc_by(now.saturating_sub(before));
        }
        *last = stats.clone();
    }
}

/// Shared state of the health endpoints.
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct HttpState {
    registry: Registry,
    health: Health,
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` completes.
///
/// # Errors
///
/// Returns the server's I/O error.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    registry: Registry,
    health: Health,
    extra: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .with_state(HttpState { registry, health })
        .merge(extra);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Binds the metrics listener.
///
/// # Errors
///
/// Names the address when it cannot be bound.
pub async fn bind(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await.map_err(|e| anyhow::anyhow!("bind metrics listener {address}: {e}"))
}

async fn metrics_handler(State(state): State<HttpState>) -> impl IntoResponse {
    let mut body = Vec::new();
    let families = state.registry.gather();
    match TextEncoder::new().encode(&families, &mut body) {
        Ok(()) => (StatusCode::OK, [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(error) => {
            tracing::error!(%error, "encode metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("encode metrics: {error}\n")).into_response()
        }
    }
}

async fn ready_handler(State(state): State<HttpState>) -> impl IntoResponse {
    if state.health.is_ready() { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
}
