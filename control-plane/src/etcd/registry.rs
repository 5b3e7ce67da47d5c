//! The service registry's storage on etcd ([`EtcdRegistryBackend`]) and the watch that keeps
//! every replica's in-memory registry in step ([`EtcdRegistryBackend::spawn_watch`]).
//!
//! ## Keys (under `<prefix>/registry/`)
//! | key | value |
//! | --- | --- |
//! | `instances/<service>\0<instance_id>` | protobuf `weir.registry.v1.Instance` |
//! | `revision` | the registry revision, decimal ASCII |
//! | `heartbeats/<service>\0<instance_id>` | empty; put on every TTL heartbeat |
//!
//! A commit is one etcd `Txn`: compare `revision` with the revision the replica believes
//! current (absent for revision 1), then put/delete the instance keys and the new revision.
//! A failed compare means another replica committed first: [`BackendError::Conflict`], the
//! registry reloads and retries. So the registry revision stays a gapless sequence across
//! replicas and every committed change is ordered.
//!
//! The watch covers the whole `registry/` prefix from the revision seen at load. A
//! heartbeat marker renews that instance's TTL on every replica ([`Registry::renew`]), so a
//! TTL instance may heartbeat to any replica; any other change makes the replica reload the
//! registry and [`Registry::resync`] to it (changes from other replicas become events, EDS
//! pushes follow). A broken watch is re-established after a reload.

use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp, WatchOptions};
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use super::{Etcd, EtcdError};
use crate::proto::registry as pb;
use crate::registry::store::{Change, Loaded, instance_key};
use crate::registry::{Backend, BackendError, Registry};

/// The registry's storage on etcd; see the module docs.
#[derive(Debug, Clone)]
pub struct EtcdRegistryBackend {
    etcd: Arc<Etcd>,
    ns: Vec<u8>,
}

impl EtcdRegistryBackend {
    /// Storage under `<prefix>/registry/`.
    pub fn new(etcd: Arc<Etcd>) -> Self {
        let ns = etcd.namespace("registry");
        EtcdRegistryBackend { etcd, ns }
    }

    fn instances_prefix(&self) -> Vec<u8> {
        let mut k = self.ns.clone();
        k.extend_from_slice(b"instances/");
        k
    }

    fn instance(&self, service: &str, instance_id: &str) -> Vec<u8> {
        let mut k = self.instances_prefix();
        k.extend_from_slice(&instance_key(service, instance_id));
        k
    }

    fn heartbeat_key(&self, service: &str, instance_id: &str) -> Vec<u8> {
        let mut k = self.ns.clone();
        k.extend_from_slice(b"heartbeats/");
        k.extend_from_slice(&instance_key(service, instance_id));
        k
    }

    fn revision_key(&self) -> Vec<u8> {
        let mut k = self.ns.clone();
        k.extend_from_slice(b"revision");
        k
    }

    /// Load, plus the etcd revision the load was read at.
    fn load_at(&self) -> Result<(Loaded, i64), BackendError> {
        let ns = self.ns.clone();
        let (kvs, etcd_rev) = self.etcd.block(move |mut c| async move {
            let end = super::prefix_end(&ns);
            let r = c.get(ns, Some(GetOptions::new().with_range(end))).await?;
            let rev = r.header().map_or(0, |h| h.revision());
            Ok::<_, EtcdError>((r.0.kvs, rev))
        })?;
        let rev_key = self.revision_key();
        let inst_prefix = self.instances_prefix();
        let mut loaded = Loaded::default();
        for kv in kvs {
            let corrupt = |msg: String| BackendError::Corrupt {
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                msg,
            };
            if kv.key == rev_key {
                loaded.revision = std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| corrupt("revision is not a number".into()))?;
            } else if kv.key.starts_with(&inst_prefix) {
                let inst = pb::Instance::decode(kv.value.as_slice())
                    .map_err(|e| corrupt(e.to_string()))?;
                loaded.instances.push(inst);
            }
        }
        Ok((loaded, etcd_rev))
    }

    /// Watch `registry/` and resync `registry` on every change, until `token` is cancelled
    /// or the registry is dropped.
    pub fn spawn_watch(&self, registry: Weak<Registry>, token: CancellationToken) {
        let me = self.clone();
        self.etcd.handle().spawn(async move {
            let mut from = 0i64;
            loop {
                if token.is_cancelled() {
                    return;
                }
                // (Re)load: catches up with whatever happened while not watching.
                let m = me.clone();
                let loaded = tokio::task::spawn_blocking(move || m.load_at()).await;
                match loaded {
                    Ok(Ok((loaded, rev))) => {
                        let Some(reg) = registry.upgrade() else {
                            return;
                        };
                        reg.resync(loaded);
                        from = rev + 1;
                    }
                    Ok(Err(e)) => tracing::warn!("etcd registry reload failed: {e}"),
                    Err(_) => return,
                }
                if from > 0 {
                    match me.watch_once(&registry, from, &token).await {
                        Ok(()) => return,
                        Err(e) => tracing::warn!("etcd registry watch ended: {e}; re-watching"),
                    }
                }
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        });
    }

    /// Follow changes from `from` until cancelled (`Ok`) or the watch breaks (`Err`).
    async fn watch_once(
        &self,
        registry: &Weak<Registry>,
        from: i64,
        token: &CancellationToken,
    ) -> Result<(), EtcdError> {
        let opts = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = self
            .etcd
            .client()
            .watch(self.ns.clone(), Some(opts))
            .await?;
        loop {
            let msg = tokio::select! {
                _ = token.cancelled() => return Ok(()),
                m = stream.message() => m?,
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
            // Heartbeats (another replica's, or our own) only renew TTLs; anything else is a
            // registry change: reload.
            let hb_prefix = self.heartbeat_key("", "");
            let hb_prefix = &hb_prefix[..hb_prefix.len() - 1];
            let mut changed = false;
            for ev in msg.events() {
                let Some(kv) = ev.kv() else { continue };
                match kv.key().strip_prefix(hb_prefix) {
                    Some(rest) if ev.event_type() == etcd_client::EventType::Put => {
                        let mut parts = rest.splitn(2, |b| *b == 0);
                        let (Some(svc), Some(id)) = (parts.next(), parts.next()) else {
                            continue;
                        };
                        if let (Some(reg), Ok(svc), Ok(id)) = (
                            registry.upgrade(),
                            std::str::from_utf8(svc),
                            std::str::from_utf8(id),
                        ) {
                            reg.renew(svc, id);
                        }
                    }
                    Some(_) => {}
                    None => changed = true,
                }
            }
            if !changed {
                continue;
            }
            let me = self.clone();
            let loaded = tokio::task::spawn_blocking(move || me.load_at())
                .await
                .map_err(|e| EtcdError::Conflict(e.to_string()))?;
            match loaded {
                Ok((loaded, _)) => match registry.upgrade() {
                    Some(reg) => reg.resync(loaded),
                    None => return Ok(()),
                },
                Err(e) => tracing::warn!("etcd registry reload failed: {e}"),
            }
        }
    }
}

impl Backend for EtcdRegistryBackend {
    fn load(&self) -> Result<Loaded, BackendError> {
        self.load_at().map(|(l, _)| l)
    }

    fn heartbeat(&self, service: &str, instance_id: &str) -> Result<(), BackendError> {
        let key = self.heartbeat_key(service, instance_id);
        self.etcd.block(move |mut c| async move {
            c.put(key, Vec::new(), None).await?;
            Ok::<_, EtcdError>(())
        })?;
        Ok(())
    }

    fn commit(&self, revision: u64, changes: &[Change]) -> Result<(), BackendError> {
        let rev_key = self.revision_key();
        let guard = match revision.checked_sub(1) {
            Some(0) | None => Compare::create_revision(rev_key.clone(), CompareOp::Equal, 0),
            Some(prev) => Compare::value(rev_key.clone(), CompareOp::Equal, prev.to_string()),
        };
        let mut ops: Vec<TxnOp> = changes
            .iter()
            .map(|c| match c {
                Change::Put(i) => TxnOp::put(
                    self.instance(&i.service, &i.instance_id),
                    i.encode_to_vec(),
                    None,
                ),
                Change::Delete {
                    service,
                    instance_id,
                } => TxnOp::delete(self.instance(service, instance_id), None),
            })
            .collect();
        // A deregistered instance's heartbeat marker goes with it.
        for c in changes {
            if let Change::Delete {
                service,
                instance_id,
            } = c
            {
                ops.push(TxnOp::delete(
                    self.heartbeat_key(service, instance_id),
                    None,
                ));
            }
        }
        ops.push(TxnOp::put(rev_key, revision.to_string(), None));
        let txn = Txn::new().when([guard]).and_then(ops);
        let ok = self
            .etcd
            .block(move |mut c| async move { Ok::<_, EtcdError>(c.txn(txn).await?.succeeded()) })?;
        if ok {
            Ok(())
        } else {
            Err(BackendError::Conflict(format!(
                "registry revision {} was committed by another replica",
                revision
            )))
        }
    }
}
