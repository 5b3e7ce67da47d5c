//! The embedded KV backend on weir-cp's redb [`Store`].
//!
//! ## Tables (keys and integers big-endian, values protobuf)
//! | table | key | value |
//! | --- | --- | --- |
//! | `kv.keys` | the key | `KeyValue` (current state) |
//! | `kv.log` | revision (u64 BE) | [`LogRecord`]: the revision's events, each with its `prev_kv` |
//! | `kv.meta` | `revision`, `compact_revision`, `next_lease` | i64 BE |
//! | `kv.leases` | lease id (u64 BE) | [`LeaseRecord`] (granted TTL) |
//! | `kv.lease_keys` | lease id (u64 BE) ++ key | empty |
//!
//! ## Group commit
//! Every write (put, delete, txn, compact, lease grant/revoke) is validated by the caller and
//! queued to one writer thread per backend. The thread takes everything queued (up to
//! [`MAX_BATCH_OPS`] writes or `MAX_BATCH_BYTES`), applies the writes in queue order inside
//! one redb write transaction — each write that changes something gets its own revision and
//! log record, exactly as if alone — makes it durable, then, write by write, updates in-memory state, publishes the
//! revision's events to the watch hub (so the hub sees revisions in order) and answers. A
//! write that fails fails alone (one that fails after writing part of itself makes the batch
//! be redone without it); a store failure fails the whole batch and nothing is
//! acknowledged. No timer: writes that arrive during a commit form the next batch.
//!
//! ## Durability
//! On disk, the batch's table mutations are appended to the write-ahead log ([`super::wal`])
//! and `fdatasync`ed (one sequential append, like etcd's WAL), then redb commits with
//! `Durability::None`; a checkpoint (an empty durable redb commit) every
//! [`CHECKPOINT_BATCHES`] batches, [`CHECKPOINT_BYTES`] of log, after [`CHECKPOINT_IDLE`]
//! without a write, and at shutdown lets the log start over. On open the records
//! newer than redb's `kv.meta` `wal_seq` are replayed.
//! Between checkpoints a background thread writes redb's dirty pages back (`kv/writeback.rs`:
//! in the lull before an idle checkpoint, and every few thousand batches under load) so a
//! checkpoint finds little left to write while it holds the writer. In memory (no data directory) redb
//! commits with `Durability::Immediate`. See `docs/design/store-performance.md`. The log doubles as MVCC history: a read at an older revision takes the
//! current state of the range and undoes the log's events newer than that revision (each
//! event stores its `prev_kv`); compaction deletes log records below the compact revision.
//!
//! ## Watch seam
//! A watcher subscribes to the hub *before* reading history from the log, then delivers
//! history up to the last committed revision and afterwards only hub batches whose revision
//! is the next one expected (older ones, already delivered from the log, are skipped). If
//! the hub drops batches for a slow watcher (lag) or a revision is missing, the watcher
//! resubscribes and catches up from the log again, so nothing is missed or repeated.
//!
//! ## Leases
//! Deadlines live in memory (`tokio::time::Instant`, so tests can pause time); the granted
//! TTL is stored. On open every stored lease is re-armed with its full TTL. The task from
//! [`EmbeddedKv::spawn_expiry`] revokes leases past their deadline: their keys are deleted in
//! one revision (each a DELETE event).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prost::Message as _;
use tokio::sync::{Notify, broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::wal::{self, RecordBuf, Wal, WalRecord};
use super::writeback::{Flusher, Pacer};
use super::{
    KeyRange, KvBackend, KvError, MAX_LEASE_TTL, MAX_TXN_OPS, WatchStream, header, validate_put,
};
use crate::metrics::Metrics;
use crate::proto::kv as pb;
use crate::proto::kv::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::proto::kv::event::EventType;
use crate::storage::{Reader, Store, StoreError, Writer};

const KEYS: &str = "kv.keys";
const LOG: &str = "kv.log";
const META: &str = "kv.meta";
const LEASES: &str = "kv.leases";
const LEASE_KEYS: &str = "kv.lease_keys";
const META_REVISION: &[u8] = b"revision";
const META_COMPACT: &[u8] = b"compact_revision";
const META_NEXT_LEASE: &[u8] = b"next_lease";
/// The last write-ahead log record applied (see [`super::wal`]).
const META_WAL_SEQ: &[u8] = b"wal_seq";
/// Every table the KV writes (the only ones a log record may name).
const TABLES: [&str; 5] = [KEYS, LOG, META, LEASES, LEASE_KEYS];

/// Log records a watcher reads from the store at a time while catching up.
const HISTORY_PAGE: usize = 256;
/// Batches the hub buffers for a slow watcher before it has to catch up from the log.
pub(crate) const HUB_CAPACITY: usize = 1024;
/// Responses buffered per watch stream.
const WATCH_BUFFER: usize = 64;
/// Default idle time before a progress notification.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// The events of one revision, as stored in `kv.log`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LogRecord {
    /// In the order they happened (e.g. a transaction's ops).
    #[prost(message, repeated, tag = "1")]
    pub events: Vec<pb::Event>,
}

/// A stored lease.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseRecord {
    /// Granted TTL, seconds.
    #[prost(int64, tag = "1")]
    pub ttl: i64,
}

/// One committed revision, as published to watchers.
#[derive(Debug)]
struct Batch {
    revision: i64,
    events: Vec<pb::Event>,
}

#[derive(Debug, Clone, Copy)]
struct LeaseState {
    ttl: i64,
    deadline: Instant,
}

/// The embedded backend (cheap to clone: shared state).
#[derive(Clone)]
pub struct EmbeddedKv {
    inner: Arc<Inner>,
    writer: Arc<WriterHandle>,
}

impl std::fmt::Debug for EmbeddedKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedKv")
            .field("revision", &self.inner.revision.load(SeqCst))
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Arc<Store>,
    /// Held by tests to make queued writes commit as one batch.
    #[cfg(test)]
    gate: Mutex<()>,
    /// Tests: make the next batch fail as a store failure would.
    #[cfg(test)]
    fail_next_batch: std::sync::atomic::AtomicBool,
    revision: AtomicI64,
    /// The write-ahead log (stores on disk; `None` in memory, where every commit is made
    /// "durable" by redb directly). Used by the writer thread only.
    wal: Option<Mutex<WalState>>,
    hub: broadcast::Sender<Arc<Batch>>,
    leases: Mutex<HashMap<i64, LeaseState>>,
    lease_changed: Notify,
    metrics: Arc<Metrics>,
    progress_interval: Duration,
    /// Writer idle time before a checkpoint, in milliseconds ([`CHECKPOINT_IDLE`]; tests
    /// that count checkpoints set it high, and one sets it low).
    checkpoint_idle_ms: std::sync::atomic::AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn be(n: i64) -> [u8; 8] {
    (n as u64).to_be_bytes()
}

fn from_be(b: &[u8]) -> Result<i64, KvError> {
    let a: [u8; 8] = b
        .try_into()
        .map_err(|_| KvError::Internal("corrupt integer in kv tables".into()))?;
    Ok(u64::from_be_bytes(a) as i64)
}

fn decode<M: prost::Message + Default>(b: &[u8]) -> Result<M, KvError> {
    M::decode(b).map_err(|e| KvError::Internal(format!("corrupt record in kv tables: {e}")))
}

fn lease_key(lease: i64, key: &[u8]) -> Vec<u8> {
    let mut k = be(lease).to_vec();
    k.extend_from_slice(key);
    k
}

fn seconds_left(deadline: Instant, now: Instant) -> i64 {
    let ms = deadline.saturating_duration_since(now).as_millis();
    ms.div_ceil(1000).min(i64::MAX as u128) as i64
}

fn deadline_after(now: Instant, ttl: i64) -> Instant {
    now.checked_add(Duration::from_secs(ttl.max(0) as u64))
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 100))
}

/// Accumulates a range answer: count everything, keep up to `limit`.
struct Collector {
    limit: usize,
    keys_only: bool,
    count_only: bool,
    kvs: Vec<pb::KeyValue>,
    count: i64,
    more: bool,
    error: Option<KvError>,
}

impl Collector {
    fn new(req: &pb::RangeRequest) -> Result<Collector, KvError> {
        if req.limit < 0 {
            return Err(KvError::InvalidArgument("limit is negative".into()));
        }
        Ok(Collector {
            limit: if req.limit == 0 {
                usize::MAX
            } else {
                usize::try_from(req.limit).unwrap_or(usize::MAX)
            },
            keys_only: req.keys_only,
            count_only: req.count_only,
            kvs: Vec::new(),
            count: 0,
            more: false,
            error: None,
        })
    }

    fn wants_value(&self) -> bool {
        !self.count_only && self.kvs.len() < self.limit
    }

    fn push(&mut self, mut kv: pb::KeyValue) {
        self.count += 1;
        if self.count_only {
            return;
        }
        if self.kvs.len() < self.limit {
            if self.keys_only {
                kv.value.clear();
            }
            self.kvs.push(kv);
        } else {
            self.more = true;
        }
    }

    /// A visitor over encoded `kv.keys` entries.
    fn visit(&mut self, _k: &[u8], v: &[u8]) -> bool {
        if !self.wants_value() {
            self.count += 1;
            self.more |= !self.count_only;
            return true;
        }
        match decode::<pb::KeyValue>(v) {
            Ok(kv) => {
                self.push(kv);
                true
            }
            Err(e) => {
                self.error = Some(e);
                false
            }
        }
    }

    fn finish(self, revision: i64) -> Result<pb::RangeResponse, KvError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        let next_key = match (self.more, self.kvs.last()) {
            (true, Some(last)) => {
                let mut k = last.key.clone();
                k.push(0);
                k
            }
            _ => Vec::new(),
        };
        Ok(pb::RangeResponse {
            header: header(revision),
            kvs: self.kvs,
            more: self.more,
            count: self.count,
            next_key,
        })
    }
}

/// Put `key` and note it in `muts` (for the write-ahead log).
fn record_put(
    w: &mut Writer<'_>,
    muts: &mut RecordBuf,
    table: &str,
    key: &[u8],
    value: &[u8],
) -> Result<(), StoreError> {
    muts.put(table, key, value);
    w.put(table, key, value)
}

fn meta(r: &Reader, key: &[u8]) -> Result<Option<i64>, KvError> {
    r.get(META, key)?.map(|b| from_be(&b)).transpose()
}

/// One write operation inside a batch's redb transaction: the revision it would produce, the
/// events so far, and whether it has written anything yet (`dirty`: a failure after a write
/// cannot be undone inside the shared transaction, so the batch is redone without the op).
struct Tx<'a, 'b> {
    w: &'a mut Writer<'b>,
    /// Every change made, for the write-ahead log.
    muts: &'a mut RecordBuf,
    revision: i64,
    events: Vec<pb::Event>,
    keys_delta: i64,
    dirty: bool,
}

impl Tx<'_, '_> {
    fn wput(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        self.dirty = true;
        Ok(record_put(self.w, self.muts, table, key, value)?)
    }

    fn wdel(&mut self, table: &str, key: &[u8]) -> Result<bool, KvError> {
        self.dirty = true;
        self.muts.delete(table, key);
        Ok(self.w.delete(table, key)?)
    }

    fn get(&mut self, key: &[u8]) -> Result<Option<pb::KeyValue>, KvError> {
        self.w.get(KEYS, key)?.map(|b| decode(&b)).transpose()
    }

    fn put(&mut self, req: &pb::PutRequest) -> Result<Option<pb::KeyValue>, KvError> {
        if req.lease != 0 && self.w.get(LEASES, &be(req.lease))?.is_none() {
            return Err(KvError::LeaseNotFound(req.lease));
        }
        let prev = self.get(&req.key)?;
        if let Some(expected) = req.expected_mod_revision {
            let actual = prev.as_ref().map_or(0, |p| p.mod_revision);
            if actual != expected {
                return Err(KvError::FailedPrecondition(format!(
                    "compare-and-swap failed: mod_revision of {:?} is {actual}, expected {expected}",
                    String::from_utf8_lossy(&req.key)
                )));
            }
        }
        let kv = pb::KeyValue {
            key: req.key.clone(),
            value: req.value.clone(),
            create_revision: prev.as_ref().map_or(self.revision, |p| p.create_revision),
            mod_revision: self.revision,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            lease: req.lease,
        };
        if let Some(p) = &prev
            && p.lease != 0
            && p.lease != req.lease
        {
            self.wdel(LEASE_KEYS, &lease_key(p.lease, &req.key))?;
        }
        if req.lease != 0 {
            self.wput(LEASE_KEYS, &lease_key(req.lease, &req.key), &[])?;
        }
        self.wput(KEYS, &req.key, &kv.encode_to_vec())?;
        if prev.is_none() {
            self.keys_delta += 1;
        }
        self.events.push(pb::Event {
            r#type: EventType::Put as i32,
            kv: Some(kv),
            prev_kv: prev.clone(),
        });
        Ok(prev)
    }

    fn delete_range(&mut self, range: &KeyRange) -> Result<Vec<pb::KeyValue>, KvError> {
        let mut found = Vec::new();
        let mut err = None;
        self.w
            .range_visit(KEYS, &range.start, range.end.as_deref(), |_, v| {
                match decode::<pb::KeyValue>(v) {
                    Ok(kv) => found.push(kv),
                    Err(e) => err = Some(e),
                }
                err.is_none()
            })?;
        if let Some(e) = err {
            return Err(e);
        }
        for prev in &found {
            self.wdel(KEYS, &prev.key)?;
            if prev.lease != 0 {
                self.wdel(LEASE_KEYS, &lease_key(prev.lease, &prev.key))?;
            }
            self.keys_delta -= 1;
            self.events.push(pb::Event {
                r#type: EventType::Delete as i32,
                kv: Some(pb::KeyValue {
                    key: prev.key.clone(),
                    mod_revision: self.revision,
                    ..Default::default()
                }),
                prev_kv: Some(prev.clone()),
            });
        }
        Ok(found)
    }

    fn range(&mut self, req: &pb::RangeRequest) -> Result<pb::RangeResponse, KvError> {
        if req.revision != 0 {
            return Err(KvError::InvalidArgument(
                "a range inside a transaction reads the transaction's own state: revision must be 0"
                    .into(),
            ));
        }
        let range = KeyRange::new(&req.key, &req.range_end, req.prefix)?;
        let mut c = Collector::new(req)?;
        self.w
            .range_visit(KEYS, &range.start, range.end.as_deref(), |k, v| {
                c.visit(k, v)
            })?;
        c.finish(0)
    }

    fn compare(&mut self, i: usize, c: &pb::Compare) -> Result<bool, KvError> {
        if c.key.is_empty() || c.key.len() > super::MAX_KEY_BYTES {
            return Err(KvError::InvalidArgument(format!(
                "compare[{i}]: key is empty or too large"
            )));
        }
        let cur = self.get(&c.key)?;
        let ord = match (c.target(), &c.target_union, &cur) {
            // etcd: a value compare on a missing key is false whatever the operator.
            (CompareTarget::Value, Some(TargetUnion::Value(_)), None) => return Ok(false),
            (CompareTarget::Value, Some(TargetUnion::Value(v)), Some(kv)) => {
                kv.value.as_slice().cmp(v.as_slice())
            }
            (CompareTarget::Version, Some(TargetUnion::Version(v)), _) => {
                cur.as_ref().map_or(0, |k| k.version).cmp(v)
            }
            (CompareTarget::Create, Some(TargetUnion::CreateRevision(v)), _) => {
                cur.as_ref().map_or(0, |k| k.create_revision).cmp(v)
            }
            (CompareTarget::Mod, Some(TargetUnion::ModRevision(v)), _) => {
                cur.as_ref().map_or(0, |k| k.mod_revision).cmp(v)
            }
            (CompareTarget::Lease, Some(TargetUnion::Lease(v)), _) => {
                cur.as_ref().map_or(0, |k| k.lease).cmp(v)
            }
            _ => {
                return Err(KvError::InvalidArgument(format!(
                    "compare[{i}]: the value set does not match target {:?}",
                    c.target()
                )));
            }
        };
        Ok(match c.result() {
            CompareResult::Equal => ord.is_eq(),
            CompareResult::NotEqual => !ord.is_eq(),
            CompareResult::Greater => ord.is_gt(),
            CompareResult::Less => ord.is_lt(),
        })
    }

    fn revoke(&mut self, id: i64) -> Result<(), KvError> {
        // Check first: a failure before any write leaves the batch's transaction usable.
        if self.w.get(LEASES, &be(id))?.is_none() {
            return Err(KvError::LeaseNotFound(id));
        }
        self.wdel(LEASES, &be(id))?;
        let mut keys = Vec::new();
        let start = be(id);
        let end = be(id.saturating_add(1));
        self.w.range_visit(LEASE_KEYS, &start, Some(&end), |k, _| {
            keys.push(k.to_vec());
            true
        })?;
        for lk in keys {
            let key = lk.get(8..).unwrap_or_default().to_vec();
            self.wdel(LEASE_KEYS, &lk)?;
            // Only keys still attached to this lease (a put moves a key off its old lease).
            let Some(prev) = self.get(&key)?.filter(|p| p.lease == id) else {
                continue;
            };
            self.wdel(KEYS, &key)?;
            self.keys_delta -= 1;
            self.events.push(pb::Event {
                r#type: EventType::Delete as i32,
                kv: Some(pb::KeyValue {
                    key,
                    mod_revision: self.revision,
                    ..Default::default()
                }),
                prev_kv: Some(prev),
            });
        }
        Ok(())
    }
}

impl Tx<'_, '_> {
    /// Apply `op`, the batch being at revision `current`; headers are set by the caller.
    fn apply(&mut self, op: &WriteOp, current: i64) -> Result<(WriteOut, After), KvError> {
        Ok(match op {
            WriteOp::Put(req) => {
                let prev = self.put(req)?;
                let resp = pb::PutResponse {
                    header: None,
                    prev_kv: if req.prev_kv { prev } else { None },
                };
                (WriteOut::Put(resp), After::Nothing)
            }
            WriteOp::DeleteRange { range, prev_kv } => {
                let prev = self.delete_range(range)?;
                let resp = pb::DeleteRangeResponse {
                    header: None,
                    deleted: prev.len() as i64,
                    prev_kvs: if *prev_kv { prev } else { Vec::new() },
                };
                (WriteOut::DeleteRange(resp), After::Nothing)
            }
            WriteOp::Txn(req) => {
                let (succeeded, responses) = self.txn(req)?;
                let resp = pb::TxnResponse {
                    header: None,
                    succeeded,
                    responses,
                };
                (WriteOut::Txn(resp), After::Nothing)
            }
            WriteOp::Compact(revision) => {
                self.compact(*revision, current)?;
                (
                    WriteOut::Compact(pb::CompactionResponse { header: None }),
                    After::Compacted(*revision),
                )
            }
            WriteOp::LeaseGrant { req, now } => {
                let id = self.grant(req)?;
                let resp = pb::LeaseGrantResponse {
                    header: None,
                    id,
                    ttl: req.ttl,
                };
                let after = After::Granted {
                    id,
                    ttl: req.ttl,
                    deadline: deadline_after(*now, req.ttl),
                };
                (WriteOut::LeaseGrant(resp), after)
            }
            WriteOp::LeaseRevoke { id, expired } => {
                self.revoke(*id)?;
                (
                    WriteOut::LeaseRevoke(pb::LeaseRevokeResponse { header: None }),
                    After::Revoked {
                        id: *id,
                        expired: *expired,
                    },
                )
            }
        })
    }

    /// A validated transaction: every compare, then the chosen branch's ops.
    fn txn(&mut self, req: &pb::TxnRequest) -> Result<(bool, Vec<pb::ResponseOp>), KvError> {
        let mut ok = true;
        for (i, c) in req.compare.iter().enumerate() {
            // Evaluate every compare so malformed ones are reported even after a false one.
            ok &= self.compare(i, c)?;
        }
        let ops = if ok { &req.success } else { &req.failure };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            use pb::request_op::Request as Q;
            use pb::response_op::Response as A;
            let resp = match &op.request {
                Some(Q::RequestRange(r)) => A::ResponseRange(self.range(r)?),
                Some(Q::RequestPut(p)) => {
                    let prev = self.put(p)?;
                    A::ResponsePut(pb::PutResponse {
                        header: None,
                        prev_kv: if p.prev_kv { prev } else { None },
                    })
                }
                Some(Q::RequestDeleteRange(d)) => {
                    let range = KeyRange::new(&d.key, &d.range_end, d.prefix)?;
                    let prev = self.delete_range(&range)?;
                    A::ResponseDeleteRange(pb::DeleteRangeResponse {
                        header: None,
                        deleted: prev.len() as i64,
                        prev_kvs: if d.prev_kv { prev } else { Vec::new() },
                    })
                }
                None => return Err(KvError::InvalidArgument("no request set".into())),
            };
            responses.push(pb::ResponseOp {
                response: Some(resp),
            });
        }
        Ok((ok, responses))
    }

    /// Drop the log below `revision` (the store being at `current`).
    fn compact(&mut self, revision: i64, current: i64) -> Result<(), KvError> {
        let compact = self
            .w
            .get(META, META_COMPACT)?
            .map(|b| from_be(&b))
            .transpose()?
            .unwrap_or(0);
        if revision > current {
            return Err(KvError::FutureRevision {
                requested: revision,
                current,
            });
        }
        if revision <= compact {
            return Err(KvError::Compacted {
                requested: revision,
                compact_revision: compact,
            });
        }
        let mut old = Vec::new();
        self.w.range_visit(LOG, &[], Some(&be(revision)), |k, _| {
            old.push(k.to_vec());
            true
        })?;
        for k in old {
            self.wdel(LOG, &k)?;
        }
        self.wput(META, META_COMPACT, &be(revision))
    }

    /// Store a validated lease grant; its id.
    fn grant(&mut self, req: &pb::LeaseGrantRequest) -> Result<i64, KvError> {
        let id = if req.id == 0 {
            let mut next = self
                .w
                .get(META, META_NEXT_LEASE)?
                .map(|b| from_be(&b))
                .transpose()?
                .unwrap_or(1);
            while self.w.get(LEASES, &be(next))?.is_some() {
                next += 1;
            }
            self.wput(META, META_NEXT_LEASE, &be(next + 1))?;
            next
        } else {
            if self.w.get(LEASES, &be(req.id))?.is_some() {
                return Err(KvError::FailedPrecondition(format!(
                    "lease {} already exists",
                    req.id
                )));
            }
            req.id
        };
        self.wput(
            LEASES,
            &be(id),
            &LeaseRecord { ttl: req.ttl }.encode_to_vec(),
        )?;
        Ok(id)
    }
}

/// Check a transaction's shape: sizes, op counts, no key written twice in a branch.
fn validate_txn(req: &pb::TxnRequest) -> Result<(), KvError> {
    if req.compare.len() > MAX_TXN_OPS
        || req.success.len() > MAX_TXN_OPS
        || req.failure.len() > MAX_TXN_OPS
    {
        return Err(KvError::InvalidArgument(format!(
            "too many operations in txn request: at most {MAX_TXN_OPS} compares and ops per branch"
        )));
    }
    for (branch, ops) in [("success", &req.success), ("failure", &req.failure)] {
        let mut puts: Vec<&[u8]> = Vec::new();
        let mut deletes = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            match &op.request {
                Some(pb::request_op::Request::RequestPut(p)) => {
                    validate_put(p)
                        .map_err(|e| KvError::InvalidArgument(format!("{branch}[{i}]: {e}")))?;
                    if puts.contains(&p.key.as_slice()) {
                        return Err(KvError::InvalidArgument(format!(
                            "{branch}[{i}]: duplicate key given in txn request"
                        )));
                    }
                    puts.push(&p.key);
                }
                Some(pb::request_op::Request::RequestDeleteRange(d)) => {
                    deletes
                        .push(KeyRange::new(&d.key, &d.range_end, d.prefix).map_err(|e| {
                            KvError::InvalidArgument(format!("{branch}[{i}]: {e}"))
                        })?);
                }
                Some(pb::request_op::Request::RequestRange(r)) => {
                    KeyRange::new(&r.key, &r.range_end, r.prefix)
                        .map_err(|e| KvError::InvalidArgument(format!("{branch}[{i}]: {e}")))?;
                }
                None => {
                    return Err(KvError::InvalidArgument(format!(
                        "{branch}[{i}]: no request set"
                    )));
                }
            }
        }
        if puts.iter().any(|k| deletes.iter().any(|d| d.contains(k))) {
            return Err(KvError::InvalidArgument(format!(
                "{branch}: a key is both put and deleted in txn request"
            )));
        }
    }
    Ok(())
}

impl EmbeddedKv {
    /// Open over `store` (creating nothing until the first write), loading the revision and
    /// re-arming every stored lease with its full TTL.
    pub fn open(store: Arc<Store>, metrics: Arc<Metrics>) -> Result<EmbeddedKv, KvError> {
        Self::open_with(store, metrics, DEFAULT_PROGRESS_INTERVAL)
    }

    /// [`EmbeddedKv::open`] with the idle time before a watch progress notification.
    pub fn open_with(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        progress_interval: Duration,
    ) -> Result<EmbeddedKv, KvError> {
        let wal = match store.dir() {
            Some(dir) => Some(Mutex::new(open_wal(&store, &dir.join(wal::WAL_FILE))?)),
            None => None,
        };
        let r = store.read()?;
        let revision = meta(&r, META_REVISION)?.unwrap_or(1);
        let compact = meta(&r, META_COMPACT)?.unwrap_or(0);
        let keys = r.len(KEYS)?;
        let now = Instant::now();
        let mut leases = HashMap::new();
        let mut err = None;
        r.range_visit(LEASES, &[], None, |k, v| {
            match (from_be(k), decode::<LeaseRecord>(v)) {
                (Ok(id), Ok(rec)) => {
                    leases.insert(
                        id,
                        LeaseState {
                            ttl: rec.ttl,
                            deadline: deadline_after(now, rec.ttl),
                        },
                    );
                }
                (Err(e), _) | (_, Err(e)) => err = Some(e),
            }
            err.is_none()
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        drop(r);
        metrics.kv.set_revisions(revision, compact);
        metrics.kv.set_keys(i64::try_from(keys).unwrap_or(i64::MAX));
        metrics.kv.set_leases(leases.len() as i64);
        let (hub, _) = broadcast::channel(HUB_CAPACITY);
        let inner = Arc::new(Inner {
            store,
            #[cfg(test)]
            gate: Mutex::new(()),
            #[cfg(test)]
            fail_next_batch: std::sync::atomic::AtomicBool::new(false),
            revision: AtomicI64::new(revision),
            wal,
            hub,
            leases: Mutex::new(leases),
            lease_changed: Notify::new(),
            metrics,
            progress_interval,
            checkpoint_idle_ms: std::sync::atomic::AtomicU64::new(if cfg!(test) {
                3_600_000
            } else {
                CHECKPOINT_IDLE.as_millis() as u64
            }),
        });
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let thread = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("weir-kv-writer".into())
                .spawn(move || writer_loop(inner, rx))
                .map_err(|e| KvError::Internal(format!("starting the KV writer thread: {e}")))?
        };
        Ok(EmbeddedKv {
            inner,
            writer: Arc::new(WriterHandle {
                tx: Some(tx),
                thread: Some(thread),
            }),
        })
    }

    /// The last committed revision.
    pub fn revision(&self) -> i64 {
        self.inner.revision.load(SeqCst)
    }

    /// Start the lease expiry task; it stops when `token` is cancelled.
    pub fn spawn_expiry(&self, token: CancellationToken) -> tokio::task::JoinHandle<()> {
        let kv = self.clone();
        tokio::spawn(async move { kv.expiry_loop(token).await })
    }

    /// Queue `op` for the writer thread and wait until it is durable (or failed).
    async fn submit(&self, op: WriteOp) -> Result<WriteOut, KvError> {
        let (reply, answer) = oneshot::channel();
        let tx = self.writer.tx.as_ref().ok_or_else(writer_stopped)?;
        tx.send(Job { op, reply })
            .await
            .map_err(|_| writer_stopped())?;
        // Unit tests run with tokio's paused clock, which auto-advances whenever the runtime
        // is idle — also while a write is on the writer thread, which tokio cannot see (lease
        // deadlines would pass mid-write). Waiting from the blocking pool, which tokio tracks,
        // keeps the clock still. Production awaits the answer directly.
        #[cfg(test)]
        let answer = tokio::task::spawn_blocking(move || answer.blocking_recv())
            .await
            .map_err(|_| writer_stopped())?;
        #[cfg(not(test))]
        let answer = answer.await;
        answer.map_err(|_| writer_stopped())?
    }

    /// Revoke `id` if it is (still) past its deadline.
    async fn expire(&self, id: i64) -> Result<bool, KvError> {
        {
            let leases = lock(&self.inner.leases);
            match leases.get(&id) {
                Some(l) if l.deadline <= Instant::now() => {}
                _ => return Ok(false),
            }
        }
        match self
            .submit(WriteOp::LeaseRevoke { id, expired: true })
            .await
        {
            Ok(_) => Ok(true),
            // Revoked meanwhile: not an expiry; drop the stale deadline.
            Err(KvError::LeaseNotFound(_)) => {
                lock(&self.inner.leases).remove(&id);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn expiry_loop(self, token: CancellationToken) {
        let inner = self.inner.clone();
        loop {
            let earliest = lock(&inner.leases).values().map(|l| l.deadline).min();
            let sleep = async {
                match earliest {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = token.cancelled() => return,
                _ = inner.lease_changed.notified() => continue,
                _ = sleep => {}
            }
            let now = Instant::now();
            let expired: Vec<i64> = lock(&inner.leases)
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                match self.expire(id).await {
                    Ok(true) => tracing::info!(lease = id, "lease expired: revoked"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(lease = id, "revoking an expired lease failed: {e}");
                        // Retry later rather than spinning.
                        if let Some(l) = lock(&inner.leases).get_mut(&id) {
                            l.deadline = Instant::now() + Duration::from_secs(1);
                        }
                    }
                }
            }
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, KvError> + Send + 'static,
    ) -> Result<T, KvError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| KvError::Internal(format!("store task failed: {e}")))?
    }
}

/// The write-ahead log and the writer's bookkeeping around it.
struct WalState {
    wal: Wal,
    /// The next record's sequence number.
    next_seq: u64,
    /// Batches appended since the last checkpoint.
    since_checkpoint: usize,
    /// Set when a record of a failed batch could not be taken back: the log and the store
    /// disagree, so every later write fails (a restart replays the log).
    poisoned: Option<String>,
}

/// Checkpoint (make redb durable, start the log over) after this many logged batches…
/// (A checkpoint stalls the writer for one redb fsync of everything written since the last
/// one — tens of milliseconds; it bounds replay time and log size, not durability, so it is
/// rare, as etcd snapshots every 10 000+ entries.)
const CHECKPOINT_BATCHES: usize = 8192;
/// …or once the log holds this many bytes…
const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
/// …or once no write has arrived for this long (a real lull: under a steady load, even one
/// write at a time, the queue is empty after most batches, but the next write is a
/// millisecond away).
const CHECKPOINT_IDLE: Duration = Duration::from_millis(250);

/// Open the write-ahead log at `path`, apply to `store` (durably) what it holds beyond the
/// store's last applied record, and start it over.
fn open_wal(store: &Store, path: &std::path::Path) -> Result<WalState, KvError> {
    let wal_err = |e: wal::WalError| KvError::Internal(e.to_string());
    let (mut w, records) = Wal::open(path).map_err(wal_err)?;
    let applied = meta(&store.read()?, META_WAL_SEQ)?.unwrap_or(0) as u64;
    let pending = wal::to_replay(path, records, applied).map_err(wal_err)?;
    let last = pending.last().map_or(applied, |r| r.seq);
    if !pending.is_empty() {
        replay(store, &pending)?;
        tracing::info!(
            records = pending.len(),
            last,
            "KV: replayed the write-ahead log"
        );
    }
    // Everything in the log is now durable in the store.
    w.rewind();
    Ok(WalState {
        wal: w,
        next_seq: last + 1,
        since_checkpoint: 0,
        poisoned: None,
    })
}

/// Apply `records` (consecutive, not yet in the store) in one durable transaction.
fn replay(store: &Store, records: &[WalRecord]) -> Result<(), KvError> {
    store.write(|w| {
        for rec in records {
            for m in &rec.mutations {
                let Some(table) = TABLES.iter().find(|t| **t == m.table) else {
                    return Err(KvError::Internal(format!(
                        "write-ahead log record {} names unknown table {:?}",
                        rec.seq, m.table
                    )));
                };
                match &m.value {
                    Some(v) => w.put(table, &m.key, v)?,
                    None => {
                        w.delete(table, &m.key)?;
                    }
                }
            }
            w.put(META, META_WAL_SEQ, &be(rec.seq as i64))?;
        }
        Ok(())
    })
}

/// Most writes committed in one batch (one redb transaction, one fsync).
pub const MAX_BATCH_OPS: usize = 256;
/// A batch stops growing once its keys and values reach this many bytes.
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Writes queued for the writer thread before submitters wait (backpressure).
const WRITE_QUEUE: usize = 4096;

/// A write, submitted to the writer thread (validated by the submitter).
#[derive(Debug)]
enum WriteOp {
    Put(pb::PutRequest),
    DeleteRange {
        range: KeyRange,
        prev_kv: bool,
    },
    Txn(pb::TxnRequest),
    Compact(i64),
    /// `now`: when the grant was asked for (the deadline counts from it; read on the
    /// submitter's side so tests with a paused tokio clock see their own time).
    LeaseGrant {
        req: pb::LeaseGrantRequest,
        now: Instant,
    },
    /// `expired`: revoked by the expiry task (counted as an expiry).
    LeaseRevoke {
        id: i64,
        expired: bool,
    },
}

impl WriteOp {
    /// Bytes of keys and values, for the batch size limit.
    fn size(&self) -> usize {
        let put = |p: &pb::PutRequest| p.key.len() + p.value.len();
        match self {
            WriteOp::Put(p) => put(p),
            WriteOp::Txn(t) => t
                .success
                .iter()
                .chain(&t.failure)
                .map(|op| match &op.request {
                    Some(pb::request_op::Request::RequestPut(p)) => put(p),
                    _ => 64,
                })
                .sum(),
            _ => 64,
        }
    }
}

/// A write's answer, headers filled with its revision.
#[derive(Debug)]
enum WriteOut {
    Put(pb::PutResponse),
    DeleteRange(pb::DeleteRangeResponse),
    Txn(pb::TxnResponse),
    Compact(pb::CompactionResponse),
    LeaseGrant(pb::LeaseGrantResponse),
    LeaseRevoke(pb::LeaseRevokeResponse),
}

impl WriteOut {
    fn set_revision(&mut self, revision: i64) {
        match self {
            WriteOut::Put(r) => r.header = header(revision),
            WriteOut::DeleteRange(r) => r.header = header(revision),
            WriteOut::Txn(r) => {
                r.header = header(revision);
                for op in &mut r.responses {
                    use pb::response_op::Response as A;
                    match &mut op.response {
                        Some(A::ResponseRange(x)) => x.header = header(revision),
                        Some(A::ResponsePut(x)) => x.header = header(revision),
                        Some(A::ResponseDeleteRange(x)) => x.header = header(revision),
                        None => {}
                    }
                }
            }
            WriteOut::Compact(r) => r.header = header(revision),
            WriteOut::LeaseGrant(r) => r.header = header(revision),
            WriteOut::LeaseRevoke(r) => r.header = header(revision),
        }
    }
}

/// In-memory state to update once a write is durable (before its events are published).
#[derive(Debug)]
enum After {
    Nothing,
    Granted {
        id: i64,
        ttl: i64,
        deadline: Instant,
    },
    Revoked {
        id: i64,
        expired: bool,
    },
    Compacted(i64),
}

/// A write applied inside a batch's transaction, waiting for the commit.
struct Applied {
    out: WriteOut,
    batch: Option<Batch>,
    keys_delta: i64,
    after: After,
}

type Reply = oneshot::Sender<Result<WriteOut, KvError>>;

/// A queued write and where its answer goes.
struct Job {
    op: WriteOp,
    reply: Reply,
}

/// Why a batch's transaction was abandoned (nothing of it is written).
enum Abort {
    /// Write `i` failed after writing something: redo the batch without it.
    Redo(usize, KvError),
    /// The store failed: every write of the batch fails.
    Store(String),
}

impl From<StoreError> for Abort {
    fn from(e: StoreError) -> Self {
        Abort::Store(e.to_string())
    }
}

/// The writer thread's queue and handle, shared by the clones of an [`EmbeddedKv`]. Dropping
/// the last clone closes the queue; the thread finishes what is queued, and the drop waits for
/// it (so the store is released when the backend is gone).
struct WriterHandle {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
    }
}

fn writer_stopped() -> KvError {
    KvError::Internal("the KV writer thread stopped".into())
}

/// The writer's background write-back of the redb file (stores with a write-ahead log; see
/// [`super::writeback`]): the flusher thread and when to kick it.
struct Writeback {
    flusher: Flusher,
    pacer: Pacer,
}

impl Writeback {
    /// Start it for `inner`'s store file; `None` in memory, or (logged) if the file cannot be
    /// opened a second time — checkpoints then write everything back themselves, as before.
    fn start(inner: &Inner) -> Option<Writeback> {
        inner.wal.as_ref()?;
        let path = inner.store.dir()?.join(crate::storage::DB_FILE);
        match Flusher::start(&path, inner.metrics.clone()) {
            Ok(flusher) => Some(Writeback {
                flusher,
                pacer: Pacer::new(std::time::Instant::now()),
            }),
            Err(e) => {
                tracing::warn!(
                    "KV writer: no background write-back of {}: {e}",
                    path.display()
                );
                None
            }
        }
    }

    /// After a batch: kick the flusher if the pacer says so.
    fn committed(&mut self, inner: &Inner) {
        self.kick_if(inner, Pacer::committed);
    }

    /// The writer is idle with a checkpoint pending: write back what is left.
    fn idle(&mut self, inner: &Inner) {
        self.kick_if(inner, Pacer::idle);
    }

    /// Kick the flusher if `decide` (a [`Pacer`] method, given the time and the log's end)
    /// says so.
    fn kick_if(&mut self, inner: &Inner, decide: fn(&mut Pacer, std::time::Instant, u64) -> bool) {
        if let Some(offset) = inner.wal_offset()
            && decide(&mut self.pacer, std::time::Instant::now(), offset)
        {
            self.flusher.kick();
        }
    }

    fn checkpointed(&mut self) {
        self.pacer.checkpointed(std::time::Instant::now());
    }
}

/// The next job for the writer thread; `None` when the queue is closed. With a checkpoint
/// pending (`timer`: a runtime with a clock), a lull of [`CHECKPOINT_IDLE`] without any write
/// checkpoints first, then waits on; a fifth into the lull, the background write-back
/// (`wb`) starts on what the last batches dirtied, so the checkpoint finds little left.
fn next_job(
    inner: &Inner,
    rx: &mut mpsc::Receiver<Job>,
    timer: Option<&tokio::runtime::Runtime>,
    wb: Option<&mut Writeback>,
) -> Option<Job> {
    if let Some(rt) = timer
        && inner.checkpoint_pending()
    {
        let idle = Duration::from_millis(inner.checkpoint_idle_ms.load(SeqCst));
        let mut rest = idle;
        let mut wb = wb;
        // The timers must be made inside the runtime (they register with its clock).
        if let Some(wb) = wb.as_deref_mut() {
            let lull = idle / 5;
            match rt.block_on(async { tokio::time::timeout(lull, rx.recv()).await }) {
                Ok(job) => return job,
                Err(_) => wb.idle(inner),
            }
            rest = idle - lull;
        }
        match rt.block_on(async { tokio::time::timeout(rest, rx.recv()).await }) {
            Ok(job) => return job,
            Err(_) => {
                if inner.checkpoint_now()
                    && let Some(wb) = wb
                {
                    wb.checkpointed();
                }
            }
        }
    }
    rx.blocking_recv()
}

/// The writer thread: take what is queued (at least one write, at most a batch), apply it in
/// one durable transaction, answer, repeat until the queue closes.
fn writer_loop(inner: Arc<Inner>, mut rx: mpsc::Receiver<Job>) {
    // Only for timing the idle checkpoint of a store with a write-ahead log (this thread's own
    // clock: unaffected by a caller's paused test clock).
    let timer = inner.wal.as_ref().and_then(|_| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| tracing::warn!("KV writer: no timer for idle checkpoints: {e}"))
            .ok()
    });
    let mut wb = Writeback::start(&inner);
    while let Some(first) = next_job(&inner, &mut rx, timer.as_ref(), wb.as_mut()) {
        #[cfg(test)]
        let _gate = lock(&inner.gate);
        let mut bytes = first.op.size();
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH_OPS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(j) => {
                    bytes += j.op.size();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        inner.commit_batch(jobs);
        let checkpointed = inner.maybe_checkpoint();
        if let Some(wb) = wb.as_mut() {
            if checkpointed {
                wb.checkpointed();
            } else {
                wb.committed(&inner);
            }
        }
    }
    // Shutting down: leave nothing to replay.
    if let Some(state) = &inner.wal {
        let mut st = lock(state);
        if st.since_checkpoint > 0 && st.poisoned.is_none() {
            inner.checkpoint(&mut st);
        }
    }
    // Stops and joins the write-back thread.
    drop(wb);
}

/// Apply one write of a batch at revision `*current` (the batch's so far); on success
/// `*current` becomes its revision (unchanged when it wrote nothing). The error carries
/// whether the write had already written something.
fn apply_one(
    w: &mut Writer<'_>,
    muts: &mut RecordBuf,
    current: &mut i64,
    op: &WriteOp,
) -> Result<Applied, (KvError, bool)> {
    let mut tx = Tx {
        w,
        muts,
        revision: *current + 1,
        events: Vec::new(),
        keys_delta: 0,
        dirty: false,
    };
    let r = tx.apply(op, *current);
    let Tx {
        w,
        muts,
        revision,
        events,
        keys_delta,
        dirty,
    } = tx;
    let (mut out, after) = r.map_err(|e| (e, dirty))?;
    let batch = if events.is_empty() {
        None
    } else {
        let record = LogRecord { events };
        record_put(w, muts, LOG, &be(revision), &record.encode_to_vec())
            .map_err(|e| (KvError::Store(e), true))?;
        *current = revision;
        Some(Batch {
            revision,
            events: record.events,
        })
    };
    out.set_revision(*current);
    Ok(Applied {
        out,
        batch,
        keys_delta,
        after,
    })
}

impl Inner {
    /// Commit `jobs` as one durable batch and answer each, in order. Each write that changes
    /// something gets its own revision and log record, as if applied alone; a write that fails
    /// (a compare-and-swap, a missing lease, …) fails alone. One that fails after writing part
    /// of itself (e.g. a txn op after another) cannot be undone inside the shared transaction:
    /// the batch is redone without it. A store failure (including the commit) fails every
    /// write of the batch, and nothing is acknowledged.
    ///
    /// Durable: with a write-ahead log, the batch's mutations are appended to it and
    /// `fdatasync`ed, then redb commits without an fsync of its own; in memory, redb commits
    /// with `Durability::Immediate`. Either way before any write is answered or published.
    fn commit_batch(&self, jobs: Vec<Job>) {
        let n = jobs.len();
        let mut wal = self.wal.as_ref().map(lock);
        if let Some(msg) = wal.as_ref().and_then(|st| st.poisoned.clone()) {
            for job in jobs {
                let _ = job.reply.send(Err(KvError::CommitFailed(msg.clone())));
            }
            return;
        }
        let logged = wal.is_some();
        let mut redo: Vec<Option<KvError>> = std::iter::repeat_with(|| None).take(n).collect();
        let mut outcome = Err("the batch was redone too often".to_string());
        // Each redo drops one more write, so this ends within n + 1 attempts.
        for _ in 0..=n {
            // Where this attempt's log record went, once appended (durable).
            let mut appended: Option<u64> = None;
            let body = |w: &mut Writer<'_>| {
                let start = w
                    .get(META, META_REVISION)?
                    .map(|b| from_be(&b))
                    .transpose()
                    .map_err(|e| Abort::Store(e.to_string()))?
                    .unwrap_or(1);
                let mut current = start;
                let mut muts = RecordBuf::default();
                let mut results = Vec::with_capacity(n);
                for (i, job) in jobs.iter().enumerate() {
                    if redo.get(i).is_some_and(Option::is_some) {
                        results.push(None);
                        continue;
                    }
                    match apply_one(w, &mut muts, &mut current, &job.op) {
                        Ok(a) => results.push(Some(Ok(a))),
                        Err((KvError::Store(e), _)) => return Err(Abort::Store(e.to_string())),
                        Err((e, true)) => return Err(Abort::Redo(i, e)),
                        Err((e, false)) => results.push(Some(Err(e))),
                    }
                }
                if current != start {
                    record_put(w, &mut muts, META, META_REVISION, &be(current))?;
                }
                #[cfg(test)]
                if self.fail_next_batch.swap(false, SeqCst) {
                    return Err(Abort::Store("injected store failure".into()));
                }
                // Last step before the commit: make the batch durable in the log.
                if let Some(st) = wal.as_deref_mut()
                    && !muts.is_empty()
                {
                    let seq = st.next_seq;
                    w.put(META, META_WAL_SEQ, &be(seq as i64))?;
                    let frame = muts.frame(seq).map_err(|e| Abort::Store(e.to_string()))?;
                    appended = Some(
                        st.wal
                            .append(frame)
                            .map_err(|e| Abort::Store(e.to_string()))?,
                    );
                }
                Ok::<_, Abort>(results)
            };
            let attempt = if logged {
                self.store.write_non_durable(body)
            } else {
                self.store.write(body)
            };
            if let (Some(st), Some(at)) = (wal.as_deref_mut(), appended) {
                if attempt.is_ok() {
                    st.next_seq += 1;
                    st.since_checkpoint += 1;
                } else if let Err(e) = st.wal.undo(at) {
                    // The commit failed after the record was durable, and it cannot be taken
                    // back: a restart would apply a batch that was answered as failed.
                    let msg = format!("the KV write-ahead log is out of step with the store: {e}");
                    tracing::error!("{msg}");
                    st.poisoned = Some(msg);
                }
            }
            match attempt {
                Ok(results) => {
                    outcome = Ok(results);
                    break;
                }
                Err(Abort::Redo(i, e)) => {
                    if let Some(slot) = redo.get_mut(i) {
                        *slot = Some(e);
                    }
                }
                Err(Abort::Store(msg)) => {
                    outcome = Err(msg);
                    break;
                }
            }
        }
        drop(wal);
        match outcome {
            Err(msg) => {
                tracing::warn!(writes = n, "KV batch commit failed, nothing written: {msg}");
                for job in jobs {
                    let _ = job.reply.send(Err(KvError::CommitFailed(msg.clone())));
                }
            }
            Ok(results) => {
                self.metrics.kv.batch_committed(n);
                for ((job, result), redone) in jobs.into_iter().zip(results).zip(redo) {
                    let answer = match (result, redone) {
                        (Some(Ok(applied)), _) => Ok(self.publish(applied)),
                        (Some(Err(e)), _) | (None, Some(e)) => Err(e),
                        (None, None) => {
                            Err(KvError::Internal("a write was lost in its batch".into()))
                        }
                    };
                    // The submitter may be gone (cancelled); the write stands, as with etcd.
                    let _ = job.reply.send(answer);
                }
            }
        }
    }

    /// Where the write-ahead log ends now (`None` in memory).
    fn wal_offset(&self) -> Option<u64> {
        self.wal.as_ref().map(|state| lock(state).wal.offset())
    }

    /// Checkpoint if the log is long enough (see [`CHECKPOINT_BATCHES`]); whether it did.
    fn maybe_checkpoint(&self) -> bool {
        let Some(state) = &self.wal else { return false };
        let mut st = lock(state);
        st.poisoned.is_none()
            && (st.since_checkpoint >= CHECKPOINT_BATCHES || st.wal.offset() >= CHECKPOINT_BYTES)
            && self.checkpoint(&mut st)
    }

    /// Whether the log holds batches a checkpoint would make durable in redb.
    fn checkpoint_pending(&self) -> bool {
        self.wal.as_ref().is_some_and(|state| {
            let st = lock(state);
            st.poisoned.is_none() && st.since_checkpoint > 0
        })
    }

    /// Checkpoint now if anything is pending (the writer is idle); whether it did.
    fn checkpoint_now(&self) -> bool {
        let Some(state) = &self.wal else { return false };
        let mut st = lock(state);
        st.poisoned.is_none() && st.since_checkpoint > 0 && self.checkpoint(&mut st)
    }

    /// Make redb durable (one fsync covering every batch since the last checkpoint), then
    /// start the log over; whether that worked. On failure the log keeps everything and it is
    /// tried again later.
    fn checkpoint(&self, st: &mut WalState) -> bool {
        let started = std::time::Instant::now();
        match self.store.sync() {
            Ok(()) => {
                st.wal.rewind();
                st.since_checkpoint = 0;
                self.metrics.kv.checkpointed(started.elapsed());
                true
            }
            Err(e) => {
                tracing::warn!("KV checkpoint failed (the write-ahead log keeps the writes): {e}");
                false
            }
        }
    }

    /// After the commit: update in-memory state, then publish the write's events.
    fn publish(&self, a: Applied) -> WriteOut {
        let lease_changed = !matches!(a.after, After::Nothing | After::Compacted(_));
        match a.after {
            After::Nothing => {}
            After::Granted { id, ttl, deadline } => {
                let n = {
                    let mut leases = lock(&self.leases);
                    leases.insert(id, LeaseState { ttl, deadline });
                    leases.len()
                };
                self.metrics.kv.set_leases(n as i64);
            }
            After::Revoked { id, expired } => {
                if expired {
                    self.metrics.kv.lease_expired();
                }
                let n = {
                    let mut leases = lock(&self.leases);
                    leases.remove(&id);
                    leases.len()
                };
                self.metrics.kv.set_leases(n as i64);
            }
            After::Compacted(revision) => self.metrics.kv.set_compact_revision(revision),
        }
        if let Some(batch) = a.batch {
            self.revision.store(batch.revision, SeqCst);
            self.metrics.kv.set_revision(batch.revision);
            self.metrics.kv.add_keys(a.keys_delta);
            // No receivers is fine: nobody is watching.
            let _ = self.hub.send(Arc::new(batch));
        }
        if lease_changed {
            self.lease_changed.notify_one();
        }
        a.out
    }

    fn range(&self, req: &pb::RangeRequest) -> Result<pb::RangeResponse, KvError> {
        let range = KeyRange::new(&req.key, &req.range_end, req.prefix)?;
        let mut c = Collector::new(req)?;
        let r = self.store.read()?;
        let current = meta(&r, META_REVISION)?.unwrap_or(1);
        let compact = meta(&r, META_COMPACT)?.unwrap_or(0);
        let at = req.revision;
        if at < 0 {
            return Err(KvError::InvalidArgument("revision is negative".into()));
        }
        if at > current {
            return Err(KvError::FutureRevision {
                requested: at,
                current,
            });
        }
        if at > 0 && at < compact {
            return Err(KvError::Compacted {
                requested: at,
                compact_revision: compact,
            });
        }
        if at == 0 || at == current {
            r.range_visit(KEYS, &range.start, range.end.as_deref(), |k, v| {
                c.visit(k, v)
            })?;
            return c.finish(current);
        }
        // An older revision: the current state of the range, with newer changes undone.
        let mut state = BTreeMap::new();
        let mut err = None;
        r.range_visit(KEYS, &range.start, range.end.as_deref(), |k, v| {
            match decode::<pb::KeyValue>(v) {
                Ok(kv) => {
                    state.insert(k.to_vec(), kv);
                }
                Err(e) => err = Some(e),
            }
            err.is_none()
        })?;
        let mut records = Vec::new();
        r.range_visit(LOG, &be(at + 1), None, |_, v| {
            match decode::<LogRecord>(v) {
                Ok(rec) => records.push(rec),
                Err(e) => err = Some(e),
            }
            err.is_none()
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        for rec in records.iter().rev() {
            for ev in rec.events.iter().rev() {
                let Some(kv) = &ev.kv else { continue };
                if !range.contains(&kv.key) {
                    continue;
                }
                match &ev.prev_kv {
                    Some(prev) => state.insert(kv.key.clone(), prev.clone()),
                    None => state.remove(&kv.key),
                };
            }
        }
        for (_, kv) in state {
            c.push(kv);
        }
        c.finish(current)
    }

    /// Log records from `from` on (at most `max`), after checking `from` is not compacted.
    fn history(&self, from: i64, max: usize) -> Result<Vec<(i64, LogRecord)>, KvError> {
        let r = self.store.read()?;
        let compact = meta(&r, META_COMPACT)?.unwrap_or(0);
        if from < compact {
            return Err(KvError::Compacted {
                requested: from,
                compact_revision: compact,
            });
        }
        let mut out = Vec::new();
        let mut err = None;
        r.range_visit(LOG, &be(from.max(0)), None, |k, v| {
            match (from_be(k), decode::<LogRecord>(v)) {
                (Ok(rev), Ok(rec)) => out.push((rev, rec)),
                (Err(e), _) | (_, Err(e)) => err = Some(e),
            }
            err.is_none() && out.len() < max
        })?;
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    fn keep_alive(&self, id: i64) -> pb::LeaseKeepAliveResponse {
        let ttl = {
            let mut leases = lock(&self.leases);
            let now = Instant::now();
            match leases.get_mut(&id) {
                // Past its deadline the lease is expired, even if not revoked yet: no renewal.
                Some(l) if l.deadline > now => {
                    l.deadline = deadline_after(now, l.ttl);
                    l.ttl
                }
                _ => 0,
            }
        };
        self.lease_changed.notify_one();
        pb::LeaseKeepAliveResponse {
            header: header(self.revision.load(SeqCst)),
            id,
            ttl,
        }
    }

    fn time_to_live(
        &self,
        req: &pb::LeaseTimeToLiveRequest,
    ) -> Result<pb::LeaseTimeToLiveResponse, KvError> {
        let Some(state) = lock(&self.leases).get(&req.id).copied() else {
            return Err(KvError::LeaseNotFound(req.id));
        };
        let mut keys = Vec::new();
        if req.keys {
            let r = self.store.read()?;
            r.range_visit(
                LEASE_KEYS,
                &be(req.id),
                Some(&be(req.id.saturating_add(1))),
                |k, _| {
                    keys.push(k.get(8..).unwrap_or_default().to_vec());
                    true
                },
            )?;
        }
        Ok(pb::LeaseTimeToLiveResponse {
            header: header(self.revision.load(SeqCst)),
            id: req.id,
            ttl: seconds_left(state.deadline, Instant::now()),
            granted_ttl: state.ttl,
            keys,
        })
    }

    fn leases(&self) -> pb::LeaseLeasesResponse {
        let mut ids: Vec<i64> = lock(&self.leases).keys().copied().collect();
        ids.sort_unstable();
        pb::LeaseLeasesResponse {
            header: header(self.revision.load(SeqCst)),
            leases: ids.into_iter().map(|id| pb::LeaseStatus { id }).collect(),
        }
    }
}

/// Deliver the part of `events` in `range` as one response; `None` when nothing matches.
fn filter(
    revision: i64,
    events: &[pb::Event],
    range: &KeyRange,
    prev_kv: bool,
) -> Option<pb::WatchResponse> {
    let events: Vec<pb::Event> = events
        .iter()
        .filter(|e| e.kv.as_ref().is_some_and(|kv| range.contains(&kv.key)))
        .map(|e| pb::Event {
            r#type: e.r#type,
            kv: e.kv.clone(),
            prev_kv: if prev_kv { e.prev_kv.clone() } else { None },
        })
        .collect();
    (!events.is_empty()).then(|| pb::WatchResponse {
        header: header(revision),
        events,
        progress: false,
    })
}

struct Watcher {
    inner: Arc<Inner>,
    range: KeyRange,
    prev_kv: bool,
    progress: bool,
    /// The next revision to deliver.
    next: i64,
    tx: mpsc::Sender<Result<pb::WatchResponse, KvError>>,
}

impl Watcher {
    async fn send(&self, r: Result<pb::WatchResponse, KvError>) -> bool {
        self.tx.send(r).await.is_ok()
    }

    /// Deliver everything committed from `self.next` on, from the log. False when the stream
    /// ended (client gone or compacted).
    async fn catch_up(&mut self) -> bool {
        loop {
            let inner = self.inner.clone();
            let from = self.next;
            let page = match tokio::task::spawn_blocking(move || inner.history(from, HISTORY_PAGE))
                .await
            {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    let _ = self.send(Err(e)).await;
                    return false;
                }
                Err(e) => {
                    let _ = self
                        .send(Err(KvError::Internal(format!("watch task failed: {e}"))))
                        .await;
                    return false;
                }
            };
            let full = page.len() >= HISTORY_PAGE;
            for (rev, rec) in page {
                if rev < self.next {
                    continue;
                }
                self.next = rev + 1;
                let current = self.inner.revision.load(SeqCst).max(rev);
                if let Some(resp) = filter(current, &rec.events, &self.range, self.prev_kv)
                    && !self.send(Ok(resp)).await
                {
                    return false;
                }
            }
            if !full {
                return true;
            }
        }
    }

    async fn run(mut self, mut rx: broadcast::Receiver<Arc<Batch>>) {
        if !self.catch_up().await {
            return;
        }
        let interval = self.inner.progress_interval;
        loop {
            let idle = async {
                if self.progress {
                    tokio::time::sleep(interval).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = self.tx.closed() => return,
                _ = idle => {
                    let resp = pb::WatchResponse {
                        header: header(self.next - 1),
                        events: Vec::new(),
                        progress: true,
                    };
                    if !self.send(Ok(resp)).await {
                        return;
                    }
                }
                b = rx.recv() => match b {
                    Ok(batch) if batch.revision < self.next => {}
                    Ok(batch) if batch.revision == self.next => {
                        self.next = batch.revision + 1;
                        if let Some(resp) =
                            filter(batch.revision, &batch.events, &self.range, self.prev_kv)
                            && !self.send(Ok(resp)).await
                        {
                            return;
                        }
                    }
                    // A gap (should not happen) or lag: catch up from the log.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        rx = rx.resubscribe();
                        if !self.catch_up().await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}

/// The answer of the kind asked for (the writer answers each write with its own kind).
macro_rules! expect_out {
    ($out:expr, $kind:ident) => {
        match $out {
            WriteOut::$kind(r) => Ok(r),
            other => Err(KvError::Internal(format!(
                "the KV writer answered {other:?} to a {} request",
                stringify!($kind)
            ))),
        }
    };
}

impl KvBackend for EmbeddedKv {
    async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, KvError> {
        // A single key at the current revision is one B-tree lookup in redb's cache: run it
        // here rather than paying a hand-off to the blocking pool and back per get (ranges,
        // prefixes and reads of older revisions, which may scan, still go there).
        if req.range_end.is_empty() && !req.prefix && req.revision == 0 {
            return self.inner.range(&req);
        }
        self.blocking(move |i| i.range(&req)).await
    }

    async fn put(&self, req: pb::PutRequest) -> Result<pb::PutResponse, KvError> {
        validate_put(&req)?;
        expect_out!(self.submit(WriteOp::Put(req)).await?, Put)
    }

    async fn delete_range(
        &self,
        req: pb::DeleteRangeRequest,
    ) -> Result<pb::DeleteRangeResponse, KvError> {
        let range = KeyRange::new(&req.key, &req.range_end, req.prefix)?;
        let op = WriteOp::DeleteRange {
            range,
            prev_kv: req.prev_kv,
        };
        expect_out!(self.submit(op).await?, DeleteRange)
    }

    async fn txn(&self, req: pb::TxnRequest) -> Result<pb::TxnResponse, KvError> {
        validate_txn(&req)?;
        expect_out!(self.submit(WriteOp::Txn(req)).await?, Txn)
    }

    async fn compact(&self, req: pb::CompactionRequest) -> Result<pb::CompactionResponse, KvError> {
        expect_out!(self.submit(WriteOp::Compact(req.revision)).await?, Compact)
    }

    async fn watch(&self, req: pb::WatchRequest) -> Result<WatchStream, KvError> {
        let range = KeyRange::new(&req.key, &req.range_end, req.prefix)?;
        if req.start_revision < 0 {
            return Err(KvError::InvalidArgument(
                "start_revision is negative".into(),
            ));
        }
        // Subscribe before reading anything: every revision committed from here on is in
        // the hub, everything before it in the log.
        let rx = self.inner.hub.subscribe();
        let start = req.start_revision;
        let next = self
            .blocking(move |i| {
                let r = i.store.read()?;
                let current = meta(&r, META_REVISION)?.unwrap_or(1);
                let compact = meta(&r, META_COMPACT)?.unwrap_or(0);
                if start > 0 && start < compact {
                    return Err(KvError::Compacted {
                        requested: start,
                        compact_revision: compact,
                    });
                }
                Ok(if start == 0 { current + 1 } else { start })
            })
            .await?;
        let (tx, out) = mpsc::channel(WATCH_BUFFER);
        let watcher = Watcher {
            inner: self.inner.clone(),
            range,
            prev_kv: req.prev_kv,
            progress: req.progress_notify,
            next,
            tx,
        };
        tokio::spawn(watcher.run(rx));
        Ok(Box::pin(
            tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(out),
        ))
    }

    async fn lease_grant(
        &self,
        req: pb::LeaseGrantRequest,
    ) -> Result<pb::LeaseGrantResponse, KvError> {
        if req.ttl < 1 || req.ttl > MAX_LEASE_TTL {
            return Err(KvError::InvalidArgument(format!(
                "lease TTL must be 1..={MAX_LEASE_TTL} seconds, got {}",
                req.ttl
            )));
        }
        if req.id < 0 {
            return Err(KvError::InvalidArgument("lease id is negative".into()));
        }
        let op = WriteOp::LeaseGrant {
            req,
            now: Instant::now(),
        };
        expect_out!(self.submit(op).await?, LeaseGrant)
    }

    async fn lease_revoke(
        &self,
        req: pb::LeaseRevokeRequest,
    ) -> Result<pb::LeaseRevokeResponse, KvError> {
        let op = WriteOp::LeaseRevoke {
            id: req.id,
            expired: false,
        };
        expect_out!(self.submit(op).await?, LeaseRevoke)
    }

    async fn lease_keep_alive(
        &self,
        req: pb::LeaseKeepAliveRequest,
    ) -> Result<pb::LeaseKeepAliveResponse, KvError> {
        Ok(self.inner.keep_alive(req.id))
    }

    async fn lease_time_to_live(
        &self,
        req: pb::LeaseTimeToLiveRequest,
    ) -> Result<pb::LeaseTimeToLiveResponse, KvError> {
        self.blocking(move |i| i.time_to_live(&req)).await
    }

    async fn lease_leases(&self) -> Result<pb::LeaseLeasesResponse, KvError> {
        Ok(self.inner.leases())
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;
    use futures::StreamExt as _;

    fn open() -> (EmbeddedKv, Arc<Metrics>) {
        let store = Arc::new(Store::in_memory().expect("store"));
        let metrics = Arc::new(Metrics::default());
        let kv = EmbeddedKv::open(store, metrics.clone()).expect("open kv");
        (kv, metrics)
    }

    fn put(k: &str, v: &str) -> pb::PutRequest {
        pb::PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        }
    }

    /// Queue `op` without waiting (the test holds the gate, so it joins the next batch).
    fn enqueue(kv: &EmbeddedKv, op: WriteOp) -> oneshot::Receiver<Result<WriteOut, KvError>> {
        let (reply, rx) = oneshot::channel();
        kv.writer
            .tx
            .as_ref()
            .expect("writer")
            .try_send(Job { op, reply })
            .expect("queued");
        rx
    }

    fn revision(out: &WriteOut) -> i64 {
        let h = match out {
            WriteOut::Put(r) => &r.header,
            WriteOut::DeleteRange(r) => &r.header,
            WriteOut::Txn(r) => &r.header,
            WriteOut::Compact(r) => &r.header,
            WriteOut::LeaseGrant(r) => &r.header,
            WriteOut::LeaseRevoke(r) => &r.header,
        };
        h.as_ref().expect("header").revision
    }

    async fn value(kv: &EmbeddedKv, k: &str) -> Option<pb::KeyValue> {
        kv.range(pb::RangeRequest {
            key: k.into(),
            ..Default::default()
        })
        .await
        .expect("range")
        .kvs
        .into_iter()
        .next()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_batch_one_commit_and_failing_writes_fail_alone() {
        let (kv, metrics) = open();
        let base = rev_of(kv.put(put("cas", "0")).await.expect("put").header);
        let mut watch = kv
            .watch(pb::WatchRequest {
                key: b"".to_vec(),
                range_end: vec![0],
                start_revision: base + 1,
                ..Default::default()
            })
            .await
            .expect("watch");
        let (commits, writes) = metrics.kv.commits();
        let stale_cas = pb::PutRequest {
            expected_mod_revision: Some(base - 1),
            ..put("cas", "stale")
        };
        // A txn that fails after its first op wrote (a range at a revision inside a txn is
        // refused): the batch is redone without it, so "partial" is never written.
        let half_txn = pb::TxnRequest {
            success: vec![
                pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(put("partial", "x"))),
                },
                pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                        key: b"a".to_vec(),
                        revision: 1,
                        ..Default::default()
                    })),
                },
            ],
            ..Default::default()
        };
        let cas_txn = pb::TxnRequest {
            compare: vec![pb::Compare {
                key: b"cas".to_vec(),
                target: CompareTarget::Mod as i32,
                result: CompareResult::Equal as i32,
                target_union: Some(TargetUnion::ModRevision(base)),
            }],
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(put("cas", "won"))),
            }],
            ..Default::default()
        };
        let late_cas = pb::PutRequest {
            expected_mod_revision: Some(base),
            ..put("cas", "late")
        };
        let answers = {
            let _gate = lock(&kv.inner.gate);
            vec![
                enqueue(&kv, WriteOp::Put(put("a", "1"))),
                enqueue(&kv, WriteOp::Put(stale_cas)),
                enqueue(&kv, WriteOp::Txn(half_txn)),
                enqueue(
                    &kv,
                    WriteOp::Put(pb::PutRequest {
                        lease: 999,
                        ..put("leased", "x")
                    }),
                ),
                enqueue(
                    &kv,
                    WriteOp::DeleteRange {
                        range: KeyRange::new(b"missing", b"", false).expect("range"),
                        prev_kv: false,
                    },
                ),
                enqueue(&kv, WriteOp::Put(put("b", "2"))),
                enqueue(&kv, WriteOp::Txn(cas_txn)),
                enqueue(&kv, WriteOp::Put(late_cas)),
            ]
        };
        let mut results = Vec::new();
        for a in answers {
            results.push(a.await.expect("answered"));
        }
        assert_eq!(
            metrics.kv.commits(),
            (commits + 1, writes + 8),
            "eight writes, one durable commit"
        );
        let rev = |i: usize| match &results[i] {
            Ok(out) => revision(out),
            Err(e) => panic!("write {i} failed: {e}"),
        };
        assert_eq!(rev(0), base + 1, "put a: its own revision");
        assert!(
            matches!(results[1], Err(KvError::FailedPrecondition(_))),
            "stale CAS"
        );
        assert!(
            matches!(results[2], Err(KvError::InvalidArgument(_))),
            "half txn"
        );
        assert!(matches!(results[3], Err(KvError::LeaseNotFound(999))));
        assert_eq!(rev(4), base + 1, "deleting nothing makes no revision");
        assert_eq!(rev(5), base + 2, "put b");
        assert_eq!(rev(6), base + 3, "the CAS txn");
        match &results[6] {
            Ok(WriteOut::Txn(t)) => assert!(t.succeeded, "the txn's compare held"),
            other => panic!("txn: {other:?}"),
        }
        assert!(
            matches!(results[7], Err(KvError::FailedPrecondition(_))),
            "the CAS after the txn sees the txn's write"
        );
        assert_eq!(kv.revision(), base + 3);
        assert!(
            value(&kv, "partial").await.is_none(),
            "nothing of the failed txn"
        );
        assert!(value(&kv, "leased").await.is_none());
        assert_eq!(value(&kv, "a").await.expect("a").mod_revision, base + 1);
        assert_eq!(value(&kv, "b").await.expect("b").value, b"2");
        let cas = value(&kv, "cas").await.expect("cas");
        assert_eq!((cas.value.as_slice(), cas.version), (&b"won"[..], 2));
        // Watchers see each write's revision once, in order, one response each.
        let mut seen = Vec::new();
        while seen.len() < 3 {
            let r = tokio::time::timeout(Duration::from_secs(10), watch.next())
                .await
                .expect("event in time")
                .expect("stream open")
                .expect("watch");
            for e in r.events {
                let kv = e.kv.expect("kv");
                // etcd's header revision is the store's when the response is sent: the
                // event's own for a live event, later for one replayed from history (the
                // watcher may start scanning after the batch committed).
                assert!(r.header.as_ref().expect("header").revision >= kv.mod_revision);
                seen.push((
                    kv.mod_revision,
                    String::from_utf8_lossy(&kv.key).into_owned(),
                ));
            }
        }
        assert_eq!(
            seen,
            vec![
                (base + 1, "a".to_string()),
                (base + 2, "b".to_string()),
                (base + 3, "cas".to_string())
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_failure_fails_the_whole_batch_and_writes_nothing() {
        let (kv, metrics) = open();
        let base = rev_of(kv.put(put("k", "0")).await.expect("put").header);
        let mut hub = kv.inner.hub.subscribe();
        let answers = {
            let _gate = lock(&kv.inner.gate);
            kv.inner.fail_next_batch.store(true, SeqCst);
            vec![
                enqueue(&kv, WriteOp::Put(put("k", "1"))),
                enqueue(&kv, WriteOp::Put(put("other", "1"))),
                enqueue(
                    &kv,
                    WriteOp::Put(pb::PutRequest {
                        expected_mod_revision: Some(0),
                        ..put("k", "cas")
                    }),
                ),
            ]
        };
        for a in answers {
            assert!(
                matches!(a.await.expect("answered"), Err(KvError::CommitFailed(_))),
                "every write of the failed batch fails, CAS included"
            );
        }
        assert_eq!(kv.revision(), base);
        assert_eq!(value(&kv, "k").await.expect("k").value, b"0");
        assert!(value(&kv, "other").await.is_none());
        assert!(hub.try_recv().is_err(), "nothing published");
        let (commits, _) = metrics.kv.commits();
        // The next write works and takes the next revision.
        let r = rev_of(kv.put(put("k", "2")).await.expect("put").header);
        assert_eq!(r, base + 1);
        assert_eq!(metrics.kv.commits().0, commits + 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_cas_writers_exactly_one_wins_per_round() {
        let (kv, metrics) = open();
        for round in 0..5 {
            let base = value(&kv, "race").await.map_or(0, |k| k.mod_revision);
            let mut tasks = Vec::new();
            for i in 0..32 {
                let kv = kv.clone();
                tasks.push(tokio::spawn(async move {
                    kv.put(pb::PutRequest {
                        expected_mod_revision: Some(base),
                        ..put("race", &format!("{round}-{i}"))
                    })
                    .await
                }));
            }
            let mut wins = 0;
            for t in tasks {
                match t.await.expect("task") {
                    Ok(_) => wins += 1,
                    Err(KvError::FailedPrecondition(_)) => {}
                    Err(e) => panic!("unexpected error: {e}"),
                }
            }
            assert_eq!(wins, 1, "round {round}");
            assert_eq!(value(&kv, "race").await.expect("race").version, round + 1);
        }
        let (commits, writes) = metrics.kv.commits();
        assert_eq!(writes, 5 * 32);
        assert!(commits <= writes);
        drop(kv);
    }

    fn rev_of(h: Option<pb::ResponseHeader>) -> i64 {
        h.expect("header").revision
    }
}

#[cfg(test)]
mod wal_tests {
    use super::*;
    use crate::kv::wal::Mutation;

    fn put(k: &str, v: &str) -> pb::PutRequest {
        pb::PutRequest {
            key: k.into(),
            value: v.into(),
            ..Default::default()
        }
    }

    async fn get(kv: &EmbeddedKv, k: &str) -> Option<pb::KeyValue> {
        kv.range(pb::RangeRequest {
            key: k.into(),
            ..Default::default()
        })
        .await
        .expect("range")
        .kvs
        .pop()
    }

    fn open_at(dir: &std::path::Path) -> Result<(EmbeddedKv, Arc<Metrics>), KvError> {
        let store = Arc::new(Store::open(dir).expect("store"));
        let metrics = Arc::new(Metrics::default());
        Ok((EmbeddedKv::open(store, metrics.clone())?, metrics))
    }

    /// The writes of a first life: puts (one a CAS failure, which logs nothing), a txn, a
    /// delete and a lease; returns the log file as it was once they were all acknowledged.
    async fn first_life(dir: &std::path::Path) -> (Vec<u8>, i64) {
        let (kv, metrics) = open_at(dir).expect("open");
        for i in 0..5 {
            kv.put(put(&format!("k{i}"), &format!("v{i}")))
                .await
                .expect("put");
        }
        assert!(
            kv.put(pb::PutRequest {
                expected_mod_revision: Some(99),
                ..put("k0", "cas")
            })
            .await
            .is_err()
        );
        kv.delete_range(pb::DeleteRangeRequest {
            key: "k1".into(),
            ..Default::default()
        })
        .await
        .expect("delete");
        let lease = kv
            .lease_grant(pb::LeaseGrantRequest { ttl: 600, id: 0 })
            .await
            .expect("grant")
            .id;
        kv.put(pb::PutRequest {
            lease,
            ..put("leased", "x")
        })
        .await
        .expect("leased put");
        let revision = kv.revision();
        let log = std::fs::read(dir.join(wal::WAL_FILE)).expect("read log");
        // A clean shutdown checkpoints: nothing left to replay.
        drop(kv);
        assert_eq!(metrics.kv.checkpoints(), 1);
        (log, revision)
    }

    #[tokio::test]
    async fn a_store_that_lost_its_non_durable_commits_gets_them_back_from_the_log() {
        let first = tempfile::tempdir().expect("dir");
        let (log, revision) = first_life(first.path()).await;
        // A store back at its last durable state before any of those writes (as after a
        // crash between checkpoints), with the log as it was on disk.
        let crashed = tempfile::tempdir().expect("dir");
        std::fs::write(crashed.path().join(wal::WAL_FILE), &log).expect("write log");
        let (kv, _) = open_at(crashed.path()).expect("replay");
        assert_eq!(kv.revision(), revision);
        let k0 = get(&kv, "k0").await.expect("k0");
        assert_eq!((k0.value.as_slice(), k0.mod_revision), (&b"v0"[..], 2));
        assert!(get(&kv, "k1").await.is_none(), "the delete was replayed");
        let leased = get(&kv, "leased").await.expect("leased");
        assert_eq!(kv.lease_leases().await.expect("leases").leases.len(), 1);
        assert_eq!(
            kv.lease_leases().await.expect("leases").leases[0].id,
            leased.lease
        );
        // History (kv.log) came back too: a read at an older revision sees k1.
        let old = kv
            .range(pb::RangeRequest {
                key: "k1".into(),
                revision: revision - 2,
                ..Default::default()
            })
            .await
            .expect("old read");
        assert_eq!(old.kvs.len(), 1);
        // New writes continue the revisions and the log's sequence.
        let r = kv.put(put("after", "1")).await.expect("put");
        assert_eq!(r.header.expect("header").revision, revision + 1);
        drop(kv);
        // Replaying again is a no-op (everything is applied; the reopened log is skipped).
        std::fs::write(crashed.path().join(wal::WAL_FILE), &log).expect("write log");
        let (kv, _) = open_at(crashed.path()).expect("reopen");
        assert_eq!(kv.revision(), revision + 1);
        assert_eq!(get(&kv, "after").await.expect("after").value, b"1");
    }

    #[tokio::test]
    async fn an_idle_writer_checkpoints_once() {
        let dir = tempfile::tempdir().expect("dir");
        let (kv, metrics) = open_at(dir.path()).expect("open");
        kv.inner.checkpoint_idle_ms.store(100, SeqCst);
        for i in 0..5 {
            kv.put(put(&format!("k{i}"), "v")).await.expect("put");
        }
        // A lull checkpoints (bounded wait, real time: the writer has its own clock).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while metrics.kv.checkpoints() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let n = metrics.kv.checkpoints();
        assert!(n >= 1);
        // Then nothing is pending: no more checkpoints while idle, nor at shutdown.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(metrics.kv.checkpoints(), n);
        drop(kv);
        assert_eq!(metrics.kv.checkpoints(), n);
        // A fifth into the lull the background write-back started on what the puts dirtied
        // (dropping the store joined its thread, so it has finished).
        assert!(metrics.kv.write_backs() >= 1);
        // Everything is in redb: the log was started over, and the store has the writes.
        let (kv, _) = open_at(dir.path()).expect("reopen");
        assert!(get(&kv, "k4").await.is_some());
        assert_eq!(kv.revision(), 6);
    }

    #[tokio::test]
    async fn a_torn_tail_is_ignored_on_replay() {
        let first = tempfile::tempdir().expect("dir");
        let (log, revision) = first_life(first.path()).await;
        let (records, end) = wal::parse(&log);
        let last = records.last().expect("records").clone();
        // The next record, cut off mid-write (never acknowledged).
        let next = wal::frame(&WalRecord {
            seq: last.seq + 1,
            mutations: vec![Mutation {
                table: KEYS.into(),
                key: b"torn".to_vec(),
                value: Some(b"never acknowledged".to_vec()),
            }],
        })
        .expect("frame");
        let mut torn = log[..end].to_vec();
        torn.extend_from_slice(&next[..next.len() - 3]);
        let crashed = tempfile::tempdir().expect("dir");
        std::fs::write(crashed.path().join(wal::WAL_FILE), &torn).expect("write log");
        let (kv, _) = open_at(crashed.path()).expect("replay");
        assert_eq!(kv.revision(), revision);
        assert!(get(&kv, "torn").await.is_none());
        assert!(get(&kv, "k4").await.is_some());
    }

    #[tokio::test]
    async fn a_log_that_does_not_continue_the_store_refuses_to_open() {
        let first = tempfile::tempdir().expect("dir");
        let (log, _) = first_life(first.path()).await;
        let (mut records, _) = wal::parse(&log);
        // Only the records after the first: batch 1 is missing.
        records.remove(0);
        let mut gap = Vec::new();
        for r in &records {
            gap.extend_from_slice(&wal::frame(r).expect("frame"));
        }
        let crashed = tempfile::tempdir().expect("dir");
        std::fs::write(crashed.path().join(wal::WAL_FILE), &gap).expect("write log");
        match open_at(crashed.path()) {
            Err(KvError::Internal(msg)) => assert!(msg.contains("missing"), "{msg}"),
            other => panic!("expected a gap error, got {:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn a_record_naming_a_foreign_table_is_rejected() {
        let dir = tempfile::tempdir().expect("dir");
        let rec = WalRecord {
            seq: 1,
            mutations: vec![Mutation {
                table: "objects.keys".into(),
                key: b"k".to_vec(),
                value: Some(Vec::new()),
            }],
        };
        std::fs::write(
            dir.path().join(wal::WAL_FILE),
            wal::frame(&rec).expect("frame"),
        )
        .expect("write log");
        match open_at(dir.path()) {
            Err(KvError::Internal(msg)) => assert!(msg.contains("unknown table"), "{msg}"),
            other => panic!("expected an error, got {:?}", other.map(|_| ())),
        }
    }
}
