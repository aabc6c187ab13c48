//! Certificates: download (RFC 8555, section 7.4.2), revocation (section
//! 7.6) and renewal information (RFC 9773).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use serde::Deserialize;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use crate::accounts::conflict_to_retry;
use crate::issuer::Issuer;
use crate::orders::rfc3339;
use crate::problem::{Problem, ProblemType};
use crate::records::{self, CertRecord, Stored};
use crate::server::{AcmeServer, KeyRule, Signed};
use crate::store::{Store, Transaction};

/// A revoked certificate that has not expired, as a CRL lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RevokedCertificate {
    #[serde(with = "hex_bytes")]
    pub serial: Vec<u8>,
    /// RFC 5280 reason code.
    pub reason: u8,
    pub revoked_unix: i64,
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text: String = serde::Deserialize::deserialize(deserializer)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

/// Every revoked certificate whose record the store still holds, as applied
/// on this node. Entries expire with their certificates and drop out with
/// the store's purge.
pub fn revoked(store: &impl Store) -> Result<Vec<RevokedCertificate>, Problem> {
    let prefix = records::revoked_prefix();
    let mut revoked = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.scan(&prefix, after.as_deref(), 1000).map_err(records::store_problem)?;
        for (key, value) in &page {
            let entry: RevokedCertificate = serde_json::from_slice(&value.value).map_err(|error| {
                Problem::internal(format!("stored {} does not decode: {error}", String::from_utf8_lossy(key)))
            })?;
            revoked.push(entry);
        }
        match page.last() {
            Some((last, _)) if page.len() == 1000 => after = Some(last.clone()),
            _ => break,
        }
    }
    Ok(revoked)
}

/// Seconds clients should wait before asking for renewal information again.
const RENEWAL_INFO_RETRY_SECONDS: u32 = 6 * 3600;

#[derive(Debug, Deserialize)]
struct RevokePayload {
    certificate: String,
    #[serde(default)]
    reason: Option<u8>,
}

pub(crate) async fn certificate<S: Store, I: Issuer>(
    State(server): State<Arc<AcmeServer<S, I>>>,
    Path(id): Path<String>,
    request: Request,
) -> Response {
    let result = async {
        let signed = server.accept(request, KeyRule::Kid).await?;
        server.download(&id, 0, &signed)
    };
    server.finish(result.await)
}

pub(crate) async fn alternate<S: Store, I: Issuer>(
    State(server): State<Arc<AcmeServer<S, I>>>,
    Path((id, chain)): Path<(String, String)>,
    request: Request,
) -> Response {
    let result = async {
        let signed = server.accept(request, KeyRule::Kid).await?;
        let index = chain
            .parse::<usize>()
            .map_err(|_| Problem::malformed(format!("chain {chain:?} is not a number")).with_status(404))?;
        server.download(&id, index, &signed)
    };
    server.finish(result.await)
}

pub(crate) async fn revoke<S: Store, I: Issuer>(
    State(server): State<Arc<AcmeServer<S, I>>>,
    request: Request,
) -> Response {
    let result = async {
        let signed = server.accept(request, KeyRule::Either).await?;
        server.revoke_certificate(&signed).await
    };
    server.finish(result.await)
}

pub(crate) async fn renewal_info<S: Store, I: Issuer>(
    State(server): State<Arc<AcmeServer<S, I>>>,
    Path(id): Path<String>,
) -> Response {
    let result = server.certificate_by_ari_id(&id).map(|cert| server.renewal_window(&cert.record));
    server.finish(result)
}

impl<S: Store, I: Issuer> AcmeServer<S, I> {
    fn download(&self, id: &str, index: usize, signed: &Signed) -> Result<Response, Problem> {
        let account = signed.account()?;
        let url = self.url(&format!("/acme/cert/{id}"));
        let cert = records::read::<CertRecord>(&self.store, &records::cert_key(id))?
            .ok_or_else(|| Problem::malformed(format!("certificate {url} does not exist")).with_status(404))?;
        if cert.record.account != account.record.id {
            return Err(Problem::unauthorized(format!("certificate {url} belongs to another account")));
        }
        let chain = cert.record.chains_pem.get(index).ok_or_else(|| {
            Problem::malformed(format!(
                "certificate {url} has {} chains, not {}",
                cert.record.chains_pem.len(),
                index + 1
            ))
            .with_status(404)
        })?;

        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/pem-certificate-chain"));
        for other in (0..cert.record.chains_pem.len()).filter(|other| *other != index) {
            let target = if other == 0 { url.clone() } else { format!("{url}/{other}") };
            if let Ok(link) = HeaderValue::from_str(&format!("<{target}>;rel=\"alternate\"")) {
                headers.append(header::LINK, link);
            }
        }
        Ok(self.answer(StatusCode::OK, headers, Body::from(chain.clone())))
    }

    async fn revoke_certificate(&self, signed: &Signed) -> Result<Response, Problem> {
        let payload: RevokePayload = signed.jws.payload_json()?;
        let der = crate::b64::decode("certificate", &payload.certificate)?;
        let (_, parsed) = X509Certificate::from_der(&der)
            .map_err(|error| Problem::malformed(format!("certificate does not parse as DER X.509: {error}")))?;
        let serial = parsed.raw_serial().to_vec();
        let serial_hex = hex::encode(&serial);
        if let Some(reason) = payload.reason
            && (reason == 7 || reason > 10)
        {
            return Err(Problem::new(
                ProblemType::BadRevocationReason,
                format!("revocation reason {reason} is not allowed; use 0 to 6 or 8 to 10"),
            ));
        }

        let cert = self.certificate_by_serial(&serial)?.ok_or_else(|| {
            Problem::malformed(format!("certificate with serial {serial_hex} was not issued through this ACME server"))
                .with_status(404)
        })?;
        if !cert.record.chains_pem.first().is_some_and(|chain| chain_starts_with(chain, &der)) {
            return Err(Problem::malformed(format!(
                "certificate with serial {serial_hex} differs from the one issued"
            )));
        }
        self.authorize_revocation(signed, &cert.record, parsed.public_key().raw)?;
        if cert.record.revoked_reason.is_some() {
            return Err(Problem::new(
                ProblemType::AlreadyRevoked,
                format!("certificate with serial {serial_hex} is already revoked"),
            ));
        }

        let mut record = cert.record.clone();
        record.revoked_reason = Some(payload.reason.unwrap_or(0));
        let key = records::cert_key(&record.id);
        let entry =
            RevokedCertificate { serial, reason: payload.reason.unwrap_or(0), revoked_unix: crate::server::now_unix() };
        let transaction = Transaction::default()
            .when(key.clone(), cert.revision)
            .put(key, records::encode(&record), record.not_after_unix)
            .put(records::revoked_key(&entry.serial), records::encode(&entry), record.not_after_unix);
        self.store.commit(transaction).await.map_err(|error| conflict_to_retry(error, "certificate"))?;
        tracing::info!(serial = %serial_hex, reason = record.revoked_reason, "ACME certificate revoked");
        Ok(self.answer(StatusCode::OK, HeaderMap::new(), Body::empty()))
    }

    /// Allows the account that holds the certificate, or a request signed
    /// with the certificate's own key.
    fn authorize_revocation(&self, signed: &Signed, cert: &CertRecord, cert_spki: &[u8]) -> Result<(), Problem> {
        match &signed.account {
            Some(account) if account.record.id == cert.account => Ok(()),
            Some(account) => Err(Problem::unauthorized(format!(
                "account {} does not hold certificate with serial {}",
                self.account_url(&account.record.id),
                cert.serial_hex
            ))),
            None if signed.key.spki_der() == cert_spki => Ok(()),
            None => Err(Problem::unauthorized(format!(
                "the request's jwk is not the key of certificate with serial {}",
                cert.serial_hex
            ))),
        }
    }

    fn certificate_by_serial(&self, serial: &[u8]) -> Result<Option<Stored<CertRecord>>, Problem> {
        let Some(id) = self.store.get(&records::cert_serial_key(serial)).map_err(records::store_problem)? else {
            return Ok(None);
        };
        records::read(&self.store, &records::cert_key(&String::from_utf8_lossy(&id.value)))
    }

    /// Finds a certificate by its RFC 9773 identifier: base64url of the
    /// authority key identifier, a dot, base64url of the serial.
    pub(crate) fn certificate_by_ari_id(&self, certid: &str) -> Result<Stored<CertRecord>, Problem> {
        let (aki_text, serial_text) = certid
            .split_once('.')
            .ok_or_else(|| Problem::malformed(format!("certificate id {certid:?} is not <key identifier>.<serial>")))?;
        let aki = crate::b64::decode("certificate id key identifier", aki_text)?;
        let serial = crate::b64::decode("certificate id serial", serial_text)?;
        let not_found = || {
            Problem::malformed(format!("certificate id {certid:?} names no certificate of this server"))
                .with_status(404)
        };
        let cert = self.certificate_by_serial(&serial)?.ok_or_else(not_found)?;
        let leaf = leaf_der(&cert.record).ok_or_else(not_found)?;
        if authority_key_id(&leaf).as_deref() != Some(aki.as_slice()) {
            return Err(not_found());
        }
        Ok(cert)
    }

    fn renewal_window(&self, cert: &CertRecord) -> Response {
        let lifetime = (cert.not_after_unix - cert.not_before_unix) as f64;
        let (start_fraction, end_fraction) = self.settings.renewal_window;
        let (start, end) = if cert.revoked_reason.is_some() {
            // A revoked certificate should be replaced now.
            let now = crate::server::now_unix();
            (now - 60, now)
        } else {
            (
                cert.not_before_unix + (lifetime * start_fraction) as i64,
                cert.not_before_unix + (lifetime * end_fraction) as i64,
            )
        };
        let body = serde_json::json!({ "suggestedWindow": { "start": rfc3339(start), "end": rfc3339(end) } });
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, HeaderValue::from(RENEWAL_INFO_RETRY_SECONDS));
        self.json(StatusCode::OK, &body, headers)
    }
}

fn chain_starts_with(chain_pem: &str, der: &[u8]) -> bool {
    chain_pem.starts_with(&crate::orders::pem_certificate(der))
}

fn leaf_der(cert: &CertRecord) -> Option<Vec<u8>> {
    let chain = cert.chains_pem.first()?;
    let body: String = chain
        .lines()
        .skip_while(|line| !line.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|line| !line.starts_with("-----END"))
        .collect();
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

fn authority_key_id(der: &[u8]) -> Option<Vec<u8>> {
    let (_, parsed) = X509Certificate::from_der(der).ok()?;
    parsed.extensions().iter().find_map(|extension| match extension.parsed_extension() {
        ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref().map(|id| id.0.to_vec()),
        _ => None,
    })
}
