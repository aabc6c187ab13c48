//! Micro-benchmarks of the issuance hot path: CSR checks, HSM signing with one and several
//! sessions, and building plus signing a leaf. Uses a fresh SoftHSM token in the test token
//! folder that .cargo/config.toml points SOFTHSM2_CONF at.
//!
//! Run: `cargo bench --bench issuance`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sigil::ca::{CaCertificateSpec, CaChain, HsmSigner, IssuingCa, LeafRequest, self_signed_root, sign_intermediate};
use sigil::csr::check_csr;
use sigil_hsm::{Extractability, Hsm, HsmConfig, HsmMetrics, KeyRef, KeyType, Pin, TokenSelector};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const SESSIONS: usize = 4;

fn open_bench_hsm() -> Hsm {
    std::fs::create_dir_all("/tmp/sigil-test-tokens").expect("create token folder");
    let label = format!("bench-{:08x}", rand::random::<u32>());
    let pin = || Pin::new("bench-user-pin".to_owned());
    sigil_hsm::init_token(MODULE.as_ref(), &label, &Pin::new("bench-so-pin".to_owned()), &pin()).expect("init token");
    let config = HsmConfig { module: MODULE.into(), token: TokenSelector::Label(label), sessions: SESSIONS };
    Hsm::open(&config, pin(), HsmMetrics::unregistered()).expect("open HSM")
}

fn dev_ca(hsm: &Hsm) -> (IssuingCa, KeyRef) {
    let root_key = hsm.generate_key_pair("bench-root", KeyType::EcP256, Extractability::Never).expect("root key");
    let ca_key = hsm.generate_key_pair("bench-ca", KeyType::EcP256, Extractability::Never).expect("CA key");
    let root = HsmSigner::new(hsm.clone(), root_key).expect("root signer");
    let intermediate = HsmSigner::new(hsm.clone(), ca_key.clone()).expect("CA signer");
    let spec = |cn| CaCertificateSpec {
        common_name: cn,
        organization: "Bench",
        validity: Duration::from_secs(86_400),
        path_len: Some(0),
    };
    let root_der = self_signed_root(&root, &CaCertificateSpec { path_len: None, ..spec("Bench Root") }).expect("root");
    let ca_der = sign_intermediate(&intermediate, &root, &root_der, &spec("Bench CA")).expect("intermediate");
    let chain = CaChain { intermediates_der: vec![ca_der], roots_der: vec![root_der] };
    (IssuingCa::load(intermediate, chain, "Bench", Duration::from_secs(30)).expect("load CA"), ca_key)
}

fn bench(c: &mut Criterion) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let csr = sigil::client::svid_csr(&key, "spiffe://example.org/bench/workload", &["web.example.org".to_owned()])
        .expect("CSR");

    let mut group = c.benchmark_group("csr");
    group.throughput(Throughput::Elements(1));
    group.bench_function("check_p256", |b| b.iter(|| check_csr(&csr, "example.org").expect("valid CSR")));
    group.finish();

    let hsm = open_bench_hsm();
    let (ca, ca_key) = dev_ca(&hsm);
    let message = [0x5au8; 300];

    let mut group = c.benchmark_group("hsm");
    group.throughput(Throughput::Elements(1));
    group.bench_function("sign_p256_1_thread", |b| b.iter(|| hsm.sign(&ca_key, &message).expect("sign")));
    group.bench_function(format!("sign_p256_{SESSIONS}_threads"), |b| {
        b.iter_custom(|iterations| {
            parallel(iterations, SESSIONS, |_| {
                hsm.sign(&ca_key, &message).expect("sign");
            })
        })
    });
    group.finish();

    let checked = check_csr(&csr, "example.org").expect("valid CSR");
    let request = LeafRequest {
        usage: sigil::ca::LeafUsage::Svid,
        publication: None,
        spki_der: &checked.spki_der,
        key_kind: checked.key_kind,
        spiffe_id: checked.spiffe_id.as_str(),
        dns_names: &checked.dns_names,
        ip_addresses: &[],
        ttl: Duration::from_secs(3600),
    };
    let mut group = c.benchmark_group("leaf");
    group.throughput(Throughput::Elements(1));
    group.bench_function("build_and_sign_p256", |b| {
        b.iter(|| ca.issue_leaf(&request, time::OffsetDateTime::now_utc()).expect("issue"))
    });
    let ca = Arc::new(ca);
    group.bench_function(format!("build_and_sign_p256_{SESSIONS}_threads"), |b| {
        b.iter_custom(|iterations| {
            parallel(iterations, SESSIONS, |_| {
                ca.issue_leaf(&request, time::OffsetDateTime::now_utc()).expect("issue");
            })
        })
    });
    group.finish();
}

/// Runs `iterations` calls of `work` spread over `threads` threads and returns the wall time.
fn parallel(iterations: u64, threads: usize, work: impl Fn(u64) + Sync) -> Duration {
    let per_thread = iterations.div_ceil(threads as u64);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| (0..per_thread).for_each(&work));
        }
    });
    started.elapsed()
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).sample_size(30);
    targets = bench
}
criterion_main!(benches);
