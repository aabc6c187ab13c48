//! Compiles the SPIRE and go-plugin services the plugin serves, and the client side of Sigil's
//! Authority service, from the workspace's proto/ folder.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let served = [
        "../proto/plugin/grpc_broker.proto",
        "../proto/plugin/grpc_controller.proto",
        "../proto/plugin/grpc_stdio.proto",
        "../proto/spire/plugin/server/upstreamauthority/v1/upstreamauthority.proto",
        "../proto/spire/service/common/config/v1/config.proto",
        "../proto/spire/service/private/init/v1/init.proto",
    ];
    tonic_prost_build::configure().build_client(false).compile_protos(&served, &["../proto"])?;

    let called = ["../proto/sigil/v1/authority.proto"];
    tonic_prost_build::configure().build_server(false).compile_protos(&called, &["../proto"])?;

    for proto in served.iter().chain(&called) {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-changed=../proto/spire/plugin/types");
    Ok(())
}
