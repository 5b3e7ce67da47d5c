//! Config translation: Envoy v3 bootstrap protos -> weir's compiled [`Snapshot`].
//!
//! Every translator takes the proto, the field path it sits at, and an error sink, so that
//! `weir --mode validate` can print every problem at once with its path
//! (`static_resources.listeners[0].filter_chains[1].filters[0]...`).

pub mod hcm;
pub mod source;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use weir_xds_api::pb::envoy::config::bootstrap::v3::Bootstrap;
use weir_xds_api::pb::envoy::config::core::v3 as core;
use weir_xds_api::pb::google::protobuf::Duration as PbDuration;

use crate::listener::ListenerConfig;
use crate::stats::Store;
use crate::upstream::ClusterConfig;

/// One problem in a config, at a field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// Dotted path of the offending field.
    pub path: String,
    /// What is wrong, and what to do about it where that is not obvious.
    pub message: String,
}

/// All problems found in a config (never empty).
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects errors during translation.
#[derive(Debug, Default)]
pub struct Errors(pub Vec<ConfigError>);

/// Shared matchers (`weir_filters::matcher`) report into the proxy's error list.
impl weir_filters::matcher::ErrorSink for Errors {
    fn error(&mut self, path: String, message: String) {
        self.add(path, message);
    }
}

impl Errors {
    /// Record an error at `path`.
    pub fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Record an error for every field of `msg` that is set but not in `supported`.
    /// Use for messages where an ignored field would change what traffic does.
    pub fn reject_unsupported<T: prost::Message + prost::Name>(
        &mut self,
        msg: &T,
        supported: &[&str],
        path: &str,
    ) {
        weir_filters::matcher::ErrorSink::unsupported(self, msg, supported, path);
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Turn into a result.
    pub fn into_result<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.0))
        }
    }
}

/// `join("a.b", "c")` = `a.b.c`; `join("", "c")` = `c`.
pub use weir_filters::config::join;

/// Proto duration -> std duration; negative or out-of-range durations are errors.
pub fn duration(d: &PbDuration, path: &str, errs: &mut Errors) -> Duration {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        errs.add(path, "duration must be non-negative");
        return Duration::ZERO;
    }
    Duration::new(d.seconds as u64, d.nanos as u32)
}

/// Optional proto duration -> std duration with a default.
pub fn duration_or(
    d: Option<&PbDuration>,
    default: Duration,
    path: &str,
    errs: &mut Errors,
) -> Duration {
    d.map(|d| duration(d, path, errs)).unwrap_or(default)
}

/// The host string and port of an Envoy `SocketAddress` (TCP; named ports unsupported), with
/// the path of the `socket_address` field for further errors. `min_port` is 0 where binding
/// to any port is allowed (listeners) and 1 for upstream endpoints.
pub fn socket_address_parts<'a>(
    addr: Option<&'a core::Address>,
    path: &str,
    min_port: u32,
    errs: &mut Errors,
) -> Option<(&'a str, u16, String)> {
    let Some(addr) = addr else {
        errs.add(path, "address is required");
        return None;
    };
    let Some(core::address::Address::SocketAddress(sa)) = &addr.address else {
        errs.add(path, "only socket_address is supported");
        return None;
    };
    let p = join(path, "socket_address");
    errs.reject_unsupported(
        sa,
        &["address", "port_value", "protocol", "ipv4_compat"],
        &p,
    );
    if sa.protocol != core::socket_address::Protocol::Tcp as i32 {
        errs.add(join(&p, "protocol"), "only TCP is supported");
    }
    match sa.port_specifier {
        Some(core::socket_address::PortSpecifier::PortValue(v))
            if (min_port..=65535).contains(&v) =>
        {
            Some((sa.address.as_str(), v as u16, p))
        }
        Some(core::socket_address::PortSpecifier::PortValue(_)) => {
            errs.add(
                join(&p, "port_value"),
                format!("port must be in {min_port}..=65535"),
            );
            None
        }
        _ => {
            errs.add(
                join(&p, "port_value"),
                "port_value is required (named ports are not supported)",
            );
            None
        }
    }
}

/// An Envoy `Address` that must be an IP socket address (IPv4/IPv6 + port).
pub fn socket_address(
    addr: Option<&core::Address>,
    path: &str,
    errs: &mut Errors,
) -> Option<SocketAddr> {
    let (host, port, p) = socket_address_parts(addr, path, 0, errs)?;
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Some(SocketAddr::new(ip, port)),
        Err(_) => {
            errs.add(
                join(&p, "address"),
                format!("{host:?} is not an IP address"),
            );
            None
        }
    }
}

/// Node identity from the bootstrap (overridable by `--service-node` / `--service-cluster`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NodeInfo {
    /// `node.id`.
    pub id: String,
    /// `node.cluster`.
    pub cluster: String,
}

/// The compiled, immutable config a running proxy serves.
#[derive(Debug)]
pub struct Snapshot {
    /// Node identity.
    pub node: NodeInfo,
    /// Admin listener address, if configured.
    pub admin_address: Option<SocketAddr>,
    /// Listeners, in config order.
    pub listeners: Vec<Arc<ListenerConfig>>,
    /// Clusters, in config order.
    pub clusters: Vec<Arc<ClusterConfig>>,
    /// The bootstrap as loaded, for `/config_dump`.
    pub bootstrap: Bootstrap,
    /// The stats store every handle in this snapshot was registered in.
    pub stats: Arc<Store>,
    /// `dynamic_resources`, translated (empty without).
    pub xds: crate::xds::XdsConfig,
    /// Route slots of connection managers using RDS (shared with the xDS client).
    pub rds: Arc<crate::route::RdsRegistry>,
    /// `overload_manager` and the runtime connection limits ([`crate::overload`]); boxed so
    /// the snapshot (moved into the server's start future) stays small.
    pub limits: Arc<crate::overload::LimitsConfig>,
}

/// Bootstrap fields weir understands; anything else set is rejected.
const BOOTSTRAP_FIELDS: &[&str] = &[
    "node",
    "static_resources",
    "dynamic_resources",
    "admin",
    // Edge limits (crate::overload).
    "overload_manager",
    "layered_runtime",
];

/// Parse YAML or JSON text into a bootstrap proto.
pub fn parse_bootstrap(text: &str) -> Result<Bootstrap, ConfigErrors> {
    weir_xds_api::from_yaml::<Bootstrap>(text).map_err(|e| {
        let (path, message) = match e {
            weir_xds_api::ParseError::Schema { path, message } => (path, message),
            other => (String::new(), other.to_string()),
        };
        ConfigErrors(vec![ConfigError { path, message }])
    })
}

/// Translate and validate a bootstrap into a snapshot, reporting every error.
pub fn translate(bootstrap: Bootstrap, stats: &Arc<Store>) -> Result<Snapshot, ConfigErrors> {
    let mut errs = Errors::default();
    errs.reject_unsupported(&bootstrap, BOOTSTRAP_FIELDS, "");
    let node = bootstrap
        .node
        .as_ref()
        .map(|n| NodeInfo {
            id: n.id.clone(),
            cluster: n.cluster.clone(),
        })
        .unwrap_or_default();
    let admin_address = bootstrap.admin.as_ref().and_then(|a| {
        errs.reject_unsupported(a, &["address", "access_log", "access_log_path"], "admin");
        a.address
            .as_ref()
            .and_then(|_| socket_address(a.address.as_ref(), "admin.address", &mut errs))
    });
    let limits = crate::overload::translate::limits(
        bootstrap.overload_manager.as_ref(),
        bootstrap.layered_runtime.as_ref(),
        &mut errs,
    );
    let mut listeners = Vec::new();
    let mut clusters = Vec::new();
    let rds = Arc::new(crate::route::RdsRegistry::default());
    let mut xds = crate::xds::XdsConfig::default();
    if let Some(sr) = &bootstrap.static_resources {
        errs.reject_unsupported(sr, &["listeners", "clusters"], "static_resources");
        for (i, c) in sr.clusters.iter().enumerate() {
            let path = format!("static_resources.clusters[{i}]");
            if let Some(c) = crate::upstream::translate_cluster(c, &path, &mut errs) {
                clusters.push(Arc::new(c));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, c) in clusters.iter().enumerate() {
            if !seen.insert(c.name.clone()) {
                errs.add(
                    format!("static_resources.clusters[{i}].name"),
                    format!("duplicate cluster name {:?}", c.name),
                );
            }
        }
        let cluster_names: std::collections::HashSet<&str> =
            clusters.iter().map(|c| c.name.as_str()).collect();
        if let Some(d) = &bootstrap.dynamic_resources {
            xds = crate::xds::translate_dynamic(d, &cluster_names, &mut errs);
            // The ADS stream uses its cluster's TLS (see xds::tls).
            if let Some(a) = &mut xds.ads
                && let Some((i, c)) = clusters
                    .iter()
                    .enumerate()
                    .find(|(_, c)| c.name == a.cluster)
                && let Some(t) = &c.tls
            {
                a.tls = crate::xds::tls::from_cluster(
                    t,
                    &format!("static_resources.clusters[{i}].transport_socket"),
                    &mut errs,
                );
            }
        }
        let ctx = TranslateCtx {
            clusters: &cluster_names,
            stats,
            rds: Some(&rds),
            rds_table: false,
        };
        for (i, l) in sr.listeners.iter().enumerate() {
            if let Some(l) = crate::listener::translate_listener(
                l,
                &format!("static_resources.listeners[{i}]"),
                &ctx,
                &mut errs,
            ) {
                listeners.push(Arc::new(l));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, l) in listeners.iter().enumerate() {
            if !seen.insert(l.name.clone()) {
                errs.add(
                    format!("static_resources.listeners[{i}].name"),
                    format!("duplicate listener name {:?}", l.name),
                );
            }
        }
    }
    if let (None, Some(d)) = (&bootstrap.static_resources, &bootstrap.dynamic_resources) {
        xds = crate::xds::translate_dynamic(d, &Default::default(), &mut errs);
    }
    // `ads: {}` sources need the bootstrap's ADS stream.
    if xds.ads.is_none() {
        let ads = |s: &source::ConfigSource| s.kind == source::SourceKind::Ads;
        for (i, c) in clusters.iter().enumerate() {
            if c.eds.as_ref().is_some_and(|e| ads(&e.source)) {
                errs.add(
                    format!("static_resources.clusters[{i}].eds_cluster_config.eds_config"),
                    "`ads: {}` needs dynamic_resources.ads_config to name the ADS server",
                );
            }
        }
        for slot in rds.live() {
            if slot.source.as_ref().is_some_and(ads) {
                errs.add(
                    "static_resources.listeners",
                    format!(
                        "rds route_config_name {:?} uses `ads: {{}}`, which needs \
                         dynamic_resources.ads_config to name the ADS server",
                        slot.name
                    ),
                );
            }
        }
    }
    errs.into_result(Snapshot {
        node,
        admin_address,
        listeners,
        clusters,
        bootstrap,
        stats: stats.clone(),
        xds,
        rds,
        limits: Arc::new(limits),
    })
}

/// What translators of listeners and routes may look up.
#[derive(Debug)]
pub struct TranslateCtx<'a> {
    /// Names of the statically known clusters; a route naming another one is an error
    /// (Envoy's `validate_clusters` default for static route configs).
    pub clusters: &'a std::collections::HashSet<&'a str>,
    /// Where stats handles (`http.<prefix>.*`, `listener.<addr>.*`, `tcp.<prefix>.*`) are
    /// registered; translation resolves them once so the hot path only touches atomics.
    pub stats: &'a Arc<Store>,
    /// Where connection managers with `rds` get their route slots; `None` gives each its own
    /// unshared slot (validation only).
    pub rds: Option<&'a crate::route::RdsRegistry>,
    /// Translating a `RouteConfiguration` delivered by RDS: `validate_clusters` defaults to
    /// false (Envoy's default for RDS), so a route may name a cluster CDS has not sent yet.
    pub rds_table: bool,
}

/// Load the bootstrap named by the CLI (`-c` and/or `--config-yaml`), apply node overrides,
/// translate. Errors are returned all at once, each with its field path.
pub fn load(opts: &crate::cli::Options) -> Result<Snapshot, ConfigErrors> {
    let mut value = serde_json::Value::Object(Default::default());
    let fail = |m: String| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            message: m,
        }])
    };
    if let Some(p) = &opts.config_path {
        let text = std::fs::read_to_string(p)
            .map_err(|e| fail(format!("reading {}: {e}", p.display())))?;
        value = serde_yaml::from_str(&text).map_err(|e| fail(format!("{}: {e}", p.display())))?;
    }
    if let Some(y) = &opts.config_yaml {
        let overlay: serde_json::Value =
            serde_yaml::from_str(y).map_err(|e| fail(format!("--config-yaml: {e}")))?;
        merge_json(&mut value, overlay);
    }
    if opts.config_path.is_none() && opts.config_yaml.is_none() {
        return Err(fail("no config: pass -c FILE or --config-yaml".into()));
    }
    let mut bootstrap: Bootstrap = weir_xds_api::from_json_value(value).map_err(|e| match e {
        weir_xds_api::ParseError::Schema { path, message } => {
            ConfigErrors(vec![ConfigError { path, message }])
        }
        other => fail(other.to_string()),
    })?;
    let node = bootstrap.node.get_or_insert_with(Default::default);
    if let Some(id) = &opts.service_node {
        node.id = id.clone();
    }
    if let Some(c) = &opts.service_cluster {
        node.cluster = c.clone();
    }
    translate(bootstrap, &Store::new())
}

/// Envoy's `--config-yaml` merge: objects merge recursively, lists append, scalars replace.
fn merge_json(base: &mut serde_json::Value, overlay: serde_json::Value) {
    use serde_json::Value;
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge_json(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(o)) => b.extend(o),
        (slot, v) => *slot = v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_paths() {
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("a[0]", "b"), "a[0].b");
    }

    #[test]
    fn unsupported_bootstrap_field_is_named() {
        let b = parse_bootstrap("stats_flush_interval: 5s\n").expect("parses");
        let e = translate(b, &Store::new()).expect_err("rejected");
        assert_eq!(e.0[0].path, "stats_flush_interval");
    }

    #[test]
    fn parse_error_has_path() {
        let e = parse_bootstrap("admin:\n  address:\n    socket_address: {port_value: nope}\n")
            .expect_err("bad");
        assert_eq!(e.0[0].path, "admin.address.socket_address.port_value");
    }

    #[test]
    fn ads_sources_need_ads_config() {
        let b = parse_bootstrap(
            "static_resources:\n  clusters:\n  - name: e\n    type: EDS\n    eds_cluster_config: {eds_config: {ads: {}}}\n",
        )
        .expect("parses");
        let e = translate(b, &Store::new()).expect_err("rejected");
        assert_eq!(
            e.0[0].path,
            "static_resources.clusters[0].eds_cluster_config.eds_config"
        );
        let b = parse_bootstrap(
            "static_resources:\n  clusters:\n  - name: e\n    type: EDS\n    eds_cluster_config: {eds_config: {path_config_source: {path: /x.yaml}}}\n",
        )
        .expect("parses");
        assert!(translate(b, &Store::new()).is_ok());
    }

    #[test]
    fn tls_clusters_are_normal_clusters_and_the_ads_stream_uses_its_tls() {
        let ca = rcgen::generate_simple_self_signed(vec!["cp.example".into()]).expect("ca");
        let pem = ca.cert.pem().replace('\n', "\\n");
        let ts = format!(
            "    transport_socket:\n      name: tls\n      typed_config:\n        '@type': type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        sni: cp.example\n        common_tls_context: {{validation_context: {{trusted_ca: {{inline_string: \"{pem}\"}}}}}}\n"
        );
        let ads = "dynamic_resources:\n  ads_config: {api_type: GRPC, grpc_services: [{envoy_grpc: {cluster_name: xds}}]}\n";
        let b = parse_bootstrap(&format!(
            "{ads}static_resources:\n  clusters:\n  - name: xds\n{ts}  - name: other\n{ts}"
        ))
        .expect("parses");
        let snap = translate(b, &Store::new()).expect("valid");
        let tls = snap.xds.ads.and_then(|a| a.tls).expect("ads tls");
        assert_eq!(
            (tls.sni.as_str(), tls.ca_pem.as_slice()),
            ("cp.example", ca.cert.pem().as_bytes())
        );
        assert!(snap.clusters.iter().all(|c| c.tls.is_some()));

        let b = parse_bootstrap(&format!(
            "{ads}static_resources:\n  clusters:\n  - name: xds\n    transport_socket:\n      name: tls\n      typed_config:\n        '@type': type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n        common_tls_context: {{}}\n"
        ))
        .expect("parses");
        let e = translate(b, &Store::new()).expect_err("no trusted_ca");
        assert_eq!(
            e.0[0].path,
            "static_resources.clusters[0].transport_socket.typed_config.common_tls_context.validation_context"
        );
    }

    #[test]
    fn durations() {
        let mut errs = Errors::default();
        let d = duration(
            &PbDuration {
                seconds: 1,
                nanos: 5,
            },
            "x",
            &mut errs,
        );
        assert_eq!(d, Duration::new(1, 5));
        duration(
            &PbDuration {
                seconds: -1,
                nanos: 0,
            },
            "y",
            &mut errs,
        );
        assert_eq!(errs.0[0].path, "y");
    }

    #[test]
    fn overload_manager_and_runtime_are_translated_with_paths() {
        let b = parse_bootstrap(
            "overload_manager:\n  resource_monitors:\n  - name: heap\n    typed_config: {'@type': type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig, max_heap_size_bytes: 1000000}\n  actions:\n  - name: envoy.overload_actions.stop_accepting_requests\n    triggers: [{name: heap, threshold: {value: 0.95}}]\nlayered_runtime: {layers: [{name: s, static_layer: {envoy.resource_limits.listener.l.connection_limit: 4}}]}\n",
        )
        .expect("parses");
        let snap = translate(b, &Store::new()).expect("valid");
        assert_eq!(snap.limits.listener_connection_limits["l"], 4);
        assert_eq!(snap.limits.overload.as_ref().expect("om").actions.len(), 1);
        let b = parse_bootstrap(
            "overload_manager:\n  actions:\n  - name: envoy.overload_actions.stop_accepting_requests\n    triggers: [{name: heap, threshold: {value: 0.95}}]\n",
        )
        .expect("parses");
        let e = translate(b, &Store::new()).expect_err("unknown monitor");
        assert_eq!(e.0[0].path, "overload_manager.actions[0].triggers[0].name");
    }
}
