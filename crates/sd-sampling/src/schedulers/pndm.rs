//! PNDM as Stable Diffusion runs it: PLMS steps only (`skip_prk_steps`),
//! diffusers' `PNDMScheduler` with a linear multistep history of four.

use super::common::{add_alpha_noise, Common, Prediction, SchedulerConfig};
use super::{Scheduler, SchedulerError};

pub struct Pndm {
    common: Common,
    timesteps: Vec<f64>,
    final_alpha: f32,
    step_ratio: i64,
    ets: Vec<Vec<f32>>,
    cur_sample: Option<Vec<f32>>,
    counter: usize,
}

impl Pndm {
    pub fn new(c: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        let common = Common::new(c, "leading")?;
        let t = common.train_steps;
        // Ascending, as diffusers' `_timesteps`.
        let mut base = common.ddpm_timesteps(steps);
        base.reverse();
        // PLMS: [_t[:-1], _t[-2:-1], _t[-1:]] reversed; the second-to-last repeats.
        let n = base.len();
        let mut plms: Vec<f64> = base[..n - 1].to_vec();
        if n >= 2 {
            plms.push(base[n - 2]);
        }
        plms.push(base[n - 1]);
        plms.reverse();
        let final_alpha = common.final_alpha(c, false);
        Ok(Pndm {
            step_ratio: (t / steps) as i64,
            common,
            timesteps: plms,
            final_alpha,
            ets: Vec::new(),
            cur_sample: None,
            counter: 0,
        })
    }

    fn prev_sample(&self, sample: &[f32], t: i64, prev_t: i64, model_output: &[f32]) -> Vec<f32> {
        let a_t = self.common.alpha_at(t, self.final_alpha);
        let a_prev = self.common.alpha_at(prev_t, self.final_alpha);
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps: Vec<f32> = match self.common.prediction {
            Prediction::Epsilon => model_output.to_vec(),
            Prediction::V => model_output
                .iter()
                .zip(sample)
                .map(|(m, s)| a_t.sqrt() * m + b_t.sqrt() * s)
                .collect(),
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        sample
            .iter()
            .zip(&eps)
            .map(|(s, e)| sample_coeff * s - (a_prev - a_t) * e / denom)
            .collect()
    }
}

impl Scheduler for Pndm {
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
        _: &mut dyn FnMut(usize) -> Vec<f32>,
    ) -> Vec<f32> {
        let mut t = self.timesteps[i] as i64;
        let mut prev_t = t - self.step_ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.to_vec());
        } else {
            prev_t = t;
            t += self.step_ratio;
        }
        let e = &self.ets;
        let n = e.len();
        let combine = |coeffs: &[f32], div: f32| -> Vec<f32> {
            (0..model_output.len())
                .map(|k| {
                    coeffs
                        .iter()
                        .enumerate()
                        .map(|(j, c)| c * e[n - 1 - j][k])
                        .sum::<f32>()
                        / div
                })
                .collect()
        };
        let (eps, x): (Vec<f32>, Vec<f32>) = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.to_vec());
            (model_output.to_vec(), sample.to_vec())
        } else if n == 1 && self.counter == 1 {
            let eps = model_output
                .iter()
                .zip(&e[0])
                .map(|(m, p)| (m + p) / 2.0)
                .collect();
            (
                eps,
                self.cur_sample.take().unwrap_or_else(|| sample.to_vec()),
            )
        } else if n == 2 {
            (combine(&[3.0, -1.0], 2.0), sample.to_vec())
        } else if n == 3 {
            (combine(&[23.0, -16.0, 5.0], 12.0), sample.to_vec())
        } else {
            let v = (0..model_output.len())
                .map(|k| {
                    (1.0 / 24.0)
                        * (55.0 * e[n - 1][k] - 59.0 * e[n - 2][k] + 37.0 * e[n - 3][k]
                            - 9.0 * e[n - 4][k])
                })
                .collect();
            (v, sample.to_vec())
        };
        let prev = self.prev_sample(&x, t, prev_t, &eps);
        self.counter += 1;
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
