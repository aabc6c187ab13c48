//! Harness for the SPIRE plugin tests: starts `sigil-spire-plugin` as SPIRE's plugin loader does,
//! talks to it over its Unix socket with go-plugin's and SPIRE's gRPC services, and checks what
//! it returns the way SPIRE checks an upstream CA.
//!
//! The message types are written here from the proto files, so the tests also check the field
//! numbers the plugin uses on the wire.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::Uri;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

use crate::common::sigil_bin;

/// go-plugin's host waits one minute for the handshake line, and the tests allow 30 s.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// SPIRE's message types and go-plugin's, with the field numbers of the proto files.
pub mod wire {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ConnInfo {
        #[prost(uint32, tag = "1")]
        pub service_id: u32,
        #[prost(string, tag = "2")]
        pub network: String,
        #[prost(string, tag = "3")]
        pub address: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Empty {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StdioData {
        #[prost(int32, tag = "1")]
        pub channel: i32,
        #[prost(bytes = "vec", tag = "2")]
        pub data: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HealthCheckRequest {
        #[prost(string, tag = "1")]
        pub service: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct HealthCheckResponse {
        /// 1 is SERVING.
        #[prost(int32, tag = "1")]
        pub status: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InitRequest {
        #[prost(string, repeated, tag = "1")]
        pub host_service_names: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct InitResponse {
        #[prost(string, repeated, tag = "1")]
        pub plugin_service_names: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct CoreConfiguration {
        #[prost(string, tag = "1")]
        pub trust_domain: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ConfigureRequest {
        #[prost(message, optional, tag = "1")]
        pub core_configuration: Option<CoreConfiguration>,
        #[prost(string, tag = "2")]
        pub hcl_configuration: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValidateResponse {
        #[prost(bool, tag = "1")]
        pub valid: bool,
        #[prost(string, repeated, tag = "2")]
        pub notes: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct X509Certificate {
        #[prost(bytes = "vec", tag = "1")]
        pub asn1: Vec<u8>,
        #[prost(bool, tag = "2")]
        pub tainted: bool,
    }

    #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, prost::Message)]
    pub struct JwtKey {
        #[prost(bytes = "vec", tag = "1")]
        pub public_key: Vec<u8>,
        #[prost(string, tag = "2")]
        pub key_id: String,
        #[prost(int64, tag = "3")]
        pub expires_at: i64,
        #[prost(bool, tag = "4")]
        pub tainted: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MintX509CaRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub csr: Vec<u8>,
        #[prost(int32, tag = "2")]
        pub preferred_ttl: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct MintX509CaResponse {
        #[prost(message, repeated, tag = "1")]
        pub x509_ca_chain: Vec<X509Certificate>,
        #[prost(message, repeated, tag = "2")]
        pub upstream_x509_roots: Vec<X509Certificate>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PublishJwtKeyRequest {
        #[prost(message, optional, tag = "1")]
        pub jwt_key: Option<JwtKey>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PublishJwtKeyResponse {
        #[prost(message, repeated, tag = "1")]
        pub upstream_jwt_keys: Vec<JwtKey>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SubscribeToLocalBundleResponse {
        #[prost(message, repeated, tag = "1")]
        pub upstream_x509_roots: Vec<X509Certificate>,
        #[prost(message, repeated, tag = "2")]
        pub upstream_jwt_keys: Vec<JwtKey>,
    }
}

use wire::{
    ConfigureRequest, ConnInfo, CoreConfiguration, Empty, HealthCheckRequest, HealthCheckResponse, InitRequest,
    InitResponse, JwtKey, MintX509CaRequest, MintX509CaResponse, PublishJwtKeyRequest, PublishJwtKeyResponse,
    StdioData, SubscribeToLocalBundleResponse, ValidateResponse,
};

/// Returns the plugin binary, built next to the `sigil` binary by `cargo build --workspace --bins`.
pub fn plugin_bin() -> PathBuf {
    let sigil = sigil_bin();
    let folder = sigil.parent().expect("the sigil binary is in a folder");
    let plugin = folder.join("sigil-spire-plugin");
    assert!(
        plugin.exists(),
        "{} is missing; build it with `cargo build --release --workspace --bins`",
        plugin.display()
    );
    plugin
}

/// Sets the environment go-plugin gives a plugin that SPIRE launches.
pub fn spire_environment(command: &mut Command) -> &mut Command {
    command
        .env("UpstreamAuthority", "UpstreamAuthority")
        .env("PLUGIN_MIN_PORT", "10000")
        .env("PLUGIN_MAX_PORT", "25000")
        .env("PLUGIN_PROTOCOL_VERSIONS", "1")
}

/// Standard output text of the plugin, collected by a background thread.
#[derive(Clone, Default)]
pub struct Collected(Arc<Mutex<String>>);

impl Collected {
    pub fn text(&self) -> String {
        self.0.lock().expect("collected output lock").clone()
    }
}

/// Reads the first line of `stdout` within the handshake timeout and keeps collecting the rest.
pub fn read_handshake(stdout: impl std::io::Read + Send + 'static) -> (String, Collected) {
    let (sender, receiver) = std::sync::mpsc::channel();
    let rest = Collected::default();
    let collected = rest.clone();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = sender.send(line);
        let mut remainder = String::new();
        let _ = reader.read_to_string(&mut remainder);
        collected.0.lock().expect("collected output lock").push_str(&remainder);
    });
    let line = receiver.recv_timeout(HANDSHAKE_TIMEOUT).expect("the plugin printed no handshake line within 30 s");
    (line, rest)
}

/// Returns the socket path of a handshake line `1|1|unix|PATH|grpc`, after checking its fields.
pub fn socket_of_handshake(line: &str) -> PathBuf {
    let fields: Vec<&str> = line.trim_end_matches('\n').split('|').collect();
    assert_eq!(fields.len(), 5, "handshake line {line:?} does not have 5 fields");
    assert_eq!(fields[0], "1", "core protocol version in {line:?}");
    assert_eq!(fields[1], "1", "app protocol version in {line:?}");
    assert_eq!(fields[2], "unix", "network type in {line:?}");
    assert_eq!(fields[4], "grpc", "protocol in {line:?}");
    PathBuf::from(fields[3])
}

/// A plugin process started as SPIRE starts it. Dropping it stops the process.
pub struct Plugin {
    child: Child,
    pub socket: PathBuf,
    pub handshake: String,
    pub stdout_rest: Collected,
    log_dir: tempfile::TempDir,
    channel: Channel,
    /// Keeps the broker stream open, as go-plugin's host does.
    broker: Option<mpsc::Sender<ConnInfo>>,
}

impl Plugin {
    /// Starts the plugin, reads its handshake line and dials its socket.
    pub async fn launch() -> Plugin {
        let log_dir = tempfile::tempdir().expect("create temporary folder");
        let log = std::fs::File::create(log_dir.path().join("plugin.log")).expect("create plugin.log");
        let mut command = Command::new(plugin_bin());
        spire_environment(&mut command).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        let mut child = command.spawn().expect("start sigil-spire-plugin");
        let stdout = child.stdout.take().expect("piped standard output");
        let (handshake, stdout_rest) = read_handshake(stdout);
        let socket = socket_of_handshake(&handshake);
        let channel = unix_channel(&socket).await;
        Plugin { child, socket, handshake, stdout_rest, log_dir, channel, broker: None }
    }

    /// Returns the plugin's standard error: its hclog JSON lines.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_dir.path().join("plugin.log")).unwrap_or_default()
    }

    /// Returns the log lines parsed as JSON. A line that is not JSON fails the test.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|error| panic!("log line {line:?} is not JSON: {error}"))
            })
            .collect()
    }

    /// Opens go-plugin's broker stream and sends the host service address for service 1, as
    /// SPIRE does when it dispenses the plugin.
    pub async fn open_broker(&mut self) {
        let (sender, receiver) = mpsc::channel(4);
        let first = ConnInfo { service_id: 1, network: "unix".into(), address: "/tmp/spire-host-services.sock".into() };
        sender.send(first).await.expect("queue ConnInfo");
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready().await.expect("plugin channel ready");
        let codec = tonic_prost::ProstCodec::<ConnInfo, ConnInfo>::default();
        let path = PathAndQuery::from_static("/plugin.GRPCBroker/StartStream");
        let response = grpc
            .streaming(tonic::Request::new(ReceiverStream::new(receiver)), path, codec)
            .await
            .expect("broker StartStream accepted");
        // The response stream stays open, and a task drains it so the plugin never blocks on it.
        let mut incoming: Streaming<ConnInfo> = response.into_inner();
        tokio::spawn(async move { while let Ok(Some(_)) = incoming.message().await {} });
        self.broker = Some(sender);
    }

    pub async fn health(&self, service: &str) -> Result<HealthCheckResponse, Status> {
        let request = HealthCheckRequest { service: service.to_owned() };
        unary(&self.channel, "/grpc.health.v1.Health/Check", request).await
    }

    pub async fn stdio(&self) -> Result<Streaming<StdioData>, Status> {
        server_streaming(&self.channel, "/plugin.GRPCStdio/StreamStdio", Empty {}).await
    }

    pub async fn init(&self) -> Result<InitResponse, Status> {
        let request = InitRequest {
            host_service_names: vec![
                "spire.hostservice.server.identityprovider.v1.IdentityProvider".to_owned(),
                "spire.hostservice.common.metrics.v1.Metrics".to_owned(),
            ],
        };
        unary(&self.channel, "/spire.service.private.init.v1.Init/Init", request).await
    }

    pub async fn deinit(&self) -> Result<Empty, Status> {
        unary(&self.channel, "/spire.service.private.init.v1.Init/Deinit", Empty {}).await
    }

    pub async fn configure(&self, trust_domain: &str, hcl: &str) -> Result<Empty, Status> {
        let request = configure_request(trust_domain, hcl);
        unary(&self.channel, "/spire.service.common.config.v1.Config/Configure", request).await
    }

    pub async fn validate(&self, trust_domain: &str, hcl: &str) -> Result<ValidateResponse, Status> {
        let request = configure_request(trust_domain, hcl);
        unary(&self.channel, "/spire.service.common.config.v1.Config/Validate", request).await
    }

    pub async fn mint(&self, csr: Vec<u8>, preferred_ttl: i32) -> Result<Streaming<MintX509CaResponse>, Status> {
        let request = MintX509CaRequest { csr, preferred_ttl };
        let path = "/spire.plugin.server.upstreamauthority.v1.UpstreamAuthority/MintX509CAAndSubscribe";
        server_streaming(&self.channel, path, request).await
    }

    pub async fn publish(&self, key: JwtKey) -> Result<Streaming<PublishJwtKeyResponse>, Status> {
        let request = PublishJwtKeyRequest { jwt_key: Some(key) };
        let path = "/spire.plugin.server.upstreamauthority.v1.UpstreamAuthority/PublishJWTKeyAndSubscribe";
        server_streaming(&self.channel, path, request).await
    }

    pub async fn subscribe(&self) -> Result<Streaming<SubscribeToLocalBundleResponse>, Status> {
        let path = "/spire.plugin.server.upstreamauthority.v1.UpstreamAuthority/SubscribeToLocalBundle";
        server_streaming(&self.channel, path, Empty {}).await
    }

    pub async fn shutdown(&self) -> Result<Empty, Status> {
        unary(&self.channel, "/plugin.GRPCController/Shutdown", Empty {}).await
    }

    /// Waits up to `limit` for the process to exit and returns its status.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Plugin {
    /// Stops the plugin with SIGTERM, so it removes its socket folder, and kills it if it still
    /// runs after go-plugin's 2 second grace period.
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn configure_request(trust_domain: &str, hcl: &str) -> ConfigureRequest {
    ConfigureRequest {
        core_configuration: Some(CoreConfiguration { trust_domain: trust_domain.to_owned() }),
        hcl_configuration: hcl.to_owned(),
    }
}

/// Formats `plugin_data` as SPIRE prints it: HCL version 1 with quoted keys.
pub fn plugin_data(endpoints: &[String], credential: &Path) -> String {
    let list: Vec<String> = endpoints.iter().map(|endpoint| format!("\"{endpoint}\"")).collect();
    format!(
        "\"endpoints\" = [{}]\n\"client_cert_path\" = \"{}\"\n\"client_key_path\" = \"{}\"\n\"bundle_path\" = \"{}\"\n",
        list.join(", "),
        credential.join("cert.pem").display(),
        credential.join("key.pem").display(),
        credential.join("bundle.pem").display()
    )
}

/// Connects to a Unix socket the way go-plugin's host does: plaintext HTTP/2 with a placeholder
/// authority.
pub async fn unix_channel(socket: &Path) -> Channel {
    Endpoint::from_static("http://unused")
        .connect_with_connector(UnixConnector(socket.to_owned()))
        .await
        .unwrap_or_else(|error| panic!("connect to {}: {error}", socket.display()))
}

#[derive(Clone)]
struct UnixConnector(PathBuf);

impl tonic::codegen::Service<Uri> for UnixConnector {
    type Response = TokioIo<UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(UnixStream::connect(path).await?)) })
    }
}

async fn unary<Req, Res>(channel: &Channel, path: &'static str, request: Req) -> Result<Res, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Res: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|error| Status::unavailable(format!("channel not ready: {error}")))?;
    let codec = tonic_prost::ProstCodec::<Req, Res>::default();
    let response = grpc.unary(tonic::Request::new(request), PathAndQuery::from_static(path), codec).await?;
    Ok(response.into_inner())
}

async fn server_streaming<Req, Res>(
    channel: &Channel,
    path: &'static str,
    request: Req,
) -> Result<Streaming<Res>, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Res: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|error| Status::unavailable(format!("channel not ready: {error}")))?;
    let codec = tonic_prost::ProstCodec::<Req, Res>::default();
    let path = PathAndQuery::from_static(path);
    let response = grpc.server_streaming(tonic::Request::new(request), path, codec).await?;
    Ok(response.into_inner())
}

/// Waits up to `limit` for the next message of a stream. Returns None when none arrived in time,
/// and fails the test when the stream ended or failed.
pub async fn next_within<T>(stream: &mut Streaming<T>, limit: Duration, stream_name: &str) -> Option<T> {
    match tokio::time::timeout(limit, stream.message()).await {
        Err(_) => None,
        Ok(Ok(Some(message))) => Some(message),
        Ok(Ok(None)) => panic!("{stream_name}: the plugin ended the stream"),
        Ok(Err(status)) => panic!("{stream_name}: the stream failed with {:?}: {}", status.code(), status.message()),
    }
}

/// Makes a CSR shaped like SPIRE's for a new X.509 CA: a P-256 key, subject C=US, O=SPIFFE with
/// a serialNumber attribute, and the trust domain's ID as the only URI SAN.
pub fn spire_csr(trust_domain: &str) -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate key");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CountryName, "US");
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "SPIFFE");
    // serialNumber, OID 2.5.4.5; SPIRE puts a fresh serial there.
    params.distinguished_name.push(rcgen::DnType::CustomDnType(vec![2, 5, 4, 5]), "240516095213717236125");
    let uri = format!("spiffe://{trust_domain}").try_into().expect("ASCII URI");
    params.subject_alt_names.push(rcgen::SanType::URI(uri));
    let csr = params.serialize_request(&key).expect("sign CSR");
    (key, csr.der().to_vec())
}

/// Signs a throw-away leaf `spiffe://<td>/spire/throwaway` under the minted CA with the CSR's
/// key, as SPIRE does before it accepts a CA. Returns the leaf DER and its PKCS#8 key.
pub fn throwaway_leaf(trust_domain: &str, ca_der: &[u8], ca_key: &rcgen::KeyPair) -> (Vec<u8>, Vec<u8>) {
    let ca = rustls_pki_types::CertificateDer::from(ca_der.to_vec());
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca, ca_key).expect("minted CA is usable as an rcgen issuer");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate key");
    let mut params = rcgen::CertificateParams::default();
    let uri = format!("spiffe://{trust_domain}/spire/throwaway").try_into().expect("ASCII URI");
    params.subject_alt_names.push(rcgen::SanType::URI(uri));
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::minutes(10);
    let leaf = params.signed_by(&key, &issuer).expect("sign throw-away leaf");
    (leaf.der().to_vec(), key.serialize_der())
}

/// Makes a JWT key as SPIRE publishes it: a fresh P-256 public key, PKIX DER.
pub fn spire_jwt_key(key_id: &str) -> JwtKey {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate key");
    let expires_at = time::OffsetDateTime::now_utc().unix_timestamp() + 86_400;
    JwtKey {
        public_key: rcgen::PublicKeyData::subject_public_key_info(&key),
        key_id: key_id.to_owned(),
        expires_at,
        tainted: false,
    }
}

/// Returns SPIRE's upstream roots as a map from the SHA-256 fingerprint of each root's DER
/// (lower-case hex, as Sigil's admin API prints it) to its tainted flag. A root listed twice
/// fails the test, because SPIRE would receive an ambiguous set.
pub fn root_taint_by_fingerprint(roots: &[wire::X509Certificate]) -> BTreeMap<String, bool> {
    let mut flags = BTreeMap::new();
    for root in roots {
        let fingerprint = sha256_hex(&root.asn1);
        let repeated = flags.insert(fingerprint.clone(), root.tainted);
        assert!(repeated.is_none(), "root {fingerprint} is listed twice");
    }
    flags
}

/// Returns the SHA-256 of `der` in lower-case hex.
pub fn sha256_hex(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// Returns the key IDs of a list of JWT keys, sorted.
pub fn key_ids(keys: &[JwtKey]) -> Vec<String> {
    let mut ids: Vec<String> = keys.iter().map(|key| key.key_id.clone()).collect();
    ids.sort();
    ids
}

/// Writes DER certificates as one PEM file.
pub fn write_pem(path: &Path, certificates: &[&[u8]]) {
    let text: String =
        certificates.iter().map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))).collect();
    std::fs::write(path, text).unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
}

/// Runs `openssl verify` on `leaf` with `roots` as trust anchors and `untrusted` as intermediates,
/// and returns whether it succeeded and what it printed.
pub fn openssl_verify(dir: &Path, name: &str, roots: &[&[u8]], untrusted: &[&[u8]], leaf: &[u8]) -> (bool, String) {
    let roots_path = dir.join(format!("{name}-roots.pem"));
    let untrusted_path = dir.join(format!("{name}-untrusted.pem"));
    let leaf_path = dir.join(format!("{name}-leaf.pem"));
    write_pem(&roots_path, roots);
    write_pem(&leaf_path, &[leaf]);
    let mut command = Command::new("openssl");
    command.arg("verify").arg("-CAfile").arg(&roots_path);
    if !untrusted.is_empty() {
        write_pem(&untrusted_path, untrusted);
        command.arg("-untrusted").arg(&untrusted_path);
    }
    let output = command.arg(&leaf_path).stdin(Stdio::null()).output().expect("run openssl verify");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// Returns a loopback address on which nothing listens: a port the kernel just handed out and
/// that was closed again.
pub fn closed_loopback_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let address = listener.local_addr().expect("local address");
    drop(listener);
    address.to_string()
}

/// Writes a client credential the plugin accepts at Configure: a self-signed CA as bundle and a
/// client certificate it issued for `spiffe_id`. Returns the folder.
pub fn write_test_credential(dir: &Path, spiffe_id: &str) -> PathBuf {
    let folder = dir.join("credential");
    std::fs::create_dir_all(&folder).expect("create credential folder");
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate key");
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("self-sign test CA");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names.push(rcgen::SanType::URI(spiffe_id.try_into().expect("ASCII URI")));
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let certificate = params.signed_by(&key, &ca).expect("sign client certificate");
    std::fs::write(folder.join("cert.pem"), certificate.pem()).expect("write cert.pem");
    std::fs::write(folder.join("key.pem"), key.serialize_pem()).expect("write key.pem");
    std::fs::write(folder.join("bundle.pem"), ca.pem()).expect("write bundle.pem");
    folder
}
