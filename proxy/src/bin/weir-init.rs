//! `weir-init`: install (default), remove (`--cleanup`) or print (`--dry-run`) the iptables
//! rules that send a pod's TCP traffic through its weir sidecar. Rules and semantics:
//! [`weir_proxy::init`].
#![forbid(unsafe_code)]

use clap::Parser;
use weir_proxy::init::apply::{self, InitError, System};
use weir_proxy::init::{self, Config, ConfigError, Family};

/// Install the iptables rules that redirect a pod's TCP traffic to its weir sidecar
/// (outbound to 15001, inbound to 15006), or remove them.
#[derive(Debug, Parser)]
#[command(name = "weir-init", version, about)]
struct Args {
    /// `apply` (default) installs the rules; `cleanup` removes them (same as --cleanup).
    #[arg(value_parser = ["apply", "cleanup"])]
    action: Option<String>,
    /// Remove every rule and chain weir-init added (idempotent).
    #[arg(long)]
    cleanup: bool,
    /// Print the iptables-restore input (or the cleanup commands) and change nothing.
    #[arg(long = "dry-run")]
    dry_run: bool,
    /// Port of weir's virtual outbound listener.
    #[arg(long = "outbound-port", default_value_t = init::OUTBOUND_CAPTURE_PORT)]
    outbound_port: u16,
    /// Port of weir's inbound listener.
    #[arg(long = "inbound-port", default_value_t = init::INBOUND_CAPTURE_PORT)]
    inbound_port: u16,
    /// uid(s) of the proxy, whose traffic is never redirected (comma-separated).
    #[arg(long = "proxy-uid", value_delimiter = ',', default_value = "1337")]
    proxy_uid: Vec<u32>,
    /// gid(s) of the proxy, whose traffic is never redirected (default: the uids).
    #[arg(long = "proxy-gid", value_delimiter = ',')]
    proxy_gid: Option<Vec<u32>>,
    /// Outbound destinations to redirect: `*` or comma-separated CIDRs.
    #[arg(long = "include-outbound-cidrs", default_value = "*")]
    include_outbound_cidrs: String,
    /// Outbound destinations never redirected (comma-separated CIDRs).
    #[arg(long = "exclude-outbound-cidrs", default_value = "")]
    exclude_outbound_cidrs: String,
    /// Outbound destination ports never redirected (comma-separated).
    #[arg(long = "exclude-outbound-ports", default_value = "")]
    exclude_outbound_ports: String,
    /// Inbound ports to redirect: `*`, comma-separated ports, or empty for none.
    #[arg(long = "include-inbound-ports", default_value = "*")]
    include_inbound_ports: String,
    /// Inbound ports never redirected (comma-separated).
    #[arg(
        long = "exclude-inbound-ports",
        default_value = "15000,15020,15021,15090"
    )]
    exclude_inbound_ports: String,
    /// Also program ip6tables.
    #[arg(long)]
    ipv6: bool,
}

impl Args {
    fn config(&self) -> Result<Config, ConfigError> {
        let cfg = Config {
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            proxy_uids: self.proxy_uid.clone(),
            proxy_gids: self
                .proxy_gid
                .clone()
                .unwrap_or_else(|| self.proxy_uid.clone()),
            include_outbound_cidrs: self.include_outbound_cidrs.parse()?,
            exclude_outbound_cidrs: init::parse_cidrs(&self.exclude_outbound_cidrs)?,
            exclude_outbound_ports: init::parse_ports(
                "--exclude-outbound-ports",
                &self.exclude_outbound_ports,
            )?,
            include_inbound_ports: init::parse_port_set(
                "--include-inbound-ports",
                &self.include_inbound_ports,
            )?,
            exclude_inbound_ports: init::parse_ports(
                "--exclude-inbound-ports",
                &self.exclude_inbound_ports,
            )?,
            ipv6: self.ipv6,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn cleanup(&self) -> bool {
        self.cleanup || self.action.as_deref() == Some("cleanup")
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir-init: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), InitError> {
    let cfg = args.config()?;
    let families: Vec<Family> = cfg.families();
    let mut exec = System;
    match (args.cleanup(), args.dry_run) {
        (true, true) => print!("{}", apply::cleanup_commands(&families)),
        (true, false) => {
            apply::cleanup(&mut exec, &families)?;
            eprintln!("weir-init: rules removed");
        }
        (false, true) => {
            let plan = apply::plan_apply(&mut exec, &cfg, true)?;
            print!("{}", apply::render_plan(&plan));
        }
        (false, false) => {
            apply::apply(&mut exec, &cfg)?;
            eprintln!(
                "weir-init: outbound TCP -> {}, inbound TCP -> {} ({})",
                cfg.outbound_port,
                cfg.inbound_port,
                families
                    .iter()
                    .map(|f| f.command())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(())
}
