//! weir's integration tests: real listeners on 127.0.0.1:0, real hyper/h2/tonic clients and
//! backends, assertions on what a client sees. One binary for the crate (see README).

mod harness;

mod admin;
mod authz;
mod filters;
mod gateway;
mod h2frames;
mod hardening;
mod health;
mod hot_restart;
mod intercept;
mod lb;
mod lifecycle;
mod limits;
mod listeners;
mod netns;
mod observability;
mod protocols;
mod resilience;
mod routing;
mod sidecar;
mod tcp;
mod tls;
mod xds;
