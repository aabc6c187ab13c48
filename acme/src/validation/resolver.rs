//! A and AAAA lookups for connections and TXT lookups for dns-01, through
//! the resolver that [`ResolverSetting`] selects.

use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

use super::ResolverSetting;
use crate::problem::{Problem, ProblemType};

pub(super) enum Resolver {
    Dns(Box<TokioResolver>),
    Fixed(Vec<IpAddr>),
}

impl Resolver {
    pub(super) fn new(setting: &ResolverSetting) -> Result<Resolver, String> {
        let builder = match setting {
            ResolverSetting::Fixed(addresses) => return Ok(Resolver::Fixed(addresses.clone())),
            ResolverSetting::System => TokioResolver::builder_tokio()
                .map_err(|error| format!("failed to read the system DNS resolver configuration: {error}"))?,
            ResolverSetting::Server(server) => {
                let mut name_server = NameServerConfig::udp_and_tcp(server.ip());
                for connection in &mut name_server.connections {
                    connection.port = server.port();
                }
                let config = ResolverConfig::from_name_servers(vec![name_server]);
                let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
                builder.options_mut().use_hosts_file = ResolveHosts::Never;
                builder
            }
        };

        let mut builder = builder;
        configure(builder.options_mut());
        let resolver = builder.build().map_err(|error| format!("failed to create the DNS resolver: {error}"))?;
        Ok(Resolver::Dns(Box::new(resolver)))
    }

    /// Looks up the A and AAAA records of `name`, IPv4 addresses first.
    pub(super) async fn addresses(&self, name: &str) -> Result<Vec<IpAddr>, Problem> {
        let resolver = match self {
            Resolver::Fixed(addresses) if addresses.is_empty() => return Err(no_addresses(name)),
            Resolver::Fixed(addresses) => return Ok(ipv4_first(addresses.clone())),
            Resolver::Dns(resolver) => resolver,
        };

        match resolver.lookup_ip(fully_qualified(name)).await {
            Ok(lookup) => {
                let addresses: Vec<IpAddr> = lookup.iter().collect();
                if addresses.is_empty() {
                    return Err(no_addresses(name));
                }
                Ok(ipv4_first(addresses))
            }
            Err(error) if error.is_no_records_found() => Err(no_addresses(name)),
            Err(error) => Err(Problem::new(
                ProblemType::Dns,
                format!("DNS lookup of A and AAAA records for {name} failed: {error}"),
            )),
        }
    }

    /// Looks up the TXT records at `name`. Each record's character strings
    /// are joined into one value. A name without TXT records, or that does
    /// not exist, returns no values.
    pub(super) async fn txt_values(&self, name: &str) -> Result<Vec<String>, Problem> {
        let resolver = match self {
            Resolver::Fixed(_) => return Ok(Vec::new()),
            Resolver::Dns(resolver) => resolver,
        };

        let lookup = match resolver.txt_lookup(fully_qualified(name)).await {
            Ok(lookup) => lookup,
            Err(error) if error.is_no_records_found() => return Ok(Vec::new()),
            Err(error) => {
                return Err(Problem::new(
                    ProblemType::Dns,
                    format!("DNS lookup of TXT records at {name} failed: {error}"),
                ));
            }
        };
        let values = lookup
            .answers()
            .iter()
            .filter_map(|record| match &record.data {
                RData::TXT(txt) => {
                    let bytes: Vec<u8> = txt.txt_data.iter().flat_map(|part| part.iter().copied()).collect();
                    Some(String::from_utf8_lossy(&bytes).into_owned())
                }
                _ => None,
            })
            .collect();
        Ok(values)
    }
}

/// Sets the options that validation needs whatever the name servers.
fn configure(options: &mut ResolverOpts) {
    options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    // Nothing is cached: a client that fixes its records and requests a new
    // challenge must not be judged by the response to the previous one.
    options.cache_size = 0;
    options.positive_max_ttl = Some(Duration::ZERO);
    options.negative_max_ttl = Some(Duration::ZERO);
}

/// Appends the root label so that no search domain is tried.
fn fully_qualified(name: &str) -> String {
    format!("{name}.")
}

fn ipv4_first(mut addresses: Vec<IpAddr>) -> Vec<IpAddr> {
    addresses.sort_by_key(IpAddr::is_ipv6);
    addresses
}

fn no_addresses(name: &str) -> Problem {
    Problem::new(ProblemType::Dns, format!("no A or AAAA records found for {name}"))
}
