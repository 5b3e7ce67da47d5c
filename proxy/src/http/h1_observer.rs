//! HTTP/1 request-framing observer.
//!
//! hyper's HTTP/1 server parser drops `Content-Length` when `Transfer-Encoding` is also
//! present, so the service cannot see that a request carried both (a request-smuggling
//! shape that Envoy answers with 400 by default). [`Observer`] wraps the downstream IO and
//! watches the bytes hyper reads: it collects each request head, records whether it carried
//! both headers (a verdict per request, in request order, in [`Verdicts`]) and then follows
//! the body framing exactly as hyper does (chunked when `Transfer-Encoding` is present, else
//! `Content-Length`, else no body) to find the next head.
//!
//! Cost: heads and chunk-size lines are scanned byte by byte; body bytes are skipped by
//! count; nothing is buffered except the current head (capped). The bytes handed to hyper
//! are never changed. On anything the observer cannot follow (HTTP/2 preface, `Upgrade`,
//! `CONNECT`, unparsable or oversized heads, invalid chunk framing) it stops for the rest of
//! the connection; hyper answers errors itself.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the observer knows about the next HTTP/1 request hyper hands to the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Observed; it did not carry both `Content-Length` and `Transfer-Encoding`.
    Clean,
    /// Observed; it carried both `Content-Length` and `Transfer-Encoding`.
    ClAndTe,
    /// Not observed: the observer had stopped (after an `Upgrade`/`CONNECT` request, or on
    /// framing it could not follow).
    Unobserved,
}

#[derive(Debug, Default)]
struct Inner {
    /// `true` = both `Content-Length` and `Transfer-Encoding`; in request order.
    verdicts: VecDeque<bool>,
    stopped: bool,
}

/// Per-connection verdict queue shared by the [`Observer`] and the request handler.
#[derive(Debug, Default)]
pub struct Verdicts(Mutex<Inner>);

impl Verdicts {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The verdict for the next HTTP/1 request (call once per HTTP/1 request, in order).
    pub fn pop(&self) -> Verdict {
        let mut g = self.lock();
        match g.verdicts.pop_front() {
            Some(true) => Verdict::ClAndTe,
            Some(false) => Verdict::Clean,
            None if g.stopped => Verdict::Unobserved,
            None => Verdict::Clean,
        }
    }

    fn push(&self, cl_and_te: bool) {
        self.lock().verdicts.push_back(cl_and_te);
    }

    fn stop(&self) {
        self.lock().stopped = true;
    }
}

/// Chunked body decoding states (hyper's `ChunkedState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Start,
    Size(u64),
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    EndCr,
    EndLf,
    Trailer,
    TrailerLf,
}

#[derive(Debug)]
enum State {
    /// Collecting a request head.
    Head {
        buf: Vec<u8>,
        /// Bytes (other than CR) on the current line.
        line_len: usize,
        /// Non-empty lines seen (leading empty lines are skipped, as httparse does).
        lines: usize,
    },
    /// `Content-Length` body bytes left.
    Skip(u64),
    Chunked(Chunk),
    Stopped,
}

impl State {
    fn head() -> Self {
        State::Head {
            buf: Vec::new(),
            line_len: 0,
            lines: 0,
        }
    }
}

/// The framing state machine, independent of IO.
#[derive(Debug)]
struct Tracker {
    state: State,
    verdicts: Arc<Verdicts>,
    /// Largest head observed before giving up (hyper answers 431 before that).
    max_head: usize,
    /// hyper's header count limit (more and hyper rejects the request).
    max_headers: usize,
}

impl Tracker {
    fn stop(&mut self) {
        if !matches!(self.state, State::Stopped) {
            self.state = State::Stopped;
            self.verdicts.stop();
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Stopped => return,
                State::Head {
                    buf,
                    line_len,
                    lines,
                } => {
                    let mut end = None;
                    for (i, &b) in data.iter().enumerate() {
                        match b {
                            b'\n' if *line_len == 0 && *lines > 0 => {
                                end = Some(i);
                                break;
                            }
                            b'\n' => {
                                if *line_len > 0 {
                                    *lines += 1;
                                }
                                *line_len = 0;
                            }
                            b'\r' => {}
                            _ => *line_len += 1,
                        }
                    }
                    let take = end.map_or(data.len(), |i| i + 1);
                    if buf.len() + take > self.max_head {
                        self.stop();
                        return;
                    }
                    buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if end.is_some() {
                        let buf = std::mem::take(buf);
                        let lines = *lines;
                        self.finish_head(&buf, lines);
                    }
                }
                State::Skip(n) => {
                    let k = data.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
                    *n -= k as u64;
                    data = &data[k..];
                    if *n == 0 {
                        self.state = State::head();
                    }
                }
                State::Chunked(Chunk::Data(n)) => {
                    let k = data.len().min(usize::try_from(*n).unwrap_or(usize::MAX));
                    *n -= k as u64;
                    data = &data[k..];
                    if *n == 0 {
                        self.state = State::Chunked(Chunk::DataCr);
                    }
                }
                State::Chunked(c) => {
                    let b = data[0];
                    data = &data[1..];
                    match chunk_step(*c, b) {
                        Some(Chunk::Data(0)) | None => self.stop(),
                        Some(Chunk::Start) if *c == Chunk::EndLf => self.state = State::head(),
                        Some(next) => *c = next,
                    }
                }
            }
        }
    }

    /// A complete head (ending with its empty line) is in `buf`.
    fn finish_head(&mut self, buf: &[u8], lines: usize) {
        if buf.starts_with(b"PRI * HTTP/2.0") {
            self.stop();
            return;
        }
        let mut headers = vec![httparse::EMPTY_HEADER; lines.min(self.max_headers + 1)];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) if n == buf.len() => {}
            _ => {
                self.stop();
                return;
            }
        }
        let mut cl: Option<Option<u64>> = None;
        let mut te = false;
        let mut upgrade = false;
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = parse_content_length(h.value);
                cl = match (cl, v) {
                    (None, v) => Some(v),
                    (Some(Some(a)), Some(b)) if a == b => Some(Some(a)),
                    _ => Some(None),
                };
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = true;
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        self.verdicts.push(cl.is_some() && te);
        if upgrade || req.method.is_some_and(|m| m == "CONNECT") {
            self.stop();
        } else if te {
            self.state = State::Chunked(Chunk::Start);
        } else {
            match cl {
                None | Some(Some(0)) => self.state = State::head(),
                Some(Some(n)) => self.state = State::Skip(n),
                // Invalid or conflicting: hyper rejects the request.
                Some(None) => self.stop(),
            }
        }
    }
}

/// hyper's `content_length_parse`: ASCII digits only (httparse trims the value).
fn parse_content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

fn hex(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    }
}

/// One byte of chunked framing outside chunk data, as hyper's decoder reads it. `None`:
/// hyper rejects the body. `Start` after `EndLf`: the body is complete.
fn chunk_step(c: Chunk, b: u8) -> Option<Chunk> {
    let grow = |size: u64, d: u64| size.checked_mul(16)?.checked_add(d);
    Some(match (c, b) {
        (Chunk::Start, b) => Chunk::Size(hex(b)?),
        (Chunk::Size(s), b'\t' | b' ') => Chunk::SizeLws(s),
        (Chunk::Size(s) | Chunk::SizeLws(s), b';') => Chunk::Extension(s),
        (Chunk::Size(s) | Chunk::SizeLws(s) | Chunk::Extension(s), b'\r') => Chunk::SizeLf(s),
        (Chunk::Size(s), b) => Chunk::Size(grow(s, hex(b)?)?),
        (Chunk::SizeLws(s), b'\t' | b' ') => Chunk::SizeLws(s),
        (Chunk::SizeLws(_), _) => return None,
        (Chunk::Extension(_), b'\n') => return None,
        (Chunk::Extension(s), _) => Chunk::Extension(s),
        (Chunk::SizeLf(0), b'\n') => Chunk::EndCr,
        (Chunk::SizeLf(s), b'\n') => Chunk::Data(s),
        (Chunk::SizeLf(_), _) => return None,
        (Chunk::DataCr, b'\r') => Chunk::DataLf,
        (Chunk::DataLf, b'\n') => Chunk::Start,
        (Chunk::DataCr | Chunk::DataLf, _) => return None,
        (Chunk::EndCr, b'\r') => Chunk::EndLf,
        (Chunk::EndCr, _) => Chunk::Trailer,
        (Chunk::EndLf, b'\n') => Chunk::Start,
        (Chunk::EndLf, _) => return None,
        (Chunk::Trailer, b'\r') => Chunk::TrailerLf,
        (Chunk::Trailer, _) => Chunk::Trailer,
        (Chunk::TrailerLf, b'\n') => Chunk::EndCr,
        (Chunk::TrailerLf, _) => return None,
        // Data is skipped by count in `feed`, never stepped byte by byte.
        (Chunk::Data(_), _) => return None,
    })
}

/// IO wrapper that observes the request bytes hyper reads (see the module docs). Writes
/// pass through untouched.
#[derive(Debug)]
pub struct Observer<I> {
    inner: I,
    tracker: Tracker,
}

impl<I> Observer<I> {
    /// `max_head`: the largest request head to observe (beyond it hyper answers 431);
    /// `max_headers`: hyper's header count limit. `active: false` starts stopped (HTTP/2
    /// only connections).
    pub fn new(
        inner: I,
        verdicts: Arc<Verdicts>,
        max_head: usize,
        max_headers: usize,
        active: bool,
    ) -> Self {
        let mut tracker = Tracker {
            state: State::head(),
            verdicts,
            max_head,
            max_headers,
        };
        if !active {
            tracker.stop();
        }
        Observer { inner, tracker }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Observer<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res
            && !matches!(this.tracker.state, State::Stopped)
        {
            this.tracker.feed(&buf.filled()[before..]);
        }
        res
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Observer<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn tracker() -> (Tracker, Arc<Verdicts>) {
        let v = Arc::new(Verdicts::default());
        let t = Tracker {
            state: State::head(),
            verdicts: v.clone(),
            max_head: 64 * 1024,
            max_headers: 100,
        };
        (t, v)
    }

    fn drain(v: &Verdicts) -> Vec<Verdict> {
        let mut out = Vec::new();
        while !v.lock().verdicts.is_empty() {
            out.push(v.pop());
        }
        out
    }

    /// Feeds `input` split at `cuts` (sorted offsets) and returns the verdicts.
    fn run_split(input: &[u8], cuts: &[usize]) -> (Tracker, Vec<Verdict>) {
        let (mut t, v) = tracker();
        let mut prev = 0;
        for &c in cuts.iter().chain(std::iter::once(&input.len())) {
            t.feed(&input[prev..c]);
            prev = c;
        }
        let out = drain(&v);
        (t, out)
    }

    fn run_every_split(input: &[u8], want: &[Verdict]) {
        // One read, byte by byte, and every single cut point.
        let (t, got) = run_split(input, &[]);
        assert_eq!(got, want, "one read");
        assert!(!matches!(t.state, State::Stopped));
        let all: Vec<usize> = (1..input.len()).collect();
        let (t, got) = run_split(input, &all);
        assert_eq!(got, want, "byte by byte");
        assert!(!matches!(t.state, State::Stopped));
        for i in 1..input.len() {
            let (t, got) = run_split(input, &[i]);
            assert_eq!(got, want, "cut at {i}");
            assert!(!matches!(t.state, State::Stopped), "cut at {i}");
        }
    }

    use Verdict::{ClAndTe, Clean};

    #[test]
    fn plain_requests_are_clean() {
        run_every_split(
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
            &[Clean, Clean],
        );
        // Leading empty lines (httparse skips them) and bare LF line ends.
        run_every_split(
            b"\r\n\r\nGET / HTTP/1.1\nHost: x\n\nGET / HTTP/1.0\r\n\r\n",
            &[Clean, Clean],
        );
    }

    #[test]
    fn content_length_bodies_are_skipped() {
        // The body looks like a CL+TE head: it must be skipped, not parsed.
        let body = b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut input = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        input.extend_from_slice(body);
        input.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\n\r\n");
        run_every_split(&input, &[Clean, Clean]);
    }

    #[test]
    fn chunked_bodies_with_extensions_and_trailers() {
        let input = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1;b\r\nhello\r\n\
            A \t;x\r\n0123456789\r\n\
            0;last\r\nTrailer-A: 1\r\nTrailer-B: 2\r\n\r\n\
            POST / HTTP/1.1\r\nHost: x\r\ntransfer-encoding: chunked\r\n\r\n\
            3\r\nabc\r\n0\r\n\r\n\
            GET / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
            GET /last HTTP/1.1\r\n\r\n";
        run_every_split(input, &[Clean, Clean, ClAndTe, Clean]);
    }

    #[test]
    fn chunk_data_is_not_parsed() {
        let input = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
            10\r\n0\r\n\r\nGET / HTTP/\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        run_every_split(input, &[Clean, Clean]);
    }

    #[test]
    fn cl_and_te_in_either_order() {
        run_every_split(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            &[ClAndTe],
        );
        run_every_split(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            &[ClAndTe],
        );
        // Invalid Content-Length still counts as present.
        let (_, got) = run_split(
            b"POST / HTTP/1.1\r\nContent-Length: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            &[],
        );
        assert_eq!(got, [ClAndTe]);
    }

    #[test]
    fn pipelined_verdicts_keep_order() {
        let input = b"GET /1 HTTP/1.1\r\n\r\n\
            POST /2 HTTP/1.1\r\nContent-Length: 2\r\n\r\nab\
            POST /3 HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n0\r\n\r\n\
            GET /4 HTTP/1.1\r\n\r\n";
        run_every_split(input, &[Clean, Clean, ClAndTe, Clean]);
    }

    #[test]
    fn upgrade_and_connect_stop() {
        let (t, v) = run_split(
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\
              GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            &[],
        );
        assert!(matches!(t.state, State::Stopped));
        assert_eq!(v, [Clean]);
        assert_eq!(t.verdicts.pop(), Verdict::Unobserved);
        let (t, v) = run_split(
            b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            &[],
        );
        assert!(matches!(t.state, State::Stopped));
        assert_eq!(v, [Clean]);
    }

    #[test]
    fn h2_preface_and_garbage_stop() {
        let (t, v) = run_split(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04", &[]);
        assert!(matches!(t.state, State::Stopped));
        assert!(v.is_empty());
        assert_eq!(t.verdicts.pop(), Verdict::Unobserved);
        let (t, v) = run_split(b"GARBAGE\r\n\r\n", &[]);
        assert!(matches!(t.state, State::Stopped));
        assert!(v.is_empty());
        // Invalid chunk framing.
        let (t, v) = run_split(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            &[],
        );
        assert!(matches!(t.state, State::Stopped));
        assert_eq!(v, [Clean]);
        // Chunk size overflow.
        let (t, _) = run_split(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
            &[],
        );
        assert!(matches!(t.state, State::Stopped));
    }

    #[test]
    fn oversized_head_stops() {
        let (mut t, v) = tracker();
        t.max_head = 64;
        t.feed(b"GET / HTTP/1.1\r\n");
        t.feed(&[b'a'; 100]);
        assert!(matches!(t.state, State::Stopped));
        assert!(drain(&v).is_empty());
        assert_eq!(v.pop(), Verdict::Unobserved);
    }

    #[test]
    fn fresh_queue_without_stop_is_clean() {
        let v = Verdicts::default();
        assert_eq!(v.pop(), Verdict::Clean);
    }

    #[tokio::test]
    async fn wrapper_passes_bytes_unchanged() {
        let input: &[u8] =
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let (mut client, server) = tokio::io::duplex(7);
        let v = Arc::new(Verdicts::default());
        let mut obs = Observer::new(server, v.clone(), 1024, 100, true);
        let w = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for part in input.chunks(3) {
                client.write_all(part).await?;
            }
            client.shutdown().await
        });
        let mut got = Vec::new();
        obs.read_to_end(&mut got).await.expect("read");
        w.await.expect("join").expect("write");
        assert_eq!(got, input);
        assert_eq!(v.pop(), ClAndTe);
        let mut off = Observer::new(tokio::io::empty(), v.clone(), 1024, 100, false);
        let mut none = Vec::new();
        off.read_to_end(&mut none).await.expect("read");
        assert_eq!(v.pop(), Verdict::Unobserved);
    }
}
