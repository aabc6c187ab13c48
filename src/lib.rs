//! Sigil: an HSM-backed intermediate certificate authority for zero-trust networks.
//!
//! A node checks a caller's CSR against policy, signs an X509-SVID with an intermediate CA key
//! that never leaves its PKCS#11 HSM, commits the issuance record through the cluster's Raft
//! leader, and only then responds. See README.md for a walk-through and docs/ for operations.

pub mod acme;
pub mod audit;
pub mod authority;
pub mod bundle;
pub mod ca;
pub mod cli;
pub mod client;
pub mod config;
pub mod csr;
pub mod dev;
pub mod grpc;
pub mod issuance;
pub mod istio;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod node_tls;
pub mod peer_tls;
pub mod policy;
pub mod replica;
pub mod server;
pub mod setup;
pub mod spiffe_id;
pub mod tls;

/// Generated gRPC types and services of package `sigil.v1`.
pub mod publication;

pub mod proto {
    tonic::include_proto!("sigil.v1");
}

/// Generated types and service of Istio's certificate API, package `istio.v1.auth`.
pub mod istio_proto {
    tonic::include_proto!("istio.v1.auth");
}
