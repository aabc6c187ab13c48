//! The key-encryption key (KEK) that every token of a cluster has, and its installation on
//! development tokens.

use std::fmt;
use std::path::Path;

use cryptoki::object::{Attribute, AttributeType, KeyType as Pkcs11KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use ring::rand::SecureRandom;
use zeroize::{Zeroize, Zeroizing};

use crate::error::{ckr_name, from_cryptoki};
use crate::module::{context, find_token};
use crate::objects::find_objects;
use crate::types::hex;
use crate::{HsmError, Pin, TokenSelector};

/// Length in bytes of a KEK: Sigil wraps keys under AES-256 only.
pub(crate) const KEK_LEN: usize = 32;

/// The value of a new AES-256 key-encryption key, held in process memory only while it is
/// installed into the tokens of a development cluster.
///
/// The memory is zeroed on drop, the value cannot be cloned or read through the public API,
/// and the `Debug` output is `KekMaterial(..)`.
pub struct KekMaterial(Zeroizing<[u8; KEK_LEN]>);

impl KekMaterial {
    /// Generates 32 random bytes with the operating system's random number generator.
    ///
    /// # Errors
    ///
    /// [`HsmError::RandomFailed`] if the random number generator fails.
    pub fn generate() -> Result<KekMaterial, HsmError> {
        let mut value = Zeroizing::new([0u8; KEK_LEN]);
        ring::rand::SystemRandom::new().fill(value.as_mut()).map_err(|_| HsmError::RandomFailed)?;
        Ok(KekMaterial(value))
    }
}

impl fmt::Debug for KekMaterial {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("KekMaterial(..)")
    }
}

/// A key-encryption key on a token, as [`Hsm::find_kek`](crate::Hsm::find_kek) and
/// [`install_kek`] report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekInfo {
    /// CKA_LABEL of the secret key.
    pub label: String,
    /// CKA_TRUSTED: only a trusted key may wrap keys that have CKA_WRAP_WITH_TRUSTED, such as
    /// the CA keys that [`Extractability::WrapWithTrustedOnly`](crate::Extractability) makes.
    pub trusted: bool,
    /// CKA_CHECK_VALUE: the first 3 bytes of the AES encryption of a zero block under the key.
    /// Tokens that hold the same KEK report the same value. `None` if the token does not
    /// report it.
    pub check_value: Option<Vec<u8>>,
}

/// Installs an AES-256 key-encryption key on a development or test token, marked trusted
/// (CKA_TRUSTED) by the token's security officer (SO), so that the user can wrap keys that
/// have CKA_WRAP_WITH_TRUSTED with it.
///
/// Installing the same [`KekMaterial`] on every token of a cluster lets each token unwrap what
/// another wrapped. The installed key is a private, sensitive, non-extractable token object
/// with CKA_WRAP and CKA_UNWRAP true, CKA_ENCRYPT and CKA_DECRYPT false, and CKA_MODIFIABLE
/// false.
///
/// Production HSMs do not use this function: the KEK is established there by the vendor's
/// ceremony, typically from key components held by M of N custodians, and marked trusted by
/// the security officer. Sigil itself only needs the KEK's label.
///
/// Only the SO may set CKA_TRUSTED, but an SO session cannot create private objects, and
/// SoftHSM 2.6.1 accepts CKA_TRUSTED only when an object is created. So the key is installed
/// in three steps:
///
/// 1. The SO creates a trusted KEK as a public session object (CKA_TOKEN false), which
///    exists only in the module's memory, and logs out with its session still open.
/// 2. The user logs in and copies it with C_CopyObject into a private token object. The copy
///    keeps CKA_TRUSTED.
/// 3. Closing the SO's session destroys the session object.
///
/// NOTE: PKCS#11 lets the user unwrap any key wrapped under a KEK with CKA_UNWRAP as a
/// non-sensitive key and read its value. Whoever has the user PIN can therefore recover a CA
/// key in plaintext by wrapping and unwrapping it on the same token. HSMs close this gap with
/// CKA_UNWRAP_TEMPLATE on the KEK, which cryptoki 0.12 cannot set.
///
/// No other session of this process may be logged in on the token while this runs, so call
/// it before any [`Hsm`](crate::Hsm) opens the token.
///
/// # Errors
///
/// [`HsmError::UserLoggedIn`] if this process has the user logged in on the token already,
/// [`HsmError::KekExists`] if a secret key with `label` exists,
/// [`HsmError::Login`] or [`HsmError::SoLogin`] naming the return code (never the PIN),
/// [`HsmError::TokenNotFound`], and [`HsmError::Pkcs11`] if a PKCS#11 call fails.
pub fn install_kek(
    module: &Path,
    token: &TokenSelector,
    so_pin: &Pin,
    user_pin: &Pin,
    label: &str,
    kek: &KekMaterial,
) -> Result<KekInfo, HsmError> {
    let context = context(module)?;
    let (slot, info) = find_token(&context, module, token)?;
    let token_label = info.label().to_owned();

    let user_session = context.open_rw_session(slot).map_err(from_cryptoki)?;
    let state = user_session.get_session_info().map_err(from_cryptoki)?.session_state();
    if matches!(state, SessionState::RoUser | SessionState::RwUser) {
        return Err(HsmError::UserLoggedIn { token: token_label });
    }

    // Private keys are visible only to the user, so the user checks that the label is free.
    login(&user_session, UserType::User, user_pin, &token_label)?;
    let existing = find_objects(
        &user_session,
        &[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Label(label.as_bytes().to_vec())],
    )?;
    user_session.logout().map_err(from_cryptoki)?;
    if !existing.is_empty() {
        return Err(HsmError::KekExists { label: label.to_owned(), token: token_label });
    }

    // The session object lives as long as `so_session`, which is dropped, and so closed,
    // after the user's copy exists or the installation failed.
    let so_session = context.open_rw_session(slot).map_err(from_cryptoki)?;
    login(&so_session, UserType::So, so_pin, &token_label)?;
    let staging = create_trusted_session_object(&so_session, label, kek);
    so_session.logout().map_err(from_cryptoki)?;
    let staging = staging?;

    login(&user_session, UserType::User, user_pin, &token_label)?;
    let installed = copy_to_private_token_object(&user_session, staging, label);
    user_session.logout().map_err(from_cryptoki)?;
    drop(so_session);
    let installed = installed?;

    tracing::info!(
        token = %token_label,
        label,
        check_value = %installed.check_value.as_deref().map_or_else(|| "(not reported)".to_owned(), hex),
        "installed key-encryption key"
    );
    Ok(installed)
}

/// Logs `user_type` in, naming the token and the return code in the error.
fn login(session: &Session, user_type: UserType, pin: &Pin, token: &str) -> Result<(), HsmError> {
    session.login(user_type, Some(&pin.to_auth_pin())).map_err(|error| match error {
        cryptoki::error::Error::Pkcs11(rv, _) => match user_type {
            UserType::So => HsmError::SoLogin { token: token.to_owned(), code: ckr_name(rv) },
            _ => HsmError::Login { token: token.to_owned(), code: ckr_name(rv) },
        },
        other => from_cryptoki(other),
    })
}

/// Creates the KEK as a trusted public session object. `session` must have the SO logged in.
fn create_trusted_session_object(session: &Session, label: &str, kek: &KekMaterial) -> Result<ObjectHandle, HsmError> {
    let template = SecretTemplate(vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(Pkcs11KeyType::AES),
        Attribute::Token(false),
        Attribute::Private(false),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Trusted(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Value(kek.0.to_vec()),
    ]);
    session.create_object(&template.0).map_err(from_cryptoki)
}

/// Copies the trusted session object into a private token object and checks that the copy
/// is trusted. `session` must have the user logged in. A copy that is not trusted is
/// destroyed.
fn copy_to_private_token_object(session: &Session, staging: ObjectHandle, label: &str) -> Result<KekInfo, HsmError> {
    let copy = session
        .copy_object(staging, &[Attribute::Token(true), Attribute::Private(true), Attribute::Modifiable(false)])
        .map_err(from_cryptoki)?;

    let attributes =
        session.get_attributes(copy, &[AttributeType::Trusted, AttributeType::CheckValue]).map_err(from_cryptoki)?;
    let mut installed = KekInfo { label: label.to_owned(), trusted: false, check_value: None };
    for attribute in attributes {
        match attribute {
            Attribute::Trusted(value) => installed.trusted = value,
            Attribute::CheckValue(value) => installed.check_value = Some(value),
            _ => {}
        }
    }

    if !installed.trusted {
        if let Err(error) = session.destroy_object(copy) {
            tracing::error!(label, error = %from_cryptoki(error), "failed to destroy an untrusted KEK copy");
        }
        return Err(HsmError::UnsupportedKek {
            label: label.to_owned(),
            reason: "the private copy of the security officer's session object has CKA_TRUSTED false, so \
                     this token cannot install a trusted KEK this way; install it with the vendor's tools"
                .to_owned(),
        });
    }
    Ok(installed)
}

/// An attribute template that contains key material. Dropping it zeroes every CKA_VALUE,
/// because cryptoki's `Attribute` does not.
struct SecretTemplate(Vec<Attribute>);

impl Drop for SecretTemplate {
    fn drop(&mut self) {
        for attribute in &mut self.0 {
            if let Attribute::Value(value) = attribute {
                value.zeroize();
            }
        }
    }
}

/// Checks a KEK's attributes, read with [`KEK_ATTRIBUTE_TYPES`], and returns what
/// [`KekInfo`] reports.
pub(crate) fn describe_kek(label: &str, attributes: Vec<Attribute>) -> Result<KekInfo, HsmError> {
    let unsupported = |reason: String| HsmError::UnsupportedKek { label: label.to_owned(), reason };

    let mut info = KekInfo { label: label.to_owned(), trusted: false, check_value: None };
    let mut key_type = None;
    let mut value_len = None;
    let (mut wrap, mut unwrap, mut sensitive, mut extractable) = (false, false, false, true);
    for attribute in attributes {
        match attribute {
            Attribute::KeyType(value) => key_type = Some(value),
            Attribute::ValueLen(value) => value_len = Some(usize::from(value)),
            Attribute::Wrap(value) => wrap = value,
            Attribute::Unwrap(value) => unwrap = value,
            Attribute::Sensitive(value) => sensitive = value,
            Attribute::Extractable(value) => extractable = value,
            Attribute::Trusted(value) => info.trusted = value,
            Attribute::CheckValue(value) => info.check_value = Some(value),
            _ => {}
        }
    }

    if key_type != Some(Pkcs11KeyType::AES) {
        let found = key_type.map_or_else(|| "(missing)".to_owned(), |key_type| key_type.to_string());
        return Err(unsupported(format!("CKA_KEY_TYPE is {found}; expected CKK_AES")));
    }
    if let Some(length) = value_len
        && length != KEK_LEN
    {
        return Err(unsupported(format!("it is a {}-bit AES key; expected AES-256", length * 8)));
    }
    if !wrap || !unwrap {
        return Err(unsupported(format!(
            "CKA_WRAP is {wrap} and CKA_UNWRAP is {unwrap}; a cluster KEK needs both true"
        )));
    }
    if !sensitive || extractable {
        return Err(unsupported(format!(
            "CKA_SENSITIVE is {sensitive} and CKA_EXTRACTABLE is {extractable}; a KEK must be sensitive \
             and never leave the token"
        )));
    }
    Ok(info)
}

/// Attributes that [`describe_kek`] reads.
pub(crate) const KEK_ATTRIBUTE_TYPES: [AttributeType; 8] = [
    AttributeType::KeyType,
    AttributeType::ValueLen,
    AttributeType::Wrap,
    AttributeType::Unwrap,
    AttributeType::Sensitive,
    AttributeType::Extractable,
    AttributeType::Trusted,
    AttributeType::CheckValue,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn attributes(key_type: Pkcs11KeyType, length: usize, extractable: bool) -> Vec<Attribute> {
        vec![
            Attribute::KeyType(key_type),
            Attribute::ValueLen(length.try_into().expect("length fits CK_ULONG")),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(extractable),
            Attribute::Trusted(true),
            Attribute::CheckValue(vec![1, 2, 3]),
        ]
    }

    #[test]
    fn describe_kek_accepts_aes_256() {
        let info = describe_kek("kek", attributes(Pkcs11KeyType::AES, 32, false)).expect("valid KEK");
        assert!(info.trusted);
        assert_eq!(info.check_value.as_deref(), Some(&[1u8, 2, 3][..]));
    }

    #[test]
    fn describe_kek_rejects_other_keys() {
        let cases = [
            (attributes(Pkcs11KeyType::AES, 16, false), "128-bit"),
            (attributes(Pkcs11KeyType::GENERIC_SECRET, 32, false), "expected CKK_AES"),
            (attributes(Pkcs11KeyType::AES, 32, true), "CKA_EXTRACTABLE is true"),
        ];
        for (attributes, expected) in cases {
            let error = describe_kek("kek", attributes).expect_err("unsupported KEK");
            let message = error.to_string();
            assert!(matches!(error, HsmError::UnsupportedKek { .. }), "unexpected error {error:?}");
            assert!(message.contains(expected), "{message}");
            assert!(message.contains("\"kek\""), "{message}");
        }
    }

    #[test]
    fn kek_material_debug_redacted() {
        let kek = KekMaterial::generate().expect("random bytes");
        assert_eq!(format!("{kek:?}"), "KekMaterial(..)");
    }
}
