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
//! Every write runs in one redb write transaction (durable before it returns) under a mutex
//! that also covers publishing the revision's events to the watch hub, so the hub sees
//! revisions in order. The log doubles as MVCC history: a read at an older revision takes the
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
use tokio::sync::{Notify, broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    KeyRange, KvBackend, KvError, MAX_LEASE_TTL, MAX_TXN_OPS, WatchStream, header, validate_put,
};
use crate::metrics::Metrics;
use crate::proto::kv as pb;
use crate::proto::kv::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::proto::kv::event::EventType;
use crate::storage::{Reader, Store, Writer};

const KEYS: &str = "kv.keys";
const LOG: &str = "kv.log";
const META: &str = "kv.meta";
const LEASES: &str = "kv.leases";
const LEASE_KEYS: &str = "kv.lease_keys";
const META_REVISION: &[u8] = b"revision";
const META_COMPACT: &[u8] = b"compact_revision";
const META_NEXT_LEASE: &[u8] = b"next_lease";

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
    /// Serializes writes and the publication of their events.
    write: Mutex<()>,
    revision: AtomicI64,
    hub: broadcast::Sender<Arc<Batch>>,
    leases: Mutex<HashMap<i64, LeaseState>>,
    lease_changed: Notify,
    metrics: Arc<Metrics>,
    progress_interval: Duration,
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

fn meta(r: &Reader, key: &[u8]) -> Result<Option<i64>, KvError> {
    r.get(META, key)?.map(|b| from_be(&b)).transpose()
}

/// One write transaction: the revision it would produce and the events so far.
struct Tx<'a, 'b> {
    w: &'a mut Writer<'b>,
    revision: i64,
    events: Vec<pb::Event>,
    keys_delta: i64,
}

impl Tx<'_, '_> {
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
            self.w.delete(LEASE_KEYS, &lease_key(p.lease, &req.key))?;
        }
        if req.lease != 0 {
            self.w
                .put(LEASE_KEYS, &lease_key(req.lease, &req.key), &[])?;
        }
        self.w.put(KEYS, &req.key, &kv.encode_to_vec())?;
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
            self.w.delete(KEYS, &prev.key)?;
            if prev.lease != 0 {
                self.w
                    .delete(LEASE_KEYS, &lease_key(prev.lease, &prev.key))?;
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
        if !self.w.delete(LEASES, &be(id))? {
            return Err(KvError::LeaseNotFound(id));
        }
        let mut keys = Vec::new();
        let start = be(id);
        let end = be(id.saturating_add(1));
        self.w.range_visit(LEASE_KEYS, &start, Some(&end), |k, _| {
            keys.push(k.to_vec());
            true
        })?;
        for lk in keys {
            let key = lk.get(8..).unwrap_or_default().to_vec();
            self.w.delete(LEASE_KEYS, &lk)?;
            // Only keys still attached to this lease (a put moves a key off its old lease).
            let Some(prev) = self.get(&key)?.filter(|p| p.lease == id) else {
                continue;
            };
            self.w.delete(KEYS, &key)?;
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
        Ok(EmbeddedKv {
            inner: Arc::new(Inner {
                store,
                write: Mutex::new(()),
                revision: AtomicI64::new(revision),
                hub,
                leases: Mutex::new(leases),
                lease_changed: Notify::new(),
                metrics,
                progress_interval,
            }),
        })
    }

    /// The last committed revision.
    pub fn revision(&self) -> i64 {
        self.inner.revision.load(SeqCst)
    }

    /// Start the lease expiry task; it stops when `token` is cancelled.
    pub fn spawn_expiry(&self, token: CancellationToken) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        tokio::spawn(async move { inner.expiry_loop(token).await })
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

impl Inner {
    /// Run `f` as one write transaction producing at most one revision; commit durably, then
    /// publish the events. Returns `f`'s result and the store's revision afterwards.
    fn mutate<T>(
        &self,
        f: impl FnOnce(&mut Tx<'_, '_>) -> Result<T, KvError>,
    ) -> Result<(T, i64), KvError> {
        self.mutate_then(f, || {})
    }

    /// [`Inner::mutate`], running `committed` after the commit and before the events are
    /// published (so a watcher seeing them also sees in-memory state updated).
    fn mutate_then<T>(
        &self,
        f: impl FnOnce(&mut Tx<'_, '_>) -> Result<T, KvError>,
        committed: impl FnOnce(),
    ) -> Result<(T, i64), KvError> {
        let _w = lock(&self.write);
        let (out, batch, keys_delta, revision) = self.store.write(|w| {
            let current = w
                .get(META, META_REVISION)?
                .map(|b| from_be(&b))
                .transpose()?
                .unwrap_or(1);
            let mut tx = Tx {
                w,
                revision: current + 1,
                events: Vec::new(),
                keys_delta: 0,
            };
            let out = f(&mut tx)?;
            let Tx {
                w,
                events,
                keys_delta,
                revision,
            } = tx;
            if events.is_empty() {
                return Ok::<_, KvError>((out, None, 0, current));
            }
            let record = LogRecord { events };
            w.put(LOG, &be(revision), &record.encode_to_vec())?;
            w.put(META, META_REVISION, &be(revision))?;
            Ok((
                out,
                Some(Batch {
                    revision,
                    events: record.events,
                }),
                keys_delta,
                revision,
            ))
        })?;
        committed();
        if let Some(batch) = batch {
            self.revision.store(revision, SeqCst);
            self.metrics.kv.set_revision(revision);
            self.metrics.kv.add_keys(keys_delta);
            // No receivers is fine: nobody is watching.
            let _ = self.hub.send(Arc::new(batch));
        }
        Ok((out, revision))
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

    fn put(&self, req: &pb::PutRequest) -> Result<pb::PutResponse, KvError> {
        validate_put(req)?;
        let (prev, revision) = self.mutate(|tx| tx.put(req))?;
        Ok(pb::PutResponse {
            header: header(revision),
            prev_kv: if req.prev_kv { prev } else { None },
        })
    }

    fn delete_range(
        &self,
        req: &pb::DeleteRangeRequest,
    ) -> Result<pb::DeleteRangeResponse, KvError> {
        let range = KeyRange::new(&req.key, &req.range_end, req.prefix)?;
        let (prev, revision) = self.mutate(|tx| tx.delete_range(&range))?;
        Ok(pb::DeleteRangeResponse {
            header: header(revision),
            deleted: prev.len() as i64,
            prev_kvs: if req.prev_kv { prev } else { Vec::new() },
        })
    }

    fn txn(&self, req: &pb::TxnRequest) -> Result<pb::TxnResponse, KvError> {
        validate_txn(req)?;
        let ((succeeded, mut responses), revision) = self.mutate(|tx| {
            let mut ok = true;
            for (i, c) in req.compare.iter().enumerate() {
                // Evaluate every compare so malformed ones are reported even after a false one.
                ok &= tx.compare(i, c)?;
            }
            let ops = if ok { &req.success } else { &req.failure };
            let mut responses = Vec::with_capacity(ops.len());
            for op in ops {
                use pb::request_op::Request as Q;
                use pb::response_op::Response as A;
                let resp = match &op.request {
                    Some(Q::RequestRange(r)) => A::ResponseRange(tx.range(r)?),
                    Some(Q::RequestPut(p)) => {
                        let prev = tx.put(p)?;
                        A::ResponsePut(pb::PutResponse {
                            header: None,
                            prev_kv: if p.prev_kv { prev } else { None },
                        })
                    }
                    Some(Q::RequestDeleteRange(d)) => {
                        let range = KeyRange::new(&d.key, &d.range_end, d.prefix)?;
                        let prev = tx.delete_range(&range)?;
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
        })?;
        for r in &mut responses {
            use pb::response_op::Response as A;
            match &mut r.response {
                Some(A::ResponseRange(x)) => x.header = header(revision),
                Some(A::ResponsePut(x)) => x.header = header(revision),
                Some(A::ResponseDeleteRange(x)) => x.header = header(revision),
                None => {}
            }
        }
        Ok(pb::TxnResponse {
            header: header(revision),
            succeeded,
            responses,
        })
    }

    fn compact(&self, revision: i64) -> Result<pb::CompactionResponse, KvError> {
        let _w = lock(&self.write);
        let current = self.store.write(|w| {
            let current = w
                .get(META, META_REVISION)?
                .map(|b| from_be(&b))
                .transpose()?
                .unwrap_or(1);
            let compact = w
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
            w.range_visit(LOG, &[], Some(&be(revision)), |k, _| {
                old.push(k.to_vec());
                true
            })?;
            for k in old {
                w.delete(LOG, &k)?;
            }
            w.put(META, META_COMPACT, &be(revision))?;
            Ok(current)
        })?;
        self.metrics.kv.set_compact_revision(revision);
        Ok(pb::CompactionResponse {
            header: header(current),
        })
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

    fn lease_grant(&self, req: &pb::LeaseGrantRequest) -> Result<pb::LeaseGrantResponse, KvError> {
        if req.ttl < 1 || req.ttl > MAX_LEASE_TTL {
            return Err(KvError::InvalidArgument(format!(
                "lease TTL must be 1..={MAX_LEASE_TTL} seconds, got {}",
                req.ttl
            )));
        }
        if req.id < 0 {
            return Err(KvError::InvalidArgument("lease id is negative".into()));
        }
        let _w = lock(&self.write);
        let id = self.store.write(|w| {
            let id = if req.id == 0 {
                let mut next = w
                    .get(META, META_NEXT_LEASE)?
                    .map(|b| from_be(&b))
                    .transpose()?
                    .unwrap_or(1);
                while w.get(LEASES, &be(next))?.is_some() {
                    next += 1;
                }
                w.put(META, META_NEXT_LEASE, &be(next + 1))?;
                next
            } else {
                if w.get(LEASES, &be(req.id))?.is_some() {
                    return Err(KvError::FailedPrecondition(format!(
                        "lease {} already exists",
                        req.id
                    )));
                }
                req.id
            };
            w.put(
                LEASES,
                &be(id),
                &LeaseRecord { ttl: req.ttl }.encode_to_vec(),
            )?;
            Ok(id)
        })?;
        let n = {
            let mut leases = lock(&self.leases);
            leases.insert(
                id,
                LeaseState {
                    ttl: req.ttl,
                    deadline: deadline_after(Instant::now(), req.ttl),
                },
            );
            leases.len()
        };
        self.metrics.kv.set_leases(n as i64);
        self.lease_changed.notify_one();
        Ok(pb::LeaseGrantResponse {
            header: header(self.revision.load(SeqCst)),
            id,
            ttl: req.ttl,
        })
    }

    /// Revoke `id` (deleting its keys); `expired` counts it as an expiry.
    fn lease_revoke(&self, id: i64, expired: bool) -> Result<i64, KvError> {
        let ((), revision) = self.mutate_then(
            |tx| tx.revoke(id),
            || {
                if expired {
                    self.metrics.kv.lease_expired();
                }
                let n = {
                    let mut leases = lock(&self.leases);
                    leases.remove(&id);
                    leases.len()
                };
                self.metrics.kv.set_leases(n as i64);
            },
        )?;
        self.lease_changed.notify_one();
        Ok(revision)
    }

    /// Revoke `id` if it is (still) past its deadline.
    fn expire(&self, id: i64) -> Result<bool, KvError> {
        {
            let leases = lock(&self.leases);
            match leases.get(&id) {
                Some(l) if l.deadline <= Instant::now() => {}
                _ => return Ok(false),
            }
        }
        match self.lease_revoke(id, true) {
            Ok(_) => Ok(true),
            // Revoked meanwhile: not an expiry; drop the stale deadline.
            Err(KvError::LeaseNotFound(_)) => {
                lock(&self.leases).remove(&id);
                Ok(false)
            }
            Err(e) => Err(e),
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

    async fn expiry_loop(self: Arc<Self>, token: CancellationToken) {
        loop {
            let earliest = lock(&self.leases).values().map(|l| l.deadline).min();
            let sleep = async {
                match earliest {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = token.cancelled() => return,
                _ = self.lease_changed.notified() => continue,
                _ = sleep => {}
            }
            let now = Instant::now();
            let expired: Vec<i64> = lock(&self.leases)
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                let inner = self.clone();
                match tokio::task::spawn_blocking(move || inner.expire(id)).await {
                    Ok(Ok(true)) => tracing::info!(lease = id, "lease expired: revoked"),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(lease = id, "revoking an expired lease failed: {e}");
                        // Retry later rather than spinning.
                        if let Some(l) = lock(&self.leases).get_mut(&id) {
                            l.deadline = Instant::now() + Duration::from_secs(1);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(lease = id, "lease expiry task failed: {e}");
                    }
                }
            }
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

impl KvBackend for EmbeddedKv {
    async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, KvError> {
        self.blocking(move |i| i.range(&req)).await
    }

    async fn put(&self, req: pb::PutRequest) -> Result<pb::PutResponse, KvError> {
        self.blocking(move |i| i.put(&req)).await
    }

    async fn delete_range(
        &self,
        req: pb::DeleteRangeRequest,
    ) -> Result<pb::DeleteRangeResponse, KvError> {
        self.blocking(move |i| i.delete_range(&req)).await
    }

    async fn txn(&self, req: pb::TxnRequest) -> Result<pb::TxnResponse, KvError> {
        self.blocking(move |i| i.txn(&req)).await
    }

    async fn compact(&self, req: pb::CompactionRequest) -> Result<pb::CompactionResponse, KvError> {
        self.blocking(move |i| i.compact(req.revision)).await
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
        self.blocking(move |i| i.lease_grant(&req)).await
    }

    async fn lease_revoke(
        &self,
        req: pb::LeaseRevokeRequest,
    ) -> Result<pb::LeaseRevokeResponse, KvError> {
        let revision = self
            .blocking(move |i| i.lease_revoke(req.id, false))
            .await?;
        Ok(pb::LeaseRevokeResponse {
            header: header(revision),
        })
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
