//! The single-node ledger: a deterministic state machine over RocksDB.
//!
//! Every change is a [`Command`], encoded with protobuf and applied in one
//! synced RocksDB write batch together with the new `applied_index` and
//! `ledger_digest`. The digest after command `i` is
//! SHA-256(digest before || `i` as big-endian u64 || command bytes), starting
//! from 32 zero bytes, so two ledgers that applied the same commands have
//! equal digests. A rejected command still consumes its index.
//!
//! Column families:
//! - `meta`: schema version, applied index, digest, CA version pointers,
//!   purge cutoff, record count and one record counter per expiry bucket.
//! - `ca`: [`CaVersion`] by version number (big-endian u64).
//! - `issuance`: [`IssuanceRecord`] keyed by expiry bucket (notAfter rounded
//!   down to the hour, big-endian u64) then serial, so purges delete ranges.
//! - `serials`: serial to expiry bucket, for duplicate detection. Entries
//!   of purged buckets are dropped by a compaction filter.

mod apply;
mod command;
mod error;
mod keys;
mod store;
mod writer;

#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use prost::Message;
use tokio::sync::{mpsc, oneshot};

pub use apply::CommandResult;
pub use command::{
    CaVersion, Command, CommandKind, InstallCa, IssuanceRecord, MAX_SERIAL_LEN, PurgeExpired, RecordIssuances,
};
pub use error::LedgerError;
pub use writer::MAX_BATCH_RECORDS;

use store::Store;
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
    /// `RecordIssuances` commands written, from the group-commit writer or `apply`.
    pub batches_written: u64,
    pub records_written: u64,
    /// Maximum number of records written by one `RecordIssuances` command.
    pub largest_batch: u64,
    pub rejected_commands: u64,
    /// Batches the writer applied again after removing rejected records.
    pub batch_retries: u64,
}

/// The ledger. Share it with `Arc`. Dropping it stops the writer thread
/// after the queued records are written, then closes the database.
pub struct Ledger {
    store: Arc<Store>,
    queue: Option<mpsc::Sender<Pending>>,
    writer: Option<JoinHandle<()>>,
}

impl Ledger {
    /// Opens or creates the ledger at `path` and starts its writer thread.
    pub fn open(path: impl AsRef<Path>) -> Result<Ledger, LedgerError> {
        let path = path.as_ref();
        let store = Arc::new(Store::open(path)?);
        let (queue, receiver) = mpsc::channel(writer::QUEUE_CAPACITY);
        let writer = writer::spawn(Arc::clone(&store), receiver)
            .map_err(|error| LedgerError::StartWriter { reason: error.to_string() })?;

        let state = store.committed_state();
        tracing::info!(
            path = %path.display(),
            applied_index = state.applied_index,
            issuance_count = state.issuance_count,
            digest = %hex::encode(state.digest),
            "opened ledger"
        );
        Ok(Ledger { store, queue: Some(queue), writer: Some(writer) })
    }

    /// Writes the queued records, stops the writer thread and closes the
    /// database. Dropping the ledger does the same.
    pub fn close(self) {
        drop(self);
    }

    /// Applies `command` as the next ledger entry and waits for the synced
    /// write. It blocks, so async code calls it through `spawn_blocking`.
    /// A rejected command returns its error (see
    /// [`LedgerError::is_rejection`]) but still consumed an index.
    pub fn apply(&self, command: &Command) -> Result<ApplyOutcome, LedgerError> {
        self.apply_encoded(&command.encode_to_vec())
    }

    /// Applies an encoded [`Command`], as a replica applies a log entry.
    /// Bytes that do not decode are rejected and consume an index.
    pub fn apply_encoded(&self, command: &[u8]) -> Result<ApplyOutcome, LedgerError> {
        let applied = self.store.apply_encoded(command)?;
        match applied.outcome {
            Ok(result) => Ok(ApplyOutcome { index: applied.index, digest: applied.digest, result }),
            Err(rejection) => Err(rejection.into_error()),
        }
    }

    /// Queues `record` for the group-commit writer and resolves once it is
    /// synced to disk, or with the error that rejected it. An invalid record
    /// fails before it is queued. Dropping the future does not cancel the
    /// write of a record that was already queued.
    pub async fn record(&self, record: IssuanceRecord) -> Result<(), LedgerError> {
        record.validate()?;
        let queue = self.queue.as_ref().ok_or(LedgerError::Closed)?;
        let (done, result) = oneshot::channel();
        queue.send(Pending { record, done }).await.map_err(|_| LedgerError::Closed)?;
        result.await.map_err(|_| LedgerError::Closed)?
    }

    pub fn active_ca(&self) -> Result<Option<CaVersion>, LedgerError> {
        match self.store.committed_state().active_ca_version {
            0 => Ok(None),
            version => self.store.ca_version(version),
        }
    }

    /// Returns every installed CA version, oldest first.
    pub fn ca_versions(&self) -> Result<Vec<CaVersion>, LedgerError> {
        self.store.ca_versions()
    }

    /// Returns the record of `serial`, or `None` if it was never recorded
    /// or has been purged.
    pub fn issuance(&self, serial: &[u8]) -> Result<Option<IssuanceRecord>, LedgerError> {
        self.store.issuance(serial)
    }

    /// Returns the exact number of stored issuance records.
    pub fn issuance_count(&self) -> u64 {
        self.store.committed_state().issuance_count
    }

    pub fn applied_index(&self) -> u64 {
        self.store.committed_state().applied_index
    }

    pub fn digest(&self) -> [u8; 32] {
        self.store.committed_state().digest
    }

    pub fn stats(&self) -> LedgerStats {
        let state = self.store.committed_state();
        let counters = &self.store.counters;
        LedgerStats {
            applied_index: state.applied_index,
            issuance_count: state.issuance_count,
            active_ca_version: (state.active_ca_version != 0).then_some(state.active_ca_version),
            purge_cutoff_unix: state.purge_cutoff,
            batches_written: counters.batches_written.load(Ordering::Relaxed),
            records_written: counters.records_written.load(Ordering::Relaxed),
            largest_batch: counters.largest_batch.load(Ordering::Relaxed),
            rejected_commands: counters.rejected_commands.load(Ordering::Relaxed),
            batch_retries: counters.batch_retries.load(Ordering::Relaxed),
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
            tracing::error!(path = %self.store.path.display(), "ledger writer thread panicked");
        }
        let state = self.store.committed_state();
        tracing::info!(
            path = %self.store.path.display(),
            applied_index = state.applied_index,
            "closed ledger"
        );
    }
}
