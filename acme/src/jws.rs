//! ACME request bodies: JWS in flattened JSON serialization (RFC 7515,
//! section 7.2.2) with the protected header that RFC 8555, section 6.2,
//! requires. The module also checks the nested JWS of key rollover
//! (RFC 8555, section 7.3.5) and of external account binding (section 7.3.4).
//!
//! Parsing checks the structure only. The caller looks up the account for
//! a `kid`, checks the nonce and the URL, then calls [`Jws::verify`].

use std::fmt;

use ring::hmac;
use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::b64::{self, quote};
use crate::jwk::{Algorithm, Jwk, json_kind};
use crate::problem::{Problem, ProblemType};

/// The reference to the key that signed a request (RFC 8555, section 6.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyId {
    /// The public key itself, for newAccount and for revokeCert signed
    /// with the certificate's key.
    Jwk(Jwk),
    /// The account URL, for every other request.
    Kid(String),
}

/// The protected header of an ACME JWS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protected {
    pub alg: Algorithm,
    pub key: KeyId,
    /// The `nonce` exactly as sent, not yet checked. A request JWS needs
    /// one, but the inner JWS of key rollover and external account binding
    /// must have none.
    pub nonce: Option<String>,
    pub url: String,
}

/// A parsed, not yet verified, flattened JWS.
#[derive(Debug, Clone)]
pub struct Jws {
    protected: Protected,
    /// `protected || '.' || payload` as sent, the input the signature covers.
    signing_input: String,
    payload: Vec<u8>,
    post_as_get: bool,
    signature: Vec<u8>,
}

/// The set of header rules a JWS follows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// Signed with an account key: a signature algorithm and exactly one
    /// of `jwk` and `kid`.
    Request,
    /// Signed with a MAC key from the CA: an HMAC algorithm and a `kid`.
    ExternalAccountBinding,
}

impl Purpose {
    fn algorithms(self) -> &'static [Algorithm] {
        match self {
            Purpose::Request => &Algorithm::SIGNATURE,
            Purpose::ExternalAccountBinding => &Algorithm::MAC,
        }
    }
}

impl Jws {
    /// Parses a request body.
    ///
    /// The body must be a JSON object with exactly the members `protected`,
    /// `payload` and `signature`, each valid base64url. The protected header
    /// must have a supported `alg`, exactly one of `jwk` and `kid`, and a
    /// `url`. Unsupported algorithms are `badSignatureAlgorithm`, an invalid
    /// `jwk` is `badPublicKey`, and every other error is `malformed`.
    pub fn parse(body: &[u8]) -> Result<Jws, Problem> {
        Jws::from_object(parse_object(body)?, Purpose::Request)
    }

    /// Returns the checked protected header.
    pub fn protected(&self) -> &Protected {
        &self.protected
    }

    /// Returns the decoded payload, which is empty for POST-as-GET.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// True when the `payload` member is the empty string, which marks a
    /// POST-as-GET request (RFC 8555, section 6.3). The payload `e30`, which
    /// is `{}`, is not POST-as-GET.
    pub fn is_post_as_get(&self) -> bool {
        self.post_as_get
    }

    /// Deserializes the payload as JSON. A payload that does not fit `T` is
    /// `malformed`, with the serde error in the detail.
    pub fn payload_json<T: DeserializeOwned>(&self) -> Result<T, Problem> {
        if self.post_as_get {
            return Err(Problem::malformed(
                "JWS payload is empty, which means POST-as-GET, but this request needs a JSON payload",
            ));
        }
        serde_json::from_slice(&self.payload)
            .map_err(|error| Problem::malformed(format!("JWS payload is not valid for this request: {error}")))
    }

    /// Verifies the signature with `key`, over the protected header and
    /// payload exactly as sent.
    ///
    /// An `alg` that does not fit the key is `badSignatureAlgorithm`, and a
    /// signature that does not verify is `malformed`.
    pub fn verify(&self, key: &Jwk) -> Result<(), Problem> {
        key.verify(self.protected.alg, self.signing_input.as_bytes(), &self.signature)
    }

    fn from_object(mut object: Map<String, Value>, purpose: Purpose) -> Result<Jws, Problem> {
        check_flattened_members(&object)?;
        let protected_b64 = take_string(&mut object, "protected")?;
        let payload_b64 = take_string(&mut object, "payload")?;
        let signature_b64 = take_string(&mut object, "signature")?;

        let header_json = b64::decode("protected", &protected_b64)?;
        let header = parse_members(&header_json)
            .map_err(|error| Problem::malformed(format!("JWS protected header is not a JSON object: {error}")))?;
        let protected = parse_protected(header, purpose)?;
        let payload = b64::decode("payload", &payload_b64)?;
        let signature = b64::decode("signature", &signature_b64)?;

        Ok(Jws {
            protected,
            signing_input: format!("{protected_b64}.{payload_b64}"),
            post_as_get: payload_b64.is_empty(),
            payload,
            signature,
        })
    }
}

/// Checks that the URL in the protected header is the URL the request was
/// sent to (RFC 8555, section 6.4). A mismatch is `unauthorized`.
pub fn check_url(protected: &Protected, request_url: &str) -> Result<(), Problem> {
    if protected.url == request_url {
        return Ok(());
    }
    Err(Problem::unauthorized(format!(
        "JWS protected header \"url\" {} does not match the request URL {}",
        quote(&protected.url),
        quote(request_url)
    )))
}

/// Checks a keyChange request (RFC 8555, section 7.3.5) whose outer JWS is
/// already verified with the account key, and returns the new key.
///
/// The outer payload must be a JWS that carries the new key as `jwk`, has
/// no `nonce`, has the outer `url`, is signed with the new key, and whose
/// payload names `account_url` and `old_key`. Each broken rule is
/// `malformed`, except an inner `alg` or `jwk` that is not supported
/// (`badSignatureAlgorithm`, `badPublicKey`). The caller still checks that
/// no account already uses the new key.
pub fn verify_key_change(outer: &Jws, account_url: &str, old_key: &Jwk) -> Result<Jwk, Problem> {
    if matches!(outer.protected.key, KeyId::Jwk(_)) {
        return Err(Problem::malformed("key change: the outer JWS must name the account with \"kid\", not \"jwk\""));
    }
    if outer.post_as_get {
        return Err(Problem::malformed("key change: the outer JWS payload is empty; it must be the inner JWS"));
    }
    let inner = parse_object(&outer.payload)
        .and_then(|object| Jws::from_object(object, Purpose::Request))
        .map_err(|problem| prefix("key change: inner JWS", problem))?;

    let new_key = match &inner.protected.key {
        KeyId::Jwk(jwk) => jwk.clone(),
        KeyId::Kid(kid) => {
            return Err(Problem::malformed(format!(
                "key change: the inner JWS must carry the new key as \"jwk\", but it has \"kid\" {}",
                quote(kid)
            )));
        }
    };
    if let Some(nonce) = &inner.protected.nonce {
        return Err(Problem::malformed(format!(
            "key change: the inner JWS must not have a \"nonce\", but it has {}",
            quote(nonce)
        )));
    }
    if inner.protected.url != outer.protected.url {
        return Err(Problem::malformed(format!(
            "key change: the inner JWS \"url\" {} differs from the outer JWS \"url\" {}",
            quote(&inner.protected.url),
            quote(&outer.protected.url)
        )));
    }
    inner.verify(&new_key).map_err(|problem| prefix("key change: inner JWS signed with the new key", problem))?;

    let payload: Map<String, Value> =
        inner.payload_json().map_err(|problem| prefix("key change: inner JWS payload", problem))?;
    match payload.get("account") {
        Some(Value::String(account)) if account == account_url => {}
        Some(Value::String(account)) => {
            return Err(Problem::malformed(format!(
                "key change: the inner payload \"account\" {} is not the account URL {}",
                quote(account),
                quote(account_url)
            )));
        }
        Some(other) => {
            return Err(Problem::malformed(format!(
                "key change: the inner payload \"account\" must be a string, got {}",
                json_kind(other)
            )));
        }
        None => return Err(Problem::malformed("key change: the inner payload has no \"account\"")),
    }
    let Some(old_key_json) = payload.get("oldKey") else {
        return Err(Problem::malformed("key change: the inner payload has no \"oldKey\""));
    };
    let named_old_key =
        Jwk::from_json(old_key_json).map_err(|problem| prefix("key change: inner payload \"oldKey\"", problem))?;
    if named_old_key.thumbprint() != old_key.thumbprint() {
        return Err(Problem::malformed(format!(
            "key change: the inner payload \"oldKey\" (thumbprint {}) is not the account's current key (thumbprint {})",
            named_old_key.thumbprint(),
            old_key.thumbprint()
        )));
    }
    Ok(new_key)
}

/// Returns the `kid` of an `externalAccountBinding` (RFC 8555, section
/// 7.3.4), so the caller can look up its MAC key.
///
/// The binding must be a flattened JWS with an HS256, HS384 or HS512 `alg`
/// and a `kid`. Nothing is verified yet.
pub fn eab_key_id(eab: &Value) -> Result<String, Problem> {
    parse_binding(eab).map(|(_, key_id)| key_id)
}

/// Verifies an `externalAccountBinding` (RFC 8555, section 7.3.4) sent to
/// the newAccount URL `url` with the account key `account_key`.
///
/// The MAC is checked first, in constant time, and a wrong MAC is
/// `unauthorized`. A `nonce`, a `url` other than `url` and a payload other
/// than the account key are `malformed`. `hmac_key` never appears in a
/// problem detail.
pub fn verify_eab(eab: &Value, hmac_key: &[u8], account_key: &Jwk, url: &str) -> Result<(), Problem> {
    let (binding, key_id) = parse_binding(eab)?;
    if hmac_key.is_empty() {
        return Err(Problem::internal(format!(
            "the external account binding MAC key for key id {} is empty",
            quote(&key_id)
        )));
    }

    let mac_algorithm = match binding.protected.alg {
        Algorithm::Hs256 => hmac::HMAC_SHA256,
        Algorithm::Hs384 => hmac::HMAC_SHA384,
        Algorithm::Hs512 => hmac::HMAC_SHA512,
        other => {
            return Err(Problem::internal(format!("external account binding parsed with non-MAC algorithm {other}")));
        }
    };
    hmac::verify(&hmac::Key::new(mac_algorithm, hmac_key), binding.signing_input.as_bytes(), &binding.signature)
        .map_err(|_| {
            Problem::unauthorized(format!("external account binding MAC does not verify for key id {}", quote(&key_id)))
        })?;

    if let Some(nonce) = &binding.protected.nonce {
        return Err(Problem::malformed(format!(
            "external account binding must not have a \"nonce\", but it has {}",
            quote(nonce)
        )));
    }
    if binding.protected.url != url {
        return Err(Problem::malformed(format!(
            "external account binding \"url\" {} is not the newAccount URL {}",
            quote(&binding.protected.url),
            quote(url)
        )));
    }
    let bound_key = binding
        .payload_json::<Value>()
        .and_then(|payload| Jwk::from_json(&payload))
        .map_err(|problem| prefix("external account binding payload", problem))?;
    if bound_key.thumbprint() != account_key.thumbprint() {
        return Err(Problem::malformed(format!(
            "external account binding payload is not the account key: its thumbprint is {}, the account key's is {}",
            bound_key.thumbprint(),
            account_key.thumbprint()
        )));
    }
    Ok(())
}

fn parse_binding(eab: &Value) -> Result<(Jws, String), Problem> {
    let Some(object) = eab.as_object() else {
        return Err(Problem::malformed(format!(
            "externalAccountBinding must be a JSON object (a flattened JWS), got {}",
            json_kind(eab)
        )));
    };
    let binding = Jws::from_object(object.clone(), Purpose::ExternalAccountBinding)
        .map_err(|problem| prefix("externalAccountBinding", problem))?;
    match &binding.protected.key {
        KeyId::Kid(key_id) => {
            let key_id = key_id.clone();
            Ok((binding, key_id))
        }
        KeyId::Jwk(_) => Err(Problem::internal("external account binding parsed with a \"jwk\"")),
    }
}

/// Parses a request body into its top-level JSON object.
fn parse_object(body: &[u8]) -> Result<Map<String, Value>, Problem> {
    if looks_compact(body) {
        return Err(Problem::malformed(
            "request body is a JWS in compact serialization; ACME requires the flattened JSON serialization, \
             an object with \"protected\", \"payload\" and \"signature\"",
        ));
    }
    parse_members(body).map_err(|error| Problem::malformed(format!("request body is not a JSON object: {error}")))
}

/// True for `header.payload.signature` in base64url, the compact
/// serialization (RFC 7515, section 7.1).
fn looks_compact(body: &[u8]) -> bool {
    let text = body.trim_ascii();
    let dots = text.iter().filter(|byte| **byte == b'.').count();
    dots == 2 && text.iter().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
}

/// Parses a JSON object and rejects duplicate member names, which RFC 7515,
/// section 4, allows a parser to reject in a JOSE header.
fn parse_members(json: &[u8]) -> Result<Map<String, Value>, serde_json::Error> {
    serde_json::from_slice::<UniqueMembers>(json).map(|members| members.0)
}

struct UniqueMembers(Map<String, Value>);

impl<'de> Deserialize<'de> for UniqueMembers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<UniqueMembers, D::Error> {
        deserializer.deserialize_map(UniqueMembersVisitor)
    }
}

struct UniqueMembersVisitor;

impl<'de> Visitor<'de> for UniqueMembersVisitor {
    type Value = UniqueMembers;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<UniqueMembers, A::Error> {
        let mut members = Map::new();
        while let Some(name) = access.next_key::<String>()? {
            if members.contains_key(&name) {
                return Err(de::Error::custom(format!("duplicate member {}", quote(&name))));
            }
            let value: Value = access.next_value()?;
            members.insert(name, value);
        }
        Ok(UniqueMembers(members))
    }
}

/// Checks that `object` is a flattened JWS with nothing but a protected
/// header, a payload and a signature.
fn check_flattened_members(object: &Map<String, Value>) -> Result<(), Problem> {
    if object.contains_key("signatures") {
        return Err(Problem::malformed(
            "JWS is in general JSON serialization (\"signatures\"); ACME requires the flattened JSON \
             serialization with one signature",
        ));
    }
    if object.contains_key("header") {
        return Err(Problem::malformed("JWS has an unprotected \"header\"; ACME allows only the \"protected\" header"));
    }
    if let Some(name) = object.keys().find(|name| !matches!(name.as_str(), "protected" | "payload" | "signature")) {
        return Err(Problem::malformed(format!(
            "JWS has the unexpected member {}; a flattened JWS has only \"protected\", \"payload\" and \"signature\"",
            quote(name)
        )));
    }
    Ok(())
}

fn take_string(object: &mut Map<String, Value>, name: &str) -> Result<String, Problem> {
    match object.remove(name) {
        Some(Value::String(value)) => Ok(value),
        Some(other) => {
            Err(Problem::malformed(format!("JWS member \"{name}\" must be a string, got {}", json_kind(&other))))
        }
        None => Err(Problem::malformed(format!("JWS member \"{name}\" is missing"))),
    }
}

fn parse_protected(mut header: Map<String, Value>, purpose: Purpose) -> Result<Protected, Problem> {
    for name in ["crit", "b64"] {
        if header.contains_key(name) {
            return Err(Problem::malformed(format!(
                "JWS protected header parameter \"{name}\" is not supported; remove it"
            )));
        }
    }

    let alg = parse_alg(&header, purpose)?;
    let key = match (header.remove("jwk"), header.remove("kid"), purpose) {
        (Some(_), Some(_), Purpose::Request) => {
            return Err(Problem::malformed(
                "JWS protected header has both \"jwk\" and \"kid\"; send exactly one: \"jwk\" for newAccount \
                 and for revokeCert signed with the certificate key, \"kid\" otherwise",
            ));
        }
        (None, None, Purpose::Request) => {
            return Err(Problem::malformed("JWS protected header has neither \"jwk\" nor \"kid\"; send exactly one"));
        }
        (Some(jwk), None, Purpose::Request) => KeyId::Jwk(Jwk::from_json(&jwk)?),
        (Some(_), _, Purpose::ExternalAccountBinding) => {
            return Err(Problem::malformed(
                "JWS protected header has \"jwk\"; an external account binding names its MAC key with \"kid\"",
            ));
        }
        (None, Some(kid), _) => KeyId::Kid(parse_kid(kid)?),
        (None, None, Purpose::ExternalAccountBinding) => {
            return Err(Problem::malformed("JWS protected header has no \"kid\""));
        }
    };

    let url = match header.remove("url") {
        Some(Value::String(url)) => url,
        Some(other) => return Err(header_type_error("url", &other)),
        None => return Err(Problem::malformed("JWS protected header has no \"url\"; RFC 8555 requires it")),
    };
    let nonce = match header.remove("nonce") {
        Some(Value::String(nonce)) => Some(nonce),
        Some(other) => return Err(header_type_error("nonce", &other)),
        None => None,
    };
    Ok(Protected { alg, key, nonce, url })
}

fn parse_alg(header: &Map<String, Value>, purpose: Purpose) -> Result<Algorithm, Problem> {
    let name = match header.get("alg") {
        Some(Value::String(name)) => name,
        Some(other) => return Err(header_type_error("alg", other)),
        None => return Err(Problem::malformed("JWS protected header has no \"alg\"")),
    };
    let allowed = purpose.algorithms();
    match Algorithm::from_name(name) {
        Some(alg) if allowed.contains(&alg) => Ok(alg),
        _ => {
            let names: Vec<&str> = allowed.iter().map(|alg| alg.name()).collect();
            let mut problem = Problem::new(
                ProblemType::BadSignatureAlgorithm,
                format!(
                    "JWS algorithm {} is not supported here; supported algorithms are {}",
                    quote(name),
                    names.join(", ")
                ),
            );
            // RFC 8555, section 6.2: the problem lists the algorithms the server accepts.
            problem.algorithms = names.iter().map(|name| (*name).to_owned()).collect();
            Err(problem)
        }
    }
}

fn parse_kid(kid: Value) -> Result<String, Problem> {
    match kid {
        Value::String(kid) if !kid.is_empty() => Ok(kid),
        Value::String(_) => Err(Problem::malformed("JWS protected header \"kid\" is empty")),
        other => Err(header_type_error("kid", &other)),
    }
}

fn header_type_error(name: &str, value: &Value) -> Problem {
    Problem::malformed(format!("JWS protected header \"{name}\" must be a string, got {}", json_kind(value)))
}

/// Puts `context` in front of a problem's detail and keeps its type.
fn prefix(context: &str, mut problem: Problem) -> Problem {
    problem.detail = format!("{context}: {}", problem.detail);
    problem
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::client::{AccountKey, TEST_RSA_2048_PKCS8};

    const NEW_ACCOUNT_URL: &str = "https://ca.test/acme/new-account";
    const ORDER_URL: &str = "https://ca.test/acme/new-order";
    const KEY_CHANGE_URL: &str = "https://ca.test/acme/key-change";
    const ACCOUNT_URL: &str = "https://ca.test/acme/acct/7";

    fn rsa_key() -> AccountKey {
        let der = b64::decode("test key", TEST_RSA_2048_PKCS8).expect("test key is base64url");
        AccountKey::from_pkcs8(Algorithm::Rs256, &der).expect("test key parses")
    }

    fn every_key() -> Vec<AccountKey> {
        vec![
            AccountKey::generate(Algorithm::Es256),
            AccountKey::generate(Algorithm::Es384),
            AccountKey::generate(Algorithm::EdDsa),
            rsa_key(),
        ]
    }

    fn jwk_of(key: &AccountKey) -> Jwk {
        Jwk::from_json(&key.jwk()).expect("client JWK parses")
    }

    fn assert_problem(problem: &Problem, kind: ProblemType, needles: &[&str]) {
        assert!(problem.is(kind), "expected {}, got {problem}", kind.urn());
        for needle in needles {
            assert!(problem.detail.contains(needle), "detail {:?} lacks {needle:?}", problem.detail);
        }
    }

    fn rejected(body: &[u8]) -> Problem {
        match Jws::parse(body) {
            Ok(jws) => panic!("{} parsed to {jws:?} but should be rejected", String::from_utf8_lossy(body)),
            Err(problem) => problem,
        }
    }

    /// Signs an arbitrary protected header and payload with `key`, for
    /// headers that `AccountKey::sign` never produces.
    fn sign_raw(key: &AccountKey, header: &Value, payload: &str) -> Value {
        let protected = b64::encode(header.to_string().as_bytes());
        let signature = key.sign_bytes(format!("{protected}.{payload}").as_bytes());
        json!({"protected": protected, "payload": payload, "signature": b64::encode(&signature)})
    }

    fn body(value: &Value) -> Vec<u8> {
        value.to_string().into_bytes()
    }

    #[test]
    fn round_trip_every_algorithm() {
        for key in every_key() {
            let payload = json!({"identifiers": [{"type": "dns", "value": "a.test"}]});
            let body = key.sign(ORDER_URL, Some("nonce-1"), Some(ACCOUNT_URL), Some(&payload));
            let jws = Jws::parse(&body).expect("signed body parses");

            assert_eq!(jws.protected().alg, key.algorithm());
            assert_eq!(jws.protected().key, KeyId::Kid(ACCOUNT_URL.to_owned()));
            assert_eq!(jws.protected().nonce.as_deref(), Some("nonce-1"));
            assert_eq!(jws.protected().url, ORDER_URL);
            assert!(!jws.is_post_as_get());
            assert_eq!(jws.payload_json::<Value>().expect("payload is JSON"), payload);
            jws.verify(&jwk_of(&key)).unwrap_or_else(|problem| panic!("{}: {problem}", key.algorithm()));
            check_url(jws.protected(), ORDER_URL).expect("same URL");
        }
    }

    #[test]
    fn round_trip_embedded_jwk() {
        for key in every_key() {
            let body = key.sign(NEW_ACCOUNT_URL, Some("nonce-2"), None, Some(&json!({"termsOfServiceAgreed": true})));
            let jws = Jws::parse(&body).expect("signed body parses");
            let KeyId::Jwk(jwk) = &jws.protected().key else { panic!("expected an embedded jwk") };
            assert_eq!(jwk.thumbprint(), key.thumbprint());
            jws.verify(jwk).unwrap_or_else(|problem| panic!("{}: {problem}", key.algorithm()));
        }
    }

    #[test]
    fn post_as_get_has_empty_payload() {
        let key = AccountKey::generate(Algorithm::Es256);
        let jws = Jws::parse(&key.sign(ORDER_URL, Some("n"), Some(ACCOUNT_URL), None)).expect("parses");
        assert!(jws.is_post_as_get());
        assert!(jws.payload().is_empty());
        jws.verify(&jwk_of(&key)).expect("verifies");
        let problem = jws.payload_json::<Value>().expect_err("no JSON in POST-as-GET");
        assert_problem(&problem, ProblemType::Malformed, &["POST-as-GET"]);
    }

    #[test]
    fn empty_object_is_not_post_as_get() {
        let key = AccountKey::generate(Algorithm::Es256);
        let jws = Jws::parse(&key.sign(ORDER_URL, Some("n"), Some(ACCOUNT_URL), Some(&json!({})))).expect("parses");
        assert!(!jws.is_post_as_get());
        assert_eq!(jws.payload(), b"{}");
        let raw: Value = serde_json::from_slice(&key.sign(ORDER_URL, Some("n"), Some(ACCOUNT_URL), Some(&json!({}))))
            .expect("body is JSON");
        assert_eq!(raw["payload"], "e30");
    }

    #[test]
    fn payload_json_names_serde_error() {
        #[derive(Debug, serde::Deserialize)]
        struct Order {
            #[allow(dead_code)]
            identifiers: Vec<Value>,
        }
        let key = AccountKey::generate(Algorithm::Es256);
        let jws = Jws::parse(&key.sign(ORDER_URL, Some("n"), Some(ACCOUNT_URL), Some(&json!({"identifier": 1}))))
            .expect("parses");
        let problem = jws.payload_json::<Order>().expect_err("missing field");
        assert_problem(&problem, ProblemType::Malformed, &["missing field `identifiers`"]);
    }

    #[test]
    fn tampered_payload_fails() {
        let key = AccountKey::generate(Algorithm::Es256);
        let signed = key.sign(ORDER_URL, Some("n"), Some(ACCOUNT_URL), Some(&json!({"status": "deactivated"})));
        let mut value: Value = serde_json::from_slice(&signed).expect("JSON");
        value["payload"] = json!(b64::encode(br#"{"status":"valid"}"#));
        let jws = Jws::parse(&body(&value)).expect("tampered body still parses");
        let problem = jws.verify(&jwk_of(&key)).expect_err("tampered payload");
        assert_problem(&problem, ProblemType::Malformed, &["JWS signature does not verify"]);
    }

    #[test]
    fn tampered_header_fails() {
        let key = AccountKey::generate(Algorithm::EdDsa);
        let signed = key.sign(ORDER_URL, Some("n"), Some(ACCOUNT_URL), None);
        let mut value: Value = serde_json::from_slice(&signed).expect("JSON");
        let header = json!({"alg": "EdDSA", "kid": ACCOUNT_URL, "nonce": "n", "url": "https://ca.test/acme/other"});
        value["protected"] = json!(b64::encode(header.to_string().as_bytes()));
        let jws = Jws::parse(&body(&value)).expect("parses");
        assert_problem(&jws.verify(&jwk_of(&key)).expect_err("tampered"), ProblemType::Malformed, &["does not verify"]);
    }

    #[test]
    fn wrong_key_fails() {
        for key in every_key() {
            let other = match key.algorithm() {
                Algorithm::Rs256 => AccountKey::generate(Algorithm::Es256),
                alg => AccountKey::generate(alg),
            };
            let jws = Jws::parse(&key.sign(ORDER_URL, Some("n"), Some(ACCOUNT_URL), None)).expect("parses");
            let problem = jws.verify(&jwk_of(&other)).expect_err("other key");
            if other.algorithm() == key.algorithm() {
                assert_problem(&problem, ProblemType::Malformed, &["JWS signature does not verify"]);
            } else {
                assert_problem(&problem, ProblemType::BadSignatureAlgorithm, &[key.algorithm().name()]);
            }
        }
    }

    #[test]
    fn same_type_wrong_key_fails() {
        let key = AccountKey::generate(Algorithm::Es384);
        let other = AccountKey::generate(Algorithm::Es384);
        let jws = Jws::parse(&key.sign(ORDER_URL, Some("n"), Some(ACCOUNT_URL), None)).expect("parses");
        let problem = jws.verify(&jwk_of(&other)).expect_err("other key");
        assert_problem(&problem, ProblemType::Malformed, &["JWS signature does not verify"]);
    }

    #[test]
    fn alg_not_fitting_key_fails() {
        let key = AccountKey::generate(Algorithm::Es256);
        let header = json!({"alg": "ES384", "kid": ACCOUNT_URL, "nonce": "n", "url": ORDER_URL});
        let jws = Jws::parse(&body(&sign_raw(&key, &header, ""))).expect("parses");
        let problem = jws.verify(&jwk_of(&key)).expect_err("ES384 with a P-256 key");
        assert_problem(&problem, ProblemType::BadSignatureAlgorithm, &["ES384", "EC P-256", "ES256"]);
    }

    #[test]
    fn rejects_padded_base64() {
        let key = AccountKey::generate(Algorithm::Es256);
        let mut value: Value =
            serde_json::from_slice(&key.sign(ORDER_URL, Some("n"), Some(ACCOUNT_URL), Some(&json!({})))).expect("JSON");
        value["payload"] = json!("e30=");
        assert_problem(&rejected(&body(&value)), ProblemType::Malformed, &["\"payload\"", "\"e30=\"", "padding"]);
    }

    #[test]
    fn rejects_standard_alphabet() {
        let key = AccountKey::generate(Algorithm::Es256);
        let mut value: Value =
            serde_json::from_slice(&key.sign(ORDER_URL, Some("n"), Some(ACCOUNT_URL), None)).expect("JSON");
        let signature =
            value["signature"].as_str().expect("signature").replacen(|c: char| c.is_ascii_alphabetic(), "+", 1);
        value["signature"] = json!(signature);
        assert_problem(
            &rejected(&body(&value)),
            ProblemType::Malformed,
            &["\"signature\"", &signature[..20], "standard base64 alphabet"],
        );
    }

    #[test]
    fn rejects_jwk_and_kid() {
        let key = AccountKey::generate(Algorithm::Es256);
        let header = json!({"alg": "ES256", "jwk": key.jwk(), "kid": ACCOUNT_URL, "nonce": "n", "url": ORDER_URL});
        assert_problem(
            &rejected(&body(&sign_raw(&key, &header, ""))),
            ProblemType::Malformed,
            &["both \"jwk\" and \"kid\""],
        );
    }

    #[test]
    fn rejects_neither_jwk_nor_kid() {
        let key = AccountKey::generate(Algorithm::Es256);
        let header = json!({"alg": "ES256", "nonce": "n", "url": ORDER_URL});
        assert_problem(
            &rejected(&body(&sign_raw(&key, &header, ""))),
            ProblemType::Malformed,
            &["neither \"jwk\" nor \"kid\""],
        );
    }

    #[test]
    fn rejects_missing_url() {
        let key = AccountKey::generate(Algorithm::Es256);
        let header = json!({"alg": "ES256", "kid": ACCOUNT_URL, "nonce": "n"});
        assert_problem(&rejected(&body(&sign_raw(&key, &header, ""))), ProblemType::Malformed, &["no \"url\""]);
    }

    #[test]
    fn rejects_mistyped_header_members() {
        let key = AccountKey::generate(Algorithm::Es256);
        for (name, header) in [
            ("url", json!({"alg": "ES256", "kid": ACCOUNT_URL, "nonce": "n", "url": 5})),
            ("nonce", json!({"alg": "ES256", "kid": ACCOUNT_URL, "nonce": ["n"], "url": ORDER_URL})),
            ("kid", json!({"alg": "ES256", "kid": 7, "nonce": "n", "url": ORDER_URL})),
            ("alg", json!({"alg": null, "kid": ACCOUNT_URL, "nonce": "n", "url": ORDER_URL})),
        ] {
            let problem = rejected(&body(&sign_raw(&key, &header, "")));
            assert_problem(&problem, ProblemType::Malformed, &[&format!("\"{name}\" must be a string")]);
        }
        let header = json!({"alg": "ES256", "kid": "", "nonce": "n", "url": ORDER_URL});
        assert_problem(&rejected(&body(&sign_raw(&key, &header, ""))), ProblemType::Malformed, &["\"kid\" is empty"]);
    }

    #[test]
    fn keeps_nonce_raw_and_optional() {
        let key = AccountKey::generate(Algorithm::Es256);
        let jws = Jws::parse(&key.sign(ORDER_URL, Some(" not base64! "), Some(ACCOUNT_URL), None)).expect("parses");
        assert_eq!(jws.protected().nonce.as_deref(), Some(" not base64! "));
        let jws = Jws::parse(&key.sign(ORDER_URL, None, Some(ACCOUNT_URL), None)).expect("parses");
        assert_eq!(jws.protected().nonce, None);
    }

    #[test]
    fn rejects_alg_none() {
        let header = json!({"alg": "none", "kid": ACCOUNT_URL, "nonce": "n", "url": ORDER_URL});
        let value = json!({"protected": b64::encode(header.to_string().as_bytes()), "payload": "", "signature": ""});
        let problem = rejected(&body(&value));
        assert_problem(&problem, ProblemType::BadSignatureAlgorithm, &["\"none\"", "ES256, ES384, RS256, EdDSA"]);
        assert_eq!(problem.algorithms, ["ES256", "ES384", "RS256", "EdDSA"]);
    }

    #[test]
    fn rejects_hmac_on_request() {
        for alg in ["HS256", "HS384", "HS512"] {
            let key = AccountKey::generate(Algorithm::Es256);
            let header = json!({"alg": alg, "kid": ACCOUNT_URL, "nonce": "n", "url": ORDER_URL});
            assert_problem(
                &rejected(&body(&sign_raw(&key, &header, ""))),
                ProblemType::BadSignatureAlgorithm,
                &[&format!("\"{alg}\""), "ES256, ES384, RS256, EdDSA"],
            );
        }
    }

    #[test]
    fn rejects_unknown_alg() {
        let key = AccountKey::generate(Algorithm::Es256);
        for alg in ["PS256", "ES512", "es256", "ES256K"] {
            let header = json!({"alg": alg, "kid": ACCOUNT_URL, "nonce": "n", "url": ORDER_URL});
            assert_problem(
                &rejected(&body(&sign_raw(&key, &header, ""))),
                ProblemType::BadSignatureAlgorithm,
                &[&format!("\"{alg}\""), "supported algorithms are"],
            );
        }
        let header = json!({"kid": ACCOUNT_URL, "nonce": "n", "url": ORDER_URL});
        assert_problem(&rejected(&body(&sign_raw(&key, &header, ""))), ProblemType::Malformed, &["no \"alg\""]);
    }

    #[test]
    fn rejects_crit_and_b64() {
        let key = AccountKey::generate(Algorithm::Es256);
        for (name, extra) in [("crit", json!(["b64"])), ("b64", json!(false))] {
            let mut header = json!({"alg": "ES256", "kid": ACCOUNT_URL, "nonce": "n", "url": ORDER_URL});
            header[name] = extra;
            assert_problem(
                &rejected(&body(&sign_raw(&key, &header, ""))),
                ProblemType::Malformed,
                &[&format!("\"{name}\" is not supported")],
            );
        }
    }

    #[test]
    fn rejects_bad_embedded_jwk() {
        let key = AccountKey::generate(Algorithm::Es256);
        let mut jwk = key.jwk();
        jwk["d"] = json!("c2VjcmV0");
        let header = json!({"alg": "ES256", "jwk": jwk, "nonce": "n", "url": NEW_ACCOUNT_URL});
        let problem = rejected(&body(&sign_raw(&key, &header, "")));
        assert_problem(&problem, ProblemType::BadPublicKey, &["\"d\""]);
        assert!(!problem.detail.contains("c2VjcmV0"), "{}", problem.detail);
    }

    #[test]
    fn rejects_compact_serialization() {
        let key = AccountKey::generate(Algorithm::Es256);
        let value: Value =
            serde_json::from_slice(&key.sign(ORDER_URL, Some("n"), Some(ACCOUNT_URL), None)).expect("JSON");
        let compact = format!(
            "{}.{}.{}",
            value["protected"].as_str().expect("protected"),
            value["payload"].as_str().expect("payload"),
            value["signature"].as_str().expect("signature")
        );
        assert_problem(&rejected(compact.as_bytes()), ProblemType::Malformed, &["compact serialization", "flattened"]);
    }

    #[test]
    fn rejects_general_serialization() {
        let value = json!({"payload": "", "signatures": [{"protected": "e30", "signature": ""}]});
        assert_problem(
            &rejected(&body(&value)),
            ProblemType::Malformed,
            &["general JSON serialization", "\"signatures\""],
        );
    }

    #[test]
    fn rejects_unprotected_header() {
        let key = AccountKey::generate(Algorithm::Es256);
        let mut value: Value =
            serde_json::from_slice(&key.sign(ORDER_URL, Some("n"), Some(ACCOUNT_URL), None)).expect("JSON");
        value["header"] = json!({"kid": ACCOUNT_URL});
        assert_problem(&rejected(&body(&value)), ProblemType::Malformed, &["unprotected \"header\""]);
    }

    #[test]
    fn rejects_extra_and_missing_members() {
        let key = AccountKey::generate(Algorithm::Es256);
        let value: Value =
            serde_json::from_slice(&key.sign(ORDER_URL, Some("n"), Some(ACCOUNT_URL), None)).expect("JSON");

        let mut extra = value.clone();
        extra["unexpected"] = json!(1);
        assert_problem(&rejected(&body(&extra)), ProblemType::Malformed, &["unexpected member \"unexpected\""]);

        for name in ["protected", "payload", "signature"] {
            let mut missing = value.clone();
            missing.as_object_mut().expect("object").remove(name);
            assert_problem(&rejected(&body(&missing)), ProblemType::Malformed, &[&format!("\"{name}\" is missing")]);

            let mut mistyped = value.clone();
            mistyped[name] = json!(null);
            assert_problem(
                &rejected(&body(&mistyped)),
                ProblemType::Malformed,
                &[&format!("\"{name}\" must be a string")],
            );
        }
    }

    #[test]
    fn rejects_duplicate_members() {
        let key = AccountKey::generate(Algorithm::Es256);
        let value: Value =
            serde_json::from_slice(&key.sign(ORDER_URL, Some("n"), Some(ACCOUNT_URL), None)).expect("JSON");
        let text = value.to_string();
        let duplicated = format!("{},\"payload\":\"e30\"}}", &text[..text.len() - 1]);
        assert_problem(&rejected(duplicated.as_bytes()), ProblemType::Malformed, &["duplicate member \"payload\""]);

        let header = format!(
            r#"{{"alg":"ES256","kid":"{ACCOUNT_URL}","nonce":"n","url":"{ORDER_URL}","url":"https://evil.test/"}}"#
        );
        let protected = b64::encode(header.as_bytes());
        let signature = key.sign_bytes(format!("{protected}.").as_bytes());
        let value = json!({"protected": protected, "payload": "", "signature": b64::encode(&signature)});
        assert_problem(
            &rejected(&body(&value)),
            ProblemType::Malformed,
            &["protected header is not a JSON object", "duplicate member \"url\""],
        );
    }

    #[test]
    fn rejects_non_object_bodies() {
        for text in ["", "[]", "\"text\"", "{", "nul"] {
            assert_problem(&rejected(text.as_bytes()), ProblemType::Malformed, &["request body is not a JSON object"]);
        }
        let value = json!({"protected": b64::encode(b"[1]"), "payload": "", "signature": ""});
        assert_problem(&rejected(&body(&value)), ProblemType::Malformed, &["protected header is not a JSON object"]);
    }

    #[test]
    fn check_url_names_both() {
        let key = AccountKey::generate(Algorithm::Es256);
        let jws = Jws::parse(&key.sign(ORDER_URL, Some("n"), Some(ACCOUNT_URL), None)).expect("parses");
        let problem = check_url(jws.protected(), "https://ca.test/acme/order/1").expect_err("other URL");
        assert_problem(&problem, ProblemType::Unauthorized, &[ORDER_URL, "https://ca.test/acme/order/1"]);
    }

    /// Builds the outer keyChange JWS around `inner`, signed with `old`.
    fn key_change(old: &AccountKey, inner: &Value) -> Jws {
        Jws::parse(&old.sign(KEY_CHANGE_URL, Some("n"), Some(ACCOUNT_URL), Some(inner))).expect("outer parses")
    }

    fn key_change_problem(old: &AccountKey, inner: &Value) -> Problem {
        match verify_key_change(&key_change(old, inner), ACCOUNT_URL, &jwk_of(old)) {
            Ok(jwk) => panic!("key change to {jwk:?} should be rejected"),
            Err(problem) => problem,
        }
    }

    #[test]
    fn key_change_round_trip() {
        for (old, new) in every_key().into_iter().zip(every_key().into_iter().rev()) {
            let inner = old.sign_key_change(&new, ACCOUNT_URL, KEY_CHANGE_URL);
            let outer = key_change(&old, &inner);
            outer.verify(&jwk_of(&old)).expect("outer verifies with the old key");
            let returned = verify_key_change(&outer, ACCOUNT_URL, &jwk_of(&old)).expect("key change is valid");
            assert_eq!(returned.thumbprint(), new.thumbprint());
        }
    }

    #[test]
    fn key_change_rejects_inner_kid() {
        let (old, new) = (AccountKey::generate(Algorithm::Es256), AccountKey::generate(Algorithm::Es256));
        let payload = json!({"account": ACCOUNT_URL, "oldKey": old.jwk()});
        let inner: Value =
            serde_json::from_slice(&new.sign(KEY_CHANGE_URL, None, Some("https://ca.test/kid-9"), Some(&payload)))
                .expect("JSON");
        assert_problem(
            &key_change_problem(&old, &inner),
            ProblemType::Malformed,
            &["\"jwk\"", "\"https://ca.test/kid-9\""],
        );
    }

    #[test]
    fn key_change_rejects_inner_nonce() {
        let (old, new) = (AccountKey::generate(Algorithm::Es256), AccountKey::generate(Algorithm::EdDsa));
        let payload = json!({"account": ACCOUNT_URL, "oldKey": old.jwk()});
        let inner: Value =
            serde_json::from_slice(&new.sign(KEY_CHANGE_URL, Some("inner-nonce"), None, Some(&payload))).expect("JSON");
        assert_problem(&key_change_problem(&old, &inner), ProblemType::Malformed, &["\"nonce\"", "\"inner-nonce\""]);
    }

    #[test]
    fn key_change_rejects_inner_url() {
        let (old, new) = (AccountKey::generate(Algorithm::Es256), AccountKey::generate(Algorithm::Es256));
        let inner = old.sign_key_change(&new, ACCOUNT_URL, "https://ca.test/acme/elsewhere");
        assert_problem(
            &key_change_problem(&old, &inner),
            ProblemType::Malformed,
            &["\"https://ca.test/acme/elsewhere\"", KEY_CHANGE_URL],
        );
    }

    #[test]
    fn key_change_rejects_inner_signature() {
        let (old, new) = (AccountKey::generate(Algorithm::Es256), AccountKey::generate(Algorithm::Es256));
        let mut inner = old.sign_key_change(&new, ACCOUNT_URL, KEY_CHANGE_URL);
        let payload = json!({"account": ACCOUNT_URL, "oldKey": new.jwk()});
        inner["payload"] = json!(b64::encode(payload.to_string().as_bytes()));
        assert_problem(&key_change_problem(&old, &inner), ProblemType::Malformed, &["new key", "does not verify"]);

        // Signed by the old key while naming the new key as jwk.
        let header = json!({"alg": "ES256", "jwk": new.jwk(), "url": KEY_CHANGE_URL});
        let payload = json!({"account": ACCOUNT_URL, "oldKey": old.jwk()});
        let inner = sign_raw(&old, &header, &b64::encode(payload.to_string().as_bytes()));
        assert_problem(&key_change_problem(&old, &inner), ProblemType::Malformed, &["new key", "does not verify"]);
    }

    #[test]
    fn key_change_rejects_wrong_account() {
        let (old, new) = (AccountKey::generate(Algorithm::Es256), AccountKey::generate(Algorithm::Es384));
        let inner = old.sign_key_change(&new, "https://ca.test/acme/acct/8", KEY_CHANGE_URL);
        assert_problem(
            &key_change_problem(&old, &inner),
            ProblemType::Malformed,
            &["\"account\"", "\"https://ca.test/acme/acct/8\"", ACCOUNT_URL],
        );
    }

    #[test]
    fn key_change_rejects_wrong_old_key() {
        let (old, new, stranger) = (
            AccountKey::generate(Algorithm::Es256),
            AccountKey::generate(Algorithm::Es256),
            AccountKey::generate(Algorithm::EdDsa),
        );
        let inner = stranger.sign_key_change(&new, ACCOUNT_URL, KEY_CHANGE_URL);
        assert_problem(
            &key_change_problem(&old, &inner),
            ProblemType::Malformed,
            &["\"oldKey\"", &stranger.thumbprint(), &old.thumbprint()],
        );
    }

    #[test]
    fn key_change_rejects_missing_payload_members() {
        let (old, new) = (AccountKey::generate(Algorithm::Es256), AccountKey::generate(Algorithm::Es256));
        for (payload, needle) in [
            (json!({"oldKey": old.jwk()}), "no \"account\""),
            (json!({"account": ACCOUNT_URL}), "no \"oldKey\""),
            (json!({"account": 7, "oldKey": old.jwk()}), "\"account\" must be a string"),
            (json!(["account"]), "payload is not valid"),
        ] {
            let inner: Value =
                serde_json::from_slice(&new.sign(KEY_CHANGE_URL, None, None, Some(&payload))).expect("JSON");
            assert_problem(&key_change_problem(&old, &inner), ProblemType::Malformed, &[needle]);
        }
    }

    #[test]
    fn key_change_rejects_non_jws_payload() {
        let old = AccountKey::generate(Algorithm::Es256);
        let problem = key_change_problem(&old, &json!({"account": ACCOUNT_URL}));
        assert_problem(&problem, ProblemType::Malformed, &["inner JWS", "\"account\""]);

        let outer = Jws::parse(&old.sign(KEY_CHANGE_URL, Some("n"), Some(ACCOUNT_URL), None)).expect("parses");
        let problem = verify_key_change(&outer, ACCOUNT_URL, &jwk_of(&old)).expect_err("empty payload");
        assert_problem(&problem, ProblemType::Malformed, &["payload is empty"]);
    }

    #[test]
    fn key_change_rejects_outer_jwk() {
        let (old, new) = (AccountKey::generate(Algorithm::Es256), AccountKey::generate(Algorithm::Es256));
        let inner = old.sign_key_change(&new, ACCOUNT_URL, KEY_CHANGE_URL);
        let outer = Jws::parse(&old.sign(KEY_CHANGE_URL, Some("n"), None, Some(&inner))).expect("parses");
        let problem = verify_key_change(&outer, ACCOUNT_URL, &jwk_of(&old)).expect_err("outer jwk");
        assert_problem(&problem, ProblemType::Malformed, &["outer JWS", "\"kid\""]);
    }

    #[test]
    fn key_change_rejects_inner_hmac() {
        let (old, new) = (AccountKey::generate(Algorithm::Es256), AccountKey::generate(Algorithm::Es256));
        let mut inner = old.sign_key_change(&new, ACCOUNT_URL, KEY_CHANGE_URL);
        let header = json!({"alg": "HS256", "jwk": new.jwk(), "url": KEY_CHANGE_URL});
        inner["protected"] = json!(b64::encode(header.to_string().as_bytes()));
        let problem = key_change_problem(&old, &inner);
        assert_problem(&problem, ProblemType::BadSignatureAlgorithm, &["key change: inner JWS", "\"HS256\""]);
    }

    const EAB_KEY: &[u8] = b"an HMAC key of thirty-two bytes!";
    const EAB_KEY_ID: &str = "kid-eab-1";

    #[test]
    fn eab_round_trip_every_mac() {
        let account = AccountKey::generate(Algorithm::Es256);
        for alg in Algorithm::MAC {
            let eab = AccountKey::eab(EAB_KEY, EAB_KEY_ID, alg, &account, NEW_ACCOUNT_URL);
            assert_eq!(eab_key_id(&eab).expect("key id"), EAB_KEY_ID);
            verify_eab(&eab, EAB_KEY, &jwk_of(&account), NEW_ACCOUNT_URL)
                .unwrap_or_else(|problem| panic!("{alg}: {problem}"));
        }
    }

    #[test]
    fn eab_inside_new_account() {
        let account = AccountKey::generate(Algorithm::EdDsa);
        let eab = AccountKey::eab(EAB_KEY, EAB_KEY_ID, Algorithm::Hs256, &account, NEW_ACCOUNT_URL);
        let payload = json!({"termsOfServiceAgreed": true, "externalAccountBinding": eab});
        let jws = Jws::parse(&account.sign(NEW_ACCOUNT_URL, Some("n"), None, Some(&payload))).expect("parses");
        let KeyId::Jwk(jwk) = &jws.protected().key else { panic!("newAccount carries a jwk") };
        jws.verify(jwk).expect("outer verifies");
        let payload: Value = jws.payload_json().expect("JSON");
        verify_eab(&payload["externalAccountBinding"], EAB_KEY, jwk, NEW_ACCOUNT_URL).expect("binding verifies");
    }

    #[test]
    fn eab_rejects_wrong_mac() {
        let account = AccountKey::generate(Algorithm::Es256);
        let eab = AccountKey::eab(EAB_KEY, EAB_KEY_ID, Algorithm::Hs256, &account, NEW_ACCOUNT_URL);
        let other_key = b"another HMAC key of 32 bytes!!!!";
        let problem = verify_eab(&eab, other_key, &jwk_of(&account), NEW_ACCOUNT_URL).expect_err("wrong key");
        assert_problem(&problem, ProblemType::Unauthorized, &["MAC does not verify for key id \"kid-eab-1\""]);
        for secret in [EAB_KEY, other_key] {
            assert!(!problem.detail.contains(&String::from_utf8_lossy(secret).to_string()), "{}", problem.detail);
        }

        let mut tampered = eab.clone();
        tampered["signature"] = json!(b64::encode(&[0; 32]));
        let problem = verify_eab(&tampered, EAB_KEY, &jwk_of(&account), NEW_ACCOUNT_URL).expect_err("tampered MAC");
        assert_problem(&problem, ProblemType::Unauthorized, &["\"kid-eab-1\""]);
    }

    #[test]
    fn eab_rejects_wrong_url() {
        let account = AccountKey::generate(Algorithm::Es256);
        let eab = AccountKey::eab(EAB_KEY, EAB_KEY_ID, Algorithm::Hs256, &account, "https://ca.test/acme/new-order");
        let problem = verify_eab(&eab, EAB_KEY, &jwk_of(&account), NEW_ACCOUNT_URL).expect_err("wrong url");
        assert_problem(&problem, ProblemType::Malformed, &["\"https://ca.test/acme/new-order\"", NEW_ACCOUNT_URL]);
    }

    /// Builds an EAB with an arbitrary header and payload, MACed with `EAB_KEY`.
    fn eab_raw(header: &Value, payload: &Value) -> Value {
        let protected = b64::encode(header.to_string().as_bytes());
        let payload = b64::encode(payload.to_string().as_bytes());
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, EAB_KEY), format!("{protected}.{payload}").as_bytes());
        json!({"protected": protected, "payload": payload, "signature": b64::encode(tag.as_ref())})
    }

    #[test]
    fn eab_rejects_nonce() {
        let account = AccountKey::generate(Algorithm::Es256);
        let header = json!({"alg": "HS256", "kid": EAB_KEY_ID, "nonce": "eab-nonce", "url": NEW_ACCOUNT_URL});
        let eab = eab_raw(&header, &account.jwk());
        let problem = verify_eab(&eab, EAB_KEY, &jwk_of(&account), NEW_ACCOUNT_URL).expect_err("nonce");
        assert_problem(&problem, ProblemType::Malformed, &["\"nonce\"", "\"eab-nonce\""]);
    }

    #[test]
    fn eab_rejects_other_key_payload() {
        let account = AccountKey::generate(Algorithm::Es256);
        let stranger = AccountKey::generate(Algorithm::Es256);
        let eab = AccountKey::eab(EAB_KEY, EAB_KEY_ID, Algorithm::Hs256, &stranger, NEW_ACCOUNT_URL);
        let problem = verify_eab(&eab, EAB_KEY, &jwk_of(&account), NEW_ACCOUNT_URL).expect_err("other key");
        assert_problem(
            &problem,
            ProblemType::Malformed,
            &["not the account key", &stranger.thumbprint(), &account.thumbprint()],
        );

        let header = json!({"alg": "HS256", "kid": EAB_KEY_ID, "url": NEW_ACCOUNT_URL});
        let problem =
            verify_eab(&eab_raw(&header, &json!({"kty": "oct"})), EAB_KEY, &jwk_of(&account), NEW_ACCOUNT_URL)
                .expect_err("not a public key");
        assert_problem(&problem, ProblemType::BadPublicKey, &["external account binding payload", "\"oct\""]);
    }

    #[test]
    fn eab_rejects_signature_algorithms() {
        let account = AccountKey::generate(Algorithm::Es256);
        let header = json!({"alg": "ES256", "kid": EAB_KEY_ID, "url": NEW_ACCOUNT_URL});
        let problem = eab_key_id(&eab_raw(&header, &account.jwk())).expect_err("ES256 binding");
        assert_problem(&problem, ProblemType::BadSignatureAlgorithm, &["\"ES256\"", "HS256, HS384, HS512"]);

        let header = json!({"alg": "none", "kid": EAB_KEY_ID, "url": NEW_ACCOUNT_URL});
        let problem = eab_key_id(&eab_raw(&header, &account.jwk())).expect_err("none");
        assert_problem(&problem, ProblemType::BadSignatureAlgorithm, &["\"none\""]);
    }

    #[test]
    fn eab_rejects_jwk_and_missing_kid() {
        let account = AccountKey::generate(Algorithm::Es256);
        let header = json!({"alg": "HS256", "jwk": account.jwk(), "kid": EAB_KEY_ID, "url": NEW_ACCOUNT_URL});
        assert_problem(
            &eab_key_id(&eab_raw(&header, &account.jwk())).expect_err("jwk"),
            ProblemType::Malformed,
            &["\"jwk\""],
        );
        let header = json!({"alg": "HS256", "url": NEW_ACCOUNT_URL});
        assert_problem(
            &eab_key_id(&eab_raw(&header, &account.jwk())).expect_err("no kid"),
            ProblemType::Malformed,
            &["no \"kid\""],
        );
        assert_problem(
            &eab_key_id(&json!("binding")).expect_err("string"),
            ProblemType::Malformed,
            &["JSON object", "a string"],
        );
    }

    #[test]
    fn eab_rejects_empty_hmac_key() {
        let account = AccountKey::generate(Algorithm::Es256);
        let eab = AccountKey::eab(EAB_KEY, EAB_KEY_ID, Algorithm::Hs256, &account, NEW_ACCOUNT_URL);
        let problem = verify_eab(&eab, b"", &jwk_of(&account), NEW_ACCOUNT_URL).expect_err("empty key");
        assert_problem(&problem, ProblemType::ServerInternal, &["\"kid-eab-1\"", "empty"]);
    }
}
