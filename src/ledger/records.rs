//! Staging the `RecordIssuances` commands of one entry.
//!
//! The commands are checked in entry order against the stored state (after
//! the entry's purge) and against the records of the commands accepted
//! before them. A command with an offending record is rejected with that
//! record's error, and its records take no part in checking later commands.
//! The written records are therefore those of the accepted commands, as if
//! each command were applied alone, in order, after the entry's purge.

use std::collections::{BTreeMap, HashMap};

use prost::Message;

use super::apply::{CommandResult, EntryStage};
use super::command::{IssuanceRecord, RecordIssuances};
use super::error::LedgerError;
use super::keys::{self, CF_ISSUANCE, CF_META, CF_SERIALS, META_ISSUANCE_COUNT};

/// Records accepted so far, by serial.
type AcceptedRecords<'c> = HashMap<&'c [u8], &'c IssuanceRecord>;

/// The decision for one record.
enum RecordCheck {
    Write,
    /// The same serial with identical content is stored or already accepted.
    AlreadyRecorded,
    Reject(LedgerError),
}

/// The records of a command that passed every check.
#[derive(Default)]
struct AcceptedCommand<'c> {
    to_write: Vec<&'c IssuanceRecord>,
    already_recorded: u64,
}

impl EntryStage<'_> {
    pub(super) fn stage_records(&mut self, commands: &[(usize, RecordIssuances)]) -> Result<(), LedgerError> {
        let mut accepted = AcceptedRecords::new();
        let mut to_write = Vec::new();
        for (position, command) in commands {
            let outcome = match self.check_command(command, &accepted)? {
                Ok(command) => {
                    accepted.extend(command.to_write.iter().map(|record| (record.serial.as_slice(), *record)));
                    to_write.extend_from_slice(&command.to_write);
                    Ok(CommandResult::IssuancesRecorded {
                        count: command.to_write.len() as u64,
                        already_recorded: command.already_recorded,
                    })
                }
                Err(error) => Err(error),
            };
            self.results[*position] = Some(outcome);
        }
        self.write_records(&to_write)
    }

    /// Checks the records of `command` in order. The outer error is a failed
    /// read. The inner one is the first offending record's, and rejects the
    /// command.
    fn check_command<'c>(
        &self,
        command: &'c RecordIssuances,
        accepted: &AcceptedRecords<'c>,
    ) -> Result<Result<AcceptedCommand<'c>, LedgerError>, LedgerError> {
        if command.records.is_empty() {
            return Ok(Err(LedgerError::InvalidCommand {
                command: "record_issuances",
                reason: "the command contains no records".to_owned(),
            }));
        }

        let mut checked = AcceptedCommand::default();
        let mut own = AcceptedRecords::new();
        for record in &command.records {
            let serial = record.serial.as_slice();
            let earlier = accepted.get(serial).or_else(|| own.get(serial)).copied();
            match self.check_record(record, earlier)? {
                RecordCheck::Write => {
                    own.insert(serial, record);
                    checked.to_write.push(record);
                }
                RecordCheck::AlreadyRecorded => checked.already_recorded += 1,
                RecordCheck::Reject(error) => return Ok(Err(error)),
            }
        }
        Ok(Ok(checked))
    }

    /// Checks one record. `earlier` is the record accepted before it in this
    /// entry with the same serial, if any.
    fn check_record(
        &self,
        record: &IssuanceRecord,
        earlier: Option<&IssuanceRecord>,
    ) -> Result<RecordCheck, LedgerError> {
        if let Err(error) = record.validate() {
            return Ok(RecordCheck::Reject(error));
        }
        let purge_cutoff = self.state.purge_cutoff;
        if keys::expiry_bucket(record.not_after_unix) < purge_cutoff {
            return Ok(RecordCheck::Reject(LedgerError::InvalidRecord {
                field: "not_after_unix",
                reason: format!(
                    "{} of serial {} is before the purge cutoff {purge_cutoff}",
                    record.not_after_unix,
                    hex::encode(&record.serial),
                ),
            }));
        }
        if let Some(earlier) = earlier {
            return Ok(compare_same_serial(record, Some(earlier)));
        }
        let Some(bucket) = self.store.live_bucket(&record.serial, purge_cutoff)? else {
            return Ok(RecordCheck::Write);
        };
        let stored = self.store.issuance_in_bucket(bucket, &record.serial)?;
        Ok(compare_same_serial(record, stored.as_ref()))
    }

    /// Stages `records`, whose serials are distinct and not stored, with
    /// their bucket counters and the new record count.
    fn write_records(&mut self, records: &[&IssuanceRecord]) -> Result<(), LedgerError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut bucket_counts: BTreeMap<u64, u64> = BTreeMap::new();
        for record in records {
            let bucket = keys::expiry_bucket(record.not_after_unix);
            self.batch.put_cf(self.store.cf(CF_SERIALS), &record.serial, bucket.to_be_bytes());
            self.batch.put_cf(
                self.store.cf(CF_ISSUANCE),
                keys::issuance_key(bucket, &record.serial),
                record.encode_to_vec(),
            );
            *bucket_counts.entry(bucket).or_default() += 1;
        }

        let meta = self.store.cf(CF_META);
        for (bucket, added) in bucket_counts {
            let key = keys::bucket_count_key(bucket);
            let stored = self
                .store
                .db
                .get_pinned_cf(meta, &key)
                .map_err(|cause| LedgerError::storage(format!("read record count of bucket {bucket}"), cause))?;
            let count = match stored {
                Some(bytes) => keys::decode_u64("bucket record count", &bytes)?,
                None => 0,
            };
            self.batch.put_cf(meta, key, (count + added).to_be_bytes());
        }

        let issuance_count = self.state.issuance_count + records.len() as u64;
        self.batch.put_cf(meta, META_ISSUANCE_COUNT, issuance_count.to_be_bytes());
        self.state.issuance_count = issuance_count;
        Ok(())
    }
}

/// Compares `record` with the record already stored or accepted under its
/// serial. A serial index entry without a record counts as a duplicate.
fn compare_same_serial(record: &IssuanceRecord, existing: Option<&IssuanceRecord>) -> RecordCheck {
    if existing == Some(record) {
        RecordCheck::AlreadyRecorded
    } else {
        RecordCheck::Reject(LedgerError::DuplicateSerial { serial_hex: hex::encode(&record.serial) })
    }
}
