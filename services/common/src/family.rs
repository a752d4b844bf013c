//! What a model's family changes in the pipeline, read from its files: the
//! SDXL family's added conditioning, the refiner's time ids, the default
//! guidance, and the VAE's precision.

use sd_models::{Component, ModelDir, Placement, UNet};
use tch::Kind;

/// What the model's family changes in the pipeline (SDXL, its refiner, LCM
/// UNets), as diffusers' pipelines have it.
pub struct Family {
    /// The pooled embedding's width (0: not SDXL).
    pub pooled_dim: i64,
    /// Time ids per latent: 6, the refiner's 5 (0: not SDXL).
    pub time_ids_len: i64,
    /// An empty negative prompt is zeros (`force_zeros_for_empty_prompt`).
    pub force_zeros: bool,
    /// The refiner's time ids: an aesthetic score instead of the target size.
    pub requires_aesthetics: bool,
    /// The guidance diffusers' pipeline for this family defaults to.
    pub default_guidance: f32,
}

impl Family {
    /// The components whose weights make the model's identity.
    pub fn components(&self) -> &'static [Component] {
        if self.pooled_dim > 0 {
            &[
                Component::TextEncoder,
                Component::TextEncoder2,
                Component::Unet,
                Component::Vae,
            ]
        } else {
            &[Component::TextEncoder, Component::Unet, Component::Vae]
        }
    }

    /// The family of the model in `dir` whose UNet is `unet`.
    pub fn of(dir: &ModelDir, unet: &UNet) -> anyhow::Result<Self> {
        let Some((time_dim, input_dim)) = unet.config().text_time() else {
            return Ok(Family {
                pooled_dim: 0,
                time_ids_len: 0,
                force_zeros: false,
                requires_aesthetics: false,
                default_guidance: 7.5,
            });
        };
        // SDXL: original size, crop and target size; the refiner: original
        // size, crop and an aesthetic score. The rest of add_embedding's
        // width is the pooled embedding.
        let requires_aesthetics = dir.requires_aesthetics_score()?;
        let n = if requires_aesthetics { 5 } else { 6 };
        let pooled_dim = input_dim - n * time_dim;
        anyhow::ensure!(
            pooled_dim > 0,
            "unet/config.json: projection_class_embeddings_input_dim {input_dim} leaves no room \
             for a pooled embedding beside {n} time ids of {time_dim}"
        );
        Ok(Family {
            pooled_dim,
            time_ids_len: n,
            force_zeros: dir.force_zeros_for_empty_prompt()?,
            requires_aesthetics,
            default_guidance: 5.0,
        })
    }
}

/// diffusers' SDXL pipelines decode in fp32 when the VAE is in fp16 and
/// its config says `force_upcast` (SDXL's VAE overflows in fp16); the SD
/// 1.x/2.x pipelines never do.
pub fn vae_placement(placement: Placement, xl: bool, force_upcast: bool) -> Placement {
    if xl && force_upcast && placement.kind == Kind::Half {
        Placement {
            kind: Kind::Float,
            ..placement
        }
    } else {
        placement
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sdxl_in_fp16_with_force_upcast_decodes_in_fp32() {
        let half = Placement {
            device: tch::Device::Cpu,
            kind: Kind::Half,
        };
        assert_eq!(vae_placement(half, true, true).kind, Kind::Float);
        assert_eq!(vae_placement(half, true, false).kind, Kind::Half);
        assert_eq!(vae_placement(half, false, true).kind, Kind::Half);
        let bf16 = Placement {
            kind: Kind::BFloat16,
            ..half
        };
        assert_eq!(vae_placement(bf16, true, true).kind, Kind::BFloat16);
    }
}
