//! The ACME objects as stored, as JSON, and the keys they are stored at.
//!
//! Keys:
//! - `acme/config/nonce-key`: the shared nonce MAC key.
//! - `acme/nonce/<nonce>`: a used nonce, until it expires.
//! - `acme/account/<id>`, and `acme/account-key/<thumbprint>` to its id.
//! - `acme/account-orders/<account id>/<order id>`: the account's orders.
//! - `acme/order/<id>`, `acme/authz/<id>`, `acme/cert/<id>`.
//! - `acme/cert-serial/<serial hex>`: certificate id by serial.
//! - `acme/eab/<key id>`: an external account binding key.
//! - `acme/rate/<account id>/<hour>`: orders created in that hour.
//! - `acme/revoked/<serial hex>`: a revoked certificate, until it expires.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::problem::Problem;
use crate::store::{Store, StoreError, Versioned};
use crate::types::{AccountStatus, AuthorizationStatus, ChallengeStatus, ChallengeType, Identifier, OrderStatus};

pub const NONCE_KEY: &str = "acme/config/nonce-key";

pub fn nonce_key(nonce: &str) -> Vec<u8> {
    format!("acme/nonce/{nonce}").into_bytes()
}

pub fn account_key(id: &str) -> Vec<u8> {
    format!("acme/account/{id}").into_bytes()
}

pub fn account_thumbprint_key(thumbprint: &str) -> Vec<u8> {
    format!("acme/account-key/{thumbprint}").into_bytes()
}

pub fn account_orders_prefix(account: &str) -> Vec<u8> {
    format!("acme/account-orders/{account}/").into_bytes()
}

pub fn order_key(id: &str) -> Vec<u8> {
    format!("acme/order/{id}").into_bytes()
}

pub fn authz_key(id: &str) -> Vec<u8> {
    format!("acme/authz/{id}").into_bytes()
}

pub fn cert_key(id: &str) -> Vec<u8> {
    format!("acme/cert/{id}").into_bytes()
}

pub fn cert_serial_key(serial: &[u8]) -> Vec<u8> {
    format!("acme/cert-serial/{}", hex::encode(serial)).into_bytes()
}

pub fn revoked_key(serial: &[u8]) -> Vec<u8> {
    format!("acme/revoked/{}", hex::encode(serial)).into_bytes()
}

pub fn revoked_prefix() -> Vec<u8> {
    b"acme/revoked/".to_vec()
}

pub fn eab_key(key_id: &str) -> Vec<u8> {
    format!("acme/eab/{key_id}").into_bytes()
}

pub fn eab_prefix() -> Vec<u8> {
    b"acme/eab/".to_vec()
}

pub fn rate_key(account: &str, hour: i64) -> Vec<u8> {
    format!("acme/rate/{account}/{hour}").into_bytes()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub id: String,
    pub status: AccountStatus,
    #[serde(default)]
    pub contact: Vec<String>,
    /// The account's public key as a JWK.
    pub key: serde_json::Value,
    pub thumbprint: String,
    #[serde(default)]
    pub terms_agreed: bool,
    #[serde(default)]
    pub eab_key_id: Option<String>,
    pub created_unix: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderRecord {
    pub id: String,
    pub account: String,
    /// Pending until finalization starts; pending and ready are derived
    /// from the authorizations when the order is read.
    pub status: OrderStatus,
    pub identifiers: Vec<Identifier>,
    pub authorizations: Vec<String>,
    pub expires_unix: i64,
    #[serde(default)]
    pub not_before_unix: Option<i64>,
    #[serde(default)]
    pub not_after_unix: Option<i64>,
    pub profile: String,
    #[serde(default)]
    pub error: Option<Problem>,
    #[serde(default)]
    pub certificate: Option<String>,
    /// The CSR (base64url DER) once finalization started.
    #[serde(default)]
    pub csr: Option<String>,
    /// While processing, the time after which another node may take the
    /// finalization over.
    #[serde(default)]
    pub processing_deadline_unix: i64,
    #[serde(default)]
    pub replaces: Option<String>,
    pub created_unix: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChallengeRecord {
    #[serde(rename = "type")]
    pub kind: ChallengeType,
    pub token: String,
    pub status: ChallengeStatus,
    #[serde(default)]
    pub validated_unix: Option<i64>,
    #[serde(default)]
    pub error: Option<Problem>,
    /// While processing, the time after which another node may validate
    /// again.
    #[serde(default)]
    pub processing_deadline_unix: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthzRecord {
    pub id: String,
    pub account: String,
    /// The identifier to validate, without a wildcard label.
    pub identifier: Identifier,
    #[serde(default)]
    pub wildcard: bool,
    pub status: AuthorizationStatus,
    pub expires_unix: i64,
    pub challenges: Vec<ChallengeRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertRecord {
    pub id: String,
    pub account: String,
    pub order: String,
    pub serial_hex: String,
    /// Each chain as PEM, the leaf first, the preferred chain first.
    pub chains_pem: Vec<String>,
    pub identifiers: Vec<Identifier>,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    #[serde(default)]
    pub revoked_reason: Option<u8>,
    /// The order that replaced this certificate (RFC 9773), if any.
    #[serde(default)]
    pub replaced_by: Option<String>,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct EabRecord {
    pub key_id: String,
    /// The MAC key, base64url.
    pub hmac_key: String,
    #[serde(default)]
    pub label: String,
    pub created_unix: i64,
    /// The account this key was bound to, once used.
    #[serde(default)]
    pub account: Option<String>,
}

/// Shows the record without its MAC key.
impl std::fmt::Debug for EabRecord {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EabRecord")
            .field("key_id", &self.key_id)
            .field("label", &self.label)
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

/// A record read from the store with the revision to commit against.
#[derive(Debug, Clone)]
pub struct Stored<T> {
    pub record: T,
    pub revision: u64,
}

pub fn read<T: DeserializeOwned>(store: &impl Store, key: &[u8]) -> Result<Option<Stored<T>>, Problem> {
    let Some(Versioned { value, revision }) = store.get(key).map_err(store_problem)? else {
        return Ok(None);
    };
    let record = serde_json::from_slice(&value).map_err(|error| {
        Problem::internal(format!("stored {} does not decode: {error}", String::from_utf8_lossy(key)))
    })?;
    Ok(Some(Stored { record, revision }))
}

pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("ACME records serialize to JSON")
}

/// Maps a store failure that is not a conflict to a problem.
pub fn store_problem(error: StoreError) -> Problem {
    match error {
        StoreError::Unavailable(reason) => {
            let mut problem = Problem::internal(format!("the ledger cannot commit now: {reason}")).with_status(503);
            problem.retry_after = Some(1);
            problem
        }
        other => Problem::internal(other.to_string()),
    }
}
