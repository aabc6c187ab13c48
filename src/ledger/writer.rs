//! The group-commit writer: one thread that turns queued records into
//! `RecordIssuances` commands, so concurrent issuances share one synced write.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::{self, JoinHandle};

use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::command::{Command, IssuanceRecord};
use super::error::LedgerError;
use super::store::Store;

/// Maximum number of records in one `RecordIssuances` command.
pub const MAX_BATCH_RECORDS: usize = 1024;

/// Capacity of the queue in front of the writer. `Ledger::record` waits
/// asynchronously while it is full.
pub(crate) const QUEUE_CAPACITY: usize = 16 * MAX_BATCH_RECORDS;

/// A record waiting to be written, and where to send its result.
pub(crate) struct Pending {
    pub(crate) record: IssuanceRecord,
    pub(crate) done: oneshot::Sender<Result<(), LedgerError>>,
}

pub(crate) fn spawn(store: Arc<Store>, queue: mpsc::Receiver<Pending>) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new().name("sigil-ledger-writer".to_owned()).spawn(move || run(&store, queue))
}

/// Writes batches until every sender is dropped and the queue is drained.
fn run(store: &Store, mut queue: mpsc::Receiver<Pending>) {
    while let Some(first) = queue.blocking_recv() {
        let mut batch = Vec::with_capacity(MAX_BATCH_RECORDS.min(queue.len() + 1));
        batch.push(first);
        while batch.len() < MAX_BATCH_RECORDS {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        commit(store, batch);
    }
}

/// Applies `batch` as one command and completes every waiter after the
/// synced write. When the command is rejected, the offending records fail
/// with their own errors and the rest are applied again as a new command.
pub(crate) fn commit(store: &Store, batch: Vec<Pending>) {
    let (mut records, mut waiters): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|pending| (pending.record, pending.done)).unzip();

    while !records.is_empty() {
        let bytes = Command::record_issuances(records.clone()).encode_to_vec();
        let rejection = match store.apply_encoded(&bytes) {
            Ok(applied) => match applied.outcome {
                Ok(_) => {
                    complete_all(waiters, &Ok(()));
                    return;
                }
                Err(rejection) => rejection,
            },
            Err(error) => {
                tracing::error!(records = records.len(), %error, "write issuance batch failed");
                complete_all(waiters, &Err(error));
                return;
            }
        };

        let mut failed: HashMap<usize, LedgerError> = HashMap::new();
        for offender in rejection.offenders {
            match offender.position {
                Some(position) if position < records.len() => {
                    failed.entry(position).or_insert(offender.error);
                }
                // A rejection of the whole command cannot be narrowed to
                // one record, so every waiter gets it.
                _ => {
                    complete_all(waiters, &Err(offender.error));
                    return;
                }
            }
        }
        if failed.is_empty() {
            let error = LedgerError::InvalidCommand {
                command: "record_issuances",
                reason: "rejected without naming a record".to_owned(),
            };
            complete_all(waiters, &Err(error));
            return;
        }

        let mut kept_records = Vec::with_capacity(records.len() - failed.len());
        let mut kept_waiters = Vec::with_capacity(records.len() - failed.len());
        for (position, (record, waiter)) in records.into_iter().zip(waiters).enumerate() {
            match failed.remove(&position) {
                Some(error) => {
                    // The caller may have dropped its future, so a closed
                    // channel is expected and ignored.
                    let _ = waiter.send(Err(error));
                }
                None => {
                    kept_records.push(record);
                    kept_waiters.push(waiter);
                }
            }
        }
        records = kept_records;
        waiters = kept_waiters;
        if !records.is_empty() {
            store.counters.batch_retries.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn complete_all(waiters: Vec<oneshot::Sender<Result<(), LedgerError>>>, result: &Result<(), LedgerError>) {
    for waiter in waiters {
        // A caller that dropped its future no longer waits for the result.
        let _ = waiter.send(result.clone());
    }
}
