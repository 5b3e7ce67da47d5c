//! Listeners: translation of Envoy `Listener`s, filter-chain matching, binding one
//! SO_REUSEPORT socket per worker, accept loops, and the `tcp_proxy` network filter.
//!
//! OWNER: listener helper. Interface used by `server`.

use std::net::SocketAddr;
use std::sync::Arc;

use weir_xds_api::pb::envoy::config::listener::v3::Listener;

use crate::config::hcm::HcmConfig;
use crate::config::{Errors, TranslateCtx};

/// A translated listener.
#[derive(Debug)]
pub struct ListenerConfig {
    /// `name`.
    pub name: String,
    /// Address to bind (port 0 = any free port; the bound one is reported).
    pub address: SocketAddr,
    /// Filter chains in config order.
    pub filter_chains: Vec<FilterChain>,
    /// `default_filter_chain`.
    pub default_filter_chain: Option<FilterChain>,
    /// `per_connection_buffer_limit_bytes` (default 1 MiB).
    pub per_connection_buffer_limit_bytes: u32,
}

/// One filter chain.
#[derive(Debug)]
pub struct FilterChain {
    /// `name`.
    pub name: String,
    /// The terminal network filter.
    pub filter: NetworkFilter,
}

/// Terminal network filters.
#[derive(Debug, Clone)]
pub enum NetworkFilter {
    /// `envoy.filters.network.http_connection_manager`.
    Http(Arc<HcmConfig>),
}

/// Translate one listener.
pub fn translate_listener(
    l: &Listener,
    path: &str,
    ctx: &TranslateCtx<'_>,
    errs: &mut Errors,
) -> Option<ListenerConfig> {
    let _ = (l, path, ctx, errs);
    None
}

/// Information about an accepted downstream connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// Peer address.
    pub peer: SocketAddr,
    /// Local address.
    pub local: SocketAddr,
    /// `per_connection_buffer_limit_bytes` of the listener.
    pub buffer_limit: u32,
}

/// Listening sockets for every listener and worker.
#[derive(Debug, Default)]
pub struct BoundListeners {
    addresses: Vec<crate::server::BoundListener>,
}

impl BoundListeners {
    /// The bound address of each listener.
    pub fn addresses(&self) -> Vec<crate::server::BoundListener> {
        self.addresses.clone()
    }

    /// Take worker `i`'s sockets.
    pub fn take_worker(&mut self, i: usize) -> WorkerListeners {
        let _ = i;
        WorkerListeners {}
    }
}

/// One worker's sockets.
#[derive(Debug)]
pub struct WorkerListeners {}

/// Bind every listener once per worker (SO_REUSEPORT). The error names the listener.
pub fn bind_all(
    listeners: &[Arc<ListenerConfig>],
    workers: usize,
) -> Result<BoundListeners, (String, std::io::Error)> {
    let _ = (listeners, workers);
    Ok(BoundListeners::default())
}

/// Run a worker's accept loops until draining starts, then wait for its connections
/// (or `hard_stop`).
pub async fn run_worker(w: WorkerListeners, state: Arc<crate::server::ServerState>) {
    let _ = w;
    state.hard_stop.cancelled().await;
}
