//! The error type of the ledger.

/// An error from applying a command to the ledger or reading its state.
///
/// `DuplicateSerial`, `InvalidRecord` and `InvalidCommand` reject bad input:
/// a command rejected for them still consumes its index, and every node
/// rejects it the same way. The other variants report storage failures or
/// misuse of the API, such as an entry index that was already applied.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    #[error("record issuance: duplicate serial {serial_hex}")]
    DuplicateSerial { serial_hex: String },

    #[error("validate issuance record: invalid {field}: {reason}")]
    InvalidRecord { field: &'static str, reason: String },

    #[error("validate {command} command: {reason}")]
    InvalidCommand { command: &'static str, reason: String },

    /// A condition of a key-value transaction did not hold. Revision 0
    /// means absent.
    #[error("key-value transaction: key {key} is at revision {found}, expected {expected}")]
    KvConflict { key: String, expected: u64, found: u64 },

    /// A RocksDB call failed. `operation` names the step, such as
    /// "open ledger at /var/lib/sigil/ledger".
    #[error("{operation}: {cause}")]
    Storage { operation: String, cause: rocksdb::Error },

    /// Stored data could not be decoded, which means the database is
    /// corrupt or was written by an incompatible version.
    #[error("decode stored {item}: {reason}")]
    Decode { item: String, reason: String },

    #[error("open ledger at {path}: schema version {found} is not supported, expected {expected}")]
    UnsupportedSchema { path: String, found: u64, expected: u64 },

    /// A write failed, so the in-memory state may no longer match the
    /// database. Every later write fails until the ledger is reopened.
    #[error("apply command: ledger halted after a failed write at index {index}, reopen the ledger to recover")]
    Halted { index: u64 },

    #[error("start ledger writer thread: {reason}")]
    StartWriter { reason: String },

    /// The writer thread has stopped, so queued records cannot be written.
    #[error("ledger is closed")]
    Closed,

    /// `apply_entry` was called with an index the ledger has already
    /// applied, which would apply an entry twice. Nothing was written.
    #[error("apply entry at index {index}: the ledger has already applied up to index {applied_index}")]
    IndexNotAboveApplied { index: u64, applied_index: u64 },

    /// The entry digest encodes each command's length as a big-endian u32.
    /// Nothing was written.
    #[error("apply entry at index {index}: command {position} is {len} bytes, more than the maximum {max} bytes", max = u32::MAX)]
    CommandTooLarge { index: u64, position: usize, len: usize },

    /// A file or folder operation of a checkpoint or restore failed.
    #[error("{operation}: {reason}")]
    Filesystem { operation: String, reason: String },

    /// A restore failed and the previous database could not be reopened
    /// either, so nothing can be read or written until the ledger is opened
    /// again.
    #[error("ledger at {path} has no open database after a failed restore, reopen the ledger to recover")]
    NotOpen { path: String },
}

impl LedgerError {
    /// Returns true when a command was rejected for its content. A rejected
    /// command still consumed its index, and a replica that applies the same
    /// command rejects it with the same error.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            LedgerError::DuplicateSerial { .. }
                | LedgerError::InvalidRecord { .. }
                | LedgerError::InvalidCommand { .. }
                | LedgerError::KvConflict { .. }
        )
    }

    pub(crate) fn storage(operation: impl Into<String>, cause: rocksdb::Error) -> Self {
        LedgerError::Storage { operation: operation.into(), cause }
    }

    pub(crate) fn filesystem(operation: impl Into<String>, cause: &std::io::Error) -> Self {
        LedgerError::Filesystem { operation: operation.into(), reason: cause.to_string() }
    }
}
