//! Offline set-up commands: token initialization, CA key generation, installing a signed
//! intermediate, and bootstrapping a client credential. They need the node to be stopped, because
//! a running node keeps the ledger open, and they write through a Raft node of their own, so they
//! work only while the node is the only voter of its cluster (a new cluster, before other nodes
//! join). The first of them on a new node bootstraps that cluster.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use sigil_hsm::{Extractability, Pin};
use time::OffsetDateTime;

use crate::ca::{
    CaCertificateSpec, CaChain, HsmSigner, check_chain, intermediate_csr, self_signed_root, sign_intermediate,
};
use crate::cli::InitArgs;
use crate::config::Config;
use crate::ledger::{Command, InstallCa};
use crate::replica::{Replica, ReplicaSettings};
use crate::server::{load_ca, open_hsm};

/// Initializes the configured token and sets its user PIN.
///
/// # Errors
///
/// Fails when a PIN cannot be read, no free slot exists, or the label is taken.
pub fn init_token(config_path: &Path, so_pin_file: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let Some(label) = &config.hsm.token_label else {
        bail!("hsm.token_label must be set to initialize a token (token_serial cannot name a new token)");
    };
    let so_pin = Pin::from_file(so_pin_file).context("read security officer PIN")?;
    let user_pin = config.hsm_pin().context("read user PIN")?;
    sigil_hsm::init_token(&config.hsm.module, label, &so_pin, &user_pin)
        .with_context(|| format!("initialize token {label:?}"))?;
    println!("initialized token {label:?}");
    Ok(())
}

/// Generates the intermediate key and either writes its CSR or sets up a development root.
///
/// # Errors
///
/// Fails when the key exists already, a CA is already installed, or the HSM or ledger fails.
pub async fn init(args: &InitArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let replica = open_offline(&config).await?;
    if let Some(active) = replica.ledger().active_ca()? {
        bail!(
            "a CA is already installed in {} (key {:?}); refusing to generate another",
            config.ledger_path().display(),
            active.key_label
        );
    }
    let hsm = open_hsm(&config, None)?;
    let key_type = config.ca_key_type()?;
    let extractability = match &config.hsm.kek_label {
        Some(kek_label) => {
            hsm.find_kek(kek_label).with_context(|| {
                format!("find key-encryption key {kek_label:?} (install it first with `sigil hsm install-kek`)")
            })?;
            Extractability::WrapWithTrustedOnly
        }
        None => Extractability::Never,
    };
    let key = hsm
        .generate_key_pair(&config.ca.key_label, key_type, extractability)
        .with_context(|| format!("generate CA key {:?}", config.ca.key_label))?;
    let intermediate = HsmSigner::new(hsm.clone(), key)?;
    let intermediate_spec = CaCertificateSpec {
        common_name: &config.ca.common_name,
        organization: &config.ca.organization,
        validity: args.validity,
        path_len: Some(config.ca.path_len),
    };

    if !args.dev_root {
        let path = args.csr_out.as_deref().context("--csr-out is required without --dev-root")?;
        let csr = intermediate_csr(&intermediate, &intermediate_spec)?;
        std::fs::write(path, csr).with_context(|| format!("write CSR to {}", path.display()))?;
        println!("generated {key_type} key {:?}; CSR written to {}", config.ca.key_label, path.display());
        println!("have the offline root sign it, then run: sigil ca install --config FILE --cert CERT --root ROOT");
        return Ok(());
    }

    let root_label = format!("{}-dev-root", config.ca.key_label);
    let root_key = hsm
        .generate_key_pair(&root_label, key_type, Extractability::Never)
        .with_context(|| format!("generate development root key {root_label:?}"))?;
    let root = HsmSigner::new(hsm.clone(), root_key)?;
    let root_spec = CaCertificateSpec {
        common_name: &format!("Sigil Development Root CA ({})", config.trust_domain),
        organization: &config.ca.organization,
        validity: args.validity + Duration::from_secs(365 * 24 * 3600),
        path_len: None,
    };
    let root_der = self_signed_root(&root, &root_spec)?;
    let intermediate_der = sign_intermediate(&intermediate, &root, &root_der, &intermediate_spec)?;
    let chain = CaChain { intermediates_der: vec![intermediate_der], roots_der: vec![root_der] };
    check_chain(&intermediate, &chain).context("check the new development chain")?;
    install_chain(&replica, &config.ca.key_label, chain).await?;
    println!(
        "generated {key_type} CA key {:?} and development root {root_label:?}; chain installed",
        config.ca.key_label
    );
    Ok(())
}

/// Generates one key-encryption key in memory and installs it in the token of every
/// configuration, then drops it; the key exists nowhere else afterwards.
///
/// # Errors
///
/// Fails when the lists differ in length, a configuration sets no `hsm.kek_label`, a PIN cannot be
/// read, or an installation fails (the tokens installed before keep the key).
pub fn install_kek(configs: &[std::path::PathBuf], so_pin_files: &[std::path::PathBuf]) -> anyhow::Result<()> {
    if configs.len() != so_pin_files.len() {
        bail!("give one --so-pin-file per --config: {} configs, {} PIN files", configs.len(), so_pin_files.len());
    }
    let kek = sigil_hsm::KekMaterial::generate().context("generate the key-encryption key")?;
    for (config_path, so_pin_file) in configs.iter().zip(so_pin_files) {
        let config = Config::load(config_path)?;
        let label = config
            .hsm
            .kek_label
            .as_deref()
            .with_context(|| format!("{} sets no hsm.kek_label", config_path.display()))?;
        let so_pin = Pin::from_file(so_pin_file).context("read security officer PIN")?;
        let user_pin = config.hsm_pin().context("read user PIN")?;
        let hsm_config = config.hsm_config();
        sigil_hsm::install_kek(&config.hsm.module, &hsm_config.token, &so_pin, &user_pin, label, &kek)
            .with_context(|| format!("install key-encryption key {label:?} for node {}", config.node_id))?;
        println!("installed key-encryption key {label:?} in the token of node {}", config.node_id);
    }
    Ok(())
}

/// Copies the CA key named by `ca.key_label` from the HSM of the node configured in `from` to the
/// HSM of the node configured in `to`, by wrap and unwrap under `hsm.kek_label`.
///
/// # Errors
///
/// Fails when the configurations disagree on the labels, either HSM cannot be opened, the key
/// cannot be wrapped (not wrap-with-trusted, KEK not trusted) or unwrapped (label taken, KEKs
/// differ).
pub fn copy_ca_key(from: &Path, to: &Path) -> anyhow::Result<()> {
    let source = Config::load(from)?;
    let target = Config::load(to)?;
    let kek_label =
        source.hsm.kek_label.clone().with_context(|| format!("{} sets no hsm.kek_label", from.display()))?;
    if target.hsm.kek_label.as_deref() != Some(kek_label.as_str()) {
        bail!("{} must set hsm.kek_label = {kek_label:?} like {}", to.display(), from.display());
    }
    if source.ca.key_label != target.ca.key_label {
        bail!(
            "ca.key_label differs: {:?} in {}, {:?} in {}",
            source.ca.key_label,
            from.display(),
            target.ca.key_label,
            to.display()
        );
    }
    let source_hsm = open_hsm(&source, None)?;
    let key = source_hsm
        .find_key(&source.ca.key_label)
        .with_context(|| format!("find CA key {:?} of node {}", source.ca.key_label, source.node_id))?;
    let wrapped = source_hsm.wrap_key(&kek_label, &key).context("wrap the CA key")?;
    let target_hsm = open_hsm(&target, None)?;
    target_hsm.unwrap_key(&kek_label, &wrapped).context("unwrap the CA key into the target HSM")?;
    println!(
        "copied CA key {:?} from the HSM of node {} to the HSM of node {}",
        source.ca.key_label, source.node_id, target.node_id
    );
    Ok(())
}

/// Installs an intermediate signed by an offline root, after checking it against the HSM key.
///
/// # Errors
///
/// Fails when the files cannot be read, the chain does not check out, or the ledger fails.
pub async fn install(config_path: &Path, cert: &Path, root: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let intermediates_der = read_pem_certificates(cert)?;
    let roots_der = read_pem_certificates(root)?;
    let replica = open_offline(&config).await?;
    let hsm = open_hsm(&config, None)?;
    let key = hsm.find_key(&config.ca.key_label).with_context(|| format!("find CA key {:?}", config.ca.key_label))?;
    let signer = HsmSigner::new(hsm, key)?;
    let chain = CaChain { intermediates_der, roots_der };
    check_chain(&signer, &chain).context("check the certificate chain")?;
    install_chain(&replica, &config.ca.key_label, chain).await?;
    println!("installed the CA chain for key {:?}", config.ca.key_label);
    Ok(())
}

/// Opens the node's replicated ledger for an offline command, bootstrapping a new single-node
/// cluster when the node has no Raft log yet, and waits until it can write.
///
/// # Errors
///
/// Fails when the node is not the only voter of its cluster or cannot commit within 10 s.
pub async fn open_offline(config: &Config) -> anyhow::Result<Replica> {
    let replica = Replica::open_offline(&ReplicaSettings::from_config(config), true)?;
    replica.wait_for_leader(Duration::from_secs(10)).await;
    match tokio::time::timeout(Duration::from_secs(10), replica.sync_read()).await {
        Ok(Ok(_)) => Ok(replica),
        Ok(Err(error)) => Err(anyhow::anyhow!(
            "node {} cannot write its ledger offline ({error}); offline commands work only while the node is the \
             only voter of its cluster, so run this through the running cluster instead",
            config.node_id
        )),
        Err(_) => bail!(
            "node {} could not commit within 10 s; offline commands work only while the node is the only voter \
             of its cluster",
            config.node_id
        ),
    }
}

async fn install_chain(replica: &Replica, key_label: &str, chain: CaChain) -> anyhow::Result<()> {
    let command = Command::install_ca(InstallCa {
        key_label: key_label.to_owned(),
        intermediates_der: chain.intermediates_der,
        roots_der: chain.roots_der,
        installed_at_unix: OffsetDateTime::now_utc().unix_timestamp(),
    });
    let request_id = sigil_raft::RequestId::random();
    replica.write(request_id, &command).await.context("record the CA chain in the ledger")?;
    Ok(())
}

/// Reads every CERTIFICATE block of a PEM file as DER.
///
/// # Errors
///
/// Names the file when it cannot be read or contains no certificate.
pub fn read_pem_certificates(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let text = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let blocks = pem::parse_many(&text).with_context(|| format!("parse PEM in {}", path.display()))?;
    let certs: Vec<Vec<u8>> =
        blocks.into_iter().filter(|b| b.tag() == "CERTIFICATE").map(pem::Pem::into_contents).collect();
    if certs.is_empty() {
        bail!("{} contains no CERTIFICATE block", path.display());
    }
    Ok(certs)
}

/// Encodes DER certificates as concatenated PEM blocks.
pub fn certificates_to_pem<'a>(certs: impl IntoIterator<Item = &'a Vec<u8>>) -> String {
    certs.into_iter().map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone()))).collect()
}

/// Writes `contents` to `path` readable by the owner only.
///
/// # Errors
///
/// Names the file on failure.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(contents).with_context(|| format!("write {}", path.display()))
}

/// Issues a client credential from the installed CA and records it in the ledger.
///
/// # Errors
///
/// Fails when the SPIFFE ID is invalid, the CA cannot be loaded, or files cannot be written.
pub async fn issue_client(config_path: &Path, spiffe_id: &str, out: &Path, ttl: Duration) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let id = crate::spiffe_id::SpiffeId::parse(spiffe_id)?;
    if id.trust_domain() != config.trust_domain {
        bail!("SPIFFE ID {id} is not in trust domain {:?}", config.trust_domain);
    }
    let names = ServerNames::default();
    issue_credential(&config, crate::issuance::PROFILE_CLIENT_BOOTSTRAP, id.as_str(), &names, out, ttl).await?;
    println!("issued client credential for {id} into {}", out.display());
    Ok(())
}

/// Issues the node certificate of the node configured in `node_config_path` (its SPIFFE ID and
/// its `listen.tls_dns_names` and `listen.tls_ip_addresses`) from the CA of the stopped node
/// configured in `config_path`, into the new node's `DATA_DIR/node-tls`.
///
/// # Errors
///
/// Fails when the nodes are in different trust domains, the CA cannot be loaded, or files cannot
/// be written.
pub async fn issue_node_certificate(config_path: &Path, node_config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let node = Config::load(node_config_path)?;
    if node.trust_domain != config.trust_domain {
        bail!("node {} is in trust domain {:?}, not {:?}", node.node_id, node.trust_domain, config.trust_domain);
    }
    let names = ServerNames { dns: node.listen.tls_dns_names.clone(), ips: node.listen.tls_ip_addresses.clone() };
    let out = node.node_tls_path();
    let profile = crate::issuance::PROFILE_NODE_TLS;
    issue_credential(&config, profile, &node.node_spiffe_id(), &names, &out, node.issuance.node_cert_ttl).await?;
    println!("issued the node certificate of node {} into {}", node.node_id, out.display());
    Ok(())
}

/// DNS names and IP addresses for a server certificate.
#[derive(Debug, Default)]
struct ServerNames {
    dns: Vec<String>,
    ips: Vec<std::net::IpAddr>,
}

/// Issues a P-256 credential for `spiffe_id` from the CA of the stopped node in `config`, records
/// it, and writes cert.pem (leaf, then intermediates), key.pem (mode 0600) and bundle.pem to `out`.
async fn issue_credential(
    config: &Config,
    profile: &str,
    spiffe_id: &str,
    names: &ServerNames,
    out: &Path,
    ttl: Duration,
) -> anyhow::Result<()> {
    let replica = std::sync::Arc::new(open_offline(config).await?);
    let hsm = open_hsm(config, None)?;
    let ca = std::sync::Arc::new(load_ca(config, replica.ledger(), &hsm)?);
    let registry = prometheus::Registry::new();
    let issuance = crate::issuance::Issuance::new(
        std::sync::Arc::clone(&ca),
        crate::policy::Policy::new(&config.policy),
        std::sync::Arc::clone(&replica),
        std::sync::Arc::new(crate::audit::AuditLog::disabled()),
        crate::metrics::Metrics::new(registry)?,
        crate::issuance::IssuanceSettings {
            node_id: config.node_id,
            trust_domain: config.trust_domain.clone(),
            default_ttl: config.issuance.default_ttl,
        },
    );

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generate key")?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let leaf = issuance
        .issue_internal(profile, &spki, spiffe_id, &names.dns, &names.ips, ttl)
        .await
        .with_context(|| format!("issue a certificate for {spiffe_id}"))?;

    let mut chain = vec![leaf.der];
    chain.extend(ca.chain().intermediates_der.iter().cloned());
    crate::node_tls::save(out, &chain, &key.serialize_pem(), &ca.chain().roots_der)?;
    Ok(())
}
