//! The `weir` binary: validate mode, SIGTERM drain with a request in flight, /quitquitquit,
//! the sidecar lifecycle (`/ready` waits for the initial xDS fetch, `/drain_listeners` with
//! and without `--exit-on-zero-active-connections`), and process helpers for hot_restart.rs.

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
pub(crate) struct Weir(std::process::Child);

impl Drop for Weir {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start the binary; return it with its listener and admin addresses (parsed from its log).
fn spawn_weir(config: &std::path::Path) -> (Weir, SocketAddr, SocketAddr) {
    let mut child = Command::new(BIN)
        .args([
            "--concurrency",
            "1",
            "--drain-time-s",
            "5",
            "--disable-hot-restart",
            "-c",
        ])
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

// ---- Process helpers shared with hot_restart.rs, and the sidecar lifecycle tests ----

/// A weir process's stderr lines, collected by a thread.
#[derive(Clone, Default)]
pub(crate) struct Logs(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Logs {
    /// Every line so far.
    pub(crate) fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether some line contains `needle`.
    pub(crate) fn has(&self, needle: &str) -> bool {
        self.lines().iter().any(|l| l.contains(needle))
    }

    /// The first line containing `needle`, waiting up to 20 s for it.
    pub(crate) async fn wait_for(&self, needle: &str) -> String {
        for _ in 0..400 {
            if let Some(l) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "no log line with {needle:?}; log:\n{}",
            self.lines().join("\n")
        );
    }
}

/// The address after `key=` in a log line.
pub(crate) fn addr_in(line: &str, key: &str) -> SocketAddr {
    line.split(&format!("{key}="))
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= address in {line:?}"))
}

/// Start the binary with `args` (then `-c config`); stderr lines go to the returned [`Logs`].
pub(crate) fn spawn_weir_with(config: &std::path::Path, args: &[&str]) -> (Weir, Logs) {
    let mut child = Command::new(BIN)
        .args(args)
        .arg("-c")
        .arg(config)
        .env("WEIR_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn weir");
    let stderr = child.stderr.take().expect("stderr");
    let logs = Logs::default();
    let sink = logs.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            sink.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
    (Weir(child), logs)
}

impl Weir {
    /// Whether the process still runs.
    pub(crate) fn running(&mut self) -> bool {
        self.0.try_wait().expect("try_wait").is_none()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }
}

/// Wait (on a blocking thread) until the process exits; its status.
pub(crate) async fn exited(mut child: Weir) -> std::process::ExitStatus {
    tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .expect("join")
}

/// A fresh, short temp directory (hot-restart socket paths must fit `sun_path`).
pub(crate) fn short_dir(name: &str) -> std::path::PathBuf {
    let d = std::path::PathBuf::from(format!("/tmp/wr-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

/// `POST path` to the admin server.
pub(crate) async fn admin_post(admin: SocketAddr, path: &str) -> (http::StatusCode, bytes::Bytes) {
    let req = http::Request::post(path)
        .header("host", "a")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("req");
    let (s, _, b) = send(admin, req).await;
    (s, b)
}

/// A stat from the admin server's `/stats` text (0 when absent).
pub(crate) async fn admin_stat(admin: SocketAddr, name: &str) -> Option<f64> {
    let (_, _, body) = get(admin, "a", "/stats").await;
    String::from_utf8_lossy(&body).lines().find_map(|l| {
        let (n, v) = l.split_once(": ")?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_on_zero_active_connections_after_drain_listeners() {
    let b = Backend::start("b").await;
    let cfg = write_config(
        "exit0",
        &http_bootstrap(&all_to("b", "15s"), &cluster("b", &[b.port()]), ""),
    );
    let dir = short_dir("exit0");
    let (mut child, logs) = spawn_weir_with(
        &cfg,
        &[
            "--concurrency",
            "1",
            "--drain-time-s",
            "30",
            "--exit-on-zero-active-connections",
            "--hot-restart-socket-dir",
            dir.to_str().expect("utf8"),
        ],
    );
    let addr = addr_in(&logs.wait_for("listener ready").await, "address");
    let admin = addr_in(&logs.wait_for("admin listening").await, "bound");
    let (s, _, body) = get(admin, "a", "/ready").await;
    assert_eq!(s.as_u16(), 200, "{body:?}");

    let slow = tokio::spawn(async move { get(addr, "x", "/slow/1500").await });
    eventually("request in flight", || b.hits() == 1).await;
    let (s, _) = admin_post(admin, "/drain_listeners").await;
    assert_eq!(s.as_u16(), 200);
    let (s, _, body) = get(admin, "a", "/ready").await;
    assert_eq!(s.as_u16(), 503);
    assert_eq!(&body[..], b"DRAINING\n");
    // The in-flight request keeps the process alive, and completes.
    assert!(child.running(), "exits only once connections are gone");
    let (status, headers, _) = slow.await.expect("slow request");
    assert_eq!(status.as_u16(), 200);
    assert_eq!(
        headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    // Then it exits on its own, long before the 30 s drain time would be over (bounded
    // by wait_exit's 10 s).
    let exit = exited(child).await;
    assert!(exit.success(), "{exit:?}");
    assert!(logs.has("exiting once no connection is left"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_listeners_without_the_flag_keeps_the_process() {
    let b = Backend::start("b").await;
    let cfg = write_config(
        "drainonly",
        &http_bootstrap(&all_to("b", "15s"), &cluster("b", &[b.port()]), ""),
    );
    let dir = short_dir("drainonly");
    let (mut child, logs) = spawn_weir_with(
        &cfg,
        &[
            "--concurrency",
            "1",
            "--drain-time-s",
            "5",
            "--hot-restart-socket-dir",
            dir.to_str().expect("utf8"),
        ],
    );
    let addr = addr_in(&logs.wait_for("listener ready").await, "address");
    let admin = addr_in(&logs.wait_for("admin listening").await, "bound");
    assert_eq!(get(addr, "x", "/").await.0.as_u16(), 200);
    let (s, _) = admin_post(admin, "/drain_listeners").await;
    assert_eq!(s.as_u16(), 200);
    // No connection is left, yet the process stays (Envoy's /drain_listeners): it keeps
    // answering the admin API as DRAINING.
    for _ in 0..10 {
        let (s, _, body) = get(admin, "a", "/ready").await;
        assert_eq!((s.as_u16(), &body[..]), (503, &b"DRAINING\n"[..]));
        assert!(child.running());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
    let (s, body) = admin_post(admin, "/quitquitquit").await;
    assert_eq!((s.as_u16(), &body[..]), (200, &b"OK\n"[..]));
    assert!(exited(child).await.success());
}

/// An ADS-configured proxy is not ready until its initial LDS/CDS fetch was applied or
/// timed out: here the management server accepts connections and never answers, so `/ready`
/// is 503 PRE_INITIALIZING until the 2 s `initial_fetch_timeout`s are over, then 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_initial_xds_fetch() {
    // A "management server" that accepts and stays silent.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let xds_port = silent.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let cfg = write_config(
        "xdsready",
        &format!(
            r#"
node: {{id: n1, cluster: c1}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3, initial_fetch_timeout: 2s}}
  lds_config: {{ads: {{}}, resource_api_version: V3, initial_fetch_timeout: 2s}}
static_resources:
  clusters:
{xds}"#,
            xds = xds_cluster_yaml(xds_port)
        ),
    );
    let dir = short_dir("xdsready");
    let (child, logs) = spawn_weir_with(
        &cfg,
        &[
            "--concurrency",
            "1",
            "--drain-time-s",
            "2",
            "--hot-restart-socket-dir",
            dir.to_str().expect("utf8"),
        ],
    );
    let admin = addr_in(&logs.wait_for("admin listening").await, "bound");
    let (s, _, body) = get(admin, "a", "/ready").await;
    assert_eq!(
        (s.as_u16(), &body[..]),
        (503, &b"PRE_INITIALIZING\n"[..]),
        "not ready while the initial fetch is pending"
    );
    assert!(!logs.has("initial xDS fetch complete"));
    // After the initial fetch timeouts, the proxy serves (with no xDS resources).
    let mut ready = false;
    for _ in 0..100 {
        let (s, _, body) = get(admin, "a", "/ready").await;
        if s.as_u16() == 200 {
            assert_eq!(&body[..], b"LIVE\n");
            ready = true;
            break;
        }
        assert_eq!(&body[..], b"PRE_INITIALIZING\n");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "ready after initial_fetch_timeout");
    assert_eq!(admin_stat(admin, "server.state").await, Some(0.0));
    let (s, _) = admin_post(admin, "/quitquitquit").await;
    assert_eq!(s.as_u16(), 200);
    assert!(exited(child).await.success());
}
