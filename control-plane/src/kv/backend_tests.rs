//! Unit tests of the embedded backend on an in-memory store, through [`KvBackend`]: what is
//! specific to it (absolute revisions, the watch hub, lagging watchers, metrics). The suite
//! every KV backend passes (embedded and etcd: CAS races, txn, pagination, watch resumption,
//! compaction, leases) is `tests/integration/store_suite.rs`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::metrics::Metrics;
use crate::proto::kv::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::proto::kv::event::EventType;
use crate::storage::Store;

fn open() -> (EmbeddedKv, Arc<Store>, Arc<Metrics>) {
    let store = Arc::new(Store::in_memory().expect("store"));
    let metrics = Arc::new(Metrics::default());
    let kv = EmbeddedKv::open(store.clone(), metrics.clone()).expect("open kv");
    (kv, store, metrics)
}

fn put_req(k: &str, v: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: k.into(),
        value: v.into(),
        prev_kv: true,
        ..Default::default()
    }
}

async fn put(kv: &EmbeddedKv, k: &str, v: &str) -> i64 {
    rev(&kv.put(put_req(k, v)).await.expect("put").header)
}

fn rev(h: &Option<pb::ResponseHeader>) -> i64 {
    h.as_ref().expect("header").revision
}

async fn get(kv: &EmbeddedKv, k: &str) -> Option<pb::KeyValue> {
    let r = kv
        .range(pb::RangeRequest {
            key: k.into(),
            ..Default::default()
        })
        .await
        .expect("range");
    assert!(r.kvs.len() <= 1);
    r.kvs.into_iter().next()
}

fn get_op(k: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
            key: k.into(),
            ..Default::default()
        })),
    }
}

fn put_op(k: &str, v: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(put_req(k, v))),
    }
}

fn cmp(k: &str, target: CompareTarget, result: CompareResult, u: TargetUnion) -> pb::Compare {
    pb::Compare {
        result: result as i32,
        target: target as i32,
        key: k.into(),
        target_union: Some(u),
    }
}

async fn next_resp(s: &mut WatchStream) -> pb::WatchResponse {
    match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
        Ok(Some(Ok(r))) => r,
        other => panic!("expected a watch response, got {other:?}"),
    }
}

/// (revision, type, key) of every event in `r`.
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

#[tokio::test]
async fn revisions_and_versions_follow_etcd() {
    let (kv, _, metrics) = open();
    assert_eq!(kv.revision(), 1);
    assert_eq!(put(&kv, "a", "1").await, 2);
    let a = get(&kv, "a").await.expect("a");
    assert_eq!(
        (a.create_revision, a.mod_revision, a.version),
        (2, 2, 1),
        "{a:?}"
    );
    let r = kv.put(put_req("a", "2")).await.expect("put");
    assert_eq!(rev(&r.header), 3);
    assert_eq!(r.prev_kv.expect("prev").value, b"1");
    let a = get(&kv, "a").await.expect("a");
    assert_eq!((a.create_revision, a.mod_revision, a.version), (2, 3, 2));
    assert_eq!(a.value, b"2");

    let d = kv
        .delete_range(pb::DeleteRangeRequest {
            key: "a".into(),
            prev_kv: true,
            ..Default::default()
        })
        .await
        .expect("delete");
    assert_eq!((rev(&d.header), d.deleted), (4, 1));
    assert_eq!(d.prev_kvs[0].value, b"2");
    // Deleting a missing key changes nothing, not even the revision.
    let d = kv
        .delete_range(pb::DeleteRangeRequest {
            key: "a".into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    assert_eq!((rev(&d.header), d.deleted), (4, 0));
    assert!(get(&kv, "a").await.is_none());
    // Re-created: version and create_revision start over.
    assert_eq!(put(&kv, "a", "3").await, 5);
    let a = get(&kv, "a").await.expect("a");
    assert_eq!((a.create_revision, a.mod_revision, a.version), (5, 5, 1));
    assert_eq!(metrics.kv.gauges().0, 5);
    assert_eq!(metrics.kv.gauges().1, 1);
}

#[tokio::test]
async fn compare_and_swap_on_mod_revision() {
    let (kv, _, _) = open();
    let create = pb::PutRequest {
        expected_mod_revision: Some(0),
        ..put_req("k", "v1")
    };
    assert_eq!(
        rev(&kv.put(create.clone()).await.expect("create").header),
        2
    );
    // A second create loses: the key exists now.
    let err = kv.put(create).await.expect_err("exists");
    assert!(matches!(err, KvError::FailedPrecondition(_)), "{err}");
    assert!(err.to_string().contains("mod_revision"), "{err}");
    let stale = pb::PutRequest {
        expected_mod_revision: Some(1),
        ..put_req("k", "v2")
    };
    assert!(matches!(
        kv.put(stale).await,
        Err(KvError::FailedPrecondition(_))
    ));
    assert_eq!(kv.revision(), 2, "a failed CAS writes nothing");
    assert_eq!(get(&kv, "k").await.expect("k").value, b"v1");
    let ok = pb::PutRequest {
        expected_mod_revision: Some(2),
        ..put_req("k", "v2")
    };
    assert_eq!(rev(&kv.put(ok).await.expect("cas").header), 3);
    assert_eq!(get(&kv, "k").await.expect("k").value, b"v2");
}

#[tokio::test]
async fn txn_branches_and_atomicity() {
    let (kv, _, _) = open();
    put(&kv, "a", "1").await; // rev 2
    // Success branch: two writes and a read, one revision.
    let t = kv
        .txn(pb::TxnRequest {
            compare: vec![
                cmp(
                    "a",
                    CompareTarget::Value,
                    CompareResult::Equal,
                    TargetUnion::Value(b"1".to_vec()),
                ),
                cmp(
                    "a",
                    CompareTarget::Version,
                    CompareResult::Greater,
                    TargetUnion::Version(0),
                ),
            ],
            success: vec![put_op("b", "2"), put_op("c", "3"), get_op("b")],
            failure: vec![put_op("x", "no")],
        })
        .await
        .expect("txn");
    assert!(t.succeeded);
    assert_eq!(rev(&t.header), 3);
    assert_eq!(t.responses.len(), 3);
    match &t.responses[2].response {
        Some(pb::response_op::Response::ResponseRange(r)) => {
            assert_eq!(r.kvs[0].value, b"2", "a read sees the txn's own write");
            assert_eq!(rev(&r.header), 3);
        }
        other => panic!("{other:?}"),
    }
    for k in ["b", "c"] {
        assert_eq!(get(&kv, k).await.expect(k).mod_revision, 3);
    }
    assert!(get(&kv, "x").await.is_none());

    // Failure branch: the compare is false (value compare on a missing key, and mod < 2).
    let t = kv
        .txn(pb::TxnRequest {
            compare: vec![
                cmp(
                    "missing",
                    CompareTarget::Value,
                    CompareResult::NotEqual,
                    TargetUnion::Value(b"z".to_vec()),
                ),
                cmp(
                    "a",
                    CompareTarget::Mod,
                    CompareResult::Less,
                    TargetUnion::ModRevision(2),
                ),
            ],
            success: vec![put_op("x", "yes")],
            failure: vec![put_op("f", "1")],
        })
        .await
        .expect("txn");
    assert!(!t.succeeded);
    assert_eq!(rev(&t.header), 4);
    assert!(get(&kv, "x").await.is_none());
    assert!(get(&kv, "f").await.is_some());

    // A failing op (unknown lease) aborts the whole txn: the first put is not written.
    let err = kv
        .txn(pb::TxnRequest {
            success: vec![
                put_op("y", "1"),
                pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                        lease: 99,
                        ..put_req("z", "1")
                    })),
                },
            ],
            ..Default::default()
        })
        .await
        .expect_err("unknown lease");
    assert!(matches!(err, KvError::LeaseNotFound(99)), "{err}");
    assert!(get(&kv, "y").await.is_none());
    assert_eq!(kv.revision(), 4);

    // Malformed: a compare whose value does not match its target; duplicate keys; too many
    // ops.
    let bad = [
        pb::TxnRequest {
            compare: vec![cmp(
                "a",
                CompareTarget::Mod,
                CompareResult::Equal,
                TargetUnion::Value(b"1".to_vec()),
            )],
            ..Default::default()
        },
        pb::TxnRequest {
            success: vec![put_op("d", "1"), put_op("d", "2")],
            ..Default::default()
        },
        pb::TxnRequest {
            failure: (0..=MAX_TXN_OPS)
                .map(|i| put_op(&format!("k{i}"), "v"))
                .collect(),
            ..Default::default()
        },
    ];
    for b in bad {
        let e = kv.txn(b).await.expect_err("invalid");
        assert!(matches!(e, KvError::InvalidArgument(_)), "{e}");
    }
    assert_eq!(kv.revision(), 4);
    // A txn that only reads does not bump the revision.
    let t = kv
        .txn(pb::TxnRequest {
            success: vec![get_op("a")],
            ..Default::default()
        })
        .await
        .expect("read txn");
    assert_eq!(rev(&t.header), 4);
}

#[tokio::test]
async fn range_pagination_counts_and_old_revisions() {
    let (kv, _, _) = open();
    for i in 0..10 {
        put(&kv, &format!("p/{i:02}"), &format!("v{i}")).await;
    }
    put(&kv, "q", "other").await; // rev 12
    let mut seen = Vec::new();
    let mut req = pb::RangeRequest {
        key: "p/".into(),
        prefix: true,
        limit: 3,
        ..Default::default()
    };
    let mut pages: i64 = 0;
    loop {
        let r = kv.range(req.clone()).await.expect("page");
        // The count covers the requested range: all of it on the first page, the rest after.
        assert_eq!(r.count, 10 - 3 * pages);
        pages += 1;
        seen.extend(
            r.kvs
                .iter()
                .map(|kv| String::from_utf8_lossy(&kv.key).into_owned()),
        );
        if !r.more {
            assert!(r.next_key.is_empty());
            break;
        }
        // Continue from next_key over [key, range_end) at the same revision.
        req = pb::RangeRequest {
            key: r.next_key,
            range_end: prefix_end(b"p/").expect("end"),
            prefix: false,
            limit: 3,
            revision: rev(&r.header),
            ..Default::default()
        };
        // A write between pages does not show up: the pages read at one revision.
        put(&kv, "p/05", "changed").await;
        assert!(pages < 10);
    }
    assert_eq!(pages, 4);
    let want: Vec<String> = (0..10).map(|i| format!("p/{i:02}")).collect();
    assert_eq!(seen, want);

    let c = kv
        .range(pb::RangeRequest {
            key: "p/".into(),
            prefix: true,
            count_only: true,
            ..Default::default()
        })
        .await
        .expect("count");
    assert_eq!((c.count, c.kvs.len(), c.more), (10, 0, false));
    let k = kv
        .range(pb::RangeRequest {
            key: "p/00".into(),
            range_end: "p/02".into(),
            keys_only: true,
            ..Default::default()
        })
        .await
        .expect("keys");
    assert_eq!(k.kvs.len(), 2);
    assert!(k.kvs.iter().all(|kv| kv.value.is_empty()));

    // At revision 6 only p/00..p/04 existed, with their first values.
    let old = kv
        .range(pb::RangeRequest {
            key: "p/".into(),
            prefix: true,
            revision: 6,
            ..Default::default()
        })
        .await
        .expect("old");
    assert_eq!(old.kvs.len(), 5);
    assert_eq!(old.kvs[4].value, b"v4");
    let at12 = kv
        .range(pb::RangeRequest {
            key: "p/05".into(),
            revision: 12,
            ..Default::default()
        })
        .await
        .expect("at 12");
    assert_eq!(at12.kvs[0].value, b"v5");
    assert!(matches!(
        kv.range(pb::RangeRequest {
            key: "p/05".into(),
            revision: 1000,
            ..Default::default()
        })
        .await,
        Err(KvError::FutureRevision { .. })
    ));
}

#[tokio::test]
async fn compaction_drops_history() {
    let (kv, _, metrics) = open();
    for i in 0..5 {
        put(&kv, "k", &format!("v{i}")).await; // revs 2..=6
    }
    let c = kv
        .compact(pb::CompactionRequest { revision: 4 })
        .await
        .expect("compact");
    assert_eq!(rev(&c.header), 6);
    let at = |revision| pb::RangeRequest {
        key: "k".into(),
        revision,
        ..Default::default()
    };
    match kv.range(at(3)).await {
        Err(KvError::Compacted {
            requested: 3,
            compact_revision: 4,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(kv.range(at(4)).await.expect("at 4").kvs[0].value, b"v2");
    match kv
        .watch(pb::WatchRequest {
            key: "k".into(),
            start_revision: 2,
            ..Default::default()
        })
        .await
    {
        Err(KvError::Compacted {
            compact_revision: 4,
            ..
        }) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("watch below the compact revision must fail"),
    }
    // From the compact revision on, history is still there.
    let mut w = kv
        .watch(pb::WatchRequest {
            key: "k".into(),
            start_revision: 4,
            ..Default::default()
        })
        .await
        .expect("watch");
    for r in 4..=6 {
        assert_eq!(evs(&next_resp(&mut w).await)[0].0, r);
    }
    assert!(matches!(
        kv.compact(pb::CompactionRequest { revision: 4 }).await,
        Err(KvError::Compacted { .. })
    ));
    assert!(matches!(
        kv.compact(pb::CompactionRequest { revision: 7 }).await,
        Err(KvError::FutureRevision { .. })
    ));
    let mut text = String::new();
    metrics.kv.render(&mut text);
    assert!(text.contains("weir_cp_kv_compact_revision 4"), "{text}");
}

#[tokio::test]
async fn watch_replays_history_then_live_without_gap_or_duplicate() {
    let (kv, _, _) = open();
    put(&kv, "w/a", "1").await; // 2
    put(&kv, "other", "x").await; // 3
    put(&kv, "w/b", "1").await; // 4
    let mut w = kv
        .watch(pb::WatchRequest {
            key: "w/".into(),
            prefix: true,
            start_revision: 2,
            prev_kv: true,
            ..Default::default()
        })
        .await
        .expect("watch");
    assert_eq!(
        evs(&next_resp(&mut w).await),
        [(2, EventType::Put, "w/a".into())]
    );
    assert_eq!(
        evs(&next_resp(&mut w).await),
        [(4, EventType::Put, "w/b".into())]
    );
    // Live events, with writers racing the watch.
    let writer = {
        let kv = kv.clone();
        tokio::spawn(async move {
            for i in 0..50 {
                put(&kv, "w/a", &format!("{i}")).await;
                put(&kv, "skip", "x").await;
            }
        })
    };
    // The writer's puts of w/a land at revisions 5, 7, 9, ... ("skip" takes the others).
    let mut last = 3;
    for _ in 0..50 {
        let r = next_resp(&mut w).await;
        let e = evs(&r);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].0, last + 2, "no gap, no duplicate");
        last = e[0].0;
        assert!(r.events[0].prev_kv.is_some(), "prev_kv asked for");
    }
    writer.await.expect("writer");
    kv.delete_range(pb::DeleteRangeRequest {
        key: "w/".into(),
        prefix: true,
        ..Default::default()
    })
    .await
    .expect("delete");
    let r = next_resp(&mut w).await;
    assert_eq!(
        evs(&r),
        [
            (last + 2, EventType::Delete, "w/a".into()),
            (last + 2, EventType::Delete, "w/b".into())
        ],
        "one response per revision"
    );
}

#[tokio::test]
async fn watch_started_during_writes_sees_every_revision_once() {
    let (kv, _, _) = open();
    let writer = {
        let kv = kv.clone();
        tokio::spawn(async move {
            for i in 0..300 {
                put(&kv, "k", &format!("{i}")).await;
            }
        })
    };
    // Open while the writer runs: history then live, stitched at whatever revision.
    tokio::task::yield_now().await;
    let mut w = kv
        .watch(pb::WatchRequest {
            key: "k".into(),
            start_revision: 2,
            ..Default::default()
        })
        .await
        .expect("watch");
    for r in 2..=301 {
        assert_eq!(evs(&next_resp(&mut w).await)[0].0, r);
    }
    writer.await.expect("writer");
}

#[tokio::test]
async fn lagging_watcher_catches_up_from_the_log() {
    let (kv, _, _) = open();
    let mut w = kv
        .watch(pb::WatchRequest {
            key: "k".into(),
            ..Default::default()
        })
        .await
        .expect("watch");
    // More revisions than the hub buffers, without reading: the watcher lags.
    let n = embedded::HUB_CAPACITY + 200;
    for i in 0..n {
        put(&kv, "k", &format!("{i}")).await;
    }
    for r in 2..(2 + n as i64) {
        assert_eq!(evs(&next_resp(&mut w).await)[0].0, r);
    }
}

#[tokio::test]
async fn watch_from_now_and_progress_notifications() {
    let store = Arc::new(Store::in_memory().expect("store"));
    let kv = EmbeddedKv::open_with(
        store,
        Arc::new(Metrics::default()),
        Duration::from_millis(50),
    )
    .expect("open");
    put(&kv, "k", "old").await; // 2
    let mut w = kv
        .watch(pb::WatchRequest {
            key: "k".into(),
            progress_notify: true,
            ..Default::default()
        })
        .await
        .expect("watch");
    let p = next_resp(&mut w).await;
    assert!(p.progress && p.events.is_empty());
    assert_eq!(rev(&p.header), 2);
    put(&kv, "k", "new").await; // 3
    loop {
        let r = next_resp(&mut w).await;
        if r.progress {
            continue;
        }
        assert_eq!(evs(&r), [(3, EventType::Put, "k".into())]);
        break;
    }
}

#[tokio::test]
async fn limits_are_invalid_argument() {
    let (kv, _, _) = open();
    let big = pb::PutRequest {
        key: "k".into(),
        value: vec![0; MAX_VALUE_BYTES + 1],
        ..Default::default()
    };
    assert!(matches!(
        kv.put(big).await,
        Err(KvError::InvalidArgument(_))
    ));
    let long_key = pb::PutRequest {
        key: vec![b'k'; MAX_KEY_BYTES + 1],
        ..Default::default()
    };
    assert!(matches!(
        kv.put(long_key).await,
        Err(KvError::InvalidArgument(_))
    ));
    assert!(matches!(
        kv.lease_grant(pb::LeaseGrantRequest { ttl: 0, id: 0 })
            .await,
        Err(KvError::InvalidArgument(_))
    ));
    assert_eq!(kv.revision(), 1);
}

#[tokio::test(start_paused = true)]
async fn lease_expiry_deletes_keys_as_events() {
    let (kv, store, metrics) = open();
    let token = CancellationToken::new();
    let task = kv.spawn_expiry(token.clone());
    let l = kv
        .lease_grant(pb::LeaseGrantRequest { ttl: 5, id: 0 })
        .await
        .expect("grant");
    assert_eq!((l.id, l.ttl), (1, 5));
    let dup = kv
        .lease_grant(pb::LeaseGrantRequest { ttl: 5, id: 1 })
        .await;
    assert!(
        matches!(dup, Err(KvError::FailedPrecondition(_))),
        "{dup:?}"
    );
    for k in ["l/a", "l/b"] {
        kv.put(pb::PutRequest {
            lease: l.id,
            ..put_req(k, "v")
        })
        .await
        .expect("put");
    }
    put(&kv, "l/plain", "v").await; // 4
    // Moving a key to no lease detaches it.
    let ttl = kv
        .lease_time_to_live(pb::LeaseTimeToLiveRequest { id: 1, keys: true })
        .await
        .expect("ttl");
    assert_eq!(ttl.keys, vec![b"l/a".to_vec(), b"l/b".to_vec()]);
    assert_eq!((ttl.ttl, ttl.granted_ttl), (5, 5));

    let mut w = kv
        .watch(pb::WatchRequest {
            key: "l/".into(),
            prefix: true,
            ..Default::default()
        })
        .await
        .expect("watch");
    // Kept alive at 3s, it survives past its first deadline.
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(
        kv.lease_keep_alive(pb::LeaseKeepAliveRequest { id: 1 })
            .await
            .expect("keepalive")
            .ttl,
        5
    );
    tokio::time::advance(Duration::from_secs(3)).await;
    tokio::task::yield_now().await;
    assert!(get(&kv, "l/a").await.is_some());
    // Not kept alive: revoked, keys deleted in one revision.
    let r = next_resp(&mut w).await;
    assert_eq!(
        evs(&r),
        [
            (5, EventType::Delete, "l/a".into()),
            (5, EventType::Delete, "l/b".into())
        ]
    );
    assert!(get(&kv, "l/a").await.is_none());
    assert!(get(&kv, "l/plain").await.is_some());
    assert_eq!(
        kv.lease_keep_alive(pb::LeaseKeepAliveRequest { id: 1 })
            .await
            .expect("keepalive")
            .ttl,
        0
    );
    assert!(matches!(
        kv.lease_time_to_live(pb::LeaseTimeToLiveRequest { id: 1, keys: false })
            .await,
        Err(KvError::LeaseNotFound(1))
    ));
    assert!(kv.lease_leases().await.expect("leases").leases.is_empty());
    let mut text = String::new();
    metrics.kv.render(&mut text);
    assert!(text.contains("weir_cp_kv_leases_expired_total 1"), "{text}");
    assert!(text.contains("weir_cp_kv_keys 1"), "{text}");

    // Leases survive reopening (re-armed with their TTL); revoke deletes the keys.
    let l2 = kv
        .lease_grant(pb::LeaseGrantRequest { ttl: 100, id: 42 })
        .await
        .expect("grant");
    kv.put(pb::PutRequest {
        lease: l2.id,
        ..put_req("l/c", "v")
    })
    .await
    .expect("put");
    token.cancel();
    task.await.expect("expiry task");
    drop(w);
    let kv2 = EmbeddedKv::open(store, Arc::new(Metrics::default())).expect("reopen");
    assert_eq!(kv2.revision(), 6);
    let leases = kv2.lease_leases().await.expect("leases");
    assert_eq!(leases.leases, vec![pb::LeaseStatus { id: 42 }]);
    let r = kv2
        .lease_revoke(pb::LeaseRevokeRequest { id: 42 })
        .await
        .expect("revoke");
    assert_eq!(rev(&r.header), 7);
    assert!(get(&kv2, "l/c").await.is_none());
    assert!(matches!(
        kv2.lease_revoke(pb::LeaseRevokeRequest { id: 42 }).await,
        Err(KvError::LeaseNotFound(42))
    ));
    assert!(matches!(
        kv2.put(pb::PutRequest {
            lease: 42,
            ..put_req("l/d", "v")
        })
        .await,
        Err(KvError::LeaseNotFound(42))
    ));
}

#[tokio::test]
async fn keys_move_between_leases_and_txn_ranges_read_own_state() {
    let (kv, _, _) = open();
    for id in [1, 2] {
        kv.lease_grant(pb::LeaseGrantRequest { ttl: 60, id })
            .await
            .expect("grant");
    }
    kv.put(pb::PutRequest {
        lease: 1,
        ..put_req("m", "a")
    })
    .await
    .expect("put"); // 2
    kv.put(pb::PutRequest {
        lease: 2,
        ..put_req("m", "b")
    })
    .await
    .expect("move"); // 3
    let r = kv
        .lease_revoke(pb::LeaseRevokeRequest { id: 1 })
        .await
        .expect("revoke 1");
    assert_eq!(rev(&r.header), 3, "lease 1 has no keys left: no revision");
    assert_eq!(get(&kv, "m").await.expect("m").lease, 2);
    let ttl = kv
        .lease_time_to_live(pb::LeaseTimeToLiveRequest { id: 2, keys: true })
        .await
        .expect("ttl");
    assert_eq!(ttl.keys, vec![b"m".to_vec()]);
    // Detach by putting without a lease: revoking 2 leaves the key.
    put(&kv, "m", "c").await; // 4
    let r = kv
        .lease_revoke(pb::LeaseRevokeRequest { id: 2 })
        .await
        .expect("revoke 2");
    assert_eq!(rev(&r.header), 4);
    assert_eq!(get(&kv, "m").await.expect("m").value, b"c");

    // A range inside a txn cannot ask for another revision.
    let e = kv
        .txn(pb::TxnRequest {
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                    key: "m".into(),
                    revision: 2,
                    ..Default::default()
                })),
            }],
            ..Default::default()
        })
        .await
        .expect_err("revision in txn");
    assert!(matches!(e, KvError::InvalidArgument(_)), "{e}");
    // Put and delete of the same key in one branch is refused.
    let e = kv
        .txn(pb::TxnRequest {
            success: vec![
                put_op("m", "x"),
                pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestDeleteRange(
                        pb::DeleteRangeRequest {
                            key: "a".into(),
                            range_end: "z".into(),
                            ..Default::default()
                        },
                    )),
                },
            ],
            ..Default::default()
        })
        .await
        .expect_err("put and delete");
    assert!(matches!(e, KvError::InvalidArgument(_)), "{e}");
    assert_eq!(kv.revision(), 4);

    // DeleteRange over [a, n) deletes m and not n.
    put(&kv, "n", "1").await; // 5
    let d = kv
        .delete_range(pb::DeleteRangeRequest {
            key: "a".into(),
            range_end: "n".into(),
            ..Default::default()
        })
        .await
        .expect("delete range");
    assert_eq!((d.deleted, rev(&d.header)), (1, 6));
    assert!(get(&kv, "n").await.is_some());
}

#[tokio::test]
async fn lagging_watcher_behind_a_compaction_gets_compacted_error() {
    let (kv, _, _) = open();
    let mut w = kv
        .watch(pb::WatchRequest {
            key: "k".into(),
            ..Default::default()
        })
        .await
        .expect("watch");
    let n = embedded::HUB_CAPACITY + 200;
    for i in 0..n {
        put(&kv, "k", &format!("{i}")).await;
    }
    let current = kv.revision();
    kv.compact(pb::CompactionRequest { revision: current })
        .await
        .expect("compact");
    // What was buffered arrives in order; then the watcher needs compacted history.
    let mut expect = 2;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
            Ok(Some(Ok(r))) => {
                assert_eq!(evs(&r)[0].0, expect);
                expect += 1;
            }
            Ok(Some(Err(KvError::Compacted {
                requested,
                compact_revision,
            }))) => {
                assert_eq!((requested, compact_revision), (expect, current));
                break;
            }
            other => panic!("expected events then a compacted error, got {other:?}"),
        }
    }
    assert!(expect < current, "the watcher lagged behind the compaction");
}
