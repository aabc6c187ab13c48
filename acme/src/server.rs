//! The HTTP side: routes, the signed-request pipeline and responses.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::BodyExt;
use serde::Serialize;

use crate::issuer::Issuer;
use crate::jwk::Jwk;
use crate::jws::{self, Jws, KeyId};
use crate::nonce::{self, NonceKey};
use crate::problem::{Problem, ProblemType};
use crate::records::{self, AccountRecord, Stored};
use crate::settings::AcmeSettings;
use crate::store::{Store, StoreError, Transaction};
use crate::types::AccountStatus;
use crate::validation::Validator;

pub(crate) const JOSE_JSON: &str = "application/jose+json";
const PROBLEM_JSON: &str = "application/problem+json";

/// The ACME server of one node.
pub struct AcmeServer<S, I> {
    pub(crate) settings: AcmeSettings,
    pub(crate) store: S,
    pub(crate) issuer: I,
    pub(crate) validator: Validator,
    pub(crate) nonces: NonceKey,
}

/// A request whose JWS verified and whose nonce was consumed.
pub(crate) struct Signed {
    pub jws: Jws,
    /// The signing key.
    pub key: Jwk,
    /// The account, when the JWS named one with `kid`.
    pub account: Option<Stored<AccountRecord>>,
}

impl Signed {
    /// The account of a request that must be signed with `kid`.
    pub fn account(&self) -> Result<&Stored<AccountRecord>, Problem> {
        self.account.as_ref().ok_or_else(|| Problem::malformed("this request must name its account with kid, not jwk"))
    }
}

/// Which key a resource accepts in the protected header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyRule {
    Jwk,
    Kid,
    Either,
}

pub(crate) fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_secs() as i64).unwrap_or(0)
}

impl<S: Store, I: Issuer> AcmeServer<S, I> {
    /// Creates the server and makes sure the store contains the shared nonce
    /// key, creating it if this is the first node to start.
    pub async fn start(
        settings: AcmeSettings,
        store: S,
        issuer: I,
        validator: Validator,
    ) -> Result<Arc<AcmeServer<S, I>>, Problem> {
        let secret = shared_nonce_secret(&store).await?;
        let nonces = NonceKey::new(&secret);
        tracing::info!(base_url = %settings.base_url, "ACME server ready");
        Ok(Arc::new(AcmeServer { settings, store, issuer, validator, nonces }))
    }

    pub fn settings(&self) -> &AcmeSettings {
        &self.settings
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Builds the routes, to be served under the node's HTTPS listener.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/acme/directory", get(directory::<S, I>))
            .route("/acme/new-nonce", get(new_nonce::<S, I>).head(new_nonce::<S, I>))
            .route("/acme/new-account", post(crate::accounts::new_account::<S, I>).get(post_only::<S, I>))
            .route("/acme/account/{id}", post(crate::accounts::account::<S, I>).get(post_only::<S, I>))
            .route("/acme/account/{id}/orders", post(crate::accounts::orders::<S, I>).get(post_only::<S, I>))
            .route("/acme/key-change", post(crate::accounts::key_change::<S, I>).get(post_only::<S, I>))
            .route("/acme/new-order", post(crate::orders::new_order::<S, I>).get(post_only::<S, I>))
            .route("/acme/order/{id}", post(crate::orders::order::<S, I>).get(post_only::<S, I>))
            .route("/acme/order/{id}/finalize", post(crate::orders::finalize::<S, I>).get(post_only::<S, I>))
            .route("/acme/authz/{id}", post(crate::authz::authorization::<S, I>).get(post_only::<S, I>))
            .route("/acme/challenge/{id}/{kind}", post(crate::authz::challenge::<S, I>).get(post_only::<S, I>))
            .route("/acme/cert/{id}", post(crate::certs::certificate::<S, I>).get(post_only::<S, I>))
            .route("/acme/cert/{id}/{chain}", post(crate::certs::alternate::<S, I>).get(post_only::<S, I>))
            .route("/acme/revoke-cert", post(crate::certs::revoke::<S, I>).get(post_only::<S, I>))
            .route("/acme/renewal-info/{id}", get(crate::certs::renewal_info::<S, I>))
            .with_state(Arc::clone(self))
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.settings.base_url)
    }

    pub(crate) fn account_url(&self, id: &str) -> String {
        self.url(&format!("/acme/account/{id}"))
    }

    /// Issues a fresh nonce.
    pub(crate) fn nonce(&self) -> String {
        self.nonces.issue(now_unix() + self.settings.nonce_lifetime.as_secs() as i64)
    }

    /// Runs the checks every signed request passes: body size and type,
    /// JWS syntax, URL, nonce, key and signature, then consumes the nonce.
    pub(crate) async fn accept(&self, request: Request, rule: KeyRule) -> Result<Signed, Problem> {
        // The orders list pages with a query, which the client signs as part of the URL.
        let path = request.uri().path_and_query().map_or_else(|| request.uri().path().to_owned(), ToString::to_string);
        let body = self.read_body(request).await?;
        let jws = Jws::parse(&body)?;
        jws::check_url(jws.protected(), &self.url(&path))?;
        let nonce = jws.protected().nonce.clone().ok_or_else(|| nonce::bad_nonce("", "is missing"))?;
        let nonce_expiry = self.nonces.check(&nonce, now_unix())?;

        let (key, account) = match (&jws.protected().key, rule) {
            (KeyId::Jwk(_), KeyRule::Kid) => {
                return Err(Problem::malformed(format!("{path} requires kid naming the account, the request has jwk")));
            }
            (KeyId::Kid(kid), KeyRule::Jwk) => {
                return Err(Problem::malformed(format!("{path} requires jwk, the request has kid {kid:?}")));
            }
            (KeyId::Jwk(key), _) => (key.clone(), None),
            (KeyId::Kid(kid), _) => {
                let account = self.account_by_kid(kid).await?;
                let key = Jwk::from_json(&account.record.key)?;
                (key, Some(account))
            }
        };
        jws.verify(&key)?;
        self.consume_nonce(&nonce, nonce_expiry).await?;
        let account = match account {
            Some(account) => Some(self.fresh_valid_account(&account.record.id)?),
            None => None,
        };
        Ok(Signed { jws, key, account })
    }

    async fn read_body(&self, request: Request) -> Result<Vec<u8>, Problem> {
        let content_type = request.headers().get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok());
        if content_type.map(|value| value.split(';').next().unwrap_or("").trim()) != Some(JOSE_JSON) {
            let shown = content_type.unwrap_or("none");
            return Err(Problem::malformed(format!("Content-Type is {shown:?}, expected {JOSE_JSON}")).with_status(415));
        }
        let limit = self.settings.max_body_bytes;
        let limited = http_body_util::Limited::new(request.into_body(), limit);
        match limited.collect().await {
            Ok(collected) => Ok(collected.to_bytes().to_vec()),
            Err(_) => Err(Problem::malformed(format!("request body is larger than {limit} bytes")).with_status(413)),
        }
    }

    async fn account_by_kid(&self, kid: &str) -> Result<Stored<AccountRecord>, Problem> {
        let id = kid
            .rsplit_once("/acme/account/")
            .map(|(_, id)| id)
            .filter(|id| !id.is_empty() && !id.contains('/'))
            .ok_or_else(|| Problem::malformed(format!("kid {kid:?} is not an account URL of this server")))?;
        let key = records::account_key(id);
        let mut account = records::read::<AccountRecord>(&self.store, &key)?;
        if account.is_none() {
            // The account may have been created through another node a
            // moment ago.
            self.store.barrier().await.map_err(records::store_problem)?;
            account = records::read(&self.store, &key)?;
        }
        account.ok_or_else(|| Problem::new(ProblemType::AccountDoesNotExist, format!("account {kid:?} does not exist")))
    }

    /// Reads the account again after the nonce commit, which is the
    /// request's read point, and refuses it unless it is valid.
    fn fresh_valid_account(&self, id: &str) -> Result<Stored<AccountRecord>, Problem> {
        let url = self.account_url(id);
        let account = records::read::<AccountRecord>(&self.store, &records::account_key(id))?
            .ok_or_else(|| Problem::new(ProblemType::AccountDoesNotExist, format!("account {url:?} does not exist")))?;
        if account.record.status != AccountStatus::Valid {
            let status = serde_json::to_value(account.record.status).unwrap_or_default();
            return Err(Problem::unauthorized(format!(
                "account {url:?} is {}",
                status.as_str().unwrap_or("not valid")
            )));
        }
        Ok(account)
    }

    /// Records the nonce as used. After the commit returns, this node has
    /// applied every write committed before it, so the handler's reads
    /// that follow see the latest state.
    async fn consume_nonce(&self, nonce: &str, expires_unix: i64) -> Result<(), Problem> {
        let key = records::nonce_key(nonce);
        let transaction = Transaction::default().when(key.clone(), 0).put(key, Vec::new(), expires_unix);
        match self.store.commit(transaction).await {
            Ok(_) => Ok(()),
            Err(StoreError::Conflict { .. }) => Err(nonce::bad_nonce(nonce, "was already used")),
            Err(other) => Err(records::store_problem(other)),
        }
    }

    /// Builds a JSON response with the headers every response carries.
    pub(crate) fn json(&self, status: StatusCode, body: &impl Serialize, mut headers: HeaderMap) -> Response {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let body = serde_json::to_vec(body).expect("ACME resources serialize to JSON");
        self.answer(status, headers, Body::from(body))
    }

    pub(crate) fn answer(&self, status: StatusCode, mut headers: HeaderMap, body: Body) -> Response {
        self.add_common_headers(&mut headers);
        (status, headers, body).into_response()
    }

    pub(crate) fn problem(&self, problem: Problem) -> Response {
        tracing::debug!(kind = %problem.kind, detail = %problem.detail, "ACME request rejected");
        let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(seconds) = problem.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        let body = serde_json::to_vec(&problem).expect("problems serialize to JSON");
        self.answer(status, headers, Body::from(body))
    }

    fn add_common_headers(&self, headers: &mut HeaderMap) {
        if let Ok(nonce) = HeaderValue::from_str(&self.nonce()) {
            headers.insert("replay-nonce", nonce);
        }
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let index = format!("<{}>;rel=\"index\"", self.url("/acme/directory"));
        if let Ok(link) = HeaderValue::from_str(&index) {
            headers.append(header::LINK, link);
        }
    }

    /// Turns a handler's result into the response.
    pub(crate) fn finish(&self, result: Result<Response, Problem>) -> Response {
        result.unwrap_or_else(|problem| self.problem(problem))
    }
}

/// Reads the shared nonce key, or creates it if no node has.
async fn shared_nonce_secret(store: &impl Store) -> Result<Vec<u8>, Problem> {
    for _ in 0..5 {
        if let Some(stored) = store.get(records::NONCE_KEY.as_bytes()).map_err(records::store_problem)? {
            return Ok(stored.value);
        }
        let mut secret = vec![0u8; 32];
        rand::fill(secret.as_mut_slice());
        let transaction = Transaction::default().when(records::NONCE_KEY.as_bytes(), 0).put(
            records::NONCE_KEY.as_bytes(),
            secret.clone(),
            0,
        );
        match store.commit(transaction).await {
            Ok(_) => return Ok(secret),
            Err(StoreError::Conflict { .. }) => continue,
            Err(other) => return Err(records::store_problem(other)),
        }
    }
    Err(Problem::internal("the shared nonce key changed five times while it was being read"))
}

async fn directory<S: Store, I: Issuer>(State(server): State<Arc<AcmeServer<S, I>>>) -> Response {
    let settings = &server.settings;
    let mut meta = serde_json::Map::new();
    if let Some(terms) = &settings.terms_of_service {
        meta.insert("termsOfService".into(), terms.clone().into());
    }
    if let Some(website) = &settings.website {
        meta.insert("website".into(), website.clone().into());
    }
    meta.insert("caaIdentities".into(), settings.caa_identities.clone().into());
    meta.insert("externalAccountRequired".into(), settings.external_account_required.into());
    let profiles: serde_json::Map<String, serde_json::Value> =
        server.issuer.profiles().into_iter().map(|profile| (profile.name, profile.description.into())).collect();
    meta.insert("profiles".into(), profiles.into());
    let body = serde_json::json!({
        "newNonce": server.url("/acme/new-nonce"),
        "newAccount": server.url("/acme/new-account"),
        "newOrder": server.url("/acme/new-order"),
        "revokeCert": server.url("/acme/revoke-cert"),
        "keyChange": server.url("/acme/key-change"),
        "renewalInfo": server.url("/acme/renewal-info"),
        "meta": meta,
    });
    server.json(StatusCode::OK, &body, HeaderMap::new())
}

async fn new_nonce<S: Store, I: Issuer>(State(server): State<Arc<AcmeServer<S, I>>>, method: Method) -> Response {
    let status = if method == Method::HEAD { StatusCode::OK } else { StatusCode::NO_CONTENT };
    server.answer(status, HeaderMap::new(), Body::empty())
}

async fn post_only<S: Store, I: Issuer>(State(server): State<Arc<AcmeServer<S, I>>>, request: Request) -> Response {
    let path = request.uri().path().to_owned();
    let problem = Problem::malformed(format!("{path} accepts only POST; read it with POST-as-GET")).with_status(405);
    let mut response = server.problem(problem);
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}
