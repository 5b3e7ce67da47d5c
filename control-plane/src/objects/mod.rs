//! weir-cp's object store: buckets of objects with streamed put/get, range reads, listing
//! with prefix/delimiter/pagination, user metadata, S3 ETags and multipart uploads.
//!
//! - [`ObjectBackend`]: the storage trait (one per store, so another backend can pass the
//!   same suite); [`embedded::EmbeddedObjects`] keeps metadata in the shared redb
//!   [`crate::storage::Store`] (tables `objects.*`) and bytes as files under
//!   `<data-dir>/objects/` written to a temp file, fsynced, then renamed (a write is
//!   acknowledged only after both the rename and the metadata commit are durable).
//!   [`remote::RemoteObjects`] keeps them in any S3-compatible store through the
//!   `object_store` crate (`--objects s3://bucket[/prefix]?endpoint=…`), shared by replicas.
//! - [`testing`]: moto's S3 server for the tests of the remote backend.
//! - [`s3`]: the S3-compatible HTTP endpoint (`serve --s3-address`) with SigV4 auth.
//! - [`grpc`]: `weir.objects.v1.Objects`; [`cli`]: `weir-cp objects …`.
//! - [`metrics`]: per-bucket gauges and S3 request counters in `/metrics`.
//!
//! See `docs/design/objects.md` for the storage layout and S3 coverage.

pub mod cli;
pub mod embedded;
pub mod grpc;
pub mod metrics;
pub mod remote;
pub mod s3;
pub mod testing;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use md5::{Digest as _, Md5};

pub use embedded::EmbeddedObjects;
pub use remote::{ObjectsUrl, RemoteObjects};

/// The directory inside `--data-dir` holding object bytes.
pub const OBJECTS_DIR: &str = "objects";

/// Largest object (and largest part) accepted, in bytes (5 GiB, S3's single PUT limit).
pub const MAX_OBJECT_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// Smallest size of every multipart part but the last (5 MiB, as S3).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// Highest multipart part number (10 000, as S3).
pub const MAX_PART_NUMBER: u32 = 10_000;
/// Longest object key, in bytes (1024, as S3).
pub const MAX_KEY_LEN: usize = 1024;
/// Most user metadata, in bytes of names plus values (2 KiB, as S3).
pub const MAX_METADATA_SIZE: usize = 2048;
/// Default and largest `max-keys` of a listing.
pub const MAX_LIST_KEYS: usize = 1000;

/// Object store errors (mapped to S3 error codes and gRPC statuses by the front ends).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjError {
    /// The bucket does not exist.
    #[error("the bucket {0:?} does not exist")]
    NoSuchBucket(String),
    /// The key does not exist.
    #[error("the key {0:?} does not exist")]
    NoSuchKey(String),
    /// Deleting a bucket that still holds objects or uploads.
    #[error("the bucket {0:?} is not empty")]
    BucketNotEmpty(String),
    /// Creating a bucket that exists.
    #[error("the bucket {0:?} already exists")]
    BucketExists(String),
    /// An invalid bucket name.
    #[error(
        "invalid bucket name {0:?}: 3-63 characters of a-z, 0-9, '.', '-', starting and ending with a letter or digit"
    )]
    InvalidBucketName(String),
    /// Another malformed argument (key, metadata, part number, …).
    #[error("{0}")]
    InvalidArgument(String),
    /// The range lies outside the object.
    #[error("the requested range is not satisfiable (object size {size})")]
    InvalidRange {
        /// The object's size.
        size: u64,
    },
    /// The multipart upload does not exist (or was completed or aborted).
    #[error("the multipart upload {0:?} does not exist")]
    NoSuchUpload(String),
    /// A listed part was not uploaded, or its ETag differs.
    #[error("part {0} was not uploaded or its ETag does not match")]
    InvalidPart(u32),
    /// The part list of a completion is not in ascending order.
    #[error("the part list must be in ascending part-number order")]
    InvalidPartOrder,
    /// A part other than the last is under [`MIN_PART_SIZE`].
    #[error("part {part} is {size} bytes; every part but the last must be at least 5 MiB")]
    EntityTooSmall {
        /// The part number.
        part: u32,
        /// Its size.
        size: u64,
    },
    /// The object is over [`MAX_OBJECT_SIZE`].
    #[error("the object is larger than the 5 GiB limit")]
    EntityTooLarge,
    /// The body's MD5 does not match Content-MD5 (or the SHA-256 the signature covers).
    #[error("the body does not match its digest: {0}")]
    BadDigest(String),
    /// The body failed (client gone, framing or chunk signature error).
    #[error("reading the body: {0}")]
    Body(String),
    /// The metadata store failed.
    #[error(transparent)]
    Store(#[from] crate::storage::StoreError),
    /// File I/O failed.
    #[error("object file I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The object backend (`--objects s3://…`) failed or could not be reached.
    #[error("object backend: {0}")]
    Backend(String),
    /// Stored metadata could not be decoded.
    #[error("corrupt object metadata: {0}")]
    Corrupt(String),
}

/// A bucket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BucketInfo {
    /// Its name.
    pub name: String,
    /// Creation time, milliseconds since the epoch.
    pub created_ms: u64,
}

/// An object's metadata.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ObjectInfo {
    /// The key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// The ETag without quotes: hex MD5, or `md5(part md5s)-N` for multipart uploads.
    pub etag: String,
    /// `Content-Type` (default `application/octet-stream`).
    pub content_type: String,
    /// User metadata (`x-amz-meta-*`, names lower-cased, without the prefix).
    pub metadata: BTreeMap<String, String>,
    /// Last modification, milliseconds since the epoch.
    pub modified_ms: u64,
}

/// What a put carries besides the bytes.
#[derive(Debug, Clone, Default)]
pub struct PutOptions {
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// User metadata.
    pub metadata: BTreeMap<String, String>,
    /// The expected MD5 of the body (raw 16 bytes, from `Content-MD5`).
    pub content_md5: Option<[u8; 16]>,
}

/// A byte range request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=a-b` (inclusive) or `bytes=a-` (`None`).
    From(u64, Option<u64>),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

impl ByteRange {
    /// Parse a `Range` header value (one range only, like S3). `Ok(None)` for a header this
    /// store ignores (not `bytes=`, several ranges), as S3 does.
    pub fn parse(v: &str) -> Result<Option<ByteRange>, ObjError> {
        let Some(spec) = v.trim().strip_prefix("bytes=") else {
            return Ok(None);
        };
        if spec.contains(',') {
            return Ok(None);
        }
        let bad = || ObjError::InvalidArgument(format!("malformed Range {v:?}"));
        let (a, b) = spec.split_once('-').ok_or_else(bad)?;
        let (a, b) = (a.trim(), b.trim());
        if a.is_empty() {
            let n: u64 = b.parse().map_err(|_| bad())?;
            return Ok(Some(ByteRange::Suffix(n)));
        }
        let a: u64 = a.parse().map_err(|_| bad())?;
        if b.is_empty() {
            return Ok(Some(ByteRange::From(a, None)));
        }
        let b: u64 = b.parse().map_err(|_| bad())?;
        if b < a {
            return Ok(None);
        }
        Ok(Some(ByteRange::From(a, Some(b))))
    }

    /// The inclusive `(first, last)` byte positions in an object of `size` bytes, or
    /// [`ObjError::InvalidRange`].
    pub fn resolve(self, size: u64) -> Result<(u64, u64), ObjError> {
        let bad = Err(ObjError::InvalidRange { size });
        match self {
            ByteRange::From(a, _) if a >= size => bad,
            ByteRange::From(a, b) => Ok((a, b.map_or(size - 1, |b| b.min(size - 1)))),
            ByteRange::Suffix(0) => bad,
            ByteRange::Suffix(_) if size == 0 => bad,
            ByteRange::Suffix(n) => Ok((size.saturating_sub(n), size - 1)),
        }
    }
}

/// A listing request (ListObjectsV2's parameters).
#[derive(Debug, Clone, Default)]
pub struct ListRequest {
    /// Only keys starting with this.
    pub prefix: String,
    /// Roll keys up to the first occurrence of this after the prefix into common prefixes.
    pub delimiter: Option<String>,
    /// Most keys plus common prefixes returned (0: an empty page, as S3's `max-keys=0`;
    /// values over [`MAX_LIST_KEYS`] are capped to it).
    pub max_keys: usize,
    /// Start strictly after this key.
    pub start_after: Option<String>,
    /// Resume a truncated listing (a previous [`ListResult::next_token`]).
    pub continuation_token: Option<String>,
}

/// A page of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListResult {
    /// The objects, in key order.
    pub objects: Vec<ObjectInfo>,
    /// The common prefixes, in order.
    pub common_prefixes: Vec<String>,
    /// Whether more follow.
    pub truncated: bool,
    /// The token for the next page when truncated.
    pub next_token: Option<String>,
}

/// A multipart part.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartInfo {
    /// Part number (1..=10000).
    pub number: u32,
    /// Hex MD5 of the part.
    pub etag: String,
    /// Size in bytes.
    pub size: u64,
    /// Upload time, milliseconds since the epoch.
    pub modified_ms: u64,
}

/// A stream of body chunks (a put's input, a get's output).
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, ObjError>> + Send>>;

/// What a get returns: the metadata, the resolved inclusive range (when one was asked
/// for) and the bytes.
pub type GetResult = (ObjectInfo, Option<(u64, u64)>, ByteStream);

/// A boxed future (the trait is object safe).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = Result<T, ObjError>> + Send + 'a>>;

/// The object store's storage. Bodies are streams in both directions: no backend may buffer
/// a whole object. A put that fails (body error, digest mismatch, limits) writes nothing.
pub trait ObjectBackend: Send + Sync + std::fmt::Debug + 'static {
    /// Create a bucket.
    fn create_bucket<'a>(&'a self, name: &'a str) -> BoxFut<'a, BucketInfo>;
    /// Delete an empty bucket.
    fn delete_bucket<'a>(&'a self, name: &'a str) -> BoxFut<'a, ()>;
    /// Every bucket, by name.
    fn list_buckets(&self) -> BoxFut<'_, Vec<BucketInfo>>;
    /// One bucket.
    fn head_bucket<'a>(&'a self, name: &'a str) -> BoxFut<'a, BucketInfo>;
    /// Store `body` as `bucket/key` (replacing it).
    fn put_object<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        opts: PutOptions,
        body: ByteStream,
    ) -> BoxFut<'a, ObjectInfo>;
    /// Read `bucket/key` (or a range of it): its metadata, the resolved inclusive range
    /// when one was asked for, and the bytes.
    fn get_object<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        range: Option<ByteRange>,
    ) -> BoxFut<'a, GetResult>;
    /// An object's metadata.
    fn head_object<'a>(&'a self, bucket: &'a str, key: &'a str) -> BoxFut<'a, ObjectInfo>;
    /// Delete an object; whether it existed (deleting a missing key is not an error).
    fn delete_object<'a>(&'a self, bucket: &'a str, key: &'a str) -> BoxFut<'a, bool>;
    /// List a bucket.
    fn list_objects<'a>(&'a self, bucket: &'a str, req: ListRequest) -> BoxFut<'a, ListResult>;
    /// Start a multipart upload; its id.
    fn create_multipart<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        opts: PutOptions,
    ) -> BoxFut<'a, String>;
    /// Store one part (replacing a part of the same number).
    fn upload_part<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        upload_id: &'a str,
        number: u32,
        content_md5: Option<[u8; 16]>,
        body: ByteStream,
    ) -> BoxFut<'a, PartInfo>;
    /// Assemble the listed parts `(number, etag)` into the object.
    fn complete_multipart<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        upload_id: &'a str,
        parts: Vec<(u32, String)>,
    ) -> BoxFut<'a, ObjectInfo>;
    /// Drop an upload and its parts.
    fn abort_multipart<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        upload_id: &'a str,
    ) -> BoxFut<'a, ()>;
    /// The parts uploaded so far, by number.
    fn list_parts<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        upload_id: &'a str,
    ) -> BoxFut<'a, Vec<PartInfo>>;
    /// `(objects, bytes)` per bucket, for the metrics.
    fn usage(&self) -> Vec<(String, u64, u64)>;
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(H[(b >> 4) as usize] as char);
        s.push(H[(b & 15) as usize] as char);
    }
    s
}

/// Decode hex (either case).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// S3's multipart ETag: hex MD5 of the concatenated binary part MD5s, `-` the part count.
pub fn multipart_etag(part_etags: &[String]) -> Result<String, ObjError> {
    let mut h = Md5::new();
    for e in part_etags {
        let raw = unhex(e).ok_or_else(|| ObjError::Corrupt(format!("part ETag {e:?}")))?;
        h.update(&raw);
    }
    Ok(format!("{}-{}", hex(&h.finalize()), part_etags.len()))
}

/// Check a bucket name (S3's rules, simplified: 3-63 of `a-z0-9.-`, alphanumeric ends).
pub fn check_bucket_name(name: &str) -> Result<(), ObjError> {
    let ok = (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(ObjError::InvalidBucketName(name.to_string()))
    }
}

/// Check an object key (non-empty, at most [`MAX_KEY_LEN`] bytes, no NUL).
pub fn check_key(key: &str) -> Result<(), ObjError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || key.contains('\0') {
        return Err(ObjError::InvalidArgument(format!(
            "object keys are 1-{MAX_KEY_LEN} bytes without NUL"
        )));
    }
    Ok(())
}

/// Check user metadata size.
pub fn check_metadata(m: &BTreeMap<String, String>) -> Result<(), ObjError> {
    let size: usize = m.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_METADATA_SIZE {
        return Err(ObjError::InvalidArgument(format!(
            "user metadata is {size} bytes; the limit is {MAX_METADATA_SIZE}"
        )));
    }
    Ok(())
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (S3's XML timestamps).
pub fn iso8601(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(
            ByteRange::parse("bytes=0-9").unwrap(),
            Some(ByteRange::From(0, Some(9)))
        );
        assert_eq!(
            ByteRange::parse("bytes=5-").unwrap(),
            Some(ByteRange::From(5, None))
        );
        assert_eq!(
            ByteRange::parse("bytes=-3").unwrap(),
            Some(ByteRange::Suffix(3))
        );
        assert_eq!(ByteRange::parse("items=0-1").unwrap(), None);
        assert_eq!(ByteRange::parse("bytes=0-1,3-4").unwrap(), None);
        assert!(ByteRange::parse("bytes=x-1").is_err());
        assert_eq!(ByteRange::From(0, Some(9)).resolve(5).unwrap(), (0, 4));
        assert_eq!(ByteRange::From(2, None).resolve(5).unwrap(), (2, 4));
        assert_eq!(ByteRange::Suffix(3).resolve(5).unwrap(), (2, 4));
        assert_eq!(ByteRange::Suffix(30).resolve(5).unwrap(), (0, 4));
        assert!(matches!(
            ByteRange::From(5, None).resolve(5),
            Err(ObjError::InvalidRange { size: 5 })
        ));
        assert!(ByteRange::Suffix(0).resolve(5).is_err());
        assert!(ByteRange::Suffix(1).resolve(0).is_err());
    }

    #[test]
    fn etags() {
        assert_eq!(hex(&Md5::digest(b"")), "d41d8cd98f00b204e9800998ecf8427e");
        // md5 of the two raw MD5s of "a" and "b", then "-2".
        let a = hex(&Md5::digest(b"a"));
        let b = hex(&Md5::digest(b"b"));
        let mut cat = unhex(&a).unwrap();
        cat.extend(unhex(&b).unwrap());
        assert_eq!(
            multipart_etag(&[a, b]).unwrap(),
            format!("{}-2", hex(&Md5::digest(&cat)))
        );
        assert!(multipart_etag(&["zz".into()]).is_err());
    }

    #[test]
    fn names_and_dates() {
        assert!(check_bucket_name("my-bucket.1").is_ok());
        for bad in ["ab", "Upper", "-x-", "a..b", "under_score"] {
            assert!(check_bucket_name(bad).is_err(), "{bad}");
        }
        assert!(check_key("").is_err());
        assert!(check_key(&"k".repeat(1025)).is_err());
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2013, 5, 24), 15849);
        assert_eq!(iso8601(1_369_353_600_123), "2013-05-24T00:00:00.123Z");
    }
}
