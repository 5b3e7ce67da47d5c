//! Balancer tests: every policy's distribution (seeded), priorities, panic, locality weights,
//! slow start (fake clock), reselects.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::super::{LbContext, health_flags};
use super::*;
use crate::upstream::SlowStartConfig;

fn host(port: u16, weight: u32, priority: u32) -> Arc<Host> {
    Arc::new(Host::new(
        ([127, 0, 0, 1], port).into(),
        None,
        weight,
        priority,
        0,
    ))
}

fn located(port: u16, priority: u32, zone: &str, lw: u32) -> Arc<Host> {
    Arc::new(
        Host::new(([127, 0, 0, 1], port).into(), None, 1, priority, 0).with_locality(Some(
            LocalityConfig {
                zone: zone.into(),
                load_balancing_weight: Some(lw),
                ..Default::default()
            },
        )),
    )
}

fn set(hosts: Vec<Arc<Host>>) -> HostSet {
    HostSet::new(vec![hosts])
}

fn fail(set: &HostSet, i: usize) {
    set.hosts[i]
        .health
        .store(health_flags::FAILED_EDS_HEALTH, Ordering::Relaxed);
}

struct T {
    set: HostSet,
    lb: WorkerLb,
    policy: LbPolicy,
    cfg: LbConfig,
    now: Instant,
    panics: usize,
}

impl T {
    fn new(set: HostSet, policy: LbPolicy) -> T {
        let lb = WorkerLb::new(&set, Weak::new(), 42);
        T {
            set,
            lb,
            policy,
            cfg: LbConfig::default(),
            now: Instant::now(),
            panics: 0,
        }
    }

    fn pick_ctx(&mut self, ctx: &LbContext<'_>) -> u16 {
        let now = self.now;
        let p = self
            .lb
            .choose(&self.set, &self.policy, &self.cfg, ctx, move || now);
        self.panics += usize::from(p.panic);
        p.host.map_or(0, |i| self.set.hosts[i].address.port())
    }

    fn pick(&mut self) -> u16 {
        self.pick_ctx(&LbContext::default())
    }

    fn picks(&mut self, n: usize) -> Vec<u16> {
        (0..n).map(|_| self.pick()).collect()
    }

    /// Share of picks per port over `n` picks.
    fn shares(&mut self, n: usize) -> HashMap<u16, f64> {
        let mut m = HashMap::new();
        for p in self.picks(n) {
            *m.entry(p).or_insert(0.0) += 1.0 / n as f64;
        }
        m
    }
}

fn near(m: &HashMap<u16, f64>, port: u16, want: f64, tol: f64) {
    let got = m.get(&port).copied().unwrap_or(0.0);
    assert!(
        (got - want).abs() <= tol,
        "port {port}: {got} vs {want} ({m:?})"
    );
}

// ---- round robin ----

#[test]
fn nginx_sequence() {
    // nginx's documented example: weights a=5, b=1, c=1 -> a a b a c a a.
    let mut t = T::new(
        set(vec![host(1, 5, 0), host(2, 1, 0), host(3, 1, 0)]),
        LbPolicy::RoundRobin,
    );
    assert_eq!(t.picks(14), [1, 1, 2, 1, 3, 1, 1, 1, 1, 2, 1, 3, 1, 1]);
}

#[test]
fn exact_proportions_over_a_cycle() {
    let mut t = T::new(
        set(vec![host(1, 1, 0), host(2, 2, 0), host(3, 5, 0)]),
        LbPolicy::RoundRobin,
    );
    let seq = t.picks(80);
    for cycle in seq.chunks(8) {
        let count = |p| cycle.iter().filter(|x| **x == p).count();
        assert_eq!((count(1), count(2), count(3)), (1, 2, 5), "{cycle:?}");
    }
    assert!(
        !seq.windows(3).any(|w| w.iter().all(|p| *p == 3)),
        "{seq:?}"
    );
}

#[test]
fn unhealthy_hosts_are_skipped() {
    let mut t = T::new(
        set(vec![
            host(1, 1, 0),
            host(2, 1, 0),
            host(3, 1, 0),
            host(4, 1, 0),
        ]),
        LbPolicy::RoundRobin,
    );
    fail(&t.set, 1);
    let seq = t.picks(6);
    assert!(!seq.contains(&2), "{seq:?}");
    assert_eq!(seq.iter().filter(|p| **p == 1).count(), 2);
    assert_eq!(t.panics, 0);
}

#[test]
fn state_is_per_thread() {
    let s = Arc::new(set(vec![host(1, 1, 0), host(2, 1, 0)]));
    let alive = Arc::new(());
    let ctx = LbContext::default();
    let p = |s: &HostSet, alive: &Arc<()>| {
        choose(
            s,
            &LbPolicy::RoundRobin,
            &LbConfig::default(),
            &ctx,
            9007,
            alive,
        )
        .0
        .map(|h| h.address.port())
    };
    assert_eq!(p(&s, &alive), Some(1));
    let (s2, a2) = (s.clone(), alive.clone());
    let other = std::thread::spawn(move || {
        choose(
            &s2,
            &LbPolicy::RoundRobin,
            &LbConfig::default(),
            &LbContext::default(),
            9007,
            &a2,
        )
        .0
        .map(|h| h.address.port())
    })
    .join()
    .expect("thread");
    // A fresh thread starts its own cycle from the beginning.
    assert_eq!(other, Some(1));
    assert_eq!(p(&s, &alive), Some(2));
}

#[test]
fn empty_set_picks_nothing() {
    let mut t = T::new(HostSet::new(Vec::new()), LbPolicy::RoundRobin);
    assert_eq!(t.pick(), 0);
    let mut t = T::new(HostSet::new(Vec::new()), LbPolicy::RING_HASH);
    assert_eq!(t.pick(), 0);
}

// ---- least request ----

#[test]
fn least_request_p2c_prefers_idle_hosts() {
    let mut t = T::new(
        set(vec![
            host(1, 1, 0),
            host(2, 1, 0),
            host(3, 1, 0),
            host(4, 1, 0),
        ]),
        LbPolicy::LEAST_REQUEST,
    );
    // All idle: uniform.
    let m = t.shares(20_000);
    for p in 1..=4 {
        near(&m, p, 0.25, 0.02);
    }
    // Host 1 busy: P2C only picks it when both samples are host 1 (1/16).
    t.set.hosts[0].stats.rq_active.store(10, Ordering::Relaxed);
    let m = t.shares(20_000);
    near(&m, 1, 1.0 / 16.0, 0.015);
    // choice_count 4 (sampling with replacement): (1/4)^4.
    t.policy = LbPolicy::LeastRequest {
        choice_count: 4,
        active_request_bias: 1.0,
    };
    let m = t.shares(20_000);
    near(&m, 1, 1.0 / 256.0, 0.005);
}

#[test]
fn least_request_weighted_uses_active_request_bias() {
    let mut t = T::new(
        set(vec![host(1, 1, 0), host(2, 3, 0)]),
        LbPolicy::LEAST_REQUEST,
    );
    // Idle: by weight.
    let m = t.shares(8000);
    near(&m, 1, 0.25, 0.01);
    // Host 2 has 2 active: 3 / (2+1)^1 = 1 -> even split.
    t.set.hosts[1].stats.rq_active.store(2, Ordering::Relaxed);
    let m = t.shares(8000);
    near(&m, 1, 0.5, 0.01);
    // Bias 0: weights only.
    t.policy = LbPolicy::LeastRequest {
        choice_count: 2,
        active_request_bias: 0.0,
    };
    let m = t.shares(8000);
    near(&m, 2, 0.75, 0.01);
    // Bias 0.5: 3 / sqrt(3) = 1.732 vs 1.
    t.policy = LbPolicy::LeastRequest {
        choice_count: 2,
        active_request_bias: 0.5,
    };
    let m = t.shares(8000);
    near(&m, 2, 1.732 / 2.732, 0.01);
}

// ---- random ----

#[test]
fn random_is_uniform_and_seeded() {
    let mut t = T::new(
        set(vec![host(1, 1, 0), host(2, 5, 0), host(3, 1, 0)]),
        LbPolicy::Random,
    );
    let m = t.shares(30_000);
    for p in 1..=3 {
        near(&m, p, 1.0 / 3.0, 0.015);
    }
    // Same seed, same sequence.
    let a = T::new(set(vec![host(1, 1, 0), host(2, 1, 0)]), LbPolicy::Random).picks(50);
    let b = T::new(set(vec![host(1, 1, 0), host(2, 1, 0)]), LbPolicy::Random).picks(50);
    assert_eq!(a, b);
}

// ---- hash policies ----

fn hash_pick(t: &mut T, key: &str) -> u16 {
    t.pick_ctx(&LbContext {
        hash: Some(xxhash::xxhash64(key.as_bytes())),
        ..Default::default()
    })
}

#[test]
fn ring_hash_and_maglev_are_weighted_and_sticky() {
    for policy in [LbPolicy::RING_HASH, LbPolicy::MAGLEV] {
        let mut t = T::new(
            set(vec![host(1, 1, 0), host(2, 2, 0), host(3, 1, 0)]),
            policy,
        );
        let mut m: HashMap<u16, f64> = HashMap::new();
        let n = 20_000;
        for k in 0..n {
            let key = format!("user-{k}");
            let p = hash_pick(&mut t, &key);
            assert_eq!(hash_pick(&mut t, &key), p, "sticky");
            *m.entry(p).or_insert(0.0) += 1.0 / n as f64;
        }
        near(&m, 1, 0.25, 0.04);
        near(&m, 2, 0.5, 0.04);
        near(&m, 3, 0.25, 0.04);
    }
}

#[test]
fn hash_policies_move_only_the_failed_hosts_keys() {
    for policy in [LbPolicy::RING_HASH, LbPolicy::MAGLEV] {
        let mut t = T::new(set((1..=5).map(|p| host(p, 1, 0)).collect()), policy);
        let keys: Vec<String> = (0..5000).map(|k| format!("k{k}")).collect();
        let before: Vec<u16> = keys.iter().map(|k| hash_pick(&mut t, k)).collect();
        fail(&t.set, 2);
        let after: Vec<u16> = keys.iter().map(|k| hash_pick(&mut t, k)).collect();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert_eq!(moved, before.iter().filter(|p| **p == 3).count());
        assert!(moved < 2 * keys.len() / 5, "{moved}");
        assert!(!after.contains(&3));
    }
}

#[test]
fn hash_policy_without_hash_is_random() {
    let mut t = T::new(set(vec![host(1, 1, 0), host(2, 1, 0)]), LbPolicy::MAGLEV);
    let m = t.shares(10_000);
    near(&m, 1, 0.5, 0.03);
}

#[test]
fn tables_are_built_once_per_host_set() {
    let s = set(vec![host(1, 1, 0), host(2, 1, 0)]);
    let cfg = LbConfig::default();
    let a = s.tables(&LbPolicy::RING_HASH, &cfg);
    let b = s.tables(&LbPolicy::RING_HASH, &cfg);
    assert!(std::ptr::eq(a, b));
    assert_eq!(a.len(), 1);
}

// ---- priorities and panic ----

#[test]
fn priority_failover_follows_envoy_load() {
    // P0: 4 hosts, P1: 2 hosts.
    let mut t = T::new(
        set(vec![
            host(1, 1, 0),
            host(2, 1, 0),
            host(3, 1, 0),
            host(4, 1, 0),
            host(10, 1, 1),
            host(11, 1, 1),
        ]),
        LbPolicy::Random,
    );
    let p0 = |m: &HashMap<u16, f64>| {
        (1..=4)
            .map(|p| m.get(&p).copied().unwrap_or(0.0))
            .sum::<f64>()
    };
    assert!((p0(&t.shares(1000)) - 1.0).abs() < 1e-9);
    // 3 of 4 healthy: 75% * 1.4 = 105 -> still all to P0.
    fail(&t.set, 0);
    assert!((p0(&t.shares(1000)) - 1.0).abs() < 1e-9);
    // 2 of 4 healthy: 70% to P0, 30% to P1.
    fail(&t.set, 1);
    let m = t.shares(20_000);
    assert!((p0(&m) - 0.70).abs() < 0.02, "{m:?}");
    // 0 of 4: all to P1.
    fail(&t.set, 2);
    fail(&t.set, 3);
    let m = t.shares(1000);
    assert!(p0(&m) < 1e-9, "{m:?}");
    assert_eq!(t.panics, 0);
    // P0 recovers: traffic returns.
    for i in 0..4 {
        t.set.hosts[i].health.store(0, Ordering::Relaxed);
    }
    assert!((p0(&t.shares(1000)) - 1.0).abs() < 1e-9);
}

#[test]
fn panic_balances_across_all_hosts() {
    let mut t = T::new(
        set(vec![
            host(1, 1, 0),
            host(2, 1, 0),
            host(3, 1, 0),
            host(4, 1, 0),
        ]),
        LbPolicy::RoundRobin,
    );
    // 1 of 4 healthy (25% < 50%): panic, all four hosts get traffic.
    fail(&t.set, 0);
    fail(&t.set, 1);
    fail(&t.set, 2);
    let seq = t.picks(8);
    assert_eq!(seq.iter().filter(|p| **p == 1).count(), 2, "{seq:?}");
    assert_eq!(t.panics, 8);
    // Panic threshold 0: only the healthy host.
    t.cfg.healthy_panic_threshold = 0.0;
    t.lb = WorkerLb::new(&t.set, Weak::new(), 1);
    t.panics = 0;
    assert_eq!(t.picks(4), [4, 4, 4, 4]);
    assert_eq!(t.panics, 0);
    // Nothing healthy and panic disabled: no host.
    fail(&t.set, 3);
    assert_eq!(t.pick(), 0);
    // Nothing healthy with the default threshold: panic, any host.
    t.cfg.healthy_panic_threshold = 50.0;
    t.lb = WorkerLb::new(&t.set, Weak::new(), 1);
    assert_ne!(t.pick(), 0);
    assert_eq!(t.panics, 1);
}

#[test]
fn panic_applies_to_hash_policies() {
    let mut t = T::new(
        set(vec![host(1, 1, 0), host(2, 1, 0), host(3, 1, 0)]),
        LbPolicy::RING_HASH,
    );
    fail(&t.set, 0);
    fail(&t.set, 1);
    // 1 of 3 healthy: panic; keys keep their original host even if unhealthy.
    let keys: Vec<String> = (0..300).map(|k| format!("k{k}")).collect();
    let ports: Vec<u16> = keys.iter().map(|k| hash_pick(&mut t, k)).collect();
    assert!(ports.contains(&1) && ports.contains(&2) && ports.contains(&3));
    assert_eq!(t.panics, 300);
}

// ---- locality ----

#[test]
fn locality_weights_split_traffic() {
    let mut t = T::new(
        set(vec![
            located(1, 0, "a", 1),
            located(2, 0, "a", 1),
            located(3, 0, "b", 3),
        ]),
        LbPolicy::RoundRobin,
    );
    t.cfg.locality_weighted = true;
    let m = t.shares(4000);
    near(&m, 1, 0.125, 1e-9);
    near(&m, 2, 0.125, 1e-9);
    near(&m, 3, 0.75, 1e-9);
    // Without locality weighting: per host.
    t.cfg.locality_weighted = false;
    let m = t.shares(3000);
    near(&m, 3, 1.0 / 3.0, 1e-9);
}

#[test]
fn locality_weight_scales_with_locality_health() {
    // Locality a: weight 1, 4 hosts; locality b: weight 1, 4 hosts.
    let mut hosts: Vec<Arc<Host>> = (1..=4).map(|p| located(p, 0, "a", 1)).collect();
    hosts.extend((11..=14).map(|p| located(p, 0, "b", 1)));
    let mut t = T::new(set(hosts), LbPolicy::Random);
    t.cfg.locality_weighted = true;
    // a: 2 of 4 healthy -> availability 70; b: 100. Shares 70/170 and 100/170. Level health
    // 6/8*1.4 > 100, so no priority spill and no panic.
    fail(&t.set, 0);
    fail(&t.set, 1);
    let m = t.shares(17_000);
    let a: f64 = (3..=4).map(|p| m.get(&p).copied().unwrap_or(0.0)).sum();
    assert!((a - 70.0 / 170.0).abs() < 1e-3, "{m:?}");
    // A locality without weight gets nothing.
    let mut t = T::new(
        set(vec![located(1, 0, "a", 1), located(2, 0, "b", 0)]),
        LbPolicy::RoundRobin,
    );
    t.cfg.locality_weighted = true;
    assert_eq!(t.picks(4), [1, 1, 1, 1]);
}

// ---- slow start ----

#[test]
fn slow_start_ramps_a_new_host() {
    let mut t = T::new(
        set(vec![host(1, 1, 0), host(2, 1, 0)]),
        LbPolicy::RoundRobin,
    );
    t.cfg.slow_start = Some(SlowStartConfig {
        window: Duration::from_secs(10),
        aggression: 1.0,
        min_weight_percent: 10.0,
    });
    // Host 1 has been up since it was created; host 2 turned healthy at t0, an hour later.
    let t0 = Instant::now() + Duration::from_secs(3600);
    t.set.hosts[1].set_healthy_since(t0);
    // At t0 + 1s host 2 is at max(0.1, 0.1) = 10% weight: 1/11 of picks.
    t.now = t0 + Duration::from_secs(1);
    let m = t.shares(1100);
    near(&m, 2, 1.0 / 11.0, 0.002);
    // At t0 + 5s: 50% -> 1/3.
    t.now = t0 + Duration::from_secs(5);
    let m = t.shares(3000);
    near(&m, 2, 1.0 / 3.0, 0.002);
    // After the window: even.
    t.now = t0 + Duration::from_secs(10);
    let m = t.shares(1000);
    near(&m, 2, 0.5, 0.002);
}

#[test]
fn slow_start_restarts_when_a_host_turns_healthy() {
    let mut t = T::new(
        set(vec![host(1, 1, 0), host(2, 1, 0), host(3, 1, 0)]),
        LbPolicy::LEAST_REQUEST,
    );
    t.cfg.slow_start = Some(SlowStartConfig {
        window: Duration::from_secs(60),
        aggression: 1.0,
        min_weight_percent: 10.0,
    });
    let t0 = Instant::now() + Duration::from_secs(3600);
    t.now = t0;
    assert!(t.set.hosts[2].healthy_for(t0) >= Duration::from_secs(3600));
    fail(&t.set, 2);
    t.pick();
    t.set.hosts[2].health.store(0, Ordering::Relaxed);
    t.pick();
    // The worker that saw the transition stamped it with its clock.
    assert_eq!(t.set.hosts[2].healthy_for(t0), Duration::ZERO);
    // 6 s later host 3 is at 10% weight.
    t.now = t0 + Duration::from_secs(6);
    let m = t.shares(2100);
    near(&m, 3, 0.1 / 2.1, 0.003);
}

// ---- reselect ----

#[test]
fn reselect_avoids_previous_hosts() {
    for policy in [
        LbPolicy::RoundRobin,
        LbPolicy::Random,
        LbPolicy::LEAST_REQUEST,
        LbPolicy::RING_HASH,
        LbPolicy::MAGLEV,
    ] {
        let mut t = T::new(
            set(vec![host(1, 1, 0), host(2, 1, 0), host(3, 1, 0)]),
            policy,
        );
        let avoid = vec![t.set.hosts[0].clone(), t.set.hosts[1].clone()];
        for k in 0..50u64 {
            let p = t.pick_ctx(&LbContext {
                hash: Some(xxhash::xxhash64(&k.to_le_bytes())),
                avoid: &avoid,
                max_reselects: 40,
                ..Default::default()
            });
            assert_eq!(p, 3, "{policy:?}");
        }
        // Without reselects the avoided hosts still come up.
        let ports: Vec<u16> = (0..60u64)
            .map(|k| {
                t.pick_ctx(&LbContext {
                    hash: Some(xxhash::xxhash64(&k.to_le_bytes())),
                    avoid: &avoid,
                    max_reselects: 0,
                    ..Default::default()
                })
            })
            .collect();
        assert!(ports.iter().any(|p| *p != 3), "{policy:?}");
        // Everything avoided: the last pick is kept.
        let all: Vec<Arc<Host>> = t.set.hosts.iter().cloned().collect();
        assert_ne!(
            t.pick_ctx(&LbContext {
                hash: None,
                avoid: &all,
                max_reselects: 3,
                ..Default::default()
            }),
            0
        );
    }
}
