//! The acme-lib 0.9 client (blocking, ureq 2 and OpenSSL) against a 3-node `sigil dev` cluster:
//! account, an order for two names, http-01, finalize, download and revocation by the account.
//! Then, with sigil-acme's own client, what acme-lib cannot do: key rollover (RFC 8555, section
//! 7.3.5) and revocation signed with the certificate's key (section 7.6).
//!
//! acme-lib sends its requests through ureq's default agent. With the `native-certs` feature that
//! Cargo.toml enables, that agent trusts only the roots that rustls-native-certs loads, and that
//! crate reads `SSL_CERT_FILE`. Tests must not set environment variables in their own process.
//! So `acme_lib_flows` runs this test binary again as a child process, filtered to the ignored
//! test `acme_lib_child`. The child gets `SSL_CERT_FILE` naming the cluster's bundle.pem and
//! `SIGIL_ACME_LIB_CHILD_DIR` naming a folder that contains its input and output.

#[path = "common/cluster.rs"]
#[allow(dead_code, reason = "this test uses only part of the cluster harness")]
mod cluster_harness;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use acme_lib::persist::{MemoryPersist, Persist, PersistKey, PersistKind};
use acme_lib::{Account, Certificate, Directory, DirectoryUrl, RevocationReason, create_p256_key};
use axum::http::Method;
use cluster_harness::{CLUSTER_TESTS, DevCluster, tail_text};
use serde_json::{Value, json};
use sigil_acme::b64;
use sigil_acme::client::AccountKey;
use sigil_acme::jwk::Algorithm;
use sigil_acme::session::{Http01Responder, Reply, Session, pem_certificates};
use sigil_acme::{Identifier, ProblemType};
use x509_parser::prelude::{
    CertificateRevocationList, DistributionPointName, FromDer, GeneralName, ParsedExtension, X509Certificate,
};

/// The environment variable that marks the child process and names its folder.
const CHILD_DIR_VARIABLE: &str = "SIGIL_ACME_LIB_CHILD_DIR";
/// The name of the test that the child process runs.
const CHILD_TEST: &str = "acme_lib_child";
/// Time the child may take for the whole acme-lib flow. acme-lib's own polling loops have no
/// limit, so the parent kills the child after this.
const CHILD_TIMEOUT: Duration = Duration::from_secs(180);
/// The address `sigil dev` validates http-01 challenges on.
const HTTP01_ADDRESS: &str = "127.0.0.1:5002";
/// Time to wait for another process, such as another ACME test, to release `HTTP01_ADDRESS`.
const HTTP01_PORT_WAIT: Duration = Duration::from_secs(300);
/// acme-lib's persistence realm for the account.
const REALM: &str = "sigil-acme-lib-test";
/// The names of the acme-lib order.
const ACME_LIB_NAMES: [&str; 2] = ["one.acme-lib.test", "two.acme-lib.test"];
const ROLLOVER_NAME: &str = "rollover.acme-lib.test";
/// RFC 5280 reason code keyCompromise, which the revocation with the certificate's key gives.
const KEY_COMPROMISE: u8 = 1;
/// Delay between acme-lib's polls of a challenge or order, in milliseconds.
const POLL_MILLIS: u64 = 100;
/// Rounds of challenge responses after which the acme-lib order must be ready.
const ORDER_ROUNDS: usize = 10;
/// Attempts of one acme-lib step whose only failures were short ECDSA signatures.
const SIGNATURE_ATTEMPTS: u32 = 4;
/// Attempts at generating a P-256 key whose coordinates have no leading zero byte.
const KEY_ATTEMPTS: usize = 100;
/// Time a revocation committed through one node may take to be applied on another.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a node may serve a CRL signed before a revocation. The node signs a new CRL at most
/// once a minute (`CRL_REFRESH` in src/publication.rs).
const CRL_TIMEOUT: Duration = Duration::from_secs(90);
/// Characters of a response that a failure message shows.
const SHOWN_CHARS: usize = 1500;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acme_lib_flows() {
    let _serial = CLUSTER_TESTS.lock().await;
    let started = Instant::now();
    let cluster = DevCluster::start(3, 0).await;
    let nodes = Nodes::read(&cluster);
    let work = tempfile::tempdir().expect("create a temporary folder");
    eprintln!("cluster ready after {:.1} s", started.elapsed().as_secs_f64());

    check_short_signature_detection(&nodes).await;

    // acme-lib in a child process, through node 2.
    let account_key = full_length_p256_key();
    let input = json!({
        "directory": nodes.url(2, "/acme/directory"),
        "names": ACME_LIB_NAMES,
        "account_key_pem": account_key.serialize_pem(),
    });
    let output = run_child(work.path(), &input, &nodes.bundle).await;
    let chain_pem = output["certificate_pem"].as_str().expect("the child wrote the certificate").to_owned();
    let leaf_der = check_certificate(&chain_pem, &nodes.bundle, &ACME_LIB_NAMES);
    assert_eq!(output["revoked"], true, "the child did not report the revocation: {output}");
    eprintln!(
        "acme-lib step done after {:.1} s ({} acme-lib steps run again after a short signature)",
        started.elapsed().as_secs_f64(),
        output["signature_retries"]
    );

    // The revocation by acme-lib's account, read through node 3.
    let mut session = nodes
        .connect(3, AccountKey::from_pkcs8(Algorithm::Es256, &account_key.serialize_der()).expect("load the key"))
        .await;
    let found = session.new_account(&json!({"onlyReturnExisting": true})).await.expect("newAccount");
    assert_eq!(found.status.as_u16(), 200, "acme-lib's account is not found by its key: {}", describe_reply(&found));
    nodes.wait_revoked(3, &leaf_der).await;
    let again = session.post(&session.url("revokeCert"), Some(&revocation(&leaf_der, 4))).await.expect("revokeCert");
    expect_problem(
        "revoke acme-lib's certificate again by account",
        &again,
        400,
        ProblemType::AlreadyRevoked,
        &[&serial_hex(&leaf_der)],
    );

    // Key rollover, then revocation with the certificate's key, with sigil-acme's client. The
    // child has exited, so the port is free again.
    let responder = start_http01_responder().await;
    let (new_key, account_url) = rollover(&nodes).await;
    eprintln!("key rollover done after {:.1} s", started.elapsed().as_secs_f64());
    let (rollover_chain, rollover_leaf) = revoke_with_certificate_key(&nodes, &responder, &new_key, &account_url).await;
    eprintln!("revocation with the certificate key done after {:.1} s", started.elapsed().as_secs_f64());

    // Both certificates in the CRLs that they name, with the reasons that the revocations gave.
    expect_revoked_in_crl(&chain_pem, &leaf_der, &nodes.bundle, RevocationReason::Superseded as u8).await;
    expect_revoked_in_crl(&rollover_chain, &rollover_leaf, &nodes.bundle, KEY_COMPROMISE).await;
    eprintln!("CRL checks done after {:.1} s", started.elapsed().as_secs_f64());
}

/// Runs the acme-lib flow, as the child process of `acme_lib_flows` only.
#[test]
#[ignore = "acme_lib_flows runs this test in a child process with SSL_CERT_FILE set"]
fn acme_lib_child() {
    let Some(work) = std::env::var_os(CHILD_DIR_VARIABLE).map(PathBuf::from) else {
        eprintln!("skipped: {CHILD_DIR_VARIABLE} is not set; acme_lib_flows runs this test in a child process");
        return;
    };
    let input: Value = serde_json::from_slice(&std::fs::read(work.join("input.json")).expect("read input.json"))
        .expect("input.json is JSON");
    let directory_url = input["directory"].as_str().expect("input names the directory");
    let names: Vec<String> = input["names"]
        .as_array()
        .expect("input lists the names")
        .iter()
        .filter_map(|name| name.as_str().map(str::to_owned))
        .collect();
    let account_key_pem = input["account_key_pem"].as_str().expect("input has the account key");

    let runtime = tokio::runtime::Runtime::new().expect("start a runtime for the http-01 responder");
    let responder = runtime.block_on(start_http01_responder());

    // acme-lib reads the account key from its persistence when the realm has one. A key chosen
    // here has coordinates of full length, which acme-lib does not ensure when it makes one.
    let persist = MemoryPersist::new();
    persist
        .put(&PersistKey::new(REALM, PersistKind::AccountPrivateKey, "acme_account"), account_key_pem.as_bytes())
        .expect("store the account key");
    let directory = Directory::from_url(persist, DirectoryUrl::Other(directory_url))
        .unwrap_or_else(|error| panic!("acme-lib read the directory {directory_url}: {error}"));
    let mut retries = 0;
    let contact = vec!["mailto:acme-lib@example.org".to_owned()];
    let account = with_signature_retries("newAccount", &mut retries, || {
        directory.account_with_realm(REALM, Some(contact.clone()))
    });
    eprintln!("acme-lib account: {:?}", account.api_account());

    let certificate = with_signature_retries("order, validation, finalize and download", &mut retries, || {
        order_certificate(&account, &names, &responder)
    });
    let mut output = json!({
        "certificate_pem": certificate.certificate(),
        "signature_retries": retries,
        "revoked": false,
    });
    std::fs::write(work.join("output.json"), output.to_string()).expect("write output.json");

    with_signature_retries("revokeCert", &mut retries, || {
        account.revoke_certificate(&certificate, RevocationReason::Superseded)
    });
    output["revoked"] = true.into();
    output["signature_retries"] = retries.into();
    std::fs::write(work.join("output.json"), output.to_string()).expect("write output.json");
}

/// Creates an order for `names` with acme-lib, responds to every http-01 challenge through
/// `responder`, finalizes with a new P-256 key and downloads the certificate.
fn order_certificate(
    account: &Account<MemoryPersist>,
    names: &[String],
    responder: &Http01Responder,
) -> acme_lib::Result<Certificate> {
    let alt_names: Vec<&str> = names[1..].iter().map(String::as_str).collect();
    let mut order = account.new_order(&names[0], &alt_names)?;
    let mut ready = None;
    for _ in 0..ORDER_ROUNDS {
        if let Some(csr_order) = order.confirm_validations() {
            ready = Some(csr_order);
            break;
        }
        for authorization in order.authorizations()? {
            if !authorization.need_challenge() {
                continue;
            }
            let challenge = authorization.http_challenge();
            responder.insert(challenge.http_token(), &challenge.http_proof());
            challenge.validate(POLL_MILLIS)?;
        }
        order.refresh()?;
    }
    let csr_order = ready.ok_or_else(|| {
        format!("the order for {names:?} is not ready after {ORDER_ROUNDS} rounds: {:?}", order.api_order())
    })?;
    let issued = csr_order.finalize_pkey(create_p256_key(), POLL_MILLIS)?;
    issued.download_and_save_cert()
}

/// Runs one acme-lib step, and runs it again when the server rejected one of its requests only
/// because the ECDSA signature was shorter than 64 bytes.
///
/// acme-lib 0.9.1 encodes r and s with OpenSSL's `BigNum::to_vec`, which drops leading zero
/// bytes, so about one signature in 128 is 62 or 63 bytes long. RFC 7518, section 3.4, requires
/// 64, and the server rejects those requests as malformed without changing anything. A rejected
/// step is safe to repeat: newAccount finds the account, and a new order replaces a half-done one.
fn with_signature_retries<T>(step: &str, retries: &mut u32, mut run: impl FnMut() -> acme_lib::Result<T>) -> T {
    for attempt in 1..=SIGNATURE_ATTEMPTS {
        match run() {
            Ok(value) => return value,
            Err(error) if is_short_signature(&error) && attempt < SIGNATURE_ATTEMPTS => {
                *retries += 1;
                eprintln!("acme-lib {step}: attempt {attempt} sent a short signature ({error}); trying again");
            }
            Err(error) => panic!("acme-lib {step} failed on attempt {attempt}: {error}"),
        }
    }
    unreachable!("the last attempt returns or panics")
}

fn is_short_signature(error: &acme_lib::Error) -> bool {
    match error {
        acme_lib::Error::ApiProblem(problem) => {
            problem._type == ProblemType::Malformed.urn()
                && problem
                    .detail
                    .as_deref()
                    .is_some_and(|detail| detail.contains("signature with this key is 64 bytes, got"))
        }
        _ => false,
    }
}

/// Sends a request with a 63-byte ES256 signature, as acme-lib sometimes does, and checks that
/// `is_short_signature` recognizes the server's rejection of it, so that `with_signature_retries`
/// keeps working if the server's wording changes.
async fn check_short_signature_detection(nodes: &Nodes) {
    let mut session = nodes.connect(1, account_key(&p256_pkcs8())).await;
    let url = session.url("newAccount");
    let nonce = session.nonce().await.expect("get a nonce");
    let body = session.key.sign(&url, Some(&nonce), None, Some(&json!({"termsOfServiceAgreed": true})));
    let mut jws: Value = serde_json::from_slice(&body).expect("a signed body is JSON");
    let signature = b64::decode("signature", jws["signature"].as_str().expect("signature")).expect("base64url");
    jws["signature"] = b64::encode(&signature[1..]).into();

    let reply =
        session.post_raw(&url, jws.to_string().into_bytes(), "application/jose+json").await.expect("newAccount");
    let problem = reply
        .problem()
        .unwrap_or_else(|| panic!("a 63-byte signature was not rejected with a problem: {}", describe_reply(&reply)));
    let error = acme_lib::Error::ApiProblem(acme_lib::api::ApiProblem {
        _type: problem.kind.clone(),
        detail: Some(problem.detail.clone()),
        subproblems: None,
    });
    assert!(
        is_short_signature(&error),
        "is_short_signature does not recognize the rejection of a 63-byte signature: {}",
        describe_reply(&reply)
    );
}

/// Runs `acme_lib_child` in a child process and returns the output.json it wrote.
async fn run_child(work: &Path, input: &Value, bundle: &Path) -> Value {
    std::fs::write(work.join("input.json"), input.to_string()).expect("write input.json");
    let stdout_path = work.join("child.stdout");
    let stderr_path = work.join("child.stderr");
    let mut child = Command::new(std::env::current_exe().expect("path of this test binary"))
        .args([CHILD_TEST, "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
        .env(CHILD_DIR_VARIABLE, work)
        .env("SSL_CERT_FILE", bundle)
        .env_remove("SSL_CERT_DIR")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).expect("create child.stdout"))
        .stderr(std::fs::File::create(&stderr_path).expect("create child.stderr"))
        .spawn()
        .expect("start the child test process");

    let deadline = Instant::now() + CHILD_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child test process") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let log = format!(
        "{}\n{}",
        std::fs::read_to_string(&stdout_path).unwrap_or_default(),
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );
    eprintln!("--- output of the acme-lib child process ---\n{}\n--- end ---", tail_text(&log, 40));

    let status = status.unwrap_or_else(|| panic!("the acme-lib child process did not finish within {CHILD_TIMEOUT:?}"));
    assert!(status.success(), "the acme-lib child process failed with {status}");
    assert!(log.contains("1 passed"), "the child process ran no test; is {CHILD_TEST} still the test's name?");
    let output = std::fs::read(work.join("output.json")).expect("the child wrote output.json");
    serde_json::from_slice(&output).expect("output.json is JSON")
}

/// Creates an account through node 1 and rolls it over to a new key through node 2. Checks that
/// node 3 then rejects the old key and accepts the new one. Returns the new key and the account
/// URL on node 1.
async fn rollover(nodes: &Nodes) -> (Vec<u8>, String) {
    let old_key = p256_pkcs8();
    let new_key = p256_pkcs8();
    let mut creator = nodes.connect(1, account_key(&old_key)).await;
    let created = creator.new_account(&json!({"termsOfServiceAgreed": true})).await.expect("newAccount");
    assert_eq!(created.status.as_u16(), 201, "newAccount: {}", describe_reply(&created));
    let account_url = creator.account_url.clone().expect("the newAccount response has a Location");

    let mut session = nodes.session(2, account_key(&old_key), &account_url).await;
    let key_change = session.url("keyChange");
    let account_on_2 = nodes.on_node(&account_url, 2);
    let inner = session.key.sign_key_change(&account_key(&new_key), &account_on_2, &key_change);
    let rolled = session.post(&key_change, Some(&inner)).await.expect("keyChange");
    assert_eq!(rolled.status.as_u16(), 200, "keyChange: {}", describe_reply(&rolled));
    assert_eq!(
        rolled.json()["key"],
        account_key(&new_key).jwk(),
        "the keyChange response has another key: {}",
        describe_reply(&rolled)
    );

    // The old key, by account URL and by key.
    let account_on_3 = nodes.on_node(&account_url, 3);
    let mut old_reader = nodes.session(3, account_key(&old_key), &account_url).await;
    let rejected = old_reader.post(&account_on_3, None).await.expect("POST-as-GET with the old key");
    expect_problem("account read with the old key", &rejected, 400, ProblemType::Malformed, &["does not verify"]);
    let mut old_lookup = nodes.connect(3, account_key(&old_key)).await;
    let lookup = old_lookup.new_account(&json!({"onlyReturnExisting": true})).await.expect("newAccount");
    expect_problem(
        "newAccount with the old key",
        &lookup,
        400,
        ProblemType::AccountDoesNotExist,
        &[&account_key(&old_key).thumbprint()],
    );

    // The new key, by account URL and by key.
    let mut new_reader = nodes.session(3, account_key(&new_key), &account_url).await;
    let read = new_reader.post(&account_on_3, None).await.expect("POST-as-GET with the new key");
    assert_eq!(read.status.as_u16(), 200, "account read with the new key: {}", describe_reply(&read));
    assert_eq!(read.json()["status"], "valid", "account after rollover: {}", describe_reply(&read));
    assert_eq!(
        read.json()["key"],
        account_key(&new_key).jwk(),
        "account key after rollover: {}",
        describe_reply(&read)
    );
    let mut new_lookup = nodes.connect(1, account_key(&new_key)).await;
    let lookup = new_lookup.new_account(&json!({"onlyReturnExisting": true})).await.expect("newAccount");
    assert_eq!(lookup.status.as_u16(), 200, "newAccount with the new key: {}", describe_reply(&lookup));
    assert_eq!(
        lookup.location().as_deref(),
        Some(account_url.as_str()),
        "newAccount with the new key found another account"
    );
    (new_key, account_url)
}

/// Gets a certificate with the rolled-over account and revokes it for key compromise with a
/// request signed by the certificate's own key (`jwk`). Checks that it reads as revoked and that
/// revoking it again, by key or by account, is alreadyRevoked. Returns the chain and the leaf.
async fn revoke_with_certificate_key(
    nodes: &Nodes,
    responder: &Http01Responder,
    account: &[u8],
    account_url: &str,
) -> (String, Vec<u8>) {
    let certificate_key = p256_pkcs8();
    let csr =
        csr_der(&rcgen::KeyPair::try_from(certificate_key.as_slice()).expect("rcgen loads the key"), &[ROLLOVER_NAME]);
    let mut holder = nodes.session(1, account_key(account), account_url).await;
    let chain_pem = holder
        .obtain_certificate(&[Identifier::dns(ROLLOVER_NAME)], &csr, responder)
        .await
        .unwrap_or_else(|error| panic!("order for {ROLLOVER_NAME} with the rolled-over key: {error}"));
    let leaf_der = check_certificate(&chain_pem, &nodes.bundle, &[ROLLOVER_NAME]);
    let serial = serial_hex(&leaf_der);

    let mut by_key = nodes.connect(2, account_key(&certificate_key)).await;
    let revoke_url = by_key.url("revokeCert");
    let revoked = by_key.post(&revoke_url, Some(&revocation(&leaf_der, KEY_COMPROMISE))).await.expect("revokeCert");
    assert_eq!(
        revoked.status.as_u16(),
        200,
        "revocation signed with the certificate key: {}",
        describe_reply(&revoked)
    );
    nodes.wait_revoked(3, &leaf_der).await;

    let mut again = nodes.connect(3, account_key(&certificate_key)).await;
    let revoke_url = again.url("revokeCert");
    let reply = again.post(&revoke_url, Some(&revocation(&leaf_der, KEY_COMPROMISE))).await.expect("revokeCert");
    expect_problem("revoke again with the certificate key", &reply, 400, ProblemType::AlreadyRevoked, &[&serial]);
    let revoke_url = holder.url("revokeCert");
    let reply = holder.post(&revoke_url, Some(&revocation(&leaf_der, 0))).await.expect("revokeCert");
    expect_problem("revoke again by the account", &reply, 400, ProblemType::AlreadyRevoked, &[&serial]);
    (chain_pem, leaf_der)
}

/// Checks that the CRL at the certificate's CRL distribution point lists it with `reason`, and
/// that `openssl verify -crl_check` with that CRL rejects it as revoked. Polls for up to
/// `CRL_TIMEOUT`, because a node serves the CRL it signed last for up to a minute.
async fn expect_revoked_in_crl(chain_pem: &str, leaf_der: &[u8], bundle: &Path, reason: u8) {
    let (_, leaf) = X509Certificate::from_der(leaf_der).expect("the issued certificate parses");
    let crl_url = leaf
        .extensions()
        .iter()
        .find_map(|extension| match extension.parsed_extension() {
            ParsedExtension::CRLDistributionPoints(points) => {
                points.iter().find_map(|point| match &point.distribution_point {
                    Some(DistributionPointName::FullName(names)) => names.iter().find_map(|name| match name {
                        GeneralName::URI(uri) => Some((*uri).to_owned()),
                        _ => None,
                    }),
                    _ => None,
                })
            }
            _ => None,
        })
        .expect("the issued certificate names a CRL distribution point URI");
    let serial = leaf.raw_serial().to_vec();

    let deadline = Instant::now() + CRL_TIMEOUT;
    let crl_der = loop {
        let crl_der = http_get_loopback(&crl_url).unwrap_or_else(|error| panic!("GET {crl_url}: {error}"));
        let (_, crl) = CertificateRevocationList::from_der(&crl_der)
            .unwrap_or_else(|error| panic!("parse the CRL from {crl_url}: {error}"));
        let entry = crl.iter_revoked_certificates().find(|entry| entry.raw_serial() == serial.as_slice());
        if let Some(entry) = entry {
            let listed_reason = entry.reason_code().map_or(0, |(_, code)| code.0);
            assert_eq!(
                listed_reason,
                reason,
                "the CRL at {crl_url} lists serial {} with another reason",
                hex::encode(&serial)
            );
            break crl_der;
        }
        assert!(
            Instant::now() < deadline,
            "the CRL at {crl_url} does not list serial {} within {CRL_TIMEOUT:?}",
            hex::encode(&serial)
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };

    let folder = tempfile::tempdir().expect("create a temporary folder");
    let crl_der_path = folder.path().join("crl.der");
    let crl_pem_path = folder.path().join("crl.pem");
    std::fs::write(&crl_der_path, &crl_der).expect("write crl.der");
    run_openssl(&[
        "crl".as_ref(),
        "-inform".as_ref(),
        "DER".as_ref(),
        "-in".as_ref(),
        crl_der_path.as_os_str(),
        "-out".as_ref(),
        crl_pem_path.as_os_str(),
    ])
    .unwrap_or_else(|error| panic!("convert the CRL from {crl_url} to PEM: {error}"));
    let verdict = verify_with_openssl(chain_pem, bundle, Some(&crl_pem_path));
    match verdict {
        Ok(()) => panic!("openssl verify -crl_check accepts the revoked certificate with the CRL from {crl_url}"),
        Err(output) => assert!(
            output.contains("certificate revoked"),
            "openssl verify -crl_check failed for another reason than revocation: {output}"
        ),
    }
}

/// Sends a plain HTTP GET to a loopback URL and returns the body of a 200 response.
fn http_get_loopback(url: &str) -> Result<Vec<u8>, String> {
    use std::io::{Read as _, Write as _};

    let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url} is not an http:// URL"))?;
    let (address, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let socket: std::net::SocketAddr = address.parse().map_err(|error| format!("{address} is not IP:PORT: {error}"))?;
    if !socket.ip().is_loopback() {
        return Err(format!("{url} is not a loopback address; this test sends requests to loopback only"));
    }
    let mut stream = std::net::TcpStream::connect_timeout(&socket, Duration::from_secs(5))
        .map_err(|error| format!("connect to {address}: {error}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|error| format!("set a read timeout: {error}"))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
        .map_err(|error| format!("send the request: {error}"))?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(|error| format!("read the response: {error}"))?;

    let split = response.windows(4).position(|window| window == b"\r\n\r\n").ok_or("the response has no header end")?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("the response is not 200 OK: {head}"));
    }
    Ok(response[split + 4..].to_vec())
}

/// The cluster's ACME servers and the roots that verify them.
struct Nodes {
    /// `https://host:port` of each node's ACME server; index 0 is node 1.
    bases: Vec<String>,
    bundle: PathBuf,
    roots: Vec<u8>,
}

impl Nodes {
    fn read(cluster: &DevCluster) -> Nodes {
        let bases = (1..=3)
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
        let bundle = cluster.dir.join("bundle.pem");
        let roots = std::fs::read(&bundle).expect("read bundle.pem of the dev cluster");
        Nodes { bases, bundle, roots }
    }

    fn url(&self, node: u64, path: &str) -> String {
        format!("{}{path}", self.bases[usize::try_from(node - 1).expect("node id fits usize")])
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

    async fn connect(&self, node: u64, key: AccountKey) -> Session {
        let directory = self.url(node, "/acme/directory");
        Session::connect(&directory, &self.roots, key)
            .await
            .unwrap_or_else(|error| panic!("connect to {directory}: {error}"))
    }

    /// Connects to `node` as the account at `account_url`.
    async fn session(&self, node: u64, key: AccountKey, account_url: &str) -> Session {
        let mut session = self.connect(node, key).await;
        session.account_url = Some(self.on_node(account_url, node));
        session
    }

    /// Waits until `node` reports the certificate as revoked: its RFC 9773 renewal window then
    /// starts in the past.
    async fn wait_revoked(&self, node: u64, leaf_der: &[u8]) {
        let url = self.url(node, &format!("/acme/renewal-info/{}", ari_certificate_id(leaf_der)));
        let mut session = self.connect(node, account_key(&p256_pkcs8())).await;
        let deadline = Instant::now() + REPLICATION_TIMEOUT;
        loop {
            let reply =
                session.request(Method::GET, &url, None).await.unwrap_or_else(|error| panic!("GET {url}: {error}"));
            assert_eq!(reply.status.as_u16(), 200, "GET {url}: {}", describe_reply(&reply));
            let start = reply.json()["suggestedWindow"]["start"].as_str().map(str::to_owned).unwrap_or_default();
            let start = time::OffsetDateTime::parse(&start, &time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|error| panic!("renewal window start {start:?} is not RFC 3339: {error}"));
            if start <= time::OffsetDateTime::now_utc() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {node} does not report the certificate as revoked within {REPLICATION_TIMEOUT:?}: {}",
                describe_reply(&reply)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Binds the http-01 responder on `HTTP01_ADDRESS`, retrying while another process uses it.
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

/// Generates a P-256 key whose public x and y coordinates both start with a non-zero byte.
///
/// acme-lib 0.9.1 writes the coordinates of its account key's JWK with `BigNum::to_vec`, which
/// drops leading zero bytes, and the server rightly rejects a coordinate shorter than 32 bytes
/// (RFC 7518, section 6.2.1.2). This avoids that acme-lib defect for the account key.
fn full_length_p256_key() -> rcgen::KeyPair {
    for _ in 0..KEY_ATTEMPTS {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate a P-256 key");
        // The public key is 0x04, then x and y of 32 bytes each.
        let point = key.public_key_raw();
        if point[1] != 0 && point[33] != 0 {
            return key;
        }
    }
    panic!("{KEY_ATTEMPTS} P-256 keys in a row had a coordinate with a leading zero byte");
}

fn p256_pkcs8() -> Vec<u8> {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate a P-256 key").serialize_der()
}

fn account_key(pkcs8: &[u8]) -> AccountKey {
    AccountKey::from_pkcs8(Algorithm::Es256, pkcs8).expect("AccountKey loads a P-256 PKCS#8 key")
}

fn revocation(leaf_der: &[u8], reason: u8) -> Value {
    json!({"certificate": b64::encode(leaf_der), "reason": reason})
}

/// Makes a DER CSR for `names` with an empty subject, so that the names are only in the SAN
/// extension. rcgen's default subject has a common name, which would be one more name.
fn csr_der(key: &rcgen::KeyPair, names: &[&str]) -> Vec<u8> {
    let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
    let mut params = rcgen::CertificateParams::new(names).expect("test names are valid DNS names");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.serialize_request(key).expect("sign the CSR").der().to_vec()
}

/// Checks that the first certificate of `chain_pem` names exactly `names` and that `openssl
/// verify` accepts it with the rest of the chain as intermediates and `bundle` as the roots.
/// Returns the DER of that certificate.
fn check_certificate(chain_pem: &str, bundle: &Path, names: &[&str]) -> Vec<u8> {
    let chain = pem_certificates(chain_pem.as_bytes());
    let leaf_der = chain.first().cloned().unwrap_or_else(|| panic!("the chain has no certificate: {chain_pem:?}"));
    let (_, leaf) = X509Certificate::from_der(&leaf_der).expect("the issued certificate parses");
    let mut found: Vec<String> = leaf
        .subject_alternative_name()
        .expect("the subjectAltName extension parses")
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    let mut expected: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
    expected.sort();
    assert_eq!(found, expected, "the certificate's DNS names differ from the order's");

    if let Err(output) = verify_with_openssl(chain_pem, bundle, None) {
        panic!("openssl verify rejects the certificate: {output}\nchain:\n{chain_pem}");
    }
    leaf_der
}

/// Runs `openssl verify` on the first certificate of `chain_pem`, with the rest of the chain as
/// untrusted intermediates, `bundle` as the trusted roots and, if given, `crl` for `-crl_check`.
/// Returns openssl's output as the error when it rejects the certificate.
fn verify_with_openssl(chain_pem: &str, bundle: &Path, crl: Option<&Path>) -> Result<(), String> {
    let blocks: Vec<String> = chain_pem
        .split_inclusive("-----END CERTIFICATE-----")
        .filter(|block| block.contains("-----BEGIN CERTIFICATE-----"))
        .map(|block| format!("{}\n", block.trim_start()))
        .collect();
    assert!(!blocks.is_empty(), "the chain has no certificate: {chain_pem:?}");
    let folder = tempfile::tempdir().expect("create a temporary folder");
    let leaf_path = folder.path().join("leaf.pem");
    let intermediates_path = folder.path().join("intermediates.pem");
    std::fs::write(&leaf_path, &blocks[0]).expect("write leaf.pem");
    std::fs::write(&intermediates_path, blocks[1..].concat()).expect("write intermediates.pem");

    let mut arguments: Vec<&std::ffi::OsStr> = vec!["verify".as_ref(), "-CAfile".as_ref(), bundle.as_os_str()];
    if blocks.len() > 1 {
        arguments.extend(["-untrusted".as_ref(), intermediates_path.as_os_str()]);
    }
    if let Some(crl) = crl {
        arguments.extend(["-crl_check".as_ref(), "-CRLfile".as_ref(), crl.as_os_str()]);
    }
    arguments.push(leaf_path.as_os_str());
    run_openssl(&arguments)
}

/// Runs openssl with `arguments`. Returns its exit status and output as the error when it fails.
fn run_openssl(arguments: &[&std::ffi::OsStr]) -> Result<(), String> {
    let output = Command::new("openssl").args(arguments).stdin(Stdio::null()).output().expect("run openssl");
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "openssl {arguments:?} failed with {}: {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
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

/// Checks that `reply` is a problem document of `kind` and `status` whose detail contains each of
/// `needles`, with a Replay-Nonce.
fn expect_problem(step: &str, reply: &Reply, status: u16, kind: ProblemType, needles: &[&str]) {
    assert_eq!(reply.status.as_u16(), status, "{step}: unexpected HTTP status: {}", describe_reply(reply));
    let problem = reply
        .problem()
        .unwrap_or_else(|| panic!("{step}: the response is not a problem document: {}", describe_reply(reply)));
    assert_eq!(problem.kind, kind.urn(), "{step}: unexpected problem type: {}", describe_reply(reply));
    for needle in needles {
        assert!(
            problem.detail.contains(needle),
            "{step}: the problem detail does not name {needle:?}: {}",
            describe_reply(reply)
        );
    }
    assert!(reply.nonce().is_some(), "{step}: the response has no Replay-Nonce: {}", describe_reply(reply));
}

fn describe_reply(reply: &Reply) -> String {
    let body = String::from_utf8_lossy(&reply.body);
    let count = body.chars().count();
    let shown = if count > SHOWN_CHARS {
        format!("{}... ({count} characters)", body.chars().take(SHOWN_CHARS).collect::<String>())
    } else {
        body.into_owned()
    };
    format!(
        "HTTP {} Content-Type: {:?} Location: {:?}\n  body: {shown}",
        reply.status.as_u16(),
        reply.header("content-type"),
        reply.location()
    )
}
