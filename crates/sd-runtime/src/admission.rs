//! Admission control: at most N units of work run at once and at most Q
//! wait; beyond that a request is refused at once with RESOURCE_EXHAUSTED,
//! so overload never turns into unbounded queues and timeouts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::Refusal;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Clone)]
pub struct Admission {
    permits: Arc<Semaphore>,
    queued: Arc<AtomicUsize>,
    max_queue: usize,
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

impl Admission {
    pub fn new(what: &'static str, concurrency: usize, max_queue: usize) -> Self {
        Admission {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            queued: Arc::new(AtomicUsize::new(0)),
            max_queue,
            what,
        }
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// A slot now, or a place in the queue, or [`Refusal::Overloaded`].
    pub async fn admit(&self) -> Result<Slot, Refusal> {
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
        let p = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Refusal::ShuttingDown)?;
        Ok(Slot { _permit: p })
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
}
