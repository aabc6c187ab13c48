//! dns-01 against the test DNS server, and address lookups through it.

use std::net::Ipv4Addr;

use super::support::{
    CHALLENGE_PATH, DnsServer, HttpServer, KEY_AUTHORIZATION, Reply, TOKEN, Zone, dns01_value, loopback_validator,
    settings,
};
use crate::problem::{Problem, ProblemType};
use crate::types::{ChallengeType, Identifier};
use crate::validation::{ResolverSetting, Validator};

fn txt_zone(name: &str, records: &[&[&str]]) -> Zone {
    let mut zone = Zone::default();
    let records = records.iter().map(|strings| strings.iter().map(|s| (*s).to_owned()).collect()).collect();
    zone.txt.insert(name.to_owned(), records);
    zone
}

async fn validate_with(zone: Zone, identifier: &Identifier) -> Result<(), Problem> {
    let server = DnsServer::start(zone).await;
    let validator =
        Validator::new(settings(1, 1, ResolverSetting::Server(server.address))).expect("valid test settings");
    validator.validate(ChallengeType::Dns01, identifier, TOKEN, KEY_AUTHORIZATION).await
}

#[tokio::test]
async fn success() {
    let expected = dns01_value(KEY_AUTHORIZATION);
    let zone = txt_zone("_acme-challenge.example.test.", &[&["unrelated"], &[expected.as_str()]]);

    let result = validate_with(zone, &Identifier::dns("example.test")).await;

    assert_eq!(result, Ok(()));
}

#[tokio::test]
async fn split_record_joined() {
    let expected = dns01_value(KEY_AUTHORIZATION);
    let (first, second) = expected.split_at(20);
    let zone = txt_zone("_acme-challenge.example.test.", &[&[first, second]]);

    let result = validate_with(zone, &Identifier::dns("example.test")).await;

    assert_eq!(result, Ok(()));
}

#[tokio::test]
async fn wildcard_uses_base_name() {
    let expected = dns01_value(KEY_AUTHORIZATION);
    let zone = txt_zone("_acme-challenge.example.test.", &[&[expected.as_str()]]);

    let result = validate_with(zone, &Identifier::dns("*.example.test")).await;

    assert_eq!(result, Ok(()));
}

#[tokio::test]
async fn missing_record() {
    let zone = txt_zone("_acme-challenge.other.test.", &[&["unrelated"]]);

    let problem = validate_with(zone, &Identifier::dns("example.test")).await.expect_err("no record");

    assert!(problem.is(ProblemType::Unauthorized), "{problem}");
    assert!(problem.detail.contains("no TXT record found at _acme-challenge.example.test"), "{problem}");
    assert!(problem.detail.contains(&dns01_value(KEY_AUTHORIZATION)), "{problem}");
}

#[tokio::test]
async fn wrong_value() {
    let zone = txt_zone("_acme-challenge.example.test.", &[&["wrong-value"], &["another-wrong-value"]]);

    let problem = validate_with(zone, &Identifier::dns("example.test")).await.expect_err("wrong value");

    assert!(problem.is(ProblemType::Unauthorized), "{problem}");
    assert!(problem.detail.contains("_acme-challenge.example.test"), "{problem}");
    assert!(problem.detail.contains("\"wrong-value\""), "{problem}");
    assert!(problem.detail.contains("\"another-wrong-value\""), "{problem}");
    assert!(problem.detail.contains(&dns01_value(KEY_AUTHORIZATION)), "{problem}");
}

#[tokio::test]
async fn new_record_seen_after_failure() {
    let server = DnsServer::start(Zone::default()).await;
    let validator = Validator::new(settings(1, 1, ResolverSetting::Server(server.address))).expect("settings");
    let identifier = Identifier::dns("example.test");

    let first = validator.validate(ChallengeType::Dns01, &identifier, TOKEN, KEY_AUTHORIZATION).await;
    let expected = dns01_value(KEY_AUTHORIZATION);
    server.set_zone(txt_zone("_acme-challenge.example.test.", &[&[expected.as_str()]]));
    let second = validator.validate(ChallengeType::Dns01, &identifier, TOKEN, KEY_AUTHORIZATION).await;

    let problem = first.expect_err("no record before the change");
    assert!(problem.is(ProblemType::Unauthorized), "{problem}");
    assert_eq!(second, Ok(()), "the negative answer must not be cached");
}

#[tokio::test]
async fn fixed_resolver_finds_nothing() {
    let validator = loopback_validator(1, 1);

    let identifier = Identifier::dns("example.test");
    let problem =
        validator.validate(ChallengeType::Dns01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("no DNS");

    assert!(problem.is(ProblemType::Unauthorized), "{problem}");
    assert!(problem.detail.contains("_acme-challenge.example.test"), "{problem}");
}

#[tokio::test]
async fn ip_identifier_rejected() {
    let validator = loopback_validator(1, 1);

    let identifier = Identifier::ip("127.0.0.1");
    let problem =
        validator.validate(ChallengeType::Dns01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("IP");

    assert!(problem.is(ProblemType::Malformed), "{problem}");
    assert!(problem.detail.contains("127.0.0.1"), "{problem}");
}

#[tokio::test]
async fn http01_resolves_through_dns_server() {
    let http =
        HttpServer::start(
            |path| {
                if path == CHALLENGE_PATH { Reply::ok(KEY_AUTHORIZATION) } else { Reply::status(404) }
            },
        )
        .await;
    let mut zone = Zone::default();
    zone.a.insert("example.test.".to_owned(), vec![Ipv4Addr::LOCALHOST]);
    let dns = DnsServer::start(zone).await;
    let validator = Validator::new(settings(http.port(), 1, ResolverSetting::Server(dns.address))).expect("settings");

    let identifier = Identifier::dns("example.test");
    let result = validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await;

    assert_eq!(result, Ok(()));
    assert_eq!(http.seen().len(), 1);
}

#[tokio::test]
async fn unknown_name_is_dns_problem() {
    let dns = DnsServer::start(Zone::default()).await;
    let validator = Validator::new(settings(1, 1, ResolverSetting::Server(dns.address))).expect("settings");

    let identifier = Identifier::dns("missing.test");
    let problem =
        validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await.expect_err("NXDOMAIN");

    assert!(problem.is(ProblemType::Dns), "{problem}");
    assert!(problem.detail.contains("missing.test"), "{problem}");
}
