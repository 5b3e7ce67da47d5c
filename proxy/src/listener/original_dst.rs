//! `envoy.filters.listener.original_dst`: the destination a connection had before the
//! kernel's NAT (`iptables -t nat ... -j REDIRECT` / `DNAT`) rewrote it.
//!
//! Linux keeps the pre-NAT destination in the conntrack entry of the connection; the
//! `SO_ORIGINAL_DST` (IPv4, `SOL_IP`) and `IP6T_SO_ORIGINAL_DST` (IPv6, `SOL_IPV6`) socket
//! options read it back. The calls go through `nix`'s typed `getsockopt` wrappers (the option
//! value is a plain `sockaddr_in` / `sockaddr_in6`), so no `unsafe` is needed here.
//!
//! When the option is not available (no conntrack entry: the connection was not NATed and
//! conntrack is not loaded, `ENOENT`; not Linux) the caller keeps the socket's local address,
//! as Envoy does (`getOriginalDst` returns null and the address is not restored).

use std::net::SocketAddr;

/// The connection's original destination, or `None` when the kernel has none for it.
/// `local` is the socket's local address (it decides IPv4 vs IPv6; an IPv4-mapped local
/// address on a dual-stack socket asks for the IPv4 entry first).
#[cfg(target_os = "linux")]
pub(crate) fn original_dst(
    stream: &tokio::net::TcpStream,
    local: SocketAddr,
) -> Option<SocketAddr> {
    use nix::sys::socket::{SockaddrIn, SockaddrIn6, getsockopt, sockopt};
    let v4 = || {
        getsockopt(stream, sockopt::OriginalDst)
            .ok()
            .map(|sa| SocketAddr::V4(SockaddrIn::from(sa).into()))
    };
    let v6 = || {
        getsockopt(stream, sockopt::Ip6tOriginalDst)
            .ok()
            .map(|sa| SocketAddr::V6(SockaddrIn6::from(sa).into()))
    };
    let mapped_v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let found = if mapped_v4 { v4().or_else(v6) } else { v6() };
    found.map(super::worker::unmap)
}

/// Not Linux: there is no NAT table to ask.
#[cfg(not(target_os = "linux"))]
pub(crate) fn original_dst(
    _stream: &tokio::net::TcpStream,
    _local: SocketAddr,
) -> Option<SocketAddr> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a NAT rule the kernel either has a conntrack entry whose original destination
    /// is the address connected to (conntrack loaded) or none (ENOENT): both mean "the local
    /// address".
    #[tokio::test]
    async fn no_nat_is_the_local_address_or_nothing() {
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = tokio::net::TcpListener::bind(bind).await else {
                continue; // no IPv6 here
            };
            let addr = l.local_addr().expect("addr");
            let c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (s, _) = l.accept().await.expect("accept");
            let local = s.local_addr().expect("local");
            match original_dst(&s, local) {
                None => {}
                Some(d) => assert_eq!(d, local),
            }
            drop(c);
        }
    }
}
