//! Compiles Sigil's gRPC definitions in proto/ with protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/sigil/v1/issuer.proto",
        "proto/sigil/v1/admin.proto",
        "proto/sigil/v1/authority.proto",
        "proto/istio/v1/auth/ca.proto",
    ];
    tonic_prost_build::configure().compile_protos(&protos, &["proto"])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
