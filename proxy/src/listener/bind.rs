//! One listening socket per listener and worker, all on the same address with SO_REUSEPORT,
//! so the kernel spreads new connections over the workers.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};

use super::ListenerConfig;
use crate::server::BoundListener;

/// Listening sockets for every listener and worker.
#[derive(Debug, Default)]
pub struct BoundListeners {
    addresses: Vec<BoundListener>,
    workers: Vec<Option<WorkerListeners>>,
}

impl BoundListeners {
    /// The bound address of each listener.
    pub fn addresses(&self) -> Vec<BoundListener> {
        self.addresses.clone()
    }

    /// Take worker `i`'s sockets (empty when taken already or out of range).
    pub fn take_worker(&mut self, i: usize) -> WorkerListeners {
        self.workers
            .get_mut(i)
            .and_then(Option::take)
            .unwrap_or_default()
    }
}

/// One worker's sockets: each listener's config with this worker's nonblocking socket.
#[derive(Debug, Default)]
pub struct WorkerListeners {
    pub(crate) listeners: Vec<(Arc<ListenerConfig>, std::net::TcpListener)>,
}

impl WorkerListeners {
    /// The local addresses of this worker's sockets, by listener name.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|(c, l)| l.local_addr().ok().map(|a| (c.name.clone(), a)))
            .collect()
    }
}

/// Bind every listener once per worker (SO_REUSEPORT). When a listener's port is 0, the
/// first socket picks a free port and the others bind that one. The error names the listener.
pub fn bind_all(
    listeners: &[Arc<ListenerConfig>],
    workers: usize,
) -> Result<BoundListeners, (String, io::Error)> {
    let workers = workers.max(1);
    let mut out = BoundListeners {
        addresses: Vec::with_capacity(listeners.len()),
        workers: (0..workers)
            .map(|_| Some(WorkerListeners::default()))
            .collect(),
    };
    for l in listeners {
        let err = |e: io::Error| (l.name.clone(), e);
        let mut addr = l.address;
        for w in out.workers.iter_mut().flatten() {
            let sock = bind_one(addr, l.backlog, l.ipv4_compat).map_err(err)?;
            if addr.port() == 0 {
                addr = sock.local_addr().map_err(err)?;
            }
            w.listeners.push((l.clone(), sock));
        }
        out.addresses.push(BoundListener {
            name: l.name.clone(),
            address: addr,
        });
    }
    Ok(out)
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
            listener_filters_timeout: std::time::Duration::from_secs(15),
            continue_on_listener_filters_timeout: false,
            matcher: ChainMatcher::default(),
            stats: ListenerStats::noop(),
        })
    }

    #[tokio::test]
    async fn port_zero_two_workers_share_the_port() {
        let mut b =
            bind_all(&[cfg("a", "127.0.0.1:0"), cfg("b", "127.0.0.1:0")], 2).expect("binds");
        let addrs = b.addresses();
        assert_eq!(addrs.len(), 2);
        assert_ne!(addrs[0].address.port(), 0);
        assert_ne!(addrs[0].address.port(), addrs[1].address.port());
        let w0 = b.take_worker(0);
        let w1 = b.take_worker(1);
        assert!(b.take_worker(0).listeners.is_empty());
        assert!(b.take_worker(7).listeners.is_empty());
        for w in [&w0, &w1] {
            let local = w.local_addrs();
            assert_eq!(local[0], ("a".to_string(), addrs[0].address));
            assert_eq!(local[1], ("b".to_string(), addrs[1].address));
        }
        // Either worker's socket accepts connections to the shared port.
        let c = tokio::net::TcpStream::connect(addrs[0].address)
            .await
            .expect("connects");
        drop(c);
    }

    #[tokio::test]
    async fn ipv6_loopback_if_available() {
        match bind_all(&[cfg("v6", "[::1]:0")], 2) {
            Ok(b) => {
                let a = b.addresses()[0].address;
                assert!(a.is_ipv6());
                assert_ne!(a.port(), 0);
                tokio::net::TcpStream::connect(a).await.expect("connects");
            }
            Err((name, e)) => {
                assert_eq!(name, "v6");
                eprintln!("skipping: no IPv6 loopback ({e})");
            }
        }
    }

    #[tokio::test]
    async fn ipv4_compat_is_dual_stack() {
        let Ok(b) = bind_all(&[cfg_v("ds", "[::]:0", true)], 1) else {
            eprintln!("skipping: no IPv6");
            return;
        };
        let port = b.addresses()[0].address.port();
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("IPv4 reaches the dual-stack socket");
        // Without ipv4_compat the v6 socket is V6ONLY: IPv4 on that port is someone else's.
        let v6only = bind_all(&[cfg("v6only", "[::]:0")], 1).expect("binds");
        let port = v6only.addresses()[0].address.port();
        let v4 = std::net::TcpListener::bind(("127.0.0.1", port));
        assert!(v4.is_ok(), "IPv4 port still free next to a V6ONLY socket");
    }

    #[test]
    fn bind_error_names_the_listener() {
        // A port held by a socket without SO_REUSEPORT cannot be shared.
        let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr").to_string();
        let e = bind_all(&[cfg("busy", &addr)], 1).expect_err("in use");
        assert_eq!(e.0, "busy");
        assert_eq!(e.1.kind(), io::ErrorKind::AddrInUse);
    }
}
