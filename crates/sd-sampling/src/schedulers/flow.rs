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
        // pipeline: np.linspace(1.0, 1 / N, N); set_timesteps: astype(float32).
        let n = steps;
        let last = 1.0 / n as f64;
        let base: Vec<f32> = (0..n)
            .map(|i| {
                if n == 1 {
                    1.0
                } else {
                    let step = (last - 1.0) / (n - 1) as f64;
                    // numpy's linspace: start + i·step, the last exactly `stop`.
                    if i == n - 1 {
                        last as f32
                    } else {
                        (1.0 + i as f64 * step) as f32
                    }
                }
            })
            .collect();
        let sigmas: Vec<f32> = if c.bool_or("use_dynamic_shifting", false) {
            let len = image_seq_len.ok_or_else(|| {
                SchedulerError::Config("dynamic shifting needs the image's sequence length".into())
            })?;
            let mu = flux_mu(c, len);
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
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(json: &str) -> SchedulerConfig {
        SchedulerConfig::from_json(json).unwrap()
    }

    #[test]
    fn a_fixed_shift_of_one_is_the_plain_linspace() {
        let c = config(r#"{"_class_name":"FlowMatchEulerDiscreteScheduler","shift":1.0}"#);
        let s = FlowEuler::new(&c, 4, None).unwrap();
        assert_eq!(s.sigmas(), &[1.0, 0.75, 0.5, 0.25, 0.0]);
        assert_eq!(s.timesteps(), &[1000.0, 750.0, 500.0, 250.0]);
        let one = FlowEuler::new(&c, 1, None).unwrap();
        assert_eq!(one.sigmas(), &[1.0, 0.0]);
    }

    #[test]
    fn dynamic_shifting_needs_the_sequence_length_and_follows_mu() {
        let c = config(r#"{"use_dynamic_shifting":true,"shift":3.0}"#);
        assert!(FlowEuler::new(&c, 4, None).is_err());
        // 1024² FLUX: 4096 tokens, mu = max_shift.
        assert!((flux_mu(&c, 4096) - 1.15).abs() < 1e-12);
        assert!((flux_mu(&c, 256) - 0.5).abs() < 1e-12);
        let s = FlowEuler::new(&c, 4, Some(4096)).unwrap();
        let e = 1.15f64.exp();
        let want = e / (e + (1.0 / 0.5 - 1.0));
        assert!((s.sigmas()[2] as f64 - want).abs() < 1e-6);
        assert_eq!(s.sigmas()[0], 1.0);
    }

    #[test]
    fn img2img_keeps_the_float_product_as_diffusers_does() {
        let c = config(r#"{"shift":1.0}"#);
        let s = FlowEuler::new(&c, 5, None).unwrap();
        // 5 · 0.6 = 3 → start at 2 (the f32 0.6 would give 1).
        assert_eq!(s.start_index(5, 0.6), 2);
        // 10 · 0.55 = 5.5 → int(4.5) = 4 (SD's pipelines: 5).
        assert_eq!(s.start_index(10, 0.55), 4);
        assert_eq!(s.start_index(4, 1.0), 0);
    }

    #[test]
    fn unsupported_options_are_refused_by_name() {
        let c = config(r#"{"use_karras_sigmas":true}"#);
        let e = FlowEuler::new(&c, 4, None).err().unwrap().to_string();
        assert!(e.contains("use_karras_sigmas"), "{e}");
    }
}
