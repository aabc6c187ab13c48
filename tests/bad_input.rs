//! Every refused request returns the right gRPC status with a message naming the bad value,
//! writes one audit event, and writes no issuance record.

mod common;

use common::{TestDeployment, openssl_csr, p256_csr};
use sigil::proto::SignX509SvidRequest;
use sigil::proto::issuer_client::IssuerClient;
use tonic::Code;

/// Rebuilds a DER CSR with its DER ECDSA signature replaced by the raw r||s form.
fn with_raw_signature(csr: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::{FromDer, X509CertificationRequest};
    let (_, parsed) = X509CertificationRequest::from_der(csr).expect("parse CSR");
    let info = parsed.certification_request_info.raw;
    let der_signature = &parsed.signature_value.data;
    let (r, s) = split_ecdsa_der(der_signature);
    let mut raw = fixed_32(r);
    raw.extend(fixed_32(s));

    let algorithm = [0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    let mut bit_string = vec![0x00];
    bit_string.extend(raw);
    let mut body = info.to_vec();
    body.extend(algorithm);
    body.extend(der_tlv(0x03, &bit_string));
    der_tlv(0x30, &body)
}

fn split_ecdsa_der(sig: &[u8]) -> (&[u8], &[u8]) {
    assert_eq!(sig[0], 0x30, "ECDSA signature is a SEQUENCE");
    let body = &sig[2..];
    let r_len = body[1] as usize;
    let r = &body[2..2 + r_len];
    let rest = &body[2 + r_len..];
    let s_len = rest[1] as usize;
    (r, &rest[2..2 + s_len])
}

fn fixed_32(integer: &[u8]) -> Vec<u8> {
    let trimmed: Vec<u8> = integer.iter().copied().skip_while(|b| *b == 0).collect();
    let mut out = vec![0u8; 32 - trimmed.len()];
    out.extend(trimmed);
    out
}

fn der_tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match value.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n < 0x100 => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend(value);
    out
}

struct Case {
    name: &'static str,
    csr: Vec<u8>,
    ttl_seconds: Option<i64>,
    code: Code,
    /// Text the status message must contain: the bad value, or what is allowed.
    message: &'static str,
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_audited_and_not_recorded() {
    let mut deployment = TestDeployment::create();
    deployment.add_caller(toml::toml! {
        spiffe_id = "spiffe://example.org/limited"
        allowed_spiffe_ids = ["spiffe://example.org/limited/*"]
        allowed_dns_names = ["*.limited.example.org"]
        max_ttl = "1h"
    });
    let limited = deployment.issue_client("limited", "spiffe://example.org/limited");
    let outsider = deployment.issue_client("outsider", "spiffe://example.org/outsider");
    deployment.start();
    let work = deployment.root.path().join("csrs");
    std::fs::create_dir_all(&work).expect("create work folder");

    let id = |path: &str| format!("subjectAltName=URI:spiffe://example.org{path}");
    let (_, good) = p256_csr("spiffe://example.org/limited/web", &[]);
    let mut bad_signature = good.clone();
    let last = bad_signature.len() - 3;
    bad_signature[last] ^= 0x5a;
    let pem_csr = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", good.clone())).into_bytes();

    let mut cases = vec![
        Case {
            name: "empty",
            csr: Vec::new(),
            ttl_seconds: None,
            code: Code::InvalidArgument,
            message: "CSR is empty",
        },
        Case {
            name: "garbage",
            csr: b"not a CSR at all".to_vec(),
            ttl_seconds: None,
            code: Code::InvalidArgument,
            message: "not a valid DER PKCS#10",
        },
        Case {
            name: "oversize",
            csr: vec![0x30; 70_000],
            ttl_seconds: None,
            code: Code::InvalidArgument,
            message: "70000 bytes, above the maximum of 65536",
        },
        Case {
            name: "bad signature",
            csr: bad_signature,
            ttl_seconds: None,
            code: Code::InvalidArgument,
            message: "signature does not verify",
        },
        Case {
            name: "r||s signature",
            csr: with_raw_signature(&good),
            ttl_seconds: None,
            code: Code::InvalidArgument,
            message: "signature does not verify",
        },
        Case {
            name: "RSA 1024",
            csr: openssl_csr(&work, "rsa1024", "rsa:1024", &[], &[&id("/limited/a")]),
            ttl_seconds: None,
            code: Code::InvalidArgument,
            message: "RSA 1024 is not supported",
        },
        Case {
            name: "secp256k1",
            csr: openssl_csr(&work, "k1", "ec", &["ec_paramgen_curve:secp256k1"], &[&id("/limited/a")]),
            ttl_seconds: None,
            code: Code::InvalidArgument,
            message: "EC secp256k1 is not supported",
        },
        Case {
            name: "two URI SANs",
            csr: openssl_csr(
                &work,
                "two",
                "ec",
                &["ec_paramgen_curve:P-256"],
                &["subjectAltName=URI:spiffe://example.org/limited/a,URI:spiffe://example.org/limited/b"],
            ),
            ttl_seconds: None,
            code: Code::InvalidArgument,
            message: "exactly one URI SAN",
        },
        Case {
            name: "no URI SAN",
            csr: openssl_csr(
                &work,
                "none",
                "ec",
                &["ec_paramgen_curve:P-256"],
                &["subjectAltName=DNS:a.limited.example.org"],
            ),
            ttl_seconds: None,
            code: Code::InvalidArgument,
            message: "found 0",
        },
        Case {
            name: "non-spiffe URI",
            csr: openssl_csr(
                &work,
                "https",
                "ec",
                &["ec_paramgen_curve:P-256"],
                &["subjectAltName=URI:https://example.org/limited/a"],
            ),
            ttl_seconds: None,
            code: Code::InvalidArgument,
            message: "https://example.org/limited/a",
        },
        Case {
            name: "other trust domain",
            csr: openssl_csr(
                &work,
                "other",
                "ec",
                &["ec_paramgen_curve:P-256"],
                &["subjectAltName=URI:spiffe://other.org/limited/a"],
            ),
            ttl_seconds: None,
            code: Code::InvalidArgument,
            message: "trust domain \"other.org\"",
        },
        Case {
            name: "IP SAN",
            csr: openssl_csr(
                &work,
                "ip",
                "ec",
                &["ec_paramgen_curve:P-256"],
                &["subjectAltName=URI:spiffe://example.org/limited/a,IP:10.0.0.1"],
            ),
            ttl_seconds: None,
            code: Code::InvalidArgument,
            message: "IP address SAN",
        },
        Case {
            name: "TTL zero",
            csr: good.clone(),
            ttl_seconds: Some(0),
            code: Code::InvalidArgument,
            message: "ttl_seconds 0 is invalid",
        },
        Case {
            name: "TTL negative",
            csr: good.clone(),
            ttl_seconds: Some(-60),
            code: Code::InvalidArgument,
            message: "ttl_seconds -60 is invalid",
        },
        Case {
            name: "TTL above maximum",
            csr: good.clone(),
            ttl_seconds: Some(7200),
            code: Code::PermissionDenied,
            message: "7200s is above the maximum of 3600s",
        },
        Case {
            name: "ID outside policy",
            csr: openssl_csr(&work, "outside", "ec", &["ec_paramgen_curve:P-256"], &[&id("/admin/x")]),
            ttl_seconds: None,
            code: Code::PermissionDenied,
            message: "may not request SPIFFE ID spiffe://example.org/admin/x",
        },
        Case {
            name: "DNS outside policy",
            csr: openssl_csr(
                &work,
                "dns",
                "ec",
                &["ec_paramgen_curve:P-256"],
                &["subjectAltName=URI:spiffe://example.org/limited/a,DNS:evil.example.com"],
            ),
            ttl_seconds: None,
            code: Code::PermissionDenied,
            message: "may not request DNS name evil.example.com",
        },
    ];
    let bad_ids = [
        ("upper-case trust domain", "spiffe://Example.org/limited/a", "lower case"),
        ("port", "spiffe://example.org:443/limited/a", "port"),
        ("user info", "spiffe://user@example.org/limited/a", "user info"),
        ("query", "spiffe://example.org/limited/a?x=1", "query"),
        ("fragment", "spiffe://example.org/limited/a#x", "fragment"),
        ("percent-encoding", "spiffe://example.org/limited/a%41", "percent"),
        ("trailing slash", "spiffe://example.org/limited/a/", "trailing slash"),
        ("empty segment", "spiffe://example.org/limited//a", "empty path segments"),
        ("dot segment", "spiffe://example.org/limited/./a", "'.' and '..'"),
        ("dot-dot segment", "spiffe://example.org/limited/../a", "'.' and '..'"),
    ];
    for (name, bad_id, message) in bad_ids {
        let (_, csr) = p256_csr(bad_id, &[]);
        cases.push(Case { name, csr, ttl_seconds: None, code: Code::InvalidArgument, message });
    }

    let before = deployment.node_status().await;
    let mut client = IssuerClient::new(deployment.connect_as(&limited).await);
    for (index, case) in cases.iter().enumerate() {
        let request_id = format!("bad-input-{index}");
        let mut request =
            tonic::Request::new(SignX509SvidRequest { csr: case.csr.clone(), ttl_seconds: case.ttl_seconds });
        request.metadata_mut().insert("x-request-id", request_id.parse().expect("ASCII request ID"));
        let status = client.sign_x509_svid(request).await.expect_err(case.name);
        assert_eq!(status.code(), case.code, "{}: {}", case.name, status.message());
        assert!(
            status.message().contains(case.message),
            "{}: message {:?} lacks {:?}",
            case.name,
            status.message(),
            case.message
        );

        let event = deployment.audit_event(&request_id);
        assert_eq!(event["decision"], "refused", "{}: {event}", case.name);
        assert_eq!(event["caller"], "spiffe://example.org/limited", "{}: {event}", case.name);
        assert!(event["serial"].is_null(), "{}: refused event has no serial: {event}", case.name);
    }

    // PEM is accepted where DER is expected.
    let issued = client
        .sign_x509_svid(SignX509SvidRequest { csr: pem_csr, ttl_seconds: None })
        .await
        .expect("PEM CSR is accepted")
        .into_inner();
    assert!(!issued.serial.is_empty());

    let after = deployment.node_status().await;
    assert_eq!(after.issued_total, before.issued_total + 1, "only the PEM request was recorded");

    // A caller with a valid certificate but no policy entry.
    let mut stranger = IssuerClient::new(deployment.connect_as(&outsider).await);
    let (_, csr) = p256_csr("spiffe://example.org/outsider", &[]);
    let status = stranger.sign_x509_svid(SignX509SvidRequest { csr, ttl_seconds: None }).await.expect_err("outsider");
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("caller spiffe://example.org/outsider is not listed"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn caller_over_rate_limit_is_resource_exhausted() {
    let mut deployment = TestDeployment::create();
    deployment.add_caller(toml::toml! {
        spiffe_id = "spiffe://example.org/bursty"
        allowed_spiffe_ids = ["spiffe://example.org/bursty"]
        rate_per_second = 0.01
        rate_burst = 3
    });
    let bursty = deployment.issue_client("bursty", "spiffe://example.org/bursty");
    deployment.start();

    let mut client = IssuerClient::new(deployment.connect_as(&bursty).await);
    let (_, csr) = p256_csr("spiffe://example.org/bursty", &[]);
    for attempt in 0..3 {
        client
            .sign_x509_svid(SignX509SvidRequest { csr: csr.clone(), ttl_seconds: None })
            .await
            .unwrap_or_else(|status| panic!("request {attempt} within the burst: {status}"));
    }
    let before = deployment.node_status().await.issued_total;
    let status =
        client.sign_x509_svid(SignX509SvidRequest { csr, ttl_seconds: None }).await.expect_err("over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("spiffe://example.org/bursty") && status.message().contains("burst 3"),
        "{}",
        status.message()
    );
    assert_eq!(deployment.node_status().await.issued_total, before, "a throttled request writes no record");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_client_certificate_is_unauthenticated() {
    let mut deployment = TestDeployment::create();
    deployment.start();
    let bundle = std::fs::read(deployment.dir.join("bundle.pem")).expect("read bundle");
    let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(bundle));
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", deployment.grpc_address()))
        .expect("endpoint")
        .tls_config(tls)
        .expect("TLS config")
        .connect()
        .await
        .expect("connect without a client certificate");
    let mut client = IssuerClient::new(channel);
    let (_, csr) = p256_csr("spiffe://example.org/anonymous", &[]);
    let status = client.sign_x509_svid(SignX509SvidRequest { csr, ttl_seconds: None }).await.expect_err("anonymous");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("no client certificate"), "{}", status.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn monitor_mode_issues_and_audits_would_be_denial() {
    let mut deployment = TestDeployment::create();
    let mut table = deployment.config_table();
    table["policy"].as_table_mut().expect("policy table").insert("mode".into(), "monitor".into());
    deployment.write_config(&table);
    deployment.add_caller(toml::toml! {
        spiffe_id = "spiffe://example.org/watched"
        allowed_spiffe_ids = ["spiffe://example.org/watched"]
    });
    let watched = deployment.issue_client("watched", "spiffe://example.org/watched");
    deployment.start();

    let mut client = IssuerClient::new(deployment.connect_as(&watched).await);
    let (_, csr) = p256_csr("spiffe://example.org/elsewhere", &[]);
    let mut request = tonic::Request::new(SignX509SvidRequest { csr, ttl_seconds: None });
    request.metadata_mut().insert("x-request-id", "monitor-1".parse().expect("ASCII"));
    let response = client.sign_x509_svid(request).await.expect("monitor mode issues").into_inner();

    let event = deployment.audit_event("monitor-1");
    assert_eq!(event["decision"], "would_refuse_monitor", "{event}");
    assert_eq!(event["serial"], response.serial, "{event}");
    assert!(event["reason"].as_str().is_some_and(|r| r.contains("spiffe://example.org/elsewhere")), "{event}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reserved_sigil_ids_rejected_in_monitor_mode() {
    let mut deployment = TestDeployment::create();
    let mut table = deployment.config_table();
    table["policy"].as_table_mut().expect("policy table").insert("mode".into(), "monitor".into());
    deployment.write_config(&table);
    deployment.start();
    let before = deployment.node_status().await.issued_total;

    // The admin caller's policy allows spiffe://example.org/**, and monitor mode issues what policy
    // denies, yet node and administrator identities are never issued through this API.
    let mut issuer = deployment.issuer().await;
    for reserved in
        ["spiffe://example.org/sigil/node/9", "spiffe://example.org/sigil/admin", "spiffe://example.org/sigil"]
    {
        let (_, csr) = p256_csr(reserved, &[]);
        let status = issuer.sign_x509_svid(SignX509SvidRequest { csr, ttl_seconds: None }).await.expect_err(reserved);
        assert_eq!(status.code(), Code::PermissionDenied, "{reserved}");
        assert!(status.message().contains("is reserved"), "{reserved}: {}", status.message());
        assert!(status.message().contains(reserved), "{reserved}: {}", status.message());
    }
    let (_, csr) = p256_csr("spiffe://example.org/sigilish/app", &[]);
    issuer.sign_x509_svid(SignX509SvidRequest { csr, ttl_seconds: None }).await.expect("a path that only starts alike");
    assert_eq!(deployment.node_status().await.issued_total, before + 1, "no reserved identity was recorded");
}
