//! weir-cp's Prometheus metrics, rendered in the text exposition format at `/metrics` on the
//! API address.
//!
//! A small fixed set of atomics rather than a global recorder: several servers can run in one
//! process (tests) without sharing counters, and every update is a relaxed atomic add.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `weir_cp_connected_proxies` | gauge | `protocol` (`sotw`, `delta`) |
//! | `weir_cp_xds_pushes_total` | counter | `type` (`lds`, `rds`, `cds`, `eds`, `sds`) |
//! | `weir_cp_xds_resources_sent_total` | counter | `type` |
//! | `weir_cp_xds_removals_sent_total` | counter | `type` (delta `removed_resources`) |
//! | `weir_cp_xds_acks_total` | counter | `type` |
//! | `weir_cp_xds_nacks_total` | counter | `type` |
//! | `weir_cp_xds_stale_requests_total` | counter | `type` (stale nonce, ignored) |
//! | `weir_cp_xds_push_latency_seconds` | histogram | — (config change to response sent) |
//! | `weir_cp_config_applies_total` | counter | — |
//! | `weir_cp_config_rejected_total` | counter | — |
//! | `weir_cp_config_version` | gauge | — (latest applied version) |
//!
//! The KV store's metrics (`weir_cp_kv_…`) are listed in [`crate::kv::metrics`].
//! Subsystems with their own metrics (the service registry, `weir_cp_registry_*`) add a
//! [`Collector`] with [`Metrics::add_collector`]; its output follows the families above.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::resource::{PUSH_ORDER, short_name};

/// Histogram bucket upper bounds, seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Default)]
struct PerType {
    pushes: AtomicU64,
    resources: AtomicU64,
    removals: AtomicU64,
    acks: AtomicU64,
    nacks: AtomicU64,
    stale: AtomicU64,
}

/// A Prometheus histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: BUCKETS.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b)
            && let Some(b) = self.buckets.get(i)
        {
            b.fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Append the family `name` (`# HELP`, `# TYPE`, buckets, sum, count) to `out`.
    pub fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// A subsystem rendering its own metric families into the exposition.
pub trait Collector: Send + Sync + std::fmt::Debug + 'static {
    /// Append complete families (`# HELP`, `# TYPE`, samples) to `out`.
    fn render(&self, out: &mut String);
}

/// Every weir-cp metric; see the module docs.
#[derive(Debug, Default)]
pub struct Metrics {
    collectors: std::sync::Mutex<Vec<std::sync::Arc<dyn Collector>>>,
    connected_sotw: AtomicI64,
    connected_delta: AtomicI64,
    types: [PerType; 5],
    /// Time from a config change to a response carrying it being handed to the stream.
    pub push_latency: Histogram,
    config_applies: AtomicU64,
    config_rejected: AtomicU64,
    config_version: AtomicU64,
    /// The KV store's metrics.
    pub kv: crate::kv::metrics::KvMetrics,
}

/// The xDS protocol variant of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// State of the world.
    Sotw,
    /// Incremental.
    Delta,
}

impl Protocol {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Sotw => "sotw",
            Protocol::Delta => "delta",
        }
    }
}

impl Metrics {
    fn per_type(&self, type_url: &str) -> Option<&PerType> {
        PUSH_ORDER
            .iter()
            .position(|t| *t == type_url)
            .and_then(|i| self.types.get(i))
    }

    fn connected(&self, p: Protocol) -> &AtomicI64 {
        match p {
            Protocol::Sotw => &self.connected_sotw,
            Protocol::Delta => &self.connected_delta,
        }
    }

    /// A stream opened (its node is known).
    pub fn stream_opened(&self, p: Protocol) {
        self.connected(p).fetch_add(1, Relaxed);
    }

    /// A stream closed.
    pub fn stream_closed(&self, p: Protocol) {
        self.connected(p).fetch_sub(1, Relaxed);
    }

    /// Connected streams of protocol `p`.
    pub fn connected_count(&self, p: Protocol) -> i64 {
        self.connected(p).load(Relaxed)
    }

    /// A response of `type_url` with `resources` resources and `removals` removals was sent.
    pub fn pushed(&self, type_url: &str, resources: usize, removals: usize) {
        if let Some(t) = self.per_type(type_url) {
            t.pushes.fetch_add(1, Relaxed);
            t.resources.fetch_add(resources as u64, Relaxed);
            t.removals.fetch_add(removals as u64, Relaxed);
        }
    }

    /// An ACK arrived.
    pub fn ack(&self, type_url: &str) {
        if let Some(t) = self.per_type(type_url) {
            t.acks.fetch_add(1, Relaxed);
        }
    }

    /// A NACK arrived.
    pub fn nack(&self, type_url: &str) {
        if let Some(t) = self.per_type(type_url) {
            t.nacks.fetch_add(1, Relaxed);
        }
    }

    /// A request with a stale nonce was ignored.
    pub fn stale(&self, type_url: &str) {
        if let Some(t) = self.per_type(type_url) {
            t.stale.fetch_add(1, Relaxed);
        }
    }

    /// (pushes, acks, nacks) so far for `type_url`.
    pub fn type_counts(&self, type_url: &str) -> (u64, u64, u64) {
        self.per_type(type_url)
            .map(|t| {
                (
                    t.pushes.load(Relaxed),
                    t.acks.load(Relaxed),
                    t.nacks.load(Relaxed),
                )
            })
            .unwrap_or_default()
    }

    /// A config version was applied.
    pub fn config_applied(&self, version: u64) {
        self.config_applies.fetch_add(1, Relaxed);
        self.config_version.fetch_max(version, Relaxed);
    }

    /// A config was refused.
    pub fn config_rejected(&self) {
        self.config_rejected.fetch_add(1, Relaxed);
    }

    /// Set the current version at startup.
    pub fn set_config_version(&self, version: u64) {
        self.config_version.store(version, Relaxed);
    }

    /// Render `c`'s families after the built-in ones from now on.
    pub fn add_collector(&self, c: std::sync::Arc<dyn Collector>) {
        self.collectors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(c);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP weir_cp_connected_proxies xDS streams currently open, by protocol."
        );
        let _ = writeln!(out, "# TYPE weir_cp_connected_proxies gauge");
        for p in [Protocol::Sotw, Protocol::Delta] {
            let _ = writeln!(
                out,
                "weir_cp_connected_proxies{{protocol=\"{}\"}} {}",
                p.as_str(),
                self.connected_count(p)
            );
        }
        type Get = fn(&PerType) -> &AtomicU64;
        let families: [(&str, &str, Get); 6] = [
            ("weir_cp_xds_pushes_total", "xDS responses sent.", |t| {
                &t.pushes
            }),
            (
                "weir_cp_xds_resources_sent_total",
                "Resources sent in xDS responses.",
                |t| &t.resources,
            ),
            (
                "weir_cp_xds_removals_sent_total",
                "Resource removals sent in delta xDS responses.",
                |t| &t.removals,
            ),
            (
                "weir_cp_xds_acks_total",
                "xDS responses acknowledged (ACK).",
                |t| &t.acks,
            ),
            (
                "weir_cp_xds_nacks_total",
                "xDS responses rejected (NACK).",
                |t| &t.nacks,
            ),
            (
                "weir_cp_xds_stale_requests_total",
                "xDS requests ignored for carrying a stale nonce.",
                |t| &t.stale,
            ),
        ];
        for (name, help, get) in families {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (url, t) in PUSH_ORDER.iter().zip(&self.types) {
                let _ = writeln!(
                    out,
                    "{name}{{type=\"{}\"}} {}",
                    short_name(url),
                    get(t).load(Relaxed)
                );
            }
        }
        self.push_latency.render(
            "weir_cp_xds_push_latency_seconds",
            "Time from a config change to the xDS response carrying it being sent.",
            &mut out,
        );
        for (name, help, kind, v) in [
            (
                "weir_cp_config_applies_total",
                "Config versions applied.",
                "counter",
                self.config_applies.load(Relaxed),
            ),
            (
                "weir_cp_config_rejected_total",
                "Config applies refused by validation.",
                "counter",
                self.config_rejected.load(Relaxed),
            ),
            (
                "weir_cp_config_version",
                "Latest applied config version.",
                "gauge",
                self.config_version.load(Relaxed),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {v}");
        }
        self.kv.render(&mut out);
        let collectors = self
            .collectors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for c in collectors {
            c.render(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_xds_api::type_urls;

    #[test]
    fn renders_counts_and_histogram() {
        let m = Metrics::default();
        m.stream_opened(Protocol::Sotw);
        m.stream_opened(Protocol::Delta);
        m.stream_closed(Protocol::Delta);
        m.pushed(type_urls::CLUSTER, 3, 0);
        m.ack(type_urls::CLUSTER);
        m.nack(type_urls::LISTENER);
        m.pushed("type.googleapis.com/unknown", 1, 1);
        m.push_latency.observe(Duration::from_millis(3));
        m.push_latency.observe(Duration::from_secs(100));
        m.config_applied(7);
        let text = m.render();
        for line in [
            "weir_cp_connected_proxies{protocol=\"sotw\"} 1",
            "weir_cp_connected_proxies{protocol=\"delta\"} 0",
            "weir_cp_xds_pushes_total{type=\"cds\"} 1",
            "weir_cp_xds_resources_sent_total{type=\"cds\"} 3",
            "weir_cp_xds_acks_total{type=\"cds\"} 1",
            "weir_cp_xds_nacks_total{type=\"lds\"} 1",
            "weir_cp_xds_nacks_total{type=\"cds\"} 0",
            "weir_cp_xds_push_latency_seconds_bucket{le=\"0.0025\"} 0",
            "weir_cp_xds_push_latency_seconds_bucket{le=\"0.005\"} 1",
            "weir_cp_xds_push_latency_seconds_bucket{le=\"10\"} 1",
            "weir_cp_xds_push_latency_seconds_bucket{le=\"+Inf\"} 2",
            "weir_cp_xds_push_latency_seconds_count 2",
            "weir_cp_config_version 7",
            "weir_cp_config_applies_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert_eq!(m.type_counts(type_urls::CLUSTER), (1, 1, 0));
    }
}
