//! The Markdown tables sd-bench prints.

use super::*;

/// Mean milliseconds of stage `k`, NaN when it was not observed.
pub(crate) fn stage_ms(l: &Latency, k: &str) -> f64 {
    l.stages.get(k).copied().unwrap_or(f64::NAN) * 1e3
}

/// A table cell: two decimals, or a dash for what was not measured.
pub(crate) fn cell(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "—".to_string()
    }
}

pub(crate) fn print_pipelines(name: &str, args: &Args, r: &LatencyReport) {
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

/// The in-process pipeline and the stack run the same step loop on the same
/// model code: the same seed must give the same image (in fp32 within the
/// parity tolerance), or the comparison compares different work.
pub(crate) fn check_agreement(args: &Args, d: &parity::Difference) -> anyhow::Result<()> {
    println!(
        "\nSame seed, in process and through the stack: max |Δ| {}/255, mean {:.3}/255, PSNR {:.1} dB.",
        d.max, d.mean, d.psnr
    );
    if args.precision == Precision::F32 {
        anyhow::ensure!(
            d.max <= parity::MAX_DIFF,
            "the in-process pipeline's image differs from the stack's by {}/255 (at most {} allowed)",
            d.max,
            parity::MAX_DIFF
        );
    }
    Ok(())
}

pub(crate) fn print_stages(r: &LatencyReport) {
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
pub(crate) fn print_step_overhead(r: &LatencyReport) {
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

pub(crate) fn print_forwards(forwards: &[(i64, f64)]) {
    println!("| UNet forward, in process | ms | ms per row |\n|---:|---:|---:|");
    for &(rows, ms) in forwards {
        println!("| {rows} rows | {ms:.2} | {:.2} |", ms / rows as f64);
    }
    println!();
}

pub(crate) async fn print_cache_effect(args: &Args, stack: &Stack) -> anyhow::Result<()> {
    let (miss, hit) = cache_effect(args, stack).await?;
    println!("| repeated prompt | s/image |\n|---|---:|\n| new prompt (text encoder called) | {miss:.3} |\n| same prompt again (cache hit) | {hit:.3} |\n");
    Ok(())
}

/// One throughput row per concurrency level, on a stack of its own.
pub(crate) async fn print_throughput_rows(
    args: &Args,
    workers: usize,
    batching: bool,
) -> anyhow::Result<()> {
    let stack = start_stack(args, batching, workers)?;
    // A fresh stack's first requests pay for warm-up (lazy CUDA and cuDNN
    // setup, each new batch shape's first forward): one request per worker
    // at the highest concurrency first, untimed, so the rows measure a
    // warm stack.
    if let Some(&top) = args.concurrency.iter().max() {
        let warm = Args {
            requests_per_worker: 1,
            ..args.clone()
        };
        throughput(&warm, &stack, top).await?;
    }
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

pub(crate) async fn print_throughput(args: &Args) -> anyhow::Result<()> {
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

/// GPU memory each model service holds after the runs above (libtorch's
/// caching allocator keeps what it reserved, so this is its peak), as
/// `nvidia-smi` reports it per process.
pub(crate) fn print_vram(stack: &Stack) {
    let used = match vram_by_process() {
        Ok(used) => used,
        Err(why) => {
            println!("VRAM per service: {why}\n");
            return;
        }
    };
    println!("| service | VRAM (MiB, after the runs above) |\n|---|---:|");
    for s in &stack.services {
        let cell = used
            .get(&s.process.id())
            .map_or_else(|| "not listed".to_string(), |m| m.to_string());
        println!("| {} | {cell} |", s.process.name());
    }
    println!();
}

/// GPU memory (MiB) by process id, as `nvidia-smi` reports it; why not,
/// when it cannot be read.
pub(crate) fn vram_by_process() -> Result<BTreeMap<u32, u64>, String> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(vram_by_pid(&String::from_utf8_lossy(&o.stdout))),
        Ok(o) => Err(format!("nvidia-smi failed ({})", o.status)),
        Err(e) => Err(format!("nvidia-smi not run ({e})")),
    }
}

/// Peak resident memory (MiB) of process `pid`: the kernel's `VmHWM`.
pub(crate) fn peak_rss_mib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    vm_hwm_kib(&status).map(|k| (k + 512) / 1024)
}

/// Peak resident memory of each model service (the kernel's `VmHWM`) and
/// of this process, which holds the in-process pipeline: what each needs
/// on a CPU machine.
pub(crate) fn print_peak_rss(stack: &Stack) {
    let peak =
        |pid: u32| peak_rss_mib(pid).map_or_else(|| "not read".to_string(), |m| m.to_string());
    println!("| process | peak RSS (MiB, after the runs above) |\n|---|---:|");
    for s in &stack.services {
        println!("| {} | {} |", s.process.name(), peak(s.process.id()));
    }
    println!(
        "| sd-bench (the in-process pipeline) | {} |",
        peak(std::process::id())
    );
    println!();
}

/// `VmHWM` of a `/proc/PID/status` text, in KiB.
fn vm_hwm_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `pid, MiB` lines of `nvidia-smi --query-compute-apps` as a map.
pub(crate) fn vram_by_pid(csv: &str) -> BTreeMap<u32, u64> {
    csv.lines()
        .filter_map(|l| {
            let (pid, mib) = l.split_once(',')?;
            Some((pid.trim().parse().ok()?, mib.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_lines_by_pid() {
        let m = vram_by_pid("1234, 2050\n77, 512\nbad line\n9, [N/A]\n");
        assert_eq!(m.len(), 2);
        assert_eq!(m[&1234], 2050);
        assert_eq!(m[&77], 512);
    }

    #[test]
    fn peak_rss_from_proc_status() {
        let status =
            "Name:\tsd-denoiser\nVmPeak:\t 9000 kB\nVmHWM:\t  524288 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(vm_hwm_kib(status), Some(524_288));
        assert_eq!(vm_hwm_kib("Name:\tx\n"), None);
        // This process's own status has it.
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(vm_hwm_kib(&own).unwrap() > 0);
    }
}
