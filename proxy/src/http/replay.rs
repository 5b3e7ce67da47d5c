//! The request body of a request that may be sent more than once: retries replay it, and
//! mirrors (shadow requests) get a copy.
//!
//! One [`Replay`] owns the downstream body (the *source*). Each upstream attempt reads an
//! [`AttemptBody`]: first the frames already buffered (from the start), then new frames pulled
//! from the source, which are appended to the buffer as they pass. Frames are `Bytes`, so
//! buffering and mirroring copy no payload.
//!
//! * The buffer is bounded by the route's `per_request_buffer_limit` (else the listener's
//!   buffer limit). Past it the buffer is dropped and [`Replay::replayable`] turns false: the
//!   current attempt keeps streaming, but no retry is possible any more (Envoy's rule).
//! * Starting a new attempt supersedes the previous one: an old [`AttemptBody`] still held by a
//!   connection errors out instead of stealing frames.
//! * Mirrors receive each frame through a bounded channel. A mirror that falls behind (channel
//!   full) is abandoned: its body fails rather than ever slowing the primary request down.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

use crate::upstream::{BoxError, UpstreamBody};

/// Frames a mirror may lag behind the primary before it is abandoned.
const MIRROR_QUEUE: usize = 64;

#[derive(Debug, Clone)]
enum Chunk {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Chunk {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Chunk::Data(b) => Frame::data(b.clone()),
            Chunk::Trailers(t) => Frame::trailers(t.clone()),
        }
    }

    fn of(f: &Frame<Bytes>) -> Option<Chunk> {
        if let Some(d) = f.data_ref() {
            Some(Chunk::Data(d.clone()))
        } else {
            f.trailers_ref().map(|t| Chunk::Trailers(t.clone()))
        }
    }
}

struct MirrorTx {
    tx: mpsc::Sender<Chunk>,
    abandoned: Arc<AtomicBool>,
}

struct Shared {
    source: Option<UpstreamBody>,
    chunks: Vec<Chunk>,
    size: usize,
    limit: usize,
    overflowed: bool,
    ended: bool,
    error: Option<String>,
    generation: u64,
    hint: SizeHint,
    mirrors: Vec<MirrorTx>,
}

impl Shared {
    fn fan_out(&mut self, c: &Chunk) {
        self.mirrors.retain(|m| match m.tx.try_send(c.clone()) {
            Ok(()) => true,
            Err(_) => {
                m.abandoned.store(true, Ordering::Release);
                false
            }
        });
    }

    fn abandon_mirrors(&mut self) {
        for m in self.mirrors.drain(..) {
            m.abandoned.store(true, Ordering::Release);
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub(super) struct Replay {
    shared: Arc<Mutex<Shared>>,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay").finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while holding the lock cannot leave the buffer half-updated in a way that
    // matters more than the panic itself; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Replay {
    /// Own `source`, buffering up to `limit` bytes for replays.
    pub(super) fn new(source: UpstreamBody, limit: usize) -> Self {
        let ended = source.is_end_stream();
        let hint = source.size_hint();
        Self {
            shared: Arc::new(Mutex::new(Shared {
                source: (!ended).then_some(source),
                chunks: Vec::new(),
                size: 0,
                limit,
                overflowed: false,
                ended,
                error: None,
                generation: 0,
                hint,
                mirrors: Vec::new(),
            })),
        }
    }

    /// Whether another attempt could be sent with the whole body.
    pub(super) fn replayable(&self) -> bool {
        let s = lock(&self.shared);
        !s.overflowed && s.error.is_none()
    }

    /// A body for a new attempt (superseding the previous attempt's).
    pub(super) fn attempt(&self) -> AttemptBody {
        let mut s = lock(&self.shared);
        s.generation += 1;
        AttemptBody {
            shared: self.shared.clone(),
            generation: s.generation,
            pos: 0,
            sent: 0,
            hint: s.hint,
        }
    }

    /// A copy of the body for a mirror; `None` once frames were already passed on without
    /// being kept (the copy would be incomplete).
    pub(super) fn mirror(&self) -> Option<MirrorBody> {
        let mut s = lock(&self.shared);
        if s.overflowed || s.error.is_some() {
            return None;
        }
        let (tx, rx) = mpsc::channel(MIRROR_QUEUE.max(s.chunks.len() + 1));
        for c in &s.chunks {
            // Capacity covers the buffered chunks.
            if tx.try_send(c.clone()).is_err() {
                return None;
            }
        }
        let abandoned = Arc::new(AtomicBool::new(false));
        let ended = s.ended;
        if !ended {
            s.mirrors.push(MirrorTx {
                tx,
                abandoned: abandoned.clone(),
            });
        }
        Some(MirrorBody {
            rx,
            abandoned,
            hint: s.hint,
        })
    }
}

/// One attempt's view of the request body.
pub(super) struct AttemptBody {
    shared: Arc<Mutex<Shared>>,
    generation: u64,
    pos: usize,
    sent: u64,
    hint: SizeHint,
}

impl std::fmt::Debug for AttemptBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttemptBody")
            .field("generation", &self.generation)
            .field("pos", &self.pos)
            .finish()
    }
}

impl AttemptBody {
    fn yield_chunk(&mut self, c: &Chunk) -> Frame<Bytes> {
        if let Chunk::Data(d) = c {
            self.sent += d.len() as u64;
        }
        c.frame()
    }
}

impl Body for AttemptBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let shared = this.shared.clone();
        let mut s = lock(&shared);
        if s.generation != this.generation {
            return Poll::Ready(Some(Err("request body superseded by a retry".into())));
        }
        if this.pos < s.chunks.len() {
            let c = s.chunks[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(this.yield_chunk(&c))));
        }
        if let Some(e) = &s.error {
            return Poll::Ready(Some(Err(e.clone().into())));
        }
        if s.ended {
            return Poll::Ready(None);
        }
        let Some(source) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.ended = true;
                s.source = None;
                // Dropping the senders ends the mirrors' bodies cleanly.
                s.mirrors.clear();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.error = Some(e.to_string());
                s.source = None;
                s.abandon_mirrors();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(c) = Chunk::of(&frame) {
                    s.fan_out(&c);
                    if !s.overflowed {
                        if let Chunk::Data(d) = &c {
                            s.size += d.len();
                        }
                        if s.size > s.limit {
                            s.overflowed = true;
                            s.chunks = Vec::new();
                            // Mirrors that joined late rely on the buffer; ones already
                            // attached keep receiving frames.
                        } else {
                            s.chunks.push(c.clone());
                            this.pos = s.chunks.len();
                        }
                    }
                    if let Chunk::Data(d) = &c {
                        this.sent += d.len() as u64;
                    }
                }
                if s.source.as_ref().is_some_and(|b| b.is_end_stream()) {
                    s.ended = true;
                    s.source = None;
                    s.mirrors.clear();
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.shared);
        s.generation == self.generation
            && s.ended
            && s.error.is_none()
            && (s.overflowed || self.pos >= s.chunks.len())
    }

    fn size_hint(&self) -> SizeHint {
        match self.hint.exact() {
            Some(n) => SizeHint::with_exact(n.saturating_sub(self.sent)),
            None => SizeHint::default(),
        }
    }
}

/// A mirror's copy of the request body.
pub(super) struct MirrorBody {
    rx: mpsc::Receiver<Chunk>,
    abandoned: Arc<AtomicBool>,
    hint: SizeHint,
}

impl std::fmt::Debug for MirrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorBody").finish_non_exhaustive()
    }
}

impl Body for MirrorBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(c)) => Poll::Ready(Some(Ok(c.frame()))),
            Poll::Ready(None) if self.abandoned.load(Ordering::Acquire) => Poll::Ready(Some(Err(
                "mirror abandoned: it fell behind the request".into(),
            ))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    fn source(parts: &[&'static str]) -> UpstreamBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
    }

    async fn read(b: impl Body<Data = Bytes, Error = BoxError>) -> Result<String, String> {
        b.collect()
            .await
            .map(|c| String::from_utf8_lossy(&c.to_bytes()).into_owned())
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn retries_replay_the_whole_body() {
        let r = Replay::new(source(&["ab", "cd", "ef"]), 1024);
        let mut first = r.attempt();
        // The first attempt reads part of the body, then fails.
        let f = first.frame().await.expect("frame").expect("ok");
        assert_eq!(f.into_data().expect("data"), "ab");
        assert!(r.replayable());
        let second = r.attempt();
        assert_eq!(read(second).await.as_deref(), Ok("abcdef"));
        // The superseded attempt cannot steal frames.
        assert!(first.frame().await.expect("frame").is_err());
        let third = r.attempt();
        assert_eq!(read(third).await.as_deref(), Ok("abcdef"));
    }

    #[tokio::test]
    async fn past_the_limit_no_replay() {
        let r = Replay::new(source(&["abcd", "efgh", "ij"]), 6);
        let first = r.attempt();
        assert_eq!(read(first).await.as_deref(), Ok("abcdefghij"));
        assert!(!r.replayable());
        assert!(r.mirror().is_none());
    }

    #[tokio::test]
    async fn empty_body_is_replayable_and_ends_at_once() {
        let empty = http_body_util::Empty::<Bytes>::new()
            .map_err(|e| match e {})
            .boxed_unsync();
        let r = Replay::new(empty, 0);
        let a = r.attempt();
        assert!(a.is_end_stream());
        assert_eq!(a.size_hint().exact(), Some(0));
        assert!(r.replayable());
        assert_eq!(read(r.mirror().expect("mirror")).await.as_deref(), Ok(""));
    }

    #[tokio::test]
    async fn mirrors_get_a_copy() {
        let r = Replay::new(source(&["ab", "cd"]), 1024);
        let m = r.mirror().expect("mirror");
        let a = r.attempt();
        assert_eq!(read(a).await.as_deref(), Ok("abcd"));
        assert_eq!(read(m).await.as_deref(), Ok("abcd"));
    }

    #[tokio::test]
    async fn a_slow_mirror_is_abandoned_not_waited_for() {
        let parts: Vec<&'static str> = vec!["x"; MIRROR_QUEUE + 10];
        let r = Replay::new(source(&parts), 1 << 20);
        let m = r.mirror().expect("mirror");
        // The primary reads everything while the mirror reads nothing.
        let a = r.attempt();
        assert_eq!(read(a).await.map(|s| s.len()), Ok(MIRROR_QUEUE + 10));
        assert!(read(m).await.is_err());
    }

    #[tokio::test]
    async fn source_errors_reach_every_attempt() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err("boom".into()),
        ];
        let r = Replay::new(
            StreamBody::new(futures::stream::iter(frames)).boxed_unsync(),
            1024,
        );
        assert!(read(r.attempt()).await.is_err());
        assert!(!r.replayable());
        assert!(read(r.attempt()).await.is_err());
    }

    #[tokio::test]
    async fn exact_size_hint_is_kept() {
        let body = http_body_util::Full::new(Bytes::from_static(b"hello"))
            .map_err(|e| match e {})
            .boxed_unsync();
        let r = Replay::new(body, 1024);
        let a = r.attempt();
        assert_eq!(a.size_hint().exact(), Some(5));
        assert_eq!(read(a).await.as_deref(), Ok("hello"));
        assert_eq!(r.attempt().size_hint().exact(), Some(5));
    }
}
