//! The threads a model service's forwards run on: a fixed set, started at
//! the first forward and kept for the life of the process.
//!
//! Not tokio's blocking pool: it replaces a thread that sat idle for 10 s
//! and starts another whenever a call arrives before the last one's thread
//! is back in the pool, so a busy service's thread count creeps up over
//! time — and every new thread that runs a forward gets a glibc malloc
//! arena of its own, which keeps its peak (see `sd_runtime::alloc`). A soak
//! of 1,000 generations saw the autoencoder go from 3 to 4 threads and
//! +3.5 MB RSS at once.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use crate::ServiceError;

type Job = Box<dyn FnOnce() + Send>;

/// `n` model threads, started on first use.
pub struct ModelThreads {
    n: usize,
    jobs: OnceLock<Sender<Job>>,
}

impl ModelThreads {
    pub fn new(n: usize) -> Self {
        ModelThreads {
            n: n.max(1),
            jobs: OnceLock::new(),
        }
    }

    /// Run `f` on one of the threads and wait for its result; an error if
    /// it panicked (the thread lives on) or no thread could be started.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ServiceError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(std::panic::catch_unwind(AssertUnwindSafe(f)));
        });
        self.jobs
            .get_or_init(|| start(self.n))
            .send(job)
            .map_err(|_| ServiceError::Task("no model thread could be started".into()))?;
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(panic)) => Err(ServiceError::Task(panic_message(panic.as_ref()))),
            Err(_) => Err(ServiceError::Task("a model thread ended".into())),
        }
    }
}

/// Start `n` threads taking jobs from one queue (their spans go where the
/// starting thread's go).
fn start(n: usize) -> Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    let dispatch = tracing::dispatcher::get_default(|d| d.clone());
    for i in 0..n {
        let (rx, dispatch) = (rx.clone(), dispatch.clone());
        let started = std::thread::Builder::new()
            .name(format!("model-{i}"))
            .spawn(move || tracing::dispatcher::with_default(&dispatch, || serve(&rx)));
        if let Err(e) = started {
            tracing::error!("cannot start model thread {i}: {e}");
        }
    }
    tx
}

fn serve(jobs: &Mutex<Receiver<Job>>) {
    loop {
        let job = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let what = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("no message");
    format!("model work panicked: {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_the_same_threads_and_a_panic_is_an_error() {
        let threads = ModelThreads::new(2);
        let mut names = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let name = threads
                .run(|| std::thread::current().name().map(String::from))
                .await
                .unwrap();
            names.insert(name.unwrap());
        }
        assert!(
            names.iter().all(|n| n == "model-0" || n == "model-1"),
            "{names:?}"
        );
        let r: Result<(), ServiceError> = threads.run(|| panic!("boom")).await;
        let e = r.unwrap_err();
        assert!(e.to_string().contains("model work panicked: boom"), "{e}");
        assert_eq!(threads.run(|| 7).await.unwrap(), 7, "the thread lives on");
    }
}
