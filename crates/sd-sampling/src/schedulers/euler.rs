//! Euler (diffusers' `EulerDiscreteScheduler`, optionally with Karras
//! sigmas) and Euler ancestral (`EulerAncestralDiscreteScheduler`).

use super::common::{interp, k_denoised, karras, sigma_to_t, Common, SchedulerConfig, Spacing};
use super::{Scheduler, SchedulerError};

/// The `Scheduler` methods shared by every scheduler that keeps a
/// `SigmaSchedule` in a field `s` (Euler, Euler ancestral, LMS).
macro_rules! sigma_schedule_methods {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.s.timesteps
        }

        fn init_noise_sigma(&self) -> f32 {
            self.s.init_noise_sigma()
        }

        fn scale_model_input(&self, sample: &[f32], i: usize) -> Vec<f32> {
            $crate::schedulers::common::scale_by_sigma(sample, self.s.sigmas[i])
        }

        fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
            $crate::schedulers::common::add_sigma_noise(original, noise, self.s.sigmas[i])
        }

        fn output(&self) -> $crate::schedulers::Output {
            self.s.common.prediction.into()
        }
    };
}
pub(super) use sigma_schedule_methods;

/// Sigmas (with a final 0) and timesteps of the Euler family.
pub(super) struct SigmaSchedule {
    pub common: Common,
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
}

impl SigmaSchedule {
    pub fn new(
        c: &SchedulerConfig,
        steps: usize,
        use_karras: bool,
    ) -> Result<Self, SchedulerError> {
        let common = Common::new(c, "linspace")?;
        let mut timesteps = common.sigma_family_timesteps(steps);
        let train = common.train_sigmas();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &train)).collect();
        if use_karras {
            let log_sigmas: Vec<f32> = train.iter().map(|s| s.ln()).collect();
            let lo = c.f64_or("sigma_min", sigmas[sigmas.len() - 1]);
            let hi = c.f64_or("sigma_max", sigmas[0]);
            sigmas = karras(lo, hi, steps);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas) as f32 as f64)
                .collect();
        }
        let last = match c.str_or("final_sigmas_type", "zero") {
            "sigma_min" => train[0],
            _ => 0.0,
        };
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(last);
        Ok(SigmaSchedule {
            common,
            timesteps,
            sigmas,
        })
    }

    pub fn init_noise_sigma(&self) -> f32 {
        let max = self.sigmas.iter().copied().fold(0.0f32, f32::max);
        match self.common.spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        }
    }
}

pub struct Euler {
    s: SigmaSchedule,
}

impl Euler {
    pub fn new(
        c: &SchedulerConfig,
        steps: usize,
        use_karras: bool,
    ) -> Result<Self, SchedulerError> {
        if c.str_or("interpolation_type", "linear") != "linear"
            || c.str_or("timestep_type", "discrete") != "discrete"
        {
            return Err(SchedulerError::Unsupported(
                "only linear interpolation and discrete timesteps are supported".into(),
            ));
        }
        Ok(Euler {
            s: SigmaSchedule::new(c, steps, use_karras)?,
        })
    }
}

impl Scheduler for Euler {
    sigma_schedule_methods!();

    fn step(
        &mut self,
        model_output: &[f32],
        i: usize,
        sample: &[f32],
        _: &mut dyn FnMut(usize) -> Vec<f32>,
    ) -> Vec<f32> {
        let sigma = self.s.sigmas[i];
        let x0 = k_denoised(self.s.common.prediction, model_output, sample, sigma);
        let dt = self.s.sigmas[i + 1] - sigma;
        sample
            .iter()
            .zip(&x0)
            .map(|(s, x)| s + (s - x) / sigma * dt)
            .collect()
    }
}

pub struct EulerAncestral {
    s: SigmaSchedule,
}

impl EulerAncestral {
    pub fn new(c: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        Ok(EulerAncestral {
            s: SigmaSchedule::new(c, steps, false)?,
        })
    }
}

impl Scheduler for EulerAncestral {
    sigma_schedule_methods!();

    fn step(
        &mut self,
        model_output: &[f32],
        i: usize,
        sample: &[f32],
        noise: &mut dyn FnMut(usize) -> Vec<f32>,
    ) -> Vec<f32> {
        let (from, to) = (self.s.sigmas[i], self.s.sigmas[i + 1]);
        let x0 = k_denoised(self.s.common.prediction, model_output, sample, from);
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let dt = down - from;
        let z = noise(sample.len());
        sample
            .iter()
            .zip(&x0)
            .zip(z)
            .map(|((s, x), n)| (s + (s - x) / from * dt) + n * up)
            .collect()
    }
}
