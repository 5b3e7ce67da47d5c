//! `envoy.filters.http.local_ratelimit` and the connection limiter of
//! `envoy.filters.network.local_ratelimit`.
//!
//! # HTTP filter (Envoy semantics)
//! Per request, with the config in force (the route's or virtual host's
//! `typed_per_filter_config` replaces the listener-level one, with its own buckets and stats):
//! 1. `filter_enabled` (default 0%) rolls; disabled -> continue, no stats.
//!    `<stat_prefix>.http_local_rate_limit.enabled` += 1.
//! 2. Descriptors: the filter's own `rate_limits`, else the route's `rate_limits` (plus the
//!    virtual host's per `vh_rate_limits`: OVERRIDE = only when the route has none, INCLUDE,
//!    IGNORE; the route's `include_vh_rate_limits` forces INCLUDE), entries with the filter's
//!    `stage`. A request descriptor matches a configured descriptor whose entries are equal;
//!    an entry with an empty value is a wildcard with one bucket per distinct value (Envoy's
//!    dynamic descriptors, at most `max_dynamic_descriptors` (default 20) per wildcard
//!    descriptor; past it an arbitrary one is evicted). Exact descriptors win over wildcards.
//! 3. Matched buckets are consumed lowest fill rate first; the first empty one limits. The
//!    default `token_bucket` is consumed when nothing matched or with
//!    `always_consume_default_token_bucket` (default true); without a default bucket the
//!    request passes.
//! 4. Allowed -> `ok`. Limited -> `rate_limited`; then `filter_enforced` (default 0%) rolls:
//!    not enforced -> `request_headers_to_add_when_not_enforced` and continue; enforced ->
//!    `enforced`, local reply `status` (default 429, < 400 means 429) with body
//!    `local_rate_limited`, `x-envoy-ratelimited: true`, `response_headers_to_add`, flag `RL`;
//!    gRPC requests get UNAVAILABLE (RESOURCE_EXHAUSTED with
//!    `rate_limited_as_resource_exhausted`).
//! 5. `enable_x_ratelimit_headers: DRAFT_VERSION_03` adds `x-ratelimit-limit` (bucket
//!    `max_tokens`), `x-ratelimit-remaining` and `x-ratelimit-reset` (seconds until the bucket
//!    is full again) to the response, from the bucket that decided.
//!
//! Buckets are shared by all workers (governor, lock-free), or per downstream connection with
//! `local_rate_limit_per_downstream_connection`.
//!
//! Not supported (rejected): `local_cluster_rate_limit`, `enable_retry_after_header`,
//! descriptor `shadow_mode`, runtime overrides (the `default_value` of runtime fractions
//! applies).

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use http::{HeaderName, HeaderValue, StatusCode};
use metrics::Counter;
use weir_xds_api::Any;
use weir_xds_api::pb::envoy::extensions::common::ratelimit::v3 as crl;
use weir_xds_api::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use weir_xds_api::pb::envoy::extensions::filters::network::local_ratelimit::v3::LocalRateLimit as NetLocalRateLimit;

use crate::chain::{FilterContext, StreamInfo};
use crate::config::{ConfigErrors, FactoryContext, Fraction, HeaderAdd, StatScope, join};
use crate::matcher::unpack_or_error;
use crate::ratelimit::{Descriptor, RateLimitPolicy};
use crate::token_bucket::{BucketSpec, Consumed, TokenBucket};
use crate::{FilterAction, HttpFilter, HttpFilterFactory, LocalReply, type_urls};

/// Envoy's minimum `fill_interval` for local rate limit buckets.
pub const MIN_FILL_INTERVAL: Duration = Duration::from_millis(50);
/// Default `max_dynamic_descriptors`.
const DEFAULT_MAX_DYNAMIC: usize = 20;

const X_ENVOY_RATELIMITED: HeaderName = HeaderName::from_static("x-envoy-ratelimited");
const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// `<stat_prefix>.http_local_rate_limit.*`.
#[derive(Debug, Clone)]
struct Stats {
    enabled: Counter,
    enforced: Counter,
    rate_limited: Counter,
    ok: Counter,
}

impl Stats {
    fn new(prefix: &str, ctx: &dyn FactoryContext) -> Self {
        let dotted = format!("{prefix}.http_local_rate_limit.");
        let scope = StatScope::Tagged {
            dotted: &dotted,
            prom: "envoy_http_local_rate_limit_",
            label: "envoy_local_http_ratelimit_prefix",
            value: prefix,
        };
        Stats {
            enabled: ctx.counter(scope, "enabled"),
            enforced: ctx.counter(scope, "enforced"),
            rate_limited: ctx.counter(scope, "rate_limited"),
            ok: ctx.counter(scope, "ok"),
        }
    }
}

/// One configured descriptor entry: `None` value = wildcard.
type RuleEntry = (String, Option<String>);

/// A configured descriptor.
#[derive(Debug)]
struct Rule {
    entries: Vec<RuleEntry>,
    spec: BucketSpec,
}

impl Rule {
    fn wildcard(&self) -> bool {
        self.entries.iter().any(|(_, v)| v.is_none())
    }

    fn matches(&self, d: &Descriptor) -> bool {
        self.entries.len() == d.0.len()
            && self
                .entries
                .iter()
                .zip(&d.0)
                .all(|((rk, rv), (k, v))| rk == k && rv.as_ref().is_none_or(|rv| rv == v))
    }
}

/// The buckets of one config (shared, or one set per connection).
#[derive(Debug)]
struct Buckets {
    default: Option<TokenBucket>,
    /// Parallel to `Config::rules`: exact rules have a bucket, wildcard rules a map.
    rules: Vec<RuleBuckets>,
}

#[derive(Debug)]
enum RuleBuckets {
    Exact(TokenBucket),
    Dynamic(DashMap<Descriptor, Arc<TokenBucket>>),
}

enum Bucket<'a> {
    Borrowed(&'a TokenBucket),
    Owned(Arc<TokenBucket>),
}

impl Bucket<'_> {
    fn get(&self) -> &TokenBucket {
        match self {
            Bucket::Borrowed(b) => b,
            Bucket::Owned(b) => b,
        }
    }
}

/// `vh_rate_limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VhRateLimits {
    Override,
    Include,
    Ignore,
}

/// A compiled `LocalRateLimit` (listener level or per route).
#[derive(Debug)]
pub struct Config {
    stats: Stats,
    status: StatusCode,
    default_spec: Option<BucketSpec>,
    rules: Vec<Rule>,
    enabled: Fraction,
    enforced: Fraction,
    response_headers: Vec<HeaderAdd>,
    request_headers_not_enforced: Vec<HeaderAdd>,
    x_ratelimit_headers: bool,
    stage: u32,
    always_consume_default: bool,
    per_connection: bool,
    vh_rate_limits: VhRateLimits,
    rate_limits: Vec<RateLimitPolicy>,
    resource_exhausted: bool,
    max_dynamic: usize,
    /// Shared buckets (unused with `per_connection`).
    shared: Buckets,
}

impl Config {
    fn buckets(&self) -> Buckets {
        Buckets {
            default: self.default_spec.map(TokenBucket::new),
            rules: self
                .rules
                .iter()
                .map(|r| {
                    if r.wildcard() {
                        RuleBuckets::Dynamic(DashMap::new())
                    } else {
                        RuleBuckets::Exact(TokenBucket::new(r.spec))
                    }
                })
                .collect(),
        }
    }

    /// Translate a `LocalRateLimit`. `per_route` requires a token bucket (Envoy).
    pub fn translate(
        c: &LocalRateLimit,
        path: &str,
        per_route: bool,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<Config> {
        errs.reject_unsupported(
            c,
            &[
                "stat_prefix",
                "status",
                "token_bucket",
                "filter_enabled",
                "filter_enforced",
                "request_headers_to_add_when_not_enforced",
                "response_headers_to_add",
                "descriptors",
                "stage",
                "local_rate_limit_per_downstream_connection",
                "enable_x_ratelimit_headers",
                "vh_rate_limits",
                "always_consume_default_token_bucket",
                "rate_limited_as_resource_exhausted",
                "rate_limits",
                "max_dynamic_descriptors",
            ],
            path,
        );
        let before = errs.len();
        if c.stat_prefix.is_empty() {
            errs.add(join(path, "stat_prefix"), "stat_prefix is required");
        }
        let status = match &c.status {
            Some(s) if s.code >= 400 => StatusCode::from_u16(s.code as u16).unwrap_or_else(|_| {
                errs.add(join(path, "status.code"), "not a valid HTTP status");
                StatusCode::TOO_MANY_REQUESTS
            }),
            // Envoy: below 400 means 429.
            _ => StatusCode::TOO_MANY_REQUESTS,
        };
        let default_spec = c.token_bucket.as_ref().and_then(|tb| {
            BucketSpec::translate(tb, &join(path, "token_bucket"), MIN_FILL_INTERVAL, errs)
        });
        if per_route && c.token_bucket.is_none() {
            errs.add(
                join(path, "token_bucket"),
                "a per-route local rate limit config needs a token_bucket",
            );
        }
        let mut rules = Vec::new();
        for (i, d) in c.descriptors.iter().enumerate() {
            let dp = format!("{path}.descriptors[{i}]");
            errs.reject_unsupported(d, &["entries", "token_bucket"], &dp);
            if d.entries.is_empty() {
                errs.add(join(&dp, "entries"), "at least one entry is required");
            }
            let entries: Vec<RuleEntry> = d
                .entries
                .iter()
                .enumerate()
                .map(|(j, e)| {
                    let ep = format!("{dp}.entries[{j}]");
                    errs.reject_unsupported(e, &["key", "value"], &ep);
                    if e.key.is_empty() {
                        errs.add(join(&ep, "key"), "key is required");
                    }
                    (
                        e.key.clone(),
                        (!e.value.is_empty()).then(|| e.value.clone()),
                    )
                })
                .collect();
            let spec = match &d.token_bucket {
                Some(tb) => {
                    BucketSpec::translate(tb, &join(&dp, "token_bucket"), MIN_FILL_INTERVAL, errs)
                }
                None => {
                    errs.add(join(&dp, "token_bucket"), "token_bucket is required");
                    None
                }
            };
            if rules.iter().any(|r: &Rule| r.entries == entries) {
                errs.add(&dp, "duplicate descriptor");
            }
            if let Some(spec) = spec {
                rules.push(Rule { entries, spec });
            }
        }
        let x_ratelimit_headers =
            match crl::XRateLimitHeadersRfcVersion::try_from(c.enable_x_ratelimit_headers) {
                Ok(crl::XRateLimitHeadersRfcVersion::Off) => false,
                Ok(crl::XRateLimitHeadersRfcVersion::DraftVersion03) => true,
                Err(_) => {
                    errs.add(join(path, "enable_x_ratelimit_headers"), "unknown value");
                    false
                }
            };
        let vh_rate_limits = match crl::VhRateLimitsOptions::try_from(c.vh_rate_limits) {
            Ok(crl::VhRateLimitsOptions::Override) => VhRateLimits::Override,
            Ok(crl::VhRateLimitsOptions::Include) => VhRateLimits::Include,
            Ok(crl::VhRateLimitsOptions::Ignore) => VhRateLimits::Ignore,
            Err(_) => {
                errs.add(join(path, "vh_rate_limits"), "unknown value");
                VhRateLimits::Override
            }
        };
        if c.stage > 10 {
            errs.add(join(path, "stage"), "must be between 0 and 10");
        }
        let mut rate_limits = Vec::new();
        for (i, rl) in c.rate_limits.iter().enumerate() {
            let rp = format!("{path}.rate_limits[{i}]");
            if rl.stage.is_some() {
                errs.add(join(&rp, "stage"), "stage is not supported here (Envoy)");
            }
            if let Some(p) = RateLimitPolicy::translate(rl, &rp, ctx, errs) {
                rate_limits.push(p);
            }
        }
        let max_dynamic = match c.max_dynamic_descriptors {
            Some(v) if v.value == 0 => {
                errs.add(join(path, "max_dynamic_descriptors"), "must be at least 1");
                DEFAULT_MAX_DYNAMIC
            }
            Some(v) => v.value as usize,
            None => DEFAULT_MAX_DYNAMIC,
        };
        let cfg = Config {
            stats: Stats::new(&c.stat_prefix, ctx),
            status,
            default_spec,
            rules,
            enabled: Fraction::translate_runtime(
                c.filter_enabled.as_ref(),
                Fraction::NONE,
                &join(path, "filter_enabled"),
                errs,
            ),
            enforced: Fraction::translate_runtime(
                c.filter_enforced.as_ref(),
                Fraction::NONE,
                &join(path, "filter_enforced"),
                errs,
            ),
            response_headers: HeaderAdd::translate_all(
                &c.response_headers_to_add,
                &join(path, "response_headers_to_add"),
                errs,
            ),
            request_headers_not_enforced: HeaderAdd::translate_all(
                &c.request_headers_to_add_when_not_enforced,
                &join(path, "request_headers_to_add_when_not_enforced"),
                errs,
            ),
            x_ratelimit_headers,
            stage: c.stage,
            always_consume_default: c
                .always_consume_default_token_bucket
                .is_none_or(|b| b.value),
            per_connection: c.local_rate_limit_per_downstream_connection,
            vh_rate_limits,
            rate_limits,
            resource_exhausted: c.rate_limited_as_resource_exhausted,
            max_dynamic,
            shared: Buckets {
                default: None,
                rules: Vec::new(),
            },
        };
        if errs.len() != before {
            return None;
        }
        let shared = if cfg.per_connection {
            Buckets {
                default: None,
                rules: Vec::new(),
            }
        } else {
            cfg.buckets()
        };
        Some(Config { shared, ..cfg })
    }

    /// The request's descriptors (Envoy's `populateDescriptors`).
    fn descriptors(&self, req: &http::request::Parts, s: &StreamInfo<'_>) -> Vec<Descriptor> {
        let mut out = Vec::new();
        if self.rules.is_empty() {
            return out;
        }
        let head = s.head(req);
        let ip = s.downstream_remote.ip();
        let mut add = |policies: &[RateLimitPolicy], check_stage: bool| {
            for p in policies {
                if (!check_stage || p.stage == self.stage)
                    && let Some(d) = p.descriptor(&head, ip)
                {
                    out.push(d);
                }
            }
        };
        if !self.rate_limits.is_empty() {
            add(&self.rate_limits, false);
            return out;
        }
        let Some(route) = s.route else { return out };
        add(route.route_rate_limits, true);
        let vh = if route.include_vh_rate_limits {
            VhRateLimits::Include
        } else {
            self.vh_rate_limits
        };
        match vh {
            VhRateLimits::Include => add(&route.vhost.rate_limits, true),
            VhRateLimits::Override if route.route_rate_limits.is_empty() => {
                add(&route.vhost.rate_limits, true)
            }
            VhRateLimits::Override | VhRateLimits::Ignore => {}
        }
        out
    }

    /// Envoy's `LocalRateLimiterImpl::requestAllowed`: the outcome and the deciding bucket.
    fn check(&self, buckets: &Buckets, descriptors: &[Descriptor]) -> Option<(Consumed, u32)> {
        let mut matched: Vec<Bucket<'_>> = Vec::new();
        for d in descriptors {
            // Exact descriptors first, then wildcards.
            let hit = self
                .rules
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.wildcard())
                .chain(self.rules.iter().enumerate().filter(|(_, r)| r.wildcard()))
                .find(|(_, r)| r.matches(d));
            let Some((i, rule)) = hit else { continue };
            match buckets.rules.get(i) {
                Some(RuleBuckets::Exact(b)) => matched.push(Bucket::Borrowed(b)),
                Some(RuleBuckets::Dynamic(m)) => {
                    let b = match m.get(d) {
                        Some(b) => b.clone(),
                        None => {
                            if m.len() >= self.max_dynamic {
                                let victim = m.iter().next().map(|e| e.key().clone());
                                if let Some(v) = victim {
                                    m.remove(&v);
                                }
                            }
                            m.entry(d.clone())
                                .or_insert_with(|| Arc::new(TokenBucket::new(rule.spec)))
                                .clone()
                        }
                    };
                    matched.push(Bucket::Owned(b));
                }
                None => {}
            }
        }
        matched.sort_by(|a, b| {
            a.get()
                .spec()
                .fill_rate()
                .total_cmp(&b.get().spec().fill_rate())
        });
        let mut first: Option<(Consumed, u32)> = None;
        for b in &matched {
            let c = b.get().consume();
            let r = (c, b.get().spec().max_tokens);
            if !c.allowed {
                return Some(r);
            }
            first.get_or_insert(r);
        }
        if (matched.is_empty() || self.always_consume_default)
            && let Some(d) = &buckets.default
        {
            let c = d.consume();
            if !c.allowed || first.is_none() {
                return Some((c, d.spec().max_tokens));
            }
        }
        first
    }
}

/// Per-request state for the x-ratelimit headers.
struct Decision {
    consumed: Consumed,
    limit: u32,
}

/// The HTTP filter.
#[derive(Debug)]
pub struct LocalRateLimitFilter {
    config: Arc<Config>,
}

impl LocalRateLimitFilter {
    fn decide(
        &self,
        cfg: &Config,
        req: &http::request::Parts,
        s: &StreamInfo<'_>,
    ) -> Option<(Consumed, u32)> {
        let descriptors = cfg.descriptors(req, s);
        if cfg.per_connection {
            let key = cfg as *const Config as usize;
            let b = s
                .connection
                .get_or_insert_with(key, || ConnBuckets(cfg.buckets()));
            cfg.check(&b.0, &descriptors)
        } else {
            cfg.check(&cfg.shared, &descriptors)
        }
    }
}

#[derive(Debug)]
struct ConnBuckets(Buckets);

impl HttpFilter for LocalRateLimitFilter {
    fn name(&self) -> &str {
        "envoy.filters.http.local_ratelimit"
    }

    fn on_request(
        &self,
        req: &mut http::request::Parts,
        ctx: &mut FilterContext<'_>,
    ) -> FilterAction {
        let cfg: &Config = ctx.route_config_as::<Config>().unwrap_or(&self.config);
        let s = ctx.stream;
        if !cfg.enabled.hit(s.roll()) {
            return FilterAction::Continue;
        }
        cfg.stats.enabled.increment(1);
        let decision = self.decide(cfg, req, s);
        let allowed = decision.is_none_or(|(c, _)| c.allowed);
        if cfg.x_ratelimit_headers
            && let Some((consumed, limit)) = decision
        {
            ctx.set_state(Decision { consumed, limit });
        }
        if allowed {
            cfg.stats.ok.increment(1);
            return FilterAction::Continue;
        }
        cfg.stats.rate_limited.increment(1);
        if !cfg.enforced.hit(s.roll()) {
            for h in &cfg.request_headers_not_enforced {
                h.apply(&mut req.headers);
            }
            return FilterAction::Continue;
        }
        cfg.stats.enforced.increment(1);
        let mut reply = LocalReply::new(cfg.status, "local_rate_limited", "RL");
        reply
            .headers
            .insert(X_ENVOY_RATELIMITED, HeaderValue::from_static("true"));
        for h in &cfg.response_headers {
            h.apply(&mut reply.headers);
        }
        // gRPC: UNAVAILABLE, or RESOURCE_EXHAUSTED when configured.
        reply.grpc_status = s
            .is_grpc
            .then_some(if cfg.resource_exhausted { 8 } else { 14 });
        FilterAction::Respond(reply)
    }

    fn on_response(&self, resp: &mut http::response::Parts, ctx: &mut FilterContext<'_>) {
        if let Some(d) = ctx.take_state::<Decision>() {
            let reset = d.consumed.reset.as_secs() + u64::from(d.consumed.reset.subsec_nanos() > 0);
            resp.headers.insert(X_RATELIMIT_LIMIT, d.limit.into());
            resp.headers
                .insert(X_RATELIMIT_REMAINING, d.consumed.remaining.into());
            resp.headers.insert(X_RATELIMIT_RESET, reset.into());
        }
    }
}

/// Factory for `envoy.filters.http.local_ratelimit`.
#[derive(Debug)]
pub struct Factory;

impl HttpFilterFactory for Factory {
    fn type_url(&self) -> &'static str {
        type_urls::LOCAL_RATELIMIT
    }

    fn create(
        &self,
        config: &Any,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<Arc<dyn HttpFilter>> {
        let c = unpack_or_error(config, path, errs)?;
        let config = Config::translate(&c, path, false, ctx, errs)?;
        Some(Arc::new(LocalRateLimitFilter {
            config: Arc::new(config),
        }))
    }

    fn create_route_config(
        &self,
        config: &Any,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let c = unpack_or_error(config, path, errs)?;
        let config = Config::translate(&c, path, true, ctx, errs)?;
        Some(Arc::new(config))
    }
}

/// `envoy.filters.network.local_ratelimit`: a connection token bucket per filter chain.
/// Each new connection takes a token; without one it is closed at once and
/// `local_rate_limit.<stat_prefix>.rate_limited` counts it (the name Envoy's code registers;
/// its docs say `local_ratelimit.`).
#[derive(Debug)]
pub struct ConnectionLimiter {
    /// `stat_prefix`.
    pub stat_prefix: String,
    bucket: TokenBucket,
    enabled: bool,
    rate_limited: Counter,
}

impl ConnectionLimiter {
    /// Translate a network `LocalRateLimit` at `path`.
    pub fn translate(
        any: &Any,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<ConnectionLimiter> {
        let c: NetLocalRateLimit = unpack_or_error(any, path, errs)?;
        errs.reject_unsupported(
            &c,
            &["stat_prefix", "token_bucket", "runtime_enabled"],
            path,
        );
        let before = errs.len();
        if c.stat_prefix.is_empty() {
            errs.add(join(path, "stat_prefix"), "stat_prefix is required");
        }
        let spec = match &c.token_bucket {
            Some(tb) => {
                BucketSpec::translate(tb, &join(path, "token_bucket"), MIN_FILL_INTERVAL, errs)
            }
            None => {
                errs.add(join(path, "token_bucket"), "token_bucket is required");
                None
            }
        };
        let enabled = match &c.runtime_enabled {
            Some(f) => {
                let fp = join(path, "runtime_enabled");
                errs.reject_unsupported(f, &["default_value", "runtime_key"], &fp);
                match f.default_value {
                    Some(b) => b.value,
                    None => {
                        errs.add(join(&fp, "default_value"), "default_value is required");
                        true
                    }
                }
            }
            None => true,
        };
        if errs.len() != before {
            return None;
        }
        let dotted = format!("local_rate_limit.{}.", c.stat_prefix);
        let rate_limited = ctx.counter(
            StatScope::Tagged {
                dotted: &dotted,
                prom: "envoy_local_rate_limit_",
                label: "envoy_local_network_ratelimit_prefix",
                value: &c.stat_prefix,
            },
            "rate_limited",
        );
        Some(ConnectionLimiter {
            stat_prefix: c.stat_prefix,
            bucket: TokenBucket::new(spec?),
            enabled,
            rate_limited,
        })
    }

    /// Whether a new connection may proceed (counts `rate_limited` when not).
    pub fn allow(&self) -> bool {
        if !self.enabled || self.bucket.consume().allowed {
            return true;
        }
        self.rate_limited.increment(1);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::{
        ChainEntry, ChainState, ConnectionState, FilterChain, HealthyServer, PerFilterConfig,
        PerFilterConfigs, RouteFilterData, RouteView,
    };
    use crate::ratelimit::tests::{TestCtx, policy};

    fn lrl(yaml: &str, per_route: bool) -> Result<Config, Vec<(String, String)>> {
        let c: LocalRateLimit = weir_xds_api::from_yaml(yaml).expect("yaml");
        let mut errs = ConfigErrors::default();
        let cfg = Config::translate(&c, "f", per_route, &TestCtx, &mut errs);
        if errs.is_empty() {
            Ok(cfg.expect("config"))
        } else {
            Err(errs.0)
        }
    }

    const ON: &str = "filter_enabled: {default_value: {numerator: 100}}\nfilter_enforced: {default_value: {numerator: 100}}\n";

    fn run<'a>(
        chain: &FilterChain,
        route: Option<RouteView<'a>>,
        remote: &str,
        conn: &'a ConnectionState,
        headers: &[(&str, &str)],
    ) -> (Option<LocalReply>, http::HeaderMap) {
        let info = StreamInfo::new(
            remote.parse().expect("addr"),
            "127.0.0.1:80".parse().expect("addr"),
            1,
            false,
            "a",
            "/",
            "http",
            route,
            &HealthyServer,
            conn,
            7,
        );
        let mut req = http::Request::new(());
        for (k, v) in headers {
            req.headers_mut().insert(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        let (mut parts, _) = req.into_parts();
        let mut st = ChainState::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let r = rt.block_on(chain.decode(&mut parts, &info, &mut st)).err();
        let resp = chain.encode(http::Response::new(crate::body::empty()), &info, &mut st);
        (r, resp.headers().clone())
    }

    fn chain(cfg: Config) -> FilterChain {
        FilterChain::new(vec![ChainEntry {
            name: "rl".into(),
            filter: Arc::new(LocalRateLimitFilter {
                config: Arc::new(cfg),
            }),
            disabled: false,
            type_url: String::new(),
        }])
    }

    #[test]
    fn default_bucket_limits_after_max_tokens_with_headers() {
        let c = chain(
            lrl(
                &format!(
                    "stat_prefix: p\n{ON}token_bucket: {{max_tokens: 3, fill_interval: 3600s}}\nenable_x_ratelimit_headers: DRAFT_VERSION_03\nresponse_headers_to_add: [{{header: {{key: x-limited, value: 'yes'}}}}]\n"
                ),
                false,
            )
            .expect("valid"),
        );
        let conn = ConnectionState::default();
        for want_remaining in [2u32, 1, 0] {
            let (r, h) = run(&c, None, "10.0.0.1:1", &conn, &[]);
            assert!(r.is_none());
            assert_eq!(h[&X_RATELIMIT_LIMIT], "3");
            assert_eq!(
                h[&X_RATELIMIT_REMAINING],
                want_remaining.to_string().as_str()
            );
        }
        let (r, h) = run(&c, None, "10.0.0.1:1", &conn, &[]);
        let r = r.expect("limited");
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.flag, "RL");
        assert_eq!(r.headers[&X_ENVOY_RATELIMITED], "true");
        assert_eq!(r.headers["x-limited"], "yes");
        assert_eq!(h[&X_RATELIMIT_REMAINING], "0");
        assert_eq!(h[&X_RATELIMIT_RESET], "10800");
    }

    #[test]
    fn disabled_and_not_enforced() {
        // filter_enabled defaults to 0%: never limits.
        let c = chain(
            lrl(
                "stat_prefix: p\ntoken_bucket: {max_tokens: 1, fill_interval: 3600s}\n",
                false,
            )
            .expect("valid"),
        );
        let conn = ConnectionState::default();
        for _ in 0..3 {
            assert!(run(&c, None, "10.0.0.1:1", &conn, &[]).0.is_none());
        }
        // Enabled, not enforced: passes.
        let c = chain(
            lrl(
                "stat_prefix: p\nfilter_enabled: {default_value: {numerator: 100}}\ntoken_bucket: {max_tokens: 1, fill_interval: 3600s}\nrequest_headers_to_add_when_not_enforced: [{header: {key: x-would-limit, value: '1'}}]\n",
                false,
            )
            .expect("valid"),
        );
        for _ in 0..3 {
            assert!(run(&c, None, "10.0.0.1:1", &conn, &[]).0.is_none());
        }
    }

    fn view<'a>(
        route: &'a RouteFilterData,
        vhost: &'a RouteFilterData,
        rl: &'a [RateLimitPolicy],
    ) -> RouteView<'a> {
        RouteView {
            route_name: "r",
            route,
            vhost,
            route_rate_limits: rl,
            include_vh_rate_limits: false,
        }
    }

    #[test]
    fn per_client_ip_wildcard_and_exact_descriptors() {
        let c = chain(
            lrl(
                &format!(
                    "stat_prefix: p\n{ON}token_bucket: {{max_tokens: 100, fill_interval: 3600s}}\n\
                     descriptors:\n\
                     - entries: [{{key: remote_address}}]\n  token_bucket: {{max_tokens: 2, fill_interval: 3600s}}\n\
                     - entries: [{{key: remote_address, value: 10.9.9.9}}]\n  token_bucket: {{max_tokens: 1, fill_interval: 3600s}}\n"
                ),
                false,
            )
            .expect("valid"),
        );
        let rl = [policy("actions: [{remote_address: {}}]\n").expect("valid")];
        let (route, vhost) = (RouteFilterData::default(), RouteFilterData::default());
        let v = view(&route, &vhost, &rl);
        let conn = ConnectionState::default();
        let limited = |ip: &str| run(&c, Some(v), ip, &conn, &[]).0.is_some();
        assert!(!limited("10.0.0.1:1") && !limited("10.0.0.1:2"));
        assert!(limited("10.0.0.1:3"), "third request of one client");
        // Another client has its own bucket.
        assert!(!limited("10.0.0.2:1") && !limited("10.0.0.2:1"));
        assert!(limited("10.0.0.2:1"));
        // The exact descriptor wins over the wildcard.
        assert!(!limited("10.9.9.9:1"));
        assert!(limited("10.9.9.9:1"));
        // No route (no descriptors): the default bucket only.
        assert!(run(&c, None, "10.0.0.1:1", &conn, &[]).0.is_none());
    }

    #[test]
    fn wildcard_buckets_are_bounded() {
        let cfg = lrl(
            &format!(
                "stat_prefix: p\n{ON}max_dynamic_descriptors: 2\n\
                 descriptors:\n- entries: [{{key: user}}]\n  token_bucket: {{max_tokens: 1, fill_interval: 3600s}}\n"
            ),
            false,
        )
        .expect("valid");
        let d = |u: &str| Descriptor(vec![("user".to_string(), u.to_string())]);
        for u in 0..10 {
            let (c, _) = cfg
                .check(&cfg.shared, &[d(&u.to_string())])
                .expect("matched");
            assert!(c.allowed, "a new value gets a full bucket");
        }
        let Some(RuleBuckets::Dynamic(m)) = cfg.shared.rules.first() else {
            panic!("wildcard rule has a dynamic map");
        };
        assert!(m.len() <= 2, "bounded: {}", m.len());
        // The most recent value keeps its (empty) bucket.
        let (c, _) = cfg.check(&cfg.shared, &[d("9")]).expect("matched");
        assert!(!c.allowed);
        // A descriptor with another key matches nothing; no default bucket: no decision.
        assert!(
            cfg.check(&cfg.shared, &[Descriptor(vec![("k".into(), "v".into())])])
                .is_none()
        );
    }

    #[test]
    fn per_route_override_has_its_own_bucket_and_vh_options() {
        let listener = lrl(
            &format!("stat_prefix: l\n{ON}token_bucket: {{max_tokens: 1, fill_interval: 3600s}}\n"),
            false,
        )
        .expect("valid");
        let route_cfg = lrl(
            &format!("stat_prefix: r\n{ON}token_bucket: {{max_tokens: 2, fill_interval: 3600s}}\n"),
            true,
        )
        .expect("valid");
        let c = chain(listener);
        let route = RouteFilterData {
            per_filter: PerFilterConfigs(vec![(
                "rl".into(),
                PerFilterConfig::Config(Arc::new(route_cfg)),
            )]),
            rate_limits: vec![],
        };
        let vhost = RouteFilterData::default();
        let v = view(&route, &vhost, &[]);
        let conn = ConnectionState::default();
        assert!(run(&c, Some(v), "10.0.0.1:1", &conn, &[]).0.is_none());
        assert!(run(&c, Some(v), "10.0.0.1:1", &conn, &[]).0.is_none());
        assert!(run(&c, Some(v), "10.0.0.1:1", &conn, &[]).0.is_some());
        // The listener bucket is untouched by the route's traffic.
        assert!(run(&c, None, "10.0.0.1:1", &conn, &[]).0.is_none());
        assert!(run(&c, None, "10.0.0.1:1", &conn, &[]).0.is_some());
    }

    #[test]
    fn per_connection_buckets() {
        let c = chain(
            lrl(
                &format!("stat_prefix: p\n{ON}local_rate_limit_per_downstream_connection: true\ntoken_bucket: {{max_tokens: 1, fill_interval: 3600s}}\n"),
                false,
            )
            .expect("valid"),
        );
        let (a, b) = (ConnectionState::default(), ConnectionState::default());
        assert!(run(&c, None, "10.0.0.1:1", &a, &[]).0.is_none());
        assert!(run(&c, None, "10.0.0.1:1", &a, &[]).0.is_some());
        assert!(run(&c, None, "10.0.0.1:2", &b, &[]).0.is_none());
    }

    #[test]
    fn vhost_rate_limits_follow_vh_rate_limits() {
        let cfg = |vh: &str| {
            chain(
                lrl(
                    &format!(
                        "stat_prefix: p\n{ON}vh_rate_limits: {vh}\ndescriptors:\n- entries: [{{key: generic_key, value: vh}}]\n  token_bucket: {{max_tokens: 1, fill_interval: 3600s}}\n"
                    ),
                    false,
                )
                .expect("valid"),
            )
        };
        let vhost = RouteFilterData {
            per_filter: PerFilterConfigs::default(),
            rate_limits: vec![
                policy("actions: [{generic_key: {descriptor_value: vh}}]\n").expect("valid"),
            ],
        };
        let route = RouteFilterData::default();
        let other =
            [policy("actions: [{generic_key: {descriptor_value: route}}]\n").expect("valid")];
        let conn = ConnectionState::default();
        // OVERRIDE: the virtual host's apply only when the route has none.
        let c = cfg("OVERRIDE");
        let v = view(&route, &vhost, &[]);
        assert!(run(&c, Some(v), "10.0.0.1:1", &conn, &[]).0.is_none());
        assert!(run(&c, Some(v), "10.0.0.1:1", &conn, &[]).0.is_some());
        let c = cfg("OVERRIDE");
        let v = view(&route, &vhost, &other);
        assert!(run(&c, Some(v), "10.0.0.1:1", &conn, &[]).0.is_none());
        assert!(run(&c, Some(v), "10.0.0.1:1", &conn, &[]).0.is_none());
        // INCLUDE: both.
        let c = cfg("INCLUDE");
        assert!(run(&c, Some(v), "10.0.0.1:1", &conn, &[]).0.is_none());
        assert!(run(&c, Some(v), "10.0.0.1:1", &conn, &[]).0.is_some());
        // IGNORE: never.
        let c = cfg("IGNORE");
        let v = view(&route, &vhost, &[]);
        assert!(run(&c, Some(v), "10.0.0.1:1", &conn, &[]).0.is_none());
        assert!(run(&c, Some(v), "10.0.0.1:1", &conn, &[]).0.is_none());
    }

    #[test]
    fn translation_errors() {
        let e = lrl(
            "token_bucket: {max_tokens: 0, fill_interval: 1s}\nlocal_cluster_rate_limit: {}\ndescriptors: [{entries: [], token_bucket: {max_tokens: 1, fill_interval: 0.01s}}, {entries: [{value: x}]}]\nstatus: {code: 42}\n",
            false,
        )
        .expect_err("invalid");
        let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        for want in [
            "f.local_cluster_rate_limit",
            "f.stat_prefix",
            "f.token_bucket.max_tokens",
            "f.descriptors[0].entries",
            "f.descriptors[0].token_bucket.fill_interval",
            "f.descriptors[1].entries[0].key",
            "f.descriptors[1].token_bucket",
        ] {
            assert!(paths.contains(&want), "{want} missing: {e:?}");
        }
        let e = lrl("stat_prefix: r\n", true).expect_err("per-route needs a bucket");
        assert_eq!(e[0].0, "f.token_bucket");
        // Status below 400 means 429.
        let c = lrl("stat_prefix: r\nstatus: {code: 200}\n", false).expect("valid");
        assert_eq!(c.status, StatusCode::TOO_MANY_REQUESTS);
    }
}
