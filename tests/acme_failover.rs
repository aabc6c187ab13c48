//! ACME on a cluster that loses its leader in the middle of an order: the order is created through
//! the leader, the leader is killed, and the client finishes the order through another node. The
//! same test covers an IP identifier (RFC 8738) and a renewal with `replaces` (RFC 9773).

#[path = "common/acme.rs"]
#[allow(dead_code, reason = "this test uses only part of the ACME helpers")]
mod acme_harness;
#[path = "common/cluster.rs"]
#[allow(dead_code, reason = "this test uses only part of the cluster harness")]
mod cluster_harness;
mod common;

use std::time::{Duration, Instant};

use cluster_harness::{CLUSTER_TESTS, DevCluster};
use serde_json::{Value, json};
use sigil_acme::client::AccountKey;
use sigil_acme::jwk::Algorithm;
use sigil_acme::session::{Http01Responder, Reply, Session};
use sigil_acme::{Identifier, ProblemType};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

const HTTP01_ADDRESS: &str = "127.0.0.1:5002";
/// Time another test process may hold the http-01 port.
const HTTP01_PORT_WAIT: Duration = Duration::from_secs(300);
const NAME: &str = "www.failover.example.com";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_survives_leader_kill() {
    let _serial = CLUSTER_TESTS.lock().await;
    let mut cluster = DevCluster::start(3, 0).await;
    let responder = start_http01_responder().await;
    let bundle = std::fs::read(cluster.dir.join("bundle.pem")).expect("read bundle.pem");

    let leader = cluster.leader(&[1, 2, 3], Duration::from_secs(60)).await;
    let survivor = [1, 2, 3].into_iter().find(|id| *id != leader).expect("another node");
    let leader_directory = cluster.endpoint(leader).acme.expect("the leader serves ACME");
    let survivor_directory = cluster.endpoint(survivor).acme.expect("the survivor serves ACME");

    let mut first = Session::connect(&leader_directory, &bundle, AccountKey::generate(Algorithm::Es256))
        .await
        .expect("connect to the leader");
    let created = first.new_account(&json!({ "termsOfServiceAgreed": true })).await.expect("newAccount");
    assert_eq!(created.status.as_u16(), 201, "newAccount: {}", text(&created));
    let identifiers = [Identifier::dns(NAME), Identifier::ip("127.0.0.1")];
    let new_order = first.url("newOrder");
    let order = first.post(&new_order, Some(&json!({ "identifiers": identifiers }))).await.expect("newOrder");
    assert_eq!(order.status.as_u16(), 201, "newOrder: {}", text(&order));
    let order_url = order.location().expect("newOrder sends Location");

    cluster.kill_node(leader).await;
    let new_leader = cluster.leader(&[survivor, 6 - leader - survivor], Duration::from_secs(30)).await;
    assert_ne!(new_leader, leader, "a surviving node leads");

    // The client goes on through the survivor, as it would behind a load balancer: same account,
    // same order, URLs on the survivor's address.
    let leader_base = base_of(&leader_directory);
    let survivor_base = base_of(&survivor_directory);
    let moved = |url: &str| url.replacen(&leader_base, &survivor_base, 1);
    let mut second = Session::connect(&survivor_directory, &bundle, first.key).await.expect("connect to the survivor");
    second.account_url = first.account_url.clone();

    let order = post_ok(&mut second, &moved(&order_url), None).await;
    assert_eq!(order["status"], "pending", "the order survived the leader change: {order}");
    for authz_url in order["authorizations"].as_array().expect("authorizations") {
        let authz = post_ok(&mut second, &moved(authz_url.as_str().expect("URL")), None).await;
        let challenge = authz["challenges"]
            .as_array()
            .expect("challenges")
            .iter()
            .find(|challenge| challenge["type"] == "http-01")
            .unwrap_or_else(|| panic!("no http-01 challenge in {authz}"))
            .clone();
        let token = challenge["token"].as_str().expect("token");
        responder.insert(token, &second.key.key_authorization(token));
        post_ok(&mut second, &moved(challenge["url"].as_str().expect("URL")), Some(&json!({}))).await;
    }
    let ready = wait_for_status(&mut second, &moved(&order_url), "ready").await;
    let csr = csr_for(&[NAME], &["127.0.0.1"]);
    let finalize = moved(ready["finalize"].as_str().expect("finalize URL"));
    post_ok(&mut second, &finalize, Some(&json!({ "csr": sigil_acme::b64::encode(&csr) }))).await;
    let valid = wait_for_status(&mut second, &moved(&order_url), "valid").await;
    let download = second.post(&moved(valid["certificate"].as_str().expect("URL")), None).await.expect("download");
    assert_eq!(download.status.as_u16(), 200, "download: {}", text(&download));

    let work = tempfile::tempdir().expect("create temporary folder");
    let chain_path = work.path().join("chain.pem");
    std::fs::write(&chain_path, &download.body).expect("write chain");
    let chain = acme_harness::Chain::read(&chain_path);
    // pkilint is not run here: it rightly calls 127.0.0.1 an internal address. The interoperability
    // test lints certificates for public names.
    let intermediates = work.path().join("intermediates.pem");
    let leaf = work.path().join("leaf.pem");
    let pem_of = |der: &[u8]| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
    std::fs::write(&leaf, pem_of(&chain.leaf_der)).expect("write leaf");
    let intermediate_text: String = chain.intermediates_der.iter().map(|der| pem_of(der)).collect();
    std::fs::write(&intermediates, intermediate_text).expect("write intermediates");
    let verify = std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(cluster.dir.join("bundle.pem"))
        .arg("-untrusted")
        .arg(&intermediates)
        .arg(&leaf)
        .output()
        .expect("run openssl verify");
    assert!(verify.status.success(), "openssl verify: {}", String::from_utf8_lossy(&verify.stdout));
    let (_, parsed) = X509Certificate::from_der(&chain.leaf_der).expect("parse the leaf");
    let san = parsed.subject_alternative_name().expect("SAN extension").expect("a SAN extension");
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::DNSName(dns) => (*dns).to_owned(),
            GeneralName::IPAddress(bytes) => format!("{bytes:?}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(names, [NAME.to_owned(), format!("{:?}", [127u8, 0, 0, 1])], "subject alternative names");

    // A renewal names the certificate it replaces; a second one for the same certificate is refused.
    let ari_id = chain.ari_id();
    let info =
        second.request(axum::http::Method::GET, &format!("{survivor_base}/acme/renewal-info/{ari_id}"), None).await;
    let info = info.expect("renewalInfo");
    assert_eq!(info.status.as_u16(), 200, "renewalInfo: {}", text(&info));
    assert!(info.json()["suggestedWindow"]["start"].is_string(), "renewalInfo: {}", text(&info));
    let renewal = json!({ "identifiers": [Identifier::dns(NAME)], "replaces": ari_id });
    let new_order = second.url("newOrder");
    let replacing = second.post(&new_order, Some(&renewal)).await.expect("newOrder with replaces");
    assert_eq!(replacing.status.as_u16(), 201, "newOrder with replaces: {}", text(&replacing));
    assert_eq!(replacing.json()["replaces"], ari_id, "the order names what it replaces");
    let again = second.post(&new_order, Some(&renewal)).await.expect("second newOrder with replaces");
    let problem = again.problem().unwrap_or_else(|| panic!("a problem document: {}", text(&again)));
    assert!(problem.is(ProblemType::AlreadyReplaced), "second replacement: {problem}");
    assert!(problem.detail.contains(&ari_id), "the detail names the certificate: {problem}");
}

fn base_of(directory: &str) -> String {
    directory.trim_end_matches("/acme/directory").to_owned()
}

fn text(reply: &Reply) -> String {
    format!("{} {}", reply.status, String::from_utf8_lossy(&reply.body))
}

async fn post_ok(session: &mut Session, url: &str, payload: Option<&Value>) -> Value {
    let reply = session.post(url, payload).await.unwrap_or_else(|error| panic!("POST {url}: {error}"));
    assert!(reply.status.is_success(), "POST {url}: {}", text(&reply));
    reply.json()
}

async fn wait_for_status(session: &mut Session, order_url: &str, wanted: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let order = post_ok(session, order_url, None).await;
        if order["status"] == wanted {
            return order;
        }
        assert_ne!(order["status"], "invalid", "the order became invalid: {order}");
        assert!(Instant::now() < deadline, "the order is not {wanted} after 60 s: {order}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn csr_for(dns_names: &[&str], addresses: &[&str]) -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate key");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    for name in dns_names {
        params.subject_alt_names.push(rcgen::SanType::DnsName((*name).try_into().expect("DNS name")));
    }
    for address in addresses {
        params.subject_alt_names.push(rcgen::SanType::IpAddress(address.parse().expect("IP address")));
    }
    params.serialize_request(&key).expect("build CSR").der().to_vec()
}

/// Binds the http-01 responder, waiting while another test process holds the port.
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
