//! Ketama ring (Envoy's `RingHashLoadBalancer::Ring`) and Maglev table (Envoy's
//! `OriginalMaglevTable`), built once per host set and priority level and shared by every
//! worker through an `Arc`.
//!
//! Both are built over *all* hosts of a level; at pick time an entry whose host is not
//! eligible (unhealthy outside panic) is skipped by walking forward. For the ring this is
//! exactly what removing the host's points would do (the key lands on the next point
//! clockwise); for Maglev it sends the key to a pseudo-random other host, which keeps the
//! other keys where they were.

use super::xxhash::{xxhash64, xxhash64_seed};

/// One host to place: its index in the host set, its key prefix (the address as
/// `ip:port`, as Envoy's `address()->asString()`), and its weight.
#[derive(Debug, Clone)]
pub struct Member {
    /// Index in `HostSet::hosts`.
    pub index: usize,
    /// Hash key prefix.
    pub key: String,
    /// Weight (>= 1).
    pub weight: u64,
}

/// A ketama ring: `(hash, host index)` sorted by hash.
#[derive(Debug, Default)]
pub struct Ring {
    entries: Vec<(u64, usize)>,
}

impl Ring {
    /// Build as Envoy does: weights are normalized to sum 1, the scale makes the lightest host
    /// get `ceil(min_w * min_ring_size)` points (capped at `max_ring_size` in total), and each
    /// host gets points `xxhash64("<key>_<i>")` for `i` in `0..` while the running total of
    /// placed points is below the running target.
    pub fn build(members: &[Member], min_ring_size: u64, max_ring_size: u64) -> Ring {
        let total: u64 = members.iter().map(|m| m.weight).sum();
        if members.is_empty() || total == 0 {
            return Ring::default();
        }
        let min_w = members
            .iter()
            .map(|m| m.weight as f64 / total as f64)
            .fold(f64::INFINITY, f64::min);
        let scale = ((min_w * min_ring_size as f64).ceil() / min_w).min(max_ring_size as f64);
        let ring_size = scale.ceil() as usize;
        let mut entries = Vec::with_capacity(ring_size);
        let mut current = 0.0f64;
        let mut target = 0.0f64;
        let mut key = String::new();
        for m in members {
            target += scale * (m.weight as f64 / total as f64);
            let mut i = 0u64;
            while current < target {
                key.clear();
                key.push_str(&m.key);
                key.push('_');
                key.push_str(&i.to_string());
                entries.push((xxhash64(key.as_bytes()), m.index));
                i += 1;
                current += 1.0;
            }
        }
        entries.sort_unstable_by_key(|e| e.0);
        Ring { entries }
    }

    /// Number of points.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No points.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The first point whose hash is >= `hash` (wrapping to 0), offset by `attempt`
    /// (Envoy: a retry re-pick behaves as if the host at that point were not on the ring),
    /// then walking forward while `eligible` says no. `None` if no point is eligible.
    pub fn pick(&self, hash: u64, attempt: u32, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.entries.len();
        if n == 0 {
            return None;
        }
        let mut at = self.entries.partition_point(|e| e.0 < hash);
        if at == n {
            at = 0;
        }
        at = (at + attempt as usize) % n;
        (0..n)
            .map(|k| self.entries[(at + k) % n].1)
            .find(|i| eligible(*i))
    }

    /// Points per host index (tests, debugging).
    #[cfg(test)]
    pub fn counts(&self, hosts: usize) -> Vec<usize> {
        let mut c = vec![0; hosts];
        for e in &self.entries {
            c[e.1] += 1;
        }
        c
    }
}

/// A Maglev lookup table of host indices.
#[derive(Debug, Default)]
pub struct Maglev {
    table: Vec<usize>,
}

impl Maglev {
    /// Build Envoy's weighted Maglev table of `table_size` (a prime) entries: each host's
    /// permutation is `offset = xxhash64(key) % M`, `skip = xxhash64(key, seed 1) % (M-1) + 1`;
    /// hosts take turns filling their next free preferred slot, a host of normalized weight `w`
    /// taking a turn every `max_w / w` rounds.
    pub fn build(members: &[Member], table_size: u64) -> Maglev {
        let total: u64 = members.iter().map(|m| m.weight).sum();
        if members.is_empty() || total == 0 || table_size < 2 {
            return Maglev::default();
        }
        let m = table_size as usize;
        struct Entry {
            index: usize,
            offset: u64,
            skip: u64,
            weight: f64,
            target: f64,
            next: u64,
        }
        let mut entries: Vec<Entry> = members
            .iter()
            .map(|mb| Entry {
                index: mb.index,
                offset: xxhash64(mb.key.as_bytes()) % table_size,
                skip: xxhash64_seed(mb.key.as_bytes(), 1) % (table_size - 1) + 1,
                weight: mb.weight as f64 / total as f64,
                target: 0.0,
                next: 0,
            })
            .collect();
        let max_w = entries.iter().map(|e| e.weight).fold(0.0, f64::max);
        let mut table: Vec<Option<usize>> = vec![None; m];
        let mut filled = 0usize;
        let mut iteration = 1u64;
        while filled < m {
            for e in entries.iter_mut() {
                if filled == m {
                    break;
                }
                if (iteration as f64) * e.weight < e.target {
                    continue;
                }
                e.target += max_w;
                let mut c = ((e.offset + e.skip * e.next) % table_size) as usize;
                while table[c].is_some() {
                    e.next += 1;
                    c = ((e.offset + e.skip * e.next) % table_size) as usize;
                }
                table[c] = Some(e.index);
                e.next += 1;
                filled += 1;
            }
            iteration += 1;
        }
        Maglev {
            table: table.into_iter().flatten().collect(),
        }
    }

    /// Table size.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Empty table.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// `table[hash % M]`; a re-pick (`attempt > 0`) mutates the hash as Envoy does
    /// (`hash ^= !0 - attempt + 1`); ineligible entries are skipped by walking forward.
    pub fn pick(&self, hash: u64, attempt: u32, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.table.len();
        if n == 0 {
            return None;
        }
        let h = if attempt > 0 {
            hash ^ (u64::MAX - u64::from(attempt) + 1)
        } else {
            hash
        };
        let at = (h % n as u64) as usize;
        (0..n)
            .map(|k| self.table[(at + k) % n])
            .find(|i| eligible(*i))
    }

    /// Entries per host index (tests, debugging).
    #[cfg(test)]
    pub fn counts(&self, hosts: usize) -> Vec<usize> {
        let mut c = vec![0; hosts];
        for i in &self.table {
            c[*i] += 1;
        }
        c
    }
}

/// Whether `n` is prime (Maglev table sizes must be).
pub fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u64;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(weights: &[u64]) -> Vec<Member> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| Member {
                index: i,
                key: format!("10.0.0.{}:80", i + 1),
                weight: *w,
            })
            .collect()
    }

    /// Keys 0..n hashed like request hashes.
    fn keys(n: u64) -> impl Iterator<Item = u64> {
        (0..n).map(|k| xxhash64(format!("key-{k}").as_bytes()))
    }

    #[test]
    fn ring_sizes_follow_envoy() {
        // Equal weights: scale = ceil(1/4 * 1024) / (1/4) = 1024 points, 256 each.
        let r = Ring::build(&members(&[1, 1, 1, 1]), 1024, 8 * 1024 * 1024);
        assert_eq!(r.len(), 1024);
        assert_eq!(r.counts(4), [256, 256, 256, 256]);
        // Weights 1:3: the light host gets ceil(0.25 * 1024) = 256, the heavy one 768.
        let r = Ring::build(&members(&[1, 3]), 1024, 8 * 1024 * 1024);
        assert_eq!(r.counts(2), [256, 768]);
        // Capped by maximum_ring_size.
        let r = Ring::build(&members(&[1, 1]), 1024, 100);
        assert_eq!(r.len(), 100);
        assert!(Ring::build(&[], 1024, 2048).is_empty());
    }

    #[test]
    fn ring_distribution_is_weighted() {
        let r = Ring::build(&members(&[1, 2, 5]), 1024, 8 << 20);
        let mut c = [0usize; 3];
        for k in keys(80_000) {
            c[r.pick(k, 0, |_| true).expect("host")] += 1;
        }
        for (i, w) in [1.0, 2.0, 5.0].iter().enumerate() {
            let share = c[i] as f64 / 80_000.0;
            assert!((share - w / 8.0).abs() < 0.04, "{c:?}");
        }
    }

    #[test]
    fn ring_is_sticky_and_minimally_disrupted() {
        let n = 5;
        let all = members(&[1; 5]);
        let ring = Ring::build(&all, 1024, 8 << 20);
        let ks: Vec<u64> = keys(10_000).collect();
        let before: Vec<usize> = ks
            .iter()
            .map(|k| ring.pick(*k, 0, |_| true).expect("host"))
            .collect();
        // Same key, same host, every time.
        for (k, b) in ks.iter().zip(&before) {
            assert_eq!(ring.pick(*k, 0, |_| true), Some(*b));
        }
        // Host 2 leaves (skipped as ineligible): only its keys move.
        let moved = ks
            .iter()
            .zip(&before)
            .filter(|(k, b)| ring.pick(**k, 0, |i| i != 2) != Some(**b))
            .count();
        let owned = before.iter().filter(|b| **b == 2).count();
        assert_eq!(moved, owned);
        assert!((moved as f64) < 2.0 * ks.len() as f64 / n as f64, "{moved}");
        // Host 2 removed from the config and the ring rebuilt: about 1/N keys move too.
        let rest: Vec<Member> = all.iter().filter(|m| m.index != 2).cloned().collect();
        let rebuilt = Ring::build(&rest, 1024, 8 << 20);
        let moved = ks
            .iter()
            .zip(&before)
            .filter(|(k, b)| rebuilt.pick(**k, 0, |_| true) != Some(**b))
            .count();
        assert!((moved as f64) < 2.0 * ks.len() as f64 / n as f64, "{moved}");
    }

    #[test]
    fn ring_reselect_moves_on() {
        let r = Ring::build(&members(&[1, 1, 1]), 1024, 8 << 20);
        let k = xxhash64(b"x");
        let first = r.pick(k, 0, |_| true);
        assert_eq!(r.pick(k, 0, |_| true), first);
        // Some attempt offset lands on another host.
        assert!((1..50).any(|a| r.pick(k, a, |_| true) != first));
        assert_eq!(r.pick(k, 0, |_| false), None);
    }

    #[test]
    fn maglev_table_is_full_and_weighted() {
        let t = Maglev::build(&members(&[1, 1, 1]), 65537);
        assert_eq!(t.len(), 65537);
        let c = t.counts(3);
        for x in &c {
            assert!((*x as i64 - 65537 / 3).abs() <= 1, "{c:?}");
        }
        let t = Maglev::build(&members(&[1, 3]), 65537);
        let c = t.counts(2);
        let share = c[1] as f64 / 65537.0;
        assert!((share - 0.75).abs() < 0.01, "{c:?}");
        assert!(Maglev::build(&[], 65537).is_empty());
    }

    #[test]
    fn maglev_is_sticky_and_minimally_disrupted() {
        let n = 5;
        let all = members(&[1; 5]);
        let t = Maglev::build(&all, 65537);
        let ks: Vec<u64> = keys(10_000).collect();
        let before: Vec<usize> = ks
            .iter()
            .map(|k| t.pick(*k, 0, |_| true).expect("host"))
            .collect();
        let rest: Vec<Member> = all.iter().filter(|m| m.index != 2).cloned().collect();
        let rebuilt = Maglev::build(&rest, 65537);
        let moved = ks
            .iter()
            .zip(&before)
            .filter(|(k, b)| rebuilt.pick(**k, 0, |_| true) != Some(**b))
            .count();
        assert!((moved as f64) < 2.0 * ks.len() as f64 / n as f64, "{moved}");
        // Skipping an ineligible host moves only its keys.
        let moved = ks
            .iter()
            .zip(&before)
            .filter(|(k, b)| t.pick(**k, 0, |i| i != 2) != Some(**b))
            .count();
        assert_eq!(moved, before.iter().filter(|b| **b == 2).count());
        // Re-picks mutate the hash.
        let k = ks[0];
        assert!((1..20).any(|a| t.pick(k, a, |_| true) != Some(before[0])));
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537));
        assert!(is_prime(2));
        assert!(is_prime(5_000_011));
        assert!(!is_prime(65536));
        assert!(!is_prime(1));
        assert!(!is_prime(9));
    }
}
