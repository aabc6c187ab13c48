//! The gRPC peer transport: Raft messages and snapshots between nodes over
//! mutually authenticated TLS.
//!
//! Each node keeps one long-lived `Send` stream to every peer and writes
//! batches of encoded messages into it; a broken stream is reopened with
//! backoff and the peer is reported unreachable, so Raft sends again.
//! Snapshot messages go on their own `SendSnapshot` call, after the files.
//! The TLS settings come from the application: [`PeerTls`] gives client
//! settings that accept only the expected node as the server, and the
//! server side names the calling node from its certificate.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::error::RaftError;
use crate::node::NodeHandle;
use crate::proto::raft_peer_client::RaftPeerClient;
use crate::proto::raft_peer_server::{RaftPeer, RaftPeerServer};
use crate::proto::{MessageBatch, SendReply, SnapshotChunk, SnapshotReply};
use crate::snapshot::{self, Chunk, SnapshotStore};

/// Batches queued for one peer before new ones are dropped.
const PEER_QUEUE: usize = 4096;
/// Most messages written to a stream in one batch.
const MAX_BATCH_MESSAGES: usize = 4096;
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// TLS settings for connections to peers, from the application.
pub trait PeerTls: Send + Sync + 'static {
    /// Client settings (with this node's certificate) that accept only
    /// node `peer` as the server.
    fn client_config(&self, peer: u64) -> Result<Arc<rustls::ClientConfig>, String>;

    /// Returns the name to send in SNI and check against the server certificate.
    fn server_name(&self, peer: u64) -> ServerName<'static>;

    /// Returns the node id of a caller, from its verified certificate chain.
    fn caller_node_id(&self, chain: Option<&[CertificateDer<'_>]>) -> Result<u64, String>;
}

/// What the transport reports back to the node.
trait Feedback: Send + Sync {
    fn unreachable(&self, peer: u64);
    fn snapshot_sent(&self, peer: u64, delivered: bool);
}

impl<O: Send + 'static> Feedback for NodeHandle<O> {
    fn unreachable(&self, peer: u64) {
        self.report_unreachable(peer);
    }

    fn snapshot_sent(&self, peer: u64, delivered: bool) {
        self.report_snapshot(peer, delivered);
    }
}

/// The client side of the transport.
pub struct GrpcTransport {
    id: u64,
    /// This node's Raft listener address, sent with every batch.
    address: String,
    /// Local address that connections to peers bind to, or None to let the OS choose.
    source: Option<IpAddr>,
    tls: Arc<dyn PeerTls>,
    runtime: tokio::runtime::Handle,
    snapshots: Arc<SnapshotStore>,
    feedback: Arc<OnceLock<Arc<dyn Feedback>>>,
    peers: Mutex<HashMap<u64, PeerQueue>>,
    errors: Arc<dyn Fn(u64) + Send + Sync>,
}

struct PeerQueue {
    address: String,
    queue: mpsc::Sender<Vec<Message>>,
    worker: tokio::task::JoinHandle<()>,
}

impl GrpcTransport {
    /// Creates the transport of node `id`. Connections to peers bind to
    /// `source` when it is set. `on_peer_error` is called with the peer id
    /// for every failed connection or stream, for metrics.
    pub fn new(
        id: u64,
        address: String,
        source: Option<IpAddr>,
        tls: Arc<dyn PeerTls>,
        snapshots: Arc<SnapshotStore>,
        runtime: tokio::runtime::Handle,
        on_peer_error: Arc<dyn Fn(u64) + Send + Sync>,
    ) -> Arc<GrpcTransport> {
        Arc::new(GrpcTransport {
            id,
            address,
            source,
            tls,
            runtime,
            snapshots,
            feedback: Arc::new(OnceLock::new()),
            peers: Mutex::new(HashMap::new()),
            errors: on_peer_error,
        })
    }

    /// Connects the transport to its node, for unreachable and snapshot
    /// reports. Reports before this are dropped.
    pub fn attach<O: Send + 'static>(&self, handle: NodeHandle<O>) {
        let _ = self.feedback.set(Arc::new(handle));
    }

    fn report_unreachable(&self, peer: u64) {
        if let Some(feedback) = self.feedback.get() {
            feedback.unreachable(peer);
        }
    }

    /// Records the address of a peer that called this node, unless the cluster configuration
    /// already gave one. The caller was authenticated as that node by its certificate.
    fn learn_peer(&self, peer: u64, address: &str) {
        if peer == self.id || address.is_empty() {
            return;
        }
        let mut peers = self.peers.lock();
        if let std::collections::hash_map::Entry::Vacant(entry) = peers.entry(peer) {
            tracing::info!(node_id = self.id, peer, address, "learned a Raft peer address from its messages");
            entry.insert(self.start_worker(peer, address.to_owned()));
        }
    }

    fn start_worker(&self, peer: u64, address: String) -> PeerQueue {
        let (queue, receiver) = mpsc::channel(PEER_QUEUE);
        let worker = PeerWorker {
            id: self.id,
            sender_address: self.address.clone(),
            peer,
            address: address.clone(),
            source: self.source,
            tls: Arc::clone(&self.tls),
            snapshots: Arc::clone(&self.snapshots),
            feedback: Arc::clone(&self.feedback),
            errors: Arc::clone(&self.errors),
        };
        let worker = self.runtime.spawn(worker.run(receiver));
        PeerQueue { address, queue, worker }
    }
}

impl crate::node::Transport for GrpcTransport {
    fn send(&self, messages: Vec<Message>) {
        let mut by_peer: BTreeMap<u64, Vec<Message>> = BTreeMap::new();
        for message in messages {
            by_peer.entry(message.to).or_default().push(message);
        }
        let mut unreachable = Vec::new();
        {
            let peers = self.peers.lock();
            for (peer, batch) in by_peer {
                match peers.get(&peer) {
                    Some(queue) => {
                        if queue.queue.try_send(batch).is_err() {
                            unreachable.push(peer);
                        }
                    }
                    None => {
                        tracing::debug!(node_id = self.id, peer, "no address for a Raft peer; message dropped");
                        unreachable.push(peer);
                    }
                }
            }
        }
        for peer in unreachable {
            self.report_unreachable(peer);
        }
    }

    fn set_peers(&self, addresses: &BTreeMap<u64, String>) {
        let mut peers = self.peers.lock();
        peers.retain(|id, queue| {
            let keep = addresses.get(id) == Some(&queue.address);
            if !keep {
                queue.worker.abort();
            }
            keep
        });
        for (id, address) in addresses {
            if *id != self.id && !peers.contains_key(id) {
                let queue = self.start_worker(*id, address.clone());
                peers.insert(*id, queue);
            }
        }
        tracing::info!(node_id = self.id, peers = ?addresses, "Raft peer addresses set");
    }
}

impl Drop for GrpcTransport {
    fn drop(&mut self) {
        for queue in self.peers.lock().values() {
            queue.worker.abort();
        }
    }
}

/// Sends everything queued for one peer.
struct PeerWorker {
    id: u64,
    sender_address: String,
    peer: u64,
    address: String,
    source: Option<IpAddr>,
    tls: Arc<dyn PeerTls>,
    snapshots: Arc<SnapshotStore>,
    feedback: Arc<OnceLock<Arc<dyn Feedback>>>,
    errors: Arc<dyn Fn(u64) + Send + Sync>,
}

impl PeerWorker {
    async fn run(self, mut queue: mpsc::Receiver<Vec<Message>>) {
        let mut backoff = BACKOFF_START;
        loop {
            let client = match self.connect() {
                Ok(client) => client,
                Err(error) => {
                    self.failed(&error);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            match self.stream(client, &mut queue).await {
                StreamEnd::QueueClosed => return,
                StreamEnd::Failed(error) => {
                    self.failed(&error);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                StreamEnd::Healthy => backoff = BACKOFF_START,
            }
        }
    }

    fn connect(&self) -> Result<RaftPeerClient<tonic::transport::Channel>, String> {
        let config = self.tls.client_config(self.peer)?;
        let server_name = self.tls.server_name(self.peer);
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.address))
            .map_err(|error| format!("peer address {:?}: {error}", self.address))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let address = self.address.clone();
        let source = self.source;
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let config = Arc::clone(&config);
            let server_name = server_name.clone();
            let address = address.clone();
            async move {
                let tcp = connect_tcp(&address, source).await?;
                tcp.set_nodelay(true)?;
                let tls = tokio_rustls::TlsConnector::from(config).connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let channel = endpoint.connect_with_connector_lazy(connector);
        Ok(RaftPeerClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20))
    }

    /// Opens a `Send` stream and feeds it until the queue closes or the
    /// stream fails.
    async fn stream(
        &self,
        mut client: RaftPeerClient<tonic::transport::Channel>,
        queue: &mut mpsc::Receiver<Vec<Message>>,
    ) -> StreamEnd {
        let (sender, receiver) = mpsc::channel::<MessageBatch>(64);
        let mut call_client = client.clone();
        let mut call = tokio::spawn(async move { call_client.send(ReceiverStream::new(receiver)).await });
        let mut sent_any = false;
        loop {
            tokio::select! {
                batch = queue.recv() => {
                    let Some(first) = batch else {
                        call.abort();
                        return StreamEnd::QueueClosed;
                    };
                    let (normal, snapshots) = self.collect(first, queue);
                    for message in snapshots {
                        self.send_snapshot(&mut client, message).await;
                    }
                    if normal.messages.is_empty() {
                        continue;
                    }
                    if sender.send(normal).await.is_err() {
                        call.abort();
                        return StreamEnd::Failed(format!("stream to node {} closed", self.peer));
                    }
                    sent_any = true;
                }
                result = &mut call => {
                    return match result {
                        Ok(Ok(_)) if sent_any => StreamEnd::Healthy,
                        Ok(Ok(_)) => StreamEnd::Failed(format!("node {} ended the stream", self.peer)),
                        Ok(Err(status)) => StreamEnd::Failed(format!("node {}: {}", self.peer, status.message())),
                        Err(error) => StreamEnd::Failed(format!("stream task to node {}: {error}", self.peer)),
                    };
                }
            }
        }
    }

    /// Takes `first` and whatever else is queued, up to a limit, and
    /// splits out snapshot messages.
    fn collect(&self, first: Vec<Message>, queue: &mut mpsc::Receiver<Vec<Message>>) -> (MessageBatch, Vec<Message>) {
        let mut batch = MessageBatch { messages: Vec::new(), sender_address: self.sender_address.clone() };
        let mut snapshots = Vec::new();
        let mut add = |messages: Vec<Message>, batch: &mut MessageBatch| {
            for message in messages {
                if message.get_msg_type() == MessageType::MsgSnapshot {
                    snapshots.push(message);
                } else if let Ok(bytes) = message.write_to_bytes() {
                    batch.messages.push(bytes);
                }
            }
        };
        add(first, &mut batch);
        while batch.messages.len() < MAX_BATCH_MESSAGES {
            match queue.try_recv() {
                Ok(more) => add(more, &mut batch),
                Err(_) => break,
            }
        }
        (batch, snapshots)
    }

    async fn send_snapshot(&self, client: &mut RaftPeerClient<tonic::transport::Channel>, message: Message) {
        let result = self.stream_snapshot(client, &message).await;
        if let Err(error) = &result {
            tracing::warn!(node_id = self.id, peer = self.peer, %error, "sending a snapshot failed");
            (self.errors)(self.peer);
        } else {
            tracing::info!(
                node_id = self.id,
                peer = self.peer,
                index = message.get_snapshot().get_metadata().index,
                "snapshot sent"
            );
        }
        if let Some(feedback) = self.feedback.get() {
            feedback.snapshot_sent(self.peer, result.is_ok());
        }
    }

    async fn stream_snapshot(
        &self,
        client: &mut RaftPeerClient<tonic::transport::Channel>,
        message: &Message,
    ) -> Result<(), RaftError> {
        let (index, term) = snapshot::parse_descriptor(&message.get_snapshot().data)?;
        let encoded = message.write_to_bytes().map_err(|error| RaftError::Snapshot(error.to_string()))?;
        let (sender, receiver) = mpsc::channel::<SnapshotChunk>(4);
        let store = Arc::clone(&self.snapshots);
        let reader = tokio::task::spawn_blocking(move || {
            snapshot::stream_snapshot(&store, index, term, |chunk| {
                let message = if chunk.done { encoded.clone() } else { Vec::new() };
                let chunk = SnapshotChunk {
                    index: chunk.index,
                    term: chunk.term,
                    file: chunk.file,
                    offset: chunk.offset,
                    data: chunk.data,
                    done: chunk.done,
                    message,
                };
                sender.blocking_send(chunk).map_err(|_| RaftError::Snapshot("the snapshot stream closed".to_owned()))
            })
        });
        let call = client.send_snapshot(ReceiverStream::new(receiver)).await;
        let read = reader.await.map_err(|error| RaftError::Snapshot(format!("snapshot reader: {error}")))?;
        read?;
        call.map_err(|status| RaftError::Snapshot(format!("node {}: {}", self.peer, status.message())))?;
        Ok(())
    }

    fn failed(&self, error: &str) {
        tracing::debug!(node_id = self.id, peer = self.peer, error, "Raft peer connection failed");
        (self.errors)(self.peer);
        if let Some(feedback) = self.feedback.get() {
            feedback.unreachable(self.peer);
        }
    }
}

/// Opens a TCP connection to `address` (`host:port`) from `source`, or from
/// the address the OS chooses when `source` is None. With a source, only the
/// resolved addresses of the same IP version are tried, in order.
async fn connect_tcp(address: &str, source: Option<IpAddr>) -> std::io::Result<tokio::net::TcpStream> {
    let Some(source) = source else {
        return tokio::net::TcpStream::connect(address).await;
    };
    let mut last_error = None;
    for target in tokio::net::lookup_host(address).await? {
        if target.is_ipv4() != source.is_ipv4() {
            continue;
        }
        let socket = if source.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.bind(SocketAddr::new(source, 0)).map_err(|error| {
            std::io::Error::new(error.kind(), format!("bind to the source address {source}: {error}"))
        })?;
        match socket.connect(target).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("{address} resolves to no address of the same IP version as the source address {source}"),
        )
    }))
}

enum StreamEnd {
    QueueClosed,
    Healthy,
    Failed(String),
}

/// The receiver of the messages that the server side accepts.
trait Inbound: Send + Sync {
    fn step(&self, messages: Vec<Message>) -> Result<(), RaftError>;
    fn id(&self) -> u64;
    fn snapshots(&self) -> &Arc<SnapshotStore>;
}

impl<O: Send + 'static> Inbound for NodeHandle<O> {
    fn step(&self, messages: Vec<Message>) -> Result<(), RaftError> {
        NodeHandle::step(self, messages)
    }

    fn id(&self) -> u64 {
        NodeHandle::id(self)
    }

    fn snapshots(&self) -> &Arc<SnapshotStore> {
        NodeHandle::snapshots(self)
    }
}

/// The server side: `sigil.raft.v1.RaftPeer`, to add to the node's gRPC
/// server.
pub struct PeerService {
    node: Arc<dyn Inbound>,
    tls: Arc<dyn PeerTls>,
    transport: Arc<GrpcTransport>,
}

impl PeerService {
    pub fn new<O: Send + 'static>(
        node: NodeHandle<O>,
        tls: Arc<dyn PeerTls>,
        transport: Arc<GrpcTransport>,
    ) -> RaftPeerServer<PeerService> {
        RaftPeerServer::new(PeerService { node: Arc::new(node), tls, transport })
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<u64, Status> {
        let certs = request.peer_certs();
        self.tls
            .caller_node_id(certs.as_deref().map(Vec::as_slice))
            .map_err(|reason| Status::unauthenticated(format!("Raft peer: {reason}")))
    }

    /// Decodes a message and checks that it comes from the caller and is
    /// addressed to this node.
    fn check(&self, caller: u64, bytes: &[u8]) -> Result<Message, Status> {
        let message = Message::parse_from_bytes(bytes)
            .map_err(|error| Status::invalid_argument(format!("Raft message does not decode: {error}")))?;
        if message.from != caller {
            return Err(Status::permission_denied(format!(
                "node {caller} sent a Raft message that names node {} as its sender",
                message.from
            )));
        }
        if message.to != self.node.id() {
            return Err(Status::invalid_argument(format!(
                "Raft message for node {} arrived at node {}",
                message.to,
                self.node.id()
            )));
        }
        Ok(message)
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<SnapshotChunk, Status>> + Send>>;

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn send(&self, request: Request<Streaming<MessageBatch>>) -> Result<Response<SendReply>, Status> {
        let caller = self.caller(&request)?;
        let mut stream = request.into_inner();
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            self.transport.learn_peer(caller, &batch.sender_address);
            let mut messages = Vec::with_capacity(batch.messages.len());
            for bytes in &batch.messages {
                messages.push(self.check(caller, bytes)?);
            }
            self.node.step(messages).map_err(|error| Status::unavailable(error.to_string()))?;
        }
        Ok(Response::new(SendReply {}))
    }

    async fn send_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SnapshotReply>, Status> {
        let caller = self.caller(&request)?;
        let stream: ChunkStream = Box::pin(request.into_inner());
        let message = receive_snapshot(Arc::clone(self.node.snapshots()), stream).await?;
        let message = self.check(caller, &message)?;
        if message.get_msg_type() != MessageType::MsgSnapshot {
            return Err(Status::invalid_argument("the last snapshot chunk must carry a snapshot message"));
        }
        tracing::info!(node_id = self.node.id(), from = caller, "snapshot received");
        self.node.step(vec![message]).map_err(|error| Status::unavailable(error.to_string()))?;
        Ok(Response::new(SnapshotReply {}))
    }
}

/// Writes a snapshot's chunks and returns the encoded message of the last.
async fn receive_snapshot(store: Arc<SnapshotStore>, mut stream: ChunkStream) -> Result<Vec<u8>, Status> {
    let mut receiver: Option<snapshot::Receiver> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if receiver.is_none() {
            let store = Arc::clone(&store);
            let (index, term) = (chunk.index, chunk.term);
            let started = tokio::task::spawn_blocking(move || store.receive(index, term))
                .await
                .map_err(|error| Status::internal(error.to_string()))?
                .map_err(|error| Status::internal(error.to_string()))?;
            receiver = Some(started);
        }
        let Some(mut current) = receiver.take() else {
            return Err(Status::internal("snapshot receiver missing"));
        };
        let message = chunk.message;
        let chunk = Chunk {
            index: chunk.index,
            term: chunk.term,
            file: chunk.file,
            offset: chunk.offset,
            data: chunk.data,
            done: chunk.done,
        };
        let current = tokio::task::spawn_blocking(move || current.write(&chunk).map(|()| current))
            .await
            .map_err(|error| Status::internal(error.to_string()))?
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        if current.is_done() {
            return Ok(message);
        }
        receiver = Some(current);
    }
    Err(Status::invalid_argument("the snapshot stream ended before its last chunk"))
}
