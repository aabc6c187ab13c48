//! The worker bound, the queue limit and the settings checks.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::support::{HttpServer, KEY_AUTHORIZATION, Reply, TOKEN, settings};
use crate::problem::ProblemType;
use crate::types::{ChallengeType, Identifier};
use crate::validation::{ResolverSetting, ValidationSettings, Validator};

/// Polls `condition` every 10 ms for at most 5 s.
async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "gave up waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn second_waits_and_full_queue_rejects() {
    let server = HttpServer::start(|_| Reply::delayed(Duration::from_secs(20))).await;
    let resolver = ResolverSetting::Fixed(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let timeout = Duration::from_millis(800);
    let settings = ValidationSettings { timeout, workers: 1, queue: 1, ..settings(server.port(), 1, resolver) };
    let validator = Validator::new(settings).expect("valid settings");
    let identifier = Identifier::dns("example.test");

    let first = tokio::spawn({
        let validator = validator.clone();
        let identifier = identifier.clone();
        async move { validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await }
    });
    wait_until("the first validation reaches the server", || server.seen().len() == 1).await;

    let second = tokio::spawn({
        let validator = validator.clone();
        let identifier = identifier.clone();
        async move { validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await }
    });
    wait_until("the second validation is queued", || validator.inner.admitted.load(Ordering::Acquire) == 2).await;

    let started = Instant::now();
    let rejected = validator
        .validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION)
        .await
        .expect_err("the queue is full");
    assert!(rejected.is(ProblemType::RateLimited), "{rejected}");
    assert_eq!(rejected.status, 429);
    assert!(rejected.detail.contains("workers = 1"), "{rejected}");
    assert!(rejected.detail.contains("queue = 1"), "{rejected}");
    assert!(rejected.retry_after.is_some());
    assert!(started.elapsed() < Duration::from_millis(200), "rejection took {:?}", started.elapsed());

    let first = first.await.expect("first validation task").expect_err("the server never answers");
    let second = second.await.expect("second validation task").expect_err("the server never answers");
    assert!(first.is(ProblemType::Connection), "{first}");
    assert!(second.is(ProblemType::Connection), "{second}");

    let seen = server.seen();
    assert_eq!(seen.len(), 2, "the rejected validation must not connect");
    let gap = seen[1].at.duration_since(seen[0].at);
    assert!(gap >= timeout - Duration::from_millis(100), "the second validation started {gap:?} after the first");
    assert_eq!(validator.inner.admitted.load(Ordering::Acquire), 0);
}

#[tokio::test]
async fn dropped_validation_frees_its_place() {
    let server = HttpServer::start(|_| Reply::delayed(Duration::from_secs(20))).await;
    let resolver = ResolverSetting::Fixed(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    let settings = ValidationSettings { workers: 1, queue: 0, ..settings(server.port(), 1, resolver) };
    let validator = Validator::new(settings).expect("valid settings");
    let identifier = Identifier::dns("example.test");

    let running = tokio::spawn({
        let validator = validator.clone();
        let identifier = identifier.clone();
        async move { validator.validate(ChallengeType::Http01, &identifier, TOKEN, KEY_AUTHORIZATION).await }
    });
    wait_until("the validation reaches the server", || server.seen().len() == 1).await;
    running.abort();
    let _ = running.await;

    assert_eq!(validator.inner.admitted.load(Ordering::Acquire), 0);
    assert_eq!(validator.inner.workers.available_permits(), 1);
}

#[test]
fn zero_workers_rejected() {
    let resolver = ResolverSetting::Fixed(Vec::new());
    let settings = ValidationSettings { workers: 0, ..settings(1, 1, resolver) };

    let error = Validator::new(settings).expect_err("no workers");

    assert!(error.contains("workers"), "{error}");
}

#[test]
fn zero_timeout_rejected() {
    let resolver = ResolverSetting::Fixed(Vec::new());
    let settings = ValidationSettings { timeout: Duration::ZERO, ..settings(1, 1, resolver) };

    let error = Validator::new(settings).expect_err("no timeout");

    assert!(error.contains("timeout"), "{error}");
}
