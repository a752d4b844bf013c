//! What the gateway knows about the model it serves, learnt from the model
//! services at start (it reads no model files).

use std::sync::{Arc, RwLock};

use sd_proto::v1::denoiser_info::FamilyParams;
use sd_proto::v1::{FluxParams, ForwardCost, KleinParams, SdParams, SdxlParams, ZImageParams};
use sd_sampling::{Prediction, SchedulerConfig, SchedulerKind};

/// The denoiser's published UNet cost, shared by every request and
/// replaced when the gateway reads a newer one (the denoiser keeps it
/// current with the forwards it runs).
#[derive(Clone, Debug, Default)]
pub struct SharedCost {
    unet: Arc<RwLock<Option<ForwardCost>>>,
    /// Each ControlNet's forward over the UNet's, as the denoiser measured
    /// it, by name (learnt when requests name them).
    controls: Arc<RwLock<std::collections::HashMap<String, f64>>>,
}

impl SharedCost {
    pub fn new(cost: Option<ForwardCost>) -> Self {
        SharedCost {
            unet: Arc::new(RwLock::new(cost)),
            controls: Default::default(),
        }
    }

    pub fn get(&self) -> Option<ForwardCost> {
        self.unet.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, cost: Option<ForwardCost>) {
        *self.unet.write().unwrap_or_else(|e| e.into_inner()) = cost;
    }

    /// ControlNet `name`'s cost ratio, when known.
    pub fn control_ratio(&self, name: &str) -> Option<f64> {
        self.controls
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .copied()
    }

    /// Remember ControlNet `name`'s measured cost ratio (0: unmeasured, kept out).
    pub fn set_control_ratio(&self, name: &str, ratio: f64) {
        if ratio > 0.0 && ratio.is_finite() {
            self.controls
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_string(), ratio);
        }
    }
}

/// What the step loop and the checks need to know about the model.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    /// The weights' identity (changes when they do).
    pub id: String,
    /// What the denoiser computes in: the wire's type with `--wire-dtype
    /// auto`.
    pub compute_dtype: sd_proto::v1::Dtype,
    /// The model's name, as clients ask for it.
    pub name: String,
    /// The latents: channels, what the network takes, sizes, packing.
    pub layout: Layout,
    /// The network's native latent side (64 for 512² models).
    pub sample_size: u32,
    /// How the VAE's latents map to the denoiser's.
    pub normalization: Normalization,
    /// Most pixels one Decode may carry (0: no bound published).
    pub max_decode_pixels: u64,
    /// What a forward of the network costs, as the denoiser measured it
    /// (None: it published nothing, and requests are not bounded in
    /// seconds); refreshed while serving.
    pub cost: SharedCost,
    pub scheduler_config: SchedulerConfig,
    pub default_scheduler: SchedulerKind,
    pub prediction: Prediction,
    /// Text-encoder layers (clip_skip must stay below).
    pub text_layers: u32,
    /// The text encoder's identity (prompt-cache key).
    pub text_model_id: String,
    /// The text encoder's textual-inversion embeddings (loaded, skipped).
    pub textual_inversions: Vec<sd_proto::v1::TextualInversion>,
    /// The model's family, with what it changes in the pipeline.
    pub profile: Profile,
    /// The IP-Adapters' image encoder the text encoder serves (None: none).
    pub image_encoder: Option<sd_proto::v1::ImageEncoderInfo>,
}

/// The latents, as the denoiser publishes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Channels of the VAE's latents (4 for SD 1.x/2.x and SDXL).
    pub latent_channels: usize,
    /// Channels the network takes (9 for an inpainting UNet: the latents,
    /// a mask and the masked image's latents).
    pub in_channels: usize,
    /// Pixels per latent along a side (8).
    pub scale_factor: u32,
    /// Image sides are multiples of this many pixels.
    pub size_multiple: u32,
    /// The network takes latents packed into patches (the denoiser packs).
    pub packed: bool,
}

impl Layout {
    /// SD's: 4 channels, 8 pixels a latent, sides multiples of 8.
    pub fn sd() -> Self {
        Layout {
            latent_channels: 4,
            in_channels: 4,
            scale_factor: 8,
            size_multiple: 8,
            packed: false,
        }
    }

    /// Input channels of image conditioning beside the latents (0: none).
    pub fn image_channels(&self) -> usize {
        self.in_channels.saturating_sub(self.latent_channels)
    }
}

/// Encode `(sample - shift) * scale`; decode `latents / scale + shift`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalization {
    pub scale: f32,
    pub shift: f32,
}

/// What a model family changes in the pipeline, as the denoiser publishes
/// it; the default is SD 1.x/2.x.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// The family and its own parameters (SDXL: the pooled width, the time
    /// ids, the refiner's aesthetic score, empty negatives as zeros).
    pub params: FamilyParams,
    /// LCM UNets: the width of their guidance embedding (0: none).
    pub time_cond_dim: u32,
    /// The network takes guidance as an input: no unconditional branch.
    pub guidance_embedded: bool,
    /// The guidance scale a request that sets none gets.
    pub default_guidance: f32,
    /// The steps a request that sets none gets (0: the gateway's 50).
    pub default_steps: u32,
    /// Prompts the model draws well (its sdserve.json's).
    pub example_prompts: Vec<String>,
}

impl Profile {
    /// SDXL's parameters (None for a family without them).
    pub fn sdxl(&self) -> Option<&SdxlParams> {
        match &self.params {
            FamilyParams::Sd(_)
            | FamilyParams::Flux(_)
            | FamilyParams::Klein(_)
            | FamilyParams::Zimage(_) => None,
            FamilyParams::Sdxl(p) => Some(p),
        }
    }

    /// FLUX's parameters (None for a family without them).
    pub fn flux(&self) -> Option<&FluxParams> {
        match &self.params {
            FamilyParams::Sd(_)
            | FamilyParams::Sdxl(_)
            | FamilyParams::Klein(_)
            | FamilyParams::Zimage(_) => None,
            FamilyParams::Flux(p) => Some(p),
        }
    }

    /// FLUX.2 Klein's parameters (None for a family without them).
    pub fn klein(&self) -> Option<&KleinParams> {
        match &self.params {
            FamilyParams::Klein(p) => Some(p),
            FamilyParams::Sd(_)
            | FamilyParams::Sdxl(_)
            | FamilyParams::Flux(_)
            | FamilyParams::Zimage(_) => None,
        }
    }

    /// Z-Image's parameters (None for a family without them).
    pub fn zimage(&self) -> Option<&ZImageParams> {
        match &self.params {
            FamilyParams::Zimage(p) => Some(p),
            FamilyParams::Sd(_)
            | FamilyParams::Sdxl(_)
            | FamilyParams::Flux(_)
            | FamilyParams::Klein(_) => None,
        }
    }

    /// Whether its network takes ControlNets: the SD and SDXL UNets and
    /// the FLUX.1 transformer.
    pub fn takes_controlnet(&self) -> bool {
        match &self.params {
            FamilyParams::Sd(_) | FamilyParams::Sdxl(_) | FamilyParams::Flux(_) => true,
            FamilyParams::Klein(_) | FamilyParams::Zimage(_) => false,
        }
    }

    /// Whether its ControlNets see the control image's VAE latents (FLUX.1's)
    /// rather than the image (the UNets').
    pub fn controlnet_takes_latents(&self) -> bool {
        matches!(&self.params, FamilyParams::Flux(_))
    }

    /// Whether its network takes IP-Adapters: the SD and SDXL UNets.
    pub fn takes_ip_adapter(&self) -> bool {
        match &self.params {
            FamilyParams::Sd(_) | FamilyParams::Sdxl(_) => true,
            FamilyParams::Flux(_) | FamilyParams::Klein(_) | FamilyParams::Zimage(_) => false,
        }
    }

    /// Whether the model is a flow-matching one (its scheduler steps a
    /// velocity): FLUX.1, FLUX.2 Klein, Z-Image.
    pub fn is_flow(&self) -> bool {
        self.flux().is_some() || self.klein().is_some() || self.zimage().is_some()
    }

    /// "sd", "sdxl" or "sdxl-refiner", with "+lcm" for an LCM UNet.
    pub fn name(&self) -> String {
        let base = match &self.params {
            FamilyParams::Sd(_) => "sd",
            FamilyParams::Sdxl(p) if p.requires_aesthetics_score => "sdxl-refiner",
            FamilyParams::Sdxl(_) => "sdxl",
            FamilyParams::Flux(p) if p.guidance_distilled => "flux-dev",
            FamilyParams::Flux(_) => "flux-schnell",
            FamilyParams::Klein(p) if p.distilled => "klein-distilled",
            FamilyParams::Klein(_) => "klein",
            FamilyParams::Zimage(_) => "zimage",
        };
        if self.time_cond_dim > 0 {
            format!("{base}+lcm")
        } else {
            base.to_string()
        }
    }
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            params: FamilyParams::Sd(SdParams {}),
            time_cond_dim: 0,
            guidance_embedded: false,
            default_guidance: 7.5,
            default_steps: 0,
            example_prompts: Vec::new(),
        }
    }
}

impl ModelFacts {
    /// The default image side in pixels.
    pub fn default_side(&self) -> u32 {
        self.sample_size * self.layout.scale_factor
    }
}

impl ModelFacts {
    /// What an SD 1.5 model's services publish (no cost measured): the one
    /// fixture of the gateway's unit tests, its integration tests and the
    /// fuzz targets.
    pub fn sd15_example() -> Self {
        ModelFacts {
            compute_dtype: sd_proto::v1::Dtype::Float32,
            id: "tiny@1".into(),
            name: "tiny".into(),
            layout: Layout::sd(),
            sample_size: 64,
            normalization: Normalization {
                scale: 0.18215,
                shift: 0.0,
            },
            max_decode_pixels: 0,
            cost: Default::default(),
            scheduler_config: SchedulerConfig::from_json(r#"{"_class_name": "PNDMScheduler"}"#)
                .unwrap_or_else(|_| unreachable!("a fixed, valid config")),
            default_scheduler: SchedulerKind::Pndm,
            prediction: Prediction::Epsilon,
            text_layers: 12,
            text_model_id: "tiny@1".into(),
            textual_inversions: Vec::new(),
            profile: Profile::default(),
            image_encoder: None,
        }
    }
}

impl ModelFacts {
    /// What a FLUX.1-dev model's services publish (`dev: false`: schnell).
    pub fn flux_example(dev: bool) -> Self {
        let config = if dev {
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "use_dynamic_shifting": true,
                "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}"#
        } else {
            r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0, "use_dynamic_shifting": false}"#
        };
        ModelFacts {
            id: "flux@1".into(),
            name: "flux".into(),
            layout: Layout {
                latent_channels: 16,
                in_channels: 16,
                scale_factor: 8,
                size_multiple: 16,
                packed: true,
            },
            sample_size: 128,
            normalization: Normalization {
                scale: 0.3611,
                shift: 0.1159,
            },
            scheduler_config: SchedulerConfig::from_json(config)
                .unwrap_or_else(|_| unreachable!("a fixed, valid config")),
            default_scheduler: SchedulerKind::FlowEuler,
            text_layers: 1,
            profile: Profile {
                params: FamilyParams::Flux(FluxParams {
                    pooled_dim: 768,
                    max_sequence_length: 512,
                    guidance_distilled: dev,
                }),
                time_cond_dim: 0,
                guidance_embedded: dev,
                default_guidance: 3.5,
                default_steps: if dev { 28 } else { 4 },
                example_prompts: Vec::new(),
            },
            ..Self::sd15_example()
        }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// An SD 1.x model's facts, for unit tests.
    pub fn facts() -> ModelFacts {
        ModelFacts::sd15_example()
    }
}
