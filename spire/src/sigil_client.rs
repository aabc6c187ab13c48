//! The gRPC client of Sigil's Authority service: one mTLS channel per configured endpoint, unary
//! calls that move to the next endpoint when one is unreachable, and a bundle watch that
//! reconnects on its own.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::Rng as _;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};
use tracing::{debug, error, info, warn};

use crate::credentials::Credentials;
use crate::proto::sigil::v1::authority_client::AuthorityClient;
use crate::proto::sigil::v1::{
    Bundle, GetBundleRequest, JwtAuthority, MintX509CaRequest, MintX509CaResponse, PublishJwtAuthorityRequest,
};

/// go-plugin's host and Sigil both allow messages up to the int32 maximum.
pub const MAX_MESSAGE_SIZE: usize = i32::MAX as usize;

/// Time to open a TCP and TLS connection to one node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Interval of HTTP/2 pings, and the time a ping may go unanswered before the connection counts
/// as dead. They let a watch notice a node that vanished without closing its connections.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to open a bundle watch, up to the response headers.
const WATCH_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Retry settings of a unary call across endpoints.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per configured endpoint. The call makes at least `min_attempts` in total.
    pub attempts_per_endpoint: usize,
    pub min_attempts: usize,
    /// Deadline of one attempt, also sent to Sigil as the gRPC timeout.
    pub attempt_timeout: Duration,
    /// Time budget of the whole call, back-offs included.
    pub total: Duration,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    fn attempts(&self, endpoints: usize) -> usize {
        (self.attempts_per_endpoint * endpoints).max(self.min_attempts)
    }
}

/// Minting signs in an HSM and commits a Raft entry, so one attempt may take seconds.
pub const MINT_POLICY: RetryPolicy = RetryPolicy {
    attempts_per_endpoint: 2,
    min_attempts: 3,
    attempt_timeout: Duration::from_secs(15),
    total: Duration::from_secs(60),
    first_backoff: Duration::from_millis(200),
    max_backoff: Duration::from_secs(2),
};

/// SPIRE gives up on PublishJWTKeyAndSubscribe when the first response takes more than 5 seconds,
/// so every attempt and back-off fits in 4.5 seconds.
pub const PUBLISH_POLICY: RetryPolicy = RetryPolicy {
    attempts_per_endpoint: 2,
    min_attempts: 3,
    attempt_timeout: Duration::from_secs(2),
    total: Duration::from_millis(4500),
    first_backoff: Duration::from_millis(100),
    max_backoff: Duration::from_millis(500),
};

/// Back-off between reconnects of a bundle watch.
const WATCH_FIRST_BACKOFF: Duration = Duration::from_millis(200);
const WATCH_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Wait before retrying a watch that Sigil rejected, such as with PERMISSION_DENIED. The watch
/// keeps trying, so a fixed policy heals it without a SPIRE restart.
const WATCH_REJECTED_BACKOFF: Duration = Duration::from_secs(30);

/// Exponential back-off with jitter: each delay is drawn from the upper half of the current step.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { first, max, step: first }
    }

    /// Returns the next delay and doubles the step, up to the maximum.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.step.mul_f64(rand::rng().random_range(0.5..=1.0));
        self.step = (self.step * 2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.step = self.first;
    }
}

/// Returns whether another attempt, possibly at another endpoint, may succeed: the node was
/// unreachable, timed out or stopping. Sigil's own rejections are final, and so is its rate
/// limit (RESOURCE_EXHAUSTED), because retrying at another node would work around it.
pub fn is_transient(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled => true,
        // tonic reports a broken connection as UNKNOWN with the transport error as its source.
        Code::Unknown => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

/// Builds a status with Sigil's code and message, prefixed with the call and the node.
pub fn upstream_error(operation: &str, address: &str, status: &Status) -> Status {
    Status::new(status.code(), format!("{operation} at Sigil node {address} failed: {}", status.message()))
}

struct Node {
    address: String,
    channel: Channel,
}

/// A client of every configured Sigil endpoint.
pub struct SigilClient {
    trust_domain: String,
    nodes: Vec<Node>,
    credentials: Credentials,
    /// Roots from Sigil's bundle that the channels trust besides the `bundle_path` file.
    bundle_roots: Vec<Vec<u8>>,
    /// Index of the endpoint that responded last, where the next call starts.
    preferred: AtomicUsize,
}

impl SigilClient {
    /// Creates lazy channels to `endpoints`. Nothing connects until the first call.
    ///
    /// # Errors
    ///
    /// Returns a message naming the endpoint whose URI or TLS settings tonic rejects.
    pub fn new(trust_domain: &str, endpoints: &[String], credentials: &Credentials) -> Result<SigilClient, String> {
        let mut nodes = Vec::with_capacity(endpoints.len());
        for address in endpoints {
            let channel = Endpoint::from_shared(format!("https://{address}"))
                .map_err(|error| format!("endpoints: {address:?} is not a valid address: {error}"))?
                .tls_config(credentials.tls.clone())
                .map_err(|error| format!("endpoints: TLS settings for {address:?} are invalid: {error}"))?
                .connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .tcp_nodelay(true)
                .connect_lazy();
            nodes.push(Node { address: address.clone(), channel });
        }
        if nodes.is_empty() {
            return Err("endpoints is empty; list at least one Sigil host:port".to_owned());
        }
        Ok(SigilClient {
            trust_domain: trust_domain.to_owned(),
            nodes,
            credentials: credentials.clone(),
            bundle_roots: Vec::new(),
            preferred: AtomicUsize::new(0),
        })
    }

    /// Returns a client whose channels also trust `roots_der`, or None when this one already
    /// trusts exactly those.
    fn trusting(&self, roots_der: Vec<Vec<u8>>) -> Option<Result<SigilClient, String>> {
        if roots_der == self.bundle_roots {
            return None;
        }
        let endpoints: Vec<String> = self.nodes.iter().map(|node| node.address.clone()).collect();
        Some(SigilClient::new(&self.trust_domain, &endpoints, &self.credentials.with_roots(&roots_der)).map(
            |mut client| {
                client.bundle_roots = roots_der;
                client
            },
        ))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn endpoints(&self) -> Vec<&str> {
        self.nodes.iter().map(|node| node.address.as_str()).collect()
    }

    fn client(&self, index: usize) -> AuthorityClient<Channel> {
        AuthorityClient::new(self.nodes[index].channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }

    /// Asks Sigil to sign a CA certificate for the CSR's key.
    ///
    /// # Errors
    ///
    /// Returns Sigil's status when it rejects the request, or UNAVAILABLE or DEADLINE_EXCEEDED
    /// when no endpoint responded within the retry policy.
    pub async fn mint_x509_ca(&self, csr: Vec<u8>, preferred_ttl_seconds: i64) -> Result<MintX509CaResponse, Status> {
        let request = MintX509CaRequest { csr, preferred_ttl_seconds, trust_domain: self.trust_domain.clone() };
        self.call("mint X.509 CA", &MINT_POLICY, |mut client, timeout| {
            let mut request = tonic::Request::new(request.clone());
            request.set_timeout(timeout);
            async move { client.mint_x509_ca(request).await }
        })
        .await
    }

    /// Adds a JWT authority to the trust domain and returns the whole set.
    ///
    /// # Errors
    ///
    /// As `mint_x509_ca`, within the shorter publish policy.
    pub async fn publish_jwt_authority(&self, authority: JwtAuthority) -> Result<Vec<JwtAuthority>, Status> {
        let request =
            PublishJwtAuthorityRequest { trust_domain: self.trust_domain.clone(), authority: Some(authority) };
        let response = self
            .call("publish JWT authority", &PUBLISH_POLICY, |mut client, timeout| {
                let mut request = tonic::Request::new(request.clone());
                request.set_timeout(timeout);
                async move { client.publish_jwt_authority(request).await }
            })
            .await?;
        Ok(response.authorities)
    }

    /// Makes one unary call, moving to the next endpoint after each transient failure.
    async fn call<T, F, Fut>(&self, operation: &str, policy: &RetryPolicy, mut call: F) -> Result<T, Status>
    where
        F: FnMut(AuthorityClient<Channel>, Duration) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + policy.total;
        let attempts = policy.attempts(self.nodes.len());
        let first = self.preferred.load(Ordering::Relaxed);
        let mut backoff = Backoff::new(policy.first_backoff, policy.max_backoff);
        let mut last_failure: Option<(usize, Status)> = None;

        for attempt in 0..attempts {
            let index = (first + attempt) % self.nodes.len();
            let address = self.nodes[index].address.as_str();
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let timeout = policy.attempt_timeout.min(remaining);
            let status = match tokio::time::timeout(timeout, call(self.client(index), timeout)).await {
                Ok(Ok(response)) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    debug!(endpoint = address, attempt = attempt + 1, "{operation} succeeded");
                    return Ok(response.into_inner());
                }
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded(format!("no response within {} ms", timeout.as_millis())),
            };
            if !is_transient(&status) {
                let error = status.message();
                warn!(endpoint = address, code = ?status.code(), error, "Sigil rejected {operation}");
                return Err(upstream_error(operation, address, &status));
            }
            warn!(
                endpoint = address,
                attempt = attempt + 1,
                attempts,
                code = ?status.code(),
                error = status.message(),
                "{operation} failed; trying the next endpoint"
            );
            last_failure = Some((index, status));
            let pause = backoff.next_delay().min(deadline.saturating_duration_since(Instant::now()));
            if attempt + 1 < attempts {
                tokio::time::sleep(pause).await;
            }
        }
        Err(self.exhausted(operation, policy, deadline, last_failure))
    }

    fn exhausted(
        &self,
        operation: &str,
        policy: &RetryPolicy,
        deadline: Instant,
        last_failure: Option<(usize, Status)>,
    ) -> Status {
        let last = match &last_failure {
            Some((index, status)) => {
                format!("; last error from {}: {:?}: {}", self.nodes[*index].address, status.code(), status.message())
            }
            None => String::new(),
        };
        let endpoints = self.endpoints().join(", ");
        if Instant::now() >= deadline {
            Status::deadline_exceeded(format!(
                "{operation}: no Sigil endpoint ({endpoints}) answered within {} ms{last}",
                policy.total.as_millis()
            ))
        } else {
            Status::unavailable(format!("{operation}: no Sigil endpoint ({endpoints}) answered{last}"))
        }
    }

    /// Opens WatchBundle at endpoint `index`.
    async fn open_watch(&self, index: usize) -> Result<Streaming<Bundle>, Status> {
        let request = GetBundleRequest { trust_domain: self.trust_domain.clone() };
        let mut client = self.client(index);
        match tokio::time::timeout(WATCH_OPEN_TIMEOUT, client.watch_bundle(request)).await {
            Ok(result) => result.map(tonic::Response::into_inner),
            Err(_) => {
                Err(Status::deadline_exceeded(format!("watch not opened within {} ms", WATCH_OPEN_TIMEOUT.as_millis())))
            }
        }
    }
}

/// The client of the current configuration. SPIRE may configure the plugin again while streams
/// run, and a stream picks up the new client when it next reconnects.
#[derive(Clone, Default)]
pub struct ClientSlot(Arc<RwLock<Option<Arc<SigilClient>>>>);

impl ClientSlot {
    pub fn get(&self) -> Option<Arc<SigilClient>> {
        self.0.read().map(|client| client.clone()).unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    pub fn set(&self, client: Arc<SigilClient>) {
        match self.0.write() {
            Ok(mut slot) => *slot = Some(client),
            Err(poisoned) => *poisoned.into_inner() = Some(client),
        }
    }
}

/// Returns the status of a call made before SPIRE configured the plugin.
pub fn not_configured() -> Status {
    Status::failed_precondition("plugin not configured")
}

/// A WatchBundle stream that survives node failures: when the stream breaks it reconnects, to
/// the next endpoint, after a back-off.
///
/// A watch that Sigil rejects, such as with PERMISSION_DENIED, is retried too, after a longer
/// back-off, and each rejection is logged at error level. Returning the error instead would fail
/// SPIRE's SubscribeToLocalBundle call, which stops SPIRE's CA rotator until the server restarts.
/// A retried watch recovers once Sigil's policy is fixed.
pub struct BundleWatch {
    slot: ClientSlot,
    /// The client of the last connection, used if the slot is ever empty.
    client: Arc<SigilClient>,
    open: Option<Streaming<Bundle>>,
    /// Endpoint of the open stream, or the one to connect to next.
    index: usize,
    backoff: Backoff,
    retry_at: Option<Instant>,
    /// Highest bundle version returned so far.
    newest_version: Option<u64>,
}

impl BundleWatch {
    /// Prepares a watch with the current configuration, or returns None when the plugin is not
    /// configured. Nothing connects until the first `next`.
    pub fn new(slot: ClientSlot) -> Option<BundleWatch> {
        let client = slot.get()?;
        let index = client.preferred.load(Ordering::Relaxed);
        Some(BundleWatch {
            slot,
            client,
            open: None,
            index,
            backoff: Backoff::new(WATCH_FIRST_BACKOFF, WATCH_MAX_BACKOFF),
            retry_at: None,
            newest_version: None,
        })
    }

    /// Waits for the next bundle of the trust domain, reconnecting as often as needed. Only
    /// dropping the future stops it.
    ///
    /// A bundle older than one already returned is skipped. A node that lags behind the Raft
    /// leader can send one after a reconnect, and it could bring back a root that a newer
    /// version removed.
    pub async fn next(&mut self) -> Bundle {
        loop {
            let Some(stream) = self.open.as_mut() else {
                self.connect().await;
                continue;
            };
            let failure = match stream.message().await {
                Ok(Some(bundle))
                    if !bundle.trust_domain.is_empty() && bundle.trust_domain != self.client.trust_domain =>
                {
                    error!(
                        endpoint = self.address(),
                        trust_domain = bundle.trust_domain,
                        "Sigil sent the bundle of another trust domain; ignoring it"
                    );
                    continue;
                }
                Ok(Some(bundle)) if is_older(bundle.version, self.newest_version) => {
                    debug!(
                        endpoint = self.address(),
                        version = bundle.version,
                        newest_version = self.newest_version,
                        "skipping an older bundle version from a lagging node"
                    );
                    continue;
                }
                Ok(Some(bundle)) => {
                    self.backoff.reset();
                    self.newest_version = Some(bundle.version);
                    self.trust_bundle_roots(&bundle);
                    return bundle;
                }
                Ok(None) => Status::unavailable("Sigil ended the bundle watch"),
                Err(status) => status,
            };
            self.open = None;
            self.fail(&failure);
        }
    }

    fn address(&self) -> &str {
        &self.client.nodes[self.index].address
    }

    /// Makes later connections trust the bundle's roots too, so that they still verify Sigil's
    /// nodes after those renew their TLS certificates under a rotated root.
    fn trust_bundle_roots(&self, bundle: &Bundle) {
        let roots: Vec<Vec<u8>> = bundle.x509_authorities.iter().map(|root| root.certificate.clone()).collect();
        let current = self.slot.get().unwrap_or_else(|| Arc::clone(&self.client));
        match current.trusting(roots) {
            None => {}
            Some(Ok(client)) => {
                info!(roots = client.bundle_roots.len(), "trusting the roots of Sigil's bundle for new connections");
                self.slot.set(Arc::new(client));
            }
            Some(Err(error)) => error!(%error, "cannot trust the roots of Sigil's bundle; keeping bundle_path only"),
        }
    }

    /// Opens the watch at the current endpoint, after any pending back-off, with the newest
    /// configuration.
    async fn connect(&mut self) {
        if let Some(retry_at) = self.retry_at.take() {
            tokio::time::sleep_until(retry_at).await;
        }
        if let Some(client) = self.slot.get() {
            self.client = client;
        }
        self.index %= self.client.nodes.len();
        match self.client.open_watch(self.index).await {
            Ok(stream) => {
                info!(endpoint = self.address(), "watching the trust bundle");
                self.open = Some(stream);
            }
            Err(status) => self.fail(&status),
        }
    }

    /// Logs the failure and schedules the next connection, at the following endpoint.
    fn fail(&mut self, status: &Status) {
        let transient = is_transient(status);
        let delay = if transient { self.backoff.next_delay() } else { WATCH_REJECTED_BACKOFF };
        let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        if transient {
            warn!(
                endpoint = self.address(),
                code = ?status.code(),
                error = status.message(),
                retry_in_ms,
                "bundle watch failed; reconnecting"
            );
        } else {
            error!(
                endpoint = self.address(),
                code = ?status.code(),
                error = status.message(),
                retry_in_ms,
                "Sigil rejected the bundle watch; retrying"
            );
        }
        self.index = (self.index + 1) % self.client.nodes.len();
        self.retry_at = Some(Instant::now() + delay);
    }
}

/// Returns whether a bundle `version` is older than the newest one seen.
fn is_older(version: u64, newest: Option<u64>) -> bool {
    newest.is_some_and(|newest| version < newest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_bundle_versions_are_detected() {
        assert!(!is_older(0, None), "the first bundle is never older");
        assert!(!is_older(5, Some(5)), "the same version is not older");
        assert!(!is_older(6, Some(5)));
        assert!(is_older(4, Some(5)));
    }

    #[test]
    fn transient_codes() {
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Aborted, Code::Cancelled] {
            assert!(is_transient(&Status::new(code, "x")), "{code:?} is transient");
        }
        let final_codes = [
            Code::PermissionDenied,
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::Internal,
            Code::ResourceExhausted,
        ];
        for code in final_codes {
            assert!(!is_transient(&Status::new(code, "x")), "{code:?} is final");
        }
        assert!(!is_transient(&Status::unknown("from the server")), "an UNKNOWN status without source is final");
    }

    #[test]
    fn upstream_error_keeps_code_and_message() {
        let status =
            upstream_error("mint X.509 CA", "10.0.0.1:7001", &Status::permission_denied("caller may not mint"));
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(status.message(), "mint X.509 CA at Sigil node 10.0.0.1:7001 failed: caller may not mint");
    }

    #[test]
    fn backoff_doubles_up_to_max_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
        let delays: Vec<Duration> = (0..5).map(|_| backoff.next_delay()).collect();
        let steps = [100, 200, 400, 400, 400];
        for (delay, step) in delays.iter().zip(steps) {
            let step = Duration::from_millis(step);
            assert!(*delay >= step / 2, "{delay:?} is shorter than half of {step:?}");
            assert!(*delay <= step, "{delay:?} is longer than {step:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn attempts_grow_with_endpoints() {
        assert_eq!(MINT_POLICY.attempts(1), 3);
        assert_eq!(MINT_POLICY.attempts(3), 6);
    }

    #[test]
    fn publish_budget_fits_spire_limit() {
        assert!(PUBLISH_POLICY.total < Duration::from_secs(5));
        assert!(PUBLISH_POLICY.attempt_timeout < PUBLISH_POLICY.total);
    }

    #[test]
    fn empty_slot_has_no_client() {
        assert!(ClientSlot::default().get().is_none());
    }
}
