//! `/clusters` and `/listeners`, in Envoy's text form and as Envoy's `envoy.admin.v3.Clusters`
//! / `envoy.admin.v3.Listeners` JSON (`?format=json`).
//!
//! Per host: the counters, `health_flags` (`healthy`, or `/failed_active_hc`,
//! `/failed_outlier_check`, `/failed_eds_health` concatenated in that order) and the outlier
//! detector's `success_rate` / `local_origin_success_rate` of the last interval (-1 when not
//! computed). Clusters with outlier detection also print the cluster-wide
//! `outlier::success_rate_average` and `outlier::success_rate_ejection_threshold` lines.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::{Response, StatusCode};
use serde_json::{Value, json as j};
use weir_xds_api::pb::envoy::admin::v3::{
    ClusterStatus, Clusters, HostHealthStatus, HostStatus, ListenerStatus, Listeners, SimpleMetric,
    simple_metric,
};
use weir_xds_api::pb::envoy::config::core::v3::{
    Address, HealthStatus, SocketAddress, address, socket_address::PortSpecifier,
};

use super::{Body, Query, TEXT, fill, json, text};
use weir_xds_api::pb::envoy::r#type::v3::Percent;

use crate::server::ServerState;
use crate::upstream::circuit::{CircuitBreakerConfig, Thresholds};
use crate::upstream::outlier::{Detector, Origin};
use crate::upstream::{Cluster, Host, health_flags};
use weir_xds_api::pb::envoy::config::cluster::v3::CircuitBreakers as PbCircuitBreakers;

/// A cluster with the host set it had when the page was rendered.
type ClusterHosts = (Arc<Cluster>, Arc<Vec<Arc<Host>>>);

/// `GET /clusters`.
pub(super) fn clusters(state: &ServerState, q: &Query) -> Response<Body> {
    let all: Vec<ClusterHosts> = state
        .clusters
        .all()
        .into_iter()
        .map(|c| {
            let hosts = c.admin_hosts();
            (c, hosts)
        })
        .collect();
    if q.wants_json() {
        let statuses = all
            .iter()
            .map(|(c, hosts)| {
                cluster_status(
                    c.name(),
                    c.outlier_detector(),
                    &c.config().circuit_breakers,
                    hosts,
                )
            })
            .collect();
        let mut v = weir_xds_api::to_json(&Clusters {
            cluster_statuses: statuses,
        });
        fill_host_defaults(&mut v);
        fill(&mut v, "cluster_statuses", j!([]));
        return json(StatusCode::OK, &v);
    }
    let mut out = String::new();
    for (c, hosts) in &all {
        write_cluster_text(
            &mut out,
            c.name(),
            c.outlier_detector(),
            &c.config().circuit_breakers,
            hosts,
        );
    }
    text(StatusCode::OK, TEXT, out)
}

/// The per-host counters, in Envoy's (alphabetical) order, and whether each is a gauge.
fn host_stats(h: &Host) -> [(&'static str, u64, bool); 8] {
    let s = &h.stats;
    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    [
        ("cx_active", g(&s.cx_active), true),
        ("cx_connect_fail", g(&s.cx_connect_fail), false),
        ("cx_total", g(&s.cx_total), false),
        ("rq_active", g(&s.rq_active), true),
        ("rq_error", g(&s.rq_error), false),
        ("rq_success", g(&s.rq_success), false),
        ("rq_timeout", g(&s.rq_timeout), false),
        ("rq_total", g(&s.rq_total), false),
    ]
}

/// Envoy's `health_flags` text: `healthy`, or the failure flags concatenated
/// (`/failed_active_hc/failed_outlier_check`).
fn health_flags_text(bits: u32) -> String {
    if bits == 0 {
        return "healthy".into();
    }
    let mut s = String::new();
    for (bit, name) in [
        (health_flags::FAILED_ACTIVE_HC, "/failed_active_hc"),
        (health_flags::FAILED_OUTLIER_CHECK, "/failed_outlier_check"),
        (health_flags::FAILED_EDS_HEALTH, "/failed_eds_health"),
    ] {
        if bits & bit != 0 {
            s.push_str(name);
        }
    }
    s
}

/// C's `%g` (six significant digits, trailing zeros trimmed), as Envoy prints the outlier
/// averages; enough for the -1..=100 range these values take.
fn format_g(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if v == v.trunc() && v.abs() < 1e6 {
        return format!("{v:.0}");
    }
    let int_digits = if v.abs() < 1.0 {
        1
    } else {
        v.abs().log10().floor() as i32 + 1
    };
    let decimals = (6 - int_digits).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// One cluster in Envoy's `/clusters` text form.
fn write_cluster_text(
    out: &mut String,
    name: &str,
    outlier: Option<&Detector>,
    breakers: &CircuitBreakerConfig,
    hosts: &[Arc<Host>],
) {
    // `fmt::Write` for `String` never fails.
    let _ = writeln!(out, "{name}::observability_name::{name}");
    if let Some(d) = outlier {
        for (label, origin) in [("", Origin::External), ("local_origin_", Origin::Local)] {
            let _ = writeln!(
                out,
                "{name}::outlier::{label}success_rate_average::{}",
                format_g(d.success_rate_average(origin))
            );
            let _ = writeln!(
                out,
                "{name}::outlier::{label}success_rate_ejection_threshold::{}",
                format_g(d.success_rate_ejection_threshold(origin))
            );
        }
    }
    for (priority, t) in [("default", &breakers.default), ("high", &breakers.high)] {
        for (field, max) in [
            ("max_connections", t.max_connections),
            ("max_pending_requests", t.max_pending_requests),
            ("max_requests", t.max_requests),
            ("max_retries", t.max_retries),
        ] {
            let _ = writeln!(out, "{name}::{priority}_priority::{field}::{max}");
        }
    }
    let _ = writeln!(out, "{name}::added_via_api::false");
    for h in hosts {
        let p = format!("{name}::{}", h.address);
        for (stat, value, _) in host_stats(h) {
            let _ = writeln!(out, "{p}::{stat}::{value}");
        }
        let health = h.health.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{p}::hostname::{}",
            h.hostname.as_deref().unwrap_or("")
        );
        let _ = writeln!(out, "{p}::health_flags::{}", health_flags_text(health));
        let _ = writeln!(out, "{p}::weight::{}", h.weight);
        let loc = h.locality.as_ref();
        let field = |f: fn(&crate::upstream::LocalityConfig) -> &str| loc.map_or("", f);
        let _ = writeln!(out, "{p}::region::{}", field(|l| &l.region));
        let _ = writeln!(out, "{p}::zone::{}", field(|l| &l.zone));
        let _ = writeln!(out, "{p}::sub_zone::{}", field(|l| &l.sub_zone));
        let _ = writeln!(out, "{p}::canary::false");
        let _ = writeln!(out, "{p}::priority::{}", h.priority);
        let _ = writeln!(
            out,
            "{p}::success_rate::{}",
            h.outlier.success_rate(Origin::External)
        );
        let _ = writeln!(
            out,
            "{p}::local_origin_success_rate::{}",
            h.outlier.success_rate(Origin::Local)
        );
    }
}

fn socket_address(a: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(a.port()))),
            ..Default::default()
        })),
    }
}

/// A `Percent` when `v` passes `keep` (Envoy omits unset success rates).
fn percent(v: f64, keep: bool) -> Option<Percent> {
    keep.then_some(Percent { value: v })
}

/// One cluster as Envoy's `ClusterStatus`.
/// Envoy's `CircuitBreakers` thresholds as `ClusterStatus.circuit_breakers` shows them.
fn breakers_pb(b: &CircuitBreakerConfig) -> PbCircuitBreakers {
    use weir_xds_api::pb::envoy::config::cluster::v3::circuit_breakers::Thresholds as PbT;
    use weir_xds_api::pb::envoy::config::core::v3::RoutingPriority;
    use weir_xds_api::pb::google::protobuf::UInt32Value;
    let v = |n: u64| {
        Some(UInt32Value {
            value: u32::try_from(n).unwrap_or(u32::MAX),
        })
    };
    let t = |p: RoutingPriority, t: &Thresholds| PbT {
        priority: p as i32,
        max_connections: v(t.max_connections),
        max_pending_requests: v(t.max_pending_requests),
        max_requests: v(t.max_requests),
        max_retries: v(t.max_retries),
        track_remaining: t.track_remaining,
        ..Default::default()
    };
    PbCircuitBreakers {
        thresholds: vec![
            t(RoutingPriority::Default, &b.default),
            t(RoutingPriority::High, &b.high),
        ],
        ..Default::default()
    }
}

fn cluster_status(
    name: &str,
    outlier: Option<&Detector>,
    breakers: &CircuitBreakerConfig,
    hosts: &[Arc<Host>],
) -> ClusterStatus {
    let threshold = |o: Origin| {
        outlier.and_then(|d| {
            let t = d.success_rate_ejection_threshold(o);
            percent(t, t > 0.0)
        })
    };
    ClusterStatus {
        name: name.to_string(),
        observability_name: name.to_string(),
        circuit_breakers: Some(breakers_pb(breakers)),
        success_rate_ejection_threshold: threshold(Origin::External),
        local_origin_success_rate_ejection_threshold: threshold(Origin::Local),
        host_statuses: hosts
            .iter()
            .map(|h| {
                let bits = h.health.load(Ordering::Relaxed);
                let eds = if bits & health_flags::FAILED_EDS_HEALTH != 0 {
                    HealthStatus::Unhealthy
                } else {
                    HealthStatus::Healthy
                };
                HostStatus {
                    address: Some(socket_address(h.address)),
                    stats: host_stats(h)
                        .into_iter()
                        .map(|(stat, value, gauge)| SimpleMetric {
                            r#type: if gauge {
                                simple_metric::Type::Gauge
                            } else {
                                simple_metric::Type::Counter
                            } as i32,
                            value,
                            name: stat.to_string(),
                        })
                        .collect(),
                    health_status: Some(HostHealthStatus {
                        failed_active_health_check: bits & health_flags::FAILED_ACTIVE_HC != 0,
                        failed_outlier_check: bits & health_flags::FAILED_OUTLIER_CHECK != 0,
                        eds_health_status: eds as i32,
                        ..Default::default()
                    }),
                    weight: h.weight,
                    hostname: h.hostname.clone().unwrap_or_default(),
                    priority: h.priority,
                    success_rate: {
                        let r = h.outlier.success_rate(Origin::External);
                        percent(r, r >= 0.0)
                    },
                    local_origin_success_rate: {
                        let r = h.outlier.success_rate(Origin::Local);
                        percent(r, r >= 0.0)
                    },
                    locality: h.locality.as_ref().map(|l| {
                        weir_xds_api::pb::envoy::config::core::v3::Locality {
                            region: l.region.clone(),
                            zone: l.zone.clone(),
                            sub_zone: l.sub_zone.clone(),
                        }
                    }),
                }
            })
            .collect(),
        ..Default::default()
    }
}

/// proto3 JSON drops zero values; print the per-host fields clients read even when zero
/// (`"value": "0"`, `"priority": 0`, `"failed_active_health_check": false`).
fn fill_host_defaults(v: &mut Value) {
    let Some(clusters) = v.get_mut("cluster_statuses").and_then(Value::as_array_mut) else {
        return;
    };
    for c in clusters {
        let Some(hosts) = c.get_mut("host_statuses").and_then(Value::as_array_mut) else {
            continue;
        };
        for h in hosts {
            fill(h, "weight", j!(0));
            fill(h, "priority", j!(0));
            fill(h, "hostname", j!(""));
            if let Some(stats) = h.get_mut("stats").and_then(Value::as_array_mut) {
                for s in stats {
                    // uint64 is a string in proto3 JSON.
                    fill(s, "value", j!("0"));
                }
            }
            if let Some(hs) = h.get_mut("health_status") {
                fill(hs, "failed_active_health_check", j!(false));
                fill(hs, "failed_outlier_check", j!(false));
            }
        }
    }
}

/// `GET /listeners`: `name::ip:port` lines, or Envoy's `Listeners` JSON.
pub(super) fn listeners(state: &ServerState, q: &Query) -> Response<Body> {
    let bound = state.listener_manager.listeners();
    if q.wants_json() {
        let msg = Listeners {
            listener_statuses: bound
                .iter()
                .map(|l| ListenerStatus {
                    name: l.name.clone(),
                    local_address: Some(socket_address(l.address)),
                    ..Default::default()
                })
                .collect(),
        };
        let mut v = weir_xds_api::to_json(&msg);
        fill(&mut v, "listener_statuses", j!([]));
        return json(StatusCode::OK, &v);
    }
    let mut out = String::new();
    for l in bound {
        let _ = writeln!(out, "{}::{}", l.name, l.address);
    }
    text(StatusCode::OK, TEXT, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(addr: &str, health: u32, priority: u32) -> Arc<Host> {
        let h = Host::new(
            addr.parse().expect("addr"),
            Some("backend.local".into()),
            3,
            priority,
            health,
        );
        h.stats.cx_total.store(7, Ordering::Relaxed);
        h.stats.rq_success.store(5, Ordering::Relaxed);
        Arc::new(h)
    }

    #[test]
    fn text_form_matches_envoy() {
        let hosts = vec![
            host("127.0.0.1:8080", 0, 0),
            host(
                "[::1]:9090",
                health_flags::FAILED_ACTIVE_HC | health_flags::FAILED_EDS_HEALTH,
                1,
            ),
        ];
        let mut out = String::new();
        write_cluster_text(&mut out, "backend", None, &Default::default(), &hosts);
        let lines: Vec<&str> = out.lines().collect();
        for want in [
            "backend::observability_name::backend",
            "backend::default_priority::max_connections::1024",
            "backend::default_priority::max_pending_requests::1024",
            "backend::default_priority::max_requests::1024",
            "backend::default_priority::max_retries::3",
            "backend::high_priority::max_connections::1024",
            "backend::high_priority::max_retries::3",
            "backend::127.0.0.1:8080::cx_active::0",
            "backend::127.0.0.1:8080::cx_connect_fail::0",
            "backend::127.0.0.1:8080::cx_total::7",
            "backend::127.0.0.1:8080::rq_active::0",
            "backend::127.0.0.1:8080::rq_error::0",
            "backend::127.0.0.1:8080::rq_success::5",
            "backend::127.0.0.1:8080::rq_timeout::0",
            "backend::127.0.0.1:8080::rq_total::0",
            "backend::127.0.0.1:8080::hostname::backend.local",
            "backend::127.0.0.1:8080::health_flags::healthy",
            "backend::127.0.0.1:8080::weight::3",
            "backend::127.0.0.1:8080::region::",
            "backend::127.0.0.1:8080::zone::",
            "backend::127.0.0.1:8080::sub_zone::",
            "backend::127.0.0.1:8080::canary::false",
            "backend::127.0.0.1:8080::priority::0",
            "backend::127.0.0.1:8080::success_rate::-1",
            "backend::127.0.0.1:8080::local_origin_success_rate::-1",
            "backend::[::1]:9090::health_flags::/failed_active_hc/failed_eds_health",
            "backend::[::1]:9090::priority::1",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in\n{out}");
        }
    }

    #[test]
    fn json_form_matches_envoy() {
        let hosts = vec![
            host("127.0.0.1:8080", 0, 0),
            host("127.0.0.2:8080", health_flags::FAILED_OUTLIER_CHECK, 2),
        ];
        let mut v = weir_xds_api::to_json(&Clusters {
            cluster_statuses: vec![cluster_status("backend", None, &Default::default(), &hosts)],
        });
        fill_host_defaults(&mut v);
        let c = &v["cluster_statuses"][0];
        assert_eq!(c["name"], "backend");
        let h = &c["host_statuses"][0];
        assert_eq!(
            h["address"],
            j!({"socket_address": {"address": "127.0.0.1", "port_value": 8080}})
        );
        let stats = h["stats"].as_array().expect("stats");
        let get = |n: &str| {
            stats
                .iter()
                .find(|s| s["name"] == n)
                .map(|s| s["value"].clone())
        };
        assert_eq!(get("cx_total"), Some(j!("7")));
        assert_eq!(get("rq_total"), Some(j!("0")));
        assert_eq!(h["health_status"]["eds_health_status"], "HEALTHY");
        assert_eq!(h["health_status"]["failed_active_health_check"], false);
        assert_eq!(h["health_status"]["failed_outlier_check"], false);
        assert_eq!(h["weight"], 3);
        assert_eq!(h["priority"], 0);
        assert_eq!(h["hostname"], "backend.local");
        let h2 = &c["host_statuses"][1];
        assert_eq!(h2["health_status"]["failed_outlier_check"], true);
        assert_eq!(h2["priority"], 2);
    }

    #[test]
    fn health_flag_combinations() {
        use health_flags::*;
        assert_eq!(health_flags_text(0), "healthy");
        assert_eq!(health_flags_text(FAILED_ACTIVE_HC), "/failed_active_hc");
        assert_eq!(
            health_flags_text(FAILED_OUTLIER_CHECK | FAILED_ACTIVE_HC),
            "/failed_active_hc/failed_outlier_check"
        );
        assert_eq!(
            health_flags_text(FAILED_OUTLIER_CHECK | FAILED_EDS_HEALTH),
            "/failed_outlier_check/failed_eds_health"
        );
        assert_eq!(
            health_flags_text(FAILED_ACTIVE_HC | FAILED_OUTLIER_CHECK | FAILED_EDS_HEALTH),
            "/failed_active_hc/failed_outlier_check/failed_eds_health"
        );
    }

    #[test]
    fn percent_g_format() {
        assert_eq!(format_g(-1.0), "-1");
        assert_eq!(format_g(52.0), "52");
        assert_eq!(format_g(66.666666666), "66.6667");
        assert_eq!(format_g(99.5), "99.5");
        assert_eq!(format_g(0.125), "0.125");
    }

    #[tokio::test(start_paused = true)]
    async fn outlier_numbers_in_text_and_json() {
        use crate::upstream::HostResult;
        use crate::upstream::outlier::{OutlierConfig, ThreadRoll};
        let store = crate::stats::Store::new();
        let d = Detector::new(
            OutlierConfig {
                success_rate_minimum_hosts: 5,
                success_rate_request_volume: 2,
                max_ejection_percent: 100,
                consecutive_5xx: 100,
                ..Default::default()
            },
            "backend",
            &store.cluster("backend"),
        );
        let hosts: Arc<Vec<Arc<Host>>> = Arc::new(
            (1..=5)
                .map(|i| host(&format!("127.0.0.{i}:80"), 0, 0))
                .collect(),
        );
        // Host 1: 1 of 2 succeeds (50%); the others 100%.
        for (i, h) in hosts.iter().enumerate() {
            d.put(h, HostResult::Status(200), || hosts.clone());
            let code = if i == 0 { 503 } else { 200 };
            d.put(h, HostResult::Status(code), || hosts.clone());
        }
        d.on_interval(&hosts, tokio::time::Instant::now(), &mut ThreadRoll);
        let mut out = String::new();
        write_cluster_text(&mut out, "backend", Some(&d), &Default::default(), &hosts);
        let lines: Vec<&str> = out.lines().collect();
        for want in [
            "backend::outlier::success_rate_average::90",
            "backend::outlier::success_rate_ejection_threshold::52",
            "backend::outlier::local_origin_success_rate_average::-1",
            "backend::outlier::local_origin_success_rate_ejection_threshold::-1",
            "backend::127.0.0.1:80::health_flags::/failed_outlier_check",
            "backend::127.0.0.2:80::success_rate::100",
            "backend::127.0.0.2:80::local_origin_success_rate::-1",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in\n{out}");
        }
        // Cluster-level lines sit between observability_name and added_via_api, as in Envoy.
        assert_eq!(lines[1], "backend::outlier::success_rate_average::90");
        let mut v = weir_xds_api::to_json(&Clusters {
            cluster_statuses: vec![cluster_status(
                "backend",
                Some(&d),
                &Default::default(),
                &hosts,
            )],
        });
        fill_host_defaults(&mut v);
        let c = &v["cluster_statuses"][0];
        assert_eq!(c["success_rate_ejection_threshold"], j!({"value": 52.0}));
        assert!(
            c.get("local_origin_success_rate_ejection_threshold")
                .is_none()
        );
        assert_eq!(c["host_statuses"][1]["success_rate"], j!({"value": 100.0}));
        assert_eq!(
            c["host_statuses"][0]["health_status"]["failed_outlier_check"],
            true
        );
        // The ejected host keeps the rate that got it ejected (Envoy sets it before ejecting).
        assert_eq!(c["host_statuses"][0]["success_rate"], j!({"value": 50.0}));
        assert!(
            c["host_statuses"][0]
                .get("local_origin_success_rate")
                .is_none()
        );
    }
}
