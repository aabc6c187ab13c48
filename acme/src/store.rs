//! The store the ACME server keeps its state in.
//!
//! A [`Store`] is a key-value space with compare-and-set transactions. A
//! commit returns once the transaction is applied on this node, and reads
//! after it see every write committed before it on any node, which is what
//! lets any node serve any request.

use std::future::Future;

/// A stored value and the revision of the transaction that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub revision: u64,
}

/// Writes that apply only if every condition holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transaction {
    /// Keys and the revisions they must be at; revision 0 means absent.
    pub conditions: Vec<(Vec<u8>, u64)>,
    pub writes: Vec<Write>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub key: Vec<u8>,
    /// `None` deletes the key.
    pub value: Option<Vec<u8>>,
    /// Unix seconds after which the store may drop the key; 0 keeps it.
    pub expires_unix: i64,
}

impl Transaction {
    /// Requires `key` to be at `revision` (0: absent).
    pub fn when(mut self, key: impl Into<Vec<u8>>, revision: u64) -> Transaction {
        self.conditions.push((key.into(), revision));
        self
    }

    pub fn put(mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>, expires_unix: i64) -> Transaction {
        self.writes.push(Write { key: key.into(), value: Some(value.into()), expires_unix });
        self
    }

    pub fn delete(mut self, key: impl Into<Vec<u8>>) -> Transaction {
        self.writes.push(Write { key: key.into(), value: None, expires_unix: 0 });
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A condition did not hold. `key` is the key as text.
    #[error("key {key} changed concurrently")]
    Conflict { key: String },
    /// The store cannot commit now, for example without a Raft quorum.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store failure: {0}")]
    Internal(String),
}

pub trait Store: Send + Sync + 'static {
    /// Reads `key` as applied on this node.
    fn get(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError>;

    /// Reads up to `limit` entries under `prefix` whose keys sort after
    /// `after`, in key order, as applied on this node.
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Versioned)>, StoreError>;

    /// Commits `transaction` and returns its revision once it is applied on
    /// this node.
    fn commit(&self, transaction: Transaction) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Waits until this node has applied every transaction committed
    /// anywhere before the call (a linearizable read point).
    fn barrier(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}
