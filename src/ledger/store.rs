//! The RocksDB database behind the ledger: opening, stored state and reads.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prost::Message;
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType, IteratorMode, Options, WriteBatch, WriteOptions,
    checkpoint::Checkpoint, compaction_filter::Decision,
};

use super::command::{CaVersion, IssuanceRecord, KvValue};
use super::error::LedgerError;
use super::keys::{
    self, CF_CA, CF_ISSUANCE, CF_KV, CF_KV_EXPIRY, CF_META, CF_SERIALS, META_ACTIVE_CA_VERSION, META_APPLIED_INDEX,
    META_DIGEST, META_ISSUANCE_COUNT, META_KV_REVISION, META_LATEST_CA_VERSION, META_PURGE_CUTOFF, META_SCHEMA_VERSION,
    SCHEMA_VERSION,
};

/// The state that every applied entry reads and advances. It is stored in
/// the `meta` column family and cached in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LedgerState {
    pub(crate) applied_index: u64,
    pub(crate) digest: [u8; 32],
    /// Active CA version, 0 before the first install.
    pub(crate) active_ca_version: u64,
    pub(crate) latest_ca_version: u64,
    /// Start (Unix seconds) of the oldest expiry bucket not yet purged.
    pub(crate) purge_cutoff: u64,
    pub(crate) issuance_count: u64,
    /// Revision of the last accepted key-value transaction, 0 before one.
    pub(crate) kv_revision: u64,
}

/// Whether `Store::open` may create a new, empty ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenMode {
    CreateIfMissing,
    /// The folder must contain a ledger with every column family and a
    /// schema version, as a checkpoint does.
    Existing,
}

/// Whether a write returns before or after the WAL is synced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// The write is in the WAL, so a killed process loses nothing, but a
    /// power loss may lose it until `Store::sync_wal` runs.
    Buffered,
    Synced,
}

pub(crate) struct Store {
    pub(crate) db: DB,
    /// Copy of `LedgerState::purge_cutoff`, shared with the `serials`
    /// compaction filter. It is raised only after the purge is written.
    pub(crate) purge_cutoff: Arc<AtomicU64>,
}

impl Store {
    /// Opens the database at `path` and loads its state.
    pub(crate) fn open(path: &Path, mode: OpenMode) -> Result<(Store, LedgerState), LedgerError> {
        let purge_cutoff = Arc::new(AtomicU64::new(0));

        let mut db_options = column_family_options();
        let create = mode == OpenMode::CreateIfMissing;
        db_options.create_if_missing(create);
        db_options.create_missing_column_families(create);

        let column_families = vec![
            ColumnFamilyDescriptor::new(CF_META, column_family_options()),
            ColumnFamilyDescriptor::new(CF_CA, column_family_options()),
            ColumnFamilyDescriptor::new(CF_ISSUANCE, column_family_options()),
            ColumnFamilyDescriptor::new(CF_SERIALS, serials_options(Arc::clone(&purge_cutoff))),
            ColumnFamilyDescriptor::new(CF_KV, column_family_options()),
            ColumnFamilyDescriptor::new(CF_KV_EXPIRY, column_family_options()),
        ];
        // A ledger written before the key-value space existed lacks its
        // column families, so they are created even when opening one.
        db_options.create_missing_column_families(true);
        let db = DB::open_cf_descriptors(&db_options, path, column_families)
            .map_err(|cause| LedgerError::storage(format!("open ledger at {}", path.display()), cause))?;

        let state = load_state(&db, path, mode)?;
        purge_cutoff.store(state.purge_cutoff, Ordering::Release);
        Ok((Store { db, purge_cutoff }, state))
    }

    pub(crate) fn cf(&self, name: &str) -> &ColumnFamily {
        column_family(&self.db, name)
    }

    pub(crate) fn ca_version(&self, version: u64) -> Result<Option<CaVersion>, LedgerError> {
        let value = self
            .db
            .get_pinned_cf(self.cf(CF_CA), keys::ca_version_key(version))
            .map_err(|cause| LedgerError::storage(format!("read CA version {version}"), cause))?;
        value.map(|bytes| decode_message(&format!("CA version {version}"), &bytes)).transpose()
    }

    pub(crate) fn ca_versions(&self) -> Result<Vec<CaVersion>, LedgerError> {
        let mut versions = Vec::new();
        for entry in self.db.iterator_cf(self.cf(CF_CA), IteratorMode::Start) {
            let (key, value) = entry.map_err(|cause| LedgerError::storage("list CA versions", cause))?;
            let version = keys::decode_u64("CA version key", &key)?;
            versions.push(decode_message(&format!("CA version {version}"), &value)?);
        }
        Ok(versions)
    }

    /// Returns the bucket of `serial` if the serial index contains it and its
    /// record has not been purged. Entries below the purge cutoff may still
    /// be on disk until the compaction filter drops them, so they are
    /// treated as absent here, independent of compaction timing.
    pub(crate) fn live_bucket(&self, serial: &[u8], purge_cutoff: u64) -> Result<Option<u64>, LedgerError> {
        let value = self
            .db
            .get_pinned_cf(self.cf(CF_SERIALS), serial)
            .map_err(|cause| LedgerError::storage(format!("read serial index for {}", hex::encode(serial)), cause))?;
        let Some(value) = value else {
            return Ok(None);
        };
        let bucket = keys::decode_u64("serial index entry", &value)?;
        Ok((bucket >= purge_cutoff).then_some(bucket))
    }

    pub(crate) fn issuance(&self, serial: &[u8]) -> Result<Option<IssuanceRecord>, LedgerError> {
        let purge_cutoff = self.purge_cutoff.load(Ordering::Acquire);
        match self.live_bucket(serial, purge_cutoff)? {
            Some(bucket) => self.issuance_in_bucket(bucket, serial),
            None => Ok(None),
        }
    }

    pub(crate) fn issuance_in_bucket(&self, bucket: u64, serial: &[u8]) -> Result<Option<IssuanceRecord>, LedgerError> {
        let serial_hex = hex::encode(serial);
        let value = self
            .db
            .get_pinned_cf(self.cf(CF_ISSUANCE), keys::issuance_key(bucket, serial))
            .map_err(|cause| LedgerError::storage(format!("read issuance record {serial_hex}"), cause))?;
        value.map(|bytes| decode_message(&format!("issuance record {serial_hex}"), &bytes)).transpose()
    }

    pub(crate) fn kv_get(&self, key: &[u8]) -> Result<Option<KvValue>, LedgerError> {
        let item = || format!("key-value entry {}", super::command::printable_key(key));
        let value = self
            .db
            .get_pinned_cf(self.cf(CF_KV), key)
            .map_err(|cause| LedgerError::storage(format!("read {}", item()), cause))?;
        value.map(|bytes| decode_message(&item(), &bytes)).transpose()
    }

    /// Returns up to `limit` entries whose keys start with `prefix` and sort
    /// after `after`, in key order.
    pub(crate) fn kv_scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, KvValue)>, LedgerError> {
        let start = match after {
            Some(after) => {
                let mut start = after.to_vec();
                start.push(0);
                start
            }
            None => prefix.to_vec(),
        };
        let mode = IteratorMode::From(&start, rocksdb::Direction::Forward);
        let mut entries = Vec::new();
        for entry in self.db.iterator_cf(self.cf(CF_KV), mode) {
            let (key, value) = entry.map_err(|cause| LedgerError::storage("scan key-value entries", cause))?;
            if !key.starts_with(prefix) || entries.len() == limit {
                break;
            }
            let decoded = decode_message(&format!("key-value entry {}", super::command::printable_key(&key)), &value)?;
            entries.push((key.to_vec(), decoded));
        }
        Ok(entries)
    }

    pub(crate) fn write(&self, batch: WriteBatch, durability: Durability) -> Result<(), rocksdb::Error> {
        let mut options = WriteOptions::default();
        options.set_sync(durability == Durability::Synced);
        self.db.write_opt(batch, &options)
    }

    /// Syncs the WAL, which makes every write before the call durable.
    pub(crate) fn sync_wal(&self) -> Result<(), LedgerError> {
        self.db.flush_wal(true).map_err(|cause| LedgerError::storage("sync ledger WAL", cause))
    }

    /// Writes a RocksDB checkpoint into `dir`, which must not exist. It
    /// flushes the memtables, then hard-links the table files, so its cost
    /// depends on the number of files and not on the number of records.
    pub(crate) fn create_checkpoint(&self, dir: &Path) -> Result<(), LedgerError> {
        let operation = || format!("create ledger checkpoint at {}", dir.display());
        let checkpoint = Checkpoint::new(&self.db).map_err(|cause| LedgerError::storage(operation(), cause))?;
        checkpoint.create_checkpoint(dir).map_err(|cause| LedgerError::storage(operation(), cause))
    }
}

fn column_family<'db>(db: &'db DB, name: &str) -> &'db ColumnFamily {
    db.cf_handle(name).expect("Store::open opens every column family that the ledger names")
}

fn column_family_options() -> Options {
    let mut options = Options::default();
    options.set_compression_type(DBCompressionType::Lz4);
    options
}

/// Options of the `serials` column family. Its compaction filter drops
/// index entries whose bucket is below the purge cutoff: their records were
/// range-deleted from `issuance`, and `Store::live_bucket` already ignores
/// them, so dropping them changes no result. RocksDB runs the filter only
/// when a compaction reads the file. With a compaction filter set, leveled
/// compaction also rewrites files older than 30 days by default
/// (`periodic_compaction_seconds` in RocksDB 11.8, which librocksdb-sys 0.19
/// builds).
fn serials_options(purge_cutoff: Arc<AtomicU64>) -> Options {
    let mut options = column_family_options();
    options.set_compaction_filter("sigil_purged_serials", move |_level: u32, _key: &[u8], value: &[u8]| {
        let Ok(bytes) = <[u8; 8]>::try_from(value) else {
            return Decision::Keep;
        };
        if u64::from_be_bytes(bytes) < purge_cutoff.load(Ordering::Acquire) { Decision::Remove } else { Decision::Keep }
    });
    options
}

fn load_state(db: &DB, path: &Path, mode: OpenMode) -> Result<LedgerState, LedgerError> {
    let meta = column_family(db, CF_META);
    let read_u64 = |key: &[u8]| -> Result<Option<u64>, LedgerError> {
        let name = String::from_utf8_lossy(key);
        let value = db
            .get_pinned_cf(meta, key)
            .map_err(|cause| LedgerError::storage(format!("read ledger meta key {name}"), cause))?;
        value.map(|bytes| keys::decode_u64(&format!("meta key {name}"), &bytes)).transpose()
    };

    match read_u64(META_SCHEMA_VERSION)? {
        Some(SCHEMA_VERSION) => {}
        Some(found) => {
            return Err(LedgerError::UnsupportedSchema {
                path: path.display().to_string(),
                found,
                expected: SCHEMA_VERSION,
            });
        }
        None if mode == OpenMode::CreateIfMissing && read_u64(META_APPLIED_INDEX)?.is_none() => {
            initialize(db, path)?;
        }
        None => {
            return Err(LedgerError::Decode {
                item: "meta key schema_version".to_owned(),
                reason: format!("missing in the ledger at {}", path.display()),
            });
        }
    }

    let digest_value = db
        .get_pinned_cf(meta, META_DIGEST)
        .map_err(|cause| LedgerError::storage("read ledger meta key digest", cause))?;
    let digest = match digest_value {
        Some(bytes) => <[u8; 32]>::try_from(bytes.as_ref()).map_err(|_| LedgerError::Decode {
            item: "meta key digest".to_owned(),
            reason: format!("expected 32 bytes, found {}", bytes.len()),
        })?,
        None => [0; 32],
    };

    Ok(LedgerState {
        applied_index: read_u64(META_APPLIED_INDEX)?.unwrap_or(0),
        digest,
        active_ca_version: read_u64(META_ACTIVE_CA_VERSION)?.unwrap_or(0),
        latest_ca_version: read_u64(META_LATEST_CA_VERSION)?.unwrap_or(0),
        purge_cutoff: read_u64(META_PURGE_CUTOFF)?.unwrap_or(0),
        issuance_count: read_u64(META_ISSUANCE_COUNT)?.unwrap_or(0),
        kv_revision: read_u64(META_KV_REVISION)?.unwrap_or(0),
    })
}

/// Writes the meta keys of an empty ledger: index 0 and an all-zero digest.
fn initialize(db: &DB, path: &Path) -> Result<(), LedgerError> {
    let meta = column_family(db, CF_META);
    let mut batch = WriteBatch::default();
    batch.put_cf(meta, META_SCHEMA_VERSION, SCHEMA_VERSION.to_be_bytes());
    batch.put_cf(meta, META_APPLIED_INDEX, 0u64.to_be_bytes());
    batch.put_cf(meta, META_DIGEST, [0u8; 32]);
    let mut options = WriteOptions::default();
    options.set_sync(true);
    db.write_opt(batch, &options)
        .map_err(|cause| LedgerError::storage(format!("initialize ledger at {}", path.display()), cause))
}

pub(crate) fn decode_message<M: Message + Default>(item: &str, bytes: &[u8]) -> Result<M, LedgerError> {
    M::decode(bytes).map_err(|error| LedgerError::Decode { item: item.to_owned(), reason: error.to_string() })
}
