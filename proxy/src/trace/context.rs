//! Trace context propagation: W3C `traceparent`/`tracestate` and B3 (multi-header and the
//! single `b3` header), and the HCM sampling decision.
//!
//! The request path calls [`read`]: each propagation header is looked up once, by the
//! pre-parsed names in [`names`], for the parent context, the forms the caller used and a
//! lone sampling decision ([`extract`] and [`lone_decision`] are the same answers apart).

use http::{HeaderMap, HeaderName, HeaderValue};
use weir_filters::config::Fraction;

/// The propagation header names, parsed once: a lookup by `&str` parses (and validates) the
/// name on every call, which showed up in the per-request profile.
pub mod names {
    use http::HeaderName;

    /// W3C `traceparent`.
    pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    /// W3C `tracestate`.
    pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
    /// B3 single header.
    pub const B3: HeaderName = HeaderName::from_static("b3");
    /// B3 multi-header trace id.
    pub const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
    /// B3 multi-header span id.
    pub const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
    /// B3 multi-header parent span id.
    pub const X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
    /// B3 multi-header sampling decision.
    pub const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
    /// B3 multi-header debug flag.
    pub const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
    /// Envoy's forced tracing.
    pub const X_ENVOY_FORCE_TRACE: HeaderName = HeaderName::from_static("x-envoy-force-trace");
    /// Envoy's client-requested tracing.
    pub const X_CLIENT_TRACE_ID: HeaderName = HeaderName::from_static("x-client-trace-id");
    /// Envoy's decorator propagation.
    pub const X_ENVOY_DECORATOR_OPERATION: HeaderName =
        HeaderName::from_static("x-envoy-decorator-operation");
}
use names::*;

/// An incoming (parent) trace context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    /// 128-bit trace id (a 64-bit B3 id is zero-extended).
    pub trace_id: u128,
    /// The caller's span id.
    pub span_id: u64,
    /// The caller's sampling decision, when it made one.
    pub sampled: Option<bool>,
}

/// Which propagation formats the request came with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    /// `traceparent`.
    pub w3c: bool,
    /// `x-b3-*` headers.
    pub b3_multi: bool,
    /// The `b3` header.
    pub b3_single: bool,
}

fn hex_u128(s: &str) -> Option<u128> {
    if s.is_empty() || s.len() > 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(s, 16).ok()
}

fn hex_u64(s: &str) -> Option<u64> {
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// Parse `traceparent` (version 00 layout; higher versions read the same prefix).
pub fn parse_traceparent(v: &str) -> Option<Parent> {
    let mut it = v.trim().split('-');
    let (ver, tid, sid, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
    if ver.len() != 2 || ver == "ff" || tid.len() != 32 || flags.len() != 2 {
        return None;
    }
    if ver == "00" && it.next().is_some() {
        return None;
    }
    let trace_id = hex_u128(tid)?;
    let span_id = hex_u64(sid)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: Some(flags & 1 == 1),
    })
}

fn b3_trace_id(s: &str) -> Option<u128> {
    if s.len() != 16 && s.len() != 32 {
        return None;
    }
    hex_u128(s).filter(|t| *t != 0)
}

fn b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// Parse the single `b3` header: `{trace}-{span}[-{sampled}[-{parent}]]` or a lone decision.
pub fn parse_b3_single(v: &str) -> Option<Parent> {
    let parts: Vec<&str> = v.trim().split('-').collect();
    if parts.len() < 2 {
        return None;
    }
    Some(Parent {
        trace_id: b3_trace_id(parts[0])?,
        span_id: hex_u64(parts[1]).filter(|s| *s != 0)?,
        sampled: match parts.get(2) {
            Some(s) => Some(b3_sampled(s)?),
            None => None,
        },
    })
}

/// The lone sampling decision of a `b3: 0|1|d` header.
fn b3_single_decision(v: &str) -> Option<bool> {
    b3_sampled(v.trim())
}

fn get<'a>(h: &'a HeaderMap, n: &HeaderName) -> Option<&'a str> {
    h.get(n).and_then(|v| v.to_str().ok())
}

/// The parent context of a request: `traceparent` first, then `b3`, then `x-b3-*`.
pub fn extract(h: &HeaderMap) -> (Option<Parent>, Seen) {
    let (parent, seen, _) = read(h);
    (parent, seen)
}

fn text(v: Option<&HeaderValue>) -> Option<&str> {
    v.and_then(|v| v.to_str().ok())
}

/// [`extract`] and [`lone_decision`] together, each propagation header looked up once (the
/// request path calls this).
pub fn read(h: &HeaderMap) -> (Option<Parent>, Seen, Option<bool>) {
    let tp = h.get(TRACEPARENT);
    let b3 = h.get(B3);
    let b3_tid = h.get(X_B3_TRACEID);
    let b3_smp = h.get(X_B3_SAMPLED);
    let seen = Seen {
        w3c: tp.is_some(),
        b3_multi: b3_tid.is_some() || b3_smp.is_some(),
        b3_single: b3.is_some(),
    };
    if tp.is_none() && b3.is_none() && b3_tid.is_none() && b3_smp.is_none() {
        // No trace headers (the common case at an edge); only `x-b3-flags: 1` decides.
        let lone = (get(h, &X_B3_FLAGS) == Some("1")).then_some(true);
        return (None, seen, lone);
    }
    let (tp, b3, b3_tid, b3_smp) = (text(tp), text(b3), text(b3_tid), text(b3_smp));
    let flags_debug = get(h, &X_B3_FLAGS) == Some("1");
    let lone = if flags_debug {
        Some(true)
    } else {
        b3.and_then(b3_single_decision)
            .or_else(|| b3_smp.and_then(b3_sampled))
    };
    if let Some(p) = tp.and_then(parse_traceparent) {
        return (Some(p), seen, lone);
    }
    if let Some(p) = b3.and_then(parse_b3_single) {
        return (Some(p), seen, lone);
    }
    if let (Some(t), Some(sp)) = (b3_tid, get(h, &X_B3_SPANID))
        && let (Some(trace_id), Some(span_id)) = (b3_trace_id(t), hex_u64(sp))
        && span_id != 0
    {
        let sampled = if flags_debug {
            Some(true)
        } else {
            b3_smp.and_then(b3_sampled)
        };
        return (
            Some(Parent {
                trace_id,
                span_id,
                sampled,
            }),
            seen,
            lone,
        );
    }
    (None, seen, lone)
}

/// A sampling decision without a parent context from the caller: `x-b3-sampled` / `b3: 0|1`
/// alone still carry one.
pub fn lone_decision(h: &HeaderMap) -> Option<bool> {
    read(h).2
}

/// The HCM `tracing` sampling settings (Envoy semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sampling {
    /// `client_sampling` (default 100%): requests with `x-client-trace-id`.
    pub client: Fraction,
    /// `random_sampling` (default 100%): other requests.
    pub random: Fraction,
    /// `overall_sampling` (default 100%): a final cap on everything but forced traces.
    pub overall: Fraction,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            client: Fraction::ALL,
            random: Fraction::ALL,
            overall: Fraction::ALL,
        }
    }
}

/// Why a request is (not) traced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// `x-envoy-force-trace` (internal requests only).
    Forced,
    /// `x-client-trace-id` within `client_sampling`.
    Client,
    /// Within `random_sampling`.
    Sampled,
    /// Not traced.
    NotTraced,
}

impl Decision {
    /// Whether spans are recorded.
    pub fn traced(self) -> bool {
        self != Decision::NotTraced
    }
}

impl Sampling {
    /// Envoy's `mutateTracingRequestHeader` decision: forced (trusted `x-envoy-force-trace`),
    /// else client sampling for `x-client-trace-id`, else random sampling; then overall
    /// sampling caps the non-forced ones. `rolls` are uniform random numbers (fixed in tests).
    pub fn decide(&self, force: bool, client_id: bool, rolls: (u64, u64)) -> Decision {
        if force {
            return Decision::Forced;
        }
        let d = if client_id && self.client.hit(rolls.0) {
            Decision::Client
        } else if self.random.hit(rolls.0) {
            Decision::Sampled
        } else {
            Decision::NotTraced
        };
        if d.traced() && !self.overall.hit(rolls.1) {
            return Decision::NotTraced;
        }
        d
    }
}

/// The span this proxy records for a request, and what it tells the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    /// Trace id (the caller's, or new).
    pub trace_id: u128,
    /// This proxy's span id (new); the upstream's parent.
    pub span_id: u64,
    /// The caller's span id, if any.
    pub parent_span_id: Option<u64>,
    /// Whether the trace is sampled.
    pub sampled: bool,
}

impl SpanContext {
    /// Continue `parent` or start a trace. `ids` are random (trace id, span id) seeds;
    /// `decision` applies when the caller made none.
    pub fn new(
        parent: Option<Parent>,
        lone: Option<bool>,
        decision: Decision,
        ids: (u128, u64),
    ) -> Self {
        let span_id = if ids.1 == 0 { 1 } else { ids.1 };
        match parent {
            Some(p) => SpanContext {
                trace_id: p.trace_id,
                span_id,
                parent_span_id: Some(p.span_id),
                sampled: if decision == Decision::Forced {
                    true
                } else {
                    p.sampled.unwrap_or(decision.traced())
                },
            },
            None => SpanContext {
                trace_id: if ids.0 == 0 { 1 } else { ids.0 },
                span_id,
                parent_span_id: None,
                sampled: if decision == Decision::Forced {
                    true
                } else {
                    lone.unwrap_or(decision.traced())
                },
            },
        }
    }

    /// 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// [`Self::trace_id_hex`] written into `buf` (no allocation).
    pub fn trace_id_hex_into<'b>(&self, buf: &'b mut [u8; 32]) -> &'b str {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in buf.iter_mut().enumerate() {
            *b = HEX[((self.trace_id >> (124 - 4 * i)) & 0xf) as usize];
        }
        // Only ASCII hex digits were written.
        std::str::from_utf8(buf).unwrap_or("")
    }

    /// The upstream request's `traceparent`.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{}",
            self.trace_id,
            self.span_id,
            if self.sampled { "01" } else { "00" }
        )
    }

    /// Write the propagation headers for the upstream request: always `traceparent` (and
    /// `tracestate` kept as received); B3 headers rewritten in the forms the caller used.
    pub fn inject(&self, h: &mut HeaderMap, seen: Seen) {
        // `00-{trace:32}-{span:16}-{flags:2}` built on the stack (one copy into the value).
        let mut tp = *b"00-00000000000000000000000000000000-0000000000000000-00";
        let mut hex = [0u8; 32];
        tp[3..35].copy_from_slice(self.trace_id_hex_into(&mut hex).as_bytes());
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for i in 0..16 {
            tp[36 + i] = HEX[((self.span_id >> (60 - 4 * i)) & 0xf) as usize];
        }
        if self.sampled {
            tp[54] = b'1';
        }
        if let Ok(v) = HeaderValue::from_bytes(&tp) {
            h.insert(TRACEPARENT, v);
        }
        let sampled = if self.sampled { "1" } else { "0" };
        if seen.b3_multi {
            let tid = format!("{:032x}", self.trace_id);
            let tid = if self.trace_id >> 64 == 0 {
                tid[16..].to_string()
            } else {
                tid
            };
            if let Ok(v) = HeaderValue::from_str(&tid) {
                h.insert(X_B3_TRACEID, v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("{:016x}", self.span_id)) {
                h.insert(X_B3_SPANID, v);
            }
            match self.parent_span_id {
                Some(p) => {
                    if let Ok(v) = HeaderValue::from_str(&format!("{p:016x}")) {
                        h.insert(X_B3_PARENTSPANID, v);
                    }
                }
                None => {
                    h.remove(X_B3_PARENTSPANID);
                }
            }
            h.insert(X_B3_SAMPLED, HeaderValue::from_static(sampled));
        }
        if seen.b3_single {
            let tid = format!("{:032x}", self.trace_id);
            let tid = if self.trace_id >> 64 == 0 {
                &tid[16..]
            } else {
                &tid[..]
            };
            let mut v = format!("{tid}-{:016x}-{sampled}", self.span_id);
            if let Some(p) = self.parent_span_id {
                v.push_str(&format!("-{p:016x}"));
            }
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(B3, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_parses_and_rejects() {
        let p = parse_traceparent(TP).expect("valid");
        assert_eq!(p.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p.span_id, 0x00f067aa0ba902b7);
        assert_eq!(p.sampled, Some(true));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        let p = parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
            .expect("future version");
        assert_eq!(p.sampled, Some(false));
    }

    #[test]
    fn b3_forms() {
        let p =
            parse_b3_single("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90")
                .expect("valid");
        assert_eq!(p.trace_id, 0x80f198ee56343ba864fe8b2a57d3eff7);
        assert_eq!(p.span_id, 0xe457b5a2e4d86bd1);
        assert_eq!(p.sampled, Some(true));
        let p = parse_b3_single("64fe8b2a57d3eff7-e457b5a2e4d86bd1").expect("64-bit");
        assert_eq!(p.trace_id, 0x64fe8b2a57d3eff7);
        assert_eq!(p.sampled, None);
        assert_eq!(parse_b3_single("0"), None);
        let mut h = HeaderMap::new();
        h.insert("b3", "0".parse().expect("v"));
        assert_eq!(lone_decision(&h), Some(false));

        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", "64fe8b2a57d3eff7".parse().expect("v"));
        h.insert("x-b3-spanid", "e457b5a2e4d86bd1".parse().expect("v"));
        h.insert("x-b3-sampled", "0".parse().expect("v"));
        let (p, seen) = extract(&h);
        let p = p.expect("multi");
        assert!(seen.b3_multi && !seen.w3c);
        assert_eq!(p.sampled, Some(false));
        h.insert("x-b3-flags", "1".parse().expect("v"));
        assert_eq!(extract(&h).0.expect("debug").sampled, Some(true));
    }

    /// `read` (the request path's single pass) agrees with `extract` and `lone_decision`,
    /// including the no-trace-headers fast path and its `x-b3-flags` exception.
    #[test]
    fn read_is_extract_and_lone_decision_in_one_pass() {
        /// Request headers, then the expected trace id, forms seen and lone decision.
        type Case = (
            Vec<(&'static str, &'static str)>,
            Option<u128>,
            Seen,
            Option<bool>,
        );
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cases: Vec<Case> = vec![
            (vec![("user-agent", "wrk")], None, Seen::default(), None),
            (vec![("x-b3-flags", "1")], None, Seen::default(), Some(true)),
            (
                vec![("x-b3-sampled", "1")],
                None,
                Seen {
                    b3_multi: true,
                    ..Default::default()
                },
                Some(true),
            ),
            (
                vec![("traceparent", tp), ("b3", "0")],
                Some(0x4bf92f3577b34da6a3ce929d0e0e4736),
                Seen {
                    w3c: true,
                    b3_single: true,
                    ..Default::default()
                },
                Some(false),
            ),
            (
                // A malformed traceparent falls back to `b3`; both forms were seen.
                vec![
                    ("traceparent", "garbage"),
                    ("b3", "64fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
                ],
                Some(0x64fe8b2a57d3eff7),
                Seen {
                    w3c: true,
                    b3_single: true,
                    ..Default::default()
                },
                // A full `b3` carries its decision in the parent, not as a lone one.
                None,
            ),
        ];
        for (headers, trace_id, seen, lone) in cases {
            let mut h = HeaderMap::new();
            for (k, v) in &headers {
                h.insert(*k, v.parse().expect("v"));
            }
            let (p, s, l) = read(&h);
            assert_eq!(p.map(|p| p.trace_id), trace_id, "{headers:?}");
            assert_eq!(s, seen, "{headers:?}");
            assert_eq!(l, lone, "{headers:?}");
            assert_eq!((p, s), extract(&h), "{headers:?}");
            assert_eq!(l, lone_decision(&h), "{headers:?}");
        }
    }

    #[test]
    fn continue_and_inject() {
        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", "64fe8b2a57d3eff7".parse().expect("v"));
        h.insert("x-b3-spanid", "e457b5a2e4d86bd1".parse().expect("v"));
        h.insert("x-b3-sampled", "1".parse().expect("v"));
        let (p, seen) = extract(&h);
        let sc = SpanContext::new(p, None, Decision::NotTraced, (7, 0xabc));
        assert_eq!(sc.trace_id, 0x64fe8b2a57d3eff7);
        assert_eq!(sc.parent_span_id, Some(0xe457b5a2e4d86bd1));
        assert!(sc.sampled, "the caller's decision wins");
        sc.inject(&mut h, seen);
        assert_eq!(
            h["traceparent"],
            "00-000000000000000064fe8b2a57d3eff7-0000000000000abc-01"
        );
        assert_eq!(h["traceparent"], sc.traceparent().as_str());
        assert_eq!(h["x-b3-traceid"], "64fe8b2a57d3eff7");
        assert_eq!(h["x-b3-spanid"], "0000000000000abc");
        assert_eq!(h["x-b3-parentspanid"], "e457b5a2e4d86bd1");
        assert_eq!(h["x-b3-sampled"], "1");
        assert!(h.get("b3").is_none());

        // A new trace.
        let sc = SpanContext::new(None, None, Decision::Sampled, (0x1234, 0x99));
        assert_eq!(sc.parent_span_id, None);
        let mut h = HeaderMap::new();
        sc.inject(
            &mut h,
            Seen {
                b3_single: true,
                ..Default::default()
            },
        );
        assert_eq!(
            h["b3"], "0000000000001234-0000000000000099-1",
            "64-bit ids stay 64-bit"
        );
        assert_eq!(sc.trace_id_hex(), "00000000000000000000000000001234");
        let mut buf = [0u8; 32];
        assert_eq!(sc.trace_id_hex_into(&mut buf), sc.trace_id_hex());
        let big = SpanContext {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            ..sc
        };
        assert_eq!(
            big.trace_id_hex_into(&mut buf),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn sampling_math() {
        let half = Fraction {
            numerator: 50,
            denominator: 100,
        };
        let s = Sampling {
            client: Fraction::ALL,
            random: half,
            overall: Fraction::ALL,
        };
        assert_eq!(s.decide(false, false, (49, 0)), Decision::Sampled);
        assert_eq!(s.decide(false, false, (50, 0)), Decision::NotTraced);
        assert_eq!(s.decide(false, false, (149, 0)), Decision::Sampled);
        assert_eq!(s.decide(false, true, (99, 0)), Decision::Client);
        assert_eq!(s.decide(true, false, (99, 99)), Decision::Forced);
        let s = Sampling {
            overall: Fraction {
                numerator: 10,
                denominator: 100,
            },
            ..Sampling::default()
        };
        assert_eq!(s.decide(false, false, (0, 9)), Decision::Sampled);
        assert_eq!(s.decide(false, false, (0, 10)), Decision::NotTraced);
        assert_eq!(s.decide(false, true, (0, 50)), Decision::NotTraced);
        assert_eq!(s.decide(true, false, (0, 50)), Decision::Forced);
        let none = Sampling {
            client: Fraction::NONE,
            random: Fraction::NONE,
            overall: Fraction::ALL,
        };
        assert_eq!(none.decide(false, true, (0, 0)), Decision::NotTraced);
        // No parent: a lone `b3: 1` / `x-b3-sampled: 1` still samples.
        let sc = SpanContext::new(None, Some(true), Decision::NotTraced, (1, 1));
        assert!(sc.sampled);
    }
}
