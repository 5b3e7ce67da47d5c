//! Authentication and authorization of every weir-cp API: bearer tokens with scopes over gRPC
//! (ADS, KV, registry) and the HTTP config API, mTLS client certificates (a CA, server and
//! client certificates generated here with rcgen), the CLI's `--token` / `WEIR_CP_TOKEN` /
//! TLS flags, metrics, and open mode (loopback only; refused elsewhere).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use weir_control_plane::ControlPlane;
use weir_control_plane::auth::client::{AuthChannel, ClientAuthArgs};
use weir_control_plane::proto::kv as kvpb;
use weir_control_plane::proto::kv::kv_client::KvClient;
use weir_control_plane::proto::kv::watch_client::WatchClient;
use weir_control_plane::registry::pb as regpb;
use weir_control_plane::registry::pb::registry_client::RegistryClient;
use weir_control_plane::settings::Settings;
use weir_xds_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weir_xds_api::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};

use crate::harness::*;

const XDS: &str = "xds-token-0123456789";
const KVR: &str = "kv-read-token-0123456789";
const KVW: &str = "kv-write-token-0123456789";
const REG: &str = "registry-token-0123456789";
const CFG: &str = "config-token-0123456789";
const OBR: &str = "objects-read-token-0123456789";
const OBW: &str = "objects-write-token-0123456789";

fn token_settings() -> String {
    format!(
        "auth:\n  tokens:\n  - {{name: proxies, token: {XDS}, scopes: ['xds:read']}}\n  \
         - {{name: reader, token: {KVR}, scopes: ['kv:read']}}\n  \
         - {{name: writer, token: {KVW}, scopes: ['kv:write', 'kv:read']}}\n  \
         - {{name: agent, token: {REG}, scopes: ['registry:write']}}\n  \
         - {{name: operator, token: {CFG}, scopes: ['config:write']}}\n  \
         - {{name: viewer, token: {OBR}, scopes: ['objects:read']}}\n  \
         - {{name: uploader, token: {OBW}, scopes: ['objects:write', 'objects:read']}}\n"
    )
}

/// An in-process weir-cp with settings.
pub(crate) struct AuthServer {
    pub(crate) xds: SocketAddr,
    pub(crate) api: SocketAddr,
    pub(crate) cp: Arc<ControlPlane>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub(crate) async fn start(settings_yaml: &str) -> AuthServer {
    let settings = Settings::parse(settings_yaml, "test").expect("settings");
    let cp = ControlPlane::open(None).expect("control plane");
    let xds = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (xds_addr, api_addr) = (xds.local_addr().expect("a"), api.local_addr().expect("a"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(weir_control_plane::run(
        cp.clone(),
        xds,
        weir_control_plane::RunOptions {
            api: Some(api),
            config_dir: None,
            settings,
            s3: None,
        },
        async {
            let _ = stopped.await;
        },
    ));
    AuthServer {
        xds: xds_addr,
        api: api_addr,
        cp,
        stop: Some(stop),
    }
}

pub(crate) fn creds(token: Option<&str>) -> ClientAuthArgs {
    ClientAuthArgs {
        token: token.map(str::to_string),
        ..Default::default()
    }
}

pub(crate) async fn channel(addr: SocketAddr, auth: &ClientAuthArgs) -> AuthChannel {
    auth.grpc_channel(&addr.to_string()).await.expect("connect")
}

/// Open a SotW ADS stream and ask for every cluster: the first response, or the error.
async fn ads_sotw(ch: AuthChannel) -> Result<Vec<String>, tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    let mut r = req(CDS, &[], "", "");
    r.node = Some(node("n1", "c1"));
    tx.send(r).await.expect("queue");
    let mut stream = AggregatedDiscoveryServiceClient::new(ch)
        .stream_aggregated_resources(ReceiverStream::<DiscoveryRequest>::new(rx))
        .await?
        .into_inner();
    let resp = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("ADS answers in time")?
        .expect("a response");
    drop(tx);
    Ok(names(&resp))
}

async fn ads_delta(ch: AuthChannel) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(4);
    let mut r = dreq(CDS, &["*"], &[], "");
    r.node = Some(node("n1", "c1"));
    tx.send(r).await.expect("queue");
    let mut stream = AggregatedDiscoveryServiceClient::new(ch)
        .delta_aggregated_resources(ReceiverStream::<DeltaDiscoveryRequest>::new(rx))
        .await?
        .into_inner();
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("ADS answers in time")?
        .expect("a response");
    Ok(())
}

async fn kv_put(ch: AuthChannel, key: &str, value: &str) -> Result<(), tonic::Status> {
    KvClient::new(ch)
        .put(kvpb::PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

async fn kv_get(ch: AuthChannel, key: &str) -> Result<Option<String>, tonic::Status> {
    let r = KvClient::new(ch)
        .range(kvpb::RangeRequest {
            key: key.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.kvs
        .first()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

fn instance(id: &str) -> regpb::Instance {
    regpb::Instance {
        service: "web".into(),
        instance_id: id.into(),
        address: "127.0.0.1".into(),
        port: 8080,
        ..Default::default()
    }
}

async fn register(ch: AuthChannel, id: &str) -> Result<(), tonic::Status> {
    RegistryClient::new(ch)
        .register(regpb::RegisterRequest {
            instance: Some(instance(id)),
        })
        .await
        .map(|_| ())
}

async fn list(ch: AuthChannel) -> Result<usize, tonic::Status> {
    RegistryClient::new(ch)
        .list(regpb::ListRequest::default())
        .await
        .map(|r| r.into_inner().instances.len())
}

fn code<T>(r: Result<T, tonic::Status>) -> Result<(), tonic::Code> {
    r.map(|_| ()).map_err(|e| e.code())
}

/// A metric's value in the Prometheus text (panics if absent).
pub(crate) fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
}

#[tokio::test]
async fn grpc_apis_need_tokens_with_scopes() {
    let s = start(&token_settings()).await;
    s.cp.apply_text(
        weir_control_plane::operator::Target::All,
        &doc(&[static_cluster("c1", 1)]),
        "test",
    )
    .expect("apply");

    // ADS, both protocols.
    assert_eq!(
        code(ads_sotw(channel(s.xds, &creds(None)).await).await),
        Err(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        code(ads_sotw(channel(s.xds, &creds(Some("not-a-token-at-all-x"))).await).await),
        Err(tonic::Code::Unauthenticated)
    );
    let e = ads_sotw(channel(s.xds, &creds(Some(KVR))).await)
        .await
        .expect_err("kv:read cannot subscribe");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("xds:read"), "{}", e.message());
    assert_eq!(
        ads_sotw(channel(s.xds, &creds(Some(XDS))).await)
            .await
            .expect("xds:read subscribes"),
        ["c1"]
    );
    assert_eq!(
        code(ads_delta(channel(s.xds, &creds(Some(KVR))).await).await),
        Err(tonic::Code::PermissionDenied)
    );
    ads_delta(channel(s.xds, &creds(Some(XDS))).await)
        .await
        .expect("delta with xds:read");

    // Health stays open.
    let mut h =
        tonic_health::pb::health_client::HealthClient::new(channel(s.xds, &creds(None)).await);
    let st = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "weir-cp".into(),
        })
        .await
        .expect("health without credentials")
        .into_inner();
    assert_eq!(st.status, 1, "SERVING");

    // KV: a refused put writes nothing.
    let e = kv_put(channel(s.xds, &creds(Some(KVR))).await, "k", "v")
        .await
        .expect_err("kv:read cannot put");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        kv_put(channel(s.xds, &creds(None)).await, "k", "v")
            .await
            .map_err(|e| e.code()),
        Err(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        kv_get(channel(s.xds, &creds(Some(KVR))).await, "k")
            .await
            .expect("kv:read reads"),
        None,
        "the refused put wrote nothing"
    );
    assert_eq!(
        kv_get(channel(s.xds, &creds(Some(XDS))).await, "k")
            .await
            .map_err(|e| e.code()),
        Err(tonic::Code::PermissionDenied)
    );
    kv_put(channel(s.xds, &creds(Some(KVW))).await, "k", "v1")
        .await
        .expect("kv:write puts");
    assert_eq!(
        kv_get(channel(s.xds, &creds(Some(KVR))).await, "k")
            .await
            .expect("read"),
        Some("v1".into())
    );
    let e = WatchClient::new(channel(s.xds, &creds(Some(XDS))).await)
        .watch(kvpb::WatchRequest {
            key: b"k".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("watch needs kv:read");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // Registry: writes need registry:write, reads any identity.
    assert_eq!(
        register(channel(s.xds, &creds(Some(KVW))).await, "i1")
            .await
            .map_err(|e| e.code()),
        Err(tonic::Code::PermissionDenied)
    );
    assert_eq!(
        list(channel(s.xds, &creds(None)).await)
            .await
            .map_err(|e| e.code()),
        Err(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        list(channel(s.xds, &creds(Some(KVR))).await)
            .await
            .expect("list"),
        0,
        "the refused register wrote nothing"
    );
    register(channel(s.xds, &creds(Some(REG))).await, "i1")
        .await
        .expect("registry:write registers");
    assert_eq!(
        list(channel(s.xds, &creds(Some(XDS))).await)
            .await
            .expect("list"),
        1
    );

    // Metrics count every refusal: 4 unauthenticated (sotw none + wrong, put, list),
    // 6 permission denied (sotw, delta, put, get, watch, register).
    let text = weir_control_plane::api::Client::new(s.api.to_string())
        .with_token(KVR)
        .expect("token")
        .metrics()
        .await
        .expect("metrics with a token");
    assert_eq!(
        metric(
            &text,
            "weir_cp_auth_denied_total{reason=\"unauthenticated\"}"
        ),
        4
    );
    assert_eq!(
        metric(
            &text,
            "weir_cp_auth_denied_total{reason=\"permission_denied\"}"
        ),
        6
    );
    assert_eq!(
        metric(&text, "weir_cp_auth_allowed_total{scope=\"xds:read\"}"),
        2
    );
    assert_eq!(
        metric(&text, "weir_cp_auth_allowed_total{scope=\"kv:write\"}"),
        1
    );
    assert_eq!(
        metric(
            &text,
            "weir_cp_auth_allowed_total{scope=\"registry:write\"}"
        ),
        1
    );
}

/// A raw HTTP/1.1 request: (status, lower-cased header lines, body).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String, String) {
    http_from(None, addr, method, path, token, body).await
}

/// [`http`] from the local address `source` (e.g. 127.0.0.2: another client on loopback).
async fn http_from(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String, String) {
    let mut s = match source {
        None => tokio::net::TcpStream::connect(addr).await.expect("connect"),
        Some(ip) => {
            let sock = tokio::net::TcpSocket::new_v4().expect("socket");
            sock.bind(SocketAddr::new(ip, 0)).expect("bind source");
            sock.connect(addr).await.expect("connect")
        }
    };
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\n{auth}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[tokio::test]
async fn http_api_needs_tokens_with_scopes() {
    let s = start(&token_settings()).await;
    let document = doc(&[static_cluster("c1", 1)]);

    let (st, head, body) = http(s.api, "POST", "/v1/config", None, &document).await;
    assert_eq!(st, 401, "{body}");
    assert!(head.contains("www-authenticate: bearer"), "{head}");
    assert!(body.contains("unauthenticated"), "{body}");
    let (st, _, _) = http(
        s.api,
        "POST",
        "/v1/config",
        Some("wrong-token-0123456789"),
        &document,
    )
    .await;
    assert_eq!(st, 401);
    let (st, head, body) = http(s.api, "POST", "/v1/config", Some(KVW), &document).await;
    assert_eq!(st, 403, "{body}");
    assert!(!head.contains("www-authenticate"), "{head}");
    assert!(
        body.contains("config:write") && body.contains("writer"),
        "{body}"
    );
    assert_eq!(s.cp.operator.latest_version(), 0, "nothing applied");
    let (st, _, body) = http(s.api, "GET", "/v1/history", Some(KVR), "").await;
    assert_eq!((st, body.trim()), (200, "[]"));

    let (st, _, body) = http(s.api, "POST", "/v1/config", Some(CFG), &document).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(s.cp.operator.latest_version(), 1);
    // Rollback is a write too.
    let (st, _, _) = http(s.api, "POST", "/v1/rollback/1", Some(XDS), "").await;
    assert_eq!(st, 403);
    assert_eq!(s.cp.operator.latest_version(), 1);

    // Reads: any identity; none without one.
    for path in ["/v1/status", "/v1/config", "/v1/history", "/metrics"] {
        assert_eq!(http(s.api, "GET", path, None, "").await.0, 401, "{path}");
        assert_eq!(
            http(s.api, "GET", path, Some(XDS), "").await.0,
            200,
            "{path}"
        );
    }
    assert_eq!(http(s.api, "GET", "/healthz", None, "").await.0, 200);

    // The client library: refusals are errors with the server's message.
    let e = weir_control_plane::api::Client::new(s.api.to_string())
        .with_token(KVR)
        .expect("token")
        .apply(&weir_control_plane::operator::Target::All, document.clone())
        .await
        .expect_err("403");
    assert!(e.to_string().contains("permission denied"), "{e}");
}

fn cli_env(args: &[&str], env_token: Option<&str>) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weir-cp"));
    c.args(args).env_remove("WEIR_CP_TOKEN");
    if let Some(t) = env_token {
        c.env("WEIR_CP_TOKEN", t);
    }
    let out = c.output().expect("run weir-cp");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn cli_sends_tokens() {
    let s = start(&token_settings()).await;
    let dir = temp_dir("auth-cli");
    let file = dir.join("c.yaml");
    write(&file, &doc(&[static_cluster("c1", 1)]));
    let (api, xds) = (s.api.to_string(), s.xds.to_string());
    let file = file.to_str().expect("utf-8");

    let run = |args: Vec<&str>, env: Option<&'static str>| {
        let args: Vec<String> = args.into_iter().map(str::to_string).collect();
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            cli_env(&a, env)
        })
    };
    let (ok, _, err) = run(vec!["config", "apply", "-f", file, "--server", &api], None)
        .await
        .expect("cli");
    assert!(!ok && err.contains("unauthenticated"), "{err}");
    let (ok, _, err) = run(
        vec!["config", "apply", "-f", file, "--server", &api],
        Some(KVW),
    )
    .await
    .expect("cli");
    assert!(!ok && err.contains("permission denied"), "{err}");
    assert_eq!(s.cp.operator.latest_version(), 0);
    let (ok, out, err) = run(
        vec![
            "config", "apply", "-f", file, "--server", &api, "--token", CFG,
        ],
        None,
    )
    .await
    .expect("cli");
    assert!(ok, "{err}");
    assert!(out.contains("applied version 1"), "{out}");
    let (ok, out, err) = run(vec!["status", "--server", &api], Some(XDS))
        .await
        .expect("cli");
    assert!(ok && out.contains("config version: 1"), "{out}{err}");

    // KV: --token (after the subcommand, it is global) and the environment.
    let (ok, _, err) = run(vec!["kv", "put", "a", "1", "--server", &xds], Some(KVR))
        .await
        .expect("cli");
    assert!(!ok && err.contains("PermissionDenied"), "{err}");
    let (ok, _, err) = run(
        vec!["kv", "--server", &xds, "put", "a", "1", "--token", KVW],
        None,
    )
    .await
    .expect("cli");
    assert!(ok, "{err}");
    let (ok, out, err) = run(vec!["kv", "get", "a", "--server", &xds], Some(KVR))
        .await
        .expect("cli");
    assert!(ok && out.trim() == "a\t1", "{out}{err}");

    // Registry.
    let (ok, _, err) = run(vec!["registry", "list", "--server", &xds], None)
        .await
        .expect("cli");
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let (ok, _, err) = run(
        vec![
            "registry",
            "register",
            "web",
            "i1",
            "127.0.0.1:80",
            "--server",
            &xds,
            "--token",
            REG,
        ],
        None,
    )
    .await
    .expect("cli");
    assert!(ok, "{err}");
    let (ok, out, err) = run(
        vec!["registry", "list", "--server", &xds, "--output", "json"],
        Some(KVR),
    )
    .await
    .expect("cli");
    assert!(ok && out.contains("i1"), "{out}{err}");

    // Objects: refused without a token and with a read-only one; --token and the
    // environment work.
    let (ok, _, err) = run(vec!["objects", "mb", "bucket-one", "--server", &xds], None)
        .await
        .expect("cli");
    assert!(
        !ok && err.to_lowercase().contains("unauthenticated"),
        "{err}"
    );
    let (ok, _, err) = run(
        vec!["objects", "mb", "bucket-one", "--server", &xds],
        Some(OBR),
    )
    .await
    .expect("cli");
    assert!(!ok && err.to_lowercase().contains("permission"), "{err}");
    let (ok, _, err) = run(
        vec![
            "objects",
            "--server",
            &xds,
            "mb",
            "bucket-one",
            "--token",
            OBW,
        ],
        None,
    )
    .await
    .expect("cli");
    assert!(ok, "{err}");
    let (ok, out, err) = run(vec!["objects", "ls", "--server", &xds], Some(OBR))
        .await
        .expect("cli");
    assert!(ok && out.contains("bucket-one"), "{out}{err}");
}

/// A CA, a server certificate (localhost, 127.0.0.1) and client certificates, as PEM files.
pub(crate) struct Pki {
    pub(crate) ca: PathBuf,
    pub(crate) server: (PathBuf, PathBuf),
    pub(crate) proxy: (PathBuf, PathBuf),
    pub(crate) unmapped: (PathBuf, PathBuf),
    pub(crate) rogue: (PathBuf, PathBuf),
}

fn ca(name: &str) -> (rcgen::CertificateParams, rcgen::KeyPair, rcgen::Certificate) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    let cert = p.self_signed(&key).expect("self-signed");
    (p, key, cert)
}

fn leaf(
    dir: &Path,
    name: &str,
    sans: Vec<rcgen::SanType>,
    usage: rcgen::ExtendedKeyUsagePurpose,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.subject_alt_names = sans;
    p.extended_key_usages = vec![usage];
    p.distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    let cert = p.signed_by(&key, issuer).expect("sign");
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    write(&c, &cert.pem());
    write(&k, &key.serialize_pem());
    (c, k)
}

fn uri(u: &str) -> rcgen::SanType {
    rcgen::SanType::URI(u.try_into().expect("ia5"))
}

pub(crate) fn pki(tag: &str) -> Pki {
    let dir = temp_dir(tag);
    let (params, key, cert) = ca("weir test CA");
    let ca_file = dir.join("ca.pem");
    write(&ca_file, &cert.pem());
    let issuer = rcgen::Issuer::new(params, key);
    let server = leaf(
        &dir,
        "server",
        vec![
            rcgen::SanType::DnsName("localhost".try_into().expect("dns")),
            rcgen::SanType::IpAddress([127, 0, 0, 1].into()),
        ],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        &issuer,
    );
    let client = rcgen::ExtendedKeyUsagePurpose::ClientAuth;
    let proxy = leaf(
        &dir,
        "proxy",
        vec![uri("spiffe://weir.test/proxy")],
        client.clone(),
        &issuer,
    );
    let unmapped = leaf(
        &dir,
        "unmapped",
        vec![uri("spiffe://weir.test/stranger")],
        client.clone(),
        &issuer,
    );
    let (rp, rk, _) = ca("rogue CA");
    let rogue_issuer = rcgen::Issuer::new(rp, rk);
    let rogue = leaf(
        &dir,
        "rogue",
        vec![uri("spiffe://weir.test/proxy")],
        client,
        &rogue_issuer,
    );
    Pki {
        ca: ca_file,
        server,
        proxy,
        unmapped,
        rogue,
    }
}

pub(crate) fn tls_settings(p: &Pki) -> String {
    format!(
        "auth:\n  tokens:\n  - {{name: operator, token: {CFG}, scopes: ['config:write']}}\n  \
         client_certs:\n  - {{san: 'spiffe://weir.test/proxy', scopes: ['xds:read', 'kv:read']}}\n  \
         tls: {{cert_file: {}, key_file: {}, client_ca_file: {}}}\n",
        p.server.0.display(),
        p.server.1.display(),
        p.ca.display()
    )
}

fn tls_creds(p: &Pki, cert: Option<&(PathBuf, PathBuf)>, token: Option<&str>) -> ClientAuthArgs {
    ClientAuthArgs {
        token: token.map(str::to_string),
        ca_file: Some(p.ca.clone()),
        cert_file: cert.map(|c| c.0.clone()),
        key_file: cert.map(|c| c.1.clone()),
    }
}

#[tokio::test]
async fn mtls_client_certificates_map_to_scopes() {
    let p = pki("auth-mtls");
    let s = start(&tls_settings(&p)).await;
    s.cp.apply_text(
        weir_control_plane::operator::Target::All,
        &doc(&[static_cluster("c1", 1)]),
        "test",
    )
    .expect("apply");
    let proxy = tls_creds(&p, Some(&p.proxy), None);

    // The mapped SAN's scopes: xds:read and kv:read, not kv:write.
    assert_eq!(
        ads_sotw(channel(s.xds, &proxy).await)
            .await
            .expect("ADS over mTLS"),
        ["c1"]
    );
    assert_eq!(
        kv_get(channel(s.xds, &proxy).await, "k")
            .await
            .expect("kv:read"),
        None
    );
    let e = kv_put(channel(s.xds, &proxy).await, "k", "v")
        .await
        .expect_err("no kv:write");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message().contains("spiffe://weir.test/proxy"),
        "{}",
        e.message()
    );

    // A verified certificate without a rule: authenticated, no scopes.
    let e = kv_get(
        channel(s.xds, &tls_creds(&p, Some(&p.unmapped), None)).await,
        "k",
    )
    .await
    .expect_err("unmapped");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // TLS without a certificate or token: unauthenticated; with a token: the token's scopes.
    let e = ads_sotw(channel(s.xds, &tls_creds(&p, None, None)).await)
        .await
        .expect_err("no credentials");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let e = ads_sotw(channel(s.xds, &tls_creds(&p, None, Some(CFG))).await)
        .await
        .expect_err("config token");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // A certificate from another CA is refused in the handshake (connect or first call).
    let rogue = tls_creds(&p, Some(&p.rogue), None);
    match rogue.grpc_channel(&s.xds.to_string()).await {
        Err(_) => {}
        Ok(ch) => {
            let e = kv_get(ch, "k").await.expect_err("rogue certificate");
            assert!(
                !matches!(e.code(), tonic::Code::Ok | tonic::Code::PermissionDenied),
                "{e:?}"
            );
        }
    }
    // Plaintext to the TLS port fails.
    match creds(None).grpc_channel(&s.xds.to_string()).await {
        Err(_) => {}
        Ok(ch) => assert!(kv_get(ch, "k").await.is_err()),
    }

    // The HTTP API over TLS: certificate scopes and tokens.
    let api = s.api.to_string();
    let st = proxy
        .api_client(&api)
        .expect("client")
        .status()
        .await
        .expect("status over mTLS");
    assert_eq!(st.config_version, 1);
    let e = proxy
        .api_client(&api)
        .expect("client")
        .rollback(1)
        .await
        .expect_err("the proxy cert has no config:write");
    assert!(e.to_string().contains("permission denied"), "{e}");
    assert!(
        tls_creds(&p, None, None)
            .api_client(&api)
            .expect("client")
            .status()
            .await
            .is_err()
    );
    let info = tls_creds(&p, None, Some(CFG))
        .api_client(&api)
        .expect("client")
        .rollback(1)
        .await
        .expect("token over TLS");
    assert_eq!(info.version, 2);
    // Plain HTTP to the TLS API gets no answer.
    assert!(
        weir_control_plane::api::Client::new(api.clone())
            .status()
            .await
            .is_err()
    );

    // The CLI with --ca-file/--cert-file/--key-file.
    let xds = s.xds.to_string();
    let args: Vec<String> = [
        "kv",
        "get",
        "k",
        "--server",
        &xds,
        "--ca-file",
        p.ca.to_str().expect("utf-8"),
        "--cert-file",
        p.proxy.0.to_str().expect("utf-8"),
        "--key-file",
        p.proxy.1.to_str().expect("utf-8"),
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        cli_env(&a, None)
    })
    .await
    .expect("cli");
    // Authorized (kv:read): the key simply does not exist.
    assert!(!ok && err.contains("not found"), "{err}");
    let args: Vec<String> = [
        "status",
        "--server",
        &api,
        "--ca-file",
        p.ca.to_str().expect("utf-8"),
        "--token",
        CFG,
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        cli_env(&a, None)
    })
    .await
    .expect("cli");
    assert!(ok && out.contains("config version: 2"), "{out}{err}");
}

#[tokio::test]
async fn open_mode_only_on_loopback() {
    // The binary: no credentials on 0.0.0.0 -> refuses to start.
    let out = tokio::task::spawn_blocking(|| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weir-cp"))
            .args([
                "serve",
                "--xds-address",
                "0.0.0.0:0",
                "--api-address",
                "127.0.0.1:0",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                let mut err = String::new();
                use std::io::Read as _;
                let _ = child
                    .stderr
                    .take()
                    .expect("stderr")
                    .read_to_string(&mut err);
                break (st, err);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("weir-cp kept running on 0.0.0.0 without auth");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .expect("spawn task");
    assert!(!out.0.success());
    assert!(
        out.1.contains("refusing to start") && out.1.contains("WITHOUT authentication"),
        "{}",
        out.1
    );

    // In-process: the same refusal, and with a token the same bind serves.
    let any = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let e = weir_control_plane::run(
        ControlPlane::open(None).expect("cp"),
        any,
        Default::default(),
        std::future::pending(),
    )
    .await
    .expect_err("refused");
    assert!(matches!(e, weir_control_plane::Error::Auth(_)), "{e}");
    let any = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let port = any.local_addr().expect("addr").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(weir_control_plane::run(
        ControlPlane::open(None).expect("cp"),
        any,
        weir_control_plane::RunOptions {
            settings: Settings::parse(&token_settings(), "t").expect("settings"),
            ..Default::default()
        },
        async {
            let _ = stopped.await;
        },
    ));
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    assert_eq!(
        kv_put(channel(addr, &creds(Some(KVW))).await, "k", "v")
            .await
            .map_err(|e| e.code()),
        Ok(())
    );
    let _ = stop.send(());
    tokio::time::timeout(WAIT, task)
        .await
        .expect("stops")
        .expect("task")
        .expect("clean stop");

    // Open on loopback: serves, and says so loudly.
    let mut b = spawn_binary(&[]).await;
    let deadline = Instant::now() + WAIT;
    let mut warned = false;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match b.log.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) if line.contains("WITHOUT authentication") && line.contains("WARN") => {
                warned = true;
                break;
            }
            Ok(_) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    assert!(warned, "no open-mode warning");
    kv_put(channel(b.xds, &creds(None)).await, "k", "v")
        .await
        .expect("open mode");
    let _ = b.child.0.kill();
}

#[tokio::test]
async fn binary_logs_credential_names_never_tokens() {
    let dir = temp_dir("auth-log");
    let settings = dir.join("weir-cp.yaml");
    write(&settings, &token_settings());
    let b = spawn_binary(&["--config", settings.to_str().expect("utf-8")]).await;
    let wrong = "wrong-secret-0123456789";
    assert_eq!(
        code(kv_put(channel(b.xds, &creds(Some(KVR))).await, "k", "v").await),
        Err(tonic::Code::PermissionDenied)
    );
    assert_eq!(
        code(kv_put(channel(b.xds, &creds(Some(wrong))).await, "k", "v").await),
        Err(tonic::Code::Unauthenticated)
    );
    kv_put(channel(b.xds, &creds(Some(KVW))).await, "k", "v")
        .await
        .expect("writer puts");
    // Read the log until both refusals are there (bounded), then check for secrets.
    let deadline = Instant::now() + WAIT;
    let mut lines = Vec::new();
    let (mut denied, mut unauth) = (false, false);
    while !(denied && unauth) {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        let Ok(line) = b.log.recv_timeout(left) else {
            break;
        };
        denied |= line.contains("permission denied")
            && line.contains("reader")
            && line.contains("/weir.kv.v1.KV/Put");
        unauth |= line.contains("unauthenticated") && line.contains("unknown token");
        lines.push(line);
    }
    let log = lines.join("\n");
    assert!(denied && unauth, "refusals not logged:\n{log}");
    for secret in [KVR, KVW, wrong, XDS, CFG] {
        assert!(!log.contains(secret), "a token reached the log:\n{log}");
    }
    // No open-mode warning with credentials configured.
    assert!(!log.contains("WITHOUT authentication"), "{log}");
}

#[tokio::test]
async fn objects_grpc_needs_objects_scopes() {
    use weir_control_plane::proto::objects::objects_client::ObjectsClient;
    use weir_control_plane::proto::objects::{CreateBucketRequest, ListBucketsRequest};
    let s = start(&token_settings()).await;
    let mut none = ObjectsClient::new(channel(s.xds, &creds(None)).await);
    let e = none
        .list_buckets(ListBucketsRequest {})
        .await
        .expect_err("no token");
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut viewer = ObjectsClient::new(channel(s.xds, &creds(Some(OBR))).await);
    let e = viewer
        .create_bucket(CreateBucketRequest {
            bucket: "denied".into(),
        })
        .await
        .expect_err("read-only token");
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    let mut uploader = ObjectsClient::new(channel(s.xds, &creds(Some(OBW))).await);
    uploader
        .create_bucket(CreateBucketRequest {
            bucket: "allowed".into(),
        })
        .await
        .expect("objects:write creates");
    let names: Vec<String> = viewer
        .list_buckets(ListBucketsRequest {})
        .await
        .expect("objects:read lists")
        .into_inner()
        .buckets
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, ["allowed"], "the refused bucket was not created");
}

/// `limits:` gives every client address one bucket across the gRPC APIs and the HTTP API,
/// checked before authentication; health checks are exempt; refusals are RESOURCE_EXHAUSTED
/// and 429 with `retry-after`, counted by API.
#[tokio::test]
async fn request_rates_are_limited_per_client() {
    // One request per 100 s sustained, 3 at once: the 4th within the test is refused.
    let s = start(&format!(
        "{}limits: {{requests_per_second: 0.01, burst: 3}}\n",
        token_settings()
    ))
    .await;
    let ch = channel(s.xds, &creds(Some(KVR))).await;
    assert_eq!(kv_get(ch.clone(), "k").await.expect("1st"), None);
    assert_eq!(kv_get(ch.clone(), "k").await.expect("2nd"), None);
    let (st, _, body) = http(s.api, "GET", "/v1/status", Some(KVR), "").await;
    assert_eq!(st, 200, "3rd: {body}");
    // The bucket is empty for 127.0.0.1, whichever API and whatever credentials.
    let e = kv_get(ch.clone(), "k").await.expect_err("4th");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("rate limit"), "{}", e.message());
    let e = kv_get(channel(s.xds, &creds(Some("wrong"))).await, "k")
        .await
        .expect_err("limited before auth");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    let (st, head, body) = http(s.api, "GET", "/v1/status", Some(KVR), "").await;
    assert_eq!(st, 429, "{body}");
    assert!(head.contains("retry-after: "), "{head}");
    assert!(body.contains("rate limit exceeded"), "{body}");
    // Health checks are exempt.
    assert_eq!(http(s.api, "GET", "/healthz", None, "").await.0, 200);
    let health = tonic_health::pb::health_client::HealthClient::new(ch.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health is not limited");
    assert_eq!(health.into_inner().status, 1);
    // Another client address has its own bucket.
    let other = Some("127.0.0.2".parse().expect("ip"));
    let (st, _, body) = http_from(other, s.api, "GET", "/v1/status", Some(KVR), "").await;
    assert_eq!(st, 200, "{body}");
    let m = s.cp.metrics.render();
    assert!(
        m.contains("weir_cp_rate_limited_total{api=\"grpc\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("weir_cp_rate_limited_total{api=\"http\"} 1"),
        "{m}"
    );
}

#[test]
fn bad_limits_are_refused() {
    for bad in [
        "limits: {requests_per_second: -1}\n",
        "limits: {requests_per_second: 5, burst: 0}\n",
        "limits: {rps: 5}\n",
    ] {
        let refused = Settings::parse(bad, "test")
            .map_err(|e| e.to_string())
            .and_then(|s| {
                weir_control_plane::ratelimit::RequestLimiter::new(&s.limits)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
        assert!(refused.is_err(), "{bad}");
    }
}
