//! Envoy format strings (`%COMMAND(arg):N%`) and JSON formats, parsed once at config time
//! into a [`Format`] / [`JsonFormat`] and rendered per request from a [`LogRecord`].

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use weir_filters::DownstreamTls;

use super::flags::ResponseFlags;
use crate::text::{AddrBuf, decimal};

/// Envoy's default access log format.
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// Everything an access log line can show about one request or TCP connection.
#[derive(Debug, Clone)]
pub struct LogRecord<'a> {
    /// When the request (connection) started.
    pub start_time: SystemTime,
    /// Request headers (as the router saw them); `None` for TCP.
    pub request_headers: Option<HeaderView<'a>>,
    /// `:method`.
    pub method: Option<&'a http::Method>,
    /// `:path` (with query, as received).
    pub path: Option<&'a str>,
    /// `:authority`.
    pub authority: Option<&'a str>,
    /// `:scheme`.
    pub scheme: Option<&'a str>,
    /// Response headers.
    pub response_headers: Option<HeaderView<'a>>,
    /// Response trailers.
    pub response_trailers: Option<&'a HeaderMap>,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: Option<&'a str>,
    /// Response status (0 = none, as for TCP).
    pub response_code: u16,
    /// `%RESPONSE_CODE_DETAILS%`.
    pub response_code_details: Option<&'a str>,
    /// Response flags.
    pub flags: ResponseFlags,
    /// Body bytes received from downstream.
    pub bytes_received: u64,
    /// Body bytes sent downstream.
    pub bytes_sent: u64,
    /// Total duration.
    pub duration: Option<Duration>,
    /// Time to the first response byte (response headers).
    pub response_duration: Option<Duration>,
    /// Upstream host address.
    pub upstream_host: Option<SocketAddr>,
    /// Upstream cluster name.
    pub upstream_cluster: Option<&'a str>,
    /// Local address of the upstream connection.
    pub upstream_local: Option<SocketAddr>,
    /// Why the upstream transport failed.
    pub upstream_failure_reason: Option<&'a str>,
    /// Downstream remote address (after XFF trust).
    pub downstream_remote: Option<SocketAddr>,
    /// Downstream local address.
    pub downstream_local: Option<SocketAddr>,
    /// Downstream TLS facts.
    pub tls: Option<&'a DownstreamTls>,
    /// Trace id (32 hex) when the request is traced.
    pub trace_id: Option<&'a str>,
    /// Route name.
    pub route_name: Option<&'a str>,
    /// Whether the health check filter answered or marked this request.
    pub is_health_check: bool,
}

impl Default for LogRecord<'_> {
    fn default() -> Self {
        Self {
            start_time: UNIX_EPOCH,
            request_headers: None,
            method: None,
            path: None,
            authority: None,
            scheme: None,
            response_headers: None,
            response_trailers: None,
            protocol: None,
            response_code: 0,
            response_code_details: None,
            flags: ResponseFlags::default(),
            bytes_received: 0,
            bytes_sent: 0,
            duration: None,
            response_duration: None,
            upstream_host: None,
            upstream_cluster: None,
            upstream_local: None,
            upstream_failure_reason: None,
            downstream_remote: None,
            downstream_local: None,
            tls: None,
            trace_id: None,
            route_name: None,
            is_health_check: false,
        }
    }
}

/// A format string error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// `%` starts no valid command.
    #[error("invalid command at position {0}: expected %COMMAND[(arg)][:N]%")]
    Syntax(usize),
    /// An unknown command.
    #[error("unsupported command operator %{0}%")]
    Unknown(String),
    /// A command that needs an argument has none (or a bad one).
    #[error("command %{0}% has an invalid argument: {1}")]
    Argument(String, String),
}

/// A header operand of `%REQ%` / `%RESP%` / `%TRAILER%`: `X?Y`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderOp {
    main: HeaderKey,
    alt: Option<HeaderKey>,
}

/// One header name of a [`HeaderOp`]: the lower-cased text and, unless it is a
/// pseudo-header (or not a valid name), the parsed `HeaderName`, so rendering looks it up
/// without parsing or allocating per request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HeaderKey {
    text: String,
    name: Option<http::HeaderName>,
}

impl HeaderKey {
    fn new(text: String) -> Self {
        let name = if text.starts_with(':') {
            None
        } else {
            http::HeaderName::from_bytes(text.as_bytes()).ok()
        };
        Self { text, name }
    }
}

/// A command operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `%START_TIME(fmt)%`.
    StartTime(Option<String>),
    /// `%REQ(X?Y)%`.
    Req(HeaderOp),
    /// `%RESP(X?Y)%`.
    Resp(HeaderOp),
    /// `%TRAILER(X?Y)%`.
    Trailer(HeaderOp),
    /// `%PROTOCOL%`.
    Protocol,
    /// `%RESPONSE_CODE%`.
    ResponseCode,
    /// `%RESPONSE_CODE_DETAILS%`.
    ResponseCodeDetails,
    /// `%RESPONSE_FLAGS%`.
    ResponseFlags,
    /// `%BYTES_RECEIVED%`.
    BytesReceived,
    /// `%BYTES_SENT%`.
    BytesSent,
    /// `%DURATION%` (ms).
    Duration,
    /// `%RESPONSE_DURATION%` (ms).
    ResponseDuration,
    /// `%UPSTREAM_HOST%`.
    UpstreamHost,
    /// `%UPSTREAM_CLUSTER%`.
    UpstreamCluster,
    /// `%UPSTREAM_LOCAL_ADDRESS%`.
    UpstreamLocalAddress,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`.
    UpstreamTransportFailureReason,
    /// `%DOWNSTREAM_REMOTE_ADDRESS%`.
    DownstreamRemoteAddress,
    /// `%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%`.
    DownstreamRemoteAddressWithoutPort,
    /// `%DOWNSTREAM_LOCAL_ADDRESS%`.
    DownstreamLocalAddress,
    /// `%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%`.
    DownstreamLocalAddressWithoutPort,
    /// `%REQUESTED_SERVER_NAME%`.
    RequestedServerName,
    /// `%DOWNSTREAM_PEER_URI_SAN%`.
    DownstreamPeerUriSan,
    /// `%DOWNSTREAM_PEER_SUBJECT%`.
    DownstreamPeerSubject,
    /// `%DOWNSTREAM_LOCAL_URI_SAN%`.
    DownstreamLocalUriSan,
    /// `%DOWNSTREAM_TLS_VERSION%`.
    DownstreamTlsVersion,
    /// `%DOWNSTREAM_TLS_CIPHER%`.
    DownstreamTlsCipher,
    /// `%TRACE_ID%`.
    TraceId,
    /// `%ROUTE_NAME%`.
    RouteName,
    /// `%HOSTNAME%`.
    Hostname,
}

/// One piece of a format.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Cmd { op: Op, max: Option<usize> },
}

/// A parsed text format string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Format {
    parts: Vec<Part>,
    omit_empty: bool,
}

/// A rendered operator value.
#[derive(Debug, Clone, PartialEq)]
pub enum Val<'a> {
    /// No value (`-` in text, `null` in JSON).
    Missing,
    /// Text.
    Str(Cow<'a, str>),
    /// A number.
    Int(u64),
}

fn hostname() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "-".to_string())
    })
}

fn parse_header_op(cmd: &str, arg: Option<&str>) -> Result<HeaderOp, FormatError> {
    let arg = arg.filter(|a| !a.is_empty()).ok_or_else(|| {
        FormatError::Argument(cmd.to_string(), "a header name is required".into())
    })?;
    let (main, alt) = match arg.split_once('?') {
        Some((a, b)) => (a, Some(b)),
        None => (arg, None),
    };
    let check = |n: &str| -> Result<String, FormatError> {
        let n = n.trim().to_ascii_lowercase();
        if n.is_empty() || n.contains('?') {
            return Err(FormatError::Argument(
                cmd.to_string(),
                "invalid header name".into(),
            ));
        }
        Ok(n)
    };
    Ok(HeaderOp {
        main: HeaderKey::new(check(main)?),
        alt: alt.map(check).transpose()?.map(HeaderKey::new),
    })
}

fn parse_op(cmd: &str, arg: Option<&str>) -> Result<Op, FormatError> {
    let no_arg = |op: Op| -> Result<Op, FormatError> {
        match arg {
            Some(_) => Err(FormatError::Argument(
                cmd.to_string(),
                "takes no argument".into(),
            )),
            None => Ok(op),
        }
    };
    match cmd {
        "START_TIME" => Ok(Op::StartTime(
            arg.filter(|a| !a.is_empty()).map(str::to_string),
        )),
        "REQ" => parse_header_op(cmd, arg).map(Op::Req),
        "RESP" => parse_header_op(cmd, arg).map(Op::Resp),
        "TRAILER" => parse_header_op(cmd, arg).map(Op::Trailer),
        "PROTOCOL" => no_arg(Op::Protocol),
        "RESPONSE_CODE" => no_arg(Op::ResponseCode),
        "RESPONSE_CODE_DETAILS" => no_arg(Op::ResponseCodeDetails),
        "RESPONSE_FLAGS" => no_arg(Op::ResponseFlags),
        "BYTES_RECEIVED" => no_arg(Op::BytesReceived),
        "BYTES_SENT" => no_arg(Op::BytesSent),
        "DURATION" => no_arg(Op::Duration),
        "RESPONSE_DURATION" => no_arg(Op::ResponseDuration),
        "UPSTREAM_HOST" => no_arg(Op::UpstreamHost),
        "UPSTREAM_CLUSTER" => no_arg(Op::UpstreamCluster),
        "UPSTREAM_LOCAL_ADDRESS" => no_arg(Op::UpstreamLocalAddress),
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => no_arg(Op::UpstreamTransportFailureReason),
        "DOWNSTREAM_REMOTE_ADDRESS" => no_arg(Op::DownstreamRemoteAddress),
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => no_arg(Op::DownstreamRemoteAddressWithoutPort),
        "DOWNSTREAM_LOCAL_ADDRESS" => no_arg(Op::DownstreamLocalAddress),
        "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT" => no_arg(Op::DownstreamLocalAddressWithoutPort),
        "REQUESTED_SERVER_NAME" => no_arg(Op::RequestedServerName),
        "DOWNSTREAM_PEER_URI_SAN" => no_arg(Op::DownstreamPeerUriSan),
        "DOWNSTREAM_PEER_SUBJECT" => no_arg(Op::DownstreamPeerSubject),
        "DOWNSTREAM_LOCAL_URI_SAN" => no_arg(Op::DownstreamLocalUriSan),
        "DOWNSTREAM_TLS_VERSION" => no_arg(Op::DownstreamTlsVersion),
        "DOWNSTREAM_TLS_CIPHER" => no_arg(Op::DownstreamTlsCipher),
        "TRACE_ID" => no_arg(Op::TraceId),
        "ROUTE_NAME" => no_arg(Op::RouteName),
        "HOSTNAME" => no_arg(Op::Hostname),
        other => Err(FormatError::Unknown(other.to_string())),
    }
}

impl Format {
    /// Parse a format string.
    pub fn parse(s: &str) -> Result<Format, FormatError> {
        let b = s.as_bytes();
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut i = 0;
        while i < b.len() {
            let Some(off) = s[i..].find('%') else {
                lit.push_str(&s[i..]);
                break;
            };
            lit.push_str(&s[i..i + off]);
            let start = i + off;
            // NAME
            let mut j = start + 1;
            while j < b.len()
                && (b[j].is_ascii_uppercase() || b[j] == b'_' || b[j].is_ascii_digit())
            {
                j += 1;
            }
            if j == start + 1 {
                return Err(FormatError::Syntax(start));
            }
            let name = &s[start + 1..j];
            let mut arg = None;
            if j < b.len() && b[j] == b'(' {
                let close = s[j..].find(')').ok_or(FormatError::Syntax(start))?;
                arg = Some(&s[j + 1..j + close]);
                j += close + 1;
            }
            let mut max = None;
            if j < b.len() && b[j] == b':' {
                let k0 = j + 1;
                let mut k = k0;
                while k < b.len() && b[k].is_ascii_digit() {
                    k += 1;
                }
                if k == k0 {
                    return Err(FormatError::Syntax(start));
                }
                max = Some(s[k0..k].parse().map_err(|_| FormatError::Syntax(start))?);
                j = k;
            }
            if j >= b.len() || b[j] != b'%' {
                return Err(FormatError::Syntax(start));
            }
            let op = parse_op(name, arg)?;
            if !lit.is_empty() {
                parts.push(Part::Lit(std::mem::take(&mut lit)));
            }
            parts.push(Part::Cmd { op, max });
            i = j + 1;
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Format {
            parts,
            omit_empty: false,
        })
    }

    /// A format without commands.
    pub fn literal(s: &str) -> Format {
        Format {
            parts: vec![Part::Lit(s.to_string())],
            omit_empty: false,
        }
    }

    /// `omit_empty_values`: missing values render empty instead of `-`.
    pub fn omit_empty(mut self, on: bool) -> Self {
        self.omit_empty = on;
        self
    }

    /// The operator when the format is exactly one command (typed JSON values).
    fn single(&self) -> Option<(&Op, Option<usize>)> {
        match self.parts.as_slice() {
            [Part::Cmd { op, max }] => Some((op, *max)),
            _ => None,
        }
    }

    /// Whether any command reads request headers (the connection manager keeps a copy only
    /// then).
    pub fn uses_request_headers(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Cmd { op: Op::Req(_), .. }))
    }

    /// The header names `%REQ%` (`req`), `%RESP%` and `%TRAILER%` (`resp`) read, both
    /// alternatives of `X?Y` (pseudo-headers included; callers skip those).
    pub fn header_names(&self, req: &mut Vec<String>, resp: &mut Vec<String>) {
        for p in &self.parts {
            let (h, to) = match p {
                Part::Cmd { op: Op::Req(h), .. } => (h, &mut *req),
                Part::Cmd {
                    op: Op::Resp(h) | Op::Trailer(h),
                    ..
                } => (h, &mut *resp),
                _ => continue,
            };
            for n in std::iter::once(&h.main).chain(h.alt.as_ref()) {
                if !to.contains(&n.text) {
                    to.push(n.text.clone());
                }
            }
        }
    }

    /// Append the rendering of `rec`.
    pub fn render_into(&self, rec: &LogRecord<'_>, out: &mut String) {
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Cmd { op, max: None } if render_direct(op, rec, out) => {}
                Part::Cmd { op, max } => match value(op, rec) {
                    Val::Missing => {
                        if !self.omit_empty {
                            out.push('-')
                        }
                    }
                    Val::Str(s) => push_truncated(out, &s, *max),
                    Val::Int(n) => out.push_str(decimal(n, &mut [0; 20])),
                },
            }
        }
    }

    /// The rendering of `rec`.
    pub fn render(&self, rec: &LogRecord<'_>) -> String {
        let mut s = String::with_capacity(256);
        self.render_into(rec, &mut s);
        s
    }
}

/// Operators whose untruncated value is written straight into `out` (no temporary
/// `String`); false for the others.
fn render_direct(op: &Op, rec: &LogRecord<'_>, out: &mut String) -> bool {
    let (addr, port) = match op {
        Op::StartTime(None) => {
            write_default_time(rec.start_time, out);
            return true;
        }
        Op::UpstreamHost => (rec.upstream_host, true),
        Op::UpstreamLocalAddress => (rec.upstream_local, true),
        Op::DownstreamRemoteAddress => (rec.downstream_remote, true),
        Op::DownstreamRemoteAddressWithoutPort => (rec.downstream_remote, false),
        Op::DownstreamLocalAddress => (rec.downstream_local, true),
        Op::DownstreamLocalAddressWithoutPort => (rec.downstream_local, false),
        _ => return false,
    };
    let mut buf = AddrBuf::default();
    match addr {
        Some(a) if port => {
            out.push_str(buf.socket(a));
            true
        }
        Some(a) => {
            out.push_str(buf.ip(a.ip()));
            true
        }
        // Missing: the generic path renders `-` or nothing.
        None => false,
    }
}

/// `%Y-%m-%dT%H:%M:%S.%3fZ` (the default `%START_TIME%`), as [`strftime`] renders it.
fn write_default_time(t: SystemTime, out: &mut String) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, mo, d) = civil(days);
    let two = |n: i64, out: &mut String| {
        out.push((b'0' + (n / 10 % 10) as u8) as char);
        out.push((b'0' + (n % 10) as u8) as char);
    };
    if (0..10_000).contains(&y) {
        two(y / 100, out);
        two(y % 100, out);
    } else {
        let _ = write!(out, "{y:04}");
    }
    out.push('-');
    two(i64::from(mo), out);
    out.push('-');
    two(i64::from(d), out);
    out.push('T');
    two(sod / 3600, out);
    out.push(':');
    two((sod / 60) % 60, out);
    out.push(':');
    two(sod % 60, out);
    out.push('.');
    let ms = since.subsec_millis();
    out.push((b'0' + (ms / 100) as u8) as char);
    out.push((b'0' + (ms / 10 % 10) as u8) as char);
    out.push((b'0' + (ms % 10) as u8) as char);
    out.push('Z');
}

fn push_truncated(out: &mut String, s: &str, max: Option<usize>) {
    match max {
        Some(m) if s.len() > m => {
            let mut end = m;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            out.push_str(&s[..end]);
        }
        _ => out.push_str(s),
    }
}

fn header<'a>(h: Option<HeaderView<'a>>, op: &HeaderOp) -> Val<'a> {
    let Some(h) = h else { return Val::Missing };
    match header_value(h, &op.main).or_else(|| op.alt.as_ref().and_then(|a| header_value(h, a))) {
        Some(v) => Val::Str(v),
        None => Val::Missing,
    }
}

/// Headers an access log line reads: a whole map, or the few that the request end kept
/// ([`super::KeptHeaders`]).
#[derive(Debug, Clone, Copy)]
pub enum HeaderView<'a> {
    /// A whole map.
    Map(&'a HeaderMap),
    /// Name and value pairs, in the order they were kept (repeated names in order).
    List(&'a [(http::HeaderName, http::HeaderValue)]),
}

impl<'a> From<&'a HeaderMap> for HeaderView<'a> {
    fn from(m: &'a HeaderMap) -> Self {
        HeaderView::Map(m)
    }
}

impl<'a> HeaderView<'a> {
    /// The whole map, when this is one (header filters match on it).
    pub fn map(self) -> Option<&'a HeaderMap> {
        match self {
            HeaderView::Map(m) => Some(m),
            HeaderView::List(_) => None,
        }
    }
}

/// The values of `k` in `h`, joined with `,` when repeated (`None` when absent, and for
/// pseudo-headers, which are not in the map).
fn header_value<'a>(h: HeaderView<'a>, k: &HeaderKey) -> Option<Cow<'a, str>> {
    let name = k.name.as_ref()?;
    match h {
        HeaderView::Map(m) => joined(m.get_all(name).iter()),
        // A handful of kept headers: a scan beats hashing the name.
        HeaderView::List(l) => joined(l.iter().filter(|(n, _)| n == name).map(|(_, v)| v)),
    }
}

fn joined<'a>(mut it: impl Iterator<Item = &'a http::HeaderValue>) -> Option<Cow<'a, str>> {
    let first = it.next()?;
    let first = String::from_utf8_lossy(first.as_bytes());
    match it.next() {
        None => Some(first),
        Some(second) => {
            let mut s = first.into_owned();
            s.push(',');
            s.push_str(&String::from_utf8_lossy(second.as_bytes()));
            for v in it {
                s.push(',');
                s.push_str(&String::from_utf8_lossy(v.as_bytes()));
            }
            Some(Cow::Owned(s))
        }
    }
}

fn req_header<'a>(rec: &LogRecord<'a>, op: &HeaderOp) -> Val<'a> {
    let pseudo = |n: &str| -> Option<Option<&'a str>> {
        Some(match n {
            ":method" => rec.method.map(|m| m.as_str()),
            ":path" => rec.path,
            ":authority" | "host" if rec.authority.is_some() => rec.authority,
            ":scheme" => rec.scheme,
            _ => return None,
        })
    };
    let one = |k: &HeaderKey| -> Val<'a> {
        match pseudo(&k.text) {
            Some(Some(v)) => Val::Str(Cow::Borrowed(v)),
            Some(None) => Val::Missing,
            None => match rec.request_headers.and_then(|h| header_value(h, k)) {
                Some(v) => Val::Str(v),
                None => Val::Missing,
            },
        }
    };
    match one(&op.main) {
        Val::Missing => match &op.alt {
            Some(a) => one(a),
            None => Val::Missing,
        },
        v => v,
    }
}

fn addr(a: Option<SocketAddr>, port: bool) -> Val<'static> {
    match a {
        Some(a) if port => Val::Str(Cow::Owned(a.to_string())),
        Some(a) => Val::Str(Cow::Owned(a.ip().to_string())),
        None => Val::Missing,
    }
}

fn opt_str<'a>(s: Option<&'a str>) -> Val<'a> {
    match s {
        Some(s) if !s.is_empty() => Val::Str(Cow::Borrowed(s)),
        _ => Val::Missing,
    }
}

/// The value of one operator.
pub fn value<'a>(op: &Op, rec: &LogRecord<'a>) -> Val<'a> {
    let ms = |d: Option<Duration>| d.map_or(Val::Missing, |d| Val::Int(d.as_millis() as u64));
    match op {
        Op::StartTime(fmt) => Val::Str(Cow::Owned(match fmt {
            Some(f) => strftime(rec.start_time, f),
            None => strftime(rec.start_time, "%Y-%m-%dT%H:%M:%S.%3fZ"),
        })),
        Op::Req(h) => req_header(rec, h),
        Op::Resp(h) => header(rec.response_headers, h),
        Op::Trailer(h) => header(rec.response_trailers.map(HeaderView::Map), h),
        Op::Protocol => opt_str(rec.protocol),
        // Envoy prints 0 when there was no response (TCP, or a reset before headers).
        Op::ResponseCode => Val::Int(u64::from(rec.response_code)),
        Op::ResponseCodeDetails => opt_str(rec.response_code_details),
        Op::ResponseFlags => Val::Str(rec.flags.rendered()),
        Op::BytesReceived => Val::Int(rec.bytes_received),
        Op::BytesSent => Val::Int(rec.bytes_sent),
        Op::Duration => ms(rec.duration),
        Op::ResponseDuration => ms(rec.response_duration),
        Op::UpstreamHost => addr(rec.upstream_host, true),
        Op::UpstreamCluster => opt_str(rec.upstream_cluster),
        Op::UpstreamLocalAddress => addr(rec.upstream_local, true),
        Op::UpstreamTransportFailureReason => opt_str(rec.upstream_failure_reason),
        Op::DownstreamRemoteAddress => addr(rec.downstream_remote, true),
        Op::DownstreamRemoteAddressWithoutPort => addr(rec.downstream_remote, false),
        Op::DownstreamLocalAddress => addr(rec.downstream_local, true),
        Op::DownstreamLocalAddressWithoutPort => addr(rec.downstream_local, false),
        Op::RequestedServerName => opt_str(rec.tls.and_then(|t| t.sni.as_deref())),
        Op::DownstreamPeerUriSan => match rec.tls.and_then(|t| t.peer.as_ref()) {
            Some(p) if !p.uri_sans.is_empty() => Val::Str(Cow::Owned(p.uri_sans.join(","))),
            _ => Val::Missing,
        },
        Op::DownstreamPeerSubject => opt_str(
            rec.tls
                .and_then(|t| t.peer.as_ref())
                .map(|p| p.subject.as_str()),
        ),
        Op::DownstreamLocalUriSan => match rec.tls {
            Some(t) if !t.local_uri_sans.is_empty() => {
                Val::Str(Cow::Owned(t.local_uri_sans.join(",")))
            }
            _ => Val::Missing,
        },
        Op::DownstreamTlsVersion => opt_str(rec.tls.and_then(|t| t.version)),
        Op::DownstreamTlsCipher => opt_str(rec.tls.and_then(|t| t.cipher.as_deref())),
        Op::TraceId => opt_str(rec.trace_id),
        Op::RouteName => opt_str(rec.route_name),
        Op::Hostname => Val::Str(Cow::Borrowed(hostname())),
    }
}

/// A JSON format value.
#[derive(Debug, Clone, PartialEq)]
enum JsonNode {
    Fmt(Format),
    Const(serde_json::Value),
    Obj(Vec<(String, JsonNode)>),
}

/// A parsed `json_format` / `typed_json_format`: keys sorted, one JSON object per line.
/// A value that is exactly one command keeps its type (numbers stay numbers, a missing
/// value is `null`); other strings render as text.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonFormat {
    root: Vec<(String, JsonNode)>,
    omit_empty: bool,
}

fn json_node(v: &serde_json::Value, path: &str) -> Result<JsonNode, (String, FormatError)> {
    match v {
        serde_json::Value::String(s) => Format::parse(s)
            .map(JsonNode::Fmt)
            .map_err(|e| (path.to_string(), e)),
        serde_json::Value::Object(m) => {
            let mut out = Vec::new();
            for (k, v) in m {
                out.push((k.clone(), json_node(v, &format!("{path}.{k}"))?));
            }
            out.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(JsonNode::Obj(out))
        }
        other => Ok(JsonNode::Const(other.clone())),
    }
}

impl JsonFormat {
    /// Parse from the JSON form of a `google.protobuf.Struct`; errors carry the key path.
    pub fn parse(v: &serde_json::Value) -> Result<JsonFormat, (String, FormatError)> {
        match json_node(v, "")? {
            JsonNode::Obj(root) => Ok(JsonFormat {
                root,
                omit_empty: false,
            }),
            _ => Err((String::new(), FormatError::Syntax(0))),
        }
    }

    /// `omit_empty_values`: keys with missing values are left out.
    pub fn omit_empty(mut self, on: bool) -> Self {
        self.omit_empty = on;
        self
    }

    /// Append one JSON object and a newline.
    pub fn render_into(&self, rec: &LogRecord<'_>, out: &mut String) {
        self.obj(&self.root, rec, out);
        out.push('\n');
    }

    fn obj(&self, fields: &[(String, JsonNode)], rec: &LogRecord<'_>, out: &mut String) {
        out.push('{');
        let mut first = true;
        for (k, v) in fields {
            let at = out.len();
            if !first {
                out.push(',');
            }
            push_json_str(out, k);
            out.push(':');
            let wrote = match v {
                JsonNode::Const(c) => {
                    out.push_str(&c.to_string());
                    true
                }
                JsonNode::Obj(o) => {
                    self.obj(o, rec, out);
                    true
                }
                JsonNode::Fmt(f) => match f.single() {
                    Some((op, max)) => match value(op, rec) {
                        Val::Missing => {
                            out.push_str("null");
                            !self.omit_empty
                        }
                        Val::Int(n) => {
                            out.push_str(decimal(n, &mut [0; 20]));
                            true
                        }
                        Val::Str(s) => {
                            let mut t = String::new();
                            push_truncated(&mut t, &s, max);
                            push_json_str(out, &t);
                            true
                        }
                    },
                    None => {
                        let s = f.render(rec);
                        push_json_str(out, &s);
                        true
                    }
                },
            };
            if wrote {
                first = false;
            } else {
                out.truncate(at);
            }
        }
        out.push('}');
    }

    /// [`Format::header_names`] of every value.
    pub fn header_names(&self, req: &mut Vec<String>, resp: &mut Vec<String>) {
        fn walk(fields: &[(String, JsonNode)], req: &mut Vec<String>, resp: &mut Vec<String>) {
            for (_, v) in fields {
                match v {
                    JsonNode::Fmt(f) => f.header_names(req, resp),
                    JsonNode::Obj(o) => walk(o, req, resp),
                    JsonNode::Const(_) => {}
                }
            }
        }
        walk(&self.root, req, resp);
    }

    /// Whether any value reads request headers.
    pub fn uses_request_headers(&self) -> bool {
        fn any(fields: &[(String, JsonNode)]) -> bool {
            fields.iter().any(|(_, v)| match v {
                JsonNode::Fmt(f) => f.uses_request_headers(),
                JsonNode::Obj(o) => any(o),
                JsonNode::Const(_) => false,
            })
        }
        any(&self.root)
    }
}

fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Days since 1970-01-01 -> (year, month, day) (Howard Hinnant's civil_from_days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];
const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];

/// A UTC strftime subset: `%Y %y %m %d %e %H %M %S %j %b %a %z %Z %s %T %F %%` and Envoy's
/// fractional seconds `%f` (9 digits), `%1f`..`%9f`; other characters are copied.
pub fn strftime(t: SystemTime, fmt: &str) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() as i64;
    let nanos = since.subsec_nanos();
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, mo, d) = civil(days);
    let (h, mi, s) = (sod / 3600, (sod / 60) % 60, sod % 60);
    let mut out = String::with_capacity(fmt.len() + 16);
    let mut it = fmt.chars().peekable();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut digits = None;
        if let Some(&n) = it.peek()
            && n.is_ascii_digit()
            && n != '0'
        {
            digits = n.to_digit(10);
            it.next();
        }
        let Some(spec) = it.next() else {
            out.push('%');
            break;
        };
        let _ = match (spec, digits) {
            ('f', dg) => {
                let dg = dg.unwrap_or(9) as usize;
                let s9 = format!("{nanos:09}");
                out.push_str(&s9[..dg]);
                Ok(())
            }
            (_, Some(dg)) => write!(out, "%{dg}{spec}"),
            ('Y', _) => write!(out, "{y:04}"),
            ('y', _) => write!(out, "{:02}", y.rem_euclid(100)),
            ('m', _) => write!(out, "{mo:02}"),
            ('d', _) => write!(out, "{d:02}"),
            ('e', _) => write!(out, "{d:2}"),
            ('H', _) => write!(out, "{h:02}"),
            ('M', _) => write!(out, "{mi:02}"),
            ('S', _) => write!(out, "{s:02}"),
            ('j', _) => {
                let (y0, _, _) = civil(days);
                let jan1 = days_from_civil(y0, 1, 1);
                write!(out, "{:03}", days - jan1 + 1)
            }
            ('b', _) => write!(out, "{}", MONTHS[(mo - 1) as usize]),
            ('a', _) => write!(out, "{}", DAYS[days.rem_euclid(7) as usize]),
            ('z', _) => write!(out, "+0000"),
            ('Z', _) => write!(out, "UTC"),
            ('s', _) => write!(out, "{secs}"),
            ('T', _) => write!(out, "{h:02}:{mi:02}:{s:02}"),
            ('F', _) => write!(out, "{y:04}-{mo:02}-{d:02}"),
            ('%', _) => write!(out, "%"),
            (other, _) => write!(out, "%{other}"),
        };
    }
    out
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_log::flags::Flag;
    use weir_filters::PeerCert;

    fn rec_with<'a>(
        req: &'a HeaderMap,
        resp: &'a HeaderMap,
        tls: &'a DownstreamTls,
    ) -> LogRecord<'a> {
        let mut flags = ResponseFlags::default();
        flags.set(Flag::UpstreamConnectionFailure);
        flags.set(Flag::UpstreamRetryLimitExceeded);
        LogRecord {
            start_time: UNIX_EPOCH + Duration::from_millis(1_460_751_420_310),
            request_headers: Some(req.into()),
            method: Some(&http::Method::GET),
            path: Some("/a?b=1"),
            authority: Some("example.com"),
            scheme: Some("http"),
            response_headers: Some(resp.into()),
            protocol: Some("HTTP/1.1"),
            response_code: 503,
            flags,
            bytes_received: 3,
            bytes_sent: 91,
            duration: Some(Duration::from_millis(12)),
            upstream_host: Some("10.0.0.2:8080".parse().expect("addr")),
            upstream_cluster: Some("backend"),
            downstream_remote: Some("10.1.2.3:5555".parse().expect("addr")),
            downstream_local: Some("127.0.0.1:10000".parse().expect("addr")),
            tls: Some(tls),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            route_name: Some("r1"),
            ..Default::default()
        }
    }

    fn tls() -> DownstreamTls {
        DownstreamTls {
            sni: Some("api.example.com".into()),
            version: Some("TLSv1.3"),
            cipher: Some("TLS_AES_128_GCM_SHA256".into()),
            terminated: true,
            peer: Some(PeerCert {
                uri_sans: vec!["spiffe://td/ns/a/sa/b".into()],
                subject: "CN=client".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Header operands are parsed once into `HeaderName`s: alternatives, repeated values,
    /// pseudo-headers and names that are not valid header names.
    #[test]
    fn header_operands_look_up_parsed_names() {
        let mut req = HeaderMap::new();
        req.insert("x-b", "second".parse().expect("v"));
        req.append("x-multi", "a".parse().expect("v"));
        req.append("x-multi", "b".parse().expect("v"));
        req.append("x-multi", "c".parse().expect("v"));
        let mut resp = HeaderMap::new();
        resp.insert("x-r", "7".parse().expect("v"));
        let t = tls();
        let rec = rec_with(&req, &resp, &t);
        let f = Format::parse(
            "%REQ(X-A?X-B)%|%REQ(X-MULTI)%|%REQ(:AUTHORITY)%|%REQ(HOST)%|%REQ(BAD NAME)%|\
             %RESP(X-R)%|%RESP(:STATUS)%|%RESP(X-NONE?X-R)%|%TRAILER(X-R)%",
        )
        .expect("parses");
        assert_eq!(
            f.render(&rec),
            "second|a,b,c|example.com|example.com|-|7|-|7|-"
        );
        let (mut rq, mut rs) = (Vec::new(), Vec::new());
        f.header_names(&mut rq, &mut rs);
        assert_eq!(
            rq,
            ["x-a", "x-b", "x-multi", ":authority", "host", "bad name"]
        );
        assert_eq!(rs, ["x-r", ":status", "x-none"]);
    }

    #[test]
    fn parses_and_renders_commands() {
        let mut req = HeaderMap::new();
        req.insert("user-agent", "curl/8".parse().expect("v"));
        req.append("x-multi", "a".parse().expect("v"));
        req.append("x-multi", "b".parse().expect("v"));
        req.insert("x-envoy-original-path", "/orig".parse().expect("v"));
        let mut resp = HeaderMap::new();
        resp.insert("x-envoy-upstream-service-time", "7".parse().expect("v"));
        let t = tls();
        let rec = rec_with(&req, &resp, &t);
        let f = Format::parse(
            "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %REQ(:PATH)% %PROTOCOL% %RESPONSE_CODE% %RESPONSE_FLAGS% \
             %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(x-envoy-upstream-service-time)% %REQ(USER-AGENT):4% \
             %REQ(X-MULTI)% %REQ(X-NONE)% %UPSTREAM_HOST% %UPSTREAM_CLUSTER% %DOWNSTREAM_REMOTE_ADDRESS% \
             %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_LOCAL_ADDRESS% %TRACE_ID% %ROUTE_NAME% %RESPONSE_DURATION%",
        )
        .expect("parses");
        assert_eq!(
            f.render(&rec),
            "GET /orig /a?b=1 HTTP/1.1 503 UF,URX 3 91 12 7 curl a,b - 10.0.0.2:8080 backend 10.1.2.3:5555 \
             10.1.2.3 127.0.0.1:10000 4bf92f3577b34da6a3ce929d0e0e4736 r1 -"
        );
        let f = Format::parse(
            "%REQUESTED_SERVER_NAME%|%DOWNSTREAM_PEER_URI_SAN%|%DOWNSTREAM_PEER_SUBJECT%|%DOWNSTREAM_TLS_VERSION%|%DOWNSTREAM_TLS_CIPHER%",
        )
        .expect("parses");
        assert_eq!(
            f.render(&rec),
            "api.example.com|spiffe://td/ns/a/sa/b|CN=client|TLSv1.3|TLS_AES_128_GCM_SHA256"
        );
        // No TLS: every TLS operator is `-`.
        let plain = LogRecord {
            tls: None,
            ..rec.clone()
        };
        assert_eq!(f.render(&plain), "-|-|-|-|-");
        let f =
            Format::parse("[%START_TIME%] %START_TIME(%Y/%m/%d %H:%M:%S.%3f %s)%").expect("parses");
        assert_eq!(
            f.render(&rec),
            "[2016-04-15T20:17:00.310Z] 2016/04/15 20:17:00.310 1460751420"
        );
        // omit_empty_values
        let f = Format::parse("a=%REQ(X-NONE)%;")
            .expect("parses")
            .omit_empty(true);
        assert_eq!(f.render(&rec), "a=;");
    }

    #[test]
    fn default_format_parses() {
        let f = Format::parse(DEFAULT_FORMAT).expect("parses");
        let req = HeaderMap::new();
        let resp = HeaderMap::new();
        let t = tls();
        let line = f.render(&rec_with(&req, &resp, &t));
        assert_eq!(
            line,
            "[2016-04-15T20:17:00.310Z] \"GET /a?b=1 HTTP/1.1\" 503 UF,URX 3 91 12 - \"-\" \"-\" \"-\" \"example.com\" \"10.0.0.2:8080\"\n"
        );
    }

    #[test]
    fn bad_formats_are_errors() {
        assert_eq!(Format::parse("100%"), Err(FormatError::Syntax(3)));
        assert_eq!(Format::parse("%REQ(x"), Err(FormatError::Syntax(0)));
        assert_eq!(Format::parse("%REQ(x):%"), Err(FormatError::Syntax(0)));
        assert_eq!(
            Format::parse("%NOPE%"),
            Err(FormatError::Unknown("NOPE".into()))
        );
        assert!(matches!(
            Format::parse("%REQ%"),
            Err(FormatError::Argument(..))
        ));
        assert!(matches!(
            Format::parse("%DURATION(x)%"),
            Err(FormatError::Argument(..))
        ));
        assert_eq!(
            Format::parse("no commands")
                .expect("ok")
                .render(&LogRecord::default()),
            "no commands"
        );
    }

    #[test]
    fn json_is_typed_and_sorted() {
        let req = HeaderMap::new();
        let resp = HeaderMap::new();
        let t = tls();
        let rec = rec_with(&req, &resp, &t);
        let v = serde_json::json!({
            "status": "%RESPONSE_CODE%",
            "flags": "%RESPONSE_FLAGS%",
            "ua": "%REQ(USER-AGENT)%",
            "line": "%REQ(:METHOD)% %REQ(:PATH)%",
            "nested": {"cluster": "%UPSTREAM_CLUSTER%", "n": 1},
            "host": "%UPSTREAM_HOST%:4",
        });
        let f = JsonFormat::parse(&v).expect("parses");
        let mut out = String::new();
        f.render_into(&rec, &mut out);
        assert_eq!(
            out,
            "{\"flags\":\"UF,URX\",\"host\":\"10.0.0.2:8080:4\",\"line\":\"GET /a?b=1\",\"nested\":{\"cluster\":\"backend\",\"n\":1},\"status\":503,\"ua\":null}\n"
        );
        let parsed: serde_json::Value = serde_json::from_str(&out).expect("valid json");
        assert_eq!(parsed["status"], 503);
        let f = f.omit_empty(true);
        let mut out = String::new();
        f.render_into(&rec, &mut out);
        assert!(!out.contains("\"ua\""), "{out}");
        serde_json::from_str::<serde_json::Value>(&out).expect("valid json");
        let e = JsonFormat::parse(&serde_json::json!({"a": {"b": "%BAD%"}})).expect_err("bad");
        assert_eq!(e.0, ".a.b");
    }

    #[test]
    fn default_start_time_matches_strftime() {
        for t in [
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::new(951_782_400, 123_456_789),
            UNIX_EPOCH + Duration::new(1_795_000_000, 999_999_999),
            UNIX_EPOCH + Duration::new(253_402_300_799, 5_000_000), // 9999-12-31T23:59:59
        ] {
            let mut s = String::new();
            write_default_time(t, &mut s);
            assert_eq!(s, strftime(t, "%Y-%m-%dT%H:%M:%S.%3fZ"));
        }
        let f = Format::parse("%START_TIME% %UPSTREAM_HOST% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_LOCAL_ADDRESS%").expect("format");
        let rec = LogRecord {
            start_time: UNIX_EPOCH + Duration::new(951_782_400, 7_000_000),
            upstream_host: Some("10.0.0.2:8080".parse().expect("addr")),
            downstream_remote: Some("[::1]:5000".parse().expect("addr")),
            ..Default::default()
        };
        assert_eq!(
            f.render(&rec),
            "2000-02-29T00:00:00.007Z 10.0.0.2:8080 ::1 -"
        );
    }

    #[test]
    fn strftime_basics() {
        let t = UNIX_EPOCH + Duration::new(951_782_400, 123_456_789); // 2000-02-29
        assert_eq!(
            strftime(t, "%F %T %j %a %b %e %y %6f %%"),
            "2000-02-29 00:00:00 060 Tue Feb 29 00 123456 %"
        );
    }
}
