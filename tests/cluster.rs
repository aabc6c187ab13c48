//! Cluster failures with real processes: a killed leader, a full restart, membership changes
//! under load, a follower that catches up from a snapshot, network partitions and a full disk.
//! Each test runs its own `sigil dev` cluster on loopback in a temporary folder.

#[path = "common/cluster.rs"]
mod cluster_harness;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use cluster_harness::{CLUSTER_TESTS, DevCluster, Load, LoadReport, Partition, metric_value, summarize, tail_text};
use sigil::ledger::Ledger;
use sigil::proto::admin_client::AdminClient;
use sigil::proto::issuer_client::IssuerClient;
use sigil::proto::{AddNodeRequest, NodeStatus, RemoveNodeRequest, SignX509SvidRequest};

/// Maximum pause in issuance that a leader failure or a membership change may cause.
const MAX_PAUSE: Duration = Duration::from_secs(3);
/// Time a cluster may take to agree again after a disturbance. It is generous because the machine
/// is shared with other work.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Grace period for SIGTERM before the harness kills the nodes. A stopping node waits up to 3 s
/// for its peers to close their Raft streams, so a clean stop takes a little longer than that.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Load clients in the tests that measure pauses.
const CLIENTS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_under_load() {
    let _serial = CLUSTER_TESTS.lock().await;
    let mut cluster = DevCluster::start(3, 0).await;
    let ids = [1, 2, 3];
    let leader = cluster.leader(&ids, READY_TIMEOUT).await;
    let load = Load::start(cluster.channels(&ids).await, CLIENTS);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let killed_at = Instant::now();
    cluster.kill_node(leader).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let survivors: Vec<u64> = ids.into_iter().filter(|id| *id != leader).collect();
    let new_leader = cluster.leader(&survivors, READY_TIMEOUT).await;

    cluster.serve_node(leader);
    cluster.wait_ready(leader, READY_TIMEOUT).await;
    let rejoined_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = load.stop().await;
    let converged = cluster.wait_converged(&ids, CONVERGE_TIMEOUT).await;

    cluster.stop(STOP_GRACE).await;
    let missing = missing_records(&cluster, &ids, &report.serials());

    let context = report.describe(killed_at);
    let before_kill = report.issued.iter().filter(|issued| issued.received < killed_at).count();
    assert!(before_kill > 0, "no issuance before the kill: {context}");
    assert_ne!(new_leader, leader, "a survivor leads after the kill");
    let resumed = report.first_issued_elsewhere(killed_at, leader).map(|issued| issued.received - killed_at);
    assert!(resumed.is_some(), "no survivor issued after the kill: {context}");
    assert!(
        resumed.is_some_and(|after| after <= MAX_PAUSE),
        "issuance resumed {resumed:?} after the kill of leader {leader}, more than {MAX_PAUSE:?}: {context}"
    );
    let gap = report.max_gap(killed_at, report.stopped);
    eprintln!("leader {leader} killed: resumed after {resumed:?}, longest pause {gap:?}; {context}");
    assert!(gap <= MAX_PAUSE, "longest pause after the kill was {gap:?}: {context}");
    let after_rejoin = report.issued.iter().filter(|issued| issued.node == leader && issued.sent > rejoined_at).count();
    assert!(after_rejoin > 0, "the restarted node {leader} issued nothing after it rejoined: {context}");
    assert_eq!(report.duplicate_serials(), Vec::<String>::new(), "serials received twice");
    let issued_total = converged.values().map(|status| status.issued_total).min().unwrap_or(0);
    assert!(issued_total >= report.issued.len() as u64, "ledger counts {issued_total}: {context}");
    assert_eq!(missing, BTreeMap::new(), "received serials missing from a node's ledger");
    assert_eq!(cluster.panics(&ids), BTreeMap::new(), "node logs with a panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_restart_keeps_ledger() {
    let _serial = CLUSTER_TESTS.lock().await;
    let mut cluster = DevCluster::start(3, 0).await;
    let ids = [1, 2, 3];
    let load = Load::start(cluster.channels(&ids).await, 4);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = load.stop().await;
    let before = cluster.wait_converged(&ids, CONVERGE_TIMEOUT).await;

    // sigil dev stops its nodes with SIGTERM and kills those still running after 15 s.
    let stop_started = Instant::now();
    let dev_exited = cluster.stop(Duration::from_secs(30)).await;
    let stop_time = stop_started.elapsed();
    let unclean: Vec<u64> = ids.into_iter().filter(|id| !cluster.node_log(*id).contains("node stopped")).collect();
    let logs: BTreeMap<u64, String> = unclean.iter().map(|id| (*id, tail_text(&cluster.node_log(*id), 5))).collect();

    cluster.start_dev().await;
    let after = cluster.wait_converged(&ids, CONVERGE_TIMEOUT).await;
    cluster.stop(STOP_GRACE).await;
    let missing = missing_records(&cluster, &ids, &report.serials());

    assert!(!report.issued.is_empty(), "no issuance before the restart");
    let issued_before: BTreeSet<u64> = before.values().map(|status| status.issued_total).collect();
    let issued_after: BTreeSet<u64> = after.values().map(|status| status.issued_total).collect();
    assert_eq!(issued_after, issued_before, "issued_total across the restart");
    let applied_before = before.values().map(|status| status.applied_index).max().unwrap_or(0);
    let applied_after = after.values().map(|status| status.applied_index).max().unwrap_or(0);
    assert!(applied_after >= applied_before, "applied index went back from {applied_before} to {applied_after}");
    assert_eq!(missing, BTreeMap::new(), "serials issued before the restart missing from a node's ledger");
    assert_eq!(cluster.panics(&ids), BTreeMap::new(), "node logs with a panic");
    assert!(dev_exited, "sigil dev did not exit within 30 s of SIGTERM");
    assert_eq!(
        unclean,
        Vec::<u64>::new(),
        "nodes that did not stop cleanly on SIGTERM (sigil dev took {stop_time:?}); their last log lines: {logs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_joins_and_leaves_under_load() {
    let _serial = CLUSTER_TESTS.lock().await;
    let mut cluster = DevCluster::start(3, 1).await;
    let members = [1, 2, 3];
    let leader = cluster.leader(&members, READY_TIMEOUT).await;
    let load = Load::start(cluster.channels(&members).await, CLIENTS);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let changes_started = Instant::now();
    cluster.serve_node(4);
    let joining = cluster.endpoint(4);
    let mut admin = AdminClient::new(cluster.channel(leader).await);
    let request = AddNodeRequest { node_id: 4, raft_address: joining.raft.clone(), catch_up_seconds: 60 };
    let added = admin.add_node(request).await.expect("add node 4 through the leader").into_inner();
    let joined = cluster.wait_status(4, READY_TIMEOUT, |status| status.ready && status.voters.contains(&4)).await;
    let mut with_new = members.to_vec();
    with_new.push(4);
    load.set_targets(cluster.channels(&with_new).await);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Clients stop using the node before it leaves, as an operator would drain it.
    let leaving = members.into_iter().find(|id| *id != leader).expect("a follower");
    let remaining: Vec<u64> = with_new.iter().copied().filter(|id| *id != leaving).collect();
    load.set_targets(cluster.channels(&remaining).await);
    let removed = admin.remove_node(RemoveNodeRequest { node_id: leaving }).await.expect("remove node").into_inner();
    // The removed node keeps running, so a removed node that campaigns would show up as a pause.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let report = load.stop().await;
    let converged = cluster.wait_converged(&remaining, CONVERGE_TIMEOUT).await;
    cluster.stop(STOP_GRACE).await;

    let context = report.describe(changes_started);
    assert_eq!(cluster.panics(&[1, 2, 3, 4]), BTreeMap::new(), "node logs with a panic");
    assert_eq!(joined.role, "follower", "node 4's role once it is a voter");
    let gap = report.max_gap(changes_started, report.stopped);
    eprintln!("node 4 added, node {leaving} removed: longest pause {gap:?}; {context}");
    assert!(gap <= MAX_PAUSE, "longest pause during the membership changes was {gap:?}: {context}");
    let through_new = report.issued_per_node().get(&4).copied().unwrap_or(0);
    assert!(through_new > 0, "node 4 issued nothing: {context}");
    assert_eq!(report.duplicate_serials(), Vec::<String>::new(), "serials received twice");
    let expected: BTreeSet<u64> = remaining.iter().copied().collect();
    for status in converged.values() {
        let voters: BTreeSet<u64> = status.voters.iter().copied().collect();
        assert_eq!(voters, expected, "voters seen by node {}", status.id);
        assert!(status.learners.is_empty(), "node {} sees learners {:?}", status.id, status.learners);
    }
    // The replies should describe the membership after the change they made.
    assert!(added.voters.contains(&4), "AddNode reply lists node 4 as a voter: {added:?}");
    assert!(!removed.voters.contains(&leaving), "RemoveNode reply no longer lists node {leaving}: {removed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_removal_under_load() {
    let _serial = CLUSTER_TESTS.lock().await;
    let mut cluster = DevCluster::start(3, 0).await;
    let ids = [1, 2, 3];
    let leader = cluster.leader(&ids, READY_TIMEOUT).await;
    let remaining: Vec<u64> = ids.into_iter().filter(|id| *id != leader).collect();
    // Clients use only the nodes that stay, as an operator would drain the leaving one.
    let load = Load::start(cluster.channels(&remaining).await, CLIENTS);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let removed_at = Instant::now();
    let removal = remove_leader(&mut cluster, leader, &remaining).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let report = load.stop().await;
    let statuses = cluster.statuses(&ids).await;
    let removed_ready = cluster.is_ready(leader);
    cluster.stop(STOP_GRACE).await;

    let context = format!("{}; statuses after the removal: {:#?}", report.describe(removed_at), summarize(&statuses));
    assert!(removal.is_ok(), "RemoveNode of the leader {leader}: {removal:?}; {context}");
    assert_eq!(cluster.panics(&ids), BTreeMap::new(), "node logs with a panic");
    let gap = report.max_gap(removed_at, report.stopped);
    eprintln!("leader {leader} removed under load: longest pause {gap:?}; {context}");
    assert!(gap <= MAX_PAUSE, "longest pause after removing leader {leader} was {gap:?}: {context}");
    let new_leader = statuses.values().find(|status| status.role == "leader" && remaining.contains(&status.id));
    assert!(new_leader.is_some(), "none of {remaining:?} leads after the removal: {context}");
    let expected: BTreeSet<u64> = remaining.iter().copied().collect();
    for id in &remaining {
        let voters: Option<BTreeSet<u64>> = statuses.get(id).map(|status| status.voters.iter().copied().collect());
        assert_eq!(voters.as_ref(), Some(&expected), "voters seen by node {id}: {context}");
    }
    assert!(!removed_ready, "the removed node {leader} still returns 200 on /readyz: {context}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_removal_when_idle() {
    let _serial = CLUSTER_TESTS.lock().await;
    let mut cluster = DevCluster::start(3, 0).await;
    let ids = [1, 2, 3];
    let leader = cluster.leader(&ids, READY_TIMEOUT).await;
    let remaining: Vec<u64> = ids.into_iter().filter(|id| *id != leader).collect();

    let removal_started = Instant::now();
    let removal = remove_leader(&mut cluster, leader, &remaining).await;
    let removed_at = Instant::now();
    let load = Load::start(cluster.channels(&remaining).await, 2);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let report = load.stop().await;
    let statuses = cluster.statuses(&ids).await;
    cluster.stop(STOP_GRACE).await;

    let context = format!(
        "RemoveNode took {:?}; {}; statuses after the removal: {:#?}",
        removed_at - removal_started,
        report.describe(removed_at),
        summarize(&statuses)
    );
    assert!(removal.is_ok(), "RemoveNode of the leader {leader}: {removal:?}; {context}");
    assert_eq!(cluster.panics(&ids), BTreeMap::new(), "node logs with a panic");
    let gap = report.max_gap(removed_at, report.stopped);
    eprintln!("leader {leader} removed while idle: longest pause {gap:?}; {context}");
    assert!(gap <= MAX_PAUSE, "longest pause after removing leader {leader} was {gap:?}: {context}");
    let new_leader = statuses.values().find(|status| status.role == "leader" && remaining.contains(&status.id));
    assert!(new_leader.is_some(), "none of {remaining:?} leads after the removal: {context}");
    let expected: BTreeSet<u64> = remaining.iter().copied().collect();
    for id in &remaining {
        let voters: Option<BTreeSet<u64>> = statuses.get(id).map(|status| status.voters.iter().copied().collect());
        assert_eq!(voters.as_ref(), Some(&expected), "voters seen by node {id}: {context}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_follower_installs_snapshot() {
    const REQUESTS: usize = 400;
    let _serial = CLUSTER_TESTS.lock().await;
    let mut cluster = DevCluster::start(3, 0).await;
    let ids = [1, 2, 3];
    cluster.stop(STOP_GRACE).await;
    for id in ids {
        cluster.set_raft_options(id, &[("snapshot_interval", 50.into()), ("log_entries_kept", 10.into())]);
    }
    cluster.start_dev().await;

    let leader = cluster.leader(&ids, READY_TIMEOUT).await;
    let lagging = ids.into_iter().find(|id| *id != leader).expect("a follower");
    let live: Vec<u64> = ids.into_iter().filter(|id| *id != lagging).collect();
    let lagging_applied = cluster.status(lagging).await.expect("status of the follower").applied_index;
    cluster.kill_node(lagging).await;

    // One request at a time, so that each certificate is at least one Raft entry.
    let mut issuer = IssuerClient::new(cluster.channel(leader).await);
    let (_, csr) = common::p256_csr("spiffe://example.org/snapshot", &[]);
    let mut serials = Vec::new();
    for number in 0..REQUESTS {
        let request = SignX509SvidRequest { csr: csr.clone(), ttl_seconds: None };
        let response = issuer.sign_x509_svid(request).await.unwrap_or_else(|error| panic!("request {number}: {error}"));
        serials.push(response.into_inner().serial);
    }
    let compacted = cluster.wait_converged(&live, CONVERGE_TIMEOUT).await;

    cluster.serve_node(lagging);
    cluster.wait_ready(lagging, READY_TIMEOUT).await;
    let converged = cluster.wait_converged(&ids, CONVERGE_TIMEOUT).await;
    let received = wait_for_metric(&cluster, lagging, "sigil_raft_snapshots_total{event=\"received\"}").await;
    cluster.stop(STOP_GRACE).await;
    let missing = missing_records(&cluster, &[lagging], &serials);

    let leader_status = &compacted[&leader];
    assert!(
        leader_status.log_first_index > lagging_applied + 1,
        "the leader's log starts at {} and still holds entry {} that node {lagging} needs next",
        leader_status.log_first_index,
        lagging_applied + 1
    );
    assert!(received >= 1.0, "node {lagging} reports {received} snapshots received");
    let lagging_status = &converged[&lagging];
    assert!(
        lagging_status.snapshot_index > lagging_applied,
        "node {lagging} has snapshot index {}, not past its index {lagging_applied} at the kill",
        lagging_status.snapshot_index
    );
    assert_eq!(missing, BTreeMap::new(), "serials missing from the ledger of node {lagging}");
    assert_eq!(cluster.panics(&ids), BTreeMap::new(), "node logs with a panic");
}

/// Polls node `id`'s metrics until `sample` is at least 1, at most 10 s, and returns its last value.
async fn wait_for_metric(cluster: &DevCluster, id: u64, sample: &str) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = metric_value(&cluster.metrics(id), sample).unwrap_or(0.0);
        if value >= 1.0 || Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Opens each node's ledger (the cluster must be stopped, because RocksDB locks it) and returns,
/// per node, the received serials that it has no record of.
fn missing_records(cluster: &DevCluster, ids: &[u64], serials: &[String]) -> BTreeMap<u64, Vec<String>> {
    let mut missing = BTreeMap::new();
    for id in ids {
        let path = cluster.node_dir(*id).join("data/ledger");
        let ledger = Ledger::open(&path).unwrap_or_else(|error| panic!("open {}: {error}", path.display()));
        let absent: Vec<String> = serials
            .iter()
            .filter(|serial| {
                let bytes = hex::decode(serial).expect("serial is hex");
                ledger.issuance(&bytes).expect("read ledger").is_none()
            })
            .cloned()
            .collect();
        if !absent.is_empty() {
            missing.insert(*id, absent);
        }
    }
    missing
}

/// Removes the leader as an operator would: the leader hands leadership over and answers
/// FAILED_PRECONDITION naming its successor, and the removal then goes to the new leader.
async fn remove_leader(
    cluster: &mut DevCluster,
    leader: u64,
    remaining: &[u64],
) -> Result<tonic::Response<sigil::proto::MembershipResponse>, tonic::Status> {
    let mut admin = AdminClient::new(cluster.channel(leader).await);
    let handed_over =
        admin.remove_node(RemoveNodeRequest { node_id: leader }).await.expect_err("the leader hands over");
    assert_eq!(handed_over.code(), tonic::Code::FailedPrecondition, "{handed_over:?}");
    assert!(handed_over.message().contains("handed leadership"), "{}", handed_over.message());
    let successor = cluster.leader(remaining, READY_TIMEOUT).await;
    let mut admin = AdminClient::new(cluster.channel(successor).await);
    admin.remove_node(RemoveNodeRequest { node_id: leader }).await
}

/// Sends `signal` to node `id`'s process.
fn signal_node(cluster: &DevCluster, id: u64, signal: nix::sys::signal::Signal) {
    let pid = cluster.node_pid(id).unwrap_or_else(|| panic!("node {id} has no pid"));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits i32"));
    nix::sys::signal::kill(pid, signal).unwrap_or_else(|error| panic!("signal {signal} to node {id}: {error}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn cut_off_node_rejects_then_catches_up() {
    use nix::sys::signal::Signal;

    let _serial = CLUSTER_TESTS.lock().await;
    let mut cluster = DevCluster::start(3, 0).await;
    let ids = [1, 2, 3];
    let leader = cluster.leader(&ids, READY_TIMEOUT).await;
    let lone = ids.into_iter().find(|id| *id != leader).expect("a follower");
    let others: Vec<u64> = ids.into_iter().filter(|id| *id != lone).collect();

    // Freezing the other two processes cuts the lone node off from every peer while it keeps
    // running and answering, as a network partition around it would.
    for id in &others {
        signal_node(&cluster, *id, Signal::SIGSTOP);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut issuer = IssuerClient::new(cluster.channel(lone).await);
    let (_, csr) = common::p256_csr("spiffe://example.org/partitioned", &[]);
    let refused = issuer.sign_x509_svid(SignX509SvidRequest { csr: csr.clone(), ttl_seconds: None }).await;
    for id in &others {
        signal_node(&cluster, *id, Signal::SIGCONT);
    }
    let status = refused.expect_err("a node without a quorum must not issue");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&format!("node {leader}")), "names the last leader: {}", status.message());

    // The majority keeps issuing while the lone node is frozen in turn.
    signal_node(&cluster, lone, Signal::SIGSTOP);
    let mut majority = IssuerClient::new(cluster.channel(others[0]).await);
    let mut issued = Vec::new();
    for _ in 0..20 {
        let response = majority.sign_x509_svid(SignX509SvidRequest { csr: csr.clone(), ttl_seconds: None }).await;
        issued.push(response.expect("the majority issues without the lone node").into_inner().serial);
    }
    signal_node(&cluster, lone, Signal::SIGCONT);

    let statuses = cluster.wait_converged(&ids, CONVERGE_TIMEOUT).await;
    let issued_totals: BTreeSet<u64> = statuses.values().map(|status| status.issued_total).collect();
    assert_eq!(issued_totals.len(), 1, "after healing every node has the same records: {:#?}", summarize(&statuses));
    assert!(cluster.stop(STOP_GRACE).await, "the cluster stops cleanly");
    assert_eq!(cluster.panics(&ids), BTreeMap::new(), "node logs with a panic");
    let ledger = Ledger::open(cluster.node_dir(lone).join("data/ledger")).expect("open the lone node's ledger");
    for serial in &issued {
        let serial = hex::decode(serial).expect("hex serial");
        assert!(
            ledger.issuance(&serial).expect("read").is_some(),
            "the lone node caught up with {}",
            hex::encode(&serial)
        );
    }
}

/// A tmpfs mounted over a node's Raft log folder, so that its writes fail with ENOSPC once it is
/// full. Unmounted on drop, after the node is stopped.
struct SmallDisk {
    mount: std::path::PathBuf,
}

impl SmallDisk {
    /// Moves `raft_dir` onto a tmpfs of `size` bytes (holding a copy of its files) and keeps the
    /// original files beside it as `raft.disk`.
    fn mount(raft_dir: &std::path::Path, size: u64) -> SmallDisk {
        let disk = raft_dir.with_extension("disk");
        std::fs::rename(raft_dir, &disk).expect("move the Raft log aside");
        std::fs::create_dir(raft_dir).expect("create the mount point");
        run(&["mount", "-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", &raft_dir.to_string_lossy()]);
        run(&["cp", "-a", &format!("{}/.", disk.display()), &raft_dir.to_string_lossy()]);
        SmallDisk { mount: raft_dir.to_owned() }
    }

    /// Copies the files back to the real disk and unmounts, as replacing a full disk with a
    /// working one that has the same contents.
    fn restore(self) {
        let disk = self.mount.with_extension("disk");
        run(&["cp", "-a", &format!("{}/.", self.mount.display()), &disk.to_string_lossy()]);
        drop(self);
        std::fs::remove_dir(disk.with_extension("")).expect("remove the mount point");
        std::fs::rename(&disk, disk.with_extension("")).expect("put the Raft log back");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // A lazy unmount also detaches the tmpfs when a failed test left a node holding its files.
        let _ = Command::new("umount").arg("--lazy").arg(&self.mount).status();
    }
}

fn run(command: &[&str]) {
    let status = Command::new(command[0]).args(&command[1..]).status().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(status.success(), "{command:?} failed with {status}");
}

fn folder_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("list folder")
        .flatten()
        .filter_map(|entry| entry.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn full_disk_halts_node_then_recovers() {
    let _serial = CLUSTER_TESTS.lock().await;
    let mut cluster = DevCluster::start(3, 0).await;
    let ids = [1, 2, 3];
    let leader = cluster.leader(&ids, READY_TIMEOUT).await;
    let broken = ids.into_iter().find(|id| *id != leader).expect("a follower");
    let others: Vec<u64> = ids.into_iter().filter(|id| *id != broken).collect();

    cluster.kill_node(broken).await;
    let raft_dir = cluster.node_dir(broken).join("data/raft");
    let disk = SmallDisk::mount(&raft_dir, folder_bytes(&raft_dir) + (8 << 20));
    cluster.serve_node(broken);
    cluster.wait_ready(broken, READY_TIMEOUT).await;

    // Issue until the follower's log no longer fits: it must stop taking writes and report it.
    let load = Load::start(cluster.channels(&others).await, CLIENTS);
    let halted = cluster.wait_status(broken, Duration::from_secs(90), |status| !status.halted.is_empty()).await;
    let report = load.stop().await;
    assert!(halted.halted.contains("append to the Raft log"), "the reason names the failed write: {halted:?}");
    assert!(!halted.ready, "a node whose log cannot be written is not ready: {halted:?}");
    // /readyz follows the Raft state within the node's 200 ms status interval.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!cluster.is_ready(broken), "/readyz of the broken node must not return 200");
    assert!(report.issued.len() > 100, "the majority kept issuing: {}", report.describe(report.stopped));

    cluster.kill_node(broken).await;
    disk.restore();
    cluster.serve_node(broken);
    cluster.wait_ready(broken, READY_TIMEOUT).await;
    let statuses = cluster.wait_converged(&ids, CONVERGE_TIMEOUT).await;
    let totals: BTreeSet<u64> = statuses.values().map(|status| status.issued_total).collect();
    assert_eq!(totals.len(), 1, "the repaired node caught up: {:#?}", summarize(&statuses));
    assert!(cluster.stop(STOP_GRACE).await, "the cluster stops cleanly");
    assert_eq!(cluster.panics(&ids), BTreeMap::new(), "node logs with a panic");
}

/// Time each side of a partition may take to settle: the majority elects a leader, and the minority
/// nodes drop the leader they knew. Both take a few seconds with the default Raft settings (an
/// election timeout of 1 to 2 s), so most of the limit is room for a machine shared with other work.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a partition lasts after both sides settled, with the load running.
const PARTITION_HOLD: Duration = Duration::from_secs(6);
/// Time one request to a minority node may take. A node returns its own error after its 5 s commit
/// timeout at the latest.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partition_two_against_three_heals() {
    let _serial = CLUSTER_TESTS.lock().await;
    if let Some(reason) = Partition::unsupported() {
        eprintln!("SKIPPED partition_two_against_three_heals: {reason}");
        return;
    }
    let mut cluster = DevCluster::start(5, 0).await;
    let ids = [1, 2, 3, 4, 5];

    let leader = cluster.leader(&ids, READY_TIMEOUT).await;
    let partner = ids.into_iter().find(|id| *id != leader).expect("a follower");
    let first = partition_round(&cluster, &ids, [leader, partner]).await;
    check_round(&first, "first");

    // The second cut leaves the current leader with a node of the first majority, so the new
    // majority contains both nodes that were cut off before.
    let leader = cluster.leader(&ids, READY_TIMEOUT).await;
    let partner = first.majority.iter().copied().find(|id| *id != leader).expect("a follower of the first majority");
    let second = partition_round(&cluster, &ids, [leader, partner]).await;
    check_round(&second, "second");
    let first_side: BTreeSet<u64> = first.minority.iter().copied().collect();
    let second_side: BTreeSet<u64> = second.minority.iter().copied().collect();
    assert_ne!(second_side, first_side, "the second cut must move the leader's side to other nodes");

    cluster.stop(STOP_GRACE).await;
    let mut serials = first.report.serials();
    serials.extend(second.report.serials());
    let missing = missing_records(&cluster, &ids, &serials);

    let mut seen = BTreeSet::new();
    let duplicates: BTreeSet<&String> = serials.iter().filter(|serial| !seen.insert(*serial)).collect();
    assert_eq!(duplicates, BTreeSet::new(), "serials received twice");
    assert_eq!(missing, BTreeMap::new(), "received serials missing from a node's ledger");
    assert_eq!(cluster.panics(&ids), BTreeMap::new(), "node logs with a panic");
}

/// What one partition of the leader and one follower against the other three recorded.
struct PartitionRound {
    /// The leader when the cut was made, on the minority side.
    old_leader: u64,
    minority: Vec<u64>,
    majority: Vec<u64>,
    /// The leader that the majority elected.
    new_leader: u64,
    cut_at: Instant,
    /// When the majority had a leader and no minority node knew a leader any more.
    settled_at: Instant,
    /// When the heal began, so a request sent before it could not reach the other side.
    healed_at: Instant,
    /// When every minority node followed a leader again.
    rejoined_at: Instant,
    /// Minority statuses when the cut settled and just before it healed.
    minority_settled: BTreeMap<u64, NodeStatus>,
    minority_before_heal: BTreeMap<u64, NodeStatus>,
    /// The result of one request sent to each minority node after the cut settled.
    probes: BTreeMap<u64, Result<String, tonic::Status>>,
    report: LoadReport,
    converged: BTreeMap<u64, NodeStatus>,
}

/// Runs a load on all `ids`, cuts `minority` (the leader first) off from the other nodes, waits
/// until both sides settle, probes the minority, heals, and waits until all nodes converge.
async fn partition_round(cluster: &DevCluster, ids: &[u64], minority: [u64; 2]) -> PartitionRound {
    let majority: Vec<u64> = ids.iter().copied().filter(|id| !minority.contains(id)).collect();
    let load = Load::start(cluster.channels(ids).await, CLIENTS);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let cut_at = Instant::now();
    let partition = Partition::cut(cluster, &minority, &majority);
    let new_leader = cluster.leader(&majority, SETTLE_TIMEOUT).await;
    let mut minority_settled = BTreeMap::new();
    for id in minority {
        let status = cluster.wait_status(id, SETTLE_TIMEOUT, |status| status.leader_id == 0).await;
        minority_settled.insert(id, status);
    }
    let settled_at = Instant::now();

    let mut probes = BTreeMap::new();
    for id in minority {
        probes.insert(id, probe_issuance(cluster, id).await);
    }
    tokio::time::sleep(PARTITION_HOLD).await;
    let minority_before_heal = cluster.statuses(&minority).await;

    let healed_at = Instant::now();
    partition.heal();
    for id in minority {
        cluster.wait_status(id, CONVERGE_TIMEOUT, |status| status.ready && status.leader_id != 0).await;
    }
    let rejoined_at = Instant::now();
    // The load goes on for a while, so the report shows whether the minority nodes issue again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = load.stop().await;
    // Nodes agree on one applied index only once the load stops.
    let converged = cluster.wait_converged(ids, CONVERGE_TIMEOUT).await;
    PartitionRound {
        old_leader: minority[0],
        minority: minority.to_vec(),
        majority,
        new_leader,
        cut_at,
        settled_at,
        healed_at,
        rejoined_at,
        minority_settled,
        minority_before_heal,
        probes,
        report,
        converged,
    }
}

/// Sends one issuance request to node `id` and returns the serial or the error status.
async fn probe_issuance(cluster: &DevCluster, id: u64) -> Result<String, tonic::Status> {
    let mut issuer = IssuerClient::new(cluster.channel(id).await);
    let (_, csr) = common::p256_csr("spiffe://example.org/partitioned", &[]);
    let request = issuer.sign_x509_svid(SignX509SvidRequest { csr, ttl_seconds: None });
    match tokio::time::timeout(PROBE_TIMEOUT, request).await {
        Ok(response) => response.map(|response| response.into_inner().serial),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!("node {id} did not respond within {PROBE_TIMEOUT:?}"))),
    }
}

/// Checks one partition round: the minority rejects issuance and commits nothing, the majority
/// elects a leader and issues, and after the heal every node agrees and issues again.
fn check_round(round: &PartitionRound, name: &str) {
    let context = format!(
        "{name} cut of {:?} from {:?}, settled {:?} after the cut: {}; statuses after the heal: {:#?}",
        round.minority,
        round.majority,
        round.settled_at - round.cut_at,
        round.report.describe(round.cut_at),
        summarize(&round.converged)
    );
    let during_cut = |sent: Instant| sent >= round.settled_at && sent < round.healed_at;
    eprintln!(
        "{name} partition: leader {} cut off with {:?}; node {} leads the majority; settled after {:?}, \
         rejoined {:?} after the heal; {}",
        round.old_leader,
        round.minority,
        round.new_leader,
        round.settled_at - round.cut_at,
        round.rejoined_at - round.healed_at,
        round.report.describe(round.cut_at)
    );

    let before_cut = round.report.issued.iter().filter(|issued| issued.received < round.cut_at).count();
    assert!(before_cut > 0, "no issuance before the {name} cut: {context}");
    assert!(
        round.majority.contains(&round.new_leader),
        "node {} leads after the {name} cut: {context}",
        round.new_leader
    );

    let last_leader = format!("last known leader: node {}", round.old_leader);
    for (id, probe) in &round.probes {
        let status = probe.as_ref().expect_err("a minority node must not issue");
        assert_eq!(status.code(), tonic::Code::Unavailable, "node {id} during the {name} cut: {status:?}");
        assert!(status.message().contains(&last_leader), "node {id} names {last_leader:?}: {}", status.message());
    }
    for failure in round.report.failures.iter().filter(|failure| round.minority.contains(&failure.node)) {
        if !during_cut(failure.received) {
            continue;
        }
        assert_eq!(failure.code, tonic::Code::Unavailable, "node {} during the {name} cut: {failure:?}", failure.node);
        assert!(failure.message.contains(&last_leader), "node {} names {last_leader:?}: {failure:?}", failure.node);
    }

    let from_minority: Vec<_> = round
        .report
        .issued
        .iter()
        .filter(|issued| round.minority.contains(&issued.node) && during_cut(issued.sent))
        .collect();
    assert!(from_minority.is_empty(), "the minority issued during the {name} cut: {from_minority:?}; {context}");
    for id in &round.minority {
        let settled = round.minority_settled.get(id).map(|status| (status.commit_index, status.issued_total));
        let before_heal = round.minority_before_heal.get(id).map(|status| (status.commit_index, status.issued_total));
        assert!(before_heal.is_some(), "node {id} did not return its status before the {name} heal");
        assert_eq!(before_heal, settled, "node {id}'s (commit index, issued total) during the {name} cut");
    }

    for id in &round.majority {
        let issued = round.report.issued.iter().filter(|issued| issued.node == *id && during_cut(issued.sent)).count();
        assert!(issued > 0, "majority node {id} issued nothing during the {name} cut: {context}");
    }
    for id in &round.minority {
        let issued =
            round.report.issued.iter().filter(|issued| issued.node == *id && issued.sent > round.healed_at).count();
        assert!(issued > 0, "node {id} issued nothing after the {name} heal: {context}");
    }
    assert_eq!(round.report.duplicate_serials(), Vec::<String>::new(), "serials received twice in the {name} round");
}
