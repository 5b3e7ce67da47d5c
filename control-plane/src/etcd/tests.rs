//! The etcd backends against a real etcd ([`super::testing::EtcdProcess`]; skipped loudly
//! without the binary unless `WEIR_REQUIRE_ETCD=1`). Revisions are etcd's, so assertions
//! are relative (ordering, equality), not absolute numbers. The storage-trait suites (KV and
//! registry, run against both backends) are in `tests/integration/store_suite.rs`; what is
//! here is etcd-only: connection failures, replicas converging through the watch, config
//! versions allocated once across stores.

use std::sync::Arc;
use std::time::Duration;

use super::registry::EtcdRegistryBackend;
use super::testing::EtcdProcess;
use super::{Etcd, EtcdUrl};
use crate::registry::Registry;
use crate::registry::store::tests::inst;

fn connect(p: &EtcdProcess, prefix: &str) -> Arc<Etcd> {
    let url: EtcdUrl = p.url(prefix).parse().expect("url");
    Etcd::connect(&url).expect("connect to etcd")
}

#[test]
fn connect_fails_cleanly_without_etcd() {
    // A port nothing listens on: an error, not a hang or a panic.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let url: EtcdUrl = format!("etcd://127.0.0.1:{port}").parse().expect("url");
    assert!(Etcd::connect(&url).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_replicas_converge_through_the_watch() {
    let Some(p) = EtcdProcess::start() else {
        return;
    };
    let etcd = connect(&p, "/t6");
    let a_backend = EtcdRegistryBackend::new(etcd.clone());
    let b_backend = EtcdRegistryBackend::new(connect(&p, "/t6"));
    let a = Registry::open(Arc::new(a_backend.clone())).expect("a");
    let b = Registry::open(Arc::new(b_backend.clone())).expect("b");
    let token = tokio_util::sync::CancellationToken::new();
    b_backend.spawn_watch(Arc::downgrade(&b), token.clone());
    let mut b_rev = b.subscribe();

    let reg = {
        let a = a.clone();
        tokio::task::spawn_blocking(move || a.register(&inst("web", "i1", 80)))
            .await
            .expect("task")
            .expect("register via a")
    };
    tokio::time::timeout(
        Duration::from_secs(10),
        b_rev.wait_for(|r| *r >= reg.revision),
    )
    .await
    .expect("b catches up")
    .expect("channel");
    let (list, _) = b.list(Some("web"), false);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].instance_id, "i1");
    let (events, _) = b.events_since(reg.revision, None).expect("events");
    assert!(
        events
            .iter()
            .any(|e| e.instance.as_ref().is_some_and(|i| i.instance_id == "i1"))
    );

    // a has no watch: after b registers, a's view is stale, so a's next commit conflicts,
    // catches up and retries.
    let b2 = b.clone();
    let r2 = tokio::task::spawn_blocking(move || b2.register(&inst("web", "i2", 81)))
        .await
        .expect("task")
        .expect("register via b");
    let a2 = a.clone();
    let r3 = tokio::task::spawn_blocking(move || a2.register(&inst("web", "i3", 82)))
        .await
        .expect("task")
        .expect("register via a after a conflict");
    assert!(r3.revision > r2.revision);
    assert_eq!(a.list(Some("web"), false).0.len(), 3, "a caught up on i2");
    let a3 = a.clone();
    tokio::task::spawn_blocking(move || a3.deregister("web", "i1"))
        .await
        .expect("task")
        .expect("deregister via a");
    let want = a.revision();
    tokio::time::timeout(Duration::from_secs(10), b_rev.wait_for(|r| *r >= want))
        .await
        .expect("b catches up")
        .expect("channel");
    let ids: Vec<String> = b
        .list(Some("web"), false)
        .0
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    assert_eq!(ids, ["i2", "i3"]);

    // A TTL heartbeat received by a renews the TTL on b too (b's next deadline moves later).
    let mut ttl_inst = inst("ttl", "t1", 90);
    ttl_inst.health = Some(crate::registry::pb::HealthSpec {
        kind: Some(crate::registry::pb::health_spec::Kind::TtlMs(60_000)),
        deregister_critical_after_ms: 0,
    });
    let a4 = a.clone();
    let reg = tokio::task::spawn_blocking(move || a4.register(&ttl_inst))
        .await
        .expect("task")
        .expect("register ttl via a");
    tokio::time::timeout(
        Duration::from_secs(10),
        b_rev.wait_for(|r| *r >= reg.revision),
    )
    .await
    .expect("b catches up")
    .expect("channel");
    let before = b.tick().expect("b has a TTL deadline");
    let a5 = a.clone();
    tokio::task::spawn_blocking(move || {
        a5.heartbeat("ttl", "t1", crate::registry::pb::HealthStatus::Healthy, "")
    })
    .await
    .expect("task")
    .expect("heartbeat via a");
    let mut renewed = false;
    for _ in 0..200 {
        if b.tick().is_some_and(|d| d > before) {
            renewed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(renewed, "b never saw the heartbeat");
    assert_eq!(
        b.revision(),
        a.revision(),
        "a heartbeat is not a registry change"
    );
    token.cancel();
}

#[test]
fn config_versions_are_allocated_once_across_stores() {
    let Some(p) = EtcdProcess::start() else {
        return;
    };
    let a = super::config::EtcdConfigStore::new(connect(&p, "/t7"));
    let b = super::config::EtcdConfigStore::new(connect(&p, "/t7"));
    let mut handles = Vec::new();
    for (i, s) in [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        handles.push(std::thread::spawn(move || {
            (0..5)
                .map(|j| {
                    s.commit::<super::EtcdError>("all", |v| {
                        Ok((
                            format!("{{\"v\":{v},\"w\":{i},\"j\":{j}}}").into_bytes(),
                            vec![],
                        ))
                    })
                    .expect("commit")
                })
                .collect::<Vec<u64>>()
        }));
    }
    let mut all: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("thread"))
        .collect();
    all.sort_unstable();
    assert_eq!(all, (1..=20).collect::<Vec<u64>>());
    let raw = b.load().expect("load");
    assert_eq!(raw.meta.len(), 20);
    assert_eq!(raw.heads.len(), 1);
    assert!(b.payload(20).expect("payload").is_some());
    assert!(b.payload(21).expect("payload").is_none());
}

#[test]
fn authenticated_etcd_needs_the_user() {
    let Some(p) = EtcdProcess::start() else {
        return;
    };
    // Turn etcd's authentication on (root user with the root role), as an operator would.
    let open = connect(&p, "/auth");
    open.block(|mut c| async move {
        c.user_add("root", "rootpw", None).await?;
        c.user_grant_role("root", "root").await?;
        c.auth_enable().await?;
        Ok::<_, super::EtcdError>(())
    })
    .expect("enable auth");
    let dir = std::env::temp_dir().join(format!("weir-etcd-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let pw = dir.join("pw");
    std::fs::write(&pw, "rootpw\n").expect("write");
    // With the user: the KV store works.
    let url: EtcdUrl = format!(
        "{}?user=root&password_file={}",
        p.url("/auth"),
        pw.display()
    )
    .parse()
    .expect("url");
    let etcd = Etcd::connect(&url).expect("connect with the user");
    let kv = super::kv::EtcdKv::new(etcd);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        use crate::kv::KvBackend as _;
        kv.put(crate::proto::kv::PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await
        .expect("authenticated put");
    });
    // A wrong password is refused at connect time; no user: requests are refused.
    std::fs::write(&pw, "wrong\n").expect("write");
    let url: EtcdUrl = format!(
        "{}?user=root&password_file={}",
        p.url("/auth"),
        pw.display()
    )
    .parse()
    .expect("url");
    assert!(Etcd::connect(&url).is_err(), "wrong password");
    let anon = connect(&p, "/auth");
    let r = anon
        .block(|mut c| async move { Ok(c.get("/auth/kv/k", None).await) })
        .expect("block");
    assert!(r.is_err(), "no credentials: {r:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// etcd serving TLS with client-certificate auth: the URL's `ca_file`/`cert_file`/`key_file`
/// connect; no client certificate, or plain HTTP, do not.
#[test]
fn tls_etcd_with_client_certificates() {
    let dir = std::env::temp_dir().join(format!("weir-etcd-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "weir etcd test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |name: &str, usage: rcgen::ExtendedKeyUsagePurpose| {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        p.subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        p.extended_key_usages = vec![usage];
        p.distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        let cert = p.signed_by(&key, &issuer).expect("sign");
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("write");
        std::fs::write(&k, key.serialize_pem()).expect("write");
        (c.display().to_string(), k.display().to_string())
    };
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_cert.pem()).expect("write");
    let ca = ca.display().to_string();
    let (server_cert, server_key) = leaf("server", rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    let (client_cert, client_key) = leaf("root", rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    let Some(p) = EtcdProcess::start_with(
        &[
            "--cert-file",
            &server_cert,
            "--key-file",
            &server_key,
            "--client-cert-auth",
            "--trusted-ca-file",
            &ca,
        ],
        true,
    ) else {
        return;
    };
    let with = |q: &str| -> Result<Arc<Etcd>, super::EtcdError> {
        let url: EtcdUrl = format!("{}{q}", p.url("/tls")).parse()?;
        Etcd::connect(&url)
    };
    let good =
        format!("?ca_file={ca}&cert_file={client_cert}&key_file={client_key}&domain=localhost");
    // etcd may still be electing itself: bounded retries.
    let mut etcd = None;
    for _ in 0..100 {
        if let Ok(e) = with(&good) {
            etcd = Some(e);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let etcd = etcd.expect("TLS connect with a client certificate");
    let kv = super::kv::EtcdKv::new(etcd);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        use crate::kv::KvBackend as _;
        kv.put(crate::proto::kv::PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        })
        .await
        .expect("put over TLS");
    });
    assert!(
        with(&format!("?ca_file={ca}&domain=localhost")).is_err(),
        "no client certificate"
    );
    assert!(with("").is_err(), "plain HTTP to a TLS etcd");
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}
