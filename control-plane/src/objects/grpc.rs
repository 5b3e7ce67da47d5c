//! `weir.objects.v1.Objects` over any [`ObjectBackend`]. [`server`] builds the service in one
//! place (with weir-cp's message limits) so the server's auth layer wraps it with the others.
//!
//! Errors map to gRPC codes: missing bucket/key/upload → `NOT_FOUND`, bucket exists →
//! `ALREADY_EXISTS`, bucket not empty and `if_match` failures → `FAILED_PRECONDITION`, bad
//! range → `OUT_OF_RANGE`, digest mismatch → `DATA_LOSS`, malformed input →
//! `INVALID_ARGUMENT`, store failures → `UNAVAILABLE`, I/O → `INTERNAL`.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use tonic::{Request, Response, Status, Streaming};

use super::metrics::ObjectsMetrics;
use super::{ByteRange, ByteStream, ListRequest, ObjError, ObjectBackend, ObjectInfo, PutOptions};
use crate::proto::objects as pb;
use crate::proto::objects::objects_server::ObjectsServer;
use crate::{MAX_DECODING_MESSAGE_SIZE, MAX_ENCODING_MESSAGE_SIZE};

/// Size of the chunks GetObject sends (well under the message limit).
pub const GRPC_CHUNK: usize = 256 * 1024;

impl From<ObjError> for Status {
    fn from(e: ObjError) -> Status {
        let m = e.to_string();
        match e {
            ObjError::NoSuchBucket(_) | ObjError::NoSuchKey(_) | ObjError::NoSuchUpload(_) => {
                Status::not_found(m)
            }
            ObjError::BucketExists(_) => Status::already_exists(m),
            ObjError::BucketNotEmpty(_) => Status::failed_precondition(m),
            ObjError::InvalidRange { .. } | ObjError::EntityTooLarge => Status::out_of_range(m),
            ObjError::BadDigest(_) => Status::data_loss(m),
            ObjError::Store(_) | ObjError::Backend(_) => Status::unavailable(m),
            ObjError::Io(_) | ObjError::Corrupt(_) => Status::internal(m),
            _ => Status::invalid_argument(m),
        }
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct Grpc {
    backend: Arc<dyn ObjectBackend>,
    metrics: Arc<ObjectsMetrics>,
}

/// Build `weir.objects.v1.Objects` over `backend`.
pub fn server(
    backend: Arc<dyn ObjectBackend>,
    metrics: Arc<ObjectsMetrics>,
) -> ObjectsServer<Grpc> {
    ObjectsServer::new(Grpc { backend, metrics })
        .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_ENCODING_MESSAGE_SIZE)
}

fn to_pb(i: ObjectInfo) -> pb::ObjectInfo {
    pb::ObjectInfo {
        key: i.key,
        size: i.size,
        etag: i.etag,
        content_type: i.content_type,
        metadata: i.metadata.into_iter().collect(),
        modified_ms: i.modified_ms,
    }
}

impl Grpc {
    fn done<T>(&self, method: &'static str, r: Result<T, ObjError>) -> Result<Response<T>, Status> {
        let r = r.map_err(Status::from);
        let code = match &r {
            Ok(_) => "OK",
            Err(s) => code_name(s.code()),
        };
        self.metrics.grpc_request(method, code);
        r.map(Response::new)
    }
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match c {
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::OutOfRange => "OUT_OF_RANGE",
        C::DataLoss => "DATA_LOSS",
        C::Unavailable => "UNAVAILABLE",
        C::Internal => "INTERNAL",
        C::InvalidArgument => "INVALID_ARGUMENT",
        _ => "OTHER",
    }
}

type GetStream = Pin<Box<dyn Stream<Item = Result<pb::GetObjectResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::objects_server::Objects for Grpc {
    async fn create_bucket(
        &self,
        req: Request<pb::CreateBucketRequest>,
    ) -> Result<Response<pb::Bucket>, Status> {
        let r = self.backend.create_bucket(&req.get_ref().bucket).await;
        self.done(
            "CreateBucket",
            r.map(|b| pb::Bucket {
                name: b.name,
                created_ms: b.created_ms,
            }),
        )
    }

    async fn delete_bucket(
        &self,
        req: Request<pb::DeleteBucketRequest>,
    ) -> Result<Response<pb::DeleteBucketResponse>, Status> {
        let r = self.backend.delete_bucket(&req.get_ref().bucket).await;
        self.done("DeleteBucket", r.map(|()| pb::DeleteBucketResponse {}))
    }

    async fn list_buckets(
        &self,
        _req: Request<pb::ListBucketsRequest>,
    ) -> Result<Response<pb::ListBucketsResponse>, Status> {
        let r = self
            .backend
            .list_buckets()
            .await
            .map(|bs| pb::ListBucketsResponse {
                buckets: bs
                    .into_iter()
                    .map(|b| pb::Bucket {
                        name: b.name,
                        created_ms: b.created_ms,
                    })
                    .collect(),
            });
        self.done("ListBuckets", r)
    }

    async fn put_object(
        &self,
        req: Request<Streaming<pb::PutObjectRequest>>,
    ) -> Result<Response<pb::ObjectInfo>, Status> {
        let mut stream = req.into_inner();
        let header = match stream.message().await? {
            Some(pb::PutObjectRequest {
                part: Some(pb::put_object_request::Part::Header(h)),
            }) => h,
            _ => {
                self.metrics.grpc_request("PutObject", "INVALID_ARGUMENT");
                return Err(Status::invalid_argument(
                    "the first PutObject message must carry the header",
                ));
            }
        };
        let content_md5 = match header.content_md5.len() {
            0 => None,
            16 => {
                let mut m = [0u8; 16];
                m.copy_from_slice(&header.content_md5);
                Some(m)
            }
            _ => return Err(Status::invalid_argument("content_md5 must be 16 bytes")),
        };
        let metrics = self.metrics.clone();
        let body: ByteStream = Box::pin(stream.map(move |m| match m {
            Ok(pb::PutObjectRequest {
                part: Some(pb::put_object_request::Part::Chunk(c)),
            }) => {
                metrics.bytes_in(c.len() as u64);
                Ok(Bytes::from(c))
            }
            Ok(_) => Err(ObjError::InvalidArgument(
                "only the first PutObject message may carry a header".into(),
            )),
            Err(s) => Err(ObjError::Body(s.message().to_string())),
        }));
        let opts = PutOptions {
            content_type: Some(header.content_type).filter(|c| !c.is_empty()),
            metadata: header.metadata.into_iter().collect(),
            content_md5,
        };
        let r = self
            .backend
            .put_object(&header.bucket, &header.key, opts, body)
            .await
            .map(to_pb);
        self.done("PutObject", r)
    }

    type GetObjectStream = GetStream;

    async fn get_object(
        &self,
        req: Request<pb::GetObjectRequest>,
    ) -> Result<Response<GetStream>, Status> {
        let r = req.into_inner();
        let range = match (r.offset, r.length) {
            (_, Some(0)) => {
                self.metrics.grpc_request("GetObject", "INVALID_ARGUMENT");
                return Err(Status::invalid_argument("length must be positive"));
            }
            (None, None) => None,
            (o, l) => {
                let o = o.unwrap_or(0);
                Some(ByteRange::From(o, l.map(|l| o.saturating_add(l - 1))))
            }
        };
        if !r.if_match.is_empty() {
            let info = self.backend.head_object(&r.bucket, &r.key).await;
            match info {
                Ok(i) if i.etag == r.if_match.trim_matches('"') => {}
                Ok(_) => {
                    self.metrics
                        .grpc_request("GetObject", "FAILED_PRECONDITION");
                    return Err(Status::failed_precondition(
                        "the ETag does not match if_match",
                    ));
                }
                Err(e) => {
                    let s = Status::from(e);
                    self.metrics.grpc_request("GetObject", code_name(s.code()));
                    return Err(s);
                }
            }
        }
        let got = self.backend.get_object(&r.bucket, &r.key, range).await;
        let (info, _, body) = match got {
            Ok(v) => v,
            Err(e) => {
                let s = Status::from(e);
                self.metrics.grpc_request("GetObject", code_name(s.code()));
                return Err(s);
            }
        };
        self.metrics.grpc_request("GetObject", "OK");
        let metrics = self.metrics.clone();
        let first = futures::stream::once(async move {
            Ok(pb::GetObjectResponse {
                part: Some(pb::get_object_response::Part::Info(to_pb(info))),
            })
        });
        let chunks = rechunk(body).map(move |c| {
            c.map(|b| {
                metrics.bytes_out(b.len() as u64);
                pb::GetObjectResponse {
                    part: Some(pb::get_object_response::Part::Chunk(b.to_vec())),
                }
            })
            .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(first.chain(chunks))))
    }

    async fn head_object(
        &self,
        req: Request<pb::HeadObjectRequest>,
    ) -> Result<Response<pb::ObjectInfo>, Status> {
        let r = req.get_ref();
        let res = self.backend.head_object(&r.bucket, &r.key).await.map(to_pb);
        self.done("HeadObject", res)
    }

    async fn delete_object(
        &self,
        req: Request<pb::DeleteObjectRequest>,
    ) -> Result<Response<pb::DeleteObjectResponse>, Status> {
        let r = req.get_ref();
        let res = self
            .backend
            .delete_object(&r.bucket, &r.key)
            .await
            .map(|existed| pb::DeleteObjectResponse { existed });
        self.done("DeleteObject", res)
    }

    async fn list_objects(
        &self,
        req: Request<pb::ListObjectsRequest>,
    ) -> Result<Response<pb::ListObjectsResponse>, Status> {
        let r = req.into_inner();
        let lr = ListRequest {
            prefix: r.prefix,
            delimiter: Some(r.delimiter).filter(|d| !d.is_empty()),
            max_keys: if r.max_keys == 0 {
                super::MAX_LIST_KEYS
            } else {
                r.max_keys as usize
            },
            start_after: Some(r.start_after).filter(|s| !s.is_empty()),
            continuation_token: Some(r.continuation_token).filter(|s| !s.is_empty()),
        };
        let res = self
            .backend
            .list_objects(&r.bucket, lr)
            .await
            .map(|l| pb::ListObjectsResponse {
                objects: l.objects.into_iter().map(to_pb).collect(),
                common_prefixes: l.common_prefixes,
                truncated: l.truncated,
                next_continuation_token: l.next_token.unwrap_or_default(),
            });
        self.done("ListObjects", res)
    }
}

/// Regroup a body into chunks of up to [`GRPC_CHUNK`] bytes.
fn rechunk(body: ByteStream) -> impl Stream<Item = Result<Bytes, ObjError>> + Send {
    body.flat_map(|c| {
        let pieces: Vec<Result<Bytes, ObjError>> = match c {
            Ok(b) => {
                let mut v = Vec::new();
                let mut b = b;
                while b.len() > GRPC_CHUNK {
                    v.push(Ok(b.split_to(GRPC_CHUNK)));
                }
                v.push(Ok(b));
                v
            }
            Err(e) => vec![Err(e)],
        };
        futures::stream::iter(pieces)
    })
}
