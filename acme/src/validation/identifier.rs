//! The identifier a challenge validates, checked before it is put in a
//! URL, a DNS query or a TLS server name.

use std::fmt;
use std::net::IpAddr;

use crate::problem::{Problem, ProblemType};
use crate::types::{ChallengeType, Identifier};

/// A validated identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    /// A DNS name in lowercase, without a trailing dot and, for a wildcard
    /// identifier, without the leading `*.`.
    Name(String),
    Ip(IpAddr),
}

impl Target {
    /// Checks that `identifier` is well formed and that `challenge` can
    /// validate it: dns-01 cannot validate IP addresses (RFC 8738, section
    /// 7), and only dns-01 can validate wildcards because there is no host
    /// to connect to.
    pub(super) fn parse(identifier: &Identifier, challenge: ChallengeType) -> Result<Target, Problem> {
        match identifier.kind.as_str() {
            "dns" => parse_name(&identifier.value, challenge),
            "ip" => parse_ip(&identifier.value, challenge),
            other => Err(Problem::new(
                ProblemType::UnsupportedIdentifier,
                format!("identifier type {other:?} is not supported; supported types are \"dns\" and \"ip\""),
            )),
        }
    }

    /// Returns the host part of a URL: the name, the IPv4 address or the IPv6
    /// address in brackets.
    pub(super) fn url_host(&self) -> String {
        match self {
            Target::Name(name) => name.clone(),
            Target::Ip(IpAddr::V4(v4)) => v4.to_string(),
            Target::Ip(IpAddr::V6(v6)) => format!("[{v6}]"),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Name(name) => formatter.write_str(name),
            Target::Ip(address) => write!(formatter, "{address}"),
        }
    }
}

fn parse_name(value: &str, challenge: ChallengeType) -> Result<Target, Problem> {
    let (wildcard, base) = match value.strip_prefix("*.") {
        Some(base) => (true, base),
        None => (false, value),
    };
    if wildcard && challenge != ChallengeType::Dns01 {
        return Err(Problem::malformed(format!(
            "wildcard identifier {value:?} cannot be validated with {}; only dns-01 validates wildcards",
            challenge.as_str()
        )));
    }

    let name = base.strip_suffix('.').unwrap_or(base).to_ascii_lowercase();
    match dns_name_error(&name) {
        None => Ok(Target::Name(name)),
        Some(reason) => {
            Err(Problem::new(ProblemType::RejectedIdentifier, format!("invalid DNS identifier {value:?}: {reason}")))
        }
    }
}

/// Returns why `name` is not a host name of letters, digits and hyphens
/// (RFC 1123, section 2.1), or `None` when it is one.
pub(super) fn dns_name_error(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("the name is empty".to_owned());
    }
    if name.len() > 253 {
        return Some(format!("the name is {} characters long, the maximum is 253", name.len()));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Some(format!("label {label:?} must be 1 to 63 characters long"));
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Some(format!("label {label:?} contains a character other than a letter, a digit or '-'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some(format!("label {label:?} starts or ends with '-'"));
        }
    }
    None
}

fn parse_ip(value: &str, challenge: ChallengeType) -> Result<Target, Problem> {
    if challenge == ChallengeType::Dns01 {
        return Err(Problem::malformed(format!(
            "IP identifier {value:?} cannot be validated with dns-01 (RFC 8738, section 7); use http-01 or tls-alpn-01"
        )));
    }
    match value.parse::<IpAddr>() {
        Ok(address) => Ok(Target::Ip(address)),
        Err(_) => Err(Problem::new(
            ProblemType::RejectedIdentifier,
            format!("invalid IP identifier {value:?}: not an IPv4 or IPv6 address"),
        )),
    }
}
