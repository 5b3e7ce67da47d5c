//! The etcd backends against a real etcd ([`super::testing::EtcdProcess`]; skipped loudly
//! without the binary unless `WEIR_REQUIRE_ETCD=1`). Revisions are etcd's, so assertions
//! are relative (ordering, equality), not absolute numbers.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;

use super::kv::EtcdKv;
use super::registry::EtcdRegistryBackend;
use super::testing::EtcdProcess;
use super::{Etcd, EtcdUrl};
use crate::kv::{KvBackend, KvError, WatchStream};
use crate::proto::kv as pb;
use crate::proto::kv::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::proto::kv::event::EventType;
use crate::registry::store::tests::{backend_suite, inst};
use crate::registry::{Backend as _, BackendError, Registry};

fn connect(p: &EtcdProcess, prefix: &str) -> Arc<Etcd> {
    let url: EtcdUrl = p.url(prefix).parse().expect("url");
    Etcd::connect(&url).expect("connect to etcd")
}

fn rev(h: &Option<pb::ResponseHeader>) -> i64 {
    h.as_ref().expect("header").revision
}

fn put_req(k: &str, v: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: k.into(),
        value: v.into(),
        prev_kv: true,
        ..Default::default()
    }
}

async fn get(kv: &EtcdKv, k: &str) -> Option<pb::KeyValue> {
    let r = kv
        .range(pb::RangeRequest {
            key: k.into(),
            ..Default::default()
        })
        .await
        .expect("range");
    r.kvs.into_iter().next()
}

async fn next_resp(s: &mut WatchStream) -> pb::WatchResponse {
    match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
        Ok(Some(Ok(r))) => r,
        other => panic!("expected a watch response, got {other:?}"),
    }
}

fn evs(r: &pb::WatchResponse) -> Vec<(i64, EventType, String)> {
    r.events
        .iter()
        .map(|e| {
            let kv = e.kv.as_ref().expect("kv");
            (
                kv.mod_revision,
                e.r#type(),
                String::from_utf8_lossy(&kv.key).into_owned(),
            )
        })
        .collect()
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

#[tokio::test]
async fn kv_revisions_versions_cas_and_namespacing() {
    let Some(p) = EtcdProcess::start() else {
        return;
    };
    let kv = EtcdKv::new(connect(&p, "/t1"));
    let r1 = rev(&kv.put(put_req("a", "1")).await.expect("put").header);
    let a = get(&kv, "a").await.expect("a");
    assert_eq!((a.create_revision, a.mod_revision, a.version), (r1, r1, 1));
    assert_eq!(a.key, b"a", "the namespace is stripped");
    let r = kv.put(put_req("a", "2")).await.expect("put");
    let r2 = rev(&r.header);
    assert!(r2 > r1);
    assert_eq!(r.prev_kv.expect("prev").value, b"1");
    let a = get(&kv, "a").await.expect("a");
    assert_eq!((a.create_revision, a.mod_revision, a.version), (r1, r2, 2));

    // Another prefix does not see it.
    let other = EtcdKv::new(connect(&p, "/t1-other"));
    assert!(get(&other, "a").await.is_none());

    // CAS on mod_revision.
    let mut cas = put_req("a", "3");
    cas.expected_mod_revision = Some(r1);
    assert!(matches!(
        kv.put(cas.clone()).await,
        Err(KvError::FailedPrecondition(_))
    ));
    cas.expected_mod_revision = Some(r2);
    kv.put(cas).await.expect("cas with the right revision");
    let mut create = put_req("new", "x");
    create.expected_mod_revision = Some(0);
    kv.put(create.clone()).await.expect("create-if-absent");
    assert!(matches!(
        kv.put(create).await,
        Err(KvError::FailedPrecondition(_))
    ));

    // Concurrent CAS writers from one revision: exactly one wins.
    let base = get(&kv, "race").await.map_or(0, |k| k.mod_revision);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let kv = kv.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = put_req("race", &i.to_string());
            r.expected_mod_revision = Some(base);
            kv.put(r).await.is_ok()
        }));
    }
    let mut wins = 0;
    for t in tasks {
        if t.await.expect("task") {
            wins += 1;
        }
    }
    assert_eq!(wins, 1);

    // Delete: prev kvs; deleting nothing deletes nothing.
    let d = kv
        .delete_range(pb::DeleteRangeRequest {
            key: "a".into(),
            prev_kv: true,
            ..Default::default()
        })
        .await
        .expect("delete");
    assert_eq!(d.deleted, 1);
    assert_eq!(d.prev_kvs[0].key, b"a");
    let d = kv
        .delete_range(pb::DeleteRangeRequest {
            key: "a".into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    assert_eq!(d.deleted, 0);

    // Limits are checked before etcd.
    assert!(matches!(
        kv.put(pb::PutRequest::default()).await,
        Err(KvError::InvalidArgument(_))
    ));
    // A put on a lease that does not exist.
    let mut leased = put_req("l", "v");
    leased.lease = 0x7777;
    assert!(matches!(
        kv.put(leased).await,
        Err(KvError::LeaseNotFound(0x7777))
    ));
}

#[tokio::test]
async fn kv_txn_and_paginated_ranges() {
    let Some(p) = EtcdProcess::start() else {
        return;
    };
    let kv = EtcdKv::new(connect(&p, "/t2"));
    for k in ["p/a", "p/b", "p/c", "q"] {
        kv.put(put_req(k, k)).await.expect("put");
    }
    let r = kv
        .range(pb::RangeRequest {
            key: "p/".into(),
            prefix: true,
            limit: 2,
            ..Default::default()
        })
        .await
        .expect("range");
    assert_eq!(r.kvs.len(), 2);
    assert!(r.more);
    assert_eq!(r.count, 3);
    assert_eq!(r.next_key, b"p/b\0");
    let rest = kv
        .range(pb::RangeRequest {
            key: r.next_key.clone(),
            range_end: b"p0".to_vec(),
            ..Default::default()
        })
        .await
        .expect("next page");
    assert_eq!(rest.kvs.len(), 1);
    assert_eq!(rest.kvs[0].key, b"p/c");
    // Every key from "p/b" to the end of the namespace.
    let all = kv
        .range(pb::RangeRequest {
            key: "p/b".into(),
            range_end: vec![0],
            keys_only: true,
            ..Default::default()
        })
        .await
        .expect("from key");
    let keys: Vec<_> = all.kvs.iter().map(|k| k.key.clone()).collect();
    assert_eq!(keys, [b"p/b".to_vec(), b"p/c".to_vec(), b"q".to_vec()]);
    assert!(all.kvs.iter().all(|k| k.value.is_empty()));

    let cmp = |v: &str| pb::Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Value as i32,
        key: "q".into(),
        target_union: Some(TargetUnion::Value(v.into())),
    };
    let ops = |k: &str| {
        vec![
            pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(put_req(k, "t"))),
            },
            pb::RequestOp {
                request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                    key: k.into(),
                    ..Default::default()
                })),
            },
        ]
    };
    let t = kv
        .txn(pb::TxnRequest {
            compare: vec![cmp("q")],
            success: ops("yes"),
            failure: ops("no"),
        })
        .await
        .expect("txn");
    assert!(t.succeeded);
    assert_eq!(t.responses.len(), 2);
    let Some(pb::response_op::Response::ResponseRange(rr)) = &t.responses[1].response else {
        panic!("range response expected: {t:?}")
    };
    assert_eq!(rr.kvs[0].key, b"yes", "the txn reads its own write");
    let t = kv
        .txn(pb::TxnRequest {
            compare: vec![cmp("other")],
            success: ops("yes2"),
            failure: ops("no"),
        })
        .await
        .expect("txn");
    assert!(!t.succeeded);
    assert!(get(&kv, "no").await.is_some() && get(&kv, "yes2").await.is_none());
    // Compare and value disagreeing is refused.
    let mut bad = cmp("q");
    bad.target = CompareTarget::Mod as i32;
    assert!(matches!(
        kv.txn(pb::TxnRequest {
            compare: vec![bad],
            ..Default::default()
        })
        .await,
        Err(KvError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn kv_watch_from_revision_and_compaction() {
    let Some(p) = EtcdProcess::start() else {
        return;
    };
    let kv = EtcdKv::new(connect(&p, "/t3"));
    let r1 = rev(&kv.put(put_req("w/a", "1")).await.expect("put").header);
    let r2 = rev(&kv.put(put_req("w/b", "1")).await.expect("put").header);
    kv.put(put_req("x", "outside")).await.expect("put");
    let mut s = kv
        .watch(pb::WatchRequest {
            key: "w/".into(),
            prefix: true,
            start_revision: r1,
            prev_kv: true,
            ..Default::default()
        })
        .await
        .expect("watch");
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.extend(evs(&next_resp(&mut s).await));
    }
    assert_eq!(
        seen,
        [
            (r1, EventType::Put, "w/a".to_string()),
            (r2, EventType::Put, "w/b".to_string())
        ]
    );
    // Live: a delete, with its previous value.
    let d = kv
        .delete_range(pb::DeleteRangeRequest {
            key: "w/a".into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    let live = next_resp(&mut s).await;
    assert_eq!(
        evs(&live),
        [(rev(&d.header), EventType::Delete, "w/a".to_string())]
    );
    assert_eq!(live.events[0].prev_kv.as_ref().expect("prev").value, b"1");

    // Compaction: reads and watches below it are refused with the compact revision.
    let r3 = rev(&kv.put(put_req("w/c", "1")).await.expect("put").header);
    kv.compact(pb::CompactionRequest { revision: r3 })
        .await
        .expect("compact");
    match kv
        .range(pb::RangeRequest {
            key: "w/a".into(),
            revision: r1,
            ..Default::default()
        })
        .await
    {
        Err(KvError::Compacted {
            requested,
            compact_revision,
        }) => assert_eq!((requested, compact_revision), (r1, r3)),
        other => panic!("expected Compacted, got {other:?}"),
    }
    match kv
        .watch(pb::WatchRequest {
            key: "w/".into(),
            prefix: true,
            start_revision: r1,
            ..Default::default()
        })
        .await
    {
        Err(KvError::Compacted {
            compact_revision, ..
        }) => assert_eq!(compact_revision, r3),
        Err(e) => panic!("expected Compacted, got {e:?}"),
        Ok(_) => panic!("expected Compacted, got a stream"),
    }
    // A future revision is refused too.
    assert!(matches!(
        kv.range(pb::RangeRequest {
            key: "w/a".into(),
            revision: r3 + 1000,
            ..Default::default()
        })
        .await,
        Err(KvError::FutureRevision { .. })
    ));
}

#[tokio::test]
async fn kv_lease_expiry_deletes_keys() {
    let Some(p) = EtcdProcess::start() else {
        return;
    };
    let kv = EtcdKv::new(connect(&p, "/t4"));
    let g = kv
        .lease_grant(pb::LeaseGrantRequest { ttl: 1, id: 0 })
        .await
        .expect("grant");
    assert!(g.id > 0);
    let mut lp = put_req("leased", "v");
    lp.lease = g.id;
    let r = rev(&kv.put(lp).await.expect("put").header);
    let ttl = kv
        .lease_time_to_live(pb::LeaseTimeToLiveRequest {
            id: g.id,
            keys: true,
        })
        .await
        .expect("ttl");
    assert_eq!(ttl.keys, [b"leased".to_vec()]);
    // etcd raises TTLs below its minimum (about 1.5 election timeouts) to that minimum.
    assert!(ttl.granted_ttl >= 1, "{ttl:?}");
    let ka = kv
        .lease_keep_alive(pb::LeaseKeepAliveRequest { id: g.id })
        .await
        .expect("keep alive");
    assert!(ka.ttl > 0);
    assert!(
        kv.lease_leases()
            .await
            .expect("leases")
            .leases
            .iter()
            .any(|l| l.id == g.id)
    );
    let mut s = kv
        .watch(pb::WatchRequest {
            key: "leased".into(),
            start_revision: r + 1,
            ..Default::default()
        })
        .await
        .expect("watch");
    // etcd expires the lease (its own clock; the test only bounds the wait).
    let resp = next_resp(&mut s).await;
    assert_eq!(evs(&resp)[0].1, EventType::Delete);
    assert!(get(&kv, "leased").await.is_none());
    assert!(matches!(
        kv.lease_time_to_live(pb::LeaseTimeToLiveRequest {
            id: g.id,
            keys: false
        })
        .await,
        Err(KvError::LeaseNotFound(_))
    ));
    let ka = kv
        .lease_keep_alive(pb::LeaseKeepAliveRequest { id: g.id })
        .await
        .expect("keep alive of a gone lease");
    assert_eq!(ka.ttl, 0);
    // Revoke deletes keys at once.
    let g = kv
        .lease_grant(pb::LeaseGrantRequest { ttl: 60, id: 4242 })
        .await
        .expect("grant");
    assert_eq!(g.id, 4242);
    assert!(matches!(
        kv.lease_grant(pb::LeaseGrantRequest { ttl: 60, id: 4242 })
            .await,
        Err(KvError::FailedPrecondition(_))
    ));
    let mut lp = put_req("leased2", "v");
    lp.lease = 4242;
    kv.put(lp).await.expect("put");
    kv.lease_revoke(pb::LeaseRevokeRequest { id: 4242 })
        .await
        .expect("revoke");
    assert!(get(&kv, "leased2").await.is_none());
    assert!(matches!(
        kv.lease_revoke(pb::LeaseRevokeRequest { id: 4242 }).await,
        Err(KvError::LeaseNotFound(4242))
    ));
}

#[test]
fn registry_backend_suite_on_etcd() {
    let Some(p) = EtcdProcess::start() else {
        return;
    };
    let b = EtcdRegistryBackend::new(connect(&p, "/t5"));
    backend_suite(&b);
    // A commit from a stale replica (expects revision 3 to follow 2; 5 is stored) conflicts
    // and writes nothing.
    let r = b.commit(
        3,
        &[crate::registry::Change::Put(Box::new(inst("z", "z", 1)))],
    );
    assert!(matches!(r, Err(BackendError::Conflict(_))), "{r:?}");
    let l = b.load().expect("load");
    assert_eq!(l.revision, 5);
    assert!(l.instances.iter().all(|i| i.service != "z"));
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
