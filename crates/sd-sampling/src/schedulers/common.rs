//! What the schedulers share: the config as diffusers' `from_config` reads
//! it, the noise schedule (betas → cumulative alphas, in float32 as torch
//! computes them), timestep spacings and sigma helpers that follow numpy's
//! semantics (half-to-even rounding, `linspace`, `arange`, `interp`).

use serde_json::{Map, Value};

use super::SchedulerError;

/// A model's `scheduler_config.json`.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    raw: Map<String, Value>,
}

impl SchedulerConfig {
    pub fn from_json(text: &str) -> Result<Self, SchedulerError> {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(raw)) => Ok(SchedulerConfig { raw }),
            Ok(_) => Err(SchedulerError::Config("not a JSON object".into())),
            Err(e) => Err(SchedulerError::Config(e.to_string())),
        }
    }

    /// This config with `defaults` for the keys it does not set (another
    /// class's defaults, for a scheduler built from a model's config).
    pub fn with_defaults(&self, defaults: &[(&str, Value)]) -> SchedulerConfig {
        let mut raw = self.raw.clone();
        for (k, v) in defaults {
            if raw.get(*k).is_none_or(Value::is_null) {
                raw.insert((*k).to_string(), v.clone());
            }
        }
        SchedulerConfig { raw }
    }

    /// This config with `key` set to the string `value` (a request's
    /// override, e.g. `timestep_spacing`).
    pub fn with_str(&self, key: &str, value: &str) -> SchedulerConfig {
        let mut raw = self.raw.clone();
        raw.insert(key.to_string(), Value::from(value));
        SchedulerConfig { raw }
    }

    /// The diffusers class the model ships with (`_class_name`).
    pub fn class_name(&self) -> Option<&str> {
        self.raw.get("_class_name").and_then(Value::as_str)
    }

    pub fn f64_or(&self, key: &str, default: f64) -> f64 {
        self.raw.get(key).and_then(Value::as_f64).unwrap_or(default)
    }

    pub fn bool_or(&self, key: &str, default: bool) -> bool {
        self.raw
            .get(key)
            .and_then(Value::as_bool)
            .unwrap_or(default)
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        self.raw.get(key).and_then(Value::as_str).unwrap_or(default)
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.f64_or("num_train_timesteps", 1000.0).max(1.0) as usize
    }

    /// The model's prediction type (diffusers' default: epsilon).
    pub fn prediction(&self) -> Result<Prediction, SchedulerError> {
        self.str_or("prediction_type", Prediction::Epsilon.as_str())
            .parse()
    }
}

/// What the UNet predicts: the noise, or v (Salimans & Ho), as diffusers'
/// `prediction_type` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    V,
}

impl Prediction {
    /// diffusers' name (`epsilon`, `v_prediction`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::V => "v_prediction",
        }
    }
}

impl std::fmt::Display for Prediction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Prediction {
    type Err = SchedulerError;

    fn from_str(s: &str) -> Result<Self, SchedulerError> {
        match s {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::V),
            other => Err(SchedulerError::Unsupported(format!(
                "prediction_type `{other}` is not supported (epsilon, v_prediction)"
            ))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

/// The schedule every scheduler starts from.
#[derive(Debug, Clone)]
pub struct Common {
    pub train_steps: usize,
    /// Cumulative products of (1 - beta), float32 values.
    pub alphas_cumprod: Vec<f32>,
    pub prediction: Prediction,
    pub spacing: Spacing,
    pub steps_offset: f64,
}

impl Common {
    /// `default_spacing` is the class's default for `timestep_spacing`.
    pub fn new(c: &SchedulerConfig, default_spacing: &str) -> Result<Self, SchedulerError> {
        let n = c.num_train_timesteps();
        if c.raw.get("trained_betas").is_some_and(|v| !v.is_null()) {
            return Err(SchedulerError::Unsupported(
                "trained_betas is not supported".into(),
            ));
        }
        if c.bool_or("rescale_betas_zero_snr", false) || c.bool_or("thresholding", false) {
            return Err(SchedulerError::Unsupported(
                "rescale_betas_zero_snr and thresholding are not supported".into(),
            ));
        }
        let (start, end) = (c.f64_or("beta_start", 0.0001), c.f64_or("beta_end", 0.02));
        let betas: Vec<f32> = match c.str_or("beta_schedule", "linear") {
            "linear" => linspace_f32(start, end, n),
            "scaled_linear" => linspace_f32(start.sqrt(), end.sqrt(), n)
                .iter()
                .map(|b| b * b)
                .collect(),
            other => {
                return Err(SchedulerError::Unsupported(format!(
                    "beta_schedule `{other}` is not supported"
                )))
            }
        };
        // torch.cumprod on CPU accumulates in double and stores float32.
        let mut acc = 1.0f64;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect();
        let spacing = match c.str_or("timestep_spacing", default_spacing) {
            "linspace" => Spacing::Linspace,
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            other => {
                return Err(SchedulerError::Unsupported(format!(
                    "timestep_spacing `{other}` is not supported"
                )))
            }
        };
        Ok(Common {
            train_steps: n,
            alphas_cumprod,
            prediction: c.prediction()?,
            spacing,
            steps_offset: c.f64_or("steps_offset", 0.0),
        })
    }

    /// ((1 - ᾱ) / ᾱ)^½ for every training timestep, float32 as torch computes it.
    pub fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect()
    }

    /// Timesteps of the Euler family (Euler, Euler a, LMS, Heun): N of them,
    /// descending, as float32 values.
    pub fn sigma_family_timesteps(&self, steps: usize) -> Vec<f64> {
        let t = self.train_steps as f64;
        let v: Vec<f64> = match self.spacing {
            Spacing::Linspace => linspace(0.0, t - 1.0, steps).into_iter().rev().collect(),
            Spacing::Leading => {
                let ratio = (self.train_steps / steps) as f64;
                (0..steps)
                    .rev()
                    .map(|i| (i as f64 * ratio).round_ties_even() + self.steps_offset)
                    .collect()
            }
            Spacing::Trailing => arange_desc(t, t / steps as f64)
                .into_iter()
                .map(|x| x.round_ties_even() - 1.0)
                .collect(),
        };
        v.into_iter().map(|x| x as f32 as f64).collect()
    }

    /// Timesteps of the multistep solvers (DPM-Solver++, UniPC): N of them,
    /// integers, descending.
    pub fn multistep_timesteps(&self, steps: usize) -> Vec<f64> {
        let t = self.train_steps as f64;
        match self.spacing {
            Spacing::Linspace => {
                let mut v: Vec<f64> = linspace(0.0, t - 1.0, steps + 1)
                    .into_iter()
                    .map(f64::round_ties_even)
                    .collect();
                v.reverse();
                v.pop();
                v
            }
            Spacing::Leading => {
                let ratio = (self.train_steps / (steps + 1)) as f64;
                (1..=steps)
                    .rev()
                    .map(|i| (i as f64 * ratio).round_ties_even() + self.steps_offset)
                    .collect()
            }
            Spacing::Trailing => arange_desc(t, t / steps as f64)
                .into_iter()
                .map(|x| x.round_ties_even() - 1.0)
                .collect(),
        }
    }

    /// Integer timesteps of the DDPM-family schedulers (DDIM, PNDM), descending.
    pub fn ddpm_timesteps(&self, steps: usize) -> Vec<f64> {
        let t = self.train_steps;
        match self.spacing {
            Spacing::Linspace => linspace(0.0, (t - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(f64::round_ties_even)
                .collect(),
            Spacing::Leading => {
                let ratio = (t / steps) as f64;
                (0..steps)
                    .rev()
                    .map(|i| i as f64 * ratio + self.steps_offset)
                    .collect()
            }
            Spacing::Trailing => arange_desc(t as f64, t as f64 / steps as f64)
                .into_iter()
                .map(|x| x.round_ties_even() - 1.0)
                .collect(),
        }
    }

    /// ᾱ past the last step: 1 with `set_alpha_to_one`, else ᾱ₀.
    pub fn final_alpha(&self, c: &SchedulerConfig, set_alpha_to_one_default: bool) -> f32 {
        if c.bool_or("set_alpha_to_one", set_alpha_to_one_default) {
            1.0
        } else {
            self.alphas_cumprod[0]
        }
    }

    /// ᾱ at an integer timestep; `final_alpha` below zero.
    pub fn alpha_at(&self, t: i64, final_alpha: f32) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[(t as usize).min(self.train_steps - 1)]
        } else {
            final_alpha
        }
    }
}

/// numpy.linspace in float64.
pub fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
            v[n - 1] = stop;
            v
        }
    }
}

/// torch.linspace(start, end, n, dtype=float32): computed from both ends.
pub fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start as f32];
    }
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                s + step * i as f32
            } else {
                e - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// numpy.arange(start, 0, -step) for positive start and step.
pub fn arange_desc(start: f64, step: f64) -> Vec<f64> {
    let n = (start / step).ceil() as usize;
    (0..n).map(|i| start - i as f64 * step).collect()
}

/// numpy.interp(x, 0..len, table) for x within the table.
pub fn interp(x: f64, table: &[f32]) -> f64 {
    if x <= 0.0 {
        return table[0] as f64;
    }
    let last = table.len() - 1;
    if x >= last as f64 {
        return table[last] as f64;
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    let (a, b) = (table[i] as f64, table[i + 1] as f64);
    // numpy's formula: slope * (x - xp[i]) + fp[i]
    (b - a) * w + a
}

/// diffusers' `_sigma_to_t`: the (fractional) training timestep of a sigma,
/// interpolating in log-sigma.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    let mut low = 0usize;
    for (i, &l) in log_sigmas.iter().enumerate() {
        if log_sigma - l as f64 >= 0.0 {
            low = i;
        }
    }
    let low = low.min(n - 2);
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// Karras et al. (2022) sigmas between `sigma_max` and `sigma_min`, rho = 7.
pub fn karras(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// x0 from the model output at noise level sigma (k-diffusion parameterisation).
pub fn k_denoised(pred: Prediction, model_output: &[f32], sample: &[f32], sigma: f32) -> Vec<f32> {
    match pred {
        Prediction::Epsilon => sample
            .iter()
            .zip(model_output)
            .map(|(s, m)| s - sigma * m)
            .collect(),
        Prediction::V => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            let c_skip = sigma * sigma + 1.0;
            model_output
                .iter()
                .zip(sample)
                .map(|(m, s)| m * c_out + s / c_skip)
                .collect()
        }
    }
}

/// `sample / (sigma² + 1)^½`.
pub fn scale_by_sigma(sample: &[f32], sigma: f32) -> Vec<f32> {
    let d = (sigma * sigma + 1.0).sqrt();
    sample.iter().map(|s| s / d).collect()
}

/// `original + noise * sigma`.
pub fn add_sigma_noise(original: &[f32], noise: &[f32], sigma: f32) -> Vec<f32> {
    original
        .iter()
        .zip(noise)
        .map(|(o, n)| o + n * sigma)
        .collect()
}

/// `√ᾱ · original + √(1 − ᾱ) · noise`.
pub fn add_alpha_noise(original: &[f32], noise: &[f32], alpha: f32) -> Vec<f32> {
    let (a, b) = (alpha.sqrt(), (1.0 - alpha).sqrt());
    original
        .iter()
        .zip(noise)
        .map(|(o, n)| a * o + b * n)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_rounding_and_ranges() {
        assert_eq!(arange_desc(1000.0, 62.5).len(), 16);
        assert_eq!(812.5f64.round_ties_even(), 812.0);
        assert_eq!(linspace(0.0, 999.0, 3), vec![0.0, 499.5, 999.0]);
        assert_eq!(interp(1.5, &[0.0, 1.0, 3.0]), 2.0);
    }
}
