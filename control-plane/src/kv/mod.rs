//! weir-cp's KV store (`weir.kv.v1`), after etcd's data model.
//!
//! - A single global **revision**, bumped once per write that changes something (a put, a
//!   delete that deletes something, a transaction with writes, a lease revoke that deletes
//!   keys). Each key carries `create_revision`, `mod_revision` and `version` (puts since its
//!   creation; a delete resets it, deleting a missing key changes nothing).
//! - **Range** reads of a key, a `[key, range_end)` range or a prefix, with limit and
//!   pagination, at the current or an older (not yet compacted) revision.
//! - **Put** with optional compare-and-swap on `mod_revision`, **DeleteRange**, **Txn**
//!   (compares, then `success` or `failure` ops, atomically as one revision), **Compact**.
//! - **Watch** of a key or range from a revision: the history, then live events, one response
//!   per revision, without gap or duplicate; a start below the compact revision fails with
//!   `OUT_OF_RANGE`.
//! - **Leases**: keys attached to a lease are deleted (as watch events) when it is revoked or
//!   not kept alive within its TTL.
//!
//! ## Layout
//! - this file: limits, [`KvError`], key ranges, and the storage trait [`KvBackend`] (the
//!   API's operations on the generated `weir.kv.v1` types, so an etcd backend can map them
//!   one to one).
//! - [`embedded`]: [`embedded::EmbeddedKv`], the backend on weir-cp's redb
//!   [`crate::storage::Store`] (tables `kv.*`), with the watch hub and lease expiry.
//! - [`AnyKv`]: the backend a [`crate::ControlPlane`] serves: embedded, or
//!   [`crate::etcd::kv::EtcdKv`] with `--store etcd://…`.
//! - [`service`]: the tonic services (`KV`, `Watch`, `Lease`) over any backend, built in one
//!   place ([`service::services`]) so an auth interceptor can wrap them.
//! - [`wal`]: the embedded backend's write-ahead log (one `fdatasync` per group-committed
//!   batch; redb made durable by periodic checkpoints).
//! - [`metrics`]: `weir_cp_kv_*` metrics.
//! - [`compaction`]: auto-compaction (`--kv-auto-compaction-retention`), on any backend.
//! - [`cli`]: `weir-cp kv …` (a gRPC client).
//!
//! See `docs/design/kv.md` for the storage layout, the watch seam and deviations from etcd.

pub mod cli;
pub mod compaction;
pub mod embedded;
pub mod metrics;
pub mod service;
pub mod wal;
mod writeback;

use std::future::Future;
use std::pin::Pin;

use futures::Stream;

use crate::proto::kv as pb;
use crate::storage::StoreError;

pub use embedded::EmbeddedKv;

/// The backend a control plane serves: embedded (redb) or etcd.
#[derive(Debug)]
pub enum AnyKv {
    /// [`EmbeddedKv`] in the shared store.
    Embedded(EmbeddedKv),
    /// [`crate::etcd::kv::EtcdKv`] under `<prefix>/kv/`.
    Etcd(crate::etcd::kv::EtcdKv),
}

impl AnyKv {
    /// The embedded backend's lease expiry task (etcd expires its own leases: `None`).
    pub fn spawn_expiry(
        &self,
        token: tokio_util::sync::CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        match self {
            AnyKv::Embedded(kv) => Some(kv.spawn_expiry(token)),
            AnyKv::Etcd(_) => None,
        }
    }
}

macro_rules! delegate {
    ($($name:ident($req:ty) -> $resp:ty;)*) => {$(
        async fn $name(&self, req: $req) -> Result<$resp, KvError> {
            match self {
                AnyKv::Embedded(kv) => kv.$name(req).await,
                AnyKv::Etcd(kv) => kv.$name(req).await,
            }
        }
    )*};
}

impl KvBackend for AnyKv {
    delegate! {
        range(pb::RangeRequest) -> pb::RangeResponse;
        put(pb::PutRequest) -> pb::PutResponse;
        delete_range(pb::DeleteRangeRequest) -> pb::DeleteRangeResponse;
        txn(pb::TxnRequest) -> pb::TxnResponse;
        compact(pb::CompactionRequest) -> pb::CompactionResponse;
        watch(pb::WatchRequest) -> WatchStream;
        lease_grant(pb::LeaseGrantRequest) -> pb::LeaseGrantResponse;
        lease_revoke(pb::LeaseRevokeRequest) -> pb::LeaseRevokeResponse;
        lease_keep_alive(pb::LeaseKeepAliveRequest) -> pb::LeaseKeepAliveResponse;
        lease_time_to_live(pb::LeaseTimeToLiveRequest) -> pb::LeaseTimeToLiveResponse;
    }

    async fn lease_leases(&self) -> Result<pb::LeaseLeasesResponse, KvError> {
        match self {
            AnyKv::Embedded(kv) => kv.lease_leases().await,
            AnyKv::Etcd(kv) => kv.lease_leases().await,
        }
    }
}

/// Largest key, bytes (1.5 KiB).
pub const MAX_KEY_BYTES: usize = 1536;
/// Largest value, bytes (1.5 MiB, etcd's default request limit).
pub const MAX_VALUE_BYTES: usize = 1536 * 1024;
/// Most compares, and most ops per branch, in a transaction (etcd's default).
pub const MAX_TXN_OPS: usize = 128;
/// Longest lease TTL, seconds (etcd's limit).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// KV errors; each maps to one gRPC status code (see [`service`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// Malformed or oversized input (`INVALID_ARGUMENT`); nothing was written.
    #[error("{0}")]
    InvalidArgument(String),
    /// A compare-and-swap did not match, or the lease already exists (`FAILED_PRECONDITION`);
    /// nothing was written.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The revision asked for has been compacted (`OUT_OF_RANGE`).
    #[error(
        "required revision {requested} has been compacted; the compact revision is {compact_revision}"
    )]
    Compacted {
        /// The revision asked for.
        requested: i64,
        /// The store's compact revision.
        compact_revision: i64,
    },
    /// The revision asked for is in the future (`OUT_OF_RANGE`).
    #[error(
        "required revision {requested} is a future revision; the current revision is {current}"
    )]
    FutureRevision {
        /// The revision asked for.
        requested: i64,
        /// The store's current revision.
        current: i64,
    },
    /// No such lease (`NOT_FOUND`).
    #[error("lease {0} not found")]
    LeaseNotFound(i64),
    /// The store failed (`UNAVAILABLE`); nothing was acknowledged.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The embedded store failed while committing a batch of writes (`UNAVAILABLE`); no write
    /// of the batch was acknowledged or written.
    #[error("store: commit failed, nothing written: {0}")]
    CommitFailed(String),
    /// etcd (`--store etcd://`) failed or could not be reached (`UNAVAILABLE`).
    #[error("etcd: {0}")]
    Unavailable(String),
    /// Corrupt stored data or a failed background task (`INTERNAL`).
    #[error("internal: {0}")]
    Internal(String),
}

/// A stream of watch responses (one per revision with matching events, plus progress
/// notifications when asked for). It ends with an error when the watcher fell behind a
/// compaction.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, KvError>> + Send>>;

/// The KV store's operations, on the API's own types. The embedded backend implements it;
/// an etcd backend (etcd-client) can map each call to etcd's equivalent.
pub trait KvBackend: Send + Sync + 'static {
    /// `KV/Range`.
    fn range(
        &self,
        req: pb::RangeRequest,
    ) -> impl Future<Output = Result<pb::RangeResponse, KvError>> + Send;
    /// `KV/Put`; acknowledged only once durable.
    fn put(
        &self,
        req: pb::PutRequest,
    ) -> impl Future<Output = Result<pb::PutResponse, KvError>> + Send;
    /// `KV/DeleteRange`.
    fn delete_range(
        &self,
        req: pb::DeleteRangeRequest,
    ) -> impl Future<Output = Result<pb::DeleteRangeResponse, KvError>> + Send;
    /// `KV/Txn`.
    fn txn(
        &self,
        req: pb::TxnRequest,
    ) -> impl Future<Output = Result<pb::TxnResponse, KvError>> + Send;
    /// `KV/Compact`.
    fn compact(
        &self,
        req: pb::CompactionRequest,
    ) -> impl Future<Output = Result<pb::CompactionResponse, KvError>> + Send;
    /// `Watch/Watch`: fails up front (e.g. [`KvError::Compacted`]) or returns the stream.
    fn watch(
        &self,
        req: pb::WatchRequest,
    ) -> impl Future<Output = Result<WatchStream, KvError>> + Send;
    /// `Lease/LeaseGrant`.
    fn lease_grant(
        &self,
        req: pb::LeaseGrantRequest,
    ) -> impl Future<Output = Result<pb::LeaseGrantResponse, KvError>> + Send;
    /// `Lease/LeaseRevoke`: deletes the lease's keys.
    fn lease_revoke(
        &self,
        req: pb::LeaseRevokeRequest,
    ) -> impl Future<Output = Result<pb::LeaseRevokeResponse, KvError>> + Send;
    /// One keep-alive: `ttl` 0 in the answer when the lease does not exist.
    fn lease_keep_alive(
        &self,
        req: pb::LeaseKeepAliveRequest,
    ) -> impl Future<Output = Result<pb::LeaseKeepAliveResponse, KvError>> + Send;
    /// `Lease/LeaseTimeToLive`.
    fn lease_time_to_live(
        &self,
        req: pb::LeaseTimeToLiveRequest,
    ) -> impl Future<Output = Result<pb::LeaseTimeToLiveResponse, KvError>> + Send;
    /// `Lease/LeaseLeases`.
    fn lease_leases(&self)
    -> impl Future<Output = Result<pb::LeaseLeasesResponse, KvError>> + Send;
}

/// The keys a request addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    /// First key (inclusive).
    pub start: Vec<u8>,
    /// End (exclusive); `None`: to the last key.
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    /// Parse etcd-style addressing: `range_end` empty = `key` alone, `"\0"` = every key from
    /// `key`, otherwise `[key, range_end)`; `prefix` makes it the keys starting with `key`.
    pub fn new(key: &[u8], range_end: &[u8], prefix: bool) -> Result<KeyRange, KvError> {
        if key.len() > MAX_KEY_BYTES || range_end.len() > MAX_KEY_BYTES {
            return Err(KvError::InvalidArgument(format!(
                "key too large: at most {MAX_KEY_BYTES} bytes"
            )));
        }
        let end = if prefix {
            prefix_end(key)
        } else if range_end.is_empty() {
            if key.is_empty() {
                return Err(KvError::InvalidArgument("key is empty".into()));
            }
            let mut e = key.to_vec();
            e.push(0);
            Some(e)
        } else if range_end == [0] {
            None
        } else {
            Some(range_end.to_vec())
        };
        Ok(KeyRange {
            start: key.to_vec(),
            end,
        })
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|e| key < e)
    }
}

/// The end of the range of keys starting with `prefix` (`None`: to the last key).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Check a put's sizes.
pub fn validate_put(req: &pb::PutRequest) -> Result<(), KvError> {
    if req.key.is_empty() {
        return Err(KvError::InvalidArgument("key is empty".into()));
    }
    if req.key.len() > MAX_KEY_BYTES {
        return Err(KvError::InvalidArgument(format!(
            "key too large: {} bytes, at most {MAX_KEY_BYTES}",
            req.key.len()
        )));
    }
    if req.value.len() > MAX_VALUE_BYTES {
        return Err(KvError::InvalidArgument(format!(
            "value too large: {} bytes, at most {MAX_VALUE_BYTES}",
            req.value.len()
        )));
    }
    if req.lease < 0 {
        return Err(KvError::InvalidArgument("lease id is negative".into()));
    }
    Ok(())
}

/// A header at `revision`.
pub fn header(revision: i64) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader { revision })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let single = KeyRange::new(b"a", b"", false).expect("single");
        assert!(single.contains(b"a"));
        assert!(!single.contains(b"a\0"));
        assert!(!single.contains(b"b"));
        let pre = KeyRange::new(b"a/", b"", true).expect("prefix");
        assert_eq!(pre.end.as_deref(), Some(&b"a0"[..]));
        assert!(pre.contains(b"a/x") && !pre.contains(b"a0") && !pre.contains(b"a"));
        let all = KeyRange::new(b"", b"\0", false).expect("all");
        assert!(all.contains(b"") && all.contains(b"\xff\xff"));
        assert_eq!(prefix_end(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff"), None);
        assert_eq!(KeyRange::new(b"", b"", true).expect("all").end, None);
        assert!(matches!(
            KeyRange::new(b"", b"", false),
            Err(KvError::InvalidArgument(_))
        ));
        assert!(matches!(
            KeyRange::new(&[b'k'; MAX_KEY_BYTES + 1], b"", false),
            Err(KvError::InvalidArgument(_))
        ));
        let r = KeyRange::new(b"b", b"d", false).expect("range");
        assert!(r.contains(b"b") && r.contains(b"c\xff") && !r.contains(b"d"));
    }

    #[test]
    fn put_limits() {
        let ok = pb::PutRequest {
            key: vec![b'k'; MAX_KEY_BYTES],
            value: vec![0; MAX_VALUE_BYTES],
            ..Default::default()
        };
        assert!(validate_put(&ok).is_ok());
        for bad in [
            pb::PutRequest::default(),
            pb::PutRequest {
                key: vec![b'k'; MAX_KEY_BYTES + 1],
                ..Default::default()
            },
            pb::PutRequest {
                key: b"k".to_vec(),
                value: vec![0; MAX_VALUE_BYTES + 1],
                ..Default::default()
            },
        ] {
            assert!(matches!(
                validate_put(&bad),
                Err(KvError::InvalidArgument(_))
            ));
        }
    }
}

#[cfg(test)]
mod backend_tests;
