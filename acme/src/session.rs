//! An ACME client session over HTTPS, for tests and the load generator:
//! one kept-alive connection to one server, nonce handling, signed POSTs,
//! and an http-01 responder. The server never uses this module.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::client::AccountKey;
use crate::problem::Problem;

/// Time one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A failure below ACME: connection, TLS or HTTP.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SessionError(pub String);

fn failed(step: &str, error: impl std::fmt::Display) -> SessionError {
    SessionError(format!("{step}: {error}"))
}

/// One HTTP response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// Returns the problem document, if the response is one.
    pub fn problem(&self) -> Option<Problem> {
        let is_problem = self
            .headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|value| value.as_bytes().starts_with(b"application/problem+json"));
        if is_problem { serde_json::from_slice(&self.body).ok() } else { None }
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|value| value.to_str().ok()).map(str::to_owned)
    }

    /// Returns every value of a header, such as each `Link`.
    pub fn headers_named(&self, name: &str) -> Vec<String> {
        self.headers.get_all(name).iter().filter_map(|value| value.to_str().ok()).map(str::to_owned).collect()
    }

    pub fn location(&self) -> Option<String> {
        self.header("location")
    }

    pub fn nonce(&self) -> Option<String> {
        self.header("replay-nonce")
    }
}

/// A session with one ACME server.
pub struct Session {
    tls: tokio_rustls::TlsConnector,
    address: String,
    host: String,
    sender: Option<SendRequest<Full<Bytes>>>,
    directory: Value,
    nonce: Option<String>,
    pub key: AccountKey,
    /// The account URL once the account exists; requests then use `kid`.
    pub account_url: Option<String>,
}

impl Session {
    /// Reads the directory at `directory_url`, trusting the PEM roots in
    /// `roots_pem` for the server's certificate.
    pub async fn connect(directory_url: &str, roots_pem: &[u8], key: AccountKey) -> Result<Session, SessionError> {
        let rest = directory_url
            .strip_prefix("https://")
            .ok_or_else(|| SessionError(format!("directory URL {directory_url:?} is not https://")))?;
        let address = rest.split('/').next().unwrap_or_default().to_owned();
        let host =
            address.rsplit_once(':').map_or(address.as_str(), |(host, _)| host).trim_matches(['[', ']']).to_owned();
        let mut session = Session {
            tls: connector(roots_pem)?,
            address,
            host,
            sender: None,
            directory: Value::Null,
            nonce: None,
            key,
            account_url: None,
        };
        let reply = session.request(Method::GET, directory_url, None).await?;
        if reply.status != StatusCode::OK {
            return Err(SessionError(format!("directory {directory_url} responded with {}", reply.status)));
        }
        session.directory = reply.json();
        Ok(session)
    }

    pub fn directory(&self) -> &Value {
        &self.directory
    }

    /// Returns the URL of a directory entry, such as "newOrder".
    pub fn url(&self, entry: &str) -> String {
        self.directory[entry].as_str().unwrap_or_default().to_owned()
    }

    /// Sends a request and keeps the nonce of its response.
    pub async fn request(
        &mut self,
        method: Method,
        url: &str,
        body: Option<(Vec<u8>, &str)>,
    ) -> Result<Reply, SessionError> {
        let reply = match tokio::time::timeout(REQUEST_TIMEOUT, self.send(method, url, body)).await {
            Ok(reply) => reply?,
            Err(_) => {
                self.sender = None;
                return Err(SessionError(format!("{url} timed out after {REQUEST_TIMEOUT:?}")));
            }
        };
        if let Some(nonce) = reply.nonce() {
            self.nonce = Some(nonce);
        }
        Ok(reply)
    }

    async fn send(&mut self, method: Method, url: &str, body: Option<(Vec<u8>, &str)>) -> Result<Reply, SessionError> {
        let mut builder = Request::builder().method(method).uri(path_of(url)).header("host", &self.address);
        let payload = match body {
            Some((bytes, content_type)) => {
                builder = builder.header("content-type", content_type);
                Bytes::from(bytes)
            }
            None => Bytes::new(),
        };
        let request = builder.body(Full::new(payload)).map_err(|error| failed("build request", error))?;
        let sender = self.sender().await?;
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(error) => {
                self.sender = None;
                return Err(failed(&format!("send request to {url}"), error));
            }
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|error| failed("read answer", error))?.to_bytes();
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }

    async fn sender(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, SessionError> {
        if self.sender.as_ref().is_none_or(SendRequest::is_closed) {
            let stream = tokio::net::TcpStream::connect(&self.address)
                .await
                .map_err(|error| failed(&format!("connect to {}", self.address), error))?;
            stream.set_nodelay(true).map_err(|error| failed("set TCP_NODELAY", error))?;
            let name = ServerName::try_from(self.host.clone()).map_err(|error| failed("server name", error))?;
            let tls = self.tls.connect(name, stream).await.map_err(|error| failed("TLS handshake", error))?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|error| failed("HTTP handshake", error))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("set above");
        sender.ready().await.map_err(|error| failed("connection ready", error))?;
        Ok(sender)
    }

    /// Returns the nonce of the last response, or a new one from newNonce.
    pub async fn nonce(&mut self) -> Result<String, SessionError> {
        if let Some(nonce) = self.nonce.take() {
            return Ok(nonce);
        }
        let url = self.url("newNonce");
        let reply = self.request(Method::HEAD, &url, None).await?;
        reply.nonce().ok_or_else(|| SessionError(format!("{url} sent no Replay-Nonce")))
    }

    /// Signs `payload` (None: POST-as-GET) for `url` and posts it, using
    /// `kid` once the account exists. A badNonce answer is retried once
    /// with the fresh nonce it carries, as RFC 8555 section 6.5 allows.
    pub async fn post(&mut self, url: &str, payload: Option<&Value>) -> Result<Reply, SessionError> {
        let mut reply = self.post_once(url, payload).await?;
        if reply.problem().is_some_and(|problem| problem.is(crate::ProblemType::BadNonce)) {
            reply = self.post_once(url, payload).await?;
        }
        Ok(reply)
    }

    async fn post_once(&mut self, url: &str, payload: Option<&Value>) -> Result<Reply, SessionError> {
        let nonce = self.nonce().await?;
        let body = self.key.sign(url, Some(&nonce), self.account_url.as_deref(), payload);
        self.request(Method::POST, url, Some((body, "application/jose+json"))).await
    }

    /// Posts a body exactly as given, for tests of malformed requests.
    pub async fn post_raw(&mut self, url: &str, body: Vec<u8>, content_type: &str) -> Result<Reply, SessionError> {
        self.request(Method::POST, url, Some((body, content_type))).await
    }

    /// Creates the account (or finds it) and keeps its URL.
    pub async fn new_account(&mut self, payload: &Value) -> Result<Reply, SessionError> {
        let url = self.url("newAccount");
        self.account_url = None;
        let reply = self.post(&url, Some(payload)).await?;
        if reply.status.is_success() {
            self.account_url = reply.location();
        }
        Ok(reply)
    }
}

/// Time an order may take to become ready or valid in [`Session::obtain_certificate`].
const ORDER_LIMIT: Duration = Duration::from_secs(60);

impl Session {
    /// Runs one whole order through http-01 with `responder`: newOrder,
    /// every authorization, the challenges, finalize with `csr_der`, and the
    /// certificate download. Returns the PEM chain.
    pub async fn obtain_certificate(
        &mut self,
        identifiers: &[crate::Identifier],
        csr_der: &[u8],
        responder: &Http01Responder,
    ) -> Result<String, SessionError> {
        let new_order = self.url("newOrder");
        let created = self.post(&new_order, Some(&serde_json::json!({ "identifiers": identifiers }))).await?;
        expect_status(&created, StatusCode::CREATED, "newOrder")?;
        let order_url = created.location().ok_or_else(|| SessionError("newOrder sent no Location".to_owned()))?;
        let order = created.json();

        for authz_url in order["authorizations"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            let authz = self.post(authz_url, None).await?;
            expect_status(&authz, StatusCode::OK, "authorization")?;
            let authz = authz.json();
            if authz["status"] == "valid" {
                continue;
            }
            let challenge = authz["challenges"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|challenge| challenge["type"] == "http-01")
                .ok_or_else(|| SessionError(format!("authorization {authz_url} offers no http-01 challenge")))?;
            let token = challenge["token"].as_str().unwrap_or_default().to_owned();
            let url = challenge["url"].as_str().unwrap_or_default().to_owned();
            responder.insert(&token, &self.key.key_authorization(&token));
            let answer = self.post(&url, Some(&serde_json::json!({}))).await?;
            expect_status(&answer, StatusCode::OK, "challenge")?;
        }

        let ready = self.wait_for_order(&order_url, &["ready", "valid"]).await?;
        let finalize = ready["finalize"].as_str().unwrap_or_default().to_owned();
        let csr = crate::b64::encode(csr_der);
        let finalized = self.post(&finalize, Some(&serde_json::json!({ "csr": csr }))).await?;
        expect_status(&finalized, StatusCode::OK, "finalize")?;
        let valid = self.wait_for_order(&order_url, &["valid"]).await?;
        let certificate = valid["certificate"].as_str().unwrap_or_default().to_owned();
        let chain = self.post(&certificate, None).await?;
        expect_status(&chain, StatusCode::OK, "certificate download")?;
        Ok(String::from_utf8_lossy(&chain.body).into_owned())
    }

    /// Polls an order every 50 ms at most until its status is one of
    /// `wanted`, and fails if it becomes invalid.
    pub async fn wait_for_order(&mut self, order_url: &str, wanted: &[&str]) -> Result<Value, SessionError> {
        let deadline = tokio::time::Instant::now() + ORDER_LIMIT;
        loop {
            let reply = self.post(order_url, None).await?;
            expect_status(&reply, StatusCode::OK, "order")?;
            let order = reply.json();
            let status = order["status"].as_str().unwrap_or_default();
            if wanted.contains(&status) {
                return Ok(order);
            }
            if status == "invalid" {
                return Err(SessionError(format!("order {order_url} became invalid: {}", order["error"])));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(SessionError(format!("order {order_url} is still {status} after {ORDER_LIMIT:?}")));
            }
            let wait = reply.header("retry-after").and_then(|value| value.parse::<u64>().ok()).unwrap_or(1);
            // Validation on loopback takes milliseconds, so poll faster than Retry-After suggests.
            tokio::time::sleep(Duration::from_millis((wait * 1000).min(50))).await;
        }
    }
}

fn expect_status(reply: &Reply, expected: StatusCode, step: &str) -> Result<(), SessionError> {
    if reply.status == expected {
        return Ok(());
    }
    Err(SessionError(format!("{step} responded with {}: {}", reply.status, String::from_utf8_lossy(&reply.body))))
}

fn path_of(url: &str) -> String {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    match rest.find('/') {
        Some(index) => rest[index..].to_owned(),
        None => "/".to_owned(),
    }
}

#[expect(deprecated, reason = "ring keeps the build free of aws-lc; post-quantum key exchange is not yet needed here")]
fn connector(roots_pem: &[u8]) -> Result<tokio_rustls::TlsConnector, SessionError> {
    let mut roots = rustls::RootCertStore::empty();
    for der in pem_certificates(roots_pem) {
        roots.add(CertificateDer::from(der)).map_err(|error| failed("add root", error))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| failed("TLS versions", error))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Returns the DER certificates of a PEM text.
pub fn pem_certificates(pem: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    let text = String::from_utf8_lossy(pem);
    let mut certificates = Vec::new();
    let mut body = String::new();
    let mut inside = false;
    for line in text.lines() {
        match line.trim() {
            "-----BEGIN CERTIFICATE-----" => {
                inside = true;
                body.clear();
            }
            "-----END CERTIFICATE-----" => {
                inside = false;
                if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(&body) {
                    certificates.push(der);
                }
            }
            line if inside => body.push_str(line),
            _ => {}
        }
    }
    certificates
}

/// Serves http-01 key authorizations on an address, as a client would.
#[derive(Clone)]
pub struct Http01Responder {
    tokens: Arc<Mutex<HashMap<String, String>>>,
    pub address: SocketAddr,
}

impl Http01Responder {
    /// Binds `address` and serves until the runtime stops.
    pub async fn start(address: SocketAddr) -> Result<Http01Responder, SessionError> {
        let listener = TcpListener::bind(address).await.map_err(|error| failed(&format!("bind {address}"), error))?;
        let address = listener.local_addr().map_err(|error| failed("local address", error))?;
        let tokens: Arc<Mutex<HashMap<String, String>>> = Arc::default();
        let shared = Arc::clone(&tokens);
        let router = axum::Router::new().route(
            "/.well-known/acme-challenge/{token}",
            axum::routing::get(move |axum::extract::Path(token): axum::extract::Path<String>| {
                let answer = shared.lock().ok().and_then(|tokens| tokens.get(&token).cloned());
                async move {
                    match answer {
                        Some(key_authorization) => (StatusCode::OK, key_authorization),
                        None => (StatusCode::NOT_FOUND, String::new()),
                    }
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(Http01Responder { tokens, address })
    }

    pub fn insert(&self, token: &str, key_authorization: &str) {
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(token.to_owned(), key_authorization.to_owned());
        }
    }

    pub fn remove(&self, token: &str) {
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.remove(token);
        }
    }
}
