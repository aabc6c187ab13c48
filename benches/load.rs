//! Load generator: drives `SignX509Svid` over mTLS with pre-generated CSRs at a fixed concurrency
//! for a fixed time against one or more nodes of a `sigil dev` deployment. It then prints
//! throughput, latency percentiles and errors, in total and per node, and checks that no serial
//! repeats.
//!
//! Run: `cargo bench --bench load -- [--concurrency 64] [--duration 10s] [--connections 8]
//! [--warmup 2s] [--dev-dir DIR] [--nodes first|all|ID[,ID...]] [--max-requests N] [--json]`.
//!
//! With `--acme` it runs whole ACME flows instead (see `load/acme.rs`) against the selected nodes'
//! ACME directories, or against the directories given with `--acme-directory URL` (repeatable),
//! trusting `--acme-roots PEM` (default DIR/bundle.pem), with its http-01 responder on
//! `--acme-responder ADDR` (default 127.0.0.1:5002); `--label` names the run in the report.
//! Without --dev-dir it starts a one-node dev deployment in a temporary folder. It exits with 1
//! when a serial repeats or an OK response has no serial, and with 2 on invalid options or a
//! failed setup.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use sigil::client::Connection;
use sigil::grpc::code_name;
use sigil::proto::SignX509SvidRequest;
use sigil::proto::issuer_client::IssuerClient;
use tonic::Code;
use tonic::transport::Channel;

#[path = "load/report.rs"]
mod report;

#[path = "load/acme.rs"]
mod acme;

use report::{Report, build_report, count_of, write_human_report};

/// Distinct CSRs cycled through; serials stay unique because the CA picks them.
const CSR_POOL: usize = 512;

/// Pause before a worker sends its next request after an UNAVAILABLE status, for example from a
/// node that has no Raft leader.
const UNAVAILABLE_PAUSE: Duration = Duration::from_millis(50);

/// Default cap on requests sent per second of warm-up plus measured time. It is more than ten
/// times the signing rate of one SoftHSM token in BENCHMARKS.md, and it bounds the memory that the
/// serial check takes when requests fail fast.
const DEFAULT_MAX_REQUESTS_PER_SECOND: u64 = 100_000;

/// Number of failed requests printed as they happen. The report counts all of them.
const LOGGED_FAILURES: u64 = 5;

/// Upper bound of the latency histogram in microseconds (60 s), above the 30 s request timeout that
/// `Connection::connect` sets.
const LATENCY_MAX_MICROS: u64 = 60_000_000;

const USAGE: &str = "usage: cargo bench --bench load -- [--concurrency N] [--connections N] \
[--duration 10s] [--warmup 2s] [--dev-dir DIR] [--nodes first|all|ID[,ID...]] [--max-requests N] [--json] \
[--acme [--acme-directory URL]... [--acme-roots PEM] [--acme-responder ADDR] [--label TEXT]]";

/// Nodes of the dev deployment that receive requests.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NodeSelection {
    First,
    All,
    Ids(Vec<u64>),
}

struct Options {
    concurrency: usize,
    connections: usize,
    duration: Duration,
    warmup: Duration,
    dev_dir: Option<PathBuf>,
    nodes: NodeSelection,
    /// Cap on requests sent by all workers together, warm-up included.
    max_requests: Option<u64>,
    json: bool,
    acme: bool,
    acme_directories: Vec<String>,
    acme_roots: Option<PathBuf>,
    acme_responder: std::net::SocketAddr,
    label: String,
}

fn parse_options(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
    let mut options = Options {
        concurrency: 64,
        connections: 8,
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(2),
        dev_dir: None,
        nodes: NodeSelection::First,
        max_requests: None,
        json: false,
        acme: false,
        acme_directories: Vec::new(),
        acme_roots: None,
        acme_responder: acme::RESPONDER_ADDRESS.parse().expect("valid default address"),
        label: "sigil".to_owned(),
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--concurrency" => options.concurrency = parse_count(&arg, &value()?)?,
            "--connections" => options.connections = parse_count(&arg, &value()?)?,
            "--duration" => options.duration = parse_positive_duration(&arg, &value()?)?,
            "--warmup" => {
                let text = value()?;
                options.warmup = humantime::parse_duration(&text)
                    .map_err(|error| format!("invalid --warmup {text:?}: {error}; give a duration like 2s"))?;
            }
            "--dev-dir" => options.dev_dir = Some(PathBuf::from(value()?)),
            "--nodes" => options.nodes = parse_node_selection(&value()?)?,
            "--max-requests" => options.max_requests = Some(parse_count(&arg, &value()?)?),
            "--json" => options.json = true,
            "--acme" => options.acme = true,
            "--acme-directory" => options.acme_directories.push(value()?),
            "--acme-roots" => options.acme_roots = Some(PathBuf::from(value()?)),
            "--acme-responder" => {
                let text = value()?;
                options.acme_responder = text
                    .parse()
                    .map_err(|_| format!("invalid --acme-responder {text:?}; give an address like 127.0.0.1:5002"))?;
            }
            "--label" => options.label = value()?,
            // cargo bench passes --bench.
            "--bench" => {}
            _ => eprintln!("load: ignoring unknown argument {arg:?}"),
        }
    }
    Ok(options)
}

fn parse_count<T: FromStr + PartialEq + Default>(option: &str, text: &str) -> Result<T, String> {
    match text.parse::<T>() {
        Ok(count) if count != T::default() => Ok(count),
        _ => Err(format!("invalid {option} {text:?}; give a whole number of at least 1")),
    }
}

fn parse_positive_duration(option: &str, text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        Ok(_) => Err(format!("invalid {option} {text:?}; give a duration above zero, like 10s")),
        Err(error) => Err(format!("invalid {option} {text:?}: {error}; give a duration like 10s")),
    }
}

fn parse_node_selection(text: &str) -> Result<NodeSelection, String> {
    match text {
        "first" => return Ok(NodeSelection::First),
        "all" => return Ok(NodeSelection::All),
        _ => {}
    }
    let mut ids = Vec::new();
    for part in text.split(',') {
        let id: u64 = part
            .trim()
            .parse()
            .map_err(|_| format!("invalid --nodes {text:?}; give first, all, or node ids like 1,3"))?;
        if ids.contains(&id) {
            return Err(format!("invalid --nodes {text:?}: node {id} is listed twice"));
        }
        ids.push(id);
    }
    Ok(NodeSelection::Ids(ids))
}

/// Picks the selected nodes from the `(id, connection)` list of a dev folder, in the order given.
fn select_nodes<T: Clone>(available: Vec<(u64, T)>, selection: &NodeSelection) -> anyhow::Result<Vec<(u64, T)>> {
    match selection {
        NodeSelection::First => Ok(available.into_iter().take(1).collect()),
        NodeSelection::All => Ok(available),
        NodeSelection::Ids(ids) => {
            let listed: Vec<String> = available.iter().map(|(id, _)| id.to_string()).collect();
            ids.iter()
                .map(|id| {
                    available.iter().find(|(node_id, _)| node_id == id).cloned().with_context(|| {
                        format!("node {id} is not in the deployment, which lists nodes {}", listed.join(", "))
                    })
                })
                .collect()
        }
    }
}

/// A `sigil dev` child process, stopped with SIGTERM on drop.
struct DevNode {
    child: Child,
    _root: tempfile::TempDir,
}

impl Drop for DevNode {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn start_dev() -> (DevNode, PathBuf) {
    let root = tempfile::tempdir().expect("create temporary folder");
    let dir = root.path().join("dev");
    let child = Command::new(env!("CARGO_BIN_EXE_sigil"))
        .args(["dev", "--dir"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sigil dev");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !dir.join("endpoints.json").exists() {
        assert!(Instant::now() < deadline, "sigil dev did not start within 90 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    (DevNode { child, _root: root }, dir)
}

fn make_csrs() -> Vec<Vec<u8>> {
    (0..CSR_POOL)
        .map(|i| {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate key");
            let id = format!("spiffe://example.org/load/worker-{i}");
            sigil::client::svid_csr(&key, &id, &[]).expect("build CSR")
        })
        .collect()
}

fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_MICROS, 3).expect("histogram bounds")
}

/// Results of one worker, and after merging, of one node.
struct Tally {
    /// Latency in microseconds of OK responses within the measured window.
    latency: Histogram<u64>,
    /// Failed requests within the measured window, by gRPC code name.
    errors: BTreeMap<&'static str, u64>,
    /// Serial of every OK response, warm-up included.
    serials: Vec<String>,
    /// OK responses whose serial field was empty, warm-up included.
    missing_serials: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally { latency: new_latency_histogram(), errors: BTreeMap::new(), serials: Vec::new(), missing_serials: 0 }
    }

    fn merge(&mut self, other: Tally) {
        self.latency.add(&other.latency).expect("merge histograms");
        for (code, count) in other.errors {
            *self.errors.entry(code).or_default() += count;
        }
        self.serials.extend(other.serials);
        self.missing_serials += other.missing_serials;
    }
}

/// Timing and limits that every worker shares.
#[derive(Clone)]
struct Plan {
    measure_from: Instant,
    end: Instant,
    max_requests: u64,
    /// Requests sent so far by all workers.
    requests_sent: Arc<AtomicU64>,
    max_requests_reached: Arc<AtomicBool>,
    /// Failed requests so far by all workers, warm-up included. Only the first few are printed.
    failures: Arc<AtomicU64>,
}

/// Sends requests until the measured window ends or the request cap is reached. Each request is
/// cut off at the end of the window, so a node that stops responding cannot stretch the run.
async fn run_worker(
    worker: usize,
    node_id: u64,
    mut client: IssuerClient<Channel>,
    csrs: Arc<Vec<Vec<u8>>>,
    plan: Plan,
) -> Tally {
    let mut tally = Tally::new();
    let end = tokio::time::Instant::from_std(plan.end);
    let mut index = worker;
    loop {
        let sent = Instant::now();
        if sent >= plan.end {
            break;
        }
        if plan.requests_sent.fetch_add(1, Ordering::Relaxed) >= plan.max_requests {
            plan.max_requests_reached.store(true, Ordering::Relaxed);
            break;
        }
        let request = SignX509SvidRequest { csr: csrs[index % csrs.len()].clone(), ttl_seconds: Some(3600) };
        index += 1;
        let Ok(result) = tokio::time::timeout_at(end, client.sign_x509_svid(request)).await else {
            // The request was still in flight when the window ended, so it counts as neither OK
            // nor failed.
            break;
        };
        let done = Instant::now();
        let measured = sent >= plan.measure_from && done <= plan.end;
        match result {
            Ok(response) => {
                let serial = response.into_inner().serial;
                if serial.is_empty() {
                    tally.missing_serials += 1;
                } else {
                    tally.serials.push(serial);
                }
                if measured {
                    let micros = u64::try_from(done.duration_since(sent).as_micros()).unwrap_or(u64::MAX);
                    tally.latency.saturating_record(micros);
                }
            }
            Err(status) => {
                if measured {
                    *tally.errors.entry(code_name(status.code())).or_default() += 1;
                }
                let failure = plan.failures.fetch_add(1, Ordering::Relaxed);
                if failure < LOGGED_FAILURES {
                    let phase = if sent < plan.measure_from { " during warm-up" } else { "" };
                    eprintln!("load: node {node_id}: request failed{phase}: {status}");
                }
                if status.code() == Code::Unavailable {
                    tokio::time::sleep_until(end.min(tokio::time::Instant::now() + UNAVAILABLE_PAUSE)).await;
                }
            }
        }
    }
    tally
}

/// Connections and workers assigned to one selected node.
struct NodeShare {
    id: u64,
    address: String,
    connections: usize,
    workers: usize,
}

/// Assigns connection `c` to node `c % nodes` and worker `w` to connection `w % connections`.
/// Raises the connection count to the node count so that every selected node gets a connection.
fn plan_shares(nodes: &[(u64, Connection)], options: &Options) -> (usize, Vec<NodeShare>) {
    let connections = options.connections.max(nodes.len());
    let shares = nodes
        .iter()
        .enumerate()
        .map(|(position, (id, connection))| NodeShare {
            id: *id,
            address: connection.address.clone(),
            connections: (position..connections).step_by(nodes.len()).count(),
            workers: (0..options.concurrency).filter(|worker| (worker % connections) % nodes.len() == position).count(),
        })
        .collect();
    (connections, shares)
}

async fn run(options: &Options, dir: &std::path::Path, log: &mut dyn Write) -> anyhow::Result<Report> {
    let available = Connection::all_from_dev_dir(dir)?;
    let nodes = select_nodes(available, &options.nodes)?;
    let (connection_count, shares) = plan_shares(&nodes, options);
    let csrs = Arc::new(make_csrs());

    // Connection c goes to node c % nodes, so the nodes take turns.
    let mut clients = Vec::with_capacity(connection_count);
    for index in 0..connection_count {
        let position = index % nodes.len();
        let (id, connection) = &nodes[position];
        let channel = connection
            .connect()
            .await
            .with_context(|| format!("open connection {} of {connection_count} to node {id}", index + 1))?;
        clients.push((position, IssuerClient::new(channel)));
    }

    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let node_list: Vec<String> = shares.iter().map(|share| share.id.to_string()).collect();
    let node_word = if node_list.len() == 1 { "node" } else { "nodes" };
    writeln!(
        log,
        "load: {} over {} to {node_word} {}, warm-up {:?}, measured {:?}, {cores} cores",
        count_of(options.concurrency, "worker"),
        count_of(connection_count, "connection"),
        node_list.join(", "),
        options.warmup,
        options.duration
    )?;
    if connection_count > options.connections {
        writeln!(log, "load: raised --connections to {connection_count} so that every selected node gets one")?;
    }
    for share in shares.iter().filter(|share| share.workers == 0) {
        writeln!(log, "load: warning: node {} gets no worker; raise --concurrency", share.id)?;
    }

    let start = Instant::now();
    let planned = options.warmup + options.duration;
    let max_requests = options.max_requests.unwrap_or_else(|| {
        let seconds = planned.as_secs().saturating_add(u64::from(planned.subsec_nanos() > 0));
        seconds.saturating_mul(DEFAULT_MAX_REQUESTS_PER_SECOND)
    });
    let plan = Plan {
        measure_from: start + options.warmup,
        end: start + planned,
        max_requests,
        requests_sent: Arc::new(AtomicU64::new(0)),
        max_requests_reached: Arc::new(AtomicBool::new(false)),
        failures: Arc::new(AtomicU64::new(0)),
    };

    let mut workers = Vec::with_capacity(options.concurrency);
    for worker in 0..options.concurrency {
        let (position, client) = &clients[worker % clients.len()];
        let node_id = nodes[*position].0;
        let task = run_worker(worker, node_id, client.clone(), Arc::clone(&csrs), plan.clone());
        workers.push((*position, tokio::spawn(task)));
    }
    let mut per_node: Vec<(u64, Tally)> = nodes.iter().map(|(id, _)| (*id, Tally::new())).collect();
    for (position, worker) in workers {
        per_node[position].1.merge(worker.await.context("load worker task failed")?);
    }

    // The request cap can stop every worker before the window ends. Then only the part of the
    // window that ran counts for throughput.
    let stopped = Instant::now().min(plan.end);
    let measured = stopped.saturating_duration_since(plan.measure_from);
    let reached = plan.max_requests_reached.load(Ordering::Relaxed);
    Ok(build_report(options, &shares, per_node, measured, max_requests, reached, cores))
}

/// Runs the ACME mode against the given directories, or the selected nodes of `dir`.
async fn run_acme(options: &Options, dir: Option<&std::path::Path>, log: &mut dyn Write) -> ExitCode {
    let setup = || -> anyhow::Result<acme::AcmeOptions> {
        let mut directories = options.acme_directories.clone();
        if directories.is_empty() {
            let dir = dir.context("--acme needs --acme-directory or a dev deployment")?;
            let path = dir.join("endpoints.json");
            let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
            let endpoints: sigil::client::Endpoints =
                serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
            let available = endpoints.nodes.into_iter().map(|node| (node.id, node.acme)).collect();
            for (id, acme) in select_nodes(available, &options.nodes)? {
                directories.push(acme.with_context(|| format!("node {id} serves no ACME"))?);
            }
        }
        let roots_path = match (&options.acme_roots, dir) {
            (Some(path), _) => path.clone(),
            (None, Some(dir)) => dir.join("bundle.pem"),
            (None, None) => anyhow::bail!("--acme-directory needs --acme-roots"),
        };
        let roots_pem = std::fs::read(&roots_path).with_context(|| format!("read {}", roots_path.display()))?;
        Ok(acme::AcmeOptions {
            directories,
            roots_pem,
            concurrency: options.concurrency,
            duration: options.duration,
            warmup: options.warmup,
            label: options.label.clone(),
            responder: options.acme_responder,
        })
    };
    let report = match setup() {
        Ok(acme_options) => acme::run(&acme_options).await,
        Err(error) => Err(error),
    };
    let report = match report {
        Ok(report) => report,
        Err(error) => {
            eprintln!("load: {error:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = acme::write_report(&report, log) {
        eprintln!("load: write report failed: {error}");
        return ExitCode::from(2);
    }
    if options.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    }
    if report.orders > 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

#[tokio::main]
async fn main() -> ExitCode {
    let options = match parse_options(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("load: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // With --json, stdout carries only the JSON object and the human report goes to stderr.
    let mut log: Box<dyn Write> = if options.json { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) };

    if options.acme && !options.acme_directories.is_empty() {
        return run_acme(&options, None, log.as_mut()).await;
    }
    let (_node, dir) = match &options.dev_dir {
        Some(dir) => (None, dir.clone()),
        None => {
            let (node, dir) = start_dev();
            (Some(node), dir)
        }
    };
    if options.acme {
        return run_acme(&options, Some(&dir), log.as_mut()).await;
    }
    let report = match run(&options, &dir, &mut log).await {
        Ok(report) => report,
        Err(error) => {
            eprintln!("load: {error:#}");
            return ExitCode::from(2);
        }
    };

    if let Err(error) = write_human_report(&report, &mut log).and_then(|()| log.flush()) {
        eprintln!("load: write report failed: {error}");
        return ExitCode::from(2);
    }
    if options.json {
        match serde_json::to_string(&report) {
            Ok(text) => println!("{text}"),
            Err(error) => {
                eprintln!("load: serialize report as JSON failed: {error}");
                return ExitCode::from(2);
            }
        }
    }
    if report.passed { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
