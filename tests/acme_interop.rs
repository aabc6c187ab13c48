//! ACME interoperability with real clients against a 3-node `sigil dev` cluster: certbot 5
//! (account, http-01, renewal with ACME Renewal Information, revocation, dns-01 through manual
//! hooks) and lego 4.9.1 (http-01, tls-alpn-01, dns-01 through its exec provider, a wildcard
//! order, external account binding). pebble-challtestsrv is the cluster's DNS server, so the TXT
//! records that the clients' hooks set are what the nodes look up for dns-01.
//!
//! The nodes validate http-01 on 127.0.0.1:5002 and tls-alpn-01 on 127.0.0.1:5001, where the
//! clients must listen. One test function runs every step in order, so no two clients bind those
//! ports at once and a single cluster start serves all steps. Each step uses a node chosen so
//! that the clients are spread over the three nodes, and several steps read on one node what a
//! client wrote through another (revocation, renewal information, external account binding keys).
//! A failed step is recorded and the next step still runs. The test fails at the end with every
//! failure, each with the client's command, exit status and output.

#[path = "common/acme.rs"]
mod acme_harness;
#[path = "common/cluster.rs"]
#[allow(dead_code, reason = "this test uses only part of the cluster harness")]
mod cluster_harness;
mod common;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use acme_harness::{
    Chain, ChallTestSrv, ClientRun, check_certificate, crl_entries, http_get_loopback, loopback_http_target,
    run_client, tool, wait_port_free,
};
use cluster_harness::{DevCluster, tail_text};
use sigil_acme::ProblemType;
use sigil_acme::client::AccountKey;
use sigil_acme::jwk::Algorithm;
use sigil_acme::session::Session;

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Time a revocation committed through one node may take to be applied on another.
const REPLICATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of each node's log shown when a step fails.
const LOG_TAIL_LINES: usize = 15;

/// Port where the dev nodes connect for http-01 (`sigil dev` sets Pebble's port).
const HTTP01_PORT: u16 = 5002;
/// Port where the dev nodes connect for tls-alpn-01.
const TLS_ALPN01_PORT: u16 = 5001;
/// Time to wait for another process to release port 5001 or 5002 before a client needs it.
const PORT_WAIT: Duration = Duration::from_secs(60);
/// Runs of one client command when another process takes port 5001 or 5002 first.
const BIND_ATTEMPTS: u32 = 3;

/// RFC 5280 CRLReason codes that the revocation step sends.
const REASON_KEY_COMPROMISE: u8 = 1;
const REASON_SUPERSEDED: u8 = 4;

#[test]
fn certbot_and_lego_against_three_nodes() {
    let runtime = tokio::runtime::Runtime::new().expect("start a tokio runtime");
    let work = tempfile::tempdir().expect("create temporary folder");
    let dns = ChallTestSrv::start(work.path());
    let resolver = dns.dns.to_string();
    let started = Instant::now();
    let cluster = runtime.block_on(DevCluster::start_with_args(3, 0, &["--acme-resolver", &resolver]));
    eprintln!("[acme] 3-node cluster with resolver {resolver} ready in {:.1} s", started.elapsed().as_secs_f64());

    let hook = dns.write_txt_hook(work.path());
    let mut run = Interop {
        bundle: cluster.dir.join("bundle.pem"),
        runtime,
        cluster,
        dns,
        work: work.path().to_owned(),
        hook,
        certbot: tool("certbot"),
        lego: tool("lego"),
        step: String::new(),
        failures: Vec::new(),
    };

    // Each certbot step uses the account or the certificates of the one before it.
    let registered = run.step("certbot register", Interop::certbot_register);
    let issued = registered && run.step("certbot certonly http-01", Interop::certbot_http01);
    let renewed = issued && run.step("certbot renew", Interop::certbot_renew);
    if renewed {
        run.step("certbot revoke", Interop::certbot_revoke);
    } else {
        run.failures.push("certbot renew or revoke: not run because an earlier certbot step did not finish".to_owned());
    }
    run.step("certbot dns-01 manual hooks", Interop::certbot_dns01);
    run.step("lego http-01", Interop::lego_http01);
    run.step("lego tls-alpn-01", Interop::lego_tls_alpn01);
    run.step("lego dns-01 exec provider", Interop::lego_dns01);
    run.step("lego wildcard dns-01 only", Interop::lego_wildcard);
    run.step("lego external account binding", Interop::lego_eab);

    let failures = std::mem::take(&mut run.failures);
    let panics = run.cluster.panics(&[1, 2, 3]);
    run.runtime.block_on(run.cluster.stop(STOP_GRACE));
    assert!(panics.is_empty(), "nodes panicked: {panics:#?}");
    assert!(
        failures.is_empty(),
        "{} ACME interoperability checks failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// The cluster, the DNS server and the clients of one run, and the failures found so far.
struct Interop {
    runtime: tokio::runtime::Runtime,
    cluster: DevCluster,
    dns: ChallTestSrv,
    /// Root certificate that verifies the nodes' ACME TLS and the issued certificates.
    bundle: PathBuf,
    work: PathBuf,
    /// Script that sets and clears TXT records in pebble-challtestsrv.
    hook: PathBuf,
    certbot: PathBuf,
    lego: PathBuf,
    /// Name of the running step, which prefixes the failures it records.
    step: String,
    failures: Vec<String>,
}

impl Interop {
    /// Runs one step and records its panic as a failure, with the nodes' recent log lines.
    /// Returns whether the step ran to its end, so that a step which needs its files can run
    /// even when a check that does not stop the step, such as a lint finding, failed.
    fn step(&mut self, name: &str, body: fn(&mut Interop)) -> bool {
        eprintln!("\n[acme] === step: {name}");
        self.step = name.to_owned();
        let failures_before = self.failures.len();
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| body(self)));
        let elapsed = started.elapsed().as_secs_f64();
        let completed = outcome.is_ok();
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| (*text).to_owned()))
                .unwrap_or_else(|| "the step panicked with a non-text value".to_owned());
            self.failures.push(format!("{name}: {message}"));
        }
        if self.failures.len() == failures_before {
            eprintln!("[acme] === step passed: {name} ({elapsed:.1} s)");
        } else {
            eprintln!("[acme] === step FAILED: {name} ({elapsed:.1} s)");
            self.print_logs();
        }
        completed
    }

    /// Records a failed check without ending the step, so that later checks of the step still run.
    fn record(&mut self, problems: Vec<String>) {
        for problem in problems {
            eprintln!("[acme] check failed: {problem}");
            self.failures.push(format!("{}: {problem}", self.step));
        }
    }

    fn print_logs(&self) {
        for id in 1..=3 {
            eprintln!(
                "[acme] --- node {id} node.log, last {LOG_TAIL_LINES} lines ---\n{}",
                tail_text(&self.cluster.node_log(id), LOG_TAIL_LINES)
            );
        }
        eprintln!("[acme] --- pebble-challtestsrv log, last 10 lines ---\n{}", tail_text(&self.dns.log(), 10));
    }

    fn directory(&self, node: u64) -> String {
        self.cluster.endpoint(node).acme.unwrap_or_else(|| panic!("endpoints.json lists no ACME URL for node {node}"))
    }

    /// Checks a saved certificate chain and records what fails.
    fn check_chain(&mut self, label: &str, chain: &Chain, names: &[&str]) {
        let problems = check_certificate(&self.work, label, &self.bundle, chain, names);
        self.record(problems);
    }

    // certbot

    fn certbot_home(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    /// Runs certbot with its folders in `home`, never prompting, trusting the cluster's root.
    fn certbot(&self, home: &Path, args: &[&str]) -> ClientRun {
        let mut all: Vec<String> = Vec::new();
        for (flag, folder) in [("--config-dir", "config"), ("--work-dir", "work"), ("--logs-dir", "logs")] {
            all.push(flag.to_owned());
            all.push(home.join(folder).display().to_string());
        }
        all.push("--non-interactive".to_owned());
        all.extend(args.iter().map(|arg| (*arg).to_owned()));
        let env = [("REQUESTS_CA_BUNDLE", self.bundle.display().to_string())];
        run_on_challenge_ports(|| run_client(&self.certbot, &all, &env, &[]))
    }

    /// Returns certbot's debug log of its latest run in `home` (older runs are rotated to
    /// letsencrypt.log.1 and on).
    fn certbot_log(home: &Path) -> String {
        std::fs::read_to_string(home.join("logs/letsencrypt.log")).unwrap_or_default()
    }

    /// Registers an account through node 1. --no-eff-email keeps certbot from sending the address
    /// to the EFF's mailing list service.
    fn certbot_register(&mut self) {
        let home = self.certbot_home("certbot-http");
        let server = self.directory(1);
        let run = self.certbot(
            &home,
            &["register", "--server", &server, "--agree-tos", "-m", "certbot@example.com", "--no-eff-email"],
        );
        run.assert_success("certbot register");
        let accounts = home.join("config/accounts");
        assert!(
            accounts.is_dir(),
            "certbot register wrote no account under {}:\n{}",
            accounts.display(),
            run.describe()
        );
    }

    /// Obtains a certificate through node 1 with certbot's standalone http-01 server on port 5002,
    /// with the account that `certbot_register` created.
    fn certbot_http01(&mut self) {
        let home = self.certbot_home("certbot-http");
        let server = self.directory(1);
        let run = self.certbot(
            &home,
            &[
                "certonly",
                "--server",
                &server,
                "--standalone",
                "--http-01-port",
                &HTTP01_PORT.to_string(),
                "--http-01-address",
                "127.0.0.1",
                "--cert-name",
                "http",
                "-d",
                "certbot.example.com",
                "-d",
                "www.certbot.example.com",
            ],
        );
        run.assert_success("certbot certonly --standalone");
        assert!(
            !run.output().contains("Account registered"),
            "certbot certonly registered a new account instead of using the one from certbot register:\n{}",
            run.describe()
        );
        let chain = Chain::read(&home.join("config/live/http/fullchain.pem"));
        self.check_chain("certbot-http01", &chain, &["certbot.example.com", "www.certbot.example.com"]);
    }

    /// Runs `certbot renew` twice on the certificate from node 1. Without --force-renewal, certbot
    /// 5 fetches the renewalInfo resource (RFC 9773) to decide whether to renew. With
    /// --force-renewal, certbot 5.8 renews without fetching it (renewal.py `should_renew` returns
    /// before its ARI check), so only the first run can show the ARI request.
    fn certbot_renew(&mut self) {
        let home = self.certbot_home("certbot-http");
        let live = home.join("config/live/http");
        let first = Chain::read(&live.join("fullchain.pem"));
        let ari_id = first.ari_id();

        let run = self.certbot(&home, &["renew", "--cert-name", "http", "--no-random-sleep-on-renew"]);
        run.assert_success("certbot renew");
        let log = Self::certbot_log(&home);
        let fetched = log.lines().any(|line| line.contains(&format!("/{ari_id} HTTP/1.1\" 200")));
        assert!(
            fetched,
            "certbot renew did not fetch renewalInfo for {ari_id} with status 200; certbot log lines about it: {:?}\n{}",
            log.lines().filter(|line| line.contains("renewal-info") || line.contains("ARI")).collect::<Vec<_>>(),
            run.describe()
        );
        assert!(
            !log.contains("An error occurred requesting ACME Renewal Information"),
            "certbot reported an ARI error:\n{}",
            tail_text(&log, 40)
        );
        assert!(
            run.output().contains("not yet due") || run.output().contains("not due for renewal"),
            "certbot renewed a certificate whose renewalInfo window starts days from now:\n{}",
            run.describe()
        );
        let unchanged = Chain::read(&live.join("fullchain.pem"));
        assert_eq!(unchanged.serial_hex(), first.serial_hex(), "certbot renew replaced the certificate");

        let run =
            self.certbot(&home, &["renew", "--cert-name", "http", "--force-renewal", "--no-random-sleep-on-renew"]);
        run.assert_success("certbot renew --force-renewal");
        let forced_ari = Self::certbot_log(&home).contains(&format!("/{ari_id} HTTP/1.1"));
        eprintln!("[acme] certbot renew --force-renewal fetched renewalInfo: {forced_ari}");
        let renewed = Chain::read(&live.join("fullchain.pem"));
        assert_ne!(
            renewed.serial_hex(),
            first.serial_hex(),
            "certbot renew --force-renewal kept the old certificate:\n{}",
            run.describe()
        );
        self.check_chain("certbot-renewed", &renewed, &["certbot.example.com", "www.certbot.example.com"]);
    }

    /// Revokes the first certificate through node 3, signed with the certificate's own key, and
    /// the renewed one through node 1 with the account. Then checks on node 2 that renewalInfo
    /// suggests replacing both now (Sigil's response for a revoked certificate), and that the CRL at
    /// the certificates' distribution point, when it is on loopback, lists both serials with their
    /// reasons.
    fn certbot_revoke(&mut self) {
        let home = self.certbot_home("certbot-http");
        let archive = home.join("config/archive/http");
        let first_path = archive.join("cert1.pem");
        let first = Chain::read(&first_path);
        let renewed = Chain::read(&archive.join("cert2.pem"));

        let server_3 = self.directory(3);
        let cert_path = first_path.display().to_string();
        let key_path = archive.join("privkey1.pem").display().to_string();
        let run = self.certbot(
            &home,
            &[
                "revoke",
                "--server",
                &server_3,
                "--cert-path",
                &cert_path,
                "--key-path",
                &key_path,
                "--reason",
                "keycompromise",
                "--no-delete-after-revoke",
            ],
        );
        run.assert_success("certbot revoke with the certificate key through node 3");

        let run = self
            .certbot(&home, &["revoke", "--cert-name", "http", "--reason", "superseded", "--no-delete-after-revoke"]);
        run.assert_success("certbot revoke with the account through node 1");

        for (label, chain) in [("first", &first), ("renewed", &renewed)] {
            match self.wait_ari_revoked(2, chain) {
                Ok(()) => eprintln!("[acme] node 2's renewalInfo suggests replacing the {label} certificate now"),
                Err(problem) => self.record(vec![format!("{label} certificate {}: {problem}", chain.serial_hex())]),
            }
        }

        let urls = first.crl_urls();
        if urls.is_empty() {
            eprintln!("[acme] the certificates name no CRL distribution point; the CRL check is skipped");
            return;
        }
        for url in urls {
            if loopback_http_target(&url).is_none() {
                eprintln!("[acme] the CRL URL {url} is not on loopback, so the test does not fetch it");
                continue;
            }
            let entries = match http_get_loopback(&url).and_then(|der| crl_entries(&der)) {
                Ok(entries) => entries,
                Err(problem) => {
                    self.record(vec![format!("CRL {url}: {problem}")]);
                    continue;
                }
            };
            for (chain, reason) in [(&first, REASON_KEY_COMPROMISE), (&renewed, REASON_SUPERSEDED)] {
                let serial = chain.serial_hex();
                let listed = entries.iter().find(|(entry, _)| *entry == serial).map(|(_, code)| *code);
                if listed == Some(reason) {
                    eprintln!("[acme] CRL {url} lists serial {serial} with reason {reason}");
                } else {
                    self.record(vec![format!(
                        "CRL {url} lists serial {serial} with reason {listed:?}, expected Some({reason}); entries: {entries:?}"
                    )]);
                }
            }
        }
    }

    /// Waits until node `node`'s renewalInfo for `chain`'s leaf suggests a window that ends by
    /// now, which Sigil returns for a revoked certificate.
    fn wait_ari_revoked(&self, node: u64, chain: &Chain) -> Result<(), String> {
        let directory = self.directory(node);
        let roots = std::fs::read(&self.bundle).expect("read bundle.pem");
        let ari_id = chain.ari_id();
        self.runtime.block_on(async {
            let mut session = Session::connect(&directory, &roots, AccountKey::generate(Algorithm::Es256))
                .await
                .map_err(|error| format!("read the directory {directory}: {error}"))?;
            let url = format!("{}/{ari_id}", session.url("renewalInfo"));
            let deadline = Instant::now() + REPLICATION_TIMEOUT;
            loop {
                let reply = session
                    .request(axum::http::Method::GET, &url, None)
                    .await
                    .map_err(|error| format!("GET {url}: {error}"))?;
                let body = reply.json();
                let end = body["suggestedWindow"]["end"].as_str().unwrap_or_default().to_owned();
                let ends_by_now = reply.status == axum::http::StatusCode::OK
                    && humantime::parse_rfc3339(&end).is_ok_and(|end| end <= SystemTime::now());
                if ends_by_now {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "GET {url} on node {node} returned {} {} for {REPLICATION_TIMEOUT:?}; expected a window that ends by now",
                        reply.status,
                        String::from_utf8_lossy(&reply.body)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    }

    /// Obtains a certificate for a name and its wildcard through node 2 with dns-01, where
    /// certbot's manual hooks set both TXT values at the same name in pebble-challtestsrv.
    fn certbot_dns01(&mut self) {
        let home = self.certbot_home("certbot-dns");
        let server = self.directory(2);

        // certbot checks that the first word of a hook is an executable, so the path is not quoted.
        let hook = self.hook.display().to_string();
        assert!(!hook.contains(char::is_whitespace), "the hook path {hook:?} must not contain whitespace");
        let auth_hook = format!("{hook} certbot-auth");
        let cleanup_hook = format!("{hook} certbot-cleanup");

        let run = self.certbot(
            &home,
            &[
                "certonly",
                "--server",
                &server,
                "--agree-tos",
                "-m",
                "certbot-dns@example.com",
                "--no-eff-email",
                "--manual",
                "--preferred-challenges",
                "dns",
                "--manual-auth-hook",
                &auth_hook,
                "--manual-cleanup-hook",
                &cleanup_hook,
                "--cert-name",
                "dns",
                "-d",
                "certbot-dns.example.com",
                "-d",
                "*.certbot-dns.example.com",
            ],
        );
        run.assert_success("certbot certonly --manual dns-01");
        assert!(
            run.output().contains("set TXT _acme-challenge.certbot-dns.example.com."),
            "certbot's auth hook did not report setting the TXT record:\n{}",
            run.describe()
        );

        let chain = Chain::read(&home.join("config/live/dns/fullchain.pem"));
        self.check_chain("certbot-dns01", &chain, &["certbot-dns.example.com", "*.certbot-dns.example.com"]);
    }

    // lego. Debian's lego 4.9.1 has no ACME Renewal Information support (`lego renew` has no ARI
    // option and the binary has no renewalInfo code), so certbot covers renewal with ARI above.

    /// Runs `lego --server URL --path PATH --accept-tos --email EMAIL ARGS`, trusting the
    /// cluster's root.
    fn lego(&self, node: u64, path: &Path, email: &str, args: &[&str], env: &[(&str, String)]) -> ClientRun {
        let mut all: Vec<String> = vec![
            "--server".to_owned(),
            self.directory(node),
            "--path".to_owned(),
            path.display().to_string(),
            "--accept-tos".to_owned(),
            "--email".to_owned(),
            email.to_owned(),
        ];
        all.extend(args.iter().map(|arg| (*arg).to_owned()));
        let mut env = env.to_vec();
        env.push(("LEGO_CA_CERTIFICATES", self.bundle.display().to_string()));
        run_on_challenge_ports(|| run_client(&self.lego, &all, &env, &["--hmac"]))
    }

    /// Reads the chain lego saved for `domain` (a wildcard's `*` becomes `_` in the file name).
    fn lego_chain(path: &Path, domain: &str) -> Chain {
        let file = domain.replace('*', "_");
        let issuer = path.join(format!("certificates/{file}.issuer.crt"));
        assert!(issuer.is_file(), "lego saved no issuer certificate at {}", issuer.display());
        Chain::read(&path.join(format!("certificates/{file}.crt")))
    }

    fn lego_http01(&mut self) {
        let path = self.work.join("lego-http");
        let listen = format!("127.0.0.1:{HTTP01_PORT}");
        let run = self.lego(
            2,
            &path,
            "lego-http@example.com",
            &["--domains", "lego-http.example.com", "--http", "--http.port", &listen, "run"],
            &[],
        );
        run.assert_success("lego --http run");
        let chain = Self::lego_chain(&path, "lego-http.example.com");
        self.check_chain("lego-http01", &chain, &["lego-http.example.com"]);
    }

    fn lego_tls_alpn01(&mut self) {
        let path = self.work.join("lego-alpn");
        let listen = format!("127.0.0.1:{TLS_ALPN01_PORT}");
        let run = self.lego(
            3,
            &path,
            "lego-alpn@example.com",
            &["--domains", "lego-alpn.example.com", "--tls", "--tls.port", &listen, "run"],
            &[],
        );
        run.assert_success("lego --tls run");
        assert!(run.output().contains("TLS-ALPN-01"), "lego did not report solving TLS-ALPN-01:\n{}", run.describe());
        let chain = Self::lego_chain(&path, "lego-alpn.example.com");
        self.check_chain("lego-tls-alpn01", &chain, &["lego-alpn.example.com"]);
    }

    /// Returns the arguments and environment for lego's exec DNS provider with the TXT hook. lego's
    /// own propagation check queries pebble-challtestsrv, and --dns.disable-cp limits it to that
    /// server, because the full check first looks up the zone's SOA record and pebble-challtestsrv
    /// 2.4.0 returns the response code NOTIMP for SOA queries.
    fn lego_dns_options(&self) -> (Vec<String>, Vec<(&'static str, String)>) {
        let args = vec![
            "--dns".to_owned(),
            "exec".to_owned(),
            "--dns.resolvers".to_owned(),
            self.dns.dns.to_string(),
            "--dns.disable-cp".to_owned(),
        ];
        let env = vec![
            ("EXEC_PATH", self.hook.display().to_string()),
            ("EXEC_POLLING_INTERVAL", "1".to_owned()),
            ("EXEC_PROPAGATION_TIMEOUT", "30".to_owned()),
            // lego waits this many seconds between two names of one order. Its default is 60.
            ("EXEC_SEQUENCE_INTERVAL", "1".to_owned()),
        ];
        (args, env)
    }

    fn lego_dns01(&mut self) {
        let path = self.work.join("lego-dns");
        let (mut args, env) = self.lego_dns_options();
        args.extend(["--domains".to_owned(), "lego-dns.example.com".to_owned(), "run".to_owned()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = self.lego(1, &path, "lego-dns@example.com", &args, &env);
        run.assert_success("lego --dns exec run");
        assert!(
            run.output().contains("set TXT _acme-challenge.lego-dns.example.com."),
            "the exec provider did not report setting the TXT record:\n{}",
            run.describe()
        );
        let chain = Self::lego_chain(&path, "lego-dns.example.com");
        self.check_chain("lego-dns01", &chain, &["lego-dns.example.com"]);
    }

    /// Orders `*.w.example.com` through node 3. With only the http-01 and tls-alpn-01 solvers, lego
    /// must find no usable challenge, because a wildcard authorization offers only dns-01
    /// (RFC 8555, section 7.1.3). With the exec DNS provider it must obtain the certificate.
    fn lego_wildcard(&mut self) {
        let path = self.work.join("lego-wildcard");
        let email = "lego-wildcard@example.com";
        let http = format!("127.0.0.1:{HTTP01_PORT}");
        let tls = format!("127.0.0.1:{TLS_ALPN01_PORT}");
        let run = self.lego(
            3,
            &path,
            email,
            &["--domains", "*.w.example.com", "--http", "--http.port", &http, "--tls", "--tls.port", &tls, "run"],
            &[],
        );
        assert!(
            !run.status.success(),
            "lego obtained a wildcard certificate without dns-01, so the server offered http-01 or tls-alpn-01:\n{}",
            run.describe()
        );
        assert!(
            // lego 4.9.1's error when an authorization offers no challenge it has a solver for.
            run.output().contains("could not determine solvers"),
            "lego failed for another reason than finding no solver for the wildcard authorization:\n{}",
            run.describe()
        );

        let (mut args, env) = self.lego_dns_options();
        args.extend(["--domains".to_owned(), "*.w.example.com".to_owned(), "run".to_owned()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = self.lego(3, &path, email, &args, &env);
        run.assert_success("lego --dns exec run for *.w.example.com");
        let chain = Self::lego_chain(&path, "*.w.example.com");
        self.check_chain("lego-wildcard", &chain, &["*.w.example.com"]);
    }

    /// Restarts node 3 with `acme.external_account_required = true`. A newAccount without a
    /// binding must be rejected with externalAccountRequired (RFC 8555, section 7.3.4). lego
    /// 4.9.1 reads the directory's meta and stops before sending newAccount, so the request is
    /// sent with sigil-acme's test client. lego then registers with a key made by
    /// `sigil acme eab add`, which reaches node 1, and obtains a certificate through node 3.
    fn lego_eab(&mut self) {
        self.runtime.block_on(async {
            self.cluster.kill_node(3).await;
            self.cluster.set_options(3, "acme", &[("external_account_required", toml::Value::Boolean(true))]);
            self.cluster.serve_node(3);
            self.cluster.wait_ready(3, READY_TIMEOUT).await;
        });
        let directory = self.directory(3);
        let roots = std::fs::read(&self.bundle).expect("read bundle.pem");

        let (meta, rejection) = self.runtime.block_on(async {
            let mut session = Session::connect(&directory, &roots, AccountKey::generate(Algorithm::Es256))
                .await
                .unwrap_or_else(|error| panic!("read the directory {directory}: {error}"));
            let meta = session.directory()["meta"]["externalAccountRequired"].clone();
            let payload = serde_json::json!({
                "termsOfServiceAgreed": true,
                "contact": ["mailto:no-binding@example.com"],
            });
            let reply = session.new_account(&payload).await.unwrap_or_else(|error| panic!("send newAccount: {error}"));
            (meta, reply)
        });
        eprintln!(
            "[acme] newAccount without a binding on node 3 returned {} {}",
            rejection.status,
            String::from_utf8_lossy(&rejection.body)
        );
        assert_eq!(meta, serde_json::Value::Bool(true), "node 3's directory meta.externalAccountRequired");
        let problem = rejection.problem();
        assert!(
            problem.as_ref().is_some_and(|problem| problem.is(ProblemType::ExternalAccountRequired))
                && rejection.status.is_client_error(),
            "newAccount without externalAccountBinding returned {} {}; expected a 4xx problem of type {}",
            rejection.status,
            String::from_utf8_lossy(&rejection.body),
            ProblemType::ExternalAccountRequired.urn()
        );

        let path = self.work.join("lego-eab");
        let email = "lego-eab@example.com";
        let listen = format!("127.0.0.1:{HTTP01_PORT}");
        let order = ["--domains", "lego-eab.example.com", "--http", "--http.port", listen.as_str()];
        let mut without: Vec<&str> = order.to_vec();
        without.push("run");
        let run = self.lego(3, &path, email, &without, &[]);
        assert!(!run.status.success(), "lego obtained a certificate without a binding:\n{}", run.describe());
        assert!(
            run.output().contains("External Account Binding"),
            "lego failed without naming the missing external account binding:\n{}",
            run.describe()
        );

        let dev_dir = self.cluster.dir.display().to_string();
        let sigil = common::sigil_bin();
        let run = run_client(
            &sigil,
            &args(&["acme", "eab", "add", "--dev-dir", &dev_dir, "--label", "lego-interop"]),
            &[],
            &[],
        );
        run.assert_success("sigil acme eab add");
        let field = |name: &str| {
            run.stdout
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|value| value.trim().to_owned())
                .unwrap_or_else(|| panic!("sigil acme eab add printed no {name:?} line"))
        };
        let (key_id, hmac_key) = (field("key_id:"), field("hmac_key:"));

        let mut with: Vec<&str> = order.to_vec();
        with.extend(["--eab", "--kid", &key_id, "--hmac", &hmac_key, "run"]);
        let run = self.lego(3, &path, email, &with, &[]);
        run.assert_success("lego --eab run");
        let chain = Self::lego_chain(&path, "lego-eab.example.com");
        self.check_chain("lego-eab", &chain, &["lego-eab.example.com"]);

        let run = run_client(&sigil, &args(&["acme", "eab", "list", "--dev-dir", &dev_dir, "--json"]), &[], &[]);
        run.assert_success("sigil acme eab list");
        let keys: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_else(|error| {
            panic!("sigil acme eab list --json printed invalid JSON ({error}):\n{}", run.stdout)
        });
        let key = keys.as_array().into_iter().flatten().find(|key| key["key_id"] == key_id.as_str());
        let account = key.and_then(|key| key["account"].as_str()).unwrap_or_default();
        assert!(!account.is_empty(), "EAB key {key_id} is not bound to an account after lego --eab: {keys}");
    }
}

/// Runs a client once ports 5001 and 5002 are free, and again, at most `BIND_ATTEMPTS` times in
/// all, when it failed because another process bound one of them first. Other test binaries,
/// such as tests/acme_lib.rs, bind port 5002 too. `cargo test` runs binaries one at a time, but
/// runs started by hand can overlap.
fn run_on_challenge_ports(run: impl Fn() -> ClientRun) -> ClientRun {
    let mut attempt = 1;
    loop {
        wait_port_free(HTTP01_PORT, PORT_WAIT);
        wait_port_free(TLS_ALPN01_PORT, PORT_WAIT);
        let result = run();
        let output = result.output();
        // certbot's and lego 4.9.1's messages when the port is taken.
        let port_taken = output.contains("Could not bind TCP port") || output.contains("address already in use");
        if result.status.success() || !port_taken || attempt == BIND_ATTEMPTS {
            return result;
        }
        eprintln!("[acme] attempt {attempt} of {BIND_ATTEMPTS} failed because a challenge port was taken; retrying");
        attempt += 1;
    }
}

fn args(values: &[&str]) -> Vec<String> {
    values.iter().map(|value| (*value).to_owned()).collect()
}
