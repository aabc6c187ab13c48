//! External account binding keys (RFC 8555, section 7.3.4), kept in the
//! store so that every node accepts them.

use crate::problem::Problem;
use crate::records::{self, EabRecord};
use crate::store::{Store, StoreError, Transaction};

/// Bytes of MAC key material in a new key (HS256 needs 32).
const HMAC_KEY_BYTES: usize = 32;

/// A newly created key. The MAC key is shown to the operator once.
pub struct NewEabKey {
    pub key_id: String,
    /// The MAC key, base64url without padding, as clients expect it.
    pub hmac_key: String,
}

impl std::fmt::Debug for NewEabKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("NewEabKey").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

/// Creates a key with a random key id and MAC key.
pub async fn create(store: &impl Store, label: &str, now_unix: i64) -> Result<NewEabKey, Problem> {
    if label.len() > 200 || label.chars().any(char::is_control) {
        return Err(Problem::malformed(format!(
            "label {label:?} is longer than 200 characters or has control characters"
        )));
    }
    let key_id = format!("kid-{}", hex::encode(rand::random::<[u8; 12]>()));
    let mut secret = zeroize::Zeroizing::new([0u8; HMAC_KEY_BYTES]);
    rand::fill(secret.as_mut_slice());
    let hmac_key = crate::b64::encode(secret.as_slice());
    let record = EabRecord {
        key_id: key_id.clone(),
        hmac_key: hmac_key.clone(),
        label: label.to_owned(),
        created_unix: now_unix,
        account: None,
    };
    let key = records::eab_key(&key_id);
    let transaction = Transaction::default().when(key.clone(), 0).put(key, records::encode(&record), 0);
    store.commit(transaction).await.map_err(records::store_problem)?;
    tracing::info!(key_id, label, "ACME external account binding key created");
    Ok(NewEabKey { key_id, hmac_key })
}

/// Lists every key, without MAC keys.
pub fn list(store: &impl Store) -> Result<Vec<EabRecord>, Problem> {
    let prefix = records::eab_prefix();
    let mut keys = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.scan(&prefix, after.as_deref(), 500).map_err(records::store_problem)?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = Some(last.clone());
        for (key, value) in &page {
            let mut record: EabRecord = serde_json::from_slice(&value.value).map_err(|error| {
                Problem::internal(format!("stored {} does not decode: {error}", String::from_utf8_lossy(key)))
            })?;
            record.hmac_key.clear();
            keys.push(record);
        }
        if page.len() < 500 {
            break;
        }
    }
    Ok(keys)
}

/// Removes a key, so that it cannot bind new accounts. Accounts it bound stay.
pub async fn remove(store: &impl Store, key_id: &str) -> Result<(), Problem> {
    let key = records::eab_key(key_id);
    let Some(stored) = store.get(&key).map_err(records::store_problem)? else {
        return Err(
            Problem::malformed(format!("external account binding key id {key_id:?} does not exist")).with_status(404)
        );
    };
    let transaction = Transaction::default().when(key.clone(), stored.revision).delete(key);
    match store.commit(transaction).await {
        Ok(_) => {
            tracing::info!(key_id, "ACME external account binding key removed");
            Ok(())
        }
        Err(StoreError::Conflict { .. }) => {
            Err(Problem::malformed(format!("external account binding key id {key_id:?} changed during removal; retry")))
        }
        Err(other) => Err(records::store_problem(other)),
    }
}
