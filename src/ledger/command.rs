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
    #[prost(oneof = "CommandKind", tags = "1, 2, 3")]
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
}

/// Installs a new CA chain version and makes it the active one.
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
    /// SPIFFE ID in the certificate's URI SAN.
    #[prost(string, tag = "2")]
    pub spiffe_id: String,
    /// The certificate's notAfter in Unix seconds.
    #[prost(int64, tag = "3")]
    pub not_after_unix: i64,
    #[prost(int64, tag = "4")]
    pub issued_at_unix: i64,
    /// SPIFFE ID of the requester.
    #[prost(string, tag = "5")]
    pub caller: String,
    /// Name of the signing profile used.
    #[prost(string, tag = "6")]
    pub profile: String,
    /// SHA-256 of the certificate DER, 32 bytes.
    #[prost(bytes = "vec", tag = "7")]
    pub cert_sha256: Vec<u8>,
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
        validate_spiffe_id("spiffe_id", &self.spiffe_id)?;
        validate_spiffe_id("caller", &self.caller)?;
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
