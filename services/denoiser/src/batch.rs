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

use sd_models::UNet;
use sd_runtime::metrics::{Metrics, Stage};
use sd_service::compute::{forward_calls, Call};
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

type Key = (Vec<i64>, Vec<i64>);

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

/// Stops the workers when the last handle goes.
struct Stop(Arc<Shared>);

impl Drop for Stop {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.stopped = true;
        for c in &self.0.wake {
            c.notify_all();
        }
        drop(state);
    }
}

/// Queue of calls in front of the UNet, drained by `workers` threads.
#[derive(Clone)]
pub struct Batcher {
    shared: Arc<Shared>,
    _stop: Arc<Stop>,
}

impl Batcher {
    pub fn start(
        unet: Arc<UNet>,
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
        });
        // The workers' spans go where the starting thread's go.
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        for w in 0..workers {
            let (unet, shared, metrics) = (unet.clone(), shared.clone(), metrics.clone());
            let dispatch = dispatch.clone();
            std::thread::Builder::new()
                .name(format!("unet-worker-{w}"))
                .spawn(move || {
                    tracing::dispatcher::with_default(&dispatch, || {
                        work(w, &unet, &shared, config, &metrics)
                    })
                })?;
        }
        Ok(Batcher {
            _stop: Arc::new(Stop(shared.clone())),
            shared,
        })
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

fn work(w: usize, unet: &UNet, shared: &Shared, config: BatchConfig, metrics: &Metrics) {
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
        let Some(batch) = batch else { return };
        if batch.is_empty() {
            s.idle.push(w);
            state = s;
            continue;
        }
        drop(s);
        run_batch(w, unet, shared, batch, metrics);
        state = shared.lock();
    }
}

/// Run a gathered batch as one UNet forward, in a `unet_batch` span that
/// follows from each call's span; then answer each call with its own
/// result, its queue wait and the forward's time.
fn run_batch(w: usize, unet: &UNet, shared: &Shared, batch: Vec<Job>, metrics: &Metrics) {
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
        sd_models::error::guarded(|| forward_calls(unet, &refs))
    });
    let took = start.elapsed();
    metrics.step(Stage::UnetForward, took);
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
mod tests {
    use super::*;
    use sd_models::{ModelDir, Placement};

    fn fixture() -> std::path::PathBuf {
        std::env::var_os("SD_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../../target/sd-fixtures")
            })
            .join("sd1-tiny")
    }

    fn tiny_unet() -> Arc<UNet> {
        Arc::new(
            ModelDir::open(fixture())
                .unwrap()
                .load_unet(Placement::cpu())
                .unwrap(),
        )
    }

    fn job(seed: i64, b: i64, t: f32, guided: bool, g: f64) -> Call {
        tch::manual_seed(seed);
        let f = (tch::Kind::Float, tch::Device::Cpu);
        Call {
            latents: Tensor::randn([b, 4, 8, 8], f),
            timesteps: Tensor::from_slice(&vec![t; b as usize]),
            cond: Tensor::randn([1, 77, 32], f),
            uncond: guided.then(|| Tensor::randn([1, 77, 32], f)),
            guidance: g,
        }
    }

    #[test]
    fn merged_forwards_equal_separate_ones() {
        let unet = tiny_unet();
        // Different generations: batch sizes, timesteps, guidance on and off.
        let jobs = [
            job(1, 1, 999.0, true, 7.5),
            job(2, 2, 500.0, true, 3.0),
            job(3, 1, 20.5, false, 1.0),
        ];
        let refs: Vec<&Call> = jobs.iter().collect();
        let merged = forward_calls(&unet, &refs).unwrap();
        for (j, m) in jobs.iter().zip(&merged) {
            let alone = forward_calls(&unet, &[j]).unwrap().remove(0);
            assert_eq!(alone.size(), m.size());
            let d = (&alone - m).abs().max().double_value(&[]);
            // Same kernels; only batch-size-dependent summation order differs.
            assert!(d < 1e-5, "merged vs alone: {d:e}");
        }
        // And the guided result is uncond + g (cond - uncond), not cond alone.
        let mut unguided = job(1, 1, 999.0, true, 1.0);
        unguided.uncond = None;
        let plain = forward_calls(&unet, &[&unguided]).unwrap().remove(0);
        assert!((&plain - &merged[0]).abs().max().double_value(&[]) > 1e-3);
    }

    fn metric(m: &Metrics, name: &str) -> f64 {
        m.encode()
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Four generations of five steps each (guided and not, batch 1 and 2,
    /// different guidance) through a batcher with `workers` workers, all
    /// at once; every result must be the call's own. Returns the number of
    /// forwards each worker ran.
    async fn run_sessions(workers: usize) -> Vec<u64> {
        let unet = tiny_unet();
        let metrics = Metrics::new("test");
        let config = BatchConfig {
            max_items: 16,
            max_wait: Duration::ZERO,
            session_wait: Duration::from_millis(50),
            workers,
        };
        let batcher = Batcher::start(unet.clone(), config, metrics.clone()).unwrap();
        let steps = 5u32;
        // Inputs and expected outputs first, one at a time (the global torch
        // RNG is not for concurrent use).
        let sessions: Vec<Vec<(Call, Tensor)>> = (0..4u64)
            .map(|s| {
                (0..steps)
                    .map(|k| {
                        let (b, guided) = (1 + (s as i64 % 2), s != 3);
                        let t = 900.0 - 100.0 * k as f32;
                        let call = job((s * 100 + k as u64) as i64, b, t, guided, 2.0 + s as f64);
                        let want = forward_calls(&unet, &[&call]).unwrap().remove(0);
                        (call, want)
                    })
                    .collect()
            })
            .collect();
        let mut tasks = Vec::new();
        for (s, work) in sessions.into_iter().enumerate() {
            let batcher = batcher.clone();
            tasks.push(tokio::spawn(async move {
                for (k, (call, want)) in work.into_iter().enumerate() {
                    let session = Session::caller(s as u64 + 1, steps - k as u32 - 1);
                    let (got, _) = batcher.submit(call, session).await.unwrap();
                    let d = (&got - &want).abs().max().double_value(&[]);
                    assert!(d < 1e-5, "session {s} step {k}: {d:e}");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let per_worker = batcher.forwards_per_worker();
        // The metric counts the same forwards.
        let total = metric(&metrics, "sd_unet_batch_items_count");
        assert_eq!(total, per_worker.iter().sum::<u64>() as f64);
        per_worker
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sessions_share_forwards_and_get_their_own_results() {
        // One worker: generations in flight together share forwards.
        let forwards: u64 = run_sessions(1).await.iter().sum();
        assert!(forwards < 20, "{forwards} forwards for 20 calls");
        // Two workers: the work spreads over both; results stay each call's own.
        let per_worker = run_sessions(2).await;
        assert!(
            per_worker.iter().all(|&n| n >= 1),
            "forwards per worker: {per_worker:?}"
        );
    }

    #[tokio::test]
    async fn a_session_that_never_returns_does_not_stall_the_others() {
        let unet = tiny_unet();
        let config = BatchConfig {
            max_items: 16,
            max_wait: Duration::ZERO,
            session_wait: Duration::from_millis(200),
            workers: 1,
        };
        let batcher = Batcher::start(unet, config, Metrics::new("test")).unwrap();
        // Session 1 promises more steps and vanishes.
        let gone = Session::caller(1, 10);
        let (first, _) = batcher
            .submit(job(1, 1, 500.0, true, 3.0), gone)
            .await
            .unwrap();
        assert_eq!(first.size(), vec![1, 4, 8, 8]);
        // Session 2 still gets its steps done: the first waits (at most as
        // long as a forward took) for session 1, which is then forgotten.
        let start = Instant::now();
        for k in 0..3 {
            let s = Session::caller(2, 2 - k);
            let (out, _) = tokio::time::timeout(
                Duration::from_secs(30),
                batcher.submit(job(2, 1, 400.0, true, 3.0), s),
            )
            .await
            .expect("the batcher stalled")
            .unwrap();
            assert_eq!(out.size(), vec![1, 4, 8, 8]);
        }
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_call_larger_than_a_batch_runs_alone() {
        let unet = tiny_unet();
        let config = BatchConfig {
            max_items: 2,
            max_wait: Duration::ZERO,
            session_wait: Duration::ZERO,
            workers: 2,
        };
        let batcher = Batcher::start(unet, config, Metrics::new("test")).unwrap();
        // Guided, batch 2: four UNet rows against a limit of two.
        for _ in 0..2 {
            let (out, _) = tokio::time::timeout(
                Duration::from_secs(30),
                batcher.submit(job(5, 2, 300.0, true, 7.5), Session::default()),
            )
            .await
            .expect("the batcher stalled")
            .unwrap();
            assert_eq!(out.size(), vec![2, 4, 8, 8]);
        }
    }

    #[test]
    fn caller_and_stream_sessions_never_meet() {
        assert_eq!(Session::caller(0, 3).key, None);
        assert_eq!(Session::caller(7, 3).key, Some(SessionKey::Caller(7)));
        assert_ne!(Session::caller(7, 3).key, Session::stream(7, 3).key);
    }

    /// Queue `calls` (each in its span) at once, so that the next gather
    /// finds them all; their replies.
    fn enqueue_together(
        batcher: &Batcher,
        calls: Vec<(Call, tracing::Span)>,
    ) -> Vec<tokio::sync::oneshot::Receiver<Reply>> {
        let mut state = batcher.shared.lock();
        calls
            .into_iter()
            .map(|(call, span)| {
                span.in_scope(|| batcher.enqueue(&mut state, call, Session::default()))
                    .unwrap()
            })
            .collect()
    }

    async fn timings(rx: tokio::sync::oneshot::Receiver<Reply>) -> Timings {
        rx.await.unwrap().unwrap().1
    }

    #[tokio::test]
    async fn each_call_gets_its_queue_wait_and_forward_time() {
        // Two rows a forward: each guided call runs alone, one after the other.
        let config = BatchConfig {
            max_items: 2,
            max_wait: Duration::ZERO,
            session_wait: Duration::ZERO,
            workers: 1,
        };
        let batcher = Batcher::start(tiny_unet(), config, Metrics::new("test")).unwrap();
        let calls = vec![
            (job(1, 1, 500.0, true, 3.0), tracing::Span::none()),
            (job(2, 1, 400.0, true, 3.0), tracing::Span::none()),
        ];
        let start = Instant::now();
        let mut rxs = enqueue_together(&batcher, calls).into_iter();
        let (a, b) = (rxs.next().unwrap(), rxs.next().unwrap());
        let ta = timings(a).await;
        let tb = timings(b).await;
        let wall = start.elapsed();
        for t in [ta, tb] {
            assert!(t.forward > Duration::ZERO, "{t:?}");
            assert!(t.queue + t.forward <= wall, "{t:?} in {wall:?}");
        }
        // Two forwards; the second call waited while the first's ran.
        assert_eq!(batcher.forwards_per_worker(), vec![2]);
        assert!(tb.queue >= ta.forward, "{ta:?} then {tb:?}");
    }

    /// What a test subscriber saw: spans by id (name and fields) and
    /// follows-from links.
    #[derive(Default)]
    struct Seen {
        spans: HashMap<u64, (String, String)>,
        follows: Vec<(u64, u64)>,
    }

    struct Recorder(Arc<Mutex<Seen>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorder {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            id: &tracing::span::Id,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Fields(String);
            impl tracing::field::Visit for Fields {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    self.0 += &format!("{}={v:?} ", f.name());
                }
            }
            let mut fields = Fields(String::new());
            attrs.record(&mut fields);
            let name = attrs.metadata().name().to_string();
            let mut seen = self.0.lock().unwrap();
            seen.spans.insert(id.into_u64(), (name, fields.0));
        }

        fn on_follows_from(
            &self,
            span: &tracing::span::Id,
            follows: &tracing::span::Id,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            let mut seen = self.0.lock().unwrap();
            seen.follows.push((span.into_u64(), follows.into_u64()));
        }
    }

    /// tracing caches each callsite's interest process-wide: another test
    /// creating `unet_batch` spans with no subscriber at the same moment can
    /// leave the callsite disabled for this one. So this test runs alone, in
    /// a process of its own (this test binary, re-run on just this test).
    #[test]
    fn a_batched_forward_follows_from_the_calls_it_serves() {
        const ALONE: &str = "SD_TEST_ALONE";
        if std::env::var_os(ALONE).is_some() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            return rt.block_on(batched_forward_follows_from_the_calls_it_serves());
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "batch::tests::a_batched_forward_follows_from_the_calls_it_serves",
                "--test-threads",
                "1",
                "--nocapture",
            ])
            .env(ALONE, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the test did not run: {text}");
    }

    async fn batched_forward_follows_from_the_calls_it_serves() {
        use tracing_subscriber::layer::SubscriberExt;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let subscriber = tracing_subscriber::registry().with(Recorder(seen.clone()));
        let _default = tracing::subscriber::set_default(subscriber);
        let config = BatchConfig {
            max_items: 16,
            max_wait: Duration::ZERO,
            session_wait: Duration::ZERO,
            workers: 1,
        };
        let batcher = Batcher::start(tiny_unet(), config, Metrics::new("test")).unwrap();
        let spans: Vec<tracing::Span> = (0..2)
            .map(|i| tracing::info_span!("rpc", call = i))
            .collect();
        let requests: Vec<u64> = spans.iter().map(|s| s.id().unwrap().into_u64()).collect();
        let calls = vec![
            (job(1, 1, 500.0, true, 3.0), spans[0].clone()),
            (job(2, 2, 400.0, false, 1.0), spans[1].clone()),
        ];
        let mut rxs = enqueue_together(&batcher, calls).into_iter();
        let (a, b) = (rxs.next().unwrap(), rxs.next().unwrap());
        let (ta, tb) = (timings(a).await, timings(b).await);
        // Queued together, the two calls shared one forward of four rows.
        assert_eq!(ta.forward, tb.forward);
        drop(batcher);
        let seen = seen.lock().unwrap();
        let batches: Vec<(&u64, &String)> = seen
            .spans
            .iter()
            .filter(|(_, (name, _))| name == "unet_batch")
            .map(|(id, (_, fields))| (id, fields))
            .collect();
        assert_eq!(batches.len(), 1, "{batches:?}");
        let (batch, fields) = batches[0];
        assert!(
            fields.contains("rows=4") && fields.contains("calls=2"),
            "{fields}"
        );
        for r in &requests {
            assert!(seen.follows.contains(&(*batch, *r)), "{:?}", seen.follows);
        }
    }
}
