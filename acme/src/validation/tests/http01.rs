//! http-01 against the test HTTP server.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::support::{
    CHALLENGE_PATH, HttpServer, KEY_AUTHORIZATION, Reply, TOKEN, bind_same_port, certificate, closed_port, dns_san,
    loopback_validator, server_config, settings,
};
use crate::problem::ProblemType;
use crate::types::{ChallengeType, Identifier};
use crate::validation::http01::{MAX_BODY_BYTES, MAX_REDIRECTS};
use crate::validation::{ResolverSetting, ValidationSettings, Validator};

fn key_authorization_server_reply(path: &str) -> Reply {
    if path == CHALLENGE_PATH { Reply::ok(format!("{KEY_AUTHORIZATION}\r\n")) } else { Reply::status(404) }
}

#[tokio::test]
async fn success() {
    let server = HttpServer::start(key_authorization_server_reply).await;
    let validator = loopback_validator(server.port(), 1);

    let identifier = Identifier::dns("Example.Test");
    let result = validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await;

    assert_eq!(result, Ok(()));
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, CHALLENGE_PATH);
    assert_eq!(seen[0].host, format!("example.test:{}", server.port()));
}

#[tokio::test]
async fn ip_identifier_success() {
    let server = HttpServer::start(key_authorization_server_reply).await;
    let validator = loopback_validator(server.port(), 1);

    let identifier = Identifier::ip("127.0.0.1");
    let result = validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await;

    assert_eq!(result, Ok(()));
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].host, format!("127.0.0.1:{}", server.port()));
}

#[tokio::test]
async fn ipv6_identifier_uses_brackets() {
    let Ok(listener) = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).await else {
        eprintln!("skipped: this machine has no IPv6 loopback");
        return;
    };
    let server = HttpServer::on(listener, None, key_authorization_server_reply);
    let validator = loopback_validator(server.port(), 1);

    let identifier = Identifier::ip("::1");
    let result = validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await;

    assert_eq!(result, Ok(()));
    assert_eq!(server.seen()[0].host, format!("[::1]:{}", server.port()));
}

#[tokio::test]
async fn wrong_body() {
    let server = HttpServer::start(|_| Reply::ok("not-the-key-authorization")).await;
    let validator = loopback_validator(server.port(), 1);

    let identifier = Identifier::dns("example.test");
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("wrong body");

    assert!(problem.is(ProblemType::IncorrectResponse), "{problem}");
    assert!(problem.detail.contains("\"not-the-key-authorization\""), "{problem}");
    assert!(problem.detail.contains(KEY_AUTHORIZATION), "{problem}");
    assert!(problem.detail.contains(CHALLENGE_PATH), "{problem}");
}

#[tokio::test]
async fn wrong_body_is_cut_in_detail() {
    let body = "x".repeat(1000);
    let server = HttpServer::start(move |_| Reply::ok(body.clone())).await;
    let validator = loopback_validator(server.port(), 1);

    let identifier = Identifier::dns("example.test");
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("wrong body");

    assert!(problem.is(ProblemType::IncorrectResponse), "{problem}");
    assert!(problem.detail.contains("cut after 128 characters"), "{problem}");
    assert!(!problem.detail.contains(&"x".repeat(129)), "{problem}");
}

#[tokio::test]
async fn body_too_long() {
    let body = format!("{KEY_AUTHORIZATION}{}", " ".repeat(3 * MAX_BODY_BYTES));
    let server = HttpServer::start(move |_| Reply::ok(body.clone())).await;
    let validator = loopback_validator(server.port(), 1);

    let identifier = Identifier::dns("example.test");
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("long body");

    assert!(problem.is(ProblemType::IncorrectResponse), "{problem}");
    assert!(problem.detail.contains("longer than 8192 bytes"), "{problem}");
}

#[tokio::test]
async fn not_found() {
    let server = HttpServer::start(|_| Reply::status(404)).await;
    let validator = loopback_validator(server.port(), 1);

    let identifier = Identifier::dns("example.test");
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("404");

    assert!(problem.is(ProblemType::Unauthorized), "{problem}");
    assert_eq!(problem.status, 403);
    assert!(problem.detail.contains("404"), "{problem}");
    let url = format!("http://example.test:{}{CHALLENGE_PATH}", server.port());
    assert!(problem.detail.contains(&url), "{problem}");
}

#[tokio::test]
async fn redirects_followed() {
    let hosts = [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)];
    let mut listeners = bind_same_port(&hosts).await;
    let second_listener = listeners.pop().expect("two listeners");
    let first_listener = listeners.pop().expect("two listeners");
    let port = first_listener.local_addr().expect("listener address").port();

    let final_location = format!("http://127.0.0.2:{port}/final?token={TOKEN}");
    let first = HttpServer::on(first_listener, None, move |path| match path {
        CHALLENGE_PATH => Reply::redirect(302, "moved"),
        "/.well-known/acme-challenge/moved" => Reply::redirect(301, "/elsewhere#fragment"),
        "/elsewhere" => Reply::redirect(308, &final_location),
        _ => Reply::status(404),
    });
    let second = HttpServer::on(second_listener, None, |path| {
        if path == format!("/final?token={TOKEN}") { Reply::ok(KEY_AUTHORIZATION) } else { Reply::status(404) }
    });
    let validator = loopback_validator(port, 1);

    let identifier = Identifier::dns("example.test");
    let result = validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await;

    assert_eq!(result, Ok(()));
    let first_paths: Vec<String> = first.seen().into_iter().map(|seen| seen.path).collect();
    assert_eq!(first_paths, [CHALLENGE_PATH, "/.well-known/acme-challenge/moved", "/elsewhere"]);
    let second_seen = second.seen();
    assert_eq!(second_seen.len(), 1);
    assert_eq!(second_seen[0].host, format!("127.0.0.2:{port}"));
}

#[tokio::test]
async fn redirect_to_https_accepts_any_certificate() {
    let hosts = [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 3)];
    let mut listeners = bind_same_port(&hosts).await;
    let tls_listener = listeners.pop().expect("two listeners");
    let http_listener = listeners.pop().expect("two listeners");
    let port = http_listener.local_addr().expect("listener address").port();

    let location = format!("https://127.0.0.3:{port}/secure");
    let http = HttpServer::on(http_listener, None, move |_| Reply::redirect(307, &location));
    let self_signed = certificate(vec![dns_san("unrelated.test")], Vec::new());
    let (config, _) = server_config(self_signed, &[b"http/1.1"], rustls::DEFAULT_VERSIONS);
    let acceptor = TlsAcceptor::from(config);
    let https = HttpServer::on(tls_listener, Some(acceptor), |_| Reply::ok(KEY_AUTHORIZATION));
    let validator = loopback_validator(port, 1);

    let identifier = Identifier::dns("example.test");
    let result = validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await;

    assert_eq!(result, Ok(()));
    assert_eq!(http.seen().len(), 1);
    assert_eq!(https.seen().len(), 1);
    assert_eq!(https.seen()[0].path, "/secure");
}

#[tokio::test]
async fn redirect_loop_bounded() {
    let server = HttpServer::start(|_| Reply::redirect(302, CHALLENGE_PATH)).await;
    let validator = loopback_validator(server.port(), 1);

    let identifier = Identifier::dns("example.test");
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("loop");

    assert!(problem.is(ProblemType::Connection), "{problem}");
    assert!(problem.detail.contains(&format!("stopped after {MAX_REDIRECTS} redirects")), "{problem}");
    assert_eq!(server.seen().len(), MAX_REDIRECTS + 1);
}

#[tokio::test]
async fn redirect_to_other_port_refused() {
    let server = HttpServer::start(|_| Reply::redirect(302, "http://127.0.0.1:8081/x")).await;
    let validator = loopback_validator(server.port(), 1);

    let identifier = Identifier::dns("example.test");
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("port");

    assert!(problem.is(ProblemType::Connection), "{problem}");
    assert!(problem.detail.contains("port 8081 is not allowed"), "{problem}");
    assert!(problem.detail.contains("http://127.0.0.1:8081/x"), "{problem}");
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn redirect_to_other_scheme_refused() {
    let server = HttpServer::start(|_| Reply::redirect(301, "ftp://example.test/key")).await;
    let validator = loopback_validator(server.port(), 1);

    let identifier = Identifier::dns("example.test");
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("scheme");

    assert!(problem.is(ProblemType::Connection), "{problem}");
    assert!(problem.detail.contains("ftp://example.test/key"), "{problem}");
    assert!(problem.detail.contains("only http and https"), "{problem}");
}

#[tokio::test]
async fn redirect_without_location() {
    let server = HttpServer::start(|_| Reply::status(302)).await;
    let validator = loopback_validator(server.port(), 1);

    let identifier = Identifier::dns("example.test");
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("302");

    assert!(problem.is(ProblemType::Unauthorized), "{problem}");
    assert!(problem.detail.contains("without a Location header"), "{problem}");
}

#[tokio::test]
async fn slow_server_times_out() {
    let server = HttpServer::start(|_| Reply::delayed(Duration::from_secs(20))).await;
    let resolver = ResolverSetting::Fixed(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let settings = ValidationSettings { timeout: Duration::from_millis(500), ..settings(server.port(), 1, resolver) };
    let validator = Validator::new(settings).expect("valid settings");

    let identifier = Identifier::dns("example.test");
    let started = Instant::now();
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("timeout");
    let elapsed = started.elapsed();

    assert!(problem.is(ProblemType::Connection), "{problem}");
    assert!(problem.detail.contains("timed out after 500ms"), "{problem}");
    assert!(problem.detail.contains(&server.address.to_string()), "{problem}");
    assert!(elapsed >= Duration::from_millis(450), "returned after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "returned after {elapsed:?}");
}

#[tokio::test]
async fn connection_refused_names_address() {
    let port = closed_port().await;
    let validator = loopback_validator(port, 1);

    let identifier = Identifier::dns("example.test");
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("refused");

    assert!(problem.is(ProblemType::Connection), "{problem}");
    assert!(problem.detail.contains(&format!("127.0.0.1:{port}")), "{problem}");
}

#[tokio::test]
async fn private_address_refused() {
    let server = HttpServer::start(key_authorization_server_reply).await;
    let resolver = ResolverSetting::Fixed(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let settings = ValidationSettings { allow_private_addresses: false, ..settings(server.port(), 1, resolver) };
    let validator = Validator::new(settings).expect("valid settings");

    let identifier = Identifier::dns("example.test");
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("private");

    assert!(problem.is(ProblemType::Connection), "{problem}");
    assert!(problem.detail.contains("127.0.0.1 is a loopback address"), "{problem}");
    assert!(server.seen().is_empty(), "the validator connected anyway");
}

#[tokio::test]
async fn private_ip_identifier_refused() {
    let server = HttpServer::start(key_authorization_server_reply).await;
    let resolver = ResolverSetting::Fixed(Vec::new());
    let settings = ValidationSettings { allow_private_addresses: false, ..settings(server.port(), 1, resolver) };
    let validator = Validator::new(settings).expect("valid settings");

    let identifier = Identifier::ip("::1");
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("private");

    assert!(problem.is(ProblemType::Connection), "{problem}");
    assert!(problem.detail.contains("::1 is a loopback address"), "{problem}");
}

#[tokio::test]
async fn no_addresses_is_dns_problem() {
    let resolver = ResolverSetting::Fixed(Vec::new());
    let validator = Validator::new(settings(1, 1, resolver)).expect("valid settings");

    let identifier = Identifier::dns("example.test");
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("no address");

    assert!(problem.is(ProblemType::Dns), "{problem}");
    assert!(problem.detail.contains("example.test"), "{problem}");
}

#[tokio::test]
async fn wildcard_rejected() {
    let validator = loopback_validator(1, 1);

    let identifier = Identifier::dns("*.example.test");
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("wildcard");

    assert!(problem.is(ProblemType::Malformed), "{problem}");
    assert!(problem.detail.contains("*.example.test"), "{problem}");
}

#[tokio::test]
async fn invalid_token_rejected() {
    let validator = loopback_validator(1, 1);

    let identifier = Identifier::dns("example.test");
    let token = "../../etc/passwd";
    let key_authorization = format!("{token}.thumbprint");
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, token, &key_authorization).await.expect_err("token");

    assert!(problem.is(ProblemType::Malformed), "{problem}");
    assert!(problem.detail.contains(token), "{problem}");
}

#[tokio::test]
async fn invalid_name_rejected() {
    let validator = loopback_validator(1, 1);

    let identifier = Identifier::dns("example.test/evil");
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("name");

    assert!(problem.is(ProblemType::RejectedIdentifier), "{problem}");
    assert!(problem.detail.contains("example.test/evil"), "{problem}");
}
