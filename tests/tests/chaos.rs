//! Short runs of the chaos and soak harness (`sd-chaos`, the tables in
//! docs/RELIABILITY.md come from its long runs): a denoiser replica killed
//! under load loses no request; 150 generations leave every process with
//! no more threads or open files than after the first 50; async jobs
//! submitted while the gateway, Redis and a denoiser replica are SIGKILLed
//! all complete.

#![allow(clippy::unwrap_used)]

mod common;

use common::stack::bin_dir;

/// Run sd-chaos with `args` and `--check` on the tiny model; its report.
fn sd_chaos(args: &[&str]) -> String {
    let bin = bin_dir().join("sd-chaos");
    assert!(
        bin.is_file(),
        "{} missing: run `cargo build --workspace --bins` first (make test does)",
        bin.display()
    );
    let out = std::process::Command::new(bin)
        .arg("--model")
        .arg(common::model("sd1-tiny"))
        .args(args)
        .arg("--check")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "sd-chaos missed its targets:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    report
}

#[test]
fn a_denoiser_replica_killed_under_load_loses_no_request() {
    let report = sd_chaos(&[
        "--faults",
        "kill-denoiser",
        "--phase-secs",
        "4",
        "--max-seconds",
        "60",
    ]);
    assert!(report.contains("| during SIGKILL denoiser#0 |"), "{report}");
    assert!(
        report.contains("around the denoiser kill: 0; sdctl up throughout: true"),
        "{report}"
    );
}

#[test]
fn accepted_jobs_survive_sigkills_of_the_gateway_redis_and_a_denoiser() {
    let report = sd_chaos(&[
        "--jobs",
        "--phase-secs",
        "4",
        "--clients",
        "2",
        "--drain-secs",
        "60",
        "--max-seconds",
        "60",
    ]);
    for phase in ["SIGKILL gateway", "SIGKILL redis", "SIGKILL denoiser#0"] {
        assert!(report.contains(&format!("| after {phase} |")), "{report}");
    }
    assert!(
        report.contains("Jobs lost: 0, failed: 0, cancelled: 0; sdctl up throughout: true."),
        "{report}"
    );
}

#[test]
fn a_short_soak_grows_no_threads_and_no_open_files() {
    // RSS is allowed more here than in the long soak's 5%: 100 calls after
    // a baseline at 50 still include allocator warm-up; fds and threads
    // must not grow at all.
    let report = sd_chaos(&[
        "--soak",
        "150",
        "--soak-baseline",
        "50",
        "--unique-prompts",
        "0",
        "--max-rss-growth",
        "25",
        "--max-seconds",
        "120",
    ]);
    assert!(report.contains("| call 150 |"), "{report}");
}
