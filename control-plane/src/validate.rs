//! Parsing and validating operator config documents before they are stored.
//!
//! A document has the form of Envoy's filesystem xDS files: a `DiscoveryResponse` in YAML or
//! JSON whose `resources` are `@type`-tagged Listeners, RouteConfigurations, Clusters,
//! ClusterLoadAssignments (and Secrets, kept opaque). Errors carry field paths rooted at the
//! document (`resources[2].filter_chains[0].filters[0].typed_config.route_config...`).
//!
//! Validation runs weir's own translation, the one `weir --mode validate` runs
//! ([`weir_proxy::upstream::translate_cluster`], [`weir_proxy::route::RouteTable::translate`],
//! [`weir_proxy::listener::translate_listener`]), so a document weir-cp accepts is one a weir
//! proxy accepts. Resources that only make sense over xDS are normalised first, so that the
//! static translator can judge the rest of them:
//! - an `EDS` cluster must take its endpoints from ADS (`eds_cluster_config.eds_config` is
//!   `ads: {}` or `self: {}`); it is validated as a `STATIC` cluster without endpoints.
//! - a `ClusterLoadAssignment` is validated as the `load_assignment` of a `STATIC` cluster of
//!   the same name (so endpoints must be IP addresses with ports, as weir requires); error
//!   paths are mapped back onto the assignment.
//! - an HCM with `rds` must use ADS (`config_source` `ads: {}` or `self: {}`) and name a
//!   route configuration that exists (in the document or the [`Context`]); the listener is
//!   then validated with an empty inline route config in its place, and the route
//!   configuration on its own.
//! - a listener with an `api_listener` (gRPC's proxyless xDS client) is not a socket weir
//!   binds: only its HCM's routes are validated (inline, or the RDS name must exist).
//!
//! Cluster references from routes are checked as weir checks them (`validate_clusters`
//! defaults to true, unlike Envoy's RDS default): a route must name a cluster defined in the
//! document or listed in the [`Context`] (for a node-cluster document, the global
//! document's clusters). A route configuration with `validate_clusters: false` may name any.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use prost::Message as _;
use weir_proxy::config::{Errors, TranslateCtx, join};
use weir_xds_api::pb::envoy::config::cluster::v3::Cluster;
use weir_xds_api::pb::envoy::config::core::v3::{ConfigSource, config_source};
use weir_xds_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use weir_xds_api::pb::envoy::config::listener::v3::{FilterChain, Listener, filter};
use weir_xds_api::pb::envoy::config::route::v3::RouteConfiguration;
use weir_xds_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use weir_xds_api::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
use weir_xds_api::pb::envoy::service::discovery::v3::DiscoveryResponse;
use weir_xds_api::{Any, type_urls};

use crate::resource::Resource;

/// One problem in a document, at a field path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FieldError {
    /// Dotted field path from the document root (empty for the document as a whole).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Parse a document (YAML or JSON) into its packed resources.
pub fn parse_document(text: &str) -> Result<Vec<Any>, Vec<FieldError>> {
    weir_xds_api::from_yaml::<DiscoveryResponse>(text)
        .map(|d| d.resources)
        .map_err(|e| vec![parse_error(e)])
}

/// Parse a document given as a JSON value.
pub fn parse_document_json(value: serde_json::Value) -> Result<Vec<Any>, Vec<FieldError>> {
    weir_xds_api::from_json_value::<DiscoveryResponse>(value)
        .map(|d| d.resources)
        .map_err(|e| vec![parse_error(e)])
}

fn parse_error(e: weir_xds_api::ParseError) -> FieldError {
    match e {
        weir_xds_api::ParseError::Schema { path, message } => FieldError { path, message },
        other => FieldError {
            path: String::new(),
            message: other.to_string(),
        },
    }
}

/// Render packed resources as a document (proto3 JSON), the inverse of [`parse_document`].
pub fn render_document(version_info: &str, resources: &[Any]) -> serde_json::Value {
    serde_json::json!({
        "version_info": version_info,
        "resources": resources.iter().map(weir_xds_api::any_to_json).collect::<Vec<_>>(),
    })
}

/// What exists outside the document being validated.
#[derive(Debug, Default, Clone)]
pub struct Context {
    /// Cluster names routes may refer to besides the document's own.
    pub clusters: HashSet<String>,
    /// Route configuration names HCMs may refer to (RDS) besides the document's own.
    pub routes: HashSet<String>,
}

/// Validate packed resources; on success, the resources with names and versions.
pub fn validate(resources: &[Any], ctx: &Context) -> Result<Vec<Arc<Resource>>, Vec<FieldError>> {
    let mut errs = Errors::default();
    let mut decoded: Vec<(usize, Decoded)> = Vec::new();
    let mut seen: HashMap<(&str, String), usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, any) in resources.iter().enumerate() {
        let path = format!("resources[{i}]");
        let Some(d) = decode(any, &path, &mut errs) else {
            continue;
        };
        let name = d.name();
        if name.is_empty() {
            errs.add(join(&path, d.name_field()), "a resource name is required");
            continue;
        }
        if let Some(first) = seen.insert((d.type_url(), name.clone()), i) {
            errs.add(
                join(&path, d.name_field()),
                format!("duplicate {} {name:?} (also resources[{first}])", d.kind()),
            );
            continue;
        }
        out.push(Arc::new(Resource::new(name, any.clone())));
        decoded.push((i, d));
    }

    let mut clusters: HashSet<String> = ctx.clusters.clone();
    let mut routes: HashSet<String> = ctx.routes.clone();
    for (_, d) in &decoded {
        match d {
            Decoded::Cluster(c) => {
                clusters.insert(c.name.clone());
            }
            Decoded::Route(r) => {
                routes.insert(r.name.clone());
            }
            _ => {}
        }
    }
    let cluster_refs: HashSet<&str> = clusters.iter().map(String::as_str).collect();
    let stats = weir_proxy::stats::Store::new();
    let tctx = TranslateCtx {
        clusters: &cluster_refs,
        stats: &stats,
        rds: None,
        rds_table: false,
    };

    for (i, d) in &decoded {
        let path = format!("resources[{i}]");
        match d {
            Decoded::Cluster(c) => check_cluster(c, &path, &mut errs),
            Decoded::Route(rc) => {
                weir_proxy::route::RouteTable::translate(rc, &path, &tctx, &mut errs);
            }
            Decoded::Endpoints(cla) => check_endpoints(cla, &path, &mut errs),
            Decoded::Listener(l) => check_listener(l, &path, &tctx, &routes, &mut errs),
            Decoded::Secret(_) => {}
        }
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(errs
            .0
            .into_iter()
            .map(|e| FieldError {
                path: e.path,
                message: e.message,
            })
            .collect())
    }
}

enum Decoded {
    Listener(Box<Listener>),
    Route(Box<RouteConfiguration>),
    Cluster(Box<Cluster>),
    Endpoints(Box<ClusterLoadAssignment>),
    Secret(Box<Secret>),
}

impl Decoded {
    fn name(&self) -> String {
        match self {
            Decoded::Listener(m) => m.name.clone(),
            Decoded::Route(m) => m.name.clone(),
            Decoded::Cluster(m) => m.name.clone(),
            Decoded::Endpoints(m) => m.cluster_name.clone(),
            Decoded::Secret(m) => m.name.clone(),
        }
    }
    fn name_field(&self) -> &'static str {
        match self {
            Decoded::Endpoints(_) => "cluster_name",
            _ => "name",
        }
    }
    fn type_url(&self) -> &'static str {
        match self {
            Decoded::Listener(_) => type_urls::LISTENER,
            Decoded::Route(_) => type_urls::ROUTE_CONFIGURATION,
            Decoded::Cluster(_) => type_urls::CLUSTER,
            Decoded::Endpoints(_) => type_urls::CLUSTER_LOAD_ASSIGNMENT,
            Decoded::Secret(_) => type_urls::SECRET,
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            Decoded::Listener(_) => "listener",
            Decoded::Route(_) => "route configuration",
            Decoded::Cluster(_) => "cluster",
            Decoded::Endpoints(_) => "cluster load assignment",
            Decoded::Secret(_) => "secret",
        }
    }
}

fn decode(any: &Any, path: &str, errs: &mut Errors) -> Option<Decoded> {
    fn un<T: prost::Message + prost::Name + Default>(
        any: &Any,
        path: &str,
        errs: &mut Errors,
    ) -> Option<Box<T>> {
        match weir_xds_api::unpack::<T>(any) {
            Ok(m) => Some(Box::new(m)),
            Err(e) => {
                errs.add(path, e.to_string());
                None
            }
        }
    }
    Some(match any.type_url.as_str() {
        type_urls::LISTENER => Decoded::Listener(un(any, path, errs)?),
        type_urls::ROUTE_CONFIGURATION => Decoded::Route(un(any, path, errs)?),
        type_urls::CLUSTER => Decoded::Cluster(un(any, path, errs)?),
        type_urls::CLUSTER_LOAD_ASSIGNMENT => Decoded::Endpoints(un(any, path, errs)?),
        type_urls::SECRET => Decoded::Secret(un(any, path, errs)?),
        other => {
            errs.add(
                join(path, "@type"),
                format!(
                    "{other} is not a resource weir-cp serves (Listener, RouteConfiguration, \
                     Cluster, ClusterLoadAssignment, Secret)"
                ),
            );
            return None;
        }
    })
}

/// A config source weir-cp can satisfy: the ADS stream itself.
fn check_ads_source(src: Option<&ConfigSource>, path: &str, what: &str, errs: &mut Errors) {
    match src.and_then(|s| s.config_source_specifier.as_ref()) {
        Some(config_source::ConfigSourceSpecifier::Ads(_))
        | Some(config_source::ConfigSourceSpecifier::Self_(_)) => {}
        _ => errs.add(
            path,
            format!("{what} must come from weir-cp over ADS: set `ads: {{}}` (or `self: {{}}`)"),
        ),
    }
}

fn check_cluster(c: &Cluster, path: &str, errs: &mut Errors) {
    use weir_xds_api::pb::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType,
    };
    let is_eds = matches!(
        c.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(t)) if t == DiscoveryType::Eds as i32
    );
    if !is_eds {
        weir_proxy::upstream::translate_cluster(c, path, errs);
        return;
    }
    let eds_path = join(path, "eds_cluster_config");
    match &c.eds_cluster_config {
        Some(e) => check_ads_source(
            e.eds_config.as_ref(),
            &join(&eds_path, "eds_config"),
            "endpoints",
            errs,
        ),
        None => errs.add(
            eds_path,
            "an EDS cluster needs eds_cluster_config.eds_config (`ads: {}`)",
        ),
    }
    if c.load_assignment.is_some() {
        errs.add(
            join(path, "load_assignment"),
            "an EDS cluster takes its endpoints from a ClusterLoadAssignment resource, not \
             an inline load_assignment",
        );
    }
    let mut as_static = c.clone();
    as_static.cluster_discovery_type =
        Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32));
    as_static.eds_cluster_config = None;
    as_static.load_assignment = None;
    weir_proxy::upstream::translate_cluster(&as_static, path, errs);
}

fn check_endpoints(cla: &ClusterLoadAssignment, path: &str, errs: &mut Errors) {
    use weir_xds_api::pb::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType,
    };
    let synthetic = Cluster {
        name: cla.cluster_name.clone(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        load_assignment: Some(cla.clone()),
        ..Default::default()
    };
    let mut local = Errors::default();
    weir_proxy::upstream::translate_cluster(&synthetic, path, &mut local);
    let la = join(path, "load_assignment");
    for e in local.0 {
        let p = if let Some(rest) = e.path.strip_prefix(&la) {
            format!("{path}{rest}")
        } else if e.path == join(path, "name") {
            join(path, "cluster_name")
        } else {
            e.path
        };
        errs.add(p, e.message);
    }
}

fn check_listener(
    l: &Listener,
    path: &str,
    tctx: &TranslateCtx<'_>,
    routes: &HashSet<String>,
    errs: &mut Errors,
) {
    if let Some(api) = &l.api_listener {
        let apath = join(&join(path, "api_listener"), "api_listener");
        match api.api_listener.as_ref() {
            Some(any) if any.type_url == type_urls::HTTP_CONNECTION_MANAGER => {
                match weir_xds_api::unpack::<HttpConnectionManager>(any) {
                    Ok(h) => match &h.route_specifier {
                        Some(RouteSpecifier::RouteConfig(rc)) => {
                            weir_proxy::route::RouteTable::translate(
                                rc,
                                &join(&apath, "route_config"),
                                tctx,
                                errs,
                            );
                        }
                        Some(RouteSpecifier::Rds(rds)) => {
                            check_rds(rds, &join(&apath, "rds"), routes, errs);
                        }
                        _ => errs.add(
                            apath,
                            "the HTTP connection manager needs `rds` or `route_config`",
                        ),
                    },
                    Err(e) => errs.add(apath, e.to_string()),
                }
            }
            _ => errs.add(
                apath,
                "only an HttpConnectionManager api_listener is supported",
            ),
        }
        return;
    }
    let mut normalised = l.clone();
    for (i, fc) in normalised.filter_chains.iter_mut().enumerate() {
        replace_rds(fc, &format!("{path}.filter_chains[{i}]"), routes, errs);
    }
    if let Some(fc) = normalised.default_filter_chain.as_mut() {
        replace_rds(fc, &join(path, "default_filter_chain"), routes, errs);
    }
    weir_proxy::listener::translate_listener(&normalised, path, tctx, errs);
}

fn check_rds(
    rds: &weir_xds_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::Rds,
    path: &str,
    routes: &HashSet<String>,
    errs: &mut Errors,
) {
    check_ads_source(
        rds.config_source.as_ref(),
        &join(path, "config_source"),
        "routes",
        errs,
    );
    if rds.route_config_name.is_empty() {
        errs.add(
            join(path, "route_config_name"),
            "route_config_name is required",
        );
    } else if !routes.contains(&rds.route_config_name) {
        errs.add(
            join(path, "route_config_name"),
            format!(
                "route configuration {:?} is not defined (add a RouteConfiguration resource \
                 with that name)",
                rds.route_config_name
            ),
        );
    }
}

/// Check every HCM's `rds` in `fc` and replace it with an empty inline route config, so
/// that the listener translator judges the rest.
fn replace_rds(fc: &mut FilterChain, path: &str, routes: &HashSet<String>, errs: &mut Errors) {
    for (i, f) in fc.filters.iter_mut().enumerate() {
        let Some(filter::ConfigType::TypedConfig(any)) = &mut f.config_type else {
            continue;
        };
        if any.type_url != type_urls::HTTP_CONNECTION_MANAGER {
            continue;
        }
        // A bad HCM is reported by the listener translator; leave it alone here.
        let Ok(mut h) = weir_xds_api::unpack::<HttpConnectionManager>(any) else {
            continue;
        };
        let Some(RouteSpecifier::Rds(rds)) = &h.route_specifier else {
            continue;
        };
        let rpath = format!("{path}.filters[{i}].typed_config.rds");
        check_rds(rds, &rpath, routes, errs);
        let name = rds.route_config_name.clone();
        h.route_specifier = Some(RouteSpecifier::RouteConfig(RouteConfiguration {
            name,
            ..Default::default()
        }));
        any.value = h.encode_to_vec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(resources: &str) -> String {
        format!("version_info: '1'\nresources:\n{resources}")
    }

    const CLUSTER_STATIC: &str = r#"
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: web
  connect_timeout: 1s
  load_assignment:
    cluster_name: web
    endpoints:
    - lb_endpoints:
      - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8080}}}
"#;

    const CLUSTER_EDS: &str = r#"
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: api
  type: EDS
  eds_cluster_config: {eds_config: {ads: {}}}
"#;

    const CLA: &str = r#"
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: api
  endpoints:
  - lb_endpoints:
    - endpoint: {address: {socket_address: {address: 127.0.0.2, port_value: 9000}}}
"#;

    const ROUTES: &str = r#"
- "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
  name: main
  virtual_hosts:
  - name: all
    domains: ["*"]
    routes:
    - match: {prefix: /api}
      route: {cluster: api}
    - match: {prefix: /}
      route: {cluster: web}
"#;

    const LISTENER_RDS: &str = r#"
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: http
  address: {socket_address: {address: 127.0.0.1, port_value: 10000}}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: ingress
        rds: {route_config_name: main, config_source: {ads: {}}}
        http_filters:
        - name: envoy.filters.http.router
          typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
"#;

    fn run(text: &str, ctx: &Context) -> Result<Vec<Arc<Resource>>, Vec<FieldError>> {
        let res = parse_document(text)?;
        validate(&res, ctx)
    }

    fn err_paths(text: &str) -> Vec<String> {
        let mut p: Vec<String> = run(text, &Context::default())
            .expect_err("must fail")
            .into_iter()
            .map(|e| e.path)
            .collect();
        p.sort();
        p
    }

    #[test]
    fn full_document_is_accepted() {
        let text = doc(&format!(
            "{CLUSTER_STATIC}{CLUSTER_EDS}{CLA}{ROUTES}{LISTENER_RDS}"
        ));
        let res = run(&text, &Context::default()).expect("valid");
        let names: Vec<_> = res.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["web", "api", "api", "main", "http"]);
        // Round trip through render_document.
        let anys: Vec<Any> = res.iter().map(|r| r.any.clone()).collect();
        let again = parse_document_json(render_document("1", &anys)).expect("reparse");
        assert_eq!(again, anys);
    }

    #[test]
    fn schema_errors_have_paths() {
        let e = run(
            &doc("- \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: a\n  bogus: 1\n"),
            &Context::default(),
        )
        .expect_err("unknown field");
        assert_eq!(e.len(), 1);
        assert!(e[0].path.starts_with("resources[0]"), "{e:?}");
        assert!(e[0].message.contains("bogus"), "{e:?}");
    }

    #[test]
    fn route_to_unknown_cluster_is_refused_unless_known_from_context() {
        let text = doc(&format!("{CLUSTER_STATIC}{ROUTES}"));
        let e = run(&text, &Context::default()).expect_err("api unknown");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].path
                .starts_with("resources[1].virtual_hosts[0].routes[0]"),
            "{e:?}"
        );
        let ctx = Context {
            clusters: ["api".to_string()].into(),
            ..Default::default()
        };
        run(&text, &ctx).expect("api known from the context");
    }

    #[test]
    fn rds_must_exist_and_use_ads() {
        let p = err_paths(&doc(&format!("{CLUSTER_STATIC}{LISTENER_RDS}")));
        assert_eq!(
            p,
            vec!["resources[1].filter_chains[0].filters[0].typed_config.rds.route_config_name"]
        );
        let bad_source =
            LISTENER_RDS.replace("config_source: {ads: {}}", "config_source: {path: /x}");
        let p = err_paths(&doc(&format!(
            "{CLUSTER_STATIC}{CLUSTER_EDS}{ROUTES}{bad_source}"
        )));
        assert_eq!(
            p,
            vec!["resources[3].filter_chains[0].filters[0].typed_config.rds.config_source"]
        );
    }

    #[test]
    fn eds_cluster_rules() {
        let p = err_paths(&doc(
            "- \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: a\n  type: EDS\n",
        ));
        assert_eq!(p, vec!["resources[0].eds_cluster_config"]);
        let p = err_paths(&doc(&CLUSTER_EDS.replace("{ads: {}}", "{path: /tmp/x}")));
        assert_eq!(p, vec!["resources[0].eds_cluster_config.eds_config"]);
        // weir's own cluster checks still apply to EDS clusters.
        let p = err_paths(&doc(&format!(
            "{CLUSTER_EDS}  lb_policy: CLUSTER_PROVIDED\n"
        )));
        assert!(p.contains(&"resources[0].lb_policy".to_string()), "{p:?}");
    }

    #[test]
    fn endpoint_errors_map_onto_the_assignment() {
        let p = err_paths(&doc(&CLA.replace("127.0.0.2", "not-an-ip")));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("resources[0].endpoints[0].lb_endpoints[0].endpoint"),
            "{p:?}"
        );
        let p = err_paths(&doc(&format!(
            "{CLA}  policy: {{overprovisioning_factor: 140}}\n"
        )));
        assert_eq!(p, vec!["resources[0].policy"]);
    }

    #[test]
    fn names_duplicates_and_types() {
        let p = err_paths(&doc(&format!("{CLUSTER_STATIC}{CLUSTER_STATIC}")));
        assert_eq!(p, vec!["resources[1].name"]);
        let p = err_paths(&doc(
            "- \"@type\": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment\n  endpoints: []\n",
        ));
        assert_eq!(p, vec!["resources[0].cluster_name"]);
        let p = err_paths(&doc(
            "- \"@type\": type.googleapis.com/envoy.config.core.v3.Node\n  id: x\n",
        ));
        assert_eq!(p, vec!["resources[0].@type"]);
        // A listener translation error keeps weir's path.
        let p = err_paths(&doc(&format!(
            "{CLUSTER_STATIC}{CLUSTER_EDS}{ROUTES}{}",
            LISTENER_RDS.replace("stat_prefix: ingress", "stat_prefix: ''")
        )));
        assert_eq!(
            p,
            vec!["resources[3].filter_chains[0].filters[0].typed_config.stat_prefix"]
        );
    }

    #[test]
    fn api_listener_for_proxyless_grpc() {
        let api = r#"
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: greeter
  api_listener:
    api_listener:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      rds: {route_config_name: main, config_source: {ads: {}}}
      http_filters:
      - name: router
        typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
"#;
        run(
            &doc(&format!("{CLUSTER_STATIC}{CLUSTER_EDS}{ROUTES}{api}")),
            &Context::default(),
        )
        .expect("valid");
        let p = err_paths(&doc(&format!("{CLUSTER_STATIC}{api}")));
        assert_eq!(
            p,
            vec!["resources[1].api_listener.api_listener.rds.route_config_name"]
        );
    }

    #[test]
    fn syntax_error_is_reported() {
        let e = parse_document("resources: [").expect_err("syntax");
        assert_eq!(e.len(), 1);
        assert!(e[0].path.is_empty());
    }
}
