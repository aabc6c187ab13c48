//! Command-line interface. The forms of `serve`, `dev`, `issue svid` and `status` are used by
//! docs and scripts; keep them stable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(name = "sigil", version, about = "HSM-backed intermediate certificate authority for zero-trust networks")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node.
    Serve {
        /// Node configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Generate the intermediate CA key in the HSM, then write a CSR for an offline root or, with
    /// --dev-root, create a development root in the HSM and install the signed intermediate.
    Init(InitArgs),
    /// Manage the installed CA certificates.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Manage HSM tokens.
    #[command(subcommand)]
    Hsm(HsmCommand),
    /// Create (or reuse) a local development deployment under DIR and run its nodes in the
    /// foreground until SIGINT or SIGTERM.
    Dev(DevArgs),
    /// Request certificates from a running node.
    #[command(subcommand)]
    Issue(IssueCommand),
    /// Change the membership of a running cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Manage the ACME server of a running cluster.
    #[command(subcommand)]
    Acme(AcmeCommand),
    /// Show the state of a running node.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AcmeCommand {
    /// Manage external account binding keys.
    #[command(subcommand)]
    Eab(EabCommand),
}

#[derive(Debug, Subcommand)]
pub enum EabCommand {
    /// Create a key and print its key id and MAC key. The MAC key is shown only here.
    Add {
        #[command(flatten)]
        target: Target,
        /// A note for operators, such as the team the key is for.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List the keys, without their MAC keys.
    List {
        #[command(flatten)]
        target: Target,
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a key so that it binds no new account.
    Remove {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        key_id: String,
    },
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Also generate a self-signed development root in the HSM and install the chain.
    #[arg(long, conflicts_with = "csr_out")]
    pub dev_root: bool,
    /// Output file for the intermediate's CSR (PEM), for an offline root to sign.
    #[arg(long, required_unless_present = "dev_root")]
    pub csr_out: Option<PathBuf>,
    /// Validity of the development root and intermediate.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5y")]
    pub validity: Duration,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Install an intermediate certificate signed by an offline root. The node must be stopped.
    Install {
        #[arg(long)]
        config: PathBuf,
        /// The intermediate certificate (PEM), optionally followed by further intermediates.
        #[arg(long)]
        cert: PathBuf,
        /// The root certificate(s) (PEM).
        #[arg(long)]
        root: PathBuf,
    },
    /// Issue a client credential (key, certificate, trust bundle) from the installed CA, for
    /// bootstrapping administrator access. The node must be stopped.
    IssueClient {
        #[arg(long)]
        config: PathBuf,
        /// SPIFFE ID of the client.
        #[arg(long)]
        spiffe_id: String,
        /// Folder for cert.pem, key.pem (mode 0600) and bundle.pem.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30days")]
        ttl: Duration,
    },
    /// Prepare a new CA version on the running cluster. Without --csr-out or --intermediate, it makes a
    /// new development root and intermediate. Under an offline root, run it first with --csr-out
    /// (the node generates the next key and writes its CSR), have the root sign the CSR, then run
    /// it with --intermediate, --root and --key-label against the same node. The new root joins the trust
    /// bundle at once; the new intermediate signs after --activate-after.
    Rotate {
        #[command(flatten)]
        target: Target,
        /// Time until the new intermediate starts to sign, such as 1h or 30m.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
        activate_after: Duration,
        /// Validity of the new development intermediate; by default that of the current one.
        #[arg(long, value_parser = humantime::parse_duration)]
        validity: Option<Duration>,
        /// Offline root, step 1: write the CSR of the next intermediate key to this file.
        #[arg(long, conflicts_with_all = ["intermediate", "root", "key_label", "validity"])]
        csr_out: Option<PathBuf>,
        /// Offline root, step 2: the signed intermediate (PEM), optionally followed by others.
        #[arg(long, requires_all = ["root", "key_label"])]
        intermediate: Option<PathBuf>,
        /// Offline root, step 2: the root certificate(s) (PEM).
        #[arg(long, requires = "intermediate")]
        root: Option<PathBuf>,
        /// Offline root, step 2: the key label that step 1 printed.
        #[arg(long, requires = "intermediate")]
        key_label: Option<String>,
    },
    /// Mark a root of the trust bundle as compromised. Downstream SPIRE servers rotate away from
    /// it at once, and the cluster signs with the newest version under another root.
    Taint {
        #[command(flatten)]
        target: Target,
        /// SHA-256 fingerprint of the root certificate, hex (colons allowed).
        #[arg(long)]
        fingerprint: String,
    },
    /// Issue the node certificate of a new node from the CA of this stopped node: the new node's
    /// SPIFFE ID and TLS names come from its configuration, and the files go to its
    /// DATA_DIR/node-tls. For building a cluster before its nodes first start.
    IssueNodeCertificate {
        /// Configuration of this node, which has the CA and is the only voter of its cluster.
        #[arg(long)]
        config: PathBuf,
        /// Configuration of the new node.
        #[arg(long)]
        node_config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum HsmCommand {
    /// Initialize the token named by the configuration in a free slot and set its user PIN
    /// (read from the configured PIN file or variable). For SoftHSM and test tokens.
    InitToken {
        #[arg(long)]
        config: PathBuf,
        /// File holding the security officer PIN to set.
        #[arg(long)]
        so_pin_file: PathBuf,
    },
    /// Generate one AES-256 key-encryption key in memory and install it, marked trusted, in the
    /// token of every configuration given, under the label `hsm.kek_label`. The nodes must be
    /// stopped. Give one --so-pin-file per --config, in the same order.
    InstallKek {
        #[arg(long = "config", required = true)]
        configs: Vec<PathBuf>,
        #[arg(long = "so-pin-file", required = true)]
        so_pin_files: Vec<PathBuf>,
    },
    /// Copy the CA private key from one node's HSM to another's by wrap and unwrap under the
    /// key-encryption key both hold. The key never leaves the HSMs in plaintext.
    CopyCaKey {
        /// Configuration of a node whose HSM has the CA key, and whose ledger has the CA.
        #[arg(long)]
        from: PathBuf,
        /// Configuration of the node that receives the key.
        #[arg(long)]
        to: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Add a node: it becomes a learner, catches up with the log, then becomes a voter. Start the
    /// new node first, with its node certificate (`cluster node-certificate`) in
    /// DATA_DIR/node-tls and the CA key in its HSM (`hsm copy-ca-key`).
    AddNode {
        #[command(flatten)]
        target: Target,
        /// Id of the new node, unique in the cluster and never reused.
        #[arg(long)]
        id: u64,
        /// Address of the new node's Raft listener as the other nodes reach it.
        #[arg(long)]
        raft_address: String,
        /// How long to wait for the new node to catch up.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2m")]
        catch_up: Duration,
    },
    /// Remove a node from the cluster.
    RemoveNode {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        id: u64,
    },
    /// Generate a key for a new node locally and have the cluster issue its node certificate;
    /// writes cert.pem, key.pem (mode 0600) and bundle.pem into OUT (the new node's
    /// DATA_DIR/node-tls).
    NodeCertificate {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        id: u64,
        #[arg(long)]
        out: PathBuf,
        /// DNS name clients use for the new node; repeat for several.
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// IP address clients use for the new node; repeat for several.
        #[arg(long = "ip")]
        ip: Vec<std::net::IpAddr>,
    },
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Folder for tokens, configs, credentials and state; reused when it exists.
    #[arg(long)]
    pub dir: PathBuf,
    /// Number of nodes to run: 1, or 3 or 5 for a cluster that survives failures.
    #[arg(long, default_value_t = 1)]
    pub nodes: u64,
    /// Extra nodes to prepare but not start, for trying `sigil cluster add-node`.
    #[arg(long, default_value_t = 0)]
    pub standby: u64,
    #[arg(long, default_value = "example.org")]
    pub trust_domain: String,
    /// DNS server the ACME servers validate challenges with, such as pebble-challtestsrv's
    /// address; without it every name resolves to 127.0.0.1. Applies when DIR is created.
    #[arg(long)]
    pub acme_resolver: Option<std::net::SocketAddr>,
    /// Make the ACME servers require an external account binding (`sigil acme eab add`).
    /// Applies when DIR is created.
    #[arg(long)]
    pub acme_eab_required: bool,
    /// Port the ACME servers connect to for http-01 validation. Applies when DIR is created.
    #[arg(long, default_value_t = 5002)]
    pub acme_http01_port: u16,
}

#[derive(Debug, Subcommand)]
pub enum IssueCommand {
    /// Generate a P-256 key locally, request an X509-SVID, and write svid.pem (leaf, then
    /// intermediates), svid.key (mode 0600) and bundle.pem into OUT.
    Svid {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        spiffe_id: String,
        /// DNS name to include; repeat for several.
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Requested lifetime, e.g. 30m or 2h; the node's default when omitted.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        #[arg(long)]
        out: PathBuf,
    },
}

/// How to reach a node: a dev folder, or an address with explicit credentials.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Folder created by `sigil dev`; uses its admin credential and its first node, or the node
    /// that --node names (`status` asks every node when --node is not given).
    #[arg(long, conflicts_with_all = ["server", "cert", "key", "ca"])]
    pub dev_dir: Option<PathBuf>,
    /// Node id within the --dev-dir deployment.
    #[arg(long, requires = "dev_dir")]
    pub node: Option<u64>,
    /// Node gRPC address, e.g. 127.0.0.1:8443.
    #[arg(long, requires_all = ["cert", "key", "ca"])]
    pub server: Option<String>,
    /// Client certificate chain (PEM).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Root certificates that verify the node (PEM).
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

/// Runs a parsed command line.
///
/// # Errors
///
/// Returns the failure of the command, naming the step.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config } => {
            let config = Config::load(&config)?;
            crate::logging::init(config.log.format, &config.log.level);
            runtime()?.block_on(crate::server::serve(config))
        }
        Command::Init(args) => {
            crate::logging::init(crate::config::LogFormat::Human, "warn");
            runtime()?.block_on(crate::setup::init(&args))
        }
        Command::Ca(CaCommand::Install { config, cert, root }) => {
            runtime()?.block_on(crate::setup::install(&config, &cert, &root))
        }
        Command::Ca(CaCommand::IssueClient { config, spiffe_id, out, ttl }) => {
            runtime()?.block_on(crate::setup::issue_client(&config, &spiffe_id, &out, ttl))
        }
        Command::Ca(command @ (CaCommand::Rotate { .. } | CaCommand::Taint { .. })) => {
            runtime()?.block_on(crate::client::ca_rotation(command))
        }
        Command::Ca(CaCommand::IssueNodeCertificate { config, node_config }) => {
            runtime()?.block_on(crate::setup::issue_node_certificate(&config, &node_config))
        }
        Command::Hsm(HsmCommand::InitToken { config, so_pin_file }) => crate::setup::init_token(&config, &so_pin_file),
        Command::Dev(args) => {
            crate::logging::init(crate::config::LogFormat::Human, "info");
            runtime()?.block_on(crate::dev::run(&args))
        }
        Command::Issue(IssueCommand::Svid { target, spiffe_id, dns, ttl, out }) => {
            runtime()?.block_on(crate::client::issue_svid(&target, &spiffe_id, &dns, ttl, &out))
        }
        Command::Hsm(HsmCommand::InstallKek { configs, so_pin_files }) => {
            crate::setup::install_kek(&configs, &so_pin_files)
        }
        Command::Hsm(HsmCommand::CopyCaKey { from, to }) => crate::setup::copy_ca_key(&from, &to),
        Command::Cluster(command) => runtime()?.block_on(crate::client::cluster(command)),
        Command::Acme(AcmeCommand::Eab(command)) => runtime()?.block_on(crate::client::acme_eab(command)),
        Command::Status { target, json } => runtime()?.block_on(crate::client::status(&target, json)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start async runtime")
}

/// Parses `host:port` into a socket address for messages and checks.
pub fn parse_address(address: &str) -> anyhow::Result<SocketAddr> {
    address.parse().with_context(|| format!("invalid address {address:?}; expected IP:PORT"))
}
