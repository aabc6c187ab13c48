//! The plugin's configuration: SPIRE's trust domain plus the `plugin_data` keys, checked in full
//! before the plugin uses them. Every problem is reported, each naming the key, value or file.

use std::fmt;
use std::path::PathBuf;

use crate::hcl::{self, Value};

pub const ENDPOINTS: &str = "endpoints";
pub const CLIENT_CERT_PATH: &str = "client_cert_path";
pub const CLIENT_KEY_PATH: &str = "client_key_path";
pub const BUNDLE_PATH: &str = "bundle_path";
const KNOWN_KEYS: [&str; 4] = [ENDPOINTS, CLIENT_CERT_PATH, CLIENT_KEY_PATH, BUNDLE_PATH];

/// Maximum length of a trust domain name, from the SPIFFE ID specification.
const MAX_TRUST_DOMAIN_LENGTH: usize = 255;

/// The `plugin_data` settings, parsed but not yet checked against the file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Sigil gRPC addresses as host:port, in the order they are tried.
    pub endpoints: Vec<String>,
    pub client_cert_path: PathBuf,
    pub client_key_path: PathBuf,
    pub bundle_path: PathBuf,
}

/// Every problem found in one configuration, in the order found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}", self.0.join("; "))
    }
}

impl std::error::Error for ConfigErrors {}

/// Checks SPIRE's `core_configuration.trust_domain`, which must be a bare name such as
/// `example.org`: lower-case letters, digits, `.`, `-` and `_`.
///
/// # Errors
///
/// Returns a message naming the value and the rule it breaks.
pub fn check_trust_domain(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("core_configuration.trust_domain is missing; SPIRE sends the server's trust_domain".to_owned());
    }
    if name.contains("://") {
        return Err(format!(
            "core_configuration.trust_domain {name:?} is a URI; expected a bare name such as example.org"
        ));
    }
    if name.len() > MAX_TRUST_DOMAIN_LENGTH {
        return Err(format!(
            "core_configuration.trust_domain {name:?} is longer than {MAX_TRUST_DOMAIN_LENGTH} characters"
        ));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(*c))) {
        return Err(format!(
            "core_configuration.trust_domain {name:?} contains {bad:?}; only a-z, 0-9, '.', '-' and '_' are allowed"
        ));
    }
    Ok(())
}

/// Checks one Sigil address, which must be host:port with no scheme. The host is a DNS name,
/// an IPv4 address or a bracketed IPv6 address.
///
/// # Errors
///
/// Returns a message naming the value and what is wrong with it.
pub fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let invalid = |reason: &str| Err(format!("{ENDPOINTS}: {endpoint:?} is invalid: {reason}"));
    if endpoint.contains("://") {
        return invalid("write host:port without a scheme, such as sigil-1.example.org:7001");
    }
    let Some((host, port)) = endpoint.rsplit_once(':') else {
        return invalid("missing :port, such as sigil-1.example.org:7001");
    };
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return invalid("the port must be a number from 1 to 65535"),
        Ok(_) => {}
    }
    let valid_host = if let Some(inner) = host.strip_prefix('[') {
        inner.strip_suffix(']').is_some_and(|address| address.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    if !valid_host {
        return invalid("the host must be a DNS name, an IPv4 address or an IPv6 address in brackets");
    }
    Ok(())
}

/// Parses the `plugin_data` text into settings.
///
/// # Errors
///
/// Returns every problem: a syntax error, an unknown key, a value of the wrong type, a missing
/// key or an invalid endpoint.
pub fn parse_settings(text: &str) -> Result<Settings, ConfigErrors> {
    let attributes = hcl::parse(text).map_err(|error| ConfigErrors(vec![format!("plugin_data: {error}")]))?;
    let mut errors = Vec::new();
    let mut endpoints = None;
    let mut paths: [Option<PathBuf>; 3] = [None, None, None];
    for attribute in attributes {
        let key = attribute.key.as_str();
        let result = match key {
            ENDPOINTS => string_list(key, &attribute.value).map(|list| endpoints = Some(list)),
            CLIENT_CERT_PATH => path(key, &attribute.value).map(|path| paths[0] = Some(path)),
            CLIENT_KEY_PATH => path(key, &attribute.value).map(|path| paths[1] = Some(path)),
            BUNDLE_PATH => path(key, &attribute.value).map(|path| paths[2] = Some(path)),
            _ => Err(format!(
                "plugin_data: unknown key {key:?} on line {}; known keys are {}",
                attribute.line,
                KNOWN_KEYS.join(", ")
            )),
        };
        if let Err(error) = result {
            errors.push(error);
        }
    }

    match &endpoints {
        None => errors.push(format!("plugin_data: {ENDPOINTS} is missing; list at least one Sigil host:port")),
        Some(list) if list.is_empty() => {
            errors.push(format!("{ENDPOINTS} is empty; list at least one Sigil host:port"))
        }
        Some(list) => errors.extend(endpoint_errors(list)),
    }
    for (key, value) in [CLIENT_CERT_PATH, CLIENT_KEY_PATH, BUNDLE_PATH].iter().zip(&paths) {
        if value.is_none() {
            errors.push(format!("plugin_data: {key} is missing"));
        }
    }

    match (endpoints, paths) {
        (Some(endpoints), [Some(client_cert_path), Some(client_key_path), Some(bundle_path)]) if errors.is_empty() => {
            Ok(Settings { endpoints, client_cert_path, client_key_path, bundle_path })
        }
        _ => Err(ConfigErrors(errors)),
    }
}

fn endpoint_errors(endpoints: &[String]) -> Vec<String> {
    let mut errors: Vec<String> = endpoints.iter().filter_map(|endpoint| check_endpoint(endpoint).err()).collect();
    for (index, endpoint) in endpoints.iter().enumerate() {
        if endpoints[..index].contains(endpoint) {
            errors.push(format!("{ENDPOINTS}: {endpoint:?} is listed twice"));
        }
    }
    errors
}

fn string_list(key: &str, value: &Value) -> Result<Vec<String>, String> {
    let Value::List(items) = value else {
        return Err(format!("{key} must be a list of strings such as [\"sigil-1:7001\"], not a {}", value.type_name()));
    };
    items
        .iter()
        .map(|item| match item {
            Value::String(text) => Ok(text.clone()),
            other => Err(format!("{key} must contain only strings, found a {}", other.type_name())),
        })
        .collect()
}

fn path(key: &str, value: &Value) -> Result<PathBuf, String> {
    match value {
        Value::String(text) if text.trim().is_empty() => Err(format!("{key} is empty; give the path of a PEM file")),
        Value::String(text) => Ok(PathBuf::from(text)),
        other => Err(format!("{key} must be a string path, not a {}", other.type_name())),
    }
}

/// The full configuration: trust domain and settings, each checked.
pub struct PluginConfig {
    pub trust_domain: String,
    pub settings: Settings,
}

impl PluginConfig {
    /// Checks SPIRE's trust domain and parses `plugin_data`, reporting the problems of both.
    ///
    /// # Errors
    ///
    /// Returns every problem found.
    pub fn parse(trust_domain: &str, plugin_data: &str) -> Result<PluginConfig, ConfigErrors> {
        let trust_domain_error = check_trust_domain(trust_domain).err();
        match (parse_settings(plugin_data), trust_domain_error) {
            (Ok(settings), None) => Ok(PluginConfig { trust_domain: trust_domain.to_owned(), settings }),
            (Ok(_), Some(error)) => Err(ConfigErrors(vec![error])),
            (Err(ConfigErrors(mut errors)), error) => {
                errors.splice(0..0, error);
                Err(ConfigErrors(errors))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        "endpoints" = ["127.0.0.1:7001", "sigil-2.example.org:7001", "[::1]:7003"]
        "client_cert_path" = "/etc/spire/sigil/cert.pem"
        "client_key_path" = "/etc/spire/sigil/key.pem"
        "bundle_path" = "/etc/spire/sigil/bundle.pem"
    "#;

    fn errors(text: &str) -> Vec<String> {
        match parse_settings(text) {
            Ok(settings) => panic!("{text:?} parsed as {settings:?}"),
            Err(ConfigErrors(errors)) => errors,
        }
    }

    fn assert_reported(errors: &[String], expected: &str) {
        assert!(errors.iter().any(|error| error.contains(expected)), "no error contains {expected:?}: {errors:#?}");
    }

    #[test]
    fn quoted_keys_parse() {
        let settings = parse_settings(GOOD).expect("valid settings");
        assert_eq!(settings.endpoints, ["127.0.0.1:7001", "sigil-2.example.org:7001", "[::1]:7003"]);
        assert_eq!(settings.client_cert_path, PathBuf::from("/etc/spire/sigil/cert.pem"));
        assert_eq!(settings.client_key_path, PathBuf::from("/etc/spire/sigil/key.pem"));
        assert_eq!(settings.bundle_path, PathBuf::from("/etc/spire/sigil/bundle.pem"));
    }

    #[test]
    fn bare_keys_parse_the_same() {
        let bare = r#"
            endpoints = ["127.0.0.1:7001", "sigil-2.example.org:7001", "[::1]:7003"]
            client_cert_path = "/etc/spire/sigil/cert.pem"
            client_key_path = "/etc/spire/sigil/key.pem"
            bundle_path = "/etc/spire/sigil/bundle.pem"
        "#;
        assert_eq!(parse_settings(bare), parse_settings(GOOD));
    }

    #[test]
    fn unknown_key_is_named() {
        let text = format!("{GOOD}\nendpoint = \"x:1\"");
        let errors = errors(&text);
        assert_reported(&errors, "unknown key \"endpoint\" on line 7");
        assert_reported(&errors, "known keys are endpoints, client_cert_path, client_key_path, bundle_path");
    }

    #[test]
    fn missing_keys_are_each_named() {
        let errors = errors("");
        assert_eq!(errors.len(), 4, "{errors:#?}");
        for key in KNOWN_KEYS {
            assert_reported(&errors, &format!("{key} is missing"));
        }
    }

    #[test]
    fn wrong_types_are_named() {
        let text = "endpoints = \"a:1\"\nclient_cert_path = 3\nclient_key_path = [\"k\"]\nbundle_path = \"\"";
        let errors = errors(text);
        assert_reported(&errors, "endpoints must be a list of strings such as [\"sigil-1:7001\"], not a string");
        assert_reported(&errors, "client_cert_path must be a string path, not a number");
        assert_reported(&errors, "client_key_path must be a string path, not a list");
        assert_reported(&errors, "bundle_path is empty");
    }

    #[test]
    fn endpoint_list_problems_are_named() {
        let base = "client_cert_path = \"c\"\nclient_key_path = \"k\"\nbundle_path = \"b\"\n";
        assert_reported(&errors(&format!("{base}endpoints = []")), "endpoints is empty");
        assert_reported(&errors(&format!("{base}endpoints = [1]")), "must contain only strings, found a number");
        let twice = errors(&format!("{base}endpoints = [\"a:1\", \"a:1\"]"));
        assert_reported(&twice, "endpoints: \"a:1\" is listed twice");
    }

    #[test]
    fn syntax_error_is_reported_with_position() {
        let errors = errors("endpoints = [\"a:1\"\nbundle_path = \"b\"");
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_reported(&errors, "plugin_data: line 2, column 1: key \"endpoints\": expected , or ] in list");
    }

    #[test]
    fn endpoint_forms() {
        for good in ["127.0.0.1:7001", "sigil-1.example.org:443", "localhost:1", "[::1]:7001", "node_1:65535"] {
            assert_eq!(check_endpoint(good), Ok(()), "{good}");
        }
        let cases = [
            ("https://sigil:7001", "without a scheme"),
            ("sigil", "missing :port"),
            ("sigil:0", "from 1 to 65535"),
            ("sigil:70000", "from 1 to 65535"),
            ("sigil:http", "from 1 to 65535"),
            (":7001", "the host must be"),
            ("::1:7001", "the host must be"),
            ("[sigil]:7001", "the host must be"),
            ("sigil host:7001", "the host must be"),
        ];
        for (endpoint, reason) in cases {
            let error = check_endpoint(endpoint).expect_err(endpoint);
            assert!(error.contains(&format!("{endpoint:?} is invalid")), "{error}");
            assert!(error.contains(reason), "{endpoint}: {error}");
        }
    }

    #[test]
    fn trust_domain_forms() {
        assert_eq!(check_trust_domain("example.org"), Ok(()));
        assert_eq!(check_trust_domain("prod-1_eu.example.org"), Ok(()));
        let cases = [
            ("", "is missing"),
            ("spiffe://example.org", "is a URI"),
            ("Example.org", "contains 'E'"),
            ("example.org/path", "contains '/'"),
        ];
        for (name, reason) in cases {
            let error = check_trust_domain(name).expect_err(name);
            assert!(error.contains(reason), "{name:?}: {error}");
        }
        let long = "a".repeat(256);
        assert!(check_trust_domain(&long).expect_err("too long").contains("longer than 255"));
    }

    #[test]
    fn plugin_config_reports_trust_domain_and_settings_together() {
        let Err(ConfigErrors(errors)) = PluginConfig::parse("spiffe://example.org", "endpoints = []") else {
            panic!("invalid configuration accepted");
        };
        assert!(errors[0].contains("is a URI"), "{errors:#?}");
        assert_reported(&errors, "endpoints is empty");
        assert_reported(&errors, "bundle_path is missing");
    }

    #[test]
    fn plugin_config_accepts_good_input() {
        let config = PluginConfig::parse("example.org", GOOD).expect("valid configuration");
        assert_eq!(config.trust_domain, "example.org");
        assert_eq!(config.settings.endpoints.len(), 3);
    }
}
