//! Harness for cluster tests with real processes: a `sigil dev` cluster in a temporary folder,
//! node processes that a test kills and starts again, status polling over the Admin API, network
//! partitions between nodes made with nftables, and a load generator that records every
//! certificate it receives.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sigil::client::{Connection, Endpoints, NodeEndpoint};
use sigil::proto::admin_client::AdminClient;
use sigil::proto::issuer_client::IssuerClient;
use sigil::proto::{GetStatusRequest, NodeStatus, SignX509SvidRequest};
use tonic::transport::Channel;

use crate::common::{http_get, p256_csr, sigil_bin};

/// Time `sigil dev` may take to create or start a cluster and write endpoints.json.
const DEV_START_TIMEOUT: Duration = Duration::from_secs(120);
/// Time one status request may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Time one issuance request of the load generator may take. It is longer than the node's 5 s
/// commit timeout, so the node returns its own error before the client gives up.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(8);
/// Hard end of any load run, so a test that never calls `stop` still ends.
const LOAD_LIMIT: Duration = Duration::from_secs(120);

/// Cluster tests run one at a time: each runs three to five nodes and measures pauses in
/// seconds, which a second cluster on the same two cores would distort.
pub static CLUSTER_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A `sigil dev` cluster in a temporary folder. Dropping it stops `sigil dev` and kills every
/// node process that is left, so a failed test leaves nothing running.
pub struct DevCluster {
    root: tempfile::TempDir,
    pub dir: PathBuf,
    nodes: u64,
    standby: u64,
    /// Arguments added to every `sigil dev` command line, such as `--acme-resolver ADDR`.
    extra_args: Vec<String>,
    dev: Option<Child>,
    /// Nodes this test started with `sigil serve`, by node id.
    served: BTreeMap<u64, Child>,
    endpoints: Option<Endpoints>,
}

impl DevCluster {
    /// Creates a cluster of `nodes` members and `standby` prepared nodes with `sigil dev` and
    /// waits until every member is ready.
    pub async fn start(nodes: u64, standby: u64) -> DevCluster {
        DevCluster::start_with_args(nodes, standby, &[]).await
    }

    /// Creates a cluster as `start` does, passing `extra_args` to `sigil dev`, such as
    /// `--acme-resolver ADDR`.
    pub async fn start_with_args(nodes: u64, standby: u64, extra_args: &[&str]) -> DevCluster {
        // A stale partition could match the ports that this cluster's nodes get.
        remove_stale_partitions();
        let root = tempfile::tempdir().expect("create temporary folder");
        let dir = root.path().join("dev");
        let mut cluster = DevCluster {
            root,
            dir,
            nodes,
            standby,
            extra_args: extra_args.iter().map(|arg| (*arg).to_owned()).collect(),
            dev: None,
            served: BTreeMap::new(),
            endpoints: None,
        };
        cluster.start_dev().await;
        cluster
    }

    /// Starts `sigil dev` on the cluster's folder and waits for endpoints.json.
    pub async fn start_dev(&mut self) {
        assert!(self.dev.is_none(), "sigil dev is already running");
        let log_path = self.root.path().join("dev.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("open dev.log");
        let dev = Command::new(sigil_bin())
            .args(["dev", "--dir"])
            .arg(&self.dir)
            .args(["--nodes", &self.nodes.to_string(), "--standby", &self.standby.to_string()])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone dev.log handle"))
            .stderr(log)
            .spawn()
            .expect("start sigil dev");
        self.dev = Some(dev);

        let path = self.dir.join("endpoints.json");
        let deadline = Instant::now() + DEV_START_TIMEOUT;
        loop {
            // sigil dev writes the file in one call, but a read can still see it half written.
            let parsed = std::fs::read_to_string(&path).ok().and_then(|text| serde_json::from_str(&text).ok());
            if let Some(endpoints) = parsed {
                self.endpoints = Some(endpoints);
                return;
            }
            if let Some(Ok(Some(status))) = self.dev.as_mut().map(Child::try_wait) {
                self.dev = None;
                panic!("sigil dev exited with {status} before writing endpoints.json:\n{}", tail(&log_path, 30));
            }
            assert!(
                Instant::now() < deadline,
                "sigil dev did not write endpoints.json within {DEV_START_TIMEOUT:?}:\n{}",
                tail(&log_path, 30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM to `sigil dev` (which stops the nodes it runs) and to the nodes this test
    /// started, waits up to `grace` for them to exit, then kills what is left. Returns whether
    /// `sigil dev` exited within `grace`.
    pub async fn stop(&mut self, grace: Duration) -> bool {
        if let Some(dev) = &self.dev {
            signal(dev.id(), Signal::SIGTERM);
        }
        for child in self.served.values() {
            signal(child.id(), Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !self.all_exited() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let dev_exited = self.dev.as_mut().is_none_or(|dev| matches!(dev.try_wait(), Ok(Some(_))));
        self.kill_everything();
        dev_exited
    }

    fn all_exited(&mut self) -> bool {
        let dev_done = self.dev.as_mut().is_none_or(|dev| matches!(dev.try_wait(), Ok(Some(_))));
        let served_done = self.served.values_mut().all(|child| matches!(child.try_wait(), Ok(Some(_))));
        dev_done && served_done
    }

    /// Kills every node process still running and `sigil dev`, and reaps them.
    fn kill_everything(&mut self) {
        for id in 1..=self.nodes + self.standby {
            if let Some(pid) = self.node_pid(id) {
                signal(pid, Signal::SIGKILL);
            }
        }
        for child in self.served.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.served.clear();
        if let Some(mut dev) = self.dev.take() {
            // With its nodes gone, sigil dev finishes its stop within a second.
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(dev.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = dev.kill();
            let _ = dev.wait();
        }
        for id in 1..=self.nodes + self.standby {
            let _ = std::fs::remove_file(self.node_dir(id).join("pid"));
        }
    }

    pub fn node_dir(&self, id: u64) -> PathBuf {
        self.dir.join("nodes").join(id.to_string())
    }

    pub fn config_path(&self, id: u64) -> PathBuf {
        self.node_dir(id).join("sigil.toml")
    }

    /// Returns node `id`'s node.log without the terminal colour codes that the node writes.
    pub fn node_log(&self, id: u64) -> String {
        let text = std::fs::read_to_string(self.node_dir(id).join("node.log")).unwrap_or_default();
        strip_colours(&text)
    }

    /// Endpoints of a member or standby node, from the endpoints.json of the last start.
    pub fn endpoint(&self, id: u64) -> NodeEndpoint {
        let endpoints = self.endpoints.as_ref().expect("sigil dev was started");
        endpoints
            .nodes
            .iter()
            .chain(&endpoints.standby)
            .find(|node| node.id == id)
            .cloned()
            .unwrap_or_else(|| panic!("endpoints.json lists no node {id}"))
    }

    /// Returns node `id`'s Raft listener address, after checking that its configuration binds
    /// connections to other nodes to the same IP address, as `sigil dev` writes it.
    pub fn raft_address(&self, id: u64) -> SocketAddr {
        let listener: SocketAddr = self.endpoint(id).raft.parse().expect("Raft address in endpoints.json is ip:port");
        let config: toml::Table =
            std::fs::read_to_string(self.config_path(id)).expect("read sigil.toml").parse().expect("parse sigil.toml");
        let source = config["listen"].get("raft_source").and_then(toml::Value::as_str).map(str::parse::<IpAddr>);
        assert_eq!(
            source,
            Some(Ok(listener.ip())),
            "node {id}'s listen.raft_source is not the IP address of its Raft listener {listener}"
        );
        listener
    }

    /// Returns the pid in the node's pid file when that process runs `sigil serve` with the
    /// node's configuration, so a stale file never leads to signalling an unrelated process.
    pub fn node_pid(&self, id: u64) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.node_dir(id).join("pid")).ok()?.trim().parse().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // A zombie has exited; it only waits for its parent to reap it.
        let state = status.rsplit(')').next()?.split_whitespace().next()?;
        if state == "Z" {
            return None;
        }
        let command_line = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let config = self.config_path(id);
        let config_arg = config.to_string_lossy();
        let arguments: Vec<String> =
            command_line.split(|byte| *byte == 0).map(|arg| String::from_utf8_lossy(arg).into_owned()).collect();
        let matches = arguments.iter().any(|arg| arg == "serve") && arguments.iter().any(|arg| *arg == *config_arg);
        matches.then_some(pid)
    }

    /// Kills node `id` with SIGKILL and waits until its process is gone.
    pub async fn kill_node(&mut self, id: u64) {
        let pid = self.node_pid(id).unwrap_or_else(|| panic!("node {id} is not running"));
        signal(pid, Signal::SIGKILL);
        if let Some(mut child) = self.served.remove(&id) {
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.node_pid(id).is_some() {
            assert!(Instant::now() < deadline, "node {id} (pid {pid}) still runs 10 s after SIGKILL");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts node `id` with `sigil serve` as `sigil dev` does, appending to its node.log.
    pub fn serve_node(&mut self, id: u64) {
        assert!(self.node_pid(id).is_none(), "node {id} is already running");
        let node_dir = self.node_dir(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node_dir.join("node.log"))
            .expect("open node.log");
        let child = Command::new(sigil_bin())
            .args(["serve", "--config"])
            .arg(self.config_path(id))
            .env("SOFTHSM2_CONF", self.dir.join("softhsm2.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone node.log handle"))
            .stderr(log)
            .spawn()
            .expect("start sigil serve");
        std::fs::write(node_dir.join("pid"), format!("{}\n", child.id())).expect("write pid file");
        self.served.insert(id, child);
    }

    /// Waits until node `id` returns 200 on /readyz.
    pub async fn wait_ready(&mut self, id: u64, limit: Duration) {
        let metrics = self.endpoint(id).metrics;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(Ok(Some(status))) = self.served.get_mut(&id).map(Child::try_wait) {
                panic!("node {id} exited during start-up ({status}):\n{}", tail_text(&self.node_log(id), 30));
            }
            if http_get(&metrics, "/readyz").is_some_and(|response| response.starts_with("HTTP/1.1 200")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {id} not ready within {limit:?}:\n{}",
                tail_text(&self.node_log(id), 30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn connection(&self, id: u64) -> Connection {
        self.connection_as(id, "client")
    }

    /// Connection settings for node `id` with the credential in the dev folder's `credential`
    /// subfolder, such as "spire-server" or "istio".
    pub fn connection_as(&self, id: u64, credential: &str) -> Connection {
        Connection {
            address: self.endpoint(id).grpc,
            cert: self.dir.join(credential).join("cert.pem"),
            key: self.dir.join(credential).join("key.pem"),
            ca: self.dir.join("bundle.pem"),
        }
    }

    /// Opens an admin mTLS channel to node `id`.
    pub async fn channel(&self, id: u64) -> Channel {
        self.connection(id).connect_with_timeout(ISSUE_TIMEOUT).await.expect("connect to node")
    }

    /// Opens one channel to each node, for the load generator.
    pub async fn channels(&self, ids: &[u64]) -> Vec<(u64, Channel)> {
        let mut channels = Vec::new();
        for id in ids {
            channels.push((*id, self.channel(*id).await));
        }
        channels
    }

    /// Returns node `id`'s own status, or None when it does not respond in time.
    pub async fn status(&self, id: u64) -> Option<NodeStatus> {
        let connection = self.connection(id);
        let request = async move {
            let channel = connection.connect_with_timeout(STATUS_TIMEOUT).await.ok()?;
            let response = AdminClient::new(channel).get_status(GetStatusRequest {}).await.ok()?;
            response.into_inner().nodes.into_iter().next()
        };
        tokio::time::timeout(STATUS_TIMEOUT, request).await.ok().flatten()
    }

    /// Returns the status of each node in `ids` that responds.
    pub async fn statuses(&self, ids: &[u64]) -> BTreeMap<u64, NodeStatus> {
        let mut statuses = BTreeMap::new();
        for id in ids {
            if let Some(status) = self.status(*id).await {
                statuses.insert(*id, status);
            }
        }
        statuses
    }

    /// Waits until one of `ids` reports itself as a ready leader and returns its id.
    pub async fn leader(&self, ids: &[u64], limit: Duration) -> u64 {
        let deadline = Instant::now() + limit;
        loop {
            let statuses = self.statuses(ids).await;
            let leader =
                statuses.values().filter(|status| status.role == "leader" && status.ready).max_by_key(|s| s.term);
            if let Some(leader) = leader {
                return leader.id;
            }
            assert!(Instant::now() < deadline, "no ready leader among nodes {ids:?} within {limit:?}: {statuses:#?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every node in `ids` reports the same applied index and ledger digest, and an
    /// applied index equal to its commit index. Returns those statuses.
    pub async fn wait_converged(&self, ids: &[u64], limit: Duration) -> BTreeMap<u64, NodeStatus> {
        let deadline = Instant::now() + limit;
        loop {
            let statuses = self.statuses(ids).await;
            let applied: BTreeSet<u64> = statuses.values().map(|status| status.applied_index).collect();
            let digests: BTreeSet<&str> = statuses.values().map(|status| status.ledger_digest.as_str()).collect();
            let caught_up = statuses.values().all(|status| status.commit_index == status.applied_index);
            if statuses.len() == ids.len() && applied.len() == 1 && digests.len() == 1 && caught_up {
                return statuses;
            }
            assert!(
                Instant::now() < deadline,
                "nodes {ids:?} did not converge within {limit:?}; last statuses: {:#?}",
                summarize(&statuses)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls node `id`'s status until `condition` holds, at most `limit`, and returns that status.
    pub async fn wait_status(&self, id: u64, limit: Duration, condition: impl Fn(&NodeStatus) -> bool) -> NodeStatus {
        let deadline = Instant::now() + limit;
        loop {
            let status = self.status(id).await;
            if let Some(status) = status.as_ref().filter(|status| condition(status)) {
                return status.clone();
            }
            assert!(
                Instant::now() < deadline,
                "node {id} did not reach the expected state within {limit:?}: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Returns whether node `id` returns 200 on /readyz now.
    pub fn is_ready(&self, id: u64) -> bool {
        http_get(&self.endpoint(id).metrics, "/readyz").is_some_and(|response| response.starts_with("HTTP/1.1 200"))
    }

    /// Returns, for each node in `ids` whose node.log reports a panic, the lines from the panic on.
    pub fn panics(&self, ids: &[u64]) -> BTreeMap<u64, String> {
        let mut panics = BTreeMap::new();
        for id in ids {
            let log = self.node_log(*id);
            if let Some(start) = log.find("panicked at") {
                let excerpt: Vec<&str> = log[start..].lines().take(8).collect();
                panics.insert(*id, excerpt.join("\n"));
            }
        }
        panics
    }

    /// Returns node `id`'s /metrics text.
    pub fn metrics(&self, id: u64) -> String {
        http_get(&self.endpoint(id).metrics, "/metrics").unwrap_or_else(|| panic!("GET /metrics of node {id} failed"))
    }

    /// Rewrites keys of the `[raft]` section in node `id`'s configuration.
    pub fn set_raft_options(&self, id: u64, options: &[(&str, toml::Value)]) {
        self.set_options(id, "raft", options);
    }

    /// Rewrites keys of one top-level section, such as `acme`, in node `id`'s configuration. A
    /// running node reads the change when it next starts.
    pub fn set_options(&self, id: u64, section: &str, options: &[(&str, toml::Value)]) {
        let path = self.config_path(id);
        let mut table: toml::Table =
            std::fs::read_to_string(&path).expect("read sigil.toml").parse().expect("parse sigil.toml");
        let entry = table.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let entry = entry.as_table_mut().unwrap_or_else(|| panic!("[{section}] is not a table in {}", path.display()));
        for (key, value) in options {
            entry.insert((*key).to_owned(), value.clone());
        }
        std::fs::write(&path, toml::to_string(&table).expect("encode sigil.toml")).expect("write sigil.toml");
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for id in 1..=self.nodes + self.standby {
                let log = self.node_log(id);
                if !log.is_empty() {
                    eprintln!("--- last lines of node {id}'s node.log ---\n{}", tail_text(&log, 20));
                }
            }
        }
        if let Some(dev) = &self.dev {
            signal(dev.id(), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !self.all_exited() {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill_everything();
    }
}

/// Prefix of the names of the nftables tables that partitions create, followed by the test
/// process id and a sequence number.
const PARTITION_TABLE_PREFIX: &str = "sigil_partition_";
/// Sequence number of the next partition in this process.
static NEXT_PARTITION: AtomicU64 = AtomicU64::new(0);

/// A network partition between two groups of a cluster's nodes: an nftables table (family `ip`)
/// whose input chain drops every packet of the Raft connections between a node of one group and a
/// node of the other. Packets are dropped, not rejected, as a broken network loses them: the
/// connections stall and time out.
///
/// A rule matches a pair of node addresses and a Raft listener port, because `sigil dev` gives
/// each node its own loopback address (127.0.1.ID) for its Raft listener and for its connections
/// to the other nodes. The API and metrics traffic on 127.0.0.1 and other clusters' nodes, whose
/// listeners have other ports, pass. Dropping the value deletes the table.
pub struct Partition {
    table: Option<String>,
}

impl Partition {
    /// Returns why this machine cannot make partitions (nft missing, no CAP_NET_ADMIN, no
    /// nf_tables in the kernel), or None when it can. Panics on any other failure of nft.
    pub fn unsupported() -> Option<String> {
        let output = match Command::new("nft").args(["list", "tables"]).stdin(Stdio::null()).output() {
            Ok(output) => output,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Some("nft was not found; scripts/install-prereqs.sh installs the nftables package".to_owned());
            }
            Err(error) => panic!("run nft list tables: {error}"),
        };
        if output.status.success() {
            return None;
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if stderr.contains("Operation not permitted") {
            return Some(format!("nft needs CAP_NET_ADMIN; run the test as root ({stderr})"));
        }
        if stderr.contains("not supported") {
            return Some(format!("the kernel does not support nf_tables ({stderr})"));
        }
        panic!("nft list tables failed with {}: {stderr}", output.status);
    }

    /// Cuts the Raft traffic between every node in `side` and every node in `other`.
    pub fn cut(cluster: &DevCluster, side: &[u64], other: &[u64]) -> Partition {
        let addresses: BTreeMap<u64, SocketAddr> =
            side.iter().chain(other).map(|id| (*id, cluster.raft_address(*id))).collect();
        for (id, address) in &addresses {
            if let Some((shared, _)) =
                addresses.iter().find(|(other_id, other)| other_id != &id && other.ip() == address.ip())
            {
                panic!(
                    "nodes {id} and {shared} share the Raft address {}; a partition tells nodes apart by address",
                    address.ip()
                );
            }
        }

        let table = format!(
            "{PARTITION_TABLE_PREFIX}{}_{}",
            std::process::id(),
            NEXT_PARTITION.fetch_add(1, Ordering::Relaxed)
        );
        let mut rules = String::new();
        for a in side {
            for b in other {
                for (from, to) in [(addresses[a], addresses[b]), (addresses[b], addresses[a])] {
                    let (from_ip, to_ip) = (from.ip(), to.ip());
                    // The first rule drops what `from` sends on its connections to `to`'s listener,
                    // the second what `from`'s listener sends back on `to`'s connections.
                    let _ = writeln!(rules, "ip saddr {from_ip} ip daddr {to_ip} tcp dport {} drop", to.port());
                    let _ = writeln!(rules, "ip saddr {from_ip} ip daddr {to_ip} tcp sport {} drop", from.port());
                }
            }
        }
        let script = format!(
            "table ip {table} {{\nchain input {{\ntype filter hook input priority 0; policy accept;\n{rules}}}\n}}\n"
        );
        run_nft(&["-f", "-"], Some(&script)).unwrap_or_else(|error| panic!("create the partition table: {error}"));
        Partition { table: Some(table) }
    }

    /// Deletes the rules, so the two sides reach each other again.
    pub fn heal(mut self) {
        if let Some(table) = self.table.take() {
            run_nft(&["delete", "table", "ip", &table], None)
                .unwrap_or_else(|error| panic!("delete the partition table {table}: {error}"));
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        if let Some(table) = self.table.take()
            && let Err(error) = run_nft(&["delete", "table", "ip", &table], None)
        {
            eprintln!(
                "delete the partition table {table} failed ({error}); remove it with: nft delete table ip {table}"
            );
        }
    }
}

/// Deletes partition tables left by test processes that no longer run, such as one killed with
/// SIGKILL before its `Partition` was dropped.
fn remove_stale_partitions() {
    let Ok(listing) = run_nft(&["list", "tables", "ip"], None) else {
        return;
    };
    for line in listing.lines() {
        let Some(table) = line.trim().strip_prefix("table ip ") else {
            continue;
        };
        let Some(pid) = table.strip_prefix(PARTITION_TABLE_PREFIX).and_then(|rest| rest.split('_').next()) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            eprintln!("deleting the partition table {table} of the exited test process {pid}");
            let _ = run_nft(&["delete", "table", "ip", table], None);
        }
    }
}

/// Runs nft with `args`, writing `input` to its standard input, and returns its standard output.
fn run_nft(args: &[&str], input: Option<&str>) -> Result<String, String> {
    use std::io::Write as _;

    let mut child = Command::new("nft")
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("start nft {}: {error}", args.join(" ")))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(input.as_bytes()).map_err(|error| format!("write to nft: {error}"))?;
    }
    let output = child.wait_with_output().map_err(|error| format!("wait for nft: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "nft {} failed with {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn signal(pid: u32, signal: Signal) {
    let pid = Pid::from_raw(i32::try_from(pid).expect("pid fits i32"));
    let _ = kill(pid, signal);
}

/// Formats the fields of each status that show whether nodes agree, for failure messages.
pub fn summarize(statuses: &BTreeMap<u64, NodeStatus>) -> Vec<String> {
    statuses
        .values()
        .map(|status| {
            format!(
                "node {}: role {} term {} commit {} applied {} digest {} issued {} voters {:?} learners {:?} ready {}",
                status.id,
                status.role,
                status.term,
                status.commit_index,
                status.applied_index,
                status.ledger_digest.get(..16).unwrap_or(&status.ledger_digest),
                status.issued_total,
                status.voters,
                status.learners,
                status.ready
            )
        })
        .collect()
}

/// Removes ANSI escape sequences such as `ESC[2m`.
fn strip_colours(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // A control sequence ends with a letter.
            for next in chars.by_ref() {
                if next.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

fn tail(path: &Path, lines: usize) -> String {
    tail_text(&strip_colours(&std::fs::read_to_string(path).unwrap_or_default()), lines)
}

/// Returns the last `lines` lines of `text`.
pub fn tail_text(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Reads the value of one sample, such as `sigil_raft_snapshots_total{event="received"}`, from
/// Prometheus text.
pub fn metric_value(metrics: &str, sample: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
}

/// One certificate a load client received.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Serial number, lower-case hex, as the node returned it.
    pub serial: String,
    /// Node that returned the certificate.
    pub node: u64,
    pub sent: Instant,
    pub received: Instant,
}

/// One request of a load client that failed.
#[derive(Debug, Clone)]
pub struct Failure {
    pub node: u64,
    pub received: Instant,
    pub code: tonic::Code,
    pub message: String,
}

/// Clients that issue X509-SVIDs continuously, each sending one request at a time and moving to
/// the next node of the target list after every request.
pub struct Load {
    stop: Arc<AtomicBool>,
    targets: Arc<Mutex<Vec<(u64, Channel)>>>,
    tasks: Vec<tokio::task::JoinHandle<(Vec<Issued>, Vec<Failure>)>>,
}

impl Load {
    /// Starts `clients` clients over `targets`.
    pub fn start(targets: Vec<(u64, Channel)>, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let targets = Arc::new(Mutex::new(targets));
        let hard_stop = Instant::now() + LOAD_LIMIT;
        let tasks = (0..clients)
            .map(|client| tokio::spawn(run_client(client, Arc::clone(&targets), Arc::clone(&stop), hard_stop)))
            .collect();
        Load { stop, targets, tasks }
    }

    /// Replaces the nodes the clients send to, from their next request on.
    pub fn set_targets(&self, targets: Vec<(u64, Channel)>) {
        *self.targets.lock().expect("load targets lock") = targets;
    }

    /// Stops the clients after their current request and returns what they recorded.
    pub async fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let stopped = Instant::now();
        let mut report = LoadReport { issued: Vec::new(), failures: Vec::new(), stopped };
        for task in self.tasks {
            let (issued, failures) = task.await.expect("load client panicked");
            report.issued.extend(issued);
            report.failures.extend(failures);
        }
        report.issued.sort_by_key(|issued| issued.received);
        report.failures.sort_by_key(|failure| failure.received);
        report
    }
}

async fn run_client(
    client: usize,
    targets: Arc<Mutex<Vec<(u64, Channel)>>>,
    stop: Arc<AtomicBool>,
    hard_stop: Instant,
) -> (Vec<Issued>, Vec<Failure>) {
    let (_, csr) = p256_csr(&format!("spiffe://example.org/load/{client}"), &[]);
    let mut issued = Vec::new();
    let mut failures = Vec::new();
    let mut round = client;
    while !stop.load(Ordering::Relaxed) && Instant::now() < hard_stop {
        let target = {
            let targets = targets.lock().expect("load targets lock");
            targets.get(round % targets.len().max(1)).cloned()
        };
        round += 1;
        let Some((node, channel)) = target else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let sent = Instant::now();
        let request = SignX509SvidRequest { csr: csr.clone(), ttl_seconds: None };
        let answer = tokio::time::timeout(ISSUE_TIMEOUT, IssuerClient::new(channel).sign_x509_svid(request)).await;
        let received = Instant::now();
        match answer {
            Ok(Ok(response)) => issued.push(Issued { serial: response.into_inner().serial, node, sent, received }),
            Ok(Err(status)) => {
                failures.push(Failure { node, received, code: status.code(), message: status.message().to_owned() });
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => failures.push(Failure {
                node,
                received,
                code: tonic::Code::DeadlineExceeded,
                message: format!("no response within {ISSUE_TIMEOUT:?}"),
            }),
        }
    }
    (issued, failures)
}

/// What the load clients recorded, sorted by the time each response arrived.
pub struct LoadReport {
    pub issued: Vec<Issued>,
    pub failures: Vec<Failure>,
    /// When `Load::stop` signalled the clients to stop.
    pub stopped: Instant,
}

impl LoadReport {
    /// Returns the longest time in `from..to` without a successful issuance, counting from
    /// `from` to the first success and from the last success to `to`.
    pub fn max_gap(&self, from: Instant, to: Instant) -> Duration {
        let mut previous = from;
        let mut longest = Duration::ZERO;
        for issued in self.issued.iter().filter(|issued| issued.received > from && issued.received <= to) {
            longest = longest.max(issued.received - previous);
            previous = issued.received;
        }
        longest.max(to.saturating_duration_since(previous))
    }

    /// Returns the first certificate that a node other than `excluded` issued for a request
    /// sent at or after `after`.
    pub fn first_issued_elsewhere(&self, after: Instant, excluded: u64) -> Option<&Issued> {
        self.issued.iter().find(|issued| issued.sent >= after && issued.node != excluded)
    }

    /// Returns every serial received, in the order the responses arrived.
    pub fn serials(&self) -> Vec<String> {
        self.issued.iter().map(|issued| issued.serial.clone()).collect()
    }

    /// Returns the serials that were received more than once.
    pub fn duplicate_serials(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        let mut duplicates = BTreeSet::new();
        for issued in &self.issued {
            if !seen.insert(issued.serial.as_str()) {
                duplicates.insert(issued.serial.clone());
            }
        }
        duplicates.into_iter().collect()
    }

    /// Counts certificates per node that returned them.
    pub fn issued_per_node(&self) -> BTreeMap<u64, usize> {
        let mut counts = BTreeMap::new();
        for issued in &self.issued {
            *counts.entry(issued.node).or_insert(0) += 1;
        }
        counts
    }

    /// Counts failures by gRPC code and keeps one message of each, for failure messages.
    pub fn failure_summary(&self) -> BTreeMap<String, (usize, String)> {
        let mut summary: BTreeMap<String, (usize, String)> = BTreeMap::new();
        for failure in &self.failures {
            let entry = summary
                .entry(format!("{:?}", failure.code))
                .or_insert_with(|| (0, format!("node {}: {}", failure.node, failure.message)));
            entry.0 += 1;
        }
        summary
    }

    /// Describes the run relative to `origin` (such as the moment of a kill), for failure
    /// messages: counts, failures, and the successes per second around `origin`.
    pub fn describe(&self, origin: Instant) -> String {
        let mut per_second: BTreeMap<i64, usize> = BTreeMap::new();
        for issued in &self.issued {
            let offset = if issued.received >= origin {
                i64::try_from((issued.received - origin).as_secs()).unwrap_or(i64::MAX)
            } else {
                -i64::try_from((origin - issued.received).as_secs()).unwrap_or(i64::MAX) - 1
            };
            *per_second.entry(offset).or_insert(0) += 1;
        }
        format!(
            "{} issued ({:?} per node), {} failed: {:?}; successes per second from the event: {:?}",
            self.issued.len(),
            self.issued_per_node(),
            self.failures.len(),
            self.failure_summary(),
            per_second
        )
    }
}
