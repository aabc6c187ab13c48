//! Key generation, lookup and attributes on a real SoftHSM2 token.

mod common;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::Attribute;
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use sigil_hsm::{Extractability, Hsm, HsmError, KeyType, Pin, TokenSelector, init_token};

const ALL_KEY_TYPES: [KeyType; 3] = [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa3072];

#[test]
fn generated_keys_never_extractable() {
    let label = common::new_token("attr-never");
    let hsm = common::open(&label, 2);

    for key_type in ALL_KEY_TYPES {
        let key = hsm
            .generate_key_pair(&format!("never-{key_type}"), key_type, Extractability::Never)
            .expect("key generation");
        let attributes = hsm.key_attributes(&key).expect("key attributes");

        assert!(attributes.sensitive, "{key_type}: CKA_SENSITIVE");
        assert!(!attributes.extractable, "{key_type}: CKA_EXTRACTABLE");
        assert!(attributes.always_sensitive, "{key_type}: CKA_ALWAYS_SENSITIVE");
        assert!(attributes.never_extractable, "{key_type}: CKA_NEVER_EXTRACTABLE");
        assert!(attributes.private, "{key_type}: CKA_PRIVATE");
        assert!(attributes.token, "{key_type}: CKA_TOKEN");
        assert!(!attributes.wrap_with_trusted, "{key_type}: CKA_WRAP_WITH_TRUSTED");
    }
}

#[test]
fn generated_keys_wrap_with_trusted_only() {
    let label = common::new_token("attr-trusted");
    let hsm = common::open(&label, 2);

    for key_type in ALL_KEY_TYPES {
        let key = hsm
            .generate_key_pair(&format!("trusted-{key_type}"), key_type, Extractability::WrapWithTrustedOnly)
            .expect("key generation");
        let attributes = hsm.key_attributes(&key).expect("key attributes");

        assert!(attributes.sensitive, "{key_type}: CKA_SENSITIVE");
        assert!(attributes.extractable, "{key_type}: CKA_EXTRACTABLE");
        assert!(attributes.wrap_with_trusted, "{key_type}: CKA_WRAP_WITH_TRUSTED");
        assert!(attributes.always_sensitive, "{key_type}: CKA_ALWAYS_SENSITIVE");
        assert!(!attributes.never_extractable, "{key_type}: CKA_NEVER_EXTRACTABLE");
        assert!(attributes.private, "{key_type}: CKA_PRIVATE");
        assert!(attributes.token, "{key_type}: CKA_TOKEN");
    }
}

#[test]
fn find_key_returns_generated_key() {
    let label = common::new_token("find");
    let hsm = common::open(&label, 2);

    for key_type in ALL_KEY_TYPES {
        let key_label = format!("find-{key_type}");
        let generated = hsm.generate_key_pair(&key_label, key_type, Extractability::Never).expect("key generation");
        assert_eq!(generated.id().len(), 16, "CKA_ID length");
        assert_eq!(generated.key_type(), key_type);
        assert_eq!(generated.label(), key_label);

        let by_label = hsm.find_key(&key_label).expect("find by label");
        assert_eq!(by_label, generated);

        let by_id = hsm.find_key_by_id(generated.id()).expect("find by id");
        assert_eq!(by_id, generated);
    }
}

#[test]
fn keys_visible_to_second_hsm() {
    let label = common::new_token("second-open");
    let first = common::open(&label, 1);
    let key = first.generate_key_pair("shared", KeyType::EcP256, Extractability::Never).expect("key generation");

    // A second Hsm on the same token has no cached handle and must look the key up.
    let second = common::open(&label, 1);
    let found = second.find_key("shared").expect("find by label");
    assert_eq!(found, key);
    let signature = second.sign(&key, b"second").expect("signature");
    let spki = second.public_key_spki_der(&key).expect("SPKI");
    common::verify(&spki, KeyType::EcP256, b"second", &signature);
}

#[test]
fn generate_existing_label_rejected() {
    let label = common::new_token("dup");
    let hsm = common::open(&label, 2);
    hsm.generate_key_pair("dup", KeyType::EcP256, Extractability::Never).expect("first key generation");

    let error = hsm
        .generate_key_pair("dup", KeyType::EcP384, Extractability::Never)
        .expect_err("second key with the same label");
    assert!(matches!(&error, HsmError::KeyExists { label } if label == "dup"), "unexpected error {error:?}");
    assert!(error.to_string().contains("\"dup\""), "{error}");
}

#[test]
fn find_key_missing_label() {
    let label = common::new_token("missing");
    let hsm = common::open(&label, 1);

    let error = hsm.find_key("no-such-key").expect_err("missing key");
    assert!(matches!(&error, HsmError::KeyNotFound { label } if label == "no-such-key"), "unexpected error {error:?}");
    assert!(error.to_string().contains("\"no-such-key\""), "{error}");

    let error = hsm.find_key_by_id(&[0xde, 0xad]).expect_err("missing id");
    assert!(matches!(&error, HsmError::KeyIdNotFound { id } if id == "dead"), "unexpected error {error:?}");
}

/// Opens a session on the token of `hsm` through cryptoki directly. The crate has already
/// initialized the module in this process, so C_Initialize reports
/// CKR_CRYPTOKI_ALREADY_INITIALIZED. The slot list is not read here, because SoftHSM 2.6.1
/// aborts when two threads read it while it adds a slot.
fn raw_session(hsm: &Hsm) -> Session {
    let context = Pkcs11::new(common::MODULE).expect("load SoftHSM2");
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CryptokiError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(error) => panic!("C_Initialize: {error}"),
    }
    let slot = Slot::try_from(hsm.slot_id_for_test()).expect("slot ID");
    // The Hsm opened on this token keeps the user logged in for the whole process.
    context.open_rw_session(slot).expect("open session")
}

/// Generates a P-256 key pair with raw cryptoki calls; an empty `id` leaves CKA_ID unset.
fn create_raw_key_pair(session: &Session, label: &str, id: &[u8]) {
    let mut public = vec![
        Attribute::Token(true),
        Attribute::Verify(true),
        Attribute::EcParams(vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    let mut private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Sign(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    if !id.is_empty() {
        public.push(Attribute::Id(id.to_vec()));
        private.push(Attribute::Id(id.to_vec()));
    }
    session.generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private).expect("raw key pair generation");
}

#[test]
fn find_key_ambiguous_label() {
    let label = common::new_token("ambiguous");
    let hsm = common::open(&label, 1);

    let session = raw_session(&hsm);
    create_raw_key_pair(&session, "twice", &[1]);
    create_raw_key_pair(&session, "twice", &[2]);
    drop(session);

    let error = hsm.find_key("twice").expect_err("two keys share the label");
    assert!(
        matches!(&error, HsmError::AmbiguousLabel { label, count: 2 } if label == "twice"),
        "unexpected error {error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("\"twice\""), "{message}");
    assert!(message.contains('2'), "{message}");
}

#[test]
fn raw_key_without_id_unsupported() {
    let label = common::new_token("no-id");
    let hsm = common::open(&label, 1);

    let session = raw_session(&hsm);
    create_raw_key_pair(&session, "anonymous", &[]);
    drop(session);

    let error = hsm.find_key("anonymous").expect_err("key without CKA_ID");
    assert!(matches!(error, HsmError::UnsupportedKey { .. }), "unexpected error {error:?}");
}

#[test]
fn failed_finds_leave_session_usable() {
    // With a single session, a find that skipped C_FindObjectsFinal would make the next
    // C_FindObjectsInit fail with CKR_OPERATION_ACTIVE.
    let label = common::new_token("find-final");
    let hsm = common::open(&label, 1);

    let session = raw_session(&hsm);
    create_raw_key_pair(&session, "pair", &[7]);
    create_raw_key_pair(&session, "pair", &[8]);
    drop(session);

    for _ in 0..3 {
        assert!(matches!(hsm.find_key("absent"), Err(HsmError::KeyNotFound { .. })));
        assert!(matches!(hsm.find_key("pair"), Err(HsmError::AmbiguousLabel { .. })));
    }
    let key = hsm.find_key_by_id(&[7]).expect("find by id");
    assert_eq!(key.key_type(), KeyType::EcP256);
    hsm.sign(&key, b"after finds").expect("signature");
}

#[test]
fn token_info_reports_token() {
    let label = common::new_token("info");
    let hsm = common::open(&label, 1);

    let summary = hsm.token_info();
    assert_eq!(summary.label, label);
    assert!(!summary.serial.is_empty(), "serial number");
    assert!(summary.manufacturer.contains("SoftHSM"), "{summary:?}");
    assert!(!summary.model.is_empty(), "model");
}

#[test]
fn open_by_serial_number() {
    let label = common::new_token("serial");
    let serial = common::open(&label, 1).token_info().serial;

    let config =
        sigil_hsm::HsmConfig { module: common::module(), token: TokenSelector::Serial(serial.clone()), sessions: 1 };
    let hsm =
        sigil_hsm::Hsm::open(&config, Pin::new(common::USER_PIN.to_owned()), sigil_hsm::HsmMetrics::unregistered())
            .expect("open by serial number");
    assert_eq!(hsm.token_info().label, label);
}

#[test]
fn open_unknown_token_fails() {
    // A fresh token makes sure the token directory exists and the module loads.
    common::new_token("unknown");
    let config = common::config("test-no-such-token", 1);
    let error =
        sigil_hsm::Hsm::open(&config, Pin::new(common::USER_PIN.to_owned()), sigil_hsm::HsmMetrics::unregistered())
            .expect_err("no token has this label");
    assert!(matches!(error, HsmError::TokenNotFound { .. }), "unexpected error {error:?}");
    assert!(error.to_string().contains("\"test-no-such-token\""), "{error}");
}

#[test]
fn init_token_existing_label_rejected() {
    let label = common::new_token("init-twice");
    let error = init_token(
        &common::module(),
        &label,
        &Pin::new(common::SO_PIN.to_owned()),
        &Pin::new(common::USER_PIN.to_owned()),
    )
    .expect_err("label in use");
    assert!(
        matches!(&error, HsmError::TokenExists { label: existing } if *existing == label),
        "unexpected error {error:?}"
    );
}

#[test]
fn init_token_label_too_long() {
    let error = init_token(
        &common::module(),
        &"x".repeat(33),
        &Pin::new(common::SO_PIN.to_owned()),
        &Pin::new(common::USER_PIN.to_owned()),
    )
    .expect_err("33-byte label");
    assert!(matches!(error, HsmError::InvalidTokenLabel { .. }), "unexpected error {error:?}");
}

#[test]
fn open_missing_module_fails() {
    let config = sigil_hsm::HsmConfig {
        module: "/nonexistent/libpkcs11.so".into(),
        token: TokenSelector::Label("any".to_owned()),
        sessions: 1,
    };
    let error =
        sigil_hsm::Hsm::open(&config, Pin::new(common::USER_PIN.to_owned()), sigil_hsm::HsmMetrics::unregistered())
            .expect_err("module does not exist");
    assert!(matches!(error, HsmError::ModuleLoad { .. }), "unexpected error {error:?}");
    assert!(error.to_string().contains("/nonexistent/libpkcs11.so"), "{error}");
}
