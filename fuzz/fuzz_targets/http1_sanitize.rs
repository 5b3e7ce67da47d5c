//! HTTP/1 request sanitation: `normalize_rfc3986` on the path, `check_framing` on headers.
//!
//! Input format (lines separated by `\n`):
//! - line 0: the path given to `normalize_rfc3986`;
//! - line 1: `<version> <method>`, version one of `0`/`1`/`2` (HTTP/1.0, 1.1, 2), anything
//!   else is HTTP/1.1; an invalid method becomes GET;
//! - further lines: `name: value` headers (invalid names/values are skipped).
//!
//! Properties: never panics; a successful normalization starts with `/`, has no `.` or `..`
//! segments left, and normalizing it again changes nothing.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, Method, Version};
use libfuzzer_sys::fuzz_target;
use weir_proxy::http::sanitize::{check_framing, normalize_rfc3986};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let path = lines.next().unwrap_or_default();
    check_normalize(path);

    let (version, method) = match lines.next() {
        Some(l) => {
            let (v, m) = l.split_once(' ').unwrap_or((l, "GET"));
            let version = match v {
                "0" => Version::HTTP_10,
                "2" => Version::HTTP_2,
                _ => Version::HTTP_11,
            };
            (
                version,
                Method::from_bytes(m.as_bytes()).unwrap_or(Method::GET),
            )
        }
        None => (Version::HTTP_11, Method::GET),
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value.trim_start().as_bytes()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    let _ = check_framing(version, &method, &headers);
});

fn check_normalize(path: &str) {
    let Ok(out) = normalize_rfc3986(path) else {
        return;
    };
    assert!(out.starts_with('/'), "{path:?} -> {out:?}: no leading '/'");
    assert!(
        !out.contains("/./") && !out.contains("/../"),
        "{path:?} -> {out:?}: dot segment left"
    );
    let again = normalize_rfc3986(&out);
    assert_eq!(
        again.as_deref(),
        Ok(out.as_str()),
        "{path:?} -> {out:?}: normalizing again is not idempotent"
    );
}
