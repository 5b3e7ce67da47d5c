//! Body wrappers for streams in flight: they carry per-stream timers (route timeout, stream
//! idle timeout) and the guards that close out a stream's stats when its body ends or is
//! dropped. Frames pass through untouched (zero copy).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::upstream::BoxError;

/// A stream error raised by a timer.
#[derive(Debug, thiserror::Error)]
pub enum TimerError {
    /// The route timeout elapsed mid-response.
    #[error("upstream request timeout")]
    RouteTimeout,
    /// No frame for `stream_idle_timeout`.
    #[error("stream idle timeout")]
    Idle,
    /// `request_timeout` elapsed before the request body was complete.
    #[error("request timeout")]
    RequestTimeout,
}

/// How a body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Reached its end without error.
    Complete,
    /// The inner body (or a timer) failed: the stream is reset by weir.
    Error,
    /// Dropped before its end: the consumer (e.g. the downstream client) went away.
    Dropped,
}

/// Something to run when a body ends (successfully or not) or is dropped.
pub trait OnDone: Send + 'static {
    /// Called exactly once.
    fn done(&mut self, outcome: Outcome);
}

impl OnDone for () {
    fn done(&mut self, _outcome: Outcome) {}
}

pin_project_lite::pin_project! {
    /// Wraps a body with an optional deadline, an optional idle timeout and an [`OnDone`].
    pub struct Timed<B, D: OnDone> {
        #[pin]
        inner: B,
        // Timers are armed lazily, only when the inner body is pending: a response that is
        // ready at once (the common small response) never touches the timer wheel.
        deadline: Option<(Instant, TimerError)>,
        deadline_sleep: Option<Pin<Box<Sleep>>>,
        idle: Option<Duration>,
        idle_sleep: Option<Pin<Box<Sleep>>>,
        // A frame arrived since the idle timer was armed: re-arm it before waiting again.
        active: bool,
        fired: Option<Arc<AtomicBool>>,
        errored: Option<Arc<AtomicBool>>,
        // Data bytes passed through (access logs: bytes sent / received).
        bytes: Option<Arc<AtomicU64>>,
        done: Option<D>,
    }

    impl<B, D: OnDone> PinnedDrop for Timed<B, D> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(mut d) = this.project().done.take() {
                d.done(Outcome::Dropped);
            }
        }
    }
}

impl<B, D: OnDone> Timed<B, D> {
    /// Wrap `inner`.
    pub fn new(inner: B, done: D) -> Self {
        Self {
            inner,
            deadline: None,
            deadline_sleep: None,
            idle: None,
            idle_sleep: None,
            active: false,
            fired: None,
            errored: None,
            bytes: None,
            done: Some(done),
        }
    }

    /// Fail the body with `err` at `at`.
    pub fn deadline(mut self, at: Option<Instant>, err: TimerError) -> Self {
        self.deadline = at.map(|at| (at, err));
        self
    }

    /// Fail the body when no frame arrives for `d`.
    pub fn idle(mut self, d: Option<Duration>) -> Self {
        self.idle = d;
        self
    }

    /// Set `flag` when the inner body fails (e.g. a malformed chunked request body).
    pub fn error_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.errored = Some(flag);
        self
    }

    /// Add the size of every data frame to `n`.
    pub fn count(mut self, n: Option<Arc<AtomicU64>>) -> Self {
        self.bytes = n;
        self
    }

    /// Set `flag` when a timer fires (lets the router tell a timeout from a reset).
    pub fn flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.fired = Some(flag);
        self
    }
}

impl<B, D> Body for Timed<B, D>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
    D: OnDone,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.active = true;
                if let (Some(n), Some(d)) = (this.bytes.as_ref(), frame.data_ref()) {
                    n.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(f) = this.errored.as_ref() {
                    f.store(true, Ordering::SeqCst);
                }
                if let Some(mut d) = this.done.take() {
                    d.done(Outcome::Error);
                }
                return Poll::Ready(Some(Err(e.into())));
            }
            Poll::Ready(None) => {
                if let Some(mut d) = this.done.take() {
                    d.done(Outcome::Complete);
                }
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        let fire = |err: TimerError, this_done: &mut Option<D>| {
            if let Some(f) = this.fired.as_ref() {
                f.store(true, Ordering::SeqCst);
            }
            if let Some(mut d) = this_done.take() {
                d.done(Outcome::Error);
            }
            Poll::Ready(Some(Err(Box::new(err) as BoxError)))
        };
        if let Some((at, _)) = this.deadline.as_ref() {
            let at = *at;
            let sleep = this
                .deadline_sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if sleep.as_mut().poll(cx).is_ready() {
                let err = this
                    .deadline
                    .take()
                    .map(|(_, e)| e)
                    .unwrap_or(TimerError::RouteTimeout);
                *this.deadline_sleep = None;
                return fire(err, this.done);
            }
        }
        if let Some(d) = *this.idle {
            let sleep = match this.idle_sleep.as_mut() {
                Some(s) => {
                    if std::mem::take(this.active) {
                        s.as_mut().reset(Instant::now() + d);
                    }
                    s
                }
                None => {
                    *this.active = false;
                    this.idle_sleep.insert(Box::pin(tokio::time::sleep(d)))
                }
            };
            if sleep.as_mut().poll(cx).is_ready() {
                *this.idle = None;
                *this.idle_sleep = None;
                return fire(TimerError::Idle, this.done);
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Poll helper used by tests.
#[cfg(test)]
async fn collect<B: Body<Data = Bytes> + Unpin>(mut b: B) -> Result<Vec<u8>, B::Error> {
    use http_body_util::BodyExt;
    let mut out = Vec::new();
    while let Some(f) = b.frame().await {
        if let Ok(d) = f?.into_data() {
            out.extend_from_slice(&d);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Count(Arc<AtomicUsize>, Arc<AtomicBool>);
    impl OnDone for Count {
        fn done(&mut self, outcome: Outcome) {
            self.0.fetch_add(1, Ordering::SeqCst);
            self.1.store(outcome == Outcome::Complete, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn done_runs_once_on_completion() {
        let n = Arc::new(AtomicUsize::new(0));
        let ok = Arc::new(AtomicBool::new(false));
        let b = Timed::new(
            http_body_util::Full::new(Bytes::from_static(b"hi")),
            Count(n.clone(), ok.clone()),
        );
        assert_eq!(collect(b).await.expect("body"), b"hi");
        assert_eq!(n.load(Ordering::SeqCst), 1);
        let bytes = Arc::new(AtomicU64::new(0));
        let b = Timed::new(http_body_util::Full::new(Bytes::from_static(b"hello")), ())
            .count(Some(bytes.clone()));
        assert_eq!(collect(b).await.expect("body"), b"hello");
        assert_eq!(bytes.load(Ordering::SeqCst), 5);
        assert!(ok.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn done_runs_on_drop() {
        let n = Arc::new(AtomicUsize::new(0));
        let ok = Arc::new(AtomicBool::new(true));
        drop(Timed::new(
            http_body_util::Empty::<Bytes>::new(),
            Count(n.clone(), ok.clone()),
        ));
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert!(!ok.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_fires() {
        let (_tx, rx) =
            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
        let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
        let flag = Arc::new(AtomicBool::new(false));
        let b = Timed::new(body, ())
            .idle(Some(Duration::from_secs(5)))
            .flag(flag.clone());
        let err = collect(b).await.expect_err("idle");
        assert!(err.to_string().contains("idle"));
        assert!(flag.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_fires() {
        let (_tx, rx) =
            tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(1);
        let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
        let b = Timed::new(body, ()).deadline(
            Some(Instant::now() + Duration::from_secs(1)),
            TimerError::RouteTimeout,
        );
        let err = collect(b).await.expect_err("deadline");
        assert!(err.to_string().contains("timeout"));
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> + Unpin {
        Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}
