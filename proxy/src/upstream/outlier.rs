//! Outlier detection (`Cluster.outlier_detection`): Envoy's passive health checking.
//!
//! # Data flow
//! - Per request, the router calls [`super::Cluster::report`] with a [`HostResult`]. That only
//!   touches the host's own atomics ([`HostOutlier`]): consecutive-error counters and the
//!   success-rate counters of the current interval. When a consecutive counter reaches its
//!   threshold (exactly once, as Envoy's `==` check), the ejection runs inline under the
//!   detector's mutex, which is taken only for ejection events and interval ticks — never for
//!   an ordinary request.
//! - Every `interval` a task on the main runtime ([`run`]) un-ejects hosts whose ejection time
//!   passed, swaps every host's success-rate counters to zero (the swapped-out values are the
//!   last interval's data), evaluates success-rate and failure-percentage ejections, and
//!   decrements the ejection-time multiplier of hosts that stayed healthy for an interval.
//! - Ejection sets [`health_flags::FAILED_OUTLIER_CHECK`] on the host; workers read it at pick
//!   time, nothing is rebuilt.
//!
//! # Semantics (Envoy's `outlier_detection_impl.cc`)
//! - `Status(code)`: a 5xx bumps `consecutive_5xx`; 502/503/504 also bump
//!   `consecutive_gateway_failure` (another 5xx resets it); anything else resets both and
//!   counts as a success.
//! - Local-origin results: without `split_external_local_origin_errors` a connect failure or
//!   reset counts as a 503 and a timeout as a 504 (`ConnectSucceeded` is ignored); with it they
//!   feed `consecutive_local_origin_failure` and the local-origin success rate instead.
//! - `max_ejection_percent` (default 10) caps ejections: a host is ejected only when
//!   `100 * (active + 1) / hosts <= max_ejection_percent`, or when `always_eject_one_host` is
//!   set and nothing is ejected yet. Blocked ejections count `ejections_overflow`.
//! - An ejection is enforced with probability `enforcing_*` percent; `ejections_detected_*`
//!   count every detection, `ejections_enforced_*` the enforced ones.
//! - Ejection time: `min(base_ejection_time * multiplier, max_ejection_time) + jitter`, where
//!   the multiplier grows by one per ejection (while `multiplier * base < max + base`) and
//!   shrinks by one per interval the host spends un-ejected.
//! - Success rate: hosts with at least `success_rate_request_volume` requests in the interval
//!   (and at least `success_rate_minimum_hosts` such hosts) are ejected below
//!   `mean - stdev * success_rate_stdev_factor / 1000`. Failure percentage: hosts with at
//!   least `failure_percentage_request_volume` requests (and `failure_percentage_minimum_hosts`
//!   of them) are ejected at or above `failure_percentage_threshold` percent failures.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use metrics::{Counter, Gauge};
use tokio::time::Instant;
use weir_xds_api::pb::envoy::config::cluster::v3::OutlierDetection as PbOutlier;

use super::{Cluster, Host, HostResult, health_flags};
use crate::config::{Errors, duration, join};
use crate::stats::Scope;

/// Translated `OutlierDetection` (Envoy's defaults filled in).
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// `interval` between ejection sweeps (default 10 s).
    pub interval: Duration,
    /// `base_ejection_time` (default 30 s).
    pub base_ejection_time: Duration,
    /// `max_ejection_time` (default max(300 s, base_ejection_time)).
    pub max_ejection_time: Duration,
    /// `max_ejection_time_jitter` (default 0): a random extra ejection time up to this.
    pub max_ejection_time_jitter: Duration,
    /// `max_ejection_percent` (default 10).
    pub max_ejection_percent: u32,
    /// `always_eject_one_host` (default false).
    pub always_eject_one_host: bool,
    /// `consecutive_5xx` (default 5).
    pub consecutive_5xx: u32,
    /// `consecutive_gateway_failure` (default 5).
    pub consecutive_gateway_failure: u32,
    /// `consecutive_local_origin_failure` (default 5).
    pub consecutive_local_origin_failure: u32,
    /// `split_external_local_origin_errors` (default false).
    pub split_external_local_origin_errors: bool,
    /// `enforcing_consecutive_5xx` (default 100).
    pub enforcing_consecutive_5xx: u32,
    /// `enforcing_consecutive_gateway_failure` (default 0).
    pub enforcing_consecutive_gateway_failure: u32,
    /// `enforcing_consecutive_local_origin_failure` (default 100).
    pub enforcing_consecutive_local_origin_failure: u32,
    /// `enforcing_success_rate` (default 100).
    pub enforcing_success_rate: u32,
    /// `enforcing_local_origin_success_rate` (default 100).
    pub enforcing_local_origin_success_rate: u32,
    /// `enforcing_failure_percentage` (default 0).
    pub enforcing_failure_percentage: u32,
    /// `enforcing_failure_percentage_local_origin` (default 0).
    pub enforcing_failure_percentage_local_origin: u32,
    /// `success_rate_minimum_hosts` (default 5).
    pub success_rate_minimum_hosts: u32,
    /// `success_rate_request_volume` (default 100).
    pub success_rate_request_volume: u32,
    /// `success_rate_stdev_factor` (default 1900, i.e. 1.9 standard deviations).
    pub success_rate_stdev_factor: u32,
    /// `failure_percentage_threshold` (default 85).
    pub failure_percentage_threshold: u32,
    /// `failure_percentage_minimum_hosts` (default 5).
    pub failure_percentage_minimum_hosts: u32,
    /// `failure_percentage_request_volume` (default 50).
    pub failure_percentage_request_volume: u32,
    /// `successful_active_health_check_uneject_host` (default true): a passing active health
    /// check un-ejects the host at once.
    pub successful_active_health_check_uneject_host: bool,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_time_jitter: Duration::ZERO,
            max_ejection_percent: 10,
            always_eject_one_host: false,
            consecutive_5xx: 5,
            consecutive_gateway_failure: 5,
            consecutive_local_origin_failure: 5,
            split_external_local_origin_errors: false,
            enforcing_consecutive_5xx: 100,
            enforcing_consecutive_gateway_failure: 0,
            enforcing_consecutive_local_origin_failure: 100,
            enforcing_success_rate: 100,
            enforcing_local_origin_success_rate: 100,
            enforcing_failure_percentage: 0,
            enforcing_failure_percentage_local_origin: 0,
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1900,
            failure_percentage_threshold: 85,
            failure_percentage_minimum_hosts: 5,
            failure_percentage_request_volume: 50,
            successful_active_health_check_uneject_host: true,
        }
    }
}

/// `OutlierDetection` fields weir implements.
const OUTLIER_FIELDS: &[&str] = &[
    "consecutive_5xx",
    "interval",
    "base_ejection_time",
    "max_ejection_percent",
    "enforcing_consecutive_5xx",
    "enforcing_success_rate",
    "success_rate_minimum_hosts",
    "success_rate_request_volume",
    "success_rate_stdev_factor",
    "consecutive_gateway_failure",
    "enforcing_consecutive_gateway_failure",
    "split_external_local_origin_errors",
    "consecutive_local_origin_failure",
    "enforcing_consecutive_local_origin_failure",
    "enforcing_local_origin_success_rate",
    "failure_percentage_threshold",
    "enforcing_failure_percentage",
    "enforcing_failure_percentage_local_origin",
    "failure_percentage_minimum_hosts",
    "failure_percentage_request_volume",
    "max_ejection_time",
    "max_ejection_time_jitter",
    "successful_active_health_check_uneject_host",
    "always_eject_one_host",
];

/// Translate `Cluster.outlier_detection` at `path`.
pub fn translate_outlier(o: &PbOutlier, path: &str, errs: &mut Errors) -> OutlierConfig {
    errs.reject_unsupported(o, OUTLIER_FIELDS, path);
    let d = OutlierConfig::default();
    let dur = |v: Option<&weir_xds_api::pb::google::protobuf::Duration>,
               field: &str,
               default: Duration,
               errs: &mut Errors| {
        match v {
            None => default,
            Some(v) => {
                let p = join(path, field);
                let got = duration(v, &p, errs);
                if got.is_zero() {
                    errs.add(p, "must be greater than 0");
                    default
                } else {
                    got
                }
            }
        }
    };
    let interval = dur(o.interval.as_ref(), "interval", d.interval, errs);
    let base_ejection_time = dur(
        o.base_ejection_time.as_ref(),
        "base_ejection_time",
        d.base_ejection_time,
        errs,
    );
    let max_ejection_time = match &o.max_ejection_time {
        None => d.max_ejection_time.max(base_ejection_time),
        Some(v) => {
            let p = join(path, "max_ejection_time");
            let m = duration(v, &p, errs);
            if m < base_ejection_time {
                errs.add(
                    p,
                    "max_ejection_time cannot be smaller than base_ejection_time",
                );
            }
            m
        }
    };
    let max_ejection_time_jitter = o
        .max_ejection_time_jitter
        .as_ref()
        .map(|v| duration(v, &join(path, "max_ejection_time_jitter"), errs))
        .unwrap_or(d.max_ejection_time_jitter);
    let u32_or = |v: Option<u32>, default: u32| v.unwrap_or(default);
    let pct = |v: Option<u32>, field: &str, default: u32, errs: &mut Errors| match v {
        Some(v) if v > 100 => {
            errs.add(join(path, field), "must be at most 100");
            default
        }
        Some(v) => v,
        None => default,
    };
    let v = |x: Option<weir_xds_api::pb::google::protobuf::UInt32Value>| x.map(|x| x.value);
    OutlierConfig {
        interval,
        base_ejection_time,
        max_ejection_time,
        max_ejection_time_jitter,
        max_ejection_percent: pct(
            v(o.max_ejection_percent),
            "max_ejection_percent",
            d.max_ejection_percent,
            errs,
        ),
        always_eject_one_host: o
            .always_eject_one_host
            .map(|b| b.value)
            .unwrap_or(d.always_eject_one_host),
        consecutive_5xx: u32_or(v(o.consecutive_5xx), d.consecutive_5xx),
        consecutive_gateway_failure: u32_or(
            v(o.consecutive_gateway_failure),
            d.consecutive_gateway_failure,
        ),
        consecutive_local_origin_failure: u32_or(
            v(o.consecutive_local_origin_failure),
            d.consecutive_local_origin_failure,
        ),
        split_external_local_origin_errors: o.split_external_local_origin_errors,
        enforcing_consecutive_5xx: pct(
            v(o.enforcing_consecutive_5xx),
            "enforcing_consecutive_5xx",
            d.enforcing_consecutive_5xx,
            errs,
        ),
        enforcing_consecutive_gateway_failure: pct(
            v(o.enforcing_consecutive_gateway_failure),
            "enforcing_consecutive_gateway_failure",
            d.enforcing_consecutive_gateway_failure,
            errs,
        ),
        enforcing_consecutive_local_origin_failure: pct(
            v(o.enforcing_consecutive_local_origin_failure),
            "enforcing_consecutive_local_origin_failure",
            d.enforcing_consecutive_local_origin_failure,
            errs,
        ),
        enforcing_success_rate: pct(
            v(o.enforcing_success_rate),
            "enforcing_success_rate",
            d.enforcing_success_rate,
            errs,
        ),
        enforcing_local_origin_success_rate: pct(
            v(o.enforcing_local_origin_success_rate),
            "enforcing_local_origin_success_rate",
            d.enforcing_local_origin_success_rate,
            errs,
        ),
        enforcing_failure_percentage: pct(
            v(o.enforcing_failure_percentage),
            "enforcing_failure_percentage",
            d.enforcing_failure_percentage,
            errs,
        ),
        enforcing_failure_percentage_local_origin: pct(
            v(o.enforcing_failure_percentage_local_origin),
            "enforcing_failure_percentage_local_origin",
            d.enforcing_failure_percentage_local_origin,
            errs,
        ),
        success_rate_minimum_hosts: u32_or(
            v(o.success_rate_minimum_hosts),
            d.success_rate_minimum_hosts,
        ),
        success_rate_request_volume: u32_or(
            v(o.success_rate_request_volume),
            d.success_rate_request_volume,
        ),
        success_rate_stdev_factor: u32_or(
            v(o.success_rate_stdev_factor),
            d.success_rate_stdev_factor,
        ),
        failure_percentage_threshold: pct(
            v(o.failure_percentage_threshold),
            "failure_percentage_threshold",
            d.failure_percentage_threshold,
            errs,
        ),
        failure_percentage_minimum_hosts: u32_or(
            v(o.failure_percentage_minimum_hosts),
            d.failure_percentage_minimum_hosts,
        ),
        failure_percentage_request_volume: u32_or(
            v(o.failure_percentage_request_volume),
            d.failure_percentage_request_volume,
        ),
        successful_active_health_check_uneject_host: o
            .successful_active_health_check_uneject_host
            .map(|b| b.value)
            .unwrap_or(d.successful_active_health_check_uneject_host),
    }
}

/// Why a host was (or would have been) ejected (Envoy's `OutlierEjectionType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectionType {
    /// `CONSECUTIVE_5XX`.
    Consecutive5xx,
    /// `CONSECUTIVE_GATEWAY_FAILURE`.
    ConsecutiveGatewayFailure,
    /// `CONSECUTIVE_LOCAL_ORIGIN_FAILURE`.
    ConsecutiveLocalOriginFailure,
    /// `SUCCESS_RATE`.
    SuccessRate,
    /// `SUCCESS_RATE_LOCAL_ORIGIN`.
    SuccessRateLocalOrigin,
    /// `FAILURE_PERCENTAGE`.
    FailurePercentage,
    /// `FAILURE_PERCENTAGE_LOCAL_ORIGIN`.
    FailurePercentageLocalOrigin,
}

impl EjectionType {
    /// Envoy's stat infix (`ejections_enforced_<infix>`).
    pub fn stat_name(self) -> &'static str {
        match self {
            Self::Consecutive5xx => "consecutive_5xx",
            Self::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            Self::ConsecutiveLocalOriginFailure => "consecutive_local_origin_failure",
            Self::SuccessRate => "success_rate",
            Self::SuccessRateLocalOrigin => "local_origin_success_rate",
            Self::FailurePercentage => "failure_percentage",
            Self::FailurePercentageLocalOrigin => "local_origin_failure_percentage",
        }
    }

    const ALL: [EjectionType; 7] = [
        Self::Consecutive5xx,
        Self::ConsecutiveGatewayFailure,
        Self::ConsecutiveLocalOriginFailure,
        Self::SuccessRate,
        Self::SuccessRateLocalOrigin,
        Self::FailurePercentage,
        Self::FailurePercentageLocalOrigin,
    ];

    fn index(self) -> usize {
        self as usize
    }

    fn enforcing(self, c: &OutlierConfig) -> u32 {
        match self {
            Self::Consecutive5xx => c.enforcing_consecutive_5xx,
            Self::ConsecutiveGatewayFailure => c.enforcing_consecutive_gateway_failure,
            Self::ConsecutiveLocalOriginFailure => c.enforcing_consecutive_local_origin_failure,
            Self::SuccessRate => c.enforcing_success_rate,
            Self::SuccessRateLocalOrigin => c.enforcing_local_origin_success_rate,
            Self::FailurePercentage => c.enforcing_failure_percentage,
            Self::FailurePercentageLocalOrigin => c.enforcing_failure_percentage_local_origin,
        }
    }
}

/// Which success-rate monitor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Responses from the host (and, without the split, local-origin errors as 5xx).
    External,
    /// Connect failures, timeouts and resets (only with `split_external_local_origin_errors`).
    Local,
}

/// `-1` as stored f64 bits: "no success rate computed".
const NO_RATE: u64 = 0xBFF0_0000_0000_0000;

/// Per-host outlier state. Request accounting uses only these atomics.
#[derive(Debug)]
pub struct HostOutlier {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// Current interval's external-origin requests / successes.
    ext_total: AtomicU64,
    ext_success: AtomicU64,
    /// Current interval's local-origin requests / successes.
    local_total: AtomicU64,
    local_success: AtomicU64,
    /// Last computed success rates (f64 bits; -1 when none).
    success_rate: AtomicU64,
    local_success_rate: AtomicU64,
    /// Ejection bookkeeping, touched only under the detector's lock.
    eject: Mutex<EjectState>,
}

impl Default for HostOutlier {
    fn default() -> Self {
        Self {
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            consecutive_local: AtomicU32::new(0),
            ext_total: AtomicU64::new(0),
            ext_success: AtomicU64::new(0),
            local_total: AtomicU64::new(0),
            local_success: AtomicU64::new(0),
            success_rate: AtomicU64::new(NO_RATE),
            local_success_rate: AtomicU64::new(NO_RATE),
            eject: Mutex::new(EjectState::default()),
        }
    }
}

impl HostOutlier {
    /// The success rate (percent) of the last interval as shown by `/clusters`, -1 if the host
    /// did not have enough requests (or no outlier detection is configured).
    pub fn success_rate(&self, origin: Origin) -> f64 {
        let a = match origin {
            Origin::External => &self.success_rate,
            Origin::Local => &self.local_success_rate,
        };
        f64::from_bits(a.load(Ordering::Relaxed))
    }

    fn set_success_rate(&self, origin: Origin, v: f64) {
        let a = match origin {
            Origin::External => &self.success_rate,
            Origin::Local => &self.local_success_rate,
        };
        a.store(v.to_bits(), Ordering::Relaxed);
    }

    /// How many times the host was ejected.
    pub fn num_ejections(&self) -> u32 {
        self.lock().num_ejections
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EjectState> {
        // The state stays consistent even if a holder panicked: plain integers and instants.
        self.eject.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take the counters of the interval that just ended (total, successes).
    fn swap_bucket(&self, origin: Origin) -> (u64, u64) {
        let (t, s) = match origin {
            Origin::External => (&self.ext_total, &self.ext_success),
            Origin::Local => (&self.local_total, &self.local_success),
        };
        // Successes first so a concurrent request never makes success > total.
        let success = s.swap(0, Ordering::Relaxed);
        let total = t.swap(0, Ordering::Relaxed);
        (total, success.min(total))
    }

    fn reset_consecutive(&self) {
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        self.consecutive_local.store(0, Ordering::Relaxed);
    }
}

/// Ejection bookkeeping of one host.
#[derive(Debug, Default, Clone, Copy)]
struct EjectState {
    num_ejections: u32,
    /// The ejection-time multiplier.
    backoff: u32,
    last_ejection: Option<Instant>,
    last_unejection: Option<Instant>,
    jitter: Duration,
}

/// How long an ejection lasts for a multiplier (Envoy: `min(base * backoff, max)`).
pub fn ejection_duration(backoff: u32, base: Duration, max: Duration) -> Duration {
    base.saturating_mul(backoff).min(max)
}

/// The multiplier after one more ejection (grows while `backoff * base < max + base`).
pub fn next_backoff(backoff: u32, base: Duration, max: Duration) -> u32 {
    if base.saturating_mul(backoff) < max.saturating_add(base) {
        backoff.saturating_add(1)
    } else {
        backoff
    }
}

/// Mean and ejection threshold (`mean - factor * stdev`, population stdev) of success rates.
pub fn success_rate_threshold(rates: &[f64], stdev_factor: f64) -> (f64, f64) {
    if rates.is_empty() {
        return (-1.0, -1.0);
    }
    let n = rates.len() as f64;
    let mean = rates.iter().sum::<f64>() / n;
    let variance = rates.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
    (mean, mean - stdev_factor * variance.sqrt())
}

/// Envoy's `outlier_detection.*` stats.
#[derive(Debug, Clone)]
pub struct OutlierStats {
    /// `ejections_active` (gauge).
    pub ejections_active: Gauge,
    /// `ejections_total` (deprecated in Envoy: consecutive_5xx and success_rate detections
    /// that were not blocked by max_ejection_percent).
    pub ejections_total: Counter,
    /// `ejections_enforced_total`.
    pub ejections_enforced_total: Counter,
    /// `ejections_overflow`.
    pub ejections_overflow: Counter,
    /// `ejections_consecutive_5xx` (deprecated in Envoy).
    pub ejections_consecutive_5xx: Counter,
    /// `ejections_success_rate` (deprecated in Envoy).
    pub ejections_success_rate: Counter,
    /// `ejections_enforced_<type>`, indexed by [`EjectionType`].
    enforced: Vec<Counter>,
    /// `ejections_detected_<type>`, indexed by [`EjectionType`].
    detected: Vec<Counter>,
}

impl OutlierStats {
    /// Register under `cluster.<name>.outlier_detection.`.
    pub fn new(cluster: &Scope) -> Self {
        let s = cluster.child("outlier_detection");
        Self {
            ejections_active: s.gauge("ejections_active"),
            ejections_total: s.counter("ejections_total"),
            ejections_enforced_total: s.counter("ejections_enforced_total"),
            ejections_overflow: s.counter("ejections_overflow"),
            ejections_consecutive_5xx: s.counter("ejections_consecutive_5xx"),
            ejections_success_rate: s.counter("ejections_success_rate"),
            enforced: EjectionType::ALL
                .iter()
                .map(|t| s.counter(&format!("ejections_enforced_{}", t.stat_name())))
                .collect(),
            detected: EjectionType::ALL
                .iter()
                .map(|t| s.counter(&format!("ejections_detected_{}", t.stat_name())))
                .collect(),
        }
    }
}

/// Cluster-wide success-rate numbers of the last sweep (-1 when not computed).
#[derive(Debug, Clone, Copy)]
struct SrNums {
    average: f64,
    threshold: f64,
}

impl Default for SrNums {
    fn default() -> Self {
        Self {
            average: -1.0,
            threshold: -1.0,
        }
    }
}

#[derive(Debug, Default)]
struct DetectorState {
    external: SrNums,
    local: SrNums,
}

/// One cluster's outlier detector.
#[derive(Debug)]
pub struct Detector {
    cfg: OutlierConfig,
    cluster: String,
    stats: OutlierStats,
    /// Serializes ejections and sweeps (never taken per request).
    state: Mutex<DetectorState>,
}

/// Source of the per-ejection random numbers (enforcement rolls, jitter).
pub trait Roll {
    /// A uniformly random u64.
    fn roll(&mut self) -> u64;
}

/// [`Roll`] from the thread RNG.
#[derive(Debug, Default)]
pub struct ThreadRoll;

impl Roll for ThreadRoll {
    fn roll(&mut self) -> u64 {
        rand::random()
    }
}

impl Detector {
    /// A detector with its stats registered under the cluster scope.
    pub fn new(cfg: OutlierConfig, cluster: &str, scope: &Scope) -> Self {
        Self {
            cfg,
            cluster: cluster.to_string(),
            stats: OutlierStats::new(scope),
            state: Mutex::new(DetectorState::default()),
        }
    }

    /// Config.
    pub fn config(&self) -> &OutlierConfig {
        &self.cfg
    }

    /// Stats.
    pub fn stats(&self) -> &OutlierStats {
        &self.stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DetectorState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cluster's average success rate of the last sweep (-1 when not computed).
    pub fn success_rate_average(&self, origin: Origin) -> f64 {
        let s = self.lock();
        match origin {
            Origin::External => s.external.average,
            Origin::Local => s.local.average,
        }
    }

    /// The success-rate ejection threshold of the last sweep (-1 when not computed).
    pub fn success_rate_ejection_threshold(&self, origin: Origin) -> f64 {
        let s = self.lock();
        match origin {
            Origin::External => s.external.threshold,
            Origin::Local => s.local.threshold,
        }
    }

    /// Account one request outcome. `hosts` yields the cluster's current hosts; it is only
    /// called when a consecutive-error threshold is reached.
    pub fn put(
        &self,
        host: &Arc<Host>,
        result: HostResult,
        hosts: impl FnOnce() -> Arc<Vec<Arc<Host>>>,
    ) {
        let o = &host.outlier;
        let split = self.cfg.split_external_local_origin_errors;
        let fired = match result {
            HostResult::Status(code) => self.put_http_code(o, code),
            HostResult::ConnectSucceeded if split => {
                self.local_no_failure(o);
                None
            }
            HostResult::ConnectSucceeded => None,
            HostResult::ConnectFailed | HostResult::Reset | HostResult::Timeout if split => {
                self.local_failure(o)
            }
            HostResult::ConnectFailed | HostResult::Reset => self.put_http_code(o, 503),
            HostResult::Timeout => self.put_http_code(o, 504),
        };
        if let Some(kinds) = fired {
            let hosts = hosts();
            for kind in kinds.into_iter().flatten() {
                self.on_consecutive(&hosts, host, kind, Instant::now(), &mut ThreadRoll);
            }
        }
    }

    /// Envoy's `putHttpResponseCode`. Returns the consecutive thresholds reached.
    fn put_http_code(&self, o: &HostOutlier, code: u16) -> Option<[Option<EjectionType>; 2]> {
        o.ext_total.fetch_add(1, Ordering::Relaxed);
        if (500..600).contains(&code) {
            let mut fired = [None, None];
            if matches!(code, 502..=504) {
                if o.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
                    == self.cfg.consecutive_gateway_failure
                {
                    fired[0] = Some(EjectionType::ConsecutiveGatewayFailure);
                }
            } else {
                reset(&o.consecutive_gateway);
            }
            if o.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1 == self.cfg.consecutive_5xx {
                fired[1] = Some(EjectionType::Consecutive5xx);
            }
            (fired != [None, None]).then_some(fired)
        } else {
            o.ext_success.fetch_add(1, Ordering::Relaxed);
            reset(&o.consecutive_5xx);
            reset(&o.consecutive_gateway);
            None
        }
    }

    fn local_failure(&self, o: &HostOutlier) -> Option<[Option<EjectionType>; 2]> {
        o.local_total.fetch_add(1, Ordering::Relaxed);
        (o.consecutive_local.fetch_add(1, Ordering::Relaxed) + 1
            == self.cfg.consecutive_local_origin_failure)
            .then_some([Some(EjectionType::ConsecutiveLocalOriginFailure), None])
    }

    fn local_no_failure(&self, o: &HostOutlier) {
        o.local_total.fetch_add(1, Ordering::Relaxed);
        o.local_success.fetch_add(1, Ordering::Relaxed);
        reset(&o.consecutive_local);
    }

    /// A consecutive-error threshold was reached (Envoy's `onConsecutiveErrorWorker`).
    pub fn on_consecutive(
        &self,
        hosts: &[Arc<Host>],
        host: &Arc<Host>,
        kind: EjectionType,
        now: Instant,
        roll: &mut impl Roll,
    ) {
        let _g = self.lock();
        // A host no longer in the cluster, or already ejected, is left alone.
        if !hosts.iter().any(|h| Arc::ptr_eq(h, host)) || is_ejected(host) {
            return;
        }
        self.stats.detected[kind.index()].increment(1);
        self.eject(hosts, host, kind, now, roll);
        // Reset the counter so a further bout of errors is detected even without an
        // interleaved success.
        let o = &host.outlier;
        match kind {
            EjectionType::Consecutive5xx => {
                self.stats.ejections_consecutive_5xx.increment(1);
                o.consecutive_5xx.store(0, Ordering::Relaxed);
            }
            EjectionType::ConsecutiveGatewayFailure => {
                o.consecutive_gateway.store(0, Ordering::Relaxed)
            }
            EjectionType::ConsecutiveLocalOriginFailure => {
                o.consecutive_local.store(0, Ordering::Relaxed)
            }
            _ => {}
        }
    }

    /// Envoy's `ejectHost` (caller holds the state lock).
    fn eject(
        &self,
        hosts: &[Arc<Host>],
        host: &Arc<Host>,
        kind: EjectionType,
        now: Instant,
        roll: &mut impl Roll,
    ) {
        let active = hosts.iter().filter(|h| is_ejected(h)).count() as u64;
        let max_pct = u64::from(self.cfg.max_ejection_percent.min(100));
        let ejected_pct = 100.0 * (active + 1) as f64 / hosts.len().max(1) as f64;
        let should =
            ejected_pct <= max_pct as f64 || (self.cfg.always_eject_one_host && active == 0);
        if !should {
            self.stats.ejections_overflow.increment(1);
            tracing::debug!(cluster = %self.cluster, host = %host.address, reason = kind.stat_name(),
                "outlier ejection skipped: max_ejection_percent reached");
            return;
        }
        if matches!(
            kind,
            EjectionType::Consecutive5xx | EjectionType::SuccessRate
        ) {
            self.stats.ejections_total.increment(1);
        }
        if roll.roll() % 100 >= u64::from(kind.enforcing(&self.cfg)) {
            tracing::debug!(cluster = %self.cluster, host = %host.address, reason = kind.stat_name(),
                "outlier detected but not enforced");
            return;
        }
        let cfg = &self.cfg;
        let jitter_ms = cfg.max_ejection_time_jitter.as_millis() as u64;
        let mut st = host.outlier.lock();
        st.num_ejections += 1;
        st.last_ejection = Some(now);
        st.jitter = Duration::from_millis(roll.roll() % (jitter_ms + 1));
        st.backoff = next_backoff(st.backoff, cfg.base_ejection_time, cfg.max_ejection_time);
        let for_time = ejection_duration(st.backoff, cfg.base_ejection_time, cfg.max_ejection_time)
            + st.jitter;
        let num = st.num_ejections;
        drop(st);
        host.health
            .fetch_or(health_flags::FAILED_OUTLIER_CHECK, Ordering::AcqRel);
        self.stats.ejections_enforced_total.increment(1);
        self.stats.enforced[kind.index()].increment(1);
        self.stats.ejections_active.set((active + 1) as f64);
        tracing::info!(cluster = %self.cluster, host = %host.address, reason = kind.stat_name(),
            ejection_time_ms = for_time.as_millis() as u64, num_ejections = num,
            "host ejected by outlier detection");
    }

    /// Clear the ejection of `host` (caller holds the state lock).
    fn uneject(&self, host: &Host, now: Instant, why: &str) {
        host.health
            .fetch_and(!health_flags::FAILED_OUTLIER_CHECK, Ordering::AcqRel);
        host.outlier.reset_consecutive();
        host.outlier.lock().last_unejection = Some(now);
        tracing::info!(cluster = %self.cluster, host = %host.address, why,
            "host returned to service by outlier detection");
    }

    fn set_active_gauge(&self, hosts: &[Arc<Host>]) {
        let n = hosts.iter().filter(|h| is_ejected(h)).count();
        self.stats.ejections_active.set(n as f64);
    }

    /// An active health check passed for `host` (Envoy's
    /// `successful_active_health_check_uneject_host`).
    pub fn on_active_hc_success(&self, hosts: &[Arc<Host>], host: &Host, now: Instant) {
        if !self.cfg.successful_active_health_check_uneject_host {
            return;
        }
        let _g = self.lock();
        let bits = host.health.load(Ordering::Acquire);
        if bits & health_flags::FAILED_OUTLIER_CHECK != 0
            && bits & health_flags::FAILED_ACTIVE_HC == 0
        {
            self.uneject(host, now, "active health check passed");
            self.set_active_gauge(hosts);
        }
    }

    /// One sweep (Envoy's `onIntervalTimer`).
    pub fn on_interval(&self, hosts: &[Arc<Host>], now: Instant, roll: &mut impl Roll) {
        let mut g = self.lock();
        let cfg = &self.cfg;
        for h in hosts {
            if is_ejected(h) {
                let st = *h.outlier.lock();
                let t =
                    ejection_duration(st.backoff, cfg.base_ejection_time, cfg.max_ejection_time)
                        + st.jitter;
                if st
                    .last_ejection
                    .is_none_or(|at| now.duration_since(at) >= t)
                {
                    self.uneject(h, now, "ejection time elapsed");
                }
            }
            h.outlier.set_success_rate(Origin::External, -1.0);
            h.outlier.set_success_rate(Origin::Local, -1.0);
        }
        let ext: Vec<(u64, u64)> = hosts
            .iter()
            .map(|h| h.outlier.swap_bucket(Origin::External))
            .collect();
        let local: Vec<(u64, u64)> = hosts
            .iter()
            .map(|h| h.outlier.swap_bucket(Origin::Local))
            .collect();
        g.external = self.success_rate_sweep(hosts, &ext, Origin::External, now, roll);
        g.local = self.success_rate_sweep(hosts, &local, Origin::Local, now, roll);
        // Hosts that stayed in service for an interval earn back one multiplier step.
        for h in hosts {
            if !is_ejected(h) {
                let mut st = h.outlier.lock();
                if st
                    .last_unejection
                    .is_some_and(|at| now.duration_since(at) >= cfg.interval)
                    && st.backoff > 0
                {
                    st.backoff -= 1;
                }
            }
        }
        self.set_active_gauge(hosts);
    }

    /// Envoy's `processSuccessRateEjections` for one origin; `buckets[i]` is host i's
    /// (total, success) of the last interval.
    fn success_rate_sweep(
        &self,
        hosts: &[Arc<Host>],
        buckets: &[(u64, u64)],
        origin: Origin,
        now: Instant,
        roll: &mut impl Roll,
    ) -> SrNums {
        let cfg = &self.cfg;
        let sr_min_hosts = cfg.success_rate_minimum_hosts as usize;
        let sr_volume = u64::from(cfg.success_rate_request_volume);
        let fp_min_hosts = cfg.failure_percentage_minimum_hosts as usize;
        let fp_volume = u64::from(cfg.failure_percentage_request_volume);
        if hosts.len() < sr_min_hosts && hosts.len() < fp_min_hosts {
            return SrNums::default();
        }
        let mut sr_hosts: Vec<(usize, f64)> = Vec::new();
        let mut fp_hosts: Vec<(usize, f64)> = Vec::new();
        for (i, (h, &(total, success))) in hosts.iter().zip(buckets).enumerate() {
            if is_ejected(h) || total == 0 {
                continue;
            }
            let rate = success as f64 * 100.0 / total as f64;
            if total >= sr_volume.min(fp_volume) {
                h.outlier.set_success_rate(origin, rate);
            }
            if total >= sr_volume {
                sr_hosts.push((i, rate));
            }
            if total >= fp_volume {
                fp_hosts.push((i, rate));
            }
        }
        let mut nums = SrNums::default();
        if !sr_hosts.is_empty() && sr_hosts.len() >= sr_min_hosts {
            let rates: Vec<f64> = sr_hosts.iter().map(|(_, r)| *r).collect();
            let (average, threshold) =
                success_rate_threshold(&rates, f64::from(cfg.success_rate_stdev_factor) / 1000.0);
            nums = SrNums { average, threshold };
            let kind = match origin {
                Origin::External => EjectionType::SuccessRate,
                Origin::Local => EjectionType::SuccessRateLocalOrigin,
            };
            for &(i, rate) in &sr_hosts {
                if rate < threshold {
                    self.stats.ejections_success_rate.increment(1);
                    self.stats.detected[kind.index()].increment(1);
                    self.eject(hosts, &hosts[i], kind, now, roll);
                }
            }
        }
        if !fp_hosts.is_empty() && fp_hosts.len() >= fp_min_hosts {
            let kind = match origin {
                Origin::External => EjectionType::FailurePercentage,
                Origin::Local => EjectionType::FailurePercentageLocalOrigin,
            };
            for &(i, rate) in &fp_hosts {
                if 100.0 - rate >= f64::from(cfg.failure_percentage_threshold)
                    && !is_ejected(&hosts[i])
                {
                    self.stats.detected[kind.index()].increment(1);
                    self.eject(hosts, &hosts[i], kind, now, roll);
                }
            }
        }
        nums
    }
}

/// Zero a streak counter, writing only when it is not zero already: in the common all-success
/// case the cache line stays shared between workers.
fn reset(a: &AtomicU32) {
    if a.load(Ordering::Relaxed) != 0 {
        a.store(0, Ordering::Relaxed);
    }
}

fn is_ejected(h: &Host) -> bool {
    h.health.load(Ordering::Acquire) & health_flags::FAILED_OUTLIER_CHECK != 0
}

/// The sweep loop on the main runtime; ends when the cluster is dropped.
pub(crate) async fn run(cluster: Weak<Cluster>) {
    let Some(interval) = cluster
        .upgrade()
        .and_then(|c| c.outlier.as_ref().map(|d| d.cfg.interval))
    else {
        return;
    };
    loop {
        tokio::time::sleep(interval).await;
        let Some(c) = cluster.upgrade() else { return };
        if let Some(d) = &c.outlier {
            d.on_interval(&c.hosts(), Instant::now(), &mut ThreadRoll);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Store;

    /// A fixed sequence of rolls (cycled).
    struct Fixed(Vec<u64>, usize);

    impl Roll for Fixed {
        fn roll(&mut self) -> u64 {
            let v = self.0[self.1 % self.0.len()];
            self.1 += 1;
            v
        }
    }

    fn hosts(n: usize) -> Vec<Arc<Host>> {
        (0..n)
            .map(|i| {
                Arc::new(Host::new(
                    format!("10.0.0.{}:80", i + 1).parse().expect("addr"),
                    None,
                    1,
                    0,
                    0,
                ))
            })
            .collect()
    }

    fn detector(cfg: OutlierConfig) -> (Detector, Arc<Store>) {
        let store = Store::new();
        let d = Detector::new(cfg, "c", &store.cluster("c"));
        (d, store)
    }

    fn stat(store: &Store, name: &str) -> String {
        store
            .text_stat(&format!("cluster.c.outlier_detection.{name}"))
            .unwrap_or_else(|| panic!("no stat {name}"))
    }

    #[test]
    fn envoy_defaults() {
        let d = OutlierConfig::default();
        assert_eq!(d.consecutive_5xx, 5);
        assert_eq!(d.enforcing_consecutive_5xx, 100);
        assert_eq!(d.enforcing_consecutive_gateway_failure, 0);
        assert_eq!(d.enforcing_success_rate, 100);
        assert_eq!(d.enforcing_failure_percentage, 0);
        assert_eq!(d.success_rate_stdev_factor, 1900);
        assert_eq!(d.max_ejection_percent, 10);
        assert_eq!(d.max_ejection_time, Duration::from_secs(300));
    }

    #[test]
    fn ejection_time_grows_and_is_capped() {
        let base = Duration::from_secs(30);
        let max = Duration::from_secs(100);
        let mut b = 0;
        let mut times = Vec::new();
        for _ in 0..6 {
            b = next_backoff(b, base, max);
            times.push(ejection_duration(b, base, max).as_secs());
        }
        // 30, 60, 90, then capped at 100; the multiplier stops growing once
        // multiplier * base >= max + base (here at 5).
        assert_eq!(times, [30, 60, 90, 100, 100, 100]);
        assert_eq!(b, 5);
    }

    #[test]
    fn success_rate_math_matches_envoy_example() {
        // Envoy's comment: {50, 100, 100, 100, 100} -> mean 90, stdev 20, threshold 52 (1.9).
        let (mean, thr) = success_rate_threshold(&[50.0, 100.0, 100.0, 100.0, 100.0], 1.9);
        assert!((mean - 90.0).abs() < 1e-9);
        assert!((thr - 52.0).abs() < 1e-9);
        assert_eq!(success_rate_threshold(&[], 1.9), (-1.0, -1.0));
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_5xx_ejects_and_uneject_after_base_time() {
        let (d, store) = detector(OutlierConfig {
            consecutive_5xx: 3,
            max_ejection_percent: 50,
            base_ejection_time: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            ..Default::default()
        });
        let hs = Arc::new(hosts(2));
        let h = &hs[0];
        // A success in between resets the count.
        d.put(h, HostResult::Status(500), || hs.clone());
        d.put(h, HostResult::Status(500), || hs.clone());
        d.put(h, HostResult::Status(200), || hs.clone());
        d.put(h, HostResult::Status(503), || hs.clone());
        d.put(h, HostResult::Status(500), || hs.clone());
        assert!(h.is_healthy());
        d.put(h, HostResult::Status(501), || hs.clone());
        assert!(!h.is_healthy());
        assert_eq!(
            h.health.load(Ordering::Relaxed),
            health_flags::FAILED_OUTLIER_CHECK
        );
        assert_eq!(stat(&store, "ejections_active"), "1");
        assert_eq!(stat(&store, "ejections_enforced_total"), "1");
        assert_eq!(stat(&store, "ejections_enforced_consecutive_5xx"), "1");
        assert_eq!(stat(&store, "ejections_detected_consecutive_5xx"), "1");
        assert_eq!(stat(&store, "ejections_total"), "1");
        // Gateway failures are detected but not enforced by default (enforcing 0%):
        // 503 and 502... were interleaved with a 500/501 so the gateway count was reset.
        assert_eq!(
            stat(&store, "ejections_detected_consecutive_gateway_failure"),
            "0"
        );

        let t0 = Instant::now();
        let mut roll = Fixed(vec![0], 0);
        d.on_interval(&hs, t0 + Duration::from_secs(20), &mut roll);
        assert!(!h.is_healthy(), "still ejected before 30s");
        d.on_interval(&hs, t0 + Duration::from_secs(30), &mut roll);
        assert!(h.is_healthy(), "back after base_ejection_time");
        assert_eq!(stat(&store, "ejections_active"), "0");
        assert_eq!(h.outlier.num_ejections(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn second_ejection_lasts_longer_and_multiplier_decays() {
        let cfg = OutlierConfig {
            consecutive_5xx: 1,
            max_ejection_percent: 100,
            base_ejection_time: Duration::from_secs(10),
            interval: Duration::from_secs(5),
            ..Default::default()
        };
        let (d, _store) = detector(cfg);
        let hs = hosts(1);
        let h = &hs[0];
        let mut roll = Fixed(vec![0], 0);
        let t0 = Instant::now();
        d.on_consecutive(&hs, h, EjectionType::Consecutive5xx, t0, &mut roll);
        assert!(!h.is_healthy());
        d.on_interval(&hs, t0 + Duration::from_secs(10), &mut roll);
        assert!(h.is_healthy());
        // Ejected again at once: multiplier 2 -> 20 s.
        let t1 = t0 + Duration::from_secs(10);
        d.on_consecutive(&hs, h, EjectionType::Consecutive5xx, t1, &mut roll);
        d.on_interval(&hs, t1 + Duration::from_secs(15), &mut roll);
        assert!(!h.is_healthy(), "second ejection lasts 2 x base");
        let t2 = t1 + Duration::from_secs(20);
        d.on_interval(&hs, t2, &mut roll);
        assert!(h.is_healthy());
        assert_eq!(h.outlier.lock().backoff, 2);
        // One interval healthy: multiplier 1; another: 0.
        d.on_interval(&hs, t2 + Duration::from_secs(5), &mut roll);
        assert_eq!(h.outlier.lock().backoff, 1);
        d.on_interval(&hs, t2 + Duration::from_secs(10), &mut roll);
        assert_eq!(h.outlier.lock().backoff, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_percent_and_always_eject_one() {
        let hs = Arc::new(hosts(2));
        let mut roll = Fixed(vec![0], 0);
        let now = Instant::now();
        // 1 of 2 hosts = 50% > 10%: overflow.
        let (d, store) = detector(OutlierConfig::default());
        d.on_consecutive(&hs, &hs[0], EjectionType::Consecutive5xx, now, &mut roll);
        assert!(hs[0].is_healthy());
        assert_eq!(stat(&store, "ejections_overflow"), "1");
        assert_eq!(stat(&store, "ejections_detected_consecutive_5xx"), "1");
        // always_eject_one_host lets the first through, not the second.
        let (d, store) = detector(OutlierConfig {
            always_eject_one_host: true,
            ..Default::default()
        });
        d.on_consecutive(&hs, &hs[0], EjectionType::Consecutive5xx, now, &mut roll);
        d.on_consecutive(&hs, &hs[1], EjectionType::Consecutive5xx, now, &mut roll);
        assert!(!hs[0].is_healthy());
        assert!(hs[1].is_healthy());
        assert_eq!(stat(&store, "ejections_overflow"), "1");
        assert_eq!(stat(&store, "ejections_active"), "1");
    }

    #[tokio::test(start_paused = true)]
    async fn enforcement_percentage_rolls() {
        let hs = hosts(1);
        let now = Instant::now();
        let (d, store) = detector(OutlierConfig {
            enforcing_consecutive_gateway_failure: 30,
            max_ejection_percent: 100,
            ..Default::default()
        });
        // Roll 30 % 100 = 30 >= 30: not enforced.
        let mut roll = Fixed(vec![30], 0);
        d.on_consecutive(
            &hs,
            &hs[0],
            EjectionType::ConsecutiveGatewayFailure,
            now,
            &mut roll,
        );
        assert!(hs[0].is_healthy());
        // Roll 29: enforced.
        let mut roll = Fixed(vec![29, 0], 0);
        d.on_consecutive(
            &hs,
            &hs[0],
            EjectionType::ConsecutiveGatewayFailure,
            now,
            &mut roll,
        );
        assert!(!hs[0].is_healthy());
        assert_eq!(
            stat(&store, "ejections_detected_consecutive_gateway_failure"),
            "2"
        );
        assert_eq!(
            stat(&store, "ejections_enforced_consecutive_gateway_failure"),
            "1"
        );
        // Gateway failures do not count in the deprecated ejections_total.
        assert_eq!(stat(&store, "ejections_total"), "0");
    }

    #[tokio::test(start_paused = true)]
    async fn local_origin_split() {
        let hs = Arc::new(hosts(1));
        let (d, store) = detector(OutlierConfig {
            split_external_local_origin_errors: true,
            consecutive_local_origin_failure: 2,
            consecutive_5xx: 2,
            max_ejection_percent: 100,
            ..Default::default()
        });
        let h = &hs[0];
        d.put(h, HostResult::ConnectFailed, || hs.clone());
        // A connect success resets the local-origin streak.
        d.put(h, HostResult::ConnectSucceeded, || hs.clone());
        d.put(h, HostResult::Timeout, || hs.clone());
        // Local-origin errors do not count as 5xx with the split.
        assert_eq!(h.outlier.consecutive_5xx.load(Ordering::Relaxed), 0);
        assert!(h.is_healthy());
        d.put(h, HostResult::Reset, || hs.clone());
        assert!(!h.is_healthy());
        assert_eq!(
            stat(
                &store,
                "ejections_enforced_consecutive_local_origin_failure"
            ),
            "1"
        );

        // Without the split, connect failures are 503s (5xx and gateway errors).
        let hs = Arc::new(hosts(1));
        let (d, store) = detector(OutlierConfig {
            consecutive_5xx: 3,
            consecutive_gateway_failure: 2,
            enforcing_consecutive_gateway_failure: 100,
            max_ejection_percent: 100,
            ..Default::default()
        });
        let h = &hs[0];
        d.put(h, HostResult::ConnectSucceeded, || hs.clone());
        d.put(h, HostResult::ConnectFailed, || hs.clone());
        d.put(h, HostResult::Timeout, || hs.clone());
        assert!(!h.is_healthy());
        assert_eq!(
            stat(&store, "ejections_enforced_consecutive_gateway_failure"),
            "1"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn success_rate_and_failure_percentage_sweeps() {
        let hs = Arc::new(hosts(5));
        let (d, store) = detector(OutlierConfig {
            success_rate_request_volume: 10,
            success_rate_minimum_hosts: 5,
            failure_percentage_request_volume: 10,
            failure_percentage_minimum_hosts: 5,
            failure_percentage_threshold: 50,
            enforcing_failure_percentage: 100,
            max_ejection_percent: 100,
            consecutive_5xx: 1000,
            ..Default::default()
        });
        // Host 0: 5/10 successes; the others 10/10.
        for (i, h) in hs.iter().enumerate() {
            for j in 0..10 {
                let code = if i == 0 && j % 2 == 0 { 500 } else { 200 };
                d.put(h, HostResult::Status(code), || hs.clone());
            }
        }
        // Too few requests from host 4's sibling cluster would not count; all have 10 here.
        let mut roll = Fixed(vec![0], 0);
        d.on_interval(&hs, Instant::now(), &mut roll);
        assert!(!hs[0].is_healthy());
        assert!(hs[1..].iter().all(|h| h.is_healthy()));
        assert!((d.success_rate_average(Origin::External) - 90.0).abs() < 1e-9);
        assert!((d.success_rate_ejection_threshold(Origin::External) - 52.0).abs() < 1e-9);
        assert_eq!(hs[1].outlier.success_rate(Origin::External), 100.0);
        assert_eq!(stat(&store, "ejections_enforced_success_rate"), "1");
        // Already ejected by success rate: failure percentage leaves it alone.
        assert_eq!(stat(&store, "ejections_detected_failure_percentage"), "0");
        // The counters were swapped out: the next sweep sees no data.
        d.on_interval(&hs, Instant::now(), &mut roll);
        assert_eq!(d.success_rate_average(Origin::External), -1.0);
        assert_eq!(hs[1].outlier.success_rate(Origin::External), -1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_percentage_alone() {
        let hs = Arc::new(hosts(5));
        let (d, store) = detector(OutlierConfig {
            success_rate_minimum_hosts: 100,
            failure_percentage_request_volume: 4,
            failure_percentage_threshold: 50,
            enforcing_failure_percentage: 100,
            max_ejection_percent: 100,
            consecutive_5xx: 1000,
            ..Default::default()
        });
        for (i, h) in hs.iter().enumerate() {
            for j in 0..4 {
                let code = if i == 2 && j < 2 { 503 } else { 200 };
                d.put(h, HostResult::Status(code), || hs.clone());
            }
        }
        // Host 4 has too little volume to count.
        let mut roll = Fixed(vec![0], 0);
        d.on_interval(&hs, Instant::now(), &mut roll);
        assert!(!hs[2].is_healthy(), "50% failures >= 50% threshold");
        assert_eq!(stat(&store, "ejections_enforced_failure_percentage"), "1");
        assert_eq!(d.success_rate_average(Origin::External), -1.0);
    }

    #[test]
    fn translation() {
        let pb: PbOutlier = weir_xds_api::from_yaml(
            "{consecutive_5xx: 3, interval: 1s, base_ejection_time: 2s, max_ejection_percent: 50, enforcing_consecutive_gateway_failure: 100, split_external_local_origin_errors: true, always_eject_one_host: true}",
        )
        .expect("yaml");
        let mut errs = Errors::default();
        let c = translate_outlier(&pb, "o", &mut errs);
        assert!(errs.0.is_empty(), "{:?}", errs.0);
        assert_eq!(c.consecutive_5xx, 3);
        assert_eq!(c.interval, Duration::from_secs(1));
        assert_eq!(c.base_ejection_time, Duration::from_secs(2));
        assert_eq!(c.max_ejection_time, Duration::from_secs(300));
        assert_eq!(c.max_ejection_percent, 50);
        assert_eq!(c.enforcing_consecutive_gateway_failure, 100);
        assert!(c.split_external_local_origin_errors && c.always_eject_one_host);
        assert_eq!(c.success_rate_request_volume, 100);

        for (yaml, path) in [
            ("{max_ejection_percent: 101}", "o.max_ejection_percent"),
            ("{enforcing_success_rate: 200}", "o.enforcing_success_rate"),
            ("{interval: 0s}", "o.interval"),
            (
                "{base_ejection_time: 10s, max_ejection_time: 5s}",
                "o.max_ejection_time",
            ),
            ("{monitors: [{name: x}]}", "o.monitors"),
        ] {
            let pb: PbOutlier = weir_xds_api::from_yaml(yaml).expect("yaml");
            let mut errs = Errors::default();
            translate_outlier(&pb, "o", &mut errs);
            let paths: Vec<_> = errs.0.iter().map(|e| e.path.clone()).collect();
            assert_eq!(paths, vec![path.to_string()], "{yaml}");
        }
        // A base above Envoy's 300 s default max lifts the default max.
        let pb: PbOutlier = weir_xds_api::from_yaml("{base_ejection_time: 400s}").expect("yaml");
        let mut errs = Errors::default();
        let c = translate_outlier(&pb, "o", &mut errs);
        assert_eq!(c.max_ejection_time, Duration::from_secs(400));
    }

    #[test]
    fn translated_through_the_cluster() {
        let pb: weir_xds_api::pb::envoy::config::cluster::v3::Cluster = weir_xds_api::from_yaml(
            "name: c\noutlier_detection: {consecutive_5xx: 7, max_ejection_percent: 300}\n",
        )
        .expect("yaml");
        let mut errs = Errors::default();
        let c = crate::upstream::translate_cluster(&pb, "clusters[0]", &mut errs).expect("c");
        let paths: Vec<_> = errs.0.iter().map(|e| e.path.clone()).collect();
        assert_eq!(
            paths,
            vec!["clusters[0].outlier_detection.max_ejection_percent"]
        );
        assert_eq!(c.outlier.map(|o| o.consecutive_5xx), Some(7));
    }
}
