//! weir-cp integration tests: the library server in-process, and the `weir-cp` binary as a
//! child process, checked with real tonic clients (health, ADS) and the CLI over 127.0.0.1.
//!
//! Modules: `harness` (servers, ADS clients, documents), `auth` (tokens, scopes, mTLS, open
//! mode), `sotw` and `delta` (the ADS
//! protocols), `cli` (the binary: apply/history/rollback/status, persistence, --config-dir),
//! `kv` (the KV store over gRPC and its CLI), `mesh` (weir-cp driving a real weir),
//! `python_grpc` (gRPC's own xDS client resolving through weir-cp; skipped without grpcio),
//! `registry` (the service registry: gRPC API, EDS pushes, health, watch, CLI, persistence),
//! `etcd` (two replicas sharing one etcd: config, KV, registry, versions, restart), `ca` (the
//! mesh CA: workload certificates and the trust bundle over SDS, entitlement, rotation),
//! `store_suite` (one suite per store run against each backend: KV and registry on embedded
//! and etcd, objects on embedded and S3/moto), `sidecars` (two weir sidecars with certificates
//! from weir-cp's CA talking mTLS; RBAC on SPIFFE IDs; XFCC), `netns_mesh` (the same as
//! transparent sidecars in network namespaces: weir-init rules, plain-text apps, mTLS between),
//! `inject` (the sidecar injection webhook over HTTPS).

mod auth;
mod ca;
mod cli;
mod delta;
mod etcd;
mod harness;
mod inject;
mod kv;
mod mesh;
mod netns_mesh;
mod objects;
mod python_grpc;
mod registry;
mod sidecars;
mod sotw;
mod store_suite;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response};

/// A health client for a server at `addr`.
async fn health_client(addr: SocketAddr) -> HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect");
    HealthClient::new(channel)
}

/// `Health/Check` for `service`: the serving status, or the gRPC error code.
async fn check(
    client: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
) -> Result<health_check_response::ServingStatus, tonic::Code> {
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status())
        .map_err(|s| s.code())
}

#[tokio::test]
async fn health_check_in_process() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(weir_control_plane::serve(listener, async {
        let _ = stopped.await;
    }));

    let mut client = health_client(addr).await;
    assert_eq!(check(&mut client, "").await, Ok(ServingStatus::Serving));
    assert_eq!(
        check(&mut client, "weir-cp").await,
        Ok(ServingStatus::Serving)
    );
    assert_eq!(
        check(
            &mut client,
            "envoy.service.discovery.v3.AggregatedDiscoveryService"
        )
        .await,
        Ok(ServingStatus::Serving)
    );
    assert_eq!(
        check(&mut client, "no.such.Service").await,
        Err(tonic::Code::NotFound)
    );

    let _ = stop.send(());
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops on shutdown")
        .expect("server task")
        .expect("server result");
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test]
async fn binary_serves_and_exits_zero_on_sigterm() {
    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_weir-cp"))
            .args([
                "serve",
                "--xds-address",
                "127.0.0.1:0",
                "--api-address",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn weir-cp"),
    );
    let stderr = child.0.stderr.take().expect("stderr");
    // Read the log on a thread: the bound address, then keep draining so the child never
    // blocks on a full pipe.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let addr = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = rx.recv_timeout(left) else {
                break;
            };
            if let Some(a) = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("address="))
                .and_then(|a| a.parse::<SocketAddr>().ok())
            {
                return (a, rx);
            }
            seen.push(line);
        }
        panic!("no bound address logged; stderr was:\n{}", seen.join("\n"));
    })
    .await
    .expect("log reader");
    let (addr, _rx) = addr;

    let mut client = health_client(addr).await;
    assert_eq!(check(&mut client, "").await, Ok(ServingStatus::Serving));
    assert_eq!(
        check(&mut client, "weir-cp").await,
        Ok(ServingStatus::Serving)
    );
    drop(client);

    let pid = child.0.id().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.0.try_wait().expect("try_wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "weir-cp did not exit on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn help_lists_serve() {
    let out = Command::new(env!("CARGO_BIN_EXE_weir-cp"))
        .arg("--help")
        .output()
        .expect("run weir-cp --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["serve", "config", "status"] {
        assert!(help.contains(cmd), "{cmd} missing: {help}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_weir-cp"))
        .args(["serve", "--help"])
        .output()
        .expect("run weir-cp serve --help");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--xds-address",
        "--api-address",
        "--data-dir",
        "--config",
        "--config-dir",
    ] {
        assert!(help.contains(flag), "{flag} missing: {help}");
    }
}
