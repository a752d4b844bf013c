//! sd-bench: what the microservice split costs, in one run on one machine.
//!
//! 1. wall time per image: the gRPC stack, an in-process Rust pipeline (the
//!    gateway's own step loop over in-process stages) and diffusers, same
//!    weights, threads and steps, taking turns image by image; where the
//!    difference goes, stage by stage;
//! 2. per-step overhead: the gateway's mean step time minus the denoiser's
//!    UNet forward time;
//! 3. images/min and p50/p95 latency at several concurrencies, batching on
//!    and off;
//! 4. repeated-prompt latency, prompt-cache hit vs miss.
//!
//! `--device cuda --precision fp16` runs all three on a GPU; diffusers' step
//! time (between its step callbacks; CUDA events on a GPU) stands next to
//! the stack's for the per-step comparison.
//!
//! Prints Markdown tables (for docs/BENCHMARKS.md).

mod inprocess;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use sd_gateway::limits::Limits;
use sd_gateway::pipeline::Generator;
use sd_gateway::plan::Plan;
use sd_gateway::prompt_cache::PromptCache;
use sd_launch::{Launch, Process};
use sd_models::{DeviceSpec, ModelDir, Placement, Precision};
use sd_proto::v1::generation_client::GenerationClient;
use sd_proto::v1::{Dtype, GenerateRequest};
use sd_runtime::deadline::Deadline;
use sd_runtime::metrics::Metrics;

/// Measure the sdserve stack against in-process Rust and diffusers.
#[derive(Parser, Debug)]
struct Args {
    /// Model directory (diffusers layout).
    #[arg(long)]
    model: PathBuf,
    /// Denoising steps per image.
    #[arg(long, default_value_t = 20)]
    steps: u32,
    /// Image side in pixels (0: the model's default).
    #[arg(long, default_value_t = 0)]
    size: u32,
    /// libtorch threads, for every process and for diffusers.
    #[arg(long, default_value_t = 2)]
    threads: i32,
    /// Timed images per measurement.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Concurrency levels for the throughput table.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    concurrency: Vec<usize>,
    /// Requests per worker at each concurrency level.
    #[arg(long, default_value_t = 2)]
    requests_per_worker: usize,
    /// Python with diffusers (default: the project's venv).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Batch sizes (UNet rows; a guided image is two) for the table of
    /// in-process UNet forward times.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8,16")]
    forward_rows: Vec<i64>,
    /// UNet workers (forward passes at once in the denoiser) for the
    /// throughput table, one block of rows each.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    unet_workers: Vec<usize>,
    /// Skip the diffusers measurement.
    #[arg(long)]
    no_diffusers: bool,
    /// Device for every pipeline: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Precision for every pipeline: fp32, or fp16/bf16 on cuda.
    #[arg(long, default_value = "fp32")]
    precision: Precision,
}

/// How long a server may take to print its addresses (it does so before
/// loading its model).
const ADDRESS_TIMEOUT: Duration = Duration::from_secs(120);

/// A server of the stack, killed on drop, and where it serves `/metrics`.
struct Server {
    process: Process,
    metrics: String,
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no bin dir"))?
        .to_path_buf())
}

/// Start a server binary on free ports and read where it listens.
fn spawn(bin: &str, args: &[String], env: &[(&str, String)]) -> anyhow::Result<Server> {
    let mut cmd = Command::new(bin_dir()?.join(bin));
    cmd.args(args)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let process = Launch::new(bin)
        .timeout(ADDRESS_TIMEOUT)
        .wait_for_metrics()
        .spawn(cmd)?;
    let metrics = process
        .metrics_addr()
        .ok_or_else(|| anyhow::anyhow!("{bin} printed no metrics address"))?;
    Ok(Server { process, metrics })
}

/// The text exposition of a `/metrics` endpoint.
fn fetch_metrics(addr: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}

/// (sum of seconds, count) per stage of `sd_step_duration_seconds`.
type StageTimes = BTreeMap<String, (f64, f64)>;

fn stage_times(exposition: &str) -> StageTimes {
    let mut out = StageTimes::new();
    for line in exposition.lines() {
        let (is_sum, rest) = if let Some(r) = line.strip_prefix("sd_step_duration_seconds_sum{") {
            (true, r)
        } else if let Some(r) = line.strip_prefix("sd_step_duration_seconds_count{") {
            (false, r)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Some(stage) = labels
            .split(',')
            .find_map(|l| l.strip_prefix("stage=\""))
            .map(|s| s.trim_end_matches('"'))
        else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let e = out.entry(stage.to_string()).or_insert((0.0, 0.0));
        if is_sum {
            e.0 += v;
        } else {
            e.1 += v;
        }
    }
    out
}

/// Mean seconds per observation of each stage between two snapshots.
fn stage_means(before: &StageTimes, after: &StageTimes) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter_map(|(k, (s1, n1))| {
            let (s0, n0) = before.get(k).copied().unwrap_or((0.0, 0.0));
            (n1 > &n0).then(|| (k.clone(), (s1 - s0) / (n1 - n0)))
        })
        .collect()
}

struct Stack {
    services: Vec<Server>,
    gateway: Server,
}

impl Stack {
    /// Stage times of the gateway and the three model services.
    fn stage_times(&self) -> anyhow::Result<StageTimes> {
        let mut t = stage_times(&fetch_metrics(&self.gateway.metrics)?);
        for s in &self.services {
            t.extend(stage_times(&fetch_metrics(&s.metrics)?));
        }
        Ok(t)
    }
}

fn start_stack(args: &Args, batching: bool, unet_workers: usize) -> anyhow::Result<Stack> {
    let mut env = vec![
        ("SD_TORCH_THREADS", args.threads.to_string()),
        ("SD_MODEL_CONCURRENCY", unet_workers.to_string()),
        ("SD_DEVICE", args.device.to_string()),
        ("SD_PRECISION", args.precision.to_string()),
    ];
    if !batching {
        env.push(("SD_NO_BATCHING", "true".into()));
    }
    let margs = vec![
        "--model".to_string(),
        args.model.to_string_lossy().into_owned(),
    ];
    let text = spawn("sd-text-encoder", &margs, &env)?;
    let den = spawn("sd-denoiser", &margs, &env)?;
    let vae = spawn("sd-autoencoder", &margs, &env)?;
    let gargs = vec![
        "--text-encoder".to_string(),
        text.process.url(),
        "--denoiser".into(),
        den.process.url(),
        "--autoencoder".into(),
        vae.process.url(),
        "--max-concurrent".into(),
        "16".into(),
    ];
    let gateway = spawn("sd-gateway", &gargs, &[])?;
    Ok(Stack {
        services: vec![text, den, vae],
        gateway,
    })
}

fn request(args: &Args, seed: u64, prompt: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        steps: args.steps,
        width: args.size,
        height: args.size,
        seed: Some(seed),
        ..Default::default()
    }
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

fn percentile(xs: &[f64], p: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn timed(
    client: &mut GenerationClient<tonic::transport::Channel>,
    req: GenerateRequest,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    client.generate(req).await?;
    Ok(t.elapsed().as_secs_f64())
}

async fn connect(stack: &Stack) -> anyhow::Result<GenerationClient<tonic::transport::Channel>> {
    let url = stack.gateway.process.url();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(c) = GenerationClient::connect(url.clone()).await {
            let mut probe = c.clone();
            if probe
                .list_models(sd_proto::v1::ListModelsRequest {})
                .await
                .is_ok()
            {
                return Ok(c.max_decoding_message_size(256 << 20));
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "stack did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What one configuration measured: seconds per image and the mean of each
/// gateway stage (and, for the stack, the denoiser's UNet forward).
struct Latency {
    per_image: f64,
    stages: BTreeMap<String, f64>,
}

/// diffusers' seconds per image and per denoising step (between its step
/// callbacks: the UNet forward with guidance and the scheduler).
struct DiffusersLatency {
    per_image: f64,
    step: f64,
}

/// The gateway's step loop over in-process stages.
fn in_process_generator(args: &Args) -> anyhow::Result<(Generator, Arc<inprocess::InProcess>)> {
    tch::set_num_threads(args.threads);
    let dir = ModelDir::open(&args.model)?;
    let placement = Placement::new(args.device, args.precision)?;
    let (stages, facts) = inprocess::InProcess::load(&dir, placement)?;
    let stages = Arc::new(stages);
    let generator = Generator {
        stages: stages.clone(),
        facts: Arc::new(facts),
        cache: Arc::new(Mutex::new(PromptCache::new(64 << 20))),
        metrics: Metrics::new("bench"),
        wire: Dtype::Float32,
    };
    Ok((generator, stages))
}

async fn in_process_image(
    args: &Args,
    g: &Generator,
    seed: u64,
    prompt: &str,
) -> anyhow::Result<f64> {
    let plan = Plan::new(request(args, seed, prompt), &g.facts, &Limits::default())?;
    let t = Instant::now();
    g.run(plan, None, Deadline::none()).await?;
    Ok(t.elapsed().as_secs_f64())
}

/// diffusers in a Python process of its own, generating an image when asked
/// (`diffusers_bench.py`).
struct Diffusers {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Diffusers {
    fn start(args: &Args) -> anyhow::Result<Self> {
        let python = args
            .python
            .clone()
            .unwrap_or_else(|| PathBuf::from(".venv/bin/python"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("diffusers_bench.py");
        let mut child = Command::new(python)
            .arg(script)
            .args([
                args.model.to_string_lossy().as_ref(),
                &args.steps.to_string(),
                &args.size.to_string(),
                &args.threads.to_string(),
                &args.device.to_string(),
                &args.precision.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting the diffusers benchmark: {e}"))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut me = Diffusers {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        };
        me.expect(|l| (l == "ready").then_some(()))?;
        Ok(me)
    }

    fn expect<T>(&mut self, parse: impl Fn(&str) -> Option<T>) -> anyhow::Result<T> {
        for line in self.lines.by_ref() {
            if let Some(v) = parse(line?.trim()) {
                return Ok(v);
            }
        }
        anyhow::bail!("the diffusers benchmark stopped")
    }

    /// Seconds for the image and the mean seconds of one denoising step.
    fn image(&mut self, seed: u64, prompt: &str) -> anyhow::Result<(f64, f64)> {
        use std::io::Write;
        writeln!(self.stdin, "{seed}\t{prompt}")?;
        self.stdin.flush()?;
        self.expect(|l| {
            let mut f = l.strip_prefix("seconds_per_image ")?.split(" mean_step ");
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
    }
}

impl Drop for Diffusers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Seconds per image in process, through the stack and (when given) in
/// diffusers, measured in turn image by image so that a change in the
/// machine's speed during the run weighs on all alike.
async fn compare_latency(
    args: &Args,
    g: &Generator,
    stack: &Stack,
    mut diffusers: Option<&mut Diffusers>,
) -> anyhow::Result<(Latency, Latency, Option<DiffusersLatency>)> {
    let mut c = connect(stack).await?;
    in_process_image(args, g, 1, "warm up").await?;
    timed(&mut c, request(args, 1, "warm up")).await?;
    let (stack_before, local_before) = (stack.stage_times()?, stage_times(&g.metrics.encode()));
    let (mut local, mut remote, mut reference) = (Vec::new(), Vec::new(), Vec::new());
    let prompt = "a lighthouse at dusk";
    for i in 0..args.runs {
        let seed = 100 + i as u64;
        local.push(in_process_image(args, g, seed, prompt).await?);
        remote.push(timed(&mut c, request(args, seed, prompt)).await?);
        if let Some(d) = diffusers.as_deref_mut() {
            reference.push(d.image(seed, prompt)?);
        }
    }
    Ok((
        Latency {
            per_image: mean(&local),
            stages: stage_means(&local_before, &stage_times(&g.metrics.encode())),
        },
        Latency {
            per_image: mean(&remote),
            stages: stage_means(&stack_before, &stack.stage_times()?),
        },
        (!reference.is_empty()).then(|| {
            let (images, steps): (Vec<f64>, Vec<f64>) = reference.into_iter().unzip();
            DiffusersLatency {
                per_image: mean(&images),
                step: mean(&steps),
            }
        }),
    ))
}

/// images/min, p50, p95 at `concurrency` workers.
async fn throughput(
    args: &Args,
    stack: &Stack,
    concurrency: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let client = connect(stack).await?;
    let t = Instant::now();
    let mut handles = Vec::new();
    for w in 0..concurrency {
        let mut c = client.clone();
        let reqs: Vec<GenerateRequest> = (0..args.requests_per_worker)
            .map(|i| request(args, (w * 1000 + i) as u64, &format!("worker {w} prompt")))
            .collect();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for r in reqs {
                lat.push(timed(&mut c, r).await?);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for h in handles {
        lat.extend(h.await??);
    }
    let wall = t.elapsed().as_secs_f64();
    Ok((
        lat.len() as f64 / wall * 60.0,
        percentile(&lat, 0.5),
        percentile(&lat, 0.95),
    ))
}

/// (sum, count) of the denoiser's UNet rows per forward.
fn batch_rows(metrics: &str) -> anyhow::Result<(f64, f64)> {
    let text = fetch_metrics(metrics)?;
    let value = |name: &str| {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    Ok((
        value("sd_unet_batch_items_sum"),
        value("sd_unet_batch_items_count"),
    ))
}

/// Latency of a new prompt (text encoder called) and of the same prompt again.
async fn cache_effect(args: &Args, stack: &Stack) -> anyhow::Result<(f64, f64)> {
    let mut c = connect(stack).await?;
    let mut miss = Vec::new();
    let mut hit = Vec::new();
    for i in 0..args.runs {
        let prompt = format!("a never seen prompt number {i}");
        miss.push(timed(&mut c, request(args, 7, &prompt)).await?);
        hit.push(timed(&mut c, request(args, 7, &prompt)).await?);
    }
    Ok((mean(&miss), mean(&hit)))
}

/// Part 1's measurements: seconds per image and stage means for each
/// pipeline, and in-process UNet forward times (rows, ms).
struct LatencyReport {
    inproc: Latency,
    stack: Latency,
    diffusers: Option<DiffusersLatency>,
    forwards: Vec<(i64, f64)>,
}

/// Latency of the three pipelines, then UNet forward times in process; the
/// in-process models and diffusers are gone when this returns.
async fn measure_latency(
    args: &Args,
    generator: Generator,
    models: Arc<inprocess::InProcess>,
    stack: &Stack,
) -> anyhow::Result<LatencyReport> {
    let mut reference = if args.no_diffusers {
        None
    } else {
        Some(Diffusers::start(args)?)
    };
    let (inproc, st, diffusers) =
        compare_latency(args, &generator, stack, reference.as_mut()).await?;
    drop(reference);
    let latent_side = i64::from(if args.size == 0 {
        generator.facts.sample_size
    } else {
        args.size / generator.facts.scale_factor
    });
    let mut forwards = Vec::new();
    for &rows in &args.forward_rows {
        forwards.push((rows, models.unet_forward_ms(rows, latent_side)?));
    }
    Ok(LatencyReport {
        inproc,
        stack: st,
        diffusers,
        forwards,
    })
}

/// Mean milliseconds of stage `k`, NaN when it was not observed.
fn stage_ms(l: &Latency, k: &str) -> f64 {
    l.stages.get(k).copied().unwrap_or(f64::NAN) * 1e3
}

/// A table cell: two decimals, or a dash for what was not measured.
fn cell(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "—".to_string()
    }
}

fn print_pipelines(name: &str, args: &Args, r: &LatencyReport) {
    println!(
        "## {name}: {} steps, {} torch threads, {} timed images each\n",
        args.steps, args.threads, args.runs
    );
    let stack_s = r.stack.per_image;
    println!("| pipeline | s/image | stack ÷ this |");
    println!("|---|---:|---:|");
    println!("| gRPC stack | {stack_s:.3} | 1.000 |");
    println!(
        "| in-process Rust | {:.3} | {:.3} |",
        r.inproc.per_image,
        stack_s / r.inproc.per_image
    );
    if let Some(d) = &r.diffusers {
        println!(
            "| diffusers | {:.3} | {:.3} |",
            d.per_image,
            stack_s / d.per_image
        );
    }
}

fn print_stages(r: &LatencyReport) {
    let (d_head, d_rule) = if r.diffusers.is_some() {
        (" diffusers |", "---:|")
    } else {
        ("", "")
    };
    println!("\n| stage (mean ms) | in-process | stack | stack − in-process |{d_head}");
    println!("|---|---:|---:|---:|{d_rule}");
    for (k, label) in [
        ("text", "prompt embeddings"),
        ("denoise", "one denoising step"),
        ("decode", "VAE decode"),
        ("vae_decode", "… of which the VAE forward"),
        ("image_encode", "image encoding (PNG)"),
        ("generation", "whole generation"),
    ] {
        let (a, b) = (stage_ms(&r.inproc, k), stage_ms(&r.stack, k));
        let d = match (&r.diffusers, k) {
            (None, _) => String::new(),
            (Some(d), "denoise") => format!(" {} |", cell(d.step * 1e3)),
            (Some(d), "generation") => format!(" {} |", cell(d.per_image * 1e3)),
            (Some(_), _) => " — |".to_string(),
        };
        println!(
            "| {label} | {} | {} | {} |{d}",
            cell(a),
            cell(b),
            cell(b - a)
        );
    }
}

/// Step time against diffusers, and what the gateway adds to a UNet forward.
fn print_step_overhead(r: &LatencyReport) {
    if let Some(d) = &r.diffusers {
        println!(
            "\nStep time, stack ÷ diffusers: {:.3} (in-process ÷ diffusers: {:.3})",
            stage_ms(&r.stack, "denoise") / (d.step * 1e3),
            stage_ms(&r.inproc, "denoise") / (d.step * 1e3)
        );
    }
    let (gateway_step, unet_step) = (
        stage_ms(&r.stack, "denoise"),
        stage_ms(&r.stack, "unet_forward"),
    );
    println!(
        "\nPer-step overhead: gateway step {gateway_step:.2} ms − UNet forward {unet_step:.2} ms = {:.2} ms\n",
        gateway_step - unet_step
    );
}

fn print_forwards(forwards: &[(i64, f64)]) {
    println!("| UNet forward, in process | ms | ms per row |\n|---:|---:|---:|");
    for &(rows, ms) in forwards {
        println!("| {rows} rows | {ms:.2} | {:.2} |", ms / rows as f64);
    }
    println!();
}

async fn print_cache_effect(args: &Args, stack: &Stack) -> anyhow::Result<()> {
    let (miss, hit) = cache_effect(args, stack).await?;
    println!("| repeated prompt | s/image |\n|---|---:|\n| new prompt (text encoder called) | {miss:.3} |\n| same prompt again (cache hit) | {hit:.3} |\n");
    Ok(())
}

/// One throughput row per concurrency level, on a stack of its own.
async fn print_throughput_rows(args: &Args, workers: usize, batching: bool) -> anyhow::Result<()> {
    let stack = start_stack(args, batching, workers)?;
    for &c in &args.concurrency {
        let den = &stack.services[1].metrics;
        let rows_before = batch_rows(den)?;
        let (ipm, p50, p95) = throughput(args, &stack, c).await?;
        let (sum, n) = batch_rows(den)?;
        let per = if batching {
            format!(
                "{:.1}",
                (sum - rows_before.0) / (n - rows_before.1).max(1.0)
            )
        } else {
            "—".into()
        };
        let b = if batching { "on" } else { "off" };
        println!("| {workers} | {b} | {c} | {ipm:.1} | {p50:.3} | {p95:.3} | {per} |");
    }
    Ok(())
}

async fn print_throughput(args: &Args) -> anyhow::Result<()> {
    println!(
        "| UNet workers | batching | concurrency | images/min | p50 s | p95 s | UNet rows per forward |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for &workers in &args.unet_workers {
        for batching in [true, false] {
            print_throughput_rows(args, workers, batching).await?;
        }
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let name = args
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    eprintln!(
        "sd-bench: {name}, {} steps, {} threads",
        args.steps, args.threads
    );

    let (generator, models) = in_process_generator(&args)?;
    let stack = start_stack(&args, true, 1)?;
    let report = measure_latency(&args, generator, models, &stack).await?;
    print_pipelines(&name, &args, &report);
    print_stages(&report);
    print_step_overhead(&report);
    print_forwards(&report.forwards);
    print_cache_effect(&args, &stack).await?;
    drop(stack);
    print_throughput(&args).await
}
