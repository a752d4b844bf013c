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
    let (lc, side) = (c.in_channels, c.sample_size);
    tch::manual_seed(0);
    let latents = Tensor::randn([1, lc, side, side], (Kind::Float, tch::Device::Cpu));
    let t = Tensor::from_slice(&[999.0f32]);
    let eps = timed("unet forward", || Ok(unet.forward(&latents, &t, &context)?))?;
    let pixels = timed("vae decode", || Ok(vae.decode(&latents)?))?;
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
