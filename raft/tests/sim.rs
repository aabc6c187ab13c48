//! Raft behaviour on the simulated network: elections, replication,
//! partitions, lossy links, crashes, snapshots and membership changes.
//! Every run is repeatable from its seed.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Applied, FileMachine};
use sigil_raft::sim::{Link, SimCluster};
use sigil_raft::{MembershipChange, Proposal, RaftError, RequestId};
use tokio::sync::oneshot;

type Waiting = Vec<(u64, oneshot::Receiver<Result<Applied, RaftError>>)>;

fn cluster(ids: &[u64], seed: u64) -> (tempfile::TempDir, SimCluster<FileMachine>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let cluster = SimCluster::new(dir.path(), ids, seed, Box::new(|_, path| FileMachine::open(path)))
        .expect("start the simulated cluster");
    (dir, cluster)
}

fn proposal(number: u64) -> Proposal {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&number.to_be_bytes());
    id[8] = 0x5a;
    Proposal::new(RequestId(id), format!("value-{number}").into_bytes())
}

fn elect(cluster: &mut SimCluster<FileMachine>) -> u64 {
    assert!(cluster.run_until(Duration::from_secs(10), |cluster| cluster.leader().is_some()), "no leader elected");
    cluster.leader().expect("leader")
}

/// Proposes `numbers` round-robin on `nodes`.
fn propose_on(cluster: &mut SimCluster<FileMachine>, nodes: &[u64], numbers: std::ops::Range<u64>) -> Waiting {
    numbers
        .map(|number| {
            let node = nodes[(number as usize) % nodes.len()];
            (number, cluster.propose(node, proposal(number)))
        })
        .collect()
}

/// Proposes `numbers` round-robin on `nodes` and waits for every answer.
fn propose_and_settle(
    cluster: &mut SimCluster<FileMachine>,
    nodes: &[u64],
    numbers: std::ops::Range<u64>,
    limit: Duration,
) -> Vec<(u64, Result<Applied, RaftError>)> {
    let waiting = propose_on(cluster, nodes, numbers);
    settle_within(cluster, waiting, limit)
}

/// Runs in short steps until every waiter resolved, at most `limit`.
fn settle_within(
    cluster: &mut SimCluster<FileMachine>,
    waiting: Waiting,
    limit: Duration,
) -> Vec<(u64, Result<Applied, RaftError>)> {
    let mut open = waiting;
    let mut results = Vec::new();
    let end = cluster.elapsed() + limit;
    while !open.is_empty() && cluster.elapsed() < end {
        cluster.run_for(Duration::from_millis(10));
        let mut still_open = Vec::new();
        for (number, mut receiver) in open {
            match receiver.try_recv() {
                Ok(result) => results.push((number, result)),
                Err(oneshot::error::TryRecvError::Empty) => still_open.push((number, receiver)),
                Err(oneshot::error::TryRecvError::Closed) => panic!("proposal {number} was dropped without an answer"),
            }
        }
        open = still_open;
    }
    assert!(open.is_empty(), "{} proposals did not resolve within {limit:?}", open.len());
    results.sort_by_key(|(number, _)| *number);
    results
}

fn assert_same_state(cluster: &SimCluster<FileMachine>, ids: &[u64]) {
    let first = cluster.machine(ids[0]).expect("running");
    for id in &ids[1..] {
        let other = cluster.machine(*id).expect("running");
        assert_eq!(other.applied, first.applied, "node {id} applied index differs from node {}", ids[0]);
        assert_eq!(other.digest, first.digest, "node {id} digest differs from node {}", ids[0]);
        assert_eq!(other.values, first.values, "node {id} values differ");
    }
}

fn converge(cluster: &mut SimCluster<FileMachine>, ids: &[u64]) {
    let converged = cluster.run_until(Duration::from_secs(20), |cluster| {
        let applied: BTreeSet<u64> =
            ids.iter().filter_map(|id| cluster.status(*id)).map(|status| status.applied_index).collect();
        let commits: BTreeSet<u64> =
            ids.iter().filter_map(|id| cluster.status(*id)).map(|status| status.commit_index).collect();
        applied.len() == 1 && commits.len() == 1
    });
    assert!(converged, "nodes {ids:?} did not converge");
    assert_same_state(cluster, ids);
}

#[test]
fn cluster_replicates_from_every_node() {
    let (_dir, mut cluster) = cluster(&[1, 2, 3], 7);
    elect(&mut cluster);
    let waiting = propose_on(&mut cluster, &[1, 2, 3], 0..300);
    let results = settle_within(&mut cluster, waiting, Duration::from_secs(10));
    for (number, result) in &results {
        let applied = result.as_ref().unwrap_or_else(|error| panic!("proposal {number} failed: {error}"));
        assert!(!applied.already, "proposal {number} was applied before");
    }
    converge(&mut cluster, &[1, 2, 3]);
    assert_eq!(cluster.machine(1).expect("running").values.len(), 300);

    let leader = cluster.leader().expect("leader");
    let stats = cluster.status(leader).expect("status").stats;
    assert!(stats.batches_proposed > 0);
}

#[test]
fn group_commit_batches_proposals() {
    let (_dir, mut cluster) = cluster(&[1, 2, 3], 11);
    let leader = elect(&mut cluster);
    let before = cluster.status(leader).expect("status").last_index;
    let waiting = propose_on(&mut cluster, &[leader], 0..500);
    let results = settle_within(&mut cluster, waiting, Duration::from_secs(10));
    assert!(results.iter().all(|(_, result)| result.is_ok()));
    let status = cluster.status(leader).expect("status");
    let entries = status.last_index - before;
    assert!(entries < 50, "500 proposals queued together took {entries} entries");
    assert_eq!(status.stats.proposals_batched, 500);
}

#[test]
fn request_id_applied_once() {
    let (_dir, mut cluster) = cluster(&[1, 2, 3], 3);
    let leader = elect(&mut cluster);
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).expect("a follower");
    let waiting = vec![(1, cluster.propose(follower, proposal(1)))];
    let first = settle_within(&mut cluster, waiting, Duration::from_secs(5));
    let waiting = vec![(1, cluster.propose(leader, proposal(1)))];
    let again = settle_within(&mut cluster, waiting, Duration::from_secs(5));
    let first = first[0].1.as_ref().expect("applied");
    let again = again[0].1.as_ref().expect("applied");
    assert!(!first.already);
    assert!(again.already, "the second copy must report that it was applied before");
    assert_eq!(again.index, first.index);
    converge(&mut cluster, &[1, 2, 3]);
    assert_eq!(cluster.machine(leader).expect("running").values.len(), 1);
}

#[test]
fn isolated_node_rejects_writes() {
    let (_dir, mut cluster) = cluster(&[1, 2, 3], 21);
    let leader = elect(&mut cluster);
    let isolated = [1, 2, 3].into_iter().find(|id| *id != leader).expect("a follower");
    let majority: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != isolated).collect();
    cluster.partition(&[&[isolated], &majority]);
    cluster.run_for(Duration::from_secs(2));

    let refused = propose_and_settle(&mut cluster, &[isolated], 0..5, Duration::from_secs(5));
    for (number, result) in &refused {
        let error = result.as_ref().expect_err("the isolated node must not commit");
        assert!(error.is_unavailable(), "proposal {number}: {error}");
        assert!(error.to_string().contains(&format!("node {leader}")), "error names the last leader: {error}");
    }

    let accepted = propose_and_settle(&mut cluster, &majority, 100..200, Duration::from_secs(5));
    assert!(accepted.iter().all(|(_, result)| result.is_ok()));

    cluster.heal();
    converge(&mut cluster, &[1, 2, 3]);
    let values = &cluster.machine(isolated).expect("running").values;
    assert_eq!(values.len(), 100, "only the majority's proposals were applied");
}

#[test]
fn partitioned_leader_steps_down() {
    let (_dir, mut cluster) = cluster(&[1, 2, 3, 4, 5], 5);
    let leader = elect(&mut cluster);
    let others: Vec<u64> = [1, 2, 3, 4, 5].into_iter().filter(|id| *id != leader).collect();
    let minority = [leader, others[0]];
    let majority = &others[1..];
    cluster.partition(&[&minority, majority]);

    let stepped_down = cluster.run_until(Duration::from_secs(10), |cluster| {
        cluster.status(leader).is_some_and(|status| status.role != sigil_raft::Role::Leader)
            && cluster.leader().is_some_and(|new| majority.contains(&new))
    });
    assert!(stepped_down, "the old leader must step down and the majority elect another");

    let accepted = propose_and_settle(&mut cluster, majority, 0..50, Duration::from_secs(5));
    assert!(accepted.iter().all(|(_, result)| result.is_ok()));
    let refused = propose_and_settle(&mut cluster, &minority, 50..60, Duration::from_secs(5));
    assert!(refused.iter().all(|(_, result)| result.as_ref().is_err_and(RaftError::is_unavailable)));

    cluster.heal();
    converge(&mut cluster, &[1, 2, 3, 4, 5]);

    // Move the leader's side: cut the new leader and one peer away.
    let second = cluster.leader().expect("leader");
    let peer = [1, 2, 3, 4, 5].into_iter().find(|id| *id != second).expect("peer");
    let rest: Vec<u64> = [1, 2, 3, 4, 5].into_iter().filter(|id| *id != second && *id != peer).collect();
    cluster.partition(&[&[second, peer], &rest]);
    let moved =
        cluster.run_until(Duration::from_secs(10), |cluster| cluster.leader().is_some_and(|new| rest.contains(&new)));
    assert!(moved, "the three-node side must elect a leader");
    let accepted = propose_and_settle(&mut cluster, &rest, 100..150, Duration::from_secs(5));
    assert!(accepted.iter().all(|(_, result)| result.is_ok()));
    cluster.heal();
    converge(&mut cluster, &[1, 2, 3, 4, 5]);
    assert_eq!(cluster.machine(1).expect("running").values.len(), 100);
}

#[test]
fn lossy_links_keep_acknowledged_proposals() {
    let (_dir, mut cluster) = cluster(&[1, 2, 3], 99);
    cluster.set_default_link(Link {
        drop: 0.1,
        min_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(30),
        cut: false,
    });
    elect(&mut cluster);
    let results = propose_and_settle(&mut cluster, &[1, 2, 3], 0..200, Duration::from_secs(20));
    let acknowledged: Vec<u64> =
        results.iter().filter(|(_, result)| result.is_ok()).map(|(number, _)| *number).collect();
    assert!(cluster.dropped > 0, "the links must have dropped messages");

    cluster.set_default_link(Link::default());
    converge(&mut cluster, &[1, 2, 3]);
    let values: BTreeSet<Vec<u8>> = cluster.machine(1).expect("running").values.iter().cloned().collect();
    assert_eq!(values.len(), cluster.machine(1).expect("running").values.len(), "a value was applied twice");
    for number in acknowledged {
        assert!(values.contains(&proposal(number).payload), "acknowledged proposal {number} is missing");
    }
}

#[test]
fn same_seed_same_run() {
    let run = |seed| {
        let (_dir, mut cluster) = cluster(&[1, 2, 3], seed);
        cluster.set_default_link(Link {
            drop: 0.05,
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(20),
            cut: false,
        });
        elect(&mut cluster);
        let waiting = propose_on(&mut cluster, &[1, 2, 3], 0..100);
        let _ = settle_within(&mut cluster, waiting, Duration::from_secs(20));
        cluster.run_for(Duration::from_secs(2));
        let leader = cluster.leader();
        let machine = cluster.machine(1).expect("running");
        (leader, machine.applied, machine.digest, cluster.delivered, cluster.dropped)
    };
    assert_eq!(run(1234), run(1234));
}

#[test]
fn full_restart_keeps_state() {
    let (_dir, mut cluster) = cluster(&[1, 2, 3], 8);
    elect(&mut cluster);
    let results = propose_and_settle(&mut cluster, &[1, 2, 3], 0..100, Duration::from_secs(10));
    assert!(results.iter().all(|(_, result)| result.is_ok()));
    converge(&mut cluster, &[1, 2, 3]);
    let before = cluster.machine(1).expect("running").digest;

    for id in [1, 2, 3] {
        cluster.crash(id);
    }
    for id in [1, 2, 3] {
        cluster.restart(id).expect("restart");
    }
    elect(&mut cluster);
    converge(&mut cluster, &[1, 2, 3]);
    assert_eq!(cluster.machine(2).expect("running").digest, before);
    let results = propose_and_settle(&mut cluster, &[1, 2, 3], 100..110, Duration::from_secs(10));
    assert!(results.iter().all(|(_, result)| result.is_ok()));
}

#[test]
fn lagging_node_installs_snapshot() {
    let (_dir, mut cluster) = cluster(&[1, 2, 3], 13);
    let leader = elect(&mut cluster);
    let lagging = [1, 2, 3].into_iter().find(|id| *id != leader).expect("follower");
    let live: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != lagging).collect();
    cluster.crash(lagging);

    for round in 0..20 {
        let results = propose_and_settle(&mut cluster, &live, round * 10..round * 10 + 10, Duration::from_secs(5));
        assert!(results.iter().all(|(_, result)| result.is_ok()));
    }
    for id in &live {
        cluster.take_snapshot(*id).expect("snapshot");
    }
    let leader_status = cluster.status(leader).expect("status");
    assert!(
        leader_status.first_index > 2,
        "the leader's log must be compacted, starts at {}",
        leader_status.first_index
    );

    cluster.restart(lagging).expect("restart");
    converge(&mut cluster, &[1, 2, 3]);
    let status = cluster.status(lagging).expect("status");
    assert_eq!(status.stats.snapshots_received, 1, "the lagging node must install one snapshot");
    assert_eq!(cluster.machine(lagging).expect("running").values.len(), 200);
    assert_eq!(status.peers.len(), 3, "the snapshot carries the peer addresses");
}

#[test]
fn learner_joins_then_voter_leaves() {
    let (_dir, mut cluster) = cluster(&[1, 2, 3], 17);
    let leader = elect(&mut cluster);
    let results = propose_and_settle(&mut cluster, &[1, 2, 3], 0..50, Duration::from_secs(5));
    assert!(results.iter().all(|(_, result)| result.is_ok()));

    cluster.add_empty_node(4).expect("start node 4");
    let added =
        cluster.change_membership(leader, vec![MembershipChange::AddLearner { id: 4, address: "sim-4".into() }]);
    settle_change(&mut cluster, added);
    converge(&mut cluster, &[1, 2, 3, 4]);
    assert_eq!(cluster.status(4).expect("status").role, sigil_raft::Role::Learner);

    let promoted =
        cluster.change_membership(leader, vec![MembershipChange::AddVoter { id: 4, address: "sim-4".into() }]);
    settle_change(&mut cluster, promoted);
    let leaving = [1, 2, 3].into_iter().find(|id| *id != leader).expect("a follower");
    let removed = cluster.change_membership(leader, vec![MembershipChange::Remove { id: leaving }]);
    settle_change(&mut cluster, removed);

    let remaining: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|id| *id != leaving).collect();
    let results = propose_and_settle(&mut cluster, &remaining, 50..80, Duration::from_secs(5));
    assert!(results.iter().all(|(_, result)| result.is_ok()));
    converge(&mut cluster, &remaining);
    let status = cluster.status(leader).expect("status");
    assert_eq!(status.voters.iter().copied().collect::<BTreeSet<_>>(), remaining.iter().copied().collect());
    assert!(!status.peers.contains_key(&leaving));
    assert!(
        cluster.status(leaving).expect("status").removed || cluster.status(leaving).expect("status").voters.len() == 3
    );
}

#[test]
fn joint_consensus_swaps_voters() {
    let (_dir, mut cluster) = cluster(&[1, 2, 3], 19);
    let leader = elect(&mut cluster);
    cluster.add_empty_node(4).expect("start node 4");
    let added =
        cluster.change_membership(leader, vec![MembershipChange::AddLearner { id: 4, address: "sim-4".into() }]);
    settle_change(&mut cluster, added);
    converge(&mut cluster, &[1, 2, 3, 4]);

    let leaving = [1, 2, 3].into_iter().find(|id| *id != leader).expect("a follower");
    let swap = cluster.change_membership(
        leader,
        vec![MembershipChange::AddVoter { id: 4, address: "sim-4".into() }, MembershipChange::Remove { id: leaving }],
    );
    settle_change(&mut cluster, swap);
    let left_joint = cluster.run_until(Duration::from_secs(5), |cluster| {
        cluster.status(leader).is_some_and(|status| status.voters.len() == 3 && status.voters.contains(&4))
    });
    assert!(left_joint, "the cluster must leave the joint configuration with nodes 4 in and {leaving} out");
}

fn settle_change(cluster: &mut SimCluster<FileMachine>, mut receiver: oneshot::Receiver<Result<(), RaftError>>) {
    for _ in 0..1000 {
        match receiver.try_recv() {
            Ok(result) => return result.expect("the membership change succeeded"),
            Err(oneshot::error::TryRecvError::Empty) => cluster.run_for(Duration::from_millis(10)),
            Err(oneshot::error::TryRecvError::Closed) => panic!("the membership change was dropped without an answer"),
        }
    }
    panic!("the membership change did not resolve within 10 s of simulated time");
}

#[test]
fn failed_disk_halts_node() {
    let (_dir, mut cluster) = cluster(&[1, 2, 3], 23);
    let leader = elect(&mut cluster);
    let broken = [1, 2, 3].into_iter().find(|id| *id != leader).expect("follower");
    cluster.fail_disk(broken);

    let results = propose_and_settle(&mut cluster, &[1, 2, 3], 0..30, Duration::from_secs(5));
    for (number, result) in &results {
        if number % 3 + 1 == broken {
            assert!(
                matches!(result, Err(RaftError::StorageFailed)),
                "proposal {number} on the broken node: {result:?}"
            );
        } else {
            assert!(result.is_ok(), "proposal {number} on a healthy node: {result:?}");
        }
    }
    let status = cluster.status(broken).expect("status");
    assert!(status.halted.is_some(), "the broken node reports that it stopped");
    assert!(!status.is_ready());

    cluster.crash(broken);
    cluster.restart(broken).expect("restart with a working disk");
    converge(&mut cluster, &[1, 2, 3]);
    // A proposal forwarded before the disk failed may still commit even
    // though its caller got an error; every acknowledged one must be there.
    let values: BTreeSet<Vec<u8>> = cluster.machine(broken).expect("running").values.iter().cloned().collect();
    for (number, result) in &results {
        if result.is_ok() {
            assert!(values.contains(&proposal(*number).payload), "acknowledged proposal {number} is missing");
        }
    }
}

#[test]
fn large_entries_trigger_snapshots_by_bytes() {
    let (_dir, mut cluster) = cluster(&[1, 2, 3], 29);
    for id in [1, 2, 3] {
        let config = cluster.config_mut(id).expect("node config");
        config.snapshot_log_bytes = 64 << 10;
        config.log_entries_kept = 1000;
        cluster.crash(id);
        cluster.restart(id).expect("restart with the new settings");
    }
    let leader = elect(&mut cluster);
    let lagging = [1, 2, 3].into_iter().find(|id| *id != leader).expect("follower");
    cluster.crash(lagging);

    for number in 0..40u64 {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&number.to_be_bytes());
        let waiting = vec![(number, cluster.propose(leader, Proposal::new(RequestId(id), vec![7u8; 8 << 10])))];
        let results = settle_within(&mut cluster, waiting, Duration::from_secs(5));
        assert!(results[0].1.is_ok(), "proposal {number}: {:?}", results[0].1);
    }
    let status = cluster.status(leader).expect("status");
    assert!(status.stats.snapshots_taken >= 2, "320 KiB of entries take snapshots every 64 KiB: {:?}", status.stats);
    assert!(
        status.first_index > 20,
        "compaction keeps about 32 KiB of entries; the log starts at {}",
        status.first_index
    );

    cluster.restart(lagging).expect("restart");
    converge(&mut cluster, &[1, 2, 3]);
    assert_eq!(cluster.status(lagging).expect("status").stats.snapshots_received, 1);
}

#[test]
fn learner_joins_from_snapshot_after_compaction() {
    let (_dir, mut cluster) = cluster(&[1, 2, 3], 31);
    let leader = elect(&mut cluster);
    for round in 0..30 {
        let results = propose_and_settle(&mut cluster, &[leader], round * 2..round * 2 + 2, Duration::from_secs(5));
        assert!(results.iter().all(|(_, result)| result.is_ok()));
    }
    for id in [1, 2, 3] {
        cluster.take_snapshot(id).expect("snapshot");
    }
    assert!(cluster.status(leader).expect("status").first_index > 2, "the leader's log is compacted");

    cluster.add_empty_node(4).expect("start node 4");
    let added =
        cluster.change_membership(leader, vec![MembershipChange::AddLearner { id: 4, address: "sim-4".into() }]);
    settle_change(&mut cluster, added);
    converge(&mut cluster, &[1, 2, 3, 4]);
    let status = cluster.status(4).expect("status");
    assert_eq!(status.stats.snapshots_received, 1, "node 4 starts from a snapshot taken after it was added");
    assert_eq!(cluster.machine(4).expect("running").values.len(), 60);
}
