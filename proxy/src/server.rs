//! Process lifecycle: build the runtime state from a [`Snapshot`], add the static listeners
//! to the [`ListenerManager`], start the worker threads and the admin server, then drain and
//! stop on request. Listeners can change at runtime through `state.listener_manager`.
//!
//! Threads: the caller's tokio runtime is the *main* runtime (admin, DNS refresh, stats
//! upkeep); each worker is a std thread running a single-threaded tokio runtime with its own
//! SO_REUSEPORT sockets, so nothing on a request's path is shared between workers except
//! read-mostly `Arc`s and atomics.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use metrics::Gauge;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::Options;
use crate::config::Snapshot;
use crate::listener::{ListenerError, ListenerManager};
use crate::stats::Store;
use crate::upstream::ClusterManager;

/// Server-wide stats (`server.*`).
#[derive(Debug, Clone)]
pub struct ServerStats {
    /// `server.live`: 1 while serving (not draining).
    pub live: Gauge,
    /// `server.state`: 0 LIVE, 1 DRAINING, 2 PRE_INITIALIZING, 3 INITIALIZING (Envoy's values).
    pub state: Gauge,
    /// `server.concurrency`.
    pub concurrency: Gauge,
    /// `server.uptime` (seconds, refreshed by the upkeep task).
    pub uptime: Gauge,
    /// `server.total_connections`: open downstream connections across workers.
    pub total_connections: Gauge,
}

impl ServerStats {
    /// Register under `server.`.
    pub fn new(store: &Arc<Store>) -> Self {
        let server = store.plain("server");
        Self {
            live: server.gauge("live"),
            state: server.gauge("state"),
            concurrency: server.gauge("concurrency"),
            uptime: server.gauge("uptime"),
            total_connections: server.gauge("total_connections"),
        }
    }
}

/// A listener as bound.
#[derive(Debug, Clone)]
pub struct BoundListener {
    /// Listener name.
    pub name: String,
    /// Actual local address (port resolved when the config said 0).
    pub address: SocketAddr,
}

/// Everything the admin server, listeners and connections share.
#[derive(Debug)]
pub struct ServerState {
    /// CLI options as started.
    pub options: Options,
    /// Current config.
    pub snapshot: ArcSwap<Snapshot>,
    /// Stats.
    pub stats: Arc<Store>,
    /// Server stats handles.
    pub server_stats: ServerStats,
    /// Clusters.
    pub clusters: Arc<ClusterManager>,
    /// Listeners: the active ones with their bound addresses, runtime changes (LDS).
    pub listener_manager: ListenerManager,
    /// Admin address as bound.
    pub admin_address: OnceLock<SocketAddr>,
    /// Start time.
    pub started: SystemTime,
    /// Worker count.
    pub concurrency: usize,
    /// `false` after `POST /healthcheck/fail` (health_check filter answers 503).
    pub healthy: AtomicBool,
    /// `true` once listeners accept.
    pub ready: AtomicBool,
    /// Fired to drain: listeners stop accepting; connections finish in-flight work
    /// (HTTP/1 `Connection: close`, HTTP/2 GOAWAY) and close.
    pub draining: CancellationToken,
    /// Fired to stop the process after draining (`SIGTERM`, `/quitquitquit`).
    pub shutdown: CancellationToken,
    /// Fired when the drain time is over: remaining connections are closed.
    pub hard_stop: CancellationToken,
    /// Every downstream connection task, across workers.
    pub connections: TaskTracker,
    /// The xDS client's state, when the bootstrap has dynamic resources.
    pub xds: OnceLock<Arc<crate::xds::Dynamic>>,
}

impl ServerState {
    /// State for a server about to start (not ready, not draining) serving `snapshot`, with
    /// stats in the snapshot's store.
    pub fn new(
        options: Options,
        snapshot: Snapshot,
        clusters: Arc<ClusterManager>,
        concurrency: usize,
    ) -> Arc<Self> {
        let stats = snapshot.stats.clone();
        let server_stats = ServerStats::new(&stats);
        server_stats.state.set(3.0);
        server_stats.concurrency.set(concurrency as f64);
        let draining = CancellationToken::new();
        let hard_stop = CancellationToken::new();
        let listener_manager = ListenerManager::new(
            concurrency,
            &stats,
            &draining,
            &hard_stop,
            Duration::from_secs(options.drain_time_s),
        );
        Arc::new(ServerState {
            options,
            snapshot: ArcSwap::from_pointee(snapshot),
            stats,
            server_stats,
            clusters,
            listener_manager,
            admin_address: OnceLock::new(),
            started: SystemTime::now(),
            concurrency,
            healthy: AtomicBool::new(true),
            ready: AtomicBool::new(false),
            draining,
            shutdown: CancellationToken::new(),
            hard_stop,
            connections: TaskTracker::new(),
            xds: OnceLock::new(),
        })
    }

    /// Start draining listeners (idempotent).
    pub fn drain_listeners(&self) {
        if !self.draining.is_cancelled() {
            tracing::info!("draining listeners");
            self.server_stats.live.set(0.0);
            self.server_stats.state.set(1.0);
            self.draining.cancel();
        }
    }

    /// Drain, then exit (idempotent).
    pub fn request_shutdown(&self) {
        self.drain_listeners();
        self.shutdown.cancel();
    }

    /// Drain time from `--drain-time-s`.
    pub fn drain_time(&self) -> Duration {
        Duration::from_secs(self.options.drain_time_s)
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A socket could not be bound.
    #[error("binding {what}: {source}")]
    Bind {
        /// Which listener or admin.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A worker thread could not be started.
    #[error("starting worker thread: {0}")]
    Thread(std::io::Error),
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    /// Shared state.
    pub state: Arc<ServerState>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl ServerHandle {
    /// Address of the named listener as bound.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.state
            .listener_manager
            .listeners()
            .into_iter()
            .find(|l| l.name == name)
            .map(|l| l.address)
    }

    /// Admin address as bound.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.state.admin_address.get().copied()
    }

    /// Wait until shutdown was requested, drain (bounded by the drain time), stop workers.
    pub async fn wait(self) {
        self.state.shutdown.cancelled().await;
        self.stop().await;
    }

    /// Drain now and stop: in-flight requests finish up to the drain time.
    pub async fn stop(mut self) {
        let state = self.state.clone();
        state.request_shutdown();
        state.connections.close();
        let drain = state.drain_time();
        if tokio::time::timeout(drain, state.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = state.connections.len(),
                "drain time over; closing remaining connections"
            );
        }
        state.hard_stop.cancel();
        let workers = std::mem::take(&mut self.workers);
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await;
        tracing::info!("server stopped");
    }
}

/// Start serving `snapshot` on the current tokio runtime (the main runtime) plus
/// `options.concurrency` worker threads.
pub async fn start(options: Options, snapshot: Snapshot) -> Result<ServerHandle, StartError> {
    let concurrency = options.concurrency.filter(|n| *n > 0).unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let clusters = ClusterManager::new(&snapshot.clusters, &snapshot.stats);
    clusters.start(&tokio::runtime::Handle::current());
    let admin_address = snapshot.admin_address;
    let listeners_cfg = snapshot.listeners.clone();
    let state = ServerState::new(options, snapshot, clusters, concurrency);
    // Access log rotation (Envoy's SIGUSR1).
    crate::access_log::spawn_reopen_on_sigusr1();

    if let Some(addr) = admin_address {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                what: "admin".into(),
                source,
            })?;
        let bound = l.local_addr().map_err(|source| StartError::Bind {
            what: "admin".into(),
            source,
        })?;
        let _ = state.admin_address.set(bound);
        tracing::info!(%bound, "admin listening");
        tokio::spawn(crate::admin::serve(l, state.clone()));
    }

    // xDS: the initial fetch (CDS, EDS, LDS, RDS, each bounded by initial_fetch_timeout)
    // completes before listeners accept, as Envoy's init manager does.
    let dynamic = crate::xds::start(&state);
    if let Some(d) = &dynamic {
        d.initialized().await;
        // SDS: TLS contexts of static listeners and clusters wait for their ADS secrets
        // (Envoy's init manager), bounded by the default initial_fetch_timeout.
        wait_for_secrets(&state).await;
    }
    // Cluster warming: STRICT_DNS clusters get their first resolution before listeners accept.
    state.clusters.initialized().await;
    // Bind every static listener before the workers run: their commands wait in the
    // workers' channels and the sockets queue connections meanwhile.
    for l in listeners_cfg {
        if let Err(e) = state.listener_manager.add_or_update(l) {
            // Stop what started (admin, the listeners bound so far).
            state.drain_listeners();
            state.hard_stop.cancel();
            return Err(match e {
                ListenerError::Bind { name, source } => StartError::Bind { what: name, source },
                ListenerError::Stopped => StartError::Bind {
                    what: "listeners".into(),
                    source: std::io::Error::other("server stopped while starting"),
                },
            });
        }
    }
    let mut workers = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let Some(w) = state.listener_manager.take_worker(i) else {
            continue;
        };
        let st = state.clone();
        let t = std::thread::Builder::new()
            .name(format!("weir-worker-{i}"))
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "worker runtime failed to start");
                        st.request_shutdown();
                        return;
                    }
                };
                rt.block_on(crate::listener::run_worker(w, st));
            })
            .map_err(StartError::Thread)?;
        workers.push(t);
    }

    // Stats upkeep: drain histogram buckets, refresh uptime and connection gauges.
    let st = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = st.hard_stop.cancelled() => break,
            }
            st.stats.upkeep();
            let up = st.started.elapsed().unwrap_or_default().as_secs();
            st.server_stats.uptime.set(up as f64);
        }
    });

    if let Some(d) = &dynamic {
        d.enable_listeners();
    }
    state.ready.store(true, Ordering::SeqCst);
    state.server_stats.state.set(0.0);
    state.server_stats.live.set(1.0);
    for l in state.listener_manager.listeners() {
        tracing::info!(name = %l.name, address = %l.address, "listener ready");
    }
    Ok(ServerHandle { state, workers })
}

/// Wait until every ADS secret a TLS context uses has arrived, at most
/// [`crate::config::source::DEFAULT_INITIAL_FETCH_TIMEOUT`]; then listeners accept anyway (handshakes
/// needing a missing secret fail and count `ssl.connection_error`).
async fn wait_for_secrets(state: &Arc<ServerState>) {
    let registry = crate::tls::secrets::registry(&state.stats);
    let deadline =
        tokio::time::Instant::now() + crate::config::source::DEFAULT_INITIAL_FETCH_TIMEOUT;
    loop {
        let missing: Vec<String> = registry
            .wanted_ads()
            .into_iter()
            .filter(|n| registry.get(n).is_none())
            .collect();
        if missing.is_empty() {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                ?missing,
                "SDS secrets did not arrive within the initial fetch timeout; serving without them"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
