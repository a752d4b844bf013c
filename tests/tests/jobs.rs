//! Durable async jobs with real processes: a real `redis-server` (append-only
//! file, `appendfsync always`) on a free port, the model services, gateways
//! started with `--redis`, and a webhook receiver that checks every
//! signature. Faults are SIGKILLs: of a gateway with jobs queued and
//! running, then of Redis — and every accepted job completes, each with
//! its signed webhook; a cancelled job never completes; the same
//! idempotency key gives the same job; a job's image equals the
//! synchronous route's; two keys, one flooding, are served in turn.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::procs::Proc;
use common::raw::{exchange, post};
use sd_gateway::webhook::Secret;
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::{GenerateRequest, JobRequest, JobStatus, SubmitJobRequest};
use serde_json::{json, Value};
use tonic::Code;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A `redis-server` of our own, on a port and folder that survive its
/// restarts; SIGKILLed on drop.
struct Redis {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    fn start(dir: &Path) -> Redis {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = Redis {
            port,
            dir: dir.to_path_buf(),
            child: None,
        };
        r.restart();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (make setup installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.command("PING") != "+PONG" {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A command sent as RESP (arguments of any bytes); its reply's first line.
    fn resp(&self, args: &[&str]) -> String {
        let mut cmd = format!("*{}\r\n", args.len());
        for a in args {
            cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(cmd.as_bytes()).unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    }

    /// One inline command's first reply line ("" when unreachable).
    fn command(&self, cmd: &str) -> String {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return String::new();
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        if s.write_all(format!("{cmd}\r\n").as_bytes()).is_err() {
            return String::new();
        }
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One webhook delivery as the receiver saw it.
#[derive(Debug, Clone)]
struct Delivery {
    msg_id: String,
    job: String,
    status: String,
    signed: bool,
}

/// A webhook receiver: checks each delivery's signature, answers the first
/// try of every message 503 (so each is retried), the next 200.
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Delivery>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        let got = Arc::new(Mutex::new(Vec::new()));
        let seen = got.clone();
        let secret = Secret::parse(SECRET).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (head, body) = read_request(&conn);
                let header = |name: &str| {
                    head.lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                        })
                        .unwrap_or_default()
                };
                let (id, ts, sig) = (
                    header("webhook-id"),
                    header("webhook-timestamp"),
                    header("webhook-signature"),
                );
                let signed = ts
                    .parse()
                    .is_ok_and(|t| secret.verifies(&id, t, &body, &sig));
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let d = Delivery {
                    msg_id: id.clone(),
                    job: v["id"].as_str().unwrap_or("").to_string(),
                    status: v["status"].as_str().unwrap_or("").to_string(),
                    signed,
                };
                let first = {
                    let mut g = seen.lock().unwrap();
                    let first = !g.iter().any(|x: &Delivery| x.msg_id == id);
                    g.push(d);
                    first
                };
                let status = if first {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                };
                let mut conn = conn;
                let _ = conn.write_all(
                    format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
            }
        });
        Receiver { url, got }
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }
}

fn read_request(mut conn: &TcpStream) -> (String, Vec<u8>) {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = conn.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return (head, buf[end + 4..].to_vec());
        }
    }
    (String::new(), Vec::new())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The model services of the tiny SD model, once per test.
struct Services {
    text: Proc,
    denoiser: Proc,
    vae: Proc,
    /// The gateways' webhook secret file (removed with the services).
    secrets: tempfile::TempDir,
}

impl Services {
    fn start() -> Services {
        let args = || {
            vec![
                "--model".to_string(),
                common::model("sd1-tiny").to_string_lossy().into_owned(),
            ]
        };
        Services {
            text: Proc::spawn("sd-text-encoder", &args(), &[]),
            denoiser: Proc::spawn("sd-denoiser", &args(), &[]),
            vae: Proc::spawn("sd-autoencoder", &args(), &[]),
            secrets: tempfile::tempdir().unwrap(),
        }
    }

    /// A gateway on these services and `redis`, with short leases.
    async fn gateway(&self, redis: &Redis, extra: &[&str]) -> Proc {
        let mut args: Vec<String> = vec![
            "--text-encoder".into(),
            self.text.url(),
            "--denoiser".into(),
            self.denoiser.url(),
            "--autoencoder".into(),
            self.vae.url(),
            "--http-listen".into(),
            "127.0.0.1:0".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--redis".into(),
            redis.url(),
            "--job-lease-secs".into(),
            "2".into(),
            "--webhook-allow".into(),
            "127.0.0.1".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let secret = self.secrets.path().join("webhook-secret");
        std::fs::write(&secret, SECRET).unwrap();
        args.extend([
            "--webhook-secret-file".to_string(),
            secret.to_string_lossy().into_owned(),
        ]);
        let g = Proc::spawn("sd-gateway", &args, &[]);
        g.wait_serving(Duration::from_secs(60)).await;
        g
    }
}

fn get(base: &str, path: &str, key: &str) -> (u16, Value) {
    let raw = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{}\r\n",
        common::raw::host_port(base),
        auth(key)
    );
    exchange(base, raw.as_bytes())
}

fn delete(base: &str, path: &str, key: &str) -> (u16, Value) {
    let raw = format!(
        "DELETE {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{}\r\n",
        common::raw::host_port(base),
        auth(key)
    );
    exchange(base, raw.as_bytes())
}

fn auth(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("Authorization: Bearer {key}\r\n")
    }
}

fn submit(base: &str, key: &str, body: &Value, idem: Option<&str>) -> (u16, Value) {
    let mut headers = format!("Content-Type: application/json\r\n{}", auth(key));
    if let Some(k) = idem {
        headers.push_str(&format!("Idempotency-Key: {k}\r\n"));
    }
    post(base, "/v1/jobs", &headers, body.to_string().as_bytes())
}

/// Poll until every job of `ids` is terminal; their last states.
fn wait_all(base: &str, key: &str, ids: &[String], within: Duration) -> HashMap<String, Value> {
    let deadline = Instant::now() + within;
    loop {
        let states: HashMap<String, Value> = ids
            .iter()
            .map(|id| (id.clone(), get(base, &format!("/v1/jobs/{id}"), key).1))
            .collect();
        let open: Vec<&String> = ids
            .iter()
            .filter(|id| {
                !matches!(
                    states[*id]["status"].as_str(),
                    Some("completed" | "failed" | "cancelled")
                )
            })
            .collect();
        if open.is_empty() {
            return states;
        }
        assert!(
            Instant::now() < deadline,
            "jobs not finished in {within:?}: {open:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Half the jobs sample ancestrally (Euler a: noise drawn at every step,
/// so a resumed job must continue the generator where it was), the rest
/// with the model's PNDM (a multistep history a resumed job must carry).
fn scheduler_for(prompt: &str) -> &'static str {
    if prompt.ends_with(['1', '3', '5', '7']) {
        "euler-a"
    } else {
        "pndm"
    }
}

fn job_body(prompt: &str, webhook: &str) -> Value {
    json!({"prompt": prompt, "size": "64x64", "steps": 60, "webhook_url": webhook,
        "scheduler": scheduler_for(prompt)})
}

fn image_of(job: &Value) -> Vec<u8> {
    use base64::Engine;
    let b64 = job["data"][0]["b64_json"]
        .as_str()
        .unwrap_or_else(|| panic!("no image in {job}"));
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

fn pixels(png: &[u8]) -> Vec<u8> {
    image::load_from_memory(png).unwrap().to_rgb8().into_raw()
}

/// Bad input is refused at the door, naming its field, and never queued.
fn refused_at_the_door(ha: &str) {
    let (code, e) = submit(ha, "", &json!({"prompt": "x", "steps": 0}), None);
    assert_eq!(
        (code, e["error"]["param"].as_str()),
        (400, Some("steps")),
        "{e}"
    );
    let (code, e) = submit(
        ha,
        "",
        &json!({"prompt": "x", "webhook_url": "http://169.254.169.254/latest"}),
        None,
    );
    assert_eq!(
        (code, e["error"]["param"].as_str()),
        (400, Some("webhook_url")),
        "{e}"
    );
    let (code, e) = submit(ha, "", &json!({"prompt": "x", "size": "63x64"}), None);
    assert_eq!(
        (code, e["error"]["param"].as_str()),
        (400, Some("size")),
        "{e}"
    );
    assert_eq!(
        get(ha, "/v1/jobs", "").1["data"].as_array().unwrap().len(),
        0
    );
}

/// Every finished job's webhook arrives signed (retried once: the receiver
/// refuses each first try), under one webhook-id, with its status.
fn signed_webhooks(hooks: &Receiver, want: &[String], victim: &str) -> Vec<Delivery> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let delivered = loop {
        let got = hooks.deliveries();
        let done: Vec<&String> = want
            .iter()
            .filter(|id| got.iter().filter(|d| &d.job == *id).count() >= 2)
            .collect();
        if done.len() == want.len() {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "webhooks missing: {} of {}",
            done.len(),
            want.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        delivered.iter().all(|d| d.signed),
        "an unsigned delivery: {delivered:?}"
    );
    for id in want {
        let mine: Vec<&Delivery> = delivered.iter().filter(|d| &d.job == id).collect();
        assert!(
            mine.windows(2).all(|w| w[0].msg_id == w[1].msg_id),
            "webhook-id changed between retries: {mine:?}"
        );
        let status = if id == victim {
            "cancelled"
        } else {
            "completed"
        };
        assert!(mine.iter().all(|d| d.status == status), "{mine:?}");
    }
    delivered
}

/// A running job cancelled stops, and stays cancelled.
async fn a_running_job_cancelled_stops(
    c: &mut GenerationClient<tonic::transport::Channel>,
    req: &GenerateRequest,
) {
    let submit = |r: GenerateRequest| SubmitJobRequest {
        request: Some(r),
        webhook_url: String::new(),
        idempotency_key: String::new(),
    };
    let long = GenerateRequest {
        steps: 150,
        width: 256,
        height: 256,
        ..req.clone()
    };
    let job = c.submit_job(submit(long)).await.unwrap().into_inner();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = c
            .get_job(JobRequest { id: job.id.clone() })
            .await
            .unwrap()
            .into_inner();
        if j.progress > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the long job never progressed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let j = c
        .cancel_job(JobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.status, JobStatus::Cancelled as i32);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let j = c
        .get_job(JobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.status, JobStatus::Cancelled as i32);
    assert!(j.result.is_none());
    assert!(j.progress < 0.5, "the cancelled job ran on: {}", j.progress);
}

/// A job run again from its start makes the synchronous route's image
/// (the seed it was given at submit, the same request).
fn same_image_as_the_synchronous_route(hb: &str, r: &Value, ids: &[String]) {
    let seed = r["seed"].as_u64().unwrap();
    let prompt_of = |id: &str| {
        let i = ids.iter().position(|x| x == id).unwrap();
        match i {
            0..=7 => format!("job {i}"),
            8 => "same".into(),
            _ => "over grpc".into(),
        }
    };
    let prompt = prompt_of(r["id"].as_str().unwrap());
    let sync_body = json!({"prompt": prompt, "size": "64x64", "steps": 60, "seed": seed,
        "scheduler": scheduler_for(&prompt)});
    let (code, sync) = post(
        hb,
        "/v1/images/generations",
        "Content-Type: application/json\r\n",
        sync_body.to_string().as_bytes(),
    );
    assert_eq!(code, 200, "{sync}");
    assert_eq!(
        pixels(&image_of(r)),
        pixels(&image_of(&sync)),
        "a resumed job's image differs from the synchronous route's"
    );
}

/// The order jobs complete in, as a client polling both keys sees it.
fn completion_order(h: &str, n: usize) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while order.len() < n {
        for key in ["flood-key", "quiet-key"] {
            let list = get(h, "/v1/jobs?status=completed", key).1;
            let mut done: Vec<(i64, String)> = list["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|j| {
                    (
                        j["completed_at"].as_i64().unwrap(),
                        j["id"].as_str().unwrap().to_string(),
                    )
                })
                .collect();
            done.sort();
            for (_, id) in done {
                if !order.contains(&id) {
                    order.push(id);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "jobs not finished: {} done",
            order.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    order
}

/// What the store holds per finished job (its hash: request, status, one
/// 64x64 PNG), as Redis counts it.
fn memory_per_job(redis: &Redis, ids: &[String]) {
    let bytes: Vec<u64> = ids
        .iter()
        .filter_map(|id| {
            let r = redis.command(&format!("MEMORY USAGE sd:job:{id} SAMPLES 0"));
            r.strip_prefix(':')?.parse().ok()
        })
        .collect();
    assert_eq!(
        bytes.len(),
        ids.len(),
        "MEMORY USAGE answered for every job"
    );
    println!(
        "store memory per completed job: {} to {} bytes (mean {})",
        bytes.iter().min().unwrap(),
        bytes.iter().max().unwrap(),
        bytes.iter().sum::<u64>() / bytes.len() as u64
    );
}

/// Until gateway A runs a job and every running job is between a fifth
/// and four fifths through its steps.
async fn wait_until_under_way(a: &Proc, hb: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let count = |o: &'static str| a.metric_where("sd_jobs_total", o);
        let open = count("outcome=\"started\"").await + count("outcome=\"resumed\"").await
            - count("outcome=\"completed\"").await;
        let running = get(hb, "/v1/jobs?status=in_progress", "").1;
        let running = running["data"].as_array().cloned().unwrap_or_default();
        let under_way = !running.is_empty()
            && running
                .iter()
                .all(|j| (0.2..0.8).contains(&j["progress"].as_f64().unwrap_or(0.0)));
        if open >= 1.0 && under_way {
            break;
        }
        assert!(Instant::now() < deadline, "gateway A never ran a job");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accepted_jobs_survive_a_gateway_kill_and_a_redis_kill_with_signed_webhooks() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start(dir.path());
    let services = Services::start();
    let hooks = Receiver::start();
    let one = ["--job-workers", "1", "--max-concurrent", "1"];
    let a = services.gateway(&redis, &one).await;
    let b = services.gateway(&redis, &one).await;
    let (ha, hb) = (a.http(), b.http());

    refused_at_the_door(&ha);

    // Ten jobs through both doors of both gateways; one twice under one
    // idempotency key.
    let mut ids = Vec::new();
    for i in 0..8 {
        let base = if i % 2 == 0 { &ha } else { &hb };
        let (code, j) = submit(base, "", &job_body(&format!("job {i}"), &hooks.url), None);
        assert_eq!(code, 202, "{j}");
        assert_eq!(j["status"], "queued");
        ids.push(j["id"].as_str().unwrap().to_string());
    }
    let (_, first) = submit(&ha, "", &job_body("same", &hooks.url), Some("key-1"));
    let (_, again) = submit(&hb, "", &job_body("same", &hooks.url), Some("key-1"));
    assert_eq!(first["id"], again["id"], "one idempotency key, one job");
    ids.push(first["id"].as_str().unwrap().to_string());
    let mut grpc = GenerationClient::connect(b.url()).await.unwrap();
    let req = GenerateRequest {
        prompt: "over grpc".into(),
        width: 64,
        height: 64,
        steps: 60,
        ..Default::default()
    };
    let j = grpc
        .submit_job(SubmitJobRequest {
            request: Some(req),
            webhook_url: hooks.url.clone(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.status, JobStatus::Queued as i32);
    ids.push(j.id.clone());
    // A queued job cancelled never runs.
    let (_, victim) = submit(&ha, "", &job_body("cancelled", &hooks.url), None);
    let victim = victim["id"].as_str().unwrap().to_string();
    let (code, c) = delete(&hb, &format!("/v1/jobs/{victim}"), "");
    assert_eq!(
        (code, c["status"].as_str()),
        (200, Some("cancelled")),
        "{c}"
    );

    // Gateway A dies while it runs a job (its `started` count is ahead of
    // its finished ones) a fifth of the way or more through its steps (so
    // its checkpoint holds some); B takes the job over after the lease and
    // goes on from the checkpoint.
    wait_until_under_way(&a, &hb).await;
    a.signal(libc::SIGKILL);
    // Then Redis dies too, with jobs still queued, and comes back.
    std::thread::sleep(Duration::from_millis(300));
    redis.kill();
    std::thread::sleep(Duration::from_millis(500));
    redis.restart();

    let states = wait_all(&hb, "", &ids, Duration::from_secs(180));
    for (id, s) in &states {
        assert_eq!(s["status"], "completed", "{id}: {s}");
    }
    let resumed: Vec<&Value> = states
        .values()
        .filter(|s| s["attempts"].as_u64() > Some(1))
        .collect();
    assert!(!resumed.is_empty(), "no job was taken over from gateway A");
    // It went on from A's checkpoint (steps replayed, not computed again),
    // and made the image an uninterrupted run makes.
    let r = resumed
        .iter()
        .find(|r| r["resumed_from_step"].as_u64() > Some(0))
        .unwrap_or_else(|| panic!("no job resumed from a checkpoint: {resumed:?}"));
    println!(
        "resumed from step {} (60 steps; PNDM evaluates 61 times)",
        r["resumed_from_step"]
    );
    same_image_as_the_synchronous_route(&hb, r, &ids);
    let cancelled = get(&hb, &format!("/v1/jobs/{victim}"), "").1;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert!(cancelled["data"].is_null(), "a cancelled job has no images");

    let mut want: Vec<String> = ids.clone();
    want.push(victim.clone());
    let delivered = signed_webhooks(&hooks, &want, &victim);
    let repeats = delivered.len() - want.len();
    println!(
        "jobs: {} accepted, {} completed, {} cancelled, {} taken over after the gateway's SIGKILL; \
         Redis SIGKILLed and restarted; webhooks: {} deliveries for {} jobs ({repeats} retries)",
        ids.len() + 1,
        states.len(),
        1,
        resumed.len(),
        delivered.len(),
        want.len()
    );
    memory_per_job(&redis, &ids);
    // gRPC reads the same job, with its images.
    let g = grpc
        .get_job(JobRequest { id: ids[9].clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.status, JobStatus::Completed as i32);
    assert_eq!(g.result.unwrap().images.len(), 1);
    drop(b);
}

/// A finished job's events over HTTP; a job's previews there; consumers
/// forgotten and made anew.
fn events_and_consumers(g: &Proc, redis: &Redis, finished: &str) {
    // Server-sent events over HTTP for a finished job: its state, then the
    // job under its status's name.
    let text = sse(&g.http(), &format!("/v1/jobs/{}/events", finished));
    assert!(text.contains("event: job"), "{text}");
    assert!(text.contains("event: completed"), "{text}");
    // Consumers with nothing pending are forgotten (here: idle past 0 ms,
    // so this gateway's own), and a gateway whose consumer was forgotten
    // takes jobs as before (reading makes it anew).
    let pruned = redis.resp(&["EVAL", sd_gateway::queue::scripts::PRUNE, "0", "sd", "0"]);
    assert!(
        pruned.strip_prefix(':').and_then(|n| n.parse::<u32>().ok()) >= Some(1),
        "{pruned}"
    );
    // A job asking for previews: progress and previews on its events, as
    // the web page gets them, then the job with its image.
    let body = json!({"prompt": "a kite", "size": "64x64", "steps": 12, "preview_every": 4});
    let (code, j) = crate::submit(&g.http(), "", &body, None);
    assert_eq!(code, 202, "{j}");
    let text = sse(
        &g.http(),
        &format!("/v1/jobs/{}/events", j["id"].as_str().unwrap()),
    );
    for e in [
        "event: progress",
        "event: preview",
        "event: completed",
        "b64_json",
    ] {
        assert!(text.contains(e), "no {e} in {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_jobs_watch_cancel_and_match_generate() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let services = Services::start();
    // The long job below must not be refused for its predicted cost on a
    // busy machine.
    let g = services
        .gateway(&redis, &["--max-request-seconds", "1000000"])
        .await;
    let mut c = GenerationClient::connect(g.url()).await.unwrap();
    let req = GenerateRequest {
        prompt: "a lighthouse".into(),
        width: 64,
        height: 64,
        steps: 12,
        seed: Some(7),
        ..Default::default()
    };
    let submit = |r: GenerateRequest| SubmitJobRequest {
        request: Some(r),
        webhook_url: String::new(),
        idempotency_key: String::new(),
    };
    let job = c
        .submit_job(submit(req.clone()))
        .await
        .unwrap()
        .into_inner();
    // Watching: a progress event per step, then the result.
    let mut stream = c
        .watch_job(JobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let (mut steps, mut result) = (0, None);
    while let Some(e) = tokio_stream::StreamExt::next(&mut stream).await {
        match e.unwrap().event.unwrap() {
            sd_proto::v1::generate_event::Event::Progress(_) => steps += 1,
            sd_proto::v1::generate_event::Event::Result(r) => result = Some(r),
            sd_proto::v1::generate_event::Event::Preview(_) => {}
        }
    }
    assert!(steps >= 1, "no progress seen");
    let result = result.expect("the stream ends with the result");
    let sync = c.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(
        pixels(&result.images[0].data),
        pixels(&sync.images[0].data),
        "a job's image differs from Generate's"
    );
    let got = c
        .get_job(JobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.result.unwrap().images[0].data, result.images[0].data);

    a_running_job_cancelled_stops(&mut c, &req).await;
    let e = c
        .cancel_job(JobRequest { id: got.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());

    // Bad input: the field named, nothing queued; unknown ids: NOT_FOUND.
    let before = c
        .list_jobs(sd_proto::v1::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let bad = GenerateRequest {
        width: 65,
        ..req.clone()
    };
    let e = c.submit_job(submit(bad)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("width"), "{}", e.message());
    let e = c.submit_job(SubmitJobRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let after = c
        .list_jobs(sd_proto::v1::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(before.jobs.len(), after.jobs.len());
    for id in ["job_0123456789ab", "nonsense", "job_../x"] {
        let e = c.get_job(JobRequest { id: id.into() }).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{id}");
    }
    events_and_consumers(&g, &redis, &got.id);
}

/// A whole (finite) SSE response's text.
fn sse(base: &str, path: &str) -> String {
    let mut s = TcpStream::connect(common::raw::host_port(base)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            common::raw::host_port(base)
        )
        .as_bytes(),
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_are_taken_in_turn_across_api_keys_and_belong_to_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let services = Services::start();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "flood-key\nquiet-key\n").unwrap();
    let keys = keys.to_string_lossy().into_owned();
    let g = services
        .gateway(
            &redis,
            &[
                "--api-keys-file",
                &keys,
                "--job-workers",
                "1",
                "--max-queued-jobs-per-key",
                "12",
            ],
        )
        .await;
    let h = g.http();
    let body = json!({"prompt": "fair", "size": "64x64", "steps": 60});
    let mut flood = Vec::new();
    for _ in 0..12 {
        let (code, j) = submit(&h, "flood-key", &body, None);
        assert_eq!(code, 202, "{j}");
        flood.push(j["id"].as_str().unwrap().to_string());
    }
    // The flooding key's share of the queue (12 queued; running ones do
    // not count) fills: 429 and Retry-After.
    let raw = format!(
        "POST /v1/jobs HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Authorization: Bearer flood-key\r\nContent-Length: {}\r\n\r\n{}",
        common::raw::host_port(&h),
        body.to_string().len(),
        body
    );
    let mut refused = None;
    for _ in 0..4 {
        let mut s = TcpStream::connect(common::raw::host_port(&h)).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        if out.starts_with("HTTP/1.1 429") {
            refused = Some(out);
            break;
        }
        let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let j: Value = serde_json::from_str(body).unwrap();
        flood.push(j["id"].as_str().unwrap().to_string());
    }
    let out = refused.expect("the flooding key was never refused");
    assert!(out.to_ascii_lowercase().contains("retry-after:"), "{out}");
    let mut quiet = Vec::new();
    for _ in 0..2 {
        let (code, j) = submit(&h, "quiet-key", &body, None);
        assert_eq!(code, 202, "{j}");
        quiet.push(j["id"].as_str().unwrap().to_string());
    }
    // Another key's job is not there; no key at all is 401.
    assert_eq!(
        get(&h, &format!("/v1/jobs/{}", flood[0]), "quiet-key").0,
        404
    );
    assert_eq!(
        delete(&h, &format!("/v1/jobs/{}", flood[0]), "quiet-key").0,
        404
    );
    assert_eq!(get(&h, &format!("/v1/jobs/{}", flood[0]), "").0, 401);
    assert_eq!(
        get(&h, "/v1/jobs", "quiet-key").1["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let order = completion_order(&h, flood.len() + quiet.len());
    let positions: Vec<usize> = order
        .iter()
        .enumerate()
        .filter(|(_, id)| quiet.contains(id))
        .map(|(i, _)| order[..i].iter().filter(|id| !quiet.contains(id)).count())
        .collect();
    println!(
        "fairness: the quiet key's 2 jobs finished after {positions:?} of the flooding key's {} \
         (first come, first served: after {0})",
        flood.len()
    );
    assert!(
        positions.iter().all(|&p| p <= 4),
        "the quiet key waited behind the flood: {positions:?}"
    );
}

/// `sdctl up --jobs` (its own supervised redis-server) driven by clients
/// nobody here wrote: grpcio stubs from our proto, plain HTTP, and the
/// Standard Webhooks reference library verifying every webhook
/// (`tests/clients/job_clients.py`).
#[test]
fn sdctl_jobs_with_grpcio_stubs_and_the_standard_webhooks_library() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("webhook-secret");
    std::fs::write(&secret, SECRET).unwrap();
    let jobs_dir = dir.path().join("jobs");
    let stack = common::stack::Stack::start_with(
        &common::model("sd1-tiny"),
        &[
            "--jobs",
            "--jobs-dir",
            jobs_dir.to_str().unwrap(),
            &format!("--gateway-arg=--webhook-secret-file={}", secret.display()),
            "--gateway-arg=--webhook-allow=127.0.0.1",
            "--gateway-arg=--max-request-seconds=1000000",
        ],
    );
    let target = stack.url.trim_start_matches("http://");
    let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let out = common::run_client(
        "job_clients.py",
        &[
            target.as_ref(),
            stack.http.as_ref(),
            proto.as_os_str(),
            SECRET.as_ref(),
        ],
    );
    assert!(out.contains("job clients ok"), "{out}");
    // The store keeps its data where it was told, as an append-only file.
    assert!(
        jobs_dir.join("appendonlydir").is_dir(),
        "no append-only file in {}",
        jobs_dir.display()
    );
    println!("{out}");
}
