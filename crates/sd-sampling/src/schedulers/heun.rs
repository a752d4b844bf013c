//! Heun's second-order method (diffusers' `HeunDiscreteScheduler`): two UNet
//! evaluations per step, so the timesteps repeat after the first.

use super::common::{add_sigma_noise, k_denoised, scale_by_sigma, SchedulerConfig};
use super::euler::SigmaSchedule;
use super::{Scheduler, SchedulerError};

pub struct Heun {
    s: SigmaSchedule,
    /// Interleaved: [s0, s1, s1, s2, s2, …, 0].
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    first: Option<(Vec<f32>, f32, Vec<f32>)>,
    clip: Option<f32>,
}

impl Heun {
    pub fn new(
        c: &SchedulerConfig,
        steps: usize,
        use_karras: bool,
    ) -> Result<Self, SchedulerError> {
        let s = SigmaSchedule::new(c, steps, use_karras)?;
        let n = s.sigmas.len();
        let mut sigmas = vec![s.sigmas[0]];
        for &v in &s.sigmas[1..n - 1] {
            sigmas.extend([v, v]);
        }
        sigmas.push(s.sigmas[n - 1]);
        let mut timesteps = vec![s.timesteps[0]];
        for &t in &s.timesteps[1..] {
            timesteps.extend([t, t]);
        }
        let clip = c
            .bool_or("clip_sample", false)
            .then(|| c.f64_or("clip_sample_range", 1.0) as f32);
        Ok(Heun {
            s,
            sigmas,
            timesteps,
            first: None,
            clip,
        })
    }
}

impl Scheduler for Heun {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn order(&self) -> usize {
        2
    }

    fn init_noise_sigma(&self) -> f32 {
        self.s.init_noise_sigma()
    }

    fn scale_model_input(&self, sample: &[f32], i: usize) -> Vec<f32> {
        scale_by_sigma(sample, self.sigmas[i])
    }

    fn step(
        &mut self,
        model_output: &[f32],
        i: usize,
        sample: &[f32],
        _: &mut dyn FnMut(usize) -> Vec<f32>,
    ) -> Vec<f32> {
        let pred = self.s.common.prediction;
        match self.first.take() {
            None => {
                let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
                let mut x0 = k_denoised(pred, model_output, sample, sigma);
                if let Some(r) = self.clip {
                    x0.iter_mut().for_each(|v| *v = v.clamp(-r, r));
                }
                let d: Vec<f32> = sample
                    .iter()
                    .zip(&x0)
                    .map(|(s, x)| (s - x) / sigma)
                    .collect();
                let dt = next - sigma;
                let out = sample.iter().zip(&d).map(|(s, d)| s + d * dt).collect();
                self.first = Some((d, dt, sample.to_vec()));
                out
            }
            Some((d_prev, dt, base)) => {
                let next = self.sigmas[i];
                let mut x0 = k_denoised(pred, model_output, sample, next);
                if let Some(r) = self.clip {
                    x0.iter_mut().for_each(|v| *v = v.clamp(-r, r));
                }
                base.iter()
                    .zip(sample.iter().zip(&x0))
                    .zip(&d_prev)
                    .map(|((b, (s, x)), dp)| b + (dp + (s - x) / next) / 2.0 * dt)
                    .collect()
            }
        }
    }

    fn output(&self) -> super::Output {
        self.s.common.prediction.into()
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        add_sigma_noise(original, noise, self.sigmas[i])
    }
}
