//! One accept-and-serve loop for weir-cp's HTTP/1.1 endpoints: the config API
//! ([`crate::api`]), the S3 endpoint ([`crate::objects::s3`]) and the injector's admission
//! webhook ([`crate::inject::server`]).
//!
//! Per connection: `TCP_NODELAY` (small answers written in pieces must not wait for a delayed
//! ACK), an optional TLS handshake bounded by [`HANDSHAKE_TIMEOUT`] (the client's verified
//! certificates are handed to the handler), hyper's HTTP/1.1 server with a header read timeout
//! ([`HEADER_TIMEOUT`], so a client trickling a request head cannot hold a connection
//! forever), and a graceful shutdown when the token is cancelled (in-flight requests finish,
//! idle keep-alive connections close).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

/// How long a client may take for its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a complete request head (hyper's own default; it also
/// closes keep-alive connections idle that long).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait after a failed `accept` (e.g. out of file descriptors) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The connection's verified client certificates (TLS with a client CA only).
pub type PeerCerts = Option<Arc<Vec<CertificateDer<'static>>>>;

/// What a handler knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct Conn {
    /// The client's address.
    pub remote: SocketAddr,
    /// Its verified client certificates.
    pub certs: PeerCerts,
}

/// Serve HTTP/1.1 on `listener` until `shutdown` is cancelled, over TLS when `tls` is set.
/// Every request goes to `handler` with its connection's [`Conn`]. `endpoint`
/// names the endpoint in log lines ("API", "S3", "webhook").
pub async fn serve<H, Fut, B>(
    endpoint: &'static str,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>, Conn) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(endpoint, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(endpoint, error = %e, "cannot set TCP_NODELAY");
        }
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let Some(acceptor) = tls else {
                let conn = Conn {
                    remote,
                    certs: None,
                };
                return serve_connection(endpoint, stream, conn, handler, shutdown).await;
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => r,
            };
            let stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(endpoint, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(endpoint, "TLS handshake timed out");
                    return;
                }
            };
            let certs = stream
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
            let conn = Conn { remote, certs };
            serve_connection(endpoint, stream, conn, handler, shutdown).await
        });
    }
}

async fn serve_connection<IO, H, Fut, B>(
    endpoint: &'static str,
    io: IO,
    conn: Conn,
    handler: H,
    shutdown: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, Conn) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let svc = hyper::service::service_fn(move |req| {
        let answer = handler(req, conn.clone());
        async move { Ok::<_, Infallible>(answer.await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(endpoint, error = %e, "connection error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
