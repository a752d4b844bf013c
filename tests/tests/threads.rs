//! The model services pick their workers and libtorch threads from the
//! machine (services/common/src/machine.rs), publish the choice as
//! `sd_model_threads`, and flags override it.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::procs::Proc;

/// The cores this test may use, as the services read them.
fn cores() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

fn spawn(bin: &str, extra: &[&str], env: &[(&str, String)]) -> Proc {
    let mut args = vec![
        "--model".to_string(),
        common::model("sd1-tiny").to_string_lossy().into_owned(),
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn(bin, &args, env)
}

async fn threads(p: &Proc, service: &str) -> (f64, f64, f64) {
    p.wait_serving(Duration::from_secs(60)).await;
    let m = |kind: &str| format!(r#"sd_model_threads{{service="{service}",kind="{kind}"}}"#);
    (
        p.metric(&m("workers")).await,
        p.metric(&m("intra_op")).await,
        p.metric(&m("inter_op")).await,
    )
}

/// No thread flags: the machine's rule. The tiny UNet is small, so the
/// denoiser runs one single-threaded worker per core; the text encoder one
/// worker with every core.
#[tokio::test]
async fn without_flags_the_rule_fits_the_machine() {
    // The test helpers pin one libtorch thread; 0 leaves it to the rule.
    let auto = [("SD_TORCH_THREADS", "0".to_string())];
    let denoiser = spawn("sd-denoiser", &[], &auto);
    let text = spawn("sd-text-encoder", &[], &auto);
    assert_eq!(
        threads(&denoiser, "denoiser").await,
        (cores(), 1.0, 1.0),
        "denoiser: workers, intra-op, inter-op"
    );
    assert_eq!(
        threads(&text, "text-encoder").await,
        (1.0, cores(), 1.0),
        "text encoder: workers, intra-op, inter-op"
    );
}

/// Flags win: workers alone split the cores; threads alone keep the rule's
/// workers; each part can be set.
#[tokio::test]
async fn flags_override_the_rule() {
    let auto = [("SD_TORCH_THREADS", "0".to_string())];
    let one_worker = spawn("sd-denoiser", &["--concurrency", "1"], &auto);
    assert_eq!(threads(&one_worker, "denoiser").await, (1.0, cores(), 1.0));
    let all_set = spawn(
        "sd-denoiser",
        &["--concurrency", "3", "--interop-threads", "2"],
        &[("SD_TORCH_THREADS", "2".to_string())],
    );
    assert_eq!(threads(&all_set, "denoiser").await, (3.0, 2.0, 2.0));
}
