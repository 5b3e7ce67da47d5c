//! The body type filters see, and a throttling body (fault `response_rate_limit`).

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// Error type of bodies flowing through the proxy.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body type (the proxy's `UpstreamBody` is this type).
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// How often the throttle refills, as Envoy's `StreamRateLimiter` (16 times per second).
const FILL_INTERVAL: Duration = Duration::from_millis(62);

pin_project_lite::pin_project! {
    /// Passes `inner` through at most `bytes_per_sec` (a token bucket refilled every
    /// [`FILL_INTERVAL`]; `None` = unthrottled); trailers pass once all data went out. Uses
    /// tokio time, so paused time in tests advances it deterministically. Holds `guard` until
    /// the body ends or is dropped.
    pub struct Throttled<B> {
        #[pin]
        inner: B,
        pending: Bytes,
        // None: pass frames through unchanged.
        per_fill: Option<u64>,
        tokens: u64,
        last_fill: Instant,
        #[pin]
        sleep: Option<Sleep>,
        // Held until the body ends (e.g. an active-fault guard).
        guard: Option<Box<dyn Send>>,
    }
}

impl<B> Throttled<B> {
    /// Throttle `inner` to `bytes_per_sec` (at least 16 bytes/s); `None` only holds `guard`.
    pub fn new(inner: B, bytes_per_sec: Option<u64>, guard: Option<Box<dyn Send>>) -> Self {
        let per_fill = bytes_per_sec.map(|b| (b / 16).max(1));
        Throttled {
            inner,
            pending: Bytes::new(),
            per_fill,
            tokens: per_fill.unwrap_or(0),
            last_fill: Instant::now(),
            sleep: None,
            guard,
        }
    }
}

impl<B> Body for Throttled<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        loop {
            if let Some(per_fill) = *this.per_fill
                && !this.pending.is_empty()
            {
                let now = Instant::now();
                let elapsed = now.saturating_duration_since(*this.last_fill).as_nanos();
                let interval = FILL_INTERVAL.as_nanos();
                let fills = elapsed / interval;
                if fills > 0 {
                    let add = u64::try_from(fills)
                        .unwrap_or(u64::MAX)
                        .saturating_mul(per_fill);
                    *this.tokens = this.tokens.saturating_add(add).min(per_fill);
                    // Keep the phase: the next fill is one interval after the last one.
                    *this.last_fill = now - Duration::from_nanos((elapsed % interval) as u64);
                }
                if *this.tokens > 0 {
                    let n = (*this.tokens).min(this.pending.len() as u64) as usize;
                    *this.tokens -= n as u64;
                    let chunk = this.pending.split_to(n);
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                let at = *this.last_fill + FILL_INTERVAL;
                if this.sleep.is_none() {
                    this.sleep.set(Some(tokio::time::sleep_until(at)));
                } else if let Some(s) = this.sleep.as_mut().as_pin_mut() {
                    s.reset(at);
                }
                if let Some(s) = this.sleep.as_mut().as_pin_mut() {
                    ready!(s.poll(cx));
                }
                continue;
            }
            return match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) if this.per_fill.is_none() => Poll::Ready(Some(Ok(frame))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        *this.pending = data;
                        continue;
                    }
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(e)) => Poll::Ready(Some(Err(e))),
                None => {
                    this.guard.take();
                    Poll::Ready(None)
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut h = self.inner.size_hint();
        let p = self.pending.len() as u64;
        h.set_lower(h.lower().saturating_add(p));
        if let Some(u) = h.upper() {
            h.set_upper(u.saturating_add(p));
        }
        h
    }
}

use std::future::Future;

/// An empty body.
pub fn empty() -> BoxBody {
    full(Bytes::new())
}

/// A body of these bytes.
pub fn full(b: impl Into<Bytes>) -> BoxBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(b.into())
        .map_err(|never| -> BoxError { match never {} })
        .boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test(start_paused = true)]
    async fn throttles_to_the_rate() {
        // 1600 bytes/s = 100 bytes per fill; 1000 bytes take 9 more fills after the first.
        let body = Full::new(Bytes::from(vec![b'x'; 1000]));
        let start = Instant::now();
        let mut t = std::pin::pin!(Throttled::new(body, Some(1600), None));
        let mut got = 0;
        let mut frames = 0;
        while let Some(f) = t.frame().await {
            let d = f.expect("frame").into_data().expect("data");
            assert!(d.len() <= 100);
            got += d.len();
            frames += 1;
        }
        assert_eq!(got, 1000);
        assert_eq!(frames, 10);
        assert_eq!(start.elapsed(), FILL_INTERVAL * 9);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_inner_bodies_do_not_overflow_the_bucket() {
        // A chunk arriving long after the last fill: tokens saturate at one fill's worth.
        let (tx, body) = {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
            let stream = futures_stream(rx);
            (tx, http_body_util::StreamBody::new(stream))
        };
        let mut t = std::pin::pin!(Throttled::new(body, Some(u64::MAX / 2), None));
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let send = async move {
            tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
                .await
                .expect("send");
            drop(tx);
        };
        let (_, f) = tokio::join!(send, t.frame());
        assert_eq!(
            f.expect("frame").expect("ok").into_data().expect("data"),
            "abc"
        );
        assert!(t.frame().await.is_none());
        // Unthrottled: frames pass as they are.
        let mut u = std::pin::pin!(Throttled::new(
            Full::new(Bytes::from_static(b"xyz")),
            None,
            None
        ));
        assert_eq!(
            u.frame()
                .await
                .expect("f")
                .expect("ok")
                .into_data()
                .expect("d"),
            "xyz"
        );
    }

    fn futures_stream(
        mut rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    ) -> impl futures::Stream<Item = Result<Frame<Bytes>, BoxError>> {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
