//! The HTTP connection manager: serves one downstream connection with hyper (HTTP/1.1 and
//! HTTP/2, auto-detected or fixed by `codec_type`), applies limits and header sanitation,
//! runs the HTTP filters and the router ([`router`]), and renders local replies.
//!
//! Per request: validate framing -> normalize path -> sanitize headers (hop-by-hop, XFF,
//! request id) -> route (once) -> HTTP filters (`weir_filters::FilterChain::decode`, with the
//! matched route's per-filter config and rate limit actions; a filter may answer locally or
//! pause) -> 404 when no route -> forward (or direct response / redirect) -> filter response
//! hooks and body wrappers (also on local replies) -> response headers (server, service time,
//! mutations) -> body streamed through [`body::Timed`]. With no filters configured the chain
//! is skipped entirely.
//!
//! Observability: every request collects its response flags (local reply codes, `URX`, `DC`,
//! `DI`), upstream cluster and host in [`Observed`]. When the connection manager has access
//! logs or tracing, the trace context is continued or started before routing
//! ([`crate::trace`]), and at the end of the response body ([`DownstreamDone`]) one access log
//! line per logger ([`crate::access_log`]) and, when sampled, one span are emitted. Without
//! either, nothing is captured beyond a few words on the stack.
//!
//! Overload ([`crate::overload`]): per request, `disable_http_keepalive` turns keep-alive off
//! (HTTP/1 `Connection: close`, HTTP/2 GOAWAY) and `stop_accepting_requests` answers a local
//! 503 `envoy overloaded` (flag `OM`) before routing. `per_connection_buffer_limit_bytes` caps
//! hyper's HTTP/1 read buffer (with `max_request_headers_kb`) and the HTTP/2 stream window.

pub mod body;
pub mod h1_observer;
pub mod local_reply;
mod replay;
mod router;
pub mod sanitize;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, LOCATION, SERVER};
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::time::Instant;
use weir_filters::{ChainState, ConnectionState, LocalReply, StreamInfo};

use crate::access_log::{Flag, LogRecord, ResponseFlags};
use crate::config::hcm::{Codec, HcmConfig, ServerHeader};
use crate::listener::ConnInfo;
use crate::route::{HeaderContext, RouteAction, RouteMatch, RouteRequest};
use crate::server::ServerState;
use crate::stats::class_index;
use crate::trace::SpanContext;
use crate::upstream::{Cluster, UpstreamBody};
use body::{OnDone, Outcome, Timed};
use h1_observer::{Observer, Verdict, Verdicts};
use sanitize::Reject;

/// Per-connection state shared by the connection task and its request futures.
#[derive(Debug)]
struct Conn {
    cfg: Arc<HcmConfig>,
    info: ConnInfo,
    state: Arc<ServerState>,
    start: Instant,
    /// Requests whose response body has not finished yet.
    active: AtomicUsize,
    /// Milliseconds since `start` of the last request end (idle timer).
    last_activity_ms: AtomicU64,
    /// Requests seen (max_requests_per_connection).
    requests: AtomicU32,
    /// Asks the connection task to close gracefully.
    close: Notify,
    /// Whether the protocol counter for this connection was recorded.
    proto_counted: AtomicBool,
    /// Whether the connection speaks HTTP/2 (known from its first request).
    is_h2: AtomicBool,
    /// Per-request framing verdicts from the HTTP/1 observer, in request order.
    framing: Arc<Verdicts>,
    /// Per-connection HTTP filter state (per-connection rate limit buckets).
    filter_state: ConnectionState,
}

impl Conn {
    fn touch(&self) {
        self.last_activity_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Decrements `downstream_cx_active` when the connection ends.
struct CxGuard(Arc<HcmConfig>);

impl Drop for CxGuard {
    fn drop(&mut self) {
        self.0.stats.downstream_cx_active.decrement(1.0);
        self.0.stats.downstream_cx_destroy.increment(1);
    }
}

/// Serve one downstream connection until it closes, the drain completes or `hard_stop`.
pub async fn serve_connection<I>(
    io: I,
    cfg: Arc<HcmConfig>,
    info: ConnInfo,
    state: Arc<ServerState>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    cfg.stats.downstream_cx_total.increment(1);
    cfg.stats.downstream_cx_active.increment(1.0);
    let _guard = CxGuard(cfg.clone());
    let framing = Arc::new(Verdicts::default());
    let conn = Arc::new(Conn {
        cfg: cfg.clone(),
        info: info.clone(),
        state: state.clone(),
        start: Instant::now(),
        active: AtomicUsize::new(0),
        last_activity_ms: AtomicU64::new(0),
        requests: AtomicU32::new(0),
        close: Notify::new(),
        proto_counted: AtomicBool::new(false),
        is_h2: AtomicBool::new(false),
        framing: framing.clone(),
        filter_state: ConnectionState::default(),
    });
    let svc_conn = conn.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let c = svc_conn.clone();
        async move { Ok::<_, Infallible>(handle(req, c).await) }
    });

    let head_limit = cfg
        .max_request_headers_bytes
        .min(info.buffer_limit as usize)
        .max(8192);
    // HTTP/2 stream windows bound what a stream buffers (per_connection_buffer_limit_bytes,
    // not below the protocol's default window).
    let stream_window = cfg
        .http2
        .initial_stream_window_size
        .min(info.buffer_limit.max(65_535));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.request_headers_timeout)
        .max_headers(cfg.max_headers_count)
        // hyper's read buffer bounds the request head: past it hyper answers 431. The
        // listener's per_connection_buffer_limit_bytes caps it too (hyper's floor is 8 KiB).
        .max_buf_size(head_limit)
        .keep_alive(true)
        .half_close(false);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.http2.max_concurrent_streams)
        .initial_stream_window_size(stream_window)
        .initial_connection_window_size(cfg.http2.initial_connection_window_size)
        .max_header_list_size(cfg.max_request_headers_bytes as u32)
        .max_pending_accept_reset_streams(Some(50))
        .max_local_error_reset_streams(Some(100))
        .max_send_buf_size(info.buffer_limit.clamp(16 * 1024, 1 << 20) as usize);
    let builder = match cfg.codec {
        Codec::Auto => builder,
        Codec::Http1 => builder.http1_only(),
        Codec::Http2 => builder.http2_only(),
    };
    // hyper drops Content-Length when Transfer-Encoding is present; the observer sees the
    // raw request heads (it stops itself on the HTTP/2 preface with the auto codec).
    let max_buf = head_limit;
    let io = Observer::new(
        io,
        framing,
        max_buf + 4096,
        cfg.max_headers_count,
        cfg.codec != Codec::Http2,
    );
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(served);

    let mut closing = false;
    let mut drain_armed = false;
    let drain_grace = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(drain_grace);
    let idle = cfg.idle_timeout;
    let idle_sleep = tokio::time::sleep(idle.unwrap_or(Duration::from_secs(86_400)));
    tokio::pin!(idle_sleep);
    loop {
        tokio::select! {
            res = served.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(peer = %info.peer, error = %e, "downstream connection error");
                    if e.downcast_ref::<hyper::Error>().is_some_and(|h| h.is_parse() || h.is_parse_too_large()) {
                        cfg.stats.downstream_cx_protocol_error.increment(1);
                    }
                }
                break;
            }
            _ = info.drain.cancelled(), if !closing && !drain_armed => {
                cfg.stats.downstream_cx_drain_close.increment(1);
                if conn.is_h2.load(Ordering::Relaxed) || cfg.drain_timeout.is_zero() {
                    // HTTP/2: GOAWAY now; in-flight streams finish.
                    closing = true;
                    served.as_mut().graceful_shutdown();
                } else {
                    // HTTP/1: responses from now on carry `Connection: close` (a busy
                    // connection closes after its next response); an idle one is closed
                    // when `drain_timeout` ends, so a client that is about to reuse it is
                    // not raced by an immediate close.
                    drain_armed = true;
                    drain_grace.as_mut().reset(Instant::now() + cfg.drain_timeout);
                }
            }
            _ = &mut drain_grace, if drain_armed && !closing => {
                closing = true;
                served.as_mut().graceful_shutdown();
            }
            _ = conn.close.notified(), if !closing => {
                closing = true;
                served.as_mut().graceful_shutdown();
            }
            _ = &mut idle_sleep, if idle.is_some() && !closing => {
                let Some(idle) = idle else { continue };
                let last = Duration::from_millis(conn.last_activity_ms.load(Ordering::Relaxed));
                let since = conn.start.elapsed().saturating_sub(last);
                if conn.active.load(Ordering::SeqCst) == 0 && since >= idle {
                    tracing::debug!(peer = %info.peer, "connection idle timeout");
                    cfg.stats.downstream_cx_idle_timeout.increment(1);
                    closing = true;
                    served.as_mut().graceful_shutdown();
                } else {
                    idle_sleep.as_mut().reset(Instant::now() + idle.saturating_sub(since).max(Duration::from_millis(10)));
                }
            }
            _ = info.hard_stop.cancelled() => break,
        }
    }
}

/// Ends a downstream request: gauges, time histogram, connection idle bookkeeping, and the
/// access log lines and span of the request.
struct DownstreamDone {
    conn: Arc<Conn>,
    start: Instant,
    log: Option<Box<PendingLog>>,
}

/// What the request end needs to log it and record its span (owned: the request is gone).
struct PendingLog {
    start_time: SystemTime,
    method: http::Method,
    /// The request target as received (refcounted, not copied): `path` and `authority`.
    uri: http::Uri,
    /// The `Host` header, for the authority of an origin-form request.
    host_header: Option<HeaderValue>,
    protocol: &'static str,
    /// The request headers the access logs read.
    request_headers: Option<crate::access_log::KeptHeaders>,
    /// The response headers the access logs read.
    response_headers: Option<crate::access_log::KeptHeaders>,
    /// The response's `content-length`.
    content_length: Option<u64>,
    status: u16,
    details: Option<&'static str>,
    /// Explicit details of a local reply (RBAC's matched policy), over `details`.
    reply_details: Option<String>,
    flags: ResponseFlags,
    cluster: Option<Arc<Cluster>>,
    host: Option<std::net::SocketAddr>,
    downstream_remote: std::net::SocketAddr,
    response_duration: Option<Duration>,
    bytes_received: Option<Arc<AtomicU64>>,
    bytes_sent: Arc<AtomicU64>,
    route_name: Option<String>,
    is_health_check: bool,
    span: Option<SpanContext>,
    trace: TraceHeaders,
}

/// Request facts the span reports.
#[derive(Default)]
pub(crate) struct TraceHeaders {
    request_id: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
    tracestate: Option<HeaderValue>,
    /// `custom_tags` read from the request headers.
    tags: Vec<(String, String)>,
    /// The span name when not the operation's: `x-envoy-decorator-operation` (request on
    /// ingress, response on egress), else the route's decorator.
    name: Option<String>,
    /// Ingress with a propagating decorator: the value for the response's
    /// `x-envoy-decorator-operation`.
    respond_operation: Option<HeaderValue>,
    /// The trace header forms the caller used (upstream spans inject the same).
    pub(crate) seen: crate::trace::Seen,
}

const DECORATOR_OPERATION: http::HeaderName =
    crate::trace::context::names::X_ENVOY_DECORATOR_OPERATION;

/// Envoy's decorator propagation on the response: an ingress span's propagating decorator
/// tells the caller's client span its name; an egress span takes its name from the
/// upstream's response header (removed before the application sees it).
fn decorate_response(
    op: crate::trace::Operation,
    resp: &mut Response<UpstreamBody>,
    t: &mut TraceHeaders,
) {
    match op {
        crate::trace::Operation::Ingress => {
            if let Some(v) = t.respond_operation.take() {
                resp.headers_mut().insert(DECORATOR_OPERATION, v);
            }
        }
        crate::trace::Operation::Egress => {
            if let Some(v) = resp.headers_mut().remove(DECORATOR_OPERATION)
                && let Ok(v) = v.to_str()
                && !v.is_empty()
            {
                t.name = Some(v.to_string());
            }
        }
    }
}

/// The route's `decorator` under HCM tracing: names the span (unless the ingress request
/// already did) and, when it propagates, tells the other side (the upstream on egress, the
/// caller on ingress).
fn apply_decorator(
    op: crate::trace::Operation,
    d: &crate::route::Decorator,
    req: &mut http::request::Parts,
    t: &mut TraceHeaders,
) {
    if t.name.is_none() {
        t.name = Some(d.operation.to_string());
    }
    if d.propagate {
        match op {
            crate::trace::Operation::Egress => {
                req.headers.insert(DECORATOR_OPERATION, d.header.clone());
            }
            crate::trace::Operation::Ingress => t.respond_operation = Some(d.header.clone()),
        }
    }
}

fn hv(v: &Option<HeaderValue>) -> Option<&str> {
    v.as_ref().and_then(|v| v.to_str().ok())
}

impl PendingLog {
    /// The path and query as received (`/` when the target has none).
    fn path(&self) -> &str {
        self.uri.path_and_query().map_or("/", |p| p.as_str())
    }

    /// The authority as received: the absolute-form target's, else `Host` (or empty).
    fn authority(&self) -> &str {
        match self.uri.authority() {
            Some(a) => a.as_str(),
            None => hv(&self.host_header).unwrap_or(""),
        }
    }

    fn emit(self, conn: &Conn, start: Instant, outcome: Outcome) {
        let cfg = &conn.cfg;
        let mut flags = self.flags;
        let bytes_sent = self.bytes_sent.load(Ordering::Relaxed);
        // hyper drops a body whose Content-Length is fully written without polling its end:
        // only a short body is a downstream termination.
        let short = self.content_length.is_none_or(|len| bytes_sent < len);
        match outcome {
            Outcome::Dropped if short => flags.set(Flag::DownstreamConnectionTermination),
            Outcome::Error if flags.is_empty() => flags.set(Flag::UpstreamRemoteReset),
            _ => {}
        }
        let end = SystemTime::now();
        let duration = start.elapsed();
        let bytes_received = self
            .bytes_received
            .as_ref()
            .map_or(0, |b| b.load(Ordering::Relaxed));
        let mut hex = [0u8; 32];
        let trace_id = self
            .span
            .filter(|s| s.sampled)
            .map(|s| s.trace_id_hex_into(&mut hex));
        if !cfg.access_logs.is_empty() {
            let details = match (&self.reply_details, self.details) {
                (Some(d), _) => d.as_str(),
                (None, Some(d)) => crate::access_log::flags::local_reply_details(d),
                (None, None) if self.status != 0 => "via_upstream",
                (None, None) => "-",
            };
            let rec = LogRecord {
                start_time: self.start_time,
                request_headers: self.request_headers.as_ref().map(|h| h.view()),
                method: Some(&self.method),
                path: Some(self.path()),
                authority: Some(self.authority()),
                scheme: Some("http"),
                response_headers: self.response_headers.as_ref().map(|h| h.view()),
                response_trailers: None,
                protocol: Some(self.protocol),
                response_code: self.status,
                response_code_details: Some(details),
                flags,
                bytes_received,
                bytes_sent,
                duration: Some(duration),
                response_duration: self.response_duration,
                upstream_host: self.host,
                upstream_cluster: self.cluster.as_ref().map(|c| c.name()),
                upstream_local: None,
                upstream_failure_reason: None,
                downstream_remote: Some(self.downstream_remote),
                downstream_local: Some(conn.info.local),
                tls: conn.info.tls.as_deref(),
                trace_id,
                route_name: self.route_name.as_deref(),
                is_health_check: self.is_health_check,
            };
            cfg.access_logs.log(&rec);
        }
        if let (Some(tc), Some(sc)) = (&cfg.tracing, self.span)
            && sc.sampled
            && tc.provider.is_some()
        {
            let snap = conn.state.snapshot.load();
            let tls = conn.info.tls.as_deref();
            let peer = tls.and_then(|t| t.peer.as_ref());
            let facts = crate::trace::SpanFacts {
                ctx: sc,
                name: self.trace.name.as_deref().unwrap_or(tc.operation.name()),
                kind: tc.operation.kind(),
                tags: &self.trace.tags,
                tracestate: hv(&self.trace.tracestate),
                start: self.start_time,
                end,
                authority: self.authority(),
                path: self.path(),
                method: self.method.as_str(),
                scheme: "http",
                protocol: self.protocol,
                status: self.status,
                flags,
                upstream_cluster: self.cluster.as_ref().map(|c| c.name()),
                upstream_host: self.host,
                request_id: hv(&self.trace.request_id),
                user_agent: hv(&self.trace.user_agent),
                peer_address: crate::trace::PeerAddress::Ip(self.downstream_remote.ip()),
                peer_uri_san: peer
                    .filter(|p| !p.uri_sans.is_empty())
                    .map(|p| p.uri_sans.join(",")),
                peer_subject: peer.map(|p| p.subject.as_str()).filter(|s| !s.is_empty()),
                node_id: &snap.node.id,
                request_size: bytes_received,
                response_size: bytes_sent,
            };
            tc.record(tc.encode_span(&facts), &conn.state.clusters);
        }
    }
}

impl OnDone for DownstreamDone {
    fn done(&mut self, outcome: Outcome) {
        if let Some(p) = self.log.take() {
            p.emit(&self.conn, self.start, outcome);
        }
        let s = &self.conn.cfg.stats;
        s.downstream_rq_active.decrement(1.0);
        s.downstream_rq_time
            .record(self.start.elapsed().as_secs_f64() * 1000.0);
        match outcome {
            Outcome::Dropped => s.downstream_rq_rx_reset.increment(1),
            Outcome::Error => s.downstream_rq_tx_reset.increment(1),
            Outcome::Complete => {}
        }
        self.conn.active.fetch_sub(1, Ordering::SeqCst);
        self.conn.touch();
    }
}

/// What the request learned on its way, for access logs and spans.
#[derive(Default)]
pub(crate) struct Observed {
    /// Response flags so far.
    pub(crate) flags: ResponseFlags,
    /// The local reply code (`NR`, `UH`, ...) when weir answered itself.
    pub(crate) details: Option<&'static str>,
    /// A local reply's explicit details (`LocalReply::details`).
    pub(crate) reply_details: Option<String>,
    /// The upstream cluster chosen.
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// The upstream host of the last attempt.
    pub(crate) host: Option<std::net::SocketAddr>,
    /// When response headers were ready.
    pub(crate) response_at: Option<Instant>,
    /// Request body bytes (counted only when observed).
    pub(crate) bytes_received: Option<Arc<AtomicU64>>,
    /// The trace span of the request (HCM `tracing`).
    pub(crate) span: Option<SpanContext>,
    /// Request headers as routed (access logs reading `%REQ%` or header filters).
    request_headers: Option<crate::access_log::KeptHeaders>,
    pub(crate) trace: TraceHeaders,
    route_name: Option<String>,
    is_health_check: bool,
}

impl Observed {
    /// Record a local reply's flag.
    fn local_reply(&mut self, reply: &LocalReply) {
        self.flags.set_code(reply.flag);
        self.details = Some(reply.flag);
        self.reply_details = reply.details.clone();
    }
}

/// What a request handler needs beyond the request.
pub(crate) struct Stream<'a> {
    conn: &'a Arc<Conn>,
    is_grpc: bool,
    h2: bool,
    start: Instant,
    hctx: HeaderContext,
    /// Close the HTTP/1 connection after this response.
    close: bool,
    /// Observability facts.
    pub(crate) obs: Observed,
}

async fn handle(req: Request<Incoming>, conn: Arc<Conn>) -> Response<UpstreamBody> {
    let start = Instant::now();
    let cfg = conn.cfg.clone();
    let s = &cfg.stats;
    conn.active.fetch_add(1, Ordering::SeqCst);
    s.downstream_rq_total.increment(1);
    s.downstream_rq_active.increment(1.0);
    let h2 = req.version() == Version::HTTP_2;
    if h2 {
        s.downstream_rq_http2_total.increment(1)
    } else {
        s.downstream_rq_http1_total.increment(1)
    }
    if !conn.proto_counted.swap(true, Ordering::Relaxed) {
        if h2 {
            s.downstream_cx_http2_total.increment(1)
        } else {
            s.downstream_cx_http1_total.increment(1)
        }
    }
    let observe = !cfg.access_logs.is_empty() || cfg.tracing.is_some();
    // The request head as received, kept by refcount (no copies of path or authority).
    let head = observe.then(|| {
        let host = match req.uri().authority() {
            Some(_) => None,
            None => req.headers().get(HOST).cloned(),
        };
        (
            SystemTime::now(),
            req.method().clone(),
            req.uri().clone(),
            host,
        )
    });
    let mut done = DownstreamDone {
        conn: conn.clone(),
        start,
        log: None,
    };
    if h2 {
        conn.is_h2.store(true, Ordering::Relaxed);
    }
    let n = conn.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let mut close = false;
    if cfg.max_requests_per_connection.is_some_and(|max| n >= max) {
        close = !h2;
        conn.close.notify_one();
    }
    // Overload manager (crate::overload): keep-alive off (HTTP/1 `Connection: close`, HTTP/2
    // GOAWAY), then shedding below.
    let overload = &conn.state.overload;
    if !close && overload.disable_keepalive() {
        s.downstream_cx_overload_disable_keepalive.increment(1);
        close = !h2;
        conn.close.notify_one();
    }
    let is_grpc = req
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let mut st = Stream {
        conn: &conn,
        is_grpc,
        h2,
        start,
        hctx: HeaderContext {
            downstream_remote: conn.info.peer,
            downstream_local: conn.info.local,
            protocol: if h2 {
                "HTTP/2"
            } else if req.version() == Version::HTTP_10 {
                "HTTP/1.0"
            } else {
                "HTTP/1.1"
            },
        },
        close,
        obs: Observed {
            bytes_received: observe.then(|| Arc::new(AtomicU64::new(0))),
            ..Default::default()
        },
    };
    let framing = if h2 {
        Verdict::Clean
    } else {
        conn.framing.pop()
    };
    let (mut parts, body) = req.into_parts();
    let processed = if overload.shed_request() {
        s.downstream_rq_overload_close.increment(1);
        Err(LocalReply::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "envoy overloaded",
            "OM",
        ))
    } else {
        process(&mut parts, body, &mut st, framing).await
    };
    let resp = match processed {
        Ok(r) => r,
        Err(reply) => {
            st.obs.local_reply(&reply);
            let close = st.close || (!h2 && reply.status == StatusCode::BAD_REQUEST);
            local_reply::render(reply, st.is_grpc, close)
        }
    };
    let mut resp = resp;
    if let Some(tc) = &cfg.tracing {
        decorate_response(tc.operation, &mut resp, &mut st.obs.trace);
    }
    let bytes_sent = head.map(|(start_time, method, uri, host_header)| {
        let sent = Arc::new(AtomicU64::new(0));
        let o = std::mem::take(&mut st.obs);
        done.log = Some(Box::new(PendingLog {
            start_time,
            method,
            uri,
            host_header,
            protocol: st.hctx.protocol,
            request_headers: o.request_headers,
            response_headers: cfg.access_logs.response_headers().capture(resp.headers()),
            content_length: resp
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok()),
            status: resp.status().as_u16(),
            details: o.details,
            reply_details: o.reply_details,
            flags: o.flags,
            cluster: o.cluster,
            host: o.host,
            downstream_remote: st.hctx.downstream_remote,
            response_duration: Some(o.response_at.unwrap_or_else(Instant::now) - start),
            bytes_received: o.bytes_received,
            bytes_sent: sent.clone(),
            route_name: o.route_name,
            is_health_check: o.is_health_check,
            span: o.span,
            trace: o.trace,
        }));
        sent
    });
    finish(resp, &st, done, bytes_sent)
}

/// Response headers common to every response, status stats, body wrapping.
fn finish(
    mut resp: Response<UpstreamBody>,
    st: &Stream<'_>,
    done: DownstreamDone,
    bytes_sent: Option<Arc<AtomicU64>>,
) -> Response<UpstreamBody> {
    let cfg = &st.conn.cfg;
    cfg.stats.downstream_rq_xx[class_index(resp.status().as_u16())].increment(1);
    match cfg.server_header {
        ServerHeader::Overwrite => {
            resp.headers_mut().insert(SERVER, cfg.server_name.clone());
        }
        ServerHeader::AppendIfAbsent => {
            if !resp.headers().contains_key(SERVER) {
                resp.headers_mut().insert(SERVER, cfg.server_name.clone());
            }
        }
        ServerHeader::PassThrough => {}
    }
    // A draining listener: HTTP/1 responses close their connection (see `drain_timeout`).
    let close = st.close || st.conn.info.drain.is_cancelled();
    if close && !st.h2 {
        resp.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    let (parts, body) = resp.into_parts();
    let body = Timed::new(body, done)
        .idle(cfg.stream_idle_timeout)
        .count(bytes_sent);
    Response::from_parts(parts, body.boxed_unsync())
}

async fn process(
    req: &mut http::request::Parts,
    body: Incoming,
    st: &mut Stream<'_>,
    framing: Verdict,
) -> Result<Response<UpstreamBody>, LocalReply> {
    let cfg = st.conn.cfg.clone();
    let bad = |m: &'static str| LocalReply::new(StatusCode::BAD_REQUEST, format!("{m}\n"), "DPE");
    // hyper hides Content-Length when Transfer-Encoding is present; the observer saw it.
    // A request it did not observe (only after an Upgrade/CONNECT that was not switched, or
    // framing it could not follow) cannot prove the absence of Content-Length.
    let smuggle = match framing {
        Verdict::ClAndTe => Some("content-length with transfer-encoding"),
        Verdict::Unobserved if req.headers.contains_key(http::header::TRANSFER_ENCODING) => {
            Some("unobserved transfer-encoding")
        }
        Verdict::Clean | Verdict::Unobserved => None,
    };
    if let Some(m) = smuggle {
        cfg.stats.downstream_cx_protocol_error.increment(1);
        st.close = true;
        return Err(bad(m));
    }
    let checked = sanitize::check_framing(req.version, &req.method, &req.headers)
        .and_then(|_| sanitize::check_headers(&cfg, &mut req.headers));
    match checked {
        Ok(()) => {}
        Err(Reject::BadRequest(m)) => {
            st.close = true;
            return Err(bad(m));
        }
        Err(Reject::TooManyHeaders) => {
            st.close = true;
            return Err(LocalReply::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "",
                "DPE",
            ));
        }
        Err(Reject::Redirect(_)) => {}
    }
    // CONNECT (authority-form target) only where the connection manager allows it.
    let connect = req.method == http::Method::CONNECT;
    if connect && (!cfg.connect || req.uri.authority().is_none()) {
        st.close = true;
        return Err(bad(if cfg.connect {
            "CONNECT without authority"
        } else {
            "CONNECT is not configured"
        }));
    }
    let path = if connect {
        // No path to normalize; only `connect_matcher` routes match CONNECT.
        String::new()
    } else {
        let pq = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        match sanitize::normalize(&cfg, &req.method, pq) {
            Ok(p) => p,
            Err(Reject::Redirect(to)) => {
                let mut r = Response::new(local_reply::full(Bytes::new()));
                *r.status_mut() = StatusCode::TEMPORARY_REDIRECT;
                if let Ok(v) = HeaderValue::from_str(&to) {
                    r.headers_mut().insert(LOCATION, v);
                }
                return Ok(r);
            }
            Err(Reject::BadRequest(m)) => {
                st.close = true;
                return Err(bad(m));
            }
            Err(Reject::TooManyHeaders) => return Err(bad("too many headers")),
        }
    };

    // Authority: absolute-form URI (and :authority on h2) wins over Host.
    let mut authority = match req.uri.authority() {
        Some(a) => a.as_str().to_string(),
        None => req
            .headers
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string(),
    };
    if cfg.strip_matching_host_port
        && let Some((h, p)) = authority.rsplit_once(':')
        && p.parse::<u16>().ok() == Some(st.conn.info.local.port())
    {
        authority = h.to_string();
    }

    let ws = !connect && router::is_websocket_upgrade(req);
    if ws && !cfg.websocket {
        cfg.stats.downstream_rq_ws_on_non_ws_route.increment(1);
        return Err(LocalReply::new(StatusCode::FORBIDDEN, "", "UAEX"));
    }
    sanitize::strip_hop_by_hop(&mut req.headers, ws);
    let tls = st.conn.info.tls.as_deref();
    let scheme = if tls.is_some_and(|t| t.terminated) {
        "https"
    } else {
        "http"
    };
    let fwd = sanitize::forwarded_headers(&cfg, &mut req.headers, st.conn.info.peer, scheme);
    sanitize::client_cert_header(&cfg.xfcc, &mut req.headers, tls);
    st.hctx.downstream_remote =
        std::net::SocketAddr::new(fwd.remote, st.hctx.downstream_remote.port());

    let request_id = req.headers.get(sanitize::X_REQUEST_ID).cloned();
    if st.obs.bytes_received.is_some() {
        observe_request(req, st, &cfg);
    }
    // Route once, before the filters (Envoy's route cache); filters see the result.
    let routes = cfg.routes.load();
    let route = routes.route(&RouteRequest {
        authority: &authority,
        path: &path,
        method: &req.method,
        headers: &req.headers,
        scheme: "http",
    });
    if st.obs.bytes_received.is_some()
        && let Some(m) = &route
    {
        let name = m.filter_view().route_name;
        if !name.is_empty() {
            st.obs.route_name = Some(name.to_string());
        }
        if let (Some(tc), Some(d)) = (&cfg.tracing, m.decorator()) {
            apply_decorator(tc.operation, d, req, &mut st.obs.trace);
        }
    }
    let target = Target {
        authority: &authority,
        path: &path,
        ws,
        connect,
        request_id,
    };
    let chain = &cfg.http_filters;
    if chain.is_empty() {
        let Some(m) = route else {
            cfg.stats.no_route.increment(1);
            return Err(LocalReply::new(StatusCode::NOT_FOUND, "", "NR"));
        };
        return respond(req, body, st, m, &target).await;
    }

    // HTTP filters (the router is implicit and last).
    let conn = st.conn.clone();
    let info = StreamInfo::new(
        st.hctx.downstream_remote,
        conn.info.local,
        Arc::as_ptr(&conn) as usize as u64,
        st.is_grpc,
        &authority,
        &path,
        "http",
        route.map(|m| m.filter_view()),
        conn.state.as_ref(),
        &conn.filter_state,
        rand::random(),
    )
    .with_tls(conn.info.tls.as_deref())
    .with_direct_remote(conn.info.direct_peer)
    .with_source_remote(conn.info.peer);
    let mut fstate = ChainState::default();
    let resp = match chain.decode(req, &info, &mut fstate).await {
        Err(reply) => render_local(reply, st),
        Ok(()) => match route {
            None => {
                cfg.stats.no_route.increment(1);
                render_local(LocalReply::new(StatusCode::NOT_FOUND, "", "NR"), st)
            }
            Some(m) => match respond(req, body, st, m, &target).await {
                Ok(r) => r,
                Err(reply) => render_local(reply, st),
            },
        },
    };
    let resp = chain.encode(resp, &info, &mut fstate);
    let marks = info.marks();
    if marks & weir_filters::chain::marks::DELAY_INJECTED != 0 {
        st.obs.flags.set(Flag::DelayInjected);
    }
    st.obs.is_health_check = marks & weir_filters::chain::marks::HEALTH_CHECK != 0;
    Ok(resp)
}

/// Tracing (continue or start the trace, inject the upstream headers) and the request facts
/// access logs and spans read. Runs only when the connection manager observes requests.
fn observe_request(req: &mut http::request::Parts, st: &mut Stream<'_>, cfg: &HcmConfig) {
    if let Some(tc) = &cfg.tracing {
        use crate::trace::context::names;
        let (parent, seen, lone) = crate::trace::context::read(&req.headers);
        // `x-envoy-force-trace` survives sanitizing only on internal requests.
        let force = req.headers.contains_key(names::X_ENVOY_FORCE_TRACE);
        let client = req.headers.contains_key(names::X_CLIENT_TRACE_ID);
        let decision = tc
            .sampling
            .decide(force, client, (rand::random(), rand::random()));
        let sc = SpanContext::new(parent, lone, decision, (rand::random(), rand::random()));
        sc.inject(&mut req.headers, seen);
        st.obs.span = Some(sc);
        // Ingress: the caller's client span named this server span (the header survives
        // sanitizing only on internal requests).
        let name = match tc.operation {
            crate::trace::Operation::Ingress => req
                .headers
                .remove(DECORATOR_OPERATION)
                .and_then(|v| v.to_str().ok().filter(|v| !v.is_empty()).map(String::from)),
            crate::trace::Operation::Egress => None,
        };
        st.obs.trace = TraceHeaders {
            request_id: req.headers.get(sanitize::X_REQUEST_ID).cloned(),
            user_agent: req.headers.get(http::header::USER_AGENT).cloned(),
            tracestate: req.headers.get(names::TRACESTATE).cloned(),
            tags: tc.header_tags(&req.headers),
            name,
            respond_operation: None,
            seen,
        };
    }
    st.obs.request_headers = cfg.access_logs.request_headers().capture(&req.headers);
}

/// What `respond` needs besides the route.
struct Target<'a> {
    authority: &'a str,
    path: &'a str,
    ws: bool,
    connect: bool,
    request_id: Option<HeaderValue>,
}

/// Render a local reply as `handle` does (HTTP/1 400s close the connection).
fn render_local(reply: LocalReply, st: &mut Stream<'_>) -> Response<UpstreamBody> {
    st.obs.local_reply(&reply);
    let close = st.close || (!st.h2 && reply.status == StatusCode::BAD_REQUEST);
    local_reply::render(reply, st.is_grpc, close)
}

/// The route's action: direct response, redirect, or the router; then the route's response
/// header mutations.
async fn respond(
    req: &mut http::request::Parts,
    body: Incoming,
    st: &mut Stream<'_>,
    m: RouteMatch<'_>,
    t: &Target<'_>,
) -> Result<Response<UpstreamBody>, LocalReply> {
    let cfg = st.conn.cfg.clone();
    let bad = |m: &'static str| LocalReply::new(StatusCode::BAD_REQUEST, format!("{m}\n"), "DPE");
    let (authority, path) = (t.authority, t.path);
    let mut resp = match m.action() {
        RouteAction::Direct(d) => {
            cfg.stats.rq_direct_response.increment(1);
            st.obs.details = Some("direct_response");
            let body = d.body.clone().unwrap_or_default();
            let len = body.len();
            let mut r = Response::new(local_reply::full(body));
            *r.status_mut() = d.status;
            if len > 0 {
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
            r
        }
        RouteAction::Redirect(_) => {
            cfg.stats.rq_redirect.increment(1);
            let rreq = RouteRequest {
                authority,
                path,
                method: &req.method,
                headers: &req.headers,
                scheme: "http",
            };
            let (status, location) = m
                .redirect(&rreq)
                .unwrap_or((StatusCode::MOVED_PERMANENTLY, path.to_string()));
            let mut r = Response::new(local_reply::full(Bytes::new()));
            *r.status_mut() = status;
            match HeaderValue::from_str(&location) {
                Ok(v) => {
                    r.headers_mut().insert(LOCATION, v);
                }
                Err(_) => return Err(bad("invalid redirect location")),
            }
            r
        }
        RouteAction::Forward(f) if t.connect => router::connect(req, st, f).await?,
        RouteAction::Forward(f) => {
            router::forward(req, body, st, &m, f, authority, path, t.ws).await?
        }
    };
    st.obs.response_at = Some(Instant::now());
    m.apply_response_headers(resp.headers_mut(), &st.hctx);
    if cfg.always_set_request_id_in_response
        && let Some(id) = &t.request_id
    {
        resp.headers_mut()
            .insert(sanitize::X_REQUEST_ID, id.clone());
    }
    Ok(resp)
}

/// What filters read of the server: health (`/healthcheck/fail`, draining) and cluster health.
impl weir_filters::ServerInfo for ServerState {
    fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst) && !self.draining.is_cancelled()
    }

    fn cluster_health(&self, name: &str) -> Option<(usize, usize)> {
        let c = self.clusters.get(name)?;
        let hosts = c.hosts();
        Some((hosts.iter().filter(|h| h.is_healthy()).count(), hosts.len()))
    }

    fn upstream_fetch(&self) -> Option<Arc<dyn weir_filters::fetch::UpstreamFetch>> {
        Some(crate::upstream::fetch::fetcher(&self.clusters))
    }
}
