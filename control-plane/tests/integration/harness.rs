//! Shared helpers: an in-process weir-cp (xDS + API on 127.0.0.1:0), tonic ADS clients for
//! both protocols, config documents, and the `weir-cp` binary as a child process.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tonic::Streaming;
use weir_control_plane::ControlPlane;
use weir_control_plane::operator::{Target, VersionInfo};
use weir_xds_api::pb::envoy::config::core::v3::Node;
use weir_xds_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weir_xds_api::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};

pub use weir_xds_api::type_urls::{
    CLUSTER as CDS, CLUSTER_LOAD_ASSIGNMENT as EDS, LISTENER as LDS, ROUTE_CONFIGURATION as RDS,
};

/// How long any single expected event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// An in-process control plane.
pub struct Server {
    pub xds: SocketAddr,
    pub api: SocketAddr,
    pub cp: Arc<ControlPlane>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), weir_control_plane::Error>>>,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(ControlPlane::open(None).expect("control plane")).await
    }

    pub async fn start_with(cp: Arc<ControlPlane>) -> Server {
        let xds = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind xds");
        let api = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind api");
        let (xds_addr, api_addr) = (
            xds.local_addr().expect("addr"),
            api.local_addr().expect("addr"),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(weir_control_plane::run(
            cp.clone(),
            xds,
            weir_control_plane::RunOptions {
                api: Some(api),
                config_dir: None,
                settings: Default::default(),
                s3: None,
            },
            async {
                let _ = stopped.await;
            },
        ));
        Server {
            xds: xds_addr,
            api: api_addr,
            cp,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Apply a document to every node; panics with the field errors if refused.
    pub fn apply(&self, doc: &str) -> VersionInfo {
        self.apply_to(Target::All, doc)
    }

    pub fn apply_to(&self, target: Target, doc: &str) -> VersionInfo {
        match self.cp.apply_text(target, doc, "test") {
            Ok(v) => v,
            Err(e) => panic!("apply failed: {e}"),
        }
    }

    /// Stop the server and wait for it (bounded).
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t)
                .await
                .expect("server stops")
                .expect("server task")
                .expect("server result");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub fn node(id: &str, cluster: &str) -> Node {
    Node {
        id: id.into(),
        cluster: cluster.into(),
        ..Default::default()
    }
}

async fn client(addr: SocketAddr) -> AggregatedDiscoveryServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(WAIT)
        .connect()
        .await
        .expect("connect");
    AggregatedDiscoveryServiceClient::new(channel)
}

/// A state-of-the-world ADS stream.
pub struct Sotw {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

/// Build a SotW request.
pub fn req(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: type_url.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

/// A NACK of `resp` (keeping `prev_version`, as a client does).
pub fn nack(
    resp: &DiscoveryResponse,
    names: &[&str],
    prev_version: &str,
    msg: &str,
) -> DiscoveryRequest {
    DiscoveryRequest {
        error_detail: Some(weir_xds_api::pb::google::rpc::Status {
            code: 3,
            message: msg.into(),
            details: vec![],
        }),
        ..req(&resp.type_url, names, prev_version, &resp.nonce)
    }
}

/// The ACK of `resp`.
pub fn ack(resp: &DiscoveryResponse, names: &[&str]) -> DiscoveryRequest {
    req(&resp.type_url, names, &resp.version_info, &resp.nonce)
}

impl Sotw {
    /// Open a stream; the first request sent through [`Sotw::send_first`] carries the node.
    pub async fn connect(addr: SocketAddr) -> Sotw {
        let (tx, rx) = mpsc::channel(16);
        let resp = client(addr)
            .await
            .stream_aggregated_resources(tokio_stream_from(rx))
            .await
            .expect("open SotW stream");
        Sotw {
            tx,
            rx: resp.into_inner(),
        }
    }

    pub async fn send(&self, r: DiscoveryRequest) {
        self.tx.send(r).await.expect("stream open");
    }

    /// Send `r` with `node` set.
    pub async fn send_first(&self, node: Node, mut r: DiscoveryRequest) {
        r.node = Some(node);
        self.send(r).await;
    }

    pub async fn recv(&mut self) -> DiscoveryResponse {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => panic!("stream closed"),
            Ok(Err(s)) => panic!("stream error: {s}"),
            Err(_) => panic!("no response within {WAIT:?}"),
        }
    }

    /// The gRPC status the stream ends with.
    pub async fn recv_error(&mut self) -> tonic::Status {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Err(s)) => s,
            Ok(Ok(m)) => panic!("expected an error, got {m:?}"),
            Err(_) => panic!("no error within {WAIT:?}"),
        }
    }

    /// Assert nothing arrives within `d` (used only where no later event can prove it).
    pub async fn assert_quiet(&mut self, d: Duration) {
        if let Ok(m) = tokio::time::timeout(d, self.rx.message()).await {
            panic!("expected no response, got {m:?}");
        }
    }
}

/// A delta ADS stream.
pub struct Delta {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

pub fn dreq(type_url: &str, sub: &[&str], unsub: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.into(),
        resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
        resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

impl Delta {
    pub async fn connect(addr: SocketAddr) -> Delta {
        let (tx, rx) = mpsc::channel(16);
        let resp = client(addr)
            .await
            .delta_aggregated_resources(tokio_stream_from(rx))
            .await
            .expect("open delta stream");
        Delta {
            tx,
            rx: resp.into_inner(),
        }
    }

    pub async fn send(&self, r: DeltaDiscoveryRequest) {
        self.tx.send(r).await.expect("stream open");
    }

    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => panic!("stream closed"),
            Ok(Err(s)) => panic!("stream error: {s}"),
            Err(_) => panic!("no response within {WAIT:?}"),
        }
    }

    pub async fn assert_quiet(&mut self, d: Duration) {
        if let Ok(m) = tokio::time::timeout(d, self.rx.message()).await {
            panic!("expected no response, got {m:?}");
        }
    }
}

fn tokio_stream_from<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> tonic::codegen::tokio_stream::wrappers::ReceiverStream<T> {
    tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Names of the resources in a SotW response, sorted.
pub fn names(r: &DiscoveryResponse) -> Vec<String> {
    let mut v: Vec<String> = r
        .resources
        .iter()
        .map(|a| weir_control_plane::resource::resource_name(a).expect("known resource"))
        .collect();
    v.sort();
    v
}

/// Names of the resources in a delta response, sorted.
pub fn dnames(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let mut v: Vec<String> = r.resources.iter().map(|x| x.name.clone()).collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// Documents

pub fn doc(resources: &[String]) -> String {
    let mut s = String::from("resources:\n");
    if resources.is_empty() {
        return "resources: []\n".into();
    }
    for r in resources {
        s.push_str(r);
    }
    s
}

pub fn static_cluster(name: &str, port: u16) -> String {
    format!(
        r#"- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: {name}
  connect_timeout: 1s
  load_assignment:
    cluster_name: {name}
    endpoints:
    - lb_endpoints:
      - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
"#
    )
}

pub fn eds_cluster(name: &str, timeout_s: u32) -> String {
    format!(
        r#"- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: {name}
  type: EDS
  connect_timeout: {timeout_s}s
  eds_cluster_config: {{eds_config: {{ads: {{}}}}}}
"#
    )
}

pub fn cla(name: &str, ports: &[u16]) -> String {
    let mut s = format!(
        r#"- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: {name}
  endpoints:
  - lb_endpoints:
"#
    );
    for p in ports {
        s.push_str(&format!(
            "    - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}\n"
        ));
    }
    s
}

pub fn routes(name: &str, cluster: &str, prefix: &str) -> String {
    format!(
        r#"- "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
  name: {name}
  virtual_hosts:
  - name: all
    domains: ["*"]
    routes:
    - match: {{prefix: "{prefix}"}}
      route: {{cluster: {cluster}}}
"#
    )
}

pub fn listener(name: &str, port: u16, route_name: &str, stat_prefix: &str) -> String {
    format!(
        r#"- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: {name}
  address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: {stat_prefix}
        rds: {{route_config_name: {route_name}, config_source: {{ads: {{}}}}}}
        http_filters:
        - name: envoy.filters.http.router
          typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    )
}

// ---------------------------------------------------------------------------------------------
// The binary

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "weir-cp-it-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Kills the child on drop, so a failing test leaves no process behind.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A `weir-cp serve` child with both addresses read from its log.
pub struct Binary {
    pub child: ChildGuard,
    pub xds: SocketAddr,
    pub api: SocketAddr,
    /// Later log lines.
    pub log: std::sync::mpsc::Receiver<String>,
}

/// Start `weir-cp serve` on port 0 with extra `args`.
pub async fn spawn_binary(args: &[&str]) -> Binary {
    let mut all = vec![
        "serve",
        "--xds-address",
        "127.0.0.1:0",
        "--api-address",
        "127.0.0.1:0",
    ];
    all.extend_from_slice(args);
    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_weir-cp"))
            .args(&all)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn weir-cp"),
    );
    let stderr = child.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (xds, api, rx) = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        let (mut xds, mut api) = (None, None);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = rx.recv_timeout(left) else {
                break;
            };
            for w in line.split_whitespace() {
                if let Some(a) = w.strip_prefix("address=").and_then(|a| a.parse().ok()) {
                    xds = Some(a);
                }
                if let Some(a) = w.strip_prefix("api_address=").and_then(|a| a.parse().ok()) {
                    api = Some(a);
                }
            }
            seen.push(line);
            if let (Some(x), Some(a)) = (xds, api) {
                return (x, a, rx);
            }
        }
        panic!("addresses not logged; stderr was:\n{}", seen.join("\n"));
    })
    .await
    .expect("log reader");
    Binary {
        child,
        xds,
        api,
        log: rx,
    }
}

/// Run a `weir-cp` client subcommand; (success, stdout, stderr).
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_weir-cp"))
        .args(args)
        .output()
        .expect("run weir-cp");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn write(path: &Path, text: &str) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).expect("mkdir");
    }
    std::fs::write(path, text).expect("write");
}

/// The bootstrap's `static_resources` head with the `weir-cp` ADS cluster (h2, STATIC at
/// `xds`); a test appends its own listeners/clusters after it.
pub fn weir_cp_cluster(xds: std::net::SocketAddr) -> String {
    format!(
        r#"static_resources:
  clusters:
  - name: weir-cp
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: weir-cp
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}
"#,
        ip = xds.ip(),
        port = xds.port()
    )
}

/// An `http_connection_manager` network filter (indented for a filter chain's `filters:`)
/// routing every request to `cluster`; `extra` goes before `route_config`, `filters` before
/// the router.
pub fn hcm(stat_prefix: &str, cluster: &str, extra: &str, filters: &str) -> String {
    format!(
        r#"      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {stat_prefix}
{extra}          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: /}}, route: {{cluster: "{cluster}", timeout: 5s}}}}]
          http_filters:
{filters}          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#
    )
}

/// An in-process weir's stat by its Envoy name (0 when absent).
pub fn proxy_stat(p: &weir_proxy::server::ServerHandle, name: &str) -> u64 {
    p.state
        .stats
        .text_stat(name)
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}
