//! Registry storage: the [`Backend`] trait and its embedded implementation on the shared
//! redb [`Store`].
//!
//! The trait is deliberately small: load everything once at startup, then commit each change
//! (instance puts and deletes plus the new registry revision) atomically and durably. The etcd
//! implementation ([`crate::etcd::registry::EtcdRegistryBackend`]) maps [`Backend::commit`] to
//! one `Txn` (compare the stored revision, put/delete the instance keys and the revision key;
//! a lost race is [`BackendError::Conflict`]), [`Backend::load`] to a prefix range read, and
//! [`Backend::heartbeat`] to a put that other replicas watch.
//!
//! ## Embedded layout
//! | table | key | value |
//! | --- | --- | --- |
//! | `registry.instances` | `service` `0x00` `instance_id` | protobuf `weir.registry.v1.Instance` |
//! | `registry.meta` | `revision` | big-endian `u64` |

use std::sync::Arc;

use prost::Message as _;

use crate::proto::registry as pb;
use crate::storage::{Store, StoreError};

/// Table of instances.
pub const INSTANCES_TABLE: &str = "registry.instances";
/// Table of registry metadata (the revision).
pub const META_TABLE: &str = "registry.meta";
const REVISION_KEY: &[u8] = b"revision";

/// Storage errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The underlying store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A shared backend (etcd) holds a newer revision than the commit expected: another
    /// replica committed first. Nothing was written; the registry catches up and the request
    /// can be retried.
    #[error("conflict: {0}")]
    Conflict(String),
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] crate::etcd::EtcdError),
    /// A stored record does not decode.
    #[error("corrupt registry record {key:?}: {msg}")]
    Corrupt {
        /// The record's key (lossy UTF-8).
        key: String,
        /// What is wrong.
        msg: String,
    },
}

/// One change inside a commit.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Create or replace an instance (keyed by its service and id).
    Put(Box<pb::Instance>),
    /// Remove an instance.
    Delete {
        /// Service name.
        service: String,
        /// Instance id.
        instance_id: String,
    },
}

/// Everything stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    /// The registry revision of the last commit (0 when empty).
    pub revision: u64,
    /// Every instance.
    pub instances: Vec<pb::Instance>,
}

/// Where the registry keeps its state. Implementations must make a commit durable before
/// returning `Ok` (the registry acknowledges requests only after that), and all of a commit or
/// nothing.
pub trait Backend: Send + Sync + std::fmt::Debug + 'static {
    /// Read the revision and every instance.
    fn load(&self) -> Result<Loaded, BackendError>;
    /// Apply `changes` and set the revision to `revision`, atomically and durably.
    fn commit(&self, revision: u64, changes: &[Change]) -> Result<(), BackendError>;
    /// A TTL heartbeat that changed nothing else. The embedded backend keeps heartbeats in
    /// memory only (no fsync per heartbeat); a shared backend publishes it so every replica
    /// renews the instance's TTL, not only the one that received it.
    fn heartbeat(&self, _service: &str, _instance_id: &str) -> Result<(), BackendError> {
        Ok(())
    }
}

/// The key of an instance: `service 0x00 instance_id` (service names cannot contain NUL, so
/// keys of one service are contiguous and sorted by id).
pub fn instance_key(service: &str, instance_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(service.len() + 1 + instance_id.len());
    k.extend_from_slice(service.as_bytes());
    k.push(0);
    k.extend_from_slice(instance_id.as_bytes());
    k
}

/// The embedded backend: tables `registry.*` in the shared [`Store`].
#[derive(Debug, Clone)]
pub struct EmbeddedBackend {
    store: Arc<Store>,
}

impl EmbeddedBackend {
    /// A backend over `store`.
    pub fn new(store: Arc<Store>) -> Self {
        EmbeddedBackend { store }
    }
}

impl Backend for EmbeddedBackend {
    fn load(&self) -> Result<Loaded, BackendError> {
        let r = self.store.read()?;
        let revision = match r.get(META_TABLE, REVISION_KEY)? {
            None => 0,
            Some(v) => {
                let b: [u8; 8] = v.as_slice().try_into().map_err(|_| BackendError::Corrupt {
                    key: "revision".into(),
                    msg: format!("{} bytes, expected 8", v.len()),
                })?;
                u64::from_be_bytes(b)
            }
        };
        let mut instances = Vec::new();
        for (k, v) in r.scan(INSTANCES_TABLE)? {
            let inst = pb::Instance::decode(v.as_slice()).map_err(|e| BackendError::Corrupt {
                key: String::from_utf8_lossy(&k).into_owned(),
                msg: e.to_string(),
            })?;
            instances.push(inst);
        }
        Ok(Loaded {
            revision,
            instances,
        })
    }

    fn commit(&self, revision: u64, changes: &[Change]) -> Result<(), BackendError> {
        self.store.write(|w| {
            for c in changes {
                match c {
                    Change::Put(i) => w.put(
                        INSTANCES_TABLE,
                        &instance_key(&i.service, &i.instance_id),
                        &i.encode_to_vec(),
                    )?,
                    Change::Delete {
                        service,
                        instance_id,
                    } => {
                        w.delete(INSTANCES_TABLE, &instance_key(service, instance_id))?;
                    }
                }
            }
            w.put(META_TABLE, REVISION_KEY, &revision.to_be_bytes())?;
            Ok::<_, BackendError>(())
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn inst(service: &str, id: &str, port: u32) -> pb::Instance {
        pb::Instance {
            service: service.into(),
            instance_id: id.into(),
            address: "10.0.0.1".into(),
            port,
            weight: 1,
            ..Default::default()
        }
    }

    #[test]
    fn embedded_backend_survives_reopen_and_reports_corruption() {
        let dir = std::env::temp_dir().join(format!(
            "weir-cp-registry-store-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        {
            let b = EmbeddedBackend::new(Arc::new(Store::open(&dir).expect("open")));
            b.commit(7, &[Change::Put(Box::new(inst("web", "a", 80)))])
                .expect("commit");
        }
        let store = Arc::new(Store::open(&dir).expect("reopen"));
        let b = EmbeddedBackend::new(store.clone());
        let l = b.load().expect("load");
        assert_eq!(l.revision, 7);
        assert_eq!(l.instances, vec![inst("web", "a", 80)]);
        store
            .write(|w| w.put(INSTANCES_TABLE, b"web\0bad", b"\xff\xff\xff"))
            .expect("write garbage");
        assert!(matches!(b.load(), Err(BackendError::Corrupt { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
