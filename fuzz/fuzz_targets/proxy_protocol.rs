//! The PROXY protocol listener filter's header parser (v1 text, v2 binary) on arbitrary
//! bytes, which is what a client (or a misconfigured load balancer) may send first.
//!
//! Properties: never panics; a decided header never claims more bytes than were given, a v1
//! header is at most 107 bytes and ends in CRLF, a v2 header's length is 16 + its length
//! field; "need more" only while under the bounds; a decided prefix stays decided the same
//! way with more bytes after it; the TLV walk stays inside the header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir_proxy::listener::peek::Peeked;
use weir_proxy::listener::proxy_protocol::{V1_MAX, V2_HEADER, Version, parse, tlvs};

fuzz_target!(|data: &[u8]| {
    let full = parse(data);
    match &full {
        Peeked::NeedMore => assert!(data.len() < V2_HEADER + 65535),
        Peeked::Done(Ok(h)) => {
            assert!(h.len <= data.len());
            match h.version {
                Version::V1 => {
                    assert!(h.len <= V1_MAX);
                    assert_eq!(&data[h.len - 2..h.len], b"\r\n");
                }
                Version::V2 => {
                    let len = u16::from_be_bytes([data[14], data[15]]) as usize;
                    assert_eq!(h.len, V2_HEADER + len);
                    let total: usize = tlvs(&data[..h.len]).map(|(_, v)| v.len() + 3).sum();
                    assert!(total <= len);
                }
            }
        }
        Peeked::Done(Err(_)) => {}
    }
    for cut in [data.len() / 2, data.len().saturating_sub(1)] {
        match parse(&data[..cut]) {
            Peeked::NeedMore => {}
            decided => assert_eq!(decided, full, "prefix {cut} decided differently"),
        }
    }
});
