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
//! `--cost-check SIDES` instead checks the UNet cost a denoiser publishes
//! (predicted vs measured forwards, see `cost.rs`); `--precision-check`
//! compares bf16 with fp32 for time and image (`precision.rs`);
//! `--parity-check` compares the stack's images with diffusers' on the
//! device and precision given (`parity.rs`, run by the GPU bundle);
//! `--fp8-check` a FLUX model's fp8 block weights against the model as
//! loaded (`fp8.rs`).
//!
//! `--device cuda --precision fp16` runs all three on a GPU; diffusers' step
//! time (between its step callbacks; CUDA events on a GPU) stands next to
//! the stack's for the per-step comparison.
//!
//! Prints Markdown tables (for docs/BENCHMARKS.md).

mod cost;
mod diffusers;
mod fp8;
mod inprocess;
mod lora;
mod parity;
mod precision;
mod report;
mod stack;

use diffusers::*;
use report::*;
use stack::*;

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
use sd_proto::v1::{Dtype, GenerateRequest, GenerateResponse};
use sd_runtime::deadline::Deadline;
use sd_runtime::metrics::Metrics;

/// Measure the sdserve stack against in-process Rust and diffusers.
#[derive(Parser, Debug, Clone)]
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
    /// Only check the denoiser's published UNet cost against forwards
    /// timed at these image sides (pixels), e.g. `256,384,512`.
    #[arg(long, value_delimiter = ',')]
    cost_check: Vec<u32>,
    /// Only compare bf16 with fp32 on this device: diffusers fp32,
    /// diffusers bf16 and the stack in bf16, for time and image (PSNR).
    #[arg(long)]
    precision_check: bool,
    /// Only compare the stack's images with diffusers' on `--device` in
    /// `--precision` (three seeds and prompts); fails beyond the tolerance.
    #[arg(long)]
    parity_check: bool,
    /// FLUX: the stack's transformer blocks in fp8 (the denoiser's
    /// `--fp8`: off, upcast or scaled), for every run.
    #[arg(long, default_value = "off")]
    fp8: sd_models::Fp8,
    /// Only compare a FLUX model's fp8 block weights with the model as
    /// loaded: the stack with `--fp8` off, upcast and scaled, for time,
    /// the denoiser's memory and the image (PSNR against off).
    #[arg(long)]
    fp8_check: bool,
    /// Only time run-time LoRA in process: random adapters of this rank on
    /// every attention and feed-forward projection, forwards with none, one,
    /// and three mixed with none (`--forward-rows`, `--size`, `--runs`).
    #[arg(long)]
    lora_bench: Option<i64>,
    /// The denoiser's `--calibration-seconds` for `--cost-check`.
    #[arg(long, default_value_t = 10.0)]
    calibration_seconds: f64,
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
) -> anyhow::Result<(f64, GenerateResponse)> {
    let plan = Plan::new(request(args, seed, prompt), &g.facts, &Limits::default())?;
    let t = Instant::now();
    let reply = g.run(plan, None, Deadline::none()).await?;
    Ok((t.elapsed().as_secs_f64(), reply))
}

/// The first image of each reply, decoded.
fn first_image(reply: &GenerateResponse, whose: &str) -> anyhow::Result<image::RgbImage> {
    let png = reply
        .images
        .first()
        .ok_or_else(|| anyhow::anyhow!("{whose} returned no image"))?;
    precision::rgb(&png.data)
}

/// Seconds per image in process, through the stack and (when given) in
/// diffusers, measured in turn image by image so that a change in the
/// machine's speed during the run weighs on all alike.
async fn compare_latency(
    args: &Args,
    g: &Generator,
    stack: &Stack,
    mut diffusers: Option<&mut Diffusers>,
) -> anyhow::Result<(
    Latency,
    Latency,
    Option<DiffusersLatency>,
    parity::Difference,
)> {
    let mut c = connect(stack).await?;
    in_process_image(args, g, 1, "warm up").await?;
    timed(&mut c, request(args, 1, "warm up")).await?;
    let (stack_before, local_before) = (stack.stage_times()?, stage_times(&g.metrics.encode()));
    let (mut local, mut remote, mut reference) = (Vec::new(), Vec::new(), Vec::new());
    let mut agreement = None;
    let prompt = "a lighthouse at dusk";
    for i in 0..args.runs {
        let seed = 100 + i as u64;
        let (t, here) = in_process_image(args, g, seed, prompt).await?;
        local.push(t);
        let (t, there) = timed_reply(&mut c, request(args, seed, prompt)).await?;
        remote.push(t);
        if agreement.is_none() {
            agreement = Some(parity::Difference::between(
                &first_image(&here, "the in-process pipeline")?,
                &first_image(&there, "the stack")?,
            )?);
        }
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
        agreement.ok_or_else(|| anyhow::anyhow!("--runs must be at least 1"))?,
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
    /// The first timed seed's image, in process against through the stack.
    agreement: parity::Difference,
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
    let (inproc, st, diffusers, agreement) =
        compare_latency(args, &generator, stack, reference.as_mut()).await?;
    drop(reference);
    let latent_side = i64::from(if args.size == 0 {
        generator.facts.sample_size
    } else {
        args.size / generator.facts.layout.scale_factor
    });
    let mut forwards = Vec::new();
    for &rows in &args.forward_rows {
        forwards.push((rows, models.unet_forward_ms(rows, latent_side)?));
    }
    Ok(LatencyReport {
        inproc,
        stack: st,
        agreement,
        diffusers,
        forwards,
    })
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
    if !args.cost_check.is_empty() {
        return cost::check(&args, &args.cost_check).await;
    }
    if args.precision_check {
        return precision::check(&args).await;
    }
    if args.parity_check {
        return parity::check(&args).await;
    }
    if args.fp8_check {
        return fp8::check(&args).await;
    }
    if let Some(rank) = args.lora_bench {
        return lora::bench(&args, rank);
    }

    let (generator, models) = in_process_generator(&args)?;
    let stack = start_stack(&args, true, 1)?;
    let report = measure_latency(&args, generator, models, &stack).await?;
    print_pipelines(&name, &args, &report);
    check_agreement(&args, &report.agreement)?;
    print_stages(&report);
    print_step_overhead(&report);
    print_forwards(&report.forwards);
    print_cache_effect(&args, &stack).await?;
    if args.device == DeviceSpec::Cpu {
        print_peak_rss(&stack);
    } else {
        print_vram(&stack);
    }
    drop(stack);
    print_throughput(&args).await
}
