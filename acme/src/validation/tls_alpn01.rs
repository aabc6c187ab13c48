//! tls-alpn-01 (RFC 8737; RFC 8738, section 6 for IP addresses).
//!
//! The validator opens a TLS connection to the identifier on the configured
//! tls-alpn-01 port, offering only the ALPN protocol `acme-tls/1` and
//! sending the identifier as SNI. For an IP identifier, SNI carries the
//! reverse-mapping name (`in-addr.arpa` or `ip6.arpa`) because SNI cannot
//! carry an address. The handshake must select `acme-tls/1`, and the
//! server's certificate must hold exactly one subjectAltName entry, equal
//! to the identifier, and a critical acmeIdentifier extension whose value
//! is the SHA-256 digest of the key authorization.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use ring::digest::{SHA256, digest};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use super::Context;
use super::connect::connect;
use super::identifier::Target;
use super::tls::ACME_TLS_ALPN;
use crate::problem::{Problem, ProblemType};

/// The acmeIdentifier extension, id-pe 31 (RFC 8737, section 3).
const ACME_IDENTIFIER_OID: &str = "1.3.6.1.5.5.7.1.31";

/// subjectAltName (RFC 5280, section 4.2.1.6).
const SUBJECT_ALT_NAME_OID: &str = "2.5.29.17";

/// Validates a tls-alpn-01 challenge for `target`.
pub(super) async fn validate(context: &Context<'_>, target: &Target, key_authorization: &str) -> Result<(), Problem> {
    let addresses = match target {
        Target::Ip(address) => vec![*address],
        Target::Name(name) => {
            context.progress.set(ProblemType::Dns, format!("looking up the addresses of {name}"));
            context.resolver.addresses(name).await?
        }
    };
    let sni = match target {
        Target::Name(name) => name.clone(),
        Target::Ip(address) => reverse_name(*address),
    };
    let port = context.settings.tls_alpn01_port;
    let purpose = format!("the tls-alpn-01 handshake with SNI {sni}");
    let (stream, peer) = connect(context, &addresses, port, &purpose).await?;

    context.progress.set(ProblemType::Tls, format!("in the TLS handshake with {peer} (SNI {sni}, ALPN acme-tls/1)"));
    let server_name = ServerName::try_from(sni.clone())
        .map_err(|error| Problem::malformed(format!("invalid TLS server name {sni:?}: {error}")))?;
    let connector = TlsConnector::from(context.tls.tls_alpn01.clone());
    let stream = connector.connect(server_name, stream).await.map_err(|error| {
        Problem::new(
            ProblemType::Tls,
            format!("TLS handshake with {peer} (SNI {sni}, ALPN acme-tls/1) failed: {error}"),
        )
    })?;
    let (_, connection) = stream.get_ref();

    match connection.alpn_protocol() {
        Some(ACME_TLS_ALPN) => {}
        Some(other) => {
            return Err(Problem::new(
                ProblemType::Tls,
                format!("{peer} negotiated ALPN protocol {:?} instead of acme-tls/1", String::from_utf8_lossy(other)),
            ));
        }
        None => {
            return Err(Problem::new(
                ProblemType::Tls,
                format!("{peer} completed the TLS handshake without selecting the ALPN protocol acme-tls/1"),
            ));
        }
    }

    let Some(leaf) = connection.peer_certificates().and_then(<[CertificateDer<'_>]>::first) else {
        return Err(Problem::new(ProblemType::Tls, format!("{peer} presented no certificate")));
    };
    let expected = digest(&SHA256, key_authorization.as_bytes());
    check_certificate(leaf, target, expected.as_ref(), peer)
}

/// Returns the reverse-mapping name of `address` (RFC 1034 for IPv4,
/// RFC 3596 for IPv6), without the trailing dot that SNI forbids.
pub(super) fn reverse_name(address: IpAddr) -> String {
    match address {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa")
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(72);
            for byte in v6.octets().iter().rev() {
                let _ = write!(name, "{:x}.{:x}.", byte & 0x0f, byte >> 4);
            }
            name.push_str("ip6.arpa");
            name
        }
    }
}

/// Checks the certificate presented for tls-alpn-01 (RFC 8737, section 3).
fn check_certificate(der: &[u8], target: &Target, expected_digest: &[u8], peer: SocketAddr) -> Result<(), Problem> {
    let unauthorized = |reason: String| Problem::unauthorized(format!("the certificate from {peer} {reason}"));

    let (_, certificate) =
        X509Certificate::from_der(der).map_err(|error| unauthorized(format!("cannot be parsed as X.509: {error}")))?;

    check_subject_alt_name(&certificate, target).map_err(unauthorized)?;

    let mut acme_extensions =
        certificate.extensions().iter().filter(|extension| extension.oid.to_id_string() == ACME_IDENTIFIER_OID);
    let Some(extension) = acme_extensions.next() else {
        return Err(unauthorized(format!("has no acmeIdentifier extension ({ACME_IDENTIFIER_OID})")));
    };
    if acme_extensions.next().is_some() {
        return Err(unauthorized("has more than one acmeIdentifier extension".to_owned()));
    }
    if !extension.critical {
        return Err(unauthorized("has an acmeIdentifier extension that is not marked critical".to_owned()));
    }

    // The value is the DER encoding of Authorization ::= OCTET STRING
    // (SIZE (32)): tag 0x04, length 0x20, then the digest.
    let value = extension.value;
    let Some(found) = value.strip_prefix(&[0x04, 0x20]).filter(|digest| digest.len() == 32) else {
        return Err(unauthorized(format!(
            "has an acmeIdentifier extension whose value {} is not a DER OCTET STRING of 32 bytes",
            hex::encode(&value[..value.len().min(64)])
        )));
    };
    if found != expected_digest {
        return Err(Problem::new(
            ProblemType::IncorrectResponse,
            format!(
                "the certificate from {peer} has acmeIdentifier {}; expected {}, the SHA-256 digest of the key \
                 authorization",
                hex::encode(found),
                hex::encode(expected_digest)
            ),
        ));
    }
    Ok(())
}

/// Checks that the certificate names `target` and nothing else; returns
/// the reason otherwise.
fn check_subject_alt_name(certificate: &X509Certificate<'_>, target: &Target) -> Result<(), String> {
    let expected = match target {
        Target::Name(name) => format!("dNSName {name}"),
        Target::Ip(address) => format!("iPAddress {address}"),
    };

    let mut san_extensions =
        certificate.extensions().iter().filter(|extension| extension.oid.to_id_string() == SUBJECT_ALT_NAME_OID);
    let Some(extension) = san_extensions.next() else {
        return Err(format!("has no subjectAltName extension; expected exactly one entry, {expected}"));
    };
    if san_extensions.next().is_some() {
        return Err("has more than one subjectAltName extension".to_owned());
    }
    let ParsedExtension::SubjectAlternativeName(san) = extension.parsed_extension() else {
        return Err("has a subjectAltName extension that cannot be parsed".to_owned());
    };

    let names = &san.general_names;
    let matches = match (names.as_slice(), target) {
        ([GeneralName::DNSName(found)], Target::Name(name)) => found.eq_ignore_ascii_case(name),
        ([GeneralName::IPAddress(found)], Target::Ip(IpAddr::V4(v4))) => *found == v4.octets(),
        ([GeneralName::IPAddress(found)], Target::Ip(IpAddr::V6(v6))) => *found == v6.octets(),
        _ => false,
    };
    if matches {
        return Ok(());
    }
    let found: Vec<String> = names.iter().map(describe_name).collect();
    Err(format!("has subjectAltName entries [{}]; expected exactly one entry, {expected}", found.join(", ")))
}

fn describe_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::DNSName(dns) => format!("dNSName {dns:?}"),
        GeneralName::IPAddress(bytes) => match bytes.len() {
            4 => {
                let octets: [u8; 4] = [bytes[0], bytes[1], bytes[2], bytes[3]];
                format!("iPAddress {}", IpAddr::from(octets))
            }
            16 => {
                let mut octets = [0_u8; 16];
                octets.copy_from_slice(bytes);
                format!("iPAddress {}", IpAddr::from(octets))
            }
            _ => format!("iPAddress of {} bytes", bytes.len()),
        },
        other => format!("{other}"),
    }
}
