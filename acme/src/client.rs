//! A client-side ACME signer for tests and load generation: account keys,
//! signed request bodies, key authorizations, key rollover and external
//! account binding. The server never uses this module.

use ring::hmac;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair, RsaPublicKeyComponents};
use serde_json::{Map, Value, json};

use crate::b64;
use crate::jwk::{Algorithm, Jwk};
use crate::problem::{Problem, ProblemType};

enum KeyPair {
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
    Rsa(RsaKeyPair),
}

/// An ACME account key pair. `Debug` shows only the algorithm and the
/// thumbprint, never the private key.
pub struct AccountKey {
    alg: Algorithm,
    pair: KeyPair,
    jwk: Jwk,
    rng: SystemRandom,
}

impl std::fmt::Debug for AccountKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AccountKey")
            .field("alg", &self.alg.name())
            .field("thumbprint", &self.jwk.thumbprint())
            .finish_non_exhaustive()
    }
}

impl AccountKey {
    /// Generates a key for ES256 (P-256), ES384 (P-384) or EdDSA (Ed25519).
    ///
    /// # Panics
    ///
    /// For RS256, which ring cannot generate keys for (use
    /// [`AccountKey::from_pkcs8`]), for the HMAC algorithms, and when the
    /// system random number generator fails.
    pub fn generate(alg: Algorithm) -> AccountKey {
        let rng = SystemRandom::new();
        let pkcs8 = match ecdsa_signing(alg) {
            Some(signing) => EcdsaKeyPair::generate_pkcs8(signing, &rng),
            None if alg == Algorithm::EdDsa => Ed25519KeyPair::generate_pkcs8(&rng),
            None => panic!(
                "AccountKey::generate supports ES256, ES384 and EdDSA, not {alg}; load RS256 keys with from_pkcs8"
            ),
        }
        .expect("the system random number generator failed");
        AccountKey::from_pkcs8(alg, pkcs8.as_ref()).expect("ring parses the PKCS#8 key it generated")
    }

    /// Loads a PKCS#8 DER private key for `alg`: ES256, ES384, EdDSA, or
    /// RS256 with a modulus of 2048 to 8192 bits.
    ///
    /// A key that ring rejects, or that does not fit `alg`, is
    /// `badPublicKey`, with ring's reason and no key material in the detail.
    /// An HMAC `alg` is `badSignatureAlgorithm`.
    pub fn from_pkcs8(alg: Algorithm, der: &[u8]) -> Result<AccountKey, Problem> {
        let rng = SystemRandom::new();
        let rejected = |reason: ring::error::KeyRejected| {
            Problem::new(ProblemType::BadPublicKey, format!("PKCS#8 key for {alg} rejected: {reason}"))
        };
        let (pair, public) = match alg {
            Algorithm::Es256 | Algorithm::Es384 => {
                let signing = ecdsa_signing(alg).expect("ES256 and ES384 have ECDSA signing algorithms");
                let pair = EcdsaKeyPair::from_pkcs8(signing, der, &rng).map_err(rejected)?;
                let public = ec_jwk(alg, pair.public_key().as_ref());
                (KeyPair::Ecdsa(pair), public)
            }
            Algorithm::EdDsa => {
                let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(rejected)?;
                let public = json!({"kty": "OKP", "crv": "Ed25519", "x": b64::encode(pair.public_key().as_ref())});
                (KeyPair::Ed25519(pair), public)
            }
            Algorithm::Rs256 => {
                let pair = RsaKeyPair::from_pkcs8(der).map_err(rejected)?;
                let components = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
                let public = json!({"kty": "RSA", "n": b64::encode(&components.n), "e": b64::encode(&components.e)});
                (KeyPair::Rsa(pair), public)
            }
            Algorithm::Hs256 | Algorithm::Hs384 | Algorithm::Hs512 => {
                return Err(Problem::new(
                    ProblemType::BadSignatureAlgorithm,
                    format!(
                        "{alg} is a MAC algorithm and has no key pair; account keys use ES256, ES384, RS256 or EdDSA"
                    ),
                ));
            }
        };
        let jwk = Jwk::from_json(&public)?;
        Ok(AccountKey { alg, pair, jwk, rng })
    }

    /// Returns the algorithm this key signs with.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// Returns the public key as a JWK.
    pub fn jwk(&self) -> Value {
        self.jwk.to_json()
    }

    /// Returns the RFC 7638 thumbprint of the public key.
    pub fn thumbprint(&self) -> String {
        self.jwk.thumbprint()
    }

    /// Signs an ACME request and returns the flattened JWS body.
    ///
    /// With `kid` None the header carries the public key as `jwk`, as
    /// newAccount needs. With `payload` None the payload is empty, which
    /// makes the request a POST-as-GET. `nonce` None leaves out the nonce,
    /// as the inner JWS of key rollover needs.
    pub fn sign(&self, url: &str, nonce: Option<&str>, kid: Option<&str>, payload: Option<&Value>) -> Vec<u8> {
        let mut header = Map::new();
        header.insert("alg".to_owned(), json!(self.alg.name()));
        match kid {
            Some(kid) => header.insert("kid".to_owned(), json!(kid)),
            None => header.insert("jwk".to_owned(), self.jwk()),
        };
        if let Some(nonce) = nonce {
            header.insert("nonce".to_owned(), json!(nonce));
        }
        header.insert("url".to_owned(), json!(url));

        let payload = payload.map(|payload| payload.to_string()).unwrap_or_default();
        let protected = b64::encode(Value::Object(header).to_string().as_bytes());
        let payload = b64::encode(payload.as_bytes());
        let signature = self.sign_bytes(format!("{protected}.{payload}").as_bytes());
        json!({"protected": protected, "payload": payload, "signature": b64::encode(&signature)})
            .to_string()
            .into_bytes()
    }

    /// Builds the key authorization for a challenge `token`: the token, a
    /// dot and the account key thumbprint (RFC 8555, section 8.1).
    pub fn key_authorization(&self, token: &str) -> String {
        format!("{token}.{}", self.thumbprint())
    }

    /// Builds the inner JWS of a keyChange request (RFC 8555, section
    /// 7.3.5) that moves the account `account_url` from this key to
    /// `new_key`. `url` is the keyChange URL. The caller signs the result
    /// as the payload of the outer request with this key and the account URL
    /// as `kid`.
    pub fn sign_key_change(&self, new_key: &AccountKey, account_url: &str, url: &str) -> Value {
        let payload = json!({"account": account_url, "oldKey": self.jwk()});
        let inner = new_key.sign(url, None, None, Some(&payload));
        serde_json::from_slice(&inner).expect("a signed body is JSON")
    }

    /// Builds an `externalAccountBinding` (RFC 8555, section 7.3.4) that
    /// binds `account_key` to the CA's MAC key `hmac_key`, named `key_id`,
    /// for a newAccount request to `url`.
    ///
    /// # Panics
    ///
    /// When `alg` is not HS256, HS384 or HS512.
    pub fn eab(hmac_key: &[u8], key_id: &str, alg: Algorithm, account_key: &AccountKey, url: &str) -> Value {
        let mac_algorithm = match alg {
            Algorithm::Hs256 => hmac::HMAC_SHA256,
            Algorithm::Hs384 => hmac::HMAC_SHA384,
            Algorithm::Hs512 => hmac::HMAC_SHA512,
            other => panic!("external account binding needs HS256, HS384 or HS512, not {other}"),
        };
        let protected = b64::encode(json!({"alg": alg.name(), "kid": key_id, "url": url}).to_string().as_bytes());
        let payload = b64::encode(account_key.jwk().to_string().as_bytes());
        let tag = hmac::sign(&hmac::Key::new(mac_algorithm, hmac_key), format!("{protected}.{payload}").as_bytes());
        json!({"protected": protected, "payload": payload, "signature": b64::encode(tag.as_ref())})
    }

    /// Signs `message` and returns the JWS signature: `r || s` for ECDSA,
    /// PKCS#1 v1.5 with SHA-256 for RSA.
    pub(crate) fn sign_bytes(&self, message: &[u8]) -> Vec<u8> {
        match &self.pair {
            KeyPair::Ecdsa(pair) => {
                pair.sign(&self.rng, message).expect("the system random number generator failed").as_ref().to_vec()
            }
            KeyPair::Ed25519(pair) => pair.sign(message).as_ref().to_vec(),
            KeyPair::Rsa(pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(&signature::RSA_PKCS1_SHA256, &self.rng, message, &mut signature)
                    .expect("RSA signing fails only when the random number generator fails");
                signature
            }
        }
    }
}

fn ecdsa_signing(alg: Algorithm) -> Option<&'static signature::EcdsaSigningAlgorithm> {
    match alg {
        Algorithm::Es256 => Some(&signature::ECDSA_P256_SHA256_FIXED_SIGNING),
        Algorithm::Es384 => Some(&signature::ECDSA_P384_SHA384_FIXED_SIGNING),
        _ => None,
    }
}

/// Builds the JWK of an uncompressed EC point (0x04, x, y).
fn ec_jwk(alg: Algorithm, point: &[u8]) -> Value {
    let crv = if alg == Algorithm::Es256 { "P-256" } else { "P-384" };
    let (x, y) = point[1..].split_at((point.len() - 1) / 2);
    json!({"kty": "EC", "crv": crv, "x": b64::encode(x), "y": b64::encode(y)})
}

/// A 2048-bit RSA PKCS#8 key in base64url, generated with OpenSSL 3.0 for
/// tests only, because ring cannot generate RSA keys.
#[cfg(test)]
pub(crate) const TEST_RSA_2048_PKCS8: &str = concat!(
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQDME2LxwXcBv9hmC-GtEZGDetbGKq5HehbSCFklwXoFW5Wdq-2x",
    "1D36zhO0nIfogHuSkNpQ47FJZmeyG43tKMpStgYxEMdUBNVKRdAbj8ASgyac4OWPHF8VDdC_L8mHV9t-rOt7xuMnHaoPYh6I_33h",
    "hTRQew44P6aLJNwUI7U2fIoMSHlAG3KK4XnllsUsYB8M1kLKfd0mCKsPf5IyBFGaEI-kDTcSXUlcFlvyaZROCxb_yWsU7oaI1sn1",
    "mhMlucFJihO7htZbPmUOdTKiTeSSEKfgKbj7R41HFDvNcbI12lgrMS9AIqvh-H0wve9I2Edk8jI3nstwKlJoDN-G_uNvAgMBAAEC",
    "ggEAFCWJaMnk9UVavpkUSPEvw-Khh5CMG9G7C5yExhwhImlFtOCilFUz-NAiYUi4un4z20BonrOAlSxcA79ob5rNl1FeY1A_bvut",
    "9zY7X5UwuY_wBNNg_-CMDhIkljmuzak7Q18co9-t6in2cXlWzJPCE7yb19W_wO04hFd5tvur3QdMnlT3en62fst1-k1U5ziHdbPO",
    "iXTfAURvPBF9NctE-1_Y8LDarOsb3_eV043UbO1SY5rYKr2gNx-jjvmOHZzAeZkCmUSZRCbHc1z8YOEZ82LbjD5JDYN5SBowQbj7",
    "gpdvC8Uieq9aRrrHpS-eGDd3f7_j3LHMflJImV_DBJJtKQKBgQD1DlHrPzRjnHHcKaLa8yUsz-Ux87SYZ5QAnGIsUNXSEqLO8YvM",
    "l8WH8MWM8EDax7dETBhW7CTYoXum3Oisx1mfxqYWqTlNlQ1DA9DSAVWGTs1sKtwSGPz7RSyRlPLw4XYGMDAbSS_bLCcYpN1OR7ai",
    "nNnd_eD5LH9klaPt8voqCQKBgQDVMIwWzpGTiu-86D6ieBovUVQOGC3-dEGstnxu0JBew94QwuUOmHOJEEygZmDVLSrWifhVaUec",
    "E5MrefRDEku133fSdC6UOR9zNJYmsuo9xiojUY0tn9cKU4fXVOAnc4q6LaTW5RUVIrbfFd0m1FWQYTobjJcWv1-eYx53JmXftwKB",
    "gQC8t6hyiBwqUgKFUDMwdms8lWWmEE4VyD58MfKQujfQLbXftLi6eG8Qf2VDYoovcfo6yHc-CWFeyw1UtW8iD-t_VhX2AaA1lQG_",
    "iCK6d3iLlAgystcDwOaiAuWNv61Pv_GKVnXVrYkDOn9pRR2A-U028Z_-i1ND0PbSWUMDLkllMQKBgCDKNsHLQ9jNpdIIZpnWnzBn",
    "8eW5Elnwx6ko6DqjGZF5zs4FK_XyvNJ4D1Ecbghbyhr1XZzFdJ4s5JXrTAaE6eAvXt6fwApMPuoZTH7nRd_6esCz6mL6Erkj3-De",
    "zRtESjIYkyH6WiPGExp84mb2gbKTQby7AwIcrThPRoBNB55BAoGAYdzSF2X-xRXk4-15nhr8wakEQz_3WrYy7bGdgWRw3KRpnHrl",
    "VZbz9ZAwRrWKCGDgEOVDO3ts0NKeBHb1mS448bVRoWY4Ia4CWITTbu4h6aUUyzQsHWZED7-U4viOQnX1Ojma5sfR9etKpk1lq_WU",
    "Qe28M6tZphemEV41qGZeLoo",
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jws::{Jws, KeyId};

    fn rsa_key() -> AccountKey {
        let der = b64::decode("test key", TEST_RSA_2048_PKCS8).expect("test key is base64url");
        AccountKey::from_pkcs8(Algorithm::Rs256, &der).expect("test key parses")
    }

    #[test]
    fn generate_each_algorithm() {
        for alg in [Algorithm::Es256, Algorithm::Es384, Algorithm::EdDsa] {
            let key = AccountKey::generate(alg);
            assert_eq!(key.algorithm(), alg);
            let jwk = Jwk::from_json(&key.jwk()).expect("JWK parses");
            assert!(jwk.algorithm_fits(alg), "{alg}");
            assert_eq!(jwk.thumbprint(), key.thumbprint());
        }
    }

    #[test]
    #[should_panic(expected = "from_pkcs8")]
    fn generate_rsa_panics() {
        let _ = AccountKey::generate(Algorithm::Rs256);
    }

    #[test]
    fn sign_verifies_for_every_algorithm() {
        let keys = [
            AccountKey::generate(Algorithm::Es256),
            AccountKey::generate(Algorithm::Es384),
            AccountKey::generate(Algorithm::EdDsa),
            rsa_key(),
        ];
        for key in keys {
            let jwk = Jwk::from_json(&key.jwk()).expect("JWK parses");
            let body = key.sign("https://ca.test/acme/new-account", Some("abc"), None, Some(&json!({"contact": []})));
            let jws = Jws::parse(&body).expect("parses");
            assert_eq!(jws.protected().key, KeyId::Jwk(jwk.clone()));
            jws.verify(&jwk).unwrap_or_else(|problem| panic!("{}: {problem}", key.algorithm()));
        }
    }

    #[test]
    fn sign_header_members() {
        let key = AccountKey::generate(Algorithm::Es256);
        let body: Value =
            serde_json::from_slice(&key.sign("https://ca.test/u", Some("n1"), Some("https://ca.test/acct/1"), None))
                .expect("body is JSON");
        let header: Value = serde_json::from_slice(
            &b64::decode("protected", body["protected"].as_str().expect("protected")).expect("base64url"),
        )
        .expect("header is JSON");
        assert_eq!(
            header,
            json!({"alg": "ES256", "kid": "https://ca.test/acct/1", "nonce": "n1", "url": "https://ca.test/u"})
        );
        assert_eq!(body["payload"], "");
        assert_eq!(body.as_object().expect("object").len(), 3);
    }

    #[test]
    fn rsa_key_loads() {
        let key = rsa_key();
        assert_eq!(key.algorithm(), Algorithm::Rs256);
        assert_eq!(key.jwk()["kty"], "RSA");
        assert_eq!(key.jwk()["e"], "AQAB");
        assert_eq!(b64::decode("n", key.jwk()["n"].as_str().expect("n")).expect("base64url").len(), 256);
    }

    #[test]
    fn from_pkcs8_rejects_mismatch() {
        let der = b64::decode("test key", TEST_RSA_2048_PKCS8).expect("test key is base64url");
        let problem = AccountKey::from_pkcs8(Algorithm::Es256, &der).expect_err("RSA key for ES256");
        assert!(problem.is(ProblemType::BadPublicKey), "{problem}");
        assert!(problem.detail.contains("ES256"), "{}", problem.detail);

        let problem = AccountKey::from_pkcs8(Algorithm::Hs256, &der).expect_err("HS256");
        assert!(problem.is(ProblemType::BadSignatureAlgorithm), "{problem}");
    }

    #[test]
    fn debug_hides_private_key() {
        let der = b64::decode("test key", TEST_RSA_2048_PKCS8).expect("test key is base64url");
        let key = rsa_key();
        let debug_text = format!("{key:?}");
        assert!(debug_text.contains("RS256"), "{debug_text}");
        assert!(debug_text.contains(&key.thumbprint()), "{debug_text}");
        assert!(!debug_text.contains(&TEST_RSA_2048_PKCS8[..40]), "{debug_text}");
        assert!(!debug_text.contains(&format!("{:?}", &der[..8])), "{debug_text}");
        assert!(debug_text.len() < 200, "{debug_text}");
    }

    #[test]
    fn key_authorization_format() {
        let key = AccountKey::generate(Algorithm::EdDsa);
        let authorization = key.key_authorization("token-123");
        assert_eq!(authorization, format!("token-123.{}", key.thumbprint()));
        assert_eq!(key.thumbprint().len(), 43);
    }

    #[test]
    fn key_change_inner_shape() {
        let (old, new) = (AccountKey::generate(Algorithm::Es256), AccountKey::generate(Algorithm::Es384));
        let inner = old.sign_key_change(&new, "https://ca.test/acct/1", "https://ca.test/key-change");
        let jws = Jws::parse(inner.to_string().as_bytes()).expect("inner parses");
        assert_eq!(jws.protected().nonce, None);
        assert_eq!(jws.protected().url, "https://ca.test/key-change");
        let KeyId::Jwk(jwk) = &jws.protected().key else { panic!("inner JWS carries a jwk") };
        assert_eq!(jwk.thumbprint(), new.thumbprint());
        jws.verify(jwk).expect("inner verifies with the new key");
        assert_eq!(
            jws.payload_json::<Value>().expect("JSON"),
            json!({"account": "https://ca.test/acct/1", "oldKey": old.jwk()})
        );
    }

    #[test]
    fn eab_shape() {
        let account = AccountKey::generate(Algorithm::Es256);
        let eab = AccountKey::eab(
            b"0123456789abcdef0123456789abcdef",
            "key-1",
            Algorithm::Hs512,
            &account,
            "https://ca.test/new",
        );
        let header: Value = serde_json::from_slice(
            &b64::decode("protected", eab["protected"].as_str().expect("protected")).expect("base64url"),
        )
        .expect("JSON");
        assert_eq!(header, json!({"alg": "HS512", "kid": "key-1", "url": "https://ca.test/new"}));
        assert_eq!(
            b64::decode("signature", eab["signature"].as_str().expect("signature")).expect("base64url").len(),
            64
        );
        assert!(!eab.to_string().contains("0123456789abcdef"));
    }

    #[test]
    #[should_panic(expected = "HS256, HS384 or HS512")]
    fn eab_rejects_signature_algorithm() {
        let account = AccountKey::generate(Algorithm::Es256);
        let _ = AccountKey::eab(b"key", "key-1", Algorithm::Es256, &account, "https://ca.test/new");
    }
}
