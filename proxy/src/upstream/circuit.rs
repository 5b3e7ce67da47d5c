//! Circuit breakers: Envoy's per-cluster, per-priority resource manager.
//!
//! Each cluster has two [`ResourceManager`]s (routing priority DEFAULT and HIGH), each with
//! four [`Resource`]s: connections, pending requests, requests and retries. A resource is a
//! cluster-wide atomic count (shared by all workers, as Envoy's are) with a maximum;
//! [`Resource::try_acquire`] either takes a slot, returning a guard that gives it back on
//! drop, or refuses (the caller counts the overflow stat and answers 503 with
//! `x-envoy-overloaded`).
//!
//! Stats (Envoy's names under `cluster.<name>.circuit_breakers.<default|high>.`): the
//! `cx_open`, `rq_pending_open`, `rq_open`, `rq_retry_open` gauges are 1 while the resource
//! is at its limit, and `remaining_cx`, `remaining_pending`, `remaining_rq`,
//! `remaining_retries` are kept when `track_remaining` is set.
//!
//! A `retry_budget` replaces `max_retries` with a limit that follows the load: at most
//! `budget_percent` of the active plus pending requests may be retries, but never fewer than
//! `min_retry_concurrency`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::Gauge;
use weir_xds_api::pb::envoy::config::cluster::v3::CircuitBreakers as PbCircuitBreakers;
use weir_xds_api::pb::envoy::config::core::v3::RoutingPriority;

use crate::config::{Errors, join};
use crate::stats::Scope;

/// Envoy's defaults.
const DEFAULT_MAX_CONNECTIONS: u64 = 1024;
const DEFAULT_MAX_PENDING: u64 = 1024;
const DEFAULT_MAX_REQUESTS: u64 = 1024;
const DEFAULT_MAX_RETRIES: u64 = 3;
const DEFAULT_BUDGET_PERCENT: f64 = 20.0;
const DEFAULT_MIN_RETRY_CONCURRENCY: u64 = 3;

/// The routing priority of a request (route `priority`), choosing the thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// `DEFAULT`.
    #[default]
    Default,
    /// `HIGH`.
    High,
}

/// `retry_budget`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    /// `budget_percent` (default 20 %).
    pub percent: f64,
    /// `min_retry_concurrency` (default 3).
    pub min_retry_concurrency: u64,
}

/// One priority's `Thresholds`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// `max_connections` (default 1024).
    pub max_connections: u64,
    /// `max_pending_requests` (default 1024).
    pub max_pending_requests: u64,
    /// `max_requests` (default 1024).
    pub max_requests: u64,
    /// `max_retries` (default 3); ignored when `retry_budget` is set.
    pub max_retries: u64,
    /// `retry_budget`.
    pub retry_budget: Option<RetryBudget>,
    /// `track_remaining`: keep the `remaining_*` gauges.
    pub track_remaining: bool,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending_requests: DEFAULT_MAX_PENDING,
            max_requests: DEFAULT_MAX_REQUESTS,
            max_retries: DEFAULT_MAX_RETRIES,
            retry_budget: None,
            track_remaining: false,
        }
    }
}

/// `Cluster.circuit_breakers`, translated.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CircuitBreakerConfig {
    /// Thresholds for `DEFAULT` priority requests.
    pub default: Thresholds,
    /// Thresholds for `HIGH` priority requests.
    pub high: Thresholds,
}

impl CircuitBreakerConfig {
    /// Translate `circuit_breakers` (`path` names it).
    pub fn translate(cb: Option<&PbCircuitBreakers>, path: &str, errs: &mut Errors) -> Self {
        let mut out = Self::default();
        let Some(cb) = cb else { return out };
        errs.reject_unsupported(cb, &["thresholds"], path);
        let mut seen = [false, false];
        for (i, t) in cb.thresholds.iter().enumerate() {
            let p = join(path, &format!("thresholds[{i}]"));
            errs.reject_unsupported(
                t,
                &[
                    "priority",
                    "max_connections",
                    "max_pending_requests",
                    "max_requests",
                    "max_retries",
                    "retry_budget",
                    "track_remaining",
                ],
                &p,
            );
            let (slot, idx) = match RoutingPriority::try_from(t.priority) {
                Ok(RoutingPriority::Default) => (&mut out.default, 0),
                Ok(RoutingPriority::High) => (&mut out.high, 1),
                Err(_) => {
                    errs.add(
                        join(&p, "priority"),
                        format!("unknown priority {}", t.priority),
                    );
                    continue;
                }
            };
            if std::mem::replace(&mut seen[idx], true) {
                errs.add(
                    join(&p, "priority"),
                    "thresholds for this priority are already set",
                );
            }
            let v = |w: &Option<weir_xds_api::pb::google::protobuf::UInt32Value>, d: u64| {
                w.as_ref().map_or(d, |w| u64::from(w.value))
            };
            slot.max_connections = v(&t.max_connections, DEFAULT_MAX_CONNECTIONS);
            slot.max_pending_requests = v(&t.max_pending_requests, DEFAULT_MAX_PENDING);
            slot.max_requests = v(&t.max_requests, DEFAULT_MAX_REQUESTS);
            slot.max_retries = v(&t.max_retries, DEFAULT_MAX_RETRIES);
            slot.track_remaining = t.track_remaining;
            if let Some(b) = &t.retry_budget {
                let bp = join(&p, "retry_budget");
                errs.reject_unsupported(b, &["budget_percent", "min_retry_concurrency"], &bp);
                let percent = b
                    .budget_percent
                    .as_ref()
                    .map_or(DEFAULT_BUDGET_PERCENT, |p| p.value);
                if !(0.0..=100.0).contains(&percent) || percent.is_nan() {
                    errs.add(
                        join(&bp, "budget_percent"),
                        format!("{percent} is not a percentage (0..=100)"),
                    );
                }
                slot.retry_budget = Some(RetryBudget {
                    percent: percent.clamp(0.0, 100.0),
                    min_retry_concurrency: v(
                        &b.min_retry_concurrency,
                        DEFAULT_MIN_RETRY_CONCURRENCY,
                    ),
                });
            }
        }
        out
    }
}

/// A counted resource with a limit.
#[derive(Debug)]
pub struct Resource {
    current: AtomicU64,
    max: u64,
    /// `*_open`: 1 while at the limit.
    open: Gauge,
    /// `remaining_*` (with `track_remaining`).
    remaining: Option<Gauge>,
    /// Serializes gauge updates: each update reads `current` under it, so the last one to run
    /// always publishes the latest count (two workers publishing their own snapshots could
    /// otherwise leave a stale value behind).
    publishing: std::sync::Mutex<()>,
}

impl Resource {
    fn new(max: u64, scope: &Scope, open: &str, remaining: Option<&str>) -> Self {
        let r = Self {
            current: AtomicU64::new(0),
            max,
            open: scope.gauge(open),
            remaining: remaining.map(|n| scope.gauge(n)),
            publishing: std::sync::Mutex::new(()),
        };
        r.publish(max);
        r
    }

    fn publish(&self, max: u64) {
        let _g = self.publishing.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current.load(Ordering::Acquire);
        self.open.set(if current >= max { 1.0 } else { 0.0 });
        if let Some(g) = &self.remaining {
            g.set(max.saturating_sub(current) as f64);
        }
    }

    /// Slots in use.
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::Relaxed)
    }

    /// The configured limit.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Whether one more slot is available now (without taking it).
    pub fn can_create(&self) -> bool {
        self.current() < self.max
    }

    /// Take a slot under `max` (or `self.max`); `None` when at the limit.
    fn try_acquire_under(self: &Arc<Self>, max: u64) -> Option<ResourceGuard> {
        let mut cur = self.current.load(Ordering::Relaxed);
        loop {
            if cur >= max {
                self.publish(max);
                return None;
            }
            match self.current.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.publish(max);
                    return Some(ResourceGuard {
                        resource: self.clone(),
                        max,
                    });
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Take a slot; `None` when the resource is at its limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ResourceGuard> {
        self.try_acquire_under(self.max)
    }

    /// Take a slot even past the limit (Envoy opens a connection to a host that has none even
    /// when the connection breaker is open, so pending requests cannot starve).
    pub fn acquire_forced(self: &Arc<Self>) -> ResourceGuard {
        self.current.fetch_add(1, Ordering::AcqRel);
        self.publish(self.max);
        ResourceGuard {
            resource: self.clone(),
            max: self.max,
        }
    }
}

/// A held slot of a [`Resource`]; released on drop.
#[derive(Debug)]
pub struct ResourceGuard {
    resource: Arc<Resource>,
    /// The limit in force when the slot was taken (dynamic for retry budgets).
    max: u64,
}

impl Drop for ResourceGuard {
    fn drop(&mut self) {
        self.resource.current.fetch_sub(1, Ordering::AcqRel);
        self.resource.publish(self.max);
    }
}

/// One priority's resources.
#[derive(Debug)]
pub struct ResourceManager {
    /// Upstream connections (HTTP and TCP).
    pub connections: Arc<Resource>,
    /// Requests waiting for a connection.
    pub pending: Arc<Resource>,
    /// Requests in flight.
    pub requests: Arc<Resource>,
    /// Retries in flight.
    pub retries: Arc<Resource>,
    budget: Option<RetryBudget>,
}

impl ResourceManager {
    fn new(t: &Thresholds, scope: &Scope, priority: &str) -> Self {
        let n = |s: &str| format!("circuit_breakers.{priority}.{s}");
        let rem = |s: &str| t.track_remaining.then(|| n(s));
        Self {
            connections: Arc::new(Resource::new(
                t.max_connections,
                scope,
                &n("cx_open"),
                rem("remaining_cx").as_deref(),
            )),
            pending: Arc::new(Resource::new(
                t.max_pending_requests,
                scope,
                &n("rq_pending_open"),
                rem("remaining_pending").as_deref(),
            )),
            requests: Arc::new(Resource::new(
                t.max_requests,
                scope,
                &n("rq_open"),
                rem("remaining_rq").as_deref(),
            )),
            retries: Arc::new(Resource::new(
                t.retry_budget
                    .map_or(t.max_retries, |b| b.min_retry_concurrency),
                scope,
                &n("rq_retry_open"),
                rem("remaining_retries").as_deref(),
            )),
            budget: t.retry_budget,
        }
    }

    /// The current retry limit: `max_retries`, or the budget's share of the active and
    /// pending requests (at least `min_retry_concurrency`).
    pub fn max_retries(&self) -> u64 {
        match self.budget {
            None => self.retries.max,
            Some(b) => retry_budget_limit(b, self.requests.current() + self.pending.current()),
        }
    }

    /// Take a retry slot; `None` on overflow.
    pub fn try_retry(&self) -> Option<ResourceGuard> {
        self.retries.try_acquire_under(self.max_retries())
    }
}

/// `max(min_retry_concurrency, budget_percent% of outstanding)`.
pub fn retry_budget_limit(b: RetryBudget, outstanding: u64) -> u64 {
    let share = (outstanding as f64 * b.percent / 100.0) as u64;
    share.max(b.min_retry_concurrency)
}

/// A cluster's circuit breakers.
#[derive(Debug)]
pub struct CircuitBreakers {
    default: ResourceManager,
    high: ResourceManager,
}

impl CircuitBreakers {
    /// Build the resources and their gauges in the cluster's scope.
    pub fn new(cfg: &CircuitBreakerConfig, scope: &Scope) -> Self {
        Self {
            default: ResourceManager::new(&cfg.default, scope, "default"),
            high: ResourceManager::new(&cfg.high, scope, "high"),
        }
    }

    /// The resources for a priority.
    pub fn get(&self, p: Priority) -> &ResourceManager {
        match p {
            Priority::Default => &self.default,
            Priority::High => &self.high,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Store;

    fn text_of(store: &Store) -> String {
        store
            .render_text()
            .into_iter()
            .map(|(k, v)| format!("{k}: {v}\n"))
            .collect()
    }

    fn tr(yaml: &str) -> (CircuitBreakerConfig, Vec<(String, String)>) {
        let pb: PbCircuitBreakers = weir_xds_api::from_yaml(yaml).expect("yaml");
        let mut errs = Errors::default();
        let c = CircuitBreakerConfig::translate(Some(&pb), "cb", &mut errs);
        (c, errs.0.into_iter().map(|e| (e.path, e.message)).collect())
    }

    #[test]
    fn defaults_are_envoys() {
        let (c, e) = tr("{}");
        assert!(e.is_empty());
        assert_eq!(c.default, Thresholds::default());
        assert_eq!(c.default.max_connections, 1024);
        assert_eq!(c.default.max_retries, 3);
        assert_eq!(c.high, Thresholds::default());
    }

    #[test]
    fn thresholds_per_priority() {
        let (c, e) = tr(
            "thresholds:\n- {max_connections: 1, max_pending_requests: 2, max_requests: 3, max_retries: 4, track_remaining: true}\n- {priority: HIGH, max_requests: 9, retry_budget: {budget_percent: {value: 50}, min_retry_concurrency: 1}}\n",
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(c.default.max_connections, 1);
        assert_eq!(c.default.max_pending_requests, 2);
        assert_eq!(c.default.max_requests, 3);
        assert_eq!(c.default.max_retries, 4);
        assert!(c.default.track_remaining);
        assert_eq!(c.high.max_requests, 9);
        assert_eq!(c.high.max_connections, 1024);
        assert_eq!(
            c.high.retry_budget,
            Some(RetryBudget {
                percent: 50.0,
                min_retry_concurrency: 1
            })
        );
    }

    #[test]
    fn bad_config_names_fields() {
        let (_, e) = tr(
            "thresholds:\n- {max_connections: 1}\n- {max_requests: 2}\n- {retry_budget: {budget_percent: {value: 150}}}\n",
        );
        let paths: Vec<_> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert!(paths.contains(&"cb.thresholds[1].priority"), "{e:?}");
        assert!(
            paths.contains(&"cb.thresholds[2].retry_budget.budget_percent"),
            "{e:?}"
        );
        let (_, e) = tr("thresholds:\n- {max_connection_pools: 3}\n");
        assert_eq!(e[0].0, "cb.thresholds[0].max_connection_pools", "{e:?}");
    }

    #[test]
    fn resource_counts_and_gauges() {
        let store = Store::new();
        let scope = store.cluster("c");
        let cfg = CircuitBreakerConfig {
            default: Thresholds {
                max_requests: 2,
                track_remaining: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let cb = CircuitBreakers::new(&cfg, &scope);
        let rm = cb.get(Priority::Default);
        let a = rm.requests.try_acquire().expect("1");
        let text = text_of(&store);
        assert!(
            text.contains("cluster.c.circuit_breakers.default.remaining_rq: 1"),
            "{text}"
        );
        let b = rm.requests.try_acquire().expect("2");
        assert!(rm.requests.try_acquire().is_none());
        let text = text_of(&store);
        assert!(
            text.contains("cluster.c.circuit_breakers.default.rq_open: 1"),
            "{text}"
        );
        assert!(
            text.contains("cluster.c.circuit_breakers.default.remaining_rq: 0"),
            "{text}"
        );
        drop(a);
        let text = text_of(&store);
        assert!(
            text.contains("cluster.c.circuit_breakers.default.rq_open: 0"),
            "{text}"
        );
        assert!(rm.requests.try_acquire().is_some());
        drop(b);
        assert_eq!(rm.requests.current(), 0);
        // The high priority is separate.
        assert!(cb.get(Priority::High).requests.can_create());
    }

    #[test]
    fn forced_acquire_goes_past_the_limit() {
        let store = Store::new();
        let cfg = CircuitBreakerConfig {
            default: Thresholds {
                max_connections: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let cb = CircuitBreakers::new(&cfg, &store.cluster("c"));
        let cx = &cb.get(Priority::Default).connections;
        let a = cx.try_acquire().expect("1");
        assert!(!cx.can_create());
        let b = cx.acquire_forced();
        assert_eq!(cx.current(), 2);
        drop((a, b));
        assert_eq!(cx.current(), 0);
    }

    #[test]
    fn retry_budget_follows_load() {
        let b = RetryBudget {
            percent: 20.0,
            min_retry_concurrency: 3,
        };
        assert_eq!(retry_budget_limit(b, 0), 3);
        assert_eq!(retry_budget_limit(b, 10), 3);
        assert_eq!(retry_budget_limit(b, 20), 4);
        assert_eq!(retry_budget_limit(b, 100), 20);
        let store = Store::new();
        let cfg = CircuitBreakerConfig {
            default: Thresholds {
                retry_budget: Some(RetryBudget {
                    percent: 50.0,
                    min_retry_concurrency: 1,
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let cb = CircuitBreakers::new(&cfg, &store.cluster("c"));
        let rm = cb.get(Priority::Default);
        let held: Vec<_> = (0..4)
            .map(|_| rm.requests.try_acquire().expect("rq"))
            .collect();
        assert_eq!(rm.max_retries(), 2);
        let r1 = rm.try_retry().expect("r1");
        let r2 = rm.try_retry().expect("r2");
        assert!(rm.try_retry().is_none());
        drop((r1, r2, held));
        assert_eq!(rm.max_retries(), 1);
    }
}
