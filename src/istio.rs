//! Istio's certificate API, `istio.v1.auth.IstioCertificateService`, as istio-agent calls it:
//! a PEM CSR for a workload identity, answered with the leaf first and the root last.
//!
//! The caller authenticates with its mTLS client certificate, and its policy entry decides which
//! SPIFFE IDs it may request (for example `spiffe://<td>/ns/*/sa/*` for an Istio cluster). The
//! requested validity is shortened to the caller's `max_ttl` rather than refused, as istio-agent
//! asks for its own `SECRET_TTL` and cannot retry with another.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::grpc::{request_context, status_from};
use crate::issuance::{Issuance, IssueError, PROFILE_ISTIO};
use crate::istio_proto::istio_certificate_service_server::IstioCertificateService;
use crate::istio_proto::{IstioCertificateRequest, IstioCertificateResponse};

/// Maximum number of request headers and metadata fields in one audit event.
const MAX_AUDITED_FIELDS: usize = 32;
/// Maximum length of an audited header or metadata value. Longer values are cut.
const MAX_AUDITED_VALUE: usize = 256;

/// Headers that are transport details or secrets, never audited. `authorization` carries
/// istio-agent's bearer token.
const UNAUDITED_HEADERS: &[&str] =
    &["authorization", "cookie", "content-type", "te", "user-agent", "x-request-id", "grpc-accept-encoding"];

/// Serves `istio.v1.auth.IstioCertificateService`.
pub struct IstioService {
    issuance: Arc<Issuance>,
}

impl IstioService {
    pub fn new(issuance: Arc<Issuance>) -> IstioService {
        IstioService { issuance }
    }

    /// Returns the lifetime to issue: the requested one, or the node default when none is given,
    /// cut to the caller's maximum.
    fn clamped_ttl(&self, caller: Option<&crate::spiffe_id::SpiffeId>, requested: i64) -> Result<i64, Status> {
        if requested < 0 {
            return Err(status_from(&IssueError::InvalidTtl {
                value: requested,
                reason: "validity_duration must not be negative (0 asks for the default)".to_owned(),
            }));
        }
        let default = i64::try_from(self.issuance.settings().default_ttl.as_secs()).unwrap_or(i64::MAX);
        let lifetime = if requested == 0 { default } else { requested };
        let max = caller
            .and_then(|caller| self.issuance.policy().max_ttl(caller))
            .map_or(lifetime, |max| i64::try_from(max.as_secs()).unwrap_or(i64::MAX));
        Ok(lifetime.min(max))
    }
}

/// Collects the request's headers and metadata fields for the audit event: headers as
/// `header.<name>`, metadata fields as `metadata.<key>`.
fn audited_fields<T>(request: &Request<T>, metadata: Option<&prost_types::Struct>) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    for entry in request.metadata().iter() {
        let tonic::metadata::KeyAndValueRef::Ascii(key, value) = entry else {
            continue;
        };
        let name = key.as_str();
        if UNAUDITED_HEADERS.contains(&name) || name.starts_with("grpc-") {
            continue;
        }
        fields.insert(format!("header.{name}"), cut(value.to_str().unwrap_or("(not printable)")));
    }
    for (key, value) in metadata.map(|metadata| &metadata.fields).into_iter().flatten() {
        fields.insert(format!("metadata.{key}"), cut(&struct_value_text(value)));
    }
    fields.into_iter().take(MAX_AUDITED_FIELDS).collect()
}

fn struct_value_text(value: &prost_types::Value) -> String {
    use prost_types::value::Kind;
    match &value.kind {
        Some(Kind::StringValue(text)) => text.clone(),
        Some(Kind::NumberValue(number)) => number.to_string(),
        Some(Kind::BoolValue(flag)) => flag.to_string(),
        Some(Kind::NullValue(_)) | None => String::new(),
        Some(Kind::StructValue(_)) => "(struct)".to_owned(),
        Some(Kind::ListValue(_)) => "(list)".to_owned(),
    }
}

fn cut(text: &str) -> String {
    match text.char_indices().nth(MAX_AUDITED_VALUE) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

fn pem(der: &[u8]) -> String {
    crate::setup::certificates_to_pem(std::iter::once(&der.to_vec()))
}

#[tonic::async_trait]
impl IstioCertificateService for IstioService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let context = request_context(&request);
        let fields = audited_fields(&request, request.get_ref().metadata.as_ref());
        let body = request.into_inner();
        let ttl = self.clamped_ttl(context.caller.as_ref().ok(), body.validity_duration)?;

        let issued = self
            .issuance
            .sign_svid(&context, body.csr.as_bytes(), Some(ttl), PROFILE_ISTIO, fields)
            .await
            .map_err(|error| status_from(&error))?;

        let mut cert_chain = vec![pem(&issued.leaf.der)];
        cert_chain.extend(issued.intermediates_der.iter().map(|der| pem(der)));
        // istio-agent takes the last entry as the root of trust, so exactly one root ends the list.
        let root = issued
            .roots_der
            .first()
            .ok_or_else(|| Status::failed_precondition("the CA has no root certificate to return"))?;
        cert_chain.push(pem(root));
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut() {
        let long = "x".repeat(MAX_AUDITED_VALUE + 10);
        let cut_value = cut(&long);
        assert_eq!(cut_value.len(), MAX_AUDITED_VALUE + 3);
        assert_eq!(cut("short"), "short");
    }

    #[test]
    fn secrets_and_transport_headers_are_not_audited() {
        let mut request = Request::new(());
        request.metadata_mut().insert("authorization", "Bearer secret-token".parse().expect("header"));
        request.metadata_mut().insert("clusterid", "Kubernetes".parse().expect("header"));
        request.metadata_mut().insert("grpc-timeout", "5S".parse().expect("header"));
        let mut metadata = prost_types::Struct::default();
        metadata.fields.insert(
            "CertSigner".to_owned(),
            prost_types::Value { kind: Some(prost_types::value::Kind::StringValue("signer-a".to_owned())) },
        );
        let fields = audited_fields(&request, Some(&metadata));
        assert_eq!(fields.get("header.clusterid").map(String::as_str), Some("Kubernetes"));
        assert_eq!(fields.get("metadata.CertSigner").map(String::as_str), Some("signer-a"));
        assert!(!fields.keys().any(|key| key.contains("authorization") || key.contains("grpc-")), "{fields:?}");
        assert!(!fields.values().any(|value| value.contains("secret-token")));
    }
}
