//! http-01 (RFC 8555, section 8.3; RFC 8738, section 5 for IP addresses).
//!
//! The validator sends `GET /.well-known/acme-challenge/<token>` to the
//! identifier on the configured http-01 port and expects status 200 with
//! the key authorization as the body, trailing whitespace ignored. The Host
//! header is the identifier, with the port appended when it is not 80.
//!
//! Redirects (301, 302, 303, 307, 308) are followed, at most
//! [`MAX_REDIRECTS`] of them, to http or https URLs whose port is 80, 443
//! or the configured http-01 port. Relative `Location` values are resolved
//! against the current URL. The certificate of an https target is not
//! checked, because it is the key authorization in the body that proves
//! control. RFC 8555 (section 8.3) recommends following redirects and sets
//! no rule for certificates, and a client that redirects to its own https
//! host often has no trusted certificate yet. Every connection, including
//! those to redirect targets, goes through the address policy.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use bytes::Bytes;
use http::header::{ACCEPT, CONNECTION, HOST, LOCATION, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

use super::Context;
use super::connect::connect;
use super::identifier::{Target, dns_name_error};
use crate::problem::{Problem, ProblemType};

/// Maximum number of redirects followed for one challenge.
pub(super) const MAX_REDIRECTS: usize = 10;

/// Maximum response body read. A key authorization is a token and a
/// SHA-256 thumbprint, about 90 bytes.
pub(super) const MAX_BODY_BYTES: usize = 8 * 1024;

/// Maximum read buffer of hyper, which bounds the response head. Hyper
/// rejects values below 8 KiB.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Length at which values quoted in problem details are cut.
const QUOTE_CHARS: usize = 128;

const USER_AGENT_VALUE: &str = concat!("sigil-acme/", env!("CARGO_PKG_VERSION"), " (challenge validation)");

/// Validates an http-01 challenge for `target`.
pub(super) async fn validate(
    context: &Context<'_>,
    target: &Target,
    token: &str,
    key_authorization: &str,
) -> Result<(), Problem> {
    let mut url = Url {
        https: false,
        host: target.clone(),
        port: context.settings.http01_port,
        path: format!("/.well-known/acme-challenge/{token}"),
    };

    let mut redirects = 0;
    loop {
        let response = fetch(context, &url).await?;
        if is_redirect(response.status) {
            let Some(location) = response.location else {
                return Err(Problem::unauthorized(format!(
                    "GET {url} returned HTTP {} without a Location header",
                    response.status
                )));
            };
            if redirects == MAX_REDIRECTS {
                return Err(Problem::new(
                    ProblemType::Connection,
                    format!(
                        "stopped after {MAX_REDIRECTS} redirects: GET {url} returned HTTP {} with another redirect to {}",
                        response.status,
                        quote(location.as_bytes())
                    ),
                ));
            }
            url = redirect_target(&url, &location, context.settings.http01_port)?;
            redirects += 1;
            continue;
        }

        if response.status != StatusCode::OK {
            return Err(Problem::unauthorized(format!(
                "GET {url} returned HTTP {} from {}; expected HTTP 200 with the key authorization",
                response.status, response.peer
            )));
        }
        return check_body(&url, &response, key_authorization);
    }
}

/// An http or https URL the validator may fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Url {
    https: bool,
    host: Target,
    port: u16,
    /// Path and query, starting with '/'.
    path: String,
}

impl Url {
    fn scheme(&self) -> &'static str {
        if self.https { "https" } else { "http" }
    }

    /// Returns the Host header value: the host, and the port unless it is
    /// the scheme's default.
    fn authority(&self) -> String {
        let default_port = if self.https { 443 } else { 80 };
        if self.port == default_port { self.host.url_host() } else { format!("{}:{}", self.host.url_host(), self.port) }
    }
}

impl fmt::Display for Url {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}://{}{}", self.scheme(), self.authority(), self.path)
    }
}

/// The parts of an HTTP response that validation looks at.
struct Fetched {
    peer: SocketAddr,
    status: StatusCode,
    location: Option<String>,
    /// At most [`MAX_BODY_BYTES`] bytes; empty for redirects.
    body: Vec<u8>,
    /// True when the body was longer than [`MAX_BODY_BYTES`].
    body_too_long: bool,
}

fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

async fn fetch(context: &Context<'_>, url: &Url) -> Result<Fetched, Problem> {
    let addresses = match &url.host {
        Target::Ip(address) => vec![*address],
        Target::Name(name) => {
            context.progress.set(ProblemType::Dns, format!("looking up the addresses of {name} for {url}"));
            context.resolver.addresses(name).await?
        }
    };
    let purpose = format!("GET {url}");
    let (stream, peer) = connect(context, &addresses, url.port, &purpose).await?;

    if !url.https {
        return exchange(context, stream, peer, url).await;
    }

    context.progress.set(ProblemType::Tls, format!("in the TLS handshake with {peer} for {url}"));
    let server_name = match &url.host {
        Target::Name(name) => ServerName::try_from(name.clone())
            .map_err(|error| Problem::malformed(format!("invalid TLS server name {name:?} for {url}: {error}")))?,
        Target::Ip(address) => ServerName::IpAddress((*address).into()),
    };
    let connector = TlsConnector::from(context.tls.https.clone());
    let stream = connector.connect(server_name, stream).await.map_err(|error| {
        Problem::new(ProblemType::Tls, format!("TLS handshake with {peer} for {url} failed: {error}"))
    })?;
    exchange(context, stream, peer, url).await
}

/// Sends the GET request over `stream` and reads the response.
async fn exchange<S>(context: &Context<'_>, stream: S, peer: SocketAddr, url: &Url) -> Result<Fetched, Problem>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let failed =
        |error: hyper::Error| Problem::new(ProblemType::Connection, format!("GET {url} from {peer} failed: {error}"));

    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_HEAD_BYTES)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(failed)?;
    let _driver = AbortOnDrop(tokio::spawn(async move {
        // Errors of the connection also fail the request, which reports them.
        let _ = connection.await;
    }));

    let request = Request::builder()
        .method(Method::GET)
        .uri(url.path.as_str())
        .header(HOST, url.authority())
        .header(USER_AGENT, USER_AGENT_VALUE)
        .header(ACCEPT, "*/*")
        .header(CONNECTION, "close")
        .body(Empty::new())
        .map_err(|error| Problem::malformed(format!("cannot build the request GET {url}: {error}")))?;

    context.progress.set(ProblemType::Connection, format!("waiting for the response from {peer} to GET {url}"));
    let response = sender.send_request(request).await.map_err(failed)?;
    let status = response.status();
    let location = response.headers().get(LOCATION).map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let mut fetched = Fetched { peer, status, location, body: Vec::new(), body_too_long: false };
    if is_redirect(status) || status != StatusCode::OK {
        return Ok(fetched);
    }

    context.progress.set(ProblemType::Connection, format!("reading the response body from {peer} for GET {url}"));
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(failed)?.into_data() else {
            continue;
        };
        let room = MAX_BODY_BYTES - fetched.body.len();
        if data.len() > room {
            fetched.body.extend_from_slice(&data[..room]);
            fetched.body_too_long = true;
            break;
        }
        fetched.body.extend_from_slice(&data);
    }
    Ok(fetched)
}

/// Aborts the task that drives an HTTP connection once the exchange is
/// over or abandoned.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn check_body(url: &Url, response: &Fetched, key_authorization: &str) -> Result<(), Problem> {
    if response.body_too_long {
        return Err(Problem::new(
            ProblemType::IncorrectResponse,
            format!(
                "the response body of GET {url} is longer than {MAX_BODY_BYTES} bytes and starts with {}; \
                 expected the key authorization {key_authorization:?}",
                quote(&response.body)
            ),
        ));
    }

    let received = response.body.trim_ascii_end();
    if received == key_authorization.as_bytes() {
        return Ok(());
    }
    Err(Problem::new(
        ProblemType::IncorrectResponse,
        format!(
            "the response body of GET {url} is {}; expected the key authorization {key_authorization:?}",
            quote(received)
        ),
    ))
}

/// Quotes received bytes for a problem detail, cut after [`QUOTE_CHARS`]
/// characters.
fn quote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(QUOTE_CHARS).collect();
    if chars.next().is_some() { format!("{head:?} (cut after {QUOTE_CHARS} characters)") } else { format!("{head:?}") }
}

/// Resolves a `Location` header against the URL that returned it and
/// checks that the validator may follow it.
fn redirect_target(current: &Url, location: &str, http01_port: u16) -> Result<Url, Problem> {
    let rejected = |reason: String| {
        Problem::new(
            ProblemType::Connection,
            format!("GET {current} redirected to {}, which is not followed: {reason}", quote(location.as_bytes())),
        )
    };

    let reference = location.trim();
    let reference = reference.split('#').next().unwrap_or_default();
    let origin = format!("{}://{}", current.scheme(), current.authority());
    let absolute = if has_scheme(reference) {
        reference.to_owned()
    } else if reference.starts_with("//") {
        format!("{}:{reference}", current.scheme())
    } else if reference.starts_with('/') {
        format!("{origin}{reference}")
    } else {
        let current_path = current.path.split('?').next().unwrap_or("/");
        if reference.starts_with('?') || reference.is_empty() {
            format!("{origin}{current_path}{reference}")
        } else {
            let directory = &current_path[..current_path.rfind('/').map_or(0, |slash| slash + 1)];
            format!("{origin}{directory}{reference}")
        }
    };

    let uri: Uri = absolute.parse().map_err(|error| rejected(format!("invalid URL: {error}")))?;
    let https = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(rejected("only http and https URLs are followed".to_owned())),
    };
    let Some(authority) = uri.authority() else {
        return Err(rejected("the URL has no host".to_owned()));
    };
    if authority.as_str().contains('@') {
        return Err(rejected("URLs with user information are not followed".to_owned()));
    }
    let host = parse_host(authority.host()).map_err(rejected)?;
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let allowed_ports = [80, 443, http01_port];
    if !allowed_ports.contains(&port) {
        return Err(rejected(format!(
            "port {port} is not allowed; redirects are followed only to ports 80, 443 and {http01_port}"
        )));
    }
    let path = uri.path_and_query().map_or("/", |path| path.as_str()).to_owned();
    let path = if path.starts_with('/') { path } else { format!("/{path}") };
    Ok(Url { https, host, port, path })
}

/// True when `reference` starts with a URI scheme and a colon (RFC 3986,
/// section 3.1).
fn has_scheme(reference: &str) -> bool {
    let Some((scheme, _)) = reference.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|first| first.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

fn parse_host(host: &str) -> Result<Target, String> {
    if let Some(inner) = host.strip_prefix('[').and_then(|rest| rest.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .map(|address| Target::Ip(IpAddr::V6(address)))
            .map_err(|_| format!("invalid IPv6 address {inner:?}"));
    }
    if let Ok(address) = host.parse::<IpAddr>() {
        return Ok(Target::Ip(address));
    }
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    match dns_name_error(&name) {
        None => Ok(Target::Name(name)),
        Some(reason) => Err(format!("invalid host {host:?}: {reason}")),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::{Url, redirect_target};
    use crate::problem::ProblemType;
    use crate::validation::identifier::Target;

    fn current() -> Url {
        Url {
            https: false,
            host: Target::Name("example.test".to_owned()),
            port: 5002,
            path: "/.well-known/acme-challenge/token?x=1".to_owned(),
        }
    }

    #[test]
    fn redirect_references_resolved() {
        let cases = [
            ("other", "http://example.test:5002/.well-known/acme-challenge/other"),
            ("?y=2", "http://example.test:5002/.well-known/acme-challenge/token?y=2"),
            ("/root#part", "http://example.test:5002/root"),
            ("//Other.Test/path", "http://other.test/path"),
            ("https://other.test/path?q", "https://other.test/path?q"),
            ("HTTP://other.test:443/", "http://other.test:443/"),
            ("http://192.0.2.1:5002/key", "http://192.0.2.1:5002/key"),
            ("http://[2001:db8::1]/key", "http://[2001:db8::1]/key"),
            ("https://other.test", "https://other.test/"),
        ];
        for (location, expected) in cases {
            let target = redirect_target(&current(), location, 5002).map(|url| url.to_string());
            assert_eq!(target.as_deref(), Ok(expected), "Location {location:?}");
        }
    }

    #[test]
    fn redirect_hosts_parsed() {
        let v4 = redirect_target(&current(), "http://192.0.2.1/", 5002).expect("IPv4 host");
        assert_eq!(v4.host, Target::Ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))));
        let v6 = redirect_target(&current(), "http://[2001:db8::1]/", 5002).expect("IPv6 host");
        assert_eq!(v6.host, Target::Ip(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1))));
    }

    #[test]
    fn redirect_references_rejected() {
        let cases = [
            ("ftp://other.test/key", "only http and https"),
            ("javascript:alert(1)", "only http and https"),
            ("http://other.test:8080/key", "port 8080 is not allowed"),
            ("http://user@other.test/key", "user information"),
            ("http://bad_host.test/key", "invalid host"),
            ("http://other test/key", "invalid URL"),
        ];
        for (location, reason) in cases {
            let problem = redirect_target(&current(), location, 5002).expect_err(location);
            assert!(problem.is(ProblemType::Connection), "{location:?}: {problem}");
            assert!(problem.detail.contains(reason), "{location:?}: {problem}");
        }
    }
}
