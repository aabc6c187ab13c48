//! Per-caller issuance policy: which SPIFFE IDs and DNS names a caller may request, the longest
//! TTL, and an issuance rate limit. Callers not listed are denied.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{CallerPolicy, PolicyMode, PolicySection};
use crate::spiffe_id::SpiffeId;

/// A SPIFFE ID pattern: `*` matches one path segment, a final `**` one or more segments.
#[derive(Debug, Clone)]
pub struct SpiffeIdPattern {
    trust_domain: String,
    segments: Vec<String>,
}

impl SpiffeIdPattern {
    /// Parses a pattern such as `spiffe://example.org/ns/*/sa/**`.
    ///
    /// # Errors
    ///
    /// Returns the reason when the pattern is not a SPIFFE ID with `*` or `**` segments, or when
    /// `**` is not the last segment.
    pub fn parse(pattern: &str) -> Result<SpiffeIdPattern, String> {
        // Replace wildcards with a placeholder segment so the SPIFFE ID rules check the rest.
        let probe = pattern.replace("**", "x").replace('*', "x");
        let id = SpiffeId::parse(&probe).map_err(|error| error.to_string())?;

        let segments: Vec<String> = pattern
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.split_once('/'))
            .map(|(_, path)| path.split('/').map(str::to_owned).collect())
            .unwrap_or_default();
        for (index, segment) in segments.iter().enumerate() {
            let is_wildcard = segment == "*" || segment == "**";
            if segment.contains('*') && !is_wildcard {
                return Err(format!("wildcard inside segment {segment:?}; use a whole '*' or '**' segment"));
            }
            if segment == "**" && index + 1 != segments.len() {
                return Err("'**' is allowed only as the last segment".to_owned());
            }
        }
        Ok(SpiffeIdPattern { trust_domain: id.trust_domain().to_owned(), segments })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Returns whether `id` matches the pattern.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        if id.trust_domain() != self.trust_domain {
            return false;
        }
        let path = id.path();
        let candidate: Vec<&str> = if path.is_empty() { Vec::new() } else { path[1..].split('/').collect() };
        matches_segments(&self.segments, &candidate)
    }
}

/// Matches pattern segments where `*` stands for one element and a final `**` for one or more.
fn matches_segments(pattern: &[String], candidate: &[&str]) -> bool {
    match pattern.split_last() {
        Some((last, head)) if last == "**" => {
            candidate.len() > head.len() && matches_fixed(head, &candidate[..head.len()])
        }
        _ => pattern.len() == candidate.len() && matches_fixed(pattern, candidate),
    }
}

fn matches_fixed(pattern: &[String], candidate: &[&str]) -> bool {
    pattern.iter().zip(candidate).all(|(p, c)| p == "*" || p == c)
}

/// A DNS name pattern: a leading `*` matches one label, a leading `**` one or more labels.
#[derive(Debug, Clone)]
pub struct DnsPattern {
    labels: Vec<String>,
}

impl DnsPattern {
    /// Parses a pattern such as `*.svc.example.org` or `**.example.org`.
    ///
    /// # Errors
    ///
    /// Returns the reason when a label is not a valid DNS label, or a wildcard is not the first label.
    pub fn parse(pattern: &str) -> Result<DnsPattern, String> {
        let lowered = pattern.to_ascii_lowercase();
        let labels: Vec<String> = lowered.split('.').map(str::to_owned).collect();
        for (index, label) in labels.iter().enumerate() {
            match label.as_str() {
                "*" | "**" if index != 0 => {
                    return Err(format!("wildcard {label:?} is allowed only as the first label"));
                }
                "*" | "**" => {}
                _ => check_dns_label(label)?,
            }
        }
        if labels.iter().filter(|l| !l.starts_with('*')).count() < 2 {
            return Err("a pattern needs at least two fixed labels, e.g. *.example.org".to_owned());
        }
        Ok(DnsPattern { labels })
    }

    /// Returns whether `name`, already checked with [`check_dns_name`], matches.
    pub fn matches(&self, name: &str) -> bool {
        let lowered = name.to_ascii_lowercase();
        let candidate: Vec<&str> = lowered.split('.').collect();
        match self.labels.split_first() {
            Some((first, tail)) if first == "**" => {
                candidate.len() > tail.len() && matches_fixed(tail, &candidate[candidate.len() - tail.len()..])
            }
            _ => self.labels.len() == candidate.len() && matches_fixed(&self.labels, &candidate),
        }
    }
}

fn check_dns_label(label: &str) -> Result<(), String> {
    let valid_chars = label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if label.is_empty() || label.len() > 63 || !valid_chars || label.starts_with('-') || label.ends_with('-') {
        return Err(format!("{label:?} is not a valid DNS label"));
    }
    Ok(())
}

/// Checks that `name` is a DNS host name: labels of letters, digits and hyphens, no trailing dot,
/// at most 253 bytes.
///
/// # Errors
///
/// Returns the reason, naming the bad label.
pub fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err("a DNS name must be 1 to 253 bytes".to_owned());
    }
    name.split('.').try_for_each(check_dns_label)
}

/// The parts of a request that policy decides on.
#[derive(Debug)]
pub struct PolicyRequest<'a> {
    pub caller: &'a SpiffeId,
    pub spiffe_id: &'a SpiffeId,
    pub dns_names: &'a [String],
    pub ttl: Duration,
}

/// Policy denial of a request. Each message names the value and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyDenial {
    #[error("caller {caller} is not listed in the policy")]
    UnknownCaller { caller: String },
    #[error("caller {caller} may not request SPIFFE ID {requested}; allowed patterns: {allowed:?}")]
    SpiffeId { caller: String, requested: String, allowed: Vec<String> },
    #[error("caller {caller} may not request DNS name {requested}; allowed patterns: {allowed:?}")]
    DnsName { caller: String, requested: String, allowed: Vec<String> },
    #[error("requested TTL {requested_seconds}s is above the maximum of {max_seconds}s for caller {caller}")]
    Ttl { caller: String, requested_seconds: u64, max_seconds: u64 },
    #[error(
        "caller {caller} may not act for trust domain {requested:?}: it is not in the caller's downstream_trust_domains {allowed:?}"
    )]
    TrustDomain { caller: String, requested: String, allowed: Vec<String> },
    #[error(
        "SPIFFE ID {requested} is reserved: paths under /sigil/ name Sigil's own nodes and administrators, which \
         only the cluster's administration commands issue"
    )]
    Reserved { requested: String },
}

/// True when `spiffe_id` is under the `/sigil` path that Sigil's node and administrator identities
/// use. Such identities authenticate Raft peers and administrators, so the issuance API never
/// issues them, whatever the policy or its mode allows.
pub fn is_reserved(spiffe_id: &SpiffeId) -> bool {
    let text = spiffe_id.as_str();
    let path = text.strip_prefix("spiffe://").and_then(|rest| rest.find('/').map(|slash| &rest[slash..])).unwrap_or("");
    path == "/sigil" || path.starts_with("/sigil/")
}

/// Rejection of a caller that is over its rate limit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "caller {caller} is over its issuance rate limit of {rate_per_second}/s (burst {burst}); retry after {retry_after_ms} ms"
)]
pub struct RateLimited {
    pub caller: String,
    pub rate_per_second: f64,
    pub burst: u32,
    pub retry_after_ms: u64,
}

struct CompiledCaller {
    policy: CallerPolicy,
    spiffe_patterns: Vec<SpiffeIdPattern>,
    dns_patterns: Vec<DnsPattern>,
    bucket: Mutex<TokenBucket>,
}

/// The policy of one node, compiled from its configuration.
pub struct Policy {
    mode: PolicyMode,
    callers: HashMap<String, CompiledCaller>,
}

impl Policy {
    /// Compiles the policy section. Patterns were checked by config validation; a pattern that
    /// still fails to parse is skipped, so it can only narrow what is allowed.
    pub fn new(section: &PolicySection) -> Policy {
        let callers = section
            .callers
            .iter()
            .map(|caller| {
                let compiled = CompiledCaller {
                    spiffe_patterns: caller
                        .allowed_spiffe_ids
                        .iter()
                        .filter_map(|p| SpiffeIdPattern::parse(p).ok())
                        .collect(),
                    dns_patterns: caller.allowed_dns_names.iter().filter_map(|p| DnsPattern::parse(p).ok()).collect(),
                    bucket: Mutex::new(TokenBucket::new(caller.rate_per_second, caller.rate_burst)),
                    policy: caller.clone(),
                };
                (caller.spiffe_id.clone(), compiled)
            })
            .collect();
        Policy { mode: section.mode, callers }
    }

    pub fn mode(&self) -> PolicyMode {
        self.mode
    }

    /// Returns the caller's maximum TTL, if the caller is listed.
    pub fn max_ttl(&self, caller: &SpiffeId) -> Option<Duration> {
        self.callers.get(caller.as_str()).map(|c| c.policy.max_ttl)
    }

    /// Returns whether the caller may use the Admin service.
    pub fn is_admin(&self, caller: &SpiffeId) -> bool {
        self.callers.get(caller.as_str()).is_some_and(|c| c.policy.admin)
    }

    /// Decides whether the caller may mint downstream CAs for, and publish JWT authorities of,
    /// `trust_domain`.
    ///
    /// # Errors
    ///
    /// [`PolicyDenial::UnknownCaller`] or [`PolicyDenial::TrustDomain`].
    pub fn check_downstream(&self, caller: &SpiffeId, trust_domain: &str) -> Result<(), PolicyDenial> {
        let Some(entry) = self.callers.get(caller.as_str()) else {
            return Err(PolicyDenial::UnknownCaller { caller: caller.to_string() });
        };
        if entry.policy.downstream_trust_domains.iter().any(|allowed| allowed == trust_domain) {
            return Ok(());
        }
        Err(PolicyDenial::TrustDomain {
            caller: caller.to_string(),
            requested: trust_domain.to_owned(),
            allowed: entry.policy.downstream_trust_domains.clone(),
        })
    }

    /// Decides a request against the caller's entry. This does not consume rate-limit tokens.
    ///
    /// # Errors
    ///
    /// Returns the first rule the request breaks.
    pub fn check(&self, request: &PolicyRequest<'_>) -> Result<(), PolicyDenial> {
        let caller = request.caller.as_str();
        let Some(entry) = self.callers.get(caller) else {
            return Err(PolicyDenial::UnknownCaller { caller: caller.to_owned() });
        };

        if !entry.spiffe_patterns.iter().any(|p| p.matches(request.spiffe_id)) {
            return Err(PolicyDenial::SpiffeId {
                caller: caller.to_owned(),
                requested: request.spiffe_id.to_string(),
                allowed: entry.policy.allowed_spiffe_ids.clone(),
            });
        }
        for name in request.dns_names {
            if !entry.dns_patterns.iter().any(|p| p.matches(name)) {
                return Err(PolicyDenial::DnsName {
                    caller: caller.to_owned(),
                    requested: name.clone(),
                    allowed: entry.policy.allowed_dns_names.clone(),
                });
            }
        }
        if request.ttl > entry.policy.max_ttl {
            return Err(PolicyDenial::Ttl {
                caller: caller.to_owned(),
                requested_seconds: request.ttl.as_secs(),
                max_seconds: entry.policy.max_ttl.as_secs(),
            });
        }
        Ok(())
    }

    /// Takes one issuance token from the caller's bucket. Unknown callers are not limited here;
    /// `check` denies them.
    ///
    /// # Errors
    ///
    /// Returns [`RateLimited`] with the time after which a retry can succeed.
    pub fn take_token(&self, caller: &SpiffeId) -> Result<(), RateLimited> {
        let Some(entry) = self.callers.get(caller.as_str()) else {
            return Ok(());
        };
        let mut bucket = entry.bucket.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        bucket.take(Instant::now()).map_err(|wait| RateLimited {
            caller: caller.to_string(),
            rate_per_second: entry.policy.rate_per_second,
            burst: entry.policy.rate_burst,
            retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
        })
    }
}

/// A token bucket: `rate` tokens per second refill up to `burst`.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: u32) -> TokenBucket {
        TokenBucket { rate, burst: f64::from(burst), tokens: f64::from(burst), updated: Instant::now() }
    }

    /// Takes a token, or returns how long until one is available.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("test ID is valid")
    }

    #[test]
    fn spiffe_patterns_match_segments() {
        let cases = [
            ("spiffe://td/ns/*/sa/web", "spiffe://td/ns/prod/sa/web", true),
            ("spiffe://td/ns/*/sa/web", "spiffe://td/ns/prod/x/sa/web", false),
            ("spiffe://td/ns/**", "spiffe://td/ns/prod/sa/web", true),
            ("spiffe://td/ns/**", "spiffe://td/ns", false),
            ("spiffe://td/**", "spiffe://td/a", true),
            ("spiffe://td/**", "spiffe://td", false),
            ("spiffe://td/a", "spiffe://td/a", true),
            ("spiffe://td/a", "spiffe://other/a", false),
            ("spiffe://td", "spiffe://td", true),
        ];
        for (pattern, candidate, expected) in cases {
            let compiled = SpiffeIdPattern::parse(pattern).expect(pattern);
            assert_eq!(compiled.matches(&id(candidate)), expected, "{pattern} vs {candidate}");
        }
    }

    #[test]
    fn bad_spiffe_patterns_are_rejected() {
        for pattern in ["spiffe://td/a*", "spiffe://td/**/a", "https://td/*", "spiffe://td/a/"] {
            assert!(SpiffeIdPattern::parse(pattern).is_err(), "{pattern}");
        }
    }

    #[test]
    fn dns_patterns_match_labels() {
        let cases = [
            ("*.example.org", "web.example.org", true),
            ("*.example.org", "WEB.Example.org", true),
            ("*.example.org", "a.web.example.org", false),
            ("*.example.org", "example.org", false),
            ("**.example.org", "a.web.example.org", true),
            ("**.example.org", "example.org", false),
            ("web.example.org", "web.example.org", true),
            ("web.example.org", "api.example.org", false),
        ];
        for (pattern, candidate, expected) in cases {
            let compiled = DnsPattern::parse(pattern).expect(pattern);
            assert_eq!(compiled.matches(candidate), expected, "{pattern} vs {candidate}");
        }
    }

    #[test]
    fn bad_dns_patterns_are_rejected() {
        for pattern in ["a.*.example.org", "*", "*.org.", "x.**.org", "-a.example.org", "a_b.example.org"] {
            assert!(DnsPattern::parse(pattern).is_err(), "{pattern}");
        }
    }

    fn policy() -> Policy {
        let caller = CallerPolicy {
            spiffe_id: "spiffe://td/client".into(),
            allowed_spiffe_ids: vec!["spiffe://td/ns/**".into()],
            allowed_dns_names: vec!["*.svc.td".into()],
            max_ttl: Duration::from_secs(600),
            rate_per_second: 1.0,
            rate_burst: 2,
            admin: false,
            downstream_trust_domains: Vec::new(),
        };
        Policy::new(&PolicySection { mode: PolicyMode::Enforce, callers: vec![caller] })
    }

    #[test]
    fn policy_denies_each_rule_by_value() {
        let policy = policy();
        let caller = id("spiffe://td/client");
        let good = id("spiffe://td/ns/a");
        let ok_names = vec!["web.svc.td".to_owned()];
        let request =
            PolicyRequest { caller: &caller, spiffe_id: &good, dns_names: &ok_names, ttl: Duration::from_secs(60) };
        assert_eq!(policy.check(&request), Ok(()));

        let stranger = id("spiffe://td/stranger");
        let denial = policy.check(&PolicyRequest { caller: &stranger, ..request }).expect_err("unknown caller");
        assert!(denial.to_string().contains("spiffe://td/stranger"), "{denial}");

        let outside = id("spiffe://td/other/a");
        let denial = policy.check(&PolicyRequest { spiffe_id: &outside, ..request }).expect_err("ID outside");
        assert!(denial.to_string().contains("spiffe://td/other/a"), "{denial}");
        assert!(denial.to_string().contains("spiffe://td/ns/**"), "{denial}");

        let bad_names = vec!["web.other.td".to_owned()];
        let denial = policy.check(&PolicyRequest { dns_names: &bad_names, ..request }).expect_err("DNS outside");
        assert!(denial.to_string().contains("web.other.td"), "{denial}");

        let denial = policy.check(&PolicyRequest { ttl: Duration::from_secs(601), ..request }).expect_err("TTL");
        assert!(denial.to_string().contains("601s"), "{denial}");
        assert!(denial.to_string().contains("600s"), "{denial}");
    }

    #[test]
    fn token_bucket_refills_at_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket { rate: 10.0, burst: 2.0, tokens: 2.0, updated: start };
        assert!(bucket.take(start).is_ok());
        assert!(bucket.take(start).is_ok());
        let wait = bucket.take(start).expect_err("empty bucket");
        assert!(wait > Duration::from_millis(90), "{wait:?}");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(bucket.take(start + Duration::from_millis(100)).is_ok());
        assert!(bucket.take(start + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn rate_limit_names_caller_and_limit() {
        let policy = policy();
        let caller = id("spiffe://td/client");
        assert!(policy.take_token(&caller).is_ok());
        assert!(policy.take_token(&caller).is_ok());
        let limited = policy.take_token(&caller).expect_err("third request within burst 2");
        let message = limited.to_string();
        assert!(message.contains("spiffe://td/client"), "{message}");
        assert!(message.contains("1/s"), "{message}");
    }
}
