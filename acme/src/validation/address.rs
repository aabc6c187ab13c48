//! The address policy: which IP addresses the validator may connect to when
//! private addresses are not allowed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Returns why `address` is not publicly routable, or `None` for an
/// address the validator may connect to in production.
///
/// Besides the ranges that the settings documentation lists (loopback,
/// RFC 1918, fc00::/7, link-local, unspecified, multicast), this rejects
/// 0.0.0.0/8, the shared address space 100.64.0.0/10 (RFC 6598) and the
/// reserved 240.0.0.0/4 with the broadcast address. IPv4 addresses embedded
/// in IPv4-mapped (::ffff:0:0/96) or NAT64 (64:ff9b::/96) IPv6 addresses
/// are judged by the IPv4 rules.
pub(super) fn non_public_reason(address: IpAddr) -> Option<&'static str> {
    match address {
        IpAddr::V4(v4) => ipv4_reason(v4),
        IpAddr::V6(v6) => ipv6_reason(v6),
    }
}

fn ipv4_reason(address: Ipv4Addr) -> Option<&'static str> {
    let [a, b, _, _] = address.octets();
    if address.is_unspecified() || a == 0 {
        Some("an unspecified address (0.0.0.0/8)")
    } else if address.is_loopback() {
        Some("a loopback address (127.0.0.0/8)")
    } else if address.is_private() {
        Some("a private address (RFC 1918)")
    } else if address.is_link_local() {
        Some("a link-local address (169.254.0.0/16)")
    } else if a == 100 && (b & 0xc0) == 64 {
        Some("a shared address (100.64.0.0/10, RFC 6598)")
    } else if address.is_multicast() {
        Some("a multicast address (224.0.0.0/4)")
    } else if a >= 240 {
        Some("a reserved or broadcast address (240.0.0.0/4)")
    } else {
        None
    }
}

fn ipv6_reason(address: Ipv6Addr) -> Option<&'static str> {
    let segments = address.segments();
    if let Some(v4) = address.to_ipv4_mapped() {
        return ipv4_reason(v4);
    }
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [.., high, low] = segments;
        let embedded = Ipv4Addr::from((u32::from(high) << 16) | u32::from(low));
        return ipv4_reason(embedded);
    }

    if address.is_unspecified() {
        Some("an unspecified address (::)")
    } else if address.is_loopback() {
        Some("a loopback address (::1)")
    } else if (segments[0] & 0xfe00) == 0xfc00 {
        Some("a unique local address (fc00::/7)")
    } else if (segments[0] & 0xffc0) == 0xfe80 {
        Some("a link-local address (fe80::/10)")
    } else if address.is_multicast() {
        Some("a multicast address (ff00::/8)")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::non_public_reason;

    #[test]
    fn refused_addresses() {
        let refused = [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ];
        for text in refused {
            let address = text.parse().expect("test address parses");
            assert!(non_public_reason(address).is_some(), "{text} should be refused");
        }
    }

    #[test]
    fn other_addresses_allowed() {
        let allowed =
            ["8.8.8.8", "172.32.0.1", "100.128.0.1", "192.0.2.1", "2001:db8::1", "::ffff:8.8.8.8", "64:ff9b::808:808"];
        for text in allowed {
            let address = text.parse().expect("test address parses");
            assert_eq!(non_public_reason(address), None, "{text} should be allowed");
        }
    }
}
