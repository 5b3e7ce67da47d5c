//! `RouteConfiguration` -> [`RouteTable`]: validation with field paths, domain indexing.

use std::collections::HashMap;

use weir_xds_api::pb::envoy::config::route::v3 as rpb;

use super::action::{
    DEFAULT_MAX_DIRECT_RESPONSE_BODY, DirectResponse, ForwardAction, RedirectAction,
};
use super::header::HeaderMutations;
use super::matcher::RouteMatcher;
use super::{Route, RouteAction, RouteTable, VirtualHost, WildcardBucket};
use crate::config::{Errors, TranslateCtx, join};

/// Per-table settings routes need while translating.
struct TableCtx<'c, 'a> {
    ctx: &'c TranslateCtx<'a>,
    validate_clusters: bool,
    max_body: u32,
    /// Per-filter configs seen, for the connection manager's type check.
    filter_configs: std::cell::RefCell<Vec<super::filters::FilterConfigUse>>,
}

/// How a configured domain is indexed.
enum Domain {
    Any,
    Exact(String),
    Suffix(String),
    Prefix(String),
}

fn classify(d: &str) -> Domain {
    let d = d.to_ascii_lowercase();
    if d == "*" {
        Domain::Any
    } else if let Some(s) = d.strip_prefix('*') {
        Domain::Suffix(s.to_string())
    } else if let Some(p) = d.strip_suffix('*') {
        Domain::Prefix(p.to_string())
    } else {
        Domain::Exact(d)
    }
}

fn insert_wildcard(buckets: &mut Vec<WildcardBucket>, key: String, vhost: usize) -> Option<usize> {
    let len = key.len();
    let pos = match buckets.iter().position(|(l, _)| *l <= len) {
        Some(p) if buckets[p].0 == len => p,
        Some(p) => {
            buckets.insert(p, (len, HashMap::new()));
            p
        }
        None => {
            buckets.push((len, HashMap::new()));
            buckets.len() - 1
        }
    };
    let m = &mut buckets[pos].1;
    match m.get(key.as_str()) {
        Some(&prev) => Some(prev),
        None => {
            m.insert(key.into(), vhost);
            None
        }
    }
}

pub(super) fn route_table(
    rc: &rpb::RouteConfiguration,
    path: &str,
    ctx: &TranslateCtx<'_>,
    errs: &mut Errors,
) -> RouteTable {
    errs.reject_unsupported(
        rc,
        &[
            "name",
            "virtual_hosts",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "validate_clusters",
            "max_direct_response_body_size_bytes",
            "most_specific_header_mutations_wins",
            "ignore_port_in_host_matching",
            "metadata",
        ],
        path,
    );
    let tctx = TableCtx {
        ctx,
        validate_clusters: rc
            .validate_clusters
            .as_ref()
            .map_or(!ctx.rds_table, |b| b.value),
        max_body: rc
            .max_direct_response_body_size_bytes
            .as_ref()
            .map_or(DEFAULT_MAX_DIRECT_RESPONSE_BODY, |v| v.value),
        filter_configs: Default::default(),
    };
    let mut table = RouteTable {
        name: rc.name.clone(),
        ignore_port: rc.ignore_port_in_host_matching,
        most_specific_wins: rc.most_specific_header_mutations_wins,
        request_headers: HeaderMutations::translate(
            &rc.request_headers_to_add,
            &rc.request_headers_to_remove,
            path,
            "request",
            errs,
        ),
        response_headers: HeaderMutations::translate(
            &rc.response_headers_to_add,
            &rc.response_headers_to_remove,
            path,
            "response",
            errs,
        ),
        ..RouteTable::default()
    };
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let vp = join(path, &format!("virtual_hosts[{i}]"));
        if vh.name.is_empty() {
            errs.add(join(&vp, "name"), "virtual host name is required");
        } else if let Some(prev) = names.insert(&vh.name, i) {
            errs.add(
                join(&vp, "name"),
                format!(
                    "duplicate virtual host name {:?} (also virtual_hosts[{prev}])",
                    vh.name
                ),
            );
        }
        let idx = table.vhosts.len();
        if vh.domains.is_empty() {
            errs.add(join(&vp, "domains"), "at least one domain is required");
        }
        for (j, d) in vh.domains.iter().enumerate() {
            let dp = join(&vp, &format!("domains[{j}]"));
            if d.is_empty() || http::HeaderValue::from_str(d).is_err() {
                errs.add(dp, format!("{d:?} is not a valid domain"));
                continue;
            }
            let prev = match classify(d) {
                Domain::Any => table.default.replace(idx),
                Domain::Exact(e) => table.exact.insert(e.into(), idx),
                Domain::Suffix(s) => insert_wildcard(&mut table.suffixes, s, idx),
                Domain::Prefix(p) => insert_wildcard(&mut table.prefixes, p, idx),
            };
            if let Some(prev) = prev {
                let other = rc.virtual_hosts.get(prev).map_or("", |v| v.name.as_str());
                errs.add(
                    dp,
                    format!(
                        "duplicate domain {d:?}: also in virtual host {other:?}; domains must be \
                         unique across virtual hosts"
                    ),
                );
            }
        }
        table.vhosts.push(virtual_host(vh, &vp, &tctx, errs));
    }
    table.filter_configs = tctx.filter_configs.into_inner();
    table
}

fn virtual_host(
    vh: &rpb::VirtualHost,
    path: &str,
    tctx: &TableCtx<'_, '_>,
    errs: &mut Errors,
) -> VirtualHost {
    errs.reject_unsupported(
        vh,
        &[
            "name",
            "domains",
            "routes",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "metadata",
            "typed_per_filter_config",
            "rate_limits",
        ]
        .into_iter()
        .chain(super::retry::VHOST_FIELDS.iter().copied())
        .collect::<Vec<_>>(),
        path,
    );
    let check_cluster = |name: &str, p: &str, errs: &mut Errors| {
        if tctx.validate_clusters && !tctx.ctx.clusters.contains(name) {
            errs.add(p, format!("unknown cluster {name:?}"));
        }
    };
    let policy = super::retry::VhostPolicy::translate(vh, path, &check_cluster, errs);
    let filters = weir_filters::RouteFilterData {
        per_filter: super::filters::per_filter_configs(
            &vh.typed_per_filter_config,
            path,
            tctx.ctx,
            &tctx.filter_configs,
            errs,
        ),
        rate_limits: super::filters::rate_limits(&vh.rate_limits, path, tctx.ctx, errs),
    };
    let routes = vh
        .routes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| route(r, &join(path, &format!("routes[{i}]")), tctx, errs))
        .collect();
    VirtualHost {
        name: vh.name.clone(),
        routes,
        request_headers: HeaderMutations::translate(
            &vh.request_headers_to_add,
            &vh.request_headers_to_remove,
            path,
            "request",
            errs,
        ),
        response_headers: HeaderMutations::translate(
            &vh.response_headers_to_add,
            &vh.response_headers_to_remove,
            path,
            "response",
            errs,
        ),
        policy,
        filters,
    }
}

#[allow(deprecated)] // per_request_buffer_limit_bytes is still honoured
fn route(r: &rpb::Route, path: &str, tctx: &TableCtx<'_, '_>, errs: &mut Errors) -> Option<Route> {
    use rpb::route::Action as A;
    errs.reject_unsupported(
        r,
        &[
            "name",
            "match",
            "route",
            "redirect",
            "direct_response",
            "request_headers_to_add",
            "request_headers_to_remove",
            "response_headers_to_add",
            "response_headers_to_remove",
            "metadata",
            "per_request_buffer_limit_bytes",
            "request_body_buffer_limit",
            "typed_per_filter_config",
            "decorator",
        ],
        path,
    );
    let decorator = r.decorator.as_ref().and_then(|d| {
        let dp = join(path, "decorator");
        if d.operation.is_empty() {
            errs.add(join(&dp, "operation"), "operation must not be empty");
            return None;
        }
        match http::HeaderValue::from_str(&d.operation) {
            Ok(header) => Some(super::Decorator {
                operation: d.operation.as_str().into(),
                propagate: d.propagate.is_none_or(|p| p.value),
                header,
            }),
            Err(_) => {
                errs.add(
                    join(&dp, "operation"),
                    "operation must be a valid header value",
                );
                None
            }
        }
    });
    let per_filter = super::filters::per_filter_configs(
        &r.typed_per_filter_config,
        path,
        tctx.ctx,
        &tctx.filter_configs,
        errs,
    );
    let matcher = match &r.r#match {
        Some(m) => RouteMatcher::translate(m, &join(path, "match"), errs),
        None => {
            errs.add(join(path, "match"), "match is required");
            None
        }
    };
    let action = match &r.action {
        Some(A::Route(ra)) => ForwardAction::translate(
            ra,
            &join(path, "route"),
            tctx.validate_clusters,
            tctx.ctx,
            errs,
        )
        .map(RouteAction::Forward),
        Some(A::Redirect(ra)) => {
            RedirectAction::translate(ra, &join(path, "redirect"), errs).map(RouteAction::Redirect)
        }
        Some(A::DirectResponse(dr)) => {
            DirectResponse::translate(dr, &join(path, "direct_response"), tctx.max_body, errs)
                .map(RouteAction::Direct)
        }
        // filter_action / non_forwarding_action are reported by reject_unsupported.
        Some(_) => None,
        None => {
            errs.add(
                path,
                "one of route, redirect or direct_response is required",
            );
            None
        }
    };
    // A CONNECT route that forwards must terminate CONNECT: weir does not forward CONNECT
    // to an upstream proxy.
    if let (Some(m), Some(RouteAction::Forward(f))) = (&matcher, &action)
        && m.is_connect()
        && !f.connect_terminate()
    {
        errs.add(
            join(path, "route.upgrade_configs"),
            "a connect_matcher route must set upgrade_configs: [{upgrade_type: CONNECT, \
             connect_config: {}}] (forwarding CONNECT to an upstream proxy is not supported)",
        );
    }
    let request_headers = HeaderMutations::translate(
        &r.request_headers_to_add,
        &r.request_headers_to_remove,
        path,
        "request",
        errs,
    );
    let response_headers = HeaderMutations::translate(
        &r.response_headers_to_add,
        &r.response_headers_to_remove,
        path,
        "response",
        errs,
    );
    Some(Route {
        name: r.name.clone(),
        matcher: matcher?,
        action: action?,
        request_headers,
        response_headers,
        per_request_buffer_limit: super::retry::buffer_limit(
            r.per_request_buffer_limit_bytes.map(|v| v.value),
            r.request_body_buffer_limit.map(|v| v.value),
            path,
            errs,
        ),
        filters: weir_filters::RouteFilterData {
            per_filter,
            rate_limits: Vec::new(),
        },
        decorator,
    })
}
