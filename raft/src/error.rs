//! Errors of the Raft layer.

/// Failure of a proposal, a read or a membership change.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RaftError {
    /// No leader is known, so nothing can be committed now.
    #[error("no Raft leader is reachable from node {node}; last known leader: {}", last_leader_text(*last_leader))]
    NoLeader { node: u64, last_leader: Option<u64> },

    /// The proposal was not applied within its deadline. It may still be
    /// applied later; retry with the same request id.
    #[error(
        "not committed by a majority within {timeout_ms} ms (node {node}; last known leader: {})",
        last_leader_text(*last_leader)
    )]
    Timeout { node: u64, timeout_ms: u64, last_leader: Option<u64> },

    /// The proposal is larger than one Raft entry may be.
    #[error("proposal of {size} bytes is larger than the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },

    /// The node's Raft log could not be written; the node stopped.
    #[error("the Raft log of this node could not be written; the node stopped accepting writes")]
    StorageFailed,

    /// The node is shutting down or has stopped.
    #[error("the Raft node has stopped")]
    Stopped,

    /// A membership change was refused.
    #[error("membership change refused: {0}")]
    Membership(String),

    #[error("{what}: {reason}")]
    Storage { what: String, reason: String },

    #[error("Raft state machine: {0}")]
    StateMachine(String),

    #[error("Raft snapshot: {0}")]
    Snapshot(String),

    #[error("stored Raft state is corrupt: {0}")]
    Corrupt(String),

    #[error("Raft invariant broken: {0}")]
    Invariant(String),
}

impl RaftError {
    pub(crate) fn storage(what: String, cause: impl std::fmt::Display) -> RaftError {
        RaftError::Storage { what, reason: cause.to_string() }
    }

    /// True for errors after which a client may retry, possibly on another
    /// node: no leader, timeout, node stopped or failed.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            RaftError::NoLeader { .. } | RaftError::Timeout { .. } | RaftError::StorageFailed | RaftError::Stopped
        )
    }
}

fn last_leader_text(leader: Option<u64>) -> String {
    leader.map_or_else(|| "none".to_owned(), |id| format!("node {id}"))
}
