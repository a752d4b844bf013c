//! `sdctl up`: a whole stack on localhost. Starts the three model services
//! on free ports, waits until each reports SERVING, starts the gateway in
//! front of them and prints its address; then keeps every process up
//! (restarting one that exits, on its address: see [`crate::supervise`])
//! until Ctrl-C or SIGTERM, when it stops them in order, the gateway first.
//! Every process gets the stack's random internal token in its environment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::child::{Child, Kind, Spec, GATEWAY, REDIS};
use crate::stage::{gateway_flag, Replicas, Stage};
use crate::supervise::{Policy, Supervisor};
use crate::token::{stack_token, StackToken};

mod models;
mod specs;

use models::*;
use specs::*;

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// The model: a directory in the diffusers layout or a single-file
    /// checkpoint (`.safetensors`: SD 1.x, SD 2.x, SDXL base or refiner).
    /// Unset: sdserve's own default model, `models/emoji` (a 32×32 emoji
    /// model trained by the project). Repeat it to serve several models
    /// behind the one gateway, each with its own services (the first is
    /// the default; requests pick one by its name, the folder's or file's).
    #[arg(long, env = "SD_MODEL")]
    model: Vec<PathBuf>,
    /// For a single-file checkpoint of another architecture: a diffusers
    /// model directory whose configs describe it (the services' `--config`).
    /// With several single-file `--model`s: once for all of them, or once
    /// for each, in order; model directories never take it.
    #[arg(long, env = "SD_MODEL_CONFIG")]
    config: Vec<PathBuf>,
    /// Gateway port (0: a free one; the address is printed).
    #[arg(long, default_value_t = 50051)]
    port: u16,
    /// Address to bind the gateway to.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// HTTP port of the gateway (OpenAI Images API, AUTOMATIC1111 API):
    /// 7860 as A1111 users expect; 0: a free one (printed).
    #[arg(long, default_value_t = 7860)]
    http_port: u16,
    /// Serve gRPC only.
    #[arg(long)]
    no_http: bool,
    /// Device for the model services: cpu, cuda or cuda:N.
    #[arg(long, env = "SD_DEVICE", default_value = "cpu")]
    device: String,
    /// Precision for the model services: fp32 or bf16 on a CPU, fp16 or
    /// bf16 on CUDA.
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
    /// How long each process may finish its work in flight after SIGTERM
    /// (each gets `--drain-secs`; the gateway's own, when given as a
    /// `--gateway-arg`, wins for it). sdctl waits that long and 10 s more
    /// before killing a process that is stopping.
    #[arg(long, env = "SD_DRAIN_SECS", default_value_t = 30)]
    drain_secs: u64,
    /// Give up (stop the stack, exit 1) when a process exits this many
    /// times in a row without reaching SERVING.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    max_failed_starts: u32,
    /// The wait before restarting a process that exited, in ms; it doubles
    /// with each restart, up to 30 s, and starts again from this once the
    /// process has served for 30 s.
    #[arg(long, default_value_t = 500)]
    restart_backoff_ms: u64,
    /// malloc for the model services: tcmalloc (10-20% faster forwards on
    /// CPUs) where installed, or as asked.
    #[arg(long, env = "SD_ALLOCATOR", value_enum, default_value = "auto")]
    allocator: crate::alloc::Allocator,
    /// Serve this VAE instead of the model's own (the autoencoder's `--vae`).
    #[arg(long)]
    vae: Option<PathBuf>,
    /// FLUX: serve this transformer file instead of the model's own (the
    /// denoiser's `--transformer`).
    #[arg(long)]
    transformer: Option<PathBuf>,
    /// FLUX: the transformer blocks' weights in fp8 (the denoiser's
    /// `--fp8`: off, upcast or scaled).
    #[arg(long)]
    fp8: Option<String>,
    /// Folder of LoRA files requests may name (the text encoder's and the
    /// denoiser's `--lora-dir`).
    #[arg(long, env = "SD_LORA_DIR")]
    lora_dir: Option<PathBuf>,
    /// Folder of textual-inversion embeddings (`NAME.safetensors`) prompts
    /// may name (the text encoder's `--embeddings-dir`).
    #[arg(long, env = "SD_EMBEDDINGS_DIR")]
    embeddings_dir: Option<PathBuf>,
    /// Folder of ControlNets requests may name (diffusers folders and
    /// single .safetensors files; the denoiser's `--controlnet-dir`).
    #[arg(long)]
    controlnet_dir: Option<PathBuf>,
    /// Folder of IP-Adapters requests may name, with the CLIP vision
    /// encoder they read pictures with in `image_encoder/` (the text
    /// encoder's and the denoiser's `--ip-adapter-dir`).
    #[arg(long)]
    ip_adapter_dir: Option<PathBuf>,
    /// Serve async jobs (/v1/jobs, SubmitJob…): start and supervise a local
    /// `redis-server` as the job store (persistent: its append-only file,
    /// synced at every write, in --jobs-dir).
    #[arg(long, conflicts_with = "redis")]
    jobs: bool,
    /// Where --jobs keeps the job store's data.
    #[arg(long, env = "SD_JOBS_DIR", default_value = "sdserve-jobs")]
    jobs_dir: PathBuf,
    /// The local job store's port (0: a free one).
    #[arg(long, default_value_t = 0)]
    redis_port: u16,
    /// Serve async jobs from an existing Redis instead (the gateway's
    /// `--redis`: `redis://[:password@]host:port[/db]`).
    #[arg(long, env = "SD_REDIS_URL")]
    redis: Option<String>,
}

impl UpArgs {
    fn policy(&self) -> Policy {
        Policy {
            first_backoff: Duration::from_millis(self.restart_backoff_ms),
            max_backoff: Duration::from_secs(30)
                .max(Duration::from_millis(self.restart_backoff_ms)),
            reset_after: Duration::from_secs(30),
            max_failed_starts: self.max_failed_starts,
            load_timeout: Duration::from_secs(self.load_timeout),
        }
    }
}

fn bin_dir(args: &UpArgs) -> anyhow::Result<PathBuf> {
    if let Some(d) = &args.bin_dir {
        return Ok(d.clone());
    }
    Ok(sd_launch::bin_dir()?)
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

/// The model services, each SERVING, then the gateway in front of them,
/// SERVING too. Every process started stays in `sup`, also on error.
async fn start_stack(
    args: &UpArgs,
    dir: &Path,
    replicas: Replicas,
    sup: &mut Supervisor,
) -> anyhow::Result<()> {
    let token = stack_token()?;
    if args.jobs {
        sup.bring_up(vec![redis_spec(args, token)?]).await?;
    }
    sup.bring_up(service_specs(args, dir, replicas, token)?)
        .await?;
    let gateway = gateway_spec(args, dir, sup.children(), token)?;
    sup.bring_up(vec![gateway]).await
}

pub async fn run(mut args: UpArgs) -> anyhow::Result<()> {
    let first = model_dir(&args)?;
    match args.model.first_mut() {
        Some(m) => *m = first,
        None => args.model.push(first),
    }
    check_configs(&args)?;
    for model in args.model.iter().chain(&args.config) {
        check_family(model)?;
    }
    let mut names: Vec<String> = args.model.iter().map(|m| model_name(m)).collect();
    names.sort();
    names.dedup();
    anyhow::ensure!(
        names.len() == args.model.len(),
        "two --model with the same name: each model is served by its folder's (or file's) name"
    );
    let mut interrupts = Interrupts::listen();
    let dir = bin_dir(&args)?;
    let replicas = Replicas::parse(&args.replicas)?;
    let mut sup = Supervisor::new(args.policy());
    let started = tokio::select! {
        r = start_stack(&args, &dir, replicas, &mut sup) => r,
        _ = interrupts.recv() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    if let Err(e) = started {
        sup.shutdown();
        return Err(e);
    }
    if let Some(gateway) = sup.children().last() {
        if let Some(http) = &gateway.spec.http_listen {
            // Machine-readable first (sd-launch reads it), then for people.
            println!("{}{http}", sd_launch::HTTP);
            println!("HTTP ready on http://{http} (OpenAI: /v1, AUTOMATIC1111: /sdapi/v1)");
        }
        println!("gateway ready on {}", gateway.url());
    }
    // Run until a signal, or until a process cannot be kept up.
    let supervised = sup.supervise(interrupts.recv()).await;
    if let Err(e) = &supervised {
        eprintln!("sdctl: {e}; stopping");
    }
    sup.shutdown();
    if supervised.is_ok() {
        eprintln!("sdctl: stopped");
    }
    supervised
}

/// `sdctl probe`: SERVING → Ok, anything else → an error (exit 1).
pub async fn probe(addr: &str, service: &str, timeout: u64) -> anyhow::Result<()> {
    let status = sd_proto::health::status(addr, service, Duration::from_secs(timeout)).await?;
    if status == ServingStatus::Serving {
        println!("SERVING");
        Ok(())
    } else {
        anyhow::bail!("{addr}: {}", status.as_str_name())
    }
}

#[cfg(test)]
mod tests {
    use super::{check_configs, drain_flag, stage_args, stage_args_for, Stage, UpArgs};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        up: UpArgs,
    }

    #[test]
    fn only_the_autoencoder_gets_the_vae() {
        let cli = Cli::parse_from(["sdctl", "--model", "/m", "--vae", "/v"]);
        let args = stage_args(&cli.up, Stage::Autoencoder);
        assert!(args.windows(2).any(|w| w == ["--vae", "/v"]), "{args:?}");
        for stage in [Stage::TextEncoder, Stage::Denoiser] {
            assert!(!stage_args(&cli.up, stage).contains(&"--vae".to_string()));
        }
        let cli = Cli::parse_from(["sdctl", "--model", "/m"]);
        assert!(!stage_args(&cli.up, Stage::Autoencoder).contains(&"--vae".to_string()));
    }

    #[test]
    fn configs_go_to_single_file_models_alone_once_for_all_or_one_each() {
        let dir = std::env::temp_dir();
        let dir = dir.to_str().unwrap();
        let config = |argv: &[&str], model: &str| {
            let cli = Cli::parse_from([&["sdctl"], argv].concat());
            check_configs(&cli.up).map(|()| {
                let a = stage_args_for(&cli.up, Stage::Denoiser, std::path::Path::new(model));
                a.iter()
                    .position(|f| f == "--config")
                    .map(|i| a[i + 1].clone())
            })
        };
        // One for every single file; the model directory gets none.
        let one = [
            "--model",
            "/a.safetensors",
            "--model",
            dir,
            "--model",
            "/b.safetensors",
            "--config",
            "/c",
        ];
        assert_eq!(
            config(&one, "/a.safetensors").unwrap().as_deref(),
            Some("/c")
        );
        assert_eq!(
            config(&one, "/b.safetensors").unwrap().as_deref(),
            Some("/c")
        );
        assert_eq!(config(&one, dir).unwrap(), None);
        // One each, in the single files' order.
        let each = [&one[..], &["--config", "/d"]].concat();
        assert_eq!(
            config(&each, "/a.safetensors").unwrap().as_deref(),
            Some("/c")
        );
        assert_eq!(
            config(&each, "/b.safetensors").unwrap().as_deref(),
            Some("/d")
        );
        assert_eq!(config(&each, dir).unwrap(), None);
        // Neither fits: refused, naming the flag.
        let three = [&each[..], &["--config", "/e"]].concat();
        let e = config(&three, "/a.safetensors").unwrap_err().to_string();
        assert!(e.contains("--config given 3 times for 2"), "{e}");
        let e = config(&["--model", dir, "--config", "/c"], dir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no --model is one"), "{e}");
    }

    fn flag(args: &[&str]) -> anyhow::Result<Option<u64>> {
        drain_flag(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn the_gateways_own_drain_time_is_read_from_its_extra_flags() {
        assert_eq!(flag(&["--max-concurrent=2"]).unwrap(), None);
        assert_eq!(flag(&["--drain-secs=5"]).unwrap(), Some(5));
        assert_eq!(flag(&["--drain-secs", "7", "--x"]).unwrap(), Some(7));
        assert_eq!(flag(&["--drain-secs-extra=1"]).unwrap(), None);
        let e = flag(&["--drain-secs"]).unwrap_err().to_string();
        assert!(e.contains("--drain-secs: expected seconds"), "{e}");
    }
}
