//! Prometheus metrics, and the plain-HTTP listener that serves them with the health probes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Issuance and policy metrics. Label names match the log fields: `profile`, `result`, `decision`.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub issued: IntCounterVec,
    pub issuance_seconds: HistogramVec,
    pub policy_decisions: IntCounterVec,
    pub ca_not_after: GaugeVec,
    pub ledger_batch_records: prometheus::Histogram,
    pub ready: IntGauge,
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
        let ledger_batch_records = prometheus::Histogram::with_opts(
            HistogramOpts::new("sigil_ledger_batch_records", "Issuance records per synced ledger write (group commit)")
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]),
        )?;
        let ready = IntGauge::new("sigil_ready", "1 when the node serves requests: CA key verified and listeners up")?;

        registry.register(Box::new(issued.clone()))?;
        registry.register(Box::new(issuance_seconds.clone()))?;
        registry.register(Box::new(policy_decisions.clone()))?;
        registry.register(Box::new(ca_not_after.clone()))?;
        registry.register(Box::new(ledger_batch_records.clone()))?;
        registry.register(Box::new(ready.clone()))?;
        Ok(Metrics { registry, issued, issuance_seconds, policy_decisions, ca_not_after, ledger_batch_records, ready })
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
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .with_state(HttpState { registry, health });
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
