//! Draining on SIGTERM: turn NOT_SERVING, refuse new work, let work in
//! flight finish for at most a bounded time, then stop. (tonic's own
//! graceful shutdown waits for streams without a bound.)

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::error::Refusal;
use crate::Health;

#[derive(Default)]
struct Inner {
    in_flight: AtomicUsize,
    draining: AtomicBool,
    idle: Notify,
}

/// Counts work in flight and knows whether the process is draining.
#[derive(Clone, Default)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

/// Held while one unit of work runs.
pub struct InFlight {
    inner: Arc<Inner>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.inner.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.inner.idle.notify_waiters();
        }
    }
}

impl Lifecycle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Start a unit of work, unless the process is draining (UNAVAILABLE, so
    /// clients and the gateway try another replica).
    pub fn begin(&self) -> Result<InFlight, Refusal> {
        if self.inner.draining.load(Ordering::SeqCst) {
            return Err(Refusal::ShuttingDown);
        }
        self.inner.in_flight.fetch_add(1, Ordering::SeqCst);
        Ok(InFlight {
            inner: self.inner.clone(),
        })
    }

    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    pub fn draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Wait for a shutdown signal, then drain: NOT_SERVING, refuse new work,
    /// wait for work in flight, at most `drain`. Resolve to stop the server.
    pub async fn shutdown_on_signal(self, health: Arc<Health>, drain: Duration) {
        crate::shutdown_signal().await;
        self.drain(&health, drain).await;
    }

    pub async fn drain(&self, health: &Health, drain: Duration) {
        self.inner.draining.store(true, Ordering::SeqCst);
        health.not_serving().await;
        let n = self.in_flight();
        tracing::info!(in_flight = n, ?drain, "draining");
        let wait = async {
            while self.in_flight() > 0 {
                let notified = self.inner.idle.notified();
                if self.in_flight() == 0 {
                    break;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(drain, wait).await.is_err() {
            tracing::warn!(
                in_flight = self.in_flight(),
                "drain time over; stopping with work in flight"
            );
        } else {
            tracing::info!("drained");
        }
    }
}

impl Lifecycle {
    /// The two futures a server's main needs: `shutdown` (pass it to
    /// `serve_with_incoming_shutdown`: waits for a signal, then drains) and
    /// `bound` (select it against the server: resolves `grace` after the
    /// drain ended, so lingering connections cannot hold the exit).
    pub fn shutdown_pair(
        &self,
        health: Arc<Health>,
        drain: Duration,
        grace: Duration,
    ) -> (
        impl std::future::Future<Output = ()>,
        impl std::future::Future<Output = ()>,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let me = self.clone();
        let shutdown = async move {
            me.shutdown_on_signal(health, drain).await;
            let _ = tx.send(());
        };
        let bound = async move {
            if rx.await.is_ok() {
                tokio::time::sleep(grace).await;
                tracing::warn!("connections still open after the drain; exiting");
            } else {
                std::future::pending::<()>().await;
            }
        };
        (shutdown, bound)
    }
}
