//! Trace context propagation: W3C `traceparent`/`tracestate` and B3 (multi-header and the
//! single `b3` header), and the HCM sampling decision.

use http::{HeaderMap, HeaderValue};
use weir_filters::config::Fraction;

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

fn get<'a>(h: &'a HeaderMap, n: &str) -> Option<&'a str> {
    h.get(n).and_then(|v| v.to_str().ok())
}

/// The parent context of a request: `traceparent` first, then `b3`, then `x-b3-*`.
pub fn extract(h: &HeaderMap) -> (Option<Parent>, Seen) {
    let seen = Seen {
        w3c: h.contains_key("traceparent"),
        b3_multi: h.contains_key("x-b3-traceid") || h.contains_key("x-b3-sampled"),
        b3_single: h.contains_key("b3"),
    };
    if let Some(p) = get(h, "traceparent").and_then(parse_traceparent) {
        return (Some(p), seen);
    }
    if let Some(p) = get(h, "b3").and_then(parse_b3_single) {
        return (Some(p), seen);
    }
    let flags_debug = get(h, "x-b3-flags") == Some("1");
    if let (Some(t), Some(s)) = (get(h, "x-b3-traceid"), get(h, "x-b3-spanid"))
        && let (Some(trace_id), Some(span_id)) = (b3_trace_id(t), hex_u64(s))
        && span_id != 0
    {
        let sampled = if flags_debug {
            Some(true)
        } else {
            get(h, "x-b3-sampled").and_then(b3_sampled)
        };
        return (
            Some(Parent {
                trace_id,
                span_id,
                sampled,
            }),
            seen,
        );
    }
    (None, seen)
}

/// A sampling decision without a parent context from the caller: `x-b3-sampled` / `b3: 0|1`
/// alone still carry one.
pub fn lone_decision(h: &HeaderMap) -> Option<bool> {
    if get(h, "x-b3-flags") == Some("1") {
        return Some(true);
    }
    get(h, "b3")
        .and_then(b3_single_decision)
        .or_else(|| get(h, "x-b3-sampled").and_then(b3_sampled))
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
            h.insert("traceparent", v);
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
                h.insert("x-b3-traceid", v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!("{:016x}", self.span_id)) {
                h.insert("x-b3-spanid", v);
            }
            match self.parent_span_id {
                Some(p) => {
                    if let Ok(v) = HeaderValue::from_str(&format!("{p:016x}")) {
                        h.insert("x-b3-parentspanid", v);
                    }
                }
                None => {
                    h.remove("x-b3-parentspanid");
                }
            }
            h.insert("x-b3-sampled", HeaderValue::from_static(sampled));
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
                h.insert("b3", v);
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
