//! The diffusers schedulers Stable Diffusion pipelines use, each equal to the
//! diffusers class of the same job built with `from_config` on the model's
//! `scheduler_config.json`: keys the class knows are taken from the file,
//! the rest are that class's defaults.
//!
//! Latents are flat `f32` slices (any shape); per-element arithmetic is done
//! in f32, as diffusers does on float32 tensors, and schedule tables in f64
//! rounded where diffusers rounds them to float32.

mod common;
mod ddim;
mod dpmpp;
mod euler;
mod flow;
mod heun;
mod lcm;
mod lms;
mod pndm;
mod unipc;

use std::fmt;
use std::str::FromStr;

pub use common::{Prediction, SchedulerConfig, Spacing};
pub use flow::flux_mu;

/// The schedulers sdserve offers, by the names users type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Pndm,
    Euler,
    EulerAncestral,
    Lms,
    Heun,
    DpmPp2m,
    UniPc,
    Lcm,
    /// Flow matching (FLUX): diffusers' `FlowMatchEulerDiscreteScheduler`.
    FlowEuler,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 10] = [
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Lms,
        SchedulerKind::Heun,
        SchedulerKind::DpmPp2m,
        SchedulerKind::UniPc,
        SchedulerKind::Lcm,
        SchedulerKind::FlowEuler,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::Lms => "lms",
            SchedulerKind::Heun => "heun",
            SchedulerKind::DpmPp2m => "dpmpp-2m",
            SchedulerKind::UniPc => "unipc",
            SchedulerKind::Lcm => "lcm",
            SchedulerKind::FlowEuler => "flow-euler",
        }
    }

    /// The diffusers class that does the same job.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Lms => "LMSDiscreteScheduler",
            SchedulerKind::Heun => "HeunDiscreteScheduler",
            SchedulerKind::DpmPp2m => "DPMSolverMultistepScheduler",
            SchedulerKind::UniPc => "UniPCMultistepScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
            SchedulerKind::FlowEuler => "FlowMatchEulerDiscreteScheduler",
        }
    }

    pub fn from_diffusers_class(class: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.diffusers_class() == class)
    }

    /// Whether diffusers offers `use_karras_sigmas` for this scheduler.
    pub fn supports_karras(self) -> bool {
        matches!(
            self,
            SchedulerKind::Euler
                | SchedulerKind::Lms
                | SchedulerKind::Heun
                | SchedulerKind::DpmPp2m
                | SchedulerKind::UniPc
        )
    }

    /// Whether this scheduler steps a flow-matching model (a velocity
    /// from pure noise at σ = 1); the others step noise-prediction models.
    pub fn is_flow(self) -> bool {
        self == SchedulerKind::FlowEuler
    }

    /// Whether `eta` means something (DDIM only).
    pub fn supports_eta(self) -> bool {
        self == SchedulerKind::Ddim
    }

    pub fn names() -> String {
        Self::ALL
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = SchedulerError;
    fn from_str(s: &str) -> Result<Self, SchedulerError> {
        let s = s.trim().to_ascii_lowercase();
        let alias = match s.as_str() {
            "euler_a" | "euler-ancestral" => Some(SchedulerKind::EulerAncestral),
            "plms" => Some(SchedulerKind::Pndm),
            "dpm++2m" | "dpmpp_2m" | "dpm-solver++" => Some(SchedulerKind::DpmPp2m),
            "flow_euler" | "flowmatch-euler" | "flow-match-euler" => Some(SchedulerKind::FlowEuler),
            _ => None,
        };
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .or(alias)
            .ok_or(SchedulerError::Unknown(s))
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SchedulerError {
    #[error("unknown scheduler `{0}` (one of: {names})", names = SchedulerKind::names())]
    Unknown(String),
    #[error("scheduler config: {0}")]
    Config(String),
    #[error("{0}")]
    Unsupported(String),
    /// A step count this scheduler cannot take for this model.
    #[error("{0}")]
    Steps(String),
}

/// Options a request may set on top of the model's config.
#[derive(Debug, Clone, Copy, Default)]
pub struct SchedulerOptions {
    pub karras: bool,
    pub eta: f32,
    /// Flow models: the packed latents' token count (FLUX's
    /// resolution-dependent shift).
    pub image_seq_len: Option<usize>,
    /// Flow models: how the family's pipeline lays out the sigmas.
    pub flow: FlowSchedule,
}

/// How a flow-matching pipeline lays out its sigmas before the shift.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FlowSchedule {
    /// FLUX.1's pipelines: numpy's `linspace(1, 1/N, N)`, `mu` from
    /// `calculate_shift` (the token count between the config's bounds).
    #[default]
    Flux,
    /// FLUX.2 Klein's: the same sigmas, `mu` from
    /// `compute_empirical_mu(tokens, steps)`.
    Flux2,
    /// Z-Image's: torch's float32 `linspace(1, 1/N, N)`, `mu` as FLUX.1's.
    ZImage,
}

/// What a network's output is: the noise (ε), v (Salimans & Ho), or a
/// flow-matching velocity (noise − sample).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Epsilon,
    V,
    Velocity,
}

impl From<Prediction> for Output {
    fn from(p: Prediction) -> Self {
        match p {
            Prediction::Epsilon => Output::Epsilon,
            Prediction::V => Output::V,
        }
    }
}

/// AUTOMATIC1111's inpainting blend, for any scheduler: the output at
/// timestep index `i` for latents `sample`, changed so that the clean
/// sample it implies (the "denoised" prediction) is `keep · init + (1 −
/// keep) · denoised` — the picture's latents where `keep` is 1. The
/// scheduler's own noising (`add_noise`) and input scaling give the
/// sample's make-up at `i` (x = s·x0 + n·ε, input = c·x), so every
/// scheduler and prediction type is covered without its own code.
#[must_use]
pub fn blend_denoised(
    scheduler: &dyn Scheduler,
    output: &[f32],
    sample: &[f32],
    i: usize,
    init: &[f32],
    keep: &[f32],
) -> Vec<f32> {
    let s = f64::from(scheduler.add_noise(&[1.0], &[0.0], i)[0]);
    let n = f64::from(scheduler.add_noise(&[0.0], &[1.0], i)[0]);
    let c = f64::from(scheduler.scale_model_input(&[1.0], i)[0]);
    let kind = scheduler.output();
    // No noise left (nothing to blend), or no signal (ε implies no x0).
    if n.abs() < 1e-12 || (kind == Output::Epsilon && s.abs() < 1e-12) {
        return output.to_vec();
    }
    output
        .iter()
        .zip(sample)
        .zip(init.iter().zip(keep))
        .map(|((&o, &x), (&x0_init, &k))| {
            if k == 0.0 {
                return o;
            }
            let (o, x) = (f64::from(o), f64::from(x));
            // The clean sample the output implies, and d(output)/d(x0).
            let (x0, slope) = match kind {
                Output::Epsilon => ((x - n * o) / s, -s / n),
                Output::V => {
                    // In the input's (variance-preserving) frame.
                    let (a, b) = (c * s, c * n);
                    (a * c * x - b * o, -1.0 / b)
                }
                // x = x0 + n·v (s = 1 − n).
                Output::Velocity => (x - n * o, -1.0 / n),
            };
            let delta = f64::from(k) * (f64::from(x0_init) - x0);
            (o + slope * delta) as f32
        })
        .collect()
}

/// One scheduler, set up for a number of inference steps.
pub trait Scheduler: Send + Sync {
    /// Timesteps to run the UNet at, in order (may be longer than the step
    /// count: Heun evaluates twice per step, PNDM once more at the start).
    fn timesteps(&self) -> &[f64];

    /// How many timesteps make one step (Heun: 2), for image-to-image's start.
    fn order(&self) -> usize {
        1
    }

    /// Standard deviation of the initial noise.
    fn init_noise_sigma(&self) -> f32;

    /// The UNet's input for the latents at timestep index `i`.
    fn scale_model_input(&self, sample: &[f32], i: usize) -> Vec<f32> {
        let _ = i;
        sample.to_vec()
    }

    /// The latents after timestep index `i`, from the model's output.
    /// `noise(n)` draws `n` standard normals from the generation's generator
    /// (ancestral sampling, DDIM with eta > 0).
    fn step(
        &mut self,
        model_output: &[f32],
        i: usize,
        sample: &[f32],
        noise: &mut dyn FnMut(usize) -> Vec<f32>,
    ) -> Vec<f32>;

    /// Image-to-image: noise `original` to the level of timestep index `i`.
    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32>;

    /// What the network's output is to this scheduler.
    fn output(&self) -> Output;

    /// Image-to-image: the first timestep index at `strength` of `steps`
    /// (diffusers' `get_timesteps` of the pipelines this scheduler serves).
    fn start_index(&self, steps: u32, strength: f32) -> usize {
        crate::img2img_start(steps, strength, self.order())
    }
}

/// Build `kind` from the model's scheduler config, set to `steps` inference steps.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    steps: usize,
    options: SchedulerOptions,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    if steps == 0 || steps > config.num_train_timesteps() {
        return Err(SchedulerError::Steps(format!(
            "steps must be in 1..={}",
            config.num_train_timesteps()
        )));
    }
    if options.karras && !kind.supports_karras() {
        return Err(SchedulerError::Unsupported(format!(
            "karras sigmas are not available for {kind}"
        )));
    }
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(config, steps, options.eta)?),
        SchedulerKind::Pndm => Box::new(pndm::Pndm::new(config, steps)?),
        SchedulerKind::Euler => Box::new(euler::Euler::new(config, steps, options.karras)?),
        SchedulerKind::EulerAncestral => Box::new(euler::EulerAncestral::new(config, steps)?),
        SchedulerKind::Lms => Box::new(lms::Lms::new(config, steps, options.karras)?),
        SchedulerKind::Heun => Box::new(heun::Heun::new(config, steps, options.karras)?),
        SchedulerKind::DpmPp2m => Box::new(dpmpp::DpmPp2m::new(config, steps, options.karras)?),
        SchedulerKind::UniPc => Box::new(unipc::UniPc::new(config, steps, options.karras)?),
        SchedulerKind::Lcm => Box::new(lcm::Lcm::new(config, steps)?),
        SchedulerKind::FlowEuler => Box::new(flow::FlowEuler::new(
            config,
            steps,
            options.image_seq_len,
            options.flow,
        )?),
    })
}
