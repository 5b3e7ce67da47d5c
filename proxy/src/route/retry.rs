//! Upstream request policies of a route: `retry_policy` (route or virtual host),
//! `request_mirror_policies`, `priority`, `max_stream_duration` and gRPC timeouts.
//!
//! The retry *decision* lives here, pure and unit-tested: [`RetryPolicy::retry_status`] and
//! [`RetryPolicy::retry_error`] say whether an attempt's outcome is retriable under a set of
//! [`RetryOn`] conditions; [`backoff`] is Envoy's jittered exponential back-off. The router
//! (`http::router`) runs the attempts.

use std::time::Duration;

use http::HeaderMap;
use weir_xds_api::pb::envoy::config::core::v3::RoutingPriority;
use weir_xds_api::pb::envoy::config::route::v3 as rpb;
use weir_xds_api::pb::envoy::r#type::v3::fractional_percent::DenominatorType;

use super::RouteRequest;
use super::matcher::HeaderMatch;
use crate::config::{Errors, duration, join};
use crate::upstream::circuit::Priority;

/// A set of `retry_on` conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryOn(u32);

impl RetryOn {
    /// `5xx`: any 5xx, a reset, a connect failure or a per-try timeout.
    pub const FIVE_XX: RetryOn = RetryOn(1);
    /// `gateway-error`: 502, 503, 504, a reset, a connect failure or a per-try timeout.
    pub const GATEWAY_ERROR: RetryOn = RetryOn(1 << 1);
    /// `reset`: no response (reset, disconnect, per-try timeout).
    pub const RESET: RetryOn = RetryOn(1 << 2);
    /// `connect-failure`.
    pub const CONNECT_FAILURE: RetryOn = RetryOn(1 << 3);
    /// `retriable-4xx`: 409.
    pub const RETRIABLE_4XX: RetryOn = RetryOn(1 << 4);
    /// `refused-stream`: HTTP/2 REFUSED_STREAM.
    pub const REFUSED_STREAM: RetryOn = RetryOn(1 << 5);
    /// `retriable-status-codes`.
    pub const RETRIABLE_STATUS_CODES: RetryOn = RetryOn(1 << 6);
    /// `retriable-headers`.
    pub const RETRIABLE_HEADERS: RetryOn = RetryOn(1 << 7);
    /// `envoy-ratelimited`: the response carries `x-envoy-ratelimited`.
    pub const ENVOY_RATELIMITED: RetryOn = RetryOn(1 << 8);
    /// gRPC `cancelled` (1).
    pub const GRPC_CANCELLED: RetryOn = RetryOn(1 << 9);
    /// gRPC `deadline-exceeded` (4).
    pub const GRPC_DEADLINE_EXCEEDED: RetryOn = RetryOn(1 << 10);
    /// gRPC `resource-exhausted` (8).
    pub const GRPC_RESOURCE_EXHAUSTED: RetryOn = RetryOn(1 << 11);
    /// gRPC `internal` (13).
    pub const GRPC_INTERNAL: RetryOn = RetryOn(1 << 12);
    /// gRPC `unavailable` (14).
    pub const GRPC_UNAVAILABLE: RetryOn = RetryOn(1 << 13);

    const NAMES: &[(&str, RetryOn)] = &[
        ("5xx", Self::FIVE_XX),
        ("gateway-error", Self::GATEWAY_ERROR),
        ("reset", Self::RESET),
        ("connect-failure", Self::CONNECT_FAILURE),
        ("retriable-4xx", Self::RETRIABLE_4XX),
        ("refused-stream", Self::REFUSED_STREAM),
        ("retriable-status-codes", Self::RETRIABLE_STATUS_CODES),
        ("retriable-headers", Self::RETRIABLE_HEADERS),
        ("envoy-ratelimited", Self::ENVOY_RATELIMITED),
        ("cancelled", Self::GRPC_CANCELLED),
        ("deadline-exceeded", Self::GRPC_DEADLINE_EXCEEDED),
        ("resource-exhausted", Self::GRPC_RESOURCE_EXHAUSTED),
        ("internal", Self::GRPC_INTERNAL),
        ("unavailable", Self::GRPC_UNAVAILABLE),
    ];

    /// Parse a comma-separated list (`retry_on`, `x-envoy-retry-on`, `x-envoy-retry-grpc-on`).
    /// Returns the set and the tokens it did not know.
    pub fn parse(list: &str) -> (RetryOn, Vec<&str>) {
        let mut on = RetryOn::default();
        let mut unknown = Vec::new();
        for t in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match Self::NAMES.iter().find(|(n, _)| *n == t) {
                Some((_, f)) => on = on | *f,
                None => unknown.push(t),
            }
        }
        (on, unknown)
    }

    /// Whether every condition of `other` is in `self`.
    pub fn contains(self, other: RetryOn) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any condition of `other` is in `self`.
    pub fn any(self, other: RetryOn) -> bool {
        self.0 & other.0 != 0
    }

    /// No condition.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for RetryOn {
    type Output = RetryOn;
    fn bitor(self, rhs: RetryOn) -> RetryOn {
        RetryOn(self.0 | rhs.0)
    }
}

/// Why an attempt got no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptError {
    /// No connection could be made.
    ConnectFailure,
    /// The connection or stream was reset before response headers.
    Reset,
    /// HTTP/2 REFUSED_STREAM.
    RefusedStream,
    /// The per-try timeout fired before response headers.
    PerTryTimeout,
}

/// `retry_back_off`: Envoy's defaults are a 25 ms base and a 10x maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackOff {
    /// `base_interval`.
    pub base: Duration,
    /// `max_interval`.
    pub max: Duration,
}

impl Default for BackOff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(25),
            max: Duration::from_millis(250),
        }
    }
}

/// Envoy's `JitteredExponentialBackOffStrategy`: before retry `n` (1-based) wait a uniformly
/// random time below `(2^n - 1) * base`, capped at `max`.
pub fn backoff(b: &BackOff, retry: u32, random: u64) -> Duration {
    let base = b.base.as_millis().max(1) as u64;
    let mult = (1u64 << retry.clamp(1, 32)) - 1;
    let ceiling = mult.saturating_mul(base).max(1);
    Duration::from_millis((random % ceiling).min(b.max.as_millis() as u64))
}

/// A compiled `RetryPolicy`.
#[derive(Debug)]
pub struct RetryPolicy {
    /// `retry_on`.
    pub retry_on: RetryOn,
    /// `num_retries` (default 1).
    pub num_retries: u32,
    /// `per_try_timeout`.
    pub per_try_timeout: Option<Duration>,
    /// `per_try_idle_timeout`.
    pub per_try_idle_timeout: Option<Duration>,
    /// `retry_back_off`.
    pub back_off: BackOff,
    /// `retry_host_predicate: envoy.retry_host_predicates.previous_hosts`.
    pub previous_hosts: bool,
    /// `host_selection_retry_max_attempts` (default 1).
    pub host_selection_max_attempts: u32,
    /// `retriable_status_codes`.
    pub retriable_status_codes: Vec<u16>,
    /// `retriable_headers` (matched against the response headers).
    pub(super) retriable_headers: Vec<HeaderMatch>,
    /// `retriable_request_headers`: retry only requests matching one of them (if any).
    pub(super) retriable_request_headers: Vec<HeaderMatch>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            retry_on: RetryOn::default(),
            num_retries: 1,
            per_try_timeout: None,
            per_try_idle_timeout: None,
            back_off: BackOff::default(),
            previous_hosts: false,
            host_selection_max_attempts: 1,
            retriable_status_codes: Vec::new(),
            retriable_headers: Vec::new(),
            retriable_request_headers: Vec::new(),
        }
    }
}

const PREVIOUS_HOSTS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";

/// A header map seen through the route matchers (response headers for `retriable_headers`).
fn as_request(headers: &HeaderMap) -> RouteRequest<'_> {
    static GET: http::Method = http::Method::GET;
    RouteRequest {
        authority: "",
        path: "",
        method: &GET,
        headers,
        scheme: "",
    }
}

impl RetryPolicy {
    /// Translate `retry_policy` at `path`.
    pub(super) fn translate(rp: &rpb::RetryPolicy, path: &str, errs: &mut Errors) -> RetryPolicy {
        errs.reject_unsupported(
            rp,
            &[
                "retry_on",
                "num_retries",
                "per_try_timeout",
                "per_try_idle_timeout",
                "retry_back_off",
                "retry_host_predicate",
                "host_selection_retry_max_attempts",
                "retriable_status_codes",
                "retriable_headers",
                "retriable_request_headers",
            ],
            path,
        );
        let (retry_on, unknown) = RetryOn::parse(&rp.retry_on);
        for u in unknown {
            errs.add(
                join(path, "retry_on"),
                format!("unknown retry condition {u:?}"),
            );
        }
        let mut p = RetryPolicy {
            retry_on,
            num_retries: rp.num_retries.as_ref().map_or(1, |n| n.value),
            per_try_timeout: rp
                .per_try_timeout
                .as_ref()
                .map(|d| duration(d, &join(path, "per_try_timeout"), errs))
                .filter(|d| !d.is_zero()),
            per_try_idle_timeout: rp
                .per_try_idle_timeout
                .as_ref()
                .map(|d| duration(d, &join(path, "per_try_idle_timeout"), errs))
                .filter(|d| !d.is_zero()),
            host_selection_max_attempts: if rp.host_selection_retry_max_attempts > 0 {
                rp.host_selection_retry_max_attempts.min(u32::MAX as i64) as u32
            } else {
                1
            },
            ..RetryPolicy::default()
        };
        if let Some(b) = &rp.retry_back_off {
            let bp = join(path, "retry_back_off");
            errs.reject_unsupported(b, &["base_interval", "max_interval"], &bp);
            match &b.base_interval {
                Some(d) => {
                    let base = duration(d, &join(&bp, "base_interval"), errs);
                    if base < Duration::from_millis(1) {
                        errs.add(join(&bp, "base_interval"), "must be at least 1ms");
                    }
                    p.back_off.base = base.max(Duration::from_millis(1));
                }
                None => errs.add(join(&bp, "base_interval"), "base_interval is required"),
            }
            p.back_off.max = match &b.max_interval {
                Some(d) => {
                    let max = duration(d, &join(&bp, "max_interval"), errs);
                    if max < p.back_off.base {
                        errs.add(join(&bp, "max_interval"), "must be at least base_interval");
                    }
                    max.max(p.back_off.base)
                }
                None => p.back_off.base * 10,
            };
        }
        for (i, pred) in rp.retry_host_predicate.iter().enumerate() {
            let pp = join(path, &format!("retry_host_predicate[{i}]"));
            let url = match &pred.config_type {
                Some(rpb::retry_policy::retry_host_predicate::ConfigType::TypedConfig(a)) => {
                    a.type_url.as_str()
                }
                None => "",
            };
            if url == PREVIOUS_HOSTS_TYPE
                || (url.is_empty() && pred.name == "envoy.retry_host_predicates.previous_hosts")
            {
                p.previous_hosts = true;
            } else {
                errs.add(
                    pp,
                    format!(
                        "unsupported retry host predicate {:?} (only \
                         envoy.retry_host_predicates.previous_hosts)",
                        if url.is_empty() { &pred.name } else { url }
                    ),
                );
            }
        }
        for (i, c) in rp.retriable_status_codes.iter().enumerate() {
            match u16::try_from(*c) {
                Ok(c) if (100..=599).contains(&c) => p.retriable_status_codes.push(c),
                _ => errs.add(
                    join(path, &format!("retriable_status_codes[{i}]")),
                    format!("{c} is not an HTTP status"),
                ),
            }
        }
        p.retriable_headers = rp
            .retriable_headers
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                HeaderMatch::translate(h, &join(path, &format!("retriable_headers[{i}]")), errs)
            })
            .collect();
        p.retriable_request_headers = rp
            .retriable_request_headers
            .iter()
            .enumerate()
            .filter_map(|(i, h)| {
                HeaderMatch::translate(
                    h,
                    &join(path, &format!("retriable_request_headers[{i}]")),
                    errs,
                )
            })
            .collect();
        p
    }

    /// Whether the request may be retried at all (`retriable_request_headers`).
    pub fn request_retriable(&self, req: &RouteRequest<'_>) -> bool {
        self.retriable_request_headers.is_empty()
            || self
                .retriable_request_headers
                .iter()
                .any(|m| m.matches(req))
    }

    /// Whether a response is retriable under `on`. `extra_codes` are the request's
    /// `x-envoy-retriable-status-codes`; `extra_header_names` its
    /// `x-envoy-retriable-header-names`. A response with `x-envoy-overloaded` is never
    /// retried (Envoy's rule: the upstream proxy is shedding load).
    pub fn retry_status(
        &self,
        on: RetryOn,
        status: u16,
        headers: &HeaderMap,
        extra_codes: &[u16],
        extra_header_names: &[http::HeaderName],
    ) -> bool {
        if headers
            .get("x-envoy-overloaded")
            .is_some_and(|v| v.as_bytes() == b"true")
        {
            return false;
        }
        if on.contains(RetryOn::FIVE_XX) && (500..600).contains(&status) {
            return true;
        }
        if on.contains(RetryOn::GATEWAY_ERROR) && matches!(status, 502..=504) {
            return true;
        }
        if on.contains(RetryOn::RETRIABLE_4XX) && status == 409 {
            return true;
        }
        if on.contains(RetryOn::RETRIABLE_STATUS_CODES)
            && (self.retriable_status_codes.contains(&status) || extra_codes.contains(&status))
        {
            return true;
        }
        if on.contains(RetryOn::RETRIABLE_HEADERS)
            && (self
                .retriable_headers
                .iter()
                .any(|m| m.matches(&as_request(headers)))
                || extra_header_names.iter().any(|n| headers.contains_key(n)))
        {
            return true;
        }
        if on.contains(RetryOn::ENVOY_RATELIMITED) && headers.contains_key("x-envoy-ratelimited") {
            return true;
        }
        if let Some(code) = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
        {
            let cond = match code {
                1 => RetryOn::GRPC_CANCELLED,
                4 => RetryOn::GRPC_DEADLINE_EXCEEDED,
                8 => RetryOn::GRPC_RESOURCE_EXHAUSTED,
                13 => RetryOn::GRPC_INTERNAL,
                14 => RetryOn::GRPC_UNAVAILABLE,
                _ => return false,
            };
            return on.contains(cond);
        }
        false
    }

    /// Whether an attempt that got no response is retriable under `on`.
    pub fn retry_error(on: RetryOn, e: AttemptError) -> bool {
        let no_response = RetryOn::FIVE_XX | RetryOn::GATEWAY_ERROR | RetryOn::RESET;
        match e {
            AttemptError::ConnectFailure => on.any(no_response | RetryOn::CONNECT_FAILURE),
            AttemptError::RefusedStream => on.any(no_response | RetryOn::REFUSED_STREAM),
            AttemptError::Reset | AttemptError::PerTryTimeout => on.any(no_response),
        }
    }
}

/// `request_mirror_policies[]`.
#[derive(Debug)]
pub struct MirrorPolicy {
    /// `cluster`.
    pub cluster: Box<str>,
    /// `runtime_fraction.default_value` as parts per million (`None`: always).
    pub per_million: Option<u32>,
    /// `disable_shadow_host_suffix_append`.
    pub keep_host: bool,
}

impl MirrorPolicy {
    /// Whether this request is mirrored, for a uniformly random `roll`.
    pub fn sampled(&self, roll: u64) -> bool {
        self.per_million
            .is_none_or(|p| (roll % 1_000_000) < u64::from(p))
    }

    pub(super) fn translate_all(
        ps: &[rpb::route_action::RequestMirrorPolicy],
        path: &str,
        check_cluster: &dyn Fn(&str, &str, &mut Errors),
        errs: &mut Errors,
    ) -> Vec<MirrorPolicy> {
        let mut out = Vec::new();
        for (i, p) in ps.iter().enumerate() {
            let pp = join(path, &format!("request_mirror_policies[{i}]"));
            errs.reject_unsupported(
                p,
                &[
                    "cluster",
                    "runtime_fraction",
                    "disable_shadow_host_suffix_append",
                ],
                &pp,
            );
            if p.cluster.is_empty() {
                errs.add(join(&pp, "cluster"), "cluster is required");
                continue;
            }
            check_cluster(&p.cluster, &join(&pp, "cluster"), errs);
            let per_million = p.runtime_fraction.as_ref().map(|rf| {
                let fp = rf.default_value.unwrap_or_default();
                fraction_per_million(fp.numerator, fp.denominator)
            });
            out.push(MirrorPolicy {
                cluster: p.cluster.as_str().into(),
                per_million,
                keep_host: p.disable_shadow_host_suffix_append,
            });
        }
        out
    }
}

/// A `FractionalPercent` as parts per million (capped at 100 %).
pub fn fraction_per_million(numerator: u32, denominator: i32) -> u32 {
    let scale = match DenominatorType::try_from(denominator) {
        Ok(DenominatorType::TenThousand) => 100,
        Ok(DenominatorType::Million) => 1,
        _ => 10_000,
    };
    numerator.saturating_mul(scale).min(1_000_000)
}

/// The gRPC timeout settings of `max_stream_duration` (or the deprecated `max_grpc_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcTimeout {
    /// `grpc_timeout_header_max`; `None` when 0 (no cap).
    pub max: Option<Duration>,
    /// `grpc_timeout_header_offset`.
    pub offset: Duration,
}

impl GrpcTimeout {
    /// The route timeout for a request carrying `grpc-timeout: value` (`None`: header absent
    /// or malformed, keep the route timeout).
    pub fn timeout(&self, value: Option<&str>) -> Option<Duration> {
        let t = parse_grpc_timeout(value?)?;
        let t = match self.max {
            Some(m) if t.is_zero() || t > m => m,
            _ => t,
        };
        Some(t.saturating_sub(self.offset))
    }
}

/// gRPC's `grpc-timeout`: up to 8 ASCII digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The upstream policies of a forward action.
#[derive(Debug, Default)]
pub struct UpstreamPolicy {
    /// The route's `retry_policy` (the virtual host's applies when `None`).
    pub retry: Option<RetryPolicy>,
    /// `request_mirror_policies` (the virtual host's apply when empty).
    pub mirrors: Vec<MirrorPolicy>,
    /// `priority`.
    pub priority: Priority,
    /// `max_stream_duration.max_stream_duration`.
    pub max_stream_duration: Option<Duration>,
    /// gRPC timeout handling, when `grpc_timeout_header_max` (or `max_grpc_timeout`) is set.
    pub grpc_timeout: Option<GrpcTimeout>,
}

/// The `RouteAction` fields [`UpstreamPolicy::translate`] reads.
pub(super) const FIELDS: &[&str] = &[
    "retry_policy",
    "request_mirror_policies",
    "priority",
    "max_stream_duration",
    "max_grpc_timeout",
    "grpc_timeout_offset",
];

impl UpstreamPolicy {
    #[allow(deprecated)] // max_grpc_timeout / grpc_timeout_offset are still honoured
    pub(super) fn translate(
        ra: &rpb::RouteAction,
        path: &str,
        check_cluster: &dyn Fn(&str, &str, &mut Errors),
        errs: &mut Errors,
    ) -> UpstreamPolicy {
        let retry = ra
            .retry_policy
            .as_ref()
            .map(|rp| RetryPolicy::translate(rp, &join(path, "retry_policy"), errs));
        let mirrors =
            MirrorPolicy::translate_all(&ra.request_mirror_policies, path, check_cluster, errs);
        let priority = match RoutingPriority::try_from(ra.priority) {
            Ok(RoutingPriority::High) => Priority::High,
            Ok(RoutingPriority::Default) => Priority::Default,
            Err(_) => {
                errs.add(
                    join(path, "priority"),
                    format!("unknown priority {}", ra.priority),
                );
                Priority::Default
            }
        };
        let mut max_stream_duration = None;
        let mut grpc_timeout = None;
        if let Some(m) = &ra.max_stream_duration {
            let mp = join(path, "max_stream_duration");
            errs.reject_unsupported(
                m,
                &[
                    "max_stream_duration",
                    "grpc_timeout_header_max",
                    "grpc_timeout_header_offset",
                ],
                &mp,
            );
            max_stream_duration = m
                .max_stream_duration
                .as_ref()
                .map(|d| duration(d, &join(&mp, "max_stream_duration"), errs))
                .filter(|d| !d.is_zero());
            if let Some(max) = &m.grpc_timeout_header_max {
                let max = duration(max, &join(&mp, "grpc_timeout_header_max"), errs);
                let offset = m
                    .grpc_timeout_header_offset
                    .as_ref()
                    .map(|d| duration(d, &join(&mp, "grpc_timeout_header_offset"), errs))
                    .unwrap_or_default();
                grpc_timeout = Some(GrpcTimeout {
                    max: (!max.is_zero()).then_some(max),
                    offset,
                });
            }
        }
        if let Some(max) = &ra.max_grpc_timeout {
            if grpc_timeout.is_some() {
                errs.add(
                    join(path, "max_grpc_timeout"),
                    "set either max_grpc_timeout or max_stream_duration.grpc_timeout_header_max",
                );
            }
            let max = duration(max, &join(path, "max_grpc_timeout"), errs);
            let offset = ra
                .grpc_timeout_offset
                .as_ref()
                .map(|d| duration(d, &join(path, "grpc_timeout_offset"), errs))
                .unwrap_or_default();
            grpc_timeout = Some(GrpcTimeout {
                max: (!max.is_zero()).then_some(max),
                offset,
            });
        }
        UpstreamPolicy {
            retry,
            mirrors,
            priority,
            max_stream_duration,
            grpc_timeout,
        }
    }
}

/// Virtual-host level settings of the same family.
#[derive(Debug, Default)]
pub(super) struct VhostPolicy {
    pub(super) retry: Option<RetryPolicy>,
    pub(super) mirrors: Vec<MirrorPolicy>,
    pub(super) include_request_attempt_count: bool,
    pub(super) include_attempt_count_in_response: bool,
    pub(super) per_request_buffer_limit: Option<u32>,
}

/// The `VirtualHost` fields [`VhostPolicy::translate`] reads.
pub(super) const VHOST_FIELDS: &[&str] = &[
    "retry_policy",
    "request_mirror_policies",
    "include_request_attempt_count",
    "include_attempt_count_in_response",
    "per_request_buffer_limit_bytes",
    "request_body_buffer_limit",
];

/// `request_body_buffer_limit` or the deprecated `per_request_buffer_limit_bytes` (at most
/// one may be set), in bytes.
pub(super) fn buffer_limit(
    deprecated: Option<u32>,
    limit: Option<u64>,
    path: &str,
    errs: &mut Errors,
) -> Option<u32> {
    if deprecated.is_some() && limit.is_some() {
        errs.add(
            join(path, "request_body_buffer_limit"),
            "set only one of per_request_buffer_limit_bytes and request_body_buffer_limit",
        );
    }
    limit
        .map(|l| l.min(u64::from(u32::MAX)) as u32)
        .or(deprecated)
}

impl VhostPolicy {
    #[allow(deprecated)] // per_request_buffer_limit_bytes is still honoured
    pub(super) fn translate(
        vh: &rpb::VirtualHost,
        path: &str,
        check_cluster: &dyn Fn(&str, &str, &mut Errors),
        errs: &mut Errors,
    ) -> VhostPolicy {
        VhostPolicy {
            retry: vh
                .retry_policy
                .as_ref()
                .map(|rp| RetryPolicy::translate(rp, &join(path, "retry_policy"), errs)),
            mirrors: MirrorPolicy::translate_all(
                &vh.request_mirror_policies,
                path,
                check_cluster,
                errs,
            ),
            include_request_attempt_count: vh.include_request_attempt_count,
            include_attempt_count_in_response: vh.include_attempt_count_in_response,
            per_request_buffer_limit: buffer_limit(
                vh.per_request_buffer_limit_bytes.map(|v| v.value),
                vh.request_body_buffer_limit.map(|v| v.value),
                path,
                errs,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> (RetryPolicy, Vec<(String, String)>) {
        let pb: rpb::RetryPolicy = weir_xds_api::from_yaml(yaml).expect("yaml");
        let mut errs = Errors::default();
        let p = RetryPolicy::translate(&pb, "rp", &mut errs);
        (p, errs.0.into_iter().map(|e| (e.path, e.message)).collect())
    }

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        h
    }

    #[test]
    fn parse_retry_on() {
        let (on, unknown) = RetryOn::parse("5xx, connect-failure,bogus,,unavailable");
        assert!(on.contains(RetryOn::FIVE_XX));
        assert!(on.contains(RetryOn::CONNECT_FAILURE));
        assert!(on.contains(RetryOn::GRPC_UNAVAILABLE));
        assert!(!on.contains(RetryOn::RESET));
        assert_eq!(unknown, vec!["bogus"]);
        assert!(RetryOn::parse("").0.is_empty());
    }

    #[test]
    fn translate_defaults_and_fields() {
        let (p, e) = policy("retry_on: 5xx\n");
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(p.num_retries, 1);
        assert_eq!(p.back_off, BackOff::default());
        assert_eq!(p.host_selection_max_attempts, 1);
        let (p, e) = policy(
            "retry_on: gateway-error,retriable-status-codes\nnum_retries: 3\nper_try_timeout: 0.5s\n\
             retry_back_off: {base_interval: 0.1s}\nretriable_status_codes: [418]\n\
             retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts, typed_config: {'@type': type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}]\n\
             host_selection_retry_max_attempts: 5\nretriable_headers: [{name: x-retry, string_match: {exact: 'yes'}}]\n",
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(p.num_retries, 3);
        assert_eq!(p.per_try_timeout, Some(Duration::from_millis(500)));
        assert_eq!(p.back_off.base, Duration::from_millis(100));
        assert_eq!(p.back_off.max, Duration::from_secs(1));
        assert!(p.previous_hosts);
        assert_eq!(p.host_selection_max_attempts, 5);
        assert_eq!(p.retriable_status_codes, vec![418]);
        assert_eq!(p.retriable_headers.len(), 1);
    }

    #[test]
    fn translate_errors_have_paths() {
        let (_, e) = policy(
            "retry_on: 5xx,nope\nretriable_status_codes: [99]\nretry_back_off: {base_interval: 1s, max_interval: 0.5s}\n\
             retry_host_predicate: [{name: envoy.retry_host_predicates.omit_canary_hosts}]\nretry_priority: {name: x}\n",
        );
        let paths: Vec<_> = e.iter().map(|(p, _)| p.as_str()).collect();
        for want in [
            "rp.retry_on",
            "rp.retriable_status_codes[0]",
            "rp.retry_back_off.max_interval",
            "rp.retry_host_predicate[0]",
            "rp.retry_priority",
        ] {
            assert!(paths.contains(&want), "{want} missing in {e:?}");
        }
    }

    #[test]
    fn status_conditions() {
        let (p, _) = policy(
            "retry_on: 5xx\nretriable_status_codes: [418]\nretriable_headers: [{name: x-retry}]\n",
        );
        let none = HeaderMap::new();
        let on = |s: &str| RetryOn::parse(s).0;
        assert!(p.retry_status(on("5xx"), 500, &none, &[], &[]));
        assert!(p.retry_status(on("5xx"), 503, &none, &[], &[]));
        assert!(!p.retry_status(on("5xx"), 404, &none, &[], &[]));
        assert!(p.retry_status(on("gateway-error"), 502, &none, &[], &[]));
        assert!(!p.retry_status(on("gateway-error"), 500, &none, &[], &[]));
        assert!(p.retry_status(on("retriable-4xx"), 409, &none, &[], &[]));
        assert!(!p.retry_status(on("retriable-4xx"), 408, &none, &[], &[]));
        assert!(p.retry_status(on("retriable-status-codes"), 418, &none, &[], &[]));
        assert!(p.retry_status(on("retriable-status-codes"), 429, &none, &[429], &[]));
        assert!(!p.retry_status(on("retriable-status-codes"), 429, &none, &[], &[]));
        assert!(p.retry_status(
            on("retriable-headers"),
            200,
            &hm(&[("x-retry", "1")]),
            &[],
            &[]
        ));
        assert!(!p.retry_status(on("retriable-headers"), 200, &none, &[], &[]));
        let extra = [http::HeaderName::from_static("x-other")];
        assert!(p.retry_status(
            on("retriable-headers"),
            200,
            &hm(&[("x-other", "1")]),
            &[],
            &extra
        ));
        // x-envoy-overloaded is never retried.
        assert!(!p.retry_status(
            on("5xx"),
            503,
            &hm(&[("x-envoy-overloaded", "true")]),
            &[],
            &[]
        ));
        // gRPC status in the (trailers-only) response headers.
        let unavailable = hm(&[("grpc-status", "14")]);
        assert!(p.retry_status(on("unavailable"), 200, &unavailable, &[], &[]));
        assert!(!p.retry_status(on("cancelled,internal"), 200, &unavailable, &[], &[]));
        assert!(p.retry_status(on("internal"), 200, &hm(&[("grpc-status", "13")]), &[], &[]));
        assert!(p.retry_status(
            on("resource-exhausted"),
            200,
            &hm(&[("grpc-status", "8")]),
            &[],
            &[]
        ));
        assert!(p.retry_status(
            on("deadline-exceeded"),
            200,
            &hm(&[("grpc-status", "4")]),
            &[],
            &[]
        ));
        assert!(p.retry_status(on("cancelled"), 200, &hm(&[("grpc-status", "1")]), &[], &[]));
        assert!(!p.retry_status(on("cancelled"), 200, &hm(&[("grpc-status", "0")]), &[], &[]));
        assert!(p.retry_status(
            on("envoy-ratelimited"),
            429,
            &hm(&[("x-envoy-ratelimited", "true")]),
            &[],
            &[]
        ));
    }

    #[test]
    fn error_conditions() {
        use AttemptError::*;
        let on = |s: &str| RetryOn::parse(s).0;
        for c in ["5xx", "gateway-error", "reset"] {
            for e in [ConnectFailure, Reset, RefusedStream, PerTryTimeout] {
                assert!(RetryPolicy::retry_error(on(c), e), "{c} {e:?}");
            }
        }
        assert!(RetryPolicy::retry_error(
            on("connect-failure"),
            ConnectFailure
        ));
        assert!(!RetryPolicy::retry_error(on("connect-failure"), Reset));
        assert!(!RetryPolicy::retry_error(
            on("connect-failure"),
            PerTryTimeout
        ));
        assert!(RetryPolicy::retry_error(
            on("refused-stream"),
            RefusedStream
        ));
        assert!(!RetryPolicy::retry_error(on("refused-stream"), Reset));
        assert!(!RetryPolicy::retry_error(
            on("retriable-4xx"),
            ConnectFailure
        ));
    }

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        let b = BackOff::default();
        // Retry 1: below 25 ms; retry 2: below 75 ms; retry 3: below 175 ms; then capped at 250.
        for r in 0..1000u64 {
            let seed = r.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            assert!(backoff(&b, 1, seed) < Duration::from_millis(25));
            assert!(backoff(&b, 2, seed) < Duration::from_millis(75));
            assert!(backoff(&b, 3, seed) < Duration::from_millis(175));
            assert!(backoff(&b, 10, seed) <= Duration::from_millis(250));
        }
        assert_eq!(backoff(&b, 2, 74), Duration::from_millis(74));
        assert_eq!(backoff(&b, 1, 30), Duration::from_millis(5));
    }

    #[test]
    fn grpc_timeout_parsing_and_caps() {
        assert_eq!(parse_grpc_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_grpc_timeout("5n"), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "1", "1x", "-1S", "123456789S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
        let g = GrpcTimeout {
            max: Some(Duration::from_secs(2)),
            offset: Duration::from_millis(100),
        };
        assert_eq!(g.timeout(Some("1S")), Some(Duration::from_millis(900)));
        assert_eq!(g.timeout(Some("10S")), Some(Duration::from_millis(1900)));
        assert_eq!(g.timeout(Some("0S")), Some(Duration::from_millis(1900)));
        assert_eq!(g.timeout(None), None);
        let uncapped = GrpcTimeout {
            max: None,
            offset: Duration::ZERO,
        };
        assert_eq!(uncapped.timeout(Some("30S")), Some(Duration::from_secs(30)));
    }

    #[test]
    fn mirror_sampling() {
        assert_eq!(fraction_per_million(50, 0), 500_000);
        assert_eq!(fraction_per_million(50, 1), 5_000);
        assert_eq!(fraction_per_million(50, 2), 50);
        assert_eq!(fraction_per_million(200, 0), 1_000_000);
        let m = MirrorPolicy {
            cluster: "s".into(),
            per_million: Some(500_000),
            keep_host: false,
        };
        let hits = (0..10_000u64)
            .filter(|i| m.sampled(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11))
            .count();
        assert!((4_000..6_000).contains(&hits), "{hits}");
        let always = MirrorPolicy {
            per_million: None,
            ..m
        };
        assert!(always.sampled(999_999));
    }
}
