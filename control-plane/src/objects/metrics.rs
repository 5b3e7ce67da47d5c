//! The object store's Prometheus metrics, rendered into weir-cp's `/metrics`.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `weir_cp_objects_objects` | gauge | `bucket` |
//! | `weir_cp_objects_bytes` | gauge | `bucket` |
//! | `weir_cp_objects_s3_requests_total` | counter | `op` (S3 operation), `status` |
//! | `weir_cp_objects_received_bytes_total` | counter | — (request bodies, S3 and gRPC) |
//! | `weir_cp_objects_sent_bytes_total` | counter | — (object bytes sent, S3 and gRPC) |
//! | `weir_cp_objects_grpc_requests_total` | counter | `method`, `code` |

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::ObjectBackend;
use super::s3::Op;

/// Counters of the object APIs plus the backend's usage gauges.
#[derive(Debug)]
pub struct ObjectsMetrics {
    backend: Arc<dyn ObjectBackend>,
    s3: Mutex<BTreeMap<(Op, u16), u64>>,
    grpc: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl ObjectsMetrics {
    /// Metrics over `backend`'s usage.
    pub fn new(backend: Arc<dyn ObjectBackend>) -> Self {
        ObjectsMetrics {
            backend,
            s3: Mutex::new(BTreeMap::new()),
            grpc: Mutex::new(BTreeMap::new()),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
        }
    }

    /// Count an S3 request with its response status.
    pub fn s3_request(&self, op: Op, status: u16) {
        *self
            .s3
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((op, status))
            .or_default() += 1;
    }

    /// Count a gRPC call with its outcome (`OK` or the status code name).
    pub fn grpc_request(&self, method: &'static str, code: &'static str) {
        *self
            .grpc
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((method, code))
            .or_default() += 1;
    }

    /// Body bytes received.
    pub fn bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Relaxed);
    }

    /// Object bytes sent.
    pub fn bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Relaxed);
    }
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl crate::metrics::Collector for ObjectsMetrics {
    fn render(&self, out: &mut String) {
        let usage = self.backend.usage();
        let _ = writeln!(
            out,
            "# HELP weir_cp_objects_objects Objects stored per bucket."
        );
        let _ = writeln!(out, "# TYPE weir_cp_objects_objects gauge");
        for (b, n, _) in &usage {
            let _ = writeln!(
                out,
                "weir_cp_objects_objects{{bucket=\"{}\"}} {n}",
                label(b)
            );
        }
        let _ = writeln!(
            out,
            "# HELP weir_cp_objects_bytes Object bytes stored per bucket."
        );
        let _ = writeln!(out, "# TYPE weir_cp_objects_bytes gauge");
        for (b, _, s) in &usage {
            let _ = writeln!(out, "weir_cp_objects_bytes{{bucket=\"{}\"}} {s}", label(b));
        }
        let _ = writeln!(
            out,
            "# HELP weir_cp_objects_s3_requests_total S3 requests by operation and status."
        );
        let _ = writeln!(out, "# TYPE weir_cp_objects_s3_requests_total counter");
        for ((op, status), n) in self.s3.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                out,
                "weir_cp_objects_s3_requests_total{{op=\"{}\",status=\"{status}\"}} {n}",
                op.as_str()
            );
        }
        let _ = writeln!(
            out,
            "# HELP weir_cp_objects_grpc_requests_total weir.objects.v1 calls by method and code."
        );
        let _ = writeln!(out, "# TYPE weir_cp_objects_grpc_requests_total counter");
        for ((m, c), n) in self.grpc.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                out,
                "weir_cp_objects_grpc_requests_total{{method=\"{m}\",code=\"{c}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP weir_cp_objects_received_bytes_total Object body bytes received."
        );
        let _ = writeln!(out, "# TYPE weir_cp_objects_received_bytes_total counter");
        let _ = writeln!(
            out,
            "weir_cp_objects_received_bytes_total {}",
            self.bytes_in.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP weir_cp_objects_sent_bytes_total Object bytes sent."
        );
        let _ = writeln!(out, "# TYPE weir_cp_objects_sent_bytes_total counter");
        let _ = writeln!(
            out,
            "weir_cp_objects_sent_bytes_total {}",
            self.bytes_out.load(Relaxed)
        );
    }
}
