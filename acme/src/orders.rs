//! Orders: newOrder, reading an order, finalize (RFC 8555, sections 7.4
//! and 7.1.6), and the `replaces` field of RFC 9773.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use serde::Deserialize;
use time::OffsetDateTime;

use crate::accounts::{conflict_to_retry, new_id};
use crate::identifiers::{check_order_identifiers, normalize_dns};
use crate::issuer::{IssueRequest, Issuer};
use crate::problem::{Problem, ProblemType};
use crate::records::{self, AuthzRecord, CertRecord, ChallengeRecord, OrderRecord, Stored};
use crate::server::{AcmeServer, KeyRule, now_unix};
use crate::store::{Store, StoreError, Transaction};
use crate::types::{AuthorizationStatus, ChallengeStatus, ChallengeType, Identifier, OrderStatus};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewOrderPayload {
    identifiers: Vec<Identifier>,
    #[serde(default)]
    not_before: Option<String>,
    #[serde(default)]
    not_after: Option<String>,
    #[serde(default)]
    profile: Option<String>,
    #[serde(default)]
    replaces: Option<String>,
}

#[derive(Debug, Deserialize)]
struct FinalizePayload {
    csr: String,
}

pub(crate) async fn new_order<S: Store, I: Issuer>(
    State(server): State<Arc<AcmeServer<S, I>>>,
    request: Request,
) -> Response {
    let result = async {
        let signed = server.accept(request, KeyRule::Kid).await?;
        let account = signed.account()?.record.id.clone();
        let payload: NewOrderPayload = signed.jws.payload_json()?;
        server.create_order(&account, payload).await
    };
    server.finish(result.await)
}

pub(crate) async fn order<S: Store, I: Issuer>(
    State(server): State<Arc<AcmeServer<S, I>>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let result = async {
        let signed = server.accept(request, KeyRule::Kid).await?;
        let account = signed.account()?.record.id.clone();
        let order = server.owned_order(&id, &account)?;
        Arc::clone(&server).resume_stale_finalization(&order);
        server.order_response(StatusCode::OK, &order.record)
    };
    server.finish(result.await)
}

pub(crate) async fn finalize<S: Store, I: Issuer>(
    State(server): State<Arc<AcmeServer<S, I>>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let result = async {
        let signed = server.accept(request, KeyRule::Kid).await?;
        let account = signed.account()?;
        let payload: FinalizePayload = signed.jws.payload_json()?;
        let csr = crate::b64::decode("csr", &payload.csr)
            .map_err(|problem| Problem::new(ProblemType::BadCsr, problem.detail))?;
        let account_spki = signed.key.spki_der();
        server.finalize_order(&id, &account.record.id, &csr, &account_spki).await
    };
    server.finish(result.await)
}

impl<S: Store, I: Issuer> AcmeServer<S, I> {
    async fn create_order(&self, account: &str, payload: NewOrderPayload) -> Result<Response, Problem> {
        let identifiers = check_order_identifiers(&payload.identifiers, &self.settings)?;
        let profile = self.choose_profile(payload.profile.as_deref())?;
        let not_before = parse_time("notBefore", payload.not_before.as_deref())?;
        let not_after = parse_time("notAfter", payload.not_after.as_deref())?;
        self.check_requested_validity(not_before, not_after)?;

        let now = now_unix();
        let expires = now + self.settings.order_lifetime.as_secs() as i64;
        let order_id = new_id();
        let mut transaction = Transaction::default();
        let mut authorizations = Vec::with_capacity(identifiers.len());
        for identifier in &identifiers {
            let authz = new_authorization(account, identifier, expires);
            transaction = transaction.put(records::authz_key(&authz.id), records::encode(&authz), expires);
            authorizations.push(authz.id);
        }

        if let Some(certid) = &payload.replaces {
            transaction = self.replace_certificate(transaction, account, certid, &order_id)?;
        }
        transaction = self.count_order(transaction, account, now)?;

        let order = OrderRecord {
            id: order_id.clone(),
            account: account.to_owned(),
            status: OrderStatus::Pending,
            identifiers,
            authorizations,
            expires_unix: expires,
            not_before_unix: not_before.map(OffsetDateTime::unix_timestamp),
            not_after_unix: not_after.map(OffsetDateTime::unix_timestamp),
            profile,
            error: None,
            certificate: None,
            csr: None,
            processing_deadline_unix: 0,
            replaces: payload.replaces,
            created_unix: now,
        };
        let listing = [records::account_orders_prefix(account), order_id.clone().into_bytes()].concat();
        let transaction = transaction.put(records::order_key(&order_id), records::encode(&order), expires).put(
            listing,
            Vec::new(),
            expires,
        );
        self.store.commit(transaction).await.map_err(|error| match error {
            StoreError::Conflict { key } if key.starts_with("acme/cert/") => Problem::new(
                ProblemType::AlreadyReplaced,
                "the certificate named in replaces was replaced at the same time",
            ),
            other => conflict_to_retry(other, "order"),
        })?;
        tracing::info!(account = %account, order = %order_id, identifiers = order.identifiers.len(), "ACME order created");
        self.order_response(StatusCode::CREATED, &order)
    }

    fn choose_profile(&self, requested: Option<&str>) -> Result<String, Problem> {
        let profiles = self.issuer.profiles();
        let Some(requested) = requested else {
            return profiles
                .first()
                .map(|profile| profile.name.clone())
                .ok_or_else(|| Problem::internal("the issuer offers no certificate profile"));
        };
        if profiles.iter().any(|profile| profile.name == requested) {
            return Ok(requested.to_owned());
        }
        let names: Vec<&str> = profiles.iter().map(|profile| profile.name.as_str()).collect();
        Err(Problem::new(
            ProblemType::InvalidProfile,
            format!("profile {requested:?} is not offered; the profiles are {}", names.join(", ")),
        ))
    }

    fn check_requested_validity(
        &self,
        not_before: Option<OffsetDateTime>,
        not_after: Option<OffsetDateTime>,
    ) -> Result<(), Problem> {
        let now = OffsetDateTime::now_utc();
        if let (Some(start), Some(end)) = (not_before, not_after)
            && end <= start
        {
            return Err(Problem::malformed(format!("notAfter {end} is not after notBefore {start}")));
        }
        if let Some(end) = not_after {
            let start = not_before.unwrap_or(now);
            if end - start > self.settings.max_validity {
                return Err(Problem::malformed(format!(
                    "the requested validity from {start} to {end} is longer than the maximum of {} seconds",
                    self.settings.max_validity.as_secs()
                )));
            }
            if end <= now {
                return Err(Problem::malformed(format!("notAfter {end} is in the past")));
            }
        }
        Ok(())
    }

    /// Adds the per-account order counter to `transaction`, or refuses the
    /// order when the account has reached its hourly limit.
    fn count_order(&self, transaction: Transaction, account: &str, now: i64) -> Result<Transaction, Problem> {
        let limit = self.settings.orders_per_account_per_hour;
        if limit == 0 {
            return Ok(transaction);
        }
        let hour = now / 3600;
        let key = records::rate_key(account, hour);
        let stored = self.store.get(&key).map_err(records::store_problem)?;
        let (count, revision) = match &stored {
            Some(stored) => (String::from_utf8_lossy(&stored.value).parse::<u32>().unwrap_or(0), stored.revision),
            None => (0, 0),
        };
        if count >= limit {
            let mut problem = Problem::new(
                ProblemType::RateLimited,
                format!("account {} created {count} orders this hour, the limit is {limit}", self.account_url(account)),
            );
            problem.retry_after = Some(((hour + 1) * 3600 - now).max(1) as u64);
            return Err(problem);
        }
        Ok(transaction.when(key.clone(), revision).put(key, (count + 1).to_string().into_bytes(), (hour + 2) * 3600))
    }

    /// Marks the certificate named by an ARI certificate id as replaced by
    /// the new order.
    fn replace_certificate(
        &self,
        transaction: Transaction,
        account: &str,
        certid: &str,
        order_id: &str,
    ) -> Result<Transaction, Problem> {
        let cert = self.certificate_by_ari_id(certid)?;
        if cert.record.account != account {
            return Err(Problem::unauthorized(format!(
                "replaces names certificate {certid:?}, which another account holds"
            )));
        }
        if let Some(order) = &cert.record.replaced_by {
            return Err(Problem::new(
                ProblemType::AlreadyReplaced,
                format!(
                    "certificate {certid:?} was already replaced by order {}",
                    self.url(&format!("/acme/order/{order}"))
                ),
            ));
        }
        let mut record = cert.record.clone();
        record.replaced_by = Some(order_id.to_owned());
        let key = records::cert_key(&record.id);
        Ok(transaction.when(key.clone(), cert.revision).put(key, records::encode(&record), record.not_after_unix))
    }

    pub(crate) fn owned_order(&self, id: &str, account: &str) -> Result<Stored<OrderRecord>, Problem> {
        let url = self.url(&format!("/acme/order/{id}"));
        let order = records::read::<OrderRecord>(&self.store, &records::order_key(id))?
            .ok_or_else(|| Problem::malformed(format!("order {url} does not exist")).with_status(404))?;
        if order.record.account != account {
            return Err(Problem::unauthorized(format!("order {url} belongs to another account")));
        }
        Ok(order)
    }

    /// The status of an order: stored once finalization started, else
    /// derived from its authorizations and expiry.
    pub(crate) fn order_status(&self, order: &OrderRecord) -> Result<OrderStatus, Problem> {
        if matches!(order.status, OrderStatus::Processing | OrderStatus::Valid | OrderStatus::Invalid) {
            return Ok(order.status);
        }
        if order.expires_unix <= now_unix() {
            return Ok(OrderStatus::Invalid);
        }
        let mut all_valid = true;
        for id in &order.authorizations {
            let authz = self.authorization_record(id)?;
            match crate::authz::effective_status(&authz.record) {
                AuthorizationStatus::Valid => {}
                AuthorizationStatus::Pending => all_valid = false,
                _ => return Ok(OrderStatus::Invalid),
            }
        }
        Ok(if all_valid { OrderStatus::Ready } else { OrderStatus::Pending })
    }

    pub(crate) fn authorization_record(&self, id: &str) -> Result<Stored<AuthzRecord>, Problem> {
        records::read::<AuthzRecord>(&self.store, &records::authz_key(id))?.ok_or_else(|| {
            Problem::malformed(format!("authorization {} does not exist", self.url(&format!("/acme/authz/{id}"))))
                .with_status(404)
        })
    }

    async fn finalize_order(
        &self,
        id: &str,
        account: &str,
        csr: &[u8],
        account_spki: &[u8],
    ) -> Result<Response, Problem> {
        let order = self.owned_order(id, account)?;
        let status = self.order_status(&order.record)?;
        if status != OrderStatus::Ready {
            let status = serde_json::to_value(status).unwrap_or_default();
            return Err(Problem::new(
                ProblemType::OrderNotReady,
                format!(
                    "order {} is {}, not ready",
                    self.url(&format!("/acme/order/{id}")),
                    status.as_str().unwrap_or("?")
                ),
            ));
        }
        self.check_csr_for_order(csr, &order.record, account_spki)?;

        let mut processing = order.record.clone();
        processing.status = OrderStatus::Processing;
        processing.csr = Some(crate::b64::encode(csr));
        processing.processing_deadline_unix = now_unix() + self.settings.processing_timeout.as_secs() as i64;
        let key = records::order_key(id);
        let transaction = Transaction::default().when(key.clone(), order.revision).put(
            key,
            records::encode(&processing),
            processing.expires_unix,
        );
        let revision = match self.store.commit(transaction).await {
            Ok(revision) => revision,
            Err(StoreError::Conflict { .. }) => {
                return Err(Problem::new(
                    ProblemType::OrderNotReady,
                    format!("order {} is already being finalized", self.url(&format!("/acme/order/{id}"))),
                ));
            }
            Err(other) => return Err(records::store_problem(other)),
        };

        let finished = self.issue_for_order(Stored { record: processing, revision }).await?;
        self.order_response(StatusCode::OK, &finished)
    }

    /// Checks that the CSR passes the issuer's checks, names exactly the
    /// order's identifiers and does not use the account key.
    fn check_csr_for_order(&self, csr: &[u8], order: &OrderRecord, account_spki: &[u8]) -> Result<(), Problem> {
        let summary = self.issuer.check_csr(csr)?;
        if summary.spki_der == account_spki {
            return Err(Problem::new(ProblemType::BadCsr, "the CSR's public key is the account key; use another key"));
        }
        let mut requested: Vec<Identifier> = summary
            .identifiers
            .iter()
            .map(|identifier| match identifier.kind.as_str() {
                "dns" => Identifier::dns(normalize_dns(&identifier.value)),
                _ => identifier.clone(),
            })
            .collect();
        requested.sort();
        requested.dedup();
        let extra: Vec<&str> =
            requested.iter().filter(|name| !order.identifiers.contains(name)).map(|name| name.value.as_str()).collect();
        let missing: Vec<&str> =
            order.identifiers.iter().filter(|name| !requested.contains(name)).map(|name| name.value.as_str()).collect();
        if !extra.is_empty() {
            return Err(Problem::new(
                ProblemType::BadCsr,
                format!("the CSR names {}, which the order does not", extra.join(", ")),
            ));
        }
        if !missing.is_empty() {
            return Err(Problem::new(
                ProblemType::BadCsr,
                format!("the CSR does not name {}, which the order does", missing.join(", ")),
            ));
        }
        Ok(())
    }

    /// Signs the certificate of a processing order and stores it, or marks
    /// the order invalid if the issuer refuses.
    pub(crate) async fn issue_for_order(&self, order: Stored<OrderRecord>) -> Result<OrderRecord, Problem> {
        let csr_text = order.record.csr.clone().unwrap_or_default();
        let csr = crate::b64::decode("csr", &csr_text)?;
        let account_url = self.account_url(&order.record.account);
        let not_after = order.record.not_after_unix.and_then(|unix| OffsetDateTime::from_unix_timestamp(unix).ok());
        let request = IssueRequest {
            csr_der: &csr,
            identifiers: &order.record.identifiers,
            profile: &order.record.profile,
            account: &account_url,
            not_after,
        };
        let mut finished = order.record.clone();
        let key = records::order_key(&order.record.id);
        let issued = match self.issuer.issue(request).await {
            Ok(issued) => issued,
            Err(problem) => {
                finished.status = OrderStatus::Invalid;
                finished.error = Some(problem.clone());
                let transaction = Transaction::default().when(key.clone(), order.revision).put(
                    key,
                    records::encode(&finished),
                    finished.expires_unix,
                );
                self.store.commit(transaction).await.map_err(|error| conflict_to_retry(error, "order"))?;
                tracing::warn!(order = %finished.id, problem = %problem, "ACME order failed at issuance");
                return Err(problem);
            }
        };

        let cert_id = new_id();
        let cert = CertRecord {
            id: cert_id.clone(),
            account: order.record.account.clone(),
            order: order.record.id.clone(),
            serial_hex: hex::encode(&issued.serial),
            chains_pem: issued.chains.iter().map(|chain| chain_pem(&issued.leaf_der, chain)).collect(),
            identifiers: order.record.identifiers.clone(),
            not_before_unix: issued.not_before.unix_timestamp(),
            not_after_unix: issued.not_after.unix_timestamp(),
            revoked_reason: None,
            replaced_by: None,
        };
        finished.status = OrderStatus::Valid;
        finished.certificate = Some(cert_id.clone());
        finished.csr = None;
        let keep_until = cert.not_after_unix.max(finished.expires_unix);
        let transaction = Transaction::default()
            .when(key.clone(), order.revision)
            .put(key, records::encode(&finished), keep_until)
            .put(records::cert_key(&cert_id), records::encode(&cert), cert.not_after_unix)
            .put(records::cert_serial_key(&issued.serial), cert_id.clone().into_bytes(), cert.not_after_unix);
        self.store.commit(transaction).await.map_err(|error| conflict_to_retry(error, "order"))?;
        tracing::info!(order = %finished.id, serial = %cert.serial_hex, "ACME certificate issued");
        Ok(finished)
    }

    /// Takes over a finalization whose node stopped before it finished, by
    /// restarting issuance in the background under a new deadline. The
    /// caller answers with the order as it is (processing).
    fn resume_stale_finalization(self: Arc<Self>, order: &Stored<OrderRecord>) {
        if order.record.status != OrderStatus::Processing || order.record.processing_deadline_unix > now_unix() {
            return;
        }
        let mut record = order.record.clone();
        record.processing_deadline_unix = now_unix() + self.settings.processing_timeout.as_secs() as i64;
        let revision = order.revision;
        tokio::spawn(async move {
            let key = records::order_key(&record.id);
            let transaction = Transaction::default().when(key.clone(), revision).put(
                key,
                records::encode(&record),
                record.expires_unix,
            );
            // A conflict means another request took the finalization over first.
            let Ok(revision) = self.store.commit(transaction).await else {
                return;
            };
            tracing::warn!(order = %record.id, "resuming a finalization whose deadline passed");
            if let Err(problem) = self.issue_for_order(Stored { record, revision }).await {
                tracing::warn!(%problem, "resumed finalization failed");
            }
        });
    }

    pub(crate) fn order_response(&self, status: StatusCode, order: &OrderRecord) -> Result<Response, Problem> {
        let current = self.order_status(order)?;
        let url = self.url(&format!("/acme/order/{}", order.id));
        let authorizations: Vec<String> =
            order.authorizations.iter().map(|id| self.url(&format!("/acme/authz/{id}"))).collect();
        let mut body = serde_json::json!({
            "status": current,
            "expires": rfc3339(order.expires_unix),
            "identifiers": order.identifiers,
            "authorizations": authorizations,
            "finalize": format!("{url}/finalize"),
            "profile": order.profile,
        });
        if let Some(unix) = order.not_before_unix {
            body["notBefore"] = rfc3339(unix).into();
        }
        if let Some(unix) = order.not_after_unix {
            body["notAfter"] = rfc3339(unix).into();
        }
        if let Some(error) = &order.error {
            body["error"] = serde_json::to_value(error).unwrap_or_default();
        }
        if let Some(cert) = &order.certificate {
            body["certificate"] = self.url(&format!("/acme/cert/{cert}")).into();
        }
        if let Some(replaces) = &order.replaces {
            body["replaces"] = replaces.clone().into();
        }
        let mut headers = HeaderMap::new();
        if let Ok(location) = HeaderValue::from_str(&url) {
            headers.insert(header::LOCATION, location);
        }
        if current == OrderStatus::Processing {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(1));
        }
        Ok(self.json(status, &body, headers))
    }
}

fn new_authorization(account: &str, identifier: &Identifier, expires: i64) -> AuthzRecord {
    let wildcard = identifier.is_wildcard();
    let base =
        Identifier { kind: identifier.kind.clone(), value: identifier.value.trim_start_matches("*.").to_owned() };
    let kinds: &[ChallengeType] = if wildcard {
        &[ChallengeType::Dns01]
    } else if identifier.kind == "ip" {
        &[ChallengeType::Http01, ChallengeType::TlsAlpn01]
    } else {
        &[ChallengeType::Http01, ChallengeType::Dns01, ChallengeType::TlsAlpn01]
    };
    let challenges = kinds
        .iter()
        .map(|kind| ChallengeRecord {
            kind: *kind,
            token: crate::b64::encode(&rand::random::<[u8; 32]>()),
            status: ChallengeStatus::Pending,
            validated_unix: None,
            error: None,
            processing_deadline_unix: 0,
        })
        .collect();
    AuthzRecord {
        id: new_id(),
        account: account.to_owned(),
        identifier: base,
        wildcard,
        status: AuthorizationStatus::Pending,
        expires_unix: expires,
        challenges,
    }
}

fn parse_time(field: &str, value: Option<&str>) -> Result<Option<OffsetDateTime>, Problem> {
    value
        .map(|text| {
            OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .map_err(|error| Problem::malformed(format!("{field} {text:?} is not an RFC 3339 time: {error}")))
        })
        .transpose()
}

pub(crate) fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|time| time.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

fn chain_pem(leaf: &[u8], chain: &[Vec<u8>]) -> String {
    std::iter::once(leaf).chain(chain.iter().map(Vec::as_slice)).map(pem_certificate).collect()
}

pub(crate) fn pem_certificate(der: &[u8]) -> String {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let mut text = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in encoded.as_bytes().chunks(64) {
        text.push_str(std::str::from_utf8(line).unwrap_or_default());
        text.push('\n');
    }
    text.push_str("-----END CERTIFICATE-----\n");
    text
}
