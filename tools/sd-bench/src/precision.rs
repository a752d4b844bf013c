//! `--precision-check`: bf16 on this CPU against diffusers in fp32, for
//! speed and for the image. One image each (after a warm-up), same seed,
//! prompt, steps and size: diffusers fp32, diffusers bf16, the stack in
//! bf16. Targets (issue 12): the stack in bf16 in at most 0.6× diffusers
//! fp32's time, its image as close to diffusers' fp32 image as diffusers'
//! own bf16 image is (PSNR within 3 dB).

use super::*;

const SEED: u64 = 42;
const PROMPT: &str = "a photograph of an astronaut riding a horse";

/// Run the three and print the table.
pub(crate) async fn check(args: &Args) -> anyhow::Result<()> {
    let dir = scratch_dir("precision")?;
    let (fp32_s, fp32_png) = diffusers_image(args, Precision::F32, &dir)?;
    let (bf16_s, bf16_png) = diffusers_image(args, Precision::Bf16, &dir)?;
    let mut stack_args = args.clone();
    stack_args.precision = Precision::Bf16;
    let stack = start_stack(&stack_args, true, 1)?;
    let mut client = connect(&stack).await?;
    client.generate(request(args, SEED + 1, "warm up")).await?;
    let t = Instant::now();
    let reply = client
        .generate(request(args, SEED, PROMPT))
        .await?
        .into_inner();
    let stack_s = t.elapsed().as_secs_f64();
    let stack_png = reply
        .images
        .first()
        .ok_or_else(|| anyhow::anyhow!("the stack returned no image"))?
        .data
        .to_vec();
    let reference = rgb(&std::fs::read(&fp32_png)?)?;
    let diffusers_psnr = psnr(&reference, &rgb(&std::fs::read(&bf16_png)?)?)?;
    let stack_psnr = psnr(&reference, &rgb(&stack_png)?)?;
    print_table(
        args,
        (fp32_s, bf16_s, stack_s),
        (diffusers_psnr, stack_psnr),
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn print_table(args: &Args, (fp32, bf16, stack): (f64, f64, f64), (d_psnr, s_psnr): (f64, f64)) {
    println!(
        "\n### bf16 on CPU: {} steps at {}², {} threads, one image after a warm-up\n",
        args.steps, args.size, args.threads
    );
    println!("| pipeline | s per image | × diffusers fp32 | PSNR vs diffusers fp32 (dB) |");
    println!("|---|---:|---:|---:|");
    println!("| diffusers fp32 | {fp32:.2} | 1.00 | — |");
    println!(
        "| diffusers bf16 | {bf16:.2} | {:.2} | {d_psnr:.1} |",
        bf16 / fp32
    );
    println!(
        "| stack bf16 | {stack:.2} | {:.2} | {s_psnr:.1} |",
        stack / fp32
    );
    let speed_met = stack / fp32 <= 0.6;
    let image_met = s_psnr >= d_psnr - 3.0;
    println!(
        "\nTargets: stack bf16 ≤ 0.6× diffusers fp32: {:.2} ({}); PSNR within 3 dB of diffusers bf16's: {:+.1} dB ({}).",
        stack / fp32,
        if speed_met { "met" } else { "missed" },
        s_psnr - d_psnr,
        if image_met { "met" } else { "missed" }
    );
}

/// One timed image from diffusers in `precision`, saved as PNG.
fn diffusers_image(
    args: &Args,
    precision: Precision,
    dir: &Path,
) -> anyhow::Result<(f64, PathBuf)> {
    let png = dir.join(format!("diffusers-{precision}.png"));
    let mut d = Diffusers::start_in(args, precision)?;
    let (seconds, _) = d.image_to(SEED, PROMPT, Some(&png))?;
    Ok((seconds, png))
}

/// A fresh directory for this run's images.
pub(crate) fn scratch_dir(what: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("sd-bench-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

pub(crate) fn rgb(png: &[u8]) -> anyhow::Result<image::RgbImage> {
    Ok(image::load_from_memory(png)?.to_rgb8())
}

/// Peak signal-to-noise ratio of `b` against `a` (8-bit), in dB.
pub(crate) fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> anyhow::Result<f64> {
    sd_gateway::images::psnr(a, b).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psnr_of_known_differences() {
        let a = image::RgbImage::from_pixel(4, 4, image::Rgb([100, 100, 100]));
        let mut b = a.clone();
        assert!(psnr(&a, &b).unwrap().is_infinite());
        b.put_pixel(0, 0, image::Rgb([110, 100, 100])); // one value off by 10
        let want = 10.0 * (255.0f64.powi(2) / (100.0 / 48.0)).log10();
        assert!((psnr(&a, &b).unwrap() - want).abs() < 1e-9);
        let small = image::RgbImage::new(2, 2);
        assert!(psnr(&a, &small).is_err());
    }
}
