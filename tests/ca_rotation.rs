//! CA rotation on a 3-node dev cluster: the new root reaches the trust bundle before the new
//! intermediate signs, every node switches at the activation time, and a tainted root is marked
//! in the bundle while the last untainted one cannot be tainted.

#[path = "common/cluster.rs"]
#[allow(dead_code, reason = "this test uses only part of the cluster harness")]
mod cluster_harness;
mod common;

use std::time::{Duration, Instant};

use cluster_harness::{CLUSTER_TESTS, DevCluster};
use sigil::proto::admin_client::AdminClient;
use sigil::proto::authority_client::AuthorityClient;
use sigil::proto::issuer_client::IssuerClient;
use sigil::proto::{
    Bundle, GetBundleRequest, InstallCaVersionRequest, PrepareCaKeyRequest, RotateCaRequest, SignX509SvidRequest,
    TaintCaRootRequest,
};
use tonic::Code;

/// Seconds from the rotation until the new intermediate signs.
const ACTIVATE_AFTER: u64 = 6;

async fn next_bundle(stream: &mut tonic::Streaming<Bundle>) -> Bundle {
    tokio::time::timeout(Duration::from_secs(15), stream.message())
        .await
        .expect("a bundle arrives within 15 s")
        .expect("the stream carries no error")
        .expect("the stream stays open")
}

/// Returns the issuing intermediate of a fresh SVID from node `id`.
async fn signing_intermediate(cluster: &DevCluster, id: u64) -> Vec<u8> {
    let (_, csr) = common::p256_csr("spiffe://example.org/rotation", &[]);
    let mut issuer = IssuerClient::new(cluster.channel(id).await);
    let svid = issuer
        .sign_x509_svid(SignX509SvidRequest { csr, ttl_seconds: Some(600) })
        .await
        .expect("issue an SVID")
        .into_inner();
    svid.intermediates.first().cloned().expect("the SVID comes with its intermediate")
}

fn sha256_hex(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_publishes_then_switches_then_taints() {
    let _serial = CLUSTER_TESTS.lock().await;
    let cluster = DevCluster::start(3, 0).await;
    let old_intermediate = signing_intermediate(&cluster, 1).await;

    let watch_channel = cluster.connection_as(3, "spire-server").connect().await.expect("connect");
    let mut stream = AuthorityClient::new(watch_channel)
        .watch_bundle(GetBundleRequest { trust_domain: String::new() })
        .await
        .expect("open the bundle watch")
        .into_inner();
    let first = next_bundle(&mut stream).await;
    assert_eq!(first.x509_authorities.len(), 1, "one root before the rotation");
    let old_root = first.x509_authorities[0].certificate.clone();

    let mut admin = AdminClient::new(cluster.channel(2).await);
    let status = admin
        .rotate_ca(RotateCaRequest { activate_after_seconds: ACTIVATE_AFTER, validity_seconds: 60 })
        .await
        .expect_err("a one-minute intermediate is too short");
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    assert!(status.message().contains("validity_seconds 60"), "{}", status.message());

    let rotated = admin
        .rotate_ca(RotateCaRequest { activate_after_seconds: ACTIVATE_AFTER, validity_seconds: 30 * 24 * 3600 })
        .await
        .expect("rotate the CA")
        .into_inner();
    let rotated_at = Instant::now();
    assert_eq!(rotated.root_fingerprint_sha256, sha256_hex(&rotated.root));

    let published = next_bundle(&mut stream).await;
    let roots: Vec<&Vec<u8>> = published.x509_authorities.iter().map(|root| &root.certificate).collect();
    assert_eq!(roots.len(), 2, "the new root joins the bundle");
    assert!(roots.contains(&&old_root), "the old root stays published");
    assert!(roots.contains(&&rotated.root), "the new root is published");
    assert_eq!(
        signing_intermediate(&cluster, 1).await,
        old_intermediate,
        "the old intermediate signs until activation"
    );

    // Every node switches within one check interval of the activation time.
    let deadline = rotated_at + Duration::from_secs(ACTIVATE_AFTER + 20);
    for id in 1..=3 {
        loop {
            let intermediate = signing_intermediate(&cluster, id).await;
            if intermediate == rotated.intermediate {
                break;
            }
            assert_eq!(intermediate, old_intermediate, "node {id} signs with a known intermediate");
            assert!(Instant::now() < deadline, "node {id} did not switch to the new intermediate in time");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert!(rotated_at.elapsed() >= Duration::from_secs(ACTIVATE_AFTER - 1), "no node switched early");

    let tainted = admin
        .taint_ca_root(TaintCaRootRequest { root_fingerprint_sha256: sha256_hex(&old_root) })
        .await
        .expect("taint the old root")
        .into_inner();
    assert_eq!(tainted.signing_version, rotated.version, "the new version signs after the taint");
    let marked = next_bundle(&mut stream).await;
    let old = marked.x509_authorities.iter().find(|root| root.certificate == old_root).expect("old root stays listed");
    assert!(old.tainted, "the old root is marked tainted");
    let new = marked.x509_authorities.iter().find(|root| root.certificate == rotated.root).expect("new root listed");
    assert!(!new.tainted, "the new root is not tainted");

    let status = admin
        .taint_ca_root(TaintCaRootRequest { root_fingerprint_sha256: sha256_hex(&rotated.root) })
        .await
        .expect_err("the last untainted root cannot be tainted");
    assert_eq!(status.code(), Code::FailedPrecondition, "{}", status.message());
    assert!(status.message().contains("would leave no CA version"), "{}", status.message());
    let status = admin
        .taint_ca_root(TaintCaRootRequest { root_fingerprint_sha256: "00".repeat(32) })
        .await
        .expect_err("an unknown fingerprint");
    assert!(status.message().contains(&"00".repeat(32)), "{}", status.message());

    rotate_under_an_offline_root(&cluster, &mut stream, &rotated.intermediate).await;
}

/// Signs `csr_pem` with a new openssl root that never touches Sigil, as an offline root would.
/// Returns the intermediate and the root, DER.
fn sign_with_offline_root(work: &std::path::Path, csr_pem: &str) -> (Vec<u8>, Vec<u8>) {
    let path = |name: &str| work.join(name).display().to_string();
    std::fs::write(work.join("next.csr"), csr_pem).expect("write CSR");
    common::openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &path("root.key"),
        "-out",
        &path("root.pem"),
        "-days",
        "3650",
        "-subj",
        "/O=Example Offline Root/CN=Root 2",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    std::fs::write(
        work.join("next.ext"),
        "basicConstraints=critical,CA:TRUE,pathlen:1\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n\
         subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )
    .expect("write extensions");
    common::openssl(&[
        "x509",
        "-req",
        "-in",
        &path("next.csr"),
        "-CA",
        &path("root.pem"),
        "-CAkey",
        &path("root.key"),
        "-CAcreateserial",
        "-days",
        "365",
        "-sha256",
        "-extfile",
        &path("next.ext"),
        "-out",
        &path("next.pem"),
    ]);
    let der = |name: &str| {
        let text = std::fs::read_to_string(work.join(name)).expect("read PEM");
        pem::parse(text).expect("parse PEM").into_contents()
    };
    (der("next.pem"), der("root.pem"))
}

/// The offline-root path: node 1 prepares the next key and its CSR, openssl signs it, the signed
/// intermediate is refused by a node without the key and installed through node 1, its root is
/// published, and every node switches to it.
async fn rotate_under_an_offline_root(
    cluster: &DevCluster,
    stream: &mut tonic::Streaming<Bundle>,
    previous_intermediate: &[u8],
) {
    let work = tempfile::tempdir().expect("temporary folder");
    let mut node_1 = AdminClient::new(cluster.channel(1).await);
    let prepared = node_1.prepare_ca_key(PrepareCaKeyRequest {}).await.expect("prepare the next key").into_inner();
    assert_eq!(prepared.node_id, 1);
    let (intermediate, root) = sign_with_offline_root(work.path(), &prepared.csr);
    let request = InstallCaVersionRequest {
        key_label: prepared.key_label.clone(),
        intermediates: vec![intermediate.clone()],
        roots: vec![root.clone()],
        activate_after_seconds: 3,
    };

    let mut node_2 = AdminClient::new(cluster.channel(2).await);
    let status = node_2.install_ca_version(request.clone()).await.expect_err("node 2 does not hold the key");
    assert_eq!(status.code(), Code::FailedPrecondition, "{}", status.message());
    assert!(status.message().contains(&prepared.key_label), "{}", status.message());

    let installed = node_1.install_ca_version(request).await.expect("install through node 1").into_inner();
    assert_eq!(installed.root, root);
    let published = next_bundle(stream).await;
    assert!(
        published.x509_authorities.iter().any(|authority| authority.certificate == root),
        "the offline root joins the bundle"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    for id in 1..=3 {
        loop {
            let signing = signing_intermediate(cluster, id).await;
            if signing == intermediate {
                break;
            }
            assert_eq!(signing, previous_intermediate, "node {id} signs with a known intermediate");
            assert!(Instant::now() < deadline, "node {id} did not switch to the offline root's intermediate");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
