//! `envoy.config.cluster.v3.Cluster` -> [`ClusterConfig`].
//!
//! Supported: STATIC and STRICT_DNS clusters with an inline `load_assignment`, the
//! ROUND_ROBIN / LEAST_REQUEST / RANDOM / RING_HASH / MAGLEV policies with their
//! `*_lb_config` settings and `common_lb_config` (`healthy_panic_threshold`,
//! `locality_weighted_lb_config`),
//! `connect_timeout`, `per_connection_buffer_limit_bytes`, DNS refresh and lookup family, and
//! the upstream HTTP protocol choice (`typed_extension_protocol_options` with
//! `envoy.extensions.upstreams.http.v3.HttpProtocolOptions`, or the deprecated top-level
//! `http_protocol_options` / `http2_protocol_options` / `common_http_protocol_options`),
//! `health_checks` (translated by [`super::health`]) and `outlier_detection` (by
//! [`super::outlier`]). Every other field that would change what traffic does is rejected with its path.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use weir_xds_api::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use weir_xds_api::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType as PbDiscoveryType, DnsLookupFamily as PbFamily,
    LbPolicy as PbLbPolicy,
};
use weir_xds_api::pb::envoy::config::core::v3 as core;
use weir_xds_api::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use weir_xds_api::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions as PbUpstreamHttp;
use weir_xds_api::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::{
    UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
};

use super::{
    ClusterConfig, DiscoveryType, DnsLookupFamily, EdsClusterConfig, EndpointAddress,
    EndpointConfig, Http2Settings, LbConfig, LbPolicy, LocalityConfig, SlowStartConfig,
    UpstreamProtocol, health_flags,
};
use crate::config::{Errors, duration_or, join, socket_address};

/// The `typed_extension_protocol_options` key for upstream HTTP options.
pub const HTTP_PROTOCOL_OPTIONS_KEY: &str =
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Envoy's default `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Envoy's default `per_connection_buffer_limit_bytes` (1 MiB).
pub const DEFAULT_BUFFER_LIMIT: u32 = 1024 * 1024;
/// Envoy's default `dns_refresh_rate`.
pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(5);
/// Envoy's default upstream connection idle timeout (1 h).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Top-level `Cluster` fields weir understands.
const CLUSTER_FIELDS: &[&str] = &[
    "name",
    "type",
    "load_assignment",
    "connect_timeout",
    "lb_policy",
    "ring_hash_lb_config",
    "maglev_lb_config",
    "least_request_lb_config",
    "round_robin_lb_config",
    "common_lb_config",
    "per_connection_buffer_limit_bytes",
    "dns_refresh_rate",
    "dns_lookup_family",
    "typed_extension_protocol_options",
    "http_protocol_options",
    "http2_protocol_options",
    "common_http_protocol_options",
    "circuit_breakers",
    "health_checks",
    "outlier_detection",
    "eds_cluster_config",
    "transport_socket",
    // Opaque to weir: only read by filters and subset LB (which is rejected).
    "metadata",
    // ORIGINAL_DST clusters (super::original_dst).
    "original_dst_lb_config",
    "cleanup_interval",
];

/// Translate and validate one `Cluster` at `path` (e.g. `static_resources.clusters[0]`).
/// Returns `None` only when the cluster is unusable; every problem is recorded in `errs`.
#[allow(deprecated)] // `http_protocol_options` / `http2_protocol_options` on Cluster
pub fn translate_cluster(c: &PbCluster, path: &str, errs: &mut Errors) -> Option<ClusterConfig> {
    errs.reject_unsupported(c, CLUSTER_FIELDS, path);
    if c.name.is_empty() {
        errs.add(join(path, "name"), "cluster name is required");
    }

    let discovery = match &c.cluster_discovery_type {
        None => DiscoveryType::Static,
        Some(ClusterDiscoveryType::Type(t)) => match PbDiscoveryType::try_from(*t) {
            Ok(PbDiscoveryType::Static) => DiscoveryType::Static,
            Ok(PbDiscoveryType::StrictDns) => DiscoveryType::StrictDns,
            Ok(PbDiscoveryType::Eds) => DiscoveryType::Eds,
            Ok(PbDiscoveryType::OriginalDst) => DiscoveryType::OriginalDst,
            Ok(other) => {
                errs.add(
                    join(path, "type"),
                    format!(
                        "cluster type {} is not supported (use STATIC, STRICT_DNS, EDS or ORIGINAL_DST)",
                        other.as_str_name()
                    ),
                );
                return None;
            }
            Err(_) => {
                errs.add(join(path, "type"), format!("unknown cluster type {t}"));
                return None;
            }
        },
        // Rejected by reject_unsupported as `cluster_type`.
        Some(ClusterDiscoveryType::ClusterType(_)) => return None,
    };

    let (lb_policy, mut lb) = lb_settings(c, path, errs);
    if discovery == DiscoveryType::OriginalDst {
        lb.original_dst = original_dst_settings(c, path, errs);
    } else if c.cleanup_interval.is_some() {
        errs.add(
            join(path, "cleanup_interval"),
            "cleanup_interval is only valid with type: ORIGINAL_DST",
        );
    }

    let dns_lookup_family = match PbFamily::try_from(c.dns_lookup_family) {
        Ok(PbFamily::Auto) => DnsLookupFamily::Auto,
        Ok(PbFamily::V4Only) => DnsLookupFamily::V4Only,
        Ok(PbFamily::V6Only) => DnsLookupFamily::V6Only,
        Ok(PbFamily::V4Preferred) => DnsLookupFamily::V4Preferred,
        Ok(PbFamily::All) => DnsLookupFamily::All,
        Err(_) => {
            errs.add(
                join(path, "dns_lookup_family"),
                format!("unknown dns_lookup_family {}", c.dns_lookup_family),
            );
            DnsLookupFamily::Auto
        }
    };

    let connect_timeout = duration_or(
        c.connect_timeout.as_ref(),
        DEFAULT_CONNECT_TIMEOUT,
        &join(path, "connect_timeout"),
        errs,
    );
    if connect_timeout.is_zero() && c.connect_timeout.is_some() {
        errs.add(
            join(path, "connect_timeout"),
            "connect_timeout must be greater than 0",
        );
    }
    let dns_refresh_rate = duration_or(
        c.dns_refresh_rate.as_ref(),
        DEFAULT_DNS_REFRESH,
        &join(path, "dns_refresh_rate"),
        errs,
    );
    if c.dns_refresh_rate.is_some() && dns_refresh_rate < Duration::from_millis(1) {
        errs.add(
            join(path, "dns_refresh_rate"),
            "dns_refresh_rate must be at least 1ms",
        );
    }
    let per_connection_buffer_limit_bytes = c
        .per_connection_buffer_limit_bytes
        .map(|v| v.value)
        .unwrap_or(DEFAULT_BUFFER_LIMIT);

    let (protocol, idle_timeout) = protocol_options(c, path, errs);

    let eds = match (&c.eds_cluster_config, discovery) {
        (Some(e), DiscoveryType::Eds) => {
            let epath = join(path, "eds_cluster_config");
            errs.reject_unsupported(e, &["eds_config", "service_name"], &epath);
            let source = match &e.eds_config {
                Some(cs) => crate::config::source::translate(cs, &join(&epath, "eds_config"), errs),
                None => {
                    errs.add(join(&epath, "eds_config"), "eds_config is required");
                    None
                }
            };
            source.map(|source| EdsClusterConfig {
                service_name: if e.service_name.is_empty() {
                    c.name.clone()
                } else {
                    e.service_name.clone()
                },
                source,
            })
        }
        (None, DiscoveryType::Eds) => {
            errs.add(
                join(path, "eds_cluster_config"),
                "an EDS cluster needs eds_cluster_config.eds_config",
            );
            None
        }
        (Some(_), _) => {
            errs.add(
                join(path, "eds_cluster_config"),
                "eds_cluster_config is only valid with type: EDS",
            );
            None
        }
        (None, _) => None,
    };
    let endpoints = match &c.load_assignment {
        Some(_) if discovery == DiscoveryType::Eds => {
            errs.add(
                join(path, "load_assignment"),
                "an EDS cluster gets its endpoints from EDS; remove load_assignment",
            );
            Vec::new()
        }
        Some(la) => translate_load_assignment(la, discovery, &join(path, "load_assignment"), errs),
        None => Vec::new(),
    };

    let (health_checks, outlier) = health_and_outlier(c, &protocol, path, errs);

    Some(ClusterConfig {
        name: c.name.clone(),
        discovery,
        endpoints,
        connect_timeout,
        lb_policy,
        lb,
        per_connection_buffer_limit_bytes,
        dns_refresh_rate,
        dns_lookup_family,
        protocol,
        idle_timeout,
        circuit_breakers: super::circuit::CircuitBreakerConfig::translate(
            c.circuit_breakers.as_ref(),
            &join(path, "circuit_breakers"),
            errs,
        ),
        health_checks,
        outlier,
        eds,
        tls: c
            .transport_socket
            .as_ref()
            .and_then(|ts| crate::tls::config::upstream(ts, &join(path, "transport_socket"), errs)),
    })
}

/// An ORIGINAL_DST cluster's `original_dst_lb_config` and `cleanup_interval`; it has no
/// endpoints and no active health checks.
fn original_dst_settings(
    c: &PbCluster,
    path: &str,
    errs: &mut Errors,
) -> Option<super::original_dst::OriginalDstConfig> {
    use weir_xds_api::pb::envoy::config::cluster::v3::cluster::LbConfig as PbLbConfig;
    let before = errs.0.len();
    if c.load_assignment.is_some() {
        errs.add(
            join(path, "load_assignment"),
            "an ORIGINAL_DST cluster has no endpoints (its hosts are the original destinations)",
        );
    }
    if !c.health_checks.is_empty() {
        errs.add(
            join(path, "health_checks"),
            "health checks are not supported on ORIGINAL_DST clusters",
        );
    }
    let cleanup_interval = duration_or(
        c.cleanup_interval.as_ref(),
        super::original_dst::DEFAULT_CLEANUP_INTERVAL,
        &join(path, "cleanup_interval"),
        errs,
    );
    if cleanup_interval.is_zero() {
        errs.add(
            join(path, "cleanup_interval"),
            "cleanup_interval must be greater than 0",
        );
    }
    let mut cfg = super::original_dst::OriginalDstConfig {
        http_header: None,
        port_override: None,
        cleanup_interval,
    };
    if let Some(PbLbConfig::OriginalDstLbConfig(o)) = &c.lb_config {
        let p = join(path, "original_dst_lb_config");
        errs.reject_unsupported(
            o,
            &[
                "use_http_header",
                "http_header_name",
                "upstream_port_override",
            ],
            &p,
        );
        if o.use_http_header {
            let name = if o.http_header_name.is_empty() {
                super::original_dst::DEFAULT_HEADER
            } else {
                o.http_header_name.as_str()
            };
            match http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                Ok(h) => cfg.http_header = Some(h),
                Err(_) => errs.add(
                    join(&p, "http_header_name"),
                    format!("{name:?} is not a valid header name"),
                ),
            }
        } else if !o.http_header_name.is_empty() {
            errs.add(
                join(&p, "http_header_name"),
                "http_header_name needs use_http_header: true",
            );
        }
        if let Some(port) = o.upstream_port_override {
            match u16::try_from(port.value) {
                Ok(v) if v > 0 => cfg.port_override = Some(v),
                _ => errs.add(
                    join(&p, "upstream_port_override"),
                    "upstream_port_override must be between 1 and 65535",
                ),
            }
        }
    }
    (errs.0.len() == before).then_some(cfg)
}

/// The endpoints of a `ClusterLoadAssignment` (inline `load_assignment`, or an EDS resource
/// with `discovery` = [`DiscoveryType::Eds`]), flattened in order with each endpoint's
/// priority and locality. `policy` (drop_overloads, overprovisioning) is refused by name.
pub fn translate_load_assignment(
    la: &weir_xds_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment,
    discovery: DiscoveryType,
    lpath: &str,
    errs: &mut Errors,
) -> Vec<EndpointConfig> {
    errs.reject_unsupported(la, &["cluster_name", "endpoints"], lpath);
    let mut endpoints = Vec::new();
    for (i, loc) in la.endpoints.iter().enumerate() {
        let ppath = format!("{lpath}.endpoints[{i}]");
        errs.reject_unsupported(
            loc,
            &[
                "locality",
                "lb_endpoints",
                "priority",
                // Used by `locality_weighted_lb_config` (ignored otherwise, as in Envoy).
                "load_balancing_weight",
                "metadata",
            ],
            &ppath,
        );
        let weight = match loc.load_balancing_weight {
            Some(w) if w.value == 0 => {
                errs.add(
                    join(&ppath, "load_balancing_weight"),
                    "load_balancing_weight must be at least 1",
                );
                None
            }
            w => w.map(|w| w.value),
        };
        let locality = match (&loc.locality, weight) {
            (None, None) => None,
            (l, w) => Some(LocalityConfig {
                region: l.as_ref().map(|l| l.region.clone()).unwrap_or_default(),
                zone: l.as_ref().map(|l| l.zone.clone()).unwrap_or_default(),
                sub_zone: l.as_ref().map(|l| l.sub_zone.clone()).unwrap_or_default(),
                load_balancing_weight: w,
            }),
        };
        for (j, lb) in loc.lb_endpoints.iter().enumerate() {
            let epath = format!("{ppath}.lb_endpoints[{j}]");
            if let Some(ep) = lb_endpoint(lb, discovery, &epath, errs) {
                endpoints.push(EndpointConfig {
                    priority: loc.priority,
                    locality: locality.clone(),
                    ..ep
                });
            }
        }
    }
    endpoints
}

/// `health_checks` and `outlier_detection` (see [`super::health`] and [`super::outlier`]).
fn health_and_outlier(
    c: &PbCluster,
    protocol: &UpstreamProtocol,
    path: &str,
    errs: &mut Errors,
) -> (Vec<super::HealthCheckConfig>, Option<super::OutlierConfig>) {
    let hcs = super::health::translate_health_checks(
        &c.health_checks,
        protocol,
        &join(path, "health_checks"),
        errs,
    );
    let outlier = c
        .outlier_detection
        .as_ref()
        .map(|o| super::outlier::translate_outlier(o, &join(path, "outlier_detection"), errs));
    (hcs, outlier)
}

/// Envoy's upper bound on `minimum_ring_size` / `maximum_ring_size` (8M).
pub const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Envoy's upper bound (exclusive) on `maglev_lb_config.table_size`.
pub const MAX_MAGLEV_TABLE: u64 = 5_000_011;

/// `lb_policy`, its `*_lb_config` and `common_lb_config`.
fn lb_settings(c: &PbCluster, path: &str, errs: &mut Errors) -> (LbPolicy, LbConfig) {
    use weir_xds_api::pb::envoy::config::cluster::v3::cluster::LbConfig as PbLbConfig;
    use weir_xds_api::pb::envoy::config::cluster::v3::cluster::ring_hash_lb_config::HashFunction;

    let original_dst = matches!(c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(t)) if t == PbDiscoveryType::OriginalDst as i32);
    let mut policy = match PbLbPolicy::try_from(c.lb_policy) {
        // ORIGINAL_DST picks its hosts itself; the policy below is never consulted.
        Ok(PbLbPolicy::ClusterProvided) if original_dst => LbPolicy::RoundRobin,
        Ok(_) if original_dst => {
            errs.add(
                join(path, "lb_policy"),
                "an ORIGINAL_DST cluster needs lb_policy CLUSTER_PROVIDED",
            );
            LbPolicy::RoundRobin
        }
        Ok(PbLbPolicy::RoundRobin) => LbPolicy::RoundRobin,
        Ok(PbLbPolicy::LeastRequest) => LbPolicy::LEAST_REQUEST,
        Ok(PbLbPolicy::Random) => LbPolicy::Random,
        Ok(PbLbPolicy::RingHash) => LbPolicy::RING_HASH,
        Ok(PbLbPolicy::Maglev) => LbPolicy::MAGLEV,
        Ok(other) => {
            errs.add(
                join(path, "lb_policy"),
                format!(
                    "lb_policy {} is not supported (use ROUND_ROBIN, LEAST_REQUEST, RANDOM, \
                     RING_HASH or MAGLEV)",
                    other.as_str_name()
                ),
            );
            LbPolicy::RoundRobin
        }
        Err(_) => {
            errs.add(
                join(path, "lb_policy"),
                format!("unknown lb_policy {}", c.lb_policy),
            );
            LbPolicy::RoundRobin
        }
    };
    let mut cfg = LbConfig::default();
    let wrong_policy = |field: &str, want: &str, errs: &mut Errors| {
        errs.add(
            join(path, field),
            format!(
                "{field} requires lb_policy {want} (lb_policy is {})",
                policy.name()
            ),
        );
    };
    match &c.lb_config {
        None => {}
        Some(PbLbConfig::RingHashLbConfig(rh)) => {
            let p = join(path, "ring_hash_lb_config");
            errs.reject_unsupported(
                rh,
                &["minimum_ring_size", "maximum_ring_size", "hash_function"],
                &p,
            );
            match HashFunction::try_from(rh.hash_function) {
                Ok(HashFunction::XxHash) => {}
                Ok(HashFunction::MurmurHash2) => errs.add(
                    join(&p, "hash_function"),
                    "hash_function MURMUR_HASH_2 is not supported (use XX_HASH)",
                ),
                Err(_) => errs.add(
                    join(&p, "hash_function"),
                    format!("unknown hash_function {}", rh.hash_function),
                ),
            }
            let min = rh.minimum_ring_size.map_or(1024, |v| v.value);
            let max = rh.maximum_ring_size.map_or(MAX_RING_SIZE, |v| v.value);
            let min_ok = (1..=MAX_RING_SIZE).contains(&min);
            let max_ok = (1..=MAX_RING_SIZE).contains(&max);
            if !min_ok {
                errs.add(
                    join(&p, "minimum_ring_size"),
                    format!("minimum_ring_size must be between 1 and {MAX_RING_SIZE}"),
                );
            }
            if !max_ok {
                errs.add(
                    join(&p, "maximum_ring_size"),
                    format!("maximum_ring_size must be between 1 and {MAX_RING_SIZE}"),
                );
            }
            if min_ok && max_ok && min > max {
                errs.add(
                    &p,
                    format!("minimum_ring_size ({min}) > maximum_ring_size ({max})"),
                );
            }
            match policy {
                LbPolicy::RingHash { .. } => {
                    policy = LbPolicy::RingHash {
                        minimum_ring_size: min,
                        maximum_ring_size: max,
                    }
                }
                _ => wrong_policy("ring_hash_lb_config", "RING_HASH", errs),
            }
        }
        Some(PbLbConfig::MaglevLbConfig(m)) => {
            let p = join(path, "maglev_lb_config");
            errs.reject_unsupported(m, &["table_size"], &p);
            let size = m.table_size.map_or(65537, |v| v.value);
            if !super::lb::ring::is_prime(size) || size >= MAX_MAGLEV_TABLE {
                errs.add(
                    join(&p, "table_size"),
                    format!("table_size {size} must be a prime number below {MAX_MAGLEV_TABLE}"),
                );
            }
            match policy {
                LbPolicy::Maglev { .. } => policy = LbPolicy::Maglev { table_size: size },
                _ => wrong_policy("maglev_lb_config", "MAGLEV", errs),
            }
        }
        Some(PbLbConfig::LeastRequestLbConfig(lr)) => {
            let p = join(path, "least_request_lb_config");
            errs.reject_unsupported(
                lr,
                &["choice_count", "active_request_bias", "slow_start_config"],
                &p,
            );
            let choice_count = lr.choice_count.map_or(2, |v| v.value);
            if choice_count < 2 {
                errs.add(join(&p, "choice_count"), "choice_count must be at least 2");
            }
            let active_request_bias = match &lr.active_request_bias {
                None => 1.0,
                Some(rd) => {
                    let bp = join(&p, "active_request_bias");
                    errs.reject_unsupported(rd, &["default_value", "runtime_key"], &bp);
                    if !(rd.default_value >= 0.0 && rd.default_value.is_finite()) {
                        errs.add(
                            join(&bp, "default_value"),
                            "active_request_bias must be a finite number >= 0",
                        );
                    }
                    rd.default_value
                }
            };
            cfg.slow_start = lr
                .slow_start_config
                .as_ref()
                .map(|ss| slow_start(ss, &join(&p, "slow_start_config"), errs));
            match policy {
                LbPolicy::LeastRequest { .. } => {
                    policy = LbPolicy::LeastRequest {
                        choice_count,
                        active_request_bias,
                    }
                }
                _ => wrong_policy("least_request_lb_config", "LEAST_REQUEST", errs),
            }
        }
        Some(PbLbConfig::RoundRobinLbConfig(rr)) => {
            let p = join(path, "round_robin_lb_config");
            errs.reject_unsupported(rr, &["slow_start_config"], &p);
            cfg.slow_start = rr
                .slow_start_config
                .as_ref()
                .map(|ss| slow_start(ss, &join(&p, "slow_start_config"), errs));
            if policy != LbPolicy::RoundRobin {
                wrong_policy("round_robin_lb_config", "ROUND_ROBIN", errs);
            }
        }
        // Read by original_dst_settings.
        Some(PbLbConfig::OriginalDstLbConfig(_)) if original_dst => {}
        Some(PbLbConfig::OriginalDstLbConfig(_)) => errs.add(
            join(path, "original_dst_lb_config"),
            "original_dst_lb_config is only valid with type: ORIGINAL_DST",
        ),
    }
    if let Some(common) = &c.common_lb_config {
        use weir_xds_api::pb::envoy::config::cluster::v3::cluster::common_lb_config::LocalityConfigSpecifier as L;
        let p = join(path, "common_lb_config");
        errs.reject_unsupported(
            common,
            &["healthy_panic_threshold", "locality_weighted_lb_config"],
            &p,
        );
        if let Some(t) = &common.healthy_panic_threshold {
            if !(0.0..=100.0).contains(&t.value) {
                errs.add(
                    join(&p, "healthy_panic_threshold.value"),
                    "healthy_panic_threshold must be between 0 and 100",
                );
            }
            // Envoy truncates to a whole percent.
            cfg.healthy_panic_threshold = t.value.clamp(0.0, 100.0).trunc();
        }
        if let Some(L::LocalityWeightedLbConfig(_)) = &common.locality_config_specifier {
            cfg.locality_weighted = true;
        }
    }
    (policy, cfg)
}

/// `SlowStartConfig`.
fn slow_start(
    ss: &weir_xds_api::pb::envoy::config::cluster::v3::cluster::SlowStartConfig,
    path: &str,
    errs: &mut Errors,
) -> SlowStartConfig {
    errs.reject_unsupported(
        ss,
        &["slow_start_window", "aggression", "min_weight_percent"],
        path,
    );
    let window = match &ss.slow_start_window {
        Some(d) => crate::config::duration(d, &join(path, "slow_start_window"), errs),
        None => Duration::ZERO,
    };
    let aggression = match &ss.aggression {
        None => 1.0,
        Some(rd) => {
            let ap = join(path, "aggression");
            errs.reject_unsupported(rd, &["default_value", "runtime_key"], &ap);
            if !(rd.default_value > 0.0 && rd.default_value.is_finite()) {
                errs.add(
                    join(&ap, "default_value"),
                    "aggression must be a finite number greater than 0",
                );
                1.0
            } else {
                rd.default_value
            }
        }
    };
    let min_weight_percent = match &ss.min_weight_percent {
        None => 10.0,
        Some(pc) => {
            if !(0.0..=100.0).contains(&pc.value) {
                errs.add(
                    join(path, "min_weight_percent.value"),
                    "min_weight_percent must be between 0 and 100",
                );
            }
            pc.value.clamp(0.0, 100.0)
        }
    };
    SlowStartConfig {
        window,
        aggression,
        min_weight_percent,
    }
}

/// One `LbEndpoint` (priority and locality are filled in by the caller).
fn lb_endpoint(
    lb: &weir_xds_api::pb::envoy::config::endpoint::v3::LbEndpoint,
    discovery: DiscoveryType,
    path: &str,
    errs: &mut Errors,
) -> Option<EndpointConfig> {
    errs.reject_unsupported(
        lb,
        &[
            "endpoint",
            "load_balancing_weight",
            "metadata",
            "health_status",
        ],
        path,
    );
    let weight = match lb.load_balancing_weight {
        None => 1,
        Some(w) if w.value >= 1 => w.value,
        Some(_) => {
            errs.add(
                join(path, "load_balancing_weight"),
                "load_balancing_weight must be at least 1",
            );
            1
        }
    };
    let health = match core::HealthStatus::try_from(lb.health_status) {
        Ok(core::HealthStatus::Unknown | core::HealthStatus::Healthy) => 0,
        Ok(
            core::HealthStatus::Unhealthy
            | core::HealthStatus::Draining
            | core::HealthStatus::Timeout,
        ) => health_flags::FAILED_EDS_HEALTH,
        Ok(core::HealthStatus::Degraded) | Err(_) => {
            errs.add(
                join(path, "health_status"),
                "only UNKNOWN, HEALTHY, UNHEALTHY, DRAINING and TIMEOUT are supported",
            );
            0
        }
    };
    let ep = match &lb.host_identifier {
        Some(HostIdentifier::Endpoint(ep)) => ep,
        // `endpoint_name` is rejected by reject_unsupported.
        Some(HostIdentifier::EndpointName(_)) => return None,
        None => {
            errs.add(join(path, "endpoint"), "endpoint is required");
            return None;
        }
    };
    let epath = join(path, "endpoint");
    errs.reject_unsupported(ep, &["address", "hostname"], &epath);
    let apath = join(&epath, "address");
    let address = match discovery {
        DiscoveryType::Static | DiscoveryType::Eds | DiscoveryType::OriginalDst => {
            let a = socket_address(ep.address.as_ref(), &apath, errs)?;
            if a.port() == 0 {
                errs.add(
                    join(&apath, "socket_address.port_value"),
                    "an upstream endpoint needs a port (1..=65535)",
                );
                return None;
            }
            EndpointAddress::Ip(a)
        }
        DiscoveryType::StrictDns => dns_address(ep.address.as_ref(), &apath, errs)?,
    };
    let hostname = if !ep.hostname.is_empty() {
        Some(ep.hostname.clone())
    } else if let EndpointAddress::Dns { host, .. } = &address {
        Some(host.clone())
    } else {
        None
    };
    Some(EndpointConfig {
        address,
        hostname,
        weight,
        priority: 0,
        locality: None,
        health,
    })
}

/// A STRICT_DNS endpoint address: a hostname (or IP literal) and a port.
fn dns_address(
    addr: Option<&core::Address>,
    path: &str,
    errs: &mut Errors,
) -> Option<EndpointAddress> {
    let (host, port, p) = crate::config::socket_address_parts(addr, path, 1, errs)?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(EndpointAddress::Ip(SocketAddr::new(ip, port)));
    }
    if !valid_hostname(host) {
        errs.add(
            join(&p, "address"),
            format!("{host:?} is not a valid DNS name"),
        );
        return None;
    }
    Some(EndpointAddress::Dns {
        host: host.to_string(),
        port,
    })
}

/// RFC 1123 host name (letters, digits, `-`, `_` tolerated as resolvers do; dots between labels).
fn valid_hostname(h: &str) -> bool {
    let h = h.strip_suffix('.').unwrap_or(h);
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Upstream protocol and idle timeout from the extension options or the deprecated fields.
#[allow(deprecated)]
fn protocol_options(
    c: &PbCluster,
    path: &str,
    errs: &mut Errors,
) -> (UpstreamProtocol, Option<Duration>) {
    let mut protocol = UpstreamProtocol::Http1;
    let mut idle = Some(DEFAULT_IDLE_TIMEOUT);
    let deprecated_set = c.http_protocol_options.is_some()
        || c.http2_protocol_options.is_some()
        || c.common_http_protocol_options.is_some();
    if let Some(h1) = &c.http_protocol_options {
        errs.reject_unsupported(h1, &[], &join(path, "http_protocol_options"));
    }
    if let Some(h2) = &c.http2_protocol_options {
        if c.http_protocol_options.is_some() {
            errs.add(
                join(path, "http2_protocol_options"),
                "http_protocol_options and http2_protocol_options are mutually exclusive",
            );
        }
        protocol = UpstreamProtocol::Http2(http2_settings(
            h2,
            &join(path, "http2_protocol_options"),
            errs,
        ));
    }
    if let Some(common) = &c.common_http_protocol_options {
        idle = common_options(common, &join(path, "common_http_protocol_options"), errs);
    }

    let mut keys: Vec<_> = c.typed_extension_protocol_options.keys().collect();
    keys.sort();
    for key in keys {
        let kpath = format!("{path}.typed_extension_protocol_options[{key}]");
        if key != HTTP_PROTOCOL_OPTIONS_KEY {
            errs.add(
                kpath,
                format!(
                    "protocol options {key:?} are not supported (only {HTTP_PROTOCOL_OPTIONS_KEY})"
                ),
            );
            continue;
        }
        let Some(any) = c.typed_extension_protocol_options.get(key) else {
            continue;
        };
        let opts = match weir_xds_api::unpack::<PbUpstreamHttp>(any) {
            Ok(o) => o,
            Err(e) => {
                errs.add(kpath, e.to_string());
                continue;
            }
        };
        if deprecated_set {
            errs.add(
                kpath.clone(),
                "cannot be combined with the deprecated http_protocol_options, \
                 http2_protocol_options or common_http_protocol_options on the Cluster",
            );
        }
        errs.reject_unsupported(
            &opts,
            &[
                "common_http_protocol_options",
                "explicit_http_config",
                "use_downstream_protocol_config",
            ],
            &kpath,
        );
        if let Some(common) = &opts.common_http_protocol_options {
            idle = common_options(common, &join(&kpath, "common_http_protocol_options"), errs);
        }
        match &opts.upstream_protocol_options {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => {
                let epath = join(&kpath, "explicit_http_config");
                match &e.protocol_config {
                    Some(ProtocolConfig::HttpProtocolOptions(h1)) => {
                        errs.reject_unsupported(h1, &[], &join(&epath, "http_protocol_options"));
                        protocol = UpstreamProtocol::Http1;
                    }
                    Some(ProtocolConfig::Http2ProtocolOptions(h2)) => {
                        protocol = UpstreamProtocol::Http2(http2_settings(
                            h2,
                            &join(&epath, "http2_protocol_options"),
                            errs,
                        ));
                    }
                    Some(ProtocolConfig::Http3ProtocolOptions(_)) => {
                        errs.add(
                            join(&epath, "http3_protocol_options"),
                            "HTTP/3 upstreams are not supported",
                        );
                    }
                    None => errs.add(
                        epath,
                        "one of http_protocol_options or http2_protocol_options is required",
                    ),
                }
            }
            Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(d)) => {
                let dpath = join(&kpath, "use_downstream_protocol_config");
                errs.reject_unsupported(
                    d,
                    &["http_protocol_options", "http2_protocol_options"],
                    &dpath,
                );
                if let Some(h1) = &d.http_protocol_options {
                    errs.reject_unsupported(h1, &[], &join(&dpath, "http_protocol_options"));
                }
                let h2 = d
                    .http2_protocol_options
                    .as_ref()
                    .map(|h2| http2_settings(h2, &join(&dpath, "http2_protocol_options"), errs))
                    .unwrap_or_default();
                protocol = UpstreamProtocol::UseDownstream(h2);
            }
            // `auto_config` is rejected by reject_unsupported (it needs ALPN over TLS).
            Some(UpstreamProtocolOptions::AutoConfig(_)) => {}
            None => errs.add(
                kpath,
                "one of explicit_http_config or use_downstream_protocol_config is required",
            ),
        }
    }
    (protocol, idle)
}

/// `common_http_protocol_options`: only `idle_timeout` (0 disables it, as in Envoy).
fn common_options(
    common: &core::HttpProtocolOptions,
    path: &str,
    errs: &mut Errors,
) -> Option<Duration> {
    errs.reject_unsupported(common, &["idle_timeout"], path);
    let d = duration_or(
        common.idle_timeout.as_ref(),
        DEFAULT_IDLE_TIMEOUT,
        &join(path, "idle_timeout"),
        errs,
    );
    (!d.is_zero()).then_some(d)
}

/// The supported subset of `Http2ProtocolOptions`, with Envoy's ranges.
fn http2_settings(h2: &core::Http2ProtocolOptions, path: &str, errs: &mut Errors) -> Http2Settings {
    errs.reject_unsupported(
        h2,
        &[
            "max_concurrent_streams",
            "initial_stream_window_size",
            "initial_connection_window_size",
        ],
        path,
    );
    let mut s = Http2Settings::default();
    if let Some(v) = h2.max_concurrent_streams {
        if (1..=2_147_483_647).contains(&v.value) {
            s.max_concurrent_streams = v.value;
        } else {
            errs.add(
                join(path, "max_concurrent_streams"),
                "must be in 1..=2147483647",
            );
        }
    }
    for (field, value, slot) in [
        (
            "initial_stream_window_size",
            h2.initial_stream_window_size,
            &mut s.initial_stream_window_size,
        ),
        (
            "initial_connection_window_size",
            h2.initial_connection_window_size,
            &mut s.initial_connection_window_size,
        ),
    ] {
        if let Some(v) = value {
            if (65_535..=2_147_483_647).contains(&v.value) {
                *slot = v.value;
            } else {
                errs.add(join(path, field), "must be in 65535..=2147483647");
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(yaml: &str) -> (Option<ClusterConfig>, Vec<(String, String)>) {
        let pb: PbCluster = weir_xds_api::from_yaml(yaml).expect("yaml parses");
        let mut errs = Errors::default();
        let c = translate_cluster(&pb, "clusters[0]", &mut errs);
        (c, errs.0.into_iter().map(|e| (e.path, e.message)).collect())
    }

    fn ok(yaml: &str) -> ClusterConfig {
        let (c, errs) = tr(yaml);
        assert!(errs.is_empty(), "{errs:?}");
        c.expect("translated")
    }

    fn err_paths(yaml: &str) -> Vec<String> {
        tr(yaml).1.into_iter().map(|(p, _)| p).collect()
    }

    #[test]
    fn static_cluster_defaults() {
        let c = ok(r#"
name: backend
load_assignment:
  cluster_name: backend
  endpoints:
  - lb_endpoints:
    - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8080}}}
"#);
        assert_eq!(c.name, "backend");
        assert_eq!(c.discovery, DiscoveryType::Static);
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.per_connection_buffer_limit_bytes, 1024 * 1024);
        assert_eq!(c.dns_refresh_rate, Duration::from_secs(5));
        assert_eq!(c.dns_lookup_family, DnsLookupFamily::Auto);
        assert_eq!(c.lb_policy, LbPolicy::RoundRobin);
        assert_eq!(c.protocol, UpstreamProtocol::Http1);
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(3600)));
        assert_eq!(c.endpoints.len(), 1);
        let e = &c.endpoints[0];
        assert_eq!(
            e.address,
            EndpointAddress::Ip("127.0.0.1:8080".parse().expect("addr"))
        );
        assert_eq!((e.weight, e.priority, e.health), (1, 0, 0));
        assert_eq!(e.hostname, None);
    }

    #[test]
    fn every_supported_field() {
        let c = ok(r#"
name: svc
type: STRICT_DNS
connect_timeout: 0.25s
lb_policy: ROUND_ROBIN
per_connection_buffer_limit_bytes: 32768
dns_refresh_rate: 10s
dns_lookup_family: V4_ONLY
metadata: {filter_metadata: {x: {a: 1}}}
load_assignment:
  cluster_name: svc
  endpoints:
  - locality: {region: r1, zone: z1, sub_zone: s1}
    priority: 1
    lb_endpoints:
    - endpoint:
        address: {socket_address: {address: backend.example.com, port_value: 80}}
        hostname: override.example
      load_balancing_weight: 3
    - endpoint: {address: {socket_address: {address: localhost, port_value: 81}}}
      health_status: UNHEALTHY
  - lb_endpoints:
    - endpoint: {address: {socket_address: {address: "::1", port_value: 82}}}
typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    common_http_protocol_options: {idle_timeout: 30s}
    explicit_http_config:
      http2_protocol_options:
        max_concurrent_streams: 50
        initial_stream_window_size: 131072
        initial_connection_window_size: 2097152
"#);
        assert_eq!(c.discovery, DiscoveryType::StrictDns);
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.per_connection_buffer_limit_bytes, 32768);
        assert_eq!(c.dns_refresh_rate, Duration::from_secs(10));
        assert_eq!(c.dns_lookup_family, DnsLookupFamily::V4Only);
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(30)));
        assert_eq!(
            c.protocol,
            UpstreamProtocol::Http2(Http2Settings {
                max_concurrent_streams: 50,
                initial_stream_window_size: 131072,
                initial_connection_window_size: 2097152,
            })
        );
        assert_eq!(c.endpoints.len(), 3);
        let e0 = &c.endpoints[0];
        assert_eq!(
            e0.address,
            EndpointAddress::Dns {
                host: "backend.example.com".into(),
                port: 80
            }
        );
        assert_eq!(e0.hostname.as_deref(), Some("override.example"));
        assert_eq!((e0.weight, e0.priority), (3, 1));
        assert_eq!(
            e0.locality,
            Some(LocalityConfig {
                region: "r1".into(),
                zone: "z1".into(),
                sub_zone: "s1".into(),
                load_balancing_weight: None,
            })
        );
        assert_eq!(c.endpoints[1].hostname.as_deref(), Some("localhost"));
        assert_eq!(c.endpoints[1].health, health_flags::FAILED_EDS_HEALTH);
        // An IP literal in a STRICT_DNS cluster needs no resolution.
        assert_eq!(
            c.endpoints[2].address,
            EndpointAddress::Ip("[::1]:82".parse().expect("addr"))
        );
        assert_eq!(c.endpoints[2].priority, 0);
    }

    #[test]
    fn lookup_families() {
        for (s, f) in [
            ("AUTO", DnsLookupFamily::Auto),
            ("V4_ONLY", DnsLookupFamily::V4Only),
            ("V6_ONLY", DnsLookupFamily::V6Only),
            ("V4_PREFERRED", DnsLookupFamily::V4Preferred),
            ("ALL", DnsLookupFamily::All),
        ] {
            let c = ok(&format!("name: a\ndns_lookup_family: {s}\n"));
            assert_eq!(c.dns_lookup_family, f);
        }
    }

    #[test]
    fn protocol_choices() {
        let base = "name: a\ntyped_extension_protocol_options:\n  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n    \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n";
        let c = ok(&format!(
            "{base}    explicit_http_config: {{http_protocol_options: {{}}}}\n"
        ));
        assert_eq!(c.protocol, UpstreamProtocol::Http1);
        let c = ok(&format!(
            "{base}    explicit_http_config: {{http2_protocol_options: {{}}}}\n"
        ));
        assert_eq!(
            c.protocol,
            UpstreamProtocol::Http2(Http2Settings::default())
        );
        let c = ok(&format!(
            "{base}    use_downstream_protocol_config: {{http2_protocol_options: {{max_concurrent_streams: 7}}}}\n"
        ));
        assert_eq!(
            c.protocol,
            UpstreamProtocol::UseDownstream(Http2Settings {
                max_concurrent_streams: 7,
                ..Http2Settings::default()
            })
        );
        // Deprecated top-level field still means HTTP/2.
        let c = ok("name: a\nhttp2_protocol_options: {}\n");
        assert_eq!(
            c.protocol,
            UpstreamProtocol::Http2(Http2Settings::default())
        );
        // idle_timeout 0 disables it.
        let c = ok("name: a\ncommon_http_protocol_options: {idle_timeout: 0s}\n");
        assert_eq!(c.idle_timeout, None);
    }

    #[test]
    fn endpoint_port_zero_is_refused() {
        let p = err_paths(
            "name: a\nload_assignment:\n  cluster_name: a\n  endpoints:\n  - lb_endpoints:\n    - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}\n",
        );
        assert_eq!(
            p,
            vec![
                "clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value"
            ]
        );
    }

    #[test]
    fn eds_cluster_and_load_assignment() {
        let c = ok(
            "name: a\ntype: EDS\neds_cluster_config: {eds_config: {ads: {}, resource_api_version: V3}}\n",
        );
        assert_eq!(c.discovery, DiscoveryType::Eds);
        let eds = c.eds.expect("eds");
        assert_eq!(eds.service_name, "a");
        assert_eq!(eds.source, crate::config::source::ConfigSource::ads());
        let c = ok(
            "name: a\ntype: EDS\neds_cluster_config: {service_name: svc, eds_config: {ads: {}}}\n",
        );
        assert_eq!(c.eds.expect("eds").service_name, "svc");

        let la: weir_xds_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment =
            weir_xds_api::from_yaml(
                "cluster_name: a\nendpoints:\n- locality: {zone: z1}\n  priority: 1\n  lb_endpoints:\n  - endpoint: {address: {socket_address: {address: 10.0.0.1, port_value: 80}}}\n    load_balancing_weight: 5\n    health_status: UNHEALTHY\n",
            )
            .expect("cla");
        let mut errs = Errors::default();
        let eps = translate_load_assignment(&la, DiscoveryType::Eds, "cla", &mut errs);
        assert!(errs.is_empty(), "{:?}", errs.0);
        assert_eq!(eps.len(), 1);
        assert_eq!((eps[0].weight, eps[0].priority), (5, 1));
        assert_eq!(eps[0].health, health_flags::FAILED_EDS_HEALTH);
        assert_eq!(
            eps[0].locality.as_ref().map(|l| l.zone.as_str()),
            Some("z1")
        );

        let la: weir_xds_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment =
            weir_xds_api::from_yaml(
                "cluster_name: a\npolicy: {drop_overloads: [{category: x, drop_percentage: {numerator: 1}}]}\nendpoints:\n- lb_endpoints:\n  - endpoint: {address: {socket_address: {address: my.host, port_value: 80}}}\n",
            )
            .expect("cla");
        let mut errs = Errors::default();
        translate_load_assignment(&la, DiscoveryType::Eds, "cla", &mut errs);
        let paths: Vec<_> = errs.0.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "cla.policy",
                "cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address"
            ]
        );
    }

    #[test]
    fn rejections_name_their_path() {
        let p = err_paths("name: a\ntype: EDS\n");
        assert_eq!(p, vec!["clusters[0].eds_cluster_config"]);
        let p = err_paths("name: a\neds_cluster_config: {eds_config: {ads: {}}}\n");
        assert_eq!(p, vec!["clusters[0].eds_cluster_config"]);
        let p = err_paths(
            "name: a\ntype: EDS\neds_cluster_config: {eds_config: {ads: {}}}\nload_assignment: {cluster_name: a}\n",
        );
        assert_eq!(p, vec!["clusters[0].load_assignment"]);
        let p = err_paths(
            "name: a\ntype: EDS\neds_cluster_config: {eds_config: {api_config_source: {}}}\n",
        );
        assert_eq!(
            p,
            vec!["clusters[0].eds_cluster_config.eds_config.api_config_source"]
        );
        let p = err_paths("name: a\ntype: LOGICAL_DNS\n");
        assert_eq!(p, vec!["clusters[0].type"]);
        assert_eq!(err_paths("name: ''\n"), vec!["clusters[0].name"]);
        // A TLS transport socket needs its UpstreamTlsContext.
        assert_eq!(
            err_paths("name: a\ntransport_socket: {name: envoy.transport_sockets.tls}\n"),
            vec!["clusters[0].transport_socket.typed_config"]
        );
        assert_eq!(
            err_paths("name: a\nlb_policy: CLUSTER_PROVIDED\n"),
            vec!["clusters[0].lb_policy"]
        );
        for field in [
            "respect_dns_ttl: true",
            "lb_subset_config: {subset_selectors: [{keys: [a]}]}",
            "alt_stat_name: x",
        ] {
            let key = field.split(':').next().expect("key");
            assert_eq!(
                err_paths(&format!("name: a\n{field}\n")),
                vec![format!("clusters[0].{key}")],
                "{field}"
            );
        }
    }

    #[test]
    fn lb_policies_and_settings() {
        let c = ok("name: a\nlb_policy: RANDOM\n");
        assert_eq!(c.lb_policy, LbPolicy::Random);
        assert_eq!(c.lb, LbConfig::default());
        let c = ok("name: a\nlb_policy: LEAST_REQUEST\n");
        assert_eq!(c.lb_policy, LbPolicy::LEAST_REQUEST);
        let c = ok(r#"
name: a
lb_policy: LEAST_REQUEST
least_request_lb_config:
  choice_count: 3
  active_request_bias: {default_value: 0.5, runtime_key: lr.bias}
  slow_start_config:
    slow_start_window: 30s
    aggression: {default_value: 2.0, runtime_key: ss.aggr}
    min_weight_percent: {value: 20}
common_lb_config:
  healthy_panic_threshold: {value: 25.7}
  locality_weighted_lb_config: {}
"#);
        assert_eq!(
            c.lb_policy,
            LbPolicy::LeastRequest {
                choice_count: 3,
                active_request_bias: 0.5
            }
        );
        assert_eq!(
            c.lb,
            LbConfig {
                healthy_panic_threshold: 25.0,
                locality_weighted: true,
                slow_start: Some(SlowStartConfig {
                    window: Duration::from_secs(30),
                    aggression: 2.0,
                    min_weight_percent: 20.0,
                }),
                original_dst: None,
            }
        );
        let c =
            ok("name: a\nround_robin_lb_config: {slow_start_config: {slow_start_window: 5s}}\n");
        assert_eq!(c.lb_policy, LbPolicy::RoundRobin);
        assert_eq!(
            c.lb.slow_start,
            Some(SlowStartConfig {
                window: Duration::from_secs(5),
                aggression: 1.0,
                min_weight_percent: 10.0,
            })
        );
        let c = ok("name: a\nlb_policy: RING_HASH\n");
        assert_eq!(c.lb_policy, LbPolicy::RING_HASH);
        let c = ok(r#"
name: a
lb_policy: RING_HASH
ring_hash_lb_config: {minimum_ring_size: 64, maximum_ring_size: 4096, hash_function: XX_HASH}
"#);
        assert_eq!(
            c.lb_policy,
            LbPolicy::RingHash {
                minimum_ring_size: 64,
                maximum_ring_size: 4096
            }
        );
        let c = ok("name: a\nlb_policy: MAGLEV\nmaglev_lb_config: {table_size: 251}\n");
        assert_eq!(c.lb_policy, LbPolicy::Maglev { table_size: 251 });
        let c = ok("name: a\nlb_policy: MAGLEV\n");
        assert_eq!(c.lb_policy, LbPolicy::Maglev { table_size: 65537 });
        // Panic disabled.
        let c = ok("name: a\ncommon_lb_config: {healthy_panic_threshold: {value: 0}}\n");
        assert_eq!(c.lb.healthy_panic_threshold, 0.0);
    }

    #[test]
    fn lb_rejections_name_their_path() {
        let cases: &[(&str, &str)] = &[
            (
                "lb_policy: RING_HASH\nring_hash_lb_config: {hash_function: MURMUR_HASH_2}",
                "clusters[0].ring_hash_lb_config.hash_function",
            ),
            (
                "lb_policy: RING_HASH\nring_hash_lb_config: {minimum_ring_size: 9000000}",
                "clusters[0].ring_hash_lb_config.minimum_ring_size",
            ),
            (
                "lb_policy: RING_HASH\nring_hash_lb_config: {minimum_ring_size: 100, maximum_ring_size: 10}",
                "clusters[0].ring_hash_lb_config",
            ),
            (
                "lb_policy: MAGLEV\nmaglev_lb_config: {table_size: 65536}",
                "clusters[0].maglev_lb_config.table_size",
            ),
            (
                "lb_policy: MAGLEV\nmaglev_lb_config: {table_size: 5000011}",
                "clusters[0].maglev_lb_config.table_size",
            ),
            (
                "lb_policy: ROUND_ROBIN\nmaglev_lb_config: {}",
                "clusters[0].maglev_lb_config",
            ),
            (
                "lb_policy: RANDOM\nround_robin_lb_config: {}",
                "clusters[0].round_robin_lb_config",
            ),
            (
                "lb_policy: LEAST_REQUEST\nleast_request_lb_config: {choice_count: 1}",
                "clusters[0].least_request_lb_config.choice_count",
            ),
            (
                "lb_policy: LEAST_REQUEST\nleast_request_lb_config: {active_request_bias: {default_value: -1, runtime_key: k}}",
                "clusters[0].least_request_lb_config.active_request_bias.default_value",
            ),
            (
                "round_robin_lb_config: {slow_start_config: {aggression: {default_value: 0, runtime_key: k}}}",
                "clusters[0].round_robin_lb_config.slow_start_config.aggression.default_value",
            ),
            (
                "round_robin_lb_config: {slow_start_config: {min_weight_percent: {value: 120}}}",
                "clusters[0].round_robin_lb_config.slow_start_config.min_weight_percent.value",
            ),
            (
                "common_lb_config: {healthy_panic_threshold: {value: 101}}",
                "clusters[0].common_lb_config.healthy_panic_threshold.value",
            ),
            (
                "common_lb_config: {zone_aware_lb_config: {}}",
                "clusters[0].common_lb_config.zone_aware_lb_config",
            ),
            (
                "common_lb_config: {update_merge_window: 1s}",
                "clusters[0].common_lb_config.update_merge_window",
            ),
            (
                "lb_policy: LOAD_BALANCING_POLICY_CONFIG",
                "clusters[0].lb_policy",
            ),
        ];
        for (yaml, path) in cases {
            assert_eq!(
                err_paths(&format!("name: a\n{yaml}\n")),
                vec![path.to_string()],
                "{yaml}"
            );
        }
        let (_, errs) = tr(
            "name: a\nlb_policy: RING_HASH\nring_hash_lb_config: {hash_function: MURMUR_HASH_2}\n",
        );
        assert!(errs[0].1.contains("MURMUR_HASH_2"), "{errs:?}");
    }

    #[test]
    fn locality_weights() {
        let c = ok(r#"
name: a
common_lb_config: {locality_weighted_lb_config: {}}
load_assignment:
  cluster_name: a
  endpoints:
  - locality: {zone: z1}
    load_balancing_weight: 3
    lb_endpoints:
    - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 1}}}
  - load_balancing_weight: 2
    lb_endpoints:
    - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 2}}}
  - lb_endpoints:
    - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 3}}}
"#);
        let l = |i: usize| c.endpoints[i].locality.clone();
        assert_eq!(
            l(0),
            Some(LocalityConfig {
                zone: "z1".into(),
                load_balancing_weight: Some(3),
                ..Default::default()
            })
        );
        assert_eq!(
            l(1),
            Some(LocalityConfig {
                load_balancing_weight: Some(2),
                ..Default::default()
            })
        );
        assert_eq!(l(2), None);
        let p = err_paths(
            "name: a\nload_assignment:\n  cluster_name: a\n  endpoints:\n  - load_balancing_weight: 0\n",
        );
        assert_eq!(
            p,
            ["clusters[0].load_assignment.endpoints[0].load_balancing_weight"]
        );
    }

    #[test]
    fn endpoint_rejections() {
        let la = |ep: &str| {
            format!("name: a\nload_assignment:\n  endpoints:\n  - lb_endpoints:\n    - {ep}\n")
        };
        let pre = "clusters[0].load_assignment.endpoints[0].lb_endpoints[0]";
        // STATIC needs IPs.
        assert_eq!(
            err_paths(&la(
                "endpoint: {address: {socket_address: {address: example.com, port_value: 1}}}"
            )),
            vec![format!("{pre}.endpoint.address.socket_address.address")]
        );
        // Weight 0.
        assert_eq!(
            err_paths(&la(
                "endpoint: {address: {socket_address: {address: 1.2.3.4, port_value: 1}}}\n      load_balancing_weight: 0"
            )),
            vec![format!("{pre}.load_balancing_weight")]
        );
        // Missing address.
        assert_eq!(
            err_paths(&la("endpoint: {hostname: x}")),
            vec![format!("{pre}.endpoint.address")]
        );
        // STRICT_DNS needs a port and a valid name.
        let dns = |addr: &str| {
            format!(
                "name: a\ntype: STRICT_DNS\nload_assignment:\n  endpoints:\n  - lb_endpoints:\n    - endpoint: {{address: {{socket_address: {addr}}}}}\n"
            )
        };
        assert_eq!(
            err_paths(&dns("{address: example.com}")),
            vec![format!("{pre}.endpoint.address.socket_address.port_value")]
        );
        assert_eq!(
            err_paths(&dns("{address: 'bad host', port_value: 1}")),
            vec![format!("{pre}.endpoint.address.socket_address.address")]
        );
        // health_check_config is for the health-check issue.
        assert_eq!(
            err_paths(&la(
                "endpoint: {address: {socket_address: {address: 1.2.3.4, port_value: 1}}, health_check_config: {port_value: 9}}"
            )),
            vec![format!("{pre}.endpoint.health_check_config")]
        );
    }

    #[test]
    fn protocol_option_rejections() {
        let base = "name: a\ntyped_extension_protocol_options:\n  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n    \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n";
        let k = "clusters[0].typed_extension_protocol_options[envoy.extensions.upstreams.http.v3.HttpProtocolOptions]";
        assert_eq!(
            err_paths(&format!(
                "{base}    explicit_http_config: {{http2_protocol_options: {{hpack_table_size: 1}}}}\n"
            )),
            vec![format!(
                "{k}.explicit_http_config.http2_protocol_options.hpack_table_size"
            )]
        );
        assert_eq!(
            err_paths(&format!(
                "{base}    explicit_http_config: {{http2_protocol_options: {{initial_stream_window_size: 10}}}}\n"
            )),
            vec![format!(
                "{k}.explicit_http_config.http2_protocol_options.initial_stream_window_size"
            )]
        );
        assert_eq!(
            err_paths(&format!("{base}    auto_config: {{}}\n")),
            vec![format!("{k}.auto_config")]
        );
        assert_eq!(
            err_paths(&format!(
                "{base}    explicit_http_config: {{http_protocol_options: {{}}}}\n    common_http_protocol_options: {{max_headers_count: 10}}\n"
            )),
            vec![format!(
                "{k}.common_http_protocol_options.max_headers_count"
            )]
        );
        // Both the extension and the deprecated field.
        assert_eq!(
            err_paths(&format!(
                "{base}    explicit_http_config: {{http_protocol_options: {{}}}}\nhttp2_protocol_options: {{}}\n"
            )),
            vec![k.to_string()]
        );
        // Unknown extension key.
        let p = err_paths(
            "name: a\ntyped_extension_protocol_options:\n  envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions:\n    \"@type\": type.googleapis.com/envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions\n",
        );
        assert_eq!(
            p,
            vec![
                "clusters[0].typed_extension_protocol_options[envoy.extensions.upstreams.tcp.v3.TcpProtocolOptions]"
            ]
        );
    }

    #[test]
    fn original_dst_cluster() {
        let c = ok("name: pt\ntype: ORIGINAL_DST\nlb_policy: CLUSTER_PROVIDED\n");
        assert_eq!(c.discovery, DiscoveryType::OriginalDst);
        let od = c.lb.original_dst.expect("original_dst config");
        assert_eq!(od.cleanup_interval, Duration::from_secs(5));
        assert!(od.http_header.is_none());
        assert!(od.port_override.is_none());

        let c = ok(
            "name: pt\ntype: ORIGINAL_DST\nlb_policy: CLUSTER_PROVIDED\n\
                    cleanup_interval: 2s\noriginal_dst_lb_config:\n  use_http_header: true\n  \
                    http_header_name: X-Dst\n  upstream_port_override: 8080\n",
        );
        let od = c.lb.original_dst.expect("original_dst config");
        assert_eq!(od.cleanup_interval, Duration::from_secs(2));
        assert_eq!(od.http_header.expect("header").as_str(), "x-dst");
        assert_eq!(od.port_override, Some(8080));
        let c = ok(
            "name: pt\ntype: ORIGINAL_DST\nlb_policy: CLUSTER_PROVIDED\n\
                    original_dst_lb_config: {use_http_header: true}\n",
        );
        assert_eq!(
            c.lb.original_dst
                .expect("cfg")
                .http_header
                .expect("h")
                .as_str(),
            "x-envoy-original-dst-host"
        );
    }

    #[test]
    fn original_dst_cluster_errors() {
        let p = "clusters[0]";
        assert_eq!(
            err_paths("name: pt\ntype: ORIGINAL_DST\nlb_policy: ROUND_ROBIN\n"),
            vec![format!("{p}.lb_policy")]
        );
        assert_eq!(
            err_paths(
                "name: pt\ntype: ORIGINAL_DST\nlb_policy: CLUSTER_PROVIDED\ncleanup_interval: 0s\n\
                 original_dst_lb_config: {http_header_name: x, upstream_port_override: 70000, \
                 metadata_key: {key: k}}\n\
                 load_assignment: {cluster_name: pt}\n"
            ),
            vec![
                format!("{p}.load_assignment"),
                format!("{p}.cleanup_interval"),
                format!("{p}.original_dst_lb_config.metadata_key"),
                format!("{p}.original_dst_lb_config.http_header_name"),
                format!("{p}.original_dst_lb_config.upstream_port_override"),
            ]
        );
        assert_eq!(
            err_paths(
                "name: pt\ntype: ORIGINAL_DST\nlb_policy: CLUSTER_PROVIDED\n\
                 original_dst_lb_config: {use_http_header: true, http_header_name: \"bad name\"}\n"
            ),
            vec![format!("{p}.original_dst_lb_config.http_header_name")]
        );
        // The ORIGINAL_DST settings on another type.
        assert_eq!(
            err_paths(
                "name: a\ncleanup_interval: 1s\noriginal_dst_lb_config: {use_http_header: true}\n"
            ),
            vec![
                format!("{p}.original_dst_lb_config"),
                format!("{p}.cleanup_interval")
            ]
        );
    }
}
