//! The tls_inspector's ClientHello parser on arbitrary bytes (what a client may send first).
//!
//! Properties: never panics; the verdict on a prefix is consistent with the whole input (a
//! prefix never yields `Tls` with a different SNI than a longer input that also parses as a
//! ClientHello, because the parser only decides once the whole message is there); an SNI is
//! non-empty, lower-case, and ALPN entries are non-empty.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_proxy::tls::inspector::{Hello, parse_client_hello};

fuzz_target!(|data: &[u8]| {
    let full = parse_client_hello(data);
    if let Hello::Tls { sni, alpn } = &full {
        if let Some(s) = sni {
            assert!(!s.is_empty());
            assert_eq!(s, &s.to_ascii_lowercase());
        }
        assert!(alpn.iter().all(|a| !a.is_empty()));
    }
    // A decided prefix stays decided the same way with more bytes after it.
    for cut in [data.len() / 2, data.len().saturating_sub(1)] {
        match parse_client_hello(&data[..cut]) {
            Hello::NeedMore => {}
            Hello::Tls { sni, alpn } => {
                assert_eq!(full, Hello::Tls { sni, alpn }, "prefix {cut} decided differently");
            }
            other => assert_eq!(full, other, "prefix {cut} decided differently"),
        }
    }
});
