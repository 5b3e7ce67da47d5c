//! Request validation and sanitation, before any routing decision:
//! - HTTP/1 framing ambiguities that enable request smuggling are refused (400 + close);
//! - paths are normalized the way the route table and the upstream will both see them;
//! - hop-by-hop headers go, `x-forwarded-*`, `x-request-id` and `x-envoy-*` are handled as
//!   Envoy does for `use_remote_address` / `xff_num_trusted_hops`.

use std::net::{IpAddr, SocketAddr};

use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Version};

use crate::config::hcm::{EscapedSlashes, HcmConfig, UnderscoresAction};

/// `x-request-id`, parsed once (looked up on every request).
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Why a request is refused before routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// 400 with this detail (connection closed on HTTP/1).
    BadRequest(&'static str),
    /// 431: too many headers.
    TooManyHeaders,
    /// 307 to this path (escaped slashes, UNESCAPE_AND_REDIRECT).
    Redirect(String),
}

/// HTTP/1 framing checks (hyper parsed the message; these close the ambiguities it tolerates).
/// CONNECT is not refused here: the connection manager decides it (`upgrade_configs`); the
/// method parameter is kept for callers (fuzz target) and future method-specific checks.
pub fn check_framing(
    version: Version,
    _method: &Method,
    headers: &HeaderMap,
) -> Result<(), Reject> {
    if version >= Version::HTTP_2 {
        return Ok(());
    }
    let mut cl: Option<&[u8]> = None;
    for v in headers.get_all(CONTENT_LENGTH) {
        let b = v.as_bytes();
        if b.is_empty() || !b.iter().all(u8::is_ascii_digit) || b.len() > 19 {
            return Err(Reject::BadRequest("invalid content-length"));
        }
        match cl {
            Some(prev) if prev != b => {
                return Err(Reject::BadRequest("conflicting content-length"));
            }
            _ => cl = Some(b),
        }
    }
    let mut te = headers.get_all(TRANSFER_ENCODING).iter().peekable();
    if te.peek().is_some() {
        if cl.is_some() {
            return Err(Reject::BadRequest("content-length with transfer-encoding"));
        }
        if version == Version::HTTP_10 {
            return Err(Reject::BadRequest("transfer-encoding on HTTP/1.0"));
        }
        let n = headers.get_all(TRANSFER_ENCODING).iter().count();
        let v = headers
            .get(TRANSFER_ENCODING)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if n != 1 || !v.eq_ignore_ascii_case(b"chunked") {
            return Err(Reject::BadRequest("unsupported transfer-encoding"));
        }
    }
    let hosts = headers.get_all(HOST).iter().count();
    if hosts > 1 {
        return Err(Reject::BadRequest("duplicate host"));
    }
    if hosts == 0 && version == Version::HTTP_11 {
        return Err(Reject::BadRequest("missing host"));
    }
    Ok(())
}

/// Header-count and header-name checks that apply to every protocol.
pub fn check_headers(cfg: &HcmConfig, headers: &mut HeaderMap) -> Result<(), Reject> {
    if headers.len() > cfg.max_headers_count {
        return Err(Reject::TooManyHeaders);
    }
    // The decoded size (HPACK repeats and split cookies count in full), as Envoy measures it.
    // hyper's HTTP/1 read buffer bound is only approximate, so this is the authoritative check.
    let size: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if size > cfg.max_request_headers_bytes {
        return Err(Reject::TooManyHeaders);
    }
    if cfg.headers_with_underscores != UnderscoresAction::Allow {
        let bad: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().contains('_'))
            .cloned()
            .collect();
        if !bad.is_empty() {
            if cfg.headers_with_underscores == UnderscoresAction::Reject {
                return Err(Reject::BadRequest("header name with underscore"));
            }
            for k in bad {
                headers.remove(k);
            }
        }
    }
    Ok(())
}

/// Normalize the path part of `path_and_query` per the HCM settings. Returns the new
/// path-and-query (unchanged if nothing applies).
pub fn normalize(cfg: &HcmConfig, method: &Method, path_and_query: &str) -> Result<String, Reject> {
    let (path, query) = match path_and_query.find('?') {
        Some(i) => (&path_and_query[..i], &path_and_query[i..]),
        None => (path_and_query, ""),
    };
    if path == "*" && method == Method::OPTIONS {
        return Ok(path_and_query.to_string());
    }
    if !path.starts_with('/') {
        return Err(Reject::BadRequest("path must start with /"));
    }
    let mut p = std::borrow::Cow::Borrowed(path);
    if has_escaped_slash(&p) {
        match cfg.escaped_slashes {
            EscapedSlashes::Keep => {}
            EscapedSlashes::Reject => return Err(Reject::BadRequest("escaped slash in path")),
            EscapedSlashes::UnescapeAndForward => p = unescape_slashes(&p).into(),
            EscapedSlashes::UnescapeAndRedirect => {
                return Err(Reject::Redirect(format!("{}{query}", unescape_slashes(&p))));
            }
        }
    }
    if cfg.normalize_path {
        p = normalize_rfc3986(&p)?.into();
    }
    if cfg.merge_slashes && p.contains("//") {
        let mut out = String::with_capacity(p.len());
        let mut prev = '\0';
        for c in p.chars() {
            if !(c == '/' && prev == '/') {
                out.push(c);
            }
            prev = c;
        }
        p = out.into();
    }
    Ok(format!("{p}{query}"))
}

fn has_escaped_slash(p: &str) -> bool {
    let b = p.as_bytes();
    b.windows(3).any(|w| {
        w[0] == b'%'
            && (w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'f')
                || w[1] == b'5' && w[2].eq_ignore_ascii_case(&b'c'))
    })
}

fn unescape_slashes(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    let b = p.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let h = &b[i + 1..i + 3];
            if h[0] == b'2' && h[1].eq_ignore_ascii_case(&b'f') {
                out.push('/');
                i += 3;
                continue;
            }
            if h[0] == b'5' && h[1].eq_ignore_ascii_case(&b'c') {
                out.push('\\');
                i += 3;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// RFC 3986 normalization as Envoy applies it: decode percent-encoded unreserved characters,
/// uppercase the remaining escapes, turn `\` into `/`, remove dot segments.
pub fn normalize_rfc3986(path: &str) -> Result<String, Reject> {
    let b = path.as_bytes();
    // Works on bytes: only ASCII is ever decoded, and non-ASCII bytes are percent-encoded, so
    // the result is ASCII (and normalizing it again changes nothing).
    let mut dec = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let (Some(h), Some(l)) = (b.get(i + 1).and_then(hex), b.get(i + 2).and_then(hex))
            else {
                return Err(Reject::BadRequest("invalid percent-encoding in path"));
            };
            let v = h * 16 + l;
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                dec.push(v as char);
            } else {
                dec.push_str(&format!("%{v:02X}"));
            }
            i += 3;
            continue;
        }
        if c < 0x21 || c == 0x7f {
            return Err(Reject::BadRequest("invalid character in path"));
        }
        if c >= 0x80 {
            dec.push_str(&format!("%{c:02X}"));
        } else {
            dec.push(if c == b'\\' { '/' } else { c as char });
        }
        i += 1;
    }
    // remove_dot_segments (RFC 3986 5.2.4) over '/'-separated segments.
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = dec.split('/').collect();
    let last = segs.len() - 1;
    for (idx, seg) in segs.iter().enumerate().skip(1) {
        match *seg {
            "." => {
                if idx == last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if idx == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    Ok(format!("/{}", out.join("/")))
}

fn hex(c: &u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Hop-by-hop headers (RFC 9110 7.6.1 plus the usual non-standard ones) and the ones
/// `Connection` nominates. `keep_upgrade` keeps `upgrade`/`connection: upgrade` for a
/// WebSocket request being proxied; `te: trailers` is always kept (gRPC needs it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let nominated: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == UPGRADE))
        .collect();
    for n in nominated {
        if n != TE {
            headers.remove(&n);
        }
    }
    for n in ["keep-alive", "proxy-connection", "transfer-encoding"] {
        headers.remove(n);
    }
    if keep_upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(CONNECTION);
        headers.remove(UPGRADE);
    }
    let te_trailers = headers.get_all(TE).iter().any(|v| {
        v.to_str()
            .map(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
            .unwrap_or(false)
    });
    headers.remove(TE);
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
}

/// Envoy's internal-address rule: loopback, RFC 1918, unique-local (fc00::/7), link-local.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            v6.is_loopback()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// The internal-only `x-envoy-*` request headers stripped from external requests.
const INTERNAL_ONLY: &[&str] = &[
    "x-envoy-decorator-operation",
    "x-envoy-downstream-service-cluster",
    "x-envoy-downstream-service-node",
    "x-envoy-expected-rq-timeout-ms",
    "x-envoy-external-address",
    "x-envoy-force-trace",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-internal",
    "x-envoy-ip-tags",
    "x-envoy-max-retries",
    "x-envoy-original-path",
    "x-envoy-retriable-header-names",
    "x-envoy-retriable-status-codes",
    "x-envoy-retry-grpc-on",
    "x-envoy-retry-on",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-upstream-rq-timeout-alt-response",
    "x-envoy-upstream-rq-timeout-ms",
];

/// Outcome of forwarding-header processing.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded {
    /// The address treated as the client (peer, or from XFF per trusted hops).
    pub remote: IpAddr,
    /// Whether the request counts as internal.
    pub internal: bool,
}

/// Apply Envoy's `x-forwarded-for` / `x-forwarded-proto` / `x-envoy-*` / `x-request-id`
/// handling. `scheme` is the downstream scheme.
pub fn forwarded_headers(
    cfg: &HcmConfig,
    headers: &mut HeaderMap,
    peer: SocketAddr,
    scheme: &'static str,
) -> Forwarded {
    let xff: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let hops = cfg.xff_num_trusted_hops as usize;
    let fwd = if cfg.use_remote_address {
        let remote = if hops == 0 {
            peer.ip()
        } else {
            xff.iter().rev().nth(hops - 1).copied().unwrap_or(peer.ip())
        };
        if !cfg.skip_xff_append {
            let v = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                Some(prev) => format!("{prev}, {}", peer.ip()),
                None => peer.ip().to_string(),
            };
            headers.remove("x-forwarded-for");
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert("x-forwarded-for", v);
            }
        }
        headers.insert("x-forwarded-proto", HeaderValue::from_static(scheme));
        Forwarded {
            remote,
            internal: is_internal(remote) && xff.len() <= hops,
        }
    } else {
        let remote = xff.iter().rev().nth(hops).copied().unwrap_or(peer.ip());
        if !headers.contains_key("x-forwarded-proto") {
            headers.insert("x-forwarded-proto", HeaderValue::from_static(scheme));
        }
        Forwarded {
            remote,
            internal: xff.len() == 1 + hops && is_internal(remote)
                || xff.is_empty() && is_internal(peer.ip()),
        }
    };
    if !fwd.internal {
        for h in INTERNAL_ONLY {
            headers.remove(*h);
        }
        if cfg.use_remote_address
            && let Ok(v) = HeaderValue::from_str(&fwd.remote.to_string())
        {
            headers.insert("x-envoy-external-address", v);
        }
    } else {
        headers.insert("x-envoy-internal", HeaderValue::from_static("true"));
    }
    let edge_regenerate =
        cfg.use_remote_address && !fwd.internal && !cfg.preserve_external_request_id;
    if cfg.generate_request_id && (edge_regenerate || !headers.contains_key(X_REQUEST_ID)) {
        // A v4 UUID from the thread-local fast RNG (uuid's `fast-rng`), rendered on the stack.
        let id = uuid::Uuid::new_v4();
        let mut buf = uuid::Uuid::encode_buffer();
        if let Ok(v) = HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf)) {
            headers.insert(X_REQUEST_ID, v);
        }
    }
    fwd
}

// ---------------------------------------------------------------------------------------------
// x-forwarded-client-cert (TLS helper's block)

/// `forward_client_cert_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ForwardClientCert {
    /// `SANITIZE` (default): remove the header.
    #[default]
    Sanitize,
    /// `FORWARD_ONLY`: keep the header on mTLS connections, else remove it.
    ForwardOnly,
    /// `APPEND_FORWARD`: on mTLS connections append this hop's element, else remove.
    AppendForward,
    /// `SANITIZE_SET`: on mTLS connections replace the header with this hop's element,
    /// else remove.
    SanitizeSet,
    /// `ALWAYS_FORWARD_ONLY`: keep the header whatever the connection.
    AlwaysForwardOnly,
}

/// `set_current_client_cert_details` (what this hop's element carries besides `By` and
/// `Hash`), in Envoy's order: Subject, URI, Cert, DNS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XfccDetails {
    /// `subject`.
    pub subject: bool,
    /// `uri`.
    pub uri: bool,
    /// `cert`.
    pub cert: bool,
    /// `dns`.
    pub dns: bool,
}

/// The HCM's XFCC settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XfccConfig {
    /// `forward_client_cert_details`.
    pub mode: ForwardClientCert,
    /// `set_current_client_cert_details`.
    pub details: XfccDetails,
}

/// Characters Envoy keeps unescaped in the XFCC `Cert` value.
const XFCC_CERT_ESCAPE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// This hop's XFCC element for a client certificate (Envoy's format:
/// `By=<local URI SAN>;Hash=<sha256>;Subject="...";URI=...;Cert="...";DNS=...`).
pub fn xfcc_element(
    details: &XfccDetails,
    tls: &weir_filters::DownstreamTls,
    peer: &weir_filters::PeerCert,
) -> String {
    let mut parts: Vec<String> = tls
        .local_uri_sans
        .iter()
        .map(|u| format!("By={u}"))
        .collect();
    parts.push(format!("Hash={}", peer.sha256));
    if details.subject {
        parts.push(format!("Subject=\"{}\"", peer.subject.replace('"', "\\\"")));
    }
    if details.uri {
        parts.extend(peer.uri_sans.iter().map(|u| format!("URI={u}")));
    }
    if details.cert {
        parts.push(format!(
            "Cert=\"{}\"",
            percent_encoding::utf8_percent_encode(&peer.pem, XFCC_CERT_ESCAPE)
        ));
    }
    if details.dns {
        parts.extend(peer.dns_sans.iter().map(|d| format!("DNS={d}")));
    }
    parts.join(";")
}

/// Apply `forward_client_cert_details` to a request from a connection with `tls` facts.
pub fn client_cert_header(
    cfg: &XfccConfig,
    headers: &mut HeaderMap,
    tls: Option<&weir_filters::DownstreamTls>,
) {
    const XFCC: &str = "x-forwarded-client-cert";
    let mtls = tls
        .filter(|t| t.terminated)
        .and_then(|t| t.peer.as_ref().map(|p| (t, p)));
    match (cfg.mode, mtls) {
        (ForwardClientCert::AlwaysForwardOnly, _) | (ForwardClientCert::ForwardOnly, Some(_)) => {}
        (ForwardClientCert::AppendForward, Some((t, p))) => {
            let mine = xfcc_element(&cfg.details, t, p);
            let v = match headers.get(XFCC).and_then(|v| v.to_str().ok()) {
                Some(prev) if !prev.is_empty() => format!("{prev},{mine}"),
                _ => mine,
            };
            headers.remove(XFCC);
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert(XFCC, v);
            }
        }
        (ForwardClientCert::SanitizeSet, Some((t, p))) => {
            headers.remove(XFCC);
            if let Ok(v) = HeaderValue::from_str(&xfcc_element(&cfg.details, t, p)) {
                headers.insert(XFCC, v);
            }
        }
        _ => {
            headers.remove(XFCC);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        m
    }

    #[test]
    fn smuggling_shapes_rejected() {
        let g = Method::GET;
        let ok = |hs: &[(&str, &str)]| check_framing(Version::HTTP_11, &g, &h(hs));
        assert!(ok(&[("host", "a")]).is_ok());
        assert!(ok(&[("host", "a"), ("content-length", "5")]).is_ok());
        assert!(
            ok(&[
                ("host", "a"),
                ("content-length", "5"),
                ("content-length", "5")
            ])
            .is_ok()
        );
        assert!(
            ok(&[
                ("host", "a"),
                ("content-length", "5"),
                ("content-length", "6")
            ])
            .is_err()
        );
        assert!(ok(&[("host", "a"), ("content-length", "+5")]).is_err());
        assert!(ok(&[("host", "a"), ("content-length", "5,5")]).is_err());
        assert!(ok(&[("host", "a"), ("content-length", " 5")]).is_err());
        assert!(
            ok(&[
                ("host", "a"),
                ("content-length", "5"),
                ("transfer-encoding", "chunked")
            ])
            .is_err()
        );
        assert!(ok(&[("host", "a"), ("transfer-encoding", "chunked")]).is_ok());
        assert!(ok(&[("host", "a"), ("transfer-encoding", "xchunked")]).is_err());
        assert!(ok(&[("host", "a"), ("transfer-encoding", "chunked, identity")]).is_err());
        assert!(
            ok(&[
                ("host", "a"),
                ("transfer-encoding", "gzip"),
                ("transfer-encoding", "chunked")
            ])
            .is_err()
        );
        assert!(ok(&[]).is_err());
        assert!(ok(&[("host", "a"), ("host", "b")]).is_err());
        assert!(
            check_framing(
                Version::HTTP_10,
                &g,
                &h(&[("transfer-encoding", "chunked")])
            )
            .is_err()
        );
        assert!(check_framing(Version::HTTP_10, &g, &h(&[])).is_ok());
        assert!(check_framing(Version::HTTP_2, &g, &h(&[])).is_ok());
    }

    #[test]
    fn rfc3986() {
        let n = |p| normalize_rfc3986(p).expect("valid");
        assert_eq!(n("/a/./b/../c"), "/a/c");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/../../x"), "/x");
        assert_eq!(n("/%61%2e%2E/x"), "/a../x");
        assert_eq!(n("/%2e%2e/x"), "/x");
        assert_eq!(n("/a%2fb"), "/a%2Fb");
        assert_eq!(n("/a\\b"), "/a/b");
        assert_eq!(n("/"), "/");
        assert_eq!(n("/é"), "/%C3%A9");
        assert_eq!(n(&n("/é")), "/%C3%A9");
        assert!(normalize_rfc3986("/%zz").is_err());
        assert!(normalize_rfc3986("/%4").is_err());
    }

    #[test]
    fn slashes() {
        assert!(has_escaped_slash("/a%2Fb"));
        assert!(has_escaped_slash("/a%5cb"));
        assert!(!has_escaped_slash("/a%25b"));
        assert_eq!(unescape_slashes("/a%2fb%5Cc%"), "/a/b\\c%");
    }

    #[test]
    fn hop_by_hop() {
        let mut m = h(&[
            ("connection", "keep-alive, x-foo"),
            ("x-foo", "1"),
            ("keep-alive", "5"),
            ("te", "trailers, deflate"),
            ("upgrade", "websocket"),
            ("x-bar", "2"),
        ]);
        strip_hop_by_hop(&mut m, false);
        assert_eq!(m.len(), 2);
        assert_eq!(m["te"], "trailers");
        assert_eq!(m["x-bar"], "2");
        let mut m = h(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut m, true);
        assert_eq!(m["upgrade"], "websocket");
        assert_eq!(m["connection"], "upgrade");
    }

    #[test]
    fn internal_addresses() {
        assert!(is_internal("127.0.0.1".parse().expect("ip")));
        assert!(is_internal("10.1.2.3".parse().expect("ip")));
        assert!(is_internal("::1".parse().expect("ip")));
        assert!(is_internal("fd00::1".parse().expect("ip")));
        assert!(!is_internal("8.8.8.8".parse().expect("ip")));
        assert!(!is_internal("2001:db8::1".parse().expect("ip")));
    }

    // ---- x-forwarded-client-cert ----

    fn mtls() -> weir_filters::DownstreamTls {
        weir_filters::DownstreamTls {
            terminated: true,
            local_uri_sans: vec!["spiffe://td/ns/a/sa/server".into()],
            peer: Some(weir_filters::PeerCert {
                uri_sans: vec!["spiffe://td/ns/b/sa/client".into()],
                dns_sans: vec!["client.test".into()],
                subject: "CN=client".into(),
                serial: "01".into(),
                sha256: "ab".repeat(32),
                pem: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into(),
            }),
            ..Default::default()
        }
    }

    fn xfcc(
        mode: ForwardClientCert,
        details: XfccDetails,
        tls: Option<&weir_filters::DownstreamTls>,
        incoming: Option<&str>,
    ) -> Option<String> {
        let mut h = HeaderMap::new();
        if let Some(v) = incoming {
            h.insert(
                "x-forwarded-client-cert",
                HeaderValue::from_str(v).expect("v"),
            );
        }
        client_cert_header(&XfccConfig { mode, details }, &mut h, tls);
        h.get("x-forwarded-client-cert")
            .map(|v| v.to_str().expect("ascii").to_string())
    }

    #[test]
    fn xfcc_element_format() {
        let t = mtls();
        let all = XfccDetails {
            subject: true,
            uri: true,
            cert: true,
            dns: true,
        };
        let e = xfcc_element(&all, &t, t.peer.as_ref().expect("peer"));
        assert_eq!(
            e,
            format!(
                "By=spiffe://td/ns/a/sa/server;Hash={};Subject=\"CN=client\";URI=spiffe://td/ns/b/sa/client;\
                 Cert=\"-----BEGIN%20CERTIFICATE-----%0AAA%3D%3D%0A-----END%20CERTIFICATE-----%0A\";DNS=client.test",
                "ab".repeat(32)
            )
        );
        let none = xfcc_element(&XfccDetails::default(), &t, t.peer.as_ref().expect("peer"));
        assert_eq!(
            none,
            format!("By=spiffe://td/ns/a/sa/server;Hash={}", "ab".repeat(32))
        );
    }

    #[test]
    fn xfcc_modes() {
        use ForwardClientCert::*;
        let t = mtls();
        let plain = weir_filters::DownstreamTls {
            terminated: true,
            ..Default::default()
        };
        let uri = XfccDetails {
            uri: true,
            ..Default::default()
        };
        let mine = format!(
            "By=spiffe://td/ns/a/sa/server;Hash={};URI=spiffe://td/ns/b/sa/client",
            "ab".repeat(32)
        );
        // SANITIZE always removes.
        assert_eq!(xfcc(Sanitize, uri, Some(&t), Some("By=x")), None);
        // FORWARD_ONLY keeps it on mTLS only.
        assert_eq!(
            xfcc(ForwardOnly, uri, Some(&t), Some("By=x")).as_deref(),
            Some("By=x")
        );
        assert_eq!(xfcc(ForwardOnly, uri, Some(&plain), Some("By=x")), None);
        assert_eq!(xfcc(ForwardOnly, uri, None, Some("By=x")), None);
        // APPEND_FORWARD appends this hop.
        assert_eq!(
            xfcc(AppendForward, uri, Some(&t), Some("By=x")),
            Some(format!("By=x,{mine}"))
        );
        assert_eq!(xfcc(AppendForward, uri, Some(&t), None), Some(mine.clone()));
        assert_eq!(xfcc(AppendForward, uri, None, Some("By=x")), None);
        // SANITIZE_SET replaces.
        assert_eq!(xfcc(SanitizeSet, uri, Some(&t), Some("By=x")), Some(mine));
        assert_eq!(xfcc(SanitizeSet, uri, Some(&plain), Some("By=x")), None);
        // ALWAYS_FORWARD_ONLY keeps whatever came.
        assert_eq!(
            xfcc(AlwaysForwardOnly, uri, None, Some("By=x")).as_deref(),
            Some("By=x")
        );
        // Passthrough (not terminated) is not mTLS.
        let pass = weir_filters::DownstreamTls {
            terminated: false,
            ..mtls()
        };
        assert_eq!(xfcc(AppendForward, uri, Some(&pass), Some("By=x")), None);
    }
}
