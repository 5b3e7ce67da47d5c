//! The operator config's storage on etcd ([`EtcdConfigStore`]), used by
//! [`crate::operator::OperatorConfig`] with `--store etcd://…`.
//!
//! ## Keys (under `<prefix>/config/`)
//! | key | value |
//! | --- | --- |
//! | `counter` | the latest version, decimal ASCII |
//! | `meta/<version, 20 digits>` | JSON [`crate::operator::VersionInfo`] |
//! | `payload/<version, 20 digits>` | the document as an encoded `DiscoveryResponse` |
//! | `heads/<target>` | the version in force for the target, decimal ASCII |
//!
//! A version is allocated and committed in one `Txn`: read `counter` (value `v`, etcd
//! `mod_revision` `m`), then compare `mod_revision(counter) == m` and put `counter = v+1`,
//! the meta, the payload and the head. Two replicas applying at once both read `v`; one
//! `Txn` wins and the other re-reads and takes `v+2`, so versions are never handed out
//! twice. [`EtcdConfigStore::spawn_watch`] follows `config/` and calls back on every change
//! so each replica reloads and its snapshot cache is invalidated.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};
use tokio_util::sync::CancellationToken;

use super::{Etcd, EtcdError};

/// How often a version allocation is retried after losing a race.
pub const ALLOCATION_RETRIES: usize = 32;

/// Everything stored, as raw entries.
#[derive(Debug, Default)]
pub struct RawConfig {
    /// (version, JSON meta) in version order.
    pub meta: Vec<(u64, Vec<u8>)>,
    /// (target string, version).
    pub heads: Vec<(String, u64)>,
    /// The etcd revision read at.
    pub revision: i64,
}

/// The operator config's keys in etcd; see the module docs.
#[derive(Debug, Clone)]
pub struct EtcdConfigStore {
    etcd: Arc<Etcd>,
    ns: Vec<u8>,
}

fn version_key(ns: &[u8], kind: &str, version: u64) -> Vec<u8> {
    let mut k = ns.to_vec();
    k.extend_from_slice(format!("{kind}/{version:020}").as_bytes());
    k
}

fn parse_u64(key: &[u8], v: &[u8]) -> Result<u64, EtcdError> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| EtcdError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            msg: "not a decimal number".into(),
        })
}

impl EtcdConfigStore {
    /// Storage under `<prefix>/config/`.
    pub fn new(etcd: Arc<Etcd>) -> Self {
        let ns = etcd.namespace("config");
        EtcdConfigStore { etcd, ns }
    }

    fn key(&self, rest: &str) -> Vec<u8> {
        let mut k = self.ns.clone();
        k.extend_from_slice(rest.as_bytes());
        k
    }

    /// Read the history metadata and the heads (payloads are read on demand).
    pub fn load(&self) -> Result<RawConfig, EtcdError> {
        let meta_prefix = self.key("meta/");
        let heads_prefix = self.key("heads/");
        let (meta, heads, revision) = self.etcd.block(move |mut c| async move {
            let m = c
                .get(meta_prefix.clone(), Some(GetOptions::new().with_prefix()))
                .await?;
            let rev = m.header().map_or(0, |h| h.revision());
            // Heads at the same revision as the history, so they agree.
            let h = c
                .get(
                    heads_prefix.clone(),
                    Some(GetOptions::new().with_prefix().with_revision(rev)),
                )
                .await?;
            Ok::<_, EtcdError>((m.0.kvs, h.0.kvs, rev))
        })?;
        let mut out = RawConfig {
            revision,
            ..Default::default()
        };
        let meta_prefix = self.key("meta/");
        for kv in meta {
            let v = parse_u64(
                &kv.key,
                kv.key.strip_prefix(&meta_prefix[..]).unwrap_or(&[]),
            )?;
            out.meta.push((v, kv.value));
        }
        let heads_prefix = self.key("heads/");
        for kv in heads {
            let target =
                String::from_utf8_lossy(kv.key.strip_prefix(&heads_prefix[..]).unwrap_or(&[]))
                    .into_owned();
            out.heads.push((target, parse_u64(&kv.key, &kv.value)?));
        }
        Ok(out)
    }

    /// The payload of `version`, if stored.
    pub fn payload(&self, version: u64) -> Result<Option<Vec<u8>>, EtcdError> {
        let key = version_key(&self.ns, "payload", version);
        self.etcd.block(move |mut c| async move {
            let r = c.get(key, None).await?;
            Ok(r.0.kvs.into_iter().next().map(|kv| kv.value))
        })
    }

    /// Allocate the next version and store it: `build(version)` gives (meta, payload);
    /// `target` is the head to point at it. Returns the version.
    pub fn commit<E: From<EtcdError>>(
        &self,
        target: &str,
        mut build: impl FnMut(u64) -> Result<(Vec<u8>, Vec<u8>), E>,
    ) -> Result<u64, E> {
        let counter = self.key("counter");
        for _ in 0..ALLOCATION_RETRIES {
            let k = counter.clone();
            let (current, mod_rev) = self.etcd.block(move |mut c| async move {
                let r = c.get(k.clone(), None).await?;
                match r.0.kvs.first() {
                    Some(kv) => Ok((parse_u64(&k, &kv.value)?, kv.mod_revision)),
                    None => Ok((0, 0)),
                }
            })?;
            let version = current + 1;
            let (meta, payload) = build(version)?;
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    counter.clone(),
                    CompareOp::Equal,
                    mod_rev,
                )])
                .and_then([
                    TxnOp::put(counter.clone(), version.to_string(), None),
                    TxnOp::put(version_key(&self.ns, "meta", version), meta, None),
                    TxnOp::put(version_key(&self.ns, "payload", version), payload, None),
                    TxnOp::put(
                        self.key(&format!("heads/{target}")),
                        version.to_string(),
                        None,
                    ),
                ]);
            let ok = self.etcd.block(move |mut c| async move {
                Ok::<_, EtcdError>(c.txn(txn).await?.succeeded())
            })?;
            if ok {
                return Ok(version);
            }
        }
        Err(EtcdError::Conflict(format!(
            "could not allocate a config version after {ALLOCATION_RETRIES} tries (too many concurrent applies)"
        ))
        .into())
    }

    /// Watch `config/` from etcd revision `from` and call `changed` after every change
    /// (re-watching after errors, from a fresh load's revision as `changed` returns it),
    /// until `token` is cancelled.
    pub fn spawn_watch(
        &self,
        from: i64,
        changed: impl Fn() -> Option<i64> + Send + Sync + 'static,
        token: CancellationToken,
    ) {
        let me = self.clone();
        let changed = Arc::new(changed);
        self.etcd.handle().spawn(async move {
            let mut from = from;
            loop {
                let opts = WatchOptions::new().with_prefix().with_start_revision(from);
                let r = async {
                    let mut s = me.etcd.client().watch(me.ns.clone(), Some(opts)).await?;
                    loop {
                        let msg = tokio::select! {
                            _ = token.cancelled() => return Ok::<(), EtcdError>(()),
                            m = s.message() => m?,
                        };
                        let Some(msg) = msg else {
                            return Err(EtcdError::Conflict("watch stream closed".into()));
                        };
                        if msg.canceled() {
                            return Err(EtcdError::Conflict(format!(
                                "watch cancelled: {}",
                                msg.cancel_reason()
                            )));
                        }
                        if msg.events().is_empty() {
                            continue;
                        }
                        let c = changed.clone();
                        let _ = tokio::task::spawn_blocking(move || c()).await;
                    }
                }
                .await;
                match r {
                    Ok(()) => return,
                    Err(e) => tracing::warn!("etcd config watch ended: {e}; re-watching"),
                }
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                // Catch up with whatever happened meanwhile, then watch from there.
                let c = changed.clone();
                if let Ok(Some(rev)) = tokio::task::spawn_blocking(move || c()).await {
                    from = rev + 1;
                }
            }
        });
    }
}
