//! Checks on a PKCS#10 certificate signing request, in this order: size, parse, key type and size,
//! self-signature, then the names. The key type is checked before the signature because the
//! verifier depends on it: an unsupported key is named as such instead of failing as a bad
//! signature. Only the public key and the requested names are taken from a CSR; the profile
//! decides every extension of the certificate.

use std::fmt;

use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION, OID_PKCS1_SHA256WITHRSA,
    OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;

use crate::policy::check_dns_name;
use crate::spiffe_id::SpiffeId;

/// Largest CSR accepted, in bytes of DER or PEM.
pub const MAX_CSR_BYTES: usize = 64 * 1024;

const MIN_RSA_BITS: usize = 2048;
const MAX_RSA_BITS: usize = 4096;

/// The kind and size of a CSR's public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    EcP256,
    EcP384,
    Rsa { bits: usize },
    Ed25519,
}

impl KeyKind {
    pub fn is_rsa(self) -> bool {
        matches!(self, KeyKind::Rsa { .. })
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::EcP256 => f.write_str("EC P-256"),
            KeyKind::EcP384 => f.write_str("EC P-384"),
            KeyKind::Rsa { bits } => write!(f, "RSA {bits}"),
            KeyKind::Ed25519 => f.write_str("Ed25519"),
        }
    }
}

/// A CSR that passed every check that does not depend on the caller.
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    /// The SubjectPublicKeyInfo, DER, exactly as the CSR carried it.
    pub spki_der: Vec<u8>,
    pub key_kind: KeyKind,
    pub spiffe_id: SpiffeId,
    pub dns_names: Vec<String>,
}

/// Rejection of a CSR. Every message names the bad value and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is empty")]
    Empty,
    #[error("CSR is {size} bytes, above the maximum of {MAX_CSR_BYTES}")]
    TooLarge { size: usize },
    #[error("CSR is not valid PEM: {reason}")]
    Pem { reason: String },
    #[error("CSR is not a valid DER PKCS#10 request: {reason}")]
    Der { reason: String },
    #[error("CSR key type {key} is not supported; accepted: EC P-256, EC P-384, RSA 2048 to 4096 bits, Ed25519")]
    UnsupportedKey { key: String },
    #[error("CSR signature algorithm {algorithm} is not supported for a {key} key")]
    UnsupportedSignature { algorithm: String, key: KeyKind },
    #[error(
        "CSR signature does not verify with the CSR's own {key} key (is it DER-encoded and over the request info?)"
    )]
    BadSignature { key: KeyKind },
    #[error("CSR extension request cannot be parsed: {reason}")]
    BadExtensions { reason: String },
    #[error("CSR must have exactly one URI SAN with the SPIFFE ID, found {count}: {uris:?}")]
    UriSanCount { count: usize, uris: Vec<String> },
    #[error("CSR URI SAN {uri:?} is not a SPIFFE ID: {reason}")]
    BadSpiffeId { uri: String, reason: String },
    #[error("CSR SPIFFE ID {id} is in trust domain {found:?}, but this CA serves {expected:?}")]
    WrongTrustDomain { id: String, found: String, expected: String },
    #[error("CSR DNS SAN {name:?} is invalid: {reason}")]
    BadDnsName { name: String, reason: String },
    #[error("CSR has a {kind} SAN {value:?}; an X509-SVID may carry only one URI SAN and DNS names")]
    UnsupportedSan { kind: &'static str, value: String },
    #[error("CSR has a {kind} SAN {value:?}; a TLS server certificate may carry only DNS names and IP addresses")]
    UnsupportedTlsSan { kind: &'static str, value: String },
    #[error("CSR names no DNS name or IP address")]
    NoNames,
    #[error("CSR has {count} URI SANs {uris:?}; a downstream CA may carry at most one, the trust domain's ID")]
    CaUriSanCount { count: usize, uris: Vec<String> },
    #[error(
        "CSR URI SAN {uri} names a workload, not a trust domain; a downstream CA may carry only the trust domain's ID, such as spiffe://{trust_domain}"
    )]
    CaUriWithPath { uri: String, trust_domain: String },
    #[error("CSR has a {kind} SAN {value:?}; a downstream CA may carry only one URI SAN, the trust domain's ID")]
    UnsupportedCaSan { kind: &'static str, value: String },
    #[error("CSR requests basicConstraints cA FALSE, as a leaf does; a downstream CA request must not")]
    LeafRequest,
}

/// A downstream CA's CSR, as a SPIRE server sends, that passed every check that does not depend on
/// the caller.
#[derive(Debug, Clone)]
pub struct CheckedCaCsr {
    pub spki_der: Vec<u8>,
    pub key_kind: KeyKind,
    /// Trust domain of the CSR's URI SAN, when it has one.
    pub trust_domain: Option<String>,
    /// Country, organization, organizational unit and common name of the CSR's subject, in the
    /// order found.
    pub subject: Vec<(SubjectAttribute, String)>,
}

/// Subject attributes a minted CA keeps from its CSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectAttribute {
    Country,
    Organization,
    OrganizationalUnit,
    CommonName,
}

/// A TLS server CSR, as ACME finalize sends, that passed every check that does
/// not depend on the order.
#[derive(Debug, Clone)]
pub struct CheckedTlsCsr {
    pub spki_der: Vec<u8>,
    pub key_kind: KeyKind,
    /// DNS names from the SANs and the subject common name, lower case, sorted, without
    /// duplicates.
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<std::net::IpAddr>,
}

/// Runs every caller-independent check on `input`, which may be DER or PEM.
///
/// # Errors
///
/// Returns the first failed check.
pub fn check_csr(input: &[u8], trust_domain: &str) -> Result<CheckedCsr, CsrError> {
    let der = checked_der(input)?;
    let (csr, key_kind) = parse_and_verify(&der)?;
    let (spiffe_id, dns_names) = requested_names(&csr, trust_domain)?;
    Ok(CheckedCsr { spki_der: csr.certification_request_info.subject_pki.raw.to_vec(), key_kind, spiffe_id, dns_names })
}

/// Runs the same size, key and signature checks as [`check_csr`] on a TLS server CSR, and takes
/// its DNS names and IP addresses. URI and other SAN types are refused.
///
/// # Errors
///
/// Returns the first failed check.
pub fn check_tls_csr(input: &[u8]) -> Result<CheckedTlsCsr, CsrError> {
    let der = checked_der(input)?;
    let (csr, key_kind) = parse_and_verify(&der)?;
    let mut dns_names = Vec::new();
    let mut ip_addresses = Vec::new();
    for extension in csr.requested_extensions().into_iter().flatten() {
        match extension {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    collect_tls_name(name, &mut dns_names, &mut ip_addresses)?;
                }
            }
            ParsedExtension::ParseError { error } => {
                return Err(CsrError::BadExtensions { reason: error.to_string() });
            }
            _ => {}
        }
    }
    for common_name in csr.certification_request_info.subject.iter_common_name() {
        let value = common_name.as_str().map_err(|e| CsrError::Der { reason: format!("subject common name: {e}") })?;
        match value.parse::<std::net::IpAddr>() {
            Ok(address) => ip_addresses.push(address),
            Err(_) => dns_names.push(value.to_owned()),
        }
    }
    for name in &mut dns_names {
        *name = name.trim_end_matches('.').to_ascii_lowercase();
        let base = name.strip_prefix("*.").unwrap_or(name);
        check_dns_name(base).map_err(|reason| CsrError::BadDnsName { name: name.clone(), reason })?;
    }
    dns_names.sort();
    dns_names.dedup();
    ip_addresses.sort();
    ip_addresses.dedup();
    if dns_names.is_empty() && ip_addresses.is_empty() {
        return Err(CsrError::NoNames);
    }
    Ok(CheckedTlsCsr {
        spki_der: csr.certification_request_info.subject_pki.raw.to_vec(),
        key_kind,
        dns_names,
        ip_addresses,
    })
}

/// Runs the same size, key and signature checks as [`check_csr`] on a downstream CA's CSR. It
/// may carry at most one URI SAN, a trust domain's ID without a path, and no other SAN; it must not
/// ask to be a leaf.
///
/// # Errors
///
/// Returns the first failed check.
pub fn check_ca_csr(input: &[u8]) -> Result<CheckedCaCsr, CsrError> {
    let der = checked_der(input)?;
    let (csr, key_kind) = parse_and_verify(&der)?;
    let mut uris = Vec::new();
    for extension in csr.requested_extensions().into_iter().flatten() {
        match extension {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    collect_ca_name(name, &mut uris)?;
                }
            }
            ParsedExtension::BasicConstraints(constraints) if !constraints.ca => return Err(CsrError::LeafRequest),
            ParsedExtension::ParseError { error } => {
                return Err(CsrError::BadExtensions { reason: error.to_string() });
            }
            _ => {}
        }
    }
    let trust_domain = ca_trust_domain(uris)?;
    let subject = ca_subject_attributes(&csr)?;
    Ok(CheckedCaCsr {
        spki_der: csr.certification_request_info.subject_pki.raw.to_vec(),
        key_kind,
        trust_domain,
        subject,
    })
}

/// Parses a DER SubjectPublicKeyInfo, such as a JWT authority's key, and checks that its type is
/// one Sigil accepts in CSRs.
///
/// # Errors
///
/// [`CsrError::Der`] when it does not parse, [`CsrError::UnsupportedKey`] for another key type.
pub fn check_public_key(spki_der: &[u8]) -> Result<KeyKind, CsrError> {
    let (rest, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| CsrError::Der { reason: format!("public key is not a DER SubjectPublicKeyInfo: {e}") })?;
    if !rest.is_empty() {
        return Err(CsrError::Der { reason: format!("{} trailing bytes after the public key", rest.len()) });
    }
    let kind = classify_key(spki.algorithm.algorithm.clone(), &spki)?;
    spki.parsed().map_err(|e| CsrError::Der { reason: format!("public key: {e}") })?;
    let point = &*spki.subject_public_key.data;
    let expected = match kind {
        KeyKind::EcP256 => Some(65),
        KeyKind::EcP384 => Some(97),
        KeyKind::Ed25519 => Some(32),
        KeyKind::Rsa { .. } => None,
    };
    if let Some(len) = expected
        && (point.len() != len || (len != 32 && point[0] != 4))
    {
        return Err(CsrError::Der {
            reason: format!(
                "{kind} public key is {} bytes; expected an uncompressed point of {len} bytes",
                point.len()
            ),
        });
    }
    Ok(kind)
}

fn collect_ca_name(name: &GeneralName<'_>, uris: &mut Vec<String>) -> Result<(), CsrError> {
    let (kind, value) = match name {
        GeneralName::URI(uri) => {
            uris.push((*uri).to_owned());
            return Ok(());
        }
        GeneralName::DNSName(dns) => ("DNS", (*dns).to_owned()),
        GeneralName::IPAddress(bytes) => ("IP address", hex::encode(bytes)),
        GeneralName::RFC822Name(email) => ("email", (*email).to_owned()),
        other => ("other", format!("{other:?}")),
    };
    Err(CsrError::UnsupportedCaSan { kind, value })
}

fn ca_trust_domain(mut uris: Vec<String>) -> Result<Option<String>, CsrError> {
    if uris.len() > 1 {
        return Err(CsrError::CaUriSanCount { count: uris.len(), uris });
    }
    let Some(uri) = uris.pop() else {
        return Ok(None);
    };
    let id = SpiffeId::parse(&uri).map_err(|e| CsrError::BadSpiffeId { uri: uri.clone(), reason: e.to_string() })?;
    if !id.path().is_empty() {
        return Err(CsrError::CaUriWithPath { uri, trust_domain: id.trust_domain().to_owned() });
    }
    Ok(Some(id.trust_domain().to_owned()))
}

fn ca_subject_attributes(csr: &X509CertificationRequest<'_>) -> Result<Vec<(SubjectAttribute, String)>, CsrError> {
    use x509_parser::oid_registry::OID_X509_ORGANIZATIONAL_UNIT;
    use x509_parser::oid_registry::{OID_X509_COMMON_NAME, OID_X509_COUNTRY_NAME, OID_X509_ORGANIZATION_NAME};

    let mut attributes = Vec::new();
    for attribute in csr.certification_request_info.subject.iter_attributes() {
        let oid = attribute.attr_type();
        let kind = if *oid == OID_X509_COUNTRY_NAME {
            SubjectAttribute::Country
        } else if *oid == OID_X509_ORGANIZATION_NAME {
            SubjectAttribute::Organization
        } else if *oid == OID_X509_ORGANIZATIONAL_UNIT {
            SubjectAttribute::OrganizationalUnit
        } else if *oid == OID_X509_COMMON_NAME {
            SubjectAttribute::CommonName
        } else {
            continue;
        };
        let value = attribute
            .as_str()
            .map_err(|e| CsrError::Der { reason: format!("subject attribute {}: {e}", oid.to_id_string()) })?;
        if value.is_empty() || value.len() > 64 {
            return Err(CsrError::Der {
                reason: format!(
                    "subject attribute {} is {} bytes; 1 to 64 are allowed",
                    oid.to_id_string(),
                    value.len()
                ),
            });
        }
        attributes.push((kind, value.to_owned()));
    }
    Ok(attributes)
}

fn collect_tls_name(
    name: &GeneralName<'_>,
    dns_names: &mut Vec<String>,
    ip_addresses: &mut Vec<std::net::IpAddr>,
) -> Result<(), CsrError> {
    match name {
        GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
        GeneralName::IPAddress(bytes) => ip_addresses.push(ip_from_bytes(bytes)?),
        GeneralName::URI(uri) => {
            return Err(CsrError::UnsupportedTlsSan { kind: "URI", value: (*uri).to_owned() });
        }
        GeneralName::RFC822Name(email) => {
            return Err(CsrError::UnsupportedTlsSan { kind: "email", value: (*email).to_owned() });
        }
        other => return Err(CsrError::UnsupportedTlsSan { kind: "other", value: format!("{other:?}") }),
    }
    Ok(())
}

fn ip_from_bytes(bytes: &[u8]) -> Result<std::net::IpAddr, CsrError> {
    match bytes.len() {
        4 => Ok(std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).expect("length checked"))),
        16 => Ok(std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).expect("length checked"))),
        len => Err(CsrError::UnsupportedTlsSan {
            kind: "IP address",
            value: format!("{} ({len} bytes, expected 4 or 16)", hex::encode(bytes)),
        }),
    }
}

/// Checks the size and decodes PEM if the input is PEM.
fn checked_der(input: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, CsrError> {
    if input.is_empty() {
        return Err(CsrError::Empty);
    }
    if input.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge { size: input.len() });
    }

    decode_pem_if_present(input)
}

/// Parses the request, checks its key type and size, then its self-signature.
fn parse_and_verify(der: &[u8]) -> Result<(X509CertificationRequest<'_>, KeyKind), CsrError> {
    let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|e| CsrError::Der { reason: e.to_string() })?;
    if !rest.is_empty() {
        return Err(CsrError::Der { reason: format!("{} trailing bytes after the request", rest.len()) });
    }
    let info = &csr.certification_request_info;
    let key_kind = classify_key(info.subject_pki.algorithm.algorithm.clone(), &info.subject_pki)?;
    verify_signature(&csr, key_kind)?;
    Ok((csr, key_kind))
}

fn decode_pem_if_present(input: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, CsrError> {
    let trimmed = input.trim_ascii_start();
    if !trimmed.starts_with(b"-----BEGIN") {
        return Ok(std::borrow::Cow::Borrowed(input));
    }
    let block = pem::parse(trimmed).map_err(|e| CsrError::Pem { reason: e.to_string() })?;
    match block.tag() {
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => Ok(std::borrow::Cow::Owned(block.into_contents())),
        other => Err(CsrError::Pem { reason: format!("expected a CERTIFICATE REQUEST block, found {other:?}") }),
    }
}

fn classify_key(
    algorithm: x509_parser::der_parser::oid::Oid<'_>,
    spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>,
) -> Result<KeyKind, CsrError> {
    if algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => Ok(KeyKind::EcP256),
            Some(c) if c == OID_NIST_EC_P384 => Ok(KeyKind::EcP384),
            Some(c) => Err(CsrError::UnsupportedKey { key: format!("EC {}", curve_name(&c.to_id_string())) }),
            None => Err(CsrError::UnsupportedKey { key: "EC without a named curve".to_owned() }),
        };
    }
    if algorithm == OID_PKCS1_RSAENCRYPTION {
        let bits = rsa_modulus_bits(spki)?;
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(CsrError::UnsupportedKey { key: format!("RSA {bits}") });
        }
        return Ok(KeyKind::Rsa { bits });
    }
    if algorithm == OID_SIG_ED25519 {
        return Ok(KeyKind::Ed25519);
    }
    Err(CsrError::UnsupportedKey { key: key_algorithm_name(&algorithm.to_id_string()) })
}

fn rsa_modulus_bits(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<usize, CsrError> {
    let parsed = spki.parsed().map_err(|e| CsrError::Der { reason: format!("RSA public key: {e}") })?;
    let x509_parser::public_key::PublicKey::RSA(rsa) = parsed else {
        return Err(CsrError::Der { reason: "RSA public key is malformed".to_owned() });
    };
    let modulus = rsa.modulus;
    let Some(first) = modulus.iter().position(|&b| b != 0) else {
        return Ok(0);
    };
    let significant = &modulus[first..];
    Ok(significant.len() * 8 - significant[0].leading_zeros() as usize)
}

fn curve_name(oid: &str) -> String {
    match oid {
        "1.3.132.0.10" => "secp256k1".to_owned(),
        "1.3.132.0.35" => "P-521".to_owned(),
        "1.3.132.0.33" => "P-224".to_owned(),
        "1.2.840.10045.3.1.1" => "P-192".to_owned(),
        "1.3.36.3.3.2.8.1.1.7" => "brainpoolP256r1".to_owned(),
        other => format!("curve {other}"),
    }
}

fn key_algorithm_name(oid: &str) -> String {
    match oid {
        "1.3.101.113" => "Ed448".to_owned(),
        "1.3.101.110" => "X25519".to_owned(),
        "1.2.840.113549.1.1.10" => "RSASSA-PSS".to_owned(),
        "1.2.840.10040.4.1" => "DSA".to_owned(),
        other => format!("algorithm {other}"),
    }
}

fn verify_signature(csr: &X509CertificationRequest<'_>, key: KeyKind) -> Result<(), CsrError> {
    let oid = &csr.signature_algorithm.algorithm;
    let algorithm: &'static dyn VerificationAlgorithm = match key {
        KeyKind::EcP256 if *oid == OID_SIG_ECDSA_WITH_SHA256 => &signature::ECDSA_P256_SHA256_ASN1,
        KeyKind::EcP256 if *oid == OID_SIG_ECDSA_WITH_SHA384 => &signature::ECDSA_P256_SHA384_ASN1,
        KeyKind::EcP384 if *oid == OID_SIG_ECDSA_WITH_SHA384 => &signature::ECDSA_P384_SHA384_ASN1,
        KeyKind::EcP384 if *oid == OID_SIG_ECDSA_WITH_SHA256 => &signature::ECDSA_P384_SHA256_ASN1,
        KeyKind::Rsa { .. } if *oid == OID_PKCS1_SHA256WITHRSA => &signature::RSA_PKCS1_2048_8192_SHA256,
        KeyKind::Rsa { .. } if *oid == OID_PKCS1_SHA384WITHRSA => &signature::RSA_PKCS1_2048_8192_SHA384,
        KeyKind::Rsa { .. } if *oid == OID_PKCS1_SHA512WITHRSA => &signature::RSA_PKCS1_2048_8192_SHA512,
        KeyKind::Ed25519 if *oid == OID_SIG_ED25519 => &signature::ED25519,
        _ => return Err(CsrError::UnsupportedSignature { algorithm: oid.to_id_string(), key }),
    };

    let info = &csr.certification_request_info;
    let public_key = UnparsedPublicKey::new(algorithm, &*info.subject_pki.subject_public_key.data);
    public_key.verify(info.raw, &csr.signature_value.data).map_err(|_| CsrError::BadSignature { key })
}

fn requested_names(
    csr: &X509CertificationRequest<'_>,
    trust_domain: &str,
) -> Result<(SpiffeId, Vec<String>), CsrError> {
    let mut uris = Vec::new();
    let mut dns_names = Vec::new();

    // x509-parser reports an extension it cannot parse as UnsupportedExtension or ParseError.
    for extension in csr.requested_extensions().into_iter().flatten() {
        match extension {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    collect_name(name, &mut uris, &mut dns_names)?;
                }
            }
            ParsedExtension::ParseError { error } => {
                return Err(CsrError::BadExtensions { reason: error.to_string() });
            }
            _ => {}
        }
    }

    if uris.len() != 1 {
        return Err(CsrError::UriSanCount { count: uris.len(), uris });
    }
    let uri = uris.remove(0);
    let spiffe_id =
        SpiffeId::parse(&uri).map_err(|e| CsrError::BadSpiffeId { uri: uri.clone(), reason: e.to_string() })?;
    if spiffe_id.trust_domain() != trust_domain {
        return Err(CsrError::WrongTrustDomain {
            id: spiffe_id.to_string(),
            found: spiffe_id.trust_domain().to_owned(),
            expected: trust_domain.to_owned(),
        });
    }
    for name in &dns_names {
        check_dns_name(name).map_err(|reason| CsrError::BadDnsName { name: name.clone(), reason })?;
    }
    dns_names.sort();
    dns_names.dedup();
    Ok((spiffe_id, dns_names))
}

fn collect_name(name: &GeneralName<'_>, uris: &mut Vec<String>, dns_names: &mut Vec<String>) -> Result<(), CsrError> {
    match name {
        GeneralName::URI(uri) => uris.push((*uri).to_owned()),
        GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
        GeneralName::IPAddress(bytes) => {
            return Err(CsrError::UnsupportedSan { kind: "IP address", value: hex::encode(bytes) });
        }
        GeneralName::RFC822Name(email) => {
            return Err(CsrError::UnsupportedSan { kind: "email", value: (*email).to_owned() });
        }
        other => return Err(CsrError::UnsupportedSan { kind: "other", value: format!("{other:?}") }),
    }
    Ok(())
}
