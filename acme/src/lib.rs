//! An ACME server (RFC 8555) for Sigil.
//!
//! The crate knows nothing of Raft, HSMs or Sigil's ledger. It is generic
//! over a [`store::Store`], a transactional key-value store whose commits
//! are linearizable across every node that serves ACME, and over an
//! [`issuer::Issuer`], which checks CSRs and signs certificates.

mod accounts;
mod authz;
pub mod b64;
pub mod certs;
pub mod client;
pub mod eab;
pub mod identifiers;
pub mod issuer;
pub mod jwk;
pub mod jws;
pub mod nonce;
mod orders;
pub mod problem;
mod records;
mod server;
pub mod session;
pub mod settings;
pub mod store;
pub mod types;
pub mod validation;

pub use issuer::{CsrSummary, IssueRequest, IssuedCertificate, Issuer, ProfileInfo};
pub use problem::{Problem, ProblemType, Subproblem};
pub use records::EabRecord;
pub use server::AcmeServer;
pub use settings::{AcmeSettings, IpRange};
pub use store::{Store, StoreError, Transaction, Versioned, Write};
pub use types::Identifier;
