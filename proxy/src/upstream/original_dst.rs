//! Cluster `type: ORIGINAL_DST` (`lb_policy: CLUSTER_PROVIDED`): the upstream host of a
//! connection or request is the address it was originally sent to, as Envoy's
//! `OriginalDstCluster`.
//!
//! # Which address ([`OriginalDstHosts::choose`])
//! 1. With `original_dst_lb_config.use_http_header`: the request header `http_header_name`
//!    (default `x-envoy-original-dst-host`), an `ip:port`. A header that does not parse
//!    counts `original_dst_host_invalid` and no host is chosen (503); a missing header falls
//!    through.
//! 2. The downstream connection's local address when a listener filter restored it
//!    (`original_dst` or a PROXY protocol header: `LbContext.original_dst`). A connection
//!    whose local address was not restored has no original destination: no host (Envoy's
//!    "no downstream connection or no original_dst").
//! 3. `upstream_port_override` replaces the port.
//!
//! # Hosts
//! Hosts are created on demand, one per address, and shared by every worker: a
//! lock-free map snapshot (`ArcSwap`) is read per pick; a miss takes a mutex to add the host
//! (rare: new destinations). Every pick marks the host used; a sweep every
//! `cleanup_interval` (default 5 s) removes the hosts not used since the previous sweep, as
//! Envoy's cleanup timer does. The sweep task holds only a `Weak` of the map and ends with
//! the cluster. Stats (`cluster.<name>.`): `membership_total` / `membership_healthy` (gauges),
//! `membership_change` and `original_dst_host_invalid` (counters).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics::{Counter, Gauge};

use super::{Host, LbContext};

/// Envoy's default `cleanup_interval`.
pub const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(5);
/// Envoy's default override header.
pub const DEFAULT_HEADER: &str = "x-envoy-original-dst-host";

/// The translated `original_dst_lb_config` + `cleanup_interval`.
#[derive(Debug, Clone, PartialEq)]
pub struct OriginalDstConfig {
    /// `use_http_header`: the header name to read (lowercase), when set.
    pub http_header: Option<http::HeaderName>,
    /// `upstream_port_override`.
    pub port_override: Option<u16>,
    /// `cleanup_interval`.
    pub cleanup_interval: Duration,
}

#[derive(Debug)]
struct Entry {
    host: Arc<Host>,
    used: AtomicBool,
}

type Map = HashMap<SocketAddr, Arc<Entry>>;

#[derive(Debug)]
struct Stats {
    total: Gauge,
    healthy: Gauge,
    change: Counter,
    invalid: Counter,
}

/// The on-demand hosts of one ORIGINAL_DST cluster.
#[derive(Debug)]
pub struct OriginalDstHosts {
    cfg: OriginalDstConfig,
    map: Arc<ArcSwap<Map>>,
    /// Serializes writers (add, sweep); readers never take it.
    write: Arc<Mutex<()>>,
    /// Whether the sweep task runs (started with the first host, on its runtime).
    sweeping: AtomicBool,
    stats: Arc<Stats>,
}

impl OriginalDstHosts {
    /// Empty, with stats under the cluster's scope.
    pub fn new(cfg: OriginalDstConfig, scope: &crate::stats::Scope) -> Self {
        Self {
            cfg,
            map: Arc::new(ArcSwap::from_pointee(Map::new())),
            write: Arc::new(Mutex::new(())),
            sweeping: AtomicBool::new(false),
            stats: Arc::new(Stats {
                total: scope.gauge("membership_total"),
                healthy: scope.gauge("membership_healthy"),
                change: scope.counter("membership_change"),
                invalid: scope.counter("original_dst_host_invalid"),
            }),
        }
    }

    /// The destination for this pick (see the module docs), port override applied.
    pub fn destination(&self, ctx: &LbContext<'_>) -> Option<SocketAddr> {
        let mut dst = None;
        if let (Some(name), Some(headers)) = (&self.cfg.http_header, ctx.headers)
            && let Some(v) = headers.get(name)
        {
            match v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse::<SocketAddr>().ok())
            {
                Some(a) => dst = Some(a),
                None => {
                    self.stats.invalid.increment(1);
                    tracing::debug!(header = %name, "original_dst: header value is not ip:port");
                    return None;
                }
            }
        }
        let mut dst = dst.or(ctx.original_dst)?;
        if let Some(p) = self.cfg.port_override {
            dst.set_port(p);
        }
        Some(dst)
    }

    /// The host for this pick, created when new.
    pub fn choose(&self, ctx: &LbContext<'_>) -> Option<Arc<Host>> {
        let dst = self.destination(ctx)?;
        if let Some(e) = self.map.load().get(&dst) {
            e.used.store(true, Ordering::Relaxed);
            return Some(e.host.clone());
        }
        Some(self.add(dst))
    }

    /// Hosts currently known (admin, tests).
    pub fn hosts(&self) -> Vec<Arc<Host>> {
        self.map.load().values().map(|e| e.host.clone()).collect()
    }

    fn add(&self, dst: SocketAddr) -> Arc<Host> {
        let _w = self
            .write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Another worker may have added it meanwhile.
        let cur = self.map.load_full();
        if let Some(e) = cur.get(&dst) {
            e.used.store(true, Ordering::Relaxed);
            return e.host.clone();
        }
        let host = Arc::new(Host::new(dst, None, 1, 0, 0));
        let mut next = Map::clone(&cur);
        next.insert(
            dst,
            Arc::new(Entry {
                host: host.clone(),
                used: AtomicBool::new(true),
            }),
        );
        let n = next.len();
        self.map.store(Arc::new(next));
        self.stats.total.set(n as f64);
        self.stats.healthy.set(n as f64);
        self.stats.change.increment(1);
        tracing::debug!(%dst, "original_dst: host added");
        self.start_sweep();
        host
    }

    fn start_sweep(&self) {
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.sweeping.store(false, Ordering::Release);
            return;
        };
        let map = Arc::downgrade(&self.map);
        let write = Arc::downgrade(&self.write);
        let stats = self.stats.clone();
        let every = self.cfg.cleanup_interval;
        rt.spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !sweep(&map, &write, &stats) {
                    return;
                }
            }
        });
    }

    /// One cleanup pass now (tests).
    #[cfg(test)]
    fn sweep_now(&self) {
        sweep(
            &Arc::downgrade(&self.map),
            &Arc::downgrade(&self.write),
            &self.stats,
        );
    }
}

/// Remove the hosts not used since the last sweep, clear the marks; `false` when the cluster
/// is gone.
fn sweep(map: &Weak<ArcSwap<Map>>, write: &Weak<Mutex<()>>, stats: &Stats) -> bool {
    let (Some(map), Some(write)) = (map.upgrade(), write.upgrade()) else {
        return false;
    };
    let _w = write
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cur = map.load_full();
    let keep: Map = cur
        .iter()
        .filter(|(_, e)| e.used.swap(false, Ordering::Relaxed))
        .map(|(k, e)| (*k, e.clone()))
        .collect();
    if keep.len() != cur.len() {
        tracing::debug!(
            removed = cur.len() - keep.len(),
            "original_dst: idle hosts removed"
        );
        stats.change.increment(1);
        stats.total.set(keep.len() as f64);
        stats.healthy.set(keep.len() as f64);
        map.store(Arc::new(keep));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Store;

    fn hosts(header: Option<&str>, port: Option<u16>) -> (Arc<Store>, OriginalDstHosts) {
        let store = Store::new();
        let h = OriginalDstHosts::new(
            OriginalDstConfig {
                http_header: header
                    .map(|h| http::HeaderName::from_bytes(h.as_bytes()).expect("name")),
                port_override: port,
                cleanup_interval: Duration::from_secs(5),
            },
            &store.cluster("od"),
        );
        (store, h)
    }

    fn stat(store: &Store, name: &str) -> String {
        store.text_stat(name).unwrap_or_default()
    }

    #[test]
    fn connection_destination_port_override_and_reuse() {
        let (store, h) = hosts(None, None);
        let dst: SocketAddr = "10.0.0.1:8080".parse().expect("addr");
        let ctx = LbContext {
            original_dst: Some(dst),
            ..Default::default()
        };
        let a = h.choose(&ctx).expect("host");
        assert_eq!(a.address, dst);
        let b = h.choose(&ctx).expect("host");
        assert!(Arc::ptr_eq(&a, &b), "one host per address");
        assert_eq!(stat(&store, "cluster.od.membership_total"), "1");
        // Not restored: no host.
        assert!(h.choose(&LbContext::default()).is_none());

        let (_, h) = hosts(None, Some(9000));
        assert_eq!(
            h.choose(&ctx).expect("host").address,
            "10.0.0.1:9000".parse().expect("addr")
        );
    }

    #[test]
    fn header_wins_invalid_header_counts_missing_falls_through() {
        let (store, h) = hosts(Some(DEFAULT_HEADER), None);
        let conn: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        let mut hm = http::HeaderMap::new();
        hm.insert(DEFAULT_HEADER, "[::1]:443".parse().expect("value"));
        let ctx = |hm| LbContext {
            original_dst: Some(conn),
            headers: Some(hm),
            ..Default::default()
        };
        assert_eq!(
            h.choose(&ctx(&hm)).expect("host").address,
            "[::1]:443".parse().expect("addr")
        );
        let mut bad = http::HeaderMap::new();
        bad.insert(DEFAULT_HEADER, "example.com:80".parse().expect("value"));
        assert!(h.choose(&ctx(&bad)).is_none());
        assert_eq!(stat(&store, "cluster.od.original_dst_host_invalid"), "1");
        let empty = http::HeaderMap::new();
        assert_eq!(h.choose(&ctx(&empty)).expect("host").address, conn);
    }

    #[test]
    fn sweep_removes_hosts_idle_for_a_whole_interval() {
        let (store, h) = hosts(None, None);
        let a: SocketAddr = "10.0.0.1:1".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:1".parse().expect("addr");
        let pick = |d| {
            h.choose(&LbContext {
                original_dst: Some(d),
                ..Default::default()
            })
        };
        pick(a);
        pick(b);
        assert_eq!(h.hosts().len(), 2);
        // Both used since creation: kept, marks cleared.
        h.sweep_now();
        assert_eq!(h.hosts().len(), 2);
        pick(a);
        h.sweep_now();
        let left: Vec<_> = h.hosts().iter().map(|h| h.address).collect();
        assert_eq!(left, vec![a]);
        assert_eq!(stat(&store, "cluster.od.membership_total"), "1");
        h.sweep_now();
        assert!(h.hosts().is_empty());
        assert_eq!(stat(&store, "cluster.od.membership_total"), "0");
        // A new pick re-creates it.
        assert_eq!(pick(a).expect("host").address, a);
    }

    #[tokio::test(start_paused = true)]
    async fn sweep_task_runs_every_interval_and_ends_with_the_cluster() {
        let (_store, h) = hosts(None, None);
        let a: SocketAddr = "10.0.0.1:1".parse().expect("addr");
        h.choose(&LbContext {
            original_dst: Some(a),
            ..Default::default()
        });
        // First sweep clears the mark, second removes the host.
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(h.hosts().is_empty());
        let weak = Arc::downgrade(&h.map);
        drop(h);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(weak.upgrade().is_none());
    }
}
