//! Session pool recovery after every session handle became invalid.
//!
//! C_Finalize closes the sessions of all tokens in the process, so this test has a test
//! binary, and thus a process, of its own.

mod common;

use sigil_hsm::{Extractability, KeyType};

#[test]
fn sign_recovers_after_module_reinitialization() {
    let label = common::new_token("recover-reinit");
    let (hsm, registry) = common::open_with_registry(&label, 4);

    let mut keys = Vec::new();
    for key_type in [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa3072] {
        let key = hsm
            .generate_key_pair(&format!("reinit-{key_type}"), key_type, Extractability::Never)
            .expect("key generation");
        let spki = hsm.public_key_spki_der(&key).expect("SPKI");
        hsm.sign(&key, b"before").expect("signature before reset");
        keys.push((key, spki));
    }

    hsm.reinitialize_module_for_test().expect("finalize and initialize the module");

    for (key, spki) in &keys {
        let signature = hsm.sign(key, b"after").expect("signature after reset");
        common::verify(spki, key.key_type(), b"after", &signature);
    }

    assert_eq!(common::counter_value(&registry, "sigil_hsm_session_recoveries_total"), 1.0);
    assert!(common::error_count(&registry, "CKR_SESSION_HANDLE_INVALID") >= 1.0);

    // The recovered pool also serves key lookups and a second reset.
    let found = hsm.find_key("reinit-ec-p256").expect("find after reset");
    assert_eq!(found, keys[0].0);

    hsm.reinitialize_module_for_test().expect("finalize and initialize the module again");
    let signature = hsm.sign(&found, b"again").expect("signature after second reset");
    common::verify(&keys[0].1, KeyType::EcP256, b"again", &signature);
    assert_eq!(common::counter_value(&registry, "sigil_hsm_session_recoveries_total"), 2.0);
}
