//! Helpers for ACME tests with real clients. pebble-challtestsrv is the DNS server that the nodes
//! validate dns-01 with, and a hook script sets its TXT records for certbot and lego. Client
//! commands run under a time limit with their output kept. Issued certificates are checked with
//! openssl, pkilint and x509-parser.

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use x509_parser::extensions::{DistributionPointName, GeneralName, ParsedExtension};
use x509_parser::prelude::{CertificateRevocationList, FromDer, X509Certificate};

/// Time one client command may run before `timeout` sends it SIGTERM.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);
/// Time a client gets after SIGTERM before `timeout` sends SIGKILL.
const CLIENT_KILL_AFTER: Duration = Duration::from_secs(10);
/// Time pebble-challtestsrv may take to open its DNS and management listeners.
const CHALLTESTSRV_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Finds `name` in PATH, then in the virtual environment where scripts/install-prereqs.sh puts
/// pkilint and certbot (`$SIGIL_CACHE_DIR/venv/bin`, by default `~/.cache/sigil/venv/bin`).
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut candidates: Vec<PathBuf> = std::env::split_paths(&path).map(|dir| dir.join(name)).collect();
    let cache = std::env::var_os("SIGIL_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/sigil")));
    if let Some(cache) = cache {
        candidates.push(cache.join("venv/bin").join(name));
    }
    candidates.into_iter().find(|candidate| candidate.is_file()).unwrap_or_else(|| {
        panic!("{name} was not found in PATH or in the sigil virtual environment; run scripts/install-prereqs.sh")
    })
}

/// Waits until `port` on 127.0.0.1 is free, at most `limit`. The dev nodes validate http-01 and
/// tls-alpn-01 on fixed ports where the clients must listen, and other tests on the machine (such
/// as tests/acme_lib.rs) bind the http-01 port too.
pub fn wait_port_free(port: u16, limit: Duration) {
    let started = Instant::now();
    loop {
        match TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            Ok(_) => break,
            Err(error) => assert!(
                started.elapsed() < limit,
                "127.0.0.1:{port} is still in use after {limit:?} ({error}); the ACME clients must listen there, so stop what holds it"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if started.elapsed() > Duration::from_millis(500) {
        eprintln!("[acme] waited {:.1} s for 127.0.0.1:{port} to be free", started.elapsed().as_secs_f64());
    }
}

/// A pebble-challtestsrv process that answers DNS queries on loopback: A queries with 127.0.0.1,
/// AAAA queries with nothing, and TXT queries with the records set through its management API.
/// Its HTTP and TLS challenge servers are off. Dropping it kills the process.
pub struct ChallTestSrv {
    child: Child,
    pub dns: SocketAddr,
    pub management: SocketAddr,
    log: PathBuf,
}

impl ChallTestSrv {
    /// Starts the server with its log in `dir` and waits until both listeners accept connections.
    pub fn start(dir: &Path) -> ChallTestSrv {
        let dns = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_udp_and_tcp_port());
        let management = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_tcp_port());
        let log = dir.join("challtestsrv.log");
        let file = std::fs::File::create(&log).expect("create challtestsrv.log");

        let dns_arg = dns.to_string();
        let management_arg = management.to_string();
        let args = [
            "-dns01",
            dns_arg.as_str(),
            "-management",
            management_arg.as_str(),
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
        ];

        eprintln!("[acme] starting pebble-challtestsrv {}", args.map(|arg| format!("{arg:?}")).join(" "));
        let child = Command::new(tool("pebble-challtestsrv"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone challtestsrv.log handle"))
            .stderr(file)
            .spawn()
            .expect("start pebble-challtestsrv");

        let mut server = ChallTestSrv { child, dns, management, log };
        server.wait_listening();
        server
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + CHALLTESTSRV_START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("pebble-challtestsrv exited with {status} during start-up:\n{}", self.log());
            }
            let timeout = Duration::from_millis(200);
            let management_up = TcpStream::connect_timeout(&self.management, timeout).is_ok();
            let dns_up = TcpStream::connect_timeout(&self.dns, timeout).is_ok();
            if management_up && dns_up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pebble-challtestsrv did not listen on {} and {} within {CHALLTESTSRV_START_TIMEOUT:?}:\n{}",
                self.dns,
                self.management,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Writes, into `dir`, a script that sets and clears TXT records through the management API,
    /// and returns its path. It takes the arguments of lego's exec DNS provider
    /// (`present|cleanup FQDN VALUE`), or `certbot-auth` and `certbot-cleanup` for certbot's manual
    /// hooks, which pass the name in CERTBOT_DOMAIN and the value in CERTBOT_VALIDATION.
    pub fn write_txt_hook(&self, dir: &Path) -> PathBuf {
        let script = TXT_HOOK.replace("@MANAGEMENT@", &format!("http://{}", self.management));
        let path = dir.join("challtestsrv-txt.py");
        std::fs::write(&path, script).expect("write the TXT record hook");
        let mut permissions = std::fs::metadata(&path).expect("stat the TXT record hook").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
        std::fs::set_permissions(&path, permissions).expect("make the TXT record hook executable");
        path
    }
}

impl Drop for ChallTestSrv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The hook script. The proxy handler is emptied so that a proxy variable in the environment
/// cannot send the request anywhere but the loopback management listener.
const TXT_HOOK: &str = r#"#!/usr/bin/env python3
"""Sets and clears dns-01 TXT records in pebble-challtestsrv.

lego's exec DNS provider runs: SCRIPT present FQDN VALUE, then SCRIPT cleanup FQDN VALUE.
certbot's manual hooks run: SCRIPT certbot-auth, then SCRIPT certbot-cleanup, with the name in
CERTBOT_DOMAIN (without "_acme-challenge.") and the record value in CERTBOT_VALIDATION.
"""
import json
import os
import sys
import urllib.request

MANAGEMENT = "@MANAGEMENT@"


def post(path, body):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(MANAGEMENT + path, data=json.dumps(body).encode(), method="POST")
    with opener.open(request, timeout=10) as response:
        response.read()


def main():
    action = sys.argv[1] if len(sys.argv) > 1 else ""
    if action in ("present", "cleanup") and len(sys.argv) == 4:
        host, value = sys.argv[2], sys.argv[3]
    elif action in ("certbot-auth", "certbot-cleanup"):
        host = "_acme-challenge." + os.environ["CERTBOT_DOMAIN"] + "."
        value = os.environ.get("CERTBOT_VALIDATION", "")
    else:
        sys.exit(f"usage: {sys.argv[0]} present|cleanup FQDN VALUE, or certbot-auth|certbot-cleanup; got {sys.argv[1:]}")
    if action in ("present", "certbot-auth"):
        post("/set-txt", {"host": host, "value": value})
        print(f"set TXT {host} {value}")
    else:
        post("/clear-txt", {"host": host})
        print(f"cleared TXT {host}")


main()
"#;

/// Returns a port that is free on 127.0.0.1 for both UDP and TCP at the time of the call.
fn free_udp_and_tcp_port() -> u16 {
    for _ in 0..50 {
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a UDP socket on 127.0.0.1");
        let port = udp.local_addr().expect("UDP socket address").port();
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
    panic!("found no port free for both UDP and TCP on 127.0.0.1 in 50 attempts");
}

fn free_tcp_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a TCP socket on 127.0.0.1");
    listener.local_addr().expect("TCP socket address").port()
}

/// One finished client command.
pub struct ClientRun {
    /// The command line as logged, with secrets replaced.
    pub command_line: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl ClientRun {
    /// Describes the run for failure messages: command, exit status and both outputs.
    pub fn describe(&self) -> String {
        let timed_out = if self.status.code() == Some(124) {
            format!(" (timed out after {CLIENT_TIMEOUT:?})")
        } else {
            String::new()
        };
        format!(
            "$ {}\n{}{timed_out} after {:.1} s\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command_line,
            self.status,
            self.elapsed.as_secs_f64(),
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }

    /// Returns stdout and stderr together, for searching.
    pub fn output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// Panics with the whole run unless the command exited with 0.
    pub fn assert_success(&self, action: &str) {
        assert!(self.status.success(), "{action} failed:\n{}", self.describe());
    }
}

/// Runs `program` with `args` and `env` under `timeout`, logs the command line and its outcome,
/// and returns the run. The value after each flag in `secret_flags` is logged as `<secret>`.
pub fn run_client(program: &Path, args: &[String], env: &[(&str, String)], secret_flags: &[&str]) -> ClientRun {
    let mut words: Vec<String> = env.iter().map(|(name, value)| format!("{name}={value}")).collect();
    words.push(program.display().to_string());
    let mut hide_next = false;
    for arg in args {
        words.push(if hide_next { "<secret>".to_owned() } else { shell_quote(arg) });
        hide_next = secret_flags.contains(&arg.as_str());
    }
    let command_line = words.join(" ");
    eprintln!("[acme] $ {command_line}");

    let started = Instant::now();
    let output = Command::new("timeout")
        .arg(format!("--kill-after={}", CLIENT_KILL_AFTER.as_secs()))
        .arg(CLIENT_TIMEOUT.as_secs().to_string())
        .arg(program)
        .args(args)
        .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("start {command_line}: {error}"));
    let run = ClientRun {
        command_line,
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: started.elapsed(),
    };
    eprintln!("[acme] {} after {:.1} s", run.status, run.elapsed.as_secs_f64());
    run
}

fn shell_quote(arg: &str) -> String {
    let plain = arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+".contains(c));
    if plain && !arg.is_empty() { arg.to_owned() } else { format!("'{}'", arg.replace('\'', r"'\''")) }
}

/// A certificate chain as a client saved it, split into the leaf and the certificates after it.
pub struct Chain {
    pub leaf_der: Vec<u8>,
    pub intermediates_der: Vec<Vec<u8>>,
}

impl Chain {
    /// Reads the certificates of a PEM file, leaf first.
    pub fn read(path: &Path) -> Chain {
        let text = std::fs::read(path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
        let blocks = pem::parse_many(&text).unwrap_or_else(|error| panic!("parse {} as PEM: {error}", path.display()));
        let mut certificates =
            blocks.into_iter().filter(|block| block.tag() == "CERTIFICATE").map(|block| block.into_contents());
        let leaf_der = certificates.next().unwrap_or_else(|| panic!("{} contains no certificate", path.display()));
        Chain { leaf_der, intermediates_der: certificates.collect() }
    }

    /// Returns the leaf's serial number as lower-case hex of its DER bytes.
    pub fn serial_hex(&self) -> String {
        hex::encode(parse(&self.leaf_der).raw_serial())
    }

    /// Returns the leaf's RFC 9773 certificate identifier: base64url of the authority key
    /// identifier, a dot, and base64url of the serial number's DER bytes.
    pub fn ari_id(&self) -> String {
        let leaf = parse(&self.leaf_der);
        let key_id = leaf
            .extensions()
            .iter()
            .find_map(|extension| match extension.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref().map(|id| id.0.to_vec()),
                _ => None,
            })
            .expect("the leaf has an authority key identifier");
        format!("{}.{}", sigil_acme::b64::encode(&key_id), sigil_acme::b64::encode(leaf.raw_serial()))
    }

    /// Returns the URIs of the leaf's CRL distribution points.
    pub fn crl_urls(&self) -> Vec<String> {
        let leaf = parse(&self.leaf_der);
        let mut urls = Vec::new();
        for extension in leaf.extensions() {
            let ParsedExtension::CRLDistributionPoints(points) = extension.parsed_extension() else {
                continue;
            };
            for point in points.iter() {
                if let Some(DistributionPointName::FullName(names)) = &point.distribution_point {
                    for name in names {
                        if let GeneralName::URI(uri) = name {
                            urls.push((*uri).to_owned());
                        }
                    }
                }
            }
        }
        urls
    }
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    X509Certificate::from_der(der).expect("the client saved a DER X.509 certificate").1
}

fn pem_text(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// Checks an issued certificate and returns one message per failed check: the chain verifies
/// against `bundle` for TLS servers (`openssl verify -purpose sslserver`), pkilint's CA/Browser
/// Forum TLS lint reports no ERROR or FATAL finding, and the subject alternative names are exactly
/// `names`. `work` is a folder for the files that openssl and pkilint read.
pub fn check_certificate(work: &Path, label: &str, bundle: &Path, chain: &Chain, names: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    let leaf_path = work.join(format!("{label}-leaf.pem"));
    let intermediates_path = work.join(format!("{label}-intermediates.pem"));
    std::fs::write(&leaf_path, pem_text(&chain.leaf_der)).expect("write the leaf");
    let intermediates: String = chain.intermediates_der.iter().map(|der| pem_text(der)).collect();
    std::fs::write(&intermediates_path, intermediates).expect("write the intermediates");

    if chain.intermediates_der.is_empty() {
        problems.push(format!("{label}: the saved chain holds only the leaf, no intermediate"));
    }

    let verify = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(bundle)
        .arg("-untrusted")
        .arg(&intermediates_path)
        .args(["-purpose", "sslserver"])
        .arg(&leaf_path)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl verify");
    let verify_out = format!("{}{}", String::from_utf8_lossy(&verify.stdout), String::from_utf8_lossy(&verify.stderr));
    if !verify.status.success() || !verify_out.contains(": OK") {
        problems.push(format!("{label}: openssl verify failed ({}):\n{}", verify.status, verify_out.trim_end()));
    }

    let lint = Command::new(tool("lint_cabf_serverauth_cert"))
        .args(["lint", "-d"])
        .arg(&leaf_path)
        .stdin(Stdio::null())
        .output()
        .expect("run lint_cabf_serverauth_cert");
    // pkilint exits with the number of findings of any severity, so its exit status does not show
    // whether any of them is an error.
    let lint_out = String::from_utf8_lossy(&lint.stdout).into_owned();
    let lint_err = String::from_utf8_lossy(&lint.stderr).into_owned();
    let severe = severe_findings(&lint_out);
    if !severe.is_empty() {
        problems.push(format!(
            "{label}: pkilint lint_cabf_serverauth_cert reports {} ERROR or FATAL findings: {severe:?}\nfull output:\n{}",
            severe.len(),
            lint_out.trim_end()
        ));
    }
    if lint_out.trim().is_empty() && !lint.status.success() && !lint_err.trim().is_empty() {
        problems.push(format!("{label}: pkilint failed ({}): {}", lint.status, lint_err.trim_end()));
    }

    let leaf = parse(&chain.leaf_der);
    let found: BTreeSet<String> = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let expected: BTreeSet<String> = names.iter().map(|name| (*name).to_owned()).collect();
    if found != expected {
        problems.push(format!("{label}: subject alternative names are {found:?}, expected {expected:?}"));
    }

    eprintln!(
        "[acme] checked {label}: serial {}, names {found:?}, {} problems",
        hex::encode(leaf.raw_serial()),
        problems.len()
    );
    problems
}

/// Splits an `http://IP:PORT/PATH` URL on a loopback address into the address and the path, or
/// returns None for any other URL.
pub fn loopback_http_target(url: &str) -> Option<(SocketAddr, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let address: SocketAddr = authority.parse().ok()?;
    address.ip().is_loopback().then_some((address, path))
}

/// Fetches `url` (plain `http://` on a loopback address) and returns the body, or an error
/// message. Rejects any other URL, so that a test never sends traffic off the machine.
pub fn http_get_loopback(url: &str) -> Result<Vec<u8>, String> {
    let (address, path) = loopback_http_target(url)
        .ok_or_else(|| format!("{url} is not an http:// URL with a loopback IP address and a port"))?;
    let authority = address.to_string();
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))
        .map_err(|error| format!("connect to {address}: {error}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|error| error.to_string())?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n")
        .map_err(|error| format!("send GET {url}: {error}"))?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(|error| format!("read the response to GET {url}: {error}"))?;

    let split = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| format!("the response to GET {url} has no end of headers"))?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let body = response[split + 4..].to_vec();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {url} returned {:?}", head.lines().next().unwrap_or_default()));
    }
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Err(format!("GET {url} returned a chunked body, which this helper does not decode"));
    }
    Ok(body)
}

/// Returns the (serial hex, reason code) pairs that a DER CRL lists. An entry without a reason
/// code extension has reason 0 (unspecified), as RFC 5280 section 5.3.1 defines.
pub fn crl_entries(der: &[u8]) -> Result<Vec<(String, u8)>, String> {
    let (_, crl) = CertificateRevocationList::from_der(der).map_err(|error| format!("parse the CRL: {error}"))?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|entry| {
            let reason = entry.reason_code().map_or(0, |(_, code)| code.0);
            (hex::encode(entry.raw_serial()), reason)
        })
        .collect())
}

/// Returns pkilint's ERROR and FATAL lines, less one expected finding: the dev cluster publishes its
/// CRL and issuer certificate on the node's loopback metrics listener, and pkilint calls the
/// 127.0.0.1 in those two URLs an internal name. The same finding in a subject alternative name, or
/// for any other host, still counts. A deployment sets `acme.crl_url` and `acme.ca_issuers_url` to
/// public names.
fn severe_findings(lint_out: &str) -> Vec<String> {
    let mut severe = Vec::new();
    let mut location = "";
    for line in lint_out.lines() {
        if !line.starts_with(' ') {
            location = line;
            continue;
        }
        if !(line.contains("(ERROR)") || line.contains("(FATAL)")) {
            continue;
        }
        let publication_uri =
            location.contains("cRLDistributionPoints") || location.contains("authorityInfoAccessSyntax");
        let loopback_name = line.contains("cabf.internal_domain_name") && line.contains("\"127.0.0.1\"");
        if publication_uri && loopback_name {
            continue;
        }
        severe.push(format!("{} {}", location.trim(), line.trim()));
    }
    severe
}
