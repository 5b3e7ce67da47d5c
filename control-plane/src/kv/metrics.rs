//! The KV store's Prometheus metrics, rendered as part of weir-cp's `/metrics`
//! ([`crate::metrics::Metrics::render`]).
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `weir_cp_kv_revision` | gauge | — (the store's current revision) |
//! | `weir_cp_kv_compact_revision` | gauge | — |
//! | `weir_cp_kv_keys` | gauge | — (live keys) |
//! | `weir_cp_kv_leases` | gauge | — (live leases) |
//! | `weir_cp_kv_watchers` | gauge | — (open watch streams) |
//! | `weir_cp_kv_requests_total` | counter | `op` (see [`Op`]) |
//! | `weir_cp_kv_request_errors_total` | counter | `op` |
//! | `weir_cp_kv_leases_expired_total` | counter | — |
//! | `weir_cp_kv_commits_total` | counter | — (durable write batches of the embedded store) |
//! | `weir_cp_kv_committed_writes_total` | counter | — (writes in those batches) |
//! | `weir_cp_kv_checkpoints_total` | counter | — (durable redb commits that let the write-ahead log start over) |
//! | `weir_cp_kv_checkpoint_seconds_total` | counter | — (time the writer spent in them) |
//! | `weir_cp_kv_writebacks_total` | counter | — (background `fdatasync`s of the redb file between checkpoints) |
//! | `weir_cp_kv_writeback_seconds_total` | counter | — (their time; writes do not wait for them) |
//! | `weir_cp_kv_writeback_errors_total` | counter | — (failed ones) |

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// A KV API operation (the `op` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// `KV/Range`.
    Range,
    /// `KV/Put`.
    Put,
    /// `KV/DeleteRange`.
    DeleteRange,
    /// `KV/Txn`.
    Txn,
    /// `KV/Compact`.
    Compact,
    /// `Watch/Watch`.
    Watch,
    /// `Lease/LeaseGrant`.
    LeaseGrant,
    /// `Lease/LeaseRevoke`.
    LeaseRevoke,
    /// One keep-alive on a `Lease/LeaseKeepAlive` stream.
    LeaseKeepAlive,
    /// `Lease/LeaseTimeToLive`.
    LeaseTimeToLive,
    /// `Lease/LeaseLeases`.
    LeaseLeases,
}

const OPS: [Op; 11] = [
    Op::Range,
    Op::Put,
    Op::DeleteRange,
    Op::Txn,
    Op::Compact,
    Op::Watch,
    Op::LeaseGrant,
    Op::LeaseRevoke,
    Op::LeaseKeepAlive,
    Op::LeaseTimeToLive,
    Op::LeaseLeases,
];

impl Op {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Range => "range",
            Op::Put => "put",
            Op::DeleteRange => "delete_range",
            Op::Txn => "txn",
            Op::Compact => "compact",
            Op::Watch => "watch",
            Op::LeaseGrant => "lease_grant",
            Op::LeaseRevoke => "lease_revoke",
            Op::LeaseKeepAlive => "lease_keepalive",
            Op::LeaseTimeToLive => "lease_timetolive",
            Op::LeaseLeases => "lease_leases",
        }
    }

    fn index(self) -> usize {
        OPS.iter().position(|o| *o == self).unwrap_or(0)
    }
}

/// The KV store's metrics (a field of [`crate::metrics::Metrics`]).
#[derive(Debug, Default)]
pub struct KvMetrics {
    revision: AtomicI64,
    compact_revision: AtomicI64,
    keys: AtomicI64,
    leases: AtomicI64,
    watchers: AtomicI64,
    requests: [AtomicU64; 11],
    errors: [AtomicU64; 11],
    leases_expired: AtomicU64,
    commits: AtomicU64,
    committed_writes: AtomicU64,
    checkpoints: AtomicU64,
    checkpoint_micros: AtomicU64,
    write_backs: AtomicU64,
    write_back_micros: AtomicU64,
    write_back_errors: AtomicU64,
}

impl KvMetrics {
    /// Set the current and compact revisions.
    pub fn set_revisions(&self, revision: i64, compact_revision: i64) {
        self.revision.store(revision, Relaxed);
        self.compact_revision.store(compact_revision, Relaxed);
    }

    /// Set the current revision.
    pub fn set_revision(&self, revision: i64) {
        self.revision.store(revision, Relaxed);
    }

    /// Set the compact revision.
    pub fn set_compact_revision(&self, revision: i64) {
        self.compact_revision.store(revision, Relaxed);
    }

    /// Set the number of live keys.
    pub fn set_keys(&self, n: i64) {
        self.keys.store(n, Relaxed);
    }

    /// Add `delta` (may be negative) to the number of live keys.
    pub fn add_keys(&self, delta: i64) {
        self.keys.fetch_add(delta, Relaxed);
    }

    /// Set the number of live leases.
    pub fn set_leases(&self, n: i64) {
        self.leases.store(n, Relaxed);
    }

    /// A lease expired (was not kept alive).
    pub fn lease_expired(&self) {
        self.leases_expired.fetch_add(1, Relaxed);
    }

    /// The embedded store committed a batch of `writes` writes in one durable transaction.
    pub fn batch_committed(&self, writes: usize) {
        self.commits.fetch_add(1, Relaxed);
        self.committed_writes.fetch_add(writes as u64, Relaxed);
    }

    /// The embedded store made redb durable and started its write-ahead log over.
    pub fn checkpointed(&self, took: std::time::Duration) {
        self.checkpoints.fetch_add(1, Relaxed);
        self.checkpoint_micros
            .fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    /// A background write-back of the redb file (between checkpoints) finished.
    pub fn written_back(&self, took: std::time::Duration) {
        self.write_backs.fetch_add(1, Relaxed);
        self.write_back_micros
            .fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    /// A background write-back of the redb file failed.
    pub fn write_back_failed(&self) {
        self.write_back_errors.fetch_add(1, Relaxed);
    }

    /// Background write-backs of the redb file so far.
    pub fn write_backs(&self) -> u64 {
        self.write_backs.load(Relaxed)
    }

    /// Checkpoints of the embedded store's write-ahead log so far.
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints.load(Relaxed)
    }

    /// (durable commits, writes in them) of the embedded store.
    pub fn commits(&self) -> (u64, u64) {
        (
            self.commits.load(Relaxed),
            self.committed_writes.load(Relaxed),
        )
    }

    /// A watch stream opened (+1) or closed (-1).
    pub fn add_watchers(&self, delta: i64) {
        self.watchers.fetch_add(delta, Relaxed);
    }

    /// A request of `op` arrived.
    pub fn request(&self, op: Op) {
        if let Some(c) = self.requests.get(op.index()) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// A request of `op` failed.
    pub fn error(&self, op: Op) {
        if let Some(c) = self.errors.get(op.index()) {
            c.fetch_add(1, Relaxed);
        }
    }

    /// (revision, keys, leases, watchers).
    pub fn gauges(&self) -> (i64, i64, i64, i64) {
        (
            self.revision.load(Relaxed),
            self.keys.load(Relaxed),
            self.leases.load(Relaxed),
            self.watchers.load(Relaxed),
        )
    }

    /// Append the Prometheus text exposition to `out`.
    pub fn render(&self, out: &mut String) {
        for (name, help, v) in [
            (
                "weir_cp_kv_revision",
                "The KV store's current revision.",
                self.revision.load(Relaxed),
            ),
            (
                "weir_cp_kv_compact_revision",
                "The KV store's compact revision (history before it is dropped).",
                self.compact_revision.load(Relaxed),
            ),
            ("weir_cp_kv_keys", "Live keys.", self.keys.load(Relaxed)),
            (
                "weir_cp_kv_leases",
                "Live leases.",
                self.leases.load(Relaxed),
            ),
            (
                "weir_cp_kv_watchers",
                "Open watch streams.",
                self.watchers.load(Relaxed),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {v}");
        }
        for (name, help, counters) in [
            (
                "weir_cp_kv_requests_total",
                "KV API requests, by operation.",
                &self.requests,
            ),
            (
                "weir_cp_kv_request_errors_total",
                "KV API requests that failed, by operation.",
                &self.errors,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (op, c) in OPS.iter().zip(counters) {
                let _ = writeln!(out, "{name}{{op=\"{}\"}} {}", op.as_str(), c.load(Relaxed));
            }
        }
        for (name, help, v) in [
            (
                "weir_cp_kv_commits_total",
                "Durable write transactions of the embedded KV store (group commits).",
                &self.commits,
            ),
            (
                "weir_cp_kv_committed_writes_total",
                "Writes committed by those transactions (their sum of batch sizes).",
                &self.committed_writes,
            ),
            (
                "weir_cp_kv_checkpoints_total",
                "Durable redb commits after which the embedded KV's write-ahead log starts over.",
                &self.checkpoints,
            ),
            (
                "weir_cp_kv_writebacks_total",
                "Background fdatasyncs of the redb file between the embedded KV's checkpoints.",
                &self.write_backs,
            ),
            (
                "weir_cp_kv_writeback_errors_total",
                "Background write-backs of the redb file that failed.",
                &self.write_back_errors,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Relaxed));
        }
        for (name, help, micros) in [
            (
                "weir_cp_kv_checkpoint_seconds_total",
                "Time the embedded KV's writer spent in checkpoints (writes wait meanwhile).",
                &self.checkpoint_micros,
            ),
            (
                "weir_cp_kv_writeback_seconds_total",
                "Time spent in background write-backs of the redb file (writes do not wait \
                 for them).",
                &self.write_back_micros,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", micros.load(Relaxed) as f64 / 1e6);
        }
        let _ = writeln!(
            out,
            "# HELP weir_cp_kv_leases_expired_total Leases revoked because they were not kept alive."
        );
        let _ = writeln!(out, "# TYPE weir_cp_kv_leases_expired_total counter");
        let _ = writeln!(
            out,
            "weir_cp_kv_leases_expired_total {}",
            self.leases_expired.load(Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders() {
        let m = KvMetrics::default();
        m.set_revisions(7, 3);
        m.add_keys(2);
        m.add_keys(-1);
        m.request(Op::Put);
        m.request(Op::Put);
        m.error(Op::Txn);
        m.add_watchers(1);
        m.lease_expired();
        m.batch_committed(3);
        m.batch_committed(1);
        m.checkpointed(std::time::Duration::from_millis(1500));
        m.written_back(std::time::Duration::from_millis(250));
        m.written_back(std::time::Duration::from_millis(250));
        m.write_back_failed();
        let mut text = String::new();
        m.render(&mut text);
        for line in [
            "weir_cp_kv_revision 7",
            "weir_cp_kv_compact_revision 3",
            "weir_cp_kv_keys 1",
            "weir_cp_kv_watchers 1",
            "weir_cp_kv_requests_total{op=\"put\"} 2",
            "weir_cp_kv_requests_total{op=\"range\"} 0",
            "weir_cp_kv_request_errors_total{op=\"txn\"} 1",
            "weir_cp_kv_leases_expired_total 1",
            "weir_cp_kv_commits_total 2",
            "weir_cp_kv_committed_writes_total 4",
            "weir_cp_kv_checkpoints_total 1",
            "weir_cp_kv_checkpoint_seconds_total 1.5",
            "weir_cp_kv_writebacks_total 2",
            "weir_cp_kv_writeback_seconds_total 0.5",
            "weir_cp_kv_writeback_errors_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
    }
}
