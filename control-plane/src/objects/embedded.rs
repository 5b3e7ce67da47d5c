//! The embedded object backend: metadata in the shared redb [`Store`], bytes in files.
//!
//! Layout under the objects directory (`<data-dir>/objects/`, or a temp dir without one):
//! `tmp/<id>` while a body streams in, then `blobs/<id>` after `fsync` and an atomic
//! rename (and an `fsync` of `blobs/`). Bodies are written in 1 MiB buffers by a blocking
//! writer while a second thread computes the MD5 from the same buffers (large bodies are
//! written back in the background as they arrive, see [`FLUSH_EVERY`]); gets read 1 MiB chunks on a blocking reader straight into the
//! `Bytes` they stream. Only then is the metadata committed (redb commits
//! are durable when they return), and only then is the write acknowledged; the replaced
//! blob is unlinked after the commit. Opening sweeps `tmp/` and any blob no record points
//! at (left by a crash between the rename and the commit).
//!
//! Tables (JSON values): `objects.buckets` (name → [`BucketInfo`]), `objects.keys`
//! (`bucket/key` → object record), `objects.uploads` (upload id → upload),
//! `objects.parts` (`upload-id/NNNNN` → part record). Bucket names cannot contain `/`, so
//! `bucket/` prefixes order and isolate each bucket's keys.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt as _;
use md5::{Digest as _, Md5};

use super::*;
use crate::storage::Store;

const BUCKETS: &str = "objects.buckets";
const KEYS: &str = "objects.keys";
const UPLOADS: &str = "objects.uploads";
const PARTS: &str = "objects.parts";

/// Size of the chunks a get streams (read by a blocking reader, one `read` each, handed over
/// without a copy).
pub const READ_CHUNK: usize = 1024 * 1024;
/// Chunks a get reads ahead of its consumer.
const READ_AHEAD: usize = 2;
/// A put writes the body in buffers of this size (small chunks are gathered, large ones pass
/// through).
pub const WRITE_BUFFER: usize = 1024 * 1024;
/// Buffers queued for a put's writer.
const WRITE_QUEUE: usize = 4;
/// A put's flusher starts writing back (`fdatasync` in the background) each time this many more
/// bytes were written, so the final `fsync` has little left to do.
pub const FLUSH_EVERY: u64 = 8 * 1024 * 1024;

/// MD5 of the buffers from `rx` (a put's hasher thread, beside its writer).
fn hash_buffers(mut rx: tokio::sync::mpsc::Receiver<Bytes>) -> [u8; 16] {
    let mut h = Md5::new();
    while let Some(buf) = rx.blocking_recv() {
        h.update(&buf);
    }
    h.finalize().into()
}

/// Write the buffers from `rx` to a new file at `path`; flush in the background every
/// [`FLUSH_EVERY`] bytes, then `fsync`. Returns the bytes written. (The MD5 is computed from
/// the same buffers on another thread: [`hash_buffers`].)
fn write_file(path: &Path, mut rx: tokio::sync::mpsc::Receiver<Bytes>) -> std::io::Result<u64> {
    use std::io::Write as _;
    let mut f = std::fs::File::create(path)?;
    let mut size = 0u64;
    let mut flushed_at = 0u64;
    // Background write-back for large bodies: a thread that `fdatasync`s a second handle when
    // asked, so the disk works while this thread hashes and writes the next buffers. Started
    // at the first FLUSH_EVERY bytes (a small object gets its one `fsync` only).
    let mut flusher: Option<(std::sync::mpsc::SyncSender<()>, std::thread::JoinHandle<_>)> = None;
    let written = (|| {
        while let Some(buf) = rx.blocking_recv() {
            f.write_all(&buf)?;
            size += buf.len() as u64;
            if size - flushed_at >= FLUSH_EVERY {
                flushed_at = size;
                if flusher.is_none() {
                    let f2 = f.try_clone()?;
                    let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
                    let t = std::thread::Builder::new()
                        .name("weir-obj-flush".into())
                        .spawn(move || -> std::io::Result<()> {
                            let mut result = Ok(());
                            while rx.recv().is_ok() {
                                if let Err(e) = f2.sync_data() {
                                    result = Err(e);
                                }
                            }
                            result
                        })?;
                    flusher = Some((tx, t));
                }
                if let Some((tx, _)) = &flusher {
                    // A flush already pending covers these bytes too: never wait for it here.
                    let _ = tx.try_send(());
                }
            }
        }
        Ok::<_, std::io::Error>(())
    })();
    if let Some((tx, t)) = flusher {
        drop(tx);
        t.join()
            .unwrap_or_else(|_| Err(std::io::Error::other("object flusher panicked")))?;
    }
    written?;
    f.sync_all()?;
    Ok(size)
}

/// A read buffer of one get, lent to the consumer as [`Bytes`] (no copy) and sent back to the
/// get's reader when the consumer drops it, so a get cycles through a few buffers instead of
/// allocating a fresh [`READ_CHUNK`] per chunk (fresh memory page-faults on the first touch
/// of every page, which cost a get ~20 % against one reused buffer).
struct PooledBuf {
    /// Always `READ_CHUNK` long (initialized once); `len` bytes of it are the chunk.
    buf: Vec<u8>,
    len: usize,
    /// Back to the reader (gone when the get ended: the buffer is freed).
    home: std::sync::mpsc::Sender<Vec<u8>>,
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let _ = self.home.send(std::mem::take(&mut self.buf));
    }
}

/// Fill `buf` from `f`; fewer bytes only at the end of the file.
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read as _;
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(buf.get_mut(filled..).unwrap_or_default()) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Stream `len` bytes of `f` from `first`: a blocking reader reads [`READ_CHUNK`]-sized chunks
/// (at most [`READ_AHEAD`] ahead of the consumer) straight into the buffers it hands over
/// ([`PooledBuf`]: reused once the consumer is done with them).
fn read_stream(mut f: std::fs::File, first: u64, len: u64) -> ByteStream {
    use std::io::Seek as _;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, ObjError>>(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        if first > 0
            && let Err(e) = f.seek(std::io::SeekFrom::Start(first))
        {
            let _ = tx.blocking_send(Err(ObjError::Io(e)));
            return;
        }
        let (home, returned) = std::sync::mpsc::channel::<Vec<u8>>();
        let mut left = len;
        while left > 0 {
            let n = left.min(READ_CHUNK as u64) as usize;
            let mut buf = returned.try_recv().unwrap_or_else(|_| vec![0; READ_CHUNK]);
            let chunk = match read_full(&mut f, buf.get_mut(..n).unwrap_or_default()) {
                Ok(got) if got < n => Err(ObjError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("object file ended {} bytes early", left - got as u64),
                ))),
                Ok(_) => {
                    left -= n as u64;
                    Ok(Bytes::from_owner(PooledBuf {
                        buf,
                        len: n,
                        home: home.clone(),
                    }))
                }
                Err(e) => Err(ObjError::Io(e)),
            };
            let failed = chunk.is_err();
            // The consumer is gone (client disconnected): stop reading.
            if tx.blocking_send(chunk).is_err() || failed {
                return;
            }
        }
    });
    Box::pin(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
        rx,
    ))
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Record {
    info: ObjectInfo,
    blob: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Upload {
    bucket: String,
    key: String,
    content_type: Option<String>,
    metadata: BTreeMap<String, String>,
    initiated_ms: u64,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct PartRecord {
    info: PartInfo,
    blob: String,
}

fn enc<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, ObjError> {
    serde_json::to_vec(v).map_err(|e| ObjError::Corrupt(e.to_string()))
}

fn dec<T: serde::de::DeserializeOwned>(v: &[u8]) -> Result<T, ObjError> {
    serde_json::from_slice(v).map_err(|e| ObjError::Corrupt(e.to_string()))
}

/// The smallest byte string greater than every string starting with `p` (`None`: no bound).
pub fn prefix_end(p: &[u8]) -> Option<Vec<u8>> {
    let mut v = p.to_vec();
    while let Some(last) = v.pop() {
        if last < 0xff {
            v.push(last + 1);
            return Some(v);
        }
    }
    None
}

fn part_key(upload_id: &str, n: u32) -> Vec<u8> {
    format!("{upload_id}/{n:05}").into_bytes()
}

/// The embedded backend (see the module docs).
#[derive(Debug)]
pub struct EmbeddedObjects {
    store: Arc<Store>,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    usage: Mutex<BTreeMap<String, (u64, u64)>>,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ObjError> + Send + 'static,
) -> Result<T, ObjError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ObjError::Io(std::io::Error::other(e.to_string())))?
}

impl EmbeddedObjects {
    /// Open over `store`, with files under `dir` (a fresh temp dir when `None`, for an
    /// in-memory control plane).
    pub fn open(store: Arc<Store>, dir: Option<&Path>) -> Result<Self, ObjError> {
        let (dir, temp) = match dir {
            Some(d) => (d.to_path_buf(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("weir-cp-objects")
                    .tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        std::fs::create_dir_all(dir.join("tmp"))?;
        std::fs::create_dir_all(dir.join("blobs"))?;
        let me = EmbeddedObjects {
            store,
            dir,
            _temp: temp,
            usage: Mutex::new(BTreeMap::new()),
        };
        me.recover()?;
        Ok(me)
    }

    /// Sweep temp files and unreferenced blobs; compute the usage gauges.
    fn recover(&self) -> Result<(), ObjError> {
        for e in std::fs::read_dir(self.dir.join("tmp"))? {
            let _ = std::fs::remove_file(e?.path());
        }
        let r = self.store.read()?;
        let mut live = HashSet::new();
        let mut usage = BTreeMap::new();
        for (_, v) in r.scan(BUCKETS)? {
            let b: BucketInfo = dec(&v)?;
            usage.insert(b.name, (0u64, 0u64));
        }
        for (k, v) in r.scan(KEYS)? {
            let rec: Record = dec(&v)?;
            live.insert(rec.blob);
            let bucket = String::from_utf8_lossy(&k);
            let bucket = bucket.split('/').next().unwrap_or_default().to_string();
            let u = usage.entry(bucket).or_insert((0, 0));
            u.0 += 1;
            u.1 += rec.info.size;
        }
        for (_, v) in r.scan(PARTS)? {
            let p: PartRecord = dec(&v)?;
            live.insert(p.blob);
        }
        let mut swept = 0;
        for e in std::fs::read_dir(self.dir.join("blobs"))? {
            let e = e?;
            if !live.contains(e.file_name().to_string_lossy().as_ref()) {
                let _ = std::fs::remove_file(e.path());
                swept += 1;
            }
        }
        if swept > 0 {
            tracing::info!(swept, "objects: removed blobs left by an interrupted write");
        }
        *self.usage.lock().unwrap_or_else(|e| e.into_inner()) = usage;
        Ok(())
    }

    fn blob_path(&self, id: &str) -> PathBuf {
        self.dir.join("blobs").join(id)
    }

    fn adjust(&self, bucket: &str, objects: i64, bytes: i64) {
        let mut u = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        let e = u.entry(bucket.to_string()).or_insert((0, 0));
        e.0 = e.0.saturating_add_signed(objects);
        e.1 = e.1.saturating_add_signed(bytes);
    }

    fn remove_blobs(&self, ids: impl IntoIterator<Item = String>) {
        for id in ids {
            if let Err(e) = std::fs::remove_file(self.blob_path(&id))
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(blob = %id, error = %e, "objects: cannot remove a replaced blob");
            }
        }
    }

    fn bucket_exists(&self, bucket: &str) -> Result<(), ObjError> {
        match self.store.read()?.get(BUCKETS, bucket.as_bytes())? {
            Some(_) => Ok(()),
            None => Err(ObjError::NoSuchBucket(bucket.into())),
        }
    }

    /// Stream `body` into a new durable blob: `(id, size, md5)`. Nothing is left behind on
    /// error.
    ///
    /// The async side only regroups the body into [`WRITE_BUFFER`]-sized buffers (large chunks
    /// pass through without a copy) and hands each to two blocking threads: a writer, with a
    /// background flusher that starts writing back every [`FLUSH_EVERY`] bytes, and a hasher
    /// (MD5), so hashing overlaps the disk's work. The blob is durable when the final `fsync` of the file,
    /// the rename and the `fsync` of `blobs/` have returned.
    async fn write_blob(
        &self,
        mut body: ByteStream,
        expected_md5: Option<[u8; 16]>,
    ) -> Result<(String, u64, [u8; 16]), ObjError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let tmp = self.dir.join("tmp").join(&id);
        // Writer and hasher each get every buffer (a `Bytes` clone: no copy) and run side by
        // side, so a put costs max(write + fsync, MD5) rather than their sum.
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(WRITE_QUEUE);
        let (htx, hrx) = tokio::sync::mpsc::channel::<Bytes>(WRITE_QUEUE);
        let path = tmp.clone();
        let writer = tokio::task::spawn_blocking(move || write_file(&path, rx));
        let hasher = tokio::task::spawn_blocking(move || hash_buffers(hrx));
        let fed = async {
            let mut size = 0u64;
            let mut pending = bytes::BytesMut::new();
            while let Some(chunk) = body.next().await {
                let chunk: Bytes = chunk?;
                size += chunk.len() as u64;
                if size > MAX_OBJECT_SIZE {
                    return Err(ObjError::EntityTooLarge);
                }
                let out = if pending.is_empty() && chunk.len() >= WRITE_BUFFER / 2 {
                    chunk
                } else {
                    if pending.capacity() - pending.len() < chunk.len() {
                        pending.reserve(WRITE_BUFFER.max(chunk.len()));
                    }
                    pending.extend_from_slice(&chunk);
                    if pending.len() < WRITE_BUFFER {
                        continue;
                    }
                    pending.split().freeze()
                };
                if tx.send(out.clone()).await.is_err() || htx.send(out).await.is_err() {
                    // The writer failed; its error is reported below.
                    break;
                }
            }
            if !pending.is_empty() {
                let last = pending.freeze();
                if tx.send(last.clone()).await.is_ok() {
                    let _ = htx.send(last).await;
                }
            }
            Ok(size)
        }
        .await;
        drop(tx);
        drop(htx);
        let md5 = hasher
            .await
            .map_err(|e| ObjError::Io(std::io::Error::other(e.to_string())));
        let written = writer
            .await
            .map_err(|e| ObjError::Io(std::io::Error::other(e.to_string())))
            .and_then(|r| r.map_err(ObjError::Io))
            .and_then(|n| md5.map(|m| (n, m)));
        let result = match (fed, written) {
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            (Ok(size), Ok((written, md5))) if size == written => match expected_md5 {
                Some(want) if want != md5 => Err(ObjError::BadDigest(format!(
                    "Content-MD5 {} but the body's MD5 is {}",
                    hex(&want),
                    hex(&md5)
                ))),
                _ => Ok((size, md5)),
            },
            (Ok(size), Ok((written, _))) => Err(ObjError::Io(std::io::Error::other(format!(
                "wrote {written} of {size} bytes"
            )))),
        };
        let (size, md5) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        let dst = self.blob_path(&id);
        let blobs = self.dir.join("blobs");
        blocking(move || {
            std::fs::rename(&tmp, &dst)?;
            std::fs::File::open(&blobs)?.sync_all()?;
            Ok(())
        })
        .await?;
        Ok((id, size, md5))
    }

    fn get_upload(&self, bucket: &str, key: &str, upload_id: &str) -> Result<Upload, ObjError> {
        let v = self
            .store
            .read()?
            .get(UPLOADS, upload_id.as_bytes())?
            .ok_or_else(|| ObjError::NoSuchUpload(upload_id.into()))?;
        let u: Upload = dec(&v)?;
        if u.bucket != bucket || u.key != key {
            return Err(ObjError::NoSuchUpload(upload_id.into()));
        }
        Ok(u)
    }

    fn parts_of(&self, upload_id: &str) -> Result<Vec<PartRecord>, ObjError> {
        let r = self.store.read()?;
        let start = format!("{upload_id}/").into_bytes();
        let end = prefix_end(&start);
        let mut out = Vec::new();
        let mut err = None;
        r.range_visit(PARTS, &start, end.as_deref(), |_, v| match dec(v) {
            Ok(p) => {
                out.push(p);
                true
            }
            Err(e) => {
                err = Some(e);
                false
            }
        })?;
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    fn list_sync(&self, bucket: &str, req: &ListRequest) -> Result<ListResult, ObjError> {
        self.bucket_exists(bucket)?;
        let max = req.max_keys.min(MAX_LIST_KEYS);
        let base = format!("{bucket}/");
        let full_prefix = format!("{base}{}", req.prefix).into_bytes();
        let end = prefix_end(&full_prefix);
        let mut start = full_prefix.clone();
        let after = |marker: &str| {
            let mut s = format!("{base}{marker}").into_bytes();
            s.push(0);
            s
        };
        if let Some(sa) = &req.start_after {
            start = start.max(after(sa));
        }
        if let Some(tok) = &req.continuation_token {
            let raw = unhex(tok)
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    ObjError::InvalidArgument("the continuation token is invalid".into())
                })?;
            let s = if let Some(p) = raw.strip_prefix("p:") {
                prefix_end(format!("{base}{p}").as_bytes()).unwrap_or_default()
            } else if let Some(k) = raw.strip_prefix("k:") {
                after(k)
            } else {
                return Err(ObjError::InvalidArgument(
                    "the continuation token is invalid".into(),
                ));
            };
            start = start.max(s);
        }
        let delim = req.delimiter.as_deref().filter(|d| !d.is_empty());
        let mut out = ListResult::default();
        let mut last: Option<String> = None;
        let r = self.store.read()?;
        loop {
            if end.as_deref().is_some_and(|e| start.as_slice() >= e) {
                break;
            }
            let mut restart = None;
            let mut err = None;
            r.range_visit(KEYS, &start, end.as_deref(), |k, v| {
                if out.objects.len() + out.common_prefixes.len() >= max {
                    out.truncated = max > 0;
                    return false;
                }
                let rel = String::from_utf8_lossy(&k[base.len()..]).into_owned();
                if let Some(d) = delim
                    && let Some(i) = rel[req.prefix.len()..].find(d)
                {
                    let cp = rel[..req.prefix.len() + i + d.len()].to_string();
                    restart = Some(prefix_end(format!("{base}{cp}").as_bytes()));
                    last = Some(format!("p:{cp}"));
                    out.common_prefixes.push(cp);
                    return false;
                }
                match dec::<Record>(v) {
                    Ok(rec) => {
                        last = Some(format!("k:{rel}"));
                        out.objects.push(rec.info);
                        true
                    }
                    Err(e) => {
                        err = Some(e);
                        false
                    }
                }
            })?;
            if let Some(e) = err {
                return Err(e);
            }
            match restart {
                Some(Some(s)) => start = s,
                _ => break,
            }
        }
        if out.truncated {
            out.next_token = last.map(|l| hex(l.as_bytes()));
        }
        Ok(out)
    }
}

impl ObjectBackend for EmbeddedObjects {
    fn create_bucket<'a>(&'a self, name: &'a str) -> BoxFut<'a, BucketInfo> {
        Box::pin(async move {
            check_bucket_name(name)?;
            let info = BucketInfo {
                name: name.to_string(),
                created_ms: now_ms(),
            };
            let (store, v, n) = (self.store.clone(), enc(&info)?, name.to_string());
            blocking(move || {
                store.write(|w| {
                    if w.get(BUCKETS, n.as_bytes())?.is_some() {
                        return Err(ObjError::BucketExists(n.clone()));
                    }
                    w.put(BUCKETS, n.as_bytes(), &v)?;
                    Ok(())
                })
            })
            .await?;
            self.adjust(name, 0, 0);
            Ok(info)
        })
    }

    fn delete_bucket<'a>(&'a self, name: &'a str) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let (store, n) = (self.store.clone(), name.to_string());
            blocking(move || {
                store.write(|w| {
                    if w.get(BUCKETS, n.as_bytes())?.is_none() {
                        return Err(ObjError::NoSuchBucket(n.clone()));
                    }
                    let start = format!("{n}/").into_bytes();
                    let end = prefix_end(&start);
                    let mut any = false;
                    w.range_visit(KEYS, &start, end.as_deref(), |_, _| {
                        any = true;
                        false
                    })?;
                    let mut uploads = false;
                    w.range_visit(UPLOADS, b"", None, |_, v| {
                        uploads = dec::<Upload>(v).map(|u| u.bucket == n).unwrap_or(false);
                        !uploads
                    })?;
                    if any || uploads {
                        return Err(ObjError::BucketNotEmpty(n.clone()));
                    }
                    w.delete(BUCKETS, n.as_bytes())?;
                    Ok(())
                })
            })
            .await?;
            self.usage
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(name);
            Ok(())
        })
    }

    fn list_buckets(&self) -> BoxFut<'_, Vec<BucketInfo>> {
        Box::pin(async move {
            self.store
                .read()?
                .scan(BUCKETS)?
                .iter()
                .map(|(_, v)| dec(v))
                .collect()
        })
    }

    fn head_bucket<'a>(&'a self, name: &'a str) -> BoxFut<'a, BucketInfo> {
        Box::pin(async move {
            match self.store.read()?.get(BUCKETS, name.as_bytes())? {
                Some(v) => dec(&v),
                None => Err(ObjError::NoSuchBucket(name.into())),
            }
        })
    }

    fn put_object<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        opts: PutOptions,
        body: ByteStream,
    ) -> BoxFut<'a, ObjectInfo> {
        Box::pin(async move {
            check_key(key)?;
            check_metadata(&opts.metadata)?;
            self.bucket_exists(bucket)?;
            let (blob, size, md5) = self.write_blob(body, opts.content_md5).await?;
            let info = ObjectInfo {
                key: key.to_string(),
                size,
                etag: hex(&md5),
                content_type: opts
                    .content_type
                    .unwrap_or_else(|| "application/octet-stream".into()),
                metadata: opts.metadata,
                modified_ms: now_ms(),
            };
            self.commit_object(bucket, info, blob, Vec::new(), None)
                .await
        })
    }

    fn get_object<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        range: Option<ByteRange>,
    ) -> BoxFut<'a, GetResult> {
        Box::pin(async move {
            let rec = self.record(bucket, key)?;
            let resolved = range.map(|r| r.resolve(rec.info.size)).transpose()?;
            // Opened before returning: a concurrent replace unlinks the old blob, but an
            // open file keeps its bytes.
            let path = self.blob_path(&rec.blob);
            let f = blocking(move || Ok(std::fs::File::open(path)?)).await?;
            let (first, len) = match resolved {
                Some((a, b)) => (a, b - a + 1),
                None => (0, rec.info.size),
            };
            Ok((rec.info, resolved, read_stream(f, first, len)))
        })
    }

    fn head_object<'a>(&'a self, bucket: &'a str, key: &'a str) -> BoxFut<'a, ObjectInfo> {
        Box::pin(async move { Ok(self.record(bucket, key)?.info) })
    }

    fn delete_object<'a>(&'a self, bucket: &'a str, key: &'a str) -> BoxFut<'a, bool> {
        Box::pin(async move {
            self.bucket_exists(bucket)?;
            let (store, k) = (self.store.clone(), format!("{bucket}/{key}"));
            let old = blocking(move || {
                store.write(|w| {
                    let old = w.get(KEYS, k.as_bytes())?;
                    if old.is_some() {
                        w.delete(KEYS, k.as_bytes())?;
                    }
                    old.map(|v| dec::<Record>(&v)).transpose()
                })
            })
            .await?;
            Ok(match old {
                Some(rec) => {
                    self.adjust(bucket, -1, -(rec.info.size as i64));
                    self.remove_blobs([rec.blob]);
                    true
                }
                None => false,
            })
        })
    }

    fn list_objects<'a>(&'a self, bucket: &'a str, req: ListRequest) -> BoxFut<'a, ListResult> {
        Box::pin(async move { self.list_sync(bucket, &req) })
    }

    fn create_multipart<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        opts: PutOptions,
    ) -> BoxFut<'a, String> {
        Box::pin(async move {
            check_key(key)?;
            check_metadata(&opts.metadata)?;
            self.bucket_exists(bucket)?;
            let id = uuid::Uuid::new_v4().simple().to_string();
            let up = Upload {
                bucket: bucket.into(),
                key: key.into(),
                content_type: opts.content_type,
                metadata: opts.metadata,
                initiated_ms: now_ms(),
            };
            let (store, v, k) = (self.store.clone(), enc(&up)?, id.clone());
            blocking(move || store.write(|w| Ok(w.put(UPLOADS, k.as_bytes(), &v)?))).await?;
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
            self.get_upload(bucket, key, upload_id)?;
            let (blob, size, md5) = self.write_blob(body, content_md5).await?;
            let info = PartInfo {
                number,
                etag: hex(&md5),
                size,
                modified_ms: now_ms(),
            };
            let rec = PartRecord {
                info: info.clone(),
                blob: blob.clone(),
            };
            let (store, v, uid) = (self.store.clone(), enc(&rec)?, upload_id.to_string());
            let res = blocking(move || {
                store.write(|w| {
                    // The upload may have been completed or aborted meanwhile.
                    if w.get(UPLOADS, uid.as_bytes())?.is_none() {
                        return Err(ObjError::NoSuchUpload(uid.clone()));
                    }
                    let pk = part_key(&uid, number);
                    let old = w.get(PARTS, &pk)?;
                    w.put(PARTS, &pk, &v)?;
                    old.map(|v| dec::<PartRecord>(&v)).transpose()
                })
            })
            .await;
            match res {
                Ok(old) => {
                    self.remove_blobs(old.map(|p| p.blob));
                    Ok(info)
                }
                Err(e) => {
                    self.remove_blobs([blob]);
                    Err(e)
                }
            }
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
            let up = self.get_upload(bucket, key, upload_id)?;
            if parts.is_empty() {
                return Err(ObjError::InvalidArgument(
                    "a completion lists at least one part".into(),
                ));
            }
            if parts.windows(2).any(|w| w[0].0 >= w[1].0) {
                return Err(ObjError::InvalidPartOrder);
            }
            let stored: BTreeMap<u32, PartRecord> = self
                .parts_of(upload_id)?
                .into_iter()
                .map(|p| (p.info.number, p))
                .collect();
            let mut chosen = Vec::with_capacity(parts.len());
            for (i, (n, etag)) in parts.iter().enumerate() {
                let etag = etag.trim().trim_matches('"');
                let p = stored
                    .get(n)
                    .filter(|p| p.info.etag.eq_ignore_ascii_case(etag))
                    .ok_or(ObjError::InvalidPart(*n))?;
                if i + 1 < parts.len() && p.info.size < MIN_PART_SIZE {
                    return Err(ObjError::EntityTooSmall {
                        part: *n,
                        size: p.info.size,
                    });
                }
                chosen.push(p.clone());
            }
            let size: u64 = chosen.iter().map(|p| p.info.size).sum();
            if size > MAX_OBJECT_SIZE {
                return Err(ObjError::EntityTooLarge);
            }
            let etag = multipart_etag(
                &chosen
                    .iter()
                    .map(|p| p.info.etag.clone())
                    .collect::<Vec<_>>(),
            )?;
            // Concatenate the parts into one durable blob.
            let id = uuid::Uuid::new_v4().simple().to_string();
            let tmp = self.dir.join("tmp").join(&id);
            let dst = self.blob_path(&id);
            let blobs = self.dir.join("blobs");
            let srcs: Vec<PathBuf> = chosen.iter().map(|p| self.blob_path(&p.blob)).collect();
            let t2 = tmp.clone();
            let r = blocking(move || {
                let mut out = std::fs::File::create(&t2)?;
                for s in srcs {
                    std::io::copy(&mut std::fs::File::open(s)?, &mut out)?;
                }
                out.sync_all()?;
                drop(out);
                std::fs::rename(&t2, &dst)?;
                std::fs::File::open(&blobs)?.sync_all()?;
                Ok(())
            })
            .await;
            if let Err(e) = r {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            let info = ObjectInfo {
                key: key.to_string(),
                size,
                etag,
                content_type: up
                    .content_type
                    .unwrap_or_else(|| "application/octet-stream".into()),
                metadata: up.metadata,
                modified_ms: now_ms(),
            };
            let part_keys: Vec<Vec<u8>> = stored.keys().map(|n| part_key(upload_id, *n)).collect();
            let part_blobs: Vec<String> = stored.into_values().map(|p| p.blob).collect();
            self.commit_object(
                bucket,
                info,
                id,
                part_keys,
                Some((upload_id.to_string(), part_blobs)),
            )
            .await
        })
    }

    fn abort_multipart<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        upload_id: &'a str,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.get_upload(bucket, key, upload_id)?;
            let parts = self.parts_of(upload_id)?;
            let (store, uid) = (self.store.clone(), upload_id.to_string());
            let keys: Vec<Vec<u8>> = parts
                .iter()
                .map(|p| part_key(upload_id, p.info.number))
                .collect();
            blocking(move || {
                store.write(|w| {
                    if !w.delete(UPLOADS, uid.as_bytes())? {
                        return Err(ObjError::NoSuchUpload(uid.clone()));
                    }
                    for k in &keys {
                        w.delete(PARTS, k)?;
                    }
                    Ok(())
                })
            })
            .await?;
            self.remove_blobs(parts.into_iter().map(|p| p.blob));
            Ok(())
        })
    }

    fn list_parts<'a>(
        &'a self,
        bucket: &'a str,
        key: &'a str,
        upload_id: &'a str,
    ) -> BoxFut<'a, Vec<PartInfo>> {
        Box::pin(async move {
            self.get_upload(bucket, key, upload_id)?;
            Ok(self
                .parts_of(upload_id)?
                .into_iter()
                .map(|p| p.info)
                .collect())
        })
    }

    fn usage(&self) -> Vec<(String, u64, u64)> {
        self.usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(b, (o, s))| (b.clone(), *o, *s))
            .collect()
    }
}

impl EmbeddedObjects {
    fn record(&self, bucket: &str, key: &str) -> Result<Record, ObjError> {
        let r = self.store.read()?;
        match r.get(KEYS, format!("{bucket}/{key}").as_bytes())? {
            Some(v) => dec(&v),
            None => {
                if r.get(BUCKETS, bucket.as_bytes())?.is_none() {
                    Err(ObjError::NoSuchBucket(bucket.into()))
                } else {
                    Err(ObjError::NoSuchKey(key.into()))
                }
            }
        }
    }

    /// Commit `info` (bytes in `blob`) as `bucket/key`; with `upload`, also drop that upload
    /// and its part records (`part_keys`) and afterwards its part blobs. On failure the new
    /// blob is removed.
    async fn commit_object(
        &self,
        bucket: &str,
        info: ObjectInfo,
        blob: String,
        part_keys: Vec<Vec<u8>>,
        upload: Option<(String, Vec<String>)>,
    ) -> Result<ObjectInfo, ObjError> {
        let rec = Record {
            info: info.clone(),
            blob: blob.clone(),
        };
        let v = enc(&rec)?;
        let (store, b, k) = (
            self.store.clone(),
            bucket.to_string(),
            format!("{bucket}/{}", info.key),
        );
        let uid = upload.as_ref().map(|u| u.0.clone());
        let res = blocking(move || {
            store.write(|w| {
                if w.get(BUCKETS, b.as_bytes())?.is_none() {
                    return Err(ObjError::NoSuchBucket(b.clone()));
                }
                if let Some(uid) = &uid {
                    if !w.delete(UPLOADS, uid.as_bytes())? {
                        return Err(ObjError::NoSuchUpload(uid.clone()));
                    }
                    for pk in &part_keys {
                        w.delete(PARTS, pk)?;
                    }
                }
                let old = w.get(KEYS, k.as_bytes())?;
                w.put(KEYS, k.as_bytes(), &v)?;
                old.map(|v| dec::<Record>(&v)).transpose()
            })
        })
        .await;
        match res {
            Ok(old) => {
                let (d_obj, d_bytes) = match &old {
                    Some(o) => (0, info.size as i64 - o.info.size as i64),
                    None => (1, info.size as i64),
                };
                self.adjust(bucket, d_obj, d_bytes);
                self.remove_blobs(old.map(|o| o.blob));
                if let Some((_, blobs)) = upload {
                    self.remove_blobs(blobs);
                }
                Ok(info)
            }
            Err(e) => {
                self.remove_blobs([blob]);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: Vec<&'static [u8]>) -> ByteStream {
        Box::pin(futures::stream::iter(
            parts.into_iter().map(|p| Ok(Bytes::from_static(p))),
        ))
    }

    async fn read_all(mut s: ByteStream) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c.expect("chunk"));
        }
        out
    }

    fn objs() -> EmbeddedObjects {
        EmbeddedObjects::open(Arc::new(Store::in_memory().unwrap()), None).unwrap()
    }

    #[tokio::test]
    async fn read_stream_reuses_buffers_and_reports_a_short_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0u32..(READ_CHUNK as u32 * 5 / 2 + 7))
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        std::fs::write(&path, &data).expect("write");
        // From an offset, chunk by chunk, each dropped before the next (buffers cycle back).
        let first = 1000u64;
        let len = data.len() as u64 - first - 3;
        let mut s = read_stream(std::fs::File::open(&path).expect("open"), first, len);
        let mut got = Vec::new();
        let mut chunks = 0;
        while let Some(c) = s.next().await {
            let c = c.expect("chunk");
            assert!(c.len() <= READ_CHUNK);
            got.extend_from_slice(&c);
            chunks += 1;
        }
        assert_eq!(got, data[first as usize..data.len() - 3]);
        assert_eq!(chunks, (len as usize).div_ceil(READ_CHUNK));
        // Chunks kept alive by the consumer stay intact while later ones are read.
        let mut s = read_stream(
            std::fs::File::open(&path).expect("open"),
            0,
            data.len() as u64,
        );
        let mut held = Vec::new();
        while let Some(c) = s.next().await {
            held.push(c.expect("chunk"));
        }
        assert_eq!(held.concat(), data);
        // A file shorter than its record: the stream ends with an error, not short data.
        let mut s = read_stream(
            std::fs::File::open(&path).expect("open"),
            0,
            data.len() as u64 + 10,
        );
        let mut err = None;
        while let Some(c) = s.next().await {
            if let Err(e) = c {
                err = Some(e);
            }
        }
        assert!(
            matches!(&err, Some(ObjError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn put_get_range_delete() {
        let o = objs();
        o.create_bucket("bkt").await.unwrap();
        assert!(matches!(
            o.create_bucket("bkt").await,
            Err(ObjError::BucketExists(_))
        ));
        let info = o
            .put_object(
                "bkt",
                "a/b",
                PutOptions::default(),
                body(vec![b"hello ", b"world"]),
            )
            .await
            .unwrap();
        assert_eq!(info.size, 11);
        assert_eq!(info.etag, hex(&Md5::digest(b"hello world")));
        let (_, r, s) = o
            .get_object("bkt", "a/b", Some(ByteRange::From(6, None)))
            .await
            .unwrap();
        assert_eq!(r, Some((6, 10)));
        assert_eq!(read_all(s).await, b"world");
        assert!(matches!(
            o.get_object("bkt", "nope", None).await,
            Err(ObjError::NoSuchKey(_))
        ));
        assert!(matches!(
            o.get_object("nob", "a", None).await,
            Err(ObjError::NoSuchBucket(_))
        ));
        let bad = PutOptions {
            content_md5: Some([0; 16]),
            ..Default::default()
        };
        assert!(matches!(
            o.put_object("bkt", "c", bad, body(vec![b"x"])).await,
            Err(ObjError::BadDigest(_))
        ));
        assert!(matches!(
            o.head_object("bkt", "c").await,
            Err(ObjError::NoSuchKey(_))
        ));
        assert_eq!(o.usage(), vec![("bkt".into(), 1, 11)]);
        assert!(matches!(
            o.delete_bucket("bkt").await,
            Err(ObjError::BucketNotEmpty(_))
        ));
        assert!(o.delete_object("bkt", "a/b").await.unwrap());
        assert!(!o.delete_object("bkt", "a/b").await.unwrap());
        o.delete_bucket("bkt").await.unwrap();
        // Every blob is gone.
        assert_eq!(std::fs::read_dir(o.dir.join("blobs")).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(o.dir.join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn list_with_delimiter_and_pages() {
        let o = objs();
        o.create_bucket("bkt").await.unwrap();
        for k in ["a.txt", "d1/x", "d1/y", "d2/z", "e.txt", "f/g/h"] {
            o.put_object("bkt", k, PutOptions::default(), body(vec![b"1"]))
                .await
                .unwrap();
        }
        let req = |max, tok: Option<String>| ListRequest {
            delimiter: Some("/".into()),
            max_keys: max,
            continuation_token: tok,
            ..Default::default()
        };
        let all = o.list_objects("bkt", req(1000, None)).await.unwrap();
        let keys: Vec<_> = all.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["a.txt", "e.txt"]);
        assert_eq!(all.common_prefixes, ["d1/", "d2/", "f/"]);
        assert!(!all.truncated);
        // Pages of 2: a.txt d1/ | d2/ e.txt | f/
        let mut seen = Vec::new();
        let mut tok = None;
        for _ in 0..10 {
            let p = o.list_objects("bkt", req(2, tok.clone())).await.unwrap();
            seen.extend(p.objects.iter().map(|o| o.key.clone()));
            seen.extend(p.common_prefixes.clone());
            if !p.truncated {
                break;
            }
            tok = p.next_token;
        }
        // Each page holds keys and prefixes in key order between them; across pages the
        // union is everything once.
        seen.sort();
        assert_eq!(seen, ["a.txt", "d1/", "d2/", "e.txt", "f/"]);
        // Prefix plus delimiter, start-after.
        let p = o
            .list_objects(
                "bkt",
                ListRequest {
                    prefix: "d1/".into(),
                    delimiter: Some("/".into()),
                    max_keys: 1000,
                    start_after: Some("d1/x".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(p.objects.len(), 1);
        assert_eq!(p.objects[0].key, "d1/y");
        assert!(
            o.list_objects("bkt", req(2, Some("zz".into())))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn multipart_rules_and_etag() {
        let o = objs();
        o.create_bucket("bkt").await.unwrap();
        let id = o
            .create_multipart("bkt", "big", PutOptions::default())
            .await
            .unwrap();
        let big: &'static [u8] = Box::leak(vec![7u8; MIN_PART_SIZE as usize].into_boxed_slice());
        let p1 = o
            .upload_part("bkt", "big", &id, 1, None, body(vec![big]))
            .await
            .unwrap();
        let p2 = o
            .upload_part("bkt", "big", &id, 2, None, body(vec![b"tail"]))
            .await
            .unwrap();
        assert_eq!(o.list_parts("bkt", "big", &id).await.unwrap().len(), 2);
        assert!(matches!(
            o.complete_multipart(
                "bkt",
                "big",
                &id,
                vec![(2, p2.etag.clone()), (1, p1.etag.clone())]
            )
            .await,
            Err(ObjError::InvalidPartOrder)
        ));
        assert!(matches!(
            o.complete_multipart("bkt", "big", &id, vec![(1, p2.etag.clone())])
                .await,
            Err(ObjError::InvalidPart(1))
        ));
        assert!(matches!(
            o.complete_multipart(
                "bkt",
                "big",
                &id,
                vec![(1, p1.etag.clone()), (3, p2.etag.clone())]
            )
            .await,
            Err(ObjError::InvalidPart(3))
        ));
        let info = o
            .complete_multipart(
                "bkt",
                "big",
                &id,
                vec![(1, format!("\"{}\"", p1.etag)), (2, p2.etag.clone())],
            )
            .await
            .unwrap();
        assert_eq!(info.etag, multipart_etag(&[p1.etag, p2.etag]).unwrap());
        assert!(info.etag.ends_with("-2"));
        assert_eq!(info.size, MIN_PART_SIZE + 4);
        let (_, _, s) = o
            .get_object("bkt", "big", Some(ByteRange::Suffix(5)))
            .await
            .unwrap();
        assert_eq!(read_all(s).await, b"\x07tail");
        assert!(matches!(
            o.list_parts("bkt", "big", &id).await,
            Err(ObjError::NoSuchUpload(_))
        ));
        // Too-small non-last part; abort cleans up.
        let id = o
            .create_multipart("bkt", "small", PutOptions::default())
            .await
            .unwrap();
        let a = o
            .upload_part("bkt", "small", &id, 1, None, body(vec![b"a"]))
            .await
            .unwrap();
        let b = o
            .upload_part("bkt", "small", &id, 2, None, body(vec![b"b"]))
            .await
            .unwrap();
        assert!(matches!(
            o.complete_multipart("bkt", "small", &id, vec![(1, a.etag), (2, b.etag)])
                .await,
            Err(ObjError::EntityTooSmall { part: 1, size: 1 })
        ));
        o.abort_multipart("bkt", "small", &id).await.unwrap();
        assert_eq!(std::fs::read_dir(o.dir.join("blobs")).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn reopen_sweeps_orphans_and_keeps_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let objdir = dir.path().join("objects");
        {
            let o = EmbeddedObjects::open(store.clone(), Some(&objdir)).unwrap();
            o.create_bucket("bkt").await.unwrap();
            o.put_object("bkt", "k", PutOptions::default(), body(vec![b"data"]))
                .await
                .unwrap();
        }
        std::fs::write(objdir.join("blobs").join("orphan"), b"x").unwrap();
        std::fs::write(objdir.join("tmp").join("partial"), b"x").unwrap();
        let o = EmbeddedObjects::open(store, Some(&objdir)).unwrap();
        assert!(!objdir.join("blobs").join("orphan").exists());
        assert!(!objdir.join("tmp").join("partial").exists());
        let (_, _, s) = o.get_object("bkt", "k", None).await.unwrap();
        assert_eq!(read_all(s).await, b"data");
        assert_eq!(o.usage(), vec![("bkt".into(), 1, 4)]);
    }
}
