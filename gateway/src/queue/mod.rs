//! Durable async jobs (`--redis`): a generation is queued in Redis and
//! answered at once; every gateway sharing the store runs queued jobs
//! (round-robin across API keys), renews its claim on a running job, and a
//! job whose gateway died is taken over after the lease and run again from
//! its start — same request, same seed (drawn at submit), same image. On
//! every terminal status a signed webhook goes out, at least once.
//!
//! [`store`] keeps jobs and queues (atomic Lua [`scripts`]), [`worker`]
//! runs them, [`hooks`] delivers webhooks; the doors are HTTP `/v1/jobs`
//! and gRPC `SubmitJob`/`GetJob`/`CancelJob`/`WatchJob`/`ListJobs`.

pub mod doors;
pub mod hooks;
pub mod scripts;
pub mod store;
pub mod worker;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use sd_proto::v1::{GenerateRequest, GenerateResponse, JobStatus};

use crate::webhook::{Allow, Secret};
pub use store::Store;

#[derive(clap::Args, Debug, Clone)]
pub struct JobArgs {
    /// Redis for async jobs (`redis://[:password@]host:port[/db]`, or
    /// `rediss://` with TLS): serve `/v1/jobs` and SubmitJob/GetJob/…, and
    /// run queued jobs. Every gateway given the same Redis shares the queue.
    #[arg(long = "redis", env = "SD_REDIS_URL")]
    pub redis: Option<String>,
    /// Prefix of the job store's Redis keys (its stream is PREFIX:jobs).
    #[arg(long, env = "SD_JOB_PREFIX", default_value = "sd")]
    pub job_prefix: String,
    /// Jobs this gateway runs at once (0: --max-concurrent).
    #[arg(long, env = "SD_JOB_WORKERS", default_value_t = 0)]
    pub job_workers: usize,
    /// Seconds a running job's claim lasts unless renewed (every third of
    /// it); past it another gateway takes the job over.
    #[arg(long, env = "SD_JOB_LEASE_SECS", default_value_t = 30)]
    pub job_lease_secs: u64,
    /// Seconds a finished job and its images are kept.
    #[arg(long, env = "SD_JOB_TTL_SECS", default_value_t = 86_400)]
    pub job_ttl_secs: u64,
    /// Jobs queued per API key; beyond: 429 / RESOURCE_EXHAUSTED.
    #[arg(long, env = "SD_MAX_QUEUED_JOBS_PER_KEY", default_value_t = 1000)]
    pub max_queued_jobs_per_key: usize,
    /// Jobs queued in all.
    #[arg(long, env = "SD_MAX_QUEUED_JOBS", default_value_t = 10_000)]
    pub max_queued_jobs: usize,
    /// Largest result a job keeps (MiB of encoded images); beyond: failed.
    #[arg(long, env = "SD_JOB_MAX_RESULT_MIB", default_value_t = 64)]
    pub job_max_result_mib: usize,
    /// Checkpoint a running job's steps (MiB of predictions kept per job;
    /// 0: none): a gateway that takes the job over replays them and goes on
    /// from the last one kept, instead of starting again.
    #[arg(long, env = "SD_JOB_CHECKPOINT_MIB", default_value_t = 64)]
    pub job_checkpoint_mib: usize,
    /// Seconds one run of a job may take.
    #[arg(long, env = "SD_JOB_TIMEOUT_SECS", default_value_t = 3600)]
    pub job_timeout_secs: u64,
    /// Runs of a job that fails for a passing reason (a model service
    /// unavailable, the gateway full) before it is failed.
    #[arg(long, env = "SD_JOB_MAX_ATTEMPTS", default_value_t = 5)]
    pub job_max_attempts: u32,
    /// The Standard Webhooks secret (`whsec_…`) webhooks are signed with.
    #[arg(long, env = "SD_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Hosts webhooks may go to (`host`, `host:port`, `*.domain`;
    /// comma-separated). None: jobs take no webhook_url.
    #[arg(long, env = "SD_WEBHOOK_ALLOW", value_delimiter = ',')]
    pub webhook_allow: Vec<String>,
    /// Let allowed webhook hosts resolve to private addresses (RFC 1918,
    /// 100.64/10, fc00::/7): receivers inside the gateway's own network.
    /// Loopback and link-local (cloud metadata) addresses stay refused
    /// unless listed as such.
    #[arg(long, env = "SD_WEBHOOK_ALLOW_PRIVATE")]
    pub webhook_allow_private: bool,
    /// Seconds a webhook is retried (with backoff) before it is given up.
    #[arg(long, env = "SD_WEBHOOK_RETRY_SECS", default_value_t = 3600)]
    pub webhook_retry_secs: u64,
}

/// A job's status, as OpenAI's asynchronous jobs name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Queued,
    InProgress,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "queued" => Status::Queued,
            "in_progress" => Status::InProgress,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            _ => return None,
        })
    }

    pub fn terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }

    pub fn proto(self) -> JobStatus {
        match self {
            Status::Queued => JobStatus::Queued,
            Status::InProgress => JobStatus::InProgress,
            Status::Completed => JobStatus::Completed,
            Status::Failed => JobStatus::Failed,
            Status::Cancelled => JobStatus::Cancelled,
        }
    }

    pub fn from_proto(s: JobStatus) -> Option<Status> {
        Some(match s {
            JobStatus::Unspecified => return None,
            JobStatus::Queued => Status::Queued,
            JobStatus::InProgress => Status::InProgress,
            JobStatus::Completed => Status::Completed,
            JobStatus::Failed => Status::Failed,
            JobStatus::Cancelled => Status::Cancelled,
        })
    }
}

/// Why a job failed: the gRPC code's name in snake case and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub code: String,
    pub message: String,
}

impl JobError {
    pub fn from_status(s: &tonic::Status) -> JobError {
        JobError {
            code: code_name(s.code()),
            message: s.message().to_string(),
        }
    }
}

/// `Code::InvalidArgument` → `invalid_argument`.
pub fn code_name(c: tonic::Code) -> String {
    let mut out = String::new();
    for (i, ch) in format!("{c:?}").chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_lowercase());
    }
    out
}

/// A job as the store keeps it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub owner: String,
    pub status: Status,
    pub progress: f32,
    pub created_ms: i64,
    pub started_ms: Option<i64>,
    pub completed_ms: Option<i64>,
    pub error: Option<JobError>,
    /// The `GenerateRequest`, encoded.
    pub request: Vec<u8>,
    /// The `GenerateResponse`, encoded (when read with it).
    pub result: Option<Vec<u8>>,
    pub webhook_url: String,
    pub attempts: u32,
    /// How its webhook went (`delivered after N attempts`, …).
    pub webhook: Option<String>,
    /// Taken over from a gateway that died: the steps replayed from its
    /// checkpoint instead of computed again.
    pub resumed_from: Option<u32>,
}

impl Job {
    fn from_fields(id: &str, f: &HashMap<&str, Vec<u8>>) -> Option<Job> {
        let text = |k: &str| f.get(k).map(|v| String::from_utf8_lossy(v).into_owned());
        let num = |k: &str| text(k).and_then(|s| s.parse::<i64>().ok());
        let error = match (text("error_code"), text("error_message")) {
            (Some(code), message) => Some(JobError {
                code,
                message: message.unwrap_or_default(),
            }),
            _ => None,
        };
        Some(Job {
            id: id.to_string(),
            owner: text("owner")?,
            status: Status::parse(&text("status")?)?,
            progress: text("progress").and_then(|s| s.parse().ok()).unwrap_or(0.0),
            created_ms: num("created_ms").unwrap_or(0),
            started_ms: num("started_ms"),
            completed_ms: num("completed_ms"),
            error,
            request: f.get("request").cloned().unwrap_or_default(),
            result: f.get("result").cloned(),
            webhook_url: text("webhook_url").unwrap_or_default(),
            attempts: num("attempts").unwrap_or(0) as u32,
            webhook: text("webhook"),
            resumed_from: num("resumed_from").map(|n| n as u32),
        })
    }

    /// The job as gRPC returns it (with its images when read with them).
    pub fn to_proto(&self) -> sd_proto::v1::Job {
        let secs = |ms: i64| ms.div_euclid(1000);
        sd_proto::v1::Job {
            id: self.id.clone(),
            status: self.status.proto() as i32,
            progress: self.progress,
            created_at: secs(self.created_ms),
            started_at: self.started_ms.map(secs),
            completed_at: self.completed_ms.map(secs),
            error: self.error.as_ref().map(|e| sd_proto::v1::JobError {
                code: e.code.clone(),
                message: e.message.clone(),
            }),
            result: self
                .result
                .as_deref()
                .and_then(|r| GenerateResponse::decode(r).ok()),
            attempts: self.attempts,
            webhook_url: self.webhook_url.clone(),
            resumed_from_step: self.resumed_from.unwrap_or(0),
        }
    }

    /// The job as HTTP returns it: `data: [{b64_json}]` once completed and
    /// read with its images.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let secs = |ms: i64| ms.div_euclid(1000);
        let mut v = json!({
            "id": self.id,
            "object": "job",
            "status": self.status.as_str(),
            "progress": self.progress,
            "created_at": secs(self.created_ms),
            "started_at": self.started_ms.map(secs),
            "completed_at": self.completed_ms.map(secs),
            "error": self.error.as_ref().map(|e| json!({"code": e.code, "message": e.message})),
            "attempts": self.attempts,
        });
        if let Some(n) = self.resumed_from {
            v["resumed_from_step"] = json!(n);
        }
        if !self.webhook_url.is_empty() {
            v["webhook_url"] = json!(self.webhook_url);
            v["webhook"] = json!(self.webhook);
        }
        if let Some(r) = self
            .result
            .as_deref()
            .and_then(|r| GenerateResponse::decode(r).ok())
        {
            let data: Vec<serde_json::Value> = r
                .images
                .iter()
                .map(|i| json!({ "b64_json": crate::http::encode_base64(&i.data) }))
                .collect();
            v["data"] = json!(data);
            if let Some(p) = &r.parameters {
                v["seed"] = json!(p.seed);
            }
        }
        v
    }
}

/// A new job's id: `job_` and 24 hex digits, unguessable enough to name
/// nothing else (ids are checked against their owner besides).
pub fn new_id() -> String {
    use sha2::Digest;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let mut d = sha2::Sha256::new();
    d.update(h.finish().to_le_bytes());
    d.update(std::process::id().to_le_bytes());
    d.update(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.as_nanos())
            .to_le_bytes(),
    );
    let digest = d.finalize();
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("job_{hex}")
}

/// What the doors share: the store, the webhook rules and this gateway's
/// name as a worker.
pub struct Jobs {
    pub store: Store,
    pub allow: Allow,
    pub secret: Option<Secret>,
    pub worker: String,
    pub max_result_bytes: usize,
    pub checkpoint_bytes: usize,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub webhook_retry: Duration,
    /// Wakes this gateway's workers when it queues a job.
    pub wake: tokio::sync::Notify,
    /// The jobs this gateway runs now (a claim of its own that it takes
    /// back after the store was away is not run twice).
    pub running: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// A job to queue, checked.
pub struct NewJob {
    pub request: GenerateRequest,
    pub webhook_url: String,
    pub idempotency_key: String,
}

/// Why a submission was refused.
#[derive(Debug)]
pub enum Refused {
    /// A field is wrong (its name, and what is wrong).
    Invalid(&'static str, String),
    /// The queue is full.
    Full { per_key: bool },
    /// The store could not be reached.
    Store(String),
    /// The store is out of memory (Redis's `maxmemory`).
    StoreFull,
}

impl Jobs {
    pub async fn new(args: &JobArgs, url: &str) -> anyhow::Result<Jobs> {
        let secret = match &args.webhook_secret_file {
            Some(f) => {
                let text = std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("--webhook-secret-file {}: {e}", f.display()))?;
                Some(
                    Secret::parse(&text)
                        .map_err(|e| anyhow::anyhow!("--webhook-secret-file: {e}"))?,
                )
            }
            None => None,
        };
        let lease = Duration::from_secs(args.job_lease_secs.max(1));
        let config = store::Config {
            prefix: args.job_prefix.clone(),
            ttl: Duration::from_secs(args.job_ttl_secs.max(1)),
            lease,
            max_queued_per_key: args.max_queued_jobs_per_key,
            max_queued: args.max_queued_jobs,
            idempotency: Duration::from_secs(86_400),
        };
        let store = Store::connect(url, config, Duration::from_secs(60)).await?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "gateway".into());
        Ok(Jobs {
            store,
            allow: Allow::new(args.webhook_allow.iter().cloned())
                .with_private(args.webhook_allow_private),
            secret,
            worker: format!("{host}-{}-{}", std::process::id(), &new_id()[4..12]),
            max_result_bytes: args.job_max_result_mib << 20,
            checkpoint_bytes: args.job_checkpoint_mib << 20,
            timeout: Duration::from_secs(args.job_timeout_secs.max(1)),
            max_attempts: args.job_max_attempts.max(1),
            webhook_retry: Duration::from_secs(args.webhook_retry_secs),
            wake: tokio::sync::Notify::new(),
            running: std::sync::Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// Queue a checked job for `owner`; its seed is fixed now.
    pub async fn submit(&self, owner: &str, job: NewJob) -> Result<(String, bool), Refused> {
        let NewJob {
            mut request,
            webhook_url,
            idempotency_key,
        } = job;
        if !webhook_url.is_empty() {
            if self.secret.is_none() {
                return Err(Refused::Invalid(
                    "webhook_url",
                    "this gateway sends no webhooks (it has no --webhook-secret-file)".into(),
                ));
            }
            self.allow
                .check(&webhook_url)
                .map_err(|e| Refused::Invalid("webhook_url", e))?;
        }
        if idempotency_key.len() > 255 {
            return Err(Refused::Invalid(
                "idempotency_key",
                "longer than 255 characters".into(),
            ));
        }
        request.seed = Some(request.seed.unwrap_or_else(crate::plan::random_seed));
        let id = new_id();
        let idem = if idempotency_key.is_empty() {
            String::new()
        } else {
            use sha2::Digest;
            let d = sha2::Sha256::digest(idempotency_key.as_bytes());
            d[..16].iter().map(|b| format!("{b:02x}")).collect()
        };
        let mut fields = vec![("request", request.encode_to_vec())];
        if !webhook_url.is_empty() {
            fields.push(("webhook_url", webhook_url.into_bytes()));
        }
        // The store restarting (a failover, a SIGKILL): the job's id makes
        // sending it again safe, so wait a few seconds for it.
        let give_up = tokio::time::Instant::now() + SUBMIT_PATIENCE;
        let r = loop {
            match self.store.submit(&id, owner, &idem, &fields).await {
                Ok(r) => break r,
                Err(e)
                    if (e.is_io_error() || e.is_connection_dropped() || e.is_timeout())
                        && tokio::time::Instant::now() < give_up =>
                {
                    tracing::debug!("job store away, submission sent again: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) if e.code() == Some("OOM") => return Err(Refused::StoreFull),
                Err(e) => return Err(Refused::Store(e.to_string())),
            }
        };
        match r {
            store::Submitted::Queued(id) => {
                self.wake.notify_one();
                Ok((id, true))
            }
            store::Submitted::Existing(id) => Ok((id, false)),
            store::Submitted::Full { per_key } => Err(Refused::Full { per_key }),
        }
    }
}

/// How long a submission waits for a store that went away.
const SUBMIT_PATIENCE: Duration = Duration::from_secs(5);

pub type Shared = Arc<Jobs>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ids() {
        assert_eq!(code_name(tonic::Code::InvalidArgument), "invalid_argument");
        assert_eq!(code_name(tonic::Code::Unavailable), "unavailable");
        let (a, b) = (new_id(), new_id());
        assert_ne!(a, b);
        assert!(store::valid_id(&a), "{a}");
        for s in ["queued", "in_progress", "completed", "failed", "cancelled"] {
            let st = Status::parse(s).unwrap();
            assert_eq!(st.as_str(), s);
            assert_eq!(Status::from_proto(st.proto()), Some(st));
        }
        assert!(Status::Cancelled.terminal() && !Status::InProgress.terminal());
    }
}
