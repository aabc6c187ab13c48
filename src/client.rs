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
    /// The running members of the cluster.
    pub nodes: Vec<NodeEndpoint>,
    /// Nodes prepared with `sigil dev --standby` (token with the CA key, configuration, node
    /// certificate) but not started or added.
    #[serde(default)]
    pub standby: Vec<NodeEndpoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeEndpoint {
    pub id: u64,
    pub grpc: String,
    pub metrics: String,
    /// Address of the node's Raft listener.
    #[serde(default)]
    pub raft: String,
    /// URL of the node's ACME directory, when it serves ACME.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acme: Option<String>,
    /// The node's configuration file.
    #[serde(default)]
    pub config: Option<PathBuf>,
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
            return Connection::from_dev_dir(dir, target.node);
        }
        match (&target.server, &target.cert, &target.key, &target.ca) {
            (Some(server), Some(cert), Some(key), Some(ca)) => {
                Ok(Connection { address: server.clone(), cert: cert.clone(), key: key.clone(), ca: ca.clone() })
            }
            _ => bail!("give --dev-dir DIR, or all of --server ADDR --cert FILE --key FILE --ca FILE"),
        }
    }

    /// Uses one node (the first unless `node` names another) and the admin credential of a
    /// `sigil dev` folder.
    ///
    /// # Errors
    ///
    /// Fails when endpoints.json is missing (is `sigil dev` running?) or does not list the node.
    pub fn from_dev_dir(dir: &Path, node: Option<u64>) -> anyhow::Result<Connection> {
        let all = Connection::all_from_dev_dir(dir)?;
        let path = dir.join("endpoints.json");
        let found = match node {
            Some(id) => all.into_iter().find(|(node_id, _)| *node_id == id),
            None => all.into_iter().next(),
        };
        found
            .map(|(_, connection)| connection)
            .with_context(|| format!("{} does not list node {}", path.display(), node.map_or(1, |id| id)))
    }

    /// Returns a connection to every node of a `sigil dev` folder, with its node id.
    ///
    /// # Errors
    ///
    /// Fails when endpoints.json is missing (is `sigil dev` running?) or lists no node.
    pub fn all_from_dev_dir(dir: &Path) -> anyhow::Result<Vec<(u64, Connection)>> {
        let path = dir.join("endpoints.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("read {} (is `sigil dev --dir {}` running?)", path.display(), dir.display()))?;
        let endpoints: Endpoints = serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        if endpoints.nodes.is_empty() {
            bail!("{} lists no node", path.display());
        }
        Ok(endpoints
            .nodes
            .iter()
            .map(|node| {
                let connection = Connection {
                    address: node.grpc.clone(),
                    cert: dir.join("client/cert.pem"),
                    key: dir.join("client/key.pem"),
                    ca: dir.join("bundle.pem"),
                };
                (node.id, connection)
            })
            .collect())
    }

    /// Opens an mTLS channel to the node.
    ///
    /// # Errors
    ///
    /// Names the file or address that failed.
    pub async fn connect(&self) -> anyhow::Result<Channel> {
        self.connect_with_timeout(Duration::from_secs(30)).await
    }

    /// Opens an mTLS channel to the node whose requests time out after `timeout`.
    ///
    /// # Errors
    ///
    /// Names the file or address that failed.
    pub async fn connect_with_timeout(&self, timeout: Duration) -> anyhow::Result<Channel> {
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
            .timeout(timeout + Duration::from_secs(10))
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

/// Prints the status of the target node, or of every node of a dev folder, as a table or JSON.
/// A node that cannot be reached is listed with the error.
///
/// # Errors
///
/// Fails when the target is incomplete, or no node responds.
pub async fn status(target: &Target, json: bool) -> anyhow::Result<()> {
    let connections = match (&target.dev_dir, target.node) {
        (Some(dir), None) => Connection::all_from_dev_dir(dir)?,
        _ => vec![(target.node.unwrap_or(0), Connection::from_target(target)?)],
    };
    let first_connection = connections.first().map(|(_, connection)| connection.clone());
    let queries = connections.into_iter().map(|(id, connection)| async move { (id, node_status(&connection).await) });
    let answers = futures_join_all(queries).await;
    let bundle = match &first_connection {
        Some(connection) => trust_bundle(connection).await.ok(),
        None => None,
    };

    let mut trust_domain = String::new();
    let mut nodes = Vec::new();
    let mut failures = Vec::new();
    for (id, answer) in answers {
        match answer {
            Ok(response) => {
                trust_domain = response.trust_domain;
                nodes.extend(response.nodes);
            }
            Err(error) => failures.push((id, format!("{error:#}"))),
        }
    }
    if nodes.is_empty() {
        let reasons: Vec<String> = failures.iter().map(|(id, error)| format!("node {id}: {error}")).collect();
        bail!("no node responded: {}", reasons.join("; "));
    }
    let response = crate::proto::GetStatusResponse { nodes, trust_domain };

    if json {
        let mut value = status_json(&response);
        if let (Some(bundle), Some(object)) = (&bundle, value.as_object_mut()) {
            object.insert("bundle".to_owned(), bundle_json(bundle));
        }
        if let Some(list) = value.get_mut("nodes").and_then(serde_json::Value::as_array_mut) {
            for (id, error) in &failures {
                list.push(serde_json::json!({ "id": id, "reachable": false, "ready": false, "error": error }));
            }
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("trust domain: {}", response.trust_domain);
    println!("ID   ROLE          TERM  READY  GRPC                   COMMIT   APPLIED   ISSUED  DIGEST");
    for node in &response.nodes {
        println!(
            "{:<4} {:<13} {:>4}  {:<6} {:<22} {:>7} {:>9} {:>8}  {}",
            node.id,
            node.role,
            node.term,
            node.ready,
            node.grpc_address,
            node.commit_index,
            node.applied_index,
            node.issued_total,
            node.ledger_digest.get(..16).unwrap_or(&node.ledger_digest)
        );
    }
    for (id, error) in &failures {
        println!("{id:<4} unreachable: {error}");
    }
    if let Some(bundle) = &bundle {
        print_bundle(bundle);
    }
    Ok(())
}

async fn trust_bundle(connection: &Connection) -> anyhow::Result<crate::proto::Bundle> {
    let mut client = crate::proto::authority_client::AuthorityClient::new(connection.connect().await?);
    let request = crate::proto::GetBundleRequest { trust_domain: String::new() };
    Ok(client.get_bundle(request).await?.into_inner())
}

fn root_fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

fn bundle_json(bundle: &crate::proto::Bundle) -> serde_json::Value {
    let roots: Vec<serde_json::Value> = bundle
        .x509_authorities
        .iter()
        .map(|root| serde_json::json!({ "sha256": root_fingerprint(&root.certificate), "tainted": root.tainted }))
        .collect();
    let jwt: Vec<serde_json::Value> = bundle
        .jwt_authorities
        .iter()
        .map(|key| serde_json::json!({ "key_id": key.key_id, "expires_at": key.expires_at, "tainted": key.tainted }))
        .collect();
    serde_json::json!({ "version": bundle.version, "x509_roots": roots, "jwt_authorities": jwt })
}

fn print_bundle(bundle: &crate::proto::Bundle) {
    println!("trust bundle (version {}):", bundle.version);
    for root in &bundle.x509_authorities {
        let mark = if root.tainted { "  TAINTED" } else { "" };
        println!("  root sha256 {}{mark}", root_fingerprint(&root.certificate));
    }
    println!("  JWT authorities: {}", bundle.jwt_authorities.len());
}

async fn node_status(connection: &Connection) -> anyhow::Result<crate::proto::GetStatusResponse> {
    let mut client = AdminClient::new(connection.connect().await?);
    let response = client
        .get_status(GetStatusRequest {})
        .await
        .map_err(|status| anyhow::anyhow!("request rejected by the node: {:?}: {}", status.code(), status.message()))?;
    Ok(response.into_inner())
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    for handle in handles {
        if let Ok(output) = handle.await {
            outputs.push(output);
        }
    }
    outputs
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
                "reachable": true,
                "term": node.term,
                "commit_index": node.commit_index,
                "applied_index": node.applied_index,
                "ledger_digest": node.ledger_digest,
                "leader_id": node.leader_id,
                "voters": node.voters,
                "learners": node.learners,
                "raft_address": node.raft_address,
                "halted": (!node.halted.is_empty()).then_some(&node.halted),
                "log_first_index": node.log_first_index,
                "snapshot_index": node.snapshot_index,
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

/// Runs a `sigil cluster` command against the target, or against the leader of a dev folder.
///
/// # Errors
///
/// Fails with the node's status message when the request is rejected.
/// Runs an `acme eab` command against a node.
///
/// # Errors
///
/// Fails when the node cannot be reached or refuses the request.
/// Runs `sigil ca rotate` and `sigil ca taint` against a running node.
///
/// # Errors
///
/// Fails when the node cannot be reached or rejects the request.
pub async fn ca_rotation(command: crate::cli::CaCommand) -> anyhow::Result<()> {
    use crate::cli::CaCommand;
    use crate::proto::{InstallCaVersionRequest, PrepareCaKeyRequest, RotateCaRequest, TaintCaRootRequest};

    let rejected = |status: tonic::Status| {
        anyhow::anyhow!("request rejected by the node: {:?}: {}", status.code(), status.message())
    };
    match command {
        CaCommand::Rotate { target, activate_after, validity, csr_out, intermediate, root, key_label } => {
            let mut client = AdminClient::new(Connection::from_target(&target)?.connect().await?);
            if let Some(path) = csr_out {
                let prepared = client.prepare_ca_key(PrepareCaKeyRequest {}).await.map_err(rejected)?.into_inner();
                std::fs::write(&path, &prepared.csr).with_context(|| format!("write CSR to {}", path.display()))?;
                println!("generated key {:?} in the HSM of node {}", prepared.key_label, prepared.node_id);
                println!("CSR written to {}", path.display());
                println!(
                    "have the offline root sign it, then run: sigil ca rotate --intermediate CERT --root ROOT --key-label {} \
                     (against node {})",
                    prepared.key_label, prepared.node_id
                );
                return Ok(());
            }
            let rotated = match (intermediate, root, key_label) {
                (Some(intermediate), Some(root), Some(key_label)) => {
                    let request = InstallCaVersionRequest {
                        key_label,
                        intermediates: crate::setup::read_pem_certificates(&intermediate)?,
                        roots: crate::setup::read_pem_certificates(&root)?,
                        activate_after_seconds: activate_after.as_secs().max(1),
                    };
                    client.install_ca_version(request).await.map_err(rejected)?.into_inner()
                }
                _ => {
                    let request = RotateCaRequest {
                        activate_after_seconds: activate_after.as_secs().max(1),
                        validity_seconds: validity.map_or(0, |validity| validity.as_secs()),
                    };
                    client.rotate_ca(request).await.map_err(rejected)?.into_inner()
                }
            };
            let activate_at = crate::audit::rfc3339_from_unix(rotated.activate_at).unwrap_or_default();
            println!("prepared CA version {}", rotated.version);
            println!("root SHA-256: {}", rotated.root_fingerprint_sha256);
            println!("signs from: {activate_at}");
        }
        CaCommand::Taint { target, fingerprint } => {
            let mut client = AdminClient::new(Connection::from_target(&target)?.connect().await?);
            let request = TaintCaRootRequest { root_fingerprint_sha256: fingerprint.clone() };
            let response = client.taint_ca_root(request).await.map_err(rejected)?.into_inner();
            println!("root {fingerprint} is tainted; CA version {} signs now", response.signing_version);
        }
        other => bail!("{other:?} is not a rotation command"),
    }
    Ok(())
}

pub async fn acme_eab(command: crate::cli::EabCommand) -> anyhow::Result<()> {
    use crate::cli::EabCommand;
    use crate::proto::{CreateAcmeEabKeyRequest, DeleteAcmeEabKeyRequest, ListAcmeEabKeysRequest};

    let rejected = |status: tonic::Status| {
        anyhow::anyhow!("request rejected by the node: {:?}: {}", status.code(), status.message())
    };
    match command {
        EabCommand::Add { target, label } => {
            let mut client = AdminClient::new(Connection::from_target(&target)?.connect().await?);
            let created =
                client.create_acme_eab_key(CreateAcmeEabKeyRequest { label }).await.map_err(rejected)?.into_inner();
            println!("key_id: {}", created.key_id);
            println!("hmac_key: {}", created.hmac_key);
            eprintln!(
                "The MAC key is shown only now; give both values to the ACME client (for example lego --eab --kid KEY_ID --hmac HMAC_KEY)."
            );
        }
        EabCommand::List { target, json } => {
            let mut client = AdminClient::new(Connection::from_target(&target)?.connect().await?);
            let keys = client.list_acme_eab_keys(ListAcmeEabKeysRequest {}).await.map_err(rejected)?.into_inner().keys;
            if json {
                let rows: Vec<serde_json::Value> = keys
                    .iter()
                    .map(|key| {
                        serde_json::json!({
                            "key_id": key.key_id,
                            "label": key.label,
                            "created_unix": key.created_unix,
                            "account": key.account,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<30} {:<24} {:<12} ACCOUNT", "KEY ID", "LABEL", "CREATED");
                for key in &keys {
                    let account = if key.account.is_empty() { "unused" } else { key.account.as_str() };
                    println!("{:<30} {:<24} {:<12} {account}", key.key_id, key.label, key.created_unix);
                }
            }
        }
        EabCommand::Remove { target, key_id } => {
            let mut client = AdminClient::new(Connection::from_target(&target)?.connect().await?);
            client.delete_acme_eab_key(DeleteAcmeEabKeyRequest { key_id: key_id.clone() }).await.map_err(rejected)?;
            println!("removed key {key_id}");
        }
    }
    Ok(())
}

pub async fn cluster(command: crate::cli::ClusterCommand) -> anyhow::Result<()> {
    use crate::cli::ClusterCommand;
    use crate::proto::{AddNodeRequest, IssueNodeCertificateRequest, RemoveNodeRequest};

    let rejected = |status: tonic::Status| {
        anyhow::anyhow!("request rejected by the node: {:?}: {}", status.code(), status.message())
    };
    match command {
        ClusterCommand::AddNode { target, id, raft_address, catch_up } => {
            let mut client = AdminClient::new(leader_connection(&target).await?.connect_with_timeout(catch_up).await?);
            let catch_up_seconds = u32::try_from(catch_up.as_secs()).unwrap_or(u32::MAX);
            let response = client
                .add_node(AddNodeRequest { node_id: id, raft_address, catch_up_seconds })
                .await
                .map_err(rejected)?
                .into_inner();
            println!("node {id} added; voters {:?}, learners {:?}", response.voters, response.learners);
        }
        ClusterCommand::RemoveNode { target, id } => {
            let mut client = AdminClient::new(leader_connection(&target).await?.connect().await?);
            let response = client.remove_node(RemoveNodeRequest { node_id: id }).await.map_err(rejected)?.into_inner();
            println!("node {id} removed; voters {:?}, learners {:?}", response.voters, response.learners);
        }
        ClusterCommand::NodeCertificate { target, id, out, dns, ip } => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generate node key")?;
            let public_key = rcgen::PublicKeyData::subject_public_key_info(&key);
            let mut client = AdminClient::new(Connection::from_target(&target)?.connect().await?);
            let response = client
                .issue_node_certificate(IssueNodeCertificateRequest {
                    node_id: id,
                    public_key,
                    dns_names: dns,
                    ip_addresses: ip.iter().map(ToString::to_string).collect(),
                })
                .await
                .map_err(rejected)?
                .into_inner();
            crate::node_tls::save(&out, &response.chain, &key.serialize_pem(), &response.roots)?;
            println!("issued the node certificate of node {id} into {}", out.display());
        }
    }
    Ok(())
}

/// Returns a connection to the target node or, for a dev folder without --node, to the node that
/// reports itself as leader.
async fn leader_connection(target: &Target) -> anyhow::Result<Connection> {
    let (Some(dir), None) = (&target.dev_dir, target.node) else {
        return Connection::from_target(target);
    };
    for (_, connection) in Connection::all_from_dev_dir(dir)? {
        if let Ok(response) = node_status(&connection).await
            && response.nodes.iter().any(|node| node.role == "leader")
        {
            return Ok(connection);
        }
    }
    bail!("no node of {} reports itself as the Raft leader", dir.display())
}
