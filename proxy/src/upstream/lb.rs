//! Host sets and the load balancer.
//!
//! A cluster's hosts live in an immutable [`HostSet`] swapped atomically (arc-swap) when DNS
//! changes them. Health is *not* part of the set: [`Host::health`] atomics are read at pick
//! time, so a health checker flips a bit without rebuilding anything.
//!
//! Round robin is nginx's *smooth weighted round robin*: every pick adds each candidate's
//! weight to its `current`, picks the largest `current` and subtracts the candidates' total
//! weight from it. Over a cycle of `sum(weights)` picks each host is chosen exactly `weight`
//! times, interleaved rather than in bursts (weights 5,1,1 give a a b a c a a).
//!
//! The `current` counters are per worker thread (a `thread_local` keyed by cluster identity
//! and host-set version), so picking never touches memory another worker writes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use super::Host;

/// Source of unique host-set versions (also unique across clusters).
static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);

/// An immutable set of hosts, grouped by priority.
#[derive(Debug)]
pub(crate) struct HostSet {
    /// Unique per set; LB state built for another version is discarded.
    pub(crate) version: u64,
    /// All hosts, in config order.
    pub(crate) hosts: Arc<Vec<Arc<Host>>>,
    /// Indices into `hosts` per priority level, lowest priority number (= highest priority)
    /// first; empty levels are omitted.
    pub(crate) priorities: Vec<Vec<usize>>,
    /// Hosts per config endpoint (same order as `ClusterConfig::endpoints`), so a DNS refresh
    /// can keep the hosts of an endpoint whose resolution failed.
    pub(crate) by_endpoint: Vec<Vec<Arc<Host>>>,
}

impl HostSet {
    /// Build from per-endpoint host lists.
    pub(crate) fn new(by_endpoint: Vec<Vec<Arc<Host>>>) -> Self {
        let hosts: Vec<Arc<Host>> = by_endpoint.iter().flatten().cloned().collect();
        let mut levels: Vec<u32> = hosts.iter().map(|h| h.priority).collect();
        levels.sort_unstable();
        levels.dedup();
        let priorities = levels
            .iter()
            .map(|p| {
                hosts
                    .iter()
                    .enumerate()
                    .filter(|(_, h)| h.priority == *p)
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        Self {
            version: NEXT_VERSION.fetch_add(1, Ordering::Relaxed),
            hosts: Arc::new(hosts),
            priorities,
            by_endpoint,
        }
    }

    /// Whether `other` holds the very same hosts (same `Arc`s, same order).
    pub(crate) fn same_hosts(&self, other: &[Vec<Arc<Host>>]) -> bool {
        self.by_endpoint.len() == other.len()
            && self
                .by_endpoint
                .iter()
                .zip(other)
                .all(|(a, b)| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y)))
    }

    /// The candidates of the first priority level that has a healthy host.
    fn healthy_level(&self) -> Option<&[usize]> {
        self.priorities
            .iter()
            .find(|idx| idx.iter().any(|i| self.hosts[*i].is_healthy()))
            .map(|v| v.as_slice())
    }
}

/// One smooth-WRR step over `candidates` (indices into `current`/`weight`), skipping those
/// for which `eligible` is false. Returns the picked index.
pub(crate) fn swrr_pick(
    current: &mut [i64],
    candidates: &[usize],
    weight: impl Fn(usize) -> i64,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for &i in candidates {
        if !eligible(i) {
            continue;
        }
        let w = weight(i);
        current[i] += w;
        total += w;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let b = best?;
    current[b] -= total;
    Some(b)
}

/// Per-worker round-robin state of one cluster.
struct RrState {
    /// Host-set version the counters belong to.
    version: u64,
    /// Liveness of the owning cluster, so entries of dropped clusters are pruned.
    cluster: Weak<()>,
    current: Vec<i64>,
}

thread_local! {
    /// cluster uid -> round-robin state, on this thread only.
    static RR: RefCell<HashMap<u64, RrState>> = RefCell::new(HashMap::new());
}

/// Pick a host of `set` for the cluster identified by `uid` (alive while `alive` is).
pub(crate) fn choose(set: &HostSet, uid: u64, alive: &Arc<()>) -> Option<Arc<Host>> {
    let level = set.healthy_level()?;
    RR.with(|rr| {
        let mut rr = rr.borrow_mut();
        let fresh = || RrState {
            version: set.version,
            cluster: Arc::downgrade(alive),
            current: vec![0; set.hosts.len()],
        };
        if !rr.contains_key(&uid) {
            // A new cluster on this thread: a cheap moment to forget dropped ones.
            rr.retain(|_, s| s.cluster.strong_count() > 0);
        }
        let st = rr.entry(uid).or_insert_with(fresh);
        if st.version != set.version {
            *st = fresh();
        }
        let hosts = &set.hosts;
        swrr_pick(
            &mut st.current,
            level,
            |i| i64::from(hosts[i].weight),
            |i| hosts[i].is_healthy(),
        )
        .map(|i| hosts[i].clone())
    })
}

#[cfg(test)]
mod tests {
    use super::super::health_flags;
    use super::*;

    fn host(port: u16, weight: u32, priority: u32) -> Arc<Host> {
        Arc::new(Host::new(
            ([127, 0, 0, 1], port).into(),
            None,
            weight,
            priority,
            0,
        ))
    }

    fn picks(set: &HostSet, uid: u64, n: usize) -> Vec<u16> {
        let alive = Arc::new(());
        (0..n)
            .map(|_| {
                choose(set, uid, &alive)
                    .map(|h| h.address.port())
                    .unwrap_or(0)
            })
            .collect()
    }

    #[test]
    fn nginx_sequence() {
        // nginx's documented example: weights a=5, b=1, c=1 -> a a b a c a a.
        let set = HostSet::new(vec![vec![host(1, 5, 0), host(2, 1, 0), host(3, 1, 0)]]);
        assert_eq!(
            picks(&set, 9001, 14),
            [1, 1, 2, 1, 3, 1, 1, 1, 1, 2, 1, 3, 1, 1]
        );
    }

    #[test]
    fn exact_proportions_over_a_cycle() {
        let set = HostSet::new(vec![vec![host(1, 1, 0), host(2, 2, 0), host(3, 5, 0)]]);
        let seq = picks(&set, 9002, 8 * 10);
        for cycle in seq.chunks(8) {
            let count = |p| cycle.iter().filter(|x| **x == p).count();
            assert_eq!((count(1), count(2), count(3)), (1, 2, 5), "{cycle:?}");
        }
        // Smooth: the weight-5 host is never picked more than twice in a row.
        assert!(
            !seq.windows(3).any(|w| w.iter().all(|p| *p == 3)),
            "{seq:?}"
        );
    }

    #[test]
    fn equal_weights_alternate() {
        let set = HostSet::new(vec![vec![host(1, 1, 0)], vec![host(2, 1, 0)]]);
        assert_eq!(picks(&set, 9003, 4), [1, 2, 1, 2]);
    }

    #[test]
    fn unhealthy_hosts_are_skipped() {
        let set = HostSet::new(vec![vec![host(1, 1, 0), host(2, 1, 0), host(3, 1, 0)]]);
        set.hosts[1]
            .health
            .store(health_flags::FAILED_ACTIVE_HC, Ordering::Relaxed);
        let seq = picks(&set, 9004, 6);
        assert!(!seq.contains(&2), "{seq:?}");
        assert_eq!(seq.iter().filter(|p| **p == 1).count(), 3);
    }

    #[test]
    fn priority_fallback() {
        let set = HostSet::new(vec![vec![
            host(1, 1, 0),
            host(2, 1, 0),
            host(10, 1, 1),
            host(20, 3, 2),
        ]]);
        assert_eq!(picks(&set, 9005, 2), [1, 2]);
        set.hosts[0].health.store(1, Ordering::Relaxed);
        assert_eq!(picks(&set, 9005, 2), [2, 2]);
        set.hosts[1].health.store(4, Ordering::Relaxed);
        assert_eq!(picks(&set, 9005, 2), [10, 10]);
        set.hosts[2].health.store(2, Ordering::Relaxed);
        assert_eq!(picks(&set, 9005, 2), [20, 20]);
        set.hosts[3].health.store(1, Ordering::Relaxed);
        assert_eq!(picks(&set, 9005, 1), [0]);
        // Recovery of priority 0 takes traffic back.
        set.hosts[1].health.store(0, Ordering::Relaxed);
        assert_eq!(picks(&set, 9005, 2), [2, 2]);
    }

    #[test]
    fn empty_set_picks_nothing() {
        let set = HostSet::new(Vec::new());
        assert_eq!(picks(&set, 9006, 1), [0]);
    }

    #[test]
    fn state_is_per_thread() {
        let set = Arc::new(HostSet::new(vec![vec![host(1, 1, 0), host(2, 1, 0)]]));
        assert_eq!(picks(&set, 9007, 1), [1]);
        let s2 = set.clone();
        // A fresh thread starts its own cycle from the beginning.
        let other = std::thread::spawn(move || picks(&s2, 9007, 1))
            .join()
            .expect("thread");
        assert_eq!(other, [1]);
        assert_eq!(picks(&set, 9007, 1), [2]);
    }
}
