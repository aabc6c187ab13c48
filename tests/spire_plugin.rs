//! The SPIRE UpstreamAuthority plugin, started exactly as SPIRE starts it: the go-plugin
//! environment, the handshake line on standard output, and gRPC on the announced Unix socket.
//!
//! The first tests need no Sigil node: they cover the loader's services, configuration errors,
//! bounded retries against closed ports and the process life cycle. The tests after them play
//! SPIRE against a 3-node `sigil dev` cluster. They mint a CA and check it as SPIRE does, share
//! JWT authorities between two SPIRE servers, and kill the node a plugin talks to. One follows a
//! CA rotation and a root taint on the plugin's open streams.
//!
//! The plugin binary must sit next to the `sigil` binary: `cargo build --release --workspace
//! --bins` builds both.

#[path = "common/cluster.rs"]
#[allow(dead_code, reason = "this test uses only part of the cluster harness")]
mod cluster_harness;
mod common;
#[path = "common/spire.rs"]
mod spire;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster_harness::{CLUSTER_TESTS, DevCluster};
use common::TRUST_DOMAIN;
use sigil::proto::admin_client::AdminClient;
use sigil::proto::{RotateCaRequest, TaintCaRootRequest};
use spire::{
    Plugin, closed_loopback_address, key_ids, next_within, openssl_verify, plugin_bin, plugin_data, read_handshake,
    root_taint_by_fingerprint, sha256_hex, socket_of_handshake, spire_csr, spire_environment, spire_jwt_key,
    throwaway_leaf, write_test_credential,
};
use tonic::Code;
use x509_parser::prelude::{FromDer as _, X509Certificate};

/// Time a Sigil cluster may take to elect a leader after a node is killed, and the plugin to
/// reconnect. Generous because the machine is shared with other builds.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Time within which a stream must not deliver anything, when the test checks it stays open.
const QUIET_PERIOD: Duration = Duration::from_millis(500);
/// go-plugin's host kills a plugin 2 seconds after Shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// SPIRE fails JWT key preparation when the first response takes longer.
const PUBLISH_LIMIT: Duration = Duration::from_secs(5);
/// Key usage bits SPIRE accepts on its CA: digitalSignature (bit 0), keyCertSign (bit 5) and
/// cRLSign (bit 6), in x509-parser's flag order.
const ALLOWED_CA_KEY_USAGE: u16 = 0b0110_0001;
const KEY_CERT_SIGN: u16 = 0b0010_0000;
/// Seconds from a CA rotation until Sigil's new intermediate signs.
const ACTIVATE_AFTER: u64 = 6;
/// Time within which an admin call must return and a change of Sigil's bundle must reach an open
/// plugin stream. Generous because the machine is shared with other builds.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn run_by_hand_prints_usage() {
    let output = Command::new(plugin_bin()).stdin(Stdio::null()).output().expect("run sigil-spire-plugin");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exit status {}", output.status);
    assert!(output.stdout.is_empty(), "stdout: {}", String::from_utf8_lossy(&output.stdout));
    assert!(stderr.contains("UpstreamAuthority is not set"), "{stderr}");
    for word in ["plugin_cmd", "plugin_checksum", "plugin_data", "endpoints", "client_key_path", "bundle_path"] {
        assert!(stderr.contains(word), "usage lacks {word}: {stderr}");
    }
}

#[test]
fn version_flag_prints_version() {
    let output = Command::new(plugin_bin()).arg("--version").stdin(Stdio::null()).output().expect("run plugin");
    assert!(output.status.success(), "exit status {}", output.status);
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("sigil-spire-plugin "));
}

#[tokio::test]
async fn handshake_line_names_private_socket() {
    let plugin = Plugin::launch().await;
    assert!(plugin.handshake.ends_with('\n'), "{:?}", plugin.handshake);
    assert_eq!(plugin.handshake.matches('\n').count(), 1, "{:?}", plugin.handshake);

    let metadata = std::fs::symlink_metadata(&plugin.socket).expect("socket exists");
    assert!(
        std::os::unix::fs::FileTypeExt::is_socket(&metadata.file_type()),
        "{} is no socket",
        plugin.socket.display()
    );
    let folder = plugin.socket.parent().expect("socket folder");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(folder).expect("folder").permissions());
    assert_eq!(mode & 0o077, 0, "socket folder mode {mode:o} lets others in");

    let health = plugin.health("plugin").await.expect("health check");
    assert_eq!(health.status, 1, "service \"plugin\" is not SERVING");
    assert_eq!(plugin.stdout_rest.text(), "", "the plugin wrote more than the handshake line to stdout");
}

#[tokio::test]
async fn loader_services_respond() {
    let mut plugin = Plugin::launch().await;
    plugin.open_broker().await;

    let mut stdio = plugin.stdio().await.expect("StreamStdio accepted");
    let quiet = tokio::time::timeout(QUIET_PERIOD, stdio.message()).await;
    assert!(quiet.is_err(), "StreamStdio ended or sent data: {quiet:?}");

    let init = plugin.init().await.expect("Init");
    let names: BTreeSet<&str> = init.plugin_service_names.iter().map(String::as_str).collect();
    assert!(names.contains("spire.plugin.server.upstreamauthority.v1.UpstreamAuthority"), "{names:?}");
    assert!(names.contains("spire.service.common.config.v1.Config"), "{names:?}");
    plugin.deinit().await.expect("Deinit");

    let lines = wait_for_log(&plugin, "SPIRE offered a host service connection").await;
    for line in &lines {
        assert!(line["@level"].is_string(), "no @level in {line}");
        assert!(line["@message"].is_string(), "no @message in {line}");
        assert!(line["@timestamp"].is_string(), "no @timestamp in {line}");
    }
    let offer = lines.iter().find(|line| line["@message"] == "SPIRE offered a host service connection");
    let offer = offer.expect("broker log line");
    assert_eq!(offer["service_id"], 1);
    assert_eq!(offer["@level"], "info");
}

#[tokio::test]
async fn calls_before_configure_fail_precondition() {
    let plugin = Plugin::launch().await;
    let (_, csr) = spire_csr(TRUST_DOMAIN);
    let statuses = [
        ("mint", plugin.mint(csr, 3600).await.map(|_| ()).expect_err("mint before Configure")),
        ("publish", plugin.publish(spire_jwt_key("k1")).await.map(|_| ()).expect_err("publish before Configure")),
        ("subscribe", plugin.subscribe().await.map(|_| ()).expect_err("subscribe before Configure")),
    ];
    for (name, status) in statuses {
        assert_eq!(status.code(), Code::FailedPrecondition, "{name}: {status:?}");
        assert_eq!(status.message(), "plugin not configured", "{name}");
    }
}

#[tokio::test]
async fn configure_rejects_bad_values() {
    let dir = tempfile::tempdir().expect("create temporary folder");
    let credential = write_test_credential(dir.path(), "spiffe://example.org/spire/server");
    let good = plugin_data(&["127.0.0.1:7001".to_owned()], &credential);
    let plugin = Plugin::launch().await;

    let cases = [
        ("unknown key", TRUST_DOMAIN, format!("{good}\"endpoint\" = \"x:1\"\n"), "unknown key \"endpoint\""),
        ("URI trust domain", "spiffe://example.org", good.clone(), "\"spiffe://example.org\" is a URI"),
        ("missing trust domain", "", good.clone(), "trust_domain is missing"),
        (
            "scheme in endpoint",
            TRUST_DOMAIN,
            good.replace("127.0.0.1:7001", "https://a:1"),
            "\"https://a:1\" is invalid",
        ),
        ("missing file", TRUST_DOMAIN, good.replace("key.pem", "nokey.pem"), "nokey.pem: read failed"),
        ("syntax", TRUST_DOMAIN, "\"endpoints\" = [\"a:1\"".to_owned(), "list is missing its closing ]"),
    ];
    for (name, trust_domain, hcl, expected) in cases {
        let status = plugin.configure(trust_domain, &hcl).await.expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(status.message().contains(expected), "{name}: {:?} lacks {expected:?}", status.message());
        let validation = plugin.validate(trust_domain, &hcl).await.expect("Validate returns notes, not errors");
        assert!(!validation.valid, "{name}: Validate accepted it");
        assert!(validation.notes.iter().any(|note| note.contains(expected)), "{name}: {:?}", validation.notes);
    }

    let validation = plugin.validate(TRUST_DOMAIN, &good).await.expect("Validate");
    assert!(validation.valid, "{:?}", validation.notes);
    plugin.configure(TRUST_DOMAIN, &good).await.expect("Configure with valid settings");
    assert!(!plugin.log().contains("PRIVATE KEY"), "the log shows key material");
}

#[tokio::test]
async fn unreachable_sigil_fails_within_budget() {
    let dir = tempfile::tempdir().expect("create temporary folder");
    let credential = write_test_credential(dir.path(), "spiffe://example.org/spire/server");
    let endpoints = [closed_loopback_address(), closed_loopback_address()];
    let plugin = Plugin::launch().await;
    plugin.configure(TRUST_DOMAIN, &plugin_data(&endpoints, &credential)).await.expect("Configure");

    let started = Instant::now();
    let status = plugin.publish(spire_jwt_key("k1")).await.map(|_| ()).expect_err("publish without Sigil");
    assert!(started.elapsed() < PUBLISH_LIMIT, "publish took {:?}", started.elapsed());
    assert!(matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded), "{status:?}");
    assert!(status.message().contains(&endpoints[0]), "{}", status.message());
    assert!(status.message().contains(&endpoints[1]), "{}", status.message());

    let (_, csr) = spire_csr(TRUST_DOMAIN);
    let started = Instant::now();
    let status = plugin.mint(csr, 3600).await.map(|_| ()).expect_err("mint without Sigil");
    assert!(started.elapsed() < Duration::from_secs(30), "mint took {:?}", started.elapsed());
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    let retries = plugin.log_lines().iter().filter(|line| line["@level"] == "warn").count();
    assert!(retries >= 2, "no retry was logged at warn level:\n{}", plugin.log());
}

#[tokio::test]
async fn shutdown_stops_process_and_removes_socket() {
    let mut plugin = Plugin::launch().await;
    plugin.open_broker().await;
    let folder = plugin.socket.parent().expect("socket folder").to_owned();

    plugin.shutdown().await.expect("Shutdown");
    let status = plugin.wait_exit(SHUTDOWN_GRACE).await;
    let status = status.unwrap_or_else(|| panic!("still running {SHUTDOWN_GRACE:?} after Shutdown:\n{}", plugin.log()));
    assert!(status.success(), "exit status {status}:\n{}", plugin.log());
    assert!(!folder.exists(), "{} was not removed", folder.display());
}

#[tokio::test]
async fn parent_death_stops_plugin() {
    let log_dir = tempfile::tempdir().expect("create temporary folder");
    let log_path = log_dir.path().join("plugin.log");
    let log = std::fs::File::create(&log_path).expect("create plugin.log");
    // A shell takes SPIRE's place. It starts the plugin and is killed while the plugin runs.
    let mut command = Command::new("sh");
    command.args(["-c", "\"$0\" & wait"]).arg(plugin_bin());
    spire_environment(&mut command).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
    let mut parent = command.spawn().expect("start sh");
    let (handshake, _) = read_handshake(parent.stdout.take().expect("piped standard output"));
    let folder = socket_of_handshake(&handshake).parent().expect("socket folder").to_owned();
    let pid = plugin_pid(&log_path).await;

    parent.kill().expect("kill the parent");
    parent.wait().expect("reap the parent");
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_runs(pid) || folder.exists() {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        assert!(Instant::now() < deadline, "plugin {pid} still runs 5 s after its parent died:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads the plugin's pid from its "plugin serving" log line.
async fn plugin_pid(log_path: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(log_path).unwrap_or_default();
        let pid = text
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|line| line["@message"] == "plugin serving")
            .and_then(|line| line["pid"].as_u64());
        if let Some(pid) = pid {
            return u32::try_from(pid).expect("pid fits u32");
        }
        assert!(Instant::now() < deadline, "no \"plugin serving\" line within 10 s:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Returns whether `pid` runs; a zombie waiting for its parent to reap it has exited.
fn process_runs(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next());
    state != Some("Z")
}

/// Waits until a log line with `message` appears and returns every line.
async fn wait_for_log(plugin: &Plugin, message: &str) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = plugin.log_lines();
        if lines.iter().any(|line| line["@message"] == message) {
            return lines;
        }
        assert!(Instant::now() < deadline, "no log line {message:?} within 10 s:\n{}", plugin.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// The tests below run against a `sigil dev` cluster.

/// Starts a 3-node cluster and returns it with the addresses of its nodes.
async fn cluster() -> (DevCluster, Vec<String>) {
    let cluster = DevCluster::start(3, 0).await;
    let credential = cluster.dir.join("spire-server");
    assert!(
        credential.join("cert.pem").exists(),
        "sigil dev wrote no SPIRE server credential in {}",
        credential.display()
    );
    let endpoints = (1..=3).map(|id| cluster.endpoint(id).grpc).collect();
    (cluster, endpoints)
}

/// Starts a plugin, opens its broker stream, and initializes and configures it as SPIRE does,
/// with the dev cluster's SPIRE server credential.
async fn configured_plugin(cluster: &DevCluster, endpoints: &[String]) -> Plugin {
    configured_plugin_as(cluster, endpoints, "spire-server").await
}

/// Starts and configures a plugin with the credential in the dev folder's `credential` folder.
async fn configured_plugin_as(cluster: &DevCluster, endpoints: &[String], credential: &str) -> Plugin {
    let mut plugin = Plugin::launch().await;
    plugin.open_broker().await;
    plugin.init().await.expect("Init");
    let hcl = plugin_data(endpoints, &cluster.dir.join(credential));
    plugin
        .configure(TRUST_DOMAIN, &hcl)
        .await
        .unwrap_or_else(|status| panic!("Configure: {status:?}\n{}", plugin.log()));
    plugin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minted_ca_passes_spire_checks() {
    let _serial = CLUSTER_TESTS.lock().await;
    let (mut cluster, endpoints) = cluster().await;
    let mut plugin = configured_plugin(&cluster, &endpoints).await;
    let work = tempfile::tempdir().expect("create temporary folder");

    let (key, csr) = spire_csr(TRUST_DOMAIN);
    let csr_public_key = rcgen::PublicKeyData::subject_public_key_info(&key);
    let mut stream =
        plugin.mint(csr, 86_400).await.unwrap_or_else(|status| panic!("mint: {status:?}\n{}", plugin.log()));
    let first = next_within(&mut stream, Duration::from_secs(30), "mint").await.expect("first mint response");
    assert!(!first.x509_ca_chain.is_empty(), "empty x509_ca_chain");
    assert!(!first.upstream_x509_roots.is_empty(), "empty upstream_x509_roots");

    let chain: Vec<&[u8]> = first.x509_ca_chain.iter().map(|c| c.asn1.as_slice()).collect();
    let roots: Vec<&[u8]> = first.upstream_x509_roots.iter().map(|c| c.asn1.as_slice()).collect();
    let (_, minted) = X509Certificate::from_der(chain[0]).expect("element 0 parses");

    let constraints = minted.basic_constraints().expect("valid basic constraints").expect("basic constraints present");
    assert!(constraints.value.ca, "element 0 is not a CA");
    let usage = minted.key_usage().expect("valid key usage").expect("key usage present").value.flags;
    assert_ne!(usage & KEY_CERT_SIGN, 0, "keyCertSign missing: {usage:#b}");
    assert_eq!(usage & !ALLOWED_CA_KEY_USAGE, 0, "key usage beyond keyCertSign, cRLSign, digitalSignature: {usage:#b}");
    assert_eq!(minted.public_key().raw, csr_public_key.as_slice(), "element 0 does not hold the CSR's key");
    assert!(minted.validity().is_valid(), "element 0 is not valid now: {:?}", minted.validity());
    let uris: Vec<String> = minted
        .subject_alternative_name()
        .expect("valid SAN")
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(uris.is_empty() || uris == ["spiffe://example.org"], "URI SANs {uris:?}");

    for (index, certificate) in chain.iter().enumerate() {
        assert!(!roots.contains(certificate), "chain element {index} is a root");
        let (_, parsed) = X509Certificate::from_der(certificate).expect("chain element parses");
        assert_ne!(parsed.subject(), parsed.issuer(), "chain element {index} is self-issued");
    }

    let (ok, output) = openssl_verify(work.path(), "minted", &roots, &chain[1..], chain[0]);
    assert!(ok, "openssl verify of the minted CA failed: {output}");
    let (leaf, leaf_key) = throwaway_leaf(TRUST_DOMAIN, chain[0], &key);
    let (ok, output) = openssl_verify(work.path(), "leaf", &roots, &chain, &leaf);
    assert!(ok, "openssl verify of a leaf under the minted CA failed: {output}");

    let mut svid_der = leaf.clone();
    chain.iter().for_each(|certificate| svid_der.extend_from_slice(certificate));
    let svid = spiffe::X509Svid::parse_from_der(&svid_der, &leaf_key).expect("spiffe crate accepts leaf and chain");
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/spire/throwaway");
    let trust_domain = spiffe::TrustDomain::new(TRUST_DOMAIN).expect("trust domain");
    let roots_der: Vec<u8> = roots.concat();
    spiffe::X509Bundle::parse_from_der(trust_domain, &roots_der).expect("spiffe crate accepts the roots");

    let quiet = tokio::time::timeout(QUIET_PERIOD, stream.message()).await;
    assert!(quiet.is_err(), "the mint stream ended or sent a message with nothing changed: {quiet:?}");
    // SPIRE cancels the stream when it mints again, and the plugin then stops following the bundle.
    drop(stream);
    wait_for_log(&plugin, "SPIRE closed the stream").await;

    let mut bundle = plugin.subscribe().await.expect("SubscribeToLocalBundle");
    let local = next_within(&mut bundle, Duration::from_secs(10), "subscribe").await.expect("first bundle message");
    let local_roots: BTreeSet<&[u8]> = local.upstream_x509_roots.iter().map(|c| c.asn1.as_slice()).collect();
    assert_eq!(local_roots, roots.iter().copied().collect(), "SubscribeToLocalBundle roots differ from the mint's");

    plugin.deinit().await.expect("Deinit");
    plugin.shutdown().await.expect("Shutdown");
    let status = plugin.wait_exit(SHUTDOWN_GRACE).await.expect("plugin exits after Shutdown");
    assert!(status.success(), "exit status {status}");
    cluster.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_authorities_reach_both_servers() {
    let _serial = CLUSTER_TESTS.lock().await;
    let (mut cluster, endpoints) = cluster().await;
    let first_server = configured_plugin(&cluster, &endpoints).await;
    let second_server = configured_plugin(&cluster, &endpoints).await;

    let started = Instant::now();
    let mut first_stream = first_server.publish(spire_jwt_key("server-a")).await.expect("publish server-a");
    let first_answer = next_within(&mut first_stream, PUBLISH_LIMIT, "publish server-a").await;
    let first_answer = first_answer.expect("first response within 5 s");
    assert!(started.elapsed() < PUBLISH_LIMIT, "first response took {:?}", started.elapsed());
    assert!(key_ids(&first_answer.upstream_jwt_keys).contains(&"server-a".to_owned()), "own key not echoed");

    let mut second_stream = second_server.publish(spire_jwt_key("server-b")).await.expect("publish server-b");
    let second_answer = next_within(&mut second_stream, PUBLISH_LIMIT, "publish server-b").await;
    let second_ids = key_ids(&second_answer.expect("first response within 5 s").upstream_jwt_keys);
    assert!(second_ids.contains(&"server-a".to_owned()), "server-b did not receive server-a's key: {second_ids:?}");
    assert!(second_ids.contains(&"server-b".to_owned()), "server-b's own key not echoed: {second_ids:?}");

    let update = next_within(&mut first_stream, Duration::from_secs(10), "server-a stream").await;
    let update_ids = key_ids(&update.expect("server-a hears of server-b's key").upstream_jwt_keys);
    assert!(update_ids.contains(&"server-a".to_owned()), "{update_ids:?}");
    assert!(update_ids.contains(&"server-b".to_owned()), "{update_ids:?}");
    cluster.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_node_kill() {
    let _serial = CLUSTER_TESTS.lock().await;
    let (mut cluster, endpoints) = cluster().await;
    let watcher = configured_plugin(&cluster, &endpoints).await;
    // The publisher lists node 1 last, so it keeps working while node 1 is down.
    let reordered = vec![endpoints[1].clone(), endpoints[2].clone(), endpoints[0].clone()];
    let publisher = configured_plugin(&cluster, &reordered).await;

    let (_, csr) = spire_csr(TRUST_DOMAIN);
    let mut mint_stream = watcher.mint(csr, 3600).await.unwrap_or_else(|status| panic!("mint: {status:?}"));
    next_within(&mut mint_stream, Duration::from_secs(30), "mint").await.expect("first mint response");
    let mut bundle = watcher.subscribe().await.expect("SubscribeToLocalBundle");
    next_within(&mut bundle, Duration::from_secs(10), "subscribe").await.expect("first bundle message");

    // The watcher lists node 1 first, so its streams run against node 1.
    cluster.kill_node(1).await;
    let killed_at = Instant::now();

    let mut publish_stream = loop {
        match publisher.publish(spire_jwt_key("after-kill")).await {
            Ok(stream) => break stream,
            Err(status) => {
                assert!(killed_at.elapsed() < RECOVERY_TIMEOUT, "publish after the kill kept failing: {status:?}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    next_within(&mut publish_stream, PUBLISH_LIMIT, "publish after kill").await.expect("publish response");

    let update = next_within(&mut bundle, RECOVERY_TIMEOUT, "subscribe after kill").await;
    let update = update.unwrap_or_else(|| panic!("no bundle update within {RECOVERY_TIMEOUT:?}:\n{}", watcher.log()));
    assert!(
        key_ids(&update.upstream_jwt_keys).contains(&"after-kill".to_owned()),
        "{:?}",
        key_ids(&update.upstream_jwt_keys)
    );
    assert!(!update.upstream_x509_roots.is_empty(), "update without roots");

    let quiet = tokio::time::timeout(QUIET_PERIOD, mint_stream.message()).await;
    assert!(quiet.is_err(), "the mint stream ended or changed after the kill: {quiet:?}");
    let reconnects =
        watcher.log_lines().iter().filter(|line| line["@message"] == "bundle watch failed; reconnecting").count();
    assert!(reconnects >= 1, "the watcher logged no reconnect:\n{}", watcher.log());
    cluster.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigil_denial_keeps_its_status() {
    let _serial = CLUSTER_TESTS.lock().await;
    let (mut cluster, endpoints) = cluster().await;
    // The dev policy lets the Istio credential request workload SVIDs, but not act for a trust
    // domain as a downstream CA.
    let plugin = configured_plugin_as(&cluster, &endpoints, "istio").await;

    let (_, csr) = spire_csr(TRUST_DOMAIN);
    let status = plugin.mint(csr, 3600).await.map(|_| ()).expect_err("mint with a credential the policy denies");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(&endpoints[0]), "no node address in {:?}", status.message());
    assert!(status.message().contains("downstream_trust_domains"), "Sigil's message is lost: {:?}", status.message());

    let status = plugin.publish(spire_jwt_key("k1")).await.map(|_| ()).expect_err("publish with a denied credential");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let retry_message = "publish JWT authority failed; trying the next endpoint";
    let retries = plugin.log_lines().iter().filter(|line| line["@message"] == retry_message).count();
    assert_eq!(retries, 0, "a denial was retried:\n{}", plugin.log());
    cluster.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_taint_reach_open_streams() {
    let _serial = CLUSTER_TESTS.lock().await;
    let (mut cluster, endpoints) = cluster().await;
    let plugin = configured_plugin(&cluster, &endpoints).await;
    let work = tempfile::tempdir().expect("create temporary folder");

    let (_, csr) = spire_csr(TRUST_DOMAIN);
    let mut mint_stream =
        plugin.mint(csr, 3600).await.unwrap_or_else(|status| panic!("mint: {status:?}\n{}", plugin.log()));
    let minted = next_within(&mut mint_stream, UPDATE_TIMEOUT, "mint").await.expect("first mint response");
    let before = root_taint_by_fingerprint(&minted.upstream_x509_roots);
    assert_eq!(before.len(), 1, "one root before the rotation: {before:?}");
    let old_root = before.keys().next().cloned().expect("one root");
    assert!(!before[&old_root], "the old root is tainted before the rotation");
    let old_intermediate =
        minted.x509_ca_chain.get(1).expect("Sigil's intermediate follows the minted CA").asn1.clone();

    let mut bundle = plugin.subscribe().await.expect("SubscribeToLocalBundle");
    let local = next_within(&mut bundle, UPDATE_TIMEOUT, "subscribe").await.expect("first bundle message");
    assert_eq!(root_taint_by_fingerprint(&local.upstream_x509_roots), before, "subscribe roots before the rotation");

    // The admin calls go to node 2, and the plugin's streams run against node 1, so the changes
    // reach the streams through replication.
    let mut admin = AdminClient::new(cluster.channel(2).await);
    let request = RotateCaRequest { activate_after_seconds: ACTIVATE_AFTER, validity_seconds: 30 * 24 * 3600 };
    let rotated = tokio::time::timeout(UPDATE_TIMEOUT, admin.rotate_ca(request))
        .await
        .expect("RotateCa returns within 30 s")
        .expect("rotate the CA")
        .into_inner();
    let new_root = rotated.root_fingerprint_sha256.clone();
    assert_eq!(new_root, sha256_hex(&rotated.root), "RotateCa returns the fingerprint of its root");
    assert_ne!(new_root, old_root, "the rotation made a new root");

    let both_untainted = BTreeMap::from([(old_root.clone(), false), (new_root.clone(), false)]);
    let update = next_within(&mut mint_stream, UPDATE_TIMEOUT, "mint after rotation").await;
    let update = update.unwrap_or_else(|| panic!("no new root on the mint stream within 30 s:\n{}", plugin.log()));
    assert!(update.x509_ca_chain.is_empty(), "a root update carries {} chain certificates", update.x509_ca_chain.len());
    assert_eq!(root_taint_by_fingerprint(&update.upstream_x509_roots), both_untainted, "mint roots after the rotation");
    let update = next_within(&mut bundle, UPDATE_TIMEOUT, "subscribe after rotation").await;
    let update = update.unwrap_or_else(|| panic!("no new root on the subscribe stream within 30 s:\n{}", plugin.log()));
    assert_eq!(
        root_taint_by_fingerprint(&update.upstream_x509_roots),
        both_untainted,
        "subscribe roots after rotation"
    );

    // SPIRE mints again and gets a CA under the new intermediate once it is active, before the
    // old root is tainted.
    let deadline = Instant::now() + Duration::from_secs(ACTIVATE_AFTER) + UPDATE_TIMEOUT;
    let (remint_key, remint) = loop {
        let (key, csr) = spire_csr(TRUST_DOMAIN);
        let mut stream =
            plugin.mint(csr, 3600).await.unwrap_or_else(|status| panic!("mint again: {status:?}\n{}", plugin.log()));
        let response = next_within(&mut stream, UPDATE_TIMEOUT, "mint again").await.expect("mint response");
        let intermediate = &response.x509_ca_chain.get(1).expect("Sigil's intermediate follows the minted CA").asn1;
        if *intermediate == rotated.intermediate {
            break (key, response);
        }
        assert_eq!(*intermediate, old_intermediate, "the CA was minted under an unknown intermediate");
        assert!(
            Instant::now() < deadline,
            "Sigil did not mint under the new intermediate within {ACTIVATE_AFTER} s + 30 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        now >= rotated.activate_at,
        "the new intermediate signed before its activation time {}",
        rotated.activate_at
    );
    assert_eq!(root_taint_by_fingerprint(&remint.upstream_x509_roots), both_untainted, "roots of the new mint");
    let chain: Vec<&[u8]> = remint.x509_ca_chain.iter().map(|c| c.asn1.as_slice()).collect();
    let (ok, output) = openssl_verify(work.path(), "reminted", &[&rotated.root], &chain[1..], chain[0]);
    assert!(ok, "the CA minted after activation does not chain to the new root: {output}");
    let (leaf, _) = throwaway_leaf(TRUST_DOMAIN, chain[0], &remint_key);
    let (ok, output) = openssl_verify(work.path(), "reminted-leaf", &[&rotated.root], &chain, &leaf);
    assert!(ok, "a leaf under the CA minted after activation does not chain to the new root: {output}");

    let request = TaintCaRootRequest { root_fingerprint_sha256: old_root.clone() };
    let tainted = tokio::time::timeout(UPDATE_TIMEOUT, admin.taint_ca_root(request))
        .await
        .expect("TaintCaRoot returns within 30 s")
        .expect("taint the old root")
        .into_inner();
    assert_eq!(tainted.signing_version, rotated.version, "the new CA version signs after the taint");

    let old_tainted = BTreeMap::from([(old_root.clone(), true), (new_root.clone(), false)]);
    let update = next_within(&mut mint_stream, UPDATE_TIMEOUT, "mint after taint").await;
    let update = update.unwrap_or_else(|| panic!("no taint on the mint stream within 30 s:\n{}", plugin.log()));
    assert!(update.x509_ca_chain.is_empty(), "a root update carries {} chain certificates", update.x509_ca_chain.len());
    assert_eq!(root_taint_by_fingerprint(&update.upstream_x509_roots), old_tainted, "mint roots after the taint");
    let update = next_within(&mut bundle, UPDATE_TIMEOUT, "subscribe after taint").await;
    let update = update.unwrap_or_else(|| panic!("no taint on the subscribe stream within 30 s:\n{}", plugin.log()));
    assert_eq!(root_taint_by_fingerprint(&update.upstream_x509_roots), old_tainted, "subscribe roots after the taint");

    let quiet = tokio::time::timeout(QUIET_PERIOD, mint_stream.message()).await;
    assert!(quiet.is_err(), "the mint stream ended or sent a message after the taint: {quiet:?}");
    let quiet = tokio::time::timeout(QUIET_PERIOD, bundle.message()).await;
    assert!(quiet.is_err(), "the subscribe stream ended or sent a message after the taint: {quiet:?}");
    cluster.stop(Duration::from_secs(10)).await;
}
