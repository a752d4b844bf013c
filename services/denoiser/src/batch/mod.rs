//! Step-level dynamic batching: Predict calls for the same latent shape —
//! from different generations, at different timesteps, with different
//! guidance scales — merged into one UNet forward. Each call keeps its
//! conditional/unconditional pair together and its own guidance; a batch
//! takes up to `max_items` latents (guided calls count twice, as they run
//! twice).
//!
//! Generations in flight come back every step. A call that names its
//! session and says more steps follow makes the batcher *expect* that
//! session: the next batch of the same shape waits (at most
//! `session_wait`, and never longer than the last forward took) until the
//! expected sessions are back, so concurrent generations stay in step and
//! share every forward instead of drifting into separate ones. A session
//! that misses the wait is no longer expected until its next call. Calls
//! without a session wait at most `max_wait` for company (default: none).
//!
//! `workers` forward passes run at once, each on its own thread. A worker
//! gathers at most its fair share of what is queued and expected, so idle
//! workers get work too; the most recently busy idle worker gathers next
//! (its caches are warm).
//!
//! Seen from outside (as text-embeddings-inference's queue does it): each
//! queued call carries its caller's span; each forward runs in a
//! `unet_batch` span of its own that follows from the spans of the calls it
//! serves; each call gets back how long it waited and how long its forward
//! took.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sd_models::Denoiser;
use sd_runtime::metrics::{Metrics, Phase};
use sd_service::compute::{forward_calls, Call};

use crate::cost::LiveCost;
use sd_service::{ServiceError, Timings};
use tch::Tensor;

/// A generation whose steps come back: named by its caller (a unary
/// Predict's `session_id`) or by the denoiser (a PredictStream). The two
/// kinds never name the same session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionKey {
    Caller(u64),
    Stream(u64),
}

/// The generation a call belongs to (if any) and how many calls it makes
/// after this one.
#[derive(Clone, Copy, Debug, Default)]
pub struct Session {
    pub key: Option<SessionKey>,
    pub steps_after: u32,
}

impl Session {
    /// A unary caller's session (`session_id` 0: none).
    pub fn caller(session_id: u64, steps_after: u32) -> Self {
        Session {
            key: (session_id != 0).then_some(SessionKey::Caller(session_id)),
            steps_after,
        }
    }

    /// A stream's session (`id` from the denoiser's own counter).
    pub fn stream(id: u64, steps_after: u32) -> Self {
        Session {
            key: Some(SessionKey::Stream(id)),
            steps_after,
        }
    }
}

/// A call's answer: the guided prediction and its timings.
pub type Reply = Result<(Tensor, Timings), ServiceError>;

/// One Predict call waiting for its result.
struct Job {
    call: Call,
    key: Key,
    session: Session,
    /// The caller's span: the forward that serves this call follows from it.
    span: tracing::Span,
    queued: Instant,
    reply: tokio::sync::oneshot::Sender<Reply>,
}

type Key = (Vec<i64>, Vec<i64>, i64);

#[derive(Clone, Copy, Debug)]
pub struct BatchConfig {
    /// UNet rows per forward at most.
    pub max_items: i64,
    /// How long a call without expected company waits for some.
    pub max_wait: Duration,
    /// How long a batch waits for the sessions expected back.
    pub session_wait: Duration,
    /// Forward passes at once (threads).
    pub workers: usize,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// Sessions whose last step went out and that said they would be back:
    /// their shape and UNet rows.
    expected: HashMap<SessionKey, (Key, i64)>,
    /// Idle workers, the most recently busy last.
    idle: Vec<usize>,
    /// The worker gathering a batch (one at a time).
    gatherer: Option<usize>,
    /// How long the last forward of each shape took.
    last_forward: HashMap<Key, Duration>,
    stopped: bool,
}

struct Shared {
    state: Mutex<State>,
    metrics: Arc<Metrics>,
    /// Told what each forward took (see [`Batcher::observe`]).
    cost: std::sync::OnceLock<Arc<LiveCost>>,
    /// One per worker: woken when it should gather, or when what it is
    /// gathering for arrives.
    wake: Vec<Condvar>,
    /// Forwards each worker ran.
    forwards: Vec<AtomicU64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked mid-forward is caught (`guarded`); the
        // state itself is never left half-updated, so poisoning is moot.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wake whoever should look at the queue now.
    fn nudge(&self, state: &State) {
        if let Some(g) = state.gatherer {
            self.wake[g].notify_one();
        } else if let Some(&w) = state.idle.last() {
            self.wake[w].notify_one();
        }
    }
}

/// How long stopping waits for a forward in progress to finish: the
/// process must not exit under a worker still inside libtorch.
const STOP_WAIT: Duration = Duration::from_secs(120);

/// Stops the workers when the last handle goes, and waits (at most
/// [`STOP_WAIT`]) for those mid-forward to finish.
struct Stop {
    shared: Arc<Shared>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for Stop {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.stopped = true;
        for c in &self.shared.wake {
            c.notify_all();
        }
        drop(state);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let until = Instant::now() + STOP_WAIT;
        while threads.iter().any(|t| !t.is_finished()) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        for t in threads {
            if t.is_finished() && t.join().is_err() {
                tracing::error!("a UNet worker panicked");
            }
        }
    }
}

/// Queue of calls in front of the network, drained by `workers` threads.
#[derive(Clone)]
pub struct Batcher {
    shared: Arc<Shared>,
    _stop: Arc<Stop>,
}

impl Batcher {
    pub fn start(
        net: Arc<Denoiser>,
        config: BatchConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let workers = config.workers.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                idle: (0..workers).collect(),
                ..Default::default()
            }),
            wake: (0..workers).map(|_| Condvar::new()).collect(),
            forwards: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            metrics: metrics.clone(),
            cost: std::sync::OnceLock::new(),
        });
        // The workers' spans go where the starting thread's go.
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        let mut threads = Vec::with_capacity(workers);
        for w in 0..workers {
            let (net, shared, metrics) = (net.clone(), shared.clone(), metrics.clone());
            let dispatch = dispatch.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("unet-worker-{w}"))
                    .spawn(move || {
                        tracing::dispatcher::with_default(&dispatch, || {
                            work(w, &net, &shared, config, &metrics)
                        })
                    })?,
            );
        }
        Ok(Batcher {
            _stop: Arc::new(Stop {
                shared: shared.clone(),
                threads: Mutex::new(threads),
            }),
            shared,
        })
    }

    /// Tell `cost` what each forward from now on takes.
    pub fn observe(&self, cost: Arc<LiveCost>) {
        let _ = self.shared.cost.set(cost);
    }

    /// Queue `call` (in the current span) and wait for its result.
    pub async fn submit(&self, call: Call, session: Session) -> Reply {
        let rx = self.enqueue(&mut self.shared.lock(), call, session)?;
        rx.await
            .map_err(|_| ServiceError::Internal("the UNet worker dropped the call"))?
    }

    fn enqueue(
        &self,
        state: &mut State,
        call: Call,
        session: Session,
    ) -> Result<tokio::sync::oneshot::Receiver<Reply>, ServiceError> {
        if state.stopped {
            return Err(ServiceError::Stopped);
        }
        if let Some(key) = &session.key {
            state.expected.remove(key);
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        state.queue.push_back(Job {
            key: call.key(),
            call,
            session,
            span: tracing::Span::current(),
            queued: Instant::now(),
            reply,
        });
        self.shared
            .metrics
            .queue_depth
            .set(state.queue.len() as i64);
        self.shared.nudge(state);
        Ok(rx)
    }

    /// Forwards each worker ran so far.
    #[cfg(test)]
    fn forwards_per_worker(&self) -> Vec<u64> {
        self.shared
            .forwards
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }
}

/// Move queued calls of `key` into `batch` while they fit in `limit` rows;
/// drop calls whose caller went away.
fn take_fitting(state: &mut State, key: &Key, rows: &mut i64, limit: i64, batch: &mut Vec<Job>) {
    let mut keep = VecDeque::with_capacity(state.queue.len());
    while let Some(j) = state.queue.pop_front() {
        if j.reply.is_closed() {
            continue;
        }
        if &j.key == key && *rows + j.call.rows() <= limit {
            *rows += j.call.rows();
            batch.push(j);
        } else {
            keep.push_back(j);
        }
    }
    state.queue = keep;
}

/// Gather one batch (the caller is the gatherer); None when stopping.
fn gather<'a>(
    w: usize,
    shared: &'a Shared,
    mut state: MutexGuard<'a, State>,
    config: BatchConfig,
) -> (MutexGuard<'a, State>, Option<Vec<Job>>) {
    let first = loop {
        match state.queue.pop_front() {
            Some(j) if j.reply.is_closed() => continue,
            Some(j) => break j,
            None => return (state, Some(Vec::new())),
        }
    };
    let key = first.key.clone();
    let mut rows = first.call.rows();
    let mut batch = vec![first];
    let start = Instant::now();
    let company_until = start + config.max_wait;
    let session_wait = state
        .last_forward
        .get(&key)
        .map_or(config.session_wait, |d| (*d).min(config.session_wait));
    let sessions_until = start + session_wait;
    loop {
        // This worker's fair share of what is here and what is coming.
        let queued: i64 = state
            .queue
            .iter()
            .filter(|j| j.key == key)
            .map(|j| j.call.rows())
            .sum();
        let coming: i64 = state
            .expected
            .values()
            .filter(|(k, _)| *k == key)
            .map(|(_, r)| r)
            .sum();
        let workers = state.idle.len() as i64 + 1;
        // (A single call may exceed max_items: it runs alone.)
        let share = ((rows + queued + coming + workers - 1) / workers)
            .min(config.max_items)
            .max(rows);
        take_fitting(&mut state, &key, &mut rows, share, &mut batch);
        if rows >= share {
            break;
        }
        let expecting = state.expected.values().any(|(k, _)| *k == key);
        let until = if expecting {
            sessions_until.max(company_until)
        } else {
            company_until
        };
        let now = Instant::now();
        if now >= until {
            break;
        }
        state = shared.wake[w]
            .wait_timeout(state, until - now)
            .map(|(s, _)| s)
            .unwrap_or_else(|e| e.into_inner().0);
        if state.stopped {
            return (state, None);
        }
    }
    // Whoever was expected and did not come is on its own until its next call.
    state.expected.retain(|_, (k, _)| *k != key);
    (state, Some(batch))
}

fn work(w: usize, net: &Denoiser, shared: &Shared, config: BatchConfig, metrics: &Metrics) {
    let _guard = tch::no_grad_guard();
    let mut state = shared.lock();
    loop {
        if state.stopped {
            return;
        }
        let my_turn =
            state.gatherer.is_none() && !state.queue.is_empty() && state.idle.last() == Some(&w);
        if !my_turn {
            state = shared.wake[w]
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
            continue;
        }
        state.idle.retain(|&i| i != w);
        state.gatherer = Some(w);
        let (mut s, batch) = gather(w, shared, state, config);
        s.gatherer = None;
        metrics.queue_depth.set(s.queue.len() as i64);
        // Someone else may gather what is left while this worker computes.
        shared.nudge(&s);
        let Some(mut batch) = batch else { return };
        // Calls whose callers left while the batch gathered are not computed.
        batch.retain(|j| !j.reply.is_closed());
        if batch.is_empty() {
            s.idle.push(w);
            state = s;
            continue;
        }
        drop(s);
        run_batch(w, net, shared, batch, metrics);
        state = shared.lock();
    }
}

/// Run a gathered batch as one UNet forward, in a `unet_batch` span that
/// follows from each call's span; then answer each call with its own
/// result, its queue wait and the forward's time.
fn run_batch(w: usize, net: &Denoiser, shared: &Shared, batch: Vec<Job>, metrics: &Metrics) {
    let key = batch[0].key.clone();
    let rows: i64 = batch.iter().map(|j| j.call.rows()).sum();
    let span = tracing::info_span!(
        parent: None,
        "unet_batch",
        worker = w,
        rows,
        calls = batch.len()
    );
    for j in &batch {
        span.follows_from(&j.span);
    }
    let start = Instant::now();
    let outcome = span.in_scope(|| {
        let refs: Vec<&Call> = batch.iter().map(|j| &j.call).collect();
        sd_models::error::guarded(|| forward_calls(net, &refs))
    });
    let took = start.elapsed();
    if let (Some(cost), Ok(_)) = (shared.cost.get(), &outcome) {
        // The UNet's part of the time: ControlNet work is counted apart
        // (each network's measured ratio), so the published cost stays the
        // UNet's.
        let control: f64 = batch.iter().map(|j| j.call.control_rows()).sum();
        let unet = took.mul_f64(rows as f64 / (rows as f64 + control));
        cost.observe(batch[0].call.positions(), rows, unet);
    }
    metrics.step(Phase::UnetForward, took);
    metrics.step_batch(rows as f64);
    shared.forwards[w].fetch_add(1, Ordering::Relaxed);

    let mut state = shared.lock();
    state.last_forward.insert(key.clone(), took);
    if outcome.is_ok() {
        // Expect them back before they can possibly return.
        for j in &batch {
            if let Some(session) = j.session.key {
                if j.session.steps_after > 0 && !j.reply.is_closed() {
                    state.expected.insert(session, (key.clone(), j.call.rows()));
                }
            }
        }
    }
    state.idle.push(w);
    drop(state);
    let timings = |j: &Job| Timings {
        queue: start.saturating_duration_since(j.queued),
        forward: took,
    };
    match outcome {
        Ok(outs) => {
            for (job, out) in batch.into_iter().zip(outs) {
                let t = timings(&job);
                let _ = job.reply.send(Ok((out, t)));
            }
        }
        Err(e) => {
            // Each caller logs it in its own span (with its trace id).
            let e = ServiceError::from(e);
            for job in batch {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests;
