//! What routes carry for HTTP filters: `typed_per_filter_config` (virtual host and route),
//! parsed by the filter's factory from the built-in [`weir_filters::Registry`], and
//! `rate_limits` (virtual host and route action), compiled for the local rate limit filter.
//! Also the proxy's [`weir_filters::FactoryContext`] (stats, header matchers), shared with the
//! connection manager's filter translation.

use std::collections::HashMap;
use std::sync::Arc;

use weir_filters::{
    ConfigErrors, FactoryContext, PerFilterConfig, PerFilterConfigs, RateLimitPolicy, RequestHead,
    RequestMatcher, StatScope,
};
use weir_xds_api::Any;
use weir_xds_api::pb::envoy::config::route::v3 as rpb;

use super::RouteRequest;
use super::matcher::HeaderMatch;
use crate::config::{Errors, TranslateCtx};

/// Compiled `HeaderMatcher`s; all must match (the route matcher's semantics).
#[derive(Debug)]
struct HeaderMatchers(Vec<HeaderMatch>);

impl RequestMatcher for HeaderMatchers {
    fn matches(&self, h: &RequestHead<'_>) -> bool {
        let r = RouteRequest {
            authority: h.authority,
            path: h.path,
            method: h.method,
            headers: h.headers,
            scheme: h.scheme,
        };
        self.0.iter().all(|m| m.matches(&r))
    }
}

/// Move filter translation errors into the proxy's sink.
pub fn merge_errors(errs: &mut Errors, f: ConfigErrors) {
    for (p, m) in f.0 {
        errs.add(p, m);
    }
}

/// The proxy's [`FactoryContext`]: stats in the translation's store, the route header
/// matchers, the static cluster names.
#[derive(Debug)]
pub struct ProxyFactoryContext<'c, 'a> {
    /// The translation context.
    pub ctx: &'c TranslateCtx<'a>,
    /// The connection manager's `stat_prefix` (for `http.<prefix>.<infix>.` stats); empty
    /// while translating routes (per-route configs register no HCM stats).
    pub hcm_prefix: &'c str,
}

impl ProxyFactoryContext<'_, '_> {
    fn scope(&self, scope: StatScope<'_>) -> crate::stats::Scope {
        match scope {
            StatScope::Hcm { infix } => self.ctx.stats.http(self.hcm_prefix).child(infix),
            StatScope::Tagged {
                dotted,
                prom,
                label,
                value,
            } => self.ctx.stats.tagged(dotted, prom, label, value),
        }
    }
}

impl FactoryContext for ProxyFactoryContext<'_, '_> {
    fn counter(&self, scope: StatScope<'_>, stat: &str) -> metrics::Counter {
        self.scope(scope).counter(stat)
    }

    fn gauge(&self, scope: StatScope<'_>, stat: &str) -> metrics::Gauge {
        self.scope(scope).gauge(stat)
    }

    fn header_matchers(
        &self,
        matchers: &[rpb::HeaderMatcher],
        path: &str,
        errs: &mut ConfigErrors,
    ) -> Option<Arc<dyn RequestMatcher>> {
        let mut e = Errors::default();
        let out: Vec<HeaderMatch> = matchers
            .iter()
            .enumerate()
            .filter_map(|(i, m)| HeaderMatch::translate(m, &format!("{path}[{i}]"), &mut e))
            .collect();
        let ok = e.is_empty();
        for c in e.0 {
            errs.add(c.path, c.message);
        }
        ok.then(|| Arc::new(HeaderMatchers(out)) as Arc<dyn RequestMatcher>)
    }

    fn has_cluster(&self, name: &str) -> bool {
        self.ctx.clusters.contains(name)
    }
}

/// `typed_per_filter_config` at `path` (keys sorted for stable error order). Values are the
/// filter's own config, or an `envoy.config.route.v3.FilterConfig` wrapper (`config`,
/// `disabled`, `is_optional`: an unknown optional filter is skipped).
pub(super) fn per_filter_configs(
    map: &HashMap<String, Any>,
    path: &str,
    ctx: &TranslateCtx<'_>,
    seen: &std::cell::RefCell<Vec<FilterConfigUse>>,
    errs: &mut Errors,
) -> PerFilterConfigs {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    let fctx = ProxyFactoryContext {
        ctx,
        hcm_prefix: "",
    };
    let mut out = Vec::new();
    for name in keys {
        let Some(any) = map.get(name) else { continue };
        let p = format!("{path}.typed_per_filter_config[{name}]");
        let (any, optional) = if any.type_url == weir_filters::type_urls::FILTER_CONFIG {
            let fc: rpb::FilterConfig = match weir_xds_api::unpack(any) {
                Ok(fc) => fc,
                Err(e) => {
                    errs.add(&p, e.to_string());
                    continue;
                }
            };
            if fc.disabled {
                out.push((name.as_str().into(), PerFilterConfig::Disabled));
                continue;
            }
            match fc.config {
                Some(inner) => (std::borrow::Cow::Owned(inner), fc.is_optional),
                None => {
                    out.push((name.as_str().into(), PerFilterConfig::Enabled));
                    continue;
                }
            }
        } else {
            (std::borrow::Cow::Borrowed(any), false)
        };
        let Some(factory) = weir_filters::Registry::builtin().http_for_route(&any.type_url) else {
            if !optional {
                errs.add(
                    &p,
                    format!(
                        "unsupported HTTP filter config type {} (set is_optional in a \
                         FilterConfig wrapper to skip it)",
                        weir_xds_api::type_name(&any.type_url)
                    ),
                );
            }
            continue;
        };
        let mut ferrs = ConfigErrors::default();
        let cfg = factory.create_route_config(&any, &p, &fctx, &mut ferrs);
        merge_errors(errs, ferrs);
        if let Some(c) = cfg {
            seen.borrow_mut().push(FilterConfigUse {
                name: name.clone(),
                // The filter's type (a distinct per-route type maps to its filter's).
                type_url: factory.type_url().to_string(),
                path: p,
            });
            out.push((name.as_str().into(), PerFilterConfig::Config(c)));
        }
    }
    PerFilterConfigs(out)
}

/// A per-filter config seen in a route table: the connection manager checks that a filter of
/// that name, if it has one, is of the same type (else the filter would silently ignore it).
#[derive(Debug, Clone)]
pub struct FilterConfigUse {
    /// The `typed_per_filter_config` key.
    pub name: String,
    /// The config's type URL.
    pub type_url: String,
    /// Where it is.
    pub path: String,
}

/// `rate_limits` at `path`.
pub(super) fn rate_limits(
    rls: &[rpb::RateLimit],
    path: &str,
    ctx: &TranslateCtx<'_>,
    errs: &mut Errors,
) -> Vec<RateLimitPolicy> {
    let fctx = ProxyFactoryContext {
        ctx,
        hcm_prefix: "",
    };
    let mut ferrs = ConfigErrors::default();
    let out = rls
        .iter()
        .enumerate()
        .filter_map(|(i, rl)| {
            RateLimitPolicy::translate(rl, &format!("{path}.rate_limits[{i}]"), &fctx, &mut ferrs)
        })
        .collect();
    merge_errors(errs, ferrs);
    out
}
