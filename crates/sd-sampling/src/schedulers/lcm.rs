//! LCM (diffusers' `LCMScheduler`): the latent consistency model sampler.
//! Its timesteps are a subset of the `original_inference_steps` schedule
//! the model was distilled on; each step maps the latents straight to a
//! denoised estimate (the consistency function, with the boundary scalings
//! c_skip and c_out) and, except after the last, noises that estimate again
//! to the next timestep with fresh noise.

use serde_json::Value;

use super::common::{add_alpha_noise, Common, Prediction, SchedulerConfig};
use super::{Scheduler, SchedulerError};

/// `sigma_data` of the consistency parameterisation.
const SIGMA_DATA: f32 = 0.5;

pub struct Lcm {
    common: Common,
    timesteps: Vec<f64>,
    final_alpha: f32,
    clip_sample: Option<f32>,
    timestep_scaling: f32,
}

impl Lcm {
    pub fn new(c: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        // LCMScheduler's own defaults where the config is silent (a model
        // shipping another scheduler's config).
        let c = c.with_defaults(&[
            ("beta_start", Value::from(0.00085)),
            ("beta_end", Value::from(0.012)),
            ("beta_schedule", Value::from("scaled_linear")),
        ]);
        let common = Common::new(&c, "leading")?;
        let timesteps = lcm_timesteps(
            common.train_steps,
            c.f64_or("original_inference_steps", 50.0).max(1.0) as usize,
            steps,
        )?;
        let final_alpha = common.final_alpha(&c, true);
        let clip_sample = c
            .bool_or("clip_sample", false)
            .then(|| c.f64_or("clip_sample_range", 1.0) as f32);
        Ok(Lcm {
            common,
            timesteps,
            final_alpha,
            clip_sample,
            timestep_scaling: c.f64_or("timestep_scaling", 10.0) as f32,
        })
    }

    /// (c_skip, c_out) at integer timestep `t`, in float32 as torch has them.
    fn boundary_scalings(&self, t: i64) -> (f32, f32) {
        let scaled = t as f32 * self.timestep_scaling;
        let d = scaled * scaled + SIGMA_DATA * SIGMA_DATA;
        (SIGMA_DATA * SIGMA_DATA / d, scaled / d.sqrt())
    }
}

/// `steps` timesteps taken at evenly spaced indices of the distillation
/// schedule (`original` timesteps, every `train / original`-th), descending.
fn lcm_timesteps(train: usize, original: usize, steps: usize) -> Result<Vec<f64>, SchedulerError> {
    if original > train {
        return Err(SchedulerError::Config(format!(
            "original_inference_steps {original} is more than num_train_timesteps {train}"
        )));
    }
    if steps == 0 || steps > original {
        return Err(SchedulerError::Steps(format!(
            "{steps} given; lcm takes 1..={original} (the model's original_inference_steps)"
        )));
    }
    let k = train / original;
    let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
    // numpy.linspace(0, len, steps, endpoint=False), floored.
    let stride = origin.len() as f64 / steps as f64;
    Ok((0..steps)
        .map(|i| origin[(i as f64 * stride).floor() as usize] as f64)
        .collect())
}

impl Scheduler for Lcm {
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
        noise: &mut dyn FnMut(usize) -> Vec<f32>,
    ) -> Vec<f32> {
        let t = self.timesteps[i] as i64;
        let last = i + 1 >= self.timesteps.len();
        let prev_t = if last {
            t
        } else {
            self.timesteps[i + 1] as i64
        };
        let a_t = self.common.alpha_at(t, self.final_alpha);
        let a_prev = self.common.alpha_at(prev_t, self.final_alpha);
        let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let mut x0: Vec<f32> = match self.common.prediction {
            Prediction::Epsilon => sample
                .iter()
                .zip(model_output)
                .map(|(s, m)| (s - sb * m) / sa)
                .collect(),
            Prediction::V => sample
                .iter()
                .zip(model_output)
                .map(|(s, m)| sa * s - sb * m)
                .collect(),
        };
        if let Some(r) = self.clip_sample {
            x0.iter_mut().for_each(|v| *v = v.clamp(-r, r));
        }
        let (c_skip, c_out) = self.boundary_scalings(t);
        let denoised: Vec<f32> = x0
            .iter()
            .zip(sample)
            .map(|(x, s)| c_out * x + c_skip * s)
            .collect();
        if last {
            return denoised;
        }
        let z = noise(denoised.len());
        let (sap, sbp) = (a_prev.sqrt(), (1.0 - a_prev).sqrt());
        denoised
            .iter()
            .zip(z)
            .map(|(d, n)| sap * d + sbp * n)
            .collect()
    }

    fn output(&self) -> super::Output {
        self.common.prediction.into()
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        add_alpha_noise(
            original,
            noise,
            self.common
                .alpha_at(self.timesteps[i] as i64, self.final_alpha),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_follow_the_distillation_schedule() {
        // diffusers: LCMScheduler().set_timesteps(4) -> [999, 759, 499, 259]
        assert_eq!(
            lcm_timesteps(1000, 50, 4).unwrap(),
            vec![999.0, 759.0, 499.0, 259.0]
        );
        assert_eq!(lcm_timesteps(1000, 50, 1).unwrap(), vec![999.0]);
        assert!(lcm_timesteps(1000, 50, 51).is_err());
        assert!(lcm_timesteps(1000, 50, 0).is_err());
        assert!(lcm_timesteps(100, 200, 4).is_err());
    }
}
