use std::path::PathBuf;
use std::time::Duration;

use cryptoki::error::{Error as CryptokiError, RvError};

use crate::TokenSelector;

/// Errors of HSM operations.
///
/// No variant carries a PIN or key material. Login failures name the token and the PKCS#11
/// return code, and PIN source failures name the file or environment variable. Wrap and unwrap
/// failures name key and KEK labels, CKA_IDs and KEK check values.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    #[error("failed to load PKCS#11 module {}: {reason}", path.display())]
    ModuleLoad { path: PathBuf, reason: String },

    #[error("token not found: no initialized token in PKCS#11 module {} has {selector}", module.display())]
    TokenNotFound { module: PathBuf, selector: TokenSelector },

    #[error("token initialization failed: a token with label \"{label}\" already exists")]
    TokenExists { label: String },

    #[error(
        "token initialization failed: PKCS#11 module {} has no slot with an uninitialized token",
        module.display()
    )]
    NoFreeSlot { module: PathBuf },

    #[error("invalid token label \"{label}\": {reason}")]
    InvalidTokenLabel { label: String, reason: String },

    #[error("login to token \"{token}\" failed: {code}")]
    Login { token: String, code: String },

    #[error("token \"{token}\" has logged the user out, so its private keys are not visible")]
    NotLoggedIn { token: String },

    #[error("private key with label \"{label}\" not found")]
    KeyNotFound { label: String },

    #[error("private key with CKA_ID {id} not found")]
    KeyIdNotFound { id: String },

    #[error("public key of key \"{label}\" not found: no public key object has CKA_ID {id}")]
    PublicKeyNotFound { label: String, id: String },

    #[error("label \"{label}\" is ambiguous: {count} private keys have it")]
    AmbiguousLabel { label: String, count: usize },

    #[error("CKA_ID {id} is ambiguous: {count} private keys have it")]
    AmbiguousId { id: String, count: usize },

    #[error("key generation failed: a key with label \"{label}\" already exists")]
    KeyExists { label: String },

    #[error("unsupported key: {reason}")]
    UnsupportedKey { reason: String },

    #[error("unknown key type \"{0}\": expected ec-p256, ec-p384 or rsa-3072")]
    UnknownKeyType(String),

    #[error(
        "timed out after {waited:?} waiting for a free HSM session: all {size} sessions are in \
         use, so raise the session count or lower the load"
    )]
    PoolTimeout { waited: Duration, size: usize },

    #[error("{function} failed: {code}")]
    Pkcs11 { function: String, code: String },

    #[error("PKCS#11 binding error: {reason}")]
    Binding { reason: String },

    #[error("failed to read PIN from {origin}: {reason}")]
    InvalidPinSource { origin: String, reason: String },

    #[error("failed to generate random bytes: the operating system random number generator failed")]
    RandomFailed,

    #[error("invalid ECDSA signature: {reason}")]
    InvalidSignature { reason: String },

    #[error("invalid public key: {reason}")]
    InvalidPublicKey { reason: String },

    #[error("security officer login to token \"{token}\" failed: {code}")]
    SoLogin { token: String, code: String },

    #[error(
        "cannot log in as the security officer on token \"{token}\": this process has the user \
         logged in there, so install the key-encryption key before opening an Hsm on the token"
    )]
    UserLoggedIn { token: String },

    #[error(
        "key-encryption key installation failed: token \"{token}\" already has a secret key with \
         label \"{label}\", so destroy it first or choose another label"
    )]
    KekExists { label: String, token: String },

    #[error("key-encryption key \"{label}\" not found: the token has no secret key with that label")]
    KekNotFound { label: String },

    #[error("key-encryption key label \"{label}\" is ambiguous: {count} secret keys have it")]
    AmbiguousKek { label: String, count: usize },

    #[error("key-encryption key \"{label}\" cannot be used: {reason}")]
    UnsupportedKek { label: String, reason: String },

    #[error(
        "key-encryption key \"{label}\" is not marked trusted (CKA_TRUSTED) by the token's security \
         officer, so the token refused to wrap with it: {code}"
    )]
    KekNotTrusted { label: String, code: String },

    #[error(
        "key \"{label}\" cannot be wrapped because it is not extractable (CKA_EXTRACTABLE false): \
         {code}"
    )]
    KeyNotExtractable { label: String, code: String },

    #[error("wrapping key \"{label}\" with key-encryption key \"{kek}\" failed: {code}")]
    WrapFailed { label: String, kek: String, code: String },

    #[error(
        "key \"{label}\" was wrapped under a key-encryption key with check value {wrapped_under}, \
         but the key-encryption key \"{kek}\" on this token has check value {local}: install the \
         cluster's key-encryption key on this token"
    )]
    KekMismatch { label: String, kek: String, wrapped_under: String, local: String },

    #[error(
        "unwrapping key \"{label}\" with key-encryption key \"{kek}\" failed: {code}; the wrapped \
         bytes were altered or were wrapped under a different key-encryption key"
    )]
    UnwrapFailed { label: String, kek: String, code: String },

    #[error("cannot unwrap key \"{label}\": token \"{token}\" already has a key with that label")]
    UnwrapLabelExists { label: String, token: String },

    #[error("cannot unwrap key \"{label}\": token \"{token}\" already has a key with its CKA_ID {id}")]
    UnwrapIdExists { label: String, id: String, token: String },

    #[error(
        "unwrapped key \"{label}\" does not match the public key sent with it, so it was destroyed: \
         the wrapped key was altered or combines two key pairs"
    )]
    KeyPairMismatch { label: String },

    #[error("invalid wrapped key: {reason}")]
    InvalidWrappedKey { reason: String },
}

/// Return codes after which the pool's sessions cannot be used again: the module has closed
/// them or lost the token.
const SESSION_LOST_CODES: &[&str] =
    &["CKR_SESSION_HANDLE_INVALID", "CKR_SESSION_CLOSED", "CKR_DEVICE_REMOVED", "CKR_TOKEN_NOT_PRESENT"];

/// Return codes after which the sessions may still be open but need a fresh start.
const SESSION_STALE_CODES: &[&str] = &["CKR_USER_NOT_LOGGED_IN", "CKR_DEVICE_ERROR"];

impl HsmError {
    /// Returns the PKCS#11 return code name (for example `CKR_PIN_INCORRECT`) if the error
    /// comes from a PKCS#11 call. [`HsmError::NotLoggedIn`] returns CKR_USER_NOT_LOGGED_IN.
    pub fn ckr_code(&self) -> Option<&str> {
        match self {
            HsmError::Pkcs11 { code, .. }
            | HsmError::Login { code, .. }
            | HsmError::SoLogin { code, .. }
            | HsmError::KekNotTrusted { code, .. }
            | HsmError::KeyNotExtractable { code, .. }
            | HsmError::WrapFailed { code, .. }
            | HsmError::UnwrapFailed { code, .. } => Some(code),
            HsmError::NotLoggedIn { .. } => Some("CKR_USER_NOT_LOGGED_IN"),
            _ => None,
        }
    }

    /// Returns true if the session pool should reopen its sessions after this error.
    pub(crate) fn needs_session_recovery(&self) -> bool {
        self.ckr_code().is_some_and(|code| SESSION_LOST_CODES.contains(&code) || SESSION_STALE_CODES.contains(&code))
    }

    /// Returns true if the module has already closed the sessions, so their handles must not
    /// be closed again: the module may have given the same handle number to a new session.
    pub(crate) fn sessions_lost(&self) -> bool {
        self.ckr_code().is_some_and(|code| SESSION_LOST_CODES.contains(&code))
    }

    /// Returns true if the error means an object handle no longer refers to the object.
    pub(crate) fn is_stale_object_handle(&self) -> bool {
        matches!(self.ckr_code(), Some("CKR_KEY_HANDLE_INVALID" | "CKR_OBJECT_HANDLE_INVALID"))
    }
}

/// Converts a cryptoki error into an [`HsmError`], keeping the PKCS#11 function name and the
/// return code name.
pub(crate) fn from_cryptoki(error: CryptokiError) -> HsmError {
    match error {
        CryptokiError::Pkcs11(rv, function) => {
            HsmError::Pkcs11 { function: format!("C_{function:?}"), code: ckr_name(rv) }
        }
        other => HsmError::Binding { reason: other.to_string() },
    }
}

/// Returns the PKCS#11 name of a return code, for example `CKR_SESSION_HANDLE_INVALID`.
///
/// cryptoki names each `RvError` variant after the return code in upper camel case, so the
/// name is rebuilt from the variant name. Codes that cryptoki does not know are printed in
/// hexadecimal.
pub(crate) fn ckr_name(rv: RvError) -> String {
    match rv {
        RvError::VendorDefined(code) => format!("CKR_VENDOR_DEFINED(0x{code:08x})"),
        RvError::UnknownErrorCode(code) => format!("CKR_0x{code:08x}"),
        known => {
            let camel = format!("{known:?}");
            let mut name = String::with_capacity(camel.len() + 8);
            name.push_str("CKR");
            for character in camel.chars() {
                if character.is_ascii_uppercase() {
                    name.push('_');
                }
                name.push(character.to_ascii_uppercase());
            }
            name
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    #[test]
    fn ckr_name_known_codes() {
        let cases = [
            (RvError::SessionHandleInvalid, "CKR_SESSION_HANDLE_INVALID"),
            (RvError::PinIncorrect, "CKR_PIN_INCORRECT"),
            (RvError::UserNotLoggedIn, "CKR_USER_NOT_LOGGED_IN"),
            (RvError::DeviceError, "CKR_DEVICE_ERROR"),
            (RvError::Cancel, "CKR_CANCEL"),
            (RvError::SessionReadWriteSoExists, "CKR_SESSION_READ_WRITE_SO_EXISTS"),
        ];
        for (rv, expected) in cases {
            assert_eq!(ckr_name(rv), expected);
        }
    }

    #[test]
    fn ckr_name_vendor_and_unknown_codes() {
        assert_eq!(ckr_name(RvError::VendorDefined(0x8000_0001)), "CKR_VENDOR_DEFINED(0x80000001)");
        assert_eq!(ckr_name(RvError::UnknownErrorCode(0x1234)), "CKR_0x00001234");
    }

    #[test]
    fn from_cryptoki_names_function_and_code() {
        let error = from_cryptoki(CryptokiError::Pkcs11(RvError::SessionClosed, Function::FindObjectsInit));
        assert_eq!(error.to_string(), "C_FindObjectsInit failed: CKR_SESSION_CLOSED");
        assert!(error.needs_session_recovery());
        assert!(error.sessions_lost());
    }

    #[test]
    fn recovery_classification() {
        let stale = from_cryptoki(CryptokiError::Pkcs11(RvError::UserNotLoggedIn, Function::SignInit));
        assert!(stale.needs_session_recovery());
        assert!(!stale.sessions_lost());

        let unrelated = from_cryptoki(CryptokiError::Pkcs11(RvError::MechanismInvalid, Function::SignInit));
        assert!(!unrelated.needs_session_recovery());

        let handle = from_cryptoki(CryptokiError::Pkcs11(RvError::KeyHandleInvalid, Function::SignInit));
        assert!(handle.is_stale_object_handle());
        assert!(!handle.needs_session_recovery());
    }
}
