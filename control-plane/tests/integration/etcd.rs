//! Two in-process weir-cp replicas on one etcd (`--store etcd://…`, same prefix): config
//! applied through one is served over ADS by the other, KV writes through one are read and
//! watched through the other, registrations through one become the other's EDS, concurrent
//! applies get distinct versions, a restarted replica keeps the state, and with etcd gone
//! writes fail cleanly while ADS keeps serving. Skipped loudly
//! without an `etcd` binary unless `WEIR_REQUIRE_ETCD=1`.

use std::net::SocketAddr;
use std::sync::Arc;

use tonic::transport::Channel;
use weir_control_plane::ControlPlane;
use weir_control_plane::etcd::testing::EtcdProcess;
use weir_control_plane::proto::kv as pb;
use weir_control_plane::proto::kv::kv_client::KvClient;
use weir_control_plane::proto::kv::watch_client::WatchClient;
use weir_control_plane::proto::registry as rpb;
use weir_control_plane::proto::registry::registry_client::RegistryClient;
use weir_xds_api::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};

use crate::harness::*;

async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(WAIT)
        .connect()
        .await
        .expect("connect")
}

async fn replica(url: &str) -> Server {
    let url = url.to_string();
    let cp: Arc<ControlPlane> = tokio::task::spawn_blocking(move || ControlPlane::open_etcd(&url))
        .await
        .expect("task")
        .expect("open on etcd");
    Server::start_with(cp).await
}

/// Receive on `c` (ACKing) until a response of `type_url` satisfies `pred`; bounded.
async fn until(
    c: &mut Sotw,
    type_url: &str,
    names_acked: &[&str],
    what: &str,
    pred: impl Fn(&weir_xds_api::pb::envoy::service::discovery::v3::DiscoveryResponse) -> bool,
) -> weir_xds_api::pb::envoy::service::discovery::v3::DiscoveryResponse {
    for _ in 0..20 {
        let r = c.recv().await;
        c.send(ack(&r, names_acked)).await;
        if r.type_url == type_url && pred(&r) {
            return r;
        }
    }
    panic!("never received {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_config_kv_and_registry() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let url = etcd.url("/weir-it");
    let a = replica(&url).await;
    let b = replica(&url).await;

    // Config applied through A is served by B over ADS.
    let mut cds = Sotw::connect(b.xds).await;
    cds.send_first(node("n1", "default"), req(CDS, &[], "", ""))
        .await;
    let v1 = {
        let cp = a.cp.clone();
        let d = doc(&[static_cluster("from-a", 9001)]);
        tokio::task::spawn_blocking(move || {
            cp.apply_text(weir_control_plane::operator::Target::All, &d, "test")
        })
        .await
        .expect("task")
        .expect("apply on a")
    };
    until(&mut cds, CDS, &[], "cluster from-a on B", |r| {
        names(r).contains(&"from-a".to_string())
    })
    .await;
    assert_eq!(b.cp.operator.latest_version(), v1.version);

    // A KV put through A: read and watched through B.
    let mut kva = KvClient::new(channel(a.xds).await);
    let mut kvb = KvClient::new(channel(b.xds).await);
    let put = kva
        .put(pb::PutRequest {
            key: b"shared".to_vec(),
            value: b"1".to_vec(),
            ..Default::default()
        })
        .await
        .expect("put via a")
        .into_inner();
    let put_rev = put.header.expect("header").revision;
    let got = kvb
        .range(pb::RangeRequest {
            key: b"shared".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range via b")
        .into_inner();
    assert_eq!(got.kvs.len(), 1);
    assert_eq!(got.kvs[0].value, b"1");
    assert_eq!(got.kvs[0].mod_revision, put_rev);
    let mut wb = WatchClient::new(channel(b.xds).await)
        .watch(pb::WatchRequest {
            key: b"shared".to_vec(),
            start_revision: put_rev,
            ..Default::default()
        })
        .await
        .expect("watch via b")
        .into_inner();
    let first = tokio::time::timeout(WAIT, wb.message())
        .await
        .expect("history event in time")
        .expect("watch ok")
        .expect("event");
    assert_eq!(first.events[0].kv.as_ref().expect("kv").value, b"1");
    kva.put(pb::PutRequest {
        key: b"shared".to_vec(),
        value: b"2".to_vec(),
        ..Default::default()
    })
    .await
    .expect("put via a");
    let live = tokio::time::timeout(WAIT, wb.message())
        .await
        .expect("live event in time")
        .expect("watch ok")
        .expect("event");
    assert_eq!(live.events[0].kv.as_ref().expect("kv").value, b"2");

    // A registration through A becomes B's EDS.
    let mut eds = Sotw::connect(b.xds).await;
    eds.send_first(node("n2", "default"), req(EDS, &["svc"], "", ""))
        .await;
    let mut rc = RegistryClient::new(channel(a.xds).await);
    rc.register(rpb::RegisterRequest {
        instance: Some(rpb::Instance {
            service: "svc".into(),
            instance_id: "i1".into(),
            address: "127.0.0.1".into(),
            port: 7001,
            ..Default::default()
        }),
    })
    .await
    .expect("register via a");
    let r = until(&mut eds, EDS, &["svc"], "svc endpoints on B", |r| {
        !r.resources.is_empty()
    })
    .await;
    let cla: ClusterLoadAssignment = weir_xds_api::unpack(&r.resources[0]).expect("CLA");
    let ports: Vec<u32> = cla
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => ep
                .address
                .as_ref()
                .and_then(|a| a.address.as_ref())
                .and_then(|a| match a {
                    weir_xds_api::pb::envoy::config::core::v3::address::Address::SocketAddress(
                        s,
                    ) => match s.port_specifier {
                        Some(weir_xds_api::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => Some(p),
                        _ => None,
                    },
                    _ => None,
                }),
            _ => None,
        })
        .collect();
    assert_eq!(ports, [7001]);

    // Concurrent applies through A and B: distinct versions.
    let mut tasks = Vec::new();
    for i in 0..6 {
        let cp = if i % 2 == 0 {
            a.cp.clone()
        } else {
            b.cp.clone()
        };
        let d = doc(&[static_cluster(&format!("c{i}"), 9100 + i)]);
        let target = weir_control_plane::operator::Target::Node(format!("node-{i}"));
        tasks.push(tokio::task::spawn_blocking(move || {
            cp.apply_text(target, &d, "test").expect("apply").version
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.push(t.await.expect("task"));
    }
    versions.sort_unstable();
    versions.dedup();
    assert_eq!(versions.len(), 6, "versions handed out twice: {versions:?}");
    assert!(versions.iter().all(|v| *v > v1.version));

    // Restart B: the state is still there.
    let latest = *versions.last().expect("versions");
    b.stop().await;
    drop(cds);
    drop(eds);
    let b2 = replica(&url).await;
    assert_eq!(b2.cp.operator.latest_version(), latest);
    assert_eq!(b2.cp.operator.history().len(), 7);
    assert_eq!(b2.cp.registry.list(Some("svc"), false).0.len(), 1);
    let mut kvb2 = KvClient::new(channel(b2.xds).await);
    let got = kvb2
        .range(pb::RangeRequest {
            key: b"shared".to_vec(),
            ..Default::default()
        })
        .await
        .expect("range via b2")
        .into_inner();
    assert_eq!(got.kvs[0].value, b"2");
    let mut c = Sotw::connect(b2.xds).await;
    c.send_first(node("node-1", "default"), req(CDS, &[], "", ""))
        .await;
    until(&mut c, CDS, &[], "node-1's layer on the restarted B", |r| {
        let n = names(r);
        n.contains(&"from-a".to_string()) && n.contains(&"c1".to_string())
    })
    .await;
    b2.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_from_etcd_and_refuses_a_dead_one() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let url = etcd.url("/weir-bin");
    // Config applied through an in-process replica; the `weir-cp serve --store` binary serves it.
    let a = replica(&url).await;
    let d = doc(&[static_cluster("via-etcd", 9300)]);
    let cp = a.cp.clone();
    tokio::task::spawn_blocking(move || {
        cp.apply_text(weir_control_plane::operator::Target::All, &d, "test")
    })
    .await
    .expect("task")
    .expect("apply");
    let bin = spawn_binary(&["--store", &url]).await;
    let mut c = Sotw::connect(bin.xds).await;
    c.send_first(node("n1", "default"), req(CDS, &[], "", ""))
        .await;
    until(&mut c, CDS, &[], "via-etcd from the binary", |r| {
        names(r).contains(&"via-etcd".to_string())
    })
    .await;
    drop(bin);
    a.stop().await;

    // etcd not there: a clear error and a non-zero exit, not a hang.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_weir-cp"))
            .args([
                "serve",
                "--xds-address",
                "127.0.0.1:0",
                "--api-address",
                "127.0.0.1:0",
                "--store",
                &format!("etcd://127.0.0.1:{port}"),
            ])
            .output()
    })
    .await
    .expect("task")
    .expect("run weir-cp");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--store etcd://127.0.0.1"), "{err}");
    // A malformed URL and --data-dir together are refused up front.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir-cp"))
        .args(["serve", "--store", "http://x:1"])
        .output()
        .expect("run weir-cp");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("etcd://"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir-cp"))
        .args(["serve", "--store", &url, "--data-dir", "/tmp/x"])
        .output()
        .expect("run weir-cp");
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_fails_writes_cleanly_and_ads_keeps_serving() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let a = replica(&etcd.url("/weir-down")).await;
    let cp = a.cp.clone();
    let d = doc(&[static_cluster("kept", 9400)]);
    tokio::task::spawn_blocking(move || {
        cp.apply_text(weir_control_plane::operator::Target::All, &d, "test")
    })
    .await
    .expect("task")
    .expect("apply");
    drop(etcd); // kills etcd

    // KV: UNAVAILABLE, not a hang.
    let mut kv = KvClient::new(channel(a.xds).await);
    let err = tokio::time::timeout(
        WAIT * 2,
        kv.put(pb::PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        }),
    )
    .await
    .expect("bounded")
    .expect_err("put with etcd down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    // Config: refused, nothing applied.
    let cp = a.cp.clone();
    let before = cp.operator.latest_version();
    let d = doc(&[static_cluster("lost", 9401)]);
    let r = tokio::task::spawn_blocking(move || {
        cp.apply_text(weir_control_plane::operator::Target::All, &d, "test")
    })
    .await
    .expect("task");
    assert!(
        matches!(r, Err(weir_control_plane::operator::ApplyError::Etcd(_))),
        "{r:?}"
    );
    assert_eq!(a.cp.operator.latest_version(), before);
    // Registry: UNAVAILABLE.
    let mut rc = RegistryClient::new(channel(a.xds).await);
    let err = rc
        .register(rpb::RegisterRequest {
            instance: Some(rpb::Instance {
                service: "svc".into(),
                instance_id: "i1".into(),
                address: "127.0.0.1".into(),
                port: 7001,
                ..Default::default()
            }),
        })
        .await
        .expect_err("register with etcd down");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(a.cp.registry.list(None, false).0.is_empty());
    // ADS still serves what it had.
    let mut c = Sotw::connect(a.xds).await;
    c.send_first(node("n1", "default"), req(CDS, &[], "", ""))
        .await;
    let r = c.recv().await;
    assert_eq!(names(&r), ["kept"]);
    a.stop().await;
}

/// Two `weir-cp serve --store etcd://… --objects s3://…` replicas (credentials from the
/// `--config` file's `objects_backend`) share the objects: what one stores the other serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_replicas_share_objects_through_s3() {
    use md5::{Digest as _, Md5};
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let Some(moto) =
        tokio::task::spawn_blocking(weir_control_plane::objects::testing::MotoProcess::start)
            .await
            .expect("task")
    else {
        return;
    };
    moto.create_bucket("weir-replicas");
    let dir = temp_dir("s3-replicas");
    let config = dir.join("weir-cp.yaml");
    std::fs::write(
        &config,
        "objects_backend:\n  access_key_id: testing\n  secret_access_key: testing\n",
    )
    .expect("config");
    let url = etcd.url("/weir-objects");
    let objects = moto.url("weir-replicas", "shared");
    let cfg = config.display().to_string();
    let args = ["--store", &url, "--objects", &objects, "--config", &cfg];
    let a = spawn_binary(&args).await;
    let b = spawn_binary(&args).await;
    let data: Vec<u8> = (0..9 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let src = dir.join("in.bin");
    std::fs::write(&src, &data).expect("write");
    let (sa, sb) = (a.xds.to_string(), b.xds.to_string());
    let (ok, out, err) = cli(&["objects", "mb", "shared-bucket", "--server", &sa]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cli(&[
        "objects",
        "put",
        &src.display().to_string(),
        "shared-bucket/x/in.bin",
        "--server",
        &sa,
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&weir_control_plane::objects::hex(&Md5::digest(&data))),
        "{out}"
    );
    let dst = dir.join("out.bin");
    let (ok, out, err) = cli(&[
        "objects",
        "get",
        "shared-bucket/x/in.bin",
        &dst.display().to_string(),
        "--server",
        &sb,
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        std::fs::read(&dst).expect("read") == data,
        "replica b serves a's object"
    );
    let (ok, out, _) = cli(&["objects", "ls", "shared-bucket/x/", "--server", &sb]);
    assert!(ok && out.contains("x/in.bin"), "{out}");
    drop(a);
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}
