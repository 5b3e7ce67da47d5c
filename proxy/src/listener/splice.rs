//! Zero-copy TCP proxying on Linux: `socket -> pipe -> socket` with `splice(2)`, one pipe per
//! direction. Readiness comes from tokio (`readable()`/`writable()` + `try_io`), so `EAGAIN`
//! from either end just clears that end's readiness and waits again.
//!
//! A direction only reads from its socket when its pipe is empty, so an `EAGAIN` while
//! filling means "socket not readable" and one while draining means "socket not writable";
//! never "pipe full/empty". At most one pipe's worth of bytes (bounded by
//! `per_connection_buffer_limit_bytes`) is in flight per direction.
//!
//! Writing to a socket whose peer is gone raises `SIGPIPE` for `splice`; Rust programs ignore
//! `SIGPIPE` from startup, so it surfaces as `EPIPE` and ends the connection.

use std::io;
use std::os::fd::OwnedFd;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::tcp_proxy::{Meter, shutdown_write};

/// Never ask for a bigger pipe than this (the default `fs.pipe-max-size` for unprivileged
/// processes).
const MAX_PIPE: usize = 1024 * 1024;

/// One pipe.
#[derive(Debug)]
pub(crate) struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

impl Pipe {
    fn new(limit: usize) -> io::Result<Self> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let want = limit.clamp(4096, MAX_PIPE) as i32;
        // May fail (EPERM over fs.pipe-max-size or the per-user pipe budget): keep the default.
        let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(want));
        let cap = fcntl(&w, FcntlArg::F_GETPIPE_SZ)
            .ok()
            .and_then(|c| usize::try_from(c).ok())
            .filter(|c| *c > 0)
            .unwrap_or(4096);
        Ok(Self { r, w, cap })
    }
}

/// The two pipes of a proxied connection.
#[derive(Debug)]
pub(crate) struct Pipes {
    up: Pipe,
    down: Pipe,
}

impl Pipes {
    /// Two pipes sized to `limit` where the kernel allows.
    pub(crate) fn new(limit: usize) -> io::Result<Self> {
        Ok(Self {
            up: Pipe::new(limit)?,
            down: Pipe::new(limit)?,
        })
    }
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// Both directions concurrently; returns when both reached EOF (and propagated it) or on the
/// first error.
pub(crate) async fn splice_bidirectional(
    downstream: &TcpStream,
    upstream: &TcpStream,
    pipes: &Pipes,
    meter: &Meter,
) -> io::Result<()> {
    let up = direction(downstream, upstream, &pipes.up, meter, true);
    let down = direction(upstream, downstream, &pipes.down, meter, false);
    tokio::try_join!(up, down).map(|_| ())
}

async fn direction(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    meter: &Meter,
    from_downstream: bool,
) -> io::Result<()> {
    loop {
        // Fill: socket -> pipe (the pipe is empty here).
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from, None, &pipe.w, None, pipe.cap, FLAGS).map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return shutdown_write(to);
        }
        if from_downstream {
            meter.rx(n);
        }
        // Drain: pipe -> socket, until the pipe is empty again.
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(&pipe.r, None, to, None, left, FLAGS).map_err(io::Error::from)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => {
                    left -= w;
                    if from_downstream {
                        meter.touch();
                    } else {
                        meter.tx(w);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
