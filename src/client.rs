//! Client commands: `sigil issue svid` and `sigil status`, over mTLS gRPC.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::cli::Target;
use crate::proto::admin_client::AdminClient;
use crate::proto::issuer_client::IssuerClient;
use crate::proto::{GetStatusRequest, SignX509SvidRequest};
use crate::setup::{certificates_to_pem, write_private};

/// `DIR/endpoints.json`, written by `sigil dev` once every node serves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoints {
    pub trust_domain: String,
    pub nodes: Vec<NodeEndpoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeEndpoint {
    pub id: u64,
    pub grpc: String,
    pub metrics: String,
}

/// Resolved connection settings.
#[derive(Debug, Clone)]
pub struct Connection {
    pub address: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Connection {
    /// Resolves a `--dev-dir` or `--server/--cert/--key/--ca` target.
    ///
    /// # Errors
    ///
    /// Fails when neither form is complete or endpoints.json cannot be read.
    pub fn from_target(target: &Target) -> anyhow::Result<Connection> {
        if let Some(dir) = &target.dev_dir {
            return Connection::from_dev_dir(dir);
        }
        match (&target.server, &target.cert, &target.key, &target.ca) {
            (Some(server), Some(cert), Some(key), Some(ca)) => {
                Ok(Connection { address: server.clone(), cert: cert.clone(), key: key.clone(), ca: ca.clone() })
            }
            _ => bail!("give --dev-dir DIR, or all of --server ADDR --cert FILE --key FILE --ca FILE"),
        }
    }

    /// Uses the first node and the admin credential of a `sigil dev` folder.
    ///
    /// # Errors
    ///
    /// Fails when endpoints.json is missing (is `sigil dev` running?) or lists no node.
    pub fn from_dev_dir(dir: &Path) -> anyhow::Result<Connection> {
        let path = dir.join("endpoints.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("read {} (is `sigil dev --dir {}` running?)", path.display(), dir.display()))?;
        let endpoints: Endpoints = serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let node = endpoints.nodes.first().with_context(|| format!("{} lists no node", path.display()))?;
        Ok(Connection {
            address: node.grpc.clone(),
            cert: dir.join("client/cert.pem"),
            key: dir.join("client/key.pem"),
            ca: dir.join("bundle.pem"),
        })
    }

    /// Opens an mTLS channel to the node.
    ///
    /// # Errors
    ///
    /// Names the file or address that failed.
    pub async fn connect(&self) -> anyhow::Result<Channel> {
        let read = |path: &Path| std::fs::read(path).with_context(|| format!("read {}", path.display()));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?));
        let uri = format!("https://{}", self.address);
        Endpoint::from_shared(uri.clone())
            .with_context(|| format!("invalid server address {:?}", self.address))?
            .tls_config(tls)
            .context("configure TLS")?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .with_context(|| format!("connect to {uri}"))
    }
}

/// Generates a key, requests an X509-SVID and writes svid.pem, svid.key and bundle.pem.
///
/// # Errors
///
/// Fails with the node's status message when the request is refused.
pub async fn issue_svid(
    target: &Target,
    spiffe_id: &str,
    dns: &[String],
    ttl: Option<Duration>,
    out: &Path,
) -> anyhow::Result<()> {
    let connection = Connection::from_target(target)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generate key")?;
    let csr = svid_csr(&key, spiffe_id, dns)?;
    let ttl_seconds = ttl.map(|t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX));

    let mut client = IssuerClient::new(connection.connect().await?);
    let response = client
        .sign_x509_svid(SignX509SvidRequest { csr, ttl_seconds })
        .await
        .map_err(|status| anyhow::anyhow!("request rejected by the node: {:?}: {}", status.code(), status.message()))?
        .into_inner();

    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let mut chain = vec![response.certificate];
    chain.extend(response.intermediates);
    std::fs::write(out.join("svid.pem"), certificates_to_pem(&chain)).context("write svid.pem")?;
    write_private(&out.join("svid.key"), key.serialize_pem().as_bytes())?;
    std::fs::write(out.join("bundle.pem"), certificates_to_pem(&response.trust_bundle)).context("write bundle.pem")?;
    let not_after = time::OffsetDateTime::from_unix_timestamp(response.not_after)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| response.not_after.to_string());
    println!("issued {spiffe_id} serial {} valid until {not_after}; wrote {}", response.serial, out.display());
    Ok(())
}

/// Builds a DER CSR with the SPIFFE ID as its URI SAN and the DNS names.
///
/// # Errors
///
/// Fails when a name cannot be encoded.
pub fn svid_csr(key: &rcgen::KeyPair, spiffe_id: &str, dns: &[String]) -> anyhow::Result<Vec<u8>> {
    let mut params = rcgen::CertificateParams::default();
    let uri = spiffe_id.try_into().with_context(|| format!("SPIFFE ID {spiffe_id:?} is not an ASCII URI"))?;
    params.subject_alt_names.push(rcgen::SanType::URI(uri));
    for name in dns {
        let dns_name = name.as_str().try_into().with_context(|| format!("DNS name {name:?} is not ASCII"))?;
        params.subject_alt_names.push(rcgen::SanType::DnsName(dns_name));
    }
    let csr = params.serialize_request(key).context("sign CSR")?;
    Ok(csr.der().to_vec())
}

/// Prints the node status as a table or JSON.
///
/// # Errors
///
/// Fails when the node cannot be reached or refuses the caller.
pub async fn status(target: &Target, json: bool) -> anyhow::Result<()> {
    let connection = Connection::from_target(target)?;
    let mut client = AdminClient::new(connection.connect().await?);
    let response = client
        .get_status(GetStatusRequest {})
        .await
        .map_err(|status| anyhow::anyhow!("request rejected by the node: {:?}: {}", status.code(), status.message()))?
        .into_inner();

    if json {
        println!("{}", serde_json::to_string_pretty(&status_json(&response))?);
        return Ok(());
    }
    println!("trust domain: {}", response.trust_domain);
    println!("ID   ROLE        READY  GRPC                      APPLIED     ISSUED  CA NOT AFTER");
    for node in &response.nodes {
        let not_after = node
            .ca
            .as_ref()
            .and_then(|ca| time::OffsetDateTime::from_unix_timestamp(ca.not_after).ok())
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_else(|| "-".to_owned());
        println!(
            "{:<4} {:<11} {:<6} {:<22} {:>10} {:>10}  {}",
            node.id, node.role, node.ready, node.grpc_address, node.applied_index, node.issued_total, not_after
        );
    }
    Ok(())
}

fn status_json(response: &crate::proto::GetStatusResponse) -> serde_json::Value {
    let nodes: Vec<serde_json::Value> = response
        .nodes
        .iter()
        .map(|node| {
            serde_json::json!({
                "id": node.id,
                "role": node.role,
                "ready": node.ready,
                "grpc": node.grpc_address,
                "applied_index": node.applied_index,
                "ledger_digest": node.ledger_digest,
                "issued_total": node.issued_total,
                "version": node.version,
                "uptime_seconds": node.uptime_seconds,
                "ca": node.ca.as_ref().map(|ca| serde_json::json!({
                    "subject": ca.subject,
                    "key_label": ca.key_label,
                    "key_type": ca.key_type,
                    "not_after": ca.not_after,
                    "fingerprint_sha256": ca.fingerprint_sha256,
                    "version": ca.version,
                })),
                "hsm": node.hsm.as_ref().map(|hsm| serde_json::json!({
                    "token_label": hsm.token_label,
                    "token_serial": hsm.token_serial,
                    "manufacturer": hsm.manufacturer,
                    "model": hsm.model,
                    "sessions": hsm.sessions,
                })),
            })
        })
        .collect();
    serde_json::json!({ "trust_domain": response.trust_domain, "nodes": nodes })
}
