//! The KV store (`weir.kv.v1`) over gRPC on a real weir-cp: put/get/CAS, txn, watch history
//! then live and resumption, compaction errors, lease expiry, restart durability (graceful and
//! `kill -9` mid-write), and the `weir-cp kv` CLI.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use tonic::transport::Channel;
use weir_control_plane::ControlPlane;
use weir_control_plane::proto::kv as pb;
use weir_control_plane::proto::kv::compare::{CompareResult, CompareTarget, TargetUnion};
use weir_control_plane::proto::kv::event::EventType;
use weir_control_plane::proto::kv::kv_client::KvClient;
use weir_control_plane::proto::kv::lease_client::LeaseClient;
use weir_control_plane::proto::kv::watch_client::WatchClient;

use crate::harness::*;

async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(WAIT)
        .connect()
        .await
        .expect("connect")
}

fn put_req(k: &str, v: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    }
}

fn rev(h: &Option<pb::ResponseHeader>) -> i64 {
    h.as_ref().expect("header").revision
}

async fn put(c: &mut KvClient<Channel>, k: &str, v: &str) -> i64 {
    rev(&c.put(put_req(k, v)).await.expect("put").into_inner().header)
}

async fn get(c: &mut KvClient<Channel>, k: &str) -> Option<pb::KeyValue> {
    c.range(pb::RangeRequest {
        key: k.into(),
        ..Default::default()
    })
    .await
    .expect("range")
    .into_inner()
    .kvs
    .into_iter()
    .next()
}

async fn next_event(s: &mut tonic::Streaming<pb::WatchResponse>) -> pb::WatchResponse {
    match tokio::time::timeout(WAIT, s.message()).await {
        Ok(Ok(Some(r))) => r,
        other => panic!("expected a watch response, got {other:?}"),
    }
}

/// (revision, type, key) of a one-event response.
fn one(r: &pb::WatchResponse) -> (i64, EventType, String) {
    assert_eq!(r.events.len(), 1, "{r:?}");
    let e = &r.events[0];
    let kv = e.kv.as_ref().expect("kv");
    (
        kv.mod_revision,
        e.r#type(),
        String::from_utf8_lossy(&kv.key).into_owned(),
    )
}

#[tokio::test]
async fn put_get_cas_and_txn() {
    let s = Server::start().await;
    let mut kv = KvClient::new(channel(s.xds).await);
    assert_eq!(put(&mut kv, "cfg/a", "1").await, 2);
    let a = get(&mut kv, "cfg/a").await.expect("a");
    assert_eq!(
        (a.value.as_slice(), a.version, a.mod_revision),
        (&b"1"[..], 1, 2)
    );

    // CAS: a stale expected mod_revision is FAILED_PRECONDITION and writes nothing.
    let err = kv
        .put(pb::PutRequest {
            expected_mod_revision: Some(1),
            ..put_req("cfg/a", "2")
        })
        .await
        .expect_err("stale");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert_eq!(get(&mut kv, "cfg/a").await.expect("a").value, b"1");
    let ok = kv
        .put(pb::PutRequest {
            expected_mod_revision: Some(2),
            prev_kv: true,
            ..put_req("cfg/a", "2")
        })
        .await
        .expect("cas")
        .into_inner();
    assert_eq!(rev(&ok.header), 3);
    assert_eq!(ok.prev_kv.expect("prev").value, b"1");

    // Concurrent CAS writers on one revision: exactly one wins.
    let mut tasks = Vec::new();
    for i in 0..6 {
        let mut c = kv.clone();
        tasks.push(tokio::spawn(async move {
            c.put(pb::PutRequest {
                expected_mod_revision: Some(3),
                ..put_req("cfg/a", &format!("w{i}"))
            })
            .await
            .map(|_| ())
            .map_err(|e| e.code())
        }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(()) => wins += 1,
            Err(tonic::Code::FailedPrecondition) => {}
            Err(c) => panic!("unexpected {c:?}"),
        }
    }
    assert_eq!(wins, 1);

    // Txn: compare on version, failure branch runs atomically in one revision.
    let t = kv
        .txn(pb::TxnRequest {
            compare: vec![pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Version as i32,
                key: "cfg/a".into(),
                target_union: Some(TargetUnion::Version(1)),
            }],
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(put_req("cfg/x", "s"))),
            }],
            failure: vec![
                pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(put_req("cfg/b", "f"))),
                },
                pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestDeleteRange(
                        pb::DeleteRangeRequest {
                            key: "cfg/a".into(),
                            ..Default::default()
                        },
                    )),
                },
            ],
        })
        .await
        .expect("txn")
        .into_inner();
    assert!(!t.succeeded);
    assert_eq!(rev(&t.header), 5);
    assert!(get(&mut kv, "cfg/x").await.is_none());
    assert!(get(&mut kv, "cfg/a").await.is_none());
    assert_eq!(get(&mut kv, "cfg/b").await.expect("b").mod_revision, 5);

    // Limits: INVALID_ARGUMENT, nothing written.
    let err = kv
        .put(pb::PutRequest {
            value: vec![0; weir_control_plane::kv::MAX_VALUE_BYTES + 1],
            ..put_req("big", "")
        })
        .await
        .expect_err("too big");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(get(&mut kv, "big").await.is_none());
    s.stop().await;
}

#[tokio::test]
async fn watch_history_live_and_resume() {
    let s = Server::start().await;
    let ch = channel(s.xds).await;
    let mut kv = KvClient::new(ch.clone());
    let mut watch = WatchClient::new(ch);
    for i in 0..3 {
        put(&mut kv, "svc/a", &format!("{i}")).await; // 2, 3, 4
    }
    put(&mut kv, "other", "x").await; // 5
    let mut w = watch
        .watch(pb::WatchRequest {
            key: "svc/".into(),
            prefix: true,
            start_revision: 3,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    // History from 3, then live events in order.
    assert_eq!(one(&next_event(&mut w).await).0, 3);
    assert_eq!(one(&next_event(&mut w).await).0, 4);
    put(&mut kv, "svc/b", "live").await; // 6
    assert_eq!(
        one(&next_event(&mut w).await),
        (6, EventType::Put, "svc/b".into())
    );
    kv.delete_range(pb::DeleteRangeRequest {
        key: "svc/a".into(),
        ..Default::default()
    })
    .await
    .expect("delete"); // 7
    assert_eq!(
        one(&next_event(&mut w).await),
        (7, EventType::Delete, "svc/a".into())
    );
    // Disconnect, miss some writes, resume from the last seen revision + 1.
    drop(w);
    for i in 0..3 {
        put(&mut kv, "svc/c", &format!("{i}")).await; // 8, 9, 10
    }
    let mut w = watch
        .watch(pb::WatchRequest {
            key: "svc/".into(),
            prefix: true,
            start_revision: 8,
            ..Default::default()
        })
        .await
        .expect("resume")
        .into_inner();
    for r in 8..=10 {
        assert_eq!(one(&next_event(&mut w).await).0, r);
    }
    put(&mut kv, "svc/c", "after").await; // 11
    assert_eq!(one(&next_event(&mut w).await).0, 11);

    // The server notices the first (dropped) stream asynchronously: poll, bounded.
    let api = weir_control_plane::api::Client::new(s.api.to_string());
    let deadline = tokio::time::Instant::now() + WAIT;
    let metrics = loop {
        let m = api.metrics().await.expect("metrics");
        if m.lines().any(|l| l == "weir_cp_kv_watchers 1") {
            break m;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "watchers gauge never 1:\n{m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(
        metrics.lines().any(|l| l == "weir_cp_kv_revision 11"),
        "{metrics}"
    );

    // Compact; a watch below the compact revision is OUT_OF_RANGE naming it.
    KvClient::new(channel(s.xds).await)
        .compact(pb::CompactionRequest { revision: 9 })
        .await
        .expect("compact");
    let err = watch
        .watch(pb::WatchRequest {
            key: "svc/".into(),
            prefix: true,
            start_revision: 8,
            ..Default::default()
        })
        .await
        .expect_err("compacted");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    assert!(err.message().contains("compact revision is 9"), "{err}");
    assert_eq!(
        err.metadata()
            .get("weir-kv-compact-revision")
            .and_then(|v| v.to_str().ok()),
        Some("9")
    );
    let err = kv
        .range(pb::RangeRequest {
            key: "svc/c".into(),
            revision: 8,
            ..Default::default()
        })
        .await
        .expect_err("compacted read");
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    drop(w);
    s.stop().await;
}

#[tokio::test]
async fn lease_expiry_deletes_keys_and_emits_deletes() {
    let s = Server::start().await;
    let ch = channel(s.xds).await;
    let mut kv = KvClient::new(ch.clone());
    let mut lease = LeaseClient::new(ch.clone());
    let short = lease
        .lease_grant(pb::LeaseGrantRequest { ttl: 1, id: 0 })
        .await
        .expect("grant")
        .into_inner();
    let long = lease
        .lease_grant(pb::LeaseGrantRequest { ttl: 60, id: 0 })
        .await
        .expect("grant")
        .into_inner();
    let mut last = 0;
    for (k, id) in [("eph/a", short.id), ("eph/b", short.id), ("eph/c", long.id)] {
        let r = kv
            .put(pb::PutRequest {
                lease: id,
                ..put_req(k, "v")
            })
            .await
            .expect("put")
            .into_inner();
        last = rev(&r.header);
    }
    // From the revision after the puts, so an expiry before the watch starts is replayed.
    let mut w = WatchClient::new(ch.clone())
        .watch(pb::WatchRequest {
            key: "eph/".into(),
            prefix: true,
            start_revision: last + 1,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    // Keep the long lease alive over a bidi stream while the short one expires.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::LeaseKeepAliveRequest { id: long.id })
        .await
        .expect("send");
    let mut ka = lease
        .lease_keep_alive(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
            rx,
        ))
        .await
        .expect("keepalive")
        .into_inner();
    let r = tokio::time::timeout(WAIT, ka.message())
        .await
        .expect("keepalive answer")
        .expect("ok")
        .expect("message");
    assert_eq!((r.id, r.ttl), (long.id, 60));

    let r = next_event(&mut w).await;
    let deleted: Vec<(EventType, Vec<u8>)> = r
        .events
        .iter()
        .map(|e| (e.r#type(), e.kv.as_ref().expect("kv").key.clone()))
        .collect();
    assert_eq!(
        deleted,
        vec![
            (EventType::Delete, b"eph/a".to_vec()),
            (EventType::Delete, b"eph/b".to_vec())
        ]
    );
    assert!(get(&mut kv, "eph/a").await.is_none());
    assert!(get(&mut kv, "eph/c").await.is_some());
    let err = lease
        .lease_time_to_live(pb::LeaseTimeToLiveRequest {
            id: short.id,
            keys: false,
        })
        .await
        .expect_err("gone");
    assert_eq!(err.code(), tonic::Code::NotFound);
    // A keep-alive for the expired lease answers TTL 0.
    tx.send(pb::LeaseKeepAliveRequest { id: short.id })
        .await
        .expect("send");
    let r = tokio::time::timeout(WAIT, ka.message())
        .await
        .expect("keepalive answer")
        .expect("ok")
        .expect("message");
    assert_eq!(r.ttl, 0);
    let ttl = lease
        .lease_time_to_live(pb::LeaseTimeToLiveRequest {
            id: long.id,
            keys: true,
        })
        .await
        .expect("ttl")
        .into_inner();
    assert_eq!(ttl.keys, vec![b"eph/c".to_vec()]);
    let metrics = weir_control_plane::api::Client::new(s.api.to_string())
        .metrics()
        .await
        .expect("metrics");
    for line in [
        "weir_cp_kv_leases_expired_total 1",
        "weir_cp_kv_leases 1",
        "weir_cp_kv_keys 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
    }
    drop((w, ka, tx));
    s.stop().await;
}

#[tokio::test]
async fn restart_keeps_revisions_keys_and_leases() {
    let dir = temp_dir("kv-restart");
    {
        let s = Server::start_with(ControlPlane::open(Some(&dir)).expect("open")).await;
        let ch = channel(s.xds).await;
        let mut kv = KvClient::new(ch.clone());
        put(&mut kv, "d/a", "1").await;
        put(&mut kv, "d/a", "2").await;
        let l = LeaseClient::new(ch)
            .lease_grant(pb::LeaseGrantRequest { ttl: 300, id: 7 })
            .await
            .expect("grant")
            .into_inner();
        kv.put(pb::PutRequest {
            lease: l.id,
            ..put_req("d/l", "x")
        })
        .await
        .expect("put"); // 4
        drop(kv);
        s.stop().await;
    }
    let cp = ControlPlane::open(Some(&dir)).expect("reopen");
    let s = Server::start_with(cp).await;
    let ch = channel(s.xds).await;
    let mut kv = KvClient::new(ch.clone());
    let a = get(&mut kv, "d/a").await.expect("a");
    assert_eq!(
        (
            a.value.as_slice(),
            a.create_revision,
            a.mod_revision,
            a.version
        ),
        (&b"2"[..], 2, 3, 2)
    );
    assert_eq!(put(&mut kv, "d/b", "new").await, 5, "revisions continue");
    let ttl = LeaseClient::new(ch.clone())
        .lease_time_to_live(pb::LeaseTimeToLiveRequest { id: 7, keys: true })
        .await
        .expect("lease survives")
        .into_inner();
    assert_eq!((ttl.granted_ttl, ttl.keys), (300, vec![b"d/l".to_vec()]));
    // History survives too: a watch from revision 2 replays it.
    let mut w = WatchClient::new(ch)
        .watch(pb::WatchRequest {
            key: "d/a".into(),
            start_revision: 2,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(one(&next_event(&mut w).await).0, 2);
    assert_eq!(one(&next_event(&mut w).await).0, 3);
    drop(w);
    s.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn cli_put_get_watch_lease() {
    let dir = temp_dir("kv-cli");
    let data = dir.join("data");
    let b = spawn_binary(&["--data-dir", data.to_str().expect("utf8")]).await;
    let server = b.xds.to_string();
    let kv = |args: &[&str]| {
        let mut all = vec!["kv"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--server", &server]);
        cli(&all)
    };
    let (ok, out, err) = kv(&["put", "app/color", "blue"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "OK revision 2");
    let (ok, out, err) = kv(&["get", "app/color"]);
    assert!(ok, "{err}");
    assert_eq!(out, "app/color\tblue\n");
    let (ok, _, err) = kv(&["put", "app/color", "red", "--expect-mod-rev", "1"]);
    assert!(!ok);
    assert!(err.contains("FailedPrecondition"), "{err}");
    let (ok, out, err) = kv(&["put", "app/color", "red", "--expect-mod-rev", "2"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "OK revision 3");
    let (ok, out, err) = kv(&["get", "app/color", "--rev", "2", "--output", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["kvs"][0]["value"], "blue");
    assert_eq!(v["revision"], 3);
    let (ok, _, err) = kv(&["get", "app/missing"]);
    assert!(!ok);
    assert!(err.contains("not found"), "{err}");

    // `kv watch` from revision 2 prints history, then a live change made by another CLI call.
    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_weir-cp"))
            .args([
                "kv", "watch", "app/", "--prefix", "--rev", "2", "--server", &server,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn watch"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let recv = |rx: &std::sync::mpsc::Receiver<String>| {
        rx.recv_timeout(WAIT).expect("a watch line within WAIT")
    };
    assert_eq!(recv(&rx), "PUT app/color blue (revision 2)");
    assert_eq!(recv(&rx), "PUT app/color red (revision 3)");
    let (ok, _, err) = kv(&["del", "app/color"]);
    assert!(ok, "{err}");
    assert_eq!(recv(&rx), "DELETE app/color (revision 4)");

    // Leases through the CLI.
    let (ok, out, err) = kv(&["lease", "grant", "60", "--output", "json"]);
    assert!(ok, "{err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).expect("json")["id"]
        .as_i64()
        .expect("id")
        .to_string();
    let (ok, _, err) = kv(&["put", "app/owner", "me", "--lease", &id]);
    assert!(ok, "{err}");
    assert_eq!(recv(&rx), "PUT app/owner me (revision 5)");
    let (ok, out, err) = kv(&["lease", "keepalive", &id, "--once"]);
    assert!(ok, "{err}");
    assert!(out.contains("TTL 60s"), "{out}");
    let (ok, out, err) = kv(&["lease", "ttl", &id]);
    assert!(ok, "{err}");
    assert!(out.contains("keys: app/owner"), "{out}");
    let (ok, _, err) = kv(&["lease", "revoke", &id]);
    assert!(ok, "{err}");
    assert_eq!(recv(&rx), "DELETE app/owner (revision 6)");
    let (ok, out, err) = kv(&["list", "app/"]);
    assert!(ok, "{err}");
    assert!(out.is_empty(), "{out}");
    drop(child);

    // List with a limit pages and says when more remain.
    for i in 0..5 {
        let (ok, _, err) = kv(&["put", &format!("n/{i}"), "v"]);
        assert!(ok, "{err}");
    }
    let (ok, out, err) = kv(&["list", "n/", "--limit", "3"]);
    assert!(ok, "{err}");
    assert_eq!(out, "n/0\tv\nn/1\tv\nn/2\tv\n");
    assert!(err.contains("more keys"), "{err}");
    let (ok, out, err) = kv(&["compact", "4"]);
    assert!(ok, "{err}");
    assert!(out.contains("compacted to revision 4"), "{out}");
    let (ok, _, err) = kv(&["get", "n/0", "--rev", "3"]);
    assert!(!ok);
    assert!(err.contains("compacted"), "{err}");
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn kill_9_mid_write_loses_no_acknowledged_put() {
    let dir = temp_dir("kv-kill9");
    let data = dir.join("data");
    let data_s = data.to_str().expect("utf8").to_string();
    let mut b = spawn_binary(&["--data-dir", &data_s]).await;
    let mut kv = KvClient::new(channel(b.xds).await);
    // A writer that records every acknowledged put, killed while it runs.
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<(u32, i64)>();
    let writer = tokio::spawn(async move {
        for i in 0u32..100_000 {
            match kv
                .put(put_req(&format!("crash/{i:06}"), &format!("{i}")))
                .await
            {
                Ok(r) => {
                    if acked_tx.send((i, rev(&r.into_inner().header))).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    // Wait (bounded) for some acknowledged writes, then kill -9 mid-loop.
    let mut acked = Vec::new();
    while acked.len() < 20 {
        match tokio::time::timeout(WAIT, acked_rx.recv()).await {
            Ok(Some(a)) => acked.push(a),
            other => panic!("writer stalled: {other:?}"),
        }
    }
    let pid = b.child.0.id().to_string();
    let st = Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("kill");
    assert!(st.success());
    let _ = b.child.0.wait();
    let _ = tokio::time::timeout(WAIT, writer)
        .await
        .expect("writer ends");
    while let Ok(a) = acked_rx.try_recv() {
        acked.push(a);
    }

    let b = spawn_binary(&["--data-dir", &data_s]).await;
    let mut kv = KvClient::new(channel(b.xds).await);
    for (i, r) in &acked {
        let got = get(&mut kv, &format!("crash/{i:06}"))
            .await
            .unwrap_or_else(|| panic!("acknowledged put {i} lost"));
        assert_eq!(got.mod_revision, *r);
        assert_eq!(got.value, format!("{i}").into_bytes());
    }
    let (last_i, last_rev) = *acked.last().expect("some");
    let all = kv
        .range(pb::RangeRequest {
            key: "crash/".into(),
            prefix: true,
            count_only: true,
            ..Default::default()
        })
        .await
        .expect("count")
        .into_inner();
    // At most the one put in flight at the kill may have landed unacknowledged.
    assert!(all.count as u32 > last_i && all.count as u32 <= last_i + 2);
    assert!(rev(&all.header) >= last_rev);
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}
