//! AUTOMATIC1111's inpainting blend through every scheduler: where the mask
//! keeps, the output is changed so that the clean sample it implies is the
//! picture's; where it repaints, the output is untouched.

use sd_sampling::schedulers::{build, SchedulerOptions};
use sd_sampling::{blend_denoised, Output, SchedulerConfig, SchedulerKind};

const SD: &str = r#"{"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
  "set_alpha_to_one": false, "skip_prk_steps": true}"#;
const FLOW: &str = r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
  "shift": 3.0, "use_dynamic_shifting": false}"#;

/// The clean sample an output implies at index `i` (x = s·x0 + n·ε, the
/// network seeing c·x), from first principles for each output kind.
fn implied_x0(s: &dyn sd_sampling::Scheduler, out: f32, x: f32, i: usize) -> f32 {
    let a = s.add_noise(&[1.0], &[0.0], i)[0];
    let b = s.add_noise(&[0.0], &[1.0], i)[0];
    let c = s.scale_model_input(&[1.0], i)[0];
    match s.output() {
        Output::Epsilon => (x - b * out) / a,
        Output::V => (c * a) * (c * x) - (c * b) * out,
        Output::Velocity => x - b * out,
    }
}

#[test]
fn every_scheduler_blends_the_denoised_prediction() {
    let kinds = [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Lms,
        SchedulerKind::Heun,
        SchedulerKind::DpmPp2m,
        SchedulerKind::UniPc,
        SchedulerKind::Lcm,
    ];
    let mut cases: Vec<(SchedulerKind, &str, &str)> = kinds
        .iter()
        .flat_map(|&k| [(k, SD, "epsilon"), (k, SD, "v_prediction")])
        .collect();
    cases.push((SchedulerKind::FlowEuler, FLOW, ""));
    for (kind, json, prediction) in cases {
        let mut config = SchedulerConfig::from_json(json).unwrap();
        if !prediction.is_empty() {
            config = config.with_str("prediction_type", prediction);
        }
        let s = build(kind, &config, 10, SchedulerOptions::default()).unwrap();
        let (output, sample, init) = ([0.3f32, -0.7], [1.5f32, 0.2], [-0.4f32, 0.9]);
        for i in [0, 3, s.timesteps().len() - 1] {
            let blended = blend_denoised(&*s, &output, &sample, i, &init, &[1.0, 0.0]);
            let kept = implied_x0(&*s, blended[0], sample[0], i);
            assert!(
                (kept - init[0]).abs() < 1e-4,
                "{kind:?} {prediction} at {i}: implies {kept}, want {}",
                init[0]
            );
            assert_eq!(blended[1], output[1], "{kind:?}: a repainted value changed");
            // Half kept: half-way between the two clean samples.
            let half = blend_denoised(&*s, &output, &sample, i, &init, &[0.5, 0.0]);
            let x0 = implied_x0(&*s, output[0], sample[0], i);
            let mid = implied_x0(&*s, half[0], sample[0], i);
            assert!((mid - (x0 + init[0]) / 2.0).abs() < 1e-4, "{kind:?} at {i}");
        }
    }
}
