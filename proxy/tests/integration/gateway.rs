//! The edge gateway example (examples/gateway/gateway.yaml), loaded from the file itself with
//! only its ports and file paths replaced (and the per-client refill slowed from 1 s to 1 h,
//! so the 429 does not depend on how fast this machine sends eleven requests), checked with
//! real clients: certificates chosen by SNI, the HTTP -> HTTPS redirect, HSTS, JWT on /api,
//! per-client-address rate limits (127.0.0.1 vs 127.0.0.2), gRPC and WebSocket through the
//! HTTPS listener, and the JSON access log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use rustls::pki_types::ServerName;
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::{Backend, Proxy, eventually, ws_echo};

const EXAMPLE: &str = include_str!("../../../examples/gateway/gateway.yaml");

struct Certs {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Certs {
    fn new() -> Certs {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "gateway test CA");
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("key");
        Certs {
            ca: rcgen::CertifiedIssuer::self_signed(p, key).expect("ca"),
        }
    }

    /// Write `<name>.crt` / `<name>.key` for `dns` into `dir`.
    fn leaf(&self, dir: &std::path::Path, name: &str, dns: &[&str]) {
        let mut p =
            rcgen::CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        p.distinguished_name.push(rcgen::DnType::CommonName, dns[0]);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.ca).expect("sign");
        std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).expect("crt");
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("key");
    }

    fn client(&self, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
        weir_proxy::tls::install_default_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("root");
        let mut c = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        Arc::new(c)
    }
}

struct Jwt {
    kp: EcdsaKeyPair,
}

impl Jwt {
    fn new() -> Jwt {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("gen");
        Jwt {
            kp: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                .expect("key"),
        }
    }

    fn jwks(&self) -> String {
        let pt = self.kp.public_key().as_ref();
        json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": "k1",
            "x": B64.encode(&pt[1..33]), "y": B64.encode(&pt[33..])}]})
        .to_string()
    }

    fn token(&self, aud: &str) -> String {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            + 600;
        let h = B64.encode(json!({"alg": "ES256", "kid": "k1", "typ": "JWT"}).to_string());
        let p = B64.encode(
            json!({"iss": "https://issuer.example.com", "aud": aud, "sub": "alice", "exp": exp})
                .to_string(),
        );
        let sig = self
            .kp
            .sign(&SystemRandom::new(), format!("{h}.{p}").as_bytes())
            .expect("sign");
        format!("{h}.{p}.{}", B64.encode(sig.as_ref()))
    }
}

/// A log field as text (numbers and strings alike).
fn field(l: &Value, k: &str) -> String {
    match &l[k] {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// Replace `from` (which must occur) by `to`.
fn sub(text: &mut String, from: &str, to: &str) {
    assert!(text.contains(from), "{from:?} not in the example");
    *text = text.replace(from, to);
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_from(src: &str, addr: SocketAddr, sni: &str, cfg: Arc<rustls::ClientConfig>) -> Tls {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{src}:0").parse().expect("src"))
        .expect("bind source");
    let s = sock.connect(addr).await.expect("connect");
    let name = ServerName::try_from(sni.to_string()).expect("sni");
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(cfg).connect(name, s),
    )
    .await
    .expect("handshake in time")
    .expect("handshake")
}

fn peer_dns(t: &Tls) -> Vec<String> {
    let der = t.get_ref().1.peer_certificates().expect("certs")[0].clone();
    let (_, c) = x509_parser::parse_x509_certificate(der.as_ref()).expect("x509");
    let mut v = Vec::new();
    if let Ok(Some(ext)) = c.subject_alternative_name() {
        for n in &ext.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(s) = n {
                v.push(s.to_string());
            }
        }
    }
    v
}

/// One HTTP/1.1 request over a fresh TLS connection from `src`.
async fn https(
    src: &str,
    addr: SocketAddr,
    certs: &Certs,
    sni: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, Bytes) {
    let t = tls_from(src, addr, sni, certs.client(&["http/1.1"])).await;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(t))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", sni);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        tx.send_request(req.body(Full::new(Bytes::new())).expect("req")),
    )
    .await
    .expect("response in time")
    .expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, body)
}

async fn grpc_health_server() -> SocketAddr {
    let (_reporter, svc) = tonic_health::server::health_reporter();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let incoming = futures::stream::unfold(l, |l| async move {
            let r = l.accept().await.map(|(s, _)| s);
            Some((r, l))
        });
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await;
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_gateway_example_behaves_as_documented() {
    let dir = std::env::temp_dir().join(format!("weir-gateway-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let certs = Certs::new();
    certs.leaf(&dir, "www", &["www.example.com", "example.com"]);
    certs.leaf(&dir, "api", &["api.example.com"]);
    let jwt = Jwt::new();
    std::fs::write(dir.join("jwks.json"), jwt.jwks()).expect("jwks");
    let log = dir.join("access.log");

    let web = Backend::start("web").await;
    let api = Backend::start("api").await;
    let grpc = grpc_health_server().await;
    let ws = ws_echo().await;

    let mut yaml = EXAMPLE.to_string();
    let d = dir.display().to_string();
    sub(&mut yaml, "/etc/weir/certs/", &format!("{d}/"));
    sub(&mut yaml, "/etc/weir/jwks.json", &format!("{d}/jwks.json"));
    sub(
        &mut yaml,
        "/var/log/weir/access.log",
        &log.display().to_string(),
    );
    for p in ["9901", "8080", "8443"] {
        sub(&mut yaml, &format!("port_value: {p}}}"), "port_value: 0}");
    }
    for (p, port) in [
        ("18081", web.port()),
        ("18082", api.port()),
        ("18083", grpc.port()),
        ("18084", ws.port()),
    ] {
        sub(
            &mut yaml,
            &format!("port_value: {p}}}"),
            &format!("port_value: {port}}}"),
        );
    }
    sub(
        &mut yaml,
        "token_bucket: {max_tokens: 10, tokens_per_fill: 10, fill_interval: 1s}",
        "token_bucket: {max_tokens: 10, tokens_per_fill: 10, fill_interval: 3600s}",
    );
    let p = Proxy::start(&yaml).await;
    let (http_addr, https_addr) = (p.addr("http"), p.addr("https"));

    // SNI picks the certificate; no SNI match falls back to www.
    for (sni, want) in [
        ("www.example.com", "www.example.com"),
        ("example.com", "www.example.com"),
        ("api.example.com", "api.example.com"),
    ] {
        let t = tls_from("127.0.0.1", https_addr, sni, certs.client(&["http/1.1"])).await;
        assert!(
            peer_dns(&t).contains(&want.to_string()),
            "{sni}: {:?}",
            peer_dns(&t)
        );
    }

    // HTTP -> HTTPS, 301, path and query kept.
    let (s, h, _) = crate::harness::get(http_addr, "www.example.com", "/shop?item=3").await;
    assert_eq!(s, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(h["location"], "https://www.example.com/shop?item=3");
    assert_eq!(web.hits(), 0);

    // The site, with HSTS.
    let (s, h, body) = https("127.0.0.1", https_addr, &certs, "www.example.com", "/", &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        h["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
    let seen: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(seen["backend"], "web");
    // use_remote_address: XFF is the real peer.
    assert_eq!(seen["headers"]["x-forwarded-for"], "127.0.0.1");

    // JWT on /api/: none or malformed -> 401, another audience -> 403, a valid token -> 200
    // with the claim.
    let (s, h, _) = https(
        "127.0.0.1",
        https_addr,
        &certs,
        "api.example.com",
        "/api/orders",
        &[],
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(h.contains_key("www-authenticate"));
    let wrong = format!("Bearer {}", jwt.token("other.example.com"));
    let (s, _, _) = https(
        "127.0.0.1",
        https_addr,
        &certs,
        "api.example.com",
        "/api/orders",
        &[("authorization", &wrong)],
    )
    .await;
    // Envoy: a verified token for another audience is 403 ("Audiences in Jwt are not
    // allowed"), a missing or bad one 401.
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = https(
        "127.0.0.1",
        https_addr,
        &certs,
        "api.example.com",
        "/api/orders",
        &[("authorization", "Bearer not.a.jwt")],
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(api.hits(), 0);
    let good = format!("Bearer {}", jwt.token("api.example.com"));
    let (s, h, body) = https(
        "127.0.0.1",
        https_addr,
        &certs,
        "api.example.com",
        "/api/orders",
        &[("authorization", &good)],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let seen: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(seen["backend"], "api");
    assert_eq!(seen["headers"]["x-jwt-sub"], "alice");
    assert!(seen["headers"].get("authorization").is_none());
    assert_eq!(h["x-ratelimit-limit"], "10");

    // Per-client limit: 10 per client address (one used above), then 429 for that client
    // only; another address has its own bucket; other routes are not limited.
    for i in 2..=10 {
        let (s, _, _) = https(
            "127.0.0.1",
            https_addr,
            &certs,
            "api.example.com",
            "/api/orders",
            &[("authorization", &good)],
        )
        .await;
        assert_eq!(s, StatusCode::OK, "request {i}");
    }
    let (s, h, _) = https(
        "127.0.0.1",
        https_addr,
        &certs,
        "api.example.com",
        "/api/orders",
        &[("authorization", &good)],
    )
    .await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(h["x-envoy-ratelimited"], "true");
    let (s, _, _) = https(
        "127.0.0.2",
        https_addr,
        &certs,
        "api.example.com",
        "/api/orders",
        &[("authorization", &good)],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "127.0.0.2 has its own bucket");
    let (s, _, _) = https("127.0.0.1", https_addr, &certs, "www.example.com", "/", &[]).await;
    assert_eq!(s, StatusCode::OK, "the site is not rate limited");
    assert_eq!(p.stat("per_client.http_local_rate_limit.rate_limited"), 1);

    // gRPC over TLS + h2 to the gRPC backend: grpc.health.v1.Health/Check -> SERVING.
    let t = tls_from(
        "127.0.0.1",
        https_addr,
        "api.example.com",
        certs.client(&["h2"]),
    )
    .await;
    assert_eq!(t.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(t))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let resp = tx
        .send_request(
            Request::post("https://api.example.com/grpc.health.v1.Health/Check")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
                .expect("req"),
        )
        .await
        .expect("grpc response");
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await.expect("grpc body");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    // One message: not compressed, length 2, field 1 = SERVING (1).
    assert_eq!(&collected.to_bytes()[..], &[0, 0, 0, 0, 2, 8, 1]);

    // WebSocket upgrade over TLS to the echo backend.
    {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let t = tls_from(
            "127.0.0.1",
            https_addr,
            "www.example.com",
            certs.client(&["http/1.1"]),
        )
        .await;
        let (mut sock, resp) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::client_async("wss://www.example.com/ws", t),
        )
        .await
        .expect("upgrade in time")
        .expect("websocket upgrade");
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        sock.send(Message::text("ping through weir"))
            .await
            .expect("send");
        let echoed = tokio::time::timeout(Duration::from_secs(10), sock.next())
            .await
            .expect("echo in time")
            .expect("a message")
            .expect("ok");
        assert_eq!(
            echoed.into_text().expect("text").as_str(),
            "ping through weir"
        );
        let _ = sock.close(None).await;
    }

    // The access log: one JSON line per request, with the SNI and the client.
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    // Lines are written asynchronously (buffered, flushed every 100 ms) and an HTTP/2
    // stream's line when the stream ends: wait for every line this test checks.
    eventually("access log lines", || {
        let text = read();
        text.lines().filter(|l| l.contains("/api/orders")).count() >= 15
            && text.contains("/grpc.health.v1.Health/Check")
    })
    .await;
    let lines: Vec<Value> = read()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let limited = lines
        .iter()
        .find(|l| field(l, "status") == "429")
        .expect("the 429 is logged");
    assert_eq!(field(limited, "flags"), "RL");
    assert_eq!(field(limited, "sni"), "api.example.com");
    assert_eq!(field(limited, "client"), "127.0.0.1");
    assert!(
        lines
            .iter()
            .any(|l| field(l, "path") == "/grpc.health.v1.Health/Check"
                && field(l, "protocol") == "HTTP/2"),
        "{lines:?}"
    );

    // Edge limits: the connection limit filter counted the HTTPS connections and limited
    // none; the overload manager samples memory and the global connection count, with
    // neither action active.
    let stats = p.stats();
    assert_eq!(stats["connection_limit.edge_cx.limited_connections"], "0");
    assert!(stats.contains_key("connection_limit.edge_cx.active_connections"));
    // The process's resident memory is well over 0.5% of 2 GiB (the test binary alone).
    eventually("fixed_heap sampled", || {
        p.stat("overload.envoy.resource_monitors.fixed_heap.pressure") >= 1
    })
    .await;
    assert_eq!(
        p.stat("overload.envoy.resource_monitors.fixed_heap.failed_updates"),
        0
    );
    for a in ["stop_accepting_requests", "disable_http_keepalive"] {
        let k = format!("overload.envoy.overload_actions.{a}.active");
        assert_eq!(p.stats().get(&k).map(String::as_str), Some("0"), "{k}");
    }
    assert!(p.stat("overload.envoy.resource_monitors.fixed_heap.pressure") < 80);
    assert_eq!(
        p.stats()
            .get("listener.0.0.0.0_0.downstream_global_cx_overflow")
            .map(String::as_str),
        Some("0")
    );
    p.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Kubernetes gateway's bootstrap (deploy/gateway/configmap.yaml) is the example with
/// Kubernetes paths: with the mounted files in place, weir loads it, edge limits included.
#[test]
fn kubernetes_gateway_bootstrap_loads() {
    let cm: serde_yaml::Value =
        serde_yaml::from_str(include_str!("../../../deploy/gateway/configmap.yaml"))
            .expect("configmap yaml");
    let mut text = cm["data"]["bootstrap.yaml"]
        .as_str()
        .expect("data.bootstrap.yaml")
        .to_string();
    // The Secret and ConfigMap volumes, as the kubelet would mount them.
    let dir = std::env::temp_dir().join(format!("weir-k8s-gateway-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let certs = Certs::new();
    certs.leaf(&dir, "www", &["www.example.com", "example.com"]);
    certs.leaf(&dir, "api", &["api.example.com"]);
    std::fs::write(dir.join("jwks.json"), Jwt::new().jwks()).expect("jwks");
    let d = dir.to_string_lossy().into_owned();
    sub(&mut text, "/etc/weir/certs/", &format!("{d}/"));
    sub(&mut text, "/etc/weir/jwt/", &format!("{d}/"));
    let opts = weir_proxy::cli::Options {
        config_yaml: Some(text),
        ..Default::default()
    };
    let snap = weir_proxy::config::load(&opts).unwrap_or_else(|e| panic!("weir refuses: {e}"));
    let names: Vec<&str> = snap.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["http", "https", "health"]);
    let overload = snap.limits.overload.as_ref().expect("overload_manager");
    assert_eq!(overload.monitors.len(), 2, "{overload:?}");
    assert_eq!(overload.actions.len(), 2, "{overload:?}");
    let health = snap
        .listeners
        .iter()
        .find(|l| l.name == "health")
        .expect("health");
    assert!(
        health.ignore_global_conn_limit,
        "probes are not refused by the global limit"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
