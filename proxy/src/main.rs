//! The `weir` binary: parse flags, load and validate the bootstrap, run until SIGTERM.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use weir_proxy::cli::{Mode, Options};

fn main() -> std::process::ExitCode {
    let opts = Options::parse();
    init_logging(&opts.log_level);
    match run(opts) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weir: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(level: &str) {
    let level = match level {
        "critical" => "error",
        "warning" => "warn",
        l => l,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{level},h2=warn,hyper=warn"))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn run(opts: Options) -> anyhow::Result<std::process::ExitCode> {
    let bootstrap = weir_proxy::config::load(&opts);
    let snapshot = match bootstrap {
        Ok(s) => s,
        Err(e) => {
            eprintln!("invalid config:\n{e}");
            return Ok(std::process::ExitCode::FAILURE);
        }
    };
    if opts.mode == Mode::Validate {
        println!(
            "configuration '{}' OK",
            opts.config_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("weir-main")
        .enable_all()
        .build()
        .context("starting main runtime")?;
    rt.block_on(async move {
        let server = weir_proxy::server::start(opts, snapshot).await?;
        let state = server.state.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot install SIGTERM handler");
                        return;
                    }
                };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: draining"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
            }
            state.request_shutdown();
        });
        server.wait().await;
        anyhow::Ok(())
    })?;
    Ok(std::process::ExitCode::SUCCESS)
}
