//! Type URLs of the resources and extensions weir understands.

macro_rules! urls {
    ($($(#[$m:meta])* $name:ident = $full:literal;)*) => {
        $($(#[$m])* pub const $name: &str = concat!("type.googleapis.com/", $full);)*
        /// Every URL above.
        pub const ALL: &[&str] = &[$($name),*];
    };
}

urls! {
    /// LDS resource.
    LISTENER = "envoy.config.listener.v3.Listener";
    /// RDS resource.
    ROUTE_CONFIGURATION = "envoy.config.route.v3.RouteConfiguration";
    /// CDS resource.
    CLUSTER = "envoy.config.cluster.v3.Cluster";
    /// EDS resource.
    CLUSTER_LOAD_ASSIGNMENT = "envoy.config.endpoint.v3.ClusterLoadAssignment";
    /// SDS resource.
    SECRET = "envoy.extensions.transport_sockets.tls.v3.Secret";
    /// Network filter: HTTP connection manager.
    HTTP_CONNECTION_MANAGER = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    /// Network filter: TCP proxy.
    TCP_PROXY = "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
    /// HTTP filter: router.
    ROUTER = "envoy.extensions.filters.http.router.v3.Router";
    /// Cluster extension protocol options (upstream HTTP/2 etc.).
    HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
    /// Listener filter: TLS inspector.
    TLS_INSPECTOR = "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
}
