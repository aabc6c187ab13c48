//! The services SPIRE's plugin loader calls around the UpstreamAuthority itself: go-plugin's
//! broker, controller and standard-stream services, SPIRE's Init service and the Config service.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::config::{ConfigErrors, PluginConfig};
use crate::credentials;
use crate::proto::plugin::grpc_broker_server::GrpcBroker;
use crate::proto::plugin::grpc_controller_server::GrpcController;
use crate::proto::plugin::grpc_stdio_server::GrpcStdio;
use crate::proto::plugin::{ConnInfo, Empty, StdioData};
use crate::proto::spire::service::common::config::v1::config_server::Config;
use crate::proto::spire::service::common::config::v1::{
    ConfigureRequest, ConfigureResponse, CoreConfiguration, ValidateRequest, ValidateResponse,
};
use crate::proto::spire::service::private::init::v1::init_server::Init;
use crate::proto::spire::service::private::init::v1::{DeinitRequest, DeinitResponse, InitRequest, InitResponse};
use crate::sigil_client::{ClientSlot, SigilClient};

/// Full gRPC names of the services SPIRE binds to, returned by Init.
pub const UPSTREAM_AUTHORITY_SERVICE: &str = "spire.plugin.server.upstreamauthority.v1.UpstreamAuthority";
pub const CONFIG_SERVICE: &str = "spire.service.common.config.v1.Config";

/// Accepts go-plugin's broker stream and keeps it open. SPIRE sends the address of its host
/// services there. This plugin uses none of them, so it only logs what arrives.
pub struct Broker {
    pub shutdown: CancellationToken,
}

#[tonic::async_trait]
impl GrpcBroker for Broker {
    type StartStreamStream = ReceiverStream<Result<ConnInfo, Status>>;

    async fn start_stream(
        &self,
        request: Request<Streaming<ConnInfo>>,
    ) -> Result<Response<Self::StartStreamStream>, Status> {
        let mut incoming = request.into_inner();
        // The sender lives as long as the task, so the reply stream stays open until SPIRE
        // closes its side or the plugin stops.
        let (sender, receiver) = mpsc::channel(1);
        let shutdown = self.shutdown.clone();
        tokio::spawn(
            async move {
                let _open = sender;
                loop {
                    let message = tokio::select! {
                        () = shutdown.cancelled() => return,
                        message = incoming.message() => message,
                    };
                    match message {
                        Ok(Some(info)) => info!(
                            service_id = info.service_id,
                            network = info.network,
                            address = info.address,
                            "SPIRE offered a host service connection"
                        ),
                        Ok(None) => {
                            debug!("SPIRE closed the broker stream");
                            return;
                        }
                        Err(status) => {
                            warn!(code = ?status.code(), error = status.message(), "broker stream failed");
                            return;
                        }
                    }
                }
            }
            .instrument(info_span!("broker")),
        );
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// go-plugin's controller: Shutdown stops the plugin process.
pub struct Controller {
    pub shutdown: CancellationToken,
}

#[tonic::async_trait]
impl GrpcController for Controller {
    async fn shutdown(&self, _request: Request<Empty>) -> Result<Response<Empty>, Status> {
        info!("SPIRE requested shutdown");
        self.shutdown.cancel();
        Ok(Response::new(Empty {}))
    }
}

/// go-plugin's standard-stream forwarding. The plugin never writes to standard output after the
/// handshake and logs to standard error directly, so the stream stays open and empty.
pub struct Stdio {
    pub shutdown: CancellationToken,
}

#[tonic::async_trait]
impl GrpcStdio for Stdio {
    type StreamStdioStream = ReceiverStream<Result<StdioData, Status>>;

    async fn stream_stdio(&self, _request: Request<()>) -> Result<Response<Self::StreamStdioStream>, Status> {
        let (sender, receiver) = mpsc::channel(1);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = sender.closed() => {}
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// SPIRE's Init service: names the services this plugin implements.
pub struct Initializer;

#[tonic::async_trait]
impl Init for Initializer {
    async fn init(&self, request: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        let host_services = request.into_inner().host_service_names;
        info!(host_services = ?host_services, "SPIRE initialized the plugin");
        let names = vec![UPSTREAM_AUTHORITY_SERVICE.to_owned(), CONFIG_SERVICE.to_owned()];
        Ok(Response::new(InitResponse { plugin_service_names: names }))
    }

    async fn deinit(&self, _request: Request<DeinitRequest>) -> Result<Response<DeinitResponse>, Status> {
        info!("SPIRE is unloading the plugin");
        Ok(Response::new(DeinitResponse {}))
    }
}

/// SPIRE's Config service. Configure replaces the Sigil client; Validate only checks.
pub struct Configurator {
    pub slot: ClientSlot,
}

/// Parses and checks a configuration and builds its Sigil client.
///
/// # Errors
///
/// Returns every problem found, each naming the key, value or file.
pub fn build_client(core: Option<&CoreConfiguration>, plugin_data: &str) -> Result<SigilClient, ConfigErrors> {
    let trust_domain = core.map_or("", |core| core.trust_domain.as_str());
    let config = PluginConfig::parse(trust_domain, plugin_data)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let credentials = credentials::load(&config.settings, now).map_err(ConfigErrors)?;
    let client = SigilClient::new(&config.trust_domain, &config.settings.endpoints, &credentials)
        .map_err(|error| ConfigErrors(vec![error]))?;
    info!(
        trust_domain = config.trust_domain,
        endpoints = ?config.settings.endpoints,
        client_id = credentials.client_id.as_deref().unwrap_or("none"),
        client_certificate_not_after = credentials.not_after,
        "configuration is valid"
    );
    Ok(client)
}

#[tonic::async_trait]
impl Config for Configurator {
    async fn configure(&self, request: Request<ConfigureRequest>) -> Result<Response<ConfigureResponse>, Status> {
        let request = request.into_inner();
        match build_client(request.core_configuration.as_ref(), &request.hcl_configuration) {
            Ok(client) => {
                info!(trust_domain = client.trust_domain(), endpoints = ?client.endpoints(), "plugin configured");
                self.slot.set(Arc::new(client));
                Ok(Response::new(ConfigureResponse {}))
            }
            Err(errors) => {
                warn!(error = %errors, "configuration rejected");
                Err(Status::invalid_argument(errors.to_string()))
            }
        }
    }

    async fn validate(&self, request: Request<ValidateRequest>) -> Result<Response<ValidateResponse>, Status> {
        let request = request.into_inner();
        let response = match build_client(request.core_configuration.as_ref(), &request.hcl_configuration) {
            Ok(_) => ValidateResponse { valid: true, notes: Vec::new() },
            Err(ConfigErrors(notes)) => ValidateResponse { valid: false, notes },
        };
        Ok(Response::new(response))
    }
}
