//! Envoy's RBAC engine (`envoy.config.rbac.v3.RBAC`) and the `envoy.filters.http.rbac` filter.
//!
//! # Engine
//! [`RbacEngine::translate`] compiles an `RBAC` message once, at config time: policies sorted by
//! name (Envoy keeps them in a `std::map`, so the first match in name order names the
//! policy), every matcher compiled (CIDRs parsed, regexes built, header matchers compiled by
//! the proxy through [`FactoryContext::header_matchers`]). [`RbacEngine::evaluate`] walks the
//! compiled tree over an [`RbacInput`] without allocating.
//!
//! A policy matches when any of its permissions and any of its principals match. The action:
//! - `ALLOW`: allowed iff a policy matches;
//! - `DENY`: allowed iff no policy matches;
//! - `LOG`: always allowed (the match is only reported).
//!
//! The same engine serves the network filter (`proxy/src/listener/rbac.rs`), where there is
//! no request: header and `url_path` rules never match there.
//!
//! Principals: `any`, `authenticated` (Envoy's order: each peer URI SAN, then each DNS SAN,
//! then the subject; without `principal_name` any TLS-terminated connection is
//! authenticated), `direct_remote_ip` (the connection's physical peer), `source_ip` (the
//! peer after the PROXY protocol), `remote_ip` (the
//! client address after `x-forwarded-for` evaluation), `header`, `url_path`, `and_ids`,
//! `or_ids`, `not_id`. Permissions: `any`, `header`, `url_path`, `destination_ip`,
//! `destination_port`, `destination_port_range`, `requested_server_name`, `and_rules`,
//! `or_rules`, `not_rule`. Everything else (`metadata`, `filter_state`, `matcher`, CEL
//! `condition`, ...) is rejected by name.
//!
//! # HTTP filter
//! `envoy.filters.http.rbac`: `rules` are enforced (403 `RBAC: access denied`), `shadow_rules`
//! are evaluated and counted only. Per route, `RBACPerRoute{rbac}` replaces the filter's
//! config; `RBACPerRoute{}` (no `rbac`) disables it on that route. Stats (Envoy names):
//! `http.<hcm prefix>.rbac.<rules_stat_prefix>{allowed,denied}` and
//! `http.<hcm prefix>.rbac.<shadow_rules_stat_prefix>{shadow_allowed,shadow_denied}`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::StatusCode;
use metrics::Counter;
use weir_xds_api::Any;
use weir_xds_api::pb::envoy::config::core::v3::CidrRange;
use weir_xds_api::pb::envoy::config::rbac::v3 as rbac_pb;
use weir_xds_api::pb::envoy::extensions::filters::http::rbac::v3 as http_rbac_pb;
use weir_xds_api::pb::envoy::r#type::matcher::v3 as mpb;

use crate::chain::{DownstreamTls, FilterContext};
use crate::config::{ConfigErrors, FactoryContext, RequestHead, RequestMatcher, StatScope, join};
use crate::{FilterAction, HttpFilter, HttpFilterFactory, LocalReply, type_urls};

pub use crate::matcher::{StringMatch, full_regex};

/// An Envoy `CidrRange`, compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    /// Parse `address_prefix` / `prefix_len` at `path`.
    pub fn translate(c: &CidrRange, path: &str, errs: &mut ConfigErrors) -> Option<Cidr> {
        errs.reject_unsupported(c, &["address_prefix", "prefix_len"], path);
        let Ok(ip) = c.address_prefix.parse::<IpAddr>() else {
            errs.add(
                join(path, "address_prefix"),
                format!("{:?} is not an IP address", c.address_prefix),
            );
            return None;
        };
        let ip = unmap(ip);
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = c.prefix_len.as_ref().map_or(0, |v| v.value);
        if len > max {
            errs.add(
                join(path, "prefix_len"),
                format!("must be at most {max} for {ip}"),
            );
            return None;
        }
        Some(Cidr {
            net: ip,
            len: len as u8,
        })
    }

    /// Whether `ip` is in the range (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, unmap(ip)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What the engine evaluates: the connection, and the request for HTTP.
#[derive(Debug, Clone, Copy)]
pub struct RbacInput<'a> {
    /// The connection's physical peer (`direct_remote_ip`).
    pub direct_remote: SocketAddr,
    /// The connection's peer as the PROXY protocol restored it (`source_ip`: Envoy's
    /// "honors proxy protocol, not XFF"); the physical peer without it.
    pub source: SocketAddr,
    /// The client after `x-forwarded-for` evaluation (`remote_ip`); the peer for connections.
    pub remote: SocketAddr,
    /// The local address the connection was accepted on (`destination_ip`/`_port`).
    pub local: SocketAddr,
    /// Downstream TLS facts (`authenticated`, `requested_server_name`).
    pub tls: Option<&'a DownstreamTls>,
    /// The request (HTTP filter); `None` on connections (network filter).
    pub request: Option<RequestHead<'a>>,
}

/// A compiled `Permission`.
#[derive(Debug)]
pub enum Permission {
    /// `any: true`.
    Any,
    /// `and_rules`.
    And(Vec<Permission>),
    /// `or_rules`.
    Or(Vec<Permission>),
    /// `not_rule`.
    Not(Box<Permission>),
    /// `header`.
    Header(Arc<dyn RequestMatcher>),
    /// `url_path`.
    UrlPath(StringMatch),
    /// `destination_ip`.
    DestinationIp(Cidr),
    /// `destination_port`.
    DestinationPort(u32),
    /// `destination_port_range` (`[start, end)`).
    DestinationPortRange(i32, i32),
    /// `requested_server_name` (the SNI; empty without one, as Envoy).
    RequestedServerName(StringMatch),
}

/// A compiled `Principal`.
#[derive(Debug)]
pub enum Principal {
    /// `any: true`.
    Any,
    /// `and_ids`.
    And(Vec<Principal>),
    /// `or_ids`.
    Or(Vec<Principal>),
    /// `not_id`.
    Not(Box<Principal>),
    /// `authenticated` with its optional `principal_name`.
    Authenticated(Option<StringMatch>),
    /// `direct_remote_ip`: the physical peer.
    DirectRemoteIp(Cidr),
    /// `source_ip`: the peer after the PROXY protocol.
    SourceIp(Cidr),
    /// `remote_ip`.
    RemoteIp(Cidr),
    /// `header`.
    Header(Arc<dyn RequestMatcher>),
    /// `url_path`.
    UrlPath(StringMatch),
}

/// The URL path of a `:path` (query and fragment removed).
fn url_path(p: &str) -> &str {
    let end = p.find(['?', '#']).unwrap_or(p.len());
    &p[..end]
}

fn header_matches(m: &dyn RequestMatcher, input: &RbacInput<'_>) -> bool {
    input.request.as_ref().is_some_and(|r| m.matches(r))
}

fn path_matches(m: &StringMatch, input: &RbacInput<'_>) -> bool {
    input
        .request
        .as_ref()
        .is_some_and(|r| m.matches(url_path(r.path)))
}

impl Permission {
    /// Whether the permission matches.
    pub fn matches(&self, input: &RbacInput<'_>) -> bool {
        match self {
            Permission::Any => true,
            Permission::And(v) => v.iter().all(|p| p.matches(input)),
            Permission::Or(v) => v.iter().any(|p| p.matches(input)),
            Permission::Not(p) => !p.matches(input),
            Permission::Header(m) => header_matches(m.as_ref(), input),
            Permission::UrlPath(m) => path_matches(m, input),
            Permission::DestinationIp(c) => c.contains(input.local.ip()),
            Permission::DestinationPort(p) => u32::from(input.local.port()) == *p,
            Permission::DestinationPortRange(s, e) => {
                let p = i32::from(input.local.port());
                *s <= p && p < *e
            }
            Permission::RequestedServerName(m) => {
                m.matches(input.tls.and_then(|t| t.sni.as_deref()).unwrap_or(""))
            }
        }
    }

    /// Compile a `Permission` at `path`.
    #[allow(deprecated)] // `metadata` is matched only to be rejected
    pub fn translate(
        p: &rbac_pb::Permission,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<Permission> {
        use rbac_pb::permission::Rule as R;
        errs.reject_unsupported(
            p,
            &[
                "and_rules",
                "or_rules",
                "any",
                "header",
                "url_path",
                "destination_ip",
                "destination_port",
                "destination_port_range",
                "not_rule",
                "requested_server_name",
            ],
            path,
        );
        let set = |rules: &[rbac_pb::Permission], field: &str, errs: &mut ConfigErrors| {
            let fp = format!("{}.rules", join(path, field));
            if rules.is_empty() {
                errs.add(&fp, "must have at least one rule");
                return None;
            }
            let before = errs.len();
            let v: Vec<Permission> = rules
                .iter()
                .enumerate()
                .filter_map(|(i, r)| Permission::translate(r, &format!("{fp}[{i}]"), ctx, errs))
                .collect();
            (errs.len() == before).then_some(v)
        };
        match p.rule.as_ref()? {
            R::Any(true) => Some(Permission::Any),
            R::Any(false) => {
                errs.add(join(path, "any"), "must be true");
                None
            }
            R::AndRules(s) => set(&s.rules, "and_rules", errs).map(Permission::And),
            R::OrRules(s) => set(&s.rules, "or_rules", errs).map(Permission::Or),
            R::NotRule(r) => Permission::translate(r, &join(path, "not_rule"), ctx, errs)
                .map(|r| Permission::Not(Box::new(r))),
            R::Header(h) => ctx
                .header_matchers(std::slice::from_ref(h), &join(path, "header"), errs)
                .map(Permission::Header),
            R::UrlPath(m) => {
                path_matcher(m, &join(path, "url_path"), errs).map(Permission::UrlPath)
            }
            R::DestinationIp(c) => Cidr::translate(c, &join(path, "destination_ip"), errs)
                .map(Permission::DestinationIp),
            R::DestinationPort(port) => {
                if *port > 65535 {
                    errs.add(join(path, "destination_port"), "must be at most 65535");
                    return None;
                }
                Some(Permission::DestinationPort(*port))
            }
            R::DestinationPortRange(r) => {
                if r.start > r.end {
                    errs.add(
                        join(path, "destination_port_range"),
                        "start must not be greater than end",
                    );
                    return None;
                }
                Some(Permission::DestinationPortRange(r.start, r.end))
            }
            R::RequestedServerName(m) => {
                StringMatch::translate(m, &join(path, "requested_server_name"), errs)
                    .map(Permission::RequestedServerName)
            }
            // Rejected by name above.
            R::Metadata(_) | R::Matcher(_) | R::UriTemplate(_) | R::SourcedMetadata(_) => None,
        }
    }
}

fn path_matcher(m: &mpb::PathMatcher, path: &str, errs: &mut ConfigErrors) -> Option<StringMatch> {
    errs.reject_unsupported(m, &["path"], path);
    match &m.rule {
        Some(mpb::path_matcher::Rule::Path(sm)) => {
            StringMatch::translate(sm, &join(path, "path"), errs)
        }
        None => {
            errs.add(join(path, "path"), "path is required");
            None
        }
    }
}

impl Principal {
    /// Whether the principal matches.
    pub fn matches(&self, input: &RbacInput<'_>) -> bool {
        match self {
            Principal::Any => true,
            Principal::And(v) => v.iter().all(|p| p.matches(input)),
            Principal::Or(v) => v.iter().any(|p| p.matches(input)),
            Principal::Not(p) => !p.matches(input),
            Principal::Authenticated(m) => authenticated(m.as_ref(), input.tls),
            Principal::DirectRemoteIp(c) => c.contains(input.direct_remote.ip()),
            Principal::SourceIp(c) => c.contains(input.source.ip()),
            Principal::RemoteIp(c) => c.contains(input.remote.ip()),
            Principal::Header(m) => header_matches(m.as_ref(), input),
            Principal::UrlPath(m) => path_matches(m, input),
        }
    }

    /// Compile a `Principal` at `path`.
    #[allow(deprecated)] // `source_ip` is still accepted, as Envoy does
    pub fn translate(
        p: &rbac_pb::Principal,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<Principal> {
        use rbac_pb::principal::Identifier as I;
        errs.reject_unsupported(
            p,
            &[
                "and_ids",
                "or_ids",
                "any",
                "authenticated",
                "source_ip",
                "direct_remote_ip",
                "remote_ip",
                "header",
                "url_path",
                "not_id",
            ],
            path,
        );
        let set = |ids: &[rbac_pb::Principal], field: &str, errs: &mut ConfigErrors| {
            let fp = format!("{}.ids", join(path, field));
            if ids.is_empty() {
                errs.add(&fp, "must have at least one id");
                return None;
            }
            let before = errs.len();
            let v: Vec<Principal> = ids
                .iter()
                .enumerate()
                .filter_map(|(i, r)| Principal::translate(r, &format!("{fp}[{i}]"), ctx, errs))
                .collect();
            (errs.len() == before).then_some(v)
        };
        match p.identifier.as_ref()? {
            I::Any(true) => Some(Principal::Any),
            I::Any(false) => {
                errs.add(join(path, "any"), "must be true");
                None
            }
            I::AndIds(s) => set(&s.ids, "and_ids", errs).map(Principal::And),
            I::OrIds(s) => set(&s.ids, "or_ids", errs).map(Principal::Or),
            I::NotId(r) => Principal::translate(r, &join(path, "not_id"), ctx, errs)
                .map(|r| Principal::Not(Box::new(r))),
            I::Authenticated(a) => {
                let ap = join(path, "authenticated");
                errs.reject_unsupported(a, &["principal_name"], &ap);
                match &a.principal_name {
                    None => Some(Principal::Authenticated(None)),
                    Some(m) => StringMatch::translate(m, &join(&ap, "principal_name"), errs)
                        .map(|m| Principal::Authenticated(Some(m))),
                }
            }
            I::SourceIp(c) => {
                Cidr::translate(c, &join(path, "source_ip"), errs).map(Principal::SourceIp)
            }
            I::DirectRemoteIp(c) => Cidr::translate(c, &join(path, "direct_remote_ip"), errs)
                .map(Principal::DirectRemoteIp),
            I::RemoteIp(c) => {
                Cidr::translate(c, &join(path, "remote_ip"), errs).map(Principal::RemoteIp)
            }
            I::Header(h) => ctx
                .header_matchers(std::slice::from_ref(h), &join(path, "header"), errs)
                .map(Principal::Header),
            I::UrlPath(m) => path_matcher(m, &join(path, "url_path"), errs).map(Principal::UrlPath),
            // Rejected by name above.
            I::Metadata(_) | I::FilterState(_) | I::SourcedMetadata(_) | I::Custom(_) => None,
        }
    }
}

/// Envoy's `AuthenticatedMatcher`: a TLS-terminated connection; with a matcher, the first of
/// the peer's URI SANs, then DNS SANs, then its subject that matches.
fn authenticated(m: Option<&StringMatch>, tls: Option<&DownstreamTls>) -> bool {
    let Some(tls) = tls.filter(|t| t.terminated) else {
        return false;
    };
    let Some(m) = m else { return true };
    match &tls.peer {
        Some(peer) => {
            peer.uri_sans.iter().any(|s| m.matches(s))
                || peer.dns_sans.iter().any(|s| m.matches(s))
                || m.matches(&peer.subject)
        }
        None => m.matches(""),
    }
}

/// A compiled `Policy`.
#[derive(Debug)]
pub struct Policy {
    /// The policy name (its key in `policies`).
    pub name: Box<str>,
    permissions: Vec<Permission>,
    principals: Vec<Principal>,
}

impl Policy {
    /// Whether any permission and any principal match.
    pub fn matches(&self, input: &RbacInput<'_>) -> bool {
        self.permissions.iter().any(|p| p.matches(input))
            && self.principals.iter().any(|p| p.matches(input))
    }
}

/// `RBAC.action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RbacAction {
    /// Allow only what a policy matches.
    Allow,
    /// Deny what a policy matches.
    Deny,
    /// Allow everything; report the match.
    Log,
}

/// The engine's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    /// Whether the request or connection may go on.
    pub allowed: bool,
    /// The first policy (by name) that matched.
    pub policy: Option<&'a str>,
}

/// A compiled `envoy.config.rbac.v3.RBAC`.
#[derive(Debug)]
pub struct RbacEngine {
    action: RbacAction,
    policies: Vec<Policy>,
}

impl RbacEngine {
    /// The action.
    pub fn action(&self) -> RbacAction {
        self.action
    }

    /// The compiled policies, sorted by name.
    pub fn policies(&self) -> &[Policy] {
        &self.policies
    }

    /// Evaluate; allocation-free.
    pub fn evaluate<'s>(&'s self, input: &RbacInput<'_>) -> Decision<'s> {
        let policy = self
            .policies
            .iter()
            .find(|p| p.matches(input))
            .map(|p| &*p.name);
        let allowed = match self.action {
            RbacAction::Allow => policy.is_some(),
            RbacAction::Deny => policy.is_none(),
            RbacAction::Log => true,
        };
        Decision { allowed, policy }
    }

    /// Compile an `RBAC` message at `path`.
    pub fn translate(
        r: &rbac_pb::Rbac,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<RbacEngine> {
        errs.reject_unsupported(r, &["action", "policies"], path);
        let before = errs.len();
        let action = match rbac_pb::rbac::Action::try_from(r.action) {
            Ok(rbac_pb::rbac::Action::Allow) => RbacAction::Allow,
            Ok(rbac_pb::rbac::Action::Deny) => RbacAction::Deny,
            Ok(rbac_pb::rbac::Action::Log) => RbacAction::Log,
            Err(_) => {
                errs.add(join(path, "action"), "unknown action");
                RbacAction::Allow
            }
        };
        let mut names: Vec<&String> = r.policies.keys().collect();
        names.sort();
        let mut policies = Vec::with_capacity(names.len());
        for name in names {
            let Some(p) = r.policies.get(name) else {
                continue;
            };
            let pp = format!("{path}.policies[{name}]");
            errs.reject_unsupported(p, &["permissions", "principals"], &pp);
            if p.permissions.is_empty() {
                errs.add(
                    join(&pp, "permissions"),
                    "must have at least one permission",
                );
            }
            if p.principals.is_empty() {
                errs.add(join(&pp, "principals"), "must have at least one principal");
            }
            let permissions = p
                .permissions
                .iter()
                .enumerate()
                .filter_map(|(i, x)| {
                    let ip = format!("{pp}.permissions[{i}]");
                    let r = Permission::translate(x, &ip, ctx, errs);
                    if r.is_none() && x.rule.is_none() {
                        errs.add(&ip, "a permission rule is required");
                    }
                    r
                })
                .collect();
            let principals = p
                .principals
                .iter()
                .enumerate()
                .filter_map(|(i, x)| {
                    let ip = format!("{pp}.principals[{i}]");
                    let r = Principal::translate(x, &ip, ctx, errs);
                    if r.is_none() && x.identifier.is_none() {
                        errs.add(&ip, "a principal identifier is required");
                    }
                    r
                })
                .collect();
            policies.push(Policy {
                name: name.as_str().into(),
                permissions,
                principals,
            });
        }
        (errs.len() == before).then_some(RbacEngine { action, policies })
    }
}

/// Counters of one engine (enforced or shadow).
#[derive(Debug, Clone)]
pub struct RbacCounters {
    /// `allowed` / `shadow_allowed`.
    pub allowed: Counter,
    /// `denied` / `shadow_denied`.
    pub denied: Counter,
}

/// The HTTP filter's compiled config (also the per-route override).
#[derive(Debug)]
struct RbacConfig {
    rules: Option<RbacEngine>,
    shadow: Option<RbacEngine>,
}

impl RbacConfig {
    fn translate(
        c: &http_rbac_pb::Rbac,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> RbacConfig {
        errs.reject_unsupported(
            c,
            &[
                "rules",
                "rules_stat_prefix",
                "shadow_rules",
                "shadow_rules_stat_prefix",
            ],
            path,
        );
        let rules = c
            .rules
            .as_ref()
            .and_then(|r| RbacEngine::translate(r, &join(path, "rules"), ctx, errs));
        let shadow = c
            .shadow_rules
            .as_ref()
            .and_then(|r| RbacEngine::translate(r, &join(path, "shadow_rules"), ctx, errs));
        RbacConfig { rules, shadow }
    }
}

/// Per-route config: a replacement config, or disabled (`RBACPerRoute` without `rbac`).
#[derive(Debug)]
pub struct RbacPerRoute(Option<RbacConfig>);

/// `envoy.filters.http.rbac`.
#[derive(Debug)]
pub struct RbacFilter {
    config: RbacConfig,
    enforced: RbacCounters,
    shadow: RbacCounters,
}

/// The body of Envoy's RBAC denial.
pub const DENIED_BODY: &str = "RBAC: access denied";

impl RbacFilter {
    /// Response code details of a denial (Envoy's `rbac_access_denied_matched_policy[..]`).
    pub fn details(policy: Option<&str>) -> String {
        format!(
            "rbac_access_denied_matched_policy[{}]",
            policy.unwrap_or("none")
        )
    }
}

impl HttpFilter for RbacFilter {
    fn name(&self) -> &str {
        "envoy.filters.http.rbac"
    }

    fn on_request(
        &self,
        req: &mut http::request::Parts,
        ctx: &mut FilterContext<'_>,
    ) -> FilterAction {
        let config = match ctx.route_config_as::<RbacPerRoute>() {
            Some(RbacPerRoute(None)) => return FilterAction::Continue,
            Some(RbacPerRoute(Some(c))) => c,
            None => &self.config,
        };
        let s = ctx.stream;
        let input = RbacInput {
            direct_remote: s.direct_remote,
            source: s.source_remote,
            remote: s.downstream_remote,
            local: s.downstream_local,
            tls: s.tls,
            request: Some(s.head(req)),
        };
        if let Some(shadow) = &config.shadow {
            if shadow.evaluate(&input).allowed {
                self.shadow.allowed.increment(1);
            } else {
                self.shadow.denied.increment(1);
            }
        }
        let Some(rules) = &config.rules else {
            return FilterAction::Continue;
        };
        let d = rules.evaluate(&input);
        if d.allowed {
            self.enforced.allowed.increment(1);
            FilterAction::Continue
        } else {
            self.enforced.denied.increment(1);
            FilterAction::Respond(
                LocalReply::new(StatusCode::FORBIDDEN, DENIED_BODY, "-")
                    .with_details(Self::details(d.policy)),
            )
        }
    }
}

/// Factory for `envoy.filters.http.rbac`.
#[derive(Debug)]
pub struct Factory;

impl HttpFilterFactory for Factory {
    fn type_url(&self) -> &'static str {
        type_urls::RBAC
    }

    fn create(
        &self,
        config: &Any,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<Arc<dyn HttpFilter>> {
        let c: http_rbac_pb::Rbac = match weir_xds_api::unpack(config) {
            Ok(c) => c,
            Err(e) => {
                errs.add(path, e.to_string());
                return None;
            }
        };
        let before = errs.len();
        let config = RbacConfig::translate(&c, path, ctx, errs);
        let scope = StatScope::Hcm { infix: "rbac" };
        let counter = |prefix: &str, stat: &str| ctx.counter(scope, &format!("{prefix}{stat}"));
        let enforced = RbacCounters {
            allowed: counter(&c.rules_stat_prefix, "allowed"),
            denied: counter(&c.rules_stat_prefix, "denied"),
        };
        let shadow = RbacCounters {
            allowed: counter(&c.shadow_rules_stat_prefix, "shadow_allowed"),
            denied: counter(&c.shadow_rules_stat_prefix, "shadow_denied"),
        };
        (errs.len() == before).then(|| {
            Arc::new(RbacFilter {
                config,
                enforced,
                shadow,
            }) as Arc<dyn HttpFilter>
        })
    }

    fn route_type_url(&self) -> Option<&'static str> {
        Some(type_urls::RBAC_PER_ROUTE)
    }

    fn create_route_config(
        &self,
        config: &Any,
        path: &str,
        ctx: &dyn FactoryContext,
        errs: &mut ConfigErrors,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let c: http_rbac_pb::RbacPerRoute = match weir_xds_api::unpack(config) {
            Ok(c) => c,
            Err(e) => {
                errs.add(path, e.to_string());
                return None;
            }
        };
        errs.reject_unsupported(&c, &["rbac"], path);
        let before = errs.len();
        let cfg = c
            .rbac
            .as_ref()
            .map(|r| RbacConfig::translate(r, &join(path, "rbac"), ctx, errs));
        (errs.len() == before)
            .then(|| Arc::new(RbacPerRoute(cfg)) as Arc<dyn std::any::Any + Send + Sync>)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::chain::{
        ChainEntry, ChainState, ConnectionState, FilterChain, HealthyServer, StreamInfo,
    };
    use crate::chain::{PeerCert, PerFilterConfig, PerFilterConfigs, RouteFilterData, RouteView};
    use crate::ratelimit::tests::TestCtx;
    use http::{HeaderMap, Method};
    use metrics::Gauge;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    use weir_xds_api::pb::envoy::config::route::v3 as rpb;

    /// A context whose counters count (by `<infix>.<stat>`), header matchers from [`TestCtx`].
    #[derive(Debug, Default)]
    pub(crate) struct CountingCtx {
        counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
    }

    impl CountingCtx {
        pub(crate) fn get(&self, name: &str) -> u64 {
            self.counters
                .lock()
                .expect("lock")
                .get(name)
                .map_or(0, |c| c.load(Ordering::SeqCst))
        }
        pub(crate) fn names(&self) -> Vec<String> {
            let mut v: Vec<String> = self
                .counters
                .lock()
                .expect("lock")
                .keys()
                .cloned()
                .collect();
            v.sort();
            v
        }
    }

    impl FactoryContext for CountingCtx {
        fn counter(&self, scope: StatScope<'_>, stat: &str) -> Counter {
            let prefix = match scope {
                StatScope::Hcm { infix } => format!("{infix}."),
                StatScope::Tagged { dotted, .. } => dotted.to_string(),
            };
            let c = self
                .counters
                .lock()
                .expect("lock")
                .entry(format!("{prefix}{stat}"))
                .or_default()
                .clone();
            Counter::from_arc(c)
        }
        fn gauge(&self, _scope: StatScope<'_>, _stat: &str) -> Gauge {
            Gauge::noop()
        }
        fn header_matchers(
            &self,
            matchers: &[rpb::HeaderMatcher],
            path: &str,
            errs: &mut ConfigErrors,
        ) -> Option<Arc<dyn RequestMatcher>> {
            TestCtx.header_matchers(matchers, path, errs)
        }
        fn has_cluster(&self, name: &str) -> bool {
            name == "jwks"
        }
    }

    fn engine(yaml: &str) -> Result<RbacEngine, Vec<(String, String)>> {
        let r: rbac_pb::Rbac = weir_xds_api::from_yaml(yaml).expect("yaml");
        let mut errs = ConfigErrors::default();
        let e = RbacEngine::translate(&r, "rbac", &TestCtx, &mut errs);
        if errs.is_empty() {
            Ok(e.expect("engine"))
        } else {
            Err(errs.0)
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn tls(uri: &[&str], dns: &[&str], subject: &str) -> DownstreamTls {
        DownstreamTls {
            sni: Some("api.example.com".into()),
            terminated: true,
            peer: Some(PeerCert {
                uri_sans: uri.iter().map(|s| s.to_string()).collect(),
                dns_sans: dns.iter().map(|s| s.to_string()).collect(),
                subject: subject.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// An input for `path` with `headers`, from 10.0.0.1 (XFF client 192.168.1.5) to
    /// 127.0.0.1:8080.
    fn input<'a>(
        path: &'a str,
        headers: &'a HeaderMap,
        tls: Option<&'a DownstreamTls>,
    ) -> RbacInput<'a> {
        static GET: Method = Method::GET;
        RbacInput {
            direct_remote: sa("10.0.0.1:5000"),
            source: sa("10.0.0.1:5000"),
            remote: sa("192.168.1.5:5000"),
            local: sa("127.0.0.1:8080"),
            tls,
            request: Some(RequestHead {
                authority: "a",
                path,
                method: &GET,
                scheme: "http",
                headers,
            }),
        }
    }

    fn principal(yaml: &str) -> Principal {
        let p: rbac_pb::Principal = weir_xds_api::from_yaml(yaml).expect("yaml");
        let mut errs = ConfigErrors::default();
        let r = Principal::translate(&p, "p", &TestCtx, &mut errs);
        assert!(errs.is_empty(), "{:?}", errs.0);
        r.expect("principal")
    }

    fn permission(yaml: &str) -> Permission {
        let p: rbac_pb::Permission = weir_xds_api::from_yaml(yaml).expect("yaml");
        let mut errs = ConfigErrors::default();
        let r = Permission::translate(&p, "p", &TestCtx, &mut errs);
        assert!(errs.is_empty(), "{:?}", errs.0);
        r.expect("permission")
    }

    #[test]
    fn string_matchers() {
        let m = |y: &str| {
            let sm: mpb::StringMatcher = weir_xds_api::from_yaml(y).expect("yaml");
            let mut errs = ConfigErrors::default();
            let r = StringMatch::translate(&sm, "m", &mut errs);
            (r, errs.0)
        };
        let t = |y: &str, v: &str| m(y).0.expect("matcher").matches(v);
        assert!(t("exact: abc", "abc") && !t("exact: abc", "ABC"));
        assert!(t("{exact: abc, ignore_case: true}", "aBc"));
        assert!(t("prefix: spiffe://", "spiffe://x") && !t("prefix: spiffe://", "http://x"));
        assert!(t("{prefix: SPIFFE://, ignore_case: true}", "spiffe://x"));
        assert!(t("suffix: .com", "a.com") && !t("suffix: .com", "a.org"));
        assert!(t("{suffix: .COM, ignore_case: true}", "a.com"));
        assert!(t("contains: /sa/", "ns/x/sa/y") && !t("contains: /sa/", "ns"));
        assert!(t("{contains: /SA/, ignore_case: true}", "ns/x/sa/y"));
        // Regexes match the whole value.
        assert!(t("safe_regex: {regex: 'a.c'}", "abc"));
        assert!(!t("safe_regex: {regex: 'a.c'}", "xabcx"));
        // Errors.
        assert_eq!(m("prefix: ''").1[0].0, "m.prefix");
        assert_eq!(m("safe_regex: {regex: '('}").1[0].0, "m.safe_regex.regex");
        assert_eq!(m("ignore_case: true").1[0].0, "m");
    }

    #[test]
    fn cidrs() {
        let c = |a: &str, l: u32| {
            let mut errs = ConfigErrors::default();
            let r = Cidr::translate(
                &CidrRange {
                    address_prefix: a.into(),
                    prefix_len: Some(weir_xds_api::pb::google::protobuf::UInt32Value { value: l }),
                },
                "c",
                &mut errs,
            );
            (r, errs.0)
        };
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let v4 = c("10.1.0.0", 16).0.expect("cidr");
        assert!(v4.contains(ip("10.1.200.3")) && !v4.contains(ip("10.2.0.1")));
        assert!(
            v4.contains(ip("::ffff:10.1.0.9")),
            "mapped IPv6 counts as IPv4"
        );
        assert!(!v4.contains(ip("::1")));
        let all = c("0.0.0.0", 0).0.expect("cidr");
        assert!(all.contains(ip("255.255.255.255")));
        let host = c("127.0.0.1", 32).0.expect("cidr");
        assert!(host.contains(ip("127.0.0.1")) && !host.contains(ip("127.0.0.2")));
        let v6 = c("2001:db8::", 32).0.expect("cidr");
        assert!(v6.contains(ip("2001:db8:1::1")) && !v6.contains(ip("2001:db9::1")));
        assert_eq!(c("10.0.0.0", 33).1[0].0, "c.prefix_len");
        assert_eq!(c("nope", 8).1[0].0, "c.address_prefix");
    }

    #[test]
    fn authenticated_principal_follows_envoy_order() {
        let h = HeaderMap::new();
        let spiffe =
            principal("authenticated: {principal_name: {exact: 'spiffe://td/ns/a/sa/front'}}");
        let any_auth = principal("authenticated: {}");
        let front = tls(&["spiffe://td/ns/a/sa/front"], &["front.local"], "CN=front");
        let back = tls(&["spiffe://td/ns/a/sa/back"], &[], "CN=back");
        assert!(spiffe.matches(&input("/", &h, Some(&front))));
        assert!(!spiffe.matches(&input("/", &h, Some(&back))));
        assert!(
            !spiffe.matches(&input("/", &h, None)),
            "plain text is unauthenticated"
        );
        // Passthrough (not terminated) TLS has no peer identity.
        let mut passthrough = front.clone();
        passthrough.terminated = false;
        assert!(!spiffe.matches(&input("/", &h, Some(&passthrough))));
        assert!(!any_auth.matches(&input("/", &h, Some(&passthrough))));
        assert!(any_auth.matches(&input("/", &h, Some(&back))));
        // Terminated TLS without a client certificate: "authenticated" without a name matches
        // (Envoy checks only for TLS); a name matcher sees the empty subject.
        let no_cert = DownstreamTls {
            terminated: true,
            ..Default::default()
        };
        assert!(any_auth.matches(&input("/", &h, Some(&no_cert))));
        assert!(!spiffe.matches(&input("/", &h, Some(&no_cert))));
        // DNS SANs, then the subject.
        let dns = principal("authenticated: {principal_name: {suffix: '.local'}}");
        assert!(dns.matches(&input("/", &h, Some(&front))));
        assert!(!dns.matches(&input("/", &h, Some(&back))));
        let subject = principal("authenticated: {principal_name: {exact: 'CN=back'}}");
        assert!(subject.matches(&input("/", &h, Some(&back))));
        // Any URI SAN may match, not only the first.
        let multi = tls(&["spiffe://x/a", "spiffe://x/b"], &[], "");
        let b = principal("authenticated: {principal_name: {exact: 'spiffe://x/b'}}");
        assert!(b.matches(&input("/", &h, Some(&multi))));
    }

    #[test]
    fn source_ip_follows_the_proxy_protocol_and_direct_remote_ip_does_not() {
        let h = HeaderMap::new();
        // PROXY restored 203.0.113.7 over a physical peer 10.0.0.1; XFF said 192.168.1.5.
        let i = RbacInput {
            source: sa("203.0.113.7:1000"),
            ..input("/", &h, None)
        };
        let t = |y: &str| principal(y).matches(&i);
        assert!(t(
            "source_ip: {address_prefix: 203.0.113.7, prefix_len: 32}"
        ));
        assert!(!t("source_ip: {address_prefix: 10.0.0.1, prefix_len: 32}"));
        assert!(t(
            "direct_remote_ip: {address_prefix: 10.0.0.1, prefix_len: 32}"
        ));
        assert!(!t(
            "direct_remote_ip: {address_prefix: 203.0.113.7, prefix_len: 32}"
        ));
        assert!(t(
            "remote_ip: {address_prefix: 192.168.1.5, prefix_len: 32}"
        ));
    }

    #[test]
    fn address_header_path_and_combinators() {
        let mut h = HeaderMap::new();
        h.insert("x-user", "alice".parse().expect("v"));
        let i = input("/admin/x?debug=1", &h, None);
        let t = |y: &str| principal(y).matches(&i);
        assert!(t("any: true"));
        assert!(t(
            "direct_remote_ip: {address_prefix: 10.0.0.0, prefix_len: 8}"
        ));
        assert!(t("source_ip: {address_prefix: 10.0.0.1, prefix_len: 32}"));
        assert!(!t("remote_ip: {address_prefix: 10.0.0.0, prefix_len: 8}"));
        assert!(t(
            "remote_ip: {address_prefix: 192.168.0.0, prefix_len: 16}"
        ));
        assert!(t("header: {name: x-user, exact_match: alice}"));
        assert!(!t("header: {name: x-user, exact_match: bob}"));
        assert!(t("url_path: {path: {prefix: /admin}}"));
        assert!(
            t("url_path: {path: {exact: /admin/x}}"),
            "query is not part of the path"
        );
        assert!(t(
            "and_ids: {ids: [{any: true}, {header: {name: x-user, exact_match: alice}}]}"
        ));
        assert!(!t(
            "and_ids: {ids: [{any: true}, {header: {name: x-user, exact_match: bob}}]}"
        ));
        assert!(t(
            "or_ids: {ids: [{header: {name: x-user, exact_match: bob}}, {any: true}]}"
        ));
        assert!(!t("not_id: {any: true}"));
        assert!(t("not_id: {header: {name: x-user, exact_match: bob}}"));

        let sni_tls = tls(&[], &[], "");
        let i = input("/admin/x?debug=1", &h, Some(&sni_tls));
        let t = |y: &str| permission(y).matches(&i);
        assert!(t("any: true"));
        assert!(t("destination_port: 8080") && !t("destination_port: 80"));
        assert!(t("destination_port_range: {start: 8000, end: 8081}"));
        assert!(
            !t("destination_port_range: {start: 8000, end: 8080}"),
            "end is exclusive"
        );
        assert!(t(
            "destination_ip: {address_prefix: 127.0.0.0, prefix_len: 8}"
        ));
        assert!(!t(
            "destination_ip: {address_prefix: 10.0.0.0, prefix_len: 8}"
        ));
        assert!(t("requested_server_name: {exact: api.example.com}"));
        assert!(!t("requested_server_name: {exact: other}"));
        assert!(t("url_path: {path: {safe_regex: {regex: '/admin/.*'}}}"));
        assert!(t("header: {name: x-user, exact_match: alice}"));
        assert!(t(
            "and_rules: {rules: [{destination_port: 8080}, {url_path: {path: {prefix: /admin}}}]}"
        ));
        assert!(!t(
            "and_rules: {rules: [{destination_port: 80}, {url_path: {path: {prefix: /admin}}}]}"
        ));
        assert!(t(
            "or_rules: {rules: [{destination_port: 80}, {url_path: {path: {prefix: /admin}}}]}"
        ));
        assert!(t("not_rule: {destination_port: 80}"));
        // No SNI: the server name is empty.
        let i = input("/", &h, None);
        assert!(!permission("requested_server_name: {prefix: api}").matches(&i));
        assert!(permission("requested_server_name: {exact: ''}").matches(&i));

        // On a connection (no request) header and path rules never match.
        let conn = RbacInput {
            request: None,
            ..input("/", &h, None)
        };
        assert!(!permission("header: {name: x-user, exact_match: alice}").matches(&conn));
        assert!(!permission("url_path: {path: {prefix: /}}").matches(&conn));
        assert!(!principal("url_path: {path: {prefix: /}}").matches(&conn));
        assert!(permission("destination_port: 8080").matches(&conn));
    }

    #[test]
    fn actions_and_policy_order() {
        let h = HeaderMap::new();
        let policies = "
policies:
  b-admin:
    permissions: [{url_path: {path: {prefix: /admin}}}]
    principals: [{any: true}]
  a-local:
    permissions: [{any: true}]
    principals: [{direct_remote_ip: {address_prefix: 10.0.0.0, prefix_len: 8}}]
";
        let allow = engine(&format!("action: ALLOW\n{policies}")).expect("engine");
        let names: Vec<&str> = allow.policies().iter().map(|p| &*p.name).collect();
        assert_eq!(names, ["a-local", "b-admin"]);
        // Both match /admin: the first by name wins.
        let d = allow.evaluate(&input("/admin", &h, None));
        assert_eq!(
            d,
            Decision {
                allowed: true,
                policy: Some("a-local")
            }
        );
        let other = RbacInput {
            direct_remote: sa("172.16.0.1:1"),
            ..input("/public", &h, None)
        };
        assert_eq!(
            allow.evaluate(&other),
            Decision {
                allowed: false,
                policy: None
            }
        );
        let deny = engine(&format!("action: DENY\n{policies}")).expect("engine");
        assert_eq!(
            deny.evaluate(&input("/x", &h, None)),
            Decision {
                allowed: false,
                policy: Some("a-local")
            }
        );
        assert!(deny.evaluate(&other).allowed);
        let log = engine(&format!("action: LOG\n{policies}")).expect("engine");
        assert_eq!(
            log.evaluate(&input("/x", &h, None)),
            Decision {
                allowed: true,
                policy: Some("a-local")
            }
        );
        // No policies: ALLOW denies everything, DENY allows everything.
        assert!(!engine("action: ALLOW").expect("e").evaluate(&other).allowed);
        assert!(engine("action: DENY").expect("e").evaluate(&other).allowed);
    }

    #[test]
    fn translation_errors_name_the_field() {
        let errs = |y: &str| engine(y).expect_err("invalid");
        let e = errs(
            "policies: {p: {permissions: [{metadata: {filter: x}}], principals: [{any: true}]}}",
        );
        assert_eq!(e[0].0, "rbac.policies[p].permissions[0].metadata");
        let e = errs(
            "policies: {p: {permissions: [{any: true}], principals: [{filter_state: {key: k}}]}}",
        );
        assert_eq!(e[0].0, "rbac.policies[p].principals[0].filter_state");
        let e = errs(
            "policies: {p: {permissions: [{any: true}], principals: [{any: true}], condition: {id: 1}}}",
        );
        assert_eq!(e[0].0, "rbac.policies[p].condition");
        let e = errs("policies: {p: {permissions: [], principals: [{any: true}]}}");
        assert_eq!(e[0].0, "rbac.policies[p].permissions");
        let e = errs("policies: {p: {permissions: [{}], principals: [{any: true}]}}");
        assert_eq!(e[0].0, "rbac.policies[p].permissions[0]");
        let e = errs(
            "policies: {p: {permissions: [{any: true}], principals: [{remote_ip: {address_prefix: x}}]}}",
        );
        assert_eq!(
            e[0].0,
            "rbac.policies[p].principals[0].remote_ip.address_prefix"
        );
        let e = errs(
            "policies: {p: {permissions: [{and_rules: {rules: []}}], principals: [{any: true}]}}",
        );
        assert_eq!(e[0].0, "rbac.policies[p].permissions[0].and_rules.rules");
        let e = errs(
            "policies: {p: {permissions: [{not_rule: {destination_port: 70000}}], principals: [{any: true}]}}",
        );
        assert_eq!(
            e[0].0,
            "rbac.policies[p].permissions[0].not_rule.destination_port"
        );
        let e = errs(
            "policies: {p: {permissions: [{any: true}], principals: [{authenticated: {principal_name: {safe_regex: {regex: '('}}}}]}}",
        );
        assert_eq!(
            e[0].0,
            "rbac.policies[p].principals[0].authenticated.principal_name.safe_regex.regex"
        );
        let e = errs("audit_logging_options: {audit_condition: ON_DENY}");
        assert_eq!(e[0].0, "rbac.audit_logging_options");
    }

    fn filter(yaml: &str, ctx: &CountingCtx) -> Result<Arc<dyn HttpFilter>, Vec<(String, String)>> {
        let c: http_rbac_pb::Rbac = weir_xds_api::from_yaml(yaml).expect("yaml");
        let mut errs = ConfigErrors::default();
        let f = Factory.create(&weir_xds_api::pack(&c), "f", ctx, &mut errs);
        if errs.is_empty() {
            Ok(f.expect("filter"))
        } else {
            Err(errs.0)
        }
    }

    fn per_route(yaml: &str) -> Arc<dyn std::any::Any + Send + Sync> {
        let c: http_rbac_pb::RbacPerRoute = weir_xds_api::from_yaml(yaml).expect("yaml");
        let mut errs = ConfigErrors::default();
        let r = Factory.create_route_config(&weir_xds_api::pack(&c), "r", &TestCtx, &mut errs);
        assert!(errs.is_empty(), "{:?}", errs.0);
        r.expect("per-route")
    }

    async fn run(
        f: &Arc<dyn HttpFilter>,
        path: &str,
        route_cfg: Option<PerFilterConfig>,
        tls: Option<&DownstreamTls>,
    ) -> Option<LocalReply> {
        let chain = FilterChain::new(vec![ChainEntry {
            name: "rbac".into(),
            filter: f.clone(),
            disabled: false,
            type_url: type_urls::RBAC.into(),
        }]);
        let conn = ConnectionState::default();
        let route = RouteFilterData {
            per_filter: PerFilterConfigs(
                route_cfg.into_iter().map(|c| ("rbac".into(), c)).collect(),
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
            sa("192.168.1.5:1"),
            sa("127.0.0.1:80"),
            1,
            false,
            "a",
            path,
            "http",
            Some(view),
            &HealthyServer,
            &conn,
            1,
        )
        .with_direct_remote(sa("10.0.0.1:1"))
        .with_tls(tls);
        let (mut parts, _) = http::Request::new(()).into_parts();
        chain
            .decode(&mut parts, &info, &mut ChainState::default())
            .await
            .err()
    }

    const ADMIN_ONLY_FROM_10: &str = "
rules:
  action: ALLOW
  policies:
    admin:
      permissions: [{url_path: {path: {prefix: /admin}}}]
      principals: [{direct_remote_ip: {address_prefix: 10.0.0.0, prefix_len: 8}}]
shadow_rules:
  action: DENY
  policies:
    no-secret:
      permissions: [{url_path: {path: {prefix: /admin/secret}}}]
      principals: [{any: true}]
shadow_rules_stat_prefix: dry_
";

    #[tokio::test]
    async fn http_filter_enforces_rules_counts_shadow_and_honours_per_route() {
        let ctx = CountingCtx::default();
        let f = filter(ADMIN_ONLY_FROM_10, &ctx).expect("filter");
        assert_eq!(
            ctx.names(),
            [
                "rbac.allowed",
                "rbac.denied",
                "rbac.dry_shadow_allowed",
                "rbac.dry_shadow_denied"
            ]
        );
        assert!(run(&f, "/admin/x", None, None).await.is_none());
        let r = run(&f, "/public", None, None).await.expect("denied");
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_eq!(r.body, DENIED_BODY);
        // The shadow denies /admin/secret but does not enforce it.
        assert!(run(&f, "/admin/secret", None, None).await.is_none());
        assert_eq!(ctx.get("rbac.allowed"), 2);
        assert_eq!(ctx.get("rbac.denied"), 1);
        assert_eq!(ctx.get("rbac.dry_shadow_allowed"), 2);
        assert_eq!(ctx.get("rbac.dry_shadow_denied"), 1);

        // Per route: RBACPerRoute{} disables; RBACPerRoute{rbac} replaces the rules.
        let off = PerFilterConfig::Config(per_route("{}"));
        assert!(run(&f, "/public", Some(off), None).await.is_none());
        let deny_all = PerFilterConfig::Config(per_route(
            "rbac: {rules: {action: DENY, policies: {all: {permissions: [{any: true}], principals: [{any: true}]}}}}",
        ));
        assert!(run(&f, "/admin/x", Some(deny_all), None).await.is_some());
        let wrapper_disabled = PerFilterConfig::Disabled;
        assert!(
            run(&f, "/public", Some(wrapper_disabled), None)
                .await
                .is_none()
        );
        assert_eq!(ctx.get("rbac.denied"), 2);
        assert_eq!(
            RbacFilter::details(Some("p")),
            "rbac_access_denied_matched_policy[p]"
        );
        assert_eq!(
            RbacFilter::details(None),
            "rbac_access_denied_matched_policy[none]"
        );
    }

    #[tokio::test]
    async fn http_filter_reads_the_peer_identity_from_stream_tls() {
        let ctx = CountingCtx::default();
        let f = filter(
            "
rules:
  policies:
    front:
      permissions: [{any: true}]
      principals: [{authenticated: {principal_name: {exact: 'spiffe://td/ns/a/sa/front'}}}]
rules_stat_prefix: mesh_
",
            &ctx,
        )
        .expect("filter");
        let front = tls(&["spiffe://td/ns/a/sa/front"], &[], "");
        let back = tls(&["spiffe://td/ns/a/sa/back"], &[], "");
        assert!(run(&f, "/", None, Some(&front)).await.is_none());
        assert!(run(&f, "/", None, Some(&back)).await.is_some());
        assert!(run(&f, "/", None, None).await.is_some());
        assert_eq!(ctx.get("rbac.mesh_allowed"), 1);
        assert_eq!(ctx.get("rbac.mesh_denied"), 2);
    }

    #[test]
    fn http_filter_config_errors() {
        let ctx = CountingCtx::default();
        let e = filter("matcher: {}", &ctx).expect_err("invalid");
        assert_eq!(e[0].0, "f.matcher");
        let e = filter(
            "rules: {policies: {p: {permissions: [{any: false}], principals: [{any: true}]}}}",
            &ctx,
        )
        .expect_err("invalid");
        assert_eq!(e[0].0, "f.rules.policies[p].permissions[0].any");
        // No rules: nothing enforced.
        let f = filter("{}", &ctx).expect("filter");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        assert!(rt.block_on(run(&f, "/", None, None)).is_none());
    }
}
