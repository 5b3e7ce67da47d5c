//! Envoy-named stats on the `metrics` crate, exported by `metrics-exporter-prometheus`.
//!
//! Each [`Store`] owns its own Prometheus recorder (not the process-global one), so several
//! proxies can live in one process (tests) without sharing counters. Handles are resolved once
//! when config is translated and then incremented lock-free on the hot path (atomics for
//! counters/gauges, the exporter's lock-free buckets for histograms).
//!
//! Names follow Envoy's Prometheus output, i.e. Envoy's dotted stat with its tags extracted:
//! `cluster.foo.upstream_rq_total` is `envoy_cluster_upstream_rq_total{envoy_cluster_name="foo"}`,
//! `cluster.foo.upstream_rq_5xx` is `envoy_cluster_upstream_rq_xx{envoy_response_code_class="5",...}`.
//! The store remembers the dotted name of every series so `/stats` prints Envoy's text form.

use std::sync::Arc;

use dashmap::DashMap;
use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Envoy's default histogram buckets (milliseconds).
pub const ENVOY_BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// One proxy's stats.
pub struct Store {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Canonical Prometheus series key -> Envoy dotted name.
    dotted: DashMap<String, String>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("series", &self.dotted.len())
            .finish()
    }
}

static METADATA: Metadata<'static> =
    Metadata::new("weir", metrics::Level::INFO, Some("weir::stats"));

impl Store {
    /// A new, empty store.
    pub fn new() -> Arc<Self> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_time".into()), ENVOY_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_ms".into()), ENVOY_BUCKETS))
            .map(|b| b.build_recorder())
            // Only fails for an empty bucket list, which the constant is not.
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        Arc::new(Self {
            recorder,
            handle,
            dotted: DashMap::new(),
        })
    }

    /// A scope for `cluster.<name>.*`.
    pub fn cluster(self: &Arc<Self>, name: &str) -> Scope {
        self.scope(
            format!("cluster.{name}."),
            "envoy_cluster_",
            vec![("envoy_cluster_name", name.to_string())],
        )
    }

    /// A scope for `http.<stat_prefix>.*` (HTTP connection managers).
    pub fn http(self: &Arc<Self>, prefix: &str) -> Scope {
        self.scope(
            format!("http.{prefix}."),
            "envoy_http_",
            vec![("envoy_http_conn_manager_prefix", prefix.to_string())],
        )
    }

    /// A scope for `listener.<ip>_<port>.*`.
    pub fn listener(self: &Arc<Self>, addr: std::net::SocketAddr) -> Scope {
        let a = listener_stat_name(addr);
        self.scope(
            format!("listener.{a}."),
            "envoy_listener_",
            vec![("envoy_listener_address", a)],
        )
    }

    /// A scope for `tcp.<stat_prefix>.*` (tcp_proxy).
    pub fn tcp(self: &Arc<Self>, prefix: &str) -> Scope {
        self.scope(
            format!("tcp.{prefix}."),
            "envoy_tcp_",
            vec![("envoy_tcp_prefix", prefix.to_string())],
        )
    }

    /// A scope for a filter's own prefix: Envoy's dotted `dotted` (ending in `.`), exported as
    /// `<prom><stat>{<label>="<value>"}` (e.g. the local rate limit filter's
    /// `<stat_prefix>.http_local_rate_limit.` with its prefix extracted as a tag).
    pub fn tagged(
        self: &Arc<Self>,
        dotted: &str,
        prom: &str,
        label: &'static str,
        value: &str,
    ) -> Scope {
        self.scope(dotted.to_string(), prom, vec![(label, value.to_string())])
    }

    /// A scope with no tags: `server.*`, `cluster_manager.*`, `control_plane.*`, ...
    pub fn plain(self: &Arc<Self>, prefix: &str) -> Scope {
        self.scope(format!("{prefix}."), "", Vec::new())
            .with_prom_prefix(format!("envoy_{}_", prefix.replace('.', "_")))
    }

    fn scope(
        self: &Arc<Self>,
        dotted: String,
        prom: &str,
        labels: Vec<(&'static str, String)>,
    ) -> Scope {
        Scope {
            store: self.clone(),
            dotted,
            prom: prom.to_string(),
            labels,
        }
    }

    fn register(
        &self,
        prom_name: String,
        labels: Vec<(&'static str, String)>,
        dotted: String,
    ) -> Key {
        let series = series_key(&prom_name, labels.iter().map(|(k, v)| (*k, v.as_str())));
        self.dotted.insert(series, dotted);
        Key::from_parts(
            prom_name,
            labels
                .into_iter()
                .map(|(k, v)| Label::new(k, v))
                .collect::<Vec<_>>(),
        )
    }

    /// Prometheus text exposition (`/stats/prometheus`).
    pub fn render_prometheus(&self) -> String {
        self.handle.render()
    }

    /// Drain histogram buckets; call periodically so they do not grow between scrapes.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Envoy's `/stats` text form: `dotted.name: value`, sorted; histograms as
    /// `P50(..) P90(..) P99(..) count(..) sum(..)` estimated from their buckets.
    pub fn render_text(&self) -> Vec<(String, String)> {
        let text = self.render_prometheus();
        let mut out: Vec<(String, String)> = Vec::new();
        let mut hist: std::collections::BTreeMap<String, HistAcc> = Default::default();
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (name, labels) = parse_series(series);
            if let Some(base) = name.strip_suffix("_bucket") {
                let le = labels
                    .iter()
                    .find(|(k, _)| k == "le")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                let rest: Vec<_> = labels.iter().filter(|(k, _)| k != "le").cloned().collect();
                if let Some(d) = self.lookup(base, &rest) {
                    let acc = hist.entry(d).or_default();
                    acc.buckets.push((
                        le.parse().unwrap_or(f64::INFINITY),
                        value.parse().unwrap_or(0.0),
                    ));
                    continue;
                }
            }
            for (suffix, is_sum) in [("_sum", true), ("_count", false)] {
                if let Some(base) = name.strip_suffix(suffix)
                    && let Some(d) = self.lookup(base, &labels)
                {
                    let acc = hist.entry(d).or_default();
                    if is_sum {
                        acc.sum = value.parse().unwrap_or(0.0);
                    } else {
                        acc.count = value.parse().unwrap_or(0.0);
                    }
                }
            }
            if let Some(d) = self.lookup(&name, &labels) {
                out.push((d, value.to_string()));
            }
        }
        for (d, acc) in hist {
            out.push((d, acc.render()));
        }
        out.sort();
        out.dedup_by(|a, b| a.0 == b.0);
        out
    }

    /// One stat's `/stats` text value by its Envoy name (`cluster.c.upstream_rq_total`).
    pub fn text_stat(&self, name: &str) -> Option<String> {
        self.render_text()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// Every counter with its value: what a hot-restart parent hands its child.
    pub fn counter_samples(&self) -> Vec<CounterSample> {
        let text = self.render_prometheus();
        let mut counters = std::collections::HashSet::new();
        let mut out = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                if let Some(name) = rest.strip_suffix(" counter") {
                    counters.insert(name.to_string());
                }
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (name, labels) = parse_series(series);
            if !counters.contains(&name) {
                continue;
            }
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            out.push(CounterSample {
                dotted: self.lookup(&name, &labels),
                name,
                labels,
                value: value as u64,
            });
        }
        out
    }

    /// Add `delta` to the counter `sample` names (created when this store has no such series;
    /// its Envoy name is remembered for `/stats`).
    pub fn add_to_counter(&self, sample: &CounterSample, delta: u64) {
        if delta == 0 {
            return;
        }
        let series = series_key(
            &sample.name,
            sample.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        if let Some(d) = &sample.dotted {
            self.dotted.entry(series).or_insert_with(|| d.clone());
        }
        let key = Key::from_parts(
            sample.name.clone(),
            sample
                .labels
                .iter()
                .map(|(k, v)| Label::new(k.clone(), v.clone()))
                .collect::<Vec<_>>(),
        );
        self.recorder
            .register_counter(&key, &METADATA)
            .increment(delta);
    }

    /// The identity of a sample's series (for tracking what was merged).
    pub fn sample_key(sample: &CounterSample) -> String {
        series_key(
            &sample.name,
            sample.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }

    fn lookup(&self, name: &str, labels: &[(String, String)]) -> Option<String> {
        let key = series_key(name, labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.dotted.get(&key).map(|d| d.clone())
    }
}

/// One counter series and its value (the hot-restart stats exchange).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CounterSample {
    /// Envoy's dotted name, when the store knows it.
    pub dotted: Option<String>,
    /// Prometheus metric name.
    pub name: String,
    /// Prometheus labels.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: u64,
}

#[derive(Default)]
struct HistAcc {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl HistAcc {
    fn render(&self) -> String {
        let mut b = self.buckets.clone();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        let q = |p: f64| -> String {
            if self.count == 0.0 {
                return "nan".into();
            }
            let want = p * self.count;
            b.iter()
                .find(|(_, c)| *c >= want)
                .map(|(le, _)| format!("{le}"))
                .unwrap_or_else(|| "+Inf".into())
        };
        format!(
            "P50({}) P90({}) P99({}) count({}) sum({})",
            q(0.5),
            q(0.9),
            q(0.99),
            self.count,
            self.sum
        )
    }
}

fn series_key<'a>(name: &str, labels: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut l: Vec<_> = labels.collect();
    l.sort();
    let mut s = name.to_string();
    for (k, v) in l {
        s.push('|');
        s.push_str(k);
        s.push('=');
        s.push_str(v);
    }
    s
}

/// `name{a="b",c="d"}` -> (name, [(a,b),(c,d)]), undoing Prometheus label escaping.
fn parse_series(series: &str) -> (String, Vec<(String, String)>) {
    let Some((name, rest)) = series.split_once('{') else {
        return (series.to_string(), Vec::new());
    };
    let rest = rest.strip_suffix('}').unwrap_or(rest);
    let mut labels = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            break;
        }
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => val.push('\n'),
                    Some(o) => val.push(o),
                    None => break,
                },
                '"' => break,
                o => val.push(o),
            }
        }
        labels.push((key.trim_start_matches(',').to_string(), val));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    (name.to_string(), labels)
}

/// A stats namespace (`cluster.foo.`) that hands out metric handles.
#[derive(Clone)]
pub struct Scope {
    store: Arc<Store>,
    dotted: String,
    prom: String,
    labels: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scope({})", self.dotted)
    }
}

impl Scope {
    fn with_prom_prefix(mut self, p: String) -> Self {
        self.prom = p;
        self
    }

    fn key(&self, stat: &str, extra: &[(&'static str, String)], dotted: String) -> Key {
        let mut labels = self.labels.clone();
        labels.extend(extra.iter().cloned());
        // Nested Envoy stats (`circuit_breakers.default.rq_open`) become one Prometheus name.
        self.store.register(
            format!("{}{}", self.prom, stat.replace('.', "_")),
            labels,
            dotted,
        )
    }

    /// Counter `<scope>.<stat>`.
    pub fn counter(&self, stat: &str) -> Counter {
        let k = self.key(stat, &[], format!("{}{stat}", self.dotted));
        self.store.recorder.register_counter(&k, &METADATA)
    }

    /// Gauge `<scope>.<stat>`.
    pub fn gauge(&self, stat: &str) -> Gauge {
        let k = self.key(stat, &[], format!("{}{stat}", self.dotted));
        self.store.recorder.register_gauge(&k, &METADATA)
    }

    /// Histogram `<scope>.<stat>` (milliseconds, Envoy's buckets when the name ends in `_time`/`_ms`).
    pub fn histogram(&self, stat: &str) -> Histogram {
        let k = self.key(stat, &[], format!("{}{stat}", self.dotted));
        self.store.recorder.register_histogram(&k, &METADATA)
    }

    /// The five `<stat>_1xx` .. `<stat>_5xx` counters, exported as `<stat>_xx{envoy_response_code_class}`.
    pub fn class_counters(&self, stat: &str) -> [Counter; 5] {
        std::array::from_fn(|i| {
            let class = (i + 1).to_string();
            let k = self.key(
                &format!("{stat}_xx"),
                &[("envoy_response_code_class", class.clone())],
                format!("{}{stat}_{class}xx", self.dotted),
            );
            self.store.recorder.register_counter(&k, &METADATA)
        })
    }

    /// A sub-scope with a dotted infix and no extra tags, e.g. `circuit_breakers.default.`.
    pub fn child(&self, infix: &str) -> Scope {
        Scope {
            store: self.store.clone(),
            dotted: format!("{}{infix}.", self.dotted),
            prom: format!("{}{}_", self.prom, infix.replace('.', "_")),
            labels: self.labels.clone(),
        }
    }
}

/// Index of the `_Nxx` class counter for a status code (0 for 1xx ... 4 for 5xx).
pub fn class_index(status: u16) -> usize {
    (status / 100).clamp(1, 5) as usize - 1
}

/// The `<address>` of `listener.<address>.*`, as Envoy spells it: the address string with
/// `:` sanitized to `_` — `0.0.0.0_80`, `[__]_15001`, `[__1]_8080`.
pub fn listener_stat_name(addr: std::net::SocketAddr) -> String {
    match addr {
        std::net::SocketAddr::V4(a) => format!("{}_{}", a.ip(), a.port()),
        std::net::SocketAddr::V6(a) => format!("[{}]_{}", a.ip(), a.port()).replace(':', "_"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_addresses_are_named_as_envoy_names_them() {
        let n = |a: &str| listener_stat_name(a.parse().expect("addr"));
        assert_eq!(n("0.0.0.0:80"), "0.0.0.0_80");
        assert_eq!(n("10.1.2.3:15006"), "10.1.2.3_15006");
        assert_eq!(n("[::]:15001"), "[__]_15001");
        assert_eq!(n("[::1]:8080"), "[__1]_8080");
        assert_eq!(n("[fd77:3::2]:443"), "[fd77_3__2]_443");
    }

    #[test]
    fn envoy_names_both_ways() {
        let s = Store::new();
        let c = s.cluster("backend");
        c.counter("upstream_rq_total").increment(3);
        c.class_counters("upstream_rq")[class_index(503)].increment(1);
        c.gauge("upstream_cx_active").set(2.0);
        c.histogram("upstream_rq_time").record(7.0);
        s.plain("server").gauge("live").set(1.0);
        let prom = s.render_prometheus();
        assert!(
            prom.contains("envoy_cluster_upstream_rq_total{envoy_cluster_name=\"backend\"} 3"),
            "{prom}"
        );
        assert!(prom.contains("envoy_cluster_upstream_rq_xx{envoy_cluster_name=\"backend\",envoy_response_code_class=\"5\"} 1"), "{prom}");
        assert!(
            prom.contains(
                "envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=\"backend\",le=\"10\"} 1"
            ),
            "{prom}"
        );
        assert!(prom.contains("envoy_server_live 1"), "{prom}");
        let text: std::collections::HashMap<_, _> = s.render_text().into_iter().collect();
        assert_eq!(text["cluster.backend.upstream_rq_total"], "3");
        assert_eq!(text["cluster.backend.upstream_rq_5xx"], "1");
        assert_eq!(text["cluster.backend.upstream_cx_active"], "2");
        assert_eq!(text["server.live"], "1");
        assert!(text["cluster.backend.upstream_rq_time"].contains("count(1)"));
    }

    #[test]
    fn counters_move_between_stores() {
        let parent = Store::new();
        let child = Store::new();
        parent
            .cluster("b")
            .counter("upstream_rq_total")
            .increment(5);
        parent.cluster("b").class_counters("upstream_rq")[class_index(200)].increment(4);
        parent
            .http("ingress")
            .counter("downstream_rq_total")
            .increment(9);
        parent.cluster("b").gauge("upstream_cx_active").set(3.0);
        parent
            .cluster("b")
            .histogram("upstream_rq_time")
            .record(2.0);
        child.cluster("b").counter("upstream_rq_total").increment(2);
        let samples = parent.counter_samples();
        // Counters only: no gauge, no histogram series.
        assert!(
            samples.iter().all(|c| !c.name.contains("cx_active")),
            "{samples:?}"
        );
        assert!(
            samples.iter().all(|c| !c.name.contains("rq_time")),
            "{samples:?}"
        );
        let rq = samples
            .iter()
            .find(|c| c.dotted.as_deref() == Some("cluster.b.upstream_rq_total"))
            .expect("rq total");
        assert_eq!(rq.value, 5);
        for c in &samples {
            child.add_to_counter(c, c.value);
        }
        assert_eq!(
            child.text_stat("cluster.b.upstream_rq_total").as_deref(),
            Some("7")
        );
        assert_eq!(
            child.text_stat("cluster.b.upstream_rq_2xx").as_deref(),
            Some("4")
        );
        // A series only the parent had appears in the child under its Envoy name.
        assert_eq!(
            child
                .text_stat("http.ingress.downstream_rq_total")
                .as_deref(),
            Some("9")
        );
        // The child's own handle and the merged series are one counter.
        child.cluster("b").counter("upstream_rq_total").increment(1);
        assert_eq!(
            child.text_stat("cluster.b.upstream_rq_total").as_deref(),
            Some("8")
        );
        assert_eq!(
            Store::sample_key(rq),
            "envoy_cluster_upstream_rq_total|envoy_cluster_name=b"
        );
    }

    #[test]
    fn separate_stores_do_not_share() {
        let a = Store::new();
        let b = Store::new();
        a.cluster("x").counter("upstream_rq_total").increment(1);
        assert!(!b.render_prometheus().contains("upstream_rq_total"));
    }

    #[test]
    fn parse_series_unescapes() {
        let (n, l) = parse_series(r#"m{a="x\"y",b="z"}"#);
        assert_eq!(n, "m");
        assert_eq!(
            l,
            vec![("a".into(), "x\"y".into()), ("b".into(), "z".into())]
        );
    }
}
