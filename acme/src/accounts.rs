//! Accounts: newAccount, account update and deactivation, the orders
//! list and key rollover (RFC 8555, sections 7.3 and 7.1.2.1).

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use serde::Deserialize;

use crate::issuer::Issuer;
use crate::jws;
use crate::problem::{Problem, ProblemType};
use crate::records::{self, AccountRecord, EabRecord, Stored};
use crate::server::{AcmeServer, KeyRule, Signed, now_unix};
use crate::store::{Store, StoreError, Transaction};
use crate::types::AccountStatus;

/// Orders listed per page of the orders list.
const ORDERS_PAGE: usize = 100;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewAccountPayload {
    #[serde(default)]
    contact: Option<Vec<String>>,
    #[serde(default)]
    terms_of_service_agreed: Option<bool>,
    #[serde(default)]
    only_return_existing: Option<bool>,
    #[serde(default)]
    external_account_binding: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AccountUpdatePayload {
    #[serde(default)]
    contact: Option<Vec<String>>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    terms_of_service_agreed: Option<bool>,
}

/// A new random id: milliseconds since the epoch then random bits, in
/// hex, so ids sort by creation time.
pub(crate) fn new_id() -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0);
    format!("{millis:012x}{:016x}", rand::random::<u64>())
}

pub(crate) async fn new_account<S: Store, I: Issuer>(
    State(server): State<Arc<AcmeServer<S, I>>>,
    request: Request,
) -> Response {
    let result = async {
        let signed = server.accept(request, KeyRule::Jwk).await?;
        server.create_account(signed).await
    };
    server.finish(result.await)
}

pub(crate) async fn account<S: Store, I: Issuer>(
    State(server): State<Arc<AcmeServer<S, I>>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let result = async {
        let signed = server.accept(request, KeyRule::Kid).await?;
        server.update_account(&id, signed).await
    };
    server.finish(result.await)
}

pub(crate) async fn orders<S: Store, I: Issuer>(
    State(server): State<Arc<AcmeServer<S, I>>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let cursor = request.uri().query().and_then(|query| query.strip_prefix("cursor=")).map(str::to_owned);
    let result = async {
        let signed = server.accept(request, KeyRule::Kid).await?;
        server.list_orders(&id, &signed, cursor.as_deref())
    };
    server.finish(result.await)
}

pub(crate) async fn key_change<S: Store, I: Issuer>(
    State(server): State<Arc<AcmeServer<S, I>>>,
    request: Request,
) -> Response {
    let result = async {
        let signed = server.accept(request, KeyRule::Kid).await?;
        server.roll_key(signed).await
    };
    server.finish(result.await)
}

impl<S: Store, I: Issuer> AcmeServer<S, I> {
    async fn create_account(&self, signed: Signed) -> Result<Response, Problem> {
        let payload: NewAccountPayload = signed.jws.payload_json()?;
        let thumbprint = signed.key.thumbprint();
        if let Some(existing) = self.account_by_thumbprint(&thumbprint)? {
            return self.existing_account(&existing.record);
        }
        if payload.only_return_existing == Some(true) {
            return Err(Problem::new(
                ProblemType::AccountDoesNotExist,
                format!("no account has the key with thumbprint {thumbprint}"),
            ));
        }

        let contact = payload.contact.unwrap_or_default();
        check_contacts(&contact)?;
        let terms_agreed = payload.terms_of_service_agreed.unwrap_or(false);
        if let Some(terms) = &self.settings.terms_of_service
            && !terms_agreed
        {
            return Err(Problem::new(
                ProblemType::UserActionRequired,
                format!("agree to the terms of service at {terms} with termsOfServiceAgreed: true"),
            ));
        }

        let id = new_id();
        let eab = match &payload.external_account_binding {
            Some(binding) => Some(self.check_binding(binding, &signed)?),
            None if self.settings.external_account_required => {
                return Err(Problem::new(
                    ProblemType::ExternalAccountRequired,
                    "this directory requires externalAccountBinding in newAccount",
                ));
            }
            None => None,
        };

        let record = AccountRecord {
            id: id.clone(),
            status: AccountStatus::Valid,
            contact,
            key: signed.key.to_json(),
            thumbprint: thumbprint.clone(),
            terms_agreed,
            eab_key_id: eab.as_ref().map(|stored| stored.record.key_id.clone()),
            created_unix: now_unix(),
        };
        let thumbprint_key = records::account_thumbprint_key(&thumbprint);
        let mut transaction = Transaction::default()
            .when(thumbprint_key.clone(), 0)
            .put(thumbprint_key, id.clone().into_bytes(), 0)
            .put(records::account_key(&id), records::encode(&record), 0);
        if let Some(eab) = eab {
            let key = records::eab_key(&eab.record.key_id);
            let bound = EabRecord { account: Some(id.clone()), ..eab.record };
            transaction = transaction.when(key.clone(), eab.revision).put(key, records::encode(&bound), 0);
        }

        match self.store.commit(transaction).await {
            Ok(_) => {
                tracing::info!(account = %id, "ACME account created");
                Ok(self.account_response(StatusCode::CREATED, &record))
            }
            Err(StoreError::Conflict { key }) if key.starts_with("acme/eab/") => Err(Problem::unauthorized(format!(
                "external account binding key {:?} was used by another account at the same time",
                key.trim_start_matches("acme/eab/")
            ))),
            // The same key registered through another request at the same time.
            Err(StoreError::Conflict { .. }) => match self.account_by_thumbprint(&thumbprint)? {
                Some(existing) => self.existing_account(&existing.record),
                None => Err(Problem::internal("account creation conflicted, but no account has the key")),
            },
            Err(other) => Err(records::store_problem(other)),
        }
    }

    /// Verifies an external account binding and returns its key record.
    fn check_binding(&self, binding: &serde_json::Value, signed: &Signed) -> Result<Stored<EabRecord>, Problem> {
        let key_id = jws::eab_key_id(binding)?;
        let stored = records::read::<EabRecord>(&self.store, &records::eab_key(&key_id))?
            .ok_or_else(|| Problem::unauthorized(format!("external account binding key id {key_id:?} is not known")))?;
        if let Some(account) = &stored.record.account {
            return Err(Problem::unauthorized(format!(
                "external account binding key id {key_id:?} is already bound to account {}",
                self.account_url(account)
            )));
        }
        let hmac_key = crate::b64::decode("external account binding key", &stored.record.hmac_key)
            .map_err(|_| Problem::internal(format!("stored MAC key of key id {key_id:?} does not decode")))?;
        jws::verify_eab(binding, &hmac_key, &signed.key, &signed.jws.protected().url)?;
        Ok(stored)
    }

    /// Answers a newAccount for a key that already has an account. A deactivated account's key
    /// is refused, as RFC 8555 section 7.3.6 requires for every request it signs.
    fn existing_account(&self, record: &AccountRecord) -> Result<Response, Problem> {
        if record.status != AccountStatus::Valid {
            let status = serde_json::to_value(record.status).unwrap_or_default();
            return Err(Problem::unauthorized(format!(
                "account {} is {}; its key cannot be used again",
                self.account_url(&record.id),
                status.as_str().unwrap_or("not valid")
            )));
        }
        Ok(self.account_response(StatusCode::OK, record))
    }

    fn account_by_thumbprint(&self, thumbprint: &str) -> Result<Option<Stored<AccountRecord>>, Problem> {
        let Some(id) = self.store.get(&records::account_thumbprint_key(thumbprint)).map_err(records::store_problem)?
        else {
            return Ok(None);
        };
        let id = String::from_utf8_lossy(&id.value).into_owned();
        records::read(&self.store, &records::account_key(&id))
    }

    async fn update_account(&self, id: &str, signed: Signed) -> Result<Response, Problem> {
        let account = signed.account()?;
        if account.record.id != id {
            return Err(Problem::unauthorized(format!(
                "the request is signed by account {} and cannot change account {}",
                self.account_url(&account.record.id),
                self.account_url(id)
            )));
        }
        if signed.jws.is_post_as_get() {
            return Ok(self.account_response(StatusCode::OK, &account.record));
        }

        let payload: AccountUpdatePayload = signed.jws.payload_json()?;
        let mut record = account.record.clone();
        if let Some(contact) = payload.contact {
            check_contacts(&contact)?;
            record.contact = contact;
        }
        if let Some(agreed) = payload.terms_of_service_agreed {
            record.terms_agreed |= agreed;
        }
        match payload.status.as_deref() {
            None | Some("valid") => {}
            Some("deactivated") => record.status = AccountStatus::Deactivated,
            Some(other) => {
                return Err(Problem::malformed(format!(
                    "account status {other:?} cannot be set; only \"deactivated\" can"
                )));
            }
        }

        let key = records::account_key(id);
        let transaction =
            Transaction::default().when(key.clone(), account.revision).put(key, records::encode(&record), 0);
        self.store.commit(transaction).await.map_err(|error| conflict_to_retry(error, "account"))?;
        if record.status == AccountStatus::Deactivated {
            tracing::info!(account = %id, "ACME account deactivated");
        }
        Ok(self.account_response(StatusCode::OK, &record))
    }

    fn list_orders(&self, id: &str, signed: &Signed, cursor: Option<&str>) -> Result<Response, Problem> {
        let account = signed.account()?;
        if account.record.id != id {
            return Err(Problem::unauthorized(format!(
                "account {} cannot list the orders of account {}",
                self.account_url(&account.record.id),
                self.account_url(id)
            )));
        }
        let prefix = records::account_orders_prefix(id);
        let after = cursor.map(|cursor| [prefix.as_slice(), cursor.as_bytes()].concat());
        let page = self.store.scan(&prefix, after.as_deref(), ORDERS_PAGE + 1).map_err(records::store_problem)?;
        let order_ids: Vec<String> =
            page.iter().map(|(key, _)| String::from_utf8_lossy(&key[prefix.len()..]).into_owned()).collect();
        let shown = &order_ids[..order_ids.len().min(ORDERS_PAGE)];
        let urls: Vec<String> = shown.iter().map(|order| self.url(&format!("/acme/order/{order}"))).collect();

        let mut headers = HeaderMap::new();
        if order_ids.len() > ORDERS_PAGE
            && let Some(last) = shown.last()
        {
            let next = format!("<{}?cursor={last}>;rel=\"next\"", self.url(&format!("/acme/account/{id}/orders")));
            if let Ok(link) = HeaderValue::from_str(&next) {
                headers.append(header::LINK, link);
            }
        }
        Ok(self.json(StatusCode::OK, &serde_json::json!({ "orders": urls }), headers))
    }

    async fn roll_key(&self, signed: Signed) -> Result<Response, Problem> {
        let account = signed.account()?;
        let account_url = self.account_url(&account.record.id);
        let new_key = jws::verify_key_change(&signed.jws, &account_url, &signed.key)?;
        let new_thumbprint = new_key.thumbprint();
        if let Some(holder) = self.account_by_thumbprint(&new_thumbprint)? {
            let holder_url = self.account_url(&holder.record.id);
            let mut headers = HeaderMap::new();
            if let Ok(location) = HeaderValue::from_str(&holder_url) {
                headers.insert(header::LOCATION, location);
            }
            let problem =
                Problem::malformed(format!("the new key already belongs to account {holder_url}")).with_status(409);
            let mut response = self.problem(problem);
            response.headers_mut().extend(headers);
            return Ok(response);
        }

        let mut record = account.record.clone();
        record.key = new_key.to_json();
        record.thumbprint = new_thumbprint.clone();
        let account_key = records::account_key(&record.id);
        let new_index = records::account_thumbprint_key(&new_thumbprint);
        let transaction = Transaction::default()
            .when(account_key.clone(), account.revision)
            .when(new_index.clone(), 0)
            .put(account_key, records::encode(&record), 0)
            .put(new_index, record.id.clone().into_bytes(), 0)
            .delete(records::account_thumbprint_key(&account.record.thumbprint));
        match self.store.commit(transaction).await {
            Ok(_) => {
                tracing::info!(account = %record.id, "ACME account key rolled over");
                Ok(self.account_response(StatusCode::OK, &record))
            }
            Err(StoreError::Conflict { key }) if key.starts_with("acme/account-key/") => {
                Err(Problem::malformed("the new key was registered by another account at the same time")
                    .with_status(409))
            }
            Err(other) => Err(conflict_to_retry(other, "account")),
        }
    }

    fn account_response(&self, status: StatusCode, record: &AccountRecord) -> Response {
        let url = self.account_url(&record.id);
        let mut body = serde_json::json!({
            "status": record.status,
            "contact": record.contact,
            "orders": format!("{url}/orders"),
            "key": record.key,
            "termsOfServiceAgreed": record.terms_agreed,
        });
        if let Some(key_id) = &record.eab_key_id {
            body["externalAccountBinding"] = serde_json::json!({ "kid": key_id });
        }
        let mut headers = HeaderMap::new();
        if let Ok(location) = HeaderValue::from_str(&url) {
            headers.insert(header::LOCATION, location);
        }
        self.json(status, &body, headers)
    }
}

/// A conflict on a record the request read means another request changed
/// it first; the client may retry.
pub(crate) fn conflict_to_retry(error: StoreError, what: &str) -> Problem {
    match error {
        StoreError::Conflict { key } => {
            let mut problem =
                Problem::new(ProblemType::ServerInternal, format!("{what} {key} changed during the request; retry it"))
                    .with_status(409);
            problem.retry_after = Some(1);
            problem
        }
        other => records::store_problem(other),
    }
}

/// Accepts `mailto:` contacts with one plausible address each.
fn check_contacts(contacts: &[String]) -> Result<(), Problem> {
    for contact in contacts {
        let Some(address) = contact.strip_prefix("mailto:") else {
            return Err(Problem::new(
                ProblemType::UnsupportedContact,
                format!("contact {contact:?} is not a mailto: URL; only mailto: contacts are supported"),
            ));
        };
        let plausible = address.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !address.contains([',', '?', ' ', '<', '>'])
        });
        if !plausible {
            return Err(Problem::new(
                ProblemType::InvalidContact,
                format!("contact {contact:?} is not a single email address"),
            ));
        }
    }
    Ok(())
}
