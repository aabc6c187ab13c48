//! Signatures from a real SoftHSM2 token, verified with ring.

mod common;

use std::sync::Arc;

use sigil_hsm::{Extractability, KeyType};

#[test]
fn sign_verify_all_key_types() {
    let label = common::new_token("sign");
    let hsm = common::open(&label, 2);

    for key_type in [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa3072] {
        let key = hsm
            .generate_key_pair(&format!("sign-{key_type}"), key_type, Extractability::Never)
            .expect("key generation");
        let spki = hsm.public_key_spki_der(&key).expect("SPKI");

        for message in [&b""[..], b"tbsCertificate", &[0xa5; 4096]] {
            let signature = hsm.sign(&key, message).expect("signature");
            common::verify(&spki, key_type, message, &signature);
        }
        if key_type == KeyType::Rsa3072 {
            let signature = hsm.sign(&key, b"length").expect("signature");
            assert_eq!(signature.len(), 384, "RSA-3072 signature length");
        }
    }
}

#[test]
fn signature_fails_for_other_message() {
    let label = common::new_token("sign-wrong");
    let hsm = common::open(&label, 1);
    let key = hsm.generate_key_pair("k", KeyType::EcP256, Extractability::Never).expect("key generation");
    let spki = hsm.public_key_spki_der(&key).expect("SPKI");
    let signature = hsm.sign(&key, b"signed").expect("signature");

    let public_key = common::public_key_from_spki(&spki, KeyType::EcP256);
    let result = ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, &public_key)
        .verify(b"other", &signature);
    assert!(result.is_err(), "signature verified for another message");
}

/// Reads the two INTEGER contents of a DER ECDSA-Sig-Value whose lengths fit in one byte.
fn ecdsa_integers(der: &[u8]) -> (&[u8], &[u8]) {
    assert_eq!(der[0], 0x30, "SEQUENCE tag");
    assert_eq!(usize::from(der[1]), der.len() - 2, "SEQUENCE length");
    assert_eq!(der[2], 0x02, "INTEGER tag of r");
    let r_len = usize::from(der[3]);
    let r = &der[4..4 + r_len];
    let s_header = 4 + r_len;
    assert_eq!(der[s_header], 0x02, "INTEGER tag of s");
    let s_len = usize::from(der[s_header + 1]);
    let s = &der[s_header + 2..];
    assert_eq!(s.len(), s_len, "INTEGER length of s");
    (r, s)
}

/// Signs 200 messages and checks every DER signature with ring and for minimal INTEGERs.
/// About half of all r and s values have their high bit set, so both the padded and the
/// unpadded encoding occur.
fn check_many_ecdsa_signatures(key_type: KeyType, half_len: usize) {
    let label = common::new_token(&format!("many-{key_type}"));
    let hsm = common::open(&label, 1);
    let key = hsm.generate_key_pair("many", key_type, Extractability::Never).expect("key generation");
    let spki = hsm.public_key_spki_der(&key).expect("SPKI");

    let mut padded = 0;
    let mut unpadded = 0;
    for index in 0u32..200 {
        let message = index.to_be_bytes();
        let signature = hsm.sign(&key, &message).expect("signature");
        common::verify(&spki, key_type, &message, &signature);

        let (r, s) = ecdsa_integers(&signature);
        for integer in [r, s] {
            assert!(integer.len() <= half_len + 1, "INTEGER longer than the curve order");
            if integer[0] == 0x00 {
                assert!(integer[1] & 0x80 != 0, "non-minimal INTEGER {integer:02x?}");
                padded += 1;
            } else {
                assert!(integer[0] & 0x80 == 0, "negative INTEGER {integer:02x?}");
                unpadded += 1;
            }
        }
    }
    assert!(padded > 0, "no r or s needed a 0x00 pad");
    assert!(unpadded > 0, "every r and s needed a 0x00 pad");
}

#[test]
fn many_p256_signatures_verify() {
    check_many_ecdsa_signatures(KeyType::EcP256, 32);
}

#[test]
fn many_p384_signatures_verify() {
    check_many_ecdsa_signatures(KeyType::EcP384, 48);
}

#[test]
fn concurrent_signatures_verify() {
    const THREADS: usize = 8;
    const SIGNATURES_PER_THREAD: usize = 200;

    let label = common::new_token("concurrent");
    let (hsm, registry) = common::open_with_registry(&label, 4);
    let key = hsm.generate_key_pair("concurrent", KeyType::EcP256, Extractability::Never).expect("key generation");
    let spki = Arc::new(hsm.public_key_spki_der(&key).expect("SPKI"));

    let workers: Vec<_> = (0..THREADS)
        .map(|thread| {
            let hsm = hsm.clone();
            let key = key.clone();
            let spki = Arc::clone(&spki);
            std::thread::spawn(move || {
                for index in 0..SIGNATURES_PER_THREAD {
                    let message = format!("thread {thread} signature {index}");
                    let signature = hsm.sign(&key, message.as_bytes()).expect("signature");
                    common::verify(&spki, KeyType::EcP256, message.as_bytes(), &signature);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("signing thread panicked");
    }

    assert_eq!(common::sign_count(&registry), (THREADS * SIGNATURES_PER_THREAD) as u64);
    assert_eq!(
        common::counter_value(&registry, "sigil_hsm_errors_total"),
        0.0,
        "PKCS#11 errors during concurrent signing"
    );
}
