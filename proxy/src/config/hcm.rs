//! `envoy.filters.network.http_connection_manager` config: translation and the compiled
//! [`HcmConfig`] the connection manager ([`crate::http`]) runs with.
//!
//! Defaults follow Envoy, tightened where `HARDENING.md` asks for edge-safe values
//! (documented per field).

use std::time::Duration;

use http::HeaderValue;
use metrics::{Counter, Gauge, Histogram};
use weir_xds_api::pb::envoy::config::core::v3 as core;
use weir_xds_api::pb::envoy::extensions::filters::http::router::v3::Router;
use weir_xds_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    self as hcm_pb, HttpConnectionManager, http_connection_manager as hcm_enums,
};
use weir_xds_api::type_urls;

use crate::config::{Errors, TranslateCtx, duration_or, join};
use crate::route::filters::{ProxyFactoryContext, merge_errors};
use crate::route::{RouteHandle, RouteTable};
use crate::stats::Scope;

/// Downstream codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Detect HTTP/1.1 or HTTP/2 (prior knowledge preface).
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only.
    Http2,
}

/// `headers_with_underscores_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnderscoresAction {
    /// Keep them (Envoy's default).
    Allow,
    /// Answer 400 (HTTP/1) / reset (HTTP/2).
    Reject,
    /// Drop the header.
    Drop,
}

/// `path_with_escaped_slashes_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// Keep `%2F`/`%5C` as they are (default).
    Keep,
    /// 400.
    Reject,
    /// Unescape, then redirect the client to the unescaped path.
    UnescapeAndRedirect,
    /// Unescape and forward.
    UnescapeAndForward,
}

/// `server_header_transformation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerHeader {
    /// Always set `server` to `server_name`.
    Overwrite,
    /// Set it only when the upstream did not.
    AppendIfAbsent,
    /// Leave the upstream's value (or none).
    PassThrough,
}

/// HTTP/2 server settings.
#[derive(Debug, Clone, Copy)]
pub struct Http2Settings {
    /// SETTINGS_MAX_CONCURRENT_STREAMS. Default 100 (edge-safe; Envoy's is 2^31-1).
    pub max_concurrent_streams: u32,
    /// Stream flow-control window. Default 64 KiB (edge-safe; Envoy's is 256 MiB).
    pub initial_stream_window_size: u32,
    /// Connection flow-control window. Default 1 MiB.
    pub initial_connection_window_size: u32,
}

/// `http.<stat_prefix>.*` stats.
#[derive(Debug, Clone)]
pub struct HcmStats {
    /// `downstream_cx_total`.
    pub downstream_cx_total: Counter,
    /// `downstream_cx_active`.
    pub downstream_cx_active: Gauge,
    /// `downstream_cx_http1_total`.
    pub downstream_cx_http1_total: Counter,
    /// `downstream_cx_http2_total`.
    pub downstream_cx_http2_total: Counter,
    /// `downstream_cx_destroy`.
    pub downstream_cx_destroy: Counter,
    /// `downstream_cx_idle_timeout`.
    pub downstream_cx_idle_timeout: Counter,
    /// `downstream_cx_drain_close`.
    pub downstream_cx_drain_close: Counter,
    /// `downstream_cx_overload_disable_keepalive`: responses that closed their connection
    /// because of `envoy.overload_actions.disable_http_keepalive`.
    pub downstream_cx_overload_disable_keepalive: Counter,
    /// `downstream_rq_overload_close`: requests answered 503 because of
    /// `envoy.overload_actions.stop_accepting_requests`.
    pub downstream_rq_overload_close: Counter,
    /// `downstream_cx_protocol_error`.
    pub downstream_cx_protocol_error: Counter,
    /// `downstream_rq_total`.
    pub downstream_rq_total: Counter,
    /// `downstream_rq_http1_total`.
    pub downstream_rq_http1_total: Counter,
    /// `downstream_rq_http2_total`.
    pub downstream_rq_http2_total: Counter,
    /// `downstream_rq_active`.
    pub downstream_rq_active: Gauge,
    /// `downstream_rq_{1..5}xx`.
    pub downstream_rq_xx: [Counter; 5],
    /// `downstream_rq_time` (ms).
    pub downstream_rq_time: Histogram,
    /// `downstream_rq_timeout` (request_timeout fired).
    pub downstream_rq_timeout: Counter,
    /// `downstream_rq_max_duration_reached` (route `max_stream_duration` fired).
    pub downstream_rq_max_duration_reached: Counter,
    /// `downstream_rq_idle_timeout` (stream idle timeout fired).
    pub downstream_rq_idle_timeout: Counter,
    /// `downstream_rq_rx_reset`: the client went away before the response ended.
    pub downstream_rq_rx_reset: Counter,
    /// `downstream_rq_tx_reset`: weir reset the stream (upstream failed mid-response, timer).
    pub downstream_rq_tx_reset: Counter,
    /// `downstream_rq_too_large` (headers over the limit).
    pub downstream_rq_too_large: Counter,
    /// `downstream_rq_ws_on_non_ws_route`.
    pub downstream_rq_ws_on_non_ws_route: Counter,
    /// `no_route`.
    pub no_route: Counter,
    /// `no_cluster`.
    pub no_cluster: Counter,
    /// `rq_direct_response`.
    pub rq_direct_response: Counter,
    /// `rq_redirect`.
    pub rq_redirect: Counter,
}

impl HcmStats {
    /// Register under `http.<prefix>.`.
    pub fn new(s: &Scope) -> Self {
        Self {
            downstream_cx_total: s.counter("downstream_cx_total"),
            downstream_cx_active: s.gauge("downstream_cx_active"),
            downstream_cx_http1_total: s.counter("downstream_cx_http1_total"),
            downstream_cx_http2_total: s.counter("downstream_cx_http2_total"),
            downstream_cx_destroy: s.counter("downstream_cx_destroy"),
            downstream_cx_idle_timeout: s.counter("downstream_cx_idle_timeout"),
            downstream_cx_drain_close: s.counter("downstream_cx_drain_close"),
            downstream_cx_overload_disable_keepalive: s
                .counter("downstream_cx_overload_disable_keepalive"),
            downstream_rq_overload_close: s.counter("downstream_rq_overload_close"),
            downstream_cx_protocol_error: s.counter("downstream_cx_protocol_error"),
            downstream_rq_total: s.counter("downstream_rq_total"),
            downstream_rq_http1_total: s.counter("downstream_rq_http1_total"),
            downstream_rq_http2_total: s.counter("downstream_rq_http2_total"),
            downstream_rq_active: s.gauge("downstream_rq_active"),
            downstream_rq_xx: s.class_counters("downstream_rq"),
            downstream_rq_time: s.histogram("downstream_rq_time"),
            downstream_rq_timeout: s.counter("downstream_rq_timeout"),
            downstream_rq_max_duration_reached: s.counter("downstream_rq_max_duration_reached"),
            downstream_rq_idle_timeout: s.counter("downstream_rq_idle_timeout"),
            downstream_rq_rx_reset: s.counter("downstream_rq_rx_reset"),
            downstream_rq_tx_reset: s.counter("downstream_rq_tx_reset"),
            downstream_rq_too_large: s.counter("downstream_rq_too_large"),
            downstream_rq_ws_on_non_ws_route: s.counter("downstream_rq_ws_on_non_ws_route"),
            no_route: s.counter("no_route"),
            no_cluster: s.counter("no_cluster"),
            rq_direct_response: s.counter("rq_direct_response"),
            rq_redirect: s.counter("rq_redirect"),
        }
    }
}

/// Translated HTTP connection manager.
#[derive(Debug)]
pub struct HcmConfig {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// `codec_type`.
    pub codec: Codec,
    /// The route table: inline `route_config` (fixed) or an RDS slot updated in place.
    pub routes: RouteHandle,
    /// Non-terminal HTTP filters, in order (the router is implicit and last).
    pub http_filters: weir_filters::FilterChain,
    /// Router `suppress_envoy_headers`.
    pub suppress_envoy_headers: bool,
    /// `server` header value (`server_name`, default `weir`).
    pub server_name: HeaderValue,
    /// `server_header_transformation`.
    pub server_header: ServerHeader,
    /// `use_remote_address`.
    pub use_remote_address: bool,
    /// `xff_num_trusted_hops`.
    pub xff_num_trusted_hops: u32,
    /// `skip_xff_append`.
    pub skip_xff_append: bool,
    /// `generate_request_id` (default true).
    pub generate_request_id: bool,
    /// `preserve_external_request_id`.
    pub preserve_external_request_id: bool,
    /// `always_set_request_id_in_response`.
    pub always_set_request_id_in_response: bool,
    /// `common_http_protocol_options.idle_timeout` (default 1 h; `None` = disabled).
    pub idle_timeout: Option<Duration>,
    /// `common_http_protocol_options.max_headers_count` (default 100).
    pub max_headers_count: usize,
    /// `common_http_protocol_options.headers_with_underscores_action`.
    pub headers_with_underscores: UnderscoresAction,
    /// `common_http_protocol_options.max_requests_per_connection` (None = unlimited).
    pub max_requests_per_connection: Option<u32>,
    /// `max_request_headers_kb` in bytes (default 60 KiB).
    pub max_request_headers_bytes: usize,
    /// HTTP/2 settings.
    pub http2: Http2Settings,
    /// `request_timeout` (default disabled).
    pub request_timeout: Option<Duration>,
    /// Timer for reading a request head (`request_headers_timeout`, default 60 s). On HTTP/1
    /// hyper arms it as soon as the connection waits for a head, so it also bounds keep-alive
    /// idle time between requests.
    pub request_headers_timeout: Duration,
    /// `stream_idle_timeout` (default 5 min; `None` = disabled).
    pub stream_idle_timeout: Option<Duration>,
    /// `drain_timeout` (default 5 s): when the listener drains, an HTTP/1 connection keeps
    /// serving this long, each response carrying `Connection: close`, before an idle one is
    /// closed (HTTP/2 gets GOAWAY at once and finishes its streams).
    pub drain_timeout: Duration,
    /// `normalize_path` (default false).
    pub normalize_path: bool,
    /// `merge_slashes`.
    pub merge_slashes: bool,
    /// `path_with_escaped_slashes_action`.
    pub escaped_slashes: EscapedSlashes,
    /// `upgrade_configs` with `upgrade_type: websocket` enabled.
    pub websocket: bool,
    /// `upgrade_configs` with `upgrade_type: CONNECT` enabled: CONNECT requests are routed
    /// (only `connect_matcher` routes match them). Without it CONNECT gets 400.
    pub connect: bool,
    /// `strip_matching_host_port`.
    pub strip_matching_host_port: bool,
    /// `forward_client_cert_details` / `set_current_client_cert_details` (XFCC).
    pub xfcc: crate::http::sanitize::XfccConfig,
    /// Stats.
    pub stats: HcmStats,
    /// `access_log` (observability block).
    pub access_logs: crate::access_log::AccessLogs,
    /// `tracing` (observability block); `None`: no trace headers touched, no spans.
    pub tracing: Option<crate::trace::TracingConfig>,
}

const HCM_FIELDS: &[&str] = &[
    "codec_type",
    "stat_prefix",
    "http_filters",
    "route_config",
    "rds",
    "common_http_protocol_options",
    "http_protocol_options",
    "http2_protocol_options",
    "server_name",
    "server_header_transformation",
    "max_request_headers_kb",
    "stream_idle_timeout",
    "request_timeout",
    "request_headers_timeout",
    "drain_timeout",
    "delayed_close_timeout",
    "use_remote_address",
    "xff_num_trusted_hops",
    "skip_xff_append",
    "generate_request_id",
    "preserve_external_request_id",
    "always_set_request_id_in_response",
    "upgrade_configs",
    "normalize_path",
    "merge_slashes",
    "path_with_escaped_slashes_action",
    "strip_matching_host_port",
    // Observability block.
    "access_log",
    "tracing",
    // XFCC (TLS helper's block, see `xfcc_config`).
    "forward_client_cert_details",
    "set_current_client_cert_details",
];

// ---- XFCC (TLS helper's block) ----

/// `forward_client_cert_details` and `set_current_client_cert_details`.
fn xfcc_config(
    h: &HttpConnectionManager,
    path: &str,
    errs: &mut Errors,
) -> crate::http::sanitize::XfccConfig {
    use crate::http::sanitize::{ForwardClientCert as F, XfccConfig, XfccDetails};
    use hcm_enums::ForwardClientCertDetails as P;
    let mode = match P::try_from(h.forward_client_cert_details) {
        Ok(P::Sanitize) => F::Sanitize,
        Ok(P::ForwardOnly) => F::ForwardOnly,
        Ok(P::AppendForward) => F::AppendForward,
        Ok(P::SanitizeSet) => F::SanitizeSet,
        Ok(P::AlwaysForwardOnly) => F::AlwaysForwardOnly,
        Err(_) => {
            errs.add(
                join(path, "forward_client_cert_details"),
                "unknown forward_client_cert_details",
            );
            F::Sanitize
        }
    };
    let details = match &h.set_current_client_cert_details {
        None => XfccDetails::default(),
        Some(d) => {
            let p = join(path, "set_current_client_cert_details");
            errs.reject_unsupported(d, &["subject", "cert", "uri", "dns"], &p);
            XfccDetails {
                subject: d.subject.is_some_and(|b| b.value),
                uri: d.uri,
                cert: d.cert,
                dns: d.dns,
            }
        }
    };
    XfccConfig { mode, details }
}

/// Translate an HCM `typed_config` (already unpacked) at `path`.
pub fn translate_hcm(
    h: &HttpConnectionManager,
    path: &str,
    ctx: &TranslateCtx<'_>,
    errs: &mut Errors,
) -> Option<HcmConfig> {
    errs.reject_unsupported(h, HCM_FIELDS, path);
    if h.stat_prefix.is_empty() {
        errs.add(join(path, "stat_prefix"), "stat_prefix is required");
    }
    let codec = match hcm_enums::CodecType::try_from(h.codec_type) {
        Ok(hcm_enums::CodecType::Auto) => Codec::Auto,
        Ok(hcm_enums::CodecType::Http1) => Codec::Http1,
        Ok(hcm_enums::CodecType::Http2) => Codec::Http2,
        _ => {
            errs.add(
                join(path, "codec_type"),
                "only AUTO, HTTP1 and HTTP2 are supported",
            );
            Codec::Auto
        }
    };
    let (routes, inline) = match &h.route_specifier {
        Some(hcm_enums::RouteSpecifier::RouteConfig(rc)) => {
            let t = RouteTable::translate(rc, &join(path, "route_config"), ctx, errs);
            (RouteHandle::fixed(t), true)
        }
        Some(hcm_enums::RouteSpecifier::Rds(rds)) => {
            let rpath = join(path, "rds");
            errs.reject_unsupported(rds, &["config_source", "route_config_name"], &rpath);
            if rds.route_config_name.is_empty() {
                errs.add(
                    join(&rpath, "route_config_name"),
                    "route_config_name is required",
                );
            }
            let source = match &rds.config_source {
                Some(cs) => {
                    crate::config::source::translate(cs, &join(&rpath, "config_source"), errs)?
                }
                None => {
                    errs.add(join(&rpath, "config_source"), "config_source is required");
                    return None;
                }
            };
            let handle = match ctx.rds {
                Some(reg) => reg.handle(&rds.route_config_name, &source, &h.stat_prefix, ctx.stats),
                None => crate::route::RdsRegistry::default().handle(
                    &rds.route_config_name,
                    &source,
                    &h.stat_prefix,
                    ctx.stats,
                ),
            };
            (handle, false)
        }
        Some(_) => {
            errs.add(
                join(path, "scoped_routes"),
                "scoped_routes is not supported (use route_config or rds)",
            );
            return None;
        }
        None => {
            errs.add(
                join(path, "route_config"),
                "route_config or rds is required",
            );
            return None;
        }
    };

    let (http_filters, suppress_envoy_headers) =
        translate_http_filters(&h.http_filters, path, ctx, &h.stat_prefix, errs);
    // A per-route config under a filter's name must be that filter's type; otherwise the
    // filter could not use it.
    let table = routes.slot().table();
    for u in table.filter_configs().iter().filter(|_| inline) {
        if let Some(e) = http_filters.entries().iter().find(|e| e.name == u.name)
            && e.type_url != u.type_url
        {
            errs.add(
                &u.path,
                format!(
                    "HTTP filter {:?} is {}, but this config is {}",
                    u.name,
                    weir_xds_api::type_name(&e.type_url),
                    weir_xds_api::type_name(&u.type_url)
                ),
            );
        }
    }

    let server_name = if h.server_name.is_empty() {
        "weir"
    } else {
        h.server_name.as_str()
    };
    let server_name = HeaderValue::from_str(server_name).unwrap_or_else(|_| {
        errs.add(join(path, "server_name"), "not a valid header value");
        HeaderValue::from_static("weir")
    });
    let server_header =
        match hcm_enums::ServerHeaderTransformation::try_from(h.server_header_transformation) {
            Ok(hcm_enums::ServerHeaderTransformation::Overwrite) => ServerHeader::Overwrite,
            Ok(hcm_enums::ServerHeaderTransformation::AppendIfAbsent) => {
                ServerHeader::AppendIfAbsent
            }
            Ok(hcm_enums::ServerHeaderTransformation::PassThrough) => ServerHeader::PassThrough,
            Err(_) => {
                errs.add(join(path, "server_header_transformation"), "unknown value");
                ServerHeader::Overwrite
            }
        };

    let cpo_path = join(path, "common_http_protocol_options");
    let default_cpo = core::HttpProtocolOptions::default();
    let cpo = h
        .common_http_protocol_options
        .as_ref()
        .unwrap_or(&default_cpo);
    errs.reject_unsupported(
        cpo,
        &[
            "idle_timeout",
            "max_headers_count",
            "headers_with_underscores_action",
            "max_requests_per_connection",
        ],
        &cpo_path,
    );
    let idle_timeout = non_zero(duration_or(
        cpo.idle_timeout.as_ref(),
        Duration::from_secs(3600),
        &join(&cpo_path, "idle_timeout"),
        errs,
    ));
    let max_headers_count = cpo.max_headers_count.map(|v| v.value).unwrap_or(100);
    if max_headers_count == 0 {
        errs.add(join(&cpo_path, "max_headers_count"), "must be at least 1");
    }
    let headers_with_underscores =
        match core::http_protocol_options::HeadersWithUnderscoresAction::try_from(
            cpo.headers_with_underscores_action,
        ) {
            Ok(core::http_protocol_options::HeadersWithUnderscoresAction::Allow) => {
                UnderscoresAction::Allow
            }
            Ok(core::http_protocol_options::HeadersWithUnderscoresAction::RejectRequest) => {
                UnderscoresAction::Reject
            }
            Ok(core::http_protocol_options::HeadersWithUnderscoresAction::DropHeader) => {
                UnderscoresAction::Drop
            }
            Err(_) => {
                errs.add(
                    join(&cpo_path, "headers_with_underscores_action"),
                    "unknown value",
                );
                UnderscoresAction::Allow
            }
        };
    let max_requests_per_connection = cpo
        .max_requests_per_connection
        .map(|v| v.value)
        .filter(|v| *v > 0);

    if let Some(h1) = &h.http_protocol_options {
        // Every Http1ProtocolOptions knob changes parsing or framing; none is supported yet.
        errs.reject_unsupported(h1, &[], &join(path, "http_protocol_options"));
    }
    let h2_path = join(path, "http2_protocol_options");
    let default_h2 = core::Http2ProtocolOptions::default();
    let h2 = h.http2_protocol_options.as_ref().unwrap_or(&default_h2);
    errs.reject_unsupported(
        h2,
        &[
            "max_concurrent_streams",
            "initial_stream_window_size",
            "initial_connection_window_size",
            "hpack_table_size",
        ],
        &h2_path,
    );
    let http2 = Http2Settings {
        max_concurrent_streams: h2
            .max_concurrent_streams
            .map(|v| v.value)
            .unwrap_or(100)
            .max(1),
        initial_stream_window_size: window(
            h2.initial_stream_window_size.map(|v| v.value),
            65_535,
            &join(&h2_path, "initial_stream_window_size"),
            errs,
        ),
        initial_connection_window_size: window(
            h2.initial_connection_window_size.map(|v| v.value),
            1 << 20,
            &join(&h2_path, "initial_connection_window_size"),
            errs,
        ),
    };

    let max_kb = h.max_request_headers_kb.map(|v| v.value).unwrap_or(60);
    if max_kb == 0 || max_kb > 8192 {
        errs.add(
            join(path, "max_request_headers_kb"),
            "must be between 1 and 8192",
        );
    }

    let request_timeout = non_zero(duration_or(
        h.request_timeout.as_ref(),
        Duration::ZERO,
        &join(path, "request_timeout"),
        errs,
    ));
    let request_headers_timeout = non_zero(duration_or(
        h.request_headers_timeout.as_ref(),
        Duration::ZERO,
        &join(path, "request_headers_timeout"),
        errs,
    ))
    .unwrap_or(Duration::from_secs(60));
    let drain_timeout = duration_or(
        h.drain_timeout.as_ref(),
        Duration::from_secs(5),
        &join(path, "drain_timeout"),
        errs,
    );
    let stream_idle_timeout = non_zero(duration_or(
        h.stream_idle_timeout.as_ref(),
        Duration::from_secs(300),
        &join(path, "stream_idle_timeout"),
        errs,
    ));

    let escaped_slashes =
        match hcm_enums::PathWithEscapedSlashesAction::try_from(h.path_with_escaped_slashes_action)
        {
            Ok(hcm_enums::PathWithEscapedSlashesAction::ImplementationSpecificDefault)
            | Ok(hcm_enums::PathWithEscapedSlashesAction::KeepUnchanged) => EscapedSlashes::Keep,
            Ok(hcm_enums::PathWithEscapedSlashesAction::RejectRequest) => EscapedSlashes::Reject,
            Ok(hcm_enums::PathWithEscapedSlashesAction::UnescapeAndRedirect) => {
                EscapedSlashes::UnescapeAndRedirect
            }
            Ok(hcm_enums::PathWithEscapedSlashesAction::UnescapeAndForward) => {
                EscapedSlashes::UnescapeAndForward
            }
            Err(_) => {
                errs.add(
                    join(path, "path_with_escaped_slashes_action"),
                    "unknown value",
                );
                EscapedSlashes::Keep
            }
        };

    let mut websocket = false;
    let mut connect = false;
    for (i, u) in h.upgrade_configs.iter().enumerate() {
        let p = format!("{path}.upgrade_configs[{i}]");
        errs.reject_unsupported(u, &["upgrade_type", "enabled"], &p);
        let enabled = u.enabled.map(|b| b.value).unwrap_or(true);
        if u.upgrade_type.eq_ignore_ascii_case("websocket") {
            websocket = enabled;
        } else if u.upgrade_type.eq_ignore_ascii_case("CONNECT") {
            connect = enabled;
        } else {
            errs.add(
                join(&p, "upgrade_type"),
                format!(
                    "upgrade type {:?} is not supported (only websocket and CONNECT)",
                    u.upgrade_type
                ),
            );
        }
    }

    Some(HcmConfig {
        stat_prefix: h.stat_prefix.clone(),
        codec,
        routes,
        http_filters,
        suppress_envoy_headers,
        server_name,
        server_header,
        use_remote_address: h.use_remote_address.map(|b| b.value).unwrap_or(false),
        xff_num_trusted_hops: h.xff_num_trusted_hops,
        skip_xff_append: h.skip_xff_append,
        generate_request_id: h.generate_request_id.map(|b| b.value).unwrap_or(true),
        preserve_external_request_id: h.preserve_external_request_id,
        always_set_request_id_in_response: h.always_set_request_id_in_response,
        idle_timeout,
        max_headers_count: max_headers_count.max(1) as usize,
        headers_with_underscores,
        max_requests_per_connection,
        max_request_headers_bytes: (max_kb.clamp(1, 8192) as usize) * 1024,
        http2,
        request_timeout,
        request_headers_timeout,
        drain_timeout,
        stream_idle_timeout,
        normalize_path: h.normalize_path.map(|b| b.value).unwrap_or(false),
        merge_slashes: h.merge_slashes,
        escaped_slashes,
        websocket,
        connect,
        strip_matching_host_port: h.strip_matching_host_port,
        xfcc: xfcc_config(h, path, errs),
        stats: HcmStats::new(&ctx.stats.http(&h.stat_prefix)),
        // Observability block.
        access_logs: crate::access_log::translate(
            &h.access_log,
            &join(path, "access_log"),
            ctx,
            errs,
        ),
        tracing: h
            .tracing
            .as_ref()
            .map(|t| crate::trace::translate(t, &join(path, "tracing"), ctx, errs)),
    })
}

fn non_zero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

fn window(v: Option<u32>, default: u32, path: &str, errs: &mut Errors) -> u32 {
    let v = v.unwrap_or(default);
    if !(65_535..=2_147_483_647).contains(&v) {
        errs.add(path, "must be between 65535 and 2147483647");
        return default;
    }
    v
}

/// The filter list must end with the router; every other filter is built by its factory in
/// the built-in [`weir_filters::Registry`] (by `typed_config` type URL, as Envoy). A filter
/// weir does not have is an error at its path unless `is_optional` (then skipped);
/// `disabled` filters run only on routes whose `typed_per_filter_config` enables them.
fn translate_http_filters(
    filters: &[hcm_pb::HttpFilter],
    path: &str,
    ctx: &TranslateCtx<'_>,
    stat_prefix: &str,
    errs: &mut Errors,
) -> (weir_filters::FilterChain, bool) {
    let registry = weir_filters::Registry::builtin();
    let fctx = ProxyFactoryContext {
        ctx,
        hcm_prefix: stat_prefix,
    };
    let mut suppress = false;
    let mut out = Vec::new();
    if filters.is_empty() {
        errs.add(
            join(path, "http_filters"),
            "the last HTTP filter must be envoy.filters.http.router",
        );
    }
    let mut names = std::collections::HashSet::new();
    for (i, f) in filters.iter().enumerate() {
        let p = format!("{path}.http_filters[{i}]");
        let last = i + 1 == filters.len();
        errs.reject_unsupported(f, &["name", "typed_config", "is_optional", "disabled"], &p);
        if f.name.is_empty() {
            errs.add(join(&p, "name"), "name is required");
        } else if !names.insert(f.name.as_str()) {
            errs.add(
                join(&p, "name"),
                format!("duplicate HTTP filter name {:?}", f.name),
            );
        }
        let any = match &f.config_type {
            Some(hcm_pb::http_filter::ConfigType::TypedConfig(any)) => Some(any),
            Some(_) => {
                errs.add(
                    join(&p, "config_discovery"),
                    "filter config discovery is not supported",
                );
                continue;
            }
            // Envoy resolves a filter without typed_config by its name.
            None if f.name == "envoy.filters.http.router" => None,
            None => {
                errs.add(join(&p, "typed_config"), "typed_config is required");
                continue;
            }
        };
        let type_url = any.map_or(type_urls::ROUTER, |a| a.type_url.as_str());
        let tp = join(&p, "typed_config");
        let Some(factory) = registry.http(type_url) else {
            if f.is_optional && !last {
                continue;
            }
            errs.add(
                &tp,
                format!(
                    "unsupported HTTP filter {} (weir has: {})",
                    weir_xds_api::type_name(type_url),
                    registry
                        .http_type_urls()
                        .iter()
                        .map(|u| weir_xds_api::type_name(u))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            if last {
                errs.add(&p, "the last HTTP filter must be envoy.filters.http.router");
            }
            continue;
        };
        if factory.is_terminal() {
            if !last {
                errs.add(&p, "envoy.filters.http.router must be the last HTTP filter");
            }
            if f.disabled {
                errs.add(join(&p, "disabled"), "the router cannot be disabled");
            }
            if let Some(any) = any {
                match weir_xds_api::unpack::<Router>(any) {
                    Ok(r) => {
                        errs.reject_unsupported(
                            &r,
                            &["suppress_envoy_headers", "dynamic_stats"],
                            &tp,
                        );
                        suppress = r.suppress_envoy_headers;
                    }
                    Err(e) => errs.add(&tp, e.to_string()),
                }
            }
            continue;
        }
        if last {
            errs.add(&p, "the last HTTP filter must be envoy.filters.http.router");
        }
        let Some(any) = any else { continue };
        let mut ferrs = weir_filters::ConfigErrors::default();
        let filter = factory.create(any, &tp, &fctx, &mut ferrs);
        merge_errors(errs, ferrs);
        if let Some(filter) = filter {
            out.push(weir_filters::ChainEntry {
                name: f.name.clone(),
                filter,
                disabled: f.disabled,
                type_url: any.type_url.clone(),
            });
        }
    }
    (weir_filters::FilterChain::new(out), suppress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Store;

    fn hcm(yaml: &str) -> Result<HcmConfig, Vec<(String, String)>> {
        let h: HttpConnectionManager =
            weir_xds_api::from_yaml(yaml).map_err(|e| vec![(String::new(), e.to_string())])?;
        let clusters: std::collections::HashSet<&str> = ["c"].into_iter().collect();
        let stats = Store::new();
        let ctx = TranslateCtx {
            clusters: &clusters,
            stats: &stats,
            rds: None,
            rds_table: false,
        };
        let mut errs = Errors::default();
        let out = translate_hcm(&h, "hcm", &ctx, &mut errs);
        if errs.is_empty() {
            out.ok_or_else(Vec::new)
        } else {
            Err(errs.0.into_iter().map(|e| (e.path, e.message)).collect())
        }
    }

    const BASE: &str = "stat_prefix: p\nroute_config: {name: r}\nhttp_filters: [{name: envoy.filters.http.router, typed_config: {'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}]\n";

    #[test]
    fn defaults_are_edge_safe() {
        let h = hcm(BASE).expect("valid");
        assert_eq!(h.codec, Codec::Auto);
        assert_eq!(h.max_headers_count, 100);
        assert_eq!(h.max_request_headers_bytes, 60 * 1024);
        assert_eq!(h.http2.max_concurrent_streams, 100);
        assert_eq!(h.http2.initial_stream_window_size, 65_535);
        assert_eq!(h.idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(h.stream_idle_timeout, Some(Duration::from_secs(300)));
        assert!(h.generate_request_id);
        assert!(!h.use_remote_address);
        assert_eq!(h.server_name, "weir");
        assert_eq!(h.drain_timeout, Duration::from_secs(5));
    }

    #[test]
    fn options_translate() {
        let h = hcm(&format!(
            "{BASE}codec_type: HTTP2\nuse_remote_address: true\nxff_num_trusted_hops: 2\nserver_name: edge\n\
             common_http_protocol_options: {{idle_timeout: 0s, max_headers_count: 50, headers_with_underscores_action: REJECT_REQUEST}}\n\
             max_request_headers_kb: 8\nhttp2_protocol_options: {{max_concurrent_streams: 10}}\nrequest_timeout: 2s\n\
             normalize_path: true\nmerge_slashes: true\npath_with_escaped_slashes_action: REJECT_REQUEST\nupgrade_configs: [{{upgrade_type: websocket}}]\n\
             drain_timeout: 0.25s\n"
        ))
        .expect("valid");
        assert_eq!(h.drain_timeout, Duration::from_millis(250));
        assert_eq!(h.codec, Codec::Http2);
        assert!(h.use_remote_address);
        assert_eq!(h.xff_num_trusted_hops, 2);
        assert_eq!(h.idle_timeout, None);
        assert_eq!(h.max_headers_count, 50);
        assert_eq!(h.headers_with_underscores, UnderscoresAction::Reject);
        assert_eq!(h.max_request_headers_bytes, 8 * 1024);
        assert_eq!(h.http2.max_concurrent_streams, 10);
        assert_eq!(h.request_timeout, Some(Duration::from_secs(2)));
        assert!(h.normalize_path && h.merge_slashes && h.websocket);
        assert_eq!(h.escaped_slashes, EscapedSlashes::Reject);
        assert!(!h.connect);
        let h = hcm(&format!(
            "{BASE}upgrade_configs: [{{upgrade_type: CONNECT}}, {{upgrade_type: websocket, enabled: false}}]\n"
        ))
        .expect("valid");
        assert!(h.connect && !h.websocket);
    }

    #[test]
    fn errors_have_paths() {
        let e = hcm(
            "stat_prefix: p\nroute_config: {name: r}\nhttp_filters: []\naccess_log: [{name: x}]\n",
        )
        .expect_err("invalid");
        let paths: Vec<_> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert!(paths.contains(&"hcm.access_log[0].typed_config"), "{e:?}");
        assert!(paths.contains(&"hcm.http_filters"), "{e:?}");
        let e = hcm(&format!(
            "{BASE}upgrade_configs: [{{upgrade_type: h2c}}]\nmax_request_headers_kb: 9000\n"
        ))
        .expect_err("invalid");
        let paths: Vec<_> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert!(
            paths.contains(&"hcm.upgrade_configs[0].upgrade_type"),
            "{e:?}"
        );
        assert!(paths.contains(&"hcm.max_request_headers_kb"), "{e:?}");
        let e = hcm("stat_prefix: p\nroute_config: {name: r}\nhttp_filters: [{name: x, typed_config: {'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router, suppress_envoy_headers: true, start_child_span: true}}]\n").expect_err("invalid");
        assert_eq!(e[0].0, "hcm.http_filters[0].typed_config.start_child_span");
    }

    const ROUTER: &str = "{name: envoy.filters.http.router, typed_config: {'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}";

    fn with_filters(filters: &str) -> Result<HcmConfig, Vec<(String, String)>> {
        hcm(&format!(
            "stat_prefix: p\nroute_config: {{name: r}}\nhttp_filters: [{filters}]\n"
        ))
    }

    #[test]
    fn filters_are_built_from_the_registry() {
        let h = with_filters(&format!(
            "{{name: rl, typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit, stat_prefix: x, token_bucket: {{max_tokens: 1, fill_interval: 1s}}}}}}, \
             {{name: fault, disabled: true, typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault, abort: {{http_status: 503, percentage: {{numerator: 100}}}}}}}}, \
             {{name: hc, typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck, pass_through_mode: false}}}}, \
             {{name: opt, is_optional: true, typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors}}}}, {ROUTER}"
        ))
        .expect("valid");
        let names: Vec<_> = h
            .http_filters
            .entries()
            .iter()
            .map(|e| (e.name.as_str(), e.disabled))
            .collect();
        assert_eq!(names, [("rl", false), ("fault", true), ("hc", false)]);
        assert!(with_filters(ROUTER).expect("valid").http_filters.is_empty());
    }

    #[test]
    fn filter_errors_have_paths() {
        let e = with_filters(&format!(
            "{{name: cors, typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors}}}}, \
             {{name: f, typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault, upstream_cluster: c}}}}, \
             {{name: f, typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit}}}}, {ROUTER}"
        ))
        .expect_err("invalid");
        let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        for want in [
            "hcm.http_filters[0].typed_config",
            "hcm.http_filters[1].typed_config.upstream_cluster",
            "hcm.http_filters[2].name",
            "hcm.http_filters[2].typed_config.stat_prefix",
        ] {
            assert!(paths.contains(&want), "{want} missing: {e:?}");
        }
        let e = with_filters(&format!(
            "{ROUTER}, {{name: hc, typed_config: {{'@type': type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck, pass_through_mode: true}}}}"
        ))
        .expect_err("router not last");
        let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["hcm.http_filters[0]", "hcm.http_filters[1]"]);
        let e = with_filters(
            "{name: envoy.filters.http.router, disabled: true, typed_config: {'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}",
        )
        .expect_err("router disabled");
        assert_eq!(e[0].0, "hcm.http_filters[0].disabled");
    }

    #[test]
    fn per_route_config_must_match_the_filter_type() {
        let rl = "{name: rl, typed_config: {'@type': type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit, stat_prefix: x}}";
        let rc = |cfg: &str| {
            format!(
                "stat_prefix: p\nhttp_filters: [{rl}, {ROUTER}]\nroute_config:\n  virtual_hosts:\n  - name: v\n    domains: ['*']\n    \
                 typed_per_filter_config: {{rl: {cfg}}}\n    routes: [{{match: {{prefix: /}}, route: {{cluster: c}}}}]\n"
            )
        };
        hcm(&rc("{'@type': type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit, stat_prefix: r, token_bucket: {max_tokens: 1, fill_interval: 1s}}")).expect("valid");
        let e = hcm(&rc(
            "{'@type': type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault}",
        ))
        .expect_err("type mismatch");
        assert_eq!(
            e[0].0,
            "hcm.route_config.virtual_hosts[0].typed_per_filter_config[rl]"
        );
    }
}
