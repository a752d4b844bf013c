//! Running jobs: each gateway takes jobs while it has a free worker (first
//! those whose gateway stopped renewing them, then the next owner's oldest),
//! renews its claim every third of the lease, reports each step to the
//! store (where any gateway's watchers read it, and where a cancel is
//! seen), retries passing failures, and finishes the job with its images or
//! its error.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use sd_proto::v1::{generate_event, GenerateEvent, GenerateRequest, Preview, Progress};
use sd_runtime::deadline::Deadline;
use sd_runtime::metrics::Metrics;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::store::{Claim, Keep};
use super::{JobError, Shared};
use crate::pipeline::{Event, Replay};
use crate::service::GenerationService;

/// How often an idle gateway looks for work (a job it queues itself wakes
/// it at once).
const IDLE_POLL: Duration = Duration::from_millis(250);

/// Start this gateway's workers, webhook deliverers and queue gauges.
pub fn spawn(service: Arc<GenerationService>, jobs: Shared, workers: usize) {
    tokio::spawn(consume(service.clone(), jobs.clone(), workers.max(1)));
    tokio::spawn(super::hooks::deliver(jobs.clone(), service.metrics.clone()));
    tokio::spawn(gauges(jobs, service.metrics.clone()));
}

async fn consume(service: Arc<GenerationService>, jobs: Shared, workers: usize) {
    let slots = Arc::new(Semaphore::new(workers));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        if service.lifecycle.draining() {
            // Queued jobs stay queued for the other gateways (or this one's
            // successor); running ones finish (the drain waits for them).
            return;
        }
        match jobs.store.next(&jobs.worker, true).await {
            Ok(Some(claim)) => {
                if jobs.start(&claim.id) {
                    tokio::spawn(run(service.clone(), jobs.clone(), claim, permit));
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => {
                if e.code() == Some("NOGROUP") {
                    let _ = jobs.store.ensure_groups().await;
                }
                tracing::warn!("job store: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        drop(permit);
        tokio::select! {
            () = jobs.wake.notified() => {}
            () = tokio::time::sleep(IDLE_POLL) => {}
        }
    }
}

impl super::Jobs {
    /// Mark `id` running here; false when it already is.
    fn start(&self, id: &str) -> bool {
        self.running
            .lock()
            .map(|mut r| r.insert(id.to_string()))
            .unwrap_or(true)
    }

    fn done(&self, id: &str) {
        if let Ok(mut r) = self.running.lock() {
            r.remove(id);
        }
    }
}

/// How often a gateway looks for consumers of gateways long gone, and how
/// idle one must be.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
const CONSUMER_IDLE: Duration = Duration::from_secs(86_400);

/// Publish the queue's depth and the oldest queued job's age, and forget
/// the consumers of gateways long gone.
async fn gauges(jobs: Shared, metrics: Arc<Metrics>) {
    let mut last_prune = tokio::time::Instant::now();
    loop {
        // Gateways that died (each start is a new consumer) are forgotten
        // once idle a day with nothing pending.
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = tokio::time::Instant::now();
            match jobs.store.prune_consumers(CONSUMER_IDLE).await {
                Ok(n) if n > 0 => tracing::info!(consumers = n, "idle job consumers forgotten"),
                Ok(_) => {}
                Err(e) => tracing::debug!("consumers not pruned: {e}"),
            }
        }
        if let Ok((n, oldest)) = jobs.store.depth().await {
            metrics.jobs_queued.set(n as i64);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let age = oldest.map_or(0.0, |o| (now - o).max(0) as f64 / 1000.0);
            metrics.jobs_oldest_queued_seconds.set(age);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Renew the claim until told to stop (or the job stops being this
/// worker's: then say so on `stop`).
async fn heartbeat(jobs: Shared, claim: Claim, stop: watch::Sender<Keep>) {
    let every = jobs.store.config.lease / 3;
    loop {
        tokio::time::sleep(every).await;
        if *stop.borrow() != Keep::Running {
            return;
        }
        match jobs.store.heartbeat(&jobs.worker, &claim).await {
            Ok(Keep::Running) => {}
            Ok(k) => {
                let _ = stop.send(k);
                return;
            }
            // The store is away: keep running; if the lease passes meanwhile
            // another gateway runs the job too, and the first to finish wins.
            Err(e) => tracing::warn!(job = %claim.id, "claim not renewed: {e}"),
        }
    }
}

/// Report each step to the store; a cancel seen there stops the run.
async fn report(
    jobs: Shared,
    id: String,
    mut events: mpsc::Receiver<Event>,
    stop: watch::Sender<Keep>,
) {
    while let Some(e) = events.recv().await {
        let (progress, event) = match e {
            Event::Progress {
                step,
                total,
                timestep,
                elapsed,
            } => (
                Some(step as f32 / total.max(1) as f32),
                generate_event::Event::Progress(Progress {
                    step,
                    total,
                    timestep,
                    elapsed_seconds: elapsed,
                }),
            ),
            Event::Preview { step, images } => (
                None,
                generate_event::Event::Preview(Preview { step, images }),
            ),
        };
        let bytes = GenerateEvent { event: Some(event) }.encode_to_vec();
        let p = progress.unwrap_or(-1.0);
        match jobs.store.progress(&jobs.worker, &id, p, &bytes).await {
            Ok(Keep::Running) => {}
            Ok(k) => {
                let _ = stop.send(k);
                return;
            }
            Err(e) => tracing::debug!(job = %id, "progress not recorded: {e}"),
        }
    }
}

/// A job's step record: the predictions its checkpoint holds (replayed by
/// the run), and a task keeping the new ones (ends with the run).
async fn checkpoints(
    jobs: &Shared,
    id: &str,
) -> (Option<Replay>, Option<tokio::task::JoinHandle<()>>) {
    if jobs.checkpoint_bytes == 0 {
        return (None, None);
    }
    let stored: Vec<Vec<f32>> = match jobs.store.checkpoints(id).await {
        Ok(s) => s
            .iter()
            .map(|b| {
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            })
            .collect(),
        Err(e) => {
            tracing::warn!(job = %id, "checkpoint not read, starting from the first step: {e}");
            Vec::new()
        }
    };
    let kept: usize = stored.iter().map(|p| p.len() * 4).sum();
    if !stored.is_empty() {
        tracing::info!(job = %id, steps = stored.len(), "resuming from a checkpoint");
    }
    let replayed = (!stored.is_empty()).then_some(stored.len());
    let (tx, rx) = mpsc::unbounded_channel();
    let saver = tokio::spawn(save(jobs.clone(), id.to_string(), rx, kept, replayed));
    (Some(Replay::new(stored, Some(tx))), Some(saver))
}

/// Append each new prediction to the job's checkpoint (those that arrive
/// together in one write), until its bytes reach `--job-checkpoint-mib`.
async fn save(
    jobs: Shared,
    id: String,
    mut rx: mpsc::UnboundedReceiver<Vec<f32>>,
    mut kept: usize,
    mut replayed: Option<usize>,
) {
    if let Some(n) = replayed.take() {
        let _ = jobs.store.checkpoint(&jobs.worker, &id, Some(n), &[]).await;
    }
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(p) = rx.try_recv() {
            batch.push(p);
        }
        let bytes: Vec<Vec<u8>> = batch
            .iter()
            .map(|p| p.iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let size: usize = bytes.iter().map(Vec::len).sum();
        if kept.saturating_add(size) > jobs.checkpoint_bytes {
            // Full: the record must stay whole, so no later step is kept.
            tracing::debug!(job = %id, "checkpoint full: later steps are not kept");
            kept = usize::MAX;
            continue;
        }
        match jobs.store.checkpoint(&jobs.worker, &id, None, &bytes).await {
            Ok(Keep::Running) => kept += size,
            Ok(_) => return,
            // A step not kept cannot be followed by later ones (the record
            // must be whole): stop keeping.
            Err(e) => {
                tracing::warn!(job = %id, "checkpoint not written: {e}");
                kept = usize::MAX;
            }
        }
    }
}

/// Failures worth another try: the model services or this gateway busy or
/// away for a while.
fn passing(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::ResourceExhausted | tonic::Code::Aborted
    )
}

/// Run one job to its end (or until cancelled, or taken over).
async fn run(
    service: Arc<GenerationService>,
    jobs: Shared,
    claim: Claim,
    _permit: OwnedSemaphorePermit,
) {
    let (stop_tx, mut stop_rx) = watch::channel(Keep::Running);
    let beat = tokio::spawn(heartbeat(jobs.clone(), claim.clone(), stop_tx.clone()));
    let outcome = async {
        let job = match jobs.store.get(&claim.id, None, false).await {
            Ok(Some(j)) => j,
            // Gone (expired, or the store lost it): the claim is dropped
            // when next taken over.
            Ok(None) => return Ran::Unread,
            Err(e) => {
                tracing::warn!(job = %claim.id, "job not read: {e}");
                return Ran::Unread; // the lease passes and it is taken again
            }
        };
        Metrics::count(
            &service.metrics.jobs,
            if job.attempts > 1 { "resumed" } else { "started" },
        );
        tracing::info!(job = %claim.id, attempts = job.attempts, "job started");
        // A job that brought gateways down again and again is failed.
        if job.attempts > 2 * jobs.max_attempts {
            return Ran::Done(Err(JobError {
                code: "aborted".into(),
                message: format!("started {} times without finishing", job.attempts - 1),
            }));
        }
        let req = match GenerateRequest::decode(job.request.as_slice()) {
            Ok(r) => r,
            Err(e) => {
                return Ran::Done(Err(JobError {
                    code: "internal".into(),
                    message: format!("the stored request could not be read: {e}"),
                }))
            }
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (tx, rx) = mpsc::channel::<Event>(16);
            let reporter = tokio::spawn(report(jobs.clone(), claim.id.clone(), rx, stop_tx.clone()));
            let deadline = Deadline::after(jobs.timeout);
            let (replay, saver) = checkpoints(&jobs, &claim.id).await;
            let r = tokio::select! {
                r = service.run_job(req.clone(), tx, deadline, replay) => Some(r),
                _ = stop_rx.wait_for(|k| *k != Keep::Running) => None,
            };
            let _ = reporter.await;
            if let Some(saver) = saver {
                let _ = saver.await;
            }
            let Some(r) = r else {
                return Ran::Stopped;
            };
            match r {
                Ok(resp) => {
                    let bytes = resp.encode_to_vec();
                    if bytes.len() > jobs.max_result_bytes {
                        return Ran::Done(Err(JobError {
                            code: "resource_exhausted".into(),
                            message: format!(
                                "the images take {} MiB, more than a job keeps \
                                 (--job-max-result-mib {})",
                                bytes.len() >> 20,
                                jobs.max_result_bytes >> 20
                            ),
                        }));
                    }
                    return Ran::Done(Ok(bytes));
                }
                // This gateway is stopping: the job is left for another
                // (its claim lapses when the heartbeat stops).
                Err(_) if service.lifecycle.draining() => return Ran::Unread,
                Err(s) if passing(s.code()) && attempt < jobs.max_attempts => {
                    let wait = Duration::from_secs(1 << attempt.min(5));
                    tracing::warn!(job = %claim.id, attempt, "job retried in {wait:?}: {}", s.message());
                    tokio::time::sleep(wait).await;
                }
                Err(s) => return Ran::Done(Err(JobError::from_status(&s))),
            }
        }
    }
    .await;
    let stopped = *stop_rx.borrow();
    conclude(&service, &jobs, &claim, outcome, stopped).await;
    let _ = stop_tx.send(Keep::Stop);
    beat.abort();
    jobs.done(&claim.id);
}

/// Store how a run ended (nothing when the job was not read or another
/// gateway has it now).
async fn conclude(
    service: &GenerationService,
    jobs: &Shared,
    claim: &Claim,
    outcome: Ran,
    stopped: Keep,
) {
    let outcome = match outcome {
        Ran::Unread => None,
        _ if stopped == Keep::Lost => {
            tracing::warn!(job = %claim.id, "job taken over by another gateway");
            None
        }
        Ran::Done(o) => Some(o),
        // Cancelled: the store has its status already; finishing only
        // acknowledges the claim (or, taken over, touches nothing).
        Ran::Stopped => Some(Err(JobError {
            code: "cancelled".into(),
            message: "cancelled".into(),
        })),
    };
    if let Some(outcome) = outcome {
        let label = if outcome.is_ok() {
            "completed"
        } else {
            "failed"
        };
        // The claim is renewed, and the job counted as running here, until
        // the outcome is stored: this gateway does not take it back meanwhile.
        finish(jobs, &service.metrics, claim, outcome, label).await;
    }
}

/// How a run of a job ended.
enum Ran {
    Done(Result<Vec<u8>, JobError>),
    /// Cancelled, or taken over.
    Stopped,
    /// The job could not be read: left for the lease to pass.
    Unread,
}

/// Record the outcome, retrying while the store is away (for up to a few
/// leases; past that another gateway has taken the job over anyway).
async fn finish(
    jobs: &Shared,
    metrics: &Metrics,
    claim: &Claim,
    outcome: Result<Vec<u8>, JobError>,
    label: &str,
) {
    let give_up = tokio::time::Instant::now() + jobs.store.config.lease * 4;
    loop {
        match jobs
            .store
            .finish(&jobs.worker, claim, outcome.clone())
            .await
        {
            Ok(Keep::Running) => {
                Metrics::count(&metrics.jobs, label);
                tracing::info!(job = %claim.id, status = label, "job finished");
                return;
            }
            Ok(Keep::Stop) => {
                Metrics::count(&metrics.jobs, "cancelled");
                tracing::info!(job = %claim.id, "job stopped: cancelled");
                return;
            }
            Ok(Keep::Lost) => return,
            Err(e) if tokio::time::Instant::now() < give_up => {
                tracing::warn!(job = %claim.id, "job not finished yet in the store: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                tracing::error!(job = %claim.id, "job's outcome not stored: {e}");
                return;
            }
        }
    }
}
