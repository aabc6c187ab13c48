//! Object lookup and the parsing of key attributes.

use cryptoki::object::{Attribute, AttributeType, KeyType as Pkcs11KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;

use crate::der::{self, OID_P256, OID_P384};
use crate::error::from_cryptoki;
use crate::types::hex;
use crate::wrapped::{PublicKeyParts, ec_params};
use crate::{HsmError, KeyRef, KeyType};

/// Finds objects matching `template`. cryptoki's find iterator calls C_FindObjectsFinal when
/// it is dropped, on success and on error.
pub(crate) fn find_objects(session: &Session, template: &[Attribute]) -> Result<Vec<ObjectHandle>, HsmError> {
    session.find_objects(template).map_err(from_cryptoki)
}

pub(crate) fn find_private_key_by_id(session: &Session, id: &[u8]) -> Result<ObjectHandle, HsmError> {
    let handles = find_objects(session, &[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Id(id.to_vec())])?;
    match handles.as_slice() {
        [] => Err(HsmError::KeyIdNotFound { id: hex(id) }),
        [handle] => Ok(*handle),
        more => Err(HsmError::AmbiguousId { id: hex(id), count: more.len() }),
    }
}

/// Finds the public key object that has the CKA_ID of `key`.
pub(crate) fn find_public_key(session: &Session, key: &KeyRef) -> Result<ObjectHandle, HsmError> {
    let handles =
        find_objects(session, &[Attribute::Class(ObjectClass::PUBLIC_KEY), Attribute::Id(key.id().to_vec())])?;
    match handles.as_slice() {
        [] => Err(HsmError::PublicKeyNotFound { label: key.label().to_owned(), id: hex(key.id()) }),
        [handle] => Ok(*handle),
        more => Err(HsmError::AmbiguousId { id: hex(key.id()), count: more.len() }),
    }
}

/// Returns the attributes that hold the public key of a `key_type` key.
pub(crate) fn public_key_attribute_types(key_type: KeyType) -> &'static [AttributeType] {
    match key_type {
        KeyType::EcP256 | KeyType::EcP384 => &[AttributeType::EcParams, AttributeType::EcPoint],
        KeyType::Rsa3072 => &[AttributeType::Modulus, AttributeType::PublicExponent],
    }
}

/// Reads label, CKA_ID and algorithm of a private key and checks that Sigil supports it.
pub(crate) fn describe_private_key(session: &Session, handle: ObjectHandle) -> Result<KeyRef, HsmError> {
    let attributes = session
        .get_attributes(
            handle,
            &[
                AttributeType::Label,
                AttributeType::Id,
                AttributeType::KeyType,
                AttributeType::EcParams,
                AttributeType::Modulus,
            ],
        )
        .map_err(from_cryptoki)?;

    let mut label = String::new();
    let mut id = Vec::new();
    let mut pkcs11_key_type = None;
    let mut ec_params = None;
    let mut modulus = None;
    for attribute in attributes {
        match attribute {
            Attribute::Label(value) => label = String::from_utf8_lossy(&value).into_owned(),
            Attribute::Id(value) => id = value,
            Attribute::KeyType(value) => pkcs11_key_type = Some(value),
            Attribute::EcParams(value) => ec_params = Some(value),
            Attribute::Modulus(value) => modulus = Some(value),
            _ => {}
        }
    }

    if id.is_empty() {
        return Err(HsmError::UnsupportedKey {
            reason: format!(
                "private key \"{label}\" has no CKA_ID, which Sigil needs to find the key again \
                 after a session recovery"
            ),
        });
    }

    let key_type = match (pkcs11_key_type, ec_params.as_deref(), modulus.as_deref()) {
        (Some(Pkcs11KeyType::EC), Some(OID_P256), _) => KeyType::EcP256,
        (Some(Pkcs11KeyType::EC), Some(OID_P384), _) => KeyType::EcP384,
        (Some(Pkcs11KeyType::EC), params, _) => {
            return Err(HsmError::UnsupportedKey {
                reason: format!(
                    "EC key \"{label}\" has CKA_EC_PARAMS {}, but Sigil supports only P-256 and \
                     P-384",
                    params.map_or_else(|| "(missing)".to_owned(), hex)
                ),
            });
        }
        (Some(Pkcs11KeyType::RSA), _, Some(modulus)) if modulus_bits(modulus) == 3072 => KeyType::Rsa3072,
        (Some(Pkcs11KeyType::RSA), _, modulus) => {
            return Err(HsmError::UnsupportedKey {
                reason: format!(
                    "RSA key \"{label}\" has a {}-bit modulus, but Sigil supports only 3072 bits",
                    modulus.map_or(0, modulus_bits)
                ),
            });
        }
        (other, _, _) => {
            return Err(HsmError::UnsupportedKey {
                reason: format!(
                    "key \"{label}\" has CKA_KEY_TYPE {}, but Sigil supports only EC and RSA keys",
                    other.map_or_else(|| "(missing)".to_owned(), |key_type| key_type.to_string())
                ),
            });
        }
    };

    Ok(KeyRef::new(label, id, key_type))
}

pub(crate) fn modulus_bits(modulus: &[u8]) -> usize {
    match modulus.iter().position(|&byte| byte != 0) {
        Some(index) => {
            // Checked: leading_zeros of a u8 is at most 8.
            (modulus.len() - index) * 8 - modulus[index].leading_zeros() as usize
        }
        None => 0,
    }
}

/// Builds the DER SubjectPublicKeyInfo of `key` from the attributes of its public key object.
pub(crate) fn build_spki(key: &KeyRef, attributes: Vec<Attribute>) -> Result<Vec<u8>, HsmError> {
    Ok(match public_key_parts(key, attributes)? {
        PublicKeyParts::Ec { point } => der::ec_spki(ec_params(key.key_type()).unwrap_or_default(), &point),
        PublicKeyParts::Rsa { modulus, public_exponent } => der::rsa_spki(&modulus, &public_exponent),
    })
}

/// Builds the public key of `key` from the attributes of its public key object.
pub(crate) fn public_key_parts(key: &KeyRef, attributes: Vec<Attribute>) -> Result<PublicKeyParts, HsmError> {
    let missing = |name: &str| HsmError::InvalidPublicKey {
        reason: format!("public key of \"{}\" (CKA_ID {}) has no {name}", key.label(), hex(key.id())),
    };

    let mut ec_params_value = None;
    let mut ec_point = None;
    let mut modulus = None;
    let mut public_exponent = None;
    for attribute in attributes {
        match attribute {
            Attribute::EcParams(value) => ec_params_value = Some(value),
            Attribute::EcPoint(value) => ec_point = Some(value),
            Attribute::Modulus(value) => modulus = Some(value),
            Attribute::PublicExponent(value) => public_exponent = Some(value),
            _ => {}
        }
    }

    match key.key_type() {
        KeyType::EcP256 | KeyType::EcP384 => {
            let ec_params_value = ec_params_value.ok_or_else(|| missing("CKA_EC_PARAMS"))?;
            if Some(ec_params_value.as_slice()) != ec_params(key.key_type()) {
                return Err(HsmError::InvalidPublicKey {
                    reason: format!(
                        "public key of \"{}\" has CKA_EC_PARAMS {}, which is not the curve of a {} key",
                        key.label(),
                        hex(&ec_params_value),
                        key.key_type()
                    ),
                });
            }
            let ec_point = ec_point.ok_or_else(|| missing("CKA_EC_POINT"))?;
            let point_len = 1 + 2 * key.key_type().ecdsa_half_len().unwrap_or_default();
            let point = der::ec_point_from_attribute(&ec_point, point_len)?;
            Ok(PublicKeyParts::Ec { point: point.to_vec() })
        }
        KeyType::Rsa3072 => Ok(PublicKeyParts::Rsa {
            modulus: modulus.ok_or_else(|| missing("CKA_MODULUS"))?,
            public_exponent: public_exponent.ok_or_else(|| missing("CKA_PUBLIC_EXPONENT"))?,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modulus_bits_counts_significant_bits() {
        assert_eq!(modulus_bits(&[]), 0);
        assert_eq!(modulus_bits(&[0x00, 0x00]), 0);
        assert_eq!(modulus_bits(&[0x01]), 1);
        assert_eq!(modulus_bits(&[0x00, 0x80, 0x00]), 16);

        let mut modulus = vec![0xc0];
        modulus.extend_from_slice(&[0x11; 383]);
        assert_eq!(modulus_bits(&modulus), 3072);
    }
}
