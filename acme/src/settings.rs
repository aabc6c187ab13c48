//! Settings of one ACME directory.

use std::net::IpAddr;
use std::time::Duration;

/// An IP network, such as 10.0.0.0/8 or fd00::/8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    pub network: IpAddr,
    pub prefix_len: u8,
}

impl IpRange {
    /// Parses `address/prefix`, or a single address as a /32 or /128.
    pub fn parse(text: &str) -> Result<IpRange, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.parse().map_err(|_| format!("{text:?} is not an IP address or network"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix {
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|len| *len <= max)
                .ok_or_else(|| format!("{text:?} has prefix length {prefix:?}, expected 0 to {max}"))?,
            None => max,
        };
        Ok(IpRange { network, prefix_len })
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        match (self.network, address) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                prefix_matches(&network.octets(), &address.octets(), self.prefix_len)
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                prefix_matches(&network.octets(), &address.octets(), self.prefix_len)
            }
            _ => false,
        }
    }
}

fn prefix_matches(network: &[u8], address: &[u8], prefix_len: u8) -> bool {
    let full = usize::from(prefix_len / 8);
    let rest = prefix_len % 8;
    if network[..full] != address[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    network[full] & mask == address[full] & mask
}

#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The external URL of this node, such as `https://acme.example.net:8443`,
    /// without a trailing slash. Every resource URL starts with it.
    pub base_url: String,
    pub terms_of_service: Option<String>,
    pub website: Option<String>,
    pub caa_identities: Vec<String>,
    pub external_account_required: bool,
    /// DNS names must equal or end in one of these suffixes; empty allows
    /// any name.
    pub allowed_dns_suffixes: Vec<String>,
    /// IP identifiers must be in one of these ranges; empty refuses every
    /// IP identifier.
    pub allowed_ip_ranges: Vec<IpRange>,
    pub max_identifiers: usize,
    /// Upper bound of a certificate's validity, whatever the profile says.
    pub max_validity: Duration,
    /// New orders one account may create per hour; 0 means no limit.
    pub orders_per_account_per_hour: u32,
    pub order_lifetime: Duration,
    pub nonce_lifetime: Duration,
    /// How long a validation or finalization may stay in processing before
    /// another node takes it over.
    pub processing_timeout: Duration,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// How long before a renewal window starts `renewalInfo` asks clients
    /// to renew, as a fraction of the certificate's lifetime.
    pub renewal_window: (f64, f64),
}

impl AcmeSettings {
    /// Settings for a server at `base_url` with every other value at its
    /// default.
    pub fn new(base_url: impl Into<String>) -> AcmeSettings {
        AcmeSettings {
            base_url: base_url.into().trim_end_matches('/').to_owned(),
            terms_of_service: None,
            website: None,
            caa_identities: Vec::new(),
            external_account_required: false,
            allowed_dns_suffixes: Vec::new(),
            allowed_ip_ranges: Vec::new(),
            max_identifiers: 100,
            max_validity: Duration::from_secs(90 * 24 * 3600),
            orders_per_account_per_hour: 300,
            order_lifetime: Duration::from_secs(24 * 3600),
            nonce_lifetime: Duration::from_secs(3600),
            processing_timeout: Duration::from_secs(60),
            max_body_bytes: 64 * 1024,
            renewal_window: (2.0 / 3.0, 5.0 / 6.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_match_by_prefix() {
        let range = IpRange::parse("10.1.0.0/16").expect("parse");
        assert!(range.contains("10.1.200.3".parse().expect("address")));
        assert!(!range.contains("10.2.0.1".parse().expect("address")));
        let narrow = IpRange::parse("192.0.2.128/25").expect("parse");
        assert!(narrow.contains("192.0.2.200".parse().expect("address")));
        assert!(!narrow.contains("192.0.2.100".parse().expect("address")));
        let single = IpRange::parse("::1").expect("parse");
        assert!(single.contains("::1".parse().expect("address")));
        assert!(!single.contains("127.0.0.1".parse().expect("address")));
    }

    #[test]
    fn bad_ranges_name_the_value() {
        assert!(IpRange::parse("10.0.0.0/33").expect_err("too long").contains("10.0.0.0/33"));
        assert!(IpRange::parse("example.net").expect_err("not an address").contains("example.net"));
    }
}
