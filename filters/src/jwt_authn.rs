//! `envoy.filters.http.jwt_authn` (Envoy's `JwtAuthentication`).
//!
//! # Data flow
//! ```text
//! on_request:
//!   requirement = per-route PerRouteConfig (disabled | requirement_name)
//!               | first `rules[]` entry whose match fits | none (continue)
//!   strip incoming forward_payload_header / claim_to_headers names (anti-spoofing)
//!   evaluate(requirement):
//!     provider_name p      -> token from p's locations (headers, params, cookies) -> parse
//!                             -> iss -> sub (subjects) -> exp/nbf -> lifetime -> aud
//!                             -> JWKS (local, or the remote cache) -> signature
//!     requires_any/all     -> children (any: first Ok wins; errors other than "missing" win)
//!     allow_missing(_or_failed) -> every provider's token, provider picked by `iss`
//!   a remote JWKS not cached (or expired) -> Retry(fetch through the cluster), run again
//!   Ok  -> forward_payload_header, claim_to_headers, drop the token unless `forward`
//!   Err -> 401 (403 for audiences) with `www-authenticate: Bearer realm="<url>"[, error=..]`
//! ```
//!
//! # Remote JWKS
//! Each provider with `remote_jwks` owns a [`RemoteJwks`]: a lock-free cached JWKS
//! (`ArcSwapOption`, read per request) that expires after `cache_duration` (default 600 s).
//! When a request needs it and it is missing or expired, the filter returns
//! [`FilterAction::Retry`] with a fetch through [`ServerInfo::upstream_fetch`]
//! (`http_uri.cluster`, `http_uri.timeout`, 1 MiB body bound). Concurrent requests share one
//! fetch: fetchers queue on an async mutex and skip their own fetch when an attempt finished
//! while they waited (success or failure); each request fetches a provider's JWKS at most once.
//! Stats: `http.<hcm prefix>.jwt_authn.<stat_prefix>{allowed,denied,cors_preflight_bypassed,
//! jwks_fetch_success,jwks_fetch_failed}` (Envoy names).
//!
//! # Deviations
//! - `payload_in_metadata` is accepted and ignored (weir has no dynamic metadata).
//! - `remote_jwks.async_fetch` is accepted: weir always fetches on demand (no pre-fetch).
//! - Local JWKS must be JWKS JSON (Envoy also accepts PEM).
//! - Only the first token found for a provider is verified.
//! - `jwt_cache_config`, `header_in_metadata`, `failed_status_in_metadata`, `normalize_payload_in_metadata`,
//!   `clear_route_cache`, `filter_state_rules`, `strip_failure_response`,
//!   `extract_only_without_validation`, `retry_policy` are rejected.
//! - A per-route `requirement_name` missing from `requirement_map` answers 403
//!   `Failed to find requirement` (checked per request: per-route configs are translated
//!   apart from the filter).

mod jwt;

pub use jwt::{Alg, Jwk, Jwks, JwksError, Jwt, KeyMaterial, Status};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::{HeaderName, HeaderValue, StatusCode};
use metrics::Counter;
use regex::Regex;
use serde_json::Value;
use tokio::time::Instant;
use weir_xds_api::Any;
use weir_xds_api::pb::envoy::config::core::v3::data_source::Specifier as DsSpec;
use weir_xds_api::pb::envoy::config::route::v3 as rpb;
use weir_xds_api::pb::envoy::extensions::filters::http::jwt_authn::v3 as pb;

use crate::chain::{FilterContext, StreamInfo};
use crate::config::{ConfigErrors, FactoryContext, RequestMatcher, StatScope, duration, join};
use crate::fetch::{FetchRequest, UpstreamFetch};
use crate::matcher::StringMatch;
use crate::rbac::full_regex;
use crate::{FilterAction, HttpFilter, HttpFilterFactory, LocalReply, type_urls};

/// Default `cache_duration` of a remote JWKS (Envoy: 10 minutes).
pub const DEFAULT_CACHE_DURATION: Duration = Duration::from_secs(600);
/// Default `clock_skew_seconds`.
pub const DEFAULT_CLOCK_SKEW: u64 = 60;
/// Largest remote JWKS body accepted.
pub const MAX_JWKS_BODY: usize = 1024 * 1024;

/// Where a provider looks for its token.
#[derive(Debug, Clone)]
enum Location {
    /// A header, with an optional value prefix (`Bearer `).
    Header(HeaderName, Box<str>),
    /// A query parameter.
    Param(Box<str>),
    /// A cookie (`from_cookies`; the cookie stays on the request, as in Envoy).
    Cookie(Box<str>),
}

/// A found token and where it came from.
#[derive(Debug, Clone)]
struct Found {
    token: String,
    /// The header to drop on success when the provider does not `forward` (query parameters
    /// stay, as in Envoy).
    header: Option<HeaderName>,
}

/// Characters a token is made of (base64url and dots).
fn token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=' | '+' | '/')
}

impl Location {
    fn extract(&self, req: &http::request::Parts, path: &str) -> Option<Found> {
        match self {
            Location::Header(name, prefix) => {
                for v in req.headers.get_all(name) {
                    let Ok(v) = v.to_str() else { continue };
                    let rest = if prefix.is_empty() {
                        v.trim()
                    } else {
                        // Envoy: the token follows the prefix (case-sensitively) anywhere.
                        let Some(i) = v.find(&**prefix) else { continue };
                        &v[i + prefix.len()..]
                    };
                    let end = rest.find(|c| !token_char(c)).unwrap_or(rest.len());
                    let token = &rest[..end];
                    if !token.is_empty() {
                        return Some(Found {
                            token: token.to_string(),
                            header: Some(name.clone()),
                        });
                    }
                }
                None
            }
            Location::Param(name) => {
                let q = path.split_once('?')?.1;
                let q = q.split('#').next().unwrap_or(q);
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == &**name)
                    .and_then(|(_, v)| {
                        percent_decode(v)
                            .filter(|t| !t.is_empty())
                            .map(|token| Found {
                                token,
                                header: None,
                            })
                    })
            }
            Location::Cookie(name) => {
                crate::config::cookie_value(&req.headers, name).map(|t| Found {
                    token: t.to_string(),
                    header: None,
                })
            }
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = b.get(i + 1..i + 3)?;
            let h = std::str::from_utf8(h).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A cached remote JWKS.
#[derive(Debug)]
struct Cached {
    jwks: Arc<Jwks>,
    expires: Instant,
}

/// A provider's `remote_jwks`: the shared cache and how to refresh it.
#[derive(Debug)]
pub struct RemoteJwks {
    cluster: String,
    uri: http::Uri,
    timeout: Duration,
    cache_duration: Duration,
    cached: ArcSwapOption<Cached>,
    /// Serializes fetches; waiters reuse an attempt that ended while they waited.
    fetch_lock: tokio::sync::Mutex<()>,
    attempts: AtomicU64,
    fetch_success: Counter,
    fetch_failed: Counter,
}

impl RemoteJwks {
    /// The cached JWKS if fresh.
    fn fresh(&self) -> Option<Arc<Jwks>> {
        let c = self.cached.load();
        c.as_ref()
            .filter(|c| Instant::now() < c.expires)
            .map(|c| c.jwks.clone())
    }

    /// The cached JWKS even if expired (after this request's fetch failed, Envoy fails).
    /// Fetch (or wait for a concurrent fetch) and update the cache.
    async fn refresh(self: Arc<Self>, fetcher: Option<Arc<dyn UpstreamFetch>>) {
        let seen = self.attempts.load(Ordering::Acquire);
        let _g = self.fetch_lock.lock().await;
        if self.attempts.load(Ordering::Acquire) != seen {
            return; // an attempt ended while we waited: use its outcome
        }
        let result = match fetcher {
            None => Err("the server has no upstream fetcher".to_string()),
            Some(f) => f
                .fetch(FetchRequest {
                    cluster: self.cluster.clone(),
                    uri: self.uri.clone(),
                    timeout: self.timeout,
                    max_body: MAX_JWKS_BODY,
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| {
                    if r.status == StatusCode::OK {
                        Jwks::parse(&r.body).map_err(|e| e.to_string())
                    } else {
                        Err(format!("status {}", r.status.as_u16()))
                    }
                }),
        };
        match result {
            Ok(jwks) => {
                self.fetch_success.increment(1);
                self.cached.store(Some(Arc::new(Cached {
                    jwks: Arc::new(jwks),
                    expires: Instant::now() + self.cache_duration,
                })));
            }
            Err(e) => {
                self.fetch_failed.increment(1);
                tracing::debug!(uri = %self.uri, cluster = %self.cluster, error = %e,
                    "jwt_authn: remote JWKS fetch failed");
            }
        }
        self.attempts.fetch_add(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
enum KeySource {
    Local(Arc<Jwks>),
    Remote(Arc<RemoteJwks>),
}

/// `claim_to_headers` entry.
#[derive(Debug)]
struct ClaimToHeader {
    header: HeaderName,
    /// The claim path (`a.b` = nested).
    claim: Vec<Box<str>>,
}

/// A compiled `JwtProvider`.
#[derive(Debug)]
struct Provider {
    name: String,
    issuer: String,
    audiences: Vec<String>,
    forward: bool,
    locations: Vec<Location>,
    forward_payload_header: Option<HeaderName>,
    pad_forward_payload_header: bool,
    claim_to_headers: Vec<ClaimToHeader>,
    clock_skew: u64,
    /// `subjects`: the `sub` claim must match.
    subjects: Option<StringMatch>,
    /// `max_lifetime` (or unbounded for `require_expiration`): `exp` must be present and,
    /// when bounded, `exp - now` below it.
    max_lifetime: Option<Option<Duration>>,
    keys: KeySource,
}

impl Provider {
    /// Envoy's `isSubjectAllowed` (an absent `sub` is the empty string).
    fn subject_allowed(&self, jwt: &Jwt) -> bool {
        self.subjects
            .as_ref()
            .is_none_or(|m| m.matches(jwt.payload.get("sub").and_then(Value::as_str).unwrap_or("")))
    }

    /// Envoy's `isLifetimeAllowed`: the remaining lifetime (`exp - now`) below `max_lifetime`;
    /// with `require_expiration` only that `exp` is present.
    fn lifetime_allowed(&self, jwt: &Jwt, now: u64) -> bool {
        match self.max_lifetime {
            None => true,
            Some(_) if jwt.exp == 0 => false,
            Some(None) => true,
            Some(Some(max)) => Duration::from_secs(jwt.exp.saturating_sub(now)) < max,
        }
    }
}

/// Envoy's audience normalization: scheme and trailing slash do not count.
fn sanitize_aud(a: &str) -> &str {
    let a = a
        .strip_prefix("http://")
        .or_else(|| a.strip_prefix("https://"))
        .unwrap_or(a);
    a.strip_suffix('/').unwrap_or(a)
}

fn audiences_allowed(allowed: &[String], got: &[String]) -> bool {
    allowed.is_empty()
        || got
            .iter()
            .any(|g| allowed.iter().any(|a| sanitize_aud(a) == sanitize_aud(g)))
}

fn claim_value(payload: &serde_json::Map<String, Value>, path: &[Box<str>]) -> Option<String> {
    let (first, rest) = path.split_first()?;
    let mut v = payload.get(&**first)?;
    for seg in rest {
        v = v.as_object()?.get(&**seg)?;
    }
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(",")),
        _ => None,
    }
}

/// A compiled `JwtRequirement`.
#[derive(Debug)]
enum Requirement {
    Provider(usize, Option<Vec<String>>),
    Any(Vec<Requirement>),
    All(Vec<Requirement>),
    AllowMissing,
    AllowMissingOrFailed,
}

/// A compiled `RequirementRule.match`.
#[derive(Debug)]
struct RuleMatch {
    path: PathMatch,
    case_sensitive: bool,
    headers: Option<Arc<dyn RequestMatcher>>,
}

#[derive(Debug)]
enum PathMatch {
    Prefix(String),
    Exact(String),
    Separated(String),
    Regex(Regex),
}

impl RuleMatch {
    fn matches(&self, info: &StreamInfo<'_>, req: &http::request::Parts) -> bool {
        let full = info.path;
        let path = &full[..full.find(['?', '#']).unwrap_or(full.len())];
        let eq = |a: &str, b: &str| {
            if self.case_sensitive {
                a == b
            } else {
                a.eq_ignore_ascii_case(b)
            }
        };
        let ok = match &self.path {
            PathMatch::Prefix(p) => path.len() >= p.len() && eq(&path[..p.len()], p),
            PathMatch::Exact(p) => eq(path, p),
            PathMatch::Separated(p) => {
                path.len() >= p.len()
                    && eq(&path[..p.len()], p)
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
            PathMatch::Regex(r) => r.is_match(path),
        };
        ok && self
            .headers
            .as_ref()
            .is_none_or(|h| h.matches(&info.head(req)))
    }
}

#[derive(Debug)]
enum RuleRequirement {
    Inline(Requirement),
    Named(String),
}

/// Stats of the filter.
#[derive(Debug, Clone)]
struct Stats {
    allowed: Counter,
    denied: Counter,
    cors_preflight_bypassed: Counter,
}

/// The filter.
pub struct JwtAuthnFilter {
    providers: Vec<Provider>,
    rules: Vec<(RuleMatch, RuleRequirement)>,
    requirement_map: HashMap<String, Requirement>,
    bypass_cors_preflight: bool,
    /// Headers the filter writes, removed from every request first.
    output_headers: Vec<HeaderName>,
    stats: Stats,
    /// Seconds since the epoch (a fixed clock in tests).
    now: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl std::fmt::Debug for JwtAuthnFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthnFilter")
            .field("providers", &self.providers.len())
            .field("rules", &self.rules.len())
            .finish()
    }
}

/// Per-route `PerRouteConfig`.
#[derive(Debug)]
pub enum JwtPerRoute {
    /// `disabled: true`.
    Disabled,
    /// `requirement_name`.
    Requirement(String),
}

/// Per-request state: the remote providers already fetched for this request.
#[derive(Debug, Default)]
struct Fetched(Vec<usize>);

/// A verified token, applied to the request on success.
struct Verified<'a> {
    provider: &'a Provider,
    jwt: Jwt,
    found: Found,
}

/// Why evaluation stopped.
enum Stop {
    Failed(Status),
    /// Provider `usize`'s remote JWKS must be fetched first.
    NeedFetch(usize),
}

impl From<Status> for Stop {
    fn from(s: Status) -> Self {
        Stop::Failed(s)
    }
}

struct Eval<'f, 'r> {
    f: &'f JwtAuthnFilter,
    req: &'r http::request::Parts,
    path: &'r str,
    fetched: &'r [usize],
    now: u64,
    out: Vec<Verified<'f>>,
}

impl<'f> Eval<'f, '_> {
    fn jwks(&self, idx: usize) -> Result<Arc<Jwks>, Stop> {
        match &self.f.providers[idx].keys {
            KeySource::Local(j) => Ok(j.clone()),
            KeySource::Remote(r) => match r.fresh() {
                Some(j) => Ok(j),
                None if self.fetched.contains(&idx) => Err(Stop::Failed(Status::JwksFetchFail)),
                None => Err(Stop::NeedFetch(idx)),
            },
        }
    }

    /// Verify a parsed token with provider `idx` (Envoy's authenticator order).
    fn verify(
        &mut self,
        idx: usize,
        jwt: Jwt,
        found: Found,
        audiences: Option<&[String]>,
    ) -> Result<(), Stop> {
        let p = &self.f.providers[idx];
        if !p.issuer.is_empty() && jwt.iss != p.issuer {
            return Err(Status::JwtUnknownIssuer.into());
        }
        if !p.subject_allowed(&jwt) {
            return Err(Status::JwtVerificationFail.into());
        }
        jwt.check_time(self.now, p.clock_skew)?;
        if !p.lifetime_allowed(&jwt, self.now) {
            return Err(Status::JwtExpired.into());
        }
        if !audiences_allowed(audiences.unwrap_or(&p.audiences), &jwt.audiences) {
            return Err(Status::JwtAudienceNotAllowed.into());
        }
        let jwks = self.jwks(idx)?;
        jwt.verify(&jwks)?;
        self.out.push(Verified {
            provider: p,
            jwt,
            found,
        });
        Ok(())
    }

    fn provider(&mut self, idx: usize, audiences: Option<&[String]>) -> Result<(), Stop> {
        let p = &self.f.providers[idx];
        let Some(found) = p
            .locations
            .iter()
            .find_map(|l| l.extract(self.req, self.path))
        else {
            return Err(Status::JwtMissed.into());
        };
        let jwt = Jwt::parse(&found.token)?;
        self.verify(idx, jwt, found, audiences)
    }

    /// Every token any provider would extract, each verified with the provider of its
    /// issuer (Envoy's all-providers authenticator). `Ok` when there is none.
    fn all_tokens(&mut self, allow_failed: bool) -> Result<(), Stop> {
        let mut tokens: Vec<(usize, Found)> = Vec::new();
        for (i, p) in self.f.providers.iter().enumerate() {
            for l in &p.locations {
                if let Some(found) = l.extract(self.req, self.path)
                    && !tokens.iter().any(|(_, f)| f.token == found.token)
                {
                    tokens.push((i, found));
                }
            }
        }
        for (_, found) in tokens {
            let r = Jwt::parse(&found.token)
                .map_err(Stop::from)
                .and_then(|jwt| {
                    // The provider whose issuer is the token's and which reads this location.
                    let idx = self
                        .f
                        .providers
                        .iter()
                        .position(|p| {
                            (p.issuer.is_empty() || p.issuer == jwt.iss)
                                && p.locations.iter().any(|l| {
                                    l.extract(self.req, self.path)
                                        .is_some_and(|f| f.token == found.token)
                                })
                        })
                        .ok_or(Stop::Failed(Status::JwtUnknownIssuer))?;
                    self.verify(idx, jwt, found.clone(), None)
                });
            match r {
                Ok(()) => {}
                Err(Stop::NeedFetch(i)) => return Err(Stop::NeedFetch(i)),
                Err(Stop::Failed(_)) if allow_failed => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn eval(&mut self, r: &'f Requirement) -> Result<(), Stop> {
        match r {
            Requirement::Provider(i, aud) => self.provider(*i, aud.as_deref()),
            Requirement::AllowMissing => self.all_tokens(false),
            Requirement::AllowMissingOrFailed => self.all_tokens(true),
            Requirement::All(v) => {
                for c in v {
                    self.eval(c)?;
                }
                Ok(())
            }
            Requirement::Any(v) => {
                let mut allow_missing = false;
                let mut allow_failed = false;
                let mut err: Option<Status> = None;
                for c in v {
                    match c {
                        Requirement::AllowMissing => allow_missing = true,
                        Requirement::AllowMissingOrFailed => allow_failed = true,
                        _ => {
                            let mark = self.out.len();
                            match self.eval(c) {
                                Ok(()) => return Ok(()),
                                Err(Stop::NeedFetch(i)) => return Err(Stop::NeedFetch(i)),
                                Err(Stop::Failed(s)) => {
                                    self.out.truncate(mark);
                                    // A real failure explains more than a missing token.
                                    if err.is_none_or(|e| e == Status::JwtMissed) {
                                        err = Some(s);
                                    }
                                }
                            }
                        }
                    }
                }
                match err {
                    _ if allow_failed => Ok(()),
                    None | Some(Status::JwtMissed) if allow_missing => Ok(()),
                    e => Err(e.unwrap_or(Status::JwtMissed).into()),
                }
            }
        }
    }
}

impl JwtAuthnFilter {
    fn requirement<'s>(
        &'s self,
        info: &StreamInfo<'_>,
        req: &http::request::Parts,
        per_route: Option<&JwtPerRoute>,
    ) -> Result<Option<&'s Requirement>, ()> {
        match per_route {
            Some(JwtPerRoute::Disabled) => return Ok(None),
            Some(JwtPerRoute::Requirement(n)) => {
                return self.requirement_map.get(n).map(Some).ok_or(());
            }
            None => {}
        }
        for (m, r) in &self.rules {
            if m.matches(info, req) {
                return match r {
                    RuleRequirement::Inline(r) => Ok(Some(r)),
                    RuleRequirement::Named(n) => self.requirement_map.get(n).map(Some).ok_or(()),
                };
            }
        }
        Ok(None)
    }

    fn is_cors_preflight(req: &http::request::Parts) -> bool {
        req.method == http::Method::OPTIONS
            && req.headers.contains_key(http::header::ORIGIN)
            && req
                .headers
                .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
    }

    fn reply(&self, status: Status, info: &StreamInfo<'_>) -> LocalReply {
        self.stats.denied.increment(1);
        let code = if status == Status::JwtAudienceNotAllowed {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        };
        let mut r = LocalReply::new(code, status.to_string(), "-");
        let mut v = format!(
            "Bearer realm=\"{}://{}{}\"",
            info.scheme, info.authority, info.path
        );
        if status != Status::JwtMissed {
            v.push_str(", error=\"invalid_token\"");
        }
        if let Ok(v) = HeaderValue::from_str(&v) {
            r.headers.insert(http::header::WWW_AUTHENTICATE, v);
        }
        r
    }

    fn apply(verified: Vec<Verified<'_>>, req: &mut http::request::Parts) {
        for v in &verified {
            let p = v.provider;
            if let Some(h) = &p.forward_payload_header {
                let mut b = v.jwt.payload_b64.trim_end_matches('=').to_string();
                if p.pad_forward_payload_header {
                    while b.len() % 4 != 0 {
                        b.push('=');
                    }
                }
                if let Ok(val) = HeaderValue::from_str(&b) {
                    req.headers.insert(h.clone(), val);
                }
            }
            for c in &p.claim_to_headers {
                if let Some(val) = claim_value(&v.jwt.payload, &c.claim)
                    .and_then(|s| HeaderValue::from_str(&s).ok())
                {
                    req.headers.insert(c.header.clone(), val);
                }
            }
        }
        for v in verified {
            if !v.provider.forward
                && let Some(h) = &v.found.header
            {
                req.headers.remove(h);
            }
        }
    }
}

impl HttpFilter for JwtAuthnFilter {
    fn name(&self) -> &str {
        "envoy.filters.http.jwt_authn"
    }

    fn on_request(
        &self,
        req: &mut http::request::Parts,
        ctx: &mut FilterContext<'_>,
    ) -> FilterAction {
        let info = ctx.stream;
        if self.bypass_cors_preflight && Self::is_cors_preflight(req) {
            self.stats.cors_preflight_bypassed.increment(1);
            return FilterAction::Continue;
        }
        for h in &self.output_headers {
            req.headers.remove(h);
        }
        let requirement = match self.requirement(info, req, ctx.route_config_as::<JwtPerRoute>()) {
            Ok(Some(r)) => r,
            Ok(None) => return FilterAction::Continue,
            Err(()) => {
                self.stats.denied.increment(1);
                return FilterAction::Respond(LocalReply::new(
                    StatusCode::FORBIDDEN,
                    "Failed to find requirement",
                    "-",
                ));
            }
        };
        let fetched = ctx
            .state::<Fetched>()
            .map(|f| f.0.clone())
            .unwrap_or_default();
        let mut ev = Eval {
            f: self,
            req,
            path: info.path,
            fetched: &fetched,
            now: (self.now)(),
            out: Vec::new(),
        };
        let result = ev.eval(requirement);
        let verified = ev.out;
        match result {
            Ok(()) => {
                self.stats.allowed.increment(1);
                Self::apply(verified, req);
                FilterAction::Continue
            }
            Err(Stop::Failed(s)) => FilterAction::Respond(self.reply(s, info)),
            Err(Stop::NeedFetch(idx)) => {
                let KeySource::Remote(remote) = &self.providers[idx].keys else {
                    // Local keys never need a fetch.
                    return FilterAction::Respond(self.reply(Status::JwksFetchFail, info));
                };
                let remote = remote.clone();
                let fetcher = info.server.upstream_fetch();
                let mut fetched = fetched;
                fetched.push(idx);
                ctx.set_state(Fetched(fetched));
                FilterAction::Retry(Box::pin(remote.refresh(fetcher)))
            }
        }
    }
}

/// Factory for `envoy.filters.http.jwt_authn`.
#[derive(Debug)]
pub struct Factory;

fn translate_requirement(
    r: &pb::JwtRequirement,
    path: &str,
    names: &HashMap<&str, usize>,
    errs: &mut ConfigErrors,
) -> Option<Requirement> {
    use pb::jwt_requirement::RequiresType as T;
    errs.reject_unsupported(
        r,
        &[
            "provider_name",
            "provider_and_audiences",
            "requires_any",
            "requires_all",
            "allow_missing_or_failed",
            "allow_missing",
        ],
        path,
    );
    let provider = |name: &str, field: &str, errs: &mut ConfigErrors| {
        let idx = names.get(name).copied();
        if idx.is_none() {
            errs.add(join(path, field), format!("unknown provider {name:?}"));
        }
        idx
    };
    let list = |reqs: &[pb::JwtRequirement], field: &str, errs: &mut ConfigErrors| {
        let fp = format!("{}.requirements", join(path, field));
        if reqs.len() < 2 {
            errs.add(&fp, "needs at least two requirements");
        }
        let before = errs.len();
        let v: Vec<Requirement> = reqs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| translate_requirement(r, &format!("{fp}[{i}]"), names, errs))
            .collect();
        (errs.len() == before).then_some(v)
    };
    match &r.requires_type {
        Some(T::ProviderName(n)) => {
            provider(n, "provider_name", errs).map(|i| Requirement::Provider(i, None))
        }
        Some(T::ProviderAndAudiences(pa)) => {
            let pp = join(path, "provider_and_audiences");
            errs.reject_unsupported(pa, &["provider_name", "audiences"], &pp);
            provider(
                &pa.provider_name,
                "provider_and_audiences.provider_name",
                errs,
            )
            .map(|i| Requirement::Provider(i, Some(pa.audiences.clone())))
        }
        Some(T::RequiresAny(l)) => {
            list(&l.requirements, "requires_any", errs).map(Requirement::Any)
        }
        Some(T::RequiresAll(l)) => {
            list(&l.requirements, "requires_all", errs).map(Requirement::All)
        }
        Some(T::AllowMissing(_)) => Some(Requirement::AllowMissing),
        Some(T::AllowMissingOrFailed(_)) => Some(Requirement::AllowMissingOrFailed),
        Some(T::ExtractOnlyWithoutValidation(_)) => None, // rejected by name
        None => {
            errs.add(path, "a requirement type is required");
            None
        }
    }
}

fn translate_rule_match(
    m: &rpb::RouteMatch,
    path: &str,
    ctx: &dyn FactoryContext,
    errs: &mut ConfigErrors,
) -> Option<RuleMatch> {
    use rpb::route_match::PathSpecifier as P;
    errs.reject_unsupported(
        m,
        &[
            "prefix",
            "path",
            "safe_regex",
            "path_separated_prefix",
            "case_sensitive",
            "headers",
        ],
        path,
    );
    let pm = match &m.path_specifier {
        Some(P::Prefix(p)) => PathMatch::Prefix(p.clone()),
        Some(P::Path(p)) => PathMatch::Exact(p.clone()),
        Some(P::PathSeparatedPrefix(p)) => {
            if p.contains(['?', '#']) || (p.ends_with('/') && p.len() > 1) {
                errs.add(
                    join(path, "path_separated_prefix"),
                    "must not end in / or contain ? or #",
                );
            }
            PathMatch::Separated(p.clone())
        }
        Some(P::SafeRegex(r)) => PathMatch::Regex(full_regex(r, &join(path, "safe_regex"), errs)?),
        Some(P::ConnectMatcher(_)) | Some(P::PathMatchPolicy(_)) => return None,
        None => {
            errs.add(
                path,
                "one of prefix, path, safe_regex or path_separated_prefix is required",
            );
            return None;
        }
    };
    let headers = if m.headers.is_empty() {
        None
    } else {
        Some(ctx.header_matchers(&m.headers, &join(path, "headers"), errs)?)
    };
    Some(RuleMatch {
        path: pm,
        case_sensitive: m.case_sensitive.as_ref().is_none_or(|b| b.value),
        headers,
    })
}

fn header_name(s: &str, path: &str, errs: &mut ConfigErrors) -> Option<HeaderName> {
    match HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes()) {
        Ok(h) if !s.starts_with(':') => Some(h),
        _ => {
            errs.add(path, format!("{s:?} is not a valid header name"));
            None
        }
    }
}

fn translate_provider(
    name: &str,
    p: &pb::JwtProvider,
    path: &str,
    counters: &(Counter, Counter),
    errs: &mut ConfigErrors,
) -> Option<Provider> {
    use pb::jwt_provider::JwksSourceSpecifier as J;
    errs.reject_unsupported(
        p,
        &[
            "issuer",
            "audiences",
            "forward",
            "from_headers",
            "from_params",
            "from_cookies",
            "subjects",
            "require_expiration",
            "max_lifetime",
            "forward_payload_header",
            "pad_forward_payload_header",
            "payload_in_metadata",
            "clock_skew_seconds",
            "claim_to_headers",
            "remote_jwks",
            "local_jwks",
        ],
        path,
    );
    let before = errs.len();
    let keys = match &p.jwks_source_specifier {
        Some(J::LocalJwks(ds)) => {
            let lp = join(path, "local_jwks");
            errs.reject_unsupported(ds, &["filename", "inline_string", "inline_bytes"], &lp);
            let text = match &ds.specifier {
                Some(DsSpec::InlineString(s)) => Some(s.as_bytes().to_vec()),
                Some(DsSpec::InlineBytes(b)) => Some(b.clone()),
                Some(DsSpec::Filename(f)) => match std::fs::read(f) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        errs.add(join(&lp, "filename"), format!("reading {f}: {e}"));
                        None
                    }
                },
                Some(DsSpec::EnvironmentVariable(_)) => None, // rejected by name
                None => {
                    errs.add(
                        &lp,
                        "one of filename, inline_string or inline_bytes is required",
                    );
                    None
                }
            };
            let jwks = text.and_then(|t| match Jwks::parse(&t) {
                Ok(j) => Some(j),
                Err(e) => {
                    errs.add(&lp, e.to_string());
                    None
                }
            });
            jwks.map(|j| KeySource::Local(Arc::new(j)))
        }
        Some(J::RemoteJwks(r)) => {
            let rp = join(path, "remote_jwks");
            errs.reject_unsupported(r, &["http_uri", "cache_duration", "async_fetch"], &rp);
            let cache_duration = r
                .cache_duration
                .as_ref()
                .map_or(DEFAULT_CACHE_DURATION, |d| {
                    duration(d, &join(&rp, "cache_duration"), errs)
                });
            match &r.http_uri {
                None => {
                    errs.add(join(&rp, "http_uri"), "http_uri is required");
                    None
                }
                Some(h) => {
                    let hp = join(&rp, "http_uri");
                    errs.reject_unsupported(h, &["uri", "cluster", "timeout"], &hp);
                    use weir_xds_api::pb::envoy::config::core::v3::http_uri::HttpUpstreamType;
                    let cluster = match &h.http_upstream_type {
                        Some(HttpUpstreamType::Cluster(c)) if !c.is_empty() => Some(c.clone()),
                        _ => {
                            errs.add(join(&hp, "cluster"), "cluster is required");
                            None
                        }
                    };
                    let uri = match h.uri.parse::<http::Uri>() {
                        Ok(u) if u.scheme().is_some() && u.authority().is_some() => Some(u),
                        _ => {
                            errs.add(
                                join(&hp, "uri"),
                                format!("{:?} is not an absolute http URI", h.uri),
                            );
                            None
                        }
                    };
                    let timeout = match &h.timeout {
                        Some(t) => {
                            let t = duration(t, &join(&hp, "timeout"), errs);
                            if t.is_zero() {
                                errs.add(join(&hp, "timeout"), "must be positive");
                            }
                            Some(t)
                        }
                        None => {
                            errs.add(join(&hp, "timeout"), "timeout is required");
                            None
                        }
                    };
                    match (cluster, uri, timeout) {
                        (Some(cluster), Some(uri), Some(timeout)) => {
                            Some(KeySource::Remote(Arc::new(RemoteJwks {
                                cluster,
                                uri,
                                timeout,
                                cache_duration,
                                cached: ArcSwapOption::empty(),
                                fetch_lock: tokio::sync::Mutex::new(()),
                                attempts: AtomicU64::new(0),
                                fetch_success: counters.0.clone(),
                                fetch_failed: counters.1.clone(),
                            })))
                        }
                        _ => None,
                    }
                }
            }
        }
        None => {
            errs.add(path, "one of remote_jwks or local_jwks is required");
            None
        }
    };
    let mut locations = Vec::new();
    for (i, h) in p.from_headers.iter().enumerate() {
        let hp = format!("{path}.from_headers[{i}]");
        errs.reject_unsupported(h, &["name", "value_prefix"], &hp);
        if let Some(n) = header_name(&h.name, &join(&hp, "name"), errs) {
            locations.push(Location::Header(n, h.value_prefix.as_str().into()));
        }
    }
    for (i, q) in p.from_params.iter().enumerate() {
        if q.is_empty() {
            errs.add(format!("{path}.from_params[{i}]"), "must not be empty");
        }
        locations.push(Location::Param(q.as_str().into()));
    }
    for (i, c) in p.from_cookies.iter().enumerate() {
        if c.is_empty() || c.contains([';', '=', ' ']) {
            errs.add(
                format!("{path}.from_cookies[{i}]"),
                "must be a cookie name (non-empty, no ';', '=' or spaces)",
            );
        }
        locations.push(Location::Cookie(c.as_str().into()));
    }
    if p.from_headers.is_empty() && p.from_params.is_empty() && p.from_cookies.is_empty() {
        // Envoy's defaults.
        locations.push(Location::Header(
            http::header::AUTHORIZATION,
            "Bearer ".into(),
        ));
        locations.push(Location::Param("access_token".into()));
    }
    let forward_payload_header = if p.forward_payload_header.is_empty() {
        None
    } else {
        header_name(
            &p.forward_payload_header,
            &join(path, "forward_payload_header"),
            errs,
        )
    };
    let mut claim_to_headers = Vec::new();
    for (i, c) in p.claim_to_headers.iter().enumerate() {
        let cp = format!("{path}.claim_to_headers[{i}]");
        errs.reject_unsupported(c, &["header_name", "claim_name"], &cp);
        if c.claim_name.is_empty() {
            errs.add(join(&cp, "claim_name"), "must not be empty");
            continue;
        }
        if let Some(h) = header_name(&c.header_name, &join(&cp, "header_name"), errs) {
            claim_to_headers.push(ClaimToHeader {
                header: h,
                claim: c.claim_name.split('.').map(Into::into).collect(),
            });
        }
    }
    let subjects = p
        .subjects
        .as_ref()
        .and_then(|m| StringMatch::translate(m, &join(path, "subjects"), errs));
    let max_lifetime = match &p.max_lifetime {
        Some(d) => Some(Some(duration(d, &join(path, "max_lifetime"), errs))),
        None if p.require_expiration => Some(None),
        None => None,
    };
    if errs.len() != before {
        return None;
    }
    Some(Provider {
        name: name.to_string(),
        issuer: p.issuer.clone(),
        audiences: p.audiences.clone(),
        forward: p.forward,
        locations,
        forward_payload_header,
        pad_forward_payload_header: p.pad_forward_payload_header,
        claim_to_headers,
        clock_skew: if p.clock_skew_seconds == 0 {
            DEFAULT_CLOCK_SKEW
        } else {
            u64::from(p.clock_skew_seconds)
        },
        subjects,
        max_lifetime,
        keys: keys?,
    })
}

impl JwtAuthnFilter {
    /// Translate a `JwtAuthentication` at `path`.
    pub fn translate(
        c: &pb::JwtAuthentication,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<JwtAuthnFilter> {
        errs.reject_unsupported(
            c,
            &[
                "providers",
                "rules",
                "bypass_cors_preflight",
                "requirement_map",
                "stat_prefix",
            ],
            path,
        );
        let before = errs.len();
        let scope = StatScope::Hcm { infix: "jwt_authn" };
        let sp = &c.stat_prefix;
        let counter = |s: &str| ctx.counter(scope, &format!("{sp}{s}"));
        let stats = Stats {
            allowed: counter("allowed"),
            denied: counter("denied"),
            cors_preflight_bypassed: counter("cors_preflight_bypassed"),
        };
        let fetch_counters = (counter("jwks_fetch_success"), counter("jwks_fetch_failed"));
        let mut names: Vec<&String> = c.providers.keys().collect();
        names.sort();
        let index: HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let providers: Vec<Provider> = names
            .iter()
            .filter_map(|n| {
                let p = c.providers.get(*n)?;
                translate_provider(
                    n,
                    p,
                    &format!("{path}.providers[{n}]"),
                    &fetch_counters,
                    errs,
                )
            })
            .collect();
        let mut requirement_map = HashMap::new();
        for (n, r) in &c.requirement_map {
            if let Some(r) =
                translate_requirement(r, &format!("{path}.requirement_map[{n}]"), &index, errs)
            {
                requirement_map.insert(n.clone(), r);
            }
        }
        let mut rules = Vec::new();
        for (i, r) in c.rules.iter().enumerate() {
            use pb::requirement_rule::RequirementType as RT;
            let rp = format!("{path}.rules[{i}]");
            errs.reject_unsupported(r, &["match", "requires", "requirement_name"], &rp);
            let Some(m) = r.r#match.as_ref() else {
                errs.add(join(&rp, "match"), "match is required");
                continue;
            };
            let m = translate_rule_match(m, &join(&rp, "match"), ctx, errs);
            let req = match &r.requirement_type {
                Some(RT::Requires(q)) => {
                    translate_requirement(q, &join(&rp, "requires"), &index, errs)
                        .map(RuleRequirement::Inline)
                }
                Some(RT::RequirementName(n)) => {
                    if c.requirement_map.contains_key(n) {
                        Some(RuleRequirement::Named(n.clone()))
                    } else {
                        errs.add(
                            join(&rp, "requirement_name"),
                            format!("{n:?} is not in requirement_map"),
                        );
                        None
                    }
                }
                // No requirement: the rule matches and nothing is required (Envoy).
                None => Some(RuleRequirement::Inline(Requirement::AllowMissingOrFailed)),
            };
            if let (Some(m), Some(req)) = (m, req) {
                rules.push((m, req));
            }
        }
        if errs.len() != before {
            return None;
        }
        let mut output_headers: Vec<HeaderName> = Vec::new();
        for p in &providers {
            output_headers.extend(p.forward_payload_header.iter().cloned());
            output_headers.extend(p.claim_to_headers.iter().map(|c| c.header.clone()));
        }
        output_headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        output_headers.dedup();
        Some(JwtAuthnFilter {
            providers,
            rules,
            requirement_map,
            bypass_cors_preflight: c.bypass_cors_preflight,
            output_headers,
            stats,
            now: Arc::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            }),
        })
    }

    /// Replace the clock (seconds since the epoch), for tests.
    pub fn with_clock(mut self, now: Arc<dyn Fn() -> u64 + Send + Sync>) -> Self {
        self.now = now;
        self
    }

    /// Provider names, in name order.
    pub fn provider_names(&self) -> Vec<&str> {
        self.providers.iter().map(|p| p.name.as_str()).collect()
    }
}

impl HttpFilterFactory for Factory {
    fn type_url(&self) -> &'static str {
        type_urls::JWT_AUTHN
    }

    fn create(
        &self,
        config: &Any,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<Arc<dyn HttpFilter>> {
        let c: pb::JwtAuthentication = match weir_xds_api::unpack(config) {
            Ok(c) => c,
            Err(e) => {
                errs.add(path, e.to_string());
                return None;
            }
        };
        JwtAuthnFilter::translate(&c, path, ctx, errs).map(|f| Arc::new(f) as Arc<dyn HttpFilter>)
    }

    fn route_type_url(&self) -> Option<&'static str> {
        Some(type_urls::JWT_AUTHN_PER_ROUTE)
    }

    fn create_route_config(
        &self,
        config: &Any,
        path: &str,
        _ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        use pb::per_route_config::RequirementSpecifier as R;
        let c: pb::PerRouteConfig = match weir_xds_api::unpack(config) {
            Ok(c) => c,
            Err(e) => {
                errs.add(path, e.to_string());
                return None;
            }
        };
        errs.reject_unsupported(&c, &["disabled", "requirement_name"], path);
        let r = match c.requirement_specifier {
            Some(R::Disabled(true)) => JwtPerRoute::Disabled,
            Some(R::Disabled(false)) => {
                errs.add(join(path, "disabled"), "must be true when set");
                return None;
            }
            Some(R::RequirementName(n)) if !n.is_empty() => JwtPerRoute::Requirement(n),
            _ => {
                errs.add(path, "one of disabled or requirement_name is required");
                return None;
            }
        };
        Some(Arc::new(r))
    }
}

#[cfg(test)]
mod tests {
    use super::jwt::tests::{TestKey, jwks};
    use super::*;
    use crate::chain::{
        ChainEntry, ChainState, ConnectionState, FilterChain, PerFilterConfig, PerFilterConfigs,
        RouteFilterData, RouteView, ServerInfo,
    };
    use crate::fetch::{FetchError, FetchFuture, FetchResponse};
    use crate::rbac::tests::CountingCtx;
    use base64::Engine;
    use serde_json::json;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    const NOW: u64 = 1_700_000_000;

    /// Serves a JWKS (or fails), counting fetches; each fetch takes 50 ms (virtual).
    #[derive(Debug, Default)]
    struct FakeFetch {
        body: Mutex<Option<String>>,
        calls: AtomicUsize,
        last: Mutex<Option<FetchRequest>>,
    }

    impl UpstreamFetch for FakeFetch {
        fn fetch(&self, req: FetchRequest) -> FetchFuture {
            self.calls.fetch_add(1, Ordering::SeqCst);
            *self.last.lock().expect("lock") = Some(req);
            let body = self.body.lock().expect("lock").clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                match body {
                    Some(b) => Ok(FetchResponse {
                        status: StatusCode::OK,
                        body: b.into(),
                    }),
                    None => Err(FetchError::Timeout),
                }
            })
        }
    }

    #[derive(Debug, Default)]
    struct Server(Arc<FakeFetch>);

    impl ServerInfo for Server {
        fn healthy(&self) -> bool {
            true
        }
        fn cluster_health(&self, _name: &str) -> Option<(usize, usize)> {
            None
        }
        fn upstream_fetch(&self) -> Option<Arc<dyn UpstreamFetch>> {
            Some(self.0.clone())
        }
    }

    fn build(yaml: &str, ctx: &CountingCtx) -> Result<Arc<JwtAuthnFilter>, Vec<(String, String)>> {
        let c: pb::JwtAuthentication = weir_xds_api::from_yaml(yaml).expect("yaml");
        let mut errs = ConfigErrors::default();
        let f = JwtAuthnFilter::translate(&c, "jwt", ctx, &mut errs);
        if errs.is_empty() {
            Ok(Arc::new(f.expect("filter").with_clock(Arc::new(|| NOW))))
        } else {
            Err(errs.0)
        }
    }

    struct Out {
        reply: Option<LocalReply>,
        headers: http::HeaderMap,
    }

    async fn run(
        f: &Arc<JwtAuthnFilter>,
        server: &Server,
        path: &str,
        headers: &[(&str, &str)],
        route_cfg: Option<Arc<dyn std::any::Any + Send + Sync>>,
    ) -> Out {
        let chain = FilterChain::new(vec![ChainEntry {
            name: "jwt".into(),
            filter: f.clone(),
            disabled: false,
            type_url: type_urls::JWT_AUTHN.into(),
        }]);
        let conn = ConnectionState::default();
        let route = RouteFilterData {
            per_filter: PerFilterConfigs(
                route_cfg
                    .into_iter()
                    .map(|c| ("jwt".into(), PerFilterConfig::Config(c)))
                    .collect(),
            ),
            rate_limits: vec![],
        };
        let vhost = RouteFilterData::default();
        let view = RouteView {
            route_name: "r",
            route: &route,
            vhost: &vhost,
            route_rate_limits: &[],
            include_vh_rate_limits: false,
        };
        let info = StreamInfo::new(
            "10.0.0.1:1".parse().expect("a"),
            "127.0.0.1:80".parse().expect("a"),
            1,
            false,
            "api.example.com",
            path,
            "http",
            Some(view),
            server,
            &conn,
            1,
        );
        let mut req = http::Request::builder().uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let (mut parts, _) = req.body(()).expect("req").into_parts();
        let reply = chain
            .decode(&mut parts, &info, &mut ChainState::default())
            .await
            .err();
        Out {
            reply,
            headers: parts.headers,
        }
    }

    fn bearer(t: &str) -> String {
        format!("Bearer {t}")
    }

    fn local_config(k: &TestKey) -> String {
        format!(
            r#"
providers:
  issuer-a:
    issuer: https://a.example.com
    audiences: [api]
    local_jwks: {{inline_string: '{}'}}
    forward_payload_header: x-jwt-payload
    claim_to_headers:
    - {{header_name: x-sub, claim_name: sub}}
    - {{header_name: x-tenant, claim_name: org.tenant}}
    - {{header_name: x-admin, claim_name: admin}}
rules:
- match: {{prefix: /public}}
- match: {{prefix: /optional}}
  requires: {{requires_any: {{requirements: [{{provider_name: issuer-a}}, {{allow_missing: {{}}}}]}}}}
- match: {{prefix: /}}
  requires: {{provider_name: issuer-a}}
requirement_map:
  relaxed: {{allow_missing_or_failed: {{}}}}
"#,
            jwks(&[k])
        )
    }

    fn good_claims() -> Value {
        json!({"iss": "https://a.example.com", "aud": ["other", "api"], "sub": "alice",
               "exp": NOW + 300, "org": {"tenant": "t1"}, "admin": true})
    }

    #[tokio::test]
    async fn accepts_a_valid_token_and_writes_claims() {
        let k = TestKey::es256("k1");
        let ctx = CountingCtx::default();
        let f = build(&local_config(&k), &ctx).expect("filter");
        let s = Server::default();
        let t = k.token(&good_claims());
        let out = run(
            &f,
            &s,
            "/api",
            &[("authorization", &bearer(&t)), ("x-sub", "spoofed")],
            None,
        )
        .await;
        assert!(out.reply.is_none(), "{:?}", out.reply);
        assert_eq!(out.headers["x-sub"], "alice");
        assert_eq!(out.headers["x-tenant"], "t1");
        assert_eq!(out.headers["x-admin"], "true");
        let payload = out.headers["x-jwt-payload"].to_str().expect("str");
        let decoded: Value =
            serde_json::from_slice(&jwt::B64URL.decode(payload).expect("b64")).expect("json");
        assert_eq!(decoded["sub"], "alice");
        assert!(out.headers.get("authorization").is_none(), "not forwarded");
        assert_eq!(ctx.get("jwt_authn.allowed"), 1);
        // A spoofed claim header without a token on an open path is still stripped.
        let out = run(&f, &s, "/public", &[("x-sub", "spoofed")], None).await;
        assert!(out.reply.is_none());
        assert!(out.headers.get("x-sub").is_none());
        // From the access_token query parameter too.
        let out = run(&f, &s, &format!("/api?access_token={t}"), &[], None).await;
        assert!(out.reply.is_none());
        assert_eq!(out.headers["x-sub"], "alice");
    }

    #[tokio::test]
    async fn failures_answer_like_envoy() {
        let k = TestKey::es256("k1");
        let other = TestKey::es256("k1");
        let ctx = CountingCtx::default();
        let f = build(&local_config(&k), &ctx).expect("filter");
        let s = Server::default();
        let mut claims = good_claims();
        let cases: Vec<(String, StatusCode, &str)> = vec![
            {
                claims["exp"] = json!(NOW - 61);
                (k.token(&claims), StatusCode::UNAUTHORIZED, "Jwt is expired")
            },
            {
                claims["exp"] = json!(NOW - 59); // within the default 60 s skew
                claims["nbf"] = json!(NOW + 3600);
                (
                    k.token(&claims),
                    StatusCode::UNAUTHORIZED,
                    "Jwt not yet valid",
                )
            },
            (
                k.token(&json!({"iss": "https://evil", "aud": "api"})),
                StatusCode::UNAUTHORIZED,
                "Jwt issuer is not configured",
            ),
            (
                other.token(&good_claims()),
                StatusCode::UNAUTHORIZED,
                "Jwt verification fails",
            ),
            (
                k.token(&json!({"iss": "https://a.example.com", "aud": "billing"})),
                StatusCode::FORBIDDEN,
                "Audiences in Jwt are not allowed",
            ),
            (
                "not-a-jwt".into(),
                StatusCode::UNAUTHORIZED,
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections",
            ),
        ];
        for (t, code, body) in &cases {
            let out = run(&f, &s, "/api?x=1", &[("authorization", &bearer(t))], None).await;
            let r = out.reply.expect("denied");
            assert_eq!(r.status, *code, "{body}");
            assert_eq!(r.body, *body);
            assert_eq!(
                r.headers["www-authenticate"],
                "Bearer realm=\"http://api.example.com/api?x=1\", error=\"invalid_token\""
            );
        }
        // Missing: no `error`.
        let r = run(&f, &s, "/api", &[], None).await.reply.expect("denied");
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.body, "Jwt is missing");
        assert_eq!(
            r.headers["www-authenticate"],
            "Bearer realm=\"http://api.example.com/api\""
        );
        assert_eq!(ctx.get("jwt_authn.denied"), cases.len() as u64 + 1);
        assert_eq!(ctx.get("jwt_authn.allowed"), 0);
    }

    #[tokio::test]
    async fn requirements_any_missing_and_per_route() {
        let k = TestKey::ed25519("k1");
        let ctx = CountingCtx::default();
        let f = build(&local_config(&k), &ctx).expect("filter");
        let s = Server::default();
        let good = k.token(&good_claims());
        let expired = k.token(&json!({"iss": "https://a.example.com", "exp": 1}));
        // requires_any [provider, allow_missing]: missing ok, valid ok, invalid fails.
        assert!(run(&f, &s, "/optional", &[], None).await.reply.is_none());
        let out = run(
            &f,
            &s,
            "/optional",
            &[("authorization", &bearer(&good))],
            None,
        )
        .await;
        assert!(out.reply.is_none());
        assert_eq!(out.headers["x-sub"], "alice");
        let r = run(
            &f,
            &s,
            "/optional",
            &[("authorization", &bearer(&expired))],
            None,
        )
        .await;
        assert_eq!(r.reply.expect("denied").body, "Jwt is expired");
        // No requirement on /public.
        let r = run(&f, &s, "/public", &[("authorization", "Bearer junk")], None).await;
        assert!(r.reply.is_none());
        // Per route: disabled, and a requirement by name.
        let disabled: Arc<dyn std::any::Any + Send + Sync> = Arc::new(JwtPerRoute::Disabled);
        assert!(
            run(&f, &s, "/api", &[], Some(disabled))
                .await
                .reply
                .is_none()
        );
        let relaxed: Arc<dyn std::any::Any + Send + Sync> =
            Arc::new(JwtPerRoute::Requirement("relaxed".into()));
        let out = run(
            &f,
            &s,
            "/api",
            &[("authorization", &bearer(&expired))],
            Some(relaxed.clone()),
        )
        .await;
        assert!(out.reply.is_none(), "allow_missing_or_failed");
        assert!(out.headers.get("x-sub").is_none());
        let out = run(
            &f,
            &s,
            "/api",
            &[("authorization", &bearer(&good))],
            Some(relaxed),
        )
        .await;
        assert_eq!(out.headers["x-sub"], "alice", "a valid token is still used");
        let unknown: Arc<dyn std::any::Any + Send + Sync> =
            Arc::new(JwtPerRoute::Requirement("nope".into()));
        let r = run(&f, &s, "/api", &[], Some(unknown))
            .await
            .reply
            .expect("denied");
        assert_eq!(r.status, StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn requires_all_and_custom_locations() {
        let a = TestKey::es384("a");
        let b = TestKey::rsa("b", "RS256");
        let yaml = format!(
            r#"
providers:
  pa:
    issuer: ia
    local_jwks: {{inline_string: '{}'}}
    from_headers: [{{name: x-token-a}}]
    forward: true
  pb:
    issuer: ib
    local_jwks: {{inline_string: '{}'}}
    from_headers: [{{name: x-auth, value_prefix: 'Token '}}]
    from_params: [jwt_b]
rules:
- match: {{path: /both}}
  requires: {{requires_all: {{requirements: [{{provider_name: pa}}, {{provider_name: pb}}]}}}}
- match: {{safe_regex: {{regex: '/either/.*'}}, headers: [{{name: x-mode, exact_match: any}}]}}
  requires: {{requires_any: {{requirements: [{{provider_name: pa}}, {{provider_name: pb}}]}}}}
"#,
            jwks(&[&a]),
            jwks(&[&b])
        );
        let ctx = CountingCtx::default();
        let f = build(&yaml, &ctx).expect("filter");
        let s = Server::default();
        let ta = a.token(&json!({"iss": "ia"}));
        let tb = b.token(&json!({"iss": "ib"}));
        let out = run(
            &f,
            &s,
            "/both",
            &[("x-token-a", &ta), ("x-auth", &format!("Token {tb}"))],
            None,
        )
        .await;
        assert!(out.reply.is_none(), "{:?}", out.reply);
        assert!(out.headers.contains_key("x-token-a"), "pa forwards");
        assert!(!out.headers.contains_key("x-auth"), "pb does not");
        let r = run(&f, &s, "/both", &[("x-token-a", &ta)], None).await;
        assert_eq!(r.reply.expect("denied").body, "Jwt is missing");
        let out = run(
            &f,
            &s,
            &format!("/both?jwt_b={tb}"),
            &[("x-token-a", &ta)],
            None,
        )
        .await;
        assert!(out.reply.is_none());
        // requires_any: the real failure is reported over "missing".
        let r = run(
            &f,
            &s,
            "/either/x",
            &[("x-mode", "any"), ("x-token-a", &tb)],
            None,
        )
        .await;
        assert_eq!(
            r.reply.expect("denied").body,
            "Jwt issuer is not configured"
        );
        let r = run(
            &f,
            &s,
            "/either/x",
            &[("x-mode", "any"), ("x-auth", &format!("Token {tb}"))],
            None,
        )
        .await;
        assert!(r.reply.is_none());
        // The header condition of the rule does not hold: no requirement.
        assert!(run(&f, &s, "/either/x", &[], None).await.reply.is_none());
    }

    #[tokio::test]
    async fn cookies_subjects_and_lifetimes() {
        let k = TestKey::es384("k");
        let yaml = format!(
            r#"
providers:
  svid:
    issuer: spire
    local_jwks: {{inline_string: '{keys}'}}
    from_cookies: [session, other]
    subjects: {{prefix: 'spiffe://example.org/'}}
    max_lifetime: 3600s
  exp:
    issuer: exp
    local_jwks: {{inline_string: '{keys}'}}
    require_expiration: true
rules:
- match: {{prefix: /svid}}
  requires: {{provider_name: svid}}
- match: {{prefix: /exp}}
  requires: {{provider_name: exp}}
"#,
            keys = jwks(&[&k])
        );
        let ctx = CountingCtx::default();
        let f = build(&yaml, &ctx).expect("filter");
        let s = Server::default();
        let svid = |sub: &str, exp: u64| k.token(&json!({"iss": "spire", "sub": sub, "exp": exp}));
        let good = svid("spiffe://example.org/ns/a/sa/b", NOW + 600);
        let cookie = |t: &str| format!("theme=dark; session=\"{t}\"; x=1");
        // Found in the cookie (quoted, among others); the cookie stays on the request.
        let out = run(&f, &s, "/svid", &[("cookie", &cookie(&good))], None).await;
        assert!(out.reply.is_none(), "{:?}", out.reply);
        assert!(out.headers.contains_key("cookie"));
        // The second cookie name works too; the default Authorization location does not.
        let out = run(
            &f,
            &s,
            "/svid",
            &[("cookie", &format!("other={good}"))],
            None,
        )
        .await;
        assert!(out.reply.is_none(), "{:?}", out.reply);
        let r = run(
            &f,
            &s,
            "/svid",
            &[("authorization", &format!("Bearer {good}"))],
            None,
        )
        .await;
        assert_eq!(r.reply.expect("denied").body, "Jwt is missing");
        // A subject outside the prefix, or none: verification fails.
        for t in [
            svid("spiffe://evil.org/x", NOW + 600),
            k.token(&json!({"iss": "spire", "exp": NOW + 600})),
        ] {
            let r = run(&f, &s, "/svid", &[("cookie", &cookie(&t))], None).await;
            assert_eq!(r.reply.expect("denied").body, "Jwt verification fails");
        }
        // Lifetime: under an hour left is fine, more is not, no exp is not.
        let long = svid("spiffe://example.org/x", NOW + 3600);
        let r = run(&f, &s, "/svid", &[("cookie", &cookie(&long))], None).await;
        assert_eq!(r.reply.expect("denied").body, "Jwt is expired");
        let forever = k.token(&json!({"iss": "spire", "sub": "spiffe://example.org/x"}));
        let r = run(&f, &s, "/svid", &[("cookie", &cookie(&forever))], None).await;
        assert_eq!(r.reply.expect("denied").body, "Jwt is expired");
        let ok = svid("spiffe://example.org/x", NOW + 3599);
        let r = run(&f, &s, "/svid", &[("cookie", &cookie(&ok))], None).await;
        assert!(r.reply.is_none(), "{:?}", r.reply);
        // require_expiration: any exp, but one must be there.
        let bearer = |t: String| format!("Bearer {t}");
        let t = k.token(&json!({"iss": "exp", "exp": NOW + 10 * 86_400}));
        let r = run(&f, &s, "/exp", &[("authorization", &bearer(t))], None).await;
        assert!(r.reply.is_none(), "{:?}", r.reply);
        let t = k.token(&json!({"iss": "exp"}));
        let r = run(&f, &s, "/exp", &[("authorization", &bearer(t))], None).await;
        assert_eq!(r.reply.expect("denied").body, "Jwt is expired");
        // Bad config: an empty cookie name, a bad subjects matcher.
        let e = build(
            &format!(
                "providers: {{p: {{local_jwks: {{inline_string: '{}'}}, from_cookies: [''], subjects: {{safe_regex: {{regex: '('}}}}}}}}",
                jwks(&[&k])
            ),
            &ctx,
        )
        .expect_err("rejected");
        let paths: Vec<&str> = e.iter().map(|(p, _)| p.as_str()).collect();
        assert!(paths.contains(&"jwt.providers[p].from_cookies[0]"), "{e:?}");
        assert!(
            paths
                .iter()
                .any(|p| p.starts_with("jwt.providers[p].subjects")),
            "{e:?}"
        );
    }

    fn remote_config(cache: &str) -> String {
        format!(
            r#"
providers:
  remote:
    issuer: ir
    remote_jwks:
      http_uri: {{uri: 'http://jwks.local/keys', cluster: jwks, timeout: 2s}}
      cache_duration: {cache}
    claim_to_headers: [{{header_name: x-sub, claim_name: sub}}]
rules:
- match: {{prefix: /}}
  requires: {{provider_name: remote}}
"#
        )
    }

    #[tokio::test(start_paused = true)]
    async fn remote_jwks_is_fetched_once_shared_and_refreshed_on_expiry() {
        let k1 = TestKey::es256("k1");
        let k2 = TestKey::es256("k2");
        let ctx = CountingCtx::default();
        let f = build(&remote_config("60s"), &ctx).expect("filter");
        let fake = Arc::new(FakeFetch::default());
        *fake.body.lock().expect("lock") = Some(jwks(&[&k1]));
        let s = Server(fake.clone());
        let t1 = k1.token(&json!({"iss": "ir", "sub": "one"}));
        let auth = bearer(&t1);
        // Missing token: no fetch at all.
        assert!(run(&f, &s, "/", &[], None).await.reply.is_some());
        assert_eq!(fake.calls.load(Ordering::SeqCst), 0);
        // Five concurrent requests share one fetch.
        let hdrs = [("authorization", auth.as_str())];
        let outs = futures::future::join_all((0..5).map(|_| run(&f, &s, "/", &hdrs, None))).await;
        assert!(outs.iter().all(|o| o.reply.is_none()));
        assert_eq!(outs[0].headers["x-sub"], "one");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        let req = fake.last.lock().expect("lock").clone().expect("request");
        assert_eq!(req.cluster, "jwks");
        assert_eq!(req.uri, "http://jwks.local/keys");
        assert_eq!(req.timeout, Duration::from_secs(2));
        // Cached afterwards.
        assert!(
            run(&f, &s, "/", &[("authorization", &auth)], None)
                .await
                .reply
                .is_none()
        );
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        assert_eq!(ctx.get("jwt_authn.jwks_fetch_success"), 1);
        // Keys rotate: a k2 token fails until the cache expires, then the refetch finds k2.
        *fake.body.lock().expect("lock") = Some(jwks(&[&k2]));
        let t2 = bearer(&k2.token(&json!({"iss": "ir", "sub": "two"})));
        let r = run(&f, &s, "/", &[("authorization", &t2)], None).await;
        assert_eq!(
            r.reply.expect("denied").body,
            "Jwks doesn't have key to match kid or alg from Jwt"
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        let out = run(&f, &s, "/", &[("authorization", &t2)], None).await;
        assert!(out.reply.is_none());
        assert_eq!(out.headers["x-sub"], "two");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn remote_jwks_failures_fail_the_request_and_are_retried_later() {
        let k = TestKey::es256("k1");
        let ctx = CountingCtx::default();
        let f = build(&remote_config("600s"), &ctx).expect("filter");
        let fake = Arc::new(FakeFetch::default());
        let s = Server(fake.clone());
        let auth = bearer(&k.token(&json!({"iss": "ir"})));
        let r = run(&f, &s, "/", &[("authorization", &auth)], None).await;
        let r = r.reply.expect("denied");
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.body, "Jwks remote fetch is failed");
        assert_eq!(
            fake.calls.load(Ordering::SeqCst),
            1,
            "one attempt per request"
        );
        assert_eq!(ctx.get("jwt_authn.jwks_fetch_failed"), 1);
        // Not a JWKS: also a failure.
        *fake.body.lock().expect("lock") = Some("<html>".into());
        assert!(
            run(&f, &s, "/", &[("authorization", &auth)], None)
                .await
                .reply
                .is_some()
        );
        assert_eq!(ctx.get("jwt_authn.jwks_fetch_failed"), 2);
        // The next request fetches again and succeeds.
        *fake.body.lock().expect("lock") = Some(jwks(&[&k]));
        assert!(
            run(&f, &s, "/", &[("authorization", &auth)], None)
                .await
                .reply
                .is_none()
        );
        assert_eq!(ctx.get("jwt_authn.jwks_fetch_success"), 1);
        // A server without a fetcher fails cleanly.
        let f = build(&remote_config("600s"), &ctx).expect("filter");
        #[derive(Debug)]
        struct NoFetch;
        impl ServerInfo for NoFetch {
            fn healthy(&self) -> bool {
                true
            }
            fn cluster_health(&self, _: &str) -> Option<(usize, usize)> {
                None
            }
        }
        let chain = FilterChain::new(vec![ChainEntry {
            name: "jwt".into(),
            filter: f,
            disabled: false,
            type_url: String::new(),
        }]);
        let conn = ConnectionState::default();
        let info = StreamInfo::new(
            "10.0.0.1:1".parse().expect("a"),
            "127.0.0.1:80".parse().expect("a"),
            1,
            false,
            "a",
            "/",
            "http",
            None,
            &NoFetch,
            &conn,
            1,
        );
        let (mut parts, _) = http::Request::builder()
            .header("authorization", &auth)
            .body(())
            .expect("req")
            .into_parts();
        let r = chain
            .decode(&mut parts, &info, &mut ChainState::default())
            .await;
        assert_eq!(r.expect_err("denied").body, "Jwks remote fetch is failed");
    }

    #[test]
    fn config_errors_name_fields() {
        let ctx = CountingCtx::default();
        let err = |y: &str| build(y, &ctx).expect_err("invalid");
        let e = err("providers: {p: {issuer: x}}");
        assert_eq!(e[0].0, "jwt.providers[p]");
        let e = err("providers: {p: {local_jwks: {inline_string: '{}'}}}");
        assert_eq!(e[0].0, "jwt.providers[p].local_jwks");
        let e = err("providers: {p: {local_jwks: {filename: /nonexistent/jwks.json}}}");
        assert_eq!(e[0].0, "jwt.providers[p].local_jwks.filename");
        let e = err("providers: {p: {remote_jwks: {http_uri: {uri: /rel, cluster: c}}}}");
        let paths: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(
            paths,
            [
                "jwt.providers[p].remote_jwks.http_uri.uri",
                "jwt.providers[p].remote_jwks.http_uri.timeout"
            ]
        );
        let e = err(
            "providers: {p: {remote_jwks: {http_uri: {uri: 'http://x/k', cluster: c, timeout: 1s}, retry_policy: {}}}}",
        );
        assert_eq!(e[0].0, "jwt.providers[p].remote_jwks.retry_policy");
        let e = err(
            "providers: {p: {remote_jwks: {http_uri: {uri: 'http://x/k', cluster: c, timeout: 1s}}, header_in_metadata: h}}",
        );
        assert_eq!(e[0].0, "jwt.providers[p].header_in_metadata");
        let e = err("rules: [{match: {prefix: /}, requires: {provider_name: nope}}]");
        assert_eq!(e[0].0, "jwt.rules[0].requires.provider_name");
        let e = err("rules: [{match: {prefix: /}, requirement_name: nope}]");
        assert_eq!(e[0].0, "jwt.rules[0].requirement_name");
        let e = err("rules: [{requires: {allow_missing: {}}}]");
        assert_eq!(e[0].0, "jwt.rules[0].match");
        let e = err(
            "rules: [{match: {prefix: /, query_parameters: [{name: q}]}, requires: {allow_missing: {}}}]",
        );
        assert_eq!(e[0].0, "jwt.rules[0].match.query_parameters");
        let e = err("requirement_map: {r: {requires_any: {requirements: [{allow_missing: {}}]}}}");
        assert_eq!(e[0].0, "jwt.requirement_map[r].requires_any.requirements");
        let e = err("filter_state_rules: {name: x}");
        assert_eq!(e[0].0, "jwt.filter_state_rules");
        // Stats under stat_prefix.
        let k = TestKey::es256("k");
        let ok = format!(
            "stat_prefix: edge_\nproviders: {{p: {{local_jwks: {{inline_string: '{}'}}, payload_in_metadata: m}}}}",
            jwks(&[&k])
        );
        build(&ok, &ctx).expect("valid");
        assert!(ctx.names().contains(&"jwt_authn.edge_allowed".to_string()));
        // Per-route configs.
        let per = |y: &str| {
            let c: pb::PerRouteConfig = weir_xds_api::from_yaml(y).expect("yaml");
            let mut errs = ConfigErrors::default();
            let r = Factory.create_route_config(&weir_xds_api::pack(&c), "r", &ctx, &mut errs);
            (r.is_some(), errs.0)
        };
        assert!(per("disabled: true").0);
        assert!(per("requirement_name: x").0);
        assert_eq!(per("{}").1[0].0, "r");
    }

    #[test]
    fn claim_values_and_audience_normalization() {
        let p = json!({"a": {"b": "x"}, "n": 5, "l": ["p", "q"], "o": {"z": 1}});
        let Value::Object(p) = p else { unreachable!() };
        let path = |s: &str| s.split('.').map(Into::into).collect::<Vec<Box<str>>>();
        assert_eq!(claim_value(&p, &path("a.b")).as_deref(), Some("x"));
        assert_eq!(claim_value(&p, &path("n")).as_deref(), Some("5"));
        assert_eq!(claim_value(&p, &path("l")).as_deref(), Some("p,q"));
        assert_eq!(claim_value(&p, &path("o")), None);
        assert_eq!(claim_value(&p, &path("a.c")), None);
        let allowed = vec!["https://api.example.com/".to_string()];
        assert!(audiences_allowed(
            &allowed,
            &["http://api.example.com".into()]
        ));
        assert!(audiences_allowed(&allowed, &["api.example.com".into()]));
        assert!(!audiences_allowed(&allowed, &["api.example.org".into()]));
        assert!(audiences_allowed(&[], &[]));
        assert!(!audiences_allowed(&allowed, &[]));
    }
}
