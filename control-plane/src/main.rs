//! `weir-cp`: the weir control plane CLI. A thin layer over [`weir_control_plane`]:
//! `serve` runs the server; `config …` and `status` are clients of its config API
//! (`--server`, the `--api-address` of `serve`); `kv …` and `registry …` are gRPC clients of
//! the KV store and the registry (`--server`, the `--xds-address` of `serve`).

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weir_control_plane::api::Client;
use weir_control_plane::operator::Target;

/// Default `--api-address` of `serve` and `--server` of the clients.
const DEFAULT_API: &str = "127.0.0.1:18001";

/// weir-cp: the weir control plane (xDS, registry, KV, objects).
#[derive(Debug, Parser)]
#[command(name = "weir-cp", version, about)]
struct Cli {
    /// Log level (trace, debug, info, warn, error); `RUST_LOG` overrides it.
    #[arg(long = "log-level", global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
enum Command {
    /// Run the control plane: xDS (ADS) on --xds-address, config API and /metrics on
    /// --api-address.
    Serve(ServeArgs),
    /// Apply, show, list and roll back the xDS config.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// List connected proxies with their ACKed version per type, and recorded NACKs.
    Status(StatusArgs),
    /// The KV store: get, put, del, list, watch, lease (over gRPC, `--server` = the
    /// --xds-address of serve).
    Kv(weir_control_plane::kv::cli::KvArgs),
    /// The service registry: register, deregister, heartbeat, list, services, watch (gRPC
    /// to --server, the xDS address).
    #[command(subcommand)]
    Registry(weir_control_plane::registry::cli::Command),
    /// The object store: mb, rb, ls, put, get, rm (gRPC to --server, the xDS address).
    Objects(weir_control_plane::objects::cli::ObjectsArgs),
    /// The mesh CA: `ca bundle` prints the trust bundle (PEM) proxies are given as ROOTCA.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Print the mesh CA's trust bundle (PEM).
    Bundle(CaArgs),
}

#[derive(Debug, clap::Args)]
struct CaArgs {
    #[command(flatten)]
    server: ServerArg,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address of the gRPC (xDS) server; port 0 picks a free port (the bound one is logged).
    #[arg(long = "xds-address", default_value = "127.0.0.1:18000")]
    xds_address: SocketAddr,
    /// Address of the config API and /metrics (HTTP); port 0 picks a free port (logged as
    /// `api_address=`).
    #[arg(long = "api-address", default_value = DEFAULT_API)]
    api_address: SocketAddr,
    /// Directory for the embedded store (created if missing). Without it, config lives in
    /// memory and is lost on exit.
    #[arg(long = "data-dir")]
    data_dir: Option<PathBuf>,
    /// Keep the registry, KV and config in etcd instead:
    /// `etcd://host:port[,host:port...][/prefix]` (prefix default `/weir`). Replicas on the
    /// same etcd and prefix share one state. Conflicts with --data-dir.
    #[arg(long = "store", conflicts_with = "data_dir")]
    store: Option<String>,
    /// Keep objects in an S3-compatible store instead:
    /// `s3://bucket[/prefix][?endpoint=URL&region=R]` (credentials from the --config file's
    /// `objects_backend` or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). Replicas on the same
    /// bucket and prefix share the objects.
    #[arg(long = "objects")]
    objects: Option<String>,
    /// Compact the KV history automatically, like etcd's --auto-compaction-retention: a
    /// number keeps that many revisions (checked every 5 minutes), a duration (`1h`, `30m`)
    /// keeps that much history. Off by default.
    #[arg(long = "kv-auto-compaction-retention")]
    kv_auto_compaction_retention: Option<weir_control_plane::kv::compaction::Retention>,
    /// weir-cp's config file (YAML): API auth (tokens, client-certificate rules, TLS) and
    /// S3 access keys (see `weir_control_plane::settings`, docs/design/auth.md). Without auth
    /// credentials weir-cp runs open, and only on loopback addresses.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Watch this directory and apply its xDS files when they change (GitOps): `DIR/*.yaml`
    /// for every node, `DIR/node-cluster/NAME/*.yaml`, `DIR/node/ID/*.yaml`.
    #[arg(long = "config-dir")]
    config_dir: Option<PathBuf>,
    /// How often --config-dir is polled (e.g. `2s`, `500ms`).
    #[arg(long = "config-dir-interval", default_value = "2s", value_parser = parse_duration)]
    config_dir_interval: Duration,
    /// Serve the S3-compatible object API (path-style, SigV4 with the --config file's
    /// `s3.access_keys`) here; port 0 picks a free port (logged as `s3_address=`).
    #[arg(long = "s3-address")]
    s3_address: Option<SocketAddr>,
    /// Serve the Kubernetes sidecar injection webhook (`POST /inject`, HTTPS with the
    /// --config file's `inject.tls`) here; port 0 picks a free port (logged as
    /// `webhook_address=`). Needs the `inject:` settings block.
    #[arg(long = "webhook-address")]
    webhook_address: Option<SocketAddr>,
}

#[derive(Debug, clap::Args)]
struct ServerArg {
    /// The weir-cp config API address (`serve --api-address`).
    #[arg(long, default_value = DEFAULT_API)]
    server: String,
    #[command(flatten)]
    auth: weir_control_plane::auth::client::ClientAuthArgs,
}

impl ServerArg {
    fn client(&self) -> anyhow::Result<Client> {
        self.auth.api_client(&self.server)
    }
}

#[derive(Debug, clap::Args)]
struct TargetArgs {
    /// Apply to / show the nodes of this node cluster (`node.cluster`) only.
    #[arg(long = "node-cluster", conflicts_with = "node_id")]
    node_cluster: Option<String>,
    /// Apply to / show this node (`node.id`) only.
    #[arg(long = "node-id")]
    node_id: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate FILE (an xDS DiscoveryResponse in YAML or JSON, as Envoy's filesystem config)
    /// and apply it as a new version, replacing the target's config.
    Apply {
        /// The file (`-` for standard input).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Print the config in force (with a target: that document alone, re-appliable).
    Get {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List every applied version.
    History {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Re-apply VERSION's config as a new version and push it.
    Rollback {
        /// The version to go back to.
        version: u64,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArg,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(format!("{s:?}: use ms, s or m")),
    };
    if d.is_zero() {
        return Err("the interval must be positive".into());
    }
    Ok(d)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => rt.block_on(serve(args)),
        Command::Config(c) => rt.block_on(config(c)),
        Command::Status(s) => rt.block_on(status(s)),
        Command::Ca(CaCommand::Bundle(a)) => rt.block_on(async move {
            print!("{}", a.server.client()?.ca_bundle().await?);
            Ok(())
        }),
        Command::Kv(k) => rt.block_on(weir_control_plane::kv::cli::run(k)),
        Command::Registry(c) => rt.block_on(weir_control_plane::registry::cli::run(c)),
        Command::Objects(o) => rt.block_on(weir_control_plane::objects::cli::run(o)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The `--objects s3://…` backend, checked by listing its bucket registry.
async fn open_objects(
    url: &str,
    settings: &weir_control_plane::settings::Settings,
) -> anyhow::Result<Arc<dyn weir_control_plane::objects::ObjectBackend>> {
    use weir_control_plane::objects::{ObjectsUrl, RemoteObjects};
    let parsed: ObjectsUrl = url.parse()?;
    let backend = RemoteObjects::s3(&parsed, settings.objects_backend.as_ref())
        .with_context(|| format!("--objects {url}"))?;
    backend
        .probe()
        .await
        .with_context(|| format!("reaching --objects {url}"))?;
    tracing::info!(bucket = %parsed.bucket, prefix = %parsed.prefix, "objects in an S3-compatible store");
    Ok(Arc::new(backend))
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let settings = match &args.config {
        Some(path) => weir_control_plane::settings::Settings::load(path)?,
        None => Default::default(),
    };
    if let Some(dir) = &args.config_dir
        && !dir.is_dir()
    {
        anyhow::bail!("--config-dir {} is not a directory", dir.display());
    }
    let remote_objects = match &args.objects {
        Some(url) => Some(open_objects(url, &settings).await?),
        None => None,
    };
    let cp = match &args.store {
        Some(url) => weir_control_plane::ControlPlane::open_stores(None, Some(url), remote_objects)
            .with_context(|| format!("opening --store {url}"))?,
        None => weir_control_plane::ControlPlane::open_stores(
            args.data_dir.as_deref(),
            None,
            remote_objects,
        )
        .context("opening the data dir")?,
    };
    if let Some(r) = args.kv_auto_compaction_retention {
        weir_control_plane::kv::compaction::spawn(
            Arc::downgrade(&cp.kv),
            r,
            None,
            tokio_util::sync::CancellationToken::new(),
        );
    }
    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(args.xds_address)
        .await
        .with_context(|| format!("binding --xds-address {}", args.xds_address))?;
    let api = tokio::net::TcpListener::bind(args.api_address)
        .await
        .with_context(|| format!("binding --api-address {}", args.api_address))?;
    let api_address = api.local_addr().context("reading the bound API address")?;
    let address = listener
        .local_addr()
        .context("reading the bound gRPC address")?;
    // Refuse before announcing anything (run() checks again; this is for a clean log).
    let authn = weir_control_plane::auth::Authenticator::from_settings(&settings.auth)?;
    weir_control_plane::auth::open_mode(!authn.is_open(), &[address, api_address])?;
    tracing::info!(%api_address, "weir-cp config API and /metrics listening");
    tracing::info!(
        config_version = cp.operator.latest_version(),
        "weir-cp loaded its config"
    );
    tracing::info!(%address, "weir-cp gRPC server listening");
    let s3 = match args.s3_address {
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding --s3-address {a}"))?;
            let s3_address = l.local_addr().context("reading the bound S3 address")?;
            if settings.s3.access_keys.is_empty() {
                tracing::warn!(
                    "the S3 endpoint has no access keys (s3.access_keys in --config): every request is refused"
                );
            }
            tracing::info!(%s3_address, "weir-cp S3 endpoint listening");
            Some(l)
        }
        None => None,
    };
    // The sidecar injector runs beside `run` and stops with it.
    let stop_webhook = tokio_util::sync::CancellationToken::new();
    let shutdown = {
        let stop = stop_webhook.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    };
    let webhook = match args.webhook_address {
        Some(a) => {
            let inject = settings.inject.clone().context(
                "--webhook-address needs an `inject:` block (tls, proxy_image, xds_address) in the --config file",
            )?;
            let tls = weir_control_plane::inject::server::acceptor(&inject.tls)?;
            let injector = Arc::new(weir_control_plane::inject::Injector::new(inject)?);
            cp.metrics.add_collector(injector.metrics.clone());
            let l = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding --webhook-address {a}"))?;
            let webhook_address = l
                .local_addr()
                .context("reading the bound webhook address")?;
            tracing::info!(%webhook_address, "weir-cp sidecar injection webhook listening (HTTPS)");
            Some(tokio::spawn(weir_control_plane::inject::server::serve(
                injector,
                l,
                tls,
                stop_webhook.clone(),
            )))
        }
        None => None,
    };
    let opts = weir_control_plane::RunOptions {
        api: Some(api),
        config_dir: args.config_dir.map(|d| (d, args.config_dir_interval)),
        settings,
        s3,
    };
    let result = weir_control_plane::run(cp, listener, opts, shutdown).await;
    stop_webhook.cancel();
    if let Some(w) = webhook {
        let _ = w.await;
    }
    result?;
    tracing::info!("weir-cp stopped");
    Ok(())
}

fn target_of(t: &TargetArgs) -> anyhow::Result<Target> {
    Ok(Target::from_options(
        t.node_cluster.as_deref(),
        t.node_id.as_deref(),
    )?)
}

fn fmt_time(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    httpdate_like(t)
}

/// `YYYY-MM-DDTHH:MM:SSZ` without a date crate.
fn httpdate_like(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

async fn config(c: ConfigCommand) -> anyhow::Result<()> {
    match c {
        ConfigCommand::Apply {
            file,
            target,
            server,
        } => {
            let target = target_of(&target)?;
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading standard input")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let info = server.client()?.apply(&target, text).await?;
            println!(
                "applied version {} to {} ({} resources)",
                info.version,
                info.target,
                info.resources.len()
            );
        }
        ConfigCommand::Get { target, server } => {
            let filter = match (&target.node_cluster, &target.node_id) {
                (None, None) => None,
                _ => Some(target_of(&target)?),
            };
            let v = server.client()?.get(filter.as_ref()).await?;
            let out = match &filter {
                Some(t) => v["targets"]
                    .as_array()
                    .and_then(|a| a.first())
                    .map(|d| d["document"].clone())
                    .ok_or_else(|| anyhow::anyhow!("no config applied to {t}"))?,
                None => v,
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        ConfigCommand::History { json, server } => {
            let h = server.client()?.history().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&h)?);
            } else {
                println!(
                    "{:<8} {:<24} {:<21} {:<14} RESOURCES",
                    "VERSION", "TARGET", "APPLIED", "ORIGIN"
                );
                for v in h {
                    let res: Vec<String> = v
                        .resources
                        .iter()
                        .map(|r| format!("{}/{}", r.kind, r.name))
                        .collect();
                    println!(
                        "{:<8} {:<24} {:<21} {:<14} {}",
                        v.version,
                        v.target.to_string(),
                        fmt_time(v.applied_at_ms),
                        v.origin,
                        res.join(",")
                    );
                }
            }
        }
        ConfigCommand::Rollback { version, server } => {
            let info = server.client()?.rollback(version).await?;
            println!(
                "rolled back to version {version}: applied as version {} to {}",
                info.version, info.target
            );
        }
    }
    Ok(())
}

async fn status(s: StatusArgs) -> anyhow::Result<()> {
    let st = s.server.client()?.status().await?;
    if s.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(());
    }
    println!("config version: {}", st.config_version);
    println!("connected proxies: {}", st.report.proxies.len());
    for p in &st.report.proxies {
        println!(
            "- node {:?} cluster {:?} ({}, {}, since {})",
            p.node_id,
            p.node_cluster,
            p.protocol,
            p.peer.as_deref().unwrap_or("-"),
            fmt_time(p.connected_at_ms)
        );
        for (t, ts) in &p.types {
            println!(
                "    {t}: acked {} sent {}{}",
                ts.acked_version.as_deref().unwrap_or("-"),
                ts.sent_version.as_deref().unwrap_or("-"),
                ts.last_nack
                    .as_ref()
                    .map(|n| format!(" last NACK of {}: {}", n.version, n.message))
                    .unwrap_or_default()
            );
        }
    }
    if !st.report.nacks.is_empty() {
        println!("NACKs:");
        for (node, types) in &st.report.nacks {
            for (t, n) in types {
                println!(
                    "- node {node:?} {t} version {} at {}: {}",
                    n.version,
                    fmt_time(n.at_ms),
                    n.message
                );
            }
        }
    }
    Ok(())
}

/// A future completing on SIGTERM or SIGINT. The handlers are installed before this returns,
/// so a signal sent right after the bound address is logged is not lost.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_dates() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("2h").is_err());
        assert_eq!(fmt_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_time(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(fmt_time(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }
}
