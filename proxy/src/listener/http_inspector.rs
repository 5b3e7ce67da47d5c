//! `envoy.filters.listener.http_inspector`: tells plain-text HTTP/1.x and h2c (prior
//! knowledge) apart from other protocols by peeking at the first bytes (never consuming),
//! and sets the filter-chain match input `application_protocols` to `http/1.0`, `http/1.1`
//! or `h2c`, as Envoy does.
//!
//! - h2c: the client connection preface `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
//! - HTTP/1.x: a request line `METHOD SP request-target SP HTTP/1.<0|1> CRLF` (method a
//!   token, target without spaces or controls).
//! - Anything else (including bytes that stop being a possible prefix of either) is
//!   `http_not_found`, decided as early as possible; at most [`MAX_INSPECT`] bytes are looked
//!   at (a longer first line is not HTTP to the inspector, as Envoy's bound).
//! - A connection that already carries TLS (the TLS inspector ran first and found it) is
//!   skipped, as Envoy does.
//! - A client that sends nothing: the listener's `listener_filters_timeout` applies (the
//!   caller's deadline); on timeout the connection closes or, with
//!   `continue_on_listener_filters_timeout`, continues without an application protocol (for
//!   server-speaks-first protocols).
//!
//! Stats (server-wide, `http_inspector.`): `http10_found`, `http11_found`, `http2_found`,
//! `http_not_found`, `read_error`.

use super::peek::{PeekError, Peeked, peek_until};

/// How many bytes the inspector looks at, at most (Envoy's `MAX_INSPECT_SIZE`).
pub const MAX_INSPECT: usize = 8192;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the inspector found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpProto {
    /// `http/1.0`.
    Http10,
    /// `http/1.1`.
    Http11,
    /// `h2c` (prior-knowledge preface).
    H2c,
    /// Not HTTP.
    NotHttp,
}

impl HttpProto {
    /// The `application_protocols` value Envoy sets (none when not HTTP).
    pub fn alpn(self) -> Option<&'static str> {
        match self {
            Self::Http10 => Some("http/1.0"),
            Self::Http11 => Some("http/1.1"),
            Self::H2c => Some("h2c"),
            Self::NotHttp => None,
        }
    }
}

/// `http_inspector.*` stats.
#[derive(Debug)]
pub struct HttpInspectorStats {
    /// `http10_found`.
    pub http10_found: metrics::Counter,
    /// `http11_found`.
    pub http11_found: metrics::Counter,
    /// `http2_found`.
    pub http2_found: metrics::Counter,
    /// `http_not_found`.
    pub http_not_found: metrics::Counter,
    /// `read_error`.
    pub read_error: metrics::Counter,
}

impl HttpInspectorStats {
    /// Register under `http_inspector.`.
    pub fn new(store: &std::sync::Arc<crate::stats::Store>) -> Self {
        let s = store.plain("http_inspector");
        Self {
            http10_found: s.counter("http10_found"),
            http11_found: s.counter("http11_found"),
            http2_found: s.counter("http2_found"),
            http_not_found: s.counter("http_not_found"),
            read_error: s.counter("read_error"),
        }
    }

    fn record(&self, p: HttpProto) {
        match p {
            HttpProto::Http10 => self.http10_found.increment(1),
            HttpProto::Http11 => self.http11_found.increment(1),
            HttpProto::H2c => self.http2_found.increment(1),
            HttpProto::NotHttp => self.http_not_found.increment(1),
        }
    }
}

/// Peek until decided (no deadline here: the caller bounds it). A read error or a close
/// before a decision counts `read_error` and is returned.
pub(crate) async fn inspect(
    stream: &tokio::net::TcpStream,
    stats: &HttpInspectorStats,
) -> Result<HttpProto, PeekError> {
    match peek_until(stream, MAX_INSPECT, detect, |_| HttpProto::NotHttp).await {
        Ok(p) => {
            stats.record(p);
            Ok(p)
        }
        Err(e) => {
            stats.read_error.increment(1);
            Err(e)
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Decide on the bytes seen so far (pure; unit-tested and cheap to call again with more).
pub fn detect(data: &[u8]) -> Peeked<HttpProto> {
    // h2c preface (a prefix of it may still become one).
    let n = data.len().min(H2_PREFACE.len());
    if data[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Peeked::Done(HttpProto::H2c)
        } else {
            Peeked::NeedMore
        };
    }
    // Request line: METHOD SP target SP HTTP/1.x CRLF.
    let mut i = 0;
    while i < data.len() && is_tchar(data[i]) {
        i += 1;
    }
    if i == data.len() {
        return Peeked::NeedMore;
    }
    if i == 0 || data[i] != b' ' {
        return Peeked::Done(HttpProto::NotHttp);
    }
    i += 1;
    let target = i;
    while i < data.len() && data[i] > b' ' && data[i] != 0x7f {
        i += 1;
    }
    if i == data.len() {
        return Peeked::NeedMore;
    }
    if i == target || data[i] != b' ' {
        return Peeked::Done(HttpProto::NotHttp);
    }
    i += 1;
    let rest = &data[i..];
    const V: &[u8] = b"HTTP/1.";
    let m = rest.len().min(V.len());
    if rest[..m] != V[..m] {
        return Peeked::Done(HttpProto::NotHttp);
    }
    // "HTTP/1.x\r\n" = 10 bytes.
    if rest.len() < 10 {
        // Check what is there so far.
        return match rest.get(7) {
            Some(b'0' | b'1') | None => match rest.get(8) {
                Some(b'\r') | None => Peeked::NeedMore,
                Some(_) => Peeked::Done(HttpProto::NotHttp),
            },
            Some(_) => Peeked::Done(HttpProto::NotHttp),
        };
    }
    match (rest[7], rest[8], rest[9]) {
        (b'0', b'\r', b'\n') => Peeked::Done(HttpProto::Http10),
        (b'1', b'\r', b'\n') => Peeked::Done(HttpProto::Http11),
        _ => Peeked::Done(HttpProto::NotHttp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(d: &[u8]) -> HttpProto {
        match detect(d) {
            Peeked::Done(p) => p,
            Peeked::NeedMore => panic!("undecided on {:?}", String::from_utf8_lossy(d)),
        }
    }

    #[test]
    fn detects_http1_and_h2c() {
        assert_eq!(
            done(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            HttpProto::Http11
        );
        assert_eq!(done(b"POST /x?y=1 HTTP/1.0\r\n"), HttpProto::Http10);
        assert_eq!(done(b"OPTIONS * HTTP/1.1\r\n"), HttpProto::Http11);
        assert_eq!(done(b"CONNECT a:443 HTTP/1.1\r\n"), HttpProto::Http11);
        assert_eq!(done(H2_PREFACE), HttpProto::H2c);
        let mut more = H2_PREFACE.to_vec();
        more.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(done(&more), HttpProto::H2c);
        assert_eq!(HttpProto::H2c.alpn(), Some("h2c"));
        assert_eq!(HttpProto::Http10.alpn(), Some("http/1.0"));
        assert_eq!(HttpProto::NotHttp.alpn(), None);
    }

    #[test]
    fn every_prefix_of_a_request_needs_more() {
        for full in [
            &b"GET /path HTTP/1.1\r\n"[..],
            b"DELETE /a HTTP/1.0\r\n",
            H2_PREFACE,
        ] {
            for k in 1..full.len() {
                assert_eq!(
                    detect(&full[..k]),
                    Peeked::NeedMore,
                    "{:?}",
                    String::from_utf8_lossy(&full[..k])
                );
            }
        }
    }

    #[test]
    fn rejects_early_and_exactly() {
        for bad in [
            &b"\x16\x03\x01\x02\x00"[..], // TLS record
            b"SSH-2.0-OpenSSH_9.0\r\n",
            b" GET / HTTP/1.1\r\n",
            b"GET  / HTTP/1.1\r\n",
            b"GET / HTTP/2.0\r\n",
            b"GET / HTTP/1.2\r\n",
            b"GET / HTTP/1.1\n",
            b"GET / HTTP/1.1 \r\n",
            b"GET / HTTPS",
            b"GET /\x01 HTTP/1.1\r\n",
            b"G(T / HTTP/1.1\r\n",
            b"PRI * HTTP/2.0\r\n\r\nXX",
            b"\0\0\0\0",
            b"220 smtp ready\r\n",
        ] {
            assert_eq!(
                done(bad),
                HttpProto::NotHttp,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
