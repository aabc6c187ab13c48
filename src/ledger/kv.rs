//! Staging the `KvTransaction` commands of one entry, and dropping expired
//! key-value entries in a purge.
//!
//! Transactions apply in entry order, each seeing the writes of those
//! accepted before it. A write batch does not see its own writes, so the
//! entry's writes are kept in an overlay until the batch is built.

use std::collections::HashMap;

use prost::Message;
use rocksdb::ReadOptions;

use super::apply::{CommandResult, EntryStage};
use super::command::{KvTransaction, KvValue, printable_key};
use super::error::LedgerError;
use super::keys::{self, CF_KV, CF_KV_EXPIRY, CF_META, META_KV_REVISION};

/// The entry's key-value writes so far: `None` for a deleted key.
type Overlay = HashMap<Vec<u8>, Option<KvValue>>;

impl EntryStage<'_> {
    pub(super) fn stage_kv(&mut self, transactions: Vec<(usize, KvTransaction)>) -> Result<(), LedgerError> {
        if transactions.is_empty() {
            return Ok(());
        }
        let mut overlay = Overlay::new();
        for (position, transaction) in transactions {
            let outcome = match self.check_transaction(&transaction, &overlay)? {
                Ok(()) => Ok(self.stage_transaction(transaction, &mut overlay)?),
                Err(error) => Err(error),
            };
            self.results[position] = Some(outcome);
        }
        self.batch.put_cf(self.store.cf(CF_META), META_KV_REVISION, self.state.kv_revision.to_be_bytes());
        Ok(())
    }

    /// The outer error is a failed read, the inner one rejects the
    /// transaction.
    fn check_transaction(
        &self,
        transaction: &KvTransaction,
        overlay: &Overlay,
    ) -> Result<Result<(), LedgerError>, LedgerError> {
        if let Err(error) = transaction.validate() {
            return Ok(Err(error));
        }
        for condition in &transaction.conditions {
            let found = self.current(&condition.key, overlay)?.map_or(0, |value| value.revision);
            if found != condition.revision {
                return Ok(Err(LedgerError::KvConflict {
                    key: printable_key(&condition.key),
                    expected: condition.revision,
                    found,
                }));
            }
        }
        Ok(Ok(()))
    }

    fn stage_transaction(
        &mut self,
        transaction: KvTransaction,
        overlay: &mut Overlay,
    ) -> Result<CommandResult, LedgerError> {
        let revision = self.state.kv_revision + 1;
        for write in transaction.writes {
            self.bundle_touched |= write.key.starts_with(keys::BUNDLE_KV_PREFIX);
            let previous = self.current(&write.key, overlay)?;
            if let Some(previous) = &previous
                && previous.expires_unix > 0
            {
                self.batch
                    .delete_cf(self.store.cf(CF_KV_EXPIRY), keys::kv_expiry_key(previous.expires_unix, &write.key));
            }
            if write.delete {
                self.batch.delete_cf(self.store.cf(CF_KV), &write.key);
                overlay.insert(write.key, None);
                continue;
            }
            let stored = KvValue { value: write.value, revision, expires_unix: write.expires_unix };
            if stored.expires_unix > 0 {
                self.batch.put_cf(
                    self.store.cf(CF_KV_EXPIRY),
                    keys::kv_expiry_key(stored.expires_unix, &write.key),
                    [],
                );
            }
            self.batch.put_cf(self.store.cf(CF_KV), &write.key, stored.encode_to_vec());
            overlay.insert(write.key, Some(stored));
        }
        self.state.kv_revision = revision;
        Ok(CommandResult::KvCommitted { revision })
    }

    fn current(&self, key: &[u8], overlay: &Overlay) -> Result<Option<KvValue>, LedgerError> {
        match overlay.get(key) {
            Some(staged) => Ok(staged.clone()),
            None => self.store.kv_get(key),
        }
    }

    /// Deletes the key-value entries whose expiry bucket lies before
    /// `cutoff`, and their expiry index entries. Returns how many were
    /// deleted. The expiry index holds only current expiries, because a
    /// write removes the index entry of the value it replaces.
    pub(super) fn stage_kv_purge(&mut self, cutoff: u64) -> Result<u64, LedgerError> {
        let expiry = self.store.cf(CF_KV_EXPIRY);
        let upper = cutoff.to_be_bytes();
        let mut options = ReadOptions::default();
        options.set_iterate_upper_bound(upper.to_vec());
        let mut removed = 0u64;
        for entry in self.store.db.iterator_cf_opt(expiry, options, rocksdb::IteratorMode::Start) {
            let (index_key, _) = entry.map_err(|cause| LedgerError::storage("read key-value expiry index", cause))?;
            let key = &index_key[8..];
            self.bundle_touched |= key.starts_with(keys::BUNDLE_KV_PREFIX);
            self.batch.delete_cf(self.store.cf(CF_KV), key);
            removed += 1;
        }
        self.batch.delete_range_cf(expiry, &[][..], &upper[..]);
        Ok(removed)
    }
}
