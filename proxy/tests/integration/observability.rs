//! Access logs, response flags and tracing end to end: log lines checked field by field
//! (HTTP text and JSON formats, TCP), access log filters, trace context propagation (W3C,
//! B3 multi and single), sampling, and spans received by an in-test OTLP/gRPC collector
//! (ingress and egress operations, route decorators, custom tags, upstream child spans).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir_proxy::trace::otlp::{ExportTraceServiceRequest, KeyValue, Span};

use crate::harness::*;

const FILE_LOG: &str = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog";

fn log_path(name: &str) -> String {
    let p = std::env::temp_dir().join(format!(
        "weir-obs-{}-{name}-{}.log",
        std::process::id(),
        rand_suffix()
    ));
    let _ = std::fs::remove_file(&p);
    p.to_string_lossy().into_owned()
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// The lines of `path` once it has at least `n` (bounded wait).
async fn lines(path: &str, n: usize) -> Vec<String> {
    for _ in 0..200 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let l: Vec<String> = text.lines().map(str::to_string).collect();
        if l.len() >= n {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "{path}: wanted {n} lines, have:\n{}",
        std::fs::read_to_string(path).unwrap_or_default()
    );
}

/// A port nothing listens on.
async fn dead_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let p = l.local_addr().expect("addr").port();
    drop(l);
    p
}

/// HCM `access_log` with one file logger using `format_yaml` (a FileAccessLog field).
fn access_log(path: &str, format_yaml: &str, filter: &str) -> String {
    format!(
        "          access_log:\n          - name: envoy.access_loggers.file\n{filter}            typed_config: {{'@type': {FILE_LOG}, path: {path}, {format_yaml}}}\n"
    )
}

const TEXT: &str = "%REQ(:METHOD)% %REQ(:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %UPSTREAM_HOST% %UPSTREAM_CLUSTER% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %REQ(X-REQUEST-ID)% %ROUTE_NAME% %RESPONSE_CODE_DETAILS%\\n";

/// Routes for the flag cases: `/ok` and `/slow` (0.2 s timeout) to `b`, `/uh` to a cluster without hosts, `/uf`
/// to a dead port, `/urx` to the dead port with one retry; anything else has no route.
fn flag_routes() -> String {
    "            - name: all\n              domains: [\"*\"]\n              routes:\n\
     \x20             - name: ok_route\n                match: {prefix: /ok}\n                route: {cluster: b, timeout: 5s}\n\
     \x20             - match: {prefix: /slow}\n                route: {cluster: b, timeout: 0.2s}\n\
     \x20             - match: {prefix: /uh}\n                route: {cluster: empty}\n\
     \x20             - match: {prefix: /uf}\n                route: {cluster: dead}\n\
     \x20             - match: {prefix: /urx}\n                route: {cluster: dead, retry_policy: {retry_on: connect-failure, num_retries: 1}}\n"
        .to_string()
}

fn flag_clusters(b: &Backend, dead: u16) -> String {
    format!(
        "{}{}  - name: empty\n    connect_timeout: 1s\n    type: STATIC\n    load_assignment: {{cluster_name: empty}}\n",
        cluster("b", &[b.port()]),
        cluster("dead", &[dead])
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_access_log_text_format_with_response_flags() {
    let b = Backend::start("b").await;
    let dead = dead_port().await;
    let path = log_path("text");
    let p = Proxy::start(&http_bootstrap(
        &flag_routes(),
        &flag_clusters(&b, dead),
        &access_log(
            &path,
            &format!("log_format: {{text_format_source: {{inline_string: \"{TEXT}\"}}}}"),
            "",
        ),
    ))
    .await;
    let a = p.addr("http");
    let (s, h, body) = get(a, "x", "/ok").await;
    assert_eq!(s, StatusCode::OK);
    let rid = json(&body)["headers"]["x-request-id"]
        .as_str()
        .expect("request id")
        .to_string();
    let ok_len = body.len();
    assert!(h.contains_key("x-envoy-upstream-service-time"));
    let cases = [
        ("/missing", StatusCode::NOT_FOUND),
        ("/uh", StatusCode::SERVICE_UNAVAILABLE),
        ("/uf", StatusCode::SERVICE_UNAVAILABLE),
        ("/urx", StatusCode::SERVICE_UNAVAILABLE),
        ("/slow/3000", StatusCode::GATEWAY_TIMEOUT),
    ];
    for (path, want) in cases {
        assert_eq!(get(a, "x", path).await.0, want, "{path}");
    }
    let got = lines(&path, 6).await;
    let fields = |i: usize| -> Vec<String> { got[i].split(' ').map(str::to_string).collect() };

    let f = fields(0);
    assert_eq!(
        &f[..5],
        ["GET", "/ok", "HTTP/1.1", "200", "-"],
        "{}",
        got[0]
    );
    assert_eq!(f[5], "0", "bytes received");
    assert_eq!(f[6], ok_len.to_string(), "bytes sent");
    assert_eq!(f[7], format!("127.0.0.1:{}", b.port()));
    assert_eq!(f[8], "b");
    assert_eq!(f[9], "127.0.0.1");
    assert_eq!(f[10], rid, "the x-request-id the upstream saw");
    assert_eq!(f[11], "ok_route");
    assert_eq!(f[12], "via_upstream");

    let f = fields(1);
    assert_eq!(
        &f[..5],
        ["GET", "/missing", "HTTP/1.1", "404", "NR"],
        "{}",
        got[1]
    );
    assert_eq!(&f[7..9], ["-", "-"]);
    assert_eq!(f[12], "route_not_found");

    let f = fields(2);
    assert_eq!(&f[3..5], ["503", "UH"], "{}", got[2]);
    assert_eq!(f[7], "-", "no host was chosen");
    assert_eq!(f[8], "empty");
    assert_eq!(f[12], "no_healthy_upstream");

    let f = fields(3);
    assert_eq!(&f[3..5], ["503", "UF"], "{}", got[3]);
    assert_eq!(f[7], format!("127.0.0.1:{dead}"));
    assert_eq!(f[8], "dead");

    let f = fields(4);
    assert_eq!(&f[3..5], ["503", "UF,URX"], "{}", got[4]);

    let f = fields(5);
    assert_eq!(
        &f[1..5],
        ["/slow/3000", "HTTP/1.1", "504", "UT"],
        "{}",
        got[5]
    );
    assert_eq!(f[12], "upstream_response_timeout");
    assert_eq!(p.stat("filesystem.write_dropped"), 0);
    assert!(p.stat("filesystem.write_buffered") >= 6);
    p.stop().await;
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_access_log_json_format_and_rate_limit_flag() {
    let b = Backend::start("b").await;
    let path = log_path("json");
    let yaml = http_bootstrap_filters(
        &all_to("b", "5s"),
        &cluster("b", &[b.port()]),
        &access_log(
            &path,
            "json_format: {status: '%RESPONSE_CODE%', flags: '%RESPONSE_FLAGS%', method: '%REQ(:METHOD)%', path: '%REQ(:PATH)%', cluster: '%UPSTREAM_CLUSTER%', sent: '%BYTES_SENT%', received: '%BYTES_RECEIVED%', ua: '%REQ(USER-AGENT)%', duration: '%DURATION%', start: '%START_TIME(%Y)%', line: '%REQ(:METHOD)% %PROTOCOL%'}",
            "",
        ),
        "          - name: envoy.filters.http.local_ratelimit\n            typed_config: {'@type': type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit, stat_prefix: lrl, filter_enabled: {default_value: {numerator: 100}}, filter_enforced: {default_value: {numerator: 100}}, token_bucket: {max_tokens: 1, tokens_per_fill: 1, fill_interval: 3600s}}\n",
    );
    let p = Proxy::start(&yaml).await;
    let a = p.addr("http");
    let req = Request::post("/echo")
        .header("host", "x")
        .header("user-agent", "obs-test")
        .body(Full::new(Bytes::from_static(b"hello body")))
        .expect("req");
    let (s, _, body) = send(a, req).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, "hello body");
    assert_eq!(get(a, "x", "/").await.0, StatusCode::TOO_MANY_REQUESTS);
    let got = lines(&path, 2).await;
    let first: serde_json::Value = serde_json::from_str(&got[0]).expect("json line");
    assert_eq!(first["status"], 200, "{}", got[0]);
    assert_eq!(first["flags"], "-");
    assert_eq!(first["method"], "POST");
    assert_eq!(first["path"], "/echo");
    assert_eq!(first["cluster"], "b");
    assert_eq!(first["sent"], 10);
    assert_eq!(first["received"], 10);
    assert_eq!(first["ua"], "obs-test");
    assert!(first["duration"].is_u64());
    assert_eq!(first["start"].as_str().map(str::len), Some(4));
    assert_eq!(first["line"], "POST HTTP/1.1");
    let second: serde_json::Value = serde_json::from_str(&got[1]).expect("json line");
    assert_eq!(second["status"], 429, "{}", got[1]);
    assert_eq!(second["flags"], "RL");
    assert_eq!(
        second["cluster"],
        serde_json::Value::Null,
        "never routed upstream"
    );
    assert_eq!(second["ua"], serde_json::Value::Null);
    p.stop().await;
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_filters_status_code_and_not_health_check() {
    let b = Backend::start("b").await;
    let errors = log_path("errors");
    let nohc = log_path("nohc");
    let hcm = format!(
        "          access_log:\n\
         \x20         - name: errors\n            filter: {{status_code_filter: {{comparison: {{op: GE, value: {{default_value: 400, runtime_key: k}}}}}}}}\n            typed_config: {{'@type': {FILE_LOG}, path: {errors}, log_format: {{text_format_source: {{inline_string: \"%RESPONSE_CODE% %REQ(:PATH)%\\n\"}}}}}}\n\
         \x20         - name: nohc\n            filter: {{not_health_check_filter: {{}}}}\n            typed_config: {{'@type': {FILE_LOG}, path: {nohc}, log_format: {{text_format_source: {{inline_string: \"%RESPONSE_CODE% %REQ(:PATH)%\\n\"}}}}}}\n"
    );
    let p = Proxy::start(&http_bootstrap_filters(
        &all_to("b", "5s"),
        &cluster("b", &[b.port()]),
        &hcm,
        "          - name: envoy.filters.http.health_check\n            typed_config: {'@type': type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck, pass_through_mode: false, headers: [{name: ':path', string_match: {exact: /healthz}}]}\n",
    ))
    .await;
    let a = p.addr("http");
    assert_eq!(get(a, "x", "/status/200").await.0, StatusCode::OK);
    assert_eq!(get(a, "x", "/healthz").await.0, StatusCode::OK);
    assert_eq!(get(a, "x", "/status/404").await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        get(a, "x", "/status/503").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // A marker request after the others: every earlier line was written when it shows up.
    assert_eq!(get(a, "x", "/status/599").await.0.as_u16(), 599);
    let e = lines(&errors, 3).await;
    assert_eq!(e, ["404 /status/404", "503 /status/503", "599 /status/599"]);
    let n = lines(&nohc, 4).await;
    assert_eq!(
        n,
        [
            "200 /status/200",
            "404 /status/404",
            "503 /status/503",
            "599 /status/599"
        ],
        "the health check is not logged"
    );
    p.stop().await;
    let _ = std::fs::remove_file(&errors);
    let _ = std::fs::remove_file(&nohc);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_access_log_bytes_host_and_connect_failure() {
    let echo = tcp_echo().await;
    let dead = dead_port().await;
    let path = log_path("tcp");
    let fmt = "%BYTES_RECEIVED% %BYTES_SENT% %UPSTREAM_HOST% %UPSTREAM_CLUSTER% %RESPONSE_FLAGS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %RESPONSE_CODE% %UPSTREAM_TRANSPORT_FAILURE_REASON%\\n";
    let extra = format!(
        "access_log: [{{name: f, typed_config: {{'@type': {FILE_LOG}, path: {path}, log_format: {{text_format_source: {{inline_string: \"{fmt}\"}}}}}}}}]"
    );
    let p = Proxy::start(&tcp_bootstrap(
        "echo",
        "echo",
        &extra,
        &cluster("echo", &[echo.port()]),
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(p.addr("tcp"))
        .await
        .expect("connect");
    s.write_all(b"hello weir").await.expect("write");
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"hello weir");
    s.shutdown().await.expect("half close");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    let got = lines(&path, 1).await;
    assert_eq!(
        got[0],
        format!("10 10 127.0.0.1:{} echo - 127.0.0.1 0 -", echo.port())
    );
    p.stop().await;

    // Connect failure: UF, no bytes, the host tried and the reason.
    let path2 = log_path("tcp-uf");
    let extra = extra.replace(&path, &path2);
    let p = Proxy::start(&tcp_bootstrap(
        "dead",
        "dead",
        &extra,
        &cluster("dead", &[dead]),
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(p.addr("tcp"))
        .await
        .expect("connect");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    let got = lines(&path2, 1).await;
    let f: Vec<&str> = got[0].splitn(8, ' ').collect();
    assert_eq!(
        &f[..7],
        [
            "0",
            "0",
            &format!("127.0.0.1:{dead}"),
            "dead",
            "UF",
            "127.0.0.1",
            "0"
        ],
        "{}",
        got[0]
    );
    assert_ne!(f[7], "-", "a failure reason");
    p.stop().await;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&path2);
}

/// HCM `tracing` with the given settings (no provider unless given).
fn tracing(body: &str) -> String {
    format!("          tracing: {{{body}}}\n")
}

async fn upstream_headers(p: &Proxy, headers: &[(&str, &str)]) -> serde_json::Value {
    let mut req = Request::get("/").header("host", "x");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (s, _, body) = send(
        p.addr("http"),
        req.body(Full::new(Bytes::new())).expect("req"),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    json(&body)["headers"].clone()
}

fn traceparent(h: &serde_json::Value) -> (String, String, String) {
    let tp = h["traceparent"].as_str().expect("traceparent upstream");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1].len(), 32);
    assert_eq!(parts[2].len(), 16);
    (
        parts[1].to_string(),
        parts[2].to_string(),
        parts[3].to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_continued_and_started_and_b3_translated() {
    let (p, _b) = proxy_to_backend(&tracing("")).await;
    // Continued: same trace id, a new span id, the caller's decision, tracestate kept.
    let h = upstream_headers(
        &p,
        &[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "vendor=x"),
        ],
    )
    .await;
    let (tid, sid, flags) = traceparent(&h);
    assert_eq!(tid, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(sid, "00f067aa0ba902b7");
    assert_ne!(sid, "0000000000000000");
    assert_eq!(flags, "01");
    assert_eq!(h["tracestate"], "vendor=x");
    // An unsampled caller stays unsampled.
    let h = upstream_headers(
        &p,
        &[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )],
    )
    .await;
    assert_eq!(traceparent(&h).2, "00");
    // Started: a fresh trace, sampled (random_sampling defaults to 100%).
    let h1 = upstream_headers(&p, &[]).await;
    let h2 = upstream_headers(&p, &[]).await;
    let (t1, _, f1) = traceparent(&h1);
    let (t2, _, _) = traceparent(&h2);
    assert_ne!(t1, t2);
    assert_ne!(t1, "0".repeat(32));
    assert_eq!(f1, "01");
    assert!(h1["x-request-id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(
        h1.get("x-b3-traceid").is_none(),
        "B3 only where the caller used it"
    );

    // B3 multi: translated to traceparent and rewritten consistently.
    let h = upstream_headers(
        &p,
        &[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-parentspanid", "05e3ac9a4f6e3b90"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    let (tid, sid, flags) = traceparent(&h);
    assert_eq!(tid, "80f198ee56343ba864fe8b2a57d3eff7");
    assert_eq!(flags, "01");
    assert_eq!(h["x-b3-traceid"], "80f198ee56343ba864fe8b2a57d3eff7");
    assert_eq!(h["x-b3-spanid"], sid.as_str());
    assert_eq!(h["x-b3-parentspanid"], "e457b5a2e4d86bd1");
    assert_eq!(h["x-b3-sampled"], "1");

    // B3 single, 64-bit trace id, not sampled.
    let h = upstream_headers(&p, &[("b3", "a3ce929d0e0e4736-00f067aa0ba902b7-0")]).await;
    let (tid, sid, flags) = traceparent(&h);
    assert_eq!(tid, "0000000000000000a3ce929d0e0e4736");
    assert_eq!(flags, "00");
    assert_eq!(
        h["b3"],
        format!("a3ce929d0e0e4736-{sid}-0-00f067aa0ba902b7").as_str()
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_decisions_follow_hcm_settings() {
    let (p, _b) = proxy_to_backend(&tracing(
        "random_sampling: {value: 0}, client_sampling: {value: 100}",
    ))
    .await;
    // Random sampling 0%: a new trace is not sampled.
    for _ in 0..5 {
        assert_eq!(traceparent(&upstream_headers(&p, &[]).await).2, "00");
    }
    // x-client-trace-id: client sampling (100%) applies.
    let h = upstream_headers(&p, &[("x-client-trace-id", "abc")]).await;
    assert_eq!(traceparent(&h).2, "01");
    // A sampled caller is honoured whatever the local settings.
    let h = upstream_headers(
        &p,
        &[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
    )
    .await;
    assert_eq!(traceparent(&h).2, "01");
    p.stop().await;

    // overall_sampling 0% caps client sampling too.
    let (p, _b) = proxy_to_backend(&tracing(
        "random_sampling: {value: 100}, overall_sampling: {value: 0}",
    ))
    .await;
    let h = upstream_headers(&p, &[("x-client-trace-id", "abc")]).await;
    assert_eq!(traceparent(&h).2, "00");
    p.stop().await;
}

/// An OTLP/gRPC trace collector (h2c): records every exported span, answers OK.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Spans>,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    async fn start() -> Collector {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let (sp, pa) = (spans.clone(), paths.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let (sp, pa) = (sp.clone(), pa.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (sp, pa) = (sp.clone(), pa.clone());
                        async move { Ok::<_, Infallible>(export(req, &sp, &pa).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Collector { addr, spans, paths }
    }

    fn spans(&self) -> Vec<(Vec<KeyValue>, Span)> {
        self.spans.lock().expect("lock").clone()
    }
}

/// Exported spans with their resource attributes.
type Spans = Mutex<Vec<(Vec<KeyValue>, Span)>>;

async fn export(
    req: Request<Incoming>,
    spans: &Spans,
    paths: &Mutex<Vec<String>>,
) -> Response<http_body_util::combinators::BoxBody<Bytes, Infallible>> {
    paths
        .lock()
        .expect("lock")
        .push(req.uri().path().to_string());
    let mut body = req.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body.get_u8(), 0, "uncompressed");
    let len = body.get_u32() as usize;
    let msg = ExportTraceServiceRequest::decode(&body[..len]).expect("OTLP request");
    for rs in msg.resource_spans {
        let res = rs.resource.map(|r| r.attributes).unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                spans.lock().expect("lock").push((res.clone(), s));
            }
        }
    }
    // Empty ExportTraceServiceResponse, grpc-status in trailers.
    let frame = Bytes::from_static(&[0, 0, 0, 0, 0]);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let stream = futures::stream::iter(vec![
        Ok::<_, Infallible>(hyper::body::Frame::data(frame)),
        Ok(hyper::body::Frame::trailers(trailers)),
    ]);
    let mut r = Response::new(http_body_util::StreamBody::new(stream).boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    r
}

fn otel_bootstrap(b: &Backend, otel_port: u16) -> String {
    let otel = format!(
        "{}    typed_extension_protocol_options:\n      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n        explicit_http_config: {{http2_protocol_options: {{}}}}\n",
        cluster("otel", &[otel_port])
    );
    http_bootstrap(
        &all_to("b", "5s"),
        &format!("{}{otel}", cluster("b", &[b.port()])),
        &tracing(
            "provider: {name: envoy.tracers.opentelemetry, typed_config: {'@type': type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig, grpc_service: {envoy_grpc: {cluster_name: otel}}, service_name: weir-test}}",
        ),
    )
}

fn attr<'a>(s: &'a Span, k: &str) -> Option<&'a str> {
    s.attributes
        .iter()
        .find(|a| a.key == k)
        .and_then(|a| a.as_str())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_with_parent_child_ids() {
    let c = Collector::start().await;
    let b = Backend::start("b").await;
    let p = Proxy::start(&otel_bootstrap(&b, c.addr.port())).await;
    let mut seen = Vec::new();
    // Five requests fill one batch (Envoy's min_flush_spans).
    for i in 0..5u32 {
        let tp = format!(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00000000000000{:02x}-01",
            i + 1
        );
        let (s, _, body) = send(
            p.addr("http"),
            Request::get(format!("/status/{}", if i == 4 { 503 } else { 200 }))
                .header("host", "example.com")
                .header("traceparent", tp)
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await;
        assert_eq!(s.as_u16(), if i == 4 { 503 } else { 200 });
        let h = json(&body)["headers"].clone();
        let (_, sid, _) = traceparent(&h);
        seen.push((
            format!("00000000000000{:02x}", i + 1),
            sid,
            h["x-request-id"].as_str().expect("rid").to_string(),
        ));
    }
    eventually("5 spans exported", || c.spans().len() >= 5).await;
    eventually("spans_sent", || {
        p.stat("tracing.opentelemetry.spans_sent") == 5
    })
    .await;
    assert_eq!(
        c.paths.lock().expect("lock")[0],
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    );
    let spans = c.spans();
    for (parent, sid, rid) in &seen {
        let (res, s) = spans
            .iter()
            .find(|(_, s)| hex(&s.span_id) == *sid)
            .unwrap_or_else(|| panic!("span {sid} exported"));
        assert_eq!(hex(&s.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            hex(&s.parent_span_id),
            *parent,
            "the caller's span is the parent"
        );
        assert_eq!(s.kind, weir_proxy::trace::otlp::SPAN_KIND_SERVER);
        assert_eq!(s.name, "ingress");
        assert!(s.end_time_unix_nano >= s.start_time_unix_nano && s.start_time_unix_nano > 0);
        assert_eq!(attr(s, "upstream_cluster"), Some("b"));
        assert_eq!(attr(s, "http.method"), Some("GET"));
        assert_eq!(attr(s, "component"), Some("proxy"));
        assert_eq!(attr(s, "guid:x-request-id"), Some(rid.as_str()));
        assert_eq!(attr(s, "response_flags"), Some("-"));
        assert!(attr(s, "http.url").is_some_and(|u| u.starts_with("http://example.com/status/")));
        assert!(attr(s, "node_id").is_some());
        assert!(
            res.iter()
                .any(|kv| kv.key == "service.name" && kv.as_str() == Some("weir-test")),
            "resource service.name"
        );
        if parent.ends_with("05") {
            assert_eq!(attr(s, "http.status_code"), Some("503"));
            assert_eq!(attr(s, "error"), Some("true"));
        } else {
            assert_eq!(attr(s, "http.status_code"), Some("200"));
            assert_eq!(attr(s, "error"), None);
        }
    }
    assert_eq!(p.stat("tracing.opentelemetry.spans_dropped"), 0);
    p.stop().await;
}

/// An OTLP bootstrap whose route has a decorator, with HCM `custom_tags` and
/// `spawn_upstream_span`, on a listener with the given `traffic_direction`.
fn decorated_bootstrap(b: &Backend, otel_port: u16, direction: &str) -> String {
    otel_bootstrap(b, otel_port)
        .replace(
            "route: {cluster: b, timeout: 5s}",
            "route: {cluster: b, timeout: 5s}\n                decorator: {operation: checkout}",
        )
        .replace(
            "service_name: weir-test}}",
            "service_name: weir-test}}, spawn_upstream_span: true, custom_tags: [{tag: zone, literal: {value: z1}}, {tag: tenant, request_header: {name: x-tenant, default_value: none}}]",
        )
        .replace(
            "  - name: http\n",
            &format!("  - name: http\n    traffic_direction: {direction}\n"),
        )
}

/// Egress (a sidecar's outbound listener): the span is a CLIENT span named by the route's
/// decorator, the decorator is propagated upstream, custom tags are recorded, and each
/// attempt gets a child span (`router b egress`) that the upstream sees as its parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_spans_decorator_custom_tags_and_upstream_child_spans() {
    let c = Collector::start().await;
    let b = Backend::start("b").await;
    let p = Proxy::start(&decorated_bootstrap(&b, c.addr.port(), "OUTBOUND")).await;
    let mut seen = Vec::new();
    for i in 0..5u32 {
        let (s, _, body) = send(
            p.addr("http"),
            Request::get("/")
                .header("host", "shop")
                .header("x-tenant", format!("t{i}"))
                .header("x-envoy-force-trace", "1")
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let h = json(&body)["headers"].clone();
        assert_eq!(h["x-envoy-decorator-operation"], "checkout", "{h}");
        let (tid, sid, _) = traceparent(&h);
        seen.push((tid, sid));
    }
    eventually("10 spans exported", || c.spans().len() >= 10).await;
    let spans = c.spans();
    for (i, (tid, sid)) in seen.iter().enumerate() {
        // The upstream's parent is the attempt's span.
        let (_, up) = spans
            .iter()
            .find(|(_, s)| hex(&s.span_id) == *sid)
            .unwrap_or_else(|| panic!("upstream span {sid} exported"));
        assert_eq!(up.name, "router b egress");
        assert_eq!(up.kind, weir_proxy::trace::otlp::SPAN_KIND_CLIENT);
        assert_eq!(hex(&up.trace_id), *tid);
        assert_eq!(attr(up, "upstream_cluster"), Some("b"));
        assert_eq!(attr(up, "http.status_code"), Some("200"));
        // Its parent is the request's span.
        let (_, down) = spans
            .iter()
            .find(|(_, s)| s.span_id == up.parent_span_id)
            .expect("parent span exported");
        assert_eq!(down.name, "checkout");
        assert_eq!(down.kind, weir_proxy::trace::otlp::SPAN_KIND_CLIENT);
        assert_eq!(hex(&down.trace_id), *tid);
        assert!(
            down.parent_span_id.is_empty(),
            "a started trace has no parent"
        );
        assert_eq!(attr(down, "zone"), Some("z1"));
        assert_eq!(attr(down, "tenant"), Some(format!("t{i}").as_str()));
        assert_eq!(attr(down, "http.status_code"), Some("200"));
    }
    p.stop().await;
}

/// Ingress: the caller's `x-envoy-decorator-operation` names the SERVER span; the route's
/// propagating decorator is returned to the caller on the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_span_named_by_the_caller_and_decorator_returned() {
    let c = Collector::start().await;
    let b = Backend::start("b").await;
    let p = Proxy::start(&decorated_bootstrap(&b, c.addr.port(), "INBOUND")).await;
    for i in 0..5u32 {
        let mut req = Request::get("/")
            .header("host", "shop")
            .header("x-envoy-force-trace", "1");
        if i % 2 == 0 {
            req = req.header("x-envoy-decorator-operation", "caller-op");
        }
        let (s, h, body) = send(
            p.addr("http"),
            req.body(Full::new(Bytes::new())).expect("req"),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(h["x-envoy-decorator-operation"], "checkout");
        // The header is consumed, not forwarded.
        let up = json(&body)["headers"].clone();
        assert!(up.get("x-envoy-decorator-operation").is_none(), "{up}");
    }
    eventually("10 spans exported", || c.spans().len() >= 10).await;
    let spans = c.spans();
    let server: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.kind == weir_proxy::trace::otlp::SPAN_KIND_SERVER)
        .collect();
    assert_eq!(server.len(), 5);
    assert_eq!(server.iter().filter(|s| s.name == "caller-op").count(), 3);
    assert_eq!(server.iter().filter(|s| s.name == "checkout").count(), 2);
    assert!(server.iter().all(|s| attr(s, "tenant") == Some("none")));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_requests_succeed_and_drops_are_counted() {
    let b = Backend::start("b").await;
    let dead = dead_port().await;
    let p = Proxy::start(&otel_bootstrap(&b, dead)).await;
    for _ in 0..5 {
        assert_eq!(get(p.addr("http"), "x", "/").await.0, StatusCode::OK);
    }
    eventually("spans dropped", || {
        p.stat("tracing.opentelemetry.spans_dropped") == 5
    })
    .await;
    assert_eq!(p.stat("tracing.opentelemetry.spans_sent"), 0);
    assert!(p.stat("tracing.opentelemetry.export_failed") >= 1);
    assert_eq!(b.hits(), 5);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_logs_admin_endpoint_follows_rotation() {
    let b = Backend::start("b").await;
    let path = log_path("rotate");
    let p = Proxy::start(&http_bootstrap(
        &all_to("b", "5s"),
        &cluster("b", &[b.port()]),
        &access_log(
            &path,
            "log_format: {text_format_source: {inline_string: \"%REQ(:PATH)%\\n\"}}",
            "",
        ),
    ))
    .await;
    assert_eq!(get(p.addr("http"), "x", "/one").await.0, StatusCode::OK);
    assert_eq!(lines(&path, 1).await, ["/one"]);
    // The access log config shows in /config_dump as configured.
    let (s, _, dump) = get(p.admin(), "admin", "/config_dump").await;
    assert_eq!(s, StatusCode::OK);
    let dump = String::from_utf8_lossy(&dump);
    assert!(
        dump.contains("envoy.extensions.access_loggers.file.v3.FileAccessLog")
            && dump.contains(&path)
            && dump.contains("%REQ(:PATH)%"),
        "{dump}"
    );
    let rotated = format!("{path}.1");
    std::fs::rename(&path, &rotated).expect("rotate");
    let (s, _, _) = send(
        p.admin(),
        Request::post("/reopen_logs")
            .header("host", "admin")
            .body(Full::new(Bytes::new()))
            .expect("req"),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // The reopen is queued before the next line: it lands in the new file.
    assert_eq!(get(p.addr("http"), "x", "/two").await.0, StatusCode::OK);
    assert_eq!(lines(&path, 1).await, ["/two"]);
    assert_eq!(std::fs::read_to_string(&rotated).expect("old"), "/one\n");
    p.stop().await;
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&rotated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_mid_body_is_downstream_termination() {
    let b = Backend::start("b").await;
    let path = log_path("dc");
    let p = Proxy::start(&http_bootstrap(
        &all_to("b", "15s"),
        &cluster("b", &[b.port()]),
        &access_log(
            &path,
            "log_format: {text_format_source: {inline_string: \"%RESPONSE_CODE% %RESPONSE_FLAGS% %REQ(:PATH)%\\n\"}}",
            "",
        ),
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(p.addr("http"))
        .await
        .expect("connect");
    s.write_all(b"GET /big/50000000 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(s);
    let got = lines(&path, 1).await;
    assert_eq!(got[0], "200 DC /big/50000000");
    p.stop().await;
    let _ = std::fs::remove_file(&path);
}
