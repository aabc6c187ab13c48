//! The client credential the plugin presents to Sigil, and the CA bundle it trusts Sigil's nodes
//! with. The PEM files are read and checked when SPIRE configures the plugin, so a wrong path or
//! a mismatched key is reported at once rather than at the first mint.

use std::fmt;
use std::path::Path;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use x509_parser::extensions::GeneralName;
use zeroize::Zeroizing;

use crate::config::{BUNDLE_PATH, CLIENT_CERT_PATH, CLIENT_KEY_PATH, Settings};

/// TLS material for calls to Sigil. Debug shows the client identity only, never the key.
#[derive(Clone)]
pub struct Credentials {
    pub tls: ClientTlsConfig,
    /// The certificates of `bundle_path`, PEM, which `tls` trusts.
    bundle_pem: Vec<u8>,
    identity: Identity,
    /// URI SAN of the client certificate: the SPIFFE ID that Sigil's policy matches.
    pub client_id: Option<String>,
    /// Expiry of the client certificate, seconds since the Unix epoch.
    pub not_after: i64,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("client_id", &self.client_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Reads and checks the three PEM files named in `settings`. `now` is seconds since the Unix
/// epoch, for the validity check of the client certificate.
///
/// # Errors
///
/// Returns one message per problem, each naming the key and the file: a file that cannot be
/// read, contains no PEM object of the expected kind, contains a certificate that does not parse or
/// is outside its validity period, or a key that does not belong to the certificate.
pub fn load(settings: &Settings, now: i64) -> Result<Credentials, Vec<String>> {
    let mut errors = Vec::new();
    let client = load_client_certificate(&settings.client_cert_path, now).map_err(|error| errors.push(error)).ok();
    let key = load_private_key(&settings.client_key_path).map_err(|error| errors.push(error)).ok();
    let bundle = load_bundle(&settings.bundle_path).map_err(|error| errors.push(error)).ok();

    let (Some(client), Some(key), Some(bundle)) = (client, key, bundle) else {
        return Err(errors);
    };
    if let Err(error) = check_key_matches(&key, &client.public_key, settings) {
        return Err(vec![error]);
    }
    let identity = Identity::from_pem(client.pem.as_slice(), key.pem.as_slice());
    let tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(bundle.as_slice())).identity(identity.clone());
    Ok(Credentials { tls, bundle_pem: bundle, identity, client_id: client.uri, not_after: client.not_after })
}

impl Credentials {
    /// Returns credentials that also trust `roots_der`, such as the roots Sigil's bundle lists
    /// after a CA rotation. Sigil's nodes renew their TLS certificates under the new root, and a
    /// file at `bundle_path` written before the rotation lacks it.
    pub fn with_roots(&self, roots_der: &[Vec<u8>]) -> Credentials {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.bundle_pem.as_slice()));
        for der in roots_der {
            let pem = pem_encode(der);
            tls = tls.ca_certificate(Certificate::from_pem(pem.as_bytes()));
        }
        Credentials {
            tls: tls.identity(self.identity.clone()),
            bundle_pem: self.bundle_pem.clone(),
            identity: self.identity.clone(),
            client_id: self.client_id.clone(),
            not_after: self.not_after,
        }
    }
}

fn pem_encode(der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

struct ClientCertificate {
    pem: Vec<u8>,
    /// SubjectPublicKeyInfo, DER.
    public_key: Vec<u8>,
    uri: Option<String>,
    not_after: i64,
}

struct PrivateKey {
    pem: Zeroizing<Vec<u8>>,
    der: PrivateKeyDer<'static>,
}

fn read(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|error| format!("{key} {}: read failed: {error}", path.display()))
}

/// Parses every PEM CERTIFICATE block of a file and checks that each one is X.509.
fn certificates(key: &str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|error| format!("{key} {}: invalid PEM: {error}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{key} {}: contains no PEM CERTIFICATE block", path.display()));
    }
    for (index, certificate) in certificates.iter().enumerate() {
        if let Err(error) = x509_parser::parse_x509_certificate(certificate) {
            return Err(format!("{key} {}: certificate {} is not valid X.509: {error}", path.display(), index + 1));
        }
    }
    Ok(certificates)
}

fn load_client_certificate(path: &Path, now: i64) -> Result<ClientCertificate, String> {
    let pem = read(CLIENT_CERT_PATH, path)?;
    let certificates = certificates(CLIENT_CERT_PATH, path, &pem)?;
    let (_, certificate) = x509_parser::parse_x509_certificate(&certificates[0])
        .map_err(|error| format!("{CLIENT_CERT_PATH} {}: invalid certificate: {error}", path.display()))?;
    let validity = certificate.validity();
    if now < validity.not_before.timestamp() {
        return Err(format!(
            "{CLIENT_CERT_PATH} {}: the certificate is not valid before {}",
            path.display(),
            validity.not_before
        ));
    }
    if now > validity.not_after.timestamp() {
        return Err(format!(
            "{CLIENT_CERT_PATH} {}: the certificate expired at {}; issue a new client credential",
            path.display(),
            validity.not_after
        ));
    }
    let uri = certificate.subject_alternative_name().ok().flatten().and_then(|extension| {
        extension.value.general_names.iter().find_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
    });
    Ok(ClientCertificate {
        public_key: certificate.public_key().raw.to_vec(),
        uri,
        not_after: validity.not_after.timestamp(),
        pem,
    })
}

fn load_private_key(path: &Path) -> Result<PrivateKey, String> {
    let pem = Zeroizing::new(read(CLIENT_KEY_PATH, path)?);
    // The parse error is not shown, because it can quote a line of the key file.
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        format!("{CLIENT_KEY_PATH} {}: contains no PEM private key (PKCS#8, SEC1 or PKCS#1)", path.display())
    })?;
    Ok(PrivateKey { pem, der })
}

fn load_bundle(path: &Path) -> Result<Vec<u8>, String> {
    let pem = read(BUNDLE_PATH, path)?;
    certificates(BUNDLE_PATH, path, &pem)?;
    Ok(pem)
}

/// Checks that the private key's public half is the certificate's public key.
fn check_key_matches(key: &PrivateKey, certificate_public_key: &[u8], settings: &Settings) -> Result<(), String> {
    let key_path = settings.client_key_path.display();
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key.der)
        .map_err(|error| format!("{CLIENT_KEY_PATH} {key_path}: unsupported private key: {error}"))?;
    let public_key = signing_key
        .public_key()
        .ok_or_else(|| format!("{CLIENT_KEY_PATH} {key_path}: the public key cannot be derived from this key type"))?;
    if public_key.as_ref() != certificate_public_key {
        return Err(format!(
            "{CLIENT_KEY_PATH} {key_path} does not match the certificate in {CLIENT_CERT_PATH} {}",
            settings.client_cert_path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    const NOW: i64 = 1_800_000_000;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Files {
            Files { dir: tempfile::tempdir().expect("create temporary folder") }
        }

        fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, contents).expect("write test file");
            path
        }

        fn settings(&self, cert: &str, key: &str, bundle: &str) -> Settings {
            Settings {
                endpoints: vec!["127.0.0.1:7001".to_owned()],
                client_cert_path: self.dir.path().join(cert),
                client_key_path: self.dir.path().join(key),
                bundle_path: self.dir.path().join(bundle),
            }
        }
    }

    /// Creates a self-signed certificate with a SPIFFE ID, valid from 2025 to 2030 (NOW is in 2027).
    fn certificate(key: &rcgen::KeyPair) -> String {
        let mut params = rcgen::CertificateParams::default();
        let uri = "spiffe://example.org/spire/server".try_into().expect("ASCII URI");
        params.subject_alt_names.push(rcgen::SanType::URI(uri));
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(2030, 1, 1);
        params.self_signed(key).expect("self-sign").pem()
    }

    fn key() -> rcgen::KeyPair {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate key")
    }

    fn load_errors(settings: &Settings, now: i64) -> Vec<String> {
        match load(settings, now) {
            Ok(credentials) => panic!("loaded {credentials:?}"),
            Err(errors) => errors,
        }
    }

    #[test]
    fn matching_files_load() {
        let files = Files::new();
        let key = key();
        files.write("cert.pem", certificate(&key).as_bytes());
        files.write("key.pem", key.serialize_pem().as_bytes());
        files.write("bundle.pem", certificate(&self::key()).as_bytes());
        let credentials = load(&files.settings("cert.pem", "key.pem", "bundle.pem"), NOW).expect("load credentials");
        assert_eq!(credentials.client_id.as_deref(), Some("spiffe://example.org/spire/server"));
        assert_eq!(credentials.not_after, 1_893_456_000);
    }

    #[test]
    fn added_roots_are_encoded_as_pem_certificates() {
        let der = rcgen::CertificateParams::default().self_signed(&key()).expect("self-sign").der().to_vec();
        let pem = pem_encode(&der);
        let parsed: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().expect("parse PEM");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].as_ref(), der.as_slice(), "the PEM carries the same DER");
        assert!(pem.lines().all(|line| line.len() <= 64), "lines are at most 64 characters");
    }

    #[test]
    fn debug_never_shows_key() {
        let files = Files::new();
        let key = key();
        files.write("cert.pem", certificate(&key).as_bytes());
        files.write("key.pem", key.serialize_pem().as_bytes());
        files.write("bundle.pem", certificate(&key).as_bytes());
        let credentials = load(&files.settings("cert.pem", "key.pem", "bundle.pem"), NOW).expect("load credentials");
        let debug = format!("{credentials:?}");
        assert!(!debug.contains("PRIVATE"), "{debug}");
        assert!(debug.contains("spiffe://example.org/spire/server"), "{debug}");
    }

    #[test]
    fn missing_files_are_each_named() {
        let files = Files::new();
        let errors = load_errors(&files.settings("cert.pem", "key.pem", "bundle.pem"), NOW);
        assert_eq!(errors.len(), 3, "{errors:#?}");
        for (index, name) in ["client_cert_path", "client_key_path", "bundle_path"].into_iter().enumerate() {
            assert!(errors[index].starts_with(name), "{errors:#?}");
            assert!(errors[index].contains("read failed"), "{errors:#?}");
        }
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let files = Files::new();
        files.write("cert.pem", certificate(&key()).as_bytes());
        files.write("key.pem", key().serialize_pem().as_bytes());
        files.write("bundle.pem", certificate(&key()).as_bytes());
        let errors = load_errors(&files.settings("cert.pem", "key.pem", "bundle.pem"), NOW);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(errors[0].contains("key.pem does not match the certificate in client_cert_path"), "{errors:#?}");
    }

    #[test]
    fn wrong_pem_kinds_are_named_without_contents() {
        let files = Files::new();
        let key = key();
        files.write("cert.pem", key.serialize_pem().as_bytes());
        files.write("key.pem", certificate(&key).as_bytes());
        files.write("bundle.pem", b"not PEM at all");
        let errors = load_errors(&files.settings("cert.pem", "key.pem", "bundle.pem"), NOW);
        assert!(errors[0].contains("cert.pem: contains no PEM CERTIFICATE block"), "{errors:#?}");
        assert!(errors[1].contains("key.pem: contains no PEM private key"), "{errors:#?}");
        assert!(errors[2].contains("bundle.pem: contains no PEM CERTIFICATE block"), "{errors:#?}");
        let secret_line = key.serialize_pem().lines().nth(1).expect("PEM body").to_owned();
        assert!(errors.iter().all(|error| !error.contains(&secret_line)), "{errors:#?}");
    }

    #[test]
    fn corrupt_certificate_is_named() {
        let files = Files::new();
        let key = key();
        let broken = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        files.write("cert.pem", certificate(&key).as_bytes());
        files.write("key.pem", key.serialize_pem().as_bytes());
        files.write("bundle.pem", format!("{}{broken}", certificate(&key)).as_bytes());
        let errors = load_errors(&files.settings("cert.pem", "key.pem", "bundle.pem"), NOW);
        assert!(errors[0].contains("bundle.pem: certificate 2 is not valid X.509"), "{errors:#?}");
    }

    #[test]
    fn certificate_outside_validity_is_rejected() {
        let files = Files::new();
        let key = key();
        files.write("cert.pem", certificate(&key).as_bytes());
        files.write("key.pem", key.serialize_pem().as_bytes());
        files.write("bundle.pem", certificate(&key).as_bytes());
        let settings = files.settings("cert.pem", "key.pem", "bundle.pem");
        let expired = load_errors(&settings, 1_900_000_000);
        assert!(expired[0].contains("the certificate expired at"), "{expired:#?}");
        let early = load_errors(&settings, 1_700_000_000);
        assert!(early[0].contains("the certificate is not valid before"), "{early:#?}");
    }
}
