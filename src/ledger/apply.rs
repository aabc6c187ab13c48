//! The deterministic state machine: stages the commands of one entry.
//!
//! Staging reads only the stored state and the command bytes, never the
//! clock or a random source, so replicas that apply the same entries at the
//! same indexes reach the same state and digest.
//!
//! An entry is written as one RocksDB write batch, and reads do not see the
//! writes staged in that batch. Commands are therefore staged by kind rather
//! than in entry order: every `InstallCa` in order, then one purge at the
//! largest `expired_before_unix` of all `PurgeExpired` commands, then the
//! records of all `RecordIssuances` commands (see `records.rs`), then the
//! `KvTransaction` commands in order (see `kv.rs`).

use prost::Message;
use ring::digest;
use rocksdb::{ReadOptions, WriteBatch};

use super::command::{CaVersion, Command, CommandKind, InstallCa, KvTransaction, PurgeExpired, RecordIssuances};
use super::error::LedgerError;
use super::keys::{
    self, CF_CA, CF_ISSUANCE, CF_META, META_ACTIVE_CA_VERSION, META_ISSUANCE_COUNT, META_LATEST_CA_VERSION,
    META_PURGE_CUTOFF,
};
use super::store::{LedgerState, Store};

/// The effect of a command that was applied and not rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CommandResult {
    CaInstalled {
        version: u64,
        /// True when the chain and key label equal the active version's, so
        /// no version was added and `version` is the active one.
        already_installed: bool,
    },
    IssuancesRecorded {
        /// Records written by this command.
        count: u64,
        /// Records not written because a record with the same serial and
        /// identical content was already stored, or was written earlier in
        /// the same entry. A retried command counts all its records here.
        already_recorded: u64,
    },
    ExpiredPurged {
        /// Start (Unix seconds) of the oldest expiry bucket kept.
        cutoff_unix: u64,
        records_removed: u64,
        /// Expired key-value entries dropped.
        kv_removed: u64,
    },
    KvCommitted {
        /// The revision the transaction's writes carry.
        revision: u64,
    },
}

/// The result of one command: its effect, or the error that rejected it.
pub(crate) type CommandOutcome = Result<CommandResult, LedgerError>;

/// The writes of one entry, not yet committed, and one result per command.
pub(crate) struct StagedEntry {
    pub(crate) batch: WriteBatch,
    /// The state after the entry, except the applied index and digest.
    pub(crate) next: LedgerState,
    pub(crate) results: Vec<CommandOutcome>,
    /// The entry changed what the trust bundle is made of: a CA version, or a key-value entry under
    /// [`keys::BUNDLE_KV_PREFIX`].
    pub(crate) bundle_touched: bool,
}

/// An entry while its commands are staged.
pub(super) struct EntryStage<'s> {
    pub(super) store: &'s Store,
    index: u64,
    pub(super) state: LedgerState,
    pub(super) batch: WriteBatch,
    /// One slot per command of the entry, filled as each command is staged.
    pub(super) results: Vec<Option<CommandOutcome>>,
    pub(super) bundle_touched: bool,
}

/// The decoded commands of one entry grouped by kind, each with its
/// position in the entry.
#[derive(Default)]
struct CommandsByKind {
    installs: Vec<(usize, InstallCa)>,
    purges: Vec<(usize, PurgeExpired)>,
    records: Vec<(usize, RecordIssuances)>,
    kv: Vec<(usize, KvTransaction)>,
}

/// Computes the digest after the entry at `index`: SHA-256(previous digest
/// || index as big-endian u64 || for each command, its length as big-endian
/// u32 then its bytes). An entry without commands leaves the digest as it is.
pub(crate) fn entry_digest(previous: &[u8; 32], index: u64, commands: &[&[u8]]) -> Result<[u8; 32], LedgerError> {
    if commands.is_empty() {
        return Ok(*previous);
    }
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(previous);
    context.update(&index.to_be_bytes());
    for (position, command) in commands.iter().enumerate() {
        let len = u32::try_from(command.len()).map_err(|_| LedgerError::CommandTooLarge {
            index,
            position,
            len: command.len(),
        })?;
        context.update(&len.to_be_bytes());
        context.update(command);
    }
    let mut output = [0u8; 32];
    output.copy_from_slice(context.finish().as_ref());
    Ok(output)
}

impl Store {
    /// Stages every command of the entry at `index`. A command that is
    /// rejected fails alone. Returns `Err` only when a read fails.
    pub(crate) fn stage_entry(
        &self,
        index: u64,
        commands: &[&[u8]],
        prior: &LedgerState,
    ) -> Result<StagedEntry, LedgerError> {
        let mut stage = EntryStage {
            store: self,
            index,
            state: *prior,
            batch: WriteBatch::default(),
            results: vec![None; commands.len()],
            bundle_touched: false,
        };
        let grouped = stage.decode_commands(commands);
        stage.stage_installs(grouped.installs)?;
        stage.stage_purges(&grouped.purges)?;
        stage.stage_records(&grouped.records)?;
        stage.stage_kv(grouped.kv)?;
        Ok(stage.finish())
    }
}

impl EntryStage<'_> {
    /// Groups the commands by kind. Commands that do not decode get their
    /// error here.
    fn decode_commands(&mut self, commands: &[&[u8]]) -> CommandsByKind {
        let mut grouped = CommandsByKind::default();
        for (position, bytes) in commands.iter().enumerate() {
            match decode_command(bytes) {
                Ok(CommandKind::InstallCa(install)) => grouped.installs.push((position, install)),
                Ok(CommandKind::PurgeExpired(purge)) => grouped.purges.push((position, purge)),
                Ok(CommandKind::RecordIssuances(records)) => grouped.records.push((position, records)),
                Ok(CommandKind::KvTransaction(transaction)) => grouped.kv.push((position, transaction)),
                Err(error) => self.results[position] = Some(Err(error)),
            }
        }
        grouped
    }

    fn stage_installs(&mut self, installs: Vec<(usize, InstallCa)>) -> Result<(), LedgerError> {
        if installs.is_empty() {
            return Ok(());
        }
        let mut active = match self.state.active_ca_version {
            0 => None,
            version => self.store.ca_version(version)?,
        };
        for (position, install) in installs {
            self.results[position] = Some(self.stage_install(install, &mut active));
        }
        Ok(())
    }

    /// Adds a CA version and makes it active, unless `active`, the active
    /// version as staged so far, already has the same chain and key label.
    fn stage_install(&mut self, install: InstallCa, active: &mut Option<CaVersion>) -> CommandOutcome {
        install.validate()?;
        if let Some(current) = active
            && current.has_chain_of(&install)
        {
            return Ok(CommandResult::CaInstalled { version: current.version, already_installed: true });
        }

        let version = self.state.latest_ca_version + 1;
        let stored = CaVersion {
            version,
            key_label: install.key_label,
            intermediates_der: install.intermediates_der,
            roots_der: install.roots_der,
            installed_at_unix: install.installed_at_unix,
            installed_at_index: self.index,
        };
        self.batch.put_cf(self.store.cf(CF_CA), keys::ca_version_key(version), stored.encode_to_vec());
        let meta = self.store.cf(CF_META);
        self.batch.put_cf(meta, META_LATEST_CA_VERSION, version.to_be_bytes());
        self.batch.put_cf(meta, META_ACTIVE_CA_VERSION, version.to_be_bytes());

        self.state.latest_ca_version = version;
        self.state.active_ca_version = version;
        self.bundle_touched = true;
        *active = Some(stored);
        Ok(CommandResult::CaInstalled { version, already_installed: false })
    }

    /// Stages one purge at the latest time of all `purges`, and gives each
    /// of them its result.
    fn stage_purges(&mut self, purges: &[(usize, PurgeExpired)]) -> Result<(), LedgerError> {
        let Some(expired_before_unix) = purges.iter().map(|(_, purge)| purge.expired_before_unix).max() else {
            return Ok(());
        };
        let result = self.stage_purge(expired_before_unix)?;
        for (position, _) in purges {
            self.results[*position] = Some(Ok(result.clone()));
        }
        Ok(())
    }

    /// Range-deletes every expiry bucket that ends at or before
    /// `expired_before_unix`. The serial index is left to the compaction
    /// filter, and the per-bucket counters give the number removed.
    fn stage_purge(&mut self, expired_before_unix: i64) -> Result<CommandResult, LedgerError> {
        let cutoff = keys::expiry_bucket(expired_before_unix);
        if cutoff <= self.state.purge_cutoff {
            return Ok(CommandResult::ExpiredPurged {
                cutoff_unix: self.state.purge_cutoff,
                records_removed: 0,
                kv_removed: 0,
            });
        }

        let meta = self.store.cf(CF_META);
        let counters_start = keys::bucket_count_key(0);
        let counters_end = keys::bucket_count_key(cutoff);
        let mut options = ReadOptions::default();
        options.set_iterate_lower_bound(counters_start.clone());
        options.set_iterate_upper_bound(counters_end.clone());
        let mut records_removed = 0u64;
        for entry in self.store.db.iterator_cf_opt(meta, options, rocksdb::IteratorMode::Start) {
            let (_, value) = entry.map_err(|cause| LedgerError::storage("read bucket record counts", cause))?;
            records_removed += keys::decode_u64("bucket record count", &value)?;
        }

        let cutoff_key = cutoff.to_be_bytes();
        self.batch.delete_range_cf(self.store.cf(CF_ISSUANCE), &[][..], &cutoff_key[..]);
        self.batch.delete_range_cf(meta, counters_start, counters_end);
        let issuance_count = self.state.issuance_count.saturating_sub(records_removed);
        self.batch.put_cf(meta, META_ISSUANCE_COUNT, issuance_count.to_be_bytes());
        self.batch.put_cf(meta, META_PURGE_CUTOFF, cutoff.to_be_bytes());

        let kv_removed = self.stage_kv_purge(cutoff)?;

        self.state.purge_cutoff = cutoff;
        self.state.issuance_count = issuance_count;
        Ok(CommandResult::ExpiredPurged { cutoff_unix: cutoff, records_removed, kv_removed })
    }

    fn finish(self) -> StagedEntry {
        let results = self
            .results
            .into_iter()
            .map(|outcome| outcome.expect("every command of the entry is decoded or staged"))
            .collect();
        StagedEntry { batch: self.batch, next: self.state, results, bundle_touched: self.bundle_touched }
    }
}

fn decode_command(bytes: &[u8]) -> Result<CommandKind, LedgerError> {
    let command = Command::decode(bytes).map_err(|error| LedgerError::InvalidCommand {
        command: "ledger",
        reason: format!("decode protobuf: {error}"),
    })?;
    command.kind.ok_or_else(|| LedgerError::InvalidCommand {
        command: "ledger",
        reason: "command kind is missing or unknown to this version".to_owned(),
    })
}
