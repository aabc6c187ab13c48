//! The trust bundle of a trust domain: Sigil's X.509 roots with their taint marks, and the JWT
//! authorities that downstream CAs such as SPIRE servers publish. Both live in the ledger, so
//! every node serves the same bundle; JWT authorities and taint marks are key-value entries under
//! [`BUNDLE_KV_PREFIX`], which wake the bundle watchers when they change.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};
use sigil_raft::RequestId;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::ledger::{
    BUNDLE_KV_PREFIX, Command, CommandResult, KvCondition, KvTransaction, KvWrite, Ledger, LedgerError,
};
use crate::replica::{Replica, WriteError};

/// Maximum length of a JWT authority key ID, in bytes.
pub const MAX_KEY_ID_BYTES: usize = 256;

/// Attempts to publish a JWT authority when concurrent publishers change the set meanwhile.
const PUBLISH_ATTEMPTS: u32 = 5;

/// A root certificate of the bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Root {
    pub der: Vec<u8>,
    pub tainted: bool,
}

/// A key that verifies JWT-SVIDs of a trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    /// PKIX SubjectPublicKeyInfo, DER.
    pub public_key: Vec<u8>,
    pub key_id: String,
    /// Seconds since the Unix epoch.
    pub expires_at: i64,
    pub tainted: bool,
}

/// The trust material of one trust domain, as this node has applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub trust_domain: String,
    /// The node's applied ledger index when the bundle was read.
    pub version: u64,
    pub x509_roots: Vec<X509Root>,
    pub jwt_authorities: Vec<JwtAuthority>,
}

impl Bundle {
    /// True when both bundles hold the same roots and JWT authorities, whatever their versions.
    pub fn same_material(&self, other: &Bundle) -> bool {
        self.x509_roots == other.x509_roots && self.jwt_authorities == other.jwt_authorities
    }

    /// Returns the earliest time after `now` at which the bundle changes without a ledger write,
    /// because a JWT authority expires.
    pub fn next_expiry(&self, now: i64) -> Option<i64> {
        self.jwt_authorities.iter().map(|authority| authority.expires_at).filter(|&at| at > now).min()
    }
}

/// A JWT authority as the ledger stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredJwtAuthority {
    /// Base64 of the DER SubjectPublicKeyInfo.
    public_key: String,
    key_id: String,
    expires_at: i64,
    #[serde(default)]
    tainted: bool,
    /// SPIFFE ID of the caller that published it.
    published_by: String,
    published_at: i64,
}

impl StoredJwtAuthority {
    fn authority(&self) -> Option<JwtAuthority> {
        Some(JwtAuthority {
            public_key: STANDARD.decode(&self.public_key).ok()?,
            key_id: self.key_id.clone(),
            expires_at: self.expires_at,
            tainted: self.tainted,
        })
    }
}

/// Refusal or failure of a JWT authority publication.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "key ID {key_id:?} of trust domain {trust_domain:?} is already published with another public key; a key ID \
         names one key"
    )]
    KeyIdTaken { trust_domain: String, key_id: String },
    #[error(
        "trust domain {trust_domain:?} already has {count} JWT authorities, the most `downstream.max_jwt_authorities` \
         allows; publish again after older keys expire"
    )]
    Full { trust_domain: String, count: usize },
    #[error("the cluster cannot commit the JWT authority now: {0}")]
    Unavailable(String),
    #[error("read or write the JWT authorities: {0}")]
    Ledger(#[from] LedgerError),
}

fn jwt_prefix(trust_domain: &str) -> Vec<u8> {
    let mut key = BUNDLE_KV_PREFIX.to_vec();
    key.extend_from_slice(format!("jwt/{trust_domain}/").as_bytes());
    key
}

fn jwt_key(trust_domain: &str, key_id: &str) -> Vec<u8> {
    let mut key = jwt_prefix(trust_domain);
    key.extend_from_slice(key_id.as_bytes());
    key
}

/// Key of the taint mark of the root whose DER has this SHA-256.
pub fn taint_key(root_der: &[u8]) -> Vec<u8> {
    let mut key = BUNDLE_KV_PREFIX.to_vec();
    key.extend_from_slice(b"tainted-root/");
    key.extend_from_slice(hex::encode(digest(&SHA256, root_der)).as_bytes());
    key
}

/// Reads the bundle of `trust_domain` from this node's ledger. JWT authorities that expired
/// before `now` are left out.
///
/// # Errors
///
/// Fails when the ledger cannot be read.
pub fn read(ledger: &Ledger, trust_domain: &str, now: i64) -> Result<Bundle, LedgerError> {
    let version = ledger.applied_index();
    let x509_roots = x509_roots(ledger, now)?;
    let jwt_authorities = jwt_authorities(ledger, trust_domain, now)?;
    Ok(Bundle { trust_domain: trust_domain.to_owned(), version, x509_roots, jwt_authorities })
}

/// The roots of every CA version whose intermediate has not expired: the signing one, prepared
/// ones that sign later, and older ones whose certificates may still be in use. Each root appears
/// once, newest version first.
fn x509_roots(ledger: &Ledger, now: i64) -> Result<Vec<X509Root>, LedgerError> {
    let mut roots: Vec<X509Root> = Vec::new();
    for version in ledger.ca_versions()?.into_iter().rev() {
        if !intermediate_valid_at(&version.intermediates_der, now) {
            continue;
        }
        for der in version.roots_der {
            if roots.iter().any(|root| root.der == der) {
                continue;
            }
            let tainted = ledger.kv_get(&taint_key(&der))?.is_some();
            roots.push(X509Root { der, tainted });
        }
    }
    Ok(roots)
}

fn intermediate_valid_at(intermediates_der: &[Vec<u8>], now: i64) -> bool {
    intermediates_der
        .first()
        .and_then(|der| X509Certificate::from_der(der).ok())
        .is_some_and(|(_, cert)| cert.validity().not_after.timestamp() > now)
}

fn jwt_authorities(ledger: &Ledger, trust_domain: &str, now: i64) -> Result<Vec<JwtAuthority>, LedgerError> {
    let prefix = jwt_prefix(trust_domain);
    let mut authorities = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = ledger.kv_scan(&prefix, after.as_deref(), 256)?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(last.clone());
        for (key, stored) in &page {
            match serde_json::from_slice::<StoredJwtAuthority>(&stored.value).ok().and_then(|s| s.authority()) {
                Some(authority) if authority.expires_at > now => authorities.push(authority),
                Some(_) => {}
                None => tracing::warn!(key = %String::from_utf8_lossy(key), "skipping an unreadable JWT authority"),
            }
        }
    }
    Ok(authorities)
}

/// A JWT authority to publish, as a caller sent it.
#[derive(Debug, Clone)]
pub struct Publication<'a> {
    pub trust_domain: &'a str,
    pub authority: &'a JwtAuthority,
    /// SPIFFE ID of the caller.
    pub publisher: &'a str,
    pub max_authorities: usize,
}

/// Checks a JWT authority before it is published.
///
/// # Errors
///
/// [`PublishError::Invalid`] naming the bad field.
pub fn check(authority: &JwtAuthority, now: i64) -> Result<(), PublishError> {
    if authority.key_id.is_empty() {
        return Err(PublishError::Invalid("key_id is empty; a JWT authority needs a key ID".to_owned()));
    }
    if authority.key_id.len() > MAX_KEY_ID_BYTES || authority.key_id.chars().any(char::is_control) {
        return Err(PublishError::Invalid(format!(
            "key_id {:?} is invalid: it must be 1 to {MAX_KEY_ID_BYTES} bytes without control characters",
            authority.key_id
        )));
    }
    if authority.public_key.is_empty() {
        return Err(PublishError::Invalid(format!("public_key of key {:?} is empty", authority.key_id)));
    }
    crate::csr::check_public_key(&authority.public_key).map_err(|error| {
        PublishError::Invalid(format!("public_key of key {:?} is not usable: {error}", authority.key_id))
    })?;
    if authority.expires_at <= now {
        return Err(PublishError::Invalid(format!(
            "expires_at {} of key {:?} is not in the future (now is {now}); a JWT authority must expire, and later",
            authority.expires_at, authority.key_id
        )));
    }
    Ok(())
}

/// Adds a JWT authority to its trust domain's set unless the same key is there already, and
/// returns the set afterwards, read on this node after the write was applied.
///
/// # Errors
///
/// See [`PublishError`]; a refused publication changes nothing.
pub async fn publish(replica: &Arc<Replica>, publication: &Publication<'_>) -> Result<Vec<JwtAuthority>, PublishError> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    check(publication.authority, now)?;
    for attempt in 1..=PUBLISH_ATTEMPTS {
        replica.sync_read().await.map_err(|error| PublishError::Unavailable(error.to_string()))?;
        match try_publish(replica, publication, now).await {
            Err(PublishError::Ledger(LedgerError::KvConflict { key, .. })) if attempt < PUBLISH_ATTEMPTS => {
                tracing::debug!(key, attempt, "JWT authority set changed during publication; retrying");
                tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
            }
            other => return other,
        }
    }
    Err(PublishError::Unavailable("the JWT authority set kept changing during publication".to_owned()))
}

async fn try_publish(
    replica: &Arc<Replica>,
    publication: &Publication<'_>,
    now: i64,
) -> Result<Vec<JwtAuthority>, PublishError> {
    let ledger = replica.ledger();
    let authority = publication.authority;
    let key = jwt_key(publication.trust_domain, &authority.key_id);
    let current = ledger.kv_get(&key)?;
    let stored = current.as_ref().and_then(|value| serde_json::from_slice::<StoredJwtAuthority>(&value.value).ok());
    if let Some(existing) = stored.as_ref().and_then(StoredJwtAuthority::authority) {
        if existing.public_key != authority.public_key {
            return Err(PublishError::KeyIdTaken {
                trust_domain: publication.trust_domain.to_owned(),
                key_id: authority.key_id.clone(),
            });
        }
        if existing == *authority {
            return Ok(jwt_authorities(ledger, publication.trust_domain, now)?);
        }
    }
    let count = jwt_authorities(ledger, publication.trust_domain, now)?.len();
    if current.is_none() && count >= publication.max_authorities {
        return Err(PublishError::Full { trust_domain: publication.trust_domain.to_owned(), count });
    }

    let value = StoredJwtAuthority {
        public_key: STANDARD.encode(&authority.public_key),
        key_id: authority.key_id.clone(),
        expires_at: authority.expires_at,
        tainted: authority.tainted,
        published_by: publication.publisher.to_owned(),
        published_at: now,
    };
    let command = Command::kv_transaction(KvTransaction {
        conditions: vec![KvCondition { key: key.clone(), revision: current.map_or(0, |value| value.revision) }],
        writes: vec![KvWrite {
            key,
            value: serde_json::to_vec(&value).map_err(|error| PublishError::Invalid(error.to_string()))?,
            delete: false,
            expires_unix: authority.expires_at,
        }],
    });
    match replica.write(RequestId::random(), &command).await {
        Ok(CommandResult::KvCommitted { .. }) => Ok(jwt_authorities(ledger, publication.trust_domain, now)?),
        Ok(other) => Err(PublishError::Unavailable(format!("a key-value transaction returned {other:?}"))),
        Err(WriteError::Rejected(error)) => Err(PublishError::Ledger(error)),
        Err(WriteError::Unavailable(error)) => Err(PublishError::Unavailable(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(key_id: &str, expires_at: i64) -> JwtAuthority {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate a key");
        JwtAuthority {
            public_key: rcgen::PublicKeyData::subject_public_key_info(&key),
            key_id: key_id.to_owned(),
            expires_at,
            tainted: false,
        }
    }

    #[test]
    fn check_names_the_bad_field() {
        let now = 1_000;
        let cases = [
            (authority("", 2_000), "key_id is empty"),
            (authority("a\nb", 2_000), "without control characters"),
            (JwtAuthority { public_key: vec![1, 2, 3], ..authority("k1", 2_000) }, "is not usable"),
            (JwtAuthority { public_key: Vec::new(), ..authority("k1", 2_000) }, "public_key of key \"k1\" is empty"),
            (authority("k1", 1_000), "expires_at 1000"),
            (authority("k1", 0), "expires_at 0"),
        ];
        for (bad, expected) in cases {
            let error = check(&bad, now).expect_err(expected).to_string();
            assert!(error.contains(expected), "{error:?} should contain {expected:?}");
        }
        check(&authority("k1", 2_000), now).expect("a valid authority passes");
    }

    #[test]
    fn next_expiry_is_the_earliest_future_one() {
        let bundle = Bundle {
            trust_domain: "example.org".to_owned(),
            version: 1,
            x509_roots: Vec::new(),
            jwt_authorities: vec![authority("a", 500), authority("b", 3_000), authority("c", 2_000)],
        };
        assert_eq!(bundle.next_expiry(1_000), Some(2_000));
        assert_eq!(bundle.next_expiry(3_000), None);
    }

    #[test]
    fn jwt_keys_prefix_per_trust_domain() {
        let key = jwt_key("example.org", "k1");
        assert!(key.starts_with(&jwt_prefix("example.org")));
        assert!(!key.starts_with(&jwt_prefix("example.or")));
        assert!(key.starts_with(BUNDLE_KV_PREFIX));
        assert!(taint_key(b"root").starts_with(BUNDLE_KV_PREFIX));
    }
}
