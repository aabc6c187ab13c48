//! Generated gRPC code. The module tree mirrors the proto packages, because the generated code
//! refers to types in other packages by relative paths such as `super::super::types`.

#![allow(clippy::all, clippy::pedantic, reason = "generated code")]

/// go-plugin's broker, controller and standard-stream services.
pub mod plugin {
    tonic::include_proto!("plugin");
}

/// Sigil's Authority service, client side only.
pub mod sigil {
    pub mod v1 {
        tonic::include_proto!("sigil.v1");
    }
}

/// SPIRE's plugin interfaces.
pub mod spire {
    pub mod plugin {
        pub mod types {
            tonic::include_proto!("spire.plugin.types");
        }
        pub mod server {
            pub mod upstreamauthority {
                pub mod v1 {
                    tonic::include_proto!("spire.plugin.server.upstreamauthority.v1");
                }
            }
        }
    }
    pub mod service {
        pub mod common {
            pub mod config {
                pub mod v1 {
                    tonic::include_proto!("spire.service.common.config.v1");
                }
            }
        }
        pub mod private {
            pub mod init {
                pub mod v1 {
                    tonic::include_proto!("spire.service.private.init.v1");
                }
            }
        }
    }
}
