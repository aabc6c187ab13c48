//! The upstream authority API on a 3-node dev cluster: downstream CA minting as a SPIRE server
//! asks for it, JWT authorities shared between nodes, the bundle watch, Istio's certificate API,
//! and the refusals of each, which record nothing.

#[path = "common/cluster.rs"]
#[allow(dead_code, reason = "this test uses only part of the cluster harness")]
mod cluster_harness;
mod common;

use std::path::Path;
use std::time::Duration;

use cluster_harness::{CLUSTER_TESTS, DevCluster};
use sigil::istio_proto::IstioCertificateRequest;
use sigil::istio_proto::istio_certificate_service_client::IstioCertificateServiceClient;
use sigil::proto::authority_client::AuthorityClient;
use sigil::proto::{
    Bundle, GetBundleRequest, JwtAuthority, MintX509CaRequest, MintX509CaResponse, PublishJwtAuthorityRequest,
    SignX509SvidRequest,
};
use tonic::Code;
use tonic::transport::Channel;
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use common::TRUST_DOMAIN;

async fn authority(cluster: &DevCluster, node: u64, credential: &str) -> AuthorityClient<Channel> {
    let channel = cluster.connection_as(node, credential).connect().await.expect("connect to node");
    AuthorityClient::new(channel)
}

/// Builds a CSR shaped like SPIRE's: a P-256 key, one URI SAN with the trust domain's ID, and the subject
/// C=US, O=SPIFFE with a serialNumber attribute.
fn spire_csr(uri: &str) -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate key");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CountryName, "US");
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "SPIFFE");
    params.distinguished_name.push(rcgen::DnType::CustomDnType(vec![2, 5, 4, 5]), "1234567890");
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().expect("URI"))];
    let csr = params.serialize_request(&key).expect("build CSR");
    (key, csr.der().to_vec())
}

fn pem(ders: &[&[u8]]) -> String {
    ders.iter().map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))).collect::<Vec<_>>().join("")
}

async fn issued_total(cluster: &DevCluster) -> u64 {
    cluster.status(1).await.expect("status of node 1").issued_total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_authority_on_a_three_node_cluster() {
    let _serial = CLUSTER_TESTS.lock().await;
    let cluster = DevCluster::start(3, 0).await;
    let work = tempfile::tempdir().expect("temporary folder");

    mint_a_spire_shaped_ca(&cluster, work.path()).await;
    reject_invalid_mints(&cluster, work.path()).await;
    share_jwt_authorities_and_watch(&cluster).await;
    reject_invalid_jwt_authorities(&cluster).await;
    serve_istio_agents(&cluster, work.path()).await;
}

async fn mint(cluster: &DevCluster, csr: Vec<u8>, ttl: i64) -> Result<MintX509CaResponse, tonic::Status> {
    let mut client = authority(cluster, 2, "spire-server").await;
    let request = MintX509CaRequest { csr, preferred_ttl_seconds: ttl, trust_domain: String::new() };
    client.mint_x509_ca(request).await.map(tonic::Response::into_inner)
}

async fn mint_a_spire_shaped_ca(cluster: &DevCluster, work: &Path) {
    let before = issued_total(cluster).await;
    let (key, csr) = spire_csr("spiffe://example.org");
    let minted = mint(cluster, csr, 3600).await.expect("mint a downstream CA");
    assert!(minted.warnings.is_empty(), "no warning for a 1 h CA under a 5-year intermediate: {:?}", minted.warnings);
    assert!(!minted.intermediates.is_empty(), "the answer carries Sigil's intermediate");
    assert!(!minted.roots.is_empty(), "the answer carries the roots");
    for intermediate in &minted.intermediates {
        assert!(!minted.roots.iter().any(|root| &root.certificate == intermediate), "no root in the chain");
    }

    let (_, ca) = X509Certificate::from_der(&minted.certificate).expect("parse the minted CA");
    assert_eq!(
        ca.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key),
        "the CA certifies the CSR's key"
    );
    let constraints = ca.basic_constraints().expect("basicConstraints").expect("present").value;
    assert!(constraints.ca, "cA is TRUE");
    assert_eq!(constraints.path_len_constraint, Some(0), "default path length 0");
    let usage = ca.key_usage().expect("keyUsage").expect("present").value;
    assert!(usage.key_cert_sign(), "keyCertSign is set");
    assert!(usage.crl_sign(), "cRLSign is set");
    assert!(usage.digital_signature(), "digitalSignature is set");
    assert_eq!(usage.flags & !0b0110_0001, 0, "no key usage beyond keyCertSign, cRLSign, digitalSignature");
    let uris: Vec<String> = ca
        .subject_alternative_name()
        .expect("SAN")
        .expect("present")
        .value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::URI(uri) => (*uri).to_owned(),
            other => panic!("unexpected SAN {other:?}"),
        })
        .collect();
    assert_eq!(uris, ["spiffe://example.org"]);
    let subject = ca.subject().to_string();
    assert!(subject.contains("O=SPIFFE"), "{subject}");
    assert!(subject.contains("C=US"), "{subject}");
    assert!(subject.contains(&minted.serial), "the subject is unique per CA: {subject} has serial {}", minted.serial);
    let lifetime = minted.not_after - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((3500..=3601).contains(&lifetime), "lifetime {lifetime}s follows the preferred TTL");
    assert!(ca.extensions().iter().all(|ext| !matches!(ext.parsed_extension(), ParsedExtension::ExtendedKeyUsage(_))));

    // A SPIRE server proves the chain by signing a leaf under the new CA and verifying it.
    let issuer = rcgen::Issuer::from_ca_cert_der(&minted.certificate.clone().into(), &key).expect("CA as issuer");
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("leaf key");
    let mut leaf_params = rcgen::CertificateParams::default();
    leaf_params.subject_alt_names =
        vec![rcgen::SanType::URI("spiffe://example.org/spire/throwaway".try_into().expect("URI"))];
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("sign a leaf");
    let roots: Vec<&[u8]> = minted.roots.iter().map(|root| root.certificate.as_slice()).collect();
    let mut untrusted: Vec<&[u8]> = vec![&minted.certificate];
    untrusted.extend(minted.intermediates.iter().map(Vec::as_slice));
    std::fs::write(work.join("roots.pem"), pem(&roots)).expect("write roots");
    std::fs::write(work.join("chain.pem"), pem(&untrusted)).expect("write chain");
    std::fs::write(work.join("leaf.pem"), pem(&[leaf.der()])).expect("write leaf");
    let path = |name: &str| work.join(name).display().to_string();
    let output = std::process::Command::new("openssl")
        .args(["verify", "-CAfile", &path("roots.pem"), "-untrusted", &path("chain.pem"), &path("leaf.pem")])
        .output()
        .expect("run openssl verify");
    assert!(
        output.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    assert_eq!(issued_total(cluster).await, before + 1, "the minted CA is recorded once");

    let (_, csr) = spire_csr("spiffe://example.org");
    let long = mint(cluster, csr, 400 * 24 * 3600).await.expect("a long TTL is shortened, not refused");
    assert!(
        long.warnings.iter().any(|warning| warning.contains("above the policy maximum of 604800s")),
        "{:?}",
        long.warnings
    );
    let lifetime = long.not_after - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!((604_700..=604_801).contains(&lifetime), "lifetime {lifetime}s is the policy maximum");
}

/// Builds a CSR with openssl from `addext` entries such as "basicConstraints=critical,CA:FALSE".
fn openssl_ca_csr(work: &Path, name: &str, addext: &[&str]) -> Vec<u8> {
    common::openssl_csr(work, name, "ec", &["ec_paramgen_curve:P-256"], addext)
}

/// A refused mint: the credential folder to call with, the request, and the expected status.
struct MintCase<'a> {
    name: &'a str,
    credential: &'a str,
    csr: Vec<u8>,
    ttl: i64,
    code: Code,
    message: &'a str,
}

impl<'a> MintCase<'a> {
    fn new(name: &'a str, credential: &'a str, csr: Vec<u8>, ttl: i64, code: Code, message: &'a str) -> Self {
        MintCase { name, credential, csr, ttl, code, message }
    }
}

async fn reject_invalid_mints(cluster: &DevCluster, work: &Path) {
    let stranger = stranger_credential(cluster).await;
    let cases = vec![
        MintCase::new(
            "another trust domain",
            "spire-server",
            spire_csr("spiffe://other.org").1,
            3600,
            Code::PermissionDenied,
            "may not act for trust domain \"other.org\"",
        ),
        MintCase::new(
            "a leaf's SPIFFE ID",
            "spire-server",
            spire_csr("spiffe://example.org/workload").1,
            3600,
            Code::InvalidArgument,
            "spiffe://example.org/workload names a workload",
        ),
        MintCase::new(
            "a leaf's basic constraints",
            "spire-server",
            openssl_ca_csr(
                work,
                "leaf",
                &["basicConstraints=critical,CA:FALSE", "subjectAltName=URI:spiffe://example.org"],
            ),
            3600,
            Code::InvalidArgument,
            "cA FALSE",
        ),
        MintCase::new(
            "a DNS name",
            "spire-server",
            openssl_ca_csr(work, "dns", &["subjectAltName=URI:spiffe://example.org,DNS:ca.example.org"]),
            3600,
            Code::InvalidArgument,
            "DNS SAN \"ca.example.org\"",
        ),
        MintCase::new(
            "a negative TTL",
            "spire-server",
            spire_csr("spiffe://example.org").1,
            -5,
            Code::InvalidArgument,
            "-5",
        ),
        MintCase::new(
            "a malformed CSR",
            "spire-server",
            b"not a CSR".to_vec(),
            3600,
            Code::InvalidArgument,
            "not a valid DER",
        ),
        MintCase::new(
            "a caller without downstream rights",
            "istio",
            spire_csr("spiffe://example.org").1,
            3600,
            Code::PermissionDenied,
            "caller spiffe://example.org/istio/cluster may not act for trust domain \"example.org\"",
        ),
        MintCase::new(
            "an unknown caller",
            stranger.as_str(),
            spire_csr("spiffe://example.org").1,
            3600,
            Code::PermissionDenied,
            "caller spiffe://example.org/stranger is not listed in the policy",
        ),
    ];
    for MintCase { name, credential, csr, ttl, code, message } in cases {
        let before = issued_total(cluster).await;
        let mut client = authority(cluster, 1, credential).await;
        let request = MintX509CaRequest { csr, preferred_ttl_seconds: ttl, trust_domain: String::new() };
        let status = client.mint_x509_ca(request).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {}", status.message());
        assert!(status.message().contains(message), "{name}: {:?} should contain {message:?}", status.message());
        assert_eq!(issued_total(cluster).await, before, "{name}: nothing recorded");
    }
}

/// Gets an X509-SVID for an identity no policy entry lists, to call Sigil as a stranger.
/// Returns the credential's folder name inside the dev folder.
async fn stranger_credential(cluster: &DevCluster) -> String {
    let (key, csr) = common::p256_csr("spiffe://example.org/stranger", &[]);
    let mut issuer = sigil::proto::issuer_client::IssuerClient::new(cluster.channel(1).await);
    let svid = issuer
        .sign_x509_svid(SignX509SvidRequest { csr, ttl_seconds: Some(3600) })
        .await
        .expect("the admin gets a SVID for the stranger")
        .into_inner();
    let folder = cluster.dir.join("stranger");
    std::fs::create_dir_all(&folder).expect("create stranger folder");
    let mut chain: Vec<&[u8]> = vec![&svid.certificate];
    chain.extend(svid.intermediates.iter().map(Vec::as_slice));
    std::fs::write(folder.join("cert.pem"), pem(&chain)).expect("write cert");
    std::fs::write(folder.join("key.pem"), key.serialize_pem()).expect("write key");
    "stranger".to_owned()
}

fn jwt_key(key_id: &str, expires_in: i64) -> JwtAuthority {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate key");
    JwtAuthority {
        public_key: rcgen::PublicKeyData::subject_public_key_info(&key),
        key_id: key_id.to_owned(),
        expires_at: time::OffsetDateTime::now_utc().unix_timestamp() + expires_in,
        tainted: false,
    }
}

async fn publish(
    cluster: &DevCluster,
    node: u64,
    authority_key: &JwtAuthority,
) -> Result<Vec<JwtAuthority>, tonic::Status> {
    let mut client = authority(cluster, node, "spire-server").await;
    let request =
        PublishJwtAuthorityRequest { trust_domain: TRUST_DOMAIN.to_owned(), authority: Some(authority_key.clone()) };
    client.publish_jwt_authority(request).await.map(|response| response.into_inner().authorities)
}

fn key_ids(authorities: &[JwtAuthority]) -> Vec<&str> {
    let mut ids: Vec<&str> = authorities.iter().map(|authority| authority.key_id.as_str()).collect();
    ids.sort_unstable();
    ids
}

async fn next_bundle(stream: &mut tonic::Streaming<Bundle>) -> Bundle {
    tokio::time::timeout(Duration::from_secs(15), stream.message())
        .await
        .expect("a bundle arrives within 15 s")
        .expect("the stream carries no error")
        .expect("the stream stays open")
}

async fn share_jwt_authorities_and_watch(cluster: &DevCluster) {
    let mut watcher = authority(cluster, 3, "istio").await;
    let mut stream = watcher
        .watch_bundle(GetBundleRequest { trust_domain: TRUST_DOMAIN.to_owned() })
        .await
        .expect("open the bundle watch")
        .into_inner();
    let first = next_bundle(&mut stream).await;
    assert!(!first.x509_authorities.is_empty(), "the first bundle has the roots");
    assert!(first.jwt_authorities.is_empty(), "no JWT authority yet");

    // Two SPIRE servers of one trust domain publish through different nodes.
    let server_a = jwt_key("server-a-key", 3600);
    let server_b = jwt_key("server-b-key", 3600);
    assert_eq!(key_ids(&publish(cluster, 1, &server_a).await.expect("publish A")), ["server-a-key"]);
    let seen_by_b = publish(cluster, 2, &server_b).await.expect("publish B");
    assert_eq!(key_ids(&seen_by_b), ["server-a-key", "server-b-key"], "B learns A's key");

    let mut bundle = next_bundle(&mut stream).await;
    if bundle.jwt_authorities.len() < 2 {
        bundle = next_bundle(&mut stream).await;
    }
    assert_eq!(key_ids(&bundle.jwt_authorities), ["server-a-key", "server-b-key"], "the watch on node 3 sees both");
    assert!(bundle.version > first.version, "the version grows: {} then {}", first.version, bundle.version);

    let again = publish(cluster, 3, &server_a).await.expect("publishing the same key again succeeds");
    assert_eq!(key_ids(&again), ["server-a-key", "server-b-key"]);
    let nothing = tokio::time::timeout(Duration::from_millis(1500), stream.message()).await;
    assert!(nothing.is_err(), "republishing an unchanged key sends no bundle: {nothing:?}");
}

async fn reject_invalid_jwt_authorities(cluster: &DevCluster) {
    let mut empty_key = jwt_key("bad-key", 3600);
    empty_key.public_key = b"not a public key".to_vec();
    let mut taken = jwt_key("server-a-key", 3600);
    taken.expires_at += 10;
    let cases = [
        ("an unparseable public key", empty_key, Code::InvalidArgument, "public_key of key \"bad-key\" is not usable"),
        ("an empty key ID", jwt_key("", 3600), Code::InvalidArgument, "key_id is empty"),
        ("an expired key", jwt_key("old-key", -10), Code::InvalidArgument, "is not in the future"),
        ("a key ID already used", taken, Code::AlreadyExists, "\"server-a-key\" of trust domain \"example.org\""),
    ];
    for (name, bad, code, message) in cases {
        let status = publish(cluster, 1, &bad).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {}", status.message());
        assert!(status.message().contains(message), "{name}: {:?} should contain {message:?}", status.message());
    }

    let mut client = authority(cluster, 1, "istio").await;
    let request = PublishJwtAuthorityRequest {
        trust_domain: TRUST_DOMAIN.to_owned(),
        authority: Some(jwt_key("istio-key", 3600)),
    };
    let status = client.publish_jwt_authority(request).await.expect_err("istio may not publish");
    assert_eq!(status.code(), Code::PermissionDenied, "{}", status.message());

    let bundle = client
        .get_bundle(GetBundleRequest { trust_domain: TRUST_DOMAIN.to_owned() })
        .await
        .expect("get the bundle")
        .into_inner();
    assert_eq!(key_ids(&bundle.jwt_authorities), ["server-a-key", "server-b-key"], "no refused key was recorded");
}

fn istio_request(spiffe_id: &str, validity: i64) -> tonic::Request<IstioCertificateRequest> {
    let (_, csr) = common::p256_csr(spiffe_id, &[]);
    let csr_pem = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", csr));
    let mut metadata = prost_types::Struct::default();
    metadata.fields.insert(
        "CertSigner".to_owned(),
        prost_types::Value { kind: Some(prost_types::value::Kind::StringValue("default-signer".to_owned())) },
    );
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: csr_pem,
        validity_duration: validity,
        metadata: Some(metadata),
    });
    request.metadata_mut().insert("clusterid", "Kubernetes".parse().expect("header"));
    request.metadata_mut().insert("authorization", "Bearer not-a-real-token".parse().expect("header"));
    request
}

async fn serve_istio_agents(cluster: &DevCluster, work: &Path) {
    let channel = cluster.connection_as(2, "istio").connect().await.expect("connect as istio");
    let mut client = IstioCertificateServiceClient::new(channel);

    let mut request = istio_request("spiffe://example.org/ns/default/sa/web", 48 * 3600);
    request.metadata_mut().insert("x-request-id", "istio-allowed-1".parse().expect("header"));
    let chain = client.create_certificate(request).await.expect("an allowed identity").into_inner().cert_chain;
    assert!(chain.len() >= 2, "leaf first and root last: {} entries", chain.len());
    let leaf_der = pem::parse(&chain[0]).expect("leaf PEM").into_contents();
    let (_, leaf) = X509Certificate::from_der(&leaf_der).expect("parse leaf");
    let san = leaf.subject_alternative_name().expect("SAN").expect("present").value.general_names.clone();
    assert!(matches!(san.as_slice(), [GeneralName::URI("spiffe://example.org/ns/default/sa/web")]), "{san:?}");
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!(lifetime <= 24 * 3600 + 120, "48 h was cut to the caller's 24 h maximum: {lifetime}s");
    let root_der = pem::parse(chain.last().expect("root")).expect("root PEM").into_contents();
    let (_, root) = X509Certificate::from_der(&root_der).expect("parse root");
    assert_eq!(root.subject(), root.issuer(), "the last entry is a self-signed root");

    std::fs::write(work.join("istio-root.pem"), chain.last().expect("root")).expect("write root");
    std::fs::write(work.join("istio-chain.pem"), chain[1..chain.len() - 1].concat()).expect("write chain");
    std::fs::write(work.join("istio-leaf.pem"), &chain[0]).expect("write leaf");
    let path = |name: &str| work.join(name).display().to_string();
    common::openssl(&[
        "verify",
        "-CAfile",
        &path("istio-root.pem"),
        "-untrusted",
        &path("istio-chain.pem"),
        &path("istio-leaf.pem"),
    ]);

    let node_dir = cluster.node_dir(2);
    let event = wait_for_audit(&node_dir.join("audit.jsonl"), "istio-allowed-1");
    assert_eq!(event["metadata"]["header.clusterid"], "Kubernetes", "{event}");
    assert_eq!(event["metadata"]["metadata.CertSigner"], "default-signer", "{event}");
    assert!(!event.to_string().contains("not-a-real-token"), "the bearer token is never audited: {event}");

    let before = issued_total(cluster).await;
    for (name, spiffe_id) in [
        ("another path shape", "spiffe://example.org/ns/default/web"),
        ("Sigil's own identity", "spiffe://example.org/sigil/admin"),
    ] {
        let status = client.create_certificate(istio_request(spiffe_id, 3600)).await.expect_err(name);
        assert_eq!(status.code(), Code::PermissionDenied, "{name}: {}", status.message());
        assert!(status.message().contains(spiffe_id), "{name}: {:?} names the identity", status.message());
    }
    let status =
        client.create_certificate(istio_request("spiffe://example.org/ns/a/sa/b", -1)).await.expect_err("negative");
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert_eq!(issued_total(cluster).await, before, "refused Istio requests record nothing");
}

fn wait_for_audit(path: &Path, request_id: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let found = text
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|event| event["request_id"] == request_id);
        if let Some(event) = found {
            return event;
        }
        assert!(std::time::Instant::now() < deadline, "no audit event {request_id} in {}", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}
