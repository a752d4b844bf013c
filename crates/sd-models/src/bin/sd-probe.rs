//! sd-probe: load a model directory and run each network once, printing
//! shapes and timings. A quick check that a model (and a device) works.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use sd_models::{DeviceSpec, ModelDir, Placement, Precision};
use tch::{Kind, Tensor};

/// Load a Stable Diffusion model in the diffusers layout and run each of its
/// networks once.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Model directory (diffusers layout: model_index.json, unet/, vae/, ...).
    #[arg(long, env = "SD_MODEL")]
    model: PathBuf,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "SD_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// Precision: fp32 or bf16 (CPU), fp16 or bf16 (CUDA).
    #[arg(long, env = "SD_PRECISION", default_value = "fp32")]
    precision: Precision,
    /// Prompt to encode.
    #[arg(long, default_value = "a photograph of an astronaut riding a horse")]
    prompt: String,
    /// Use the hidden state this many layers before the last.
    #[arg(long, default_value_t = 0)]
    clip_skip: usize,
    /// Image side in pixels for the UNet and VAE (0: the model's default).
    #[arg(long, default_value_t = 0)]
    size: i64,
    /// UNet rows per forward (a guided step is 2).
    #[arg(long, default_value_t = 1)]
    rows: i64,
    /// Time the UNet forward this many times (after the first) and print
    /// the fastest and the median: a quick harness for threads, allocator
    /// and libtorch settings.
    #[arg(long, default_value_t = 0)]
    repeat: usize,
    /// libtorch intra-op threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    threads: i32,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("sd-probe: {e:#}");
        std::process::exit(1);
    }
}

fn timed<T>(label: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let start = Instant::now();
    let out = f()?;
    println!(
        "{label:<28} {:>9.1} ms",
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(out)
}

fn run(args: Args) -> anyhow::Result<()> {
    if args.threads > 0 {
        tch::set_num_threads(args.threads);
    }
    let placement = Placement::new(args.device, args.precision)?;
    let dir = ModelDir::open(&args.model)?;
    println!(
        "model {} on {} {}",
        args.model.display(),
        args.device,
        args.precision
    );
    let tok = timed("load tokenizer", || Ok(dir.load_tokenizer()?))?;
    let clip = timed(
        "load text encoder",
        || Ok(dir.load_text_encoder(placement)?),
    )?;
    let unet = timed("load unet", || Ok(dir.load_unet(placement)?))?;
    let vae = timed("load vae", || Ok(dir.load_vae(placement)?))?;

    let ids = tok.encode_batch(&[&args.prompt])?;
    let context = timed("text encoder forward", || {
        Ok(clip.forward(&ids, args.clip_skip)?)
    })?;
    let c = unet.config();
    let side = if args.size > 0 {
        args.size / vae.scale_factor()
    } else {
        c.sample_size
    };
    let rows = args.rows.max(1);
    tch::manual_seed(0);
    let latents = Tensor::randn(
        [rows, c.in_channels, side, side],
        (Kind::Float, tch::Device::Cpu),
    );
    let t = Tensor::full([rows], 999.0, (Kind::Float, tch::Device::Cpu));
    let context = context.repeat([rows, 1, 1]);
    // An SDXL-family UNet's added conditioning: zeros (only the cost and
    // the shapes matter here).
    let context = if context.size()[2] == c.context_dim() {
        context
    } else {
        Tensor::zeros(
            [rows, context.size()[1], c.context_dim()],
            (Kind::Float, tch::Device::Cpu),
        )
    };
    let eps = timed("unet forward", || {
        Ok(unet.forward_probe(&latents, &t, &context)?)
    })?;
    if args.repeat > 0 {
        let mut ms = Vec::with_capacity(args.repeat);
        for _ in 0..args.repeat {
            let start = Instant::now();
            let _ = unet.forward_probe(&latents, &t, &context)?;
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        println!(
            "unet forward ×{} ({rows} rows, latent {side}²): fastest {:.1} ms, median {:.1} ms",
            ms.len(),
            ms[0],
            ms[ms.len() / 2]
        );
    }
    let pixels = timed("vae decode", || Ok(vae.decode(&latents.narrow(0, 0, 1))?))?;
    if args.repeat > 0 {
        let mut ms = Vec::with_capacity(args.repeat);
        for _ in 0..args.repeat {
            let start = Instant::now();
            let _ = vae.decode(&latents.narrow(0, 0, 1))?;
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        println!(
            "vae decode ×{}: fastest {:.1} ms, median {:.1} ms",
            ms.len(),
            ms[0],
            ms[ms.len() / 2]
        );
    }
    let dist = timed("vae encode", || Ok(vae.encode(&pixels.clamp(-1.0, 1.0))?))?;
    println!(
        "tokens        {:?} (first 8: {:?})",
        ids.size(),
        tok.encode(&args.prompt)?[..8].to_vec()
    );
    println!("embeddings    {:?}", context.size());
    println!(
        "unet output   {:?} (std {:.4})",
        eps.size(),
        eps.to_kind(Kind::Float).std(true).double_value(&[])
    );
    println!(
        "image         {:?} (×{} the latents)",
        pixels.size(),
        vae.scale_factor()
    );
    println!("latent mean   {:?}", dist.mean.size());
    Ok(())
}
