//! A worker's accept loops: accept, pick the filter chain, hand the connection to its
//! terminal filter on this worker's runtime.

use std::sync::Arc;
use std::time::Duration;

use metrics::Gauge;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::{ChainInput, ConnInfo, ListenerConfig, ListenerStats, NetworkFilter, WorkerListeners};
use crate::server::ServerState;

/// Back-off after an accept error that is not about one connection (EMFILE, ENOBUFS, ...).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Run a worker's accept loops until draining starts, then wait for its connections
/// (or `hard_stop`). Call it inside the worker's runtime.
pub async fn run_worker(w: WorkerListeners, state: Arc<ServerState>) {
    let local = TaskTracker::new();
    let mut loops = Vec::with_capacity(w.listeners.len());
    for (cfg, sock) in w.listeners {
        match TcpListener::from_std(sock) {
            Ok(l) => loops.push(accept_loop(l, cfg, state.clone(), local.clone())),
            Err(e) => {
                tracing::error!(listener = %cfg.name, error = %e, "cannot register listening socket")
            }
        }
    }
    futures::future::join_all(loops).await;
    local.close();
    tokio::select! {
        _ = local.wait() => {}
        _ = state.hard_stop.cancelled() => {}
    }
}

async fn accept_loop(
    listener: TcpListener,
    cfg: Arc<ListenerConfig>,
    state: Arc<ServerState>,
    local: TaskTracker,
) {
    loop {
        let r = tokio::select! {
            biased;
            _ = state.draining.cancelled() => break,
            r = listener.accept() => r,
        };
        match r {
            Ok((stream, peer)) => dispatch(stream, peer, &cfg, &state, &local),
            // About one connection that went away before we took it: next.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                tracing::warn!(listener = %cfg.name, error = %e, "accept failed; retrying");
                tokio::select! {
                    _ = state.draining.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                }
            }
        }
    }
    // Dropping the socket here makes new connects to this worker's socket fail.
    drop(listener);
}

fn dispatch(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    cfg: &Arc<ListenerConfig>,
    state: &Arc<ServerState>,
    local: &TaskTracker,
) {
    let _ = stream.set_nodelay(true);
    let local_addr = stream.local_addr().unwrap_or(cfg.address);
    let input = ChainInput {
        dst: local_addr,
        src: peer,
        server_name: None,
        transport_protocol: "raw_buffer",
        alpn: &[],
    };
    let Some(chain) = cfg.select(&input) else {
        cfg.stats.no_filter_chain_match.increment(1);
        tracing::debug!(listener = %cfg.name, %peer, "no filter chain matched; closing");
        return;
    };
    let filter = chain.filter.clone();
    let guard = ConnGuard::new(&cfg.stats, &state.server_stats.total_connections);
    let info = ConnInfo {
        peer,
        local: local_addr,
        buffer_limit: cfg.per_connection_buffer_limit_bytes,
    };
    let st = state.clone();
    let conn = async move {
        let _guard = guard;
        match filter {
            NetworkFilter::Http(h) => crate::http::serve_connection(stream, h, info, st).await,
            NetworkFilter::TcpProxy(t) => super::tcp_proxy::serve(stream, t, info, st).await,
        }
    };
    state.connections.spawn(local.track_future(conn));
}

/// Counts a connection in and out of the listener's gauges (also when its task is dropped).
struct ConnGuard {
    stats: ListenerStats,
    total: Gauge,
    start: Instant,
}

impl ConnGuard {
    fn new(stats: &ListenerStats, total: &Gauge) -> Self {
        stats.downstream_cx_total.increment(1);
        stats.downstream_cx_active.increment(1.0);
        total.increment(1.0);
        Self {
            stats: stats.clone(),
            total: total.clone(),
            start: Instant::now(),
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.stats.downstream_cx_active.decrement(1.0);
        self.stats.downstream_cx_destroy.increment(1);
        self.total.decrement(1.0);
        self.stats
            .downstream_cx_length_ms
            .record(self.start.elapsed().as_secs_f64() * 1000.0);
    }
}
