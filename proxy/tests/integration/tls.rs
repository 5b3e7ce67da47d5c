//! TLS: termination with SNI certificate selection, passthrough by SNI (tls_inspector),
//! mTLS with SAN matchers, upstream mTLS with SAN verification, tcp_proxy terminating and
//! originating TLS, ALPN h2 end to end, file
//! SDS rotation with an open connection, handshake and listener-filter timeouts.
//! Certificates are generated per test with rcgen (a test CA, leaf certificates with DNS and
//! SPIFFE URI SANs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{Backend, Proxy, eventually};

// ---------------------------------------------------------------------------------------------
// Test PKI

struct Pki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

#[derive(Clone)]
struct Leaf {
    cert: String,
    key: String,
}

impl Pki {
    fn new(cn: &str) -> Pki {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("key");
        Pki {
            ca: rcgen::CertifiedIssuer::self_signed(p, key).expect("ca"),
        }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    fn leaf(&self, dns: &[&str], uris: &[&str]) -> Leaf {
        let mut p =
            rcgen::CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        for u in uris {
            p.subject_alt_names.push(rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(*u).expect("uri"),
            ));
        }
        p.distinguished_name.push(
            rcgen::DnType::CommonName,
            dns.first().copied().unwrap_or("leaf"),
        );
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.ca).expect("sign");
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut r = rustls::RootCertStore::empty();
        r.add(self.ca.der().clone()).expect("root");
        r
    }
}

fn chain(l: &Leaf) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(l.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("chain")
}

fn key(l: &Leaf) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(l.key.as_bytes()).expect("key")
}

/// DNS / URI SANs of a DER certificate.
fn sans_of(der: &[u8]) -> Vec<String> {
    let (_, c) = x509_parser::parse_x509_certificate(der).expect("x509");
    let mut v = Vec::new();
    if let Ok(Some(ext)) = c.subject_alternative_name() {
        for n in &ext.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(s) => v.push(s.to_string()),
                x509_parser::extensions::GeneralName::URI(s) => v.push(s.to_string()),
                _ => {}
            }
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Clients and backends

fn client_config(pki: &Pki, identity: Option<&Leaf>, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    weir_proxy::tls::install_default_provider();
    let b = rustls::ClientConfig::builder().with_root_certificates(pki.roots());
    let mut c = match identity {
        Some(l) => b
            .with_client_auth_cert(chain(l), key(l))
            .expect("client cert"),
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Arc::new(c)
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<Tls> {
    let s = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).expect("sni");
    let mut t = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, s)
        .await?;
    // TLS 1.3 reports a rejected client certificate only after the client's first flight:
    // a zero-byte flush makes that surface on the first request instead.
    t.flush().await?;
    Ok(t)
}

fn peer_sans(t: &Tls) -> Vec<String> {
    let (_, c) = t.get_ref();
    sans_of(c.peer_certificates().expect("peer certs")[0].as_ref())
}

/// One HTTP/1.1 request on an established TLS stream; `Err` when the exchange fails.
async fn h1_on(t: Tls, path: &str) -> Result<(StatusCode, Bytes), String> {
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(t))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = tx
        .send_request(
            Request::get(path)
                .header("host", "example")
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// TLS connect + one request; `Err` if the handshake or the request fails.
async fn tls_get(
    addr: SocketAddr,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> Result<(StatusCode, Bytes), String> {
    let t = tokio::time::timeout(Duration::from_secs(5), tls_connect(addr, sni, cfg))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(5), h1_on(t, "/"))
        .await
        .map_err(|_| "request timed out".to_string())?
}

/// A backend that terminates TLS itself (optionally requiring a client certificate from
/// `client_ca`) and answers JSON: its name, the HTTP version, the client certificate's SANs.
async fn tls_backend(
    name: &str,
    leaf: &Leaf,
    client_ca: Option<&Pki>,
    alpn: &[&str],
) -> SocketAddr {
    weir_proxy::tls::install_default_provider();
    let b = rustls::ServerConfig::builder();
    let b = match client_ca {
        Some(ca) => b.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder(Arc::new(ca.roots()))
                .build()
                .expect("verifier"),
        ),
        None => b.with_no_client_auth(),
    };
    let mut cfg = b
        .with_single_cert(chain(leaf), key(leaf))
        .expect("server cfg");
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let name = name.to_string();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let (acceptor, name) = (acceptor.clone(), name.clone());
            tokio::spawn(async move {
                let Ok(t) = acceptor.accept(s).await else {
                    return;
                };
                let peer = t
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| sans_of(c[0].as_ref()))
                    .unwrap_or_default();
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let body = json!({
                        "name": name,
                        "version": format!("{:?}", req.version()),
                        "peer": peer,
                        "xfcc": req.headers().get("x-forwarded-client-cert")
                            .and_then(|v| v.to_str().ok()),
                    })
                    .to_string();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(t), svc)
                    .await;
            });
        }
    });
    addr
}

// ---------------------------------------------------------------------------------------------
// Config builders (JSON is YAML)

fn inline(s: &str) -> Value {
    json!({ "inline_string": s })
}

fn cert_json(l: &Leaf) -> Value {
    json!({ "certificate_chain": inline(&l.cert), "private_key": inline(&l.key) })
}

fn downstream(common: Value, extra: Value) -> Value {
    let mut ctx = json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": common,
    });
    if let (Some(m), Value::Object(e)) = (ctx.as_object_mut(), extra) {
        m.extend(e);
    }
    json!({ "name": "envoy.transport_sockets.tls", "typed_config": ctx })
}

fn upstream(common: Value, extra: Value) -> Value {
    let mut ctx = json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": common,
    });
    if let (Some(m), Value::Object(e)) = (ctx.as_object_mut(), extra) {
        m.extend(e);
    }
    json!({ "name": "envoy.transport_sockets.tls", "typed_config": ctx })
}

fn hcm(cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "ingress",
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
            }],
            "route_config": {"name": "local", "virtual_hosts": [{
                "name": "all", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "5s"}}]
            }]}
        }
    })
}

fn tcp(cluster: &str) -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": cluster, "cluster": cluster
        }
    })
}

fn cluster(name: &str, addr: SocketAddr, ts: Option<Value>) -> Value {
    let mut c = json!({
        "name": name, "connect_timeout": "2s", "type": "STATIC",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": addr.port()}}}}
        ]}]}
    });
    if let Some(ts) = ts {
        c["transport_socket"] = ts;
    }
    c
}

fn listener(chains: Vec<Value>, extra: Value) -> Value {
    let mut l = json!({
        "name": "tls",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": chains,
    });
    if let (Some(m), Value::Object(e)) = (l.as_object_mut(), extra) {
        m.extend(e);
    }
    l
}

fn bootstrap(listeners: Vec<Value>, clusters: Vec<Value>) -> String {
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": listeners, "clusters": clusters}
    })
    .to_string()
}

const L: &str = "listener.127.0.0.1_0.";

async fn admin_get(p: &Proxy, path: &str) -> Value {
    let (status, _, body) = crate::harness::get(p.admin(), "admin", path).await;
    assert_eq!(status, StatusCode::OK, "{path}");
    serde_json::from_slice(&body).expect("json")
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn termination_picks_the_certificate_by_sni() {
    let pki = Pki::new("test ca");
    // a.test also covers 127.0.0.1, so a client without SNI can verify the fallback.
    let (a, b) = (
        pki.leaf(&["a.test", "127.0.0.1"], &[]),
        pki.leaf(&["*.b.test"], &[]),
    );
    let backend = Backend::start("plain").await;
    let ts = downstream(
        json!({"tls_certificates": [cert_json(&a), cert_json(&b)]}),
        json!({}),
    );
    let p = Proxy::start(&bootstrap(
        vec![listener(
            vec![json!({"filters": [hcm("plain")], "transport_socket": ts})],
            json!({}),
        )],
        vec![cluster("plain", backend.addr, None)],
    ))
    .await;
    let addr = p.addr("tls");
    let cfg = client_config(&pki, None, &[]);
    // An IP server name sends no SNI: the first certificate is the fallback.
    for (sni, want) in [
        ("a.test", "a.test"),
        ("x.b.test", "*.b.test"),
        ("127.0.0.1", "a.test"),
    ] {
        let t = tls_connect(addr, sni, cfg.clone())
            .await
            .expect("handshake");
        assert_eq!(peer_sans(&t)[0], want, "sni {sni}");
        let (status, body) = h1_on(t, "/").await.expect("request");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(crate::harness::json(&body)["backend"], "plain");
    }
    assert_eq!(p.stat(&format!("{L}ssl.handshake")), 3);
    assert_eq!(p.stat(&format!("{L}ssl.versions.TLSv1.3")), 3);
    assert_eq!(p.stat(&format!("{L}ssl.no_certificate")), 3);
    assert_eq!(p.stat(&format!("{L}ssl.connection_error")), 0);
    // The certificates are in admin /certs.
    let certs = admin_get(&p, "/certs").await;
    let chains = certs["certificates"][0]["cert_chain"]
        .as_array()
        .expect("chain")
        .clone();
    assert_eq!(chains.len(), 2, "{certs}");
    assert_eq!(chains[0]["subject_alt_names"][0]["dns"], "a.test");
    assert!(chains[0]["days_until_expiration"].as_str().is_some());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_by_sni_reaches_the_backend_that_terminates() {
    let pki = Pki::new("test ca");
    let a = tls_backend("a", &pki.leaf(&["a.test"], &[]), None, &[]).await;
    let b = tls_backend("b", &pki.leaf(&["b.test"], &[]), None, &[]).await;
    let chain = |sni: &str, c: &str| json!({"filter_chain_match": {"server_names": [sni]}, "filters": [tcp(c)]});
    let p = Proxy::start(&bootstrap(
        vec![listener(
            vec![chain("a.test", "a"), chain("b.test", "b")],
            json!({"listener_filters": [{
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}
            }]}),
        )],
        vec![cluster("a", a, None), cluster("b", b, None)],
    ))
    .await;
    let addr = p.addr("tls");
    let cfg = client_config(&pki, None, &[]);
    for name in ["a", "b", "a"] {
        let sni = format!("{name}.test");
        let t = tls_connect(addr, &sni, cfg.clone())
            .await
            .expect("handshake");
        // The certificate is the backend's own: weir did not terminate.
        assert_eq!(peer_sans(&t), vec![sni.clone()]);
        let (status, body) = h1_on(t, "/").await.expect("request");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(crate::harness::json(&body)["name"], name);
    }
    // An SNI no chain names: no filter chain, closed.
    assert!(tls_get(addr, "c.test", cfg.clone()).await.is_err());
    assert_eq!(p.stat("tls_inspector.tls_found"), 4);
    assert_eq!(p.stat("tls_inspector.sni_found"), 4);
    assert_eq!(p.stat(&format!("{L}no_filter_chain_match")), 1);
    // weir shook no hands.
    assert_eq!(p.stat(&format!("{L}ssl.handshake")), 0);
    p.stop().await;
}

fn mtls_listener(pki: &Pki, server: &Leaf, san_matchers: Value, cluster_name: &str) -> Value {
    let mut h = hcm(cluster_name);
    h["typed_config"]["forward_client_cert_details"] = json!("SANITIZE_SET");
    h["typed_config"]["set_current_client_cert_details"] = json!({"uri": true, "subject": true});
    listener(
        vec![json!({
            "filters": [h],
            "transport_socket": downstream(
                json!({
                    "tls_certificates": [cert_json(server)],
                    "validation_context": {
                        "trusted_ca": inline(&pki.ca_pem()),
                        "match_typed_subject_alt_names": san_matchers,
                    }
                }),
                json!({"require_client_certificate": true}),
            ),
        })],
        json!({}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_requires_a_client_certificate_with_a_matching_san() {
    let pki = Pki::new("test ca");
    let server = pki.leaf(&["a.test"], &[]);
    let backend = Backend::start("plain").await;
    let p = Proxy::start(&bootstrap(
        vec![mtls_listener(
            &pki,
            &server,
            json!([
                {"san_type": "URI", "matcher": {"exact": "spiffe://td/ns/default/sa/good"}},
                {"san_type": "URI", "matcher": {"prefix": "spiffe://td/ns/ops/"}},
            ]),
            "plain",
        )],
        vec![cluster("plain", backend.addr, None)],
    ))
    .await;
    let addr = p.addr("tls");

    // No client certificate: refused.
    let r = tls_get(addr, "a.test", client_config(&pki, None, &[])).await;
    assert!(r.is_err(), "{r:?}");
    eventually("fail_verify_no_cert", || {
        p.stat(&format!("{L}ssl.fail_verify_no_cert")) == 1
    })
    .await;

    // A certificate from the right CA with the wrong SPIFFE ID: refused.
    let bad = pki.leaf(&[], &["spiffe://td/ns/default/sa/bad"]);
    let r = tls_get(addr, "a.test", client_config(&pki, Some(&bad), &[])).await;
    assert!(r.is_err(), "{r:?}");
    eventually("fail_verify_san", || {
        p.stat(&format!("{L}ssl.fail_verify_san")) == 1
    })
    .await;

    // A certificate from another CA: refused as a verification error.
    let other = Pki::new("other ca");
    let foreign = other.leaf(&[], &["spiffe://td/ns/default/sa/good"]);
    let r = tls_get(addr, "a.test", client_config(&pki, Some(&foreign), &[])).await;
    assert!(r.is_err(), "{r:?}");
    eventually("fail_verify_error", || {
        p.stat(&format!("{L}ssl.fail_verify_error")) == 1
    })
    .await;

    // The right identities (exact, and prefix): accepted, and the backend learns the
    // client's identity from x-forwarded-client-cert (SANITIZE_SET).
    for id in ["spiffe://td/ns/default/sa/good", "spiffe://td/ns/ops/sa/x"] {
        let good = pki.leaf(&[], &[id]);
        let (status, body) = tls_get(addr, "a.test", client_config(&pki, Some(&good), &[]))
            .await
            .expect("accepted");
        assert_eq!(status, StatusCode::OK);
        let v = crate::harness::json(&body);
        let xfcc = v["headers"]["x-forwarded-client-cert"]
            .as_str()
            .expect("xfcc");
        let der = CertificateDer::pem_slice_iter(good.cert.as_bytes())
            .next()
            .expect("pem")
            .expect("der");
        let hash: String = {
            use sha2::Digest;
            sha2::Sha256::digest(der.as_ref())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        assert_eq!(xfcc, format!("Hash={hash};Subject=\"CN=leaf\";URI={id}"));
        assert_eq!(v["headers"]["x-forwarded-proto"], "https");
    }
    assert_eq!(p.stat(&format!("{L}ssl.handshake")), 2);
    assert_eq!(p.stat(&format!("{L}ssl.connection_error")), 3);
    assert_eq!(backend.hits(), 2);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_mtls_verifies_the_upstream_san() {
    let pki = Pki::new("test ca");
    // The upstream requires a client certificate from the test CA.
    let up = tls_backend("up", &pki.leaf(&["backend.test"], &[]), Some(&pki), &[]).await;
    let client = pki.leaf(&[], &["spiffe://td/ns/default/sa/weir"]);
    let ts = |san: &str| {
        upstream(
            json!({
                "tls_certificates": [cert_json(&client)],
                "validation_context": {
                    "trusted_ca": inline(&pki.ca_pem()),
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": san}}],
                }
            }),
            json!({"sni": "backend.test"}),
        )
    };
    let route = |cluster: &str, prefix: &str| json!({"match": {"prefix": prefix}, "route": {"cluster": cluster, "timeout": "5s"}});
    let mut h = hcm("good");
    h["typed_config"]["route_config"]["virtual_hosts"][0]["routes"] =
        json!([route("bad", "/bad"), route("good", "/")]);
    let p = Proxy::start(&bootstrap(
        vec![listener(vec![json!({"filters": [h]})], json!({}))],
        vec![
            cluster("good", up, Some(ts("backend.test"))),
            cluster("bad", up, Some(ts("other.test"))),
        ],
    ))
    .await;
    let addr = p.addr("tls");
    let (status, _, body) = crate::harness::get(addr, "x", "/").await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let v = crate::harness::json(&body);
    assert_eq!(v["name"], "up");
    // The upstream saw weir's client certificate.
    assert_eq!(v["peer"][0], "spiffe://td/ns/default/sa/weir");
    assert_eq!(p.stat("cluster.good.ssl.handshake"), 1);

    let (status, _, _) = crate::harness::get(addr, "x", "/bad").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(p.stat("cluster.bad.ssl.fail_verify_san") >= 1);
    assert_eq!(p.stat("cluster.bad.ssl.handshake"), 0);
    p.stop().await;
}

/// tcp_proxy behind TLS termination (with a client certificate required) and originating
/// mTLS to its upstream: the client's bytes cross weir decrypted and re-encrypted, the
/// upstream sees weir's client certificate, and an upstream with the wrong SAN gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_proxy_terminates_and_originates_tls() {
    let pki = Pki::new("test ca");
    let up = tls_backend("up", &pki.leaf(&["backend.test"], &[]), Some(&pki), &[]).await;
    let weir_id = pki.leaf(
        &["good.test", "bad.test"],
        &["spiffe://td/ns/default/sa/weir"],
    );
    let client_id = pki.leaf(&[], &["spiffe://td/ns/default/sa/client"]);
    let upstream_ts = |san: &str| {
        upstream(
            json!({
                "tls_certificates": [cert_json(&weir_id)],
                "validation_context": {
                    "trusted_ca": inline(&pki.ca_pem()),
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": san}}],
                }
            }),
            json!({"sni": "backend.test"}),
        )
    };
    let down_ts = downstream(
        json!({
            "tls_certificates": [cert_json(&weir_id)],
            "validation_context": {"trusted_ca": inline(&pki.ca_pem())},
        }),
        json!({"require_client_certificate": true}),
    );
    let chain = |sni: &str, cluster: &str| {
        json!({
            "filter_chain_match": {"server_names": [sni]},
            "filters": [tcp(cluster)],
            "transport_socket": down_ts.clone(),
        })
    };
    let p = Proxy::start(&bootstrap(
        vec![listener(
            vec![chain("good.test", "good"), chain("bad.test", "bad")],
            json!({}),
        )],
        vec![
            cluster("good", up, Some(upstream_ts("backend.test"))),
            cluster("bad", up, Some(upstream_ts("other.test"))),
        ],
    ))
    .await;
    let addr = p.addr("tls");
    let cfg = client_config(&pki, Some(&client_id), &[]);
    for i in 0..2 {
        let t = tls_connect(addr, "good.test", cfg.clone())
            .await
            .expect("handshake");
        let (status, body) = h1_on(t, "/").await.expect("request through the tunnel");
        assert_eq!(status, StatusCode::OK, "request {i}");
        let v = crate::harness::json(&body);
        assert_eq!(v["name"], "up");
        // The upstream's TLS peer is weir (TLS originated by the cluster), not the client.
        let peer: Vec<&str> = v["peer"]
            .as_array()
            .expect("peer SANs")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(peer.contains(&"spiffe://td/ns/default/sa/weir"), "{v}");
    }
    assert_eq!(p.stat("cluster.good.ssl.handshake"), 2);
    assert_eq!(p.stat(&format!("{L}ssl.handshake")), 2);
    assert_eq!(p.stat("tcp.good.downstream_cx_total"), 2);
    assert!(p.stat("tcp.good.downstream_cx_rx_bytes_total") > 0);
    assert!(p.stat("tcp.good.downstream_cx_tx_bytes_total") > 0);

    // A client without a certificate is refused by the downstream handshake.
    let r = tls_get(addr, "good.test", client_config(&pki, None, &[])).await;
    assert!(r.is_err(), "{r:?}");

    // The upstream's certificate does not carry the SAN the cluster requires: the tunnel
    // is closed without a byte reaching the upstream.
    let mut t = tls_connect(addr, "bad.test", cfg.clone())
        .await
        .expect("downstream handshake");
    let _ = t.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), t.read_to_end(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf));
    eventually("fail_verify_san counted", || {
        p.stat("cluster.bad.ssl.fail_verify_san") >= 1
    })
    .await;
    assert_eq!(p.stat("cluster.bad.ssl.handshake"), 0);
    p.stop().await;
}

#[tokio::test]
async fn health_checks_use_the_cluster_tls() {
    let pki = Pki::new("test ca");
    // The upstream requires a client certificate: a plain-text check can never pass.
    let up = tls_backend("up", &pki.leaf(&["backend.test"], &[]), Some(&pki), &[]).await;
    let client = pki.leaf(&[], &["spiffe://td/ns/default/sa/weir"]);
    let checked = |name: &str, san: &str| {
        let mut c = cluster(
            name,
            up,
            Some(upstream(
                json!({
                    "tls_certificates": [cert_json(&client)],
                    "validation_context": {
                        "trusted_ca": inline(&pki.ca_pem()),
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": san}}],
                    }
                }),
                json!({"sni": "backend.test"}),
            )),
        );
        c["health_checks"] = json!([{
            "timeout": "2s", "interval": "0.2s",
            "unhealthy_threshold": 1, "healthy_threshold": 1,
            "http_health_check": {"path": "/healthz"}
        }]);
        c
    };
    let p = Proxy::start(&bootstrap(
        vec![listener(vec![json!({"filters": [hcm("good")]})], json!({}))],
        vec![
            checked("good", "backend.test"),
            checked("bad", "other.test"),
        ],
    ))
    .await;
    // Startup waited for the first checks: over mTLS they pass, with a wrong SAN they fail.
    assert!(p.stat("cluster.good.health_check.success") >= 1);
    assert_eq!(p.stat("cluster.good.health_check.healthy"), 1);
    assert!(p.stat("cluster.good.ssl.handshake") >= 1);
    assert!(p.stat("cluster.bad.health_check.failure") >= 1);
    assert_eq!(p.stat("cluster.bad.health_check.healthy"), 0);
    assert!(p.stat("cluster.bad.ssl.fail_verify_san") >= 1);
    let (status, _, body) = crate::harness::get(p.addr("tls"), "x", "/").await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_h2_end_to_end() {
    let pki = Pki::new("test ca");
    let up = tls_backend(
        "up",
        &pki.leaf(&["backend.test"], &[]),
        None,
        &["h2", "http/1.1"],
    )
    .await;
    let up1 = tls_backend(
        "up1",
        &pki.leaf(&["backend.test"], &[]),
        None,
        &["http/1.1"],
    )
    .await;
    let server = pki.leaf(&["a.test"], &[]);
    let uts = upstream(
        json!({
            "alpn_protocols": ["h2", "http/1.1"],
            "validation_context": {"trusted_ca": inline(&pki.ca_pem())},
        }),
        json!({"sni": "backend.test"}),
    );
    let mut h = hcm("h2up");
    h["typed_config"]["route_config"]["virtual_hosts"][0]["routes"] = json!([
        {"match": {"prefix": "/one"}, "route": {"cluster": "h1up", "timeout": "5s"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "h2up", "timeout": "5s"}},
    ]);
    let p = Proxy::start(&bootstrap(
        vec![listener(
            vec![json!({
                "filters": [h],
                "transport_socket": downstream(json!({
                    "tls_certificates": [cert_json(&server)],
                    "alpn_protocols": ["h2", "http/1.1"],
                }), json!({})),
            })],
            json!({}),
        )],
        vec![
            cluster("h2up", up, Some(uts.clone())),
            cluster("h1up", up1, Some(uts)),
        ],
    ))
    .await;
    let addr = p.addr("tls");
    let t = tls_connect(
        addr,
        "a.test",
        client_config(&pki, None, &["h2", "http/1.1"]),
    )
    .await
    .expect("handshake");
    assert_eq!(t.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(t))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    for (path, backend, version) in [
        ("/", "up", "HTTP/2.0"),
        ("/one", "up1", "HTTP/1.1"),
        ("/", "up", "HTTP/2.0"),
    ] {
        let resp = tx
            .send_request(
                Request::get(format!("https://a.test{path}"))
                    .body(Full::new(Bytes::new()))
                    .expect("req"),
            )
            .await
            .expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let v = crate::harness::json(&body);
        assert_eq!(
            (v["name"].as_str(), v["version"].as_str()),
            (Some(backend), Some(version)),
            "{path}"
        );
    }
    assert!(p.stat("cluster.h2up.upstream_cx_http2_total") >= 1);
    assert!(p.stat("cluster.h1up.upstream_cx_http1_total") >= 1);
    p.stop().await;
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let d = std::env::temp_dir().join(format!("weir-tls-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Envoy's file SDS format, written atomically (rename) as a secret rotation does.
fn write_sds(dir: &std::path::Path, leaf: &Leaf) {
    let v = json!({"resources": [{
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        "name": "server",
        "tls_certificate": cert_json(leaf),
    }]});
    let tmp = dir.join("sds.yaml.tmp");
    std::fs::write(&tmp, v.to_string()).expect("write");
    std::fs::rename(&tmp, dir.join("sds.yaml")).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sds_rotation_keeps_open_connections() {
    let pki = Pki::new("test ca");
    let dir = temp_dir("rotation");
    let v1 = pki.leaf(&["a.test", "v1.a.test"], &[]);
    let v2 = pki.leaf(&["a.test", "v2.a.test"], &[]);
    write_sds(&dir, &v1);
    let backend = Backend::start("plain").await;
    let ts = downstream(
        json!({"tls_certificate_sds_secret_configs": [{
            "name": "server",
            "sds_config": {"path_config_source": {
                "path": dir.join("sds.yaml").display().to_string(),
                "watched_directory": {"path": dir.display().to_string()},
            }},
        }]}),
        json!({}),
    );
    let p = Proxy::start(&bootstrap(
        vec![listener(
            vec![json!({"filters": [hcm("plain")], "transport_socket": ts})],
            json!({}),
        )],
        vec![cluster("plain", backend.addr, None)],
    ))
    .await;
    let addr = p.addr("tls");
    let cfg = client_config(&pki, None, &[]);

    // A keep-alive connection on the first certificate.
    let t = tls_connect(addr, "a.test", cfg.clone())
        .await
        .expect("handshake");
    assert!(peer_sans(&t).contains(&"v1.a.test".to_string()));
    let (mut old, conn) = hyper::client::conn::http1::handshake(TokioIo::new(t))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let get = || {
        Request::get("/")
            .header("host", "a")
            .body(Full::new(Bytes::new()))
            .expect("req")
    };
    assert_eq!(
        old.send_request(get()).await.expect("first").status(),
        StatusCode::OK
    );

    write_sds(&dir, &v2);
    // New handshakes see the new certificate once the file was picked up (bounded poll).
    let mut rotated = false;
    for _ in 0..100 {
        let t = tls_connect(addr, "a.test", cfg.clone())
            .await
            .expect("handshake");
        if peer_sans(&t).contains(&"v2.a.test".to_string()) {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "the rotated certificate was never served");
    // The old connection still works.
    let r = old
        .send_request(get())
        .await
        .expect("old connection still serves");
    assert_eq!(r.status(), StatusCode::OK);
    // The secret is in /config_dump (name, never key material).
    let dump = admin_get(&p, "/config_dump").await;
    let s = dump.to_string();
    assert!(
        s.contains("dynamic_active_secrets") && s.contains("\"server\""),
        "{s}"
    );
    assert!(!s.contains("PRIVATE KEY"));
    let _ = std::fs::remove_dir_all(&dir);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout_closes_a_silent_client() {
    let pki = Pki::new("test ca");
    let backend = Backend::start("plain").await;
    let ts = downstream(
        json!({"tls_certificates": [cert_json(&pki.leaf(&["a.test"], &[]))]}),
        json!({}),
    );
    let p = Proxy::start(&bootstrap(
        vec![listener(
            vec![json!({"filters": [hcm("plain")], "transport_socket": ts,
                        "transport_socket_connect_timeout": "0.2s"})],
            json!({}),
        )],
        vec![cluster("plain", backend.addr, None)],
    ))
    .await;
    let mut s = TcpStream::connect(p.addr("tls")).await.expect("connect");
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("closed by the proxy");
    assert!(r.is_err() || buf.is_empty(), "{buf:?}");
    eventually("connection_error", || {
        p.stat(&format!("{L}ssl.connection_error")) == 1
    })
    .await;
    assert_eq!(p.stat(&format!("{L}ssl.handshake")), 0);
    p.stop().await;
}

async fn inspector_proxy(continue_on_timeout: bool) -> (Proxy, Backend) {
    let backend = Backend::start("plain").await;
    let p = Proxy::start(&bootstrap(
        vec![listener(
            vec![
                json!({"filter_chain_match": {"server_names": ["a.test"]}, "filters": [tcp("plain")]}),
                json!({"filter_chain_match": {"transport_protocol": "raw_buffer"}, "filters": [hcm("plain")]}),
            ],
            json!({
                "listener_filters_timeout": "0.2s",
                "continue_on_listener_filters_timeout": continue_on_timeout,
            }),
        )],
        vec![cluster("plain", backend.addr, None)],
    ))
    .await;
    (p, backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_inspector_timeout_closes_or_continues() {
    // The inspector was added automatically (a chain matches on server_names).
    for cont in [false, true] {
        let (p, backend) = inspector_proxy(cont).await;
        let addr = p.addr("tls");
        // Plain HTTP right away: not TLS, the raw_buffer chain serves it.
        let (status, _, _) = crate::harness::get(addr, "x", "/").await;
        assert_eq!(status, StatusCode::OK);
        // A client that says nothing until after the listener filter timeout.
        let mut s = TcpStream::connect(addr).await.expect("connect");
        eventually("pre_cx_timeout", || {
            p.stat(&format!("{L}downstream_pre_cx_timeout")) == 1
        })
        .await;
        let _ = s
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await;
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("response or close");
        let text = String::from_utf8_lossy(&buf);
        if cont {
            // continue_on_listener_filters_timeout: matched as raw_buffer and served.
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            assert_eq!(backend.hits(), 2);
        } else {
            assert!(text.is_empty(), "{text}");
            assert_eq!(backend.hits(), 1);
        }
        assert_eq!(p.stat("tls_inspector.tls_not_found"), 1);
        p.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// SDS over ADS (Istio's secret names: `default` = workload certificate, `ROOTCA` = trust
// bundle), against a minimal scripted ADS server.

mod ads {
    use std::pin::Pin;

    use futures::channel::mpsc;
    use futures::{Stream, StreamExt};
    use tonic::{Request, Response, Status, Streaming};
    use weir_xds_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    };
    use weir_xds_api::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    };

    pub type Requests = mpsc::UnboundedReceiver<DiscoveryRequest>;
    pub type Responses = mpsc::UnboundedSender<Result<DiscoveryResponse, Status>>;

    struct Fake(mpsc::UnboundedSender<(Requests, Responses)>);

    type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    #[tonic::async_trait]
    impl AggregatedDiscoveryService for Fake {
        type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
        type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

        async fn stream_aggregated_resources(
            &self,
            req: Request<Streaming<DiscoveryRequest>>,
        ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
            let rrx = crate::harness::forward_requests(req.into_inner());
            let (tx, rx) = mpsc::unbounded();
            let _ = self.0.unbounded_send((rrx, tx));
            Ok(Response::new(Box::pin(rx)))
        }

        async fn delta_aggregated_resources(
            &self,
            _req: Request<Streaming<DeltaDiscoveryRequest>>,
        ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
            Err(Status::unimplemented("delta"))
        }
    }

    /// Start the server; streams arrive on the returned receiver.
    pub async fn start() -> (
        std::net::SocketAddr,
        mpsc::UnboundedReceiver<(Requests, Responses)>,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let (tx, rx) = mpsc::unbounded();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(Fake(tx)))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(l))
                .await;
        });
        (addr, rx)
    }

    /// The next request (bounded wait).
    pub async fn next(r: &mut Requests) -> DiscoveryRequest {
        tokio::time::timeout(std::time::Duration::from_secs(10), r.next())
            .await
            .expect("a request")
            .expect("stream open")
    }
}

fn secret_any(v: Value) -> weir_xds_api::Any {
    let s: weir_xds_api::pb::envoy::extensions::transport_sockets::tls::v3::Secret =
        weir_xds_api::from_yaml(&v.to_string()).expect("secret");
    weir_xds_api::pack(&s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sds_over_ads_serves_mtls_and_rotates() {
    const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    let pki = Pki::new("mesh ca");
    let backend = Backend::start("plain").await;
    let (ads_addr, mut streams) = ads::start().await;
    let ads_sds =
        |name: &str| json!({"name": name, "sds_config": {"ads": {}, "resource_api_version": "V3"}});
    let ts = downstream(
        json!({
            "tls_certificate_sds_secret_configs": [ads_sds("default")],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/ns/default/"}}
                ]},
                "validation_context_sds_secret_config": ads_sds("ROOTCA"),
            },
        }),
        json!({"require_client_certificate": true}),
    );
    let mut boot: Value = serde_json::from_str(&bootstrap(
        vec![listener(vec![json!({"filters": [hcm("plain")], "transport_socket": ts})], json!({}))],
        vec![
            cluster("plain", backend.addr, None),
            {
                let mut c = cluster("xds", ads_addr, None);
                c["typed_extension_protocol_options"] = json!({
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}}
                    }
                });
                c
            },
        ],
    ))
    .expect("json");
    boot["node"] =
        json!({"id": "sidecar~10.0.0.1~a.default~default.svc.cluster.local", "cluster": "a"});
    boot["dynamic_resources"] = json!({"ads_config": {
        "api_type": "GRPC", "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]
    }});
    let p = Proxy::start(&boot.to_string()).await;
    let addr = p.addr("tls");

    let (mut reqs, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut streams),
    )
    .await
    .expect("ADS stream")
    .expect("server");
    let mut r = ads::next(&mut reqs).await;
    while r.type_url != SECRET {
        r = ads::next(&mut reqs).await;
    }
    let mut names = r.resource_names.clone();
    names.sort();
    assert_eq!(names, ["ROOTCA", "default"]);

    // Before the secrets arrive, handshakes fail (the context is warming).
    let client = pki.leaf(&[], &["spiffe://cluster.local/ns/default/sa/client"]);
    let ccfg = client_config(&pki, Some(&client), &[]);
    assert!(tls_get(addr, "a.test", ccfg.clone()).await.is_err());

    let push = |version: &str, leaf: &Leaf| {
        resp.unbounded_send(Ok(weir_xds_api::pb::envoy::service::discovery::v3::DiscoveryResponse {
            version_info: version.into(),
            type_url: SECRET.into(),
            nonce: version.into(),
            resources: vec![
                secret_any(json!({"name": "default", "tls_certificate": cert_json(leaf)})),
                secret_any(json!({"name": "ROOTCA", "validation_context": {"trusted_ca": inline(&pki.ca_pem())}})),
            ],
            ..Default::default()
        }))
        .expect("send");
    };
    let v1 = pki.leaf(&["a.test"], &["spiffe://cluster.local/ns/default/sa/a-v1"]);
    push("s1", &v1);
    let ack = loop {
        let r = ads::next(&mut reqs).await;
        if r.type_url == SECRET && r.response_nonce == "s1" {
            break r;
        }
    };
    assert_eq!(ack.version_info, "s1");
    assert!(ack.error_detail.is_none(), "{:?}", ack.error_detail);
    let (status, _) = tls_get(addr, "a.test", ccfg.clone())
        .await
        .expect("mTLS with ADS secrets");
    assert_eq!(status, StatusCode::OK);
    // A client outside the namespace prefix is refused.
    let other = pki.leaf(&[], &["spiffe://cluster.local/ns/other/sa/x"]);
    assert!(
        tls_get(addr, "a.test", client_config(&pki, Some(&other), &[]))
            .await
            .is_err()
    );

    // Rotation: the next handshake presents the new workload certificate.
    let v2 = pki.leaf(&["a.test"], &["spiffe://cluster.local/ns/default/sa/a-v2"]);
    push("s2", &v2);
    let mut rotated = false;
    for _ in 0..100 {
        let t = tls_connect(addr, "a.test", ccfg.clone())
            .await
            .expect("handshake");
        if peer_sans(&t).iter().any(|s| s.ends_with("a-v2")) {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated);
    p.stop().await;
}

/// A listener added over LDS whose certificate comes by SDS warms until the secret arrives
/// (Envoy's listener warming): its port is not bound before, and serves TLS after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lds_listener_warms_until_its_sds_secret_arrives() {
    use weir_xds_api::pb::envoy::service::discovery::v3::DiscoveryResponse;
    const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    let pki = Pki::new("mesh ca");
    let backend = Backend::start("plain").await;
    let (ads_addr, mut streams) = ads::start().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut xds = cluster("xds", ads_addr, None);
    xds["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}
        }
    });
    let mut boot: Value = serde_json::from_str(&bootstrap(
        vec![],
        vec![cluster("plain", backend.addr, None), xds],
    ))
    .expect("json");
    boot["dynamic_resources"] = json!({
        "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]},
        "lds_config": {"ads": {}, "resource_api_version": "V3"},
    });
    let start = tokio::spawn(async move { Proxy::start(&boot.to_string()).await });

    let (mut reqs, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        futures::StreamExt::next(&mut streams),
    )
    .await
    .expect("ADS stream")
    .expect("server");
    let mut r = ads::next(&mut reqs).await;
    while r.type_url != LISTENER {
        r = ads::next(&mut reqs).await;
    }
    let mut l = listener(
        vec![
            json!({"filters": [hcm("plain")], "transport_socket": downstream(
                json!({"tls_certificate_sds_secret_configs": [
                    {"name": "late", "sds_config": {"ads": {}, "resource_api_version": "V3"}}
                ]}),
                json!({}),
            )}),
        ],
        json!({}),
    );
    l["name"] = json!("late");
    l["address"]["socket_address"]["port_value"] = json!(port);
    let pl: weir_xds_api::pb::envoy::config::listener::v3::Listener =
        weir_xds_api::from_yaml(&l.to_string()).expect("listener");
    resp.unbounded_send(Ok(DiscoveryResponse {
        version_info: "l1".into(),
        type_url: LISTENER.into(),
        nonce: "l1".into(),
        resources: vec![weir_xds_api::pack(&pl)],
        ..Default::default()
    }))
    .expect("send");
    // The listener was accepted (ACK) and asks for its secret...
    let mut acked = false;
    let mut wants_secret = false;
    while !(acked && wants_secret) {
        let r = ads::next(&mut reqs).await;
        if r.type_url == LISTENER && r.response_nonce == "l1" {
            assert!(r.error_detail.is_none(), "{:?}", r.error_detail);
            acked = true;
        }
        if r.type_url == SECRET && r.resource_names.iter().any(|n| n == "late") {
            wants_secret = true;
        }
    }
    // ... and warms: nothing listens on its port yet.
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "a warming listener is not bound"
    );
    let leaf = pki.leaf(&["late.test"], &[]);
    resp.unbounded_send(Ok(DiscoveryResponse {
        version_info: "s1".into(),
        type_url: SECRET.into(),
        nonce: "s1".into(),
        resources: vec![secret_any(
            json!({"name": "late", "tls_certificate": cert_json(&leaf)}),
        )],
        ..Default::default()
    }))
    .expect("send");
    let p = tokio::time::timeout(Duration::from_secs(30), start)
        .await
        .expect("server started")
        .expect("start task");
    let cfg = client_config(&pki, None, &[]);
    let mut served = None;
    for _ in 0..200 {
        if let Ok(r) = tls_get(addr, "late.test", cfg.clone()).await {
            served = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (status, body) = served.expect("the warmed listener serves TLS");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(crate::harness::json(&body)["backend"], "plain");
    assert_eq!(p.stat("listener_manager.total_listeners_warming"), 0);
    assert_eq!(p.stat("listener_manager.total_listeners_active"), 1);
    p.stop().await;
}
