//! `--lora-bench RANK`: what run-time LoRA costs a UNet forward, in
//! process. Random adapters of rank RANK on every attention projection
//! (and feed-forward) of the model's UNet — the modules kohya trains — are
//! written to a temporary folder and loaded the way the denoiser loads
//! them; then, at each batch size, forwards of guided calls are timed with
//! no adapter (what merged weights cost: a merged model is the base model's
//! cost), every call with the same adapter, and the calls spread over three
//! adapters and none (one forward for all of them: the mixed batch that
//! per-pipeline `set_adapters` or a global merge cannot run together).
//! Prints a Markdown table, and each adapter's memory.

use std::time::Instant;

use sd_models::config::VaeConfig;
use sd_models::lora::{Adapter, Applied, KohyaNames, ModuleKind};
use sd_models::{Component, Denoiser, ModelDir, Placement};
use sd_service::compute::{forward_calls, Call, Half};
use tch::{Kind, Tensor};

use crate::Args;

/// Random kohya-format adapters for every attention and feed-forward
/// projection of `dir`'s UNet; each file's path.
fn write_adapters(
    unet: &Denoiser,
    rank: i64,
    out: &std::path::Path,
    n: usize,
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut paths = Vec::new();
    for i in 0..n {
        tch::manual_seed(100 + i as i64);
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (path, shape) in &unet.modules().modules {
            let Some(rest) = path.strip_prefix("unet.") else {
                continue;
            };
            if !(rest.contains(".attn") || rest.contains(".ff."))
                || shape.kind != ModuleKind::Linear
            {
                continue;
            }
            let stem = format!("lora_unet_{}", rest.replace('.', "_"));
            let f = (Kind::Float, tch::Device::Cpu);
            tensors.push((
                format!("{stem}.lora_down.weight"),
                Tensor::randn([rank, shape.input], f) * 0.05,
            ));
            tensors.push((
                format!("{stem}.lora_up.weight"),
                Tensor::randn([shape.output, rank], f) * 0.05,
            ));
            tensors.push((format!("{stem}.alpha"), Tensor::from(rank as f32)));
        }
        let p = out.join(format!("bench-{i}.safetensors"));
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        Tensor::write_safetensors(&named, &p)?;
        paths.push(p);
    }
    Ok(paths)
}

fn calls(
    n: usize,
    sets: &[std::sync::Arc<[Applied]>],
    side: i64,
    context: (i64, i64),
) -> Vec<Call> {
    let f = (Kind::Float, tch::Device::Cpu);
    (0..n)
        .map(|i| Call {
            latents: Tensor::randn([1, 4, side, side], f),
            timesteps: Tensor::from_slice(&[500.0f32]),
            cond: Half::text(Tensor::randn([1, context.0, context.1], f)),
            uncond: Some(Half::text(Tensor::randn([1, context.0, context.1], f))),
            guidance: 7.5,
            embedded_guidance: None,
            image: None,
            loras: sets[i % sets.len()].clone(),
            references: None,
            controls: Vec::new(),
            ip: Vec::new(),
        })
        .collect()
}

fn time(net: &Denoiser, calls: &[Call], runs: usize) -> anyhow::Result<f64> {
    let refs: Vec<&Call> = calls.iter().collect();
    forward_calls(net, &refs)?; // warm
    let start = Instant::now();
    for _ in 0..runs {
        forward_calls(net, &refs)?;
    }
    Ok(start.elapsed().as_secs_f64() * 1000.0 / runs as f64)
}

pub fn bench(args: &Args, rank: i64) -> anyhow::Result<()> {
    tch::set_num_threads(args.threads);
    let dir = ModelDir::open(&args.model)?;
    // On a GPU the adapters live beside the weights, in their precision;
    // each timed forward ends in the copy of its outputs to the host, so
    // the clock stops after the device's work.
    let placement = Placement::new(args.device, args.precision)?;
    let unet = Denoiser::load(&dir, placement)?;
    let layout = unet.layout(&VaeConfig::read(&dir.config_path(Component::Vae))?);
    let side = if args.size > 0 {
        args.size as i64 / layout.vae_scale_factor
    } else {
        layout.native_side
    };
    let tmp = std::env::temp_dir().join(format!("sd-bench-lora-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let files = write_adapters(&unet, rank, &tmp, 3);
    let files = files.inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&tmp);
    })?;
    let kohya = KohyaNames::new(unet.modules(), dir.unet_layers_per_block()?);
    let mut adapters = Vec::new();
    for (i, p) in files.iter().enumerate() {
        let start = Instant::now();
        let a = Adapter::load(p, &format!("bench-{i}"), unet.modules(), &kohya, placement)?;
        println!(
            "adapter {i}: rank {rank}, {} modules, {:.1} MiB loaded, read and fitted in {:.0} ms",
            a.len(),
            a.bytes() as f64 / (1 << 20) as f64,
            start.elapsed().as_secs_f64() * 1000.0
        );
        adapters.push(std::sync::Arc::new(a));
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let set = |i: usize, scale: f64| -> std::sync::Arc<[Applied]> {
        vec![Applied {
            adapter: adapters[i].clone(),
            scale,
        }]
        .into()
    };
    let none: std::sync::Arc<[Applied]> = Vec::new().into();
    let context = (77, unet.context_dim());
    println!();
    println!(
        "| guided calls (UNet rows) | base = merged weights (ms) | one adapter, run time (ms) | × | three adapters + none, mixed (ms) | × |"
    );
    println!("|---|---|---|---|---|---|");
    for &rows in &args.forward_rows {
        let n = (rows as usize / 2).max(1);
        let base = time(
            &unet,
            &calls(n, std::slice::from_ref(&none), side, context),
            args.runs,
        )?;
        let one = time(&unet, &calls(n, &[set(0, 0.8)], side, context), args.runs)?;
        let mixed_sets = [set(0, 0.8), set(1, 1.0), none.clone(), set(2, 0.4)];
        let mixed = time(&unet, &calls(n, &mixed_sets, side, context), args.runs)?;
        println!(
            "| {n} ({}) | {base:.1} | {one:.1} | {:.2} | {mixed:.1} | {:.2} |",
            2 * n,
            one / base,
            mixed / base
        );
    }
    Ok(())
}
