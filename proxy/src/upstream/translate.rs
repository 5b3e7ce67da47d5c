//! `envoy.config.cluster.v3.Cluster` -> [`ClusterConfig`].
//!
//! Supported: STATIC and STRICT_DNS clusters with an inline `load_assignment`, ROUND_ROBIN,
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
    ClusterConfig, DiscoveryType, DnsLookupFamily, EndpointAddress, EndpointConfig, Http2Settings,
    LbPolicy, LocalityConfig, UpstreamProtocol, health_flags,
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
    // Opaque to weir: only read by filters and subset LB (which is rejected).
    "metadata",
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
            Ok(other) => {
                errs.add(
                    join(path, "type"),
                    format!(
                        "cluster type {} is not supported (use STATIC or STRICT_DNS)",
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

    let lb_policy = match PbLbPolicy::try_from(c.lb_policy) {
        Ok(PbLbPolicy::RoundRobin) => LbPolicy::RoundRobin,
        Ok(other) => {
            errs.add(
                join(path, "lb_policy"),
                format!(
                    "lb_policy {} is not supported yet (use ROUND_ROBIN)",
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

    let mut endpoints = Vec::new();
    if let Some(la) = &c.load_assignment {
        let lpath = join(path, "load_assignment");
        errs.reject_unsupported(la, &["cluster_name", "endpoints"], &lpath);
        for (i, loc) in la.endpoints.iter().enumerate() {
            let ppath = format!("{lpath}.endpoints[{i}]");
            errs.reject_unsupported(
                loc,
                &[
                    "locality",
                    "lb_endpoints",
                    "priority",
                    // Only used by locality-weighted LB, which is not enabled (Envoy ignores
                    // it in that case too).
                    "load_balancing_weight",
                    "metadata",
                ],
                &ppath,
            );
            let locality = loc.locality.as_ref().map(|l| LocalityConfig {
                region: l.region.clone(),
                zone: l.zone.clone(),
                sub_zone: l.sub_zone.clone(),
            });
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
    }

    let (health_checks, outlier) = health_and_outlier(c, &protocol, path, errs);

    Some(ClusterConfig {
        name: c.name.clone(),
        discovery,
        endpoints,
        connect_timeout,
        lb_policy,
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
    })
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
        DiscoveryType::Static => {
            EndpointAddress::Ip(socket_address(ep.address.as_ref(), &apath, errs)?)
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
                sub_zone: "s1".into()
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
    fn rejections_name_their_path() {
        let p = err_paths("name: a\ntype: EDS\n");
        assert_eq!(p, vec!["clusters[0].type"]);
        let p = err_paths("name: a\ntype: LOGICAL_DNS\n");
        assert_eq!(p, vec!["clusters[0].type"]);
        assert_eq!(err_paths("name: ''\n"), vec!["clusters[0].name"]);
        assert_eq!(
            err_paths("name: a\nlb_policy: LEAST_REQUEST\n"),
            vec!["clusters[0].lb_policy"]
        );
        for field in [
            "respect_dns_ttl: true",
            "transport_socket: {name: envoy.transport_sockets.tls}",
            "common_lb_config: {}",
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
}
