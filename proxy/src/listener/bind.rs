//! One listening socket per listener and worker, all on the same address with SO_REUSEPORT,
//! so the kernel spreads new connections over the workers.
//!
//! [`adopt_listener`] takes sockets inherited from a hot-restart parent instead
//! (`crate::hot_restart`): the same kernel sockets keep their accept queues, so a connection
//! queued while the processes swap is accepted by the new process instead of being reset.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

use super::ListenerConfig;

/// Bind `cfg` once per worker (SO_REUSEPORT): the bound address (port resolved) and one
/// nonblocking listening socket per worker. When the port is 0, the first socket picks a
/// free port and the others bind that one. All or nothing: on error the sockets bound so
/// far are closed.
pub(crate) fn bind_listener(
    cfg: &ListenerConfig,
    workers: usize,
) -> io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    let workers = workers.max(1);
    let mut addr = cfg.address;
    let mut out = Vec::with_capacity(workers);
    for _ in 0..workers {
        let sock = bind_one(addr, cfg.backlog, cfg.ipv4_compat)?;
        if addr.port() == 0 {
            addr = sock.local_addr()?;
        }
        out.push(sock);
    }
    Ok((addr, out))
}

/// Adopt `inherited` listening sockets (a hot-restart parent's sockets of one listener,
/// bound to `bound`) for `cfg` and `workers` workers: each is checked to be a listening TCP
/// socket on `bound` (with the V6ONLY setting `cfg` asks for), made nonblocking and given
/// `cfg`'s backlog. Every inherited socket is kept, also when there are more than workers
/// (closing one would reset the connections in its accept queue); when there are fewer,
/// the rest are bound fresh on `bound` (SO_REUSEPORT joins them to the same group).
/// An error means the sockets do not fit; the caller binds fresh instead.
pub(crate) fn adopt_listener(
    cfg: &ListenerConfig,
    workers: usize,
    bound: SocketAddr,
    inherited: Vec<std::net::TcpListener>,
) -> io::Result<(SocketAddr, Vec<std::net::TcpListener>)> {
    let workers = workers.max(1);
    let mut out = Vec::with_capacity(workers.max(inherited.len()));
    for l in inherited {
        let local = l.local_addr()?;
        if local != bound {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inherited socket is bound to {local}, not {bound}"),
            ));
        }
        let sock = socket2::SockRef::from(&l);
        if !sock.is_listener()? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "inherited socket is not listening",
            ));
        }
        if bound.is_ipv6() && sock.only_v6()? == cfg.ipv4_compat {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "inherited socket has another ipv4_compat (IPV6_V6ONLY) setting",
            ));
        }
        // listen(2) again on a listening socket only updates its backlog.
        sock.listen(i32::try_from(cfg.backlog).unwrap_or(i32::MAX))?;
        l.set_nonblocking(true)?;
        out.push(l);
    }
    if out.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no inherited sockets",
        ));
    }
    while out.len() < workers {
        out.push(bind_one(bound, cfg.backlog, cfg.ipv4_compat)?);
    }
    Ok((bound, out))
}

/// A nonblocking listening socket with SO_REUSEADDR + SO_REUSEPORT (and IPV6_V6ONLY for v6
/// unless `ipv4_compat`).
pub(crate) fn bind_one(
    addr: SocketAddr,
    backlog: u32,
    ipv4_compat: bool,
) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(!ipv4_compat)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(sock.into())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::listener::{ChainMatcher, DEFAULT_BACKLOG, DEFAULT_BUFFER_LIMIT, ListenerStats};

    fn cfg(name: &str, addr: &str) -> Arc<ListenerConfig> {
        cfg_v(name, addr, false)
    }

    fn cfg_v(name: &str, addr: &str, ipv4_compat: bool) -> Arc<ListenerConfig> {
        Arc::new(ListenerConfig {
            name: name.into(),
            address: addr.parse().expect("addr"),
            filter_chains: Vec::new(),
            default_filter_chain: None,
            per_connection_buffer_limit_bytes: DEFAULT_BUFFER_LIMIT,
            ipv4_compat,
            backlog: DEFAULT_BACKLOG,
            listener_filters: Vec::new(),
            tls_inspector: None,
            listener_filters_timeout: std::time::Duration::from_secs(15),
            continue_on_listener_filters_timeout: false,
            matcher: ChainMatcher::default(),
            stats: ListenerStats::noop(),
            intercept: Default::default(),
            ignore_global_conn_limit: false,
        })
    }

    #[tokio::test]
    async fn port_zero_two_workers_share_the_port() {
        let (a, socks_a) = bind_listener(&cfg("a", "127.0.0.1:0"), 2).expect("binds");
        let (b, socks_b) = bind_listener(&cfg("b", "127.0.0.1:0"), 2).expect("binds");
        assert_ne!(a.port(), 0);
        assert_ne!(a.port(), b.port());
        assert_eq!(socks_a.len(), 2);
        for s in &socks_a {
            assert_eq!(s.local_addr().expect("addr"), a);
        }
        for s in &socks_b {
            assert_eq!(s.local_addr().expect("addr"), b);
        }
        // Zero workers still bind one socket.
        let (_, one) = bind_listener(&cfg("c", "127.0.0.1:0"), 0).expect("binds");
        assert_eq!(one.len(), 1);
        // Either worker's socket accepts connections to the shared port.
        let c = tokio::net::TcpStream::connect(a).await.expect("connects");
        drop(c);
    }

    #[tokio::test]
    async fn ipv6_loopback_if_available() {
        match bind_listener(&cfg("v6", "[::1]:0"), 2) {
            Ok((a, _socks)) => {
                assert!(a.is_ipv6());
                assert_ne!(a.port(), 0);
                tokio::net::TcpStream::connect(a).await.expect("connects");
            }
            Err(e) => eprintln!("skipping: no IPv6 loopback ({e})"),
        }
    }

    #[tokio::test]
    async fn ipv4_compat_is_dual_stack() {
        let Ok((a, _socks)) = bind_listener(&cfg_v("ds", "[::]:0", true), 1) else {
            eprintln!("skipping: no IPv6");
            return;
        };
        tokio::net::TcpStream::connect(("127.0.0.1", a.port()))
            .await
            .expect("IPv4 reaches the dual-stack socket");
        // Without ipv4_compat the v6 socket is V6ONLY: IPv4 on that port is someone else's.
        let (a, _v6only) = bind_listener(&cfg("v6only", "[::]:0"), 1).expect("binds");
        let v4 = std::net::TcpListener::bind(("127.0.0.1", a.port()));
        assert!(v4.is_ok(), "IPv4 port still free next to a V6ONLY socket");
    }

    #[tokio::test]
    async fn adopt_keeps_every_socket_and_tops_up() {
        let c = cfg("a", "127.0.0.1:0");
        let (bound, socks) = bind_listener(&c, 3).expect("binds");
        let dups: Vec<_> = socks.iter().map(|s| s.try_clone().expect("dup")).collect();
        // More inherited sockets than workers: all kept.
        let (b, kept) = adopt_listener(&c, 2, bound, dups).expect("adopts");
        assert_eq!((b, kept.len()), (bound, 3));
        // Fewer: the rest bound fresh on the same port.
        let one = vec![socks[0].try_clone().expect("dup")];
        let (_, topped) = adopt_listener(&c, 4, bound, one).expect("adopts");
        assert_eq!(topped.len(), 4);
        for s in &topped {
            assert_eq!(s.local_addr().expect("addr"), bound);
        }
        drop(socks);
        drop(kept);
        // The adopted sockets still accept.
        tokio::net::TcpStream::connect(bound)
            .await
            .expect("connects");
    }

    #[test]
    fn adopt_rejects_sockets_that_do_not_fit() {
        let c = cfg("a", "127.0.0.1:0");
        let (bound, socks) = bind_listener(&c, 1).expect("binds");
        let (other, other_socks) = bind_listener(&c, 1).expect("binds");
        let dup = |v: &Vec<std::net::TcpListener>| vec![v[0].try_clone().expect("dup")];
        // Bound elsewhere.
        let e = adopt_listener(&c, 1, bound, dup(&other_socks)).expect_err("wrong address");
        assert!(e.to_string().contains(&other.to_string()), "{e}");
        // Not listening: a bound socket without listen(2).
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into())
            .expect("bind");
        let addr = s.local_addr().expect("addr").as_socket().expect("inet");
        let e = adopt_listener(&c, 1, addr, vec![s.into()]).expect_err("not listening");
        assert!(e.to_string().contains("not listening"), "{e}");
        // Nothing inherited.
        assert!(adopt_listener(&c, 1, bound, Vec::new()).is_err());
        drop(socks);
    }

    #[test]
    fn address_in_use_by_a_foreign_socket() {
        // A port held by a socket without SO_REUSEPORT cannot be shared.
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr").to_string();
        let e = bind_listener(&cfg("busy", &addr), 2).expect_err("in use");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }
}
