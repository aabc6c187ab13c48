//! Loads `sigil-spire-plugin` the way SPIRE does, through hashicorp/go-plugin's client. The Go host
//! in tests/gohost, built offline by scripts/go-host-check.sh, starts the plugin, calls Init and
//! Configure, and mints an X.509 CA from a 3-node `sigil dev` cluster through it. The host checks
//! the minted chain with Go's crypto/x509, and this test checks that the roots it received are
//! the cluster's.

#[path = "common/cluster.rs"]
#[allow(dead_code, reason = "this test uses only part of the cluster harness")]
mod cluster_harness;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use cluster_harness::{CLUSTER_TESTS, DevCluster};
use common::TRUST_DOMAIN;

const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Time limit the host applies to its own run, from plugin start to shutdown.
const HOST_TIMEOUT: Duration = Duration::from_secs(60);
/// Time after which the test kills the host. The host needs up to 10 s past its own limit to
/// kill the plugin and exit.
const HOST_KILL_AFTER: Duration = Duration::from_secs(90);
const STOP_GRACE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_plugin_host_mints_ca() {
    let host = build_go_host();
    let plugin = plugin_binary();
    assert!(
        plugin.is_file(),
        "plugin binary {} not found; build it with `cargo build --release -p sigil-spire-plugin`",
        plugin.display()
    );

    let _serial = CLUSTER_TESTS.lock().await;
    let mut cluster = DevCluster::start(3, 0).await;
    let ids = [1, 2, 3];
    cluster.leader(&ids, READY_TIMEOUT).await;

    let credential = cluster.dir.join("spire-server");
    for file in ["cert.pem", "key.pem", "bundle.pem"] {
        assert!(
            credential.join(file).is_file(),
            "sigil dev wrote no SPIRE server credential file {}",
            credential.join(file).display()
        );
    }
    let endpoints: Vec<String> = ids.iter().map(|id| cluster.endpoint(*id).grpc).collect();
    let hcl_path = cluster.dir.join("spire-plugin.hcl");
    std::fs::write(&hcl_path, plugin_hcl(&endpoints, &credential)).expect("write the plugin's HCL file");

    let out_dir = cluster.dir.join("gohost-out");
    std::fs::create_dir_all(&out_dir).expect("create the host's output folder");
    let run = run_host(&host, &plugin, &hcl_path, &out_dir).await;
    cluster.stop(STOP_GRACE).await;

    let outcome = match run.status {
        Some(status) => status.to_string(),
        None => format!("killed after {HOST_KILL_AFTER:?}"),
    };
    assert!(
        run.status.is_some_and(|status| status.success()),
        "the go-plugin host failed ({outcome}):\nstdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(run.stdout.starts_with("gohost: ok:"), "unexpected host output:\n{}", run.stdout);
    eprintln!("{}", run.stdout.trim_end());

    let cluster_roots = read_certificates(&cluster.dir.join("bundle.pem"));
    let received_roots = read_certificates(&out_dir.join("upstream_x509_roots.pem"));
    assert!(!received_roots.is_empty(), "the host wrote no upstream_x509_roots");
    for (index, root) in received_roots.iter().enumerate() {
        assert!(
            cluster_roots.contains(root),
            "upstream_x509_roots[{index}] is not in the cluster's bundle.pem; stdout:\n{}",
            run.stdout
        );
    }
    let chain = read_certificates(&out_dir.join("x509_ca_chain.pem"));
    for (index, certificate) in chain.iter().enumerate() {
        assert!(
            !cluster_roots.contains(certificate),
            "x509_ca_chain[{index}] is a root of the cluster's bundle; roots belong in upstream_x509_roots only"
        );
    }
}

/// Builds the Go host with scripts/go-host-check.sh and returns the path it prints.
fn build_go_host() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/go-host-check.sh");
    let output = Command::new("bash").arg(&script).stdin(Stdio::null()).output().expect("run go-host-check.sh");
    assert!(
        output.status.success(),
        "{} failed ({}):\n{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).expect("go-host-check.sh prints a UTF-8 path");
    let path = PathBuf::from(stdout.trim_end());
    assert!(path.is_file(), "go-host-check.sh printed {:?}, which is not a file", stdout);
    path
}

/// Returns the plugin's path: Cargo puts it next to the `sigil` binary.
fn plugin_binary() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_sigil")).with_file_name("sigil-spire-plugin")
}

/// Writes the plugin_data text that a SPIRE server.conf would give the plugin.
fn plugin_hcl(endpoints: &[String], credential: &Path) -> String {
    let quoted: Vec<String> = endpoints.iter().map(|endpoint| format!("{endpoint:?}")).collect();
    let path = |file: &str| format!("{:?}", credential.join(file).to_str().expect("UTF-8 credential path"));
    format!(
        "endpoints = [{}]\nclient_cert_path = {}\nclient_key_path = {}\nbundle_path = {}\n",
        quoted.join(", "),
        path("cert.pem"),
        path("key.pem"),
        path("bundle.pem")
    )
}

struct HostRun {
    /// Exit status, or None when the test had to kill the host.
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

/// Runs the host against the plugin, killing it after `HOST_KILL_AFTER`. Output goes to files so
/// a chatty plugin cannot fill a pipe and stall the host.
async fn run_host(host: &Path, plugin: &Path, hcl: &Path, out_dir: &Path) -> HostRun {
    let stdout_path = out_dir.join("gohost.stdout");
    let stderr_path = out_dir.join("gohost.stderr");
    let mut child = Command::new(host)
        .arg("-plugin")
        .arg(plugin)
        .args(["-trust-domain", TRUST_DOMAIN, "-timeout", &format!("{}s", HOST_TIMEOUT.as_secs())])
        .arg("-hcl-file")
        .arg(hcl)
        .arg("-out-dir")
        .arg(out_dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).expect("create gohost.stdout"))
        .stderr(std::fs::File::create(&stderr_path).expect("create gohost.stderr"))
        .spawn()
        .expect("start the go-plugin host");

    let deadline = Instant::now() + HOST_KILL_AFTER;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the go-plugin host") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            // The host sets the plugin's parent-death signal, so the plugin ends with it.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    let stdout = read(&stdout_path);
    let stderr = read(&stderr_path);
    HostRun { status, stdout, stderr }
}

/// Reads every CERTIFICATE block of a PEM file as DER.
fn read_certificates(path: &Path) -> Vec<Vec<u8>> {
    let text = std::fs::read(path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    pem::parse_many(text)
        .unwrap_or_else(|error| panic!("parse {} as PEM: {error}", path.display()))
        .into_iter()
        .filter(|block| block.tag() == "CERTIFICATE")
        .map(|block| block.into_contents())
        .collect()
}
