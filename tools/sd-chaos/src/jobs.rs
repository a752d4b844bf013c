//! The jobs run (`--jobs`): the stack under `sdctl up --jobs` (a supervised
//! redis-server, its append-only file synced at every write) with a short
//! job lease; clients submit small jobs over gRPC `SubmitJob` from the first
//! moment, a poller follows every accepted job with `GetJob`, and the faults
//! come a quiet phase apart (by default SIGKILL of the gateway, of Redis and
//! of denoiser replica 0). After the last phase the clients stop and every
//! accepted job is followed until it ends or the drain runs out: one still
//! unfinished then, or one the store no longer knows, is lost.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::{Job, JobRequest, JobStatus, SubmitJobRequest};
use tonic::transport::Channel;
use tonic::Code;

use crate::faults::{self, Fault};
use crate::load::{self, Kind, Rng};
use crate::report::Phase;
use crate::stack::Stack;

/// What the run is bounded by and what it injects.
#[derive(Debug, Clone)]
pub struct Plan {
    pub clients: usize,
    /// Percent of prompts of their own (as the chaos run's mix).
    pub unique_prompts: u64,
    pub seed: u64,
    pub quiet: Duration,
    pub faults: Vec<Fault>,
    pub stopped_for: Duration,
    /// How long the accepted jobs may take to end once submitting stops.
    pub drain: Duration,
    /// The phases end by then (the drain comes after).
    pub max_time: Duration,
}

/// How a submission was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The job's id.
    Accepted(String),
    /// The code and (the start of) the message.
    Refused(Code, String),
}

/// What `GetJob` last said of an accepted job.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    /// None: NOT_FOUND.
    pub status: Option<JobStatus>,
    pub attempts: u32,
    /// Steps replayed from a checkpoint when it was taken over.
    pub resumed_from_step: u32,
    /// The job's error (code, message), when it failed.
    pub error: Option<(String, String)>,
    /// Bytes of its encoded images, once completed.
    pub image_bytes: usize,
}

impl Seen {
    fn of(job: &Job, at: Instant) -> Seen {
        Seen {
            at,
            status: Some(job.status()),
            attempts: job.attempts,
            resumed_from_step: job.resumed_from_step,
            error: job
                .error
                .as_ref()
                .filter(|e| !e.code.is_empty())
                .map(|e| (e.code.clone(), e.message.clone())),
            image_bytes: job
                .result
                .as_ref()
                .map_or(0, |r| r.images.iter().map(|i| i.data.len()).sum()),
        }
    }

    /// Completed, failed, cancelled — or unknown to the store (NOT_FOUND).
    pub fn terminal(&self) -> bool {
        !matches!(
            self.status,
            Some(JobStatus::Queued | JobStatus::InProgress | JobStatus::Unspecified)
        )
    }
}

/// One submission and, if accepted, what became of its job.
#[derive(Debug, Clone)]
pub struct Submission {
    /// The phase it was sent in.
    pub phase: usize,
    pub kind: Kind,
    pub at: Instant,
    /// When SubmitJob answered.
    pub answered: Instant,
    pub answer: Answer,
    /// The last answer of `GetJob` (None: none yet).
    pub seen: Option<Seen>,
}

impl Submission {
    pub fn id(&self) -> Option<&str> {
        match &self.answer {
            Answer::Accepted(id) => Some(id),
            Answer::Refused(..) => None,
        }
    }

    pub fn finished(&self) -> bool {
        self.seen.as_ref().is_some_and(Seen::terminal)
    }

    pub fn status(&self) -> Option<JobStatus> {
        self.seen.as_ref().and_then(|s| s.status)
    }

    /// Whether its job was accepted before `t` and not yet seen to end then.
    pub fn open_at(&self, t: Instant) -> bool {
        self.id().is_some()
            && self.answered < t
            && !self.seen.as_ref().is_some_and(|s| s.terminal() && s.at < t)
    }

    /// Seconds from the submission until its completion was seen.
    pub fn latency(&self) -> Option<f64> {
        let s = self.seen.as_ref()?;
        (s.status == Some(JobStatus::Completed)).then(|| (s.at - self.at).as_secs_f64())
    }
}

/// What the run saw.
pub struct Outcome {
    pub phases: Vec<Phase>,
    pub submissions: Vec<Submission>,
    /// From the end of submitting until every accepted job had ended (or
    /// the drain ran out).
    pub drained_in: Duration,
    /// `MEMORY USAGE` of each completed job's hash, bytes (None: Redis
    /// could not be asked).
    pub redis_bytes: Option<Vec<u64>>,
    pub sdctl_survived: bool,
}

/// How long the harness waits for a process hit to serve again.
const RECOVERY_PATIENCE: Duration = Duration::from_secs(120);
/// Percent of the jobs that are image-to-image.
const IMG2IMG_PERCENT: u64 = 15;
/// Jobs unfinished (per client) beyond which clients hold back a new one,
/// for at most `HOLD_AT_MOST`: the queue stays short while the stack
/// keeps up, and submissions go on (to be refused) while it is down.
const BACKLOG_PER_CLIENT: usize = 3;
const HOLD_AT_MOST: Duration = Duration::from_secs(1);
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_TIMEOUT: Duration = Duration::from_secs(2);
/// The poller's pause between rounds over the unfinished jobs.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// What the clients and the poller share.
struct Shared {
    phase: AtomicUsize,
    sent: AtomicUsize,
    stop: AtomicBool,
    submissions: Mutex<Vec<Submission>>,
    init_image: Vec<u8>,
    unique_prompts: u64,
    backlog: usize,
}

impl Shared {
    fn submissions(&self) -> MutexGuard<'_, Vec<Submission>> {
        self.submissions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Accepted jobs not yet seen to end.
    fn unfinished(&self) -> usize {
        self.submissions()
            .iter()
            .filter(|s| s.id().is_some() && !s.finished())
            .count()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

fn client_of(url: &str) -> anyhow::Result<GenerationClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())?.connect_lazy();
    Ok(GenerationClient::new(channel).max_decoding_message_size(64 << 20))
}

/// One client: submits jobs until told to stop, each answer recorded.
async fn submitter(mut client: GenerationClient<Channel>, shared: Arc<Shared>, seed: u64) {
    let mut rng = Rng::new(seed);
    while !shared.stopped() {
        let held = Instant::now();
        while shared.unfinished() >= shared.backlog
            && held.elapsed() < HOLD_AT_MOST
            && !shared.stopped()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if shared.stopped() {
            break;
        }
        let kind = if rng.below(100) < IMG2IMG_PERCENT {
            Kind::Img2Img
        } else {
            Kind::Unary
        };
        let n = shared.sent.fetch_add(1, Ordering::SeqCst);
        let req = load::request(&mut rng, kind, n, &shared.init_image, shared.unique_prompts);
        let mut r = tonic::Request::new(SubmitJobRequest {
            request: Some(req),
            ..Default::default()
        });
        r.set_timeout(SUBMIT_TIMEOUT);
        let phase = shared.phase.load(Ordering::SeqCst);
        let at = Instant::now();
        let answer = match client.submit_job(r).await {
            Ok(job) => Answer::Accepted(job.into_inner().id),
            Err(s) => Answer::Refused(s.code(), s.message().chars().take(80).collect()),
        };
        let refused = matches!(answer, Answer::Refused(..));
        shared.submissions().push(Submission {
            phase,
            kind,
            at,
            answered: Instant::now(),
            answer,
            seen: None,
        });
        if refused {
            tokio::time::sleep(load::AFTER_FAILURE).await;
        }
    }
}

/// Follows every unfinished accepted job with `GetJob`, round after round,
/// until aborted. A round stops at the first call that gets no answer
/// (the gateway or its store restarting) and is tried again after a pause.
async fn poller(mut client: GenerationClient<Channel>, shared: Arc<Shared>) {
    loop {
        let open: Vec<(usize, String)> = shared
            .submissions()
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.finished())
            .filter_map(|(i, s)| Some((i, s.id()?.to_string())))
            .collect();
        for (i, id) in open {
            let mut r = tonic::Request::new(JobRequest { id });
            r.set_timeout(POLL_TIMEOUT);
            let seen = match client.get_job(r).await {
                Ok(job) => Seen::of(job.get_ref(), Instant::now()),
                Err(s) if s.code() == Code::NotFound => Seen {
                    at: Instant::now(),
                    status: None,
                    attempts: 0,
                    resumed_from_step: 0,
                    error: Some(("not_found".into(), s.message().to_string())),
                    image_bytes: 0,
                },
                Err(_) => break,
            };
            if let Some(s) = shared.submissions().get_mut(i) {
                s.seen = Some(seen);
            }
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Start a phase named `name` (ending the one before).
fn begin(phases: &mut Vec<Phase>, shared: &Shared, name: String) {
    let now = Instant::now();
    if let Some(p) = phases.last_mut() {
        p.end = now;
    }
    phases.push(Phase {
        name,
        start: now,
        end: now,
        fault: None,
    });
    shared.phase.store(phases.len() - 1, Ordering::SeqCst);
}

/// Wait `d`, or until `until`.
async fn quiet(d: Duration, until: Instant) {
    let end = (Instant::now() + d).min(until);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(stack: &mut Stack, plan: &Plan) -> anyhow::Result<Outcome> {
    let shared = Arc::new(Shared {
        phase: AtomicUsize::new(0),
        sent: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        submissions: Mutex::new(Vec::new()),
        init_image: load::gradient_png(64, 64)?,
        unique_prompts: plan.unique_prompts,
        backlog: BACKLOG_PER_CLIENT * plan.clients.max(1),
    });
    let until = Instant::now() + plan.max_time;
    let mut phases = Vec::new();
    begin(&mut phases, &shared, "before".into());
    let mut submitters = Vec::new();
    for c in 0..plan.clients {
        let seed = plan.seed.wrapping_mul(1000).wrapping_add(c as u64);
        submitters.push(tokio::spawn(submitter(
            client_of(&stack.url)?,
            shared.clone(),
            seed,
        )));
    }
    let poll = tokio::spawn(poller(client_of(&stack.url)?, shared.clone()));
    quiet(plan.quiet, until).await;
    for &fault in &plan.faults {
        if Instant::now() >= until {
            break;
        }
        begin(&mut phases, &shared, format!("during {}", fault.describe()));
        let injected = faults::inject(stack, fault, plan.stopped_for, RECOVERY_PATIENCE).await?;
        if let Some(p) = phases.last_mut() {
            p.fault = Some(injected);
        }
        begin(&mut phases, &shared, format!("after {}", fault.describe()));
        quiet(plan.quiet, until).await;
    }
    shared.stop.store(true, Ordering::SeqCst);
    for s in submitters {
        let _ = s.await;
    }
    if let Some(p) = phases.last_mut() {
        p.end = Instant::now();
    }
    let drain = Instant::now();
    while shared.unfinished() > 0 && drain.elapsed() < plan.drain {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained_in = drain.elapsed();
    poll.abort();
    let _ = poll.await;
    let submissions = shared.submissions().clone();
    let completed: Vec<&str> = submissions
        .iter()
        .filter(|s| s.status() == Some(JobStatus::Completed))
        .filter_map(Submission::id)
        .collect();
    let redis_bytes = stack
        .member("redis", 0)
        .and_then(|m| crate::jobs_report::job_bytes(&m.addr, &completed).ok());
    Ok(Outcome {
        phases,
        drained_in,
        redis_bytes,
        sdctl_survived: stack.sdctl_running(),
        submissions,
    })
}
