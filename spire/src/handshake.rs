//! go-plugin's launch contract: the environment SPIRE sets for the plugin process and the
//! handshake line the plugin prints on standard output.

use std::path::Path;

/// The environment variable, and its value, that SPIRE sets for an UpstreamAuthority plugin. A
/// plugin started without it was not launched by SPIRE.
pub const MAGIC_COOKIE_KEY: &str = "UpstreamAuthority";
pub const MAGIC_COOKIE_VALUE: &str = "UpstreamAuthority";

/// go-plugin's core protocol version, the first handshake field.
const CORE_PROTOCOL_VERSION: u32 = 1;
/// SPIRE's plugin protocol version, the second handshake field.
pub const APP_PROTOCOL_VERSION: u32 = 1;

/// Reason the process environment is not a SPIRE launch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvironmentError {
    #[error("environment variable {MAGIC_COOKIE_KEY} is not set, so SPIRE did not start this process")]
    MissingCookie,
    #[error("environment variable {MAGIC_COOKIE_KEY} is {0:?}, expected {MAGIC_COOKIE_VALUE:?}")]
    WrongCookie(String),
    #[error("PLUGIN_PROTOCOL_VERSIONS is {0:?}, which does not offer protocol version {APP_PROTOCOL_VERSION}")]
    UnsupportedProtocol(String),
}

/// Checks the variables go-plugin sets when SPIRE launches the plugin. `lookup` returns the
/// value of a variable, such as `|name| std::env::var(name).ok()`.
///
/// # Errors
///
/// Fails when the magic cookie is missing or wrong, or when the host offers protocol versions
/// that do not include version 1.
pub fn check_environment(lookup: impl Fn(&str) -> Option<String>) -> Result<(), EnvironmentError> {
    match lookup(MAGIC_COOKIE_KEY) {
        None => return Err(EnvironmentError::MissingCookie),
        Some(value) if value != MAGIC_COOKIE_VALUE => return Err(EnvironmentError::WrongCookie(value)),
        Some(_) => {}
    }
    // go-plugin hosts list the versions they speak, comma-separated. A host that sets none
    // expects the plugin's only version.
    if let Some(versions) = lookup("PLUGIN_PROTOCOL_VERSIONS").filter(|versions| !versions.trim().is_empty()) {
        let offered = versions.split(',').any(|version| version.trim().parse() == Ok(APP_PROTOCOL_VERSION));
        if !offered {
            return Err(EnvironmentError::UnsupportedProtocol(versions));
        }
    }
    Ok(())
}

/// Formats the line go-plugin's host reads from the plugin's standard output: protocol
/// versions, network type, socket path and the `grpc` protocol, separated by `|`.
pub fn handshake_line(socket: &Path) -> String {
    format!("{CORE_PROTOCOL_VERSION}|{APP_PROTOCOL_VERSION}|unix|{}|grpc", socket.display())
}

/// Text printed to standard error when the plugin is run by hand.
pub fn usage() -> String {
    let name = env!("CARGO_PKG_NAME");
    let version = env!("CARGO_PKG_VERSION");
    format!(
        "{name} {version}: SPIRE UpstreamAuthority plugin that gets SPIRE's intermediate CA from Sigil.

This program is started by SPIRE server, not by hand. Declare it in the server configuration:

    plugins {{
        UpstreamAuthority \"sigil\" {{
            plugin_cmd = \"/usr/local/bin/{name}\"
            plugin_checksum = \"<sha256sum of the binary, 64 hex digits>\"
            plugin_data {{
                endpoints = [\"sigil-1.example.org:7001\", \"sigil-2.example.org:7001\"]
                client_cert_path = \"/etc/spire/sigil/cert.pem\"
                client_key_path = \"/etc/spire/sigil/key.pem\"
                bundle_path = \"/etc/spire/sigil/bundle.pem\"
            }}
        }}
    }}

plugin_data keys:
    endpoints         Sigil gRPC addresses as host:port, tried in turn (at least one)
    client_cert_path  PEM client certificate whose URI SAN is the SPIRE server's SPIFFE ID
    client_key_path   PEM private key of that certificate
    bundle_path       PEM CA certificates that verify the Sigil nodes' server certificates

The trust domain is the server's own trust_domain. Set {log_variable} to a tracing filter such
as \"debug\" to change the log level (default: {default_filter}).
",
        log_variable = crate::logging::FILTER_VARIABLE,
        default_filter = crate::logging::DEFAULT_FILTER,
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use super::*;

    fn environment(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn spire_environment_is_accepted() {
        let env = environment(&[
            ("UpstreamAuthority", "UpstreamAuthority"),
            ("PLUGIN_PROTOCOL_VERSIONS", "1"),
            ("PLUGIN_MIN_PORT", "10000"),
            ("PLUGIN_MAX_PORT", "25000"),
        ]);
        assert_eq!(check_environment(env), Ok(()));
    }

    #[test]
    fn cookie_alone_is_accepted() {
        assert_eq!(check_environment(environment(&[("UpstreamAuthority", "UpstreamAuthority")])), Ok(()));
    }

    #[test]
    fn missing_cookie_is_rejected() {
        assert_eq!(
            check_environment(environment(&[("PLUGIN_PROTOCOL_VERSIONS", "1")])),
            Err(EnvironmentError::MissingCookie)
        );
    }

    #[test]
    fn wrong_cookie_is_rejected() {
        let env = environment(&[("UpstreamAuthority", "KeyManager")]);
        assert_eq!(check_environment(env), Err(EnvironmentError::WrongCookie("KeyManager".to_owned())));
    }

    #[test]
    fn protocol_versions_must_offer_one() {
        let offered = environment(&[("UpstreamAuthority", "UpstreamAuthority"), ("PLUGIN_PROTOCOL_VERSIONS", "2, 1")]);
        assert_eq!(check_environment(offered), Ok(()));
        let missing = environment(&[("UpstreamAuthority", "UpstreamAuthority"), ("PLUGIN_PROTOCOL_VERSIONS", "2,3")]);
        assert_eq!(check_environment(missing), Err(EnvironmentError::UnsupportedProtocol("2,3".to_owned())));
    }

    #[test]
    fn handshake_line_format() {
        let line = handshake_line(&PathBuf::from("/tmp/sigil-spire-plugin-x/plugin.sock"));
        assert_eq!(line, "1|1|unix|/tmp/sigil-spire-plugin-x/plugin.sock|grpc");
        assert_eq!(line.split('|').count(), 5);
        assert!(!line.contains('\n'));
    }

    #[test]
    fn usage_names_spire_settings() {
        let text = usage();
        for word in ["plugin_cmd", "plugin_checksum", "plugin_data", "endpoints", "client_cert_path", "bundle_path"] {
            assert!(text.contains(word), "usage lacks {word}");
        }
    }
}
