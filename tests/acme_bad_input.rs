//! Bad ACME requests against a 3-node `sigil dev` cluster.
//!
//! Each row of the table sends one bad request and checks the HTTP status and the ACME problem
//! type. It checks that the problem detail names the bad value and that the response carries a
//! fresh Replay-Nonce. It also checks that nothing changed: the account, its orders and
//! authorizations read back through another node are the same, and the ledger recorded no new
//! certificate.
//!
//! The rows share one cluster and the http-01 port 127.0.0.1:5002, so they run in order inside
//! one test. A failing row does not stop the rows after it. The test fails at the end and lists
//! every failed check.

#[path = "common/cluster.rs"]
#[allow(dead_code, reason = "this test uses only part of the cluster harness")]
mod cluster_harness;
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::http::Method;
use cluster_harness::{CLUSTER_TESTS, DevCluster};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::{Value, json};
use sigil_acme::b64;
use sigil_acme::client::AccountKey;
use sigil_acme::jwk::Algorithm;
use sigil_acme::session::{Http01Responder, Reply, Session};
use sigil_acme::{Identifier, ProblemType};
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

const JOSE_JSON: &str = "application/jose+json";
/// The address `sigil dev` validates http-01 challenges on.
const HTTP01_ADDRESS: &str = "127.0.0.1:5002";
/// Time to wait for another process to release `HTTP01_ADDRESS`.
const HTTP01_PORT_WAIT: Duration = Duration::from_secs(300);
/// The request body limit of the ACME server (`AcmeSettings::max_body_bytes`).
const MAX_BODY_BYTES: usize = 64 * 1024;
/// The names of the order that the CSR rows and the concurrent finalize use.
const READY_NAMES: [&str; 2] = ["one.bad-input.test", "two.bad-input.test"];
const PENDING_NAME: &str = "pending.bad-input.test";
/// Time the cluster may take to apply every committed write on all nodes.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Characters of a request or response that a failure message shows.
const SHOWN_CHARS: usize = 1500;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acme_rejects_bad_input() {
    let _serial = CLUSTER_TESTS.lock().await;
    let started = Instant::now();
    let mut context = Context::start().await;
    eprintln!("cluster and fixtures ready after {:.1} s", started.elapsed().as_secs_f64());

    let mut rows = Vec::new();
    rows.push(replayed_nonce(&context).await);
    rows.push(nonce_from_another_node(&context).await);
    rows.push(nonce_never_issued(&context).await);
    rows.push(jwk_and_kid_together(&context).await);
    rows.push(mismatched_url(&context).await);
    rows.push(unsupported_alg(&context).await);
    rows.push(body_over_size_limit(&context).await);
    rows.push(padded_base64url(&context).await);
    rows.push(wrong_content_type(&context).await);
    rows.push(finalize_before_ready(&context).await);
    rows.push(malformed_csr(&context).await);
    rows.push(csr_with_extra_name(&context).await);
    rows.push(csr_missing_name(&context).await);
    rows.push(csr_with_account_key(&context).await);
    rows.push(finalize_twice_at_once(&mut context).await);
    rows.push(deactivated_account(&context).await);
    rows.push(challenge_of_another_account(&context).await);
    rows.push(rollover_to_key_in_use(&context).await);
    rows.push(revocation_by_stranger(&context).await);
    rows.push(eab_wrong_mac_or_unknown_key(&context).await);
    rows.push(get_on_post_only_resource(&context).await);
    rows.push(unknown_order(&context).await);
    rows.push(order_over_rate_limit(&mut context).await);

    let failed: Vec<&Row> = rows.iter().filter(|row| !row.failures.is_empty()).collect();
    eprintln!("\n{} rows in {:.1} s:", rows.len(), started.elapsed().as_secs_f64());
    for row in &rows {
        let result = if row.failures.is_empty() { "ok".to_owned() } else { format!("FAILED ({})", row.failures.len()) };
        eprintln!("  {:<45} {result}", row.name);
    }
    let report: Vec<String> =
        failed.iter().map(|row| format!("== {} ==\n{}", row.name, row.failures.join("\n---\n"))).collect();
    assert!(failed.is_empty(), "{} of {} rows failed:\n\n{}", failed.len(), rows.len(), report.join("\n\n"));
}

/// One row of the table and the checks of it that failed.
struct Row {
    name: &'static str,
    failures: Vec<String>,
}

impl Row {
    fn new(name: &'static str) -> Row {
        eprintln!("row: {name}");
        Row { name, failures: Vec::new() }
    }

    /// Records `message` as a failure unless `ok`.
    fn check(&mut self, ok: bool, message: impl FnOnce() -> String) {
        if !ok {
            let message = message();
            eprintln!("  check failed: {message}");
            self.failures.push(message);
        }
    }
}

/// One request as sent and the response to it.
struct Exchange {
    request: String,
    /// The nonce in the protected header, if the request had one.
    sent_nonce: Option<String>,
    reply: Reply,
}

impl Exchange {
    fn describe(&self) -> String {
        format!("request: {}\nresponse: {}", self.request, describe_reply(&self.reply))
    }
}

/// Checks that the response of `exchange` is a problem document of `kind` and `status` whose
/// detail contains each of `needles`, and with a new Replay-Nonce.
fn expect_problem(row: &mut Row, step: &str, exchange: &Exchange, status: u16, kind: ProblemType, needles: &[&str]) {
    let reply = &exchange.reply;
    row.check(reply.status.as_u16() == status, || {
        format!("{step}: expected HTTP {status}, got {}\n{}", reply.status.as_u16(), exchange.describe())
    });
    let problem = reply.problem();
    row.check(problem.is_some(), || {
        format!("{step}: the response is not an application/problem+json document\n{}", exchange.describe())
    });
    if let Some(problem) = &problem {
        row.check(problem.kind == kind.urn(), || {
            format!("{step}: expected problem type {}, got {}\n{}", kind.urn(), problem.kind, exchange.describe())
        });
        row.check(problem.status == reply.status.as_u16(), || {
            format!(
                "{step}: the problem's status member {} differs from the HTTP status\n{}",
                problem.status,
                exchange.describe()
            )
        });
        for needle in needles {
            row.check(problem.detail.contains(needle), || {
                format!("{step}: the problem detail does not name {needle:?}\n{}", exchange.describe())
            });
        }
    }
    expect_fresh_nonce(row, step, exchange);
}

/// Checks that the response carries a Replay-Nonce other than the one the request sent.
fn expect_fresh_nonce(row: &mut Row, step: &str, exchange: &Exchange) {
    let fresh = exchange.reply.nonce();
    row.check(fresh.is_some(), || format!("{step}: the response has no Replay-Nonce header\n{}", exchange.describe()));
    if let (Some(fresh), Some(sent)) = (&fresh, &exchange.sent_nonce) {
        row.check(fresh != sent, || {
            format!("{step}: the response's Replay-Nonce is the nonce the request sent\n{}", exchange.describe())
        });
    }
}

/// A P-256 key that signs well-formed requests through `AccountKey` and hand-built JWS bodies
/// through ring.
struct TestKey {
    pkcs8: Vec<u8>,
}

impl TestKey {
    fn generate() -> TestKey {
        let document = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .expect("generate a P-256 key");
        TestKey { pkcs8: document.as_ref().to_vec() }
    }

    fn account_key(&self) -> AccountKey {
        AccountKey::from_pkcs8(Algorithm::Es256, &self.pkcs8)
            .expect("AccountKey loads a PKCS#8 key that ring generated")
    }

    fn jwk(&self) -> Value {
        self.account_key().jwk()
    }

    fn rcgen_key(&self) -> rcgen::KeyPair {
        rcgen::KeyPair::try_from(self.pkcs8.as_slice()).expect("rcgen loads a PKCS#8 key that ring generated")
    }

    /// Builds a flattened JWS with `header` as the protected header and `payload_b64` as the
    /// payload member exactly as given, signed with ES256 over both.
    fn jws(&self, header: &Value, payload_b64: &str) -> Vec<u8> {
        let protected = b64::encode(header.to_string().as_bytes());
        let random = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &self.pkcs8, &random)
            .expect("ring loads its own PKCS#8 key");
        let signature =
            pair.sign(&random, format!("{protected}.{payload_b64}").as_bytes()).expect("sign with a P-256 key");
        json!({"protected": protected, "payload": payload_b64, "signature": b64::encode(signature.as_ref())})
            .to_string()
            .into_bytes()
    }
}

/// An ACME account: its key and the account URL that its creation returned.
struct Account {
    key: TestKey,
    url: String,
}

/// A certificate issued during the test.
struct IssuedCertificate {
    leaf_der: Vec<u8>,
}

/// The cluster and the ACME objects that the rows use.
struct Context {
    cluster: DevCluster,
    roots: Vec<u8>,
    /// `https://host:port` of each node's ACME server; index 0 is node 1.
    bases: Vec<String>,
    responder: Http01Responder,
    alice: Account,
    bob: Account,
    /// An order of Alice whose authorization stays pending.
    pending_order: String,
    pending_authz: String,
    /// An order of Alice for `READY_NAMES` whose authorizations are valid.
    ready_order: String,
    /// The certificate of the ready order, once the concurrent finalize row issued it.
    issued: Option<IssuedCertificate>,
}

impl Context {
    async fn start() -> Context {
        let cluster = DevCluster::start(3, 0).await;
        let roots = std::fs::read(cluster.dir.join("bundle.pem")).expect("read bundle.pem of the dev cluster");
        let bases: Vec<String> = (1..=3)
            .map(|id| {
                let directory = cluster
                    .endpoint(id)
                    .acme
                    .unwrap_or_else(|| panic!("endpoints.json lists no ACME URL for node {id}"));
                directory
                    .strip_suffix("/acme/directory")
                    .unwrap_or_else(|| panic!("unexpected directory URL {directory}"))
                    .to_owned()
            })
            .collect();
        let responder = start_http01_responder().await;

        let mut context = Context {
            cluster,
            roots,
            bases,
            responder,
            alice: Account { key: TestKey::generate(), url: String::new() },
            bob: Account { key: TestKey::generate(), url: String::new() },
            pending_order: String::new(),
            pending_authz: String::new(),
            ready_order: String::new(),
            issued: None,
        };
        context.alice = context.create_account(1, "alice").await;
        context.bob = context.create_account(2, "bob").await;

        let mut session = context.session(1, &context.alice).await;
        let created = session
            .post(&session.url("newOrder"), Some(&order_payload(&[PENDING_NAME])))
            .await
            .unwrap_or_else(|error| panic!("newOrder for {PENDING_NAME}: {error}"));
        assert_eq!(created.status.as_u16(), 201, "newOrder for {PENDING_NAME}: {}", describe_reply(&created));
        context.pending_order = created.location().expect("the newOrder response has a Location");
        context.pending_authz =
            created.json()["authorizations"][0].as_str().expect("order has an authorization").to_owned();

        context.ready_order = context.authorize_order(1, &READY_NAMES).await;
        context
    }

    fn base(&self, node: u64) -> &str {
        &self.bases[usize::try_from(node - 1).expect("node id fits usize")]
    }

    fn url(&self, node: u64, path: &str) -> String {
        format!("{}{path}", self.base(node))
    }

    /// Rewrites an ACME URL of any node to the same resource on `node`.
    fn on_node(&self, url: &str, node: u64) -> String {
        let path = self
            .bases
            .iter()
            .find_map(|base| url.strip_prefix(base.as_str()))
            .unwrap_or_else(|| panic!("{url} is not a URL of this cluster's ACME servers"));
        self.url(node, path)
    }

    /// Connects to `node`'s ACME server with `key`, without an account URL.
    async fn connect(&self, node: u64, key: &TestKey) -> Session {
        let directory = self.url(node, "/acme/directory");
        Session::connect(&directory, &self.roots, key.account_key())
            .await
            .unwrap_or_else(|error| panic!("connect to {directory}: {error}"))
    }

    /// Connects to `node` as `account`, so that requests name the account with `kid`.
    async fn session(&self, node: u64, account: &Account) -> Session {
        let mut session = self.connect(node, &account.key).await;
        session.account_url = Some(self.on_node(&account.url, node));
        session
    }

    async fn create_account(&self, node: u64, name: &str) -> Account {
        let key = TestKey::generate();
        let mut session = self.connect(node, &key).await;
        let payload = json!({"termsOfServiceAgreed": true, "contact": [format!("mailto:{name}@example.org")]});
        let reply =
            session.new_account(&payload).await.unwrap_or_else(|error| panic!("newAccount for {name}: {error}"));
        assert_eq!(reply.status.as_u16(), 201, "newAccount for {name}: {}", describe_reply(&reply));
        let url = session.account_url.clone().expect("the newAccount response has a Location");
        Account { key, url }
    }

    /// Creates an order of Alice for `names` through `node`, responds to its http-01 challenges and
    /// waits until it is ready. Returns the order URL.
    async fn authorize_order(&self, node: u64, names: &[&str]) -> String {
        let mut session = self.session(node, &self.alice).await;
        let created = session
            .post(&session.url("newOrder"), Some(&order_payload(names)))
            .await
            .unwrap_or_else(|error| panic!("newOrder for {names:?}: {error}"));
        assert_eq!(created.status.as_u16(), 201, "newOrder for {names:?}: {}", describe_reply(&created));
        let order_url = created.location().expect("the newOrder response has a Location");
        let authorizations: Vec<String> = created.json()["authorizations"]
            .as_array()
            .expect("order lists its authorizations")
            .iter()
            .filter_map(|url| url.as_str().map(str::to_owned))
            .collect();
        for authz_url in authorizations {
            let authz = read(&mut session, &authz_url).await;
            let challenge = authz["challenges"]
                .as_array()
                .and_then(|challenges| challenges.iter().find(|challenge| challenge["type"] == "http-01"))
                .unwrap_or_else(|| panic!("authorization {authz_url} offers no http-01 challenge: {authz}"))
                .clone();
            let token = challenge["token"].as_str().expect("challenge token");
            self.responder.insert(token, &session.key.key_authorization(token));
            let url = challenge["url"].as_str().expect("challenge URL");
            let response =
                session.post(url, Some(&json!({}))).await.unwrap_or_else(|error| panic!("respond to {url}: {error}"));
            assert_eq!(response.status.as_u16(), 200, "challenge response {url}: {}", describe_reply(&response));
        }
        session
            .wait_for_order(&order_url, &["ready"])
            .await
            .unwrap_or_else(|error| panic!("order {order_url} did not become ready: {error}"));
        order_url
    }

    /// Returns the number of certificates in the ledger, once every node has applied every write.
    async fn issued_total(&self) -> u64 {
        let statuses = self.cluster.wait_converged(&[1, 2, 3], CONVERGE_TIMEOUT).await;
        statuses[&3].issued_total
    }

    /// Reads Alice's account, her orders list, the pending order and authorization and the ready
    /// order through node 3, and the number of certificates in the ledger.
    async fn snapshot(&self) -> Snapshot {
        let mut session = self.session(3, &self.alice).await;
        let account_url = self.on_node(&self.alice.url, 3);
        let account = read(&mut session, &account_url).await;
        let orders_url = account["orders"].as_str().expect("account lists its orders URL").to_owned();
        let orders = read(&mut session, &orders_url).await;
        let pending_order = read(&mut session, &self.on_node(&self.pending_order, 3)).await;
        let pending_authz = read(&mut session, &self.on_node(&self.pending_authz, 3)).await;
        let ready_order = read(&mut session, &self.on_node(&self.ready_order, 3)).await;
        Snapshot {
            resources: vec![
                ("account of Alice", account),
                ("orders of Alice", orders),
                ("pending order", pending_order),
                ("pending authorization", pending_authz),
                ("ready order", ready_order),
            ],
            issued_total: self.issued_total().await,
        }
    }

    /// Returns the `suggestedWindow` of the certificate's renewal information (RFC 9773), which
    /// starts in the past once the certificate is revoked.
    async fn renewal_window(&self, node: u64, leaf_der: &[u8]) -> (time::OffsetDateTime, time::OffsetDateTime) {
        let url = self.url(node, &format!("/acme/renewal-info/{}", ari_certificate_id(leaf_der)));
        let mut session = self.connect(node, &TestKey::generate()).await;
        let reply = session.request(Method::GET, &url, None).await.unwrap_or_else(|error| panic!("GET {url}: {error}"));
        assert_eq!(reply.status.as_u16(), 200, "GET {url}: {}", describe_reply(&reply));
        let window = &reply.json()["suggestedWindow"];
        let parse = |member: &str| {
            let text = window[member].as_str().unwrap_or_else(|| panic!("renewal window has no {member}: {window}"));
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|error| panic!("renewal window {member} {text:?} is not RFC 3339: {error}"))
        };
        (parse("start"), parse("end"))
    }

    /// Runs `sigil acme eab` with `arguments` against the cluster and returns its standard output.
    fn eab_command(&self, arguments: &[&str]) -> String {
        let output = Command::new(common::sigil_bin())
            .args(["acme", "eab"])
            .args(arguments)
            .arg("--dev-dir")
            .arg(&self.cluster.dir)
            .stdin(Stdio::null())
            .output()
            .expect("run sigil acme eab");
        assert!(
            output.status.success(),
            "sigil acme eab {arguments:?} failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Returns the account that the external account binding key `key_id` is bound to, or an
    /// empty string when it is unused, as `sigil acme eab list --json` reports it.
    fn eab_binding(&self, key_id: &str) -> String {
        let listing: Value = serde_json::from_str(&self.eab_command(&["list", "--json"]))
            .expect("sigil acme eab list --json prints JSON");
        let entry = listing
            .as_array()
            .and_then(|keys| keys.iter().find(|key| key["key_id"] == key_id))
            .unwrap_or_else(|| panic!("sigil acme eab list does not list key id {key_id}: {listing}"));
        entry["account"].as_str().unwrap_or_default().to_owned()
    }
}

/// Binds the http-01 responder on `HTTP01_ADDRESS`. Another test process, such as the ACME
/// interoperability test, may hold the port for a while, so binding is retried for
/// `HTTP01_PORT_WAIT`.
async fn start_http01_responder() -> Http01Responder {
    let deadline = Instant::now() + HTTP01_PORT_WAIT;
    loop {
        match Http01Responder::start(HTTP01_ADDRESS.parse().expect("socket address")).await {
            Ok(responder) => return responder,
            Err(error) if Instant::now() < deadline => {
                eprintln!("{error}; retrying every second until another test releases the port");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => panic!("start the http-01 responder: {error} (still in use after {HTTP01_PORT_WAIT:?})"),
        }
    }
}

/// Resources read through node 3, to compare before and after a bad request.
struct Snapshot {
    resources: Vec<(&'static str, Value)>,
    issued_total: u64,
}

/// Checks that every resource of `before` reads the same in `after`.
fn expect_unchanged(row: &mut Row, before: &Snapshot, after: &Snapshot) {
    for ((name, old), (_, new)) in before.resources.iter().zip(&after.resources) {
        row.check(old == new, || format!("the {name} changed, read through node 3:\nbefore: {old}\nafter: {new}"));
    }
    row.check(before.issued_total == after.issued_total, || {
        format!("the ledger went from {} to {} certificates", before.issued_total, after.issued_total)
    });
}

/// POST-as-GET of `url`, which must succeed.
async fn read(session: &mut Session, url: &str) -> Value {
    let reply = session.post(url, None).await.unwrap_or_else(|error| panic!("POST-as-GET {url}: {error}"));
    assert_eq!(reply.status.as_u16(), 200, "POST-as-GET {url}: {}", describe_reply(&reply));
    reply.json()
}

/// Sends `body` as given and records the request for failure messages.
async fn send(session: &mut Session, url: &str, body: Vec<u8>, content_type: &str, nonce: Option<&str>) -> Exchange {
    let request = describe_request(url, content_type, &body);
    let reply = session
        .post_raw(url, body, content_type)
        .await
        .unwrap_or_else(|error| panic!("{request}\nfailed below ACME: {error}"));
    Exchange { request, sent_nonce: nonce.map(str::to_owned), reply }
}

/// Signs `payload` (None: POST-as-GET) for `url` with the session's key and account, with a
/// fresh nonce, and sends it once.
async fn send_signed(session: &mut Session, url: &str, payload: Option<&Value>) -> Exchange {
    let nonce = session.nonce().await.unwrap_or_else(|error| panic!("get a nonce: {error}"));
    let body = session.key.sign(url, Some(&nonce), session.account_url.as_deref(), payload);
    send(session, url, body, JOSE_JSON, Some(&nonce)).await
}

fn order_payload(names: &[&str]) -> Value {
    let identifiers: Vec<Identifier> = names.iter().map(|name| Identifier::dns(*name)).collect();
    json!({ "identifiers": identifiers })
}

/// Makes a DER CSR for `names` with an empty subject, so that the names are only in the SAN
/// extension. rcgen's default subject has a common name, which would be one more name.
fn csr_der(key: &rcgen::KeyPair, names: &[&str]) -> Vec<u8> {
    let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
    let mut params = rcgen::CertificateParams::new(names).expect("test names are valid DNS names");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.serialize_request(key).expect("sign the CSR").der().to_vec()
}

fn p256_key() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate a P-256 key")
}

fn describe_reply(reply: &Reply) -> String {
    format!(
        "HTTP {} Content-Type: {:?} Replay-Nonce: {:?} Location: {:?} Allow: {:?}\n  body: {}",
        reply.status.as_u16(),
        reply.header("content-type"),
        reply.nonce(),
        reply.location(),
        reply.header("allow"),
        shorten(&String::from_utf8_lossy(&reply.body))
    )
}

/// Shows a JWS body with its protected header and payload decoded.
fn describe_request(url: &str, content_type: &str, body: &[u8]) -> String {
    let summary = match serde_json::from_slice::<Value>(body) {
        Ok(jws) => {
            let decode = |member: &str| {
                let text = jws[member].as_str().unwrap_or_default();
                match b64::decode(member, text) {
                    Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                    Err(_) => format!("{text:?} (not base64url)"),
                }
            };
            format!("protected {} payload {}", decode("protected"), decode("payload"))
        }
        Err(_) => format!("{} bytes that are not JSON", body.len()),
    };
    format!("POST {url} Content-Type: {content_type} ({} bytes)\n  {}", body.len(), shorten(&summary))
}

fn shorten(text: &str) -> String {
    let count = text.chars().count();
    if count <= SHOWN_CHARS {
        return text.to_owned();
    }
    format!("{}... ({count} characters)", text.chars().take(SHOWN_CHARS).collect::<String>())
}

/// Returns the RFC 9773 certificate id: the authority key identifier and the serial number, each
/// in base64url, joined by a dot.
fn ari_certificate_id(leaf_der: &[u8]) -> String {
    let (_, certificate) = X509Certificate::from_der(leaf_der).expect("the issued certificate parses");
    let key_identifier = certificate
        .extensions()
        .iter()
        .find_map(|extension| match extension.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref().map(|id| id.0.to_vec()),
            _ => None,
        })
        .expect("the issued certificate has an authority key identifier");
    format!("{}.{}", b64::encode(&key_identifier), b64::encode(certificate.raw_serial()))
}

/// Lower-case hex of the certificate's serial number without leading zero bytes.
fn serial_hex(leaf_der: &[u8]) -> String {
    let (_, certificate) = X509Certificate::from_der(leaf_der).expect("the issued certificate parses");
    let serial = certificate.raw_serial();
    let first = serial.iter().position(|byte| *byte != 0).unwrap_or(serial.len());
    hex::encode(&serial[first..])
}

/// Runs `openssl verify` on the first certificate of `chain_pem` with the rest as untrusted
/// intermediates and `bundle` as the trusted roots.
fn verify_with_openssl(chain_pem: &str, bundle: &Path) -> Result<(), String> {
    let blocks: Vec<String> = chain_pem
        .split_inclusive("-----END CERTIFICATE-----")
        .filter(|block| block.contains("-----BEGIN CERTIFICATE-----"))
        .map(|block| format!("{}\n", block.trim_start()))
        .collect();
    let Some((leaf, intermediates)) = blocks.split_first() else {
        return Err(format!("the chain has no certificate: {chain_pem:?}"));
    };

    let folder = tempfile::tempdir().map_err(|error| format!("create a temporary folder: {error}"))?;
    let leaf_path = folder.path().join("leaf.pem");
    let intermediates_path = folder.path().join("intermediates.pem");
    std::fs::write(&leaf_path, leaf).map_err(|error| format!("write leaf.pem: {error}"))?;
    std::fs::write(&intermediates_path, intermediates.concat())
        .map_err(|error| format!("write intermediates.pem: {error}"))?;

    let mut command = Command::new("openssl");
    command.arg("verify").arg("-CAfile").arg(bundle);
    if !intermediates.is_empty() {
        command.arg("-untrusted").arg(&intermediates_path);
    }
    let output =
        command.arg(&leaf_path).stdin(Stdio::null()).output().map_err(|error| format!("run openssl: {error}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "openssl verify failed with {}: {}{}\nchain:\n{chain_pem}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

// ---------------------------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------------------------

/// Sends the same signed body twice to node 1, then the same nonce in a body signed for node 2.
/// A nonce is accepted at most once across the cluster (RFC 8555, section 6.5).
async fn replayed_nonce(context: &Context) -> Row {
    let mut row = Row::new("replayed nonce");
    let mut session = context.session(1, &context.alice).await;
    let url = context.on_node(&context.alice.url, 1);
    let nonce = session.nonce().await.expect("nonce from node 1");
    let payload = json!({"contact": ["mailto:replay@example.org"]});
    let body = session.key.sign(&url, Some(&nonce), session.account_url.as_deref(), Some(&payload));
    let first = send(&mut session, &url, body.clone(), JOSE_JSON, Some(&nonce)).await;
    row.check(first.reply.status.as_u16() == 200, || {
        format!("the first use of the nonce was rejected\n{}", first.describe())
    });

    let before = context.snapshot().await;
    let replay = send(&mut session, &url, body, JOSE_JSON, Some(&nonce)).await;
    expect_problem(&mut row, "replay on node 1", &replay, 400, ProblemType::BadNonce, &[&nonce]);

    // A different body with the same nonce, signed for node 2's URL: it would change the contact.
    let mut elsewhere = context.session(2, &context.alice).await;
    let url_on_2 = context.on_node(&context.alice.url, 2);
    let changed = json!({"contact": ["mailto:replayed-elsewhere@example.org"]});
    let body = elsewhere.key.sign(&url_on_2, Some(&nonce), elsewhere.account_url.as_deref(), Some(&changed));
    let replay = send(&mut elsewhere, &url_on_2, body, JOSE_JSON, Some(&nonce)).await;
    expect_problem(&mut row, "replay on node 2", &replay, 400, ProblemType::BadNonce, &[&nonce]);
    expect_unchanged(&mut row, &before, &context.snapshot().await);
    row
}

/// Sends a nonce that node 1 issued to node 2, which accepts it once, then to node 3, which
/// rejects it.
async fn nonce_from_another_node(context: &Context) -> Row {
    let mut row = Row::new("nonce from another node");
    let mut issuer = context.connect(1, &context.alice.key).await;
    let nonce = issuer.nonce().await.expect("nonce from node 1");

    let mut session = context.session(2, &context.alice).await;
    let url = context.on_node(&context.alice.url, 2);
    let body = session.key.sign(&url, Some(&nonce), session.account_url.as_deref(), None);
    let accepted = send(&mut session, &url, body, JOSE_JSON, Some(&nonce)).await;
    row.check(accepted.reply.status.as_u16() == 200, || {
        format!("node 2 rejected a nonce that node 1 issued\n{}", accepted.describe())
    });
    expect_fresh_nonce(&mut row, "first use on node 2", &accepted);

    let before = context.snapshot().await;
    let mut third = context.session(3, &context.alice).await;
    let url = context.on_node(&context.alice.url, 3);
    let body = third.key.sign(
        &url,
        Some(&nonce),
        third.account_url.as_deref(),
        Some(&json!({"contact": ["mailto:third@example.org"]})),
    );
    let replay = send(&mut third, &url, body, JOSE_JSON, Some(&nonce)).await;
    expect_problem(&mut row, "replay on node 3", &replay, 400, ProblemType::BadNonce, &[&nonce]);
    expect_unchanged(&mut row, &before, &context.snapshot().await);
    row
}

async fn nonce_never_issued(context: &Context) -> Row {
    let mut row = Row::new("nonce never issued");
    let before = context.snapshot().await;
    let mut session = context.session(2, &context.alice).await;
    let url = session.url("newOrder");
    let nonce = b64::encode(&rand::random::<[u8; 32]>());
    let body = session.key.sign(
        &url,
        Some(&nonce),
        session.account_url.as_deref(),
        Some(&order_payload(&["never.bad-input.test"])),
    );
    let exchange = send(&mut session, &url, body, JOSE_JSON, Some(&nonce)).await;
    expect_problem(&mut row, "invented nonce", &exchange, 400, ProblemType::BadNonce, &[&nonce]);
    expect_unchanged(&mut row, &before, &context.snapshot().await);
    row
}

async fn jwk_and_kid_together(context: &Context) -> Row {
    let mut row = Row::new("jwk and kid together");
    let before = context.snapshot().await;
    let mut session = context.session(1, &context.alice).await;
    let url = session.url("newOrder");
    let nonce = session.nonce().await.expect("nonce");
    let header = json!({
        "alg": "ES256",
        "jwk": context.alice.key.jwk(),
        "kid": session.account_url,
        "nonce": nonce,
        "url": url,
    });
    let payload = b64::encode(order_payload(&["both.bad-input.test"]).to_string().as_bytes());
    let body = context.alice.key.jws(&header, &payload);
    let exchange = send(&mut session, &url, body, JOSE_JSON, Some(&nonce)).await;
    expect_problem(&mut row, "jwk and kid", &exchange, 400, ProblemType::Malformed, &["\"jwk\"", "\"kid\""]);
    expect_unchanged(&mut row, &before, &context.snapshot().await);
    row
}

/// Sends a body signed for node 1's newOrder URL to node 2's (RFC 8555, section 6.4).
async fn mismatched_url(context: &Context) -> Row {
    let mut row = Row::new("mismatched url");
    let before = context.snapshot().await;
    let mut session = context.session(2, &context.alice).await;
    let signed_for = context.url(1, "/acme/new-order");
    let sent_to = context.url(2, "/acme/new-order");
    let nonce = session.nonce().await.expect("nonce");
    let body = session.key.sign(
        &signed_for,
        Some(&nonce),
        session.account_url.as_deref(),
        Some(&order_payload(&["url.bad-input.test"])),
    );
    let exchange = send(&mut session, &sent_to, body, JOSE_JSON, Some(&nonce)).await;
    expect_problem(
        &mut row,
        "url of another node",
        &exchange,
        403,
        ProblemType::Unauthorized,
        &[&signed_for, &sent_to],
    );
    expect_unchanged(&mut row, &before, &context.snapshot().await);
    row
}

/// HS256 and "none" on the outer JWS. RFC 8555, section 6.2: the problem document "MUST include
/// an "algorithms" field with an array of supported "alg" values".
async fn unsupported_alg(context: &Context) -> Row {
    let mut row = Row::new("unsupported alg");
    let before = context.snapshot().await;
    let mut session = context.session(3, &context.alice).await;
    let url = session.url("newOrder");
    let payload = b64::encode(order_payload(&["alg.bad-input.test"]).to_string().as_bytes());

    let nonce = session.nonce().await.expect("nonce");
    let header = json!({"alg": "HS256", "kid": session.account_url, "nonce": nonce, "url": url});
    let protected = b64::encode(header.to_string().as_bytes());
    let mac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &rand::random::<[u8; 32]>());
    let tag = ring::hmac::sign(&mac_key, format!("{protected}.{payload}").as_bytes());
    let body = json!({"protected": protected, "payload": payload, "signature": b64::encode(tag.as_ref())});
    let hs256 = send(&mut session, &url, body.to_string().into_bytes(), JOSE_JSON, Some(&nonce)).await;
    expect_problem(&mut row, "HS256", &hs256, 400, ProblemType::BadSignatureAlgorithm, &["HS256"]);
    expect_algorithms_member(&mut row, "HS256", &hs256);

    let nonce = session.nonce().await.expect("nonce");
    let header = json!({"alg": "none", "kid": session.account_url, "nonce": nonce, "url": url});
    let body = json!({"protected": b64::encode(header.to_string().as_bytes()), "payload": payload, "signature": ""});
    let none = send(&mut session, &url, body.to_string().into_bytes(), JOSE_JSON, Some(&nonce)).await;
    expect_problem(&mut row, "none", &none, 400, ProblemType::BadSignatureAlgorithm, &["\"none\""]);
    expect_algorithms_member(&mut row, "none", &none);
    expect_unchanged(&mut row, &before, &context.snapshot().await);
    row
}

fn expect_algorithms_member(row: &mut Row, step: &str, exchange: &Exchange) {
    let document = exchange.reply.json();
    let listed: Vec<&str> = document["algorithms"]
        .as_array()
        .map(|algorithms| algorithms.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    row.check(listed.contains(&"ES256"), || {
        format!(
            "{step}: the badSignatureAlgorithm document has no \"algorithms\" array listing ES256 (RFC 8555, section 6.2)\n{}",
            exchange.describe()
        )
    });
}

async fn body_over_size_limit(context: &Context) -> Row {
    let mut row = Row::new("body over size limit");
    let before = context.snapshot().await;
    let mut session = context.session(1, &context.alice).await;
    let url = session.url("newOrder");
    let mut payload = order_payload(&["large.bad-input.test"]);
    payload["padding"] = "a".repeat(MAX_BODY_BYTES).into();
    let nonce = session.nonce().await.expect("nonce");
    let body = session.key.sign(&url, Some(&nonce), session.account_url.as_deref(), Some(&payload));
    assert!(body.len() > MAX_BODY_BYTES, "the large body is only {} bytes", body.len());
    let exchange = send(&mut session, &url, body, JOSE_JSON, Some(&nonce)).await;
    expect_problem(&mut row, "large body", &exchange, 413, ProblemType::Malformed, &[&MAX_BODY_BYTES.to_string()]);
    expect_unchanged(&mut row, &before, &context.snapshot().await);
    row
}

/// Sends a payload in base64url with `=` padding, signed as sent, so that only the padding is
/// wrong.
async fn padded_base64url(context: &Context) -> Row {
    let mut row = Row::new("padded base64url");
    let before = context.snapshot().await;
    let mut session = context.session(2, &context.alice).await;
    let url = session.url("newOrder");
    let nonce = session.nonce().await.expect("nonce");
    let mut json = order_payload(&["padded.bad-input.test"]).to_string();
    if json.len().is_multiple_of(3) {
        // Padding appears only when the length is not a multiple of 3.
        json.push(' ');
    }
    let unpadded = b64::encode(json.as_bytes());
    let padded = format!("{unpadded}{}", "=".repeat((4 - unpadded.len() % 4) % 4));
    let header = json!({"alg": "ES256", "kid": session.account_url, "nonce": nonce, "url": url});
    let body = context.alice.key.jws(&header, &padded);
    let exchange = send(&mut session, &url, body, JOSE_JSON, Some(&nonce)).await;
    let quoted: String = padded.chars().take(64).collect();
    expect_problem(
        &mut row,
        "padded payload",
        &exchange,
        400,
        ProblemType::Malformed,
        &["\"payload\"", "padding", &quoted],
    );
    expect_unchanged(&mut row, &before, &context.snapshot().await);
    row
}

/// RFC 8555, section 6.2: a body without Content-Type application/jose+json gets 415.
async fn wrong_content_type(context: &Context) -> Row {
    let mut row = Row::new("wrong Content-Type");
    let before = context.snapshot().await;
    let mut session = context.session(3, &context.alice).await;
    let url = session.url("newOrder");
    let nonce = session.nonce().await.expect("nonce");
    let body = session.key.sign(
        &url,
        Some(&nonce),
        session.account_url.as_deref(),
        Some(&order_payload(&["type.bad-input.test"])),
    );
    let exchange = send(&mut session, &url, body, "application/json", Some(&nonce)).await;
    expect_problem(&mut row, "application/json", &exchange, 415, ProblemType::Malformed, &["application/json"]);
    expect_unchanged(&mut row, &before, &context.snapshot().await);
    row
}

async fn finalize_before_ready(context: &Context) -> Row {
    let mut row = Row::new("finalize before ready");
    let before = context.snapshot().await;
    let mut session = context.session(2, &context.alice).await;
    let order_url = context.on_node(&context.pending_order, 2);
    let csr = csr_der(&p256_key(), &[PENDING_NAME]);
    let exchange =
        send_signed(&mut session, &format!("{order_url}/finalize"), Some(&json!({"csr": b64::encode(&csr)}))).await;
    expect_problem(&mut row, "pending order", &exchange, 403, ProblemType::OrderNotReady, &[&order_url, "pending"]);
    expect_unchanged(&mut row, &before, &context.snapshot().await);
    row
}

/// Sends a finalize of the ready order with `csr` through `node` and checks the badCSR response.
async fn finalize_with_bad_csr(context: &Context, row: &mut Row, node: u64, csr: &[u8], needles: &[&str]) {
    let before = context.snapshot().await;
    let mut session = context.session(node, &context.alice).await;
    let url = format!("{}/finalize", context.on_node(&context.ready_order, node));
    let exchange = send_signed(&mut session, &url, Some(&json!({"csr": b64::encode(csr)}))).await;
    let step = row.name;
    expect_problem(row, step, &exchange, 400, ProblemType::BadCsr, needles);
    expect_unchanged(row, &before, &context.snapshot().await);
}

/// Finalizes with a CSR cut in half, so that its DER does not parse.
async fn malformed_csr(context: &Context) -> Row {
    let mut row = Row::new("malformed CSR");
    let csr = csr_der(&p256_key(), &READY_NAMES);
    finalize_with_bad_csr(context, &mut row, 1, &csr[..csr.len() / 2], &["PKCS#10"]).await;
    row
}

async fn csr_with_extra_name(context: &Context) -> Row {
    let mut row = Row::new("CSR with an extra name");
    let extra = "three.bad-input.test";
    let csr = csr_der(&p256_key(), &[READY_NAMES[0], READY_NAMES[1], extra]);
    finalize_with_bad_csr(context, &mut row, 2, &csr, &[extra]).await;
    row
}

async fn csr_missing_name(context: &Context) -> Row {
    let mut row = Row::new("CSR missing a name");
    let csr = csr_der(&p256_key(), &[READY_NAMES[0]]);
    finalize_with_bad_csr(context, &mut row, 3, &csr, &[READY_NAMES[1]]).await;
    row
}

async fn csr_with_account_key(context: &Context) -> Row {
    let mut row = Row::new("CSR with the account key");
    let csr = csr_der(&context.alice.key.rcgen_key(), &READY_NAMES);
    finalize_with_bad_csr(context, &mut row, 1, &csr, &["account key"]).await;
    row
}

/// Two finalize requests for the ready order at the same time through nodes 1 and 2: exactly one
/// certificate is issued, and the other request gets orderNotReady.
async fn finalize_twice_at_once(context: &mut Context) -> Row {
    let mut row = Row::new("finalize twice at once");
    let issued_before = context.issued_total().await;
    let mut first = context.session(1, &context.alice).await;
    let mut second = context.session(2, &context.alice).await;
    let keys = [p256_key(), p256_key()];
    let order_urls = [context.on_node(&context.ready_order, 1), context.on_node(&context.ready_order, 2)];
    let finalize_urls = order_urls.clone().map(|url| format!("{url}/finalize"));
    let nonces = [first.nonce().await.expect("nonce"), second.nonce().await.expect("nonce")];
    let bodies: Vec<Vec<u8>> = [&first, &second]
        .iter()
        .zip(&keys)
        .zip(&finalize_urls)
        .zip(&nonces)
        .map(|(((session, key), url), nonce)| {
            let payload = json!({"csr": b64::encode(&csr_der(key, &READY_NAMES))});
            session.key.sign(url, Some(nonce), session.account_url.as_deref(), Some(&payload))
        })
        .collect();
    let (one, two) = tokio::join!(
        send(&mut first, &finalize_urls[0], bodies[0].clone(), JOSE_JSON, Some(&nonces[0])),
        send(&mut second, &finalize_urls[1], bodies[1].clone(), JOSE_JSON, Some(&nonces[1])),
    );
    let exchanges = [one, two];

    let winners: Vec<usize> = (0..2).filter(|index| exchanges[*index].reply.status.as_u16() == 200).collect();
    row.check(winners.len() == 1, || {
        format!(
            "expected exactly one finalize to succeed, {} did\nthrough node 1:\n{}\nthrough node 2:\n{}",
            winners.len(),
            exchanges[0].describe(),
            exchanges[1].describe()
        )
    });
    let [winner] = winners[..] else {
        return row;
    };
    let loser = 1 - winner;
    expect_fresh_nonce(&mut row, "the finalize that won", &exchanges[winner]);
    expect_problem(
        &mut row,
        "the finalize that lost",
        &exchanges[loser],
        403,
        ProblemType::OrderNotReady,
        &[&order_urls[loser]],
    );

    let issued_after = context.issued_total().await;
    row.check(issued_after == issued_before + 1, || {
        format!("the ledger went from {issued_before} to {issued_after} certificates; expected one more")
    });
    let mut reader = context.session(3, &context.alice).await;
    let order = read(&mut reader, &context.on_node(&context.ready_order, 3)).await;
    row.check(order["status"] == "valid", || format!("the order is not valid after finalize: {order}"));
    let Some(certificate_url) = order["certificate"].as_str() else {
        row.check(false, || format!("the valid order has no certificate URL: {order}"));
        return row;
    };
    let download = reader.post(certificate_url, None).await.expect("download the certificate");
    row.check(download.status.as_u16() == 200, || {
        format!("certificate download failed: {}", describe_reply(&download))
    });
    let chain_pem = String::from_utf8_lossy(&download.body).into_owned();
    let chain = sigil_acme::session::pem_certificates(chain_pem.as_bytes());
    let Some(leaf_der) = chain.first().cloned() else {
        row.check(false, || format!("the certificate download has no certificate: {}", describe_reply(&download)));
        return row;
    };
    let (_, leaf) = X509Certificate::from_der(&leaf_der).expect("the issued certificate parses");
    row.check(leaf.public_key().subject_public_key.data.as_ref() == keys[winner].public_key_raw(), || {
        "the certificate's key is not the key of the CSR whose finalize succeeded".to_owned()
    });
    if let Err(error) = verify_with_openssl(&chain_pem, &context.cluster.dir.join("bundle.pem")) {
        row.check(false, || error);
    }
    context.issued = Some(IssuedCertificate { leaf_der });
    row
}

/// RFC 8555, section 7.3.6: "Once an account is deactivated, the server MUST NOT accept further
/// requests authorized by that account's key."
async fn deactivated_account(context: &Context) -> Row {
    let mut row = Row::new("deactivated account");
    let account = context.create_account(1, "deactivated").await;
    let mut session = context.session(2, &account).await;
    let url_on_2 = context.on_node(&account.url, 2);
    let deactivation = send_signed(&mut session, &url_on_2, Some(&json!({"status": "deactivated"}))).await;
    row.check(
        deactivation.reply.status.as_u16() == 200 && deactivation.reply.json()["status"] == "deactivated",
        || format!("deactivation failed\n{}", deactivation.describe()),
    );
    let issued_before = context.issued_total().await;

    let mut third = context.session(3, &account).await;
    let url_on_3 = context.on_node(&account.url, 3);
    let new_order = third.url("newOrder");
    let order = send_signed(&mut third, &new_order, Some(&order_payload(&["deactivated.bad-input.test"]))).await;
    expect_problem(&mut row, "newOrder", &order, 403, ProblemType::Unauthorized, &[&url_on_3, "deactivated"]);

    let mut first = context.session(1, &account).await;
    let url_on_1 = context.on_node(&account.url, 1);
    let reactivation = send_signed(&mut first, &url_on_1, Some(&json!({"status": "valid"}))).await;
    expect_problem(
        &mut row,
        "reactivation",
        &reactivation,
        403,
        ProblemType::Unauthorized,
        &[&url_on_1, "deactivated"],
    );

    // newAccount signed with the deactivated account's key, as `jwk`.
    let mut by_key = context.connect(2, &account.key).await;
    let new_account = by_key.url("newAccount");
    let lookup = send_signed(&mut by_key, &new_account, Some(&json!({"onlyReturnExisting": true}))).await;
    expect_problem(
        &mut row,
        "newAccount with the deactivated key",
        &lookup,
        403,
        ProblemType::Unauthorized,
        &["deactivated"],
    );
    let status = lookup.reply.json()["status"].clone();
    row.check(lookup.reply.status.as_u16() != 200 || status == "deactivated", || {
        format!("the deactivated account reads as {status} through newAccount\n{}", lookup.describe())
    });

    let issued_after = context.issued_total().await;
    row.check(issued_after == issued_before, || {
        format!("the ledger went from {issued_before} to {issued_after} certificates")
    });
    row
}

async fn challenge_of_another_account(context: &Context) -> Row {
    let mut row = Row::new("challenge of another account");
    let before = context.snapshot().await;
    let authz = &before.resources.iter().find(|(name, _)| *name == "pending authorization").expect("snapshot has it").1;
    let challenge_url = authz["challenges"]
        .as_array()
        .and_then(|challenges| challenges.iter().find(|challenge| challenge["type"] == "http-01"))
        .and_then(|challenge| challenge["url"].as_str())
        .unwrap_or_else(|| panic!("the pending authorization has no http-01 challenge: {authz}"));
    let challenge_url = context.on_node(challenge_url, 2);
    let mut session = context.session(2, &context.bob).await;
    let exchange = send_signed(&mut session, &challenge_url, Some(&json!({}))).await;
    let authz_url = context.on_node(&context.pending_authz, 2);
    expect_problem(
        &mut row,
        "Bob responds to Alice's challenge",
        &exchange,
        403,
        ProblemType::Unauthorized,
        &[&authz_url],
    );
    expect_unchanged(&mut row, &before, &context.snapshot().await);
    row
}

/// Rolls Alice's account over to Bob's key. RFC 8555, section 7.3.5: the server SHOULD respond
/// with 409 and the URL of the account that has the key in Location.
async fn rollover_to_key_in_use(context: &Context) -> Row {
    let mut row = Row::new("key rollover to a key in use");
    let before = context.snapshot().await;
    let mut bob_reader = context.session(3, &context.bob).await;
    let bob_on_3 = context.on_node(&context.bob.url, 3);
    let bob_before = read(&mut bob_reader, &bob_on_3).await;

    let mut session = context.session(1, &context.alice).await;
    let key_change = session.url("keyChange");
    let alice_on_1 = context.on_node(&context.alice.url, 1);
    let inner = session.key.sign_key_change(&context.bob.key.account_key(), &alice_on_1, &key_change);
    let exchange = send_signed(&mut session, &key_change, Some(&inner)).await;
    let bob_on_1 = context.on_node(&context.bob.url, 1);
    expect_problem(&mut row, "keyChange to Bob's key", &exchange, 409, ProblemType::Malformed, &[&bob_on_1]);
    row.check(exchange.reply.location().as_deref() == Some(bob_on_1.as_str()), || {
        format!("Location is not Bob's account URL {bob_on_1}\n{}", exchange.describe())
    });

    expect_unchanged(&mut row, &before, &context.snapshot().await);
    let bob_after = read(&mut bob_reader, &bob_on_3).await;
    row.check(bob_before == bob_after, || format!("Bob's account changed:\nbefore: {bob_before}\nafter: {bob_after}"));
    row
}

/// Bob (by account) and a key with no account (by `jwk`) try to revoke Alice's certificate.
async fn revocation_by_stranger(context: &Context) -> Row {
    let mut row = Row::new("revocation by a stranger");
    let Some(issued) = &context.issued else {
        row.check(false, || "no certificate to revoke, because the concurrent finalize row issued none".to_owned());
        return row;
    };
    let serial = serial_hex(&issued.leaf_der);
    let payload = json!({"certificate": b64::encode(&issued.leaf_der), "reason": 1});
    let before = context.snapshot().await;

    let mut bob = context.session(2, &context.bob).await;
    let revoke_url = bob.url("revokeCert");
    let exchange = send_signed(&mut bob, &revoke_url, Some(&payload)).await;
    expect_problem(&mut row, "Bob by account", &exchange, 403, ProblemType::Unauthorized, &[&serial]);

    let mut stranger = context.connect(3, &TestKey::generate()).await;
    let revoke_url = stranger.url("revokeCert");
    let exchange = send_signed(&mut stranger, &revoke_url, Some(&payload)).await;
    expect_problem(&mut row, "unrelated key as jwk", &exchange, 403, ProblemType::Unauthorized, &[&serial]);

    expect_unchanged(&mut row, &before, &context.snapshot().await);
    let (start, _) = context.renewal_window(1, &issued.leaf_der).await;
    row.check(start > time::OffsetDateTime::now_utc(), || {
        format!("the renewal window starts at {start}, as for a revoked certificate")
    });
    row
}

/// External account binding with a MAC from the wrong key and with a key id the CA never issued.
/// The dev directory does not require a binding, but checks one that is sent.
async fn eab_wrong_mac_or_unknown_key(context: &Context) -> Row {
    let mut row = Row::new("EAB with wrong MAC or unknown key id");
    let created = context.eab_command(&["add", "--label", "bad-input"]);
    let field = |name: &str| {
        created
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.trim().to_owned())
            .unwrap_or_else(|| panic!("sigil acme eab add printed no {name:?} line: {created}"))
    };
    let key_id = field("key_id:");
    let hmac_key = b64::decode("hmac_key", &field("hmac_key:")).expect("the MAC key is base64url");
    let key = TestKey::generate();

    let mut session = context.connect(1, &key).await;
    let url = session.url("newAccount");
    let wrong_mac = AccountKey::eab(&rand::random::<[u8; 32]>(), &key_id, Algorithm::Hs256, &session.key, &url);
    let payload = json!({"termsOfServiceAgreed": true, "externalAccountBinding": wrong_mac});
    let exchange = send_signed(&mut session, &url, Some(&payload)).await;
    expect_problem(&mut row, "wrong MAC", &exchange, 403, ProblemType::Unauthorized, &[&key_id]);

    let mut session = context.connect(2, &key).await;
    let url = session.url("newAccount");
    let unknown_id = format!("kid-{}", hex::encode(rand::random::<[u8; 12]>()));
    let unknown = AccountKey::eab(&hmac_key, &unknown_id, Algorithm::Hs256, &session.key, &url);
    let payload = json!({"termsOfServiceAgreed": true, "externalAccountBinding": unknown});
    let exchange = send_signed(&mut session, &url, Some(&payload)).await;
    expect_problem(&mut row, "unknown key id", &exchange, 403, ProblemType::Unauthorized, &[&unknown_id]);

    let mut reader = context.connect(3, &key).await;
    let new_account = reader.url("newAccount");
    let lookup = send_signed(&mut reader, &new_account, Some(&json!({"onlyReturnExisting": true}))).await;
    expect_problem(
        &mut row,
        "account after the rejected bindings",
        &lookup,
        400,
        ProblemType::AccountDoesNotExist,
        &[&key.account_key().thumbprint()],
    );
    let binding = context.eab_binding(&key_id);
    row.check(binding.is_empty(), || format!("key id {key_id} is bound to {binding:?} after a rejected binding"));

    // The same key with the right MAC is accepted, so the rejections above were about the MAC and
    // the key id.
    let mut session = context.connect(3, &key).await;
    let url = session.url("newAccount");
    let binding_jws = AccountKey::eab(&hmac_key, &key_id, Algorithm::Hs256, &session.key, &url);
    let payload = json!({"termsOfServiceAgreed": true, "externalAccountBinding": binding_jws});
    let exchange = send_signed(&mut session, &url, Some(&payload)).await;
    row.check(exchange.reply.status.as_u16() == 201, || format!("the right MAC was rejected\n{}", exchange.describe()));
    let binding = context.eab_binding(&key_id);
    row.check(!binding.is_empty(), || format!("key id {key_id} is unused after an accepted binding"));
    row
}

/// RFC 8555, section 6.3: resources other than the directory and newNonce accept only POST.
async fn get_on_post_only_resource(context: &Context) -> Row {
    let mut row = Row::new("GET on a POST-only resource");
    let before = context.snapshot().await;
    let mut session = context.connect(2, &TestKey::generate()).await;
    for path in ["/acme/new-order", "/acme/new-account", "/acme/revoke-cert"] {
        let url = context.url(2, path);
        let reply = session.request(Method::GET, &url, None).await.unwrap_or_else(|error| panic!("GET {url}: {error}"));
        let exchange = Exchange { request: format!("GET {url}"), sent_nonce: None, reply };
        expect_problem(&mut row, &format!("GET {path}"), &exchange, 405, ProblemType::Malformed, &[path]);
        let allow = exchange.reply.header("allow").unwrap_or_default();
        row.check(allow.contains("POST"), || {
            format!("GET {path}: the 405 response has no Allow: POST\n{}", exchange.describe())
        });
    }
    let order_url = context.on_node(&context.pending_order, 3);
    let mut reader = context.connect(3, &TestKey::generate()).await;
    let reply =
        reader.request(Method::GET, &order_url, None).await.unwrap_or_else(|error| panic!("GET {order_url}: {error}"));
    let exchange = Exchange { request: format!("GET {order_url}"), sent_nonce: None, reply };
    expect_problem(&mut row, "GET of an order", &exchange, 405, ProblemType::Malformed, &["/acme/order/"]);
    row.check(!String::from_utf8_lossy(&exchange.reply.body).contains("authorizations"), || {
        format!("a GET without a signature returned the order\n{}", exchange.describe())
    });
    expect_unchanged(&mut row, &before, &context.snapshot().await);
    row
}

async fn unknown_order(context: &Context) -> Row {
    let mut row = Row::new("POST-as-GET of an unknown order");
    let before = context.snapshot().await;
    let mut session = context.session(3, &context.alice).await;
    let url = context.url(3, &format!("/acme/order/{}", hex::encode(rand::random::<[u8; 14]>())));
    let exchange = send_signed(&mut session, &url, None).await;
    expect_problem(&mut row, "unknown order", &exchange, 404, ProblemType::Malformed, &[&url]);
    expect_unchanged(&mut row, &before, &context.snapshot().await);
    row
}

/// Restarts node 1 with a limit of one order per account and hour. Alice created orders this hour
/// already, so her next newOrder there is rejected with rateLimited and Retry-After, and creates
/// nothing; node 2 keeps the default limit.
async fn order_over_rate_limit(context: &mut Context) -> Row {
    let mut row = Row::new("newOrder over the per-account rate limit");
    context.cluster.kill_node(1).await;
    context.cluster.set_options(1, "acme", &[("orders_per_account_per_hour", toml::Value::Integer(1))]);
    context.cluster.serve_node(1);
    context.cluster.wait_ready(1, Duration::from_secs(60)).await;

    let before = context.snapshot().await;
    let mut session = context.session(1, &context.alice).await;
    let url = session.url("newOrder");
    let exchange = send_signed(&mut session, &url, Some(&order_payload(&["limited.example.org"]))).await;
    let account = context.on_node(&context.alice.url, 1);
    expect_problem(&mut row, "over the limit", &exchange, 429, ProblemType::RateLimited, &[&account, "the limit is 1"]);
    let retry_after = exchange.reply.header("retry-after").and_then(|value| value.parse::<u64>().ok());
    row.check(retry_after.is_some_and(|seconds| (1..=3600).contains(&seconds)), || {
        format!(
            "Retry-After should be 1 to 3600 seconds, until the next hour: {retry_after:?}\n{}",
            exchange.describe()
        )
    });
    expect_unchanged(&mut row, &before, &context.snapshot().await);

    let mut other_node = context.session(2, &context.alice).await;
    let url = other_node.url("newOrder");
    let allowed = send_signed(&mut other_node, &url, Some(&order_payload(&["unlimited.example.org"]))).await;
    row.check(allowed.reply.status.as_u16() == 201, || {
        format!("node 2 has the default limit, so the order should be created: {}", allowed.describe())
    });
    row
}
