//! Test harness: real `sigil` processes on SoftHSM and RocksDB in temporary folders, reached over
//! mTLS gRPC on loopback.

#![allow(dead_code, reason = "each test binary uses a different part of the harness")]

use std::io::Read as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sigil::client::{Connection, Endpoints};
use sigil::proto::admin_client::AdminClient;
use sigil::proto::issuer_client::IssuerClient;
use sigil::proto::{GetStatusRequest, NodeStatus};
use tonic::transport::Channel;

pub const TRUST_DOMAIN: &str = "example.org";
pub const ADMIN_ID: &str = "spiffe://example.org/sigil/admin";

pub fn sigil_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sigil"))
}

/// A dev deployment whose node is run directly with `sigil serve`, so tests can change its
/// configuration and credentials between runs.
pub struct TestDeployment {
    pub root: tempfile::TempDir,
    pub dir: PathBuf,
    node: Option<Child>,
}

impl TestDeployment {
    /// Creates a deployment with `sigil dev`, then stops it so the test can adjust it.
    pub fn create() -> TestDeployment {
        let root = tempfile::tempdir().expect("create temporary folder");
        let dir = root.path().join("dev");
        let mut dev = Command::new(sigil_bin())
            .args(["dev", "--dir"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sigil dev");
        let endpoints = dir.join("endpoints.json");
        let deadline = Instant::now() + Duration::from_secs(90);
        while !endpoints.exists() {
            if let Ok(Some(status)) = dev.try_wait() {
                let mut stderr = String::new();
                dev.stderr.take().map(|mut e| e.read_to_string(&mut stderr));
                panic!("sigil dev exited with {status} during set-up:\n{stderr}");
            }
            assert!(Instant::now() < deadline, "sigil dev did not write endpoints.json within 90 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        terminate(&mut dev);
        let status = dev.wait().expect("wait for sigil dev");
        assert!(status.success(), "sigil dev did not stop cleanly: {status}");
        TestDeployment { root, dir, node: None }
    }

    pub fn node_dir(&self) -> PathBuf {
        self.dir.join("nodes/1")
    }

    pub fn config_path(&self) -> PathBuf {
        self.node_dir().join("sigil.toml")
    }

    pub fn audit_path(&self) -> PathBuf {
        self.node_dir().join("audit.jsonl")
    }

    pub fn softhsm_conf(&self) -> PathBuf {
        self.dir.join("softhsm2.conf")
    }

    /// Reads the node configuration as a TOML table, for edits.
    pub fn config_table(&self) -> toml::Table {
        let text = std::fs::read_to_string(self.config_path()).expect("read sigil.toml");
        text.parse().expect("parse sigil.toml")
    }

    pub fn write_config(&self, table: &toml::Table) {
        std::fs::write(self.config_path(), toml::to_string(table).expect("encode config")).expect("write sigil.toml");
    }

    /// Appends a caller entry to the policy.
    pub fn add_caller(&self, caller: toml::Table) {
        let mut table = self.config_table();
        let policy = table.entry("policy").or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let callers = policy
            .as_table_mut()
            .expect("policy is a table")
            .entry("callers")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        callers.as_array_mut().expect("callers is an array").push(toml::Value::Table(caller));
        self.write_config(&table);
    }

    /// Runs a `sigil` command against this deployment (node stopped) and returns its output.
    pub fn run_sigil(&self, args: &[&str]) -> std::process::Output {
        Command::new(sigil_bin())
            .args(args)
            .env("SOFTHSM2_CONF", self.softhsm_conf())
            .stdin(Stdio::null())
            .output()
            .expect("run sigil")
    }

    /// Issues a client credential into `DIR/clients/<name>` with the node stopped.
    pub fn issue_client(&self, name: &str, spiffe_id: &str) -> PathBuf {
        let out = self.dir.join("clients").join(name);
        let config = self.config_path();
        let output = self.run_sigil(&[
            "ca",
            "issue-client",
            "--config",
            config.to_str().expect("UTF-8 path"),
            "--spiffe-id",
            spiffe_id,
            "--out",
            out.to_str().expect("UTF-8 path"),
        ]);
        assert!(output.status.success(), "issue-client failed: {}", String::from_utf8_lossy(&output.stderr));
        out
    }

    /// Starts `sigil serve` and waits until /readyz returns 200.
    pub fn start(&mut self) {
        assert!(self.node.is_none(), "node already running");
        let log = std::fs::File::create(self.node_dir().join("node.log")).expect("create node.log");
        let child = Command::new(sigil_bin())
            .args(["serve", "--config"])
            .arg(self.config_path())
            .env("SOFTHSM2_CONF", self.softhsm_conf())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("start sigil serve");
        self.node = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let metrics = self.endpoints().nodes[0].metrics.clone();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(Ok(Some(status))) = self.node.as_mut().map(Child::try_wait) {
                panic!("node exited during start-up ({status}):\n{}", self.log());
            }
            if http_get(&metrics, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
                return;
            }
            assert!(Instant::now() < deadline, "node not ready within 60 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends SIGTERM and waits for the node to exit; returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.node.take().expect("node is running");
        terminate(&mut child);
        child.wait().expect("wait for node")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.node_dir().join("node.log")).unwrap_or_default()
    }

    /// Reads endpoints.json, which `sigil dev` removes on exit; the harness rewrites it.
    pub fn endpoints(&self) -> Endpoints {
        let config = self.config_table();
        let listen = config["listen"].as_table().expect("listen table");
        Endpoints {
            trust_domain: TRUST_DOMAIN.to_owned(),
            nodes: vec![sigil::client::NodeEndpoint {
                id: 1,
                grpc: listen["grpc"].as_str().expect("grpc address").to_owned(),
                metrics: listen["metrics"].as_str().expect("metrics address").to_owned(),
                raft: listen["raft"].as_str().expect("raft address").to_owned(),
                acme: listen
                    .get("acme")
                    .and_then(|address| address.as_str())
                    .map(|address| format!("https://{address}/acme/directory")),
                config: Some(self.config_path()),
            }],
            standby: Vec::new(),
        }
    }

    pub fn grpc_address(&self) -> String {
        self.endpoints().nodes[0].grpc.clone()
    }

    /// Connects with the credential in `client_dir` (cert.pem, key.pem, bundle.pem).
    pub async fn connect_as(&self, client_dir: &Path) -> Channel {
        Connection {
            address: self.grpc_address(),
            cert: client_dir.join("cert.pem"),
            key: client_dir.join("key.pem"),
            ca: self.dir.join("bundle.pem"),
        }
        .connect()
        .await
        .expect("connect to node")
    }

    pub async fn admin_channel(&self) -> Channel {
        self.connect_as(&self.dir.join("client")).await
    }

    pub async fn issuer(&self) -> IssuerClient<Channel> {
        IssuerClient::new(self.admin_channel().await)
    }

    pub async fn node_status(&self) -> NodeStatus {
        let mut admin = AdminClient::new(self.admin_channel().await);
        let response = admin.get_status(GetStatusRequest {}).await.expect("GetStatus").into_inner();
        response.nodes.into_iter().next().expect("one node")
    }

    /// Returns the audit events written so far, parsed.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.audit_path()).unwrap_or_default();
        text.lines().map(|line| serde_json::from_str(line).expect("audit line is JSON")).collect()
    }

    /// Waits until an audit event with `request_id` appears, since the audit writer is async.
    pub fn audit_event(&self, request_id: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(event) = self.audit_events().into_iter().find(|e| e["request_id"] == request_id) {
                return event;
            }
            assert!(Instant::now() < deadline, "no audit event for request {request_id}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestDeployment {
    fn drop(&mut self) {
        if let Some(mut child) = self.node.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn terminate(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
}

/// Sends a plain HTTP GET and returns the whole response, or None when the connection fails.
pub fn http_get(address: &str, path: &str) -> Option<String> {
    use std::io::Write as _;
    let mut stream = TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

/// Makes a P-256 key and a DER CSR for `spiffe_id` and `dns` names.
pub fn p256_csr(spiffe_id: &str, dns: &[&str]) -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate key");
    let names: Vec<String> = dns.iter().map(|s| (*s).to_owned()).collect();
    let csr = sigil::client::svid_csr(&key, spiffe_id, &names).expect("build CSR");
    (key, csr)
}

/// Runs openssl with `args` and returns stdout, panicking with stderr on failure.
pub fn openssl(args: &[&str]) -> Vec<u8> {
    let output = Command::new("openssl").args(args).stdin(Stdio::null()).output().expect("run openssl");
    assert!(output.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    output.stdout
}

/// Makes a DER CSR with openssl: `newkey` such as "rsa:1024" or "ec" with `pkeyopts`, and
/// `addext` entries such as "subjectAltName=URI:spiffe://example.org/a".
pub fn openssl_csr(dir: &Path, name: &str, newkey: &str, pkeyopts: &[&str], addext: &[&str]) -> Vec<u8> {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let mut args: Vec<String> = vec!["req".into(), "-new".into(), "-newkey".into(), newkey.into()];
    for opt in pkeyopts {
        args.extend(["-pkeyopt".into(), (*opt).into()]);
    }
    args.extend(["-nodes".into(), "-keyout".into(), key.display().to_string()]);
    args.extend(["-subj".into(), "/O=Sigil Test".into(), "-outform".into(), "DER".into()]);
    args.extend(["-out".into(), csr.display().to_string()]);
    for ext in addext {
        args.extend(["-addext".into(), (*ext).into()]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    openssl(&refs);
    std::fs::read(csr).expect("read CSR")
}
