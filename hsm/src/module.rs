//! Process-wide PKCS#11 module contexts, token lookup and token initialization.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::session::UserType;
use cryptoki::slot::{Slot, TokenInfo};
use parking_lot::Mutex;

use crate::error::from_cryptoki;
use crate::{HsmError, Pin, TokenSelector};

/// Maximum length in bytes of a token label (the `label` field of CK_TOKEN_INFO).
const MAX_TOKEN_LABEL_LEN: usize = 32;

/// Initialized module contexts by canonical module path. C_Initialize succeeds only once per
/// process and module, so every `Hsm` and `init_token` call on a module shares one context.
static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();

/// Serializes slot list reads and token initialization in this process. Two `init_token`
/// calls could otherwise pick the same free slot. SoftHSM 2.6.1 also aborts the process
/// (assertion in `SlotManager::insertToken`) when two threads call C_GetSlotList at once
/// while it adds the new empty slot that follows a C_InitToken.
static SLOT_LIST_LOCK: Mutex<()> = Mutex::new(());

/// Returns the process-wide context of the module at `path`, loading and initializing the
/// module on first use.
pub(crate) fn context(path: &Path) -> Result<Pkcs11, HsmError> {
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut modules = MODULES.get_or_init(Default::default).lock();
    if let Some(context) = modules.get(&key) {
        return Ok(context.clone());
    }

    let load_failed = |reason: String| HsmError::ModuleLoad { path: path.to_path_buf(), reason };
    let context = Pkcs11::new(&key).map_err(|error| load_failed(error.to_string()))?;
    match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Another library in this process may have initialized the module already, which
        // leaves it usable for us as well.
        Ok(()) | Err(CryptokiError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(error) => return Err(load_failed(from_cryptoki(error).to_string())),
    }

    modules.insert(key, context.clone());
    Ok(context)
}

/// Finds the slot whose initialized token matches `selector`.
pub(crate) fn find_token(
    context: &Pkcs11,
    module: &Path,
    selector: &TokenSelector,
) -> Result<(Slot, TokenInfo), HsmError> {
    let _guard = SLOT_LIST_LOCK.lock();
    for slot in context.get_slots_with_token().map_err(from_cryptoki)? {
        let info = context.get_token_info(slot).map_err(from_cryptoki)?;
        if info.token_initialized() && selector.matches(info.label(), info.serial_number()) {
            return Ok((slot, info));
        }
    }
    Err(HsmError::TokenNotFound { module: module.to_path_buf(), selector: selector.clone() })
}

/// Initializes a new token for development and tests: takes a slot with an uninitialized
/// token, initializes it with `label` and the security officer PIN, and sets the user PIN.
///
/// Production tokens are set up with the HSM vendor's tools. SoftHSM 2.6 adds a new
/// uninitialized slot after each C_InitToken, so a process can create many tokens.
///
/// # Errors
///
/// [`HsmError::TokenExists`] if an initialized token already has `label`,
/// [`HsmError::InvalidTokenLabel`] if `label` is empty or longer than 32 bytes,
/// [`HsmError::NoFreeSlot`] if no slot has an uninitialized token, and
/// [`HsmError::Pkcs11`] if a PKCS#11 call fails.
pub fn init_token(module: &Path, label: &str, so_pin: &Pin, user_pin: &Pin) -> Result<(), HsmError> {
    if label.is_empty() || label.len() > MAX_TOKEN_LABEL_LEN {
        return Err(HsmError::InvalidTokenLabel {
            label: label.to_owned(),
            reason: format!("length is {} bytes; expected 1 to 32", label.len()),
        });
    }

    let context = context(module)?;
    let _guard = SLOT_LIST_LOCK.lock();

    let mut free_slot = None;
    for slot in context.get_slots_with_token().map_err(from_cryptoki)? {
        let info = context.get_token_info(slot).map_err(from_cryptoki)?;
        if !info.token_initialized() {
            free_slot.get_or_insert(slot);
        } else if info.label() == label {
            return Err(HsmError::TokenExists { label: label.to_owned() });
        }
    }
    let slot = free_slot.ok_or_else(|| HsmError::NoFreeSlot { module: module.to_path_buf() })?;

    context.init_token(slot, &so_pin.to_auth_pin(), label).map_err(from_cryptoki)?;

    let session = context.open_rw_session(slot).map_err(from_cryptoki)?;
    session.login(UserType::So, Some(&so_pin.to_auth_pin())).map_err(from_cryptoki)?;
    session.init_pin(&user_pin.to_auth_pin()).map_err(from_cryptoki)?;
    session.logout().map_err(from_cryptoki)?;
    Ok(())
}
