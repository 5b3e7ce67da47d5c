//! The object store on any S3-compatible service (`--objects s3://bucket[/prefix]?…`), on the
//! `object_store` crate: several weir-cp replicas pointed at the same bucket and prefix share
//! one object store.
//!
//! ## URL
//! `s3://BUCKET[/PREFIX][?endpoint=URL&region=R&virtual_hosted=true]`
//! - `endpoint`: the service's URL (default AWS); an `http://` endpoint allows plain HTTP.
//!   Requests are path-style unless `virtual_hosted=true`.
//! - `region`: default `$AWS_REGION`, else `us-east-1`.
//! - Credentials: the settings file's `objects_backend` (`access_key_id`,
//!   `secret_access_key`), else `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`
//!   (`AWS_SESSION_TOKEN`) from the environment.
//!
//! ## Layout in the backend bucket (under `PREFIX/`)
//! - `B/KEY`: the object `KEY` of our bucket `B`, with its `Content-Type` and user metadata
//!   as the backend object's (`x-amz-meta-*`). Bucket names never start with `.`, so:
//! - `.weir/buckets/B`: bucket `B` exists (JSON `{created_ms}`).
//! - `.weir/etags/B/KEY`: `"<backend etag> <our etag>"` when the backend's ETag of `B/KEY`
//!   is not ours (a streamed put above one chunk goes up as a backend multipart upload, whose
//!   ETag is not the body's MD5; a completed multipart upload of our API is re-chunked). A
//!   read uses it only while the backend ETag still matches, so a racing writer can make an
//!   object fall back to the backend's ETag, never to a wrong one.
//! - `.weir/uploads/B/ID/meta`: an open multipart upload (JSON: key, content type,
//!   metadata); `.weir/uploads/B/ID/NNNNN` a part's bytes and `NNNNN.json` its record
//!   (MD5, size). Completion streams the parts in order into the final object (one extra
//!   copy, as the embedded backend), then deletes them.
//!
//! Bodies stream both ways: a put buffers at most [`CHUNK`] bytes per in-flight backend part
//! ([`PUT_CONCURRENCY`] of them) and sends a body of at most one chunk as a single PUT;
//! a failed body, a size or digest error aborts the backend upload, so nothing is written.
//!
//! Keys must be representable as `object_store` paths: no empty segment (no leading or
//! trailing `/`, no `//`), no `.` or `..` segment, no control character; others are refused
//! with `InvalidArgument`. User metadata names starting with `weir-` are reserved.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use md5::{Digest as _, Md5};
use object_store::path::Path;
use object_store::{
    Attribute, AttributeValue, Attributes, GetOptions, GetRange, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutPayload, WriteMultipart,
};

use super::{
    BoxFut, BucketInfo, ByteRange, ByteStream, GetResult, ListRequest, ListResult, MAX_LIST_KEYS,
    MAX_OBJECT_SIZE, MAX_PART_NUMBER, MIN_PART_SIZE, ObjError, ObjectBackend, ObjectInfo, PartInfo,
    PutOptions, check_bucket_name, check_key, check_metadata, hex, multipart_etag, now_ms,
};

/// Bytes per backend part of a streamed put (and the largest body sent as one PUT).
pub const CHUNK: usize = 8 * 1024 * 1024;
/// Backend parts of one put in flight at once.
pub const PUT_CONCURRENCY: usize = 4;
/// How often the per-bucket usage gauges are recomputed (by listing).
pub const USAGE_REFRESH: Duration = Duration::from_secs(60);

const META: &str = ".weir";
const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";
const RESERVED_META: &str = "weir-";

/// A parsed `--objects` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectsUrl {
    /// The backend bucket.
    pub bucket: String,
    /// The key prefix inside it (no leading or trailing `/`; empty for none).
    pub prefix: String,
    /// The endpoint (`None`: AWS).
    pub endpoint: Option<String>,
    /// The region.
    pub region: Option<String>,
    /// Virtual-hosted-style requests instead of path-style.
    pub virtual_hosted: bool,
}

impl std::str::FromStr for ObjectsUrl {
    type Err = ObjError;

    fn from_str(s: &str) -> Result<Self, ObjError> {
        let bad = |m: &str| ObjError::InvalidArgument(format!("--objects {s:?}: {m}"));
        let rest = s
            .strip_prefix("s3://")
            .ok_or_else(|| bad("expected s3://bucket[/prefix][?endpoint=…&region=…]"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket"));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if !prefix.is_empty() && !path_exact(&prefix) {
            return Err(bad("the prefix has an empty, '.' or '..' segment"));
        }
        let mut url = ObjectsUrl {
            bucket: bucket.to_string(),
            prefix,
            endpoint: None,
            region: None,
            virtual_hosted: false,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_encoding::percent_decode_str(v)
                .decode_utf8()
                .map_err(|_| bad("a query value is not UTF-8"))?
                .into_owned();
            match k {
                "endpoint" => url.endpoint = Some(v),
                "region" => url.region = Some(v),
                "virtual_hosted" => {
                    url.virtual_hosted = match v.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(bad("virtual_hosted is true or false")),
                    }
                }
                other => return Err(bad(&format!("unknown parameter {other:?}"))),
            }
        }
        Ok(url)
    }
}

/// Static credentials for the backend (the settings file's `objects_backend:`).
#[derive(Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

/// Whether `s` is exactly an `object_store` path (parsing keeps it byte for byte).
fn path_exact(s: &str) -> bool {
    Path::parse(s).is_ok_and(|p| p.as_ref() == s)
}

fn backend_err(e: object_store::Error) -> ObjError {
    ObjError::Backend(e.to_string())
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

fn unquote(etag: &str) -> &str {
    etag.trim_matches('"')
}

#[derive(serde::Serialize, serde::Deserialize)]
struct UploadMeta {
    key: String,
    content_type: Option<String>,
    metadata: BTreeMap<String, String>,
}

/// What [`RemoteObjects::put_stream`] wrote.
struct Written {
    size: u64,
    md5: [u8; 16],
    backend_etag: Option<String>,
}

/// The object store on an `object_store` backend (S3, or any other `ObjectStore`).
#[derive(Debug, Clone)]
pub struct RemoteObjects {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn ObjectStore>,
    root: String,
    usage: Mutex<Vec<(String, u64, u64)>>,
}

impl RemoteObjects {
    /// Connect to the S3-compatible service of `url` (no request is made yet).
    pub fn s3(url: &ObjectsUrl, creds: Option<&Credentials>) -> Result<Self, ObjError> {
        let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&url.bucket);
        if let Some(ep) = &url.endpoint {
            b = b
                .with_endpoint(ep)
                .with_allow_http(ep.starts_with("http://"));
        }
        b = b.with_virtual_hosted_style_request(url.virtual_hosted);
        let region = url
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .unwrap_or_else(|| "us-east-1".into());
        b = b.with_region(region);
        if let Some(c) = creds {
            b = b
                .with_access_key_id(&c.access_key_id)
                .with_secret_access_key(&c.secret_access_key);
        }
        // Fail within seconds when the service is down rather than after object_store's
        // default three minutes of retries.
        b = b.with_retry(object_store::RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(20),
            ..Default::default()
        });
        let store = b.build().map_err(backend_err)?;
        Ok(Self::new(Arc::new(store), &url.prefix))
    }

    /// Over any `ObjectStore`, under `prefix`.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        let r = RemoteObjects {
            inner: Arc::new(Inner {
                store,
                root: prefix.trim_matches('/').to_string(),
                usage: Mutex::new(Vec::new()),
            }),
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(refresh_usage(Arc::downgrade(&r.inner)));
        }
        r
    }

    /// Check that the backend answers (lists the bucket registry).
    pub async fn probe(&self) -> Result<(), ObjError> {
        self.list_buckets_impl().await.map(|_| ())
    }

    fn path(&self, rel: &str) -> Result<Path, ObjError> {
        let full = if self.inner.root.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.inner.root)
        };
        Path::parse(&full)
            .ok()
            .filter(|p| p.as_ref() == full)
            .ok_or_else(|| {
                ObjError::InvalidArgument(format!(
                    "{rel:?} is not storable in the object backend: keys may not have empty, \
                     '.' or '..' path segments or control characters"
                ))
            })
    }

    fn key_path(&self, bucket: &str, key: &str) -> Result<Path, ObjError> {
        check_key(key)?;
        self.path(&format!("{bucket}/{key}"))
    }

    fn bucket_marker(&self, bucket: &str) -> Result<Path, ObjError> {
        self.path(&format!("{META}/buckets/{bucket}"))
    }

    fn etag_sidecar(&self, bucket: &str, key: &str) -> Result<Path, ObjError> {
        self.path(&format!("{META}/etags/{bucket}/{key}"))
    }

    fn upload_dir(&self, bucket: &str, id: &str) -> Result<Path, ObjError> {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(ObjError::NoSuchUpload(id.to_string()));
        }
        self.path(&format!("{META}/uploads/{bucket}/{id}"))
    }

    async fn get_small(&self, p: &Path) -> Result<Option<Bytes>, ObjError> {
        match self.inner.store.get(p).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(backend_err)?)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(backend_err(e)),
        }
    }

    async fn put_small(&self, p: &Path, body: Vec<u8>) -> Result<(), ObjError> {
        self.inner
            .store
            .put(p, PutPayload::from(body))
            .await
            .map_err(backend_err)
            .map(|_| ())
    }

    async fn delete_quiet(&self, p: &Path) -> Result<(), ObjError> {
        match self.inner.store.delete(p).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(backend_err(e)),
        }
    }

    async fn head_bucket_impl(&self, name: &str) -> Result<BucketInfo, ObjError> {
        check_bucket_name(name).map_err(|_| ObjError::NoSuchBucket(name.to_string()))?;
        let raw = self
            .get_small(&self.bucket_marker(name)?)
            .await?
            .ok_or_else(|| ObjError::NoSuchBucket(name.to_string()))?;
        serde_json::from_slice(&raw).map_err(|e| ObjError::Corrupt(format!("bucket {name}: {e}")))
    }

    async fn list_buckets_impl(&self) -> Result<Vec<BucketInfo>, ObjError> {
        let dir = self.path(&format!("{META}/buckets"))?;
        let metas: Vec<ObjectMeta> = self
            .inner
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(backend_err)?;
        let mut out = Vec::new();
        for m in metas {
            let Some(raw) = self.get_small(&m.location).await? else {
                continue; // deleted meanwhile
            };
            let b: BucketInfo = serde_json::from_slice(&raw)
                .map_err(|e| ObjError::Corrupt(format!("bucket {}: {e}", m.location)))?;
            out.push(b);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Stream `body` to `p` (one PUT up to [`CHUNK`], else a backend multipart upload),
    /// hashing it; abort (write nothing) on a body error, a size over `max` or an MD5 other
    /// than `content_md5`.
    async fn put_stream(
        &self,
        p: &Path,
        attributes: Attributes,
        mut body: ByteStream,
        content_md5: Option<[u8; 16]>,
        max: u64,
    ) -> Result<Written, ObjError> {
        let mut md5 = Md5::new();
        let mut size = 0u64;
        let mut first: Vec<Bytes> = Vec::new();
        let mut first_len = 0usize;
        let check_digest = |got: [u8; 16]| match content_md5 {
            Some(want) if want != got => Err(ObjError::BadDigest(format!(
                "Content-MD5 {} but the body's MD5 is {}",
                hex(&want),
                hex(&got)
            ))),
            _ => Ok(()),
        };
        // Buffer up to one chunk: a small body goes as one PUT.
        while first_len <= CHUNK {
            match body.next().await {
                None => {
                    let got: [u8; 16] = md5.finalize().into();
                    check_digest(got)?;
                    let r = self
                        .inner
                        .store
                        .put_opts(
                            p,
                            PutPayload::from_iter(first),
                            object_store::PutOptions {
                                attributes,
                                ..Default::default()
                            },
                        )
                        .await
                        .map_err(backend_err)?;
                    return Ok(Written {
                        size,
                        md5: got,
                        backend_etag: r.e_tag.map(|e| unquote(&e).to_string()),
                    });
                }
                Some(chunk) => {
                    let chunk = chunk?;
                    size += chunk.len() as u64;
                    if size > max {
                        return Err(ObjError::EntityTooLarge);
                    }
                    md5.update(&chunk);
                    first_len += chunk.len();
                    first.push(chunk);
                }
            }
        }
        let upload = self
            .inner
            .store
            .put_multipart_opts(
                p,
                PutMultipartOptions {
                    attributes,
                    ..Default::default()
                },
            )
            .await
            .map_err(backend_err)?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, CHUNK);
        for c in first {
            w.put(c);
        }
        let res: Result<(), ObjError> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                size += chunk.len() as u64;
                if size > max {
                    return Err(ObjError::EntityTooLarge);
                }
                md5.update(&chunk);
                w.wait_for_capacity(PUT_CONCURRENCY)
                    .await
                    .map_err(backend_err)?;
                w.put(chunk);
            }
            Ok(())
        }
        .await;
        let got: [u8; 16] = md5.finalize().into();
        if let Err(e) = res.and_then(|()| check_digest(got)) {
            if let Err(ae) = w.abort().await {
                tracing::warn!("aborting the backend upload of {p}: {ae}");
            }
            return Err(e);
        }
        let r = w.finish().await.map_err(backend_err)?;
        Ok(Written {
            size,
            md5: got,
            backend_etag: r.e_tag.map(|e| unquote(&e).to_string()),
        })
    }

    /// Record `ours` as the ETag of `bucket/key` while the backend's is `backend`.
    async fn note_etag(
        &self,
        bucket: &str,
        key: &str,
        backend: Option<&str>,
        ours: &str,
    ) -> Result<(), ObjError> {
        let side = self.etag_sidecar(bucket, key)?;
        match backend {
            Some(b) if b != ours => {
                self.put_small(&side, format!("{b} {ours}").into_bytes())
                    .await
            }
            _ => self.delete_quiet(&side).await,
        }
    }

    /// Our ETag of an object whose backend ETag is `backend` (and attributes `attrs`).
    async fn our_etag(
        &self,
        bucket: &str,
        key: &str,
        backend: Option<&str>,
        attrs: Option<&Attributes>,
    ) -> Result<String, ObjError> {
        if let Some(v) = attrs.and_then(|a| a.get(&Attribute::Metadata("weir-etag".into()))) {
            return Ok(v.to_string());
        }
        let backend = backend.map(unquote).unwrap_or_default();
        // A plain hex MD5 is ours already; anything else may have a recorded one.
        if backend.len() == 32 && !backend.contains('-') {
            return Ok(backend.to_string());
        }
        if let Some(raw) = self.get_small(&self.etag_sidecar(bucket, key)?).await?
            && let Some((b, ours)) = String::from_utf8_lossy(&raw).split_once(' ')
            && b == backend
        {
            return Ok(ours.to_string());
        }
        Ok(backend.to_string())
    }

    async fn info_of(
        &self,
        bucket: &str,
        key: &str,
        meta: &ObjectMeta,
        attrs: &Attributes,
    ) -> Result<ObjectInfo, ObjError> {
        let mut content_type = DEFAULT_CONTENT_TYPE.to_string();
        let mut metadata = BTreeMap::new();
        for (k, v) in attrs.iter() {
            match k {
                Attribute::ContentType => content_type = v.to_string(),
                Attribute::Metadata(name) if !name.starts_with(RESERVED_META) => {
                    metadata.insert(name.to_ascii_lowercase(), v.to_string());
                }
                _ => {}
            }
        }
        Ok(ObjectInfo {
            key: key.to_string(),
            size: meta.size,
            etag: self
                .our_etag(bucket, key, meta.e_tag.as_deref(), Some(attrs))
                .await?,
            content_type,
            metadata,
            modified_ms: u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0),
        })
    }

    async fn head_impl(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<(ObjectInfo, ObjectMeta), ObjError> {
        let p = self.key_path(bucket, key)?;
        let opts = GetOptions {
            head: true,
            ..Default::default()
        };
        match self.inner.store.get_opts(&p, opts).await {
            Ok(r) => {
                let info = self.info_of(bucket, key, &r.meta, &r.attributes).await?;
                Ok((info, r.meta))
            }
            Err(e) if is_not_found(&e) => {
                self.head_bucket_impl(bucket).await?;
                Err(ObjError::NoSuchKey(key.to_string()))
            }
            Err(e) => Err(backend_err(e)),
        }
    }

    fn attributes(opts: &PutOptions) -> Result<Attributes, ObjError> {
        check_metadata(&opts.metadata)?;
        let mut a = Attributes::new();
        // Always set: S3 would default to binary/octet-stream.
        let ct = opts.content_type.as_deref().unwrap_or(DEFAULT_CONTENT_TYPE);
        a.insert(Attribute::ContentType, AttributeValue::from(ct.to_string()));
        for (k, v) in &opts.metadata {
            let k = k.to_ascii_lowercase();
            if k.starts_with(RESERVED_META) {
                return Err(ObjError::InvalidArgument(format!(
                    "user metadata names starting with {RESERVED_META:?} are reserved"
                )));
            }
            a.insert(
                Attribute::Metadata(k.into()),
                AttributeValue::from(v.clone()),
            );
        }
        Ok(a)
    }

    async fn upload_meta(&self, bucket: &str, key: &str, id: &str) -> Result<UploadMeta, ObjError> {
        let dir = self.upload_dir(bucket, id)?;
        let raw = self
            .get_small(&dir.child("meta"))
            .await?
            .ok_or_else(|| ObjError::NoSuchUpload(id.to_string()))?;
        let m: UploadMeta = serde_json::from_slice(&raw)
            .map_err(|e| ObjError::Corrupt(format!("upload {id}: {e}")))?;
        if m.key != key {
            return Err(ObjError::NoSuchUpload(id.to_string()));
        }
        Ok(m)
    }

    async fn parts_impl(&self, dir: &Path) -> Result<Vec<PartInfo>, ObjError> {
        let metas: Vec<ObjectMeta> = self
            .inner
            .store
            .list(Some(dir))
            .try_collect()
            .await
            .map_err(backend_err)?;
        let mut parts = Vec::new();
        for m in metas {
            if !m.location.as_ref().ends_with(".json") {
                continue;
            }
            let Some(raw) = self.get_small(&m.location).await? else {
                continue;
            };
            let p: PartInfo = serde_json::from_slice(&raw)
                .map_err(|e| ObjError::Corrupt(format!("part {}: {e}", m.location)))?;
            parts.push(p);
        }
        parts.sort_by_key(|p| p.number);
        Ok(parts)
    }

    /// Delete everything under `dir`.
    async fn delete_dir(&self, dir: &Path) -> Result<(), ObjError> {
        let metas: Vec<ObjectMeta> = self
            .inner
            .store
            .list(Some(dir))
            .try_collect()
            .await
            .map_err(backend_err)?;
        for m in metas {
            self.delete_quiet(&m.location).await?;
        }
        Ok(())
    }

    /// A list offset at or before `s` that is a valid path (the listing filters the rest).
    fn offset_at_or_before(&self, dir_rel: &str, s: &str) -> Option<Path> {
        let mut s = s.to_string();
        while !s.is_empty() {
            if let Ok(p) = self.path(&format!("{dir_rel}/{s}")) {
                return Some(p);
            }
            s.pop();
        }
        None
    }

    async fn list_impl(&self, bucket: &str, req: ListRequest) -> Result<ListResult, ObjError> {
        self.head_bucket_impl(bucket).await?;
        let max = req.max_keys.min(MAX_LIST_KEYS);
        if max == 0 {
            return Ok(ListResult::default()); // S3's max-keys=0
        }
        let token = match &req.continuation_token {
            Some(t) => Some(
                super::unhex(t)
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        ObjError::InvalidArgument("malformed continuation token".into())
                    })?,
            ),
            None => None,
        };
        // Strictly after this (the later of start-after and the token).
        let after = match (req.start_after.clone(), token) {
            (Some(a), Some(t)) => Some(a.max(t)),
            (a, t) => a.or(t),
        };
        let prefix = req.prefix.clone();
        let delim = req.delimiter.clone().filter(|d| !d.is_empty());
        // List the deepest whole directory of the prefix (object_store lists by directory).
        let dir_rel = match prefix.rfind('/') {
            Some(i) => format!("{bucket}/{}", &prefix[..i]),
            None => bucket.to_string(),
        };
        let Ok(dir) = self.path(&dir_rel) else {
            return Ok(ListResult::default()); // no storable key has this prefix
        };
        let strip = format!("{}/", dir.as_ref());
        let bucket_strip = {
            let b = self.path(bucket)?;
            format!("{}/", b.as_ref())
        };
        if let Some(a) = &after
            && !a.starts_with(&prefix)
            && a.as_str() > prefix.as_str()
        {
            return Ok(ListResult::default()); // past every key with the prefix
        }
        let mut lower = after.clone().unwrap_or_default();
        if prefix > lower {
            lower = prefix.clone();
        }
        let store = self.inner.store.clone();
        let open = |from: &str| {
            let key_in_dir = format!("{bucket}/{from}");
            let rel_in_dir = key_in_dir
                .strip_prefix(&format!("{dir_rel}/"))
                .map(str::to_string);
            match rel_in_dir.and_then(|r| self.offset_at_or_before(&dir_rel, &r)) {
                Some(off) => store.list_with_offset(Some(&dir), &off),
                None => store.list(Some(&dir)),
            }
        };
        let mut stream = open(&lower);
        let mut out = ListResult::default();
        let mut last_prefix: Option<String> = None;
        let mut skipped = 0usize;
        let mut last_returned: Option<String> = None;
        loop {
            let Some(m) = stream.next().await else {
                break;
            };
            let m = m.map_err(backend_err)?;
            let Some(key) = m.location.as_ref().strip_prefix(&bucket_strip) else {
                continue;
            };
            if !m.location.as_ref().starts_with(&strip) {
                continue;
            }
            if after.as_deref().is_some_and(|a| key <= a) {
                continue;
            }
            if !key.starts_with(&prefix) {
                if key > prefix.as_str() {
                    break; // sorted: nothing further matches
                }
                continue;
            }
            let rolled = delim.as_ref().and_then(|d| {
                key[prefix.len()..]
                    .find(d.as_str())
                    .map(|i| key[..prefix.len() + i + d.len()].to_string())
            });
            if let Some(cp) = rolled {
                if last_prefix.as_deref() == Some(cp.as_str()) {
                    skipped += 1;
                    if skipped >= 64 {
                        // Re-seek past the common prefix instead of walking its keys.
                        skipped = 0;
                        stream = open(&format!("{cp}\u{10FFFF}"));
                    }
                    continue;
                }
                if out.objects.len() + out.common_prefixes.len() == max {
                    out.truncated = true;
                    break;
                }
                skipped = 0;
                last_prefix = Some(cp.clone());
                last_returned = Some(cp.clone());
                out.common_prefixes.push(cp);
                continue;
            }
            if out.objects.len() + out.common_prefixes.len() == max {
                out.truncated = true;
                break;
            }
            let etag = self.our_etag(bucket, key, m.e_tag.as_deref(), None).await?;
            last_returned = Some(key.to_string());
            out.objects.push(ObjectInfo {
                key: key.to_string(),
                size: m.size,
                etag,
                content_type: DEFAULT_CONTENT_TYPE.to_string(),
                metadata: BTreeMap::new(),
                modified_ms: u64::try_from(m.last_modified.timestamp_millis()).unwrap_or(0),
            });
        }
        if out.truncated {
            // The token resumes after the last key or common prefix returned; a common
            // prefix's keys all sort before "prefix + U+10FFFF".
            out.next_token = last_returned.map(|l| {
                let resume = if out.common_prefixes.last() == Some(&l) {
                    format!("{l}\u{10FFFF}")
                } else {
                    l
                };
                hex(resume.as_bytes())
            });
        }
        Ok(out)
    }
}

/// Recompute the usage gauges every [`USAGE_REFRESH`] while the backend lives.
async fn refresh_usage(inner: Weak<Inner>) {
    loop {
        let Some(i) = inner.upgrade() else { return };
        let r = RemoteObjects { inner: i };
        match r.compute_usage().await {
            Ok(u) => *r.inner.usage.lock().unwrap_or_else(|e| e.into_inner()) = u,
            Err(e) => tracing::debug!("object backend usage: {e}"),
        }
        drop(r);
        tokio::time::sleep(USAGE_REFRESH).await;
    }
}

impl RemoteObjects {
    async fn compute_usage(&self) -> Result<Vec<(String, u64, u64)>, ObjError> {
        let mut out = Vec::new();
        for b in self.list_buckets_impl().await? {
            let dir = self.path(&b.name)?;
            let (n, bytes) = self
                .inner
                .store
                .list(Some(&dir))
                .try_fold(
                    (0u64, 0u64),
                    |(n, s), m| async move { Ok((n + 1, s + m.size)) },
                )
                .await
                .map_err(backend_err)?;
            out.push((b.name, n, bytes));
        }
        Ok(out)
    }
}

impl ObjectBackend for RemoteObjects {
    fn create_bucket<'a>(&'a self, name: &'a str) -> BoxFut<'a, BucketInfo> {
        Box::pin(async move {
            check_bucket_name(name)?;
            match self.head_bucket_impl(name).await {
                Ok(_) => return Err(ObjError::BucketExists(name.to_string())),
                Err(ObjError::NoSuchBucket(_)) => {}
                Err(e) => return Err(e),
            }
            let b = BucketInfo {
                name: name.to_string(),
                created_ms: now_ms(),
            };
            let raw = serde_json::to_vec(&b).map_err(|e| ObjError::Corrupt(e.to_string()))?;
            self.put_small(&self.bucket_marker(name)?, raw).await?;
            Ok(b)
        })
    }

    fn delete_bucket<'a>(&'a self, name: &'a str) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.head_bucket_impl(name).await?;
            for dir in [
                self.path(name)?,
                self.path(&format!("{META}/uploads/{name}"))?,
            ] {
                let first = self.inner.store.list(Some(&dir)).next().await;
                match first {
                    None => {}
                    Some(Ok(_)) => return Err(ObjError::BucketNotEmpty(name.to_string())),
                    Some(Err(e)) => return Err(backend_err(e)),
                }
            }
            self.delete_dir(&self.path(&format!("{META}/etags/{name}"))?)
                .await?;
            self.delete_quiet(&self.bucket_marker(name)?).await
        })
    }

    fn list_buckets(&self) -> BoxFut<'_, Vec<BucketInfo>> {
        Box::pin(self.list_buckets_impl())
    }

    fn head_bucket<'a>(&'a self, name: &'a str) -> BoxFut<'a, BucketInfo> {
        Box::pin(self.head_bucket_impl(name))
    }

    fn put_object<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        opts: PutOptions,
        body: ByteStream,
    ) -> BoxFut<'a, ObjectInfo> {
        Box::pin(async move {
            let p = self.key_path(bucket, key)?;
            let attrs = Self::attributes(&opts)?;
            self.head_bucket_impl(bucket).await?;
            let w = self
                .put_stream(&p, attrs, body, opts.content_md5, MAX_OBJECT_SIZE)
                .await?;
            let etag = hex(&w.md5);
            self.note_etag(bucket, key, w.backend_etag.as_deref(), &etag)
                .await?;
            Ok(ObjectInfo {
                key: key.to_string(),
                size: w.size,
                etag,
                content_type: opts
                    .content_type
                    .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_string()),
                metadata: opts
                    .metadata
                    .into_iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect(),
                modified_ms: now_ms(),
            })
        })
    }

    fn get_object<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        range: Option<ByteRange>,
    ) -> BoxFut<'a, GetResult> {
        Box::pin(async move {
            let p = self.key_path(bucket, key)?;
            // A range needs the size to resolve: head, then read that version (If-Match on
            // the backend ETag); a writer in between makes us retry.
            for _ in 0..3 {
                let (opts, resolved) = match range {
                    None => (GetOptions::default(), None),
                    Some(r) => {
                        let (_, meta) = self.head_impl(bucket, key).await?;
                        let (a, b) = r.resolve(meta.size)?;
                        (
                            GetOptions {
                                range: Some(GetRange::Bounded(a..b + 1)),
                                if_match: meta.e_tag.clone(),
                                ..Default::default()
                            },
                            Some((a, b)),
                        )
                    }
                };
                let r = match self.inner.store.get_opts(&p, opts).await {
                    Ok(r) => r,
                    Err(object_store::Error::Precondition { .. }) => continue,
                    Err(e) if is_not_found(&e) => {
                        self.head_bucket_impl(bucket).await?;
                        return Err(ObjError::NoSuchKey(key.to_string()));
                    }
                    Err(e) => return Err(backend_err(e)),
                };
                let info = self.info_of(bucket, key, &r.meta, &r.attributes).await?;
                let stream: ByteStream = Box::pin(r.into_stream().map_err(backend_err));
                return Ok((info, resolved, stream));
            }
            Err(ObjError::Backend(format!(
                "{bucket}/{key} kept changing while being read"
            )))
        })
    }

    fn head_object<'a>(&'a self, bucket: &'a str, key: &'a str) -> BoxFut<'a, ObjectInfo> {
        Box::pin(async move { Ok(self.head_impl(bucket, key).await?.0) })
    }

    fn delete_object<'a>(&'a self, bucket: &'a str, key: &'a str) -> BoxFut<'a, bool> {
        Box::pin(async move {
            let existed = match self.head_impl(bucket, key).await {
                Ok(_) => true,
                Err(ObjError::NoSuchKey(_)) => false,
                Err(e) => return Err(e),
            };
            if existed {
                self.delete_quiet(&self.key_path(bucket, key)?).await?;
                self.delete_quiet(&self.etag_sidecar(bucket, key)?).await?;
            }
            Ok(existed)
        })
    }

    fn list_objects<'a>(&'a self, bucket: &'a str, req: ListRequest) -> BoxFut<'a, ListResult> {
        Box::pin(self.list_impl(bucket, req))
    }

    fn create_multipart<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        opts: PutOptions,
    ) -> BoxFut<'a, String> {
        Box::pin(async move {
            self.key_path(bucket, key)?;
            Self::attributes(&opts)?;
            self.head_bucket_impl(bucket).await?;
            let id = uuid::Uuid::new_v4().simple().to_string();
            let meta = UploadMeta {
                key: key.to_string(),
                content_type: opts.content_type,
                metadata: opts.metadata,
            };
            let raw = serde_json::to_vec(&meta).map_err(|e| ObjError::Corrupt(e.to_string()))?;
            self.put_small(&self.upload_dir(bucket, &id)?.child("meta"), raw)
                .await?;
            Ok(id)
        })
    }

    fn upload_part<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        upload_id: &'a str,
        number: u32,
        content_md5: Option<[u8; 16]>,
        body: ByteStream,
    ) -> BoxFut<'a, PartInfo> {
        Box::pin(async move {
            if !(1..=MAX_PART_NUMBER).contains(&number) {
                return Err(ObjError::InvalidArgument(format!(
                    "part numbers are 1-{MAX_PART_NUMBER}"
                )));
            }
            self.upload_meta(bucket, key, upload_id).await?;
            let dir = self.upload_dir(bucket, upload_id)?;
            let name = format!("{number:05}");
            let w = self
                .put_stream(
                    &dir.child(name.as_str()),
                    Attributes::new(),
                    body,
                    content_md5,
                    MAX_OBJECT_SIZE,
                )
                .await?;
            let part = PartInfo {
                number,
                etag: hex(&w.md5),
                size: w.size,
                modified_ms: now_ms(),
            };
            let raw = serde_json::to_vec(&part).map_err(|e| ObjError::Corrupt(e.to_string()))?;
            self.put_small(&dir.child(format!("{name}.json")), raw)
                .await?;
            Ok(part)
        })
    }

    fn complete_multipart<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        upload_id: &'a str,
        parts: Vec<(u32, String)>,
    ) -> BoxFut<'a, ObjectInfo> {
        Box::pin(async move {
            let meta = self.upload_meta(bucket, key, upload_id).await?;
            let dir = self.upload_dir(bucket, upload_id)?;
            if parts.is_empty() {
                return Err(ObjError::InvalidArgument(
                    "a multipart completion lists at least one part".into(),
                ));
            }
            if parts.windows(2).any(|w| w[0].0 >= w[1].0) {
                return Err(ObjError::InvalidPartOrder);
            }
            let stored = self.parts_impl(&dir).await?;
            let mut chosen = Vec::with_capacity(parts.len());
            for (n, etag) in &parts {
                let p = stored
                    .iter()
                    .find(|p| p.number == *n && p.etag == unquote(etag))
                    .ok_or(ObjError::InvalidPart(*n))?;
                chosen.push(p.clone());
            }
            if let Some(p) = chosen
                .iter()
                .take(chosen.len() - 1)
                .find(|p| p.size < MIN_PART_SIZE)
            {
                return Err(ObjError::EntityTooSmall {
                    part: p.number,
                    size: p.size,
                });
            }
            let etags: Vec<String> = chosen.iter().map(|p| p.etag.clone()).collect();
            let etag = multipart_etag(&etags)?;
            let total: u64 = chosen.iter().map(|p| p.size).sum();
            if total > MAX_OBJECT_SIZE {
                return Err(ObjError::EntityTooLarge);
            }
            let opts = PutOptions {
                content_type: meta.content_type.clone(),
                metadata: meta.metadata.clone(),
                content_md5: None,
            };
            let mut attrs = Self::attributes(&opts)?;
            attrs.insert(
                Attribute::Metadata("weir-etag".into()),
                AttributeValue::from(etag.clone()),
            );
            // Stream the parts, in order, into the object.
            let store = self.inner.store.clone();
            let paths: Vec<Path> = chosen
                .iter()
                .map(|p| dir.child(format!("{:05}", p.number)))
                .collect();
            let body: ByteStream = Box::pin(
                futures::stream::iter(paths)
                    .then(move |p| {
                        let store = store.clone();
                        async move { store.get(&p).await.map(|r| r.into_stream()) }
                    })
                    .try_flatten()
                    .map_err(backend_err),
            );
            let p = self.key_path(bucket, key)?;
            let w = self
                .put_stream(&p, attrs, body, None, MAX_OBJECT_SIZE)
                .await?;
            if w.size != total {
                return Err(ObjError::Corrupt(format!(
                    "the parts of {upload_id} hold {} bytes, their records {total}",
                    w.size
                )));
            }
            self.note_etag(bucket, key, w.backend_etag.as_deref(), &etag)
                .await?;
            self.delete_dir(&dir).await?;
            Ok(ObjectInfo {
                key: key.to_string(),
                size: total,
                etag,
                content_type: meta
                    .content_type
                    .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_string()),
                metadata: meta.metadata,
                modified_ms: now_ms(),
            })
        })
    }

    fn abort_multipart<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        upload_id: &'a str,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.upload_meta(bucket, key, upload_id).await?;
            self.delete_dir(&self.upload_dir(bucket, upload_id)?).await
        })
    }

    fn list_parts<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        upload_id: &'a str,
    ) -> BoxFut<'a, Vec<PartInfo>> {
        Box::pin(async move {
            self.upload_meta(bucket, key, upload_id).await?;
            self.parts_impl(&self.upload_dir(bucket, upload_id)?).await
        })
    }

    fn usage(&self) -> Vec<(String, u64, u64)> {
        self.inner
            .usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
