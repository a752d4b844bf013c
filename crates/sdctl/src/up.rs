//! `sdctl up`: a whole stack on localhost. Starts the three model services
//! on free ports, waits until each reports SERVING, starts the gateway in
//! front of them, prints its address, and stops everything on Ctrl-C or
//! SIGTERM (or when any process dies). Every process gets the stack's
//! random internal token in its environment.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use sd_launch::{Launch, Process, Stop, Stopped};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::stage::{gateway_flag, Replicas, Stage};

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Model directory (diffusers layout).
    #[arg(long, env = "SD_MODEL")]
    model: PathBuf,
    /// Gateway port (0: a free one; the address is printed).
    #[arg(long, default_value_t = 50051)]
    port: u16,
    /// Address to bind the gateway to.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Device for the model services: cpu, cuda or cuda:N.
    #[arg(long, env = "SD_DEVICE", default_value = "cpu")]
    device: String,
    /// Precision for the model services: fp32, fp16 or bf16.
    #[arg(long, env = "SD_PRECISION", default_value = "fp32")]
    precision: String,
    /// How long a service may take to load before giving up (seconds).
    #[arg(long, default_value_t = 600)]
    load_timeout: u64,
    /// Where the sd-* binaries are (default: next to sdctl).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Replicas per stage, e.g. `denoiser=2,text-encoder=1` (default 1 each);
    /// the gateway balances across them and fails over.
    #[arg(long, value_delimiter = ',')]
    replicas: Vec<String>,
    /// Extra flags for the gateway (e.g. `--gateway-arg=--max-concurrent=2`).
    #[arg(long = "gateway-arg", allow_hyphen_values = true)]
    gateway_args: Vec<String>,
}

/// How long a server may take to print its address (it does so before
/// loading its model).
const ADDRESS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long each process may drain its work after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

fn bin_dir(args: &UpArgs) -> anyhow::Result<PathBuf> {
    if let Some(d) = &args.bin_dir {
        return Ok(d.clone());
    }
    Ok(sd_launch::bin_dir()?)
}

/// Start a server binary and read its `listening on ADDR` line.
///
/// This blocks the task until the line comes, which the servers print
/// before loading anything. Blocking, rather than awaiting, means a start-up
/// cancelled by a signal can only stop at an `.await`, where every process
/// already started is in the caller's list to be stopped.
fn spawn(name: &str, bin: &Path, args: &[String]) -> anyhow::Result<Process> {
    let mut command = std::process::Command::new(bin);
    command.args(args).stderr(Stdio::inherit());
    stack_token()?.give_to(&mut command);
    let process = Launch::new(name)
        .timeout(ADDRESS_TIMEOUT)
        .stop(Stop::Terminate { grace: STOP_GRACE })
        .spawn(command)?;
    Ok(process)
}

/// The internal token of this stack: random, made once, given to every
/// child in its environment (never its command line, which `ps` shows).
struct StackToken(String);

impl StackToken {
    fn give_to(&self, command: &mut std::process::Command) {
        command
            .env(sd_proto::INTERNAL_TOKEN_ENV, &self.0)
            .env_remove(sd_proto::INTERNAL_TOKEN_FILE_ENV);
    }
}

fn stack_token() -> anyhow::Result<&'static StackToken> {
    static TOKEN: std::sync::OnceLock<StackToken> = std::sync::OnceLock::new();
    if let Some(t) = TOKEN.get() {
        return Ok(t);
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no random internal token: {e}"))?;
    let hex = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(TOKEN.get_or_init(|| StackToken(hex)))
}

/// Wait until `proc` reports SERVING, failing early if it exits.
async fn wait_serving(proc: &mut Process, timeout: Duration) -> anyhow::Result<()> {
    let url = proc.url();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(status) = proc.try_wait()? {
            anyhow::bail!("{} exited ({status}) while loading", proc.name());
        }
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(url.clone())?
            .connect()
            .await
        {
            let r = HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if matches!(r, Ok(ref r) if r.get_ref().status == ServingStatus::Serving as i32) {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("{} not SERVING after {timeout:?}", proc.name());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM to every process (the gateway first), SIGKILL to any still
/// running after the grace period.
fn stop_all(procs: &mut [Process]) {
    let stopped = sd_launch::stop_all(procs);
    for (p, stopped) in procs.iter().zip(stopped) {
        match stopped {
            Ok(Stopped::Exited(_)) => {}
            Ok(Stopped::Killed(_)) => {
                eprintln!("sdctl: {} did not stop in time; killed it", p.name());
            }
            Err(e) => eprintln!("sdctl: stopping {}: {e}", p.name()),
        }
    }
}

/// Ctrl-C and SIGTERM, listened for from the start, so that one arriving
/// while a server is being launched is seen afterwards rather than lost.
struct Interrupts {
    int: Option<Signal>,
    term: Option<Signal>,
}

impl Interrupts {
    fn listen() -> Self {
        Interrupts {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }

    /// Resolves on the first Ctrl-C or SIGTERM (never, if neither could be
    /// listened for).
    async fn recv(&mut self) {
        async fn next(s: &mut Option<Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = next(&mut self.int) => {},
            _ = next(&mut self.term) => {},
        }
    }
}

/// The arguments every model service gets.
fn service_args(args: &UpArgs) -> Vec<String> {
    let model = args.model.to_string_lossy().into_owned();
    [
        "--model",
        &model,
        "--device",
        &args.device,
        "--precision",
        &args.precision,
        "--listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Every replica of every stage, started in stage order; returns each
/// replica's stage and URL.
fn start_services(
    args: &UpArgs,
    dir: &Path,
    replicas: Replicas,
    procs: &mut Vec<Process>,
) -> anyhow::Result<Vec<(Stage, String)>> {
    let mut urls = Vec::new();
    for stage in Stage::ALL {
        for _ in 0..replicas.of(stage) {
            let p = spawn(stage.name(), &dir.join(stage.binary()), &service_args(args))?;
            urls.push((stage, p.url()));
            procs.push(p);
        }
    }
    Ok(urls)
}

/// The gateway's flags: each stage's URLs, then the user's extra flags.
fn gateway_args(args: &UpArgs, urls: &[(Stage, String)]) -> Vec<String> {
    let mut v = vec![
        "--listen".to_string(),
        format!("{}:{}", args.host, args.port),
    ];
    for stage in Stage::ALL {
        let of_stage: Vec<&str> = urls
            .iter()
            .filter(|(s, _)| *s == stage)
            .map(|(_, url)| url.as_str())
            .collect();
        v.push(gateway_flag(stage));
        v.push(of_stage.join(","));
    }
    v.extend(args.gateway_args.iter().cloned());
    v
}

/// The model services, each SERVING, then the gateway in front of them,
/// SERVING too. Every process started is pushed to `procs`, also on error.
async fn start_stack(
    args: &UpArgs,
    dir: &Path,
    replicas: Replicas,
    procs: &mut Vec<Process>,
) -> anyhow::Result<()> {
    let urls = start_services(args, dir, replicas, procs)?;
    let timeout = Duration::from_secs(args.load_timeout);
    for p in procs.iter_mut() {
        wait_serving(p, timeout).await?;
        eprintln!("sdctl: {} SERVING on {}", p.name(), p.addr());
    }
    let gateway = spawn(
        "gateway",
        &dir.join("sd-gateway"),
        &gateway_args(args, &urls),
    )?;
    procs.push(gateway);
    let gateway = procs.last_mut().context("the gateway was just started")?;
    wait_serving(gateway, timeout).await
}

/// Resolves when any process exits, naming it.
async fn first_exit(procs: &mut [Process]) -> String {
    loop {
        for p in procs.iter_mut() {
            if let Ok(Some(status)) = p.try_wait() {
                return format!("{} exited ({status})", p.name());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let mut interrupts = Interrupts::listen();
    let dir = bin_dir(&args)?;
    let replicas = Replicas::parse(&args.replicas)?;
    let mut procs = Vec::new();
    let started = tokio::select! {
        r = start_stack(&args, &dir, replicas, &mut procs) => r,
        _ = interrupts.recv() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    if let Err(e) = started {
        stop_all(&mut procs);
        return Err(e);
    }
    if let Some(gateway) = procs.last() {
        println!("gateway ready on {}", gateway.url());
    }
    // Run until a signal, or until one of the processes dies.
    let died = tokio::select! {
        _ = interrupts.recv() => None,
        r = first_exit(&mut procs) => Some(r),
    };
    stop_all(&mut procs);
    match died {
        None => {
            eprintln!("sdctl: stopped");
            Ok(())
        }
        Some(r) => Err(anyhow::anyhow!(r)),
    }
}

/// `sdctl probe`: SERVING → Ok, anything else → an error (exit 1).
pub async fn probe(addr: &str, service: &str, timeout: u64) -> anyhow::Result<()> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let check = async {
        let ch = tonic::transport::Endpoint::from_shared(url.clone())?
            .connect()
            .await?;
        let r = HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await?;
        anyhow::Ok(r.into_inner().status)
    };
    let status = tokio::time::timeout(Duration::from_secs(timeout), check)
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no answer in {timeout}s"))??;
    if status == ServingStatus::Serving as i32 {
        println!("SERVING");
        Ok(())
    } else {
        anyhow::bail!(
            "{url}: {}",
            ServingStatus::try_from(status)
                .map(|s| s.as_str_name())
                .unwrap_or("UNKNOWN")
        )
    }
}
