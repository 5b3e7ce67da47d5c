//! KV auto-compaction (`serve --kv-auto-compaction-retention`), after etcd's
//! `--auto-compaction-mode` / `--auto-compaction-retention`:
//!
//! - **revision** (`N`, a plain number): every [`REVISION_INTERVAL`] (5 minutes, as etcd),
//!   compact to `current revision - N` — the last N revisions stay readable and watchable.
//! - **periodic** (a duration such as `1h`, `30m`, `90s`): sample the current revision every
//!   `retention / 10` (at most hourly, at least every second, as etcd) and compact to the
//!   newest revision sampled at least `retention` ago — history younger than the
//!   retention stays.
//!
//! The policy ([`Compactor`]) is pure (time and revisions passed in) so it is unit-tested
//! without a clock; [`spawn`] drives it against any [`KvBackend`]. With `--store etcd`
//! every replica runs it; a compaction another replica already did fails with `Compacted`,
//! which is ignored.

use std::collections::VecDeque;
use std::sync::Weak;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{KvBackend, KvError, pb};

/// How often the revision mode compacts (etcd's 5 minutes).
pub const REVISION_INTERVAL: Duration = Duration::from_secs(300);

/// What to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// The last N revisions.
    Revisions(i64),
    /// The history of this long.
    Period(Duration),
}

impl std::str::FromStr for Retention {
    type Err = String;

    /// `N` (revisions) or a duration `Nh|Nm|Ns|Nms`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(n) = s.parse::<i64>() {
            return if n > 0 {
                Ok(Retention::Revisions(n))
            } else {
                Err("the revision retention must be positive".into())
            };
        }
        let (num, unit) = s
            .find(|c: char| !c.is_ascii_digit())
            .map(|i| s.split_at(i))
            .ok_or_else(|| format!("bad retention {s:?}"))?;
        let n: u64 = num.parse().map_err(|_| format!("bad retention {s:?}"))?;
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            _ => {
                return Err(format!(
                    "bad retention {s:?}: a revision count or a duration (h, m, s, ms)"
                ));
            }
        };
        if d.is_zero() {
            return Err("the retention period must be positive".into());
        }
        Ok(Retention::Period(d))
    }
}

/// The compaction policy: fed the current revision at each tick, says what to compact to.
#[derive(Debug)]
pub struct Compactor {
    retention: Retention,
    samples: VecDeque<(Instant, i64)>,
    last: i64,
}

impl Compactor {
    /// A policy keeping `retention`.
    pub fn new(retention: Retention) -> Self {
        Compactor {
            retention,
            samples: VecDeque::new(),
            last: 0,
        }
    }

    /// Time between ticks.
    pub fn interval(&self) -> Duration {
        match self.retention {
            Retention::Revisions(_) => REVISION_INTERVAL,
            Retention::Period(d) => {
                (d / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600))
            }
        }
    }

    /// One tick at `now` with the store at `current`: the revision to compact to, if any.
    pub fn tick(&mut self, now: Instant, current: i64) -> Option<i64> {
        let target = match self.retention {
            Retention::Revisions(n) => current - n,
            Retention::Period(d) => {
                self.samples.push_back((now, current));
                // The newest sample at least `d` old; older ones are no longer needed.
                let mut target = None;
                while let Some(&(t, rev)) = self.samples.front() {
                    if now.saturating_duration_since(t) >= d {
                        target = Some((t, rev));
                        self.samples.pop_front();
                    } else {
                        break;
                    }
                }
                // Keep it as the floor for the next tick.
                let (t, rev) = target?;
                self.samples.push_front((t, rev));
                rev
            }
        };
        if target > self.last && target > 0 {
            self.last = target;
            Some(target)
        } else {
            None
        }
    }
}

/// The current revision of `kv` (a count-only read of one key).
async fn current_revision<K: KvBackend>(kv: &K) -> Result<i64, KvError> {
    let r = kv
        .range(pb::RangeRequest {
            key: vec![0],
            count_only: true,
            ..Default::default()
        })
        .await?;
    Ok(r.header.map_or(0, |h| h.revision))
}

/// Run the policy against `kv` until `token` is cancelled or `kv` is dropped; `interval`
/// overrides the policy's tick (tests).
pub fn spawn<K: KvBackend>(
    kv: Weak<K>,
    retention: Retention,
    interval: Option<Duration>,
    token: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut policy = Compactor::new(retention);
        let every = interval.unwrap_or_else(|| policy.interval());
        loop {
            let Some(kv) = kv.upgrade() else { return };
            match current_revision(&*kv).await {
                Ok(current) => {
                    if let Some(rev) = policy.tick(Instant::now(), current) {
                        match kv.compact(pb::CompactionRequest { revision: rev }).await {
                            Ok(_) => tracing::info!(revision = rev, "KV auto-compaction"),
                            Err(KvError::Compacted { .. }) => {} // another replica did it
                            Err(e) => tracing::warn!(revision = rev, "KV auto-compaction: {e}"),
                        }
                    }
                }
                Err(e) => tracing::warn!("KV auto-compaction: reading the revision: {e}"),
            }
            drop(kv);
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_retention() {
        assert_eq!("100".parse(), Ok(Retention::Revisions(100)));
        assert_eq!(
            "1h".parse(),
            Ok(Retention::Period(Duration::from_secs(3600)))
        );
        assert_eq!(
            "30m".parse(),
            Ok(Retention::Period(Duration::from_secs(1800)))
        );
        assert_eq!(
            "250ms".parse(),
            Ok(Retention::Period(Duration::from_millis(250)))
        );
        for bad in ["0", "-5", "0s", "10x", "h", ""] {
            assert!(bad.parse::<Retention>().is_err(), "{bad}");
        }
    }

    #[test]
    fn revision_mode_keeps_the_last_n() {
        let mut c = Compactor::new(Retention::Revisions(10));
        assert_eq!(c.interval(), REVISION_INTERVAL);
        let t = Instant::now();
        assert_eq!(c.tick(t, 5), None, "fewer than N revisions");
        assert_eq!(c.tick(t, 10), None);
        assert_eq!(c.tick(t, 25), Some(15));
        assert_eq!(c.tick(t, 25), None, "nothing new");
        assert_eq!(c.tick(t, 40), Some(30));
    }

    #[test]
    fn periodic_mode_compacts_what_is_older_than_the_period() {
        let d = Duration::from_secs(100);
        let mut c = Compactor::new(Retention::Period(d));
        assert_eq!(c.interval(), Duration::from_secs(10));
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(c.tick(t0, 5), None);
        assert_eq!(c.tick(t0 + s(50), 20), None);
        assert_eq!(c.tick(t0 + s(99), 30), None, "nothing is 100 s old yet");
        // At 100 s the revision sampled at 0 s is the floor.
        assert_eq!(c.tick(t0 + s(100), 40), Some(5));
        assert_eq!(
            c.tick(t0 + s(120), 45),
            None,
            "the 50 s sample is not old yet"
        );
        assert_eq!(c.tick(t0 + s(160), 50), Some(20));
        // A long pause: the newest sample older than the period wins.
        assert_eq!(c.tick(t0 + s(1000), 60), Some(50));
        assert_eq!(
            Compactor::new(Retention::Period(s(5))).interval(),
            s(1),
            "at least a second"
        );
        assert_eq!(
            Compactor::new(Retention::Period(s(100 * 3600))).interval(),
            s(3600),
            "at most an hour"
        );
    }
}
