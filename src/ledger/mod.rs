//! The ledger: a deterministic state machine over RocksDB, ready to be the
//! state machine of a Raft log.
//!
//! Every change is a [`Command`], encoded with protobuf. Commands arrive in
//! entries: [`Ledger::apply_entry`] applies all commands of the Raft entry
//! at a given log index in one RocksDB write batch together with the new
//! applied index and digest, and returns one result per command. Indexes
//! must increase but may skip, and an entry without commands only advances
//! the applied index. Applying reads only the stored state and the command
//! bytes, never the clock or a random source.
//!
//! The digest starts as 32 zero bytes. An entry with commands sets it to
//! SHA-256(digest before || index as big-endian u64 || for each command, its
//! length as big-endian u32 then its bytes), and an entry without commands
//! leaves it unchanged, so two ledgers that applied the same entries at the
//! same indexes have equal digests.
//!
//! Within one entry, the `InstallCa` commands apply first in their order,
//! then every `PurgeExpired` command as one purge at the largest
//! `expired_before_unix`, then the records of every `RecordIssuances`
//! command, then the `KvTransaction` commands in order, because a write
//! batch does not see its own writes. A command
//! that is rejected (invalid, undecodable, a duplicate serial, a record that
//! expires before the purge cutoff) fails alone and still counts as applied.
//!
//! Proposals may be retried after a leader change, so applying a command
//! twice must change nothing the second time. A record whose serial is
//! stored with identical content is counted as already recorded. An
//! `InstallCa` with the active version's chain and key label returns that
//! version. A different record with a stored serial is still rejected.
//!
//! `apply_entry` does not sync the WAL, because Raft replays its own synced
//! log after a power loss, and [`Ledger::sync`] makes every applied entry
//! durable before Raft compacts that log. The single-node calls
//! [`Ledger::apply`], [`Ledger::apply_encoded`] and [`Ledger::record`] apply
//! the next index and sync before they return. [`Ledger::checkpoint`] and
//! [`Ledger::restore`] give Raft its snapshots: a RocksDB checkpoint of the
//! whole state at the applied index, and a swap of the database for one.
//!
//! Column families:
//! - `meta`: schema version, applied index, digest, CA version pointers,
//!   purge cutoff, record count and one record counter per expiry bucket.
//! - `ca`: [`CaVersion`] by version number (big-endian u64).
//! - `issuance`: [`IssuanceRecord`] keyed by expiry bucket (notAfter rounded
//!   down to the hour, big-endian u64) then serial, so purges delete ranges.
//! - `serials`: serial to expiry bucket, for duplicate detection. Entries
//!   of purged buckets are dropped by a compaction filter.
//! - `kv`: [`KvValue`] by key, the state of services above the ledger
//!   (ACME), written by [`KvTransaction`] with compare-and-set conditions.
//! - `kv_expiry`: expiry bucket then key, for the keys that expire; a purge
//!   deletes the entries of purged buckets.

mod apply;
mod command;
mod error;
mod keys;
mod kv;
mod machine;
mod records;
mod snapshot;
mod store;
mod writer;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod entry_tests;

#[cfg(test)]
mod snapshot_tests;

#[cfg(test)]
mod kv_tests;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use prost::Message;
use tokio::sync::{mpsc, oneshot};

pub use apply::CommandResult;
pub use command::{
    CaVersion, Command, CommandKind, InstallCa, IssuanceRecord, KvCondition, KvTransaction, KvValue, KvWrite,
    MAX_KV_KEY_LEN, MAX_KV_OPERATIONS, MAX_KV_VALUE_LEN, MAX_SERIAL_LEN, PurgeExpired, RecordIssuances, printable_key,
};
pub use error::LedgerError;
pub use keys::BUNDLE_KV_PREFIX;
pub use writer::MAX_BATCH_RECORDS;

use machine::{AppliedEntry, StateMachine};
use store::Durability;
use writer::Pending;

/// The result of a command that was applied and not rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// Ledger index of the command.
    pub index: u64,
    /// Ledger digest after the command.
    pub digest: [u8; 32],
    pub result: CommandResult,
}

/// Counters and state for metrics. The counters start at zero at each open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerStats {
    pub applied_index: u64,
    /// Exact number of stored issuance records.
    pub issuance_count: u64,
    pub active_ca_version: Option<u64>,
    /// Start (Unix seconds) of the oldest expiry bucket not yet purged.
    pub purge_cutoff_unix: u64,
    /// Entries that wrote issuance records.
    pub batches_written: u64,
    pub records_written: u64,
    /// Maximum number of records written by one entry.
    pub largest_batch: u64,
    pub rejected_commands: u64,
    /// Records not written again because an identical record was stored,
    /// as happens when a proposal is retried.
    pub records_already_recorded: u64,
}

/// The ledger. Share it with `Arc`, because every method takes `&self`.
/// Dropping it stops the writer thread after the queued records are
/// written, then closes the database.
pub struct Ledger {
    machine: Arc<StateMachine>,
    queue: Option<mpsc::Sender<Pending>>,
    writer: Option<JoinHandle<()>>,
}

impl Ledger {
    /// Opens or creates the ledger at `path` and starts its writer thread.
    /// If a restore was interrupted after it moved the ledger folder aside,
    /// the folder is moved back first.
    pub fn open(path: impl AsRef<Path>) -> Result<Ledger, LedgerError> {
        let path = path.as_ref();
        let machine = Arc::new(StateMachine::open(path)?);
        let (queue, receiver) = mpsc::channel(writer::QUEUE_CAPACITY);
        let writer = writer::spawn(Arc::clone(&machine), receiver)
            .map_err(|error| LedgerError::StartWriter { reason: error.to_string() })?;

        let state = machine.committed_state();
        tracing::info!(
            path = %path.display(),
            applied_index = state.applied_index,
            issuance_count = state.issuance_count,
            digest = %hex::encode(state.digest),
            "opened ledger"
        );
        Ok(Ledger { machine, queue: Some(queue), writer: Some(writer) })
    }

    /// Writes the queued records, stops the writer thread and closes the
    /// database. Dropping the ledger does the same.
    pub fn close(self) {
        drop(self);
    }

    /// Applies the commands of the committed Raft entry at log `index` in
    /// one write batch, and returns one result per command, in order. It
    /// does not wait for the WAL sync (see [`Ledger::sync`]) and blocks, so
    /// async code calls it through `spawn_blocking`.
    ///
    /// The outer error means nothing was applied: `IndexNotAboveApplied`
    /// when `index` is not above [`Ledger::applied_index`],
    /// `CommandTooLarge`, or a storage failure, after which every write
    /// fails with `Halted` until the ledger is reopened or restored.
    pub fn apply_entry(
        &self,
        index: u64,
        commands: &[&[u8]],
    ) -> Result<Vec<Result<CommandResult, LedgerError>>, LedgerError> {
        Ok(self.machine.apply_entry(index, commands)?.results)
    }

    /// Makes every applied entry durable by syncing the RocksDB WAL.
    pub fn sync(&self) -> Result<(), LedgerError> {
        self.machine.sync()
    }

    /// Writes a RocksDB checkpoint of the state at the applied index into
    /// `dir`, which must not exist, and returns that index. Its table files
    /// are hard links, so its cost does not grow with the number of records.
    pub fn checkpoint(&self, dir: &Path) -> Result<u64, LedgerError> {
        self.machine.checkpoint(dir)
    }

    /// Replaces the whole state with the checkpoint in `dir`, then
    /// [`Ledger::applied_index`] and [`Ledger::digest`] are the
    /// checkpoint's. Writes and reads of records or CA versions wait until
    /// it finishes, while the index, digest and stats show the previous
    /// state until then. On success `dir` is consumed (moved, or copied and
    /// removed when it is on another filesystem). On failure the previous
    /// state stays and `dir` is left in place.
    pub fn restore(&self, dir: &Path) -> Result<(), LedgerError> {
        self.machine.restore(dir)
    }

    /// Applies `command` as the next ledger entry and waits for the synced
    /// write. It blocks, so async code calls it through `spawn_blocking`.
    /// A rejected command returns its error (see
    /// [`LedgerError::is_rejection`]) but still consumed an index.
    pub fn apply(&self, command: &Command) -> Result<ApplyOutcome, LedgerError> {
        self.apply_encoded(&command.encode_to_vec())
    }

    /// Applies an encoded [`Command`] as the next entry and waits for the
    /// synced write. Bytes that do not decode are rejected and consume an
    /// index.
    pub fn apply_encoded(&self, command: &[u8]) -> Result<ApplyOutcome, LedgerError> {
        let AppliedEntry { index, digest, results } = self.machine.apply_next(&[command], Durability::Synced)?;
        let outcome = results.into_iter().next().expect("an entry of one command has one result");
        Ok(ApplyOutcome { index, digest, result: outcome? })
    }

    /// Queues `record` for the group-commit writer and resolves once it is
    /// synced to disk, or with the error that rejected it. A record that is
    /// already stored with identical content succeeds without a write. An
    /// invalid record fails before it is queued. Dropping the future does
    /// not cancel the write of a record that was already queued.
    pub async fn record(&self, record: IssuanceRecord) -> Result<(), LedgerError> {
        record.validate()?;
        let queue = self.queue.as_ref().ok_or(LedgerError::Closed)?;
        let (done, result) = oneshot::channel();
        queue.send(Pending { record, done }).await.map_err(|_| LedgerError::Closed)?;
        result.await.map_err(|_| LedgerError::Closed)?
    }

    /// Returns a receiver that wakes after each entry that changes the trust bundle's material
    /// (CA versions, or key-value entries under [`BUNDLE_KV_PREFIX`]) and after a restore. Its value
    /// is the index of that entry.
    pub fn watch_bundle(&self) -> tokio::sync::watch::Receiver<u64> {
        self.machine.watch_bundle()
    }

    pub fn active_ca(&self) -> Result<Option<CaVersion>, LedgerError> {
        // Read inside `with_store`, because a restore replaces the database
        // and the committed state together.
        self.machine.with_store(|store| match self.machine.committed_state().active_ca_version {
            0 => Ok(None),
            version => store.ca_version(version),
        })
    }

    /// Returns every installed CA version, oldest first.
    pub fn ca_versions(&self) -> Result<Vec<CaVersion>, LedgerError> {
        self.machine.with_store(|store| store.ca_versions())
    }

    /// Returns the record of `serial`, or `None` if it was never recorded
    /// or has been purged.
    pub fn issuance(&self, serial: &[u8]) -> Result<Option<IssuanceRecord>, LedgerError> {
        self.machine.with_store(|store| store.issuance(serial))
    }

    /// Returns the key-value entry at `key`, as applied on this node.
    pub fn kv_get(&self, key: &[u8]) -> Result<Option<KvValue>, LedgerError> {
        self.machine.with_store(|store| store.kv_get(key))
    }

    /// Returns up to `limit` key-value entries whose keys start with
    /// `prefix` and sort after `after`, in key order, as applied on this node.
    pub fn kv_scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, KvValue)>, LedgerError> {
        self.machine.with_store(|store| store.kv_scan(prefix, after, limit))
    }

    /// Returns the exact number of stored issuance records.
    pub fn issuance_count(&self) -> u64 {
        self.machine.committed_state().issuance_count
    }

    pub fn applied_index(&self) -> u64 {
        self.machine.committed_state().applied_index
    }

    pub fn digest(&self) -> [u8; 32] {
        self.machine.committed_state().digest
    }

    /// Returns the applied index and the digest after it, read together.
    pub fn applied_state(&self) -> (u64, [u8; 32]) {
        let state = self.machine.committed_state();
        (state.applied_index, state.digest)
    }

    pub fn stats(&self) -> LedgerStats {
        let state = self.machine.committed_state();
        let counters = &self.machine.counters;
        LedgerStats {
            applied_index: state.applied_index,
            issuance_count: state.issuance_count,
            active_ca_version: (state.active_ca_version != 0).then_some(state.active_ca_version),
            purge_cutoff_unix: state.purge_cutoff,
            batches_written: counters.batches_written.load(Ordering::Relaxed),
            records_written: counters.records_written.load(Ordering::Relaxed),
            largest_batch: counters.largest_batch.load(Ordering::Relaxed),
            rejected_commands: counters.rejected_commands.load(Ordering::Relaxed),
            records_already_recorded: counters.records_already_recorded.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // Dropping the only sender ends the writer's loop once the queue is empty.
        self.queue = None;
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(path = %self.machine.path.display(), "ledger writer thread panicked");
        }
        let state = self.machine.committed_state();
        tracing::info!(
            path = %self.machine.path.display(),
            applied_index = state.applied_index,
            "closed ledger"
        );
    }
}
