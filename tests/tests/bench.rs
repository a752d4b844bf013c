//! sd-bench, the harness every speed number comes from, runs end to end on
//! a tiny SDXL-family model and an SD one: its in-process pipeline (the
//! baseline the stack is measured against) gives the stack's image for the
//! same seed, and the report carries its tables.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

fn bench(model: &str) -> String {
    let out = Command::new(common::stack::bin_dir().join("sd-bench"))
        .arg("--model")
        .arg(common::model(model))
        .args([
            "--no-diffusers",
            "--steps",
            "3",
            "--runs",
            "1",
            "--threads",
            "1",
        ])
        .args(["--concurrency", "1,2", "--requests-per-worker", "1"])
        .args(["--forward-rows", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "sd-bench on {model} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The worst difference the report states between the in-process and the
/// stack's image, in 1/255 steps.
fn agreement(report: &str) -> u8 {
    let line = report
        .lines()
        .find(|l| l.starts_with("Same seed, in process and through the stack"))
        .unwrap_or_else(|| panic!("no agreement line in\n{report}"));
    let after = line.split("max |Δ| ").nth(1).unwrap();
    after.split('/').next().unwrap().parse().unwrap()
}

#[test]
fn sd_bench_measures_sd_and_sdxl_models_in_process_and_through_the_stack() {
    for model in ["sdxl-tiny", "sd1-tiny"] {
        let report = bench(model);
        // The same step loop on the same model code: the same image.
        assert_eq!(agreement(&report), 0, "{model}:\n{report}");
        for row in [
            "| gRPC stack |",
            "| in-process Rust |",
            "| one denoising step |",
            "| 2 rows |",
            // Peak memory of each service on a CPU.
            "| sd-text-encoder |",
            "| sd-denoiser |",
            "| sd-autoencoder |",
            "| sd-bench (the in-process pipeline) |",
            // Throughput, batching on and off.
            "| 1 | on | 2 |",
            "| 1 | off | 2 |",
        ] {
            assert!(report.contains(row), "{model}: no `{row}` in\n{report}");
        }
    }
}
