//! The service registry end to end: the gRPC API on a real weir-cp (in process or the
//! binary), EDS pushes to an ADS client as instances register, miss their TTL and are reaped,
//! an active HTTP check against a real backend, watch replay + live, persistence across
//! `kill -9`, and the `weir-cp registry` CLI.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use weir_control_plane::proto::registry as pb;
use weir_control_plane::proto::registry::registry_client::RegistryClient;
use weir_xds_api::pb::envoy::config::cluster::v3::{Cluster, cluster};
use weir_xds_api::pb::envoy::config::core::v3 as core;
use weir_xds_api::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};

use crate::harness::*;

type Client = RegistryClient<tonic::transport::Channel>;

async fn registry_client(addr: SocketAddr) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(WAIT)
        .connect()
        .await
        .expect("connect");
    RegistryClient::new(channel)
}

fn instance(service: &str, id: &str, port: u16) -> pb::Instance {
    pb::Instance {
        service: service.into(),
        instance_id: id.into(),
        address: "127.0.0.1".into(),
        port: u32::from(port),
        ..Default::default()
    }
}

fn with_ttl(mut i: pb::Instance, ttl_ms: u64, reap_ms: u64) -> pb::Instance {
    i.health = Some(pb::HealthSpec {
        kind: Some(pb::health_spec::Kind::TtlMs(ttl_ms)),
        deregister_critical_after_ms: reap_ms,
    });
    i
}

async fn register(c: &mut Client, i: pb::Instance) -> pb::RegisterResponse {
    c.register(pb::RegisterRequest { instance: Some(i) })
        .await
        .expect("register")
        .into_inner()
}

/// (instance id, health status) of every endpoint of `cla`, sorted by id.
fn endpoints(cla: &ClusterLoadAssignment) -> Vec<(String, core::HealthStatus)> {
    let mut v: Vec<(String, core::HealthStatus)> = cla
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .map(|e| {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                panic!("endpoint expected")
            };
            (ep.hostname.clone(), e.health_status())
        })
        .collect();
    v.sort();
    v
}

/// Receive EDS pushes (ACKing each) until `pred` holds; bounded in count and time.
async fn eds_until(
    c: &mut Sotw,
    name: &str,
    what: &str,
    pred: impl Fn(&ClusterLoadAssignment) -> bool,
) -> ClusterLoadAssignment {
    let mut seen = Vec::new();
    for _ in 0..20 {
        let r = c.recv().await;
        c.send(ack(&r, &[name])).await;
        if r.type_url != EDS {
            continue;
        }
        let cla: ClusterLoadAssignment =
            weir_xds_api::unpack(r.resources.first().expect("one CLA")).expect("CLA");
        if pred(&cla) {
            return cla;
        }
        seen.push(endpoints(&cla));
    }
    panic!("EDS never showed {what}; saw {seen:?}");
}

#[tokio::test]
async fn registrations_reach_ads_ttl_miss_turns_unhealthy_then_reaped() {
    let s = Server::start().await;
    let mut rc = registry_client(s.xds).await;
    let r = register(&mut rc, with_ttl(instance("web", "a", 9001), 800, 800)).await;
    assert!(r.created);
    let mut b = with_ttl(instance("web", "b", 9002), 800, 0);
    b.weight = 3;
    b.locality = Some(pb::Locality {
        region: "eu".into(),
        zone: "eu-1".into(),
        sub_zone: String::new(),
    });
    register(&mut rc, b).await;
    // "b" heartbeats; "a" never does.
    let stop = Arc::new(AtomicBool::new(false));
    let beat = {
        let mut rc = rc.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                rc.heartbeat(pb::HeartbeatRequest {
                    service: "web".into(),
                    instance_id: "b".into(),
                    ..Default::default()
                })
                .await
                .expect("heartbeat");
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        })
    };

    let mut c = Sotw::connect(s.xds).await;
    c.send_first(node("n1", "default"), req(CDS, &[], "", ""))
        .await;
    let cds = c.recv().await;
    assert_eq!(cds.type_url, CDS);
    assert_eq!(names(&cds), ["web"]);
    let cluster: Cluster = weir_xds_api::unpack(&cds.resources[0]).expect("cluster");
    assert_eq!(
        cluster.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32
        ))
    );
    c.send(ack(&cds, &[])).await;
    c.send(req(EDS, &["web"], "", "")).await;

    // Both instances, then "a" UNHEALTHY after its TTL, then gone after the reap delay.
    let first = eds_until(&mut c, "web", "both instances", |cla| {
        endpoints(cla).len() == 2
    })
    .await;
    assert_eq!(first.cluster_name, "web");
    let b_locality = first
        .endpoints
        .iter()
        .find(|l| l.locality.as_ref().is_some_and(|l| l.zone == "eu-1"))
        .expect("b's locality group");
    assert_eq!(
        b_locality.lb_endpoints[0]
            .load_balancing_weight
            .as_ref()
            .map(|w| w.value),
        Some(3)
    );
    eds_until(&mut c, "web", "a unhealthy", |cla| {
        endpoints(cla)
            == [
                ("a".to_string(), core::HealthStatus::Unhealthy),
                ("b".to_string(), core::HealthStatus::Healthy),
            ]
    })
    .await;
    eds_until(&mut c, "web", "a reaped", |cla| {
        endpoints(cla) == [("b".to_string(), core::HealthStatus::Healthy)]
    })
    .await;
    let err = rc
        .get(pb::GetRequest {
            service: "web".into(),
            instance_id: "a".into(),
        })
        .await
        .expect_err("reaped");
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Deregistering the last instance removes the cluster (a CDS push without "web").
    stop.store(true, Ordering::Relaxed);
    let _ = beat.await;
    rc.deregister(pb::DeregisterRequest {
        service: "web".into(),
        instance_id: "b".into(),
    })
    .await
    .expect("deregister");
    let mut removed = false;
    for _ in 0..10 {
        let r = c.recv().await;
        c.send(ack(&r, if r.type_url == EDS { &["web"] } else { &[] }))
            .await;
        if r.type_url == CDS && names(&r).is_empty() {
            removed = true;
            break;
        }
    }
    assert!(removed, "the cluster was not removed");

    // Metrics.
    let text = weir_control_plane::api::Client::new(s.api.to_string())
        .metrics()
        .await
        .expect("metrics");
    assert!(text.contains("weir_cp_registry_reaped_total 1"), "{text}");
    let beats: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("weir_cp_registry_heartbeats_total "))
        .and_then(|v| v.parse().ok())
        .expect("heartbeat counter");
    assert!(beats >= 1);
    s.stop().await;
}

/// An HTTP backend answering `GET /healthz` with 200 while `up`, else 503.
async fn http_backend(up: Arc<AtomicBool>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = l.accept().await else {
                break;
            };
            let up = up.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let ok = buf.starts_with(b"GET /healthz ") && up.load(Ordering::Relaxed);
                let status = if ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = sock
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    (addr, task)
}

async fn status_until(c: &mut Client, service: &str, id: &str, want: pb::HealthStatus) {
    let deadline = Instant::now() + WAIT;
    loop {
        let i = c
            .get(pb::GetRequest {
                service: service.into(),
                instance_id: id.into(),
            })
            .await
            .expect("get")
            .into_inner();
        if i.status() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{service}/{id} never became {want:?}: {i:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn active_http_check_flips_health_with_the_backend() {
    let s = Server::start().await;
    let mut rc = registry_client(s.xds).await;
    let up = Arc::new(AtomicBool::new(true));
    let (backend, task) = http_backend(up.clone()).await;
    let mut i = instance("api", "h1", backend.port());
    i.health = Some(pb::HealthSpec {
        kind: Some(pb::health_spec::Kind::Check(pb::CheckSpec {
            kind: Some(pb::check_spec::Kind::Http(pb::HttpCheck {
                path: "/healthz".into(),
                host: String::new(),
            })),
            interval_ms: 300,
            timeout_ms: 300,
            healthy_threshold: 1,
            unhealthy_threshold: 2,
        })),
        deregister_critical_after_ms: 0,
    });
    let r = register(&mut rc, i).await;
    assert_eq!(
        r.instance.expect("instance").status(),
        pb::HealthStatus::Unknown
    );
    let mut watch = rc
        .watch(pb::WatchRequest {
            service: "api".into(),
            start_revision: r.revision,
        })
        .await
        .expect("watch")
        .into_inner();

    status_until(&mut rc, "api", "h1", pb::HealthStatus::Healthy).await;
    up.store(false, Ordering::Relaxed);
    status_until(&mut rc, "api", "h1", pb::HealthStatus::Unhealthy).await;
    let got = rc
        .get(pb::GetRequest {
            service: "api".into(),
            instance_id: "h1".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(got.status_note.contains("503"), "{}", got.status_note);
    // Healthy-only listing leaves it out.
    let healthy = rc
        .list(pb::ListRequest {
            service: "api".into(),
            healthy_only: true,
        })
        .await
        .expect("list")
        .into_inner();
    assert!(healthy.instances.is_empty());
    up.store(true, Ordering::Relaxed);
    status_until(&mut rc, "api", "h1", pb::HealthStatus::Healthy).await;

    // The watch saw every change up to the current state, as a consistent chain:
    // registered UNKNOWN, then HEALTHY, UNHEALTHY, HEALTHY (a loaded machine may add extra
    // flaps in between; each event's previous status is the status before it).
    let last = rc
        .get(pb::GetRequest {
            service: "api".into(),
            instance_id: "h1".into(),
        })
        .await
        .expect("get")
        .into_inner()
        .mod_revision;
    let mut events = Vec::new();
    let deadline = Instant::now() + WAIT;
    while events.last().is_none_or(|e: &pb::Event| e.revision < last) {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, watch.message())
            .await
            .expect("watch events in time")
            .expect("watch ok")
            .expect("watch open");
        events.extend(msg.events);
    }
    use pb::HealthStatus::*;
    assert_eq!(events[0].r#type(), pb::EventType::Registered);
    let mut statuses = vec![Unknown];
    for e in &events[1..] {
        assert_eq!(e.r#type(), pb::EventType::HealthChanged, "{e:?}");
        assert_eq!(Some(&e.previous_status()), statuses.last(), "{e:?}");
        statuses.push(e.instance.as_ref().expect("instance").status());
    }
    let mut want = [Unknown, Healthy, Unhealthy, Healthy]
        .into_iter()
        .peekable();
    for st in &statuses {
        if want.peek() == Some(st) {
            want.next();
        }
    }
    assert!(want.peek().is_none(), "transitions {statuses:?}");
    let text = weir_control_plane::api::Client::new(s.api.to_string())
        .metrics()
        .await
        .expect("metrics");
    for prefix in [
        "weir_cp_registry_checks_total{kind=\"http\",result=\"passed\"} ",
        "weir_cp_registry_checks_total{kind=\"http\",result=\"failed\"} ",
    ] {
        let n: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(n >= 1, "{prefix}: {text}");
    }
    assert!(
        text.contains("weir_cp_registry_instances{service=\"api\",health=\"healthy\"} 1"),
        "{text}"
    );
    task.abort();
    s.stop().await;
}

#[tokio::test]
async fn watch_replays_from_a_revision_then_streams_live() {
    let s = Server::start().await;
    let mut rc = registry_client(s.xds).await;
    let r1 = register(&mut rc, instance("web", "a", 1001)).await;
    register(&mut rc, instance("other", "x", 1002)).await;
    register(&mut rc, instance("web", "b", 1003)).await;
    let mut w = rc
        .watch(pb::WatchRequest {
            service: "web".into(),
            start_revision: r1.revision,
        })
        .await
        .expect("watch")
        .into_inner();
    let first = tokio::time::timeout(WAIT, w.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("open");
    assert!(first.created);
    let replay: Vec<(u64, String)> = first
        .events
        .iter()
        .map(|e| {
            (
                e.revision,
                e.instance
                    .as_ref()
                    .map(|i| i.instance_id.clone())
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        replay,
        [(r1.revision, "a".into()), (r1.revision + 2, "b".into())],
        "the other service's change is filtered out"
    );
    // Live: a deregistration.
    let dr = rc
        .deregister(pb::DeregisterRequest {
            service: "web".into(),
            instance_id: "a".into(),
        })
        .await
        .expect("deregister")
        .into_inner();
    let live = tokio::time::timeout(WAIT, w.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("open");
    assert!(!live.created);
    assert_eq!(live.events.len(), 1);
    assert_eq!(live.events[0].revision, dr.revision);
    assert_eq!(live.events[0].r#type(), pb::EventType::Deregistered);
    assert_eq!(live.events[0].reason, "deregistered");
    // Bad input is refused with field paths; nothing is written.
    let mut bad = instance("web", "c", 1004);
    bad.address = "not-an-ip".into();
    let err = rc
        .register(pb::RegisterRequest {
            instance: Some(bad),
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("instance.address"),
        "{}",
        err.message()
    );
    let services = rc
        .services(pb::ServicesRequest {})
        .await
        .expect("services")
        .into_inner();
    assert_eq!(services.revision, dr.revision);
    s.stop().await;
}

#[tokio::test]
async fn cli_register_list_and_kill9_restart_keeps_instances() {
    let dir = temp_dir("registry");
    let data = dir.join("data");
    let data_s = data.to_str().expect("utf8").to_string();
    let mut b = spawn_binary(&["--data-dir", &data_s]).await;
    let server = b.xds.to_string();
    let (ok, out, err) = cli(&[
        "registry",
        "register",
        "web",
        "w1",
        "127.0.0.1:9101",
        "--weight",
        "4",
        "--zone",
        "z1",
        "--meta",
        "version=2",
        "--tag",
        "canary",
        "--server",
        &server,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("registered web/w1 at revision 1"), "{out}");
    let (ok, _, err) = cli(&[
        "registry",
        "register",
        "web",
        "w2",
        "127.0.0.1:9102",
        "--ttl",
        "30s",
        "--server",
        &server,
        "--output",
        "json",
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&["registry", "heartbeat", "web", "w2", "--server", &server]);
    assert!(ok, "{err}");
    assert!(out.contains("web/w2: healthy"), "{out}");
    // Heartbeats are for TTL instances only.
    let (ok, _, err) = cli(&["registry", "heartbeat", "web", "w1", "--server", &server]);
    assert!(!ok);
    assert!(err.contains("FailedPrecondition"), "{err}");
    let (ok, _, err) = cli(&[
        "registry",
        "register",
        "web",
        "w3",
        "127.0.0.1:0",
        "--server",
        &server,
    ]);
    assert!(!ok);
    assert!(err.contains("instance.port"), "{err}");

    // kill -9 right after the acknowledged writes, restart on the same data dir.
    let pid = b.child.0.id().to_string();
    let st = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("kill");
    assert!(st.success());
    let _ = b.child.0.wait();
    let b2 = spawn_binary(&["--data-dir", &data_s]).await;
    let server = b2.xds.to_string();
    let (ok, out, err) = cli(&[
        "registry", "list", "web", "--all", "--output", "json", "--server", &server,
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["revision"], 2);
    let insts = v["instances"].as_array().expect("instances");
    assert_eq!(insts.len(), 2);
    assert_eq!(insts[0]["instance_id"], "w1");
    assert_eq!(insts[0]["weight"], 4);
    assert_eq!(insts[0]["locality"]["zone"], "z1");
    assert_eq!(insts[0]["metadata"]["version"], "2");
    assert_eq!(insts[0]["tags"][0], "canary");
    assert_eq!(insts[0]["status"], "healthy");
    assert_eq!(insts[1]["health"]["kind"], "ttl");
    // The restarted server serves them over EDS.
    let mut c = Sotw::connect(b2.xds).await;
    c.send_first(node("n1", "default"), req(EDS, &["web"], "", ""))
        .await;
    let eds = c.recv().await;
    let cla: ClusterLoadAssignment =
        weir_xds_api::unpack(eds.resources.first().expect("CLA")).expect("CLA");
    assert_eq!(endpoints(&cla).len(), 2);
    // History from before the restart is gone: an explicit OUT_OF_RANGE.
    let mut rc = registry_client(b2.xds).await;
    let err = rc
        .watch(pb::WatchRequest {
            service: String::new(),
            start_revision: 1,
        })
        .await
        .expect_err("out of range");
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    let (ok, _, err) = cli(&["registry", "watch", "--rev", "1", "--server", &server]);
    assert!(!ok);
    assert!(err.contains("OutOfRange"), "{err}");
    // A live CLI watch (JSON lines) sees the deregistration below.
    let mut watcher = ChildGuard(
        std::process::Command::new(env!("CARGO_BIN_EXE_weir-cp"))
            .args([
                "registry", "watch", "web", "--output", "json", "--server", &server,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn watch"),
    );
    let stdout = watcher.0.stdout.take().expect("stdout");
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    // Text listing and deregistration through the CLI.
    let (ok, out, err) = cli(&["registry", "list", "--server", &server]);
    assert!(ok, "{err}");
    assert!(out.contains("w1") && out.contains("w2"), "{out}");
    let (ok, out, err) = cli(&["registry", "deregister", "web", "w1", "--server", &server]);
    assert!(ok, "{err}");
    assert!(out.contains("deregistered web/w1 at revision 3"), "{out}");
    // The watcher may have connected after revision 3: re-register and deregister w1 until
    // it reports a deregistration (bounded), then check the JSON shape.
    let mut seen = None;
    for round in 0..20 {
        if let Ok(line) = line_rx.recv_timeout(Duration::from_millis(500)) {
            let v: serde_json::Value = serde_json::from_str(&line).expect("json line");
            if v["type"] == "deregistered" {
                seen = Some(v);
                break;
            }
            continue;
        }
        let port = format!("127.0.0.1:{}", 9200 + round);
        let (ok, _, err) = cli(&[
            "registry", "register", "web", "w1", &port, "--server", &server,
        ]);
        assert!(ok, "{err}");
        let (ok, _, err) = cli(&["registry", "deregister", "web", "w1", "--server", &server]);
        assert!(ok, "{err}");
    }
    let v = seen.expect("the CLI watch reported a deregistration");
    assert_eq!(v["instance"]["instance_id"], "w1");
    assert_eq!(v["reason"], "deregistered");
    assert!(v["revision"].as_u64().is_some_and(|r| r >= 3));
    drop(watcher);
    let (ok, out, _) = cli(&[
        "registry", "services", "--output", "json", "--server", &server,
    ]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["services"][0]["instances"], 1);
    let _ = std::fs::remove_dir_all(&dir);
}
