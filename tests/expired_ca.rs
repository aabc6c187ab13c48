//! An intermediate that expires while the node runs: requests are refused with
//! FAILED_PRECONDITION and write no record. Runs the issuance path in-process on a SoftHSM token
//! in the test token folder, because a node whose own TLS certificate has expired cannot be
//! reached over TLS.

use std::sync::Arc;
use std::time::Duration;

use sigil::audit::AuditLog;
use sigil::ca::{CaCertificateSpec, CaChain, HsmSigner, IssuingCa, self_signed_root, sign_intermediate};
use sigil::config::{CallerPolicy, PolicyMode, PolicySection};
use sigil::issuance::{Issuance, IssuanceSettings, IssueError, RequestContext};
use sigil::metrics::Metrics;
use sigil::policy::Policy;
use sigil::replica::{Replica, ReplicaSettings};
use sigil::spiffe_id::SpiffeId;
use sigil_hsm::{Extractability, Hsm, HsmConfig, HsmMetrics, KeyType, Pin, TokenSelector};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

fn open_test_hsm() -> Hsm {
    std::fs::create_dir_all("/tmp/sigil-test-tokens").expect("create token folder");
    let label = format!("expired-ca-{:08x}", rand::random::<u32>());
    let pin = || Pin::new("test-user-pin".to_owned());
    sigil_hsm::init_token(MODULE.as_ref(), &label, &Pin::new("test-so-pin".to_owned()), &pin()).expect("init token");
    let config = HsmConfig { module: MODULE.into(), token: TokenSelector::Label(label), sessions: 2 };
    Hsm::open(&config, pin(), HsmMetrics::unregistered()).expect("open HSM")
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_intermediate_is_failed_precondition() {
    let hsm = open_test_hsm();
    let root_key = hsm.generate_key_pair("root", KeyType::EcP256, Extractability::Never).expect("root key");
    let ca_key = hsm.generate_key_pair("ca", KeyType::EcP256, Extractability::Never).expect("CA key");
    let root = HsmSigner::new(hsm.clone(), root_key).expect("root signer");
    let intermediate = HsmSigner::new(hsm.clone(), ca_key).expect("CA signer");
    let root_spec = CaCertificateSpec {
        common_name: "Root",
        organization: "Test",
        validity: Duration::from_secs(3600),
        path_len: None,
    };
    let root_der = self_signed_root(&root, &root_spec).expect("root");
    // Certificate times have one-second resolution; three seconds leave time to load the CA.
    let short = CaCertificateSpec {
        common_name: "Short",
        organization: "Test",
        validity: Duration::from_secs(3),
        path_len: Some(0),
    };
    let ca_der = sign_intermediate(&intermediate, &root, &root_der, &short).expect("intermediate");
    let chain = CaChain { intermediates_der: vec![ca_der], roots_der: vec![root_der] };
    let ca = Arc::new(IssuingCa::load(intermediate, chain, "Test", Duration::from_secs(30)).expect("load CA"));

    let folder = tempfile::tempdir().expect("temporary folder");
    let replica = Arc::new(
        Replica::open_offline(&ReplicaSettings::single_node(folder.path()), true).expect("open the replicated ledger"),
    );
    assert!(replica.wait_for_leader(Duration::from_secs(10)).await, "the single node becomes leader");
    let caller = CallerPolicy {
        spiffe_id: "spiffe://example.org/caller".into(),
        allowed_spiffe_ids: vec!["spiffe://example.org/**".into()],
        allowed_dns_names: Vec::new(),
        max_ttl: Duration::from_secs(3600),
        rate_per_second: 100.0,
        rate_burst: 100,
        admin: false,
        downstream_trust_domains: Vec::new(),
    };
    let issuance = Issuance::new(
        ca,
        Policy::new(&PolicySection { mode: PolicyMode::Enforce, callers: vec![caller] }),
        Arc::clone(&replica),
        Arc::new(AuditLog::disabled()),
        Metrics::new(prometheus::Registry::new()).expect("metrics"),
        IssuanceSettings { node_id: 1, trust_domain: "example.org".into(), default_ttl: Duration::from_secs(600) },
    );
    let context = RequestContext {
        request_id: "expired-1".into(),
        caller: Ok(SpiffeId::parse("spiffe://example.org/caller").expect("valid ID")),
    };
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let csr = sigil::client::svid_csr(&key, "spiffe://example.org/workload", &[]).expect("CSR");

    issuance.sign_x509_svid(&context, &csr, None).await.expect("issues while the intermediate is valid");
    let records = replica.ledger().issuance_count();

    tokio::time::sleep(Duration::from_secs(4)).await;
    let error = issuance.sign_x509_svid(&context, &csr, None).await.expect_err("intermediate expired");
    assert!(matches!(error, IssueError::CaUnavailable(_)), "{error:?}");
    let status = sigil::grpc::status_from(&error);
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(status.message().contains("CN=Short"), "{}", status.message());
    assert!(status.message().contains("expired"), "{}", status.message());
    assert_eq!(replica.ledger().issuance_count(), records, "a refused request writes no record");
}
