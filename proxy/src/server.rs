//! Process lifecycle: build the runtime state from a [`Snapshot`], add the static listeners
//! to the [`ListenerManager`], start the worker threads and the admin server, then drain and
//! stop on request. Listeners can change at runtime through `state.listener_manager`.
//!
//! Threads: the caller's tokio runtime is the *main* runtime (admin, DNS refresh, stats
//! upkeep); each worker is a std thread running a single-threaded tokio runtime with its own
//! SO_REUSEPORT sockets, so nothing on a request's path is shared between workers except
//! read-mostly `Arc`s and atomics.
//!
//! Hot restart ([`crate::hot_restart`]): [`start_with`] takes the sockets a child inherited
//! from its parent (listeners and admin); [`ServerState::drain_for_hot_restart`] is the
//! parent's side (stop accepting, admin included, and exit within the parent shutdown time).
//!
//! Overload manager ([`crate::overload`]): `ServerState::overload` holds the limits every
//! worker reads; its monitor task runs on the main runtime.
//!
//! Lifecycle: `ready` (and `/ready` 200) only once listeners accept, which for an
//! xDS-configured proxy is after the initial fetch (or its `initial_fetch_timeout`s); with
//! `--exit-on-zero-active-connections` any drain (also `/drain_listeners`) ends in shutdown,
//! which exits as soon as no downstream connection is left (bounded by the drain time).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use metrics::Gauge;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::Options;
use crate::config::Snapshot;
use crate::hot_restart::Inherited;
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
    /// `server.hot_restart_epoch`: `--restart-epoch`.
    pub hot_restart_epoch: Gauge,
    /// `server.hot_restart_generation`: the parent's generation + 1 (0 without a parent).
    pub hot_restart_generation: Gauge,
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
            hot_restart_epoch: server.gauge("hot_restart_epoch"),
            hot_restart_generation: server.gauge("hot_restart_generation"),
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
    /// Fired to stop accepting admin connections (a hot-restart child took the admin
    /// socket over); child of `hard_stop`.
    pub admin_stop: CancellationToken,
    /// Cancelled once this process has stopped serving and is about to exit: a hot-restart
    /// child streaming this process's counters gets the final snapshot.
    pub exiting: CancellationToken,
    /// A duplicate of the admin socket, to share with a hot-restart child.
    pub admin_socket: Mutex<Option<std::net::TcpListener>>,
    /// The hot-restart socket this process listens on (set by the binary).
    pub hot_restart_socket: OnceLock<std::path::PathBuf>,
    /// Overload manager and connection limits, read by workers without locks
    /// ([`crate::overload`]).
    pub overload: Arc<crate::overload::Overload>,
    /// Hot-restart generation.
    generation: AtomicU64,
    /// Drain time bound set by a hot-restart child (seconds; `u64::MAX`: none).
    drain_limit_s: AtomicU64,
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
        let overload = Arc::new(crate::overload::Overload::new(&snapshot.limits, &stats));
        server_stats.state.set(3.0);
        server_stats.concurrency.set(concurrency as f64);
        server_stats
            .hot_restart_epoch
            .set(f64::from(options.restart_epoch));
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
            connections: TaskTracker::new(),
            xds: OnceLock::new(),
            admin_stop: hard_stop.child_token(),
            exiting: CancellationToken::new(),
            admin_socket: Mutex::new(None),
            hot_restart_socket: OnceLock::new(),
            overload,
            generation: AtomicU64::new(0),
            drain_limit_s: AtomicU64::new(u64::MAX),
            hard_stop,
        })
    }

    /// Start draining listeners (idempotent).
    pub fn drain_listeners(&self) {
        if !self.draining.is_cancelled() {
            tracing::info!("draining listeners");
            self.server_stats.live.set(0.0);
            self.server_stats.state.set(1.0);
            self.draining.cancel();
            self.listener_manager.release_hand_over_sockets();
        }
    }

    /// Drain, then exit (idempotent).
    pub fn request_shutdown(&self) {
        self.drain_listeners();
        self.shutdown.cancel();
    }

    /// Drain time from `--drain-time-s`, bounded by a hot-restart child's parent shutdown
    /// time.
    pub fn drain_time(&self) -> Duration {
        let limit = self.drain_limit_s.load(Ordering::SeqCst);
        Duration::from_secs(self.options.drain_time_s.min(limit))
    }

    /// Hot-restart generation (the parent's + 1; 0 without a parent).
    pub fn hot_restart_generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// A hot-restart child serves: stop accepting (listeners and admin), drain and exit
    /// within `parent_shutdown_time` (or the drain time, if shorter).
    pub fn drain_for_hot_restart(&self, parent_shutdown_time: Duration) {
        self.drain_limit_s
            .fetch_min(parent_shutdown_time.as_secs(), Ordering::SeqCst);
        self.admin_stop.cancel();
        self.request_shutdown();
    }

    /// A duplicate of the admin socket when it is bound to `address`, for a hot-restart child.
    pub fn admin_socket_for_hand_over(&self, address: SocketAddr) -> Option<std::net::TcpListener> {
        if self.admin_address.get() != Some(&address) || self.admin_stop.is_cancelled() {
            return None;
        }
        let guard = self
            .admin_socket
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.as_ref().and_then(|s| s.try_clone().ok())
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
    start_with(options, snapshot, Inherited::default()).await
}

/// [`start`] with the sockets a hot-restart child took from its parent: listeners whose
/// address matches take the parent's sockets, the admin server accepts on the parent's admin
/// socket when given (otherwise binds, with SO_REUSEPORT when `inherited.enabled`).
pub async fn start_with(
    options: Options,
    snapshot: Snapshot,
    inherited: Inherited,
) -> Result<ServerHandle, StartError> {
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
    state
        .generation
        .store(inherited.generation, Ordering::SeqCst);
    state
        .server_stats
        .hot_restart_generation
        .set(inherited.generation as f64);
    state.listener_manager.offer_inherited(inherited.listeners);
    // Access log rotation (Envoy's SIGUSR1).
    crate::access_log::spawn_reopen_on_sigusr1();

    if let Some(addr) = admin_address {
        let admin_err = |source| StartError::Bind {
            what: "admin".into(),
            source,
        };
        let inherited_admin = inherited
            .admin
            .filter(|s| s.local_addr().ok() == Some(addr));
        let std_l = match inherited_admin {
            Some(s) => {
                tracing::info!(%addr, "admin socket shared by the hot-restart parent");
                s
            }
            None if inherited.enabled => crate::hot_restart::bind_admin(addr).map_err(admin_err)?,
            None => std::net::TcpListener::bind(addr).map_err(admin_err)?,
        };
        std_l.set_nonblocking(true).map_err(admin_err)?;
        if let Ok(dup) = std_l.try_clone() {
            *state
                .admin_socket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(dup);
        }
        let l = tokio::net::TcpListener::from_std(std_l).map_err(admin_err)?;
        let bound = l.local_addr().map_err(admin_err)?;
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
    // Overload manager: monitors sampled every refresh_interval on this (main) runtime.
    state.overload.spawn(state.hard_stop.clone());
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
    // Inherited sockets no listener of this config claimed (the parent keeps them until it
    // exits).
    state.listener_manager.release_inherited();
    if state.options.exit_on_zero_active_connections {
        let st = state.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = st.draining.cancelled() => {}
                _ = st.hard_stop.cancelled() => return,
            }
            tracing::info!(
                active = st.connections.len(),
                "draining with --exit-on-zero-active-connections: exiting once no connection is left"
            );
            st.shutdown.cancel();
        });
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
