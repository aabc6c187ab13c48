//! ACME mode of the load generator: each worker runs whole RFC 8555 flows one after another (new
//! account key, newAccount, newOrder, http-01 through a built-in responder, finalize, download)
//! against one or more ACME directories, and the run reports completed orders per second and the
//! latency of a whole flow. Any RFC 8555 server works, which lets one run compare Sigil with
//! Pebble on the same machine.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sigil_acme::Identifier;
use sigil_acme::client::AccountKey;
use sigil_acme::jwk::Algorithm;
use sigil_acme::session::{Http01Responder, Session};

/// Where the http-01 responder listens by default; the dev cluster validates there.
pub const RESPONDER_ADDRESS: &str = "127.0.0.1:5002";

/// Upper bound of the flow latency histogram in microseconds (120 s).
const FLOW_MAX_MICROS: u64 = 120_000_000;

/// Failures printed as they happen; the report counts all of them.
const LOGGED_FAILURES: u64 = 5;

pub struct AcmeOptions {
    pub directories: Vec<String>,
    pub roots_pem: Vec<u8>,
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub label: String,
    pub responder: SocketAddr,
}

#[derive(Debug, serde::Serialize)]
pub struct AcmeReport {
    pub label: String,
    pub directories: Vec<String>,
    pub concurrency: usize,
    pub measured_seconds: f64,
    pub orders: u64,
    pub orders_per_second: f64,
    pub failures: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub cores: usize,
}

struct Shared {
    measure_from: Instant,
    end: Instant,
    orders: AtomicU64,
    failures: AtomicU64,
}

pub async fn run(options: &AcmeOptions) -> anyhow::Result<AcmeReport> {
    let responder = Http01Responder::start(options.responder).await.map_err(|error| anyhow::anyhow!("{error}"))?;
    let start = Instant::now();
    let shared = Arc::new(Shared {
        measure_from: start + options.warmup,
        end: start + options.warmup + options.duration,
        orders: AtomicU64::new(0),
        failures: AtomicU64::new(0),
    });

    let mut workers = Vec::with_capacity(options.concurrency);
    for worker in 0..options.concurrency {
        let directory = options.directories[worker % options.directories.len()].clone();
        let roots = options.roots_pem.clone();
        let responder = responder.clone();
        let shared = Arc::clone(&shared);
        workers.push(tokio::spawn(run_worker(worker, directory, roots, responder, shared)));
    }
    let mut latencies = Histogram::<u64>::new_with_bounds(1, FLOW_MAX_MICROS, 3)?;
    for worker in workers {
        latencies.add(worker.await?)?;
    }

    let measured = Instant::now().min(shared.end).saturating_duration_since(shared.measure_from).as_secs_f64();
    let orders = shared.orders.load(Ordering::Relaxed);
    let millis = |quantile: f64| latencies.value_at_quantile(quantile) as f64 / 1000.0;
    Ok(AcmeReport {
        label: options.label.clone(),
        directories: options.directories.clone(),
        concurrency: options.concurrency,
        measured_seconds: measured,
        orders,
        orders_per_second: if measured > 0.0 { orders as f64 / measured } else { 0.0 },
        failures: shared.failures.load(Ordering::Relaxed),
        p50_ms: millis(0.5),
        p90_ms: millis(0.9),
        p99_ms: millis(0.99),
        max_ms: latencies.max() as f64 / 1000.0,
        cores: std::thread::available_parallelism().map_or(1, |cores| cores.get()),
    })
}

/// Runs flows until the end of the run and returns the latencies of the flows that finished in
/// the measured window.
async fn run_worker(
    worker: usize,
    directory: String,
    roots: Vec<u8>,
    responder: Http01Responder,
    shared: Arc<Shared>,
) -> Histogram<u64> {
    let mut latencies = Histogram::<u64>::new_with_bounds(1, FLOW_MAX_MICROS, 3).expect("histogram bounds");
    let mut flow = 0u64;
    while Instant::now() < shared.end {
        flow += 1;
        let name = format!("w{worker}-{flow}.load.example.com");
        let started = Instant::now();
        let outcome = one_flow(&directory, &roots, &name, &responder).await;
        let finished = Instant::now();
        let counted = started >= shared.measure_from && finished <= shared.end;
        match outcome {
            Ok(()) if counted => {
                shared.orders.fetch_add(1, Ordering::Relaxed);
                let micros = u64::try_from(finished.duration_since(started).as_micros()).unwrap_or(u64::MAX);
                let _ = latencies.record(micros.clamp(1, FLOW_MAX_MICROS));
            }
            Ok(()) => {}
            Err(error) => {
                let failures = shared.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if failures <= LOGGED_FAILURES {
                    eprintln!("load: ACME flow for {name} at {directory} failed: {error}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    latencies
}

async fn one_flow(directory: &str, roots: &[u8], name: &str, responder: &Http01Responder) -> anyhow::Result<()> {
    let key = AccountKey::generate(Algorithm::Es256);
    let mut session = Session::connect(directory, roots, key).await?;
    let created = session.new_account(&serde_json::json!({ "termsOfServiceAgreed": true })).await?;
    anyhow::ensure!(
        created.status.is_success(),
        "newAccount answered {}: {}",
        created.status,
        String::from_utf8_lossy(&created.body)
    );
    let certificate_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&certificate_key)?;
    let chain = session.obtain_certificate(&[Identifier::dns(name)], csr.der(), responder).await?;
    anyhow::ensure!(chain.contains("BEGIN CERTIFICATE"), "the certificate download for {name} holds no certificate");
    Ok(())
}

pub fn write_report(report: &AcmeReport, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    writeln!(out, "ACME load: {} ({} cores)", report.label, report.cores)?;
    writeln!(out, "  directories: {}", report.directories.join(", "))?;
    writeln!(out, "  concurrency {} over {:.1} s measured", report.concurrency, report.measured_seconds)?;
    writeln!(
        out,
        "  orders completed: {} ({:.1}/s), failed flows: {}",
        report.orders, report.orders_per_second, report.failures
    )?;
    writeln!(
        out,
        "  flow latency: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        report.p50_ms, report.p90_ms, report.p99_ms, report.max_ms
    )
}
