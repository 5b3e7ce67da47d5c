//! `envoy.filters.listener.proxy_protocol`: the PROXY protocol (HAProxy's v1 text and v2
//! binary headers) sent by an L4 load balancer in front of weir. The header IS consumed; the
//! addresses it carries replace the connection's peer (`ConnInfo.peer`, used for XFF, RBAC
//! `remote_ip`, access logs) and local address (`ConnInfo.local`, chain matching on the
//! destination), as Envoy's `setRemoteAddress` / `restoreLocalAddress`. The TCP peer stays
//! `ConnInfo.direct_peer` (RBAC `direct_remote_ip`).
//!
//! # Parser
//! [`parse`] is pure, strict and bounded: it looks at most at [`V1_MAX`] bytes of a v1 header
//! and at `16 + len` (`len` from the v2 header, at most 65535) of a v2 header, and decides as
//! soon as the bytes cannot become a valid header any more.
//! - v1: `PROXY SP (TCP4|TCP6) SP src SP dst SP sport SP dport CRLF` (single spaces, the
//!   address family must match the keyword, ports decimal 0..=65535 without sign or leading
//!   zeros), or `PROXY UNKNOWN[ anything] CRLF` (the real addresses are kept).
//! - v2: the 12-byte signature, version 2, command LOCAL (real addresses kept) or PROXY with
//!   `AF_INET` / `AF_INET6` over STREAM or DGRAM (addresses of 12 / 36 bytes at least); other
//!   families with PROXY are errors (as Envoy). TLVs after the addresses are skipped,
//!   walked safely by [`tlvs`] (not used for routing: `rules` is refused).
//!
//! # Config (`ProxyProtocol`)
//! Supported: `allow_requests_without_proxy_protocol` (a connection whose first bytes cannot
//! start either signature continues untouched), `disallowed_versions`, `stat_prefix`.
//! Refused: `rules` (TLV to metadata) and `pass_through_tlvs`.
//!
//! # Stats (Envoy's)
//! `proxy_proto.[<stat_prefix>.]not_found_disallowed`, `not_found_allowed`,
//! `versions.v1.{found,disallowed,error}`, `versions.v2.{found,disallowed,error}`, and the
//! legacy root counter `downstream_cx_proxy_proto_error` (any failure).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use metrics::Counter;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::peek::{PeekError, Peeked, peek_until};

/// The longest v1 header, CRLF included (the spec's 107).
pub const V1_MAX: usize = 107;
/// The v2 signature.
pub const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_SIG: &[u8] = b"PROXY ";
/// The v2 fixed part (signature, ver/cmd, family, length).
pub const V2_HEADER: usize = 16;

/// A PROXY protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Text.
    V1,
    /// Binary.
    V2,
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Which version.
    pub version: Version,
    /// Bytes to consume from the stream.
    pub len: usize,
    /// `(source, destination)`; `None` for v1 `UNKNOWN` and v2 `LOCAL`: keep the real ones.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
}

/// Why a header is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Neither signature (only when a header is required).
    #[error("no PROXY protocol signature")]
    NotProxy,
    /// A v1 header that is malformed (or longer than 107 bytes).
    #[error("malformed PROXY v1 header: {0}")]
    V1(&'static str),
    /// A v2 header that is malformed.
    #[error("malformed PROXY v2 header: {0}")]
    V2(&'static str),
}

impl ParseError {
    /// The version the bytes claimed to be.
    pub fn version(&self) -> Option<Version> {
        match self {
            Self::NotProxy => None,
            Self::V1(_) => Some(Version::V1),
            Self::V2(_) => Some(Version::V2),
        }
    }
}

/// Parse the start of a connection. `NeedMore` while the bytes are a proper prefix of a
/// possible header; `Err(NotProxy)` as soon as they cannot start either signature.
pub fn parse(data: &[u8]) -> Peeked<Result<Header, ParseError>> {
    let n = data.len().min(V2_SIG.len());
    if data[..n] == V2_SIG[..n] {
        return if n < V2_SIG.len() {
            Peeked::NeedMore
        } else {
            parse_v2(data)
        };
    }
    let n = data.len().min(V1_SIG.len());
    if data[..n] == V1_SIG[..n] {
        return if n < V1_SIG.len() {
            Peeked::NeedMore
        } else {
            parse_v1(data)
        };
    }
    Peeked::Done(Err(ParseError::NotProxy))
}

fn parse_v1(data: &[u8]) -> Peeked<Result<Header, ParseError>> {
    let window = &data[..data.len().min(V1_MAX)];
    // The line ends at the first CR or LF: a bare LF is an error whatever follows it, so a
    // prefix and the whole input are decided the same way.
    let Some(cr) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if data.len() >= V1_MAX {
            Peeked::Done(Err(ParseError::V1("longer than 107 bytes")))
        } else {
            Peeked::NeedMore
        };
    };
    if window[cr] == b'\n' {
        return Peeked::Done(Err(ParseError::V1("line ends without CR")));
    }
    match window.get(cr + 1) {
        None if data.len() < V1_MAX => return Peeked::NeedMore,
        Some(b'\n') => {}
        _ => return Peeked::Done(Err(ParseError::V1("CR not followed by LF"))),
    }
    let len = cr + 2;
    Peeked::Done(v1_line(&data[V1_SIG.len()..cr]).map(|addrs| Header {
        version: Version::V1,
        len,
        addrs,
    }))
}

fn v1_line(line: &[u8]) -> Result<Option<(SocketAddr, SocketAddr)>, ParseError> {
    let line = std::str::from_utf8(line).map_err(|_| ParseError::V1("not ASCII"))?;
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        return Ok(None);
    }
    let mut it = line.split(' ');
    let proto = it.next().unwrap_or_default();
    let (src, dst, sp, dp) = match (it.next(), it.next(), it.next(), it.next(), it.next()) {
        (Some(a), Some(b), Some(c), Some(d), None) => (a, b, c, d),
        _ => return Err(ParseError::V1("expected 5 space-separated fields")),
    };
    let ip = |s: &str| -> Result<IpAddr, ParseError> {
        match proto {
            "TCP4" => s
                .parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| ParseError::V1("bad IPv4 address")),
            "TCP6" => s
                .parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| ParseError::V1("bad IPv6 address")),
            _ => Err(ParseError::V1("unknown protocol (TCP4, TCP6 or UNKNOWN)")),
        }
    };
    let (src, dst) = (ip(src)?, ip(dst)?);
    Ok(Some((
        SocketAddr::new(src, v1_port(sp)?),
        SocketAddr::new(dst, v1_port(dp)?),
    )))
}

fn v1_port(s: &str) -> Result<u16, ParseError> {
    let ok = !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    if !ok {
        return Err(ParseError::V1("bad port"));
    }
    s.parse().map_err(|_| ParseError::V1("port out of range"))
}

fn parse_v2(data: &[u8]) -> Peeked<Result<Header, ParseError>> {
    if data.len() < V2_HEADER {
        return Peeked::NeedMore;
    }
    let ver_cmd = data[12];
    let fam = data[13];
    let len = usize::from(u16::from_be_bytes([data[14], data[15]]));
    if ver_cmd >> 4 != 2 {
        return Peeked::Done(Err(ParseError::V2("version is not 2")));
    }
    let cmd = ver_cmd & 0x0f;
    if cmd > 1 {
        return Peeked::Done(Err(ParseError::V2("unknown command")));
    }
    let total = V2_HEADER + len;
    if data.len() < total {
        return Peeked::NeedMore;
    }
    let body = &data[V2_HEADER..total];
    let header = |addrs| {
        Peeked::Done(Ok(Header {
            version: Version::V2,
            len: total,
            addrs,
        }))
    };
    // LOCAL: health checks of the balancer itself; the real addresses stay.
    if cmd == 0 {
        return header(None);
    }
    let transport = fam & 0x0f;
    if transport != 1 && transport != 2 {
        return Peeked::Done(Err(ParseError::V2("unsupported transport")));
    }
    let addrs = match fam >> 4 {
        1 => {
            if body.len() < 12 {
                return Peeked::Done(Err(ParseError::V2("AF_INET addresses truncated")));
            }
            let ip = |o: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    body[o],
                    body[o + 1],
                    body[o + 2],
                    body[o + 3],
                ))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            (
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            )
        }
        2 => {
            if body.len() < 36 {
                return Peeked::Done(Err(ParseError::V2("AF_INET6 addresses truncated")));
            }
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&body[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            (
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            )
        }
        _ => return Peeked::Done(Err(ParseError::V2("unsupported address family"))),
    };
    header(Some(addrs))
}

/// The TLVs of a complete v2 header (`data` starting at the signature): `(type, value)` in
/// order; stops at the first TLV that does not fit (the rest is ignored, as it is skipped).
pub fn tlvs(data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let body = if data.len() >= V2_HEADER && data[..12] == V2_SIG[..] {
        let len = usize::from(u16::from_be_bytes([data[14], data[15]]));
        let end = (V2_HEADER + len).min(data.len());
        let skip = match data[13] >> 4 {
            1 => 12,
            2 => 36,
            3 => 216,
            _ => 0,
        };
        data.get(V2_HEADER + skip..end).unwrap_or_default()
    } else {
        &[][..]
    };
    let mut rest = body;
    std::iter::from_fn(move || {
        if rest.len() < 3 {
            return None;
        }
        let t = rest[0];
        let l = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        let v = rest.get(3..3 + l)?;
        rest = &rest[3 + l..];
        Some((t, v))
    })
}

/// The translated filter config.
#[derive(Debug)]
pub struct ProxyProtocolConfig {
    /// `allow_requests_without_proxy_protocol`.
    pub allow_without: bool,
    /// `disallowed_versions`.
    pub disallow_v1: bool,
    /// `disallowed_versions`.
    pub disallow_v2: bool,
    /// Stats.
    pub stats: ProxyProtoStats,
}

/// Per-version stats.
#[derive(Debug)]
pub struct VersionStats {
    /// `found`.
    pub found: Counter,
    /// `disallowed`.
    pub disallowed: Counter,
    /// `error`.
    pub error: Counter,
}

/// `proxy_proto.*` stats.
#[derive(Debug)]
pub struct ProxyProtoStats {
    /// `not_found_disallowed`.
    pub not_found_disallowed: Counter,
    /// `not_found_allowed`.
    pub not_found_allowed: Counter,
    /// `versions.v1.*`.
    pub v1: VersionStats,
    /// `versions.v2.*`.
    pub v2: VersionStats,
    /// The legacy root `downstream_cx_proxy_proto_error`.
    pub downstream_cx_proxy_proto_error: Counter,
}

impl ProxyProtoStats {
    /// Register under `proxy_proto.[<stat_prefix>.]`.
    pub fn new(store: &std::sync::Arc<crate::stats::Store>, stat_prefix: &str) -> Self {
        let s = if stat_prefix.is_empty() {
            store.plain("proxy_proto")
        } else {
            store.plain("proxy_proto").child(stat_prefix)
        };
        let v = |name: &str| {
            let c = s.child("versions").child(name);
            VersionStats {
                found: c.counter("found"),
                disallowed: c.counter("disallowed"),
                error: c.counter("error"),
            }
        };
        Self {
            not_found_disallowed: s.counter("not_found_disallowed"),
            not_found_allowed: s.counter("not_found_allowed"),
            v1: v("v1"),
            v2: v("v2"),
            // Root-level (no prefix) as in Envoy.
            downstream_cx_proxy_proto_error: store
                .tagged("", "envoy_", "envoy_listener_filter", "proxy_protocol")
                .counter("downstream_cx_proxy_proto_error"),
        }
    }

    fn version(&self, v: Version) -> &VersionStats {
        match v {
            Version::V1 => &self.v1,
            Version::V2 => &self.v2,
        }
    }
}

/// Why the filter closes the connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyProtoError {
    /// Invalid or missing header.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A version `disallowed_versions` lists.
    #[error("PROXY protocol {0:?} is disallowed")]
    Disallowed(Version),
    /// Peeking or consuming failed.
    #[error(transparent)]
    Peek(#[from] PeekError),
}

/// Run the filter on a new connection: `Ok(Some(header))` when one was consumed,
/// `Ok(None)` when there was none and that is allowed. Counts its stats. No deadline here.
pub(crate) async fn read_header(
    stream: &mut TcpStream,
    cfg: &ProxyProtocolConfig,
) -> Result<Option<Header>, ProxyProtoError> {
    let stats = &cfg.stats;
    let r = peek_until(stream, V2_HEADER + usize::from(u16::MAX), parse, |_| {
        Err(ParseError::V2("longer than the peek bound"))
    })
    .await;
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            stats.downstream_cx_proxy_proto_error.increment(1);
            return Err(e.into());
        }
    };
    let h = match r {
        Ok(h) => h,
        Err(ParseError::NotProxy) if cfg.allow_without => {
            stats.not_found_allowed.increment(1);
            return Ok(None);
        }
        Err(e) => {
            match e.version() {
                Some(v) => stats.version(v).error.increment(1),
                None => stats.not_found_disallowed.increment(1),
            }
            stats.downstream_cx_proxy_proto_error.increment(1);
            return Err(e.into());
        }
    };
    let disallowed = match h.version {
        Version::V1 => cfg.disallow_v1,
        Version::V2 => cfg.disallow_v2,
    };
    if disallowed {
        stats.version(h.version).disallowed.increment(1);
        stats.downstream_cx_proxy_proto_error.increment(1);
        return Err(ProxyProtoError::Disallowed(h.version));
    }
    // Consume exactly the header (it is all in the socket buffer already).
    let mut left = h.len;
    let mut sink = [0u8; 512];
    while left > 0 {
        let k = left.min(sink.len());
        match stream.read(&mut sink[..k]).await {
            Ok(0) => {
                stats.downstream_cx_proxy_proto_error.increment(1);
                return Err(PeekError::Closed.into());
            }
            Ok(n) => left -= n,
            Err(e) => {
                stats.downstream_cx_proxy_proto_error.increment(1);
                return Err(PeekError::Io(e).into());
            }
        }
    }
    stats.version(h.version).found.increment(1);
    Ok(Some(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(d: &[u8]) -> Result<Header, ParseError> {
        match parse(d) {
            Peeked::Done(r) => r,
            Peeked::NeedMore => panic!("undecided on {d:?}"),
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    /// A v2 header: command, family byte, address block, TLVs.
    pub(crate) fn v2(cmd: u8, fam: u8, addrs: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut v = V2_SIG.to_vec();
        v.push(0x20 | cmd);
        v.push(fam);
        let len = (addrs.len() + tlvs.len()) as u16;
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(addrs);
        v.extend_from_slice(tlvs);
        v
    }

    fn inet4() -> Vec<u8> {
        let mut a = vec![192, 0, 2, 1, 10, 0, 0, 1];
        a.extend_from_slice(&51000u16.to_be_bytes());
        a.extend_from_slice(&443u16.to_be_bytes());
        a
    }

    #[test]
    fn a_bare_lf_is_decided_before_any_later_cr() {
        // Found by the proxy_protocol fuzz target: an LF before the first CR.
        let full = b"PROXY TCP4 1\nQUIT 2\r9";
        let want = Peeked::Done(Err(ParseError::V1("line ends without CR")));
        assert_eq!(parse(full), want);
        for cut in 14..full.len() {
            assert_eq!(parse(&full[..cut]), want, "prefix {cut}");
        }
    }

    #[test]
    fn v1_tcp4_tcp6_unknown() {
        let h = done(b"PROXY TCP4 192.0.2.1 10.0.0.1 51000 443\r\nGET / HTTP/1.1\r\n").expect("ok");
        assert_eq!(h.version, Version::V1);
        assert_eq!(h.len, "PROXY TCP4 192.0.2.1 10.0.0.1 51000 443\r\n".len());
        assert_eq!(h.addrs, Some((sa("192.0.2.1:51000"), sa("10.0.0.1:443"))));
        let h = done(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n").expect("ok");
        assert_eq!(h.addrs, Some((sa("[2001:db8::1]:1"), sa("[::1]:65535"))));
        for u in [
            &b"PROXY UNKNOWN\r\n"[..],
            b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
        ] {
            let h = done(u).expect("ok");
            assert_eq!((h.addrs, h.len), (None, u.len()));
        }
        // The longest legal header (107 bytes) parses.
        let max = format!(
            "PROXY UNKNOWN {a} {a} 65535 65535\r\n",
            a = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
        assert_eq!(max.len(), V1_MAX);
        assert_eq!(done(max.as_bytes()).expect("ok").len, V1_MAX);
        let tcp6 = max.replace("UNKNOWN", "TCP6");
        let h = done(tcp6.as_bytes()).expect("ok");
        assert_eq!(h.len, V1_MAX - 3);
        assert!(h.addrs.is_some());
    }

    #[test]
    fn v1_malformed() {
        for bad in [
            &b"PROXY TCP4 192.0.2.1 10.0.0.1 51000 443\n"[..],
            b"PROXY TCP4 192.0.2.1 10.0.0.1 51000 443\rX",
            b"PROXY TCP4  192.0.2.1 10.0.0.1 51000 443\r\n",
            b"PROXY TCP4 192.0.2.1 10.0.0.1 51000\r\n",
            b"PROXY TCP4 192.0.2.1 10.0.0.1 51000 443 1\r\n",
            b"PROXY TCP4 ::1 10.0.0.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n",
            b"PROXY TCP4 192.0.2.01 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 10.0.0.1 65536 2\r\n",
            b"PROXY TCP4 192.0.2.1 10.0.0.1 +1 2\r\n",
            b"PROXY TCP4 192.0.2.1 10.0.0.1 01 2\r\n",
            b"PROXY TCP4 192.0.2.1 10.0.0.1 1 \r\n",
            b"PROXY UDP4 192.0.2.1 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 10.0.0.1 1 2\xff\r\n",
            b"PROXY \r\n",
            b"PROXY UNKNOWNX\r\n",
        ] {
            let e = done(bad).expect_err(&String::from_utf8_lossy(bad));
            assert_eq!(e.version(), Some(Version::V1), "{e}");
        }
        // Longer than 107 bytes without CRLF: refused at the bound, not later.
        let long = format!("PROXY UNKNOWN {}", "a".repeat(200));
        assert!(matches!(
            parse(&long.as_bytes()[..V1_MAX]),
            Peeked::Done(Err(ParseError::V1(_)))
        ));
        assert!(matches!(
            parse(&long.as_bytes()[..V1_MAX - 1]),
            Peeked::NeedMore
        ));
        // CR as the 107th byte: the LF would be the 108th.
        let mut at = format!("PROXY UNKNOWN {}", "a".repeat(V1_MAX - 15)).into_bytes();
        at.push(b'\r');
        assert_eq!(at.len(), V1_MAX);
        assert!(matches!(parse(&at), Peeked::Done(Err(ParseError::V1(_)))));
    }

    #[test]
    fn v2_inet_inet6_local_and_tlvs() {
        let tlv = [0x04, 0x00, 0x02, 0xaa, 0xbb, 0x01, 0x00, 0x00];
        let d = v2(1, 0x11, &inet4(), &tlv);
        let mut with_data = d.clone();
        with_data.extend_from_slice(b"GET /");
        let h = done(&with_data).expect("ok");
        assert_eq!(h.version, Version::V2);
        assert_eq!(h.len, d.len());
        assert_eq!(h.addrs, Some((sa("192.0.2.1:51000"), sa("10.0.0.1:443"))));
        let t: Vec<_> = tlvs(&d).collect();
        assert_eq!(t, vec![(0x04, &[0xaa, 0xbb][..]), (0x01, &[][..])]);

        let mut a6 = Vec::new();
        a6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().expect("ip").octets());
        a6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        a6.extend_from_slice(&[0, 80, 1, 187]);
        let h = done(&v2(1, 0x21, &a6, &[])).expect("ok");
        assert_eq!(h.addrs, Some((sa("[2001:db8::1]:80"), sa("[::1]:443"))));
        // UDP over INET is accepted too (addresses only).
        assert!(
            done(&v2(1, 0x12, &inet4(), &[]))
                .expect("ok")
                .addrs
                .is_some()
        );
        // LOCAL: any family, addresses ignored.
        let h = done(&v2(0, 0x00, &[], &[])).expect("ok");
        assert_eq!((h.addrs, h.len), (None, 16));
        let h = done(&v2(0, 0x11, &inet4(), &[])).expect("ok");
        assert_eq!((h.addrs, h.len), (None, 28));
        // A TLV that does not fit ends the walk; it is not an error.
        let d = v2(1, 0x11, &inet4(), &[0x04, 0x00, 0x09, 0x01]);
        assert!(done(&d).is_ok());
        assert_eq!(tlvs(&d).count(), 0);
    }

    #[test]
    fn v2_malformed() {
        let mut bad_ver = v2(1, 0x11, &inet4(), &[]);
        bad_ver[12] = 0x11;
        let mut bad_cmd = v2(1, 0x11, &inet4(), &[]);
        bad_cmd[12] = 0x22;
        for bad in [
            bad_ver,
            bad_cmd,
            v2(1, 0x11, &inet4()[..11], &[]),
            v2(1, 0x21, &inet4(), &[]),
            v2(1, 0x00, &[], &[]),
            v2(1, 0x31, &[0; 216], &[]),
            v2(1, 0x10, &inet4(), &[]),
            v2(1, 0x13, &inet4(), &[]),
        ] {
            let e = done(&bad).expect_err("malformed");
            assert_eq!(e.version(), Some(Version::V2), "{e}");
        }
    }

    #[test]
    fn prefixes_need_more_and_others_are_not_proxy() {
        let v1 = b"PROXY TCP4 192.0.2.1 10.0.0.1 51000 443\r\n";
        let v2h = v2(1, 0x11, &inet4(), &[1, 0, 1, 7]);
        for full in [&v1[..], &v2h[..]] {
            for k in 1..full.len() {
                assert!(matches!(parse(&full[..k]), Peeked::NeedMore), "{k}");
            }
            assert!(matches!(parse(full), Peeked::Done(Ok(_))));
        }
        for other in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"\x16\x03\x01",
            b"PROXX",
            b"\r\n\r\n\x01",
        ] {
            assert_eq!(done(other), Err(ParseError::NotProxy));
        }
    }

    /// Every input either needs more (then it is a proper prefix of something under the
    /// bounds) or is decided, and a decided header never claims more bytes than it saw.
    #[test]
    fn decisions_are_bounded() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let starts: [&[u8]; 3] = [b"PROXY ", V2_SIG, b""];
        for i in 0..20_000 {
            let mut d = starts[i % 3].to_vec();
            let n = (next() % 140) as usize;
            d.extend((0..n).map(|_| {
                let r = next();
                // Bias towards the header alphabet.
                b"TCP46UNKOW 0123456789.:abcdef\r\n\x00\x11\x21"[(r % 33) as usize]
            }));
            match parse(&d) {
                Peeked::NeedMore => assert!(d.len() < V2_HEADER + 65535),
                Peeked::Done(Ok(h)) => assert!(h.len <= d.len()),
                Peeked::Done(Err(_)) => {}
            }
        }
    }
}
