//! The router (`envoy.filters.http.router`): cluster selection, host selection, upstream
//! request construction, the route timeout, upstream failure -> local reply mapping,
//! WebSocket upgrades and CONNECT termination (TCP tunnels).
//!
//! For access logs and spans it records the chosen cluster and host and the `URX` flag (retries
//! exhausted) in the stream's [`super::Observed`]; local replies carry their own flag.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, HOST, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use weir_filters::LocalReply;

use crate::access_log::Flag;

use super::Stream;
use super::body::{OnDone, Outcome, Timed, TimerError};
use super::local_reply;
use super::replay::Replay;
use crate::route::retry::{AttemptError, RetryOn, RetryPolicy};
use crate::route::{ForwardAction, RouteMatch};
use crate::stats::class_index;
use crate::upstream::circuit::Priority;
use crate::upstream::{
    BoxError, Cluster, Host, HostResult, LbContext, UpstreamBody, UpstreamError,
};

/// Envoy's local reply body for upstream failures before response headers.
fn upstream_failure(reason: &str) -> String {
    format!("upstream connect error or disconnect/reset before headers. reset reason: {reason}")
}

/// `Connection: upgrade` + `Upgrade: websocket` on HTTP/1.1.
pub(super) fn is_websocket_upgrade(req: &http::request::Parts) -> bool {
    req.version == Version::HTTP_11
        && req
            .headers
            .get(UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && req.headers.get_all(CONNECTION).iter().any(|v| {
            v.to_str()
                .map(|s| {
                    s.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
                })
                .unwrap_or(false)
        })
}

/// Ends an upstream request: cluster/host gauges and the request time histogram.
/// The `rq_active` gauges (and the request's circuit-breaker slot, so `max_requests` counts
/// a request until its response body ends, as Envoy's does) are released exactly once: by
/// `done`, or on drop (a request that failed before its response, or a tunnel that ended).
struct UpstreamDone {
    cluster: Arc<Cluster>,
    host: Arc<Host>,
    start: Instant,
    open: bool,
    slot: Option<crate::upstream::circuit::ResourceGuard>,
}

impl UpstreamDone {
    fn new(cluster: Arc<Cluster>, host: Arc<Host>, start: Instant) -> Self {
        Self {
            cluster,
            host,
            start,
            open: true,
            slot: None,
        }
    }

    fn release(&mut self) {
        self.slot = None;
        if std::mem::replace(&mut self.open, false) {
            self.cluster.stats().upstream_rq_active.decrement(1.0);
            self.host.stats.rq_active.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The request never reached the upstream (connect failed): only undo the gauges.
    fn abort(self) {
        drop(self);
    }
}

impl Drop for UpstreamDone {
    fn drop(&mut self) {
        self.release();
    }
}

impl OnDone for UpstreamDone {
    fn done(&mut self, outcome: Outcome) {
        self.release();
        let s = self.cluster.stats();
        if outcome == Outcome::Complete {
            s.upstream_rq_completed.increment(1);
            s.upstream_rq_time
                .record(self.start.elapsed().as_secs_f64() * 1000.0);
        } else if outcome == Outcome::Error {
            // The upstream response failed mid-body (reset, timeout).
            s.upstream_rq_rx_reset.increment(1);
        } else {
            // The downstream went away: weir resets the upstream request.
            s.upstream_rq_tx_reset.increment(1);
        }
    }
}

/// Counts a response code for the cluster and host (Envoy's `chargeUpstreamCode`).
fn charge(cluster: &Cluster, host: &Host, status: u16) {
    cluster.stats().upstream_rq_xx[class_index(status)].increment(1);
    if status >= 500 {
        host.stats.rq_error.fetch_add(1, Ordering::Relaxed);
    } else {
        host.stats.rq_success.fetch_add(1, Ordering::Relaxed);
    }
}

/// The route's cluster: fixed, weighted or from a header.
// LocalReply is the error of every handler in this module (the async ones escape the lint).
#[allow(clippy::result_large_err)]
fn pick_cluster(
    headers: &http::HeaderMap,
    st: &Stream<'_>,
    f: &ForwardAction,
) -> Result<Arc<Cluster>, LocalReply> {
    let cfg = &st.conn.cfg;
    let Some(name) = f.select_cluster(headers, rand::random::<u64>()) else {
        cfg.stats.no_cluster.increment(1);
        return Err(LocalReply::new(StatusCode::SERVICE_UNAVAILABLE, "", "NC"));
    };
    let Some(cluster) = st.conn.state.clusters.get(&name) else {
        cfg.stats.no_cluster.increment(1);
        return Err(LocalReply::new(StatusCode::SERVICE_UNAVAILABLE, "", "NC"));
    };
    Ok(cluster)
}

fn no_healthy_upstream() -> LocalReply {
    LocalReply::new(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream", "UH")
}

/// The route's cluster and a host of it.
#[allow(clippy::result_large_err)]
fn pick_host(
    headers: &http::HeaderMap,
    st: &Stream<'_>,
    f: &ForwardAction,
) -> Result<(Arc<Cluster>, Arc<Host>), LocalReply> {
    let cluster = pick_cluster(headers, st, f)?;
    // CONNECT has no path or query; a generated affinity cookie cannot be sent on a tunnel.
    let hash = f.hash(headers, None, st.hctx.downstream_remote.ip());
    let host = cluster
        .choose_host(&LbContext {
            hash: hash.hash,
            original_dst: st.conn.info.local_restored.then_some(st.conn.info.local),
            headers: Some(headers),
            ..Default::default()
        })
        .ok_or_else(no_healthy_upstream)?;
    Ok((cluster, host))
}

/// 503 `UO` with `x-envoy-overloaded: true` (unless Envoy headers are suppressed).
fn overloaded(suppress_envoy_headers: bool) -> LocalReply {
    let mut r = LocalReply::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream connect error or disconnect/reset before headers. reset reason: overflow",
        "UO",
    );
    if !suppress_envoy_headers {
        r.headers
            .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    }
    r
}

/// A millisecond count from a trusted `x-envoy-*` request header (removed).
fn take_ms(headers: &mut http::HeaderMap, name: &str) -> Option<u64> {
    headers
        .remove(name)
        .and_then(|v| v.to_str().ok().and_then(|s| s.trim().parse().ok()))
}

/// The retry settings of one request: the route's policy with the trusted request headers
/// (`x-envoy-retry-on`, `x-envoy-retry-grpc-on`, `x-envoy-max-retries`,
/// `x-envoy-retriable-status-codes`, `x-envoy-retriable-header-names`) applied. External
/// clients cannot set these: the connection manager strips `x-envoy-*` from them.
struct RetryState<'a> {
    policy: Option<&'a RetryPolicy>,
    on: RetryOn,
    max: u32,
    codes: Vec<u16>,
    header_names: Vec<http::HeaderName>,
}

static DEFAULT_POLICY: std::sync::LazyLock<RetryPolicy> =
    std::sync::LazyLock::new(RetryPolicy::default);

impl<'a> RetryState<'a> {
    fn new(policy: Option<&'a RetryPolicy>, headers: &mut http::HeaderMap) -> Self {
        let mut on = policy.map(|p| p.retry_on).unwrap_or_default();
        let mut from_headers = false;
        for name in ["x-envoy-retry-on", "x-envoy-retry-grpc-on"] {
            if let Some(v) = headers.remove(name)
                && let Ok(v) = v.to_str()
            {
                on = on | RetryOn::parse(v).0;
                from_headers = true;
            }
        }
        let mut max = policy.map_or(1, |p| p.num_retries);
        if let Some(n) = headers
            .remove("x-envoy-max-retries")
            .and_then(|v| v.to_str().ok().and_then(|s| s.trim().parse().ok()))
        {
            max = n;
        }
        let codes = headers
            .remove("x-envoy-retriable-status-codes")
            .and_then(|v| v.to_str().ok().map(str::to_string))
            .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
            .unwrap_or_default();
        let header_names = headers
            .remove("x-envoy-retriable-header-names")
            .and_then(|v| v.to_str().ok().map(str::to_string))
            .map(|v| {
                v.split(',')
                    .filter_map(|n| http::HeaderName::from_bytes(n.trim().as_bytes()).ok())
                    .collect()
            })
            .unwrap_or_default();
        let policy = match policy {
            Some(p) => Some(p),
            None if from_headers => Some(&*DEFAULT_POLICY),
            None => None,
        };
        Self {
            policy,
            on,
            max: if policy.is_some() && !on.is_empty() {
                max
            } else {
                0
            },
            codes,
            header_names,
        }
    }

    fn enabled(&self) -> bool {
        self.max > 0
    }

    fn status(&self, status: u16, headers: &http::HeaderMap) -> bool {
        self.policy.is_some_and(|p| {
            p.retry_status(self.on, status, headers, &self.codes, &self.header_names)
        })
    }

    fn error(&self, e: AttemptError) -> bool {
        self.policy.is_some() && RetryPolicy::retry_error(self.on, e)
    }
}

/// `host` with `-shadow` appended to the host name (before any port), as Envoy names mirrored
/// requests.
fn shadow_host(host: &str) -> String {
    let port_at = if host.starts_with('[') {
        host.find("]:").map(|i| i + 1)
    } else if host.matches(':').count() == 1 {
        host.find(':')
    } else {
        None
    };
    match port_at {
        Some(i) => format!("{}-shadow{}", &host[..i], &host[i..]),
        None => format!("{host}-shadow"),
    }
}

/// Fire-and-forget a copy of the request to a mirror cluster; its response is read and
/// dropped. It never affects the primary request: a missing cluster, no healthy host, an open
/// breaker or a slow mirror only end the shadow.
fn spawn_mirror(
    st: &Stream<'_>,
    cluster_name: &str,
    keep_host: bool,
    head: (&http::Method, &Uri, &http::HeaderMap),
    body: UpstreamBody,
    deadline: Option<Instant>,
) {
    let Some(cluster) = st.conn.state.clusters.get(cluster_name) else {
        tracing::debug!(cluster = cluster_name, "mirror cluster not found");
        return;
    };
    let mut headers = head.2.clone();
    if !keep_host
        && let Some(h) = headers.get(HOST).and_then(|v| v.to_str().ok())
        && let Ok(v) = HeaderValue::from_str(&shadow_host(h))
    {
        headers.insert(HOST, v);
    }
    let mut up = Request::new(body);
    *up.method_mut() = head.0.clone();
    *up.uri_mut() = head.1.clone();
    *up.headers_mut() = headers;
    let h2 = st.h2;
    tokio::spawn(async move {
        let Some(host) = cluster.choose_host(&LbContext::default()) else {
            return;
        };
        let rm = cluster.resources(Priority::Default);
        let Some(_rq) = rm.requests.try_acquire() else {
            cluster.stats().upstream_rq_pending_overflow.increment(1);
            return;
        };
        let cs = cluster.stats();
        cs.upstream_rq_total.increment(1);
        cs.upstream_rq_active.increment(1.0);
        host.stats.rq_total.fetch_add(1, Ordering::Relaxed);
        host.stats.rq_active.fetch_add(1, Ordering::Relaxed);
        let done = UpstreamDone::new(cluster.clone(), host.clone(), Instant::now());
        let exchange = async {
            let resp = cluster.send_http(&host, up, h2, Priority::Default).await?;
            charge(&cluster, &host, resp.status().as_u16());
            let mut body = Timed::new(resp.into_body(), done);
            while let Some(f) = body.frame().await {
                if f.is_err() {
                    break;
                }
            }
            Ok::<_, UpstreamError>(())
        };
        let r = match deadline {
            Some(d) => tokio::time::timeout_at(d, exchange).await.unwrap_or(Ok(())),
            None => exchange.await,
        };
        if let Err(e) = r {
            tracing::debug!(cluster = %cluster.name(), error = %e, "mirror request failed");
        }
    });
}

/// The body of one attempt: the downstream body itself when it is sent once, else a replay.
enum Bodies {
    Once(Option<UpstreamBody>),
    Replay(Replay),
}

impl Bodies {
    fn next(&mut self) -> UpstreamBody {
        match self {
            Bodies::Once(b) => b.take().unwrap_or_else(|| {
                // Never reached: a non-replay body allows no second attempt.
                http_body_util::Empty::new()
                    .map_err(|e| match e {})
                    .boxed_unsync()
            }),
            Bodies::Replay(r) => r.attempt().boxed_unsync(),
        }
    }

    fn replayable(&self) -> bool {
        match self {
            Bodies::Once(_) => false,
            Bodies::Replay(r) => r.replayable(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn forward(
    req: &mut http::request::Parts,
    body: Incoming,
    st: &mut Stream<'_>,
    m: &RouteMatch<'_>,
    f: &ForwardAction,
    authority: &str,
    path: &str,
    websocket: bool,
) -> Result<Response<UpstreamBody>, LocalReply> {
    let cfg = st.conn.cfg.clone();
    let cluster = pick_cluster(&req.headers, st, f)?;
    st.obs.cluster = Some(cluster.clone());
    let priority = f.policy.priority;
    // The route's hash_policy (RING_HASH / MAGLEV), computed once for all attempts.
    let hash = f.hash(
        &req.headers,
        path.split_once('?').map(|(_, q)| q),
        st.hctx.downstream_remote.ip(),
    );

    // Request head for the upstream.
    let mut headers = std::mem::take(&mut req.headers);
    m.apply_request_headers(&mut headers, &st.hctx);
    let new_path = match m.rewrite_path(path) {
        Some(p) => {
            if let Ok(v) = HeaderValue::from_str(path) {
                headers.insert("x-envoy-original-path", v);
            }
            p
        }
        None => path.to_string(),
    };
    let uri: Uri = new_path
        .parse()
        .map_err(|_| LocalReply::new(StatusCode::BAD_REQUEST, "invalid path\n", "DPE"))?;

    // Timeouts: the route's, a capped `grpc-timeout`, then the trusted override headers.
    let mut timeout = f.timeout;
    if st.is_grpc
        && let Some(g) = &f.policy.grpc_timeout
        && let Some(t) = g.timeout(headers.get("grpc-timeout").and_then(|v| v.to_str().ok()))
    {
        timeout = (!t.is_zero()).then_some(t);
    }
    if let Some(ms) = take_ms(&mut headers, "x-envoy-upstream-rq-timeout-ms") {
        timeout = (ms > 0).then(|| Duration::from_millis(ms));
    }
    let retry_policy = m.retry_policy();
    let mut per_try = retry_policy.and_then(|p| p.per_try_timeout);
    if let Some(ms) = take_ms(&mut headers, "x-envoy-upstream-rq-per-try-timeout-ms") {
        per_try = (ms > 0).then(|| Duration::from_millis(ms));
    }
    let per_try_idle = retry_policy.and_then(|p| p.per_try_idle_timeout);
    let retry = RetryState::new(retry_policy, &mut headers);
    let retry_allowed = retry.enabled()
        && retry_policy.is_none_or(|p| {
            p.request_retriable(&crate::route::RouteRequest {
                authority,
                path,
                method: &req.method,
                headers: &headers,
                scheme: "http",
            })
        });
    if !cfg.suppress_envoy_headers
        && let Some(t) = per_try.or(timeout)
    {
        headers.insert(
            "x-envoy-expected-rq-timeout-ms",
            HeaderValue::from(t.as_millis() as u64),
        );
    }
    let deadline = timeout.map(|t| st.start + t);
    let max_duration = f.policy.max_stream_duration.map(|d| st.start + d);
    let response_deadline = match (deadline, max_duration) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };

    // The downstream body, with its timers, sent once or replayed.
    let req_timed_out = Arc::new(AtomicBool::new(false));
    let down_failed = Arc::new(AtomicBool::new(false));
    let down_body = Timed::new(body, ())
        .count(st.obs.bytes_received.clone())
        .idle(cfg.stream_idle_timeout)
        .deadline(
            cfg.request_timeout.map(|t| st.start + t),
            TimerError::RequestTimeout,
        )
        .flag(req_timed_out.clone())
        .error_flag(down_failed.clone())
        .boxed_unsync();
    let mirrors: Vec<_> = if websocket {
        Vec::new()
    } else {
        m.mirror_policies()
            .iter()
            .filter(|mp| mp.sampled(rand::random::<u64>()))
            .collect()
    };
    let mut bodies = if (retry_allowed || !mirrors.is_empty()) && !websocket {
        let limit = m
            .per_request_buffer_limit()
            .unwrap_or(st.conn.info.buffer_limit) as usize;
        Bodies::Replay(Replay::new(down_body, limit))
    } else {
        Bodies::Once(Some(down_body))
    };
    if let Bodies::Replay(r) = &bodies {
        for mp in &mirrors {
            let mut mh = headers.clone();
            if let Ok(v) = HeaderValue::from_str(authority) {
                mh.insert(HOST, v);
            }
            match r.mirror() {
                Some(b) => spawn_mirror(
                    st,
                    &mp.cluster,
                    mp.keep_host,
                    (&req.method, &uri, &mh),
                    b.boxed_unsync(),
                    deadline,
                ),
                None => cluster.stats().retry_or_shadow_abandoned.increment(1),
            }
        }
    }

    let cs = cluster.stats();
    let rm = cluster.resources(priority);
    let mut tried: Vec<Arc<Host>> = Vec::new();
    let mut attempt: u32 = 0;
    let mut _retry_slot = None;
    loop {
        attempt += 1;
        let retried = attempt > 1;
        let (avoid, max_reselects) = match retry_policy {
            Some(p) if p.previous_hosts => (tried.as_slice(), p.host_selection_max_attempts),
            _ => (&[][..], 0),
        };
        let Some(host) = cluster.choose_host(&LbContext {
            hash: hash.hash,
            avoid,
            max_reselects,
            // ORIGINAL_DST clusters: the restored destination / override header.
            original_dst: st.conn.info.local_restored.then_some(st.conn.info.local),
            headers: Some(&headers),
        }) else {
            return Err(no_healthy_upstream());
        };
        st.obs.host = Some(host.address);
        let Some(rq_slot) = rm.requests.try_acquire() else {
            cs.upstream_rq_pending_overflow.increment(1);
            return Err(overloaded(cfg.suppress_envoy_headers));
        };

        // The head for this attempt (a copy while another attempt may follow).
        let mut h = if retry_allowed {
            headers.clone()
        } else {
            std::mem::take(&mut headers)
        };
        let host_header = if let Some(lit) = f.host_rewrite_literal() {
            lit.to_string()
        } else if f.auto_host_rewrite() {
            match &host.hostname {
                Some(hn) => format!("{hn}:{}", host.address.port()),
                None => host.address.to_string(),
            }
        } else {
            authority.to_string()
        };
        match HeaderValue::from_str(&host_header) {
            Ok(v) => {
                h.insert(HOST, v);
            }
            Err(_) => {
                return Err(LocalReply::new(
                    StatusCode::BAD_REQUEST,
                    "invalid host\n",
                    "DPE",
                ));
            }
        }
        if m.include_request_attempt_count() {
            h.insert("x-envoy-attempt-count", HeaderValue::from(attempt));
        }

        cs.upstream_rq_total.increment(1);
        cs.upstream_rq_active.increment(1.0);
        host.stats.rq_total.fetch_add(1, Ordering::Relaxed);
        host.stats.rq_active.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        let mut done = UpstreamDone::new(cluster.clone(), host.clone(), t0);
        done.slot = Some(rq_slot);

        if websocket {
            return websocket_upgrade(req, h, uri, &cluster, &host, done, deadline, priority).await;
        }

        let mut up = Request::new(bodies.next());
        *up.method_mut() = req.method.clone();
        *up.uri_mut() = uri.clone();
        *up.version_mut() = Version::HTTP_11;
        *up.headers_mut() = h;

        // This attempt's deadline: the route's, the stream duration, the per-try timeout and
        // the per-try idle timeout (no progress before response headers).
        let try_deadline = [
            response_deadline,
            per_try.map(|t| t0 + t),
            per_try_idle.map(|t| t0 + t),
        ]
        .into_iter()
        .flatten()
        .min();
        let send = cluster.send_http(&host, up, st.h2, priority);
        let result = match try_deadline {
            Some(d) => tokio::time::timeout_at(d, send).await.ok(),
            None => Some(send.await),
        };
        tried.push(host.clone());

        let failure = match result {
            None => {
                let now = Instant::now();
                if max_duration.is_some_and(|d| d <= now) && deadline.is_none_or(|d| d > now) {
                    cfg.stats.downstream_rq_max_duration_reached.increment(1);
                    drop(done);
                    return Err(LocalReply::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "downstream duration timeout",
                        "DT",
                    ));
                }
                cluster.report(&host, HostResult::Timeout);
                host.stats.rq_timeout.fetch_add(1, Ordering::Relaxed);
                charge(&cluster, &host, 504);
                drop(done);
                if deadline.is_some_and(|d| d <= now) {
                    // The route timeout ends the request, retries or not.
                    cs.upstream_rq_timeout.increment(1);
                    return Err(LocalReply::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream request timeout",
                        "UT",
                    ));
                }
                cs.upstream_rq_per_try_timeout.increment(1);
                (
                    LocalReply::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream request timeout",
                        "UT",
                    ),
                    Some(AttemptError::PerTryTimeout),
                )
            }
            Some(Err(e)) => {
                drop(done);
                if down_failed.load(Ordering::SeqCst) {
                    // The downstream body was malformed (bad chunk framing): a protocol error
                    // of the client's, answered 400 and the connection closed.
                    cfg.stats.downstream_cx_protocol_error.increment(1);
                    return Err(LocalReply::new(
                        StatusCode::BAD_REQUEST,
                        "malformed request body\n",
                        "DPE",
                    ));
                }
                if req_timed_out.load(Ordering::SeqCst) {
                    cfg.stats.downstream_rq_timeout.increment(1);
                    return Err(LocalReply::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "request timeout",
                        "DT",
                    ));
                }
                tracing::debug!(cluster = %cluster.name(), host = %host.address, attempt, error = %e, "upstream request failed");
                match e {
                    UpstreamError::Overflow => {
                        return Err(overloaded(cfg.suppress_envoy_headers));
                    }
                    UpstreamError::ConnectTimeout | UpstreamError::ConnectFailure(_) => {
                        cluster.report(&host, HostResult::ConnectFailed);
                        charge(&cluster, &host, 503);
                        (
                            LocalReply::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                upstream_failure("connection failure"),
                                "UF",
                            ),
                            Some(AttemptError::ConnectFailure),
                        )
                    }
                    UpstreamError::NoHealthyUpstream => {
                        return Err(no_healthy_upstream());
                    }
                    UpstreamError::RefusedStream => {
                        cluster.report(&host, HostResult::Reset);
                        charge(&cluster, &host, 503);
                        (
                            LocalReply::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                upstream_failure("remote refused stream reset"),
                                "UR",
                            ),
                            Some(AttemptError::RefusedStream),
                        )
                    }
                    _ => {
                        cluster.report(&host, HostResult::Reset);
                        charge(&cluster, &host, 503);
                        (
                            LocalReply::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                upstream_failure("connection termination"),
                                "UC",
                            ),
                            Some(AttemptError::Reset),
                        )
                    }
                }
            }
            Some(Ok(resp)) => {
                let service_ms = t0.elapsed().as_millis() as u64;
                let (mut parts, rbody) = resp.into_parts();
                let status = parts.status.as_u16();
                charge(&cluster, &host, status);
                cluster.report(&host, HostResult::ConnectSucceeded);
                cluster.report(&host, HostResult::Status(status));
                if parts
                    .headers
                    .contains_key("x-envoy-immediate-health-check-fail")
                {
                    cluster.immediate_health_check_fail(&host);
                }
                let retriable = retry_allowed && retry.status(status, &parts.headers);
                if retriable
                    && let Some(slot) = may_retry(attempt, &retry, &bodies, rm, cs, deadline)
                {
                    // Drop this response (and its connection) and go again.
                    drop((parts, rbody, done));
                    _retry_slot = Some(slot);
                    backoff_sleep(retry_policy, attempt, deadline, cs).await;
                    continue;
                }
                if retriable && attempt > retry.max {
                    st.obs.flags.set(Flag::UpstreamRetryLimitExceeded);
                }
                if retried {
                    cs.upstream_rq_retry_success.increment(1);
                }
                super::sanitize::strip_hop_by_hop(&mut parts.headers, false);
                if !cfg.suppress_envoy_headers {
                    parts.headers.insert(
                        "x-envoy-upstream-service-time",
                        HeaderValue::from(service_ms),
                    );
                }
                if let Some(c) = &hash.set_cookie {
                    // A cookie hash policy generated the affinity cookie.
                    parts.headers.append(http::header::SET_COOKIE, c.clone());
                }
                if m.include_attempt_count_in_response() {
                    parts
                        .headers
                        .insert("x-envoy-attempt-count", HeaderValue::from(attempt));
                }
                let idle = match (f.idle_timeout.or(cfg.stream_idle_timeout), per_try_idle) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let rbody = Timed::new(rbody, done)
                    .deadline(response_deadline, TimerError::RouteTimeout)
                    .idle(idle);
                return Ok(Response::from_parts(parts, rbody.boxed_unsync()));
            }
        };
        let (reply, err) = failure;
        let retriable = retry_allowed && err.is_some_and(|e| retry.error(e));
        if retriable && let Some(slot) = may_retry(attempt, &retry, &bodies, rm, cs, deadline) {
            _retry_slot = Some(slot);
            backoff_sleep(retry_policy, attempt, deadline, cs).await;
            continue;
        }
        if retriable && attempt > retry.max {
            st.obs.flags.set(Flag::UpstreamRetryLimitExceeded);
        }
        return Err(reply);
    }
}

/// A retriable attempt may be retried when retries are left, the body can be replayed, the
/// retry breaker (or budget) has room and the route timeout has not passed. Returns the retry
/// slot to hold while the retry is in flight.
fn may_retry(
    attempt: u32,
    retry: &RetryState<'_>,
    bodies: &Bodies,
    rm: &crate::upstream::circuit::ResourceManager,
    cs: &crate::upstream::ClusterStats,
    deadline: Option<Instant>,
) -> Option<crate::upstream::circuit::ResourceGuard> {
    if attempt > retry.max {
        cs.upstream_rq_retry_limit_exceeded.increment(1);
        return None;
    }
    if !bodies.replayable() {
        cs.retry_or_shadow_abandoned.increment(1);
        return None;
    }
    if deadline.is_some_and(|d| d <= Instant::now()) {
        return None;
    }
    let Some(slot) = rm.try_retry() else {
        cs.upstream_rq_retry_overflow.increment(1);
        return None;
    };
    cs.upstream_rq_retry.increment(1);
    Some(slot)
}

/// Envoy's jittered exponential back-off before retry number `attempt` (1-based), never past
/// the route deadline.
async fn backoff_sleep(
    policy: Option<&RetryPolicy>,
    attempt: u32,
    deadline: Option<Instant>,
    cs: &crate::upstream::ClusterStats,
) {
    let b = policy.map(|p| p.back_off).unwrap_or_default();
    let wait = crate::route::retry::backoff(&b, attempt, rand::random::<u64>());
    cs.upstream_rq_retry_backoff_exponential.increment(1);
    let until = Instant::now() + wait;
    tokio::time::sleep_until(deadline.map_or(until, |d| d.min(until))).await;
}

#[allow(clippy::too_many_arguments)]
/// Proxy an HTTP/1.1 WebSocket upgrade on a dedicated upstream connection, then splice the
/// two upgraded streams together.
async fn websocket_upgrade(
    req: &mut http::request::Parts,
    headers: http::HeaderMap,
    uri: Uri,
    cluster: &Arc<Cluster>,
    host: &Arc<Host>,
    done: UpstreamDone,
    deadline: Option<Instant>,
    priority: Priority,
) -> Result<Response<UpstreamBody>, LocalReply> {
    let fail = |reason: &str| {
        LocalReply::new(
            StatusCode::SERVICE_UNAVAILABLE,
            upstream_failure(reason),
            "UF",
        )
    };
    let Some(down_upgrade) = req.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return Err(LocalReply::new(
            StatusCode::BAD_REQUEST,
            "upgrade unavailable\n",
            "DPE",
        ));
    };
    let connect = async {
        let tcp = cluster
            .connect_tcp(host, priority)
            .await
            .map_err(|_| fail("connection failure"))?;
        let (stream, cx_guard) = (tcp.stream, tcp.guard);
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<Bytes>,
        >(TokioIo::new(stream))
        .await
        .map_err(|_| fail("connection failure"))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let mut up = Request::new(http_body_util::Empty::<Bytes>::new());
        *up.method_mut() = req.method.clone();
        *up.uri_mut() = uri;
        *up.headers_mut() = headers;
        let resp = sender
            .send_request(up)
            .await
            .map_err(|_| fail("connection termination"))?;
        Ok::<_, LocalReply>((resp, cx_guard))
    };
    let resp = match deadline {
        Some(d) => tokio::time::timeout_at(d, connect).await.map_err(|_| {
            LocalReply::new(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream request timeout",
                "UT",
            )
        })??,
        None => connect.await?,
    };
    let (resp, cx_guard) = resp;
    charge(cluster, host, resp.status().as_u16());
    let (mut parts, body) = resp.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        let Some(up_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return Err(fail("protocol error"));
        };
        tokio::spawn(async move {
            // Both guards live as long as the upgraded tunnel.
            let (_done, _cx) = (done, cx_guard);
            let (Ok(down), Ok(up)) = (down_upgrade.await, up_upgrade.await) else {
                return;
            };
            let mut down = TokioIo::new(down);
            let mut up = TokioIo::new(up);
            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
        });
        return Ok(Response::from_parts(parts, local_reply::full(Bytes::new())));
    }
    super::sanitize::strip_hop_by_hop(&mut parts.headers, false);
    let body = Timed::new(body, done)
        .map_err(|e| -> BoxError { e })
        .boxed_unsync();
    Ok(Response::from_parts(parts, body))
}

/// Terminate a CONNECT request (route `upgrade_configs: [{upgrade_type: CONNECT,
/// connect_config: {}}]`): open TCP to a host of the route's cluster, answer `200`, then splice
/// the upgraded downstream connection with the TCP stream until either side closes.
pub(super) async fn connect(
    req: &mut http::request::Parts,
    st: &mut Stream<'_>,
    f: &ForwardAction,
) -> Result<Response<UpstreamBody>, LocalReply> {
    if !f.connect_terminate() {
        // Translation refuses connect_matcher routes without it; CONNECT matches no other.
        return Err(LocalReply::new(StatusCode::FORBIDDEN, "", "UAEX"));
    }
    let (cluster, host) = pick_host(&req.headers, st, f)?;
    st.obs.cluster = Some(cluster.clone());
    st.obs.host = Some(host.address);
    let Some(down_upgrade) = req.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        return Err(LocalReply::new(
            StatusCode::BAD_REQUEST,
            "upgrade unavailable\n",
            "DPE",
        ));
    };
    let cs = cluster.stats();
    cs.upstream_rq_total.increment(1);
    cs.upstream_rq_active.increment(1.0);
    host.stats.rq_total.fetch_add(1, Ordering::Relaxed);
    host.stats.rq_active.fetch_add(1, Ordering::Relaxed);
    let mut done = UpstreamDone::new(cluster.clone(), host.clone(), Instant::now());
    let tcp = match cluster.connect_tcp(&host, f.policy.priority).await {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(cluster = %cluster.name(), host = %host.address, error = %e, "CONNECT tunnel connect failed");
            charge(&cluster, &host, 503);
            done.abort();
            return Err(LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                upstream_failure("connection failure"),
                "UF",
            ));
        }
    };
    charge(&cluster, &host, 200);
    let hard_stop = st.conn.info.hard_stop.clone();
    tokio::spawn(async move {
        // The connection guard lives as long as the tunnel.
        let (mut up, _cx) = (tcp.stream, tcp.guard);
        let outcome = match down_upgrade.await {
            Ok(down) => {
                let mut down = TokioIo::new(down);
                tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut down, &mut up) => match r {
                        Ok(_) => Outcome::Complete,
                        Err(_) => Outcome::Error,
                    },
                    _ = hard_stop.cancelled() => Outcome::Error,
                }
            }
            // The client went away before the upgrade completed.
            Err(_) => Outcome::Dropped,
        };
        done.done(outcome);
    });
    let mut resp = Response::new(local_reply::full(Bytes::new()));
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::shadow_host;

    #[test]
    fn shadow_host_names() {
        assert_eq!(shadow_host("foo.com"), "foo.com-shadow");
        assert_eq!(shadow_host("foo.com:8080"), "foo.com-shadow:8080");
        assert_eq!(shadow_host("[::1]:80"), "[::1]-shadow:80");
        assert_eq!(shadow_host("::1"), "::1-shadow");
    }
}
