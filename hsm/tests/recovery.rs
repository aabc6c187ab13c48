//! Session pool recovery after the token logged the user out behind the pool's back.

mod common;

use std::sync::Arc;

use sigil_hsm::{Extractability, KeyType};

#[test]
fn sign_recovers_after_logout() {
    let label = common::new_token("recover-logout");
    let (hsm, registry) = common::open_with_registry(&label, 4);
    let key = hsm.generate_key_pair("recover", KeyType::EcP256, Extractability::Never).expect("key generation");
    let spki = hsm.public_key_spki_der(&key).expect("SPKI");
    hsm.sign(&key, b"before").expect("signature before logout");

    hsm.logout_for_test().expect("logout");
    let signature = hsm.sign(&key, b"after").expect("signature after logout");
    common::verify(&spki, KeyType::EcP256, b"after", &signature);

    assert_eq!(common::counter_value(&registry, "sigil_hsm_session_recoveries_total"), 1.0);
    assert!(common::error_count(&registry, "CKR_USER_NOT_LOGGED_IN") >= 1.0);

    for index in 0u32..20 {
        let message = index.to_be_bytes();
        let signature = hsm.sign(&key, &message).expect("signature after recovery");
        common::verify(&spki, KeyType::EcP256, &message, &signature);
    }
    assert_eq!(common::counter_value(&registry, "sigil_hsm_session_recoveries_total"), 1.0, "recovered more than once");
}

#[test]
fn concurrent_signers_recover_after_logout() {
    const THREADS: usize = 4;

    let label = common::new_token("recover-threads");
    let (hsm, registry) = common::open_with_registry(&label, THREADS);
    let key = hsm.generate_key_pair("recover", KeyType::EcP384, Extractability::Never).expect("key generation");
    let spki = Arc::new(hsm.public_key_spki_der(&key).expect("SPKI"));

    // Fill the pool so that every session is logged out at once.
    std::thread::scope(|scope| {
        for _ in 0..THREADS {
            scope.spawn(|| hsm.sign(&key, b"warm-up").expect("warm-up signature"));
        }
    });
    hsm.logout_for_test().expect("logout");

    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let (hsm, key, spki) = (&hsm, &key, Arc::clone(&spki));
            scope.spawn(move || {
                for index in 0..25 {
                    let message = format!("{thread}/{index}");
                    let signature = hsm.sign(key, message.as_bytes()).expect("signature");
                    common::verify(&spki, KeyType::EcP384, message.as_bytes(), &signature);
                }
            });
        }
    });

    // A thread that opens a new session logs in again, so the other threads may find the
    // token logged in before any of them needs a recovery.
    let recoveries = common::counter_value(&registry, "sigil_hsm_session_recoveries_total");
    assert!(recoveries <= THREADS as f64, "{recoveries} recoveries");
}
