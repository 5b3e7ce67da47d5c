//! Request tracing (HCM `tracing`): trace context propagation (W3C and B3), Envoy's
//! sampling decision, and span export by OTLP/gRPC (`envoy.tracers.opentelemetry`).
//!
//! ```text
//! request head -> context::extract (traceparent | b3 | x-b3-*)
//!              -> Sampling::decide (x-envoy-force-trace, x-client-trace-id, random, overall)
//!              -> SpanContext (same trace id, new span id; parent = caller's span)
//!              -> inject into the upstream request (traceparent, B3 in the caller's forms)
//! response end -> (sampled) Span with Envoy's tags -> otlp::Exporter (bounded queue, batch
//!                 task, export through the named cluster; drops counted)
//! ```

pub mod context;
pub mod otlp;

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use weir_filters::config::Fraction;
use weir_xds_api::pb::envoy::config::trace::v3::{OpenTelemetryConfig, tracing::http::ConfigType};
use weir_xds_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::Tracing;

use crate::config::{Errors, TranslateCtx, join};
use crate::text::AddrBuf;
pub use context::{Decision, Parent, Sampling, Seen, SpanContext};

const OTEL: &str = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig";

/// The OpenTelemetry provider.
#[derive(Debug)]
pub struct OtelProvider {
    /// `grpc_service.envoy_grpc.cluster_name`.
    pub cluster: String,
    /// `service_name` (default `unknown_service:envoy`, as Envoy).
    pub service_name: String,
    stats: otlp::ExporterStats,
    exporter: OnceLock<otlp::Exporter>,
}

/// Translated HCM `tracing`.
#[derive(Debug)]
pub struct TracingConfig {
    /// Sampling.
    pub sampling: Sampling,
    /// `provider` (None: propagate headers only, record no spans).
    pub provider: Option<OtelProvider>,
    /// `max_path_tag_length` (default 256).
    pub max_path_tag_length: usize,
    /// `custom_tags`: literal and environment values resolved at translation, request
    /// headers read per request.
    pub custom_tags: Vec<CustomTag>,
    /// `spawn_upstream_span`: one CLIENT child span per upstream attempt
    /// (`router <cluster> egress`), whose id the upstream sees as its parent.
    pub spawn_upstream_span: bool,
    /// The connection manager's operation, from its listener's `traffic_direction`
    /// (set by the listener translation; `ingress` unless the listener is OUTBOUND).
    pub operation: Operation,
}

/// Envoy's HCM tracing operation: the span name (unless a route `decorator` names it) and
/// kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Operation {
    /// Inbound or unspecified listeners: span `ingress`, kind SERVER.
    #[default]
    Ingress,
    /// OUTBOUND listeners (a sidecar's egress): span `egress`, kind CLIENT.
    Egress,
}

impl Operation {
    /// From a listener's `traffic_direction` (`envoy.config.core.v3.TrafficDirection`).
    pub fn from_traffic_direction(d: i32) -> Self {
        use weir_xds_api::pb::envoy::config::core::v3::TrafficDirection;
        if d == TrafficDirection::Outbound as i32 {
            Operation::Egress
        } else {
            Operation::Ingress
        }
    }

    /// The default span name.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Ingress => "ingress",
            Operation::Egress => "egress",
        }
    }

    /// The span kind.
    pub fn kind(self) -> i32 {
        match self {
            Operation::Ingress => otlp::SPAN_KIND_SERVER,
            Operation::Egress => otlp::SPAN_KIND_CLIENT,
        }
    }
}

/// One `custom_tags` entry.
#[derive(Debug, Clone)]
pub enum CustomTag {
    /// `literal`, or `environment` resolved when the config was translated.
    Fixed {
        /// `tag`.
        tag: String,
        /// The value.
        value: String,
    },
    /// `request_header`: the header's value, else `default_value` (no tag when both are
    /// empty).
    RequestHeader {
        /// `tag`.
        tag: String,
        /// `name`.
        name: http::HeaderName,
        /// `default_value`.
        default: String,
    },
}

impl TracingConfig {
    /// The `request_header` tags of a request (taken before the request moves on).
    pub fn header_tags(&self, h: &http::HeaderMap) -> Vec<(String, String)> {
        self.custom_tags
            .iter()
            .filter_map(|t| match t {
                CustomTag::RequestHeader { tag, name, default } => {
                    let v = h
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or(default.as_str());
                    (!v.is_empty()).then(|| (tag.clone(), v.to_string()))
                }
                CustomTag::Fixed { .. } => None,
            })
            .collect()
    }

    /// The translation-time tags.
    fn fixed_tags(&self) -> impl Iterator<Item = (&str, &str)> {
        self.custom_tags.iter().filter_map(|t| match t {
            CustomTag::Fixed { tag, value } => Some((tag.as_str(), value.as_str())),
            CustomTag::RequestHeader { .. } => None,
        })
    }
}

fn custom_tags(
    tags: &[weir_xds_api::pb::envoy::r#type::tracing::v3::CustomTag],
    path: &str,
    errs: &mut Errors,
) -> Vec<CustomTag> {
    use weir_xds_api::pb::envoy::r#type::tracing::v3::custom_tag::Type;
    let mut out = Vec::new();
    for (i, t) in tags.iter().enumerate() {
        let tp = format!("{path}[{i}]");
        if t.tag.is_empty() {
            errs.add(join(&tp, "tag"), "tag must not be empty");
            continue;
        }
        match &t.r#type {
            Some(Type::Literal(l)) => out.push(CustomTag::Fixed {
                tag: t.tag.clone(),
                value: l.value.clone(),
            }),
            Some(Type::Environment(e)) => {
                let value = std::env::var(&e.name).unwrap_or_else(|_| e.default_value.clone());
                if !value.is_empty() {
                    out.push(CustomTag::Fixed {
                        tag: t.tag.clone(),
                        value,
                    });
                }
            }
            Some(Type::RequestHeader(h)) => match http::HeaderName::try_from(h.name.as_str()) {
                Ok(name) => out.push(CustomTag::RequestHeader {
                    tag: t.tag.clone(),
                    name,
                    default: h.default_value.clone(),
                }),
                Err(_) => errs.add(
                    join(&tp, "request_header.name"),
                    format!("invalid header name {:?}", h.name),
                ),
            },
            Some(Type::Metadata(_)) => errs.add(
                join(&tp, "metadata"),
                "metadata custom tags are not supported (literal, environment and \
                 request_header are)",
            ),
            Some(Type::Value(_)) => errs.add(
                join(&tp, "value"),
                "formatted custom tags are not supported (literal, environment and \
                 request_header are)",
            ),
            None => errs.add(
                tp,
                "one of literal, environment or request_header is required",
            ),
        }
    }
    out
}

fn percent(
    p: Option<&weir_xds_api::pb::envoy::r#type::v3::Percent>,
    path: &str,
    errs: &mut Errors,
) -> Fraction {
    let Some(p) = p else { return Fraction::ALL };
    if !(0.0..=100.0).contains(&p.value) || p.value.is_nan() {
        errs.add(join(path, "value"), "must be within [0, 100]");
        return Fraction::ALL;
    }
    Fraction {
        numerator: (p.value * 10_000.0).round() as u64,
        denominator: 1_000_000,
    }
}

/// Translate HCM `tracing` at `path`.
pub fn translate(
    t: &Tracing,
    path: &str,
    ctx: &TranslateCtx<'_>,
    errs: &mut Errors,
) -> TracingConfig {
    errs.reject_unsupported(
        t,
        &[
            "client_sampling",
            "random_sampling",
            "overall_sampling",
            "provider",
            "max_path_tag_length",
            "verbose",
            "custom_tags",
            "spawn_upstream_span",
        ],
        path,
    );
    let sampling = Sampling {
        client: percent(
            t.client_sampling.as_ref(),
            &join(path, "client_sampling"),
            errs,
        ),
        random: percent(
            t.random_sampling.as_ref(),
            &join(path, "random_sampling"),
            errs,
        ),
        overall: percent(
            t.overall_sampling.as_ref(),
            &join(path, "overall_sampling"),
            errs,
        ),
    };
    let provider = t.provider.as_ref().and_then(|p| {
        let pp = join(path, "provider");
        errs.reject_unsupported(p, &["name", "typed_config"], &pp);
        let tp = join(&pp, "typed_config");
        let Some(ConfigType::TypedConfig(any)) = &p.config_type else {
            errs.add(tp, "typed_config is required");
            return None;
        };
        if any.type_url != OTEL {
            errs.add(
                tp,
                format!(
                    "unsupported tracer {:?} (envoy.tracers.opentelemetry is supported)",
                    any.type_url
                ),
            );
            return None;
        }
        let o: OpenTelemetryConfig = match weir_xds_api::unpack(any) {
            Ok(o) => o,
            Err(e) => {
                errs.add(tp, e.to_string());
                return None;
            }
        };
        errs.reject_unsupported(&o, &["grpc_service", "service_name"], &tp);
        let gp = join(&tp, "grpc_service");
        let Some(g) = &o.grpc_service else {
            errs.add(
                gp,
                "grpc_service is required (http_service is not supported)",
            );
            return None;
        };
        errs.reject_unsupported(g, &["envoy_grpc", "timeout"], &gp);
        use weir_xds_api::pb::envoy::config::core::v3::grpc_service::TargetSpecifier;
        let cluster = match &g.target_specifier {
            Some(TargetSpecifier::EnvoyGrpc(e)) => e.cluster_name.clone(),
            _ => {
                errs.add(
                    join(&gp, "envoy_grpc"),
                    "envoy_grpc.cluster_name is required",
                );
                return None;
            }
        };
        if !ctx.clusters.contains(cluster.as_str()) && !ctx.rds_table {
            errs.add(
                join(&gp, "envoy_grpc.cluster_name"),
                format!("unknown cluster {cluster:?}"),
            );
            return None;
        }
        Some(OtelProvider {
            cluster,
            service_name: if o.service_name.is_empty() {
                "unknown_service:envoy".into()
            } else {
                o.service_name.clone()
            },
            stats: otlp::ExporterStats::new(ctx.stats),
            exporter: OnceLock::new(),
        })
    });
    TracingConfig {
        sampling,
        provider,
        max_path_tag_length: t.max_path_tag_length.map_or(256, |v| v.value as usize),
        custom_tags: custom_tags(&t.custom_tags, &join(path, "custom_tags"), errs),
        spawn_upstream_span: t.spawn_upstream_span.is_some_and(|v| v.value),
        operation: Operation::Ingress,
    }
}

/// Facts of a finished request for its span.
#[derive(Debug, Clone)]
pub struct SpanFacts<'a> {
    /// The span's context.
    pub ctx: SpanContext,
    /// The span name: the route's `decorator.operation`, else the operation's name.
    pub name: &'a str,
    /// The span kind (`Operation::kind`, CLIENT for upstream spans).
    pub kind: i32,
    /// Custom tags: the request's header tags (the configuration's fixed tags are added by
    /// [`TracingConfig::build_span`]).
    pub tags: &'a [(String, String)],
    /// `tracestate` as received.
    pub tracestate: Option<&'a str>,
    /// Start.
    pub start: SystemTime,
    /// End.
    pub end: SystemTime,
    /// `:authority`.
    pub authority: &'a str,
    /// Path with query.
    pub path: &'a str,
    /// Method.
    pub method: &'a str,
    /// `http` / `https`.
    pub scheme: &'a str,
    /// Protocol (`HTTP/1.1`).
    pub protocol: &'a str,
    /// Response status (0: none).
    pub status: u16,
    /// Response flags.
    pub flags: crate::access_log::ResponseFlags,
    /// Upstream cluster.
    pub upstream_cluster: Option<&'a str>,
    /// Upstream host.
    pub upstream_host: Option<std::net::SocketAddr>,
    /// `x-request-id`.
    pub request_id: Option<&'a str>,
    /// `user-agent`.
    pub user_agent: Option<&'a str>,
    /// The peer: the downstream address (without port) on request spans, the upstream
    /// host (with port) on upstream spans.
    pub peer_address: PeerAddress,
    /// Peer identity (URI SANs of the client certificate).
    pub peer_uri_san: Option<String>,
    /// Peer subject.
    pub peer_subject: Option<&'a str>,
    /// `node.id`.
    pub node_id: &'a str,
    /// Request body bytes.
    pub request_size: u64,
    /// Response body bytes.
    pub response_size: u64,
}

fn ns(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Envoy's request span: named by the route decorator or the HCM operation (`ingress` /
/// `egress`), kind SERVER or CLIENT, and the HCM tags (`component`, `node_id`, `guid:x-request-id`, `http.url`,
/// `http.method`, `http.protocol`, `user_agent`, `peer.address`, `request_size`,
/// `response_size`, `upstream_cluster`, `upstream_address`, `http.status_code`,
/// `response_flags`, `error` on 5xx / no response), plus the peer identity.
pub fn build_span(f: &SpanFacts<'_>, max_path: usize) -> otlp::Span {
    use otlp::KeyValue as Kv;
    let mut url = format!("{}://{}{}", f.scheme, f.authority, f.path);
    if url.len() > max_path {
        let mut end = max_path;
        while !url.is_char_boundary(end) {
            end -= 1;
        }
        url.truncate(end);
    }
    let mut addr = AddrBuf::default();
    let peer = f.peer_address.text(&mut addr).to_string();
    let upstream_host = f
        .upstream_host
        .map(|h| AddrBuf::default().socket(h).to_string());
    let mut attrs = vec![
        Kv::string("component", "proxy"),
        Kv::string("node_id", f.node_id),
        Kv::string("http.url", url),
        Kv::string("http.method", f.method),
        Kv::string("http.protocol", f.protocol),
        Kv::string("downstream_cluster", "-"),
        Kv::string("user_agent", f.user_agent.unwrap_or("-")),
        Kv::string("peer.address", peer),
        Kv::string("request_size", f.request_size.to_string()),
        Kv::string("response_size", f.response_size.to_string()),
        Kv::string("http.status_code", f.status.to_string()),
        Kv::string("response_flags", f.flags.to_string_envoy()),
    ];
    if let Some(id) = f.request_id {
        attrs.push(Kv::string("guid:x-request-id", id));
    }
    if let Some(c) = f.upstream_cluster {
        attrs.push(Kv::string("upstream_cluster", c));
        attrs.push(Kv::string("upstream_cluster.name", c));
    }
    if let Some(h) = upstream_host {
        attrs.push(Kv::string("upstream_address", h));
    }
    if let Some(s) = &f.peer_uri_san {
        attrs.push(Kv::string("peer.uri_san", s.clone()));
    }
    if let Some(s) = f.peer_subject {
        attrs.push(Kv::string("peer.subject", s));
    }
    for (k, v) in f.tags {
        attrs.push(Kv::string(k.as_str(), v.as_str()));
    }
    let error = f.status == 0 || f.status >= 500;
    if error {
        attrs.push(Kv::string("error", "true"));
    }
    otlp::Span {
        trace_id: f.ctx.trace_id.to_be_bytes().to_vec(),
        span_id: f.ctx.span_id.to_be_bytes().to_vec(),
        trace_state: f.tracestate.unwrap_or("").to_string(),
        parent_span_id: f
            .ctx
            .parent_span_id
            .map(|p| p.to_be_bytes().to_vec())
            .unwrap_or_default(),
        name: f.name.to_string(),
        kind: f.kind,
        start_time_unix_nano: ns(f.start),
        end_time_unix_nano: ns(f.end),
        attributes: attrs,
        status: error.then(|| otlp::Status {
            message: String::new(),
            code: otlp::STATUS_ERROR,
        }),
    }
}

/// The peer address tag of a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAddress {
    /// A downstream peer: the IP only.
    Ip(std::net::IpAddr),
    /// An upstream host: address and port.
    Socket(std::net::SocketAddr),
}

impl PeerAddress {
    /// As a span's `peer.address` shows it.
    fn text(self, buf: &mut AddrBuf) -> &str {
        match self {
            PeerAddress::Ip(ip) => buf.ip(ip),
            PeerAddress::Socket(a) => buf.socket(a),
        }
    }
}

/// What [`encode_span`] reserves besides the variable-length values.
const SPAN_FIXED_BYTES: usize = 640;

/// [`build_span`] encoded straight to protobuf bytes (the same message, byte for byte, as
/// prost encodes `build_span`'s result with `fixed` tags appended), without the owned
/// attribute strings: what request handling records.
pub fn encode_span<'t>(
    f: &SpanFacts<'_>,
    max_path: usize,
    fixed: impl Iterator<Item = (&'t str, &'t str)>,
) -> otlp::EncodedSpan {
    const ATTR: u32 = 9;
    // The fixed part of a span (ids, times, ~16 attribute keys and short values) is ~500
    // bytes; the variable values are added. One allocation, normally no regrowth, and for a
    // typical request under glibc's per-thread cache limit (1 KiB), which a 1 KiB + n
    // reservation exceeded (a slower malloc path for every span).
    let var = f.authority.len()
        + f.path.len().min(max_path)
        + f.user_agent.map_or(0, str::len)
        + f.request_id.map_or(0, str::len)
        + f.tracestate.map_or(0, str::len)
        + f.tags
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>();
    let mut v = Vec::with_capacity(SPAN_FIXED_BYTES + var);
    let mut e = otlp::Enc(&mut v);
    e.bytes(1, &f.ctx.trace_id.to_be_bytes());
    e.bytes(2, &f.ctx.span_id.to_be_bytes());
    e.string(3, f.tracestate.unwrap_or(""));
    if let Some(p) = f.ctx.parent_span_id {
        e.bytes(4, &p.to_be_bytes());
    }
    e.string(5, f.name);
    e.int32(6, f.kind);
    e.fixed64(7, ns(f.start));
    e.fixed64(8, ns(f.end));
    e.attr(ATTR, "component", "proxy");
    e.attr(ATTR, "node_id", f.node_id);
    e.attr_parts(
        ATTR,
        "http.url",
        &[f.scheme, "://", f.authority, f.path],
        max_path,
    );
    e.attr(ATTR, "http.method", f.method);
    e.attr(ATTR, "http.protocol", f.protocol);
    e.attr(ATTR, "downstream_cluster", "-");
    e.attr(ATTR, "user_agent", f.user_agent.unwrap_or("-"));
    let mut addr = AddrBuf::default();
    e.attr(ATTR, "peer.address", f.peer_address.text(&mut addr));
    e.attr_u64(ATTR, "request_size", f.request_size);
    e.attr_u64(ATTR, "response_size", f.response_size);
    e.attr_u64(ATTR, "http.status_code", u64::from(f.status));
    e.attr(ATTR, "response_flags", &f.flags.rendered());
    if let Some(id) = f.request_id {
        e.attr(ATTR, "guid:x-request-id", id);
    }
    if let Some(c) = f.upstream_cluster {
        e.attr(ATTR, "upstream_cluster", c);
        e.attr(ATTR, "upstream_cluster.name", c);
    }
    if let Some(h) = f.upstream_host {
        e.attr(ATTR, "upstream_address", addr.socket(h));
    }
    if let Some(s) = &f.peer_uri_san {
        e.attr(ATTR, "peer.uri_san", s);
    }
    if let Some(s) = f.peer_subject {
        e.attr(ATTR, "peer.subject", s);
    }
    for (k, v) in f.tags {
        e.attr(ATTR, k, v);
    }
    let error = f.status == 0 || f.status >= 500;
    if error {
        e.attr(ATTR, "error", "true");
    }
    for (k, v) in fixed {
        e.attr(ATTR, k, v);
    }
    if error {
        e.message(15, |m| m.int32(3, otlp::STATUS_ERROR));
    }
    otlp::EncodedSpan(v)
}

impl TracingConfig {
    /// [`build_span`] with this configuration's path length and fixed custom tags.
    pub fn build_span(&self, f: &SpanFacts<'_>) -> otlp::Span {
        let mut s = build_span(f, self.max_path_tag_length);
        for (k, v) in self.fixed_tags() {
            s.attributes.push(otlp::KeyValue::string(k, v));
        }
        s
    }

    /// [`encode_span`] with this configuration's path length and fixed custom tags.
    pub fn encode_span(&self, f: &SpanFacts<'_>) -> otlp::EncodedSpan {
        encode_span(f, self.max_path_tag_length, self.fixed_tags())
    }

    /// Record a finished, sampled span (starts the exporter on first use).
    pub fn record(&self, span: otlp::EncodedSpan, clusters: &Arc<crate::upstream::ClusterManager>) {
        let Some(p) = &self.provider else { return };
        let exp = p.exporter.get_or_init(|| {
            otlp::Exporter::start(
                clusters.clone(),
                p.cluster.clone(),
                vec![otlp::KeyValue::string(
                    "service.name",
                    p.service_name.clone(),
                )],
                p.stats.clone(),
            )
        });
        exp.export(span);
    }
}

/// An upstream attempt's CLIENT span (`spawn_upstream_span`): a child of the request's
/// span, injected into the attempt's headers so the upstream's parent is this span; recorded
/// when dropped (the attempt got its response headers or failed).
pub struct UpstreamSpan {
    hcm: Arc<crate::config::hcm::HcmConfig>,
    clusters: Arc<crate::upstream::ClusterManager>,
    ctx: SpanContext,
    start: SystemTime,
    name: String,
    cluster: String,
    host: std::net::SocketAddr,
    url: (String, String, String),
    protocol: &'static str,
    node_id: String,
    status: u16,
}

impl std::fmt::Debug for UpstreamSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamSpan")
            .field("ctx", &self.ctx)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What an upstream attempt's span reports.
#[derive(Debug)]
pub struct UpstreamAttempt<'a> {
    /// Cluster.
    pub cluster: &'a str,
    /// Host address.
    pub host: std::net::SocketAddr,
    /// `:authority` as sent.
    pub authority: &'a str,
    /// Path.
    pub path: &'a str,
    /// Method.
    pub method: &'a str,
    /// Downstream protocol.
    pub protocol: &'static str,
}

impl UpstreamSpan {
    /// Start an attempt's span when the HCM spawns upstream spans and the request's span is
    /// sampled and exported; rewrites the trace headers in `headers` to name it as the
    /// upstream's parent.
    pub fn start(
        hcm: &Arc<crate::config::hcm::HcmConfig>,
        state: &crate::server::ServerState,
        parent: Option<SpanContext>,
        seen: Seen,
        a: &UpstreamAttempt<'_>,
        headers: &mut http::HeaderMap,
    ) -> Option<Self> {
        let tc = hcm.tracing.as_ref()?;
        let parent = parent.filter(|p| p.sampled)?;
        if !tc.spawn_upstream_span || tc.provider.is_none() {
            return None;
        }
        let id: u64 = rand::random();
        let ctx = SpanContext {
            trace_id: parent.trace_id,
            span_id: if id == 0 { 1 } else { id },
            parent_span_id: Some(parent.span_id),
            sampled: true,
        };
        ctx.inject(headers, seen);
        Some(Self {
            hcm: hcm.clone(),
            clusters: state.clusters.clone(),
            ctx,
            start: SystemTime::now(),
            name: format!("router {} egress", a.cluster),
            cluster: a.cluster.to_string(),
            host: a.host,
            url: (a.authority.into(), a.path.into(), a.method.into()),
            protocol: a.protocol,
            node_id: state.snapshot.load().node.id.clone(),
            status: 0,
        })
    }

    /// The attempt's response status.
    pub fn set_status(&mut self, status: u16) {
        self.status = status;
    }
}

impl Drop for UpstreamSpan {
    fn drop(&mut self) {
        let Some(tc) = &self.hcm.tracing else { return };
        let f = SpanFacts {
            ctx: self.ctx,
            name: &self.name,
            kind: otlp::SPAN_KIND_CLIENT,
            tags: &[],
            tracestate: None,
            start: self.start,
            end: SystemTime::now(),
            authority: &self.url.0,
            path: &self.url.1,
            method: &self.url.2,
            scheme: "http",
            protocol: self.protocol,
            status: self.status,
            flags: crate::access_log::ResponseFlags::default(),
            upstream_cluster: Some(&self.cluster),
            upstream_host: Some(self.host),
            request_id: None,
            user_agent: None,
            peer_address: PeerAddress::Socket(self.host),
            peer_uri_san: None,
            peer_subject: None,
            node_id: &self.node_id,
            request_size: 0,
            response_size: 0,
        };
        tc.record(
            encode_span(&f, tc.max_path_tag_length, std::iter::empty()),
            &self.clusters,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Store;

    fn tr(yaml: &str, clusters: &[&str]) -> Result<TracingConfig, Vec<(String, String)>> {
        let t: Tracing =
            weir_xds_api::from_yaml(yaml).map_err(|e| vec![(String::new(), e.to_string())])?;
        let clusters: std::collections::HashSet<&str> = clusters.iter().copied().collect();
        let stats = Store::new();
        let ctx = TranslateCtx {
            clusters: &clusters,
            stats: &stats,
            rds: None,
            rds_table: false,
        };
        let mut errs = Errors::default();
        let out = translate(&t, "hcm.tracing", &ctx, &mut errs);
        if errs.is_empty() {
            Ok(out)
        } else {
            Err(errs.0.into_iter().map(|e| (e.path, e.message)).collect())
        }
    }

    #[test]
    fn translates_sampling_and_provider() {
        let t = tr(
            "random_sampling: {value: 25}\noverall_sampling: {value: 0.5}\nprovider: {name: envoy.tracers.opentelemetry, typed_config: {'@type': type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig, grpc_service: {envoy_grpc: {cluster_name: otel}}, service_name: edge}}\n",
            &["otel"],
        )
        .expect("valid");
        assert_eq!(
            t.sampling.random,
            Fraction {
                numerator: 250_000,
                denominator: 1_000_000
            }
        );
        assert_eq!(
            t.sampling.overall,
            Fraction {
                numerator: 5_000,
                denominator: 1_000_000
            }
        );
        assert_eq!(t.sampling.client, Fraction::ALL);
        let p = t.provider.expect("provider");
        assert_eq!(p.cluster, "otel");
        assert_eq!(p.service_name, "edge");
        assert!(tr("{}", &[]).expect("valid").provider.is_none());
    }

    #[test]
    fn bad_tracing_has_paths() {
        let e = tr(
            "random_sampling: {value: 101}\nprovider: {name: z, typed_config: {'@type': type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig, grpc_service: {envoy_grpc: {cluster_name: nope}}}}\n",
            &[],
        )
        .expect_err("invalid");
        let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert!(
            paths.contains(&"hcm.tracing.random_sampling.value"),
            "{e:?}"
        );
        assert!(
            paths.contains(
                &"hcm.tracing.provider.typed_config.grpc_service.envoy_grpc.cluster_name"
            ),
            "{e:?}"
        );
        let e = tr(
            "provider: {name: z, typed_config: {'@type': type.googleapis.com/envoy.config.trace.v3.ZipkinConfig}}\n",
            &[],
        )
        .expect_err("invalid");
        assert_eq!(e[0].0, "hcm.tracing.provider.typed_config");
    }

    #[test]
    fn span_has_envoy_tags() {
        let ctx = SpanContext {
            trace_id: 5,
            span_id: 6,
            parent_span_id: Some(7),
            sampled: true,
        };
        let tags = vec![("tenant".to_string(), "t1".to_string())];
        let f = SpanFacts {
            ctx,
            name: "ingress",
            kind: otlp::SPAN_KIND_SERVER,
            tags: &tags,
            tracestate: Some("a=b"),
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(3),
            authority: "example.com",
            path: "/very/long/path",
            method: "GET",
            scheme: "http",
            protocol: "HTTP/1.1",
            status: 503,
            flags: {
                let mut f = crate::access_log::ResponseFlags::default();
                f.set(crate::access_log::Flag::NoHealthyUpstream);
                f
            },
            upstream_cluster: Some("backend"),
            upstream_host: None,
            request_id: Some("rid"),
            user_agent: None,
            peer_address: PeerAddress::Ip("10.0.0.1".parse().expect("ip")),
            peer_uri_san: Some("spiffe://td/ns/a/sa/b".into()),
            peer_subject: None,
            node_id: "node-1",
            request_size: 0,
            response_size: 19,
        };
        let s = build_span(&f, 20);
        let get = |k: &str| {
            s.attributes
                .iter()
                .find(|a| a.key == k)
                .and_then(|a| a.as_str())
        };
        assert_eq!(get("http.url"), Some("http://example.com/v"));
        assert_eq!(get("http.status_code"), Some("503"));
        assert_eq!(get("response_flags"), Some("UH"));
        assert_eq!(get("upstream_cluster"), Some("backend"));
        assert_eq!(get("guid:x-request-id"), Some("rid"));
        assert_eq!(get("node_id"), Some("node-1"));
        assert_eq!(get("component"), Some("proxy"));
        assert_eq!(get("peer.uri_san"), Some("spiffe://td/ns/a/sa/b"));
        assert_eq!(get("error"), Some("true"));
        assert_eq!(get("tenant"), Some("t1"));
        assert_eq!(s.name, "ingress");
        assert_eq!(s.parent_span_id, 7u64.to_be_bytes().to_vec());
        assert_eq!(s.trace_id.len(), 16);
        assert_eq!(s.kind, otlp::SPAN_KIND_SERVER);
        assert_eq!(s.end_time_unix_nano, 3_000_000);
        assert_eq!(s.status.expect("error status").code, otlp::STATUS_ERROR);
    }

    #[test]
    fn direct_encoding_is_prosts_encoding_of_build_span() {
        use prost::Message;
        let tags = vec![("tenant".to_string(), "t1".to_string())];
        let fixed = [("zone", "z1"), ("env", "")];
        let mut two = crate::access_log::ResponseFlags::default();
        two.set(crate::access_log::Flag::UpstreamRetryLimitExceeded);
        two.set(crate::access_log::Flag::UpstreamConnectionFailure);
        let base = SpanFacts {
            ctx: SpanContext {
                trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
                span_id: 0x00f067aa0ba902b7,
                parent_span_id: None,
                sampled: true,
            },
            name: "ingress",
            kind: otlp::SPAN_KIND_SERVER,
            tags: &[],
            tracestate: None,
            start: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123),
            end: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_125),
            authority: "svc.example.com",
            path: "/api/é/items?page=2",
            method: "GET",
            scheme: "http",
            protocol: "HTTP/1.1",
            status: 200,
            flags: crate::access_log::ResponseFlags::default(),
            upstream_cluster: Some("backend"),
            upstream_host: Some("127.0.0.1:18080".parse().expect("addr")),
            request_id: Some("6a1c43f2-51e1-4a0c-9b62-0c1f0a43a1f1"),
            user_agent: Some("wrk/4.2"),
            peer_address: PeerAddress::Ip("10.0.0.1".parse().expect("ip")),
            peer_uri_san: None,
            peer_subject: None,
            node_id: "node-1",
            request_size: 0,
            response_size: 19,
        };
        let variants = [
            base.clone(),
            // Parent, tracestate, tags, error status, two flags, a cut inside "é".
            SpanFacts {
                ctx: SpanContext {
                    parent_span_id: Some(7),
                    ..base.ctx
                },
                tracestate: Some("a=b"),
                tags: &tags,
                status: 503,
                flags: two,
                ..base.clone()
            },
            // An upstream span: no response, peer with port, TLS identity, IPv6.
            SpanFacts {
                kind: otlp::SPAN_KIND_CLIENT,
                status: 0,
                upstream_host: Some("[::1]:9000".parse().expect("addr")),
                peer_address: PeerAddress::Socket("[::1]:9000".parse().expect("addr")),
                peer_uri_san: Some("spiffe://td/ns/a/sa/b".into()),
                peer_subject: Some("CN=client"),
                user_agent: None,
                request_id: None,
                upstream_cluster: None,
                ..base.clone()
            },
        ];
        for (i, f) in variants.iter().enumerate() {
            for max in [256, 24, 26] {
                let mut want = build_span(f, max);
                for (k, v) in fixed {
                    want.attributes.push(otlp::KeyValue::string(k, v));
                }
                let got = encode_span(f, max, fixed.into_iter());
                assert_eq!(got.0, want.encode_to_vec(), "variant {i}, max {max}");
                assert_eq!(got.decode().expect("decodes"), want);
            }
        }
    }

    #[test]
    fn custom_tags_and_upstream_span_translate() {
        // A variable name nothing sets.
        let t = tr(
            "spawn_upstream_span: true\ncustom_tags:\n- {tag: zone, literal: {value: z1}}\n- {tag: env, environment: {name: WEIR_TEST_UNSET_VAR_FOR_TAGS, default_value: dflt}}\n- {tag: env2, environment: {name: WEIR_TEST_UNSET_VAR_FOR_TAGS}}\n- {tag: tenant, request_header: {name: x-tenant, default_value: none}}\n- {tag: user, request_header: {name: x-user}}\n",
            &[],
        )
        .expect("valid");
        assert!(t.spawn_upstream_span);
        assert_eq!(t.operation, Operation::Ingress);
        let fixed: Vec<_> = t.fixed_tags().collect();
        // An unset variable without a default gives no tag.
        assert_eq!(fixed, vec![("zone", "z1"), ("env", "dflt")]);
        let mut h = http::HeaderMap::new();
        assert_eq!(
            t.header_tags(&h),
            vec![("tenant".to_string(), "none".to_string())]
        );
        h.insert("x-tenant", http::HeaderValue::from_static("acme"));
        h.insert("x-user", http::HeaderValue::from_static("u1"));
        assert_eq!(
            t.header_tags(&h),
            vec![
                ("tenant".to_string(), "acme".to_string()),
                ("user".to_string(), "u1".to_string())
            ]
        );
        let e = tr(
            "custom_tags:\n- {tag: a, metadata: {}}\n- {tag: '', literal: {value: x}}\n- {tag: b, request_header: {name: 'bad header'}}\n- {tag: c}\n",
            &[],
        )
        .expect_err("invalid");
        let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "hcm.tracing.custom_tags[0].metadata",
                "hcm.tracing.custom_tags[1].tag",
                "hcm.tracing.custom_tags[2].request_header.name",
                "hcm.tracing.custom_tags[3]"
            ]
        );
    }

    #[test]
    fn operation_follows_traffic_direction() {
        use weir_xds_api::pb::envoy::config::core::v3::TrafficDirection as D;
        assert_eq!(
            Operation::from_traffic_direction(D::Outbound as i32),
            Operation::Egress
        );
        assert_eq!(
            Operation::from_traffic_direction(D::Inbound as i32),
            Operation::Ingress
        );
        assert_eq!(
            Operation::from_traffic_direction(D::Unspecified as i32),
            Operation::Ingress
        );
        assert_eq!(Operation::Egress.name(), "egress");
        assert_eq!(Operation::Egress.kind(), otlp::SPAN_KIND_CLIENT);
        assert_eq!(Operation::Ingress.kind(), otlp::SPAN_KIND_SERVER);
    }
}
