//! The `envoy.filters.network.tcp_proxy` network filter: pick a cluster and a host, connect,
//! then move bytes both ways until both halves closed.
//!
//! Byte moving ([`proxy_streams`]) has two engines: `splice(2)` through a pipe pair on Linux
//! (bytes never enter user space) and a buffered copy (`copy_bidirectional_with_sizes`) that
//! works everywhere. Both propagate half-close (a FIN from one side becomes a `shutdown(Write)`
//! on the other), end on the idle timeout, the max connection duration or cancellation, and
//! count `downstream_cx_rx_bytes_total` / `downstream_cx_tx_bytes_total` as bytes move.
//!
//! Access logs (`access_log`): one line per connection when it ends, with bytes both ways,
//! the upstream cluster/host/local address and the response flags weir set (`NR` no cluster,
//! `UH` no healthy host, `UF` connect failures, `UO` connection breaker open).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use metrics::Counter;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ConnInfo;
use crate::server::ServerState;
use crate::stats::Scope;

/// Largest buffer the copy engine allocates per direction, whatever the buffer limit says.
const MAX_COPY_BUF: usize = 64 * 1024;

/// Translated `TcpProxy`.
#[derive(Debug)]
pub struct TcpProxyConfig {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// `(cluster, weight)`; one entry with weight 1 for `cluster`.
    pub clusters: Vec<(String, u32)>,
    total_weight: u64,
    /// `idle_timeout` (default 1 h; `None` when `0s` disabled it).
    pub idle_timeout: Option<Duration>,
    /// `max_downstream_connection_duration`.
    pub max_downstream_connection_duration: Option<Duration>,
    /// `max_connect_attempts` (default 1).
    pub max_connect_attempts: u32,
    /// `tcp.<stat_prefix>.*`.
    pub stats: TcpProxyStats,
    /// `hash_policy: [{source_ip: {}}]`: RING_HASH / MAGLEV clusters pick by the downstream
    /// source IP (xxHash64 of its text form, as Envoy).
    pub hash_source_ip: bool,
    /// `access_log`.
    pub access_logs: crate::access_log::AccessLogs,
}

impl TcpProxyConfig {
    /// Build (translation validated the values).
    pub fn new(
        stat_prefix: String,
        clusters: Vec<(String, u32)>,
        idle_timeout: Option<Duration>,
        max_downstream_connection_duration: Option<Duration>,
        max_connect_attempts: u32,
        stats: TcpProxyStats,
    ) -> Self {
        let total_weight = clusters.iter().map(|(_, w)| u64::from(*w)).sum();
        Self {
            stat_prefix,
            clusters,
            total_weight,
            idle_timeout,
            max_downstream_connection_duration,
            max_connect_attempts,
            stats,
            hash_source_ip: false,
            access_logs: crate::access_log::AccessLogs::default(),
        }
    }

    /// Pick a cluster by weight (`r` uniform in `0..total_weight`).
    pub fn pick_cluster_with(&self, r: u64) -> Option<&str> {
        let mut acc = 0u64;
        for (name, w) in &self.clusters {
            acc += u64::from(*w);
            if r < acc {
                return Some(name);
            }
        }
        self.clusters.last().map(|(n, _)| n.as_str())
    }

    /// Pick a cluster by weight at random.
    pub fn pick_cluster(&self) -> Option<&str> {
        if self.clusters.len() <= 1 || self.total_weight == 0 {
            return self.clusters.first().map(|(n, _)| n.as_str());
        }
        let r = rand::rng().random_range(0..self.total_weight);
        self.pick_cluster_with(r)
    }
}

/// `tcp.<stat_prefix>.*` (Envoy names).
#[derive(Debug, Clone)]
pub struct TcpProxyStats {
    /// `downstream_cx_total`.
    pub downstream_cx_total: Counter,
    /// `downstream_cx_no_route`: no cluster for the connection.
    pub downstream_cx_no_route: Counter,
    /// `downstream_cx_rx_bytes_total`.
    pub downstream_cx_rx_bytes_total: Counter,
    /// `downstream_cx_tx_bytes_total`.
    pub downstream_cx_tx_bytes_total: Counter,
    /// `idle_timeout`.
    pub idle_timeout: Counter,
    /// `max_downstream_connection_duration`.
    pub max_downstream_connection_duration: Counter,
}

impl TcpProxyStats {
    /// Register under `tcp.<stat_prefix>.`.
    pub fn new(scope: &Scope) -> Self {
        Self {
            downstream_cx_total: scope.counter("downstream_cx_total"),
            downstream_cx_no_route: scope.counter("downstream_cx_no_route"),
            downstream_cx_rx_bytes_total: scope.counter("downstream_cx_rx_bytes_total"),
            downstream_cx_tx_bytes_total: scope.counter("downstream_cx_tx_bytes_total"),
            idle_timeout: scope.counter("idle_timeout"),
            max_downstream_connection_duration: scope.counter("max_downstream_connection_duration"),
        }
    }
}

/// What a tcp_proxy connection did, for its access log line.
#[derive(Debug, Default)]
struct ConnLog {
    flags: crate::access_log::ResponseFlags,
    cluster: Option<Arc<crate::upstream::Cluster>>,
    host: Option<std::net::SocketAddr>,
    upstream_local: Option<std::net::SocketAddr>,
    failure: Option<String>,
    received: u64,
    sent: u64,
}

/// Serve one downstream connection with the tcp_proxy filter.
pub async fn serve(
    downstream: TcpStream,
    cfg: Arc<TcpProxyConfig>,
    conn: ConnInfo,
    state: Arc<ServerState>,
) {
    let start = (std::time::SystemTime::now(), Instant::now());
    let mut log = ConnLog::default();
    serve_inner(downstream, &cfg, &conn, &state, &mut log).await;
    if cfg.access_logs.is_empty() {
        return;
    }
    let rec = crate::access_log::LogRecord {
        start_time: start.0,
        flags: log.flags,
        bytes_received: log.received,
        bytes_sent: log.sent,
        duration: Some(start.1.elapsed()),
        upstream_host: log.host,
        upstream_cluster: log.cluster.as_ref().map(|c| c.name()),
        upstream_local: log.upstream_local,
        upstream_failure_reason: log.failure.as_deref(),
        downstream_remote: Some(conn.peer),
        downstream_local: Some(conn.local),
        tls: conn.tls.as_deref(),
        ..Default::default()
    };
    cfg.access_logs.log(&rec);
}

async fn serve_inner(
    downstream: TcpStream,
    cfg: &TcpProxyConfig,
    conn: &ConnInfo,
    state: &ServerState,
    log: &mut ConnLog,
) {
    use crate::access_log::Flag;
    cfg.stats.downstream_cx_total.increment(1);
    let Some(cluster) = cfg.pick_cluster().and_then(|n| state.clusters.get(n)) else {
        cfg.stats.downstream_cx_no_route.increment(1);
        log.flags.set(Flag::NoRouteFound);
        tracing::debug!(peer = %conn.peer, prefix = %cfg.stat_prefix, "tcp_proxy: no cluster");
        return;
    };
    log.cluster = Some(cluster.clone());
    let mut upstream = None;
    let ctx = crate::upstream::LbContext {
        hash: cfg
            .hash_source_ip
            .then(|| crate::upstream::lb::xxhash::xxhash64(conn.peer.ip().to_string().as_bytes())),
        // ORIGINAL_DST clusters connect to the restored destination.
        original_dst: conn.local_restored.then_some(conn.local),
        ..Default::default()
    };
    for attempt in 1..=cfg.max_connect_attempts {
        // choose_host counts upstream_cx_none_healthy itself.
        let Some(host) = cluster.choose_host(&ctx) else {
            log.flags.set(Flag::NoHealthyUpstream);
            tracing::debug!(cluster = cluster.name(), "tcp_proxy: no healthy upstream");
            return;
        };
        log.host = Some(host.address);
        let r = tokio::select! {
            r = cluster.connect_tcp(&host, crate::upstream::circuit::Priority::Default) => r,
            _ = conn.hard_stop.cancelled() => return,
        };
        match r {
            Ok(s) => {
                cluster.report(&host, crate::upstream::HostResult::ConnectSucceeded);
                upstream = Some(s);
                break;
            }
            // The connection breaker is open (counted as upstream_cx_overflow): close.
            Err(crate::upstream::UpstreamError::Overflow) => {
                log.flags.set(Flag::UpstreamOverflow);
                return;
            }
            Err(e) => {
                cluster.report(&host, crate::upstream::HostResult::ConnectFailed);
                log.flags.set(Flag::UpstreamConnectionFailure);
                log.failure = Some(e.to_string());
                tracing::debug!(
                    cluster = cluster.name(),
                    host = %host.address,
                    attempt,
                    error = %e,
                    "tcp_proxy: upstream connect failed"
                )
            }
        }
    }
    let Some(upstream) = upstream else {
        return;
    };
    // The guard keeps the cluster's upstream_cx_active right until the copy ends.
    let (upstream, _cx_guard) = (upstream.stream, upstream.guard);
    // A later attempt connected: the failures before it are not the connection's outcome.
    log.flags = Default::default();
    log.failure = None;
    log.upstream_local = upstream.local_addr().ok();
    let _ = upstream.set_nodelay(true);
    let opts = ProxyOptions {
        engine: Engine::default(),
        idle_timeout: cfg.idle_timeout,
        max_duration: cfg.max_downstream_connection_duration,
        buffer_limit: conn.buffer_limit,
    };
    let counters = ByteCounters {
        rx: cfg.stats.downstream_cx_rx_bytes_total.clone(),
        tx: cfg.stats.downstream_cx_tx_bytes_total.clone(),
    };
    let out = proxy_streams(downstream, upstream, &opts, &counters, &conn.hard_stop).await;
    log.received = out.downstream_to_upstream;
    log.sent = out.upstream_to_downstream;
    match &out.end {
        ProxyEnd::IdleTimeout => cfg.stats.idle_timeout.increment(1),
        ProxyEnd::MaxDuration => cfg.stats.max_downstream_connection_duration.increment(1),
        ProxyEnd::Error(e) => tracing::debug!(peer = %conn.peer, error = %e, "tcp_proxy: reset"),
        ProxyEnd::Closed | ProxyEnd::Cancelled => {}
    }
}

/// How bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// `splice(2)` through a pipe per direction (Linux); falls back to [`Engine::Copy`] when
    /// pipes cannot be made.
    Splice,
    /// Buffered copy in user space.
    Copy,
}

impl Default for Engine {
    fn default() -> Self {
        if cfg!(target_os = "linux") {
            Engine::Splice
        } else {
            Engine::Copy
        }
    }
}

/// Settings for [`proxy_streams`].
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Engine.
    pub engine: Engine,
    /// End the connection after this long without bytes moving either way.
    pub idle_timeout: Option<Duration>,
    /// End the connection after this long, whatever happens.
    pub max_duration: Option<Duration>,
    /// Bound on bytes held per direction (pipe size or copy buffer).
    pub buffer_limit: u32,
}

/// Counters bumped as bytes move.
#[derive(Debug, Clone)]
pub struct ByteCounters {
    /// Bytes read from downstream.
    pub rx: Counter,
    /// Bytes written to downstream.
    pub tx: Counter,
}

impl ByteCounters {
    /// Counters that count nothing.
    pub fn noop() -> Self {
        Self {
            rx: Counter::noop(),
            tx: Counter::noop(),
        }
    }
}

/// Why [`proxy_streams`] returned.
#[derive(Debug)]
pub enum ProxyEnd {
    /// Both sides closed their write halves and everything was forwarded.
    Closed,
    /// Idle timeout.
    IdleTimeout,
    /// `max_downstream_connection_duration`.
    MaxDuration,
    /// The cancellation token fired (`hard_stop`).
    Cancelled,
    /// A read or write failed (reset, broken pipe, ...).
    Error(io::Error),
}

/// What [`proxy_streams`] did.
#[derive(Debug)]
pub struct ProxyOutcome {
    /// Why it ended.
    pub end: ProxyEnd,
    /// Bytes forwarded downstream -> upstream.
    pub downstream_to_upstream: u64,
    /// Bytes forwarded upstream -> downstream.
    pub upstream_to_downstream: u64,
}

/// Activity shared by both directions: last progress time and byte totals.
#[derive(Debug)]
pub(crate) struct Meter {
    start: Instant,
    last_ms: AtomicU64,
    pub(crate) up: AtomicU64,
    pub(crate) down: AtomicU64,
    counters: ByteCounters,
}

impl Meter {
    fn new(counters: ByteCounters) -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            counters,
        }
    }

    pub(crate) fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Bytes read from downstream (forwarded upstream).
    pub(crate) fn rx(&self, n: usize) {
        self.touch();
        self.up.fetch_add(n as u64, Ordering::Relaxed);
        self.counters.rx.increment(n as u64);
    }

    /// Bytes written to downstream.
    pub(crate) fn tx(&self, n: usize) {
        self.touch();
        self.down.fetch_add(n as u64, Ordering::Relaxed);
        self.counters.tx.increment(n as u64);
    }

    /// Resolves once nothing moved for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Move bytes between `downstream` and `upstream` until both directions finished (EOF on
/// one side becomes `shutdown(Write)` on the other), an error, the idle timeout, the max
/// duration, or `cancel`. Both sockets are closed when it returns.
pub async fn proxy_streams(
    downstream: TcpStream,
    upstream: TcpStream,
    opts: &ProxyOptions,
    counters: &ByteCounters,
    cancel: &CancellationToken,
) -> ProxyOutcome {
    let meter = Meter::new(counters.clone());
    let limit = (opts.buffer_limit as usize).max(1);
    let transfer = async {
        #[cfg(target_os = "linux")]
        if opts.engine == Engine::Splice {
            match super::splice::Pipes::new(limit) {
                Ok(pipes) => {
                    return super::splice::splice_bidirectional(
                        &downstream,
                        &upstream,
                        &pipes,
                        &meter,
                    )
                    .await;
                }
                Err(e) => tracing::debug!(error = %e, "splice unavailable; copying"),
            }
        }
        copy_bidirectional(&downstream, &upstream, limit, &meter).await
    };
    let idle = async {
        match opts.idle_timeout {
            Some(d) => meter.idle(d).await,
            None => std::future::pending().await,
        }
    };
    let max = async {
        match opts.max_duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let end = tokio::select! {
        r = transfer => match r {
            Ok(()) => ProxyEnd::Closed,
            Err(e) => ProxyEnd::Error(e),
        },
        _ = idle => ProxyEnd::IdleTimeout,
        _ = max => ProxyEnd::MaxDuration,
        _ = cancel.cancelled() => ProxyEnd::Cancelled,
    };
    ProxyOutcome {
        end,
        downstream_to_upstream: meter.up.load(Ordering::Relaxed),
        upstream_to_downstream: meter.down.load(Ordering::Relaxed),
    }
}

/// The portable engine: `copy_bidirectional_with_sizes` over metered shared references.
async fn copy_bidirectional(
    downstream: &TcpStream,
    upstream: &TcpStream,
    limit: usize,
    meter: &Meter,
) -> io::Result<()> {
    let size = limit.min(MAX_COPY_BUF);
    let mut d = Metered {
        io: downstream,
        meter,
        downstream: true,
    };
    let mut u = Metered {
        io: upstream,
        meter,
        downstream: false,
    };
    tokio::io::copy_bidirectional_with_sizes(&mut d, &mut u, size, size)
        .await
        .map(|_| ())
}

/// A `&TcpStream` that reports bytes read from / written to downstream to the meter.
struct Metered<'a> {
    io: &'a TcpStream,
    meter: &'a Meter,
    downstream: bool,
}

impl AsyncRead for Metered<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        // `&TcpStream` reads through `poll_read_ready` + `try_read` (tokio has no
        // `AsyncRead for &TcpStream`).
        loop {
            match this.io.poll_read_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            match this.io.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        let n = buf.filled().len() - before;
        if this.downstream {
            this.meter.rx(n);
        } else {
            this.meter.touch();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Metered<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            match this.io.poll_write_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            match this.io.try_write(buf) {
                Ok(n) => {
                    if this.downstream {
                        this.meter.tx(n);
                    } else {
                        this.meter.touch();
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(shutdown_write(self.io))
    }
}

/// Half-close: send FIN to the peer, keep reading.
pub(crate) fn shutdown_write(s: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write) {
        // The peer may already be gone; the other direction reports that.
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests;
