//! Unit tests of the registry core: validation, revisions and events, TTL expiry and reaping
//! under paused time, check thresholds, persistence, metrics. The xDS output is tested in
//! `eds_tests` below.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use weir_xds_api::pb::envoy::config::cluster::v3::{Cluster, cluster};
use weir_xds_api::pb::envoy::config::core::v3 as core;
use weir_xds_api::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use weir_xds_api::type_urls;

use super::*;
use crate::cache::{NodeMeta, Source};
use crate::storage::Store;

fn registry() -> Arc<Registry> {
    Registry::embedded(Arc::new(Store::in_memory().expect("store"))).expect("registry")
}

fn inst(service: &str, id: &str, port: u32) -> pb::Instance {
    pb::Instance {
        service: service.into(),
        instance_id: id.into(),
        address: "10.0.0.1".into(),
        port,
        ..Default::default()
    }
}

fn ttl(mut i: pb::Instance, ttl_ms: u64, reap_ms: u64) -> pb::Instance {
    i.health = Some(pb::HealthSpec {
        kind: Some(HealthKind::TtlMs(ttl_ms)),
        deregister_critical_after_ms: reap_ms,
    });
    i
}

fn tcp_check(mut i: pb::Instance, healthy: u32, unhealthy: u32) -> pb::Instance {
    i.health = Some(pb::HealthSpec {
        kind: Some(HealthKind::Check(pb::CheckSpec {
            kind: Some(pb::check_spec::Kind::Tcp(pb::TcpCheck {})),
            interval_ms: 100,
            healthy_threshold: healthy,
            unhealthy_threshold: unhealthy,
            ..Default::default()
        })),
        deregister_critical_after_ms: 0,
    });
    i
}

fn field_of(r: Result<pb::Instance, RegistryError>) -> String {
    match r {
        Err(RegistryError::Invalid { field, .. }) => field,
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn validation_and_normalization() {
    let mut good = inst("web.v1_a-b", "i-1", 8080);
    good.address = "::1".into();
    good.tags = vec!["b".into(), "a".into(), "b".into()];
    good.locality = Some(pb::Locality::default());
    let n = normalize(&good).expect("valid");
    assert_eq!(n.weight, 1, "weight 0 defaults to 1");
    assert_eq!(n.tags, ["a", "b"], "tags sorted and deduplicated");
    assert_eq!(n.locality, None, "an empty locality is no locality");
    assert!(n.health.is_none());
    // Check defaults are filled in.
    let c = normalize(&tcp_check(inst("s", "i", 1), 0, 0)).expect("valid");
    let Some(pb::HealthSpec {
        kind: Some(HealthKind::Check(spec)),
        ..
    }) = c.health
    else {
        panic!("check kept")
    };
    assert_eq!(
        (
            spec.interval_ms,
            spec.timeout_ms,
            spec.healthy_threshold,
            spec.unhealthy_threshold
        ),
        (100, 100, 1, 2)
    );

    let bad = |f: &dyn Fn(&mut pb::Instance)| {
        let mut i = inst("web", "i-1", 80);
        f(&mut i);
        field_of(normalize(&i))
    };
    assert_eq!(bad(&|i| i.service.clear()), "instance.service");
    assert_eq!(bad(&|i| i.service = "a/b".into()), "instance.service");
    assert_eq!(bad(&|i| i.service = "x".repeat(201)), "instance.service");
    assert_eq!(bad(&|i| i.instance_id.clear()), "instance.instance_id");
    assert_eq!(
        bad(&|i| i.instance_id = "a\nb".into()),
        "instance.instance_id"
    );
    assert_eq!(
        bad(&|i| i.address = "example.com".into()),
        "instance.address"
    );
    assert_eq!(bad(&|i| i.port = 0), "instance.port");
    assert_eq!(bad(&|i| i.port = 65_536), "instance.port");
    assert_eq!(bad(&|i| i.weight = MAX_WEIGHT + 1), "instance.weight");
    assert_eq!(
        bad(&|i| {
            i.metadata.insert(String::new(), "v".into());
        }),
        "instance.metadata"
    );
    assert_eq!(bad(&|i| i.tags = vec![String::new()]), "instance.tags[0]");
    assert_eq!(
        bad(&|i| *i = ttl(i.clone(), 10, 0)),
        "instance.health.ttl_ms"
    );
    assert_eq!(
        bad(&|i| *i = ttl(i.clone(), 1000, 1)),
        "instance.health.deregister_critical_after_ms"
    );
    assert_eq!(
        bad(&|i| {
            i.health = Some(pb::HealthSpec {
                kind: None,
                deregister_critical_after_ms: 1000,
            })
        }),
        "instance.health.deregister_critical_after_ms"
    );
    let check = |c: pb::CheckSpec| {
        let mut i = inst("web", "i", 80);
        i.health = Some(pb::HealthSpec {
            kind: Some(HealthKind::Check(c)),
            deregister_critical_after_ms: 0,
        });
        field_of(normalize(&i))
    };
    let http = |path: &str| {
        Some(pb::check_spec::Kind::Http(pb::HttpCheck {
            path: path.into(),
            host: String::new(),
        }))
    };
    assert_eq!(
        check(pb::CheckSpec::default()),
        "instance.health.check",
        "a check needs a kind"
    );
    assert_eq!(
        check(pb::CheckSpec {
            kind: http("health"),
            ..Default::default()
        }),
        "instance.health.check.http.path"
    );
    assert_eq!(
        check(pb::CheckSpec {
            kind: http("/h"),
            interval_ms: 100,
            timeout_ms: 200,
            ..Default::default()
        }),
        "instance.health.check.timeout_ms"
    );
    assert_eq!(
        check(pb::CheckSpec {
            kind: http("/h"),
            unhealthy_threshold: 1000,
            ..Default::default()
        }),
        "instance.health.check.unhealthy_threshold"
    );
}

#[test]
fn revisions_events_and_history() {
    let reg = Registry::with_history(
        Arc::new(EmbeddedBackend::new(Arc::new(
            Store::in_memory().expect("store"),
        ))),
        3,
    )
    .expect("registry");
    let mut rx = reg.subscribe();
    let r1 = reg.register(&inst("web", "a", 80)).expect("register");
    assert!(r1.created);
    assert_eq!((r1.revision, r1.instance.create_revision), (1, 1));
    assert_eq!(r1.instance.status(), HealthStatus::Healthy, "static");
    assert!(rx.has_changed().expect("sender alive"));
    rx.mark_unchanged();
    // The same registration again changes nothing.
    let again = reg.register(&inst("web", "a", 80)).expect("register");
    assert_eq!((again.revision, again.created), (1, false));
    assert!(!rx.has_changed().expect("sender alive"));
    // A changed one is an update keeping create_revision.
    let mut moved = inst("web", "a", 81);
    moved.weight = 5;
    let r2 = reg.register(&moved).expect("update");
    assert_eq!(
        (r2.revision, r2.created, r2.instance.create_revision),
        (2, false, 1)
    );
    assert_eq!(r2.instance.mod_revision, 2);
    reg.register(&inst("api", "x", 90)).expect("register");
    assert_eq!(reg.deregister("web", "a").expect("deregister"), 4);
    assert!(matches!(
        reg.deregister("web", "a"),
        Err(RegistryError::NotFound { .. })
    ));
    assert!(matches!(
        reg.heartbeat("api", "x", HealthStatus::Healthy, ""),
        Err(RegistryError::NotTtl { .. })
    ));
    assert_eq!(reg.get("api", "x").expect("get").port, 90);

    // History keeps the last 3 events (revisions 2..=4).
    let (events, rev) = reg.events_since(2, None).expect("kept");
    assert_eq!(rev, 4);
    let kinds: Vec<(u64, pb::EventType)> =
        events.iter().map(|e| (e.revision, e.r#type())).collect();
    assert_eq!(
        kinds,
        [
            (2, pb::EventType::Updated),
            (3, pb::EventType::Registered),
            (4, pb::EventType::Deregistered)
        ]
    );
    assert_eq!(events[2].reason, "deregistered");
    let (web_only, _) = reg.events_since(2, Some("web")).expect("kept");
    assert_eq!(web_only.len(), 2);
    assert!(reg.events_since(5, None).expect("future").0.is_empty());
    match reg.events_since(1, None) {
        Err(RegistryError::Compacted { requested, oldest }) => {
            assert_eq!((requested, oldest), (1, 2));
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    let (services, _) = reg.services();
    assert_eq!(services.len(), 1);
    assert_eq!(
        (services[0].name.as_str(), services[0].instances),
        ("api", 1)
    );
}

#[tokio::test(start_paused = true)]
async fn ttl_expiry_heartbeat_and_reaping_with_paused_time() {
    let reg = registry();
    let token = CancellationToken::new();
    reg.start(token.clone());
    reg.register(&ttl(inst("web", "a", 80), 1_000, 3_000))
        .expect("register");
    reg.register(&ttl(inst("web", "b", 81), 1_000, 0))
        .expect("register");
    assert_eq!(
        reg.list(Some("web"), true).0.len(),
        2,
        "healthy on registration"
    );

    // Keep "b" alive while "a" misses its TTL.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        reg.heartbeat("web", "b", HealthStatus::Unknown, "")
            .expect("heartbeat");
    }
    let a = reg.get("web", "a").expect("a");
    assert_eq!(a.status(), HealthStatus::Unhealthy);
    assert!(a.status_note.contains("TTL expired"), "{}", a.status_note);
    assert_eq!(
        reg.get("web", "b").expect("b").status(),
        HealthStatus::Healthy
    );
    let healthy: Vec<String> = reg
        .list(Some("web"), true)
        .0
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    assert_eq!(healthy, ["b"]);

    // A heartbeat brings "a" back; an UNHEALTHY heartbeat keeps the lease but marks it.
    let (a, _) = reg
        .heartbeat("web", "a", HealthStatus::Healthy, "")
        .expect("heartbeat");
    assert_eq!(a.status(), HealthStatus::Healthy);
    // Re-registering the same spec renews the lease too (no change while healthy).
    let rev = reg.revision();
    let again = reg
        .register(&ttl(inst("web", "a", 80), 1_000, 3_000))
        .expect("register again");
    assert_eq!((again.created, again.revision), (false, rev));
    let (b, _) = reg
        .heartbeat("web", "b", HealthStatus::Unhealthy, "disk full")
        .expect("heartbeat");
    assert_eq!(
        (b.status(), b.status_note.as_str()),
        (HealthStatus::Unhealthy, "disk full")
    );

    // "a" misses again and stays unhealthy past deregister_critical_after: reaped.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        reg.get("web", "a").expect("a").status(),
        HealthStatus::Unhealthy
    );
    // An identical re-registration revives it like a heartbeat.
    let back = reg
        .register(&ttl(inst("web", "a", 80), 1_000, 3_000))
        .expect("register again");
    assert_eq!(back.instance.status(), HealthStatus::Healthy);
    assert_eq!(back.instance.status_note, "registered again");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        reg.get("web", "a").expect("a").status(),
        HealthStatus::Unhealthy
    );
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    assert!(matches!(
        reg.get("web", "a"),
        Err(RegistryError::NotFound { .. })
    ));
    assert_eq!(reg.metrics.reaped(), 1);
    // "b" (no reap delay) is never reaped.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(reg.get("web", "b").is_ok());
    assert_eq!(reg.metrics.heartbeats(), 5);

    let (events, _) = reg.events_since(1, Some("web")).expect("history");
    let a_events: Vec<(pb::EventType, String)> = events
        .iter()
        .filter(|e| e.instance.as_ref().is_some_and(|i| i.instance_id == "a"))
        .map(|e| (e.r#type(), e.reason.clone()))
        .collect();
    use pb::EventType::*;
    assert_eq!(
        a_events,
        [
            (Registered, String::new()),
            (HealthChanged, String::new()),
            (HealthChanged, String::new()),
            (HealthChanged, String::new()),
            (HealthChanged, String::new()),
            (HealthChanged, String::new()),
            (Deregistered, "reaped".to_string()),
        ]
    );
    token.cancel();
}

fn tagged_at(port: u32) -> pb::Instance {
    let mut i = tcp_check(inst("db", "p", port), 2, 3);
    i.tags = vec!["primary".into()];
    i
}

#[test]
fn check_thresholds() {
    let reg = registry();
    let key: Key = ("db".into(), "p".into());
    reg.register(&tcp_check(inst("db", "p", 5432), 2, 3))
        .expect("register");
    assert_eq!(
        reg.get("db", "p").expect("p").status(),
        HealthStatus::Unknown
    );
    // Not started: no checker runs, so drive results by hand with its generation.
    let generation = {
        let mut st = reg.lock();
        let e = st.instances.get_mut(&key).expect("entry");
        e.check_gen = 7;
        7
    };
    let status = || reg.get("db", "p").expect("p").status();
    // A metadata-only update keeps the checker (and its generation); a move restarts it.
    let mut tagged = tcp_check(inst("db", "p", 5432), 2, 3);
    tagged.tags = vec!["primary".into()];
    reg.register(&tagged).expect("update");
    let kept = reg.lock().instances[&key].check_gen;
    assert_eq!(kept, generation);
    let fail = || Err("connection refused".to_string());
    // The first result decides from UNKNOWN.
    reg.check_result(&key, generation, health::CheckKind::Tcp, Ok(()));
    assert_eq!(status(), HealthStatus::Healthy);
    // Three consecutive failures (threshold 3) are needed; a pass resets the count.
    reg.check_result(&key, generation, health::CheckKind::Tcp, fail());
    reg.check_result(&key, generation, health::CheckKind::Tcp, fail());
    reg.check_result(&key, generation, health::CheckKind::Tcp, Ok(()));
    reg.check_result(&key, generation, health::CheckKind::Tcp, fail());
    reg.check_result(&key, generation, health::CheckKind::Tcp, fail());
    assert_eq!(status(), HealthStatus::Healthy);
    reg.check_result(&key, generation, health::CheckKind::Tcp, fail());
    assert_eq!(status(), HealthStatus::Unhealthy);
    assert_eq!(
        reg.get("db", "p").expect("p").status_note,
        "connection refused"
    );
    // Two passes to recover.
    reg.check_result(&key, generation, health::CheckKind::Tcp, Ok(()));
    assert_eq!(status(), HealthStatus::Unhealthy);
    reg.check_result(&key, generation, health::CheckKind::Tcp, Ok(()));
    assert_eq!(status(), HealthStatus::Healthy);
    // Results of an old checker are ignored (but counted).
    for _ in 0..5 {
        reg.check_result(&key, generation - 1, health::CheckKind::Tcp, fail());
    }
    assert_eq!(status(), HealthStatus::Healthy);
    assert_eq!(reg.metrics.checks(health::CheckKind::Tcp), (4, 10));
    // Moving the instance resets its verdict: the old address's result says nothing.
    let moved = reg
        .register(&tcp_check(inst("db", "p", 5433), 2, 3))
        .expect("move");
    assert_eq!(moved.instance.status(), HealthStatus::Unknown);
    // A tags-only update at the same address keeps the verdict.
    let current = reg.lock().instances[&key].check_gen;
    reg.check_result(&key, current, health::CheckKind::Tcp, Ok(()));
    assert_eq!(status(), HealthStatus::Healthy);
    reg.register(&tagged_at(5433)).expect("update");
    assert_eq!(status(), HealthStatus::Healthy);
}

#[tokio::test]
async fn tcp_check_follows_a_real_listener() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accept = tokio::spawn(async move {
        loop {
            if listener.accept().await.is_err() {
                break;
            }
        }
    });
    let reg = registry();
    let token = CancellationToken::new();
    reg.start(token.clone());
    let mut i = tcp_check(inst("db", "p", u32::from(port)), 1, 1);
    i.address = "127.0.0.1".into();
    reg.register(&i).expect("register");
    let wait_for = |want: HealthStatus| {
        let reg = reg.clone();
        async move {
            for _ in 0..200 {
                if reg.get("db", "p").map(|i| i.status()).ok() == Some(want) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            panic!("never became {want:?}: {:?}", reg.get("db", "p"));
        }
    };
    wait_for(HealthStatus::Healthy).await;
    accept.abort();
    let _ = accept.await;
    wait_for(HealthStatus::Unhealthy).await;
    assert!(reg.metrics.checks(health::CheckKind::Tcp).1 >= 1);
    token.cancel();
}

#[test]
fn restart_keeps_instances_and_revision() {
    let dir = std::env::temp_dir().join(format!(
        "weir-cp-registry-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    {
        let reg = Registry::embedded(Arc::new(Store::open(&dir).expect("open"))).expect("reg");
        reg.register(&ttl(inst("web", "a", 80), 5_000, 0))
            .expect("register");
        reg.register(&inst("web", "b", 81)).expect("register");
        reg.heartbeat("web", "a", HealthStatus::Unhealthy, "draining")
            .expect("heartbeat");
        assert_eq!(reg.revision(), 3);
    }
    let reg = Registry::embedded(Arc::new(Store::open(&dir).expect("reopen"))).expect("reg");
    assert_eq!(reg.revision(), 3);
    let (all, _) = reg.list(None, false);
    assert_eq!(all.len(), 2);
    let a = reg.get("web", "a").expect("a");
    assert_eq!(
        (a.status(), a.status_note.as_str()),
        (HealthStatus::Unhealthy, "draining")
    );
    // The event log is in memory: history before the restart is gone, later events resume.
    assert!(matches!(
        reg.events_since(3, None),
        Err(RegistryError::Compacted { oldest: 4, .. })
    ));
    reg.deregister("web", "b").expect("deregister");
    assert_eq!(reg.events_since(4, None).expect("kept").0.len(), 1);
    drop(reg);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn metrics_render_by_service_and_health() {
    let reg = registry();
    reg.register(&inst("web", "a", 80)).expect("register");
    reg.register(&tcp_check(inst("web", "b", 81), 1, 1))
        .expect("register");
    let mut out = String::new();
    crate::metrics::Collector::render(&*reg, &mut out);
    for line in [
        "weir_cp_registry_instances{service=\"web\",health=\"healthy\"} 1",
        "weir_cp_registry_instances{service=\"web\",health=\"unknown\"} 1",
        "weir_cp_registry_instances{service=\"web\",health=\"unhealthy\"} 0",
        "weir_cp_registry_revision 2",
        "weir_cp_registry_heartbeats_total 0",
        "weir_cp_registry_checks_total{kind=\"http\",result=\"passed\"} 0",
        "weir_cp_registry_reaped_total 0",
    ] {
        assert!(out.lines().any(|l| l == line), "{line} missing:\n{out}");
    }
    // Through the control plane's /metrics text too.
    let m = crate::metrics::Metrics::default();
    m.add_collector(reg.clone());
    assert!(m.render().contains("weir_cp_registry_revision 2"));
}

fn decode<T: prost::Message + Default>(r: &crate::resource::Resource) -> T {
    T::decode(r.any.value.as_slice()).expect("decodes")
}

#[test]
fn eds_source_output() {
    let reg = registry();
    let mut a = inst("web", "a", 80);
    a.weight = 3;
    a.locality = Some(pb::Locality {
        region: "eu".into(),
        zone: "eu-1".into(),
        sub_zone: String::new(),
    });
    a.tags = vec!["canary".into()];
    a.metadata.insert("version".into(), "2".into());
    let mut b = inst("web", "b", 81);
    b.locality = a.locality.clone();
    let mut c = inst("web", "c", 82);
    c.address = "10.0.0.3".into();
    reg.register(&c).expect("register");
    reg.register(&b).expect("register");
    reg.register(&a).expect("register");
    reg.register(&ttl(inst("api", "x", 90), 1_000, 0))
        .expect("register");
    reg.heartbeat("api", "x", HealthStatus::Unhealthy, "")
        .expect("heartbeat");
    reg.register(&tcp_check(inst("db", "p", 5432), 1, 1))
        .expect("register");

    let node = NodeMeta::default();
    assert_eq!(Source::name(&*reg), "registry");
    let res = reg.resources(&node);
    let clusters: Vec<Cluster> = res
        .iter()
        .filter(|r| r.type_url() == type_urls::CLUSTER)
        .map(|r| decode(r))
        .collect();
    let names: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["api", "db", "web"]);
    let web = &clusters[2];
    assert_eq!(
        web.cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32
        ))
    );
    assert_eq!(web.lb_policy, cluster::LbPolicy::RoundRobin as i32);
    assert_eq!(web.connect_timeout.as_ref().map(|d| d.seconds), Some(5));
    let eds = web
        .eds_cluster_config
        .as_ref()
        .and_then(|e| e.eds_config.as_ref())
        .expect("eds_config");
    assert_eq!(eds.resource_api_version, core::ApiVersion::V3 as i32);
    assert!(matches!(
        eds.config_source_specifier,
        Some(core::config_source::ConfigSourceSpecifier::Ads(_))
    ));

    let clas: Vec<ClusterLoadAssignment> = res
        .iter()
        .filter(|r| r.type_url() == type_urls::CLUSTER_LOAD_ASSIGNMENT)
        .map(|r| decode(r))
        .collect();
    assert_eq!(clas.len(), 3);
    let endpoint = |e: &weir_xds_api::pb::envoy::config::endpoint::v3::LbEndpoint| {
        let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
            panic!("endpoint")
        };
        let Some(core::address::Address::SocketAddress(sa)) =
            ep.address.as_ref().and_then(|a| a.address.as_ref())
        else {
            panic!("socket address")
        };
        let Some(core::socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
            panic!("port")
        };
        (
            ep.hostname.clone(),
            format!("{}:{port}", sa.address),
            e.load_balancing_weight.as_ref().map(|w| w.value),
            e.health_status,
        )
    };
    let web = &clas[2];
    assert_eq!(web.cluster_name, "web");
    // Localities sorted: none first, then eu/eu-1; endpoints by id.
    assert_eq!(web.endpoints.len(), 2);
    assert_eq!(web.endpoints[0].locality, None);
    assert_eq!(
        web.endpoints[1]
            .locality
            .as_ref()
            .map(|l| (l.region.as_str(), l.zone.as_str())),
        Some(("eu", "eu-1"))
    );
    let healthy = core::HealthStatus::Healthy as i32;
    assert_eq!(
        web.endpoints[0]
            .lb_endpoints
            .iter()
            .map(endpoint)
            .collect::<Vec<_>>(),
        [("c".to_string(), "10.0.0.3:82".to_string(), Some(1), healthy)]
    );
    assert_eq!(
        web.endpoints[1]
            .lb_endpoints
            .iter()
            .map(endpoint)
            .collect::<Vec<_>>(),
        [
            ("a".to_string(), "10.0.0.1:80".to_string(), Some(3), healthy),
            ("b".to_string(), "10.0.0.1:81".to_string(), Some(1), healthy)
        ]
    );
    let md = &web.endpoints[1].lb_endpoints[0]
        .metadata
        .as_ref()
        .expect("metadata")
        .filter_metadata[eds::METADATA_NAMESPACE];
    assert!(md.fields.contains_key("instance_id"));
    assert!(md.fields.contains_key("tags"));
    assert!(md.fields.contains_key("metadata"));
    // TTL instance reported unhealthy; a checked one not yet checked is UNKNOWN.
    assert_eq!(
        clas[0].endpoints[0].lb_endpoints[0].health_status,
        core::HealthStatus::Unhealthy as i32
    );
    assert_eq!(
        clas[1].endpoints[0].lb_endpoints[0].health_status,
        core::HealthStatus::Unknown as i32
    );

    // Removing the last instance of a service removes its cluster and assignment.
    reg.deregister("db", "p").expect("deregister");
    let res = reg.resources(&node);
    assert!(res.iter().all(|r| r.name != "db"));
    assert_eq!(res.len(), 4);
}

#[tokio::test]
async fn the_operator_config_overrides_generated_resources() {
    let store = Arc::new(Store::in_memory().expect("store"));
    let cp = crate::ControlPlane::with_sources(store, Vec::new()).expect("cp");
    cp.cache.watch_sources();
    cp.registry
        .register(&inst("web", "a", 80))
        .expect("register");
    let snap = cp.cache.snapshot(&NodeMeta::default());
    assert_eq!(snap.of(type_urls::CLUSTER).items.len(), 1);
    let generated = snap.of(type_urls::CLUSTER).items["web"].version.clone();
    cp.apply_text(
        crate::operator::Target::All,
        r#"resources:
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: web
  type: EDS
  connect_timeout: 2s
  eds_cluster_config: {eds_config: {ads: {}}}
"#,
        "test",
    )
    .expect("apply");
    // The cache follows the operator's change asynchronously (bounded wait).
    let mut snap = cp.cache.snapshot(&NodeMeta::default());
    for _ in 0..500 {
        if snap.of(type_urls::CLUSTER).items["web"].version != generated {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        snap = cp.cache.snapshot(&NodeMeta::default());
    }
    let web = &snap.of(type_urls::CLUSTER).items["web"];
    assert_ne!(web.version, generated);
    let c: Cluster = decode(web);
    assert_eq!(c.connect_timeout.map(|d| d.seconds), Some(2));
    // The generated assignment is still served.
    assert!(
        snap.of(type_urls::CLUSTER_LOAD_ASSIGNMENT)
            .items
            .contains_key("web")
    );
}
