//! Active health checking (`Cluster.health_checks`): HTTP, TCP and gRPC checkers.
//!
//! # Data flow
//! - [`super::ClusterManager::start`] spawns [`run`] on the main runtime for every cluster
//!   with a health check. It keeps one session task per host (a `JoinSet`, keyed by the host's
//!   `Arc` identity), starting sessions for hosts a DNS refresh adds and aborting those of
//!   hosts it removes; it ends (aborting every session) when the cluster is dropped — it only
//!   holds a `Weak` and the receiving end of the cluster's host-change channel.
//! - A session runs one check at a time, bounded by `timeout`, then sleeps the interval that
//!   Envoy's rules give for the outcome (see [`base_interval`]). Results set or clear
//!   [`health_flags::FAILED_ACTIVE_HC`] on [`Host::health`]; workers read the bits at pick
//!   time, so nothing is rebuilt.
//! - Hosts start with `FAILED_ACTIVE_HC` when a health check is configured (Envoy's initial
//!   state); the first successful check makes a host healthy at once, later ones need
//!   `healthy_threshold` successes in a row. The cluster counts as warm once every initial host
//!   had its first check (bounded by `initial_jitter + timeout`), so listeners do not start
//!   with every host failed.
//!
//! # State machine (Envoy's `ActiveHealthCheckSession`)
//! - Success: the unhealthy streak resets; a failed host becomes healthy on its first check
//!   ever or after `healthy_threshold` successes in a row.
//! - Failure: the healthy streak resets; a healthy host becomes unhealthy after
//!   `unhealthy_threshold` network failures (connect errors, resets, timeouts) in a row, or at
//!   once for an *active* failure (an unexpected HTTP status not in `retriable_statuses`, a
//!   gRPC status other than SERVING, a body that does not match) and for a passive one
//!   (`x-envoy-immediate-health-check-fail`).
//!
//! # Checkers
//! - HTTP: `GET path` (or `method`) over HTTP/1.1 or prior-knowledge HTTP/2 with `Host` /
//!   `:authority` = `host` or the cluster name and `user-agent: Envoy/HC`; healthy when the
//!   status is in `expected_statuses` (default 200), the body contains the `receive` payloads
//!   (within `response_buffer_size`), and `service_name_matcher` (if set) matches
//!   `x-envoy-upstream-healthchecked-cluster`.
//! - TCP: connect; write `send`; healthy once every `receive` payload is found in order in what
//!   came back. With no `receive` the connection is closed right after connecting.
//! - gRPC: `grpc.health.v1.Health/Check` over prior-knowledge HTTP/2 with `service_name`;
//!   healthy only on `SERVING`.
//! - `reuse_connection` (default true) keeps the connection between checks; any network
//!   failure drops it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header::{CONTENT_TYPE, HOST, USER_AGENT};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use metrics::{Counter, Gauge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weir_xds_api::pb::envoy::config::core::v3 as core;
use weir_xds_api::pb::envoy::config::core::v3::health_check::{
    GrpcHealthCheck, HealthChecker as PbChecker, HttpHealthCheck, Payload, TcpHealthCheck, payload,
};
use weir_xds_api::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};

use super::pool::UpIo;
use super::{Cluster, Host, UpstreamProtocol, health_flags};
use crate::config::{Errors, duration, join};
use crate::stats::Scope;

/// The user agent Envoy's HTTP health checker sends.
pub const USER_AGENT_VALUE: &str = "Envoy/HC";
/// The response header `service_name_matcher` is checked against.
pub const HEALTHCHECKED_CLUSTER_HEADER: &str = "x-envoy-upstream-healthchecked-cluster";
/// Envoy's default `response_buffer_size` (bytes of body kept for `receive` matching).
pub const DEFAULT_RESPONSE_BUFFER: u64 = 1024;
/// Upper bound on what a TCP or gRPC check buffers from a host.
const MAX_CHECK_BUFFER: usize = 64 * 1024;

/// One translated `HealthCheck`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    /// `timeout` of one check.
    pub timeout: Duration,
    /// `interval` between checks of a healthy host.
    pub interval: Duration,
    /// `initial_jitter`: a random delay up to this before a host's first check.
    pub initial_jitter: Duration,
    /// `interval_jitter`: a random extra up to this on every interval.
    pub interval_jitter: Duration,
    /// `interval_jitter_percent`: a random extra up to this percent of the interval.
    pub interval_jitter_percent: u32,
    /// `unhealthy_threshold`.
    pub unhealthy_threshold: u32,
    /// `healthy_threshold`.
    pub healthy_threshold: u32,
    /// `reuse_connection` (default true).
    pub reuse_connection: bool,
    /// `no_traffic_interval` (default 60 s): used while the cluster has never had traffic.
    pub no_traffic_interval: Duration,
    /// `no_traffic_healthy_interval` (default `no_traffic_interval`).
    pub no_traffic_healthy_interval: Duration,
    /// `unhealthy_interval` (default `interval`).
    pub unhealthy_interval: Duration,
    /// `unhealthy_edge_interval` (default `unhealthy_interval`).
    pub unhealthy_edge_interval: Duration,
    /// `healthy_edge_interval` (default `interval`).
    pub healthy_edge_interval: Duration,
    /// `always_log_health_check_failures`.
    pub always_log_health_check_failures: bool,
    /// `always_log_health_check_success`.
    pub always_log_health_check_success: bool,
    /// The checker.
    pub checker: CheckerConfig,
}

/// Which checker.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckerConfig {
    /// `http_health_check` (boxed: it is much larger than the others).
    Http(Box<HttpCheckConfig>),
    /// `tcp_health_check`.
    Tcp(TcpCheckConfig),
    /// `grpc_health_check`.
    Grpc(GrpcCheckConfig),
}

/// `http_health_check`.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpCheckConfig {
    /// `host` (empty: the cluster name).
    pub host: String,
    /// `path`.
    pub path: String,
    /// `method` (default GET).
    pub method: Method,
    /// `send` payload as the request body.
    pub send: Option<Bytes>,
    /// `receive` payloads the body must contain, in order.
    pub receive: Vec<Vec<u8>>,
    /// `response_buffer_size` (0 = unlimited).
    pub response_buffer_size: u64,
    /// `request_headers_to_add`.
    pub headers_to_add: Vec<HeaderAdd>,
    /// `request_headers_to_remove`.
    pub headers_to_remove: Vec<HeaderName>,
    /// `expected_statuses` as half-open ranges (default `[200, 201)`).
    pub expected_statuses: Vec<(u16, u16)>,
    /// `retriable_statuses` as half-open ranges.
    pub retriable_statuses: Vec<(u16, u16)>,
    /// `codec_client_type: HTTP2`.
    pub http2: bool,
    /// `service_name_matcher`.
    pub service_name_matcher: Option<NameMatcher>,
}

/// One `HeaderValueOption` of a health check request.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderAdd {
    /// Name.
    pub name: HeaderName,
    /// Value.
    pub value: HeaderValue,
    /// `append_action`.
    pub action: AppendAction,
}

/// `HeaderValueOption.append_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    /// `APPEND_IF_EXISTS_OR_ADD`.
    Append,
    /// `ADD_IF_ABSENT`.
    AddIfAbsent,
    /// `OVERWRITE_IF_EXISTS_OR_ADD`.
    OverwriteOrAdd,
    /// `OVERWRITE_IF_EXISTS`.
    OverwriteIfExists,
}

/// `tcp_health_check`.
#[derive(Debug, Clone, PartialEq)]
pub struct TcpCheckConfig {
    /// `send`.
    pub send: Option<Bytes>,
    /// `receive`: payloads that must all be found, in order.
    pub receive: Vec<Vec<u8>>,
}

/// `grpc_health_check`.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpcCheckConfig {
    /// `service_name`.
    pub service_name: String,
    /// `authority` (empty: the cluster name).
    pub authority: String,
    /// `initial_metadata`.
    pub initial_metadata: Vec<HeaderAdd>,
}

/// A `StringMatcher` for `service_name_matcher`.
#[derive(Debug, Clone)]
pub enum NameMatcher {
    /// `exact`.
    Exact(String, bool),
    /// `prefix`.
    Prefix(String, bool),
    /// `suffix`.
    Suffix(String, bool),
    /// `contains`.
    Contains(String, bool),
    /// `safe_regex` (whole-value match).
    Regex(regex::Regex),
}

impl PartialEq for NameMatcher {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Exact(a, x), Self::Exact(b, y))
            | (Self::Prefix(a, x), Self::Prefix(b, y))
            | (Self::Suffix(a, x), Self::Suffix(b, y))
            | (Self::Contains(a, x), Self::Contains(b, y)) => a == b && x == y,
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl NameMatcher {
    /// Whether `v` matches.
    pub fn matches(&self, v: &str) -> bool {
        let fold = |s: &str, ic: bool| if ic { s.to_ascii_lowercase() } else { s.into() };
        match self {
            Self::Exact(p, ic) => fold(v, *ic) == fold(p, *ic),
            Self::Prefix(p, ic) => fold(v, *ic).starts_with(&fold(p, *ic)),
            Self::Suffix(p, ic) => fold(v, *ic).ends_with(&fold(p, *ic)),
            Self::Contains(p, ic) => fold(v, *ic).contains(&fold(p, *ic)),
            Self::Regex(r) => r.is_match(v),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Translation
// ---------------------------------------------------------------------------------------------

/// `HealthCheck` fields weir implements.
const HEALTH_CHECK_FIELDS: &[&str] = &[
    "timeout",
    "interval",
    "initial_jitter",
    "interval_jitter",
    "interval_jitter_percent",
    "unhealthy_threshold",
    "healthy_threshold",
    "reuse_connection",
    "no_traffic_interval",
    "no_traffic_healthy_interval",
    "unhealthy_interval",
    "unhealthy_edge_interval",
    "healthy_edge_interval",
    "always_log_health_check_failures",
    "always_log_health_check_success",
    "http_health_check",
    "tcp_health_check",
    "grpc_health_check",
];

/// Translate `Cluster.health_checks` at `path` (e.g. `clusters[0].health_checks`).
/// `protocol` is the cluster's upstream protocol (gRPC checks need HTTP/2, as in Envoy).
pub fn translate_health_checks(
    hcs: &[core::HealthCheck],
    protocol: &UpstreamProtocol,
    path: &str,
    errs: &mut Errors,
) -> Vec<HealthCheckConfig> {
    if hcs.len() > 1 {
        errs.add(
            format!("{path}[1]"),
            "multiple health checks per cluster are not supported (as in Envoy)",
        );
    }
    hcs.iter()
        .take(1)
        .enumerate()
        .filter_map(|(i, hc)| translate_one(hc, protocol, &format!("{path}[{i}]"), errs))
        .collect()
}

fn positive(
    d: Option<&weir_xds_api::pb::google::protobuf::Duration>,
    path: &str,
    required: bool,
    errs: &mut Errors,
) -> Option<Duration> {
    match d {
        None => {
            if required {
                errs.add(path, "is required");
            }
            None
        }
        Some(d) => {
            let v = duration(d, path, errs);
            if v.is_zero() {
                errs.add(path, "must be greater than 0");
                None
            } else {
                Some(v)
            }
        }
    }
}

fn translate_one(
    hc: &core::HealthCheck,
    protocol: &UpstreamProtocol,
    path: &str,
    errs: &mut Errors,
) -> Option<HealthCheckConfig> {
    errs.reject_unsupported(hc, HEALTH_CHECK_FIELDS, path);
    let timeout = positive(hc.timeout.as_ref(), &join(path, "timeout"), true, errs);
    let interval = positive(hc.interval.as_ref(), &join(path, "interval"), true, errs);
    let threshold = |v: Option<u32>, field: &str, errs: &mut Errors| match v {
        None => {
            errs.add(join(path, field), "is required");
            None
        }
        Some(0) => {
            errs.add(join(path, field), "must be at least 1");
            None
        }
        Some(v) => Some(v),
    };
    let unhealthy_threshold = threshold(
        hc.unhealthy_threshold.map(|v| v.value),
        "unhealthy_threshold",
        errs,
    );
    let healthy_threshold = threshold(
        hc.healthy_threshold.map(|v| v.value),
        "healthy_threshold",
        errs,
    );
    let opt =
        |d: &Option<weir_xds_api::pb::google::protobuf::Duration>,
         field: &str,
         errs: &mut Errors| positive(d.as_ref(), &join(path, field), false, errs);
    let initial_jitter = hc
        .initial_jitter
        .as_ref()
        .map(|d| duration(d, &join(path, "initial_jitter"), errs))
        .unwrap_or_default();
    let interval_jitter = hc
        .interval_jitter
        .as_ref()
        .map(|d| duration(d, &join(path, "interval_jitter"), errs))
        .unwrap_or_default();
    let no_traffic_interval = opt(&hc.no_traffic_interval, "no_traffic_interval", errs)
        .unwrap_or(Duration::from_secs(60));
    let no_traffic_healthy_interval = opt(
        &hc.no_traffic_healthy_interval,
        "no_traffic_healthy_interval",
        errs,
    )
    .unwrap_or(no_traffic_interval);
    let unhealthy_interval = opt(&hc.unhealthy_interval, "unhealthy_interval", errs);
    let unhealthy_edge_interval = opt(&hc.unhealthy_edge_interval, "unhealthy_edge_interval", errs);
    let healthy_edge_interval = opt(&hc.healthy_edge_interval, "healthy_edge_interval", errs);

    let checker = match &hc.health_checker {
        Some(PbChecker::HttpHealthCheck(h)) => {
            http_config(h, &join(path, "http_health_check"), errs)
                .map(|h| CheckerConfig::Http(Box::new(h)))
        }
        Some(PbChecker::TcpHealthCheck(t)) => {
            tcp_config(t, &join(path, "tcp_health_check"), errs).map(CheckerConfig::Tcp)
        }
        Some(PbChecker::GrpcHealthCheck(g)) => {
            let gpath = join(path, "grpc_health_check");
            if matches!(protocol, UpstreamProtocol::Http1) {
                errs.add(
                    gpath.clone(),
                    "gRPC health checking needs a cluster that speaks HTTP/2 \
                     (http2_protocol_options or explicit_http_config.http2_protocol_options)",
                );
            }
            grpc_config(g, &gpath, errs).map(CheckerConfig::Grpc)
        }
        // `custom_health_check` is rejected by reject_unsupported.
        Some(PbChecker::CustomHealthCheck(_)) => None,
        None => {
            errs.add(
                path,
                "one of http_health_check, tcp_health_check or grpc_health_check is required",
            );
            None
        }
    };
    let interval = interval?;
    let unhealthy_interval = unhealthy_interval.unwrap_or(interval);
    Some(HealthCheckConfig {
        timeout: timeout?,
        interval,
        initial_jitter,
        interval_jitter,
        interval_jitter_percent: hc.interval_jitter_percent,
        unhealthy_threshold: unhealthy_threshold?,
        healthy_threshold: healthy_threshold?,
        reuse_connection: hc.reuse_connection.map(|b| b.value).unwrap_or(true),
        no_traffic_interval,
        no_traffic_healthy_interval,
        unhealthy_interval,
        unhealthy_edge_interval: unhealthy_edge_interval.unwrap_or(unhealthy_interval),
        healthy_edge_interval: healthy_edge_interval.unwrap_or(interval),
        always_log_health_check_failures: hc.always_log_health_check_failures,
        always_log_health_check_success: hc.always_log_health_check_success,
        checker: checker?,
    })
}

/// A `Payload`: `text` is hex, `binary` raw bytes.
fn payload(p: &Payload, path: &str, errs: &mut Errors) -> Option<Vec<u8>> {
    match &p.payload {
        Some(payload::Payload::Text(t)) => match decode_hex(t) {
            Some(b) if !b.is_empty() => Some(b),
            _ => {
                errs.add(join(path, "text"), format!("invalid hex string {t:?}"));
                None
            }
        },
        Some(payload::Payload::Binary(b)) if !b.is_empty() => Some(b.clone()),
        Some(payload::Payload::Binary(_)) => {
            errs.add(join(path, "binary"), "payload must not be empty");
            None
        }
        None => {
            errs.add(path, "one of text or binary is required");
            None
        }
    }
}

/// Hex to bytes (Envoy's `Hex::decode`: even length, case-insensitive).
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn payloads(ps: &[Payload], path: &str, errs: &mut Errors) -> Vec<Vec<u8>> {
    ps.iter()
        .enumerate()
        .filter_map(|(i, p)| payload(p, &format!("{path}[{i}]"), errs))
        .collect()
}

fn status_ranges(
    ranges: &[weir_xds_api::pb::envoy::r#type::v3::Int64Range],
    path: &str,
    errs: &mut Errors,
) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    for (i, r) in ranges.iter().enumerate() {
        let p = format!("{path}[{i}]");
        if r.start >= r.end {
            errs.add(
                p,
                format!("expecting start < end, got [{}, {})", r.start, r.end),
            );
        } else if r.start < 100 {
            errs.add(join(&p, "start"), "expecting start >= 100");
        } else if r.end > 600 {
            errs.add(join(&p, "end"), "expecting end <= 600");
        } else {
            out.push((r.start as u16, r.end as u16));
        }
    }
    out
}

/// `HeaderValueOption`s with literal values (no `%` command operators).
fn header_adds(opts: &[core::HeaderValueOption], path: &str, errs: &mut Errors) -> Vec<HeaderAdd> {
    use core::header_value_option::HeaderAppendAction as A;
    let mut out = Vec::new();
    for (i, o) in opts.iter().enumerate() {
        let p = format!("{path}[{i}]");
        #[allow(deprecated)]
        errs.reject_unsupported(
            o,
            &["header", "append", "append_action", "keep_empty_value"],
            &p,
        );
        let Some(h) = &o.header else {
            errs.add(join(&p, "header"), "header is required");
            continue;
        };
        let hp = join(&p, "header");
        errs.reject_unsupported(h, &["key", "value", "raw_value"], &hp);
        let name = match HeaderName::from_bytes(h.key.as_bytes()) {
            Ok(n) if !h.key.starts_with(':') && n != HOST => n,
            _ => {
                errs.add(
                    join(&hp, "key"),
                    format!("{:?} is not a header weir can set on a health check", h.key),
                );
                continue;
            }
        };
        let raw: &[u8] = if h.raw_value.is_empty() {
            h.value.as_bytes()
        } else {
            &h.raw_value
        };
        if raw.contains(&b'%') {
            errs.add(
                join(&hp, "value"),
                "command operators (%...%) are not supported in health check headers",
            );
            continue;
        }
        if raw.is_empty() && !o.keep_empty_value {
            continue;
        }
        let Ok(value) = HeaderValue::from_bytes(raw) else {
            errs.add(join(&hp, "value"), "invalid header value");
            continue;
        };
        #[allow(deprecated)]
        let action = match (o.append, A::try_from(o.append_action)) {
            (Some(b), _) if b.value => AppendAction::Append,
            (Some(_), _) => AppendAction::OverwriteOrAdd,
            (None, Ok(A::AppendIfExistsOrAdd)) => AppendAction::Append,
            (None, Ok(A::AddIfAbsent)) => AppendAction::AddIfAbsent,
            (None, Ok(A::OverwriteIfExistsOrAdd)) => AppendAction::OverwriteOrAdd,
            (None, Ok(A::OverwriteIfExists)) => AppendAction::OverwriteIfExists,
            (None, Err(_)) => {
                errs.add(join(&p, "append_action"), "unknown append_action");
                continue;
            }
        };
        out.push(HeaderAdd {
            name,
            value,
            action,
        });
    }
    out
}

fn name_matcher(m: &StringMatcher, path: &str, errs: &mut Errors) -> Option<NameMatcher> {
    errs.reject_unsupported(
        m,
        &[
            "exact",
            "prefix",
            "suffix",
            "contains",
            "safe_regex",
            "ignore_case",
        ],
        path,
    );
    let ic = m.ignore_case;
    match &m.match_pattern {
        Some(string_matcher::MatchPattern::Exact(s)) => Some(NameMatcher::Exact(s.clone(), ic)),
        Some(string_matcher::MatchPattern::Prefix(s)) => Some(NameMatcher::Prefix(s.clone(), ic)),
        Some(string_matcher::MatchPattern::Suffix(s)) => Some(NameMatcher::Suffix(s.clone(), ic)),
        Some(string_matcher::MatchPattern::Contains(s)) => {
            Some(NameMatcher::Contains(s.clone(), ic))
        }
        Some(string_matcher::MatchPattern::SafeRegex(r)) => {
            let rp = join(path, "safe_regex");
            errs.reject_unsupported(r, &["regex", "google_re2"], &rp);
            match regex::RegexBuilder::new(&format!(r"\A(?:{})\z", r.regex))
                .size_limit(1 << 20)
                .build()
            {
                Ok(re) if regex::Regex::new(&r.regex).is_ok() => Some(NameMatcher::Regex(re)),
                _ => {
                    errs.add(join(&rp, "regex"), "invalid regex");
                    None
                }
            }
        }
        // `custom` is rejected by reject_unsupported.
        Some(string_matcher::MatchPattern::Custom(_)) => None,
        None => {
            errs.add(path, "a match pattern is required");
            None
        }
    }
}

fn http_config(h: &HttpHealthCheck, path: &str, errs: &mut Errors) -> Option<HttpCheckConfig> {
    errs.reject_unsupported(
        h,
        &[
            "host",
            "path",
            "send",
            "receive",
            "response_buffer_size",
            "request_headers_to_add",
            "request_headers_to_remove",
            "expected_statuses",
            "retriable_statuses",
            "codec_client_type",
            "service_name_matcher",
            "method",
        ],
        path,
    );
    let mut ok = true;
    if h.path.is_empty() {
        errs.add(join(path, "path"), "path is required");
        ok = false;
    } else if !h.path.starts_with('/') || h.path.parse::<http::uri::PathAndQuery>().is_err() {
        errs.add(join(path, "path"), format!("invalid path {:?}", h.path));
        ok = false;
    }
    if !h.host.is_empty() && HeaderValue::from_str(&h.host).is_err() {
        errs.add(join(path, "host"), "invalid host");
        ok = false;
    }
    use core::RequestMethod as M;
    let method = match M::try_from(h.method) {
        Ok(M::MethodUnspecified | M::Get) => Method::GET,
        Ok(M::Head) => Method::HEAD,
        Ok(M::Post) => Method::POST,
        Ok(M::Put) => Method::PUT,
        Ok(M::Delete) => Method::DELETE,
        Ok(M::Options) => Method::OPTIONS,
        Ok(M::Trace) => Method::TRACE,
        Ok(M::Patch) => Method::PATCH,
        Ok(M::Connect) | Err(_) => {
            errs.add(
                join(path, "method"),
                "CONNECT (or an unknown method) is not allowed",
            );
            ok = false;
            Method::GET
        }
    };
    let send = h
        .send
        .as_ref()
        .and_then(|p| payload(p, &join(path, "send"), errs))
        .map(Bytes::from);
    if send.is_some()
        && matches!(
            method,
            Method::GET | Method::HEAD | Method::DELETE | Method::TRACE
        )
    {
        errs.add(
            join(path, "send"),
            format!("a request payload cannot be sent with method {method}"),
        );
        ok = false;
    }
    let receive = payloads(&h.receive, &join(path, "receive"), errs);
    let response_buffer_size = h
        .response_buffer_size
        .map(|v| v.value)
        .unwrap_or(DEFAULT_RESPONSE_BUFFER);
    let total: u64 = receive.iter().map(|r| r.len() as u64).sum();
    if response_buffer_size != 0 && total > response_buffer_size {
        errs.add(
            join(path, "receive"),
            format!("the expected response ({total} bytes) exceeds response_buffer_size"),
        );
        ok = false;
    }
    let http2 =
        match weir_xds_api::pb::envoy::r#type::v3::CodecClientType::try_from(h.codec_client_type) {
            Ok(weir_xds_api::pb::envoy::r#type::v3::CodecClientType::Http1) => false,
            Ok(weir_xds_api::pb::envoy::r#type::v3::CodecClientType::Http2) => true,
            _ => {
                errs.add(
                    join(path, "codec_client_type"),
                    "only HTTP1 and HTTP2 are supported",
                );
                ok = false;
                false
            }
        };
    let mut headers_to_remove = Vec::new();
    for (i, n) in h.request_headers_to_remove.iter().enumerate() {
        match HeaderName::from_bytes(n.as_bytes()) {
            Ok(name) if !n.starts_with(':') && name != HOST => headers_to_remove.push(name),
            _ => errs.add(
                format!("{path}.request_headers_to_remove[{i}]"),
                format!("{n:?} cannot be removed"),
            ),
        }
    }
    let mut expected_statuses =
        status_ranges(&h.expected_statuses, &join(path, "expected_statuses"), errs);
    if h.expected_statuses.is_empty() {
        expected_statuses.push((200, 201));
    }
    let service_name_matcher = h
        .service_name_matcher
        .as_ref()
        .and_then(|m| name_matcher(m, &join(path, "service_name_matcher"), errs));
    ok.then(|| HttpCheckConfig {
        host: h.host.clone(),
        path: h.path.clone(),
        method,
        send,
        receive,
        response_buffer_size,
        headers_to_add: header_adds(
            &h.request_headers_to_add,
            &join(path, "request_headers_to_add"),
            errs,
        ),
        headers_to_remove,
        expected_statuses,
        retriable_statuses: status_ranges(
            &h.retriable_statuses,
            &join(path, "retriable_statuses"),
            errs,
        ),
        http2,
        service_name_matcher,
    })
}

fn tcp_config(t: &TcpHealthCheck, path: &str, errs: &mut Errors) -> Option<TcpCheckConfig> {
    errs.reject_unsupported(t, &["send", "receive"], path);
    Some(TcpCheckConfig {
        send: t
            .send
            .as_ref()
            .and_then(|p| payload(p, &join(path, "send"), errs))
            .map(Bytes::from),
        receive: payloads(&t.receive, &join(path, "receive"), errs),
    })
}

fn grpc_config(g: &GrpcHealthCheck, path: &str, errs: &mut Errors) -> Option<GrpcCheckConfig> {
    errs.reject_unsupported(g, &["service_name", "authority", "initial_metadata"], path);
    if !g.authority.is_empty() && g.authority.parse::<http::uri::Authority>().is_err() {
        errs.add(join(path, "authority"), "invalid authority");
        return None;
    }
    Some(GrpcCheckConfig {
        service_name: g.service_name.clone(),
        authority: g.authority.clone(),
        initial_metadata: header_adds(&g.initial_metadata, &join(path, "initial_metadata"), errs),
    })
}

// ---------------------------------------------------------------------------------------------
// State machine
// ---------------------------------------------------------------------------------------------

/// Envoy's `HealthCheckFailureType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The host answered, and the answer was wrong (immediately unhealthy unless retriable).
    Active {
        /// An HTTP status in `retriable_statuses`: counts towards `unhealthy_threshold`.
        retriable: bool,
    },
    /// Connect failure, reset or timeout: counts towards `unhealthy_threshold`.
    Network,
    /// `x-envoy-immediate-health-check-fail` seen by the router.
    Passive,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Healthy.
    Success,
    /// Unhealthy for this reason.
    Failure(Failure),
}

/// Envoy's `HealthTransition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// No change.
    Unchanged,
    /// Moving towards a change (a threshold not reached yet).
    ChangePending,
    /// The host's health flipped.
    Changed,
}

/// Per-host health-check counters (touched by its session, and by the router's immediate
/// failure; never on an ordinary request).
#[derive(Debug)]
pub struct HostHc {
    state: Mutex<HcCounters>,
}

impl Default for HostHc {
    fn default() -> Self {
        Self {
            state: Mutex::new(HcCounters {
                num_healthy: 0,
                num_unhealthy: 0,
                first_check: true,
            }),
        }
    }
}

impl HostHc {
    fn lock(&self) -> std::sync::MutexGuard<'_, HcCounters> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct HcCounters {
    num_healthy: u32,
    num_unhealthy: u32,
    first_check: bool,
}

/// Envoy's `cluster.<name>.health_check.*` stats.
#[derive(Debug, Clone)]
pub struct HcStats {
    /// `attempt`.
    pub attempt: Counter,
    /// `success`.
    pub success: Counter,
    /// `failure`.
    pub failure: Counter,
    /// `network_failure`.
    pub network_failure: Counter,
    /// `passive_failure`.
    pub passive_failure: Counter,
    /// `verify_cluster`.
    pub verify_cluster: Counter,
    /// `healthy` (gauge: checked hosts that pass).
    pub healthy: Gauge,
    /// `degraded` (gauge; weir has no degraded state, so always 0).
    pub degraded: Gauge,
}

impl HcStats {
    /// Register under `cluster.<name>.health_check.`.
    pub fn new(cluster: &Scope) -> Self {
        let s = cluster.child("health_check");
        let degraded = s.gauge("degraded");
        degraded.set(0.0);
        let healthy = s.gauge("healthy");
        healthy.set(0.0);
        Self {
            attempt: s.counter("attempt"),
            success: s.counter("success"),
            failure: s.counter("failure"),
            network_failure: s.counter("network_failure"),
            passive_failure: s.counter("passive_failure"),
            verify_cluster: s.counter("verify_cluster"),
            healthy,
            degraded,
        }
    }
}

/// One cluster's health checker.
#[derive(Debug)]
pub struct HealthChecker {
    cfg: HealthCheckConfig,
    cluster: String,
    stats: HcStats,
    /// The cluster has carried traffic at least once (Envoy: `upstream_cx_total` used).
    traffic_seen: AtomicBool,
    /// The cluster's TLS transport socket: checks handshake like traffic does.
    tls: Option<Arc<crate::tls::ClientTls>>,
}

impl HealthChecker {
    /// A checker with its stats registered under the cluster scope.
    pub fn new(cfg: HealthCheckConfig, cluster: &str, scope: &Scope) -> Self {
        Self {
            cfg,
            cluster: cluster.to_string(),
            stats: HcStats::new(scope),
            traffic_seen: AtomicBool::new(false),
            tls: None,
        }
    }

    /// Check over the cluster's TLS transport socket (SNI, client certificate, SAN checks).
    pub fn with_tls(mut self, tls: Option<Arc<crate::tls::ClientTls>>) -> Self {
        self.tls = tls;
        self
    }

    /// Config.
    pub fn config(&self) -> &HealthCheckConfig {
        &self.cfg
    }

    /// Stats.
    pub fn stats(&self) -> &HcStats {
        &self.stats
    }

    /// Envoy's `handleSuccess`.
    pub fn on_success(&self, host: &Host) -> Transition {
        let mut st = host.hc.lock();
        st.num_unhealthy = 0;
        let mut t = Transition::Unchanged;
        if host.health.load(Ordering::Acquire) & health_flags::FAILED_ACTIVE_HC != 0 {
            st.num_healthy += 1;
            if st.first_check || st.num_healthy >= self.cfg.healthy_threshold {
                st.num_healthy = 0;
                host.health
                    .fetch_and(!health_flags::FAILED_ACTIVE_HC, Ordering::AcqRel);
                self.stats.healthy.increment(1.0);
                t = Transition::Changed;
                tracing::info!(cluster = %self.cluster, host = %host.address,
                    first_check = st.first_check, "health check passed: host is healthy");
            } else {
                t = Transition::ChangePending;
            }
        }
        if t != Transition::Changed && self.cfg.always_log_health_check_success {
            tracing::info!(cluster = %self.cluster, host = %host.address, "health check passed");
        }
        self.stats.success.increment(1);
        st.first_check = false;
        t
    }

    /// Envoy's `setUnhealthy` (also `handleFailure` without the rescheduling).
    pub fn on_failure(&self, host: &Host, kind: Failure, detail: &str) -> Transition {
        let mut st = host.hc.lock();
        st.num_healthy = 0;
        let mut t = Transition::Unchanged;
        if host.health.load(Ordering::Acquire) & health_flags::FAILED_ACTIVE_HC == 0 {
            let immediate = match kind {
                Failure::Active { retriable } => !retriable,
                Failure::Passive => true,
                Failure::Network => false,
            };
            st.num_unhealthy += 1;
            if immediate || st.num_unhealthy >= self.cfg.unhealthy_threshold {
                st.num_unhealthy = 0;
                host.health
                    .fetch_or(health_flags::FAILED_ACTIVE_HC, Ordering::AcqRel);
                self.stats.healthy.decrement(1.0);
                t = Transition::Changed;
                tracing::info!(cluster = %self.cluster, host = %host.address, reason = detail,
                    "health check failed: host is unhealthy");
            } else {
                t = Transition::ChangePending;
            }
        }
        if t != Transition::Changed {
            if st.first_check || self.cfg.always_log_health_check_failures {
                tracing::info!(cluster = %self.cluster, host = %host.address, reason = detail,
                    "health check failed");
            } else {
                tracing::debug!(cluster = %self.cluster, host = %host.address, reason = detail,
                    "health check failed");
            }
        }
        self.stats.failure.increment(1);
        match kind {
            Failure::Network => self.stats.network_failure.increment(1),
            Failure::Passive => self.stats.passive_failure.increment(1),
            Failure::Active { .. } => {}
        }
        st.first_check = false;
        t
    }

    fn note_traffic(&self, hosts: &[Arc<Host>]) -> bool {
        if self.traffic_seen.load(Ordering::Relaxed) {
            return true;
        }
        let seen = hosts.iter().any(|h| {
            h.stats.cx_total.load(Ordering::Relaxed) > 0
                || h.stats.rq_total.load(Ordering::Relaxed) > 0
        });
        if seen {
            self.traffic_seen.store(true, Ordering::Relaxed);
        }
        seen
    }
}

/// The interval before the next check (without jitter), by Envoy's rules: the no-traffic
/// intervals until the cluster carried traffic; then the edge intervals while a change is
/// pending, `unhealthy_interval` after a failure and `interval` after a success.
pub fn base_interval(
    cfg: &HealthCheckConfig,
    healthy: bool,
    t: Transition,
    traffic: bool,
) -> Duration {
    if !traffic {
        return if healthy && t != Transition::ChangePending {
            cfg.no_traffic_healthy_interval
        } else {
            cfg.no_traffic_interval
        };
    }
    match (healthy, t == Transition::ChangePending) {
        (false, true) => cfg.unhealthy_edge_interval,
        (false, false) => cfg.unhealthy_interval,
        (true, true) => cfg.healthy_edge_interval,
        (true, false) => cfg.interval,
    }
}

/// `base` plus Envoy's jitter (`interval_jitter_percent` of it, then `interval_jitter`),
/// from two random numbers; never below 1 ms.
pub fn with_jitter(cfg: &HealthCheckConfig, base: Duration, r1: u64, r2: u64) -> Duration {
    let mut ms = base.as_millis() as u64;
    let pct_mod = u64::from(cfg.interval_jitter_percent) * ms / 100;
    if pct_mod > 0 {
        ms += r1 % pct_mod;
    }
    let j = cfg.interval_jitter.as_millis() as u64;
    if j > 0 {
        ms += r2 % j;
    }
    Duration::from_millis(ms.max(1))
}

// ---------------------------------------------------------------------------------------------
// Checkers
// ---------------------------------------------------------------------------------------------

/// A connection kept between checks.
enum Conn {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
    Tcp(UpIo),
}

impl Conn {
    fn usable(&self) -> bool {
        match self {
            Conn::Http1(s) => !s.is_closed(),
            Conn::Http2(s) => !s.is_closed(),
            Conn::Tcp(_) => true,
        }
    }
}

/// A failed check with a reason for the log.
struct Failed(Failure, String);

fn network(e: impl std::fmt::Display) -> Failed {
    Failed(Failure::Network, e.to_string())
}

fn active(detail: impl Into<String>) -> Failed {
    Failed(Failure::Active { retriable: false }, detail.into())
}

/// Connect to `host`, then handshake TLS when the cluster has a TLS transport socket
/// (offering `h2` by ALPN only for HTTP/2 checks).
async fn connect(hc: &HealthChecker, host: &Host, h2: bool) -> Result<UpIo, Failed> {
    let s = TcpStream::connect(host.address)
        .await
        .map_err(|e| network(format!("connect: {e}")))?;
    let _ = s.set_nodelay(true);
    match &hc.tls {
        None => Ok(UpIo::Plain(s)),
        Some(tls) => tls
            .connect(s, host.hostname.as_deref(), host.address.ip(), !h2)
            .await
            .map(|s| UpIo::Tls(Box::new(s)))
            .map_err(|e| network(format!("TLS handshake: {e}"))),
    }
}

async fn http_conn(hc: &HealthChecker, host: &Host, h2: bool) -> Result<Conn, Failed> {
    let io = TokioIo::new(connect(hc, host, h2).await?);
    if h2 {
        let (send, conn) =
            hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), io)
                .await
                .map_err(|e| network(format!("h2 handshake: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn::Http2(send))
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(io)
            .await
            .map_err(|e| network(format!("handshake: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn::Http1(send))
    }
}

async fn send(
    conn: &mut Conn,
    req: Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, Failed> {
    let r = match conn {
        Conn::Http1(s) => {
            s.ready().await.map_err(network)?;
            s.send_request(req).await
        }
        Conn::Http2(s) => {
            s.ready().await.map_err(network)?;
            s.send_request(req).await
        }
        Conn::Tcp(_) => return Err(network("not an HTTP connection")),
    };
    r.map_err(network)
}

fn apply_adds(headers: &mut HeaderMap, adds: &[HeaderAdd]) {
    for a in adds {
        let present = headers.contains_key(&a.name);
        match a.action {
            AppendAction::Append => {
                headers.append(a.name.clone(), a.value.clone());
            }
            AppendAction::AddIfAbsent if !present => {
                headers.insert(a.name.clone(), a.value.clone());
            }
            AppendAction::OverwriteOrAdd => {
                headers.insert(a.name.clone(), a.value.clone());
            }
            AppendAction::OverwriteIfExists if present => {
                headers.insert(a.name.clone(), a.value.clone());
            }
            _ => {}
        }
    }
}

/// Envoy's `PayloadMatcher::match`: every segment found, in order.
pub fn payload_match(expected: &[Vec<u8>], buf: &[u8]) -> bool {
    let mut start = 0;
    for seg in expected {
        let Some(hay) = buf.get(start..) else {
            return false;
        };
        match hay
            .windows(seg.len().max(1))
            .position(|w| w == seg.as_slice())
        {
            Some(i) => start += i + seg.len(),
            None => return false,
        }
    }
    true
}

fn in_ranges(code: u16, ranges: &[(u16, u16)]) -> bool {
    ranges.iter().any(|(s, e)| code >= *s && code < *e)
}

/// The request an HTTP check sends (`authority` is `host` or the cluster name).
pub fn http_request(
    cfg: &HttpCheckConfig,
    authority: &str,
) -> Result<Request<Full<Bytes>>, String> {
    let uri = if cfg.http2 {
        format!("http://{authority}{}", cfg.path)
    } else {
        cfg.path.clone()
    };
    let mut req = Request::new(Full::new(cfg.send.clone().unwrap_or_default()));
    *req.method_mut() = cfg.method.clone();
    *req.uri_mut() = uri.parse().map_err(|e| format!("request URI: {e}"))?;
    let h = req.headers_mut();
    if !cfg.http2 {
        h.insert(
            HOST,
            HeaderValue::from_str(authority).map_err(|e| format!("host: {e}"))?,
        );
    }
    h.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    for n in &cfg.headers_to_remove {
        h.remove(n);
    }
    apply_adds(h, &cfg.headers_to_add);
    Ok(req)
}

async fn http_check(
    cfg: &HttpCheckConfig,
    hc: &HealthChecker,
    host: &Host,
    conn: &mut Option<Conn>,
) -> Result<(), Failed> {
    let authority = if cfg.host.is_empty() {
        hc.cluster.as_str()
    } else {
        cfg.host.as_str()
    };
    let req = http_request(cfg, authority).map_err(active)?;
    if !conn.as_ref().is_some_and(Conn::usable) {
        *conn = Some(http_conn(hc, host, cfg.http2).await?);
    }
    let c = conn.as_mut().ok_or_else(|| network("no connection"))?;
    let resp = send(c, req).await?;
    let (parts, mut body) = resp.into_parts();
    // Read the whole body (so the connection can be reused), keeping what `receive` needs.
    let limit = if cfg.response_buffer_size == 0 {
        usize::MAX
    } else {
        cfg.response_buffer_size as usize
    };
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(network)?;
        if let Ok(mut data) = frame.into_data()
            && !cfg.receive.is_empty()
        {
            let take = data.remaining().min(limit.saturating_sub(kept.len()));
            kept.extend_from_slice(&data.copy_to_bytes(take));
        }
    }
    let code = parts.status.as_u16();
    if !cfg.receive.is_empty() && !payload_match(&cfg.receive, &kept) {
        return Err(active(format!("status {code}: body does not match")));
    }
    if !in_ranges(code, &cfg.expected_statuses) {
        let retriable = in_ranges(code, &cfg.retriable_statuses);
        return Err(Failed(
            Failure::Active { retriable },
            format!("unexpected status {code}"),
        ));
    }
    if let Some(m) = &cfg.service_name_matcher {
        hc.stats.verify_cluster.increment(1);
        let v = parts
            .headers
            .get(HEALTHCHECKED_CLUSTER_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !m.matches(v) {
            return Err(active(format!(
                "{HEALTHCHECKED_CLUSTER_HEADER} {v:?} does not match"
            )));
        }
    }
    Ok(())
}

async fn tcp_check(
    cfg: &TcpCheckConfig,
    hc: &HealthChecker,
    host: &Host,
    conn: &mut Option<Conn>,
) -> Result<(), Failed> {
    if cfg.receive.is_empty() {
        // Connect test (plus an optional write); Envoy closes right away.
        *conn = None;
        let mut s = connect(hc, host, false).await?;
        if let Some(p) = &cfg.send {
            s.write_all(p).await.map_err(network)?;
        }
        return Ok(());
    }
    let mut s = match conn.take() {
        Some(Conn::Tcp(s)) => s,
        _ => connect(hc, host, false).await?,
    };
    if let Some(p) = &cfg.send {
        s.write_all(p).await.map_err(network)?;
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.map_err(network)?;
        if n == 0 {
            return Err(network("connection closed before the expected response"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if payload_match(&cfg.receive, &buf) {
            *conn = Some(Conn::Tcp(s));
            return Ok(());
        }
        if buf.len() > MAX_CHECK_BUFFER {
            return Err(active("response too large without a match"));
        }
    }
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

/// `HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: i32 = 1;

/// The framed request body of a gRPC health check.
pub fn grpc_request_body(service: &str) -> Bytes {
    let msg = prost::Message::encode_to_vec(&HealthCheckRequest {
        service: service.to_string(),
    });
    let mut b = Vec::with_capacity(5 + msg.len());
    b.push(0);
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(&msg);
    Bytes::from(b)
}

/// The serving status in a framed `HealthCheckResponse`.
pub fn grpc_response_status(body: &[u8]) -> Result<i32, String> {
    if body.len() < 5 {
        return Err("truncated gRPC message".into());
    }
    if body[0] != 0 {
        return Err("compressed gRPC response".into());
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let msg = body.get(5..5 + len).ok_or("truncated gRPC message")?;
    let r: HealthCheckResponse =
        prost::Message::decode(msg).map_err(|e| format!("bad HealthCheckResponse: {e}"))?;
    Ok(r.status)
}

async fn grpc_check(
    cfg: &GrpcCheckConfig,
    hc: &HealthChecker,
    host: &Host,
    conn: &mut Option<Conn>,
) -> Result<(), Failed> {
    let authority = if cfg.authority.is_empty() {
        hc.cluster.as_str()
    } else {
        cfg.authority.as_str()
    };
    let mut req = Request::new(Full::new(grpc_request_body(&cfg.service_name)));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = format!("http://{authority}/grpc.health.v1.Health/Check")
        .parse()
        .map_err(|e| active(format!("request URI: {e}")))?;
    let h = req.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("te", HeaderValue::from_static("trailers"));
    h.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    apply_adds(h, &cfg.initial_metadata);
    if !conn.as_ref().is_some_and(Conn::usable) {
        *conn = Some(http_conn(hc, host, true).await?);
    }
    let c = conn.as_mut().ok_or_else(|| network("no connection"))?;
    let resp = send(c, req).await?;
    let (parts, mut body) = resp.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(active(format!("non-200 HTTP response {}", parts.status)));
    }
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(network)?;
        match frame.into_data() {
            Ok(mut d) => {
                data.extend_from_slice(&d.copy_to_bytes(d.remaining()));
                if data.len() > MAX_CHECK_BUFFER {
                    return Err(active("gRPC response too large"));
                }
            }
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    // Trailers-only responses carry grpc-status in the headers.
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| parts.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok());
    match status {
        Some(0) => {}
        Some(s) => return Err(active(format!("grpc-status {s}"))),
        None => return Err(active("no grpc-status")),
    }
    match grpc_response_status(&data).map_err(active)? {
        SERVING => Ok(()),
        s => Err(active(format!("serving status {s}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

/// One check of `host`, bounded by the timeout. A network failure drops the connection.
async fn check_once(
    hc: &HealthChecker,
    host: &Host,
    conn: &mut Option<Conn>,
) -> (Outcome, Transition) {
    hc.stats.attempt.increment(1);
    let fut = async {
        match &hc.cfg.checker {
            CheckerConfig::Http(c) => http_check(c, hc, host, conn).await,
            CheckerConfig::Tcp(c) => tcp_check(c, hc, host, conn).await,
            CheckerConfig::Grpc(c) => grpc_check(c, hc, host, conn).await,
        }
    };
    let r = match tokio::time::timeout(hc.cfg.timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(network("timeout")),
    };
    match r {
        Ok(()) => {
            if !hc.cfg.reuse_connection {
                *conn = None;
            }
            (Outcome::Success, hc.on_success(host))
        }
        Err(Failed(kind, detail)) => {
            if kind == Failure::Network || !hc.cfg.reuse_connection {
                *conn = None;
            }
            (Outcome::Failure(kind), hc.on_failure(host, kind, &detail))
        }
    }
}

/// One host's check loop. `first` is signalled after its first check (cluster warming).
async fn session(
    cluster: Weak<Cluster>,
    hc: Arc<HealthChecker>,
    host: Arc<Host>,
    first: tokio::sync::oneshot::Sender<()>,
) {
    let mut first = Some(first);
    let jitter = hc.cfg.initial_jitter.as_millis() as u64;
    if jitter > 0 {
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % jitter)).await;
    }
    let mut conn: Option<Conn> = None;
    loop {
        let (outcome, transition) = check_once(&hc, &host, &mut conn).await;
        if let Some(tx) = first.take() {
            let _ = tx.send(());
        }
        let Some(c) = cluster.upgrade() else { return };
        if outcome == Outcome::Success
            && let Some(d) = &c.outlier
        {
            // A passing active check un-ejects an outlier (Envoy's default).
            d.on_active_hc_success(&c.hosts(), &host, tokio::time::Instant::now());
        }
        let traffic = hc.note_traffic(&c.hosts());
        drop(c);
        let base = base_interval(&hc.cfg, outcome == Outcome::Success, transition, traffic);
        let wait = with_jitter(&hc.cfg, base, rand::random(), rand::random());
        tokio::time::sleep(wait).await;
    }
}

/// The supervisor: one session per host, following host-set changes; marks the cluster warm
/// after every initial host's first check. Ends (aborting the sessions) with the cluster.
pub(crate) async fn run(cluster: Weak<Cluster>) {
    let Some(c) = cluster.upgrade() else { return };
    let Some(hc) = c.health.clone() else { return };
    let mut changes = c.hosts_changed.subscribe();
    let dns_warm = c.warmed.clone();
    drop(c);
    // Initial hosts of a STRICT_DNS cluster exist after its first resolution.
    tokio::select! {
        _ = dns_warm.cancelled() => {}
        r = changes.changed() => if r.is_err() { return },
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mut sessions: HashMap<usize, (Arc<Host>, tokio::task::AbortHandle)> = HashMap::new();
    let mut warming = true;
    loop {
        let Some(c) = cluster.upgrade() else { return };
        let hosts = c.hosts();
        let hc_warmed = c.hc_warmed.clone();
        drop(c);
        let key = |h: &Arc<Host>| Arc::as_ptr(h) as usize;
        let live: std::collections::HashSet<usize> = hosts.iter().map(key).collect();
        sessions.retain(|k, (h, abort)| {
            if live.contains(k) {
                return true;
            }
            abort.abort();
            if h.health.load(Ordering::Acquire) & health_flags::FAILED_ACTIVE_HC == 0 {
                hc.stats.healthy.decrement(1.0);
            }
            false
        });
        let mut firsts = Vec::new();
        for h in hosts.iter() {
            if sessions.contains_key(&key(h)) {
                continue;
            }
            if h.health.load(Ordering::Acquire) & health_flags::FAILED_ACTIVE_HC == 0 {
                hc.stats.healthy.increment(1.0);
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            firsts.push(rx);
            let abort = tasks.spawn(session(cluster.clone(), hc.clone(), h.clone(), tx));
            sessions.insert(key(h), (h.clone(), abort));
        }
        if warming {
            // Each first check ends within initial_jitter + timeout.
            futures::future::join_all(firsts).await;
            hc_warmed.cancel();
            warming = false;
        }
        while tasks.try_join_next().is_some() {}
        if changes.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Store;
    use crate::upstream::translate_cluster;
    use std::net::SocketAddr;

    fn tr(yaml: &str) -> (Vec<HealthCheckConfig>, Vec<String>) {
        let pb: weir_xds_api::pb::envoy::config::cluster::v3::Cluster =
            weir_xds_api::from_yaml(yaml).expect("yaml parses");
        let mut errs = Errors::default();
        let c = translate_cluster(&pb, "clusters[0]", &mut errs);
        (
            c.map(|c| c.health_checks).unwrap_or_default(),
            errs.0.into_iter().map(|e| e.path).collect(),
        )
    }

    fn ok(yaml: &str) -> HealthCheckConfig {
        let (h, errs) = tr(yaml);
        assert!(errs.is_empty(), "{errs:?}");
        h.into_iter().next().expect("one health check")
    }

    const BASE: &str = "name: c\nhealth_checks:\n- timeout: 1s\n  interval: 2s\n  unhealthy_threshold: 3\n  healthy_threshold: 2\n";

    fn cfg(checker: CheckerConfig) -> HealthCheckConfig {
        HealthCheckConfig {
            timeout: Duration::from_secs(1),
            interval: Duration::from_secs(10),
            initial_jitter: Duration::ZERO,
            interval_jitter: Duration::ZERO,
            interval_jitter_percent: 0,
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            reuse_connection: true,
            no_traffic_interval: Duration::from_secs(60),
            no_traffic_healthy_interval: Duration::from_secs(70),
            unhealthy_interval: Duration::from_secs(5),
            unhealthy_edge_interval: Duration::from_secs(1),
            healthy_edge_interval: Duration::from_secs(2),
            always_log_health_check_failures: false,
            always_log_health_check_success: false,
            checker,
        }
    }

    fn tcp() -> CheckerConfig {
        CheckerConfig::Tcp(TcpCheckConfig {
            send: None,
            receive: Vec::new(),
        })
    }

    #[test]
    fn http_translation_with_defaults() {
        let c = ok(&format!("{BASE}  http_health_check: {{path: /healthz}}\n"));
        assert_eq!(c.timeout, Duration::from_secs(1));
        assert_eq!(c.interval, Duration::from_secs(2));
        assert_eq!((c.unhealthy_threshold, c.healthy_threshold), (3, 2));
        assert!(c.reuse_connection);
        assert_eq!(c.no_traffic_interval, Duration::from_secs(60));
        assert_eq!(c.no_traffic_healthy_interval, Duration::from_secs(60));
        assert_eq!(c.unhealthy_interval, Duration::from_secs(2));
        assert_eq!(c.unhealthy_edge_interval, Duration::from_secs(2));
        assert_eq!(c.healthy_edge_interval, Duration::from_secs(2));
        let CheckerConfig::Http(h) = c.checker else {
            panic!("http")
        };
        assert_eq!(h.path, "/healthz");
        assert_eq!(h.method, Method::GET);
        assert_eq!(h.expected_statuses, vec![(200, 201)]);
        assert!(!h.http2);
        assert_eq!(h.response_buffer_size, 1024);
    }

    #[test]
    fn every_supported_field() {
        let c = ok(&format!(
            r#"{BASE}  initial_jitter: 0.1s
  interval_jitter: 0.2s
  interval_jitter_percent: 10
  reuse_connection: false
  no_traffic_interval: 30s
  no_traffic_healthy_interval: 40s
  unhealthy_interval: 3s
  unhealthy_edge_interval: 4s
  healthy_edge_interval: 5s
  always_log_health_check_failures: true
  http_health_check:
    host: hc.example
    path: /ready?x=1
    method: POST
    send: {{text: "68656c6c6f"}}
    receive: [{{binary: "b2s="}}]
    response_buffer_size: 16
    codec_client_type: HTTP2
    expected_statuses: [{{start: 200, end: 300}}]
    retriable_statuses: [{{start: 503, end: 504}}]
    request_headers_to_add:
    - header: {{key: x-hc, value: "1"}}
      append_action: OVERWRITE_IF_EXISTS_OR_ADD
    request_headers_to_remove: [user-agent]
    service_name_matcher: {{prefix: svc}}
"#
        ));
        assert_eq!(c.initial_jitter, Duration::from_millis(100));
        assert_eq!(c.interval_jitter, Duration::from_millis(200));
        assert_eq!(c.interval_jitter_percent, 10);
        assert!(!c.reuse_connection);
        assert_eq!(c.no_traffic_healthy_interval, Duration::from_secs(40));
        assert_eq!(c.unhealthy_interval, Duration::from_secs(3));
        assert_eq!(c.unhealthy_edge_interval, Duration::from_secs(4));
        assert_eq!(c.healthy_edge_interval, Duration::from_secs(5));
        assert!(c.always_log_health_check_failures);
        let CheckerConfig::Http(h) = c.checker else {
            panic!("http")
        };
        assert_eq!(h.host, "hc.example");
        assert_eq!(h.method, Method::POST);
        assert_eq!(h.send.as_deref(), Some(&b"hello"[..]));
        assert_eq!(h.receive, vec![b"ok".to_vec()]);
        assert!(h.http2);
        assert_eq!(h.expected_statuses, vec![(200, 300)]);
        assert_eq!(h.retriable_statuses, vec![(503, 504)]);
        assert_eq!(h.headers_to_add.len(), 1);
        assert_eq!(h.headers_to_add[0].action, AppendAction::OverwriteOrAdd);
        assert_eq!(h.headers_to_remove, vec![USER_AGENT]);
        assert!(
            h.service_name_matcher
                .as_ref()
                .is_some_and(|m| m.matches("svc-a"))
        );
        let req = http_request(&h, "hc.example").expect("request");
        assert_eq!(req.uri().to_string(), "http://hc.example/ready?x=1");
        assert_eq!(req.headers()["x-hc"], "1");
        assert!(req.headers().get(USER_AGENT).is_none());
    }

    #[test]
    fn tcp_and_grpc_translation() {
        let c = ok(&format!(
            "{BASE}  tcp_health_check: {{send: {{text: \"50494e47\"}}, receive: [{{text: \"504f4e47\"}}]}}\n"
        ));
        assert_eq!(
            c.checker,
            CheckerConfig::Tcp(TcpCheckConfig {
                send: Some(Bytes::from_static(b"PING")),
                receive: vec![b"PONG".to_vec()],
            })
        );
        let c = ok(&format!(
            "{BASE}  grpc_health_check: {{service_name: svc, authority: a.example}}\nhttp2_protocol_options: {{}}\n"
        ));
        let CheckerConfig::Grpc(g) = c.checker else {
            panic!("grpc")
        };
        assert_eq!(
            (g.service_name.as_str(), g.authority.as_str()),
            ("svc", "a.example")
        );
    }

    #[test]
    fn rejections_name_their_path() {
        let p = "clusters[0].health_checks[0]";
        for (yaml, want) in [
            (
                "name: c\nhealth_checks: [{interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {}}]\n",
                vec![format!("{p}.timeout")],
            ),
            (
                "name: c\nhealth_checks: [{timeout: 1s, interval: 0s, unhealthy_threshold: 1, healthy_threshold: 1, tcp_health_check: {}}]\n",
                vec![format!("{p}.interval")],
            ),
            (
                "name: c\nhealth_checks: [{timeout: 1s, interval: 1s, healthy_threshold: 1, tcp_health_check: {}}]\n",
                vec![format!("{p}.unhealthy_threshold")],
            ),
            (
                "name: c\nhealth_checks: [{timeout: 1s, interval: 1s, unhealthy_threshold: 1, healthy_threshold: 1}]\n",
                vec![p.to_string()],
            ),
            (
                &format!("{BASE}  http_health_check: {{path: ''}}\n"),
                vec![format!("{p}.http_health_check.path")],
            ),
            (
                &format!(
                    "{BASE}  http_health_check: {{path: /, expected_statuses: [{{start: 300, end: 200}}]}}\n"
                ),
                vec![format!("{p}.http_health_check.expected_statuses[0]")],
            ),
            (
                &format!(
                    "{BASE}  http_health_check: {{path: /, expected_statuses: [{{start: 200, end: 700}}]}}\n"
                ),
                vec![format!("{p}.http_health_check.expected_statuses[0].end")],
            ),
            (
                &format!("{BASE}  http_health_check: {{path: /, codec_client_type: HTTP3}}\n"),
                vec![format!("{p}.http_health_check.codec_client_type")],
            ),
            (
                &format!("{BASE}  http_health_check: {{path: /, send: {{text: '00'}}}}\n"),
                vec![format!("{p}.http_health_check.send")],
            ),
            (
                &format!(
                    "{BASE}  http_health_check: {{path: /, request_headers_to_add: [{{header: {{key: x, value: '%UPSTREAM_REMOTE_ADDRESS%'}}}}]}}\n"
                ),
                vec![format!(
                    "{p}.http_health_check.request_headers_to_add[0].header.value"
                )],
            ),
            (
                &format!("{BASE}  tcp_health_check: {{send: {{text: zz}}}}\n"),
                vec![format!("{p}.tcp_health_check.send.text")],
            ),
            (
                &format!("{BASE}  grpc_health_check: {{}}\n"),
                vec![format!("{p}.grpc_health_check")],
            ),
            (
                &format!("{BASE}  alt_port: 9\n  tcp_health_check: {{}}\n"),
                vec![format!("{p}.alt_port")],
            ),
            (
                &format!("{BASE}  custom_health_check: {{name: x}}\n"),
                vec![format!("{p}.custom_health_check")],
            ),
            (
                &format!(
                    "{BASE}  tcp_health_check: {{}}\n- timeout: 1s\n  interval: 1s\n  unhealthy_threshold: 1\n  healthy_threshold: 1\n  tcp_health_check: {{}}\n"
                ),
                vec!["clusters[0].health_checks[1]".to_string()],
            ),
        ] {
            assert_eq!(tr(yaml).1, want, "{yaml}");
        }
    }

    fn checker(c: HealthCheckConfig) -> (HealthChecker, Arc<Store>) {
        let store = Store::new();
        let hc = HealthChecker::new(c, "c", &store.cluster("c"));
        (hc, store)
    }

    fn pending_host() -> Host {
        Host::new(
            "127.0.0.1:1".parse().expect("addr"),
            None,
            1,
            0,
            health_flags::FAILED_ACTIVE_HC,
        )
    }

    fn failed(h: &Host) -> bool {
        h.health.load(Ordering::Relaxed) & health_flags::FAILED_ACTIVE_HC != 0
    }

    fn stat(store: &Store, name: &str) -> String {
        store
            .text_stat(&format!("cluster.c.health_check.{name}"))
            .unwrap_or_else(|| panic!("no stat {name}"))
    }

    #[test]
    fn first_success_is_immediate_then_thresholds_apply() {
        let (hc, store) = checker(cfg(tcp()));
        let h = pending_host();
        assert_eq!(hc.on_success(&h), Transition::Changed);
        assert!(!failed(&h));
        assert_eq!(stat(&store, "healthy"), "1");
        // Network failures need unhealthy_threshold (3) in a row; a success resets the streak.
        assert_eq!(
            hc.on_failure(&h, Failure::Network, "x"),
            Transition::ChangePending
        );
        assert_eq!(
            hc.on_failure(&h, Failure::Network, "x"),
            Transition::ChangePending
        );
        assert_eq!(hc.on_success(&h), Transition::Unchanged);
        assert_eq!(
            hc.on_failure(&h, Failure::Network, "x"),
            Transition::ChangePending
        );
        assert_eq!(
            hc.on_failure(&h, Failure::Network, "x"),
            Transition::ChangePending
        );
        assert!(!failed(&h));
        assert_eq!(
            hc.on_failure(&h, Failure::Network, "x"),
            Transition::Changed
        );
        assert!(failed(&h));
        assert_eq!(stat(&store, "healthy"), "0");
        // Back to healthy needs healthy_threshold (2) successes in a row now.
        assert_eq!(hc.on_success(&h), Transition::ChangePending);
        assert_eq!(
            hc.on_failure(&h, Failure::Network, "x"),
            Transition::Unchanged
        );
        assert_eq!(hc.on_success(&h), Transition::ChangePending);
        assert!(failed(&h));
        assert_eq!(hc.on_success(&h), Transition::Changed);
        assert!(!failed(&h));
        assert_eq!(stat(&store, "success"), "5");
        assert_eq!(stat(&store, "failure"), "6");
        assert_eq!(stat(&store, "network_failure"), "6");
    }

    #[test]
    fn active_and_passive_failures_are_immediate() {
        let (hc, store) = checker(cfg(tcp()));
        let h = pending_host();
        hc.on_success(&h);
        // A retriable status counts towards the threshold.
        assert_eq!(
            hc.on_failure(&h, Failure::Active { retriable: true }, "503"),
            Transition::ChangePending
        );
        assert_eq!(
            hc.on_failure(&h, Failure::Active { retriable: false }, "500"),
            Transition::Changed
        );
        assert!(failed(&h));
        hc.on_success(&h);
        hc.on_success(&h);
        assert!(!failed(&h));
        assert_eq!(
            hc.on_failure(&h, Failure::Passive, "header"),
            Transition::Changed
        );
        assert!(failed(&h));
        assert_eq!(stat(&store, "passive_failure"), "1");
        assert_eq!(stat(&store, "network_failure"), "0");
        // A host that fails its very first check stays failed.
        let h2 = pending_host();
        assert_eq!(
            hc.on_failure(&h2, Failure::Network, "x"),
            Transition::Unchanged
        );
        assert!(failed(&h2));
    }

    #[test]
    fn intervals_follow_envoy() {
        let c = cfg(tcp());
        use Transition::*;
        assert_eq!(
            base_interval(&c, true, Unchanged, false),
            Duration::from_secs(70)
        );
        assert_eq!(
            base_interval(&c, true, ChangePending, false),
            Duration::from_secs(60)
        );
        assert_eq!(
            base_interval(&c, false, Changed, false),
            Duration::from_secs(60)
        );
        assert_eq!(
            base_interval(&c, true, Unchanged, true),
            Duration::from_secs(10)
        );
        assert_eq!(
            base_interval(&c, true, Changed, true),
            Duration::from_secs(10)
        );
        assert_eq!(
            base_interval(&c, true, ChangePending, true),
            Duration::from_secs(2)
        );
        assert_eq!(
            base_interval(&c, false, Unchanged, true),
            Duration::from_secs(5)
        );
        assert_eq!(
            base_interval(&c, false, ChangePending, true),
            Duration::from_secs(1)
        );
        let mut j = cfg(tcp());
        j.interval_jitter_percent = 10;
        j.interval_jitter = Duration::from_millis(50);
        let b = Duration::from_secs(10);
        assert_eq!(with_jitter(&j, b, 0, 0), b);
        // 10% of 10 s = 1000 ms modulus; 50 ms modulus.
        assert_eq!(
            with_jitter(&j, b, 1999, 149),
            Duration::from_millis(10_999 + 49)
        );
        assert_eq!(
            with_jitter(&cfg(tcp()), Duration::ZERO, 5, 5),
            Duration::from_millis(1)
        );
    }

    #[test]
    fn payloads_and_hex() {
        assert_eq!(decode_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
        let exp = vec![b"ab".to_vec(), b"cd".to_vec()];
        assert!(payload_match(&exp, b"xxabyycdzz"));
        assert!(!payload_match(&exp, b"cdab"), "order matters");
        assert!(!payload_match(&exp, b"ab"));
        assert!(payload_match(&[], b""));
    }

    #[test]
    fn grpc_framing() {
        let b = grpc_request_body("svc");
        assert_eq!(&b[..], &[0, 0, 0, 0, 5, 0x0a, 3, b's', b'v', b'c']);
        let resp = |status: i32| {
            let msg = prost::Message::encode_to_vec(&HealthCheckResponse { status });
            let mut v = vec![0];
            v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            v.extend_from_slice(&msg);
            v
        };
        assert_eq!(grpc_response_status(&resp(SERVING)), Ok(SERVING));
        assert_eq!(grpc_response_status(&resp(2)), Ok(2));
        assert!(grpc_response_status(&[0, 0, 0, 0, 9, 8]).is_err());
        assert!(grpc_response_status(&[1, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn name_matchers() {
        assert!(NameMatcher::Exact("A".into(), true).matches("a"));
        assert!(!NameMatcher::Exact("A".into(), false).matches("a"));
        assert!(NameMatcher::Suffix("-prod".into(), false).matches("svc-prod"));
        assert!(NameMatcher::Contains("vc".into(), false).matches("svc"));
        let r = NameMatcher::Regex(regex::Regex::new(r"\A(?:s.c)\z").expect("re"));
        assert!(r.matches("svc") && !r.matches("svcx"));
    }

    #[tokio::test]
    async fn tcp_check_against_real_sockets() {
        let (hc, _store) = checker(cfg(CheckerConfig::Tcp(TcpCheckConfig {
            send: Some(Bytes::from_static(b"PING")),
            receive: vec![b"PO".to_vec(), b"NG".to_vec()],
        })));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 4];
                    while s.read_exact(&mut b).await.is_ok() {
                        // The answer arrives in two pieces.
                        let _ = s.write_all(b"xxPO").await;
                        let _ = s.write_all(b"NGyy").await;
                    }
                });
            }
        });
        let CheckerConfig::Tcp(c) = &hc.cfg.checker else {
            panic!("tcp")
        };
        let at = |a: SocketAddr| Host::new(a, None, 1, 0, 0);
        let mut conn = None;
        assert!(tcp_check(c, &hc, &at(addr), &mut conn).await.is_ok());
        assert!(conn.is_some(), "kept for reuse");
        assert!(tcp_check(c, &hc, &at(addr), &mut conn).await.is_ok());
        // A closed port is a network failure.
        let closed = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            l.local_addr().expect("addr")
        };
        let mut conn = None;
        match tcp_check(c, &hc, &at(closed), &mut conn).await {
            Err(Failed(Failure::Network, _)) => {}
            Err(Failed(k, d)) => panic!("unexpected failure {k:?}: {d}"),
            Ok(()) => panic!("closed port passed"),
        }
    }

    #[tokio::test]
    async fn strict_dns_hosts_start_pending_and_warm_after_first_check() {
        use crate::upstream::{
            ClusterConfig, ClusterManager, DiscoveryType, DnsLookupFamily, EndpointAddress,
            EndpointConfig, LbPolicy,
        };
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            // Accept and hold connections.
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let mut check = cfg(tcp());
        check.interval = Duration::from_millis(50);
        check.no_traffic_interval = Duration::from_millis(50);
        check.no_traffic_healthy_interval = Duration::from_millis(50);
        let c = Arc::new(ClusterConfig {
            name: "dns".into(),
            discovery: DiscoveryType::StrictDns,
            endpoints: vec![EndpointConfig {
                address: EndpointAddress::Dns {
                    host: "localhost".into(),
                    port,
                },
                hostname: Some("localhost".into()),
                weight: 1,
                priority: 0,
                locality: None,
                health: 0,
            }],
            connect_timeout: Duration::from_secs(1),
            lb_policy: LbPolicy::RoundRobin,
            per_connection_buffer_limit_bytes: 1 << 20,
            dns_refresh_rate: Duration::from_millis(50),
            dns_lookup_family: DnsLookupFamily::V4Only,
            protocol: UpstreamProtocol::Http1,
            idle_timeout: None,
            health_checks: vec![check],
            outlier: None,
            circuit_breakers: Default::default(),
            lb: Default::default(),
            eds: None,
            tls: None,
        });
        let store = Store::new();
        let cm = ClusterManager::new(&[c], &store);
        let cluster = cm.get("dns").expect("cluster");
        cm.start(&tokio::runtime::Handle::current());
        tokio::time::timeout(Duration::from_secs(10), cm.initialized())
            .await
            .expect("warm after the first check");
        let hosts = cluster.hosts();
        assert_eq!(hosts.len(), 1);
        assert!(hosts[0].is_healthy(), "first check passed before warm");
        assert!(cluster.choose_host(&Default::default()).is_some());
        // Later refreshes keep the same host (and its health-check state).
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(Arc::ptr_eq(&cluster.hosts()[0], &hosts[0]));
        assert!(cluster.hosts()[0].is_healthy());
        assert!(cluster.health_checker().is_some());
        // Immediate failure from the router marks it failed; a passing check needs
        // healthy_threshold (2) successes to clear it.
        cluster.immediate_health_check_fail(&hosts[0]);
        assert!(failed(&hosts[0]));
        let mut back = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if hosts[0].is_healthy() {
                back = true;
                break;
            }
        }
        assert!(back, "passing checks clear the immediate failure");
        drop(cluster);
        drop(cm);
    }
}
