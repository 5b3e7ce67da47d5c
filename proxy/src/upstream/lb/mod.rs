//! Host sets and the load balancers (Envoy's `lb_policy` family).
//!
//! # Data flow
//! A cluster's hosts live in an immutable [`HostSet`] swapped atomically (arc-swap) when DNS
//! changes them. The set groups host indices by priority level and, within a level, by
//! locality. Health is *not* part of the set: [`Host::health`] atomics are read at pick time,
//! so a health checker or outlier detector flips a bit without rebuilding anything.
//!
//! Every worker thread keeps a [`WorkerLb`] per cluster (a `thread_local` keyed by cluster
//! identity, reset when the host-set version changes). A pick:
//! 1. snapshots the hosts' health bits; when they differ from the worker's last snapshot it
//!    recomputes the *plan*: Envoy's per-priority load and panic flags ([`priority`]), the
//!    healthy hosts per level and per locality, and the localities' effective weights;
//! 2. chooses a level by `hash % 100` (the request hash for RING_HASH / MAGLEV, else a
//!    random number) against the cumulative priority load;
//! 3. takes the level's healthy hosts, or all of them when the level is in panic (counted in
//!    `lb_healthy_panic`); with `locality_weighted_lb_config` (outside panic) it first picks a
//!    locality by smooth weighted round robin over `locality weight * locality availability`;
//! 4. runs the policy over those candidates.
//!
//! Nothing on this path takes a lock or writes memory another worker writes, except:
//! RING_HASH / MAGLEV tables are built once per host set (the first worker to need one builds
//! it inside a `OnceLock` of the shared host set; the others borrow it), and a worker that sees a host turn
//! healthy records the time in the host's `healthy_since` (an atomic `fetch_max`) for slow
//! start.
//!
//! # Policies
//! - ROUND_ROBIN: nginx's smooth weighted round robin. Every pick adds each candidate's
//!   weight to its `current`, picks the largest `current` and subtracts the candidates' total
//!   weight from it: weights 5,1,1 give a a b a c a a.
//! - LEAST_REQUEST: with equal weights (and no host in slow start), power of `choice_count`
//!   choices on `rq_active`; otherwise smooth WRR over `weight / (rq_active + 1)^bias`.
//! - RANDOM: uniform over the candidates (Envoy ignores weights here too).
//! - RING_HASH / MAGLEV: see [`ring`]; without a request hash the key is random.
//! - Slow start (RR, LR): see [`slow_start`].
//!
//! `LbContext::avoid` (retry `previous_hosts`): the pick is repeated up to `max_reselects`
//! times while it lands on an avoided host; the last pick is kept if all of them do.

pub(crate) mod priority;
pub(crate) mod ring;
pub(crate) mod slow_start;
pub mod xxhash;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use super::{Host, LbConfig, LbPolicy, LocalityConfig};
use priority::{LevelCounts, PriorityLoad};
use ring::{Maglev, Member, Ring};

/// Source of unique host-set versions (also unique across clusters).
static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);

/// One locality of one priority level.
#[derive(Debug)]
pub(crate) struct LocalityGroup {
    /// `LocalityLbEndpoints.load_balancing_weight` (0 = unset: no traffic with
    /// locality-weighted balancing, as in Envoy).
    pub(crate) weight: u32,
    /// Indices into `HostSet::hosts`.
    pub(crate) hosts: Vec<usize>,
}

/// One priority level.
#[derive(Debug)]
pub(crate) struct Level {
    /// Indices into `HostSet::hosts`, in config order.
    pub(crate) hosts: Vec<usize>,
    /// Localities in order of first appearance.
    pub(crate) localities: Vec<LocalityGroup>,
    /// Every host of the level has the same weight (least request then uses P2C).
    pub(crate) equal_weights: bool,
}

/// A hash table for one level (RING_HASH or MAGLEV).
#[derive(Debug)]
enum Table {
    Ring(Ring),
    Maglev(Maglev),
}

impl Table {
    fn pick(&self, hash: u64, attempt: u32, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        match self {
            Table::Ring(r) => r.pick(hash, attempt, eligible),
            Table::Maglev(m) => m.pick(hash, attempt, eligible),
        }
    }
}

/// An immutable set of hosts, grouped by priority.
#[derive(Debug)]
pub(crate) struct HostSet {
    /// Unique per set; LB state built for another version is discarded.
    pub(crate) version: u64,
    /// All hosts, in config order.
    pub(crate) hosts: Arc<Vec<Arc<Host>>>,
    /// Levels, lowest priority number (= highest priority) first; empty levels are omitted.
    pub(crate) priorities: Vec<Level>,
    /// Hosts per config endpoint (same order as `ClusterConfig::endpoints`), so a DNS refresh
    /// can keep the hosts of an endpoint whose resolution failed.
    pub(crate) by_endpoint: Vec<Vec<Arc<Host>>>,
    /// RING_HASH / MAGLEV tables per level, built on first use by whichever worker needs
    /// them first; the host set itself is shared by `Arc`.
    tables: OnceLock<Vec<Table>>,
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
                let idx: Vec<usize> = hosts
                    .iter()
                    .enumerate()
                    .filter(|(_, h)| h.priority == *p)
                    .map(|(i, _)| i)
                    .collect();
                let mut keys: Vec<&Option<LocalityConfig>> = Vec::new();
                let mut localities: Vec<LocalityGroup> = Vec::new();
                for &i in &idx {
                    let loc = &hosts[i].locality;
                    match keys.iter().position(|k| *k == loc) {
                        Some(g) => localities[g].hosts.push(i),
                        None => {
                            keys.push(loc);
                            localities.push(LocalityGroup {
                                weight: loc
                                    .as_ref()
                                    .and_then(|l| l.load_balancing_weight)
                                    .unwrap_or(0),
                                hosts: vec![i],
                            });
                        }
                    }
                }
                let equal_weights = idx
                    .windows(2)
                    .all(|w| hosts[w[0]].weight == hosts[w[1]].weight);
                Level {
                    hosts: idx,
                    localities,
                    equal_weights,
                }
            })
            .collect();
        Self {
            version: NEXT_VERSION.fetch_add(1, Ordering::Relaxed),
            hosts: Arc::new(hosts),
            priorities,
            by_endpoint,
            tables: OnceLock::new(),
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

    /// The per-level hash tables for `policy` (built once per host set; borrowed, so a pick
    /// does not touch the shared reference count).
    fn tables(&self, policy: &LbPolicy, cfg: &LbConfig) -> &[Table] {
        self.tables.get_or_init(|| {
            self.priorities
                .iter()
                .map(|level| {
                    let members: Vec<Member> = level
                        .hosts
                        .iter()
                        .map(|&i| {
                            let h = &self.hosts[i];
                            let loc_w = if cfg.locality_weighted {
                                h.locality
                                    .as_ref()
                                    .and_then(|l| l.load_balancing_weight)
                                    .unwrap_or(0)
                            } else {
                                1
                            };
                            Member {
                                index: i,
                                key: h.address.to_string(),
                                weight: u64::from(h.weight) * u64::from(loc_w),
                            }
                        })
                        .filter(|m| m.weight > 0)
                        .collect();
                    match policy {
                        LbPolicy::Maglev { table_size } => {
                            Table::Maglev(Maglev::build(&members, *table_size))
                        }
                        LbPolicy::RingHash {
                            minimum_ring_size,
                            maximum_ring_size,
                        } => Table::Ring(Ring::build(
                            &members,
                            *minimum_ring_size,
                            *maximum_ring_size,
                        )),
                        _ => Table::Ring(Ring::default()),
                    }
                })
                .collect()
        })
    }
}

/// One smooth-WRR step over `candidates` (indices into `current`), with `weight` per index.
/// Returns the picked index.
pub(crate) fn swrr_pick(
    current: &mut [i64],
    candidates: impl IntoIterator<Item = usize>,
    weight: impl Fn(usize) -> i64,
) -> Option<usize> {
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for i in candidates {
        let w = weight(i);
        if w <= 0 {
            continue;
        }
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

/// wyrand: a small, fast per-worker generator (not for secrets).
#[derive(Debug, Clone)]
pub(crate) struct Prng(u64);

impl Prng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xA076_1D64_78BD_642F);
        let t = u128::from(self.0).wrapping_mul(u128::from(self.0 ^ 0xE703_7ED1_A0B4_28DB));
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// What one pick decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pick {
    /// Index into `HostSet::hosts`.
    pub(crate) host: Option<usize>,
    /// The chosen level was in panic (Envoy's `lb_healthy_panic`).
    pub(crate) panic: bool,
}

/// Derived from the health snapshot.
#[derive(Debug, Default)]
struct Plan {
    load: PriorityLoad,
    /// Healthy hosts per level.
    healthy: Vec<Vec<usize>>,
    /// Per level, per locality: healthy hosts.
    loc_healthy: Vec<Vec<Vec<usize>>>,
    /// Per level, per locality: `weight * availability` (availability in percent, Envoy's
    /// `min(100, 1.4 * healthy / total)`).
    loc_weight: Vec<Vec<u64>>,
}

/// One worker's balancer state for one cluster.
#[derive(Debug)]
pub(crate) struct WorkerLb {
    version: u64,
    cluster: Weak<()>,
    /// Health snapshot the plan was computed from (`None` = never).
    healthy: Option<Vec<bool>>,
    plan: Plan,
    /// Smooth-WRR counters per host.
    current: Vec<i64>,
    /// Smooth-WRR counters per level, per locality.
    loc_current: Vec<Vec<i64>>,
    rng: Prng,
}

/// Weight scale used when weights are fractional (slow start, weighted least request).
const SCALE: f64 = 1000.0;

impl WorkerLb {
    pub(crate) fn new(set: &HostSet, cluster: Weak<()>, seed: u64) -> Self {
        Self {
            version: set.version,
            cluster,
            healthy: None,
            plan: Plan::default(),
            current: vec![0; set.hosts.len()],
            loc_current: set
                .priorities
                .iter()
                .map(|l| vec![0; l.localities.len()])
                .collect(),
            rng: Prng::new(seed),
        }
    }

    /// Re-read health; recompute the plan when it changed.
    fn refresh(&mut self, set: &HostSet, cfg: &LbConfig, now: &impl Fn() -> Instant) {
        let hosts = &set.hosts;
        let changed = match &self.healthy {
            None => true,
            Some(snap) => hosts
                .iter()
                .zip(snap)
                .any(|(h, was)| h.is_healthy() != *was),
        };
        if !changed {
            return;
        }
        let snap: Vec<bool> = hosts.iter().map(|h| h.is_healthy()).collect();
        if let Some(old) = &self.healthy {
            // Hosts that turned healthy start their slow start now.
            let mut t = None;
            for (i, h) in hosts.iter().enumerate() {
                if snap[i] && !old[i] {
                    let at = *t.get_or_insert_with(now);
                    h.mark_healthy_since(at);
                }
            }
        }
        let counts: Vec<LevelCounts> = set
            .priorities
            .iter()
            .map(|l| LevelCounts {
                total: l.hosts.len() as u64,
                healthy: l.hosts.iter().filter(|i| snap[**i]).count() as u64,
            })
            .collect();
        let healthy: Vec<Vec<usize>> = set
            .priorities
            .iter()
            .map(|l| l.hosts.iter().copied().filter(|i| snap[*i]).collect())
            .collect();
        let loc_healthy: Vec<Vec<Vec<usize>>> = set
            .priorities
            .iter()
            .map(|l| {
                l.localities
                    .iter()
                    .map(|g| g.hosts.iter().copied().filter(|i| snap[*i]).collect())
                    .collect()
            })
            .collect();
        let loc_weight = set
            .priorities
            .iter()
            .zip(&loc_healthy)
            .map(|(l, lh)| {
                l.localities
                    .iter()
                    .zip(lh)
                    .map(|(g, h)| {
                        let avail = priority::level_health(LevelCounts {
                            total: g.hosts.len() as u64,
                            healthy: h.len() as u64,
                        });
                        u64::from(g.weight) * u64::from(avail)
                    })
                    .collect()
            })
            .collect();
        self.plan = Plan {
            load: priority::compute(&counts, cfg.healthy_panic_threshold),
            healthy,
            loc_healthy,
            loc_weight,
        };
        self.healthy = Some(snap);
    }

    /// One pick (attempt `attempt` of a reselect loop).
    fn pick_once(
        &mut self,
        set: &HostSet,
        policy: &LbPolicy,
        cfg: &LbConfig,
        hash: Option<u64>,
        attempt: u32,
        now: &impl Fn() -> Instant,
    ) -> Pick {
        let none = Pick {
            host: None,
            panic: false,
        };
        if self.plan.load.none_available {
            return none;
        }
        let hashing = matches!(policy, LbPolicy::RingHash { .. } | LbPolicy::Maglev { .. });
        let h = match hash {
            Some(h) if hashing => h,
            _ => self.rng.next_u64(),
        };
        let Some(level) = priority::choose(&self.plan.load.load, h) else {
            return none;
        };
        let panic = self.plan.load.panic[level];
        let healthy = self.healthy.as_deref().unwrap_or(&[]);
        if hashing {
            let tables = set.tables(policy, cfg);
            let host = tables[level].pick(h, attempt, |i| panic || healthy[i]);
            return Pick { host, panic };
        }
        let lvl = &set.priorities[level];
        let mut candidates: &[usize] = if panic {
            &lvl.hosts
        } else {
            &self.plan.healthy[level]
        };
        if cfg.locality_weighted && !panic {
            let weights = &self.plan.loc_weight[level];
            if let Some(g) = swrr_pick(&mut self.loc_current[level], 0..weights.len(), |g| {
                i64::try_from(weights[g]).unwrap_or(i64::MAX)
            }) {
                candidates = &self.plan.loc_healthy[level][g];
            }
        }
        if candidates.is_empty() {
            return Pick { host: None, panic };
        }
        let hosts = &set.hosts;
        let slow = cfg.slow_start.as_ref().map(|ss| (ss, now()));
        let base_weight = |i: usize| -> f64 {
            let w = f64::from(hosts[i].weight);
            match &slow {
                Some((ss, t)) => slow_start::weight(w, hosts[i].healthy_for(*t), ss),
                None => w,
            }
        };
        let host = match policy {
            LbPolicy::Random => Some(candidates[self.rng.below(candidates.len())]),
            LbPolicy::LeastRequest {
                choice_count,
                active_request_bias,
            } => {
                let in_slow_start = slow.as_ref().is_some_and(|(ss, t)| {
                    candidates
                        .iter()
                        .any(|i| hosts[*i].healthy_for(*t) < ss.window)
                });
                if lvl.equal_weights && !in_slow_start {
                    // Power of `choice_count` choices on active requests.
                    let mut best: Option<(usize, u64)> = None;
                    for _ in 0..(*choice_count).max(1) {
                        let i = candidates[self.rng.below(candidates.len())];
                        let active = hosts[i].stats.rq_active.load(Ordering::Relaxed);
                        if best.is_none_or(|(_, a)| active < a) {
                            best = Some((i, active));
                        }
                    }
                    best.map(|(i, _)| i)
                } else {
                    let bias = *active_request_bias;
                    swrr_pick(&mut self.current, candidates.iter().copied(), |i| {
                        let active = hosts[i].stats.rq_active.load(Ordering::Relaxed) as f64;
                        let w = if bias == 0.0 {
                            base_weight(i)
                        } else if bias == 1.0 {
                            base_weight(i) / (active + 1.0)
                        } else {
                            base_weight(i) / (active + 1.0).powf(bias)
                        };
                        ((w * SCALE + 0.5) as i64).max(1)
                    })
                }
            }
            // ROUND_ROBIN (hash policies returned above).
            _ => {
                if slow.is_some() {
                    swrr_pick(&mut self.current, candidates.iter().copied(), |i| {
                        ((base_weight(i) * SCALE + 0.5) as i64).max(1)
                    })
                } else {
                    swrr_pick(&mut self.current, candidates.iter().copied(), |i| {
                        i64::from(hosts[i].weight)
                    })
                }
            }
        };
        Pick { host, panic }
    }

    /// Pick for `ctx`: re-pick up to `max_reselects` times while the pick is in `avoid`.
    pub(crate) fn choose(
        &mut self,
        set: &HostSet,
        policy: &LbPolicy,
        cfg: &LbConfig,
        ctx: &super::LbContext<'_>,
        now: impl Fn() -> Instant,
    ) -> Pick {
        self.refresh(set, cfg, &now);
        let mut last = Pick {
            host: None,
            panic: false,
        };
        for attempt in 0..=ctx.max_reselects {
            let p = self.pick_once(set, policy, cfg, ctx.hash, attempt, &now);
            last = Pick {
                host: p.host,
                panic: last.panic || p.panic,
            };
            match p.host {
                None => break,
                Some(i) if !ctx.avoid.iter().any(|a| Arc::ptr_eq(a, &set.hosts[i])) => break,
                Some(_) => {}
            }
        }
        last
    }
}

thread_local! {
    /// cluster uid -> balancer state, on this thread only.
    static WORKERS: RefCell<HashMap<u64, WorkerLb>> = RefCell::new(HashMap::new());
}

/// Pick a host of `set` for the cluster identified by `uid` (alive while `alive` is), with
/// this thread's state.
pub(crate) fn choose(
    set: &HostSet,
    policy: &LbPolicy,
    cfg: &LbConfig,
    ctx: &super::LbContext<'_>,
    uid: u64,
    alive: &Arc<()>,
) -> (Option<Arc<Host>>, bool) {
    WORKERS.with(|w| {
        let mut w = w.borrow_mut();
        if !w.contains_key(&uid) {
            // A new cluster on this thread: a cheap moment to forget dropped ones.
            w.retain(|_, s| s.cluster.strong_count() > 0);
        }
        let st = w
            .entry(uid)
            .or_insert_with(|| WorkerLb::new(set, Arc::downgrade(alive), rand::random()));
        if st.version != set.version {
            *st = WorkerLb::new(set, Arc::downgrade(alive), rand::random());
        }
        let p = st.choose(set, policy, cfg, ctx, Instant::now);
        (p.host.map(|i| set.hosts[i].clone()), p.panic)
    })
}

#[cfg(test)]
mod tests;
