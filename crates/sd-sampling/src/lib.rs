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
pub use schedulers::{Prediction, Scheduler, SchedulerConfig, SchedulerError, SchedulerKind};
