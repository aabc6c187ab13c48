//! The ledger replicated by Raft: the state machine adapter, the node's Raft parts, and the
//! write path that commits a command through the leader before it returns.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use prost::Message as _;
use ring::digest;
use sigil_raft::{
    LogStore, MembershipChange, Node, NodeHandle, NodeStatus, Proposal, RaftError, RequestId, SnapshotStore,
    StateMachine, Transport,
};

use crate::config::Config;
use crate::ledger::{Command, CommandResult, IssuanceRecord, Ledger, LedgerError};

/// The result of one ledger command applied through Raft.
pub type CommandOutput = Result<CommandResult, LedgerError>;

/// The ledger as a Raft state machine.
pub struct LedgerMachine {
    ledger: Arc<Ledger>,
}

impl StateMachine for LedgerMachine {
    type Output = CommandOutput;

    fn applied_index(&self) -> u64 {
        self.ledger.applied_index()
    }

    fn apply(&mut self, index: u64, proposals: &[Proposal]) -> Result<Vec<CommandOutput>, RaftError> {
        let commands: Vec<&[u8]> = proposals.iter().map(|proposal| proposal.payload.as_slice()).collect();
        self.ledger.apply_entry(index, &commands).map_err(|error| RaftError::StateMachine(error.to_string()))
    }

    fn checkpoint(&mut self, dir: &Path) -> Result<u64, RaftError> {
        self.ledger.checkpoint(dir).map_err(|error| RaftError::StateMachine(error.to_string()))
    }

    fn restore(&mut self, dir: &Path, index: u64) -> Result<(), RaftError> {
        self.ledger.restore(dir).map_err(|error| RaftError::StateMachine(error.to_string()))?;
        let restored = self.ledger.applied_index();
        if restored != index {
            return Err(RaftError::StateMachine(format!(
                "the restored ledger is at index {restored}, the snapshot at {index}"
            )));
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), RaftError> {
        self.ledger.sync().map_err(|error| RaftError::StateMachine(error.to_string()))
    }
}

/// Failure of a replicated write.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The ledger rejected the command; the message names the bad value.
    #[error(transparent)]
    Rejected(#[from] LedgerError),
    /// The command could not be committed: no quorum, timeout or a stopped node.
    #[error(transparent)]
    Unavailable(#[from] RaftError),
}

/// Failure of a membership change.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error(
        "node {node} is not the leader; send membership changes to the leader (node {}, Raft address {})",
        leader.map_or_else(|| "unknown".to_owned(), |id| id.to_string()),
        leader_address.as_deref().unwrap_or("unknown")
    )]
    NotLeader { node: u64, leader: Option<u64>, leader_address: Option<String> },
    #[error("{0}")]
    Invalid(String),
    #[error(
        "node {node} handed leadership to node {successor}; send the removal of node {node} to node {successor} \
         (Raft address {})",
        successor_address.as_deref().unwrap_or("unknown")
    )]
    HandedOver { node: u64, successor: u64, successor_address: Option<String> },
    #[error(
        "node {id} did not catch up within {waited:?}: it has the log up to index {matched} of {target}; it stays a \
         learner, so start it if it is not running and repeat the command"
    )]
    CatchUp { id: u64, matched: u64, target: u64, waited: Duration },
    #[error(transparent)]
    Raft(#[from] RaftError),
}

/// A transport for a node that is the only voter, which has no peer to send to.
pub struct NoPeers;

impl Transport for NoPeers {
    fn send(&self, messages: Vec<sigil_raft::Message>) {
        if !messages.is_empty() {
            tracing::debug!(messages = messages.len(), "no peers; Raft messages dropped");
        }
    }

    fn set_peers(&self, _peers: &BTreeMap<u64, String>) {}
}

/// Where a node keeps its ledger and Raft state, and how its Raft node runs.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    pub node_id: u64,
    /// Folder of `ledger/`, `raft/` and `snapshots/`.
    pub data_dir: std::path::PathBuf,
    /// Address other nodes use for this node's Raft listener.
    pub raft_address: String,
    pub raft: sigil_raft::NodeConfig,
}

impl ReplicaSettings {
    pub fn from_config(config: &Config) -> ReplicaSettings {
        ReplicaSettings {
            node_id: config.node_id,
            data_dir: config.data_dir.clone(),
            raft_address: config.raft_address(),
            raft: config.raft_node_config(),
        }
    }

    /// Settings of node 1 of a single-node cluster in `data_dir`, with default Raft timing.
    pub fn single_node(data_dir: &Path) -> ReplicaSettings {
        ReplicaSettings {
            node_id: 1,
            data_dir: data_dir.to_owned(),
            raft_address: "127.0.0.1:0".to_owned(),
            raft: sigil_raft::NodeConfig::new(1),
        }
    }
}

/// The node's replicated ledger: the ledger for reads, the Raft node for writes.
pub struct Replica {
    ledger: Arc<Ledger>,
    node: Option<Node<LedgerMachine>>,
    handle: NodeHandle<CommandOutput>,
    node_id: u64,
}

impl Replica {
    /// Opens the ledger and the Raft log of the node in `config` and starts its Raft node with no
    /// peers, for commands that run while the node is stopped. A node whose log is empty is
    /// bootstrapped as the single voter of a new cluster when `bootstrap` is true.
    ///
    /// # Errors
    ///
    /// Fails when a store cannot be opened or the Raft node cannot start.
    pub fn open_offline(settings: &ReplicaSettings, bootstrap: bool) -> anyhow::Result<Replica> {
        let (replica, _) = Replica::open_with(settings, bootstrap, |_| Arc::new(NoPeers))?;
        Ok(replica)
    }

    /// Opens the ledger and the Raft log of the node in `config` and starts its Raft node with the
    /// transport that `make_transport` builds over the node's snapshot folders. A node whose log
    /// is empty is bootstrapped as the single voter of a new cluster when `bootstrap` is true;
    /// otherwise it waits for the cluster's leader to add it.
    ///
    /// # Errors
    ///
    /// Fails when a store cannot be opened or the Raft node cannot start.
    pub fn open_with<T: Transport>(
        settings: &ReplicaSettings,
        bootstrap: bool,
        make_transport: impl FnOnce(Arc<SnapshotStore>) -> Arc<T>,
    ) -> anyhow::Result<(Replica, Arc<T>)> {
        let node_id = settings.node_id;
        let ledger = Arc::new(Ledger::open(settings.data_dir.join("ledger")).context("open ledger")?);
        let log = LogStore::open(&settings.data_dir.join("raft")).context("open the Raft log")?;
        if log.is_empty() && bootstrap {
            let peers = BTreeMap::from([(node_id, settings.raft_address.clone())]);
            log.bootstrap(&peers, &[]).context("bootstrap a new single-node cluster")?;
            tracing::info!(node_id, "bootstrapped a new cluster with this node as its only voter");
        }
        let snapshots =
            Arc::new(SnapshotStore::open(&settings.data_dir.join("snapshots")).context("open the snapshot folder")?);
        let transport = make_transport(Arc::clone(&snapshots));
        let machine = LedgerMachine { ledger: Arc::clone(&ledger) };
        let node =
            Node::start(settings.raft.clone(), log, machine, snapshots, Arc::clone(&transport) as Arc<dyn Transport>)
                .context("start the Raft node")?;
        let handle = node.handle();
        Ok((Replica { ledger, node: Some(node), handle, node_id }, transport))
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    pub fn handle(&self) -> &NodeHandle<CommandOutput> {
        &self.handle
    }

    pub fn status(&self) -> NodeStatus {
        self.handle.status()
    }

    /// Commits `command` through the leader and returns its result once applied on this node.
    ///
    /// # Errors
    ///
    /// See [`WriteError`].
    pub async fn write(&self, request_id: RequestId, command: &Command) -> Result<CommandResult, WriteError> {
        let proposal = Proposal::new(request_id, command.encode_to_vec());
        Ok(self.handle.propose(proposal).await??)
    }

    /// Commits the record of an issued certificate. The request id comes from the serial, so a
    /// retry of the same record is applied once.
    ///
    /// # Errors
    ///
    /// See [`WriteError`].
    pub async fn record(&self, record: IssuanceRecord) -> Result<(), WriteError> {
        record.validate()?;
        let request_id = request_id_for(b"record", &record.serial);
        self.write(request_id, &Command::record_issuances(vec![record])).await?;
        Ok(())
    }

    /// Waits until this node has applied everything committed before the call.
    ///
    /// # Errors
    ///
    /// Fails when no leader confirms the read in time.
    pub async fn sync_read(&self) -> Result<u64, RaftError> {
        self.handle.read_index().await
    }

    /// Waits at most `limit` until this node has a leader, and returns whether it has one.
    pub async fn wait_for_leader(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.status().leader.is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the ledger has an installed CA, as a new node does while the leader sends it
    /// the log; logs progress every 10 seconds.
    ///
    /// # Errors
    ///
    /// Fails when the node stops or its storage fails.
    pub async fn wait_for_ca(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut next_log = started + Duration::from_secs(10);
        loop {
            if self.ledger.active_ca().context("read CA from ledger")?.is_some() {
                return Ok(());
            }
            let status = self.status();
            if let Some(reason) = &status.halted {
                bail!("the Raft node stopped before the CA arrived: {reason}");
            }
            if Instant::now() >= next_log {
                tracing::info!(
                    node_id = self.node_id,
                    applied_index = status.applied_index,
                    leader = ?status.leader,
                    waited_s = started.elapsed().as_secs(),
                    "waiting for the cluster to replicate the CA to this node"
                );
                next_log += Duration::from_secs(10);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until this node has applied the entries that were committed in its log when it
    /// started, so that reads at start see the state it had before it stopped.
    pub async fn wait_for_applied(&self, index: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.status().applied_index < index && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Adds, promotes or removes nodes.
    ///
    /// # Errors
    ///
    /// Fails when the change is not committed.
    pub async fn change_membership(&self, changes: Vec<MembershipChange>) -> Result<(), RaftError> {
        self.handle.change_membership(changes).await
    }

    /// Adds node `id` as a learner, waits until it has replicated the log up to the commit index
    /// at the time it was added (at most `catch_up`), then makes it a voter. Must run on the
    /// leader, which tracks the learner's progress.
    ///
    /// # Errors
    ///
    /// Fails when this node is not the leader, a change is not committed, or the learner does not
    /// catch up in time (it then stays a learner, and the call can be repeated).
    pub async fn add_node(&self, id: u64, address: &str, catch_up: Duration) -> Result<(), MembershipError> {
        self.require_leader()?;
        let status = self.status();
        if status.voters.contains(&id) {
            return Err(MembershipError::Invalid(format!("node {id} is already a voter")));
        }
        if !status.learners.contains(&id) {
            let learner = MembershipChange::AddLearner { id, address: address.to_owned() };
            self.change_membership(vec![learner]).await?;
            tracing::info!(node_id = self.node_id, learner = id, address, "added a learner");
        }

        let target = self.status().commit_index;
        let deadline = Instant::now() + catch_up;
        loop {
            let status = self.status();
            let matched = status.progress.get(&id).copied().unwrap_or(0);
            if matched >= target {
                break;
            }
            if Instant::now() >= deadline {
                return Err(MembershipError::CatchUp { id, matched, target, waited: catch_up });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let voter = MembershipChange::AddVoter { id, address: address.to_owned() };
        self.change_membership(vec![voter]).await?;
        tracing::info!(node_id = self.node_id, voter = id, "promoted a learner to voter");
        Ok(())
    }

    /// Removes node `id` from the cluster. Must run on the leader. To remove the leader itself,
    /// it hands leadership to the most up-to-date voter and fails with
    /// [`MembershipError::HandedOver`], naming the node to send the removal to.
    ///
    /// # Errors
    ///
    /// Fails when this node is not the leader, `id` is not a member, removing it would leave no
    /// voter, `id` is this node (after the hand-over), or the change is not committed.
    pub async fn remove_node(&self, id: u64) -> Result<(), MembershipError> {
        self.require_leader()?;
        let status = self.status();
        if !status.voters.contains(&id) && !status.learners.contains(&id) {
            return Err(MembershipError::Invalid(format!(
                "node {id} is not a member; voters {:?}, learners {:?}",
                status.voters, status.learners
            )));
        }
        if status.voters == [id] {
            return Err(MembershipError::Invalid(format!("node {id} is the last voter and cannot be removed")));
        }
        if id == self.node_id {
            // Once the removal commits, the new leader stops sending this node the log, so this
            // node could never see its own removal applied; the new leader commits it instead.
            let successor = self.hand_over_leadership(&status).await?;
            return Err(MembershipError::HandedOver {
                node: id,
                successor,
                successor_address: self.status().peers.get(&successor).cloned(),
            });
        }
        self.change_membership(vec![MembershipChange::Remove { id }]).await?;
        tracing::info!(node_id = self.node_id, removed = id, "removed a node from the cluster");
        Ok(())
    }

    /// Hands leadership to the voter that has replicated the most of the log, and waits until it
    /// leads, so that the removal of this node is committed by a leader that stays.
    async fn hand_over_leadership(&self, status: &NodeStatus) -> Result<u64, MembershipError> {
        let successor = status
            .voters
            .iter()
            .filter(|voter| **voter != self.node_id)
            .max_by_key(|voter| status.progress.get(voter).copied().unwrap_or(0))
            .copied()
            .ok_or_else(|| MembershipError::Invalid("no other voter can take over as leader".to_owned()))?;
        tracing::info!(node_id = self.node_id, successor, "handing leadership over before removing this node");
        self.handle.transfer_leader(successor);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(leader) = self.status().leader.filter(|leader| *leader != self.node_id) {
                return Ok(leader);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(MembershipError::Invalid(format!("node {successor} did not take over leadership within 10 s; try again")))
    }

    fn require_leader(&self) -> Result<(), MembershipError> {
        let status = self.status();
        if status.role == sigil_raft::Role::Leader {
            return Ok(());
        }
        Err(MembershipError::NotLeader {
            node: self.node_id,
            leader: status.leader,
            leader_address: status.leader.and_then(|leader| status.peers.get(&leader).cloned()),
        })
    }

    /// Stops the Raft node and syncs the ledger.
    pub fn stop(&mut self) {
        if let Some(node) = self.node.take() {
            node.stop();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Derives a request id from a kind and a key, so that the same command proposed again carries
/// the same id.
pub fn request_id_for(kind: &[u8], key: &[u8]) -> RequestId {
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(kind);
    context.update(&[0]);
    context.update(key);
    let mut id = [0u8; 16];
    id.copy_from_slice(&context.finish().as_ref()[..16]);
    RequestId(id)
}
