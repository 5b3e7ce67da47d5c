//! The router (`envoy.filters.http.router`): cluster selection, host selection, upstream
//! request construction, the route timeout, upstream failure -> local reply mapping,
//! WebSocket upgrades and CONNECT termination (TCP tunnels).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::{CONNECTION, HOST, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use weir_filters::LocalReply;

use super::Stream;
use super::body::{OnDone, Outcome, Timed, TimerError};
use super::local_reply;
use crate::route::{ForwardAction, RouteMatch};
use crate::stats::class_index;
use crate::upstream::{BoxError, Cluster, Host, UpstreamBody, UpstreamError};

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
/// The `rq_active` gauges are released exactly once: by `done`, or on drop (a request that
/// failed before its response, or a tunnel that ended).
struct UpstreamDone {
    cluster: Arc<Cluster>,
    host: Arc<Host>,
    start: Instant,
    open: bool,
}

impl UpstreamDone {
    fn new(cluster: Arc<Cluster>, host: Arc<Host>, start: Instant) -> Self {
        Self {
            cluster,
            host,
            start,
            open: true,
        }
    }

    fn release(&mut self) {
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

/// A cluster, its chosen host, and a `Set-Cookie` a hash policy generated.
type Picked = (Arc<Cluster>, Arc<Host>, Option<HeaderValue>);

/// The route's cluster (fixed, weighted or from a header) and a host of it (with the route's
/// `hash_policy` hash in the LB context).
// LocalReply is the error of every handler in this module (the async ones escape the lint).
#[allow(clippy::result_large_err)]
fn pick_host(
    headers: &http::HeaderMap,
    path: &str,
    st: &Stream<'_>,
    f: &ForwardAction,
) -> Result<Picked, LocalReply> {
    let cfg = &st.conn.cfg;
    let Some(name) = f.select_cluster(headers, rand::random::<u64>()) else {
        cfg.stats.no_cluster.increment(1);
        return Err(LocalReply::new(StatusCode::SERVICE_UNAVAILABLE, "", "NC"));
    };
    let Some(cluster) = st.conn.state.clusters.get(&name) else {
        cfg.stats.no_cluster.increment(1);
        return Err(LocalReply::new(StatusCode::SERVICE_UNAVAILABLE, "", "NC"));
    };
    let query = path.split_once('?').map(|(_, q)| q);
    let hash = f.hash(headers, query, st.hctx.downstream_remote.ip());
    let ctx = crate::upstream::LbContext {
        hash: hash.hash,
        ..Default::default()
    };
    let Some(host) = cluster.choose_host(&ctx) else {
        return Err(LocalReply::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream",
            "UH",
        ));
    };
    Ok((cluster, host, hash.set_cookie))
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
    let (cluster, host, set_cookie) = pick_host(&req.headers, path, st, f)?;

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
    let host_header = if let Some(lit) = f.host_rewrite_literal() {
        lit.to_string()
    } else if f.auto_host_rewrite() {
        match &host.hostname {
            Some(h) => format!("{h}:{}", host.address.port()),
            None => host.address.to_string(),
        }
    } else {
        authority.to_string()
    };
    match HeaderValue::from_str(&host_header) {
        Ok(v) => {
            headers.insert(HOST, v);
        }
        Err(_) => {
            return Err(LocalReply::new(
                StatusCode::BAD_REQUEST,
                "invalid host\n",
                "DPE",
            ));
        }
    }
    if !cfg.suppress_envoy_headers
        && let Some(t) = f.timeout
    {
        headers.insert(
            "x-envoy-expected-rq-timeout-ms",
            HeaderValue::from(t.as_millis() as u64),
        );
    }
    let uri: Uri = new_path
        .parse()
        .map_err(|_| LocalReply::new(StatusCode::BAD_REQUEST, "invalid path\n", "DPE"))?;

    // Stats for the attempt.
    let cs = cluster.stats();
    cs.upstream_rq_total.increment(1);
    cs.upstream_rq_active.increment(1.0);
    host.stats.rq_total.fetch_add(1, Ordering::Relaxed);
    host.stats.rq_active.fetch_add(1, Ordering::Relaxed);
    let t0 = Instant::now();
    let done = UpstreamDone::new(cluster.clone(), host.clone(), t0);
    let deadline = f.timeout.map(|t| st.start + t);

    if websocket {
        return websocket_upgrade(req, headers, uri, &cluster, &host, done, deadline).await;
    }

    let req_timed_out = Arc::new(AtomicBool::new(false));
    let down_failed = Arc::new(AtomicBool::new(false));
    let up_body = Timed::new(body, ())
        .idle(cfg.stream_idle_timeout)
        .deadline(
            cfg.request_timeout.map(|t| st.start + t),
            TimerError::RequestTimeout,
        )
        .flag(req_timed_out.clone())
        .error_flag(down_failed.clone())
        .boxed_unsync();
    let mut up = Request::new(up_body);
    *up.method_mut() = req.method.clone();
    *up.uri_mut() = uri;
    *up.version_mut() = Version::HTTP_11;
    *up.headers_mut() = headers;

    let send = cluster.send_http(&host, up, st.h2);
    let result = match deadline {
        Some(d) => match tokio::time::timeout_at(d, send).await {
            Ok(r) => r,
            Err(_) => {
                cs.upstream_rq_timeout.increment(1);
                host.stats.rq_timeout.fetch_add(1, Ordering::Relaxed);
                charge(&cluster, &host, 504);
                drop(done);
                return Err(LocalReply::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream request timeout",
                    "UT",
                ));
            }
        },
        None => send.await,
    };
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            drop(done);
            if down_failed.load(Ordering::SeqCst) {
                // The downstream body was malformed (bad chunk framing): a protocol error of
                // the client's, answered 400 and the connection closed.
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
            charge(&cluster, &host, 503);
            tracing::debug!(cluster = %cluster.name(), host = %host.address, error = %e, "upstream request failed");
            return Err(match e {
                UpstreamError::ConnectTimeout | UpstreamError::ConnectFailure(_) => {
                    LocalReply::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        upstream_failure("connection failure"),
                        "UF",
                    )
                }
                UpstreamError::NoHealthyUpstream => {
                    LocalReply::new(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream", "UH")
                }
                _ => LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    upstream_failure("connection termination"),
                    "UC",
                ),
            });
        }
    };
    let service_ms = t0.elapsed().as_millis() as u64;
    let (mut parts, rbody) = resp.into_parts();
    charge(&cluster, &host, parts.status.as_u16());
    super::sanitize::strip_hop_by_hop(&mut parts.headers, false);
    if !cfg.suppress_envoy_headers {
        parts.headers.insert(
            "x-envoy-upstream-service-time",
            HeaderValue::from(service_ms),
        );
    }
    if let Some(c) = set_cookie {
        // A cookie hash policy generated the affinity cookie.
        parts.headers.append(http::header::SET_COOKIE, c);
    }
    let rbody = Timed::new(rbody, done)
        .deadline(deadline, TimerError::RouteTimeout)
        .idle(f.idle_timeout.or(cfg.stream_idle_timeout));
    Ok(Response::from_parts(parts, rbody.boxed_unsync()))
}

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
            .connect_tcp(host)
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
    st: &Stream<'_>,
    f: &ForwardAction,
) -> Result<Response<UpstreamBody>, LocalReply> {
    if !f.connect_terminate() {
        // Translation refuses connect_matcher routes without it; CONNECT matches no other.
        return Err(LocalReply::new(StatusCode::FORBIDDEN, "", "UAEX"));
    }
    // CONNECT has no path; a generated affinity cookie is not sent on the tunnel answer.
    let (cluster, host, _) = pick_host(&req.headers, "", st, f)?;
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
    let tcp = match cluster.connect_tcp(&host).await {
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
    let hard_stop = st.conn.state.hard_stop.clone();
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
