//! What the gateway knows about the model it serves, learnt from the model
//! services at start (it reads no model files).

use std::sync::{Arc, RwLock};

use sd_proto::v1::UnetCost;
use sd_sampling::{Prediction, SchedulerConfig, SchedulerKind};

/// The denoiser's published UNet cost, shared by every request and
/// replaced when the gateway reads a newer one (the denoiser keeps it
/// current with the forwards it runs).
#[derive(Clone, Debug, Default)]
pub struct SharedCost(Arc<RwLock<Option<UnetCost>>>);

impl SharedCost {
    pub fn new(cost: Option<UnetCost>) -> Self {
        SharedCost(Arc::new(RwLock::new(cost)))
    }

    pub fn get(&self) -> Option<UnetCost> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, cost: Option<UnetCost>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = cost;
    }
}

/// What the step loop and the checks need to know about the model.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    /// The weights' identity (changes when they do).
    pub id: String,
    /// The model's name, as clients ask for it.
    pub name: String,
    /// Latent channels (4 for SD 1.x/2.x).
    pub latent_channels: usize,
    /// Pixels per latent along a side (8).
    pub scale_factor: u32,
    /// The UNet's native latent side (64 for 512² models).
    pub sample_size: u32,
    /// The VAE's latent scaling factor (0.18215 for SD 1.x).
    pub scaling_factor: f32,
    /// Most pixels one Decode may carry (0: no bound published).
    pub max_decode_pixels: u64,
    /// What a UNet forward costs, as the denoiser measured it (None: it
    /// published nothing, and requests are not bounded in seconds);
    /// refreshed while serving.
    pub cost: SharedCost,
    pub scheduler_config: SchedulerConfig,
    pub default_scheduler: SchedulerKind,
    pub prediction: Prediction,
    /// Text-encoder layers (clip_skip must stay below).
    pub text_layers: u32,
    /// The text encoder's identity (prompt-cache key).
    pub text_model_id: String,
}

impl ModelFacts {
    /// The default image side in pixels.
    pub fn default_side(&self) -> u32 {
        self.sample_size * self.scale_factor
    }
}
