//! Load balancing end to end: every `lb_policy` against real backends (each names itself in
//! `x-backend`), hash policies (header, generated cookie), priority failover and panic driven
//! by endpoint `health_status`, locality weights.

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::harness::{Backend, Proxy, all_to, http_bootstrap, send, tcp_bootstrap};

/// One endpoint of a test cluster.
struct Ep {
    port: u16,
    weight: u32,
    unhealthy: bool,
}

fn ep(port: u16, weight: u32) -> Ep {
    Ep {
        port,
        weight,
        unhealthy: false,
    }
}

fn down(port: u16) -> Ep {
    Ep {
        port,
        weight: 1,
        unhealthy: true,
    }
}

/// A STATIC cluster `c` with `extra` cluster fields and localities
/// `(priority, locality weight, endpoints)`.
fn lb_cluster(extra: &str, localities: &[(u32, Option<u32>, Vec<Ep>)]) -> String {
    let mut out = format!(
        "  - name: c\n    connect_timeout: 1s\n    type: STATIC\n{extra}    load_assignment:\n      cluster_name: c\n      endpoints:\n"
    );
    for (i, (prio, lw, eps)) in localities.iter().enumerate() {
        out.push_str(&format!(
            "      - priority: {prio}\n        locality: {{zone: z{i}}}\n"
        ));
        if let Some(w) = lw {
            out.push_str(&format!("        load_balancing_weight: {w}\n"));
        }
        out.push_str("        lb_endpoints:\n");
        for e in eps {
            out.push_str(&format!(
                "        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}\n          load_balancing_weight: {}\n",
                e.port, e.weight
            ));
            if e.unhealthy {
                out.push_str("          health_status: UNHEALTHY\n");
            }
        }
    }
    out
}

async fn start(extra: &str, localities: &[(u32, Option<u32>, Vec<Ep>)], route: &str) -> Proxy {
    let vhosts = if route.is_empty() {
        all_to("c", "5s")
    } else {
        format!(
            "            - name: all\n              domains: [\"*\"]\n              routes:\n              - match: {{prefix: /}}\n                route: {{cluster: c, timeout: 5s, {route}}}\n"
        )
    };
    Proxy::start(&http_bootstrap(&vhosts, &lb_cluster(extra, localities), "")).await
}

async fn backends(names: &[&str]) -> Vec<Backend> {
    let mut v = Vec::new();
    for n in names {
        v.push(Backend::start(n).await);
    }
    v
}

/// A request with extra headers; returns (x-backend, response headers).
async fn request(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (String, http::HeaderMap) {
    let mut b = Request::get(path).header("host", "lb.test");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let (status, h, _) = send(addr, b.body(Full::new(Bytes::new())).expect("req")).await;
    assert_eq!(status, 200, "{h:?}");
    let name = h
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (name, h)
}

/// `n` plain requests; count per backend.
async fn spread(addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        let (b, _) = request(addr, "/", &[]).await;
        *m.entry(b).or_insert(0) += 1;
    }
    m
}

fn count(m: &HashMap<String, usize>, name: &str) -> usize {
    m.get(name).copied().unwrap_or(0)
}

/// `count(name)` within `want ± tol`.
fn around(m: &HashMap<String, usize>, name: &str, want: usize, tol: usize) {
    let got = count(m, name);
    assert!(
        got.abs_diff(want) <= tol,
        "{name}: {got} vs {want}±{tol} in {m:?}"
    );
}

#[tokio::test]
async fn round_robin_is_weighted() {
    let b = backends(&["a", "b", "c"]).await;
    let p = start(
        "",
        &[(
            0,
            None,
            vec![ep(b[0].port(), 1), ep(b[1].port(), 2), ep(b[2].port(), 3)],
        )],
        "",
    )
    .await;
    let m = spread(p.addr("http"), 120).await;
    // Smooth WRR is exact per worker over each cycle of 6; two workers each leave at most
    // one partial cycle.
    around(&m, "a", 20, 6);
    around(&m, "b", 40, 6);
    around(&m, "c", 60, 6);
    p.stop().await;
}

#[tokio::test]
async fn least_request_weighted_and_p2c() {
    let b = backends(&["a", "b"]).await;
    let p = start(
        "    lb_policy: LEAST_REQUEST\n",
        &[(0, None, vec![ep(b[0].port(), 1), ep(b[1].port(), 3)])],
        "",
    )
    .await;
    // Sequential requests: no active requests, so weights decide.
    let m = spread(p.addr("http"), 100).await;
    around(&m, "a", 25, 6);
    around(&m, "b", 75, 6);
    p.stop().await;

    // Equal weights: power of two choices on idle hosts is uniform.
    let b = backends(&["a", "b", "c"]).await;
    let p = start(
        "    lb_policy: LEAST_REQUEST\n    least_request_lb_config: {choice_count: 3}\n",
        &[(0, None, b.iter().map(|x| ep(x.port(), 1)).collect())],
        "",
    )
    .await;
    let m = spread(p.addr("http"), 240).await;
    for n in ["a", "b", "c"] {
        // Binomial(240, 1/3): sd ~7.3; 5 sd.
        around(&m, n, 80, 37);
    }
    p.stop().await;
}

#[tokio::test]
async fn random_spreads_uniformly() {
    let b = backends(&["a", "b", "c"]).await;
    let p = start(
        "    lb_policy: RANDOM\n",
        &[(0, None, b.iter().map(|x| ep(x.port(), 1)).collect())],
        "",
    )
    .await;
    let m = spread(p.addr("http"), 240).await;
    for n in ["a", "b", "c"] {
        around(&m, n, 80, 37);
    }
    p.stop().await;
}

async fn sticky_by_header(policy: &str) {
    let b = backends(&["a", "b", "c"]).await;
    let p = start(
        &format!("    lb_policy: {policy}\n"),
        &[(0, None, b.iter().map(|x| ep(x.port(), 1)).collect())],
        "hash_policy: [{header: {header_name: x-user}}]",
    )
    .await;
    let addr = p.addr("http");
    let mut owners = HashMap::new();
    for u in 0..30 {
        let user = format!("user-{u}");
        let (first, _) = request(addr, "/", &[("x-user", &user)]).await;
        for _ in 0..3 {
            let (again, _) = request(addr, "/", &[("x-user", &user)]).await;
            assert_eq!(again, first, "{policy}: {user} moved");
        }
        *owners.entry(first).or_insert(0) += 1;
    }
    // 30 users over 3 hosts: every host owns some.
    assert_eq!(owners.len(), 3, "{policy}: {owners:?}");
    // Without the header the pick is random: more than one host answers.
    let m = spread(addr, 30).await;
    assert!(m.len() > 1, "{policy}: {m:?}");
    p.stop().await;
}

#[tokio::test]
async fn ring_hash_is_sticky_by_header() {
    sticky_by_header("RING_HASH").await;
}

#[tokio::test]
async fn maglev_is_sticky_by_header() {
    sticky_by_header("MAGLEV").await;
}

#[tokio::test]
async fn ring_hash_cookie_is_generated_and_sticky() {
    let b = backends(&["a", "b", "c"]).await;
    let p = start(
        "    lb_policy: RING_HASH\n    ring_hash_lb_config: {minimum_ring_size: 256}\n",
        &[(0, None, b.iter().map(|x| ep(x.port(), 1)).collect())],
        "hash_policy: [{cookie: {name: aff, ttl: 600s, path: /}}]",
    )
    .await;
    let addr = p.addr("http");
    let mut owners = HashMap::new();
    for _ in 0..20 {
        let (first, h) = request(addr, "/", &[]).await;
        let sc = h
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .expect("set-cookie")
            .to_string();
        assert!(sc.starts_with("aff=\""), "{sc}");
        assert!(sc.ends_with("; Max-Age=600; Path=/; HttpOnly"), "{sc}");
        let cookie = sc.split(';').next().expect("pair").to_string();
        // Sending the cookie back: same backend, no new cookie.
        for _ in 0..3 {
            let (again, h2) = request(addr, "/", &[("cookie", &cookie)]).await;
            assert_eq!(again, first, "{cookie}");
            assert!(h2.get("set-cookie").is_none());
        }
        *owners.entry(first).or_insert(0) += 1;
    }
    // Generated cookies differ, so new clients spread.
    assert!(owners.len() > 1, "{owners:?}");
    p.stop().await;
}

#[tokio::test]
async fn priority_failover_and_recovery_by_health_status() {
    // P0: one dead endpoint (nothing listens; EDS health UNHEALTHY) and one live one -> P0
    // health 1/2 * 140 = 70: 70% to P0's live host, 30% to P1.
    let b = backends(&["p0", "p1"]).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let p = start(
        "    lb_policy: RANDOM\n",
        &[
            (0, None, vec![down(dead), ep(b[0].port(), 1)]),
            (1, None, vec![ep(b[1].port(), 1)]),
        ],
        "",
    )
    .await;
    let m = spread(p.addr("http"), 200).await;
    assert_eq!(count(&m, "p0") + count(&m, "p1"), 200, "{m:?}");
    // Binomial(200, 0.3): sd ~6.5.
    around(&m, "p1", 60, 30);
    assert_eq!(p.stat("cluster.c.lb_healthy_panic"), 0);
    assert_eq!(p.stat("cluster.c.upstream_cx_connect_fail"), 0);
    p.stop().await;

    // All of P0 unhealthy: everything fails over to P1 (no panic: P1 is fully healthy).
    let p = start(
        "",
        &[
            (0, None, vec![down(dead), down(b[0].port())]),
            (1, None, vec![ep(b[1].port(), 1)]),
        ],
        "",
    )
    .await;
    let m = spread(p.addr("http"), 20).await;
    assert_eq!(count(&m, "p1"), 20, "{m:?}");
    assert_eq!(p.stat("cluster.c.lb_healthy_panic"), 0);
    p.stop().await;
}

#[tokio::test]
async fn panic_mode_uses_all_hosts() {
    // 1 of 3 healthy (33% < 50%): panic, traffic reaches the unhealthy-but-alive hosts too.
    let b = backends(&["a", "b", "c"]).await;
    let p = start(
        "",
        &[(
            0,
            None,
            vec![ep(b[0].port(), 1), down(b[1].port()), down(b[2].port())],
        )],
        "",
    )
    .await;
    let m = spread(p.addr("http"), 30).await;
    // Round robin over all three per worker.
    for n in ["a", "b", "c"] {
        around(&m, n, 10, 2);
    }
    assert_eq!(p.stat("cluster.c.lb_healthy_panic"), 30);
    p.stop().await;

    // Panic disabled (threshold 0): only the healthy host.
    let p = start(
        "    common_lb_config: {healthy_panic_threshold: {value: 0}}\n",
        &[(
            0,
            None,
            vec![ep(b[0].port(), 1), down(b[1].port()), down(b[2].port())],
        )],
        "",
    )
    .await;
    let m = spread(p.addr("http"), 10).await;
    assert_eq!(count(&m, "a"), 10, "{m:?}");
    assert_eq!(p.stat("cluster.c.lb_healthy_panic"), 0);
    p.stop().await;

    // Nothing healthy and panic disabled: 503 no healthy upstream.
    let p = start(
        "    common_lb_config: {healthy_panic_threshold: {value: 0}}\n",
        &[(0, None, vec![down(b[0].port())])],
        "",
    )
    .await;
    let (status, _, body) = crate::harness::get(p.addr("http"), "lb.test", "/").await;
    assert_eq!(status, 503);
    assert_eq!(&body[..], b"no healthy upstream");
    assert_eq!(p.stat("cluster.c.upstream_cx_none_healthy"), 1);
    p.stop().await;
}

#[tokio::test]
async fn locality_weighted_split() {
    let b = backends(&["z0", "z1a", "z1b"]).await;
    let p = start(
        "    common_lb_config: {locality_weighted_lb_config: {}}\n",
        &[
            (0, Some(1), vec![ep(b[0].port(), 1)]),
            (0, Some(3), vec![ep(b[1].port(), 1), ep(b[2].port(), 1)]),
        ],
        "",
    )
    .await;
    let m = spread(p.addr("http"), 80).await;
    // Locality z0 gets 1/4 although it has 1 of 3 hosts.
    around(&m, "z0", 20, 4);
    around(&m, "z1a", 30, 4);
    around(&m, "z1b", 30, 4);
    // /clusters shows each host's locality.
    let (_, _, body) = crate::harness::get(p.admin(), "admin", "/clusters").await;
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains(&format!("c::127.0.0.1:{}::zone::z0\n", b[0].port())),
        "{text}"
    );
    assert!(
        text.contains(&format!("c::127.0.0.1:{}::zone::z1\n", b[2].port())),
        "{text}"
    );
    p.stop().await;
}

#[tokio::test]
async fn lb_policy_shows_in_config_dump() {
    let b = backends(&["a"]).await;
    let p = start(
        "    lb_policy: MAGLEV\n    maglev_lb_config: {table_size: 251}\n",
        &[(0, None, vec![ep(b[0].port(), 1)])],
        "",
    )
    .await;
    let (status, _, body) = crate::harness::get(p.admin(), "admin", "/config_dump").await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("\"lb_policy\": \"MAGLEV\""), "{text}");
    assert!(text.contains("\"table_size\": \"251\""), "{text}");
    let (_, h) = request(p.addr("http"), "/", &[]).await;
    assert_eq!(h.get("x-backend").map(|v| v.as_bytes()), Some(&b"a"[..]));
    p.stop().await;
}

/// A TCP server that writes `name` to every connection and closes it.
async fn tcp_namer(name: &'static str) -> u16 {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

async fn tcp_pick_spread(hash_policy: &str, n: usize) -> HashMap<String, usize> {
    use tokio::io::AsyncReadExt;
    let ports = [
        tcp_namer("t1").await,
        tcp_namer("t2").await,
        tcp_namer("t3").await,
        tcp_namer("t4").await,
    ];
    let yaml = tcp_bootstrap(
        "t",
        "c",
        hash_policy,
        &lb_cluster(
            "    lb_policy: MAGLEV\n",
            &[(0, None, ports.iter().map(|p| ep(*p, 1)).collect())],
        ),
    );
    let p = Proxy::start(&yaml).await;
    let mut m = HashMap::new();
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(p.addr("tcp"))
            .await
            .expect("connect");
        let mut got = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            s.read_to_string(&mut got),
        )
        .await
        .expect("in time")
        .expect("read");
        *m.entry(got).or_insert(0) += 1;
    }
    p.stop().await;
    m
}

#[tokio::test]
async fn tcp_proxy_hashes_by_source_ip() {
    // Every client is 127.0.0.1: one Maglev owner for all connections.
    let m = tcp_pick_spread("hash_policy: [{source_ip: {}}]", 12).await;
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m.values().sum::<usize>(), 12);
    // Without the policy the Maglev key is random: connections spread (4 hosts, 24 tries).
    let m = tcp_pick_spread("", 24).await;
    assert!(m.len() > 1, "{m:?}");
}
