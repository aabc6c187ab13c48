//! Ledger commands and the records they store, encoded with protobuf.
//!
//! The encoded bytes of a [`Command`] are what the ledger applies, chains
//! into its digest and, later, what Raft replicates. Field tags must
//! therefore never be reused for another meaning.

use super::error::LedgerError;

/// Maximum serial length in bytes (RFC 5280, section 4.1.2.2).
pub const MAX_SERIAL_LEN: usize = 20;

/// Maximum length in bytes of a SPIFFE ID (SPIFFE ID specification, section 2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Maximum length in bytes of an HSM key label or a signing profile name.
pub const MAX_LABEL_LEN: usize = 256;

/// One command for the ledger state machine.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Command {
    #[prost(oneof = "CommandKind", tags = "1, 2, 3, 4")]
    pub kind: Option<CommandKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum CommandKind {
    #[prost(message, tag = "1")]
    InstallCa(InstallCa),
    #[prost(message, tag = "2")]
    RecordIssuances(RecordIssuances),
    #[prost(message, tag = "3")]
    PurgeExpired(PurgeExpired),
    #[prost(message, tag = "4")]
    KvTransaction(KvTransaction),
}

/// Installs a new CA chain version. It becomes the active one at once, unless it sets
/// `activate_at_unix`: then it is prepared, published in the trust bundle, and signs from that time.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InstallCa {
    /// Label of the intermediate's private key in the HSM.
    #[prost(string, tag = "1")]
    pub key_label: String,
    /// DER certificates of the intermediates, the issuing (leaf-most) one first.
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub intermediates_der: Vec<Vec<u8>>,
    /// DER certificates of the trusted roots.
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub roots_der: Vec<Vec<u8>>,
    #[prost(int64, tag = "4")]
    pub installed_at_unix: i64,
    /// Time the version starts to sign, in Unix seconds; 0 makes it active at once.
    #[prost(int64, tag = "5")]
    pub activate_at_unix: i64,
    /// The intermediate's private key wrapped under the cluster's key-encryption key, so that
    /// every node can unwrap it into its own HSM; empty when the nodes already hold the key.
    #[prost(bytes = "vec", tag = "6")]
    pub wrapped_key: Vec<u8>,
}

/// Records issued certificates, all or nothing: one invalid record, or one
/// whose serial is stored with other content, rejects the whole command. A
/// record identical to a stored one is skipped, so a retried command succeeds.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RecordIssuances {
    #[prost(message, repeated, tag = "1")]
    pub records: Vec<IssuanceRecord>,
}

/// Drops the records of certificates that expired before a time.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PurgeExpired {
    /// Unix seconds. Only whole expiry buckets (hours) before this time are
    /// dropped, so records expiring in its hour stay until a later purge.
    #[prost(int64, tag = "1")]
    pub expired_before_unix: i64,
}

/// The record of one issued certificate.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct IssuanceRecord {
    /// Certificate serial number as DER integer content bytes, 1 to 20 bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub serial: Vec<u8>,
    /// SPIFFE ID in the certificate's URI SAN; empty for a certificate
    /// without one, such as an ACME TLS server certificate.
    #[prost(string, tag = "2")]
    pub spiffe_id: String,
    /// The certificate's notAfter in Unix seconds.
    #[prost(int64, tag = "3")]
    pub not_after_unix: i64,
    #[prost(int64, tag = "4")]
    pub issued_at_unix: i64,
    /// The requester: a SPIFFE ID, or the URL of an ACME account.
    #[prost(string, tag = "5")]
    pub caller: String,
    /// Name of the signing profile used.
    #[prost(string, tag = "6")]
    pub profile: String,
    /// SHA-256 of the certificate DER, 32 bytes.
    #[prost(bytes = "vec", tag = "7")]
    pub cert_sha256: Vec<u8>,
}

/// Writes to the key-value space, all or none: every condition must hold
/// when the transaction applies. Services above the ledger (ACME) keep
/// their state here and use the conditions for compare-and-set.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KvTransaction {
    #[prost(message, repeated, tag = "1")]
    pub conditions: Vec<KvCondition>,
    #[prost(message, repeated, tag = "2")]
    pub writes: Vec<KvWrite>,
}

/// Requires a key to be at a revision, or absent when `revision` is 0.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KvCondition {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub revision: u64,
}

/// Puts or deletes one key.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KvWrite {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    #[prost(bool, tag = "3")]
    pub delete: bool,
    /// Unix seconds after which a purge may drop the key; 0 keeps it until
    /// it is deleted.
    #[prost(int64, tag = "4")]
    pub expires_unix: i64,
}

/// A stored key-value entry.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct KvValue {
    #[prost(bytes = "vec", tag = "1")]
    pub value: Vec<u8>,
    /// The revision of the transaction that wrote it. Revisions start at 1
    /// and increase by one per accepted transaction.
    #[prost(uint64, tag = "2")]
    pub revision: u64,
    #[prost(int64, tag = "3")]
    pub expires_unix: i64,
}

/// One stored version of the CA chain.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CaVersion {
    /// Version number, starting at 1 and increasing by one per install.
    #[prost(uint64, tag = "1")]
    pub version: u64,
    #[prost(string, tag = "2")]
    pub key_label: String,
    /// DER certificates of the intermediates, the issuing (leaf-most) one first.
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub intermediates_der: Vec<Vec<u8>>,
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub roots_der: Vec<Vec<u8>>,
    #[prost(int64, tag = "5")]
    pub installed_at_unix: i64,
    /// Ledger index of the command that installed this version.
    #[prost(uint64, tag = "6")]
    pub installed_at_index: u64,
    /// Time the version starts to sign, in Unix seconds; 0 for a version active since install.
    #[prost(int64, tag = "7")]
    pub activate_at_unix: i64,
    /// The intermediate's private key wrapped under the key-encryption key, or empty.
    #[prost(bytes = "vec", tag = "8")]
    pub wrapped_key: Vec<u8>,
}

impl Command {
    pub fn install_ca(install: InstallCa) -> Self {
        Command { kind: Some(CommandKind::InstallCa(install)) }
    }

    pub fn record_issuances(records: Vec<IssuanceRecord>) -> Self {
        Command { kind: Some(CommandKind::RecordIssuances(RecordIssuances { records })) }
    }

    pub fn purge_expired(expired_before_unix: i64) -> Self {
        Command { kind: Some(CommandKind::PurgeExpired(PurgeExpired { expired_before_unix })) }
    }

    pub fn kv_transaction(transaction: KvTransaction) -> Self {
        Command { kind: Some(CommandKind::KvTransaction(transaction)) }
    }
}

/// Maximum length in bytes of a key-value key.
pub const MAX_KV_KEY_LEN: usize = 512;

/// Maximum length in bytes of a key-value value.
pub const MAX_KV_VALUE_LEN: usize = 256 * 1024;

/// Maximum number of conditions, and of writes, in one transaction.
pub const MAX_KV_OPERATIONS: usize = 256;

impl KvTransaction {
    /// Checks sizes and that no key is written twice.
    pub fn validate(&self) -> Result<(), LedgerError> {
        if self.writes.is_empty() {
            return Err(invalid_kv("the transaction contains no writes".to_owned()));
        }
        if self.conditions.len() > MAX_KV_OPERATIONS || self.writes.len() > MAX_KV_OPERATIONS {
            return Err(invalid_kv(format!(
                "{} conditions and {} writes, more than {MAX_KV_OPERATIONS} of either",
                self.conditions.len(),
                self.writes.len()
            )));
        }
        for key in
            self.conditions.iter().map(|condition| &condition.key).chain(self.writes.iter().map(|write| &write.key))
        {
            validate_kv_key(key)?;
        }
        let mut written = std::collections::HashSet::new();
        for write in &self.writes {
            if !written.insert(write.key.as_slice()) {
                return Err(invalid_kv(format!("key {} is written twice", printable_key(&write.key))));
            }
            if write.value.len() > MAX_KV_VALUE_LEN {
                return Err(invalid_kv(format!(
                    "value of key {} is {} bytes, more than {MAX_KV_VALUE_LEN}",
                    printable_key(&write.key),
                    write.value.len()
                )));
            }
            if write.expires_unix < 0 {
                return Err(invalid_kv(format!("key {} expires before the Unix epoch", printable_key(&write.key))));
            }
        }
        Ok(())
    }
}

/// Shows a key as text when it is printable ASCII, else as hex.
pub fn printable_key(key: &[u8]) -> String {
    if key.iter().all(|byte| byte.is_ascii_graphic()) {
        String::from_utf8_lossy(key).into_owned()
    } else {
        format!("0x{}", hex::encode(key))
    }
}

fn validate_kv_key(key: &[u8]) -> Result<(), LedgerError> {
    if key.is_empty() || key.len() > MAX_KV_KEY_LEN {
        return Err(invalid_kv(format!("key length {} is outside 1..={MAX_KV_KEY_LEN} bytes", key.len())));
    }
    Ok(())
}

fn invalid_kv(reason: String) -> LedgerError {
    LedgerError::InvalidCommand { command: "kv_transaction", reason }
}

impl IssuanceRecord {
    /// Checks the fields that do not depend on ledger state.
    pub fn validate(&self) -> Result<(), LedgerError> {
        if self.serial.is_empty() || self.serial.len() > MAX_SERIAL_LEN {
            return Err(invalid_record(
                "serial",
                format!(
                    "length {} of serial {} is outside 1..={MAX_SERIAL_LEN} bytes",
                    self.serial.len(),
                    hex::encode(&self.serial)
                ),
            ));
        }
        if !self.spiffe_id.is_empty() {
            validate_spiffe_id("spiffe_id", &self.spiffe_id)?;
        }
        validate_caller(&self.caller)?;
        if self.not_after_unix < 0 {
            return Err(invalid_record("not_after_unix", format!("{} is before the Unix epoch", self.not_after_unix)));
        }
        if self.issued_at_unix > self.not_after_unix {
            return Err(invalid_record(
                "issued_at_unix",
                format!("{} is after not_after_unix {}", self.issued_at_unix, self.not_after_unix),
            ));
        }
        if self.profile.is_empty() || self.profile.len() > MAX_LABEL_LEN {
            return Err(invalid_record(
                "profile",
                format!("length {} is outside 1..={MAX_LABEL_LEN} bytes", self.profile.len()),
            ));
        }
        if self.cert_sha256.len() != 32 {
            return Err(invalid_record("cert_sha256", format!("expected 32 bytes, found {}", self.cert_sha256.len())));
        }
        Ok(())
    }
}

impl CaVersion {
    /// Returns true when `install` names the same key and chain as this
    /// version. The install time is not compared, so a retried install
    /// matches.
    pub(crate) fn has_chain_of(&self, install: &InstallCa) -> bool {
        self.key_label == install.key_label
            && self.intermediates_der == install.intermediates_der
            && self.roots_der == install.roots_der
    }
}

impl InstallCa {
    /// Checks that every field is present. The certificates are not parsed
    /// here, so callers must verify the chain before they install it.
    pub fn validate(&self) -> Result<(), LedgerError> {
        if self.key_label.is_empty() || self.key_label.len() > MAX_LABEL_LEN {
            return Err(invalid_install(format!(
                "key_label length {} is outside 1..={MAX_LABEL_LEN} bytes",
                self.key_label.len()
            )));
        }
        validate_certificates("intermediates_der", &self.intermediates_der)?;
        validate_certificates("roots_der", &self.roots_der)
    }
}

fn validate_spiffe_id(field: &'static str, value: &str) -> Result<(), LedgerError> {
    if !value.starts_with("spiffe://") {
        return Err(invalid_record(field, format!("{value:?} does not start with spiffe://")));
    }
    if value.len() > MAX_SPIFFE_ID_LEN {
        return Err(invalid_record(field, format!("length {} exceeds {MAX_SPIFFE_ID_LEN} bytes", value.len())));
    }
    Ok(())
}

fn validate_caller(value: &str) -> Result<(), LedgerError> {
    if value.starts_with("spiffe://") {
        return validate_spiffe_id("caller", value);
    }
    if !value.starts_with("https://") {
        return Err(invalid_record("caller", format!("{value:?} is neither a SPIFFE ID nor an https:// account URL")));
    }
    if value.len() > MAX_SPIFFE_ID_LEN {
        return Err(invalid_record("caller", format!("length {} exceeds {MAX_SPIFFE_ID_LEN} bytes", value.len())));
    }
    Ok(())
}

fn validate_certificates(field: &str, certificates: &[Vec<u8>]) -> Result<(), LedgerError> {
    if certificates.is_empty() {
        return Err(invalid_install(format!("{field} is empty")));
    }
    if let Some(position) = certificates.iter().position(Vec::is_empty) {
        return Err(invalid_install(format!("{field}[{position}] is an empty certificate")));
    }
    Ok(())
}

fn invalid_record(field: &'static str, reason: String) -> LedgerError {
    LedgerError::InvalidRecord { field, reason }
}

fn invalid_install(reason: String) -> LedgerError {
    LedgerError::InvalidCommand { command: "install_ca", reason }
}
