//! The node configuration file (TOML), and its validation.
//!
//! Secrets are never part of this file: the HSM PIN is read from a file or an environment variable
//! that the configuration names.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sigil_hsm::{HsmConfig, KeyType, Pin, TokenSelector};

use crate::policy::{DnsPattern, SpiffeIdPattern};
use crate::spiffe_id::{SpiffeId, check_trust_domain};

/// Longest TTL any configuration may allow; short-lived certificates are the point of Sigil.
pub const MAX_CONFIGURABLE_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Node identity within the cluster, 1 or more.
    pub node_id: u64,
    pub trust_domain: String,
    /// Folder for the ledger and other node state.
    pub data_dir: PathBuf,
    pub listen: ListenConfig,
    pub hsm: HsmSection,
    pub ca: CaSection,
    #[serde(default)]
    pub issuance: IssuanceSection,
    #[serde(default)]
    pub audit: AuditSection,
    #[serde(default)]
    pub log: LogSection,
    #[serde(default)]
    pub policy: PolicySection,
    #[serde(default)]
    pub raft: RaftSection,
    /// The ACME server, served when `listen.acme` is set.
    #[serde(default)]
    pub acme: AcmeSection,
    /// CA certificates for downstream CAs such as SPIRE servers, and their JWT authorities.
    #[serde(default)]
    pub downstream: DownstreamSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Address of the mTLS gRPC listener.
    pub grpc: SocketAddr,
    /// Address of the plain-HTTP listener for /metrics, /healthz and /readyz.
    pub metrics: SocketAddr,
    /// Address of the mTLS listener for Raft traffic between nodes. Other nodes reach this node
    /// at `raft_advertise`, or at this address when that is not set.
    pub raft: SocketAddr,
    /// Address other nodes use to reach this node's Raft listener, when it differs from `raft`.
    pub raft_advertise: Option<String>,
    /// Address of the HTTPS listener for ACME; no ACME server when unset.
    #[serde(default)]
    pub acme: Option<SocketAddr>,
    /// Local IP address that this node's connections to other nodes' Raft listeners bind to. When
    /// it is not set, the operating system chooses the source address from its routes.
    pub raft_source: Option<IpAddr>,
    /// DNS names in the node's own TLS server certificate.
    #[serde(default = "default_tls_dns_names")]
    pub tls_dns_names: Vec<String>,
    /// IP addresses in the node's own TLS server certificate.
    #[serde(default = "default_tls_ip_addresses")]
    pub tls_ip_addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmSection {
    /// Path of the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so.
    pub module: PathBuf,
    pub token_label: Option<String>,
    pub token_serial: Option<String>,
    /// File holding the user PIN; one trailing newline is ignored.
    pub pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN.
    pub pin_env: Option<String>,
    /// Sessions in the signing pool; 0 means two per CPU core.
    #[serde(default)]
    pub sessions: usize,
    /// Label of the AES-256 key-encryption key, marked trusted by the security officer, that every
    /// HSM of the cluster holds. When set, `sigil init` generates a CA key that can be wrapped
    /// under it (and only under a trusted key), so that `sigil hsm copy-ca-key` can copy it to the
    /// other nodes' HSMs. Leave it unset for a CA key that can never leave its HSM.
    #[serde(default)]
    pub kek_label: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaSection {
    /// CKA_LABEL of the intermediate CA's private key in the HSM.
    pub key_label: String,
    /// Key type that `sigil init` generates: ec-p256, ec-p384 or rsa-3072.
    #[serde(default = "default_key_type")]
    pub key_type: String,
    /// Subject common name of the intermediate CA that `sigil init` requests.
    #[serde(default = "default_ca_common_name")]
    pub common_name: String,
    /// Organization name written into the subject of issued certificates.
    #[serde(default = "default_organization")]
    pub organization: String,
    /// pathLenConstraint of the intermediate that `sigil init --dev-root` creates. 1 lets the
    /// intermediate sign downstream CAs (SPIRE servers) whose own path length is 0; 0 restricts it
    /// to leaves. An offline root decides this itself when it signs the intermediate's CSR.
    #[serde(default = "default_ca_path_len")]
    pub path_len: u8,
}

/// Limits on the CA certificates Sigil mints for downstream CAs. Which callers may mint, and for
/// which trust domains, is set per caller with `downstream_trust_domains`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownstreamSection {
    /// Maximum lifetime of a minted CA. A longer requested lifetime is shortened to it.
    #[serde(with = "humantime_serde", default = "default_downstream_max_ttl")]
    pub max_ttl: Duration,
    /// pathLenConstraint of minted CAs: 0 lets them sign only leaves.
    #[serde(default)]
    pub path_len: u8,
    /// Maximum number of JWT authorities per trust domain. Further publications are rejected
    /// until some expire.
    #[serde(default = "default_max_jwt_authorities")]
    pub max_jwt_authorities: usize,
}

impl Default for DownstreamSection {
    fn default() -> Self {
        DownstreamSection {
            max_ttl: default_downstream_max_ttl(),
            path_len: 0,
            max_jwt_authorities: default_max_jwt_authorities(),
        }
    }
}

/// Longest `downstream.max_ttl` a configuration may set.
pub const MAX_DOWNSTREAM_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuanceSection {
    /// TTL used when a request sets none.
    #[serde(with = "humantime_serde", default = "default_ttl")]
    pub default_ttl: Duration,
    /// How far notBefore is set back to tolerate clock skew between machines.
    #[serde(with = "humantime_serde", default = "default_backdate")]
    pub backdate: Duration,
    /// TTL of the node's own TLS server certificate, which it re-issues at half life.
    #[serde(with = "humantime_serde", default = "default_node_cert_ttl")]
    pub node_cert_ttl: Duration,
    /// How long issuance records are kept after their certificate expires. The node drops older
    /// records at start and every hour, in whole hours of expiry.
    #[serde(with = "humantime_serde", default = "default_retention")]
    pub retention: Duration,
}

/// Raft timing, batching and snapshot settings. The defaults suit a cluster on one network.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaftSection {
    /// Time between two Raft ticks.
    #[serde(with = "humantime_serde", default = "default_raft_tick")]
    pub tick: Duration,
    /// Ticks without a leader before a follower starts an election (randomized up to twice this).
    #[serde(default = "default_election_ticks")]
    pub election_ticks: usize,
    /// Ticks between two heartbeats of the leader.
    #[serde(default = "default_heartbeat_ticks")]
    pub heartbeat_ticks: usize,
    /// Time after which an issuance whose record is not committed fails with UNAVAILABLE.
    #[serde(with = "humantime_serde", default = "default_commit_timeout")]
    pub commit_timeout: Duration,
    /// Maximum time a record waits for others to share its Raft entry.
    #[serde(with = "humantime_serde", default)]
    pub batch_delay: Duration,
    /// Maximum number of records in one Raft entry.
    #[serde(default = "default_max_batch_records")]
    pub max_batch_records: usize,
    /// Applied entries between two snapshots.
    #[serde(default = "default_snapshot_interval")]
    pub snapshot_interval: u64,
    /// Bytes of applied entries after which a snapshot is taken even before `snapshot_interval`
    /// entries; about half of it stays in the log after compaction.
    #[serde(default = "default_snapshot_log_bytes")]
    pub snapshot_log_bytes: u64,
    /// Entries kept in the log before the latest snapshot for followers that are a little behind.
    #[serde(default = "default_log_entries_kept")]
    pub log_entries_kept: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeSection {
    /// External URL of this node's ACME server, without a path, such as
    /// `https://acme.example.net`. Defaults to `https://` and `listen.acme`.
    pub base_url: Option<String>,
    pub terms_of_service: Option<String>,
    pub website: Option<String>,
    #[serde(default)]
    pub caa_identities: Vec<String>,
    /// Require an external account binding in newAccount (`sigil acme eab add` makes keys).
    #[serde(default)]
    pub external_account_required: bool,
    /// DNS identifiers must equal or end in one of these names; empty allows any name.
    #[serde(default)]
    pub allowed_dns_suffixes: Vec<String>,
    /// IP identifiers must lie in one of these networks, such as "10.0.0.0/8"; empty refuses IP
    /// identifiers.
    #[serde(default)]
    pub allowed_ip_ranges: Vec<String>,
    /// Validity of certificates of the default profile, `tls-server`.
    #[serde(default = "default_acme_validity", with = "humantime_serde")]
    pub default_validity: Duration,
    /// Validity of certificates of the `short-lived` profile.
    #[serde(default = "default_acme_short_validity", with = "humantime_serde")]
    pub short_lived_validity: Duration,
    /// New orders one account may create per hour; 0 means no limit.
    #[serde(default = "default_orders_per_hour")]
    pub orders_per_account_per_hour: u32,
    /// HTTP URL of the issuing CA's certificate named in TLS server certificates; defaults to
    /// /ca/issuer.der on the metrics listener.
    pub ca_issuers_url: Option<String>,
    /// HTTP URL of the CRL named in TLS server certificates; defaults to /ca/crl.der on the metrics
    /// listener.
    pub crl_url: Option<String>,
    #[serde(default)]
    pub validation: AcmeValidationSection,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeValidationSection {
    /// Port http-01 validation connects to.
    #[serde(default = "default_http01_port")]
    pub http01_port: u16,
    /// Port tls-alpn-01 validation connects to.
    #[serde(default = "default_tls_alpn01_port")]
    pub tls_alpn01_port: u16,
    /// DNS server for validation lookups, such as "127.0.0.1:8053"; the system resolver when
    /// unset.
    pub resolver: Option<SocketAddr>,
    /// Answer every address lookup with these addresses instead of asking DNS (development only;
    /// TXT lookups then find nothing).
    #[serde(default)]
    pub resolve_to: Vec<IpAddr>,
    /// Allow validation to connect to loopback, private and link-local addresses.
    #[serde(default)]
    pub allow_private_addresses: bool,
    #[serde(default = "default_validation_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Validations that run at once.
    #[serde(default = "default_validation_workers")]
    pub workers: usize,
    /// Validations that may wait for a worker.
    #[serde(default = "default_validation_queue")]
    pub queue: usize,
}

impl Default for AcmeSection {
    fn default() -> Self {
        AcmeSection {
            base_url: None,
            terms_of_service: None,
            website: None,
            caa_identities: Vec::new(),
            external_account_required: false,
            allowed_dns_suffixes: Vec::new(),
            allowed_ip_ranges: Vec::new(),
            default_validity: default_acme_validity(),
            short_lived_validity: default_acme_short_validity(),
            orders_per_account_per_hour: default_orders_per_hour(),
            ca_issuers_url: None,
            crl_url: None,
            validation: AcmeValidationSection::default(),
        }
    }
}

impl Default for AcmeValidationSection {
    fn default() -> Self {
        AcmeValidationSection {
            http01_port: default_http01_port(),
            tls_alpn01_port: default_tls_alpn01_port(),
            resolver: None,
            resolve_to: Vec::new(),
            allow_private_addresses: false,
            timeout: default_validation_timeout(),
            workers: default_validation_workers(),
            queue: default_validation_queue(),
        }
    }
}

fn default_acme_validity() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

fn default_acme_short_validity() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_orders_per_hour() -> u32 {
    300
}

fn default_http01_port() -> u16 {
    80
}

fn default_tls_alpn01_port() -> u16 {
    443
}

fn default_validation_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_validation_workers() -> usize {
    16
}

fn default_validation_queue() -> usize {
    256
}

impl Default for RaftSection {
    fn default() -> Self {
        RaftSection {
            tick: default_raft_tick(),
            election_ticks: default_election_ticks(),
            heartbeat_ticks: default_heartbeat_ticks(),
            commit_timeout: default_commit_timeout(),
            batch_delay: Duration::ZERO,
            max_batch_records: default_max_batch_records(),
            snapshot_interval: default_snapshot_interval(),
            snapshot_log_bytes: default_snapshot_log_bytes(),
            log_entries_kept: default_log_entries_kept(),
        }
    }
}

fn default_raft_tick() -> Duration {
    Duration::from_millis(100)
}

fn default_election_ticks() -> usize {
    10
}

fn default_heartbeat_ticks() -> usize {
    2
}

fn default_commit_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_max_batch_records() -> usize {
    4096
}

fn default_snapshot_interval() -> u64 {
    20_000
}

fn default_snapshot_log_bytes() -> u64 {
    64 << 20
}

fn default_log_entries_kept() -> u64 {
    5_000
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// JSON-lines file for audit events; none disables the file (events still go to the log).
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter such as "info" or "sigil=debug,info"; RUST_LOG overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    #[serde(default)]
    pub mode: PolicyMode,
    #[serde(default)]
    pub callers: Vec<CallerPolicy>,
}

/// Enforce refuses what policy denies; monitor logs and audits the would-be denial and issues.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyMode {
    #[default]
    Enforce,
    Monitor,
}

/// Policy entry of one caller, named by the SPIFFE ID in its client certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerPolicy {
    pub spiffe_id: String,
    /// Patterns of SPIFFE IDs the caller may request: `*` matches one path segment, a final
    /// `/**` one or more.
    #[serde(default)]
    pub allowed_spiffe_ids: Vec<String>,
    /// Patterns of DNS names: `*` matches one label, a leading `**.` one or more.
    #[serde(default)]
    pub allowed_dns_names: Vec<String>,
    #[serde(with = "humantime_serde", default = "default_max_ttl")]
    pub max_ttl: Duration,
    /// Sustained issuance rate, certificates per second.
    #[serde(default = "default_rate")]
    pub rate_per_second: f64,
    /// Requests allowed at once above the sustained rate.
    #[serde(default = "default_burst")]
    pub rate_burst: u32,
    /// Whether the caller may use the Admin service.
    #[serde(default)]
    pub admin: bool,
    /// Trust domains, such as "example.org", the caller may mint downstream CA certificates for
    /// and publish JWT authorities of. A SPIRE server's entry names its own trust domain.
    #[serde(default)]
    pub downstream_trust_domains: Vec<String>,
}

fn default_tls_dns_names() -> Vec<String> {
    vec!["localhost".to_owned()]
}
fn default_tls_ip_addresses() -> Vec<IpAddr> {
    vec![IpAddr::from([127, 0, 0, 1])]
}
fn default_key_type() -> String {
    "ec-p256".to_owned()
}
fn default_ca_common_name() -> String {
    "Sigil Intermediate CA".to_owned()
}
fn default_organization() -> String {
    "Sigil".to_owned()
}
fn default_ca_path_len() -> u8 {
    1
}
fn default_downstream_max_ttl() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_max_jwt_authorities() -> usize {
    64
}
fn default_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_backdate() -> Duration {
    Duration::from_secs(30)
}
fn default_node_cert_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_log_level() -> String {
    "info".to_owned()
}
fn default_max_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_rate() -> f64 {
    100.0
}
fn default_burst() -> u32 {
    200
}

impl Default for IssuanceSection {
    fn default() -> Self {
        IssuanceSection {
            default_ttl: default_ttl(),
            backdate: default_backdate(),
            node_cert_ttl: default_node_cert_ttl(),
            retention: default_retention(),
        }
    }
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection { format: LogFormat::default(), level: default_log_level() }
    }
}

/// A configuration value that failed validation.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parse config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config value {key} = {value}: {reason}")]
    Invalid { key: String, value: String, reason: String },
}

/// Formats a duration as whole seconds, e.g. "7776000s", which reads unambiguously in errors.
/// Formats a duration from the file in whole seconds, or milliseconds below one second.
fn seconds(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        format!("{}ms", duration.as_millis())
    } else {
        format!("{}s", duration.as_secs())
    }
}

fn invalid(key: impl Into<String>, value: impl std::fmt::Debug, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), value: format!("{value:?}"), reason: reason.into() }
}

impl Config {
    /// Reads, parses and validates a configuration file.
    ///
    /// # Errors
    ///
    /// Names the file for I/O and syntax errors, and the key and value for invalid settings.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config: Config = toml::from_str(&text)
            .map_err(|error| ConfigError::Parse { path: path.to_owned(), message: error.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every invariant that serde cannot express.
    ///
    /// # Errors
    ///
    /// Returns the first invalid setting, naming its key and value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(invalid("node_id", self.node_id, "node IDs start at 1"));
        }
        check_trust_domain(&self.trust_domain)
            .map_err(|error| invalid("trust_domain", &self.trust_domain, error.to_string()))?;
        self.validate_hsm()?;
        self.validate_ca()?;
        self.validate_issuance()?;
        self.validate_policy()?;
        self.validate_listen()?;
        self.validate_raft()?;
        self.validate_acme()?;
        self.validate_downstream()?;
        Ok(())
    }

    fn validate_downstream(&self) -> Result<(), ConfigError> {
        let downstream = &self.downstream;
        if downstream.max_ttl < Duration::from_secs(3600) || downstream.max_ttl > MAX_DOWNSTREAM_TTL {
            return Err(invalid(
                "downstream.max_ttl",
                seconds(downstream.max_ttl),
                "must be between 1 hour and 365 days",
            ));
        }
        if downstream.max_jwt_authorities == 0 || downstream.max_jwt_authorities > 1024 {
            return Err(invalid(
                "downstream.max_jwt_authorities",
                downstream.max_jwt_authorities,
                "must be between 1 and 1024",
            ));
        }
        Ok(())
    }

    fn validate_acme(&self) -> Result<(), ConfigError> {
        let acme = &self.acme;
        for (key, validity) in
            [("acme.default_validity", acme.default_validity), ("acme.short_lived_validity", acme.short_lived_validity)]
        {
            if validity < Duration::from_secs(3600) || validity > MAX_CONFIGURABLE_TTL {
                return Err(invalid(key, seconds(validity), "must be between 1 hour and 30 days"));
            }
        }
        for (index, range) in acme.allowed_ip_ranges.iter().enumerate() {
            sigil_acme::IpRange::parse(range)
                .map_err(|reason| invalid(format!("acme.allowed_ip_ranges[{index}]"), range, reason))?;
        }
        if let Some(url) = &acme.base_url
            && (!url.starts_with("https://") || url.trim_start_matches("https://").contains('/'))
        {
            return Err(invalid("acme.base_url", url, "must be https://HOST[:PORT] without a path"));
        }
        for (key, url) in [("acme.ca_issuers_url", &acme.ca_issuers_url), ("acme.crl_url", &acme.crl_url)] {
            if let Some(url) = url
                && !url.starts_with("http://")
            {
                return Err(invalid(key, url, "must be an http:// URL, which relying parties fetch without TLS"));
            }
        }
        if acme.validation.workers == 0 {
            return Err(invalid("acme.validation.workers", acme.validation.workers, "must be at least 1"));
        }
        if acme.validation.timeout.is_zero() || acme.validation.timeout > Duration::from_secs(300) {
            return Err(invalid(
                "acme.validation.timeout",
                seconds(acme.validation.timeout),
                "must be more than 0 and at most 5 minutes",
            ));
        }
        Ok(())
    }

    fn validate_listen(&self) -> Result<(), ConfigError> {
        if let Some(source) = self.listen.raft_source
            && (source.is_unspecified() || source.is_multicast())
        {
            return Err(invalid(
                "listen.raft_source",
                source,
                "must be an address of this host, or leave the key out to let the operating system choose",
            ));
        }
        Ok(())
    }

    fn validate_raft(&self) -> Result<(), ConfigError> {
        let raft = &self.raft;
        if raft.tick < Duration::from_millis(10) || raft.tick > Duration::from_secs(10) {
            return Err(invalid("raft.tick", seconds(raft.tick), "must be between 10ms and 10s"));
        }
        if raft.heartbeat_ticks == 0 || raft.election_ticks <= raft.heartbeat_ticks {
            return Err(invalid(
                "raft.election_ticks",
                raft.election_ticks,
                format!("must be more than raft.heartbeat_ticks ({}), which must be at least 1", raft.heartbeat_ticks),
            ));
        }
        if raft.commit_timeout < raft.tick * 2 {
            return Err(invalid("raft.commit_timeout", seconds(raft.commit_timeout), "must be at least two ticks"));
        }
        if raft.batch_delay * 2 > raft.commit_timeout {
            return Err(invalid(
                "raft.batch_delay",
                format!("{}ms", raft.batch_delay.as_millis()),
                format!("must be at most half of raft.commit_timeout ({}ms)", raft.commit_timeout.as_millis()),
            ));
        }
        if raft.max_batch_records == 0 {
            return Err(invalid("raft.max_batch_records", raft.max_batch_records, "must be at least 1"));
        }
        if raft.snapshot_interval == 0 {
            return Err(invalid("raft.snapshot_interval", raft.snapshot_interval, "must be at least 1"));
        }
        if raft.snapshot_log_bytes < 1 << 20 {
            return Err(invalid(
                "raft.snapshot_log_bytes",
                raft.snapshot_log_bytes,
                "must be at least 1 MiB (1048576)",
            ));
        }
        Ok(())
    }

    fn validate_hsm(&self) -> Result<(), ConfigError> {
        let hsm = &self.hsm;
        match (&hsm.token_label, &hsm.token_serial) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "hsm.token_serial",
                    &hsm.token_serial,
                    "set token_label or token_serial, not both",
                ));
            }
            (None, None) => return Err(invalid("hsm.token_label", "", "set token_label or token_serial")),
            _ => {}
        }
        match (&hsm.pin_file, &hsm.pin_env) {
            (Some(_), Some(_)) => Err(invalid("hsm.pin_env", &hsm.pin_env, "set pin_file or pin_env, not both")),
            (None, None) => Err(invalid("hsm.pin_file", "", "set pin_file or pin_env")),
            _ => Ok(()),
        }
    }

    fn validate_ca(&self) -> Result<(), ConfigError> {
        if self.ca.key_label.is_empty() {
            return Err(invalid("ca.key_label", &self.ca.key_label, "the key label must not be empty"));
        }
        self.ca_key_type()?;
        Ok(())
    }

    fn validate_issuance(&self) -> Result<(), ConfigError> {
        let issuance = &self.issuance;
        if issuance.default_ttl.is_zero() || issuance.default_ttl > MAX_CONFIGURABLE_TTL {
            return Err(invalid(
                "issuance.default_ttl",
                seconds(issuance.default_ttl),
                "must be more than 0 and at most 30 days",
            ));
        }
        if issuance.backdate > Duration::from_secs(3600) {
            return Err(invalid("issuance.backdate", seconds(issuance.backdate), "must be at most 1 hour"));
        }
        if issuance.node_cert_ttl < Duration::from_secs(600) || issuance.node_cert_ttl > MAX_CONFIGURABLE_TTL {
            return Err(invalid(
                "issuance.node_cert_ttl",
                seconds(issuance.node_cert_ttl),
                "must be between 10 minutes and 30 days",
            ));
        }
        if issuance.retention < Duration::from_secs(3600) {
            return Err(invalid("issuance.retention", seconds(issuance.retention), "must be at least 1 hour"));
        }
        Ok(())
    }

    fn validate_policy(&self) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        for (index, caller) in self.policy.callers.iter().enumerate() {
            let key = |field: &str| format!("policy.callers[{index}].{field}");

            let id = SpiffeId::parse(&caller.spiffe_id)
                .map_err(|error| invalid(key("spiffe_id"), &caller.spiffe_id, error.to_string()))?;
            if !seen.insert(id.as_str().to_owned()) {
                return Err(invalid(
                    key("spiffe_id"),
                    &caller.spiffe_id,
                    "another caller entry has the same SPIFFE ID",
                ));
            }
            for pattern in &caller.allowed_spiffe_ids {
                let parsed = SpiffeIdPattern::parse(pattern)
                    .map_err(|reason| invalid(key("allowed_spiffe_ids"), pattern, reason))?;
                if parsed.trust_domain() != self.trust_domain {
                    return Err(invalid(
                        key("allowed_spiffe_ids"),
                        pattern,
                        format!("the pattern's trust domain differs from trust_domain {:?}", self.trust_domain),
                    ));
                }
            }
            for pattern in &caller.allowed_dns_names {
                DnsPattern::parse(pattern).map_err(|reason| invalid(key("allowed_dns_names"), pattern, reason))?;
            }
            if caller.max_ttl.is_zero() || caller.max_ttl > MAX_CONFIGURABLE_TTL {
                return Err(invalid(
                    key("max_ttl"),
                    seconds(caller.max_ttl),
                    "must be more than 0 and at most 30 days",
                ));
            }
            if !(caller.rate_per_second.is_finite() && caller.rate_per_second > 0.0) {
                return Err(invalid(key("rate_per_second"), caller.rate_per_second, "must be a positive number"));
            }
            if caller.rate_burst == 0 {
                return Err(invalid(key("rate_burst"), caller.rate_burst, "must be at least 1"));
            }
            for trust_domain in &caller.downstream_trust_domains {
                check_trust_domain(trust_domain)
                    .map_err(|error| invalid(key("downstream_trust_domains"), trust_domain, error.to_string()))?;
            }
        }
        Ok(())
    }

    /// Returns the configured CA key type.
    ///
    /// # Errors
    ///
    /// Names `ca.key_type` and its value when it is not one of the supported types.
    pub fn ca_key_type(&self) -> Result<KeyType, ConfigError> {
        self.ca
            .key_type
            .parse::<KeyType>()
            .map_err(|_| invalid("ca.key_type", &self.ca.key_type, "expected ec-p256, ec-p384 or rsa-3072"))
    }

    /// Returns the settings `sigil-hsm` needs to open the token.
    pub fn hsm_config(&self) -> HsmConfig {
        let token = match (&self.hsm.token_label, &self.hsm.token_serial) {
            (_, Some(serial)) => TokenSelector::Serial(serial.clone()),
            (Some(label), None) => TokenSelector::Label(label.clone()),
            // validate() rejects a configuration with neither; an empty label finds no token.
            (None, None) => TokenSelector::Label(String::new()),
        };
        HsmConfig { module: self.hsm.module.clone(), token, sessions: self.hsm.sessions }
    }

    /// Reads the HSM PIN from the configured file or environment variable.
    ///
    /// # Errors
    ///
    /// Names the file or variable, never the PIN.
    pub fn hsm_pin(&self) -> Result<Pin, sigil_hsm::HsmError> {
        match (&self.hsm.pin_file, &self.hsm.pin_env) {
            (Some(path), _) => Pin::from_file(path),
            (None, Some(var)) => Pin::from_env(var),
            (None, None) => Pin::from_env("SIGIL_HSM_PIN"),
        }
    }

    /// Returns the path of the node's ledger database.
    pub fn ledger_path(&self) -> PathBuf {
        self.data_dir.join("ledger")
    }

    /// Returns the folder of the node's TLS identity for Raft traffic.
    pub fn node_tls_path(&self) -> PathBuf {
        self.data_dir.join("node-tls")
    }

    /// Returns the address other nodes use for this node's Raft listener.
    pub fn raft_address(&self) -> String {
        self.listen.raft_advertise.clone().unwrap_or_else(|| self.listen.raft.to_string())
    }

    /// Returns the Raft node settings for this node.
    pub fn raft_node_config(&self) -> sigil_raft::NodeConfig {
        let mut node = sigil_raft::NodeConfig::new(self.node_id);
        node.tick_interval = self.raft.tick;
        node.election_ticks = self.raft.election_ticks;
        node.heartbeat_ticks = self.raft.heartbeat_ticks;
        node.proposal_timeout = self.raft.commit_timeout;
        node.retry_interval = self.raft.tick * self.raft.election_ticks as u32;
        node.batch_delay = self.raft.batch_delay;
        node.max_batch_proposals = self.raft.max_batch_records;
        node.snapshot_interval = self.raft.snapshot_interval;
        node.snapshot_log_bytes = self.raft.snapshot_log_bytes;
        node.log_entries_kept = self.raft.log_entries_kept;
        node
    }

    /// Returns the SPIFFE ID the node puts in its own TLS certificate.
    pub fn node_spiffe_id(&self) -> String {
        format!("spiffe://{}/sigil/node/{}", self.trust_domain, self.node_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"
node_id = 1
trust_domain = "example.org"
data_dir = "/tmp/sigil"

[listen]
grpc = "127.0.0.1:8443"
metrics = "127.0.0.1:9090"
raft = "127.0.0.1:8444"

[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "sigil"
pin_env = "SIGIL_HSM_PIN"

[ca]
key_label = "sigil-intermediate"

[[policy.callers]]
spiffe_id = "spiffe://example.org/admin"
allowed_spiffe_ids = ["spiffe://example.org/**"]
allowed_dns_names = ["*.example.org"]
max_ttl = "2h"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: "test.toml".into(), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn valid_config_loads_with_defaults() {
        let config = parse(VALID).expect("valid");
        assert_eq!(config.issuance.default_ttl, Duration::from_secs(3600));
        assert_eq!(config.issuance.backdate, Duration::from_secs(30));
        assert_eq!(config.policy.mode, PolicyMode::Enforce);
        assert_eq!(config.policy.callers[0].max_ttl, Duration::from_secs(7200));
        assert_eq!(config.node_spiffe_id(), "spiffe://example.org/sigil/node/1");
    }

    #[test]
    fn invalid_values_name_key_and_value() {
        let cases = [
            ("node id zero", "node_id = 1", "node_id = 0", "node_id", "0"),
            (
                "trust domain",
                r#"trust_domain = "example.org""#,
                r#"trust_domain = "Example.org""#,
                "trust_domain",
                "Example.org",
            ),
            (
                "key type",
                r#"key_label = "sigil-intermediate""#,
                "key_label = \"k\"\nkey_type = \"ec-p521\"",
                "ca.key_type",
                "ec-p521",
            ),
            (
                "caller id",
                r#"spiffe_id = "spiffe://example.org/admin""#,
                r#"spiffe_id = "spiffe://example.org/admin/""#,
                "policy.callers[0].spiffe_id",
                "admin/",
            ),
            (
                "pattern domain",
                r#"["spiffe://example.org/**"]"#,
                r#"["spiffe://other.org/**"]"#,
                "allowed_spiffe_ids",
                "other.org",
            ),
            ("dns pattern", r#"["*.example.org"]"#, r#"["a.*.example.org"]"#, "allowed_dns_names", "a.*.example.org"),
            ("max ttl", r#"max_ttl = "2h""#, r#"max_ttl = "90days""#, "max_ttl", "7776000s"),
            ("both pins", r#"pin_env = "SIGIL_HSM_PIN""#, "pin_env = \"X\"\npin_file = \"/x\"", "hsm.pin_env", "X"),
            (
                "raft source",
                r#"raft = "127.0.0.1:8444""#,
                "raft = \"127.0.0.1:8444\"\nraft_source = \"0.0.0.0\"",
                "listen.raft_source",
                "0.0.0.0",
            ),
        ];
        for (name, from, to, key, value) in cases {
            let text = VALID.replacen(from, to, 1);
            assert_ne!(text, VALID, "{name}: replacement did not apply");
            let error = parse(&text).expect_err(name).to_string();
            assert!(error.contains(key), "{name}: {error:?} lacks key {key:?}");
            assert!(error.contains(value), "{name}: {error:?} lacks value {value:?}");
        }
    }

    #[test]
    fn raft_source_is_optional() {
        assert_eq!(parse(VALID).expect("valid").listen.raft_source, None);
        let text =
            VALID.replacen("raft = \"127.0.0.1:8444\"", "raft = \"127.0.1.2:8444\"\nraft_source = \"127.0.1.2\"", 1);
        let config = parse(&text).expect("valid with raft_source");
        assert_eq!(config.listen.raft_source, Some(IpAddr::from([127, 0, 1, 2])));
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let text = VALID.replacen("[listen]", "[listen]\ngrcp = \"127.0.0.1:1\"", 1);
        let error = parse(&text).expect_err("unknown key").to_string();
        assert!(error.contains("grcp"), "{error}");
    }
}
