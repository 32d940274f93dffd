//! A stream written as an async function: the function hands each item to a [`Yielder`],
//! and whoever polls the stream drives the function. No task and no channel between them,
//! so an SSE body that follows the event log costs one task wake-up per event (the
//! connection's), and frames that are ready together leave in one write.
//!
//! Back-pressure is the poller's: the function is suspended at `send` until the item has
//! been taken and the stream is polled again. Dropping the stream drops the function.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::Stream;

/// Hands items from the function to the stream.
#[derive(Debug)]
pub(crate) struct Yielder<T> {
    slot: Arc<Mutex<Option<T>>>,
}

impl<T> Clone for Yielder<T> {
    fn clone(&self) -> Self {
        Self {
            slot: self.slot.clone(),
        }
    }
}

impl<T> Yielder<T> {
    /// Yields `item` to the stream; resolves when the stream is polled for the next one.
    pub(crate) async fn send(&self, item: T) {
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(item);
        SuspendOnce(false).await;
    }
}

/// Pending once, without arranging a wake-up: the stream answers `Ready(Some(item))` in
/// that same poll, so its poller comes back when it wants more.
struct SuspendOnce(bool);

impl Future for SuspendOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            Poll::Pending
        }
    }
}

/// The stream of what a function yields; ends when the function returns.
pub(crate) struct Generator<T> {
    slot: Arc<Mutex<Option<T>>>,
    body: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl<T: Send + 'static> Generator<T> {
    /// Runs `f` as the stream is polled.
    pub(crate) fn new<F, Fut>(f: F) -> Self
    where
        F: FnOnce(Yielder<T>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let slot = Arc::new(Mutex::new(None));
        let body = f(Yielder { slot: slot.clone() });
        Self {
            slot,
            body: Some(Box::pin(body)),
        }
    }
}

impl<T> Stream for Generator<T> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = self.get_mut();
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let done = body.as_mut().poll(cx).is_ready();
        if done {
            this.body = None;
        }
        let item = this
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match item {
            Some(item) => Poll::Ready(Some(item)),
            None if done => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt as _;

    use super::*;

    #[tokio::test]
    async fn yields_every_item_in_order_then_ends() {
        let stream = Generator::new(|y| async move {
            for i in 0..5 {
                y.send(i).await;
                tokio::task::yield_now().await;
            }
        });
        assert_eq!(stream.collect::<Vec<i32>>().await, vec![0, 1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn the_function_waits_until_the_stream_asks_again() {
        let progress = Arc::new(Mutex::new(0));
        let p = progress.clone();
        let mut stream = Generator::new(|y| async move {
            for i in 0..3 {
                *p.lock().unwrap() = i;
                y.send(i).await;
            }
        });
        assert_eq!(stream.next().await, Some(0));
        assert_eq!(*progress.lock().unwrap(), 0, "ran ahead of its poller");
        assert_eq!(stream.next().await, Some(1));
        assert_eq!(*progress.lock().unwrap(), 1);
    }
}
