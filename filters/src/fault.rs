//! `envoy.filters.http.fault` (Envoy's `HTTPFault`), for chaos tests.
//!
//! Per request, with the settings in force (a route's or virtual host's
//! `typed_per_filter_config` replaces the listener-level ones; stats stay the filter's):
//! 1. `headers` must match, else nothing happens.
//! 2. Response rate limit (`response_rate_limit`: `fixed_limit.limit_kbps` KiB/s, or the
//!    `x-envoy-fault-throughput-response` header with `header_limit`), rolled against its
//!    `percentage` (header `x-envoy-fault-throughput-response-percentage` may lower it):
//!    the response body is throttled; `response_rl_injected`.
//! 3. Delay (`fixed_delay`, or `x-envoy-fault-delay-request` ms with `header_delay`), rolled
//!    against its `percentage` (`x-envoy-fault-delay-request-percentage`): the request waits
//!    (tokio time) before going on; `delays_injected`, flag `DI`.
//! 4. Abort (`http_status`, `grpc_status`, or `x-envoy-fault-abort-request` /
//!    `x-envoy-fault-abort-grpc-request` with `header_abort`), rolled against its `percentage`
//!    (`x-envoy-fault-abort-request-percentage`): a local reply (after the delay, if any)
//!    with `response_body`; a gRPC status answers HTTP 200 with `grpc-status`;
//!    `aborts_injected`, flag `FI`.
//!
//! Every fault first takes an active-fault slot: with `active_faults >= max_active_faults`
//! the fault is skipped and `faults_overflow` counts it. A request holds one slot (however
//! many faults it gets) until its response body ends.
//!
//! Header percentages follow Envoy: the header's numerator, capped at the configured one,
//! over the configured denominator. Stats: `http.<hcm stat_prefix>.fault.{delays_injected,
//! aborts_injected,faults_overflow,response_rl_injected}` and gauge `...fault.active_faults`.
//!
//! Not supported (rejected): `upstream_cluster`, `downstream_nodes`, `filter_metadata`. The
//! `*_runtime` keys are accepted and have no effect (weir has no runtime).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{HeaderName, StatusCode};
use metrics::{Counter, Gauge};
use weir_xds_api::Any;
use weir_xds_api::pb::envoy::extensions::filters::common::fault::v3 as cf;
use weir_xds_api::pb::envoy::extensions::filters::http::fault::v3 as fpb;

use crate::body::{BoxBody, Throttled};
use crate::chain::FilterContext;
use crate::config::{
    ConfigErrors, FactoryContext, Fraction, RequestMatcher, StatScope, duration, join,
};
use crate::{FilterAction, HttpFilter, HttpFilterFactory, LocalReply, type_urls};

const ABORT: HeaderName = HeaderName::from_static("x-envoy-fault-abort-request");
const ABORT_GRPC: HeaderName = HeaderName::from_static("x-envoy-fault-abort-grpc-request");
const ABORT_PCT: HeaderName = HeaderName::from_static("x-envoy-fault-abort-request-percentage");
const DELAY: HeaderName = HeaderName::from_static("x-envoy-fault-delay-request");
const DELAY_PCT: HeaderName = HeaderName::from_static("x-envoy-fault-delay-request-percentage");
const THROUGHPUT: HeaderName = HeaderName::from_static("x-envoy-fault-throughput-response");
const THROUGHPUT_PCT: HeaderName =
    HeaderName::from_static("x-envoy-fault-throughput-response-percentage");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AbortKind {
    Http(StatusCode),
    Grpc(u32),
    Header,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DelayKind {
    Fixed(Duration),
    Header,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LimitKind {
    Fixed(u64),
    Header,
}

/// Compiled fault settings (listener level or per route).
#[derive(Debug)]
pub struct FaultSettings {
    abort: Option<(AbortKind, Fraction)>,
    abort_body: bytes::Bytes,
    delay: Option<(DelayKind, Fraction)>,
    rate_limit: Option<(LimitKind, Fraction)>,
    headers: Option<Arc<dyn RequestMatcher>>,
    max_active_faults: Option<u64>,
}

/// What a request gets, decided up front.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    abort: Option<(StatusCode, Option<u32>)>,
    delay: Option<Duration>,
    /// Bytes per second.
    rate_limit: Option<u64>,
}

fn header_u64(h: &http::HeaderMap, name: &HeaderName) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// Envoy: the header numerator (capped by the configured one) over the configured denominator.
fn header_fraction(h: &http::HeaderMap, name: &HeaderName, configured: Fraction) -> Fraction {
    match header_u64(h, name) {
        Some(n) => Fraction {
            numerator: n.min(configured.numerator),
            denominator: configured.denominator,
        },
        None => configured,
    }
}

impl FaultSettings {
    /// Translate an `HTTPFault` at `path`.
    pub fn translate(
        c: &fpb::HttpFault,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<FaultSettings> {
        errs.reject_unsupported(
            c,
            &[
                "delay",
                "abort",
                "headers",
                "max_active_faults",
                "response_rate_limit",
                "delay_percent_runtime",
                "abort_percent_runtime",
                "delay_duration_runtime",
                "abort_http_status_runtime",
                "max_active_faults_runtime",
                "response_rate_limit_percent_runtime",
                "abort_grpc_status_runtime",
                "disable_downstream_cluster_stats",
            ],
            path,
        );
        let before = errs.len();
        let mut abort_body = bytes::Bytes::new();
        let abort = c.abort.as_ref().and_then(|a| {
            use fpb::fault_abort::ErrorType as E;
            let ap = join(path, "abort");
            errs.reject_unsupported(
                a,
                &[
                    "percentage",
                    "http_status",
                    "grpc_status",
                    "header_abort",
                    "response_body",
                ],
                &ap,
            );
            abort_body = bytes::Bytes::from(a.response_body.clone());
            let pct = Fraction::translate(
                a.percentage.as_ref(),
                Fraction::NONE,
                &join(&ap, "percentage"),
                errs,
            );
            let kind = match &a.error_type {
                Some(E::HttpStatus(s)) => match StatusCode::from_u16(*s as u16) {
                    Ok(st) if (200..600).contains(s) => AbortKind::Http(st),
                    _ => {
                        errs.add(join(&ap, "http_status"), "must be in 200..=599");
                        return None;
                    }
                },
                Some(E::GrpcStatus(g)) => AbortKind::Grpc(*g),
                Some(E::HeaderAbort(_)) => AbortKind::Header,
                None => {
                    errs.add(
                        &ap,
                        "one of http_status, grpc_status or header_abort is required",
                    );
                    return None;
                }
            };
            Some((kind, pct))
        });
        let delay = c.delay.as_ref().and_then(|d| {
            use cf::fault_delay::FaultDelaySecifier as D;
            let dp = join(path, "delay");
            errs.reject_unsupported(d, &["percentage", "fixed_delay", "header_delay"], &dp);
            let pct = Fraction::translate(
                d.percentage.as_ref(),
                Fraction::NONE,
                &join(&dp, "percentage"),
                errs,
            );
            let kind = match &d.fault_delay_secifier {
                Some(D::FixedDelay(fd)) => {
                    let v = duration(fd, &join(&dp, "fixed_delay"), errs);
                    if v.is_zero() {
                        errs.add(join(&dp, "fixed_delay"), "must be greater than 0");
                    }
                    DelayKind::Fixed(v)
                }
                Some(D::HeaderDelay(_)) => DelayKind::Header,
                None => {
                    errs.add(&dp, "one of fixed_delay or header_delay is required");
                    return None;
                }
            };
            Some((kind, pct))
        });
        let rate_limit = c.response_rate_limit.as_ref().and_then(|r| {
            use cf::fault_rate_limit::LimitType as L;
            let rp = join(path, "response_rate_limit");
            errs.reject_unsupported(r, &["percentage", "fixed_limit", "header_limit"], &rp);
            let pct = Fraction::translate(
                r.percentage.as_ref(),
                Fraction::NONE,
                &join(&rp, "percentage"),
                errs,
            );
            let kind = match &r.limit_type {
                Some(L::FixedLimit(f)) => {
                    if f.limit_kbps == 0 {
                        errs.add(
                            join(&rp, "fixed_limit.limit_kbps"),
                            "must be greater than 0",
                        );
                    }
                    LimitKind::Fixed(f.limit_kbps)
                }
                Some(L::HeaderLimit(_)) => LimitKind::Header,
                None => {
                    errs.add(&rp, "one of fixed_limit or header_limit is required");
                    return None;
                }
            };
            Some((kind, pct))
        });
        let headers = if c.headers.is_empty() {
            None
        } else {
            ctx.header_matchers(&c.headers, &join(path, "headers"), errs)
        };
        (errs.len() == before).then(|| FaultSettings {
            abort,
            abort_body,
            delay,
            rate_limit,
            headers,
            max_active_faults: c.max_active_faults.map(|v| u64::from(v.value)),
        })
    }

    /// Which faults this request gets (before the active-fault check). `roll` is called once
    /// per configured fault kind.
    fn plan(&self, h: &http::HeaderMap, mut roll: impl FnMut() -> u64) -> Plan {
        let mut plan = Plan::default();
        if let Some((kind, pct)) = self.rate_limit {
            let kbps = match kind {
                LimitKind::Fixed(k) => Some(k),
                LimitKind::Header => header_u64(h, &THROUGHPUT).filter(|k| *k > 0),
            };
            let pct = match kind {
                LimitKind::Fixed(_) => pct,
                LimitKind::Header => header_fraction(h, &THROUGHPUT_PCT, pct),
            };
            if let Some(k) = kbps
                && pct.hit(roll())
            {
                plan.rate_limit = Some(k.saturating_mul(1024));
            }
        }
        if let Some((kind, pct)) = self.delay {
            let d = match kind {
                DelayKind::Fixed(d) => Some(d),
                DelayKind::Header => header_u64(h, &DELAY)
                    .filter(|ms| *ms > 0)
                    .map(Duration::from_millis),
            };
            let pct = match kind {
                DelayKind::Fixed(_) => pct,
                DelayKind::Header => header_fraction(h, &DELAY_PCT, pct),
            };
            if let Some(d) = d
                && pct.hit(roll())
            {
                plan.delay = Some(d);
            }
        }
        if let Some((kind, pct)) = self.abort {
            let status = match kind {
                AbortKind::Http(s) => Some((s, None)),
                AbortKind::Grpc(g) => Some((StatusCode::OK, Some(g))),
                AbortKind::Header => match header_u64(h, &ABORT_GRPC) {
                    Some(g) => u32::try_from(g).ok().map(|g| (StatusCode::OK, Some(g))),
                    None => header_u64(h, &ABORT)
                        .filter(|s| (200..600).contains(s))
                        .and_then(|s| StatusCode::from_u16(s as u16).ok())
                        .map(|s| (s, None)),
                },
            };
            let pct = match kind {
                AbortKind::Header => header_fraction(h, &ABORT_PCT, pct),
                _ => pct,
            };
            if let Some(s) = status
                && pct.hit(roll())
            {
                plan.abort = Some(s);
            }
        }
        plan
    }
}

/// `http.<prefix>.fault.*`.
#[derive(Debug)]
struct Stats {
    delays_injected: Counter,
    aborts_injected: Counter,
    faults_overflow: Counter,
    response_rl_injected: Counter,
    active_faults: Gauge,
    /// The gauge's value (gauges cannot be read back).
    active: Arc<AtomicU64>,
}

/// Holds one active-fault slot until dropped.
struct ActiveFault {
    active: Arc<AtomicU64>,
    gauge: Gauge,
}

impl Drop for ActiveFault {
    fn drop(&mut self) {
        let v = self.active.fetch_sub(1, Ordering::AcqRel).saturating_sub(1);
        self.gauge.set(v as f64);
    }
}

/// Per-request state: the slot, and the response rate limit to apply.
struct Injected {
    _slot: ActiveFault,
    rate_limit: Option<u64>,
}

/// The fault filter.
#[derive(Debug)]
pub struct FaultFilter {
    settings: Arc<FaultSettings>,
    stats: Stats,
}

impl FaultFilter {
    /// Envoy's `tryIncActiveFaults` (a fuzzy limit: load, compare, add).
    fn try_activate(&self, max: Option<u64>) -> Option<ActiveFault> {
        let cur = self.stats.active.load(Ordering::Acquire);
        if max.is_some_and(|m| cur >= m) {
            self.stats.faults_overflow.increment(1);
            return None;
        }
        let v = self.stats.active.fetch_add(1, Ordering::AcqRel) + 1;
        self.stats.active_faults.set(v as f64);
        Some(ActiveFault {
            active: self.stats.active.clone(),
            gauge: self.stats.active_faults.clone(),
        })
    }
}

impl HttpFilter for FaultFilter {
    fn name(&self) -> &str {
        "envoy.filters.http.fault"
    }

    fn on_request(
        &self,
        req: &mut http::request::Parts,
        ctx: &mut FilterContext<'_>,
    ) -> FilterAction {
        let s: &FaultSettings = ctx
            .route_config_as::<FaultSettings>()
            .unwrap_or(&self.settings);
        if let Some(m) = &s.headers
            && !m.matches(&ctx.stream.head(req))
        {
            return FilterAction::Continue;
        }
        let stream = ctx.stream;
        let plan = s.plan(&req.headers, || stream.roll());
        if plan == Plan::default() {
            return FilterAction::Continue;
        }
        let Some(slot) = self.try_activate(s.max_active_faults) else {
            return FilterAction::Continue;
        };
        if plan.rate_limit.is_some() {
            self.stats.response_rl_injected.increment(1);
        }
        ctx.set_state(Injected {
            _slot: slot,
            rate_limit: plan.rate_limit,
        });
        let abort = plan.abort.map(|(status, grpc)| {
            let mut r = LocalReply::new(status, s.abort_body.clone(), "FI");
            r.grpc_status = grpc;
            r
        });
        match plan.delay {
            Some(d) => {
                self.stats.delays_injected.increment(1);
                ctx.stream.mark(crate::chain::marks::DELAY_INJECTED);
                let aborts = self.stats.aborts_injected.clone();
                FilterAction::Pause(Box::pin(async move {
                    tokio::time::sleep(d).await;
                    match abort {
                        Some(r) => {
                            aborts.increment(1);
                            FilterAction::Respond(r)
                        }
                        None => FilterAction::Continue,
                    }
                }))
            }
            None => match abort {
                Some(r) => {
                    self.stats.aborts_injected.increment(1);
                    FilterAction::Respond(r)
                }
                None => FilterAction::Continue,
            },
        }
    }

    fn wrap_response_body(&self, body: BoxBody, ctx: &mut FilterContext<'_>) -> BoxBody {
        use http_body_util::BodyExt;
        let Some(inj) = ctx.take_state::<Injected>() else {
            return body;
        };
        // The slot is held until the response body ends.
        let rate = inj.rate_limit;
        Throttled::new(body, rate, Some(Box::new(inj))).boxed_unsync()
    }
}

/// Factory for `envoy.filters.http.fault`.
#[derive(Debug)]
pub struct Factory;

fn unpack(any: &Any, path: &str, errs: &mut ConfigErrors) -> Option<fpb::HttpFault> {
    match weir_xds_api::unpack::<fpb::HttpFault>(any) {
        Ok(c) => Some(c),
        Err(e) => {
            errs.add(path, e.to_string());
            None
        }
    }
}

impl HttpFilterFactory for Factory {
    fn type_url(&self) -> &'static str {
        type_urls::FAULT
    }

    fn create(
        &self,
        config: &Any,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<Arc<dyn HttpFilter>> {
        let c = unpack(config, path, errs)?;
        let settings = FaultSettings::translate(&c, path, ctx, errs)?;
        let scope = StatScope::Hcm { infix: "fault" };
        Some(Arc::new(FaultFilter {
            settings: Arc::new(settings),
            stats: Stats {
                delays_injected: ctx.counter(scope, "delays_injected"),
                aborts_injected: ctx.counter(scope, "aborts_injected"),
                faults_overflow: ctx.counter(scope, "faults_overflow"),
                response_rl_injected: ctx.counter(scope, "response_rl_injected"),
                active_faults: ctx.gauge(scope, "active_faults"),
                active: Arc::new(AtomicU64::new(0)),
            },
        }))
    }

    fn create_route_config(
        &self,
        config: &Any,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let c = unpack(config, path, errs)?;
        let s = FaultSettings::translate(&c, path, ctx, errs)?;
        Some(Arc::new(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::tests::info;
    use crate::chain::{ChainEntry, ChainState, FilterChain};
    use crate::ratelimit::tests::TestCtx;

    fn settings(yaml: &str) -> Result<FaultSettings, Vec<(String, String)>> {
        let c: fpb::HttpFault = weir_xds_api::from_yaml(yaml).expect("yaml");
        let mut errs = ConfigErrors::default();
        let s = FaultSettings::translate(&c, "f", &TestCtx, &mut errs);
        if errs.is_empty() {
            Ok(s.expect("settings"))
        } else {
            Err(errs.0)
        }
    }

    fn hm(pairs: &[(&str, &str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).expect("n"),
                    v.parse().expect("v"),
                )
            })
            .collect()
    }

    #[test]
    fn percentages_use_the_roll() {
        let s = settings(
            "abort: {http_status: 503, percentage: {numerator: 25}}\ndelay: {fixed_delay: 2s, percentage: {numerator: 5000, denominator: TEN_THOUSAND}}\n",
        )
        .expect("valid");
        let h = http::HeaderMap::new();
        // Rolls: delay first, then abort.
        let mut rolls = [10_001u64, 24].into_iter();
        let p = s.plan(&h, || rolls.next().expect("roll"));
        assert_eq!(p.delay, Some(Duration::from_secs(2)));
        assert_eq!(p.abort, Some((StatusCode::SERVICE_UNAVAILABLE, None)));
        let mut rolls = [5_000u64, 25].into_iter();
        assert_eq!(s.plan(&h, || rolls.next().expect("roll")), Plan::default());
        // Over many deterministic rolls, 25% abort.
        let mut n = 0u64;
        let hits = (0..10_000)
            .filter(|_| {
                let mut rolls = [0u64, n].into_iter();
                n += 1;
                s.plan(&h, || rolls.next().expect("roll")).abort.is_some()
            })
            .count();
        assert_eq!(hits, 2_500);
    }

    #[test]
    fn header_controlled_faults() {
        let s = settings(
            "abort: {header_abort: {}, percentage: {numerator: 50}}\ndelay: {header_delay: {}, percentage: {numerator: 100}}\nresponse_rate_limit: {header_limit: {}, percentage: {numerator: 100}}\n",
        )
        .expect("valid");
        let zero = || 0u64;
        assert_eq!(s.plan(&http::HeaderMap::new(), zero), Plan::default());
        let p = s.plan(
            &hm(&[
                ("x-envoy-fault-abort-request", "418"),
                ("x-envoy-fault-delay-request", "150"),
                ("x-envoy-fault-throughput-response", "2"),
            ]),
            zero,
        );
        assert_eq!(p.abort, Some((StatusCode::IM_A_TEAPOT, None)));
        assert_eq!(p.delay, Some(Duration::from_millis(150)));
        assert_eq!(p.rate_limit, Some(2048));
        // The header percentage is capped by the configured 50%.
        let h = hm(&[
            ("x-envoy-fault-abort-request", "500"),
            ("x-envoy-fault-abort-request-percentage", "80"),
        ]);
        assert!(s.plan(&h, || 49).abort.is_some());
        assert!(s.plan(&h, || 50).abort.is_none());
        let h = hm(&[
            ("x-envoy-fault-abort-grpc-request", "14"),
            ("x-envoy-fault-abort-request-percentage", "0"),
        ]);
        assert!(s.plan(&h, zero).abort.is_none());
        let h = hm(&[("x-envoy-fault-abort-grpc-request", "14")]);
        assert_eq!(s.plan(&h, zero).abort, Some((StatusCode::OK, Some(14))));
        // Invalid header values inject nothing.
        let h = hm(&[
            ("x-envoy-fault-abort-request", "99"),
            ("x-envoy-fault-delay-request", "soon"),
        ]);
        assert_eq!(s.plan(&h, zero), Plan::default());
        // Headers are ignored when the config does not enable header control.
        let fixed =
            settings("abort: {http_status: 503, percentage: {numerator: 0}}\n").expect("valid");
        assert_eq!(
            fixed.plan(&hm(&[("x-envoy-fault-abort-request", "500")]), zero),
            Plan::default()
        );
    }

    fn chain(s: FaultSettings) -> (FilterChain, Arc<AtomicU64>) {
        let active = Arc::new(AtomicU64::new(0));
        let f = FaultFilter {
            settings: Arc::new(s),
            stats: Stats {
                delays_injected: Counter::noop(),
                aborts_injected: Counter::noop(),
                faults_overflow: Counter::noop(),
                response_rl_injected: Counter::noop(),
                active_faults: Gauge::noop(),
                active: active.clone(),
            },
        };
        (
            FilterChain::new(vec![ChainEntry {
                name: "fault".into(),
                filter: Arc::new(f),
                disabled: false,
                type_url: String::new(),
            }]),
            active,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn delay_then_abort_and_active_faults() {
        let (c, active) = chain(
            settings(
                "abort: {grpc_status: 14, percentage: {numerator: 100}}\ndelay: {fixed_delay: 5s, percentage: {numerator: 100}}\nmax_active_faults: 1\n",
            )
            .expect("valid"),
        );
        let i = info(None, 3);
        let mut st = ChainState::default();
        let (mut parts, _) = http::Request::new(()).into_parts();
        let start = tokio::time::Instant::now();
        let r = c
            .decode(&mut parts, &i, &mut st)
            .await
            .expect_err("aborted");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(r.grpc_status, Some(14));
        assert_eq!(r.flag, "FI");
        assert_eq!(active.load(Ordering::SeqCst), 1);
        // A second request while the first holds the only slot: no fault.
        let mut st2 = ChainState::default();
        let (mut parts2, _) = http::Request::new(()).into_parts();
        c.decode(&mut parts2, &i, &mut st2)
            .await
            .expect("overflow: no fault");
        // The slot is released when the first response body ends.
        let resp = c.encode(http::Response::new(crate::body::empty()), &i, &mut st);
        assert_eq!(active.load(Ordering::SeqCst), 1);
        drop(resp);
        assert_eq!(active.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn translation_errors() {
        let e = settings(
            "abort: {http_status: 99}\ndelay: {percentage: {numerator: 1}}\nresponse_rate_limit: {fixed_limit: {limit_kbps: 0}}\nupstream_cluster: c\ndownstream_nodes: [n]\n",
        )
        .expect_err("invalid");
        let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        for want in [
            "f.upstream_cluster",
            "f.downstream_nodes",
            "f.abort.http_status",
            "f.delay",
            "f.response_rate_limit.fixed_limit.limit_kbps",
        ] {
            assert!(paths.contains(&want), "{want} missing: {e:?}");
        }
    }
}
