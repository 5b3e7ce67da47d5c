//! A minimal OTLP/gRPC trace exporter: weir's own prost definitions of the messages of
//! `opentelemetry.proto.collector.trace.v1.TraceService/Export` (only the fields weir
//! writes), and a batching task that sends them through a cluster.
//!
//! A request's span is encoded to protobuf bytes on the request's thread straight from
//! borrowed facts ([`Enc`], [`EncodedSpan`]: one allocation per span, no owned attribute
//! strings), and queued with `try_send` on a bounded channel (full = dropped and counted).
//! The batching task ([`run`]) sends a batch once [`FLUSH_SPANS`] spans wait and no call
//! runs (or every [`FLUSH_INTERVAL`]: Envoy's OpenTelemetry defaults), but such a small call
//! starts at most once per [`CALL_GAP`]; while a call runs, or within the gap, the next
//! batch grows, and another call starts only at [`BUSY_BATCH`] spans, up to
//! [`MAX_IN_FLIGHT`] calls and [`MAX_BATCH`] spans per call. Each call costs the proxy far
//! more than a span does (a request, an HTTP/2 stream, a response), so a busy proxy sends
//! about one call per [`CALL_GAP`] rather than one per 5 spans. A batch is framed around the encoded spans ([`BatchHeader::frame`]:
//! resource and scope encoded once per exporter), with an export timeout. A failed export
//! (collector down, no host, timeout, non-OK gRPC status) drops the batch and counts it.
//! Requests never wait on any of this. The prost message types stay: tests decode what a
//! collector receives with them, and [`crate::trace::build_span`] is the reference form the
//! direct encoding is checked against.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use metrics::Counter;

use crate::text::decimal;
use crate::upstream::ClusterManager;

/// Spans that trigger a flush (Envoy's `min_flush_spans`) when a call slot is free.
pub const FLUSH_SPANS: usize = 5;
/// Export calls running at once (Envoy's gRPC client does not wait for one call before
/// starting the next either).
pub const MAX_IN_FLIGHT: usize = 4;
/// Spans that start another call while one is already running (or within [`CALL_GAP`]).
pub const BUSY_BATCH: usize = 128;
/// Smallest time between two calls started by [`FLUSH_SPANS`]: at a high span rate a call
/// per 5 spans cost the proxy ~5 µs per span (weir's `benches/obs.sh` profile); with the gap
/// a busy proxy sends one larger batch per gap. A quiet proxy is unaffected (its first 5
/// spans go at once), and a span waits at most this long longer.
pub const CALL_GAP: Duration = Duration::from_millis(20);
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
    tx: tokio::sync::mpsc::Sender<EncodedSpan>,
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
        let sink = ClusterSink { clusters, cluster };
        tokio::spawn(run(rx, sink, BatchHeader::new(resource), st));
        Self { tx, stats }
    }

    /// Queue an encoded span; never waits (a full queue drops and counts it).
    pub fn export(&self, span: EncodedSpan) {
        if self.tx.try_send(span).is_err() {
            self.stats.spans_dropped.increment(1);
        }
    }
}

/// Where batches go (a cluster in weir; a fake in unit tests).
pub trait ExportSink: Clone + Send + Sync + 'static {
    /// Send one framed `ExportTraceServiceRequest`.
    fn send(&self, frame: Bytes) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

/// Export through a cluster of the cluster manager.
#[derive(Clone)]
struct ClusterSink {
    clusters: Arc<ClusterManager>,
    cluster: String,
}

impl ExportSink for ClusterSink {
    async fn send(&self, frame: Bytes) -> Result<(), String> {
        send(&self.clusters, &self.cluster, frame).await
    }
}

/// The batching loop: collect spans and send up to [`MAX_BATCH`] of them in one call when
/// [`ready`] says so. While calls run the batch grows (up to [`MAX_BATCH`], then the queue
/// fills and new spans are dropped at `try_send`), so a fast request rate makes large
/// batches, not many calls.
pub async fn run<S: ExportSink>(
    mut rx: tokio::sync::mpsc::Receiver<EncodedSpan>,
    sink: S,
    header: BatchHeader,
    stats: ExporterStats,
) {
    let header = Arc::new(header);
    let mut batch: Vec<EncodedSpan> = Vec::new();
    let mut calls = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut open = true;
    // When the last call started, and a wake-up for the end of the gap after it.
    let mut last_call: Option<tokio::time::Instant> = None;
    let gap = tokio::time::sleep(FLUSH_INTERVAL);
    tokio::pin!(gap);
    let mut gap_armed = false;
    while open || !batch.is_empty() || !calls.is_empty() {
        let mut timer = false;
        tokio::select! {
            s = rx.recv(), if open && batch.len() < MAX_BATCH => match s {
                Some(s) => {
                    batch.push(s);
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(s) => batch.push(s),
                            Err(_) => break,
                        }
                    }
                }
                None => open = false,
            },
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
            _ = tick.tick(), if open => timer = !batch.is_empty(),
            _ = &mut gap, if gap_armed => gap_armed = false,
        }
        let now = tokio::time::Instant::now();
        let gap_over = last_call.is_none_or(|t| now >= t + CALL_GAP);
        if ready(batch.len(), calls.len(), timer, open, gap_over) {
            last_call = Some(now);
            if timer {
                stats.timer_flushed.increment(1);
            }
            let n = batch.len().min(MAX_BATCH);
            let spans: Vec<EncodedSpan> = batch.drain(..n).collect();
            let (sink, header, stats) = (sink.clone(), header.clone(), stats.clone());
            calls.spawn(async move { export(&sink, &header, &spans, &stats).await });
        } else if !gap_over
            && !gap_armed
            && calls.is_empty()
            && batch.len() >= FLUSH_SPANS
            && let Some(t) = last_call
        {
            // Enough spans but too soon after the last call: look again when the gap ends.
            gap.as_mut().reset(t + CALL_GAP);
            gap_armed = true;
        }
    }
}

/// Whether to start a call now with `waiting` spans while `running` calls are in flight:
/// [`FLUSH_SPANS`] start one when none runs and `gap_over` ([`CALL_GAP`] passed since the
/// last call started); more calls (up to [`MAX_IN_FLIGHT`]) start only once [`BUSY_BATCH`]
/// spans wait, so a busy proxy sends a few large batches rather than many small ones. The
/// timer and closing send whatever waits.
pub fn ready(waiting: usize, running: usize, timer: bool, open: bool, gap_over: bool) -> bool {
    if waiting == 0 || running >= MAX_IN_FLIGHT {
        return false;
    }
    timer || !open || waiting >= BUSY_BATCH || (running == 0 && gap_over && waiting >= FLUSH_SPANS)
}

async fn export<S: ExportSink>(
    sink: &S,
    header: &BatchHeader,
    spans: &[EncodedSpan],
    stats: &ExporterStats,
) {
    let n = spans.len() as u64;
    match tokio::time::timeout(EXPORT_TIMEOUT, sink.send(header.frame(spans))).await {
        Ok(Ok(())) => stats.spans_sent.increment(n),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "OTLP export failed");
            stats.export_failed.increment(1);
            stats.spans_dropped.increment(n);
        }
        Err(_) => {
            tracing::debug!("OTLP export timed out");
            stats.export_failed.increment(1);
            stats.spans_dropped.increment(n);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Direct encoding: a request's span is written as protobuf bytes straight from borrowed facts
// (no owned `Span` with ~15 `String` attributes), and a batch is framed around the already
// encoded spans. The output is byte-identical to prost's encoding of the equivalent messages
// (unit-tested against it).

use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

/// A varint, as prost writes it, with the one-byte case (most tags and lengths of a span)
/// inlined: prost's generic `BufMut` loop was the largest single symbol of span encoding.
#[inline]
fn varint(v: u64, buf: &mut Vec<u8>) {
    if v < 0x80 {
        buf.push(v as u8);
    } else {
        encode_varint(v, buf);
    }
}

/// A field key (tag and wire type), as prost's `encode_key` writes it.
#[inline]
fn field_key(tag: u32, wire: WireType) -> u64 {
    (u64::from(tag) << 3) | wire as u64
}

/// One `Span` message, already protobuf-encoded (without its field tag and length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedSpan(pub Vec<u8>);

impl EncodedSpan {
    /// Decode (tests and diagnostics).
    pub fn decode(&self) -> Result<Span, prost::DecodeError> {
        prost::Message::decode(self.0.as_slice())
    }
}

/// The length of a length-delimited field (tag, length, payload) with payload `len`.
fn field_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len
}

/// Writes protobuf fields into a buffer, omitting proto3 defaults as prost does.
pub struct Enc<'a>(pub &'a mut Vec<u8>);

impl Enc<'_> {
    /// A `bytes` field (omitted when empty).
    pub fn bytes(&mut self, tag: u32, v: &[u8]) {
        if !v.is_empty() {
            varint(field_key(tag, WireType::LengthDelimited), self.0);
            varint(v.len() as u64, self.0);
            self.0.extend_from_slice(v);
        }
    }

    /// A `string` field (omitted when empty).
    pub fn string(&mut self, tag: u32, v: &str) {
        self.bytes(tag, v.as_bytes());
    }

    /// An `int32` field (omitted when 0).
    pub fn int32(&mut self, tag: u32, v: i32) {
        if v != 0 {
            varint(field_key(tag, WireType::Varint), self.0);
            varint(i64::from(v) as u64, self.0);
        }
    }

    /// A `fixed64` field (omitted when 0).
    pub fn fixed64(&mut self, tag: u32, v: u64) {
        if v != 0 {
            varint(field_key(tag, WireType::SixtyFourBit), self.0);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// A `KeyValue` with a string value made of `parts` concatenated (`attributes`, tag 9 of
    /// `Span`), truncated to `max` bytes on a character boundary.
    pub fn attr_parts(&mut self, tag: u32, key: &str, parts: &[&str], max: usize) {
        let full: usize = parts.iter().map(|p| p.len()).sum();
        let vlen = if full > max {
            // The char boundary at or below `max` of the concatenation.
            let mut end = max;
            loop {
                let mut off = 0;
                let mut ok = true;
                for p in parts {
                    if end >= off && end < off + p.len() {
                        ok = p.is_char_boundary(end - off);
                        break;
                    }
                    off += p.len();
                }
                if ok {
                    break end;
                }
                end -= 1;
            }
        } else {
            full
        };
        // AnyValue { string_value = 1 } (a oneof: written even when empty).
        let any = field_len(1, vlen);
        let kv = if key.is_empty() {
            0
        } else {
            field_len(1, key.len())
        } + field_len(2, any);
        varint(field_key(tag, WireType::LengthDelimited), self.0);
        varint(kv as u64, self.0);
        self.string(1, key);
        varint(field_key(2, WireType::LengthDelimited), self.0);
        varint(any as u64, self.0);
        varint(field_key(1, WireType::LengthDelimited), self.0);
        varint(vlen as u64, self.0);
        let mut left = vlen;
        for p in parts {
            let n = p.len().min(left);
            self.0.extend_from_slice(&p.as_bytes()[..n]);
            left -= n;
        }
    }

    /// A string `KeyValue` (tag `tag`).
    pub fn attr(&mut self, tag: u32, key: &str, value: &str) {
        self.attr_parts(tag, key, &[value], usize::MAX);
    }

    /// A `KeyValue` whose string value is the decimal `n`.
    pub fn attr_u64(&mut self, tag: u32, key: &str, n: u64) {
        let mut buf = [0u8; 20];
        self.attr(tag, key, decimal(n, &mut buf));
    }

    /// A message field whose body `f` writes (its length is patched in afterwards; bodies
    /// here are far below 128 bytes or get a wider length prefix).
    pub fn message(&mut self, tag: u32, f: impl FnOnce(&mut Enc<'_>)) {
        varint(field_key(tag, WireType::LengthDelimited), self.0);
        let at = self.0.len();
        f(&mut Enc(self.0));
        let len = self.0.len() - at;
        let mut prefix = Vec::with_capacity(5);
        varint(len as u64, &mut prefix);
        self.0.splice(at..at, prefix);
    }
}

/// The parts of an export request shared by every batch (`Resource` and
/// `InstrumentationScope`), encoded once.
#[derive(Debug, Clone)]
pub struct BatchHeader {
    resource: Vec<u8>,
    scope: Vec<u8>,
}

impl BatchHeader {
    /// Encode the resource attributes and weir's instrumentation scope.
    pub fn new(resource: Vec<KeyValue>) -> Self {
        let resource = prost::Message::encode_to_vec(&Resource {
            attributes: resource,
        });
        let scope = prost::Message::encode_to_vec(&InstrumentationScope {
            name: "weir".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        });
        Self { resource, scope }
    }

    /// The gRPC-framed `ExportTraceServiceRequest` carrying `spans`.
    pub fn frame(&self, spans: &[EncodedSpan]) -> Bytes {
        let scope_spans = field_len(1, self.scope.len())
            + spans.iter().map(|s| field_len(2, s.0.len())).sum::<usize>();
        let resource_spans = field_len(1, self.resource.len()) + field_len(2, scope_spans);
        let request = field_len(1, resource_spans);
        let mut b = BytesMut::with_capacity(5 + request);
        b.put_u8(0);
        b.put_u32(request as u32);
        let ld = |tag: u32, len: usize, b: &mut BytesMut| {
            encode_key(tag, WireType::LengthDelimited, b);
            encode_varint(len as u64, b);
        };
        ld(1, resource_spans, &mut b);
        ld(1, self.resource.len(), &mut b);
        b.put_slice(&self.resource);
        ld(2, scope_spans, &mut b);
        ld(1, self.scope.len(), &mut b);
        b.put_slice(&self.scope);
        for s in spans {
            ld(2, s.0.len(), &mut b);
            b.put_slice(&s.0);
        }
        b.freeze()
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

async fn send(clusters: &ClusterManager, cluster: &str, frame: Bytes) -> Result<(), String> {
    let c = clusters
        .get(cluster)
        .ok_or_else(|| format!("cluster {cluster:?} not found"))?;
    let host = c
        .choose_host(&crate::upstream::LbContext::default())
        .ok_or("no healthy upstream")?;
    let mut r = http::Request::new(crate::http::local_reply::full(frame));
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

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue::string(k, v)
    }

    #[test]
    fn attributes_encode_as_prost_does() {
        for (key, parts, max) in [
            ("k", vec!["value"], usize::MAX),
            ("empty", vec![""], usize::MAX),
            ("url", vec!["http", "://", "example.com", "/a/b?c"], 14),
            ("url", vec!["http", "://", "h", "/é/ü"], 10), // a cut inside "é" backs off
            ("url", vec!["http", "://", "h", "/x"], 7),    // a cut at a part boundary
            ("long", vec![&"x".repeat(300)], usize::MAX),  // two-byte lengths
        ] {
            let mut got = Vec::new();
            Enc(&mut got).attr_parts(9, key, &parts, max);
            let mut full: String = parts.concat();
            if full.len() > max {
                let mut end = max;
                while !full.is_char_boundary(end) {
                    end -= 1;
                }
                full.truncate(end);
            }
            let want = Span {
                attributes: vec![kv(key, &full)],
                ..Default::default()
            }
            .encode_to_vec();
            assert_eq!(got, want, "{key} {parts:?} {max}");
        }
        let mut got = Vec::new();
        Enc(&mut got).attr_u64(9, "n", 1_234_567);
        Enc(&mut got).attr_u64(9, "z", 0);
        let want = Span {
            attributes: vec![kv("n", "1234567"), kv("z", "0")],
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(got, want);
        let mut b = [0u8; 20];
        assert_eq!(decimal(u64::MAX, &mut b), u64::MAX.to_string());
    }

    #[test]
    fn batch_frame_is_the_prost_request() {
        let spans: Vec<Span> = (0..3u8)
            .map(|i| Span {
                trace_id: vec![i; 16],
                span_id: vec![i + 1; 8],
                name: format!("s{i}"),
                kind: SPAN_KIND_SERVER,
                start_time_unix_nano: 1,
                end_time_unix_nano: 2 + u64::from(i),
                attributes: vec![kv("a", &"v".repeat(200 * usize::from(i)))],
                ..Default::default()
            })
            .collect();
        let encoded: Vec<EncodedSpan> = spans
            .iter()
            .map(|s| EncodedSpan(s.encode_to_vec()))
            .collect();
        let resource = vec![kv("service.name", "edge")];
        let got = BatchHeader::new(resource.clone()).frame(&encoded);
        let want = grpc_frame(&ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: resource,
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "weir".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans,
                }],
            }],
        });
        assert_eq!(got, want);
        assert_eq!(encoded[1].decode().expect("decodes").name, "s1");
    }

    /// A collector that records each call's span count; `gate` holds calls until released,
    /// `fail` makes them fail.
    #[derive(Clone)]
    struct Fake {
        calls: Arc<Mutex<Vec<usize>>>,
        running: Arc<AtomicUsize>,
        max_running: Arc<AtomicUsize>,
        gate: Arc<tokio::sync::Semaphore>,
        fail: bool,
    }

    impl Default for Fake {
        fn default() -> Self {
            Self {
                calls: Default::default(),
                running: Default::default(),
                max_running: Default::default(),
                gate: Arc::new(tokio::sync::Semaphore::new(0)),
                fail: false,
            }
        }
    }

    impl ExportSink for Fake {
        async fn send(&self, frame: Bytes) -> Result<(), String> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_running.fetch_max(now, Ordering::SeqCst);
            let req = ExportTraceServiceRequest::decode(&frame[5..]).map_err(|e| e.to_string())?;
            let n = req.resource_spans[0].scope_spans[0].spans.len();
            self.calls.lock().expect("lock").push(n);
            let permit = self.gate.acquire().await.map_err(|e| e.to_string())?;
            permit.forget();
            self.running.fetch_sub(1, Ordering::SeqCst);
            if self.fail {
                Err("collector down".into())
            } else {
                Ok(())
            }
        }
    }

    fn stats() -> (Arc<crate::stats::Store>, ExporterStats) {
        let store = crate::stats::Store::new();
        let st = ExporterStats::new(&store);
        (store, st)
    }

    fn stat(store: &crate::stats::Store, name: &str) -> u64 {
        store
            .render_text()
            .into_iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0)
    }

    fn span(i: u64) -> EncodedSpan {
        EncodedSpan(
            Span {
                span_id: i.to_be_bytes().to_vec(),
                ..Default::default()
            }
            .encode_to_vec(),
        )
    }

    #[test]
    fn when_a_call_starts() {
        assert!(!ready(0, 0, true, false, true), "nothing to send");
        assert!(!ready(4, 0, false, true, true));
        assert!(ready(FLUSH_SPANS, 0, false, true, true));
        assert!(
            !ready(FLUSH_SPANS, 1, false, true, true),
            "one runs: grow the batch"
        );
        assert!(
            !ready(FLUSH_SPANS, 0, false, true, false),
            "too soon after the last call: grow the batch"
        );
        assert!(ready(BUSY_BATCH, 1, false, true, false));
        assert!(ready(BUSY_BATCH, 0, false, true, false));
        assert!(
            !ready(MAX_BATCH, MAX_IN_FLIGHT, true, false, true),
            "every slot busy"
        );
        assert!(ready(1, 2, true, true, false), "the timer sends stragglers");
        assert!(ready(1, 3, false, false, false), "closing sends the rest");
    }

    /// A steady stream against a fast collector: one call per CALL_GAP (not one per
    /// FLUSH_SPANS spans), every span sent, none waiting past the gap.
    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_sends_one_call_per_gap() {
        let fake = Fake::default();
        fake.gate.add_permits(100_000);
        let (store, st) = stats();
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let task = tokio::spawn(run(rx, fake.clone(), BatchHeader::new(vec![]), st));
        // 1000 spans, one per millisecond (1000 spans/s): without the gap, 200 calls of 5.
        for i in 0..1000 {
            tx.try_send(span(i)).expect("queue has room");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Closing sends the few spans of the last gap.
        drop(tx);
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("ends")
            .expect("no panic");
        let calls = fake.calls.lock().expect("lock").clone();
        assert_eq!(calls.iter().sum::<usize>(), 1000, "{calls:?}");
        assert_eq!(stat(&store, "tracing.opentelemetry.spans_sent"), 1000);
        assert_eq!(stat(&store, "tracing.opentelemetry.timer_flushed"), 0);
        let gap_ms = CALL_GAP.as_millis() as usize;
        assert!(
            calls.len() <= 1000 / gap_ms + 3,
            "{} calls: {calls:?}",
            calls.len()
        );
        assert_eq!(calls[0], FLUSH_SPANS, "the first call goes at once");
        assert!(
            calls[1..calls.len() - 1].iter().all(|&n| n >= gap_ms - 2),
            "later calls carry a gap's spans: {calls:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn busy_calls_grow_the_next_batch_and_closing_flushes() {
        let fake = Fake::default();
        let (store, st) = stats();
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let task = tokio::spawn(run(rx, fake.clone(), BatchHeader::new(vec![]), st));
        // A call of 5 spans, then calls of BUSY_BATCH start and hang; the rest waits.
        for i in 0..1020 {
            tx.try_send(span(i)).expect("queue has room");
            tokio::task::yield_now().await;
        }
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert_eq!(fake.calls.lock().expect("lock").len(), MAX_IN_FLIGHT);
        drop(tx);
        fake.gate.add_permits(1_000);
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the task ends once closed and drained")
            .expect("no panic");
        let calls = fake.calls.lock().expect("lock").clone();
        assert_eq!(calls.iter().sum::<usize>(), 1020, "{calls:?}");
        assert!(calls.iter().all(|&n| n <= MAX_BATCH), "{calls:?}");
        assert!(calls.len() <= MAX_IN_FLIGHT + 3, "big batches: {calls:?}");
        assert!(fake.max_running.load(Ordering::SeqCst) <= MAX_IN_FLIGHT);
        assert_eq!(stat(&store, "tracing.opentelemetry.spans_sent"), 1020);
        assert_eq!(stat(&store, "tracing.opentelemetry.spans_dropped"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_exports_count_dropped_spans_and_the_timer_flushes_stragglers() {
        let fake = Fake {
            fail: true,
            ..Default::default()
        };
        fake.gate.add_permits(1_000);
        let (store, st) = stats();
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let task = tokio::spawn(run(rx, fake.clone(), BatchHeader::new(vec![]), st));
        for i in 0..3 {
            tx.try_send(span(i)).expect("room");
        }
        // Fewer than FLUSH_SPANS: only the interval sends them.
        tokio::time::sleep(FLUSH_INTERVAL + Duration::from_millis(10)).await;
        assert_eq!(fake.calls.lock().expect("lock").clone(), vec![3]);
        assert_eq!(stat(&store, "tracing.opentelemetry.timer_flushed"), 1);
        assert_eq!(stat(&store, "tracing.opentelemetry.spans_dropped"), 3);
        assert_eq!(stat(&store, "tracing.opentelemetry.export_failed"), 1);
        drop(tx);
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("ends")
            .expect("no panic");
        assert_eq!(stat(&store, "tracing.opentelemetry.spans_sent"), 0);
    }
}
