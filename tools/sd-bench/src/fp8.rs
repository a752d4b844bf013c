//! `--fp8-check`: a FLUX model's transformer blocks in fp8 e4m3 against
//! the same model as loaded (`--precision`, bf16 on a GPU), through the
//! stack: the denoiser started with `--fp8 off`, `upcast` and `scaled` in
//! turn, one image each after a warm-up (same seed, prompt, steps, size):
//! seconds per image, the denoiser's memory (VRAM on a GPU, peak RSS on a
//! CPU) and each fp8 image's PSNR against the `off` one — issue 30's
//! memory lever, its speed and its fidelity in one table.

use super::*;
use sd_models::Fp8;

const SEED: u64 = 42;
const PROMPT: &str = "a photograph of an astronaut riding a horse";

/// One configuration's figures.
struct Row {
    mode: Fp8,
    seconds: f64,
    memory_mib: Option<u64>,
    psnr: f64,
}

/// Run the three and print the table.
pub(crate) async fn check(args: &Args) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut reference: Option<image::RgbImage> = None;
    for mode in [Fp8::Off, Fp8::Upcast, Fp8::Scaled] {
        let mut a = args.clone();
        a.fp8 = mode;
        let stack = start_stack(&a, true, 1)?;
        let mut client = connect(&stack).await?;
        client.generate(request(args, SEED + 1, "warm up")).await?;
        let (seconds, reply) = timed_reply(&mut client, request(args, SEED, PROMPT)).await?;
        let png = reply
            .images
            .first()
            .ok_or_else(|| anyhow::anyhow!("the stack returned no image"))?;
        let image = precision::rgb(&png.data)?;
        let psnr = match &reference {
            None => f64::INFINITY,
            Some(r) => precision::psnr(r, &image)?,
        };
        reference.get_or_insert(image);
        rows.push(Row {
            mode,
            seconds,
            memory_mib: denoiser_memory(&stack, args.device),
            psnr,
        });
    }
    print_table(args, &rows);
    Ok(())
}

/// The denoiser's memory: its VRAM (`nvidia-smi`) on a GPU, its peak
/// resident set on a CPU.
fn denoiser_memory(stack: &Stack, device: DeviceSpec) -> Option<u64> {
    let den = stack
        .services
        .iter()
        .find(|s| s.process.name().contains("denoiser"))?;
    let pid = den.process.id();
    if device == DeviceSpec::Cpu {
        peak_rss_mib(pid)
    } else {
        vram_by_process().ok()?.get(&pid).copied()
    }
}

fn print_table(args: &Args, rows: &[Row]) {
    println!(
        "\n### fp8 transformer blocks: {} at {}², {} steps, {} on {}, one image after a warm-up\n",
        args.model.display(),
        args.size,
        args.steps,
        args.precision,
        args.device
    );
    let memory = if args.device == DeviceSpec::Cpu {
        // The weights file's mapped pages count in it too.
        "denoiser peak RSS (MiB, mapped weights included)"
    } else {
        "denoiser VRAM (MiB)"
    };
    println!("| --fp8 | s per image | × off | {memory} | PSNR vs off (dB) |");
    println!("|---|---:|---:|---:|---:|");
    let base = rows.first().map_or(1.0, |r| r.seconds);
    for r in rows {
        let mem = r
            .memory_mib
            .map_or_else(|| "not read".to_string(), |m| m.to_string());
        let psnr = if r.psnr.is_finite() {
            format!("{:.1}", r.psnr)
        } else {
            "—".to_string()
        };
        println!(
            "| {} | {:.2} | {:.2} | {mem} | {psnr} |",
            r.mode,
            r.seconds,
            r.seconds / base
        );
    }
    println!();
}
