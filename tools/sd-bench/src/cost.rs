//! `--cost-check SIDES`: how well the cost a denoiser publishes in Info
//! (measured at its start) predicts the UNet forwards it then runs — at the
//! sizes it measured and well beyond them, where the gateway's admission
//! relies on the extrapolation.

use super::*;
use sd_proto::v1::denoiser_client::DenoiserClient;
use sd_proto::v1::denoiser_info::FamilyParams;
use sd_proto::v1::{DenoiserInfoRequest, Embedding, PredictRequest, Tensor as WireTensor};

/// Start a denoiser, read its cost, time Predict at `sides` (pixels) with
/// `rows` 1 and 2, and print predicted against measured.
pub(crate) async fn check(args: &Args, sides: &[u32]) -> anyhow::Result<()> {
    let env = vec![
        ("SD_TORCH_THREADS", args.threads.to_string()),
        ("SD_DEVICE", args.device.to_string()),
        ("SD_PRECISION", args.precision.to_string()),
        ("SD_NO_BATCHING", "true".into()),
        (
            "SD_CALIBRATION_SECONDS",
            args.calibration_seconds.to_string(),
        ),
    ];
    let margs = vec![
        "--model".to_string(),
        args.model.to_string_lossy().into_owned(),
    ];
    let started = Instant::now();
    let den = spawn("sd-denoiser", &margs, &env)?;
    let mut d = DenoiserClient::connect(den.process.url())
        .await?
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    let info = wait_info(&mut d).await?;
    let start_s = started.elapsed().as_secs_f64();
    let cost = info
        .cost
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the denoiser published no cost"))?;
    println!("\n### UNet cost: predicted (from the denoiser's start-up measurement) vs measured\n");
    println!(
        "Start-up {start_s:.1} s with `--calibration-seconds {}`; measured points: {}\n",
        args.calibration_seconds, cost
    );
    println!("| image | latents | rows | predicted s | measured s | measured / predicted |");
    println!("|---|---|---|---|---|---|");
    let sf = i64::from(info.vae_scale_factor.max(1));
    for &side in sides {
        let l = i64::from(side) / sf;
        for rows in [1, 2] {
            let predicted = cost
                .seconds((l * l) as u64, rows as u64)
                .unwrap_or(f64::NAN);
            let measured = time_predict(&mut d, &info, rows, l, args.runs).await?;
            println!(
                "| {side}² | {l}² | {rows} | {predicted:.3} | {measured:.3} | {:.2} |",
                measured / predicted
            );
        }
    }
    if let Some(after) = wait_info(&mut d).await?.cost {
        println!(
            "\nAfter these forwards the denoiser publishes (kept current by use): {}",
            after
        );
    }
    Ok(())
}

async fn wait_info(
    d: &mut DenoiserClient<tonic::transport::Channel>,
) -> anyhow::Result<sd_proto::v1::DenoiserInfo> {
    let until = Instant::now() + Duration::from_secs(600);
    loop {
        match d.info(DenoiserInfoRequest {}).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(_) if Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The fastest of `runs` unguided Predict calls of `rows` latents `side`².
async fn time_predict(
    d: &mut DenoiserClient<tonic::transport::Channel>,
    info: &sd_proto::v1::DenoiserInfo,
    rows: i64,
    side: i64,
    runs: usize,
) -> anyhow::Result<f64> {
    let zeros = |shape: Vec<i64>| {
        let n = shape.iter().product::<i64>() as usize;
        sd_proto::wire::HostTensor::new(shape, vec![0.0; n]).map(|t| t.to_wire(Dtype::Float32))
    };
    // FLUX: even sides (2×2 patches), its T5 length, its pooled width.
    let (side, tokens, pooled_dim, embedded_guidance) = match &info.family_params {
        Some(FamilyParams::Flux(f)) => (
            (side + 1) / 2 * 2,
            i64::from(f.max_sequence_length),
            Some(i64::from(f.pooled_dim)),
            f.guidance_distilled.then_some(3.5),
        ),
        Some(FamilyParams::Sdxl(x)) => (side, 77, Some(i64::from(x.pooled_dim)), None),
        Some(FamilyParams::Klein(k)) => (side, i64::from(k.max_sequence_length), None, None),
        // A short prompt's own tokens; 2×2 patches.
        Some(FamilyParams::Zimage(_)) => ((side + 1) / 2 * 2, 64, None, None),
        Some(FamilyParams::Sd(_)) | None => (side, 77, None, None),
    };
    let latents: WireTensor = zeros(vec![rows, i64::from(info.latent_channels), side, side])?;
    let cond = zeros(vec![1, tokens, i64::from(info.context_dim)])?;
    let sdxl = match &info.family_params {
        Some(FamilyParams::Sdxl(x)) => Some(x),
        Some(
            FamilyParams::Sd(_)
            | FamilyParams::Flux(_)
            | FamilyParams::Klein(_)
            | FamilyParams::Zimage(_),
        )
        | None => None,
    };
    let mut best = f64::INFINITY;
    for _ in 0..runs.max(1) {
        let req = PredictRequest {
            latents: Some(latents.clone()),
            timesteps: vec![500.0],
            cond: Some(Embedding {
                id: String::new(),
                tensor: Some(cond.clone()),
                // SDXL and FLUX: their pooled embedding, zeros.
                pooled: pooled_dim.map(|d| zeros(vec![1, d])).transpose()?,
            }),
            time_ids: sdxl
                .map(|x| zeros(vec![1, i64::from(x.time_ids_len)]))
                .transpose()?,
            guidance_scale: 1.0,
            embedded_guidance,
            ..Default::default()
        };
        let t = Instant::now();
        d.predict(req).await?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}
