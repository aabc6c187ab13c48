//! The group-commit writer: one thread that turns queued records into one
//! entry, so concurrent issuances share one synced write.

use std::sync::Arc;
use std::thread::{self, JoinHandle};

use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::command::{Command, IssuanceRecord};
use super::error::LedgerError;
use super::machine::StateMachine;
use super::store::Durability;

/// Maximum number of records the writer puts in one entry.
pub const MAX_BATCH_RECORDS: usize = 1024;

/// Capacity of the queue in front of the writer. `Ledger::record` waits
/// asynchronously while it is full.
pub(crate) const QUEUE_CAPACITY: usize = 16 * MAX_BATCH_RECORDS;

/// A record waiting to be written, and where to send its result.
pub(crate) struct Pending {
    pub(crate) record: IssuanceRecord,
    pub(crate) done: oneshot::Sender<Result<(), LedgerError>>,
}

pub(crate) fn spawn(machine: Arc<StateMachine>, queue: mpsc::Receiver<Pending>) -> std::io::Result<JoinHandle<()>> {
    thread::Builder::new().name("sigil-ledger-writer".to_owned()).spawn(move || run(&machine, queue))
}

/// Writes batches until every sender is dropped and the queue is drained.
fn run(machine: &StateMachine, mut queue: mpsc::Receiver<Pending>) {
    while let Some(first) = queue.blocking_recv() {
        let mut batch = Vec::with_capacity(MAX_BATCH_RECORDS.min(queue.len() + 1));
        batch.push(first);
        while batch.len() < MAX_BATCH_RECORDS {
            match queue.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        commit(machine, batch);
    }
}

/// Applies `batch` as the next entry, with one `RecordIssuances` command per
/// record so that each record gets its own result, and completes every
/// waiter after the synced write.
pub(crate) fn commit(machine: &StateMachine, batch: Vec<Pending>) {
    let (records, waiters): (Vec<_>, Vec<_>) = batch.into_iter().map(|pending| (pending.record, pending.done)).unzip();
    let commands: Vec<Vec<u8>> =
        records.into_iter().map(|record| Command::record_issuances(vec![record]).encode_to_vec()).collect();
    let command_slices: Vec<&[u8]> = commands.iter().map(Vec::as_slice).collect();

    match machine.apply_next(&command_slices, Durability::Synced) {
        Ok(entry) => {
            for (waiter, outcome) in waiters.into_iter().zip(entry.results) {
                // The caller may have dropped its future, so a closed channel
                // is expected and ignored.
                let _ = waiter.send(outcome.map(|_| ()));
            }
        }
        Err(error) => {
            tracing::error!(records = waiters.len(), %error, "write issuance batch failed");
            for waiter in waiters {
                let _ = waiter.send(Err(error.clone()));
            }
        }
    }
}
