//! A simulated network for deterministic tests of the Raft layer.
//!
//! Every node is a real [`Core`] with its log in RocksDB, driven from one
//! thread on a virtual clock. Messages between nodes go through links that
//! can drop, delay, reorder and partition them; the choices come from a
//! seeded generator, so a seed replays the same run. Snapshot messages are
//! preceded by the chunked file transfer the real transport does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft::eraftpb::Message;
use tokio::sync::oneshot;

use crate::config::NodeConfig;
use crate::core::{Core, MembershipChange};
use crate::error::RaftError;
use crate::proposal::Proposal;
use crate::snapshot::{self, SnapshotStore};
use crate::state_machine::StateMachine;
use crate::status::{NodeStatus, Role};
use crate::storage::LogStore;

/// Behaviour of one direction of a link between two nodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Probability in [0, 1] that a message is lost.
    pub drop: f64,
    /// Shortest delivery delay.
    pub min_delay: Duration,
    /// Maximum delivery delay; messages with different delays overtake
    /// each other, which reorders them.
    pub max_delay: Duration,
    /// When true, nothing passes.
    pub cut: bool,
}

impl Default for Link {
    fn default() -> Self {
        Link { drop: 0.0, min_delay: Duration::from_millis(1), max_delay: Duration::from_millis(1), cut: false }
    }
}

struct InFlight {
    deliver_at: Instant,
    sequence: u64,
    message: Message,
}

/// Builds the state machine of node `id` with its data in `dir`; called
/// at start and after every simulated crash.
pub type MachineFactory<S> = Box<dyn Fn(u64, &Path) -> S>;

/// A cluster of nodes on a simulated network.
pub struct SimCluster<S: StateMachine> {
    root: PathBuf,
    factory: MachineFactory<S>,
    configs: BTreeMap<u64, NodeConfig>,
    nodes: BTreeMap<u64, Option<Core<S>>>,
    links: BTreeMap<(u64, u64), Link>,
    default_link: Link,
    in_flight: Vec<InFlight>,
    sequence: u64,
    start: Instant,
    now: Instant,
    random: u64,
    /// Messages delivered and dropped, for tests that check the links act.
    pub delivered: u64,
    pub dropped: u64,
}

impl<S: StateMachine> SimCluster<S> {
    /// Creates a cluster whose first voters are `ids`, with its files under
    /// `root`, and the generator seeded with `seed`. Each node gets its own
    /// fixed election timeout so that runs are repeatable without ties.
    pub fn new(root: &Path, ids: &[u64], seed: u64, factory: MachineFactory<S>) -> Result<SimCluster<S>, RaftError> {
        let now = Instant::now();
        let mut cluster = SimCluster {
            root: root.to_owned(),
            factory,
            configs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            links: BTreeMap::new(),
            default_link: Link::default(),
            in_flight: Vec::new(),
            sequence: 0,
            start: now,
            now,
            random: seed.max(1),
            delivered: 0,
            dropped: 0,
        };
        let peers: BTreeMap<u64, String> = ids.iter().map(|id| (*id, format!("sim-{id}"))).collect();
        for (position, id) in ids.iter().enumerate() {
            let config = sim_config(*id, position);
            let log = LogStore::open(&cluster.node_dir(*id).join("log"))?;
            log.bootstrap(&peers, &[])?;
            drop(log);
            cluster.configs.insert(*id, config);
            cluster.start_node(*id)?;
        }
        Ok(cluster)
    }

    /// Adds a node with an empty log that the cluster can then add as a
    /// learner; it learns the configuration from the leader.
    pub fn add_empty_node(&mut self, id: u64) -> Result<(), RaftError> {
        let position = self.configs.len();
        self.configs.insert(id, sim_config(id, position));
        self.start_node(id)
    }

    /// Changes the settings of node `id` (applied at its next restart).
    pub fn config_mut(&mut self, id: u64) -> Option<&mut NodeConfig> {
        self.configs.get_mut(&id)
    }

    pub fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time since the cluster started.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    pub fn set_default_link(&mut self, link: Link) {
        self.default_link = link;
    }

    /// Sets both directions of the link between `a` and `b`.
    pub fn set_link(&mut self, a: u64, b: u64, link: Link) {
        self.links.insert((a, b), link);
        self.links.insert((b, a), link);
    }

    /// Cuts every link between the groups; links inside a group keep
    /// their settings.
    pub fn partition(&mut self, groups: &[&[u64]]) {
        for (position, group) in groups.iter().enumerate() {
            for other in &groups[position + 1..] {
                for a in *group {
                    for b in *other {
                        let mut link = self.link(*a, *b);
                        link.cut = true;
                        self.set_link(*a, *b, link);
                    }
                }
            }
        }
    }

    /// Restores every link to the default.
    pub fn heal(&mut self) {
        self.links.clear();
    }

    /// Stops node `id` as a crash would: its in-memory state is lost, and
    /// so are messages to and from it in flight.
    pub fn crash(&mut self, id: u64) {
        if let Some(slot) = self.nodes.get_mut(&id) {
            *slot = None;
        }
        self.in_flight.retain(|flight| flight.message.to != id && flight.message.from != id);
    }

    /// Starts a crashed node again from its files.
    pub fn restart(&mut self, id: u64) -> Result<(), RaftError> {
        self.start_node(id)
    }

    /// Makes every later write of node `id`'s Raft log fail, as a broken
    /// disk would.
    pub fn fail_disk(&mut self, id: u64) {
        if let Some(core) = self.node_mut(id) {
            core.fail_log_writes();
        }
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.nodes.get(&id).is_some_and(Option::is_some)
    }

    /// Proposes on node `id`; the receiver resolves when it is applied
    /// there, or fails.
    pub fn propose(&mut self, id: u64, proposal: Proposal) -> oneshot::Receiver<Result<S::Output, RaftError>> {
        let (reply, result) = oneshot::channel();
        let now = self.now;
        match self.node_mut(id) {
            Some(core) => core.propose(proposal, reply, now),
            None => {
                let _ = reply.send(Err(RaftError::Stopped));
            }
        }
        result
    }

    pub fn read_index(&mut self, id: u64) -> oneshot::Receiver<Result<u64, RaftError>> {
        let (reply, result) = oneshot::channel();
        let now = self.now;
        match self.node_mut(id) {
            Some(core) => core.read_index(reply, now),
            None => {
                let _ = reply.send(Err(RaftError::Stopped));
            }
        }
        result
    }

    pub fn change_membership(
        &mut self,
        id: u64,
        changes: Vec<MembershipChange>,
    ) -> oneshot::Receiver<Result<(), RaftError>> {
        let (reply, result) = oneshot::channel();
        let now = self.now;
        match self.node_mut(id) {
            Some(core) => core.change_membership(changes, reply, now),
            None => {
                let _ = reply.send(Err(RaftError::Stopped));
            }
        }
        result
    }

    /// Forces node `id` to take a snapshot now and compact its log.
    pub fn take_snapshot(&mut self, id: u64) -> Result<(), RaftError> {
        let core = self.node_mut(id).ok_or(RaftError::Stopped)?;
        let applied = core.machine().applied_index();
        core.take_snapshot(applied)
    }

    pub fn status(&self, id: u64) -> Option<NodeStatus> {
        self.nodes.get(&id)?.as_ref().map(Core::status)
    }

    pub fn machine(&self, id: u64) -> Option<&S> {
        self.nodes.get(&id)?.as_ref().map(Core::machine)
    }

    /// Returns the running node that is leader in the highest term, if any.
    pub fn leader(&self) -> Option<u64> {
        self.nodes
            .values()
            .flatten()
            .map(Core::status)
            .filter(|status| status.role == Role::Leader)
            .max_by_key(|status| status.term)
            .map(|status| status.id)
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// Advances virtual time by `duration`, one millisecond at a time:
    /// ticks, batches, Ready handling and message delivery.
    pub fn run_for(&mut self, duration: Duration) {
        let end = self.now + duration;
        let step = Duration::from_millis(1);
        while self.now < end {
            self.now += step;
            self.step_all();
        }
    }

    /// Runs until `done` is true or `limit` of virtual time passed;
    /// returns whether `done` became true.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            if done(self) {
                return true;
            }
            self.run_for(Duration::from_millis(10));
        }
        done(self)
    }

    fn step_all(&mut self) {
        let now = self.now;
        let elapsed_ms = (now - self.start).as_millis();
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in &ids {
            let tick_ms = self.configs[id].tick_interval.as_millis().max(1);
            if let Some(core) = self.node_mut(*id) {
                if elapsed_ms.is_multiple_of(tick_ms) {
                    core.tick(now);
                }
                core.flush_if_due(now);
            }
        }
        self.deliver_due();
        self.drain_ready();
    }

    fn drain_ready(&mut self) {
        for _ in 0..16 {
            let mut outbox = Vec::new();
            let now = self.now;
            for core in self.nodes.values_mut().flatten() {
                outbox.extend(core.process_ready(now));
            }
            if outbox.is_empty() {
                return;
            }
            for message in outbox {
                self.route(message);
            }
            self.deliver_due();
        }
    }

    fn route(&mut self, message: Message) {
        let link = self.link(message.from, message.to);
        if link.cut || !self.is_running(message.to) || self.chance(link.drop) {
            self.dropped += 1;
            if Core::<S>::is_snapshot(&message) {
                let from = message.from;
                let to = message.to;
                if let Some(core) = self.node_mut(from) {
                    core.report_snapshot(to, false);
                }
            }
            return;
        }
        let spread = link.max_delay.saturating_sub(link.min_delay).as_micros() as u64;
        let delay = link.min_delay + Duration::from_micros(if spread == 0 { 0 } else { self.next_random() % spread });
        self.sequence += 1;
        self.in_flight.push(InFlight { deliver_at: self.now + delay, sequence: self.sequence, message });
    }

    fn deliver_due(&mut self) {
        let now = self.now;
        let mut due: Vec<InFlight> = Vec::new();
        let mut waiting = Vec::with_capacity(self.in_flight.len());
        for flight in self.in_flight.drain(..) {
            if flight.deliver_at <= now { due.push(flight) } else { waiting.push(flight) }
        }
        self.in_flight = waiting;
        due.sort_by_key(|flight| (flight.deliver_at, flight.sequence));
        for flight in due {
            self.deliver(flight.message);
        }
    }

    fn deliver(&mut self, message: Message) {
        let (from, to) = (message.from, message.to);
        if !self.is_running(to) {
            self.dropped += 1;
            return;
        }
        if Core::<S>::is_snapshot(&message) {
            let delivered = self.transfer_snapshot(&message);
            if let Some(core) = self.node_mut(from) {
                core.report_snapshot(to, delivered.is_ok());
            }
            if let Err(error) = delivered {
                tracing::warn!(from, to, %error, "simulated snapshot transfer failed");
                self.dropped += 1;
                return;
            }
        }
        self.delivered += 1;
        if let Some(core) = self.node_mut(to) {
            core.step(message);
        }
    }

    /// Copies the snapshot's files chunk by chunk, as the transport does.
    fn transfer_snapshot(&self, message: &Message) -> Result<(), RaftError> {
        let (index, term) = snapshot::parse_descriptor(&message.get_snapshot().data)?;
        let source = self.snapshot_store(message.from)?;
        let target = self.snapshot_store(message.to)?;
        let mut receiver = target.receive(index, term)?;
        snapshot::stream_snapshot(&source, index, term, |chunk| receiver.write(&chunk))?;
        if receiver.is_done() {
            Ok(())
        } else {
            Err(RaftError::Snapshot(format!("snapshot {index}-{term} ended without its last chunk")))
        }
    }

    fn snapshot_store(&self, id: u64) -> Result<Arc<SnapshotStore>, RaftError> {
        self.nodes.get(&id).and_then(Option::as_ref).map(|core| Arc::clone(core.snapshots())).ok_or(RaftError::Stopped)
    }

    fn start_node(&mut self, id: u64) -> Result<(), RaftError> {
        let dir = self.node_dir(id);
        let log = LogStore::open(&dir.join("log"))?;
        let snapshots = Arc::new(SnapshotStore::open(&dir.join("snapshots"))?);
        let machine = (self.factory)(id, &dir.join("machine"));
        let config = self.configs[&id].clone();
        let core = Core::new(config, log, machine, snapshots)?;
        self.nodes.insert(id, Some(core));
        Ok(())
    }

    fn node_dir(&self, id: u64) -> PathBuf {
        self.root.join(format!("node-{id}"))
    }

    fn node_mut(&mut self, id: u64) -> Option<&mut Core<S>> {
        self.nodes.get_mut(&id)?.as_mut()
    }

    fn link(&self, from: u64, to: u64) -> Link {
        self.links.get(&(from, to)).copied().unwrap_or(self.default_link)
    }

    fn chance(&mut self, probability: f64) -> bool {
        probability > 0.0 && (self.next_random() as f64 / u64::MAX as f64) < probability
    }

    /// xorshift64*: small, fast and repeatable for a seed.
    fn next_random(&mut self) -> u64 {
        let mut x = self.random;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.random = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Settings for simulated node number `position`: election timeouts 10,
/// 13, 16... ticks, so that the first timeout is never a tie.
fn sim_config(id: u64, position: usize) -> NodeConfig {
    let mut config = NodeConfig::new(id);
    config.tick_interval = Duration::from_millis(10);
    config.fixed_election_ticks = Some(10 + 3 * position);
    config.heartbeat_ticks = 2;
    config.proposal_timeout = Duration::from_secs(3);
    config.retry_interval = Duration::from_millis(500);
    config.snapshot_interval = 1_000_000;
    config.log_entries_kept = 10;
    config
}

/// Ids of running voters that agree on the applied index, for tests.
pub fn converged<S: StateMachine>(cluster: &SimCluster<S>, ids: &[u64]) -> bool {
    let applied: BTreeSet<u64> =
        ids.iter().filter_map(|id| cluster.status(*id)).map(|status| status.applied_index).collect();
    applied.len() == 1
}
