//! The operator's config: documents applied through the API, the CLI or `--config-dir`,
//! validated, versioned, persisted, and served as a [`Source`].
//!
//! ## Targets and layering
//! A document is applied to a [`Target`]: every node (`all`), the nodes of one node cluster
//! (`cluster:NAME`, `--node-cluster`), or one node (`node:ID`, `--node-id`). Applying a
//! document replaces that target's whole document (an empty `resources` list clears it). A
//! node receives the union of the layers that match it, `all` < `cluster` < `node`, a more
//! specific layer overriding a resource of the same type and name. The node's group key is
//! the pair of specific layers that exist for it, so nodes without their own layers share one
//! snapshot.
//!
//! ## Versions and history
//! Every successful apply gets the next version number (1, 2, …, across all targets) and is
//! kept: [`OperatorConfig::history`] lists them, [`OperatorConfig::rollback`] re-applies an
//! earlier version's document to its target as a new version (validated again against the
//! current context). A version is committed to the store before the apply returns or any
//! stream is told, so an acknowledged apply survives `kill -9`.
//!
//! ## Storage layout (see [`crate::storage`])
//! - `xds.config.meta`: version (u64 big-endian) -> JSON [`VersionInfo`].
//! - `xds.config.payload`: version -> the document as an encoded `DiscoveryResponse`.
//! - `xds.config.heads`: target string -> version currently in force.
//!
//! With `--store etcd://…` ([`ConfigBackend::Etcd`]) the same records live under
//! `<prefix>/config/`; versions are allocated by an etcd transaction on a counter key, so
//! replicas never hand out the same number, and every replica reloads
//! ([`OperatorConfig::reload`]) when its watch sees a change (see [`crate::etcd::config`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use prost::Message as _;
use tokio::sync::watch;
use weir_xds_api::Any;
use weir_xds_api::pb::envoy::service::discovery::v3::DiscoveryResponse;

use crate::cache::{NodeMeta, Source};
use crate::resource::Resource;
use crate::storage::{Store, StoreError};
use crate::validate::{self, Context, FieldError};

const META: &str = "xds.config.meta";
const PAYLOAD: &str = "xds.config.payload";
const HEADS: &str = "xds.config.heads";

/// Which nodes a document applies to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// Every node.
    All,
    /// Nodes whose `node.cluster` is this.
    NodeCluster(String),
    /// The node whose `node.id` is this.
    Node(String),
}

impl Target {
    /// Build from the CLI/API options (at most one of the two may be set).
    pub fn from_options(
        node_cluster: Option<&str>,
        node_id: Option<&str>,
    ) -> Result<Self, ApplyError> {
        match (node_cluster, node_id) {
            (Some(_), Some(_)) => Err(ApplyError::BadTarget(
                "give at most one of node_cluster and node_id".into(),
            )),
            (Some(""), _) | (_, Some("")) => Err(ApplyError::BadTarget(
                "node_cluster / node_id must not be empty".into(),
            )),
            (Some(c), None) => Ok(Target::NodeCluster(c.into())),
            (None, Some(n)) => Ok(Target::Node(n.into())),
            (None, None) => Ok(Target::All),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::All => f.write_str("all"),
            Target::NodeCluster(c) => write!(f, "cluster:{c}"),
            Target::Node(n) => write!(f, "node:{n}"),
        }
    }
}

impl std::str::FromStr for Target {
    type Err = ApplyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "all" {
            Ok(Target::All)
        } else if let Some(c) = s.strip_prefix("cluster:").filter(|c| !c.is_empty()) {
            Ok(Target::NodeCluster(c.into()))
        } else if let Some(n) = s.strip_prefix("node:").filter(|n| !n.is_empty()) {
            Ok(Target::Node(n.into()))
        } else {
            Err(ApplyError::BadTarget(format!(
                "{s:?} is not a target (all, cluster:NAME, node:ID)"
            )))
        }
    }
}

impl serde::Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Target {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One resource in a version's summary.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResourceSummary {
    /// Short type (`lds`, `rds`, `cds`, `eds`, `sds`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Resource name.
    pub name: String,
    /// Content version.
    pub version: String,
}

/// What the history records about one applied version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VersionInfo {
    /// The version number.
    pub version: u64,
    /// The nodes it applies to.
    pub target: Target,
    /// Milliseconds since the Unix epoch.
    pub applied_at_ms: u64,
    /// How it came: `api`, `config-dir`, `rollback:N`.
    pub origin: String,
    /// The resources in it.
    pub resources: Vec<ResourceSummary>,
}

/// Why an apply or rollback was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The document is invalid; nothing was stored.
    #[error("invalid config:\n{}", .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
    /// The target is malformed.
    #[error("{0}")]
    BadTarget(String),
    /// No such version in the history.
    #[error("version {0} does not exist")]
    NoSuchVersion(u64),
    /// The store failed; nothing was applied.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store holds something this build cannot read.
    #[error("corrupt store entry: {0}")]
    Corrupt(String),
    /// etcd failed (`--store etcd://`); nothing was applied.
    #[error(transparent)]
    Etcd(#[from] crate::etcd::EtcdError),
}

/// Where the config and its history live: the embedded store (tables `xds.config.*`) or
/// etcd (keys `<prefix>/config/…`, see [`crate::etcd::config`]).
#[derive(Debug, Clone)]
pub enum ConfigBackend {
    /// The embedded redb store.
    Embedded(Arc<Store>),
    /// etcd, shared with other replicas.
    Etcd(crate::etcd::config::EtcdConfigStore),
}

#[derive(Debug, Default)]
struct State {
    heads: BTreeMap<Target, Head>,
    history: Vec<VersionInfo>,
    next_version: u64,
}

#[derive(Debug, Clone)]
struct Head {
    version: u64,
    resources: Arc<Vec<Arc<Resource>>>,
}

/// The operator config store and [`Source`]; see the module docs.
pub struct OperatorConfig {
    backend: ConfigBackend,
    state: RwLock<State>,
    /// Serialises apply/rollback (validate, commit, publish) so versions are in commit order.
    apply_lock: Mutex<()>,
    tx: watch::Sender<u64>,
}

impl std::fmt::Debug for OperatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorConfig").finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn summary(resources: &[Arc<Resource>]) -> Vec<ResourceSummary> {
    resources
        .iter()
        .map(|r| ResourceSummary {
            kind: crate::resource::short_name(r.type_url()).into(),
            name: r.name.clone(),
            version: r.version.clone(),
        })
        .collect()
}

fn decode_payload(bytes: &[u8], version: u64) -> Result<Vec<Arc<Resource>>, ApplyError> {
    let d = DiscoveryResponse::decode(bytes)
        .map_err(|e| ApplyError::Corrupt(format!("payload of version {version}: {e}")))?;
    d.resources
        .into_iter()
        .map(|any| {
            let name = crate::resource::resource_name(&any).ok_or_else(|| {
                ApplyError::Corrupt(format!(
                    "version {version}: undecodable {} resource",
                    any.type_url
                ))
            })?;
            Ok(Arc::new(Resource::new(name, any)))
        })
        .collect()
}

impl OperatorConfig {
    /// Load the config and history from `store`.
    pub fn open(store: Arc<Store>) -> Result<Self, ApplyError> {
        Self::open_backend(ConfigBackend::Embedded(store))
    }

    /// Load the config and history from `backend`.
    pub fn open_backend(backend: ConfigBackend) -> Result<Self, ApplyError> {
        let (st, _) = load_state(&backend)?;
        Ok(OperatorConfig {
            backend,
            state: RwLock::new(st),
            apply_lock: Mutex::new(()),
            tx: watch::channel(0).0,
        })
    }

    /// Reload everything from the backend and publish it (another replica changed the
    /// shared store); the etcd revision read at, for the etcd backend.
    pub fn reload(&self) -> Result<Option<i64>, ApplyError> {
        let (st, rev) = load_state(&self.backend)?;
        {
            let mut cur = self.state.write().unwrap_or_else(|p| p.into_inner());
            if st.next_version < cur.next_version {
                // Older than what this replica already committed: keep ours.
                return Ok(rev);
            }
            *cur = st;
        }
        self.tx.send_modify(|g| *g += 1);
        Ok(rev)
    }

    /// The storage backend.
    pub fn backend(&self) -> &ConfigBackend {
        &self.backend
    }
}

fn load_state(backend: &ConfigBackend) -> Result<(State, Option<i64>), ApplyError> {
    let mut st = State {
        next_version: 1,
        ..Default::default()
    };
    let store = match backend {
        ConfigBackend::Embedded(store) => store,
        ConfigBackend::Etcd(etcd) => {
            let raw = etcd.load()?;
            for (key_version, v) in raw.meta {
                let info: VersionInfo = serde_json::from_slice(&v)
                    .map_err(|e| ApplyError::Corrupt(format!("history entry: {e}")))?;
                if key_version != info.version {
                    return Err(ApplyError::Corrupt(format!(
                        "history key {key_version} holds version {}",
                        info.version
                    )));
                }
                st.next_version = st.next_version.max(info.version + 1);
                st.history.push(info);
            }
            for (target, version) in raw.heads {
                let target: Target = target.parse()?;
                let payload = etcd
                    .payload(version)?
                    .ok_or_else(|| ApplyError::Corrupt(format!("no payload for {version}")))?;
                let resources = decode_payload(&payload, version)?;
                st.heads.insert(
                    target,
                    Head {
                        version,
                        resources: Arc::new(resources),
                    },
                );
            }
            return Ok((st, Some(raw.revision)));
        }
    };
    {
        {
            let r = store.read()?;
            for (k, v) in r.scan(META)? {
                let info: VersionInfo = serde_json::from_slice(&v)
                    .map_err(|e| ApplyError::Corrupt(format!("history entry: {e}")))?;
                let key_version = <[u8; 8]>::try_from(k.as_slice())
                    .map(u64::from_be_bytes)
                    .map_err(|_| ApplyError::Corrupt("history key".into()))?;
                if key_version != info.version {
                    return Err(ApplyError::Corrupt(format!(
                        "history key {key_version} holds version {}",
                        info.version
                    )));
                }
                st.next_version = st.next_version.max(info.version + 1);
                st.history.push(info);
            }
            for (k, v) in r.scan(HEADS)? {
                let target: Target = String::from_utf8_lossy(&k).parse()?;
                let version = <[u8; 8]>::try_from(v.as_slice())
                    .map(u64::from_be_bytes)
                    .map_err(|_| ApplyError::Corrupt("head value".into()))?;
                let payload = r
                    .get(PAYLOAD, &version.to_be_bytes())?
                    .ok_or_else(|| ApplyError::Corrupt(format!("no payload for {version}")))?;
                let resources = decode_payload(&payload, version)?;
                st.heads.insert(
                    target,
                    Head {
                        version,
                        resources: Arc::new(resources),
                    },
                );
            }
        }
    }
    Ok((st, None))
}

impl OperatorConfig {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The validation context for a document applied to `target`: what the `all` layer
    /// defines is visible to node-cluster and node documents (they are merged with it).
    fn context_for(&self, target: &Target) -> Context {
        let mut ctx = Context::default();
        if *target == Target::All {
            return ctx;
        }
        // A node document could also lean on a node-cluster layer, but which one depends on
        // the node's cluster; only the `all` layer is certain to be merged in.
        let st = self.read();
        if let Some(h) = st.heads.get(&Target::All) {
            for r in h.resources.iter() {
                match r.type_url() {
                    weir_xds_api::type_urls::CLUSTER => {
                        ctx.clusters.insert(r.name.clone());
                    }
                    weir_xds_api::type_urls::ROUTE_CONFIGURATION => {
                        ctx.routes.insert(r.name.clone());
                    }
                    _ => {}
                }
            }
        }
        ctx
    }

    /// Validate `resources` for `target`, store them as a new version and publish it.
    pub fn apply(
        &self,
        target: Target,
        resources: Vec<Any>,
        origin: &str,
    ) -> Result<VersionInfo, ApplyError> {
        let _guard = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let ctx = self.context_for(&target);
        let validated = validate::validate(&resources, &ctx).map_err(ApplyError::Invalid)?;
        self.commit(target, resources, validated, origin)
    }

    /// Re-apply version `version`'s document to its target as a new version.
    pub fn rollback(&self, version: u64) -> Result<VersionInfo, ApplyError> {
        let _guard = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (target, resources) = self.version_document(version)?;
        let ctx = self.context_for(&target);
        let validated = validate::validate(&resources, &ctx).map_err(ApplyError::Invalid)?;
        self.commit(target, resources, validated, &format!("rollback:{version}"))
    }

    fn commit(
        &self,
        target: Target,
        resources: Vec<Any>,
        validated: Vec<Arc<Resource>>,
        origin: &str,
    ) -> Result<VersionInfo, ApplyError> {
        let applied_at_ms = now_ms();
        let summary = summary(&validated);
        let build = |version: u64| {
            let info = VersionInfo {
                version,
                target: target.clone(),
                applied_at_ms,
                origin: origin.into(),
                resources: summary.clone(),
            };
            let meta = serde_json::to_vec(&info)
                .map_err(|e| ApplyError::Corrupt(format!("encoding history entry: {e}")))?;
            let payload = DiscoveryResponse {
                version_info: version.to_string(),
                resources: resources.clone(),
                ..Default::default()
            }
            .encode_to_vec();
            Ok::<_, ApplyError>((info, meta, payload))
        };
        let info = match &self.backend {
            ConfigBackend::Embedded(store) => {
                let version = self.read().next_version;
                let (info, meta, payload) = build(version)?;
                let key = version.to_be_bytes();
                store.write(|w| {
                    w.put(META, &key, &meta)?;
                    w.put(PAYLOAD, &key, &payload)?;
                    w.put(HEADS, target.to_string().as_bytes(), &key)?;
                    Ok::<_, ApplyError>(())
                })?;
                info
            }
            ConfigBackend::Etcd(etcd) => {
                let version = etcd.commit(&target.to_string(), |v| {
                    build(v).map(|(_, meta, payload)| (meta, payload))
                })?;
                build(version)?.0
            }
        };
        let version = info.version;
        {
            let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
            st.next_version = st.next_version.max(version + 1);
            st.history.retain(|h| h.version != version);
            st.history.push(info.clone());
            st.history.sort_by_key(|h| h.version);
            st.heads.insert(
                target,
                Head {
                    version,
                    resources: Arc::new(validated),
                },
            );
        }
        self.tx.send_modify(|g| *g += 1);
        Ok(info)
    }

    /// The target and document of a stored version.
    pub fn version_document(&self, version: u64) -> Result<(Target, Vec<Any>), ApplyError> {
        let target = self
            .read()
            .history
            .iter()
            .find(|v| v.version == version)
            .map(|v| v.target.clone())
            .ok_or(ApplyError::NoSuchVersion(version))?;
        let payload = match &self.backend {
            ConfigBackend::Embedded(store) => store.read()?.get(PAYLOAD, &version.to_be_bytes())?,
            ConfigBackend::Etcd(etcd) => etcd.payload(version)?,
        }
        .ok_or(ApplyError::NoSuchVersion(version))?;
        let d = DiscoveryResponse::decode(payload.as_slice())
            .map_err(|e| ApplyError::Corrupt(format!("payload of version {version}: {e}")))?;
        Ok((target, d.resources))
    }

    /// Every applied version, oldest first.
    pub fn history(&self) -> Vec<VersionInfo> {
        self.read().history.clone()
    }

    /// The document in force for each target: (target, version, resources).
    pub fn current(&self) -> Vec<(Target, u64, Vec<Any>)> {
        self.read()
            .heads
            .iter()
            .map(|(t, h)| {
                (
                    t.clone(),
                    h.version,
                    h.resources.iter().map(|r| r.any.clone()).collect(),
                )
            })
            .collect()
    }

    /// The highest version applied so far (0 when none).
    pub fn latest_version(&self) -> u64 {
        self.read().next_version - 1
    }

    /// The version in force for `target`, if any.
    pub fn head_version(&self, target: &Target) -> Option<u64> {
        self.read().heads.get(target).map(|h| h.version)
    }

    /// Content hash of the document in force for `target` (resource versions in order), to
    /// tell whether re-applying a document would change anything.
    pub fn head_digest(&self, target: &Target) -> Option<String> {
        self.read()
            .heads
            .get(target)
            .map(|h| digest(h.resources.iter().map(|r| r.version.as_str())))
    }

    fn layers_for(&self, node: &NodeMeta) -> [Option<Target>; 2] {
        let st = self.read();
        let c = Target::NodeCluster(node.cluster.clone());
        let n = Target::Node(node.id.clone());
        [
            st.heads.contains_key(&c).then_some(c),
            st.heads.contains_key(&n).then_some(n),
        ]
    }
}

/// A digest over resource versions (see [`OperatorConfig::head_digest`]).
pub fn digest<'a>(versions: impl Iterator<Item = &'a str>) -> String {
    let mut h = crate::resource::Fnv::default();
    for v in versions {
        h.field(v.as_bytes());
    }
    h.hex()
}

impl Source for OperatorConfig {
    fn name(&self) -> &str {
        "operator"
    }

    fn group(&self, node: &NodeMeta) -> String {
        let [c, n] = self.layers_for(node);
        let mut key = String::from("all");
        for t in [c, n].into_iter().flatten() {
            key.push(',');
            key.push_str(&t.to_string());
        }
        key
    }

    fn resources(&self, node: &NodeMeta) -> Vec<Arc<Resource>> {
        let st = self.read();
        let mut out: Vec<Arc<Resource>> = Vec::new();
        let mut index: HashSet<(String, String)> = HashSet::new();
        let layers = [
            Target::Node(node.id.clone()),
            Target::NodeCluster(node.cluster.clone()),
            Target::All,
        ];
        // Most specific first; a name already taken by a more specific layer is skipped.
        for t in &layers {
            if let Some(h) = st.heads.get(t) {
                for r in h.resources.iter() {
                    if index.insert((r.type_url().to_string(), r.name.clone())) {
                        out.push(r.clone());
                    }
                }
            }
        }
        out
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_xds_api::pb::envoy::config::cluster::v3::Cluster;
    use weir_xds_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;

    fn cluster(name: &str, timeout_s: i64) -> Any {
        weir_xds_api::pack(&Cluster {
            name: name.into(),
            connect_timeout: Some(weir_xds_api::pb::google::protobuf::Duration {
                seconds: timeout_s,
                nanos: 0,
            }),
            ..Default::default()
        })
    }

    fn node(id: &str, cluster: &str) -> NodeMeta {
        NodeMeta {
            id: id.into(),
            cluster: cluster.into(),
            workload: None,
        }
    }

    #[test]
    fn apply_history_rollback_and_layers() {
        let cfg = OperatorConfig::open(Arc::new(Store::in_memory().expect("store"))).expect("open");
        assert_eq!(cfg.latest_version(), 0);
        let v1 = cfg
            .apply(Target::All, vec![cluster("a", 1)], "api")
            .expect("v1");
        assert_eq!(v1.version, 1);
        let v2 = cfg
            .apply(
                Target::NodeCluster("edge".into()),
                vec![cluster("a", 2), cluster("b", 1)],
                "api",
            )
            .expect("v2");
        assert_eq!(v2.version, 2);
        let edge = cfg.resources(&node("n1", "edge"));
        assert_eq!(edge.len(), 2);
        let a = edge.iter().find(|r| r.name == "a").expect("a");
        assert_eq!(a.any, cluster("a", 2), "the cluster layer overrides all");
        assert_eq!(cfg.resources(&node("n2", "other")).len(), 1);
        assert_ne!(
            cfg.group(&node("n1", "edge")),
            cfg.group(&node("n2", "other"))
        );
        assert_eq!(
            cfg.group(&node("n3", "other")),
            cfg.group(&node("n2", "other"))
        );

        // A refused apply stores nothing.
        let bad = weir_xds_api::pack(&ClusterLoadAssignment::default());
        let err = cfg
            .apply(Target::All, vec![bad], "api")
            .expect_err("invalid");
        assert!(matches!(err, ApplyError::Invalid(_)), "{err}");
        assert_eq!(cfg.latest_version(), 2);

        let v3 = cfg
            .apply(Target::All, vec![cluster("a", 3)], "api")
            .expect("v3");
        let v4 = cfg.rollback(1).expect("rollback");
        assert_eq!(v4.version, 4);
        assert_eq!(v4.origin, "rollback:1");
        assert_eq!(v4.target, Target::All);
        assert_eq!(v4.resources, v1.resources);
        assert_ne!(v4.resources, v3.resources);
        assert_eq!(cfg.head_version(&Target::All), Some(4));
        assert!(matches!(
            cfg.rollback(99),
            Err(ApplyError::NoSuchVersion(99))
        ));
        assert_eq!(
            cfg.history().iter().map(|v| v.version).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
    }

    #[test]
    fn node_cluster_documents_see_global_clusters() {
        use weir_xds_api::pb::envoy::config::route::v3::RouteConfiguration;
        let cfg = OperatorConfig::open(Arc::new(Store::in_memory().expect("store"))).expect("open");
        let routes: RouteConfiguration = weir_xds_api::from_yaml(
            "name: r\nvirtual_hosts: [{name: v, domains: ['*'], routes: [{match: {prefix: /}, route: {cluster: g}}]}]\n",
        )
        .expect("routes");
        let routes = weir_xds_api::pack(&routes);
        let err = cfg
            .apply(Target::NodeCluster("x".into()), vec![routes.clone()], "api")
            .expect_err("g unknown");
        assert!(matches!(err, ApplyError::Invalid(_)));
        cfg.apply(Target::All, vec![cluster("g", 1)], "api")
            .expect("global");
        cfg.apply(Target::NodeCluster("x".into()), vec![routes], "api")
            .expect("g known from the global layer");
    }

    #[test]
    fn targets_parse_and_print() {
        for s in ["all", "cluster:edge", "node:n-1"] {
            assert_eq!(s.parse::<Target>().expect("parse").to_string(), s);
        }
        assert!("cluster:".parse::<Target>().is_err());
        assert!("x".parse::<Target>().is_err());
        assert!(Target::from_options(Some("a"), Some("b")).is_err());
        assert_eq!(Target::from_options(None, None).expect("all"), Target::All);
    }
}
