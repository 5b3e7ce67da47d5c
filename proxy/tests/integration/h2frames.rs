//! HTTP/2 abuse at the frame level (hand-built frames on a raw socket): rapid reset and
//! CONTINUATION floods must end the downstream connection, not grow memory or reach upstream.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK block for `GET http://x/`: static-table indexes plus a literal :authority.
fn get_headers() -> Vec<u8> {
    vec![0x82, 0x86, 0x84, 0x41, 0x01, b'x']
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

/// Read frames until the server sends GOAWAY or closes; true if it did within `wait`.
async fn server_ends_connection(s: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => pending.extend_from_slice(&buf[..n]),
        }
        while pending.len() >= 9 {
            let len =
                ((pending[0] as usize) << 16) | ((pending[1] as usize) << 8) | pending[2] as usize;
            if pending.len() < 9 + len {
                break;
            }
            if pending[3] == GOAWAY {
                return true;
            }
            pending.drain(..9 + len);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_flood_ends_the_connection() {
    let (p, b) = proxy_to_backend("").await;
    let mut s = tokio::net::TcpStream::connect(p.addr("http"))
        .await
        .expect("connect");
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        out.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &get_headers()));
        out.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes())); // CANCEL
    }
    // The server may close while we are still writing; that is the expected outcome.
    let _ = s.write_all(&out).await;
    assert!(
        server_ends_connection(&mut s, Duration::from_secs(10)).await,
        "a rapid-reset flood must end the connection"
    );
    assert!(
        b.hits() < 2000,
        "not every reset stream reached the upstream ({})",
        b.hits()
    );
    // Other clients are unaffected.
    let (status, _, _) = get(p.addr("http"), "x", "/").await;
    assert_eq!(status.as_u16(), 200);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_ends_the_connection() {
    let (p, b) = proxy_to_backend("").await;
    let mut s = tokio::net::TcpStream::connect(p.addr("http"))
        .await
        .expect("connect");
    let mut start = PREFACE.to_vec();
    start.extend(frame(SETTINGS, 0, 0, &[]));
    start.extend(frame(HEADERS, END_STREAM, 1, &get_headers()));
    s.write_all(&start).await.expect("write");
    // Endless CONTINUATION frames of literal headers (never END_HEADERS): 64 MiB at most.
    let mut block = Vec::with_capacity(16 * 1024);
    while block.len() < 16 * 1024 - 40 {
        // literal without indexing, new name "x-a", value of 30 bytes
        block.extend_from_slice(&[0x00, 0x03, b'x', b'-', b'a', 30]);
        block.extend_from_slice(&[b'v'; 30]);
    }
    let cont = frame(CONTINUATION, 0, 1, &block);
    let mut ended = false;
    for _ in 0..4096 {
        match tokio::time::timeout(Duration::from_secs(5), s.write_all(&cont)).await {
            Ok(Ok(())) => {}
            // Write error (reset) or the server stopped reading: stop flooding and look.
            _ => {
                ended = true;
                break;
            }
        }
    }
    assert!(ended || server_ends_connection(&mut s, Duration::from_secs(10)).await);
    assert!(
        server_ends_connection(&mut s, Duration::from_secs(10)).await,
        "a CONTINUATION flood must end the connection"
    );
    assert_eq!(
        b.hits(),
        0,
        "the never-finished request must not reach the upstream"
    );
    p.stop().await;
}

/// Control: the hand-built frames form a valid request, so the floods above fail for the
/// reason they test and not for a malformed header block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_built_request_is_answered() {
    let (p, b) = proxy_to_backend("").await;
    let mut s = tokio::net::TcpStream::connect(p.addr("http"))
        .await
        .expect("connect");
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &get_headers()));
    s.write_all(&out).await.expect("write");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut answered = false;
    while !answered {
        let n = match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        got.extend_from_slice(&buf[..n]);
        let mut at = 0;
        while got.len() >= at + 9 {
            let len =
                ((got[at] as usize) << 16) | ((got[at + 1] as usize) << 8) | got[at + 2] as usize;
            assert_ne!(got[at + 3], GOAWAY, "valid request must not get GOAWAY");
            if got[at + 3] == HEADERS
                && u32::from_be_bytes([got[at + 5], got[at + 6], got[at + 7], got[at + 8]]) == 1
            {
                answered = true;
            }
            at += 9 + len;
        }
    }
    assert!(answered, "response HEADERS on stream 1");
    assert_eq!(b.hits(), 1);
    p.stop().await;
}
