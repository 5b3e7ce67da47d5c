//! Peeking at the first bytes of a connection without consuming them (`recv(MSG_PEEK)`),
//! shared by the HTTP inspector and the PROXY protocol filter.

use std::io;
use std::os::fd::AsRawFd;

use tokio::io::Interest;
use tokio::net::TcpStream;

/// What a peek parser says about the bytes seen so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Peeked<T> {
    /// Decided.
    Done(T),
    /// Undecided: wait for more bytes (up to the caller's bound).
    NeedMore,
}

/// Why peeking ended without a decision.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeekError {
    /// The peer closed (or reset) before the parser decided.
    #[error("connection closed while peeking")]
    Closed,
    /// The socket failed.
    #[error("peek failed: {0}")]
    Io(#[from] io::Error),
}

/// Peek at up to `max` bytes, calling `parse` on everything the client sent so far each time
/// more arrives, until it decides. When `max` bytes are buffered and `parse` still needs more,
/// `at_max` decides. Never consumes. Unbounded in time: the caller applies the deadline.
pub(crate) async fn peek_until<T>(
    stream: &TcpStream,
    max: usize,
    mut parse: impl FnMut(&[u8]) -> Peeked<T>,
    at_max: impl FnOnce(&[u8]) -> T,
) -> Result<T, PeekError> {
    // Start small; grow with what the client sent, up to `max`.
    let mut buf = vec![0u8; max.min(256)];
    let mut seen = 0usize;
    loop {
        stream.readable().await?;
        let r = stream.try_io(Interest::READABLE, || {
            let n = nix::sys::socket::recv(
                stream.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::MSG_PEEK,
            )
            .map_err(io::Error::from)?;
            // Nothing new since the last peek: clear readiness and wait for the next edge.
            if n == seen && n != 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match r {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(PeekError::Closed),
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(PeekError::Closed);
        }
        seen = n;
        if let Peeked::Done(t) = parse(&buf[..n]) {
            return Ok(t);
        }
        if n == buf.len() {
            if buf.len() >= max {
                return Ok(at_max(&buf[..n]));
            }
            let grow = (buf.len() * 4).min(max);
            buf.resize(grow, 0);
            // The bigger buffer may already hold more: peek again at once.
            seen = 0;
        }
    }
}
