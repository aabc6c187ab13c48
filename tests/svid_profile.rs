//! Issued X509-SVIDs checked by three independent verifiers (openssl, pkilint, the `spiffe`
//! crate) and against the profile field by field, for each accepted key type.

mod common;

use std::process::Command;

use common::{TestDeployment, openssl, openssl_csr, p256_csr};
use sigil::proto::SignX509SvidRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

fn pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

fn pkilint_available() -> bool {
    Command::new("lint_pkix_cert").arg("--help").output().is_ok_and(|o| o.status.success())
}

/// Runs pkilint's RFC 5280 linter and returns its findings of severity WARNING and above, except
/// one false positive. pkilint 0.x checks URI SANs with the `validators` package, which accepts
/// only http, https, ftp and similar schemes. So every `spiffe://` URI is reported as
/// pkix.invalid_uri_syntax, even though it is a valid RFC 3986 URI.
fn pkilint_findings(path: &std::path::Path) -> Vec<serde_json::Value> {
    let output = Command::new("lint_pkix_cert")
        .args(["lint", "--severity", "WARNING", "--format", "JSON"])
        .arg(path)
        .output()
        .expect("run pkilint");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("pkilint output is not JSON ({e}): {}", String::from_utf8_lossy(&output.stderr)));
    let mut findings = Vec::new();
    for result in report["results"].as_array().expect("results array") {
        for finding in result["finding_descriptions"].as_array().expect("finding_descriptions array") {
            let spiffe_uri_false_positive = finding["code"] == "pkix.invalid_uri_syntax"
                && finding["message"].as_str().is_some_and(|m| m.contains("\"spiffe://"));
            if !spiffe_uri_false_positive {
                findings.push(serde_json::json!({ "at": result["node_path"], "finding": finding }));
            }
        }
    }
    findings
}

#[tokio::test(flavor = "multi_thread")]
async fn svids_pass_openssl_pkilint_and_spiffe_parser() {
    let mut deployment = TestDeployment::create();
    deployment.start();
    let work = deployment.root.path().join("svids");
    std::fs::create_dir_all(&work).expect("create work folder");

    let (p256_key, p256_csr) = p256_csr("spiffe://example.org/ns/prod/sa/web", &["web.example.org"]);
    let san = "subjectAltName=URI:spiffe://example.org/openssl/workload";
    // (name, CSR, the PKCS#8 key when the test made it in-process for the spiffe crate)
    type KeyCase = (&'static str, Vec<u8>, Option<Vec<u8>>);
    let cases: Vec<KeyCase> = vec![
        ("p256", p256_csr, Some(p256_key.serialize_der())),
        ("p384", openssl_csr(&work, "p384", "ec", &["ec_paramgen_curve:P-384"], &[san]), None),
        ("rsa2048", openssl_csr(&work, "rsa2048", "rsa:2048", &[], &[san]), None),
        ("rsa4096", openssl_csr(&work, "rsa4096", "rsa:4096", &[], &[san]), None),
        ("ed25519", openssl_csr(&work, "ed25519", "ed25519", &[], &[san]), None),
    ];

    let mut issuer = deployment.issuer().await;
    for (name, csr, key_der) in cases {
        let response = issuer
            .sign_x509_svid(SignX509SvidRequest { csr, ttl_seconds: Some(1800) })
            .await
            .unwrap_or_else(|status| panic!("{name}: {status}"))
            .into_inner();

        let leaf_path = work.join(format!("{name}-leaf.pem"));
        let chain_path = work.join(format!("{name}-intermediates.pem"));
        let bundle_path = work.join(format!("{name}-bundle.pem"));
        std::fs::write(&leaf_path, pem(&response.certificate)).expect("write leaf");
        std::fs::write(&chain_path, response.intermediates.iter().map(|d| pem(d)).collect::<String>())
            .expect("write chain");
        std::fs::write(&bundle_path, response.trust_bundle.iter().map(|d| pem(d)).collect::<String>())
            .expect("write bundle");

        let verified = openssl(&[
            "verify",
            "-CAfile",
            bundle_path.to_str().expect("UTF-8"),
            "-untrusted",
            chain_path.to_str().expect("UTF-8"),
            "-purpose",
            "sslclient",
            leaf_path.to_str().expect("UTF-8"),
        ]);
        assert!(String::from_utf8_lossy(&verified).contains(": OK"), "{name}: openssl verify output {verified:?}");

        assert!(pkilint_available(), "pkilint is missing; run scripts/install-prereqs.sh");
        let findings = pkilint_findings(&leaf_path);
        assert!(findings.is_empty(), "{name}: pkilint findings: {findings:#?}");

        if let Some(key_der) = key_der {
            let mut chain_der = response.certificate.clone();
            for intermediate in &response.intermediates {
                chain_der.extend_from_slice(intermediate);
            }
            let svid = spiffe::X509Svid::parse_from_der(&chain_der, &key_der).expect("spiffe crate parses the SVID");
            assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/ns/prod/sa/web");
            assert_eq!(svid.cert_chain().len(), 1 + response.intermediates.len());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn svid_follows_profile_not_csr_extensions() {
    let mut deployment = TestDeployment::create();
    deployment.start();
    let work = deployment.root.path().join("profile");
    std::fs::create_dir_all(&work).expect("create work folder");

    // The CSR requests a CA certificate, keyCertSign and codeSigning, all critical; the profile
    // must ignore every one of them.
    let csr = openssl_csr(
        &work,
        "greedy",
        "rsa:2048",
        &[],
        &[
            "subjectAltName=URI:spiffe://example.org/greedy,DNS:greedy.example.org",
            "basicConstraints=critical,CA:TRUE",
            "keyUsage=critical,keyCertSign,cRLSign",
            "extendedKeyUsage=critical,codeSigning",
        ],
    );
    let requested_at = time::OffsetDateTime::now_utc();
    let mut issuer = deployment.issuer().await;
    let response = issuer
        .sign_x509_svid(SignX509SvidRequest { csr, ttl_seconds: Some(600) })
        .await
        .expect("critical requested extensions are accepted and ignored")
        .into_inner();

    let (_, leaf) = X509Certificate::from_der(&response.certificate).expect("parse leaf");
    let (_, intermediate) = X509Certificate::from_der(&response.intermediates[0]).expect("parse intermediate");

    let basic = leaf.basic_constraints().expect("basicConstraints parses").expect("basicConstraints present");
    assert!(basic.critical, "basicConstraints is critical");
    assert!(!basic.value.ca, "cA is FALSE");

    let key_usage = leaf.key_usage().expect("keyUsage parses").expect("keyUsage present");
    assert!(key_usage.critical, "keyUsage is critical");
    assert!(key_usage.value.digital_signature());
    assert!(key_usage.value.key_encipherment(), "RSA keys get keyEncipherment");
    assert!(!key_usage.value.key_cert_sign(), "keyCertSign from the CSR is not copied");
    assert!(!key_usage.value.crl_sign(), "cRLSign from the CSR is not copied");

    let eku = leaf.extended_key_usage().expect("EKU parses").expect("EKU present");
    assert!(eku.value.server_auth);
    assert!(eku.value.client_auth);
    assert!(!eku.value.code_signing, "codeSigning from the CSR is not copied");

    let san = leaf.subject_alternative_name().expect("SAN parses").expect("SAN present");
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None })
        .collect();
    assert_eq!(uris, ["spiffe://example.org/greedy"]);
    assert!(san.value.general_names.contains(&GeneralName::DNSName("greedy.example.org")));

    let ski = leaf.extensions().iter().find_map(|e| match e.parsed_extension() {
        ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
        _ => None,
    });
    assert!(ski.is_some(), "leaf has an SKI");
    let issuer_ski = intermediate.extensions().iter().find_map(|e| match e.parsed_extension() {
        ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
        _ => None,
    });
    let aki = leaf.extensions().iter().find_map(|e| match e.parsed_extension() {
        ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref().map(|k| k.0.to_vec()),
        _ => None,
    });
    assert_eq!(aki, issuer_ski, "AKI equals the issuer's SKI");

    let serial = leaf.raw_serial();
    assert!(serial.len() <= 20, "serial is {} octets", serial.len());
    assert!(serial.len() >= 8, "serial is {} octets", serial.len());
    assert_eq!(serial[0] & 0x80, 0, "serial is positive");

    let not_before = leaf.validity().not_before.to_datetime();
    let not_after = leaf.validity().not_after.to_datetime();
    let backdate = requested_at - not_before;
    assert!(
        backdate >= time::Duration::seconds(28) && backdate <= time::Duration::seconds(40),
        "backdated by {backdate}"
    );
    let lifetime = not_after - requested_at;
    assert!(lifetime > time::Duration::seconds(590), "lifetime {lifetime}");
    assert!(lifetime <= time::Duration::seconds(602), "lifetime {lifetime}");
    assert_eq!(response.not_after, not_after.unix_timestamp());
    assert_eq!(response.serial, hex::encode(serial));
}

#[tokio::test(flavor = "multi_thread")]
async fn serials_are_unique_positive_and_random() {
    let mut deployment = TestDeployment::create();
    deployment.start();
    let (_, csr) = p256_csr("spiffe://example.org/serials", &[]);
    let mut issuer = deployment.issuer().await;

    let mut serials = std::collections::HashSet::new();
    let mut ones = 0u32;
    const COUNT: usize = 300;
    for _ in 0..COUNT {
        let response = issuer
            .sign_x509_svid(SignX509SvidRequest { csr: csr.clone(), ttl_seconds: Some(60) })
            .await
            .expect("issue")
            .into_inner();
        let serial = hex::decode(&response.serial).expect("hex serial");
        assert_eq!(serial.len(), 16, "serial {} is 16 octets", response.serial);
        assert_eq!(serial[0] & 0xc0, 0x40, "serial {} is positive and minimally encoded", response.serial);
        ones += serial[1..].iter().map(|b| b.count_ones()).sum::<u32>();
        assert!(serials.insert(serial), "duplicate serial {}", response.serial);
    }
    // 300 serials of 120 random bits after the first octet: the share of one bits is close to half.
    let share = f64::from(ones) / (COUNT as f64 * 120.0);
    assert!((0.47..0.53).contains(&share), "share of one bits {share}");
    assert!(deployment.node_status().await.issued_total >= COUNT as u64);
}
