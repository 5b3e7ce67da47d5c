//! One test suite per store, run against every backend of that store through its storage
//! trait:
//! - KV ([`KvBackend`]): embedded (redb) and etcd — revisions/versions, CAS with a race of
//!   concurrent writers (exactly one wins, through put and through txn), many concurrent puts
//!   (one gap-free revision each, seen once and in order by a watcher), txn, range pagination, watch from a revision and
//!   its resumption after the stream is dropped, compaction errors, lease expiry and revoke,
//!   auto-compaction.
//! - Registry ([`Backend`], and a [`Registry`] over it): embedded and etcd.
//! - Objects ([`ObjectBackend`], plus the S3 endpoint over it for conditional gets): embedded
//!   (files + redb) and S3 ([`RemoteObjects`] on moto's server) — a streamed multi-MB round
//!   trip with MD5, failed puts that write nothing, ranges, metadata, delimiter listing with
//!   pagination, multipart uploads, conditional gets, deletes.
//!
//! etcd and moto are started by the tests (skipped loudly without them, failures with
//! `WEIR_REQUIRE_ETCD=1` / `WEIR_REQUIRE_S3=1`, as `scripts/test.sh` sets). Revisions are
//! compared relatively, never as absolute numbers, so etcd's own revisions pass.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use md5::{Digest as _, Md5};
use weir_control_plane::etcd::kv::EtcdKv;
use weir_control_plane::etcd::registry::EtcdRegistryBackend;
use weir_control_plane::etcd::testing::EtcdProcess;
use weir_control_plane::etcd::{Etcd, EtcdUrl};
use weir_control_plane::kv::{AnyKv, EmbeddedKv, KvBackend, KvError, WatchStream};
use weir_control_plane::objects::testing::MotoProcess;
use weir_control_plane::objects::{
    ByteRange, ByteStream, EmbeddedObjects, ListRequest, ObjError, ObjectBackend, PutOptions,
    RemoteObjects, hex, multipart_etag,
};
use weir_control_plane::proto::kv as pb;
use weir_control_plane::proto::kv::compare::{CompareResult, CompareTarget, TargetUnion};
use weir_control_plane::proto::kv::event::EventType;
use weir_control_plane::proto::registry as rpb;
use weir_control_plane::registry::Registry;
use weir_control_plane::registry::store::{Backend, BackendError, Change, EmbeddedBackend, Loaded};
use weir_control_plane::storage::Store;

use crate::harness::temp_dir;

// ---------------------------------------------------------------------------------------
// KV

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

async fn get<K: KvBackend>(kv: &K, k: &str) -> Option<pb::KeyValue> {
    kv.range(pb::RangeRequest {
        key: k.into(),
        ..Default::default()
    })
    .await
    .expect("range")
    .kvs
    .into_iter()
    .next()
}

async fn next_resp(s: &mut WatchStream) -> pb::WatchResponse {
    match tokio::time::timeout(Duration::from_secs(15), s.next()).await {
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

/// Revisions, versions, CAS (including a race: exactly one of concurrent writers wins),
/// deletes and limits.
async fn kv_cas_and_versions<K: KvBackend>(kv: Arc<K>) {
    let r1 = rev(&kv.put(put_req("a", "1")).await.expect("put").header);
    let a = get(&*kv, "a").await.expect("a");
    assert_eq!((a.create_revision, a.mod_revision, a.version), (r1, r1, 1));
    let r = kv.put(put_req("a", "2")).await.expect("put");
    let r2 = rev(&r.header);
    assert!(r2 > r1);
    assert_eq!(r.prev_kv.expect("prev").value, b"1");
    let a = get(&*kv, "a").await.expect("a");
    assert_eq!((a.create_revision, a.mod_revision, a.version), (r1, r2, 2));

    let mut cas = put_req("a", "3");
    cas.expected_mod_revision = Some(r1);
    assert!(matches!(
        kv.put(cas.clone()).await,
        Err(KvError::FailedPrecondition(_))
    ));
    assert_eq!(
        get(&*kv, "a").await.expect("a").value,
        b"2",
        "nothing written"
    );
    cas.expected_mod_revision = Some(r2);
    kv.put(cas).await.expect("cas with the right revision");
    let mut create = put_req("new", "x");
    create.expected_mod_revision = Some(0);
    kv.put(create.clone()).await.expect("create-if-absent");
    assert!(matches!(
        kv.put(create).await,
        Err(KvError::FailedPrecondition(_))
    ));

    // Concurrent CAS writers from one revision, several rounds: exactly one wins each.
    for round in 0..3 {
        let base = get(&*kv, "race").await.map_or(0, |k| k.mod_revision);
        let mut tasks = Vec::new();
        for i in 0..8 {
            let kv = kv.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = put_req("race", &format!("{round}-{i}"));
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
        assert_eq!(wins, 1, "round {round}");
        let race = get(&*kv, "race").await.expect("race");
        assert_eq!(race.version, round + 1, "one write per round");
    }

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
    // Recreated: version starts again, create_revision moves.
    let r5 = rev(&kv.put(put_req("a", "again")).await.expect("put").header);
    let a = get(&*kv, "a").await.expect("a");
    assert_eq!((a.create_revision, a.version), (r5, 1));

    assert!(matches!(
        kv.put(pb::PutRequest::default()).await,
        Err(KvError::InvalidArgument(_))
    ));
    let mut leased = put_req("l", "v");
    leased.lease = 0x7777;
    assert!(matches!(
        kv.put(leased).await,
        Err(KvError::LeaseNotFound(0x7777))
    ));
    assert!(get(&*kv, "l").await.is_none());
}

/// Many writers at once (the embedded store commits them in batches): puts to distinct keys
/// each get their own revision, in one gap-free sequence a watcher sees once and in order;
/// CAS writers racing through put and through txn on one key, exactly one wins per round.
async fn kv_concurrent_writers<K: KvBackend>(kv: Arc<K>) {
    let start = rev(&kv.put(put_req("conc/start", "")).await.expect("put").header);
    let mut w = kv
        .watch(pb::WatchRequest {
            key: "conc/k/".into(),
            prefix: true,
            start_revision: start + 1,
            ..Default::default()
        })
        .await
        .expect("watch");
    const N: usize = 48;
    let mut tasks = Vec::new();
    for i in 0..N {
        let kv = kv.clone();
        tasks.push(tokio::spawn(async move {
            let r = kv
                .put(put_req(&format!("conc/k/{i:02}"), &i.to_string()))
                .await
                .expect("put");
            (rev(&r.header), i)
        }));
    }
    let mut revs = Vec::new();
    for t in tasks {
        revs.push(t.await.expect("task"));
    }
    revs.sort_unstable();
    let expected: Vec<i64> = (1..=N as i64).map(|d| start + d).collect();
    assert_eq!(
        revs.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
        expected,
        "one revision per put, no gap, no repeat"
    );
    let mut seen = Vec::new();
    while seen.len() < N {
        let r = next_resp(&mut w).await;
        for (rv, ty, key) in evs(&r) {
            assert_eq!(ty, EventType::Put);
            seen.push((rv, key));
        }
    }
    let want: Vec<(i64, String)> = revs
        .iter()
        .map(|(r, i)| (*r, format!("conc/k/{i:02}")))
        .collect();
    assert_eq!(
        seen, want,
        "the watcher sees each put once, in revision order"
    );
    for (r, i) in &revs {
        let kv = get(&*kv, &format!("conc/k/{i:02}")).await.expect("key");
        assert_eq!(
            (kv.mod_revision, kv.value),
            (*r, i.to_string().into_bytes())
        );
    }

    for round in 0..3 {
        let base = get(&*kv, "conc/race").await.map_or(0, |k| k.mod_revision);
        let mut tasks = Vec::new();
        for i in 0..32 {
            let kv = kv.clone();
            tasks.push(tokio::spawn(async move {
                let value = format!("{round}-{i}");
                if i % 2 == 0 {
                    let mut r = put_req("conc/race", &value);
                    r.expected_mod_revision = Some(base);
                    match kv.put(r).await {
                        Ok(_) => true,
                        Err(KvError::FailedPrecondition(_)) => false,
                        Err(e) => panic!("CAS put: {e}"),
                    }
                } else {
                    let t = kv
                        .txn(pb::TxnRequest {
                            compare: vec![pb::Compare {
                                key: "conc/race".into(),
                                target: CompareTarget::Mod as i32,
                                result: CompareResult::Equal as i32,
                                target_union: Some(TargetUnion::ModRevision(base)),
                            }],
                            success: vec![pb::RequestOp {
                                request: Some(pb::request_op::Request::RequestPut(put_req(
                                    "conc/race",
                                    &value,
                                ))),
                            }],
                            ..Default::default()
                        })
                        .await
                        .expect("txn");
                    t.succeeded
                }
            }));
        }
        let mut wins = 0;
        for t in tasks {
            if t.await.expect("task") {
                wins += 1;
            }
        }
        assert_eq!(wins, 1, "round {round}: exactly one CAS writer wins");
        let race = get(&*kv, "conc/race").await.expect("race");
        assert_eq!(race.version, round + 1, "one write per round");
    }
}

/// Range pagination and transactions.
async fn kv_txn_and_ranges<K: KvBackend>(kv: &K) {
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
    assert!(!rest.more);
    assert_eq!(rest.kvs[0].key, b"p/c");
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
    // (The CAS part of the suite left "race" behind.)
    assert_eq!(
        keys,
        [
            b"p/b".to_vec(),
            b"p/c".to_vec(),
            b"q".to_vec(),
            b"race".to_vec()
        ]
    );
    assert!(all.kvs.iter().all(|k| k.value.is_empty()));
    let counted = kv
        .range(pb::RangeRequest {
            key: "p/".into(),
            prefix: true,
            count_only: true,
            ..Default::default()
        })
        .await
        .expect("count");
    assert_eq!((counted.count, counted.kvs.len()), (3, 0));

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
    let before = get(kv, "q").await.expect("q").mod_revision;
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
    assert!(rev(&t.header) > before);
    let t = kv
        .txn(pb::TxnRequest {
            compare: vec![cmp("other")],
            success: ops("yes2"),
            failure: ops("no"),
        })
        .await
        .expect("txn");
    assert!(!t.succeeded);
    assert!(get(kv, "no").await.is_some() && get(kv, "yes2").await.is_none());
    // A compare on mod_revision guarding two writes: all or nothing.
    let q_mod = get(kv, "q").await.expect("q").mod_revision;
    let guarded = |m: i64| pb::TxnRequest {
        compare: vec![pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: "q".into(),
            target_union: Some(TargetUnion::ModRevision(m)),
        }],
        success: vec![
            pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(put_req("t1", "x"))),
            },
            pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(put_req("t2", "x"))),
            },
        ],
        failure: vec![],
    };
    assert!(!kv.txn(guarded(q_mod + 1)).await.expect("txn").succeeded);
    assert!(get(kv, "t1").await.is_none() && get(kv, "t2").await.is_none());
    let t = kv.txn(guarded(q_mod)).await.expect("txn");
    assert!(t.succeeded);
    let (t1, t2) = (
        get(kv, "t1").await.expect("t1"),
        get(kv, "t2").await.expect("t2"),
    );
    assert_eq!(t1.mod_revision, t2.mod_revision, "one revision for the txn");
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

/// Watch from a revision (history then live), resumption after the stream is dropped,
/// compaction errors.
async fn kv_watch_resume_and_compaction<K: KvBackend>(kv: &K) {
    let r1 = rev(&kv.put(put_req("w/a", "1")).await.expect("put").header);
    let r2 = rev(&kv.put(put_req("w/b", "1")).await.expect("put").header);
    kv.put(put_req("x", "outside")).await.expect("put");
    let watch = |from: i64| pb::WatchRequest {
        key: "w/".into(),
        prefix: true,
        start_revision: from,
        prev_kv: true,
        ..Default::default()
    };
    let mut s = kv.watch(watch(r1)).await.expect("watch");
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
    let last_seen = rev(&d.header);

    // The watcher goes away (a reconnect); writes continue; it resumes from last_seen + 1
    // and gets exactly what it missed, in order, then live events.
    drop(s);
    let mut missed = Vec::new();
    for i in 0..5 {
        let r = rev(&kv
            .put(put_req(&format!("w/m{i}"), "v"))
            .await
            .expect("put")
            .header);
        missed.push((r, EventType::Put, format!("w/m{i}")));
        kv.put(put_req(&format!("y{i}"), "outside"))
            .await
            .expect("put");
    }
    let mut s = kv.watch(watch(last_seen + 1)).await.expect("resume");
    let mut got = Vec::new();
    while got.len() < missed.len() {
        got.extend(evs(&next_resp(&mut s).await));
    }
    assert_eq!(got, missed, "no gap, no duplicate");
    let rl = rev(&kv.put(put_req("w/live", "v")).await.expect("put").header);
    assert_eq!(
        evs(&next_resp(&mut s).await),
        [(rl, EventType::Put, "w/live".to_string())]
    );
    drop(s);

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
    match kv.watch(watch(r1)).await {
        Err(KvError::Compacted {
            compact_revision, ..
        }) => assert_eq!(compact_revision, r3),
        Err(e) => panic!("expected Compacted, got {e:?}"),
        Ok(_) => panic!("expected Compacted, got a stream"),
    }
    // At the compact revision itself reads still work.
    let at = kv
        .range(pb::RangeRequest {
            key: "w/c".into(),
            revision: r3,
            ..Default::default()
        })
        .await
        .expect("read at the compact revision");
    assert_eq!(at.kvs.len(), 1);
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

/// Leases: keys vanish (as delete events) when the lease expires; revoke; keep-alive.
async fn kv_leases<K: KvBackend>(kv: &K) {
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
    // etcd raises TTLs below its minimum to that minimum.
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
    // The backend expires the lease on its own clock; the test only bounds the wait.
    let resp = next_resp(&mut s).await;
    assert_eq!(evs(&resp)[0].1, EventType::Delete);
    assert!(get(kv, "leased").await.is_none());
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
    assert!(get(kv, "leased2").await.is_none());
    assert!(matches!(
        kv.lease_revoke(pb::LeaseRevokeRequest { id: 4242 }).await,
        Err(KvError::LeaseNotFound(4242))
    ));
}

/// Auto-compaction (`--kv-auto-compaction-retention 1`, ticking fast) compacts old
/// revisions and keeps the newest.
async fn kv_auto_compaction(kv: Arc<AnyKv>) {
    use weir_control_plane::kv::compaction::{Retention, spawn};
    let ra = rev(&kv.put(put_req("ac", "1")).await.expect("put").header);
    kv.put(put_req("ac", "2")).await.expect("put");
    // Retention 1 compacts to current - 1: revision `ra` is then below the compact revision.
    let rb = rev(&kv.put(put_req("ac", "3")).await.expect("put").header);
    let token = tokio_util::sync::CancellationToken::new();
    let task = spawn(
        Arc::downgrade(&kv),
        Retention::Revisions(1),
        Some(Duration::from_millis(100)),
        token.clone(),
    );
    let at = |r: i64| pb::RangeRequest {
        key: "ac".into(),
        revision: r,
        ..Default::default()
    };
    let mut compacted = false;
    for _ in 0..100 {
        if matches!(kv.range(at(ra)).await, Err(KvError::Compacted { .. })) {
            compacted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(compacted, "revision {ra} was never compacted");
    let r = kv.range(at(rb)).await.expect("the newest revision stays");
    assert_eq!(r.kvs[0].value, b"3");
    token.cancel();
    task.await.expect("compaction task");
}

/// The whole KV suite on a fresh backend.
async fn kv_suite(kv: Arc<AnyKv>) {
    kv_cas_and_versions(kv.clone()).await;
    kv_concurrent_writers(kv.clone()).await;
    kv_txn_and_ranges(&*kv).await;
    kv_watch_resume_and_compaction(&*kv).await;
    kv_leases(&*kv).await;
    kv_auto_compaction(kv).await;
}

fn etcd_client(p: &EtcdProcess, prefix: &str) -> Arc<Etcd> {
    let url: EtcdUrl = p.url(prefix).parse().expect("url");
    Etcd::connect(&url).expect("connect to etcd")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_suite_embedded() {
    let dir = temp_dir("suite-kv");
    let store = Arc::new(Store::open(&dir).expect("store"));
    let metrics = Arc::new(weir_control_plane::metrics::Metrics::default());
    let kv = Arc::new(AnyKv::Embedded(
        EmbeddedKv::open(store, metrics).expect("kv"),
    ));
    let token = tokio_util::sync::CancellationToken::new();
    let expiry = kv.spawn_expiry(token.clone());
    kv_suite(kv).await;
    token.cancel();
    if let Some(t) = expiry {
        let _ = t.await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_suite_etcd() {
    let Some(p) = EtcdProcess::start() else {
        return;
    };
    let client = etcd_client(&p, "/suite-kv");
    let kv = Arc::new(AnyKv::Etcd(EtcdKv::new(client.clone())));
    kv_suite(kv).await;
    // etcd-specific: another prefix is another namespace.
    let other = EtcdKv::new(etcd_client(&p, "/suite-kv-other"));
    assert!(get(&other, "a").await.is_none());
    let mine = EtcdKv::new(client);
    assert_eq!(
        get(&mine, "a").await.expect("a").key,
        b"a",
        "the namespace is stripped"
    );
}

// ---------------------------------------------------------------------------------------
// Registry

fn inst(service: &str, id: &str, port: u32) -> rpb::Instance {
    rpb::Instance {
        service: service.into(),
        instance_id: id.into(),
        address: "10.0.0.1".into(),
        port,
        weight: 1,
        ..Default::default()
    }
}

/// The storage trait: atomic, ordered commits with a revision.
fn registry_backend_suite(b: &dyn Backend) {
    assert_eq!(b.load().expect("load"), Loaded::default());
    b.commit(1, &[Change::Put(Box::new(inst("web", "b", 80)))])
        .expect("commit");
    b.commit(
        2,
        &[
            Change::Put(Box::new(inst("web", "a", 81))),
            Change::Put(Box::new(inst("web-x", "a", 82))),
        ],
    )
    .expect("commit");
    b.commit(3, &[Change::Put(Box::new(inst("web", "b", 90)))])
        .expect("replace");
    let l = b.load().expect("load");
    assert_eq!(l.revision, 3);
    let got: Vec<(&str, &str, u32)> = l
        .instances
        .iter()
        .map(|i| (i.service.as_str(), i.instance_id.as_str(), i.port))
        .collect();
    // Keys of one service sort together, by id ("web\0…" before "web-x\0…").
    assert_eq!(
        got,
        [("web", "a", 81), ("web", "b", 90), ("web-x", "a", 82)]
    );
    b.commit(
        4,
        &[Change::Delete {
            service: "web".into(),
            instance_id: "a".into(),
        }],
    )
    .expect("delete");
    let l = b.load().expect("load");
    assert_eq!(l.revision, 4);
    assert_eq!(l.instances.len(), 2);
    b.commit(
        5,
        &[Change::Delete {
            service: "nope".into(),
            instance_id: "x".into(),
        }],
    )
    .expect("delete absent");
    assert_eq!(b.load().expect("load").revision, 5);
    b.heartbeat("web", "b").expect("heartbeat");
    assert_eq!(
        b.load().expect("load").revision,
        5,
        "a heartbeat is no commit"
    );
}

/// A registry over the backend: register, list, events, deregister; a second registry
/// opened on the same backend (a restart, or another replica) loads the same state.
fn registry_suite(make: &dyn Fn() -> Arc<dyn Backend>) {
    let reg = Registry::open(make()).expect("open");
    let r1 = reg.register(&inst("api", "i1", 80)).expect("register");
    assert!(r1.created);
    let r2 = reg.register(&inst("api", "i2", 81)).expect("register");
    assert!(r2.revision > r1.revision);
    let again = reg.register(&inst("api", "i2", 82)).expect("re-register");
    assert!(!again.created);
    let (list, rev) = reg.list(Some("api"), false);
    assert_eq!(rev, again.revision);
    let ports: Vec<u32> = list.iter().map(|i| i.port).collect();
    assert_eq!(ports, [80, 82]);
    let (events, _) = reg.events_since(r1.revision, Some("api")).expect("events");
    assert_eq!(events.len(), 3);
    let d = reg.deregister("api", "i1").expect("deregister");
    assert!(d > again.revision);
    assert!(reg.deregister("api", "i1").is_err(), "already gone");
    drop(reg);
    let reopened = Registry::open(make()).expect("reopen");
    assert_eq!(reopened.revision(), d);
    let ids: Vec<String> = reopened
        .list(Some("api"), false)
        .0
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    assert_eq!(ids, ["i2"]);
}

#[test]
fn registry_suite_embedded() {
    let dir = temp_dir("suite-registry");
    {
        let store = Arc::new(Store::open(&dir.join("a")).expect("store"));
        registry_backend_suite(&EmbeddedBackend::new(store));
        let store = Arc::new(Store::open(&dir.join("b")).expect("store"));
        registry_suite(&|| Arc::new(EmbeddedBackend::new(store.clone())));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn registry_suite_etcd() {
    let Some(p) = EtcdProcess::start() else {
        return;
    };
    let b = EtcdRegistryBackend::new(etcd_client(&p, "/suite-reg-a"));
    registry_backend_suite(&b);
    // etcd-specific: a commit from a stale replica (expects revision 3 to follow 2; 5 is
    // stored) conflicts and writes nothing.
    let r = b.commit(3, &[Change::Put(Box::new(inst("z", "z", 1)))]);
    assert!(matches!(r, Err(BackendError::Conflict(_))), "{r:?}");
    let l = b.load().expect("load");
    assert_eq!(l.revision, 5);
    assert!(l.instances.iter().all(|i| i.service != "z"));
    registry_suite(&|| Arc::new(EtcdRegistryBackend::new(etcd_client(&p, "/suite-reg-b"))));
}

// ---------------------------------------------------------------------------------------
// Objects

const MIB: usize = 1024 * 1024;

/// Deterministic bytes (xorshift), so a round trip is checked byte for byte.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A listing request with S3's default page size (`max_keys` 0 is an empty page).
fn lr() -> ListRequest {
    ListRequest {
        max_keys: 1000,
        ..Default::default()
    }
}

/// `data` as a stream of `chunk`-byte pieces.
fn body(data: &[u8], chunk: usize) -> ByteStream {
    let pieces: Vec<Result<Bytes, ObjError>> = data
        .chunks(chunk.max(1))
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    Box::pin(futures::stream::iter(pieces))
}

/// `data`'s first `n` bytes, then a body error.
fn failing_body(data: &[u8], n: usize) -> ByteStream {
    let mut pieces: Vec<Result<Bytes, ObjError>> = data[..n]
        .chunks(MIB)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    pieces.push(Err(ObjError::Body("client went away".into())));
    Box::pin(futures::stream::iter(pieces))
}

async fn read_all(mut s: ByteStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.expect("chunk"));
    }
    out
}

fn md5_hex(b: &[u8]) -> String {
    hex(&Md5::digest(b))
}

async fn objects_buckets(b: &dyn ObjectBackend) {
    assert!(matches!(
        b.create_bucket("Bad_Name").await,
        Err(ObjError::InvalidBucketName(_))
    ));
    b.create_bucket("suite").await.expect("mb");
    b.create_bucket("suite-2").await.expect("mb");
    assert!(matches!(
        b.create_bucket("suite").await,
        Err(ObjError::BucketExists(_))
    ));
    let names: Vec<String> = b
        .list_buckets()
        .await
        .expect("ls")
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(names, ["suite", "suite-2"]);
    b.head_bucket("suite").await.expect("head bucket");
    assert!(matches!(
        b.head_bucket("nope-bucket").await,
        Err(ObjError::NoSuchBucket(_))
    ));
    assert!(matches!(
        b.put_object("nope-bucket", "k", PutOptions::default(), body(b"x", 1))
            .await,
        Err(ObjError::NoSuchBucket(_))
    ));
}

/// A streamed multi-MB round trip (MD5 checked), failed puts that leave nothing, ranges,
/// metadata and content type.
async fn objects_streaming(b: &dyn ObjectBackend) {
    // 21 MiB + a tail, in 1 MiB pieces: more than one backend chunk for the S3 backend.
    let data = pattern(21 * MIB + 12345, 7);
    let want = md5_hex(&data);
    let mut metadata = BTreeMap::new();
    metadata.insert("owner".to_string(), "suite".to_string());
    let opts = PutOptions {
        content_type: Some("application/x-weir".into()),
        metadata: metadata.clone(),
        content_md5: Some(Md5::digest(&data).into()),
    };
    let info = b
        .put_object("suite", "big/blob.bin", opts, body(&data, MIB))
        .await
        .expect("put");
    assert_eq!(
        (info.size, info.etag.as_str()),
        (data.len() as u64, want.as_str())
    );
    let head = b.head_object("suite", "big/blob.bin").await.expect("head");
    assert_eq!(head.etag, want, "single-part ETag = hex MD5");
    assert_eq!(head.size, data.len() as u64);
    assert_eq!(head.content_type, "application/x-weir");
    assert_eq!(head.metadata, metadata);
    let (ginfo, range, stream) = b
        .get_object("suite", "big/blob.bin", None)
        .await
        .expect("get");
    assert_eq!(range, None);
    assert_eq!(ginfo.etag, want);
    assert_eq!(ginfo.metadata, metadata);
    let got = read_all(stream).await;
    assert_eq!(got.len(), data.len());
    assert_eq!(md5_hex(&got), want, "bytes round trip");

    // Ranges: a-b, a-, -n, past the end (clamped), unsatisfiable.
    let size = data.len() as u64;
    for (r, (a, z)) in [
        (ByteRange::From(0, Some(9)), (0, 9)),
        (
            ByteRange::From(5 * MIB as u64, Some(5 * MIB as u64 + 99)),
            (5 * MIB as u64, 5 * MIB as u64 + 99),
        ),
        (ByteRange::From(size - 10, None), (size - 10, size - 1)),
        (ByteRange::Suffix(777), (size - 777, size - 1)),
        (
            ByteRange::From(size - 3, Some(size + 100)),
            (size - 3, size - 1),
        ),
    ] {
        let (_, resolved, s) = b
            .get_object("suite", "big/blob.bin", Some(r))
            .await
            .expect("range get");
        assert_eq!(resolved, Some((a, z)), "{r:?}");
        let bytes = read_all(s).await;
        assert_eq!(bytes, data[a as usize..=z as usize], "{r:?}");
    }
    assert!(matches!(
        b.get_object("suite", "big/blob.bin", Some(ByteRange::From(size, None)))
            .await,
        Err(ObjError::InvalidRange { .. })
    ));

    // A wrong Content-MD5, a body that fails midway, an oversized key: nothing is written,
    // the old object stays.
    let other = pattern(9 * MIB, 9);
    let bad_md5 = PutOptions {
        content_md5: Some([0u8; 16]),
        ..Default::default()
    };
    assert!(matches!(
        b.put_object("suite", "big/blob.bin", bad_md5, body(&other, MIB))
            .await,
        Err(ObjError::BadDigest(_))
    ));
    assert!(matches!(
        b.put_object(
            "suite",
            "big/blob.bin",
            PutOptions::default(),
            failing_body(&other, 6 * MIB)
        )
        .await,
        Err(ObjError::Body(_))
    ));
    assert!(matches!(
        b.put_object(
            "suite",
            "new-failed",
            PutOptions::default(),
            failing_body(&other, 100)
        )
        .await,
        Err(ObjError::Body(_))
    ));
    assert!(matches!(
        b.head_object("suite", "new-failed").await,
        Err(ObjError::NoSuchKey(_))
    ));
    assert_eq!(
        b.head_object("suite", "big/blob.bin")
            .await
            .expect("head")
            .etag,
        want,
        "the failed puts left the object alone"
    );
    assert!(matches!(
        b.put_object(
            "suite",
            &"k".repeat(1025),
            PutOptions::default(),
            body(b"x", 1)
        )
        .await,
        Err(ObjError::InvalidArgument(_))
    ));
    // An empty object.
    let e = b
        .put_object("suite", "empty", PutOptions::default(), body(b"", 1))
        .await
        .expect("empty");
    assert_eq!(e.etag, md5_hex(b""));
    let (ei, _, s) = b.get_object("suite", "empty", None).await.expect("get");
    assert_eq!(
        (ei.size, ei.content_type.as_str()),
        (0, "application/octet-stream")
    );
    assert!(read_all(s).await.is_empty());
    // Overwrite: new ETag and bytes.
    let small = b
        .put_object(
            "suite",
            "big/blob.bin",
            PutOptions::default(),
            body(b"tiny", 2),
        )
        .await
        .expect("overwrite");
    assert_eq!(small.etag, md5_hex(b"tiny"));
    let (_, _, s) = b
        .get_object("suite", "big/blob.bin", None)
        .await
        .expect("get");
    assert_eq!(read_all(s).await, b"tiny");
}

/// Listing with prefix, delimiter, pagination, start-after.
async fn objects_listing(b: &dyn ObjectBackend) {
    b.create_bucket("list").await.expect("mb");
    let keys = [
        "a.txt",
        "dir/1",
        "dir/2",
        "dir/sub/3",
        "dir2/x",
        "e/f/g/h",
        "photos/2024/jan.jpg",
        "photos/2024/feb.jpg",
        "photos/2025/mar.jpg",
        "photos/readme",
        "z",
    ];
    for k in keys {
        b.put_object("list", k, PutOptions::default(), body(k.as_bytes(), 3))
            .await
            .expect("put");
    }
    // Everything, 3 per page, following tokens.
    let mut all = Vec::new();
    let mut token = None;
    for _ in 0..10 {
        let page = b
            .list_objects(
                "list",
                ListRequest {
                    max_keys: 3,
                    continuation_token: token.clone(),
                    ..lr()
                },
            )
            .await
            .expect("list");
        assert!(page.objects.len() <= 3);
        all.extend(page.objects.iter().map(|o| o.key.clone()));
        if !page.truncated {
            break;
        }
        token = page.next_token.clone();
        assert!(token.is_some());
    }
    let mut sorted = keys.to_vec();
    sorted.sort_unstable();
    assert_eq!(all, sorted);
    let one = b.list_objects("list", lr()).await.expect("list");
    let z = one.objects.iter().find(|o| o.key == "z").expect("z");
    assert_eq!((z.size, z.etag.as_str()), (1, md5_hex(b"z").as_str()));

    // Delimiter at the top: objects and common prefixes in one order.
    let top = b
        .list_objects(
            "list",
            ListRequest {
                delimiter: Some("/".into()),
                ..lr()
            },
        )
        .await
        .expect("list");
    let objs: Vec<&str> = top.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(objs, ["a.txt", "z"]);
    assert_eq!(top.common_prefixes, ["dir/", "dir2/", "e/", "photos/"]);
    assert!(!top.truncated);
    // Paged: 2 entries (keys or prefixes) per page, the same entries overall.
    let mut entries = Vec::new();
    let mut token = None;
    for _ in 0..10 {
        let page = b
            .list_objects(
                "list",
                ListRequest {
                    delimiter: Some("/".into()),
                    max_keys: 2,
                    continuation_token: token.clone(),
                    ..lr()
                },
            )
            .await
            .expect("list");
        assert!(page.objects.len() + page.common_prefixes.len() <= 2);
        entries.extend(page.objects.iter().map(|o| o.key.clone()));
        entries.extend(page.common_prefixes.iter().cloned());
        if !page.truncated {
            break;
        }
        token = page.next_token.clone();
    }
    entries.sort();
    assert_eq!(entries, ["a.txt", "dir/", "dir2/", "e/", "photos/", "z"]);
    // Under a prefix (a partial segment, too).
    let photos = b
        .list_objects(
            "list",
            ListRequest {
                prefix: "photos/".into(),
                delimiter: Some("/".into()),
                ..lr()
            },
        )
        .await
        .expect("list");
    assert_eq!(photos.common_prefixes, ["photos/2024/", "photos/2025/"]);
    let objs: Vec<&str> = photos.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(objs, ["photos/readme"]);
    let partial = b
        .list_objects(
            "list",
            ListRequest {
                prefix: "di".into(),
                ..lr()
            },
        )
        .await
        .expect("list");
    let objs: Vec<&str> = partial.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(objs, ["dir/1", "dir/2", "dir/sub/3", "dir2/x"]);
    let after = b
        .list_objects(
            "list",
            ListRequest {
                prefix: "dir/".into(),
                start_after: Some("dir/1".into()),
                ..lr()
            },
        )
        .await
        .expect("list");
    let objs: Vec<&str> = after.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(objs, ["dir/2", "dir/sub/3"]);
    // Another delimiter.
    let dash = b
        .list_objects(
            "list",
            ListRequest {
                prefix: "photos/2024/".into(),
                delimiter: Some(".".into()),
                ..lr()
            },
        )
        .await
        .expect("list");
    assert_eq!(
        dash.common_prefixes,
        ["photos/2024/feb.", "photos/2024/jan."]
    );
    let none = b
        .list_objects(
            "list",
            ListRequest {
                prefix: "nothing/".into(),
                ..lr()
            },
        )
        .await
        .expect("list");
    assert!(none.objects.is_empty() && !none.truncated);
    assert!(matches!(
        b.list_objects("nope-bucket", lr()).await,
        Err(ObjError::NoSuchBucket(_))
    ));
    // A bucket with objects cannot go; emptied, it can.
    assert!(matches!(
        b.delete_bucket("list").await,
        Err(ObjError::BucketNotEmpty(_))
    ));
    for k in keys {
        assert!(b.delete_object("list", k).await.expect("rm"), "{k}");
    }
    assert!(!b.delete_object("list", "z").await.expect("rm again"));
    b.delete_bucket("list").await.expect("rb");
    assert!(matches!(
        b.head_bucket("list").await,
        Err(ObjError::NoSuchBucket(_))
    ));
}

/// Multipart uploads: parts (one replaced), listing, every completion error, the S3 ETag,
/// abort.
async fn objects_multipart(b: &dyn ObjectBackend) {
    let mut metadata = BTreeMap::new();
    metadata.insert("kind".to_string(), "multi".to_string());
    let id = b
        .create_multipart(
            "suite",
            "mp/obj",
            PutOptions {
                content_type: Some("text/x-parts".into()),
                metadata: metadata.clone(),
                content_md5: None,
            },
        )
        .await
        .expect("create");
    let p1 = pattern(5 * MIB, 11);
    let p2_old = pattern(MIB, 12);
    let p2 = pattern(3 * MIB + 17, 13);
    let i1 = b
        .upload_part("suite", "mp/obj", &id, 1, None, body(&p1, MIB))
        .await
        .expect("part 1");
    assert_eq!(i1.etag, md5_hex(&p1));
    b.upload_part("suite", "mp/obj", &id, 2, None, body(&p2_old, MIB))
        .await
        .expect("part 2");
    let i2 = b
        .upload_part(
            "suite",
            "mp/obj",
            &id,
            2,
            Some(Md5::digest(&p2).into()),
            body(&p2, MIB),
        )
        .await
        .expect("part 2 again");
    assert!(matches!(
        b.upload_part("suite", "mp/obj", &id, 3, Some([1; 16]), body(b"x", 1))
            .await,
        Err(ObjError::BadDigest(_))
    ));
    assert!(matches!(
        b.upload_part("suite", "mp/obj", &id, 0, None, body(b"x", 1))
            .await,
        Err(ObjError::InvalidArgument(_))
    ));
    assert!(matches!(
        b.upload_part("suite", "mp/obj", "no-such-upload", 1, None, body(b"x", 1))
            .await,
        Err(ObjError::NoSuchUpload(_))
    ));
    let parts = b.list_parts("suite", "mp/obj", &id).await.expect("parts");
    let listed: Vec<(u32, String, u64)> = parts
        .iter()
        .map(|p| (p.number, p.etag.clone(), p.size))
        .collect();
    assert_eq!(
        listed,
        [
            (1, i1.etag.clone(), p1.len() as u64),
            (2, i2.etag.clone(), p2.len() as u64)
        ]
    );
    // Completion errors write nothing.
    assert!(matches!(
        b.complete_multipart(
            "suite",
            "mp/obj",
            &id,
            vec![(2, i2.etag.clone()), (1, i1.etag.clone())]
        )
        .await,
        Err(ObjError::InvalidPartOrder)
    ));
    assert!(matches!(
        b.complete_multipart(
            "suite",
            "mp/obj",
            &id,
            vec![(1, i1.etag.clone()), (2, md5_hex(&p2_old))]
        )
        .await,
        Err(ObjError::InvalidPart(2))
    ));
    assert!(matches!(
        b.complete_multipart(
            "suite",
            "mp/obj",
            &id,
            vec![(1, i1.etag.clone()), (3, i2.etag.clone())]
        )
        .await,
        Err(ObjError::InvalidPart(3))
    ));
    assert!(matches!(
        b.head_object("suite", "mp/obj").await,
        Err(ObjError::NoSuchKey(_))
    ));
    // A small part that is not last.
    let small_id = b
        .create_multipart("suite", "mp/small", PutOptions::default())
        .await
        .expect("create");
    let s1 = b
        .upload_part("suite", "mp/small", &small_id, 1, None, body(b"small", 5))
        .await
        .expect("part");
    let s2 = b
        .upload_part("suite", "mp/small", &small_id, 2, None, body(b"tail", 4))
        .await
        .expect("part");
    assert!(matches!(
        b.complete_multipart(
            "suite",
            "mp/small",
            &small_id,
            vec![(1, s1.etag.clone()), (2, s2.etag.clone())]
        )
        .await,
        Err(ObjError::EntityTooSmall { part: 1, .. })
    ));
    b.abort_multipart("suite", "mp/small", &small_id)
        .await
        .expect("abort");
    assert!(matches!(
        b.list_parts("suite", "mp/small", &small_id).await,
        Err(ObjError::NoSuchUpload(_))
    ));

    let done = b
        .complete_multipart(
            "suite",
            "mp/obj",
            &id,
            vec![(1, format!("\"{}\"", i1.etag)), (2, i2.etag.clone())],
        )
        .await
        .expect("complete");
    let want_etag = multipart_etag(&[i1.etag.clone(), i2.etag.clone()]).expect("etag");
    assert!(want_etag.ends_with("-2"));
    assert_eq!(done.etag, want_etag);
    assert_eq!(done.size, (p1.len() + p2.len()) as u64);
    let (info, _, s) = b.get_object("suite", "mp/obj", None).await.expect("get");
    assert_eq!(info.etag, want_etag);
    assert_eq!(info.content_type, "text/x-parts");
    assert_eq!(info.metadata, metadata);
    let got = read_all(s).await;
    let mut whole = p1.clone();
    whole.extend_from_slice(&p2);
    assert_eq!(md5_hex(&got), md5_hex(&whole));
    // A range across the part boundary.
    let a = p1.len() as u64 - 5;
    let (_, _, s) = b
        .get_object("suite", "mp/obj", Some(ByteRange::From(a, Some(a + 9))))
        .await
        .expect("range");
    assert_eq!(read_all(s).await, whole[a as usize..a as usize + 10]);
    assert!(matches!(
        b.list_parts("suite", "mp/obj", &id).await,
        Err(ObjError::NoSuchUpload(_))
    ));
    let listed = b
        .list_objects(
            "suite",
            ListRequest {
                prefix: "mp/".into(),
                ..lr()
            },
        )
        .await
        .expect("list");
    let l: Vec<(&str, &str)> = listed
        .objects
        .iter()
        .map(|o| (o.key.as_str(), o.etag.as_str()))
        .collect();
    assert_eq!(
        l,
        [("mp/obj", want_etag.as_str())],
        "listing shows our ETag"
    );
}

/// Conditional and ranged GETs through the S3 endpoint over the backend.
async fn objects_conditional_get(backend: Arc<dyn ObjectBackend>) {
    use crate::objects::{AK, SK, Sign, send};
    let settings = weir_control_plane::settings::S3Settings {
        region: "us-east-1".into(),
        access_keys: vec![weir_control_plane::settings::AccessKeySettings {
            access_key_id: AK.into(),
            secret_access_key: SK.into(),
            scopes: vec![
                weir_control_plane::settings::Scope::ObjectsRead,
                weir_control_plane::settings::Scope::ObjectsWrite,
            ],
        }],
    };
    let metrics = Arc::new(weir_control_plane::objects::metrics::ObjectsMetrics::new(
        backend.clone(),
    ));
    let s3 = weir_control_plane::objects::s3::S3::new(backend.clone(), &settings, metrics);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(weir_control_plane::objects::s3::serve(
        s3,
        l,
        None,
        Arc::new(weir_control_plane::ratelimit::RequestLimiter::unlimited()),
        stop.clone(),
    ));
    let data = pattern(70_000, 21);
    let info = backend
        .put_object(
            "suite",
            "cond/obj",
            PutOptions::default(),
            body(&data, 10_000),
        )
        .await
        .expect("put");
    let quoted = format!("\"{}\"", info.etag);
    let sign = Sign::Key(AK, SK);
    let r = send(
        addr,
        "GET",
        "/suite/cond/obj",
        &[("if-none-match", &quoted)],
        vec![],
        sign,
    )
    .await;
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    let r = send(
        addr,
        "GET",
        "/suite/cond/obj",
        &[("if-match", "\"0000\"")],
        vec![],
        sign,
    )
    .await;
    assert_eq!(r.status, 412);
    let r = send(
        addr,
        "GET",
        "/suite/cond/obj",
        &[("if-match", &quoted)],
        vec![],
        sign,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, data);
    let r = send(
        addr,
        "GET",
        "/suite/cond/obj",
        &[("if-none-match", "\"other\""), ("range", "bytes=100-199")],
        vec![],
        sign,
    )
    .await;
    assert_eq!(r.status, 206);
    assert_eq!(r.body, data[100..200]);
    let r = send(addr, "HEAD", "/suite/cond/obj", &[], vec![], sign).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers.get("etag").and_then(|v| v.to_str().ok()),
        Some(quoted.as_str())
    );
    stop.cancel();
    let _ = task.await;
}

/// The whole objects suite on a fresh backend.
async fn objects_suite(b: Arc<dyn ObjectBackend>) {
    objects_buckets(&*b).await;
    objects_streaming(&*b).await;
    objects_listing(&*b).await;
    objects_multipart(&*b).await;
    objects_conditional_get(b.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_suite_embedded() {
    let dir = temp_dir("suite-objects");
    let store = Arc::new(Store::open(&dir.join("meta")).expect("store"));
    let b: Arc<dyn ObjectBackend> =
        Arc::new(EmbeddedObjects::open(store, Some(&dir.join("objects"))).expect("objects"));
    objects_suite(b).await;
    let _ = std::fs::remove_dir_all(&dir);
}

fn remote(m: &MotoProcess, prefix: &str) -> RemoteObjects {
    let url = m.url("weir-suite", prefix).parse().expect("url");
    RemoteObjects::s3(&url, Some(&MotoProcess::credentials())).expect("backend")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_suite_s3() {
    let Some(m) = tokio::task::spawn_blocking(MotoProcess::start)
        .await
        .expect("task")
    else {
        return;
    };
    m.create_bucket("weir-suite");
    let b = remote(&m, "replica-set-1");
    b.probe().await.expect("probe");
    objects_suite(Arc::new(b.clone())).await;

    // S3-specific: a second replica on the same bucket and prefix sees the same objects;
    // another prefix is another store.
    let other_replica = remote(&m, "replica-set-1");
    let (info, _, s) = other_replica
        .get_object("suite", "mp/obj", None)
        .await
        .expect("shared object");
    assert!(info.etag.ends_with("-2"));
    assert_eq!(read_all(s).await.len(), 8 * MIB + 17);
    let elsewhere = remote(&m, "replica-set-2");
    assert!(elsewhere.list_buckets().await.expect("ls").is_empty());
    // Keys object_store cannot represent exactly are refused, not mangled.
    for bad in ["dir/", "/lead", "a//b", "a/./b", "a/../b"] {
        assert!(
            matches!(
                b.put_object("suite", bad, PutOptions::default(), body(b"x", 1))
                    .await,
                Err(ObjError::InvalidArgument(_))
            ),
            "{bad}"
        );
    }
    assert!(matches!(
        b.put_object(
            "suite",
            "meta",
            PutOptions {
                metadata: [("weir-etag".to_string(), "x".to_string())].into(),
                ..Default::default()
            },
            body(b"x", 1)
        )
        .await,
        Err(ObjError::InvalidArgument(_))
    ));
    // A dead endpoint is an error, not a hang.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let dead_url = format!("s3://weir-suite?endpoint=http://127.0.0.1:{port}")
        .parse()
        .expect("url");
    let dead = RemoteObjects::s3(&dead_url, Some(&MotoProcess::credentials())).expect("build");
    let r = tokio::time::timeout(Duration::from_secs(120), dead.probe()).await;
    assert!(matches!(r, Ok(Err(ObjError::Backend(_)))), "{r:?}");
}
