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
    /// What the model's family changes in the pipeline (SDXL, LCM UNets).
    pub family: Family,
}

/// What a model family changes in the pipeline, as the denoiser publishes
/// it; the default is SD 1.x/2.x.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// SDXL: the pooled embedding's width (0: not SDXL).
    pub pooled_dim: u32,
    /// SDXL: time ids per latent (6; the refiner's 5; 0: none).
    pub time_ids_len: u32,
    /// LCM UNets: guidance goes in as an embedding, unguided (0: none).
    pub time_cond_dim: u32,
    /// SDXL: an empty negative prompt is zeros.
    pub force_zeros_for_empty_prompt: bool,
    /// The refiner's time ids (aesthetic scores).
    pub requires_aesthetics_score: bool,
    /// The guidance scale a request that sets none gets.
    pub default_guidance: f32,
    /// The steps a request that sets none gets (0: the gateway's 50).
    pub default_steps: u32,
}

impl Family {
    /// "sd", "sdxl" or "sdxl-refiner", with "+lcm" for an LCM UNet.
    pub fn name(&self) -> String {
        let base = match (self.time_ids_len, self.requires_aesthetics_score) {
            (0, _) => "sd",
            (_, true) => "sdxl-refiner",
            _ => "sdxl",
        };
        if self.time_cond_dim > 0 {
            format!("{base}+lcm")
        } else {
            base.to_string()
        }
    }
}

impl Default for Family {
    fn default() -> Self {
        Family {
            pooled_dim: 0,
            time_ids_len: 0,
            time_cond_dim: 0,
            force_zeros_for_empty_prompt: false,
            requires_aesthetics_score: false,
            default_guidance: 7.5,
            default_steps: 0,
        }
    }
}

impl ModelFacts {
    /// The default image side in pixels.
    pub fn default_side(&self) -> u32 {
        self.sample_size * self.scale_factor
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// An SD 1.x model's facts, for unit tests.
    pub fn facts() -> ModelFacts {
        ModelFacts {
            id: "tiny@1".into(),
            name: "tiny".into(),
            latent_channels: 4,
            scale_factor: 8,
            sample_size: 64,
            scaling_factor: 0.18215,
            max_decode_pixels: 0,
            cost: Default::default(),
            scheduler_config: SchedulerConfig::from_json(r#"{"_class_name": "PNDMScheduler"}"#)
                .expect("a config"),
            default_scheduler: SchedulerKind::Pndm,
            prediction: Prediction::Epsilon,
            text_layers: 12,
            text_model_id: "tiny@1".into(),
            family: Family::default(),
        }
    }
}
