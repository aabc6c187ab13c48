//! Column family names and key encodings.
//!
//! Integers in keys and meta values are big-endian `u64`, so RocksDB's
//! bytewise key order is numeric order.

use super::error::LedgerError;

pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_CA: &str = "ca";
pub(crate) const CF_ISSUANCE: &str = "issuance";
pub(crate) const CF_SERIALS: &str = "serials";
pub(crate) const CF_KV: &str = "kv";
/// Expiry index of the key-value space: bucket, then key, to an empty value.
pub(crate) const CF_KV_EXPIRY: &str = "kv_expiry";

pub(crate) const SCHEMA_VERSION: u64 = 1;

/// Width of an expiry bucket in seconds. Purges drop whole buckets.
pub(crate) const BUCKET_SECONDS: u64 = 3600;

/// Key-value entries under this prefix hold trust bundle material, such as JWT authorities; a
/// change to one of them wakes the bundle watchers.
pub const BUNDLE_KV_PREFIX: &[u8] = b"bundle/";

pub(crate) const META_SCHEMA_VERSION: &[u8] = b"schema_version";
pub(crate) const META_APPLIED_INDEX: &[u8] = b"applied_index";
pub(crate) const META_DIGEST: &[u8] = b"digest";
pub(crate) const META_ACTIVE_CA_VERSION: &[u8] = b"active_ca_version";
pub(crate) const META_LATEST_CA_VERSION: &[u8] = b"latest_ca_version";
/// Start (Unix seconds) of the oldest expiry bucket not yet purged.
pub(crate) const META_PURGE_CUTOFF: &[u8] = b"purge_cutoff";
pub(crate) const META_ISSUANCE_COUNT: &[u8] = b"issuance_count";
pub(crate) const META_KV_REVISION: &[u8] = b"kv_revision";
/// Prefix of the per-bucket record counters, followed by the bucket start.
pub(crate) const META_BUCKET_COUNT_PREFIX: &[u8] = b"bucket_count/";

/// Returns the start of the expiry bucket holding `not_after_unix`, which
/// must not be negative.
pub(crate) fn expiry_bucket(not_after_unix: i64) -> u64 {
    let seconds = u64::try_from(not_after_unix).unwrap_or(0);
    seconds - seconds % BUCKET_SECONDS
}

/// Key of a record in the `issuance` column family: bucket, then serial.
pub(crate) fn issuance_key(bucket: u64, serial: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + serial.len());
    key.extend_from_slice(&bucket.to_be_bytes());
    key.extend_from_slice(serial);
    key
}

/// Key of an entry in the `kv_expiry` column family.
pub(crate) fn kv_expiry_key(expires_unix: i64, key: &[u8]) -> Vec<u8> {
    issuance_key(expiry_bucket(expires_unix), key)
}

pub(crate) fn bucket_count_key(bucket: u64) -> Vec<u8> {
    let mut key = META_BUCKET_COUNT_PREFIX.to_vec();
    key.extend_from_slice(&bucket.to_be_bytes());
    key
}

pub(crate) fn ca_version_key(version: u64) -> [u8; 8] {
    version.to_be_bytes()
}

/// Decodes an 8-byte big-endian `u64`, naming `item` if the length is wrong.
pub(crate) fn decode_u64(item: &str, value: &[u8]) -> Result<u64, LedgerError> {
    let bytes: [u8; 8] = value.try_into().map_err(|_| LedgerError::Decode {
        item: item.to_owned(),
        reason: format!("expected 8 bytes, found {}", value.len()),
    })?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_bucket_rounds_down_to_hour() {
        assert_eq!(expiry_bucket(0), 0);
        assert_eq!(expiry_bucket(3599), 0);
        assert_eq!(expiry_bucket(3600), 3600);
        assert_eq!(expiry_bucket(7201), 7200);
    }

    #[test]
    fn issuance_keys_sort_by_bucket_first() {
        let early = issuance_key(3600, &[0xff, 0xff]);
        let late = issuance_key(7200, &[0x00]);
        assert!(early < late);
        assert!(early < 7200u64.to_be_bytes().to_vec());
    }
}
