mod wrap;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState};
use parking_lot::Mutex;
use ring::rand::SecureRandom;

use crate::der::{self, OID_P256, OID_P384};
use crate::error::from_cryptoki;
use crate::module::{context, find_token};
use crate::objects::{
    build_spki, describe_private_key, find_objects, find_private_key_by_id, find_public_key, public_key_attribute_types,
};
use crate::pool::{SessionPool, TokenAccess};
use crate::types::hex;
use crate::{Extractability, HsmConfig, HsmError, HsmMetrics, KeyAttributes, KeyRef, KeyType, Pin, TokenSummary};

/// How long an operation waits for a free session before it fails with
/// [`HsmError::PoolTimeout`].
pub const SESSION_WAIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Length in bytes of the random CKA_ID given to generated key pairs.
const KEY_ID_LEN: usize = 16;

/// Public exponent of generated RSA keys (65537).
const RSA_PUBLIC_EXPONENT: [u8; 3] = [0x01, 0x00, 0x01];

/// A logged-in connection to one token, with a pool of sessions. Clones share the pool.
#[derive(Clone)]
pub struct Hsm {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SessionPool,
    metrics: HsmMetrics,
    summary: TokenSummary,
    /// Private key handles by CKA_ID, each with the pool generation it was found in.
    /// PKCS#11 does not promise that a handle stays valid after the sessions that found it
    /// are gone, so a handle is only used with sessions of the same generation.
    key_handles: Mutex<HashMap<Vec<u8>, (u64, ObjectHandle)>>,
}

impl std::fmt::Debug for Hsm {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Hsm")
            .field("token", &self.inner.summary)
            .field("sessions", &self.inner.pool.size())
            .finish_non_exhaustive()
    }
}

impl Hsm {
    /// Loads the PKCS#11 module (once per process), finds the token, logs in as the user and
    /// builds the session pool.
    ///
    /// # Errors
    ///
    /// [`HsmError::ModuleLoad`], [`HsmError::TokenNotFound`], [`HsmError::Login`] (naming the
    /// return code, never the PIN) or [`HsmError::Pkcs11`].
    pub fn open(config: &HsmConfig, pin: Pin, metrics: HsmMetrics) -> Result<Hsm, HsmError> {
        let context = context(&config.module)?;
        let (slot, info) = find_token(&context, &config.module, &config.token)?;
        let summary = TokenSummary {
            label: info.label().to_owned(),
            serial: info.serial_number().to_owned(),
            manufacturer: info.manufacturer_id().to_owned(),
            model: info.model().to_owned(),
        };

        let size = match config.sessions {
            0 => std::thread::available_parallelism().map_or(2, |cores| 2 * cores.get()),
            sessions => sessions,
        };
        let access = TokenAccess {
            context,
            module: config.module.clone(),
            selector: config.token.clone(),
            token_label: summary.label.clone(),
            pin,
        };
        let hsm = Hsm {
            inner: Arc::new(Inner {
                pool: SessionPool::new(access, slot, size, SESSION_WAIT_TIMEOUT),
                metrics,
                summary,
                key_handles: Mutex::new(HashMap::new()),
            }),
        };

        // Opening the first session logs in, so a wrong PIN fails here and not at the first
        // signature.
        hsm.run(|_, _| Ok(()))?;
        tracing::info!(
            module = %config.module.display(),
            token = %hsm.inner.summary.label,
            serial = %hsm.inner.summary.serial,
            slot = slot.id(),
            sessions = size,
            "opened HSM token"
        );
        Ok(hsm)
    }

    /// Returns the number of sessions in the pool, which is the maximum number of operations
    /// in flight.
    pub fn session_count(&self) -> usize {
        self.inner.pool.size()
    }

    /// Returns the identity of the token, as read when the `Hsm` was opened.
    pub fn token_info(&self) -> TokenSummary {
        self.inner.summary.clone()
    }

    /// Generates a key pair on the token.
    ///
    /// Both keys are token objects with `label` and a random 16-byte CKA_ID. The private key
    /// is private, sensitive and can only sign. The public key can only verify.
    ///
    /// # Errors
    ///
    /// [`HsmError::KeyExists`] if a private or public key with `label` exists already.
    /// Two concurrent calls with the same label can still both succeed, because PKCS#11 has
    /// no atomic check-and-create.
    pub fn generate_key_pair(
        &self,
        label: &str,
        key_type: KeyType,
        extractability: Extractability,
    ) -> Result<KeyRef, HsmError> {
        let mut id = vec![0u8; KEY_ID_LEN];
        ring::rand::SystemRandom::new().fill(&mut id).map_err(|_| HsmError::RandomFailed)?;

        let (mechanism, mut public_template) = match key_type {
            KeyType::EcP256 => (Mechanism::EccKeyPairGen, vec![Attribute::EcParams(OID_P256.to_vec())]),
            KeyType::EcP384 => (Mechanism::EccKeyPairGen, vec![Attribute::EcParams(OID_P384.to_vec())]),
            KeyType::Rsa3072 => (
                Mechanism::RsaPkcsKeyPairGen,
                vec![Attribute::ModulusBits(3072.into()), Attribute::PublicExponent(RSA_PUBLIC_EXPONENT.to_vec())],
            ),
        };
        public_template.extend([
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::Encrypt(false),
            Attribute::Wrap(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.clone()),
        ]);

        let mut private_template = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Sign(true),
            Attribute::Decrypt(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.clone()),
        ];
        match extractability {
            Extractability::Never => private_template.push(Attribute::Extractable(false)),
            Extractability::WrapWithTrustedOnly => {
                private_template.extend([Attribute::Extractable(true), Attribute::WrapWithTrusted(true)])
            }
        }

        self.run(|session, generation| {
            for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
                let existing =
                    find_objects(session, &[Attribute::Class(class), Attribute::Label(label.as_bytes().to_vec())])?;
                if !existing.is_empty() {
                    return Err(HsmError::KeyExists { label: label.to_owned() });
                }
            }

            let (_public, private) =
                session.generate_key_pair(&mechanism, &public_template, &private_template).map_err(from_cryptoki)?;
            self.cache_handle(&id, generation, private);
            Ok(())
        })?;

        tracing::info!(
            token = %self.inner.summary.label,
            label,
            id = %hex(&id),
            %key_type,
            ?extractability,
            "generated key pair"
        );
        Ok(KeyRef::new(label.to_owned(), id, key_type))
    }

    /// Finds the private key with CKA_LABEL `label`.
    ///
    /// # Errors
    ///
    /// [`HsmError::KeyNotFound`] if no private key has the label,
    /// [`HsmError::AmbiguousLabel`] if more than one has it, and
    /// [`HsmError::UnsupportedKey`] if the key is not one of the [`KeyType`]s or has no
    /// CKA_ID.
    pub fn find_key(&self, label: &str) -> Result<KeyRef, HsmError> {
        self.run(|session, generation| {
            let logins_before = self.inner.pool.login_snapshot();
            let handles = find_objects(
                session,
                &[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Label(label.as_bytes().to_vec())],
            )?;
            let handle = match handles.as_slice() {
                [] => {
                    let error = HsmError::KeyNotFound { label: label.to_owned() };
                    return Err(self.explain_missing_key(session, generation, logins_before, error));
                }
                [handle] => *handle,
                more => {
                    return Err(HsmError::AmbiguousLabel { label: label.to_owned(), count: more.len() });
                }
            };
            let key = describe_private_key(session, handle)?;
            self.cache_handle(key.id(), generation, handle);
            Ok(key)
        })
    }

    /// Finds the private key with CKA_ID `id`.
    ///
    /// # Errors
    ///
    /// [`HsmError::KeyIdNotFound`], [`HsmError::AmbiguousId`] or [`HsmError::UnsupportedKey`].
    pub fn find_key_by_id(&self, id: &[u8]) -> Result<KeyRef, HsmError> {
        self.run(|session, generation| {
            let handle = self.find_private_key(session, generation, id)?;
            describe_private_key(session, handle)
        })
    }

    /// Reads the security attributes of a private key. Attributes the token does not report
    /// are returned as false.
    pub fn key_attributes(&self, key: &KeyRef) -> Result<KeyAttributes, HsmError> {
        const TYPES: [AttributeType; 7] = [
            AttributeType::Sensitive,
            AttributeType::Extractable,
            AttributeType::AlwaysSensitive,
            AttributeType::NeverExtractable,
            AttributeType::Private,
            AttributeType::Token,
            AttributeType::WrapWithTrusted,
        ];

        let attributes = self.run(|session, generation| {
            self.with_private_key(session, generation, key, |handle| {
                session.get_attributes(handle, &TYPES).map_err(from_cryptoki)
            })
        })?;

        let mut result = KeyAttributes {
            sensitive: false,
            extractable: false,
            always_sensitive: false,
            never_extractable: false,
            private: false,
            token: false,
            wrap_with_trusted: false,
        };
        for attribute in attributes {
            match attribute {
                Attribute::Sensitive(value) => result.sensitive = value,
                Attribute::Extractable(value) => result.extractable = value,
                Attribute::AlwaysSensitive(value) => result.always_sensitive = value,
                Attribute::NeverExtractable(value) => result.never_extractable = value,
                Attribute::Private(value) => result.private = value,
                Attribute::Token(value) => result.token = value,
                Attribute::WrapWithTrusted(value) => result.wrap_with_trusted = value,
                _ => {}
            }
        }
        Ok(result)
    }

    /// Returns the DER SubjectPublicKeyInfo of the key pair, built from the public key
    /// object with the same CKA_ID.
    ///
    /// # Errors
    ///
    /// [`HsmError::PublicKeyNotFound`] if the token has no public key object with the
    /// key's CKA_ID, and [`HsmError::InvalidPublicKey`] if its attributes do not fit the
    /// key type.
    pub fn public_key_spki_der(&self, key: &KeyRef) -> Result<Vec<u8>, HsmError> {
        build_spki(key, self.public_key_attributes(key)?)
    }

    /// Reads the attributes of the public key object with the CKA_ID of `key` that hold the
    /// public key: CKA_EC_PARAMS and CKA_EC_POINT, or CKA_MODULUS and CKA_PUBLIC_EXPONENT.
    fn public_key_attributes(&self, key: &KeyRef) -> Result<Vec<Attribute>, HsmError> {
        let types = public_key_attribute_types(key.key_type());
        self.run(|session, _| {
            let handle = find_public_key(session, key)?;
            session.get_attributes(handle, types).map_err(from_cryptoki)
        })
    }

    /// Signs `message` with `key` and returns the signature in the form X.509 uses.
    ///
    /// This call blocks until a session is free and the token has signed; async callers
    /// run it on a blocking thread.
    ///
    /// - EC P-256: SHA-256 of `message`, computed in this process, signed with CKM_ECDSA and
    ///   returned as a DER ECDSA-Sig-Value.
    /// - EC P-384: the same with SHA-384.
    /// - RSA-3072: CKM_SHA256_RSA_PKCS over `message`, returned as the raw signature bytes.
    ///
    /// If the token reports the session lost (for example CKR_SESSION_HANDLE_INVALID), the
    /// pool reopens its sessions, logs in again and retries the signature once.
    pub fn sign(&self, key: &KeyRef, message: &[u8]) -> Result<Vec<u8>, HsmError> {
        let started = Instant::now();
        let result = self.sign_untimed(key, message);
        self.inner.metrics.observe_sign(started.elapsed().as_secs_f64());
        result
    }

    fn sign_untimed(&self, key: &KeyRef, message: &[u8]) -> Result<Vec<u8>, HsmError> {
        let (mechanism, data) = signing_input(key.key_type(), message);

        let signature = self.run(|session, generation| {
            self.with_private_key(session, generation, key, |handle| {
                session.sign(&mechanism, handle, &data).map_err(from_cryptoki)
            })
        })?;

        signature_from_token(key.key_type(), signature)
    }

    /// Returns the ID of the slot that contains the token. Tests use it to open sessions with
    /// raw cryptoki calls without reading the slot list, see `SLOT_LIST_LOCK`.
    #[doc(hidden)]
    pub fn slot_id_for_test(&self) -> u64 {
        self.inner.pool.slot().id()
    }

    /// Logs the user out of the token behind the pool's back, so that the next operation
    /// finds the sessions logged out and the pool has to recover.
    #[doc(hidden)]
    pub fn logout_for_test(&self) -> Result<(), HsmError> {
        let lease = self.inner.pool.acquire().map_err(|failure| failure.error)?;
        lease.session().logout().map_err(from_cryptoki)
    }

    /// Finalizes and initializes the PKCS#11 module again, which closes every session of
    /// every token in this process. Tests use it to make the pool's session handles invalid.
    #[doc(hidden)]
    pub fn reinitialize_module_for_test(&self) -> Result<(), HsmError> {
        let context = &self.inner.pool.access().context;
        context.clone().finalize().map_err(from_cryptoki)?;
        context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).map_err(from_cryptoki)
    }

    /// Runs `operation` on a pooled session. If it fails because the sessions are lost or
    /// logged out, the pool recovers and `operation` runs once more on a new session.
    ///
    /// `operation` receives the session and the pool generation it belongs to.
    fn run<T>(&self, mut operation: impl FnMut(&Session, u64) -> Result<T, HsmError>) -> Result<T, HsmError> {
        let (error, generation) = match self.attempt(&mut operation) {
            Ok(value) => return Ok(value),
            Err(failure) => failure,
        };
        if !error.needs_session_recovery() {
            return Err(error);
        }

        match self.inner.pool.recover(generation, &error) {
            Ok(true) => {
                self.inner.metrics.count_recovery();
                self.inner.key_handles.lock().retain(|_, (handle_generation, _)| *handle_generation > generation);
                tracing::warn!(
                    token = %self.inner.summary.label,
                    %error,
                    "reopened the HSM session pool after a session failure, retrying the operation once"
                );
            }
            Ok(false) => {
                tracing::debug!(
                    token = %self.inner.summary.label,
                    %error,
                    "HSM session failed after another thread reopened the pool; retrying once"
                );
            }
            Err(recovery_error) => {
                tracing::error!(
                    token = %self.inner.summary.label,
                    %error,
                    %recovery_error,
                    "HSM session recovery failed"
                );
                return Err(recovery_error);
            }
        }

        self.attempt(&mut operation).map_err(|(error, _)| error)
    }

    /// Runs `operation` once and counts a failing PKCS#11 return code in the metrics.
    fn attempt<T>(
        &self,
        operation: &mut impl FnMut(&Session, u64) -> Result<T, HsmError>,
    ) -> Result<T, (HsmError, u64)> {
        let result = match self.inner.pool.acquire() {
            Ok(lease) => operation(lease.session(), lease.generation()).map_err(|error| (error, lease.generation())),
            Err(failure) => Err((failure.error, failure.generation)),
        };
        if let Err((error, _)) = &result
            && let Some(code) = error.ckr_code()
        {
            self.inner.metrics.count_error(code);
        }
        result
    }

    /// Runs `operation` with the handle of the private key of `key`. A cached handle that
    /// the token rejects as invalid is looked up again by CKA_ID and `operation` retried once.
    fn with_private_key<T>(
        &self,
        session: &Session,
        generation: u64,
        key: &KeyRef,
        mut operation: impl FnMut(ObjectHandle) -> Result<T, HsmError>,
    ) -> Result<T, HsmError> {
        let cached = self
            .inner
            .key_handles
            .lock()
            .get(key.id())
            .filter(|(handle_generation, _)| *handle_generation == generation)
            .map(|(_, handle)| *handle);

        if let Some(handle) = cached {
            match operation(handle) {
                Err(error) if error.is_stale_object_handle() => {
                    if let Some(code) = error.ckr_code() {
                        self.inner.metrics.count_error(code);
                    }
                    self.inner.key_handles.lock().remove(key.id());
                }
                result => return result,
            }
        }

        let handle = self.find_private_key(session, generation, key.id())?;
        operation(handle)
    }

    /// Replaces a key-not-found error by [`HsmError::NotLoggedIn`] if the login may have
    /// been missing during the search, because private keys are invisible then. SoftHSM 2.6
    /// also invalidates the handles of private keys on logout, so a logout shows up as a
    /// missing key and not as CKR_USER_NOT_LOGGED_IN.
    ///
    /// Login state is shared by all sessions of the process, so another thread may have
    /// logged in again between the search and this check. `logins_before`, the pool's login
    /// snapshot taken before the search, and the pool generation show whether that happened.
    /// NOTE: logins by other `Hsm` values on the same token in this process are not tracked,
    /// so during such a login a missing key can still be reported as not found.
    fn explain_missing_key(
        &self,
        session: &Session,
        generation: u64,
        logins_before: Option<u64>,
        error: HsmError,
    ) -> HsmError {
        if !matches!(
            error,
            HsmError::KeyNotFound { .. } | HsmError::KeyIdNotFound { .. } | HsmError::KekNotFound { .. }
        ) {
            return error;
        }

        let logged_in = match session.get_session_info() {
            Ok(info) => matches!(info.session_state(), SessionState::RoUser | SessionState::RwUser),
            Err(info_error) => return from_cryptoki(info_error),
        };
        let pool = &self.inner.pool;
        let no_login_since = logins_before == Some(pool.logins_started());
        if logged_in && no_login_since && pool.generation() == generation {
            return error;
        }
        HsmError::NotLoggedIn { token: self.inner.summary.label.clone() }
    }

    /// Finds the private key with CKA_ID `id` and caches its handle.
    fn find_private_key(&self, session: &Session, generation: u64, id: &[u8]) -> Result<ObjectHandle, HsmError> {
        let logins_before = self.inner.pool.login_snapshot();
        let handle = find_private_key_by_id(session, id)
            .map_err(|error| self.explain_missing_key(session, generation, logins_before, error))?;
        self.cache_handle(id, generation, handle);
        Ok(handle)
    }

    fn cache_handle(&self, id: &[u8], generation: u64, handle: ObjectHandle) {
        self.inner.key_handles.lock().insert(id.to_vec(), (generation, handle));
    }
}

/// Returns the PKCS#11 mechanism and the data to pass to C_Sign for a signature over
/// `message`. EC keys sign a digest computed in this process, RSA keys hash on the token.
fn signing_input(key_type: KeyType, message: &[u8]) -> (Mechanism<'static>, Vec<u8>) {
    match key_type {
        KeyType::EcP256 => (Mechanism::Ecdsa, ring::digest::digest(&ring::digest::SHA256, message).as_ref().to_vec()),
        KeyType::EcP384 => (Mechanism::Ecdsa, ring::digest::digest(&ring::digest::SHA384, message).as_ref().to_vec()),
        KeyType::Rsa3072 => (Mechanism::Sha256RsaPkcs, message.to_vec()),
    }
}

/// Converts the output of C_Sign into the form X.509 uses: a DER ECDSA-Sig-Value for EC keys,
/// the raw signature for RSA keys.
fn signature_from_token(key_type: KeyType, signature: Vec<u8>) -> Result<Vec<u8>, HsmError> {
    let Some(half_len) = key_type.ecdsa_half_len() else {
        return Ok(signature);
    };
    if signature.len() != 2 * half_len {
        return Err(HsmError::InvalidSignature {
            reason: format!(
                "token returned a {}-byte {} signature; expected {} bytes",
                signature.len(),
                key_type,
                2 * half_len
            ),
        });
    }
    der::ecdsa_raw_to_der(&signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsm_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Hsm>();
    }
}
