//! A bounded worker for forward passes on model threads of its own, which
//! reports each call's queue wait and forward time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_runtime::admission::Admission;
use sd_runtime::metrics::{Metrics, Phase};

use crate::{threads, ServiceError};

/// How long a call waited for the model and how long the model worked on
/// it (for a batched call: the whole forward it shared).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timings {
    pub queue: Duration,
    pub forward: Duration,
}

impl Timings {
    /// Record on `span` (an [`rpc_span`]) as `queue_ms` and `forward_ms`.
    pub fn record(&self, span: &tracing::Span) {
        span.record("queue_ms", self.queue.as_secs_f64() * 1e3);
        span.record("forward_ms", self.forward.as_secs_f64() * 1e3);
    }
}

/// Runs model work on `concurrency` model threads of its own (see
/// [`threads`]), at most `max_queue` calls waiting (beyond:
/// RESOURCE_EXHAUSTED).
#[derive(Clone)]
pub struct Worker {
    admission: Admission,
    metrics: Arc<Metrics>,
    threads: Arc<threads::ModelThreads>,
}

impl Worker {
    /// `workers` forwards at once, `max_queue` calls waiting.
    pub fn new(workers: usize, max_queue: usize, metrics: Arc<Metrics>) -> Self {
        Worker {
            admission: Admission::new("model service", workers, max_queue),
            metrics,
            threads: Arc::new(threads::ModelThreads::new(workers)),
        }
    }

    /// Run `f` (timed as `stage` in the step-duration metric).
    pub async fn run<T: Send + 'static>(
        &self,
        stage: Phase,
        f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        self.run_timed(stage, f).await.map(|(v, _)| v)
    }

    /// Run `f` (timed as `stage` in the step-duration metric), and say how
    /// long it waited for a slot and a thread, and how long it ran. `f`
    /// runs in the caller's span.
    pub async fn run_timed<T: Send + 'static>(
        &self,
        stage: Phase,
        f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
    ) -> Result<(T, Timings), ServiceError> {
        let queued = Instant::now();
        self.metrics
            .queue_depth
            .set(self.admission.queued() as i64 + 1);
        let slot = self.admission.admit().await;
        self.metrics.queue_depth.set(self.admission.queued() as i64);
        let slot = slot?;
        let metrics = self.metrics.clone();
        let span = tracing::Span::current();
        self.threads
            .run(move || {
                let _slot = slot;
                let _span = span.enter();
                let _guard = tch::no_grad_guard();
                let start = Instant::now();
                let r = f();
                let forward = start.elapsed();
                metrics.step(stage, forward);
                r.map(|v| {
                    let queue = start - queued;
                    (v, Timings { queue, forward })
                })
            })
            .await?
    }
}

#[cfg(test)]
mod span_tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::rpc_span;

    /// Collects the fields recorded on spans after they were created.
    struct Recorded(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorded {
        fn on_record(
            &self,
            _: &tracing::span::Id,
            values: &tracing::span::Record<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Names<'a>(&'a mut Vec<String>);
            impl tracing::field::Visit for Names<'_> {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    self.0.push(format!("{}={v:?}", f.name()));
                }
            }
            values.record(&mut Names(
                &mut self.0.lock().unwrap_or_else(|e| e.into_inner()),
            ));
        }
    }

    #[tokio::test]
    async fn a_worker_call_reports_its_timings_on_the_rpc_span() {
        use tracing_subscriber::layer::SubscriberExt;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Recorded(seen.clone()));
        let _default = tracing::subscriber::set_default(subscriber);
        let worker = Worker::new(1, 1, Metrics::new("test"));
        let span = rpc_span("Test");
        let work = worker.run_timed(Phase::TextForward, || {
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        });
        let ((), t) = tracing::Instrument::instrument(work, span.clone())
            .await
            .unwrap();
        assert!(t.forward >= Duration::from_millis(20), "{t:?}");
        t.record(&span);
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner()).join(" ");
        assert!(
            seen.contains("queue_ms=") && seen.contains("forward_ms="),
            "{seen}"
        );
    }
}
