//! Tests of `Ledger::apply_entry`, the interface Raft applies committed
//! entries through, against a real RocksDB database.

use prost::Message;
use ring::digest::{SHA256, digest};

use super::tests::{HOUR, NOT_AFTER, install_ca, open, record, record_with, serial};
use super::*;

type Outcomes = Vec<Result<CommandResult, LedgerError>>;

fn encode(commands: &[Command]) -> Vec<Vec<u8>> {
    commands.iter().map(Message::encode_to_vec).collect()
}

fn apply(ledger: &Ledger, index: u64, commands: &[Command]) -> Outcomes {
    let encoded = encode(commands);
    apply_bytes(ledger, index, &encoded)
}

fn apply_bytes(ledger: &Ledger, index: u64, encoded: &[Vec<u8>]) -> Outcomes {
    let slices: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
    ledger.apply_entry(index, &slices).expect("apply entry")
}

fn records_command(records: &[IssuanceRecord]) -> Command {
    Command::record_issuances(records.to_vec())
}

fn recorded(count: u64, already_recorded: u64) -> CommandResult {
    CommandResult::IssuancesRecorded { count, already_recorded }
}

fn expect_result(outcome: &Result<CommandResult, LedgerError>, expected: CommandResult) {
    assert!(matches!(outcome, Ok(result) if *result == expected), "expected {expected:?}, got {outcome:?}");
}

fn expect_duplicate(outcome: &Result<CommandResult, LedgerError>, expected_serial: &[u8]) {
    assert!(
        matches!(outcome, Err(LedgerError::DuplicateSerial { serial_hex }) if *serial_hex == hex::encode(expected_serial)),
        "expected a duplicate of serial {}, got {outcome:?}",
        hex::encode(expected_serial)
    );
}

fn expect_invalid_record(outcome: &Result<CommandResult, LedgerError>, expected_field: &str) {
    assert!(
        matches!(outcome, Err(LedgerError::InvalidRecord { field, .. }) if *field == expected_field),
        "expected an invalid {expected_field}, got {outcome:?}"
    );
}

#[test]
fn entry_returns_result_per_command() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    let mut encoded = encode(&[install_ca("key-1"), records_command(&[record(1), record(2)])]);
    encoded.push(vec![0xff, 0xff, 0xff]);
    encoded.extend(encode(&[Command::purge_expired(NOT_AFTER - HOUR), records_command(&[record(3)])]));

    let outcomes = apply_bytes(&ledger, 1, &encoded);

    assert_eq!(outcomes.len(), 5);
    expect_result(&outcomes[0], CommandResult::CaInstalled { version: 1, already_installed: false });
    expect_result(&outcomes[1], recorded(2, 0));
    assert!(matches!(outcomes[2], Err(LedgerError::InvalidCommand { .. })), "{:?}", outcomes[2]);
    let purge_cutoff = (NOT_AFTER - HOUR) as u64;
    expect_result(
        &outcomes[3],
        CommandResult::ExpiredPurged { cutoff_unix: purge_cutoff, records_removed: 0, kv_removed: 0 },
    );
    expect_result(&outcomes[4], recorded(1, 0));
    assert_eq!(ledger.applied_index(), 1);
    assert_eq!(ledger.issuance_count(), 3);
    assert_eq!(ledger.stats().rejected_commands, 1);
    assert_eq!(ledger.stats().batches_written, 1);
    assert_eq!(ledger.stats().largest_batch, 3);
}

#[test]
fn entry_without_kind_fails_alone() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);

    let outcomes = apply(&ledger, 1, &[Command { kind: None }, records_command(&[record(1)])]);

    assert!(matches!(&outcomes[0], Err(error) if error.is_rejection()), "{:?}", outcomes[0]);
    expect_result(&outcomes[1], recorded(1, 0));
}

#[test]
fn entry_indexes_may_skip() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);

    apply(&ledger, 5, &[install_ca("key-1")]);
    assert_eq!(ledger.applied_index(), 5);
    apply(&ledger, 9, &[records_command(&[record(1)])]);
    assert_eq!(ledger.applied_index(), 9);

    let active = ledger.active_ca().expect("read active CA").expect("active CA");
    assert_eq!(active.installed_at_index, 5);
    let digest = ledger.digest();
    ledger.close();
    let ledger = open(&dir);
    assert_eq!(ledger.applied_index(), 9);
    assert_eq!(ledger.digest(), digest);
}

#[test]
fn empty_entry_keeps_digest() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    apply(&ledger, 1, &[install_ca("key-1")]);
    let digest = ledger.digest();

    let outcomes = ledger.apply_entry(2, &[]).expect("apply empty entry");

    assert!(outcomes.is_empty());
    assert_eq!(ledger.applied_index(), 2);
    assert_eq!(ledger.digest(), digest);
    ledger.close();
    let ledger = open(&dir);
    assert_eq!(ledger.applied_index(), 2);
    assert_eq!(ledger.digest(), digest);
}

#[test]
fn entry_digest_chains_lengths_and_bytes() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    let encoded = encode(&[install_ca("key-1"), records_command(&[record(1)])]);

    apply_bytes(&ledger, 7, &encoded);

    let mut input = vec![0u8; 32];
    input.extend_from_slice(&7u64.to_be_bytes());
    for command in &encoded {
        input.extend_from_slice(&u32::try_from(command.len()).expect("short command").to_be_bytes());
        input.extend_from_slice(command);
    }
    assert_eq!(ledger.digest().as_slice(), digest(&SHA256, &input).as_ref());
}

#[test]
fn digests_match_only_for_same_entries() {
    let entries = |second_record: IssuanceRecord, second_index: u64| {
        vec![
            (1, vec![install_ca("key-1"), records_command(&[record(1)])]),
            (second_index, vec![records_command(&[second_record]), Command::purge_expired(NOT_AFTER)]),
            (second_index + 1, vec![]),
        ]
    };
    let histories = [
        entries(record(2), 2),
        entries(record(2), 2),
        entries(record(3), 2),
        // Same commands at another index.
        entries(record(2), 3),
    ];
    let dirs: Vec<_> = histories.iter().map(|_| tempfile::tempdir().expect("create temp dir")).collect();
    let ledgers: Vec<Ledger> = dirs.iter().map(open).collect();
    for (ledger, history) in ledgers.iter().zip(&histories) {
        for (index, commands) in history {
            apply(ledger, *index, commands);
        }
    }

    assert_eq!(ledgers[0].digest(), ledgers[1].digest());
    assert_ne!(ledgers[0].digest(), ledgers[2].digest());
    assert_ne!(ledgers[0].digest(), ledgers[3].digest());
}

#[test]
fn purge_applies_before_records_in_entry() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    let base = NOT_AFTER;
    apply(&ledger, 1, &[records_command(&[record_with(serial(1), base), record_with(serial(2), base + 5 * HOUR)])]);

    // The records come first in the entry, but the purge applies first:
    // serial 3 expires before the new cutoff, and serial 1 is free again.
    let reused = record_with(serial(1), base + 2 * HOUR);
    let outcomes = apply(
        &ledger,
        2,
        &[
            records_command(&[record_with(serial(3), base)]),
            records_command(std::slice::from_ref(&reused)),
            Command::purge_expired(base + HOUR),
        ],
    );

    expect_invalid_record(&outcomes[0], "not_after_unix");
    expect_result(&outcomes[1], recorded(1, 0));
    expect_result(
        &outcomes[2],
        CommandResult::ExpiredPurged { cutoff_unix: (base + HOUR) as u64, records_removed: 1, kv_removed: 0 },
    );
    assert_eq!(ledger.issuance(&serial(1)).expect("read issuance"), Some(reused));
    assert_eq!(ledger.issuance(&serial(3)).expect("read issuance"), None);
    assert_eq!(ledger.issuance_count(), 2);
}

#[test]
fn purges_in_entry_merge_to_latest() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    let base = NOT_AFTER;
    let records: Vec<IssuanceRecord> =
        (0..4).map(|hour| record_with(serial(hour), base + i64::from(hour) * HOUR)).collect();
    apply(&ledger, 1, &[records_command(&records)]);

    let outcomes = apply(
        &ledger,
        2,
        &[Command::purge_expired(base + HOUR), Command::purge_expired(base + 3 * HOUR), Command::purge_expired(base)],
    );

    assert_eq!(outcomes.len(), 3);
    for outcome in &outcomes {
        expect_result(
            outcome,
            CommandResult::ExpiredPurged { cutoff_unix: (base + 3 * HOUR) as u64, records_removed: 3, kv_removed: 0 },
        );
    }
    for hour in 0..3 {
        assert_eq!(ledger.issuance(&serial(hour)).expect("read issuance"), None, "hour {hour}");
    }
    assert_eq!(ledger.issuance(&serial(3)).expect("read issuance"), Some(records[3].clone()));
    assert_eq!(ledger.issuance_count(), 1);
    assert_eq!(ledger.stats().purge_cutoff_unix, (base + 3 * HOUR) as u64);
}

#[test]
fn offending_records_fail_alone() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    apply(&ledger, 1, &[records_command(&[record(100)]), Command::purge_expired(NOT_AFTER - HOUR)]);

    let mut invalid = record(2);
    invalid.cert_sha256 = vec![0; 31];
    let other_certificate = |n| record_with(serial(n), NOT_AFTER + HOUR);
    let outcomes = apply(
        &ledger,
        2,
        &[
            records_command(&[record(1)]),
            records_command(&[invalid]),
            records_command(&[other_certificate(100)]),
            records_command(&[record(4)]),
            records_command(&[other_certificate(1)]),
            records_command(&[record_with(serial(5), NOT_AFTER - 2 * HOUR)]),
            // All or nothing: serial 6 is not written, because the other
            // certificate with serial 4 offends.
            records_command(&[record(6), other_certificate(4)]),
            // Serial 6 was not accepted above, so this one is new.
            records_command(&[other_certificate(6)]),
        ],
    );

    expect_result(&outcomes[0], recorded(1, 0));
    expect_invalid_record(&outcomes[1], "cert_sha256");
    expect_duplicate(&outcomes[2], &serial(100));
    expect_result(&outcomes[3], recorded(1, 0));
    expect_duplicate(&outcomes[4], &serial(1));
    expect_invalid_record(&outcomes[5], "not_after_unix");
    expect_duplicate(&outcomes[6], &serial(4));
    expect_result(&outcomes[7], recorded(1, 0));

    assert_eq!(ledger.issuance(&serial(1)).expect("read issuance"), Some(record(1)));
    assert_eq!(ledger.issuance(&serial(2)).expect("read issuance"), None);
    assert_eq!(ledger.issuance(&serial(4)).expect("read issuance"), Some(record(4)));
    assert_eq!(ledger.issuance(&serial(6)).expect("read issuance"), Some(other_certificate(6)));
    assert_eq!(ledger.issuance(&serial(100)).expect("read issuance"), Some(record(100)));
    assert_eq!(ledger.issuance_count(), 4);
    assert_eq!(ledger.stats().rejected_commands, 5);
}

#[test]
fn identical_record_is_already_recorded() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    apply(&ledger, 1, &[records_command(&[record(1), record(2)])]);
    let digest_before = ledger.digest();

    let outcomes = apply(&ledger, 2, &[records_command(&[record(1), record(2)]), records_command(&[record(3)])]);

    assert_eq!(outcomes.len(), 2);
    expect_result(&outcomes[0], recorded(0, 2));
    expect_result(&outcomes[1], recorded(1, 0));
    assert_eq!(ledger.issuance_count(), 3);
    assert_eq!(ledger.stats().records_already_recorded, 2);
    assert_eq!(ledger.stats().rejected_commands, 0);
    assert_ne!(ledger.digest(), digest_before, "the entry is applied even when it writes no record");
    assert_eq!(ledger.applied_index(), 2);

    let changed = record_with(serial(1), NOT_AFTER + HOUR);
    let outcomes = apply(&ledger, 3, &[records_command(&[changed])]);
    expect_duplicate(&outcomes[0], &serial(1));
    assert_eq!(ledger.issuance(&serial(1)).expect("read issuance"), Some(record(1)));
}

#[test]
fn identical_record_in_same_entry_is_already_recorded() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);

    let outcomes = apply(
        &ledger,
        1,
        &[
            records_command(&[record(1)]),
            records_command(&[record(1)]),
            records_command(&[record(2), record(2)]),
            records_command(&[record_with(serial(2), NOT_AFTER + HOUR)]),
        ],
    );

    expect_result(&outcomes[0], recorded(1, 0));
    expect_result(&outcomes[1], recorded(0, 1));
    expect_result(&outcomes[2], recorded(1, 1));
    expect_duplicate(&outcomes[3], &serial(2));
    assert_eq!(ledger.issuance_count(), 2);
    assert_eq!(ledger.issuance(&serial(2)).expect("read issuance"), Some(record(2)));
}

#[test]
fn same_chain_install_returns_active_version() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    let mut retried = install_ca("key-1");
    if let Some(CommandKind::InstallCa(install)) = &mut retried.kind {
        install.installed_at_unix += 60;
    }

    let outcomes = apply(&ledger, 1, &[install_ca("key-1"), retried.clone()]);
    expect_result(&outcomes[0], CommandResult::CaInstalled { version: 1, already_installed: false });
    expect_result(&outcomes[1], CommandResult::CaInstalled { version: 1, already_installed: true });

    let outcomes = apply(&ledger, 2, &[retried, install_ca("key-2")]);
    expect_result(&outcomes[0], CommandResult::CaInstalled { version: 1, already_installed: true });
    expect_result(&outcomes[1], CommandResult::CaInstalled { version: 2, already_installed: false });

    // Version 1 is no longer active, so installing its chain again adds a version.
    let outcomes = apply(&ledger, 3, &[install_ca("key-1")]);
    expect_result(&outcomes[0], CommandResult::CaInstalled { version: 3, already_installed: false });
    assert_eq!(ledger.ca_versions().expect("list CA versions").len(), 3);
    let active = ledger.active_ca().expect("read active CA").expect("active CA");
    assert_eq!(active.key_label, "key-1");
    assert_eq!(active.version, 3);
}

#[test]
fn index_not_above_applied_is_refused() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    apply(&ledger, 3, &[records_command(&[record(1)])]);
    let digest = ledger.digest();

    for index in [3, 2, 0] {
        let error = ledger.apply_entry(index, &[]).expect_err("an applied index must be refused");
        assert!(
            matches!(error, LedgerError::IndexNotAboveApplied { index: refused, applied_index: 3 } if refused == index),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains(&format!("index {index}")), "{message}");
        assert!(message.contains("index 3"), "{message}");
    }

    assert_eq!(ledger.applied_index(), 3);
    assert_eq!(ledger.digest(), digest);
    assert_eq!(ledger.issuance_count(), 1);
    apply(&ledger, 4, &[]);
    assert_eq!(ledger.applied_index(), 4);
}

#[test]
fn sync_keeps_buffered_entries() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    apply(&ledger, 1, &[install_ca("key-1"), records_command(&[record(1)])]);
    apply(&ledger, 2, &[records_command(&[record(2)])]);

    ledger.sync().expect("sync ledger");

    let digest = ledger.digest();
    ledger.close();
    let ledger = open(&dir);
    assert_eq!(ledger.applied_index(), 2);
    assert_eq!(ledger.digest(), digest);
    assert_eq!(ledger.issuance(&serial(2)).expect("read issuance"), Some(record(2)));
}

#[test]
fn apply_after_entries_uses_next_index() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    apply(&ledger, 10, &[records_command(&[record(1)])]);

    let outcome = ledger.apply(&records_command(&[record(2)])).expect("apply command");

    assert_eq!(outcome.index, 11);
    assert_eq!(outcome.result, CommandResult::IssuancesRecorded { count: 1, already_recorded: 0 });
    assert_eq!(ledger.applied_index(), 11);
}
