//! tcp_proxy end to end.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_large_transfer_byte_for_byte() {
    let echo = tcp_echo().await;
    let yaml = tcp_bootstrap("echo", "echo", "", &cluster("echo", &[echo.port()]));
    let p = Proxy::start(&yaml).await;
    let data: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let s = tokio::net::TcpStream::connect(p.addr("tcp"))
        .await
        .expect("connect");
    let (mut r, mut w) = s.into_split();
    let send = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&send).await.expect("write");
        w.shutdown().await.expect("half close");
    });
    let mut got = Vec::with_capacity(data.len());
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got))
        .await
        .expect("in time")
        .expect("read");
    writer.await.expect("writer");
    assert_eq!(got.len(), data.len());
    assert!(got == data, "bytes differ");
    eventually("tcp stats", || p.stat("tcp.echo.downstream_cx_total") == 1).await;
    eventually("rx bytes", || {
        p.stat("tcp.echo.downstream_cx_rx_bytes_total") == data.len() as u64
    })
    .await;
    eventually("cx gauge back to 0", || {
        p.stat("cluster.echo.upstream_cx_active") == 0
    })
    .await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connection_breaker_closes_the_overflow() {
    let echo = tcp_echo().await;
    let yaml = tcp_bootstrap(
        "echo",
        "echo",
        "",
        &format!(
            "{}    circuit_breakers: {{thresholds: [{{max_connections: 1}}]}}\n",
            cluster("echo", &[echo.port()])
        ),
    );
    let p = Proxy::start(&yaml).await;
    let mut first = tokio::net::TcpStream::connect(p.addr("tcp"))
        .await
        .expect("connect");
    first.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    first.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"ping");
    // The second connection is over max_connections: closed without reaching the upstream.
    let mut second = tokio::net::TcpStream::connect(p.addr("tcp"))
        .await
        .expect("connect");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), second.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "closed without data");
    assert_eq!(p.stat("cluster.echo.upstream_cx_overflow"), 1);
    assert_eq!(p.stat("cluster.echo.upstream_cx_total"), 1);
    // The first connection still works.
    first.write_all(b"pong").await.expect("write");
    first.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"pong");
    p.stop().await;
}
