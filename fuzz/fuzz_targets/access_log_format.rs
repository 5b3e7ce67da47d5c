//! Access log format strings: `access_log::Format::parse`, then rendering of a parsed format
//! against a record with every field set and against an empty one; the JSON format parser on
//! the same text used as the value of one key.
//!
//! Properties: never panics; a parsed format renders without panicking; a format without `%`
//! renders to itself; the headers kept as pairs (what the request end keeps) render exactly
//! as the whole map does; a rendered JSON line is valid JSON.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use weir_filters::{DownstreamTls, PeerCert};
use weir_proxy::access_log::{Format, JsonFormat, KeptHeaders, LogRecord, ResponseFlags};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut req = HeaderMap::new();
    req.insert("user-agent", http::HeaderValue::from_static("fuzz"));
    req.append("x-multi", http::HeaderValue::from_static("a"));
    req.append("x-multi", http::HeaderValue::from_static("b"));
    let tls = DownstreamTls {
        sni: Some("sni.example".into()),
        version: Some("TLSv1.3"),
        peer: Some(PeerCert {
            uri_sans: vec!["spiffe://td/ns/a/sa/b".into()],
            subject: "CN=x".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let full = LogRecord {
        start_time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        request_headers: Some((&req).into()),
        method: Some(&http::Method::GET),
        path: Some("/p?q=é"),
        authority: Some("example.com"),
        response_headers: Some((&req).into()),
        response_code: 200,
        flags: ResponseFlags(u32::MAX),
        duration: Some(Duration::from_millis(5)),
        upstream_host: Some("127.0.0.1:1".parse().expect("addr")),
        downstream_remote: Some("[::1]:2".parse().expect("addr")),
        tls: Some(&tls),
        trace_id: Some("0af7651916cd43dd8448eb211c80319c"),
        ..Default::default()
    };
    let pairs = KeptHeaders::List(req.iter().map(|(n, v)| (n.clone(), v.clone())).collect());
    if let Ok(f) = Format::parse(text) {
        let line = f.render(&full);
        let kept = LogRecord {
            request_headers: Some(pairs.view()),
            response_headers: Some(pairs.view()),
            ..full.clone()
        };
        assert_eq!(f.render(&kept), line);
        let empty = f.render(&LogRecord::default());
        if !text.contains('%') {
            assert_eq!(empty, text);
        }
    }
    let v = serde_json::json!({ "k": text, "nested": { "k": text } });
    if let Ok(j) = JsonFormat::parse(&v) {
        let mut out = String::new();
        j.render_into(&full, &mut out);
        serde_json::from_str::<serde_json::Value>(&out).expect("valid JSON line");
    }
});
