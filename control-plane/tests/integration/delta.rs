//! Incremental (delta) ADS against an in-process weir-cp.

use std::collections::HashMap;
use std::time::Duration;

use weir_xds_api::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;

use crate::harness::*;

fn versions(
    r: &weir_xds_api::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse,
) -> HashMap<String, String> {
    r.resources
        .iter()
        .map(|x| (x.name.clone(), x.version.clone()))
        .collect()
}

#[tokio::test]
async fn delta_add_update_remove_unsubscribe_nack() {
    let s = Server::start().await;
    s.apply(&doc(&[
        static_cluster("a", 9001),
        static_cluster("b", 9002),
        eds_cluster("x", 1),
        cla("x", &[9010]),
    ]));
    let mut c = Delta::connect(s.xds).await;
    // Legacy wildcard: an empty first subscription.
    let mut first = dreq(CDS, &[], &[], "");
    first.node = Some(node("d1", "mesh"));
    c.send(first).await;
    let r = c.recv().await;
    assert_eq!(dnames(&r), ["a", "b", "x"]);
    assert!(r.removed_resources.is_empty());
    assert!(!r.system_version_info.is_empty());
    let v1 = versions(&r);
    assert!(v1.values().all(|v| v.len() == 16), "{v1:?}");
    c.send(dreq(CDS, &[], &[], &r.nonce)).await; // ACK

    // Update a, remove b, add c: only the differences travel.
    s.apply(&doc(&[
        static_cluster("a", 9003),
        static_cluster("c", 9004),
        eds_cluster("x", 1),
        cla("x", &[9010]),
    ]));
    let r2 = c.recv().await;
    assert_eq!(dnames(&r2), ["a", "c"]);
    assert_eq!(r2.removed_resources, ["b"]);
    assert_ne!(versions(&r2)["a"], v1["a"]);
    assert_ne!(r2.system_version_info, r.system_version_info);
    c.send(dreq(CDS, &[], &[], &r2.nonce)).await;

    // Named EDS subscription, then unsubscribe: the held resource is confirmed removed.
    c.send(dreq(EDS, &["x"], &[], "")).await;
    let e = c.recv().await;
    assert_eq!(dnames(&e), ["x"]);
    c.send(dreq(EDS, &[], &[], &e.nonce)).await;
    c.send(dreq(EDS, &[], &["x"], "")).await;
    let e2 = c.recv().await;
    assert!(e2.resources.is_empty());
    assert_eq!(e2.removed_resources, ["x"]);
    c.send(dreq(EDS, &[], &[], &e2.nonce)).await;
    // Unsubscribed: a change to x pushes nothing; the CDS change after it arrives first.
    s.apply(&doc(&[
        static_cluster("a", 9003),
        static_cluster("c", 9004),
        eds_cluster("x", 1),
        cla("x", &[9011]),
    ]));
    s.apply(&doc(&[
        static_cluster("a", 9005),
        static_cluster("c", 9004),
        eds_cluster("x", 1),
        cla("x", &[9011]),
    ]));
    let r3 = c.recv().await;
    assert_eq!(r3.type_url, CDS);
    assert_eq!(dnames(&r3), ["a"]);

    // NACK: recorded with the rejected system version; nothing is resent.
    c.send(DeltaDiscoveryRequest {
        error_detail: Some(weir_xds_api::pb::google::rpc::Status {
            code: 3,
            message: "cluster a: bad".into(),
            details: vec![],
        }),
        ..dreq(CDS, &[], &[], &r3.nonce)
    })
    .await;
    c.assert_quiet(Duration::from_millis(200)).await;
    let report = s.cp.status.report();
    assert_eq!(report.nacks["d1"]["cds"].message, "cluster a: bad");
    assert_eq!(report.nacks["d1"]["cds"].version, r3.system_version_info);
    assert_eq!(report.proxies[0].protocol, "delta");

    // Leaving the wildcard for explicit names: resources not named are removed.
    c.send(dreq(CDS, &["a"], &["*"], "")).await;
    let r4 = c.recv().await;
    assert!(r4.resources.is_empty());
    let mut removed = r4.removed_resources.clone();
    removed.sort();
    assert_eq!(removed, ["c", "x"]);
    s.stop().await;
}

#[tokio::test]
async fn delta_reconnect_with_initial_resource_versions() {
    let s = Server::start().await;
    s.apply(&doc(&[
        static_cluster("a", 9001),
        static_cluster("b", 9002),
    ]));
    let mut c = Delta::connect(s.xds).await;
    let mut first = dreq(CDS, &["*"], &[], "");
    first.node = Some(node("d2", "mesh"));
    c.send(first).await;
    let r = c.recv().await;
    let held = versions(&r);
    assert_eq!(held.len(), 2);
    drop(c);

    // While disconnected: b changes, c appears.
    s.apply(&doc(&[
        static_cluster("a", 9001),
        static_cluster("b", 9003),
        static_cluster("c", 9004),
    ]));
    let mut c = Delta::connect(s.xds).await;
    let mut again = dreq(CDS, &["*"], &[], "");
    again.node = Some(node("d2", "mesh"));
    again.initial_resource_versions = held.clone();
    again
        .initial_resource_versions
        .insert("gone".into(), "0123456789abcdef".into());
    c.send(again).await;
    let r2 = c.recv().await;
    assert_eq!(dnames(&r2), ["b", "c"], "a is up to date and not resent");
    assert_eq!(r2.removed_resources, ["gone"]);

    // Fully up to date on reconnect, named subscription: nothing to send.
    let mut c2 = Delta::connect(s.xds).await;
    let mut named = dreq(CDS, &["a"], &[], "");
    named.node = Some(node("d3", "mesh"));
    named.initial_resource_versions = [("a".to_string(), held["a"].clone())].into();
    c2.send(named).await;
    c2.assert_quiet(Duration::from_millis(200)).await;
    // ... until a changes.
    s.apply(&doc(&[
        static_cluster("a", 9009),
        static_cluster("b", 9003),
        static_cluster("c", 9004),
    ]));
    let r3 = c2.recv().await;
    assert_eq!(dnames(&r3), ["a"]);
    s.stop().await;
}

#[tokio::test]
async fn delta_stale_nonce_still_applies_subscriptions() {
    let s = Server::start().await;
    s.apply(&doc(&[
        eds_cluster("x", 1),
        eds_cluster("y", 1),
        cla("x", &[9001]),
        cla("y", &[9002]),
    ]));
    let mut c = Delta::connect(s.xds).await;
    let mut first = dreq(EDS, &["x"], &[], "");
    first.node = Some(node("d4", "mesh"));
    c.send(first).await;
    let r = c.recv().await;
    assert_eq!(dnames(&r), ["x"]);
    // A request carrying a nonce the server never sent: not an ACK, but the subscription to y
    // is honoured.
    c.send(dreq(EDS, &["y"], &[], "not-a-nonce")).await;
    let r2 = c.recv().await;
    assert_eq!(dnames(&r2), ["y"]);
    let deadline = std::time::Instant::now() + WAIT;
    while s
        .cp
        .metrics
        .render()
        .lines()
        .all(|l| l != "weir_cp_xds_stale_requests_total{type=\"eds\"} 1")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "stale request not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.cp.metrics.type_counts(EDS).1, 0, "no ACK counted");
    s.stop().await;
}

#[tokio::test]
async fn delta_pushes_types_in_make_before_break_order() {
    let s = Server::start().await;
    let cfg = |port: u16, prefix: &str, stat: &str, timeout: u32| {
        doc(&[
            eds_cluster("api", timeout),
            cla("api", &[port]),
            routes("main", "api", prefix),
            listener("http", 10000, "main", stat),
        ])
    };
    s.apply(&cfg(9001, "/", "a", 1));
    let mut c = Delta::connect(s.xds).await;
    // Subscribe in the "wrong" order: RDS, LDS, EDS, CDS.
    let mut first = dreq(RDS, &["main"], &[], "");
    first.node = Some(node("mbb", "mesh"));
    c.send(first).await;
    assert_eq!(c.recv().await.type_url, RDS);
    c.send(dreq(LDS, &[], &[], "")).await;
    assert_eq!(c.recv().await.type_url, LDS);
    c.send(dreq(EDS, &["api"], &[], "")).await;
    assert_eq!(c.recv().await.type_url, EDS);
    c.send(dreq(CDS, &[], &[], "")).await;
    assert_eq!(c.recv().await.type_url, CDS);
    // Everything changes at once: pushed CDS, EDS, LDS, RDS regardless.
    s.apply(&cfg(9002, "/x", "b", 2));
    let mut order = Vec::new();
    for _ in 0..4 {
        let r = c.recv().await;
        assert_eq!(r.resources.len(), 1);
        order.push(weir_control_plane::resource::short_name(&r.type_url));
    }
    assert_eq!(order, ["cds", "eds", "lds", "rds"]);
    s.stop().await;
}
