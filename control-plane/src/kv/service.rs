//! The `weir.kv.v1` gRPC services (`KV`, `Watch`, `Lease`) over any [`KvBackend`].
//!
//! [`services`] builds all three in one place (with weir-cp's message size limits), so the
//! server adds them together and an auth interceptor can wrap them there. Long-lived streams
//! (watches, lease keep-alives) end when the server's shutdown token is cancelled.
//!
//! Errors map to gRPC codes: [`KvError::InvalidArgument`] → `INVALID_ARGUMENT`,
//! [`KvError::FailedPrecondition`] → `FAILED_PRECONDITION`, [`KvError::Compacted`] and
//! [`KvError::FutureRevision`] → `OUT_OF_RANGE` (the compacted case also carries the compact
//! revision in the `weir-kv-compact-revision` metadata), [`KvError::LeaseNotFound`] →
//! `NOT_FOUND`, [`KvError::Store`] and [`KvError::CommitFailed`] → `UNAVAILABLE`, [`KvError::Internal`] → `INTERNAL`.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::metrics::Op;
use super::{KvBackend, KvError};
use crate::metrics::Metrics;
use crate::proto::kv as pb;
use crate::proto::kv::kv_server::KvServer;
use crate::proto::kv::lease_server::LeaseServer;
use crate::proto::kv::watch_server::WatchServer;
use crate::{MAX_DECODING_MESSAGE_SIZE, MAX_ENCODING_MESSAGE_SIZE};

/// Metadata key carrying the compact revision on an `OUT_OF_RANGE` for a compacted revision.
pub const COMPACT_REVISION_METADATA: &str = "weir-kv-compact-revision";

impl From<KvError> for Status {
    fn from(e: KvError) -> Status {
        let msg = e.to_string();
        match e {
            KvError::InvalidArgument(_) => Status::invalid_argument(msg),
            KvError::FailedPrecondition(_) => Status::failed_precondition(msg),
            KvError::Compacted {
                compact_revision, ..
            } => {
                let mut s = Status::out_of_range(msg);
                if let Ok(v) = compact_revision.to_string().parse() {
                    s.metadata_mut().insert(COMPACT_REVISION_METADATA, v);
                }
                s
            }
            KvError::FutureRevision { .. } => Status::out_of_range(msg),
            KvError::LeaseNotFound(_) => Status::not_found(msg),
            KvError::Store(_) | KvError::CommitFailed(_) | KvError::Unavailable(_) => {
                Status::unavailable(msg)
            }
            KvError::Internal(_) => Status::internal(msg),
        }
    }
}

/// The three services of one backend.
#[derive(Debug)]
pub struct KvServices<B: KvBackend> {
    /// `weir.kv.v1.KV`.
    pub kv: KvServer<Grpc<B>>,
    /// `weir.kv.v1.Watch`.
    pub watch: WatchServer<Grpc<B>>,
    /// `weir.kv.v1.Lease`.
    pub lease: LeaseServer<Grpc<B>>,
}

/// Build the KV services over `backend`; their streams end when `token` is cancelled.
pub fn services<B: KvBackend>(
    backend: Arc<B>,
    metrics: Arc<Metrics>,
    token: CancellationToken,
) -> KvServices<B> {
    let g = Grpc {
        backend,
        metrics,
        token,
    };
    KvServices {
        kv: KvServer::new(g.clone())
            .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_ENCODING_MESSAGE_SIZE),
        watch: WatchServer::new(g.clone())
            .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_ENCODING_MESSAGE_SIZE),
        lease: LeaseServer::new(g)
            .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_ENCODING_MESSAGE_SIZE),
    }
}

/// The service implementation (one type for all three services).
#[derive(Debug)]
pub struct Grpc<B> {
    backend: Arc<B>,
    metrics: Arc<Metrics>,
    token: CancellationToken,
}

impl<B> Clone for Grpc<B> {
    fn clone(&self) -> Self {
        Grpc {
            backend: self.backend.clone(),
            metrics: self.metrics.clone(),
            token: self.token.clone(),
        }
    }
}

impl<B> Grpc<B> {
    fn count<T>(&self, op: Op, r: Result<T, KvError>) -> Result<Response<T>, Status> {
        self.metrics.kv.request(op);
        match r {
            Ok(v) => Ok(Response::new(v)),
            Err(e) => {
                self.metrics.kv.error(op);
                Err(e.into())
            }
        }
    }
}

/// A boxed response stream.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Decrements the watcher gauge when the stream is dropped.
struct WatcherGuard(Arc<Metrics>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.kv.add_watchers(-1);
    }
}

#[tonic::async_trait]
impl<B: KvBackend> pb::kv_server::Kv for Grpc<B> {
    async fn range(
        &self,
        req: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let r = self.backend.range(req.into_inner()).await;
        self.count(Op::Range, r)
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let r = self.backend.put(req.into_inner()).await;
        self.count(Op::Put, r)
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let r = self.backend.delete_range(req.into_inner()).await;
        self.count(Op::DeleteRange, r)
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let r = self.backend.txn(req.into_inner()).await;
        self.count(Op::Txn, r)
    }

    async fn compact(
        &self,
        req: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        let r = self.backend.compact(req.into_inner()).await;
        self.count(Op::Compact, r)
    }
}

#[tonic::async_trait]
impl<B: KvBackend> pb::watch_server::Watch for Grpc<B> {
    type WatchStream = ResponseStream<pb::WatchResponse>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = self.backend.watch(req.into_inner()).await;
        let stream = self.count(Op::Watch, r)?.into_inner();
        self.metrics.kv.add_watchers(1);
        let guard = WatcherGuard(self.metrics.clone());
        let out = stream
            .map(move |item| {
                let _ = &guard;
                item.map_err(Status::from)
            })
            .take_until(self.token.clone().cancelled_owned());
        Ok(Response::new(Box::pin(out)))
    }
}

#[tonic::async_trait]
impl<B: KvBackend> pb::lease_server::Lease for Grpc<B> {
    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let r = self.backend.lease_grant(req.into_inner()).await;
        self.count(Op::LeaseGrant, r)
    }

    async fn lease_revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let r = self.backend.lease_revoke(req.into_inner()).await;
        self.count(Op::LeaseRevoke, r)
    }

    type LeaseKeepAliveStream = ResponseStream<pb::LeaseKeepAliveResponse>;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = this.token.cancelled() => return,
                    _ = tx.closed() => return,
                    m = inbound.message() => m,
                };
                let req = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(s) => {
                        tracing::debug!("lease keep-alive stream ended: {s}");
                        return;
                    }
                };
                let r = this.backend.lease_keep_alive(req).await;
                let item = this.count(Op::LeaseKeepAlive, r).map(Response::into_inner);
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        let out = tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(out)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let r = self.backend.lease_time_to_live(req.into_inner()).await;
        self.count(Op::LeaseTimeToLive, r)
    }

    async fn lease_leases(
        &self,
        _req: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        let r = self.backend.lease_leases().await;
        self.count(Op::LeaseLeases, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_grpc_codes() {
        let cases = [
            (
                KvError::InvalidArgument("x".into()),
                tonic::Code::InvalidArgument,
            ),
            (
                KvError::FailedPrecondition("x".into()),
                tonic::Code::FailedPrecondition,
            ),
            (
                KvError::FutureRevision {
                    requested: 9,
                    current: 3,
                },
                tonic::Code::OutOfRange,
            ),
            (KvError::LeaseNotFound(4), tonic::Code::NotFound),
            (KvError::Internal("x".into()), tonic::Code::Internal),
        ];
        for (e, code) in cases {
            assert_eq!(Status::from(e).code(), code);
        }
        let s = Status::from(KvError::Compacted {
            requested: 2,
            compact_revision: 5,
        });
        assert_eq!(s.code(), tonic::Code::OutOfRange);
        assert!(s.message().contains("compact revision is 5"), "{s}");
        assert_eq!(
            s.metadata()
                .get(COMPACT_REVISION_METADATA)
                .and_then(|v| v.to_str().ok()),
            Some("5")
        );
    }
}
