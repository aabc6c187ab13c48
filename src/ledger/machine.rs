//! The state machine behind `Ledger`: the swappable database, the write
//! lock, the committed state and the counters.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

use super::apply::{CommandOutcome, CommandResult, entry_digest};
use super::error::LedgerError;
use super::keys::{CF_META, META_APPLIED_INDEX, META_DIGEST};
use super::snapshot;
use super::store::{Durability, LedgerState, OpenMode, Store};

/// The state owned by the single writer, behind `StateMachine::writes`.
pub(crate) struct WriteSlot {
    /// Index of the entry whose write failed, after which writes stop.
    pub(crate) halted_at: Option<u64>,
}

/// Counters reported by `Ledger::stats`.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) batches_written: AtomicU64,
    pub(crate) records_written: AtomicU64,
    pub(crate) largest_batch: AtomicU64,
    pub(crate) rejected_commands: AtomicU64,
    pub(crate) records_already_recorded: AtomicU64,
}

/// An applied entry: its index, the digest after it and one result per
/// command.
pub(crate) struct AppliedEntry {
    pub(crate) index: u64,
    pub(crate) digest: [u8; 32],
    pub(crate) results: Vec<CommandOutcome>,
}

pub(crate) struct StateMachine {
    pub(crate) path: PathBuf,
    /// The open database. A restore holds the write lock while it closes the
    /// database and opens the restored one, so readers wait for it instead
    /// of reading a closed database. `None` only after a failed restore that
    /// could not reopen the previous database either.
    store: RwLock<Option<Store>>,
    /// Held for each write, checkpoint and restore, so they run one at a
    /// time. Always taken before `store`.
    writes: Mutex<WriteSlot>,
    /// Copy of the state after the last successful write, for readers.
    committed: Mutex<LedgerState>,
    pub(crate) counters: Counters,
    /// The index of the last entry that changed the trust bundle's material, or of a restore.
    bundle_changes: tokio::sync::watch::Sender<u64>,
}

impl StateMachine {
    pub(crate) fn open(path: &Path) -> Result<StateMachine, LedgerError> {
        snapshot::recover_interrupted_restore(path)?;
        let (store, state) = Store::open(path, OpenMode::CreateIfMissing)?;
        Ok(StateMachine {
            path: path.to_owned(),
            store: RwLock::new(Some(store)),
            writes: Mutex::new(WriteSlot { halted_at: None }),
            bundle_changes: tokio::sync::watch::Sender::new(state.applied_index),
            committed: Mutex::new(state),
            counters: Counters::default(),
        })
    }

    pub(crate) fn committed_state(&self) -> LedgerState {
        // The guarded value is replaced whole by a plain assignment, so a
        // poisoned lock still holds a consistent state.
        *self.committed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set_committed_state(&self, state: LedgerState) {
        *self.committed.lock().unwrap_or_else(PoisonError::into_inner) = state;
    }

    pub(crate) fn watch_bundle(&self) -> tokio::sync::watch::Receiver<u64> {
        self.bundle_changes.subscribe()
    }

    /// Wakes the bundle watchers, as after a restore replaced the whole state.
    pub(crate) fn bundle_changed(&self, index: u64) {
        self.bundle_changes.send_replace(index);
    }

    /// Runs `read` on the open database. It waits while a restore runs.
    pub(crate) fn with_store<T>(&self, read: impl FnOnce(&Store) -> Result<T, LedgerError>) -> Result<T, LedgerError> {
        // A restore that panicked leaves either an open database or `None`,
        // and both are handled below, so poisoning is ignored.
        let guard = self.store.read().unwrap_or_else(PoisonError::into_inner);
        let store = guard.as_ref().ok_or_else(|| LedgerError::NotOpen { path: self.path.display().to_string() })?;
        read(store)
    }

    /// Locks the database for a restore, after every reader has finished.
    pub(crate) fn lock_store_exclusive(&self) -> std::sync::RwLockWriteGuard<'_, Option<Store>> {
        self.store.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the write lock, or fails when an earlier write failed.
    pub(crate) fn lock_writes(&self) -> Result<MutexGuard<'_, WriteSlot>, LedgerError> {
        let slot = match self.writes.lock() {
            Ok(slot) => slot,
            Err(_) => return Err(LedgerError::Halted { index: self.committed_state().applied_index + 1 }),
        };
        match slot.halted_at {
            Some(index) => Err(LedgerError::Halted { index }),
            None => Ok(slot),
        }
    }

    /// Takes the write lock even after a failed write, because a restore
    /// replaces the database whose write failed.
    pub(crate) fn lock_writes_for_restore(&self) -> MutexGuard<'_, WriteSlot> {
        self.writes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `commands` as the entry at `index`, which must be above the
    /// applied index, without waiting for the WAL sync.
    pub(crate) fn apply_entry(&self, index: u64, commands: &[&[u8]]) -> Result<AppliedEntry, LedgerError> {
        let mut writes = self.lock_writes()?;
        let applied_index = self.committed_state().applied_index;
        if index <= applied_index {
            return Err(LedgerError::IndexNotAboveApplied { index, applied_index });
        }
        self.apply_locked(&mut writes, index, commands, Durability::Buffered)
    }

    /// Applies `commands` as the entry right after the applied index.
    pub(crate) fn apply_next(&self, commands: &[&[u8]], durability: Durability) -> Result<AppliedEntry, LedgerError> {
        let mut writes = self.lock_writes()?;
        let index = self.committed_state().applied_index + 1;
        self.apply_locked(&mut writes, index, commands, durability)
    }

    /// Stages the entry and writes it in one batch with the new applied
    /// index and digest. A failed write halts later writes, because the
    /// database may no longer match the committed state.
    fn apply_locked(
        &self,
        writes: &mut WriteSlot,
        index: u64,
        commands: &[&[u8]],
        durability: Durability,
    ) -> Result<AppliedEntry, LedgerError> {
        let prior = self.committed_state();
        let digest = entry_digest(&prior.digest, index, commands)?;

        let results = self.with_store(|store| {
            let staged = store.stage_entry(index, commands, &prior)?;
            let next = LedgerState { applied_index: index, digest, ..staged.next };
            let mut batch = staged.batch;
            let meta = store.cf(CF_META);
            batch.put_cf(meta, META_APPLIED_INDEX, index.to_be_bytes());
            batch.put_cf(meta, META_DIGEST, digest);

            if let Err(cause) = store.write(batch, durability) {
                writes.halted_at = Some(index);
                tracing::error!(index, error = %cause, "ledger write failed, halting writes until reopen");
                return Err(LedgerError::storage(format!("write entry at index {index}"), cause));
            }
            self.set_committed_state(next);
            store.purge_cutoff.store(next.purge_cutoff, Ordering::Release);
            if staged.bundle_touched {
                self.bundle_changed(index);
            }
            Ok(staged.results)
        })?;

        self.count_results(index, &results);
        Ok(AppliedEntry { index, digest, results })
    }

    /// Makes every applied entry durable by syncing the WAL.
    pub(crate) fn sync(&self) -> Result<(), LedgerError> {
        self.with_store(Store::sync_wal)
    }

    fn count_results(&self, index: u64, results: &[CommandOutcome]) {
        let mut written = 0u64;
        let mut already_recorded = 0u64;
        for (position, outcome) in results.iter().enumerate() {
            match outcome {
                Ok(CommandResult::IssuancesRecorded { count, already_recorded: skipped }) => {
                    written += count;
                    already_recorded += skipped;
                }
                Ok(_) => {}
                // A failed compare-and-set is the normal outcome of a race that the proposer
                // resolves, such as a replayed ACME nonce, so it is not worth a warning.
                Err(error @ LedgerError::KvConflict { .. }) => {
                    self.counters.rejected_commands.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(index, position, %error, "key-value condition failed");
                }
                Err(error) => {
                    self.counters.rejected_commands.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(index, position, %error, "rejected ledger command");
                }
            }
        }

        let counters = &self.counters;
        counters.records_already_recorded.fetch_add(already_recorded, Ordering::Relaxed);
        if written > 0 {
            counters.batches_written.fetch_add(1, Ordering::Relaxed);
            counters.records_written.fetch_add(written, Ordering::Relaxed);
            counters.largest_batch.fetch_max(written, Ordering::Relaxed);
        }
    }
}
