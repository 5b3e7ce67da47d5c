//! Envoy's `TokenBucket` (`max_tokens`, `tokens_per_fill`, `fill_interval`) on governor's GCRA
//! limiter: lock-free (one atomic compare-and-swap per check), shared by all workers, starting
//! full. Refill is continuous at `tokens_per_fill / fill_interval` (as Envoy's atomic token
//! bucket), capped at `max_tokens`. Generic over the clock so tests use
//! [`governor::clock::FakeRelativeClock`].

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use weir_xds_api::pb::envoy::r#type::v3 as tpb;

use crate::config::{ConfigErrors, duration, join};

/// A validated `TokenBucket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketSpec {
    /// `max_tokens` (burst).
    pub max_tokens: u32,
    /// `tokens_per_fill` (default 1).
    pub tokens_per_fill: u32,
    /// `fill_interval`.
    pub fill_interval: Duration,
}

impl BucketSpec {
    /// Translate a `TokenBucket` at `path`. `fill_interval` must be at least `min_fill`
    /// (Envoy: 50 ms for the HTTP filter).
    pub fn translate(
        tb: &tpb::TokenBucket,
        path: &str,
        min_fill: Duration,
        errs: &mut ConfigErrors,
    ) -> Option<BucketSpec> {
        errs.reject_unsupported(
            tb,
            &["max_tokens", "tokens_per_fill", "fill_interval"],
            path,
        );
        let before = errs.len();
        if tb.max_tokens == 0 {
            errs.add(join(path, "max_tokens"), "must be greater than 0");
        }
        let tokens_per_fill = tb.tokens_per_fill.map(|v| v.value).unwrap_or(1);
        if tokens_per_fill == 0 {
            errs.add(join(path, "tokens_per_fill"), "must be greater than 0");
        }
        let fill_interval = match &tb.fill_interval {
            Some(d) => duration(d, &join(path, "fill_interval"), errs),
            None => {
                errs.add(join(path, "fill_interval"), "fill_interval is required");
                Duration::ZERO
            }
        };
        if tb.fill_interval.is_some() && fill_interval < min_fill.max(Duration::from_nanos(1)) {
            errs.add(
                join(path, "fill_interval"),
                format!("must be at least {min_fill:?}"),
            );
        }
        (errs.len() == before).then_some(BucketSpec {
            max_tokens: tb.max_tokens,
            tokens_per_fill,
            fill_interval,
        })
    }

    /// Time to earn one token.
    fn period(&self) -> Duration {
        (self.fill_interval / self.tokens_per_fill.max(1)).max(Duration::from_nanos(1))
    }

    /// Tokens per second (for ordering descriptors by fill rate, as Envoy does).
    pub fn fill_rate(&self) -> f64 {
        f64::from(self.tokens_per_fill) / self.fill_interval.as_secs_f64().max(1e-9)
    }
}

/// The outcome of taking one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Consumed {
    /// Whether a token was available (and taken).
    pub allowed: bool,
    /// Tokens left after this request.
    pub remaining: u32,
    /// Time until the bucket is full again (`x-ratelimit-reset`).
    pub reset: Duration,
}

/// A token bucket shared by all workers.
pub struct TokenBucket<C: Clock = DefaultClock> {
    spec: BucketSpec,
    limiter: RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>,
    clock: C,
}

impl<C: Clock> std::fmt::Debug for TokenBucket<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenBucket")
            .field("spec", &self.spec)
            .finish()
    }
}

impl TokenBucket<DefaultClock> {
    /// A full bucket on the real clock.
    pub fn new(spec: BucketSpec) -> Self {
        Self::with_clock(spec, DefaultClock::default())
    }
}

impl<C: Clock + Clone> TokenBucket<C> {
    /// A full bucket on `clock`.
    pub fn with_clock(spec: BucketSpec, clock: C) -> Self {
        let burst = NonZeroU32::new(spec.max_tokens).unwrap_or(NonZeroU32::MIN);
        // `period` is never zero, so `with_period` always succeeds; fall back to a
        // one-per-second quota rather than panic.
        let quota = Quota::with_period(spec.period())
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        let limiter = RateLimiter::direct_with_clock(quota, clock.clone())
            .with_middleware::<StateInformationMiddleware>();
        Self {
            spec,
            limiter,
            clock,
        }
    }

    /// The bucket's configuration.
    pub fn spec(&self) -> &BucketSpec {
        &self.spec
    }

    /// Take one token if there is one.
    pub fn consume(&self) -> Consumed {
        let period = self.spec.period();
        match self.limiter.check() {
            Ok(snap) => {
                let remaining = snap.remaining_burst_capacity();
                Consumed {
                    allowed: true,
                    remaining,
                    reset: period * self.spec.max_tokens.saturating_sub(remaining),
                }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Consumed {
                    allowed: false,
                    remaining: 0,
                    reset: wait + period * self.spec.max_tokens.saturating_sub(1),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn spec(max: u32, per_fill: u32, fill: Duration) -> BucketSpec {
        BucketSpec {
            max_tokens: max,
            tokens_per_fill: per_fill,
            fill_interval: fill,
        }
    }

    #[test]
    fn starts_full_refills_and_caps() {
        let clock = FakeRelativeClock::default();
        let b = TokenBucket::with_clock(spec(3, 1, Duration::from_secs(1)), clock.clone());
        let r: Vec<_> = (0..4).map(|_| b.consume()).collect();
        assert!(r[..3].iter().all(|c| c.allowed));
        assert_eq!(
            r.iter().map(|c| c.remaining).collect::<Vec<_>>(),
            [2, 1, 0, 0]
        );
        assert!(!r[3].allowed);
        assert_eq!(r[0].reset, Duration::from_secs(1));
        assert_eq!(r[3].reset, Duration::from_secs(3));
        clock.advance(Duration::from_millis(999));
        assert!(!b.consume().allowed);
        clock.advance(Duration::from_millis(1));
        assert!(b.consume().allowed);
        assert!(!b.consume().allowed);
        // A long pause refills to max_tokens, not beyond.
        clock.advance(Duration::from_secs(60));
        assert_eq!((0..5).filter(|_| b.consume().allowed).count(), 3);
    }

    #[test]
    fn tokens_per_fill_sets_the_rate() {
        let clock = FakeRelativeClock::default();
        let b = TokenBucket::with_clock(spec(10, 5, Duration::from_secs(1)), clock.clone());
        assert_eq!((0..20).filter(|_| b.consume().allowed).count(), 10);
        clock.advance(Duration::from_secs(1));
        assert_eq!((0..20).filter(|_| b.consume().allowed).count(), 5);
        assert_eq!(b.spec().fill_rate(), 5.0);
    }

    #[test]
    fn translation() {
        let mut errs = ConfigErrors::default();
        let tb: tpb::TokenBucket =
            weir_xds_api::from_yaml("max_tokens: 0\ntokens_per_fill: 0\nfill_interval: 0.01s\n")
                .expect("yaml");
        assert!(BucketSpec::translate(&tb, "tb", Duration::from_millis(50), &mut errs).is_none());
        let paths: Vec<_> = errs.0.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            ["tb.max_tokens", "tb.tokens_per_fill", "tb.fill_interval"]
        );
        let tb: tpb::TokenBucket =
            weir_xds_api::from_yaml("max_tokens: 5\nfill_interval: 1s\n").expect("yaml");
        let mut errs = ConfigErrors::default();
        assert_eq!(
            BucketSpec::translate(&tb, "tb", Duration::from_millis(50), &mut errs),
            Some(spec(5, 1, Duration::from_secs(1)))
        );
        let tb: tpb::TokenBucket = weir_xds_api::from_yaml("max_tokens: 5\n").expect("yaml");
        assert!(BucketSpec::translate(&tb, "tb", Duration::ZERO, &mut errs).is_none());
        assert_eq!(errs.0[0].0, "tb.fill_interval");
    }
}
