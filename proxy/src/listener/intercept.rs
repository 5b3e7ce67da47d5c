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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::listener::worker::tests::{YAML, listener, state};
    use crate::listener::{ListenerChange, ListenerConfig};
    use crate::stats::Store;

    fn l(store: &Arc<Store>, name: &str, addr: &str, extra: &str) -> Arc<ListenerConfig> {
        let (ip, port) = addr.rsplit_once(':').expect("ip:port");
        listener(
            store,
            &YAML
                .replace("name: w", &format!("name: {name}\n{extra}"))
                .replace(
                    "address: 127.0.0.1, port_value: 0",
                    &format!("address: \"{ip}\", port_value: {port}"),
                ),
        )
    }

    #[tokio::test]
    async fn unbound_listeners_are_found_by_address_exact_then_wildcard() {
        let store = Store::new();
        let st = state(&store);
        let m = &st.listener_manager;
        let unbound = "bind_to_port: false";
        assert_eq!(
            m.add_or_update(l(&store, "exact", "10.0.0.1:80", unbound))
                .expect("add"),
            ListenerChange::Added
        );
        m.add_or_update(l(&store, "wild4", "0.0.0.0:80", unbound))
            .expect("add");
        m.add_or_update(l(&store, "wild6", "::1:90", unbound))
            .expect("add");
        let find = |a: &str| {
            m.version_for_address(a.parse().expect("addr"))
                .map(|v| v.cfg.name.clone())
        };
        assert_eq!(find("10.0.0.1:80").as_deref(), Some("exact"));
        assert_eq!(find("10.0.0.2:80").as_deref(), Some("wild4"));
        assert_eq!(find("10.0.0.1:81"), None);
        // `::1` is not a wildcard.
        assert_eq!(find("[::2]:90"), None);
        assert_eq!(find("[::1]:90").as_deref(), Some("wild6"));
        // An IPv6 destination does not match an IPv4 wildcard.
        assert_eq!(find("[::5]:80"), None);

        // Re-adding the same unbound listener replaces it without sockets; binding it later
        // gives it sockets (a real, connectable port).
        assert_eq!(
            m.add_or_update(l(&store, "exact", "10.0.0.1:80", unbound))
                .expect("update"),
            ListenerChange::Modified { in_place: true }
        );
        assert_eq!(
            m.add_or_update(l(&store, "exact", "127.0.0.1:0", ""))
                .expect("bind"),
            ListenerChange::Modified { in_place: false }
        );
        let bound = m
            .listeners()
            .into_iter()
            .find(|b| b.name == "exact")
            .expect("exact")
            .address;
        assert_ne!(bound.port(), 0);
        assert_eq!(find(&bound.to_string()).as_deref(), Some("exact"));
        assert_eq!(find("10.0.0.1:80").as_deref(), Some("wild4"));
    }
}
