//! The status a node reports about itself.

use std::collections::BTreeMap;

use raft::StateRole;

/// The Raft role of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
    /// A member that receives the log but does not vote.
    Learner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::PreCandidate => "pre-candidate",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
            Role::Learner => "learner",
        }
    }
}

impl From<StateRole> for Role {
    fn from(state: StateRole) -> Role {
        match state {
            StateRole::Follower => Role::Follower,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Candidate => Role::Candidate,
            StateRole::Leader => Role::Leader,
        }
    }
}

/// Counters since the node started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Entries of proposals this node handed to Raft.
    pub batches_proposed: u64,
    /// Proposals in those entries.
    pub proposals_batched: u64,
    /// Proposals handed to Raft again after a leader change or a timeout.
    pub proposals_retried: u64,
    /// Entries with proposals applied to the state machine.
    pub entries_applied: u64,
    pub snapshots_taken: u64,
    pub snapshots_sent: u64,
    pub snapshots_received: u64,
}

/// A node's view of itself and the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: u64,
    pub role: Role,
    pub term: u64,
    /// The current leader, as seen by this node.
    pub leader: Option<u64>,
    /// The last leader this node knew, kept while there is none.
    pub last_leader: Option<u64>,
    pub commit_index: u64,
    pub applied_index: u64,
    /// First index still in the log.
    pub first_index: u64,
    pub last_index: u64,
    /// Index of the newest snapshot this node took or installed.
    pub snapshot_index: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub peers: BTreeMap<u64, String>,
    pub pending_proposals: usize,
    /// Reason the node stopped accepting writes after a storage failure.
    pub halted: Option<String>,
    /// True once a membership change removed this node.
    pub removed: bool,
    pub stats: Stats,
    /// On the leader: the highest log index known replicated on each member, by node id.
    pub progress: BTreeMap<u64, u64>,
}

impl NodeStatus {
    /// Returns true when the node can take writes: it has a leader, is a
    /// member, and its storage works.
    pub fn is_ready(&self) -> bool {
        self.leader.is_some() && self.halted.is_none() && !self.removed
    }
}
