//! The `weir.registry.v1.Registry` gRPC service.
//!
//! [`server`] is the one place the service is constructed (with the crate's message size
//! limits), so an authentication interceptor can wrap it there. Mutations run on the blocking
//! pool (they commit durably) and are acknowledged only after the commit.
//!
//! Error codes: invalid input `INVALID_ARGUMENT` (field path in the message), unknown
//! instance `NOT_FOUND`, heartbeat of a non-TTL instance `FAILED_PRECONDITION`, watch from a
//! revision older than the kept history `OUT_OF_RANGE`, storage failure `UNAVAILABLE`.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{Registry, RegistryError, pb};
use pb::registry_server::RegistryServer;

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Status {
        let msg = e.to_string();
        match e {
            RegistryError::Invalid { .. } => Status::invalid_argument(msg),
            RegistryError::NotFound { .. } => Status::not_found(msg),
            RegistryError::NotTtl { .. } => Status::failed_precondition(msg),
            RegistryError::Compacted { .. } => Status::out_of_range(msg),
            RegistryError::Backend(_) => Status::unavailable(msg),
        }
    }
}

/// The service implementation.
#[derive(Debug, Clone)]
pub struct RegistryService {
    registry: Arc<Registry>,
    shutdown: CancellationToken,
}

/// The gRPC service over `registry`, with weir-cp's message limits; watch streams end when
/// `shutdown` is cancelled.
pub fn server(
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> RegistryServer<RegistryService> {
    RegistryServer::new(RegistryService { registry, shutdown })
        .max_decoding_message_size(crate::MAX_DECODING_MESSAGE_SIZE)
        .max_encoding_message_size(crate::MAX_ENCODING_MESSAGE_SIZE)
}

impl RegistryService {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
    ) -> Result<T, Status> {
        let reg = self.registry.clone();
        tokio::task::spawn_blocking(move || f(&reg))
            .await
            .map_err(|e| Status::internal(format!("registry task failed: {e}")))?
            .map_err(Status::from)
    }
}

fn non_empty(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        return Err(Status::invalid_argument(format!(
            "invalid {field}: must not be empty"
        )));
    }
    Ok(())
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryService {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let inst = req
            .into_inner()
            .instance
            .ok_or_else(|| Status::invalid_argument("invalid instance: required"))?;
        let r = self.blocking(move |reg| reg.register(&inst)).await?;
        Ok(Response::new(pb::RegisterResponse {
            instance: Some(r.instance),
            revision: r.revision,
            created: r.created,
        }))
    }

    async fn deregister(
        &self,
        req: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let r = req.into_inner();
        let revision = self
            .blocking(move |reg| reg.deregister(&r.service, &r.instance_id))
            .await?;
        Ok(Response::new(pb::DeregisterResponse { revision }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let status = r.status();
        let (instance, revision) = self
            .blocking(move |reg| reg.heartbeat(&r.service, &r.instance_id, status, &r.note))
            .await?;
        Ok(Response::new(pb::HeartbeatResponse {
            instance: Some(instance),
            revision,
        }))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let r = req.into_inner();
        let service = (!r.service.is_empty()).then_some(r.service.as_str());
        let (instances, revision) = self.registry.list(service, r.healthy_only);
        Ok(Response::new(pb::ListResponse {
            instances,
            revision,
        }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::Instance>, Status> {
        let r = req.into_inner();
        non_empty("service", &r.service)?;
        non_empty("instance_id", &r.instance_id)?;
        Ok(Response::new(
            self.registry.get(&r.service, &r.instance_id)?,
        ))
    }

    async fn services(
        &self,
        _req: Request<pb::ServicesRequest>,
    ) -> Result<Response<pb::ServicesResponse>, Status> {
        let (services, revision) = self.registry.services();
        Ok(Response::new(pb::ServicesResponse { services, revision }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = req.into_inner();
        let service = (!r.service.is_empty()).then_some(r.service);
        let reg = self.registry.clone();
        // Subscribe before reading so no change between the read and the wait is missed.
        let mut changes = reg.subscribe();
        let from = if r.start_revision == 0 {
            reg.revision() + 1
        } else {
            r.start_revision
        };
        // An out-of-range start fails the call itself.
        let (first, revision) = reg.events_since(from, service.as_deref())?;
        let (tx, rx) = mpsc::channel::<Result<pb::WatchResponse, Status>>(16);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let created = pb::WatchResponse {
                created: true,
                revision,
                events: first,
            };
            if tx.send(Ok(created)).await.is_err() {
                return;
            }
            let mut next = revision + 1;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    c = changes.changed() => if c.is_err() { return },
                }
                match reg.events_since(next, service.as_deref()) {
                    Ok((events, revision)) => {
                        next = revision + 1;
                        if events.is_empty() {
                            continue;
                        }
                        let msg = pb::WatchResponse {
                            created: false,
                            revision,
                            events,
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        // This watcher fell behind the kept history.
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
