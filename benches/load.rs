//! Load generator: starts a one-node dev deployment (`sigil dev`) in a temporary folder and drives
//! `SignX509Svid` over mTLS with pre-generated CSRs at a fixed concurrency for a fixed time, then
//! prints throughput and latency percentiles.
//!
//! Run: `cargo bench --bench load -- [--concurrency 64] [--duration 10s] [--connections 8]
//! [--warmup 2s] [--dev-dir DIR]`. With --dev-dir it uses an already running deployment.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sigil::client::Connection;
use sigil::proto::SignX509SvidRequest;
use sigil::proto::issuer_client::IssuerClient;
use tokio::sync::Mutex;

/// Distinct CSRs cycled through; serials stay unique because the CA picks them.
const CSR_POOL: usize = 512;

struct Options {
    concurrency: usize,
    connections: usize,
    duration: Duration,
    warmup: Duration,
    dev_dir: Option<PathBuf>,
}

fn parse_options() -> Options {
    let mut options = Options {
        concurrency: 64,
        connections: 8,
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(2),
        dev_dir: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--concurrency" => options.concurrency = value().parse().expect("--concurrency is a number"),
            "--connections" => options.connections = value().parse().expect("--connections is a number"),
            "--duration" => options.duration = humantime::parse_duration(&value()).expect("--duration like 10s"),
            "--warmup" => options.warmup = humantime::parse_duration(&value()).expect("--warmup like 2s"),
            "--dev-dir" => options.dev_dir = Some(PathBuf::from(value())),
            // cargo bench passes --bench; other harness flags are ignored too.
            _ => {}
        }
    }
    options
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

#[tokio::main]
async fn main() {
    let options = parse_options();
    let (_node, dir) = match &options.dev_dir {
        Some(dir) => (None, dir.clone()),
        None => {
            let (node, dir) = start_dev();
            (Some(node), dir)
        }
    };
    let connection = Connection::from_dev_dir(&dir, None).expect("read dev folder");
    let csrs = Arc::new(make_csrs());

    let mut clients = Vec::new();
    for _ in 0..options.connections.max(1) {
        clients.push(IssuerClient::new(connection.connect().await.expect("connect")));
    }

    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "load: {} workers over {} connections, warm-up {:?}, measured {:?}, {cores} cores",
        options.concurrency, options.connections, options.warmup, options.duration
    );

    let histogram =
        Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let measure_from = start + options.warmup;
    let end = measure_from + options.duration;

    let mut workers = Vec::new();
    for worker in 0..options.concurrency {
        let mut client = clients[worker % clients.len()].clone();
        let csrs = Arc::clone(&csrs);
        let histogram = Arc::clone(&histogram);
        let errors = Arc::clone(&errors);
        workers.push(tokio::spawn(async move {
            let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
            let mut index = worker;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let request = SignX509SvidRequest { csr: csrs[index % csrs.len()].clone(), ttl_seconds: Some(3600) };
                index += 1;
                let result = client.sign_x509_svid(request).await;
                let done = Instant::now();
                if sent < measure_from || done > end {
                    continue;
                }
                match result {
                    Ok(_) => local
                        .saturating_record(u64::try_from(done.duration_since(sent).as_micros()).unwrap_or(u64::MAX)),
                    Err(status) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("load: request failed: {status}");
                        }
                    }
                }
            }
            histogram.lock().await.add(&local).expect("merge histograms");
        }));
    }
    for worker in workers {
        worker.await.expect("worker task");
    }

    let histogram = histogram.lock().await;
    let seconds = options.duration.as_secs_f64();
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "load: {} SVIDs in {seconds:.1} s = {:.0}/s; errors {}; latency ms p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
        histogram.len(),
        histogram.len() as f64 / seconds,
        errors.load(Ordering::Relaxed),
        ms(0.50),
        ms(0.90),
        ms(0.99),
        histogram.max() as f64 / 1000.0
    );
}
