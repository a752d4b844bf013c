//! DPM-Solver++(2M) (diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type="dpmsolver++"`, `solver_order=2`, midpoint solver),
//! optionally with Karras sigmas.

use super::common::{interp, karras, sigma_to_t, Common, Prediction, SchedulerConfig};
use super::{Scheduler, SchedulerError};

pub struct DpmPp2m {
    common: Common,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    /// Converted (x0) model outputs, newest last.
    outputs: Vec<Vec<f32>>,
    lower_order_nums: usize,
    lower_order_final: bool,
    heun: bool,
}

/// (alpha_t, sigma_t) of a k-diffusion sigma.
pub(super) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let a = 1.0 / (sigma * sigma + 1.0).sqrt();
    (a, sigma * a)
}

/// `alpha_t · original + sigma_t · noise` (the multistep solvers work in VP space).
pub(super) fn vp_add_noise(original: &[f32], noise: &[f32], sigma: f32) -> Vec<f32> {
    let (a, s) = alpha_sigma(sigma);
    original
        .iter()
        .zip(noise)
        .map(|(o, n)| a * o + s * n)
        .collect()
}

/// Timesteps and sigmas of the multistep solvers (DPM-Solver++, UniPC):
/// Karras sigmas between `karras = (min, max)` with rounded timesteps, or
/// the spaced integer timesteps with interpolated sigmas.
pub(super) fn multistep_schedule(
    common: &Common,
    steps: usize,
    karras_range: Option<(f64, f64)>,
) -> (Vec<f64>, Vec<f64>) {
    let train = common.train_sigmas();
    match karras_range {
        Some((lo, hi)) => {
            let log_sigmas: Vec<f32> = train.iter().map(|s| s.ln()).collect();
            let sig = karras(lo, hi, steps);
            let ts = sig
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas).round_ties_even())
                .collect();
            (ts, sig)
        }
        None => {
            let ts = common.multistep_timesteps(steps);
            let sig = ts.iter().map(|&t| interp(t, &train)).collect();
            (ts, sig)
        }
    }
}

/// The data (x0) prediction from the model output at noise level `sigma`,
/// in the solvers' VP parameterisation.
pub(super) fn data_prediction(
    pred: Prediction,
    model_output: &[f32],
    sample: &[f32],
    sigma: f32,
) -> Vec<f32> {
    let (a, s) = alpha_sigma(sigma);
    match pred {
        Prediction::Epsilon => sample
            .iter()
            .zip(model_output)
            .map(|(x, m)| (x - s * m) / a)
            .collect(),
        Prediction::V => sample
            .iter()
            .zip(model_output)
            .map(|(x, m)| a * x - s * m)
            .collect(),
    }
}

pub(super) fn lambda(sigma: f32) -> f32 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

impl DpmPp2m {
    pub fn new(
        c: &SchedulerConfig,
        steps: usize,
        use_karras: bool,
    ) -> Result<Self, SchedulerError> {
        let common = Common::new(c, "linspace")?;
        let train = common.train_sigmas();
        let range = (
            c.f64_or("sigma_min", train[0] as f64),
            c.f64_or("sigma_max", train[train.len() - 1] as f64),
        );
        let (timesteps, sigmas) = multistep_schedule(&common, steps, use_karras.then_some(range));
        let last = match c.str_or("final_sigmas_type", "zero") {
            "sigma_min" => train[0],
            _ => 0.0,
        };
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(last);
        Ok(DpmPp2m {
            common,
            timesteps,
            sigmas,
            outputs: Vec::new(),
            lower_order_nums: 0,
            lower_order_final: c.bool_or("lower_order_final", true),
            heun: c.str_or("solver_type", "midpoint") == "heun",
        })
    }
}

impl Scheduler for DpmPp2m {
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
        let n = self.timesteps.len();
        let final_zero = self.sigmas[n] == 0.0;
        let lower_final = i == n - 1 && ((self.lower_order_final && n < 15) || final_zero);
        // convert_model_output: the data (x0) prediction.
        let sigma = self.sigmas[i];
        let x0 = data_prediction(self.common.prediction, model_output, sample, sigma);
        if self.outputs.len() == 2 {
            self.outputs.remove(0);
        }
        self.outputs.push(x0);
        let (sigma_t, sigma_s0) = (self.sigmas[i + 1], sigma);
        let (a_t, s_t) = alpha_sigma(sigma_t);
        let (_, s_s0) = alpha_sigma(sigma_s0);
        let (l_t, l_s0) = (lambda(sigma_t), lambda(sigma_s0));
        let h = l_t - l_s0;
        let m0 = &self.outputs[self.outputs.len() - 1];
        let out = if self.lower_order_nums < 1 || lower_final || self.outputs.len() < 2 {
            let c = a_t * ((-h).exp() - 1.0);
            sample
                .iter()
                .zip(m0)
                .map(|(x, d)| s_t / s_s0 * x - c * d)
                .collect()
        } else {
            let m1 = &self.outputs[0];
            let h0 = l_s0 - lambda(self.sigmas[i - 1]);
            let r0 = h0 / h;
            let c0 = a_t * ((-h).exp() - 1.0);
            sample
                .iter()
                .zip(m0.iter().zip(m1))
                .map(|(x, (d0, d1))| {
                    let dd = 1.0 / r0 * (d0 - d1);
                    if self.heun {
                        s_t / s_s0 * x - c0 * d0 + a_t * (((-h).exp() - 1.0) / h + 1.0) * dd
                    } else {
                        s_t / s_s0 * x - c0 * d0 - 0.5 * c0 * dd
                    }
                })
                .collect()
        };
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        out
    }

    fn output(&self) -> super::Output {
        self.common.prediction.into()
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        vp_add_noise(original, noise, self.sigmas[i])
    }
}
