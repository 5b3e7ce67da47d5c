//! gRPC: the method → scope table and [`AuthLayer`], the tower layer `run()` wraps around the
//! whole tonic router. Refusals are answered by the layer itself (UNAUTHENTICATED /
//! PERMISSION_DENIED) before the service sees the request, so nothing is read or written;
//! allowed requests carry their [`Identity`] in the request extensions.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::{Authenticator, Required, Scope};

/// The ADS service (both SotW and delta methods need `xds:read`).
pub const ADS: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";

/// Every gRPC method weir-cp serves (`package.Service`, method) and what it needs. A unit
/// test checks this against every `rpc` of `proto/weir/**.proto`.
pub const METHODS: &[(&str, &str, Required)] = &[
    // xDS.
    (
        ADS,
        "StreamAggregatedResources",
        Required::Scope(Scope::XdsRead),
    ),
    (
        ADS,
        "DeltaAggregatedResources",
        Required::Scope(Scope::XdsRead),
    ),
    // Health is open (load balancers and orchestrators probe it).
    ("grpc.health.v1.Health", "Check", Required::Nothing),
    ("grpc.health.v1.Health", "Watch", Required::Nothing),
    // KV.
    ("weir.kv.v1.KV", "Range", Required::Scope(Scope::KvRead)),
    ("weir.kv.v1.KV", "Put", Required::Scope(Scope::KvWrite)),
    (
        "weir.kv.v1.KV",
        "DeleteRange",
        Required::Scope(Scope::KvWrite),
    ),
    ("weir.kv.v1.KV", "Txn", Required::Scope(Scope::KvWrite)),
    ("weir.kv.v1.KV", "Compact", Required::Scope(Scope::KvWrite)),
    ("weir.kv.v1.Watch", "Watch", Required::Scope(Scope::KvRead)),
    (
        "weir.kv.v1.Lease",
        "LeaseGrant",
        Required::Scope(Scope::KvWrite),
    ),
    (
        "weir.kv.v1.Lease",
        "LeaseRevoke",
        Required::Scope(Scope::KvWrite),
    ),
    (
        "weir.kv.v1.Lease",
        "LeaseKeepAlive",
        Required::Scope(Scope::KvWrite),
    ),
    (
        "weir.kv.v1.Lease",
        "LeaseTimeToLive",
        Required::Scope(Scope::KvWrite),
    ),
    (
        "weir.kv.v1.Lease",
        "LeaseLeases",
        Required::Scope(Scope::KvWrite),
    ),
    // Registry: writes need registry:write, reads any authenticated identity.
    (
        "weir.registry.v1.Registry",
        "Register",
        Required::Scope(Scope::RegistryWrite),
    ),
    (
        "weir.registry.v1.Registry",
        "Deregister",
        Required::Scope(Scope::RegistryWrite),
    ),
    (
        "weir.registry.v1.Registry",
        "Heartbeat",
        Required::Scope(Scope::RegistryWrite),
    ),
    ("weir.registry.v1.Registry", "List", Required::Authenticated),
    ("weir.registry.v1.Registry", "Get", Required::Authenticated),
    (
        "weir.registry.v1.Registry",
        "Services",
        Required::Authenticated,
    ),
    (
        "weir.registry.v1.Registry",
        "Watch",
        Required::Authenticated,
    ),
    // Objects: reads need objects:read, writes objects:write.
    (
        "weir.objects.v1.Objects",
        "CreateBucket",
        Required::Scope(Scope::ObjectsWrite),
    ),
    (
        "weir.objects.v1.Objects",
        "DeleteBucket",
        Required::Scope(Scope::ObjectsWrite),
    ),
    (
        "weir.objects.v1.Objects",
        "ListBuckets",
        Required::Scope(Scope::ObjectsRead),
    ),
    (
        "weir.objects.v1.Objects",
        "PutObject",
        Required::Scope(Scope::ObjectsWrite),
    ),
    (
        "weir.objects.v1.Objects",
        "GetObject",
        Required::Scope(Scope::ObjectsRead),
    ),
    (
        "weir.objects.v1.Objects",
        "HeadObject",
        Required::Scope(Scope::ObjectsRead),
    ),
    (
        "weir.objects.v1.Objects",
        "DeleteObject",
        Required::Scope(Scope::ObjectsWrite),
    ),
    (
        "weir.objects.v1.Objects",
        "ListObjects",
        Required::Scope(Scope::ObjectsRead),
    ),
];

/// What the gRPC call at `path` (`/package.Service/Method`) needs; [`Required::Unknown`] for
/// a path not in [`METHODS`].
pub fn required_for(path: &str) -> Required {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return Required::Unknown;
    };
    METHODS
        .iter()
        .find(|(s, m, _)| *s == service && *m == method)
        .map_or(Required::Unknown, |(_, _, r)| *r)
}

/// The tower layer checking every gRPC call (see the module docs).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
}

impl AuthLayer {
    /// A layer checking with `auth`.
    pub fn new(auth: Arc<Authenticator>) -> Self {
        AuthLayer { auth }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// [`AuthLayer`]'s service.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

/// The verified client certificates of the connection a request came on (TLS only).
fn peer_certs<B>(req: &http::Request<B>) -> Option<Arc<Vec<CertificateDer<'static>>>> {
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for AuthService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(
        &mut self,
        mut req: http::Request<B>,
    ) -> Either<Ready<Result<S::Response, S::Error>>, S::Future> {
        let path = req.uri().path().to_string();
        let required = required_for(&path);
        let identity = if required == Required::Nothing {
            Ok(super::Identity::anonymous())
        } else {
            let certs = peer_certs(&req);
            self.auth.authenticate(
                req.headers().get(http::header::AUTHORIZATION),
                certs.as_deref().map(|c| c.as_slice()),
            )
        };
        match self.auth.authorize(identity, required, &path) {
            Ok(id) => {
                req.extensions_mut().insert(id);
                Either::Right(self.inner.call(req))
            }
            Err(denied) => Either::Left(ready(Ok(denied.to_status().into_http()))),
        }
    }
}
