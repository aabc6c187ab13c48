//! The contract between the Raft layer and the replicated state machine.

use std::path::Path;

use crate::error::RaftError;
use crate::proposal::Proposal;

/// A deterministic state machine that Raft replicates.
///
/// The node calls every method from its own thread, one at a time.
pub trait StateMachine: Send + 'static {
    /// The result of one proposal, returned to the caller that proposed it.
    type Output: Clone + Send + 'static;

    /// Index of the last entry applied, 0 for a new state machine. Raft
    /// replays the log from the entry after it when the node starts.
    fn applied_index(&self) -> u64;

    /// Applies the proposals of the committed entry at `index`, in order,
    /// and returns one output per proposal. An entry without proposals (a
    /// new leader's entry or a membership change) only advances the
    /// applied index. `index` is always above [`Self::applied_index`].
    ///
    /// Applying must depend only on the state and the proposals, never on
    /// the clock or randomness, so that every node reaches the same state.
    /// A request id that was applied before may come again (a client
    /// retried after a leader change): applying it again must change
    /// nothing and return a success that reports it.
    ///
    /// An error means the state could not be written; the node stops.
    fn apply(&mut self, index: u64, proposals: &[Proposal]) -> Result<Vec<Self::Output>, RaftError>;

    /// Writes a consistent copy of the whole state at the applied index
    /// into the new folder `dir` and returns that index. Its cost should
    /// not grow with the size of the state (RocksDB checkpoints are hard
    /// links).
    fn checkpoint(&mut self, dir: &Path) -> Result<u64, RaftError>;

    /// Replaces the whole state with a checkpoint taken at `index` on
    /// another node. The folder may be consumed.
    fn restore(&mut self, dir: &Path, index: u64) -> Result<(), RaftError>;

    /// Makes every applied entry durable. Raft calls it before it drops
    /// log entries that it could otherwise replay.
    fn sync(&mut self) -> Result<(), RaftError>;
}
