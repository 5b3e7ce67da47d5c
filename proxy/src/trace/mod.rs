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
    }
}

/// Facts of a finished request for its span.
#[derive(Debug)]
pub struct SpanFacts<'a> {
    /// The span's context.
    pub ctx: SpanContext,
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
    /// Rendered response flags.
    pub flags: String,
    /// Upstream cluster.
    pub upstream_cluster: Option<&'a str>,
    /// Upstream host.
    pub upstream_host: Option<String>,
    /// `x-request-id`.
    pub request_id: Option<&'a str>,
    /// `user-agent`.
    pub user_agent: Option<&'a str>,
    /// Downstream address.
    pub peer_address: String,
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

/// Envoy's ingress span: name `ingress` (the HCM operation for inbound traffic), kind
/// SERVER, and the HCM tags (`component`, `node_id`, `guid:x-request-id`, `http.url`,
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
    let mut attrs = vec![
        Kv::string("component", "proxy"),
        Kv::string("node_id", f.node_id),
        Kv::string("http.url", url),
        Kv::string("http.method", f.method),
        Kv::string("http.protocol", f.protocol),
        Kv::string("downstream_cluster", "-"),
        Kv::string("user_agent", f.user_agent.unwrap_or("-")),
        Kv::string("peer.address", f.peer_address.clone()),
        Kv::string("request_size", f.request_size.to_string()),
        Kv::string("response_size", f.response_size.to_string()),
        Kv::string("http.status_code", f.status.to_string()),
        Kv::string("response_flags", f.flags.clone()),
    ];
    if let Some(id) = f.request_id {
        attrs.push(Kv::string("guid:x-request-id", id));
    }
    if let Some(c) = f.upstream_cluster {
        attrs.push(Kv::string("upstream_cluster", c));
        attrs.push(Kv::string("upstream_cluster.name", c));
    }
    if let Some(h) = &f.upstream_host {
        attrs.push(Kv::string("upstream_address", h.clone()));
    }
    if let Some(s) = &f.peer_uri_san {
        attrs.push(Kv::string("peer.uri_san", s.clone()));
    }
    if let Some(s) = f.peer_subject {
        attrs.push(Kv::string("peer.subject", s));
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
        name: "ingress".into(),
        kind: otlp::SPAN_KIND_SERVER,
        start_time_unix_nano: ns(f.start),
        end_time_unix_nano: ns(f.end),
        attributes: attrs,
        status: error.then(|| otlp::Status {
            message: String::new(),
            code: otlp::STATUS_ERROR,
        }),
    }
}

impl TracingConfig {
    /// Record a finished, sampled span (starts the exporter on first use).
    pub fn record(&self, span: otlp::Span, clusters: &Arc<crate::upstream::ClusterManager>) {
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
        let f = SpanFacts {
            ctx,
            tracestate: Some("a=b"),
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(3),
            authority: "example.com",
            path: "/very/long/path",
            method: "GET",
            scheme: "http",
            protocol: "HTTP/1.1",
            status: 503,
            flags: "UH".into(),
            upstream_cluster: Some("backend"),
            upstream_host: None,
            request_id: Some("rid"),
            user_agent: None,
            peer_address: "10.0.0.1".into(),
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
        assert_eq!(s.parent_span_id, 7u64.to_be_bytes().to_vec());
        assert_eq!(s.trace_id.len(), 16);
        assert_eq!(s.kind, otlp::SPAN_KIND_SERVER);
        assert_eq!(s.end_time_unix_nano, 3_000_000);
        assert_eq!(s.status.expect("error status").code, otlp::STATUS_ERROR);
    }
}
