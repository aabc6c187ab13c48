//! A Raft node on its own thread, and the handle the rest of the process
//! uses to talk to it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use raft::eraftpb::Message;
use tokio::sync::oneshot;

use crate::config::NodeConfig;
use crate::core::{Core, MembershipChange, Reply};
use crate::error::RaftError;
use crate::proposal::Proposal;
use crate::snapshot::SnapshotStore;
use crate::state_machine::StateMachine;
use crate::status::NodeStatus;
use crate::storage::LogStore;

/// Inputs handled in one pass of the node's loop at most, so that ticks
/// and Ready handling are not starved under load.
const MAX_INPUTS_PER_PASS: usize = 8192;

/// Interval at which a busy node publishes its status and checks for new peer addresses.
const STATUS_INTERVAL: Duration = Duration::from_millis(5);

/// Carries Raft messages to the other nodes.
pub trait Transport: Send + Sync + 'static {
    /// Queues messages for their peers and returns without waiting. A
    /// message that cannot be delivered is dropped (Raft sends again) and
    /// reported with [`NodeHandle::report_unreachable`]. Snapshot messages
    /// are sent after their files, then reported with
    /// [`NodeHandle::report_snapshot`].
    fn send(&self, messages: Vec<Message>);

    /// Updates the addresses of the cluster's nodes.
    fn set_peers(&self, peers: &BTreeMap<u64, String>);
}

enum Input<O> {
    Propose(Proposal, Reply<O>),
    Step(Message),
    Read(Reply<u64>),
    Membership(Vec<MembershipChange>, Reply<()>),
    Unreachable(u64),
    SnapshotReport { peer: u64, delivered: bool },
    TransferLeader(u64),
    Campaign,
    Stop,
}

/// A cloneable handle to a running node.
pub struct NodeHandle<O> {
    id: u64,
    inputs: mpsc::Sender<Input<O>>,
    status: Arc<Mutex<NodeStatus>>,
    snapshots: Arc<SnapshotStore>,
}

impl<O> Clone for NodeHandle<O> {
    fn clone(&self) -> Self {
        NodeHandle {
            id: self.id,
            inputs: self.inputs.clone(),
            status: Arc::clone(&self.status),
            snapshots: Arc::clone(&self.snapshots),
        }
    }
}

impl<O: Send + 'static> NodeHandle<O> {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Proposes a command and resolves with its result once the entry
    /// carrying it is applied on this node.
    pub async fn propose(&self, proposal: Proposal) -> Result<O, RaftError> {
        let (reply, result) = oneshot::channel();
        self.send(Input::Propose(proposal, reply))?;
        result.await.map_err(|_| RaftError::Stopped)?
    }

    /// Resolves once this node has applied every write acknowledged by the
    /// cluster before the call, with the applied index.
    pub async fn read_index(&self) -> Result<u64, RaftError> {
        let (reply, result) = oneshot::channel();
        self.send(Input::Read(reply))?;
        result.await.map_err(|_| RaftError::Stopped)?
    }

    /// Changes the membership and resolves once the change is applied.
    pub async fn change_membership(&self, changes: Vec<MembershipChange>) -> Result<(), RaftError> {
        let (reply, result) = oneshot::channel();
        self.send(Input::Membership(changes, reply))?;
        result.await.map_err(|_| RaftError::Stopped)?
    }

    /// Hands messages from peers to the node.
    pub fn step(&self, messages: Vec<Message>) -> Result<(), RaftError> {
        for message in messages {
            self.send(Input::Step(message))?;
        }
        Ok(())
    }

    pub fn report_unreachable(&self, peer: u64) {
        let _ = self.send(Input::Unreachable(peer));
    }

    pub fn report_snapshot(&self, peer: u64, delivered: bool) {
        let _ = self.send(Input::SnapshotReport { peer, delivered });
    }

    /// Asks the leader to hand leadership to `to`.
    pub fn transfer_leader(&self, to: u64) {
        let _ = self.send(Input::TransferLeader(to));
    }

    /// Starts an election on this node.
    pub fn campaign(&self) {
        let _ = self.send(Input::Campaign);
    }

    /// Returns the node's status as of its last pass.
    pub fn status(&self) -> NodeStatus {
        self.status.lock().clone()
    }

    /// Returns the node's snapshot folders, for the transport.
    pub fn snapshots(&self) -> &Arc<SnapshotStore> {
        &self.snapshots
    }

    fn send(&self, input: Input<O>) -> Result<(), RaftError> {
        self.inputs.send(input).map_err(|_| RaftError::Stopped)
    }
}

/// A running Raft node. Stopping it returns the state machine.
pub struct Node<S: StateMachine> {
    handle: NodeHandle<S::Output>,
    thread: Option<JoinHandle<S>>,
}

impl<S: StateMachine> Node<S> {
    /// Starts the node's thread. A new cluster's log must first be given its
    /// voters with [`LogStore::bootstrap`]; a node that joins starts with an
    /// empty log and learns the cluster from the leader.
    pub fn start(
        config: NodeConfig,
        log: LogStore,
        machine: S,
        snapshots: Arc<SnapshotStore>,
        transport: Arc<dyn Transport>,
    ) -> Result<Node<S>, RaftError> {
        let id = config.id;
        let core = Core::new(config, log, machine, Arc::clone(&snapshots))?;
        let status = Arc::new(Mutex::new(core.status()));
        let (inputs, receiver) = mpsc::channel();
        let handle = NodeHandle { id, inputs, status: Arc::clone(&status), snapshots };
        transport.set_peers(&core.peers());

        let thread = thread::Builder::new()
            .name(format!("sigil-raft-{id}"))
            .spawn(move || run(core, &receiver, &*transport, &status))
            .map_err(|error| RaftError::Invariant(format!("start the Raft thread: {error}")))?;
        tracing::info!(node_id = id, "Raft node started");
        Ok(Node { handle, thread: Some(thread) })
    }

    pub fn handle(&self) -> NodeHandle<S::Output> {
        self.handle.clone()
    }

    /// Stops the node: waiters fail with [`RaftError::Stopped`], the state
    /// machine is synced and returned.
    pub fn stop(mut self) -> Option<S> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Option<S> {
        let _ = self.handle.inputs.send(Input::Stop);
        let thread = self.thread.take()?;
        match thread.join() {
            Ok(machine) => Some(machine),
            Err(_) => {
                tracing::error!(node_id = self.handle.id, "Raft thread panicked");
                None
            }
        }
    }
}

impl<S: StateMachine> Drop for Node<S> {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn run<S: StateMachine>(
    mut core: Core<S>,
    inputs: &mpsc::Receiver<Input<S::Output>>,
    transport: &dyn Transport,
    status: &Mutex<NodeStatus>,
) -> S {
    let tick = core.tick_interval();
    let mut next_tick = Instant::now() + tick;
    let mut peers = core.peers();
    let mut next_status = Instant::now();

    'run: loop {
        let now = Instant::now();
        let wake = core.batch_due().map_or(next_tick, |due| due.min(next_tick));
        match inputs.recv_timeout(wake.saturating_duration_since(now)) {
            Ok(input) => {
                if !handle_input(&mut core, input) {
                    break 'run;
                }
                for input in inputs.try_iter().take(MAX_INPUTS_PER_PASS) {
                    if !handle_input(&mut core, input) {
                        break 'run;
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break 'run,
        }

        let now = Instant::now();
        if now >= next_tick {
            core.tick(now);
            next_tick = if now >= next_tick + tick { now + tick } else { next_tick + tick };
        }
        core.flush_if_due(now);
        loop {
            let messages = core.process_ready(Instant::now());
            if messages.is_empty() {
                break;
            }
            transport.send(messages);
        }

        // The status and peer map are copies, so under load they are refreshed at an interval
        // rather than after every batch.
        let now = Instant::now();
        if now >= next_status {
            let current = core.peers();
            if current != peers {
                transport.set_peers(&current);
                peers = current;
            }
            *status.lock() = core.status();
            next_status = now + STATUS_INTERVAL;
        }
    }

    core.shut_down();
    *status.lock() = core.status();
    tracing::info!(node_id = core.id(), "Raft node stopped");
    core.into_machine()
}

/// Handles one input; false means stop.
fn handle_input<S: StateMachine>(core: &mut Core<S>, input: Input<S::Output>) -> bool {
    let now = Instant::now();
    match input {
        Input::Propose(proposal, reply) => core.propose(proposal, reply, now),
        Input::Step(message) => core.step(message),
        Input::Read(reply) => core.read_index(reply, now),
        Input::Membership(changes, reply) => core.change_membership(changes, reply, now),
        Input::Unreachable(peer) => core.report_unreachable(peer),
        Input::SnapshotReport { peer, delivered } => core.report_snapshot(peer, delivered),
        Input::TransferLeader(to) => core.transfer_leader(to),
        Input::Campaign => {
            if let Err(error) = core.campaign() {
                tracing::warn!(node_id = core.id(), %error, "campaign rejected");
            }
        }
        Input::Stop => return false,
    }
    true
}
