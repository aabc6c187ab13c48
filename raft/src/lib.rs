//! Raft consensus for Sigil, on raft-rs and RocksDB.
//!
//! The crate replicates a deterministic [`StateMachine`] and knows nothing
//! of certificates. Its parts:
//! - [`LogStore`]: the Raft log, hard state and configuration in RocksDB,
//!   implementing raft-rs's `Storage` contract; every write is synced.
//! - [`Node`]: one thread per node drives raft-rs's `RawNode`: ticks,
//!   proposals, Ready handling (persist before sending what must follow
//!   persistence), apply, and answers to whoever waits. Pre-vote and
//!   check-quorum are on.
//! - Group commit: proposals queued on a node ride in one entry, bounded
//!   by count, bytes and [`NodeConfig::batch_delay`]. A proposal resolves
//!   when its entry is applied on the node that took it. Followers hand
//!   their entries to the leader through raft-rs's forwarding; proposals
//!   that are not applied after a leader change or
//!   [`NodeConfig::retry_interval`] are proposed again under the same
//!   [`RequestId`], and the state machine applies a request id at most once.
//! - Linearizable reads with [`NodeHandle::read_index`].
//! - Snapshots: RocksDB checkpoints taken every
//!   [`NodeConfig::snapshot_interval`] entries, sent as files in chunks
//!   beside a Raft message that carries only their index and term; the log
//!   before a snapshot is then dropped.
//! - Membership: learners, promotion and removal, with joint consensus
//!   for changes of more than one step.
//! - [`sim`]: a simulated network that drops, delays, reorders and
//!   partitions, for deterministic tests.
//!
//! - [`GrpcTransport`] and [`PeerService`]: the peer transport, gRPC over
//!   mutual TLS, with messages batched per peer and snapshots in chunks.

mod config;
mod core;
mod error;
mod logging;
mod node;
mod proposal;
pub mod sim;
pub mod snapshot;
mod state_machine;
mod status;
mod storage;
mod transport;

/// Generated code of `sigil.raft.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("sigil.raft.v1");
}

pub use config::NodeConfig;
pub use core::MembershipChange;
pub use error::RaftError;
pub use node::{Node, NodeHandle, Transport};
pub use proposal::{Proposal, RequestId, decode_batch, encode_batch};
pub use raft::eraftpb::Message;
pub use snapshot::SnapshotStore;
pub use state_machine::StateMachine;
pub use status::{NodeStatus, Role, Stats};
pub use storage::LogStore;
pub use transport::{GrpcTransport, PeerService, PeerTls};
