//! Allocation-free text for the request end: socket addresses and decimal numbers rendered
//! into stack buffers. The access log line and the span attributes render several of them
//! per request, and going through `core::fmt` (`write!` with its `Formatter` and
//! `pad_integral`) was a visible share of both in profiles; IPv4 addresses and numbers are
//! written by hand here, anything else (IPv6, scoped addresses) still through `Display`.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// `n` in decimal, in `buf`.
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

/// A stack buffer that renders an address (the longest, a scoped IPv6 socket address, is
/// well below 64 bytes).
pub struct AddrBuf {
    buf: [u8; 64],
    len: usize,
}

impl Default for AddrBuf {
    fn default() -> Self {
        Self {
            buf: [0; 64],
            len: 0,
        }
    }
}

impl std::fmt::Write for AddrBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(std::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl AddrBuf {
    fn text(&self) -> &str {
        // Only whole `str`s and ASCII digits, dots and colons were copied in.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    fn push_byte(&mut self, b: u8) {
        // At most 21 bytes are pushed this way (`255.255.255.255:65535`).
        if self.len < self.buf.len() {
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    fn push_num(&mut self, n: u64) {
        let mut d = [0u8; 20];
        let s = decimal(n, &mut d);
        let _ = self.write_str(s);
    }

    fn push_v4(&mut self, ip: Ipv4Addr) {
        for (i, o) in ip.octets().into_iter().enumerate() {
            if i > 0 {
                self.push_byte(b'.');
            }
            self.push_num(u64::from(o));
        }
    }

    fn show(&mut self, v: &dyn std::fmt::Display) -> &str {
        self.len = 0;
        if write!(self, "{v}").is_err() {
            self.len = 0;
        }
        self.text()
    }

    /// `a` as `Display` renders it (`1.2.3.4:80`, `[::1]:80`).
    pub fn socket(&mut self, a: SocketAddr) -> &str {
        match a {
            SocketAddr::V4(v4) => {
                self.len = 0;
                self.push_v4(*v4.ip());
                self.push_byte(b':');
                self.push_num(u64::from(v4.port()));
                self.text()
            }
            SocketAddr::V6(_) => self.show(&a),
        }
    }

    /// `ip` as `Display` renders it.
    pub fn ip(&mut self, ip: IpAddr) -> &str {
        match ip {
            IpAddr::V4(v4) => {
                self.len = 0;
                self.push_v4(v4);
                self.text()
            }
            IpAddr::V6(_) => self.show(&ip),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_render_as_display_does() {
        let cases: Vec<SocketAddr> = vec![
            "0.0.0.0:0".parse().unwrap(),
            "1.2.3.4:80".parse().unwrap(),
            "127.0.0.1:18080".parse().unwrap(),
            "255.255.255.255:65535".parse().unwrap(),
            "10.0.100.9:9".parse().unwrap(),
            "[::1]:443".parse().unwrap(),
            "[2001:db8::1]:8080".parse().unwrap(),
            "[fe80::1%2]:1".parse().unwrap(),
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535"
                .parse()
                .unwrap(),
        ];
        for a in cases {
            assert_eq!(AddrBuf::default().socket(a), a.to_string());
            assert_eq!(AddrBuf::default().ip(a.ip()), a.ip().to_string());
        }
        // One buffer reused for several renderings.
        let mut b = AddrBuf::default();
        assert_eq!(b.socket("[::1]:443".parse().unwrap()), "[::1]:443");
        assert_eq!(b.ip("9.8.7.6".parse().unwrap()), "9.8.7.6");
    }

    #[test]
    fn decimals() {
        let mut b = [0u8; 20];
        for n in [0, 1, 9, 10, 99, 100, 65535, 1 << 32, u64::MAX] {
            assert_eq!(decimal(n, &mut b), n.to_string());
        }
    }
}
