//! What the step loop needs besides the networks, in pure Rust so the
//! gateway does not link libtorch:
//!
//! - [`TorchGenerator`]: torch's CPU generator (mt19937) and its normal
//!   sampling, so a seed gives the same noise as
//!   `torch.Generator("cpu").manual_seed(seed)` does in diffusers;
//! - [`schedulers`]: the diffusers schedulers SD uses, built from a model's
//!   `scheduler_config.json`.

pub mod rng;
pub mod schedulers;

pub use rng::TorchGenerator;
pub use schedulers::{
    blend_denoised, Output, Prediction, Scheduler, SchedulerConfig, SchedulerError, SchedulerKind,
};

/// The first timestep index of image-to-image, as diffusers' `get_timesteps`:
/// skip the first (1 − strength) of the schedule (`order` timesteps a step).
pub fn img2img_start(steps: u32, strength: f32, order: usize) -> usize {
    let steps = steps as usize;
    let init_steps = ((steps as f32 * strength) as usize).min(steps);
    (steps - init_steps) * order
}
