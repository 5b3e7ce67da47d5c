//! Benchmark (not a test): one `weir-cp` process pinned to one core serving N concurrent SotW
//! ADS streams (one TCP connection each, like N proxies); the time for an endpoint change,
//! applied through the config API, to reach every stream (p50/p99/max over all streams and
//! rounds), and the server's resident memory per stream.
//!
//! ```text
//! cargo build --release -p weir-control-plane --bin weir-cp --example ads_fanout
//! target/release/examples/ads_fanout [STREAMS=1000] [ROUNDS=5] [ENDPOINTS=10]
//! ```
//! The server binary is looked up next to the example's directory (`target/release/weir-cp`)
//! or taken from `$WEIR_CP`. The server runs under `taskset -c 0` with `--data-dir` in a
//! temporary directory (so each change includes the durable commit).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Barrier, mpsc};
use weir_control_plane::api::Client;
use weir_control_plane::operator::Target;
use weir_xds_api::pb::envoy::config::core::v3::Node;
use weir_xds_api::pb::envoy::service::discovery::v3::DiscoveryRequest;
use weir_xds_api::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;

const EDS: &str = weir_xds_api::type_urls::CLUSTER_LOAD_ASSIGNMENT;

fn doc(round: usize, endpoints: usize) -> String {
    let mut s = String::from(
        "resources:\n- \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n  name: svc\n  type: EDS\n  eds_cluster_config: {eds_config: {ads: {}}}\n- \"@type\": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment\n  cluster_name: svc\n  endpoints:\n  - lb_endpoints:\n",
    );
    for i in 0..endpoints {
        let port = 20000 + round * endpoints + i;
        s.push_str(&format!(
            "    - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}\n"
        ));
    }
    s
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Guard(std::process::Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let streams = args.first().copied().unwrap_or(1000);
    let rounds = args.get(1).copied().unwrap_or(5);
    let endpoints = args.get(2).copied().unwrap_or(10);

    let bin = std::env::var("WEIR_CP")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            let exe = std::env::current_exe().expect("exe");
            exe.parent()
                .and_then(|p| p.parent())
                .map(|p| p.join("weir-cp"))
                .expect("target dir")
        });
    let data = std::env::temp_dir().join(format!("weir-cp-fanout-{}", std::process::id()));
    let (xds_port, api_port) = (free_port(), free_port());
    let server = Guard(
        Command::new("taskset")
            .args(["-c", "0"])
            .arg(&bin)
            .args([
                "serve",
                "--log-level",
                "warn",
                "--xds-address",
                &format!("127.0.0.1:{xds_port}"),
                "--api-address",
                &format!("127.0.0.1:{api_port}"),
                "--data-dir",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .spawn()?,
    );
    let pid = server.0.id();
    let api = Client::new(format!("127.0.0.1:{api_port}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while api.status().await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "weir-cp did not start ({bin:?})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    api.apply(&Target::All, doc(0, endpoints)).await?;
    let rss_before = rss_kib(pid);

    // Open the streams; each reports one latency per round.
    let (lat_tx, mut lat_rx) = mpsc::unbounded_channel::<(usize, Duration)>();
    let ready = Arc::new(Barrier::new(streams + 1));
    let start_round: Arc<tokio::sync::watch::Sender<(usize, Instant)>> =
        Arc::new(tokio::sync::watch::channel((0, Instant::now())).0);
    for i in 0..streams {
        let ready = ready.clone();
        let lat_tx = lat_tx.clone();
        let mut round_rx = start_round.subscribe();
        tokio::spawn(async move {
            let mut client = loop {
                match AggregatedDiscoveryServiceClient::connect(format!(
                    "http://127.0.0.1:{xds_port}"
                ))
                .await
                {
                    Ok(c) => break c,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
            let (tx, rx) = mpsc::channel(4);
            let mut first = DiscoveryRequest {
                type_url: EDS.into(),
                resource_names: vec!["svc".into()],
                node: Some(Node {
                    id: format!("proxy-{i}"),
                    cluster: "bench".into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let _ = tx.send(first.clone()).await;
            first.node = None;
            let Ok(resp) = client
                .stream_aggregated_resources(
                    tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
                )
                .await
            else {
                return;
            };
            let mut stream = resp.into_inner();
            let Ok(Some(r)) = stream.message().await else {
                return;
            };
            let _ = tx
                .send(DiscoveryRequest {
                    version_info: r.version_info.clone(),
                    response_nonce: r.nonce.clone(),
                    ..first.clone()
                })
                .await;
            ready.wait().await;
            while let Ok(Some(r)) = stream.message().await {
                let (round, t0) = *round_rx.borrow_and_update();
                let _ = lat_tx.send((round, t0.elapsed()));
                let _ = tx
                    .send(DiscoveryRequest {
                        version_info: r.version_info.clone(),
                        response_nonce: r.nonce.clone(),
                        ..first.clone()
                    })
                    .await;
            }
        });
    }
    drop(lat_tx);
    let open_start = Instant::now();
    ready.wait().await;
    let opened_in = open_start.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(pid);

    let mut all = Vec::new();
    for round in 1..=rounds {
        start_round.send_replace((round, Instant::now()));
        api.apply(&Target::All, doc(round, endpoints)).await?;
        let mut got = Vec::with_capacity(streams);
        let deadline = Instant::now() + Duration::from_secs(60);
        while got.len() < streams {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, lat_rx.recv()).await {
                Ok(Some((r, d))) if r == round => got.push(d),
                Ok(Some(_)) => {}
                _ => anyhow::bail!(
                    "round {round}: only {} of {streams} streams updated",
                    got.len()
                ),
            }
        }
        got.sort();
        println!(
            "round {round}: p50 {:?} p99 {:?} max {:?}",
            percentile(&got, 0.5),
            percentile(&got, 0.99),
            got.last().copied().unwrap_or_default()
        );
        all.extend(got);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    all.sort();
    println!(
        "{streams} streams (opened in {opened_in:?}), {rounds} rounds, {endpoints} endpoints: \
         change-to-all-streams p50 {:?} p99 {:?} max {:?}",
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        all.last().copied().unwrap_or_default()
    );
    println!(
        "server RSS {rss_before} KiB before streams, {rss_after} KiB with them: {:.1} KiB per stream",
        (rss_after.saturating_sub(rss_before)) as f64 / streams as f64
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
