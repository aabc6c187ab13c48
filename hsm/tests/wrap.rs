//! Copying keys between real SoftHSM2 tokens by wrap and unwrap under a shared
//! key-encryption key (KEK), and the byte encoding of a wrapped key.

mod common;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType as Pkcs11KeyType, ObjectClass};
use cryptoki::session::Session;
use cryptoki::slot::Slot;
use sigil_hsm::{Extractability, Hsm, HsmError, KekMaterial, KeyType, Pin, TokenSelector, WrappedKey, install_kek};

const KEK_LABEL: &str = "cluster-kek";
const ALL_KEY_TYPES: [KeyType; 3] = [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa3072];

/// Creates a token for the test `name`, installs `kek` on it as the SO, and opens it.
fn token_with_kek(name: &str, kek: &KekMaterial) -> (String, Hsm) {
    let label = common::new_token(name);
    install_kek(
        &common::module(),
        &TokenSelector::Label(label.clone()),
        &Pin::new(common::SO_PIN.to_owned()),
        &Pin::new(common::USER_PIN.to_owned()),
        KEK_LABEL,
        kek,
    )
    .unwrap_or_else(|error| panic!("install KEK on {label}: {error}"));
    let hsm = common::open(&label, 2);
    (label, hsm)
}

/// Opens a session on the token of `hsm` through cryptoki directly, without reading the slot
/// list, which SoftHSM 2.6.1 does not allow from two threads while it adds a slot. The `Hsm`
/// keeps the user logged in, so private objects are visible to the session.
fn raw_session(hsm: &Hsm) -> Session {
    let context = Pkcs11::new(common::MODULE).expect("load SoftHSM2");
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CryptokiError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(error) => panic!("C_Initialize: {error}"),
    }
    let slot = Slot::try_from(hsm.slot_id_for_test()).expect("slot ID");
    context.open_rw_session(slot).expect("open session")
}

/// Splits an encoded wrapped key into its header and its six fields, following the format
/// documented on `WrappedKey`.
fn split_encoding(encoded: &[u8]) -> ([u8; 6], Vec<Vec<u8>>) {
    let header: [u8; 6] = encoded[..6].try_into().expect("6-byte header");
    let mut rest = &encoded[6..];
    let mut fields = Vec::new();
    while !rest.is_empty() {
        let length = u32::from_be_bytes(rest[..4].try_into().expect("4-byte length")) as usize;
        fields.push(rest[4..4 + length].to_vec());
        rest = &rest[4 + length..];
    }
    assert_eq!(fields.len(), 6, "field count");
    (header, fields)
}

/// Encodes a header and fields in the format documented on `WrappedKey`.
fn join_encoding(header: &[u8], fields: &[&[u8]]) -> Vec<u8> {
    let mut out = header.to_vec();
    for field in fields {
        out.extend_from_slice(&u32::try_from(field.len()).expect("field length").to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

#[test]
fn copy_signs_like_original() {
    let kek = KekMaterial::generate().expect("KEK");
    let (_, source) = token_with_kek("copy-src", &kek);
    let (_, target) = token_with_kek("copy-dst", &kek);

    for key_type in ALL_KEY_TYPES {
        let label = format!("ca-{key_type}");
        let original =
            source.generate_key_pair(&label, key_type, Extractability::WrapWithTrustedOnly).expect("key generation");
        let source_spki = source.public_key_spki_der(&original).expect("source SPKI");

        let wrapped = source.wrap_key(KEK_LABEL, &original).expect("wrap");
        assert_eq!(wrapped.label(), label);
        assert_eq!(wrapped.id(), original.id());
        assert_eq!(wrapped.key_type(), key_type);
        assert_eq!(wrapped.public_key_spki_der(), source_spki, "{key_type}: SPKI in the wrapped key");

        // The target receives the key as bytes, as it would over the network.
        let received = WrappedKey::decode(&wrapped.encode()).expect("decode");
        let copy = target.unwrap_key(KEK_LABEL, &received).expect("unwrap");
        assert_eq!(copy, original, "{key_type}: KeyRef of the copy");
        assert_eq!(target.find_key(&label).expect("find copy by label"), original);
        assert_eq!(target.find_key_by_id(original.id()).expect("find copy by id"), original);
        assert_eq!(target.public_key_spki_der(&copy).expect("target SPKI"), source_spki, "{key_type}: target SPKI");

        for message in [&b""[..], b"tbsCertificate", &[0x5a; 2048]] {
            let signature = target.sign(&copy, message).expect("signature on the target");
            common::verify(&source_spki, key_type, message, &signature);
        }
        let signature = source.sign(&original, b"source still signs").expect("signature on the source");
        common::verify(&source_spki, key_type, b"source still signs", &signature);
    }
}

#[test]
fn copy_attributes() {
    let kek = KekMaterial::generate().expect("KEK");
    let (_, source) = token_with_kek("attr-src", &kek);
    let (_, target) = token_with_kek("attr-dst", &kek);

    for key_type in [KeyType::EcP256, KeyType::EcP384] {
        let original = source
            .generate_key_pair(&format!("attr-{key_type}"), key_type, Extractability::WrapWithTrustedOnly)
            .expect("key generation");
        let copy = target.unwrap_key(KEK_LABEL, &source.wrap_key(KEK_LABEL, &original).expect("wrap")).expect("unwrap");
        let attributes = target.key_attributes(&copy).expect("attributes");

        assert!(attributes.sensitive, "{key_type}: CKA_SENSITIVE");
        assert!(attributes.extractable, "{key_type}: CKA_EXTRACTABLE, needed to pass the key on");
        assert!(attributes.wrap_with_trusted, "{key_type}: CKA_WRAP_WITH_TRUSTED");
        assert!(attributes.private, "{key_type}: CKA_PRIVATE");
        assert!(attributes.token, "{key_type}: CKA_TOKEN");
        // PKCS#11 sets both to false on an unwrapped key, and SoftHSM 2.6.1 does.
        assert!(!attributes.always_sensitive, "{key_type}: CKA_ALWAYS_SENSITIVE");
        assert!(!attributes.never_extractable, "{key_type}: CKA_NEVER_EXTRACTABLE");
    }
}

#[test]
fn copy_passed_on_to_third_token() {
    let kek = KekMaterial::generate().expect("KEK");
    let (_, first) = token_with_kek("chain-1", &kek);
    let (_, second) = token_with_kek("chain-2", &kek);
    let (_, third) = token_with_kek("chain-3", &kek);

    let original = first.generate_key_pair("ca", KeyType::EcP256, Extractability::WrapWithTrustedOnly).expect("key");
    let spki = first.public_key_spki_der(&original).expect("SPKI");
    let copy = second.unwrap_key(KEK_LABEL, &first.wrap_key(KEK_LABEL, &original).expect("wrap")).expect("unwrap");
    let copy_of_copy =
        third.unwrap_key(KEK_LABEL, &second.wrap_key(KEK_LABEL, &copy).expect("wrap again")).expect("unwrap again");

    let signature = third.sign(&copy_of_copy, b"third").expect("signature");
    common::verify(&spki, KeyType::EcP256, b"third", &signature);
}

#[test]
fn installed_kek_attributes() {
    let kek = KekMaterial::generate().expect("KEK");
    let (_, first) = token_with_kek("kek-attr-1", &kek);
    let (_, second) = token_with_kek("kek-attr-2", &kek);

    let first_info = first.find_kek(KEK_LABEL).expect("find KEK");
    let second_info = second.find_kek(KEK_LABEL).expect("find KEK");
    assert_eq!(first_info.label, KEK_LABEL);
    assert!(first_info.trusted, "CKA_TRUSTED");
    let check_value = first_info.check_value.clone().expect("SoftHSM 2.6.1 reports CKA_CHECK_VALUE");
    assert_eq!(check_value.len(), 3, "AES check value length");
    assert_eq!(second_info, first_info, "the same KEK on both tokens");

    let session = raw_session(&first);
    let secret_keys = session.find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY)]).expect("find");
    assert_eq!(secret_keys.len(), 1, "secret keys on the token: the KEK and no staging copy");
    let attributes = session
        .get_attributes(
            secret_keys[0],
            &[
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Modifiable,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Wrap,
                AttributeType::Unwrap,
                AttributeType::Trusted,
            ],
        )
        .expect("attributes");
    let expected = [
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Modifiable(false),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Trusted(true),
    ];
    for attribute in expected {
        assert!(attributes.contains(&attribute), "expected {attribute:?} in {attributes:?}");
    }

    let value = session.get_attributes(secret_keys[0], &[AttributeType::Value]);
    assert!(
        matches!(&value, Ok(attributes) if attributes.is_empty()) || value.is_err(),
        "the KEK value is readable: {value:?}"
    );
}

#[test]
fn install_kek_existing_label_rejected() {
    let label = common::new_token("kek-twice");
    let kek = KekMaterial::generate().expect("KEK");
    let install = || {
        install_kek(
            &common::module(),
            &TokenSelector::Label(label.clone()),
            &Pin::new(common::SO_PIN.to_owned()),
            &Pin::new(common::USER_PIN.to_owned()),
            KEK_LABEL,
            &kek,
        )
    };
    install().expect("first installation");

    let error = install().expect_err("second KEK with the same label");
    assert!(
        matches!(&error, HsmError::KekExists { label: kek, token } if kek == KEK_LABEL && *token == label),
        "unexpected error {error:?}"
    );
    assert!(error.to_string().contains(&format!("\"{KEK_LABEL}\"")), "{error}");
}

#[test]
fn install_kek_after_open_rejected() {
    let label = common::new_token("kek-open");
    let _hsm = common::open(&label, 1);

    let error = install_kek(
        &common::module(),
        &TokenSelector::Label(label.clone()),
        &Pin::new(common::SO_PIN.to_owned()),
        &Pin::new(common::USER_PIN.to_owned()),
        KEK_LABEL,
        &KekMaterial::generate().expect("KEK"),
    )
    .expect_err("the user is logged in");
    assert!(matches!(&error, HsmError::UserLoggedIn { token } if *token == label), "unexpected error {error:?}");
}

#[test]
fn install_kek_wrong_so_pin() {
    let label = common::new_token("kek-so-pin");
    let wrong_pin = "wrong-so-pin-0000";

    let error = install_kek(
        &common::module(),
        &TokenSelector::Label(label.clone()),
        &Pin::new(wrong_pin.to_owned()),
        &Pin::new(common::USER_PIN.to_owned()),
        KEK_LABEL,
        &KekMaterial::generate().expect("KEK"),
    )
    .expect_err("wrong SO PIN");
    assert!(
        matches!(&error, HsmError::SoLogin { token, code } if *token == label && code == "CKR_PIN_INCORRECT"),
        "unexpected error {error:?}"
    );
    assert!(!error.to_string().contains(wrong_pin), "{error}");

    let hsm = common::open(&label, 1);
    let missing = hsm.find_kek(KEK_LABEL).expect_err("no KEK was installed");
    assert!(matches!(&missing, HsmError::KekNotFound { label } if label == KEK_LABEL), "unexpected error {missing:?}");
}

#[test]
fn wrap_untrusted_kek_rejected() {
    let label = common::new_token("untrusted");
    let hsm = common::open(&label, 1);
    let key = hsm.generate_key_pair("ca", KeyType::EcP256, Extractability::WrapWithTrustedOnly).expect("key");

    // The user can create an AES key with the attributes of a KEK, but not mark it trusted.
    let session = raw_session(&hsm);
    session
        .create_object(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(Pkcs11KeyType::AES),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Label(b"untrusted-kek".to_vec()),
            Attribute::Value(vec![0x42; 32]),
        ])
        .expect("create an untrusted AES key");
    drop(session);

    let info = hsm.find_kek("untrusted-kek").expect("find KEK");
    assert!(!info.trusted, "CKA_TRUSTED of a key the user created");

    let error = hsm.wrap_key("untrusted-kek", &key).expect_err("wrap under an untrusted KEK");
    assert!(
        matches!(&error, HsmError::KekNotTrusted { label, code }
            if label == "untrusted-kek" && code == "CKR_KEY_NOT_WRAPPABLE"),
        "unexpected error {error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("\"untrusted-kek\" is not marked trusted"), "{message}");
    assert!(message.contains("security officer"), "{message}");
}

#[test]
fn wrap_never_extractable_rejected() {
    let kek = KekMaterial::generate().expect("KEK");
    let (_, hsm) = token_with_kek("never", &kek);
    let key = hsm.generate_key_pair("sealed", KeyType::EcP256, Extractability::Never).expect("key");

    let error = hsm.wrap_key(KEK_LABEL, &key).expect_err("wrap a non-extractable key");
    assert!(
        matches!(&error, HsmError::KeyNotExtractable { label, code }
            if label == "sealed" && code == "CKR_KEY_UNEXTRACTABLE"),
        "unexpected error {error:?}"
    );
    assert!(error.to_string().contains("\"sealed\""), "{error}");
}

#[test]
fn wrap_missing_kek_rejected() {
    let label = common::new_token("no-kek");
    let hsm = common::open(&label, 1);
    let key = hsm.generate_key_pair("ca", KeyType::EcP256, Extractability::WrapWithTrustedOnly).expect("key");

    let error = hsm.wrap_key(KEK_LABEL, &key).expect_err("no KEK");
    assert!(matches!(&error, HsmError::KekNotFound { label } if label == KEK_LABEL), "unexpected error {error:?}");
}

#[test]
fn unwrap_other_kek_rejected() {
    let (_, source) = token_with_kek("other-src", &KekMaterial::generate().expect("KEK"));
    let (_, target) = token_with_kek("other-dst", &KekMaterial::generate().expect("second KEK"));
    let key = source.generate_key_pair("ca", KeyType::EcP256, Extractability::WrapWithTrustedOnly).expect("key");
    let wrapped = source.wrap_key(KEK_LABEL, &key).expect("wrap");

    let error = target.unwrap_key(KEK_LABEL, &wrapped).expect_err("different KEK");
    let source_check_value = source.find_kek(KEK_LABEL).expect("source KEK").check_value.expect("check value");
    assert_eq!(wrapped.kek_check_value(), Some(source_check_value.as_slice()));
    match &error {
        HsmError::KekMismatch { label, kek, wrapped_under, local } => {
            assert_eq!(label, "ca");
            assert_eq!(kek, KEK_LABEL);
            assert_ne!(wrapped_under, local);
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(error.to_string().contains("install the cluster's key-encryption key"), "{error}");
    assert!(matches!(target.find_key("ca"), Err(HsmError::KeyNotFound { .. })), "a key was created");
}

#[test]
fn unwrap_altered_bytes_rejected() {
    let kek = KekMaterial::generate().expect("KEK");
    let (_, source) = token_with_kek("altered-src", &kek);
    let (_, target) = token_with_kek("altered-dst", &kek);
    let key = source.generate_key_pair("ca", KeyType::EcP256, Extractability::WrapWithTrustedOnly).expect("key");

    // The wrapped key is the last field, so the last byte of the encoding belongs to it.
    let mut encoded = source.wrap_key(KEK_LABEL, &key).expect("wrap").encode().to_vec();
    *encoded.last_mut().expect("non-empty encoding") ^= 0x01;
    let altered = WrappedKey::decode(&encoded).expect("decode");

    let error = target.unwrap_key(KEK_LABEL, &altered).expect_err("altered wrapped bytes");
    assert!(
        matches!(&error, HsmError::UnwrapFailed { label, kek, .. } if label == "ca" && kek == KEK_LABEL),
        "unexpected error {error:?}"
    );
    assert!(error.ckr_code().is_some_and(|code| code.starts_with("CKR_")), "{error:?}");
    assert!(matches!(target.find_key("ca"), Err(HsmError::KeyNotFound { .. })), "a key was created");
}

#[test]
fn unwrap_existing_label_rejected() {
    let kek = KekMaterial::generate().expect("KEK");
    let (source_token, source) = token_with_kek("exists-src", &kek);
    let (target_token, target) = token_with_kek("exists-dst", &kek);
    let key = source.generate_key_pair("ca", KeyType::EcP256, Extractability::WrapWithTrustedOnly).expect("key");
    let wrapped = source.wrap_key(KEK_LABEL, &key).expect("wrap");

    let error = source.unwrap_key(KEK_LABEL, &wrapped).expect_err("unwrap into the source token");
    assert!(
        matches!(&error, HsmError::UnwrapLabelExists { label, token } if label == "ca" && *token == source_token),
        "unexpected error {error:?}"
    );
    assert!(error.to_string().contains("\"ca\""), "{error}");

    target.unwrap_key(KEK_LABEL, &wrapped).expect("first unwrap");
    let error = target.unwrap_key(KEK_LABEL, &wrapped).expect_err("second unwrap");
    assert!(
        matches!(&error, HsmError::UnwrapLabelExists { label, token } if label == "ca" && *token == target_token),
        "unexpected error {error:?}"
    );
}

#[test]
fn unwrap_existing_id_rejected() {
    let kek = KekMaterial::generate().expect("KEK");
    let (_, source) = token_with_kek("id-src", &kek);
    let (_, target) = token_with_kek("id-dst", &kek);
    let key = source.generate_key_pair("ca", KeyType::EcP256, Extractability::WrapWithTrustedOnly).expect("key");
    let wrapped = source.wrap_key(KEK_LABEL, &key).expect("wrap");

    // A key pair with another label but the CKA_ID of the wrapped key.
    let session = raw_session(&target);
    session
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(true),
                Attribute::Verify(true),
                Attribute::EcParams(vec![0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]),
                Attribute::Label(b"other".to_vec()),
                Attribute::Id(key.id().to_vec()),
            ],
            &[
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Sign(true),
                Attribute::Label(b"other".to_vec()),
                Attribute::Id(key.id().to_vec()),
            ],
        )
        .expect("raw key pair generation");
    drop(session);

    let error = target.unwrap_key(KEK_LABEL, &wrapped).expect_err("CKA_ID in use");
    assert!(matches!(&error, HsmError::UnwrapIdExists { label, .. } if label == "ca"), "unexpected error {error:?}");
    assert!(matches!(target.find_key("ca"), Err(HsmError::KeyNotFound { .. })), "a key was created");
}

#[test]
fn unwrap_mismatched_public_key_rejected() {
    let kek = KekMaterial::generate().expect("KEK");
    let (_, source) = token_with_kek("pair-src", &kek);
    let (_, target) = token_with_kek("pair-dst", &kek);
    let first = source.generate_key_pair("first", KeyType::EcP256, Extractability::WrapWithTrustedOnly).expect("key");
    let second = source.generate_key_pair("second", KeyType::EcP256, Extractability::WrapWithTrustedOnly).expect("key");

    // The private key of `first` sent with the public key of `second`.
    let (header, first_fields) = split_encoding(&source.wrap_key(KEK_LABEL, &first).expect("wrap").encode());
    let (_, second_fields) = split_encoding(&source.wrap_key(KEK_LABEL, &second).expect("wrap").encode());
    let mixed = join_encoding(
        &header,
        &[&first_fields[0], &first_fields[1], &first_fields[2], &second_fields[3], &first_fields[4], &first_fields[5]],
    );
    let mixed = WrappedKey::decode(&mixed).expect("decode");

    let error = target.unwrap_key(KEK_LABEL, &mixed).expect_err("public key of another pair");
    assert!(matches!(&error, HsmError::KeyPairMismatch { label } if label == "first"), "unexpected error {error:?}");
    assert!(matches!(target.find_key("first"), Err(HsmError::KeyNotFound { .. })), "private key was kept");

    // The rejected attempt left nothing behind, so the genuine key still unwraps.
    let genuine = target.unwrap_key(KEK_LABEL, &source.wrap_key(KEK_LABEL, &first).expect("wrap")).expect("unwrap");
    assert_eq!(genuine, first);
}

#[test]
fn wrapped_key_round_trip() {
    let kek = KekMaterial::generate().expect("KEK");
    let (_, hsm) = token_with_kek("round-trip", &kek);

    for key_type in ALL_KEY_TYPES {
        let key = hsm
            .generate_key_pair(&format!("rt-{key_type}"), key_type, Extractability::WrapWithTrustedOnly)
            .expect("key");
        let wrapped = hsm.wrap_key(KEK_LABEL, &key).expect("wrap");
        let encoded = wrapped.encode();
        assert!(encoded.starts_with(b"SGWK\x01"), "{key_type}: header");

        let decoded = WrappedKey::decode(&encoded).expect("decode");
        assert_eq!(decoded.key_type(), key_type);
        assert_eq!(decoded.label(), wrapped.label());
        assert_eq!(decoded.id(), wrapped.id());
        assert_eq!(decoded.kek_check_value(), wrapped.kek_check_value());
        assert_eq!(decoded.public_key_spki_der(), wrapped.public_key_spki_der());
        assert_eq!(*decoded.encode(), *encoded, "{key_type}: encoding after a round trip");
    }
}

/// Returns a valid encoding of a P-256 wrapped key with the given fields replaced.
fn synthetic_encoding(replace: &[(usize, &[u8])]) -> Vec<u8> {
    let mut point = vec![0x04];
    point.extend_from_slice(&[0x11; 64]);
    let mut fields: Vec<&[u8]> = vec![b"ca", &[0x01, 0x02], &[0xaa, 0xbb, 0xcc], &point, &[], &[0x77; 24]];
    for &(index, value) in replace {
        fields[index] = value;
    }
    join_encoding(b"SGWK\x01\x01", &fields)
}

#[test]
fn wrapped_key_malformed_rejected() {
    let valid = synthetic_encoding(&[]);
    WrappedKey::decode(&valid).expect("the synthetic encoding is valid");

    let mut wrong_magic = valid.clone();
    wrong_magic[0] = b'X';
    let mut wrong_version = valid.clone();
    wrong_version[4] = 2;
    let mut wrong_key_type = valid.clone();
    wrong_key_type[5] = 9;
    let mut trailing = valid.clone();
    trailing.push(0);
    let mut huge_length = valid[..6].to_vec();
    huge_length.extend_from_slice(&[0xff; 4]);
    let mut modulus_2048 = vec![0xc5];
    modulus_2048.extend_from_slice(&[0x01; 255]);
    let rsa_2048 = join_encoding(b"SGWK\x01\x03", &[b"ca", &[1], &[], &modulus_2048, &[1, 0, 1], &[0x77; 24]]);
    let mut short_point = vec![0x04];
    short_point.extend_from_slice(&[0x11; 63]);
    let mut compressed_point = vec![0x02];
    compressed_point.extend_from_slice(&[0x11; 64]);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty input", Vec::new(), "shorter than the 6-byte header"),
        ("wrong magic", wrong_magic, "expected \"SGWK\""),
        ("wrong version", wrong_version, "format version 2 is not supported"),
        ("unknown key type", wrong_key_type, "unknown key type code 9"),
        ("trailing byte", trailing, "1 bytes follow the wrapped key field"),
        ("huge length", huge_length, "declares 4294967295 bytes"),
        ("empty label", synthetic_encoding(&[(0, b"")]), "label is empty"),
        ("label not UTF-8", synthetic_encoding(&[(0, &[0xff, 0xfe])]), "label is not UTF-8"),
        ("empty CKA_ID", synthetic_encoding(&[(1, b"")]), "empty CKA_ID"),
        ("short point", synthetic_encoding(&[(3, &short_point)]), "expected a 65-byte uncompressed point"),
        ("compressed point", synthetic_encoding(&[(3, &compressed_point)]), "starting with 0x04"),
        ("second EC field", synthetic_encoding(&[(4, &[1])]), "must be empty"),
        ("wrapped not blocks", synthetic_encoding(&[(5, &[0x77; 20])]), "multiple of 8 bytes"),
        ("wrapped too short", synthetic_encoding(&[(5, &[0x77; 8])]), "at least 16"),
        ("RSA-2048 modulus", rsa_2048, "has 2048 bits; expected 3072"),
    ];
    for (name, input, expected) in cases {
        let error = WrappedKey::decode(&input).expect_err(name);
        assert!(matches!(error, HsmError::InvalidWrappedKey { .. }), "{name}: unexpected error {error:?}");
        let message = error.to_string();
        assert!(message.starts_with("invalid wrapped key: "), "{name}: {message}");
        assert!(message.contains(expected), "{name}: {message}");
    }

    for length in 0..valid.len() {
        let error = WrappedKey::decode(&valid[..length]).expect_err("truncated input");
        assert!(matches!(error, HsmError::InvalidWrappedKey { .. }), "{length} bytes: unexpected error {error:?}");
    }
}

#[test]
fn debug_hides_secrets() {
    let kek = KekMaterial::generate().expect("KEK");
    assert_eq!(format!("{kek:?}"), "KekMaterial(..)");
    assert_eq!(format!("{kek:#?}"), "KekMaterial(..)");

    let (_, hsm) = token_with_kek("debug", &kek);
    let key = hsm.generate_key_pair("ca", KeyType::EcP256, Extractability::WrapWithTrustedOnly).expect("key");
    let wrapped = hsm.wrap_key(KEK_LABEL, &key).expect("wrap");
    let (_, fields) = split_encoding(&wrapped.encode());
    let wrapped_bytes = &fields[5];

    let debug = format!("{wrapped:?}");
    let hex: String = wrapped_bytes.iter().map(|byte| format!("{byte:02x}")).collect();
    let decimal = format!("{wrapped_bytes:?}");
    let inner_decimal = &decimal[1..decimal.len() - 1];
    assert!(debug.contains("\"ca\""), "{debug}");
    assert!(debug.contains("redacted"), "{debug}");
    assert!(!debug.contains(&hex), "{debug}");
    assert!(!debug.contains(&hex[..16]), "{debug}");
    assert!(!debug.contains(inner_decimal), "{debug}");
    assert!(!format!("{wrapped:#?}").contains(&hex[..16]), "{wrapped:#?}");
}
