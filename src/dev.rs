//! `sigil dev`: a local deployment on SoftHSM under one folder, for trying Sigil and for tests.
//!
//! Layout of DIR: `softhsm2.conf` and `tokens/` (one SoftHSM token per node, all holding the same
//! key-encryption key and CA key), `nodes/<id>/` (`sigil.toml`, `pin` and `so-pin` files with mode
//! 0600, `data/` with the ledger, Raft log and `node-tls/`, `audit.jsonl`, `node.log`, `pid` while
//! running), `client/` (the admin credential), `spire-server/` and `istio/` (credentials for a local
//! SPIRE server's plugin and an istio-agent), `bundle.pem`, `cluster-complete` (the number of
//! nodes made) and, while the nodes serve, `endpoints.json`.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tracing::{info, warn};

use crate::cli::DevArgs;
use crate::client::{Connection, Endpoints, NodeEndpoint};
use crate::config::{
    AcmeSection, AcmeValidationSection, AuditSection, CaSection, CallerPolicy, Config, DownstreamSection, HsmSection,
    IssuanceSection, ListenConfig, LogSection, PolicyMode, PolicySection, RaftSection,
};
use crate::policy::DnsPattern;
use crate::setup::write_private;
use crate::spiffe_id::check_trust_domain;

/// Path of the SoftHSM2 module on Debian and Ubuntu.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// How long a node may take from start to ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Creates the deployment if needed, starts its nodes, and waits for SIGINT or SIGTERM.
///
/// # Errors
///
/// Fails when set-up fails, a node does not become ready, or a node is already running.
pub async fn run(args: &DevArgs) -> anyhow::Result<()> {
    let mut signals = crate::server::StopSignals::install()?;
    if !(1..=MAX_DEV_NODES).contains(&args.nodes) {
        bail!(
            "--nodes {} is out of range: a dev cluster has 1 to {MAX_DEV_NODES} nodes (3 or 5 for a quorum that survives failures)",
            args.nodes
        );
    }
    check_trust_domain(&args.trust_domain).context("invalid --trust-domain")?;
    std::fs::create_dir_all(&args.dir).with_context(|| format!("create {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir).with_context(|| format!("resolve {}", args.dir.display()))?;
    let acme = DevAcme {
        resolver: args.acme_resolver,
        eab_required: args.acme_eab_required,
        http01_port: args.acme_http01_port,
    };
    let layout = Layout { dir: dir.clone(), acme };

    let total = args.nodes + args.standby;
    let configs = layout.ensure_cluster(total, &args.trust_domain)?;
    let (members, standby) = configs.split_at(usize::try_from(args.nodes).unwrap_or(usize::MAX));
    let _ = std::fs::remove_file(dir.join("endpoints.json"));

    let mut nodes = Vec::new();
    let started = layout.start_cluster(members, &mut nodes).await;
    if let Err(error) = started {
        stop_nodes(&layout, &mut nodes);
        return Err(error);
    }

    let endpoints = Endpoints {
        trust_domain: args.trust_domain.clone(),
        nodes: members.iter().map(endpoint).collect(),
        standby: standby.iter().map(endpoint).collect(),
    };
    std::fs::write(dir.join("endpoints.json"), serde_json::to_string_pretty(&endpoints)? + "\n")
        .context("write endpoints.json")?;
    print_summary(&dir, &endpoints);

    let outcome = wait_for_stop(&mut signals, &mut nodes).await;
    stop_nodes(&layout, &mut nodes);
    let _ = std::fs::remove_file(dir.join("endpoints.json"));
    info!("dev deployment stopped");
    outcome
}

/// Most nodes (members and standby) of one dev deployment.
const MAX_DEV_NODES: u64 = 7;

/// Attempts to add one node to a starting dev cluster.
const ADD_MEMBER_ATTEMPTS: u32 = 4;

/// Folder of the credential a local SPIRE server's Sigil plugin uses.
const SPIRE_SERVER_CREDENTIAL: &str = "spire-server";
/// Folder of the credential a local istio-agent uses.
const ISTIO_CREDENTIAL: &str = "istio";

fn spire_server_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/spire/server")
}

fn istio_cluster_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/istio/cluster")
}

/// Label of the key-encryption key in every dev token.
const DEV_KEK_LABEL: &str = "sigil-kek";

fn endpoint(config: &Config) -> NodeEndpoint {
    NodeEndpoint {
        id: config.node_id,
        grpc: config.listen.grpc.to_string(),
        metrics: config.listen.metrics.to_string(),
        raft: config.raft_address(),
        acme: config.listen.acme.map(|address| format!("https://{address}/acme/directory")),
        config: config_path_of(config),
    }
}

fn config_path_of(config: &Config) -> Option<PathBuf> {
    config.data_dir.parent().map(|node_dir| node_dir.join("sigil.toml"))
}

struct Layout {
    dir: PathBuf,
    acme: DevAcme,
}

/// ACME choices of `sigil dev` that go into each node's configuration.
#[derive(Debug, Clone)]
struct DevAcme {
    resolver: Option<SocketAddr>,
    eab_required: bool,
    http01_port: u16,
}

impl Layout {
    fn node_dir(&self, id: u64) -> PathBuf {
        self.dir.join("nodes").join(id.to_string())
    }

    fn softhsm_conf(&self) -> PathBuf {
        self.dir.join("softhsm2.conf")
    }

    /// Creates the deployment's nodes unless they exist: one token per node with the same
    /// key-encryption key, the CA on node 1 (which bootstraps the cluster) copied into every other
    /// token by wrap and unwrap, a node certificate for each node, and the admin credential.
    /// Returns the configurations, node 1 first.
    fn ensure_cluster(&self, total: u64, trust_domain: &str) -> anyhow::Result<Vec<Config>> {
        let complete = self.dir.join("cluster-complete");
        if complete.exists() {
            return self.load_existing(total, trust_domain);
        }
        if self.dir.join("nodes").exists() {
            info!(dir = %self.dir.display(), "removing an unfinished dev deployment");
            std::fs::remove_dir_all(self.dir.join("nodes")).context("remove unfinished nodes")?;
            let _ = std::fs::remove_dir_all(self.dir.join("tokens"));
            for credential in ["client", SPIRE_SERVER_CREDENTIAL, ISTIO_CREDENTIAL] {
                let _ = std::fs::remove_dir_all(self.dir.join(credential));
            }
        }
        std::fs::create_dir_all(self.dir.join("tokens")).context("create token folder")?;
        std::fs::write(
            self.softhsm_conf(),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                self.dir.join("tokens").display()
            ),
        )
        .context("write softhsm2.conf")?;

        let mut paths = Vec::new();
        for id in 1..=total {
            info!(node_id = id, dir = %self.node_dir(id).display(), "creating dev node");
            paths.push(self.create_node(id, trust_domain)?);
        }
        let arg = |path: &Path| path.to_string_lossy().into_owned();
        let mut kek_args = vec!["hsm".to_owned(), "install-kek".to_owned()];
        for (id, path) in (1..=total).zip(&paths) {
            kek_args.extend(["--config".to_owned(), arg(path)]);
            kek_args.extend(["--so-pin-file".to_owned(), arg(&self.node_dir(id).join("so-pin"))]);
        }
        self.run_step(&kek_args.iter().map(String::as_str).collect::<Vec<_>>())?;

        let first = arg(&paths[0]);
        self.run_step(&["init", "--config", &first, "--dev-root"])?;
        let client = arg(&self.dir.join("client"));
        let admin = format!("spiffe://{trust_domain}/sigil/admin");
        self.run_step(&["ca", "issue-client", "--config", &first, "--spiffe-id", &admin, "--out", &client])?;
        std::fs::copy(self.dir.join("client/bundle.pem"), self.dir.join("bundle.pem")).context("write bundle.pem")?;
        for (folder, spiffe_id) in [
            (SPIRE_SERVER_CREDENTIAL, spire_server_id(trust_domain)),
            (ISTIO_CREDENTIAL, istio_cluster_id(trust_domain)),
        ] {
            let out = arg(&self.dir.join(folder));
            self.run_step(&["ca", "issue-client", "--config", &first, "--spiffe-id", &spiffe_id, "--out", &out])?;
        }
        for path in &paths[1..] {
            self.run_step(&["ca", "issue-node-certificate", "--config", &first, "--node-config", &arg(path)])?;
            self.run_step(&["hsm", "copy-ca-key", "--from", &first, "--to", &arg(path)])?;
        }
        // The marker appears only when every node is complete, so a failed set-up is redone from
        // the start by the next run.
        std::fs::write(&complete, format!("{total}\n")).context("finish the dev deployment")?;
        self.load_existing(total, trust_domain)
    }

    /// Creates node `id`'s folder, PINs, token and configuration; returns the configuration path.
    fn create_node(&self, id: u64, trust_domain: &str) -> anyhow::Result<PathBuf> {
        let node_dir = self.node_dir(id);
        std::fs::create_dir_all(node_dir.join("data")).context("create node folder")?;
        write_private(&node_dir.join("pin"), random_secret().as_bytes())?;
        write_private(&node_dir.join("so-pin"), random_secret().as_bytes())?;
        let config_path = node_dir.join("sigil.toml");
        std::fs::write(&config_path, node_config(id, trust_domain, &node_dir, &self.acme)?)
            .context("write node config")?;
        let config_arg = config_path.to_string_lossy().into_owned();
        let so_pin = node_dir.join("so-pin").to_string_lossy().into_owned();
        self.run_step(&["hsm", "init-token", "--config", &config_arg, "--so-pin-file", &so_pin])?;
        Ok(config_path)
    }

    /// Loads the configurations of an existing deployment made for `total` nodes.
    fn load_existing(&self, total: u64, trust_domain: &str) -> anyhow::Result<Vec<Config>> {
        let made = std::fs::read_to_string(self.dir.join("cluster-complete")).unwrap_or_default();
        if made.trim() != total.to_string() {
            bail!(
                "{} was created with {} nodes (members and standby), not {total}; keep the counts or use another --dir",
                self.dir.display(),
                made.trim()
            );
        }
        let mut configs = Vec::new();
        for id in 1..=total {
            let config = Config::load(&self.node_dir(id).join("sigil.toml"))?;
            if config.trust_domain != trust_domain {
                bail!(
                    "{} was created for trust domain {:?}, not {trust_domain:?}; use another --dir",
                    self.dir.display(),
                    config.trust_domain
                );
            }
            configs.push(config);
        }
        Ok(configs)
    }

    /// Starts the member nodes and waits until node 1 is ready (alone in a new cluster, with a
    /// quorum in an existing one). The first time, the other nodes then join as learners and
    /// become voters; later runs find them in the Raft log. Waits until all are ready.
    async fn start_cluster(&self, members: &[Config], nodes: &mut Vec<(u64, Child)>) -> anyhow::Result<()> {
        for config in members {
            let child = self.start_node(config)?;
            nodes.push((config.node_id, child));
        }
        let (_, first) = nodes.first_mut().context("a dev deployment has at least one node")?;
        wait_until_ready(&members[0], first, &self.node_dir(1).join("node.log"))?;
        for config in &members[1..] {
            let log = self.raft_members(&members[0]).await?;
            if !log.contains(&config.node_id) {
                info!(node_id = config.node_id, "adding node to the cluster");
                self.add_member(config).await?;
            }
        }
        for (config, (_, child)) in members.iter().zip(nodes.iter_mut()) {
            wait_until_ready(config, child, &self.node_dir(config.node_id).join("node.log"))?;
        }
        Ok(())
    }

    /// Returns the voters and learners that node 1 reports.
    async fn raft_members(&self, first: &Config) -> anyhow::Result<Vec<u64>> {
        let connection = self.admin_connection(first);
        let mut client = crate::proto::admin_client::AdminClient::new(connection.connect().await?);
        let response = client
            .get_status(crate::proto::GetStatusRequest {})
            .await
            .map_err(|status| anyhow::anyhow!("status of node 1: {}", status.message()))?
            .into_inner();
        Ok(response.nodes.iter().flat_map(|node| node.voters.iter().chain(&node.learners).copied()).collect())
    }

    /// Adds a started node to the cluster through the leader. A membership change can miss its
    /// commit timeout while the nodes are still starting on a busy machine, so it is retried. The
    /// leader skips the steps that already took effect.
    async fn add_member(&self, config: &Config) -> anyhow::Result<()> {
        let mut attempt = 1;
        loop {
            match self.try_add_member(config).await {
                Ok(()) => return Ok(()),
                Err(error) if attempt < ADD_MEMBER_ATTEMPTS => {
                    warn!(node_id = config.node_id, attempt, %error, "adding the node failed; retrying in 1 s");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn try_add_member(&self, config: &Config) -> anyhow::Result<()> {
        let endpoints: Vec<NodeEndpoint> = (1..config.node_id)
            .map(|id| Config::load(&self.node_dir(id).join("sigil.toml")).map(|c| endpoint(&c)))
            .collect::<Result<_, _>>()?;
        let mut last_error = None;
        for candidate in &endpoints {
            let connection = Connection {
                address: candidate.grpc.clone(),
                cert: self.dir.join("client/cert.pem"),
                key: self.dir.join("client/key.pem"),
                ca: self.dir.join("bundle.pem"),
            };
            let Ok(channel) = connection.connect_with_timeout(Duration::from_secs(120)).await else {
                continue;
            };
            let mut client = crate::proto::admin_client::AdminClient::new(channel);
            let request = crate::proto::AddNodeRequest {
                node_id: config.node_id,
                raft_address: config.raft_address(),
                catch_up_seconds: 120,
            };
            match client.add_node(request).await {
                Ok(_) => return Ok(()),
                Err(status) if status.message().contains("is already a voter") => return Ok(()),
                Err(status) => last_error = Some(format!("node {}: {}", candidate.id, status.message())),
            }
        }
        bail!("no node added node {}: {}", config.node_id, last_error.unwrap_or_else(|| "none reachable".to_owned()))
    }

    fn admin_connection(&self, config: &Config) -> Connection {
        Connection {
            address: config.listen.grpc.to_string(),
            cert: self.dir.join("client/cert.pem"),
            key: self.dir.join("client/key.pem"),
            ca: self.dir.join("bundle.pem"),
        }
    }

    /// Runs `sigil ARGS` with this deployment's SoftHSM configuration.
    fn run_step(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = Command::new(std::env::current_exe().context("find the sigil executable")?)
            .args(args)
            .env("SOFTHSM2_CONF", self.softhsm_conf())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run sigil {}", args.join(" ")))?;
        if !output.status.success() {
            bail!(
                "sigil {} failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    fn start_node(&self, config: &Config) -> anyhow::Result<Child> {
        let node_dir = self.node_dir(config.node_id);
        let pid_path = node_dir.join("pid");
        if let Some(pid) = running_pid(&pid_path) {
            bail!("node {} of {} is already running as pid {pid}; stop it first", config.node_id, self.dir.display());
        }
        let log = std::fs::File::create(node_dir.join("node.log")).context("create node.log")?;
        let child = Command::new(std::env::current_exe().context("find the sigil executable")?)
            .args(["serve", "--config"])
            .arg(node_dir.join("sigil.toml"))
            .env("SOFTHSM2_CONF", self.softhsm_conf())
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("open node.log")?)
            .stderr(log)
            .spawn()
            .context("start sigil serve")?;
        std::fs::write(&pid_path, format!("{}\n", child.id())).context("write pid file")?;
        info!(node_id = config.node_id, pid = child.id(), "node started");
        Ok(child)
    }
}

fn node_config(id: u64, trust_domain: &str, node_dir: &Path, acme: &DevAcme) -> anyhow::Result<String> {
    let dns_pattern = format!("**.{trust_domain}");
    let allowed_dns_names = if DnsPattern::parse(&dns_pattern).is_ok() { vec![dns_pattern] } else { Vec::new() };
    let admin = CallerPolicy {
        spiffe_id: format!("spiffe://{trust_domain}/sigil/admin"),
        allowed_spiffe_ids: vec![format!("spiffe://{trust_domain}/**")],
        allowed_dns_names,
        max_ttl: Duration::from_secs(24 * 3600),
        // High enough for the load generator; production policies should be far tighter.
        rate_per_second: 50_000.0,
        rate_burst: 100_000,
        admin: true,
        downstream_trust_domains: Vec::new(),
    };
    // The local SPIRE server's plugin may mint CAs for the trust domain and publish its JWT keys.
    let spire_server = CallerPolicy {
        spiffe_id: spire_server_id(trust_domain),
        allowed_spiffe_ids: Vec::new(),
        allowed_dns_names: Vec::new(),
        max_ttl: Duration::from_secs(24 * 3600),
        rate_per_second: 10.0,
        rate_burst: 100,
        admin: false,
        downstream_trust_domains: vec![trust_domain.to_owned()],
    };
    // An Istio cluster's agents ask for workload identities of any namespace and service account.
    let istio = CallerPolicy {
        spiffe_id: istio_cluster_id(trust_domain),
        allowed_spiffe_ids: vec![format!("spiffe://{trust_domain}/ns/*/sa/*")],
        allowed_dns_names: Vec::new(),
        max_ttl: Duration::from_secs(24 * 3600),
        rate_per_second: 1_000.0,
        rate_burst: 1_000,
        admin: false,
        downstream_trust_domains: Vec::new(),
    };
    let localhost = IpAddr::from([127, 0, 0, 1]);
    let raft_ip = raft_loopback_address(id)?;
    let config = Config {
        node_id: id,
        trust_domain: trust_domain.to_owned(),
        data_dir: node_dir.join("data"),
        listen: ListenConfig {
            grpc: SocketAddr::new(localhost, free_port(localhost)?),
            metrics: SocketAddr::new(localhost, free_port(localhost)?),
            raft: SocketAddr::new(raft_ip, free_port(raft_ip)?),
            raft_advertise: None,
            raft_source: Some(raft_ip),
            acme: Some(SocketAddr::new(localhost, free_port(localhost)?)),
            tls_dns_names: vec!["localhost".to_owned()],
            tls_ip_addresses: vec![localhost],
        },
        hsm: HsmSection {
            module: SOFTHSM_MODULE.into(),
            token_label: Some(format!("sigil-node-{id}")),
            token_serial: None,
            pin_file: Some(node_dir.join("pin")),
            pin_env: None,
            sessions: 0,
            kek_label: Some(DEV_KEK_LABEL.to_owned()),
        },
        ca: CaSection {
            key_label: "sigil-intermediate".to_owned(),
            key_type: "ec-p256".to_owned(),
            common_name: format!("Sigil Development Intermediate CA ({trust_domain})"),
            organization: "Sigil".to_owned(),
            path_len: 1,
        },
        issuance: IssuanceSection::default(),
        audit: AuditSection { path: Some(node_dir.join("audit.jsonl")) },
        log: LogSection::default(),
        policy: PolicySection { mode: PolicyMode::Enforce, callers: vec![admin, spire_server, istio] },
        raft: RaftSection::default(),
        acme: dev_acme_section(acme),
        downstream: DownstreamSection::default(),
    };
    config.validate()?;
    Ok(format!("# Dev node {id}, written by `sigil dev`.\n{}", toml::to_string_pretty(&config)?))
}

/// ACME for local clients: challenges are validated on loopback at Pebble's ports (http-01 on
/// 5002 unless another port is given, tls-alpn-01 on 5001), every name resolves to 127.0.0.1 unless a resolver is given, and
/// loopback IP identifiers are allowed.
fn dev_acme_section(acme: &DevAcme) -> AcmeSection {
    let resolve_to = if acme.resolver.is_some() { Vec::new() } else { vec![IpAddr::from([127, 0, 0, 1])] };
    AcmeSection {
        allowed_ip_ranges: vec!["127.0.0.0/8".to_owned(), "::1".to_owned()],
        external_account_required: acme.eab_required,
        validation: AcmeValidationSection {
            http01_port: acme.http01_port,
            tls_alpn01_port: 5001,
            resolver: acme.resolver,
            resolve_to,
            allow_private_addresses: true,
            ..AcmeValidationSection::default()
        },
        ..AcmeSection::default()
    }
}

fn free_port(ip: IpAddr) -> anyhow::Result<u16> {
    let listener = TcpListener::bind((ip, 0)).with_context(|| format!("find a free port on {ip}"))?;
    Ok(listener.local_addr()?.port())
}

/// Returns 127.0.1.ID, the loopback address of node `id`'s Raft listener and of its connections to
/// the other nodes. With one address per node, firewall rules can cut the Raft traffic between
/// chosen nodes, as the partition test in tests/cluster.rs does. Linux routes all of 127.0.0.0/8 to
/// the loopback device.
fn raft_loopback_address(id: u64) -> anyhow::Result<IpAddr> {
    let last = u8::try_from(id).with_context(|| format!("node ID {id} is too large for a dev deployment"))?;
    Ok(IpAddr::from([127, 0, 1, last]))
}

/// Returns a random secret of 32 hex digits.
fn random_secret() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

fn running_pid(pid_path: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_path).ok()?.trim().parse().ok()?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).ok().map(|()| pid)
}

fn wait_until_ready(config: &Config, child: &mut Child, log: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < READY_TIMEOUT {
        if let Some(status) = child.try_wait().context("check node process")? {
            bail!(
                "node {} exited during start-up ({status}); its log {}:\n{}",
                config.node_id,
                log.display(),
                log_tail(log)
            );
        }
        if probe_ready(config.listen.metrics) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "node {} did not become ready within {READY_TIMEOUT:?}; its log {}:\n{}",
        config.node_id,
        log.display(),
        log_tail(log)
    )
}

/// Returns whether `GET /readyz` returns 200.
fn probe_ready(address: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn print_summary(dir: &Path, endpoints: &Endpoints) {
    println!("Sigil dev deployment is running (trust domain {}).", endpoints.trust_domain);
    for node in &endpoints.nodes {
        println!("  node {}: gRPC {}  metrics http://{}/metrics", node.id, node.grpc, node.metrics);
        if let Some(acme) = &node.acme {
            println!("          ACME {acme}");
        }
    }
    println!("  endpoints: {}", dir.join("endpoints.json").display());
    println!("  trust bundle: {}", dir.join("bundle.pem").display());
    println!("  admin credential: {}", dir.join("client").display());
    println!("  SPIRE server credential: {}", dir.join(SPIRE_SERVER_CREDENTIAL).display());
    println!("  Istio credential: {}", dir.join(ISTIO_CREDENTIAL).display());
    println!(
        "Try: sigil issue svid --dev-dir {} --spiffe-id spiffe://{}/demo --out /tmp/svid",
        dir.display(),
        endpoints.trust_domain
    );
    println!("Press Ctrl-C to stop.");
}

/// Waits for SIGINT/SIGTERM. A node that exits by itself is reported and left down, as a crashed
/// cluster member would be (the others go on); the wait fails once no node is left.
async fn wait_for_stop(signals: &mut crate::server::StopSignals, nodes: &mut Vec<(u64, Child)>) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            () = signals.wait() => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        nodes.retain_mut(|(id, child)| match child.try_wait() {
            Ok(Some(status)) => {
                warn!(node_id = *id, %status, "node exited; the other nodes keep running");
                false
            }
            _ => true,
        });
        if nodes.is_empty() {
            bail!("every node of the dev deployment has exited");
        }
    }
}

/// Sends SIGTERM to every node, waits, kills what is left, and removes the pid files.
fn stop_nodes(layout: &Layout, nodes: &mut Vec<(u64, Child)>) {
    for (id, child) in nodes.iter() {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        if let Err(error) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
            warn!(node_id = id, %error, "send SIGTERM failed");
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    for (id, child) in nodes.iter_mut() {
        while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if matches!(child.try_wait(), Ok(None)) {
            warn!(node_id = id, "node did not stop within {STOP_TIMEOUT:?}; killing it");
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(layout.node_dir(*id).join("pid"));
    }
    nodes.clear();
}
