//! gRPC's built-in xDS client (grpcio for Python) resolving `xds:///greeter` through weir-cp
//! and balancing across the endpoints weir-cp serves. The Python side is
//! `tests/python/xds_client.py`. Skipped, with a message, when python3 or grpcio is missing
//! (`pip install grpcio`); `$PYTHON` selects the interpreter.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

const CALLS: usize = 40;

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

fn grpcio_available() -> bool {
    Command::new(python())
        .args(["-c", "import grpc"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn greeter_doc(ports: &[u16]) -> String {
    let mut endpoints = String::new();
    for p in ports {
        endpoints.push_str(&format!(
            "    - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}\n"
        ));
    }
    format!(
        r#"resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: greeter
  api_listener:
    api_listener:
      "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
      rds: {{route_config_name: greeter-routes, config_source: {{ads: {{}}}}}}
      http_filters:
      - name: envoy.filters.http.router
        typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
- "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
  name: greeter-routes
  virtual_hosts:
  - name: greeter
    domains: ["*"]
    routes:
    - match: {{prefix: "/"}}
      route: {{cluster: greeter-cluster}}
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: greeter-cluster
  type: EDS
  lb_policy: ROUND_ROBIN
  eds_cluster_config: {{eds_config: {{ads: {{}}}}}}
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: greeter-cluster
  endpoints:
  - locality: {{region: local}}
    load_balancing_weight: 1
    lb_endpoints:
{endpoints}"#
    )
}

type Log = std::sync::Arc<std::sync::Mutex<String>>;

/// The rest of the first stdout line starting with `prefix` (bounded wait).
fn wait_line(prefix: &str, rx: &std::sync::mpsc::Receiver<String>, err_log: &Log) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(prefix) => return l[prefix.len()..].trim().to_string(),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    panic!(
        "no {prefix:?} line from the python client; its stderr:\n{}",
        err_log.lock().map(|l| l.clone()).unwrap_or_default()
    );
}

#[tokio::test]
async fn grpc_python_xds_client_balances_through_weir_cp() {
    if !grpcio_available() {
        // scripts/test.sh installs grpcio and sets this: in CI a missing client is a failure.
        assert!(
            std::env::var_os("WEIR_REQUIRE_GRPCIO").is_none(),
            "WEIR_REQUIRE_GRPCIO is set but {} cannot import grpc",
            python()
        );
        eprintln!(
            "SKIPPED grpc_python_xds_client_balances_through_weir_cp: {} cannot import grpc \
             (pip install grpcio)",
            python()
        );
        return;
    }
    let s = Server::start().await;
    let dir = temp_dir("pygrpc");
    let bootstrap = dir.join("bootstrap.json");
    write(
        &bootstrap,
        &serde_json::json!({
            "xds_servers": [{
                "server_uri": s.xds.to_string(),
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }],
            "node": {"id": "py-client", "cluster": "py", "locality": {}},
        })
        .to_string(),
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/xds_client.py");
    let mut child = ChildGuard(
        Command::new(python())
            .args([script, "greeter", "2", &CALLS.to_string()])
            .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn python"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let stderr = child.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err_log: Log = Default::default();
    let err_log2 = err_log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut l) = err_log2.lock() {
                l.push_str(&line);
                l.push('\n');
            }
        }
    });
    let ports_line = wait_line("PORTS ", &rx, &err_log);
    let ports: Vec<u16> = ports_line
        .split_whitespace()
        .map(|p| p.parse().expect("port"))
        .collect();
    assert_eq!(ports.len(), 2);
    s.apply(&greeter_doc(&ports));
    child
        .0
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"GO\n")
        .expect("write stdin");
    let err_log3 = err_log.clone();
    let result = tokio::task::spawn_blocking(move || wait_line("RESULT ", &rx, &err_log3))
        .await
        .expect("reader");
    let v: serde_json::Value = serde_json::from_str(&result).expect("result json");
    assert_eq!(v["errors"], serde_json::json!([]), "{v}");
    let b0 = v["counts"]["b0"].as_u64().unwrap_or(0);
    let b1 = v["counts"]["b1"].as_u64().unwrap_or(0);
    assert_eq!(b0 + b1, CALLS as u64, "{v}");
    assert!(
        b0 > 0 && b1 > 0,
        "calls balanced across both endpoints: {v}"
    );
    // The client subscribed to and ACKed every type.
    for t in [LDS, RDS, CDS, EDS] {
        let (pushes, acks, nacks) = s.cp.metrics.type_counts(t);
        assert!(
            pushes >= 1 && acks >= 1,
            "{t}: {pushes} pushes, {acks} acks"
        );
        assert_eq!(nacks, 0, "{t} NACKed: {:?}", s.cp.status.report().nacks);
    }
    let _ = child.0.wait();
    s.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
