//! State-of-the-world ADS against an in-process weir-cp, driven by a tonic client.

use std::time::Duration;

use weir_control_plane::operator::Target;
use weir_control_plane::resource::short_name;

use crate::harness::*;

fn base(endpoints: &[u16], route_prefix: &str, stat_prefix: &str, timeout_s: u32) -> String {
    doc(&[
        eds_cluster("api", timeout_s),
        cla("api", endpoints),
        routes("main", "api", route_prefix),
        listener("http", 10000, "main", stat_prefix),
    ])
}

/// Subscribe to all four types, ACKing each, and return the last response per type.
async fn sync_all(
    c: &mut Sotw,
    node_id: &str,
) -> Vec<weir_xds_api::pb::envoy::service::discovery::v3::DiscoveryResponse> {
    let mut out = Vec::new();
    c.send_first(node(node_id, "default"), req(CDS, &[], "", ""))
        .await;
    let cds = c.recv().await;
    assert_eq!(cds.type_url, CDS);
    c.send(ack(&cds, &[])).await;
    c.send(req(EDS, &["api"], "", "")).await;
    let eds = c.recv().await;
    assert_eq!(eds.type_url, EDS);
    c.send(ack(&eds, &["api"])).await;
    c.send(req(LDS, &[], "", "")).await;
    let lds = c.recv().await;
    assert_eq!(lds.type_url, LDS);
    c.send(ack(&lds, &[])).await;
    c.send(req(RDS, &["main"], "", "")).await;
    let rds = c.recv().await;
    assert_eq!(rds.type_url, RDS);
    c.send(ack(&rds, &["main"])).await;
    out.extend([cds, eds, lds, rds]);
    out
}

#[tokio::test]
async fn sotw_sync_ack_push_nack_stale_removal() {
    let s = Server::start().await;
    s.apply(&base(&[9001], "/", "ingress", 1));
    let mut c = Sotw::connect(s.xds).await;
    let first = sync_all(&mut c, "n1").await;
    for r in &first {
        assert_eq!(names(r).len(), 1, "{}", r.type_url);
        assert!(!r.version_info.is_empty());
        assert_eq!(
            r.control_plane.as_ref().map(|c| c.identifier.as_str()),
            Some("weir-cp")
        );
    }
    assert_eq!(names(&first[0]), ["api"]);
    assert_eq!(names(&first[3]), ["main"]);
    // Nonces are distinct per response.
    let mut nonces: Vec<&str> = first.iter().map(|r| r.nonce.as_str()).collect();
    nonces.dedup();
    assert_eq!(nonces.len(), 4);

    // The ACKs are recorded (poll: they travel asynchronously).
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let report = s.cp.status.report();
        let acked = report
            .proxies
            .first()
            .map(|p| {
                first.iter().all(|r| {
                    p.types
                        .get(short_name(&r.type_url))
                        .and_then(|t| t.acked_version.as_deref())
                        == Some(r.version_info.as_str())
                })
            })
            .unwrap_or(false);
        if acked {
            assert_eq!(report.proxies.len(), 1);
            assert_eq!(report.proxies[0].node_id, "n1");
            assert_eq!(report.proxies[0].protocol, "sotw");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ACKs not recorded: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.cp.metrics.type_counts(CDS), (1, 1, 0));

    // Only the endpoints change: exactly one EDS push. The following route-only change
    // arriving next proves nothing else was pushed in between.
    s.apply(&base(&[9001, 9002], "/", "ingress", 1));
    let eds = c.recv().await;
    assert_eq!(eds.type_url, EDS);
    assert_ne!(eds.version_info, first[1].version_info);
    c.send(ack(&eds, &["api"])).await;
    s.apply(&base(&[9001, 9002], "/v2", "ingress", 1));
    let rds = c.recv().await;
    assert_eq!(rds.type_url, RDS);
    c.send(ack(&rds, &["main"])).await;

    // Everything changes at once: make-before-break order CDS, EDS, LDS, RDS.
    s.apply(&base(&[9003], "/v3", "ingress2", 2));
    let mut order = Vec::new();
    let mut last = Vec::new();
    for _ in 0..4 {
        let r = c.recv().await;
        order.push(short_name(&r.type_url));
        last.push(r);
    }
    assert_eq!(order, ["cds", "eds", "lds", "rds"]);
    // The push latency histogram saw the change-driven pushes.
    assert!(s.cp.metrics.push_latency.count() >= 6);

    // ACK CDS, EDS and RDS; NACK LDS.
    c.send(ack(&last[0], &[])).await;
    c.send(ack(&last[1], &["api"])).await;
    c.send(nack(
        &last[2],
        &[],
        &first[2].version_info,
        "listener http: bad filter chain",
    ))
    .await;
    c.send(ack(&last[3], &["main"])).await;
    // The NACK is recorded with the rejected version and message, and the old config is not
    // resent: the next push is the RDS change below, not LDS.
    s.apply(&base(&[9003], "/v4", "ingress2", 2));
    let r = c.recv().await;
    assert_eq!(r.type_url, RDS, "no LDS resend after a NACK");
    let report = s.cp.status.report();
    let nack_rec = &report.nacks["n1"]["lds"];
    assert_eq!(nack_rec.version, last[2].version_info);
    assert_eq!(nack_rec.message, "listener http: bad filter chain");
    assert_eq!(nack_rec.nonce, last[2].nonce);
    let p = &report.proxies[0];
    assert_eq!(
        p.types["lds"].acked_version.as_deref(),
        Some(first[2].version_info.as_str()),
        "LDS stays at the last ACKed version"
    );
    assert_eq!(s.cp.metrics.type_counts(LDS).2, 1);

    // A stale nonce is ignored: this request (old nonce, new names) must not change the RDS
    // subscription. If it did, the server would answer with an empty RDS response.
    c.send(req(RDS, &["other"], &last[3].version_info, &last[3].nonce))
        .await;
    c.send(ack(&r, &["main"])).await;
    s.apply(&base(&[9003], "/v5", "ingress2", 2));
    let r2 = c.recv().await;
    assert_eq!(r2.type_url, RDS);
    assert_eq!(
        names(&r2),
        ["main"],
        "subscription unchanged by the stale request"
    );
    c.send(ack(&r2, &["main"])).await;

    // Removal: the new config has no listener, routes or endpoints, and a different cluster.
    s.apply(&doc(&[static_cluster("web", 9100)]));
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(c.recv().await);
    }
    let kinds: Vec<_> = got.iter().map(|r| short_name(&r.type_url)).collect();
    assert_eq!(kinds, ["cds", "eds", "lds", "rds"]);
    assert_eq!(names(&got[0]), ["web"], "api removed from CDS");
    assert!(got[1].resources.is_empty(), "EDS api gone");
    assert!(got[2].resources.is_empty(), "LDS empty");
    assert!(got[3].resources.is_empty(), "RDS main gone");
    drop(c);
    s.stop().await;
}

#[tokio::test]
async fn sotw_named_subscriptions_and_unchanged_resources() {
    let s = Server::start().await;
    s.apply(&doc(&[
        eds_cluster("a", 1),
        eds_cluster("b", 1),
        cla("a", &[9001]),
        cla("b", &[9002]),
    ]));
    let mut c = Sotw::connect(s.xds).await;
    c.send_first(node("n", "c"), req(EDS, &["a"], "", "")).await;
    let r = c.recv().await;
    assert_eq!(names(&r), ["a"]);
    c.send(ack(&r, &["a"])).await;
    // Adding a name re-answers with both.
    c.send(req(EDS, &["a", "b"], &r.version_info, &r.nonce))
        .await;
    let r = c.recv().await;
    assert_eq!(names(&r), ["a", "b"]);
    c.send(ack(&r, &["a", "b"])).await;
    // Unsubscribing b: answered with a alone.
    c.send(req(EDS, &["a"], &r.version_info, &r.nonce)).await;
    let r = c.recv().await;
    assert_eq!(names(&r), ["a"]);
    c.send(ack(&r, &["a"])).await;
    // A change to b (not subscribed) pushes nothing; a change to a does. The a push arriving
    // next (and carrying only a) proves no push happened for the b change.
    s.apply(&doc(&[
        eds_cluster("a", 1),
        eds_cluster("b", 1),
        cla("a", &[9001]),
        cla("b", &[9003]),
    ]));
    s.apply(&doc(&[
        eds_cluster("a", 1),
        eds_cluster("b", 1),
        cla("a", &[9004]),
        cla("b", &[9003]),
    ]));
    let r2 = c.recv().await;
    assert_eq!(names(&r2), ["a"]);
    assert_ne!(r2.version_info, r.version_info);
    // A name that does not exist is simply absent.
    c.send(req(EDS, &["a", "zzz"], &r2.version_info, &r2.nonce))
        .await;
    // Nothing new to say: no response. Then a change proves the stream is alive.
    s.apply(&doc(&[eds_cluster("a", 1), cla("a", &[9005])]));
    let r3 = c.recv().await;
    assert_eq!(names(&r3), ["a"]);
    s.stop().await;
}

#[tokio::test]
async fn sotw_node_required_and_reconnect_up_to_date() {
    let s = Server::start().await;
    s.apply(&doc(&[static_cluster("a", 9001)]));
    // No node on the first request: the stream is refused.
    let mut c = Sotw::connect(s.xds).await;
    c.send(req(CDS, &[], "", "")).await;
    let st = c.recv_error().await;
    assert_eq!(st.code(), tonic::Code::InvalidArgument);

    let mut c = Sotw::connect(s.xds).await;
    c.send_first(node("n", "c"), req(CDS, &[], "", "")).await;
    let r = c.recv().await;
    c.send(ack(&r, &[])).await;
    drop(c);

    // Reconnecting with the version it already has: no response until something changes.
    let mut c = Sotw::connect(s.xds).await;
    c.send_first(node("n", "c"), req(CDS, &[], &r.version_info, ""))
        .await;
    s.apply(&doc(&[
        static_cluster("a", 9001),
        static_cluster("b", 9002),
    ]));
    let r2 = c.recv().await;
    assert_ne!(
        r2.version_info, r.version_info,
        "first answer is the change"
    );
    assert_eq!(names(&r2), ["a", "b"]);

    // Reconnecting with an old version gets the current one at once.
    let mut c2 = Sotw::connect(s.xds).await;
    c2.send_first(node("n2", "c"), req(CDS, &[], &r.version_info, ""))
        .await;
    let r3 = c2.recv().await;
    assert_eq!(r3.version_info, r2.version_info);

    // An unserved type is ignored; the stream keeps working.
    c2.send(req(
        "type.googleapis.com/envoy.service.runtime.v3.Runtime",
        &[],
        "",
        "",
    ))
    .await;
    c2.assert_quiet(Duration::from_millis(200)).await;
    s.stop().await;
}

#[tokio::test]
async fn sotw_node_cluster_groups() {
    let s = Server::start().await;
    s.apply(&doc(&[static_cluster("shared", 9001)]));
    s.apply_to(
        Target::NodeCluster("edge".into()),
        &doc(&[static_cluster("edge-only", 9002)]),
    );
    let mut edge = Sotw::connect(s.xds).await;
    edge.send_first(node("e1", "edge"), req(CDS, &[], "", ""))
        .await;
    assert_eq!(names(&edge.recv().await), ["edge-only", "shared"]);
    let mut other = Sotw::connect(s.xds).await;
    other
        .send_first(node("o1", "core"), req(CDS, &[], "", ""))
        .await;
    let o = other.recv().await;
    assert_eq!(names(&o), ["shared"]);
    other.send(ack(&o, &[])).await;
    // A change to the edge layer reaches only edge nodes; the core node's next push is the
    // later global change.
    s.apply_to(
        Target::NodeCluster("edge".into()),
        &doc(&[static_cluster("edge-only", 9003)]),
    );
    let e = edge.recv().await;
    assert_eq!(names(&e), ["edge-only", "shared"]);
    s.apply(&doc(&[
        static_cluster("shared", 9001),
        static_cluster("new", 9004),
    ]));
    assert_eq!(names(&other.recv().await), ["new", "shared"]);
    assert_eq!(names(&edge.recv().await), ["edge-only", "new", "shared"]);
    s.stop().await;
}

#[tokio::test]
async fn sotw_oversized_request_is_refused_and_disconnect_is_seen() {
    let s = Server::start().await;
    s.apply(&doc(&[static_cluster("a", 9001)]));
    let mut c = Sotw::connect(s.xds).await;
    c.send_first(node("big", "c"), req(CDS, &[], "", "")).await;
    let r = c.recv().await;
    c.send(ack(&r, &[])).await;
    let deadline = std::time::Instant::now() + WAIT;
    while s.cp.status.report().proxies.len() != 1 {
        assert!(std::time::Instant::now() < deadline, "proxy not registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        s.cp.metrics
            .render()
            .contains("weir_cp_connected_proxies{protocol=\"sotw\"} 1")
    );
    // A request above the 4 MiB decode limit ends the stream (tonic reports OUT_OF_RANGE).
    let huge = "x".repeat(weir_control_plane::MAX_DECODING_MESSAGE_SIZE + 1);
    c.send(req(EDS, &[huge.as_str()], "", "")).await;
    let st = c.recv_error().await;
    assert_eq!(st.code(), tonic::Code::OutOfRange, "{st}");
    assert!(st.message().contains("too large"), "{st}");
    // The stream is gone from status and the gauge; the NACK-free node left no record.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let report = s.cp.status.report();
        let text = s.cp.metrics.render();
        if report.proxies.is_empty()
            && text.contains("weir_cp_connected_proxies{protocol=\"sotw\"} 0")
        {
            assert!(report.nacks.is_empty());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "disconnect not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.stop().await;
}
