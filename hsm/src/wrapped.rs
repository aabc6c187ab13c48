//! A private key wrapped under a cluster's key-encryption key, and its byte encoding.

use std::fmt;

use ring::signature;
use zeroize::Zeroizing;

use crate::der::{self, OID_P256, OID_P384};
use crate::objects::modulus_bits;
use crate::types::hex;
use crate::{HsmError, KeyType};

/// First bytes of an encoded [`WrappedKey`].
const MAGIC: &[u8; 4] = b"SGWK";
/// Version of the encoding that [`WrappedKey::encode`] writes.
const FORMAT_VERSION: u8 = 1;
/// Length in bytes of the header: magic, version and key type.
const HEADER_LEN: usize = 6;
/// Number of length-prefixed fields after the header.
const FIELD_COUNT: usize = 6;
/// CKM_AES_KEY_WRAP_PAD (RFC 5649) output is a multiple of 8 bytes and at least 16 bytes.
const WRAP_BLOCK_LEN: usize = 8;
const MIN_WRAPPED_LEN: usize = 16;

/// The public half of a wrapped key pair, in the attributes of the token's public key object.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum PublicKeyParts {
    /// The uncompressed point (0x04, x, y).
    Ec { point: Vec<u8> },
    /// Modulus and public exponent as big-endian unsigned integers.
    Rsa { modulus: Vec<u8>, public_exponent: Vec<u8> },
}

/// A private key wrapped with CKM_AES_KEY_WRAP_PAD under a key-encryption key (KEK), with
/// what the unwrapping token needs besides: the key type, the CKA_LABEL and CKA_ID of the
/// key pair, the public key, and the check value of the KEK.
///
/// Only the wrapped bytes are secret. They are zeroed on drop, never appear in `Debug`
/// output, and leave the value only through [`WrappedKey::encode`].
///
/// # Encoding
///
/// [`WrappedKey::encode`] writes, and [`WrappedKey::decode`] reads, this format:
///
/// | bytes | content |
/// |-------|---------|
/// | 4     | `SGWK` |
/// | 1     | format version, 1 |
/// | 1     | key type: 1 `ec-p256`, 2 `ec-p384`, 3 `rsa-3072` |
/// | then  | six fields, each a 4-byte big-endian length followed by that many bytes |
///
/// The fields are, in order: the label (UTF-8), the CKA_ID, the KEK's CKA_CHECK_VALUE
/// (empty if the token did not report it), the public key, a second public key field, and the
/// CKM_AES_KEY_WRAP_PAD output. For EC keys the public key is the uncompressed point and the
/// second field is empty. For RSA keys they are the modulus and the public exponent. Nothing
/// follows the last field.
#[derive(Clone)]
pub struct WrappedKey {
    key_type: KeyType,
    label: String,
    id: Vec<u8>,
    kek_check_value: Vec<u8>,
    public_key: PublicKeyParts,
    wrapped: Zeroizing<Vec<u8>>,
}

impl WrappedKey {
    /// Builds a wrapped key and checks its fields as [`WrappedKey::decode`] does.
    pub(crate) fn new(
        key_type: KeyType,
        label: String,
        id: Vec<u8>,
        kek_check_value: Vec<u8>,
        public_key: PublicKeyParts,
        wrapped: Zeroizing<Vec<u8>>,
    ) -> Result<WrappedKey, HsmError> {
        let key = WrappedKey { key_type, label, id, kek_check_value, public_key, wrapped };
        key.validate()?;
        Ok(key)
    }

    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// Returns the CKA_LABEL that the private and the public key get on the unwrapping token.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Returns the CKA_ID that the private and the public key get on the unwrapping token.
    pub fn id(&self) -> &[u8] {
        &self.id
    }

    /// Returns the CKA_CHECK_VALUE of the KEK that wrapped the key, or `None` if the wrapping
    /// token did not report one.
    pub fn kek_check_value(&self) -> Option<&[u8]> {
        (!self.kek_check_value.is_empty()).then_some(self.kek_check_value.as_slice())
    }

    /// Returns the DER SubjectPublicKeyInfo of the key pair, for example to compare it with
    /// the CA certificate before unwrapping.
    pub fn public_key_spki_der(&self) -> Vec<u8> {
        match &self.public_key {
            PublicKeyParts::Ec { point } => der::ec_spki(ec_params(self.key_type).unwrap_or_default(), point),
            PublicKeyParts::Rsa { modulus, public_exponent } => der::rsa_spki(modulus, public_exponent),
        }
    }

    /// Encodes the wrapped key in the format described on [`WrappedKey`]. The result contains
    /// the wrapped bytes, so it is zeroed on drop as well.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let (first, second): (&[u8], &[u8]) = match &self.public_key {
            PublicKeyParts::Ec { point } => (point, &[]),
            PublicKeyParts::Rsa { modulus, public_exponent } => (modulus, public_exponent),
        };
        let fields: [&[u8]; FIELD_COUNT] =
            [self.label.as_bytes(), &self.id, &self.kek_check_value, first, second, &self.wrapped];

        let length = HEADER_LEN + fields.iter().map(|field| 4 + field.len()).sum::<usize>();
        let mut out = Zeroizing::new(Vec::with_capacity(length));
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_VERSION);
        out.push(key_type_code(self.key_type));
        for field in fields {
            let field_len = u32::try_from(field.len()).expect("validate() keeps every field below 4 GiB");
            out.extend_from_slice(&field_len.to_be_bytes());
            out.extend_from_slice(field);
        }
        out
    }

    /// Decodes a wrapped key from the format described on [`WrappedKey`].
    ///
    /// # Errors
    ///
    /// [`HsmError::InvalidWrappedKey`] naming what is wrong. The input may have a missing or
    /// wrong header, an unknown version or key type, a truncated field, or bytes after the last
    /// field. Or a field may be invalid: an empty label or CKA_ID, a public key that does not
    /// fit the key type, or wrapped bytes that cannot be CKM_AES_KEY_WRAP_PAD output.
    pub fn decode(bytes: &[u8]) -> Result<WrappedKey, HsmError> {
        let invalid = |reason: String| HsmError::InvalidWrappedKey { reason };

        if bytes.len() < HEADER_LEN {
            return Err(invalid(format!("input is {} bytes, shorter than the {HEADER_LEN}-byte header", bytes.len())));
        }
        let (header, mut rest) = bytes.split_at(HEADER_LEN);
        if &header[..4] != MAGIC {
            return Err(invalid(format!("input starts with {}; expected \"SGWK\"", hex(&header[..4]))));
        }
        if header[4] != FORMAT_VERSION {
            return Err(invalid(format!("format version {} is not supported; expected {FORMAT_VERSION}", header[4])));
        }
        let key_type = key_type_from_code(header[5])
            .ok_or_else(|| invalid(format!("unknown key type code {}; expected 1, 2 or 3", header[5])))?;

        const FIELD_NAMES: [&str; FIELD_COUNT] =
            ["label", "CKA_ID", "KEK check value", "public key", "second public key field", "wrapped key"];
        let mut fields: Vec<&[u8]> = Vec::with_capacity(FIELD_COUNT);
        for name in FIELD_NAMES {
            let (field, remaining) = split_field(rest, name)?;
            fields.push(field);
            rest = remaining;
        }
        if !rest.is_empty() {
            return Err(invalid(format!("{} bytes follow the wrapped key field", rest.len())));
        }

        let label = String::from_utf8(fields[0].to_vec()).map_err(|_| invalid("label is not UTF-8".to_owned()))?;
        let public_key = match key_type {
            KeyType::EcP256 | KeyType::EcP384 => {
                if !fields[4].is_empty() {
                    return Err(invalid(format!(
                        "the second public key field of a {key_type} key must be empty, but it has {} bytes",
                        fields[4].len()
                    )));
                }
                PublicKeyParts::Ec { point: fields[3].to_vec() }
            }
            KeyType::Rsa3072 => {
                PublicKeyParts::Rsa { modulus: fields[3].to_vec(), public_exponent: fields[4].to_vec() }
            }
        };

        WrappedKey::new(
            key_type,
            label,
            fields[1].to_vec(),
            fields[2].to_vec(),
            public_key,
            Zeroizing::new(fields[5].to_vec()),
        )
    }

    pub(crate) fn wrapped_bytes(&self) -> &[u8] {
        &self.wrapped
    }

    pub(crate) fn public_key(&self) -> &PublicKeyParts {
        &self.public_key
    }

    /// Returns true if `signature` over `message`, in the form [`Hsm::sign`](crate::Hsm::sign)
    /// returns, verifies with the public key.
    pub(crate) fn verifies(&self, message: &[u8], signature_bytes: &[u8]) -> bool {
        let (algorithm, public_key): (&dyn signature::VerificationAlgorithm, Vec<u8>) = match &self.public_key {
            PublicKeyParts::Ec { point } if self.key_type == KeyType::EcP256 => {
                (&signature::ECDSA_P256_SHA256_ASN1, point.clone())
            }
            PublicKeyParts::Ec { point } => (&signature::ECDSA_P384_SHA384_ASN1, point.clone()),
            PublicKeyParts::Rsa { modulus, public_exponent } => {
                (&signature::RSA_PKCS1_2048_8192_SHA256, der::rsa_public_key(modulus, public_exponent))
            }
        };
        signature::UnparsedPublicKey::new(algorithm, public_key).verify(message, signature_bytes).is_ok()
    }

    fn validate(&self) -> Result<(), HsmError> {
        let invalid = |reason: String| Err(HsmError::InvalidWrappedKey { reason });

        if self.label.is_empty() {
            return invalid("label is empty".to_owned());
        }
        if self.id.is_empty() {
            return invalid(format!("key \"{}\" has an empty CKA_ID", self.label));
        }

        match (&self.public_key, self.key_type) {
            (PublicKeyParts::Ec { point }, KeyType::EcP256 | KeyType::EcP384) => {
                let half_len = self.key_type.ecdsa_half_len().unwrap_or_default();
                let expected = 1 + 2 * half_len;
                if point.len() != expected || point[0] != 0x04 {
                    return invalid(format!(
                        "public key of {} key \"{}\" is {} bytes; expected a {expected}-byte uncompressed point \
                         starting with 0x04",
                        self.key_type,
                        self.label,
                        point.len()
                    ));
                }
            }
            (PublicKeyParts::Rsa { modulus, public_exponent }, KeyType::Rsa3072) => {
                if modulus_bits(modulus) != 3072 {
                    return invalid(format!(
                        "RSA modulus of key \"{}\" has {} bits; expected 3072",
                        self.label,
                        modulus_bits(modulus)
                    ));
                }
                if public_exponent.iter().all(|&byte| byte == 0) {
                    return invalid(format!("RSA public exponent of key \"{}\" is empty or zero", self.label));
                }
            }
            _ => return invalid(format!("public key of \"{}\" is not a {} key", self.label, self.key_type)),
        }

        let wrapped_len = self.wrapped.len();
        if wrapped_len < MIN_WRAPPED_LEN || !wrapped_len.is_multiple_of(WRAP_BLOCK_LEN) {
            return invalid(format!(
                "wrapped key \"{}\" is {wrapped_len} bytes, but CKM_AES_KEY_WRAP_PAD output is a multiple of \
                 {WRAP_BLOCK_LEN} bytes and at least {MIN_WRAPPED_LEN}",
                self.label
            ));
        }

        let (first, second) = match &self.public_key {
            PublicKeyParts::Ec { point } => (point.len(), 0),
            PublicKeyParts::Rsa { modulus, public_exponent } => (modulus.len(), public_exponent.len()),
        };
        let lengths = [self.label.len(), self.id.len(), self.kek_check_value.len(), first, second, wrapped_len];
        if lengths.iter().any(|&length| u32::try_from(length).is_err()) {
            return invalid(format!("a field of key \"{}\" is 4 GiB or longer", self.label));
        }
        Ok(())
    }
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("WrappedKey")
            .field("key_type", &self.key_type)
            .field("label", &self.label)
            .field("id", &hex(&self.id))
            .field("kek_check_value", &hex(&self.kek_check_value))
            .field("wrapped", &format_args!("({} bytes, redacted)", self.wrapped.len()))
            .finish_non_exhaustive()
    }
}

/// Splits one length-prefixed field off the front of `input`.
fn split_field<'input>(input: &'input [u8], name: &str) -> Result<(&'input [u8], &'input [u8]), HsmError> {
    let truncated = |reason: String| HsmError::InvalidWrappedKey { reason };

    let Some((length_bytes, rest)) = input.split_first_chunk::<4>() else {
        return Err(truncated(format!("input ends before the length of the {name} field")));
    };
    let length = u32::from_be_bytes(*length_bytes);
    match usize::try_from(length) {
        Ok(length) if length <= rest.len() => Ok(rest.split_at(length)),
        _ => Err(truncated(format!("the {name} field declares {length} bytes, but only {} remain", rest.len()))),
    }
}

/// Returns the CKA_EC_PARAMS value (the curve OID) of an EC key type, or `None` for RSA.
pub(crate) fn ec_params(key_type: KeyType) -> Option<&'static [u8]> {
    match key_type {
        KeyType::EcP256 => Some(OID_P256),
        KeyType::EcP384 => Some(OID_P384),
        KeyType::Rsa3072 => None,
    }
}

fn key_type_code(key_type: KeyType) -> u8 {
    match key_type {
        KeyType::EcP256 => 1,
        KeyType::EcP384 => 2,
        KeyType::Rsa3072 => 3,
    }
}

fn key_type_from_code(code: u8) -> Option<KeyType> {
    [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa3072].into_iter().find(|&key_type| key_type_code(key_type) == code)
}
