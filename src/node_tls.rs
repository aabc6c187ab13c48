//! The node's TLS identity on disk: its certificate chain, private key and the roots that verify
//! peers. Kept in `DATA_DIR/node-tls/` so that a node can reach its peers at start, before its
//! Raft log can commit anything.

use std::path::Path;

use anyhow::{Context as _, bail};
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::setup::{certificates_to_pem, read_pem_certificates, write_private};
use crate::tls::certified_key;

const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";
const BUNDLE_FILE: &str = "bundle.pem";

/// A node's certificate, key and peer trust roots.
pub struct NodeIdentity {
    pub key: CertifiedKey,
    pub roots_der: Vec<Vec<u8>>,
    /// The leaf's notBefore and notAfter, Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
}

/// Loads the identity in `dir`, or returns `None` when the folder contains none.
///
/// # Errors
///
/// Fails when the files exist but cannot be read or parsed.
pub fn load(dir: &Path) -> anyhow::Result<Option<NodeIdentity>> {
    if !dir.join(CERT_FILE).exists() {
        return Ok(None);
    }
    let chain = read_pem_certificates(&dir.join(CERT_FILE))?;
    let roots_der = read_pem_certificates(&dir.join(BUNDLE_FILE))?;
    let key_path = dir.join(KEY_FILE);
    let key_pem = std::fs::read(&key_path).with_context(|| format!("read {}", key_path.display()))?;
    let key_block = pem::parse(&key_pem).with_context(|| format!("parse PEM in {}", key_path.display()))?;
    if key_block.tag() != "PRIVATE KEY" {
        bail!("{} must contain a PKCS#8 PRIVATE KEY block, found {}", key_path.display(), key_block.tag());
    }
    let (not_before, not_after) = validity(&chain[0])?;
    let chain: Vec<CertificateDer<'static>> = chain.into_iter().map(CertificateDer::from).collect();
    let key = certified_key(chain, key_block.into_contents())?;
    Ok(Some(NodeIdentity { key, roots_der, not_before, not_after }))
}

/// Writes an identity into `dir`, the key readable by the owner only.
///
/// # Errors
///
/// Names the file that could not be written.
pub fn save(dir: &Path, chain_der: &[Vec<u8>], key_pkcs8_pem: &str, roots_der: &[Vec<u8>]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    write_private(&dir.join(KEY_FILE), key_pkcs8_pem.as_bytes())?;
    let bundle = dir.join(BUNDLE_FILE);
    std::fs::write(&bundle, certificates_to_pem(roots_der)).with_context(|| format!("write {}", bundle.display()))?;
    let cert = dir.join(CERT_FILE);
    let partial = dir.join("cert.pem.partial");
    std::fs::write(&partial, certificates_to_pem(chain_der)).with_context(|| format!("write {}", partial.display()))?;
    std::fs::rename(&partial, &cert).with_context(|| format!("replace {}", cert.display()))
}

/// Returns the notBefore and notAfter of a DER certificate in Unix seconds.
fn validity(der: &[u8]) -> anyhow::Result<(i64, i64)> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| anyhow::anyhow!("parse node certificate: {e}"))?;
    Ok((cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp()))
}

/// Checks that `spki_der` is a DER SubjectPublicKeyInfo of an EC P-256 key.
///
/// # Errors
///
/// Returns the reason it is not.
pub fn check_p256_spki(spki_der: &[u8]) -> Result<(), String> {
    use x509_parser::prelude::SubjectPublicKeyInfo;
    use x509_parser::public_key::PublicKey;

    let (rest, spki) =
        SubjectPublicKeyInfo::from_der(spki_der).map_err(|e| format!("not a DER SubjectPublicKeyInfo: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes follow the SubjectPublicKeyInfo", rest.len()));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|parameters| parameters.as_oid().ok())
        .map(|oid| oid.to_id_string());
    match (spki.parsed(), curve.as_deref()) {
        (Ok(PublicKey::EC(point)), Some("1.2.840.10045.3.1.7")) if point.data().len() == 65 => Ok(()),
        (Ok(PublicKey::EC(_)), curve) => Err(format!("EC curve {} is not P-256", curve.unwrap_or("(none)"))),
        _ => Err(format!("key algorithm {} is not EC P-256", spki.algorithm.algorithm.to_id_string())),
    }
}
