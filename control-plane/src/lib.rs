//! # weir-control-plane
//!
//! `weir-cp`, weir's companion control plane. Today it is the skeleton every later part plugs
//! into: one tonic gRPC server that answers `grpc.health.v1.Health`. The xDS server, service
//! registry, KV and object APIs will be added to the same server as further services.
//!
//! ## Layout
//! - this file: [`serve`], which runs the gRPC server on a listener the caller bound, until a
//!   shutdown future completes (so tests bind `127.0.0.1:0` and stop it at will), and the
//!   server-wide limits ([`MAX_DECODING_MESSAGE_SIZE`], [`MAX_ENCODING_MESSAGE_SIZE`]).
//! - `main.rs`: the `weir-cp` CLI (clap subcommands; only `serve` for now), logging and signals.
//!
//! ## Health
//! The health service reports `SERVING` for `""` (the whole server) and for
//! [`SERVICE_NAME`] only. It does not claim
//! `envoy.service.discovery.v3.AggregatedDiscoveryService`, which is not served yet.
#![forbid(unsafe_code)]

use std::future::Future;

use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

/// Largest gRPC message the server accepts, in bytes (4 MiB, gRPC's usual default, made
/// explicit). Requests to a control plane are small; anything larger is refused with
/// `RESOURCE_EXHAUSTED` rather than buffered.
pub const MAX_DECODING_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// Largest gRPC message the server sends, in bytes (16 MiB). xDS responses carrying a whole
/// mesh's clusters or endpoints can exceed 4 MiB; Envoy accepts large messages by default.
pub const MAX_ENCODING_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// The service name `weir-cp` reports as `SERVING` in `grpc.health.v1.Health`.
pub const SERVICE_NAME: &str = "weir-cp";

/// Errors running the control plane.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The gRPC server failed (accepting or serving connections).
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serve the control plane's gRPC API on `listener` until `shutdown` completes; then stop
/// accepting, let in-flight calls finish, and return.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    // `""` is SERVING from the start (health_reporter's default).
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    let health = health
        .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_ENCODING_MESSAGE_SIZE);
    Server::builder()
        .add_service(health)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await?;
    Ok(())
}
