//! The `weir-cp` binary: config apply/get/history/rollback and status through the CLI,
//! persistence across `kill -9`, /metrics, and `--config-dir`.

use std::time::{Duration, Instant};

use crate::harness::*;

fn api(b: &Binary) -> String {
    b.api.to_string()
}

fn kill9(b: &mut Binary) {
    let pid = b.child.0.id().to_string();
    let st = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("kill");
    assert!(st.success());
    let _ = b.child.0.wait();
}

#[tokio::test]
async fn cli_apply_history_rollback_and_persistence() {
    let dir = temp_dir("cli");
    let data = dir.join("data");
    let data_s = data.to_str().expect("utf8").to_string();
    let mut b = spawn_binary(&["--data-dir", &data_s]).await;
    let server = api(&b);

    let v1 = dir.join("v1.yaml");
    write(&v1, &doc(&[eds_cluster("api", 1), cla("api", &[9001])]));
    let (ok, out, err) = cli(&[
        "config",
        "apply",
        "-f",
        v1.to_str().expect("p"),
        "--server",
        &server,
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("applied version 1 to all (2 resources)"),
        "{out}"
    );

    // Refused: a route to an unknown cluster, reported with its field path; nothing stored.
    let bad = dir.join("bad.yaml");
    write(&bad, &doc(&[routes("main", "nope", "/")]));
    let (ok, _, err) = cli(&[
        "config",
        "apply",
        "-f",
        bad.to_str().expect("p"),
        "--server",
        &server,
    ]);
    assert!(!ok);
    assert!(
        err.contains("resources[0].virtual_hosts[0].routes[0]"),
        "{err}"
    );
    assert!(err.contains("nope"), "{err}");
    // Schema errors also carry the path.
    let bad2 = dir.join("bad2.yaml");
    write(
        &bad2,
        "resources:\n- \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: a\n  connect_timeout: forever\n",
    );
    let (ok, _, err) = cli(&[
        "config",
        "apply",
        "-f",
        bad2.to_str().expect("p"),
        "--server",
        &server,
    ]);
    assert!(!ok);
    assert!(err.contains("resources[0].connect_timeout"), "{err}");

    let v2 = dir.join("v2.yaml");
    write(
        &v2,
        &doc(&[eds_cluster("api", 1), cla("api", &[9001, 9002])]),
    );
    let (ok, out, err) = cli(&[
        "config",
        "apply",
        "-f",
        v2.to_str().expect("p"),
        "--server",
        &server,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("applied version 2"), "{out}");
    let edge = dir.join("edge.yaml");
    write(&edge, &doc(&[static_cluster("edge-local", 9050)]));
    let (ok, out, err) = cli(&[
        "config",
        "apply",
        "-f",
        edge.to_str().expect("p"),
        "--node-cluster",
        "edge",
        "--server",
        &server,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("applied version 3 to cluster:edge"), "{out}");

    // A proxy connected now sees v2's two endpoints; the rollback pushes v1's one.
    let mut c = Sotw::connect(b.xds).await;
    c.send_first(node("p1", "default"), req(EDS, &["api"], "", ""))
        .await;
    let e = c.recv().await;
    let count = |r: &weir_xds_api::pb::envoy::service::discovery::v3::DiscoveryResponse| {
        let cla: weir_xds_api::pb::envoy::config::endpoint::v3::ClusterLoadAssignment =
            weir_xds_api::unpack(&r.resources[0]).expect("cla");
        cla.endpoints[0].lb_endpoints.len()
    };
    assert_eq!(count(&e), 2);
    c.send(ack(&e, &["api"])).await;

    let (ok, out, err) = cli(&["config", "rollback", "1", "--server", &server]);
    assert!(ok, "{err}");
    assert!(out.contains("applied as version 4 to all"), "{out}");
    let e2 = c.recv().await;
    assert_eq!(count(&e2), 1, "rollback pushed");
    c.send(ack(&e2, &["api"])).await;
    let (ok, _, err) = cli(&["config", "rollback", "99", "--server", &server]);
    assert!(!ok);
    assert!(err.contains("version 99 does not exist"), "{err}");

    let (ok, out, _) = cli(&["config", "history", "--server", &server]);
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert!(
        lines[4].starts_with("4 ") && lines[4].contains("rollback:1"),
        "{out}"
    );
    assert!(lines[3].contains("cluster:edge"), "{out}");

    // status lists the proxy with its ACKed EDS version.
    let deadline = Instant::now() + WAIT;
    loop {
        let (ok, out, _) = cli(&["status", "--server", &server]);
        assert!(ok);
        if out.contains("node \"p1\"") && out.contains(&format!("eds: acked {}", e2.version_info)) {
            assert!(out.contains("config version: 4"), "{out}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the ACK:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // /metrics over the API address.
    let m = weir_control_plane::api::Client::new(server.clone())
        .metrics()
        .await
        .expect("metrics");
    assert!(
        m.contains("weir_cp_connected_proxies{protocol=\"sotw\"} 1"),
        "{m}"
    );
    assert!(m.contains("weir_cp_config_version 4"), "{m}");
    assert!(m.contains("weir_cp_config_rejected_total 2"), "{m}");

    // config get: the document in force, re-appliable.
    let (ok, all_targets, _) = cli(&["config", "get", "--server", &server]);
    assert!(ok);
    let (ok, edge_doc, _) = cli(&[
        "config",
        "get",
        "--node-cluster",
        "edge",
        "--server",
        &server,
    ]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&edge_doc).expect("json");
    assert_eq!(v["resources"][0]["name"], "edge-local");

    // kill -9, restart on the same data dir: config and history are intact and served.
    drop(c);
    kill9(&mut b);
    let b2 = spawn_binary(&["--data-dir", &data_s]).await;
    let server2 = api(&b2);
    let (ok, out, _) = cli(&["config", "history", "--server", &server2]);
    assert!(ok);
    assert_eq!(out.lines().count(), 5, "{out}");
    let (ok, all_again, _) = cli(&["config", "get", "--server", &server2]);
    assert!(ok);
    assert_eq!(all_again, all_targets);
    let mut c = Sotw::connect(b2.xds).await;
    c.send_first(node("p1", "default"), req(EDS, &["api"], "", ""))
        .await;
    let e3 = c.recv().await;
    assert_eq!(count(&e3), 1);
    assert_eq!(
        e3.version_info, e2.version_info,
        "content versions are stable across restarts"
    );
    // The next apply continues the numbering.
    let (ok, out, err) = cli(&[
        "config",
        "apply",
        "-f",
        v2.to_str().expect("p"),
        "--server",
        &server2,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("applied version 5"), "{out}");
    drop(b2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn config_dir_applies_changes_and_refuses_bad_files() {
    let dir = temp_dir("gitops");
    let cfg = dir.join("cfg");
    write(&cfg.join("clusters.yaml"), &doc(&[eds_cluster("api", 1)]));
    write(&cfg.join("endpoints.yaml"), &doc(&[cla("api", &[9001])]));
    write(&cfg.join("README.md"), "ignored");
    let cfg_s = cfg.to_str().expect("utf8").to_string();
    let b = spawn_binary(&["--config-dir", &cfg_s, "--config-dir-interval", "100ms"]).await;
    let client = weir_control_plane::api::Client::new(b.api.to_string());
    let wait_versions = |n: usize| {
        let client = client.clone();
        async move {
            let deadline = Instant::now() + WAIT;
            loop {
                let h = client.history().await.expect("history");
                if h.len() >= n {
                    return h;
                }
                assert!(
                    Instant::now() < deadline,
                    "expected {n} versions, have {h:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let h = wait_versions(1).await;
    assert_eq!(h[0].origin, "config-dir");
    assert_eq!(h[0].resources.len(), 2, "both files combined");

    // A node-cluster directory.
    write(
        &cfg.join("node-cluster/edge/extra.yaml"),
        &doc(&[static_cluster("edge-local", 9050)]),
    );
    let h = wait_versions(2).await;
    assert_eq!(h[1].target.to_string(), "cluster:edge");

    // A broken file is refused and logged with its file and path; the config stays.
    write(
        &cfg.join("endpoints.yaml"),
        &doc(&[cla("api", &[9001]).replace("127.0.0.1", "not-an-ip")]),
    );
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        if let Ok(line) = b.log.recv_timeout(Duration::from_millis(100)) {
            if line.contains("endpoints.yaml: resources[0].endpoints[0]") {
                break;
            }
            seen.push(line);
        }
        assert!(
            Instant::now() < deadline,
            "refusal not logged:\n{}",
            seen.join("\n")
        );
    }
    assert_eq!(client.history().await.expect("history").len(), 2);

    // Fixed: applied. Removing the node-cluster directory clears that target.
    write(&cfg.join("endpoints.yaml"), &doc(&[cla("api", &[9002])]));
    let h = wait_versions(3).await;
    assert_eq!(h[2].target.to_string(), "all");
    std::fs::remove_dir_all(cfg.join("node-cluster/edge")).expect("rm");
    let h = wait_versions(4).await;
    assert_eq!(h[3].target.to_string(), "cluster:edge");
    assert!(h[3].resources.is_empty());
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn api_refusals_are_structured() {
    use weir_control_plane::api::{Client, ClientError};
    use weir_control_plane::operator::Target;
    let s = Server::start().await;
    let client = Client::new(s.api.to_string());
    let err = client
        .apply(&Target::All, doc(&[routes("main", "nope", "/")]))
        .await
        .expect_err("refused");
    let ClientError::Refused(body) = err else {
        panic!("expected a refusal, got {err}");
    };
    assert_eq!(body.error, "invalid config");
    assert_eq!(body.errors.len(), 1);
    assert!(
        body.errors[0]
            .path
            .starts_with("resources[0].virtual_hosts[0].routes[0]")
    );
    // Target parsing and unknown versions.
    let err = client.rollback(7).await.expect_err("no version 7");
    assert!(
        err.to_string().contains("version 7 does not exist"),
        "{err}"
    );
    let info = client
        .apply(
            &Target::NodeCluster("a b/c".into()),
            doc(&[static_cluster("x", 9001)]),
        )
        .await
        .expect("odd names survive the query encoding");
    assert_eq!(info.target, Target::NodeCluster("a b/c".into()));
    let got = client
        .get(Some(&Target::NodeCluster("a b/c".into())))
        .await
        .expect("get");
    assert_eq!(got["targets"][0]["version"], 1);
    assert_eq!(got["targets"][0]["document"]["resources"][0]["name"], "x");
    let st = client.status().await.expect("status");
    assert_eq!(st.config_version, 1);
    assert!(st.report.proxies.is_empty());
    s.stop().await;
}
