//! Authorization and authentication end to end: `envoy.filters.http.rbac`,
//! `envoy.filters.network.rbac` and `envoy.filters.http.jwt_authn` (local and remote JWKS)
//! in front of real backends; assertions on what clients and backends see, and on stats.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

use crate::harness::*;

const RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const RBAC_PER_ROUTE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute";
const NETWORK_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC";
const JWT: &str =
    "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication";
const JWT_PER_ROUTE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig";

/// An `http_filters` item with a block-YAML `typed_config` body.
fn filter(name: &str, type_url: &str, body: &str) -> String {
    let body: String = body
        .trim_matches('\n')
        .lines()
        .map(|l| format!("              {l}\n"))
        .collect();
    format!(
        "          - name: {name}\n            typed_config:\n              \"@type\": {type_url}\n{body}"
    )
}

/// A GET from a client socket bound to `src` (another loopback address = another client).
async fn get_from(
    src: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, Bytes) {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{src}:0").parse().expect("src"))
        .expect("bind");
    let s = sock.connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", "api.local");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tx
        .send_request(req.body(Full::new(Bytes::new())).expect("req"))
        .await
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (parts.status, parts.headers, body)
}

async fn get_h(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, http::HeaderMap, Bytes) {
    get_from("127.0.0.1", addr, path, headers).await
}

// ---------------------------------------------------------------------------------------------
// HTTP RBAC

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_rbac_allows_and_denies_by_path_header_and_source_ip() {
    let b = Backend::start("b").await;
    let rbac = filter(
        "envoy.filters.http.rbac",
        RBAC,
        "
rules:
  action: ALLOW
  policies:
    admins:
      permissions: [{url_path: {path: {prefix: /admin}}}]
      principals: [{header: {name: x-role, string_match: {exact: admin}}}]
    public-get:
      permissions:
      - and_rules: {rules: [{url_path: {path: {prefix: /public}}}, {header: {name: ':method', string_match: {exact: GET}}}]}
      principals: [{any: true}]
    trusted-host:
      permissions: [{any: true}]
      principals: [{direct_remote_ip: {address_prefix: 127.0.0.2, prefix_len: 32}}]
",
    );
    let p = Proxy::start(&http_bootstrap_filters(
        &all_to("b", "5s"),
        &cluster("b", &[b.port()]),
        "",
        &rbac,
    ))
    .await;
    let a = p.addr("http");
    let (s, _, _) = get_h(a, "/public/x", &[]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = get_h(a, "/admin/x", &[("x-role", "admin")]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, body) = get_h(a, "/admin/x", &[("x-role", "user")]).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(body, "RBAC: access denied");
    let (s, _, _) = get_h(a, "/other", &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Another source address is trusted for everything.
    let (s, _, _) = get_from("127.0.0.2", a, "/other", &[]).await;
    assert_eq!(s, StatusCode::OK);
    // x-forwarded-for does not make a client "direct_remote_ip".
    let (s, _, _) = get_h(a, "/other", &[("x-forwarded-for", "127.0.0.2")]).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(b.hits(), 3, "denied requests never reach the backend");
    assert_eq!(p.stat("http.ingress.rbac.allowed"), 3);
    assert_eq!(p.stat("http.ingress.rbac.denied"), 3);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_rbac_shadow_rules_count_only_and_per_route_disable() {
    let b = Backend::start("b").await;
    let vhosts = format!(
        "            - name: all\n              domains: [\"*\"]\n              routes:\n\
         \x20             - match: {{prefix: /open}}\n                route: {{cluster: b}}\n\
         \x20               typed_per_filter_config:\n                  envoy.filters.http.rbac: {{\"@type\": {RBAC_PER_ROUTE}}}\n\
         \x20             - match: {{prefix: /}}\n                route: {{cluster: b}}\n"
    );
    let rbac = filter(
        "envoy.filters.http.rbac",
        RBAC,
        "
rules:
  action: DENY
  policies:
    no-delete:
      permissions: [{header: {name: ':method', string_match: {exact: DELETE}}}]
      principals: [{any: true}]
shadow_rules:
  action: DENY
  policies:
    would-block-secret:
      permissions: [{url_path: {path: {prefix: /secret}}}]
      principals: [{any: true}]
shadow_rules_stat_prefix: dry_
",
    );
    let p = Proxy::start(&http_bootstrap_filters(
        &vhosts,
        &cluster("b", &[b.port()]),
        "",
        &rbac,
    ))
    .await;
    let a = p.addr("http");
    // The shadow would deny /secret: counted, not enforced.
    let (s, _, _) = get_h(a, "/secret", &[]).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = get_h(a, "/fine", &[]).await;
    assert_eq!(s, StatusCode::OK);
    let del = |path: &'static str| {
        send(
            a,
            Request::delete(path)
                .header("host", "x")
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
    };
    let (s, _, _) = del("/thing").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Disabled on /open.
    let (s, _, _) = del("/open/thing").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(p.stat("http.ingress.rbac.allowed"), 2);
    assert_eq!(p.stat("http.ingress.rbac.denied"), 1);
    assert_eq!(p.stat("http.ingress.rbac.dry_shadow_denied"), 1);
    assert_eq!(p.stat("http.ingress.rbac.dry_shadow_allowed"), 2);
    p.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Network RBAC

/// A free local port (bound then released), for configs that must name the port.
async fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr").port()
}

/// Connect from `src`, write, read until EOF or 2 s: what came back.
async fn echo_from(src: &str, addr: SocketAddr) -> Vec<u8> {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{src}:0").parse().expect("src"))
        .expect("bind");
    let mut s = sock.connect(addr).await.expect("connect");
    // The write may fail if the proxy already closed: that is a denial too.
    let _ = s.write_all(b"ping").await;
    let mut out = Vec::new();
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if out.len() >= 4 {
                        break;
                    }
                }
            }
        }
    })
    .await;
    out
}

fn network_rbac_bootstrap(echo: SocketAddr, port: u16, rules: &str) -> String {
    let rules: String = rules
        .trim_matches('\n')
        .lines()
        .map(|l| format!("          {l}\n"))
        .collect();
    tcp_bootstrap("echo", "e", "", &cluster("e", &[echo.port()]))
        .replacen("port_value: 0}}\n    filter_chains", &format!("port_value: {port}}}}}\n    filter_chains"), 1)
        .replacen(
            "    - filters:\n",
            &format!(
                "    - filters:\n      - name: envoy.filters.network.rbac\n        typed_config:\n          \"@type\": {NETWORK_RBAC}\n{rules}"
            ),
            1,
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_rbac_closes_denied_connections_by_source_ip() {
    let echo = tcp_echo().await;
    let yaml = network_rbac_bootstrap(
        echo,
        0,
        "
stat_prefix: tcp_in
rules:
  action: DENY
  policies:
    blocked-client:
      permissions: [{any: true}]
      principals: [{source_ip: {address_prefix: 127.0.0.3, prefix_len: 32}}]
",
    );
    let p = Proxy::start(&yaml).await;
    let a = p.addr("tcp");
    assert_eq!(echo_from("127.0.0.1", a).await, b"ping");
    assert_eq!(echo_from("127.0.0.3", a).await, b"", "closed without data");
    assert_eq!(echo_from("127.0.0.4", a).await, b"ping");
    assert_eq!(p.stat("tcp_in.rbac.allowed"), 2);
    assert_eq!(p.stat("tcp_in.rbac.denied"), 1);
    assert_eq!(
        p.stat("tcp.echo.downstream_cx_total"),
        2,
        "the denied one never reached tcp_proxy"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_rbac_allow_by_destination_port_with_shadow() {
    let echo = tcp_echo().await;
    let port = free_port().await;
    // Only the listener's own port is allowed; the shadow policy (other port) denies all.
    let allowed = network_rbac_bootstrap(
        echo,
        port,
        &format!(
            "
stat_prefix: by_port
rules:
  action: ALLOW
  policies:
    this-port: {{permissions: [{{destination_port: {port}}}], principals: [{{any: true}}]}}
shadow_rules:
  action: ALLOW
  policies:
    other-port: {{permissions: [{{destination_port_range: {{start: 1, end: {port}}}}}], principals: [{{any: true}}]}}
"
        ),
    );
    let p = Proxy::start(&allowed).await;
    assert_eq!(echo_from("127.0.0.1", p.addr("tcp")).await, b"ping");
    assert_eq!(p.stat("by_port.rbac.allowed"), 1);
    assert_eq!(p.stat("by_port.rbac.shadow_denied"), 1);
    p.stop().await;
    // The same rule naming another port denies.
    let port = free_port().await;
    let denied = network_rbac_bootstrap(
        echo,
        port,
        &format!(
            "
stat_prefix: by_port
rules:
  action: ALLOW
  policies:
    other: {{permissions: [{{destination_port: {}}}], principals: [{{any: true}}]}}
",
            port.wrapping_add(1)
        ),
    );
    let p = Proxy::start(&denied).await;
    assert_eq!(echo_from("127.0.0.1", p.addr("tcp")).await, b"");
    assert_eq!(p.stat("by_port.rbac.denied"), 1);
    p.stop().await;
}

// ---------------------------------------------------------------------------------------------
// JWT

/// An ES256 signing key with its JWK.
struct Key {
    kid: String,
    kp: EcdsaKeyPair,
}

impl Key {
    fn new(kid: &str) -> Key {
        let rng = SystemRandom::new();
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("gen");
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("key");
        Key {
            kid: kid.into(),
            kp,
        }
    }

    fn jwk(&self) -> Value {
        let pt = self.kp.public_key().as_ref();
        json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": self.kid,
               "x": B64.encode(&pt[1..33]), "y": B64.encode(&pt[33..])})
    }

    fn token(&self, claims: &Value) -> String {
        let h = B64.encode(json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"}).to_string());
        let p = B64.encode(claims.to_string());
        let sig = self
            .kp
            .sign(&SystemRandom::new(), format!("{h}.{p}").as_bytes())
            .expect("sign");
        format!("{h}.{p}.{}", B64.encode(sig.as_ref()))
    }
}

fn jwks(keys: &[&Key]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn claims(iss: &str, aud: &str, exp_in: i64) -> Value {
    json!({"iss": iss, "aud": aud, "sub": "alice@example.com", "exp": (now() as i64 + exp_in),
           "groups": ["dev", "ops"]})
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// Routes: `/open` (jwt_authn disabled), `/optional` (requirement `optional`), `/` (rules).
fn jwt_vhosts() -> String {
    format!(
        "            - name: all\n              domains: [\"*\"]\n              routes:\n\
         \x20             - match: {{prefix: /open}}\n                route: {{cluster: b}}\n\
         \x20               typed_per_filter_config:\n                  envoy.filters.http.jwt_authn: {{\"@type\": {JWT_PER_ROUTE}, disabled: true}}\n\
         \x20             - match: {{prefix: /optional}}\n                route: {{cluster: b}}\n\
         \x20               typed_per_filter_config:\n                  envoy.filters.http.jwt_authn: {{\"@type\": {JWT_PER_ROUTE}, requirement_name: optional}}\n\
         \x20             - match: {{prefix: /}}\n                route: {{cluster: b}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_local_jwks_accepts_and_rejects_like_envoy() {
    let b = Backend::start("b").await;
    let key = Key::new("k1");
    let stranger = Key::new("k1"); // same kid, other key: signature fails
    let dir = std::env::temp_dir().join(format!("weir-authz-jwks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let jwks_file = dir.join("jwks.json");
    std::fs::write(&jwks_file, jwks(&[&key])).expect("write");
    let jwt = filter(
        "envoy.filters.http.jwt_authn",
        JWT,
        &format!(
            "
providers:
  corp:
    issuer: https://issuer.corp
    audiences: [api.corp]
    local_jwks: {{filename: {}}}
    forward_payload_header: x-jwt-payload
    claim_to_headers:
    - {{header_name: x-jwt-sub, claim_name: sub}}
    - {{header_name: x-jwt-groups, claim_name: groups}}
rules:
- match: {{prefix: /}}
  requires: {{provider_name: corp}}
requirement_map:
  optional: {{requires_any: {{requirements: [{{provider_name: corp}}, {{allow_missing: {{}}}}]}}}}
",
            jwks_file.display()
        ),
    );
    let p = Proxy::start(&http_bootstrap_filters(
        &jwt_vhosts(),
        &cluster("b", &[b.port()]),
        "",
        &jwt,
    ))
    .await;
    let a = p.addr("http");

    // Accepted: the claims reach the upstream; the token does not (forward: false); a spoofed
    // claim header is replaced.
    let good = key.token(&claims("https://issuer.corp", "api.corp", 300));
    let (s, _, body) = get_h(
        a,
        "/api",
        &[("authorization", &bearer(&good)), ("x-jwt-sub", "mallory")],
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let seen = json(&body);
    assert_eq!(seen["headers"]["x-jwt-sub"], "alice@example.com");
    assert_eq!(seen["headers"]["x-jwt-groups"], "dev,ops");
    assert!(seen["headers"].get("authorization").is_none());
    let payload = seen["headers"]["x-jwt-payload"].as_str().expect("payload");
    let payload: Value = serde_json::from_slice(&B64.decode(payload).expect("b64")).expect("json");
    assert_eq!(payload["iss"], "https://issuer.corp");

    let realm = "Bearer realm=\"http://api.local/api\", error=\"invalid_token\"";
    let cases = [
        (
            key.token(&claims("https://issuer.corp", "api.corp", -3600)),
            StatusCode::UNAUTHORIZED,
            "Jwt is expired",
        ),
        (
            key.token(&claims("https://evil.example", "api.corp", 300)),
            StatusCode::UNAUTHORIZED,
            "Jwt issuer is not configured",
        ),
        (
            stranger.token(&claims("https://issuer.corp", "api.corp", 300)),
            StatusCode::UNAUTHORIZED,
            "Jwt verification fails",
        ),
        (
            key.token(&claims("https://issuer.corp", "billing.corp", 300)),
            StatusCode::FORBIDDEN,
            "Audiences in Jwt are not allowed",
        ),
    ];
    for (t, code, msg) in &cases {
        let (s, h, body) = get_h(a, "/api", &[("authorization", &bearer(t))]).await;
        assert_eq!(s, *code, "{msg}");
        assert_eq!(body, *msg);
        assert_eq!(h["www-authenticate"], realm);
    }
    // Missing token: required on /api, optional on /optional, not checked on /open.
    let (s, h, body) = get_h(a, "/api", &[]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(body, "Jwt is missing");
    assert_eq!(
        h["www-authenticate"],
        "Bearer realm=\"http://api.local/api\""
    );
    let (s, _, _) = get_h(a, "/optional", &[]).await;
    assert_eq!(s, StatusCode::OK);
    let expired = key.token(&claims("https://issuer.corp", "api.corp", -3600));
    let (s, _, _) = get_h(a, "/optional", &[("authorization", &bearer(&expired))]).await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "present but invalid still fails"
    );
    let (s, _, _) = get_h(a, "/open", &[("authorization", "Bearer garbage")]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b.hits(), 3);
    assert_eq!(p.stat("http.ingress.jwt_authn.allowed"), 2);
    assert_eq!(p.stat("http.ingress.jwt_authn.denied"), 6);
    p.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// An HTTP server answering every request with the current JWKS, counting requests.
struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(initial: String) -> JwksServer {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let body = Arc::new(Mutex::new(initial));
        let hits = Arc::new(AtomicUsize::new(0));
        let (b, h) = (body.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let (b, h) = (b.clone(), h.clone());
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (b, h) = (b.clone(), h.clone());
                            async move {
                                h.fetch_add(1, Ordering::SeqCst);
                                let text = b.lock().expect("lock").clone();
                                let mut r = Response::new(Full::new(Bytes::from(text)));
                                if req.uri().path() != "/.well-known/jwks.json" {
                                    *r.status_mut() = StatusCode::NOT_FOUND;
                                }
                                Ok::<_, Infallible>(r)
                            }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        JwksServer { addr, body, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn remote_jwt_filter(cache: &str) -> String {
    filter(
        "envoy.filters.http.jwt_authn",
        JWT,
        &format!(
            "
providers:
  idp:
    issuer: https://idp.test
    remote_jwks:
      http_uri: {{uri: 'http://idp.test/.well-known/jwks.json', cluster: idp, timeout: 2s}}
      cache_duration: {cache}
    claim_to_headers: [{{header_name: x-jwt-sub, claim_name: sub}}]
rules:
- match: {{prefix: /}}
  requires: {{provider_name: idp}}
"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_remote_jwks_is_fetched_through_a_cluster_once_and_rotated_on_expiry() {
    let b = Backend::start("b").await;
    let k1 = Key::new("k1");
    let k2 = Key::new("k2");
    let idp = JwksServer::start(jwks(&[&k1])).await;
    let clusters = format!(
        "{}{}",
        cluster("b", &[b.port()]),
        cluster("idp", &[idp.addr.port()])
    );
    let p = Proxy::start(&http_bootstrap_filters(
        &all_to("b", "5s"),
        &clusters,
        "",
        &remote_jwt_filter("2s"),
    ))
    .await;
    let a = p.addr("http");
    let t1 = bearer(&k1.token(&claims("https://idp.test", "x", 300)));
    // Concurrent first requests share one fetch; later ones use the cache.
    let hdrs = [("authorization", t1.as_str())];
    let first = futures::future::join_all((0..4).map(|_| get_h(a, "/", &hdrs))).await;
    for (s, _, body) in &first {
        assert_eq!(*s, StatusCode::OK, "{}", String::from_utf8_lossy(body));
        assert_eq!(json(body)["headers"]["x-jwt-sub"], "alice@example.com");
    }
    for _ in 0..3 {
        let (s, _, _) = get_h(a, "/", &[("authorization", &t1)]).await;
        assert_eq!(s, StatusCode::OK);
    }
    assert_eq!(
        idp.hits(),
        1,
        "fetched once, cached across requests and workers"
    );
    assert_eq!(p.stat("http.ingress.jwt_authn.jwks_fetch_success"), 1);
    assert_eq!(p.stat("cluster.idp.upstream_rq_total"), 1);

    // Rotate: k2 tokens fail until the cache (2 s) expires, then the refetch finds k2.
    *idp.body.lock().expect("lock") = jwks(&[&k2]);
    let t2 = bearer(&k2.token(&claims("https://idp.test", "x", 300)));
    let (s, _, body) = get_h(a, "/", &[("authorization", &t2)]).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(body, "Jwks doesn't have key to match kid or alg from Jwt");
    let mut accepted = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (s, _, _) = get_h(a, "/", &[("authorization", &t2)]).await;
        if s == StatusCode::OK {
            accepted = true;
            break;
        }
    }
    assert!(
        accepted,
        "the rotated key is picked up after cache_duration"
    );
    assert_eq!(idp.hits(), 2);
    assert_eq!(p.stat("http.ingress.jwt_authn.jwks_fetch_success"), 2);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_remote_jwks_failures_answer_401_and_count() {
    let b = Backend::start("b").await;
    let k = Key::new("k1");
    // The cluster points at a closed port.
    let dead = free_port().await;
    let clusters = format!("{}{}", cluster("b", &[b.port()]), cluster("idp", &[dead]));
    let p = Proxy::start(&http_bootstrap_filters(
        &all_to("b", "5s"),
        &clusters,
        "",
        &remote_jwt_filter("600s"),
    ))
    .await;
    let t = bearer(&k.token(&claims("https://idp.test", "x", 300)));
    for i in 1..=2 {
        let (s, h, body) = get_h(p.addr("http"), "/", &[("authorization", &t)]).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(body, "Jwks remote fetch is failed");
        assert!(
            h["www-authenticate"]
                .to_str()
                .expect("v")
                .contains("invalid_token")
        );
        assert_eq!(p.stat("http.ingress.jwt_authn.jwks_fetch_failed"), i);
    }
    assert_eq!(b.hits(), 0);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_remote_jwks_non_200_and_unknown_cluster_fail_the_fetch() {
    let b = Backend::start("b").await;
    let k = Key::new("k1");
    let idp = JwksServer::start(jwks(&[&k])).await;
    let t = bearer(&k.token(&claims("https://idp.test", "x", 300)));
    // The JWKS server answers 404 on another path.
    let not_found = remote_jwt_filter("600s").replace("/.well-known/jwks.json", "/missing");
    // A cluster that does not exist.
    let no_cluster = remote_jwt_filter("600s").replace("cluster: idp", "cluster: nowhere");
    for (filter_yaml, idp_hits) in [(not_found, 1), (no_cluster, 1)] {
        let clusters = format!(
            "{}{}",
            cluster("b", &[b.port()]),
            cluster("idp", &[idp.addr.port()])
        );
        let p = Proxy::start(&http_bootstrap_filters(
            &all_to("b", "5s"),
            &clusters,
            "",
            &filter_yaml,
        ))
        .await;
        let (s, _, body) = get_h(p.addr("http"), "/", &[("authorization", &t)]).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(body, "Jwks remote fetch is failed");
        assert_eq!(p.stat("http.ingress.jwt_authn.jwks_fetch_failed"), 1);
        assert_eq!(p.stat("http.ingress.jwt_authn.jwks_fetch_success"), 0);
        assert_eq!(idp.hits(), idp_hits);
        p.stop().await;
    }
    assert_eq!(b.hits(), 0);
}

/// A denial's `%RESPONSE_CODE_DETAILS%` names the matched policy as Envoy's does
/// (`rbac_access_denied_matched_policy[<name>]`; `[none]` when no ALLOW policy matched).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_rbac_denial_details_name_the_matched_policy() {
    let b = Backend::start("b").await;
    let log = std::env::temp_dir().join(format!("weir-rbac-details-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let access_log = format!(
        "          access_log: [{{name: f, typed_config: {{'@type': type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog, path: {}, log_format: {{text_format_source: {{inline_string: \"%REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_CODE_DETAILS%\\n\"}}}}}}}}]",
        log.display()
    );
    let rbac = filter(
        "envoy.filters.http.rbac",
        RBAC,
        "
rules:
  action: DENY
  policies:
    block-admin:
      permissions: [{url_path: {path: {prefix: /admin}}}]
      principals: [{any: true}]
",
    );
    let p = Proxy::start(&http_bootstrap_filters(
        &all_to("b", "5s"),
        &cluster("b", &[b.port()]),
        &access_log,
        &rbac,
    ))
    .await;
    let a = p.addr("http");
    let (s, _, _) = get_h(a, "/admin/x", &[]).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = get_h(a, "/ok", &[]).await;
    assert_eq!(s, StatusCode::OK);
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("two access log lines", || read().lines().count() >= 2).await;
    let text = read();
    assert!(
        text.contains("/admin/x 403 rbac_access_denied_matched_policy[block-admin]\n"),
        "{text}"
    );
    assert!(text.contains("/ok 200 via_upstream\n"), "{text}");
    p.stop().await;
    let _ = std::fs::remove_file(&log);
}
