//! Account public keys as JSON Web Keys (RFC 7517, RFC 7518 section 6,
//! RFC 8037), their thumbprints (RFC 7638) and signature verification.
//!
//! Supported keys: EC on P-256 and P-384, RSA with a modulus of 2048 to
//! 8192 bits, and OKP on Ed25519.

use ring::agreement;
use ring::rand::SystemRandom;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value, json};

use crate::b64;
use crate::problem::{Problem, ProblemType};

/// A JWS `alg` value (RFC 7518, section 3.1) that this crate supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Es256,
    Es384,
    Rs256,
    EdDsa,
    Hs256,
    Hs384,
    Hs512,
}

impl Algorithm {
    /// The public-key algorithms an ACME request may be signed with.
    pub const SIGNATURE: [Algorithm; 4] = [Algorithm::Es256, Algorithm::Es384, Algorithm::Rs256, Algorithm::EdDsa];

    /// The MAC algorithms an external account binding may use.
    pub const MAC: [Algorithm; 3] = [Algorithm::Hs256, Algorithm::Hs384, Algorithm::Hs512];

    /// Looks up an algorithm by its JWS name, which is case-sensitive.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        match name {
            "ES256" => Some(Algorithm::Es256),
            "ES384" => Some(Algorithm::Es384),
            "RS256" => Some(Algorithm::Rs256),
            "EdDSA" => Some(Algorithm::EdDsa),
            "HS256" => Some(Algorithm::Hs256),
            "HS384" => Some(Algorithm::Hs384),
            "HS512" => Some(Algorithm::Hs512),
            _ => None,
        }
    }

    /// Returns the JWS name, as sent in the `alg` header parameter.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Es256 => "ES256",
            Algorithm::Es384 => "ES384",
            Algorithm::Rs256 => "RS256",
            Algorithm::EdDsa => "EdDSA",
            Algorithm::Hs256 => "HS256",
            Algorithm::Hs384 => "HS384",
            Algorithm::Hs512 => "HS512",
        }
    }

    /// True for the HMAC algorithms, which need a shared secret, not a JWK.
    pub fn is_mac(self) -> bool {
        Algorithm::MAC.contains(&self)
    }
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

/// JWK members that carry private key material (RFC 7518, sections 6.2.2,
/// 6.3.2 and 6.4; RFC 8037, section 2).
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;
/// The largest RSA public exponent that ring 0.17 verifies with.
const RSA_MAX_EXPONENT: u64 = (1 << 33) - 1;
const ED25519_KEY_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

impl Curve {
    fn name(self) -> &'static str {
        match self {
            Curve::P256 => "P-256",
            Curve::P384 => "P-384",
        }
    }

    /// The length in bytes of one coordinate, which JWK `x` and `y` must
    /// have exactly (RFC 7518, section 6.2.1.2).
    fn coordinate_len(self) -> usize {
        match self {
            Curve::P256 => 32,
            Curve::P384 => 48,
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
enum PublicKey {
    /// `point` is the uncompressed SEC 1 encoding: 0x04, then x, then y.
    Ec {
        curve: Curve,
        point: Vec<u8>,
    },
    /// Big-endian `n` and `e` without leading zero bytes.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Ed25519 {
        x: Vec<u8>,
    },
}

/// An account's public key, parsed from a JWK and checked.
///
/// Two `Jwk`s are equal when they hold the same key.
#[derive(Clone, PartialEq, Eq)]
pub struct Jwk {
    key: PublicKey,
    thumbprint: String,
}

impl std::fmt::Debug for Jwk {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Jwk").field("key_type", &self.describe()).field("thumbprint", &self.thumbprint).finish()
    }
}

impl Jwk {
    /// Parses and checks a public JWK.
    ///
    /// Members other than the required public ones (`kid`, `use`, `alg`
    /// and so on) are ignored. The error is `badPublicKey` for a key with
    /// private members, of an unknown type or curve, or with invalid public
    /// values. It is `malformed` for a member that is not valid base64url.
    pub fn from_json(value: &Value) -> Result<Jwk, Problem> {
        let Some(object) = value.as_object() else {
            return Err(bad_key(format!("JWK must be a JSON object, got {}", json_kind(value))));
        };
        if let Some(member) = PRIVATE_MEMBERS.iter().find(|member| object.contains_key(**member)) {
            return Err(bad_key(format!(
                "JWK contains the private key member \"{member}\"; send only the public key and keep the private key secret"
            )));
        }

        let key = match string_member(object, "kty")? {
            "EC" => parse_ec(object)?,
            "RSA" => parse_rsa(object)?,
            "OKP" => parse_okp(object)?,
            other => {
                return Err(bad_key(format!(
                    "unsupported JWK key type \"kty\" {}; supported key types are EC, RSA and OKP",
                    b64::quote(other)
                )));
            }
        };
        let thumbprint =
            b64::encode(ring::digest::digest(&ring::digest::SHA256, canonical_json(&key).as_bytes()).as_ref());
        Ok(Jwk { key, thumbprint })
    }

    /// Returns the RFC 7638 thumbprint: base64url of the SHA-256 digest of
    /// the key's required members as canonical JSON.
    pub fn thumbprint(&self) -> String {
        self.thumbprint.clone()
    }

    /// Returns the key as a JWK with only its required public members.
    pub fn to_json(&self) -> Value {
        match &self.key {
            PublicKey::Ec { curve, point } => {
                let (x, y) = split_point(*curve, point);
                json!({"kty": "EC", "crv": curve.name(), "x": b64::encode(x), "y": b64::encode(y)})
            }
            PublicKey::Rsa { n, e } => json!({"kty": "RSA", "n": b64::encode(n), "e": b64::encode(e)}),
            PublicKey::Ed25519 { x } => json!({"kty": "OKP", "crv": "Ed25519", "x": b64::encode(x)}),
        }
    }

    /// Returns the one signature algorithm this key is used with.
    pub fn algorithm(&self) -> Algorithm {
        match &self.key {
            PublicKey::Ec { curve: Curve::P256, .. } => Algorithm::Es256,
            PublicKey::Ec { curve: Curve::P384, .. } => Algorithm::Es384,
            PublicKey::Rsa { .. } => Algorithm::Rs256,
            PublicKey::Ed25519 { .. } => Algorithm::EdDsa,
        }
    }

    /// True when `alg` signs with this kind of key: ES256 with P-256,
    /// ES384 with P-384, RS256 with RSA and EdDSA with Ed25519.
    pub fn algorithm_fits(&self, alg: Algorithm) -> bool {
        self.algorithm() == alg
    }

    /// Verifies a JWS signature over `message`.
    ///
    /// ECDSA signatures must be the fixed-length `r || s` that JWS uses
    /// (RFC 7518, section 3.4), not DER. An algorithm that does not fit the
    /// key is `badSignatureAlgorithm`, and a signature that does not verify
    /// is `malformed`.
    pub fn verify(&self, alg: Algorithm, message: &[u8], signature: &[u8]) -> Result<(), Problem> {
        if !self.algorithm_fits(alg) {
            return Err(Problem::new(
                ProblemType::BadSignatureAlgorithm,
                format!(
                    "JWS algorithm {alg} does not fit the {} account key; this key signs with {}",
                    self.describe(),
                    self.algorithm()
                ),
            ));
        }

        let verified = match &self.key {
            PublicKey::Ec { curve: Curve::P256, point } => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point).verify(message, signature)
            }
            PublicKey::Ec { curve: Curve::P384, point } => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point).verify(message, signature)
            }
            PublicKey::Rsa { n, e } => {
                RsaPublicKeyComponents { n, e }.verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, signature)
            }
            PublicKey::Ed25519 { x } => UnparsedPublicKey::new(&signature::ED25519, x).verify(message, signature),
        };
        verified.map_err(|_| Problem::malformed(self.explain_bad_signature(alg, signature.len())))
    }

    /// Encodes this key as a DER SubjectPublicKeyInfo (RFC 5280, section 4.1).
    ///
    /// EC points are in uncompressed form (RFC 5480, section 2.2), RSA keys
    /// use rsaEncryption with NULL parameters (RFC 3279, section 2.3.1) and
    /// Ed25519 keys use id-Ed25519 without parameters (RFC 8410, section 4).
    pub fn spki_der(&self) -> Vec<u8> {
        let (algorithm_identifier, public_key) = match &self.key {
            PublicKey::Ec { curve, point } => {
                let curve_oid = match curve {
                    Curve::P256 => OID_PRIME256V1,
                    Curve::P384 => OID_SECP384R1,
                };
                (der::sequence(&[OID_EC_PUBLIC_KEY, curve_oid].concat()), point.clone())
            }
            PublicKey::Rsa { n, e } => {
                let rsa_public_key = der::sequence(&[der::unsigned_integer(n), der::unsigned_integer(e)].concat());
                (der::sequence(&[OID_RSA_ENCRYPTION, der::NULL].concat()), rsa_public_key)
            }
            PublicKey::Ed25519 { x } => (der::sequence(OID_ED25519), x.clone()),
        };
        der::sequence(&[algorithm_identifier, der::bit_string(&public_key)].concat())
    }

    /// Names the key for messages, such as "EC P-256" or "RSA 2048-bit".
    fn describe(&self) -> String {
        match &self.key {
            PublicKey::Ec { curve, .. } => format!("EC {}", curve.name()),
            PublicKey::Rsa { n, .. } => format!("RSA {}-bit", bit_length(n)),
            PublicKey::Ed25519 { .. } => "OKP Ed25519".to_owned(),
        }
    }

    fn explain_bad_signature(&self, alg: Algorithm, signature_len: usize) -> String {
        let expected_len = match &self.key {
            PublicKey::Ec { curve, .. } => curve.coordinate_len() * 2,
            PublicKey::Rsa { n, .. } => n.len(),
            PublicKey::Ed25519 { .. } => 64,
        };
        if signature_len == expected_len {
            return "JWS signature does not verify".to_owned();
        }
        let hint = match &self.key {
            PublicKey::Ec { .. } => "; ECDSA signatures in JWS are r || s at fixed length, not DER",
            _ => "",
        };
        format!(
            "JWS signature does not verify: an {alg} signature with this key is {expected_len} bytes, got {signature_len}{hint}"
        )
    }
}

fn parse_ec(object: &Map<String, Value>) -> Result<PublicKey, Problem> {
    let curve = match string_member(object, "crv")? {
        "P-256" => Curve::P256,
        "P-384" => Curve::P384,
        other => {
            return Err(bad_key(format!(
                "unsupported EC curve \"crv\" {}; supported curves are P-256 and P-384",
                b64::quote(other)
            )));
        }
    };

    let mut point = vec![0x04];
    for name in ["x", "y"] {
        let coordinate = bytes_member(object, name)?;
        if coordinate.len() != curve.coordinate_len() {
            return Err(bad_key(format!(
                "EC {} coordinate \"{name}\" is {} bytes; it must be exactly {} bytes",
                curve.name(),
                coordinate.len(),
                curve.coordinate_len()
            )));
        }
        point.extend_from_slice(&coordinate);
    }
    check_on_curve(curve, &point)?;
    Ok(PublicKey::Ec { curve, point })
}

/// Checks that `point` is a valid point on `curve`.
///
/// ring 0.17 has no call that only validates an EC public key. Its ECDH
/// rejects a peer key whose coordinates are out of range or not on the
/// curve, so an agreement with a throwaway key does the check.
fn check_on_curve(curve: Curve, point: &[u8]) -> Result<(), Problem> {
    let algorithm = match curve {
        Curve::P256 => &agreement::ECDH_P256,
        Curve::P384 => &agreement::ECDH_P384,
    };
    let throwaway = agreement::EphemeralPrivateKey::generate(algorithm, &SystemRandom::new())
        .map_err(|_| Problem::internal("failed to generate an ephemeral EC key to check an account key"))?;
    agreement::agree_ephemeral(throwaway, &agreement::UnparsedPublicKey::new(algorithm, point), |_| ())
        .map_err(|_| bad_key(format!("EC public key (x, y) is not a valid point on curve {}", curve.name())))
}

fn parse_rsa(object: &Map<String, Value>) -> Result<PublicKey, Problem> {
    let n = bytes_member(object, "n")?;
    let e = bytes_member(object, "e")?;

    if n.first() == Some(&0) {
        return Err(bad_key(
            "RSA modulus \"n\" starts with a zero byte; RFC 7518 requires the shortest big-endian encoding",
        ));
    }
    let bits = bit_length(&n);
    if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
        return Err(bad_key(format!(
            "RSA modulus \"n\" is {bits} bits; it must be from {RSA_MIN_BITS} to {RSA_MAX_BITS} bits"
        )));
    }
    if n.last().is_some_and(|byte| byte & 1 == 0) {
        return Err(bad_key("RSA modulus \"n\" is even, so it is not a product of two odd primes"));
    }

    if e.first() == Some(&0) {
        return Err(bad_key(
            "RSA exponent \"e\" starts with a zero byte; RFC 7518 requires the shortest big-endian encoding",
        ));
    }
    let exponent =
        if e.len() <= 8 { e.iter().fold(0u64, |value, byte| (value << 8) | u64::from(*byte)) } else { u64::MAX };
    if !(3..=RSA_MAX_EXPONENT).contains(&exponent) || exponent % 2 == 0 {
        let exponent_text = if e.len() <= 8 { exponent.to_string() } else { format!("a {}-byte number", e.len()) };
        return Err(bad_key(format!(
            "RSA exponent \"e\" is {exponent_text}; it must be odd, at least 3 and at most 2^33 - 1 (65537 is usual)"
        )));
    }
    Ok(PublicKey::Rsa { n, e })
}

fn parse_okp(object: &Map<String, Value>) -> Result<PublicKey, Problem> {
    let curve = string_member(object, "crv")?;
    if curve != "Ed25519" {
        return Err(bad_key(format!(
            "unsupported OKP curve \"crv\" {}; the supported curve is Ed25519",
            b64::quote(curve)
        )));
    }
    let x = bytes_member(object, "x")?;
    if x.len() != ED25519_KEY_LEN {
        return Err(bad_key(format!(
            "Ed25519 public key \"x\" is {} bytes; it must be exactly {ED25519_KEY_LEN} bytes",
            x.len()
        )));
    }
    // NOTE: ring decodes the Ed25519 point only when it verifies, so a
    // 32-byte value that is not a valid point is accepted here and every
    // signature checked with it fails.
    Ok(PublicKey::Ed25519 { x })
}

/// Builds the RFC 7638 input: the required members, sorted by name, with no
/// whitespace. Names and base64url values never need JSON escaping.
fn canonical_json(key: &PublicKey) -> String {
    match key {
        PublicKey::Ec { curve, point } => {
            let (x, y) = split_point(*curve, point);
            format!(r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#, curve.name(), b64::encode(x), b64::encode(y))
        }
        PublicKey::Rsa { n, e } => format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, b64::encode(e), b64::encode(n)),
        PublicKey::Ed25519 { x } => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, b64::encode(x)),
    }
}

fn split_point(curve: Curve, point: &[u8]) -> (&[u8], &[u8]) {
    point[1..].split_at(curve.coordinate_len())
}

/// Returns the bit length of a big-endian number without leading zero bytes.
fn bit_length(number: &[u8]) -> usize {
    match number.first() {
        Some(first) => number.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

fn string_member<'a>(object: &'a Map<String, Value>, name: &str) -> Result<&'a str, Problem> {
    match object.get(name) {
        Some(Value::String(value)) => Ok(value),
        Some(other) => Err(bad_key(format!("JWK member \"{name}\" must be a string, got {}", json_kind(other)))),
        None => Err(bad_key(format!("JWK member \"{name}\" is missing"))),
    }
}

fn bytes_member(object: &Map<String, Value>, name: &str) -> Result<Vec<u8>, Problem> {
    let value = string_member(object, name)?;
    b64::decode(&format!("jwk.{name}"), value)
}

fn bad_key(detail: impl Into<String>) -> Problem {
    Problem::new(ProblemType::BadPublicKey, detail)
}

/// Names the JSON type of `value` for messages.
pub(crate) fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_PRIME256V1: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_SECP384R1: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_RSA_ENCRYPTION: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];

/// The few DER encodings a SubjectPublicKeyInfo needs (X.690, section 8).
mod der {
    pub const NULL: &[u8] = &[0x05, 0x00];

    pub fn sequence(content: &[u8]) -> Vec<u8> {
        element(0x30, content)
    }

    /// Encodes a BIT STRING with no unused bits.
    pub fn bit_string(content: &[u8]) -> Vec<u8> {
        element(0x03, &[&[0x00], content].concat())
    }

    /// Encodes a positive big-endian number without leading zero bytes as an
    /// INTEGER, adding a zero byte where the top bit would make it negative.
    pub fn unsigned_integer(number: &[u8]) -> Vec<u8> {
        if number.first().is_some_and(|byte| byte & 0x80 != 0) {
            element(0x02, &[&[0x00], number].concat())
        } else {
            element(0x02, number)
        }
    }

    fn element(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let len_bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|byte| *byte == 0).collect();
            out.push(0x80 | len_bytes.len() as u8);
            out.extend_from_slice(&len_bytes);
        }
        out.extend_from_slice(content);
        out
    }
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};

    use super::*;
    use crate::client::TEST_RSA_2048_PKCS8;

    /// The RSA key of RFC 7638, section 3.1, and its published thumbprint.
    const RFC7638_N: &str = concat!(
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknj",
        "hMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQ",
        "vRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    );
    const RFC7638_THUMBPRINT: &str = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs";

    fn rejected(value: Value) -> Problem {
        match Jwk::from_json(&value) {
            Ok(jwk) => panic!("{value} parsed to {jwk:?} but should be rejected"),
            Err(problem) => problem,
        }
    }

    fn assert_problem(problem: &Problem, kind: ProblemType, needles: &[&str]) {
        assert!(problem.is(kind), "expected {}, got {problem}", kind.urn());
        for needle in needles {
            assert!(problem.detail.contains(needle), "detail {:?} lacks {needle:?}", problem.detail);
        }
    }

    fn ec_jwk(algorithm: &'static signature::EcdsaSigningAlgorithm) -> (EcdsaKeyPair, Value) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(algorithm, &rng).expect("generate EC key");
        let pair = EcdsaKeyPair::from_pkcs8(algorithm, pkcs8.as_ref(), &rng).expect("parse EC key");
        let point = pair.public_key().as_ref();
        let half = (point.len() - 1) / 2;
        let crv = if half == 32 { "P-256" } else { "P-384" };
        let value = json!({"kty": "EC", "crv": crv, "x": b64::encode(&point[1..1 + half]), "y": b64::encode(&point[1 + half..])});
        (pair, value)
    }

    fn ed25519_jwk() -> (Ed25519KeyPair, Value) {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("generate Ed25519 key");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("parse Ed25519 key");
        let value = json!({"kty": "OKP", "crv": "Ed25519", "x": b64::encode(pair.public_key().as_ref())});
        (pair, value)
    }

    fn rsa_jwk() -> (RsaKeyPair, Value) {
        let der = b64::decode("test key", TEST_RSA_2048_PKCS8).expect("test key is base64url");
        let pair = RsaKeyPair::from_pkcs8(&der).expect("parse RSA key");
        let components = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
        let value = json!({"kty": "RSA", "n": b64::encode(&components.n), "e": b64::encode(&components.e)});
        (pair, value)
    }

    fn rfc7638_jwk() -> Value {
        json!({"kty": "RSA", "n": RFC7638_N, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"})
    }

    #[test]
    fn algorithm_names_round_trip() {
        let all = [
            Algorithm::Es256,
            Algorithm::Es384,
            Algorithm::Rs256,
            Algorithm::EdDsa,
            Algorithm::Hs256,
            Algorithm::Hs384,
            Algorithm::Hs512,
        ];
        for alg in all {
            assert_eq!(Algorithm::from_name(alg.name()), Some(alg));
        }
        assert_eq!(Algorithm::EdDsa.name(), "EdDSA");
        assert!(Algorithm::Hs384.is_mac());
        assert!(!Algorithm::Es256.is_mac());
    }

    #[test]
    fn algorithm_unknown_names() {
        for name in ["none", "es256", "ES512", "PS256", "Ed25519", ""] {
            assert_eq!(Algorithm::from_name(name), None, "{name}");
        }
    }

    #[test]
    fn thumbprint_rfc7638_example() {
        let jwk = Jwk::from_json(&rfc7638_jwk()).expect("RFC 7638 key parses");
        assert_eq!(jwk.thumbprint(), RFC7638_THUMBPRINT);
    }

    #[test]
    fn thumbprint_ignores_optional_members() {
        let plain = Jwk::from_json(&json!({"kty": "RSA", "n": RFC7638_N, "e": "AQAB"})).expect("parses");
        let decorated = Jwk::from_json(&rfc7638_jwk()).expect("parses");
        assert_eq!(plain.thumbprint(), decorated.thumbprint());
        assert_eq!(plain, decorated);
    }

    #[test]
    fn thumbprint_differs_between_keys() {
        let (_, first) = ec_jwk(&signature::ECDSA_P256_SHA256_FIXED_SIGNING);
        let (_, second) = ec_jwk(&signature::ECDSA_P256_SHA256_FIXED_SIGNING);
        let first = Jwk::from_json(&first).expect("parses");
        let second = Jwk::from_json(&second).expect("parses");
        assert_ne!(first.thumbprint(), second.thumbprint());
        assert_ne!(first, second);
    }

    #[test]
    fn to_json_keeps_required_members() {
        let jwk = Jwk::from_json(&rfc7638_jwk()).expect("parses");
        assert_eq!(jwk.to_json(), json!({"kty": "RSA", "n": RFC7638_N, "e": "AQAB"}));

        for (_, value) in
            [ec_jwk(&signature::ECDSA_P256_SHA256_FIXED_SIGNING), ec_jwk(&signature::ECDSA_P384_SHA384_FIXED_SIGNING)]
        {
            assert_eq!(Jwk::from_json(&value).expect("parses").to_json(), value);
        }
        let (_, value) = ed25519_jwk();
        assert_eq!(Jwk::from_json(&value).expect("parses").to_json(), value);
    }

    #[test]
    fn debug_shows_type_and_thumbprint_only() {
        let (_, value) = ec_jwk(&signature::ECDSA_P256_SHA256_FIXED_SIGNING);
        let jwk = Jwk::from_json(&value).expect("parses");
        let debug_text = format!("{jwk:?}");
        assert!(debug_text.contains("EC P-256"), "{debug_text}");
        assert!(debug_text.contains(&jwk.thumbprint()), "{debug_text}");
        assert!(!debug_text.contains(value["x"].as_str().expect("x")), "{debug_text}");
    }

    #[test]
    fn algorithm_fits_each_key_type() {
        let cases = [
            (ec_jwk(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).1, Algorithm::Es256),
            (ec_jwk(&signature::ECDSA_P384_SHA384_FIXED_SIGNING).1, Algorithm::Es384),
            (rsa_jwk().1, Algorithm::Rs256),
            (ed25519_jwk().1, Algorithm::EdDsa),
        ];
        let all = [Algorithm::SIGNATURE.as_slice(), Algorithm::MAC.as_slice()].concat();
        for (value, fitting) in cases {
            let jwk = Jwk::from_json(&value).expect("parses");
            assert_eq!(jwk.algorithm(), fitting);
            for alg in &all {
                assert_eq!(jwk.algorithm_fits(*alg), *alg == fitting, "{jwk:?} with {alg}");
            }
        }
    }

    #[test]
    fn verify_ecdsa_signatures() {
        let rng = SystemRandom::new();
        for (algorithm, alg) in [
            (&signature::ECDSA_P256_SHA256_FIXED_SIGNING, Algorithm::Es256),
            (&signature::ECDSA_P384_SHA384_FIXED_SIGNING, Algorithm::Es384),
        ] {
            let (pair, value) = ec_jwk(algorithm);
            let jwk = Jwk::from_json(&value).expect("parses");
            let signature = pair.sign(&rng, b"message").expect("sign");
            jwk.verify(alg, b"message", signature.as_ref()).expect("signature verifies");

            let problem = jwk.verify(alg, b"messagE", signature.as_ref()).expect_err("other message");
            assert_problem(&problem, ProblemType::Malformed, &["JWS signature does not verify"]);
        }
    }

    #[test]
    fn verify_rejects_der_ecdsa_signature() {
        let rng = SystemRandom::new();
        let algorithm = &signature::ECDSA_P256_SHA256_ASN1_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(algorithm, &rng).expect("generate");
        let pair = EcdsaKeyPair::from_pkcs8(algorithm, pkcs8.as_ref(), &rng).expect("parse");
        let point = pair.public_key().as_ref();
        let value =
            json!({"kty": "EC", "crv": "P-256", "x": b64::encode(&point[1..33]), "y": b64::encode(&point[33..])});
        let jwk = Jwk::from_json(&value).expect("parses");
        let der_signature = pair.sign(&rng, b"message").expect("sign");

        let problem = jwk.verify(Algorithm::Es256, b"message", der_signature.as_ref()).expect_err("DER is rejected");
        assert_problem(&problem, ProblemType::Malformed, &["does not verify", "is 64 bytes", "not DER"]);
    }

    #[test]
    fn verify_rsa_signature() {
        let (pair, value) = rsa_jwk();
        let jwk = Jwk::from_json(&value).expect("parses");
        let mut signature = vec![0; pair.public().modulus_len()];
        pair.sign(&signature::RSA_PKCS1_SHA256, &SystemRandom::new(), b"message", &mut signature).expect("sign");
        jwk.verify(Algorithm::Rs256, b"message", &signature).expect("signature verifies");

        signature[10] ^= 1;
        let problem = jwk.verify(Algorithm::Rs256, b"message", &signature).expect_err("tampered signature");
        assert_problem(&problem, ProblemType::Malformed, &["JWS signature does not verify"]);
    }

    #[test]
    fn verify_ed25519_signature() {
        let (pair, value) = ed25519_jwk();
        let jwk = Jwk::from_json(&value).expect("parses");
        let signature = pair.sign(b"message");
        jwk.verify(Algorithm::EdDsa, b"message", signature.as_ref()).expect("signature verifies");

        let problem = jwk.verify(Algorithm::EdDsa, b"other", signature.as_ref()).expect_err("other message");
        assert_problem(&problem, ProblemType::Malformed, &["JWS signature does not verify"]);
    }

    #[test]
    fn verify_rejects_wrong_algorithm() {
        let (pair, value) = ed25519_jwk();
        let jwk = Jwk::from_json(&value).expect("parses");
        let signature = pair.sign(b"message");
        for alg in [Algorithm::Es256, Algorithm::Rs256, Algorithm::Hs256] {
            let problem = jwk.verify(alg, b"message", signature.as_ref()).expect_err("algorithm does not fit");
            assert_problem(&problem, ProblemType::BadSignatureAlgorithm, &[alg.name(), "OKP Ed25519", "EdDSA"]);
        }
    }

    #[test]
    fn verify_rejects_other_key() {
        let (pair, _) = ed25519_jwk();
        let (_, other) = ed25519_jwk();
        let jwk = Jwk::from_json(&other).expect("parses");
        let problem = jwk.verify(Algorithm::EdDsa, b"message", pair.sign(b"message").as_ref()).expect_err("other key");
        assert_problem(&problem, ProblemType::Malformed, &["JWS signature does not verify"]);
    }

    #[test]
    fn spki_matches_rcgen() {
        for algorithm in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let pair = rcgen::KeyPair::generate_for(algorithm).expect("generate");
            let raw = pair.public_key_raw();
            let value = if algorithm == &rcgen::PKCS_ED25519 {
                json!({"kty": "OKP", "crv": "Ed25519", "x": b64::encode(raw)})
            } else {
                let half = (raw.len() - 1) / 2;
                let crv = if half == 32 { "P-256" } else { "P-384" };
                json!({"kty": "EC", "crv": crv, "x": b64::encode(&raw[1..1 + half]), "y": b64::encode(&raw[1 + half..])})
            };
            let jwk = Jwk::from_json(&value).expect("parses");
            assert_eq!(jwk.spki_der(), rcgen::PublicKeyData::subject_public_key_info(&pair), "{jwk:?}");
        }
    }

    #[test]
    fn spki_matches_rcgen_rsa() {
        let der = b64::decode("test key", TEST_RSA_2048_PKCS8).expect("test key is base64url");
        let pkcs8 = rustls_pki_types::PrivatePkcs8KeyDer::from(der);
        let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_RSA_SHA256).expect("parse");
        let jwk = Jwk::from_json(&rsa_jwk().1).expect("parses");
        assert_eq!(jwk.spki_der(), rcgen::PublicKeyData::subject_public_key_info(&pair));
    }

    #[test]
    fn spki_parses_with_x509_parser() {
        use x509_parser::prelude::FromDer;
        use x509_parser::public_key::PublicKey as ParsedKey;

        let jwk = Jwk::from_json(&rfc7638_jwk()).expect("parses");
        let spki = jwk.spki_der();
        let (rest, parsed) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&spki).expect("SPKI parses");
        assert!(rest.is_empty());
        let Ok(ParsedKey::RSA(rsa)) = parsed.parsed() else { panic!("not an RSA key: {:?}", parsed.algorithm) };
        assert_eq!(b64::encode(rsa.modulus.strip_prefix(&[0]).unwrap_or(rsa.modulus)), RFC7638_N);
        assert_eq!(rsa.exponent, &[1, 0, 1]);
    }

    #[test]
    fn rejects_private_members() {
        let (_, mut value) = ec_jwk(&signature::ECDSA_P256_SHA256_FIXED_SIGNING);
        value["d"] = json!("c2VjcmV0LXByaXZhdGUtc2NhbGFy");
        let problem = rejected(value);
        assert_problem(&problem, ProblemType::BadPublicKey, &["private key member \"d\""]);
        assert!(!problem.detail.contains("c2VjcmV0"), "the detail leaks the private value: {}", problem.detail);

        for member in ["p", "q", "dp", "dq", "qi", "oth"] {
            let mut value = json!({"kty": "RSA", "n": RFC7638_N, "e": "AQAB"});
            value[member] = json!("AQAB");
            assert_problem(&rejected(value), ProblemType::BadPublicKey, &[&format!("\"{member}\"")]);
        }
    }

    #[test]
    fn rejects_symmetric_key() {
        let problem = rejected(json!({"kty": "oct", "k": "c2VjcmV0"}));
        assert_problem(&problem, ProblemType::BadPublicKey, &["\"k\""]);
        assert!(!problem.detail.contains("c2VjcmV0"), "{}", problem.detail);
    }

    #[test]
    fn rejects_unknown_key_type() {
        let problem = rejected(json!({"kty": "DSA", "y": "AQAB"}));
        assert_problem(&problem, ProblemType::BadPublicKey, &["\"DSA\"", "EC, RSA and OKP"]);
    }

    #[test]
    fn rejects_unknown_curves() {
        let (_, mut value) = ec_jwk(&signature::ECDSA_P256_SHA256_FIXED_SIGNING);
        for crv in ["P-521", "secp256k1", "p-256"] {
            value["crv"] = json!(crv);
            assert_problem(
                &rejected(value.clone()),
                ProblemType::BadPublicKey,
                &[&format!("\"{crv}\""), "P-256 and P-384"],
            );
        }
        let (_, mut value) = ed25519_jwk();
        for crv in ["X25519", "Ed448"] {
            value["crv"] = json!(crv);
            assert_problem(&rejected(value.clone()), ProblemType::BadPublicKey, &[&format!("\"{crv}\""), "Ed25519"]);
        }
    }

    #[test]
    fn rejects_missing_and_mistyped_members() {
        assert_problem(&rejected(json!({"crv": "P-256"})), ProblemType::BadPublicKey, &["\"kty\" is missing"]);
        assert_problem(&rejected(json!({"kty": 7})), ProblemType::BadPublicKey, &["\"kty\"", "a number"]);
        assert_problem(
            &rejected(json!({"kty": "RSA", "n": RFC7638_N})),
            ProblemType::BadPublicKey,
            &["\"e\" is missing"],
        );
        let (_, mut value) = ec_jwk(&signature::ECDSA_P256_SHA256_FIXED_SIGNING);
        value["y"] = json!(["array"]);
        assert_problem(&rejected(value), ProblemType::BadPublicKey, &["\"y\"", "an array"]);
        assert_problem(&rejected(json!("EC")), ProblemType::BadPublicKey, &["JSON object", "a string"]);
    }

    #[test]
    fn rejects_bad_base64_member() {
        let problem = rejected(json!({"kty": "RSA", "n": format!("{RFC7638_N}="), "e": "AQAB"}));
        assert_problem(&problem, ProblemType::Malformed, &["\"jwk.n\"", "padding"]);
    }

    #[test]
    fn rejects_wrong_coordinate_length() {
        let (_, value) = ec_jwk(&signature::ECDSA_P256_SHA256_FIXED_SIGNING);
        let mut short = value.clone();
        let x = b64::decode("x", value["x"].as_str().expect("x")).expect("decodes");
        short["x"] = json!(b64::encode(&x[1..]));
        assert_problem(&rejected(short), ProblemType::BadPublicKey, &["\"x\" is 31 bytes", "exactly 32"]);

        let (_, p384) = ec_jwk(&signature::ECDSA_P384_SHA384_FIXED_SIGNING);
        let mut mixed = p384;
        mixed["crv"] = json!("P-256");
        assert_problem(&rejected(mixed), ProblemType::BadPublicKey, &["\"x\" is 48 bytes", "exactly 32"]);
    }

    #[test]
    fn rejects_point_off_curve() {
        for algorithm in [&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &signature::ECDSA_P384_SHA384_FIXED_SIGNING] {
            let (_, mut value) = ec_jwk(algorithm);
            let mut y = b64::decode("y", value["y"].as_str().expect("y")).expect("decodes");
            let last = y.len() - 1;
            y[last] ^= 1;
            value["y"] = json!(b64::encode(&y));
            let crv = value["crv"].as_str().expect("crv").to_owned();
            assert_problem(&rejected(value), ProblemType::BadPublicKey, &["not a valid point", &crv]);
        }
    }

    #[test]
    fn rejects_coordinate_above_field() {
        let ones = b64::encode(&[0xff; 32]);
        let problem = rejected(json!({"kty": "EC", "crv": "P-256", "x": ones, "y": ones}));
        assert_problem(&problem, ProblemType::BadPublicKey, &["not a valid point", "P-256"]);
    }

    #[test]
    fn rejects_rsa_modulus_sizes() {
        let mut small = vec![0xff; 128];
        small[127] = 0xfb;
        let problem = rejected(json!({"kty": "RSA", "n": b64::encode(&small), "e": "AQAB"}));
        assert_problem(&problem, ProblemType::BadPublicKey, &["1024 bits", "from 2048 to 8192"]);

        let large = vec![0xff; 1025];
        let problem = rejected(json!({"kty": "RSA", "n": b64::encode(&large), "e": "AQAB"}));
        assert_problem(&problem, ProblemType::BadPublicKey, &["8200 bits", "from 2048 to 8192"]);

        let mut just_small = vec![0xff; 256];
        just_small[0] = 0x7f;
        let problem = rejected(json!({"kty": "RSA", "n": b64::encode(&just_small), "e": "AQAB"}));
        assert_problem(&problem, ProblemType::BadPublicKey, &["2047 bits"]);
    }

    #[test]
    fn rejects_rsa_modulus_encoding() {
        let n = b64::decode("n", RFC7638_N).expect("decodes");
        let padded = [&[0u8][..], &n].concat();
        let problem = rejected(json!({"kty": "RSA", "n": b64::encode(&padded), "e": "AQAB"}));
        assert_problem(&problem, ProblemType::BadPublicKey, &["\"n\" starts with a zero byte"]);

        let mut even = n;
        *even.last_mut().expect("n is not empty") &= 0xfe;
        let problem = rejected(json!({"kty": "RSA", "n": b64::encode(&even), "e": "AQAB"}));
        assert_problem(&problem, ProblemType::BadPublicKey, &["\"n\" is even"]);
    }

    #[test]
    fn rejects_rsa_exponents() {
        for (e, expected_text) in [
            (vec![1u8], "is 1;"),
            (vec![0x01, 0x00, 0x00], "is 65536;"),
            (vec![0x02, 0x00, 0x00, 0x00, 0x01], "is 8589934593;"),
            (vec![0xff; 9], "a 9-byte number"),
        ] {
            let problem = rejected(json!({"kty": "RSA", "n": RFC7638_N, "e": b64::encode(&e)}));
            assert_problem(&problem, ProblemType::BadPublicKey, &["\"e\"", expected_text, "odd, at least 3"]);
        }
        let problem = rejected(json!({"kty": "RSA", "n": RFC7638_N, "e": "AAEAAQ"}));
        assert_problem(&problem, ProblemType::BadPublicKey, &["\"e\" starts with a zero byte"]);
        let problem = rejected(json!({"kty": "RSA", "n": RFC7638_N, "e": ""}));
        assert_problem(&problem, ProblemType::BadPublicKey, &["\"e\" is 0;"]);
    }

    #[test]
    fn accepts_exponent_three() {
        let jwk = Jwk::from_json(&json!({"kty": "RSA", "n": RFC7638_N, "e": "Aw"})).expect("e = 3 is accepted");
        assert_eq!(jwk.to_json()["e"], "Aw");
    }

    #[test]
    fn rejects_ed25519_key_length() {
        let problem = rejected(json!({"kty": "OKP", "crv": "Ed25519", "x": b64::encode(&[7; 31])}));
        assert_problem(&problem, ProblemType::BadPublicKey, &["\"x\" is 31 bytes", "exactly 32"]);
    }

    #[test]
    fn der_long_lengths() {
        assert_eq!(der::sequence(&[0; 0x7f])[..2], [0x30, 0x7f]);
        assert_eq!(der::sequence(&[0; 0x80])[..3], [0x30, 0x81, 0x80]);
        assert_eq!(der::sequence(&[0; 0x100])[..4], [0x30, 0x82, 0x01, 0x00]);
        assert_eq!(der::unsigned_integer(&[0x80]), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(der::unsigned_integer(&[0x7f]), [0x02, 0x01, 0x7f]);
    }
}
