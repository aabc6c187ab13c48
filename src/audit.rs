//! The audit log: one JSON line per certificate request, issued or refused,
//! linked into a SHA-256 hash chain.
//!
//! Each line is the JSON of an [`AuditEvent`], and its last member is
//! `hash`. The hash is the lowercase hex SHA-256 of `prev_hash` (its 64 hex
//! characters) followed by the line without the hash member, that is the
//! bytes before `,"hash":` and then `}`. The first event's `prev_hash` is
//! 64 zeros. [`verify_file`] checks a whole file.
//!
//! Events carry certificate metadata only. Keep secrets (keys, tokens, PINs)
//! out of [`AuditEvent`].

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

use ring::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `prev_hash` of the first event in a file.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Maximum bytes of chained lines kept in memory while writes fail. Events
/// logged beyond it are dropped and counted, and are not chained.
const MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;

/// Maximum number of messages the writer thread takes for one write.
const MAX_BATCH_MESSAGES: usize = 4096;

/// Size of the first read from the end of the file when resuming the chain.
const TAIL_READ_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Issued,
    Refused,
    /// The policy would have refused, but it runs in monitor mode.
    WouldRefuseMonitor,
}

/// One audited request. Field order is the JSON member order, and `hash`
/// must stay last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// RFC 3339 time in UTC.
    pub time: String,
    pub node_id: u64,
    pub request_id: String,
    /// Request kind, such as "x509_svid".
    pub kind: String,
    /// SPIFFE ID of the authenticated caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    pub decision: Decision,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// gRPC status code name, such as "PERMISSION_DENIED".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Requested SPIFFE ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// Certificate serial in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Certificate notAfter, RFC 3339 in UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    /// SHA-256 of the certificate DER in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_sha256: Option<String>,
    /// Request metadata the caller sent, such as Istio's `ClusterID` header.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Warnings the response gave the caller.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Hash of the previous line. The audit log sets it.
    #[serde(default)]
    pub prev_hash: String,
    /// Hash of this line. The audit log sets it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hash: String,
}

impl AuditEvent {
    /// Creates an event stamped with the current time and no optional fields.
    pub fn new(node_id: u64, request_id: impl Into<String>, kind: impl Into<String>, decision: Decision) -> Self {
        AuditEvent {
            time: now_rfc3339(),
            node_id,
            request_id: request_id.into(),
            kind: kind.into(),
            caller: None,
            decision,
            reason: None,
            status: None,
            spiffe_id: None,
            dns_names: Vec::new(),
            ttl_seconds: None,
            serial: None,
            not_after: None,
            cert_sha256: None,
            metadata: std::collections::BTreeMap::new(),
            warnings: Vec::new(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }
}

/// Formats Unix seconds as RFC 3339 in UTC, or returns `None` when the time
/// is outside years 0 to 9999.
pub fn rfc3339_from_unix(unix_seconds: i64) -> Option<String> {
    OffsetDateTime::from_unix_timestamp(unix_seconds).ok()?.format(&Rfc3339).ok()
}

fn now_rfc3339() -> String {
    let now = OffsetDateTime::now_utc();
    let millis = now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000).unwrap_or(now);
    millis.format(&Rfc3339).expect("RFC 3339 can represent the current UTC time, which is within years 0 to 9999")
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    #[error("open audit log at {path}: {cause}")]
    Open { path: String, cause: io::Error },

    #[error("resume audit chain from {path}: {reason}")]
    Resume { path: String, reason: String },

    #[error("write audit log at {path}: {reason}")]
    Write { path: String, reason: String },

    #[error("verify audit log at {path}, line {line}: {reason}")]
    Verify { path: String, line: u64, reason: String },

    #[error("audit log writer has stopped")]
    Closed,
}

/// Counters of the audit writer since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    pub events_written: u64,
    /// Events lost because the writer was stopped or too far behind.
    pub events_dropped: u64,
    pub write_failures: u64,
}

#[derive(Default)]
struct Counters {
    events_written: AtomicU64,
    events_dropped: AtomicU64,
    write_failures: AtomicU64,
}

enum Message {
    Event(Box<AuditEvent>),
    Flush(mpsc::SyncSender<Result<(), String>>),
}

/// An append-only, hash-chained audit log written by a background thread,
/// so [`AuditLog::log`] never waits for the disk.
///
/// NOTE: the queue to the thread is unbounded. If a write blocks instead of
/// failing (a hung disk), queued events grow in memory without limit.
pub struct AuditLog {
    writer: Option<Writer>,
}

struct Writer {
    path: PathBuf,
    sender: Option<mpsc::Sender<Message>>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl AuditLog {
    /// Opens `path` for appending, creating it with mode 0640, and resumes
    /// the chain from its last line. An incomplete last line, left by a
    /// crash during a write, is truncated with a warning.
    pub fn open(path: impl AsRef<Path>) -> Result<AuditLog, AuditError> {
        let path = path.as_ref().to_owned();
        let open_error = |cause| AuditError::Open { path: path.display().to_string(), cause };
        let file =
            OpenOptions::new().read(true).append(true).create(true).mode(0o640).open(&path).map_err(open_error)?;
        let (prev_hash, written_len) = resume_chain(&file, &path)?;

        let counters = Arc::new(Counters::default());
        let (sender, receiver) = mpsc::channel();
        let chain = ChainWriter {
            file,
            path: path.clone(),
            prev_hash,
            written_len,
            pending: Vec::new(),
            pending_events: 0,
            failing: false,
            counters: Arc::clone(&counters),
        };
        let thread = thread::Builder::new()
            .name("sigil-audit-writer".to_owned())
            .spawn(move || chain.run(receiver))
            .map_err(open_error)?;

        tracing::info!(path = %path.display(), "opened audit log");
        Ok(AuditLog { writer: Some(Writer { path, sender: Some(sender), thread: Some(thread), counters }) })
    }

    /// Returns a log that discards every event.
    pub fn disabled() -> AuditLog {
        AuditLog { writer: None }
    }

    /// Queues `event` for writing. `prev_hash` and `hash` are overwritten.
    pub fn log(&self, event: AuditEvent) {
        let Some(writer) = &self.writer else {
            return;
        };
        let sent = writer.sender.as_ref().is_some_and(|sender| sender.send(Message::Event(Box::new(event))).is_ok());
        if !sent {
            let dropped = writer.counters.events_dropped.fetch_add(1, Ordering::Relaxed);
            if dropped == 0 {
                tracing::error!(path = %writer.path.display(), "audit writer has stopped, dropping events");
            }
        }
    }

    /// Blocks until every event logged before this call is written and
    /// synced to disk. Returns the write error if that write failed, and
    /// the events stay queued for the next attempt.
    pub fn flush(&self) -> Result<(), AuditError> {
        let Some(writer) = &self.writer else {
            return Ok(());
        };
        let sender = writer.sender.as_ref().ok_or(AuditError::Closed)?;
        let (done, result) = mpsc::sync_channel(1);
        sender.send(Message::Flush(done)).map_err(|_| AuditError::Closed)?;
        match result.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(AuditError::Write { path: writer.path.display().to_string(), reason }),
            Err(_) => Err(AuditError::Closed),
        }
    }

    pub fn stats(&self) -> AuditStats {
        let Some(writer) = &self.writer else {
            return AuditStats::default();
        };
        let counters = &writer.counters;
        AuditStats {
            events_written: counters.events_written.load(Ordering::Relaxed),
            events_dropped: counters.events_dropped.load(Ordering::Relaxed),
            write_failures: counters.write_failures.load(Ordering::Relaxed),
        }
    }
}

impl Drop for AuditLog {
    /// Writes the queued events and stops the writer thread.
    fn drop(&mut self) {
        let Some(writer) = &mut self.writer else {
            return;
        };
        writer.sender = None;
        if let Some(thread) = writer.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(path = %writer.path.display(), "audit writer thread panicked");
        }
        tracing::info!(path = %writer.path.display(), "closed audit log");
    }
}

/// The background thread's state: the open file and the end of the chain.
struct ChainWriter {
    file: File,
    path: PathBuf,
    /// Hash of the last chained event, which may still be in `pending`.
    prev_hash: String,
    /// File length after the last successful write.
    written_len: u64,
    /// Chained lines not yet written.
    pending: Vec<u8>,
    pending_events: u64,
    /// True after a failed write, until a write succeeds.
    failing: bool,
    counters: Arc<Counters>,
}

impl ChainWriter {
    fn run(mut self, receiver: mpsc::Receiver<Message>) {
        while let Ok(first) = receiver.recv() {
            let mut flush_waiters = Vec::new();
            let mut message = Some(first);
            let mut messages_taken = 0;
            while let Some(current) = message {
                match current {
                    Message::Event(event) => self.chain(*event),
                    Message::Flush(done) => flush_waiters.push(done),
                }
                messages_taken += 1;
                message = if messages_taken < MAX_BATCH_MESSAGES { receiver.try_recv().ok() } else { None };
            }

            let result = self.write_pending();
            for done in flush_waiters {
                // The flushing thread waits on the other end, unless it panicked.
                let _ = done.send(result.clone());
            }
        }
        if let Err(reason) = self.write_pending() {
            tracing::error!(path = %self.path.display(), reason, events = self.pending_events, "audit events lost at shutdown");
        }
    }

    /// Sets the chain fields of `event` and appends its line to `pending`.
    fn chain(&mut self, mut event: AuditEvent) {
        if self.pending.len() >= MAX_PENDING_BYTES {
            self.drop_event("audit write backlog is full");
            return;
        }
        event.prev_hash = self.prev_hash.clone();
        event.hash.clear();
        let json = match serde_json::to_vec(&event) {
            Ok(json) => json,
            Err(_) => {
                self.drop_event("serialize audit event failed");
                return;
            }
        };
        let Some(body) = json.strip_suffix(b"}") else {
            self.drop_event("serialized audit event is not a JSON object");
            return;
        };
        let hash = chain_hash(&self.prev_hash, &json);
        self.pending.extend_from_slice(body);
        self.pending.extend_from_slice(b",\"hash\":\"");
        self.pending.extend_from_slice(hash.as_bytes());
        self.pending.extend_from_slice(b"\"}\n");
        self.pending_events += 1;
        self.prev_hash = hash;
    }

    fn drop_event(&self, reason: &str) {
        let dropped = self.counters.events_dropped.fetch_add(1, Ordering::Relaxed);
        if dropped.is_power_of_two() || dropped == 0 {
            tracing::error!(path = %self.path.display(), reason, dropped = dropped + 1, "dropped audit event");
        }
    }

    /// Appends `pending` to the file and syncs it. After a failed attempt
    /// the file is first cut back to `written_len`, so a partly written
    /// batch is not written twice.
    fn write_pending(&mut self) -> Result<(), String> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let attempt = (|| {
            if self.failing {
                self.file.set_len(self.written_len)?;
            }
            self.file.write_all(&self.pending)?;
            self.file.sync_data()
        })();

        match attempt {
            Ok(()) => {
                self.written_len += self.pending.len() as u64;
                self.counters.events_written.fetch_add(self.pending_events, Ordering::Relaxed);
                self.pending.clear();
                self.pending_events = 0;
                if self.failing {
                    tracing::info!(path = %self.path.display(), "audit log writes recovered");
                    self.failing = false;
                }
                Ok(())
            }
            Err(error) => {
                self.counters.write_failures.fetch_add(1, Ordering::Relaxed);
                if !self.failing {
                    tracing::error!(
                        path = %self.path.display(),
                        %error,
                        events = self.pending_events,
                        "write audit log failed, keeping events in memory to retry"
                    );
                    self.failing = true;
                }
                Err(error.to_string())
            }
        }
    }
}

/// Returns the hex SHA-256 of `prev_hash` followed by `json`.
fn chain_hash(prev_hash: &str, json: &[u8]) -> String {
    let mut input = Vec::with_capacity(prev_hash.len() + json.len());
    input.extend_from_slice(prev_hash.as_bytes());
    input.extend_from_slice(json);
    hex::encode(digest(&SHA256, &input))
}

#[derive(Deserialize)]
struct ChainFields {
    prev_hash: String,
    hash: String,
}

/// Checks the hash of one line and, if given, its link to the previous
/// line's hash. Returns the line's hash.
fn verify_line(line: &[u8], previous: Option<&str>) -> Result<String, String> {
    let fields: ChainFields = serde_json::from_slice(line).map_err(|error| format!("parse JSON: {error}"))?;
    let suffix = format!(",\"hash\":\"{}\"}}", fields.hash);
    let body = line.strip_suffix(suffix.as_bytes()).ok_or("the hash member is not the last member")?;
    let mut hashed = body.to_vec();
    hashed.push(b'}');
    let computed = chain_hash(&fields.prev_hash, &hashed);
    if computed != fields.hash {
        return Err(format!("hash {} does not match the computed hash {computed}", fields.hash));
    }
    if let Some(previous) = previous
        && previous != fields.prev_hash
    {
        return Err(format!("prev_hash {} does not match the previous line's hash {previous}", fields.prev_hash));
    }
    Ok(fields.hash)
}

/// Returns the hash to chain the next event from and the length of the
/// complete lines, truncating an incomplete last line.
fn resume_chain(file: &File, path: &Path) -> Result<(String, u64), AuditError> {
    let resume_error = |reason: String| AuditError::Resume { path: path.display().to_string(), reason };
    let len = file.metadata().map_err(|error| resume_error(format!("read file metadata: {error}")))?.len();
    let (tail, tail_start) = read_tail(file, len).map_err(|error| resume_error(format!("read last line: {error}")))?;

    let complete_len = match tail.iter().rposition(|&byte| byte == b'\n') {
        Some(position) => tail_start + position as u64 + 1,
        None => tail_start,
    };
    if complete_len < len {
        tracing::warn!(
            path = %path.display(),
            bytes = len - complete_len,
            "truncating incomplete last line of audit log"
        );
        file.set_len(complete_len).map_err(|error| resume_error(format!("truncate incomplete last line: {error}")))?;
    }
    if complete_len == 0 {
        return Ok((GENESIS_HASH.to_owned(), 0));
    }

    let complete = &tail[..(complete_len - tail_start) as usize];
    let without_newline = &complete[..complete.len() - 1];
    let line_start = without_newline.iter().rposition(|&byte| byte == b'\n').map_or(0, |position| position + 1);
    let hash = verify_line(&without_newline[line_start..], None)
        .map_err(|reason| resume_error(format!("last line: {reason}")))?;
    Ok((hash, complete_len))
}

/// Reads the end of the file, growing the read until it contains the last
/// complete line whole. Returns the bytes and their offset in the file.
fn read_tail(file: &File, len: u64) -> io::Result<(Vec<u8>, u64)> {
    let mut window = TAIL_READ_BYTES;
    loop {
        let start = len.saturating_sub(window);
        let mut tail = vec![0; (len - start) as usize];
        file.read_exact_at(&mut tail, start)?;
        // The last complete line is whole once the read starts at the file
        // start or contains the newline before it.
        let whole = match tail.iter().rposition(|&byte| byte == b'\n') {
            Some(last) => tail[..last].contains(&b'\n'),
            None => false,
        };
        if start == 0 || whole {
            return Ok((tail, start));
        }
        window = window.saturating_mul(2);
    }
}

/// The result of a successful [`verify_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    pub events: u64,
    /// Hash of the last line, or [`GENESIS_HASH`] for an empty file.
    pub last_hash: String,
}

/// Verifies every line's hash and link in the audit log at `path`.
pub fn verify_file(path: impl AsRef<Path>) -> Result<ChainSummary, AuditError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|cause| AuditError::Open { path: path.display().to_string(), cause })?;
    let mut reader = BufReader::new(file);
    let mut previous = GENESIS_HASH.to_owned();
    let mut events = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let line_number = events + 1;
        let verify_error =
            |reason: String| AuditError::Verify { path: path.display().to_string(), line: line_number, reason };
        let read = reader.read_until(b'\n', &mut line).map_err(|error| verify_error(format!("read: {error}")))?;
        if read == 0 {
            break;
        }
        let Some(content) = line.strip_suffix(b"\n") else {
            return Err(verify_error("the last line is incomplete".to_owned()));
        };
        previous = verify_line(content, Some(&previous)).map_err(verify_error)?;
        events += 1;
    }
    Ok(ChainSummary { events, last_hash: previous })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::Arc;

    fn event(request_id: &str) -> AuditEvent {
        AuditEvent {
            caller: Some("spiffe://example.org/spire/agent/node-1".to_owned()),
            spiffe_id: Some("spiffe://example.org/workload/api".to_owned()),
            dns_names: vec!["api.example.org".to_owned()],
            ttl_seconds: Some(3600),
            serial: Some("01ab".to_owned()),
            not_after: rfc3339_from_unix(2_000_000_000),
            cert_sha256: Some("00".repeat(32)),
            ..AuditEvent::new(7, request_id, "x509_svid", Decision::Issued)
        }
    }

    fn read_events(path: &Path) -> Vec<AuditEvent> {
        let text = std::fs::read_to_string(path).expect("read audit log");
        text.lines().map(|line| serde_json::from_str(line).expect("parse audit line")).collect()
    }

    #[test]
    fn chain_links_events() {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).expect("open audit log");
        log.log(event("request-1"));
        let mut refused = AuditEvent::new(7, "request-2", "x509_svid", Decision::Refused);
        refused.reason = Some("spiffe_id is not allowed for this caller".to_owned());
        refused.status = Some("PERMISSION_DENIED".to_owned());
        log.log(refused);
        log.flush().expect("flush audit log");

        let events = read_events(&path);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].prev_hash, GENESIS_HASH);
        assert_eq!(events[1].prev_hash, events[0].hash);
        assert_eq!(events[1].decision, Decision::Refused);
        assert_eq!(events[1].status.as_deref(), Some("PERMISSION_DENIED"));
        let summary = verify_file(&path).expect("verify audit log");
        assert_eq!(summary.events, 2);
        assert_eq!(summary.last_hash, events[1].hash);
        assert_eq!(log.stats().events_written, 2);
    }

    #[test]
    fn line_format_is_stable() {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).expect("open audit log");
        let mut logged = AuditEvent::new(1, "r", "x509_svid", Decision::WouldRefuseMonitor);
        logged.time = "2024-01-02T03:04:05.006Z".to_owned();
        log.log(logged);
        log.flush().expect("flush audit log");

        let text = std::fs::read_to_string(&path).expect("read audit log");
        let body = format!(
            "{{\"time\":\"2024-01-02T03:04:05.006Z\",\"node_id\":1,\"request_id\":\"r\",\
             \"kind\":\"x509_svid\",\"decision\":\"would_refuse_monitor\",\"prev_hash\":\"{GENESIS_HASH}\"}}"
        );
        let expected_hash = chain_hash(GENESIS_HASH, body.as_bytes());
        let expected =
            format!("{},\"hash\":\"{expected_hash}\"}}\n", body.strip_suffix('}').expect("body ends with a brace"));
        assert_eq!(text, expected);
    }

    #[test]
    fn reopen_resumes_chain() {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).expect("open audit log");
        log.log(event("request-1"));
        drop(log);

        let log = AuditLog::open(&path).expect("reopen audit log");
        log.log(event("request-2"));
        log.flush().expect("flush audit log");

        let events = read_events(&path);
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].prev_hash, events[0].hash);
        assert_eq!(verify_file(&path).expect("verify audit log").events, 2);
    }

    #[test]
    fn reopen_truncates_incomplete_line() {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).expect("open audit log");
        log.log(event("request-1"));
        drop(log);
        let mut file = OpenOptions::new().append(true).open(&path).expect("open audit log for appending");
        file.write_all(b"{\"time\":\"2024-").expect("append torn line");
        drop(file);

        let log = AuditLog::open(&path).expect("reopen audit log");
        log.log(event("request-2"));
        log.flush().expect("flush audit log");
        assert_eq!(verify_file(&path).expect("verify audit log").events, 2);
    }

    #[test]
    fn reopen_rejects_tampered_last_line() {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).expect("open audit log");
        log.log(event("request-1"));
        drop(log);
        let text = std::fs::read_to_string(&path).expect("read audit log");
        std::fs::write(&path, text.replace("request-1", "request-X")).expect("rewrite audit log");

        let error = AuditLog::open(&path).err().expect("tampered line must fail");
        assert!(matches!(error, AuditError::Resume { .. }), "{error:?}");
        let error = verify_file(&path).expect_err("tampered line must fail verification");
        assert!(matches!(error, AuditError::Verify { line: 1, .. }), "{error:?}");
    }

    #[test]
    fn verify_detects_removed_line() {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).expect("open audit log");
        for n in 0..3 {
            log.log(event(&format!("request-{n}")));
        }
        drop(log);
        let text = std::fs::read_to_string(&path).expect("read audit log");
        let lines: Vec<&str> = text.lines().collect();
        std::fs::write(&path, format!("{}\n{}\n", lines[0], lines[2])).expect("rewrite audit log");

        let error = verify_file(&path).expect_err("a missing line must fail verification");
        assert!(matches!(error, AuditError::Verify { line: 2, .. }), "{error:?}");
    }

    #[test]
    fn file_created_with_mode_0640() {
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("audit.jsonl");
        drop(AuditLog::open(&path).expect("open audit log"));

        let mode = std::fs::metadata(&path).expect("stat audit log").permissions().mode();
        assert_eq!(mode & 0o777 & !0o640, 0, "mode {mode:o} grants more than 0640");
    }

    #[test]
    fn concurrent_events_all_written() {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 125;
        let dir = tempfile::tempdir().expect("create temp dir");
        let path = dir.path().join("audit.jsonl");
        let log = Arc::new(AuditLog::open(&path).expect("open audit log"));

        let threads: Vec<_> = (0..THREADS)
            .map(|thread| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for n in 0..PER_THREAD {
                        log.log(event(&format!("thread-{thread}-request-{n}")));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("join logging thread");
        }
        log.flush().expect("flush audit log");

        let summary = verify_file(&path).expect("verify audit log");
        assert_eq!(summary.events, (THREADS * PER_THREAD) as u64);
        let mut request_ids: Vec<String> = read_events(&path).into_iter().map(|event| event.request_id).collect();
        request_ids.sort();
        request_ids.dedup();
        assert_eq!(request_ids.len(), THREADS * PER_THREAD);
        assert_eq!(log.stats().events_written, (THREADS * PER_THREAD) as u64);
    }

    #[test]
    fn disabled_log_discards_events() {
        let log = AuditLog::disabled();
        log.log(event("request-1"));
        log.flush().expect("flush disabled log");
        assert_eq!(log.stats(), AuditStats::default());
    }
}
