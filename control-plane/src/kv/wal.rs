//! The embedded KV's write-ahead log (`<data-dir>/kv.wal`), after etcd's design: each
//! group-committed batch is appended as one record and `fdatasync`ed before any write of the
//! batch is answered; redb then commits the batch *without* its own fsync
//! (`Durability::None`) and is made durable in the background (a *checkpoint*, see
//! [`super::embedded`]), after which the log starts over from offset 0.
//!
//! ## Records
//! A record is the batch's resulting **mutations** (table, key, new value or deletion — not
//! the requested operations), so replaying it is deterministic and idempotent, plus its
//! sequence number `seq` (one per batch that wrote something; redb stores the last applied one
//! in `kv.meta` `wal_seq` inside the batch's own transaction). Frame on disk:
//!
//! ```text
//! [payload length: u32 LE][CRC-32 (IEEE) of the payload: u32 LE][payload: WalRecord protobuf]
//! ```
//!
//! ## Reading
//! [`Wal::open`] reads frames from offset 0 while the length is non-zero and fits, the CRC
//! matches, the payload decodes, and each `seq` is the previous one plus one. The first frame
//! that fails ends the log: a torn tail (a crash mid-append; never acknowledged, since the
//! answer waits for the `fdatasync`), the zeros of pre-allocated space, or the leftovers of an
//! older pass over the file (their `seq`s do not continue the new ones). Replay applies the
//! records whose `seq` is above redb's durable `wal_seq`; the first of them must be exactly
//! `wal_seq + 1` (anything else means acknowledged batches are missing: [`WalError::Gap`]).
//!
//! ## Space
//! The file is pre-allocated with zeros in [`GROW_BYTES`] steps, so an append inside it changes
//! no file metadata and `fdatasync` writes only the data (as etcd pre-allocates its 64 MiB WAL
//! segments). After each checkpoint the writer starts over at offset 0 ([`Wal::rewind`]): every
//! record in the file is then durable in redb.

use std::fs::{File, OpenOptions};
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use prost::Message as _;

/// The log's file name inside the data directory.
pub const WAL_FILE: &str = "kv.wal";
/// The file grows (zero-filled) by this much when a record does not fit.
pub const GROW_BYTES: u64 = 1024 * 1024;
/// Frame header: payload length and CRC.
const HEADER: usize = 8;

/// One table-level change of a batch.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Mutation {
    /// The redb table (`kv.keys`, `kv.log`, …).
    #[prost(string, tag = "1")]
    pub table: String,
    /// The key.
    #[prost(bytes = "vec", tag = "2")]
    pub key: Vec<u8>,
    /// The new value; absent: the key is deleted.
    #[prost(bytes = "vec", optional, tag = "3")]
    pub value: Option<Vec<u8>>,
}

/// One batch's mutations, in the order they were made.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WalRecord {
    /// The batch's sequence number (consecutive over the batches that wrote something).
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// The changes.
    #[prost(message, repeated, tag = "2")]
    pub mutations: Vec<Mutation>,
}

/// Write-ahead log failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    /// Reading, writing or syncing the file failed.
    #[error("write-ahead log {path}: {what}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The log's records do not continue the store's last applied batch.
    #[error(
        "write-ahead log {path}: the store's last applied batch is {applied} but the log \
         continues at {first}: acknowledged writes are missing"
    )]
    Gap {
        /// The file.
        path: String,
        /// `wal_seq` in the store.
        applied: u64,
        /// The first record above it.
        first: u64,
    },
    /// A record too large for a frame (over 4 GiB).
    #[error("write-ahead log record of {0} bytes is too large")]
    TooLarge(usize),
}

/// The open log (used by the KV writer thread only).
#[derive(Debug)]
pub struct Wal {
    file: File,
    path: PathBuf,
    /// Where the next record goes.
    offset: u64,
    /// The file's (zero-filled) length.
    capacity: u64,
}

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    // Slicing-by-8: t[k][i] is the CRC of byte i followed by k zero bytes.
    let mut k = 1;
    while k < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            i += 1;
        }
        k += 1;
    }
    t
}

static CRC_TABLES: [[u32; 256]; 8] = crc_tables();

/// CRC-32 (IEEE 802.3, reflected, as zlib's `crc32`), eight bytes per step (slicing-by-8:
/// a batch of 4 KiB puts is tens of KiB per record, and a byte at a time was a visible part
/// of the writer thread's CPU).
pub fn crc32(data: &[u8]) -> u32 {
    let t = &CRC_TABLES;
    let mut c = !0u32;
    let mut chunks = data.chunks_exact(8);
    for ch in &mut chunks {
        let lo = u32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]) ^ c;
        let hi = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]);
        c = t[7][(lo & 0xFF) as usize]
            ^ t[6][((lo >> 8) & 0xFF) as usize]
            ^ t[5][((lo >> 16) & 0xFF) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xFF) as usize]
            ^ t[2][((hi >> 8) & 0xFF) as usize]
            ^ t[1][((hi >> 16) & 0xFF) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = t[0][((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// Append `v` as a protobuf varint.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes of `v` as a protobuf varint.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Append a length-delimited field (`tag`, wire type 2).
fn put_bytes_field(out: &mut Vec<u8>, tag: u8, data: &[u8]) {
    out.push((tag << 3) | 2);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// A batch's record being built: each mutation is encoded into the frame as it is made (the
/// protobuf of [`WalRecord`]'s `mutations`, field 2), so a write's key and value are copied
/// once into the log instead of into a [`Mutation`] and then into the frame. [`RecordBuf::frame`]
/// adds `seq` (field 1, after the mutations: protobuf fields may come in any order) and the
/// header. Decodes as the [`WalRecord`] with the same mutations (see the tests).
#[derive(Debug)]
pub struct RecordBuf {
    /// `[header placeholder][mutation fields…]`.
    buf: Vec<u8>,
}

impl Default for RecordBuf {
    fn default() -> Self {
        RecordBuf {
            buf: vec![0; HEADER],
        }
    }
}

impl RecordBuf {
    fn mutation(&mut self, table: &str, key: &[u8], value: Option<&[u8]>) {
        let field = |n: usize| 1 + varint_len(n as u64) + n;
        let len = field(table.len()) + field(key.len()) + value.map_or(0, |v| field(v.len()));
        self.buf.reserve(1 + varint_len(len as u64) + len);
        self.buf.push((2 << 3) | 2);
        put_varint(&mut self.buf, len as u64);
        put_bytes_field(&mut self.buf, 1, table.as_bytes());
        put_bytes_field(&mut self.buf, 2, key);
        if let Some(v) = value {
            // Present even when empty: an empty value is not a deletion.
            put_bytes_field(&mut self.buf, 3, v);
        }
    }

    /// Note that `key` of `table` was set to `value`.
    pub fn put(&mut self, table: &str, key: &[u8], value: &[u8]) {
        self.mutation(table, key, Some(value));
    }

    /// Note that `key` of `table` was deleted.
    pub fn delete(&mut self, table: &str, key: &[u8]) {
        self.mutation(table, key, None);
    }

    /// No mutation noted.
    pub fn is_empty(&self) -> bool {
        self.buf.len() == HEADER
    }

    /// The finished frame with sequence number `seq` (for [`Wal::append`]).
    pub fn frame(&mut self, seq: u64) -> Result<&[u8], WalError> {
        self.buf.push(1 << 3);
        put_varint(&mut self.buf, seq);
        let payload = self.buf.get(HEADER..).unwrap_or_default();
        let len = u32::try_from(payload.len()).map_err(|_| WalError::TooLarge(payload.len()))?;
        let crc = crc32(payload);
        self.buf[..4].copy_from_slice(&len.to_le_bytes());
        self.buf[4..HEADER].copy_from_slice(&crc.to_le_bytes());
        Ok(&self.buf)
    }
}

/// Encode `rec` as one frame.
pub fn frame(rec: &WalRecord) -> Result<Vec<u8>, WalError> {
    let len = rec.encoded_len();
    let len32 = u32::try_from(len).map_err(|_| WalError::TooLarge(len))?;
    let mut out = Vec::with_capacity(HEADER + len);
    out.extend_from_slice(&len32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    rec.encode(&mut out).map_err(|_| WalError::TooLarge(len))?;
    let crc = crc32(out.get(HEADER..).unwrap_or_default());
    out[4..HEADER].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// The valid records at the start of `data` (see the module docs) and where they end.
pub fn parse(data: &[u8]) -> (Vec<WalRecord>, usize) {
    let mut out: Vec<WalRecord> = Vec::new();
    let mut at = 0usize;
    while let Some(head) = data.get(at..at + HEADER) {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len == 0 {
            break;
        }
        let Some(payload) = data.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if crc32(payload) != crc {
            break;
        }
        let Ok(rec) = WalRecord::decode(payload) else {
            break;
        };
        if out.last().is_some_and(|prev| rec.seq != prev.seq + 1) {
            break;
        }
        out.push(rec);
        at += HEADER + len;
    }
    (out, at)
}

/// The records of `records` that are not yet applied when the store's last applied batch is
/// `applied`; a [`WalError::Gap`] if they do not continue it.
pub fn to_replay(
    path: &Path,
    records: Vec<WalRecord>,
    applied: u64,
) -> Result<Vec<WalRecord>, WalError> {
    let pending: Vec<WalRecord> = records.into_iter().filter(|r| r.seq > applied).collect();
    match pending.first() {
        Some(first) if first.seq != applied + 1 => Err(WalError::Gap {
            path: path.display().to_string(),
            applied,
            first: first.seq,
        }),
        _ => Ok(pending),
    }
}

impl Wal {
    /// Open (or create) the log at `path`; its valid records (see the module docs). The
    /// caller applies what is not yet in the store, makes the store durable, then calls
    /// [`Wal::rewind`] before the first [`Wal::append`].
    pub fn open(path: &Path) -> Result<(Wal, Vec<WalRecord>), WalError> {
        let io = |what| {
            let path = path.display().to_string();
            move |source| WalError::Io { path, what, source }
        };
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("opening"))?;
        if created && let Some(dir) = path.parent() {
            // The new directory entry must survive a crash before anything relies on it.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("syncing its directory"))?;
        }
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io("reading"))?;
        let (records, end) = parse(&data);
        if end < data.len()
            && data
                .get(end..end + HEADER)
                .is_some_and(|h| h != [0; HEADER])
        {
            tracing::info!(
                path = %path.display(),
                offset = end,
                "write-ahead log ends at a torn or stale record (ignored)"
            );
        }
        let wal = Wal {
            file,
            path: path.to_path_buf(),
            offset: end as u64,
            capacity: data.len() as u64,
        };
        Ok((wal, records))
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> WalError + '_ {
        move |source| WalError::Io {
            path: self.path.display().to_string(),
            what,
            source,
        }
    }

    /// Where the next record goes (bytes in use since the last rewind).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Append `frame` (from [`frame`]) and `fdatasync`; the offset it was written at (for
    /// [`Wal::undo`]). Durable when this returns `Ok`.
    pub fn append(&mut self, frame: &[u8]) -> Result<u64, WalError> {
        let at = self.offset;
        let end = at + frame.len() as u64;
        if end > self.capacity {
            // Zero-fill the new space so later appends inside it change no file metadata.
            let new_cap = end.div_ceil(GROW_BYTES) * GROW_BYTES;
            let zeros = vec![0u8; GROW_BYTES as usize];
            let mut pos = self.capacity;
            while pos < new_cap {
                let n = (new_cap - pos).min(GROW_BYTES) as usize;
                self.file
                    .write_all_at(zeros.get(..n).unwrap_or_default(), pos)
                    .map_err(self.io("growing"))?;
                pos += n as u64;
            }
            self.capacity = new_cap;
        }
        self.file
            .write_all_at(frame, at)
            .map_err(self.io("appending"))?;
        self.file.sync_data().map_err(self.io("syncing"))?;
        self.offset = end;
        Ok(at)
    }

    /// Take back the record appended at `at` (its batch was not committed): zero its header
    /// and sync, so it is not replayed; the next record goes there.
    pub fn undo(&mut self, at: u64) -> Result<(), WalError> {
        self.file
            .write_all_at(&[0; HEADER], at)
            .map_err(self.io("undoing a record"))?;
        self.file.sync_data().map_err(self.io("syncing"))?;
        self.offset = at;
        Ok(())
    }

    /// Start over at offset 0: every record in the file is durable in the store. (The old
    /// records left behind end the log on reading: their `seq`s do not continue the new ones.)
    pub fn rewind(&mut self) {
        self.offset = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, key: &str, value: Option<&str>) -> WalRecord {
        WalRecord {
            seq,
            mutations: vec![Mutation {
                table: "kv.keys".into(),
                key: key.as_bytes().to_vec(),
                value: value.map(|v| v.as_bytes().to_vec()),
            }],
        }
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        // Slicing-by-8 agrees with the byte-at-a-time definition at every length and offset.
        let bytewise = |data: &[u8]| {
            let mut c = !0u32;
            for &b in data {
                c = CRC_TABLES[0][((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
            }
            !c
        };
        let data: Vec<u8> = (0u32..300)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for start in 0..9 {
            for end in start..data.len() {
                assert_eq!(crc32(&data[start..end]), bytewise(&data[start..end]));
            }
        }
    }

    #[test]
    fn varints_and_their_lengths() {
        for v in [
            0u64,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            let mut slice = out.as_slice();
            assert_eq!(
                prost::encoding::decode_varint(&mut slice).expect("varint"),
                v
            );
        }
    }

    #[test]
    fn a_record_buf_decodes_as_the_same_record() {
        let big = vec![7u8; 200];
        let mut buf = RecordBuf::default();
        assert!(buf.is_empty());
        buf.put("kv.keys", b"a", b"1");
        buf.put("kv.lease_keys", b"lk", b"");
        buf.delete("kv.keys", b"gone");
        buf.put("kv.log", &big, &big);
        buf.put("kv.meta", b"", b"x");
        assert!(!buf.is_empty());
        let want = WalRecord {
            seq: 300,
            mutations: vec![
                Mutation {
                    table: "kv.keys".into(),
                    key: b"a".to_vec(),
                    value: Some(b"1".to_vec()),
                },
                // An empty value stays a put, not a deletion.
                Mutation {
                    table: "kv.lease_keys".into(),
                    key: b"lk".to_vec(),
                    value: Some(Vec::new()),
                },
                Mutation {
                    table: "kv.keys".into(),
                    key: b"gone".to_vec(),
                    value: None,
                },
                Mutation {
                    table: "kv.log".into(),
                    key: big.clone(),
                    value: Some(big.clone()),
                },
                Mutation {
                    table: "kv.meta".into(),
                    key: Vec::new(),
                    value: Some(b"x".to_vec()),
                },
            ],
        };
        let framed = buf.frame(300).expect("frame").to_vec();
        let (recs, end) = parse(&framed);
        assert_eq!(end, framed.len());
        assert_eq!(recs, vec![want.clone()]);
        // And it continues a log written by `frame`.
        let mut log = frame(&WalRecord {
            seq: 299,
            mutations: Vec::new(),
        })
        .expect("frame");
        log.extend_from_slice(&framed);
        assert_eq!(parse(&log).0.len(), 2);
    }

    #[test]
    fn append_reopen_reads_every_record_in_order() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(WAL_FILE);
        let (mut wal, recs) = Wal::open(&path).expect("open");
        assert!(recs.is_empty());
        wal.rewind();
        for seq in 1..=3 {
            wal.append(&frame(&rec(seq, "k", Some("v"))).expect("frame"))
                .expect("append");
        }
        // Pre-allocated with zeros: the file is larger than what is used.
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), GROW_BYTES);
        drop(wal);
        let (wal, recs) = Wal::open(&path).expect("reopen");
        assert_eq!(
            recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(recs[0], rec(1, "k", Some("v")));
        assert!(wal.offset() > 0);
    }

    #[test]
    fn a_torn_tail_is_ignored() {
        let good1 = frame(&rec(7, "a", Some("1"))).expect("frame");
        let good2 = frame(&rec(8, "b", None)).expect("frame");
        let torn = frame(&rec(9, "c", Some("3"))).expect("frame");
        let mut data = [good1.clone(), good2.clone()].concat();
        let whole = data.len();
        // Every prefix of the third record (a crash mid-append) leaves the first two.
        for cut in 0..torn.len() {
            let mut d = data.clone();
            d.extend_from_slice(&torn[..cut]);
            let (recs, end) = parse(&d);
            assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![7, 8]);
            assert_eq!(end, whole);
        }
        // A flipped payload bit fails the checksum.
        let mut bad = torn.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        data.extend_from_slice(&bad);
        let (recs, end) = parse(&data);
        assert_eq!(recs.len(), 2);
        assert_eq!(end, whole);
        // A length running past the end of the data.
        let mut long = good1.clone();
        long[0] = 0xFF;
        assert_eq!(parse(&long), (Vec::new(), 0));
    }

    #[test]
    fn stale_records_after_a_rewind_end_the_log() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(WAL_FILE);
        let (mut wal, _) = Wal::open(&path).expect("open");
        wal.rewind();
        // First pass: long records 1..=4.
        let long = "x".repeat(100);
        for seq in 1..=4 {
            wal.append(&frame(&rec(seq, &long, Some(&long))).expect("f"))
                .expect("append");
        }
        // Checkpointed: the second pass starts over with 5, 6 (shorter).
        wal.rewind();
        for seq in 5..=6 {
            wal.append(&frame(&rec(seq, "k", Some("v"))).expect("f"))
                .expect("append");
        }
        drop(wal);
        let (_, recs) = Wal::open(&path).expect("reopen");
        assert_eq!(recs.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![5, 6]);
        // If the store had applied 6 durably, nothing is replayed; at 4, both are.
        assert!(to_replay(&path, recs.clone(), 6).expect("none").is_empty());
        assert_eq!(to_replay(&path, recs.clone(), 4).expect("both").len(), 2);
        assert_eq!(to_replay(&path, recs.clone(), 5).expect("one")[0].seq, 6);
        // Applied 3 but the log starts at 5: acknowledged batch 4 is missing.
        assert!(matches!(
            to_replay(&path, recs, 3),
            Err(WalError::Gap {
                applied: 3,
                first: 5,
                ..
            })
        ));
    }

    #[test]
    fn undo_takes_back_the_last_record() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(WAL_FILE);
        let (mut wal, _) = Wal::open(&path).expect("open");
        wal.rewind();
        wal.append(&frame(&rec(1, "a", Some("1"))).expect("f"))
            .expect("append");
        let at = wal
            .append(&frame(&rec(2, "b", Some("2"))).expect("f"))
            .expect("append");
        wal.undo(at).expect("undo");
        // The retried batch reuses the sequence number, in the same place.
        assert_eq!(
            wal.append(&frame(&rec(2, "c", Some("3"))).expect("f"))
                .expect("append"),
            at
        );
        drop(wal);
        let (_, recs) = Wal::open(&path).expect("reopen");
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[1], rec(2, "c", Some("3")));
    }

    #[test]
    fn a_record_larger_than_the_growth_step_fits() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(WAL_FILE);
        let (mut wal, _) = Wal::open(&path).expect("open");
        wal.rewind();
        let big = "v".repeat(GROW_BYTES as usize + 10);
        wal.append(&frame(&rec(1, "big", Some(&big))).expect("f"))
            .expect("append");
        drop(wal);
        assert_eq!(
            std::fs::metadata(&path).expect("meta").len(),
            2 * GROW_BYTES
        );
        let (_, recs) = Wal::open(&path).expect("reopen");
        assert_eq!(recs[0].mutations[0].value.as_deref(), Some(big.as_bytes()));
    }
}
