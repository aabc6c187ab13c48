//! The error type of the ledger.

/// An error from applying a command to the ledger or reading its state.
///
/// `DuplicateSerial`, `InvalidRecord` and `InvalidCommand` reject bad input:
/// a command rejected for them still consumes its index, and every node
/// rejects it the same way. The other variants are internal failures.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    #[error("record issuance: duplicate serial {serial_hex}")]
    DuplicateSerial { serial_hex: String },

    #[error("validate issuance record: invalid {field}: {reason}")]
    InvalidRecord { field: &'static str, reason: String },

    #[error("validate {command} command: {reason}")]
    InvalidCommand { command: &'static str, reason: String },

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
        )
    }

    pub(crate) fn storage(operation: impl Into<String>, cause: rocksdb::Error) -> Self {
        LedgerError::Storage { operation: operation.into(), cause }
    }
}
