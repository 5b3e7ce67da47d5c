//! Zero-downtime binary upgrade: the real `weir` binary at epoch 0 serves under a steady
//! request loop while epoch 1 takes its sockets over (Unix socket, SCM_RIGHTS), the old one
//! drains and exits, and its counters continue in the new one. Also: a child whose parent is
//! gone (stale socket file) or silent starts anyway on fresh sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use crate::harness::*;
use crate::lifecycle::{Weir, addr_in, admin_post, admin_stat, exited, short_dir, spawn_weir_with};

/// A free port on 127.0.0.1 (bound and released; the test binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// [`http_bootstrap`] to backend `port` with the listener and admin on fixed ports.
fn fixed_ports_config(
    dir: &std::path::Path,
    backend: u16,
    listener: u16,
    admin: u16,
) -> std::path::PathBuf {
    let yaml = http_bootstrap(&all_to("b", "15s"), &cluster("b", &[backend]), "")
        .replacen(
            "admin:\n  address: {socket_address: {address: 127.0.0.1, port_value: 0}}",
            &format!("admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}"),
            1,
        )
        .replacen(
            "- name: http\n    address: {socket_address: {address: 127.0.0.1, port_value: 0}}",
            &format!("- name: http\n    address: {{socket_address: {{address: 127.0.0.1, port_value: {listener}}}}}"),
            1,
        );
    assert!(
        yaml.contains(&format!("port_value: {listener}"))
            && yaml.contains(&format!("port_value: {admin}"))
    );
    let p = dir.join("bootstrap.yaml");
    std::fs::write(&p, yaml).expect("write");
    p
}

fn epoch_args<'a>(dir: &'a str, epoch: &'a str) -> Vec<&'a str> {
    vec![
        "--concurrency",
        "2",
        "--drain-time-s",
        "20",
        "--parent-shutdown-time-s",
        "20",
        "--base-id",
        "7",
        "--hot-restart-socket-dir",
        dir,
        "--restart-epoch",
        epoch,
    ]
}

/// What the request loop saw.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    /// Connection refused or reset while connecting: must stay 0.
    refused: AtomicUsize,
    /// Requests that failed (error or non-200): must stay 0.
    failed: AtomicUsize,
    /// Requests on a reused keep-alive connection that the server closed before answering,
    /// retried once on a new connection (RFC 9112 §9.3.1; every HTTP client does this).
    retried: AtomicUsize,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(what);
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, std::io::Error> {
    let s = tokio::net::TcpStream::connect(addr).await?;
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(tx)
}

fn request() -> http::Request<Full<Bytes>> {
    http::Request::get("/loop")
        .header("host", "x")
        .body(Full::new(Bytes::new()))
        .expect("req")
}

/// Why one request did not succeed.
#[derive(Debug)]
enum ReqError {
    Hyper(hyper::Error),
    Status(http::StatusCode),
}

impl std::fmt::Display for ReqError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReqError::Hyper(e) => write!(f, "{e}"),
            ReqError::Status(s) => write!(f, "answered {s}"),
        }
    }
}

impl ReqError {
    /// The connection was closed before an answer (a stale keep-alive connection).
    fn closed_before_answer(&self) -> bool {
        matches!(self, ReqError::Hyper(e) if e.is_canceled() || e.is_incomplete_message() || e.is_closed())
    }
}

/// One request on `tx`; Ok(keep) when answered 200 (keep: the connection may be reused).
async fn one(tx: &mut SendRequest<Full<Bytes>>) -> Result<bool, ReqError> {
    tx.ready().await.map_err(ReqError::Hyper)?;
    let resp = tx.send_request(request()).await.map_err(ReqError::Hyper)?;
    let status = resp.status();
    let close = resp
        .headers()
        .get("connection")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    resp.into_body().collect().await.map_err(ReqError::Hyper)?;
    if status != http::StatusCode::OK {
        return Err(ReqError::Status(status));
    }
    Ok(!close)
}

/// A client loop: `keep_alive` reuses connections until the server says `Connection: close`;
/// otherwise each request has its own connection. Runs until `stop` (at most `max` requests).
async fn client(
    addr: SocketAddr,
    keep_alive: bool,
    stop: Arc<AtomicBool>,
    t: Arc<Tally>,
    max: usize,
) {
    let mut conn: Option<SendRequest<Full<Bytes>>> = None;
    for _ in 0..max {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let reused = conn.is_some();
        let mut tx = match conn.take() {
            Some(tx) if !tx.is_closed() => tx,
            _ => match connect(addr).await {
                Ok(tx) => tx,
                Err(e) => {
                    t.refused.fetch_add(1, Ordering::SeqCst);
                    t.errors
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("connect: {e}"));
                    continue;
                }
            },
        };
        match one(&mut tx).await {
            Ok(keep) => {
                t.ok.fetch_add(1, Ordering::SeqCst);
                if keep_alive && keep {
                    conn = Some(tx);
                }
            }
            Err(e) if reused && e.closed_before_answer() => {
                // The server closed the idle keep-alive connection as the request went out.
                t.retried.fetch_add(1, Ordering::SeqCst);
                match connect(addr).await {
                    Ok(mut tx) => match one(&mut tx).await {
                        Ok(_) => {
                            t.ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => t.fail(format!("retry: {e}")),
                    },
                    Err(e) => {
                        t.refused.fetch_add(1, Ordering::SeqCst);
                        t.errors
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(format!("retry connect: {e}"));
                    }
                }
            }
            Err(e) => t.fail(format!("request (reused: {reused}): {e}")),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrade_under_load_refuses_nothing_and_drains_the_old_process() {
    let b = Backend::start("b").await;
    let dir = short_dir("upgrade");
    let dir_s = dir.to_str().expect("utf8").to_string();
    let (lport, aport) = (free_port(), free_port());
    let cfg = fixed_ports_config(&dir, b.port(), lport, aport);
    let addr: SocketAddr = ([127, 0, 0, 1], lport).into();
    let admin: SocketAddr = ([127, 0, 0, 1], aport).into();

    let (mut old, old_logs) = spawn_weir_with(&cfg, &epoch_args(&dir_s, "0"));
    old_logs
        .wait_for("hot restart: listening for the next epoch")
        .await;
    assert_eq!(get(addr, "x", "/").await.0.as_u16(), 200);
    assert_eq!(
        admin_stat(admin, "server.hot_restart_epoch").await,
        Some(0.0)
    );
    let (_, _, info) = get(admin, "a", "/server_info").await;
    let info = json(&info);
    assert_eq!(info["hot_restart_version"], "weir.hot_restart.v1");
    assert_eq!(info["command_line_options"]["restart_epoch"], 0);

    // A long request on the old process, in flight across the upgrade.
    // (Long enough to outlast the new process's start even on a loaded machine.)
    let slow = tokio::spawn(async move { get(addr, "x", "/slow/8000").await });
    eventually("slow request in flight", || b.hits() >= 2).await;

    // The load: 2 clients with a new connection per request, 2 with keep-alive.
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients: Vec<_> = (0..4)
        .map(|i| {
            tokio::spawn(client(
                addr,
                i % 2 == 0,
                stop.clone(),
                tally.clone(),
                20_000,
            ))
        })
        .collect();
    eventually("load running", || tally.ok.load(Ordering::SeqCst) > 50).await;

    // Epoch 1, same config.
    let (new, new_logs) = spawn_weir_with(&cfg, &epoch_args(&dir_s, "1"));
    new_logs
        .wait_for("hot restart: took the parent's sockets")
        .await;
    new_logs
        .wait_for("listener sockets adopted from the hot-restart parent")
        .await;
    new_logs
        .wait_for("admin socket shared by the hot-restart parent")
        .await;
    new_logs.wait_for("hot restart: parent draining").await;
    old_logs
        .wait_for("hot restart: the child serves; draining and exiting")
        .await;

    assert!(
        !slow.is_finished(),
        "the slow request must still be in flight when the old process drains"
    );
    // The in-flight request on the old process completes (closed: its process drains).
    let (status, headers, _) = slow.await.expect("slow request");
    assert_eq!(status.as_u16(), 200, "in-flight request completes");
    assert_eq!(
        headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );

    // The old process exits once its connections are gone (bounded by wait_exit).
    let old_pid = old.pid();
    let status = tokio::task::spawn_blocking(move || {
        for _ in 0..400 {
            if !old.running() {
                return old;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the old process did not exit");
    })
    .await
    .expect("join");
    let status = exited(status).await;
    assert!(status.success(), "old process exit status {status:?}");
    assert!(
        !dir.join("weir-hot-restart-7-0.sock").exists(),
        "the old process removed its hot-restart socket"
    );

    // Load keeps running against the new process alone for a while.
    let served_before = tally.ok.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tally.ok.load(Ordering::SeqCst) < served_before + 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.expect("client");
    }
    let errors = tally
        .errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let (ok, refused, failed, retried) = (
        tally.ok.load(Ordering::SeqCst),
        tally.refused.load(Ordering::SeqCst),
        tally.failed.load(Ordering::SeqCst),
        tally.retried.load(Ordering::SeqCst),
    );
    eprintln!(
        "upgrade load: {ok} ok, {refused} refused, {failed} failed, {retried} keep-alive retries"
    );
    assert_eq!(refused, 0, "connection refusals: {errors:?}");
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(
        ok >= served_before + 200,
        "requests after the swap: {ok} (before: {served_before})"
    );

    // Everything after the swap is the new process: its admin (same port, shared socket),
    // epoch 1, generation 1, and it counted requests.
    let (_, _, info) = get(admin, "a", "/server_info").await;
    let info = json(&info);
    assert_eq!(info["command_line_options"]["restart_epoch"], 1, "{info}");
    assert_eq!(
        admin_stat(admin, "server.hot_restart_epoch").await,
        Some(1.0)
    );
    assert_eq!(
        admin_stat(admin, "server.hot_restart_generation").await,
        Some(1.0)
    );
    // Counters continue across the restart: the old process's final snapshot was merged,
    // so the new one counts every request either process served (the loop's, the first
    // GET and the slow one), not only its own.
    new_logs
        .wait_for("hot restart: merged the parent's final counters")
        .await;
    assert!(old_logs.has("hot restart: final counters sent to the child"));
    let served_by_new = admin_stat(admin, "http.ingress.downstream_rq_total")
        .await
        .unwrap_or(0.0);
    assert!(
        served_by_new >= (ok + 2) as f64,
        "counted {served_by_new}, served {ok} + 2 across both processes"
    );
    assert!(!old_logs.has("ERROR"), "{}", old_logs.lines().join("\n"));
    assert!(!new_logs.has("WARN"), "{}", new_logs.lines().join("\n"));
    eprintln!("old pid {old_pid} exited; new process served {served_by_new}");

    let (s, _) = admin_post(admin, "/quitquitquit").await;
    assert_eq!(s.as_u16(), 200);
    assert!(exited(new).await.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The parent is gone (its socket file is stale) or silent: the child logs a WARN, binds
/// fresh and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_without_a_live_parent_starts_anyway() {
    let b = Backend::start("b").await;
    for case in ["stale", "silent"] {
        let dir = short_dir(case);
        let dir_s = dir.to_str().expect("utf8").to_string();
        let (lport, aport) = (free_port(), free_port());
        let cfg = fixed_ports_config(&dir, b.port(), lport, aport);
        let parent_sock = dir.join("weir-hot-restart-7-0.sock");
        // stale: a socket file nobody listens on; silent: a listener that never answers.
        let held = std::os::unix::net::UnixListener::bind(&parent_sock).expect("bind");
        let _silent = if case == "stale" {
            drop(held);
            None
        } else {
            Some(held)
        };
        assert!(parent_sock.exists());
        let (child, logs): (Weir, _) = spawn_weir_with(&cfg, &epoch_args(&dir_s, "1"));
        let warn = logs.wait_for("hot restart: no parent answered").await;
        assert!(warn.contains("WARN"), "{warn}");
        let ready = logs.wait_for("listener ready").await;
        let addr = addr_in(&ready, "address");
        assert_eq!(addr.port(), lport);
        let (s, _, _) = get(addr, "x", "/").await;
        assert_eq!(s.as_u16(), 200, "{case}: serves on fresh sockets");
        let admin: SocketAddr = ([127, 0, 0, 1], aport).into();
        assert_eq!(
            admin_stat(admin, "server.hot_restart_epoch").await,
            Some(1.0)
        );
        assert_eq!(
            admin_stat(admin, "server.hot_restart_generation").await,
            Some(0.0),
            "no parent: generation 0"
        );
        // It listens for its own child.
        logs.wait_for("hot restart: listening for the next epoch")
            .await;
        assert!(dir.join("weir-hot-restart-7-1.sock").exists());
        let (s, _) = admin_post(admin, "/quitquitquit").await;
        assert_eq!(s.as_u16(), 200);
        assert!(exited(child).await.success());
        assert!(
            !dir.join("weir-hot-restart-7-1.sock").exists(),
            "removed at exit"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
