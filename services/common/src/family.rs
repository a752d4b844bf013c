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
    /// The guidance diffusers' pipeline for this family defaults to, or
    /// the model's own (`sdserve.json`).
    pub default_guidance: f32,
    /// The model's own step count (`sdserve.json`; 0: none, the gateway's).
    pub default_steps: u32,
}

/// A model's own defaults, when its directory has an `sdserve.json`
/// (`{"default_steps": 25, "default_guidance": 4.0}`, both optional): what
/// draws best with it, as its trainer found.
#[derive(Debug, Default, Clone, PartialEq, serde::Deserialize)]
pub struct ModelDefaults {
    #[serde(default)]
    pub default_steps: Option<u32>,
    #[serde(default)]
    pub default_guidance: Option<f32>,
}

impl ModelDefaults {
    pub fn read(dir: &ModelDir) -> anyhow::Result<Self> {
        let path = dir.root().join("sdserve.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }

    /// The file's text, checked (other keys are the model's own notes).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let d: ModelDefaults = serde_json::from_str(text)?;
        anyhow::ensure!(
            d.default_steps.is_none_or(|s| (1..=1000).contains(&s)),
            "default_steps must be in 1..=1000"
        );
        anyhow::ensure!(
            d.default_guidance
                .is_none_or(|g| g.is_finite() && (0.0..=50.0).contains(&g)),
            "default_guidance must be in 0..=50"
        );
        Ok(d)
    }
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

    /// The family of the model in `dir` whose UNet is `unet`, with the
    /// model's own defaults over the family's.
    pub fn of(dir: &ModelDir, unet: &UNet) -> anyhow::Result<Self> {
        let own = ModelDefaults::read(dir)?;
        let mut family = Self::of_files(dir, unet)?;
        if let Some(g) = own.default_guidance {
            family.default_guidance = g;
        }
        family.default_steps = own.default_steps.unwrap_or(0);
        Ok(family)
    }

    fn of_files(dir: &ModelDir, unet: &UNet) -> anyhow::Result<Self> {
        let Some((time_dim, input_dim)) = unet.config().text_time() else {
            return Ok(Family {
                pooled_dim: 0,
                time_ids_len: 0,
                force_zeros: false,
                requires_aesthetics: false,
                default_guidance: 7.5,
                default_steps: 0,
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
            default_steps: 0,
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
    fn a_models_own_defaults_are_read_and_checked() {
        let d =
            ModelDefaults::parse(r#"{"default_steps": 25, "default_guidance": 4.0, "about": "x"}"#)
                .unwrap();
        assert_eq!((d.default_steps, d.default_guidance), (Some(25), Some(4.0)));
        assert_eq!(
            ModelDefaults::parse("{}").unwrap(),
            ModelDefaults::default()
        );
        for bad in [
            r#"{"default_steps": 0}"#,
            r#"{"default_steps": 5000}"#,
            r#"{"default_guidance": -1}"#,
            r#"{"default_steps": "many"}"#,
            "not json",
        ] {
            assert!(ModelDefaults::parse(bad).is_err(), "{bad}");
        }
    }

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
