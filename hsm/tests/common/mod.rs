//! Shared set-up for the SoftHSM2 integration tests: a fresh token per test, and signature
//! verification with ring against the SubjectPublicKeyInfo the crate builds.

#![expect(dead_code, reason = "each test binary uses a different part of this module")]

use std::path::{Path, PathBuf};

use prometheus::Registry;
use ring::rand::SecureRandom;
use ring::signature;
use sigil_hsm::{Hsm, HsmConfig, HsmMetrics, KeyType, Pin, TokenSelector, init_token};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const SO_PIN: &str = "test-so-pin-8642";
pub const USER_PIN: &str = "test-user-pin-1357";

/// Token directory used when SOFTHSM2_CONF does not name one; it matches
/// .cargo/softhsm2-test.conf.
const DEFAULT_TOKEN_DIR: &str = "/tmp/sigil-test-tokens";

pub fn module() -> PathBuf {
    PathBuf::from(MODULE)
}

/// Creates the SoftHSM token directory, which SoftHSM requires to exist before the module
/// is loaded.
fn ensure_token_dir() {
    let configured = std::env::var("SOFTHSM2_CONF").ok().and_then(|path| {
        // SoftHSM2 fails C_Initialize with CKR_GENERAL_ERROR when this file is missing.
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("cannot read SOFTHSM2_CONF file {path}: {error}"));
        text.lines().find_map(|line| {
            let (key, value) = line.split_once('=')?;
            (key.trim() == "directories.tokendir").then(|| value.trim().to_owned())
        })
    });
    let directory = configured.unwrap_or_else(|| DEFAULT_TOKEN_DIR.to_owned());
    std::fs::create_dir_all(&directory)
        .unwrap_or_else(|error| panic!("cannot create token directory {directory}: {error}"));
}

/// Returns a token label of at most 32 bytes that no other test run uses.
pub fn unique_label(name: &str) -> String {
    let mut random = [0u8; 4];
    ring::rand::SystemRandom::new().fill(&mut random).expect("system random number generator");
    let suffix: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
    let name: String = name.chars().take(18).collect();
    format!("test-{name}-{suffix}")
}

/// Initializes a fresh token for the test `name` and returns its label.
pub fn new_token(name: &str) -> String {
    ensure_token_dir();
    let label = unique_label(name);
    init_token(Path::new(MODULE), &label, &Pin::new(SO_PIN.to_owned()), &Pin::new(USER_PIN.to_owned()))
        .unwrap_or_else(|error| panic!("init_token {label}: {error}"));
    label
}

pub fn config(label: &str, sessions: usize) -> HsmConfig {
    HsmConfig { module: module(), token: TokenSelector::Label(label.to_owned()), sessions }
}

pub fn open(label: &str, sessions: usize) -> Hsm {
    Hsm::open(&config(label, sessions), Pin::new(USER_PIN.to_owned()), HsmMetrics::unregistered())
        .unwrap_or_else(|error| panic!("open token {label}: {error}"))
}

/// Opens the token with metrics registered in a new registry, which is returned as well.
pub fn open_with_registry(label: &str, sessions: usize) -> (Hsm, Registry) {
    let registry = Registry::new();
    let metrics = HsmMetrics::new(&registry).expect("metrics register in a new registry");
    let hsm = Hsm::open(&config(label, sessions), Pin::new(USER_PIN.to_owned()), metrics)
        .unwrap_or_else(|error| panic!("open token {label}: {error}"));
    (hsm, registry)
}

/// Returns the value of a counter, summed over all label values, or 0 if it has no series.
pub fn counter_value(registry: &Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric())
        .map(|metric| metric.get_counter().get_value())
        .sum()
}

/// Returns the value of `sigil_hsm_errors_total` for one return code.
pub fn error_count(registry: &Registry, code: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == "sigil_hsm_errors_total")
        .flat_map(|family| family.get_metric())
        .filter(|metric| metric.get_label().iter().any(|pair| pair.name() == "code" && pair.value() == code))
        .map(|metric| metric.get_counter().get_value())
        .sum()
}

/// Returns the number of observations of `sigil_hsm_sign_duration_seconds`.
pub fn sign_count(registry: &Registry) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == "sigil_hsm_sign_duration_seconds")
        .flat_map(|family| family.get_metric())
        .map(|metric| metric.get_histogram().get_sample_count())
        .sum()
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";

/// Parses `spki_der` with x509-parser, checks its algorithm against `key_type`, and returns
/// the subjectPublicKey bits in the form ring expects.
pub fn public_key_from_spki(spki_der: &[u8], key_type: KeyType) -> Vec<u8> {
    let (rest, spki) = SubjectPublicKeyInfo::from_der(spki_der).expect("SPKI parses as DER");
    assert!(rest.is_empty(), "{} bytes after the SPKI", rest.len());

    let algorithm = spki.algorithm.algorithm.to_id_string();
    let parameters = spki.algorithm.parameters.as_ref();
    match key_type {
        KeyType::EcP256 | KeyType::EcP384 => {
            assert_eq!(algorithm, OID_EC_PUBLIC_KEY);
            let curve = parameters
                .expect("EC SPKI has curve parameters")
                .as_oid()
                .expect("curve parameter is an OID")
                .to_id_string();
            let expected = if key_type == KeyType::EcP256 { OID_P256 } else { OID_P384 };
            assert_eq!(curve, expected);
        }
        KeyType::Rsa3072 => {
            assert_eq!(algorithm, OID_RSA_ENCRYPTION);
            let parameters = parameters.expect("RSA SPKI has NULL parameters");
            assert!(parameters.as_null().is_ok(), "RSA parameters are not NULL");
        }
    }
    spki.subject_public_key.data.to_vec()
}

/// Verifies `signature` over `message` with ring, using the public key from `spki_der`.
pub fn verify(spki_der: &[u8], key_type: KeyType, message: &[u8], signature: &[u8]) {
    let public_key = public_key_from_spki(spki_der, key_type);
    let algorithm: &dyn signature::VerificationAlgorithm = match key_type {
        KeyType::EcP256 => &signature::ECDSA_P256_SHA256_ASN1,
        KeyType::EcP384 => &signature::ECDSA_P384_SHA384_ASN1,
        KeyType::Rsa3072 => &signature::RSA_PKCS1_2048_8192_SHA256,
    };
    signature::UnparsedPublicKey::new(algorithm, &public_key)
        .verify(message, signature)
        .unwrap_or_else(|_| panic!("ring rejected the {key_type} signature {signature:02x?}"));
}
