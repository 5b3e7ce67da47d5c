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
        }
    }
}
