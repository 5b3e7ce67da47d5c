use std::net::SocketAddr;

use super::grpc::{ADS, METHODS, required_for};
use super::*;
use crate::metrics::Collector as _;
use crate::settings::Settings;

const TOK_A: &str = "aaaaaaaaaaaaaaaa-xds";
const TOK_B: &str = "bbbbbbbbbbbbbbbb-kv";

fn auth(yaml: &str) -> Result<Authenticator, AuthConfigError> {
    Authenticator::from_settings(&Settings::parse(yaml, "test").expect("settings").auth)
}

fn bearer(t: &str) -> http::HeaderValue {
    http::HeaderValue::from_str(&format!("Bearer {t}")).expect("header")
}

fn two_tokens() -> Authenticator {
    auth(&format!(
        "auth:\n  tokens:\n  - {{name: proxies, token: {TOK_A}, scopes: ['xds:read']}}\n  - {{name: app, token: {TOK_B}, scopes: ['kv:read', 'kv:write']}}\n"
    ))
    .expect("valid")
}

#[test]
fn constant_time_compare() {
    assert!(ct_eq(b"secret-token", b"secret-token"));
    assert!(!ct_eq(b"secret-token", b"secret-tokeN"));
    assert!(!ct_eq(b"secret-token", b"secret-toke"));
    assert!(!ct_eq(b"secret-token", b"secret-token!"));
    assert!(!ct_eq(b"secret-token", b""));
    assert!(!ct_eq(b"", b"x"));
    assert!(ct_eq(b"", b""));
    // A presented value that is the secret followed by what the fill byte would be.
    assert!(!ct_eq(b"ab", b"ab\0"));
}

#[test]
fn bearer_parsing() {
    assert_eq!(parse_bearer(b"Bearer abc"), Some(&b"abc"[..]));
    assert_eq!(parse_bearer(b"bearer   abc  "), Some(&b"abc"[..]));
    assert_eq!(parse_bearer(b"BEARER abc"), Some(&b"abc"[..]));
    assert_eq!(parse_bearer(b"Basic abc"), None);
    assert_eq!(parse_bearer(b"Bearer"), None);
    assert_eq!(parse_bearer(b"Bearer "), None);
    assert_eq!(parse_bearer(b"Bearer a b"), None);
    assert_eq!(parse_bearer(b"abc"), None);
}

#[test]
fn tokens_load_inline_and_from_files() {
    let dir = std::env::temp_dir().join(format!("weir-auth-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("t.token");
    std::fs::write(&file, format!("{TOK_B}\n")).expect("write");
    let a = auth(&format!(
        "auth:\n  tokens:\n  - {{name: a, token: {TOK_A}, scopes: ['xds:read']}}\n  - {{name: b, token_file: {}, scopes: ['kv:read']}}\n",
        file.display()
    ))
    .expect("valid");
    assert!(!a.is_open());
    let id = a
        .authenticate(Some(&bearer(TOK_B)), None)
        .expect("file token");
    assert_eq!(id.name, "b");
    assert_eq!(id.method, Method::Token);
    assert!(check(&id, Scope::KvRead));
    assert!(!check(&id, Scope::KvWrite));
    // Debug shows names, never secrets.
    let dbg = format!("{a:?}");
    assert!(
        dbg.contains("\"a\"") && !dbg.contains(TOK_A) && !dbg.contains(TOK_B),
        "{dbg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_token_settings_are_refused() {
    let cases = [
        (
            "- {name: a, scopes: ['xds:read']}",
            "set token or token_file",
        ),
        (
            "- {name: a, token: aaaaaaaaaaaaaaaaaaaa, token_file: /x, scopes: ['xds:read']}",
            "not both",
        ),
        (
            "- {name: a, token: short, scopes: ['xds:read']}",
            "at least 16",
        ),
        (
            "- {name: a, token: 'aaaaaaaa aaaaaaaaaa', scopes: ['xds:read']}",
            "printable",
        ),
        (
            "- {name: a, token: aaaaaaaaaaaaaaaaaaaa, scopes: []}",
            "no scopes",
        ),
        (
            "- {name: '', token: aaaaaaaaaaaaaaaaaaaa, scopes: ['xds:read']}",
            "name",
        ),
        (
            "- {name: a, token_file: /nonexistent/weir-token, scopes: ['xds:read']}",
            "reading token_file",
        ),
        (
            "- {name: a, token: aaaaaaaaaaaaaaaaaaaa, scopes: ['xds:read']}\n  - {name: a, token: bbbbbbbbbbbbbbbbbbbb, scopes: ['xds:read']}",
            "duplicate name",
        ),
        (
            "- {name: a, token: aaaaaaaaaaaaaaaaaaaa, scopes: ['xds:read']}\n  - {name: b, token: aaaaaaaaaaaaaaaaaaaa, scopes: ['xds:read']}",
            "same token",
        ),
    ];
    for (tokens, want) in cases {
        let e = auth(&format!("auth:\n  tokens:\n  {tokens}\n")).expect_err(tokens);
        assert!(e.to_string().contains(want), "{tokens}: {e}");
        assert!(e.to_string().starts_with("auth.tokens["), "{e}");
    }
    let e = auth("auth:\n  client_certs:\n  - {san: 'spiffe://x/y', scopes: ['xds:read']}\n")
        .expect_err("no CA");
    assert!(e.to_string().contains("client_ca_file"), "{e}");
}

#[test]
fn authenticate_and_authorize() {
    let a = two_tokens();
    // No credentials, unknown and malformed tokens: unauthenticated.
    assert!(matches!(
        a.authenticate(None, None),
        Err(Denied::Unauthenticated(_))
    ));
    assert!(matches!(
        a.authenticate(Some(&bearer("cccccccccccccccccccc")), None),
        Err(Denied::Unauthenticated(m)) if m == "unknown token"
    ));
    assert!(matches!(
        a.authenticate(Some(&http::HeaderValue::from_static("Basic Zm9v")), None),
        Err(Denied::Unauthenticated(m)) if m.contains("malformed")
    ));
    // A prefix of a real token is not that token.
    assert!(a.authenticate(Some(&bearer(&TOK_A[..18])), None).is_err());

    let xds = a.authenticate(Some(&bearer(TOK_A)), None).expect("xds");
    assert_eq!(xds.name, "proxies");
    let path = format!("/{ADS}/StreamAggregatedResources");
    assert!(
        a.authorize(Ok(xds.clone()), required_for(&path), &path)
            .is_ok()
    );
    let put = "/weir.kv.v1.KV/Put";
    let e = a
        .authorize(Ok(xds.clone()), required_for(put), put)
        .expect_err("xds token cannot write KV");
    assert!(
        matches!(&e, Denied::PermissionDenied(m) if m.contains("kv:write") && m.contains("proxies")),
        "{e}"
    );
    assert_eq!(e.to_status().code(), tonic::Code::PermissionDenied);
    // Unknown methods are refused to authenticated callers too.
    let e = a
        .authorize(Ok(xds.clone()), required_for("/x.Y/Z"), "/x.Y/Z")
        .expect_err("unknown");
    assert!(matches!(e, Denied::PermissionDenied(_)));
    // Reads any identity may do.
    assert!(
        a.authorize(Ok(xds), Required::Authenticated, "GET /v1/status")
            .is_ok()
    );
    let e = a
        .authorize(a.authenticate(None, None), Required::Authenticated, "x")
        .expect_err("none");
    assert_eq!(e.to_status().code(), tonic::Code::Unauthenticated);

    let mut out = String::new();
    a.render(&mut out);
    assert!(
        out.contains("weir_cp_auth_denied_total{reason=\"unauthenticated\"} 1"),
        "{out}"
    );
    assert!(
        out.contains("weir_cp_auth_denied_total{reason=\"permission_denied\"} 2"),
        "{out}"
    );
    assert!(
        out.contains("weir_cp_auth_allowed_total{scope=\"xds:read\"} 1"),
        "{out}"
    );
    assert!(
        out.contains("weir_cp_auth_allowed_total{scope=\"authenticated\"} 1"),
        "{out}"
    );
}

#[test]
fn http_answers() {
    let a = two_tokens();
    let mut h = http::HeaderMap::new();
    let r = a
        .http(
            &h,
            None,
            Required::Scope(Scope::ConfigWrite),
            "POST /v1/config",
        )
        .expect_err("no token")
        .to_http();
    assert_eq!(r.status(), http::StatusCode::UNAUTHORIZED);
    assert!(
        r.headers()[http::header::WWW_AUTHENTICATE]
            .to_str()
            .expect("ascii")
            .starts_with("Bearer")
    );
    h.insert(http::header::AUTHORIZATION, bearer(TOK_B));
    let r = a
        .http(
            &h,
            None,
            Required::Scope(Scope::ConfigWrite),
            "POST /v1/config",
        )
        .expect_err("kv token")
        .to_http();
    assert_eq!(r.status(), http::StatusCode::FORBIDDEN);
    assert!(r.headers().get(http::header::WWW_AUTHENTICATE).is_none());
    assert!(a.http(&h, None, Required::Nothing, "GET /healthz").is_ok());
    assert!(
        a.http(
            &http::HeaderMap::new(),
            None,
            Required::Nothing,
            "GET /healthz"
        )
        .is_ok()
    );
}

#[test]
fn open_mode_decision() {
    let lo: SocketAddr = "127.0.0.1:1".parse().expect("addr");
    let lo6: SocketAddr = "[::1]:1".parse().expect("addr");
    let any: SocketAddr = "0.0.0.0:1".parse().expect("addr");
    let public: SocketAddr = "10.0.0.1:1".parse().expect("addr");
    assert!(open_mode(false, &[lo, lo6]).expect("loopback"));
    assert!(!open_mode(true, &[any, public]).expect("credentials"));
    let e = open_mode(false, &[lo, any]).expect_err("0.0.0.0");
    assert!(
        e.to_string().contains("0.0.0.0:1") && e.to_string().contains("WITHOUT"),
        "{e}"
    );
    assert!(open_mode(false, &[public]).is_err());

    let open = Authenticator::from_settings(&Default::default()).expect("empty");
    assert!(open.is_open());
    // Open mode: anything goes, even unknown methods and stray tokens.
    let id = open
        .authenticate(Some(&bearer("whatever-whatever")), None)
        .expect("open");
    assert_eq!(id, Identity::anonymous());
    assert!(open.authorize(Ok(id), Required::Unknown, "/x.Y/Z").is_ok());
}

/// `rpc Name(` lines of every `service` in `proto/weir/**.proto`, as `(package.Service, Name)`.
fn proto_methods() -> Vec<(String, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).expect("proto dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "proto") {
                out.push(p);
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let mut files = Vec::new();
    walk(&root, &mut files);
    let mut methods = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read proto");
        let mut package = String::new();
        let mut service = None;
        for line in text.lines().map(str::trim) {
            if let Some(p) = line.strip_prefix("package ") {
                package = p.trim_end_matches(';').trim().to_string();
            } else if let Some(s) = line.strip_prefix("service ") {
                service = s.split_whitespace().next().map(str::to_string);
            } else if let Some(r) = line.strip_prefix("rpc ") {
                let name = r.split('(').next().unwrap_or("").trim().to_string();
                let svc = service.clone().expect("rpc outside a service");
                methods.push((format!("{package}.{svc}"), name));
            }
        }
    }
    methods
}

#[test]
fn every_grpc_method_has_a_scope() {
    let mut all = proto_methods();
    assert!(all.len() >= 18, "found only {all:?}");
    // The services weir-cp serves from other crates.
    all.push((ADS.into(), "StreamAggregatedResources".into()));
    all.push((ADS.into(), "DeltaAggregatedResources".into()));
    all.push(("grpc.health.v1.Health".into(), "Check".into()));
    all.push(("grpc.health.v1.Health".into(), "Watch".into()));
    for (service, method) in &all {
        let r = required_for(&format!("/{service}/{method}"));
        assert_ne!(
            r,
            Required::Unknown,
            "/{service}/{method} has no entry in auth::grpc::METHODS: decide its scope"
        );
    }
    // And no stale entries.
    for (s, m, _) in METHODS {
        assert!(
            all.iter().any(|(s2, m2)| s2 == s && m2 == m),
            "METHODS lists /{s}/{m}, which no service has"
        );
    }
}

#[test]
fn scope_table() {
    use Required::*;
    let expect = [
        (
            format!("/{ADS}/StreamAggregatedResources"),
            Scope(super::Scope::XdsRead),
        ),
        (
            format!("/{ADS}/DeltaAggregatedResources"),
            Scope(super::Scope::XdsRead),
        ),
        ("/grpc.health.v1.Health/Check".into(), Nothing),
        ("/weir.kv.v1.KV/Range".into(), Scope(super::Scope::KvRead)),
        ("/weir.kv.v1.KV/Put".into(), Scope(super::Scope::KvWrite)),
        ("/weir.kv.v1.KV/Txn".into(), Scope(super::Scope::KvWrite)),
        (
            "/weir.kv.v1.Watch/Watch".into(),
            Scope(super::Scope::KvRead),
        ),
        (
            "/weir.kv.v1.Lease/LeaseKeepAlive".into(),
            Scope(super::Scope::KvWrite),
        ),
        (
            "/weir.registry.v1.Registry/Heartbeat".into(),
            Scope(super::Scope::RegistryWrite),
        ),
        ("/weir.registry.v1.Registry/List".into(), Authenticated),
        ("/weir.registry.v1.Registry".into(), Unknown),
        ("weir.kv.v1.KV/Put".into(), Unknown),
        ("/".into(), Unknown),
    ];
    for (path, want) in expect {
        assert_eq!(required_for(&path), want, "{path}");
    }
    // The HTTP API.
    use crate::api::required;
    assert_eq!(required(&http::Method::GET, "/healthz"), Nothing);
    assert_eq!(required(&http::Method::GET, "/v1/status"), Authenticated);
    assert_eq!(required(&http::Method::GET, "/metrics"), Authenticated);
    assert_eq!(
        required(&http::Method::POST, "/v1/config"),
        Scope(super::Scope::ConfigWrite)
    );
    assert_eq!(
        required(&http::Method::POST, "/v1/rollback/3"),
        Scope(super::Scope::ConfigWrite)
    );
    assert_eq!(
        required(&http::Method::DELETE, "/v1/config"),
        Scope(super::Scope::ConfigWrite)
    );
}

#[test]
fn client_certificate_sans_map_to_scopes() {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(vec!["proxy.weir.test".to_string()]).expect("p");
    p.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://weir.test/proxy".try_into().expect("ia5"),
    ));
    let cert = p.self_signed(&key).expect("cert");
    let der = cert.der().clone();
    assert_eq!(
        tls::subject_alt_names(&der).expect("parse"),
        ["proxy.weir.test", "spiffe://weir.test/proxy"]
    );
    assert!(tls::subject_alt_names(&CertificateDer::from(vec![1, 2, 3])).is_err());

    let dir = std::env::temp_dir().join(format!("weir-auth-unit-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, cert.pem()).expect("write");
    let a = auth(&format!(
        "auth:\n  client_certs:\n  - {{san: 'spiffe://weir.test/proxy', scopes: ['xds:read']}}\n  - {{san: proxy.weir.test, scopes: ['kv:read']}}\n  - {{san: other, scopes: ['kv:write']}}\n  tls: {{cert_file: /x, key_file: /y, client_ca_file: {}}}\n",
        ca.display()
    ))
    .expect("valid");
    let id = a
        .authenticate(None, Some(std::slice::from_ref(&der)))
        .expect("cert");
    assert_eq!(id.method, Method::ClientCert);
    assert_eq!(id.name, "spiffe://weir.test/proxy");
    assert_eq!(
        id.scopes.iter().copied().collect::<Vec<_>>(),
        [Scope::XdsRead, Scope::KvRead]
    );
    // A token, when presented, decides alone.
    assert!(
        a.authenticate(Some(&bearer(TOK_A)), Some(std::slice::from_ref(&der)))
            .is_err()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
