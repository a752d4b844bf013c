//! `sdctl up`: a whole stack on localhost. Starts the three model services
//! on free ports, waits until each reports SERVING, starts the gateway in
//! front of them, prints its address, and stops everything on Ctrl-C or
//! SIGTERM (or when any process dies).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

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

/// `stage=n` pairs, checked.
fn replica_counts(specs: &[String]) -> anyhow::Result<[usize; 3]> {
    let mut counts = [1usize; 3];
    for spec in specs {
        let (stage, n) = spec
            .split_once('=')
            .with_context(|| format!("--replicas {spec}: expected stage=count"))?;
        let n: usize = n
            .parse()
            .with_context(|| format!("--replicas {spec}: count must be a number"))?;
        if !(1..=16).contains(&n) {
            anyhow::bail!("--replicas {spec}: count must be 1..=16");
        }
        let i = match stage {
            "text-encoder" => 0,
            "denoiser" => 1,
            "autoencoder" => 2,
            other => anyhow::bail!(
                "--replicas: unknown stage `{other}` (text-encoder, denoiser, autoencoder)"
            ),
        };
        counts[i] = n;
    }
    Ok(counts)
}

struct Proc {
    name: &'static str,
    child: Child,
    addr: String,
}

fn bin_dir(args: &UpArgs) -> anyhow::Result<PathBuf> {
    if let Some(d) = &args.bin_dir {
        return Ok(d.clone());
    }
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .context("sdctl has no parent directory")?
        .to_path_buf())
}

/// Spawn a server binary and read its `listening on ADDR` line.
async fn spawn(name: &'static str, bin: PathBuf, args: Vec<String>) -> anyhow::Result<Proc> {
    let mut child = Command::new(&bin)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(a) = line.strip_prefix("listening on ") {
                return Ok::<_, std::io::Error>(Some(a.trim().to_string()));
            }
        }
        Ok(None)
    })
    .await
    .with_context(|| format!("{name} did not start listening"))??
    .with_context(|| format!("{name} exited before listening"))?;
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Proc { name, child, addr })
}

/// Wait until `proc` reports SERVING, failing early if it exits.
async fn wait_serving(proc: &mut Proc, timeout: Duration) -> anyhow::Result<()> {
    let url = format!("http://{}", proc.addr);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(status) = proc.child.try_wait()? {
            anyhow::bail!("{} exited ({status}) while loading", proc.name);
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
            anyhow::bail!("{} not SERVING after {timeout:?}", proc.name);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn terminate(proc: &Proc) {
    if let Some(pid) = proc.child.id() {
        // SAFETY: kill(2) with a pid we spawned and still own.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
}

async fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter().rev() {
        terminate(p);
    }
    for p in procs.iter_mut().rev() {
        match tokio::time::timeout(Duration::from_secs(15), p.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                eprintln!("sdctl: {} did not stop in time; killing it", p.name);
                let _ = p.child.kill().await;
            }
        }
    }
}

async fn signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let dir = bin_dir(&args)?;
    let model = args.model.to_string_lossy().into_owned();
    let common = |extra: &[&str]| {
        let mut v: Vec<String> = [
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
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let counts = replica_counts(&args.replicas)?;
    let mut procs = Vec::new();
    let mut urls: [Vec<String>; 3] = Default::default();
    let started = async {
        for (i, (name, bin)) in [
            ("text-encoder", "sd-text-encoder"),
            ("denoiser", "sd-denoiser"),
            ("autoencoder", "sd-autoencoder"),
        ]
        .into_iter()
        .enumerate()
        {
            for _ in 0..counts[i] {
                let p = spawn(name, dir.join(bin), common(&[])).await?;
                urls[i].push(format!("http://{}", p.addr));
                procs.push(p);
            }
        }
        let timeout = Duration::from_secs(args.load_timeout);
        for p in procs.iter_mut() {
            wait_serving(p, timeout).await?;
            eprintln!("sdctl: {} SERVING on {}", p.name, p.addr);
        }
        let mut gateway_args = vec![
            "--listen".to_string(),
            format!("{}:{}", args.host, args.port),
            "--text-encoder".into(),
            urls[0].join(","),
            "--denoiser".into(),
            urls[1].join(","),
            "--autoencoder".into(),
            urls[2].join(","),
        ];
        gateway_args.extend(args.gateway_args.iter().cloned());
        procs.push(spawn("gateway", dir.join("sd-gateway"), gateway_args).await?);
        let last = procs.len() - 1;
        wait_serving(&mut procs[last], timeout).await?;
        anyhow::Ok(())
    };
    let outcome = tokio::select! {
        r = started => r,
        _ = signal() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    if let Err(e) = outcome {
        stop_all(&mut procs).await;
        return Err(e);
    }
    println!("gateway ready on http://{}", procs[procs.len() - 1].addr);
    // Run until a signal, or until one of the processes dies.
    let died = async {
        loop {
            for p in procs.iter_mut() {
                if let Ok(Some(status)) = p.child.try_wait() {
                    return format!("{} exited ({status})", p.name);
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let reason = tokio::select! {
        _ = signal() => None,
        r = died => Some(r),
    };
    stop_all(&mut procs).await;
    match reason {
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
