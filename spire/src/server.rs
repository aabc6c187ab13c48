//! The plugin process: a gRPC server on a Unix socket in a private temporary folder, announced
//! to SPIRE by the handshake line, and stopped by SPIRE's Shutdown call, by SIGTERM, or when
//! SPIRE's process goes away.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing::{debug, error, info, warn};

use crate::handshake::handshake_line;
use crate::plumbing::{Broker, Configurator, Controller, Initializer, Stdio};
use crate::proto::plugin::grpc_broker_server::GrpcBrokerServer;
use crate::proto::plugin::grpc_controller_server::GrpcControllerServer;
use crate::proto::plugin::grpc_stdio_server::GrpcStdioServer;
use crate::proto::spire::plugin::server::upstreamauthority::v1::upstream_authority_server::UpstreamAuthorityServer;
use crate::proto::spire::service::common::config::v1::config_server::ConfigServer;
use crate::proto::spire::service::private::init::v1::init_server::InitServer;
use crate::sigil_client::{ClientSlot, MAX_MESSAGE_SIZE};
use crate::upstream::Upstream;

/// Time the server gets to finish open calls after a stop request. go-plugin's host kills the
/// plugin 2 seconds after Shutdown, so this is a little shorter.
const STOP_GRACE: Duration = Duration::from_millis(1500);
/// Interval of the check that SPIRE, the parent process, still runs.
const PARENT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Longest Unix socket path Linux accepts, without the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// The health service name go-plugin's host checks.
const HEALTH_SERVICE: &str = "plugin";

/// Error that stops the plugin before or while it serves.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("create the socket folder: {0}")]
    SocketFolder(std::io::Error),
    #[error("socket path {0} is longer than {MAX_SOCKET_PATH} bytes; set TMPDIR to a shorter folder")]
    SocketPathTooLong(PathBuf),
    #[error("listen on {path}: {source}")]
    Listen { path: PathBuf, source: std::io::Error },
    #[error("install the {name} handler: {source}")]
    Signal { name: &'static str, source: std::io::Error },
    #[error("write the handshake line to standard output: {0}")]
    Handshake(std::io::Error),
    #[error("gRPC server failed: {0}")]
    Server(#[from] tonic::transport::Error),
}

/// Serves until SPIRE stops the plugin. The socket folder is removed on return.
///
/// # Errors
///
/// Fails when the socket cannot be created, a signal handler cannot be installed, the
/// handshake line cannot be written, or the server stops with an error.
pub async fn run() -> Result<(), ServeError> {
    let parent = std::os::unix::process::parent_id();
    set_parent_death_signal();

    let folder = socket_folder()?;
    let socket = folder.path().join("plugin.sock");
    let listener = bind(&socket)?;

    let shutdown = CancellationToken::new();
    watch_signals(&shutdown)?;
    tokio::spawn(watch_parent(parent, shutdown.clone()));

    let router = router(&shutdown).await;
    announce(&socket)?;
    info!(socket = %socket.display(), pid = std::process::id(), parent_pid = parent, "plugin serving");

    let incoming = UnixListenerStream::new(listener);
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()));
    let result = tokio::select! {
        () = shutdown.cancelled() => match tokio::time::timeout(STOP_GRACE, &mut server).await {
            Ok(joined) => flatten(joined),
            Err(_) => {
                debug!("open calls did not finish within the stop grace period; stopping anyway");
                server.abort();
                Ok(())
            }
        },
        joined = &mut server => flatten(joined),
    };
    if let Err(error) = folder.close() {
        warn!(error = %error, "could not remove the socket folder");
    }
    info!("plugin stopped");
    result
}

fn flatten(joined: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>) -> Result<(), ServeError> {
    match joined {
        Ok(result) => result.map_err(ServeError::from),
        Err(error) => {
            error!(error = %error, "gRPC server task ended abnormally");
            Ok(())
        }
    }
}

/// Creates a temporary folder that only the plugin's user can enter, so no other user can
/// connect to the socket.
fn socket_folder() -> Result<tempfile::TempDir, ServeError> {
    tempfile::Builder::new()
        .prefix("sigil-spire-plugin-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .map_err(ServeError::SocketFolder)
}

fn bind(socket: &Path) -> Result<UnixListener, ServeError> {
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ServeError::SocketPathTooLong(socket.to_owned()));
    }
    UnixListener::bind(socket).map_err(|source| ServeError::Listen { path: socket.to_owned(), source })
}

/// Prints the handshake line: the first and only line the plugin writes to standard output.
fn announce(socket: &Path) -> Result<(), ServeError> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", handshake_line(socket)).map_err(ServeError::Handshake)?;
    stdout.flush().map_err(ServeError::Handshake)
}

async fn router(shutdown: &CancellationToken) -> tonic::transport::server::Router {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_service_status(HEALTH_SERVICE, ServingStatus::Serving).await;

    let slot = ClientSlot::default();
    let upstream = UpstreamAuthorityServer::new(Upstream::new(slot.clone(), shutdown.clone()))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let config = ConfigServer::new(Configurator { slot })
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let init = InitServer::new(Initializer)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let broker = GrpcBrokerServer::new(Broker { shutdown: shutdown.clone() })
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);

    Server::builder()
        .add_service(health)
        .add_service(broker)
        .add_service(GrpcControllerServer::new(Controller { shutdown: shutdown.clone() }))
        .add_service(GrpcStdioServer::new(Stdio { shutdown: shutdown.clone() }))
        .add_service(init)
        .add_service(config)
        .add_service(upstream)
}

/// Asks the kernel to send SIGTERM when the parent exits, so the plugin can remove its socket
/// folder. It replaces the SIGKILL that SPIRE sets for its plugins on Linux.
fn set_parent_death_signal() {
    if let Err(error) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM) {
        warn!(error = %error, "could not set the parent death signal; relying on the parent check");
    }
}

/// Cancels `shutdown` on SIGTERM or SIGHUP. SIGINT is logged and ignored, as go-plugin plugins
/// do: a Ctrl-C in SPIRE's terminal reaches the whole process group, and SPIRE unloads its
/// plugins itself.
fn watch_signals(shutdown: &CancellationToken) -> Result<(), ServeError> {
    let install =
        |kind: SignalKind, name: &'static str| signal(kind).map_err(|source| ServeError::Signal { name, source });
    let mut terminate = install(SignalKind::terminate(), "SIGTERM")?;
    let mut hangup = install(SignalKind::hangup(), "SIGHUP")?;
    let mut interrupt = install(SignalKind::interrupt(), "SIGINT")?;
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = terminate.recv() => {
                    info!("received SIGTERM; stopping");
                    break;
                }
                _ = hangup.recv() => {
                    info!("received SIGHUP; stopping");
                    break;
                }
                _ = interrupt.recv() => debug!("ignoring SIGINT; SPIRE stops its plugins itself"),
            }
        }
        shutdown.cancel();
    });
    Ok(())
}

/// Cancels `shutdown` when the process is re-parented, which means SPIRE exited. This covers
/// the cases the parent death signal misses, such as a parent that died before it was set.
async fn watch_parent(parent: u32, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(PARENT_POLL_INTERVAL) => {}
        }
        let current = std::os::unix::process::parent_id();
        if current != parent {
            info!(parent_pid = parent, current_parent_pid = current, "SPIRE exited; stopping");
            shutdown.cancel();
            return;
        }
    }
}
