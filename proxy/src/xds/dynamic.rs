//! [`Dynamic`]: the owner of every resource that arrived over xDS (or from xDS files), and
//! the only writer of dynamic clusters, endpoints, listeners and routes.
//!
//! Semantics follow Envoy:
//! * Each resource of an update is translated on its own. Valid ones apply; invalid ones are
//!   named in the returned error (the NACK's `error_detail`), and the type's accepted version
//!   does not move. An unchanged resource (same bytes) is skipped.
//! * State of the world for LDS/CDS: a resource missing from a response is removed. For
//!   RDS/EDS a response carries only what it carries; nothing is removed implicitly. Delta
//!   removes exactly `removed_resources`.
//! * Warming: a new or changed cluster becomes active only once it is warm (its first EDS
//!   assignment, DNS resolution and health checks), bounded by `initial_fetch_timeout`; until
//!   then the previous version (if any) keeps serving. A listener becomes active once every
//!   route config its connection managers use via RDS arrived, with the same bound.
//! * Removed clusters are dropped from the cluster manager; requests already holding them
//!   finish. Removed or replaced listeners drain (the listener manager's job).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use weir_xds_api::Any;
use weir_xds_api::pb::envoy::config::cluster::v3::Cluster as PbCluster;
use weir_xds_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use weir_xds_api::pb::envoy::config::listener::v3::Listener as PbListener;
use weir_xds_api::pb::envoy::config::route::v3::RouteConfiguration;

use super::{CLUSTER, ENDPOINT, LISTENER, ROUTE, XdsConfig, XdsStats, version_hash};
use crate::config::source::{ConfigSource, DEFAULT_INITIAL_FETCH_TIMEOUT, SourceKind};
use crate::config::{Errors, TranslateCtx};
use crate::listener::{ListenerConfig, NetworkFilter};
use crate::route::rds::RouteSlot;
use crate::route::{RdsRegistry, RouteTable};
use crate::server::ServerState;
use crate::stats::Store;
use crate::upstream::{Cluster, ClusterManager, DiscoveryType, EndpointConfig};

/// One resource of an update.
#[derive(Debug, Clone)]
pub struct Resource {
    /// Its name (`Listener.name`, `Cluster.name`, `RouteConfiguration.name`,
    /// `ClusterLoadAssignment.cluster_name`).
    pub name: String,
    /// Its version (delta) or the response's version_info (state of the world).
    pub version: String,
    /// The resource.
    pub body: Any,
}

/// Why an update was not (fully) applied: one line per rejected resource, naming it and the
/// field at fault. Sent as the NACK's `error_detail.message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct UpdateError(pub Vec<String>);

/// A resource as last accepted, for `/config_dump`.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its version.
    pub version: String,
    /// When it was accepted.
    pub last_updated: SystemTime,
    /// The resource.
    pub body: Any,
}

#[derive(Debug, Default)]
struct ClusterEntry {
    active: Option<Stored>,
    warming: Option<(Stored, Arc<Cluster>)>,
}

#[derive(Debug, Default)]
struct ListenerEntry {
    active: Option<Stored>,
    /// Warming, or warm and waiting for the server to start accepting (`pending`).
    warming: Option<WarmingListener>,
}

#[derive(Debug)]
struct WarmingListener {
    stored: Stored,
    config: Arc<ListenerConfig>,
    /// Warm, waiting for [`Dynamic::enable_listeners`].
    pending: bool,
}

#[derive(Debug)]
struct EndpointsEntry {
    stored: Stored,
    endpoints: Arc<Vec<EndpointConfig>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Last accepted version_info per type.
    versions: BTreeMap<&'static str, String>,
    clusters: BTreeMap<String, ClusterEntry>,
    listeners: BTreeMap<String, ListenerEntry>,
    routes: BTreeMap<String, Stored>,
    endpoints: BTreeMap<String, EndpointsEntry>,
    /// Types that had their first update (or gave up waiting for it).
    first: HashSet<&'static str>,
    /// Listeners may be handed to the listener manager (the server's workers run).
    listeners_enabled: bool,
}

/// Dynamic resources: see the module docs.
#[derive(Debug)]
pub struct Dynamic {
    server: Weak<ServerState>,
    clusters: Arc<ClusterManager>,
    rds: Arc<RdsRegistry>,
    store: Arc<Store>,
    config: XdsConfig,
    stats: XdsStats,
    static_clusters: HashSet<String>,
    static_listeners: HashSet<String>,
    inner: Mutex<Inner>,
    /// Ticks when the EDS/RDS names to subscribe to may have changed.
    subs: watch::Sender<u64>,
    /// Cancelled when the initial fetch is complete (Envoy's init manager).
    init: CancellationToken,
}

/// What a source should ask for, for one type.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subscription {
    /// All resources of the type (LDS, CDS).
    pub wildcard: bool,
    /// Named resources (RDS, EDS).
    pub names: BTreeSet<String>,
}

/// The name of a resource of `type_url` (decoding it).
pub fn resource_name(type_url: &str, body: &Any) -> Result<String, String> {
    if body.type_url != type_url {
        return Err(format!(
            "resource type {} does not match the response type {type_url}",
            body.type_url
        ));
    }
    let name = match type_url {
        LISTENER => weir_xds_api::unpack::<PbListener>(body).map(|l| l.name),
        CLUSTER => weir_xds_api::unpack::<PbCluster>(body).map(|c| c.name),
        ROUTE => weir_xds_api::unpack::<RouteConfiguration>(body).map(|r| r.name),
        ENDPOINT => weir_xds_api::unpack::<ClusterLoadAssignment>(body).map(|c| c.cluster_name),
        weir_xds_api::type_urls::SECRET => weir_xds_api::unpack::<
            weir_xds_api::pb::envoy::extensions::transport_sockets::tls::v3::Secret,
        >(body)
        .map(|s| s.name),
        other => return Err(format!("resource type {other} is not supported")),
    };
    name.map_err(|e| format!("cannot decode {type_url}: {e}"))
}

fn short(type_url: &str) -> &str {
    weir_xds_api::type_name(type_url)
        .rsplit('.')
        .next()
        .unwrap_or(type_url)
}

fn describe(type_url: &str, name: &str, errs: Errors) -> Vec<String> {
    errs.0
        .into_iter()
        .map(|e| {
            if e.path.is_empty() {
                format!("{} {name:?}: {}", short(type_url), e.message)
            } else {
                format!("{} {name:?}: {}: {}", short(type_url), e.path, e.message)
            }
        })
        .collect()
}

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as f64
}

/// The RDS route slots a listener's connection managers use.
fn route_slots(l: &ListenerConfig) -> Vec<Arc<RouteSlot>> {
    let mut v: Vec<Arc<RouteSlot>> = Vec::new();
    for c in l.filter_chains.iter().chain(l.default_filter_chain.iter()) {
        if let NetworkFilter::Http(h) = &c.filter
            && h.routes.slot().source.is_some()
            && !v.iter().any(|s| Arc::ptr_eq(s, h.routes.slot()))
        {
            v.push(h.routes.slot().clone());
        }
    }
    v
}

/// Whether every TLS context of the listener's filter chains has its SDS secrets.
fn listener_secrets_ready(cfg: &ListenerConfig) -> bool {
    cfg.filter_chains
        .iter()
        .chain(cfg.default_filter_chain.as_ref())
        .filter_map(|c| c.tls.as_ref())
        .all(|t| t.secrets_ready())
}

fn fetch_timeout(s: Option<&ConfigSource>) -> Option<Duration> {
    s.map_or(Some(DEFAULT_INITIAL_FETCH_TIMEOUT), |s| {
        s.initial_fetch_timeout
    })
}

impl Dynamic {
    /// Dynamic state for a server. `static_clusters` / `static_listeners` are the bootstrap's
    /// names, which xDS may not replace.
    pub fn new(server: &Arc<ServerState>, config: XdsConfig, rds: Arc<RdsRegistry>) -> Arc<Self> {
        let snap = server.snapshot.load();
        let store = server.stats.clone();
        let stats = XdsStats::new(&store);
        let static_clusters: HashSet<String> =
            snap.clusters.iter().map(|c| c.name.clone()).collect();
        stats.active_clusters.set(static_clusters.len() as f64);
        Arc::new(Self {
            server: Arc::downgrade(server),
            clusters: server.clusters.clone(),
            rds,
            store,
            config,
            stats,
            static_clusters,
            static_listeners: snap.listeners.iter().map(|l| l.name.clone()).collect(),
            inner: Mutex::new(Inner::default()),
            subs: watch::Sender::new(0),
            init: CancellationToken::new(),
        })
    }

    /// The translated `dynamic_resources`.
    pub fn config(&self) -> &XdsConfig {
        &self.config
    }

    /// The client's stats.
    pub fn stats(&self) -> &XdsStats {
        &self.stats
    }

    /// The RDS registry.
    pub fn rds(&self) -> &Arc<RdsRegistry> {
        &self.rds
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start the initial-fetch timers. Call once, on the main runtime, when the sources start.
    pub fn start(self: &Arc<Self>) {
        for (ty, src) in [(CLUSTER, &self.config.cds), (LISTENER, &self.config.lds)] {
            let Some(src) = src else {
                self.lock().first.insert(ty);
                continue;
            };
            if let Some(t) = src.initial_fetch_timeout {
                let weak = Arc::downgrade(self);
                tokio::spawn(async move {
                    tokio::time::sleep(t).await;
                    let Some(d) = weak.upgrade() else { return };
                    let mut inner = d.lock();
                    if inner.first.insert(ty) {
                        tracing::warn!(
                            type_url = ty,
                            "initial fetch timed out; starting without it"
                        );
                        if ty == CLUSTER {
                            d.stats.cds.init_fetch_timeout.increment(1);
                        } else {
                            d.stats.lds.init_fetch_timeout.increment(1);
                        }
                        d.check_init(&inner);
                    }
                    drop(inner);
                });
            }
        }
        // Static EDS clusters warm with their first assignment, bounded the same way.
        for c in self.clusters.all() {
            if c.config().discovery == DiscoveryType::Eds && !c.is_warm() {
                self.spawn_cluster_warming(c);
            }
        }
        let inner = self.lock();
        self.check_init(&inner);
    }

    /// Resolves once the initial fetch completed: the first CDS and LDS updates (or their
    /// timeouts) and every cluster and listener they brought warm.
    pub async fn initialized(&self) {
        self.init.cancelled().await;
    }

    fn check_init(&self, inner: &Inner) {
        if self.init.is_cancelled() {
            return;
        }
        let types_done = inner.first.contains(CLUSTER) && inner.first.contains(LISTENER);
        let clusters_warm = inner.clusters.values().all(|e| e.warming.is_none())
            && self.clusters.all().iter().all(|c| c.is_warm());
        let listeners_warm = inner
            .listeners
            .values()
            .all(|e| e.warming.as_ref().is_none_or(|w| w.pending));
        if types_done && clusters_warm && listeners_warm {
            tracing::info!("initial xDS fetch complete");
            self.init.cancel();
        }
    }

    /// Let listeners reach the listener manager (the server's workers are running): every
    /// warm listener waiting for this is added now.
    pub fn enable_listeners(&self) {
        let mut inner = self.lock();
        inner.listeners_enabled = true;
        let pending: Vec<String> = inner
            .listeners
            .iter()
            .filter(|(_, e)| e.warming.as_ref().is_some_and(|w| w.pending))
            .map(|(n, _)| n.clone())
            .collect();
        for name in pending {
            if let Err(e) = self.activate_listener(&mut inner, &name) {
                tracing::error!(listener = %name, "lds: {e}");
            }
        }
        self.update_listener_gauges(&inner);
    }

    /// Ticks when [`Dynamic::subscription`] may answer differently.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        let mut rx = self.subs.subscribe();
        rx.mark_changed();
        rx
    }

    fn tick(&self) {
        self.subs.send_modify(|n| *n += 1);
    }

    /// What to ask the ADS server for, for `type_url` (`None`: nothing of this type comes
    /// from ADS).
    pub fn subscription(&self, type_url: &str) -> Option<Subscription> {
        let ads = |s: &Option<ConfigSource>| s.as_ref().is_some_and(|s| s.kind == SourceKind::Ads);
        match type_url {
            LISTENER => ads(&self.config.lds).then(|| Subscription {
                wildcard: true,
                names: BTreeSet::new(),
            }),
            CLUSTER => ads(&self.config.cds).then(|| Subscription {
                wildcard: true,
                names: BTreeSet::new(),
            }),
            ENDPOINT => {
                let names = self.eds_names(|k| *k == SourceKind::Ads);
                (!names.is_empty()).then_some(Subscription {
                    wildcard: false,
                    names,
                })
            }
            weir_xds_api::type_urls::SECRET => {
                // SDS over ADS: the secret names live TLS contexts use.
                let names = crate::tls::secrets::registry(&self.store).wanted_ads();
                (!names.is_empty()).then_some(Subscription {
                    wildcard: false,
                    names,
                })
            }
            ROUTE => {
                let names: BTreeSet<String> = self
                    .rds
                    .live()
                    .iter()
                    .filter(|s| s.source.as_ref().is_some_and(|s| s.kind == SourceKind::Ads))
                    .map(|s| s.name.clone())
                    .collect();
                (!names.is_empty()).then_some(Subscription {
                    wildcard: false,
                    names,
                })
            }
            _ => None,
        }
    }

    /// EDS service names of active and warming clusters whose source matches.
    fn eds_names(&self, want: impl Fn(&SourceKind) -> bool) -> BTreeSet<String> {
        let warming: Vec<Arc<Cluster>> = self
            .lock()
            .clusters
            .values()
            .filter_map(|e| e.warming.as_ref().map(|(_, c)| c.clone()))
            .collect();
        self.clusters
            .all()
            .iter()
            .chain(warming.iter())
            .filter_map(|c| c.config().eds.as_ref())
            .filter(|e| want(&e.source.kind))
            .map(|e| e.service_name.clone())
            .collect()
    }

    /// The files the file sources should watch: (type, path, watched directory).
    pub fn file_sources(
        &self,
    ) -> Vec<(&'static str, std::path::PathBuf, Option<std::path::PathBuf>)> {
        let mut out = Vec::new();
        let mut add = |ty: &'static str, k: &SourceKind| {
            if let SourceKind::Path {
                path,
                watched_directory,
            } = k
                && !out.iter().any(|(t, p, _)| *t == ty && p == path)
            {
                out.push((ty, path.clone(), watched_directory.clone()));
            }
        };
        if let Some(s) = &self.config.cds {
            add(CLUSTER, &s.kind);
        }
        if let Some(s) = &self.config.lds {
            add(LISTENER, &s.kind);
        }
        for slot in self.rds.live() {
            if let Some(s) = &slot.source {
                add(ROUTE, &s.kind);
            }
        }
        let mut eds: Vec<SourceKind> = Vec::new();
        let warming: Vec<Arc<Cluster>> = self
            .lock()
            .clusters
            .values()
            .filter_map(|e| e.warming.as_ref().map(|(_, c)| c.clone()))
            .collect();
        for c in self.clusters.all().iter().chain(warming.iter()) {
            if let Some(e) = &c.config().eds {
                eds.push(e.source.kind.clone());
            }
        }
        for k in &eds {
            add(ENDPOINT, k);
        }
        out
    }

    /// The last accepted version_info of a type.
    pub fn version(&self, type_url: &str) -> Option<String> {
        self.lock().versions.get(type_url).cloned()
    }

    /// The version of every resource of a type this client holds (delta's
    /// `initial_resource_versions` on reconnect).
    pub fn resource_versions(&self, type_url: &str) -> BTreeMap<String, String> {
        let inner = self.lock();
        match type_url {
            CLUSTER => inner
                .clusters
                .iter()
                .filter_map(|(n, e)| {
                    let s = e.warming.as_ref().map(|(s, _)| s).or(e.active.as_ref())?;
                    Some((n.clone(), s.version.clone()))
                })
                .collect(),
            LISTENER => inner
                .listeners
                .iter()
                .filter_map(|(n, e)| {
                    let s = e
                        .warming
                        .as_ref()
                        .map(|w| &w.stored)
                        .or(e.active.as_ref())?;
                    Some((n.clone(), s.version.clone()))
                })
                .collect(),
            ROUTE => inner
                .routes
                .iter()
                .map(|(n, s)| (n.clone(), s.version.clone()))
                .collect(),
            ENDPOINT => inner
                .endpoints
                .iter()
                .map(|(n, e)| (n.clone(), e.stored.version.clone()))
                .collect(),
            _ => BTreeMap::new(),
        }
    }

    /// A source could not fetch a type (stream failed, file unreadable).
    pub fn update_failed(&self, type_url: &str) {
        match type_url {
            CLUSTER => self.stats.cds.update_failure.increment(1),
            LISTENER => self.stats.lds.update_failure.increment(1),
            _ => {}
        }
    }

    /// Apply an update of `type_url`. `full_state`: the resources are the whole set of the
    /// type (state of the world LDS/CDS, or a file), so dynamic resources missing from it are
    /// removed. `removed`: names removed explicitly (delta).
    pub fn apply(
        self: &Arc<Self>,
        type_url: &str,
        version_info: &str,
        resources: Vec<Resource>,
        removed: &[String],
        full_state: bool,
    ) -> Result<(), UpdateError> {
        if type_url == weir_xds_api::type_urls::SECRET {
            return self.apply_secrets(version_info, resources, removed);
        }
        let api = match type_url {
            CLUSTER => Some(&self.stats.cds),
            LISTENER => Some(&self.stats.lds),
            _ => None,
        };
        if let Some(a) = api {
            a.update_attempt.increment(1);
        }
        let ty: &'static str = match type_url {
            CLUSTER => CLUSTER,
            LISTENER => LISTENER,
            ROUTE => ROUTE,
            ENDPOINT => ENDPOINT,
            other => {
                return Err(UpdateError(vec![format!(
                    "resource type {other} is not supported"
                )]));
            }
        };
        let mut errors = Vec::new();
        let mut inner = self.lock();
        let mut present = HashSet::new();
        let mut good = Vec::with_capacity(resources.len());
        for r in resources {
            present.insert(r.name.clone());
            if r.body.type_url != ty {
                errors.push(format!(
                    "{} {:?}: resource type {} does not match the response type",
                    short(ty),
                    r.name,
                    r.body.type_url
                ));
                continue;
            }
            good.push(r);
        }
        let mut removed: Vec<String> = removed.to_vec();
        if full_state {
            let names: Vec<String> = match ty {
                CLUSTER => inner.clusters.keys().cloned().collect(),
                LISTENER => inner.listeners.keys().cloned().collect(),
                _ => Vec::new(),
            };
            removed.extend(names.into_iter().filter(|n| !present.contains(n)));
        }
        match ty {
            CLUSTER => self.apply_clusters(&mut inner, good, &removed, &mut errors),
            ENDPOINT => self.apply_endpoints(&mut inner, good, &removed, &mut errors),
            LISTENER => self.apply_listeners(&mut inner, good, &removed, &mut errors),
            _ => self.apply_routes(&mut inner, good, &removed, &mut errors),
        }
        inner.first.insert(ty);
        let result = if errors.is_empty() {
            inner.versions.insert(ty, version_info.to_string());
            if let Some(a) = api {
                a.update_success.increment(1);
                a.version.set(version_hash(version_info));
                a.update_time.set(now_ms());
            }
            tracing::debug!(type_url = ty, version = version_info, "xDS update applied");
            Ok(())
        } else {
            if let Some(a) = api {
                a.update_rejected.increment(1);
            }
            tracing::warn!(
                type_url = ty,
                version = version_info,
                "xDS update rejected:\n{}",
                errors.join("\n")
            );
            Err(UpdateError(errors))
        };
        self.check_init(&inner);
        drop(inner);
        self.tick();
        result
    }

    // ---- SDS ----

    /// Secrets over ADS: validated all-or-nothing per resource, stored in the proxy's
    /// [`crate::tls::secrets::SecretRegistry`]; TLS contexts pick them up on their next
    /// handshake (existing connections keep theirs).
    fn apply_secrets(
        &self,
        version_info: &str,
        resources: Vec<Resource>,
        removed: &[String],
    ) -> Result<(), UpdateError> {
        use weir_xds_api::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
        let registry = crate::tls::secrets::registry(&self.store);
        let mut errors = Vec::new();
        for r in resources {
            let s: Secret = match weir_xds_api::unpack(&r.body) {
                Ok(s) => s,
                Err(e) => {
                    errors.push(format!("Secret {:?}: {e}", r.name));
                    continue;
                }
            };
            let mut errs = Errors::default();
            match crate::tls::config::secret(&s, "", &mut errs) {
                Some((name, v)) if errs.is_empty() => registry.set(name, v),
                _ => errors.extend(describe(weir_xds_api::type_urls::SECRET, &r.name, errs)),
            }
        }
        for name in removed {
            registry.remove(name);
        }
        let mut inner = self.lock();
        let result = if errors.is_empty() {
            inner
                .versions
                .insert(weir_xds_api::type_urls::SECRET, version_info.to_string());
            tracing::debug!(version = version_info, "SDS update applied");
            Ok(())
        } else {
            tracing::warn!(
                version = version_info,
                "SDS update rejected:\n{}",
                errors.join("\n")
            );
            Err(UpdateError(errors))
        };
        drop(inner);
        self.tick();
        result
    }

    fn cluster_names(&self, inner: &Inner) -> HashSet<String> {
        let mut names: HashSet<String> = self
            .clusters
            .all()
            .iter()
            .map(|c| c.name().to_string())
            .collect();
        names.extend(
            inner
                .clusters
                .iter()
                .filter(|(_, e)| e.warming.is_some())
                .map(|(n, _)| n.clone()),
        );
        names
    }

    // ---- CDS ----

    fn apply_clusters(
        self: &Arc<Self>,
        inner: &mut Inner,
        resources: Vec<Resource>,
        removed: &[String],
        errors: &mut Vec<String>,
    ) {
        for r in resources {
            if self.static_clusters.contains(&r.name) {
                errors.push(format!(
                    "Cluster {:?}: a static cluster of that name exists; CDS cannot replace it",
                    r.name
                ));
                continue;
            }
            let entry = inner.clusters.get(&r.name);
            let same = |s: &Stored| s.body.value == r.body.value;
            if let Some(e) = entry
                && (e.warming.as_ref().is_some_and(|(s, _)| same(s))
                    || (e.warming.is_none() && e.active.as_ref().is_some_and(same)))
            {
                continue;
            }
            let pb: PbCluster = match weir_xds_api::unpack(&r.body) {
                Ok(c) => c,
                Err(e) => {
                    errors.push(format!("Cluster {:?}: cannot decode: {e}", r.name));
                    continue;
                }
            };
            let mut errs = Errors::default();
            let cfg = crate::upstream::translate_cluster(&pb, "", &mut errs);
            let cfg = match cfg {
                Some(c) if errs.is_empty() => c,
                _ => {
                    errors.extend(describe(CLUSTER, &r.name, errs));
                    continue;
                }
            };
            let cluster = Arc::new(Cluster::new(Arc::new(cfg), &self.store));
            self.clusters.start_cluster(&cluster);
            if let Some(eds) = &cluster.config().eds
                && let Some(e) = inner.endpoints.get(&eds.service_name)
            {
                cluster.set_endpoints(&e.endpoints);
            }
            let stored = Stored {
                version: r.version,
                last_updated: SystemTime::now(),
                body: r.body,
            };
            let name = r.name;
            let entry = inner.clusters.entry(name.clone()).or_default();
            if cluster.is_warm() && cluster.secrets_warm() {
                entry.warming = None;
                self.activate_cluster(inner, &name, stored, cluster);
            } else {
                tracing::debug!(cluster = %name, "cluster warming");
                entry.warming = Some((stored, cluster.clone()));
                self.spawn_cluster_warming(cluster);
            }
        }
        for name in removed {
            if self.static_clusters.contains(name) {
                continue;
            }
            if let Some(e) = inner.clusters.remove(name)
                && e.active.is_some()
                && self.clusters.remove(name).is_some()
            {
                self.stats.cluster_removed.increment(1);
                tracing::info!(cluster = %name, "cds: cluster removed");
            }
        }
        self.update_cluster_gauges(inner);
    }

    fn spawn_cluster_warming(self: &Arc<Self>, cluster: Arc<Cluster>) {
        let timeout = fetch_timeout(cluster.config().eds.as_ref().map(|e| &e.source));
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let warm = cluster.warm_with_secrets();
            let timed_out = match timeout {
                Some(t) => tokio::time::timeout(t, warm).await.is_err(),
                None => {
                    warm.await;
                    false
                }
            };
            if timed_out {
                tracing::warn!(cluster = %cluster.name(), "cluster warming timed out; activating with what it has");
                if let Some(d) = weak.upgrade() {
                    d.store
                        .cluster(cluster.name())
                        .counter("init_fetch_timeout")
                        .increment(1);
                }
                cluster.force_warm();
            }
            let Some(d) = weak.upgrade() else { return };
            let mut inner = d.lock();
            let name = cluster.name().to_string();
            let mine = inner
                .clusters
                .get(&name)
                .and_then(|e| e.warming.as_ref())
                .is_some_and(|(_, c)| Arc::ptr_eq(c, &cluster));
            if mine {
                if let Some((stored, c)) =
                    inner.clusters.get_mut(&name).and_then(|e| e.warming.take())
                {
                    d.activate_cluster(&mut inner, &name, stored, c);
                }
                d.update_cluster_gauges(&inner);
            }
            d.check_init(&inner);
            drop(inner);
            d.tick();
        });
    }

    fn activate_cluster(&self, inner: &mut Inner, name: &str, stored: Stored, c: Arc<Cluster>) {
        let hosts = c.hosts().len();
        let old = self.clusters.insert(c);
        if old.is_some() {
            self.stats.cluster_modified.increment(1);
            tracing::info!(cluster = %name, version = %stored.version, hosts, "cds: cluster updated");
        } else {
            self.stats.cluster_added.increment(1);
            tracing::info!(cluster = %name, version = %stored.version, hosts, "cds: cluster added");
        }
        inner.clusters.entry(name.to_string()).or_default().active = Some(stored);
    }

    fn update_cluster_gauges(&self, inner: &Inner) {
        self.stats.active_clusters.set(self.clusters.len() as f64);
        self.stats.warming_clusters.set(
            inner
                .clusters
                .values()
                .filter(|e| e.warming.is_some())
                .count() as f64,
        );
    }

    // ---- EDS ----

    fn apply_endpoints(
        &self,
        inner: &mut Inner,
        resources: Vec<Resource>,
        removed: &[String],
        errors: &mut Vec<String>,
    ) {
        let warming: Vec<Arc<Cluster>> = inner
            .clusters
            .values()
            .filter_map(|e| e.warming.as_ref().map(|(_, c)| c.clone()))
            .collect();
        let targets = |service: &str| -> Vec<Arc<Cluster>> {
            self.clusters
                .all()
                .into_iter()
                .chain(warming.iter().cloned())
                .filter(|c| {
                    c.config()
                        .eds
                        .as_ref()
                        .is_some_and(|e| e.service_name == service)
                })
                .collect()
        };
        for r in resources {
            let scope = self.store.cluster(&r.name);
            scope.counter("update_attempt").increment(1);
            if inner
                .endpoints
                .get(&r.name)
                .is_some_and(|e| e.stored.body.value == r.body.value)
            {
                scope.counter("update_no_rebuild").increment(1);
                continue;
            }
            let cla: ClusterLoadAssignment = match weir_xds_api::unpack(&r.body) {
                Ok(c) => c,
                Err(e) => {
                    errors.push(format!(
                        "ClusterLoadAssignment {:?}: cannot decode: {e}",
                        r.name
                    ));
                    scope.counter("update_rejected").increment(1);
                    continue;
                }
            };
            let mut errs = Errors::default();
            let eps = crate::upstream::translate::translate_load_assignment(
                &cla,
                DiscoveryType::Eds,
                "",
                &mut errs,
            );
            if !errs.is_empty() {
                errors.extend(describe(ENDPOINT, &r.name, errs));
                scope.counter("update_rejected").increment(1);
                continue;
            }
            if eps.is_empty() {
                scope.counter("update_empty").increment(1);
            }
            let eps = Arc::new(eps);
            for c in targets(&r.name) {
                if c.set_endpoints(&eps) {
                    self.stats.cluster_updated.increment(1);
                }
                tracing::debug!(cluster = %c.name(), hosts = c.hosts().len(), "eds: endpoints updated");
            }
            scope.counter("update_success").increment(1);
            scope.gauge("version").set(version_hash(&r.version));
            inner.endpoints.insert(
                r.name,
                EndpointsEntry {
                    stored: Stored {
                        version: r.version,
                        last_updated: SystemTime::now(),
                        body: r.body,
                    },
                    endpoints: eps,
                },
            );
        }
        for name in removed {
            if inner.endpoints.remove(name).is_some() {
                for c in targets(name) {
                    c.set_endpoints(&[]);
                }
                tracing::info!(service = %name, "eds: assignment removed; cluster has no endpoints");
            }
        }
    }

    // ---- RDS ----

    fn translate_route(
        &self,
        inner: &Inner,
        rc: &RouteConfiguration,
    ) -> Result<RouteTable, Errors> {
        let names = self.cluster_names(inner);
        let set: HashSet<&str> = names.iter().map(String::as_str).collect();
        let ctx = TranslateCtx {
            clusters: &set,
            stats: &self.store,
            rds: None,
            rds_table: true,
        };
        let mut errs = Errors::default();
        let t = RouteTable::translate(rc, "", &ctx, &mut errs);
        if errs.is_empty() { Ok(t) } else { Err(errs) }
    }

    fn apply_routes(
        &self,
        inner: &mut Inner,
        resources: Vec<Resource>,
        removed: &[String],
        errors: &mut Vec<String>,
    ) {
        for r in resources {
            let slot = self.rds.get(&r.name);
            if let Some(s) = &slot {
                s.for_each_stats(|st| st.update_attempt.increment(1));
            }
            if inner
                .routes
                .get(&r.name)
                .is_some_and(|s| s.body.value == r.body.value)
                && slot.as_ref().is_none_or(|s| s.is_ready())
            {
                continue;
            }
            let rc: RouteConfiguration = match weir_xds_api::unpack(&r.body) {
                Ok(c) => c,
                Err(e) => {
                    errors.push(format!(
                        "RouteConfiguration {:?}: cannot decode: {e}",
                        r.name
                    ));
                    continue;
                }
            };
            match self.translate_route(inner, &rc) {
                Ok(table) => {
                    if let Some(s) = &slot {
                        s.store(table);
                        s.for_each_stats(|st| {
                            st.update_success.increment(1);
                            st.config_reload.increment(1);
                            st.version.set(version_hash(&r.version));
                            if rc.virtual_hosts.is_empty() {
                                st.update_empty.increment(1);
                            }
                        });
                        tracing::info!(route_config = %r.name, version = %r.version, "rds: routes updated");
                    }
                    inner.routes.insert(
                        r.name,
                        Stored {
                            version: r.version,
                            last_updated: SystemTime::now(),
                            body: r.body,
                        },
                    );
                }
                Err(errs) => {
                    if let Some(s) = &slot {
                        s.for_each_stats(|st| st.update_rejected.increment(1));
                    }
                    errors.extend(describe(ROUTE, &r.name, errs));
                }
            }
        }
        for name in removed {
            inner.routes.remove(name);
            if let Some(s) = self.rds.get(name) {
                s.store(RouteTable::default());
                tracing::info!(route_config = %name, "rds: route config removed; its routes are empty");
            }
        }
    }

    /// Fill a new RDS slot from a route config received earlier.
    fn fill_slot(&self, inner: &Inner, slot: &RouteSlot) {
        if slot.is_ready() {
            return;
        }
        let Some(stored) = inner.routes.get(&slot.name) else {
            return;
        };
        if let Ok(rc) = weir_xds_api::unpack::<RouteConfiguration>(&stored.body)
            && let Ok(t) = self.translate_route(inner, &rc)
        {
            slot.store(t);
        }
    }

    // ---- LDS ----

    fn apply_listeners(
        self: &Arc<Self>,
        inner: &mut Inner,
        resources: Vec<Resource>,
        removed: &[String],
        errors: &mut Vec<String>,
    ) {
        for r in resources {
            if self.static_listeners.contains(&r.name) {
                errors.push(format!(
                    "Listener {:?}: a static listener of that name exists; LDS cannot replace it",
                    r.name
                ));
                continue;
            }
            let entry = inner.listeners.get(&r.name);
            let same = |s: &Stored| s.body.value == r.body.value;
            if let Some(e) = entry
                && (e.warming.as_ref().is_some_and(|w| same(&w.stored))
                    || (e.warming.is_none() && e.active.as_ref().is_some_and(same)))
            {
                continue;
            }
            let pb: PbListener = match weir_xds_api::unpack(&r.body) {
                Ok(l) => l,
                Err(e) => {
                    errors.push(format!("Listener {:?}: cannot decode: {e}", r.name));
                    continue;
                }
            };
            let names = self.cluster_names(inner);
            let set: HashSet<&str> = names.iter().map(String::as_str).collect();
            let ctx = TranslateCtx {
                clusters: &set,
                stats: &self.store,
                rds: Some(&self.rds),
                rds_table: false,
            };
            let mut errs = Errors::default();
            let cfg = crate::listener::translate_listener(&pb, "", &ctx, &mut errs);
            let cfg = match cfg {
                Some(c) if errs.is_empty() => Arc::new(c),
                _ => {
                    errors.extend(describe(LISTENER, &r.name, errs));
                    continue;
                }
            };
            let slots = route_slots(&cfg);
            for s in &slots {
                self.fill_slot(inner, s);
            }
            let name = r.name;
            let stored = Stored {
                version: r.version,
                last_updated: SystemTime::now(),
                body: r.body,
            };
            let warm = slots.iter().all(|s| s.is_ready()) && listener_secrets_ready(&cfg);
            inner.listeners.entry(name.clone()).or_default().warming = Some(WarmingListener {
                stored,
                config: cfg.clone(),
                pending: warm,
            });
            if warm {
                if inner.listeners_enabled
                    && let Err(e) = self.activate_listener(inner, &name)
                {
                    errors.push(format!("Listener {name:?}: {e}"));
                }
            } else {
                tracing::debug!(listener = %name, "listener warming (waiting for routes or SDS secrets)");
                self.spawn_listener_warming(name, cfg, slots);
            }
        }
        for name in removed {
            if self.static_listeners.contains(name) {
                continue;
            }
            if let Some(e) = inner.listeners.remove(name)
                && e.active.is_some()
                && let Some(server) = self.server.upgrade()
            {
                server.listener_manager.remove(name);
                tracing::info!(listener = %name, "lds: listener removed (draining)");
            }
        }
        self.update_listener_gauges(inner);
    }

    fn spawn_listener_warming(
        self: &Arc<Self>,
        name: String,
        cfg: Arc<ListenerConfig>,
        slots: Vec<Arc<RouteSlot>>,
    ) {
        let tls_pending = !listener_secrets_ready(&cfg);
        let timeout = slots
            .iter()
            .map(|s| fetch_timeout(s.source.as_ref()))
            .chain(tls_pending.then_some(Some(DEFAULT_INITIAL_FETCH_TIMEOUT)))
            .min()
            .flatten();
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let routes = futures::future::join_all(slots.iter().map(|s| s.ready()));
            let secrets = async {
                // SDS secrets arrive through the shared registry: polled while warming.
                while !listener_secrets_ready(&cfg) {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            };
            let all = futures::future::join(routes, secrets);
            let timed_out = match timeout {
                Some(t) => tokio::time::timeout(t, all).await.is_err(),
                None => {
                    all.await;
                    false
                }
            };
            if timed_out {
                tracing::warn!(
                    listener = %name,
                    secrets_ready = listener_secrets_ready(&cfg),
                    "listener warming timed out; routes not received serve 404, TLS handshakes fail until the secrets arrive"
                );
                for s in &slots {
                    s.force_ready();
                }
            }
            let Some(d) = weak.upgrade() else { return };
            let mut inner = d.lock();
            let mine = inner
                .listeners
                .get(&name)
                .and_then(|e| e.warming.as_ref())
                .is_some_and(|w| Arc::ptr_eq(&w.config, &cfg));
            if mine {
                if let Some(w) = inner
                    .listeners
                    .get_mut(&name)
                    .and_then(|e| e.warming.as_mut())
                {
                    w.pending = true;
                }
                if inner.listeners_enabled
                    && let Err(e) = d.activate_listener(&mut inner, &name)
                {
                    tracing::error!(listener = %name, "lds: {e}");
                }
                d.update_listener_gauges(&inner);
            }
            d.check_init(&inner);
        });
    }

    /// Hand a warm listener to the listener manager.
    fn activate_listener(&self, inner: &mut Inner, name: &str) -> Result<(), String> {
        let Some(entry) = inner.listeners.get_mut(name) else {
            return Ok(());
        };
        let Some(w) = entry.warming.take() else {
            return Ok(());
        };
        let Some(server) = self.server.upgrade() else {
            return Ok(());
        };
        match server.listener_manager.add_or_update(w.config.clone()) {
            Ok(change) => {
                tracing::info!(listener = %name, version = %w.stored.version, ?change, "lds: listener active");
                entry.active = Some(w.stored);
                Ok(())
            }
            Err(e) => {
                tracing::error!(listener = %name, error = %e, "lds: listener could not be added");
                // Keep the previous version (if any) serving; forget the failed one.
                if entry.active.is_none() {
                    inner.listeners.remove(name);
                }
                Err(e.to_string())
            }
        }
    }

    fn update_listener_gauges(&self, inner: &Inner) {
        if let Some(server) = self.server.upgrade() {
            server.listener_manager.set_warming(
                inner
                    .listeners
                    .values()
                    .filter(|e| e.warming.as_ref().is_some_and(|w| !w.pending))
                    .count(),
            );
        }
    }

    // ---- /config_dump ----

    /// Dynamic clusters: (name, active, warming).
    pub fn dump_clusters(&self) -> Vec<(String, Option<Stored>, Option<Stored>)> {
        self.lock()
            .clusters
            .iter()
            .map(|(n, e)| {
                (
                    n.clone(),
                    e.active.clone(),
                    e.warming.as_ref().map(|(s, _)| s.clone()),
                )
            })
            .collect()
    }

    /// Dynamic listeners: (name, active, warming).
    pub fn dump_listeners(&self) -> Vec<(String, Option<Stored>, Option<Stored>)> {
        self.lock()
            .listeners
            .iter()
            .map(|(n, e)| {
                (
                    n.clone(),
                    e.active.clone(),
                    e.warming.as_ref().map(|w| w.stored.clone()),
                )
            })
            .collect()
    }

    /// Dynamic route configs.
    pub fn dump_routes(&self) -> Vec<Stored> {
        self.lock().routes.values().cloned().collect()
    }

    /// Endpoint assignments received by EDS.
    pub fn dump_endpoints(&self) -> Vec<Stored> {
        self.lock()
            .endpoints
            .values()
            .map(|e| e.stored.clone())
            .collect()
    }
}
