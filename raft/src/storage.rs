//! The Raft log, hard state and configuration in RocksDB.
//!
//! [`LogStore`] implements raft-rs's [`Storage`] contract over one RocksDB
//! database with two column families:
//! - `log`: entries by index (big-endian u64), encoded as eraftpb `Entry`;
//! - `meta`: the hard state, the conf state, the index and term of the last
//!   entry dropped from the log (the snapshot the log starts after), the
//!   peer addresses and the latest snapshot the node can send.
//!
//! Every write is one synced write batch, so a crash leaves either the old
//! or the new state. The bounds of the log and the small values are cached
//! in memory; entries are read from RocksDB.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::RwLock;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use rocksdb::{ColumnFamilyDescriptor, DB, Options, ReadOptions, WriteBatch, WriteOptions};

use crate::error::RaftError;
use crate::snapshot::{decode_peers, encode_peers};

const CF_LOG: &str = "log";
const CF_META: &str = "meta";

const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
const KEY_TRUNCATED: &[u8] = b"truncated";
const KEY_PEERS: &[u8] = b"peers";

/// The cached state of the log. Entries with indexes `first..=last` are
/// stored; `truncated` is the entry just before `first`.
#[derive(Debug, Clone, Default)]
struct Cached {
    hard_state: HardState,
    conf_state: ConfState,
    truncated_index: u64,
    truncated_term: u64,
    last_index: u64,
    last_term: u64,
    peers: BTreeMap<u64, String>,
    /// The newest snapshot this node can send, if any.
    snapshot: Option<SnapshotMetadata>,
}

/// The Raft log of one node in RocksDB.
pub struct LogStore {
    db: DB,
    cached: RwLock<Cached>,
    /// Set by `snapshot` when raft-rs asked for a snapshot that is not there,
    /// so that the node takes one.
    snapshot_wanted: AtomicBool,
    /// Set after a failed write: the store refuses every later write.
    failed: AtomicBool,
}

impl LogStore {
    /// Opens or creates the log at `path`.
    pub fn open(path: &Path) -> Result<LogStore, RaftError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let families = vec![
            ColumnFamilyDescriptor::new(CF_LOG, Options::default()),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&options, path, families)
            .map_err(|cause| RaftError::storage(format!("open the Raft log at {}", path.display()), cause))?;
        let cached = load(&db)?;
        Ok(LogStore {
            db,
            cached: RwLock::new(cached),
            snapshot_wanted: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        })
    }

    /// True when the log has never been written: no entries, no snapshot,
    /// no configuration.
    pub fn is_empty(&self) -> bool {
        let cached = self.cached.read();
        cached.last_index == 0 && cached.conf_state.voters.is_empty() && cached.conf_state.learners.is_empty()
    }

    /// Writes the first entries of a new cluster, committed at term 1: one
    /// membership entry per voter (with its address), then one entry per
    /// command in `commands`. Every node of the new cluster is bootstrapped
    /// with the same arguments, so their logs start equal; a node that
    /// joins later replays these entries (or gets a snapshot) and learns
    /// the configuration from them.
    pub fn bootstrap(&self, peers: &BTreeMap<u64, String>, commands: &[Vec<u8>]) -> Result<(), RaftError> {
        if !self.is_empty() {
            return Err(RaftError::Invariant("bootstrap of a Raft log that already has entries".to_owned()));
        }
        if peers.is_empty() {
            return Err(RaftError::Membership("a cluster needs at least one voter".to_owned()));
        }
        let mut entries = Vec::with_capacity(peers.len() + commands.len());
        for (id, address) in peers {
            let mut change = ConfChange::default();
            change.set_change_type(ConfChangeType::AddNode);
            change.node_id = *id;
            let mut context = vec![0u8; 16];
            context.extend_from_slice(&encode_peers(&BTreeMap::from([(*id, address.clone())])));
            change.context = context.into();
            let mut entry = Entry::default();
            entry.set_entry_type(EntryType::EntryConfChange);
            entry.data = change
                .write_to_bytes()
                .map_err(|error| RaftError::Invariant(format!("encode the membership of node {id}: {error}")))?
                .into();
            entries.push(entry);
        }
        for command in commands {
            let proposal = crate::proposal::Proposal::new(crate::proposal::RequestId::random(), command.clone());
            let mut entry = Entry::default();
            entry.set_entry_type(EntryType::EntryNormal);
            entry.data = crate::proposal::encode_batch(&[proposal]).into();
            entries.push(entry);
        }
        for (position, entry) in entries.iter_mut().enumerate() {
            entry.index = position as u64 + 1;
            entry.term = 1;
        }
        let hard_state = HardState { term: 1, commit: entries.len() as u64, ..Default::default() };
        self.append(&entries, Some(&hard_state))?;

        let mut batch = WriteBatch::default();
        batch.put_cf(self.meta(), KEY_PEERS, encode_peers(peers));
        self.write(batch, "store the peer addresses")?;
        self.cached.write().peers = peers.clone();
        Ok(())
    }

    /// Appends commands to the log of a node that is the only voter of its
    /// cluster and is not running, as committed entries. This is how the
    /// command line installs a CA into a stopped single-node cluster.
    pub fn append_offline(&self, node_id: u64, commands: &[Vec<u8>]) -> Result<(), RaftError> {
        let voters = self.conf_state().voters;
        let peers = self.peers();
        let only_voter = (voters.is_empty() && peers.keys().eq([&node_id])) || voters == [node_id];
        if !only_voter {
            return Err(RaftError::Membership(format!(
                "node {node_id} is not the only voter of its cluster; change the ledger through the running cluster"
            )));
        }
        let (_, last) = self.bounds();
        let mut hard_state = self.hard_state();
        hard_state.term = hard_state.term.max(1);
        let mut entries = Vec::with_capacity(commands.len());
        for (position, command) in commands.iter().enumerate() {
            let proposal = crate::proposal::Proposal::new(crate::proposal::RequestId::random(), command.clone());
            let mut entry = Entry::default();
            entry.set_entry_type(EntryType::EntryNormal);
            entry.index = last + 1 + position as u64;
            entry.term = hard_state.term;
            entry.data = crate::proposal::encode_batch(&[proposal]).into();
            entries.push(entry);
        }
        hard_state.commit = last + commands.len() as u64;
        self.append(&entries, Some(&hard_state))
    }

    /// Appends `entries`, replacing any stored entries at or after the
    /// first one's index, and stores `hard_state` if given, in one synced
    /// write. This is the persistence step of raft-rs's Ready handling.
    pub fn append(&self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<(), RaftError> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        let mut new_last = None;
        if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
            let cached = self.cached.read();
            if first.index <= cached.truncated_index {
                return Err(RaftError::Invariant(format!(
                    "append at index {} overwrites the compacted log (truncated at {})",
                    first.index, cached.truncated_index
                )));
            }
            if first.index > cached.last_index + 1 {
                return Err(RaftError::Invariant(format!(
                    "append at index {} leaves a gap after the last index {}",
                    first.index, cached.last_index
                )));
            }
            if cached.last_index >= first.index {
                batch.delete_range_cf(self.log(), index_key(first.index), index_key(cached.last_index + 1));
            }
            for entry in entries {
                let bytes = entry
                    .write_to_bytes()
                    .map_err(|error| RaftError::Invariant(format!("encode entry {}: {error}", entry.index)))?;
                batch.put_cf(self.log(), index_key(entry.index), bytes);
            }
            new_last = Some((last.index, last.term));
        }
        if let Some(hard_state) = hard_state {
            self.put_message(&mut batch, KEY_HARD_STATE, hard_state)?;
        }
        self.write(batch, "append to the Raft log")?;

        let mut cached = self.cached.write();
        if let Some((index, term)) = new_last {
            cached.last_index = index;
            cached.last_term = term;
        }
        if let Some(hard_state) = hard_state {
            cached.hard_state = hard_state.clone();
        }
        Ok(())
    }

    /// Stores a new commit index (from raft-rs's LightReady).
    pub fn set_commit(&self, commit: u64) -> Result<(), RaftError> {
        let mut hard_state = self.cached.read().hard_state.clone();
        if hard_state.commit == commit {
            return Ok(());
        }
        hard_state.commit = commit;
        self.append(&[], Some(&hard_state))
    }

    /// Stores the configuration that a membership change produced, with the
    /// addresses of the peers it names.
    pub fn set_conf_state(&self, conf_state: &ConfState, peers: &BTreeMap<u64, String>) -> Result<(), RaftError> {
        let mut batch = WriteBatch::default();
        self.put_message(&mut batch, KEY_CONF_STATE, conf_state)?;
        batch.put_cf(self.meta(), KEY_PEERS, encode_peers(peers));
        self.write(batch, "store the cluster configuration")?;
        let mut cached = self.cached.write();
        cached.conf_state = conf_state.clone();
        cached.peers = peers.clone();
        Ok(())
    }

    /// Replaces the log with a snapshot received from the leader: drops
    /// every entry, and takes the snapshot's index, term and configuration.
    pub fn apply_snapshot(&self, metadata: &SnapshotMetadata, peers: &BTreeMap<u64, String>) -> Result<(), RaftError> {
        let (last_index, mut hard_state) = {
            let cached = self.cached.read();
            (cached.last_index, cached.hard_state.clone())
        };
        hard_state.term = hard_state.term.max(metadata.term);
        hard_state.commit = hard_state.commit.max(metadata.index);

        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.log(), index_key(0), index_key(last_index.max(metadata.index) + 1));
        self.put_message(&mut batch, KEY_HARD_STATE, &hard_state)?;
        self.put_message(&mut batch, KEY_CONF_STATE, metadata.get_conf_state())?;
        batch.put_cf(self.meta(), KEY_TRUNCATED, encode_index_term(metadata.index, metadata.term));
        batch.put_cf(self.meta(), KEY_PEERS, encode_peers(peers));
        self.write(batch, "apply a snapshot to the Raft log")?;

        let mut cached = self.cached.write();
        cached.hard_state = hard_state;
        cached.conf_state = metadata.get_conf_state().clone();
        cached.truncated_index = metadata.index;
        cached.truncated_term = metadata.term;
        cached.last_index = metadata.index;
        cached.last_term = metadata.term;
        cached.peers = peers.clone();
        Ok(())
    }

    /// Drops the entries before `compact_index`. The caller makes sure a
    /// snapshot covers them and that they were applied.
    pub fn compact(&self, compact_index: u64) -> Result<(), RaftError> {
        let (first, last) = {
            let cached = self.cached.read();
            (cached.truncated_index + 1, cached.last_index)
        };
        if compact_index <= first {
            return Ok(());
        }
        if compact_index > last + 1 {
            return Err(RaftError::Invariant(format!(
                "compact to index {compact_index} is past the last index {last}"
            )));
        }
        let truncated_index = compact_index - 1;
        let truncated_term = self.term(truncated_index).map_err(|error| {
            RaftError::Invariant(format!("read the term of index {truncated_index} to compact: {error}"))
        })?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.log(), index_key(first), index_key(compact_index));
        batch.put_cf(self.meta(), KEY_TRUNCATED, encode_index_term(truncated_index, truncated_term));
        self.write(batch, "compact the Raft log")?;

        let mut cached = self.cached.write();
        cached.truncated_index = truncated_index;
        cached.truncated_term = truncated_term;
        Ok(())
    }

    /// Records the newest snapshot this node can send. It is kept in
    /// memory only: after a restart the node takes a new one when needed.
    pub fn set_latest_snapshot(&self, metadata: SnapshotMetadata) {
        self.cached.write().snapshot = Some(metadata);
    }

    /// Returns and clears the flag raised when raft-rs asked for a snapshot
    /// newer than the latest one.
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.swap(false, Ordering::AcqRel)
    }

    pub fn hard_state(&self) -> HardState {
        self.cached.read().hard_state.clone()
    }

    pub fn conf_state(&self) -> ConfState {
        self.cached.read().conf_state.clone()
    }

    pub fn peers(&self) -> BTreeMap<u64, String> {
        self.cached.read().peers.clone()
    }

    /// First and last index of the stored entries, and the number of
    /// entries kept.
    pub fn bounds(&self) -> (u64, u64) {
        let cached = self.cached.read();
        (cached.truncated_index + 1, cached.last_index)
    }

    /// True after a write failed. The node then stops, and a restart with
    /// a working disk is the way back.
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Makes every later write fail as a broken disk would, for the
    /// simulated network's failure tests.
    pub(crate) fn fail_writes(&self) {
        self.failed.store(true, Ordering::Release);
    }

    fn log(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(CF_LOG).expect("LogStore::open opens the log column family")
    }

    fn meta(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(CF_META).expect("LogStore::open opens the meta column family")
    }

    fn put_message(
        &self,
        batch: &mut WriteBatch,
        key: &[u8],
        message: &impl protobuf::Message,
    ) -> Result<(), RaftError> {
        let bytes = message
            .write_to_bytes()
            .map_err(|error| RaftError::Invariant(format!("encode {}: {error}", String::from_utf8_lossy(key))))?;
        batch.put_cf(self.meta(), key, bytes);
        Ok(())
    }

    fn write(&self, batch: WriteBatch, what: &str) -> Result<(), RaftError> {
        if self.has_failed() {
            return Err(RaftError::StorageFailed);
        }
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(batch, &options).map_err(|cause| {
            self.failed.store(true, Ordering::Release);
            RaftError::storage(what.to_owned(), cause)
        })
    }

    fn read_entry(&self, index: u64) -> Result<Entry, raft::Error> {
        let bytes = self
            .db
            .get_pinned_cf(self.log(), index_key(index))
            .map_err(|cause| other(format!("read entry {index}: {cause}")))?
            .ok_or(raft::Error::Store(StorageError::Unavailable))?;
        Entry::parse_from_bytes(&bytes).map_err(|error| other(format!("decode entry {index}: {error}")))
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let cached = self.cached.read();
        Ok(RaftState::new(cached.hard_state.clone(), cached.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        let (first, last) = self.bounds();
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > last + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }

        let mut options = ReadOptions::default();
        options.set_iterate_lower_bound(index_key(low).to_vec());
        options.set_iterate_upper_bound(index_key(high).to_vec());
        let mut entries = Vec::with_capacity((high - low).min(1024) as usize);
        let mut size = 0u64;
        for item in self.db.iterator_cf_opt(self.log(), options, rocksdb::IteratorMode::Start) {
            let (key, value) = item.map_err(|cause| other(format!("read entries {low}..{high}: {cause}")))?;
            let entry = Entry::parse_from_bytes(&value)
                .map_err(|error| other(format!("decode entry at key {}: {error}", hex_key(&key))))?;
            size += value.len() as u64;
            if let Some(limit) = max_size
                && !entries.is_empty()
                && size > limit
            {
                break;
            }
            entries.push(entry);
        }
        if entries.len() as u64 != high - low && max_size.is_none() {
            return Err(other(format!("entries {low}..{high} are missing from the Raft log")));
        }
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        let (truncated_index, truncated_term, last_index, last_term) = {
            let cached = self.cached.read();
            (cached.truncated_index, cached.truncated_term, cached.last_index, cached.last_term)
        };
        if index == truncated_index {
            return Ok(truncated_term);
        }
        if index < truncated_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if index == last_index {
            return Ok(last_term);
        }
        Ok(self.read_entry(index)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.cached.read().truncated_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.cached.read().last_index)
    }

    /// Returns the latest snapshot if it is recent enough and its
    /// configuration names the receiving node (raft-rs ignores a snapshot
    /// that does not, as for a node added after it was taken); otherwise
    /// requests a new one from the node and reports it as temporarily
    /// unavailable.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let cached = self.cached.read();
        match &cached.snapshot {
            Some(metadata)
                if metadata.index >= request_index
                    && metadata.index >= cached.truncated_index
                    && names_member(metadata.get_conf_state(), to) =>
            {
                let mut snapshot = Snapshot::default();
                snapshot.set_metadata(metadata.clone());
                snapshot.data = crate::snapshot::descriptor(metadata.index, metadata.term).into();
                Ok(snapshot)
            }
            _ => {
                self.snapshot_wanted.store(true, Ordering::Release);
                Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
            }
        }
    }
}

/// True when `id` is a voter or learner of `conf_state`, in either half of a joint configuration.
fn names_member(conf_state: &ConfState, id: u64) -> bool {
    [&conf_state.voters, &conf_state.learners, &conf_state.voters_outgoing, &conf_state.learners_next]
        .into_iter()
        .any(|members| members.contains(&id))
}

fn load(db: &DB) -> Result<Cached, RaftError> {
    let meta = db.cf_handle(CF_META).expect("LogStore::open opens the meta column family");
    let log = db.cf_handle(CF_LOG).expect("LogStore::open opens the log column family");
    let read = |key: &[u8]| -> Result<Option<Vec<u8>>, RaftError> {
        db.get_cf(meta, key)
            .map_err(|cause| RaftError::storage(format!("read {}", String::from_utf8_lossy(key)), cause))
    };

    let mut cached = Cached::default();
    if let Some(bytes) = read(KEY_HARD_STATE)? {
        cached.hard_state = decode(KEY_HARD_STATE, &bytes)?;
    }
    if let Some(bytes) = read(KEY_CONF_STATE)? {
        cached.conf_state = decode(KEY_CONF_STATE, &bytes)?;
    }
    if let Some(bytes) = read(KEY_TRUNCATED)? {
        (cached.truncated_index, cached.truncated_term) = decode_index_term(&bytes)?;
    }
    if let Some(bytes) = read(KEY_PEERS)? {
        cached.peers = decode_peers(&bytes)?;
    }

    cached.last_index = cached.truncated_index;
    cached.last_term = cached.truncated_term;
    let mut last = db.iterator_cf(log, rocksdb::IteratorMode::End);
    if let Some(item) = last.next() {
        let (_, value) = item.map_err(|cause| RaftError::storage("read the last Raft log entry".to_owned(), cause))?;
        let entry: Entry = decode(b"last entry", &value)?;
        cached.last_index = entry.index;
        cached.last_term = entry.term;
    }
    Ok(cached)
}

fn decode<M: protobuf::Message>(key: &[u8], bytes: &[u8]) -> Result<M, RaftError> {
    M::parse_from_bytes(bytes)
        .map_err(|error| RaftError::Corrupt(format!("decode {}: {error}", String::from_utf8_lossy(key))))
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn hex_key(key: &[u8]) -> String {
    key.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn encode_index_term(index: u64, term: u64) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&index.to_be_bytes());
    bytes[8..].copy_from_slice(&term.to_be_bytes());
    bytes
}

fn decode_index_term(bytes: &[u8]) -> Result<(u64, u64), RaftError> {
    let array = <[u8; 16]>::try_from(bytes).map_err(|_| {
        RaftError::Corrupt(format!("truncated index and term: expected 16 bytes, found {}", bytes.len()))
    })?;
    let mut index = [0u8; 8];
    let mut term = [0u8; 8];
    index.copy_from_slice(&array[..8]);
    term.copy_from_slice(&array[8..]);
    Ok((u64::from_be_bytes(index), u64::from_be_bytes(term)))
}

fn other(reason: String) -> raft::Error {
    raft::Error::Store(StorageError::Other(reason.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8; 10].into(), ..Default::default() }
    }

    fn context() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    #[test]
    fn log_storage_contract_after_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LogStore::open(dir.path()).expect("open");
        let entries: Vec<Entry> = (1..=10).map(|index| entry(index, 1 + index / 5)).collect();
        let hard_state = HardState { term: 3, vote: 2, commit: 7, ..Default::default() };
        store.append(&entries, Some(&hard_state)).expect("append");
        drop(store);

        let store = LogStore::open(dir.path()).expect("reopen");
        assert_eq!(store.initial_state().expect("state").hard_state, hard_state);
        assert_eq!(store.first_index().expect("first"), 1);
        assert_eq!(store.last_index().expect("last"), 10);
        assert_eq!(store.term(7).expect("term"), 2);
        assert_eq!(store.entries(3, 6, None, context()).expect("entries"), entries[2..5].to_vec());
        let limited = store.entries(3, 10, 40, context()).expect("entries");
        assert_eq!(limited.len(), 2, "a size limit keeps whole entries up to the limit");
        assert!(matches!(store.term(11), Err(raft::Error::Store(StorageError::Unavailable))));
    }

    #[test]
    fn append_replaces_conflicting_suffix() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LogStore::open(dir.path()).expect("open");
        store.append(&(1..=5).map(|index| entry(index, 1)).collect::<Vec<_>>(), None).expect("append");
        store.append(&[entry(3, 2)], None).expect("overwrite");
        assert_eq!(store.last_index().expect("last"), 3);
        assert_eq!(store.term(3).expect("term"), 2);
        let error = store.append(&[entry(6, 2)], None).expect_err("a gap must be refused");
        assert!(error.to_string().contains("gap"), "{error}");
    }

    #[test]
    fn compact_keeps_truncated_term() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LogStore::open(dir.path()).expect("open");
        store.append(&(1..=10).map(|index| entry(index, index)).collect::<Vec<_>>(), None).expect("append");
        store.compact(6).expect("compact");
        drop(store);

        let store = LogStore::open(dir.path()).expect("reopen");
        assert_eq!(store.first_index().expect("first"), 6);
        assert_eq!(store.term(5).expect("term of the dropped entry"), 5);
        assert!(matches!(store.term(4), Err(raft::Error::Store(StorageError::Compacted))));
        assert!(matches!(store.entries(4, 7, None, context()), Err(raft::Error::Store(StorageError::Compacted))));
        assert_eq!(store.entries(6, 11, None, context()).expect("entries").len(), 5);
    }

    #[test]
    fn apply_snapshot_replaces_log() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LogStore::open(dir.path()).expect("open");
        store.append(&(1..=4).map(|index| entry(index, 1)).collect::<Vec<_>>(), None).expect("append");
        let mut metadata = SnapshotMetadata { index: 20, term: 3, ..Default::default() };
        metadata.mut_conf_state().voters = vec![1, 2, 3];
        let peers = BTreeMap::from([(1, "a:1".to_owned()), (2, "b:2".to_owned()), (3, "c:3".to_owned())]);
        store.apply_snapshot(&metadata, &peers).expect("apply snapshot");
        drop(store);

        let store = LogStore::open(dir.path()).expect("reopen");
        assert_eq!(store.first_index().expect("first"), 21);
        assert_eq!(store.last_index().expect("last"), 20);
        assert_eq!(store.term(20).expect("term"), 3);
        assert_eq!(store.hard_state().commit, 20);
        assert_eq!(store.conf_state().voters, vec![1, 2, 3]);
        assert_eq!(store.peers(), peers);
    }

    #[test]
    fn snapshot_newer_than_latest_requested() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LogStore::open(dir.path()).expect("open");
        assert!(matches!(store.snapshot(0, 2), Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))));
        assert!(store.take_snapshot_wanted());
        let mut metadata = SnapshotMetadata { index: 9, term: 2, ..Default::default() };
        metadata.mut_conf_state().voters = vec![1, 2];
        store.set_latest_snapshot(metadata);
        let snapshot = store.snapshot(5, 2).expect("snapshot");
        assert_eq!(crate::snapshot::parse_descriptor(&snapshot.data).expect("descriptor"), (9, 2));
        assert!(store.snapshot(10, 2).is_err());
        assert!(store.snapshot(5, 4).is_err(), "node 4 joined after the snapshot; it needs a newer one");
        assert!(store.take_snapshot_wanted());
    }

    #[test]
    fn write_after_failure_rejected() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LogStore::open(dir.path()).expect("open");
        store.fail_writes();
        let error = store.append(&[entry(1, 1)], None).expect_err("writes must fail");
        assert!(matches!(error, RaftError::StorageFailed), "{error}");
        assert_eq!(store.last_index().expect("last"), 0, "nothing was written");
    }

    #[test]
    fn bootstrap_writes_committed_entries() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LogStore::open(dir.path()).expect("open");
        let peers = BTreeMap::from([(1, "127.0.0.1:1".to_owned()), (2, "127.0.0.1:2".to_owned())]);
        store.bootstrap(&peers, &[b"first command".to_vec()]).expect("bootstrap");
        assert_eq!(store.last_index().expect("last"), 3);
        assert_eq!(store.hard_state().commit, 3);
        let entries = store.entries(1, 4, None, context()).expect("entries");
        assert_eq!(entries[0].get_entry_type(), EntryType::EntryConfChange);
        assert_eq!(entries[2].get_entry_type(), EntryType::EntryNormal);
        let error = store.bootstrap(&peers, &[]).expect_err("a second bootstrap must be refused");
        assert!(error.to_string().contains("already has entries"), "{error}");
        let error = store.append_offline(1, &[b"more".to_vec()]).expect_err("node 1 is not the only voter");
        assert!(error.to_string().contains("not the only voter"), "{error}");
    }
}
