//! Where log lines go: one writer thread per file (shared by every logger naming the same
//! path) or per standard stream, fed by an in-memory buffer, as Envoy's file access log
//! does (`AccessLogFileImpl`: a locked buffer, flushed by a timer or when it grows).
//!
//! Requests render their line into a thread-local `String` (no allocation per line) and
//! append it to the sink's buffer under a short lock (a `memcpy`; the lock keeps lines from
//! different workers in the order they finished). They never wait for I/O: the writer
//! thread swaps the buffer out every [`FLUSH_INTERVAL`], or as soon as it holds
//! [`FLUSH_BYTES`], and writes it with one `write` per swap. When the buffer holds
//! [`MAX_BUFFERED`] bytes (the writer fell behind), lines are dropped and counted. Files are
//! reopened on `SIGUSR1` or `POST /reopen_logs` (log rotation), as Envoy does.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use metrics::Counter;

use crate::stats::Store;

/// How often the writer writes what is buffered (Envoy's `file_flush_interval_msec` is
/// 1 s; weir flushes sooner so `tail -f` and tests see lines quickly).
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Buffered bytes that wake the writer before the interval (Envoy's flush size, 64 KiB).
pub const FLUSH_BYTES: usize = 64 * 1024;
/// Buffered bytes beyond which lines are dropped (the writer is behind).
pub const MAX_BUFFERED: usize = 4 * 1024 * 1024;

/// Where a sink writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A file (appended; created when missing).
    File(String),
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// `filesystem.*` stats (Envoy's names; `write_dropped` is weir's).
#[derive(Debug, Clone)]
pub struct SinkStats {
    /// `filesystem.write_buffered`: lines moved into the flush buffer.
    pub write_buffered: Counter,
    /// `filesystem.write_completed`: writes of the buffer done.
    pub write_completed: Counter,
    /// `filesystem.write_failed`: writes (or opens) that failed.
    pub write_failed: Counter,
    /// `filesystem.flushed_by_timer`: flushes started by the interval, not by size.
    pub flushed_by_timer: Counter,
    /// `filesystem.reopen_failed`.
    pub reopen_failed: Counter,
    /// `filesystem.write_dropped`: lines dropped because the writer fell behind.
    pub write_dropped: Counter,
}

impl SinkStats {
    /// Register under `filesystem.`.
    pub fn new(store: &Arc<Store>) -> Self {
        let s = store.plain("filesystem");
        Self {
            write_buffered: s.counter("write_buffered"),
            write_completed: s.counter("write_completed"),
            write_failed: s.counter("write_failed"),
            flushed_by_timer: s.counter("flushed_by_timer"),
            reopen_failed: s.counter("reopen_failed"),
            write_dropped: s.counter("write_dropped"),
        }
    }

    /// Counters that count nothing.
    pub fn noop() -> Self {
        Self {
            write_buffered: Counter::noop(),
            write_completed: Counter::noop(),
            write_failed: Counter::noop(),
            flushed_by_timer: Counter::noop(),
            reopen_failed: Counter::noop(),
            write_dropped: Counter::noop(),
        }
    }
}

/// The state shared by a sink and its writer thread.
#[derive(Debug)]
struct Shared {
    /// Lines not yet handed to the writer.
    buf: Mutex<Pending>,
    /// The sink is gone: write what is left and end.
    closed: AtomicBool,
}

/// The buffer, and where in it a reopen was asked for (lines before it go to the old file).
#[derive(Debug, Default)]
struct Pending {
    data: Vec<u8>,
    reopen_at: Option<usize>,
}

/// A log destination with its writer thread. The thread ends (after writing what is
/// buffered) when the last logger using the sink is dropped.
#[derive(Debug)]
pub struct Sink {
    target: Target,
    shared: Arc<Shared>,
    writer: std::thread::Thread,
    limit: usize,
    stats: SinkStats,
    dropped: AtomicU64,
}

fn registry() -> &'static Mutex<HashMap<Target, Weak<Sink>>> {
    static R: std::sync::OnceLock<Mutex<HashMap<Target, Weak<Sink>>>> = std::sync::OnceLock::new();
    R.get_or_init(Default::default)
}

impl Sink {
    /// The sink for `target`, shared with every other logger writing there.
    pub fn shared(target: Target, stats: &Arc<Store>) -> std::io::Result<Arc<Sink>> {
        let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
        reg.retain(|_, w| w.strong_count() > 0);
        if let Some(s) = reg.get(&target).and_then(Weak::upgrade) {
            return Ok(s);
        }
        let s = Sink::new(target.clone(), MAX_BUFFERED, SinkStats::new(stats))?;
        reg.insert(target, Arc::downgrade(&s));
        Ok(s)
    }

    /// A private sink buffering at most `limit` bytes (tests use tiny ones).
    pub fn new(target: Target, limit: usize, stats: SinkStats) -> std::io::Result<Arc<Sink>> {
        let out = open(&target)?;
        let shared = Arc::new(Shared {
            buf: Mutex::new(Pending::default()),
            closed: AtomicBool::new(false),
        });
        let (t, st, sh) = (target.clone(), stats.clone(), shared.clone());
        let handle = std::thread::Builder::new()
            .name("weir-access-log".into())
            .spawn(move || writer(t, out, sh, st))?;
        Ok(Arc::new(Sink {
            target,
            shared,
            writer: handle.thread().clone(),
            limit: limit.max(1),
            stats,
            dropped: AtomicU64::new(0),
        }))
    }

    /// Buffer a line; drop it (and count) when the writer is behind. Never waits for I/O.
    pub fn write(&self, line: &str) {
        let wake = {
            let mut p = self.shared.buf.lock().unwrap_or_else(|p| p.into_inner());
            let b = &mut p.data;
            if b.len() + line.len() > self.limit {
                drop(p);
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.stats.write_dropped.increment(1);
                return;
            }
            let before = b.len();
            if b.capacity() == 0 {
                b.reserve(FLUSH_BYTES.min(self.limit));
            }
            b.extend_from_slice(line.as_bytes());
            // Wake the writer once, when the buffer crosses the flush size.
            before < FLUSH_BYTES && b.len() >= FLUSH_BYTES
        };
        self.stats.write_buffered.increment(1);
        if wake {
            self.writer.unpark();
        }
    }

    /// Lines dropped so far by this sink.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The destination.
    pub fn target(&self) -> &Target {
        &self.target
    }

    fn reopen(&self) {
        {
            let mut p = self.shared.buf.lock().unwrap_or_else(|p| p.into_inner());
            if p.reopen_at.is_none() {
                p.reopen_at = Some(p.data.len());
            }
        }
        self.writer.unpark();
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.writer.unpark();
    }
}

/// Reopen every file sink (`SIGUSR1`, `POST /reopen_logs`).
pub fn reopen_all() {
    let reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    for s in reg.values().filter_map(Weak::upgrade) {
        s.reopen();
    }
}

enum Out {
    File(std::fs::File),
    Stdout,
    Stderr,
}

fn open(t: &Target) -> std::io::Result<Out> {
    Ok(match t {
        Target::File(p) => Out::File(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
        Target::Stdout => Out::Stdout,
        Target::Stderr => Out::Stderr,
    })
}

impl Out {
    fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Out::File(f) => f.write_all(b),
            Out::Stdout => {
                let mut o = std::io::stdout().lock();
                o.write_all(b)?;
                o.flush()
            }
            Out::Stderr => std::io::stderr().lock().write_all(b),
        }
    }
}

/// The writer loop: every [`FLUSH_INTERVAL`] (or when woken: the buffer crossed
/// [`FLUSH_BYTES`], a reopen, the sink closing) swap the buffer out and write it; reopen on
/// request; end, after a last write, when the sink is dropped.
fn writer(target: Target, mut out: Out, shared: Arc<Shared>, stats: SinkStats) {
    // The buffer handed back and forth keeps its capacity.
    let mut spare: Vec<u8> = Vec::new();
    let write = |out: &mut Out, b: &[u8]| {
        if !b.is_empty() {
            match out.write(b) {
                Ok(()) => stats.write_completed.increment(1),
                Err(_) => stats.write_failed.increment(1),
            }
        }
    };
    loop {
        let started = std::time::Instant::now();
        std::thread::park_timeout(FLUSH_INTERVAL);
        let closed = shared.closed.load(Ordering::SeqCst);
        let reopen_at = {
            let mut p = shared.buf.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::swap(&mut p.data, &mut spare);
            p.reopen_at.take()
        };
        if !spare.is_empty() && started.elapsed() >= FLUSH_INTERVAL {
            stats.flushed_by_timer.increment(1);
        }
        match reopen_at {
            // Lines buffered before the reopen go to the old file, the rest to the new one.
            Some(at) => {
                let at = at.min(spare.len());
                write(&mut out, &spare[..at]);
                match open(&target) {
                    Ok(o) => out = o,
                    Err(e) => {
                        stats.reopen_failed.increment(1);
                        tracing::warn!(target = ?target, error = %e, "access log reopen failed");
                    }
                }
                write(&mut out, &spare[at..]);
            }
            None => write(&mut out, &spare),
        }
        spare.clear();
        // Do not keep a burst's worth of memory around.
        spare.shrink_to(FLUSH_BYTES * 2);
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> String {
        let d = std::env::temp_dir().join(format!("weir-al-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&d);
        d.to_string_lossy().into_owned()
    }

    fn wait_for(path: &str, want: usize) -> String {
        for _ in 0..200 {
            let s = std::fs::read_to_string(path).unwrap_or_default();
            if s.lines().count() >= want {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn full_channel_drops_and_counts_without_blocking() {
        let p = tmp("drop");
        // A 64-byte buffer: a burst written faster than the 100 ms flush must drop.
        let s = Sink::new(Target::File(p.clone()), 64, SinkStats::noop()).expect("sink");
        for i in 0..2000 {
            s.write(&format!("line {i}\n"));
        }
        let dropped = s.dropped();
        assert!(dropped > 0, "a burst into a 1-slot queue must drop");
        assert!(dropped < 2000, "some lines must be written");
        let written = 2000 - dropped as usize;
        let text = wait_for(&p, written);
        assert_eq!(text.lines().count(), written);
        assert!(text.starts_with("line 0\n"));
        drop(s);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn reopen_follows_rotation() {
        let p = tmp("rotate");
        let s = Sink::new(Target::File(p.clone()), 64, SinkStats::noop()).expect("sink");
        s.write("one\n");
        assert_eq!(wait_for(&p, 1), "one\n");
        let rotated = format!("{p}.1");
        std::fs::rename(&p, &rotated).expect("rotate");
        s.reopen();
        s.write("two\n");
        assert_eq!(wait_for(&p, 1), "two\n");
        assert_eq!(std::fs::read_to_string(&rotated).expect("old"), "one\n");
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(&rotated);
    }

    #[test]
    fn lines_are_written_by_the_timer_and_on_drop_in_order() {
        let p = tmp("order");
        let s = Sink::new(Target::File(p.clone()), MAX_BUFFERED, SinkStats::noop()).expect("sink");
        for i in 0..100 {
            s.write(&format!("a {i}\n"));
        }
        // No wake-up below FLUSH_BYTES: the interval writes them.
        let text = wait_for(&p, 100);
        let want: String = (0..100).map(|i| format!("a {i}\n")).collect();
        assert_eq!(text, want);
        // Lines still buffered when the last user goes are written by the exiting writer.
        for i in 0..10 {
            s.write(&format!("b {i}\n"));
        }
        drop(s);
        let text = wait_for(&p, 110);
        assert!(text.ends_with("b 8\nb 9\n"), "{text}");
        assert_eq!(text.lines().count(), 110);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn sinks_are_shared_per_path() {
        let p = tmp("shared");
        let store = Store::new();
        let a = Sink::shared(Target::File(p.clone()), &store).expect("a");
        let b = Sink::shared(Target::File(p.clone()), &store).expect("b");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(Sink::shared(Target::File("/nonexistent-dir/x.log".into()), &store).is_err());
        let _ = std::fs::remove_file(&p);
    }
}
