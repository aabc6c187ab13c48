//! Tests of key-value transactions against a real RocksDB database.

use prost::Message;

use super::tests::{HOUR, open};
use super::*;

fn put(key: &str, value: &str) -> KvWrite {
    KvWrite { key: key.as_bytes().to_vec(), value: value.as_bytes().to_vec(), delete: false, expires_unix: 0 }
}

fn put_expiring(key: &str, value: &str, expires_unix: i64) -> KvWrite {
    KvWrite { expires_unix, ..put(key, value) }
}

fn delete(key: &str) -> KvWrite {
    KvWrite { key: key.as_bytes().to_vec(), value: Vec::new(), delete: true, expires_unix: 0 }
}

fn when(key: &str, revision: u64) -> KvCondition {
    KvCondition { key: key.as_bytes().to_vec(), revision }
}

fn transaction(conditions: Vec<KvCondition>, writes: Vec<KvWrite>) -> Command {
    Command::kv_transaction(KvTransaction { conditions, writes })
}

fn value_of(ledger: &Ledger, key: &str) -> Option<(String, u64)> {
    let stored = ledger.kv_get(key.as_bytes()).expect("read key");
    stored.map(|stored| (String::from_utf8(stored.value).expect("utf-8 value"), stored.revision))
}

fn apply_entry(ledger: &Ledger, index: u64, commands: &[Command]) -> Vec<Result<CommandResult, LedgerError>> {
    let encoded: Vec<Vec<u8>> = commands.iter().map(Message::encode_to_vec).collect();
    let slices: Vec<&[u8]> = encoded.iter().map(Vec::as_slice).collect();
    ledger.apply_entry(index, &slices).expect("apply entry")
}

#[test]
fn transaction_writes_when_conditions_hold() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);

    let first = ledger.apply(&transaction(vec![when("a", 0)], vec![put("a", "1"), put("b", "2")])).expect("first");
    assert_eq!(first.result, CommandResult::KvCommitted { revision: 1 });
    assert_eq!(value_of(&ledger, "a"), Some(("1".to_owned(), 1)));

    let second = ledger.apply(&transaction(vec![when("a", 1)], vec![put("a", "3"), delete("b")])).expect("second");
    assert_eq!(second.result, CommandResult::KvCommitted { revision: 2 });
    assert_eq!(value_of(&ledger, "a"), Some(("3".to_owned(), 2)));
    assert_eq!(value_of(&ledger, "b"), None);
}

#[test]
fn failed_condition_rejects_every_write() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    ledger.apply(&transaction(vec![], vec![put("a", "1")])).expect("seed");
    let digest_before = ledger.digest();

    let error = ledger
        .apply(&transaction(vec![when("a", 0)], vec![put("a", "2"), put("c", "3")]))
        .expect_err("a exists, so the condition fails");
    assert!(
        matches!(&error, LedgerError::KvConflict { key, expected: 0, found: 1 } if key == "a"),
        "expected a conflict on a, got {error:?}"
    );
    assert!(error.is_rejection());
    assert_eq!(value_of(&ledger, "a"), Some(("1".to_owned(), 1)));
    assert_eq!(value_of(&ledger, "c"), None);
    assert_ne!(ledger.digest(), digest_before, "a rejected command still consumes an index");
}

#[test]
fn later_transaction_in_entry_sees_earlier_writes() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);

    let outcomes = apply_entry(
        &ledger,
        1,
        &[
            transaction(vec![when("nonce", 0)], vec![put("nonce", "used")]),
            transaction(vec![when("nonce", 0)], vec![put("nonce", "used again")]),
            transaction(vec![when("nonce", 1)], vec![put("order", "ready")]),
        ],
    );
    assert_eq!(outcomes[0].as_ref().expect("first"), &CommandResult::KvCommitted { revision: 1 });
    assert!(matches!(&outcomes[1], Err(LedgerError::KvConflict { found: 1, .. })), "got {:?}", outcomes[1]);
    assert_eq!(outcomes[2].as_ref().expect("third"), &CommandResult::KvCommitted { revision: 2 });
    assert_eq!(value_of(&ledger, "nonce"), Some(("used".to_owned(), 1)));
}

#[test]
fn invalid_transactions_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    let cases = [
        (transaction(vec![], vec![]), "no writes"),
        (transaction(vec![], vec![put("a", "1"), put("a", "2")]), "key a is written twice"),
        (transaction(vec![], vec![put("", "1")]), "key length 0"),
        (transaction(vec![], vec![put(&"k".repeat(MAX_KV_KEY_LEN + 1), "1")]), "key length 513"),
        (transaction(vec![], vec![put_expiring("a", "1", -5)]), "expires before the Unix epoch"),
    ];
    for (command, expected) in cases {
        let error = ledger.apply(&command).expect_err(expected);
        assert!(error.to_string().contains(expected), "expected {expected:?} in {error}");
    }
    assert_eq!(ledger.kv_scan(b"", None, 10).expect("scan"), vec![]);
}

#[test]
fn scan_returns_prefix_in_key_order_from_cursor() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    let writes = ["orders/1/c", "orders/1/a", "orders/2/a", "orders/1/b", "orders/10/a"].map(|key| put(key, key));
    ledger.apply(&transaction(vec![], writes.to_vec())).expect("seed");

    let keys = |entries: Vec<(Vec<u8>, KvValue)>| -> Vec<String> {
        entries.into_iter().map(|(key, _)| String::from_utf8(key).expect("utf-8 key")).collect()
    };
    assert_eq!(keys(ledger.kv_scan(b"orders/1/", None, 10).expect("scan")), ["orders/1/a", "orders/1/b", "orders/1/c"]);
    assert_eq!(keys(ledger.kv_scan(b"orders/1/", None, 2).expect("scan")), ["orders/1/a", "orders/1/b"]);
    assert_eq!(keys(ledger.kv_scan(b"orders/1/", Some(b"orders/1/b"), 10).expect("scan")), ["orders/1/c"]);
}

#[test]
fn purge_drops_expired_entries_but_not_rewritten_ones() {
    let dir = tempfile::tempdir().expect("create temp dir");
    let ledger = open(&dir);
    let base = 1_900_000_000 - 1_900_000_000 % HOUR;
    ledger
        .apply(&transaction(
            vec![],
            vec![
                put_expiring("old", "1", base + 10),
                put_expiring("renewed", "1", base + 10),
                put_expiring("late", "1", base + 5 * HOUR),
                put("forever", "1"),
            ],
        ))
        .expect("seed");
    ledger.apply(&transaction(vec![], vec![put_expiring("renewed", "2", base + 5 * HOUR)])).expect("renew");

    let purged = ledger.apply(&Command::purge_expired(base + 2 * HOUR)).expect("purge");
    assert!(
        matches!(purged.result, CommandResult::ExpiredPurged { kv_removed: 1, .. }),
        "expected one key dropped, got {:?}",
        purged.result
    );
    assert_eq!(value_of(&ledger, "old"), None);
    assert_eq!(value_of(&ledger, "renewed"), Some(("2".to_owned(), 2)));
    assert!(value_of(&ledger, "late").is_some());
    assert!(value_of(&ledger, "forever").is_some());
}

#[test]
fn key_value_state_survives_reopen() {
    let dir = tempfile::tempdir().expect("create temp dir");
    {
        let ledger = open(&dir);
        ledger.apply(&transaction(vec![], vec![put("a", "1")])).expect("first");
        ledger.apply(&transaction(vec![], vec![put("b", "2")])).expect("second");
    }
    let ledger = open(&dir);
    let next = ledger.apply(&transaction(vec![when("b", 2)], vec![put("c", "3")])).expect("after reopen");
    assert_eq!(next.result, CommandResult::KvCommitted { revision: 3 }, "revisions continue after a reopen");
}
