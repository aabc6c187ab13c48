//! The few DER encodings this crate needs: ECDSA-Sig-Value, SubjectPublicKeyInfo,
//! RSAPublicKey and the OCTET STRING that wraps CKA_EC_POINT.

use crate::HsmError;

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_NULL: u8 = 0x05;
const TAG_SEQUENCE: u8 = 0x30;

/// DER of OBJECT IDENTIFIER 1.2.840.10045.2.1 (id-ecPublicKey).
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
/// DER of OBJECT IDENTIFIER 1.2.840.113549.1.1.1 (rsaEncryption).
const OID_RSA_ENCRYPTION: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
/// DER of OBJECT IDENTIFIER 1.2.840.10045.3.1.7 (prime256v1 / secp256r1), the CKA_EC_PARAMS
/// value of a P-256 key.
pub(crate) const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// DER of OBJECT IDENTIFIER 1.3.132.0.34 (secp384r1), the CKA_EC_PARAMS value of a P-384 key.
pub(crate) const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Converts a raw ECDSA signature `r || s` into a DER `ECDSA-Sig-Value`
/// (`SEQUENCE { r INTEGER, s INTEGER }`), the form X.509 and TLS use.
///
/// PKCS#11 `CKM_ECDSA` returns `r` and `s` as two big-endian halves of equal length, each
/// left-padded with zeros to the size of the curve order. Each half becomes a minimal
/// positive INTEGER: leading zero bytes are stripped and one 0x00 byte is added when the
/// highest bit is set.
///
/// # Errors
///
/// [`HsmError::InvalidSignature`] if the input is empty, has an odd length, or if `r` or `s`
/// is zero (no valid ECDSA signature has a zero component).
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Result<Vec<u8>, HsmError> {
    if raw.is_empty() {
        return Err(HsmError::InvalidSignature { reason: "raw ECDSA signature is empty".to_owned() });
    }
    if !raw.len().is_multiple_of(2) {
        return Err(HsmError::InvalidSignature {
            reason: format!("raw ECDSA signature has odd length {}; expected r || s of equal length", raw.len()),
        });
    }

    let (r, s) = raw.split_at(raw.len() / 2);
    for (name, half) in [("r", r), ("s", s)] {
        if half.iter().all(|&byte| byte == 0) {
            return Err(HsmError::InvalidSignature { reason: format!("ECDSA signature component {name} is zero") });
        }
    }

    let mut content = unsigned_integer(r);
    content.extend_from_slice(&unsigned_integer(s));
    Ok(tlv(TAG_SEQUENCE, &content))
}

/// Builds the DER SubjectPublicKeyInfo of an EC key from CKA_EC_PARAMS (the curve OID) and
/// the uncompressed point.
pub(crate) fn ec_spki(curve_oid: &[u8], uncompressed_point: &[u8]) -> Vec<u8> {
    let mut algorithm = OID_EC_PUBLIC_KEY.to_vec();
    algorithm.extend_from_slice(curve_oid);
    spki(&algorithm, uncompressed_point)
}

/// Builds the DER SubjectPublicKeyInfo of an RSA key from its modulus and public exponent,
/// both big-endian unsigned integers as PKCS#11 stores them.
pub(crate) fn rsa_spki(modulus: &[u8], public_exponent: &[u8]) -> Vec<u8> {
    let mut algorithm = OID_RSA_ENCRYPTION.to_vec();
    algorithm.extend_from_slice(&[TAG_NULL, 0x00]);

    spki(&algorithm, &rsa_public_key(modulus, public_exponent))
}

/// Builds the DER `RSAPublicKey` (RFC 8017) of an RSA key, the form ring verifies with.
pub(crate) fn rsa_public_key(modulus: &[u8], public_exponent: &[u8]) -> Vec<u8> {
    let mut content = unsigned_integer(modulus);
    content.extend_from_slice(&unsigned_integer(public_exponent));
    tlv(TAG_SEQUENCE, &content)
}

/// Encodes an uncompressed EC point as a CKA_EC_POINT value: the DER OCTET STRING that
/// PKCS#11 defines.
pub(crate) fn ec_point_attribute(uncompressed_point: &[u8]) -> Vec<u8> {
    tlv(TAG_OCTET_STRING, uncompressed_point)
}

fn spki(algorithm_content: &[u8], subject_public_key: &[u8]) -> Vec<u8> {
    // A BIT STRING starts with the number of unused bits in its last byte, always 0 here.
    let mut bits = Vec::with_capacity(subject_public_key.len() + 1);
    bits.push(0x00);
    bits.extend_from_slice(subject_public_key);

    let mut content = tlv(TAG_SEQUENCE, algorithm_content);
    content.extend_from_slice(&tlv(TAG_BIT_STRING, &bits));
    tlv(TAG_SEQUENCE, &content)
}

/// Returns the uncompressed EC point from a CKA_EC_POINT value.
///
/// PKCS#11 defines CKA_EC_POINT as the DER encoding of an OCTET STRING that contains the
/// point, but some modules return the bare point. `point_len` is the length of an
/// uncompressed point on the key's curve (`1 + 2 * field size`). The length distinguishes the
/// two forms, because a bare point has exactly that length and a wrapped one is longer.
pub(crate) fn ec_point_from_attribute(value: &[u8], point_len: usize) -> Result<&[u8], HsmError> {
    let point = if value.len() == point_len {
        value
    } else {
        unwrap_octet_string(value).ok_or_else(|| HsmError::InvalidPublicKey {
            reason: format!(
                "CKA_EC_POINT has {} bytes and is neither a {point_len}-byte point nor a DER \
                 OCTET STRING that contains one",
                value.len()
            ),
        })?
    };

    if point.len() != point_len {
        return Err(HsmError::InvalidPublicKey {
            reason: format!("CKA_EC_POINT contains a {}-byte point; expected {point_len} bytes", point.len()),
        });
    }
    if point[0] != 0x04 {
        return Err(HsmError::InvalidPublicKey {
            reason: format!(
                "CKA_EC_POINT starts with 0x{:02x}; only uncompressed points (0x04) are supported",
                point[0]
            ),
        });
    }
    Ok(point)
}

/// Returns the content of a DER OCTET STRING that spans all of `value`, or `None`.
fn unwrap_octet_string(value: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = value.split_first()?;
    if tag != TAG_OCTET_STRING {
        return None;
    }

    let (&first_length_byte, rest) = rest.split_first()?;
    let (length, content) = if first_length_byte < 0x80 {
        (usize::from(first_length_byte), rest)
    } else {
        let length_bytes = usize::from(first_length_byte & 0x7f);
        if length_bytes == 0 || length_bytes > 2 || rest.len() < length_bytes {
            return None;
        }
        let (length_field, content) = rest.split_at(length_bytes);
        let length = length_field.iter().fold(0usize, |length, &byte| (length << 8) | usize::from(byte));
        (length, content)
    };

    (content.len() == length).then_some(content)
}

/// Encodes big-endian unsigned bytes as a minimal DER INTEGER.
fn unsigned_integer(bytes: &[u8]) -> Vec<u8> {
    let first_nonzero = bytes.iter().position(|&byte| byte != 0);
    let magnitude = match first_nonzero {
        Some(index) => &bytes[index..],
        // Zero is encoded as a single 0x00 content byte.
        None => &[0x00][..],
    };

    let mut content = Vec::with_capacity(magnitude.len() + 1);
    if magnitude[0] & 0x80 != 0 {
        // Without the pad byte, DER would read a set high bit as a negative number.
        content.push(0x00);
    }
    content.extend_from_slice(magnitude);
    tlv(TAG_INTEGER, &content)
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    push_length(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

fn push_length(out: &mut Vec<u8>, length: usize) {
    if length < 0x80 {
        // Checked by the branch: the length fits in seven bits.
        out.push(length as u8);
        return;
    }

    let length_bytes = length.to_be_bytes();
    let skip = length_bytes.iter().take_while(|&&byte| byte == 0).count();
    let significant = &length_bytes[skip..];
    // A usize has at most 16 bytes, so the count fits in the low seven bits.
    out.push(0x80 | significant.len() as u8);
    out.extend_from_slice(significant);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{self, EcdsaKeyPair, KeyPair};

    fn expect_invalid(raw: &[u8]) -> String {
        match ecdsa_raw_to_der(raw) {
            Err(HsmError::InvalidSignature { reason }) => reason,
            other => panic!("expected InvalidSignature for {raw:02x?}, got {other:?}"),
        }
    }

    #[test]
    fn raw_to_der_small_values() {
        let der = ecdsa_raw_to_der(&[0x01, 0x02]).expect("valid input");
        assert_eq!(der, [0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x02]);
    }

    #[test]
    fn raw_to_der_high_bit_gets_pad() {
        let mut raw = vec![0x80; 32];
        raw.extend_from_slice(&[0x7f; 32]);
        let der = ecdsa_raw_to_der(&raw).expect("valid input");

        assert_eq!(&der[..2], &[0x30, 2 + 33 + 2 + 32]);
        assert_eq!(&der[2..5], &[0x02, 33, 0x00], "r needs a 0x00 pad");
        assert_eq!(&der[5..37], &[0x80; 32][..]);
        assert_eq!(&der[37..39], &[0x02, 32], "s needs no pad");
        assert_eq!(&der[39..], &[0x7f; 32][..]);
    }

    #[test]
    fn raw_to_der_strips_leading_zeros() {
        let mut raw = vec![0x00, 0x00, 0x12];
        raw.extend_from_slice(&[0x00, 0x90, 0x34]);
        let der = ecdsa_raw_to_der(&raw).expect("valid input");
        assert_eq!(der, [0x30, 0x08, 0x02, 0x01, 0x12, 0x02, 0x03, 0x00, 0x90, 0x34]);
    }

    #[test]
    fn raw_to_der_zero_byte_before_high_bit() {
        // A zero byte followed by a high bit is already minimal after stripping and re-padding.
        let raw = [0x00, 0x80, 0x00, 0x00, 0x80, 0x00];
        let der = ecdsa_raw_to_der(&raw).expect("valid input");
        assert_eq!(der, [0x30, 0x0a, 0x02, 0x03, 0x00, 0x80, 0x00, 0x02, 0x03, 0x00, 0x80, 0x00]);
    }

    #[test]
    fn raw_to_der_all_zero_but_last() {
        let mut raw = vec![0x00; 64];
        raw[31] = 0x01;
        raw[63] = 0x81;
        let der = ecdsa_raw_to_der(&raw).expect("valid input");
        assert_eq!(der, [0x30, 0x07, 0x02, 0x01, 0x01, 0x02, 0x02, 0x00, 0x81]);
    }

    #[test]
    fn raw_to_der_p384_halves() {
        let mut raw = vec![0xff; 48];
        raw.extend_from_slice(&[0x01; 48]);
        let der = ecdsa_raw_to_der(&raw).expect("valid input");

        assert_eq!(&der[..2], &[0x30, 2 + 49 + 2 + 48]);
        assert_eq!(&der[2..5], &[0x02, 49, 0x00]);
        assert_eq!(&der[5..53], &[0xff; 48][..]);
        assert_eq!(&der[53..55], &[0x02, 48]);
        assert_eq!(&der[55..], &[0x01; 48][..]);
    }

    #[test]
    fn raw_to_der_long_form_length() {
        // P-521 halves are 66 bytes, so the SEQUENCE content exceeds 127 bytes.
        let raw = vec![0xff; 132];
        let der = ecdsa_raw_to_der(&raw).expect("valid input");
        assert_eq!(&der[..3], &[0x30, 0x81, 2 * (2 + 67)]);
        assert_eq!(der.len(), 3 + 2 * (2 + 67));
    }

    #[test]
    fn raw_to_der_rejects_empty() {
        assert!(expect_invalid(&[]).contains("empty"));
    }

    #[test]
    fn raw_to_der_rejects_odd_length() {
        assert!(expect_invalid(&[0x01; 63]).contains("odd length 63"));
    }

    #[test]
    fn raw_to_der_rejects_zero_component() {
        let mut raw = vec![0x00; 32];
        raw.extend_from_slice(&[0x01; 32]);
        assert!(expect_invalid(&raw).contains("component r is zero"));

        let mut raw = vec![0x01; 32];
        raw.extend_from_slice(&[0x00; 32]);
        assert!(expect_invalid(&raw).contains("component s is zero"));
    }

    /// Signs with ring in fixed (`r || s`) form, converts, and verifies the DER form with ring,
    /// whose ASN.1 parser rejects non-minimal INTEGERs.
    fn check_against_ring(
        signing: &'static signature::EcdsaSigningAlgorithm,
        verification: &'static signature::EcdsaVerificationAlgorithm,
        half_len: usize,
    ) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, &rng).expect("key generation");
        let key_pair = EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref(), &rng).expect("generated key parses");
        let public_key = signature::UnparsedPublicKey::new(verification, key_pair.public_key().as_ref());

        let mut padded_halves = 0;
        let mut unpadded_halves = 0;
        for index in 0u32..500 {
            let message = index.to_be_bytes();
            let raw = key_pair.sign(&rng, &message).expect("signing");
            assert_eq!(raw.as_ref().len(), 2 * half_len);

            for half in raw.as_ref().chunks(half_len) {
                if half[0] & 0x80 != 0 {
                    padded_halves += 1;
                } else {
                    unpadded_halves += 1;
                }
            }

            let der = ecdsa_raw_to_der(raw.as_ref()).expect("conversion");
            public_key.verify(&message, &der).unwrap_or_else(|_| panic!("ring rejected DER signature {der:02x?}"));
        }
        assert!(padded_halves > 0, "no signature half had its high bit set");
        assert!(unpadded_halves > 0, "every signature half had its high bit set");
    }

    #[test]
    fn raw_to_der_matches_ring_p256() {
        check_against_ring(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &signature::ECDSA_P256_SHA256_ASN1, 32);
    }

    #[test]
    fn raw_to_der_matches_ring_p384() {
        check_against_ring(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, &signature::ECDSA_P384_SHA384_ASN1, 48);
    }

    #[test]
    fn ec_point_bare_and_wrapped() {
        let mut point = vec![0x04];
        point.extend_from_slice(&[0xab; 64]);

        let bare = ec_point_from_attribute(&point, 65).expect("bare point");
        assert_eq!(bare, &point[..]);

        let mut wrapped = vec![0x04, 65];
        wrapped.extend_from_slice(&point);
        let unwrapped = ec_point_from_attribute(&wrapped, 65).expect("wrapped point");
        assert_eq!(unwrapped, &point[..]);

        let mut long_form = vec![0x04, 0x81, 65];
        long_form.extend_from_slice(&point);
        let unwrapped = ec_point_from_attribute(&long_form, 65).expect("long-form length");
        assert_eq!(unwrapped, &point[..]);
    }

    #[test]
    fn ec_point_rejects_bad_values() {
        let mut compressed = vec![0x02];
        compressed.extend_from_slice(&[0xab; 64]);
        assert!(ec_point_from_attribute(&compressed, 65).is_err());

        let mut truncated = vec![0x04, 65, 0x04];
        truncated.extend_from_slice(&[0xab; 60]);
        assert!(ec_point_from_attribute(&truncated, 65).is_err());

        assert!(ec_point_from_attribute(&[], 65).is_err());
    }

    #[test]
    fn rsa_spki_encodes_integers() {
        let spki = rsa_spki(&[0x00, 0x80, 0x01], &[0x01, 0x00, 0x01]);
        let expected_key = [0x30, 0x0a, 0x02, 0x03, 0x00, 0x80, 0x01, 0x02, 0x03, 0x01, 0x00, 0x01];
        assert_eq!(&spki[spki.len() - expected_key.len()..], &expected_key);
        assert_eq!(spki[0], TAG_SEQUENCE);
        assert_eq!(usize::from(spki[1]), spki.len() - 2);
    }
}
