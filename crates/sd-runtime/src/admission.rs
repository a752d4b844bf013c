//! Admission control: at most N units of work run at once and at most Q
//! wait — and, where work has a predicted cost, at most S predicted seconds
//! of it wait; beyond that a request is refused at once with
//! RESOURCE_EXHAUSTED, so overload never turns into unbounded queues and
//! timeouts.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::Refusal;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Clone)]
pub struct Admission {
    permits: Arc<Semaphore>,
    queued: Arc<AtomicUsize>,
    max_queue: usize,
    /// Predicted milliseconds of the work waiting, and their bound.
    queued_ms: Arc<AtomicU64>,
    max_queue_ms: u64,
    what: &'static str,
}

/// A running slot; freed on drop (also when the request is cancelled).
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

struct QueuedGuard(Arc<AtomicUsize>);

impl Drop for QueuedGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct QueuedMs(Arc<AtomicU64>, u64);

impl Drop for QueuedMs {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::SeqCst);
    }
}

impl Admission {
    pub fn new(what: &'static str, concurrency: usize, max_queue: usize) -> Self {
        Admission {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            queued: Arc::new(AtomicUsize::new(0)),
            max_queue,
            queued_ms: Arc::new(AtomicU64::new(0)),
            max_queue_ms: u64::MAX,
            what,
        }
    }

    /// Bound the predicted seconds waiting as well as the requests.
    pub fn with_max_queue_seconds(mut self, seconds: f64) -> Self {
        self.max_queue_ms = seconds_to_ms(seconds);
        self
    }

    /// Predicted seconds of the work waiting now.
    pub fn queued_seconds(&self) -> f64 {
        self.queued_ms.load(Ordering::SeqCst) as f64 / 1000.0
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// A slot now, or a place in the queue, or [`Refusal::Overloaded`].
    pub async fn admit(&self) -> Result<Slot, Refusal> {
        self.admit_costing(0.0).await
    }

    /// Admit work predicted to take `seconds`: a slot now, or a place in
    /// the queue while the queue holds fewer than `max_queue` requests and
    /// (this one included) at most the queue's predicted seconds, or a
    /// refusal. A request alone in the queue is never refused for its
    /// seconds (what one request may cost is bounded before admission).
    pub async fn admit_costing(&self, seconds: f64) -> Result<Slot, Refusal> {
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            return Ok(Slot { _permit: p });
        }
        let q = self.queued.fetch_add(1, Ordering::SeqCst);
        let _guard = QueuedGuard(self.queued.clone());
        if q >= self.max_queue {
            return Err(Refusal::Overloaded {
                what: self.what,
                max_queue: self.max_queue,
            });
        }
        let ms = seconds_to_ms(seconds);
        let ahead = self.queued_ms.fetch_add(ms, Ordering::SeqCst);
        let _ms = QueuedMs(self.queued_ms.clone(), ms);
        if ahead > 0 && ahead.saturating_add(ms) > self.max_queue_ms {
            return Err(Refusal::Backlog {
                what: self.what,
                queued_seconds: ahead.saturating_add(ms).div_ceil(1000),
                max_seconds: self.max_queue_ms / 1000,
            });
        }
        let p = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Refusal::ShuttingDown)?;
        Ok(Slot { _permit: p })
    }
}

fn seconds_to_ms(seconds: f64) -> u64 {
    if seconds.is_finite() && seconds > 0.0 {
        (seconds * 1000.0).min(u64::MAX as f64 / 2.0) as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_beyond_slots_and_queue_and_frees_on_drop() {
        let a = Admission::new("test", 1, 1);
        let s1 = a.admit().await.unwrap();
        let a2 = a.clone();
        let waiting = tokio::spawn(async move { a2.admit().await.map(|_| ()) });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(a.queued(), 1);
        let e = a.admit().await.err().expect("queue full");
        assert!(matches!(e, Refusal::Overloaded { max_queue: 1, .. }), "{e}");
        drop(s1);
        waiting.await.unwrap().unwrap();
        assert_eq!(a.queued(), 0);
        assert!(a.admit().await.is_ok());
    }

    #[tokio::test]
    async fn the_queue_is_bounded_in_predicted_seconds() {
        let a = Admission::new("test", 1, 10).with_max_queue_seconds(100.0);
        let running = a.admit_costing(500.0).await.unwrap();
        let queue = |s: f64| {
            let a = a.clone();
            tokio::spawn(async move { a.admit_costing(s).await.map(|_| ()) })
        };
        let first = queue(150.0); // alone in the queue: over 100 s, still queued
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!((a.queued(), a.queued_seconds()), (1, 150.0));
        let e = a.admit_costing(1.0).await.err().expect("151 s > 100 s");
        assert_eq!(
            e,
            Refusal::Backlog {
                what: "test",
                queued_seconds: 151,
                max_seconds: 100
            }
        );
        assert_eq!(a.queued_seconds(), 150.0, "the refused one left no trace");
        drop(running);
        first.await.unwrap().unwrap();
        assert_eq!((a.queued(), a.queued_seconds()), (0, 0.0));
    }
}
