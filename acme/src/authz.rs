//! Authorizations and challenges (RFC 8555, sections 7.5 and 8).
//!
//! A challenge response marks the challenge processing and starts its
//! validation in the background on the node that received it. If that
//! node stops, the challenge stays processing until its deadline passes,
//! and the next response through any node validates again.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;

use crate::accounts::conflict_to_retry;
use crate::issuer::Issuer;
use crate::orders::rfc3339;
use crate::problem::Problem;
use crate::records::{self, AuthzRecord, ChallengeRecord, Stored};
use crate::server::{AcmeServer, KeyRule, now_unix};
use crate::store::{Store, StoreError, Transaction};
use crate::types::{AuthorizationStatus, ChallengeStatus};

/// Attempts to write a validation result when the authorization changes
/// concurrently.
const RESULT_WRITE_ATTEMPTS: usize = 5;

pub(crate) async fn authorization<S: Store, I: Issuer>(
    State(server): State<Arc<AcmeServer<S, I>>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let result = async {
        let signed = server.accept(request, KeyRule::Kid).await?;
        let account = signed.account()?.record.id.clone();
        let authz = server.owned_authorization(&id, &account)?;
        if signed.jws.is_post_as_get() {
            return Ok(server.authz_response(&authz.record));
        }
        let payload: serde_json::Value = signed.jws.payload_json()?;
        match payload.get("status").and_then(serde_json::Value::as_str) {
            Some("deactivated") => server.deactivate_authorization(authz).await,
            Some(other) => Err(Problem::malformed(format!(
                "authorization status {other:?} cannot be set; only \"deactivated\" can"
            ))),
            None => Ok(server.authz_response(&authz.record)),
        }
    };
    server.finish(result.await)
}

pub(crate) async fn challenge<S: Store, I: Issuer>(
    State(server): State<Arc<AcmeServer<S, I>>>,
    Path((id, kind)): Path<(String, String)>,
    request: Request,
) -> Response {
    let result = async {
        let signed = server.accept(request, KeyRule::Kid).await?;
        let account = signed.account()?.clone();
        let authz = server.owned_authorization(&id, &account.record.id)?;
        let position =
            authz.record.challenges.iter().position(|challenge| challenge.kind.as_str() == kind).ok_or_else(|| {
                Problem::malformed(format!("authorization {} offers no {kind} challenge", server.authz_url(&id)))
                    .with_status(404)
            })?;
        if signed.jws.is_post_as_get() {
            return Ok(server.challenge_response(&authz.record, position));
        }
        let _: serde_json::Value = signed.jws.payload_json()?;
        let thumbprint = account.record.thumbprint.clone();
        let updated = Arc::clone(&server).respond_to_challenge(authz, position, thumbprint).await?;
        Ok(server.challenge_response(&updated, position))
    };
    server.finish(result.await)
}

/// The status of an authorization, counting a pending one past its expiry
/// as expired.
pub(crate) fn effective_status(authz: &AuthzRecord) -> AuthorizationStatus {
    if authz.status == AuthorizationStatus::Pending && authz.expires_unix <= now_unix() {
        AuthorizationStatus::Expired
    } else {
        authz.status
    }
}

impl<S: Store, I: Issuer> AcmeServer<S, I> {
    fn authz_url(&self, id: &str) -> String {
        self.url(&format!("/acme/authz/{id}"))
    }

    fn owned_authorization(&self, id: &str, account: &str) -> Result<Stored<AuthzRecord>, Problem> {
        let authz = self.authorization_record(id)?;
        if authz.record.account != account {
            return Err(Problem::unauthorized(format!(
                "authorization {} belongs to another account",
                self.authz_url(id)
            )));
        }
        Ok(authz)
    }

    async fn deactivate_authorization(&self, authz: Stored<AuthzRecord>) -> Result<Response, Problem> {
        let status = effective_status(&authz.record);
        if !matches!(status, AuthorizationStatus::Pending | AuthorizationStatus::Valid) {
            return Err(Problem::malformed(format!(
                "authorization {} is {}, so it cannot be deactivated",
                self.authz_url(&authz.record.id),
                status_text(&status)
            )));
        }
        let mut record = authz.record.clone();
        record.status = AuthorizationStatus::Deactivated;
        let key = records::authz_key(&record.id);
        let transaction = Transaction::default().when(key.clone(), authz.revision).put(
            key,
            records::encode(&record),
            record.expires_unix,
        );
        self.store.commit(transaction).await.map_err(|error| conflict_to_retry(error, "authorization"))?;
        Ok(self.authz_response(&record))
    }

    /// Marks the challenge processing and starts its validation, unless it
    /// is already decided or being validated within its deadline.
    async fn respond_to_challenge(
        self: Arc<Self>,
        authz: Stored<AuthzRecord>,
        position: usize,
        thumbprint: String,
    ) -> Result<AuthzRecord, Problem> {
        let now = now_unix();
        let challenge = &authz.record.challenges[position];
        let status = effective_status(&authz.record);
        let stale = challenge.status == ChallengeStatus::Processing && challenge.processing_deadline_unix <= now;
        if status != AuthorizationStatus::Pending || (challenge.status != ChallengeStatus::Pending && !stale) {
            return Ok(authz.record);
        }
        if let Some(other) = authz
            .record
            .challenges
            .iter()
            .find(|other| other.status == ChallengeStatus::Processing && other.processing_deadline_unix > now)
            && other.kind != challenge.kind
        {
            return Err(Problem::malformed(format!(
                "the {} challenge of authorization {} is being validated; wait for its result",
                other.kind.as_str(),
                self.authz_url(&authz.record.id)
            )));
        }

        let mut record = authz.record.clone();
        record.challenges[position].status = ChallengeStatus::Processing;
        record.challenges[position].processing_deadline_unix = now + self.settings.processing_timeout.as_secs() as i64;
        let key = records::authz_key(&record.id);
        let transaction = Transaction::default().when(key.clone(), authz.revision).put(
            key,
            records::encode(&record),
            record.expires_unix,
        );
        let revision =
            self.store.commit(transaction).await.map_err(|error| conflict_to_retry(error, "authorization"))?;

        let key_authorization = format!("{}.{thumbprint}", record.challenges[position].token);
        let started = Stored { record: record.clone(), revision };
        tokio::spawn(Arc::clone(&self).validate_in_background(started, position, key_authorization));
        Ok(record)
    }

    async fn validate_in_background(
        self: Arc<Self>,
        authz: Stored<AuthzRecord>,
        position: usize,
        key_authorization: String,
    ) {
        let challenge = &authz.record.challenges[position];
        let identifier = &authz.record.identifier;
        let outcome = self.validator.validate(challenge.kind, identifier, &challenge.token, &key_authorization).await;
        tracing::info!(
            authz = %authz.record.id,
            identifier = %identifier.value,
            challenge = challenge.kind.as_str(),
            valid = outcome.is_ok(),
            "ACME challenge validated"
        );
        if let Err(error) = self.write_validation_result(authz, position, outcome).await {
            tracing::error!(error = %error, "writing an ACME validation result failed");
        }
    }

    async fn write_validation_result(
        &self,
        mut authz: Stored<AuthzRecord>,
        position: usize,
        outcome: Result<(), Problem>,
    ) -> Result<(), Problem> {
        for _ in 0..RESULT_WRITE_ATTEMPTS {
            let mut record = authz.record.clone();
            if record.challenges[position].status != ChallengeStatus::Processing {
                return Ok(());
            }
            apply_outcome(&mut record, position, &outcome);
            let key = records::authz_key(&record.id);
            let transaction = Transaction::default().when(key.clone(), authz.revision).put(
                key,
                records::encode(&record),
                record.expires_unix,
            );
            match self.store.commit(transaction).await {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict { .. }) => authz = self.authorization_record(&record.id)?,
                Err(other) => return Err(records::store_problem(other)),
            }
        }
        Err(Problem::internal(format!(
            "authorization {} changed {RESULT_WRITE_ATTEMPTS} times while its result was written",
            authz.record.id
        )))
    }

    fn authz_response(&self, authz: &AuthzRecord) -> Response {
        let challenges: Vec<serde_json::Value> =
            (0..authz.challenges.len()).map(|position| self.challenge_json(authz, position)).collect();
        let mut body = serde_json::json!({
            "identifier": authz.identifier,
            "status": effective_status(authz),
            "expires": rfc3339(authz.expires_unix),
            "challenges": challenges,
        });
        if authz.wildcard {
            body["wildcard"] = true.into();
        }
        self.json(StatusCode::OK, &body, HeaderMap::new())
    }

    fn challenge_json(&self, authz: &AuthzRecord, position: usize) -> serde_json::Value {
        let challenge = &authz.challenges[position];
        let mut body = serde_json::json!({
            "type": challenge.kind,
            "url": self.url(&format!("/acme/challenge/{}/{}", authz.id, challenge.kind.as_str())),
            "token": challenge.token,
            "status": challenge.status,
        });
        if let Some(unix) = challenge.validated_unix {
            body["validated"] = rfc3339(unix).into();
        }
        if let Some(error) = &challenge.error {
            body["error"] = serde_json::to_value(error).unwrap_or_default();
        }
        body
    }

    fn challenge_response(&self, authz: &AuthzRecord, position: usize) -> Response {
        let mut headers = HeaderMap::new();
        if let Ok(up) = HeaderValue::from_str(&format!("<{}>;rel=\"up\"", self.authz_url(&authz.id))) {
            headers.append(header::LINK, up);
        }
        if authz.challenges[position].status == ChallengeStatus::Processing {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(1));
        }
        self.json(StatusCode::OK, &self.challenge_json(authz, position), headers)
    }
}

fn apply_outcome(record: &mut AuthzRecord, position: usize, outcome: &Result<(), Problem>) {
    let challenge: &mut ChallengeRecord = &mut record.challenges[position];
    challenge.processing_deadline_unix = 0;
    match outcome {
        Ok(()) => {
            challenge.status = ChallengeStatus::Valid;
            challenge.validated_unix = Some(now_unix());
            record.status = AuthorizationStatus::Valid;
        }
        Err(problem) => {
            challenge.status = ChallengeStatus::Invalid;
            challenge.error = Some(problem.clone());
            record.status = AuthorizationStatus::Invalid;
        }
    }
}

fn status_text(status: &AuthorizationStatus) -> String {
    serde_json::to_value(status).ok().and_then(|value| value.as_str().map(str::to_owned)).unwrap_or_default()
}
