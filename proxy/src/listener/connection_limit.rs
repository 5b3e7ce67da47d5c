//! `envoy.filters.network.connection_limit`: a cap on the concurrent connections of one
//! filter config.
//!
//! The filter sits before the terminal filter of a chain and runs when the connection is
//! set up (Envoy's `onNewConnection`, before the TLS handshake). The count is one atomic per
//! filter config, shared by every worker and every connection using it (no lock): a
//! connection takes a slot with a compare-and-swap ([`ConnectionLimit::try_acquire`]) and
//! the returned [`LimitGuard`] gives it back exactly once when the connection ends. Over the
//! limit the connection is closed without being read from: at once, or after `delay`
//! (Envoy's delayed close, which keeps a flood of reconnecting clients waiting).
//!
//! Stats (Envoy names): `connection_limit.<stat_prefix>.limited_connections` (counter) and
//! `connection_limit.<stat_prefix>.active_connections` (gauge).
//!
//! `runtime_enabled` is refused (weir has no runtime feature flags).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge};
use weir_xds_api::Any;
use weir_xds_api::pb::envoy::extensions::filters::network::connection_limit::v3::ConnectionLimit as Pb;

use crate::config::{Errors, TranslateCtx, join};

/// `typed_config` type URL of the filter.
pub const TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit";

/// `connection_limit.<stat_prefix>.*`.
#[derive(Debug, Clone)]
pub struct ConnectionLimitStats {
    /// `limited_connections`.
    pub limited_connections: Counter,
    /// `active_connections`.
    pub active_connections: Gauge,
}

/// A translated `envoy.filters.network.connection_limit`, shared by its connections.
#[derive(Debug)]
pub struct ConnectionLimit {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// `max_connections`.
    pub max_connections: u64,
    /// `delay`: how long a refused connection is held before it is closed.
    pub delay: Option<Duration>,
    active: AtomicU64,
    stats: ConnectionLimitStats,
}

/// What the filter decided for a new connection.
#[derive(Debug)]
pub enum Verdict {
    /// Within the limit: hold the guard for the connection's lifetime.
    Admit(LimitGuard),
    /// Over the limit (counted): close, after `delay` when set.
    Refuse(Option<Duration>),
}

impl ConnectionLimit {
    /// Translate the filter's `typed_config` at `path`.
    pub fn translate(
        any: &Any,
        path: &str,
        ctx: &TranslateCtx<'_>,
        errs: &mut Errors,
    ) -> Option<ConnectionLimit> {
        let c: Pb = match weir_xds_api::unpack(any) {
            Ok(c) => c,
            Err(e) => {
                errs.add(path, e.to_string());
                return None;
            }
        };
        let before = errs.0.len();
        errs.reject_unsupported(&c, &["stat_prefix", "max_connections", "delay"], path);
        if c.stat_prefix.is_empty() {
            errs.add(join(path, "stat_prefix"), "stat_prefix is required");
        }
        let max_connections = match c.max_connections.map(|v| v.value) {
            None => {
                errs.add(join(path, "max_connections"), "max_connections is required");
                0
            }
            Some(0) => {
                errs.add(join(path, "max_connections"), "must be at least 1");
                0
            }
            Some(v) => v,
        };
        let delay = c
            .delay
            .as_ref()
            .map(|d| crate::config::duration(d, &join(path, "delay"), errs))
            .filter(|d| !d.is_zero());
        if errs.0.len() != before {
            return None;
        }
        let scope = ctx.stats.tagged(
            &format!("connection_limit.{}.", c.stat_prefix),
            "envoy_connection_limit_",
            "envoy_connection_limit_prefix",
            &c.stat_prefix,
        );
        Some(ConnectionLimit {
            stats: ConnectionLimitStats {
                limited_connections: scope.counter("limited_connections"),
                active_connections: scope.gauge("active_connections"),
            },
            stat_prefix: c.stat_prefix,
            max_connections,
            delay,
            active: AtomicU64::new(0),
        })
    }

    /// Connections holding a slot now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Take a slot for a new connection, or count it as limited.
    pub fn try_acquire(self: &Arc<Self>) -> Verdict {
        let mut cur = self.active.load(Ordering::Relaxed);
        while cur < self.max_connections {
            match self.active.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.stats.active_connections.increment(1.0);
                    return Verdict::Admit(LimitGuard(self.clone()));
                }
                Err(now) => cur = now,
            }
        }
        self.stats.limited_connections.increment(1);
        Verdict::Refuse(self.delay)
    }
}

/// A connection's slot in a [`ConnectionLimit`]; released (once) when dropped.
#[derive(Debug)]
pub struct LimitGuard(Arc<ConnectionLimit>);

impl Drop for LimitGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        self.0.stats.active_connections.decrement(1.0);
    }
}

/// Run a chain's connection limit filters in order: the guards of all when every one admits,
/// else the `delay` of the first that refused (the slots taken so far are given back).
pub fn admit(limits: &[Arc<ConnectionLimit>]) -> Result<Vec<LimitGuard>, Option<Duration>> {
    let mut guards = Vec::with_capacity(limits.len());
    for l in limits {
        match l.try_acquire() {
            Verdict::Admit(g) => guards.push(g),
            Verdict::Refuse(delay) => return Err(delay),
        }
    }
    Ok(guards)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Store;

    fn translate(yaml: &str) -> (Option<ConnectionLimit>, Vec<String>, Arc<Store>) {
        let store = Store::new();
        let any: Any =
            weir_xds_api::from_yaml(&format!("\"@type\": {TYPE_URL}\n{yaml}")).expect("yaml");
        let clusters = Default::default();
        let ctx = TranslateCtx {
            clusters: &clusters,
            stats: &store,
            rds: None,
            rds_table: false,
        };
        let mut errs = Errors::default();
        let l = ConnectionLimit::translate(&any, "f", &ctx, &mut errs);
        (l, errs.0.into_iter().map(|e| e.path).collect(), store)
    }

    fn stat(store: &Store, name: &str) -> String {
        store.text_stat(name).unwrap_or_default()
    }

    #[test]
    fn translation_and_errors() {
        let (l, e, _) = translate("stat_prefix: edge\nmax_connections: 3\ndelay: 0.5s\n");
        assert!(e.is_empty(), "{e:?}");
        let l = l.expect("filter");
        assert_eq!(
            (l.stat_prefix.as_str(), l.max_connections, l.delay),
            ("edge", 3, Some(Duration::from_millis(500)))
        );
        let (_, e, _) = translate("stat_prefix: edge\nmax_connections: 3\ndelay: 0s\n");
        assert!(e.is_empty(), "a zero delay is no delay: {e:?}");

        let (l, e, _) = translate(
            "max_connections: 0\nruntime_enabled: {default_value: true, runtime_key: k}\n",
        );
        assert!(l.is_none());
        for want in ["f.stat_prefix", "f.max_connections", "f.runtime_enabled"] {
            assert!(e.contains(&want.to_string()), "{want} missing: {e:?}");
        }
        let (_, e, _) = translate("stat_prefix: x\n");
        assert_eq!(e, ["f.max_connections"]);
        let (_, e, _) = translate("stat_prefix: x\nmax_connections: 1\ndelay: -1s\n");
        assert_eq!(e, ["f.delay"]);
    }

    #[test]
    fn slots_are_shared_counted_and_released_once() {
        let (l, _, store) = translate("stat_prefix: edge\nmax_connections: 2\n");
        let l = Arc::new(l.expect("filter"));
        let a = l.try_acquire();
        let b = l.try_acquire();
        assert!(matches!(a, Verdict::Admit(_)) && matches!(b, Verdict::Admit(_)));
        assert!(matches!(l.try_acquire(), Verdict::Refuse(None)));
        assert_eq!(
            stat(&store, "connection_limit.edge.limited_connections"),
            "1"
        );
        assert_eq!(
            stat(&store, "connection_limit.edge.active_connections"),
            "2"
        );
        drop(a);
        assert_eq!(l.active(), 1);
        let c = l.try_acquire();
        assert!(
            matches!(c, Verdict::Admit(_)),
            "a released slot is free again"
        );
        drop((b, c));
        assert_eq!(l.active(), 0);
        assert_eq!(
            stat(&store, "connection_limit.edge.active_connections"),
            "0"
        );
    }

    #[test]
    fn concurrent_acquires_never_exceed_the_limit() {
        let (l, _, _) = translate("stat_prefix: edge\nmax_connections: 5\n");
        let l = Arc::new(l.expect("filter"));
        let peak = Arc::new(AtomicU64::new(0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                let (l, peak) = (l.clone(), peak.clone());
                s.spawn(move || {
                    for _ in 0..2000 {
                        if let Verdict::Admit(g) = l.try_acquire() {
                            peak.fetch_max(l.active(), Ordering::Relaxed);
                            drop(g);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 5);
        assert_eq!(l.active(), 0, "every slot released once");
    }

    #[test]
    fn admit_gives_back_slots_of_earlier_filters() {
        let (a, _, _) = translate("stat_prefix: a\nmax_connections: 5\n");
        let (b, _, _) = translate("stat_prefix: b\nmax_connections: 1\ndelay: 1s\n");
        let (a, b) = (Arc::new(a.expect("a")), Arc::new(b.expect("b")));
        let chain = [a.clone(), b.clone()];
        let held = admit(&chain).expect("first admitted");
        assert_eq!(admit(&chain).err(), Some(Some(Duration::from_secs(1))));
        assert_eq!((a.active(), b.active()), (1, 1));
        drop(held);
        assert_eq!((a.active(), b.active()), (0, 0));
    }
}
