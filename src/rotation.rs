//! CA rotation: preparing a new CA version beside the current one, and switching each node's
//! signing CA at the version's activation time, or at once when the signing CA's root is tainted.
//!
//! A prepared version is in the ledger, and so in the trust bundle, before it signs anything.
//! Its intermediate key travels in the ledger wrapped under the cluster's key-encryption key,
//! and each node unwraps it into its own HSM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use ring::digest::{SHA256, digest};
use sigil_hsm::{Extractability, Hsm, KeyRef, WrappedKey};
use time::OffsetDateTime;
use tokio::sync::watch;
use tracing::{error, info, warn};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;

use crate::bundle;
use crate::ca::{CaCertificateSpec, CaChain, HsmSigner, IssuingCa, check_chain, self_signed_root, sign_intermediate};
use crate::config::Config;
use crate::issuance::Issuance;
use crate::ledger::{CaVersion, Command, CommandResult, InstallCa, KvCondition, KvTransaction, KvWrite, Ledger};
use crate::peer_tls::NodePeerTls;
use crate::replica::WriteError;
use crate::tls::{ClientTrust, NodeCertResolver};

/// Activation delay of a rotation that sets none.
pub const DEFAULT_ACTIVATE_AFTER: Duration = Duration::from_secs(3600);

/// Maximum wait between two checks of the signing CA, so that an activation time is met even
/// without a ledger change.
const RECHECK: Duration = Duration::from_secs(5);

/// Chooses the version that signs at `now`: the newest active one whose roots are not tainted and
/// whose intermediate has not expired, or the newest prepared one when every active one is tainted.
pub fn select_signing(versions: &[CaVersion], now: i64, is_tainted: impl Fn(&[u8]) -> bool) -> Option<&CaVersion> {
    let usable: Vec<&CaVersion> = versions
        .iter()
        .filter(|version| !version.roots_der.iter().any(|root| is_tainted(root)))
        .filter(|version| intermediate_not_after(version).is_some_and(|not_after| not_after > now))
        .collect();
    let active = usable.iter().rev().find(|version| version.activate_at_unix <= now).copied();
    // When every active version is tainted, a prepared one signs before its time.
    active.or_else(|| usable.last().copied())
}

fn intermediate_not_after(version: &CaVersion) -> Option<i64> {
    let der = version.intermediates_der.first()?;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Returns the CA version that signs at `now` on this node's ledger.
///
/// # Errors
///
/// Fails when the ledger cannot be read.
pub fn signing_version(ledger: &Ledger, now: i64) -> anyhow::Result<Option<CaVersion>> {
    let versions = ledger.ca_versions().context("read CA versions")?;
    let mut tainted = std::collections::HashSet::new();
    for version in &versions {
        for root in &version.roots_der {
            if ledger.kv_get(&bundle::taint_key(root)).context("read taint marks")?.is_some() {
                tainted.insert(root.clone());
            }
        }
    }
    Ok(select_signing(&versions, now, |root| tainted.contains(root)).cloned())
}

/// Finds the version's intermediate key in the HSM, unwrapping it from the ledger first when
/// this node does not hold it yet, and loads the version as an issuing CA. BLOCKING.
///
/// # Errors
///
/// Fails when the key is missing and cannot be unwrapped, or does not match the certificate.
pub fn load_version(config: &Config, hsm: &Hsm, version: &CaVersion) -> anyhow::Result<IssuingCa> {
    let key = match hsm.find_key(&version.key_label) {
        Ok(key) => key,
        Err(_) if !version.wrapped_key.is_empty() => {
            let kek_label = config.hsm.kek_label.as_deref().with_context(|| {
                format!("CA version {} comes wrapped, but hsm.kek_label is not set", version.version)
            })?;
            let wrapped = WrappedKey::decode(&version.wrapped_key)
                .with_context(|| format!("decode the wrapped key of CA version {}", version.version))?;
            let key = hsm
                .unwrap_key(kek_label, &wrapped)
                .with_context(|| format!("unwrap the key of CA version {} into this node's HSM", version.version))?;
            info!(version = version.version, key_label = %version.key_label, "unwrapped a CA key into the HSM");
            key
        }
        Err(error) => {
            return Err(error).with_context(|| format!("find CA key {:?} in the HSM", version.key_label));
        }
    };
    let signer = HsmSigner::new(hsm.clone(), key)?;
    let chain = CaChain { intermediates_der: version.intermediates_der.clone(), roots_der: version.roots_der.clone() };
    IssuingCa::load(signer, chain, &config.ca.organization, config.issuance.backdate)
        .with_context(|| format!("load CA version {}", version.version))
}

/// Keeps the node's signing CA equal to [`signing_version`] until `shutdown`: wakes on every
/// ledger change to the bundle and every few seconds, unwraps the keys of prepared versions
/// ahead of time, and swaps the CA when another version should sign.
pub async fn keep_signing_ca(
    config: Arc<Config>,
    hsm: Hsm,
    issuance: Arc<Issuance>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = issuance.ledger().watch_bundle();
    let mut prepared_keys = std::collections::HashSet::new();
    loop {
        changes.borrow_and_update();
        if let Err(error) = check_once(&config, &hsm, &issuance, &mut prepared_keys).await {
            error!(%error, "CA rotation check failed; keeping the current signing CA");
        }
        tokio::select! {
            _ = changes.changed() => {}
            () = tokio::time::sleep(RECHECK) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn check_once(
    config: &Arc<Config>,
    hsm: &Hsm,
    issuance: &Arc<Issuance>,
    prepared_keys: &mut std::collections::HashSet<u64>,
) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let ledger = Arc::clone(issuance.replica().ledger());
    let Some(wanted) = signing_version(&ledger, now)? else {
        warn!("no CA version can sign: every root is tainted or every intermediate expired");
        return Ok(());
    };

    for version in ledger.ca_versions()? {
        if version.activate_at_unix > now && prepared_keys.insert(version.version) {
            let (config, hsm) = (Arc::clone(config), hsm.clone());
            let loaded = tokio::task::spawn_blocking(move || load_version(&config, &hsm, &version)).await?;
            if let Err(error) = loaded {
                warn!(error = format!("{error:#}"), "cannot prepare a CA version yet; retrying at its activation");
            }
        }
    }

    if wanted.version == issuance.ca_version() {
        return Ok(());
    }
    let (config, hsm) = (Arc::clone(config), hsm.clone());
    let version = wanted.version;
    let ca = tokio::task::spawn_blocking(move || load_version(&config, &hsm, &wanted)).await??;
    let previous = issuance.ca_version();
    issuance.replace_ca(version, Arc::new(ca));
    info!(previous, version, "CA version switched; new certificates are signed by it");
    Ok(())
}

/// Returns every root the node trusts for client and peer certificates: the roots of the trust
/// bundle, prepared versions included.
///
/// # Errors
///
/// Fails when the ledger cannot be read or contains no root.
pub fn trusted_roots(ledger: &Ledger) -> anyhow::Result<Vec<Vec<u8>>> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let bundle = bundle::read(ledger, "", now).context("read the trust bundle")?;
    let roots: Vec<Vec<u8>> = bundle.x509_roots.into_iter().map(|root| root.der).collect();
    if roots.is_empty() {
        bail!("no root certificate found in the ledger; install a CA first");
    }
    Ok(roots)
}

/// Keeps the roots that TLS clients and Raft peers must chain to equal to [`trusted_roots`],
/// so that certificates of a new CA version are accepted as soon as the version is prepared.
pub async fn keep_trust(
    ledger: Arc<Ledger>,
    client_trust: Arc<ClientTrust>,
    peer_tls: Arc<NodePeerTls>,
    resolver: Arc<NodeCertResolver>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = ledger.watch_bundle();
    let mut current = trusted_roots(&ledger).unwrap_or_default();
    loop {
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = shutdown.changed() => return,
        }
        let roots = match trusted_roots(&ledger) {
            Ok(roots) => roots,
            Err(error) => {
                error!(error = format!("{error:#}"), "cannot read the trusted roots; keeping the current ones");
                continue;
            }
        };
        if roots == current {
            continue;
        }
        let replaced = client_trust.replace(&roots).and_then(|()| peer_tls.set_identity(&roots, Arc::clone(&resolver)));
        match replaced {
            Ok(()) => {
                info!(roots = roots.len(), "trusted roots changed");
                current = roots;
            }
            Err(error) => error!(error = format!("{error:#}"), "cannot replace the trusted roots"),
        }
    }
}

/// A CA version made by [`rotate`].
#[derive(Debug, Clone)]
pub struct Rotated {
    pub version: u64,
    pub activate_at: i64,
    pub intermediate_der: Vec<u8>,
    pub root_der: Vec<u8>,
}

/// Makes a new development root and intermediate in this node's HSM and installs them as a
/// prepared CA version that signs `activate_after` from now. The intermediate key is wrapped
/// under the key-encryption key for the other nodes.
///
/// # Errors
///
/// Fails when a cluster of several nodes has no key-encryption key to share the new key with,
/// or when the HSM or the ledger fails.
pub async fn rotate(
    config: Arc<Config>,
    hsm: Hsm,
    issuance: Arc<Issuance>,
    activate_after: Duration,
    validity: Option<Duration>,
) -> anyhow::Result<Rotated> {
    require_kek_for_cluster(&config, &issuance)?;
    let validity = match validity {
        Some(validity) => validity,
        None => current_validity(&issuance.ca().chain().intermediates_der)?,
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let made = tokio::task::spawn_blocking({
        let (config, hsm) = (Arc::clone(&config), hsm.clone());
        move || make_version(&config, &hsm, validity, now)
    })
    .await??;

    let chain = CaChain { intermediates_der: vec![made.intermediate_der], roots_der: vec![made.root_der] };
    install_version(&issuance, made.key_label, chain, made.wrapped_key, activate_after).await
}

/// Returns an error when a cluster of several voters has no key-encryption key, because a new CA
/// key could then not reach the other nodes' HSMs.
fn require_kek_for_cluster(config: &Config, issuance: &Issuance) -> anyhow::Result<()> {
    let voters = issuance.replica().status().voters.len();
    if config.hsm.kek_label.is_none() && voters > 1 {
        bail!(
            "this cluster has {voters} voters but hsm.kek_label is not set, so a new CA key could not reach the \
             other nodes' HSMs"
        );
    }
    Ok(())
}

/// Commits `chain` as a prepared CA version that signs `activate_after` from now, with its key
/// wrapped under the key-encryption key (or empty when the nodes need no copy).
async fn install_version(
    issuance: &Issuance,
    key_label: String,
    chain: CaChain,
    wrapped_key: Vec<u8>,
    activate_after: Duration,
) -> anyhow::Result<Rotated> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let activate_at = now + i64::try_from(activate_after.as_secs().max(1)).unwrap_or(i64::MAX);
    let intermediate_der = chain.intermediates_der.first().cloned().context("no intermediate given")?;
    let root_der = chain.roots_der.first().cloned().context("no root given")?;
    let command = Command::install_ca(InstallCa {
        key_label: key_label.clone(),
        intermediates_der: chain.intermediates_der,
        roots_der: chain.roots_der,
        installed_at_unix: now,
        activate_at_unix: activate_at,
        wrapped_key,
    });
    let result = issuance.replica().write(sigil_raft::RequestId::random(), &command).await.map_err(write_error)?;
    let CommandResult::CaInstalled { version, .. } = result else {
        bail!("installing the CA version returned {result:?}");
    };

    info!(version, key_label, activate_at, "prepared a new CA version");
    Ok(Rotated { version, activate_at, intermediate_der, root_der })
}

/// Generates the next intermediate key in the HSM, under a label with the time `now`. The key can
/// be wrapped only under a trusted key, and only when a key-encryption key is configured.
// NOTE: a key whose version is never committed (a failed ledger write, or a prepared key that
// is never installed) stays in the HSM under its label; nothing removes it yet.
fn generate_next_key(config: &Config, hsm: &Hsm, now: i64) -> anyhow::Result<(String, KeyRef)> {
    let key_label = format!("{}-{now}", config.ca.key_label);
    let extractability =
        if config.hsm.kek_label.is_some() { Extractability::WrapWithTrustedOnly } else { Extractability::Never };
    let key = hsm
        .generate_key_pair(&key_label, config.ca_key_type()?, extractability)
        .with_context(|| format!("generate CA key {key_label:?}"))?;
    Ok((key_label, key))
}

/// Wraps `key` under the key-encryption key for the other nodes, or returns an empty blob when
/// none is configured. BLOCKING.
fn wrap_for_cluster(config: &Config, hsm: &Hsm, key: &KeyRef) -> anyhow::Result<Vec<u8>> {
    match &config.hsm.kek_label {
        Some(kek_label) => Ok(hsm.wrap_key(kek_label, key).context("wrap the CA key")?.encode().to_vec()),
        None => Ok(Vec::new()),
    }
}

fn write_error(error: WriteError) -> anyhow::Error {
    match error {
        WriteError::Rejected(error) => anyhow::anyhow!("the ledger rejected the CA version: {error}"),
        WriteError::Unavailable(error) => anyhow::anyhow!("the cluster cannot commit now: {error}"),
    }
}

fn current_validity(intermediates_der: &[Vec<u8>]) -> anyhow::Result<Duration> {
    let der = intermediates_der.first().context("the signing CA has no intermediate")?;
    let (_, cert) = X509Certificate::from_der(der).context("parse the signing intermediate")?;
    let seconds = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    Ok(Duration::from_secs(seconds.max(3600).unsigned_abs()))
}

struct MadeVersion {
    key_label: String,
    intermediate_der: Vec<u8>,
    root_der: Vec<u8>,
    wrapped_key: Vec<u8>,
}

/// Generates the keys and certificates of a new version. BLOCKING.
fn make_version(config: &Config, hsm: &Hsm, validity: Duration, now: i64) -> anyhow::Result<MadeVersion> {
    let key_type = config.ca_key_type()?;
    let (key_label, key) = generate_next_key(config, hsm, now)?;
    let intermediate = HsmSigner::new(hsm.clone(), key.clone())?;
    let root_label = format!("{}-dev-root-{now}", config.ca.key_label);
    let root_key = hsm
        .generate_key_pair(&root_label, key_type, Extractability::Never)
        .with_context(|| format!("generate development root key {root_label:?}"))?;
    let root = HsmSigner::new(hsm.clone(), root_key)?;

    let date = OffsetDateTime::from_unix_timestamp(now).map(|time| time.date().to_string()).unwrap_or_default();
    let root_spec = CaCertificateSpec {
        common_name: &format!("Sigil Development Root CA ({}) {date}", config.trust_domain),
        organization: &config.ca.organization,
        validity: validity + Duration::from_secs(365 * 24 * 3600),
        path_len: None,
    };
    let intermediate_spec = CaCertificateSpec {
        common_name: &format!("{} {date}", config.ca.common_name),
        organization: &config.ca.organization,
        validity,
        path_len: Some(config.ca.path_len),
    };
    let root_der = self_signed_root(&root, &root_spec)?;
    let intermediate_der = sign_intermediate(&intermediate, &root, &root_der, &intermediate_spec)?;
    let chain = CaChain { intermediates_der: vec![intermediate_der.clone()], roots_der: vec![root_der.clone()] };
    check_chain(&intermediate, &chain).context("check the new chain")?;
    let wrapped_key = wrap_for_cluster(config, hsm, &key)?;
    Ok(MadeVersion { key_label, intermediate_der, root_der, wrapped_key })
}

/// Generates the next intermediate key in this node's HSM and returns its label and a PEM CSR for
/// an offline root to sign. BLOCKING.
///
/// # Errors
///
/// Fails when the HSM cannot generate or sign.
pub fn prepare_key(config: &Config, hsm: &Hsm) -> anyhow::Result<(String, String)> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let (key_label, key) = generate_next_key(config, hsm, now)?;
    let signer = HsmSigner::new(hsm.clone(), key)?;
    let spec = CaCertificateSpec {
        common_name: &config.ca.common_name,
        organization: &config.ca.organization,
        validity: Duration::from_secs(3600),
        path_len: Some(config.ca.path_len),
    };
    let csr = crate::ca::intermediate_csr(&signer, &spec)?;
    info!(key_label, "generated the next CA key; its CSR goes to the offline root");
    Ok((key_label, csr))
}

/// Installs an intermediate that an offline root signed for a key made by [`prepare_key`] as a
/// prepared CA version, after checking the chain against the key.
///
/// # Errors
///
/// Fails when this node's HSM lacks the key, the chain does not check out, a cluster of several
/// nodes has no key-encryption key, or the ledger fails.
pub async fn install_prepared(
    config: Arc<Config>,
    hsm: Hsm,
    issuance: Arc<Issuance>,
    key_label: String,
    chain: CaChain,
    activate_after: Duration,
) -> anyhow::Result<Rotated> {
    require_kek_for_cluster(&config, &issuance)?;
    let checked_chain = chain.clone();
    let label = key_label.clone();
    let wrapped_key = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
        let key = hsm.find_key(&label).with_context(|| {
            format!("find key {label:?} in this node's HSM (send the install to the node that prepared the key)")
        })?;
        let signer = HsmSigner::new(hsm.clone(), key.clone())?;
        check_chain(&signer, &checked_chain).context("check the signed chain against the prepared key")?;
        wrap_for_cluster(&config, &hsm, &key)
    })
    .await??;

    install_version(&issuance, key_label, chain, wrapped_key, activate_after).await
}

/// Marks the root whose DER has SHA-256 `fingerprint` as tainted. Returns the version that signs
/// afterwards.
///
/// # Errors
///
/// Fails when no root of the bundle has that fingerprint, when no untainted version would be left
/// to sign (rotate first), or when the ledger fails.
pub async fn taint_root(issuance: &Arc<Issuance>, fingerprint: &str, caller: &str) -> anyhow::Result<u64> {
    let fingerprint = fingerprint.trim().to_ascii_lowercase().replace(':', "");
    let ledger = Arc::clone(issuance.replica().ledger());
    let versions = ledger.ca_versions()?;
    let Some(root) = versions
        .iter()
        .flat_map(|version| &version.roots_der)
        .find(|root| hex::encode(digest(&SHA256, root)) == fingerprint)
        .cloned()
    else {
        bail!("no root of the trust bundle has SHA-256 fingerprint {fingerprint}");
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let mut tainted = std::collections::HashSet::new();
    tainted.insert(root.clone());
    for version in &versions {
        for other in &version.roots_der {
            if ledger.kv_get(&bundle::taint_key(other))?.is_some() {
                tainted.insert(other.clone());
            }
        }
    }
    let Some(next) = select_signing(&versions, now, |candidate| tainted.contains(candidate)) else {
        bail!(
            "tainting root {fingerprint} would leave no CA version to sign with; prepare one with `sigil ca rotate` \
             first"
        );
    };
    let value = serde_json::json!({ "tainted_at": now, "by": caller });
    let command = Command::kv_transaction(KvTransaction {
        conditions: vec![KvCondition { key: bundle::taint_key(&root), revision: 0 }],
        writes: vec![KvWrite {
            key: bundle::taint_key(&root),
            value: value.to_string().into_bytes(),
            delete: false,
            expires_unix: 0,
        }],
    });
    match issuance.replica().write(sigil_raft::RequestId::random(), &command).await {
        Ok(_) => {}
        Err(WriteError::Rejected(crate::ledger::LedgerError::KvConflict { .. })) => {
            info!(fingerprint, "root was already tainted");
        }
        Err(error) => return Err(write_error(error)),
    }
    warn!(fingerprint, caller, signing_version = next.version, "root tainted; downstream CAs will rotate away from it");
    Ok(next.version)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(number: u64, activate_at: i64, root: u8, not_after_offset_days: i64) -> CaVersion {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.not_before = OffsetDateTime::UNIX_EPOCH;
        params.not_after = OffsetDateTime::UNIX_EPOCH + time::Duration::days(not_after_offset_days);
        let cert = params.self_signed(&key).expect("certificate");
        CaVersion {
            version: number,
            key_label: format!("key-{number}"),
            intermediates_der: vec![cert.der().to_vec()],
            roots_der: vec![vec![root]],
            activate_at_unix: activate_at,
            ..CaVersion::default()
        }
    }

    #[test]
    fn select_signing_newest_active() {
        let versions = [version(1, 0, 1, 100), version(2, 5_000, 2, 100)];
        assert_eq!(select_signing(&versions, 1_000, |_| false).map(|v| v.version), Some(1));
        assert_eq!(select_signing(&versions, 5_000, |_| false).map(|v| v.version), Some(2));
    }

    #[test]
    fn select_signing_after_taint() {
        let versions = [version(1, 0, 1, 100), version(2, 5_000, 2, 100)];
        assert_eq!(select_signing(&versions, 1_000, |root| root == [1]).map(|v| v.version), Some(2));
        assert_eq!(select_signing(&versions, 1_000, |_| true).map(|v| v.version), None);
    }

    #[test]
    fn select_signing_skips_expired() {
        let versions = [version(1, 0, 1, 100), version(2, 0, 2, 1)];
        let now = 2 * 86_400;
        assert_eq!(select_signing(&versions, now, |_| false).map(|v| v.version), Some(1));
    }
}
