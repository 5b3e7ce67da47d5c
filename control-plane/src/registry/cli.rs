//! `weir-cp registry …`: a gRPC client of the Registry service on `--server` (the xDS
//! address of `serve`). Text output for people, `--output json` (one JSON document; for
//! `watch` one JSON object per event line) for scripts.

use std::time::Duration;

use serde_json::{Value, json};

use super::pb;
use crate::auth::client::AuthChannel;
use pb::registry_client::RegistryClient;

/// Default `--server`: the default `serve --xds-address`.
pub const DEFAULT_SERVER: &str = "127.0.0.1:18000";

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human-readable text.
    Text,
    /// JSON.
    Json,
}

/// Options every registry subcommand takes.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// The weir-cp gRPC address (`serve --xds-address`), `host:port` or a URL.
    #[arg(long, default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Credentials and TLS.
    #[command(flatten)]
    pub auth: crate::auth::client::ClientAuthArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// `weir-cp registry` subcommands.
#[derive(Debug, clap::Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Register (or update) an instance.
    Register {
        /// Service name (also the EDS cluster name).
        service: String,
        /// Instance id, unique within the service.
        id: String,
        /// IP:PORT of the instance.
        addr: std::net::SocketAddr,
        /// Load balancing weight (1-65535).
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Locality region.
        #[arg(long)]
        region: Option<String>,
        /// Locality zone.
        #[arg(long)]
        zone: Option<String>,
        /// Locality sub-zone.
        #[arg(long = "sub-zone")]
        sub_zone: Option<String>,
        /// Heartbeat TTL (e.g. 10s); the instance must heartbeat within it.
        #[arg(long, value_parser = parse_duration, conflicts_with_all = ["http_check", "tcp_check", "grpc_check"])]
        ttl: Option<Duration>,
        /// weir-cp checks the instance with HTTP GET PATH (2xx passes).
        #[arg(long = "http-check", value_name = "PATH", conflicts_with_all = ["tcp_check", "grpc_check"])]
        http_check: Option<String>,
        /// weir-cp checks the instance with a TCP connect.
        #[arg(long = "tcp-check", conflicts_with = "grpc_check")]
        tcp_check: bool,
        /// weir-cp checks the instance with grpc.health.v1 for SERVICE ("" for the server).
        #[arg(long = "grpc-check", value_name = "SERVICE")]
        grpc_check: Option<String>,
        /// Check interval (default 10s).
        #[arg(long, value_parser = parse_duration)]
        interval: Option<Duration>,
        /// Check timeout (default min(interval, 5s)).
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
        /// Deregister the instance after it has been unhealthy this long.
        #[arg(long = "deregister-after", value_parser = parse_duration)]
        deregister_after: Option<Duration>,
        /// Metadata entry KEY=VALUE (repeatable).
        #[arg(long = "meta", value_parser = parse_kv)]
        meta: Vec<(String, String)>,
        /// Tag (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Deregister an instance.
    Deregister {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
        #[command(flatten)]
        common: Common,
    },
    /// Renew a TTL instance's lease.
    Heartbeat {
        /// Service name.
        service: String,
        /// Instance id.
        id: String,
        /// Report the instance unhealthy (keeps the lease alive).
        #[arg(long)]
        unhealthy: bool,
        /// A note stored with the status.
        #[arg(long, default_value = "")]
        note: String,
        #[command(flatten)]
        common: Common,
    },
    /// List instances (healthy ones unless --all).
    List {
        /// Only this service.
        service: Option<String>,
        /// Include unhealthy and not-yet-checked instances.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Service names with instance counts.
    Services {
        #[command(flatten)]
        common: Common,
    },
    /// Stream changes (until interrupted).
    Watch {
        /// Only this service.
        service: Option<String>,
        /// Replay changes from this revision first.
        #[arg(long = "rev")]
        rev: Option<u64>,
        #[command(flatten)]
        common: Common,
    },
}

/// Parse `10s`, `500ms`, `2m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
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
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("{s:?}: use ms, s, m or h")),
    };
    if d.is_zero() {
        return Err("the duration must be positive".into());
    }
    Ok(d)
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

async fn client(common: &Common) -> anyhow::Result<RegistryClient<AuthChannel>> {
    Ok(RegistryClient::new(
        common.auth.grpc_channel(&common.server).await?,
    ))
}

fn status_err(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

fn health_name(s: pb::HealthStatus) -> &'static str {
    match s {
        pb::HealthStatus::Unknown => "unknown",
        pb::HealthStatus::Healthy => "healthy",
        pb::HealthStatus::Unhealthy => "unhealthy",
    }
}

fn event_name(t: pb::EventType) -> &'static str {
    match t {
        pb::EventType::Unspecified => "unspecified",
        pb::EventType::Registered => "registered",
        pb::EventType::Updated => "updated",
        pb::EventType::Deregistered => "deregistered",
        pb::EventType::HealthChanged => "health_changed",
    }
}

/// An instance as JSON (stable field names, snake_case, as in the proto).
pub fn instance_json(i: &pb::Instance) -> Value {
    let health = match i.health.as_ref().and_then(|h| h.kind.as_ref()) {
        None => json!({"kind": "static"}),
        Some(pb::health_spec::Kind::TtlMs(ms)) => json!({"kind": "ttl", "ttl_ms": ms}),
        Some(pb::health_spec::Kind::Check(c)) => {
            let (kind, target) = match &c.kind {
                Some(pb::check_spec::Kind::Http(h)) => ("http", h.path.clone()),
                Some(pb::check_spec::Kind::Tcp(_)) => ("tcp", String::new()),
                Some(pb::check_spec::Kind::Grpc(g)) => ("grpc", g.service.clone()),
                None => ("none", String::new()),
            };
            json!({"kind": kind, "target": target, "interval_ms": c.interval_ms,
                   "timeout_ms": c.timeout_ms, "healthy_threshold": c.healthy_threshold,
                   "unhealthy_threshold": c.unhealthy_threshold})
        }
    };
    let mut health = health;
    if let Some(h) = &i.health
        && h.deregister_critical_after_ms > 0
    {
        health["deregister_critical_after_ms"] = json!(h.deregister_critical_after_ms);
    }
    let l = i.locality.clone().unwrap_or_default();
    json!({
        "service": i.service,
        "instance_id": i.instance_id,
        "address": i.address,
        "port": i.port,
        "weight": i.weight,
        "locality": {"region": l.region, "zone": l.zone, "sub_zone": l.sub_zone},
        "metadata": i.metadata,
        "tags": i.tags,
        "health": health,
        "status": health_name(i.status()),
        "status_note": i.status_note,
        "create_revision": i.create_revision,
        "mod_revision": i.mod_revision,
        "registered_at_ms": i.registered_at_ms,
        "status_changed_at_ms": i.status_changed_at_ms,
    })
}

fn event_json(e: &pb::Event) -> Value {
    json!({
        "type": event_name(e.r#type()),
        "revision": e.revision,
        "instance": e.instance.as_ref().map(instance_json),
        "previous_status": (e.r#type() == pb::EventType::HealthChanged)
            .then(|| health_name(e.previous_status())),
        "reason": e.reason,
    })
}

fn instance_line(i: &pb::Instance) -> String {
    let l = i.locality.clone().unwrap_or_default();
    let loc = [l.region, l.zone, l.sub_zone]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/");
    format!(
        "{:<20} {:<20} {:<22} {:<6} {:<10} {:<14} {}",
        i.service,
        i.instance_id,
        std::net::SocketAddr::new(
            i.address
                .parse()
                .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            i.port as u16
        )
        .to_string(),
        i.weight,
        health_name(i.status()),
        if loc.is_empty() { "-".into() } else { loc },
        i.status_note
    )
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Run a registry subcommand.
pub async fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Register {
            service,
            id,
            addr,
            weight,
            region,
            zone,
            sub_zone,
            ttl,
            http_check,
            tcp_check,
            grpc_check,
            interval,
            timeout,
            deregister_after,
            meta,
            tags,
            common,
        } => {
            let check_kind = if let Some(path) = http_check {
                Some(pb::check_spec::Kind::Http(pb::HttpCheck {
                    path,
                    host: String::new(),
                }))
            } else if tcp_check {
                Some(pb::check_spec::Kind::Tcp(pb::TcpCheck {}))
            } else {
                grpc_check.map(|service| pb::check_spec::Kind::Grpc(pb::GrpcCheck { service }))
            };
            if check_kind.is_none() && (interval.is_some() || timeout.is_some()) {
                anyhow::bail!(
                    "--interval and --timeout need a check (--http-check, --tcp-check or --grpc-check)"
                );
            }
            let kind = match (ttl, check_kind) {
                (Some(t), _) => Some(pb::health_spec::Kind::TtlMs(t.as_millis() as u64)),
                (None, Some(k)) => Some(pb::health_spec::Kind::Check(pb::CheckSpec {
                    kind: Some(k),
                    interval_ms: interval.map_or(0, |d| d.as_millis() as u64),
                    timeout_ms: timeout.map_or(0, |d| d.as_millis() as u64),
                    ..Default::default()
                })),
                (None, None) => None,
            };
            let health = (kind.is_some() || deregister_after.is_some()).then(|| pb::HealthSpec {
                kind,
                deregister_critical_after_ms: deregister_after.map_or(0, |d| d.as_millis() as u64),
            });
            let locality = pb::Locality {
                region: region.unwrap_or_default(),
                zone: zone.unwrap_or_default(),
                sub_zone: sub_zone.unwrap_or_default(),
            };
            let inst = pb::Instance {
                service,
                instance_id: id,
                address: addr.ip().to_string(),
                port: u32::from(addr.port()),
                weight,
                locality: Some(locality),
                metadata: meta.into_iter().collect(),
                tags,
                health,
                ..Default::default()
            };
            let r = client(&common)
                .await?
                .register(pb::RegisterRequest {
                    instance: Some(inst),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            let inst = r.instance.unwrap_or_default();
            match common.output {
                Output::Json => print_json(&json!({
                    "instance": instance_json(&inst),
                    "revision": r.revision,
                    "created": r.created,
                }))?,
                Output::Text => println!(
                    "{} {}/{} at revision {} ({})",
                    if r.created { "registered" } else { "updated" },
                    inst.service,
                    inst.instance_id,
                    r.revision,
                    health_name(inst.status())
                ),
            }
        }
        Command::Deregister {
            service,
            id,
            common,
        } => {
            let r = client(&common)
                .await?
                .deregister(pb::DeregisterRequest {
                    service: service.clone(),
                    instance_id: id.clone(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            match common.output {
                Output::Json => print_json(&json!({"revision": r.revision}))?,
                Output::Text => println!("deregistered {service}/{id} at revision {}", r.revision),
            }
        }
        Command::Heartbeat {
            service,
            id,
            unhealthy,
            note,
            common,
        } => {
            let status = if unhealthy {
                pb::HealthStatus::Unhealthy
            } else {
                pb::HealthStatus::Healthy
            };
            let r = client(&common)
                .await?
                .heartbeat(pb::HeartbeatRequest {
                    service,
                    instance_id: id,
                    status: status as i32,
                    note,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            let inst = r.instance.unwrap_or_default();
            match common.output {
                Output::Json => print_json(&json!({
                    "instance": instance_json(&inst),
                    "revision": r.revision,
                }))?,
                Output::Text => println!(
                    "{}/{}: {}",
                    inst.service,
                    inst.instance_id,
                    health_name(inst.status())
                ),
            }
        }
        Command::List {
            service,
            all,
            common,
        } => {
            let r = client(&common)
                .await?
                .list(pb::ListRequest {
                    service: service.unwrap_or_default(),
                    healthy_only: !all,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            match common.output {
                Output::Json => print_json(&json!({
                    "revision": r.revision,
                    "instances": r.instances.iter().map(instance_json).collect::<Vec<_>>(),
                }))?,
                Output::Text => {
                    println!(
                        "{:<20} {:<20} {:<22} {:<6} {:<10} {:<14} NOTE",
                        "SERVICE", "ID", "ADDRESS", "WEIGHT", "STATUS", "LOCALITY"
                    );
                    for i in &r.instances {
                        println!("{}", instance_line(i));
                    }
                }
            }
        }
        Command::Services { common } => {
            let r = client(&common)
                .await?
                .services(pb::ServicesRequest {})
                .await
                .map_err(status_err)?
                .into_inner();
            match common.output {
                Output::Json => print_json(&json!({
                    "revision": r.revision,
                    "services": r.services.iter().map(|s| json!({
                        "name": s.name, "instances": s.instances, "healthy": s.healthy,
                    })).collect::<Vec<_>>(),
                }))?,
                Output::Text => {
                    println!("{:<30} {:>9} {:>8}", "SERVICE", "INSTANCES", "HEALTHY");
                    for s in &r.services {
                        println!("{:<30} {:>9} {:>8}", s.name, s.instances, s.healthy);
                    }
                }
            }
        }
        Command::Watch {
            service,
            rev,
            common,
        } => {
            let mut stream = client(&common)
                .await?
                .watch(pb::WatchRequest {
                    service: service.unwrap_or_default(),
                    start_revision: rev.unwrap_or(0),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            while let Some(msg) = stream.message().await.map_err(status_err)? {
                if msg.created && common.output == Output::Text {
                    println!("# watching at revision {}", msg.revision);
                }
                for e in &msg.events {
                    match common.output {
                        Output::Json => println!("{}", serde_json::to_string(&event_json(e))?),
                        Output::Text => {
                            let i = e.instance.clone().unwrap_or_default();
                            let extra = match e.r#type() {
                                pb::EventType::HealthChanged => format!(
                                    " {} -> {} ({})",
                                    health_name(e.previous_status()),
                                    health_name(i.status()),
                                    i.status_note
                                ),
                                pb::EventType::Deregistered => format!(" ({})", e.reason),
                                _ => String::new(),
                            };
                            println!(
                                "{} {} {}/{}{extra}",
                                e.revision,
                                event_name(e.r#type()),
                                i.service,
                                i.instance_id
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_and_pairs() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("x").is_err());
        assert_eq!(parse_kv("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_kv("nokey").is_err());
    }
}
