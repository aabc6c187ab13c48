//! tls-alpn-01 against a rustls server with rcgen certificates.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rcgen::{CustomExtension, SanType};

use super::support::{
    KEY_AUTHORIZATION, TOKEN, TestCertificate, TlsServer, certificate, dns_san, loopback_validator, sha256,
};
use crate::problem::{Problem, ProblemType};
use crate::types::{ChallengeType, Identifier};
use crate::validation::tls::ACME_TLS_ALPN;
use crate::validation::tls_alpn01::reverse_name;

const ACME_IDENTIFIER: [u64; 9] = [1, 3, 6, 1, 5, 5, 7, 1, 31];

fn acme_extension(key_authorization: &str) -> CustomExtension {
    CustomExtension::new_acme_identifier(&sha256(key_authorization))
}

/// Starts a server with `names`, `extensions` and `alpn`, and validates
/// `identifier` against it.
async fn validate_against(
    identifier: &Identifier,
    names: Vec<SanType>,
    extensions: Vec<CustomExtension>,
    alpn: &[&[u8]],
) -> (Result<(), Problem>, TlsServer) {
    let server = TlsServer::start(certificate(names, extensions), alpn, rustls::DEFAULT_VERSIONS).await;
    let validator = loopback_validator(1, server.port());
    let result = validator.validate(ChallengeType::TlsAlpn01, identifier, TOKEN, KEY_AUTHORIZATION).await;
    (result, server)
}

#[tokio::test]
async fn success() {
    let identifier = Identifier::dns("example.test");
    let names = vec![dns_san("example.test")];
    let extensions = vec![acme_extension(KEY_AUTHORIZATION)];

    let (result, server) = validate_against(&identifier, names, extensions, &[ACME_TLS_ALPN]).await;

    assert_eq!(result, Ok(()));
    assert_eq!(server.server_names(), ["example.test"]);
}

#[tokio::test]
async fn tls12_success() {
    let identifier = Identifier::dns("example.test");
    let names = vec![dns_san("example.test")];
    let test_certificate = certificate(names, vec![acme_extension(KEY_AUTHORIZATION)]);
    let server = TlsServer::start(test_certificate, &[ACME_TLS_ALPN], &[&rustls::version::TLS12]).await;
    let validator = loopback_validator(1, server.port());

    let result = validator.validate(ChallengeType::TlsAlpn01, &identifier, TOKEN, KEY_AUTHORIZATION).await;

    assert_eq!(result, Ok(()));
}

#[tokio::test]
async fn mismatched_key_rejected() {
    let identifier = Identifier::dns("example.test");
    let presented = certificate(vec![dns_san("example.test")], vec![acme_extension(KEY_AUTHORIZATION)]);
    let other = certificate(vec![dns_san("example.test")], Vec::new());
    let mismatched = TestCertificate { der: presented.der, key: other.key };

    for versions in [&[&rustls::version::TLS13][..], &[&rustls::version::TLS12][..]] {
        let server = TlsServer::start(mismatched.clone(), &[ACME_TLS_ALPN], versions).await;
        let validator = loopback_validator(1, server.port());

        let result = validator.validate(ChallengeType::TlsAlpn01, &identifier, TOKEN, KEY_AUTHORIZATION).await;

        let problem = result.expect_err("the handshake is signed with another key");
        assert!(problem.is(ProblemType::Tls), "{versions:?}: {problem}");
        assert!(problem.detail.contains("BadSignature"), "{versions:?}: {problem}");
    }
}

#[tokio::test]
async fn ip_identifier_sends_reverse_name() {
    let identifier = Identifier::ip("127.0.0.1");
    let names = vec![SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))];
    let extensions = vec![acme_extension(KEY_AUTHORIZATION)];

    let (result, server) = validate_against(&identifier, names, extensions, &[ACME_TLS_ALPN]).await;

    assert_eq!(result, Ok(()));
    assert_eq!(server.server_names(), ["1.0.0.127.in-addr.arpa"]);
}

#[tokio::test]
async fn ip_identifier_with_dns_name_rejected() {
    let identifier = Identifier::ip("127.0.0.1");
    let names = vec![dns_san("127.0.0.1.example.test")];
    let extensions = vec![acme_extension(KEY_AUTHORIZATION)];

    let (result, _server) = validate_against(&identifier, names, extensions, &[ACME_TLS_ALPN]).await;

    let problem = result.expect_err("a dNSName cannot prove an IP address");
    assert!(problem.is(ProblemType::Unauthorized), "{problem}");
    assert!(problem.detail.contains("expected exactly one entry, iPAddress 127.0.0.1"), "{problem}");
    assert!(problem.detail.contains("dNSName \"127.0.0.1.example.test\""), "{problem}");
}

#[tokio::test]
async fn wrong_alpn_rejected() {
    let identifier = Identifier::dns("example.test");
    let names = vec![dns_san("example.test")];
    let extensions = vec![acme_extension(KEY_AUTHORIZATION)];

    let (result, server) = validate_against(&identifier, names, extensions, &[b"http/1.1"]).await;

    let problem = result.expect_err("the server does not speak acme-tls/1");
    assert!(problem.is(ProblemType::Tls), "{problem}");
    assert!(problem.detail.contains("ALPN acme-tls/1"), "{problem}");
    assert!(problem.detail.contains(&server.address.to_string()), "{problem}");
}

#[tokio::test]
async fn missing_alpn_rejected() {
    let identifier = Identifier::dns("example.test");
    let names = vec![dns_san("example.test")];
    let extensions = vec![acme_extension(KEY_AUTHORIZATION)];

    let (result, _server) = validate_against(&identifier, names, extensions, &[]).await;

    let problem = result.expect_err("the server selects no ALPN protocol");
    assert!(problem.is(ProblemType::Tls), "{problem}");
    assert!(problem.detail.contains("without selecting the ALPN protocol acme-tls/1"), "{problem}");
}

#[tokio::test]
async fn missing_extension_rejected() {
    let identifier = Identifier::dns("example.test");
    let names = vec![dns_san("example.test")];

    let (result, _server) = validate_against(&identifier, names, Vec::new(), &[ACME_TLS_ALPN]).await;

    let problem = result.expect_err("no acmeIdentifier extension");
    assert!(problem.is(ProblemType::Unauthorized), "{problem}");
    assert!(problem.detail.contains("no acmeIdentifier extension (1.3.6.1.5.5.7.1.31)"), "{problem}");
}

#[tokio::test]
async fn non_critical_extension_rejected() {
    let identifier = Identifier::dns("example.test");
    let names = vec![dns_san("example.test")];
    let mut extension = acme_extension(KEY_AUTHORIZATION);
    extension.set_criticality(false);

    let (result, _server) = validate_against(&identifier, names, vec![extension], &[ACME_TLS_ALPN]).await;

    let problem = result.expect_err("the extension is not critical");
    assert!(problem.is(ProblemType::Unauthorized), "{problem}");
    assert!(problem.detail.contains("not marked critical"), "{problem}");
}

#[tokio::test]
async fn wrong_digest_rejected() {
    let identifier = Identifier::dns("example.test");
    let names = vec![dns_san("example.test")];
    let other_key_authorization = format!("{TOKEN}.someone-elses-thumbprint");
    let extensions = vec![acme_extension(&other_key_authorization)];

    let (result, _server) = validate_against(&identifier, names, extensions, &[ACME_TLS_ALPN]).await;

    let problem = result.expect_err("the digest is of another key authorization");
    assert!(problem.is(ProblemType::IncorrectResponse), "{problem}");
    assert!(problem.detail.contains(&hex::encode(sha256(&other_key_authorization))), "{problem}");
    assert!(problem.detail.contains(&hex::encode(sha256(KEY_AUTHORIZATION))), "{problem}");
}

#[tokio::test]
async fn raw_digest_without_octet_string_rejected() {
    let identifier = Identifier::dns("example.test");
    let names = vec![dns_san("example.test")];
    let mut extension = CustomExtension::from_oid_content(&ACME_IDENTIFIER, sha256(KEY_AUTHORIZATION).to_vec());
    extension.set_criticality(true);

    let (result, _server) = validate_against(&identifier, names, vec![extension], &[ACME_TLS_ALPN]).await;

    let problem = result.expect_err("the value is not DER");
    assert!(problem.is(ProblemType::Unauthorized), "{problem}");
    assert!(problem.detail.contains("not a DER OCTET STRING of 32 bytes"), "{problem}");
}

#[tokio::test]
async fn extra_san_rejected() {
    let identifier = Identifier::dns("example.test");
    let names = vec![dns_san("example.test"), dns_san("extra.example.test")];
    let extensions = vec![acme_extension(KEY_AUTHORIZATION)];

    let (result, _server) = validate_against(&identifier, names, extensions, &[ACME_TLS_ALPN]).await;

    let problem = result.expect_err("two subjectAltName entries");
    assert!(problem.is(ProblemType::Unauthorized), "{problem}");
    assert!(problem.detail.contains("dNSName \"extra.example.test\""), "{problem}");
    assert!(problem.detail.contains("expected exactly one entry, dNSName example.test"), "{problem}");
}

#[tokio::test]
async fn other_name_rejected() {
    let identifier = Identifier::dns("example.test");
    let names = vec![dns_san("other.test")];
    let extensions = vec![acme_extension(KEY_AUTHORIZATION)];

    let (result, _server) = validate_against(&identifier, names, extensions, &[ACME_TLS_ALPN]).await;

    let problem = result.expect_err("the certificate names another host");
    assert!(problem.is(ProblemType::Unauthorized), "{problem}");
    assert!(problem.detail.contains("dNSName \"other.test\""), "{problem}");
}

#[tokio::test]
async fn missing_san_rejected() {
    let identifier = Identifier::dns("example.test");
    let extensions = vec![acme_extension(KEY_AUTHORIZATION)];

    let (result, _server) = validate_against(&identifier, Vec::new(), extensions, &[ACME_TLS_ALPN]).await;

    let problem = result.expect_err("no subjectAltName");
    assert!(problem.is(ProblemType::Unauthorized), "{problem}");
    assert!(problem.detail.contains("no subjectAltName extension"), "{problem}");
}

#[tokio::test]
async fn connection_refused_is_connection_problem() {
    let port = super::support::closed_port().await;
    let validator = loopback_validator(1, port);

    let identifier = Identifier::dns("example.test");
    let problem = validator
        .validate(ChallengeType::TlsAlpn01, &identifier, TOKEN, KEY_AUTHORIZATION)
        .await
        .expect_err("nothing listens");

    assert!(problem.is(ProblemType::Connection), "{problem}");
    assert!(problem.detail.contains(&format!("127.0.0.1:{port}")), "{problem}");
}

#[test]
fn reverse_names() {
    assert_eq!(reverse_name(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))), "10.2.0.192.in-addr.arpa");
    let v6: Ipv6Addr = "2001:db8::1".parse().expect("valid address");
    assert_eq!(
        reverse_name(IpAddr::V6(v6)),
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
    );
}
