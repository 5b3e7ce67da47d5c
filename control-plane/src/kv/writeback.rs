//! Background write-back of the redb file between the embedded KV's checkpoints.
//!
//! With a write-ahead log, every KV batch commits to redb with `Durability::None`: redb
//! `pwrite`s the batch's dirty B-tree pages into the page cache but does not `fsync`. The
//! checkpoint (an empty durable commit, see `embedded.rs`) then has to write back everything
//! dirtied since the previous one in one `fdatasync` — 0.5–1.4 s after 8 192 batches on the
//! bench VM — while the writer thread holds redb's write lock and every queued write waits.
//!
//! Here a [`Flusher`] thread `fdatasync`s a second handle of the same file whenever the
//! writer asks ([`Flusher::kick`]); the kernel then writes the dirty pages back while the
//! writer goes on committing batches, and the checkpoint's own durable commit finds only
//! what was dirtied since the last write-back. A [`Pacer`] decides when to ask:
//! - when the writer has been idle for a fifth of the checkpoint lull with a checkpoint
//!   pending (nobody waits on the disk then, and the idle checkpoint that follows is short);
//! - under a sustained load, after [`EVERY_BATCHES`] logged batches, [`EVERY_BYTES`] of log
//!   or [`EVERY`], whichever comes first.
//!
//! The load thresholds are a trade-off, measured (`docs/design/store-performance.md` § 8):
//! on the bench VM the disk does not overlap a write-back with the log's `fdatasync`s (a log
//! append waits about as long as the write-back in flight), and hot B-tree pages are written
//! once per write-back instead of once per checkpoint. Every 100 ms cut a mid-load checkpoint
//! from 0.8–1.3 s to under 20 ms but raised the put p99 2–4× and wrote back 50 % more; every
//! second still put 100–150 ms write-backs into 2-second bench rows. So under load the
//! checkpoint is only cut into a few pieces (an 8 192-batch checkpoint into about four),
//! and a 2 000-put bench row sees none.
//!
//! **Durability is unchanged.** The write-back only forces earlier what the kernel's own
//! periodic write-back may do at any moment anyway: redb's non-durable commits write data
//! pages only (never the header that makes them reachable after a crash), and nothing is
//! answered on the strength of this `fdatasync` — writes are durable by the log's
//! `fdatasync`, redb by the checkpoint's. A write-back error is logged and counted, not
//! swallowed: Linux reports a write-back error to every open file description that existed
//! before it, so redb's own `fsync` at the next checkpoint still sees it and the checkpoint
//! fails (the log keeps the writes).

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// Ask for a write-back after this many logged batches since the last one…
pub(super) const EVERY_BATCHES: u32 = 2048;
/// …or this many bytes of log (a proxy for the pages the batches dirtied)…
pub(super) const EVERY_BYTES: u64 = 32 * 1024 * 1024;
/// …or once this long has passed since the last one (with at least one batch logged since;
/// bounds how long pages stay dirty under a slow load without lulls).
pub(super) const EVERY: Duration = Duration::from_secs(10);

/// When to start a background write-back (pure: the caller passes the time and the log's
/// offset, so tests drive it with made-up instants).
#[derive(Debug, Clone)]
pub(super) struct Pacer {
    every_batches: u32,
    every_bytes: u64,
    every: Duration,
    /// Logged batches since the last write-back (or checkpoint).
    batches: u32,
    /// The log's offset at the last write-back (or checkpoint: 0).
    offset: u64,
    /// The log's offset after the previous batch.
    seen: u64,
    /// When the last write-back (or checkpoint) started.
    last: Instant,
}

impl Pacer {
    /// A pacer with the default thresholds; `now` counts as the last write-back.
    pub(super) fn new(now: Instant) -> Self {
        Self::with(EVERY_BATCHES, EVERY_BYTES, EVERY, now)
    }

    /// A pacer with the given thresholds.
    pub(super) fn with(
        every_batches: u32,
        every_bytes: u64,
        every: Duration,
        now: Instant,
    ) -> Self {
        Pacer {
            every_batches: every_batches.max(1),
            every_bytes,
            every,
            batches: 0,
            offset: 0,
            seen: 0,
            last: now,
        }
    }

    /// A batch was committed (non-durably) and the log now ends at `offset`: whether to start
    /// a write-back now. A batch that logged nothing (the offset did not move) dirtied no
    /// pages and counts for nothing.
    pub(super) fn committed(&mut self, now: Instant, offset: u64) -> bool {
        let previous = std::mem::replace(&mut self.seen, offset);
        if offset < previous || offset < self.offset {
            // The log started over without a checkpoint being reported: count from 0.
            self.offset = 0;
        } else if offset == previous {
            return false;
        }
        self.batches = self.batches.saturating_add(1);
        if self.batches >= self.every_batches
            || offset - self.offset >= self.every_bytes
            || now.saturating_duration_since(self.last) >= self.every
        {
            self.started(now, offset);
            return true;
        }
        false
    }

    /// The writer has been idle for a moment with a checkpoint pending: whether to start a
    /// write-back (only if something was logged since the last one).
    pub(super) fn idle(&mut self, now: Instant, offset: u64) -> bool {
        self.seen = offset;
        if offset < self.offset {
            self.offset = 0;
        }
        if offset == self.offset {
            return false;
        }
        self.started(now, offset);
        true
    }

    /// A checkpoint made everything durable and the log started over.
    pub(super) fn checkpointed(&mut self, now: Instant) {
        self.started(now, 0);
    }

    fn started(&mut self, now: Instant, offset: u64) {
        self.batches = 0;
        self.offset = offset;
        self.seen = offset;
        self.last = now;
    }
}

/// A thread that `fdatasync`s the redb file (its own handle) each time it is kicked. Dropping
/// it stops and joins the thread (after a write-back in progress).
#[derive(Debug)]
pub(super) struct Flusher {
    tx: Option<SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    /// Open `path` (the redb file) a second time and start the thread.
    pub(super) fn start(path: &Path, metrics: Arc<Metrics>) -> std::io::Result<Flusher> {
        let file = std::fs::OpenOptions::new().read(true).open(path)?;
        // One pending request at most: a kick while one is queued is covered by it (it
        // starts later, so it writes back the newer pages too).
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("weir-kv-writeback".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    let started = Instant::now();
                    match file.sync_data() {
                        Ok(()) => metrics.kv.written_back(started.elapsed()),
                        Err(e) => {
                            metrics.kv.write_back_failed();
                            tracing::warn!(
                                "KV background write-back failed (the next checkpoint will \
                                 report it too): {e}"
                            );
                        }
                    }
                }
            })?;
        Ok(Flusher {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Ask for a write-back; returns at once. False if the thread is gone.
    pub(super) fn kick(&self) -> bool {
        match self.tx.as_ref().map(|tx| tx.try_send(())) {
            Some(Ok(())) | Some(Err(TrySendError::Full(()))) => true,
            Some(Err(TrySendError::Disconnected(()))) | None => false,
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn pacer_fires_on_batches_bytes_or_time() {
        let t0 = Instant::now();
        // By batch count: the 4th batch (1 ms apart, 10 bytes each) starts one.
        let mut p = Pacer::with(4, 1 << 20, 100 * MS, t0);
        let fired: Vec<bool> = (1..=8u32)
            .map(|i| p.committed(t0 + MS * i, u64::from(i) * 10))
            .collect();
        assert_eq!(
            fired,
            [false, false, false, true, false, false, false, true]
        );

        // By bytes: 600 bytes since the last, although only 2 batches.
        let mut p = Pacer::with(100, 1000, 100 * MS, t0);
        assert!(!p.committed(t0 + MS, 600));
        assert!(p.committed(t0 + 2 * MS, 1200));
        assert!(!p.committed(t0 + 3 * MS, 1300));
        assert!(p.committed(t0 + 4 * MS, 2200));

        // By time: the first batch at least 100 ms after the last write-back.
        let mut p = Pacer::with(100, 1 << 20, 100 * MS, t0);
        assert!(!p.committed(t0 + 50 * MS, 10));
        assert!(!p.committed(t0 + 99 * MS, 20));
        assert!(p.committed(t0 + 100 * MS, 30));
        assert!(!p.committed(t0 + 150 * MS, 40));
        assert!(p.committed(t0 + 200 * MS, 50));
    }

    #[test]
    fn pacer_ignores_batches_that_logged_nothing() {
        let t0 = Instant::now();
        let mut p = Pacer::with(2, 1 << 20, 100 * MS, t0);
        assert!(!p.committed(t0 + MS, 10));
        // Same offset (e.g. a failed CAS): no dirty pages, not counted, even after the interval.
        assert!(!p.committed(t0 + 2 * MS, 10));
        assert!(!p.committed(t0 + 500 * MS, 10));
        assert!(p.committed(t0 + 501 * MS, 20));
        // Nothing logged since: idle does not start one either.
        assert!(!p.idle(t0 + 600 * MS, 20));
    }

    #[test]
    fn pacer_idle_and_checkpoint() {
        let t0 = Instant::now();
        let mut p = Pacer::with(100, 1 << 20, 100 * MS, t0);
        assert!(!p.idle(t0, 0), "nothing logged yet");
        assert!(!p.committed(t0 + MS, 10));
        assert!(p.idle(t0 + 20 * MS, 10), "logged since the last write-back");
        assert!(!p.idle(t0 + 40 * MS, 10), "once per lull");
        // The interval counts from that write-back.
        assert!(!p.committed(t0 + 100 * MS, 20));
        assert!(p.committed(t0 + 120 * MS, 30));
        // A checkpoint rewinds the log; counting starts over at offset 0 and its time.
        assert!(!p.committed(t0 + 130 * MS, 40));
        p.checkpointed(t0 + 140 * MS);
        assert!(!p.idle(t0 + 150 * MS, 0));
        assert!(!p.committed(t0 + 160 * MS, 10));
        assert!(!p.committed(t0 + 239 * MS, 20));
        assert!(p.committed(t0 + 240 * MS, 30));
    }

    #[test]
    fn pacer_survives_an_unreported_rewind() {
        let t0 = Instant::now();
        let mut p = Pacer::with(100, 1000, 100 * MS, t0);
        assert!(p.committed(t0 + MS, 5000));
        // The log started over (offset went back) without `checkpointed`: counted from 0.
        assert!(!p.committed(t0 + 2 * MS, 500));
        assert!(p.committed(t0 + 3 * MS, 1000));
    }

    #[test]
    fn flusher_writes_back_when_kicked_and_joins_on_drop() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("f");
        std::fs::write(&path, b"data").expect("write");
        let metrics = Arc::new(Metrics::default());
        let f = Flusher::start(&path, metrics.clone()).expect("start");
        assert!(f.kick());
        // Bounded wait for the thread (real time: it has no other clock).
        let deadline = Instant::now() + Duration::from_secs(10);
        while metrics.kv.write_backs() == 0 && Instant::now() < deadline {
            std::thread::sleep(MS);
        }
        assert!(metrics.kv.write_backs() >= 1);
        // Kicks never block, however many (coalesced while one is pending).
        for _ in 0..100 {
            assert!(f.kick());
        }
        drop(f);
        let n = metrics.kv.write_backs();
        assert!((1..=102).contains(&n), "{n}");
        // Joined: nothing runs after the drop.
        std::thread::sleep(10 * MS);
        assert_eq!(metrics.kv.write_backs(), n);
    }

    #[test]
    fn flusher_needs_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let metrics = Arc::new(Metrics::default());
        assert!(Flusher::start(&dir.path().join("missing"), metrics).is_err());
    }
}
