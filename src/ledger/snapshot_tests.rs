//! Tests of `Ledger::checkpoint` and `Ledger::restore`, the snapshots Raft
//! sends to lagging nodes, against real RocksDB databases.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use prost::Message;

use super::keys::{CF_META, META_SCHEMA_VERSION};
use super::store::{OpenMode, Store};
use super::tests::{HOUR, NOT_AFTER, install_ca, open, record, record_with, serial};
use super::*;

fn apply(ledger: &Ledger, index: u64, commands: &[Command]) {
    let encoded: Vec<Vec<u8>> = commands.iter().map(Message::encode_to_vec).collect();
    let slices: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
    let outcomes = ledger.apply_entry(index, &slices).expect("apply entry");
    for (position, outcome) in outcomes.iter().enumerate() {
        assert!(outcome.is_ok(), "entry {index}, command {position}: {outcome:?}");
    }
}

fn records(serials: std::ops::Range<u32>) -> Command {
    Command::record_issuances(serials.map(record).collect())
}

/// Fills a ledger with a CA, records and a purge, over skipped indexes.
fn fill_source(ledger: &Ledger) {
    apply(ledger, 1, &[install_ca("key-1"), records(0..100)]);
    apply(ledger, 3, &[Command::record_issuances(vec![record_with(serial(500), NOT_AFTER - 3 * HOUR)])]);
    apply(ledger, 4, &[Command::purge_expired(NOT_AFTER - HOUR), records(100..200)]);
}

fn checkpoint_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("checkpoint")
}

/// Asserts that every read method returns the same value on both ledgers.
fn assert_same_state(restored: &Ledger, source: &Ledger) {
    assert_eq!(restored.applied_index(), source.applied_index());
    assert_eq!(restored.digest(), source.digest());
    assert_eq!(restored.issuance_count(), source.issuance_count());
    assert_eq!(restored.ca_versions().expect("list CA versions"), source.ca_versions().expect("list CA versions"));
    assert_eq!(restored.active_ca().expect("read active CA"), source.active_ca().expect("read active CA"));
    assert_eq!(restored.stats().purge_cutoff_unix, source.stats().purge_cutoff_unix);
    for n in (0..200).chain([500]) {
        let restored_record = restored.issuance(&serial(n)).expect("read restored issuance");
        assert_eq!(restored_record, source.issuance(&serial(n)).expect("read source issuance"), "serial {n}");
    }
}

fn table_files(dir: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(dir).expect("list checkpoint folder");
    let paths = entries.map(|entry| entry.expect("read folder entry").path());
    paths.filter(|path| path.extension().is_some_and(|extension| extension == "sst")).collect()
}

#[test]
fn checkpoint_restores_into_other_ledger() {
    let source_dir = tempfile::tempdir().expect("create temp dir");
    let target_dir = tempfile::tempdir().expect("create temp dir");
    let source = open(&source_dir);
    let target = open(&target_dir);
    fill_source(&source);
    apply(&target, 1, &[install_ca("other-key"), records(1000..1010)]);
    let checkpoint = checkpoint_path(&source_dir);

    let index = source.checkpoint(&checkpoint).expect("create checkpoint");
    assert_eq!(index, 4);
    target.restore(&checkpoint).expect("restore checkpoint");

    assert_same_state(&target, &source);
    assert_eq!(target.issuance(&serial(1000)).expect("read issuance"), None);
    assert_eq!(target.issuance(&serial(500)).expect("read issuance"), None, "purged in the source");
    assert!(!checkpoint.exists(), "restore moves the checkpoint into place");

    // Both keep working, and the same next entry keeps their digests equal.
    let next = [Command::record_issuances(vec![record(300)]), Command::purge_expired(NOT_AFTER)];
    apply(&source, 6, &next);
    apply(&target, 6, &next);
    assert_same_state(&target, &source);
    apply(&source, 7, &[records(400..410)]);
    assert_eq!(target.issuance(&serial(400)).expect("read issuance"), None);
    assert_eq!(source.issuance(&serial(400)).expect("read issuance"), Some(record(400)));

    let digest = target.digest();
    target.close();
    let target = open(&target_dir);
    assert_eq!(target.applied_index(), 6);
    assert_eq!(target.digest(), digest);
    assert_eq!(target.issuance(&serial(300)).expect("read issuance"), Some(record(300)));
}

#[test]
fn checkpoint_rejects_existing_path() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    let checkpoint = checkpoint_path(&dir);
    std::fs::create_dir(&checkpoint).expect("create folder");

    let error = ledger.checkpoint(&checkpoint).expect_err("an existing path must be rejected");

    assert!(matches!(error, LedgerError::Filesystem { .. }), "{error:?}");
    assert!(error.to_string().contains(&checkpoint.display().to_string()), "{error}");
}

/// Checkpoint cost must not grow with the number of records, so its table
/// files must be hard links to the ledger's, not copies of the records.
#[test]
fn checkpoint_hard_links_table_files() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    apply(&ledger, 1, &[records(0..1000)]);
    apply(&ledger, 2, &[records(1000..2000)]);
    let checkpoint = checkpoint_path(&dir);

    ledger.checkpoint(&checkpoint).expect("create checkpoint");

    let tables = table_files(&checkpoint);
    assert!(!tables.is_empty(), "the checkpoint has no table files");
    for table in tables {
        let links = std::fs::metadata(&table).expect("read table file metadata").nlink();
        assert!(links >= 2, "{} has {links} link, expected a hard link to the ledger's file", table.display());
    }
}

#[test]
fn restore_while_readers_hold_ledger() {
    const READERS: usize = 4;
    let source_dir = tempfile::tempdir().expect("create temp dir");
    let target_dir = tempfile::tempdir().expect("create temp dir");
    let source = open(&source_dir);
    fill_source(&source);
    let checkpoint = checkpoint_path(&source_dir);
    source.checkpoint(&checkpoint).expect("create checkpoint");
    let target = Arc::new(open(&target_dir));
    apply(&target, 1, &[records(1000..1100)]);

    let started = Arc::new(Barrier::new(READERS + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let ledger = Arc::clone(&target);
            let started = Arc::clone(&started);
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut reads = 0u64;
                let mut waited = false;
                loop {
                    let finished = stop.load(Ordering::Acquire);
                    ledger.issuance(&serial(1000)).expect("read issuance during restore");
                    ledger.issuance(&serial(150)).expect("read issuance during restore");
                    ledger.ca_versions().expect("list CA versions during restore");
                    ledger.active_ca().expect("read active CA during restore");
                    let _ = ledger.stats();
                    reads += 1;
                    if !waited {
                        started.wait();
                        waited = true;
                    }
                    if finished {
                        return reads;
                    }
                }
            })
        })
        .collect();

    started.wait();
    target.restore(&checkpoint).expect("restore while readers run");
    stop.store(true, Ordering::Release);
    for reader in readers {
        let reads = reader.join().expect("reader thread panicked");
        assert!(reads >= 2, "reader stopped after {reads} reads");
    }

    assert_same_state(&target, &source);
    assert_eq!(target.issuance(&serial(1000)).expect("read issuance"), None);
}

#[test]
fn failed_restore_keeps_previous_state() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    apply(&ledger, 1, &[install_ca("key-1"), records(0..10)]);
    let digest = ledger.digest();

    let missing = dir.path().join("missing");
    let error = ledger.restore(&missing).expect_err("a missing checkpoint must be rejected");
    assert!(error.to_string().contains(&missing.display().to_string()), "{error}");

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("create folder");
    let error = ledger.restore(&empty).expect_err("an empty folder must be rejected");
    assert!(matches!(error, LedgerError::Storage { .. }), "{error:?}");
    assert!(empty.is_dir(), "a failed restore leaves the checkpoint in place");

    let ledger_folder = dir.path().join("ledger");
    let error = ledger.restore(&ledger_folder).expect_err("the ledger's own folder must be rejected");
    assert!(matches!(error, LedgerError::Filesystem { .. }), "{error:?}");

    assert_eq!(ledger.applied_index(), 1);
    assert_eq!(ledger.digest(), digest);
    assert_eq!(ledger.issuance(&serial(3)).expect("read issuance"), Some(record(3)));
    apply(&ledger, 2, &[records(10..20)]);
    assert_eq!(ledger.issuance_count(), 20);
    assert!(!dir.path().join("ledger.restore-old").exists());
}

#[test]
fn restore_checks_schema_version() {
    let source_dir = tempfile::tempdir().expect("create temp dir");
    let source = open(&source_dir);
    fill_source(&source);
    let checkpoint = checkpoint_path(&source_dir);
    source.checkpoint(&checkpoint).expect("create checkpoint");
    {
        let (store, _) = Store::open(&checkpoint, OpenMode::Existing).expect("open checkpoint");
        store.db.put_cf(store.cf(CF_META), META_SCHEMA_VERSION, 99u64.to_be_bytes()).expect("write schema version");
    }
    let target_dir = tempfile::tempdir().expect("create temp dir");
    let target = open(&target_dir);
    apply(&target, 1, &[records(1000..1010)]);

    let error = target.restore(&checkpoint).expect_err("an unknown schema version must be rejected");

    assert!(matches!(error, LedgerError::UnsupportedSchema { found: 99, .. }), "{error:?}");
    assert!(checkpoint.is_dir(), "a failed restore leaves the checkpoint in place");
    assert_eq!(target.applied_index(), 1);
    assert_eq!(target.issuance(&serial(1005)).expect("read issuance"), Some(record(1005)));
    apply(&target, 2, &[records(1010..1020)]);
    assert_eq!(target.issuance_count(), 20);
}

/// /dev/shm is a tmpfs, so moving the checkpoint from there fails with
/// EXDEV and restore copies it. Where /dev/shm shares the ledger's
/// filesystem, the test covers the move instead.
#[test]
fn restore_copies_checkpoint_from_other_filesystem() {
    let source_dir = tempfile::tempdir().expect("create temp dir");
    let source = open(&source_dir);
    fill_source(&source);
    let checkpoint = checkpoint_path(&source_dir);
    source.checkpoint(&checkpoint).expect("create checkpoint");
    let other_filesystem = tempfile::tempdir_in("/dev/shm").expect("create temp dir in /dev/shm");
    let copied = other_filesystem.path().join("checkpoint");
    std::fs::create_dir(&copied).expect("create folder");
    for entry in std::fs::read_dir(&checkpoint).expect("list checkpoint") {
        let entry = entry.expect("read folder entry");
        std::fs::copy(entry.path(), copied.join(entry.file_name())).expect("copy checkpoint file");
    }
    let target_dir = tempfile::tempdir().expect("create temp dir");
    let target = open(&target_dir);

    target.restore(&copied).expect("restore from another filesystem");

    assert_same_state(&target, &source);
    assert!(!copied.exists(), "restore removes the copied checkpoint");
    assert!(!target_dir.path().join("ledger.restore-new").exists());
    apply(&target, 5, &[records(300..310)]);
    assert_eq!(target.issuance(&serial(305)).expect("read issuance"), Some(record(305)));
}

#[test]
fn open_recovers_interrupted_restore() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    apply(&ledger, 1, &[records(0..10)]);
    let digest = ledger.digest();
    ledger.close();
    let path = dir.path().join("ledger");
    std::fs::rename(&path, dir.path().join("ledger.restore-old")).expect("move ledger aside");

    let ledger = open(&dir);

    assert_eq!(ledger.applied_index(), 1);
    assert_eq!(ledger.digest(), digest);
    assert_eq!(ledger.issuance(&serial(7)).expect("read issuance"), Some(record(7)));
    assert!(!dir.path().join("ledger.restore-old").exists());
}
