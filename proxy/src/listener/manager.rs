//! The listener manager: adds, replaces and removes listeners at runtime (LDS) and for the
//! static listeners at start.
//!
//! # Model
//! - A *listener* (by name) is one set of listening sockets, one SO_REUSEPORT socket per
//!   worker, each worker running an accept loop over its socket (identified by a socket-set
//!   id shared by all workers).
//! - A *listener version* ([`ListenerVersion`]) is one [`ListenerConfig`] with its own `drain`
//!   and `hard_stop` tokens (children of the server's `draining` / `hard_stop`) and a tracker
//!   of the connections it accepted. Connections watch their version's tokens (via
//!   [`ConnInfo`](super::ConnInfo)), so one version can drain while the next one serves.
//! - Workers take commands from the manager over one unbounded channel each
//!   ([`WorkerCmd`]): add an accept loop (version + this worker's socket), swap the version an
//!   accept loop hands to new connections (in-place update), stop an accept loop.
//!
//! # Semantics (Envoy's)
//! - Same name, same address (the configured one or the bound one) and socket options
//!   (`tcp_backlog_size`, `ipv4_compat`): updated *in place*; the sockets stay, new
//!   connections get the new version, the old version drains.
//! - Otherwise (new name or address change): every worker's socket is bound first (an error
//!   returns [`ListenerError::Bind`] and leaves the old version untouched), workers start
//!   accepting on the new sockets, then stop the old accept loops, and the old version drains.
//! - Retiring a version (replaced or removed): once every worker confirmed it hands out no
//!   more connections of that version, and after a short settle delay ([`DRAIN_SETTLE`]) so
//!   connections accepted just before the switch get their first request read, its `drain`
//!   fires (HTTP/1 `Connection: close` after the in-flight response, HTTP/2 GOAWAY); when its
//!   connections are not all gone after the drain time, its `hard_stop` fires.
//! - A listener with a fixed port that another listener (by another name) already uses is
//!   refused (`AddrInUse`), as Envoy refuses duplicate listener addresses.
//!
//! Stats (`listener_manager.*`): counters `listener_added`, `listener_modified`,
//! `listener_removed`, `listener_in_place_updated`, `listener_create_success` (per worker
//! a new socket set is handed to, as in Envoy), `listener_create_failure`; gauges
//! `total_listeners_active`, `total_listeners_draining`, `total_listeners_warming` (set by the
//! xDS client through [`ListenerManager::set_warming`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use metrics::{Counter, Gauge};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ListenerConfig;
use super::bind::bind_listener;
use crate::server::BoundListener;
use crate::stats::Store;

/// Delay between the workers' switch away from a version and the start of its drain, so a
/// connection accepted just before the switch has its first request read (an HTTP connection
/// told to drain before it read anything closes without answering).
pub const DRAIN_SETTLE: Duration = Duration::from_millis(250);

/// How long a version waits for its connections after `hard_stop` fired before it stops
/// counting as draining anyway.
const HARD_STOP_GRACE: Duration = Duration::from_secs(5);

/// What [`ListenerManager::add_or_update`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerChange {
    /// A listener by a new name.
    Added,
    /// A listener by an existing name was replaced; `in_place` when its sockets were kept.
    Modified {
        /// The sockets were kept (same address and socket options).
        in_place: bool,
    },
}

/// Why a listener could not be added or updated.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// A socket could not be bound (or the address belongs to another listener).
    #[error("listener {name}: cannot bind: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server is draining: no listener changes.
    #[error("server is draining; listeners cannot change")]
    Stopped,
}

/// One version of a listener: its config, drain tokens and connections.
#[derive(Debug)]
pub struct ListenerVersion {
    /// The config new connections of this version use.
    pub cfg: Arc<ListenerConfig>,
    /// Fired when this version drains (child of the server's `draining`).
    pub drain: CancellationToken,
    /// Fired when this version's drain time is over (child of the server's `hard_stop`).
    pub hard_stop: CancellationToken,
    /// This version's connections, across workers.
    pub connections: TaskTracker,
}

impl ListenerVersion {
    fn new(
        cfg: Arc<ListenerConfig>,
        draining: &CancellationToken,
        hard: &CancellationToken,
    ) -> Self {
        Self {
            cfg,
            drain: draining.child_token(),
            hard_stop: hard.child_token(),
            connections: TaskTracker::new(),
        }
    }
}

/// A command to one worker.
#[derive(Debug)]
pub enum WorkerCmd {
    /// Start an accept loop with this worker's socket of socket set `id`.
    Add {
        /// Socket set id.
        id: u64,
        /// The version new connections get.
        version: Arc<ListenerVersion>,
        /// This worker's listening socket (nonblocking).
        socket: std::net::TcpListener,
    },
    /// Hand `version` to new connections of socket set `id` from now on; answer on `ack`.
    Swap {
        /// Socket set id.
        id: u64,
        /// The new version.
        version: Arc<ListenerVersion>,
        /// Sent once no connection gets the old version on this worker any more.
        ack: oneshot::Sender<()>,
    },
    /// Stop the accept loop of socket set `id` (closes this worker's socket); answer on `ack`.
    Stop {
        /// Socket set id.
        id: u64,
        /// Sent once the accept loop stopped.
        ack: oneshot::Sender<()>,
    },
}

/// A worker's end of the manager's command channel.
pub type WorkerCommands = mpsc::UnboundedReceiver<WorkerCmd>;

/// `listener_manager.*` stats.
#[derive(Debug, Clone)]
struct ManagerStats {
    added: Counter,
    modified: Counter,
    removed: Counter,
    in_place_updated: Counter,
    create_success: Counter,
    create_failure: Counter,
    active: Gauge,
    draining: Gauge,
    warming: Gauge,
}

impl ManagerStats {
    fn new(store: &Arc<Store>) -> Self {
        let s = store.plain("listener_manager");
        Self {
            added: s.counter("listener_added"),
            modified: s.counter("listener_modified"),
            removed: s.counter("listener_removed"),
            in_place_updated: s.counter("listener_in_place_updated"),
            create_success: s.counter("listener_create_success"),
            create_failure: s.counter("listener_create_failure"),
            active: s.gauge("total_listeners_active"),
            draining: s.gauge("total_listeners_draining"),
            warming: s.gauge("total_listeners_warming"),
        }
    }
}

/// An active listener.
#[derive(Debug)]
struct Active {
    /// Socket set id (0: recorded without sockets, tests only).
    id: u64,
    /// Bound address (port 0 resolved).
    bound: SocketAddr,
    version: Arc<ListenerVersion>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Active listeners in insertion order.
    active: Vec<Active>,
    next_id: u64,
}

/// Adds, replaces and removes listeners; see the module docs.
#[derive(Debug)]
pub struct ListenerManager {
    inner: Mutex<Inner>,
    workers: Vec<mpsc::UnboundedSender<WorkerCmd>>,
    receivers: Mutex<Vec<Option<WorkerCommands>>>,
    server_draining: CancellationToken,
    server_hard_stop: CancellationToken,
    drain_time: Duration,
    draining: Arc<AtomicUsize>,
    stats: ManagerStats,
}

impl ListenerManager {
    /// A manager for `workers` workers (at least 1) whose versions drain with the server's
    /// `draining` / `hard_stop` and for `drain_time`.
    pub fn new(
        workers: usize,
        store: &Arc<Store>,
        draining: &CancellationToken,
        hard_stop: &CancellationToken,
        drain_time: Duration,
    ) -> Self {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..workers.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                (tx, Some(rx))
            })
            .unzip();
        Self {
            inner: Mutex::new(Inner {
                active: Vec::new(),
                next_id: 1,
            }),
            workers: tx,
            receivers: Mutex::new(rx),
            server_draining: draining.clone(),
            server_hard_stop: hard_stop.clone(),
            drain_time,
            draining: Arc::new(AtomicUsize::new(0)),
            stats: ManagerStats::new(store),
        }
    }

    /// Worker `i`'s command channel (once; `None` when taken or out of range). Commands sent
    /// before the worker runs wait in the channel (the sockets already queue connections).
    pub fn take_worker(&self, i: usize) -> Option<WorkerCommands> {
        lock(&self.receivers).get_mut(i).and_then(Option::take)
    }

    /// Number of workers sockets are bound for.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Add a listener or replace the one with the same name. Synchronous (binds sockets on
    /// the caller's thread, hands them to every worker); call it inside a tokio runtime (the
    /// old version's drain runs there).
    pub fn add_or_update(&self, cfg: Arc<ListenerConfig>) -> Result<ListenerChange, ListenerError> {
        if self.server_draining.is_cancelled() {
            return Err(ListenerError::Stopped);
        }
        let mut inner = lock(&self.inner);
        let pos = inner
            .active
            .iter()
            .position(|a| a.version.cfg.name == cfg.name);

        // A fixed address held by another listener: Envoy refuses duplicate addresses.
        if cfg.address.port() != 0
            && let Some(other) = inner.active.iter().find(|a| {
                a.version.cfg.name != cfg.name
                    && (a.bound == cfg.address || a.version.cfg.address == cfg.address)
            })
        {
            self.stats.create_failure.increment(1);
            let msg = format!(
                "address {} is used by listener {}",
                cfg.address, other.version.cfg.name
            );
            tracing::warn!(listener = %cfg.name, "{msg}");
            return Err(ListenerError::Bind {
                name: cfg.name.clone(),
                source: std::io::Error::new(std::io::ErrorKind::AddrInUse, msg),
            });
        }

        let version = Arc::new(ListenerVersion::new(
            cfg.clone(),
            &self.server_draining,
            &self.server_hard_stop,
        ));

        // `bind_to_port: false` (intercept): registered without sockets.
        if !cfg.intercept.bind_to_port {
            return Ok(self.add_unbound(&mut inner, pos, version));
        }

        // In place: same address and socket options, sockets kept.
        if let Some(i) = pos {
            let old = &inner.active[i];
            let same_addr = cfg.address == old.version.cfg.address || cfg.address == old.bound;
            let same_opts = cfg.backlog == old.version.cfg.backlog
                && cfg.ipv4_compat == old.version.cfg.ipv4_compat;
            if same_addr && same_opts && old.id != 0 {
                let id = old.id;
                let bound = old.bound;
                let acks = self.broadcast(|ack| WorkerCmd::Swap {
                    id,
                    version: version.clone(),
                    ack,
                });
                let old = std::mem::replace(&mut inner.active[i].version, version);
                self.stats.modified.increment(1);
                self.stats.in_place_updated.increment(1);
                tracing::info!(name = %cfg.name, address = %bound, "listener modified in place");
                self.retire(old, acks);
                return Ok(ListenerChange::Modified { in_place: true });
            }
        }

        // New sockets: bind every worker's first, then start them, then stop the old ones.
        let (bound, sockets) = match bind_listener(&cfg, self.workers.len()) {
            Ok(b) => b,
            Err(source) => {
                self.stats.create_failure.increment(1);
                tracing::warn!(name = %cfg.name, address = %cfg.address, error = %source, "listener bind failed");
                return Err(ListenerError::Bind {
                    name: cfg.name.clone(),
                    source,
                });
            }
        };
        let id = inner.next_id;
        inner.next_id += 1;
        for (w, socket) in self.workers.iter().zip(sockets) {
            let cmd = WorkerCmd::Add {
                id,
                version: version.clone(),
                socket,
            };
            if w.send(cmd).is_ok() {
                self.stats.create_success.increment(1);
            }
        }
        let active = Active { id, bound, version };
        let change = match pos {
            Some(i) => {
                let old = std::mem::replace(&mut inner.active[i], active);
                let acks = self.broadcast(|ack| WorkerCmd::Stop { id: old.id, ack });
                self.stats.modified.increment(1);
                tracing::info!(
                    name = %cfg.name,
                    address = %bound,
                    old_address = %old.bound,
                    "listener modified (new sockets)"
                );
                self.retire(old.version, acks);
                ListenerChange::Modified { in_place: false }
            }
            None => {
                inner.active.push(active);
                self.stats.added.increment(1);
                tracing::info!(name = %cfg.name, address = %bound, "listener added");
                ListenerChange::Added
            }
        };
        self.stats.active.set(inner.active.len() as f64);
        Ok(change)
    }

    /// Remove by name: stop accepting at once, drain its connections; `false` if unknown.
    pub fn remove(&self, name: &str) -> bool {
        let mut inner = lock(&self.inner);
        let Some(i) = inner.active.iter().position(|a| a.version.cfg.name == name) else {
            return false;
        };
        let old = inner.active.remove(i);
        self.stats.active.set(inner.active.len() as f64);
        drop(inner);
        let acks = self.broadcast(|ack| WorkerCmd::Stop { id: old.id, ack });
        self.stats.removed.increment(1);
        tracing::info!(name, address = %old.bound, "listener removed");
        self.retire(old.version, acks);
        true
    }

    /// Active listeners with their bound addresses (port 0 resolved), in insertion order.
    pub fn listeners(&self) -> Vec<BoundListener> {
        lock(&self.inner)
            .active
            .iter()
            .map(|a| BoundListener {
                name: a.version.cfg.name.clone(),
                address: a.bound,
            })
            .collect()
    }

    /// The active version's config of listener `name`.
    pub fn config(&self, name: &str) -> Option<Arc<ListenerConfig>> {
        lock(&self.inner)
            .active
            .iter()
            .find(|a| a.version.cfg.name == name)
            .map(|a| a.version.cfg.clone())
    }

    /// Listener versions still draining connections.
    pub fn draining(&self) -> usize {
        self.draining.load(Ordering::SeqCst)
    }

    /// Set the warming count the xDS client tracks (`total_listeners_warming`).
    pub fn set_warming(&self, n: usize) {
        self.stats.warming.set(n as f64);
    }

    // --- intercept (use_original_dst / bind_to_port: false); see docs/arch-intercept.md ---

    /// Register a `bind_to_port: false` listener: no sockets (`id` 0); an earlier version
    /// by the same name stops accepting (if it had sockets) and drains.
    fn add_unbound(
        &self,
        inner: &mut Inner,
        pos: Option<usize>,
        version: Arc<ListenerVersion>,
    ) -> ListenerChange {
        let name = version.cfg.name.clone();
        let active = Active {
            id: 0,
            bound: version.cfg.address,
            version,
        };
        let change = match pos {
            Some(i) => {
                let old = std::mem::replace(&mut inner.active[i], active);
                let acks = if old.id != 0 {
                    self.broadcast(|ack| WorkerCmd::Stop { id: old.id, ack })
                } else {
                    Vec::new()
                };
                self.stats.modified.increment(1);
                tracing::info!(%name, "listener modified (bind_to_port: false)");
                self.retire(old.version, acks);
                ListenerChange::Modified {
                    in_place: old.id == 0,
                }
            }
            None => {
                inner.active.push(active);
                self.stats.added.increment(1);
                tracing::info!(%name, "listener added (bind_to_port: false)");
                ListenerChange::Added
            }
        };
        self.stats.active.set(inner.active.len() as f64);
        change
    }

    /// The active listener version a connection to `dst` belongs to (Envoy's
    /// `getBalancedHandlerByAddress`): the listener whose address is exactly `dst`, else one on
    /// the wildcard address (`0.0.0.0`, or `::` for IPv6 and dual-stack) with `dst`'s port.
    /// Called once per connection handed off by a `use_original_dst` listener.
    pub fn version_for_address(&self, dst: SocketAddr) -> Option<Arc<ListenerVersion>> {
        let inner = lock(&self.inner);
        let exact = inner
            .active
            .iter()
            .find(|a| a.bound == dst || a.version.cfg.address == dst);
        let found = exact.or_else(|| {
            inner.active.iter().find(|a| {
                let c = &a.version.cfg.address;
                c.port() == dst.port()
                    && c.ip().is_unspecified()
                    && (c.is_ipv4() == dst.is_ipv4() || (c.is_ipv6() && a.version.cfg.ipv4_compat))
            })
        });
        found.map(|a| a.version.clone())
    }

    /// Record a listener as active without sockets (admin tests).
    #[cfg(test)]
    pub(crate) fn record_for_tests(&self, cfg: Arc<ListenerConfig>, bound: SocketAddr) {
        let version = Arc::new(ListenerVersion::new(
            cfg,
            &self.server_draining,
            &self.server_hard_stop,
        ));
        let mut inner = lock(&self.inner);
        inner.active.push(Active {
            id: 0,
            bound,
            version,
        });
        self.stats.active.set(inner.active.len() as f64);
    }

    /// Send one command per worker; the acks of those that are still running.
    fn broadcast(
        &self,
        mut cmd: impl FnMut(oneshot::Sender<()>) -> WorkerCmd,
    ) -> Vec<oneshot::Receiver<()>> {
        let mut acks = Vec::with_capacity(self.workers.len());
        for w in &self.workers {
            let (tx, rx) = oneshot::channel();
            if w.send(cmd(tx)).is_ok() {
                acks.push(rx);
            }
        }
        acks
    }

    /// Drain `old` once every worker acknowledged the switch away from it; fire its
    /// `hard_stop` when the drain time is over.
    fn retire(&self, old: Arc<ListenerVersion>, acks: Vec<oneshot::Receiver<()>>) {
        self.draining.fetch_add(1, Ordering::SeqCst);
        self.stats.draining.increment(1.0);
        let done = DrainDone {
            count: self.draining.clone(),
            gauge: self.stats.draining.clone(),
            drain: old.drain.clone(),
            hard_stop: old.hard_stop.clone(),
        };
        let drain_time = self.drain_time;
        let task = async move {
            let _done = done;
            for a in acks {
                // Err: the worker is gone (server stopping); nothing to wait for.
                let _ = a.await;
            }
            tokio::time::sleep(DRAIN_SETTLE).await;
            drain_version(&old, drain_time).await;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(task);
            }
            Err(_) => {
                // No runtime to time the drain on: the old version stops at once (dropping
                // the task fires its tokens).
                tracing::warn!(
                    "listener change outside a tokio runtime; old version closed at once"
                );
                drop(task);
            }
        }
    }
}

/// Drain one version: `drain` now, `hard_stop` when its connections outlive `drain_time`.
async fn drain_version(v: &ListenerVersion, drain_time: Duration) {
    let name = &v.cfg.name;
    v.drain.cancel();
    v.connections.close();
    if tokio::time::timeout(drain_time, v.connections.wait())
        .await
        .is_err()
    {
        tracing::info!(
            listener = %name,
            remaining = v.connections.len(),
            "listener drain time over; closing remaining connections"
        );
        v.hard_stop.cancel();
        let _ = tokio::time::timeout(HARD_STOP_GRACE, v.connections.wait()).await;
    }
    tracing::debug!(listener = %name, "listener version drained");
}

/// Counts a retiring version out of the draining count and makes sure its tokens fired (also
/// when its drain task is dropped before the end: the runtime is going away).
struct DrainDone {
    count: Arc<AtomicUsize>,
    gauge: Gauge,
    drain: CancellationToken,
    hard_stop: CancellationToken,
}

impl Drop for DrainDone {
    fn drop(&mut self) {
        self.drain.cancel();
        self.hard_stop.cancel();
        self.count.fetch_sub(1, Ordering::SeqCst);
        self.gauge.decrement(1.0);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listener::run_worker;
    use crate::listener::worker::tests::{YAML, closed_by_proxy, listener, state_n, stats};
    use crate::server::ServerState;

    /// A tcp_proxy listener `name` on `addr` whose default chain goes to a cluster without
    /// hosts: every connection is accepted, then closed.
    fn tcp(store: &Arc<Store>, name: &str, addr: &str, extra: &str) -> Arc<ListenerConfig> {
        let yaml = YAML
            .replace("name: w", &format!("name: {name}\n{extra}"))
            .replace("address: 127.0.0.1, port_value: 0", addr)
            .replace(
                "filter_chains:\n- filter_chain_match: {source_ports: [1]}\n",
                "default_filter_chain:\n",
            );
        listener(store, &yaml)
    }

    fn workers(st: &Arc<ServerState>) -> Vec<tokio::task::JoinHandle<()>> {
        (0..st.listener_manager.workers())
            .map(|i| {
                let cmds = st.listener_manager.take_worker(i).expect("worker");
                tokio::spawn(run_worker(cmds, st.clone()))
            })
            .collect()
    }

    async fn drained(m: &ListenerManager) {
        for _ in 0..200 {
            if m.draining() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("listener versions still draining: {}", m.draining());
    }

    async fn refused(addr: SocketAddr) {
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{addr} still accepts");
    }

    const ANY: &str = "address: 127.0.0.1, port_value: 0";

    #[tokio::test]
    async fn add_modify_in_place_and_not_remove() {
        let store = Store::new();
        let st = state_n(&store, 2);
        let _w = workers(&st);
        let m = &st.listener_manager;

        assert_eq!(
            m.add_or_update(tcp(&store, "a", ANY, "")).expect("add"),
            ListenerChange::Added
        );
        let a0 = m.listeners()[0].address;
        assert_ne!(a0.port(), 0);
        closed_by_proxy(a0).await;

        // Same config address (port 0) and socket options: in place, same port.
        assert_eq!(
            m.add_or_update(tcp(&store, "a", ANY, "")).expect("update"),
            ListenerChange::Modified { in_place: true }
        );
        assert_eq!(m.listeners()[0].address, a0);
        closed_by_proxy(a0).await;
        // The bound address named explicitly is the same listener too.
        let explicit = format!("address: 127.0.0.1, port_value: {}", a0.port());
        assert_eq!(
            m.add_or_update(tcp(&store, "a", &explicit, ""))
                .expect("update"),
            ListenerChange::Modified { in_place: true }
        );

        // Another backlog: new sockets (here on a new port), the old ones close.
        assert_eq!(
            m.add_or_update(tcp(&store, "a", ANY, "tcp_backlog_size: 64"))
                .expect("update"),
            ListenerChange::Modified { in_place: false }
        );
        let a1 = m.listeners()[0].address;
        assert_ne!(a1, a0);
        closed_by_proxy(a1).await;
        refused(a0).await;

        // A second listener keeps insertion order.
        m.add_or_update(tcp(&store, "b", ANY, "")).expect("add b");
        let names: Vec<_> = m.listeners().into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["a", "b"]);

        assert!(m.remove("a"));
        assert!(!m.remove("a"), "unknown now");
        refused(a1).await;
        assert_eq!(m.listeners().len(), 1);
        drained(m).await;

        let s = stats(&store);
        let c = |n: &str| s[&format!("listener_manager.{n}")].clone();
        assert_eq!(c("listener_added"), "2");
        assert_eq!(c("listener_modified"), "3");
        assert_eq!(c("listener_in_place_updated"), "2");
        assert_eq!(c("listener_removed"), "1");
        // Three socket sets handed to two workers each.
        assert_eq!(c("listener_create_success"), "6");
        assert_eq!(c("listener_create_failure"), "0");
        assert_eq!(c("total_listeners_active"), "1");
        assert_eq!(c("total_listeners_draining"), "0");
    }

    #[tokio::test]
    async fn bind_failure_keeps_the_old_version() {
        let store = Store::new();
        let st = state_n(&store, 2);
        let _w = workers(&st);
        let m = &st.listener_manager;
        m.add_or_update(tcp(&store, "a", ANY, "")).expect("add");
        let a0 = m.listeners()[0].address;

        // A port held by a socket without SO_REUSEPORT.
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = held.local_addr().expect("addr").port();
        let busy = format!("address: 127.0.0.1, port_value: {port}");
        match m.add_or_update(tcp(&store, "a", &busy, "")) {
            Err(ListenerError::Bind { name, source }) => {
                assert_eq!(name, "a");
                assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
            }
            other => panic!("expected a bind error, got {other:?}"),
        }
        assert_eq!(m.listeners()[0].address, a0);
        closed_by_proxy(a0).await;
        // A brand-new listener on it fails the same way and is not added.
        assert!(m.add_or_update(tcp(&store, "n", &busy, "")).is_err());
        assert_eq!(m.listeners().len(), 1);
        assert_eq!(m.draining(), 0);

        let s = stats(&store);
        assert_eq!(s["listener_manager.listener_create_failure"], "2");
        assert_eq!(s["listener_manager.listener_modified"], "0");
        assert_eq!(s["listener_manager.total_listeners_active"], "1");
    }

    #[tokio::test]
    async fn another_listeners_address_is_refused() {
        let store = Store::new();
        let st = state_n(&store, 1);
        let m = &st.listener_manager;
        m.add_or_update(tcp(&store, "a", ANY, "")).expect("add");
        let a0 = m.listeners()[0].address;
        let same = format!("address: 127.0.0.1, port_value: {}", a0.port());
        let e = m
            .add_or_update(tcp(&store, "b", &same, ""))
            .expect_err("duplicate address");
        assert!(e.to_string().contains("used by listener a"), "{e}");
        assert_eq!(m.listeners().len(), 1);
    }

    #[tokio::test]
    async fn no_changes_once_the_server_drains() {
        let store = Store::new();
        let st = state_n(&store, 1);
        let w = workers(&st);
        st.listener_manager
            .add_or_update(tcp(&store, "a", ANY, ""))
            .expect("add");
        st.drain_listeners();
        assert!(matches!(
            st.listener_manager.add_or_update(tcp(&store, "b", ANY, "")),
            Err(ListenerError::Stopped)
        ));
        st.hard_stop.cancel();
        for w in w {
            tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .expect("worker returns")
                .expect("worker");
        }
        st.listener_manager.set_warming(3);
        assert_eq!(
            stats(&store)["listener_manager.total_listeners_warming"],
            "3"
        );
    }

    #[tokio::test]
    async fn a_retired_version_drains_then_hard_stops() {
        let store = Store::new();
        let st = state_n(&store, 1);
        let m = ListenerManager::new(
            1,
            &store,
            &st.draining,
            &st.hard_stop,
            Duration::from_millis(200),
        );
        let cfg = tcp(&store, "a", ANY, "");
        let v = Arc::new(ListenerVersion::new(cfg, &st.draining, &st.hard_stop));
        // A connection of that version that ignores the drain.
        let conn = v.connections.track_future({
            let hard = v.hard_stop.clone();
            async move { hard.cancelled().await }
        });
        let conn = tokio::spawn(conn);
        let (ack, acked) = oneshot::channel();
        m.retire(v.clone(), vec![acked]);
        assert_eq!(m.draining(), 1);
        assert!(!v.drain.is_cancelled(), "waits for the workers' switch");
        ack.send(()).expect("ack");
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("hard stop after the drain time")
            .expect("conn");
        assert!(v.drain.is_cancelled());
        drained(&m).await;
        // The server's tokens are untouched.
        assert!(!st.draining.is_cancelled() && !st.hard_stop.is_cancelled());
    }
}
