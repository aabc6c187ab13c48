//! The deterministic state machine: applies one encoded command.
//!
//! Applying reads only the stored state and the command bytes, never the
//! clock or a random source, so replicas that apply the same commands in
//! the same order reach the same state and digest.

use std::collections::{BTreeMap, HashSet};
use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use prost::Message;
use ring::digest;
use rocksdb::{ReadOptions, WriteBatch};

use super::command::{CaVersion, Command, CommandKind, InstallCa, PurgeExpired, RecordIssuances};
use super::error::LedgerError;
use super::keys::{
    self, CF_CA, CF_ISSUANCE, CF_META, CF_SERIALS, META_ACTIVE_CA_VERSION, META_APPLIED_INDEX, META_DIGEST,
    META_ISSUANCE_COUNT, META_LATEST_CA_VERSION, META_PURGE_CUTOFF,
};
use super::store::{LedgerState, Store};

/// The effect of a command that was applied and not rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommandResult {
    CaInstalled {
        version: u64,
    },
    IssuancesRecorded {
        count: u64,
    },
    ExpiredPurged {
        /// Start (Unix seconds) of the oldest expiry bucket kept.
        cutoff_unix: u64,
        records_removed: u64,
    },
}

/// A command that was applied: its index, the digest after it, and its
/// result or the reason it was rejected.
pub(crate) struct Applied {
    pub(crate) index: u64,
    pub(crate) digest: [u8; 32],
    pub(crate) outcome: Result<CommandResult, Rejection>,
}

/// The reasons a command was rejected, one entry per offending record.
#[derive(Debug)]
pub(crate) struct Rejection {
    pub(crate) offenders: Vec<Offender>,
}

#[derive(Debug)]
pub(crate) struct Offender {
    /// Position of the offending record in `RecordIssuances::records`, or
    /// `None` when the command as a whole is invalid.
    pub(crate) position: Option<usize>,
    pub(crate) error: LedgerError,
}

impl Rejection {
    fn command(error: LedgerError) -> Self {
        Rejection { offenders: vec![Offender { position: None, error }] }
    }

    /// Returns the error of the first offender, which names the bad value.
    pub(crate) fn into_error(self) -> LedgerError {
        self.offenders.into_iter().next().map(|offender| offender.error).unwrap_or(LedgerError::InvalidCommand {
            command: "ledger",
            reason: "rejected without a reason".to_owned(),
        })
    }
}

/// The writes of a command that was accepted, not yet committed.
struct Staged {
    batch: WriteBatch,
    next: LedgerState,
    result: CommandResult,
}

/// Computes SHA-256(previous digest || index as big-endian u64 || command bytes).
pub(crate) fn chain_digest(previous: &[u8; 32], index: u64, command: &[u8]) -> [u8; 32] {
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(previous);
    context.update(&index.to_be_bytes());
    context.update(command);
    let mut output = [0u8; 32];
    output.copy_from_slice(context.finish().as_ref());
    output
}

impl Store {
    /// Applies `bytes` as the next command in one synced write batch with
    /// the new applied index and digest. A rejected command writes only
    /// those two. Returns `Err` only for internal failures.
    pub(crate) fn apply_encoded(&self, bytes: &[u8]) -> Result<Applied, LedgerError> {
        let mut slot = match self.writer.lock() {
            Ok(slot) => slot,
            Err(poisoned) => {
                let index = poisoned.into_inner().state.applied_index + 1;
                return Err(LedgerError::Halted { index });
            }
        };
        if let Some(index) = slot.halted_at {
            return Err(LedgerError::Halted { index });
        }

        let prior = slot.state;
        let index = prior.applied_index + 1;
        let digest = chain_digest(&prior.digest, index, bytes);

        let (mut batch, mut next, outcome) = match self.stage(bytes, index, &prior)? {
            Ok(staged) => (staged.batch, staged.next, Ok(staged.result)),
            Err(rejection) => (WriteBatch::default(), prior, Err(rejection)),
        };
        next.applied_index = index;
        next.digest = digest;
        let meta = self.cf(CF_META);
        batch.put_cf(meta, META_APPLIED_INDEX, index.to_be_bytes());
        batch.put_cf(meta, META_DIGEST, digest);

        if let Err(cause) = self.sync_write(batch) {
            slot.halted_at = Some(index);
            tracing::error!(index, error = %cause, "ledger write failed, halting writes until reopen");
            return Err(LedgerError::storage(format!("write command at index {index}"), cause));
        }

        slot.state = next;
        *self.committed.lock().unwrap_or_else(PoisonError::into_inner) = next;
        self.purge_cutoff.store(next.purge_cutoff, Ordering::Release);
        drop(slot);

        match &outcome {
            Ok(CommandResult::IssuancesRecorded { count }) => {
                let counters = &self.counters;
                counters.batches_written.fetch_add(1, Ordering::Relaxed);
                counters.records_written.fetch_add(*count, Ordering::Relaxed);
                counters.largest_batch.fetch_max(*count, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(rejection) => {
                self.counters.rejected_commands.fetch_add(1, Ordering::Relaxed);
                let reason = rejection.offenders.first().map(|offender| offender.error.to_string()).unwrap_or_default();
                tracing::warn!(index, reason, offending_records = rejection.offenders.len(), "rejected ledger command");
            }
        }

        Ok(Applied { index, digest, outcome })
    }

    fn stage(&self, bytes: &[u8], index: u64, prior: &LedgerState) -> Result<Result<Staged, Rejection>, LedgerError> {
        let command = match Command::decode(bytes) {
            Ok(command) => command,
            Err(error) => {
                return Ok(Err(Rejection::command(LedgerError::InvalidCommand {
                    command: "ledger",
                    reason: format!("decode protobuf: {error}"),
                })));
            }
        };
        match command.kind {
            None => Ok(Err(Rejection::command(LedgerError::InvalidCommand {
                command: "ledger",
                reason: "command kind is missing or unknown to this version".to_owned(),
            }))),
            Some(CommandKind::InstallCa(install)) => Ok(self.stage_install_ca(install, index, prior)),
            Some(CommandKind::RecordIssuances(record)) => self.stage_record_issuances(record, prior),
            Some(CommandKind::PurgeExpired(purge)) => self.stage_purge_expired(purge, prior),
        }
    }

    fn stage_install_ca(&self, install: InstallCa, index: u64, prior: &LedgerState) -> Result<Staged, Rejection> {
        install.validate().map_err(Rejection::command)?;

        let version = prior.latest_ca_version + 1;
        let stored = CaVersion {
            version,
            key_label: install.key_label,
            intermediates_der: install.intermediates_der,
            roots_der: install.roots_der,
            installed_at_unix: install.installed_at_unix,
            installed_at_index: index,
        };
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_CA), keys::ca_version_key(version), stored.encode_to_vec());
        let meta = self.cf(CF_META);
        batch.put_cf(meta, META_LATEST_CA_VERSION, version.to_be_bytes());
        batch.put_cf(meta, META_ACTIVE_CA_VERSION, version.to_be_bytes());

        let next = LedgerState { latest_ca_version: version, active_ca_version: version, ..*prior };
        Ok(Staged { batch, next, result: CommandResult::CaInstalled { version } })
    }

    /// Stages all records, or rejects the command naming every record that
    /// is invalid, already recorded, or repeats an earlier serial of the
    /// batch. The first occurrence of a repeated serial is not an offender.
    fn stage_record_issuances(
        &self,
        command: RecordIssuances,
        prior: &LedgerState,
    ) -> Result<Result<Staged, Rejection>, LedgerError> {
        if command.records.is_empty() {
            return Ok(Err(Rejection::command(LedgerError::InvalidCommand {
                command: "record_issuances",
                reason: "the command contains no records".to_owned(),
            })));
        }

        let mut offenders = Vec::new();
        let mut seen = HashSet::with_capacity(command.records.len());
        for (position, record) in command.records.iter().enumerate() {
            let error = if let Err(error) = record.validate() {
                Some(error)
            } else if keys::expiry_bucket(record.not_after_unix) < prior.purge_cutoff {
                Some(LedgerError::InvalidRecord {
                    field: "not_after_unix",
                    reason: format!(
                        "{} of serial {} is before the purge cutoff {}",
                        record.not_after_unix,
                        hex::encode(&record.serial),
                        prior.purge_cutoff
                    ),
                })
            } else if !seen.insert(record.serial.as_slice())
                || self.live_bucket(&record.serial, prior.purge_cutoff)?.is_some()
            {
                Some(LedgerError::DuplicateSerial { serial_hex: hex::encode(&record.serial) })
            } else {
                None
            };
            if let Some(error) = error {
                offenders.push(Offender { position: Some(position), error });
            }
        }
        if !offenders.is_empty() {
            return Ok(Err(Rejection { offenders }));
        }

        let mut batch = WriteBatch::default();
        let mut bucket_counts: BTreeMap<u64, u64> = BTreeMap::new();
        for record in &command.records {
            let bucket = keys::expiry_bucket(record.not_after_unix);
            batch.put_cf(self.cf(CF_SERIALS), &record.serial, bucket.to_be_bytes());
            batch.put_cf(self.cf(CF_ISSUANCE), keys::issuance_key(bucket, &record.serial), record.encode_to_vec());
            *bucket_counts.entry(bucket).or_default() += 1;
        }

        let meta = self.cf(CF_META);
        for (bucket, added) in bucket_counts {
            let key = keys::bucket_count_key(bucket);
            let stored = self
                .db
                .get_pinned_cf(meta, &key)
                .map_err(|cause| LedgerError::storage(format!("read record count of bucket {bucket}"), cause))?;
            let count = match stored {
                Some(bytes) => keys::decode_u64("bucket record count", &bytes)?,
                None => 0,
            };
            batch.put_cf(meta, key, (count + added).to_be_bytes());
        }

        let count = command.records.len() as u64;
        let issuance_count = prior.issuance_count + count;
        batch.put_cf(meta, META_ISSUANCE_COUNT, issuance_count.to_be_bytes());

        Ok(Ok(Staged {
            batch,
            next: LedgerState { issuance_count, ..*prior },
            result: CommandResult::IssuancesRecorded { count },
        }))
    }

    /// Range-deletes every expiry bucket that ends at or before
    /// `expired_before_unix`. The serial index is left to the compaction
    /// filter, and the per-bucket counters give the number removed.
    fn stage_purge_expired(
        &self,
        purge: PurgeExpired,
        prior: &LedgerState,
    ) -> Result<Result<Staged, Rejection>, LedgerError> {
        let cutoff = keys::expiry_bucket(purge.expired_before_unix);
        if cutoff <= prior.purge_cutoff {
            return Ok(Ok(Staged {
                batch: WriteBatch::default(),
                next: *prior,
                result: CommandResult::ExpiredPurged { cutoff_unix: prior.purge_cutoff, records_removed: 0 },
            }));
        }

        let meta = self.cf(CF_META);
        let counters_start = keys::bucket_count_key(0);
        let counters_end = keys::bucket_count_key(cutoff);
        let mut options = ReadOptions::default();
        options.set_iterate_lower_bound(counters_start.clone());
        options.set_iterate_upper_bound(counters_end.clone());
        let mut records_removed = 0u64;
        for entry in self.db.iterator_cf_opt(meta, options, rocksdb::IteratorMode::Start) {
            let (_, value) = entry.map_err(|cause| LedgerError::storage("read bucket record counts", cause))?;
            records_removed += keys::decode_u64("bucket record count", &value)?;
        }

        let mut batch = WriteBatch::default();
        let cutoff_key = cutoff.to_be_bytes();
        batch.delete_range_cf(self.cf(CF_ISSUANCE), &[][..], &cutoff_key[..]);
        batch.delete_range_cf(meta, counters_start, counters_end);
        let issuance_count = prior.issuance_count.saturating_sub(records_removed);
        batch.put_cf(meta, META_ISSUANCE_COUNT, issuance_count.to_be_bytes());
        batch.put_cf(meta, META_PURGE_CUTOFF, cutoff.to_be_bytes());

        Ok(Ok(Staged {
            batch,
            next: LedgerState { purge_cutoff: cutoff, issuance_count, ..*prior },
            result: CommandResult::ExpiredPurged { cutoff_unix: cutoff, records_removed },
        }))
    }
}
