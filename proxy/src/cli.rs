//! Command-line flags, named as Envoy's.

use clap::{Parser, ValueEnum};

/// weir: an Envoy-config L4/L7 proxy.
#[derive(Debug, Clone, Parser)]
#[command(name = "weir", version, about)]
pub struct Options {
    /// Bootstrap config file (Envoy v3 YAML or JSON).
    #[arg(short = 'c', long = "config-path")]
    pub config_path: Option<std::path::PathBuf>,
    /// Bootstrap config inline (YAML or JSON); merged over --config-path when both are given.
    #[arg(long = "config-yaml")]
    pub config_yaml: Option<String>,
    /// `serve` runs the proxy; `validate` checks the config and exits.
    #[arg(long, value_enum, default_value_t = Mode::Serve)]
    pub mode: Mode,
    /// Worker threads (default: available cores).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Log level: trace, debug, info, warn, error, critical, off.
    #[arg(short = 'l', long = "log-level", default_value = "info")]
    pub log_level: String,
    /// Node id (overrides `node.id`).
    #[arg(long = "service-node")]
    pub service_node: Option<String>,
    /// Node cluster (overrides `node.cluster`).
    #[arg(long = "service-cluster")]
    pub service_cluster: Option<String>,
    /// Seconds to drain connections on shutdown or /drain_listeners.
    #[arg(long = "drain-time-s", default_value_t = 600)]
    pub drain_time_s: u64,
    /// Hot restart epoch: 0 starts fresh; N takes the listening sockets of the running epoch
    /// N-1 over its hot-restart socket and tells it to drain (see `hot_restart`).
    #[arg(long = "restart-epoch", default_value_t = 0)]
    pub restart_epoch: u32,
    /// Hot restart base id: the hot-restart socket name derives from it and the epoch, so
    /// several weir instances on one host need distinct base ids.
    #[arg(long = "base-id", default_value_t = 0)]
    pub base_id: u64,
    /// Directory of the hot-restart sockets (default: `$XDG_RUNTIME_DIR`, else `/tmp`).
    #[arg(long = "hot-restart-socket-dir")]
    pub hot_restart_socket_dir: Option<std::path::PathBuf>,
    /// Upper bound on the old process's drain in a hot restart: it exits at most this many
    /// seconds after the new one told it to drain (and sooner when its connections are gone
    /// or its own `--drain-time-s` is over).
    #[arg(long = "parent-shutdown-time-s", default_value_t = 900)]
    pub parent_shutdown_time_s: u64,
    /// Do not listen on the hot-restart socket and do not contact a parent.
    #[arg(long = "disable-hot-restart")]
    pub disable_hot_restart: bool,
    /// Once draining starts for any reason (SIGTERM, `/quitquitquit`, `/drain_listeners`,
    /// a hot restart), exit as soon as no downstream connection is left (Istio's
    /// `EXIT_ON_ZERO_ACTIVE_CONNECTIONS`), still bounded by `--drain-time-s`.
    #[arg(long = "exit-on-zero-active-connections")]
    pub exit_on_zero_active_connections: bool,
}

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Run the proxy.
    Serve,
    /// Validate the config and exit.
    Validate,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            config_path: None,
            config_yaml: None,
            mode: Mode::Serve,
            concurrency: None,
            log_level: "info".into(),
            service_node: None,
            service_cluster: None,
            drain_time_s: 600,
            restart_epoch: 0,
            base_id: 0,
            hot_restart_socket_dir: None,
            parent_shutdown_time_s: 900,
            disable_hot_restart: false,
            exit_on_zero_active_connections: false,
        }
    }
}
