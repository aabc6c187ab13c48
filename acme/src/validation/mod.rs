//! Challenge validation: http-01 and dns-01 (RFC 8555, sections 8.3 and
//! 8.4), tls-alpn-01 (RFC 8737) and IP identifiers (RFC 8738).
//!
//! A [`Validator`] checks one challenge per [`Validator::validate`] call and
//! returns a [`Problem`] that names the value it found wrong. At most
//! `workers` validations run at once, at most `queue` more wait for a
//! worker, and each running validation is cut off after `timeout`.
//!
//! Every TCP connection goes through the address policy: unless
//! `allow_private_addresses` is set, loopback, private, link-local,
//! unspecified and multicast addresses are refused, so that a client cannot
//! make the server probe its own network.

mod address;
mod connect;
mod dns01;
mod http01;
mod identifier;
mod progress;
mod resolver;
mod tls;
mod tls_alpn01;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::problem::{Problem, ProblemType};
use crate::types::{ChallengeType, Identifier};

use identifier::Target;
use progress::Progress;
use resolver::Resolver;
use tls::TlsConfigs;

/// Destination of the validator's DNS queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolverSetting {
    /// The name servers of the host's resolver configuration
    /// (`/etc/resolv.conf` on Unix).
    System,
    /// One name server at this address, queried over UDP and over TCP when
    /// a UDP answer is truncated (for example pebble-challtestsrv).
    Server(SocketAddr),
    /// No DNS at all: every A and AAAA lookup returns these addresses and
    /// every TXT lookup finds nothing. For development without a DNS server.
    Fixed(Vec<IpAddr>),
}

/// Settings of a [`Validator`].
#[derive(Debug, Clone)]
pub struct ValidationSettings {
    /// TCP port of http-01 requests: 80 in production, 5002 in development.
    pub http01_port: u16,
    /// TCP port of tls-alpn-01 handshakes: 443 in production, 5001 in
    /// development.
    pub tls_alpn01_port: u16,
    /// Source of A, AAAA and TXT records.
    pub resolver: ResolverSetting,
    /// Allows connections to loopback, private (RFC 1918, fc00::/7),
    /// link-local, unspecified and multicast addresses. Only for
    /// development: in production a client could use it to reach hosts
    /// inside the server's network.
    pub allow_private_addresses: bool,
    /// Maximum duration of one validation, from the start of its first DNS
    /// query to its last byte read. Time spent waiting for a worker is not
    /// counted.
    pub timeout: Duration,
    /// Maximum number of validations running at once. Must be at least 1.
    pub workers: usize,
    /// Maximum number of validations waiting for a worker. A validation
    /// that finds the queue full is rejected with `rateLimited`.
    pub queue: usize,
}

/// Validates ACME challenges. Cloning is cheap, and clones share the worker
/// pool and the queue.
#[derive(Clone)]
pub struct Validator {
    inner: Arc<Inner>,
}

struct Inner {
    settings: ValidationSettings,
    resolver: Resolver,
    tls: TlsConfigs,
    workers: Semaphore,
    /// Validations that are running or waiting for a worker.
    admitted: AtomicUsize,
}

/// Shared state that the code of each challenge type reads.
struct Context<'a> {
    settings: &'a ValidationSettings,
    resolver: &'a Resolver,
    tls: &'a TlsConfigs,
    progress: &'a Progress,
}

impl Validator {
    /// Creates a validator, its DNS resolver and its TLS client
    /// configurations. Fails when `workers` or `timeout` is zero or when
    /// the system resolver configuration cannot be read.
    pub fn new(settings: ValidationSettings) -> Result<Validator, String> {
        if settings.workers == 0 {
            return Err("invalid validation settings: workers must be at least 1".to_owned());
        }
        if settings.timeout.is_zero() {
            return Err("invalid validation settings: timeout must be greater than zero".to_owned());
        }

        let resolver = Resolver::new(&settings.resolver)?;
        let tls = TlsConfigs::new()?;
        let workers = Semaphore::new(settings.workers);
        let inner = Inner { settings, resolver, tls, workers, admitted: AtomicUsize::new(0) };
        Ok(Validator { inner: Arc::new(inner) })
    }

    /// Validates one challenge. `key_authorization` is token + "." + account
    /// key thumbprint, computed by the caller.
    ///
    /// Returns `Ok(())` when the client proved control of the identifier.
    /// Otherwise the problem's detail names the value that was wrong. Failed
    /// checks return `unauthorized`, `incorrectResponse`, `connection`, `dns`
    /// or `tls`. A challenge that cannot apply to the identifier returns
    /// `malformed`, `rejectedIdentifier` or `unsupportedIdentifier`, and a
    /// full queue returns `rateLimited`. Every outcome is logged without the
    /// key authorization.
    pub async fn validate(
        &self,
        kind: ChallengeType,
        identifier: &Identifier,
        token: &str,
        key_authorization: &str,
    ) -> Result<(), Problem> {
        let started = Instant::now();
        let result = self.admit_and_validate(kind, identifier, token, key_authorization).await;
        log_outcome(kind, identifier, key_authorization, started.elapsed(), &result);
        result
    }

    async fn admit_and_validate(
        &self,
        kind: ChallengeType,
        identifier: &Identifier,
        token: &str,
        key_authorization: &str,
    ) -> Result<(), Problem> {
        let target = Target::parse(identifier, kind)?;
        check_token(token, key_authorization)?;

        let _admission = self.admit()?;
        let _permit = self
            .inner
            .workers
            .acquire()
            .await
            .map_err(|_| Problem::internal("the validation worker pool is closed"))?;

        let progress = Progress::new();
        let context = Context {
            settings: &self.inner.settings,
            resolver: &self.inner.resolver,
            tls: &self.inner.tls,
            progress: &progress,
        };
        let timeout = self.inner.settings.timeout;
        let checks = async {
            match kind {
                ChallengeType::Http01 => http01::validate(&context, &target, token, key_authorization).await,
                ChallengeType::Dns01 => dns01::validate(&context, &target, key_authorization).await,
                ChallengeType::TlsAlpn01 => tls_alpn01::validate(&context, &target, key_authorization).await,
            }
        };
        match tokio::time::timeout(timeout, checks).await {
            Ok(result) => result,
            Err(_) => Err(progress.timed_out(timeout)),
        }
    }

    /// Counts one more validation as running or queued, or rejects it when
    /// `workers + queue` validations are already admitted.
    fn admit(&self) -> Result<Admission<'_>, Problem> {
        let settings = &self.inner.settings;
        let limit = settings.workers.saturating_add(settings.queue);
        let admitted = &self.inner.admitted;
        if admitted.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).is_err() {
            let mut problem = Problem::new(
                ProblemType::RateLimited,
                format!(
                    "challenge validation rejected because every worker is busy (workers = {}) and the queue is \
                     full (queue = {}); retry later",
                    settings.workers, settings.queue
                ),
            );
            // An estimate: every running validation ends within one timeout,
            // but queued validations may take the freed workers first.
            problem.retry_after = Some(settings.timeout.as_secs().max(1));
            return Err(problem);
        }
        Ok(Admission { admitted })
    }
}

impl std::fmt::Debug for Validator {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Validator")
            .field("settings", &self.inner.settings)
            .field("admitted", &self.inner.admitted.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// One admitted validation; dropping it frees its place, also when the
/// caller drops the validation future.
struct Admission<'a> {
    admitted: &'a AtomicUsize,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Checks that the token can be placed in a URL path unescaped (RFC 8555,
/// section 8.3: base64url characters only) and that the key authorization
/// belongs to it.
fn check_token(token: &str, key_authorization: &str) -> Result<(), Problem> {
    let is_base64url = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if token.is_empty() || !token.chars().all(is_base64url) {
        return Err(Problem::malformed(format!(
            "invalid challenge token {token:?}: a token must be a non-empty base64url string"
        )));
    }
    let belongs = key_authorization.strip_prefix(token).and_then(|rest| rest.strip_prefix('.'));
    if belongs.is_none_or(str::is_empty) {
        return Err(Problem::internal(format!(
            "the key authorization of challenge token {token} is not the token, a dot and a thumbprint"
        )));
    }
    Ok(())
}

/// Logs one validation outcome. Problem details may quote the key
/// authorization (the expected http-01 body), so it is replaced first.
fn log_outcome(
    kind: ChallengeType,
    identifier: &Identifier,
    key_authorization: &str,
    elapsed: Duration,
    result: &Result<(), Problem>,
) {
    let elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    let challenge = kind.as_str();
    let identifier_type = identifier.kind.as_str();
    let identifier = identifier.value.as_str();
    let problem = match result {
        Ok(()) => {
            tracing::info!(challenge, identifier_type, identifier, elapsed_ms, "challenge validation succeeded");
            return;
        }
        Err(problem) => problem,
    };

    let detail = if key_authorization.is_empty() {
        problem.detail.clone()
    } else {
        problem.detail.replace(key_authorization, "<key authorization>")
    };
    let problem_type = problem.kind.as_str();
    if problem.is(ProblemType::ServerInternal) {
        tracing::error!(
            challenge,
            identifier_type,
            identifier,
            elapsed_ms,
            problem_type,
            detail,
            "challenge validation failed"
        );
    } else if problem.is(ProblemType::RateLimited) {
        tracing::warn!(
            challenge,
            identifier_type,
            identifier,
            elapsed_ms,
            problem_type,
            detail,
            "challenge validation rejected"
        );
    } else {
        tracing::info!(
            challenge,
            identifier_type,
            identifier,
            elapsed_ms,
            problem_type,
            detail,
            "challenge validation failed"
        );
    }
}
