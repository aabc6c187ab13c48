//! PKCS#11 key custody for Sigil.
//!
//! This crate keeps Sigil's CA keys on a PKCS#11 token (a network HSM in production,
//! SoftHSM2 in development and tests) and signs with them. It loads the vendor's module,
//! finds the token by label or serial number, logs in once as the user, and keeps a pool of
//! sessions with one operation in flight per session.
//!
//! # Signing contract
//!
//! [`Hsm::sign`] blocks the calling thread, so async callers run it on a blocking thread.
//! It returns the signature in the form an X.509 `signatureValue` contains:
//!
//! | key type   | hashing                        | PKCS#11 mechanism      | returned bytes               |
//! |------------|--------------------------------|------------------------|------------------------------|
//! | `ec-p256`  | SHA-256 in this process (ring) | `CKM_ECDSA`            | DER `ECDSA-Sig-Value`        |
//! | `ec-p384`  | SHA-384 in this process (ring) | `CKM_ECDSA`            | DER `ECDSA-Sig-Value`        |
//! | `rsa-3072` | SHA-256 on the token           | `CKM_SHA256_RSA_PKCS`  | raw PKCS #1 v1.5 signature   |
//!
//! A caller waits at most [`SESSION_WAIT_TIMEOUT`] for a free session.
//!
//! The pool recovers when an operation fails with CKR_SESSION_HANDLE_INVALID,
//! CKR_SESSION_CLOSED, CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT, CKR_USER_NOT_LOGGED_IN or
//! CKR_DEVICE_ERROR, or finds no private key because the user was logged out. It discards its
//! sessions, finds the token again, opens new sessions and logs in. The operation then runs
//! once more and looks the key up again by CKA_ID. Each recovery logs a warning and
//! increments `sigil_hsm_session_recoveries_total`.
//!
//! # Keys
//!
//! [`Hsm::generate_key_pair`] creates token keys with a random 16-byte CKA_ID shared by the
//! private and the public key. Private keys are always sensitive. With
//! [`Extractability::Never`] they can never leave the token. With
//! [`Extractability::WrapWithTrustedOnly`] they can only be wrapped with a trusted key, for
//! copying them between the HSMs of a cluster.
//!
//! # Copying keys between tokens
//!
//! Every token of a cluster has the same AES-256 key-encryption key (KEK), which the
//! token's security officer marked CKA_TRUSTED. [`Hsm::wrap_key`] wraps a private key under
//! the KEK with CKM_AES_KEY_WRAP_PAD into a [`WrappedKey`], which also carries the label,
//! CKA_ID and public key of the key pair and the KEK's check value.
//! [`WrappedKey::encode`] and [`WrappedKey::decode`] turn it into bytes and back, for sending
//! to another node. [`Hsm::unwrap_key`] on the receiving token creates the private key and
//! its public key object there, and checks with a test signature that the two match. Sigil
//! never handles the key in plaintext. [`install_kek`] notes what PKCS#11 still allows a
//! holder of the user PIN to do.
//!
//! [`Hsm::find_kek`] checks that a token has a usable KEK. Production HSMs get the KEK from
//! the vendor's key ceremony. For development and tests, [`install_kek`] installs a
//! [`KekMaterial`] made by [`KekMaterial::generate`] on each token, logging in as the
//! security officer.
//!
//! # Process-wide state
//!
//! C_Initialize succeeds once per process and module, so every [`Hsm`] and every
//! [`init_token`] and [`install_kek`] call on the same module path shares one initialized
//! module context.

mod der;
mod error;
mod hsm;
mod kek;
mod metrics;
mod module;
mod objects;
mod pin;
mod pool;
mod types;
mod wrapped;

pub use der::ecdsa_raw_to_der;
pub use error::HsmError;
pub use hsm::{Hsm, SESSION_WAIT_TIMEOUT};
pub use kek::{KekInfo, KekMaterial, install_kek};
pub use metrics::HsmMetrics;
pub use module::init_token;
pub use pin::Pin;
pub use types::{Extractability, HsmConfig, KeyAttributes, KeyRef, KeyType, TokenSelector, TokenSummary};
pub use wrapped::WrappedKey;
