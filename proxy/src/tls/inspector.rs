//! `envoy.filters.listener.tls_inspector`: a bounded, hand-written ClientHello parser and the
//! peek loop that feeds it (the bytes stay in the socket for the TLS handshake or for
//! passthrough).
//!
//! The parser ([`parse_client_hello`]) looks at TLS records only as far as it must: the
//! handshake messages carried by consecutive `handshake` records are reassembled (a
//! ClientHello may span records) up to [`MAX_CLIENT_HELLO`] bytes; then the SNI
//! (`server_name`, host_name entries) and ALPN extensions are read. Anything that is not a TLS
//! handshake record (HTTP, garbage) is [`Hello::NotTls`] at once, so plain-text chains still
//! match quickly. It never panics on input (fuzzed by `fuzz/fuzz_targets/client_hello.rs`).

use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Largest ClientHello weir inspects (Envoy's `max_client_hello_size` default is 64 KiB).
pub const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// TLS record header length.
const RECORD_HEADER: usize = 5;
/// Largest TLS plaintext record (2^14) plus slack allowed by RFC 8446 for ciphertext.
const MAX_RECORD: usize = 16384 + 2048;

/// What the peeked bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed to decide.
    NeedMore,
    /// Not a TLS ClientHello (`transport_protocol` stays `raw_buffer`).
    NotTls,
    /// The ClientHello is larger than [`MAX_CLIENT_HELLO`].
    TooLarge,
    /// A ClientHello: its SNI (lower-cased) and ALPN protocols in client order.
    Tls {
        /// `server_name` host_name, if any.
        sni: Option<String>,
        /// `application_layer_protocol_negotiation` protocols.
        alpn: Vec<String>,
    },
}

/// A cursor over a byte slice; every read is bounds-checked.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&v, rest) = self.b.split_first()?;
        self.b = rest;
        Some(v)
    }
    fn u16(&mut self) -> Option<u16> {
        let s = self.take(2)?;
        Some(u16::from_be_bytes([s[0], s[1]]))
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.b.len() < n {
            return None;
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Some(h)
    }
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()? as usize;
        self.take(n)
    }
    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

/// Classify `buf` (the first bytes of a connection).
pub fn parse_client_hello(buf: &[u8]) -> Hello {
    // Record layer: content type 22 (handshake), legacy version 3.x.
    match buf {
        [] => return Hello::NeedMore,
        [t, ..] if *t != 0x16 => return Hello::NotTls,
        [_, v] if *v != 0x03 => return Hello::NotTls,
        [_, v, ..] if *v != 0x03 => return Hello::NotTls,
        _ => {}
    }
    // Reassemble the handshake bytes of consecutive handshake records.
    let mut hs = Vec::new();
    let mut rest = buf;
    let mut need: Option<usize> = None;
    loop {
        if rest.len() < RECORD_HEADER {
            return Hello::NeedMore;
        }
        if rest[0] != 0x16 || rest[1] != 0x03 {
            // The ClientHello must be the first handshake message, in handshake records.
            return Hello::NotTls;
        }
        let len = u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if len == 0 || len > MAX_RECORD {
            return Hello::NotTls;
        }
        let Some(body) = rest.get(RECORD_HEADER..RECORD_HEADER + len) else {
            // Partial record: take what there is to learn the message size early.
            let partial = &rest[RECORD_HEADER..];
            if hs.len() + partial.len() >= 4 || need.is_some() {
                let mut all = hs.clone();
                all.extend_from_slice(partial);
                if let Some(h) = header_check(&all) {
                    return h;
                }
            }
            return Hello::NeedMore;
        };
        hs.extend_from_slice(body);
        rest = &rest[RECORD_HEADER + len..];
        if hs.len() >= 4 {
            if let Some(h) = header_check(&hs) {
                return h;
            }
            let total = 4 + (((hs[1] as usize) << 16) | ((hs[2] as usize) << 8) | hs[3] as usize);
            need = Some(total);
            if hs.len() >= total {
                return parse_hello_body(&hs[4..total]);
            }
        }
        if hs.len() > MAX_CLIENT_HELLO {
            return Hello::TooLarge;
        }
    }
}

/// Early verdicts from the handshake header: not a ClientHello, or too large.
fn header_check(hs: &[u8]) -> Option<Hello> {
    if hs.first().is_some_and(|&t| t != 0x01) {
        return Some(Hello::NotTls);
    }
    if hs.len() >= 4 {
        let len = ((hs[1] as usize) << 16) | ((hs[2] as usize) << 8) | hs[3] as usize;
        if len + 4 > MAX_CLIENT_HELLO {
            return Some(Hello::TooLarge);
        }
    }
    None
}

/// The ClientHello body (after the 4-byte handshake header).
fn parse_hello_body(b: &[u8]) -> Hello {
    parse_hello_fields(b).unwrap_or(Hello::NotTls)
}

fn parse_hello_fields(b: &[u8]) -> Option<Hello> {
    let mut r = Reader { b };
    let _version = r.u16()?;
    r.take(32)?; // random
    r.vec8()?; // session id
    r.vec16()?; // cipher suites
    r.vec8()?; // compression methods
    let mut sni = None;
    let mut alpn = Vec::new();
    if r.b.is_empty() {
        // No extensions (old clients): TLS without SNI/ALPN.
        return Some(Hello::Tls { sni, alpn });
    }
    let mut exts = Reader { b: r.vec16()? };
    while !exts.b.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        match ty {
            0x0000 => {
                let mut list = Reader {
                    b: Reader { b: data }.vec16()?,
                };
                while !list.b.is_empty() {
                    let kind = list.u8()?;
                    let name = list.vec16()?;
                    if kind == 0 && sni.is_none() {
                        let s = std::str::from_utf8(name).ok()?;
                        if s.is_empty() {
                            return None;
                        }
                        sni = Some(s.to_ascii_lowercase());
                    }
                }
            }
            0x0010 => {
                let mut list = Reader {
                    b: Reader { b: data }.vec16()?,
                };
                while !list.b.is_empty() {
                    let p = list.vec8()?;
                    if p.is_empty() {
                        return None;
                    }
                    alpn.push(String::from_utf8_lossy(p).into_owned());
                }
            }
            _ => {}
        }
    }
    Some(Hello::Tls { sni, alpn })
}

/// `tls_inspector.*` stats (Envoy names, server-wide like Envoy's default stat prefix).
#[derive(Debug)]
pub struct InspectorStats {
    /// `tls_found`.
    pub tls_found: metrics::Counter,
    /// `tls_not_found`.
    pub tls_not_found: metrics::Counter,
    /// `sni_found`.
    pub sni_found: metrics::Counter,
    /// `sni_not_found`.
    pub sni_not_found: metrics::Counter,
    /// `alpn_found`.
    pub alpn_found: metrics::Counter,
    /// `alpn_not_found`.
    pub alpn_not_found: metrics::Counter,
    /// `client_hello_too_large`.
    pub client_hello_too_large: metrics::Counter,
}

impl InspectorStats {
    /// Register under `tls_inspector.`.
    pub fn new(store: &std::sync::Arc<crate::stats::Store>) -> Self {
        let s = store.plain("tls_inspector");
        Self {
            tls_found: s.counter("tls_found"),
            tls_not_found: s.counter("tls_not_found"),
            sni_found: s.counter("sni_found"),
            sni_not_found: s.counter("sni_not_found"),
            alpn_found: s.counter("alpn_found"),
            alpn_not_found: s.counter("alpn_not_found"),
            client_hello_too_large: s.counter("client_hello_too_large"),
        }
    }

    /// Count one verdict.
    pub fn record(&self, h: &Hello) {
        match h {
            Hello::Tls { sni, alpn } => {
                self.tls_found.increment(1);
                if sni.is_some() {
                    self.sni_found.increment(1);
                } else {
                    self.sni_not_found.increment(1);
                }
                if alpn.is_empty() {
                    self.alpn_not_found.increment(1);
                } else {
                    self.alpn_found.increment(1);
                }
            }
            Hello::NotTls => self.tls_not_found.increment(1),
            Hello::TooLarge => self.client_hello_too_large.increment(1),
            Hello::NeedMore => {}
        }
    }
}

/// Why inspection ended without a verdict.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// `listener_filters_timeout` passed.
    #[error("listener filter timeout")]
    Timeout,
    /// The peer closed before sending enough.
    #[error("connection closed during inspection")]
    Closed,
    /// A socket error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Peek at `stream` until the parser decides, at most `timeout`. Nothing is consumed.
pub async fn inspect(stream: &TcpStream, timeout: Duration) -> Result<Hello, InspectError> {
    match tokio::time::timeout(timeout, peek_loop(stream)).await {
        Ok(r) => r,
        Err(_) => Err(InspectError::Timeout),
    }
}

async fn peek_loop(stream: &TcpStream) -> Result<Hello, InspectError> {
    use std::os::fd::AsRawFd;
    // Grows with what the client sent, up to the bound (+1 to see "too large").
    let mut buf = vec![0u8; 1024];
    let mut seen = 0usize;
    loop {
        stream.readable().await?;
        let r = stream.try_io(Interest::READABLE, || {
            let fd = stream.as_raw_fd();
            let n = nix::sys::socket::recv(fd, &mut buf, nix::sys::socket::MsgFlags::MSG_PEEK)
                .map_err(std::io::Error::from)?;
            // Nothing new since the last peek: clear readiness and wait for the next edge.
            if n == seen && n != 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match r {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(InspectError::Closed);
        }
        seen = n;
        match parse_client_hello(&buf[..n]) {
            Hello::NeedMore => {
                if n == buf.len() {
                    if buf.len() > MAX_CLIENT_HELLO + RECORD_HEADER * 8 {
                        return Ok(Hello::TooLarge);
                    }
                    let grow = (buf.len() * 2).min(MAX_CLIENT_HELLO + RECORD_HEADER * 16);
                    buf.resize(grow, 0);
                }
            }
            h => return Ok(h),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello from rustls with SNI and ALPN.
    fn rustls_hello(sni: &str, alpn: &[&str]) -> Vec<u8> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut roots = rustls::RootCertStore::empty();
        let ca = rcgen::generate_simple_self_signed(vec!["x".into()]).expect("cert");
        roots.add(ca.cert.der().clone()).expect("root");
        let mut cfg = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("name");
        let mut c = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).expect("conn");
        let mut out = Vec::new();
        c.write_tls(&mut out).expect("hello");
        out
    }

    #[test]
    fn rustls_client_hello_sni_and_alpn() {
        let h = rustls_hello("WWW.Example.com", &["h2", "http/1.1"]);
        assert_eq!(
            parse_client_hello(&h),
            Hello::Tls {
                sni: Some("www.example.com".into()),
                alpn: vec!["h2".into(), "http/1.1".into()]
            }
        );
        // Every strict prefix needs more bytes; never a wrong verdict.
        for cut in 0..h.len() {
            assert_eq!(parse_client_hello(&h[..cut]), Hello::NeedMore, "cut {cut}");
        }
    }

    #[test]
    fn hello_split_over_records() {
        let h = rustls_hello("a.test", &[]);
        let body = &h[5..];
        let (a, b) = body.split_at(40);
        let mut two = vec![0x16, 0x03, 0x01];
        two.extend_from_slice(&(a.len() as u16).to_be_bytes());
        two.extend_from_slice(a);
        two.extend_from_slice(&[0x16, 0x03, 0x01]);
        two.extend_from_slice(&(b.len() as u16).to_be_bytes());
        two.extend_from_slice(b);
        assert_eq!(
            parse_client_hello(&two),
            Hello::Tls {
                sni: Some("a.test".into()),
                alpn: vec![]
            }
        );
    }

    #[test]
    fn plain_text_and_garbage() {
        assert_eq!(parse_client_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(parse_client_hello(b"\x16\x02"), Hello::NotTls);
        assert_eq!(parse_client_hello(b"\x16"), Hello::NeedMore);
        // A handshake record that is not a ClientHello.
        assert_eq!(
            parse_client_hello(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"),
            Hello::NotTls
        );
        // Zero-length record.
        assert_eq!(parse_client_hello(b"\x16\x03\x01\x00\x00"), Hello::NotTls);
        // ClientHello whose body is truncated garbage (length says 4 bytes).
        assert_eq!(
            parse_client_hello(b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\xff\xff"),
            Hello::NotTls
        );
    }

    #[test]
    fn oversize_hello_is_too_large() {
        // Handshake header announcing 1 MiB.
        assert_eq!(
            parse_client_hello(b"\x16\x03\x01\x00\x04\x01\x10\x00\x00"),
            Hello::TooLarge
        );
    }

    #[test]
    fn corrupt_extension_lengths() {
        let mut h = rustls_hello("b.test", &["h2"]);
        // Flip bytes one at a time: never panics, and never invents an SNI.
        for i in 5..h.len() {
            let orig = h[i];
            h[i] = orig ^ 0xff;
            if let Hello::Tls { sni: Some(s), .. } = parse_client_hello(&h) {
                assert!(s.len() <= 255);
            }
            h[i] = orig;
        }
    }

    #[test]
    fn prefixes_never_decide_differently() {
        let h = rustls_hello("c.test", &["h2"]);
        let full = parse_client_hello(&h);
        // Mutations of every byte, then all prefixes of each: a decided prefix agrees.
        for i in 0..h.len() {
            let mut m = h.clone();
            m[i] = m[i].wrapping_add(0x41);
            let whole = parse_client_hello(&m);
            for cut in (0..m.len()).step_by(7) {
                match parse_client_hello(&m[..cut]) {
                    Hello::NeedMore => {}
                    v => assert_eq!(v, whole, "byte {i} cut {cut}"),
                }
            }
        }
        assert!(matches!(full, Hello::Tls { .. }));
    }
}
