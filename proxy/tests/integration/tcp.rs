//! tcp_proxy end to end.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_large_transfer_byte_for_byte() {
    let echo = tcp_echo().await;
    let yaml = format!(
        r#"
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: tcp
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: echo
          cluster: echo
  clusters:
{}"#,
        cluster("echo", &[echo.port()])
    );
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
