//! SPIFFE ID syntax, as the SPIFFE ID specification defines it.

use std::fmt;

/// Maximum length of a SPIFFE ID in bytes.
const MAX_ID_BYTES: usize = 2048;
/// Maximum length of a trust domain name in bytes.
const MAX_TRUST_DOMAIN_BYTES: usize = 255;
const SCHEME_PREFIX: &str = "spiffe://";

/// A syntactically valid SPIFFE ID such as `spiffe://example.org/ns/prod/sa/web`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    id: String,
    trust_domain_len: usize,
}

/// Rejection of a string as a SPIFFE ID or trust domain, with the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    Invalid { id: String, reason: &'static str },
    #[error("invalid trust domain {name:?}: {reason}")]
    InvalidTrustDomain { name: String, reason: &'static str },
}

impl SpiffeId {
    /// Parses and validates `id`.
    ///
    /// # Errors
    ///
    /// Rejects a wrong scheme, an empty or upper-case trust domain, characters outside the
    /// allowed sets, percent-encoding, a port, user info, a query or fragment, empty, `.` or `..`
    /// path segments, and a trailing slash.
    pub fn parse(id: &str) -> Result<SpiffeId, SpiffeIdError> {
        let invalid = |reason| SpiffeIdError::Invalid { id: id.to_owned(), reason };

        if id.is_empty() {
            return Err(invalid("it is empty"));
        }
        if id.len() > MAX_ID_BYTES {
            return Err(invalid("it is longer than 2048 bytes"));
        }
        let Some(rest) = id.strip_prefix(SCHEME_PREFIX) else {
            return Err(invalid("the scheme must be \"spiffe://\" in lower case"));
        };
        if id.contains('%') {
            return Err(invalid("percent-encoding is not allowed"));
        }
        if id.contains('?') {
            return Err(invalid("a query is not allowed"));
        }
        if id.contains('#') {
            return Err(invalid("a fragment is not allowed"));
        }

        let (trust_domain, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        check_trust_domain(trust_domain).map_err(|error| match error {
            SpiffeIdError::InvalidTrustDomain { reason, .. } => invalid(reason),
            other => other,
        })?;
        check_path(path).map_err(invalid)?;

        Ok(SpiffeId { id: id.to_owned(), trust_domain_len: trust_domain.len() })
    }

    /// Returns the trust domain name, e.g. `example.org`.
    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME_PREFIX.len()..SCHEME_PREFIX.len() + self.trust_domain_len]
    }

    /// Returns the path including its leading slash, or `""` for the trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.id[SCHEME_PREFIX.len() + self.trust_domain_len..]
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// Checks a trust domain name: lower-case letters, digits, `.`, `-` and `_`, 1 to 255 bytes.
///
/// # Errors
///
/// Returns [`SpiffeIdError::InvalidTrustDomain`] naming the value and the broken rule.
pub fn check_trust_domain(name: &str) -> Result<(), SpiffeIdError> {
    let invalid = |reason| SpiffeIdError::InvalidTrustDomain { name: name.to_owned(), reason };

    if name.is_empty() {
        return Err(invalid("the trust domain is empty"));
    }
    if name.len() > MAX_TRUST_DOMAIN_BYTES {
        return Err(invalid("the trust domain is longer than 255 bytes"));
    }
    if name.contains('@') {
        return Err(invalid("user info is not allowed"));
    }
    if name.contains(':') {
        return Err(invalid("a port is not allowed"));
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(invalid("the trust domain must be lower case"));
    }
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_');
    if !name.bytes().all(allowed) {
        return Err(invalid("the trust domain may contain only a-z, 0-9, '.', '-' and '_'"));
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err("a trailing slash is not allowed");
    }

    // The path starts with '/', so the first split item is the empty string before it.
    for segment in path.split('/').skip(1) {
        match segment {
            "" => return Err("empty path segments are not allowed"),
            "." | ".." => return Err("'.' and '..' path segments are not allowed"),
            _ => {}
        }
        let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_');
        if !segment.bytes().all(allowed) {
            return Err("path segments may contain only a-z, A-Z, 0-9, '.', '-' and '_'");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_parse() {
        for (id, trust_domain, path) in [
            ("spiffe://example.org", "example.org", ""),
            ("spiffe://example.org/ns/prod/sa/web", "example.org", "/ns/prod/sa/web"),
            ("spiffe://td-1_x.local/A.b-C_d", "td-1_x.local", "/A.b-C_d"),
        ] {
            let parsed = SpiffeId::parse(id).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(parsed.trust_domain(), trust_domain, "{id}");
            assert_eq!(parsed.path(), path, "{id}");
            assert_eq!(parsed.as_str(), id);
        }
    }

    #[test]
    fn invalid_ids_are_rejected_with_reason() {
        let cases = [
            ("empty", "", "empty"),
            ("other scheme", "https://example.org/x", "scheme"),
            ("upper-case scheme", "SPIFFE://example.org/x", "scheme"),
            ("no trust domain", "spiffe:///x", "trust domain is empty"),
            ("upper-case trust domain", "spiffe://Example.org/x", "lower case"),
            ("bad trust domain char", "spiffe://exa$mple.org/x", "may contain only"),
            ("port", "spiffe://example.org:8080/x", "port"),
            ("user info", "spiffe://user@example.org/x", "user info"),
            ("query", "spiffe://example.org/x?a=b", "query"),
            ("fragment", "spiffe://example.org/x#frag", "fragment"),
            ("percent-encoding", "spiffe://example.org/a%20b", "percent"),
            ("trailing slash", "spiffe://example.org/x/", "trailing slash"),
            ("root trailing slash", "spiffe://example.org/", "trailing slash"),
            ("empty segment", "spiffe://example.org/a//b", "empty path segments"),
            ("dot segment", "spiffe://example.org/a/./b", "'.' and '..'"),
            ("dot-dot segment", "spiffe://example.org/a/../b", "'.' and '..'"),
            ("bad path char", "spiffe://example.org/a b", "may contain only"),
        ];
        for (name, id, expected) in cases {
            let error = SpiffeId::parse(id).expect_err(name).to_string();
            assert!(error.contains(expected), "{name}: {error:?} lacks {expected:?}");
            assert!(error.contains(&format!("{id:?}")), "{name}: {error:?} does not name the ID");
        }
    }

    #[test]
    fn too_long_id_is_rejected() {
        let id = format!("spiffe://example.org/{}", "a".repeat(2100));
        let error = SpiffeId::parse(&id).expect_err("too long").to_string();
        assert!(error.contains("2048"), "{error}");
    }
}
