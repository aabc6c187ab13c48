//! The Raft node without threads or sockets: it is driven by calls that
//! carry the current time, and returns the messages to send. The threaded
//! [`crate::Node`] and the simulated network both drive it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft::eraftpb::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, Entry, EntryType, Message, MessageType,
    Snapshot, SnapshotMetadata,
};
use raft::prelude::ConfChange;
use raft::{RawNode, SnapshotStatus, StateRole, Storage};
use raft_proto::ConfChangeI;
use tokio::sync::oneshot;

use crate::config::NodeConfig;
use crate::error::RaftError;
use crate::proposal::{self, Proposal, RequestId};
use crate::snapshot::{self, SnapshotStore};
use crate::state_machine::StateMachine;
use crate::status::{NodeStatus, Role, Stats};
use crate::storage::LogStore;

pub(crate) type Reply<T> = oneshot::Sender<Result<T, RaftError>>;

/// A membership change requested by an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    /// Adds a learner that receives the log but does not vote.
    AddLearner { id: u64, address: String },
    /// Makes a learner (or a new node) a voter.
    AddVoter { id: u64, address: String },
    /// Removes a voter or a learner.
    Remove { id: u64 },
}

/// A proposal waiting to be applied, with everyone waiting for it.
struct Pending<O> {
    proposal: Proposal,
    replies: Vec<Reply<O>>,
    deadline: Instant,
    /// When it was last handed to raft-rs; `None` while it sits in the batch.
    proposed_at: Option<Instant>,
}

/// A linearizable read waiting for its read index, then for the apply.
struct PendingRead {
    reply: Reply<u64>,
    deadline: Instant,
}

pub(crate) struct Core<S: StateMachine> {
    id: u64,
    config: NodeConfig,
    raw: RawNode<LogStore>,
    machine: S,
    snapshots: Arc<SnapshotStore>,

    pending: HashMap<RequestId, Pending<S::Output>>,
    /// Request ids in the batch not yet handed to raft-rs, in arrival order.
    batch: Vec<RequestId>,
    batch_bytes: usize,
    batch_started: Option<Instant>,

    next_read: u64,
    reads_waiting_index: HashMap<u64, PendingRead>,
    reads_waiting_apply: VecDeque<(u64, PendingRead)>,
    membership: HashMap<RequestId, (Reply<()>, Instant)>,

    role: Role,
    leader: Option<u64>,
    last_leader: Option<u64>,
    last_snapshot_index: u64,
    /// Sizes of the entries applied since the last compaction, oldest first, so that compaction
    /// can keep a bounded number of bytes as well as of entries.
    applied_sizes: VecDeque<(u64, u64)>,
    /// Bytes of entries applied since the last snapshot.
    bytes_since_snapshot: u64,
    halted: Option<String>,
    removed: bool,
    stats: Stats,
}

impl<S: StateMachine> Core<S> {
    pub(crate) fn new(
        config: NodeConfig,
        store: LogStore,
        machine: S,
        snapshots: Arc<SnapshotStore>,
    ) -> Result<Core<S>, RaftError> {
        let applied = machine.applied_index();
        let (first, last) = store.bounds();
        if applied + 1 < first {
            return Err(RaftError::Corrupt(format!(
                "the state machine is at index {applied} but the Raft log starts at {first}"
            )));
        }
        if applied > last {
            return Err(RaftError::Corrupt(format!(
                "the state machine is at index {applied}, past the Raft log's last index {last}"
            )));
        }
        // Committed entries are applied before the Ready's hard state is stored, so a crash or a
        // failed write between the two leaves the stored commit index behind the applied one.
        // Everything applied was committed, so the commit index is raised to it.
        if applied > store.hard_state().commit {
            tracing::info!(
                node_id = config.id,
                applied,
                stored_commit = store.hard_state().commit,
                "raising the stored commit index to the applied index"
            );
            store.set_commit(applied)?;
        }

        let latest = snapshots.latest_local();
        if let Some(metadata) = &latest {
            store.set_latest_snapshot(metadata.clone());
        }
        let raft_config = config.raft_config(applied);
        let logger = crate::logging::slog_logger(config.id);
        let raw =
            RawNode::new(&raft_config, store, &logger).map_err(|error| RaftError::Invariant(error.to_string()))?;

        Ok(Core {
            id: config.id,
            raw,
            machine,
            snapshots,
            pending: HashMap::new(),
            batch: Vec::new(),
            batch_bytes: 0,
            batch_started: None,
            next_read: 1,
            reads_waiting_index: HashMap::new(),
            reads_waiting_apply: VecDeque::new(),
            membership: HashMap::new(),
            role: Role::Follower,
            leader: None,
            last_leader: None,
            last_snapshot_index: latest.map_or(0, |metadata| metadata.index).max(applied),
            applied_sizes: VecDeque::new(),
            bytes_since_snapshot: 0,
            halted: None,
            removed: false,
            stats: Stats::default(),
            config,
        })
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn tick(&mut self, now: Instant) {
        if self.halted.is_some() {
            return;
        }
        self.raw.tick();
        self.expire(now);
        self.repropose_stale(now);
        self.campaign_if_sole_voter();
    }

    /// Starts an election at once when this node is the only voter: it needs nobody's vote, so
    /// it need not wait for an election timeout.
    fn campaign_if_sole_voter(&mut self) {
        let raft = &self.raw.raft;
        if raft.state == StateRole::Leader || self.removed {
            return;
        }
        let voters = self.raw.store().conf_state().voters;
        let caught_up = self.raw.raft.raft_log.applied >= self.raw.raft.raft_log.committed;
        if voters == [self.id]
            && caught_up
            && let Err(error) = self.raw.campaign()
        {
            tracing::debug!(node_id = self.id, %error, "campaign as the only voter rejected");
        }
    }

    pub(crate) fn step(&mut self, message: Message) {
        if self.halted.is_some() {
            return;
        }
        let from = message.from;
        let kind = message.get_msg_type();
        if let Err(error) = self.raw.step(message) {
            tracing::debug!(node_id = self.id, from, ?kind, %error, "dropped a Raft message");
        }
    }

    pub(crate) fn report_unreachable(&mut self, peer: u64) {
        self.raw.report_unreachable(peer);
    }

    pub(crate) fn report_snapshot(&mut self, peer: u64, delivered: bool) {
        let status = if delivered { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
        if delivered {
            self.stats.snapshots_sent += 1;
        }
        self.raw.report_snapshot(peer, status);
    }

    /// Queues a proposal for the next batch. A request id that is already
    /// waiting gets the same result instead of a second proposal.
    pub(crate) fn propose(&mut self, proposal: Proposal, reply: Reply<S::Output>, now: Instant) {
        if let Err(error) = self.accepting() {
            let _ = reply.send(Err(error));
            return;
        }
        let size = proposal.encoded_len();
        if size > self.config.max_batch_bytes {
            let _ = reply.send(Err(RaftError::TooLarge { size, limit: self.config.max_batch_bytes }));
            return;
        }
        if let Some(pending) = self.pending.get_mut(&proposal.request_id) {
            pending.replies.push(reply);
            return;
        }
        if self.batch_bytes + size > self.config.max_batch_bytes {
            self.flush(now);
        }
        let request_id = proposal.request_id;
        let deadline = now + self.config.proposal_timeout;
        self.pending.insert(request_id, Pending { proposal, replies: vec![reply], deadline, proposed_at: None });
        self.batch.push(request_id);
        self.batch_bytes += size;
        self.batch_started.get_or_insert(now);
        if self.batch.len() >= self.config.max_batch_proposals {
            self.flush(now);
        }
    }

    /// Hands the batch to raft-rs if it is full or has waited long enough.
    pub(crate) fn flush_if_due(&mut self, now: Instant) {
        if let Some(started) = self.batch_started
            && now.saturating_duration_since(started) >= self.config.batch_delay
        {
            self.flush(now);
        }
    }

    /// When the current batch must be flushed, if there is one.
    pub(crate) fn batch_due(&self) -> Option<Instant> {
        self.batch_started.map(|started| started + self.config.batch_delay)
    }

    /// Proposes the batched proposals as one entry. If no leader is known,
    /// they fail at once with the last known leader in the error.
    pub(crate) fn flush(&mut self, now: Instant) {
        if self.batch.is_empty() {
            self.batch_started = None;
            return;
        }
        let ids = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        self.batch_started = None;

        let proposals: Vec<Proposal> =
            ids.iter().filter_map(|id| self.pending.get(id).map(|pending| pending.proposal.clone())).collect();
        if proposals.is_empty() {
            return;
        }
        let data = proposal::encode_batch(&proposals);
        match self.raw.propose(Vec::new(), data) {
            Ok(()) => {
                self.stats.batches_proposed += 1;
                self.stats.proposals_batched += proposals.len() as u64;
                for id in &ids {
                    if let Some(pending) = self.pending.get_mut(id) {
                        pending.proposed_at = Some(now);
                    }
                }
            }
            Err(error) => {
                tracing::debug!(node_id = self.id, %error, proposals = ids.len(), "proposal dropped by Raft");
                let failure = self.no_leader();
                for id in ids {
                    self.fail_proposal(&id, failure.clone());
                }
            }
        }
    }

    /// Starts a linearizable read: the reply carries an index that is
    /// applied on this node and covers every write acknowledged before.
    pub(crate) fn read_index(&mut self, reply: Reply<u64>, now: Instant) {
        if let Err(error) = self.accepting() {
            let _ = reply.send(Err(error));
            return;
        }
        if self.leader.is_none() {
            let _ = reply.send(Err(self.no_leader()));
            return;
        }
        let context = self.next_read;
        self.next_read += 1;
        self.raw.read_index(context.to_be_bytes().to_vec());
        self.reads_waiting_index.insert(context, PendingRead { reply, deadline: now + self.config.proposal_timeout });
    }

    /// Proposes a membership change; joint consensus is used when the
    /// change has more than one step.
    pub(crate) fn change_membership(&mut self, changes: Vec<MembershipChange>, reply: Reply<()>, now: Instant) {
        if let Err(error) = self.accepting() {
            let _ = reply.send(Err(error));
            return;
        }
        if changes.is_empty() {
            let _ = reply.send(Err(RaftError::Membership("no change given".to_owned())));
            return;
        }
        let request_id = RequestId::random();
        let mut addresses = BTreeMap::new();
        let mut change = ConfChangeV2::default();
        change.set_transition(ConfChangeTransition::Auto);
        for step in &changes {
            let (kind, id) = match step {
                MembershipChange::AddLearner { id, address } => {
                    addresses.insert(*id, address.clone());
                    (ConfChangeType::AddLearnerNode, *id)
                }
                MembershipChange::AddVoter { id, address } => {
                    addresses.insert(*id, address.clone());
                    (ConfChangeType::AddNode, *id)
                }
                MembershipChange::Remove { id } => (ConfChangeType::RemoveNode, *id),
            };
            let mut single = ConfChangeSingle::default();
            single.set_change_type(kind);
            single.node_id = id;
            change.mut_changes().push(single);
        }
        let mut context = request_id.0.to_vec();
        context.extend_from_slice(&snapshot::encode_peers(&addresses));
        change.context = context.into();

        match self.raw.propose_conf_change(Vec::new(), change) {
            Ok(()) => {
                self.membership.insert(request_id, (reply, now + self.config.proposal_timeout));
            }
            Err(raft::Error::ProposalDropped) => {
                let _ = reply.send(Err(self.no_leader()));
            }
            Err(error) => {
                let _ = reply.send(Err(RaftError::Membership(error.to_string())));
            }
        }
    }

    pub(crate) fn transfer_leader(&mut self, to: u64) {
        self.raw.transfer_leader(to);
    }

    pub(crate) fn campaign(&mut self) -> Result<(), RaftError> {
        self.raw.campaign().map_err(|error| RaftError::Invariant(error.to_string()))
    }

    /// Handles raft-rs's Ready: persists, applies, and returns the messages
    /// to send. A storage failure halts the node.
    pub(crate) fn process_ready(&mut self, now: Instant) -> Vec<Message> {
        let mut outbox = Vec::new();
        if self.halted.is_some() || !self.raw.has_ready() {
            return outbox;
        }
        if let Err(error) = self.handle_ready(now, &mut outbox) {
            self.halt(&error);
            outbox.clear();
        }
        outbox
    }

    fn handle_ready(&mut self, now: Instant, outbox: &mut Vec<Message>) -> Result<(), RaftError> {
        let mut ready = self.raw.ready();
        if let Some(soft) = ready.ss() {
            self.observe_leader(soft.leader_id, soft.raft_state, now);
        }

        outbox.extend(ready.take_messages());
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().clone())?;
        }
        let committed = ready.take_committed_entries();
        self.apply_entries(committed)?;
        self.raw.store().append(ready.entries(), ready.hs())?;
        outbox.extend(ready.take_persisted_messages());
        for state in ready.take_read_states() {
            self.read_index_known(&state.request_ctx, state.index);
        }

        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.store().set_commit(commit)?;
        }
        outbox.extend(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_entries(committed)?;
        self.raw.advance_apply();

        self.answer_reads();
        self.maybe_snapshot()?;
        self.campaign_if_sole_voter();
        Ok(())
    }

    fn observe_leader(&mut self, leader: u64, state: StateRole, now: Instant) {
        let leader = (leader != 0).then_some(leader);
        self.role = Role::from(state);
        if leader != self.leader {
            tracing::info!(node_id = self.id, leader = ?leader, term = self.raw.raft.term, "Raft leader changed");
            self.leader = leader;
            if leader.is_some() {
                self.last_leader = leader;
                // Proposals forwarded to the old leader may be lost; send
                // them again to the new one. Their request ids make a second
                // apply harmless.
                self.repropose_all(now);
            }
        }
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), RaftError> {
        for entry in entries {
            if entry.index <= self.machine.applied_index() {
                continue;
            }
            let size = entry.data.len() as u64;
            self.applied_sizes.push_back((entry.index, size));
            self.bytes_since_snapshot += size;
            match entry.get_entry_type() {
                EntryType::EntryNormal => self.apply_normal(&entry)?,
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => self.apply_membership(&entry)?,
            }
        }
        Ok(())
    }

    fn apply_normal(&mut self, entry: &Entry) -> Result<(), RaftError> {
        let proposals = proposal::decode_batch(entry.index, &entry.data)?;
        let outputs = self.machine.apply(entry.index, &proposals)?;
        if outputs.len() != proposals.len() {
            return Err(RaftError::StateMachine(format!(
                "entry {} has {} proposals but the state machine gave {} results",
                entry.index,
                proposals.len(),
                outputs.len()
            )));
        }
        self.stats.entries_applied += 1;
        for (proposal, output) in proposals.iter().zip(outputs) {
            if let Some(pending) = self.pending.remove(&proposal.request_id) {
                for reply in pending.replies {
                    let _ = reply.send(Ok(output.clone()));
                }
            }
        }
        Ok(())
    }

    fn apply_membership(&mut self, entry: &Entry) -> Result<(), RaftError> {
        let change = decode_conf_change(entry)?;
        let context = change.get_context().to_vec();
        let (request_id, addresses) = split_membership_context(&context)?;

        let result = match self.raw.apply_conf_change(&change) {
            Ok(conf_state) => {
                let mut peers = self.raw.store().peers();
                peers.extend(addresses);
                for single in change.get_changes() {
                    if single.get_change_type() == ConfChangeType::RemoveNode {
                        peers.remove(&single.node_id);
                        if single.node_id == self.id {
                            self.removed = true;
                        }
                    }
                }
                self.raw.store().set_conf_state(&conf_state, &peers)?;
                tracing::info!(
                    node_id = self.id,
                    index = entry.index,
                    voters = ?conf_state.voters,
                    learners = ?conf_state.learners,
                    "applied a membership change"
                );
                Ok(())
            }
            Err(error) => {
                tracing::warn!(node_id = self.id, index = entry.index, %error, "membership change rejected by Raft");
                Err(RaftError::Membership(error.to_string()))
            }
        };
        self.machine.apply(entry.index, &[])?;
        if let Some(request_id) = request_id
            && let Some((reply, _)) = self.membership.remove(&request_id)
        {
            let _ = reply.send(result);
        }
        Ok(())
    }

    fn install_snapshot(&mut self, snapshot: Snapshot) -> Result<(), RaftError> {
        let metadata = snapshot.get_metadata().clone();
        let (index, term) = snapshot::parse_descriptor(&snapshot.data)?;
        if (index, term) != (metadata.index, metadata.term) {
            return Err(RaftError::Snapshot(format!(
                "descriptor {index}-{term} does not match metadata {}-{}",
                metadata.index, metadata.term
            )));
        }
        let dir = self.snapshots.incoming_dir(index, term);
        let peers = SnapshotStore::read_peers(&dir)?;
        self.machine.restore(&SnapshotStore::state_dir(&dir), index)?;
        self.raw.store().apply_snapshot(&metadata, &peers)?;
        self.snapshots.clear_incoming(None);
        self.last_snapshot_index = index;
        self.stats.snapshots_received += 1;
        tracing::info!(node_id = self.id, index, term, "installed a snapshot from the leader");
        Ok(())
    }

    /// Takes a snapshot every `snapshot_interval` applied entries, or when
    /// raft-rs needs one to send, then drops old log entries.
    fn maybe_snapshot(&mut self) -> Result<(), RaftError> {
        let applied = self.machine.applied_index();
        let wanted = self.raw.store().take_snapshot_wanted();
        let due = applied >= self.last_snapshot_index + self.config.snapshot_interval
            || self.bytes_since_snapshot >= self.config.snapshot_log_bytes;
        if applied == 0 || !(wanted || due) {
            return Ok(());
        }
        if applied <= self.last_snapshot_index && !wanted {
            return Ok(());
        }
        self.take_snapshot(applied)?;
        Ok(())
    }

    pub(crate) fn take_snapshot(&mut self, applied: u64) -> Result<(), RaftError> {
        let store = self.raw.store();
        let term = store.term(applied).map_err(|error| RaftError::Invariant(format!("term of {applied}: {error}")))?;
        let mut metadata = SnapshotMetadata { index: applied, term, ..Default::default() };
        metadata.set_conf_state(store.conf_state());
        let peers = store.peers();

        let started = Instant::now();
        let machine = &mut self.machine;
        self.snapshots.take(&metadata, &peers, |dir| machine.checkpoint(dir))?;
        self.machine.sync()?;
        let store = self.raw.store();
        store.set_latest_snapshot(metadata);
        self.last_snapshot_index = applied;
        self.bytes_since_snapshot = 0;
        self.stats.snapshots_taken += 1;

        let compact_to = self.compaction_point(applied);
        if compact_to > 1 {
            store.compact(compact_to)?;
        }
        self.applied_sizes.retain(|(index, _)| *index >= compact_to);
        tracing::info!(
            node_id = self.id,
            index = applied,
            term,
            elapsed_ms = started.elapsed().as_millis() as u64,
            log_starts_at = store.bounds().0,
            "took a snapshot"
        );
        Ok(())
    }

    /// Returns the first index to keep after a snapshot at `applied`: at most
    /// `log_entries_kept` entries and about half of `snapshot_log_bytes`, so that a follower a
    /// little behind catches up from the log and one far behind gets the snapshot.
    fn compaction_point(&self, applied: u64) -> u64 {
        let by_count = applied.saturating_sub(self.config.log_entries_kept);
        let byte_budget = self.config.snapshot_log_bytes / 2;
        let mut kept_bytes = 0u64;
        let mut by_bytes = 0u64;
        for (index, size) in self.applied_sizes.iter().rev() {
            kept_bytes += size;
            if kept_bytes > byte_budget {
                by_bytes = *index + 1;
                break;
            }
        }
        by_count.max(by_bytes).min(applied)
    }

    fn read_index_known(&mut self, context: &[u8], index: u64) {
        let Ok(bytes) = <[u8; 8]>::try_from(context) else {
            return;
        };
        if let Some(read) = self.reads_waiting_index.remove(&u64::from_be_bytes(bytes)) {
            self.reads_waiting_apply.push_back((index, read));
        }
    }

    fn answer_reads(&mut self) {
        let applied = self.machine.applied_index();
        let mut waiting = VecDeque::with_capacity(self.reads_waiting_apply.len());
        for (index, read) in self.reads_waiting_apply.drain(..) {
            if index <= applied {
                let _ = read.reply.send(Ok(applied));
            } else {
                waiting.push_back((index, read));
            }
        }
        self.reads_waiting_apply = waiting;
    }

    /// Fails whatever passed its deadline.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<RequestId> =
            self.pending.iter().filter(|(_, pending)| pending.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            let error = self.timeout();
            self.fail_proposal(&id, error);
        }
        self.batch.retain(|id| self.pending.contains_key(id));

        let reads: Vec<u64> =
            self.reads_waiting_index.iter().filter(|(_, read)| read.deadline <= now).map(|(id, _)| *id).collect();
        for context in reads {
            if let Some(read) = self.reads_waiting_index.remove(&context) {
                let _ = read.reply.send(Err(self.timeout()));
            }
        }
        let timeout = self.timeout();
        let (late, waiting): (VecDeque<_>, VecDeque<_>) =
            self.reads_waiting_apply.drain(..).partition(|(_, read)| read.deadline <= now);
        self.reads_waiting_apply = waiting;
        for (_, read) in late {
            let _ = read.reply.send(Err(timeout.clone()));
        }

        let changes: Vec<RequestId> =
            self.membership.iter().filter(|(_, (_, deadline))| *deadline <= now).map(|(id, _)| *id).collect();
        for id in changes {
            if let Some((reply, _)) = self.membership.remove(&id) {
                let _ = reply.send(Err(self.timeout()));
            }
        }
    }

    /// Proposes again what was handed to raft-rs long ago and is still not
    /// applied: the message to the leader may have been lost.
    fn repropose_stale(&mut self, now: Instant) {
        let retry = self.config.retry_interval;
        let stale: Vec<RequestId> = self
            .pending
            .iter()
            .filter(|(_, pending)| pending.proposed_at.is_some_and(|at| now.saturating_duration_since(at) >= retry))
            .map(|(id, _)| *id)
            .collect();
        self.requeue(stale, now);
    }

    fn repropose_all(&mut self, now: Instant) {
        let proposed: Vec<RequestId> =
            self.pending.iter().filter(|(_, pending)| pending.proposed_at.is_some()).map(|(id, _)| *id).collect();
        self.requeue(proposed, now);
    }

    fn requeue(&mut self, mut ids: Vec<RequestId>, now: Instant) {
        if ids.is_empty() {
            return;
        }
        ids.sort_unstable();
        self.stats.proposals_retried += ids.len() as u64;
        for id in ids {
            if let Some(pending) = self.pending.get_mut(&id) {
                pending.proposed_at = None;
                self.batch_bytes += pending.proposal.encoded_len();
                self.batch.push(id);
            }
        }
        self.batch_started.get_or_insert(now);
    }

    fn fail_proposal(&mut self, id: &RequestId, error: RaftError) {
        if let Some(pending) = self.pending.remove(id) {
            for reply in pending.replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }

    fn accepting(&self) -> Result<(), RaftError> {
        if self.halted.is_some() {
            return Err(RaftError::StorageFailed);
        }
        if self.removed {
            return Err(RaftError::Membership(format!("node {} was removed from the cluster", self.id)));
        }
        Ok(())
    }

    fn no_leader(&self) -> RaftError {
        RaftError::NoLeader { node: self.id, last_leader: self.last_leader }
    }

    fn timeout(&self) -> RaftError {
        RaftError::Timeout {
            node: self.id,
            timeout_ms: self.config.proposal_timeout.as_millis() as u64,
            last_leader: self.last_leader,
        }
    }

    /// Stops the node after a storage failure: nothing more is written,
    /// and every waiter gets the failure.
    fn halt(&mut self, error: &RaftError) {
        tracing::error!(node_id = self.id, %error, "Raft node stopped after a storage failure");
        self.halted = Some(error.to_string());
        let ids: Vec<RequestId> = self.pending.keys().copied().collect();
        for id in ids {
            self.fail_proposal(&id, RaftError::StorageFailed);
        }
        self.batch.clear();
        for (_, read) in self.reads_waiting_index.drain() {
            let _ = read.reply.send(Err(RaftError::StorageFailed));
        }
        for (_, read) in self.reads_waiting_apply.drain(..) {
            let _ = read.reply.send(Err(RaftError::StorageFailed));
        }
        for (_, (reply, _)) in self.membership.drain() {
            let _ = reply.send(Err(RaftError::StorageFailed));
        }
    }

    /// Fails every waiter; used when the node stops.
    pub(crate) fn shut_down(&mut self) {
        let ids: Vec<RequestId> = self.pending.keys().copied().collect();
        for id in ids {
            self.fail_proposal(&id, RaftError::Stopped);
        }
        for (_, read) in self.reads_waiting_index.drain() {
            let _ = read.reply.send(Err(RaftError::Stopped));
        }
        for (_, read) in self.reads_waiting_apply.drain(..) {
            let _ = read.reply.send(Err(RaftError::Stopped));
        }
        for (_, (reply, _)) in self.membership.drain() {
            let _ = reply.send(Err(RaftError::Stopped));
        }
        if let Err(error) = self.machine.sync() {
            tracing::warn!(node_id = self.id, %error, "state machine sync at shutdown failed");
        }
    }

    pub(crate) fn fail_log_writes(&self) {
        self.raw.store().fail_writes();
    }

    pub(crate) fn peers(&self) -> BTreeMap<u64, String> {
        self.raw.store().peers()
    }

    pub(crate) fn snapshots(&self) -> &Arc<SnapshotStore> {
        &self.snapshots
    }

    pub(crate) fn machine(&self) -> &S {
        &self.machine
    }

    pub(crate) fn into_machine(self) -> S {
        self.machine
    }

    pub(crate) fn status(&self) -> NodeStatus {
        let raft = &self.raw.raft;
        let store = self.raw.store();
        let conf_state = store.conf_state();
        let (first_index, last_index) = store.bounds();
        let role = if conf_state.learners.contains(&self.id) { Role::Learner } else { self.role };
        let progress = if self.role == Role::Leader {
            raft.prs().iter().map(|(id, progress)| (*id, progress.matched)).collect()
        } else {
            BTreeMap::new()
        };
        NodeStatus {
            id: self.id,
            role,
            term: raft.term,
            leader: self.leader,
            last_leader: self.last_leader,
            commit_index: raft.raft_log.committed,
            applied_index: self.machine.applied_index(),
            first_index,
            last_index,
            snapshot_index: self.last_snapshot_index,
            voters: conf_state.voters.clone(),
            learners: conf_state.learners.clone(),
            peers: store.peers(),
            pending_proposals: self.pending.len(),
            halted: self.halted.clone(),
            removed: self.removed,
            stats: self.stats.clone(),
            progress,
        }
    }

    /// True when a message of this kind needs a snapshot transfer first.
    pub(crate) fn is_snapshot(message: &Message) -> bool {
        message.get_msg_type() == MessageType::MsgSnapshot
    }

    pub(crate) fn tick_interval(&self) -> Duration {
        self.config.tick_interval
    }
}

fn decode_conf_change(entry: &Entry) -> Result<ConfChangeV2, RaftError> {
    use protobuf::Message as _;
    let corrupt = |error: protobuf::ProtobufError| RaftError::Corrupt(format!("entry {}: {error}", entry.index));
    match entry.get_entry_type() {
        EntryType::EntryConfChangeV2 => ConfChangeV2::parse_from_bytes(&entry.data).map_err(corrupt),
        _ => Ok(ConfChange::parse_from_bytes(&entry.data).map_err(corrupt)?.into_v2()),
    }
}

/// Splits the context of a membership change: the request id, then the addresses
/// of the nodes it adds. Changes made by raft-rs itself have no context.
fn split_membership_context(context: &[u8]) -> Result<(Option<RequestId>, BTreeMap<u64, String>), RaftError> {
    if context.len() < 16 {
        return Ok((None, BTreeMap::new()));
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&context[..16]);
    Ok((Some(RequestId(id)), snapshot::decode_peers(&context[16..])?))
}
