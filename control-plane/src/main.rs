//! `weir-cp`: the weir control plane CLI. A thin layer over [`weir_control_plane`].

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

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
enum Command {
    /// Run the control plane (gRPC: health now; xDS, registry, KV, objects to come).
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address of the gRPC (xDS) server; port 0 picks a free port (the bound one is logged).
    #[arg(long = "xds-address", default_value = "127.0.0.1:18000")]
    xds_address: SocketAddr,
    /// Directory for the embedded store (created if missing).
    #[arg(long = "data-dir")]
    data_dir: Option<PathBuf>,
    /// Control plane config file (must be readable; its contents are not interpreted yet).
    #[arg(long)]
    config: Option<PathBuf>,
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
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
    if let Some(dir) = &args.data_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating data dir {}", dir.display()))?;
    }
    if let Some(path) = &args.config {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        tracing::warn!(config = %path.display(), "config file contents are not used yet");
    }
    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(args.xds_address)
        .await
        .with_context(|| format!("binding --xds-address {}", args.xds_address))?;
    let address = listener
        .local_addr()
        .context("reading the bound gRPC address")?;
    tracing::info!(%address, "weir-cp gRPC server listening");
    weir_control_plane::serve(listener, shutdown).await?;
    tracing::info!("weir-cp stopped");
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
