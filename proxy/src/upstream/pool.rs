//! Per-worker upstream connection pools (HTTP/1.1 and HTTP/2) and TCP connects.
//!
//! # Ownership and reuse
//!
//! Pools live in a `thread_local` keyed by (cluster identity, host identity): each worker
//! thread has its own, so the request path takes no lock shared between workers. Each
//! connection is driven by its own task on the runtime that opened it; the task ends (and the
//! socket closes) when hyper finishes the connection, when the pool marks it broken, or when it
//! has been idle for the cluster's `idle_timeout`.
//!
//! * HTTP/1.1: a connection carries one request at a time. [`UpstreamResponseBody`] owns the
//!   connection's `SendRequest` while the response streams; it puts the connection back on the
//!   idle list of the thread it finishes on only when the response body reached its end *and*
//!   the request body was sent completely. Dropped early, or after an error, it closes the
//!   connection: a half-read response must never be read by the next request.
//! * HTTP/2: streams are multiplexed on one connection per host per worker; another is opened
//!   only when `max_concurrent_streams` streams are in flight on the existing ones, or when it
//!   closed. Dropping [`UpstreamResponseBody`] early resets that stream (hyper sends
//!   RST_STREAM), not the connection.
//!
//! Stats: every connection holds a [`CxGuard`] in its IO object, so `upstream_cx_active` and
//! the host's `cx_active` return to their baseline exactly when the socket is dropped, whatever
//! path closed it; the same IO wrapper counts `upstream_cx_{rx,tx}_bytes_total`.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared, TryFutureExt};
use http::header::{self, HeaderValue};
use http::{Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::circuit::{Priority, ResourceGuard};
use super::{
    BoxError, Cluster, ClusterConfig, ClusterStats, Host, Http2Settings, UpstreamBody,
    UpstreamError,
};

// ---------------------------------------------------------------------------------------------
// Connection accounting

/// Holds one upstream connection's place in `upstream_cx_active` and the host's `cx_active`.
///
/// Created when a connection attempt starts (counting `upstream_cx_total` and the host's
/// `cx_total`); dropping it decrements the gauges and counts `upstream_cx_destroy`. The TCP
/// proxy keeps it next to its stream (see [`TcpConnection`]) and may report the bytes it moved
/// with [`CxGuard::add_rx`] / [`CxGuard::add_tx`].
#[derive(Debug)]
pub struct CxGuard {
    stats: Arc<ClusterStats>,
    host: Arc<Host>,
    /// The connection's slot in the `max_connections` circuit breaker.
    _breaker: Option<ResourceGuard>,
}

impl CxGuard {
    fn new(stats: Arc<ClusterStats>, host: Arc<Host>, breaker: Option<ResourceGuard>) -> Self {
        stats.upstream_cx_total.increment(1);
        stats.upstream_cx_active.increment(1.0);
        host.stats.cx_total.fetch_add(1, Ordering::Relaxed);
        host.stats.cx_active.fetch_add(1, Ordering::Relaxed);
        Self {
            stats,
            host,
            _breaker: breaker,
        }
    }

    /// Count bytes received from the upstream (`upstream_cx_rx_bytes_total`).
    pub fn add_rx(&self, n: u64) {
        self.stats.upstream_cx_rx_bytes_total.increment(n);
    }

    /// Count bytes sent to the upstream (`upstream_cx_tx_bytes_total`).
    pub fn add_tx(&self, n: u64) {
        self.stats.upstream_cx_tx_bytes_total.increment(n);
    }

    /// The host this connection goes to.
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }
}

impl Drop for CxGuard {
    fn drop(&mut self) {
        self.stats.upstream_cx_active.decrement(1.0);
        self.stats.upstream_cx_destroy.increment(1);
        self.host.stats.cx_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connected upstream byte stream and its accounting guard (from [`Cluster::connect_tcp`]).
/// Keep `guard` alive exactly as long as the stream (drop both together).
#[derive(Debug)]
pub struct TcpConnection {
    /// The stream (TCP_NODELAY set): plain TCP, or TLS when the cluster has a TLS
    /// `transport_socket` (the handshake is done).
    pub stream: UpIo,
    /// Keeps `upstream_cx_active` right; drop it when the stream is closed.
    pub guard: CxGuard,
}

/// Await `connect` within `timeout`, counting failures (`upstream_cx_connect_fail`,
/// `upstream_cx_connect_timeout`, the host's `cx_connect_fail`). Generic over the stream so the
/// timeout logic is testable without a network.
pub(crate) async fn timed_connect<T>(
    connect: impl Future<Output = io::Result<T>>,
    timeout: Duration,
    stats: &ClusterStats,
    host: &Host,
) -> Result<T, UpstreamError> {
    let fail = || {
        stats.upstream_cx_connect_fail.increment(1);
        host.stats.cx_connect_fail.fetch_add(1, Ordering::Relaxed);
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            fail();
            Err(UpstreamError::ConnectFailure(e))
        }
        Err(_) => {
            fail();
            stats.upstream_cx_connect_timeout.increment(1);
            Err(UpstreamError::ConnectTimeout)
        }
    }
}

/// An upstream byte stream: plain TCP or TLS (the cluster's `transport_socket`).
#[derive(Debug)]
pub enum UpIo {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (handshake done).
    Tls(Box<crate::tls::client::ClientStream>),
}

impl AsyncRead for UpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_write(cx, b),
            UpIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpIo::Plain(s) => s.is_write_vectored(),
            UpIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl UpIo {
    /// The TCP socket under the stream.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            UpIo::Plain(s) => s,
            UpIo::Tls(s) => s.get_ref().0,
        }
    }

    /// Whether ALPN picked `h2`.
    fn alpn_h2(&self) -> bool {
        match self {
            UpIo::Plain(_) => false,
            UpIo::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

/// A stream that counts bytes and owns its [`CxGuard`].
#[derive(Debug)]
struct CountingIo {
    inner: UpIo,
    guard: CxGuard,
}

impl AsyncRead for CountingIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.guard.add_rx(n as u64);
        }
        r
    }
}

impl AsyncWrite for CountingIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.guard.add_tx(n as u64);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.guard.add_tx(n as u64);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// Connection state shared by a pooled handle and its driver task

/// State shared between a connection's pool handle(s) and its driver task.
#[derive(Debug)]
struct ConnState {
    /// Requests (h1: 0 or 1) or streams (h2) in flight.
    busy: AtomicUsize,
    /// Base for `idle_since_ms`.
    epoch: Instant,
    /// When `busy` last dropped to 0, in ms since `epoch`.
    idle_since_ms: AtomicU64,
    /// Cancelled to close the connection now (broken or not reusable), and by the driver when
    /// the connection ended.
    close: CancellationToken,
    /// Wakes the driver when the connection turns idle, so the idle timer starts then.
    idle: tokio::sync::Notify,
}

impl ConnState {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            busy: AtomicUsize::new(0),
            epoch: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
            close: CancellationToken::new(),
            idle: tokio::sync::Notify::new(),
        })
    }

    fn acquire(&self) {
        self.busy.fetch_add(1, Ordering::AcqRel);
    }

    fn release(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.idle_since_ms.store(ms, Ordering::Release);
        if self.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_one();
        }
    }

    fn closed(&self) -> bool {
        self.close.is_cancelled()
    }

    /// When the connection becomes idle-expired if nothing changes.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        if self.busy.load(Ordering::Acquire) > 0 {
            Instant::now() + idle
        } else {
            self.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire)) + idle
        }
    }
}

/// Drive a hyper connection until it ends, is closed by the pool, or idles out.
async fn drive<F>(conn: F, state: Arc<ConnState>, idle: Option<Duration>, stats: Arc<ClusterStats>)
where
    F: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(conn);
    loop {
        let deadline = idle.map(|d| state.idle_deadline(d));
        tokio::select! {
            r = &mut conn => {
                if let Err(error) = r {
                    tracing::debug!(%error, "upstream connection ended with an error");
                }
                break;
            }
            () = state.close.cancelled() => break,
            // Went idle: recompute the deadline from now.
            () = state.idle.notified() => {}
            () = sleep_until(deadline) => {
                if state.busy.load(Ordering::Acquire) == 0
                    && idle.is_some_and(|d| state.idle_deadline(d) <= Instant::now())
                {
                    stats.upstream_cx_idle_timeout.increment(1);
                    break;
                }
            }
        }
    }
    // Tell pooled handles this connection is gone; `conn` (and its socket) drop here.
    state.close.cancel();
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies

/// The request body as sent upstream: records whether it was sent to the end, because an
/// HTTP/1 connection whose request body was cut short cannot carry another request.
#[derive(Debug)]
pub(crate) struct TrackedBody {
    inner: UpstreamBody,
    done: Arc<AtomicBool>,
}

impl TrackedBody {
    fn new(inner: UpstreamBody) -> (Self, Arc<AtomicBool>) {
        let done = Arc::new(AtomicBool::new(inner.is_end_stream()));
        (
            Self {
                inner,
                done: done.clone(),
            },
            done,
        )
    }
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.done.store(true, Ordering::Release),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => {
                self.done.store(true, Ordering::Release)
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What to do with the connection when a response body ends.
#[derive(Debug)]
enum Release {
    /// HTTP/1.1: back to the idle list if the exchange completed cleanly.
    H1 {
        sender: http1::SendRequest<TrackedBody>,
        state: Arc<ConnState>,
        key: PoolKey,
        owner: PoolOwner,
        req_done: Arc<AtomicBool>,
    },
    /// HTTP/2: one stream fewer in flight.
    H2 { state: Arc<ConnState> },
}

/// A response body from [`Cluster::send_http`](super::Cluster::send_http): hyper's
/// [`Incoming`] plus the pool bookkeeping.
///
/// Read it to the end (`is_end_stream()` true or `poll_frame` -> `None`) and an HTTP/1.1
/// connection goes back to this worker's pool; drop it before that and the connection is closed
/// (HTTP/1.1) or the stream reset (HTTP/2). Protocol upgrades (101) never return to the pool.
#[derive(Debug)]
pub struct UpstreamResponseBody {
    inner: Incoming,
    release: Option<Release>,
}

impl UpstreamResponseBody {
    fn new(inner: Incoming, release: Option<Release>) -> Self {
        let mut b = Self { inner, release };
        if b.inner.is_end_stream() {
            b.complete();
        }
        b
    }

    /// The body ended cleanly.
    fn complete(&mut self) {
        match self.release.take() {
            Some(Release::H1 {
                sender,
                state,
                key,
                owner,
                req_done,
            }) => {
                if req_done.load(Ordering::Acquire) && !state.closed() && !sender.is_closed() {
                    state.release();
                    let idle = IdleH1 { sender, state };
                    // During thread teardown the pool is gone: the connection just closes.
                    let _ = POOLS.try_with(|p| {
                        p.borrow_mut().entry(key, owner).give_back(idle);
                    });
                } else {
                    state.close.cancel();
                }
            }
            Some(Release::H2 { state }) => state.release(),
            None => {}
        }
    }

    /// Abandoned or failed: never reuse an HTTP/1.1 connection in an unknown state.
    fn abort(&mut self) {
        match self.release.take() {
            Some(Release::H1 { state, .. }) => state.close.cancel(),
            Some(Release::H2 { state }) => state.release(),
            None => {}
        }
    }
}

impl Drop for UpstreamResponseBody {
    fn drop(&mut self) {
        self.abort();
    }
}

impl Body for UpstreamResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.complete(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.complete(),
            Poll::Ready(Some(Err(_))) => self.abort(),
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// ---------------------------------------------------------------------------------------------
// The per-worker pools

/// (cluster uid, host allocation address). The address is stable and not reused while the
/// entry holds a `Weak<Host>` to it.
type PoolKey = (u64, usize);

/// Liveness handles of a pool entry's cluster and host, for pruning.
#[derive(Debug, Clone)]
struct PoolOwner {
    cluster: Weak<()>,
    host: Weak<Host>,
}

#[derive(Debug)]
struct IdleH1 {
    sender: http1::SendRequest<TrackedBody>,
    state: Arc<ConnState>,
}

#[derive(Debug, Clone)]
struct H2Conn {
    sender: http2::SendRequest<TrackedBody>,
    state: Arc<ConnState>,
}

impl H2Conn {
    fn usable(&self, max_streams: u32) -> bool {
        !self.state.closed()
            && !self.sender.is_closed()
            && self.state.busy.load(Ordering::Acquire) < max_streams as usize
    }
}

/// An HTTP/1.1 request waiting for one of this worker's connections to the host (the
/// connection circuit breaker is open). It receives a connection, or `None` when one closed
/// (try again: a new connection may be allowed now).
type H1Waiter = tokio::sync::oneshot::Sender<Option<IdleH1>>;

#[derive(Debug)]
struct HostPool {
    owner: PoolOwner,
    /// Most recently used last.
    idle_h1: Vec<IdleH1>,
    /// HTTP/1.1 connections to this host opened by this worker and not yet closed
    /// (connecting, busy or idle).
    h1_open: usize,
    /// Requests waiting for a connection, oldest first.
    waiters: VecDeque<H1Waiter>,
    h2: Vec<H2Conn>,
    /// HTTP/2 connects in progress; requests join one while it has stream capacity left, so
    /// a burst opens one connection rather than one per request.
    pending_h2: Vec<PendingH2>,
}

/// A shared HTTP/2 connect (its error is shared too, hence the `Arc`).
type H2Connect = Shared<BoxFuture<'static, Result<H2Conn, Arc<UpstreamError>>>>;

struct PendingH2 {
    connect: H2Connect,
    /// Requests that joined it (bounded by `max_concurrent_streams`).
    claimed: usize,
}

impl std::fmt::Debug for PendingH2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingH2")
            .field("claimed", &self.claimed)
            .finish()
    }
}

impl HostPool {
    /// Hand a reusable connection to the oldest request still waiting, else keep it idle.
    fn give_back(&mut self, mut idle: IdleH1) {
        while let Some(w) = self.waiters.pop_front() {
            match w.send(Some(idle)) {
                Ok(()) => return,
                Err(Some(back)) => idle = back,
                Err(None) => return,
            }
        }
        self.idle_h1.push(idle);
    }

    /// Move finished connects to `h2`, forget failed ones and closed connections.
    fn settle(&mut self) {
        let Self { h2, pending_h2, .. } = self;
        pending_h2.retain(|p| match p.connect.peek() {
            Some(Ok(c)) => {
                h2.push(c.clone());
                false
            }
            Some(Err(_)) => false,
            None => true,
        });
        h2.retain(|c| !c.state.closed() && !c.sender.is_closed());
    }
}

#[derive(Debug, Default)]
struct Pools(HashMap<PoolKey, HostPool>);

impl Pools {
    fn entry(&mut self, key: PoolKey, owner: PoolOwner) -> &mut HostPool {
        if !self.0.contains_key(&key) {
            // A new host on this thread: a cheap moment to forget removed hosts and clusters.
            self.0.retain(|_, p| {
                p.owner.cluster.strong_count() > 0 && p.owner.host.strong_count() > 0
            });
        }
        self.0.entry(key).or_insert_with(|| HostPool {
            owner,
            idle_h1: Vec::new(),
            h1_open: 0,
            waiters: VecDeque::new(),
            h2: Vec::new(),
            pending_h2: Vec::new(),
        })
    }
}

thread_local! {
    static POOLS: RefCell<Pools> = RefCell::new(Pools::default());
}

/// Counts one live HTTP/1.1 connection in its worker's pool entry. Its driver task owns it,
/// so it drops on that worker when the connection ends: the count goes down and the oldest
/// waiting request is told to try again.
struct H1Slot {
    key: PoolKey,
}

impl H1Slot {
    fn new(key: PoolKey, owner: PoolOwner) -> Self {
        POOLS.with(|p| p.borrow_mut().entry(key, owner).h1_open += 1);
        Self { key }
    }
}

impl Drop for H1Slot {
    fn drop(&mut self) {
        let _ = POOLS.try_with(|p| {
            let Ok(mut p) = p.try_borrow_mut() else {
                return;
            };
            if let Some(pool) = p.0.get_mut(&self.key) {
                pool.h1_open = pool.h1_open.saturating_sub(1);
                while let Some(w) = pool.waiters.pop_front() {
                    if w.send(None).is_ok() {
                        break;
                    }
                }
            }
        });
    }
}

/// How an HTTP/1.1 request without an idle connection proceeds.
enum H1Admission {
    /// Open a connection holding this breaker slot.
    Open(ResourceGuard),
    /// Wait for a connection of this worker (holding a pending-request slot).
    Wait(tokio::sync::oneshot::Receiver<Option<IdleH1>>, PendingGuard),
}

/// A request's place in `upstream_rq_pending_active` and the pending breaker.
struct PendingGuard {
    _slot: ResourceGuard,
    stats: Arc<ClusterStats>,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.stats.upstream_rq_pending_active.decrement(1.0);
    }
}

fn take_idle_h1(key: PoolKey) -> Option<IdleH1> {
    POOLS.with(|p| {
        let mut p = p.borrow_mut();
        let pool = p.0.get_mut(&key)?;
        while let Some(c) = pool.idle_h1.pop() {
            if !c.state.closed() && !c.sender.is_closed() {
                return Some(c);
            }
        }
        None
    })
}

/// How a request gets an HTTP/2 connection.
enum H2Pick {
    /// An established connection with stream capacity.
    Ready(H2Conn),
    /// A connect in progress (joined or just started).
    Wait(H2Connect),
}

/// An established connection or a connect to join; a new connect (with its connection
/// breaker slot) only when none has stream capacity. With the breaker open, the least busy
/// connection or connect is used past `max_streams` (HTTP/2 queues the stream), and a
/// connection is opened anyway when this worker has none to the host (as Envoy does).
fn pick_h2(
    key: PoolKey,
    owner: PoolOwner,
    max_streams: u32,
    cluster: &Cluster,
    priority: Priority,
    start: impl FnOnce(ResourceGuard) -> H2Connect,
) -> H2Pick {
    POOLS.with(|p| {
        let mut p = p.borrow_mut();
        let pool = p.entry(key, owner);
        pool.settle();
        if let Some(c) = pool.h2.iter().find(|c| c.usable(max_streams)) {
            return H2Pick::Ready(c.clone());
        }
        if let Some(pending) = pool
            .pending_h2
            .iter_mut()
            .find(|c| c.claimed < max_streams as usize)
        {
            pending.claimed += 1;
            return H2Pick::Wait(pending.connect.clone());
        }
        let connections = &cluster.resources(priority).connections;
        let slot = match connections.try_acquire() {
            Some(slot) => slot,
            None => {
                cluster.stats.upstream_cx_overflow.increment(1);
                if let Some(c) = pool
                    .h2
                    .iter()
                    .min_by_key(|c| c.state.busy.load(Ordering::Acquire))
                {
                    return H2Pick::Ready(c.clone());
                }
                if let Some(pending) = pool.pending_h2.iter_mut().min_by_key(|c| c.claimed) {
                    pending.claimed += 1;
                    return H2Pick::Wait(pending.connect.clone());
                }
                connections.acquire_forced()
            }
        };
        let connect = start(slot);
        pool.pending_h2.push(PendingH2 {
            connect: connect.clone(),
            claimed: 1,
        });
        H2Pick::Wait(connect)
    })
}

fn settle_h2(key: PoolKey) {
    POOLS.with(|p| {
        if let Some(pool) = p.borrow_mut().0.get_mut(&key) {
            pool.settle();
        }
    });
}

/// A failed HTTP/2 exchange: `RefusedStream` when the upstream refused the stream
/// (RST_STREAM REFUSED_STREAM: safe to retry, nothing was processed), else `Reset`.
fn stream_error(e: hyper::Error) -> UpstreamError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if let Some(h2e) = err.downcast_ref::<h2::Error>()
            && h2e.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return UpstreamError::RefusedStream;
        }
        source = err.source();
    }
    UpstreamError::Reset(e.to_string())
}

/// A copy of a shared connect error for each request that waited on it.
fn clone_err(e: &UpstreamError) -> UpstreamError {
    match e {
        UpstreamError::NoHealthyUpstream => UpstreamError::NoHealthyUpstream,
        UpstreamError::ConnectTimeout => UpstreamError::ConnectTimeout,
        UpstreamError::ConnectFailure(io) => {
            UpstreamError::ConnectFailure(io::Error::new(io.kind(), io.to_string()))
        }
        UpstreamError::Reset(s) => UpstreamError::Reset(s.clone()),
        UpstreamError::RefusedStream => UpstreamError::RefusedStream,
        UpstreamError::Overflow => UpstreamError::Overflow,
        UpstreamError::Protocol(s) => UpstreamError::Protocol(s.clone()),
    }
}

// ---------------------------------------------------------------------------------------------
// Request framing

/// Remove connection-specific headers, which must not cross into HTTP/2 (RFC 9113 8.2.2).
fn strip_connection_headers(h: &mut http::HeaderMap) {
    // Headers listed in `Connection` are hop-by-hop too.
    let listed: Vec<header::HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| header::HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    h.remove(header::CONNECTION);
    h.remove(header::TRANSFER_ENCODING);
    h.remove(header::UPGRADE);
    h.remove("keep-alive");
    h.remove("proxy-connection");
    if h.get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        h.remove(header::TE);
    }
}

/// The authority to use when the request names none.
fn host_authority(host: &Host) -> String {
    match &host.hostname {
        Some(h) => format!("{h}:{}", host.address.port()),
        None => host.address.to_string(),
    }
}

/// HTTP/1.1: origin-form URI plus `Host`.
fn prepare_h1(req: &mut Request<UpstreamBody>, host: &Host) -> Result<(), UpstreamError> {
    *req.version_mut() = Version::HTTP_11;
    if req.method() == http::Method::CONNECT {
        return Ok(());
    }
    if let Some(auth) = req.uri().authority().cloned() {
        if !req.headers().contains_key(header::HOST) {
            let v = HeaderValue::from_str(auth.as_str())
                .map_err(|e| UpstreamError::Protocol(format!("invalid authority: {e}")))?;
            req.headers_mut().insert(header::HOST, v);
        }
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        *req.uri_mut() =
            Uri::try_from(pq).map_err(|e| UpstreamError::Protocol(format!("invalid path: {e}")))?;
    }
    if !req.headers().contains_key(header::HOST) {
        let v = HeaderValue::from_str(&host_authority(host))
            .map_err(|e| UpstreamError::Protocol(format!("invalid host: {e}")))?;
        req.headers_mut().insert(header::HOST, v);
    }
    Ok(())
}

/// HTTP/2: absolute-form URI (`:authority` from the `Host` header), no connection headers.
fn prepare_h2(req: &mut Request<UpstreamBody>, host: &Host) -> Result<(), UpstreamError> {
    *req.version_mut() = Version::HTTP_2;
    let host_header = req.headers_mut().remove(header::HOST);
    strip_connection_headers(req.headers_mut());
    if req.uri().authority().is_some() && req.uri().scheme().is_some() {
        return Ok(());
    }
    let authority = match &host_header {
        Some(v) => v
            .to_str()
            .map_err(|_| UpstreamError::Protocol("Host header is not ASCII".into()))?
            .to_string(),
        None => match req.uri().authority() {
            Some(a) => a.to_string(),
            None => host_authority(host),
        },
    };
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    *req.uri_mut() = Uri::try_from(format!("http://{authority}{pq}"))
        .map_err(|e| UpstreamError::Protocol(format!("invalid request target: {e}")))?;
    Ok(())
}

fn is_upgrade(status: http::StatusCode, method: &http::Method) -> bool {
    status == http::StatusCode::SWITCHING_PROTOCOLS
        || (method == http::Method::CONNECT && status.is_success())
}

// ---------------------------------------------------------------------------------------------
// Cluster methods

/// Open a TCP connection with the cluster's timeout and accounting.
async fn open_tcp(
    stats: &Arc<ClusterStats>,
    config: &ClusterConfig,
    host: &Arc<Host>,
    breaker: ResourceGuard,
) -> Result<(TcpStream, CxGuard), UpstreamError> {
    let guard = CxGuard::new(stats.clone(), host.clone(), Some(breaker));
    let stream = timed_connect(
        TcpStream::connect(host.address),
        config.connect_timeout,
        stats,
        host,
    )
    .await?;
    // Latency matters more than segment count for proxied requests.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "TCP_NODELAY failed on upstream connection");
    }
    Ok((stream, guard))
}

/// Open a connection: TCP, then the TLS handshake when the cluster has a TLS transport
/// socket (`connect_timeout` covers both, as the connection is not usable before).
/// `h1_only` leaves `h2` out of the offered ALPN.
async fn open(
    stats: &Arc<ClusterStats>,
    config: &ClusterConfig,
    tls: Option<&Arc<crate::tls::ClientTls>>,
    host: &Arc<Host>,
    breaker: ResourceGuard,
    h1_only: bool,
) -> Result<(UpIo, CxGuard), UpstreamError> {
    let Some(tls) = tls else {
        let (s, g) = open_tcp(stats, config, host, breaker).await?;
        return Ok((UpIo::Plain(s), g));
    };
    let guard = CxGuard::new(stats.clone(), host.clone(), Some(breaker));
    let connect = async {
        let s = TcpStream::connect(host.address).await?;
        if let Err(error) = s.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY failed on upstream connection");
        }
        tls.connect(s, host.hostname.as_deref(), host.address.ip(), h1_only)
            .await
    };
    let s = timed_connect(connect, config.connect_timeout, stats, host).await?;
    let io = UpIo::Tls(Box::new(s));
    if !h1_only {
        tls.learn_alpn(io.alpn_h2());
    }
    Ok((io, guard))
}

/// Connect and handshake one HTTP/2 connection, spawning its driver.
async fn open_h2(
    stats: Arc<ClusterStats>,
    config: Arc<ClusterConfig>,
    tls: Option<Arc<crate::tls::ClientTls>>,
    host: Arc<Host>,
    settings: Http2Settings,
    breaker: ResourceGuard,
) -> Result<H2Conn, UpstreamError> {
    let (stream, guard) = open(&stats, &config, tls.as_ref(), &host, breaker, false).await?;
    // An ALPN-auto cluster whose upstream did not pick h2: HTTP/1.1 from now on.
    if tls.as_ref().is_some_and(|t| t.offers_h2())
        && !stream.alpn_h2()
        && !matches!(config.protocol, super::UpstreamProtocol::Http2(_))
    {
        return Err(UpstreamError::Protocol(
            "the upstream did not negotiate h2 by ALPN; using HTTP/1.1 from now on".into(),
        ));
    }
    stats.upstream_cx_http2_total.increment(1);
    let io = TokioIo::new(CountingIo {
        inner: stream,
        guard,
    });
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(settings.initial_stream_window_size)
        .initial_connection_window_size(settings.initial_connection_window_size)
        // hyper stalls with a tiny send buffer; 16 KiB is one default-sized frame.
        .max_send_buf_size((config.per_connection_buffer_limit_bytes as usize).max(16 * 1024))
        .handshake(io)
        .await
        .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
    let state = ConnState::new();
    tokio::spawn(drive(conn, state.clone(), config.idle_timeout, stats));
    Ok(H2Conn { sender, state })
}

impl Cluster {
    fn pool_key(&self, host: &Arc<Host>) -> (PoolKey, PoolOwner) {
        (
            (self.uid, Arc::as_ptr(host) as usize),
            PoolOwner {
                cluster: Arc::downgrade(&self.alive),
                host: Arc::downgrade(host),
            },
        )
    }

    /// See [`Cluster::connect_tcp`](super::Cluster::connect_tcp).
    pub(crate) async fn connect_tcp_impl(
        &self,
        host: &Arc<Host>,
        priority: Priority,
    ) -> Result<TcpConnection, UpstreamError> {
        let Some(slot) = self.resources(priority).connections.try_acquire() else {
            self.stats.upstream_cx_overflow.increment(1);
            return Err(UpstreamError::Overflow);
        };
        // Raw bytes (tcp_proxy, upgrades, CONNECT) never speak h2 over the connection:
        // `h2` is left out of the offered ALPN.
        let (stream, guard) = open(
            &self.stats,
            &self.config,
            self.tls.as_ref(),
            host,
            slot,
            true,
        )
        .await?;
        Ok(TcpConnection { stream, guard })
    }

    /// See [`Cluster::send_http`](super::Cluster::send_http).
    pub(crate) async fn send_http_impl(
        &self,
        host: &Arc<Host>,
        mut req: Request<UpstreamBody>,
        downstream_h2: bool,
        priority: Priority,
    ) -> Result<Response<UpstreamResponseBody>, UpstreamError> {
        use super::UpstreamProtocol::*;
        let mut h2 = match &self.config.protocol {
            Http1 => None,
            Http2(s) => Some(*s),
            UseDownstream(s) => downstream_h2.then_some(*s),
        };
        // TLS offering `h2` by ALPN (and HTTP/2 not forced): what the upstream picks wins.
        if let Some(tls) = &self.tls
            && tls.offers_h2()
            && !matches!(self.config.protocol, Http2(_))
        {
            use crate::tls::client::AlpnState;
            if tls.alpn_state() == AlpnState::Unknown {
                self.probe_alpn(host, priority).await?;
            }
            h2 = match tls.alpn_state() {
                AlpnState::H2 => Some(match &self.config.protocol {
                    UseDownstream(s) => *s,
                    _ => Http2Settings::default(),
                }),
                _ => None,
            };
        }
        match h2 {
            Some(s) => {
                prepare_h2(&mut req, host)?;
                self.send_h2(host, req, s, priority).await
            }
            None => {
                prepare_h1(&mut req, host)?;
                self.send_h1(host, req, priority).await
            }
        }
    }

    /// Learn what ALPN an upstream picks with one connection (closed again; later
    /// connections go to the right pool at once).
    async fn probe_alpn(&self, host: &Arc<Host>, priority: Priority) -> Result<(), UpstreamError> {
        let slot = self.resources(priority).connections.acquire_forced();
        let (io, _guard) = open(
            &self.stats,
            &self.config,
            self.tls.as_ref(),
            host,
            slot,
            false,
        )
        .await?;
        drop(io);
        Ok(())
    }

    /// No idle connection: open one if the connection breaker allows it (or this worker has
    /// none to the host), else wait for one if the pending breaker allows it.
    fn h1_admission(
        &self,
        key: PoolKey,
        owner: &PoolOwner,
        priority: Priority,
    ) -> Result<H1Admission, UpstreamError> {
        let rm = self.resources(priority);
        if let Some(slot) = rm.connections.try_acquire() {
            return Ok(H1Admission::Open(slot));
        }
        self.stats.upstream_cx_overflow.increment(1);
        POOLS.with(|p| {
            let mut p = p.borrow_mut();
            let pool = p.entry(key, owner.clone());
            if pool.h1_open == 0 {
                return Ok(H1Admission::Open(rm.connections.acquire_forced()));
            }
            let Some(slot) = rm.pending.try_acquire() else {
                self.stats.upstream_rq_pending_overflow.increment(1);
                return Err(UpstreamError::Overflow);
            };
            self.stats.upstream_rq_pending_total.increment(1);
            self.stats.upstream_rq_pending_active.increment(1.0);
            let (tx, rx) = tokio::sync::oneshot::channel();
            pool.waiters.push_back(tx);
            Ok(H1Admission::Wait(
                rx,
                PendingGuard {
                    _slot: slot,
                    stats: self.stats.clone(),
                },
            ))
        })
    }

    async fn send_h1(
        &self,
        host: &Arc<Host>,
        req: Request<UpstreamBody>,
        priority: Priority,
    ) -> Result<Response<UpstreamResponseBody>, UpstreamError> {
        let (key, owner) = self.pool_key(host);
        let method = req.method().clone();
        let (parts, body) = req.into_parts();
        let (body, req_done) = TrackedBody::new(body);
        let mut req = Request::from_parts(parts, body);

        let mut handoff: Option<IdleH1> = None;
        let slot = loop {
            // Reuse an idle (or handed-over) connection if one is still good; a request it
            // refuses unsent is retried on the next one.
            while let Some(IdleH1 { mut sender, state }) =
                handoff.take().or_else(|| take_idle_h1(key))
            {
                if sender.ready().await.is_err() {
                    state.close.cancel();
                    continue;
                }
                state.acquire();
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        return Ok(
                            self.h1_response(resp, sender, state, key, owner, req_done, &method)
                        );
                    }
                    Err(mut e) => {
                        state.close.cancel();
                        match e.take_message() {
                            Some(r) => req = r,
                            None => return Err(UpstreamError::Reset(e.into_error().to_string())),
                        }
                    }
                }
            }
            match self.h1_admission(key, &owner, priority)? {
                H1Admission::Open(slot) => break slot,
                H1Admission::Wait(rx, _pending) => {
                    // A connection, or `None`/closed pool entry: look again.
                    if let Ok(Some(c)) = rx.await {
                        handoff = Some(c);
                    }
                }
            }
        };

        let h1_slot = H1Slot::new(key, owner.clone());
        let (stream, guard) = open(
            &self.stats,
            &self.config,
            self.tls.as_ref(),
            host,
            slot,
            true,
        )
        .await?;
        self.stats.upstream_cx_http1_total.increment(1);
        let io = TokioIo::new(CountingIo {
            inner: stream,
            guard,
        });
        let (mut sender, conn) = http1::Builder::new()
            // hyper's minimum read buffer is 8 KiB.
            .max_buf_size((self.config.per_connection_buffer_limit_bytes as usize).max(8192))
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        let state = ConnState::new();
        let driver = drive(
            conn.with_upgrades(),
            state.clone(),
            self.config.idle_timeout,
            self.stats.clone(),
        );
        tokio::spawn(async move {
            let _slot = h1_slot;
            driver.await
        });
        state.acquire();
        match sender.send_request(req).await {
            Ok(resp) => Ok(self.h1_response(resp, sender, state, key, owner, req_done, &method)),
            Err(e) => {
                state.close.cancel();
                Err(UpstreamError::Reset(e.to_string()))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn h1_response(
        &self,
        resp: Response<Incoming>,
        sender: http1::SendRequest<TrackedBody>,
        state: Arc<ConnState>,
        key: PoolKey,
        owner: PoolOwner,
        req_done: Arc<AtomicBool>,
        method: &http::Method,
    ) -> Response<UpstreamResponseBody> {
        let (parts, body) = resp.into_parts();
        // An upgraded connection belongs to whoever takes the upgrade; never pool it.
        let release = (!is_upgrade(parts.status, method)).then_some(Release::H1 {
            sender,
            state,
            key,
            owner,
            req_done,
        });
        Response::from_parts(parts, UpstreamResponseBody::new(body, release))
    }

    async fn send_h2(
        &self,
        host: &Arc<Host>,
        req: Request<UpstreamBody>,
        settings: Http2Settings,
        priority: Priority,
    ) -> Result<Response<UpstreamResponseBody>, UpstreamError> {
        let (key, owner) = self.pool_key(host);
        let (parts, body) = req.into_parts();
        let (body, _) = TrackedBody::new(body);
        let mut req = Request::from_parts(parts, body);

        // A connection that refuses the request unsent (it just closed) gets one more try.
        for _ in 0..2 {
            let max_streams = settings.max_concurrent_streams;
            let pick = pick_h2(key, owner.clone(), max_streams, self, priority, |slot| {
                open_h2(
                    self.stats.clone(),
                    self.config.clone(),
                    self.tls.clone(),
                    host.clone(),
                    settings,
                    slot,
                )
                .map_err(Arc::new)
                .boxed()
                .shared()
            });
            let conn = match pick {
                H2Pick::Ready(c) => c,
                H2Pick::Wait(connect) => {
                    let r = connect.await;
                    settle_h2(key);
                    r.map_err(|e| clone_err(&e))?
                }
            };
            match self.h2_try(conn, req).await {
                Ok(r) => return r,
                Err(r) => req = r,
            }
        }
        Err(UpstreamError::Reset(
            "HTTP/2 connection closed before the request was sent".into(),
        ))
    }

    /// Send on `conn`; `Err(req)` when the connection refused it unsent.
    async fn h2_try(
        &self,
        conn: H2Conn,
        req: Request<TrackedBody>,
    ) -> Result<Result<Response<UpstreamResponseBody>, UpstreamError>, Request<TrackedBody>> {
        let H2Conn { mut sender, state } = conn;
        state.acquire();
        match sender.try_send_request(req).await {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                Ok(Ok(Response::from_parts(
                    parts,
                    UpstreamResponseBody::new(body, Some(Release::H2 { state })),
                )))
            }
            Err(mut e) => {
                state.release();
                match e.take_message() {
                    Some(r) => Err(r),
                    None => Ok(Err(stream_error(e.into_error()))),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use hyper::service::service_fn;
    use hyper_util::server::conn::auto;

    use super::*;
    use crate::stats::Store;
    use crate::upstream::{
        ClusterConfig, DiscoveryType, DnsLookupFamily, EndpointAddress, EndpointConfig, LbPolicy,
        UpstreamProtocol,
    };

    struct TestServer {
        addr: std::net::SocketAddr,
        accepts: Arc<AtomicUsize>,
        max_inflight: Arc<AtomicUsize>,
    }

    /// A hyper server (HTTP/1.1 and HTTP/2 prior knowledge) counting accepted connections.
    /// `/big`: 4 MiB body; `/slow`: 50 ms delay; `/early`: answers without reading the request
    /// body; anything else echoes `version authority host-header`.
    async fn server() -> TestServer {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let accepts = Arc::new(AtomicUsize::new(0));
        let inflight = Arc::new(AtomicUsize::new(0));
        let max_inflight = Arc::new(AtomicUsize::new(0));
        let (a, inf, max) = (accepts.clone(), inflight, max_inflight.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let (inf, max) = (inf.clone(), max.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (inf, max) = (inf.clone(), max.clone());
                        async move {
                            let n = inf.fetch_add(1, Ordering::SeqCst) + 1;
                            max.fetch_max(n, Ordering::SeqCst);
                            let body = match req.uri().path() {
                                "/big" => Bytes::from(vec![b'x'; 4 << 20]),
                                "/slow" => {
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    Bytes::from_static(b"slow")
                                }
                                "/early" => Bytes::from_static(b"early"),
                                _ => Bytes::from(format!(
                                    "{:?} {} {}",
                                    req.version(),
                                    req.uri().authority().map(|a| a.as_str()).unwrap_or("-"),
                                    req.headers()
                                        .get(header::HOST)
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or("-"),
                                )),
                            };
                            inf.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(Response::new(Full::new(body)))
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        TestServer {
            addr,
            accepts,
            max_inflight,
        }
    }

    fn cluster(addr: std::net::SocketAddr, protocol: UpstreamProtocol) -> (Cluster, Arc<Store>) {
        let store = Store::new();
        let cfg = ClusterConfig {
            name: "c".into(),
            discovery: DiscoveryType::Static,
            endpoints: vec![EndpointConfig {
                address: EndpointAddress::Ip(addr),
                hostname: None,
                weight: 1,
                priority: 0,
                locality: None,
                health: 0,
            }],
            connect_timeout: Duration::from_secs(2),
            lb_policy: LbPolicy::RoundRobin,
            lb: Default::default(),
            per_connection_buffer_limit_bytes: 1 << 20,
            dns_refresh_rate: Duration::from_secs(5),
            dns_lookup_family: DnsLookupFamily::Auto,
            protocol,
            idle_timeout: Some(Duration::from_secs(3600)),
            circuit_breakers: Default::default(),
            health_checks: Vec::new(),
            outlier: None,
            eds: None,
            tls: None,
        };
        (Cluster::new(Arc::new(cfg), &store), store)
    }

    fn empty() -> UpstreamBody {
        Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync()
    }

    fn get(path: &str) -> Request<UpstreamBody> {
        Request::builder()
            .uri(path)
            .header(header::HOST, "svc.local")
            .body(empty())
            .expect("request")
    }

    fn stat(store: &Store, name: &str) -> f64 {
        store
            .render_text()
            .into_iter()
            .find(|(k, _)| k == &format!("cluster.c.{name}"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0)
    }

    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn body_text(resp: Response<UpstreamResponseBody>) -> String {
        let b = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&b).into_owned()
    }

    #[tokio::test]
    async fn h1_keep_alive_reuses_one_connection() {
        let srv = server().await;
        let (c, store) = cluster(srv.addr, UpstreamProtocol::Http1);
        let host = c.choose_host(&Default::default()).expect("host");
        for _ in 0..3 {
            let resp = c
                .send_http(&host, get("/x"), false, Priority::Default)
                .await
                .expect("sent");
            assert_eq!(body_text(resp).await, "HTTP/1.1 - svc.local");
        }
        assert_eq!(srv.accepts.load(Ordering::SeqCst), 1);
        assert_eq!(stat(&store, "upstream_cx_total"), 1.0);
        assert_eq!(stat(&store, "upstream_cx_http1_total"), 1.0);
        assert_eq!(stat(&store, "upstream_cx_active"), 1.0);
        assert!(stat(&store, "upstream_cx_rx_bytes_total") > 0.0);
        assert!(stat(&store, "upstream_cx_tx_bytes_total") > 0.0);
        assert_eq!(host.stats.cx_total.load(Ordering::Relaxed), 1);
        assert_eq!(host.stats.cx_active.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn h1_absolute_uri_becomes_origin_form() {
        let srv = server().await;
        let (c, _store) = cluster(srv.addr, UpstreamProtocol::Http1);
        let host = c.choose_host(&Default::default()).expect("host");
        let req = Request::builder()
            .uri("http://abs.example/x")
            .body(empty())
            .expect("request");
        let resp = c
            .send_http(&host, req, false, Priority::Default)
            .await
            .expect("sent");
        assert_eq!(body_text(resp).await, "HTTP/1.1 - abs.example");
    }

    #[tokio::test]
    async fn h1_connection_not_reused_after_early_drop() {
        let srv = server().await;
        let (c, store) = cluster(srv.addr, UpstreamProtocol::Http1);
        let host = c.choose_host(&Default::default()).expect("host");
        let resp = c
            .send_http(&host, get("/big"), false, Priority::Default)
            .await
            .expect("sent");
        drop(resp);
        let resp = c
            .send_http(&host, get("/x"), false, Priority::Default)
            .await
            .expect("sent");
        assert_eq!(body_text(resp).await, "HTTP/1.1 - svc.local");
        assert_eq!(srv.accepts.load(Ordering::SeqCst), 2);
        // The abandoned connection is closed: only the second one stays active.
        eventually("abandoned connection closed", || {
            stat(&store, "upstream_cx_active") == 1.0
        })
        .await;
        assert_eq!(stat(&store, "upstream_cx_destroy"), 1.0);
    }

    #[tokio::test]
    async fn h1_connection_not_reused_when_request_body_unfinished() {
        let srv = server().await;
        let (c, _store) = cluster(srv.addr, UpstreamProtocol::Http1);
        let host = c.choose_host(&Default::default()).expect("host");
        // A request body that never ends; the server answers without reading it.
        let body = StreamBody::new(futures::stream::pending::<Result<Frame<Bytes>, BoxError>>())
            .boxed_unsync();
        let req = Request::builder()
            .method("POST")
            .uri("/early")
            .header(header::HOST, "svc.local")
            .body(body)
            .expect("request");
        let resp = c
            .send_http(&host, req, false, Priority::Default)
            .await
            .expect("sent");
        assert_eq!(body_text(resp).await, "early");
        let resp = c
            .send_http(&host, get("/x"), false, Priority::Default)
            .await
            .expect("sent");
        assert_eq!(body_text(resp).await, "HTTP/1.1 - svc.local");
        assert_eq!(srv.accepts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn h2_multiplexes_streams_on_one_connection() {
        let srv = server().await;
        let (c, store) = cluster(srv.addr, UpstreamProtocol::Http2(Http2Settings::default()));
        let host = c.choose_host(&Default::default()).expect("host");
        let resp = c
            .send_http(&host, get("/x"), false, Priority::Default)
            .await
            .expect("sent");
        // Authority from the Host header; no `host` header on the wire.
        assert_eq!(body_text(resp).await, "HTTP/2.0 svc.local -");
        let all = futures::future::join_all((0..10).map(|_| async {
            let resp = c
                .send_http(&host, get("/slow"), false, Priority::Default)
                .await
                .expect("sent");
            body_text(resp).await
        }))
        .await;
        assert!(all.iter().all(|b| b == "slow"));
        assert_eq!(srv.accepts.load(Ordering::SeqCst), 1);
        assert!(
            srv.max_inflight.load(Ordering::SeqCst) > 1,
            "streams overlapped"
        );
        assert_eq!(stat(&store, "upstream_cx_http2_total"), 1.0);
        assert_eq!(stat(&store, "upstream_cx_active"), 1.0);
    }

    #[tokio::test]
    async fn h2_burst_before_any_connection_opens_one() {
        let srv = server().await;
        let (c, store) = cluster(srv.addr, UpstreamProtocol::Http2(Http2Settings::default()));
        let host = c.choose_host(&Default::default()).expect("host");
        let all = futures::future::join_all((0..8).map(|_| async {
            let resp = c
                .send_http(&host, get("/slow"), false, Priority::Default)
                .await
                .expect("sent");
            body_text(resp).await
        }))
        .await;
        assert!(all.iter().all(|b| b == "slow"));
        assert_eq!(srv.accepts.load(Ordering::SeqCst), 1);
        assert_eq!(stat(&store, "upstream_cx_total"), 1.0);
    }

    #[tokio::test]
    async fn h2_connect_failure_is_shared_by_waiters() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        let (c, store) = cluster(addr, UpstreamProtocol::Http2(Http2Settings::default()));
        let host = c.choose_host(&Default::default()).expect("host");
        let (a, b) = futures::join!(
            c.send_http(&host, get("/x"), false, Priority::Default),
            c.send_http(&host, get("/x"), false, Priority::Default)
        );
        assert!(matches!(a, Err(UpstreamError::ConnectFailure(_))), "{a:?}");
        assert!(matches!(b, Err(UpstreamError::ConnectFailure(_))), "{b:?}");
        assert_eq!(stat(&store, "upstream_cx_connect_fail"), 1.0);
        // The failed connect is forgotten: the next request tries again.
        let e = c
            .send_http(&host, get("/x"), false, Priority::Default)
            .await;
        assert!(matches!(e, Err(UpstreamError::ConnectFailure(_))), "{e:?}");
        assert_eq!(stat(&store, "upstream_cx_connect_fail"), 2.0);
        assert_eq!(stat(&store, "upstream_cx_active"), 0.0);
    }

    #[tokio::test]
    async fn h2_max_concurrent_streams_opens_another_connection() {
        let srv = server().await;
        let s = Http2Settings {
            max_concurrent_streams: 1,
            ..Http2Settings::default()
        };
        let (c, _store) = cluster(srv.addr, UpstreamProtocol::Http2(s));
        let host = c.choose_host(&Default::default()).expect("host");
        let (a, b) = futures::join!(
            c.send_http(&host, get("/slow"), false, Priority::Default),
            c.send_http(&host, get("/slow"), false, Priority::Default)
        );
        let (a, b) = (a.expect("a"), b.expect("b"));
        assert_eq!(body_text(a).await, "slow");
        assert_eq!(body_text(b).await, "slow");
        assert_eq!(srv.accepts.load(Ordering::SeqCst), 2);
        // Both streams are done: the next request reuses a connection.
        let r = c
            .send_http(&host, get("/x"), false, Priority::Default)
            .await
            .expect("sent");
        body_text(r).await;
        assert_eq!(srv.accepts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn use_downstream_protocol_follows_downstream() {
        let srv = server().await;
        let (c, _store) = cluster(
            srv.addr,
            UpstreamProtocol::UseDownstream(Http2Settings::default()),
        );
        let host = c.choose_host(&Default::default()).expect("host");
        let r = c
            .send_http(&host, get("/x"), true, Priority::Default)
            .await
            .expect("sent");
        assert_eq!(body_text(r).await, "HTTP/2.0 svc.local -");
        let r = c
            .send_http(&host, get("/x"), false, Priority::Default)
            .await
            .expect("sent");
        assert_eq!(body_text(r).await, "HTTP/1.1 - svc.local");
    }

    #[tokio::test]
    async fn connect_refused_is_connect_failure() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        drop(l);
        let (c, store) = cluster(addr, UpstreamProtocol::Http1);
        let host = c.choose_host(&Default::default()).expect("host");
        let e = c
            .send_http(&host, get("/x"), false, Priority::Default)
            .await
            .expect_err("refused");
        assert!(matches!(e, UpstreamError::ConnectFailure(_)), "{e:?}");
        let e = c
            .connect_tcp(&host, Priority::Default)
            .await
            .expect_err("refused");
        assert!(matches!(e, UpstreamError::ConnectFailure(_)), "{e:?}");
        assert_eq!(stat(&store, "upstream_cx_connect_fail"), 2.0);
        assert_eq!(stat(&store, "upstream_cx_total"), 2.0);
        assert_eq!(stat(&store, "upstream_cx_active"), 0.0);
        assert_eq!(host.stats.cx_connect_fail.load(Ordering::Relaxed), 2);
        assert_eq!(host.stats.cx_active.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn connect_timeout_with_a_connector_that_never_answers() {
        let store = Store::new();
        let stats = ClusterStats::new(&store.cluster("c"));
        let host = Host::new(([127, 0, 0, 1], 1).into(), None, 1, 0, 0);
        let never = std::future::pending::<io::Result<()>>();
        let e = timed_connect(never, Duration::from_secs(5), &stats, &host)
            .await
            .expect_err("times out");
        assert!(matches!(e, UpstreamError::ConnectTimeout), "{e:?}");
        assert_eq!(stat(&store, "upstream_cx_connect_timeout"), 1.0);
        assert_eq!(stat(&store, "upstream_cx_connect_fail"), 1.0);
        assert_eq!(host.stats.cx_connect_fail.load(Ordering::Relaxed), 1);
        // A connector that answers in time is not affected.
        let ok = async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            Ok(7)
        };
        assert_eq!(
            timed_connect(ok, Duration::from_secs(5), &stats, &host)
                .await
                .expect("in time"),
            7
        );
    }

    #[tokio::test]
    async fn idle_connections_close_and_gauges_return_to_zero() {
        let srv = server().await;
        let store = Store::new();
        let (c, _) = cluster(srv.addr, UpstreamProtocol::Http1);
        let mut cfg = (*c.config).clone();
        cfg.idle_timeout = Some(Duration::from_millis(100));
        let c = Cluster::new(Arc::new(cfg.clone()), &store);
        let host = c.choose_host(&Default::default()).expect("host");
        let r = c
            .send_http(&host, get("/x"), false, Priority::Default)
            .await
            .expect("sent");
        body_text(r).await;
        assert_eq!(stat(&store, "upstream_cx_active"), 1.0);
        eventually("idle h1 connection closed", || {
            stat(&store, "upstream_cx_active") == 0.0
        })
        .await;
        assert_eq!(stat(&store, "upstream_cx_idle_timeout"), 1.0);
        assert_eq!(stat(&store, "upstream_cx_destroy"), 1.0);
        assert_eq!(host.stats.cx_active.load(Ordering::Relaxed), 0);
        // The next request opens a new connection.
        let r = c
            .send_http(&host, get("/x"), false, Priority::Default)
            .await
            .expect("sent");
        body_text(r).await;
        assert_eq!(srv.accepts.load(Ordering::SeqCst), 2);

        // Same for HTTP/2.
        cfg.name = "c2".into();
        cfg.protocol = UpstreamProtocol::Http2(Http2Settings::default());
        let c2 = Cluster::new(Arc::new(cfg), &store);
        let r = c2
            .send_http(&host, get("/x"), false, Priority::Default)
            .await
            .expect("sent");
        body_text(r).await;
        let active = || {
            store
                .render_text()
                .into_iter()
                .find(|(k, _)| k == "cluster.c2.upstream_cx_active")
                .map(|(_, v)| v)
        };
        assert_eq!(active().as_deref(), Some("1"));
        eventually("idle h2 connection closed", || {
            active().as_deref() == Some("0")
        })
        .await;
    }

    #[tokio::test]
    async fn connect_tcp_guard_tracks_active() {
        let srv = server().await;
        let (c, store) = cluster(srv.addr, UpstreamProtocol::Http1);
        let host = c.choose_host(&Default::default()).expect("host");
        let conn = c
            .connect_tcp(&host, Priority::Default)
            .await
            .expect("connects");
        assert!(conn.stream.tcp().nodelay().expect("nodelay"));
        assert_eq!(stat(&store, "upstream_cx_active"), 1.0);
        conn.guard.add_tx(10);
        drop(conn);
        assert_eq!(stat(&store, "upstream_cx_active"), 0.0);
        assert_eq!(stat(&store, "upstream_cx_tx_bytes_total"), 10.0);
        assert_eq!(host.stats.cx_active.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn server_closing_returns_gauge_to_zero() {
        let srv = server().await;
        let (c, store) = cluster(srv.addr, UpstreamProtocol::Http1);
        let host = c.choose_host(&Default::default()).expect("host");
        let mut req = get("/x");
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        let r = c
            .send_http(&host, req, false, Priority::Default)
            .await
            .expect("sent");
        body_text(r).await;
        eventually("closed connection counted", || {
            stat(&store, "upstream_cx_active") == 0.0
        })
        .await;
    }

    #[test]
    fn h2_framing() {
        let host = Host::new(([10, 0, 0, 1], 80).into(), None, 1, 0, 0);
        let mut req = Request::builder()
            .uri("/p?q=1")
            .header(header::HOST, "a.example:8080")
            .header(header::CONNECTION, "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header(header::TE, "gzip")
            .header("x-keep", "1")
            .body(empty())
            .expect("request");
        prepare_h2(&mut req, &host).expect("ok");
        assert_eq!(req.uri().to_string(), "http://a.example:8080/p?q=1");
        assert_eq!(req.version(), Version::HTTP_2);
        let names: Vec<_> = req.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-keep"]);
        // No Host header: the host's address is the authority.
        let mut req = Request::builder()
            .uri("/")
            .header(header::TE, "trailers")
            .body(empty())
            .expect("request");
        prepare_h2(&mut req, &host).expect("ok");
        assert_eq!(req.uri().to_string(), "http://10.0.0.1:80/");
        assert!(req.headers().contains_key(header::TE));
    }

    #[test]
    fn h1_framing() {
        let host = Host::new(([10, 0, 0, 1], 80).into(), Some("svc".into()), 1, 0, 0);
        let mut req = Request::builder()
            .uri("/p")
            .version(Version::HTTP_2)
            .body(empty())
            .expect("request");
        prepare_h1(&mut req, &host).expect("ok");
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers()[header::HOST], "svc:80");
        let mut req = Request::builder()
            .uri("http://abs:1/z?y")
            .header(header::HOST, "keep")
            .body(empty())
            .expect("request");
        prepare_h1(&mut req, &host).expect("ok");
        assert_eq!(req.uri().to_string(), "/z?y");
        assert_eq!(req.headers()[header::HOST], "keep");
    }
}
