//! The listener-filter pipeline of an accepted connection: every configured listener filter
//! in config order (`original_dst`, `proxy_protocol`, `http_inspector`, `tls_inspector`), then
//! the TLS inspector Envoy adds implicitly when a chain matches on what only it can see. All
//! of them share one deadline, the listener's `listener_filters_timeout`: when it passes,
//! `downstream_pre_cx_timeout` counts and the connection closes, or, with
//! `continue_on_listener_filters_timeout`, goes on to filter-chain selection with what was
//! found so far (the remaining filters are skipped, as in Envoy). A listener without
//! listener filters does none of this (no allocation, no timer).

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{ListenerConfig, ListenerFilter};
use crate::tls::inspector::{self, Hello, InspectError};

/// What the listener filters found about a connection.
#[derive(Debug)]
pub(super) struct Facts {
    /// Peer (the PROXY protocol source when a header carried one).
    pub peer: SocketAddr,
    /// Local address (restored by original_dst or a PROXY header).
    pub local: SocketAddr,
    /// The local address was restored.
    pub restored: bool,
    /// What the TLS inspector saw.
    pub hello: Hello,
    /// What the HTTP inspector found (`application_protocols`).
    pub http: Option<&'static str>,
}

impl Facts {
    pub(super) fn new(peer: SocketAddr, local: SocketAddr) -> Self {
        Self {
            peer,
            local,
            restored: false,
            hello: Hello::NotTls,
            http: None,
        }
    }
}

/// Whether a listener runs any listener filter.
pub(super) fn has_filters(cfg: &ListenerConfig) -> bool {
    !cfg.listener_filters.is_empty() || cfg.tls_inspector.is_some()
}

/// Run `cfg`'s listener filters; `false`: close the connection.
pub(super) async fn run(stream: &mut TcpStream, cfg: &ListenerConfig, facts: &mut Facts) -> bool {
    let deadline = Instant::now() + cfg.listener_filters_timeout;
    let explicit_tls = cfg
        .listener_filters
        .iter()
        .any(|f| matches!(f, ListenerFilter::TlsInspector));
    let implicit =
        (!explicit_tls && cfg.tls_inspector.is_some()).then_some(&ListenerFilter::TlsInspector);
    for f in cfg.listener_filters.iter().chain(implicit) {
        match step(stream, cfg, f, facts, deadline).await {
            Step::Next => {}
            Step::Close => return false,
            Step::Timeout => {
                cfg.stats.downstream_pre_cx_timeout.increment(1);
                if cfg.continue_on_listener_filters_timeout {
                    tracing::debug!(listener = %cfg.name, peer = %facts.peer, "listener filter timeout; continuing");
                    return true;
                }
                tracing::debug!(listener = %cfg.name, peer = %facts.peer, "listener filter timeout; closing");
                return false;
            }
        }
    }
    true
}

enum Step {
    Next,
    Close,
    Timeout,
}

async fn step(
    stream: &mut TcpStream,
    cfg: &ListenerConfig,
    f: &ListenerFilter,
    facts: &mut Facts,
    deadline: Instant,
) -> Step {
    match f {
        ListenerFilter::OriginalDst => {
            if let Some(d) = super::original_dst::original_dst(stream, facts.local) {
                facts.local = d;
                facts.restored = true;
            }
            Step::Next
        }
        ListenerFilter::ProxyProtocol(pp) => {
            let r =
                tokio::time::timeout_at(deadline, super::proxy_protocol::read_header(stream, pp))
                    .await;
            match r {
                Err(_) => Step::Timeout,
                Ok(Ok(Some(h))) => {
                    if let Some((src, dst)) = h.addrs {
                        facts.peer = super::worker::unmap(src);
                        facts.local = super::worker::unmap(dst);
                        facts.restored = true;
                    }
                    Step::Next
                }
                Ok(Ok(None)) => Step::Next,
                Ok(Err(e)) => {
                    tracing::debug!(listener = %cfg.name, peer = %facts.peer, error = %e, "PROXY protocol; closing");
                    Step::Close
                }
            }
        }
        ListenerFilter::HttpInspector(stats) => {
            // Envoy's HTTP inspector leaves TLS connections alone.
            if matches!(facts.hello, Hello::Tls { .. }) {
                return Step::Next;
            }
            match tokio::time::timeout_at(deadline, super::http_inspector::inspect(stream, stats))
                .await
            {
                Err(_) => Step::Timeout,
                Ok(Ok(p)) => {
                    facts.http = p.alpn();
                    Step::Next
                }
                Ok(Err(e)) => {
                    tracing::debug!(listener = %cfg.name, peer = %facts.peer, error = %e, "http inspector; closing");
                    Step::Close
                }
            }
        }
        ListenerFilter::TlsInspector => {
            let Some(stats) = &cfg.tls_inspector else {
                return Step::Next;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            match inspector::inspect(stream, left).await {
                Ok(h) => {
                    stats.record(&h);
                    if h == Hello::TooLarge {
                        tracing::debug!(listener = %cfg.name, peer = %facts.peer, "ClientHello too large; closing");
                        return Step::Close;
                    }
                    facts.hello = h;
                    Step::Next
                }
                Err(InspectError::Timeout) => Step::Timeout,
                Err(e) => {
                    tracing::debug!(listener = %cfg.name, peer = %facts.peer, error = %e, "inspection ended");
                    Step::Close
                }
            }
        }
    }
}
