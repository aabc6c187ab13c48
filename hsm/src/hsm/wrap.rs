//! Copying a private key between the tokens of a cluster: wrapping it under the cluster's
//! key-encryption key (KEK) on one token and unwrapping it on another.

use cryptoki::error::Error as CryptokiError;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType as Pkcs11KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use ring::rand::SecureRandom;
use zeroize::Zeroizing;

use super::{Hsm, signature_from_token, signing_input};
use crate::der;
use crate::error::{ckr_name, from_cryptoki};
use crate::kek::{KEK_ATTRIBUTE_TYPES, KekInfo, describe_kek};
use crate::objects::{find_objects, public_key_parts};
use crate::types::hex;
use crate::wrapped::{PublicKeyParts, ec_params};
use crate::{HsmError, KeyRef, KeyType, WrappedKey};

/// Length in bytes of the random message that an unwrapped key signs to prove that it
/// matches the public key sent with it.
const PAIR_CHECK_MESSAGE_LEN: usize = 32;

impl Hsm {
    /// Finds the key-encryption key with CKA_LABEL `label` and checks that it can serve as
    /// the cluster's KEK: an AES-256 secret key that is sensitive, not extractable, and has
    /// CKA_WRAP and CKA_UNWRAP true. Whether it is trusted is reported, not required, because
    /// unwrapping works with an untrusted KEK.
    ///
    /// # Errors
    ///
    /// [`HsmError::KekNotFound`], [`HsmError::AmbiguousKek`] or [`HsmError::UnsupportedKek`].
    pub fn find_kek(&self, label: &str) -> Result<KekInfo, HsmError> {
        self.run(|session, generation| self.find_kek_object(session, generation, label).map(|(_, info)| info))
    }

    /// Wraps the private key of `key` with CKM_AES_KEY_WRAP_PAD (RFC 5649) under the KEK with
    /// label `kek_label`, and returns it together with the public key and the KEK's check
    /// value.
    ///
    /// The token checks the key's own policy: a key with CKA_WRAP_WITH_TRUSTED true (as
    /// [`Extractability::WrapWithTrustedOnly`](crate::Extractability) makes) can only be
    /// wrapped under a KEK that the security officer marked CKA_TRUSTED.
    ///
    /// # Errors
    ///
    /// - [`HsmError::KekNotTrusted`] if the token refuses because the KEK is not trusted.
    /// - [`HsmError::KeyNotExtractable`] if the key has CKA_EXTRACTABLE false, as keys made
    ///   with [`Extractability::Never`](crate::Extractability) do.
    /// - [`HsmError::WrapFailed`] naming the return code if C_WrapKey fails otherwise.
    /// - The errors of [`Hsm::find_kek`] and [`Hsm::public_key_spki_der`].
    pub fn wrap_key(&self, kek_label: &str, key: &KeyRef) -> Result<WrappedKey, HsmError> {
        let public_key = public_key_parts(key, self.public_key_attributes(key)?)?;

        let (wrapped, kek) = self.run(|session, generation| {
            let (kek_handle, kek) = self.find_kek_object(session, generation, kek_label)?;
            let wrapped = self.with_private_key(session, generation, key, |handle| {
                session
                    .wrap_key(&Mechanism::AesKeyWrapPad, kek_handle, handle)
                    .map(Zeroizing::new)
                    .map_err(|error| wrap_error(error, key, &kek))
            })?;
            Ok((wrapped, kek))
        })?;

        let wrapped = WrappedKey::new(
            key.key_type(),
            key.label().to_owned(),
            key.id().to_vec(),
            kek.check_value.clone().unwrap_or_default(),
            public_key,
            wrapped,
        )?;
        tracing::info!(
            token = %self.inner.summary.label,
            label = key.label(),
            id = %hex(key.id()),
            kek = kek_label,
            "wrapped key under the key-encryption key"
        );
        Ok(wrapped)
    }

    /// Unwraps `wrapped` under the KEK with label `kek_label` into this token, and creates the
    /// matching public key object, so that [`Hsm::find_key`], [`Hsm::public_key_spki_der`] and
    /// [`Hsm::sign`] work on the copy as on the original.
    ///
    /// The private key gets the label and CKA_ID of the original, and is a private, sensitive
    /// token object that can only sign, with CKA_EXTRACTABLE and CKA_WRAP_WITH_TRUSTED true, so
    /// that this token can pass it on under a trusted KEK. Before creating the public key
    /// object, the new private key signs a random message, which must verify with the public
    /// key in `wrapped`. Otherwise the private key is destroyed.
    ///
    /// NOTE: PKCS#11 has no atomic check-and-create. Two concurrent calls with the same label
    /// can both succeed. If the session is lost after the token created the private key, the
    /// retry after session recovery fails with [`HsmError::UnwrapLabelExists`].
    ///
    /// # Errors
    ///
    /// - [`HsmError::UnwrapLabelExists`] or [`HsmError::UnwrapIdExists`] if a private or public
    ///   key on this token already has the label or the CKA_ID.
    /// - [`HsmError::KekMismatch`] if both tokens report the KEK's check value and the values
    ///   differ, so the tokens hold different KEKs.
    /// - [`HsmError::UnwrapFailed`] naming the return code if C_UnwrapKey fails, for example
    ///   because the wrapped bytes were altered (SoftHSM 2.6.1 reports CKR_GENERAL_ERROR).
    /// - [`HsmError::KeyPairMismatch`] if the unwrapped key does not match the public key.
    /// - The errors of [`Hsm::find_kek`].
    pub fn unwrap_key(&self, kek_label: &str, wrapped: &WrappedKey) -> Result<KeyRef, HsmError> {
        let key = KeyRef::new(wrapped.label().to_owned(), wrapped.id().to_vec(), wrapped.key_type());
        let private_template = unwrap_template(wrapped);
        let public_template = public_key_template(wrapped);

        self.run(|session, generation| {
            let (kek_handle, kek) = self.find_kek_object(session, generation, kek_label)?;
            check_same_kek(wrapped, &kek)?;
            self.check_unwrap_target_free(session, wrapped)?;

            let handle = session
                .unwrap_key(&Mechanism::AesKeyWrapPad, kek_handle, wrapped.wrapped_bytes(), &private_template)
                .map_err(|error| unwrap_error(error, wrapped, kek_label))?;

            let created = check_key_pair(session, handle, wrapped)
                .and_then(|()| session.create_object(&public_template).map_err(from_cryptoki));
            if let Err(error) = created {
                destroy_after_failure(session, handle, wrapped.label());
                return Err(error);
            }

            self.cache_handle(wrapped.id(), generation, handle);
            Ok(())
        })?;

        tracing::info!(
            token = %self.inner.summary.label,
            label = wrapped.label(),
            id = %hex(wrapped.id()),
            key_type = %wrapped.key_type(),
            kek = kek_label,
            "unwrapped key from the key-encryption key"
        );
        Ok(key)
    }

    /// Finds the KEK with `label` and checks its attributes with [`describe_kek`].
    fn find_kek_object(
        &self,
        session: &Session,
        generation: u64,
        label: &str,
    ) -> Result<(ObjectHandle, KekInfo), HsmError> {
        let logins_before = self.inner.pool.login_snapshot();
        let handles = find_objects(
            session,
            &[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Label(label.as_bytes().to_vec())],
        )?;
        let handle = match handles.as_slice() {
            [] => {
                let error = HsmError::KekNotFound { label: label.to_owned() };
                return Err(self.explain_missing_key(session, generation, logins_before, error));
            }
            [handle] => *handle,
            more => return Err(HsmError::AmbiguousKek { label: label.to_owned(), count: more.len() }),
        };

        let attributes = session.get_attributes(handle, &KEK_ATTRIBUTE_TYPES).map_err(from_cryptoki)?;
        Ok((handle, describe_kek(label, attributes)?))
    }

    /// Checks that no private or public key on the token has the label or the CKA_ID of
    /// `wrapped`.
    fn check_unwrap_target_free(&self, session: &Session, wrapped: &WrappedKey) -> Result<(), HsmError> {
        let token = || self.inner.summary.label.clone();
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            let label = Attribute::Label(wrapped.label().as_bytes().to_vec());
            if !find_objects(session, &[Attribute::Class(class), label])?.is_empty() {
                return Err(HsmError::UnwrapLabelExists { label: wrapped.label().to_owned(), token: token() });
            }
            let id = Attribute::Id(wrapped.id().to_vec());
            if !find_objects(session, &[Attribute::Class(class), id])?.is_empty() {
                return Err(HsmError::UnwrapIdExists {
                    label: wrapped.label().to_owned(),
                    id: hex(wrapped.id()),
                    token: token(),
                });
            }
        }
        Ok(())
    }
}

/// Converts a C_WrapKey failure into an error that names the key and the KEK. Codes that
/// make the pool recover or look the key up again stay [`HsmError::Pkcs11`].
fn wrap_error(error: CryptokiError, key: &KeyRef, kek: &KekInfo) -> HsmError {
    let CryptokiError::Pkcs11(rv, _) = error else {
        return from_cryptoki(error);
    };
    let code = ckr_name(rv);
    match code.as_str() {
        "CKR_KEY_NOT_WRAPPABLE" if !kek.trusted => HsmError::KekNotTrusted { label: kek.label.clone(), code },
        "CKR_KEY_UNEXTRACTABLE" => HsmError::KeyNotExtractable { label: key.label().to_owned(), code },
        _ => {
            let plain = from_cryptoki(error);
            if plain.needs_session_recovery() || plain.is_stale_object_handle() {
                return plain;
            }
            HsmError::WrapFailed { label: key.label().to_owned(), kek: kek.label.clone(), code }
        }
    }
}

/// Converts a C_UnwrapKey failure into [`HsmError::UnwrapFailed`], except for codes that make
/// the pool recover.
fn unwrap_error(error: CryptokiError, wrapped: &WrappedKey, kek_label: &str) -> HsmError {
    let CryptokiError::Pkcs11(rv, _) = error else {
        return from_cryptoki(error);
    };
    let plain = from_cryptoki(error);
    if plain.needs_session_recovery() {
        return plain;
    }
    HsmError::UnwrapFailed { label: wrapped.label().to_owned(), kek: kek_label.to_owned(), code: ckr_name(rv) }
}

/// Returns [`HsmError::KekMismatch`] if both tokens report a check value for their KEK and
/// the values differ.
fn check_same_kek(wrapped: &WrappedKey, kek: &KekInfo) -> Result<(), HsmError> {
    match (wrapped.kek_check_value(), kek.check_value.as_deref()) {
        (Some(wrapped_under), Some(local)) if wrapped_under != local => Err(HsmError::KekMismatch {
            label: wrapped.label().to_owned(),
            kek: kek.label.clone(),
            wrapped_under: hex(wrapped_under),
            local: hex(local),
        }),
        _ => Ok(()),
    }
}

/// Signs a random message with the unwrapped private key and verifies the signature with the
/// public key in `wrapped`.
fn check_key_pair(session: &Session, handle: ObjectHandle, wrapped: &WrappedKey) -> Result<(), HsmError> {
    let mut message = [0u8; PAIR_CHECK_MESSAGE_LEN];
    ring::rand::SystemRandom::new().fill(&mut message).map_err(|_| HsmError::RandomFailed)?;

    let (mechanism, data) = signing_input(wrapped.key_type(), &message);
    let raw = session.sign(&mechanism, handle, &data).map_err(from_cryptoki)?;
    let signature = signature_from_token(wrapped.key_type(), raw)?;
    if !wrapped.verifies(&message, &signature) {
        return Err(HsmError::KeyPairMismatch { label: wrapped.label().to_owned() });
    }
    Ok(())
}

/// Destroys a private key that was unwrapped but failed a later step. A failure to destroy it
/// is logged, because the caller reports the original error.
fn destroy_after_failure(session: &Session, handle: ObjectHandle, label: &str) {
    if let Err(error) = session.destroy_object(handle) {
        tracing::error!(
            label,
            error = %from_cryptoki(error),
            "failed to destroy an unwrapped private key after a failed unwrap; destroy it by hand"
        );
    }
}

/// Returns the template of the unwrapped private key. The token takes the key value, and the
/// curve or modulus, from the wrapped PKCS #8 structure.
fn unwrap_template(wrapped: &WrappedKey) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::KeyType(pkcs11_key_type(wrapped.key_type())),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
        Attribute::Sign(true),
        Attribute::Decrypt(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Label(wrapped.label().as_bytes().to_vec()),
        Attribute::Id(wrapped.id().to_vec()),
    ]
}

/// Returns the template of the public key object, with the attributes that
/// [`Hsm::generate_key_pair`] gives a public key.
fn public_key_template(wrapped: &WrappedKey) -> Vec<Attribute> {
    let mut template = vec![
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::KeyType(pkcs11_key_type(wrapped.key_type())),
        Attribute::Token(true),
        Attribute::Private(false),
        Attribute::Verify(true),
        Attribute::Encrypt(false),
        Attribute::Wrap(false),
        Attribute::Label(wrapped.label().as_bytes().to_vec()),
        Attribute::Id(wrapped.id().to_vec()),
    ];
    match wrapped.public_key() {
        PublicKeyParts::Ec { point } => template.extend([
            Attribute::EcParams(ec_params(wrapped.key_type()).unwrap_or_default().to_vec()),
            Attribute::EcPoint(der::ec_point_attribute(point)),
        ]),
        PublicKeyParts::Rsa { modulus, public_exponent } => {
            template.extend([Attribute::Modulus(modulus.clone()), Attribute::PublicExponent(public_exponent.clone())])
        }
    }
    template
}

fn pkcs11_key_type(key_type: KeyType) -> Pkcs11KeyType {
    match key_type {
        KeyType::EcP256 | KeyType::EcP384 => Pkcs11KeyType::EC,
        KeyType::Rsa3072 => Pkcs11KeyType::RSA,
    }
}
