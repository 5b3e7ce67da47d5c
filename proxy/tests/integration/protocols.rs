//! Protocols end to end: HTTP/1.1 <-> HTTP/2 both ways, gRPC unary and bidi streaming with
//! trailers, WebSocket upgrade, CONNECT tunnels, large streamed bodies.

use std::pin::Pin;

use bytes::Bytes;
use futures::{SinkExt, Stream, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full};
use weir_xds_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weir_xds_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use weir_xds_api::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};

use crate::harness::*;

fn h2_cluster(name: &str, port: u16) -> String {
    format!(
        "{}    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {{http2_protocol_options: {{}}}}\n",
        cluster(name, &[port])
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_downstream_to_h1_upstream_and_back() {
    let b = Backend::start("b").await;
    let p = Proxy::start(&http_bootstrap(
        &all_to("up", "0s"),
        &cluster("up", &[b.port()]),
        "",
    ))
    .await;
    let mut h2 = h2_client(p.addr("http")).await;
    let req = Request::post("http://svc.local/echo")
        .body(Full::new(Bytes::from_static(b"ping over h2")))
        .expect("req");
    let resp = h2.send_request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"ping over h2");
    let resp = h2
        .send_request(
            Request::get("http://svc.local/")
                .body(Full::default())
                .expect("req"),
        )
        .await
        .expect("resp");
    let j = json(&resp.into_body().collect().await.expect("body").to_bytes());
    assert_eq!(j["version"], "HTTP/1.1", "upstream spoke HTTP/1.1");
    assert_eq!(j["headers"]["host"], "svc.local", ":authority became Host");
    assert_eq!(p.stat("http.ingress.downstream_cx_http2_total"), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_downstream_to_h2_upstream_with_trailers() {
    let b = Backend::start("b").await;
    let p = Proxy::start(&http_bootstrap(
        &all_to("up", "0s"),
        &h2_cluster("up", b.port()),
        "",
    ))
    .await;
    let (s, _, body) = get(p.addr("http"), "svc.local", "/").await;
    assert_eq!(s.as_u16(), 200);
    let j = json(&body);
    assert_eq!(j["version"], "HTTP/2.0");
    assert_eq!(
        j["headers"]["host"]
            .as_str()
            .or(j["headers"][":authority"].as_str())
            .unwrap_or("svc.local"),
        "svc.local"
    );
    // Trailers survive h2 -> h2.
    let mut h2 = h2_client(p.addr("http")).await;
    let resp = h2
        .send_request(
            Request::get("http://svc.local/trailers")
                .body(Full::default())
                .expect("req"),
        )
        .await
        .expect("resp");
    let collected = resp.into_body().collect().await.expect("body");
    assert_eq!(
        collected
            .trailers()
            .and_then(|t| t.get("x-trailer"))
            .map(|v| v.as_bytes()),
        Some(&b"yes"[..])
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways() {
    let b = Backend::start("b").await;
    let p = Proxy::start(&http_bootstrap(
        &all_to("up", "0s"),
        &cluster("up", &[b.port()]),
        "",
    ))
    .await;
    let data: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 253) as u8).collect();
    let req = Request::post("/echo")
        .header("host", "x")
        .body(Full::new(Bytes::from(data.clone())))
        .expect("req");
    let (s, _, body) = send(p.addr("http"), req).await;
    assert_eq!(s.as_u16(), 200);
    assert_eq!(body.len(), data.len());
    assert!(body[..] == data[..], "echoed body differs");
    let (_, _, body) = get(p.addr("http"), "x", "/big/3000000").await;
    assert_eq!(body.len(), 3_000_000);
    assert!(body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    p.stop().await;
}

struct Ads;

type AdsStream<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = AdsStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = AdsStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        req: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        let mut input = req.into_inner();
        let (tx, mut rx) =
            tokio::sync::mpsc::channel::<Result<DiscoveryResponse, tonic::Status>>(8);
        tokio::spawn(async move {
            let mut n = 0;
            while let Some(Ok(r)) = input.next().await {
                n += 1;
                let resp = DiscoveryResponse {
                    version_info: r.version_info.clone(),
                    nonce: format!("n{n}"),
                    type_url: r.type_url,
                    ..Default::default()
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Err(tonic::Status::data_loss("stream over"))).await;
        });
        let out: Self::StreamAggregatedResourcesStream =
            Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        Ok(tonic::Response::new(out))
    }

    async fn delta_aggregated_resources(
        &self,
        _req: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("no delta here"))
    }
}

/// A gRPC (h2c) channel to weir's listener.
async fn grpc_channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("channel")
}

async fn grpc_server() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(Ads))
            .serve_with_incoming(tokio_stream_listener(l))
            .await;
    });
    addr
}

fn tokio_stream_listener(
    l: tokio::net::TcpListener,
) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(l, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_bidi_streaming_and_status_trailers() {
    let g = grpc_server().await;
    let p = Proxy::start(&http_bootstrap(
        &all_to("up", "0s"),
        &h2_cluster("up", g.port()),
        "",
    ))
    .await;
    let ch = grpc_channel(p.addr("http")).await;
    let mut client = AggregatedDiscoveryServiceClient::new(ch);
    let (mut tx, rx) = futures::channel::mpsc::channel::<DiscoveryRequest>(4);
    let mut responses = client
        .stream_aggregated_resources(rx)
        .await
        .expect("stream")
        .into_inner();
    for i in 0..5 {
        tx.send(DiscoveryRequest {
            version_info: format!("v{i}"),
            type_url: "t".into(),
            ..Default::default()
        })
        .await
        .expect("send");
        let r = responses.message().await.expect("message").expect("some");
        assert_eq!(r.version_info, format!("v{i}"));
        assert_eq!(r.nonce, format!("n{}", i + 1));
    }
    drop(tx);
    let end = responses.message().await.expect_err("status from trailers");
    assert_eq!(end.code(), tonic::Code::DataLoss);
    assert_eq!(end.message(), "stream over");
    // Unary-style error in a trailers-only response.
    let (_dtx, drx) = futures::channel::mpsc::channel::<DeltaDiscoveryRequest>(1);
    let err = client
        .delta_aggregated_resources(drx)
        .await
        .expect_err("unimplemented");
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    assert_eq!(err.message(), "no delta here");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_local_reply_is_a_grpc_status() {
    // Nothing listens on the cluster's port: connect failure -> UNAVAILABLE.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = dead.local_addr().expect("addr").port();
    drop(dead);
    let p = Proxy::start(&http_bootstrap(
        &all_to("up", "0s"),
        &h2_cluster("up", port),
        "",
    ))
    .await;
    let ch = grpc_channel(p.addr("http")).await;
    let mut client = AggregatedDiscoveryServiceClient::new(ch);
    let (_tx, rx) = futures::channel::mpsc::channel::<DiscoveryRequest>(1);
    let err = client
        .stream_aggregated_resources(rx)
        .await
        .expect_err("unavailable");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("connection failure"),
        "{}",
        err.message()
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_echo() {
    let ws = ws_echo().await;
    let extra = "          upgrade_configs: [{upgrade_type: websocket}]\n";
    let p = Proxy::start(&http_bootstrap(
        &all_to("up", "0s"),
        &cluster("up", &[ws.port()]),
        extra,
    ))
    .await;
    let (mut sock, resp) =
        tokio_tungstenite::connect_async(format!("ws://{}/chat", p.addr("http")))
            .await
            .expect("ws connect");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        let msg = format!("hello {i}");
        sock.send(tokio_tungstenite::tungstenite::Message::text(msg.clone()))
            .await
            .expect("send");
        let back = sock.next().await.expect("frame").expect("ok");
        assert_eq!(back.into_text().expect("text").as_str(), msg);
    }
    sock.close(None).await.expect("close");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_refused_when_not_configured() {
    let ws = ws_echo().await;
    let p = Proxy::start(&http_bootstrap(
        &all_to("up", "0s"),
        &cluster("up", &[ws.port()]),
        "",
    ))
    .await;
    let err = tokio_tungstenite::connect_async(format!("ws://{}/chat", p.addr("http")))
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("403"), "{err}");
    assert_eq!(p.stat("http.ingress.downstream_rq_ws_on_non_ws_route"), 1);
    p.stop().await;
}

const CONNECT_TO: &str = "            - name: tunnel\n              domains: [\"echo.internal:443\"]\n              routes:\n              - match: {connect_matcher: {}}\n                route: {cluster: up, upgrade_configs: [{upgrade_type: CONNECT, connect_config: {}}]}\n";

/// Read until the end of a response head.
async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut b))
            .await
            .expect("head in time")
            .expect("read");
        assert_eq!(n, 1, "eof in head: {}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnel_to_tcp_echo() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = tcp_echo().await;
    let extra = "          upgrade_configs: [{upgrade_type: CONNECT}]\n";
    let p = Proxy::start(&http_bootstrap(
        CONNECT_TO,
        &cluster("up", &[echo.port()]),
        extra,
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(p.addr("http"))
        .await
        .expect("connect");
    s.write_all(b"CONNECT echo.internal:443 HTTP/1.1\r\nHost: echo.internal:443\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // RFC 9110 9.3.6: no framing headers on a 2xx answer to CONNECT.
    let lower = head.to_ascii_lowercase();
    assert!(
        !lower.contains("transfer-encoding") && !lower.contains("content-length"),
        "{head}"
    );
    // Bytes through the tunnel come back from the echo server byte for byte.
    let payload: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let send = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&send).await.expect("tunnel write");
        w
    });
    let mut back = vec![0u8; payload.len()];
    tokio::time::timeout(std::time::Duration::from_secs(5), r.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("read back");
    assert!(back == payload, "echoed bytes differ");
    assert_eq!(p.stat("cluster.up.upstream_rq_total"), 1);
    assert_eq!(p.stat("cluster.up.upstream_cx_total"), 1);
    assert_eq!(p.stat("cluster.up.upstream_rq_active"), 1);
    // The client closes: the tunnel ends and the gauges return to zero.
    drop((r, writer.await.expect("writer")));
    eventually("tunnel closed", || {
        p.stat("cluster.up.upstream_rq_active") == 0 && p.stat("cluster.up.upstream_cx_active") == 0
    })
    .await;
    assert_eq!(p.stat("cluster.up.upstream_rq_completed"), 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_is_503_uf() {
    // Nothing listens on the cluster's port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let extra = "          upgrade_configs: [{upgrade_type: CONNECT}]\n";
    let p = Proxy::start(&http_bootstrap(CONNECT_TO, &cluster("up", &[port]), extra)).await;
    let out = raw(
        p.addr("http"),
        b"CONNECT echo.internal:443 HTTP/1.1\r\nHost: echo.internal:443\r\n\r\n",
        std::time::Duration::from_secs(3),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.contains("connection failure"), "{out}");
    assert_eq!(p.stat("cluster.up.upstream_rq_total"), 1);
    assert_eq!(p.stat("cluster.up.upstream_rq_active"), 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refused_when_not_configured() {
    let echo = tcp_echo().await;
    let p = Proxy::start(&http_bootstrap(
        CONNECT_TO,
        &cluster("up", &[echo.port()]),
        "",
    ))
    .await;
    let out = raw(
        p.addr("http"),
        b"CONNECT echo.internal:443 HTTP/1.1\r\nHost: echo.internal:443\r\n\r\n",
        std::time::Duration::from_secs(3),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("CONNECT is not configured"), "{out}");
    assert_eq!(p.stat("cluster.up.upstream_rq_total"), 0);
    // A non-CONNECT request never matches the connect_matcher route.
    let (status, _, _) = get(p.addr("http"), "echo.internal:443", "/").await;
    assert_eq!(status, 404);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_through_the_proxy() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("weir.test", tonic_health::ServingStatus::Serving)
        .await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let g = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream_listener(l))
            .await;
    });
    let p = Proxy::start(&http_bootstrap(
        &all_to("up", "0s"),
        &h2_cluster("up", g.port()),
        "",
    ))
    .await;
    let ch = grpc_channel(p.addr("http")).await;
    let mut client = HealthClient::new(ch);
    for _ in 0..3 {
        let r = client
            .check(HealthCheckRequest {
                service: "weir.test".into(),
            })
            .await
            .expect("unary call")
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32);
    }
    let err = client
        .check(HealthCheckRequest {
            service: "unknown".into(),
        })
        .await
        .expect_err("not found status in trailers");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(p.stat("cluster.up.upstream_rq_total"), 4);
    p.stop().await;
}
