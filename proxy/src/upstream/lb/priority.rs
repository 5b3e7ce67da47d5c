//! Envoy's priority load and panic computation (`LoadBalancerBase::recalculatePerPriorityState`
//! and `recalculatePerPriorityPanic`), as pure functions of per-priority host counts.
//!
//! - A priority's *health* is `min(100, 140 * healthy / total)` (integer percent; 140 is the
//!   default overprovisioning factor 1.4 in percent).
//! - The *normalized total availability* is `min(100, sum(health))`.
//! - Load is handed out from priority 0 down: each level gets
//!   `min(remaining, health * 100 / normalized_total)`; rounding leftovers go to the first
//!   level with non-zero health.
//! - Panic: when the normalized total is 100 no level is in panic; otherwise a level is in
//!   panic when its healthy percentage (without overprovisioning) is below the panic threshold.
//!   When every level is in panic (which includes total availability 0), load is spread by
//!   host count instead, regardless of health. With a panic threshold of 0 and nothing
//!   available, no host is chosen.

/// Envoy's default overprovisioning factor, in percent.
pub const OVERPROVISIONING_FACTOR: u64 = 140;

/// Host counts of one priority level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LevelCounts {
    /// All hosts of the level.
    pub total: u64,
    /// Healthy hosts of the level.
    pub healthy: u64,
}

/// The result: where load goes and which levels balance across all hosts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PriorityLoad {
    /// Percent of requests per level (sums to 100 unless `none_available`).
    pub load: Vec<u32>,
    /// Per level: in panic (use all hosts of the level, ignoring health).
    pub panic: Vec<bool>,
    /// Per level health (0..=100), for tests and debugging.
    pub health: Vec<u32>,
    /// No healthy host anywhere and panic is disabled: pick nothing.
    pub none_available: bool,
}

/// A level's health: `min(100, 1.4 * healthy / total)` in integer percent.
pub fn level_health(c: LevelCounts) -> u32 {
    if c.total == 0 {
        return 0;
    }
    // Bounded by 100 before the cast.
    (OVERPROVISIONING_FACTOR * c.healthy / c.total).min(100) as u32
}

/// Compute loads and panic flags. `panic_threshold` is a percentage (0..=100; Envoy's default
/// is 50).
pub fn compute(levels: &[LevelCounts], panic_threshold: f64) -> PriorityLoad {
    let n = levels.len();
    let health: Vec<u32> = levels.iter().map(|c| level_health(*c)).collect();
    let normalized_total = health.iter().map(|h| u64::from(*h)).sum::<u64>().min(100);
    let mut load = vec![0u32; n];
    if n == 0 {
        return PriorityLoad {
            load,
            panic: Vec::new(),
            health,
            none_available: true,
        };
    }
    // Nothing available (normalized total 0): loads stay 0 and panic decides below.
    let mut remaining: u64 = 100;
    let mut first_available = None;
    for (i, h) in health.iter().enumerate() {
        if first_available.is_none() && *h > 0 {
            first_available = Some(i);
        }
        let l = (u64::from(*h) * 100)
            .checked_div(normalized_total)
            .unwrap_or(0)
            .min(remaining);
        load[i] = l as u32;
        remaining -= l;
    }
    if remaining > 0
        && let Some(i) = first_available
    {
        load[i] += remaining as u32;
    }
    // Envoy uses a whole percentage (translation truncates the configured value).
    let threshold = panic_threshold.clamp(0.0, 100.0).round() as u64;
    if threshold == 0 && normalized_total == 0 {
        return PriorityLoad {
            load,
            panic: vec![false; n],
            health,
            none_available: true,
        };
    }
    let panic: Vec<bool> = levels
        .iter()
        .map(|c| {
            if normalized_total == 100 {
                return false;
            }
            let healthy_percent = if c.total == 0 {
                0.0
            } else {
                100.0 * c.healthy as f64 / c.total as f64
            };
            healthy_percent < threshold as f64
        })
        .collect();
    if panic.iter().all(|p| *p) {
        // Total panic: spread by host count.
        let total_hosts: u64 = levels.iter().map(|c| c.total).sum();
        let mut remaining = 100u64;
        let mut first_nonempty = None;
        for (i, c) in levels.iter().enumerate() {
            if first_nonempty.is_none() && c.total > 0 {
                first_nonempty = Some(i);
            }
            let l = (100 * c.total).checked_div(total_hosts).unwrap_or(0);
            load[i] = l as u32;
            remaining -= l;
        }
        match first_nonempty {
            Some(i) => load[i] += remaining as u32,
            // No hosts at all: load must go somewhere (it finds no host).
            None => load[0] = 100,
        }
    }
    PriorityLoad {
        load,
        panic,
        health,
        none_available: false,
    }
}

/// The level for `hash % 100` against the cumulative loads (Envoy's `choosePriority`).
pub fn choose(load: &[u32], hash: u64) -> Option<usize> {
    let r = hash % 100;
    let mut acc = 0u64;
    for (i, l) in load.iter().enumerate() {
        acc += u64::from(*l);
        if r < acc {
            return Some(i);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Levels from healthy percentages with 100 hosts each (so `healthy` = the percent).
    fn pct(healthy: &[u64]) -> Vec<LevelCounts> {
        healthy
            .iter()
            .map(|h| LevelCounts {
                total: 100,
                healthy: *h,
            })
            .collect()
    }

    fn loads(healthy: &[u64]) -> Vec<u32> {
        compute(&pct(healthy), 50.0).load
    }

    #[test]
    fn envoy_doc_two_priorities() {
        // Envoy's "Priority levels" table, P0 / P1 healthy -> traffic to P0 / P1.
        assert_eq!(loads(&[100, 100]), [100, 0]);
        assert_eq!(loads(&[72, 100]), [100, 0]);
        assert_eq!(loads(&[71, 100]), [99, 1]);
        assert_eq!(loads(&[50, 100]), [70, 30]);
        assert_eq!(loads(&[25, 100]), [35, 65]);
        assert_eq!(loads(&[0, 100]), [0, 100]);
    }

    #[test]
    fn envoy_doc_three_priorities() {
        // Envoy's three-level table (P0 / P1 / P2 healthy -> traffic).
        assert_eq!(loads(&[100, 100, 100]), [100, 0, 0]);
        assert_eq!(loads(&[72, 72, 100]), [100, 0, 0]);
        assert_eq!(loads(&[71, 71, 100]), [99, 1, 0]);
        assert_eq!(loads(&[50, 50, 100]), [70, 30, 0]);
        assert_eq!(loads(&[25, 100, 100]), [35, 65, 0]);
        assert_eq!(loads(&[25, 25, 100]), [35, 35, 30]);
        // The doc's last row says 36 / 36 / 28; Envoy's code (and weir) computes health
        // 35 / 35 / 28, normalized total 98, loads 35 / 35 / 28 and gives the 2% rounding
        // leftover to the first available level. The doc ignores panic; with the default
        // threshold all three levels (25%, 25%, 20% healthy) are in panic.
        assert_eq!(compute(&pct(&[25, 25, 20]), 0.0).load, [37, 35, 28]);
        assert_eq!(loads(&[25, 25, 20]), [34, 33, 33]);
        assert_eq!(loads(&[0, 0, 100]), [0, 0, 100]);
    }

    #[test]
    fn envoy_doc_two_degraded_priorities() {
        // Envoy's second two-level table (both levels losing hosts).
        assert_eq!(loads(&[100, 100]), [100, 0]);
        assert_eq!(loads(&[72, 72]), [100, 0]);
        assert_eq!(loads(&[71, 71]), [99, 1]);
        assert_eq!(loads(&[50, 50]), [70, 30]);
        assert_eq!(loads(&[25, 100]), [35, 65]);
        assert_eq!(loads(&[25, 25]), [50, 50]);
    }

    #[test]
    fn envoy_doc_normalization_example() {
        // "health scores {20, 30} (normalized total 50) -> priority load {40%, 60%}".
        let lv = [
            LevelCounts {
                total: 7,
                healthy: 1,
            },
            LevelCounts {
                total: 14,
                healthy: 3,
            },
        ];
        let r = compute(&lv, 0.0);
        assert_eq!(r.health, [20, 30]);
        assert_eq!(r.load, [40, 60]);
    }

    #[test]
    fn normalization_below_100() {
        // Envoy's normalization example: 20% healthy P0, 20% healthy P1 ->
        // health 28 / 28, normalized total 56 -> 50 / 50.
        let r = compute(&pct(&[20, 20]), 50.0);
        assert_eq!(r.health, [28, 28]);
        assert_eq!(r.load, [50, 50]);
        // Rounding leftovers go to the first available level: 10/10/10 -> 14 each, 42 total,
        // 33/33/33 + 1 to P0.
        assert_eq!(compute(&pct(&[10, 10, 10]), 0.0).load, [34, 33, 33]);
    }

    #[test]
    fn panic_per_level_only_below_full_availability() {
        // Normalized total 100: no level is in panic even at 25% healthy.
        let r = compute(&pct(&[25, 100]), 50.0);
        assert_eq!(r.panic, [false, false]);
        // Total below 100: P0 at 20% healthy is in panic, P1 at 60% is not.
        let r = compute(&pct(&[20, 60]), 50.0);
        assert_eq!(r.health, [28, 84]);
        assert_eq!(r.normalized_sum(), 100);
        assert_eq!(r.panic, [false, false], "28 + 84 >= 100: no panic");
        let r = compute(&pct(&[20, 40]), 50.0);
        assert_eq!(r.health, [28, 56]);
        // 20% and 40% healthy are both below 50%: total panic, load by host count.
        assert_eq!(r.panic, [true, true]);
        assert_eq!(r.load, [50, 50]);
        // With threshold 30 only P0 panics; load follows health (28 / 56 of 84).
        let r = compute(&pct(&[20, 40]), 30.0);
        assert_eq!(r.panic, [true, false]);
        assert_eq!(r.load, [34, 66]);
    }

    #[test]
    fn total_panic_spreads_by_host_count() {
        // One level at 40% healthy: panic (40 < 50); load stays on P0 (its only level).
        let r = compute(&pct(&[40]), 50.0);
        assert_eq!(r.load, [100]);
        assert_eq!(r.panic, [true]);
        // Two levels, both in panic: load by host count (1 host vs 3 hosts -> 25 / 75).
        let lv = [
            LevelCounts {
                total: 1,
                healthy: 0,
            },
            LevelCounts {
                total: 3,
                healthy: 1,
            },
        ];
        let r = compute(&lv, 50.0);
        assert_eq!(r.panic, [true, true]);
        assert_eq!(r.load, [25, 75]);
        // Nothing healthy at all, default threshold: total panic by host count.
        let r = compute(&pct(&[0, 0]), 50.0);
        assert_eq!(r.load, [50, 50]);
        assert!(!r.none_available);
    }

    #[test]
    fn threshold_zero_disables_panic() {
        let r = compute(&pct(&[0, 0]), 0.0);
        assert!(r.none_available);
        let r = compute(&pct(&[10, 0]), 0.0);
        assert_eq!(r.panic, [false, false]);
        assert_eq!(r.load, [100, 0]);
        // Threshold 100: any level below 100% healthy (with total < 100) panics.
        let r = compute(&pct(&[30, 30]), 100.0);
        assert_eq!(r.panic, [true, true]);
    }

    #[test]
    fn weightless_edge_cases() {
        assert!(compute(&[], 50.0).none_available);
        // An empty level between two others gets nothing.
        let lv = [
            LevelCounts {
                total: 10,
                healthy: 5,
            },
            LevelCounts::default(),
            LevelCounts {
                total: 10,
                healthy: 10,
            },
        ];
        assert_eq!(compute(&lv, 50.0).load, [70, 0, 30]);
    }

    #[test]
    fn choose_by_cumulative_load() {
        let load = [70, 0, 30];
        assert_eq!(choose(&load, 0), Some(0));
        assert_eq!(choose(&load, 69), Some(0));
        assert_eq!(choose(&load, 70), Some(2));
        assert_eq!(choose(&load, 199), Some(2));
        assert_eq!(choose(&[0, 0], 5), None);
        // Every level with load is reachable, none without.
        for h in 0..100 {
            assert_ne!(choose(&load, h), Some(1));
        }
    }

    #[test]
    fn loads_always_sum_to_100() {
        for a in 0..=10u64 {
            for b in 0..=10u64 {
                for c in 0..=10u64 {
                    let lv = [
                        LevelCounts {
                            total: 10,
                            healthy: a,
                        },
                        LevelCounts {
                            total: 10,
                            healthy: b,
                        },
                        LevelCounts {
                            total: 10,
                            healthy: c,
                        },
                    ];
                    for th in [0.0, 50.0, 100.0] {
                        let r = compute(&lv, th);
                        if !r.none_available {
                            assert_eq!(r.load.iter().sum::<u32>(), 100, "{a} {b} {c} {th}");
                        }
                    }
                }
            }
        }
    }

    impl PriorityLoad {
        fn normalized_sum(&self) -> u32 {
            self.health.iter().sum::<u32>().min(100)
        }
    }
}
