//! Builders for the proxy under test and for fake backends.

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use weir_proxy::cli::Options;
use weir_proxy::server::ServerHandle;

/// A proxy started in-process from YAML.
pub struct Proxy {
    pub handle: ServerHandle,
}

impl Proxy {
    pub async fn start(yaml: &str) -> Proxy {
        let opts = Options {
            config_yaml: Some(yaml.to_string()),
            concurrency: Some(2),
            drain_time_s: 5,
            ..Options::default()
        };
        let snap = match weir_proxy::config::load(&opts) {
            Ok(s) => s,
            Err(e) => panic!("invalid test config:\n{e}\n---\n{yaml}"),
        };
        let handle = weir_proxy::server::start(opts, snap)
            .await
            .expect("server starts");
        Proxy { handle }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.handle
            .listener_addr(listener)
            .unwrap_or_else(|| panic!("listener {listener} bound"))
    }

    pub fn admin(&self) -> SocketAddr {
        self.handle.admin_addr().expect("admin bound")
    }

    /// `/stats` as a map (Envoy dotted names).
    pub fn stats(&self) -> HashMap<String, String> {
        self.handle.state.stats.render_text().into_iter().collect()
    }

    pub fn stat(&self, name: &str) -> u64 {
        self.stats()
            .get(name)
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or(0)
    }

    pub async fn stop(self) {
        self.handle.stop().await;
    }
}

/// Wait until `f` is true (bounded).
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A fake HTTP backend (HTTP/1.1 and h2c): answers with JSON describing the request.
/// Paths: `/status/N`, `/slow/MS`, `/echo` (echoes the body), `/big/N` (N bytes),
/// `/close` (closes the connection before responding), `/trailers` (sends a trailer).
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    pub hits: Arc<AtomicUsize>,
    pub conns: Arc<AtomicUsize>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let conns = Arc::new(AtomicUsize::new(0));
        let (n, h, c) = (name.to_string(), hits.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                c.fetch_add(1, Ordering::SeqCst);
                let (n, h) = (n.clone(), h.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let (n, h) = (n.clone(), h.clone());
                        async move { Ok::<_, Infallible>(backend_handle(req, &n, &h).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Backend {
            addr,
            name: name.to_string(),
            hits,
            conns,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

type BBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

async fn backend_handle(req: Request<Incoming>, name: &str, hits: &AtomicUsize) -> Response<BBody> {
    hits.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        let v = v.to_str().unwrap_or("").to_string();
        match headers.get_mut(k.as_str()) {
            Some(serde_json::Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&v);
            }
            _ => {
                headers.insert(k.as_str().to_string(), v.into());
            }
        }
    }
    let info = serde_json::json!({
        "backend": name,
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or(""),
        "version": format!("{:?}", req.version()),
        "headers": headers,
    });
    let full = |b: Bytes| {
        Full::new(b)
            .map_err(|never: Infallible| match never {})
            .boxed()
    };
    if let Some(code) = path.strip_prefix("/status/") {
        let mut r = Response::new(full(Bytes::from(info.to_string())));
        *r.status_mut() = code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::OK);
        r.headers_mut()
            .insert("x-backend", name.parse().expect("name"));
        return r;
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(100))).await;
    }
    if let Some(n) = path.strip_prefix("/big/") {
        let n: usize = n.parse().unwrap_or(0);
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        return Response::new(full(Bytes::from(data)));
    }
    if path == "/echo" {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let mut r = Response::new(full(body));
        r.headers_mut()
            .insert("x-backend", name.parse().expect("name"));
        return r;
    }
    if path == "/abort" {
        // Promise 100 bytes, send 10, then fail: the connection is cut mid-body.
        let body =
            http_body_util::StreamBody::new(futures::stream::unfold(0u8, |step| async move {
                match step {
                    0 => Some((
                        Ok(hyper::body::Frame::data(Bytes::from_static(b"0123456789"))),
                        1,
                    )),
                    1 => {
                        // Let the headers and first bytes reach the client before failing.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Some((Err(std::io::Error::other("backend gave up")), 2))
                    }
                    _ => None,
                }
            }));
        let mut r = Response::new(BodyExt::boxed(body));
        r.headers_mut()
            .insert("content-length", "100".parse().expect("v"));
        return r;
    }
    if path == "/trailers" {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-trailer", "yes".parse().expect("v"));
        let frames = vec![
            Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from_static(b"data"))),
            Ok(hyper::body::Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        return Response::new(BodyExt::boxed(body));
    }
    let mut r = Response::new(full(Bytes::from(info.to_string())));
    r.headers_mut()
        .insert("x-backend", name.parse().expect("name"));
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("ct"));
    r
}

/// A TCP echo server.
pub async fn tcp_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A WebSocket echo server.
pub async fn ws_echo() -> SocketAddr {
    use futures::{SinkExt, StreamExt};
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// One HTTP/1.1 client request (fresh connection); returns status, headers, body.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> (StatusCode, http::HeaderMap, Bytes) {
    send(
        addr,
        Request::get(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .expect("req"),
    )
    .await
}

pub async fn send(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, body)
}

/// An HTTP/2 prior-knowledge client connection.
pub async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let s = TcpStream::connect(addr).await.expect("connect");
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    tx
}

/// Raw request bytes in, raw response bytes out (reads until the peer closes or `wait`).
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// JSON body of a backend answer.
pub fn json(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("json body ({e}): {}", String::from_utf8_lossy(body)))
}

/// One catch-all virtual host routing everything to `cluster` with a route `timeout`.
pub fn all_to(cluster: &str, timeout: &str) -> String {
    format!(
        "            - name: all\n              domains: [\"*\"]\n              routes:\n              - match: {{prefix: /}}\n                route: {{cluster: {cluster}, timeout: {timeout}}}\n"
    )
}

/// A backend `b` and a proxy (listener `http`) routing everything to it; `hcm_extra` is
/// spliced into the connection manager config (see [`http_bootstrap`]).
pub async fn proxy_to_backend(hcm_extra: &str) -> (Proxy, Backend) {
    let b = Backend::start("b").await;
    let p = Proxy::start(&http_bootstrap(
        &all_to("b", "15s"),
        &cluster("b", &[b.port()]),
        hcm_extra,
    ))
    .await;
    (p, b)
}

/// A static cluster YAML snippet.
pub fn cluster(name: &str, ports: &[u16]) -> String {
    let eps: String = ports
        .iter()
        .map(|p| format!("        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}\n"))
        .collect();
    format!(
        "  - name: {name}\n    connect_timeout: 1s\n    type: STATIC\n    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n{eps}"
    )
}

/// A bootstrap with one HTTP listener `http` (port 0), the given virtual hosts YAML and
/// clusters YAML, admin on port 0. `hcm_extra` is spliced into the HCM config.
pub fn http_bootstrap(vhosts: &str, clusters: &str, hcm_extra: &str) -> String {
    format!(
        r#"
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
{hcm_extra}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
          route_config:
            name: local
            virtual_hosts:
{vhosts}
  clusters:
{clusters}
"#
    )
}

/// [`http_bootstrap`] with HTTP filters before the router: `filters_yaml` is a list of
/// `http_filters` items indented to that list (`          - name: ...`).
pub fn http_bootstrap_filters(
    vhosts: &str,
    clusters: &str,
    hcm_extra: &str,
    filters_yaml: &str,
) -> String {
    http_bootstrap(vhosts, clusters, hcm_extra).replacen(
        "          http_filters:\n",
        &format!("          http_filters:\n{filters_yaml}"),
        1,
    )
}

/// A bootstrap with one tcp_proxy listener `tcp` (port 0) to `cluster`, admin on port 0.
/// `tcp_extra` is spliced into the TcpProxy config (10-space indent); `clusters` is the
/// clusters YAML.
pub fn tcp_bootstrap(stat_prefix: &str, cluster: &str, tcp_extra: &str, clusters: &str) -> String {
    format!(
        r#"
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: tcp
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {stat_prefix}
          cluster: {cluster}
          {tcp_extra}
  clusters:
{clusters}"#
    )
}

/// The static `xds` cluster an ADS bootstrap points at: HTTP/2 to 127.0.0.1:`port`, as one
/// item of `static_resources.clusters` (2-space indent).
pub fn xds_cluster_yaml(port: u16) -> String {
    format!(
        r#"  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
"#
    )
}

/// Forward a fake xDS server's inbound request stream into a channel the test reads.
pub fn forward_requests<M: Send + 'static>(
    mut inbound: tonic::Streaming<M>,
) -> futures::channel::mpsc::UnboundedReceiver<M> {
    let (tx, rx) = futures::channel::mpsc::unbounded();
    tokio::spawn(async move {
        while let Ok(Some(m)) = inbound.message().await {
            if tx.unbounded_send(m).is_err() {
                return;
            }
        }
    });
    rx
}
