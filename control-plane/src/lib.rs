//! # weir-control-plane
//!
//! `weir-cp`, weir's companion control plane: an Envoy xDS v3 management server (ADS, state of
//! the world and delta) fed by operator-applied Envoy config, with a config API, history and
//! rollback, persistence, and Prometheus metrics. See `docs/design/xds-server.md` for the design.
//!
//! ## Layout
//! - [`resource`]: resources, content-hash versions, push order.
//! - [`cache`]: [`cache::Source`] (the plug-in point for the service registry) and the
//!   per-node-group [`cache::SnapshotCache`].
//! - [`operator`]: the operator's config as a source: targets, layering, versions, history,
//!   rollback, persisted in [`storage`].
//! - [`validate`]: document parsing and validation through weir's own translators.
//! - [`ads`]: the `AggregatedDiscoveryService` (SotW and delta).
//! - [`status`], [`metrics`]: connected proxies, ACK/NACK records, Prometheus text.
//! - [`api`]: the HTTP/JSON config API and its client (used by the CLI).
//! - [`configdir`]: `--config-dir` polling (GitOps).
//! - [`kv`]: the KV store (`weir.kv.v1`: KV, Watch, Lease), served on the gRPC server.
//! - [`registry`]: the service registry (gRPC `weir.registry.v1`), the first cache source,
//!   turning registered services into EDS clusters.
//! - [`settings`]: the `--config` file (auth tokens, S3 access keys).
//! - [`auth`]: authentication (bearer tokens, mTLS client certificates) and scopes for every
//!   API: one tower layer around the whole gRPC router, a check in the HTTP API; open mode
//!   only on loopback.
//! - [`etcd`]: the etcd backends of the registry, the KV store and the operator config
//!   (`--store etcd://…`, [`ControlPlane::open_etcd`]); replicas on one etcd share state.
//! - [`objects`]: the object store, its gRPC API and the S3-compatible endpoint
//!   (`RunOptions::s3`).
//! - [`ca`]: the mesh CA: a cache source serving workload certificates (SPIFFE IDs from node
//!   metadata) and the trust bundle as SDS secrets `default` / `ROOTCA`, rotated at half
//!   life.
//! - [`inject`]: the Kubernetes sidecar injector, a mutating admission webhook over TLS
//!   (`serve --webhook-address`, settings `inject:`).
//! - this file: [`ControlPlane`] (the shared state) and [`run`] / [`serve`].
//!
//! ## gRPC server
//! One tonic server on the xDS address (accepted connections with `TCP_NODELAY`, see
//! [`grpc_incoming`]) carries `grpc.health.v1.Health` (SERVING for `""`,
//! [`SERVICE_NAME`] and the ADS service), ADS, the registry, the KV services
//! (`weir.kv.v1.KV`, `Watch`, `Lease`) and `weir.objects.v1.Objects`, with the message limits below and HTTP/2 keepalives
//! so dead clients are noticed. Shutdown ends every ADS, watch and keep-alive stream, then the
//! server. Every call passes [`auth::grpc::AuthLayer`] first (health is open); with
//! `auth.tls` the server speaks TLS (and accepts client certificates with a client CA).
#![forbid(unsafe_code)]

pub mod ads;
pub mod api;
pub mod auth;
pub mod ca;
pub mod cache;
pub mod configdir;
pub mod etcd;
pub mod http_server;
pub mod inject;
pub mod kv;
pub mod metrics;
pub mod objects;
pub mod operator;
pub mod proto;
pub mod ratelimit;
pub mod registry;
pub mod resource;
pub mod settings;
pub mod status;
pub mod storage;
pub mod validate;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use weir_xds_api::Any;
use weir_xds_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;

use crate::cache::{SnapshotCache, Source};
use crate::metrics::Metrics;
use crate::operator::{ApplyError, OperatorConfig, Target, VersionInfo};
use crate::status::StatusRegistry;
use crate::storage::Store;

/// Largest gRPC message the server accepts, in bytes (4 MiB, gRPC's usual default, made
/// explicit). Requests to a control plane are small; anything larger is refused with
/// an error status (`OUT_OF_RANGE`, as tonic reports it) that ends the stream, rather than buffered.
pub const MAX_DECODING_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// Largest gRPC message the server sends, in bytes (16 MiB). xDS responses carrying a whole
/// mesh's clusters or endpoints can exceed 4 MiB; Envoy accepts large messages by default.
pub const MAX_ENCODING_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// The service name `weir-cp` reports as `SERVING` in `grpc.health.v1.Health`.
pub const SERVICE_NAME: &str = "weir-cp";

/// The ADS service name (also reported `SERVING`).
pub const ADS_SERVICE_NAME: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";

/// Errors running the control plane.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The gRPC server failed (accepting or serving connections).
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The store could not be opened or loaded.
    #[error("store: {0}")]
    Store(#[from] storage::StoreError),
    /// The stored config could not be loaded.
    #[error("loading the stored config: {0}")]
    Load(#[from] ApplyError),
    /// The KV store could not be opened.
    #[error("KV store: {0}")]
    Kv(#[from] kv::KvError),
    /// The service registry could not be loaded.
    #[error("loading the service registry: {0}")]
    Registry(#[from] registry::RegistryError),
    /// The `auth:` settings cannot be used, or no credentials on a non-loopback address.
    #[error("{0}")]
    Auth(#[from] auth::AuthConfigError),
    /// Invalid `limits:` settings.
    #[error("{0}")]
    Limits(#[from] ratelimit::LimitError),
    /// A listener's address could not be read.
    #[error("reading a listening address: {0}")]
    Listener(#[source] std::io::Error),
    /// etcd could not be reached (`--store etcd://`).
    #[error("{0}")]
    Etcd(#[from] etcd::EtcdError),
    /// The object store could not be opened.
    #[error("object store: {0}")]
    Objects(#[from] objects::ObjError),
    /// The mesh CA could not start (`ca:` settings, root).
    #[error("{0}")]
    Ca(#[from] ca::CaError),
}

/// The control plane's shared state.
#[derive(Debug)]
pub struct ControlPlane {
    /// The operator's config (a source of the cache).
    pub operator: Arc<OperatorConfig>,
    /// Snapshots per node group.
    pub cache: Arc<SnapshotCache>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Connected proxies and NACKs.
    pub status: Arc<StatusRegistry>,
    /// The embedded store (shared with future subsystems).
    pub store: Arc<Store>,
    /// The KV store (tables `kv.*` of `store`, or etcd with `--store etcd://`).
    pub kv: Arc<kv::AnyKv>,
    /// The service registry (the first cache source).
    pub registry: Arc<registry::Registry>,
    /// The etcd connection when state lives in etcd (`--store etcd://`).
    pub etcd: Option<Arc<etcd::Etcd>>,
    /// Cancels the etcd watches when the control plane is dropped.
    _etcd_watches: Option<tokio_util::sync::DropGuard>,
    /// The object store (metadata in `store`, bytes under `<data-dir>/objects/`).
    pub objects: Arc<dyn objects::ObjectBackend>,
    /// The object store's metrics (also a collector of `metrics`).
    pub objects_metrics: Arc<objects::metrics::ObjectsMetrics>,
    /// The mesh CA (a cache source serving SDS secrets; configured by [`run`]).
    pub ca: Arc<ca::CaSource>,
}

impl ControlPlane {
    /// Open the control plane with its store under `data_dir` (in memory when `None`).
    pub fn open(data_dir: Option<&Path>) -> Result<Arc<Self>, Error> {
        let store = match data_dir {
            Some(d) => Store::open(d)?,
            None => Store::in_memory()?,
        };
        let objects_dir = data_dir.map(|d| d.join(objects::OBJECTS_DIR));
        Self::build(Arc::new(store), Vec::new(), objects_dir.as_deref(), None)
    }

    /// Open with the stores of `serve`'s flags: `store` (`--store etcd://…`) or the embedded
    /// store under `data_dir`, and objects in `objects` (`--objects s3://…`, shared by the
    /// replicas) or, without it, embedded beside the store (per replica with etcd).
    pub fn open_stores(
        data_dir: Option<&Path>,
        store: Option<&str>,
        objects: Option<Arc<dyn objects::ObjectBackend>>,
    ) -> Result<Arc<Self>, Error> {
        if let Some(url) = store {
            return Self::open_etcd_with(url, objects);
        }
        let st = match data_dir {
            Some(d) => Store::open(d)?,
            None => Store::in_memory()?,
        };
        let objects_dir = data_dir.map(|d| d.join(objects::OBJECTS_DIR));
        Self::build(Arc::new(st), Vec::new(), objects_dir.as_deref(), objects)
    }

    /// Open over `store`, with the service registry (kept in `store`) first, then `sources`,
    /// then the operator's config, which therefore overrides resources of the same type and
    /// name.
    pub fn with_sources(
        store: Arc<Store>,
        sources: Vec<Arc<dyn Source>>,
    ) -> Result<Arc<Self>, Error> {
        Self::build(store, sources, None, None)
    }

    /// [`Self::with_sources`], with object bytes under `objects_dir` (a temp dir when `None`),
    /// or in `remote_objects`.
    fn build(
        store: Arc<Store>,
        mut sources: Vec<Arc<dyn Source>>,
        objects_dir: Option<&Path>,
        remote_objects: Option<Arc<dyn objects::ObjectBackend>>,
    ) -> Result<Arc<Self>, Error> {
        let registry = registry::Registry::embedded(store.clone())?;
        sources.insert(0, registry.clone());
        let ca = Arc::new(ca::CaSource::default());
        sources.insert(1, ca.clone());
        let operator = Arc::new(OperatorConfig::open(store.clone())?);
        sources.push(operator.clone());
        let metrics = Arc::new(Metrics::default());
        metrics.add_collector(registry.clone());
        metrics.set_config_version(operator.latest_version());
        let kv = Arc::new(kv::AnyKv::Embedded(kv::EmbeddedKv::open(
            store.clone(),
            metrics.clone(),
        )?));
        let objects: Arc<dyn objects::ObjectBackend> = match remote_objects {
            Some(o) => o,
            None => Arc::new(objects::EmbeddedObjects::open(store.clone(), objects_dir)?),
        };
        let objects_metrics = Arc::new(objects::metrics::ObjectsMetrics::new(objects.clone()));
        metrics.add_collector(objects_metrics.clone());
        Ok(Arc::new(ControlPlane {
            operator,
            cache: SnapshotCache::new(sources),
            metrics,
            status: Arc::new(StatusRegistry::default()),
            store,
            kv,
            registry,
            etcd: None,
            _etcd_watches: None,
            objects,
            objects_metrics,
            ca,
        }))
    }

    /// Open with registry, KV and config in etcd (`url` as `--store etcd://…`): several
    /// replicas on the same etcd and prefix share one state. Blocking (connects to etcd).
    /// The in-memory `store` is left for subsystems without an etcd backend.
    pub fn open_etcd(url: &str) -> Result<Arc<Self>, Error> {
        Self::open_etcd_with(url, None)
    }

    /// [`Self::open_etcd`] with objects in `remote_objects` (shared by the replicas); without
    /// it objects stay in a temporary directory of this replica.
    fn open_etcd_with(
        url: &str,
        remote_objects: Option<Arc<dyn objects::ObjectBackend>>,
    ) -> Result<Arc<Self>, Error> {
        let url: etcd::EtcdUrl = url.parse()?;
        let client = etcd::Etcd::connect(&url)?;
        let store = Arc::new(Store::in_memory()?);
        let reg_backend = etcd::registry::EtcdRegistryBackend::new(client.clone());
        let registry = registry::Registry::open(Arc::new(reg_backend.clone()))?;
        let config_store = etcd::config::EtcdConfigStore::new(client.clone());
        let operator = Arc::new(OperatorConfig::open_backend(
            operator::ConfigBackend::Etcd(config_store.clone()),
        )?);
        let ca = Arc::new(ca::CaSource::default());
        let sources: Vec<Arc<dyn Source>> = vec![registry.clone(), ca.clone(), operator.clone()];
        let metrics = Arc::new(Metrics::default());
        metrics.add_collector(registry.clone());
        metrics.set_config_version(operator.latest_version());
        let kv = Arc::new(kv::AnyKv::Etcd(etcd::kv::EtcdKv::new(client.clone())));
        // Without --objects, objects live in this replica's temporary directory (not shared,
        // not durable); --objects s3://… shares them between the replicas.
        let objects: Arc<dyn objects::ObjectBackend> = match remote_objects {
            Some(o) => o,
            None => {
                tracing::warn!(
                    "--store etcd without --objects: the object store is kept in a temporary \
                     directory on this replica (not shared, not durable); use --objects s3://…"
                );
                Arc::new(objects::EmbeddedObjects::open(store.clone(), None)?)
            }
        };
        let objects_metrics = Arc::new(objects::metrics::ObjectsMetrics::new(objects.clone()));
        metrics.add_collector(objects_metrics.clone());
        let token = tokio_util::sync::CancellationToken::new();
        let cp = Arc::new(ControlPlane {
            operator,
            cache: SnapshotCache::new(sources),
            metrics,
            status: Arc::new(StatusRegistry::default()),
            store,
            kv,
            registry,
            etcd: Some(client),
            _etcd_watches: Some(token.clone().drop_guard()),
            objects,
            objects_metrics,
            ca,
        });
        // Follow other replicas: registry changes resync the in-memory registry (EDS pushes
        // follow its revision), config changes reload the operator config (the cache
        // invalidates on its change counter). Both stop when the control plane is dropped
        // (`etcd_watches`).
        reg_backend.spawn_watch(Arc::downgrade(&cp.registry), token.clone());
        let weak = Arc::downgrade(&cp);
        let from = match cp.operator.reload()? {
            Some(rev) => rev + 1,
            None => 0,
        };
        config_store.spawn_watch(
            from,
            move || {
                let cp = weak.upgrade()?;
                match cp.operator.reload() {
                    Ok(rev) => {
                        cp.metrics.set_config_version(cp.operator.latest_version());
                        rev
                    }
                    Err(e) => {
                        tracing::warn!("reloading the config from etcd: {e}");
                        None
                    }
                }
            },
            token.clone(),
        );
        Ok(cp)
    }

    fn outcome(
        &self,
        target: &Target,
        r: Result<VersionInfo, ApplyError>,
    ) -> Result<VersionInfo, ApplyError> {
        match &r {
            Ok(info) => {
                self.metrics.config_applied(info.version);
                tracing::info!(
                    %target,
                    version = info.version,
                    origin = %info.origin,
                    resources = info.resources.len(),
                    "config applied"
                );
            }
            Err(ApplyError::Invalid(errs)) => {
                self.metrics.config_rejected();
                tracing::info!(%target, errors = errs.len(), "config refused");
            }
            Err(e) => tracing::warn!(%target, "config apply failed: {e}"),
        }
        r
    }

    /// Validate and apply packed resources to `target` (blocking: validation and a durable
    /// commit).
    pub fn apply(
        &self,
        target: Target,
        resources: Vec<Any>,
        origin: &str,
    ) -> Result<VersionInfo, ApplyError> {
        let r = self.operator.apply(target.clone(), resources, origin);
        self.outcome(&target, r)
    }

    /// Parse a document (YAML/JSON) and apply it (blocking).
    pub fn apply_text(
        &self,
        target: Target,
        text: &str,
        origin: &str,
    ) -> Result<VersionInfo, ApplyError> {
        match validate::parse_document(text) {
            Ok(resources) => self.apply(target, resources, origin),
            Err(errs) => self.outcome(&target, Err(ApplyError::Invalid(errs))),
        }
    }

    /// Re-apply an earlier version as a new one (blocking).
    pub fn rollback(&self, version: u64) -> Result<VersionInfo, ApplyError> {
        let r = self.operator.rollback(version);
        let target = r.as_ref().map(|i| i.target.clone()).unwrap_or(Target::All);
        self.outcome(&target, r)
    }
}

/// Optional parts of [`run`].
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Serve the config API (and `/metrics`) here.
    pub api: Option<tokio::net::TcpListener>,
    /// Poll this directory for config (see [`configdir`]), at this interval.
    pub config_dir: Option<(PathBuf, Duration)>,
    /// The `--config` file's settings (auth, S3).
    pub settings: settings::Settings,
    /// Serve the S3-compatible object API here (see [`objects::s3`]).
    pub s3: Option<tokio::net::TcpListener>,
}

/// Run the control plane: ADS and health on `xds`, plus whatever `opts` asks for, until
/// `shutdown` completes; then end the xDS streams, stop accepting and return.
pub async fn run(
    cp: Arc<ControlPlane>,
    xds: tokio::net::TcpListener,
    opts: RunOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    // Authentication first: a server that may not run (open on a non-loopback address, bad
    // credentials or TLS files) must not start anything.
    let authn = Arc::new(auth::Authenticator::from_settings(&opts.settings.auth)?);
    let server_tls = opts
        .settings
        .auth
        .tls
        .as_ref()
        .map(auth::tls::ServerTls::load)
        .transpose()?;
    let mut addrs = vec![xds.local_addr().map_err(Error::Listener)?];
    if let Some(api) = &opts.api {
        addrs.push(api.local_addr().map_err(Error::Listener)?);
    }
    if auth::open_mode(!authn.is_open(), &addrs)? {
        tracing::warn!(
            addresses = ?addrs,
            "weir-cp is running WITHOUT authentication: every API is open to anyone who can \
             reach these loopback addresses; configure auth.tokens or auth.client_certs in \
             the --config file before exposing it"
        );
    } else if server_tls.is_none() && addrs.iter().any(|a| !a.ip().is_loopback()) {
        tracing::warn!(
            addresses = ?addrs,
            "weir-cp auth is configured without auth.tls: bearer tokens travel in cleartext"
        );
    }
    cp.metrics.add_collector(authn.clone());
    let limiter = Arc::new(ratelimit::RequestLimiter::new(&opts.settings.limits)?);
    cp.metrics.add_collector(limiter.clone());
    // The mesh CA: load or create the root (shared through etcd with `--store etcd`).
    let root_store = match &cp.etcd {
        Some(etcd) => ca::RootStore::Etcd(etcd.clone()),
        None => ca::RootStore::Embedded(cp.store.clone()),
    };
    cp.ca.configure(&opts.settings.ca, &root_store)?;
    cp.metrics.add_collector(cp.ca.clone());
    let token = CancellationToken::new();
    cp.cache.watch_sources();
    let (reporter, health) = tonic_health::server::health_reporter();
    // `""` is SERVING from the start (health_reporter's default).
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(ADS_SERVICE_NAME, ServingStatus::Serving)
        .await;
    let health = health
        .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_ENCODING_MESSAGE_SIZE);
    let ads = AggregatedDiscoveryServiceServer::new(
        ads::AdsService::new(
            cp.cache.clone(),
            cp.metrics.clone(),
            cp.status.clone(),
            token.clone(),
        )
        .with_ca(cp.ca.clone()),
    )
    .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
    .max_encoding_message_size(MAX_ENCODING_MESSAGE_SIZE);
    // The service registry: health driver and checks, and its gRPC service.
    cp.registry.start(token.clone());
    reporter
        .set_service_status(registry::SERVICE, ServingStatus::Serving)
        .await;
    let registry_service = registry::grpc::server(cp.registry.clone(), token.clone());

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(cp.ca.clone().run_rotation(token.clone())));
    tasks.extend(limiter.spawn_sweeper(token.clone()));
    // The KV store: its services (one place, for an auth layer to wrap) and lease expiry.
    let kv = kv::service::services(cp.kv.clone(), cp.metrics.clone(), token.clone());
    tasks.extend(cp.kv.spawn_expiry(token.clone()));
    // The object store: its gRPC service (built in one place) and the S3 endpoint.
    let objects_service = objects::grpc::server(cp.objects.clone(), cp.objects_metrics.clone());
    // The HTTP endpoints (API, S3) are HTTPS whenever the gRPC port is (`auth.tls`).
    let http_tls = server_tls
        .as_ref()
        .map(auth::tls::ServerTls::http_acceptor)
        .transpose()?;
    if let Some(s3) = opts.s3 {
        let endpoint = objects::s3::S3::new(
            cp.objects.clone(),
            &opts.settings.s3,
            cp.objects_metrics.clone(),
        );
        tasks.push(tokio::spawn(objects::s3::serve(
            endpoint,
            s3,
            http_tls.clone(),
            limiter.clone(),
            token.clone(),
        )));
    }
    if let Some(api) = opts.api {
        tasks.push(tokio::spawn(api::serve_with(
            cp.clone(),
            api,
            authn.clone(),
            limiter.clone(),
            http_tls,
            token.clone(),
        )));
    }
    if let Some((dir, interval)) = opts.config_dir {
        tasks.push(tokio::spawn(configdir::watch(
            cp.clone(),
            dir,
            interval,
            token.clone(),
        )));
    }
    let stop = token.clone();
    let mut builder = Server::builder();
    if let Some(tls) = &server_tls {
        builder = builder.tls_config(tls.tonic())?;
    }
    let result = builder
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Every gRPC service below is behind these layers: the per-client request rate
        // (outermost, so bad credentials are limited too), then auth (method -> scope table).
        .layer(ratelimit::GrpcLimitLayer::new(limiter.clone()))
        .layer(auth::grpc::AuthLayer::new(authn.clone()))
        .add_service(health)
        .add_service(ads)
        .add_service(kv.kv)
        .add_service(kv.watch)
        .add_service(kv.lease)
        .add_service(registry_service)
        .add_service(objects_service)
        .serve_with_incoming_shutdown(grpc_incoming(xds), async move {
            shutdown.await;
            stop.cancel();
        })
        .await;
    token.cancel();
    for t in tasks {
        let _ = t.await;
    }
    result?;
    Ok(())
}

/// The gRPC server's accepted connections, with `TCP_NODELAY` on each.
///
/// Without it a small response written in pieces (headers, data, trailers) meets Nagle's
/// algorithm on this side and a delayed ACK on the client's: every unary call then takes
/// ~40 ms on loopback. (`Server::tcp_nodelay` only applies to servers tonic binds itself; an
/// incoming stream brings its own socket options.)
pub fn grpc_incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serve an in-memory control plane (no API, no persistence) on `listener` until `shutdown`
/// completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let cp = ControlPlane::open(None)?;
    run(cp, listener, RunOptions::default(), shutdown).await
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;

    /// Every accepted gRPC connection has `TCP_NODELAY` (no 40 ms Nagle/delayed-ACK stalls).
    #[tokio::test]
    async fn grpc_connections_are_accepted_with_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = super::grpc_incoming(listener);
        for _ in 0..2 {
            let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let accepted =
                tokio::time::timeout(std::time::Duration::from_secs(10), incoming.next())
                    .await
                    .expect("accepted in time")
                    .expect("incoming open")
                    .expect("accept");
            assert!(
                accepted.nodelay().expect("nodelay"),
                "TCP_NODELAY on the accepted socket"
            );
            drop(client);
        }
    }
}
