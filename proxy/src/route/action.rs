//! Route actions: forward (`route`), `redirect` and `direct_response`, their translation and
//! the path rewrites they share.

use std::borrow::Cow;
use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode};
use regex::Regex;
use weir_xds_api::pb::envoy::config::core::v3 as core;
use weir_xds_api::pb::envoy::config::route::v3 as rpb;
use weir_xds_api::pb::envoy::r#type::matcher::v3 as mpb;

use super::RouteRequest;
use super::hash::{HashOutcome, HashPolicy};
use super::matcher::{search_regex, split_path};
use crate::config::{Errors, TranslateCtx, duration, duration_or, join};

/// Envoy's default upstream timeout for a route.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// Envoy's default `max_direct_response_body_size_bytes`.
pub const DEFAULT_MAX_DIRECT_RESPONSE_BODY: u32 = 4096;

/// Path rewrite shared by forward and redirect actions.
#[derive(Debug)]
pub(super) enum PathRewrite {
    /// Replace the matched prefix (or path, or the whole path for a regex route).
    Prefix(Box<str>),
    /// Replace every match of `re` in the path (query kept) with `sub` (regex crate syntax).
    Regex { re: Regex, sub: Box<str> },
}

impl PathRewrite {
    /// Rewrite `path_and_query`, whose first `matched_len` bytes the route matched.
    pub(super) fn apply(&self, path_and_query: &str, matched_len: usize) -> Option<String> {
        match self {
            PathRewrite::Prefix(p) => {
                let rest = path_and_query.get(matched_len..)?;
                let mut s = String::with_capacity(p.len() + rest.len());
                s.push_str(p);
                s.push_str(rest);
                Some(s)
            }
            PathRewrite::Regex { re, sub } => {
                let (path, _) = split_path(path_and_query);
                let tail = &path_and_query[path.len()..];
                let mut s = re.replace_all(path, &**sub).into_owned();
                s.push_str(tail);
                Some(s)
            }
        }
    }

    fn translate_regex(
        rr: &mpb::RegexMatchAndSubstitute,
        path: &str,
        errs: &mut Errors,
    ) -> Option<PathRewrite> {
        errs.reject_unsupported(rr, &["pattern", "substitution"], path);
        let Some(pat) = &rr.pattern else {
            errs.add(join(path, "pattern"), "pattern is required");
            return None;
        };
        let re = search_regex(pat, &join(path, "pattern"), errs)?;
        match convert_substitution(&rr.substitution, re.captures_len() - 1) {
            Ok(sub) => Some(PathRewrite::Regex {
                re,
                sub: sub.into(),
            }),
            Err(e) => {
                errs.add(join(path, "substitution"), e);
                None
            }
        }
    }
}

/// Convert an RE2 rewrite string (`\1`, `\\`) to the regex crate's syntax (`${1}`, `$$`),
/// checking it as RE2's `CheckRewriteString` does.
fn convert_substitution(sub: &str, groups: usize) -> Result<String, String> {
    let mut out = String::with_capacity(sub.len() + 8);
    let mut chars = sub.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('\\') => out.push('\\'),
                Some(d) if d.is_ascii_digit() => {
                    let n = d as usize - '0' as usize;
                    if n > groups {
                        return Err(format!(
                            "substitution refers to group \\{n} but the pattern has {groups} \
                             capture group(s)"
                        ));
                    }
                    out.push_str(&format!("${{{n}}}"));
                }
                _ => {
                    return Err(
                        "invalid escape in substitution: use \\0-\\9 for groups and \\\\ for a \
                         backslash"
                            .into(),
                    );
                }
            },
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Where a forwarded request goes.
#[derive(Debug)]
enum ClusterTarget {
    Named(Box<str>),
    Header(HeaderName),
}

impl ClusterTarget {
    fn resolve<'a>(&'a self, headers: &'a HeaderMap) -> Option<Cow<'a, str>> {
        match self {
            ClusterTarget::Named(n) => Some(Cow::Borrowed(n)),
            ClusterTarget::Header(h) => headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(Cow::Borrowed),
        }
    }
}

#[derive(Debug)]
enum ClusterSpec {
    One(ClusterTarget),
    Weighted {
        /// Targets with their weights, in config order.
        clusters: Vec<(ClusterTarget, u32)>,
        /// Sum of the weights (> 0).
        total: u64,
    },
}

/// `route` action: forward upstream.
#[derive(Debug)]
pub struct ForwardAction {
    /// Upstream timeout for the whole response; `None` disables it (Envoy's `0s`). Default 15 s.
    pub timeout: Option<Duration>,
    /// Per-route stream idle timeout override; `Some(ZERO)` disables the idle timeout for
    /// this route (Envoy's `0s`), `None` keeps the connection manager's.
    pub idle_timeout: Option<Duration>,
    cluster: ClusterSpec,
    pub(super) rewrite: Option<PathRewrite>,
    host_rewrite_literal: Option<Box<str>>,
    auto_host_rewrite: bool,
    /// `upgrade_configs: [{upgrade_type: CONNECT, connect_config: {}}]` (enabled): weir
    /// terminates CONNECT and tunnels the payload over TCP to a host of the cluster.
    connect_terminate: bool,
    /// Retries, mirroring, priority, stream duration and gRPC timeouts.
    pub policy: Box<super::retry::UpstreamPolicy>,
    /// `rate_limits` (for the local rate limit filter).
    pub(super) rate_limits: Vec<weir_filters::RateLimitPolicy>,
    /// `include_vh_rate_limits`.
    pub(super) include_vh_rate_limits: bool,
    /// `hash_policy` (RING_HASH / MAGLEV clusters).
    hash_policy: HashPolicy,
}

impl ForwardAction {
    /// The cluster to use: fixed, weighted (using `random`), or from a request header.
    /// `None` when the named request header is absent, empty or not visible ASCII.
    ///
    /// Weighted selection is Envoy's: `random % total_weight`, then the first cluster whose
    /// cumulative weight exceeds that value.
    pub fn select_cluster<'a>(
        &'a self,
        headers: &'a HeaderMap,
        random: u64,
    ) -> Option<Cow<'a, str>> {
        match &self.cluster {
            ClusterSpec::One(t) => t.resolve(headers),
            ClusterSpec::Weighted { clusters, total } => {
                let selected = random % (*total).max(1);
                let mut end = 0u64;
                for (t, w) in clusters {
                    end += u64::from(*w);
                    if selected < end {
                        return t.resolve(headers);
                    }
                }
                None
            }
        }
    }

    /// The new Host/authority from `host_rewrite_literal`, if configured.
    pub fn host_rewrite_literal(&self) -> Option<&str> {
        self.host_rewrite_literal.as_deref()
    }

    /// Whether to rewrite Host to the chosen upstream host's hostname (`auto_host_rewrite`).
    pub fn auto_host_rewrite(&self) -> bool {
        self.auto_host_rewrite
    }

    /// The request hash from the route's `hash_policy` (see [`super::hash`]), for
    /// `LbContext::hash`; `set_cookie` must be added to the response when present (a cookie
    /// policy with `ttl` generated the cookie). `query` is the request's query string without
    /// `?`; `remote` the downstream remote IP (after `x-forwarded-for` processing).
    pub fn hash(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        remote: std::net::IpAddr,
    ) -> HashOutcome {
        if self.hash_policy.is_empty() {
            return HashOutcome::default();
        }
        let nonce = if self.hash_policy.generates_cookies() {
            rand::random::<u64>()
        } else {
            0
        };
        self.hash_policy.evaluate(headers, query, remote, nonce)
    }

    /// Whether CONNECT requests on this route are terminated here (TCP tunnel to the
    /// cluster), from `upgrade_configs: [{upgrade_type: CONNECT, connect_config: {}}]`.
    pub fn connect_terminate(&self) -> bool {
        self.connect_terminate
    }

    #[allow(deprecated)] // `total_weight` is deprecated; still checked when set
    pub(super) fn translate(
        ra: &rpb::RouteAction,
        path: &str,
        validate: bool,
        ctx: &TranslateCtx<'_>,
        errs: &mut Errors,
    ) -> Option<ForwardAction> {
        use rpb::route_action::{ClusterSpecifier as C, HostRewriteSpecifier as H};
        errs.reject_unsupported(
            ra,
            &[
                "cluster",
                "cluster_header",
                "weighted_clusters",
                "timeout",
                "idle_timeout",
                "prefix_rewrite",
                "regex_rewrite",
                "host_rewrite_literal",
                "auto_host_rewrite",
                "upgrade_configs",
                "rate_limits",
                "include_vh_rate_limits",
                "hash_policy",
            ]
            .into_iter()
            .chain(super::retry::FIELDS.iter().copied())
            .collect::<Vec<_>>(),
            path,
        );
        let rate_limits = super::filters::rate_limits(&ra.rate_limits, path, ctx, errs);
        let hash_policy = HashPolicy::translate(&ra.hash_policy, &join(path, "hash_policy"), errs);
        let connect_terminate = connect_upgrade(&ra.upgrade_configs, path, errs);
        let check_cluster = |name: &str, p: &str, errs: &mut Errors| -> Option<Box<str>> {
            if name.is_empty() {
                errs.add(p, "cluster name must not be empty");
                None
            } else {
                if validate && !ctx.clusters.contains(name) {
                    errs.add(
                        p,
                        format!(
                            "unknown cluster {name:?} (define it under static_resources.clusters, \
                             or set validate_clusters: false)"
                        ),
                    );
                }
                Some(name.into())
            }
        };
        let header_target = |name: &str, p: &str, errs: &mut Errors| match HeaderName::from_bytes(
            name.to_ascii_lowercase().as_bytes(),
        ) {
            Ok(h) if !name.is_empty() => Some(ClusterTarget::Header(h)),
            _ => {
                errs.add(p, format!("{name:?} is not a valid header name"));
                None
            }
        };
        let cluster = match &ra.cluster_specifier {
            Some(C::Cluster(c)) => check_cluster(c, &join(path, "cluster"), errs)
                .map(|n| ClusterSpec::One(ClusterTarget::Named(n))),
            Some(C::ClusterHeader(h)) => {
                header_target(h, &join(path, "cluster_header"), errs).map(ClusterSpec::One)
            }
            Some(C::WeightedClusters(wc)) => {
                let wp = join(path, "weighted_clusters");
                errs.reject_unsupported(wc, &["clusters", "total_weight"], &wp);
                let mut clusters = Vec::new();
                let mut total = 0u64;
                let mut ok = true;
                for (i, cw) in wc.clusters.iter().enumerate() {
                    let cp = join(&wp, &format!("clusters[{i}]"));
                    errs.reject_unsupported(cw, &["name", "cluster_header", "weight"], &cp);
                    let target = match (cw.name.is_empty(), cw.cluster_header.is_empty()) {
                        (false, true) => check_cluster(&cw.name, &join(&cp, "name"), errs)
                            .map(ClusterTarget::Named),
                        (true, false) => {
                            header_target(&cw.cluster_header, &join(&cp, "cluster_header"), errs)
                        }
                        _ => {
                            errs.add(&cp, "exactly one of name or cluster_header is required");
                            None
                        }
                    };
                    let w = cw.weight.as_ref().map_or(0, |w| w.value);
                    total += u64::from(w);
                    match target {
                        Some(t) => clusters.push((t, w)),
                        None => ok = false,
                    }
                }
                if wc.clusters.is_empty() {
                    errs.add(join(&wp, "clusters"), "at least one cluster is required");
                    ok = false;
                } else if total == 0 {
                    errs.add(
                        join(&wp, "clusters"),
                        "the sum of the weights must be greater than 0",
                    );
                    ok = false;
                }
                if let Some(tw) = &wc.total_weight
                    && u64::from(tw.value) != total
                {
                    errs.add(
                        join(&wp, "total_weight"),
                        format!(
                            "total_weight {} does not equal the sum of the weights {total}",
                            tw.value
                        ),
                    );
                }
                ok.then_some(ClusterSpec::Weighted { clusters, total })
            }
            // cluster_specifier_plugin etc. are reported by reject_unsupported.
            Some(_) => None,
            None => {
                errs.add(
                    path,
                    "one of cluster, cluster_header or weighted_clusters is required",
                );
                None
            }
        };
        let timeout = duration_or(
            ra.timeout.as_ref(),
            DEFAULT_TIMEOUT,
            &join(path, "timeout"),
            errs,
        );
        let idle_timeout = ra
            .idle_timeout
            .as_ref()
            .map(|d| duration(d, &join(path, "idle_timeout"), errs));
        let rewrite = rewrite(
            &ra.prefix_rewrite,
            ra.regex_rewrite.as_ref(),
            path,
            "prefix_rewrite",
            errs,
        );
        let (host_rewrite_literal, auto_host_rewrite) = match &ra.host_rewrite_specifier {
            Some(H::HostRewriteLiteral(h)) => {
                if h.is_empty() || http::HeaderValue::from_str(h).is_err() {
                    errs.add(
                        join(path, "host_rewrite_literal"),
                        format!("{h:?} is not a valid host"),
                    );
                }
                (Some(h.as_str().into()), false)
            }
            Some(H::AutoHostRewrite(b)) => (None, b.value),
            _ => (None, false),
        };
        let check_mirror = |name: &str, p: &str, errs: &mut Errors| {
            let _ = check_cluster(name, p, errs);
        };
        let policy = super::retry::UpstreamPolicy::translate(ra, path, &check_mirror, errs);
        Some(ForwardAction {
            policy: Box::new(policy),
            timeout: (!timeout.is_zero()).then_some(timeout),
            idle_timeout,
            cluster: cluster?,
            rewrite: rewrite.ok()?,
            host_rewrite_literal,
            auto_host_rewrite,
            connect_terminate,
            rate_limits,
            include_vh_rate_limits: ra.include_vh_rate_limits.is_some_and(|b| b.value),
            hash_policy,
        })
    }
}

/// `RouteAction.upgrade_configs`: only `CONNECT` with `connect_config` (terminate CONNECT, TCP
/// to the cluster). Plain CONNECT forwarding (no `connect_config`) and per-route WebSocket
/// settings are rejected. Returns whether CONNECT is terminated on this route.
fn connect_upgrade(
    ucs: &[rpb::route_action::UpgradeConfig],
    path: &str,
    errs: &mut Errors,
) -> bool {
    let mut terminate = false;
    let mut seen = false;
    for (i, u) in ucs.iter().enumerate() {
        let p = join(path, &format!("upgrade_configs[{i}]"));
        errs.reject_unsupported(u, &["upgrade_type", "enabled", "connect_config"], &p);
        if !u.upgrade_type.eq_ignore_ascii_case("CONNECT") {
            errs.add(
                join(&p, "upgrade_type"),
                format!(
                    "route upgrade type {:?} is not supported (only CONNECT with connect_config; \
                     WebSocket is enabled on the connection manager)",
                    u.upgrade_type
                ),
            );
            continue;
        }
        if std::mem::replace(&mut seen, true) {
            errs.add(join(&p, "upgrade_type"), "duplicate CONNECT upgrade config");
            continue;
        }
        let enabled = u.enabled.as_ref().is_none_or(|b| b.value);
        match &u.connect_config {
            Some(cc) => {
                errs.reject_unsupported(cc, &[], &join(&p, "connect_config"));
                terminate = enabled;
            }
            None if enabled => errs.add(
                join(&p, "connect_config"),
                "forwarding CONNECT to an upstream proxy is not supported; set connect_config: {} \
                 to terminate CONNECT here and tunnel to the cluster over TCP",
            ),
            None => {}
        }
    }
    terminate
}

/// Translate `prefix_rewrite` + `regex_rewrite` (mutually exclusive). `Err` when invalid.
fn rewrite(
    prefix: &str,
    regex: Option<&mpb::RegexMatchAndSubstitute>,
    path: &str,
    prefix_field: &str,
    errs: &mut Errors,
) -> Result<Option<PathRewrite>, ()> {
    match (prefix.is_empty(), regex) {
        (true, None) => Ok(None),
        (false, None) => Ok(Some(PathRewrite::Prefix(prefix.into()))),
        (true, Some(rr)) => PathRewrite::translate_regex(rr, &join(path, "regex_rewrite"), errs)
            .map(Some)
            .ok_or(()),
        (false, Some(_)) => {
            errs.add(
                join(path, prefix_field),
                "prefix_rewrite and regex_rewrite are mutually exclusive",
            );
            Err(())
        }
    }
}

#[derive(Debug)]
enum RedirectPath {
    /// Keep the request's path (and query).
    Keep,
    /// `path_redirect`; `has_query` when it carries its own query string.
    Path { path: Box<str>, has_query: bool },
    /// `prefix_rewrite` / `regex_rewrite` of the request path.
    Rewrite(PathRewrite),
}

/// `redirect` action.
#[derive(Debug)]
pub struct RedirectAction {
    status: StatusCode,
    scheme: Option<Box<str>>,
    host: Option<Box<str>>,
    port: Option<u16>,
    path: RedirectPath,
    strip_query: bool,
}

/// Envoy's `processRequestHost`: the request's host for a redirect, without its port when a
/// `port_redirect` replaces it or when the scheme changes away from that port's default.
fn redirect_host<'r>(
    authority: &'r str,
    request_scheme: &str,
    new_scheme: &str,
    new_port: bool,
) -> &'r str {
    let host_end = if authority.starts_with('[') {
        authority.rfind("]:").map(|i| i + 1)
    } else {
        authority.rfind(':')
    };
    let Some(end) = host_end else {
        return authority;
    };
    let port = &authority[end..];
    let mut remove = new_port;
    if new_scheme != request_scheme {
        remove |= request_scheme == "https" && port == ":443";
        remove |= request_scheme == "http" && port == ":80";
    }
    if remove { &authority[..end] } else { authority }
}

impl RedirectAction {
    /// The redirect status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Build the `Location` Envoy's way (`Http::Utility::newUri`). `matched_len` is what the
    /// route's path specifier matched, for `prefix_rewrite`.
    pub(super) fn location(&self, req: &RouteRequest<'_>, matched_len: Option<usize>) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(req.scheme);
        let host = match &self.host {
            Some(h) => h,
            None => redirect_host(req.authority, req.scheme, scheme, self.port.is_some()),
        };
        let mut path_has_own_query = false;
        let mut path: Cow<'_, str> = match &self.path {
            RedirectPath::Keep => Cow::Borrowed(req.path),
            RedirectPath::Path { path, has_query } => {
                if *has_query {
                    path_has_own_query = true;
                    Cow::Borrowed(path)
                } else {
                    match req.path.find('?') {
                        Some(q) => Cow::Owned(format!("{path}{}", &req.path[q..])),
                        None => Cow::Borrowed(path),
                    }
                }
            }
            RedirectPath::Rewrite(rw) => matched_len
                .and_then(|n| rw.apply(req.path, n))
                .map_or(Cow::Borrowed(req.path), Cow::Owned),
        };
        if !path.starts_with('/') {
            path = Cow::Owned(format!("/{path}"));
        }
        if self.strip_query
            && !path_has_own_query
            && let Some(q) = path.find('?')
        {
            path = Cow::Owned(path[..q].to_string());
        }
        match self.port {
            Some(p) => format!("{scheme}://{host}:{p}{path}"),
            None => format!("{scheme}://{host}{path}"),
        }
    }

    pub(super) fn translate(
        ra: &rpb::RedirectAction,
        path: &str,
        errs: &mut Errors,
    ) -> Option<RedirectAction> {
        use rpb::redirect_action::{
            PathRewriteSpecifier as P, RedirectResponseCode as R, SchemeRewriteSpecifier as S,
        };
        errs.reject_unsupported(
            ra,
            &[
                "https_redirect",
                "scheme_redirect",
                "host_redirect",
                "port_redirect",
                "path_redirect",
                "prefix_rewrite",
                "regex_rewrite",
                "response_code",
                "strip_query",
            ],
            path,
        );
        let mut ok = true;
        let scheme = match &ra.scheme_rewrite_specifier {
            Some(S::HttpsRedirect(true)) => Some("https".into()),
            Some(S::HttpsRedirect(false)) | None => None,
            Some(S::SchemeRedirect(s)) => {
                let valid = s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
                if !valid {
                    errs.add(
                        join(path, "scheme_redirect"),
                        format!("{s:?} is not a valid scheme"),
                    );
                    ok = false;
                }
                Some(s.to_ascii_lowercase().into())
            }
        };
        let host = (!ra.host_redirect.is_empty()).then(|| -> Box<str> {
            if http::uri::Authority::try_from(ra.host_redirect.as_str()).is_err()
                || ra.host_redirect.contains('@')
            {
                errs.add(
                    join(path, "host_redirect"),
                    format!("{:?} is not a valid host", ra.host_redirect),
                );
                ok = false;
            }
            ra.host_redirect.as_str().into()
        });
        let port = match ra.port_redirect {
            0 => None,
            p @ 1..=65535 => Some(p as u16),
            _ => {
                errs.add(join(path, "port_redirect"), "port must be <= 65535");
                ok = false;
                None
            }
        };
        if let (Some(h), Some(_)) = (&host, port) {
            let has_port = if h.starts_with('[') {
                h.contains("]:")
            } else {
                h.contains(':')
            };
            if has_port {
                errs.add(
                    join(path, "host_redirect"),
                    "host_redirect must not carry a port when port_redirect is set",
                );
                ok = false;
            }
        }
        let rpath = match &ra.path_rewrite_specifier {
            None => RedirectPath::Keep,
            Some(P::PathRedirect(p)) => {
                // Envoy prepends '/' to a relative path_redirect; validate what will be sent.
                let full = if p.starts_with('/') {
                    p.clone()
                } else {
                    format!("/{p}")
                };
                if http::uri::PathAndQuery::try_from(full.as_str()).is_err() || p.contains('#') {
                    errs.add(
                        join(path, "path_redirect"),
                        format!("{p:?} is not a valid path"),
                    );
                    ok = false;
                }
                RedirectPath::Path {
                    path: p.as_str().into(),
                    has_query: p.contains('?'),
                }
            }
            Some(P::PrefixRewrite(p)) => {
                RedirectPath::Rewrite(PathRewrite::Prefix(p.as_str().into()))
            }
            Some(P::RegexRewrite(rr)) => {
                match PathRewrite::translate_regex(rr, &join(path, "regex_rewrite"), errs) {
                    Some(rw) => RedirectPath::Rewrite(rw),
                    None => {
                        ok = false;
                        RedirectPath::Keep
                    }
                }
            }
            // path_rewrite is reported by reject_unsupported.
            Some(_) => RedirectPath::Keep,
        };
        let status = match R::try_from(ra.response_code) {
            Ok(R::MovedPermanently) => StatusCode::MOVED_PERMANENTLY,
            Ok(R::Found) => StatusCode::FOUND,
            Ok(R::SeeOther) => StatusCode::SEE_OTHER,
            Ok(R::TemporaryRedirect) => StatusCode::TEMPORARY_REDIRECT,
            Ok(R::PermanentRedirect) => StatusCode::PERMANENT_REDIRECT,
            Err(_) => {
                errs.add(join(path, "response_code"), "unknown response_code");
                ok = false;
                StatusCode::MOVED_PERMANENTLY
            }
        };
        ok.then_some(RedirectAction {
            status,
            scheme,
            host,
            port,
            path: rpath,
            strip_query: ra.strip_query,
        })
    }
}

/// `direct_response` action.
#[derive(Debug)]
pub struct DirectResponse {
    /// Status.
    pub status: StatusCode,
    /// Body (inline string or bytes; files read at translation time).
    pub body: Option<Bytes>,
}

impl DirectResponse {
    pub(super) fn translate(
        dr: &rpb::DirectResponseAction,
        path: &str,
        max_body: u32,
        errs: &mut Errors,
    ) -> Option<DirectResponse> {
        errs.reject_unsupported(dr, &["status", "body"], path);
        let status = if (100..=599).contains(&dr.status) {
            StatusCode::from_u16(dr.status as u16).ok()
        } else {
            None
        };
        if status.is_none() {
            errs.add(
                join(path, "status"),
                format!("status {} is not in 100..=599", dr.status),
            );
        }
        let body = match &dr.body {
            None => Ok(None),
            Some(ds) => data_source(ds, &join(path, "body"), max_body, errs).map(Some),
        };
        Some(DirectResponse {
            status: status?,
            body: body.ok()?,
        })
    }
}

/// Read a `DataSource` of at most `max` bytes (files are read now, never per request).
fn data_source(
    ds: &core::DataSource,
    path: &str,
    max: u32,
    errs: &mut Errors,
) -> Result<Bytes, ()> {
    use core::data_source::Specifier as D;
    errs.reject_unsupported(ds, &["filename", "inline_bytes", "inline_string"], path);
    let max = max as usize;
    let (bytes, field) = match &ds.specifier {
        Some(D::InlineString(s)) => (Bytes::copy_from_slice(s.as_bytes()), "inline_string"),
        Some(D::InlineBytes(b)) => (Bytes::copy_from_slice(b), "inline_bytes"),
        Some(D::Filename(f)) => {
            let fp = join(path, "filename");
            let mut buf = Vec::new();
            // Read at most one byte past the limit, so a huge file is not read whole.
            let read = std::fs::File::open(f)
                .and_then(|file| file.take(max as u64 + 1).read_to_end(&mut buf));
            if let Err(e) = read {
                errs.add(fp, format!("reading {f:?}: {e}"));
                return Err(());
            }
            (Bytes::from(buf), "filename")
        }
        Some(D::EnvironmentVariable(_)) => return Err(()),
        None => {
            errs.add(
                path,
                "one of inline_string, inline_bytes or filename is required",
            );
            return Err(());
        }
    };
    if bytes.len() > max {
        errs.add(
            join(path, field),
            format!("body is larger than {max} bytes (raise max_direct_response_body_size_bytes)"),
        );
        return Err(());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitution_conversion() {
        assert_eq!(
            convert_substitution(r"/\1/\2", 2).as_deref(),
            Ok("/${1}/${2}")
        );
        assert_eq!(convert_substitution(r"\0x", 0).as_deref(), Ok("${0}x"));
        assert_eq!(convert_substitution(r"a\\b$c", 0).as_deref(), Ok(r"a\b$$c"));
        assert!(convert_substitution(r"\3", 2).is_err());
        assert!(convert_substitution(r"\x", 2).is_err());
        assert!(convert_substitution("trailing\\", 2).is_err());
    }

    #[test]
    fn redirect_host_port_stripping() {
        assert_eq!(redirect_host("a.com:80", "http", "https", false), "a.com");
        assert_eq!(
            redirect_host("a.com:8080", "http", "https", false),
            "a.com:8080"
        );
        assert_eq!(redirect_host("a.com:443", "https", "http", false), "a.com");
        assert_eq!(
            redirect_host("a.com:443", "https", "https", false),
            "a.com:443"
        );
        assert_eq!(redirect_host("a.com:80", "http", "http", false), "a.com:80");
        assert_eq!(redirect_host("a.com:80", "http", "http", true), "a.com");
        assert_eq!(redirect_host("[::1]:80", "http", "https", false), "[::1]");
        assert_eq!(redirect_host("[::1]", "http", "https", true), "[::1]");
        assert_eq!(redirect_host("a.com", "http", "https", true), "a.com");
    }
}
