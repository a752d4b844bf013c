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
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::child::{Child, Spec, GATEWAY};
use crate::stage::{gateway_flag, Replicas, Stage};
use crate::supervise::{Policy, Supervisor};
use crate::token::{stack_token, StackToken};

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
    /// Folder of LoRA files requests may name (the text encoder's and the
    /// denoiser's `--lora-dir`).
    #[arg(long, env = "SD_LORA_DIR")]
    lora_dir: Option<PathBuf>,
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

/// The flags every model service of `model` gets.
fn service_args(args: &UpArgs, model: &Path) -> Vec<String> {
    let model = model.to_string_lossy().into_owned();
    let drain = args.drain_secs.to_string();
    [
        "--model",
        &model,
        "--device",
        &args.device,
        "--precision",
        &args.precision,
        "--drain-secs",
        &drain,
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(
        config_for(args, Path::new(&model))
            .into_iter()
            .flat_map(|c| ["--config".to_string(), c.to_string_lossy().into_owned()]),
    )
    .collect()
}

/// Whether `model` is a single-file checkpoint rather than a model directory.
fn is_single_file(model: &Path) -> bool {
    !model.is_dir()
}

/// The `--config` of `model`: none for a model directory (it has its own
/// configs); for a single file, the one `--config`, or the one given in
/// its place among the single-file models.
fn config_for<'a>(args: &'a UpArgs, model: &Path) -> Option<&'a PathBuf> {
    if !is_single_file(model) {
        return None;
    }
    match args.config.as_slice() {
        [] => None,
        [one] => Some(one),
        each => {
            let at = args
                .model
                .iter()
                .filter(|m| is_single_file(m))
                .position(|m| m == model)?;
            each.get(at)
        }
    }
}

/// A model directory (or `--config` directory) whose pipeline class
/// sdserve does not serve is refused here, before any service starts:
/// every service would refuse it too, each after its start-up.
fn check_family(dir: &Path) -> anyhow::Result<()> {
    let index = dir.join("model_index.json");
    if is_single_file(dir) || !index.is_file() {
        return Ok(());
    }
    let text =
        std::fs::read_to_string(&index).map_err(|e| anyhow::anyhow!("{}: {e}", index.display()))?;
    sd_proto::Family::of_model_index(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    Ok(())
}

/// `--config` given once, or once per single-file `--model`, and only
/// with one.
fn check_configs(args: &UpArgs) -> anyhow::Result<()> {
    let singles = args.model.iter().filter(|m| is_single_file(m)).count();
    match args.config.len() {
        0 => Ok(()),
        _ if singles == 0 => anyhow::bail!(
            "--config describes a single-file checkpoint, and no --model is one (a model \
             directory has its own configs)"
        ),
        1 => Ok(()),
        n if n == singles => Ok(()),
        n => anyhow::bail!(
            "--config given {n} times for {singles} single-file --model(s): give it once for \
             all of them, or once for each, in order"
        ),
    }
}

/// The flags one stage's services get: every service's, and the
/// autoencoder's `--vae`.
#[cfg(test)]
fn stage_args(args: &UpArgs, stage: Stage) -> Vec<String> {
    let first = args.model.first().cloned().unwrap_or_default();
    stage_args_for(args, stage, &first)
}

/// The same, for the services of `model`.
fn stage_args_for(args: &UpArgs, stage: Stage, model: &Path) -> Vec<String> {
    let mut v = service_args(args, model);
    if let (Stage::Autoencoder, Some(vae)) = (stage, &args.vae) {
        v.extend(["--vae".to_string(), vae.to_string_lossy().into_owned()]);
    }
    if let (Stage::TextEncoder | Stage::Denoiser, Some(dir)) = (stage, &args.lora_dir) {
        v.extend(["--lora-dir".to_string(), dir.to_string_lossy().into_owned()]);
    }
    v
}

/// Where sdserve's default model is looked for, in order: beside a
/// checkout's `target/{debug,release}/` binaries, an installed
/// `share/sdserve/`, the working directory.
fn default_model_candidates(bin: &Path) -> Vec<PathBuf> {
    vec![
        bin.join("../../models/emoji"),
        bin.join("../share/sdserve/models/emoji"),
        PathBuf::from("models/emoji"),
    ]
}

/// The model to serve: `--model`, or the default model.
fn model_dir(args: &UpArgs) -> anyhow::Result<PathBuf> {
    if let Some(m) = args.model.first() {
        return Ok(m.clone());
    }
    let bin = bin_dir(args)?;
    let candidates = default_model_candidates(&bin);
    let found = candidates
        .iter()
        .find(|c| c.join("model_index.json").is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no --model given and sdserve's default model is not at {}: pass --model DIR \
                 (a diffusers-layout Stable Diffusion model)",
                candidates
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let found = found.canonicalize().unwrap_or_else(|_| found.clone());
    eprintln!(
        "sdctl: no --model given: serving sdserve's default model {} (32×32 emoji, trained \
         by the project; --model DIR for a real Stable Diffusion model)",
        found.display()
    );
    Ok(found)
}

/// Every replica of every stage, in stage order, each on a free port.
fn service_specs(
    args: &UpArgs,
    dir: &Path,
    replicas: Replicas,
    token: &'static StackToken,
) -> anyhow::Result<Vec<Spec>> {
    let preload = crate::alloc::preload(args.allocator, std::env::var_os("LD_PRELOAD"))?;
    match &preload {
        Some(p) => eprintln!(
            "model services' allocator: LD_PRELOAD={}",
            p.to_string_lossy()
        ),
        None => eprintln!("model services' allocator: glibc malloc"),
    }
    let env: Vec<_> = preload
        .into_iter()
        .map(|p| (std::ffi::OsString::from("LD_PRELOAD"), p))
        .collect();
    let mut specs = Vec::new();
    for (m, model) in args.model.iter().enumerate() {
        for stage in Stage::ALL {
            for replica in 0..replicas.of(stage) {
                specs.push(Spec {
                    name: service_name(stage, m, model),
                    replica,
                    bin: dir.join(stage.binary()),
                    args: stage_args_for(args, stage, model),
                    listen: "127.0.0.1:0".to_string(),
                    http_listen: None,
                    drain: Duration::from_secs(args.drain_secs),
                    token,
                    env: env.clone(),
                });
            }
        }
    }
    Ok(specs)
}

/// A model's name, as the gateway serves it: a folder's name, a single
/// file's stem.
fn model_name(model: &Path) -> String {
    let name = if model.is_file() {
        model.file_stem()
    } else {
        model.file_name()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// The process name of `stage` for the `m`-th model: the stage's own for
/// the first (default) model, `stage@name` for the others.
fn service_name(stage: Stage, m: usize, model: &Path) -> &'static str {
    if m == 0 {
        stage.name()
    } else {
        // A few per run, for as long as sdctl runs.
        Box::leak(format!("{}@{}", stage.name(), model_name(model)).into_boxed_str())
    }
}

/// The gateway in front of `services`: each stage's URLs, sdctl's drain
/// time unless the extra flags set their own, then the extra flags.
fn gateway_spec(
    args: &UpArgs,
    dir: &Path,
    services: &[Child],
    token: &'static StackToken,
) -> anyhow::Result<Spec> {
    let mut v = Vec::new();
    let urls = |name: &str, sep: &str| -> String {
        services
            .iter()
            .filter(|c| c.spec.name == name)
            .map(Child::url)
            .collect::<Vec<_>>()
            .join(sep)
    };
    for stage in Stage::ALL {
        v.push(gateway_flag(stage));
        v.push(urls(stage.name(), ","));
    }
    // The other models: a route each, to their own services.
    for (m, model) in args.model.iter().enumerate().skip(1) {
        let stages: Vec<String> = Stage::ALL
            .iter()
            .map(|&s| urls(service_name(s, m, model), "|"))
            .collect();
        v.push("--model-route".into());
        v.push(format!("{}={}", model_name(model), stages.join(",")));
    }
    let drain = match drain_flag(&args.gateway_args)? {
        Some(secs) => secs,
        None => {
            v.extend(["--drain-secs".to_string(), args.drain_secs.to_string()]);
            args.drain_secs
        }
    };
    v.extend(args.gateway_args.iter().cloned());
    Ok(Spec {
        name: GATEWAY,
        replica: 0,
        bin: dir.join("sd-gateway"),
        args: v,
        listen: format!("{}:{}", args.host, args.port),
        http_listen: (!args.no_http).then(|| format!("{}:{}", args.host, args.http_port)),
        drain: Duration::from_secs(drain),
        token,
        env: Vec::new(),
    })
}

/// The `--drain-secs` among the gateway's extra flags, if any.
fn drain_flag(extra: &[String]) -> anyhow::Result<Option<u64>> {
    let mut found = None;
    for (i, a) in extra.iter().enumerate() {
        let value = match a.strip_prefix("--drain-secs") {
            Some(rest) if rest.starts_with('=') => Some(&rest[1..]),
            Some("") => extra.get(i + 1).map(String::as_str),
            _ => continue,
        };
        let secs = value
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("--gateway-arg --drain-secs: expected seconds"))?;
        found = Some(secs);
    }
    Ok(found)
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
