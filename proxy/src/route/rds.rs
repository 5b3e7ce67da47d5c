//! RDS: route tables that arrive after the connection manager that uses them.
//!
//! An HTTP connection manager with `rds` holds a [`RouteHandle`] to a shared [`RouteSlot`]
//! (one per `route_config_name`, from the [`RdsRegistry`]). The xDS client stores each new
//! `RouteConfiguration` into the slot; every request loads the slot's current table (one
//! `ArcSwap` load), so connections opened before a route change see the new routes on their
//! next request. A slot that never received a table has an empty one (every request 404 NR,
//! as Envoy's empty route config after `initial_fetch_timeout`).
//!
//! The registry hands out slots by name and keeps only `Weak`s: when the last listener (and
//! its last draining connection) using a route config is gone, the slot is dropped, the
//! registry's change counter ticks, and the xDS client unsubscribes from that name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use metrics::{Counter, Gauge};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::RouteTable;
use crate::config::source::ConfigSource;
use crate::stats::Store;

/// The route table of one connection manager.
#[derive(Debug, Clone)]
pub struct RouteHandle(Arc<RouteSlot>);

impl RouteHandle {
    /// A fixed table (inline `route_config`).
    pub fn fixed(table: RouteTable) -> Self {
        let slot = RouteSlot::new(table.name.clone(), None, None);
        slot.table.store(Arc::new(table));
        slot.ready.cancel();
        Self(Arc::new(slot))
    }

    /// The current table (one atomic load; keep the guard only for the request's routing).
    pub fn load(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.0.table.load()
    }

    /// The slot behind this handle.
    pub fn slot(&self) -> &Arc<RouteSlot> {
        &self.0
    }
}

/// Envoy's per-route-config RDS stats (`http.<stat_prefix>.rds.<route_config_name>.*`).
#[derive(Debug, Clone)]
pub struct RdsStats {
    /// `update_attempt`.
    pub update_attempt: Counter,
    /// `update_success`.
    pub update_success: Counter,
    /// `update_rejected`.
    pub update_rejected: Counter,
    /// `update_empty`.
    pub update_empty: Counter,
    /// `config_reload`.
    pub config_reload: Counter,
    /// `version`: a hash of the accepted version_info.
    pub version: Gauge,
}

impl RdsStats {
    fn new(store: &Arc<Store>, stat_prefix: &str, name: &str) -> Self {
        let s = store.tagged(
            &format!("http.{stat_prefix}.rds.{name}."),
            "envoy_http_rds_",
            "envoy_rds_route_config",
            name,
        );
        Self {
            update_attempt: s.counter("update_attempt"),
            update_success: s.counter("update_success"),
            update_rejected: s.counter("update_rejected"),
            update_empty: s.counter("update_empty"),
            config_reload: s.counter("config_reload"),
            version: s.gauge("version"),
        }
    }
}

/// One `route_config_name`'s current table.
#[derive(Debug)]
pub struct RouteSlot {
    /// `route_config_name`.
    pub name: String,
    /// Where its `RouteConfiguration` comes from (`None` for inline tables).
    pub source: Option<ConfigSource>,
    table: ArcSwap<RouteTable>,
    /// Cancelled once the first table arrived (or the wait for it was given up).
    ready: CancellationToken,
    /// Stats per connection manager stat prefix using this slot.
    stats: Mutex<Vec<(String, RdsStats)>>,
    /// Ticked when the slot is dropped (the registry's change counter).
    on_drop: Option<Arc<watch::Sender<u64>>>,
}

impl RouteSlot {
    fn new(
        name: String,
        source: Option<ConfigSource>,
        on_drop: Option<Arc<watch::Sender<u64>>>,
    ) -> Self {
        Self {
            name,
            source,
            table: ArcSwap::from_pointee(RouteTable::default()),
            ready: CancellationToken::new(),
            stats: Mutex::new(Vec::new()),
            on_drop,
        }
    }

    /// Install a new table (requests from now on route with it) and mark the slot ready.
    pub fn store(&self, table: RouteTable) {
        self.table.store(Arc::new(table));
        self.ready.cancel();
    }

    /// The current table.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Whether a table arrived (or the wait was given up).
    pub fn is_ready(&self) -> bool {
        self.ready.is_cancelled()
    }

    /// Resolves once the slot is ready.
    pub async fn ready(&self) {
        self.ready.cancelled().await;
    }

    /// Stop waiting for the first table (`initial_fetch_timeout`): the empty table serves.
    pub fn force_ready(&self) {
        self.ready.cancel();
    }

    /// Run `f` on the stats of every connection manager using this slot.
    pub fn for_each_stats(&self, mut f: impl FnMut(&RdsStats)) {
        let s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        for (_, st) in s.iter() {
            f(st);
        }
    }

    fn add_stats(&self, store: &Arc<Store>, stat_prefix: &str) {
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        if !s.iter().any(|(p, _)| p == stat_prefix) {
            s.push((
                stat_prefix.to_string(),
                RdsStats::new(store, stat_prefix, &self.name),
            ));
        }
    }
}

impl Drop for RouteSlot {
    fn drop(&mut self) {
        if let Some(tx) = &self.on_drop {
            tx.send_modify(|n| *n += 1);
        }
    }
}

/// Route slots by `route_config_name`.
#[derive(Debug)]
pub struct RdsRegistry {
    slots: Mutex<HashMap<String, Weak<RouteSlot>>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Default for RdsRegistry {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            changed: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl RdsRegistry {
    /// The slot for `name` (created, not ready, when no live one exists), with RDS stats
    /// registered for `stat_prefix`. The first source a name is requested with is kept.
    pub fn handle(
        &self,
        name: &str,
        source: &ConfigSource,
        stat_prefix: &str,
        store: &Arc<Store>,
    ) -> RouteHandle {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = match slots.get(name).and_then(Weak::upgrade) {
            Some(s) => s,
            None => {
                let s = Arc::new(RouteSlot::new(
                    name.to_string(),
                    Some(source.clone()),
                    Some(self.changed.clone()),
                ));
                slots.insert(name.to_string(), Arc::downgrade(&s));
                self.changed.send_modify(|n| *n += 1);
                s
            }
        };
        slot.add_stats(store, stat_prefix);
        RouteHandle(slot)
    }

    /// The live slot for `name`.
    pub fn get(&self, name: &str) -> Option<Arc<RouteSlot>> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .and_then(Weak::upgrade)
    }

    /// Every live slot (dead entries are pruned), sorted by name.
    pub fn live(&self) -> Vec<Arc<RouteSlot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|_, w| w.strong_count() > 0);
        let mut v: Vec<_> = slots.values().filter_map(Weak::upgrade).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Ticks whenever a slot is created or dropped.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_shared_and_dropped() {
        let reg = RdsRegistry::default();
        let store = Store::new();
        let mut rx = reg.subscribe();
        let a = reg.handle("r", &ConfigSource::ads(), "p1", &store);
        let b = reg.handle("r", &ConfigSource::ads(), "p2", &store);
        assert!(Arc::ptr_eq(a.slot(), b.slot()));
        assert!(rx.has_changed().expect("open"));
        rx.mark_unchanged();
        assert!(!a.slot().is_ready());
        assert!(a.load().name.is_empty());
        a.slot().store(RouteTable {
            name: "r".into(),
            ..Default::default()
        });
        assert!(b.slot().is_ready());
        assert_eq!(b.load().name, "r");
        let mut n = 0;
        a.slot().for_each_stats(|_| n += 1);
        assert_eq!(n, 2);
        assert_eq!(reg.live().len(), 1);
        drop(a);
        drop(b);
        assert!(rx.has_changed().expect("open"));
        assert!(reg.live().is_empty());
        assert!(reg.get("r").is_none());
    }
}
