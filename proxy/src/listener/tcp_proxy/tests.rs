use super::*;
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A client connected through `proxy_streams` to the upstream server `upstream`.
/// Returns the client side and the proxy task.
async fn through_proxy(
    upstream: std::net::SocketAddr,
    opts: ProxyOptions,
    counters: ByteCounters,
    cancel: CancellationToken,
) -> (TcpStream, tokio::task::JoinHandle<ProxyOutcome>) {
    let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let client = TcpStream::connect(front.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (downstream, _) = front.accept().await.expect("accept");
    let up = TcpStream::connect(upstream)
        .await
        .expect("connect upstream");
    let task =
        tokio::spawn(async move { proxy_streams(downstream, up, &opts, &counters, &cancel).await });
    (client, task)
}

/// Echoes until EOF, then closes.
async fn echo_server() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    a
}

fn opts(engine: Engine) -> ProxyOptions {
    ProxyOptions {
        engine,
        idle_timeout: Some(Duration::from_secs(30)),
        max_duration: None,
        buffer_limit: 1024 * 1024,
    }
}

async fn round_trip_8mib(engine: Engine, buffer_limit: u32) {
    let echo = echo_server().await;
    let store = crate::stats::Store::new();
    let scope = store.tcp("t");
    let counters = ByteCounters {
        rx: scope.counter("downstream_cx_rx_bytes_total"),
        tx: scope.counter("downstream_cx_tx_bytes_total"),
    };
    let o = ProxyOptions {
        buffer_limit,
        ..opts(engine)
    };
    let (client, task) = through_proxy(echo, o, counters, CancellationToken::new()).await;
    let mut payload = vec![0u8; 8 * 1024 * 1024];
    rand::rng().fill_bytes(&mut payload);
    let (mut r, mut w) = client.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.expect("write");
        w.shutdown().await.expect("fin");
        w
    });
    let mut got = Vec::with_capacity(payload.len());
    r.read_to_end(&mut got).await.expect("read to EOF");
    let _w = writer.await.expect("writer");
    assert_eq!(got.len(), payload.len());
    assert!(got == payload, "payload corrupted");
    let out = task.await.expect("proxy task");
    assert!(matches!(out.end, ProxyEnd::Closed), "{:?}", out.end);
    assert_eq!(out.downstream_to_upstream, payload.len() as u64);
    assert_eq!(out.upstream_to_downstream, payload.len() as u64);
    let text: std::collections::HashMap<_, _> = store.render_text().into_iter().collect();
    let n = payload.len().to_string();
    assert_eq!(text["tcp.t.downstream_cx_rx_bytes_total"], n);
    assert_eq!(text["tcp.t.downstream_cx_tx_bytes_total"], n);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn splice_round_trip_8mib() {
    // The splice engine must really be available here, not silently fall back to copying.
    assert!(crate::listener::splice::Pipes::new(1 << 20).is_ok());
    round_trip_8mib(Engine::Splice, 1024 * 1024).await;
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn splice_round_trip_small_pipe() {
    round_trip_8mib(Engine::Splice, 4096).await;
}

#[tokio::test]
async fn copy_round_trip_8mib() {
    round_trip_8mib(Engine::Copy, 1024 * 1024).await;
}

#[tokio::test]
async fn copy_round_trip_small_buffer() {
    round_trip_8mib(Engine::Copy, 1000).await;
}

/// The upstream reads until EOF, then answers with the byte count and closes: only works if
/// the client's FIN reached it while the other direction stayed open.
async fn half_close(engine: Engine) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
        s.write_all(format!("got {}", buf.len()).as_bytes())
            .await
            .expect("write");
        s.shutdown().await.expect("fin");
    });
    let (mut client, task) = through_proxy(
        a,
        opts(engine),
        ByteCounters::noop(),
        CancellationToken::new(),
    )
    .await;
    client.write_all(&[7u8; 100_000]).await.expect("write");
    client.shutdown().await.expect("fin");
    let mut answer = String::new();
    client.read_to_string(&mut answer).await.expect("read");
    assert_eq!(answer, "got 100000");
    let out = task.await.expect("task");
    assert!(matches!(out.end, ProxyEnd::Closed), "{:?}", out.end);
    assert_eq!(out.upstream_to_downstream, 10);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn splice_half_close() {
    half_close(Engine::Splice).await;
}

#[tokio::test]
async fn copy_half_close() {
    half_close(Engine::Copy).await;
}

/// The upstream closes first; the downstream still sends, then closes.
async fn upstream_closes_first(engine: Engine) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        s.write_all(b"bye").await.expect("write");
        s.shutdown().await.expect("fin");
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.expect("read");
        assert_eq!(buf, b"late");
    });
    let (mut client, task) = through_proxy(
        a,
        opts(engine),
        ByteCounters::noop(),
        CancellationToken::new(),
    )
    .await;
    let mut buf = Vec::new();
    client.read_to_end(&mut buf).await.expect("read");
    assert_eq!(buf, b"bye");
    client.write_all(b"late").await.expect("write");
    client.shutdown().await.expect("fin");
    let out = task.await.expect("task");
    assert!(matches!(out.end, ProxyEnd::Closed), "{:?}", out.end);
    assert_eq!(out.downstream_to_upstream, 4);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn splice_upstream_closes_first() {
    upstream_closes_first(Engine::Splice).await;
}

#[tokio::test]
async fn copy_upstream_closes_first() {
    upstream_closes_first(Engine::Copy).await;
}

async fn idle_timeout(engine: Engine) {
    let echo = echo_server().await;
    let o = ProxyOptions {
        idle_timeout: Some(Duration::from_millis(1000)),
        ..opts(engine)
    };
    let (mut client, task) =
        through_proxy(echo, o, ByteCounters::noop(), CancellationToken::new()).await;
    // Activity keeps it open past the timeout...
    for _ in 0..6 {
        client.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        client.read_exact(&mut b).await.expect("echo");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // ...then silence ends it, and the client sees the close.
    let started = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("timed out")
        .expect("task");
    assert!(matches!(out.end, ProxyEnd::IdleTimeout), "{:?}", out.end);
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
        .await
        .expect("closed");
    assert!(r.is_err() || rest.is_empty());
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn splice_idle_timeout() {
    idle_timeout(Engine::Splice).await;
}

#[tokio::test]
async fn copy_idle_timeout() {
    idle_timeout(Engine::Copy).await;
}

async fn cancel_and_max_duration(engine: Engine) {
    let echo = echo_server().await;
    let cancel = CancellationToken::new();
    let (_client, task) =
        through_proxy(echo, opts(engine), ByteCounters::noop(), cancel.clone()).await;
    cancel.cancel();
    let out = task.await.expect("task");
    assert!(matches!(out.end, ProxyEnd::Cancelled), "{:?}", out.end);

    let o = ProxyOptions {
        max_duration: Some(Duration::from_millis(100)),
        ..opts(engine)
    };
    let (_client, task) =
        through_proxy(echo, o, ByteCounters::noop(), CancellationToken::new()).await;
    let out = task.await.expect("task");
    assert!(matches!(out.end, ProxyEnd::MaxDuration), "{:?}", out.end);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn splice_cancel_and_max_duration() {
    cancel_and_max_duration(Engine::Splice).await;
}

#[tokio::test]
async fn copy_cancel_and_max_duration() {
    cancel_and_max_duration(Engine::Copy).await;
}

/// A reset from the upstream ends the connection with an error, not a hang.
async fn upstream_reset(engine: Engine) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let (s, _) = l.accept().await.expect("accept");
        // SO_LINGER 0: close sends RST.
        s.set_zero_linger().expect("linger");
        drop(s);
    });
    let (mut client, task) = through_proxy(
        a,
        opts(engine),
        ByteCounters::noop(),
        CancellationToken::new(),
    )
    .await;
    let out = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("ends")
        .expect("task");
    assert!(
        matches!(out.end, ProxyEnd::Error(_) | ProxyEnd::Closed),
        "{:?}",
        out.end
    );
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn splice_upstream_reset() {
    upstream_reset(Engine::Splice).await;
}

#[tokio::test]
async fn copy_upstream_reset() {
    upstream_reset(Engine::Copy).await;
}

#[test]
fn weighted_pick() {
    let c = TcpProxyConfig::new(
        "p".into(),
        vec![("a".into(), 1), ("b".into(), 3)],
        None,
        None,
        1,
        TcpProxyStats::new(&crate::stats::Store::new().tcp("p")),
    );
    assert_eq!(c.pick_cluster_with(0), Some("a"));
    assert_eq!(c.pick_cluster_with(1), Some("b"));
    assert_eq!(c.pick_cluster_with(3), Some("b"));
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        seen.insert(c.pick_cluster().expect("some").to_string());
    }
    assert_eq!(seen.len(), 2);
}
