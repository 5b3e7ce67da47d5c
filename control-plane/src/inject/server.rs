//! The webhook's HTTPS server: `POST /inject` (pods opt in) and `POST /inject/namespace` (the
//! namespace is labelled: pods opt out), HTTP/1.1 over
//! tokio-rustls (ALPN `http/1.1`), with the certificate from `inject.tls`.
//!
//! Answers: 200 with the `AdmissionReview` response; 400 for a body that is not an
//! `AdmissionReview` v1; 404 for other paths, 405 for other methods on `/inject`, 413 for
//! bodies over [`MAX_BODY`], 415 for a non-JSON content type. `GET /healthz` is 200 (for a
//! probe on the webhook port).

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use super::{Injector, NamespacePolicy, WebhookTls};

/// Largest request body accepted (the API server caps objects at about 3 MiB).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// Why the webhook cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// A certificate or key file cannot be read or used.
    #[error("inject.tls: {0}")]
    Tls(String),
}

/// The rustls acceptor for `tls` (files read now, so bad files fail at startup).
pub fn acceptor(tls: &WebhookTls) -> Result<tokio_rustls::TlsAcceptor, WebhookError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| WebhookError::Tls(format!("reading {}: {e}", p.display())))
    };
    let cert_pem = read(&tls.cert_file)?;
    let key_pem = read(&tls.key_file)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| WebhookError::Tls(format!("cert_file: {e}")))?;
    if certs.is_empty() {
        return Err(WebhookError::Tls("cert_file: no PEM certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| WebhookError::Tls(format!("key_file: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| WebhookError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| WebhookError::Tls(format!("cert_file/key_file: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

type Resp = hyper::Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut r = hyper::Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Route one request.
pub async fn handle(injector: Arc<Injector>, req: hyper::Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let policy = match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok\n"),
        (&Method::POST, "/inject") => NamespacePolicy::PodOptIn,
        (&Method::POST, "/inject/namespace") => NamespacePolicy::Enabled,
        (_, "/inject" | "/inject/namespace") => {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
        }
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    if let Some(ct) = req.headers().get(http::header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        if !ct
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("application/json")
        {
            return text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "expected application/json\n",
            );
        }
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return if e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n")
            } else {
                text(StatusCode::BAD_REQUEST, format!("reading the body: {e}\n"))
            };
        }
    };
    match injector.handle(&body, policy) {
        Ok(json) => {
            let mut r = hyper::Response::new(Full::new(Bytes::from(json)));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}

/// Serve the webhook on `listener` over TLS until `shutdown` is cancelled.
pub async fn serve(
    injector: Arc<Injector>,
    listener: tokio::net::TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    shutdown: CancellationToken,
) {
    crate::http_server::serve(
        "webhook",
        listener,
        Some(tls),
        shutdown,
        move |req, _certs| handle(injector.clone(), req),
    )
    .await
}
