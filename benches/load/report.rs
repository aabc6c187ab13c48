//! The load generator's report: totals, per-node results and the serial check, as text and JSON.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{NodeShare, Options, Tally};

/// Number of duplicate serials printed in the human report. The JSON report lists all of them.
const PRINTED_DUPLICATES: usize = 100;

#[derive(Serialize)]
pub(super) struct Report {
    workers: usize,
    connections: usize,
    cores: usize,
    warmup_seconds: f64,
    duration_seconds: f64,
    /// Length of the measured window. It is shorter than `duration_seconds` only when the request
    /// cap stopped the run early.
    measured_seconds: f64,
    max_requests: u64,
    max_requests_reached: bool,
    total: TotalReport,
    nodes: Vec<NodeReport>,
    serials: SerialReport,
    /// False when a serial repeats or an OK response has no serial.
    pub(super) passed: bool,
}

#[derive(Serialize)]
struct TotalReport {
    ok: u64,
    per_second: f64,
    error_count: u64,
    errors: BTreeMap<&'static str, u64>,
    latency_ms: Option<TotalLatency>,
}

#[derive(Serialize)]
struct TotalLatency {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

#[derive(Serialize)]
struct NodeReport {
    id: u64,
    address: String,
    connections: usize,
    workers: usize,
    ok: u64,
    error_count: u64,
    errors: BTreeMap<&'static str, u64>,
    latency_ms: Option<NodeLatency>,
}

#[derive(Serialize)]
struct NodeLatency {
    p50: f64,
    p99: f64,
}

#[derive(Serialize)]
struct SerialReport {
    /// Serials returned over the whole run, warm-up included.
    returned: u64,
    distinct: u64,
    missing: u64,
    duplicates: Vec<DuplicateSerial>,
}

#[derive(Serialize)]
struct DuplicateSerial {
    serial: String,
    /// Node that returned each copy, in the order the workers were merged.
    nodes: Vec<u64>,
}

fn quantile_ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

/// Counts distinct serials over every node and lists each serial returned more than once.
fn check_serials(per_node: &[(u64, Tally)]) -> SerialReport {
    let mut first_node: HashMap<&str, u64> = HashMap::new();
    let mut repeats: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut returned = 0u64;
    let mut missing = 0u64;
    for (node_id, tally) in per_node {
        missing += tally.missing_serials;
        for serial in &tally.serials {
            returned += 1;
            if let Some(first) = first_node.get(serial.as_str()) {
                repeats.entry(serial).or_insert_with(|| vec![*first]).push(*node_id);
            } else {
                first_node.insert(serial, *node_id);
            }
        }
    }
    let duplicates =
        repeats.into_iter().map(|(serial, nodes)| DuplicateSerial { serial: serial.to_owned(), nodes }).collect();
    SerialReport { returned, distinct: first_node.len() as u64, missing, duplicates }
}

pub(super) fn build_report(
    options: &Options,
    shares: &[NodeShare],
    per_node: Vec<(u64, Tally)>,
    measured: Duration,
    max_requests: u64,
    max_requests_reached: bool,
    cores: usize,
) -> Report {
    let serials = check_serials(&per_node);
    let seconds = measured.as_secs_f64();

    let mut total = Tally::new();
    let mut nodes = Vec::new();
    for (share, (_, tally)) in shares.iter().zip(per_node) {
        let latency = &tally.latency;
        nodes.push(NodeReport {
            id: share.id,
            address: share.address.clone(),
            connections: share.connections,
            workers: share.workers,
            ok: latency.len(),
            error_count: tally.errors.values().sum(),
            errors: tally.errors.clone(),
            latency_ms: (!latency.is_empty())
                .then(|| NodeLatency { p50: quantile_ms(latency, 0.50), p99: quantile_ms(latency, 0.99) }),
        });
        total.merge(tally);
    }

    let latency = &total.latency;
    let total_report = TotalReport {
        ok: latency.len(),
        per_second: if seconds > 0.0 { latency.len() as f64 / seconds } else { 0.0 },
        error_count: total.errors.values().sum(),
        errors: total.errors.clone(),
        latency_ms: (!latency.is_empty()).then(|| TotalLatency {
            p50: quantile_ms(latency, 0.50),
            p90: quantile_ms(latency, 0.90),
            p99: quantile_ms(latency, 0.99),
            max: latency.max() as f64 / 1000.0,
        }),
    };
    Report {
        workers: options.concurrency,
        connections: shares.iter().map(|share| share.connections).sum(),
        cores,
        warmup_seconds: options.warmup.as_secs_f64(),
        duration_seconds: options.duration.as_secs_f64(),
        measured_seconds: seconds,
        max_requests,
        max_requests_reached,
        passed: serials.duplicates.is_empty() && serials.missing == 0,
        total: total_report,
        nodes,
        serials,
    }
}

/// Formats a count with its noun, adding "s" unless the count is 1.
pub(super) fn count_of(count: usize, noun: &str) -> String {
    if count == 1 { format!("1 {noun}") } else { format!("{count} {noun}s") }
}

fn format_errors(errors: &BTreeMap<&'static str, u64>) -> String {
    if errors.is_empty() {
        return "none".to_owned();
    }
    errors.iter().map(|(code, count)| format!("{code} {count}")).collect::<Vec<_>>().join(", ")
}

/// Writes the human-readable report. The totals line keeps the format that
/// scripts/bench-compare.sh parses (`... = N/s; ...`).
pub(super) fn write_human_report(report: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    let total = &report.total;
    let (p50, p90, p99, max) = total.latency_ms.as_ref().map_or((0.0, 0.0, 0.0, 0.0), |l| (l.p50, l.p90, l.p99, l.max));
    writeln!(
        out,
        "load: {} SVIDs in {:.1} s = {:.0}/s; errors {}; latency ms p50 {p50:.2} p90 {p90:.2} p99 {p99:.2} max {max:.2}",
        total.ok, report.measured_seconds, total.per_second, total.error_count
    )?;
    if total.error_count > 0 {
        writeln!(out, "load: errors by gRPC code: {}", format_errors(&total.errors))?;
    }
    for node in &report.nodes {
        let latency = node
            .latency_ms
            .as_ref()
            .map_or_else(|| "no OK responses".to_owned(), |l| format!("p50 {:.2} p99 {:.2}", l.p50, l.p99));
        writeln!(
            out,
            "load: node {} at {}: {}, {}; {} OK; errors {}; latency ms {latency}",
            node.id,
            node.address,
            count_of(node.connections, "connection"),
            count_of(node.workers, "worker"),
            node.ok,
            format_errors(&node.errors)
        )?;
    }
    if report.max_requests_reached {
        writeln!(
            out,
            "load: warning: the cap of {} requests stopped the run after {:.1} s of the measured window; \
             raise --max-requests",
            report.max_requests, report.measured_seconds
        )?;
    }

    let serials = &report.serials;
    writeln!(out, "load: serials: {} returned (warm-up included), {} distinct", serials.returned, serials.distinct)?;
    for duplicate in serials.duplicates.iter().take(PRINTED_DUPLICATES) {
        let nodes: Vec<String> = duplicate.nodes.iter().map(u64::to_string).collect();
        writeln!(
            out,
            "load: error: serial {} returned {} times, by nodes {}",
            duplicate.serial,
            duplicate.nodes.len(),
            nodes.join(", ")
        )?;
    }
    if serials.duplicates.len() > PRINTED_DUPLICATES {
        writeln!(
            out,
            "load: error: {} more duplicate serials not printed (--json lists all)",
            serials.duplicates.len() - PRINTED_DUPLICATES
        )?;
    }
    if serials.missing > 0 {
        writeln!(out, "load: error: {} OK responses had an empty serial", serials.missing)?;
    }
    Ok(())
}
