//! `weir-cp kv …`: the KV store's CLI, a gRPC client of `weir.kv.v1` on the server's gRPC
//! (xDS) address (`--server`, default `127.0.0.1:18000`, `serve --xds-address`).
//!
//! Text output is one line per key (`KEY<TAB>VALUE`) or per event
//! (`PUT KEY VALUE (revision N)`); `--output json` prints JSON (one object per line for
//! `watch` and `lease keepalive`). Keys and values are shown as UTF-8 (lossily).

use std::time::Duration;

use crate::auth::client::AuthChannel as Channel;
use anyhow::Context as _;
use serde_json::json;

use super::prefix_end;
use crate::proto::kv as pb;
use crate::proto::kv::kv_client::KvClient;
use crate::proto::kv::lease_client::LeaseClient;
use crate::proto::kv::watch_client::WatchClient;

/// Default `--server`: weir-cp's default gRPC (xDS) address.
pub const DEFAULT_SERVER: &str = "127.0.0.1:18000";

/// `weir-cp kv` arguments.
#[derive(Debug, clap::Args)]
pub struct KvArgs {
    /// The weir-cp gRPC address (`serve --xds-address`).
    #[arg(long, global = true, default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Credentials and TLS.
    #[command(flatten)]
    pub auth: crate::auth::client::ClientAuthArgs,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub output: Output,
    #[command(subcommand)]
    pub command: KvCommand,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Readable lines.
    Text,
    /// JSON.
    Json,
}

/// `weir-cp kv` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KvCommand {
    /// Print a key (or, with --prefix, every key under it).
    Get {
        /// The key.
        key: String,
        /// Treat KEY as a prefix.
        #[arg(long)]
        prefix: bool,
        /// Read at this (not yet compacted) revision.
        #[arg(long = "rev")]
        rev: Option<i64>,
    },
    /// Set a key.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Attach the key to this lease.
        #[arg(long)]
        lease: Option<i64>,
        /// Compare-and-swap: write only if the key's mod_revision is N (0: only if absent).
        #[arg(long = "expect-mod-rev")]
        expect_mod_rev: Option<i64>,
    },
    /// Delete a key (or, with --prefix, every key under it).
    Del {
        /// The key.
        key: String,
        /// Treat KEY as a prefix.
        #[arg(long)]
        prefix: bool,
    },
    /// List the keys under PREFIX (all keys for "") with their values, in key order.
    List {
        /// The prefix.
        #[arg(default_value = "")]
        prefix: String,
        /// Print at most N keys.
        #[arg(long)]
        limit: Option<i64>,
    },
    /// Print changes of a key (or prefix) until interrupted.
    Watch {
        /// The key.
        key: String,
        /// Treat KEY as a prefix.
        #[arg(long)]
        prefix: bool,
        /// Start at this revision (history first); default: changes from now on.
        #[arg(long = "rev")]
        rev: Option<i64>,
        /// Also print the previous value of each changed key.
        #[arg(long = "prev-kv")]
        prev_kv: bool,
    },
    /// Grant, revoke, keep alive and inspect leases.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Drop the history before REVISION (reads and watches below it fail afterwards).
    Compact {
        /// The new compact revision.
        revision: i64,
    },
}

/// `weir-cp kv lease` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum LeaseCommand {
    /// Grant a lease of TTL seconds; prints its id.
    Grant {
        /// Time to live, seconds.
        ttl: i64,
        /// Ask for this id (default: chosen by the server).
        #[arg(long)]
        id: Option<i64>,
    },
    /// Revoke a lease, deleting its keys.
    Revoke {
        /// The lease id.
        id: i64,
    },
    /// Keep a lease alive until interrupted (or once, with --once).
    Keepalive {
        /// The lease id.
        id: i64,
        /// Send one keep-alive and exit.
        #[arg(long)]
        once: bool,
    },
    /// Show a lease's remaining and granted TTL and its keys.
    Ttl {
        /// The lease id.
        id: i64,
    },
    /// List the live leases.
    List,
}

fn s(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn rev(h: &Option<pb::ResponseHeader>) -> i64 {
    h.as_ref().map_or(0, |h| h.revision)
}

fn kv_json(kv: &pb::KeyValue) -> serde_json::Value {
    json!({
        "key": s(&kv.key),
        "value": s(&kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
        "lease": kv.lease,
    })
}

fn status_error(what: &str, st: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {} ({:?})", st.message(), st.code())
}

/// Run a `weir-cp kv` command, printing to stdout.
pub async fn run(args: KvArgs) -> anyhow::Result<()> {
    let ch = args.auth.grpc_channel(&args.server).await?;
    let json = args.output == Output::Json;
    let mut kv = KvClient::new(ch.clone());
    match args.command {
        KvCommand::Get {
            key,
            prefix,
            rev: at,
        } => {
            let r = kv
                .range(pb::RangeRequest {
                    key: key.clone().into_bytes(),
                    prefix,
                    revision: at.unwrap_or(0),
                    ..Default::default()
                })
                .await
                .map_err(|e| status_error("get", e))?
                .into_inner();
            if !prefix && r.kvs.is_empty() {
                anyhow::bail!("key {key:?} not found");
            }
            if json {
                let kvs: Vec<_> = r.kvs.iter().map(kv_json).collect();
                println!(
                    "{}",
                    json!({"revision": rev(&r.header), "count": r.count, "kvs": kvs})
                );
            } else {
                for kv in &r.kvs {
                    println!("{}\t{}", s(&kv.key), s(&kv.value));
                }
            }
        }
        KvCommand::Put {
            key,
            value,
            lease,
            expect_mod_rev,
        } => {
            let r = kv
                .put(pb::PutRequest {
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    lease: lease.unwrap_or(0),
                    prev_kv: false,
                    expected_mod_revision: expect_mod_rev,
                })
                .await
                .map_err(|e| status_error("put", e))?
                .into_inner();
            if json {
                println!("{}", json!({"revision": rev(&r.header)}));
            } else {
                println!("OK revision {}", rev(&r.header));
            }
        }
        KvCommand::Del { key, prefix } => {
            let r = kv
                .delete_range(pb::DeleteRangeRequest {
                    key: key.into_bytes(),
                    prefix,
                    ..Default::default()
                })
                .await
                .map_err(|e| status_error("del", e))?
                .into_inner();
            if json {
                println!(
                    "{}",
                    json!({"revision": rev(&r.header), "deleted": r.deleted})
                );
            } else {
                println!("deleted {} (revision {})", r.deleted, rev(&r.header));
            }
        }
        KvCommand::List { prefix, limit } => list(&mut kv, prefix, limit, json).await?,
        KvCommand::Watch {
            key,
            prefix,
            rev: start,
            prev_kv,
        } => watch(ch, key, prefix, start, prev_kv, json).await?,
        KvCommand::Lease(c) => lease(LeaseClient::new(ch), c, json).await?,
        KvCommand::Compact { revision } => {
            let r = kv
                .compact(pb::CompactionRequest { revision })
                .await
                .map_err(|e| status_error("compact", e))?
                .into_inner();
            if json {
                println!(
                    "{}",
                    json!({"compact_revision": revision, "revision": rev(&r.header)})
                );
            } else {
                println!(
                    "compacted to revision {revision} (current revision {})",
                    rev(&r.header)
                );
            }
        }
    }
    Ok(())
}

async fn list(
    kv: &mut KvClient<Channel>,
    prefix: String,
    limit: Option<i64>,
    json: bool,
) -> anyhow::Result<()> {
    const PAGE: i64 = 500;
    if limit.is_some_and(|l| l < 1) {
        anyhow::bail!("--limit must be at least 1");
    }
    let end = prefix_end(prefix.as_bytes()).unwrap_or_else(|| vec![0]);
    let mut key = prefix.into_bytes();
    let mut at = 0;
    let mut shown = 0i64;
    let mut kvs = Vec::new();
    let mut more = false;
    loop {
        let want = limit.map_or(PAGE, |l| (l - shown).min(PAGE));
        let r = kv
            .range(pb::RangeRequest {
                key: key.clone(),
                range_end: end.clone(),
                limit: want,
                revision: at,
                ..Default::default()
            })
            .await
            .map_err(|e| status_error("list", e))?
            .into_inner();
        at = rev(&r.header);
        for kv in &r.kvs {
            shown += 1;
            if json {
                kvs.push(kv_json(kv));
            } else {
                println!("{}\t{}", s(&kv.key), s(&kv.value));
            }
        }
        if !r.more {
            break;
        }
        if limit.is_some_and(|l| shown >= l) {
            more = true;
            break;
        }
        key = r.next_key;
    }
    if json {
        println!("{}", json!({"revision": at, "kvs": kvs, "more": more}));
    } else if more {
        eprintln!("(more keys; raise --limit)");
    }
    Ok(())
}

async fn watch(
    ch: Channel,
    key: String,
    prefix: bool,
    start: Option<i64>,
    prev_kv: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut stream = WatchClient::new(ch)
        .watch(pb::WatchRequest {
            key: key.into_bytes(),
            prefix,
            start_revision: start.unwrap_or(0),
            prev_kv,
            ..Default::default()
        })
        .await
        .map_err(|e| status_error("watch", e))?
        .into_inner();
    while let Some(resp) = stream
        .message()
        .await
        .map_err(|e| status_error("watch", e))?
    {
        for ev in &resp.events {
            let Some(kv) = &ev.kv else { continue };
            let kind = match ev.r#type() {
                pb::event::EventType::Put => "PUT",
                pb::event::EventType::Delete => "DELETE",
            };
            if json {
                let mut v = json!({"type": kind, "revision": kv.mod_revision, "kv": kv_json(kv)});
                if let Some(p) = &ev.prev_kv {
                    v["prev_kv"] = kv_json(p);
                }
                println!("{v}");
            } else {
                let prev = ev
                    .prev_kv
                    .as_ref()
                    .map(|p| format!(" (was {})", s(&p.value)))
                    .unwrap_or_default();
                match ev.r#type() {
                    pb::event::EventType::Put => println!(
                        "PUT {} {} (revision {}){prev}",
                        s(&kv.key),
                        s(&kv.value),
                        kv.mod_revision
                    ),
                    pb::event::EventType::Delete => {
                        println!("DELETE {} (revision {}){prev}", s(&kv.key), kv.mod_revision)
                    }
                }
            }
        }
    }
    anyhow::bail!("the server ended the watch")
}

async fn lease(mut c: LeaseClient<Channel>, cmd: LeaseCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        LeaseCommand::Grant { ttl, id } => {
            let r = c
                .lease_grant(pb::LeaseGrantRequest {
                    ttl,
                    id: id.unwrap_or(0),
                })
                .await
                .map_err(|e| status_error("lease grant", e))?
                .into_inner();
            if json {
                println!("{}", json!({"id": r.id, "ttl": r.ttl}));
            } else {
                println!("lease {} granted with TTL {}s", r.id, r.ttl);
            }
        }
        LeaseCommand::Revoke { id } => {
            let r = c
                .lease_revoke(pb::LeaseRevokeRequest { id })
                .await
                .map_err(|e| status_error("lease revoke", e))?
                .into_inner();
            if json {
                println!("{}", json!({"id": id, "revision": rev(&r.header)}));
            } else {
                println!("lease {id} revoked (revision {})", rev(&r.header));
            }
        }
        LeaseCommand::Keepalive { id, once } => {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(pb::LeaseKeepAliveRequest { id })
                .await
                .context("keep-alive channel")?;
            let mut stream = c
                .lease_keep_alive(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
                    rx,
                ))
                .await
                .map_err(|e| status_error("lease keepalive", e))?
                .into_inner();
            loop {
                let Some(r) = stream
                    .message()
                    .await
                    .map_err(|e| status_error("lease keepalive", e))?
                else {
                    anyhow::bail!("the server ended the keep-alive stream");
                };
                if r.ttl <= 0 {
                    anyhow::bail!("lease {id} expired or was revoked");
                }
                if json {
                    println!("{}", json!({"id": r.id, "ttl": r.ttl}));
                } else {
                    println!("lease {} kept alive with TTL {}s", r.id, r.ttl);
                }
                if once {
                    return Ok(());
                }
                let every = Duration::from_millis((r.ttl.max(1) as u64 * 1000) / 3);
                tokio::time::sleep(every).await;
                tx.send(pb::LeaseKeepAliveRequest { id })
                    .await
                    .context("keep-alive channel")?;
            }
        }
        LeaseCommand::Ttl { id } => {
            let r = c
                .lease_time_to_live(pb::LeaseTimeToLiveRequest { id, keys: true })
                .await
                .map_err(|e| status_error("lease ttl", e))?
                .into_inner();
            let keys: Vec<String> = r.keys.iter().map(|k| s(k)).collect();
            if json {
                println!(
                    "{}",
                    json!({"id": r.id, "ttl": r.ttl, "granted_ttl": r.granted_ttl, "keys": keys})
                );
            } else {
                println!(
                    "lease {} TTL {}s of {}s, keys: {}",
                    r.id,
                    r.ttl,
                    r.granted_ttl,
                    if keys.is_empty() {
                        "-".to_string()
                    } else {
                        keys.join(", ")
                    }
                );
            }
        }
        LeaseCommand::List => {
            let r = c
                .lease_leases(pb::LeaseLeasesRequest {})
                .await
                .map_err(|e| status_error("lease list", e))?
                .into_inner();
            let ids: Vec<i64> = r.leases.iter().map(|l| l.id).collect();
            if json {
                println!("{}", json!({"leases": ids}));
            } else {
                for id in ids {
                    println!("{id}");
                }
            }
        }
    }
    Ok(())
}
