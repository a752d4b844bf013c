//! The job store on Redis: the [`scripts`](super::scripts) run through one
//! multiplexed connection that reconnects by itself (a restarted Redis is
//! picked up again; a call that fails meanwhile is retried by its caller).

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};

use super::scripts;
use super::{Job, JobError, Status};

/// Where a job's queue entry stands for a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The stream entry this worker holds for the job.
    pub token: String,
    pub id: String,
}

/// What [`Store::submit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    Queued(String),
    /// The idempotency key's job, queued before.
    Existing(String),
    /// The queue is full: the caller's own share (`true`) or all of it.
    Full {
        per_key: bool,
    },
}

/// What [`Store::cancel`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancelled {
    Now,
    Missing,
    /// Already finished with this status.
    Finished(Status),
}

/// What a running job's worker is told when it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Running,
    /// Cancelled: stop.
    Stop,
    /// Another worker has the job now: stop, and touch nothing.
    Lost,
}

/// The store's bounds and lifetimes.
#[derive(Debug, Clone)]
pub struct Config {
    /// Key prefix (several deployments can share one Redis).
    pub prefix: String,
    /// A finished job (and its images) is kept this long.
    pub ttl: Duration,
    /// A running job's worker renews its claim within this; past it, any
    /// gateway may take the job over.
    pub lease: Duration,
    pub max_queued_per_key: usize,
    pub max_queued: usize,
    /// How long an idempotency key names its job.
    pub idempotency: Duration,
}

/// The consumer group every gateway reads the streams with.
pub const GROUP: &str = "gateways";

#[derive(Clone)]
pub struct Store {
    con: ConnectionManager,
    pub config: Config,
    scripts: std::sync::Arc<Scripts>,
    /// Where each stream's `XAUTOCLAIM` scan goes on from (it looks at a
    /// few pending entries per call: starting over each time would never
    /// reach those behind the first few live ones).
    cursors: std::sync::Arc<std::sync::Mutex<Cursors>>,
}

#[derive(Default)]
struct Cursors {
    jobs: Option<String>,
    hooks: Option<String>,
}

/// The stream whose pending entries a scan goes through.
#[derive(Clone, Copy)]
enum Scan {
    Jobs,
    Hooks,
}

struct Scripts {
    submit: Script,
    take: Script,
    resume: Script,
    heartbeat: Script,
    progress: Script,
    finish: Script,
    cancel: Script,
    list: Script,
    checkpoint: Script,
    hook_done: Script,
    prune: Script,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

type R<T> = redis::RedisResult<T>;

impl Store {
    /// Connect to `url` (retrying until `wait` has passed) and make sure the
    /// streams' consumer groups exist.
    pub async fn connect(url: &str, config: Config, wait: Duration) -> anyhow::Result<Store> {
        let client = redis::Client::open(url)
            .map_err(|e| anyhow::anyhow!("--redis `{}`: {e}", redact(url)))?;
        let cm = ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(2));
        let give_up = tokio::time::Instant::now() + wait;
        let con = loop {
            match ConnectionManager::new_with_config(client.clone(), cm.clone()).await {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() < give_up => {
                    tracing::warn!("redis at {} not reached yet: {e}", redact(url));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => anyhow::bail!("redis at {} not reached: {e}", redact(url)),
            }
        };
        let store = Store {
            con,
            config,
            scripts: std::sync::Arc::new(Scripts {
                submit: Script::new(scripts::SUBMIT),
                take: Script::new(scripts::TAKE),
                resume: Script::new(scripts::RESUME),
                heartbeat: Script::new(scripts::HEARTBEAT),
                progress: Script::new(scripts::PROGRESS),
                finish: Script::new(scripts::FINISH),
                cancel: Script::new(scripts::CANCEL),
                list: Script::new(scripts::LIST),
                checkpoint: Script::new(scripts::CHECKPOINT),
                hook_done: Script::new(scripts::HOOK_DONE),
                prune: Script::new(scripts::PRUNE),
            }),
            cursors: std::sync::Arc::new(std::sync::Mutex::new(Cursors::default())),
        };
        store.ensure_groups().await?;
        Ok(store)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.config.prefix)
    }

    /// The job stream's key (KEDA scales on it).
    pub fn jobs_stream(&self) -> String {
        self.key("jobs")
    }

    /// Create the consumer groups if they are not there (a fresh Redis, or
    /// one restarted without its data).
    pub async fn ensure_groups(&self) -> R<()> {
        for stream in ["jobs", "hooks"] {
            let r: R<Value> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.key(stream))
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut self.con.clone())
                .await;
            match r {
                Ok(_) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Queue a job (`fields` as the job hash keeps them).
    pub async fn submit(
        &self,
        id: &str,
        owner: &str,
        idempotency_key: &str,
        fields: &[(&str, Vec<u8>)],
    ) -> R<Submitted> {
        let mut inv = self.scripts.submit.prepare_invoke();
        inv.arg(&self.config.prefix)
            .arg(id)
            .arg(owner)
            .arg(now_ms())
            .arg(idempotency_key)
            .arg(self.config.idempotency.as_secs().max(1))
            .arg(self.config.max_queued_per_key)
            .arg(self.config.max_queued)
            .arg(self.config.ttl.as_millis() as u64)
            .arg("owner")
            .arg(owner)
            .arg("status")
            .arg("queued")
            .arg("created_ms")
            .arg(now_ms())
            .arg("attempts")
            .arg(0);
        for (k, v) in fields {
            inv.arg(*k).arg(v.as_slice());
        }
        let (what, value): (String, String) = inv.invoke_async(&mut self.con.clone()).await?;
        Ok(match what.as_str() {
            "queued" => Submitted::Queued(value),
            "existing" => Submitted::Existing(value),
            _ => Submitted::Full {
                per_key: value == "key",
            },
        })
    }

    /// The job `id` if `owner`'s (`None` for any owner), with its images
    /// when `with_result`.
    pub async fn get(&self, id: &str, owner: Option<&str>, with_result: bool) -> R<Option<Job>> {
        if !valid_id(id) {
            return Ok(None);
        }
        let mut fields: Vec<&str> = FIELDS.to_vec();
        if with_result {
            fields.push("result");
        }
        let values: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(self.key(&format!("job:{id}")))
            .arg(&fields)
            .query_async(&mut self.con.clone())
            .await?;
        let map: HashMap<&str, Vec<u8>> = fields
            .iter()
            .zip(values)
            .filter_map(|(k, v)| v.map(|v| (*k, v)))
            .collect();
        let Some(job) = Job::from_fields(id, &map) else {
            return Ok(None);
        };
        Ok(match owner {
            Some(o) if o != job.owner => None,
            _ => Some(job),
        })
    }

    /// An owner's jobs, newest first (without images).
    pub async fn list(&self, owner: &str, status: Option<Status>, limit: usize) -> R<Vec<Job>> {
        let ids: Vec<String> = self
            .scripts
            .list
            .prepare_invoke()
            .arg(&self.config.prefix)
            .arg(owner)
            .arg(limit.max(1))
            .arg(status.map_or("", Status::as_str))
            .invoke_async(&mut self.con.clone())
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(job) = self.get(&id, Some(owner), false).await? {
                out.push(job);
            }
        }
        Ok(out)
    }

    pub async fn cancel(&self, id: &str, owner: &str) -> R<Cancelled> {
        if !valid_id(id) {
            return Ok(Cancelled::Missing);
        }
        let r: String = self
            .scripts
            .cancel
            .prepare_invoke()
            .arg(&self.config.prefix)
            .arg(id)
            .arg(owner)
            .arg(now_ms())
            .arg(self.config.ttl.as_secs().max(1))
            .invoke_async(&mut self.con.clone())
            .await?;
        Ok(match r.as_str() {
            "cancelled" => Cancelled::Now,
            "missing" => Cancelled::Missing,
            other => Status::parse(other).map_or(Cancelled::Missing, Cancelled::Finished),
        })
    }

    /// The next job for `worker`: first a job whose worker stopped renewing
    /// its claim (run again), else a new token bound to the next owner's
    /// oldest job. `reclaim`: look for stalled jobs this time.
    pub async fn next(&self, worker: &str, reclaim: bool) -> R<Option<Claim>> {
        if reclaim {
            if let Some(c) = self.reclaim(worker).await? {
                return Ok(Some(c));
            }
        }
        match self.read_new(&self.jobs_stream(), worker).await? {
            Some((token, _)) => self.take(worker, &token).await,
            None => Ok(None),
        }
    }

    /// One entry of `stream` never delivered to the group before, now
    /// pending for `worker`: (id, fields).
    async fn read_new(&self, stream: &str, worker: &str) -> R<Option<Entry>> {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(worker)
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(&mut self.con.clone())
            .await?;
        Ok(first_entry(&reply))
    }

    async fn take(&self, worker: &str, token: &str) -> R<Option<Claim>> {
        let r: Value = self
            .scripts
            .take
            .prepare_invoke()
            .arg(&self.config.prefix)
            .arg(token)
            .arg(now_ms())
            .arg(worker)
            .invoke_async(&mut self.con.clone())
            .await?;
        // `'retry'` leaves the token pending: it is claimed again after the
        // lease (by this gateway or another) and bound then.
        Ok(match as_string(&r).as_deref() {
            Some("retry") | None => None,
            Some(id) => Some(Claim {
                token: token.to_string(),
                id: id.to_string(),
            }),
        })
    }

    fn cursor(&self, scan: Scan) -> String {
        self.cursors
            .lock()
            .ok()
            .and_then(|c| match scan {
                Scan::Jobs => c.jobs.clone(),
                Scan::Hooks => c.hooks.clone(),
            })
            .unwrap_or_else(|| "0-0".into())
    }

    /// Keep the scan's next cursor from an `XAUTOCLAIM` reply.
    fn advance(&self, scan: Scan, reply: &Value) {
        let next = match reply {
            Value::Array(parts) => parts.first().and_then(as_string),
            _ => None,
        };
        if let (Some(next), Ok(mut c)) = (next, self.cursors.lock()) {
            match scan {
                Scan::Jobs => c.jobs = Some(next),
                Scan::Hooks => c.hooks = Some(next),
            }
        }
    }

    /// Claim one token idle past the lease, and what it means.
    async fn reclaim(&self, worker: &str) -> R<Option<Claim>> {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(self.jobs_stream())
            .arg(GROUP)
            .arg(worker)
            .arg(self.config.lease.as_millis() as u64)
            .arg(self.cursor(Scan::Jobs))
            .arg("COUNT")
            .arg(1)
            .arg("JUSTID")
            .query_async(&mut self.con.clone())
            .await?;
        self.advance(Scan::Jobs, &reply);
        let Some(token) = autoclaimed(&reply) else {
            return Ok(None);
        };
        let r: Vec<String> = self
            .scripts
            .resume
            .prepare_invoke()
            .arg(&self.config.prefix)
            .arg(&token)
            .arg(now_ms())
            .arg(worker)
            .invoke_async(&mut self.con.clone())
            .await?;
        match r.first().map(String::as_str) {
            Some("run") => Ok(r.get(1).map(|id| Claim {
                token,
                id: id.clone(),
            })),
            Some("take") => self.take(worker, &token).await,
            _ => Ok(None),
        }
    }

    pub async fn heartbeat(&self, worker: &str, claim: &Claim) -> R<Keep> {
        let r: i64 = self
            .scripts
            .heartbeat
            .prepare_invoke()
            .arg(&self.config.prefix)
            .arg(&claim.token)
            .arg(&claim.id)
            .arg(worker)
            .invoke_async(&mut self.con.clone())
            .await?;
        Ok(keep(r))
    }

    /// Record a step (`event`: a `GenerateEvent`, encoded).
    pub async fn progress(&self, worker: &str, id: &str, progress: f32, event: &[u8]) -> R<Keep> {
        let r: i64 = self
            .scripts
            .progress
            .prepare_invoke()
            .arg(&self.config.prefix)
            .arg(id)
            .arg(worker)
            .arg(progress)
            .arg(self.config.ttl.as_secs().max(1))
            .arg("e")
            .arg(event)
            .invoke_async(&mut self.con.clone())
            .await?;
        Ok(if r == 1 { Keep::Running } else { Keep::Stop })
    }

    /// Finish a job the worker runs: completed with its encoded result, or
    /// failed with an error. Whether it was this worker's to finish.
    pub async fn finish(
        &self,
        worker: &str,
        claim: &Claim,
        outcome: Result<Vec<u8>, JobError>,
    ) -> R<Keep> {
        let mut inv = self.scripts.finish.prepare_invoke();
        inv.arg(&self.config.prefix)
            .arg(&claim.token)
            .arg(&claim.id)
            .arg(worker);
        match &outcome {
            Ok(_) => inv.arg("completed"),
            Err(_) => inv.arg("failed"),
        };
        inv.arg(now_ms()).arg(self.config.ttl.as_secs().max(1));
        match outcome {
            Ok(result) => inv.arg("result").arg(result).arg("progress").arg(1),
            Err(e) => inv
                .arg("error_code")
                .arg(e.code)
                .arg("error_message")
                .arg(e.message),
        };
        let r: i64 = inv.invoke_async(&mut self.con.clone()).await?;
        Ok(match r {
            1 => Keep::Running,
            0 => Keep::Stop,
            _ => Keep::Lost,
        })
    }

    /// Keep new predictions of a running job (and, once, how many were
    /// replayed at its start).
    pub async fn checkpoint(
        &self,
        worker: &str,
        id: &str,
        replayed: Option<usize>,
        predictions: &[Vec<u8>],
    ) -> R<Keep> {
        let mut inv = self.scripts.checkpoint.prepare_invoke();
        inv.arg(&self.config.prefix)
            .arg(id)
            .arg(worker)
            .arg(self.config.ttl.as_secs().max(1))
            .arg(replayed.map_or(String::new(), |n| n.to_string()));
        for p in predictions {
            inv.arg(p.as_slice());
        }
        let r: i64 = inv.invoke_async(&mut self.con.clone()).await?;
        Ok(if r == 1 { Keep::Running } else { Keep::Stop })
    }

    /// A job's checkpoint: its predictions so far.
    pub async fn checkpoints(&self, id: &str) -> R<Vec<Vec<u8>>> {
        redis::cmd("LRANGE")
            .arg(self.key(&format!("ck:{id}")))
            .arg(0)
            .arg(-1)
            .query_async(&mut self.con.clone())
            .await
    }

    /// A job's events after `after` (a stream id; "0" from the start), and
    /// the last id read.
    pub async fn events(&self, id: &str, after: &str) -> R<Vec<(String, Event)>> {
        let reply: Value = redis::cmd("XRANGE")
            .arg(self.key(&format!("ev:{id}")))
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(64)
            .query_async(&mut self.con.clone())
            .await?;
        Ok(entries(&reply)
            .into_iter()
            .filter_map(|(eid, fields)| {
                let ev = if let Some(e) = fields.get("e") {
                    Event::Step(e.clone())
                } else {
                    Event::End(String::from_utf8_lossy(fields.get("end")?).into_owned())
                };
                Some((eid, ev))
            })
            .collect())
    }

    /// Jobs queued in all, and the oldest one's creation time (ms).
    pub async fn depth(&self) -> R<(u64, Option<i64>)> {
        let queued = self.key("queued");
        let (n, oldest): (u64, Vec<(String, f64)>) = redis::pipe()
            .cmd("ZCARD")
            .arg(&queued)
            .cmd("ZRANGE")
            .arg(&queued)
            .arg(0)
            .arg(0)
            .arg("WITHSCORES")
            .query_async(&mut self.con.clone())
            .await?;
        Ok((n, oldest.first().map(|(_, s)| *s as i64)))
    }

    /// The next webhook to deliver: one whose deliverer stopped (past the
    /// lease) or a new one. (stream entry, job id).
    pub async fn next_hook(&self, worker: &str) -> R<Option<(String, String)>> {
        let hooks = self.key("hooks");
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&hooks)
            .arg(GROUP)
            .arg(worker)
            .arg(self.config.lease.as_millis() as u64)
            .arg(self.cursor(Scan::Hooks))
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.con.clone())
            .await?;
        self.advance(Scan::Hooks, &reply);
        let claimed = match &reply {
            Value::Array(parts) if parts.len() >= 2 => entries(&parts[1]),
            _ => Vec::new(),
        };
        let mut found = claimed.into_iter().next();
        if found.is_none() {
            found = self.read_new(&hooks, worker).await?;
        }
        Ok(found.and_then(|(entry, fields)| {
            let id = String::from_utf8(fields.get("job")?.clone()).ok()?;
            Some((entry, id))
        }))
    }

    /// Keep a webhook being delivered (its retries can outlast the lease).
    pub async fn hook_heartbeat(&self, worker: &str, entry: &str) -> R<()> {
        let _: Value = redis::cmd("XCLAIM")
            .arg(self.key("hooks"))
            .arg(GROUP)
            .arg(worker)
            .arg(0)
            .arg(entry)
            .arg("JUSTID")
            .query_async(&mut self.con.clone())
            .await?;
        Ok(())
    }

    /// A webhook delivered (or given up): record it on the job, drop the entry.
    pub async fn hook_done(&self, entry: &str, id: &str, outcome: &str) -> R<()> {
        let _: i64 = self
            .scripts
            .hook_done
            .prepare_invoke()
            .arg(&self.config.prefix)
            .arg(entry)
            .arg(id)
            .arg(outcome)
            .invoke_async(&mut self.con.clone())
            .await?;
        Ok(())
    }

    /// Delete the consumers (gateways) idle past `idle` with nothing
    /// pending; how many.
    pub async fn prune_consumers(&self, idle: Duration) -> R<i64> {
        self.scripts
            .prune
            .prepare_invoke()
            .arg(&self.config.prefix)
            .arg(idle.as_millis() as u64)
            .invoke_async(&mut self.con.clone())
            .await
    }

    /// Bytes Redis holds for a job (`MEMORY USAGE` of its hash).
    pub async fn job_bytes(&self, id: &str) -> R<Option<u64>> {
        redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(self.key(&format!("job:{id}")))
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut self.con.clone())
            .await
    }
}

/// An event of a running job, as the store keeps it.
#[derive(Debug, Clone)]
pub enum Event {
    /// An encoded `GenerateEvent` (progress or preview).
    Step(Vec<u8>),
    /// The job finished with this status.
    End(String),
}

/// The job hash's fields read by [`Store::get`] (the result apart).
const FIELDS: [&str; 14] = [
    "owner",
    "status",
    "progress",
    "created_ms",
    "started_ms",
    "completed_ms",
    "error_code",
    "error_message",
    "request",
    "webhook_url",
    "attempts",
    "webhook",
    "model",
    "resumed_from",
];

/// Job ids are ours (`job_` and hex): anything else names no job (and
/// never reaches a Redis key).
pub fn valid_id(id: &str) -> bool {
    id.strip_prefix("job_")
        .is_some_and(|h| !h.is_empty() && h.len() <= 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn keep(r: i64) -> Keep {
    match r {
        1 => Keep::Running,
        0 => Keep::Stop,
        _ => Keep::Lost,
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// A stream entry: its id and fields.
type Entry = (String, HashMap<String, Vec<u8>>);

/// Stream entries `[[id, [k, v, …]], …]` as (id, fields).
fn entries(v: &Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = as_string(pair.first()?)?;
            let mut fields = HashMap::new();
            if let Some(Value::Array(kv)) = pair.get(1) {
                for c in kv.chunks(2) {
                    if let (Some(k), Some(Value::BulkString(v))) =
                        (c.first().and_then(as_string), c.get(1))
                    {
                        fields.insert(k, v.clone());
                    }
                }
            }
            Some((id, fields))
        })
        .collect()
}

/// The first entry id of an XREADGROUP reply (one stream).
fn first_entry(v: &Value) -> Option<Entry> {
    let entries_of = match v {
        Value::Array(streams) => match streams.first()? {
            Value::Array(kv) if kv.len() == 2 => &kv[1],
            _ => return None,
        },
        Value::Map(m) => &m.first()?.1,
        _ => return None,
    };
    entries(entries_of).into_iter().next()
}

/// The claimed id of an `XAUTOCLAIM … JUSTID` reply.
fn autoclaimed(v: &Value) -> Option<String> {
    let Value::Array(parts) = v else {
        return None;
    };
    let Value::Array(ids) = parts.get(1)? else {
        return None;
    };
    ids.first().and_then(as_string)
}

/// A Redis URL with its password hidden (for errors and logs).
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_urls() {
        assert!(valid_id("job_0123abcdef"));
        assert!(!valid_id("job_"));
        assert!(!valid_id("job_x*"));
        assert!(!valid_id("other"));
        assert!(!valid_id("job_12:34"));
        assert_eq!(
            redact("redis://:hunter2@redis.internal:6379/0"),
            "redis://…@redis.internal:6379/0"
        );
        assert_eq!(redact("redis://localhost:6379"), "redis://localhost:6379");
    }

    #[test]
    fn stream_replies_are_read() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let entry = Value::Array(vec![
            bulk("1-0"),
            Value::Array(vec![bulk("job"), bulk("job_ab")]),
        ]);
        let read = Value::Array(vec![Value::Array(vec![
            bulk("sd:jobs"),
            Value::Array(vec![entry.clone()]),
        ])]);
        assert_eq!(first_entry(&read).map(|e| e.0).as_deref(), Some("1-0"));
        assert_eq!(first_entry(&Value::Nil), None);
        let claimed = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![bulk("7-1")]),
            Value::Array(vec![]),
        ]);
        assert_eq!(autoclaimed(&claimed).as_deref(), Some("7-1"));
        let e = entries(&Value::Array(vec![entry]));
        assert_eq!(e[0].1["job"], b"job_ab");
    }
}
