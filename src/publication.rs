//! The issuing CA's certificate and its CRL over plain HTTP, at the URLs that TLS server
//! certificates point to (authority information access and CRL distribution points). They are
//! served on the metrics listener, which is plain HTTP as these URLs must be.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use time::OffsetDateTime;
use tokio::sync::Mutex;

use crate::acme::LedgerStore;
use crate::ca::{Publication, RevokedEntry};
use crate::config::Config;
use crate::issuance::Issuance;

pub const ISSUER_PATH: &str = "/ca/issuer.der";
pub const CRL_PATH: &str = "/ca/crl.der";

/// How long a signed CRL is served before the next request signs a new one.
const CRL_REFRESH: Duration = Duration::from_secs(60);
/// The CRL's nextUpdate, counted from its thisUpdate.
const CRL_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// The URLs of a node's configuration: the configured ones, or the metrics listener's.
pub fn urls(config: &Config) -> Publication {
    let base = format!("http://{}", config.listen.metrics);
    Publication {
        ca_issuers_url: config.acme.ca_issuers_url.clone().unwrap_or_else(|| format!("{base}{ISSUER_PATH}")),
        crl_url: config.acme.crl_url.clone().unwrap_or_else(|| format!("{base}{CRL_PATH}")),
    }
}

struct Publisher {
    issuance: Arc<Issuance>,
    store: LedgerStore,
    signed: Mutex<Option<(Instant, Vec<u8>)>>,
}

/// Routes for the metrics listener.
pub fn router(issuance: Arc<Issuance>) -> Router {
    let store = LedgerStore::new(Arc::clone(issuance.replica()));
    let publisher = Arc::new(Publisher { issuance, store, signed: Mutex::new(None) });
    Router::new().route(ISSUER_PATH, get(issuer)).route(CRL_PATH, get(crl)).with_state(publisher)
}

async fn issuer(State(publisher): State<Arc<Publisher>>) -> Response {
    match publisher.issuance.ca().chain().intermediates_der.first() {
        Some(der) => (StatusCode::OK, [(header::CONTENT_TYPE, "application/pkix-cert")], der.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, "no issuing CA certificate\n").into_response(),
    }
}

async fn crl(State(publisher): State<Arc<Publisher>>) -> Response {
    let mut signed = publisher.signed.lock().await;
    if let Some((at, der)) = signed.as_ref()
        && at.elapsed() < CRL_REFRESH
    {
        return crl_response(der.clone());
    }
    match sign_crl(&publisher).await {
        Ok(der) => {
            *signed = Some((Instant::now(), der.clone()));
            crl_response(der)
        }
        Err(error) => {
            tracing::error!(%error, "signing the CRL failed");
            (StatusCode::SERVICE_UNAVAILABLE, format!("cannot sign the CRL now: {error}\n")).into_response()
        }
    }
}

fn crl_response(der: Vec<u8>) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/pkix-crl")], der).into_response()
}

async fn sign_crl(publisher: &Publisher) -> anyhow::Result<Vec<u8>> {
    let revoked = sigil_acme::certs::revoked(&publisher.store).map_err(|problem| anyhow::anyhow!("{problem}"))?;
    let entries: Vec<RevokedEntry> = revoked
        .into_iter()
        .map(|entry| RevokedEntry {
            serial: entry.serial,
            revoked_at: OffsetDateTime::from_unix_timestamp(entry.revoked_unix).unwrap_or(OffsetDateTime::UNIX_EPOCH),
            reason: entry.reason,
        })
        .collect();
    let ca = publisher.issuance.ca();
    let now = OffsetDateTime::now_utc();
    // The CRL number only has to increase; the signing time in seconds does, on every node.
    let number = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    let der = tokio::task::spawn_blocking(move || ca.sign_crl(&entries, now, now + CRL_VALIDITY, number)).await??;
    Ok(der)
}
