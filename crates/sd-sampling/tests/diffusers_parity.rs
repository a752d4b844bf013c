//! The RNG against torch.randn and every scheduler against diffusers, from
//! numbers `tests/fixtures/make_sampling_reference.py` recorded (a copy is
//! committed in `tests/data/`).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use sd_sampling::schedulers::{build, SchedulerOptions};
use sd_sampling::{SchedulerConfig, SchedulerKind, TorchGenerator};
use serde::Deserialize;

#[derive(Deserialize)]
struct Randn {
    seed: u64,
    n: usize,
    values: Vec<f32>,
}

#[derive(Deserialize)]
struct Draw {
    n: usize,
    values: Vec<f32>,
}

#[derive(Deserialize)]
struct Run {
    scheduler: String,
    config: serde_json::Value,
    steps: usize,
    karras: bool,
    eta: f32,
    seed: u64,
    start_index: usize,
    timesteps: Vec<f64>,
    init_noise_sigma: f64,
    x0: Vec<f32>,
    #[serde(default)]
    noise: Vec<f32>,
    trajectory: Vec<Vec<f32>>,
    /// Flow matching: the packed image's token count (mu).
    #[serde(default)]
    image_seq_len: Option<usize>,
    /// Flow matching img2img: the strength the start index comes from.
    #[serde(default)]
    strength: Option<f32>,
}

#[derive(Deserialize)]
struct Reference {
    randn: Vec<Randn>,
    sequence: Vec<Draw>,
    runs: Vec<Run>,
}

/// The committed copy (`tests/data/`), so these tests need no venv and no
/// fixtures; `tests/tests/sampling_reference.rs` checks it is current.
fn reference() -> Reference {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/sampling_reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("valid reference JSON")
}

/// torch fills big tensors with vectorised log/sin/cos (avx_mathfun) while
/// we use libm: values agree to a few float32 ulps, never more.
const RNG_TOL: f32 = 2e-6;

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

#[test]
fn randn_matches_torch_for_many_seeds_and_shapes() {
    let r = reference();
    assert!(r.randn.len() >= 50);
    for case in &r.randn {
        let got = TorchGenerator::new(case.seed).randn(case.n);
        let d = max_rel_diff(&got, &case.values);
        assert!(
            d <= RNG_TOL,
            "seed {} n {}: max diff {d:e}",
            case.seed,
            case.n
        );
    }
}

#[test]
fn consecutive_draws_follow_torch_including_the_cached_normal() {
    let r = reference();
    let mut g = TorchGenerator::new(7);
    for draw in &r.sequence {
        let got = g.randn(draw.n);
        let d = max_rel_diff(&got, &draw.values);
        assert!(d <= RNG_TOL, "draw of {}: max diff {d:e}", draw.n);
    }
}

/// Schedule tables: diffusers computes in float32 in places where we use
/// f64 (and vice versa), so allow a few float32 ulps relative.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 2e-5 * b.abs().max(1.0)
}

#[test]
fn every_scheduler_matches_diffusers() {
    let r = reference();
    let mut failures = Vec::new();
    for run in &r.runs {
        let label = format!(
            "{} steps={} karras={} eta={} start={} config={}",
            run.scheduler,
            run.steps,
            run.karras,
            run.eta,
            run.start_index,
            run.config["_class_name"]
        );
        let kind: SchedulerKind = run.scheduler.parse().unwrap();
        let config = SchedulerConfig::from_json(&run.config.to_string()).unwrap();
        let mut s = build(
            kind,
            &config,
            run.steps,
            SchedulerOptions {
                karras: run.karras,
                eta: run.eta,
                image_seq_len: run.image_seq_len,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{label}: {e}"));
        let ts = s.timesteps().to_vec();
        if ts.len() != run.timesteps.len()
            || ts.iter().zip(&run.timesteps).any(|(a, b)| !close(*a, *b))
        {
            failures.push(format!(
                "{label}: timesteps {ts:?}\n   want {:?}",
                run.timesteps
            ));
            continue;
        }
        if !close(s.init_noise_sigma() as f64, run.init_noise_sigma) {
            failures.push(format!(
                "{label}: init_noise_sigma {} want {}",
                s.init_noise_sigma(),
                run.init_noise_sigma
            ));
        }
        // Replay the trajectory with the same synthetic model and generator.
        let mut g = TorchGenerator::new(run.seed);
        let x0 = g.randn(run.x0.len());
        assert!(max_rel_diff(&x0, &run.x0) <= RNG_TOL);
        let start = run.start_index;
        if let Some(strength) = run.strength {
            let got = s.start_index(run.steps as u32, strength);
            if got != start {
                failures.push(format!("{label}: img2img start {got}, want {start}"));
                continue;
            }
        }
        let mut x: Vec<f32> = if start > 0 || run.strength.is_some() {
            let noise = g.randn(x0.len());
            assert!(max_rel_diff(&noise, &run.noise) <= RNG_TOL);
            s.add_noise(&x0, &noise, start)
        } else {
            x0.iter().map(|v| v * s.init_noise_sigma()).collect()
        };
        let mut worst = 0.0f32;
        for (k, want) in run.trajectory.iter().enumerate() {
            let i = start + k;
            let t = ts[i];
            let inp = s.scale_model_input(&x, i);
            let out: Vec<f32> = inp
                .iter()
                .map(|v| 0.7 * v + 0.2 * ((t / 97.0).sin() as f32) + 0.05 * (v * 3.0).tanh())
                .collect();
            x = s.step(&out, i, &x, &mut |n| g.randn(n));
            worst = worst.max(max_rel_diff(&x, want));
        }
        // Differences start at float32 rounding and grow over the steps; a
        // wrong coefficient or order shows up as 1e-2 or more.
        if worst > 2e-4 {
            failures.push(format!("{label}: trajectory max rel diff {worst:e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} runs differ:\n{}",
        failures.len(),
        r.runs.len(),
        failures.join("\n")
    );
}
