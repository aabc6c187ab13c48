//! Test servers on loopback addresses: HTTP (optionally over TLS), a TLS
//! server for tls-alpn-01 and a UDP DNS responder. Each server stops when
//! its handle is dropped, and every connection task ends within
//! [`CONNECTION_LIMIT`] or with the test's runtime.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, SOA, TXT};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use rcgen::{CertificateParams, CustomExtension, KeyPair, SanType};
use ring::digest::{SHA256, digest};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedProtocolVersion};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::validation::{ResolverSetting, ValidationSettings, Validator};

/// A challenge token from RFC 8555, section 8.3.
pub(super) const TOKEN: &str = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA";

/// The key authorization of [`TOKEN`] for a made-up account thumbprint.
pub(super) const KEY_AUTHORIZATION: &str =
    "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA.nP1qzpXGymHBrUEepNY9HCsQk7K8KhOypzEt62jcerQ";

/// The path http-01 requests for [`TOKEN`].
pub(super) const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA";

/// Maximum lifetime of one connection task of the HTTP and TLS servers.
const CONNECTION_LIMIT: Duration = Duration::from_secs(30);

/// Settings for tests: private addresses allowed (everything runs on
/// loopback), a 5 s timeout and a pool larger than any test needs.
pub(super) fn settings(http01_port: u16, tls_alpn01_port: u16, resolver: ResolverSetting) -> ValidationSettings {
    ValidationSettings {
        http01_port,
        tls_alpn01_port,
        resolver,
        allow_private_addresses: true,
        timeout: Duration::from_secs(5),
        workers: 4,
        queue: 8,
    }
}

/// Creates a validator that resolves every name to 127.0.0.1.
pub(super) fn loopback_validator(http01_port: u16, tls_alpn01_port: u16) -> Validator {
    let resolver = ResolverSetting::Fixed(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    Validator::new(settings(http01_port, tls_alpn01_port, resolver)).expect("test settings are valid")
}

/// base64url(SHA-256(key authorization)), the dns-01 TXT value.
pub(super) fn dns01_value(key_authorization: &str) -> String {
    URL_SAFE_NO_PAD.encode(digest(&SHA256, key_authorization.as_bytes()))
}

/// SHA-256(key authorization), the tls-alpn-01 extension value.
pub(super) fn sha256(key_authorization: &str) -> [u8; 32] {
    let mut out = [0_u8; 32];
    out.copy_from_slice(digest(&SHA256, key_authorization.as_bytes()).as_ref());
    out
}

/// Binds one listener per address, all on the same port, so that a
/// redirect can move between hosts without leaving the allowed ports.
pub(super) async fn bind_same_port(addresses: &[Ipv4Addr]) -> Vec<TcpListener> {
    for _attempt in 0..20 {
        let first = TcpListener::bind((addresses[0], 0)).await.expect("bind the first test listener");
        let port = first.local_addr().expect("listener address").port();
        let mut listeners = vec![first];
        for &address in &addresses[1..] {
            match TcpListener::bind((address, port)).await {
                Ok(listener) => listeners.push(listener),
                Err(_) => break,
            }
        }
        if listeners.len() == addresses.len() {
            return listeners;
        }
    }
    panic!("no port was free on all of {addresses:?} after 20 attempts");
}

/// Returns a port on 127.0.0.1 where nothing listens (bound, then closed).
pub(super) async fn closed_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind a test listener");
    listener.local_addr().expect("listener address").port()
}

/// The response of the test HTTP server to one request.
#[derive(Clone)]
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
    /// Delay before the response is sent.
    pub(super) delay: Duration,
}

impl Reply {
    pub(super) fn ok(body: impl Into<Vec<u8>>) -> Reply {
        Reply { status: 200, headers: Vec::new(), body: body.into(), delay: Duration::ZERO }
    }

    pub(super) fn status(status: u16) -> Reply {
        Reply { status, headers: Vec::new(), body: b"not here\n".to_vec(), delay: Duration::ZERO }
    }

    pub(super) fn redirect(status: u16, location: &str) -> Reply {
        let headers = vec![("Location".to_owned(), location.to_owned())];
        Reply { status, headers, body: Vec::new(), delay: Duration::ZERO }
    }

    pub(super) fn delayed(delay: Duration) -> Reply {
        Reply { delay, ..Reply::ok(KEY_AUTHORIZATION) }
    }
}

/// One request the test HTTP server received.
#[derive(Debug, Clone)]
pub(super) struct Seen {
    pub(super) path: String,
    pub(super) host: String,
    pub(super) at: Instant,
}

type Handler = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// An HTTP/1.1 server that records each request and responds with what a
/// handler returns for the request path.
pub(super) struct HttpServer {
    pub(super) address: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl HttpServer {
    pub(super) async fn start(handler: impl Fn(&str) -> Reply + Send + Sync + 'static) -> HttpServer {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind the test HTTP server");
        HttpServer::on(listener, None, handler)
    }

    /// Serves on `listener`, over TLS when `tls` is set.
    pub(super) fn on(
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        handler: impl Fn(&str) -> Reply + Send + Sync + 'static,
    ) -> HttpServer {
        let address = listener.local_addr().expect("listener address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let task_seen = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                let seen = task_seen.clone();
                let tls = tls.clone();
                tokio::spawn(tokio::time::timeout(CONNECTION_LIMIT, async move {
                    match tls {
                        None => serve_one(stream, &handler, &seen).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve_one(stream, &handler, &seen).await;
                            }
                        }
                    }
                }));
            }
        });
        HttpServer { address, seen, task }
    }

    pub(super) fn port(&self) -> u16 {
        self.address.port()
    }

    pub(super) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_one<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, handler: &Handler, seen: &Mutex<Vec<Seen>>) {
    let mut head = Vec::new();
    let mut buffer = [0_u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            return;
        }
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
    }

    let text = String::from_utf8_lossy(&head);
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let path = request_line.split(' ').nth(1).unwrap_or_default().to_owned();
    let host = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("host"))
        .map(|(_, value)| value.trim().to_owned())
        .unwrap_or_default();
    seen.lock().unwrap_or_else(PoisonError::into_inner).push(Seen { path: path.clone(), host, at: Instant::now() });

    let reply = handler(&path);
    tokio::time::sleep(reply.delay).await;
    let mut response =
        format!("HTTP/1.1 {} Test\r\nContent-Length: {}\r\nConnection: close\r\n", reply.status, reply.body.len());
    for (name, value) in &reply.headers {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("\r\n");
    let mut bytes = response.into_bytes();
    bytes.extend_from_slice(&reply.body);
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
}

/// A self-signed certificate and its key.
pub(super) struct TestCertificate {
    pub(super) der: CertificateDer<'static>,
    pub(super) key: PrivateKeyDer<'static>,
}

impl Clone for TestCertificate {
    fn clone(&self) -> TestCertificate {
        TestCertificate { der: self.der.clone(), key: self.key.clone_key() }
    }
}

/// Builds a self-signed certificate with these subjectAltName entries and
/// extra extensions.
pub(super) fn certificate(names: Vec<SanType>, extensions: Vec<CustomExtension>) -> TestCertificate {
    let key = KeyPair::generate().expect("generate a test key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty certificate parameters");
    params.subject_alt_names = names;
    params.custom_extensions = extensions;
    let certificate = params.self_signed(&key).expect("self-sign the test certificate");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    TestCertificate { der: certificate.der().clone(), key }
}

pub(super) fn dns_san(name: &str) -> SanType {
    SanType::DnsName(name.try_into().expect("valid test DNS name"))
}

/// Server names received in ClientHello messages, or "<none>" for a
/// ClientHello without SNI.
pub(super) type ServerNames = Arc<Mutex<Vec<String>>>;

/// Builds a rustls server configuration for one certificate, these ALPN
/// protocols and these TLS versions, and the list of server names it
/// receives. The
/// certificate is not parsed by webpki, which rejects the unknown critical
/// acmeIdentifier extension.
#[expect(deprecated, reason = "the validator's client uses ring, so the test servers do too")]
pub(super) fn server_config(
    certificate: TestCertificate,
    alpn: &[&[u8]],
    versions: &[&'static SupportedProtocolVersion],
) -> (Arc<ServerConfig>, ServerNames) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let signing_key = provider.key_provider.load_private_key(certificate.key).expect("load the test key");
    let server_names = ServerNames::default();
    let resolver = RecordingResolver {
        key: Arc::new(CertifiedKey::new(vec![certificate.der], signing_key)),
        server_names: server_names.clone(),
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("supported protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    (Arc::new(config), server_names)
}

/// Serves one certificate and records the SNI of each ClientHello. It
/// records before the handshake completes, so the name is in the list as
/// soon as the validator returns.
#[derive(Debug)]
struct RecordingResolver {
    key: Arc<CertifiedKey>,
    server_names: ServerNames,
}

impl ResolvesServerCert for RecordingResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = client_hello.server_name().unwrap_or("<none>").to_owned();
        self.server_names.lock().unwrap_or_else(PoisonError::into_inner).push(name);
        Some(self.key.clone())
    }
}

/// A TLS server that completes handshakes and closes the connections.
pub(super) struct TlsServer {
    pub(super) address: SocketAddr,
    server_names: ServerNames,
    task: JoinHandle<()>,
}

impl TlsServer {
    pub(super) async fn start(
        certificate: TestCertificate,
        alpn: &[&[u8]],
        versions: &[&'static SupportedProtocolVersion],
    ) -> TlsServer {
        let (config, server_names) = server_config(certificate, alpn, versions);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind the test TLS server");
        let address = listener.local_addr().expect("listener address");
        let acceptor = TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(tokio::time::timeout(CONNECTION_LIMIT, async move {
                    if let Ok(mut stream) = acceptor.accept(stream).await {
                        let _ = stream.shutdown().await;
                    }
                }));
            }
        });
        TlsServer { address, server_names, task }
    }

    pub(super) fn port(&self) -> u16 {
        self.address.port()
    }

    pub(super) fn server_names(&self) -> Vec<String> {
        self.server_names.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP DNS server for A and TXT records. Names are lowercase and end
/// with a dot; unknown names get NXDOMAIN.
pub(super) struct DnsServer {
    pub(super) address: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    task: JoinHandle<()>,
}

#[derive(Default, Clone)]
pub(super) struct Zone {
    pub(super) a: HashMap<String, Vec<Ipv4Addr>>,
    /// Each inner vector is one TXT record's character strings.
    pub(super) txt: HashMap<String, Vec<Vec<String>>>,
}

impl DnsServer {
    pub(super) async fn start(zone: Zone) -> DnsServer {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind the test DNS server");
        let address = socket.local_addr().expect("socket address");
        let zone = Arc::new(Mutex::new(zone));
        let task_zone = zone.clone();
        let task = tokio::spawn(async move {
            let mut buffer = [0_u8; 4096];
            loop {
                let Ok((length, client)) = socket.recv_from(&mut buffer).await else {
                    return;
                };
                let zone = task_zone.lock().unwrap_or_else(PoisonError::into_inner).clone();
                let Some(response) = answer(&zone, &buffer[..length]) else {
                    continue;
                };
                let _ = socket.send_to(&response, client).await;
            }
        });
        DnsServer { address, zone, task }
    }

    /// Replaces the records the server serves.
    pub(super) fn set_zone(&self, zone: Zone) {
        *self.zone.lock().unwrap_or_else(PoisonError::into_inner) = zone;
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(zone: &Zone, request: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(request).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(request.metadata.id, OpCode::Query);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.authoritative = true;
    if request.edns.is_some() {
        response.set_edns(Edns::new());
    }

    for query in &request.queries {
        response.add_query(query.clone());
        let name = query.name().to_ascii().to_ascii_lowercase();
        let known = zone.a.contains_key(&name) || zone.txt.contains_key(&name);
        if !known {
            // The SOA lets a resolver cache the negative answer for an hour
            // (RFC 2308), which the validator must not do.
            response.metadata.response_code = ResponseCode::NXDomain;
            let soa = SOA::new(Name::root(), Name::root(), 1, 3600, 600, 86400, 3600);
            response.add_authority(Record::from_rdata(Name::root(), 3600, RData::SOA(soa)));
            continue;
        }
        match query.query_type() {
            RecordType::A => {
                for address in zone.a.get(&name).into_iter().flatten() {
                    let record = Record::from_rdata(query.name().clone(), 60, RData::A(A(*address)));
                    response.add_answer(record);
                }
            }
            RecordType::TXT => {
                for strings in zone.txt.get(&name).into_iter().flatten() {
                    let record = Record::from_rdata(query.name().clone(), 60, RData::TXT(TXT::new(strings.clone())));
                    response.add_answer(record);
                }
            }
            _ => {}
        }
    }
    response.to_vec().ok()
}
