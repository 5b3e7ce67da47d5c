//! [`EtcdKv`]: the KV store ([`KvBackend`]) on etcd, one etcd call per API call, keys under
//! `<prefix>/kv/` (the prefix is added on the way in and stripped on the way out).
//!
//! etcd has the same model (one revision, `create_revision` / `mod_revision` / `version`,
//! leases, watches from a revision, transactions, compaction), so the mapping is direct:
//! - Put with `expected_mod_revision` is a `Txn` (compare `mod_revision`, put) whose failure
//!   is `FAILED_PRECONDITION`, like the embedded backend.
//! - Compacted and future revisions come back from etcd as `OUT_OF_RANGE`; the compact
//!   revision (which etcd's error does not carry) is found by bisecting range reads.
//! - A watch whose start revision is compacted fails up front (a range read at that revision
//!   first); one that falls behind a compaction later ends with [`KvError::Compacted`].
//! - One keep-alive is one round trip on a fresh keep-alive stream.
//!
//! Deviation: the revision is etcd's, shared with everything else in that etcd (the registry
//! and config keys of weir-cp, and other tenants), so it can jump by more than one between
//! two KV writes. Lease expiry is etcd's own (no expiry task here).

use std::sync::Arc;

use etcd_client::proto::{PbKeyValue, PbTxnOpResponse};
use etcd_client::{
    Compare, CompareOp, DeleteOptions, EventType, GetOptions, LeaseGrantOptions,
    LeaseTimeToLiveOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use futures::StreamExt as _;

use super::Etcd;
use crate::kv::{
    KeyRange, KvBackend, KvError, MAX_LEASE_TTL, MAX_TXN_OPS, WatchStream, header, validate_put,
};
use crate::proto::kv as pb;
use crate::proto::kv::compare::{CompareResult, CompareTarget, TargetUnion};

/// The KV store on etcd; see the module docs.
#[derive(Debug, Clone)]
pub struct EtcdKv {
    etcd: Arc<Etcd>,
    ns: Arc<[u8]>,
}

impl EtcdKv {
    /// The KV store on `etcd`, under `<prefix>/kv/`.
    pub fn new(etcd: Arc<Etcd>) -> EtcdKv {
        let ns = etcd.namespace("kv").into();
        EtcdKv { etcd, ns }
    }

    fn key(&self, k: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.ns.len() + k.len());
        out.extend_from_slice(&self.ns);
        out.extend_from_slice(k);
        out
    }

    /// A key range as etcd's (key, range_end) inside the namespace.
    fn range(&self, r: &KeyRange) -> (Vec<u8>, Vec<u8>) {
        let end = match &r.end {
            Some(e) => self.key(e),
            None => super::prefix_end(&self.ns),
        };
        (self.key(&r.start), end)
    }

    fn strip(&self, kv: PbKeyValue) -> pb::KeyValue {
        pb::KeyValue {
            key: kv
                .key
                .strip_prefix(&self.ns[..])
                .map_or_else(|| kv.key.clone(), <[u8]>::to_vec),
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }

    fn get_options(&self, req: &pb::RangeRequest) -> Result<(Vec<u8>, GetOptions), KvError> {
        let r = KeyRange::new(&req.key, &req.range_end, req.prefix)?;
        if req.limit < 0 {
            return Err(KvError::InvalidArgument("limit is negative".into()));
        }
        let (key, end) = self.range(&r);
        let mut o = GetOptions::new()
            .with_range(end)
            .with_limit(req.limit)
            .with_revision(req.revision);
        if req.keys_only {
            o = o.with_keys_only();
        }
        if req.count_only {
            o = o.with_count_only();
        }
        Ok((key, o))
    }

    fn range_response(
        &self,
        r: etcd_client::proto::PbRangeResponse,
        keys_only: bool,
    ) -> pb::RangeResponse {
        let kvs: Vec<pb::KeyValue> = r
            .kvs
            .into_iter()
            .map(|kv| {
                let mut kv = self.strip(kv);
                if keys_only {
                    kv.value.clear();
                }
                kv
            })
            .collect();
        let next_key = match (r.more, kvs.last()) {
            (true, Some(last)) => {
                let mut k = last.key.clone();
                k.push(0);
                k
            }
            _ => Vec::new(),
        };
        pb::RangeResponse {
            header: header(r.header.map_or(0, |h| h.revision)),
            kvs,
            more: r.more,
            count: r.count,
            next_key,
        }
    }

    fn delete_options(
        &self,
        req: &pb::DeleteRangeRequest,
    ) -> Result<(Vec<u8>, DeleteOptions), KvError> {
        let r = KeyRange::new(&req.key, &req.range_end, req.prefix)?;
        let (key, end) = self.range(&r);
        let mut o = DeleteOptions::new().with_range(end);
        if req.prev_kv {
            o = o.with_prev_key();
        }
        Ok((key, o))
    }

    fn put_options(&self, req: &pb::PutRequest) -> PutOptions {
        let mut o = PutOptions::new().with_lease(req.lease);
        if req.prev_kv {
            o = o.with_prev_key();
        }
        o
    }

    fn compare(&self, c: &pb::Compare) -> Result<Compare, KvError> {
        let op = match CompareResult::try_from(c.result) {
            Ok(CompareResult::Equal) => CompareOp::Equal,
            Ok(CompareResult::Greater) => CompareOp::Greater,
            Ok(CompareResult::Less) => CompareOp::Less,
            Ok(CompareResult::NotEqual) => CompareOp::NotEqual,
            Err(_) => return Err(KvError::InvalidArgument("unknown compare result".into())),
        };
        if c.key.is_empty() {
            return Err(KvError::InvalidArgument("compare key is empty".into()));
        }
        let key = self.key(&c.key);
        let target = CompareTarget::try_from(c.target)
            .map_err(|_| KvError::InvalidArgument("unknown compare target".into()))?;
        let cmp = match (target, &c.target_union) {
            (CompareTarget::Version, Some(TargetUnion::Version(v))) => {
                Compare::version(key, op, *v)
            }
            (CompareTarget::Create, Some(TargetUnion::CreateRevision(v))) => {
                Compare::create_revision(key, op, *v)
            }
            (CompareTarget::Mod, Some(TargetUnion::ModRevision(v))) => {
                Compare::mod_revision(key, op, *v)
            }
            (CompareTarget::Value, Some(TargetUnion::Value(v))) => {
                Compare::value(key, op, v.clone())
            }
            (CompareTarget::Lease, Some(TargetUnion::Lease(v))) => Compare::lease(key, op, *v),
            _ => {
                return Err(KvError::InvalidArgument(
                    "compare target and value disagree".into(),
                ));
            }
        };
        Ok(cmp)
    }

    fn op(&self, op: &pb::RequestOp) -> Result<TxnOp, KvError> {
        use pb::request_op::Request;
        match &op.request {
            Some(Request::RequestRange(r)) => {
                let (key, o) = self.get_options(r)?;
                Ok(TxnOp::get(key, Some(o)))
            }
            Some(Request::RequestPut(p)) => {
                validate_put(p)?;
                if p.expected_mod_revision.is_some() {
                    return Err(KvError::InvalidArgument(
                        "expected_mod_revision is not allowed inside a txn (use a compare)".into(),
                    ));
                }
                Ok(TxnOp::put(
                    self.key(&p.key),
                    p.value.clone(),
                    Some(self.put_options(p)),
                ))
            }
            Some(Request::RequestDeleteRange(d)) => {
                let (key, o) = self.delete_options(d)?;
                Ok(TxnOp::delete(key, Some(o)))
            }
            None => Err(KvError::InvalidArgument("empty txn op".into())),
        }
    }

    /// Map an etcd failure; `lease` names the lease the request used, if any.
    async fn error(&self, e: etcd_client::Error, requested: i64, lease: i64) -> KvError {
        let etcd_client::Error::GRpcStatus(s) = &e else {
            return KvError::Unavailable(e.to_string());
        };
        let msg = s.message();
        match s.code() {
            tonic::Code::OutOfRange if msg.contains("compacted") => KvError::Compacted {
                requested,
                compact_revision: self.compact_revision(requested).await.unwrap_or(requested),
            },
            tonic::Code::OutOfRange if msg.contains("future") => KvError::FutureRevision {
                requested,
                current: self.current_revision().await.unwrap_or(0),
            },
            tonic::Code::NotFound if msg.contains("lease") => KvError::LeaseNotFound(lease),
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => {
                KvError::InvalidArgument(msg.into())
            }
            tonic::Code::FailedPrecondition => KvError::FailedPrecondition(msg.into()),
            _ => KvError::Unavailable(e.to_string()),
        }
    }

    async fn current_revision(&self) -> Result<i64, etcd_client::Error> {
        let r = self
            .etcd
            .client()
            .get(self.ns.to_vec(), Some(GetOptions::new().with_count_only()))
            .await?;
        Ok(r.header().map_or(0, |h| h.revision()))
    }

    /// etcd's compact revision, knowing `compacted` is below it: the lowest revision a range
    /// read still succeeds at (etcd serves reads at the compact revision itself), found by
    /// bisection up to the current revision (etcd's errors do not carry it).
    pub async fn compact_revision(&self, compacted: i64) -> Result<i64, etcd_client::Error> {
        let mut client = self.etcd.client();
        let (mut lo, mut hi) = (compacted, self.current_revision().await?);
        // Invariant: reading at `lo` fails (compacted), at `hi` succeeds.
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let o = GetOptions::new().with_revision(mid).with_count_only();
            match client.get(self.ns.to_vec(), Some(o)).await {
                Ok(_) => hi = mid,
                Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::OutOfRange => {
                    lo = mid
                }
                Err(e) => return Err(e),
            }
        }
        Ok(hi)
    }

    async fn open_watch(&self, req: pb::WatchRequest) -> Result<WatchStream, KvError> {
        let r = KeyRange::new(&req.key, &req.range_end, req.prefix)?;
        let (key, end) = self.range(&r);
        if req.start_revision < 0 {
            return Err(KvError::InvalidArgument(
                "start_revision is negative".into(),
            ));
        }
        if req.start_revision > 0 {
            // Refuse a compacted start up front, as the embedded backend does.
            let probe = GetOptions::new()
                .with_revision(req.start_revision)
                .with_count_only();
            if let Err(e) = self.etcd.client().get(key.clone(), Some(probe)).await {
                match self.error(e, req.start_revision, 0).await {
                    // A start after the current revision waits for it, as in etcd.
                    KvError::FutureRevision { .. } => {}
                    e => return Err(e),
                }
            }
        }
        let mut o = WatchOptions::new()
            .with_range(end)
            .with_start_revision(req.start_revision);
        if req.prev_kv {
            o = o.with_prev_key();
        }
        if req.progress_notify {
            o = o.with_progress_notify();
        }
        let stream = match self.etcd.client().watch(key, Some(o)).await {
            Ok(s) => s,
            Err(e) => return Err(self.error(e, req.start_revision, 0).await),
        };
        let me = self.clone();
        let requested = req.start_revision;
        let out = futures::stream::unfold(Some(stream), move |state| {
            let me = me.clone();
            async move {
                let mut s = state?;
                loop {
                    let msg = match s.message().await {
                        Ok(Some(m)) => m,
                        Ok(None) => return None,
                        Err(e) => return Some((Err(me.error(e, requested, 0).await), None)),
                    };
                    let m = msg.0;
                    if m.compact_revision > 0 {
                        let err = KvError::Compacted {
                            requested,
                            compact_revision: m.compact_revision,
                        };
                        return Some((Err(err), None));
                    }
                    if m.canceled {
                        let err = KvError::Unavailable(format!(
                            "etcd cancelled the watch: {}",
                            m.cancel_reason
                        ));
                        return Some((Err(err), None));
                    }
                    if m.created && m.events.is_empty() {
                        continue;
                    }
                    let revision = m.header.map_or(0, |h| h.revision);
                    let progress = m.events.is_empty();
                    let events = m
                        .events
                        .into_iter()
                        .map(|e| pb::Event {
                            r#type: if e.r#type == EventType::Delete as i32 {
                                pb::event::EventType::Delete
                            } else {
                                pb::event::EventType::Put
                            } as i32,
                            kv: e.kv.map(|kv| me.strip(kv)),
                            prev_kv: e.prev_kv.map(|kv| me.strip(kv)),
                        })
                        .collect();
                    let resp = pb::WatchResponse {
                        header: header(revision),
                        events,
                        progress,
                    };
                    return Some((Ok(resp), Some(s)));
                }
            }
        });
        Ok(out.boxed())
    }
}

impl KvBackend for EtcdKv {
    async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, KvError> {
        let (key, o) = self.get_options(&req)?;
        match self.etcd.client().get(key, Some(o)).await {
            Ok(r) => Ok(self.range_response(r.0, req.keys_only)),
            Err(e) => Err(self.error(e, req.revision, 0).await),
        }
    }

    async fn put(&self, req: pb::PutRequest) -> Result<pb::PutResponse, KvError> {
        validate_put(&req)?;
        let key = self.key(&req.key);
        let mut client = self.etcd.client();
        let Some(expected) = req.expected_mod_revision else {
            return match client
                .put(key, req.value.clone(), Some(self.put_options(&req)))
                .await
            {
                Ok(r) => Ok(pb::PutResponse {
                    header: header(r.0.header.map_or(0, |h| h.revision)),
                    prev_kv: r.0.prev_kv.map(|kv| self.strip(kv)),
                }),
                Err(e) => Err(self.error(e, 0, req.lease).await),
            };
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                expected,
            )])
            .and_then([TxnOp::put(
                key.clone(),
                req.value.clone(),
                Some(self.put_options(&req)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let r = match client.txn(txn).await {
            Ok(r) => r.0,
            Err(e) => return Err(self.error(e, 0, req.lease).await),
        };
        let first = r.responses.into_iter().next().and_then(|o| o.response);
        if !r.succeeded {
            let actual = match first {
                Some(PbTxnOpResponse::ResponseRange(g)) => {
                    g.kvs.first().map_or(0, |kv| kv.mod_revision)
                }
                _ => 0,
            };
            return Err(KvError::FailedPrecondition(format!(
                "compare-and-swap failed: mod_revision of {:?} is {actual}, expected {expected}",
                String::from_utf8_lossy(&req.key)
            )));
        }
        let prev_kv = match first {
            Some(PbTxnOpResponse::ResponsePut(p)) => p.prev_kv.map(|kv| self.strip(kv)),
            _ => None,
        };
        Ok(pb::PutResponse {
            header: header(r.header.map_or(0, |h| h.revision)),
            prev_kv,
        })
    }

    async fn delete_range(
        &self,
        req: pb::DeleteRangeRequest,
    ) -> Result<pb::DeleteRangeResponse, KvError> {
        let (key, o) = self.delete_options(&req)?;
        match self.etcd.client().delete(key, Some(o)).await {
            Ok(r) => Ok(pb::DeleteRangeResponse {
                header: header(r.0.header.map_or(0, |h| h.revision)),
                deleted: r.0.deleted,
                prev_kvs: r.0.prev_kvs.into_iter().map(|kv| self.strip(kv)).collect(),
            }),
            Err(e) => Err(self.error(e, 0, 0).await),
        }
    }

    async fn txn(&self, req: pb::TxnRequest) -> Result<pb::TxnResponse, KvError> {
        if req.compare.len() > MAX_TXN_OPS
            || req.success.len() > MAX_TXN_OPS
            || req.failure.len() > MAX_TXN_OPS
        {
            return Err(KvError::InvalidArgument(format!(
                "too many operations in txn request (at most {MAX_TXN_OPS} each)"
            )));
        }
        let compares = req
            .compare
            .iter()
            .map(|c| self.compare(c))
            .collect::<Result<Vec<_>, _>>()?;
        let success = req
            .success
            .iter()
            .map(|o| self.op(o))
            .collect::<Result<Vec<_>, _>>()?;
        let failure = req
            .failure
            .iter()
            .map(|o| self.op(o))
            .collect::<Result<Vec<_>, _>>()?;
        let keys_only: Vec<bool> = req
            .success
            .iter()
            .chain(req.failure.iter())
            .map(|o| match &o.request {
                Some(pb::request_op::Request::RequestRange(r)) => r.keys_only,
                _ => false,
            })
            .collect();
        let lease = req
            .success
            .iter()
            .chain(req.failure.iter())
            .find_map(|o| match &o.request {
                Some(pb::request_op::Request::RequestPut(p)) if p.lease != 0 => Some(p.lease),
                _ => None,
            })
            .unwrap_or(0);
        let txn = Txn::new().when(compares).and_then(success).or_else(failure);
        let r = match self.etcd.client().txn(txn).await {
            Ok(r) => r.0,
            Err(e) => return Err(self.error(e, 0, lease).await),
        };
        let offset = if r.succeeded { 0 } else { req.success.len() };
        let revision = r.header.map_or(0, |h| h.revision);
        let responses = r
            .responses
            .into_iter()
            .enumerate()
            .map(|(i, op)| {
                use pb::response_op::Response;
                let response = match op.response {
                    Some(PbTxnOpResponse::ResponseRange(g)) => {
                        let ko = keys_only.get(offset + i).copied().unwrap_or(false);
                        Some(Response::ResponseRange(self.range_response(g, ko)))
                    }
                    Some(PbTxnOpResponse::ResponsePut(p)) => {
                        Some(Response::ResponsePut(pb::PutResponse {
                            header: header(revision),
                            prev_kv: p.prev_kv.map(|kv| self.strip(kv)),
                        }))
                    }
                    Some(PbTxnOpResponse::ResponseDeleteRange(d)) => {
                        Some(Response::ResponseDeleteRange(pb::DeleteRangeResponse {
                            header: header(revision),
                            deleted: d.deleted,
                            prev_kvs: d.prev_kvs.into_iter().map(|kv| self.strip(kv)).collect(),
                        }))
                    }
                    _ => None,
                };
                pb::ResponseOp { response }
            })
            .collect();
        Ok(pb::TxnResponse {
            header: header(revision),
            succeeded: r.succeeded,
            responses,
        })
    }

    async fn compact(&self, req: pb::CompactionRequest) -> Result<pb::CompactionResponse, KvError> {
        if req.revision <= 0 {
            return Err(KvError::InvalidArgument(
                "compact revision must be positive".into(),
            ));
        }
        match self.etcd.client().compact(req.revision, None).await {
            Ok(r) => Ok(pb::CompactionResponse {
                header: header(r.0.header.map_or(0, |h| h.revision)),
            }),
            Err(e) => Err(self.error(e, req.revision, 0).await),
        }
    }

    async fn watch(&self, req: pb::WatchRequest) -> Result<WatchStream, KvError> {
        // Several etcd round trips: keep the caller's future small.
        Box::pin(self.open_watch(req)).await
    }

    async fn lease_grant(
        &self,
        req: pb::LeaseGrantRequest,
    ) -> Result<pb::LeaseGrantResponse, KvError> {
        if req.ttl <= 0 || req.ttl > MAX_LEASE_TTL {
            return Err(KvError::InvalidArgument(format!(
                "lease TTL must be in 1..={MAX_LEASE_TTL} seconds"
            )));
        }
        if req.id < 0 {
            return Err(KvError::InvalidArgument("lease id is negative".into()));
        }
        let o = LeaseGrantOptions::new().with_id(req.id);
        match self.etcd.client().lease_grant(req.ttl, Some(o)).await {
            Ok(r) if r.0.error.is_empty() => Ok(pb::LeaseGrantResponse {
                header: header(r.0.header.map_or(0, |h| h.revision)),
                id: r.0.id,
                ttl: r.0.ttl,
            }),
            Ok(r) => Err(KvError::FailedPrecondition(r.0.error)),
            Err(e) => Err(self.error(e, 0, req.id).await),
        }
    }

    async fn lease_revoke(
        &self,
        req: pb::LeaseRevokeRequest,
    ) -> Result<pb::LeaseRevokeResponse, KvError> {
        match self.etcd.client().lease_revoke(req.id).await {
            Ok(r) => Ok(pb::LeaseRevokeResponse {
                header: header(r.0.header.map_or(0, |h| h.revision)),
            }),
            Err(e) => Err(self.error(e, 0, req.id).await),
        }
    }

    async fn lease_keep_alive(
        &self,
        req: pb::LeaseKeepAliveRequest,
    ) -> Result<pb::LeaseKeepAliveResponse, KvError> {
        let once = async {
            let (mut keeper, mut stream) = self.etcd.client().lease_keep_alive(req.id).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        match once.await {
            Ok(Some(r)) => Ok(pb::LeaseKeepAliveResponse {
                header: header(r.0.header.map_or(0, |h| h.revision)),
                id: req.id,
                ttl: r.0.ttl.max(0),
            }),
            Ok(None) => Err(KvError::Unavailable(
                "etcd closed the keep-alive stream".into(),
            )),
            // etcd answers TTL 0 for a missing lease; the client turns that into an error.
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => {
                Ok(pb::LeaseKeepAliveResponse {
                    header: header(self.current_revision().await.unwrap_or(0)),
                    id: req.id,
                    ttl: 0,
                })
            }
            Err(e) => Err(self.error(e, 0, req.id).await),
        }
    }

    async fn lease_time_to_live(
        &self,
        req: pb::LeaseTimeToLiveRequest,
    ) -> Result<pb::LeaseTimeToLiveResponse, KvError> {
        let mut o = LeaseTimeToLiveOptions::new();
        if req.keys {
            o = o.with_keys();
        }
        match self.etcd.client().lease_time_to_live(req.id, Some(o)).await {
            // etcd answers -1 for a lease that does not exist (or has expired).
            Ok(r) if r.0.ttl < 0 => Err(KvError::LeaseNotFound(req.id)),
            Ok(r) => Ok(pb::LeaseTimeToLiveResponse {
                header: header(r.0.header.map_or(0, |h| h.revision)),
                id: r.0.id,
                ttl: r.0.ttl,
                granted_ttl: r.0.granted_ttl,
                keys: r
                    .0
                    .keys
                    .into_iter()
                    .filter_map(|k| k.strip_prefix(&self.ns[..]).map(<[u8]>::to_vec))
                    .collect(),
            }),
            Err(e) => Err(self.error(e, 0, req.id).await),
        }
    }

    async fn lease_leases(&self) -> Result<pb::LeaseLeasesResponse, KvError> {
        match self.etcd.client().leases().await {
            Ok(r) => Ok(pb::LeaseLeasesResponse {
                header: header(r.0.header.map_or(0, |h| h.revision)),
                leases: r
                    .0
                    .leases
                    .into_iter()
                    .map(|l| pb::LeaseStatus { id: l.id })
                    .collect(),
            }),
            Err(e) => Err(self.error(e, 0, 0).await),
        }
    }
}
