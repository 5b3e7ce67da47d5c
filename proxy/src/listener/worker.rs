//! A worker's listeners: it takes commands from the [`ListenerManager`](super::ListenerManager)
//! (add an accept loop, swap the listener version an accept loop hands out, stop one) and
//! runs one accept loop per listening socket: accept, then per connection (in its own task on
//! this worker's runtime): the listener filters in config order (`original_dst`,
//! `proxy_protocol`, `http_inspector`, `tls_inspector`; one `listener_filters_timeout`
//! deadline; see `intercept`), the `use_original_dst` hand-off to the listener of the restored
//! destination, filter chain selection on destination / source / SNI / ALPN / transport
//! protocol, the chain's TLS handshake (`transport_socket`, within its handshake timeout),
//! `ConnInfo.tls`, then the terminal filter. A listener without listener filters skips the
//! filter stage entirely.
//!
//! Edge limits ([`crate::overload`]): an accepted socket is first admitted by
//! [`Overload::admit`](crate::overload::Overload::admit) (global connection limit,
//! `reject_incoming_connections`, the listener's runtime limit; refused sockets are closed at
//! once and counted on the listener); while `stop_accepting_connections` is saturated the
//! accept loops do not accept (connections wait in the backlog). After chain selection the
//! chain's local rate limits and then its connection limits run before the connection is
//! counted and its TLS handshake starts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics::Gauge;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::intercept::{self, Facts};
use super::manager::{ListenerVersion, WorkerCmd, WorkerCommands};
use super::{ChainInput, ConnInfo, ListenerStats, NetworkFilter};
use crate::overload::Refused;
use crate::server::ServerState;
use crate::tls::inspector::Hello;

/// Back-off after an accept error that is not about one connection (EMFILE, ENOBUFS, ...).
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// One accept loop as the worker sees it.
struct Loop {
    /// The version new connections get (swapped in place).
    current: Arc<ArcSwap<ListenerVersion>>,
    /// Stops the loop (child of the server's `draining`).
    stop: CancellationToken,
    /// Ends when the loop ended (its socket is closed).
    done: tokio::sync::oneshot::Receiver<()>,
}

/// Run a worker: follow the manager's commands until the server drains, then wait for its
/// connections (or `hard_stop`). Call it inside the worker's (current-thread) runtime.
pub async fn run_worker(mut cmds: WorkerCommands, state: Arc<ServerState>) {
    let local = TaskTracker::new();
    let mut loops: HashMap<u64, Loop> = HashMap::new();
    loop {
        let cmd = tokio::select! {
            biased;
            _ = state.draining.cancelled() => break,
            c = cmds.recv() => c,
        };
        let Some(cmd) = cmd else {
            // The manager is gone; keep serving until the server drains.
            state.draining.cancelled().await;
            break;
        };
        match cmd {
            WorkerCmd::Add {
                id,
                version,
                socket,
            } => {
                let name = version.cfg.name.clone();
                match TcpListener::from_std(socket) {
                    Ok(l) => {
                        let current = Arc::new(ArcSwap::new(version));
                        let stop = state.draining.child_token();
                        let (tx, done) = tokio::sync::oneshot::channel();
                        let run = accept_loop(
                            l,
                            current.clone(),
                            stop.clone(),
                            state.clone(),
                            local.clone(),
                        );
                        local.spawn(async move {
                            run.await;
                            let _ = tx.send(());
                        });
                        loops.insert(
                            id,
                            Loop {
                                current,
                                stop,
                                done,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::error!(listener = %name, error = %e, "cannot register listening socket")
                    }
                }
            }
            WorkerCmd::Swap { id, version, ack } => {
                // Same thread as the accept loops: once stored, no connection of this worker
                // gets the old version.
                if let Some(l) = loops.get(&id) {
                    l.current.store(version);
                }
                let _ = ack.send(());
            }
            WorkerCmd::Stop { id, ack } => {
                if let Some(l) = loops.remove(&id) {
                    l.stop.cancel();
                    let _ = l.done.await;
                }
                let _ = ack.send(());
            }
        }
    }
    // Draining: every accept loop stops (their tokens are children of `draining`).
    local.close();
    tokio::select! {
        _ = local.wait() => {}
        _ = state.hard_stop.cancelled() => {}
    }
}

async fn accept_loop(
    listener: TcpListener,
    current: Arc<ArcSwap<ListenerVersion>>,
    stop: CancellationToken,
    state: Arc<ServerState>,
    local: TaskTracker,
) {
    // `stop_accepting_connections`: `true` while saturated.
    let mut paused = state.overload.accept_paused();
    loop {
        if let Some(rx) = paused.as_mut()
            && *rx.borrow_and_update()
        {
            tracing::debug!(listener = %current.load().cfg.name, "overload: not accepting");
            let sender_gone = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                r = rx.wait_for(|p| !*p) => r.is_err(),
            };
            if sender_gone {
                paused = None;
            }
            continue;
        }
        let r = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = pause_changed(&mut paused) => continue,
            r = listener.accept() => r,
        };
        match r {
            Ok((stream, peer)) => dispatch(stream, peer, &current.load_full(), &state, &local),
            // About one connection that went away before we took it: next.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                tracing::warn!(listener = %current.load().cfg.name, error = %e, "accept failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                }
            }
        }
    }
    // Dropping the socket here makes new connects to this worker's socket fail.
    drop(listener);
}

/// Resolves when the `stop_accepting_connections` state changes (never without one).
async fn pause_changed(rx: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    match rx {
        Some(r) => {
            if r.changed().await.is_err() {
                *rx = None;
            }
        }
        None => std::future::pending().await,
    }
}

fn dispatch(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    version: &Arc<ListenerVersion>,
    state: &Arc<ServerState>,
    local: &TaskTracker,
) {
    let cfg = &version.cfg;
    // Global connection limit, reject_incoming_connections, the listener's limit: refused
    // sockets are closed at once (dropped).
    let admitted = match state
        .overload
        .admit(&cfg.name, cfg.ignore_global_conn_limit)
    {
        Ok(a) => a,
        Err(why) => {
            let c = match why {
                Refused::GlobalLimit => &cfg.stats.downstream_global_cx_overflow,
                Refused::OverloadReject => &cfg.stats.downstream_cx_overload_reject,
                Refused::ListenerLimit => &cfg.stats.downstream_cx_overflow,
            };
            c.increment(1);
            tracing::debug!(listener = %cfg.name, %peer, reason = ?why, "connection refused at accept");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    // Dual-stack (`ipv4_compat`) sockets see IPv4 peers as `::ffff:a.b.c.d`; report IPv4 as
    // Envoy does.
    let peer = unmap(peer);
    let local_addr = unmap(stream.local_addr().unwrap_or(cfg.address));
    let serve = serve(stream, peer, local_addr, version.clone(), state.clone());
    let conn = async move {
        serve.await;
        drop(admitted);
    };
    state
        .connections
        .spawn(local.track_future(version.connections.track_future(conn)));
}

/// One connection: listener filters (in config order, [`super::intercept`]), the
/// `use_original_dst` hand-off, filter chain selection, TLS handshake, then the terminal
/// network filter.
async fn serve(
    mut stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    local_addr: std::net::SocketAddr,
    version: Arc<ListenerVersion>,
    st: Arc<ServerState>,
) {
    let mut version = version;
    let facts_direct_peer = peer;
    let mut facts = Facts::new(peer, local_addr);
    if intercept::has_filters(&version.cfg) {
        if !intercept::run(&mut stream, &version.cfg, &mut facts).await {
            return;
        }
        // use_original_dst: the listener of the restored destination takes the connection
        // (its own listener filters run; no further hand-off), as Envoy does.
        if version.cfg.intercept.use_original_dst
            && facts.restored
            && let Some(target) = st.listener_manager.version_for_address(facts.local)
            && !Arc::ptr_eq(&target, &version)
        {
            tracing::trace!(from = %version.cfg.name, to = %target.cfg.name, dst = %facts.local, "use_original_dst hand-off");
            if intercept::has_filters(&target.cfg)
                && !intercept::run(&mut stream, &target.cfg, &mut facts).await
            {
                return;
            }
            version = target;
        }
    }
    let cfg = &version.cfg;
    let (peer, local_addr, hello) = (facts.peer, facts.local, &facts.hello);
    let (sni, alpn, transport) = match hello {
        Hello::Tls { sni, alpn } => (sni.as_deref(), alpn.as_slice(), "tls"),
        _ => (None, &[][..], "raw_buffer"),
    };
    let mut alpn_refs: Vec<&str> = alpn.iter().map(String::as_str).collect();
    if let Some(h) = facts.http {
        alpn_refs.push(h);
    }
    let input = ChainInput {
        dst: local_addr,
        src: peer,
        server_name: sni,
        transport_protocol: transport,
        alpn: &alpn_refs,
    };
    let Some(chain) = cfg.select(&input) else {
        cfg.stats.no_filter_chain_match.increment(1);
        tracing::debug!(listener = %cfg.name, %peer, "no filter chain matched; closing");
        return;
    };
    // Network local rate limits: a connection over the limit is closed at once.
    if !chain.rate_limits.iter().all(|l| l.allow()) {
        tracing::debug!(listener = %cfg.name, %peer, "connection rate limited; closing");
        return;
    }
    // Connection limits: a slot per filter for the connection's lifetime; over a limit the
    // connection is closed (after the filter's `delay`) without being read.
    let _limits = match super::connection_limit::admit(&chain.connection_limits) {
        Ok(guards) => guards,
        Err(delay) => {
            tracing::debug!(listener = %cfg.name, %peer, "connection limit reached; closing");
            if let Some(d) = delay {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = version.hard_stop.cancelled() => {}
                }
            }
            return;
        }
    };
    let _guard = ConnGuard::new(&cfg.stats, &st.server_stats.total_connections);
    let mut info = ConnInfo {
        peer,
        local: local_addr,
        direct_peer: facts_direct_peer,
        local_restored: facts.restored,
        buffer_limit: cfg.per_connection_buffer_limit_bytes,
        drain: version.drain.clone(),
        hard_stop: version.hard_stop.clone(),
        tls: None,
    };
    // Terminate TLS (transport_socket), or record what the inspector saw (passthrough).
    let stream = match &chain.tls {
        Some(tls) => {
            let r = tokio::select! {
                r = tls.accept(stream) => r,
                _ = version.hard_stop.cancelled() => return,
            };
            match r {
                Ok((s, facts)) => {
                    info.tls = Some(Arc::new(facts));
                    Downstream::Tls(Box::new(s))
                }
                Err(e) => {
                    tracing::debug!(listener = %cfg.name, %peer, error = %e, "TLS handshake failed");
                    return;
                }
            }
        }
        None => {
            if let Hello::Tls { sni, alpn } = hello {
                info.tls = Some(Arc::new(weir_filters::DownstreamTls {
                    sni: sni.clone(),
                    alpn: alpn.first().map(|a| a.as_bytes().to_vec()),
                    terminated: false,
                    ..Default::default()
                }));
            }
            Downstream::Plain(stream)
        }
    };
    // ConnInfo is complete here (peer, local, TLS facts): network RBAC, which may need the
    // peer identity, runs before the terminal filter.
    if !chain.rbac.is_empty() && !super::rbac::admit(&chain.rbac, &info).await {
        return;
    }
    match (chain.filter.clone(), stream) {
        (NetworkFilter::Http(h), Downstream::Plain(s)) => {
            crate::http::serve_connection(s, h, info, st).await
        }
        (NetworkFilter::Http(h), Downstream::Tls(s)) => {
            crate::http::serve_connection(*s, h, info, st).await
        }
        (NetworkFilter::TcpProxy(t), Downstream::Plain(s)) => {
            super::tcp_proxy::serve(s, t, info, st).await
        }
        (NetworkFilter::TcpProxy(t), Downstream::Tls(s)) => {
            super::tcp_proxy::serve_tls(*s, t, info, st).await
        }
    }
}

/// The downstream byte stream after the transport socket.
enum Downstream {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

pub(super) fn unmap(a: std::net::SocketAddr) -> std::net::SocketAddr {
    match a {
        std::net::SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => std::net::SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
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

#[cfg(test)]
pub(super) mod tests {
    use std::collections::HashMap;

    use clap::Parser;
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::config::{Errors, TranslateCtx};
    use crate::listener::ListenerConfig;
    use crate::stats::Store;

    pub(crate) fn state(store: &Arc<Store>) -> Arc<ServerState> {
        state_n(store, 1)
    }

    pub(crate) fn state_n(store: &Arc<Store>, workers: usize) -> Arc<ServerState> {
        let snapshot = crate::config::translate(Default::default(), store).expect("empty config");
        let pc = weir_xds_api::from_yaml(
            "name: backend\ntype: STATIC\nload_assignment: {cluster_name: backend}\n",
        )
        .expect("cluster yaml");
        let mut errs = Errors::default();
        let backend = Arc::new(
            crate::upstream::translate_cluster(&pc, "backend", &mut errs).expect("cluster"),
        );
        let clusters = crate::upstream::ClusterManager::new(&[backend], store);
        ServerState::new(
            crate::cli::Options::parse_from(["weir"]),
            snapshot,
            clusters,
            workers,
        )
    }

    pub(crate) fn listener(store: &Arc<Store>, yaml: &str) -> Arc<ListenerConfig> {
        let l = weir_xds_api::from_yaml(yaml).expect("yaml");
        let clusters = ["backend"].into_iter().collect();
        let ctx = TranslateCtx {
            clusters: &clusters,
            stats: store,
            rds: None,
            rds_table: false,
        };
        let mut errs = Errors::default();
        let l = crate::listener::translate_listener(&l, "l", &ctx, &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        Arc::new(l.expect("listener"))
    }

    pub(crate) const YAML: &str = r#"
name: w
address: {socket_address: {address: 127.0.0.1, port_value: 0}}
filter_chains:
- filter_chain_match: {source_ports: [1]}
  filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
      stat_prefix: t
      cluster: backend
"#;

    pub(crate) fn stats(store: &Store) -> HashMap<String, String> {
        store.render_text().into_iter().collect()
    }

    pub(crate) async fn closed_by_proxy(addr: std::net::SocketAddr) {
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf))
            .await
            .expect("closed by the proxy");
        assert!(r.is_err() || buf.is_empty());
    }

    #[tokio::test]
    async fn accepts_dispatches_counts_and_drains() {
        let store = Store::new();
        let st = state(&store);
        let no_match = listener(&store, YAML);
        let with_default = listener(
            &store,
            &YAML.replace("name: w", "name: d").replace(
                "filter_chains:\n- filter_chain_match: {source_ports: [1]}\n",
                "default_filter_chain:\n",
            ),
        );
        let m = &st.listener_manager;
        m.add_or_update(no_match).expect("bind");
        m.add_or_update(with_default).expect("bind");
        let addrs = m.listeners();
        let worker = tokio::spawn(run_worker(m.take_worker(0).expect("worker 0"), st.clone()));

        // No chain matches (source port is not 1), no default chain: closed and counted.
        closed_by_proxy(addrs[0].address).await;
        // Default chain -> tcp_proxy -> cluster without healthy hosts: closed.
        closed_by_proxy(addrs[1].address).await;

        st.drain_listeners();
        tokio::time::timeout(Duration::from_secs(5), worker)
            .await
            .expect("worker returns after draining")
            .expect("worker");
        // The listening sockets are gone.
        assert!(
            tokio::net::TcpStream::connect(addrs[0].address)
                .await
                .is_err()
        );

        let s = stats(&store);
        let l0 = "listener.127.0.0.1_0.";
        assert_eq!(s[&format!("{l0}no_filter_chain_match")], "1");
        // Both listeners share the configured address (port 0) in their stat names.
        assert_eq!(s[&format!("{l0}downstream_cx_total")], "1");
        assert_eq!(s[&format!("{l0}downstream_cx_destroy")], "1");
        assert_eq!(s[&format!("{l0}downstream_cx_active")], "0");
        assert_eq!(s["server.total_connections"], "0");
        assert_eq!(s["tcp.t.downstream_cx_total"], "1");
        assert_eq!(s["cluster.backend.upstream_cx_none_healthy"], "1");
    }

    #[tokio::test]
    async fn worker_without_listeners_returns_on_drain() {
        let store = Store::new();
        let st = state(&store);
        let cmds = st.listener_manager.take_worker(0).expect("worker 0");
        assert!(st.listener_manager.take_worker(0).is_none(), "taken once");
        let worker = tokio::spawn(run_worker(cmds, st.clone()));
        st.drain_listeners();
        st.hard_stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), worker)
            .await
            .expect("returns")
            .expect("worker");
    }
}
