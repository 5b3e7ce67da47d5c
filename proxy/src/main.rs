//! The `weir` binary: parse flags, load and validate the bootstrap, run until SIGTERM.
//!
//! Hot restart (unless `--disable-hot-restart`): before starting, an epoch N > 0 takes its
//! parent's sockets (`weir_proxy::hot_restart::take_over`); once serving, it listens on its
//! own hot-restart socket for the next epoch and tells the parent to drain.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::Parser;
use weir_proxy::cli::{Mode, Options};
use weir_proxy::hot_restart;

/// mimalloc instead of glibc's malloc: the request path allocates many small, short-lived
/// buffers (header maps, log lines, spans), and glibc's `malloc`/`free` were ~9 % of the
/// proxy's CPU in profiles. Envoy links tcmalloc for the same reason. (The library crate and
/// its in-process tests keep the system allocator.)
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let hot_restart = !opts.disable_hot_restart;
    // Blocking exchange with the parent, before any runtime runs (bounded by its timeouts).
    let (inherited, parent) = if hot_restart {
        hot_restart::take_over(&opts, snapshot.admin_address)
    } else {
        (hot_restart::Inherited::default(), None)
    };
    let socket = hot_restart.then(|| hot_restart::socket_path(&opts, opts.restart_epoch));
    let parent_shutdown_time_s = opts.parent_shutdown_time_s;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("weir-main")
        .enable_all()
        .build()
        .context("starting main runtime")?;
    rt.block_on(async move {
        let server = weir_proxy::server::start_with(opts, snapshot, inherited).await?;
        let state = server.state.clone();
        // Listen for the next epoch, then let the parent go.
        if let Some(path) = &socket {
            match hot_restart::listen(path) {
                Ok(l) => {
                    let _ = state.hot_restart_socket.set(path.clone());
                    tracing::info!(socket = %path.display(), "hot restart: listening for the next epoch");
                    tokio::spawn(hot_restart::serve(l, path.clone(), state.clone()));
                }
                Err(e) => tracing::warn!(error = %e, "hot restart disabled for this process"),
            }
        }
        if let Some(parent) = parent {
            let pid = parent.pid();
            let stats = state.stats.clone();
            tokio::task::spawn_blocking(move || {
                match parent.drain(parent_shutdown_time_s) {
                    Ok(n) => tracing::info!(
                        parent_pid = pid,
                        parent_active_connections = n,
                        "hot restart: parent draining"
                    ),
                    Err(e) => {
                        tracing::warn!(parent_pid = pid, error = %e, "hot restart: parent did not acknowledge the drain; it keeps serving");
                        return;
                    }
                }
                // The parent's counters continue in this process (until it exits).
                match parent.merge_stats(&stats) {
                    Ok(series) => tracing::info!(
                        parent_pid = pid,
                        series,
                        "hot restart: merged the parent's final counters"
                    ),
                    Err(e) => tracing::warn!(parent_pid = pid, error = %e, "hot restart: the parent's counters stopped before its final snapshot"),
                }
            });
        }
        let sig = server.state.clone();
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
            sig.request_shutdown();
        });
        server.wait().await;
        // A hot-restart child streaming our counters gets the final snapshot now (the
        // session thread sends it within moments; the runtime shutdown below waits for it).
        state.exiting.cancel();
        if let Some(path) = state_socket(&state) {
            hot_restart::remove_socket(&path);
        }
        anyhow::Ok(())
    })?;
    // Do not wait for blocking tasks (e.g. a hot-restart session with a child that keeps
    // its connection open) beyond a moment.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(std::process::ExitCode::SUCCESS)
}

/// The hot-restart socket this process listens on, if any.
fn state_socket(
    state: &std::sync::Arc<weir_proxy::server::ServerState>,
) -> Option<std::path::PathBuf> {
    state.hot_restart_socket.get().cloned()
}
