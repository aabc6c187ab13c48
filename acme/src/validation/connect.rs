//! TCP connections to validation targets under the address policy.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpStream;

use super::Context;
use super::address::non_public_reason;
use crate::problem::{Problem, ProblemType};

/// Connects to the first of `addresses` that accepts a TCP connection on
/// `port`, trying them in order. `purpose` names the request in problems,
/// for example the URL being fetched.
///
/// Addresses refused by the address policy are skipped; when every address
/// is refused, the problem names them and the reason. When several
/// addresses may be tried, each attempt gets half of the validation
/// timeout, so a second address is tried after a first one that does not
/// respond.
pub(super) async fn connect(
    context: &Context<'_>,
    addresses: &[IpAddr],
    port: u16,
    purpose: &str,
) -> Result<(TcpStream, SocketAddr), Problem> {
    let mut allowed = Vec::with_capacity(addresses.len());
    let mut refused = Vec::new();
    for &address in addresses {
        match non_public_reason(address) {
            Some(reason) if !context.settings.allow_private_addresses => refused.push((address, reason)),
            _ => allowed.push(SocketAddr::new(address, port)),
        }
    }
    if allowed.is_empty() {
        return Err(refused_problem(&refused, purpose));
    }

    let attempt_timeout = if allowed.len() > 1 { context.settings.timeout / 2 } else { context.settings.timeout };
    let mut failures = Vec::with_capacity(allowed.len());
    for peer in allowed {
        context.progress.set(ProblemType::Connection, format!("connecting to {peer} for {purpose}"));
        match tokio::time::timeout(attempt_timeout, TcpStream::connect(peer)).await {
            Ok(Ok(stream)) => return Ok((stream, peer)),
            Ok(Err(error)) => failures.push(format!("{peer}: {error}")),
            Err(_) => failures.push(format!("{peer}: timed out after {attempt_timeout:?}")),
        }
    }
    Err(Problem::new(ProblemType::Connection, format!("failed to connect for {purpose}: {}", failures.join("; "))))
}

fn refused_problem(refused: &[(IpAddr, &str)], purpose: &str) -> Problem {
    let mut detail = format!("refused to connect for {purpose}: ");
    for (index, (address, reason)) in refused.iter().enumerate() {
        if index > 0 {
            detail.push_str("; ");
        }
        let _ = write!(detail, "{address} is {reason}");
    }
    detail.push_str(", and the validator connects only to public addresses");
    Problem::new(ProblemType::Connection, detail)
}
