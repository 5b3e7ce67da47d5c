//! A minimal OTLP/gRPC trace exporter: weir's own prost definitions of the messages of
//! `opentelemetry.proto.collector.trace.v1.TraceService/Export` (only the fields weir
//! writes), and a batching task that sends them through a cluster.
//!
//! Spans are queued with `try_send` on a bounded channel (full = dropped and counted); the
//! task flushes every [`FLUSH_SPANS`] spans or [`FLUSH_INTERVAL`] (Envoy's OpenTelemetry
//! defaults), with an export timeout. A failed export (collector down, no host, timeout,
//! non-OK gRPC status) drops the batch and counts it. Requests never wait on any of this.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use metrics::Counter;

use crate::upstream::ClusterManager;

/// Spans that trigger a flush (Envoy's `min_flush_spans`).
pub const FLUSH_SPANS: usize = 5;
/// Flush interval (Envoy's `flush_interval_ms`).
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// Spans queued before dropping.
pub const QUEUE: usize = 4096;
/// Largest batch per export call.
pub const MAX_BATCH: usize = 512;
/// Export call timeout.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// The gRPC method.
pub const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// `ExportTraceServiceRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceRequest {
    /// `resource_spans`.
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpans>,
}

/// `ExportTraceServiceResponse` (partial success is ignored).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceResponse {}

/// `ResourceSpans`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceSpans {
    /// `resource`.
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    /// `scope_spans`.
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpans>,
}

/// `Resource`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    /// `attributes`.
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

/// `ScopeSpans`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeSpans {
    /// `scope`.
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    /// `spans`.
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<Span>,
}

/// `InstrumentationScope`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct InstrumentationScope {
    /// `name`.
    #[prost(string, tag = "1")]
    pub name: String,
    /// `version`.
    #[prost(string, tag = "2")]
    pub version: String,
}

/// `Span`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Span {
    /// 16 bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    /// 8 bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub span_id: Vec<u8>,
    /// W3C tracestate.
    #[prost(string, tag = "3")]
    pub trace_state: String,
    /// 8 bytes or empty (root).
    #[prost(bytes = "vec", tag = "4")]
    pub parent_span_id: Vec<u8>,
    /// Name.
    #[prost(string, tag = "5")]
    pub name: String,
    /// `SpanKind` (2 = SERVER, 3 = CLIENT).
    #[prost(int32, tag = "6")]
    pub kind: i32,
    /// Start, ns since the epoch.
    #[prost(fixed64, tag = "7")]
    pub start_time_unix_nano: u64,
    /// End, ns since the epoch.
    #[prost(fixed64, tag = "8")]
    pub end_time_unix_nano: u64,
    /// Attributes.
    #[prost(message, repeated, tag = "9")]
    pub attributes: Vec<KeyValue>,
    /// Status.
    #[prost(message, optional, tag = "15")]
    pub status: Option<Status>,
}

/// `SpanKind.SPAN_KIND_SERVER`.
pub const SPAN_KIND_SERVER: i32 = 2;
/// `SpanKind.SPAN_KIND_CLIENT`.
pub const SPAN_KIND_CLIENT: i32 = 3;
/// `Status.StatusCode.STATUS_CODE_ERROR`.
pub const STATUS_ERROR: i32 = 2;

/// `Status`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    /// `message`.
    #[prost(string, tag = "2")]
    pub message: String,
    /// `code` (0 unset, 1 ok, 2 error).
    #[prost(int32, tag = "3")]
    pub code: i32,
}

/// `KeyValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    /// Key.
    #[prost(string, tag = "1")]
    pub key: String,
    /// Value.
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

impl KeyValue {
    /// A string attribute.
    pub fn string(key: &str, v: impl Into<String>) -> Self {
        Self {
            key: key.to_string(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
        }
    }

    /// The string value, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s),
            _ => None,
        }
    }
}

/// `AnyValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AnyValue {
    /// The value.
    #[prost(oneof = "any_value::Value", tags = "1, 2, 3")]
    pub value: Option<any_value::Value>,
}

/// `AnyValue.value`.
pub mod any_value {
    /// The value.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        /// `string_value`.
        #[prost(string, tag = "1")]
        StringValue(String),
        /// `bool_value`.
        #[prost(bool, tag = "2")]
        BoolValue(bool),
        /// `int_value`.
        #[prost(int64, tag = "3")]
        IntValue(i64),
    }
}

/// `tracing.opentelemetry.*` stats.
#[derive(Debug, Clone)]
pub struct ExporterStats {
    /// `spans_sent`: spans the collector accepted.
    pub spans_sent: Counter,
    /// `spans_dropped`: spans lost (queue full, export failed).
    pub spans_dropped: Counter,
    /// `timer_flushed`: flushes by the interval timer.
    pub timer_flushed: Counter,
    /// `export_failed`: export calls that failed.
    pub export_failed: Counter,
}

impl ExporterStats {
    /// Register under `tracing.opentelemetry.`.
    pub fn new(store: &Arc<crate::stats::Store>) -> Self {
        let s = store.plain("tracing.opentelemetry");
        Self {
            spans_sent: s.counter("spans_sent"),
            spans_dropped: s.counter("spans_dropped"),
            timer_flushed: s.counter("timer_flushed"),
            export_failed: s.counter("export_failed"),
        }
    }
}

/// The running exporter: a queue into its task.
#[derive(Debug)]
pub struct Exporter {
    tx: tokio::sync::mpsc::Sender<Span>,
    stats: ExporterStats,
}

impl Exporter {
    /// Start the task exporting to `cluster` with `resource` attributes. It ends (after a
    /// last flush) when the exporter is dropped.
    pub fn start(
        clusters: Arc<ClusterManager>,
        cluster: String,
        resource: Vec<KeyValue>,
        stats: ExporterStats,
    ) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let st = stats.clone();
        tokio::spawn(run(rx, clusters, cluster, resource, st));
        Self { tx, stats }
    }

    /// Queue a span; never waits.
    pub fn export(&self, span: Span) {
        if self.tx.try_send(span).is_err() {
            self.stats.spans_dropped.increment(1);
        }
    }
}

async fn run(
    mut rx: tokio::sync::mpsc::Receiver<Span>,
    clusters: Arc<ClusterManager>,
    cluster: String,
    resource: Vec<KeyValue>,
    stats: ExporterStats,
) {
    let mut batch: Vec<Span> = Vec::new();
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            s = rx.recv() => match s {
                Some(s) => {
                    batch.push(s);
                    if batch.len() >= FLUSH_SPANS {
                        flush(&mut batch, &clusters, &cluster, &resource, &stats).await;
                    }
                }
                None => {
                    flush(&mut batch, &clusters, &cluster, &resource, &stats).await;
                    return;
                }
            },
            _ = tick.tick() => {
                if !batch.is_empty() {
                    stats.timer_flushed.increment(1);
                    flush(&mut batch, &clusters, &cluster, &resource, &stats).await;
                }
            }
        }
    }
}

async fn flush(
    batch: &mut Vec<Span>,
    clusters: &ClusterManager,
    cluster: &str,
    resource: &[KeyValue],
    stats: &ExporterStats,
) {
    while !batch.is_empty() {
        let n = batch.len().min(MAX_BATCH);
        let spans: Vec<Span> = batch.drain(..n).collect();
        let req = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: resource.to_vec(),
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "weir".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans,
                }],
            }],
        };
        match tokio::time::timeout(EXPORT_TIMEOUT, send(clusters, cluster, &req)).await {
            Ok(Ok(())) => stats.spans_sent.increment(n as u64),
            Ok(Err(e)) => {
                tracing::debug!(cluster, error = %e, "OTLP export failed");
                stats.export_failed.increment(1);
                stats.spans_dropped.increment(n as u64);
            }
            Err(_) => {
                tracing::debug!(cluster, "OTLP export timed out");
                stats.export_failed.increment(1);
                stats.spans_dropped.increment(n as u64);
            }
        }
    }
}

/// A gRPC length-prefixed message.
pub fn grpc_frame(msg: &impl prost::Message) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(5 + len);
    b.put_u8(0);
    b.put_u32(len as u32);
    // Encoding into a buffer with enough capacity cannot fail.
    let _ = msg.encode(&mut b);
    b.freeze()
}

async fn send(
    clusters: &ClusterManager,
    cluster: &str,
    req: &ExportTraceServiceRequest,
) -> Result<(), String> {
    let c = clusters
        .get(cluster)
        .ok_or_else(|| format!("cluster {cluster:?} not found"))?;
    let host = c
        .choose_host(&crate::upstream::LbContext::default())
        .ok_or("no healthy upstream")?;
    let mut r = http::Request::new(crate::http::local_reply::full(grpc_frame(req)));
    *r.method_mut() = http::Method::POST;
    *r.uri_mut() = http::Uri::from_static(EXPORT_PATH);
    *r.version_mut() = http::Version::HTTP_2;
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    h.insert("te", http::HeaderValue::from_static("trailers"));
    if let Ok(v) = http::HeaderValue::from_str(cluster) {
        h.insert(http::header::HOST, v);
    }
    let resp = c
        .send_http(&host, r, true, crate::upstream::circuit::Priority::Default)
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("HTTP {}", resp.status()));
    }
    let head_status = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let status = head_status.or_else(|| {
        body.trailers()
            .and_then(|t| t.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    match status.as_deref() {
        Some("0") => Ok(()),
        Some(s) => Err(format!("grpc-status {s}")),
        None => Err("no grpc-status".into()),
    }
}
