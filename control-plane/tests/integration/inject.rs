//! The sidecar injection webhook of the `weir-cp` binary: `serve --webhook-address` with an
//! `inject:` settings block, called over HTTPS (rustls client trusting a test CA, SNI
//! `localhost`) as the API server calls it, with the AdmissionReview fixtures of
//! control-plane/tests/fixtures/admission/; errors, plain-HTTP refusal and the
//! `weir_cp_inject_*` metrics on the API address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::rustls;

use crate::harness::{spawn_binary, temp_dir, write};

fn fixture(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/admission")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A CA and a server certificate for `localhost` / 127.0.0.1, PEM.
fn pki() -> (String, String, String) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "webhook test CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).expect("ca");
    let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    leaf.subject_alt_names.push(rcgen::SanType::IpAddress(
        std::net::Ipv4Addr::LOCALHOST.into(),
    ));
    leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = leaf.signed_by(&key, &ca).expect("sign");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn client(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// One HTTPS request; (status, body).
async fn call(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> (u16, Bytes) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .expect("TLS handshake");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), tx.send_request(req))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = resp.status().as_u16();
    (
        status,
        resp.into_body().collect().await.expect("body").to_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_serves_admission_reviews_over_tls() {
    let dir = temp_dir("inject-webhook");
    let (ca, cert, key) = pki();
    write(&dir.join("tls.crt"), &cert);
    write(&dir.join("tls.key"), &key);
    let config = dir.join("weir-cp.yaml");
    write(
        &config,
        &format!(
            "inject:\n  tls: {{cert_file: {d}/tls.crt, key_file: {d}/tls.key}}\n  proxy_image: weir/weir:it\n  xds_address: weir-cp.weir-system.svc:18000\n",
            d = dir.display()
        ),
    );
    let b = spawn_binary(&[
        "--config",
        config.to_str().expect("utf-8"),
        "--webhook-address",
        "127.0.0.1:0",
    ])
    .await;
    let log = b.log;
    let (webhook, _log) = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = log.recv_timeout(left) else {
                break;
            };
            if let Some(a) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("webhook_address="))
                .and_then(|a| a.parse::<SocketAddr>().ok())
            {
                return (a, log);
            }
            seen.push(line);
        }
        panic!("webhook_address not logged:\n{}", seen.join("\n"));
    })
    .await
    .expect("log reader");
    let tls = client(&ca);

    // An opted-in pod: allowed, uid echoed, a JSON patch adding weir.
    let (status, body) = call(
        webhook,
        tls.clone(),
        "POST",
        "/inject",
        fixture("opt-in.json"),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let resp: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(resp["kind"], "AdmissionReview");
    assert_eq!(
        resp["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(resp["response"]["allowed"], true);
    assert_eq!(resp["response"]["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(resp["response"]["patch"].as_str().expect("patch"))
        .expect("base64");
    let ops: Value = serde_json::from_slice(&patch).expect("ops");
    let added: Vec<&str> = ops
        .as_array()
        .expect("ops")
        .iter()
        .filter_map(|o| {
            o["value"]["name"]
                .as_str()
                .or(o["value"][0]["name"].as_str())
        })
        .collect();
    assert_eq!(added, ["weir-init", "weir-proxy", "weir-bootstrap"]);
    assert!(
        String::from_utf8_lossy(&patch).contains("\"image\":\"weir/weir:it\""),
        "image from settings"
    );

    // A bare pod through the namespace entry: injected; through the pod entry: not.
    let (_, body) = call(
        webhook,
        tls.clone(),
        "POST",
        "/inject/namespace",
        fixture("no-arrays.json"),
    )
    .await;
    let resp: Value = serde_json::from_slice(&body).expect("json");
    assert!(resp["response"]["patch"].is_string());
    let (_, body) = call(
        webhook,
        tls.clone(),
        "POST",
        "/inject",
        fixture("no-arrays.json"),
    )
    .await;
    let resp: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(resp["response"]["allowed"], true);
    assert!(resp["response"].get("patch").is_none());

    // hostNetwork: allowed with a warning.
    let (_, body) = call(
        webhook,
        tls.clone(),
        "POST",
        "/inject/namespace",
        fixture("host-network.json"),
    )
    .await;
    let resp: Value = serde_json::from_slice(&body).expect("json");
    assert!(
        resp["response"]["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("hostNetwork"))
    );

    // Malformed bodies and wrong methods/paths.
    let (status, body) = call(
        webhook,
        tls.clone(),
        "POST",
        "/inject",
        b"{\"apiVersion\":".to_vec(),
    )
    .await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let (status, _) = call(
        webhook,
        tls.clone(),
        "POST",
        "/inject",
        fixture("wrong-version.json"),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = call(webhook, tls.clone(), "GET", "/inject", Vec::new()).await;
    assert_eq!(status, 405);
    let (status, _) = call(webhook, tls.clone(), "POST", "/mutate", Vec::new()).await;
    assert_eq!(status, 404);

    // Plain HTTP gets no HTTP answer: the port only speaks TLS.
    let mut plain = tokio::net::TcpStream::connect(webhook)
        .await
        .expect("connect");
    plain
        .write_all(b"POST /inject HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut buf)).await;
    assert!(
        !buf.starts_with(b"HTTP/1.1"),
        "{}",
        String::from_utf8_lossy(&buf)
    );

    // The metrics on the API address.
    let metrics = weir_control_plane::api::Client::new(b.api.to_string())
        .metrics()
        .await
        .expect("metrics");
    for want in [
        "weir_cp_inject_requests_total 6",
        "weir_cp_inject_injected_total 2",
        "weir_cp_inject_skipped_total{reason=\"not_opted_in\"} 1",
        "weir_cp_inject_skipped_total{reason=\"host_network\"} 1",
        "weir_cp_inject_bad_requests_total 2",
        "weir_cp_inject_duration_seconds_count 4",
    ] {
        assert!(metrics.contains(want), "{want} missing:\n{metrics}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn webhook_address_without_settings_is_refused() {
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_weir-cp"))
            .args([
                "serve",
                "--xds-address",
                "127.0.0.1:0",
                "--api-address",
                "127.0.0.1:0",
                "--webhook-address",
                "127.0.0.1:0",
            ])
            .output()
            .expect("run weir-cp")
    })
    .await
    .expect("join");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inject:"), "{err}");
}
