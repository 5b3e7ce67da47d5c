//! Benchmark (not a test) of weir-cp's embedded stores against their references, in one run:
//!
//! - **KV**: the `weir-cp` binary (`--data-dir` in a temp dir: every put is a durable redb
//!   commit) driven over gRPC by weir's `weir.kv.v1` client, against a real single-node etcd
//!   (Debian's `etcd-server`, data dir in the same temp filesystem, fsyncing its WAL) driven
//!   by `etcd-client`. Same loopback gRPC, same keys, same value sizes, same concurrency:
//!   puts, gets (throughput and latency percentiles) and a watch (put-to-event latency and
//!   delivered events/s while one writer puts). Both servers run under `taskset -c 0`, the
//!   client on the other core.
//! - **Objects**: the embedded object backend (in this process) streaming a large object
//!   in and out (1 MiB chunks, put = temp file + MD5 + fsync + rename + dir fsync + redb
//!   commit), against raw disk in the same directory: write the same bytes with 1 MiB writes +
//!   `fsync`, read them back in 1 MiB reads. Reads on both sides come from the page cache when
//!   the object fits in it. The put body is slices of one buffer (no copy, as the raw side).
//!   Best of 3 rounds; each round times [`READS`] raw reads and gets, alternating.
//!
//! ```text
//! cargo build --release -p weir-control-plane --bin weir-cp --example store_bench
//! target/release/examples/store_bench [OPS=5000] [OBJECT_MIB=256]
//! ```
//! (`benches/stores.sh` does both.) `STORE_BENCH_ROWS=put/256/16,get/4096/1,objects` runs only
//! the named rows (`op/value bytes/concurrency`, or `objects`; default: all), e.g. to profile
//! the server during one row (`STORE_BENCH_PAUSE=1` prints weir-cp's pid and waits 5 s first).
//! After each weir-cp row, stderr gets its slowest request and the KV checkpoints (count,
//! seconds) and background write-backs weir-cp's `/metrics` counted during the row.
//! The server binary is `target/release/weir-cp` next to
//! the example, or `$WEIR_CP`; etcd is `etcd` on PATH or `$WEIR_ETCD_BIN`.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use tonic::transport::Channel;
use weir_control_plane::objects::{
    ByteStream, EmbeddedObjects, ObjError, ObjectBackend, PutOptions,
};
use weir_control_plane::proto::kv as pb;
use weir_control_plane::proto::kv::kv_client::KvClient;
use weir_control_plane::proto::kv::watch_client::WatchClient;

/// Raw reads and object gets timed per object round (each is a few ms from the page cache).
const READS: usize = 5;

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

/// One KV system under test.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // one per benchmark client
enum Kv {
    Weir(KvClient<Channel>, Channel),
    Etcd(etcd_client::Client),
}

impl Kv {
    fn name(&self) -> &'static str {
        match self {
            Kv::Weir(..) => "weir-cp embedded",
            Kv::Etcd(_) => "etcd",
        }
    }

    async fn put(&mut self, key: String, value: Vec<u8>) -> anyhow::Result<()> {
        match self {
            Kv::Weir(c, _) => {
                c.put(pb::PutRequest {
                    key: key.into_bytes(),
                    value,
                    ..Default::default()
                })
                .await?;
            }
            Kv::Etcd(c) => {
                c.put(key, value, None).await?;
            }
        }
        Ok(())
    }

    async fn get(&mut self, key: String) -> anyhow::Result<usize> {
        Ok(match self {
            Kv::Weir(c, _) => c
                .range(pb::RangeRequest {
                    key: key.into_bytes(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .kvs
                .len(),
            Kv::Etcd(c) => c.get(key, None).await?.kvs().len(),
        })
    }

    /// The keys of each watch response for keys under `prefix`.
    async fn watch(
        &mut self,
        prefix: &str,
    ) -> anyhow::Result<futures::stream::BoxStream<'static, Vec<String>>> {
        Ok(match self {
            Kv::Weir(_, ch) => {
                let s = WatchClient::new(ch.clone())
                    .watch(pb::WatchRequest {
                        key: prefix.as_bytes().to_vec(),
                        prefix: true,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                s.filter_map(|r| async move {
                    r.ok().map(|r| {
                        r.events
                            .iter()
                            .filter_map(|e| e.kv.as_ref())
                            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
                            .collect()
                    })
                })
                .boxed()
            }
            Kv::Etcd(c) => {
                let s = c
                    .watch(prefix, Some(etcd_client::WatchOptions::new().with_prefix()))
                    .await?;
                s.filter_map(|r| async move {
                    r.ok().map(|r| {
                        r.events()
                            .iter()
                            .filter_map(|e| e.kv())
                            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                            .collect()
                    })
                })
                .boxed()
            }
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    ops_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

fn stats(mut lat: Vec<Duration>, wall: Duration) -> Stats {
    lat.sort_unstable();
    let pct = |p: f64| {
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    Stats {
        ops_per_s: lat.len() as f64 / wall.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        max_us: pct(1.0),
    }
}

/// `ops` operations split over `conc` tasks; `op(client, task, i)`.
async fn run<F, Fut>(kv: &Kv, ops: usize, conc: usize, op: F) -> anyhow::Result<Stats>
where
    F: Fn(Kv, usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..conc {
        let kv = kv.clone();
        let op = op.clone();
        let n = ops / conc;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(n);
            for i in 0..n {
                let s = Instant::now();
                op(kv.clone(), t, i).await?;
                lat.push(s.elapsed());
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(stats(all, start.elapsed()))
}

/// Watch latency: one writer puts `n` keys one after another; the watcher notes when each
/// key's event arrives. Returns (events/s, p50, p99 of put-start → event).
async fn watch_bench(kv: &Kv, n: usize, value: &[u8]) -> anyhow::Result<Stats> {
    let prefix = format!("watch-{}/", kv.name().len());
    let mut w = kv.clone();
    let mut stream = w.watch(&prefix).await?;
    let started: Arc<std::sync::Mutex<Vec<Option<Instant>>>> =
        Arc::new(std::sync::Mutex::new(vec![None; n]));
    let st = started.clone();
    let p = prefix.clone();
    let watcher = tokio::spawn(async move {
        let mut lat = Vec::with_capacity(n);
        let deadline = Instant::now() + Duration::from_secs(120);
        while lat.len() < n && Instant::now() < deadline {
            let Ok(Some(keys)) = tokio::time::timeout(Duration::from_secs(10), stream.next()).await
            else {
                break;
            };
            let now = Instant::now();
            for k in keys {
                let Some(i) = k.strip_prefix(&p).and_then(|s| s.parse::<usize>().ok()) else {
                    continue;
                };
                if let Some(s) = st.lock().unwrap_or_else(|e| e.into_inner())[i] {
                    lat.push(now - s);
                }
            }
        }
        lat
    });
    // Let the watch register.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    let mut wr = kv.clone();
    for i in 0..n {
        started.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(Instant::now());
        wr.put(format!("{prefix}{i}"), value.to_vec()).await?;
    }
    let lat = watcher.await?;
    anyhow::ensure!(
        lat.len() == n,
        "{}: only {} of {n} watch events",
        kv.name(),
        lat.len()
    );
    Ok(stats(lat, start.elapsed()))
}

/// The object in `chunk`-sized pieces of one shared buffer (no copy: the raw side writes from
/// the same memory).
fn body(data: Bytes, chunk: usize) -> ByteStream {
    let n = data.len().div_ceil(chunk);
    Box::pin(futures::stream::iter((0..n).map(move |i| {
        let a = i * chunk;
        let b = (a + chunk).min(data.len());
        Ok::<_, ObjError>(data.slice(a..b))
    })))
}

/// weir-cp's KV checkpoint counters (`weir_cp_kv_checkpoints_total`,
/// `weir_cp_kv_checkpoint_seconds_total`, `weir_cp_kv_writebacks_total`, `weir_cp_kv_writeback_seconds_total`) from its `/metrics`
/// (a plain HTTP/1.0 GET; zeros if unavailable).
fn checkpoint_counters(api_port: u16) -> [f64; 4] {
    use std::io::Read as _;
    let mut out = [0.0; 4];
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", api_port)) else {
        return out;
    };
    let mut text = String::new();
    if s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").is_err()
        || s.read_to_string(&mut text).is_err()
    {
        return out;
    }
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(name), Some(v)) = (it.next(), it.next().and_then(|v| v.parse::<f64>().ok()))
        else {
            continue;
        };
        match name {
            "weir_cp_kv_checkpoints_total" => out[0] = v,
            "weir_cp_kv_checkpoint_seconds_total" => out[1] = v,
            "weir_cp_kv_writebacks_total" => out[2] = v,
            "weir_cp_kv_writeback_seconds_total" => out[3] = v,
            _ => {}
        }
    }
    out
}

/// After a weir-cp row: its slowest request and the checkpoints taken since `before`
/// (stderr, beside the Markdown on stdout).
fn report_row(row: &str, stats: &Stats, api_port: u16, before: &mut [f64; 4]) {
    let now = checkpoint_counters(api_port);
    eprintln!(
        "weir-cp {row}: max {:.0} µs; checkpoints +{} ({:.3} s), background write-backs +{} ({:.3} s)",
        stats.max_us,
        now[0] - before[0],
        now[1] - before[1],
        now[2] - before[2],
        now[3] - before[3]
    );
    *before = now;
}

/// Whether the row `name` is selected by `filter` (`STORE_BENCH_ROWS`: comma-separated row
/// names; none: every row).
fn selected(filter: Option<&str>, name: &str) -> bool {
    filter.is_none_or(|f| f.split(',').any(|r| r.trim() == name))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let ops = args.first().copied().unwrap_or(5000);
    let object_mib = args.get(1).copied().unwrap_or(256);
    let filter = std::env::var("STORE_BENCH_ROWS").ok();
    let filter = filter.as_deref();
    let pause = std::env::var_os("STORE_BENCH_PAUSE").is_some();
    let tmp = std::env::temp_dir().join(format!("weir-store-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;

    // weir-cp (the binary, durable data dir) and etcd, each pinned to core 0.
    let bin = std::env::var("WEIR_CP")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            let exe = std::env::current_exe().expect("exe");
            exe.parent()
                .and_then(|p| p.parent())
                .map(|p| p.join("weir-cp"))
                .expect("target dir")
        });
    let (xds_port, api_port) = (free_port(), free_port());
    let weir_cp = Guard(
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
            .arg(tmp.join("weir-cp"))
            .stdout(Stdio::null())
            .spawn()?,
    );
    let etcd = weir_control_plane::etcd::testing::EtcdProcess::start()
        .ok_or_else(|| anyhow::anyhow!("no etcd binary (apt-get install etcd-server)"))?;
    let _ = Command::new("taskset")
        .args(["-p", "-c", "0", &etcd.pid().to_string()])
        .stdout(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    let ch = loop {
        match tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{xds_port}"))?
            .connect()
            .await
        {
            Ok(ch) => break ch,
            Err(e) if Instant::now() > deadline => anyhow::bail!("weir-cp did not start: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let weir = Kv::Weir(KvClient::new(ch.clone()), ch);
    let etcd_client =
        etcd_client::Client::connect([format!("http://127.0.0.1:{}", etcd.port)], None).await?;
    let systems = [weir, Kv::Etcd(etcd_client)];
    if pause {
        eprintln!(
            "weir-cp pid {}, etcd pid {}; starting in 5 s",
            weir_cp.0.id(),
            etcd.pid()
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }

    println!("# KV: {ops} ops per row; servers pinned to core 0, client on the other");
    println!(
        "| op | value | conc | {} ops/s | p50 / p99 µs | {} ops/s | p50 / p99 µs | ratio |",
        systems[0].name(),
        systems[1].name()
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut counters = checkpoint_counters(api_port);
    for &size in &[256usize, 4096] {
        let value = Arc::new(vec![b'v'; size]);
        for &conc in &[1usize, 16] {
            let mut row = Vec::new();
            for kv in &systems {
                if !selected(filter, &format!("put/{size}/{conc}")) {
                    break;
                }
                let v = value.clone();
                row.push(
                    run(kv, ops, conc, move |mut kv, t, i| {
                        let v = v.clone();
                        async move { kv.put(format!("k{size}/{t}/{i}"), v.to_vec()).await }
                    })
                    .await?,
                );
                if let (Kv::Weir(..), Some(st)) = (kv, row.last()) {
                    report_row(&format!("put/{size}/{conc}"), st, api_port, &mut counters);
                }
            }
            print_row("put", size, conc, &row);
            let mut row = Vec::new();
            for kv in &systems {
                if !selected(filter, &format!("get/{size}/{conc}")) {
                    break;
                }
                if !selected(filter, &format!("put/{size}/{conc}")) {
                    // The keys the (skipped) put row would have written.
                    let v = value.clone();
                    run(kv, ops, conc, move |mut kv, t, i| {
                        let v = v.clone();
                        async move { kv.put(format!("k{size}/{t}/{i}"), v.to_vec()).await }
                    })
                    .await?;
                }
                row.push(
                    run(kv, ops, conc, move |mut kv, t, i| async move {
                        let n = kv.get(format!("k{size}/{t}/{i}")).await?;
                        anyhow::ensure!(n == 1, "missing key");
                        Ok(())
                    })
                    .await?,
                );
                if let (Kv::Weir(..), Some(st)) = (kv, row.last()) {
                    report_row(&format!("get/{size}/{conc}"), st, api_port, &mut counters);
                }
            }
            print_row("get", size, conc, &row);
        }
        let mut row = Vec::new();
        for kv in &systems {
            if !selected(filter, &format!("watch/{size}/1")) {
                break;
            }
            row.push(watch_bench(kv, ops.min(2000), &value).await?);
            if let (Kv::Weir(..), Some(st)) = (kv, row.last()) {
                report_row(&format!("watch/{size}/1"), st, api_port, &mut counters);
            }
        }
        print_row("watch", size, 1, &row);
    }
    drop(systems);
    drop(etcd);
    drop(weir_cp);
    if !selected(filter, "objects") {
        let _ = std::fs::remove_dir_all(&tmp);
        return Ok(());
    }

    // Objects vs raw disk.
    let mib = 1024 * 1024;
    let data = Bytes::from(
        (0..object_mib * mib)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8)
            .collect::<Vec<u8>>(),
    );
    let store = Arc::new(weir_control_plane::storage::Store::open(
        &tmp.join("objmeta"),
    )?);
    let objects = EmbeddedObjects::open(store, Some(&tmp.join("objects")))?;
    objects.create_bucket("bench").await?;
    let raw_path = tmp.join("raw.bin");
    println!(
        "\n# Objects: {object_mib} MiB in 1 MiB chunks, 3 rounds, best of each \
         (reads: {READS} raw / get pairs per round)"
    );
    println!("| op | embedded MiB/s | raw disk MiB/s | embedded / raw |");
    println!("|---|---|---|---|");
    let (mut put_best, mut get_best, mut wr_best, mut rd_best) = (0f64, 0f64, 0f64, 0f64);
    let rate = |d: Duration| object_mib as f64 / d.as_secs_f64();
    for _ in 0..3 {
        // Raw: write + fsync.
        let s = Instant::now();
        {
            let mut f = std::fs::File::create(&raw_path)?;
            for c in data.chunks(mib) {
                f.write_all(c)?;
            }
            f.sync_all()?;
        }
        wr_best = wr_best.max(rate(s.elapsed()));
        let s = Instant::now();
        objects
            .put_object(
                "bench",
                "obj",
                PutOptions::default(),
                body(data.clone(), mib),
            )
            .await?;
        put_best = put_best.max(rate(s.elapsed()));
        // Reads: both files were just written, so both come from the page cache; one read of
        // 64 MiB takes a few ms, where a single scheduling hiccup moves the rate by 10-20 %,
        // so each round times READS raw reads and gets, alternating.
        for _ in 0..READS {
            let s = Instant::now();
            {
                use std::io::Read as _;
                let mut f = std::fs::File::open(&raw_path)?;
                let mut buf = vec![0u8; mib];
                let mut total = 0usize;
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    total += n;
                }
                anyhow::ensure!(total == data.len());
            }
            rd_best = rd_best.max(rate(s.elapsed()));
            let s = Instant::now();
            let (_, _, mut stream) = objects.get_object("bench", "obj", None).await?;
            let mut total = 0usize;
            while let Some(c) = stream.next().await {
                total += c?.len();
            }
            anyhow::ensure!(total == data.len());
            get_best = get_best.max(rate(s.elapsed()));
        }
        std::fs::remove_file(&raw_path)?;
    }
    println!(
        "| put (durable) | {put_best:.0} | {wr_best:.0} | {:.2} |",
        put_best / wr_best
    );
    println!(
        "| get | {get_best:.0} | {rd_best:.0} | {:.2} |",
        get_best / rd_best
    );
    drop(objects);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

fn print_row(op: &str, size: usize, conc: usize, row: &[Stats]) {
    let [a, b] = row else { return };
    println!(
        "| {op} | {size} B | {conc} | {:.0} | {:.0} / {:.0} | {:.0} | {:.0} / {:.0} | {:.2} |",
        a.ops_per_s,
        a.p50_us,
        a.p99_us,
        b.ops_per_s,
        b.p50_us,
        b.p99_us,
        a.ops_per_s / b.ops_per_s
    );
}
