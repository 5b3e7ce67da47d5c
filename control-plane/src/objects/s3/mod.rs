//! The S3-compatible HTTP endpoint (`weir-cp serve --s3-address`): path-style requests
//! (`/bucket/key`), AWS Signature V4 ([`sigv4`]) against the `s3.access_keys` of weir-cp's
//! settings, and S3's XML bodies and error format. See `docs/design/objects.md` for the
//! operations covered.
//!
//! Every request is authenticated before anything is read or written: a missing or bad
//! signature is `403` (`AccessDenied`, `InvalidAccessKeyId`, `SignatureDoesNotMatch`,
//! `RequestTimeTooSkewed`), a key without the operation's scope (`objects:read` for GET and
//! HEAD, `objects:write` otherwise) is `403 AccessDenied`. Bodies are verified while they
//! stream (the signed SHA-256, `Content-MD5`, aws-chunked chunk signatures); a mismatch
//! fails the write, and the backend then keeps nothing.

mod copy;
mod delete;
mod list;
pub mod sigv4;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt as _;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use self::sigv4::{AuthError, ChunkDecoder, ChunkSigner, SignatureParams};
use super::metrics::ObjectsMetrics;
use super::{ByteRange, ByteStream, ObjError, ObjectBackend, ObjectInfo, PutOptions, hex, iso8601};
use crate::ratelimit::{Api, Limited, RequestLimiter};
use crate::settings::{S3Settings, Scope};

/// Largest CompleteMultipartUpload body read (1 MiB).
const MAX_XML_BODY: usize = 1024 * 1024;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// The endpoint's shared state.
#[derive(Debug)]
pub struct S3 {
    backend: Arc<dyn ObjectBackend>,
    keys: HashMap<String, (String, Vec<Scope>)>,
    region: String,
    metrics: Arc<ObjectsMetrics>,
    next_id: AtomicU64,
}

impl S3 {
    /// An endpoint over `backend` with the keys of `settings`.
    pub fn new(
        backend: Arc<dyn ObjectBackend>,
        settings: &S3Settings,
        metrics: Arc<ObjectsMetrics>,
    ) -> Arc<Self> {
        Arc::new(S3 {
            backend,
            keys: settings
                .access_keys
                .iter()
                .map(|k| {
                    (
                        k.access_key_id.clone(),
                        (k.secret_access_key.clone(), k.scopes.clone()),
                    )
                })
                .collect(),
            region: settings.region.clone(),
            metrics,
            next_id: AtomicU64::new(1),
        })
    }
}

/// Serve S3 on `listener` until `shutdown` is cancelled, over TLS when `tls` is set (weir-cp's
/// `auth.tls`: the S3 endpoint is then HTTPS like the API; access keys still authenticate).
pub async fn serve(
    s3: Arc<S3>,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limiter: Arc<RequestLimiter>,
    shutdown: CancellationToken,
) {
    crate::http_server::serve("S3", listener, tls, shutdown, move |req, conn| {
        let limited = limiter.check(Api::S3, Some(conn.remote.ip())).err();
        handle(s3.clone(), req, limited)
    })
    .await
}

/// An S3 operation (the `op` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[allow(missing_docs)]
pub enum Op {
    ListBuckets,
    CreateBucket,
    DeleteBucket,
    HeadBucket,
    GetBucketLocation,
    ListObjects,
    ListObjectsV2,
    DeleteObjects,
    PutObject,
    CopyObject,
    GetObject,
    HeadObject,
    DeleteObject,
    CreateMultipartUpload,
    UploadPart,
    UploadPartCopy,
    CompleteMultipartUpload,
    AbortMultipartUpload,
    ListParts,
    Unsupported,
}

impl Op {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::ListBuckets => "ListBuckets",
            Op::CreateBucket => "CreateBucket",
            Op::DeleteBucket => "DeleteBucket",
            Op::HeadBucket => "HeadBucket",
            Op::GetBucketLocation => "GetBucketLocation",
            Op::ListObjects => "ListObjects",
            Op::ListObjectsV2 => "ListObjectsV2",
            Op::DeleteObjects => "DeleteObjects",
            Op::PutObject => "PutObject",
            Op::CopyObject => "CopyObject",
            Op::GetObject => "GetObject",
            Op::HeadObject => "HeadObject",
            Op::DeleteObject => "DeleteObject",
            Op::CreateMultipartUpload => "CreateMultipartUpload",
            Op::UploadPart => "UploadPart",
            Op::UploadPartCopy => "UploadPartCopy",
            Op::CompleteMultipartUpload => "CompleteMultipartUpload",
            Op::AbortMultipartUpload => "AbortMultipartUpload",
            Op::ListParts => "ListParts",
            Op::Unsupported => "Unsupported",
        }
    }

    /// The scopes an access key needs (a copy reads its source and writes its target).
    fn scopes(self) -> &'static [Scope] {
        match self {
            Op::ListBuckets
            | Op::HeadBucket
            | Op::GetBucketLocation
            | Op::ListObjects
            | Op::ListObjectsV2
            | Op::GetObject
            | Op::HeadObject
            | Op::ListParts => &[Scope::ObjectsRead],
            Op::CopyObject | Op::UploadPartCopy => &[Scope::ObjectsRead, Scope::ObjectsWrite],
            _ => &[Scope::ObjectsWrite],
        }
    }
}

/// An S3 error response.
#[derive(Debug)]
pub struct S3Error {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl S3Error {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        S3Error {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<ObjError> for S3Error {
    fn from(e: ObjError) -> Self {
        use StatusCode as S;
        let (status, code) = match &e {
            ObjError::NoSuchBucket(_) => (S::NOT_FOUND, "NoSuchBucket"),
            ObjError::NoSuchKey(_) => (S::NOT_FOUND, "NoSuchKey"),
            ObjError::BucketNotEmpty(_) => (S::CONFLICT, "BucketNotEmpty"),
            ObjError::BucketExists(_) => (S::CONFLICT, "BucketAlreadyOwnedByYou"),
            ObjError::InvalidBucketName(_) => (S::BAD_REQUEST, "InvalidBucketName"),
            ObjError::InvalidArgument(_) => (S::BAD_REQUEST, "InvalidArgument"),
            ObjError::InvalidRange { .. } => (S::RANGE_NOT_SATISFIABLE, "InvalidRange"),
            ObjError::NoSuchUpload(_) => (S::NOT_FOUND, "NoSuchUpload"),
            ObjError::InvalidPart(_) => (S::BAD_REQUEST, "InvalidPart"),
            ObjError::InvalidPartOrder => (S::BAD_REQUEST, "InvalidPartOrder"),
            ObjError::EntityTooSmall { .. } => (S::BAD_REQUEST, "EntityTooSmall"),
            ObjError::EntityTooLarge => (S::BAD_REQUEST, "EntityTooLarge"),
            ObjError::BadDigest(m) if m.starts_with("x-amz-content-sha256") => {
                (S::BAD_REQUEST, "XAmzContentSHA256Mismatch")
            }
            ObjError::BadDigest(_) => (S::BAD_REQUEST, "BadDigest"),
            ObjError::Body(_) => (S::BAD_REQUEST, "IncompleteBody"),
            ObjError::Store(_) | ObjError::Backend(_) => {
                (S::SERVICE_UNAVAILABLE, "ServiceUnavailable")
            }
            ObjError::Io(_) | ObjError::Corrupt(_) => (S::INTERNAL_SERVER_ERROR, "InternalError"),
        };
        S3Error::new(status, code, e.to_string())
    }
}

impl From<AuthError> for S3Error {
    fn from(e: AuthError) -> Self {
        let code = match e {
            AuthError::Missing | AuthError::Malformed(_) | AuthError::Expired => "AccessDenied",
            AuthError::UnknownKey => "InvalidAccessKeyId",
            AuthError::Mismatch => "SignatureDoesNotMatch",
            AuthError::Skewed => "RequestTimeTooSkewed",
        };
        S3Error::new(StatusCode::FORBIDDEN, code, e.to_string())
    }
}

/// Escape text for XML element content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {
                out.push_str(&format!("&#x{:X};", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

/// Undo [`xml_escape`] (the five named entities and numeric references).
pub fn xml_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let Some(end) = tail.find(';') else {
            out.push_str(tail);
            return out;
        };
        let ent = &tail[1..end];
        let c = match ent {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e if e.starts_with("#x") => u32::from_str_radix(&e[2..], 16)
                .ok()
                .and_then(char::from_u32),
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match c {
            Some(c) => out.push(c),
            None => out.push_str(&tail[..=end]),
        }
        rest = &tail[end + 1..];
    }
    out.push_str(rest);
    out
}

/// S3's XML error document.
pub fn error_xml(code: &str, message: &str, resource: &str, request_id: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code><Message>{}</Message><Resource>{}</Resource><RequestId>{}</RequestId></Error>",
        xml_escape(code),
        xml_escape(message),
        xml_escape(resource),
        xml_escape(request_id)
    )
}

/// The raw text of the first `<name>…</name>` in `s`.
fn xml_tag<'a>(s: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let a = s.find(&open)? + open.len();
    let b = a + s[a..].find(&close)?;
    Some(&s[a..b])
}

/// The `(number, etag)` pairs of a CompleteMultipartUpload body, in document order.
pub fn parse_complete_xml(xml: &str) -> Result<Vec<(u32, String)>, ObjError> {
    let bad =
        |m: &str| ObjError::InvalidArgument(format!("malformed CompleteMultipartUpload: {m}"));
    let tag = |s: &str, name: &str| xml_tag(s, name).map(|t| xml_unescape(t.trim()));
    let mut parts = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<Part>") {
        let body = &rest[i + 6..];
        let end = body
            .find("</Part>")
            .ok_or_else(|| bad("unterminated <Part>"))?;
        let p = &body[..end];
        let n: u32 = tag(p, "PartNumber")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| bad("a part without a valid PartNumber"))?;
        let etag = tag(p, "ETag").ok_or_else(|| bad("a part without an ETag"))?;
        parts.push((n, etag));
        rest = &body[end + 7..];
    }
    if parts.is_empty() {
        return Err(bad("no parts"));
    }
    Ok(parts)
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

fn xml(status: StatusCode, doc: String) -> Response<Body> {
    let mut r = full(
        status,
        format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{doc}"),
    );
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/xml"),
    );
    r
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// How the body is framed and verified.
enum Payload {
    Raw,
    Sha256(String),
    Chunked(Box<ChunkDecoder>, Option<u64>),
}

struct Parsed {
    op: Op,
    bucket: String,
    key: String,
    query: Vec<(String, String)>,
}

/// Name the operation; `copy`: the request carries `x-amz-copy-source`.
fn classify(method: &Method, path: &str, query: Vec<(String, String)>, copy: bool) -> Parsed {
    let has = |n: &str| query.iter().any(|(k, _)| k == n);
    let p = path.trim_start_matches('/');
    let (b, k) = p.split_once('/').unwrap_or((p, ""));
    let bucket = String::from_utf8_lossy(&sigv4::percent_decode(b)).into_owned();
    let key = String::from_utf8_lossy(&sigv4::percent_decode(k)).into_owned();
    let op = match (method.as_str(), bucket.is_empty(), key.is_empty()) {
        ("GET", true, _) => Op::ListBuckets,
        ("PUT", false, true) if query.is_empty() => Op::CreateBucket,
        ("DELETE", false, true) if query.is_empty() => Op::DeleteBucket,
        ("HEAD", false, true) => Op::HeadBucket,
        ("GET", false, true) if has("location") => Op::GetBucketLocation,
        ("GET", false, true) if query.iter().all(|(k, _)| LIST_PARAMS.contains(&k.as_str())) => {
            if query.iter().any(|(k, v)| k == "list-type" && v == "2") {
                Op::ListObjectsV2
            } else {
                Op::ListObjects
            }
        }
        ("POST", false, true) if has("delete") => Op::DeleteObjects,
        ("PUT", false, false) if has("partNumber") && has("uploadId") && copy => Op::UploadPartCopy,
        ("PUT", false, false) if has("partNumber") && has("uploadId") => Op::UploadPart,
        ("PUT", false, false) if !has("uploadId") && copy => Op::CopyObject,
        ("PUT", false, false) if !has("uploadId") => Op::PutObject,
        ("GET", false, false) if has("uploadId") => Op::ListParts,
        ("GET", false, false) => Op::GetObject,
        ("HEAD", false, false) => Op::HeadObject,
        ("DELETE", false, false) if has("uploadId") => Op::AbortMultipartUpload,
        ("DELETE", false, false) => Op::DeleteObject,
        ("POST", false, false) if has("uploads") => Op::CreateMultipartUpload,
        ("POST", false, false) if has("uploadId") => Op::CompleteMultipartUpload,
        _ => Op::Unsupported,
    };
    Parsed {
        op,
        bucket,
        key,
        query,
    }
}

/// Query parameters of ListObjectsV2 and ListObjects (v1: `marker`).
const LIST_PARAMS: &[&str] = &[
    "list-type",
    "marker",
    "prefix",
    "delimiter",
    "max-keys",
    "continuation-token",
    "start-after",
    "encoding-type",
    "fetch-owner",
];

/// Answer one request; `limited`: the client is over its request rate (503 `SlowDown`).
async fn handle(s3: Arc<S3>, req: Request<Incoming>, limited: Option<Limited>) -> Response<Body> {
    let request_id = format!("{:016X}", s3.next_id.fetch_add(1, Relaxed));
    let path = req.uri().path().to_string();
    let is_head = req.method() == Method::HEAD;
    let parsed = classify(
        req.method(),
        &path,
        sigv4::parse_query(req.uri().query().unwrap_or("")),
        req.headers().contains_key("x-amz-copy-source"),
    );
    let op = parsed.op;
    let answer = match limited {
        Some(l) => Err(S3Error::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SlowDown",
            format!(
                "Please reduce your request rate (retry in {} s)",
                l.retry_after_secs()
            ),
        )),
        None => dispatch(&s3, req, parsed).await,
    };
    let mut resp = match answer {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() && e.code != "SlowDown" {
                tracing::warn!(
                    op = op.as_str(),
                    code = e.code,
                    "S3 request failed: {}",
                    e.message
                );
            }
            if is_head {
                full(e.status, Bytes::new())
            } else {
                let mut r = full(e.status, error_xml(e.code, &e.message, &path, &request_id));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/xml"),
                );
                r
            }
        }
    };
    if let Some(l) = limited {
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, l.retry_after_secs().into());
    }
    if let Ok(v) = http::HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-amz-request-id", v);
    }
    s3.metrics.s3_request(op, resp.status().as_u16());
    resp
}

/// Verify the request's signature; the signature parameters and signing key.
fn authenticate(
    s3: &S3,
    req: &Request<Incoming>,
    query: &[(String, String)],
    op: Op,
) -> Result<Option<(SignatureParams, [u8; 32])>, AuthError> {
    let h = req.headers();
    let presigned = query.iter().any(|(k, _)| k == "X-Amz-Signature");
    let params = if presigned {
        sigv4::parse_presigned(query)?
    } else {
        let Some(auth) = header(h, "authorization") else {
            return Err(AuthError::Missing);
        };
        let date = header(h, "x-amz-date")
            .ok_or_else(|| AuthError::Malformed("x-amz-date is required".into()))?;
        sigv4::parse_authorization(auth, date)?
    };
    let (secret, scopes) = s3
        .keys
        .get(&params.credential.access_key)
        .ok_or(AuthError::UnknownKey)?;
    let t = sigv4::parse_amz_date(&params.amz_date)
        .ok_or_else(|| AuthError::Malformed("malformed x-amz-date".into()))?;
    let now = now_secs();
    match params.expires {
        Some(exp) => {
            if exp > 7 * 86_400 {
                return Err(AuthError::Malformed("X-Amz-Expires is over 7 days".into()));
            }
            if t - now > sigv4::MAX_SKEW_SECS {
                return Err(AuthError::Skewed);
            }
            if now > t + exp as i64 {
                return Err(AuthError::Expired);
            }
        }
        None => {
            if (now - t).abs() > sigv4::MAX_SKEW_SECS {
                return Err(AuthError::Skewed);
            }
        }
    }
    if params.credential.service != "s3"
        || params.credential.region != s3.region
        || !params.amz_date.starts_with(&params.credential.date)
    {
        return Err(AuthError::Malformed(format!(
            "the credential scope must be <date>/{}/s3/aws4_request",
            s3.region
        )));
    }
    if !params.signed_headers.iter().any(|n| n == "host") {
        return Err(AuthError::Malformed(
            "the host header must be signed".into(),
        ));
    }
    let payload_hash = if presigned {
        sigv4::UNSIGNED_PAYLOAD.to_string()
    } else {
        header(h, "x-amz-content-sha256")
            .ok_or_else(|| AuthError::Malformed("x-amz-content-sha256 is required".into()))?
            .to_string()
    };
    let mut headers: Vec<(String, String)> = h
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).trim().to_string(),
            )
        })
        .collect();
    if !headers.iter().any(|(n, _)| n == "host")
        && let Some(a) = req.uri().authority()
    {
        headers.push(("host".into(), a.to_string()));
    }
    let creq = sigv4::canonical_request(
        req.method().as_str(),
        req.uri().path(),
        query,
        &headers,
        &params.signed_headers,
        &payload_hash,
    )?;
    let sts = sigv4::string_to_sign(&params.amz_date, &params.credential.scope(), &creq);
    let key = sigv4::signing_key(secret, &params.credential);
    if !sigv4::same(&sigv4::sign(&key, &sts), &params.signature) {
        tracing::debug!(canonical_request = %creq, "S3 signature mismatch");
        return Err(AuthError::Mismatch);
    }
    if !op.scopes().iter().all(|s| scopes.contains(s)) {
        return Ok(None);
    }
    Ok(Some((params, key)))
}

fn content_md5(h: &HeaderMap) -> Result<Option<[u8; 16]>, S3Error> {
    let Some(v) = header(h, "content-md5") else {
        return Ok(None);
    };
    base64::engine::general_purpose::STANDARD
        .decode(v.trim())
        .ok()
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .map(Some)
        .ok_or_else(|| {
            S3Error::new(
                StatusCode::BAD_REQUEST,
                "InvalidDigest",
                "Content-MD5 is not a base64 MD5",
            )
        })
}

fn put_options(h: &HeaderMap) -> Result<PutOptions, S3Error> {
    let mut metadata = BTreeMap::new();
    for (n, v) in h {
        if let Some(m) = n.as_str().strip_prefix("x-amz-meta-") {
            metadata.insert(
                m.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            );
        }
    }
    Ok(PutOptions {
        content_type: header(h, "content-type").map(str::to_string),
        metadata,
        content_md5: content_md5(h)?,
    })
}

/// The request body as a verified stream of decoded bytes.
fn body_stream(
    s3: &Arc<S3>,
    req: Request<Incoming>,
    sig: &(SignatureParams, [u8; 32]),
) -> Result<ByteStream, S3Error> {
    let h = req.headers();
    let sha = header(h, "x-amz-content-sha256").unwrap_or(sigv4::UNSIGNED_PAYLOAD);
    let decoded_len = header(h, "x-amz-decoded-content-length").and_then(|v| v.parse().ok());
    let payload = match sha {
        sigv4::UNSIGNED_PAYLOAD => Payload::Raw,
        sigv4::STREAMING_PAYLOAD => Payload::Chunked(
            Box::new(ChunkDecoder::new(Some(ChunkSigner {
                key: sig.1,
                amz_date: sig.0.amz_date.clone(),
                scope: sig.0.credential.scope(),
                prev: sig.0.signature.clone(),
            }))),
            decoded_len,
        ),
        sigv4::STREAMING_UNSIGNED_TRAILER => {
            Payload::Chunked(Box::new(ChunkDecoder::new(None)), decoded_len)
        }
        s if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Payload::Sha256(s.to_ascii_lowercase())
        }
        s => {
            return Err(S3Error::new(
                StatusCode::BAD_REQUEST,
                "InvalidArgument",
                format!("unsupported x-amz-content-sha256 {s:?}"),
            ));
        }
    };
    struct St {
        body: Incoming,
        payload: Payload,
        hasher: Sha256,
        done: bool,
        metrics: Arc<ObjectsMetrics>,
    }
    let st = St {
        body: req.into_body(),
        payload,
        hasher: Sha256::new(),
        done: false,
        metrics: s3.metrics.clone(),
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            if let Payload::Chunked(d, want) = &mut st.payload {
                match d.next_data() {
                    Ok(Some(b)) => return Some((Ok(b), st)),
                    Err(e) => {
                        st.done = true;
                        return Some((Err(ObjError::Body(e)), st));
                    }
                    Ok(None) if d.is_done() => {
                        st.done = true;
                        if let Some(w) = want
                            && *w != d.decoded()
                        {
                            let m = format!(
                                "x-amz-decoded-content-length is {w} but the body has {}",
                                d.decoded()
                            );
                            return Some((Err(ObjError::Body(m)), st));
                        }
                        return None;
                    }
                    Ok(None) => {}
                }
            }
            match st.body.frame().await {
                None => {
                    st.done = true;
                    let err = match &st.payload {
                        Payload::Raw => None,
                        Payload::Sha256(want) => {
                            let got = hex(&std::mem::take(&mut st.hasher).finalize());
                            (&got != want).then(|| {
                                ObjError::BadDigest(format!(
                                    "x-amz-content-sha256 is {want} but the body's SHA-256 is {got}"
                                ))
                            })
                        }
                        Payload::Chunked(..) => {
                            Some(ObjError::Body("the aws-chunked body ends early".into()))
                        }
                    };
                    return err.map(|e| (Err(e), st));
                }
                Some(Err(e)) => {
                    st.done = true;
                    return Some((Err(ObjError::Body(e.to_string())), st));
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    st.metrics.bytes_in(data.len() as u64);
                    match &mut st.payload {
                        Payload::Raw => return Some((Ok(data), st)),
                        Payload::Sha256(_) => {
                            st.hasher.update(&data);
                            return Some((Ok(data), st));
                        }
                        Payload::Chunked(d, _) => d.push(&data),
                    }
                }
            }
        }
    });
    Ok(Box::pin(stream))
}

async fn read_small(stream: ByteStream, limit: usize) -> Result<Vec<u8>, S3Error> {
    let mut out = Vec::new();
    let mut stream = stream;
    while let Some(c) = stream.next().await {
        let c = c?;
        if out.len() + c.len() > limit {
            return Err(S3Error::new(
                StatusCode::BAD_REQUEST,
                "MalformedXML",
                "the request body is too large",
            ));
        }
        out.extend_from_slice(&c);
    }
    Ok(out)
}

fn object_headers(r: &mut http::response::Builder, info: &ObjectInfo) {
    let etag = format!("\"{}\"", info.etag);
    let modified = httpdate::fmt_http_date(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(info.modified_ms),
    );
    if let Some(h) = r.headers_mut() {
        let mut set = |n: &str, v: &str| {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(n.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                h.insert(n, v);
            }
        };
        set("etag", &etag);
        set("last-modified", &modified);
        set("content-type", &info.content_type);
        set("accept-ranges", "bytes");
        for (k, v) in &info.metadata {
            set(&format!("x-amz-meta-{k}"), v);
        }
    }
}

/// `If-Match` / `If-None-Match` on `info`: `Err` with 412 or 304.
fn preconditions(h: &HeaderMap, info: &ObjectInfo) -> Result<(), S3Error> {
    let matches = |v: &str| {
        v.split(',')
            .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
            .any(|t| t == "*" || t == info.etag)
    };
    if let Some(v) = header(h, "if-match")
        && !matches(v)
    {
        return Err(S3Error::new(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            "At least one of the pre-conditions you specified did not hold",
        ));
    }
    if let Some(v) = header(h, "if-none-match")
        && matches(v)
    {
        return Err(S3Error::new(
            StatusCode::NOT_MODIFIED,
            "NotModified",
            "Not Modified",
        ));
    }
    Ok(())
}

fn q<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn part_number(query: &[(String, String)]) -> Result<u32, S3Error> {
    q(query, "partNumber")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| S3Error::new(StatusCode::BAD_REQUEST, "InvalidArgument", "bad partNumber"))
}

async fn dispatch(
    s3: &Arc<S3>,
    req: Request<Incoming>,
    p: Parsed,
) -> Result<Response<Body>, S3Error> {
    let sig = match authenticate(s3, &req, &p.query, p.op)? {
        Some(s) => s,
        None => {
            return Err(S3Error::new(
                StatusCode::FORBIDDEN,
                "AccessDenied",
                format!("the access key may not {}", p.op.as_str()),
            ));
        }
    };
    let b = &*s3.backend;
    let (bucket, key) = (p.bucket.as_str(), p.key.as_str());
    let ok = StatusCode::OK;
    match p.op {
        Op::Unsupported => Err(S3Error::new(
            StatusCode::NOT_IMPLEMENTED,
            "NotImplemented",
            "this operation is not implemented by weir-cp",
        )),
        Op::ListBuckets => {
            let mut doc = String::from(
                "<ListAllMyBucketsResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Owner><ID>weir-cp</ID><DisplayName>weir-cp</DisplayName></Owner><Buckets>",
            );
            for bk in b.list_buckets().await? {
                doc.push_str(&format!(
                    "<Bucket><Name>{}</Name><CreationDate>{}</CreationDate></Bucket>",
                    xml_escape(&bk.name),
                    iso8601(bk.created_ms)
                ));
            }
            doc.push_str("</Buckets></ListAllMyBucketsResult>");
            Ok(xml(ok, doc))
        }
        Op::CreateBucket => {
            b.create_bucket(bucket).await?;
            let mut r = full(ok, Bytes::new());
            if let Ok(v) = http::HeaderValue::from_str(&format!("/{bucket}")) {
                r.headers_mut().insert(http::header::LOCATION, v);
            }
            Ok(r)
        }
        Op::DeleteBucket => {
            b.delete_bucket(bucket).await?;
            Ok(full(StatusCode::NO_CONTENT, Bytes::new()))
        }
        Op::HeadBucket => {
            b.head_bucket(bucket).await?;
            Ok(full(ok, Bytes::new()))
        }
        Op::GetBucketLocation => {
            b.head_bucket(bucket).await?;
            let region = if s3.region == "us-east-1" {
                ""
            } else {
                &s3.region
            };
            Ok(xml(
                ok,
                format!(
                    "<LocationConstraint xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">{}</LocationConstraint>",
                    xml_escape(region)
                ),
            ))
        }
        Op::ListObjects => list::list(b, bucket, &p.query, list::Version::V1).await,
        Op::ListObjectsV2 => list::list(b, bucket, &p.query, list::Version::V2).await,
        Op::DeleteObjects => {
            let h = req.headers().clone();
            let body = read_small(body_stream(s3, req, &sig)?, MAX_XML_BODY).await?;
            delete::delete_objects(b, &h, bucket, &body).await
        }
        Op::CopyObject | Op::UploadPartCopy => {
            let h = req.headers();
            let source = copy::parse_source(header(h, "x-amz-copy-source").unwrap_or_default())?;
            if p.op == Op::CopyObject {
                return copy::copy_object(b, h, source, bucket, key).await;
            }
            let number = part_number(&p.query)?;
            let upload_id = q(&p.query, "uploadId").unwrap_or_default();
            copy::upload_part_copy(b, h, source, (bucket, key, upload_id, number)).await
        }
        Op::PutObject => {
            let opts = put_options(req.headers())?;
            let body = body_stream(s3, req, &sig)?;
            let info = b.put_object(bucket, key, opts, body).await?;
            let mut r = full(ok, Bytes::new());
            if let Ok(v) = http::HeaderValue::from_str(&format!("\"{}\"", info.etag)) {
                r.headers_mut().insert(http::header::ETAG, v);
            }
            Ok(r)
        }
        Op::GetObject | Op::HeadObject => {
            let h = req.headers();
            let range = match header(h, "range") {
                Some(v) => ByteRange::parse(v)?,
                None => None,
            };
            if h.contains_key("if-match") || h.contains_key("if-none-match") {
                let info = b.head_object(bucket, key).await?;
                preconditions(h, &info)?;
            }
            let (info, resolved, stream) = if p.op == Op::HeadObject {
                let info = b.head_object(bucket, key).await?;
                let resolved = range.map(|r| r.resolve(info.size)).transpose()?;
                (info, resolved, None)
            } else {
                let (i, r, s) = b.get_object(bucket, key, range).await?;
                (i, r, Some(s))
            };
            let mut rb = Response::builder();
            object_headers(&mut rb, &info);
            let len = match resolved {
                Some((a, z)) => {
                    rb = rb
                        .status(StatusCode::PARTIAL_CONTENT)
                        .header("content-range", format!("bytes {a}-{z}/{}", info.size));
                    z - a + 1
                }
                None => info.size,
            };
            rb = rb.header("content-length", len);
            let body: Body = match stream {
                Some(s) => {
                    let m = s3.metrics.clone();
                    StreamBody::new(s.map(move |c| {
                        c.map(|b| {
                            m.bytes_out(b.len() as u64);
                            Frame::data(b)
                        })
                        .map_err(|e| std::io::Error::other(e.to_string()))
                    }))
                    .boxed_unsync()
                }
                None => Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            };
            rb.body(body).map_err(|e| {
                S3Error::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    e.to_string(),
                )
            })
        }
        Op::DeleteObject => {
            b.delete_object(bucket, key).await?;
            Ok(full(StatusCode::NO_CONTENT, Bytes::new()))
        }
        Op::CreateMultipartUpload => {
            let opts = put_options(req.headers())?;
            let id = b.create_multipart(bucket, key, opts).await?;
            Ok(xml(
                ok,
                format!(
                    "<InitiateMultipartUploadResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Bucket>{}</Bucket><Key>{}</Key><UploadId>{}</UploadId></InitiateMultipartUploadResult>",
                    xml_escape(bucket),
                    xml_escape(key),
                    xml_escape(&id)
                ),
            ))
        }
        Op::UploadPart => {
            let number = part_number(&p.query)?;
            let upload_id = q(&p.query, "uploadId").unwrap_or_default().to_string();
            let md5 = content_md5(req.headers())?;
            let body = body_stream(s3, req, &sig)?;
            let part = b
                .upload_part(bucket, key, &upload_id, number, md5, body)
                .await?;
            let mut r = full(ok, Bytes::new());
            if let Ok(v) = http::HeaderValue::from_str(&format!("\"{}\"", part.etag)) {
                r.headers_mut().insert(http::header::ETAG, v);
            }
            Ok(r)
        }
        Op::CompleteMultipartUpload => {
            let upload_id = q(&p.query, "uploadId").unwrap_or_default().to_string();
            let body = body_stream(s3, req, &sig)?;
            let text = read_small(body, MAX_XML_BODY).await?;
            let text = String::from_utf8(text).map_err(|_| {
                S3Error::new(
                    StatusCode::BAD_REQUEST,
                    "MalformedXML",
                    "the body is not UTF-8",
                )
            })?;
            let parts = parse_complete_xml(&text).map_err(|e| {
                S3Error::new(StatusCode::BAD_REQUEST, "MalformedXML", e.to_string())
            })?;
            let info = b.complete_multipart(bucket, key, &upload_id, parts).await?;
            Ok(xml(
                ok,
                format!(
                    "<CompleteMultipartUploadResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Location>/{}/{}</Location><Bucket>{}</Bucket><Key>{}</Key><ETag>&quot;{}&quot;</ETag></CompleteMultipartUploadResult>",
                    xml_escape(bucket),
                    xml_escape(key),
                    xml_escape(bucket),
                    xml_escape(key),
                    xml_escape(&info.etag)
                ),
            ))
        }
        Op::AbortMultipartUpload => {
            let upload_id = q(&p.query, "uploadId").unwrap_or_default();
            b.abort_multipart(bucket, key, upload_id).await?;
            Ok(full(StatusCode::NO_CONTENT, Bytes::new()))
        }
        Op::ListParts => {
            let upload_id = q(&p.query, "uploadId").unwrap_or_default();
            let parts = b.list_parts(bucket, key, upload_id).await?;
            let mut doc = format!(
                "<ListPartsResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Bucket>{}</Bucket><Key>{}</Key><UploadId>{}</UploadId><MaxParts>10000</MaxParts><IsTruncated>false</IsTruncated>",
                xml_escape(bucket),
                xml_escape(key),
                xml_escape(upload_id)
            );
            for part in parts {
                doc.push_str(&format!(
                    "<Part><PartNumber>{}</PartNumber><LastModified>{}</LastModified><ETag>&quot;{}&quot;</ETag><Size>{}</Size></Part>",
                    part.number,
                    iso8601(part.modified_ms),
                    part.etag,
                    part.size
                ));
            }
            doc.push_str("</ListPartsResult>");
            Ok(xml(ok, doc))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_escaping_round_trips() {
        let s = "a<b>&\"c'\u{1}";
        let e = xml_escape(s);
        assert_eq!(e, "a&lt;b&gt;&amp;&quot;c&apos;&#x1;");
        assert_eq!(xml_unescape(&e), s);
        assert_eq!(xml_unescape("&bogus; &#65;"), "&bogus; A");
        let doc = error_xml("NoSuchKey", "no <key>", "/b/k&x", "ID1");
        assert!(doc.contains("<Code>NoSuchKey</Code><Message>no &lt;key&gt;</Message><Resource>/b/k&amp;x</Resource><RequestId>ID1</RequestId>"), "{doc}");
    }

    #[test]
    fn complete_body_parsing() {
        let body = r#"<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
          <Part><ETag>&quot;aa&quot;</ETag><PartNumber>1</PartNumber></Part>
          <Part><PartNumber>2</PartNumber><ETag>"bb"</ETag></Part></CompleteMultipartUpload>"#;
        assert_eq!(
            parse_complete_xml(body).unwrap(),
            vec![(1, "\"aa\"".to_string()), (2, "\"bb\"".to_string())]
        );
        assert!(parse_complete_xml("<CompleteMultipartUpload/>").is_err());
        assert!(parse_complete_xml("<Part><ETag>x</ETag></Part>").is_err());
    }

    #[test]
    fn classification() {
        let c = |m: &str, path: &str, q: &str| {
            classify(&m.parse().unwrap(), path, sigv4::parse_query(q), false).op
        };
        assert_eq!(c("GET", "/", ""), Op::ListBuckets);
        assert_eq!(c("PUT", "/b", ""), Op::CreateBucket);
        assert_eq!(c("GET", "/b", "list-type=2&prefix=a"), Op::ListObjectsV2);
        assert_eq!(c("GET", "/b", "prefix=a&marker=x"), Op::ListObjects);
        assert_eq!(c("GET", "/b", ""), Op::ListObjects);
        assert_eq!(c("POST", "/b", "delete"), Op::DeleteObjects);
        let copy = |q: &str| classify(&Method::PUT, "/b/k", sigv4::parse_query(q), true).op;
        assert_eq!(copy(""), Op::CopyObject);
        assert_eq!(copy("partNumber=2&uploadId=u"), Op::UploadPartCopy);
        assert_eq!(
            Op::CopyObject.scopes(),
            &[Scope::ObjectsRead, Scope::ObjectsWrite]
        );
        assert_eq!(c("GET", "/b", "acl"), Op::Unsupported);
        assert_eq!(c("PUT", "/b/k", "partNumber=1&uploadId=x"), Op::UploadPart);
        assert_eq!(c("POST", "/b/k", "uploads"), Op::CreateMultipartUpload);
        assert_eq!(c("POST", "/b/k", "uploadId=x"), Op::CompleteMultipartUpload);
        assert_eq!(c("DELETE", "/b/k", "uploadId=x"), Op::AbortMultipartUpload);
        assert_eq!(c("GET", "/b/k", "uploadId=x"), Op::ListParts);
        let p = classify(&Method::GET, "/b/a%20b/c", vec![], false);
        assert_eq!((p.bucket.as_str(), p.key.as_str()), ("b", "a b/c"));
    }
}
