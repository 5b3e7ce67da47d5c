//! The `weir` binary: validate mode, SIGTERM drain with a request in flight, /quitquitquit.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

const BIN: &str = env!("CARGO_BIN_EXE_weir");

fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("weir-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let p = dir.join("bootstrap.yaml");
    std::fs::write(&p, text).expect("write");
    p
}

/// `weir --mode validate -c PATH`.
fn validate(path: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args(["--mode", "validate", "-c"])
        .arg(path)
        .output()
        .expect("run")
}

#[test]
fn validate_mode_good_and_bad() {
    let good = write_config(
        "good",
        &http_bootstrap(&all_to("b", "15s"), &cluster("b", &[1]), ""),
    );
    let out = validate(&good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));

    let bad = write_config(
        "bad",
        &http_bootstrap(
            &all_to("missing", "15s"),
            &cluster("b", &[1]),
            "          access_log: [{name: x}]\n",
        ),
    );
    let out = validate(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.access_log"
        ),
        "{err}"
    );
    assert!(
        err.contains("route_config.virtual_hosts[0].routes[0].route.cluster"),
        "{err}"
    );
}

/// Kills the child if a test fails before it exits, so no weir process outlives the test.
struct Weir(std::process::Child);

impl Drop for Weir {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the binary; return it with its listener and admin addresses (parsed from its log).
fn spawn_weir(config: &std::path::Path) -> (Weir, SocketAddr, SocketAddr) {
    let mut child = Command::new(BIN)
        .args(["--concurrency", "1", "--drain-time-s", "5", "-c"])
        .arg(config)
        .env("WEIR_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn weir");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let (mut listener, mut admin) = (None, None);
    for _ in 0..200 {
        if listener.is_some() && admin.is_some() {
            break;
        }
        let line = lines.next().expect("log line").expect("utf8");
        let addr = line
            .split("address=")
            .nth(1)
            .or_else(|| line.split("bound=").nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse::<SocketAddr>().ok());
        if line.contains("listener ready") {
            listener = addr;
        } else if line.contains("admin listening") {
            admin = addr;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (
        Weir(child),
        listener.expect("listener"),
        admin.expect("admin"),
    )
}

fn wait_exit(child: &mut Weir) -> std::process::ExitStatus {
    for _ in 0..200 {
        if let Some(s) = child.0.try_wait().expect("wait") {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("weir did not exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_request_then_exits_zero() {
    let b = Backend::start("b").await;
    let cfg = write_config(
        "drain",
        &http_bootstrap(&all_to("b", "15s"), &cluster("b", &[b.port()]), ""),
    );
    let (mut child, addr, _admin) = spawn_weir(&cfg);
    let slow = tokio::spawn(async move { get(addr, "x", "/slow/1500").await });
    // Let the slow request reach the backend, then SIGTERM.
    eventually("request in flight", || b.hits() == 1).await;
    let pid = child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let (status, headers, _) = slow.await.expect("slow request");
    assert_eq!(status.as_u16(), 200, "in-flight request completes");
    assert_eq!(
        headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    let exit = tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .expect("join");
    assert!(exit.success(), "exit status {exit:?}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitquitquit_exits_zero() {
    let b = Backend::start("b").await;
    let cfg = write_config(
        "quit",
        &http_bootstrap(&all_to("b", "15s"), &cluster("b", &[b.port()]), ""),
    );
    let (mut child, _addr, admin) = spawn_weir(&cfg);
    let req = http::Request::post("/quitquitquit")
        .header("host", "a")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("req");
    let (s, _, _) = send(admin, req).await;
    assert_eq!(s.as_u16(), 200);
    let exit = tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .expect("join");
    assert!(exit.success());
}

#[test]
fn every_example_config_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("examples dir") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        n += 1;
        let out = validate(&path);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(n >= 3, "found {n} examples");
    // The mesh quickstart's bootstraps (its xDS documents are checked by weir-cp's tests).
    for f in ["mesh/weir.yaml", "mesh/upstreams.yaml"] {
        let out = validate(&dir.join(f));
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let bench = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/weir-bench.yaml");
    let out = validate(&bench);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
