//! Sigil's SPIRE UpstreamAuthority plugin: a program SPIRE server starts through `plugin_cmd`.
//! It speaks go-plugin's gRPC protocol to SPIRE on a Unix socket and forwards SPIRE's requests
//! to a Sigil cluster over mTLS, so SPIRE's intermediate CA and JWT authorities come from Sigil.

mod bundle;
mod config;
mod credentials;
mod handshake;
mod hcl;
mod logging;
mod plumbing;
mod proto;
mod server;
mod sigil_client;
mod upstream;

use std::process::ExitCode;
use std::time::Duration;

/// Time the runtime gives background tasks to finish after the server stopped.
const RUNTIME_STOP_TIMEOUT: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    match arguments.first().map(String::as_str) {
        Some("--version") => {
            println!("{} {}", env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some("--help" | "-h") => {
            print!("{}", handshake::usage());
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("unknown argument {other:?}; the plugin takes no arguments\n\n{}", handshake::usage());
            return ExitCode::from(2);
        }
        None => {}
    }
    if let Err(error) = handshake::check_environment(|name| std::env::var(name).ok()) {
        eprintln!("{error}\n\n{}", handshake::usage());
        return ExitCode::FAILURE;
    }

    logging::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(error = %error, "could not start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(server::run());
    runtime.shutdown_timeout(RUNTIME_STOP_TIMEOUT);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error, "plugin failed");
            ExitCode::FAILURE
        }
    }
}
