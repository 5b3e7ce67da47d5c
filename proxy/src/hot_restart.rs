//! Zero-downtime binary upgrade (Envoy's hot restart, HAProxy's seamless reload): a new weir
//! process takes the listening sockets of the running one over a Unix domain socket
//! (`SCM_RIGHTS`), starts serving on them, then tells the old one to drain and exit.
//!
//! # Roles and sockets
//! Every weir binary (unless `--disable-hot-restart`) listens on the hot-restart socket of its
//! epoch, [`socket_path`]: `<dir>/weir-hot-restart-<base-id>-<epoch>.sock`, where `<dir>` is
//! `--hot-restart-socket-dir`, else `$XDG_RUNTIME_DIR`, else `/tmp`. A process started with
//! `--restart-epoch N` (N > 0) is the *child*: it connects to epoch N-1's socket, the *parent*.
//! Only peers with the same uid are served (`SO_PEERCRED`); the socket file is mode 0600.
//!
//! # Protocol (version [`PROTOCOL_VERSION`])
//! Request/reply frames: a 4-byte big-endian length, then a JSON object
//! `{"v": 1, "type": ..., ...}` ([`Request`], [`Reply`]). Sockets travel as `SCM_RIGHTS`
//! ancillary data on the reply frame that announces them (`count`). Each read has a timeout
//! ([`IO_TIMEOUT`] for replies; the parent waits up to [`SESSION_IDLE_TIMEOUT`] between a
//! child's requests, as the child initializes in between).
//!
//! 1. child → `hello {version, epoch, pid}`; parent → `hello {version, epoch, pid,
//!    generation}` (or `error`: another version, or an epoch that is not its own + 1).
//! 2. child → `list_listeners`; parent → `listeners [{name, configured, bound, sockets}]`.
//! 3. per listener: child → `get_listen_sockets {address}` (the bound address); parent →
//!    `listen_sockets {count}` + `count` fds: every SO_REUSEPORT socket of that listener.
//! 4. when the child's admin address has a fixed port: `get_admin_socket {address}` →
//!    `admin_socket {count}` + the admin socket when the parent's admin is bound there.
//! 5. the child starts: listeners whose address the parent offered take its sockets (see
//!    `ListenerManager::offer_inherited`), the others bind fresh; both processes accept
//!    on the shared sockets meanwhile (same kernel sockets: nothing is refused or reset).
//! 6. once the child's listeners accept (and its xDS initial fetch is done): child →
//!    `drain {parent_shutdown_time_s}`; parent → `draining {active_connections}`. The parent
//!    stops accepting (listeners and admin), finishes in-flight requests and exits once its
//!    connections are gone, at most `min(--drain-time-s, parent_shutdown_time_s)` later.
//! 7. child → `stream_stats`; the parent sends `stats {counters, last}` frames: a snapshot of
//!    every non-zero counter every [`STATS_INTERVAL`] (in chunks of at most
//!    [`STATS_CHUNK`] series, so a frame stays far below the frame limit) and a final one
//!    (`last: true`) when it stops serving, then closes. The child adds each series' growth
//!    since the previous snapshot to its own counter of the same name (creating it when its
//!    config has none), so counters continue across the restart as with Envoy's hot
//!    restart; gauges and histograms are each process's own.
//!
//! # Failure modes
//! No parent socket, a refused or timed-out exchange, a version mismatch: the child logs a
//! WARN and binds fresh; SO_REUSEPORT lets it bind next to a live parent (same uid), so it
//! still serves, and the parent is not told to drain (stop it by hand). A child that dies
//! before `drain`: the parent never drains and keeps serving. See docs/arch-hotrestart.md.
//!
//! No unsafe code: fds are sent and received with rustix's safe `sendmsg`/`recvmsg`, which
//! hand received descriptors out as `OwnedFd`.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

use crate::cli::Options;
use crate::server::ServerState;
use crate::stats::{CounterSample, Store};

/// Version of the hot-restart protocol; both sides must speak the same.
pub const PROTOCOL_VERSION: u32 = 1;
/// The version string `/server_info` reports as `hot_restart_version`.
pub const HOT_RESTART_VERSION: &str = "weir.hot_restart.v1";
/// Timeout of one reply (and of every write).
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the parent waits for a child's next request (the child initializes between its
/// socket requests and `drain`).
pub const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(900);
/// Largest frame body accepted.
const MAX_FRAME: usize = 1 << 20;
/// How often a draining parent sends its counters to the child.
pub const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// Most counter series in one `stats` frame.
pub const STATS_CHUNK: usize = 2000;
/// How long the child waits for the parent's next `stats` frame.
const STATS_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most fds in one message (Linux's `SCM_MAX_FD`).
const MAX_FDS: usize = 253;

/// What can go wrong on the hot-restart socket.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HotRestartError {
    /// An I/O error (including timeouts and a closed peer).
    #[error("hot-restart socket i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A frame that is not a message of this protocol.
    #[error("malformed hot-restart message: {0}")]
    Malformed(String),
    /// The peer speaks another protocol version.
    #[error("hot-restart protocol version {got}, expected {PROTOCOL_VERSION}")]
    Version {
        /// The peer's version.
        got: u32,
    },
    /// The peer answered with an error.
    #[error("hot-restart peer refused: {0}")]
    Refused(String),
    /// The peer answered something else than the request calls for.
    #[error("unexpected hot-restart reply: {0}")]
    Unexpected(String),
    /// The peer runs as another user.
    #[error("hot-restart peer runs as uid {peer}, not {ours}")]
    ForeignPeer {
        /// The peer's uid.
        peer: u32,
        /// Ours.
        ours: u32,
    },
    /// Another live process listens on this hot-restart socket.
    #[error("hot-restart socket {0} is in use by a running process (use another --base-id)")]
    InUse(PathBuf),
}

/// A child's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// First message: who the child is.
    Hello {
        /// The child's protocol version.
        version: u32,
        /// The child's restart epoch.
        epoch: u32,
        /// The child's pid (for logs).
        pid: u32,
    },
    /// The parent's listeners.
    ListListeners,
    /// Every socket of the parent's listener bound to `address`.
    GetListenSockets {
        /// Bound address of the listener.
        address: SocketAddr,
    },
    /// The parent's admin socket, when bound to `address`.
    GetAdminSocket {
        /// The child's admin address.
        address: SocketAddr,
    },
    /// The child serves: drain and exit within `parent_shutdown_time_s`.
    Drain {
        /// Upper bound on the parent's drain.
        parent_shutdown_time_s: u64,
    },
    /// Send counter snapshots until exiting (after `drain`).
    StreamStats,
}

/// One listener of the parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerInfo {
    /// Listener name.
    pub name: String,
    /// Address as configured (port may be 0).
    pub configured: SocketAddr,
    /// Address as bound.
    pub bound: SocketAddr,
    /// Number of sockets (one per parent worker).
    pub sockets: usize,
}

/// The parent's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to [`Request::Hello`].
    Hello {
        /// The parent's protocol version.
        version: u32,
        /// The parent's epoch.
        epoch: u32,
        /// The parent's pid.
        pid: u32,
        /// The parent's hot-restart generation.
        generation: u64,
    },
    /// Answer to [`Request::ListListeners`].
    Listeners {
        /// The parent's active listeners.
        listeners: Vec<ListenerInfo>,
    },
    /// Answer to [`Request::GetListenSockets`]; `count` fds ride along.
    ListenSockets {
        /// The requested address.
        address: SocketAddr,
        /// Listener name (none when no listener is bound there).
        name: Option<String>,
        /// Number of fds attached.
        count: usize,
    },
    /// Answer to [`Request::GetAdminSocket`]; `count` (0 or 1) fds ride along.
    AdminSocket {
        /// Number of fds attached.
        count: usize,
    },
    /// Answer to [`Request::Drain`].
    Draining {
        /// Downstream connections the parent is finishing.
        active_connections: usize,
    },
    /// A chunk of a counter snapshot (after [`Request::StreamStats`]).
    Stats {
        /// Counter series and their values.
        counters: Vec<CounterSample>,
        /// The final chunk of the final snapshot: the parent exits.
        last: bool,
    },
    /// The request was refused.
    Error {
        /// Why.
        message: String,
    },
}

/// A frame: the protocol version next to the message.
#[derive(Debug, Serialize, Deserialize)]
struct Frame<T> {
    v: u32,
    #[serde(flatten)]
    msg: T,
}

/// One listener's sockets inherited from the parent.
#[derive(Debug)]
pub struct InheritedListener {
    /// Parent's listener name.
    pub name: String,
    /// Parent's configured address.
    pub configured: SocketAddr,
    /// Bound address of the sockets.
    pub bound: SocketAddr,
    /// The listening sockets.
    pub sockets: Vec<std::net::TcpListener>,
}

/// What a child took from its parent (empty for epoch 0 or when the parent did not answer).
#[derive(Debug, Default)]
pub struct Inherited {
    /// Listening sockets by listener.
    pub listeners: Vec<InheritedListener>,
    /// The admin socket, when the parent's admin is bound to this process's admin address.
    pub admin: Option<std::net::TcpListener>,
    /// This process's hot-restart generation (parent's + 1; 0 without a parent).
    pub generation: u64,
    /// This process takes part in hot restart: bind the admin socket with SO_REUSEPORT so a
    /// child whose hand-over failed can still bind it next to this process.
    pub enabled: bool,
}

/// The hot-restart socket path of `epoch` for these options.
pub fn socket_path(opts: &Options, epoch: u32) -> PathBuf {
    let dir = opts
        .hot_restart_socket_dir
        .clone()
        .or_else(|| std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from))
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    dir.join(format!("weir-hot-restart-{}-{epoch}.sock", opts.base_id))
}

/// A connection to the parent, kept until the child tells it to drain.
#[derive(Debug)]
pub struct Parent {
    conn: UnixStream,
    pid: u32,
}

impl Parent {
    /// The parent's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Tell the parent to drain and exit within `parent_shutdown_time_s`; its count of
    /// connections still open.
    pub fn drain(&self, parent_shutdown_time_s: u64) -> Result<usize, HotRestartError> {
        match call(
            &self.conn,
            &Request::Drain {
                parent_shutdown_time_s,
            },
        )? {
            (Reply::Draining { active_connections }, _) => Ok(active_connections),
            (other, _) => Err(unexpected(other)),
        }
    }

    /// After [`Parent::drain`]: add the parent's counters to `store` as they grow, until the
    /// parent's final snapshot (blocking; returns the series merged).
    pub fn merge_stats(self, store: &Store) -> Result<usize, HotRestartError> {
        send(&self.conn, &Request::StreamStats, &[])?;
        self.conn.set_read_timeout(Some(STATS_READ_TIMEOUT))?;
        let mut merged = StatsMerge::default();
        loop {
            match recv::<Reply>(&self.conn)? {
                (Reply::Stats { counters, last }, _) => {
                    merged.apply(store, &counters);
                    if last {
                        return Ok(merged.seen.len());
                    }
                }
                (other, _) => return Err(unexpected(other)),
            }
        }
    }
}

/// The child's view of the parent's counters: what it has added so far, per series.
#[derive(Debug, Default)]
struct StatsMerge {
    seen: std::collections::HashMap<String, u64>,
}

impl StatsMerge {
    /// Add each series' growth since the last snapshot to `store`.
    fn apply(&mut self, store: &Store, counters: &[CounterSample]) {
        for c in counters {
            let prev = self.seen.insert(Store::sample_key(c), c.value).unwrap_or(0);
            store.add_to_counter(c, c.value.saturating_sub(prev));
        }
    }
}

/// Child side: take the parent's sockets (epoch > 0). Never fails: when the parent cannot be
/// reached or refuses, logs a WARN and returns nothing inherited (the child binds fresh).
/// `admin` is this process's configured admin address.
pub fn take_over(opts: &Options, admin: Option<SocketAddr>) -> (Inherited, Option<Parent>) {
    let none = Inherited {
        enabled: true,
        ..Inherited::default()
    };
    if opts.restart_epoch == 0 {
        return (none, None);
    }
    let path = socket_path(opts, opts.restart_epoch - 1);
    match try_take_over(&path, opts.restart_epoch, admin) {
        Ok((inherited, parent)) => {
            tracing::info!(
                parent_pid = parent.pid,
                listeners = inherited.listeners.len(),
                admin = inherited.admin.is_some(),
                socket = %path.display(),
                "hot restart: took the parent's sockets"
            );
            (inherited, Some(parent))
        }
        Err(e) => {
            tracing::warn!(
                socket = %path.display(),
                error = %e,
                "hot restart: no parent answered; binding fresh sockets (SO_REUSEPORT)"
            );
            (none, None)
        }
    }
}

fn try_take_over(
    path: &Path,
    epoch: u32,
    admin: Option<SocketAddr>,
) -> Result<(Inherited, Parent), HotRestartError> {
    let conn = UnixStream::connect(path)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    check_peer(&conn)?;
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
        epoch,
        pid: std::process::id(),
    };
    let (pid, generation) = match call(&conn, &hello)? {
        (
            Reply::Hello {
                version,
                epoch: parent_epoch,
                pid,
                generation,
            },
            _,
        ) => {
            if version != PROTOCOL_VERSION {
                return Err(HotRestartError::Version { got: version });
            }
            if parent_epoch.checked_add(1) != Some(epoch) {
                return Err(HotRestartError::Refused(format!(
                    "parent is epoch {parent_epoch}, this process is epoch {epoch}"
                )));
            }
            (pid, generation)
        }
        (other, _) => return Err(unexpected(other)),
    };
    let list = match call(&conn, &Request::ListListeners)? {
        (Reply::Listeners { listeners }, _) => listeners,
        (other, _) => return Err(unexpected(other)),
    };
    let mut listeners = Vec::with_capacity(list.len());
    for l in list {
        let req = Request::GetListenSockets { address: l.bound };
        match call(&conn, &req)? {
            (Reply::ListenSockets { count, .. }, fds) if count == fds.len() && count > 0 => {
                listeners.push(InheritedListener {
                    name: l.name,
                    configured: l.configured,
                    bound: l.bound,
                    sockets: fds.into_iter().map(std::net::TcpListener::from).collect(),
                });
            }
            (Reply::ListenSockets { count, .. }, fds) => {
                tracing::warn!(listener = %l.name, address = %l.bound, announced = count, received = fds.len(), "hot restart: parent sent no usable sockets for this listener");
            }
            (other, _) => return Err(unexpected(other)),
        }
    }
    let mut admin_socket = None;
    if let Some(address) = admin.filter(|a| a.port() != 0) {
        match call(&conn, &Request::GetAdminSocket { address })? {
            (Reply::AdminSocket { count: 1 }, mut fds) if fds.len() == 1 => {
                admin_socket = fds.pop().map(std::net::TcpListener::from);
            }
            (Reply::AdminSocket { .. }, _) => {}
            (other, _) => return Err(unexpected(other)),
        }
    }
    Ok((
        Inherited {
            listeners,
            admin: admin_socket,
            generation: generation.saturating_add(1),
            enabled: true,
        },
        Parent { conn, pid },
    ))
}

/// Parent side: listen on this process's hot-restart socket. A stale socket file (no process
/// listening) is replaced; a live one is [`HotRestartError::InUse`].
pub fn listen(path: &Path) -> Result<UnixListener, HotRestartError> {
    let l = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(HotRestartError::InUse(path.to_path_buf()));
            }
            tracing::info!(socket = %path.display(), "replacing a stale hot-restart socket");
            std::fs::remove_file(path)?;
            UnixListener::bind(path)?
        }
        Err(e) => return Err(e.into()),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Parent side: answer children on `listener` until the server shuts down, then remove the
/// socket file at `path`. Each child's session runs on a blocking thread.
pub async fn serve(listener: UnixListener, path: PathBuf, state: Arc<ServerState>) {
    let accepting = listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(listener));
    let listener = match accepting {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "hot restart: cannot serve the socket");
            return;
        }
    };
    loop {
        let stream = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "hot restart: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let std_stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "hot restart: cannot take the connection");
                continue;
            }
        };
        let st = state.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = session(&std_stream, &st) {
                tracing::warn!(error = %e, "hot restart: session with a child ended");
            }
        });
    }
    remove_socket(&path);
}

/// Remove this process's hot-restart socket file (best effort).
pub fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!(socket = %path.display(), "hot-restart socket removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(socket = %path.display(), error = %e, "cannot remove the hot-restart socket")
        }
    }
}

/// One child's session: answer its requests until it closes the connection.
fn session(conn: &UnixStream, state: &ServerState) -> Result<(), HotRestartError> {
    conn.set_nonblocking(false)?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    if let Err(e) = check_peer(conn) {
        let _ = send(
            conn,
            &Reply::Error {
                message: e.to_string(),
            },
            &[],
        );
        return Err(e);
    }
    let mut greeted = false;
    loop {
        let req = match recv::<Request>(conn) {
            Ok((r, _fds)) => r,
            Err(HotRestartError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(());
            }
            Err(HotRestartError::Version { got }) => {
                let message =
                    format!("protocol version {got} not supported; this is {PROTOCOL_VERSION}");
                send(conn, &Reply::Error { message }, &[])?;
                return Err(HotRestartError::Version { got });
            }
            Err(e) => return Err(e),
        };
        if greeted && req == Request::StreamStats {
            return stream_stats(conn, state);
        }
        let (reply, fds) = answer(&req, greeted, state);
        if matches!(reply, Reply::Hello { .. }) {
            greeted = true;
            // The child initializes between its socket requests and `drain`.
            conn.set_read_timeout(Some(SESSION_IDLE_TIMEOUT))?;
        }
        let refused = matches!(reply, Reply::Error { .. }) && !greeted;
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
        send(conn, &reply, &borrowed)?;
        if refused {
            return Ok(());
        }
    }
}

/// Send counter snapshots to a child every [`STATS_INTERVAL`] and a final one once this
/// process stops serving ([`ServerState::exiting`]).
fn stream_stats(conn: &UnixStream, state: &ServerState) -> Result<(), HotRestartError> {
    loop {
        let last = state.exiting.is_cancelled();
        let counters: Vec<CounterSample> = state
            .stats
            .counter_samples()
            .into_iter()
            .filter(|c| c.value > 0)
            .collect();
        let chunks: Vec<&[CounterSample]> = if counters.is_empty() {
            vec![&[]]
        } else {
            counters.chunks(STATS_CHUNK).collect()
        };
        let n = chunks.len();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let reply = Reply::Stats {
                counters: chunk.to_vec(),
                last: last && i + 1 == n,
            };
            send(conn, &reply, &[])?;
        }
        if last {
            tracing::info!(
                series = counters.len(),
                "hot restart: final counters sent to the child"
            );
            return Ok(());
        }
        let until = std::time::Instant::now() + STATS_INTERVAL;
        while std::time::Instant::now() < until && !state.exiting.is_cancelled() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The parent's answer to one request, with the fds to attach.
fn answer(req: &Request, greeted: bool, state: &ServerState) -> (Reply, Vec<OwnedFd>) {
    let epoch = state.options.restart_epoch;
    let err = |message: String| (Reply::Error { message }, Vec::new());
    match req {
        Request::Hello {
            version,
            epoch: child,
            pid,
        } => {
            if *version != PROTOCOL_VERSION {
                return err(format!(
                    "protocol version {version} not supported; this is {PROTOCOL_VERSION}"
                ));
            }
            if epoch.checked_add(1) != Some(*child) {
                return err(format!(
                    "this process is epoch {epoch}; a child must be epoch {}",
                    u64::from(epoch) + 1
                ));
            }
            tracing::info!(
                child_pid = pid,
                child_epoch = child,
                "hot restart: child connected"
            );
            (
                Reply::Hello {
                    version: PROTOCOL_VERSION,
                    epoch,
                    pid: std::process::id(),
                    generation: state.hot_restart_generation(),
                },
                Vec::new(),
            )
        }
        _ if !greeted => err("hello first".into()),
        Request::ListListeners => {
            let listeners = state
                .listener_manager
                .hand_over_list()
                .into_iter()
                .map(|(name, configured, bound, sockets)| ListenerInfo {
                    name,
                    configured,
                    bound,
                    sockets,
                })
                .collect();
            (Reply::Listeners { listeners }, Vec::new())
        }
        Request::GetListenSockets { address } => {
            match state.listener_manager.sockets_for_hand_over(*address) {
                Some((name, _, socks)) if socks.len() <= MAX_FDS => {
                    tracing::info!(listener = %name, %address, sockets = socks.len(), "hot restart: handing listener sockets to the child");
                    let fds: Vec<OwnedFd> = socks.into_iter().map(OwnedFd::from).collect();
                    (
                        Reply::ListenSockets {
                            address: *address,
                            name: Some(name),
                            count: fds.len(),
                        },
                        fds,
                    )
                }
                Some((name, _, socks)) => {
                    tracing::warn!(listener = %name, sockets = socks.len(), "hot restart: too many sockets for one message; the child binds fresh");
                    (
                        Reply::ListenSockets {
                            address: *address,
                            name: Some(name),
                            count: 0,
                        },
                        Vec::new(),
                    )
                }
                None => (
                    Reply::ListenSockets {
                        address: *address,
                        name: None,
                        count: 0,
                    },
                    Vec::new(),
                ),
            }
        }
        Request::GetAdminSocket { address } => match state.admin_socket_for_hand_over(*address) {
            Some(s) => {
                tracing::info!(%address, "hot restart: sharing the admin socket with the child");
                (Reply::AdminSocket { count: 1 }, vec![OwnedFd::from(s)])
            }
            None => (Reply::AdminSocket { count: 0 }, Vec::new()),
        },
        Request::Drain {
            parent_shutdown_time_s,
        } => {
            let active_connections = state.connections.len();
            tracing::info!(
                active_connections,
                parent_shutdown_time_s,
                "hot restart: the child serves; draining and exiting"
            );
            state.drain_for_hot_restart(Duration::from_secs(*parent_shutdown_time_s));
            (Reply::Draining { active_connections }, Vec::new())
        }
        // Handled by the session (a stream of frames, not one reply).
        Request::StreamStats => err("stream_stats comes after drain, on its own".into()),
    }
}

/// Bind an admin socket with SO_REUSEADDR + SO_REUSEPORT (so a hot-restart child can bind it
/// next to this process when the hand-over fails).
pub fn bind_admin(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// The peer must run as our uid.
fn check_peer(conn: &UnixStream) -> Result<(), HotRestartError> {
    let cred = rustix::net::sockopt::socket_peercred(conn).map_err(std::io::Error::from)?;
    let ours = rustix::process::getuid().as_raw();
    let peer = cred.uid.as_raw();
    if peer != ours {
        return Err(HotRestartError::ForeignPeer { peer, ours });
    }
    Ok(())
}

fn unexpected(r: Reply) -> HotRestartError {
    match r {
        Reply::Error { message } => HotRestartError::Refused(message),
        other => HotRestartError::Unexpected(format!("{other:?}")),
    }
}

/// Send `req` and read the reply.
fn call(conn: &UnixStream, req: &Request) -> Result<(Reply, Vec<OwnedFd>), HotRestartError> {
    send(conn, req, &[])?;
    recv(conn)
}

/// Write one frame with `fds` attached.
fn send<T: Serialize>(
    conn: &UnixStream,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), HotRestartError> {
    let body = serde_json::to_vec(&Frame {
        v: PROTOCOL_VERSION,
        msg,
    })
    .map_err(|e| HotRestartError::Malformed(e.to_string()))?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|n| (*n as usize) <= MAX_FRAME)
        .ok_or_else(|| HotRestartError::Malformed(format!("frame of {} bytes", body.len())))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(HotRestartError::Malformed(
            "too many fds for one message".into(),
        ));
    }
    // The fds ride with the first bytes; the rest of a partially sent frame follows.
    let sent = rustix::net::sendmsg(
        conn,
        &[IoSlice::new(&frame)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(std::io::Error::from)?;
    let mut w = conn;
    w.write_all(&frame[sent..])?;
    Ok(())
}

/// Read one frame with the fds attached to it.
fn recv<T: for<'de> Deserialize<'de>>(
    conn: &UnixStream,
) -> Result<(T, Vec<OwnedFd>), HotRestartError> {
    let mut head = [0u8; 4];
    let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        conn,
        &mut [IoSliceMut::new(&mut head)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    if got.bytes == 0 {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
        return Err(HotRestartError::Malformed(
            "ancillary data truncated".into(),
        ));
    }
    let mut r = conn;
    r.read_exact(&mut head[got.bytes..])?;
    let len = u32::from_be_bytes(head) as usize;
    if len > MAX_FRAME {
        return Err(HotRestartError::Malformed(format!("frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| HotRestartError::Malformed(e.to_string()))?;
    let v = value
        .get("v")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0);
    if v != u64::from(PROTOCOL_VERSION) {
        return Err(HotRestartError::Version {
            got: u32::try_from(v).unwrap_or(u32::MAX),
        });
    }
    let frame: Frame<T> =
        serde_json::from_value(value).map_err(|e| HotRestartError::Malformed(e.to_string()))?;
    Ok((frame.msg, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_parent_answers_in_order_and_drains() {
        let store = crate::stats::Store::new();
        let snapshot = crate::config::translate(Default::default(), &store).expect("empty config");
        let clusters = crate::upstream::ClusterManager::new(&[], &store);
        let st = ServerState::new(Options::default(), snapshot, clusters, 1);
        let msg = |r: (Reply, Vec<OwnedFd>)| match r.0 {
            Reply::Error { message } => message,
            other => panic!("expected an error, got {other:?}"),
        };
        // Nothing before hello.
        assert_eq!(
            msg(answer(&Request::ListListeners, false, &st)),
            "hello first"
        );
        let hello = |version, epoch| Request::Hello {
            version,
            epoch,
            pid: 1,
        };
        assert!(msg(answer(&hello(2, 1), false, &st)).contains("protocol version 2"));
        assert!(msg(answer(&hello(1, 3), false, &st)).contains("must be epoch 1"));
        match answer(&hello(1, 1), false, &st).0 {
            Reply::Hello {
                version,
                epoch,
                generation,
                ..
            } => assert_eq!((version, epoch, generation), (1, 0, 0)),
            other => panic!("{other:?}"),
        }
        // No listener there; no admin.
        let addr: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let (r, fds) = answer(&Request::GetListenSockets { address: addr }, true, &st);
        assert_eq!(
            (r, fds.len()),
            (
                Reply::ListenSockets {
                    address: addr,
                    name: None,
                    count: 0
                },
                0
            )
        );
        let (r, _) = answer(&Request::GetAdminSocket { address: addr }, true, &st);
        assert_eq!(r, Reply::AdminSocket { count: 0 });
        // Drain: bounded by the shorter of the drain time and the parent shutdown time.
        assert_eq!(st.drain_time(), Duration::from_secs(600));
        let (r, _) = answer(
            &Request::Drain {
                parent_shutdown_time_s: 3,
            },
            true,
            &st,
        );
        assert_eq!(
            r,
            Reply::Draining {
                active_connections: 0
            }
        );
        assert!(st.draining.is_cancelled() && st.shutdown.is_cancelled());
        assert!(st.admin_stop.is_cancelled(), "admin stops accepting");
        assert_eq!(st.drain_time(), Duration::from_secs(3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_draining_parent_streams_its_counters_to_the_child() {
        let store = crate::stats::Store::new();
        let snapshot = crate::config::translate(Default::default(), &store).expect("empty config");
        let clusters = crate::upstream::ClusterManager::new(&[], &store);
        let parent_state = ServerState::new(Options::default(), snapshot, clusters, 1);
        let rq = parent_state
            .stats
            .http("ingress")
            .counter("downstream_rq_total");
        rq.increment(10);
        // More series than one frame holds: the snapshot is chunked.
        for i in 0..STATS_CHUNK + 5 {
            parent_state
                .stats
                .cluster(&format!("c{i}"))
                .counter("upstream_rq_total")
                .increment(1);
        }
        let (p, c) = UnixStream::pair().expect("pair");
        let st = parent_state.clone();
        let session = std::thread::spawn(move || session(&p, &st));
        let parent = Parent { conn: c, pid: 1 };
        let hello = call(
            &parent.conn,
            &Request::Hello {
                version: PROTOCOL_VERSION,
                epoch: 1,
                pid: 2,
            },
        )
        .expect("hello");
        assert!(matches!(hello.0, Reply::Hello { .. }), "{:?}", hello.0);
        parent.drain(5).expect("drain");
        let child = crate::stats::Store::new();
        child
            .http("ingress")
            .counter("downstream_rq_total")
            .increment(3);
        let c2 = child.clone();
        let merging = std::thread::spawn(move || parent.merge_stats(&c2));
        // The parent keeps counting while it drains; the child follows (its own 3 + 10 + 5).
        let child_rq = || child.text_stat("http.ingress.downstream_rq_total");
        let wait_for = |want: &'static str| {
            let child_rq = &child_rq;
            async move {
                for _ in 0..600 {
                    if child_rq().as_deref() == Some(want) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("child counter never reached {want}: {:?}", child_rq());
            }
        };
        wait_for("13").await;
        rq.increment(5);
        wait_for("18").await;
        // Counted after the last periodic snapshot, then the parent stops: the final
        // snapshot carries it.
        rq.increment(2);
        parent_state.exiting.cancel();
        let series = merging.join().expect("join").expect("merged");
        assert_eq!(series, STATS_CHUNK + 5 + 1);
        session.join().expect("join").expect("session");
        assert_eq!(
            child
                .text_stat("http.ingress.downstream_rq_total")
                .as_deref(),
            Some("20")
        );
        assert_eq!(
            child.text_stat("cluster.c7.upstream_rq_total").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn socket_path_from_base_id_epoch_and_dir() {
        let opts = Options {
            base_id: 7,
            hot_restart_socket_dir: Some("/run/weir".into()),
            ..Options::default()
        };
        assert_eq!(
            socket_path(&opts, 3),
            PathBuf::from("/run/weir/weir-hot-restart-7-3.sock")
        );
    }

    #[test]
    fn frames_round_trip_with_fds() {
        let (a, b) = UnixStream::pair().expect("pair");
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let reply = Reply::ListenSockets {
            address: addr,
            name: Some("http".into()),
            count: 2,
        };
        let dup = l.try_clone().expect("dup");
        send(&a, &reply, &[l.as_fd(), dup.as_fd()]).expect("send");
        let (got, fds) = recv::<Reply>(&b).expect("recv");
        assert_eq!(got, reply);
        assert_eq!(fds.len(), 2);
        for fd in fds {
            let s = std::net::TcpListener::from(fd);
            assert_eq!(s.local_addr().expect("addr"), addr, "the same socket");
        }
        // A request without fds, tagged as documented.
        send(&b, &Request::ListListeners, &[]).expect("send");
        let (req, fds) = recv::<Request>(&a).expect("recv");
        assert_eq!(req, Request::ListListeners);
        assert!(fds.is_empty());
    }

    #[test]
    fn wire_format_is_length_prefixed_versioned_json() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        send(
            &a,
            &Request::Drain {
                parent_shutdown_time_s: 9,
            },
            &[],
        )
        .expect("send");
        let mut head = [0u8; 4];
        b.read_exact(&mut head).expect("head");
        let mut body = vec![0u8; u32::from_be_bytes(head) as usize];
        b.read_exact(&mut body).expect("body");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"v": 1, "type": "drain", "parent_shutdown_time_s": 9})
        );
    }

    #[test]
    fn other_versions_and_garbage_are_rejected() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        let write = |b: &mut UnixStream, body: &[u8]| {
            b.write_all(&(body.len() as u32).to_be_bytes()).expect("w");
            b.write_all(body).expect("w");
        };
        write(&mut b, br#"{"v": 2, "type": "list_listeners"}"#);
        assert!(matches!(
            recv::<Request>(&a),
            Err(HotRestartError::Version { got: 2 })
        ));
        write(&mut b, br#"{"v": 1, "type": "launch_missiles"}"#);
        assert!(matches!(
            recv::<Request>(&a),
            Err(HotRestartError::Malformed(_))
        ));
        b.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
            .expect("w");
        assert!(matches!(
            recv::<Request>(&a),
            Err(HotRestartError::Malformed(_))
        ));
        drop(b);
        match recv::<Request>(&a) {
            Err(HotRestartError::Io(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof)
            }
            other => panic!("expected EOF, got {other:?}"),
        }
    }

    #[test]
    fn a_silent_parent_times_out() {
        let dir = std::env::temp_dir().join(format!("weir-hr-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("silent.sock");
        let _ = std::fs::remove_file(&path);
        // Accepts (the kernel does) but never answers.
        let _l = UnixListener::bind(&path).expect("bind");
        let (a, _b) = UnixStream::pair().expect("pair");
        a.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        assert!(matches!(
            call(&a, &Request::ListListeners),
            Err(HotRestartError::Io(_))
        ));
        // listen(): a live socket is in use; a stale file is replaced.
        assert!(matches!(listen(&path), Err(HotRestartError::InUse(_))));
        drop(_l);
        let l = listen(&path).expect("stale file replaced");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(l);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
