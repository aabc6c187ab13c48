//! Node start-up, restart, status output, metrics, and CA checks.

mod common;

use std::process::Command;

use common::{TestDeployment, http_get, p256_csr, sigil_bin};
use sigil::proto::SignX509SvidRequest;
use x509_parser::prelude::{FromDer as _, X509Certificate};

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_the_ledger() {
    let mut deployment = TestDeployment::create();
    deployment.start();
    let (_, csr) = p256_csr("spiffe://example.org/restart", &[]);
    let mut issuer = deployment.issuer().await;
    let mut serials = Vec::new();
    for _ in 0..20 {
        let response =
            issuer.sign_x509_svid(SignX509SvidRequest { csr: csr.clone(), ttl_seconds: None }).await.expect("issue");
        serials.push(response.into_inner().serial);
    }
    let before = deployment.node_status().await;
    assert!(deployment.stop().success(), "node stops cleanly on SIGTERM");

    deployment.start();
    let after = deployment.node_status().await;
    // The restarted node reuses its saved TLS certificate, so it records nothing new; its election
    // appends an empty Raft entry, which moves the applied index but not the records.
    assert_eq!(after.issued_total, before.issued_total);
    assert!(after.applied_index > before.applied_index, "{} then {}", before.applied_index, after.applied_index);
    assert_eq!(after.ca.as_ref().map(|c| &c.fingerprint_sha256), before.ca.as_ref().map(|c| &c.fingerprint_sha256));
}

#[tokio::test(flavor = "multi_thread")]
async fn start_fails_on_hsm_key_mismatch() {
    let first = TestDeployment::create();
    let second = TestDeployment::create();

    // Give the first node the second node's ledger: its CA certificate is for another HSM key
    // that has the same label.
    let ledger = first.node_dir().join("data/ledger");
    std::fs::remove_dir_all(&ledger).expect("remove ledger");
    let copied = Command::new("cp")
        .arg("-a")
        .arg(second.node_dir().join("data/ledger"))
        .arg(&ledger)
        .status()
        .expect("copy ledger");
    assert!(copied.success());

    let output = first.run_sigil(&["serve", "--config", first.config_path().to_str().expect("UTF-8")]);
    assert!(!output.status.success(), "the node must not start");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("does not match the installed intermediate certificate"), "{stderr}");
    assert!(stderr.contains("sigil-intermediate"), "names the key label: {stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_command_prints_json_for_scripts() {
    let mut deployment = TestDeployment::create();
    deployment.start();
    // `sigil status --dev-dir` reads endpoints.json, which only a running `sigil dev` keeps.
    std::fs::write(
        deployment.dir.join("endpoints.json"),
        serde_json::to_string(&deployment.endpoints()).expect("encode endpoints"),
    )
    .expect("write endpoints.json");

    let output = Command::new(sigil_bin())
        .args(["status", "--json", "--dev-dir"])
        .arg(&deployment.dir)
        .output()
        .expect("run sigil status");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).expect("status is JSON");
    assert_eq!(status["trust_domain"], "example.org");
    let node = &status["nodes"][0];
    assert_eq!(node["id"], 1);
    assert_eq!(node["ready"], true);
    assert_eq!(node["role"], "leader");
    assert!(node["term"].as_u64().is_some_and(|term| term >= 1), "{node}");
    assert_eq!(node["commit_index"], node["applied_index"]);
    assert_eq!(node["ca"]["key_label"], "sigil-intermediate");
    assert_eq!(node["hsm"]["token_label"], "sigil-node-1");
    assert!(node["ledger_digest"].as_str().is_some_and(|d| d.len() == 64), "{node}");

    let table = Command::new(sigil_bin()).args(["status", "--dev-dir"]).arg(&deployment.dir).output().expect("run");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("leader"), "{text}");
    assert!(text.contains("true"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_health_endpoints_report_issuance() {
    let mut deployment = TestDeployment::create();
    deployment.start();
    let (_, csr) = p256_csr("spiffe://example.org/metrics", &[]);
    let mut issuer = deployment.issuer().await;
    issuer.sign_x509_svid(SignX509SvidRequest { csr, ttl_seconds: None }).await.expect("issue");
    issuer.sign_x509_svid(SignX509SvidRequest { csr: vec![1, 2, 3], ttl_seconds: None }).await.expect_err("garbage");

    let address = deployment.endpoints().nodes[0].metrics.clone();
    let metrics = http_get(&address, "/metrics").expect("GET /metrics");
    for expected in [
        "sigil_issued_total{profile=\"x509-svid\",result=\"issued\"} 1",
        "sigil_issued_total{profile=\"x509-svid\",result=\"INVALID_ARGUMENT\"} 1",
        "sigil_issuance_duration_seconds_bucket",
        "sigil_hsm_sign_duration_seconds_bucket",
        "sigil_policy_decisions_total{decision=\"allow\"} 1",
        "sigil_ca_not_after_seconds",
        "sigil_ready 1",
    ] {
        assert!(metrics.contains(expected), "/metrics lacks {expected:?}:\n{metrics}");
    }
    assert!(http_get(&address, "/healthz").is_some_and(|r| r.starts_with("HTTP/1.1 200")));
    assert!(http_get(&address, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")));
}

#[tokio::test(flavor = "multi_thread")]
async fn ttl_is_clamped_to_the_intermediate_not_after() {
    let mut deployment = TestDeployment::create();

    // Replace the CA with one whose intermediate expires in 90 minutes.
    let mut table = deployment.config_table();
    table["ca"].as_table_mut().expect("ca table").insert("key_label".into(), "short-lived".into());
    deployment.write_config(&table);
    std::fs::remove_dir_all(deployment.node_dir().join("data")).expect("remove the node's ledger and Raft log");
    let config = deployment.config_path();
    let init =
        deployment.run_sigil(&["init", "--config", config.to_str().expect("UTF-8"), "--dev-root", "--validity", "90m"]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let admin = deployment.issue_client("admin", common::ADMIN_ID);
    std::fs::copy(admin.join("bundle.pem"), deployment.dir.join("bundle.pem")).expect("replace bundle");
    deployment.start();

    let mut issuer = sigil::proto::issuer_client::IssuerClient::new(deployment.connect_as(&admin).await);
    let (_, csr) = p256_csr("spiffe://example.org/clamped", &[]);
    let response = issuer
        .sign_x509_svid(SignX509SvidRequest { csr, ttl_seconds: Some(20 * 3600) })
        .await
        .expect("issue")
        .into_inner();
    let (_, intermediate) = X509Certificate::from_der(&response.intermediates[0]).expect("parse intermediate");
    let ca_not_after = intermediate.validity().not_after.timestamp();
    assert_eq!(response.not_after, ca_not_after, "leaf notAfter is clamped to the intermediate's");
}

#[tokio::test(flavor = "multi_thread")]
async fn issue_svid_command_writes_key_chain_and_bundle() {
    use std::os::unix::fs::PermissionsExt as _;

    let mut deployment = TestDeployment::create();
    deployment.start();
    let out = deployment.root.path().join("cli-svid");
    let client = deployment.dir.join("client");
    let output = Command::new(sigil_bin())
        .args(["issue", "svid", "--server", &deployment.grpc_address()])
        .arg("--cert")
        .arg(client.join("cert.pem"))
        .arg("--key")
        .arg(client.join("key.pem"))
        .arg("--ca")
        .arg(deployment.dir.join("bundle.pem"))
        .args(["--spiffe-id", "spiffe://example.org/cli/web", "--dns", "web.example.org", "--ttl", "15m", "--out"])
        .arg(&out)
        .output()
        .expect("run sigil issue svid");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let chain = std::fs::read_to_string(out.join("svid.pem")).expect("read svid.pem");
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2, "leaf then one intermediate");
    let key_mode = std::fs::metadata(out.join("svid.key")).expect("svid.key exists").permissions().mode();
    assert_eq!(key_mode & 0o777, 0o600, "svid.key is readable by its owner only");
    let bundle = std::fs::read_to_string(out.join("bundle.pem")).expect("read bundle.pem");
    assert_eq!(bundle, std::fs::read_to_string(deployment.dir.join("bundle.pem")).expect("read dev bundle"));

    let leaf_der = pem::parse(&chain).expect("PEM").into_contents();
    let (_, leaf) = X509Certificate::from_der(&leaf_der).expect("parse leaf");
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(lifetime, 15 * 60 + 30, "15 minutes plus the 30-second backdate");

    let refused = Command::new(sigil_bin())
        .args(["issue", "svid", "--server", &deployment.grpc_address()])
        .arg("--cert")
        .arg(client.join("cert.pem"))
        .arg("--key")
        .arg(client.join("key.pem"))
        .arg("--ca")
        .arg(deployment.dir.join("bundle.pem"))
        .args(["--spiffe-id", "spiffe://other.org/web", "--out"])
        .arg(deployment.root.path().join("refused"))
        .output()
        .expect("run sigil issue svid");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("InvalidArgument"), "{stderr}");
    assert!(stderr.contains("other.org"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn start_up_purges_records_past_retention() {
    use sigil::ledger::{Command as LedgerCommand, IssuanceRecord, Ledger};

    let mut deployment = TestDeployment::create();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let record = |serial: u8, hours_ago: i64| IssuanceRecord {
        serial: vec![0x40, serial],
        spiffe_id: "spiffe://example.org/old".into(),
        not_after_unix: now - hours_ago * 3600,
        issued_at_unix: now - hours_ago * 3600 - 3600,
        caller: common::ADMIN_ID.into(),
        profile: "x509-svid".into(),
        cert_sha256: vec![0; 32],
    };
    let recorded = {
        // The node is stopped, so the test may write through a Raft node of its own.
        let config = sigil::config::Config::load(&deployment.config_path()).expect("load config");
        let replica = sigil::setup::open_offline(&config).await.expect("open the replicated ledger");
        let command = LedgerCommand::record_issuances(vec![record(1, 72), record(2, 2)]);
        replica.write(sigil_raft::RequestId::random(), &command).await.expect("record old certificates");
        let ledger = replica.ledger();
        assert_eq!(
            ledger.issuance(&[0x40, 1]).expect("read").map(|r| r.spiffe_id),
            Some("spiffe://example.org/old".into())
        );
        ledger.issuance_count()
    };

    // With a retention of one day, the record that expired 3 days ago goes and the one that
    // expired 2 hours ago stays.
    let mut table = deployment.config_table();
    let issuance = table.entry("issuance").or_insert_with(|| toml::Value::Table(toml::Table::new()));
    issuance.as_table_mut().expect("issuance table").insert("retention".into(), "1day".into());
    deployment.write_config(&table);
    deployment.start();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        let status = deployment.node_status().await;
        if status.issued_total < recorded || std::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(status.issued_total, recorded - 1, "the leader purges the expired record soon after start");
    assert!(deployment.stop().success());

    let ledger = Ledger::open(deployment.node_dir().join("data/ledger")).expect("reopen ledger");
    assert_eq!(ledger.issuance(&[0x40, 1]).expect("read"), None, "expired 3 days ago: purged");
    assert!(ledger.issuance(&[0x40, 2]).expect("read").is_some(), "expired 2 hours ago: kept");
    assert_eq!(ledger.issuance_count(), status.issued_total);
}
