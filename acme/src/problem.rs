//! ACME problem documents (RFC 8555, section 6.7; RFC 7807).
//!
//! Every refusal of the server is a [`Problem`]: a type from the ACME
//! error namespace, a detail that names the bad value, an HTTP status and,
//! for orders with several identifiers, one subproblem per identifier.

use serde::{Deserialize, Serialize};

use crate::types::Identifier;

/// The ACME error types this server uses, without the
/// `urn:ietf:params:acme:error:` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemType {
    AccountDoesNotExist,
    AlreadyReplaced,
    AlreadyRevoked,
    BadCsr,
    BadNonce,
    BadPublicKey,
    BadRevocationReason,
    BadSignatureAlgorithm,
    Caa,
    Compound,
    Connection,
    Dns,
    ExternalAccountRequired,
    IncorrectResponse,
    InvalidContact,
    InvalidProfile,
    Malformed,
    OrderNotReady,
    RateLimited,
    RejectedIdentifier,
    ServerInternal,
    Tls,
    Unauthorized,
    UnsupportedContact,
    UnsupportedIdentifier,
    UserActionRequired,
}

impl ProblemType {
    /// Returns the full URN of this type.
    pub fn urn(self) -> &'static str {
        match self {
            ProblemType::AccountDoesNotExist => "urn:ietf:params:acme:error:accountDoesNotExist",
            ProblemType::AlreadyReplaced => "urn:ietf:params:acme:error:alreadyReplaced",
            ProblemType::AlreadyRevoked => "urn:ietf:params:acme:error:alreadyRevoked",
            ProblemType::BadCsr => "urn:ietf:params:acme:error:badCSR",
            ProblemType::BadNonce => "urn:ietf:params:acme:error:badNonce",
            ProblemType::BadPublicKey => "urn:ietf:params:acme:error:badPublicKey",
            ProblemType::BadRevocationReason => "urn:ietf:params:acme:error:badRevocationReason",
            ProblemType::BadSignatureAlgorithm => "urn:ietf:params:acme:error:badSignatureAlgorithm",
            ProblemType::Caa => "urn:ietf:params:acme:error:caa",
            ProblemType::Compound => "urn:ietf:params:acme:error:compound",
            ProblemType::Connection => "urn:ietf:params:acme:error:connection",
            ProblemType::Dns => "urn:ietf:params:acme:error:dns",
            ProblemType::ExternalAccountRequired => "urn:ietf:params:acme:error:externalAccountRequired",
            ProblemType::IncorrectResponse => "urn:ietf:params:acme:error:incorrectResponse",
            ProblemType::InvalidContact => "urn:ietf:params:acme:error:invalidContact",
            ProblemType::InvalidProfile => "urn:ietf:params:acme:error:invalidProfile",
            ProblemType::Malformed => "urn:ietf:params:acme:error:malformed",
            ProblemType::OrderNotReady => "urn:ietf:params:acme:error:orderNotReady",
            ProblemType::RateLimited => "urn:ietf:params:acme:error:rateLimited",
            ProblemType::RejectedIdentifier => "urn:ietf:params:acme:error:rejectedIdentifier",
            ProblemType::ServerInternal => "urn:ietf:params:acme:error:serverInternal",
            ProblemType::Tls => "urn:ietf:params:acme:error:tls",
            ProblemType::Unauthorized => "urn:ietf:params:acme:error:unauthorized",
            ProblemType::UnsupportedContact => "urn:ietf:params:acme:error:unsupportedContact",
            ProblemType::UnsupportedIdentifier => "urn:ietf:params:acme:error:unsupportedIdentifier",
            ProblemType::UserActionRequired => "urn:ietf:params:acme:error:userActionRequired",
        }
    }

    /// Returns the HTTP status a problem of this type is sent with.
    pub fn status(self) -> u16 {
        match self {
            ProblemType::AccountDoesNotExist => 400,
            ProblemType::AlreadyReplaced => 409,
            ProblemType::Unauthorized => 403,
            ProblemType::OrderNotReady => 403,
            ProblemType::RateLimited => 429,
            ProblemType::ServerInternal => 500,
            _ => 400,
        }
    }
}

/// One problem document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub detail: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub subproblems: Vec<Subproblem>,
    /// The accepted JWS algorithms, in a badSignatureAlgorithm problem.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub algorithms: Vec<String>,
    /// Seconds to wait before a retry, sent as `Retry-After` (rateLimited).
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

/// A problem about one identifier of a request (RFC 8555, section 6.7.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subproblem {
    #[serde(rename = "type")]
    pub kind: String,
    pub detail: String,
    pub identifier: Identifier,
}

impl Problem {
    pub fn new(kind: ProblemType, detail: impl Into<String>) -> Problem {
        Problem {
            kind: kind.urn().to_owned(),
            detail: detail.into(),
            status: kind.status(),
            subproblems: Vec::new(),
            algorithms: Vec::new(),
            retry_after: None,
        }
    }

    pub fn malformed(detail: impl Into<String>) -> Problem {
        Problem::new(ProblemType::Malformed, detail)
    }

    pub fn unauthorized(detail: impl Into<String>) -> Problem {
        Problem::new(ProblemType::Unauthorized, detail)
    }

    pub fn internal(detail: impl Into<String>) -> Problem {
        Problem::new(ProblemType::ServerInternal, detail)
    }

    /// Sets the HTTP status, for the few responses whose status is not the
    /// type's usual one (404 for an unknown resource, 405, 409, 413).
    pub fn with_status(mut self, status: u16) -> Problem {
        self.status = status;
        self
    }

    /// Gathers per-identifier problems under one problem. A single
    /// subproblem is returned as the problem itself, with the identifier
    /// named in the detail.
    pub fn compound(detail: impl Into<String>, mut subproblems: Vec<Subproblem>) -> Problem {
        if subproblems.len() == 1 {
            let only = subproblems.remove(0);
            let mut problem = Problem {
                kind: only.kind.clone(),
                detail: only.detail.clone(),
                status: 400,
                subproblems: vec![only],
                algorithms: Vec::new(),
                retry_after: None,
            };
            problem.status = status_of_urn(&problem.kind);
            return problem;
        }
        Problem { subproblems, ..Problem::new(ProblemType::Compound, detail) }
    }

    /// True when this problem has the given type.
    pub fn is(&self, kind: ProblemType) -> bool {
        self.kind == kind.urn()
    }
}

impl Subproblem {
    pub fn new(kind: ProblemType, identifier: Identifier, detail: impl Into<String>) -> Subproblem {
        Subproblem { kind: kind.urn().to_owned(), detail: detail.into(), identifier }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}: {}", self.kind, self.detail)
    }
}

impl std::error::Error for Problem {}

fn status_of_urn(urn: &str) -> u16 {
    match urn.strip_prefix("urn:ietf:params:acme:error:") {
        Some("unauthorized" | "orderNotReady") => 403,
        Some("rateLimited") => 429,
        Some("serverInternal") => 500,
        _ => 400,
    }
}
