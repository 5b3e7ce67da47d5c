//! `/config_dump`: Envoy's `envoy.admin.v3.ConfigDump`, built from the real admin messages.
//!
//! `configs` holds, in Envoy's order, a `BootstrapConfigDump`, `ClustersConfigDump`,
//! `ListenersConfigDump`, `RoutesConfigDump` (the inline `route_config`s of the static
//! listeners' HTTP connection managers) and `SecretsConfigDump`, each tagged with `@type`.
//! `?resource=FIELD` returns the elements of that repeated field instead (e.g.
//! `static_clusters`, each as an `envoy.admin.v3.ClustersConfigDump.StaticCluster`), and
//! `?mask=a.b,c` keeps only those field paths of each returned config, as Envoy does.

use std::time::{SystemTime, UNIX_EPOCH};

use http::{Response, StatusCode};
use serde_json::{Map, Value};
use weir_xds_api::pb::envoy::admin::v3::{
    BootstrapConfigDump, ClustersConfigDump, EndpointsConfigDump, ListenersConfigDump,
    RoutesConfigDump, SecretsConfigDump, clusters_config_dump, endpoints_config_dump,
    listeners_config_dump, routes_config_dump,
};
use weir_xds_api::pb::envoy::config::listener::v3::{Listener, filter::ConfigType};
use weir_xds_api::pb::envoy::config::route::v3::RouteConfiguration;
use weir_xds_api::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use weir_xds_api::pb::google::protobuf::Timestamp;
use weir_xds_api::{Any, any_to_json, pack};

use super::{Body, Query, TEXT, json, text};
use crate::server::ServerState;

/// The five dumps, as typed messages.
struct Dumps {
    bootstrap: BootstrapConfigDump,
    clusters: ClustersConfigDump,
    /// EDS assignments (only with `?include_eds`).
    endpoints: Option<EndpointsConfigDump>,
    listeners: ListenersConfigDump,
    routes: RoutesConfigDump,
    secrets: SecretsConfigDump,
}

impl Dumps {
    fn build(state: &ServerState, include_eds: bool) -> Self {
        let snap = state.snapshot.load();
        // Static resources were loaded when the server started.
        let ts = timestamp(state.started);
        let last_updated = Some(ts);
        let sr = snap.bootstrap.static_resources.clone().unwrap_or_default();
        let static_route_configs = sr
            .listeners
            .iter()
            .flat_map(inline_route_configs)
            .map(|rc| routes_config_dump::StaticRouteConfig {
                route_config: Some(pack(&rc)),
                last_updated,
            })
            .collect();
        let mut d = Self {
            endpoints: None,
            bootstrap: BootstrapConfigDump {
                bootstrap: Some(snap.bootstrap.clone()),
                last_updated,
            },
            clusters: ClustersConfigDump {
                static_clusters: sr
                    .clusters
                    .iter()
                    .map(|c| clusters_config_dump::StaticCluster {
                        cluster: Some(pack(c)),
                        last_updated,
                    })
                    .collect(),
                ..Default::default()
            },
            listeners: ListenersConfigDump {
                static_listeners: sr
                    .listeners
                    .iter()
                    .map(|l| listeners_config_dump::StaticListener {
                        listener: Some(pack(l)),
                        last_updated,
                    })
                    .collect(),
                ..Default::default()
            },
            routes: RoutesConfigDump {
                static_route_configs,
                ..Default::default()
            },
            // Envoy never prints secret material; weir has no SDS secrets yet either.
            secrets: SecretsConfigDump::default(),
        };
        if let Some(x) = state.xds.get() {
            d.add_dynamic(x, include_eds);
        }
        d
    }

    /// Dynamic resources with their version and update time, as Envoy shows them.
    fn add_dynamic(&mut self, x: &crate::xds::Dynamic, include_eds: bool) {
        use crate::xds::{CLUSTER, LISTENER};
        let ts = |s: &crate::xds::Stored| Some(timestamp(s.last_updated));
        self.clusters.version_info = x.version(CLUSTER).unwrap_or_default();
        for (_, active, warming) in x.dump_clusters() {
            let dc = |s: &crate::xds::Stored| clusters_config_dump::DynamicCluster {
                version_info: s.version.clone(),
                cluster: Some(s.body.clone()),
                last_updated: ts(s),
                ..Default::default()
            };
            if let Some(a) = &active {
                self.clusters.dynamic_active_clusters.push(dc(a));
            }
            if let Some(w) = &warming {
                self.clusters.dynamic_warming_clusters.push(dc(w));
            }
        }
        self.listeners.version_info = x.version(LISTENER).unwrap_or_default();
        for (name, active, warming) in x.dump_listeners() {
            let st = |s: &crate::xds::Stored| listeners_config_dump::DynamicListenerState {
                version_info: s.version.clone(),
                listener: Some(s.body.clone()),
                last_updated: ts(s),
            };
            self.listeners
                .dynamic_listeners
                .push(listeners_config_dump::DynamicListener {
                    name,
                    active_state: active.as_ref().map(st),
                    warming_state: warming.as_ref().map(st),
                    ..Default::default()
                });
        }
        for s in x.dump_routes() {
            self.routes
                .dynamic_route_configs
                .push(routes_config_dump::DynamicRouteConfig {
                    version_info: s.version.clone(),
                    route_config: Some(s.body.clone()),
                    last_updated: ts(&s),
                    ..Default::default()
                });
        }
        if include_eds {
            self.endpoints = Some(EndpointsConfigDump {
                dynamic_endpoint_configs: x
                    .dump_endpoints()
                    .iter()
                    .map(|s| endpoints_config_dump::DynamicEndpointConfig {
                        version_info: s.version.clone(),
                        endpoint_config: Some(s.body.clone()),
                        last_updated: ts(s),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            });
        }
    }

    fn configs(&self) -> Vec<Any> {
        let mut v = vec![pack(&self.bootstrap), pack(&self.clusters)];
        if let Some(e) = &self.endpoints {
            v.push(pack(e));
        }
        v.extend([
            pack(&self.listeners),
            pack(&self.routes),
            pack(&self.secrets),
        ]);
        v
    }

    /// The elements of the repeated field `name` of any dump, or `None` if no dump has it.
    fn resource(&self, name: &str) -> Option<Vec<Any>> {
        fn all<T: prost::Message + prost::Name>(v: &[T]) -> Vec<Any> {
            v.iter().map(pack).collect()
        }
        let c = &self.clusters;
        let l = &self.listeners;
        let r = &self.routes;
        let s = &self.secrets;
        Some(match name {
            "static_clusters" => all(&c.static_clusters),
            "dynamic_active_clusters" => all(&c.dynamic_active_clusters),
            "dynamic_warming_clusters" => all(&c.dynamic_warming_clusters),
            "static_listeners" => all(&l.static_listeners),
            "dynamic_listeners" => all(&l.dynamic_listeners),
            "static_route_configs" => all(&r.static_route_configs),
            "dynamic_route_configs" => all(&r.dynamic_route_configs),
            "dynamic_endpoint_configs" => self
                .endpoints
                .as_ref()
                .map(|e| all(&e.dynamic_endpoint_configs))
                .unwrap_or_default(),
            "static_secrets" => all(&s.static_secrets),
            "dynamic_active_secrets" => all(&s.dynamic_active_secrets),
            "dynamic_warming_secrets" => all(&s.dynamic_warming_secrets),
            _ => return None,
        })
    }
}

/// `GET /config_dump` (`?include_eds` adds the EDS assignments).
pub(super) fn config_dump(state: &ServerState, q: &Query) -> Response<Body> {
    let dumps = Dumps::build(state, q.get("include_eds").is_some());
    let configs = match q.get("resource").filter(|r| !r.is_empty()) {
        Some(r) => match dumps.resource(r) {
            Some(c) => c,
            None => {
                return text(
                    StatusCode::NOT_FOUND,
                    TEXT,
                    format!("{r} not found in config dump\n"),
                );
            }
        },
        None => dumps.configs(),
    };
    let mask: Vec<Vec<&str>> = q
        .get("mask")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.split('.').collect())
        .collect();
    let mut configs: Vec<Value> = configs
        .iter()
        .map(|a| {
            let v = any_to_json(a);
            if mask.is_empty() {
                v
            } else {
                apply_mask(&v, &mask)
            }
        })
        .collect();
    // SDS secrets (names and kinds only; TLS helper's block).
    if q.get("resource").is_none() && mask.is_empty() {
        let secrets = crate::tls::admin::secrets_dump(&state.stats);
        if secrets["dynamic_active_secrets"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            configs.push(secrets);
        }
    }
    json(StatusCode::OK, &serde_json::json!({ "configs": configs }))
}

/// The inline `route_config`s of every HTTP connection manager in `l`'s filter chains.
fn inline_route_configs(l: &Listener) -> Vec<RouteConfiguration> {
    l.filter_chains
        .iter()
        .chain(l.default_filter_chain.as_ref())
        .flat_map(|fc| fc.filters.iter())
        .filter_map(|f| match &f.config_type {
            Some(ConfigType::TypedConfig(any)) => {
                weir_xds_api::unpack::<HttpConnectionManager>(any).ok()
            }
            _ => None,
        })
        .filter_map(|hcm| match hcm.route_specifier {
            Some(RouteSpecifier::RouteConfig(rc)) => Some(rc),
            _ => None,
        })
        .collect()
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Keep only the field paths in `mask` (each a list of field names) of `v`, plus `@type`.
/// A path through a repeated field applies to each element.
fn apply_mask(v: &Value, mask: &[Vec<&str>]) -> Value {
    match v {
        Value::Array(items) => Value::Array(items.iter().map(|i| apply_mask(i, mask)).collect()),
        Value::Object(m) => {
            let mut out = Map::new();
            if let Some(t) = m.get("@type") {
                out.insert("@type".into(), t.clone());
            }
            for path in mask {
                let Some((first, rest)) = path.split_first() else {
                    continue;
                };
                let Some(child) = m.get(*first) else {
                    continue;
                };
                if rest.is_empty() || mask.iter().any(|p| p.as_slice() == [*first]) {
                    out.insert((*first).to_string(), child.clone());
                    continue;
                }
                let sub: Vec<Vec<&str>> = mask
                    .iter()
                    .filter(|p| p.first() == Some(first) && p.len() > 1)
                    .map(|p| p[1..].to_vec())
                    .collect();
                let masked = apply_mask(child, &sub);
                let empty = match &masked {
                    Value::Object(o) => o.is_empty(),
                    _ => false,
                };
                if !empty {
                    out.insert((*first).to_string(), masked);
                }
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mask_keeps_paths_and_type() {
        let v = json!({
            "@type": "t",
            "bootstrap": {"node": {"id": "a", "cluster": "b"}, "admin": {"x": 1}},
            "last_updated": "now",
            "list": [{"a": 1, "b": 2}, {"a": 3}],
        });
        let m = apply_mask(
            &v,
            &[
                vec!["bootstrap", "node", "id"],
                vec!["list", "a"],
                vec!["nope"],
            ],
        );
        assert_eq!(
            m,
            json!({"@type": "t", "bootstrap": {"node": {"id": "a"}}, "list": [{"a": 1}, {"a": 3}]})
        );
        let m = apply_mask(&v, &[vec!["bootstrap"], vec!["bootstrap", "admin"]]);
        assert_eq!(m["bootstrap"], v["bootstrap"]);
    }
}
