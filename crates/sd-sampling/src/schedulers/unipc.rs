//! UniPC (diffusers' `UniPCMultistepScheduler` with its defaults: order 2,
//! data prediction, the bh2 variant, the corrector on every step),
//! optionally with Karras sigmas.

use super::common::{Common, SchedulerConfig};
use super::dpmpp::{alpha_sigma, data_prediction, lambda, multistep_schedule, vp_add_noise};
use super::{Scheduler, SchedulerError};

pub struct UniPc {
    common: Common,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    outputs: Vec<Vec<f32>>,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<Vec<f32>>,
    lower_order_final: bool,
}

impl UniPc {
    pub fn new(
        c: &SchedulerConfig,
        steps: usize,
        use_karras: bool,
    ) -> Result<Self, SchedulerError> {
        if c.str_or("solver_type", "bh2") != "bh2" || !c.bool_or("predict_x0", true) {
            return Err(SchedulerError::Unsupported(
                "unipc: only the bh2 data-prediction variant is supported".into(),
            ));
        }
        let common = Common::new(c, "linspace")?;
        let train = common.train_sigmas();
        let range = (train[0] as f64, train[train.len() - 1] as f64);
        let (timesteps, sigmas) = multistep_schedule(&common, steps, use_karras.then_some(range));
        let last = match c.str_or("final_sigmas_type", "zero") {
            "sigma_min" => *sigmas.last().unwrap_or(&0.0) as f32,
            _ => 0.0,
        };
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(last);
        Ok(UniPc {
            common,
            timesteps,
            sigmas,
            outputs: Vec::new(),
            lower_order_nums: 0,
            this_order: 1,
            last_sample: None,
            lower_order_final: c.bool_or("lower_order_final", true),
        })
    }

    /// The B(h) coefficients of order 1 or 2: (h_phi_1, B_h, rhos for a solve with `rk`).
    fn coefficients(h: f32, order: usize, rk: f32) -> (f32, f32, Vec<f32>) {
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0f32;
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            // R = [[1, 1], [rk, 1]]
            let rho0 = (b[0] - b[1]) / (1.0 - rk);
            vec![rho0, b[0] - rho0]
        };
        (h_phi_1, b_h, rhos)
    }

    fn corrector(&self, i: usize, model_t: &[f32], last: &[f32], this: &[f32]) -> Vec<f32> {
        let order = self.this_order;
        let m0 = &self.outputs[self.outputs.len() - 1];
        let (sigma_t, sigma_s0) = (self.sigmas[i], self.sigmas[i - 1]);
        let (a_t, s_t) = alpha_sigma(sigma_t);
        let (_, s_s0) = alpha_sigma(sigma_s0);
        let l_s0 = lambda(sigma_s0);
        let h = lambda(sigma_t) - l_s0;
        let (rk, d1) = if order == 2 && self.outputs.len() >= 2 && i >= 2 {
            let rk = (lambda(self.sigmas[i - 2]) - l_s0) / h;
            let mi = &self.outputs[self.outputs.len() - 2];
            (
                rk,
                Some(
                    mi.iter()
                        .zip(m0)
                        .map(|(a, b)| (a - b) / rk)
                        .collect::<Vec<f32>>(),
                ),
            )
        } else {
            (1.0, None)
        };
        let order = if d1.is_some() { 2 } else { 1 };
        let (h_phi_1, b_h, rhos) = Self::coefficients(h, order, rk);
        let rho_last = rhos[rhos.len() - 1];
        let _ = this;
        (0..last.len())
            .map(|k| {
                let x_t_ = s_t / s_s0 * last[k] - a_t * h_phi_1 * m0[k];
                let corr = d1.as_ref().map_or(0.0, |d| rhos[0] * d[k]);
                x_t_ - a_t * b_h * (corr + rho_last * (model_t[k] - m0[k]))
            })
            .collect()
    }

    fn predictor(&self, i: usize, sample: &[f32], order: usize) -> Vec<f32> {
        let m0 = &self.outputs[self.outputs.len() - 1];
        let (sigma_t, sigma_s0) = (self.sigmas[i + 1], self.sigmas[i]);
        let (a_t, s_t) = alpha_sigma(sigma_t);
        let (_, s_s0) = alpha_sigma(sigma_s0);
        let l_s0 = lambda(sigma_s0);
        let h = lambda(sigma_t) - l_s0;
        let d1: Option<Vec<f32>> = (order == 2 && self.outputs.len() >= 2 && i >= 1).then(|| {
            let rk = (lambda(self.sigmas[i - 1]) - l_s0) / h;
            let mi = &self.outputs[self.outputs.len() - 2];
            mi.iter().zip(m0).map(|(a, b)| (a - b) / rk).collect()
        });
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = hh.exp_m1();
        (0..sample.len())
            .map(|k| {
                let x_t_ = s_t / s_s0 * sample[k] - a_t * h_phi_1 * m0[k];
                let pred = d1.as_ref().map_or(0.0, |d| 0.5 * d[k]);
                x_t_ - a_t * b_h * pred
            })
            .collect()
    }
}

impl Scheduler for UniPc {
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
        let converted =
            data_prediction(self.common.prediction, model_output, sample, self.sigmas[i]);
        let sample: Vec<f32> = match self.last_sample.take() {
            Some(last) if i > 0 && !self.outputs.is_empty() => {
                self.corrector(i, &converted, &last, sample)
            }
            _ => sample.to_vec(),
        };
        if self.outputs.len() == 2 {
            self.outputs.remove(0);
        }
        self.outputs.push(converted);
        let n = self.timesteps.len();
        let order = if self.lower_order_final {
            2.min(n - i)
        } else {
            2
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev = self.predictor(i, &sample, self.this_order);
        self.last_sample = Some(sample);
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        prev
    }

    fn output(&self) -> super::Output {
        self.common.prediction.into()
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        vp_add_noise(original, noise, self.sigmas[i])
    }
}
