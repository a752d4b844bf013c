//! DDIM (diffusers' `DDIMScheduler`), with eta for stochastic sampling.

use super::common::{add_alpha_noise, Common, Prediction, SchedulerConfig};
use super::{Scheduler, SchedulerError};

pub struct Ddim {
    common: Common,
    timesteps: Vec<f64>,
    final_alpha: f32,
    clip_sample: Option<f32>,
    eta: f32,
    step_ratio: i64,
}

impl Ddim {
    pub fn new(c: &SchedulerConfig, steps: usize, eta: f32) -> Result<Self, SchedulerError> {
        let common = Common::new(c, "leading")?;
        let t = common.train_steps;
        let timesteps = common.ddpm_timesteps(steps);
        let final_alpha = common.final_alpha(c, true);
        let clip_sample = c
            .bool_or("clip_sample", true)
            .then(|| c.f64_or("clip_sample_range", 1.0) as f32);
        Ok(Ddim {
            step_ratio: (t / steps) as i64,
            common,
            timesteps,
            final_alpha,
            clip_sample,
            eta,
        })
    }
}

impl Scheduler for Ddim {
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
        let prev_t = t - self.step_ratio;
        let a_t = self.common.alpha_at(t, self.final_alpha);
        let a_prev = self.common.alpha_at(prev_t, self.final_alpha);
        let b_t = 1.0 - a_t;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        let (mut x0, eps): (Vec<f32>, Vec<f32>) = match self.common.prediction {
            Prediction::Epsilon => (
                sample
                    .iter()
                    .zip(model_output)
                    .map(|(s, m)| (s - sb * m) / sa)
                    .collect(),
                model_output.to_vec(),
            ),
            Prediction::V => (
                sample
                    .iter()
                    .zip(model_output)
                    .map(|(s, m)| sa * s - sb * m)
                    .collect(),
                sample
                    .iter()
                    .zip(model_output)
                    .map(|(s, m)| sa * m + sb * s)
                    .collect(),
            ),
        };
        if let Some(r) = self.clip_sample {
            x0.iter_mut().for_each(|v| *v = v.clamp(-r, r));
        }
        let variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev);
        let std_dev = self.eta * variance.sqrt();
        let dir = (1.0 - a_prev - std_dev * std_dev).sqrt();
        let sap = a_prev.sqrt();
        let mut prev: Vec<f32> = x0
            .iter()
            .zip(&eps)
            .map(|(x, e)| sap * x + dir * e)
            .collect();
        if self.eta > 0.0 {
            let z = noise(prev.len());
            prev.iter_mut().zip(z).for_each(|(p, n)| *p += std_dev * n);
        }
        prev
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
