//! `--parity-check`: the stack against diffusers on this device, in this
//! precision, image by image: the same seed, prompt, steps and size, each
//! pipeline's own kernels. The GPU bundle runs it on CUDA, where no test
//! can (CI has no GPU).
//!
//! Tolerances, per 8-bit channel value:
//! - fp32: every value within 2/255 (the CPU tests hold 1/255; on a GPU
//!   the two pipelines may pick different kernels for the same operation);
//! - fp16 and bf16: PSNR at least 35 dB and the mean difference at most
//!   2/255: half precision rounds each operation, and two implementations
//!   that order their operations differently round differently, so single
//!   values can differ by more (bf16 on this CPU, tiny models: max 3–7,
//!   mean 0.5–1.2, PSNR 44–51 dB).

use super::*;

/// Seeds and prompts: a long prompt, a short one, and the empty prompt.
const CASES: [(u64, &str); 3] = [
    (42, "a photograph of an astronaut riding a horse"),
    (7, "a red cube on a blue table"),
    (1234, ""),
];

/// How far the stack's image may be from diffusers'.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Tolerance {
    /// Every channel value within this many 1/255 steps.
    MaxDiff(u8),
    /// PSNR at least this (dB), mean absolute difference at most this (/255).
    Psnr { min_db: f64, max_mean: f64 },
}

impl Tolerance {
    pub(crate) fn for_precision(p: Precision) -> Self {
        match p {
            Precision::F32 => Tolerance::MaxDiff(2),
            Precision::F16 | Precision::Bf16 => Tolerance::Psnr {
                min_db: 35.0,
                max_mean: 2.0,
            },
        }
    }

    fn met(self, d: &Difference) -> bool {
        match self {
            Tolerance::MaxDiff(m) => d.max <= m,
            Tolerance::Psnr { min_db, max_mean } => d.psnr >= min_db && d.mean <= max_mean,
        }
    }

    fn describe(self) -> String {
        match self {
            Tolerance::MaxDiff(m) => format!("every value within {m}/255"),
            Tolerance::Psnr { min_db, max_mean } => {
                format!("PSNR ≥ {min_db} dB and mean |Δ| ≤ {max_mean}/255")
            }
        }
    }
}

/// How two 8-bit images differ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Difference {
    pub(crate) max: u8,
    pub(crate) mean: f64,
    pub(crate) psnr: f64,
}

impl Difference {
    pub(crate) fn between(a: &image::RgbImage, b: &image::RgbImage) -> anyhow::Result<Self> {
        let psnr = precision::psnr(a, b)?;
        let (mut max, mut sum) = (0u8, 0u64);
        for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
            let d = x.abs_diff(*y);
            max = max.max(d);
            sum += u64::from(d);
        }
        Ok(Difference {
            max,
            mean: sum as f64 / a.as_raw().len().max(1) as f64,
            psnr,
        })
    }
}

/// Generate the cases with diffusers, then through the stack; print the
/// table; an error when an image is beyond the tolerance.
pub(crate) async fn check(args: &Args) -> anyhow::Result<()> {
    let dir = precision::scratch_dir("parity")?;
    let mut reference = Vec::new();
    let mut diffusers_seconds = Vec::new();
    {
        let mut d = Diffusers::start(args)?;
        for (i, (seed, prompt)) in CASES.iter().enumerate() {
            let png = dir.join(format!("diffusers-{i}.png"));
            diffusers_seconds.push(d.image_to(*seed, prompt, Some(&png))?.0);
            reference.push(precision::rgb(&std::fs::read(&png)?)?);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let stack = start_stack(args, true, 1)?;
    let mut client = connect(&stack).await?;
    let mut diffs = Vec::new();
    let mut stack_seconds = Vec::new();
    for ((seed, prompt), want) in CASES.iter().zip(&reference) {
        let t = Instant::now();
        let reply = client
            .generate(request(args, *seed, prompt))
            .await?
            .into_inner();
        stack_seconds.push(t.elapsed().as_secs_f64());
        let png = reply
            .images
            .first()
            .ok_or_else(|| anyhow::anyhow!("the stack returned no image"))?;
        diffs.push(Difference::between(want, &precision::rgb(&png.data)?)?);
    }
    let tolerance = Tolerance::for_precision(args.precision);
    print_table(args, tolerance, &diffs);
    // The first image of each also pays for warm-up (cuDNN's choices, the
    // caches): the rest are the steady state.
    let steady = |v: &[f64]| mean(&v[1.min(v.len())..]);
    println!(
        "\nSeconds per image after the first: diffusers {:.3}, stack {:.3}.",
        steady(&diffusers_seconds),
        steady(&stack_seconds)
    );
    let missed = diffs.iter().filter(|d| !tolerance.met(d)).count();
    anyhow::ensure!(
        missed == 0,
        "{missed} of {} images beyond the tolerance ({})",
        diffs.len(),
        tolerance.describe()
    );
    Ok(())
}

fn print_table(args: &Args, tolerance: Tolerance, diffs: &[Difference]) {
    let name = args
        .model
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    println!(
        "\n### Parity with diffusers: {name} on {} in {}, {} steps\n",
        args.device, args.precision, args.steps
    );
    println!("| seed | prompt | max \\|Δ\\| (/255) | mean \\|Δ\\| (/255) | PSNR (dB) | within tolerance |");
    println!("|---:|---|---:|---:|---:|---|");
    for ((seed, prompt), d) in CASES.iter().zip(diffs) {
        println!(
            "| {seed} | {prompt:?} | {} | {:.3} | {:.1} | {} |",
            d.max,
            d.mean,
            d.psnr,
            if tolerance.met(d) { "yes" } else { "NO" }
        );
    }
    println!("\nTolerance: {}.", tolerance.describe());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_and_tolerances() {
        let a = image::RgbImage::from_pixel(2, 2, image::Rgb([100, 100, 100]));
        let mut b = a.clone();
        b.put_pixel(0, 0, image::Rgb([103, 100, 100]));
        let d = Difference::between(&a, &b).unwrap();
        assert_eq!(d.max, 3);
        assert!((d.mean - 3.0 / 12.0).abs() < 1e-12);
        assert!(!Tolerance::MaxDiff(2).met(&d));
        assert!(Tolerance::MaxDiff(3).met(&d));
        let loose = Tolerance::for_precision(Precision::F16);
        assert!(loose.met(&d), "{d:?}");
        // A uniform shift of 3/255 keeps PSNR high but the mean too far.
        let shifted = image::RgbImage::from_pixel(2, 2, image::Rgb([103, 103, 103]));
        let d = Difference::between(&a, &shifted).unwrap();
        assert!(d.psnr > 35.0 && !loose.met(&d), "{d:?}");
    }
}
