//! `sdctl up` keeping a stack up: a killed denoiser replica is restarted on
//! its address while generations keep succeeding through the other one (a
//! killed gateway too, on its port);
//! SIGTERM to sdctl lets the generation in flight finish (the model
//! services stop only after the gateway) and exits 0. And a model service
//! stopped while a forward still runs exits cleanly.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::stack::bin_dir;
use sd_launch::{Launch, Process, Stop};
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::{generate_event, GenerateRequest};
use tokio_stream::StreamExt;

/// One `process EVENT name=… replica=… pid=… addr=… restarts=… [status=…]`
/// line of `sdctl up`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Event {
    event: String,
    name: String,
    replica: usize,
    pid: u32,
    addr: String,
    restarts: u32,
    status: Option<String>,
}

impl Event {
    fn parse(line: &str) -> Option<Event> {
        let mut words = line.split(' ');
        if words.next()? != "process" {
            return None;
        }
        let event = words.next()?.to_string();
        let fields: std::collections::HashMap<&str, &str> =
            words.filter_map(|w| w.split_once('=')).collect();
        Some(Event {
            event,
            name: fields.get("name")?.to_string(),
            replica: fields.get("replica")?.parse().ok()?,
            pid: fields.get("pid")?.parse().ok()?,
            addr: fields.get("addr")?.to_string(),
            restarts: fields.get("restarts")?.parse().ok()?,
            status: fields.get("status").map(|s| s.to_string()),
        })
    }
}

/// `sdctl up --port 0` on the tiny model and what it prints.
struct Sdctl {
    process: Process,
    lines: Receiver<String>,
    seen: Vec<Event>,
}

impl Sdctl {
    fn start(extra: &[&str]) -> Sdctl {
        let stderr = if std::env::var_os("SD_TEST_LOGS").is_some() {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        };
        Self::start_logging(extra, stderr)
    }

    fn start_logging(extra: &[&str], stderr: std::process::Stdio) -> Sdctl {
        let (tx, lines) = std::sync::mpsc::channel();
        let mut cmd = std::process::Command::new(bin_dir().join("sdctl"));
        cmd.args(["up", "--port", "0", "--http-port", "0", "--model"])
            .arg(common::model("sd1-tiny"))
            .args(["--gateway-arg=--backend-refresh-ms=200"])
            .args(extra)
            .env("SD_TORCH_THREADS", "1")
            .stderr(stderr);
        let process = Launch::new("sdctl up")
            .address_prefix("gateway ready on http://")
            .timeout(Duration::from_secs(120))
            .stop(Stop::Terminate {
                grace: Duration::from_secs(60),
            })
            .forward_lines(tx)
            .spawn(cmd)
            .unwrap_or_else(|e| panic!("the stack did not come up: {:#}", anyhow::Error::new(e)));
        Sdctl {
            process,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first event (seen or to come within `timeout`) that `want` picks.
    fn wait_for(&mut self, timeout: Duration, want: impl Fn(&Event) -> bool) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.seen.iter().find(|e| want(e)) {
                return e.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.extend(Event::parse(&line)),
                Err(e) => panic!(
                    "no such event within {timeout:?} ({e}); saw {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// Every event printed so far.
    fn drain(&mut self) -> &[Event] {
        self.seen
            .extend(self.lines.try_iter().filter_map(|l| Event::parse(&l)));
        &self.seen
    }
}

fn req(steps: u32, seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: "a lighthouse at dusk".into(),
        steps,
        seed: Some(seed),
        ..Default::default()
    }
}

async fn health(addr: &str) -> Option<i32> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let r = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .ok()?;
    Some(r.into_inner().status)
}

/// `n` generations from each of `clients` concurrent clients; every one
/// must succeed. `done` counts them as they complete.
async fn load(url: String, clients: u64, n: u64, done: Arc<AtomicUsize>) {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (url, done) = (url.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = GenerationClient::connect(url).await.unwrap();
            for i in 0..n {
                let r = client.generate(req(8, c * 1000 + i)).await;
                let r = r.unwrap_or_else(|s| panic!("client {c}, generation {i}: {s:?}"));
                assert_eq!(r.into_inner().images.len(), 1);
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_replicas_and_gateway_come_back_on_their_addresses_and_no_generation_fails() {
    let mut sdctl = Sdctl::start(&["--replicas", "denoiser=2"]);
    let url = sdctl.process.url();
    let victim = sdctl.wait_for(Duration::ZERO, |e| {
        e.event == "serving" && e.name == "denoiser" && e.replica == 0
    });

    // 4 clients × 8 generations; the replica is killed after the 8th.
    let done = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn(load(url.clone(), 4, 8, done.clone()));
    while done.load(Ordering::SeqCst) < 8 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SAFETY: kill(2) takes no pointers; the pid is sdctl's child, alive
    // (sdctl has not reported it exited).
    assert_eq!(unsafe { libc::kill(victim.pid as i32, libc::SIGKILL) }, 0);
    load.await.expect("every generation succeeded");
    assert_eq!(done.load(Ordering::SeqCst), 32);

    // sdctl saw the kill, restarted the replica on the same address, and
    // it serves there again; sdctl itself stays up.
    let exited = sdctl.wait_for(Duration::from_secs(10), |e| {
        e.event == "exited" && e.pid == victim.pid
    });
    assert_eq!(exited.status.as_deref(), Some("signal:9"));
    let back = sdctl.wait_for(Duration::from_secs(60), |e| {
        e.event == "serving" && e.name == "denoiser" && e.replica == 0 && e.restarts == 1
    });
    assert_eq!(back.addr, victim.addr);
    assert_ne!(back.pid, victim.pid);
    assert_eq!(health(&back.addr).await, Some(1), "SERVING on its address");
    assert_eq!(sdctl.process.try_wait().unwrap(), None, "sdctl still up");

    // The restarted replica serves the gateway: with the other one killed
    // too, generations still succeed.
    let other = sdctl.wait_for(Duration::ZERO, |e| {
        e.event == "serving" && e.name == "denoiser" && e.replica == 1
    });
    // SAFETY: as above, for the other replica.
    assert_eq!(unsafe { libc::kill(other.pid as i32, libc::SIGKILL) }, 0);
    let mut client = GenerationClient::connect(url).await.unwrap();
    for seed in 0..3 {
        let mut r = tonic::Request::new(req(4, seed));
        r.set_timeout(Duration::from_secs(60));
        client
            .generate(r)
            .await
            .expect("served by the restarted replica");
    }
    sdctl.wait_for(Duration::from_secs(60), |e| {
        e.event == "serving" && e.name == "denoiser" && e.replica == 1 && e.restarts == 1
    });

    // A killed gateway comes back on its port: the same URL serves again.
    let gateway = sdctl.wait_for(Duration::ZERO, |e| {
        e.event == "serving" && e.name == "gateway"
    });
    // SAFETY: as above, for the gateway.
    assert_eq!(unsafe { libc::kill(gateway.pid as i32, libc::SIGKILL) }, 0);
    let back = sdctl.wait_for(Duration::from_secs(60), |e| {
        e.event == "serving" && e.name == "gateway" && e.restarts == 1
    });
    assert_eq!(back.addr, gateway.addr);
    let mut r = tonic::Request::new(req(4, 9));
    r.set_timeout(Duration::from_secs(60));
    client
        .generate(r)
        .await
        .expect("served by the restarted gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_to_sdctl_finishes_the_generation_in_flight_then_stops_in_order() {
    let mut sdctl = Sdctl::start(&[]);
    let mut client = GenerationClient::connect(sdctl.process.url())
        .await
        .unwrap();
    let mut stream = client
        .generate_stream(req(150, 1))
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(generate_event::Event::Progress(_))
    ));
    sdctl.process.signal(libc::SIGTERM).unwrap();

    // The generation runs to its end, decode included.
    let mut result = None;
    while let Some(ev) = stream.next().await {
        if let Some(generate_event::Event::Result(r)) = ev.expect("no error").event {
            result = Some(r);
        }
    }
    assert_eq!(result.expect("a result").images.len(), 1);

    let status = sdctl
        .process
        .wait_exit(Duration::from_secs(60))
        .unwrap()
        .expect("sdctl exited");
    assert!(status.success(), "{status}");
    // The gateway exited first, then the model services; all cleanly.
    let exits: Vec<Event> = sdctl
        .drain()
        .iter()
        .filter(|e| e.event == "exited")
        .cloned()
        .collect();
    let names: Vec<&str> = exits.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names.len(), 4, "{exits:#?}");
    assert_eq!(names[0], "gateway", "{exits:#?}");
    assert!(
        exits.iter().all(|e| e.status.as_deref() == Some("code:0")),
        "{exits:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sdctl_gives_up_on_a_process_that_keeps_failing_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let file = std::fs::File::create(&log).unwrap();
    let mut sdctl = Sdctl::start_logging(
        &["--max-failed-starts", "2", "--restart-backoff-ms", "100"],
        file.into(),
    );
    let victim = sdctl.wait_for(Duration::ZERO, |e| {
        e.event == "serving" && e.name == "autoencoder"
    });
    // SAFETY: kill(2) takes no pointers; the pid is sdctl's live child.
    assert_eq!(unsafe { libc::kill(victim.pid as i32, libc::SIGKILL) }, 0);
    // Someone else takes its port, so every restart fails to listen.
    let taken = loop {
        match std::net::TcpListener::bind(&victim.addr) {
            Ok(l) => break l,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let status = sdctl
        .process
        .wait_exit(Duration::from_secs(60))
        .unwrap()
        .expect("sdctl gave up");
    drop(taken);
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("autoencoder[0] failed 2 times in a row before SERVING")
            && stderr.contains("giving up"),
        "{stderr}"
    );
    // It stopped the rest of the stack on its way out.
    let exits = sdctl.drain().iter().filter(|e| e.event == "exited").count();
    assert!(exits >= 4, "{:#?}", sdctl.seen);
}

/// The state letter of `pid`'s thread named `name` (R: running).
fn thread_state(pid: u32, name: &str) -> Option<char> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        if comm.trim() == name {
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            return stat.rsplit_once(") ")?.1.chars().next();
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_denoiser_stopped_mid_forward_exits_cleanly() {
    use sd_proto::v1::denoiser_client::DenoiserClient;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stderr");
    let mut cmd = std::process::Command::new(bin_dir().join("sd-denoiser"));
    cmd.arg("--model")
        .arg(common::model("sd1-tiny"))
        .args(["--listen", "127.0.0.1:0", "--drain-secs", "1"])
        .env("SD_TORCH_THREADS", "1")
        // One UNet worker, the thread watched below.
        .env("SD_MODEL_CONCURRENCY", "1")
        .env("RUST_BACKTRACE", "1")
        .stderr(std::fs::File::create(&log).unwrap());
    let mut p = Launch::new("sd-denoiser").spawn(cmd).unwrap();
    while health(p.addr()).await != Some(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = DenoiserClient::connect(p.url()).await.unwrap();
    let info = client
        .info(sd_proto::v1::DenoiserInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    // A 1024² image's latents: a forward of many seconds on a CPU, whose
    // caller gives up after 300 ms.
    let mut call = tonic::Request::new(sd_proto::v1::PredictRequest {
        latents: Some(common::wire_zeros(&[1, 4, 128, 128])),
        timesteps: vec![500.0],
        cond: Some(sd_proto::v1::Embedding {
            pooled: None,
            id: String::new(),
            tensor: Some(common::wire_zeros(&[1, 77, info.context_dim as i64])),
        }),
        guidance_scale: 1.0,
        ..Default::default()
    });
    call.set_timeout(Duration::from_millis(300));
    let e = client.predict(call).await.unwrap_err();
    // (tonic's own timer may end the call before the server's deadline.)
    assert!(
        matches!(
            e.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{e:?}"
    );
    assert_eq!(
        thread_state(p.id(), "unet-worker-0"),
        Some('R'),
        "the abandoned forward runs on"
    );

    p.signal(libc::SIGTERM).unwrap();
    let status = p.wait_exit(Duration::from_secs(15)).unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    let status = status.unwrap_or_else(|| panic!("still running 15 s after SIGTERM\n{stderr}"));
    assert!(status.success(), "{status}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
