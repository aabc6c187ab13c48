//! The issuing CA: an intermediate certificate whose private key lives in the HSM, its chain and
//! roots, and the building and signing of leaf certificates from a profile.

use std::cell::RefCell;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SigningKey, SubjectPublicKeyInfo,
};
use ring::digest::{SHA256, digest};
use rustls_pki_types::CertificateDer;
use sigil_hsm::{Hsm, HsmError, KeyRef, KeyType};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::csr::{KeyKind, SubjectAttribute};

/// Serial numbers are 16 octets: 126 bits from the CSPRNG, the top bit clear so the INTEGER is
/// positive, and the next bit set so the encoding is minimal and always 16 octets.
pub const SERIAL_BYTES: usize = 16;

/// Failure to load the CA or to sign with it.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("no CA is installed in the ledger; run `sigil init` (and `sigil ca install` for an offline root)")]
    NotInstalled,
    #[error(
        "HSM key {label:?} does not match the installed intermediate certificate {subject:?}: the certificate's public key differs from the key in the HSM"
    )]
    KeyMismatch { label: String, subject: String },
    #[error("invalid CA certificate: {reason}")]
    InvalidCertificate { reason: String },
    #[error("intermediate CA certificate {subject:?} expired at {not_after}")]
    Expired { subject: String, not_after: String },
    #[error("HSM operation failed: {0}")]
    Hsm(#[from] HsmError),
    #[error("build certificate: {0}")]
    Build(String),
    #[error(
        "intermediate {subject:?} has pathLenConstraint {limit}, so it cannot sign a CA with path length {requested}; \
         re-issue the intermediate with a path length above {requested} (`ca.path_len` for a development root)"
    )]
    PathLength { subject: String, limit: u32, requested: u32 },
}

/// A key in the HSM, adapted to rcgen's signing interface.
#[derive(Clone)]
pub struct HsmSigner {
    hsm: Hsm,
    key: KeyRef,
    spki_der: Vec<u8>,
    public_key_bits: Vec<u8>,
    algorithm: &'static rcgen::SignatureAlgorithm,
}

impl HsmSigner {
    /// Reads the public half of `key` from the HSM.
    ///
    /// # Errors
    ///
    /// Fails when the HSM cannot return the public key or its encoding is not understood.
    pub fn new(hsm: Hsm, key: KeyRef) -> Result<HsmSigner, CaError> {
        let spki_der = hsm.public_key_spki_der(&key)?;
        let parsed = SubjectPublicKeyInfo::from_der(&spki_der)
            .map_err(|e| CaError::InvalidCertificate { reason: format!("HSM public key of {:?}: {e}", key.label()) })?;
        let algorithm = match key.key_type() {
            KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Rsa3072 => &rcgen::PKCS_RSA_SHA256,
        };
        Ok(HsmSigner { hsm, public_key_bits: parsed.der_bytes().to_vec(), spki_der, key, algorithm })
    }

    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    pub fn key(&self) -> &KeyRef {
        &self.key
    }

    pub fn hsm(&self) -> &Hsm {
        &self.hsm
    }
}

thread_local! {
    /// The HSM error of the last failed signature on this thread. rcgen reports only "remote key
    /// error", and its signing call runs on the caller's thread, so the real cause is kept here.
    static LAST_SIGN_ERROR: RefCell<Option<HsmError>> = const { RefCell::new(None) };
}

/// Runs an rcgen operation that signs with an [`HsmSigner`], returning the HSM's own error when
/// signing was what failed.
fn with_hsm_errors<T>(operation: impl FnOnce() -> Result<T, rcgen::Error>) -> Result<T, CaError> {
    LAST_SIGN_ERROR.with(|slot| slot.borrow_mut().take());
    operation().map_err(|error| match LAST_SIGN_ERROR.with(|slot| slot.borrow_mut().take()) {
        Some(hsm_error) => CaError::Hsm(hsm_error),
        None => CaError::Build(error.to_string()),
    })
}

impl PublicKeyData for HsmSigner {
    fn der_bytes(&self) -> &[u8] {
        &self.public_key_bits
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.algorithm
    }
}

impl SigningKey for HsmSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.hsm.sign(&self.key, message).map_err(|error| {
            LAST_SIGN_ERROR.with(|slot| *slot.borrow_mut() = Some(error));
            rcgen::Error::RemoteKeyError
        })
    }
}

/// A certificate chain the CA issues under: the intermediates (leaf-most first) and the roots.
#[derive(Debug, Clone)]
pub struct CaChain {
    pub intermediates_der: Vec<Vec<u8>>,
    pub roots_der: Vec<Vec<u8>>,
}

/// Identity and validity of the issuing intermediate, read from its certificate.
#[derive(Debug, Clone)]
pub struct CaSummary {
    pub subject: String,
    pub not_after: OffsetDateTime,
    pub fingerprint_sha256: String,
    pub key_type: KeyType,
    pub key_label: String,
    /// The intermediate's pathLenConstraint: `None` when it has none, `Some(0)` when it may sign
    /// only leaves.
    pub path_len: Option<u32>,
}

/// What a leaf certificate is for, which decides its names and extended key usages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafUsage {
    /// An X509-SVID: a URI SAN with the SPIFFE ID, server and client authentication.
    Svid,
    /// A TLS server certificate, as ACME issues: DNS and IP SANs only, server authentication only.
    TlsServer,
}

/// HTTP URLs a TLS server certificate points to: the issuing CA's certificate (authority
/// information access, caIssuers) and the CRL (CRL distribution points).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub ca_issuers_url: String,
    pub crl_url: String,
}

/// A revoked certificate, as a CRL lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedEntry {
    pub serial: Vec<u8>,
    pub revoked_at: OffsetDateTime,
    /// RFC 5280 reason code; 0 (unspecified) is left out of the CRL entry.
    pub reason: u8,
}

/// Object identifier of the CA/Browser Forum's domain-validated certificate policy.
const POLICY_DOMAIN_VALIDATED: &[u64] = &[2, 23, 140, 1, 2, 1];
const OID_CERTIFICATE_POLICIES: &[u64] = &[2, 5, 29, 32];
const OID_AUTHORITY_INFO_ACCESS: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 1, 1];

/// A leaf certificate request after every check: the public key and names to certify.
#[derive(Debug, Clone)]
pub struct LeafRequest<'a> {
    pub usage: LeafUsage,
    pub spki_der: &'a [u8],
    pub key_kind: KeyKind,
    /// The SPIFFE ID of an X509-SVID; empty for a TLS server certificate.
    pub spiffe_id: &'a str,
    /// Where relying parties find the issuer's certificate and the CRL (TLS server certificates).
    pub publication: Option<&'a Publication>,
    pub dns_names: &'a [String],
    pub ip_addresses: &'a [std::net::IpAddr],
    pub ttl: Duration,
}

/// A signed leaf certificate.
#[derive(Debug, Clone)]
pub struct IssuedLeaf {
    pub der: Vec<u8>,
    pub serial: Vec<u8>,
    pub not_after: OffsetDateTime,
    pub sha256: [u8; 32],
}

/// The intermediate CA that signs leaves.
pub struct IssuingCa {
    issuer: Issuer<'static, HsmSigner>,
    chain: CaChain,
    summary: CaSummary,
    organization: String,
    backdate: Duration,
}

impl IssuingCa {
    /// Loads the CA from its chain and proves that the HSM key belongs to the intermediate: the
    /// public keys must be equal and a test signature must verify with the certificate's key.
    ///
    /// # Errors
    ///
    /// [`CaError::KeyMismatch`] when the HSM key is not the certificate's key; other variants when
    /// the certificate cannot be parsed, has expired, or the HSM fails.
    pub fn load(
        signer: HsmSigner,
        chain: CaChain,
        organization: &str,
        backdate: Duration,
    ) -> Result<IssuingCa, CaError> {
        let intermediate = chain.intermediates_der.first().ok_or_else(|| CaError::InvalidCertificate {
            reason: "the chain has no intermediate certificate".to_owned(),
        })?;
        let (_, cert) = X509Certificate::from_der(intermediate)
            .map_err(|e| CaError::InvalidCertificate { reason: format!("parse intermediate: {e}") })?;
        let subject = cert.subject().to_string();

        if cert.public_key().raw != signer.spki_der() {
            return Err(CaError::KeyMismatch { label: signer.key().label().to_owned(), subject });
        }
        prove_key_possession(&signer, &cert)?;

        let not_after = cert.validity().not_after.to_datetime();
        if not_after <= OffsetDateTime::now_utc() {
            return Err(CaError::Expired { subject, not_after: not_after.to_string() });
        }
        require_subject_key_identifier(&cert)?;
        let key_type = signer.key().key_type();
        let key_label = signer.key().label().to_owned();
        let path_len = path_len_constraint(&cert);
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(intermediate.as_slice()), signer)
            .map_err(|e| CaError::InvalidCertificate { reason: format!("intermediate as issuer: {e}") })?;
        let summary = CaSummary {
            subject,
            not_after,
            fingerprint_sha256: hex::encode(digest(&SHA256, intermediate)),
            key_type,
            key_label,
            path_len,
        };
        Ok(IssuingCa { issuer, chain, summary, organization: organization.to_owned(), backdate })
    }

    pub fn chain(&self) -> &CaChain {
        &self.chain
    }

    /// Signs a CRL listing `revoked`, valid from `this_update` to `next_update`. BLOCKING: it
    /// calls the HSM.
    ///
    /// # Errors
    ///
    /// Fails when the HSM cannot sign or a serial is invalid.
    pub fn sign_crl(
        &self,
        revoked: &[RevokedEntry],
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
        crl_number: u64,
    ) -> Result<Vec<u8>, CaError> {
        let revoked_certs = revoked
            .iter()
            .map(|entry| rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(&entry.serial),
                revocation_time: entry.revoked_at,
                reason_code: revocation_reason(entry.reason),
                invalidity_date: None,
            })
            .collect();
        let params = rcgen::CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = with_hsm_errors(|| params.signed_by(&self.issuer))?;
        Ok(crl.der().to_vec())
    }

    pub fn summary(&self) -> &CaSummary {
        &self.summary
    }

    /// Builds and signs a leaf from the X509-SVID profile. BLOCKING: it calls the HSM.
    ///
    /// The certificate's extensions come from the profile alone. It has one URI SAN with the SPIFFE
    /// ID, DNS and IP SANs, basicConstraints cA FALSE (critical), and keyUsage digitalSignature
    /// (critical, with keyEncipherment for RSA keys). It also has EKU serverAuth and clientAuth, an
    /// SKI, and an AKI equal to the issuer's SKI. notAfter is clamped to the issuer's.
    ///
    /// # Errors
    ///
    /// Fails when the public key is not understood or the HSM cannot sign.
    pub fn issue_leaf(&self, request: &LeafRequest<'_>, now: OffsetDateTime) -> Result<IssuedLeaf, CaError> {
        let public_key = SubjectPublicKeyInfo::from_der(request.spki_der)
            .map_err(|e| CaError::Build(format!("subject public key: {e}")))?;
        let serial = random_serial();
        let not_after = (now + request.ttl).min(self.summary.not_after);

        let mut params = CertificateParams::default();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = now - self.backdate;
        params.not_after = not_after;
        params.subject_alt_names = leaf_subject_alt_names(request)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if request.key_kind.is_rsa() {
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        match request.usage {
            LeafUsage::Svid => {
                params.distinguished_name = leaf_subject(&self.organization, request.dns_names);
                params.extended_key_usages =
                    vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            }
            LeafUsage::TlsServer => {
                params.distinguished_name = tls_server_subject(request.dns_names);
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                // The validity counts both ends (RFC 5280), so a TTL of 7 days gives exactly 7 days.
                params.not_after =
                    (params.not_before + request.ttl - Duration::from_secs(1)).min(self.summary.not_after);
                add_tls_server_extensions(&mut params, request.publication);
            }
        }
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;

        let certificate = with_hsm_errors(|| params.signed_by(&public_key, &self.issuer))?;

        let der = certificate.der().to_vec();
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(digest(&SHA256, &der).as_ref());
        Ok(IssuedLeaf { der, serial, not_after, sha256 })
    }
}

impl IssuingCa {
    /// Builds and signs a CA certificate for a downstream CA. BLOCKING: it calls the HSM.
    ///
    /// The certificate has basicConstraints cA TRUE with the requested path length (critical),
    /// keyUsage keyCertSign, cRLSign and digitalSignature (critical) and nothing more, one URI SAN
    /// with the trust domain's ID, an SKI, and an AKI equal to the issuer's SKI. Its subject keeps
    /// the CSR's country, organization, unit and common name and adds the serial number, so that
    /// every minted CA has its own subject. notAfter is clamped to the issuer's.
    ///
    /// # Errors
    ///
    /// [`CaError::PathLength`] when the intermediate's own path length does not allow a CA below
    /// it; other variants when the key is not understood or the HSM cannot sign.
    pub fn issue_ca(&self, request: &DownstreamCaRequest<'_>, now: OffsetDateTime) -> Result<IssuedLeaf, CaError> {
        self.check_path_len(request.path_len)?;
        let public_key = SubjectPublicKeyInfo::from_der(request.spki_der)
            .map_err(|e| CaError::Build(format!("subject public key: {e}")))?;
        let serial = random_serial();
        let not_after = (now + request.ttl).min(self.summary.not_after);
        let uri = format!("spiffe://{}", request.trust_domain);

        let mut params = CertificateParams::default();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = now - self.backdate;
        params.not_after = not_after;
        params.distinguished_name = downstream_subject(request, &self.organization, &serial)?;
        params.subject_alt_names =
            vec![SanType::URI(uri.as_str().try_into().map_err(|e| CaError::Build(format!("URI SAN {uri:?}: {e}")))?)];
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(request.path_len));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;

        let certificate = with_hsm_errors(|| params.signed_by(&public_key, &self.issuer))?;
        let der = certificate.der().to_vec();
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(digest(&SHA256, &der).as_ref());
        Ok(IssuedLeaf { der, serial, not_after, sha256 })
    }

    /// Checks that the intermediate may sign a CA of path length `requested`: its own path length
    /// must be above it (RFC 5280, section 4.2.1.9).
    fn check_path_len(&self, requested: u8) -> Result<(), CaError> {
        match self.summary.path_len {
            Some(limit) if limit <= u32::from(requested) => {
                Err(CaError::PathLength { subject: self.summary.subject.clone(), limit, requested: requested.into() })
            }
            _ => Ok(()),
        }
    }
}

/// A downstream CA certificate request after every check.
#[derive(Debug, Clone)]
pub struct DownstreamCaRequest<'a> {
    pub spki_der: &'a [u8],
    pub trust_domain: &'a str,
    /// Subject attributes taken from the CSR.
    pub subject: &'a [(SubjectAttribute, String)],
    pub path_len: u8,
    pub ttl: Duration,
}

const OID_SERIAL_NUMBER: &[u64] = &[2, 5, 4, 5];

fn downstream_subject(
    request: &DownstreamCaRequest<'_>,
    organization: &str,
    serial: &[u8],
) -> Result<DistinguishedName, CaError> {
    let mut name = DistinguishedName::new();
    for (attribute, value) in request.subject {
        let kind = match attribute {
            SubjectAttribute::Country => DnType::CountryName,
            SubjectAttribute::Organization => DnType::OrganizationName,
            SubjectAttribute::OrganizationalUnit => DnType::OrganizationalUnitName,
            SubjectAttribute::CommonName => DnType::CommonName,
        };
        name.push(kind, value.as_str());
    }
    if request.subject.is_empty() {
        name.push(DnType::OrganizationName, organization);
        name.push(DnType::CommonName, format!("Downstream CA for {}", request.trust_domain));
    }
    let serial_text = rcgen::string::PrintableString::try_from(hex::encode(serial))
        .map_err(|e| CaError::Build(format!("subject serial number: {e}")))?;
    name.push(DnType::CustomDnType(OID_SERIAL_NUMBER.to_vec()), rcgen::DnValue::PrintableString(serial_text));
    Ok(name)
}

fn path_len_constraint(cert: &X509Certificate<'_>) -> Option<u32> {
    cert.basic_constraints().ok().flatten().and_then(|constraints| constraints.value.path_len_constraint)
}

fn leaf_subject(organization: &str, dns_names: &[String]) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, organization);
    if let Some(first) = dns_names.first() {
        name.push(DnType::CommonName, first.as_str());
    }
    name
}

/// Adds the certificate policy and the pointers to the issuer's certificate and CRL that TLS
/// clients and the CA/Browser Forum's profile expect.
fn add_tls_server_extensions(params: &mut CertificateParams, publication: Option<&Publication>) {
    let mut policy = yasna::construct_der(|writer| {
        writer.write_sequence(|writer| {
            writer.next().write_sequence(|writer| {
                writer.next().write_oid(&yasna::models::ObjectIdentifier::from_slice(POLICY_DOMAIN_VALIDATED));
            });
        });
    });
    params
        .custom_extensions
        .push(rcgen::CustomExtension::from_oid_content(OID_CERTIFICATE_POLICIES, std::mem::take(&mut policy)));
    let Some(publication) = publication else {
        return;
    };
    let access = yasna::construct_der(|writer| {
        writer.write_sequence(|writer| {
            writer.next().write_sequence(|writer| {
                writer.next().write_oid(&yasna::models::ObjectIdentifier::from_slice(&[1, 3, 6, 1, 5, 5, 7, 48, 2]));
                writer.next().write_tagged_implicit(yasna::Tag::context(6), |writer| {
                    writer.write_ia5_string(&publication.ca_issuers_url);
                });
            });
        });
    });
    params.custom_extensions.push(rcgen::CustomExtension::from_oid_content(OID_AUTHORITY_INFO_ACCESS, access));
    params.crl_distribution_points = vec![rcgen::CrlDistributionPoint { uris: vec![publication.crl_url.clone()] }];
}

/// The subject of a TLS server certificate: the first DNS name as common name, or no name at
/// all when there is none, since the SANs carry the identities.
fn tls_server_subject(dns_names: &[String]) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    if let Some(first) = dns_names.first().filter(|first| first.len() <= 64) {
        name.push(DnType::CommonName, first.as_str());
    }
    name
}

fn leaf_subject_alt_names(request: &LeafRequest<'_>) -> Result<Vec<SanType>, CaError> {
    let mut names = Vec::new();
    if request.usage == LeafUsage::Svid {
        let uri = request
            .spiffe_id
            .try_into()
            .map_err(|e| CaError::Build(format!("URI SAN {:?}: {e}", request.spiffe_id)))?;
        names.push(SanType::URI(uri));
    }
    for dns in request.dns_names {
        let name = dns.as_str().try_into().map_err(|e| CaError::Build(format!("DNS SAN {dns:?}: {e}")))?;
        names.push(SanType::DnsName(name));
    }
    names.extend(request.ip_addresses.iter().copied().map(SanType::IpAddress));
    Ok(names)
}

fn revocation_reason(code: u8) -> Option<rcgen::RevocationReason> {
    use rcgen::RevocationReason as Reason;
    match code {
        1 => Some(Reason::KeyCompromise),
        2 => Some(Reason::CaCompromise),
        3 => Some(Reason::AffiliationChanged),
        4 => Some(Reason::Superseded),
        5 => Some(Reason::CessationOfOperation),
        6 => Some(Reason::CertificateHold),
        8 => Some(Reason::RemoveFromCrl),
        9 => Some(Reason::PrivilegeWithdrawn),
        10 => Some(Reason::AaCompromise),
        _ => None,
    }
}

/// Returns a positive 16-octet serial with 126 random bits from the operating system's CSPRNG.
pub fn random_serial() -> Vec<u8> {
    let mut serial = vec![0u8; SERIAL_BYTES];
    rand::fill(&mut serial[..]);
    serial[0] = (serial[0] & 0x3f) | 0x40;
    serial
}

/// Signs a fixed challenge with the HSM key and verifies it with the certificate's public key.
fn prove_key_possession(signer: &HsmSigner, cert: &X509Certificate<'_>) -> Result<(), CaError> {
    const CHALLENGE: &[u8] = b"sigil start-up key check";
    let signature = signer.hsm().sign(signer.key(), CHALLENGE)?;
    let algorithm: &dyn ring::signature::VerificationAlgorithm = match signer.key().key_type() {
        KeyType::EcP256 => &ring::signature::ECDSA_P256_SHA256_ASN1,
        KeyType::EcP384 => &ring::signature::ECDSA_P384_SHA384_ASN1,
        KeyType::Rsa3072 => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
    };
    let key_bits = &cert.public_key().subject_public_key.data;
    ring::signature::UnparsedPublicKey::new(algorithm, key_bits).verify(CHALLENGE, &signature).map_err(|_| {
        CaError::KeyMismatch { label: signer.key().label().to_owned(), subject: cert.subject().to_string() }
    })
}

/// Checks that a CA certificate has a subject key identifier, which leaves copy into their AKI.
fn require_subject_key_identifier(cert: &X509Certificate<'_>) -> Result<(), CaError> {
    let has_ski = cert
        .extensions()
        .iter()
        .any(|ext| matches!(ext.parsed_extension(), x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(_)));
    if has_ski {
        return Ok(());
    }
    Err(CaError::InvalidCertificate {
        reason: format!("CA certificate {} has no subject key identifier", cert.subject()),
    })
}

/// Parameters of a CA certificate that `sigil init` creates or requests.
pub struct CaCertificateSpec<'a> {
    pub common_name: &'a str,
    pub organization: &'a str,
    pub validity: Duration,
    /// None for a root (no path length limit); for an intermediate, how many CA levels may follow it.
    pub path_len: Option<u8>,
}

fn ca_params(spec: &CaCertificateSpec<'_>, now: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, spec.organization);
    name.push(DnType::CommonName, spec.common_name);
    params.distinguished_name = name;
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    params.not_before = now - Duration::from_secs(300);
    params.not_after = now + spec.validity;
    params.is_ca = match spec.path_len {
        Some(len) => IsCa::Ca(BasicConstraints::Constrained(len)),
        None => IsCa::Ca(BasicConstraints::Unconstrained),
    };
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.key_identifier_method = KeyIdMethod::Sha256;
    params
}

/// Creates a self-signed root certificate for a key in the HSM (dev mode only).
///
/// # Errors
///
/// Fails when the HSM cannot sign.
pub fn self_signed_root(signer: &HsmSigner, spec: &CaCertificateSpec<'_>) -> Result<Vec<u8>, CaError> {
    let params = ca_params(spec, OffsetDateTime::now_utc());
    let certificate = with_hsm_errors(|| params.self_signed(signer))?;
    Ok(certificate.der().to_vec())
}

/// Signs a CA certificate for `subject`'s key with `issuer`'s key (dev mode only).
///
/// # Errors
///
/// Fails when the issuer certificate cannot be parsed or the HSM cannot sign.
pub fn sign_intermediate(
    subject: &HsmSigner,
    issuer: &HsmSigner,
    issuer_cert_der: &[u8],
    spec: &CaCertificateSpec<'_>,
) -> Result<Vec<u8>, CaError> {
    let mut params = ca_params(spec, OffsetDateTime::now_utc());
    params.use_authority_key_identifier_extension = true;
    let (_, issuer_cert) = X509Certificate::from_der(issuer_cert_der)
        .map_err(|e| CaError::InvalidCertificate { reason: format!("parse issuer: {e}") })?;
    params.not_after = params.not_after.min(issuer_cert.validity().not_after.to_datetime());
    require_subject_key_identifier(&issuer_cert)?;
    let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(issuer_cert_der), issuer)
        .map_err(|e| CaError::InvalidCertificate { reason: format!("issuer certificate: {e}") })?;

    let subject_key = SubjectPublicKeyInfo::from_der(subject.spki_der())
        .map_err(|e| CaError::Build(format!("subject public key: {e}")))?;
    let certificate = with_hsm_errors(|| params.signed_by(&subject_key, &issuer))?;
    Ok(certificate.der().to_vec())
}

/// Writes a PKCS#10 request for the intermediate key, for an offline root to sign.
///
/// # Errors
///
/// Fails when the HSM cannot sign.
pub fn intermediate_csr(signer: &HsmSigner, spec: &CaCertificateSpec<'_>) -> Result<String, CaError> {
    // A CSR carries only the subject; the offline root decides the CA extensions and validity.
    let mut params = CertificateParams::default();
    params.distinguished_name = ca_params(spec, OffsetDateTime::now_utc()).distinguished_name;
    let request = with_hsm_errors(|| params.serialize_request(signer))?;
    request.pem().map_err(|e| CaError::Build(format!("encode CSR as PEM: {e}")))
}

/// Checks a chain offered to `sigil ca install`: the intermediate is a CA certificate for the HSM
/// key, each certificate is signed by the next, the last by one of the roots, and the roots are
/// self-signed CA certificates.
///
/// # Errors
///
/// Names the certificate and the failed check.
pub fn check_chain(signer: &HsmSigner, chain: &CaChain) -> Result<(), CaError> {
    let invalid = |reason: String| CaError::InvalidCertificate { reason };

    let Some(first) = chain.intermediates_der.first() else {
        return Err(invalid("no intermediate certificate given".to_owned()));
    };
    if chain.roots_der.is_empty() {
        return Err(invalid("no root certificate given".to_owned()));
    }
    let intermediate = parse(first, "intermediate")?;
    if intermediate.public_key().raw != signer.spki_der() {
        return Err(CaError::KeyMismatch {
            label: signer.key().label().to_owned(),
            subject: intermediate.subject().to_string(),
        });
    }
    for (index, der) in chain.intermediates_der.iter().enumerate() {
        let cert = parse(der, "intermediate")?;
        if !cert.is_ca() {
            return Err(invalid(format!(
                "certificate {} is not a CA certificate (basicConstraints cA is not TRUE)",
                cert.subject()
            )));
        }
        let issuer = match chain.intermediates_der.get(index + 1) {
            Some(next) => parse(next, "intermediate")?,
            None => find_issuer(&cert, &chain.roots_der)?,
        };
        cert.verify_signature(Some(issuer.public_key())).map_err(|e| {
            invalid(format!("signature of {} does not verify with {}'s key: {e}", cert.subject(), issuer.subject()))
        })?;
    }
    for der in &chain.roots_der {
        let root = parse(der, "root")?;
        root.verify_signature(None).map_err(|e| invalid(format!("root {} is not self-signed: {e}", root.subject())))?;
    }
    Ok(())
}

fn parse<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, CaError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| CaError::InvalidCertificate { reason: format!("parse {what}: {e}") })
}

fn find_issuer<'a>(cert: &X509Certificate<'_>, roots: &'a [Vec<u8>]) -> Result<X509Certificate<'a>, CaError> {
    roots
        .iter()
        .filter_map(|der| X509Certificate::from_der(der).ok().map(|(_, c)| c))
        .find(|root| root.subject() == cert.issuer())
        .ok_or_else(|| CaError::InvalidCertificate {
            reason: format!("no root certificate has the subject {} that issued {}", cert.issuer(), cert.subject()),
        })
}
