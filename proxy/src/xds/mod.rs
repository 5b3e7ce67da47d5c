//! weir as an xDS v3 client: dynamic listeners, routes, clusters and endpoints.
//!
//! ```text
//!  ads::run (gRPC ADS, SotW or delta) ─┐
//!  fs::run  (path_config_source files) ─┼─> Dynamic::apply(type, resources, removed)
//!                                       │     translate each resource (same translators as
//!                                       │     the bootstrap), NACK detail for the bad ones,
//!                                       │     apply the good ones:
//!                                       │       CDS -> Cluster (warming until EDS/DNS/HC)
//!                                       │              -> ClusterManager::insert/remove
//!                                       │       EDS -> Cluster::set_endpoints (in place)
//!                                       │       LDS -> ListenerConfig (warming until RDS)
//!                                       │              -> ListenerManager::add_or_update/remove
//!                                       │       RDS -> RouteSlot::store (in place)
//!                                       └─< Dynamic::subscriptions() (EDS/RDS names)
//! ```
//!
//! [`Dynamic`] is the single owner of dynamic state; its methods run on the main runtime and
//! serialize on one mutex (control-plane updates only, never a request). Requests see
//! updates through the same lock-free handles static config uses (`ArcSwap` loads).

pub mod ads;
mod dynamic;
pub mod fs;
pub mod tls;

use std::sync::Arc;

use metrics::{Counter, Gauge};
use weir_xds_api::pb::envoy::config::bootstrap::v3::bootstrap::DynamicResources;
use weir_xds_api::pb::envoy::config::core::v3 as core;

pub use dynamic::{Dynamic, Resource, Stored, Subscription, UpdateError};

use crate::config::source::{self, ConfigSource, SourceKind};
use crate::config::{Errors, join};
use crate::stats::Store;

/// `type.googleapis.com/envoy.config.listener.v3.Listener`.
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// `type.googleapis.com/envoy.config.cluster.v3.Cluster`.
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// `type.googleapis.com/envoy.config.route.v3.RouteConfiguration`.
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// `type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment`.
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// The wrapper some servers put around each SotW resource.
pub const RESOURCE_WRAPPER: &str = "type.googleapis.com/envoy.service.discovery.v3.Resource";

/// Request order on a new stream: make before break (clusters and their endpoints before the
/// listeners and routes that use them).
pub const REQUEST_ORDER: [&str; 4] = [CLUSTER, ENDPOINT, LISTENER, ROUTE];

/// `dynamic_resources.ads_config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdsConfig {
    /// `grpc_services[0].envoy_grpc.cluster_name`: a static cluster speaking HTTP/2.
    pub cluster: String,
    /// `api_type: DELTA_GRPC` (else GRPC, state of the world).
    pub delta: bool,
    /// `set_node_on_first_message_only`.
    pub set_node_on_first_message_only: bool,
    /// `grpc_services[0].initial_metadata`: sent with the stream (e.g. `authorization:
    /// Bearer ...` for a control plane that requires a token).
    pub initial_metadata: Vec<(String, String)>,
    /// TLS from the ADS cluster's `transport_socket` (see [`tls`]).
    pub tls: Option<tls::AdsTls>,
}

/// The bootstrap's `dynamic_resources`, translated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XdsConfig {
    /// The ADS stream, if configured.
    pub ads: Option<AdsConfig>,
    /// `lds_config`.
    pub lds: Option<ConfigSource>,
    /// `cds_config`.
    pub cds: Option<ConfigSource>,
}

impl XdsConfig {
    /// Whether anything is dynamic.
    pub fn is_empty(&self) -> bool {
        self.ads.is_none() && self.lds.is_none() && self.cds.is_none()
    }
}

/// Translate `dynamic_resources`. `static_clusters` are the names of the bootstrap's static
/// clusters (the ADS cluster must be one of them).
pub fn translate_dynamic(
    d: &DynamicResources,
    static_clusters: &std::collections::HashSet<&str>,
    errs: &mut Errors,
) -> XdsConfig {
    let path = "dynamic_resources";
    errs.reject_unsupported(d, &["lds_config", "cds_config", "ads_config"], path);
    let ads = d.ads_config.as_ref().and_then(|a| {
        let apath = join(path, "ads_config");
        errs.reject_unsupported(
            a,
            &[
                "api_type",
                "transport_api_version",
                "grpc_services",
                "set_node_on_first_message_only",
            ],
            &apath,
        );
        use core::api_config_source::ApiType;
        let delta = match ApiType::try_from(a.api_type) {
            Ok(ApiType::Grpc) => false,
            Ok(ApiType::DeltaGrpc) => true,
            _ => {
                errs.add(
                    join(&apath, "api_type"),
                    "ads_config.api_type must be GRPC or DELTA_GRPC",
                );
                false
            }
        };
        #[allow(deprecated)]
        let v2 = core::ApiVersion::V2 as i32;
        if a.transport_api_version == v2 {
            errs.add(
                join(&apath, "transport_api_version"),
                "only the v3 transport is supported (transport_api_version: V3)",
            );
        }
        let mut metadata = Vec::new();
        let cluster = match a.grpc_services.as_slice() {
            [g] => {
                let gpath = format!("{apath}.grpc_services[0]");
                errs.reject_unsupported(g, &["envoy_grpc", "initial_metadata"], &gpath);
                for (i, h) in g.initial_metadata.iter().enumerate() {
                    let hpath = format!("{gpath}.initial_metadata[{i}]");
                    errs.reject_unsupported(h, &["key", "value"], &hpath);
                    let key_ok = !h.key.is_empty()
                        && !h.key.starts_with(':')
                        && !h.key.ends_with("-bin")
                        && h.key.bytes().all(|b| {
                            b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)
                        });
                    if !key_ok {
                        errs.add(
                            join(&hpath, "key"),
                            "a gRPC metadata key: lowercase ASCII letters, digits, '-', '_', '.' (binary keys are not supported)",
                        );
                    }
                    if !h.value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                        errs.add(join(&hpath, "value"), "a gRPC metadata value must be printable ASCII");
                    }
                    metadata.push((h.key.clone(), h.value.clone()));
                }
                match &g.target_specifier {
                    Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(e)) => {
                        errs.reject_unsupported(e, &["cluster_name"], &join(&gpath, "envoy_grpc"));
                        if !static_clusters.contains(e.cluster_name.as_str()) {
                            errs.add(
                                join(&gpath, "envoy_grpc.cluster_name"),
                                format!(
                                    "the ADS cluster {:?} must be a static cluster",
                                    e.cluster_name
                                ),
                            );
                        }
                        e.cluster_name.clone()
                    }
                    _ => {
                        errs.add(
                            join(&gpath, "envoy_grpc"),
                            "envoy_grpc.cluster_name is required (google_grpc is not supported)",
                        );
                        return None;
                    }
                }
            }
            _ => {
                errs.add(
                    join(&apath, "grpc_services"),
                    "exactly one grpc_services entry is required",
                );
                return None;
            }
        };
        Some(AdsConfig {
            cluster,
            delta,
            set_node_on_first_message_only: a.set_node_on_first_message_only,
            initial_metadata: metadata,
            tls: None,
        })
    });
    let mut source_of = |cs: &Option<core::ConfigSource>, field: &str| {
        let cs = cs.as_ref()?;
        let p = join(path, field);
        let s = source::translate(cs, &p, errs)?;
        if s.kind == SourceKind::Ads && d.ads_config.is_none() {
            errs.add(
                p,
                "`ads: {}` needs dynamic_resources.ads_config to name the ADS server",
            );
        }
        Some(s)
    };
    let lds = source_of(&d.lds_config, "lds_config");
    let cds = source_of(&d.cds_config, "cds_config");
    XdsConfig { ads, lds, cds }
}

/// Per-API update stats (`cluster_manager.cds.*`, `listener_manager.lds.*`).
#[derive(Debug, Clone)]
pub struct ApiStats {
    /// `update_attempt`: responses received.
    pub update_attempt: Counter,
    /// `update_success`: responses applied.
    pub update_success: Counter,
    /// `update_rejected`: responses NACKed (some resource was invalid).
    pub update_rejected: Counter,
    /// `update_failure`: stream failures (connection lost, file unreadable).
    pub update_failure: Counter,
    /// `init_fetch_timeout`: the first response did not come within `initial_fetch_timeout`.
    pub init_fetch_timeout: Counter,
    /// `update_time`: when the last update was applied (ms since the Unix epoch).
    pub update_time: Gauge,
    /// `version`: a hash of the last accepted version_info.
    pub version: Gauge,
}

impl ApiStats {
    fn new(store: &Arc<Store>, prefix: &str) -> Self {
        let s = store.plain(prefix);
        Self {
            update_attempt: s.counter("update_attempt"),
            update_success: s.counter("update_success"),
            update_rejected: s.counter("update_rejected"),
            update_failure: s.counter("update_failure"),
            init_fetch_timeout: s.counter("init_fetch_timeout"),
            update_time: s.gauge("update_time"),
            version: s.gauge("version"),
        }
    }
}

/// The xDS client's stats.
#[derive(Debug, Clone)]
pub struct XdsStats {
    /// `control_plane.connected_state`: 1 while the ADS stream is up.
    pub connected_state: Gauge,
    /// `cluster_manager.cds.*`.
    pub cds: ApiStats,
    /// `listener_manager.lds.*`.
    pub lds: ApiStats,
    /// `cluster_manager.cluster_added`.
    pub cluster_added: Counter,
    /// `cluster_manager.cluster_modified`.
    pub cluster_modified: Counter,
    /// `cluster_manager.cluster_removed`.
    pub cluster_removed: Counter,
    /// `cluster_manager.cluster_updated`: EDS updates applied in place.
    pub cluster_updated: Counter,
    /// `cluster_manager.active_clusters`.
    pub active_clusters: Gauge,
    /// `cluster_manager.warming_clusters`.
    pub warming_clusters: Gauge,
}

impl XdsStats {
    /// Register the stats.
    pub fn new(store: &Arc<Store>) -> Self {
        let cm = store.plain("cluster_manager");
        Self {
            connected_state: store.plain("control_plane").gauge("connected_state"),
            cds: ApiStats::new(store, "cluster_manager.cds"),
            lds: ApiStats::new(store, "listener_manager.lds"),
            cluster_added: cm.counter("cluster_added"),
            cluster_modified: cm.counter("cluster_modified"),
            cluster_removed: cm.counter("cluster_removed"),
            cluster_updated: cm.counter("cluster_updated"),
            active_clusters: cm.gauge("active_clusters"),
            warming_clusters: cm.gauge("warming_clusters"),
        }
    }
}

/// Start the xDS client of a server whose snapshot has `dynamic_resources`: the ADS stream
/// and the file poller on the current (main) runtime, until `state.hard_stop`. The caller
/// awaits [`Dynamic::initialized`] before accepting and calls [`Dynamic::enable_listeners`]
/// once the workers run. `None` without dynamic resources.
pub fn start(state: &Arc<crate::server::ServerState>) -> Option<Arc<Dynamic>> {
    let snap = state.snapshot.load();
    let any_eds = snap.clusters.iter().any(|c| c.eds.is_some());
    if snap.xds.is_empty() && !any_eds && snap.rds.live().is_empty() {
        return None;
    }
    let dynamic = Dynamic::new(state, snap.xds.clone(), snap.rds.clone());
    let _ = state.xds.set(dynamic.clone());
    dynamic.start();
    let stop = state.hard_stop.clone();
    if let Some(ads) = &snap.xds.ads {
        let mut node = snap.bootstrap.node.clone().unwrap_or_default();
        node.user_agent_name = "weir".into();
        node.user_agent_version_type = Some(
            weir_xds_api::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").into(),
            ),
        );
        tokio::spawn(ads::run(
            dynamic.clone(),
            ads.clone(),
            state.clusters.clone(),
            node,
            stop.clone(),
        ));
    }
    // Files can be named by any source (LDS/CDS here, RDS/EDS in resources), so the poller
    // always runs; it is idle when no source names a file.
    tokio::spawn(fs::run(dynamic.clone(), stop));
    Some(dynamic)
}

/// A version_info as Envoy's `version` gauges show it: a hash, kept within f64's exact range.
pub fn version_hash(v: &str) -> f64 {
    let h = crate::upstream::lb::xxhash::xxhash64(v.as_bytes());
    (h & ((1u64 << 52) - 1)) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(y: &str, statics: &[&str]) -> (XdsConfig, Vec<String>) {
        let d: DynamicResources = weir_xds_api::from_yaml(y).expect("yaml");
        let mut errs = Errors::default();
        let set = statics.iter().copied().collect();
        let c = translate_dynamic(&d, &set, &mut errs);
        (c, errs.0.into_iter().map(|e| e.path).collect())
    }

    #[test]
    fn ads_bootstrap() {
        let (c, e) = dynamic(
            "ads_config: {api_type: DELTA_GRPC, transport_api_version: V3, set_node_on_first_message_only: true, grpc_services: [{envoy_grpc: {cluster_name: xds}}]}\nlds_config: {ads: {}, resource_api_version: V3}\ncds_config: {ads: {}, resource_api_version: V3, initial_fetch_timeout: 3s}\n",
            &["xds"],
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            c.ads,
            Some(AdsConfig {
                cluster: "xds".into(),
                delta: true,
                set_node_on_first_message_only: true,
                initial_metadata: Vec::new(),
                tls: None,
            })
        );
        assert_eq!(c.lds, Some(ConfigSource::ads()));
        assert_eq!(
            c.cds.expect("cds").initial_fetch_timeout,
            Some(std::time::Duration::from_secs(3))
        );
    }

    #[test]
    fn errors_name_fields() {
        let (_, e) = dynamic(
            "ads_config: {api_type: REST, grpc_services: [{envoy_grpc: {cluster_name: nope}}]}\n",
            &["xds"],
        );
        assert_eq!(
            e,
            [
                "dynamic_resources.ads_config.api_type",
                "dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name"
            ]
        );
        let (_, e) = dynamic("lds_config: {ads: {}}\n", &[]);
        assert_eq!(e, ["dynamic_resources.lds_config"]);
        let (_, e) = dynamic(
            "ads_config: {api_type: GRPC, grpc_services: [{google_grpc: {target_uri: x, stat_prefix: y}}]}\n",
            &[],
        );
        assert_eq!(
            e,
            [
                "dynamic_resources.ads_config.grpc_services[0].google_grpc",
                "dynamic_resources.ads_config.grpc_services[0].envoy_grpc"
            ]
        );
        let (c, e) = dynamic(
            "lds_config: {path_config_source: {path: /tmp/l.yaml}}\n",
            &[],
        );
        assert!(e.is_empty(), "{e:?}");
        assert!(c.ads.is_none());
    }
}
