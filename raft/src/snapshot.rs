//! Snapshots as folders of files, and their transfer in chunks.
//!
//! A snapshot is a folder named `<index>-<term>` holding the state
//! machine's checkpoint under `state/`, the cluster's peer addresses in
//! `peers` and the eraftpb `SnapshotMetadata` in `metadata`. The Raft
//! snapshot message carries only a 16-byte descriptor (index and term);
//! the files travel beside it in chunks, so what Raft keeps in memory does
//! not grow with the state.
//!
//! Layout under the node's snapshot folder:
//! - `local/<index>-<term>/`: snapshots this node took and can send;
//! - `incoming/<index>-<term>.partial/`: a transfer in progress;
//! - `incoming/<index>-<term>/`: a complete transfer, waiting for Raft.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::SnapshotMetadata;

use crate::error::RaftError;

/// Size of the data in one chunk.
pub const CHUNK_SIZE: usize = 1 << 20;

const METADATA_FILE: &str = "metadata";
const PEERS_FILE: &str = "peers";
const STATE_DIR: &str = "state";
/// Snapshots kept in `local/`; older ones are deleted.
const LOCAL_KEPT: usize = 2;

/// Encodes the data of a Raft snapshot message: its index and term.
pub fn descriptor(index: u64, term: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(16);
    bytes.extend_from_slice(&index.to_be_bytes());
    bytes.extend_from_slice(&term.to_be_bytes());
    bytes
}

/// Reads a descriptor written by [`descriptor`].
pub fn parse_descriptor(bytes: &[u8]) -> Result<(u64, u64), RaftError> {
    if bytes.len() != 16 {
        return Err(RaftError::Snapshot(format!("descriptor of {} bytes; expected 16", bytes.len())));
    }
    let mut index = [0u8; 8];
    let mut term = [0u8; 8];
    index.copy_from_slice(&bytes[..8]);
    term.copy_from_slice(&bytes[8..]);
    Ok((u64::from_be_bytes(index), u64::from_be_bytes(term)))
}

/// One piece of a snapshot in transfer. Files are sent one after another,
/// each in order; `done` marks the last chunk of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub index: u64,
    pub term: u64,
    /// Path of the file relative to the snapshot folder, `/`-separated.
    pub file: String,
    pub offset: u64,
    pub data: Vec<u8>,
    pub done: bool,
}

/// The snapshot folders of one node.
#[derive(Debug)]
pub struct SnapshotStore {
    root: PathBuf,
}

impl SnapshotStore {
    pub fn open(root: &Path) -> Result<SnapshotStore, RaftError> {
        for folder in [root.join("local"), root.join("incoming")] {
            fs::create_dir_all(&folder).map_err(|error| io_error("create", &folder, &error))?;
        }
        let store = SnapshotStore { root: root.to_owned() };
        store.remove_partial_transfers();
        Ok(store)
    }

    pub fn local_dir(&self, index: u64, term: u64) -> PathBuf {
        self.root.join("local").join(folder_name(index, term))
    }

    pub fn incoming_dir(&self, index: u64, term: u64) -> PathBuf {
        self.root.join("incoming").join(folder_name(index, term))
    }

    /// Returns the state machine's checkpoint folder inside a snapshot folder.
    pub fn state_dir(snapshot_dir: &Path) -> PathBuf {
        snapshot_dir.join(STATE_DIR)
    }

    /// Takes a local snapshot: `checkpoint` writes the state machine's
    /// files into the folder it is given; then the metadata and peers are
    /// written and the folder appears under its final name.
    pub fn take(
        &self,
        metadata: &SnapshotMetadata,
        peers: &BTreeMap<u64, String>,
        checkpoint: impl FnOnce(&Path) -> Result<u64, RaftError>,
    ) -> Result<PathBuf, RaftError> {
        let final_dir = self.local_dir(metadata.index, metadata.term);
        let partial = final_dir.with_extension("partial");
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(|error| io_error("remove", &partial, &error))?;
        }
        fs::create_dir_all(&partial).map_err(|error| io_error("create", &partial, &error))?;

        let checkpoint_index = checkpoint(&partial.join(STATE_DIR))?;
        if checkpoint_index != metadata.index {
            return Err(RaftError::Invariant(format!(
                "the state machine checkpoint is at index {checkpoint_index}, the snapshot at {}",
                metadata.index
            )));
        }
        write_file(&partial.join(PEERS_FILE), &encode_peers(peers))?;
        let bytes =
            metadata.write_to_bytes().map_err(|error| RaftError::Snapshot(format!("encode metadata: {error}")))?;
        write_file(&partial.join(METADATA_FILE), &bytes)?;

        if final_dir.exists() {
            fs::remove_dir_all(&final_dir).map_err(|error| io_error("remove", &final_dir, &error))?;
        }
        fs::rename(&partial, &final_dir).map_err(|error| io_error("rename", &partial, &error))?;
        self.prune_local();
        Ok(final_dir)
    }

    /// Returns the metadata of the newest complete local snapshot, if any.
    pub fn latest_local(&self) -> Option<SnapshotMetadata> {
        let newest = self.local_snapshots().into_iter().next_back()?;
        let bytes = fs::read(self.local_dir(newest.0, newest.1).join(METADATA_FILE)).ok()?;
        SnapshotMetadata::parse_from_bytes(&bytes).ok()
    }

    /// Reads the peer addresses stored in a snapshot folder.
    pub fn read_peers(snapshot_dir: &Path) -> Result<BTreeMap<u64, String>, RaftError> {
        let path = snapshot_dir.join(PEERS_FILE);
        let bytes = fs::read(&path).map_err(|error| io_error("read", &path, &error))?;
        decode_peers(&bytes)
    }

    /// Reads a local snapshot as chunks, in order.
    pub fn read_chunks(&self, index: u64, term: u64) -> Result<Vec<ChunkSource>, RaftError> {
        let dir = self.local_dir(index, term);
        if !dir.is_dir() {
            return Err(RaftError::Snapshot(format!("snapshot {index}-{term} is no longer on this node")));
        }
        let mut files = Vec::new();
        list_files(&dir, &dir, &mut files)?;
        files.sort();
        Ok(files.into_iter().map(|relative| ChunkSource { path: dir.join(&relative), relative }).collect())
    }

    /// Starts receiving snapshot `index`-`term`, replacing any partial
    /// transfer of it.
    pub fn receive(&self, index: u64, term: u64) -> Result<Receiver, RaftError> {
        let final_dir = self.incoming_dir(index, term);
        let partial = final_dir.with_extension("partial");
        for dir in [&partial, &final_dir] {
            if dir.exists() {
                fs::remove_dir_all(dir).map_err(|error| io_error("remove", dir, &error))?;
            }
        }
        fs::create_dir_all(&partial).map_err(|error| io_error("create", &partial, &error))?;
        Ok(Receiver { index, term, partial, final_dir, current: None, done: false })
    }

    /// Deletes received snapshots other than `keep`.
    pub fn clear_incoming(&self, keep: Option<(u64, u64)>) {
        let keep = keep.map(|(index, term)| folder_name(index, term));
        let dir = self.root.join("incoming");
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if Some(&name) != keep.as_ref() {
                remove_logged(&entry.path());
            }
        }
    }

    fn remove_partial_transfers(&self) {
        for folder in ["local", "incoming"] {
            let Ok(entries) = fs::read_dir(self.root.join(folder)) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.path().extension().is_some_and(|extension| extension == "partial") {
                    remove_logged(&entry.path());
                }
            }
        }
    }

    /// Complete local snapshots as (index, term), oldest first.
    fn local_snapshots(&self) -> Vec<(u64, u64)> {
        let Ok(entries) = fs::read_dir(self.root.join("local")) else {
            return Vec::new();
        };
        let mut snapshots: Vec<(u64, u64)> =
            entries.flatten().filter_map(|entry| parse_folder_name(&entry.file_name().to_string_lossy())).collect();
        snapshots.sort_unstable();
        snapshots
    }

    fn prune_local(&self) {
        let snapshots = self.local_snapshots();
        let excess = snapshots.len().saturating_sub(LOCAL_KEPT);
        for (index, term) in &snapshots[..excess] {
            remove_logged(&self.local_dir(*index, *term));
        }
    }
}

/// A file of a local snapshot, read chunk by chunk.
#[derive(Debug)]
pub struct ChunkSource {
    path: PathBuf,
    relative: String,
}

impl ChunkSource {
    /// Reads the file and calls `send` with each chunk of at most
    /// [`CHUNK_SIZE`] bytes; an empty file gives one empty chunk.
    pub fn for_each_chunk(
        &self,
        mut send: impl FnMut(String, u64, Vec<u8>) -> Result<(), RaftError>,
    ) -> Result<(), RaftError> {
        let mut file = fs::File::open(&self.path).map_err(|error| io_error("open", &self.path, &error))?;
        let mut offset = 0u64;
        loop {
            let mut data = vec![0u8; CHUNK_SIZE];
            let read = read_full(&mut file, &mut data).map_err(|error| io_error("read", &self.path, &error))?;
            data.truncate(read);
            if read == 0 && offset > 0 {
                return Ok(());
            }
            let last = read < CHUNK_SIZE;
            send(self.relative.clone(), offset, data)?;
            offset += read as u64;
            if last {
                return Ok(());
            }
        }
    }
}

/// Writes the chunks of one incoming snapshot.
#[derive(Debug)]
pub struct Receiver {
    index: u64,
    term: u64,
    partial: PathBuf,
    final_dir: PathBuf,
    current: Option<(String, fs::File, u64)>,
    done: bool,
}

impl Receiver {
    /// Writes one chunk. Chunks of a file must arrive in order.
    pub fn write(&mut self, chunk: &Chunk) -> Result<(), RaftError> {
        if self.done {
            return Err(RaftError::Snapshot("a chunk arrived after the last one".to_owned()));
        }
        if (chunk.index, chunk.term) != (self.index, self.term) {
            return Err(RaftError::Snapshot(format!(
                "chunk of snapshot {}-{} in the transfer of {}-{}",
                chunk.index, chunk.term, self.index, self.term
            )));
        }
        let relative = checked_relative_path(&chunk.file)?;
        let switch_file = self.current.as_ref().is_none_or(|(name, _, _)| name != &chunk.file);
        if switch_file {
            if chunk.offset != 0 {
                return Err(RaftError::Snapshot(format!(
                    "file {:?} starts at offset {}, not 0",
                    chunk.file, chunk.offset
                )));
            }
            self.finish_file()?;
            let path = self.partial.join(&relative);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(|error| io_error("create", parent, &error))?;
            }
            let file = fs::File::create_new(&path).map_err(|error| io_error("create", &path, &error))?;
            self.current = Some((chunk.file.clone(), file, 0));
        }
        let Some((name, file, written)) = self.current.as_mut() else {
            return Err(RaftError::Invariant("no open snapshot file".to_owned()));
        };
        if chunk.offset != *written {
            return Err(RaftError::Snapshot(format!(
                "chunk of {name:?} at offset {}, expected {written}",
                chunk.offset
            )));
        }
        file.write_all(&chunk.data).map_err(|error| io_error("write", &self.partial.join(&relative), &error))?;
        *written += chunk.data.len() as u64;
        if chunk.done {
            self.finish()?;
        }
        Ok(())
    }

    /// True once the last chunk was written and the folder is in place.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn finish_file(&mut self) -> Result<(), RaftError> {
        if let Some((name, file, _)) = self.current.take() {
            file.sync_all().map_err(|error| io_error("sync", &self.partial.join(&name), &error))?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), RaftError> {
        self.finish_file()?;
        for required in [METADATA_FILE, PEERS_FILE] {
            if !self.partial.join(required).is_file() {
                return Err(RaftError::Snapshot(format!(
                    "snapshot {}-{} arrived without its {required} file",
                    self.index, self.term
                )));
            }
        }
        fs::rename(&self.partial, &self.final_dir).map_err(|error| io_error("rename", &self.partial, &error))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if !self.done {
            remove_logged(&self.partial);
        }
    }
}

/// Streams every chunk of local snapshot `index`-`term` into `send`.
pub fn stream_snapshot(
    store: &SnapshotStore,
    index: u64,
    term: u64,
    mut send: impl FnMut(Chunk) -> Result<(), RaftError>,
) -> Result<(), RaftError> {
    let sources = store.read_chunks(index, term)?;
    let count = sources.len();
    for (position, source) in sources.iter().enumerate() {
        let mut pending: Option<Chunk> = None;
        source.for_each_chunk(|file, offset, data| {
            if let Some(previous) = pending.take() {
                send(previous)?;
            }
            pending = Some(Chunk { index, term, file, offset, data, done: false });
            Ok(())
        })?;
        if let Some(mut last) = pending {
            last.done = position + 1 == count;
            send(last)?;
        }
    }
    Ok(())
}

/// Accepts only plain relative paths: no `..`, no absolute paths, no
/// hidden components, so a peer cannot write outside the transfer folder.
fn checked_relative_path(file: &str) -> Result<PathBuf, RaftError> {
    let valid = !file.is_empty()
        && file.split('/').all(|part| {
            !part.is_empty()
                && !part.starts_with('.')
                && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        });
    if !valid {
        return Err(RaftError::Snapshot(format!("file name {file:?} in a snapshot is not a plain relative path")));
    }
    Ok(file.split('/').collect())
}

fn list_files(root: &Path, dir: &Path, files: &mut Vec<String>) -> Result<(), RaftError> {
    let entries = fs::read_dir(dir).map_err(|error| io_error("list", dir, &error))?;
    for entry in entries {
        let entry = entry.map_err(|error| io_error("list", dir, &error))?;
        let path = entry.path();
        if path.is_dir() {
            list_files(root, &path, files)?;
        } else {
            let relative = path
                .strip_prefix(root)
                .map_err(|_| RaftError::Invariant(format!("{} is outside {}", path.display(), root.display())))?;
            let parts: Vec<String> =
                relative.components().map(|part| part.as_os_str().to_string_lossy().into_owned()).collect();
            files.push(parts.join("/"));
        }
    }
    Ok(())
}

fn read_full(file: &mut fs::File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..])? {
            0 => break,
            read => filled += read,
        }
    }
    Ok(filled)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), RaftError> {
    let mut file = fs::File::create(path).map_err(|error| io_error("create", path, &error))?;
    file.write_all(bytes).map_err(|error| io_error("write", path, &error))?;
    file.sync_all().map_err(|error| io_error("sync", path, &error))
}

fn folder_name(index: u64, term: u64) -> String {
    format!("{index:020}-{term:020}")
}

fn parse_folder_name(name: &str) -> Option<(u64, u64)> {
    let (index, term) = name.split_once('-')?;
    if term.contains('.') {
        return None;
    }
    Some((index.parse().ok()?, term.parse().ok()?))
}

pub(crate) fn encode_peers(peers: &BTreeMap<u64, String>) -> Vec<u8> {
    peers.iter().map(|(id, address)| format!("{id} {address}\n")).collect::<String>().into_bytes()
}

pub(crate) fn decode_peers(bytes: &[u8]) -> Result<BTreeMap<u64, String>, RaftError> {
    let text = std::str::from_utf8(bytes).map_err(|error| RaftError::Corrupt(format!("peer addresses: {error}")))?;
    let mut peers = BTreeMap::new();
    for line in text.lines() {
        let (id, address) = line
            .split_once(' ')
            .ok_or_else(|| RaftError::Corrupt(format!("peer address line {line:?} has no space")))?;
        let id = id.parse().map_err(|_| RaftError::Corrupt(format!("peer id {id:?} is not a number")))?;
        peers.insert(id, address.to_owned());
    }
    Ok(peers)
}

fn remove_logged(path: &Path) {
    let result = if path.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    if let Err(error) = result {
        tracing::warn!(path = %path.display(), %error, "could not remove an old snapshot");
    }
}

fn io_error(action: &str, path: &Path, error: &std::io::Error) -> RaftError {
    RaftError::Snapshot(format!("{action} {}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(index: u64, term: u64) -> SnapshotMetadata {
        SnapshotMetadata { index, term, ..Default::default() }
    }

    fn take_with_files(store: &SnapshotStore, index: u64, files: &[(&str, Vec<u8>)]) -> PathBuf {
        let peers = BTreeMap::from([(1, "127.0.0.1:1".to_owned())]);
        store
            .take(&metadata(index, 2), &peers, |dir| {
                fs::create_dir_all(dir).expect("create state folder");
                for (name, bytes) in files {
                    fs::write(dir.join(name), bytes).expect("write state file");
                }
                Ok(index)
            })
            .expect("take snapshot")
    }

    #[test]
    fn snapshot_transfer_in_chunks() {
        let source_root = tempfile::tempdir().expect("temp dir");
        let target_root = tempfile::tempdir().expect("temp dir");
        let source = SnapshotStore::open(source_root.path()).expect("open");
        let target = SnapshotStore::open(target_root.path()).expect("open");
        let big: Vec<u8> = (0..(CHUNK_SIZE * 2 + 17)).map(|i| (i % 251) as u8).collect();
        take_with_files(&source, 40, &[("big.sst", big.clone()), ("empty", Vec::new()), ("small", b"abc".to_vec())]);

        let mut receiver = target.receive(40, 2).expect("receive");
        let mut chunks = 0;
        stream_snapshot(&source, 40, 2, |chunk| {
            chunks += 1;
            receiver.write(&chunk)
        })
        .expect("stream");
        assert!(receiver.is_done());
        assert!(chunks >= 6, "expected the big file in 3 chunks plus 3 more files, got {chunks}");

        let arrived = target.incoming_dir(40, 2);
        assert_eq!(fs::read(arrived.join("state/big.sst")).expect("read"), big);
        assert_eq!(fs::read(arrived.join("state/empty")).expect("read"), Vec::<u8>::new());
        assert_eq!(fs::read(arrived.join("state/small")).expect("read"), b"abc");
        assert_eq!(SnapshotStore::read_peers(&arrived).expect("peers")[&1], "127.0.0.1:1");
    }

    #[test]
    fn receiver_rejects_escaping_paths() {
        let root = tempfile::tempdir().expect("temp dir");
        let store = SnapshotStore::open(root.path()).expect("open");
        for name in ["../escape", "/etc/passwd", "state/../../x", ".hidden", "a//b", ""] {
            let mut receiver = store.receive(5, 1).expect("receive");
            let chunk = Chunk { index: 5, term: 1, file: name.to_owned(), offset: 0, data: vec![1], done: false };
            let error = receiver.write(&chunk).expect_err("the path must be refused");
            assert!(error.to_string().contains("not a plain relative path"), "{name}: {error}");
        }
        assert!(!root.path().join("escape").exists());
    }

    #[test]
    fn receiver_rejects_gaps_and_missing_files() {
        let root = tempfile::tempdir().expect("temp dir");
        let store = SnapshotStore::open(root.path()).expect("open");
        let mut receiver = store.receive(5, 1).expect("receive");
        let chunk =
            |offset, done| Chunk { index: 5, term: 1, file: "state/a".to_owned(), offset, data: vec![1, 2], done };
        receiver.write(&chunk(0, false)).expect("first chunk");
        let error = receiver.write(&chunk(7, false)).expect_err("a gap must be refused");
        assert!(error.to_string().contains("expected 2"), "{error}");
        let error = receiver.write(&chunk(2, true)).expect_err("metadata and peers are missing");
        assert!(error.to_string().contains("without its metadata file"), "{error}");
        assert!(!store.incoming_dir(5, 1).exists());
    }

    #[test]
    fn local_snapshots_pruned() {
        let root = tempfile::tempdir().expect("temp dir");
        let store = SnapshotStore::open(root.path()).expect("open");
        for index in [10, 20, 30] {
            take_with_files(&store, index, &[("f", vec![index as u8])]);
        }
        assert!(!store.local_dir(10, 2).exists());
        assert!(store.local_dir(20, 2).exists());
        assert_eq!(store.latest_local().expect("latest").index, 30);
    }

    #[test]
    fn descriptor_round_trip() {
        assert_eq!(parse_descriptor(&descriptor(7, 3)).expect("parse"), (7, 3));
        let error = parse_descriptor(&[1, 2, 3]).expect_err("3 bytes is not a descriptor");
        assert!(error.to_string().contains("3 bytes"), "{error}");
    }
}
