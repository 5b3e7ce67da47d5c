//! Where log lines go: one writer thread per file (shared by every logger naming the same
//! path) or per standard stream, fed by a bounded channel. Requests only `try_send`: when the
//! channel is full the line is dropped and counted, never waited for. Files are reopened on
//! `SIGUSR1` or `POST /reopen_logs` (log rotation), as Envoy does.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use metrics::Counter;

use crate::stats::Store;

/// Lines a sink buffers before dropping.
pub const DEFAULT_CAPACITY: usize = 16 * 1024;

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
    /// `filesystem.write_buffered`: lines queued for the writer.
    pub write_buffered: Counter,
    /// `filesystem.write_completed`: writes done.
    pub write_completed: Counter,
    /// `filesystem.write_failed`: writes (or opens) that failed.
    pub write_failed: Counter,
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
            reopen_failed: Counter::noop(),
            write_dropped: Counter::noop(),
        }
    }
}

enum Msg {
    Line(String),
    Reopen,
}

/// A log destination with its writer thread. The thread ends (after writing what is queued)
/// when the last logger using the sink is dropped.
#[derive(Debug)]
pub struct Sink {
    target: Target,
    tx: SyncSender<Msg>,
    stats: SinkStats,
    dropped: AtomicU64,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Line(l) => write!(f, "Line({} bytes)", l.len()),
            Msg::Reopen => f.write_str("Reopen"),
        }
    }
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
        let s = Sink::new(target.clone(), DEFAULT_CAPACITY, SinkStats::new(stats))?;
        reg.insert(target, Arc::downgrade(&s));
        Ok(s)
    }

    /// A private sink with `capacity` queued lines (tests use tiny ones).
    pub fn new(target: Target, capacity: usize, stats: SinkStats) -> std::io::Result<Arc<Sink>> {
        let out = open(&target)?;
        let (tx, rx) = sync_channel(capacity.max(1));
        let t = target.clone();
        let st = stats.clone();
        std::thread::Builder::new()
            .name("weir-access-log".into())
            .spawn(move || writer(t, out, rx, st))?;
        Ok(Arc::new(Sink {
            target,
            tx,
            stats,
            dropped: AtomicU64::new(0),
        }))
    }

    /// Queue a line; drop it (and count) when the writer is behind. Never blocks.
    pub fn write(&self, line: String) {
        match self.tx.try_send(Msg::Line(line)) {
            Ok(()) => self.stats.write_buffered.increment(1),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.stats.write_dropped.increment(1);
            }
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
        // A full queue reopens at the next periodic check instead.
        let _ = self.tx.try_send(Msg::Reopen);
    }
}

/// Reopen every file sink (`SIGUSR1`, `POST /reopen_logs`).
pub fn reopen_all() {
    REOPEN_GEN.fetch_add(1, Ordering::SeqCst);
    let reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    for s in reg.values().filter_map(Weak::upgrade) {
        s.reopen();
    }
}

static REOPEN_GEN: AtomicU64 = AtomicU64::new(0);

enum Out {
    File(std::io::BufWriter<std::fs::File>),
    Stdout,
    Stderr,
}

fn open(t: &Target) -> std::io::Result<Out> {
    Ok(match t {
        Target::File(p) => Out::File(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        )),
        Target::Stdout => Out::Stdout,
        Target::Stderr => Out::Stderr,
    })
}

impl Out {
    fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Out::File(f) => f.write_all(b),
            Out::Stdout => std::io::stdout().lock().write_all(b),
            Out::Stderr => std::io::stderr().lock().write_all(b),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Out::File(f) => f.flush(),
            Out::Stdout => std::io::stdout().flush(),
            Out::Stderr => std::io::stderr().flush(),
        }
    }
}

/// The writer loop: write what is queued, flush when the queue is empty, reopen on request
/// (or when the reopen generation moved while the queue was full), end when every sender is
/// gone.
fn writer(target: Target, mut out: Out, rx: Receiver<Msg>, stats: SinkStats) {
    let mut gen_seen = REOPEN_GEN.load(Ordering::SeqCst);
    let reopen = |out: &mut Out, gen_seen: &mut u64| {
        let _ = out.flush();
        *gen_seen = REOPEN_GEN.load(Ordering::SeqCst);
        match open(&target) {
            Ok(o) => *out = o,
            Err(e) => {
                stats.reopen_failed.increment(1);
                tracing::warn!(target = ?target, error = %e, "access log reopen failed");
            }
        }
    };
    loop {
        let msg = match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                if REOPEN_GEN.load(Ordering::SeqCst) != gen_seen {
                    reopen(&mut out, &mut gen_seen);
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut next = Some(msg);
        while let Some(m) = next.take() {
            match m {
                Msg::Line(l) => match out.write(l.as_bytes()) {
                    Ok(()) => stats.write_completed.increment(1),
                    Err(_) => stats.write_failed.increment(1),
                },
                Msg::Reopen => reopen(&mut out, &mut gen_seen),
            }
            next = rx.try_recv().ok();
        }
        if out.flush().is_err() {
            stats.write_failed.increment(1);
        }
    }
    let _ = out.flush();
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
        // Capacity 1: the writer cannot keep up with a burst sent without yielding.
        let s = Sink::new(Target::File(p.clone()), 1, SinkStats::noop()).expect("sink");
        for i in 0..2000 {
            s.write(format!("line {i}\n"));
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
        s.write("one\n".into());
        assert_eq!(wait_for(&p, 1), "one\n");
        let rotated = format!("{p}.1");
        std::fs::rename(&p, &rotated).expect("rotate");
        s.reopen();
        s.write("two\n".into());
        assert_eq!(wait_for(&p, 1), "two\n");
        assert_eq!(std::fs::read_to_string(&rotated).expect("old"), "one\n");
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(&rotated);
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
