use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::HsmError;

/// Location of the PKCS#11 module and token, and the size of the session pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HsmConfig {
    /// Path of the PKCS#11 module (shared library).
    pub module: PathBuf,
    /// Token that contains the keys.
    pub token: TokenSelector,
    /// Number of sessions in the pool, which is also the maximum number of operations in
    /// flight. 0 means two per available CPU core.
    pub sessions: usize,
}

/// Selects a token by its label or its serial number, as C_GetTokenInfo reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    Label(String),
    Serial(String),
}

impl TokenSelector {
    pub(crate) fn matches(&self, label: &str, serial: &str) -> bool {
        match self {
            TokenSelector::Label(wanted) => wanted == label,
            TokenSelector::Serial(wanted) => wanted == serial,
        }
    }
}

impl fmt::Display for TokenSelector {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSelector::Label(label) => write!(formatter, "label \"{label}\""),
            TokenSelector::Serial(serial) => write!(formatter, "serial number \"{serial}\""),
        }
    }
}

/// Key algorithms Sigil generates and signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// ECDSA on NIST P-256 with SHA-256.
    EcP256,
    /// ECDSA on NIST P-384 with SHA-384.
    EcP384,
    /// RSA with a 3072-bit modulus, PKCS #1 v1.5 signatures with SHA-256.
    Rsa3072,
}

impl KeyType {
    /// Returns the length in bytes of one ECDSA signature half (`r` or `s`), or `None` for RSA.
    pub(crate) fn ecdsa_half_len(self) -> Option<usize> {
        match self {
            KeyType::EcP256 => Some(32),
            KeyType::EcP384 => Some(48),
            KeyType::Rsa3072 => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
            KeyType::Rsa3072 => "rsa-3072",
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

impl FromStr for KeyType {
    type Err = HsmError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa3072]
            .into_iter()
            .find(|key_type| key_type.name() == text)
            .ok_or_else(|| HsmError::UnknownKeyType(text.to_owned()))
    }
}

/// Whether a generated private key may ever leave the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extractability {
    /// CKA_EXTRACTABLE false: the key can never be wrapped or exported.
    Never,
    /// CKA_EXTRACTABLE true and CKA_WRAP_WITH_TRUSTED true: the key can only be wrapped
    /// with a key marked CKA_TRUSTED, which only the security officer can set. This allows
    /// copying the key to another HSM of a cluster.
    WrapWithTrustedOnly,
}

/// Security attributes of a private key as the token reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyAttributes {
    pub sensitive: bool,
    pub extractable: bool,
    pub always_sensitive: bool,
    pub never_extractable: bool,
    pub private: bool,
    pub token: bool,
    pub wrap_with_trusted: bool,
}

/// Token identity for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSummary {
    pub label: String,
    pub serial: String,
    pub manufacturer: String,
    pub model: String,
}

/// A private key on the token, named by its label and its CKA_ID.
///
/// The PKCS#11 object handle is not part of a `KeyRef`: the [`Hsm`](crate::Hsm) looks the
/// handle up by CKA_ID and caches it until the next session recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRef {
    label: String,
    id: Vec<u8>,
    key_type: KeyType,
}

impl KeyRef {
    pub(crate) fn new(label: String, id: Vec<u8>, key_type: KeyType) -> KeyRef {
        KeyRef { label, id, key_type }
    }

    /// Returns the CKA_LABEL of the private key.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Returns the CKA_ID shared by the private and the public key.
    pub fn id(&self) -> &[u8] {
        &self.id
    }

    pub fn key_type(&self) -> KeyType {
        self.key_type
    }
}

/// Formats bytes as lowercase hexadecimal for error messages and logs.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use fmt::Write;

    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_type_round_trip() {
        for key_type in [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa3072] {
            let text = key_type.to_string();
            assert_eq!(text.parse::<KeyType>().expect("own name parses"), key_type);
        }
        assert_eq!("ec-p256".parse::<KeyType>().ok(), Some(KeyType::EcP256));
        assert_eq!("rsa-3072".parse::<KeyType>().ok(), Some(KeyType::Rsa3072));
    }

    #[test]
    fn key_type_unknown_names_value() {
        let error = "ec-p521".parse::<KeyType>().expect_err("unknown name");
        let message = error.to_string();
        assert!(message.contains("\"ec-p521\""), "{message}");
        assert!(message.contains("ec-p256, ec-p384 or rsa-3072"), "{message}");
    }

    #[test]
    fn selector_display() {
        assert_eq!(TokenSelector::Label("ca".to_owned()).to_string(), "label \"ca\"");
        assert_eq!(TokenSelector::Serial("42".to_owned()).to_string(), "serial number \"42\"");
    }

    #[test]
    fn hex_formats_bytes() {
        assert_eq!(hex(&[0x00, 0xab, 0x10]), "00ab10");
    }
}
