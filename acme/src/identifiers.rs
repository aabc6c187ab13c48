//! Identifier checks for newOrder: syntax, then the directory's policy.

use std::net::IpAddr;

use crate::problem::{Problem, ProblemType, Subproblem};
use crate::settings::AcmeSettings;
use crate::types::Identifier;

/// Normalizes the identifiers of a newOrder and checks each against the
/// settings. Every refused identifier gets a subproblem.
pub fn check_order_identifiers(
    identifiers: &[Identifier],
    settings: &AcmeSettings,
) -> Result<Vec<Identifier>, Problem> {
    if identifiers.is_empty() {
        return Err(Problem::malformed("newOrder has no identifiers"));
    }
    if identifiers.len() > settings.max_identifiers {
        return Err(Problem::new(
            ProblemType::RejectedIdentifier,
            format!(
                "newOrder has {} identifiers, more than the limit of {}",
                identifiers.len(),
                settings.max_identifiers
            ),
        ));
    }
    let mut accepted = Vec::with_capacity(identifiers.len());
    let mut refused = Vec::new();
    for identifier in identifiers {
        match check_identifier(identifier, settings) {
            Ok(normalized) if !accepted.contains(&normalized) => accepted.push(normalized),
            Ok(_) => {}
            Err(subproblem) => refused.push(subproblem),
        }
    }
    if !refused.is_empty() {
        let names: Vec<&str> = refused.iter().map(|subproblem| subproblem.identifier.value.as_str()).collect();
        return Err(Problem::compound(format!("identifiers {} are refused", names.join(", ")), refused));
    }
    accepted.sort();
    Ok(accepted)
}

fn check_identifier(identifier: &Identifier, settings: &AcmeSettings) -> Result<Identifier, Subproblem> {
    match identifier.kind.as_str() {
        "dns" => check_dns(identifier, settings),
        "ip" => check_ip(identifier, settings),
        other => Err(Subproblem::new(
            ProblemType::UnsupportedIdentifier,
            identifier.clone(),
            format!("identifier type {other:?} is not supported; use dns or ip"),
        )),
    }
}

/// Lower case without a trailing dot, as names are compared.
pub fn normalize_dns(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn check_dns(identifier: &Identifier, settings: &AcmeSettings) -> Result<Identifier, Subproblem> {
    let name = normalize_dns(&identifier.value);
    let refuse = |kind, detail: String| Err(Subproblem::new(kind, identifier.clone(), detail));
    let base = name.strip_prefix("*.").unwrap_or(&name);
    if let Err(reason) = check_dns_syntax(base) {
        return refuse(ProblemType::RejectedIdentifier, format!("dns name {:?} {reason}", identifier.value));
    }
    if base.parse::<IpAddr>().is_ok() {
        return refuse(
            ProblemType::RejectedIdentifier,
            format!("dns name {:?} is an IP address; use an ip identifier", identifier.value),
        );
    }
    let allowed = settings.allowed_dns_suffixes.is_empty()
        || settings.allowed_dns_suffixes.iter().any(|suffix| {
            let suffix = normalize_dns(suffix.trim_start_matches('.'));
            base == suffix || base.ends_with(&format!(".{suffix}"))
        });
    if !allowed {
        return refuse(
            ProblemType::RejectedIdentifier,
            format!(
                "dns name {:?} is not under an allowed suffix ({})",
                identifier.value,
                settings.allowed_dns_suffixes.join(", ")
            ),
        );
    }
    Ok(Identifier::dns(name))
}

fn check_dns_syntax(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 253 {
        return Err(format!("has length {}, expected 1 to 253", name.len()));
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 {
        return Err("has a single label; a fully qualified name is required".to_owned());
    }
    for label in labels {
        let valid = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-');
        if !valid {
            return Err(format!("has an invalid label {label:?}"));
        }
    }
    Ok(())
}

fn check_ip(identifier: &Identifier, settings: &AcmeSettings) -> Result<Identifier, Subproblem> {
    let address: IpAddr = identifier.value.parse().map_err(|_| {
        Subproblem::new(
            ProblemType::Malformed,
            identifier.clone(),
            format!("{:?} is not an IP address", identifier.value),
        )
    })?;
    if !settings.allowed_ip_ranges.iter().any(|range| range.contains(address)) {
        return Err(Subproblem::new(
            ProblemType::RejectedIdentifier,
            identifier.clone(),
            format!("ip address {address} is not in a range this directory allows"),
        ));
    }
    Ok(Identifier::ip(address.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::IpRange;

    fn settings() -> AcmeSettings {
        let mut settings = AcmeSettings::new("https://127.0.0.1:1");
        settings.allowed_dns_suffixes = vec!["example.test".to_owned()];
        settings.allowed_ip_ranges = vec![IpRange::parse("127.0.0.0/8").expect("range")];
        settings
    }

    #[test]
    fn names_are_normalized_and_deduplicated() {
        let checked = check_order_identifiers(
            &[Identifier::dns("WWW.Example.Test."), Identifier::dns("www.example.test"), Identifier::ip("127.0.0.1")],
            &settings(),
        )
        .expect("allowed");
        assert_eq!(checked, vec![Identifier::dns("www.example.test"), Identifier::ip("127.0.0.1")]);
    }

    #[test]
    fn each_refused_identifier_gets_a_subproblem() {
        let problem = check_order_identifiers(
            &[Identifier::dns("bad_name.example.test"), Identifier::dns("other.org"), Identifier::ip("10.0.0.1")],
            &settings(),
        )
        .expect_err("refused");
        assert!(problem.is(ProblemType::Compound), "{problem}");
        assert_eq!(problem.subproblems.len(), 3);
        assert!(problem.subproblems[0].detail.contains("bad_name"), "{:?}", problem.subproblems[0]);
        assert!(problem.subproblems[1].detail.contains("other.org"), "{:?}", problem.subproblems[1]);
        assert!(problem.subproblems[2].detail.contains("10.0.0.1"), "{:?}", problem.subproblems[2]);
    }

    #[test]
    fn unsupported_type_is_named() {
        let problem = check_order_identifiers(
            &[Identifier { kind: "email".to_owned(), value: "a@example.test".to_owned() }],
            &settings(),
        )
        .expect_err("refused");
        assert!(problem.is(ProblemType::UnsupportedIdentifier), "{problem}");
        assert!(problem.detail.contains("email"), "{problem}");
    }
}
