//! Tests against a real RocksDB database in a temporary directory.

use std::sync::Arc;

use ring::digest::{SHA256, digest};
use tokio::sync::oneshot;

use super::writer::{self, Pending};
use super::*;

pub(super) const HOUR: i64 = 3600;
/// A fixed notAfter far from the purge tests' cutoffs: 2033-05-18T03:00:00Z.
pub(super) const NOT_AFTER: i64 = 2_000_000_000 - 2_000_000_000 % HOUR;

pub(super) fn serial(n: u32) -> Vec<u8> {
    let mut bytes = vec![0x01];
    bytes.extend_from_slice(&n.to_be_bytes());
    bytes
}

pub(super) fn record_with(serial: Vec<u8>, not_after_unix: i64) -> IssuanceRecord {
    IssuanceRecord {
        cert_sha256: digest(&SHA256, &serial).as_ref().to_vec(),
        serial,
        spiffe_id: "spiffe://example.org/workload/api".to_owned(),
        not_after_unix,
        issued_at_unix: not_after_unix - HOUR,
        caller: "spiffe://example.org/spire/agent/node-1".to_owned(),
        profile: "x509_svid".to_owned(),
    }
}

pub(super) fn record(n: u32) -> IssuanceRecord {
    record_with(serial(n), NOT_AFTER)
}

pub(super) fn install_ca(label: &str) -> Command {
    Command::install_ca(InstallCa {
        key_label: label.to_owned(),
        intermediates_der: vec![vec![0x30, 0x01, 0x01], vec![0x30, 0x01, 0x02]],
        roots_der: vec![vec![0x30, 0x01, 0x03]],
        installed_at_unix: 1_700_000_000,
        ..InstallCa::default()
    })
}

pub(super) fn open(dir: &tempfile::TempDir) -> Ledger {
    Ledger::open(dir.path().join("ledger")).expect("open ledger")
}

fn raw_serial_entry(ledger: &Ledger, serial: &[u8]) -> Option<Vec<u8>> {
    ledger
        .machine
        .with_store(|store| {
            Ok(store.db.get_cf(store.cf(keys::CF_SERIALS), serial).expect("read serials column family"))
        })
        .expect("open database")
}

fn compact_serials(ledger: &Ledger) {
    ledger
        .machine
        .with_store(|store| {
            store.db.compact_range_cf(store.cf(keys::CF_SERIALS), None::<&[u8]>, None::<&[u8]>);
            Ok(())
        })
        .expect("open database");
}

fn expect_duplicate(result: Result<ApplyOutcome, LedgerError>, expected_serial: &[u8]) {
    match result {
        Err(LedgerError::DuplicateSerial { serial_hex }) => {
            assert_eq!(serial_hex, hex::encode(expected_serial));
        }
        other => panic!("expected a duplicate serial error, got {other:?}"),
    }
}

#[test]
fn install_ca_activates_new_version() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    assert_eq!(ledger.active_ca().expect("read active CA"), None);

    let first = ledger.apply(&install_ca("key-1")).expect("install first CA");
    assert_eq!(first.index, 1);
    assert_eq!(first.result, CommandResult::CaInstalled { version: 1, already_installed: false });
    let second = ledger.apply(&install_ca("key-2")).expect("install second CA");
    assert_eq!(second.result, CommandResult::CaInstalled { version: 2, already_installed: false });

    let active = ledger.active_ca().expect("read active CA").expect("active CA");
    assert_eq!(active.version, 2);
    assert_eq!(active.key_label, "key-2");
    assert_eq!(active.installed_at_index, 2);
    assert_eq!(active.intermediates_der.len(), 2);
    assert_eq!(active.roots_der, vec![vec![0x30, 0x01, 0x03]]);
    let versions = ledger.ca_versions().expect("list CA versions");
    let numbers: Vec<u64> = versions.iter().map(|version| version.version).collect();
    assert_eq!(numbers, vec![1, 2]);
    assert_eq!(ledger.applied_index(), 2);
}

#[test]
fn install_ca_rejects_missing_fields() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    let command = Command::install_ca(InstallCa {
        key_label: "key-1".to_owned(),
        intermediates_der: vec![],
        roots_der: vec![vec![0x30]],
        installed_at_unix: 0,
        ..InstallCa::default()
    });

    let error = ledger.apply(&command).expect_err("empty intermediates must be rejected");
    assert!(error.is_rejection());
    assert!(error.to_string().contains("intermediates_der is empty"), "{error}");
    assert_eq!(ledger.applied_index(), 1);
    assert_eq!(ledger.active_ca().expect("read active CA"), None);
}

#[test]
fn record_and_read_back() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    let records = vec![record(1), record(2)];

    let outcome = ledger.apply(&Command::record_issuances(records.clone())).expect("record issuances");
    assert_eq!(outcome.result, CommandResult::IssuancesRecorded { count: 2, already_recorded: 0 });
    for expected in &records {
        let stored = ledger.issuance(&expected.serial).expect("read issuance");
        assert_eq!(stored.as_ref(), Some(expected));
    }
    assert_eq!(ledger.issuance(&serial(3)).expect("read issuance"), None);
    assert_eq!(ledger.issuance_count(), 2);
    assert_ne!(ledger.digest(), [0; 32]);
}

#[test]
fn reopen_keeps_state() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    ledger.apply(&install_ca("key-1")).expect("install CA");
    ledger.apply(&Command::record_issuances(vec![record(1), record(2)])).expect("record issuances");
    let index = ledger.applied_index();
    let digest = ledger.digest();
    ledger.close();

    let ledger = open(&dir);
    assert_eq!(ledger.applied_index(), index);
    assert_eq!(ledger.digest(), digest);
    assert_eq!(ledger.issuance_count(), 2);
    assert_eq!(ledger.issuance(&serial(2)).expect("read issuance"), Some(record(2)));
    let active = ledger.active_ca().expect("read active CA").expect("active CA");
    assert_eq!(active.key_label, "key-1");

    let next = ledger.apply(&install_ca("key-2")).expect("install CA after reopen");
    assert_eq!(next.index, index + 1);
    assert_eq!(next.result, CommandResult::CaInstalled { version: 2, already_installed: false });
}

#[test]
fn duplicate_in_ledger_rejected() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    ledger.apply(&Command::record_issuances(vec![record(1)])).expect("record first issuance");
    let digest_before = ledger.digest();

    let other_certificate = record_with(serial(1), NOT_AFTER + HOUR);
    let result = ledger.apply(&Command::record_issuances(vec![record(2), other_certificate]));
    expect_duplicate(result, &serial(1));

    assert_eq!(ledger.applied_index(), 2);
    assert_ne!(ledger.digest(), digest_before);
    assert_eq!(ledger.issuance(&serial(2)).expect("read issuance"), None);
    assert_eq!(ledger.issuance_count(), 1);
    assert_eq!(ledger.stats().rejected_commands, 1);
}

#[test]
fn duplicate_within_batch_rejected() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);

    let other_certificate = record_with(serial(7), NOT_AFTER + HOUR);
    let result = ledger.apply(&Command::record_issuances(vec![record(7), record(8), other_certificate]));
    expect_duplicate(result, &serial(7));

    assert_eq!(ledger.applied_index(), 1);
    assert_eq!(ledger.issuance(&serial(7)).expect("read issuance"), None);
    assert_eq!(ledger.issuance(&serial(8)).expect("read issuance"), None);
    assert_eq!(ledger.issuance_count(), 0);
}

#[test]
fn undecodable_command_consumes_index() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);

    let error = ledger.apply_encoded(&[0xff, 0xff, 0xff]).expect_err("garbage bytes must be rejected");
    assert!(matches!(error, LedgerError::InvalidCommand { .. }), "{error:?}");
    let error = ledger.apply(&Command { kind: None }).expect_err("a command without kind must be rejected");
    assert!(error.is_rejection());
    assert_eq!(ledger.applied_index(), 2);
}

#[tokio::test]
async fn record_rejects_invalid_record_before_queueing() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    let mut bad = record(1);
    bad.serial = vec![0; 21];

    let error = ledger.record(bad).await.expect_err("21-byte serial must fail");
    assert!(matches!(error, LedgerError::InvalidRecord { field: "serial", .. }), "{error:?}");
    assert_eq!(ledger.applied_index(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_under_concurrency() {
    const TASKS: u32 = 64;
    const PER_TASK: u32 = 100;
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = Arc::new(open(&dir));

    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let ledger = Arc::clone(&ledger);
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_TASK {
                ledger.record(record(task * PER_TASK + i)).await?;
            }
            Ok::<(), LedgerError>(())
        }));
    }
    for task in tasks {
        task.await.expect("join task").expect("record all issuances");
    }

    let total = u64::from(TASKS * PER_TASK);
    let stats = ledger.stats();
    assert_eq!(stats.records_written, total);
    assert_eq!(stats.issuance_count, total);
    assert!(
        stats.batches_written < total,
        "expected shared batches, got {} batches for {total} records",
        stats.batches_written
    );
    assert!(stats.largest_batch > 1);
    assert!(stats.largest_batch <= MAX_BATCH_RECORDS as u64);

    let ledger = Arc::try_unwrap(ledger).unwrap_or_else(|_| panic!("ledger still shared"));
    ledger.close();
    let ledger = open(&dir);
    assert_eq!(ledger.issuance_count(), total);
    for n in 0..TASKS * PER_TASK {
        let stored = ledger.issuance(&serial(n)).expect("read issuance");
        assert_eq!(stored, Some(record(n)), "serial {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_duplicate_fails_only_its_waiter() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = Arc::new(open(&dir));
    ledger.record(record(1000)).await.expect("record first issuance");

    // Task 100 records another certificate with the stored serial 1000.
    let mut tasks = Vec::new();
    for n in 0..200u32 {
        let ledger = Arc::clone(&ledger);
        let record = if n == 100 { record_with(serial(1000), NOT_AFTER + HOUR) } else { record(n) };
        tasks.push(tokio::spawn(async move { (n, ledger.record(record).await) }));
    }
    for task in tasks {
        let (n, result) = task.await.expect("join task");
        if n == 100 {
            assert!(
                matches!(&result, Err(LedgerError::DuplicateSerial { serial_hex })
                    if *serial_hex == hex::encode(serial(1000))),
                "{result:?}"
            );
        } else {
            result.expect("record unique serial");
        }
    }
    assert_eq!(ledger.issuance_count(), 200);
}

/// Drives one batch through the writer directly, so the duplicates are in
/// the same entry regardless of thread timing.
#[test]
fn writer_fails_only_duplicate_records() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    ledger.apply(&Command::record_issuances(vec![record(1000)])).expect("record first issuance");

    // Positions 2 and 5 hold other certificates with the serials 1000
    // (stored) and 5 (position 3).
    let serials = [1, 2, 1000, 5, 3, 5, 4];
    let mut batch = Vec::new();
    let mut results = Vec::new();
    for (position, n) in serials.into_iter().enumerate() {
        let record = if position == 2 || position == 5 { record_with(serial(n), NOT_AFTER + HOUR) } else { record(n) };
        let (done, result) = oneshot::channel();
        batch.push(Pending { record, done });
        results.push(result);
    }
    writer::commit(&ledger.machine, batch);

    let outcomes: Vec<Result<(), LedgerError>> =
        results.into_iter().map(|mut result| result.try_recv().expect("waiter completed")).collect();
    for (position, outcome) in outcomes.iter().enumerate() {
        if position == 2 || position == 5 {
            assert!(
                matches!(outcome, Err(LedgerError::DuplicateSerial { serial_hex })
                    if *serial_hex == hex::encode(serial(serials[position]))),
                "position {position}: {outcome:?}"
            );
        } else {
            assert!(outcome.is_ok(), "position {position}: {outcome:?}");
        }
    }
    let stats = ledger.stats();
    assert_eq!(stats.rejected_commands, 2);
    assert_eq!(stats.batches_written, 2);
    assert_eq!(stats.largest_batch, 5);
    assert_eq!(ledger.issuance_count(), 6);
    assert_eq!(ledger.applied_index(), 2);
    assert_eq!(ledger.issuance(&serial(5)).expect("read issuance"), Some(record(5)));
    assert_eq!(ledger.issuance(&serial(1000)).expect("read issuance"), Some(record(1000)));
}

#[test]
fn purge_drops_expired_buckets() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    let base = NOT_AFTER;
    let expired = [record_with(serial(1), base), record_with(serial(2), base + HOUR - 1)];
    let partial_hour = record_with(serial(3), base + HOUR + 10);
    let later = record_with(serial(4), base + 5 * HOUR);
    let mut all = expired.to_vec();
    all.push(partial_hour.clone());
    all.push(later.clone());
    ledger.apply(&Command::record_issuances(all)).expect("record issuances");

    // Cutoff is inside the hour of `partial_hour`, which therefore stays.
    let outcome = ledger.apply(&Command::purge_expired(base + HOUR + 20)).expect("purge expired");
    assert_eq!(
        outcome.result,
        CommandResult::ExpiredPurged { cutoff_unix: (base + HOUR) as u64, records_removed: 2, kv_removed: 0 }
    );
    assert_eq!(ledger.issuance(&serial(1)).expect("read issuance"), None);
    assert_eq!(ledger.issuance(&serial(2)).expect("read issuance"), None);
    assert_eq!(ledger.issuance(&serial(3)).expect("read issuance"), Some(partial_hour));
    assert_eq!(ledger.issuance(&serial(4)).expect("read issuance"), Some(later));
    assert_eq!(ledger.issuance_count(), 2);

    let repeated = ledger.apply(&Command::purge_expired(base)).expect("purge with older cutoff");
    assert_eq!(
        repeated.result,
        CommandResult::ExpiredPurged { cutoff_unix: (base + HOUR) as u64, records_removed: 0, kv_removed: 0 }
    );
}

#[test]
fn purged_serial_can_be_recorded_again() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    let base = NOT_AFTER;
    ledger
        .apply(&Command::record_issuances(vec![record_with(serial(1), base), record_with(serial(2), base + 10 * HOUR)]))
        .expect("record issuances");
    ledger.apply(&Command::purge_expired(base + HOUR)).expect("purge expired");

    assert!(raw_serial_entry(&ledger, &serial(1)).is_some());
    compact_serials(&ledger);
    assert_eq!(raw_serial_entry(&ledger, &serial(1)), None);
    assert!(raw_serial_entry(&ledger, &serial(2)).is_some());

    let again = record_with(serial(1), base + 3 * HOUR);
    ledger.apply(&Command::record_issuances(vec![again.clone()])).expect("record purged serial again");
    assert_eq!(ledger.issuance(&serial(1)).expect("read issuance"), Some(again));
    compact_serials(&ledger);
    assert!(raw_serial_entry(&ledger, &serial(1)).is_some());
    expect_duplicate(
        ledger.apply(&Command::record_issuances(vec![record_with(serial(1), base + 4 * HOUR)])),
        &serial(1),
    );
    assert_eq!(ledger.issuance_count(), 2);
}

#[test]
fn purge_state_survives_reopen() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    let base = NOT_AFTER;
    ledger.apply(&Command::record_issuances(vec![record_with(serial(1), base)])).expect("record issuance");
    ledger.apply(&Command::purge_expired(base + HOUR)).expect("purge expired");
    ledger.close();

    let ledger = open(&dir);
    assert_eq!(ledger.stats().purge_cutoff_unix, (base + HOUR) as u64);
    assert_eq!(ledger.issuance(&serial(1)).expect("read issuance"), None);
    assert_eq!(ledger.issuance_count(), 0);
    let error = ledger
        .apply(&Command::record_issuances(vec![record_with(serial(9), base)]))
        .expect_err("a record expiring before the cutoff must be rejected");
    assert!(matches!(error, LedgerError::InvalidRecord { field: "not_after_unix", .. }), "{error:?}");
    ledger
        .apply(&Command::record_issuances(vec![record_with(serial(1), base + HOUR)]))
        .expect("record purged serial after reopen");
}

fn feed(ledger: &Ledger, commands: &[Command]) {
    for command in commands {
        // Rejections are part of the history, so their errors are ignored.
        let _ = ledger.apply(command);
    }
}

#[test]
fn digest_depends_only_on_commands() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("create temp dir")).collect();
    let ledgers: Vec<Ledger> = dirs.iter().map(open).collect();
    let commands = vec![
        install_ca("key-1"),
        Command::record_issuances(vec![record(1), record(2)]),
        Command::record_issuances(vec![record(2)]),
        Command::purge_expired(NOT_AFTER + HOUR),
        Command::record_issuances(vec![record_with(serial(1), NOT_AFTER + 2 * HOUR)]),
    ];
    feed(&ledgers[0], &commands);
    feed(&ledgers[1], &commands);
    let mut different = commands.clone();
    different[2] = Command::record_issuances(vec![record(3)]);
    feed(&ledgers[2], &different);

    assert_eq!(ledgers[0].applied_index(), 5);
    assert_eq!(ledgers[0].digest(), ledgers[1].digest());
    assert_eq!(ledgers[2].applied_index(), 5);
    assert_ne!(ledgers[0].digest(), ledgers[2].digest());
}

#[test]
fn digest_chains_index_and_bytes() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    let command = install_ca("key-1");
    let bytes = command.encode_to_vec();

    let outcome = ledger.apply(&command).expect("install CA");

    let mut input = vec![0u8; 32];
    input.extend_from_slice(&1u64.to_be_bytes());
    input.extend_from_slice(&u32::try_from(bytes.len()).expect("short command").to_be_bytes());
    input.extend_from_slice(&bytes);
    assert_eq!(outcome.digest.as_slice(), digest(&SHA256, &input).as_ref());
    assert_eq!(ledger.digest(), outcome.digest);
}

#[test]
fn prepared_ca_version_is_not_active() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    ledger.apply(&install_ca("key-1")).expect("install the first version");
    let prepared = Command::install_ca(InstallCa {
        key_label: "key-2".to_owned(),
        intermediates_der: vec![vec![0x30, 0x01, 0x04]],
        roots_der: vec![vec![0x30, 0x01, 0x05]],
        installed_at_unix: 1_700_000_100,
        activate_at_unix: 1_700_003_700,
        wrapped_key: vec![1, 2, 3],
    });
    let mut changes = ledger.watch_bundle();
    changes.borrow_and_update();

    ledger.apply(&prepared).expect("prepare the second version");
    assert!(changes.has_changed().expect("the ledger is open"), "a CA version wakes bundle watchers");
    assert_eq!(ledger.active_ca().expect("read").expect("active").key_label, "key-1");
    let versions = ledger.ca_versions().expect("list versions");
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[1].activate_at_unix, 1_700_003_700);
    assert_eq!(versions[1].wrapped_key, [1, 2, 3]);

    let again = ledger.apply(&prepared).expect("a retried prepare succeeds");
    assert_eq!(again.result, CommandResult::CaInstalled { version: 2, already_installed: true });
    assert_eq!(ledger.ca_versions().expect("list versions").len(), 2, "a retry adds no version");
}
