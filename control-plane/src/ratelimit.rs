//! Request-rate limits for weir-cp's APIs (`limits:` in the settings file): one token bucket
//! per client address, shared by the gRPC APIs (xDS, KV, registry, objects), the HTTP config
//! API and the S3 endpoint, checked before authentication so a flood of bad credentials is
//! limited too.
//!
//! ```yaml
//! limits:
//!   requests_per_second: 50   # per client; absent or 0 = unlimited (the default)
//!   burst: 100                # bucket size; default 2 x requests_per_second (at least 1)
//! ```
//!
//! - **Key**: the peer's IP address; IPv6 clients by their /64 (one host usually owns a whole
//!   /64, so rotating addresses inside it does not buy fresh buckets). Clients behind one NAT
//!   or load balancer share a bucket. Requests without a known peer (in-process) are not
//!   limited.
//! - **What counts**: each gRPC call (a stream counts once, when it opens: messages on an ADS,
//!   watch or keep-alive stream are paced by HTTP/2 flow control, not by this limit), each
//!   HTTP API request, each S3 request. Health checks (`grpc.health.v1.Health`, `GET
//!   /healthz`) and the admission webhook (one client: the Kubernetes API server) are exempt.
//! - **Answer**: gRPC `RESOURCE_EXHAUSTED`; HTTP 429 with `retry-after`; S3 503 `SlowDown`
//!   with `retry-after` (S3's code, which AWS SDKs back off and retry on).
//! - **Memory**: buckets are governor's keyed GCRA state (one word per client); a sweeper
//!   drops every bucket that is full again each [`SWEEP_INTERVAL`], so idle clients cost
//!   nothing.
//! - Metric: `weir_cp_rate_limited_total{api="grpc"|"http"|"s3"}`.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{Either, Ready, ready};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// How often full buckets are dropped.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// `limits:` in the settings file.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Sustained requests per second per client (fractions allowed: 0.5 = one every 2 s);
    /// absent or 0: unlimited.
    #[serde(default)]
    pub requests_per_second: f64,
    /// Requests a client may send at once; default twice `requests_per_second` (at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
}

/// Invalid `limits:` values.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LimitError {
    /// Negative, not finite, or too small to express.
    #[error(
        "limits.requests_per_second must be a finite number >= 0.000001 (or 0 for no limit), got {0}"
    )]
    Rate(f64),
    /// `burst: 0`.
    #[error("limits.burst must be at least 1")]
    Burst,
}

/// Which API a request came to (the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// Any gRPC service.
    Grpc,
    /// The HTTP config API.
    Http,
    /// The S3 endpoint.
    S3,
}

impl Api {
    const ALL: [Api; 3] = [Api::Grpc, Api::Http, Api::S3];

    /// Its slot in the refusal counters.
    fn index(self) -> usize {
        self as usize
    }

    fn as_str(self) -> &'static str {
        match self {
            Api::Grpc => "grpc",
            Api::Http => "http",
            Api::S3 => "s3",
        }
    }
}

/// A refused request: when the client may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// Until the bucket holds a token again.
    pub retry_after: Duration,
}

impl Limited {
    /// `retry-after` in whole seconds (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }

    /// The gRPC status.
    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::resource_exhausted(format!(
            "rate limit exceeded: retry in {} s",
            self.retry_after_secs()
        ))
    }
}

type Keyed<C> =
    RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// The per-client limiter shared by every API (see the module docs).
#[derive(Debug)]
pub struct RequestLimiter<C: Clock = DefaultClock> {
    limiter: Option<Keyed<C>>,
    clock: C,
    limited: [AtomicU64; 3],
}

/// The bucket a client address draws from.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

fn quota(s: &LimitSettings) -> Result<Option<Quota>, LimitError> {
    let rps = s.requests_per_second;
    if s.burst == Some(0) {
        return Err(LimitError::Burst);
    }
    if rps == 0.0 {
        return Ok(None);
    }
    if !rps.is_finite() || rps < 1e-6 {
        return Err(LimitError::Rate(rps));
    }
    let period = Duration::from_secs_f64(1.0 / rps);
    let burst = s
        .burst
        .unwrap_or_else(|| (rps * 2.0).ceil().clamp(1.0, f64::from(u32::MAX)) as u32);
    let burst = NonZeroU32::new(burst).ok_or(LimitError::Burst)?;
    Quota::with_period(period)
        .map(|q| Some(q.allow_burst(burst)))
        .ok_or(LimitError::Rate(rps))
}

impl RequestLimiter<DefaultClock> {
    /// A limiter that allows everything.
    pub fn unlimited() -> Self {
        RequestLimiter {
            limiter: None,
            clock: DefaultClock::default(),
            limited: Default::default(),
        }
    }

    /// A limiter for `settings` (unlimited when no rate is set).
    pub fn new(settings: &LimitSettings) -> Result<Self, LimitError> {
        RequestLimiter::with_clock(settings, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RequestLimiter<C> {
    /// A limiter on `clock` (tests use governor's fake clock).
    pub fn with_clock(settings: &LimitSettings, clock: C) -> Result<Self, LimitError> {
        let limiter = quota(settings)?.map(|q| {
            RateLimiter::new(
                q,
                DefaultKeyedStateStore::<IpAddr>::default(),
                clock.clone(),
            )
        });
        Ok(RequestLimiter {
            limiter,
            clock,
            limited: Default::default(),
        })
    }

    /// Whether any limit applies.
    pub fn is_enabled(&self) -> bool {
        self.limiter.is_some()
    }

    /// Take one request from `peer`'s bucket, or say when to come back. No peer: allowed.
    pub fn check(&self, api: Api, peer: Option<IpAddr>) -> Result<(), Limited> {
        let (Some(l), Some(ip)) = (&self.limiter, peer) else {
            return Ok(());
        };
        match l.check_key(&client_key(ip)) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                self.limited[api.index()].fetch_add(1, Relaxed);
                let retry_after = not_until.wait_time_from(self.clock.now());
                tracing::debug!(api = api.as_str(), client = %client_key(ip),
                    retry_after_ms = retry_after.as_millis() as u64, "request rate limited");
                Err(Limited { retry_after })
            }
        }
    }

    /// Drop the buckets that are full again; how many remain.
    pub fn sweep(&self) -> usize {
        match &self.limiter {
            Some(l) => {
                l.retain_recent();
                l.shrink_to_fit();
                l.len()
            }
            None => 0,
        }
    }

    /// Refusals per API.
    pub fn limited_counts(&self) -> [(&'static str, u64); 3] {
        Api::ALL.map(|a| (a.as_str(), self.limited[a.index()].load(Relaxed)))
    }
}

impl RequestLimiter<DefaultClock> {
    /// Sweep every [`SWEEP_INTERVAL`] until `token` is cancelled (nothing when unlimited).
    pub fn spawn_sweeper(
        self: &Arc<Self>,
        token: CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if !self.is_enabled() {
            return None;
        }
        let me = self.clone();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => {
                        let n = me.sweep();
                        tracing::trace!(buckets = n, "rate limit buckets swept");
                    }
                }
            }
        }))
    }
}

impl<C: Clock + Clone + Send + Sync + std::fmt::Debug + 'static> crate::metrics::Collector
    for RequestLimiter<C>
where
    C::Instant: Send + Sync,
{
    fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        out.push_str(
            "# HELP weir_cp_rate_limited_total API requests refused by the per-client request \
             rate limit (settings limits:).\n# TYPE weir_cp_rate_limited_total counter\n",
        );
        for (api, n) in self.limited_counts() {
            let _ = writeln!(out, "weir_cp_rate_limited_total{{api=\"{api}\"}} {n}");
        }
    }
}

/// The tower layer limiting gRPC calls (outside [`crate::auth::grpc::AuthLayer`]).
#[derive(Debug, Clone)]
pub struct GrpcLimitLayer {
    limiter: Arc<RequestLimiter>,
}

impl GrpcLimitLayer {
    /// A layer checking `limiter`.
    pub fn new(limiter: Arc<RequestLimiter>) -> Self {
        GrpcLimitLayer { limiter }
    }
}

impl<S> tower_layer::Layer<S> for GrpcLimitLayer {
    type Service = GrpcLimitService<S>;

    fn layer(&self, inner: S) -> GrpcLimitService<S> {
        GrpcLimitService {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

/// [`GrpcLimitLayer`]'s service.
#[derive(Debug, Clone)]
pub struct GrpcLimitService<S> {
    inner: S,
    limiter: Arc<RequestLimiter>,
}

/// The client address of a gRPC request (plain or TLS connection).
fn grpc_peer<B>(req: &http::Request<B>) -> Option<IpAddr> {
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
        .map(|a| a.ip())
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for GrpcLimitService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let exempt = req.uri().path().starts_with("/grpc.health.v1.Health/");
        if !exempt && let Err(l) = self.limiter.check(Api::Grpc, grpc_peer(&req)) {
            return Either::Left(ready(Ok(l.to_status().into_http())));
        }
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limiter(
        rps: f64,
        burst: Option<u32>,
    ) -> (RequestLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let l = RequestLimiter::with_clock(
            &LimitSettings {
                requests_per_second: rps,
                burst,
            },
            clock.clone(),
        )
        .expect("valid");
        (l, clock)
    }

    const A: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1)));
    const B: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2)));

    #[test]
    fn burst_then_the_sustained_rate_per_client() {
        let (l, clock) = limiter(2.0, Some(3));
        for _ in 0..3 {
            assert!(l.check(Api::Grpc, A).is_ok());
        }
        let e = l.check(Api::Http, A).expect_err("bucket empty");
        assert_eq!(e.retry_after, Duration::from_millis(500));
        assert_eq!(e.retry_after_secs(), 1);
        // Another client has its own bucket; no peer is never limited.
        assert!(l.check(Api::Grpc, B).is_ok());
        assert!(l.check(Api::Grpc, None).is_ok());
        // 2/s: one token back every 500 ms.
        clock.advance(Duration::from_millis(499));
        assert!(l.check(Api::S3, A).is_err());
        clock.advance(Duration::from_millis(1));
        assert!(l.check(Api::S3, A).is_ok());
        assert!(l.check(Api::S3, A).is_err());
        assert_eq!(l.limited_counts(), [("grpc", 0), ("http", 1), ("s3", 2)]);
        // After a long pause the bucket is full (3), not more.
        clock.advance(Duration::from_secs(60));
        for _ in 0..3 {
            assert!(l.check(Api::Grpc, A).is_ok());
        }
        assert!(l.check(Api::Grpc, A).is_err());
    }

    #[test]
    fn full_buckets_are_swept() {
        let (l, clock) = limiter(10.0, None);
        assert!(l.check(Api::Grpc, A).is_ok());
        assert!(l.check(Api::Grpc, B).is_ok());
        assert_eq!(l.sweep(), 2);
        clock.advance(Duration::from_secs(5));
        assert_eq!(l.sweep(), 0);
    }

    #[test]
    fn fractional_rates_default_bursts_and_bad_values() {
        // 0.5/s: default burst 1, then one every 2 s.
        let (l, clock) = limiter(0.5, None);
        assert!(l.check(Api::Grpc, A).is_ok());
        let e = l.check(Api::Grpc, A).expect_err("limited");
        assert_eq!(e.retry_after, Duration::from_secs(2));
        clock.advance(Duration::from_secs(2));
        assert!(l.check(Api::Grpc, A).is_ok());
        // Unlimited by default.
        let (l, _) = limiter(0.0, None);
        assert!(!l.is_enabled());
        assert!((0..10_000).all(|_| l.check(Api::Grpc, A).is_ok()));
        let bad = |rps: f64, burst: Option<u32>| {
            RequestLimiter::new(&LimitSettings {
                requests_per_second: rps,
                burst,
            })
            .err()
        };
        assert_eq!(bad(-1.0, None), Some(LimitError::Rate(-1.0)));
        assert!(matches!(bad(f64::NAN, None), Some(LimitError::Rate(_))));
        assert_eq!(bad(1e-9, None), Some(LimitError::Rate(1e-9)));
        assert_eq!(bad(5.0, Some(0)), Some(LimitError::Burst));
        assert_eq!(bad(0.0, Some(0)), Some(LimitError::Burst));
        assert_eq!(bad(5.0, Some(7)), None);
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), A.unwrap());
        let (l, _) = limiter(1.0, Some(1));
        assert!(l.check(Api::Grpc, Some(a)).is_ok());
        assert!(l.check(Api::Grpc, Some(b)).is_err());
        assert!(l.check(Api::Grpc, Some(c)).is_ok());
    }
}
