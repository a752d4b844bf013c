//! Flow-matching Euler (diffusers' `FlowMatchEulerDiscreteScheduler`), as
//! the FLUX pipelines drive it: sigmas from `linspace(1, 1/N, N)` (float32),
//! shifted by the image's sequence length (`mu`, exponential time shift) or
//! by a fixed `shift`, timesteps σ·1000, and the Euler step
//! `x + (σ_next − σ) · v` on the network's velocity.

use super::common::SchedulerConfig;
use super::{Scheduler, SchedulerError};

/// The FLUX pipelines' `calculate_shift`: `mu` grows linearly with the
/// packed image's token count between the config's base and max.
pub fn flux_mu(c: &SchedulerConfig, image_seq_len: usize) -> f64 {
    let base_len = c.f64_or("base_image_seq_len", 256.0);
    let max_len = c.f64_or("max_image_seq_len", 4096.0);
    let base_shift = c.f64_or("base_shift", 0.5);
    let max_shift = c.f64_or("max_shift", 1.15);
    let m = (max_shift - base_shift) / (max_len - base_len);
    let b = base_shift - m * base_len;
    image_seq_len as f64 * m + b
}

/// FLUX.2 Klein's `compute_empirical_mu`: a shift fitted to the token count
/// and the step count (a line between its 10- and 200-step fits; beyond
/// 4300 tokens the 200-step fit alone).
pub fn empirical_mu(image_seq_len: usize, steps: usize) -> f64 {
    let (a1, b1) = (8.73809524e-05, 1.89833333);
    let (a2, b2) = (0.00016927, 0.45666666);
    let len = image_seq_len as f64;
    if image_seq_len > 4300 {
        return a2 * len + b2;
    }
    let m_200 = a2 * len + b2;
    let m_10 = a1 * len + b1;
    let a = (m_200 - m_10) / 190.0;
    let b = m_200 - 200.0 * a;
    a * steps as f64 + b
}

/// `linspace(1, 1/N, N)` in float32 as numpy computes it (float64, then
/// cast) or as torch's CPU kernel does (float32, `start + i·step` fused
/// from the start for the first half and back from the end after).
fn linspace(n: usize, torch: bool) -> Vec<f32> {
    let last = 1.0 / n as f64;
    if n == 1 {
        return vec![1.0];
    }
    if torch {
        let (start, end) = (1.0f32, last as f32);
        let step = (end - start) / (n - 1) as f32;
        return (0..n)
            .map(|i| {
                if i < n / 2 {
                    (start as f64 + step as f64 * i as f64) as f32
                } else {
                    (end as f64 - step as f64 * (n - 1 - i) as f64) as f32
                }
            })
            .collect();
    }
    let step = (last - 1.0) / (n - 1) as f64;
    // numpy's linspace: start + i·step, the last exactly `stop`.
    (0..n)
        .map(|i| {
            if i == n - 1 {
                last as f32
            } else {
                (1.0 + i as f64 * step) as f32
            }
        })
        .collect()
}

pub struct FlowEuler {
    timesteps: Vec<f64>,
    /// One per timestep and a final 0.
    sigmas: Vec<f32>,
}

impl FlowEuler {
    /// `image_seq_len`: the packed latents' token count, which sets `mu`
    /// when the config asks for dynamic shifting.
    pub fn new(
        c: &SchedulerConfig,
        steps: usize,
        image_seq_len: Option<usize>,
        schedule: super::FlowSchedule,
    ) -> Result<Self, SchedulerError> {
        for key in [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "invert_sigmas",
            "stochastic_sampling",
            "use_flow_sigmas",
        ] {
            if c.bool_or(key, false) {
                return Err(SchedulerError::Config(format!(
                    "flow-matching Euler with `{key}` is not supported"
                )));
            }
        }
        if c.f64_or("shift_terminal", 0.0) != 0.0 {
            return Err(SchedulerError::Config(
                "flow-matching Euler with `shift_terminal` is not supported".into(),
            ));
        }
        let train = c.num_train_timesteps() as f32;
        // The pipeline's linspace(1.0, 1 / N, N); set_timesteps: float32.
        let base = linspace(steps, schedule == super::FlowSchedule::ZImage);
        let sigmas: Vec<f32> = if c.bool_or("use_dynamic_shifting", false) {
            let len = image_seq_len.ok_or_else(|| {
                SchedulerError::Config("dynamic shifting needs the image's sequence length".into())
            })?;
            let mu = match schedule {
                super::FlowSchedule::Flux2 => empirical_mu(len, steps),
                super::FlowSchedule::Flux | super::FlowSchedule::ZImage => flux_mu(c, len),
            };
            let linear = match c.str_or("time_shift_type", "exponential") {
                "exponential" => false,
                "linear" => true,
                other => {
                    return Err(SchedulerError::Config(format!(
                        "time_shift_type `{other}` (exponential or linear)"
                    )))
                }
            };
            // numpy: a Python float with a float32 array computes in float32.
            let e = if linear { mu as f32 } else { mu.exp() as f32 };
            base.iter().map(|&t| e / (e + (1.0 / t - 1.0))).collect()
        } else {
            let shift = c.f64_or("shift", 1.0) as f32;
            base.iter()
                .map(|&s| shift * s / (1.0 + (shift - 1.0) * s))
                .collect()
        };
        let timesteps = sigmas.iter().map(|&s| (s * train) as f64).collect();
        let mut sigmas = sigmas;
        sigmas.push(0.0);
        Ok(FlowEuler { timesteps, sigmas })
    }

    /// The sigmas, a final 0 included.
    #[cfg(test)]
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for FlowEuler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn step(
        &mut self,
        model_output: &[f32],
        i: usize,
        sample: &[f32],
        _noise: &mut dyn FnMut(usize) -> Vec<f32>,
    ) -> Vec<f32> {
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        sample
            .iter()
            .zip(model_output)
            .map(|(&x, &v)| x + dt * v)
            .collect()
    }

    /// `scale_noise`: σ·noise + (1 − σ)·original.
    fn output(&self) -> super::Output {
        super::Output::Velocity
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        let s = self.sigmas[i];
        original
            .iter()
            .zip(noise)
            .map(|(&x, &n)| s * n + (1.0 - s) * x)
            .collect()
    }

    /// The FLUX img2img pipelines' `get_timesteps`: `N · strength` kept as
    /// a float (the SD pipelines cut it to an integer first).
    fn start_index(&self, steps: u32, strength: f32) -> usize {
        // The strength as the client wrote it (0.6, not 0.60000002).
        let s: f64 = format!("{strength}").parse().unwrap_or(strength as f64);
        let n = steps as f64;
        let init = (n * s).min(n);
        (n - init).max(0.0) as usize
    }
}

#[cfg(test)]
mod tests {
    // Expected sigmas are written as Python prints the float32 values.
    #![allow(clippy::unwrap_used, clippy::excessive_precision)]
    use super::*;

    use crate::schedulers::FlowSchedule;

    const FLUX: FlowSchedule = FlowSchedule::Flux;

    fn config(json: &str) -> SchedulerConfig {
        SchedulerConfig::from_json(json).unwrap()
    }

    #[test]
    fn a_fixed_shift_of_one_is_the_plain_linspace() {
        let c = config(r#"{"_class_name":"FlowMatchEulerDiscreteScheduler","shift":1.0}"#);
        let s = FlowEuler::new(&c, 4, None, FLUX).unwrap();
        assert_eq!(s.sigmas(), &[1.0, 0.75, 0.5, 0.25, 0.0]);
        assert_eq!(s.timesteps(), &[1000.0, 750.0, 500.0, 250.0]);
        let one = FlowEuler::new(&c, 1, None, FLUX).unwrap();
        assert_eq!(one.sigmas(), &[1.0, 0.0]);
    }

    #[test]
    fn dynamic_shifting_needs_the_sequence_length_and_follows_mu() {
        let c = config(r#"{"use_dynamic_shifting":true,"shift":3.0}"#);
        assert!(FlowEuler::new(&c, 4, None, FLUX).is_err());
        // 1024² FLUX: 4096 tokens, mu = max_shift.
        assert!((flux_mu(&c, 4096) - 1.15).abs() < 1e-12);
        assert!((flux_mu(&c, 256) - 0.5).abs() < 1e-12);
        let s = FlowEuler::new(&c, 4, Some(4096), FLUX).unwrap();
        let e = 1.15f64.exp();
        let want = e / (e + (1.0 / 0.5 - 1.0));
        assert!((s.sigmas()[2] as f64 - want).abs() < 1e-6);
        assert_eq!(s.sigmas()[0], 1.0);
    }

    #[test]
    fn img2img_keeps_the_float_product_as_diffusers_does() {
        let c = config(r#"{"shift":1.0}"#);
        let s = FlowEuler::new(&c, 5, None, FLUX).unwrap();
        // 5 · 0.6 = 3 → start at 2 (the f32 0.6 would give 1).
        assert_eq!(s.start_index(5, 0.6), 2);
        // 10 · 0.55 = 5.5 → int(4.5) = 4 (SD's pipelines: 5).
        assert_eq!(s.start_index(10, 0.55), 4);
        assert_eq!(s.start_index(4, 1.0), 0);
    }

    #[test]
    fn unsupported_options_are_refused_by_name() {
        let c = config(r#"{"use_karras_sigmas":true}"#);
        let e = FlowEuler::new(&c, 4, None, FLUX).err().unwrap().to_string();
        assert!(e.contains("use_karras_sigmas"), "{e}");
    }

    /// Values diffusers 0.42.1 gives: `compute_empirical_mu` and
    /// `set_timesteps(sigmas=np.linspace(1, 1/N, N), mu=…)` for Klein.
    #[test]
    fn klein_shifts_by_its_empirical_mu() {
        assert_eq!(empirical_mu(1024, 4), 2.0306897079499455);
        assert_eq!(empirical_mu(4096, 50), 2.0233511571292637);
        assert_eq!(empirical_mu(5000, 28), 1.30301666);
        let c =
            config(r#"{"use_dynamic_shifting":true,"shift":3.0,"time_shift_type":"exponential"}"#);
        let s = FlowEuler::new(&c, 4, Some(1024), FlowSchedule::Flux2).unwrap();
        assert_eq!(
            &s.sigmas()[..4],
            &[
                1.0,
                0.9580853581428528,
                0.8839818835258484,
                0.7174965739250183
            ]
        );
        let s = FlowEuler::new(&c, 28, Some(5000), FlowSchedule::Flux2).unwrap();
        assert_eq!(s.sigmas()[1], 0.9900368452072144);
        assert_eq!(s.timesteps()[1], 990.036865234375);
    }

    /// Z-Image's sigmas are torch's float32 linspace, then the fixed shift.
    #[test]
    fn z_image_spaces_sigmas_as_torch_does() {
        let c = config(r#"{"use_dynamic_shifting":false,"shift":3.0}"#);
        let s = FlowEuler::new(&c, 9, Some(64), FlowSchedule::ZImage).unwrap();
        let want = [
            1.0,
            0.9600000381469727,
            0.9130435585975647,
            0.8571428060531616,
            0.7894737124443054,
            0.7058823704719543,
            0.5999999642372131,
            0.46153849363327026,
            0.27272728085517883,
            0.0,
        ];
        assert_eq!(s.sigmas(), &want.map(|v| v as f32));
        let s = FlowEuler::new(&c, 13, None, FlowSchedule::ZImage).unwrap();
        assert_eq!(s.sigmas()[8], 0.6521738767623901);
        assert_eq!(s.sigmas()[12], 0.20000001788139343);
        // torch and numpy differ in the last bit here (and the shift keeps it).
        let numpy = FlowEuler::new(&c, 13, None, FLUX).unwrap();
        assert_ne!(numpy.sigmas(), s.sigmas());
    }
}
