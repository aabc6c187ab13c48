//! The production key ceremony: `sigil init --csr-out`, an offline root (openssl) signs the
//! intermediate, `sigil ca install` checks and records it, and the node issues SVIDs that verify
//! against that root.

mod common;

use common::{TestDeployment, openssl, p256_csr};
use sigil::proto::SignX509SvidRequest;

#[tokio::test(flavor = "multi_thread")]
async fn intermediate_signed_by_offline_root_issues_verifiable_svids() {
    let mut deployment = TestDeployment::create();
    let work = deployment.root.path().join("ceremony");
    std::fs::create_dir_all(&work).expect("create work folder");
    let path = |name: &str| work.join(name).to_str().expect("UTF-8 path").to_owned();

    // Start over with a new key and an empty ledger, as on a new node.
    let mut table = deployment.config_table();
    table["ca"].as_table_mut().expect("ca table").insert("key_label".into(), "production-intermediate".into());
    deployment.write_config(&table);
    std::fs::remove_dir_all(deployment.node_dir().join("data")).expect("remove the ledger and Raft log");
    let config = deployment.config_path().to_str().expect("UTF-8 path").to_owned();

    let init = deployment.run_sigil(&["init", "--config", &config, "--csr-out", &path("intermediate.csr")]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));

    // The offline root, made and used by openssl only.
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-384",
        "-nodes",
        "-keyout",
        &path("root.key"),
        "-out",
        &path("root.pem"),
        "-days",
        "3650",
        "-subj",
        "/C=US/O=Example Offline Root/CN=Example Root CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    std::fs::write(
        work.join("intermediate.ext"),
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )
    .expect("write extensions");
    openssl(&[
        "x509",
        "-req",
        "-in",
        &path("intermediate.csr"),
        "-CA",
        &path("root.pem"),
        "-CAkey",
        &path("root.key"),
        "-CAcreateserial",
        "-days",
        "365",
        "-sha384",
        "-extfile",
        &path("intermediate.ext"),
        "-out",
        &path("intermediate.pem"),
    ]);

    // A root that did not sign the intermediate is rejected by name, and nothing is installed.
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &path("other.key"),
        "-out",
        &path("other.pem"),
        "-days",
        "30",
        "-subj",
        "/CN=Other Root",
    ]);
    let intermediate = path("intermediate.pem");
    let install_with_root = |root: &str| {
        deployment.run_sigil(&["ca", "install", "--config", &config, "--cert", &intermediate, "--root", root])
    };
    let wrong = install_with_root(&path("other.pem"));
    assert!(!wrong.status.success(), "install with the wrong root must fail");
    let message = String::from_utf8_lossy(&wrong.stderr);
    assert!(message.contains("Example Root CA"), "names the missing issuer: {message}");

    let install = install_with_root(&path("root.pem"));
    assert!(install.status.success(), "{}", String::from_utf8_lossy(&install.stderr));

    let admin = deployment.issue_client("admin", common::ADMIN_ID);
    std::fs::copy(work.join("root.pem"), deployment.dir.join("bundle.pem")).expect("replace bundle");
    deployment.start();

    let mut issuer = sigil::proto::issuer_client::IssuerClient::new(deployment.connect_as(&admin).await);
    let (_, csr) = p256_csr("spiffe://example.org/offline/workload", &[]);
    let response =
        issuer.sign_x509_svid(SignX509SvidRequest { csr, ttl_seconds: None }).await.expect("issue").into_inner();

    let pem = |der: &[u8]| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
    std::fs::write(work.join("leaf.pem"), pem(&response.certificate)).expect("write leaf");
    std::fs::write(work.join("chain.pem"), response.intermediates.iter().map(|d| pem(d)).collect::<String>())
        .expect("write chain");
    assert_eq!(response.trust_bundle.len(), 1);
    let verified =
        openssl(&["verify", "-CAfile", &path("root.pem"), "-untrusted", &path("chain.pem"), &path("leaf.pem")]);
    assert!(String::from_utf8_lossy(&verified).contains(": OK"), "{}", String::from_utf8_lossy(&verified));
}
