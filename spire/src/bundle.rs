//! Conversions from Sigil's trust material to SPIRE's plugin types, and the sets the streams
//! compare to decide whether SPIRE must hear about a change.

use std::collections::BTreeSet;

use crate::proto::sigil::v1::{JwtAuthority, X509Authority};
use crate::proto::spire::plugin::types::{JwtKey, X509Certificate};

/// The X.509 roots as SPIRE last received them: each certificate with its tainted flag. Order
/// and repeats do not count, because SPIRE merges roots into its bundle as a set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RootSet(BTreeSet<(Vec<u8>, bool)>);

impl RootSet {
    pub fn from_sigil(roots: &[X509Authority]) -> RootSet {
        RootSet(roots.iter().map(|root| (root.certificate.clone(), root.tainted)).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn tainted_count(&self) -> usize {
        self.0.iter().filter(|(_, tainted)| *tainted).count()
    }

    /// Returns whether `certificate` is one of the roots.
    pub fn contains_certificate(&self, certificate: &[u8]) -> bool {
        self.0.iter().any(|(root, _)| root == certificate)
    }

    /// Converts the roots to SPIRE's type, in a stable order.
    pub fn to_spire(&self) -> Vec<X509Certificate> {
        self.0.iter().map(|(asn1, tainted)| X509Certificate { asn1: asn1.clone(), tainted: *tainted }).collect()
    }
}

/// The JWT authorities as SPIRE last received them. Order and repeats do not count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtSet(BTreeSet<(String, Vec<u8>, i64, bool)>);

impl JwtSet {
    pub fn from_sigil(authorities: &[JwtAuthority]) -> JwtSet {
        JwtSet(
            authorities
                .iter()
                .map(|key| (key.key_id.clone(), key.public_key.clone(), key.expires_at, key.tainted))
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Returns whether a key with this key ID and public key is in the set.
    pub fn contains_key(&self, key_id: &str, public_key: &[u8]) -> bool {
        self.0.iter().any(|(id, key, _, _)| id == key_id && key == public_key)
    }

    /// Adds one key as SPIRE sent it.
    pub fn insert_spire(&mut self, key: &JwtKey) {
        self.0.insert((key.key_id.clone(), key.public_key.clone(), key.expires_at, key.tainted));
    }

    /// Converts the set to SPIRE's type, in a stable order.
    pub fn to_spire(&self) -> Vec<JwtKey> {
        self.0
            .iter()
            .map(|(key_id, public_key, expires_at, tainted)| JwtKey {
                public_key: public_key.clone(),
                key_id: key_id.clone(),
                expires_at: *expires_at,
                tainted: *tainted,
            })
            .collect()
    }
}

/// Converts SPIRE's JWT key to Sigil's type.
pub fn jwt_authority_from_spire(key: &JwtKey) -> JwtAuthority {
    JwtAuthority {
        public_key: key.public_key.clone(),
        key_id: key.key_id.clone(),
        expires_at: key.expires_at,
        tainted: key.tainted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(der: &[u8], tainted: bool) -> X509Authority {
        X509Authority { certificate: der.to_vec(), tainted }
    }

    fn jwt(key_id: &str, tainted: bool) -> JwtAuthority {
        JwtAuthority { public_key: vec![1, 2, 3], key_id: key_id.to_owned(), expires_at: 1_900_000_000, tainted }
    }

    #[test]
    fn root_set_ignores_order_and_repeats() {
        let first = RootSet::from_sigil(&[root(b"a", false), root(b"b", false)]);
        let reordered = RootSet::from_sigil(&[root(b"b", false), root(b"a", false), root(b"a", false)]);
        assert_eq!(first, reordered);
        assert_eq!(first.len(), 2);
    }

    #[test]
    fn root_set_sees_new_root() {
        let before = RootSet::from_sigil(&[root(b"a", false)]);
        let after = RootSet::from_sigil(&[root(b"a", false), root(b"b", false)]);
        assert_ne!(before, after);
    }

    #[test]
    fn root_set_sees_removed_root() {
        let before = RootSet::from_sigil(&[root(b"a", true), root(b"b", false)]);
        let after = RootSet::from_sigil(&[root(b"b", false)]);
        assert_ne!(before, after);
    }

    #[test]
    fn root_set_sees_taint() {
        let before = RootSet::from_sigil(&[root(b"a", false), root(b"b", false)]);
        let after = RootSet::from_sigil(&[root(b"a", true), root(b"b", false)]);
        assert_ne!(before, after);
        assert_eq!(after.tainted_count(), 1);
    }

    #[test]
    fn root_set_converts_with_flags() {
        let set = RootSet::from_sigil(&[root(b"b", true), root(b"a", false)]);
        let spire = set.to_spire();
        assert_eq!(spire.len(), 2);
        assert_eq!((spire[0].asn1.as_slice(), spire[0].tainted), (b"a".as_slice(), false));
        assert_eq!((spire[1].asn1.as_slice(), spire[1].tainted), (b"b".as_slice(), true));
        assert!(set.contains_certificate(b"a"));
        assert!(!set.contains_certificate(b"c"));
    }

    #[test]
    fn jwt_set_sees_changes() {
        let base = JwtSet::from_sigil(&[jwt("k1", false)]);
        assert_eq!(base, JwtSet::from_sigil(&[jwt("k1", false), jwt("k1", false)]));
        assert_ne!(base, JwtSet::from_sigil(&[jwt("k1", false), jwt("k2", false)]));
        assert_ne!(base, JwtSet::from_sigil(&[jwt("k1", true)]));
        assert!(base.contains_key("k1", &[1, 2, 3]));
        assert!(!base.contains_key("k1", &[9]));
    }

    #[test]
    fn jwt_set_round_trips_spire_keys() {
        let mut set = JwtSet::default();
        let key = JwtKey { public_key: vec![7], key_id: "spire-1".to_owned(), expires_at: 0, tainted: false };
        set.insert_spire(&key);
        assert_eq!(set.to_spire(), vec![key.clone()]);
        assert_eq!(jwt_authority_from_spire(&key).key_id, "spire-1");
    }
}
