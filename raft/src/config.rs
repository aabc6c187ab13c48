//! Settings of one Raft node.

use std::time::Duration;

/// Settings of one Raft node. [`NodeConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id, unique in the cluster and never reused; not 0.
    pub id: u64,
    /// Time between two Raft ticks.
    pub tick_interval: Duration,
    /// Ticks without a leader's message before a follower campaigns. The
    /// real timeout is drawn from `[election_ticks, 2 * election_ticks)`.
    pub election_ticks: usize,
    /// Ticks between two heartbeats of the leader.
    pub heartbeat_ticks: usize,
    /// Fixes the election timeout to exactly this many ticks, for the
    /// simulated network, which must not depend on raft-rs's random draw.
    pub fixed_election_ticks: Option<usize>,
    /// Maximum number of proposals in one entry.
    pub max_batch_proposals: usize,
    /// Maximum bytes of proposals in one entry, which is also the largest proposal.
    pub max_batch_bytes: usize,
    /// Maximum time a proposal waits for others to fill its entry.
    pub batch_delay: Duration,
    /// Time after which a proposal that is not applied fails.
    pub proposal_timeout: Duration,
    /// Time after which a proposal that is not applied is proposed again.
    pub retry_interval: Duration,
    /// Applied entries between two snapshots.
    pub snapshot_interval: u64,
    /// Bytes of applied entries after which a snapshot is taken even before
    /// `snapshot_interval` entries, so that large entries do not make the
    /// log, and a new node's catch-up, grow without bound.
    pub snapshot_log_bytes: u64,
    /// Entries kept in the log before the latest snapshot, so that a
    /// follower a little behind catches up without a snapshot.
    pub log_entries_kept: u64,
}

impl NodeConfig {
    pub fn new(id: u64) -> NodeConfig {
        NodeConfig {
            id,
            tick_interval: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            fixed_election_ticks: None,
            max_batch_proposals: 4096,
            max_batch_bytes: 4 << 20,
            batch_delay: Duration::ZERO,
            proposal_timeout: Duration::from_secs(5),
            retry_interval: Duration::from_millis(1500),
            snapshot_interval: 20_000,
            snapshot_log_bytes: 64 << 20,
            log_entries_kept: 5_000,
        }
    }

    pub(crate) fn raft_config(&self, applied: u64) -> raft::Config {
        let mut config = raft::Config::new(self.id);
        config.election_tick = self.election_ticks;
        config.heartbeat_tick = self.heartbeat_ticks;
        if let Some(ticks) = self.fixed_election_ticks {
            config.election_tick = ticks;
            config.min_election_tick = ticks;
            config.max_election_tick = ticks + 1;
        }
        config.applied = applied;
        config.pre_vote = true;
        config.check_quorum = true;
        config.max_size_per_msg = 4 << 20;
        config.max_inflight_msgs = 256;
        config.max_uncommitted_size = 256 << 20;
        config
    }
}
