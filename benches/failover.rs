//! Failover time of a three-node cluster whose ledger contains many issuance records.
//!
//! Steps: create a dev deployment with node 1 as a member and nodes 2 and 3 on standby; with the
//! nodes stopped, fill node 1's ledger with synthetic issuance records through its own Raft node
//! (it is the only voter then); start the cluster with three members, so nodes 2 and 3 join and
//! receive the ledger as a snapshot; then kill the leader with SIGKILL and time how long it takes
//! until a certificate is issued through another node. Run with
//! `cargo bench --bench failover -- --records 10000000`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sigil::client::{Connection, Endpoints};
use sigil::config::Config;
use sigil::ledger::{Command as LedgerCommand, IssuanceRecord};
use sigil::proto::admin_client::AdminClient;
use sigil::proto::issuer_client::IssuerClient;
use sigil::proto::{GetStatusRequest, SignX509SvidRequest};

/// Records per ledger command while filling.
const FILL_BATCH: usize = 4096;
/// Maximum wait for any step of the run.
const STEP_TIMEOUT: Duration = Duration::from_secs(1800);

struct Args {
    records: u64,
    dir: PathBuf,
    kills: u32,
}

fn parse_args() -> Args {
    let mut args = Args { records: 1_000_000, dir: std::env::temp_dir().join("sigil-failover-bench"), kills: 3 };
    let mut words = std::env::args().skip(1);
    while let Some(word) = words.next() {
        match word.as_str() {
            "--records" => args.records = words.next().and_then(|v| v.parse().ok()).expect("--records N"),
            "--dir" => args.dir = words.next().map(PathBuf::from).expect("--dir PATH"),
            "--kills" => args.kills = words.next().and_then(|v| v.parse().ok()).expect("--kills N"),
            // Cargo passes --bench to bench targets.
            "--bench" => {}
            other => panic!("unknown argument {other:?}; use --records N --dir PATH --kills N"),
        }
    }
    args
}

fn main() {
    let args = parse_args();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(run(&args));
}

async fn run(args: &Args) {
    let sigil = sigil_bin();
    let _ = std::fs::remove_dir_all(&args.dir);
    println!("creating the dev deployment in {}", args.dir.display());
    let dev = start_dev(&sigil, &args.dir, 1, 2);
    stop(dev);

    let node1 = Config::load(&args.dir.join("nodes/1/sigil.toml")).expect("node 1 config");
    let started = Instant::now();
    fill(&node1, args.records).await;
    let fill_seconds = started.elapsed().as_secs_f64();
    println!(
        "filled node 1's ledger with {} records in {fill_seconds:.0} s ({:.0} records/s)",
        args.records,
        args.records as f64 / fill_seconds
    );
    println!("ledger size on disk: {}", folder_size_text(&args.dir.join("nodes/1/data/ledger")));

    let started = Instant::now();
    let mut dev = start_dev(&sigil, &args.dir, 3, 0);
    println!("three members ready (nodes 2 and 3 joined from a snapshot) in {:.1} s", started.elapsed().as_secs_f64());

    let mut restarted: Vec<Child> = Vec::new();
    for round in 1..=args.kills {
        let endpoints = read_endpoints(&args.dir);
        let leader = wait_for_leader(&args.dir, &endpoints).await;
        let pid = node_pid(&args.dir, leader);
        let killed_at = Instant::now();
        kill(pid, nix::sys::signal::Signal::SIGKILL);
        let (node, elapsed) = issue_through_others(&args.dir, &endpoints, leader, killed_at).await;
        println!(
            "round {round}: killed leader node {leader}; issued through node {node} {:.2} s after the kill",
            elapsed.as_secs_f64()
        );
        restarted.retain_mut(|child| matches!(child.try_wait(), Ok(None)));
        restarted.push(restart_node(&sigil, &args.dir, leader));
        wait_for_convergence(&args.dir, &endpoints).await;
    }
    stop_all(&mut dev, &mut restarted);
}

/// Writes `records` synthetic records into the stopped node's ledger through its own Raft node.
async fn fill(config: &Config, records: u64) {
    let replica = sigil::setup::open_offline(config).await.expect("open node 1's replicated ledger");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut written = 0u64;
    let mut last_report = Instant::now();
    while written < records {
        let count = (records - written).min(FILL_BATCH as u64);
        let batch: Vec<IssuanceRecord> = (written..written + count)
            .map(|number| {
                let mut serial = vec![0x11];
                serial.extend_from_slice(&number.to_be_bytes());
                IssuanceRecord {
                    serial,
                    spiffe_id: format!("spiffe://example.org/bench/{}", number % 1000),
                    // Spread over 10 days of expiry hours, as a week of short-lived issuance is.
                    not_after_unix: now + 3600 + i64::try_from(number % 240).unwrap_or(0) * 3600,
                    issued_at_unix: now,
                    caller: "spiffe://example.org/bench".to_owned(),
                    profile: "x509-svid".to_owned(),
                    cert_sha256: vec![0x5a; 32],
                }
            })
            .collect();
        let command = LedgerCommand::record_issuances(batch);
        replica.write(sigil_raft::RequestId::random(), &command).await.expect("write a batch of records");
        written += count;
        if last_report.elapsed() > Duration::from_secs(10) {
            println!("  {written} records written");
            last_report = Instant::now();
        }
    }
}

fn sigil_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from);
    let path = target.join("release/sigil");
    assert!(path.exists(), "{} is missing; run `cargo build --release --bins` first", path.display());
    path
}

fn start_dev(sigil: &Path, dir: &Path, nodes: u32, standby: u32) -> Child {
    let log = std::fs::File::create(std::env::temp_dir().join("sigil-failover-dev.log")).expect("dev log");
    let mut child = Command::new(sigil)
        .args(["dev", "--dir"])
        .arg(dir)
        .args(["--nodes", &nodes.to_string(), "--standby", &standby.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dev log"))
        .stderr(log)
        .spawn()
        .expect("start sigil dev");
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !dir.join("endpoints.json").exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "sigil dev exited with {status}; see {}",
                std::env::temp_dir().join("sigil-failover-dev.log").display()
            );
        }
        assert!(Instant::now() < deadline, "sigil dev did not become ready within {STEP_TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    child
}

fn stop(mut child: Child) {
    kill(i32::try_from(child.id()).expect("pid"), nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
}

fn stop_all(dev: &mut Child, restarted: &mut [Child]) {
    kill(i32::try_from(dev.id()).expect("pid"), nix::sys::signal::Signal::SIGTERM);
    let _ = dev.wait();
    for child in restarted {
        kill(i32::try_from(child.id()).expect("pid"), nix::sys::signal::Signal::SIGTERM);
        let _ = child.wait();
    }
}

fn kill(pid: i32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}

fn read_endpoints(dir: &Path) -> Endpoints {
    let text = std::fs::read_to_string(dir.join("endpoints.json")).expect("read endpoints.json");
    serde_json::from_str(&text).expect("parse endpoints.json")
}

fn node_pid(dir: &Path, id: u64) -> i32 {
    let own = dir.join(format!("nodes/{id}/bench-pid"));
    let path = if own.exists() { own } else { dir.join(format!("nodes/{id}/pid")) };
    std::fs::read_to_string(&path).expect("pid file").trim().parse().expect("pid")
}

fn connection(dir: &Path, grpc: &str) -> Connection {
    Connection {
        address: grpc.to_owned(),
        cert: dir.join("client/cert.pem"),
        key: dir.join("client/key.pem"),
        ca: dir.join("bundle.pem"),
    }
}

async fn status_of(dir: &Path, grpc: &str) -> Option<sigil::proto::NodeStatus> {
    let channel = connection(dir, grpc).connect_with_timeout(Duration::from_secs(2)).await.ok()?;
    let response = AdminClient::new(channel).get_status(GetStatusRequest {}).await.ok()?;
    response.into_inner().nodes.into_iter().next()
}

async fn wait_for_leader(dir: &Path, endpoints: &Endpoints) -> u64 {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        for node in &endpoints.nodes {
            if let Some(status) = status_of(dir, &node.grpc).await
                && status.role == "leader"
            {
                return status.id;
            }
        }
        assert!(Instant::now() < deadline, "no leader within {STEP_TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issues through the nodes other than `killed` until one answers; returns it and the time since
/// the kill.
async fn issue_through_others(dir: &Path, endpoints: &Endpoints, killed: u64, since: Instant) -> (u64, Duration) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let csr = sigil::client::svid_csr(&key, "spiffe://example.org/failover", &[]).expect("CSR");
    let others: Vec<_> = endpoints.nodes.iter().filter(|node| node.id != killed).collect();
    let deadline = since + Duration::from_secs(60);
    let mut clients = Vec::new();
    for node in &others {
        let channel = connection(dir, &node.grpc).connect_with_timeout(Duration::from_secs(10)).await.expect("connect");
        clients.push((node.id, IssuerClient::new(channel)));
    }
    loop {
        for (id, client) in &mut clients {
            let request = SignX509SvidRequest { csr: csr.clone(), ttl_seconds: None };
            if client.sign_x509_svid(request).await.is_ok() {
                return (*id, since.elapsed());
            }
        }
        assert!(Instant::now() < deadline, "no issuance within 60 s of the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn restart_node(sigil: &Path, dir: &Path, id: u64) -> Child {
    let node_dir = dir.join(format!("nodes/{id}"));
    let log = std::fs::OpenOptions::new().append(true).open(node_dir.join("node.log")).expect("node log");
    let child = Command::new(sigil)
        .args(["serve", "--config"])
        .arg(node_dir.join("sigil.toml"))
        .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("node log"))
        .stderr(log)
        .spawn()
        .expect("restart node");
    std::fs::write(node_dir.join("bench-pid"), child.id().to_string()).expect("write pid");
    child
}

async fn wait_for_convergence(dir: &Path, endpoints: &Endpoints) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let mut states = std::collections::BTreeSet::new();
        let mut answered = 0;
        for node in &endpoints.nodes {
            if let Some(status) = status_of(dir, &node.grpc).await {
                answered += 1;
                states.insert((status.applied_index, status.ledger_digest));
            }
        }
        if answered == endpoints.nodes.len() && states.len() == 1 {
            return;
        }
        assert!(Instant::now() < deadline, "the nodes did not converge within {STEP_TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn folder_size_text(dir: &Path) -> String {
    let output = Command::new("du").args(["-sh"]).arg(dir).output();
    output.map_or_else(
        |e| e.to_string(),
        |o| String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap_or("").to_owned(),
    )
}
