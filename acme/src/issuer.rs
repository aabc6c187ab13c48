//! The issuer that checks CSRs and signs certificates for the ACME server.

use std::future::Future;

use time::OffsetDateTime;

use crate::problem::Problem;
use crate::types::Identifier;

/// The identifiers and key of a CSR that passed the issuer's checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrSummary {
    /// The CSR's names: dns values in lower case without a trailing dot,
    /// ip values in canonical text form.
    pub identifiers: Vec<Identifier>,
    /// DER SubjectPublicKeyInfo of the CSR's key.
    pub spki_der: Vec<u8>,
}

/// A certificate profile offered in the directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileInfo {
    pub name: String,
    pub description: String,
}

pub struct IssueRequest<'a> {
    pub csr_der: &'a [u8],
    pub identifiers: &'a [Identifier],
    pub profile: &'a str,
    /// The account URL, recorded as the requester.
    pub account: &'a str,
    /// The latest notAfter the order allows, if it limits it.
    pub not_after: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// DER of the leaf.
    pub leaf_der: Vec<u8>,
    /// Chains that verify the leaf, the preferred one first, each listing
    /// the intermediates from the leaf's issuer up, without the root.
    pub chains: Vec<Vec<Vec<u8>>>,
    pub serial: Vec<u8>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

pub trait Issuer: Send + Sync + 'static {
    /// Parses `csr_der` and runs every check that does not depend on the
    /// order (signature, key type and size, name syntax). A refusal is a
    /// badCSR problem naming the bad value.
    fn check_csr(&self, csr_der: &[u8]) -> Result<CsrSummary, Problem>;

    /// Signs a certificate for the request and commits its issuance record
    /// before returning.
    fn issue(&self, request: IssueRequest<'_>) -> impl Future<Output = Result<IssuedCertificate, Problem>> + Send;

    /// The profiles newOrder accepts; the first is the default.
    fn profiles(&self) -> Vec<ProfileInfo>;

    /// DER certificates of the roots clients should trust.
    fn roots(&self) -> Vec<Vec<u8>>;
}
