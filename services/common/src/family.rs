//! What a model's family changes in the pipeline, read from its files: the
//! family's parameters as the denoiser publishes them (the SDXL family's
//! added conditioning, the refiner's time ids), the default guidance and
//! steps, and the VAE's precision.

use sd_models::{Component, Denoiser, Family, GuidanceInput, ModelDir, Placement};
use sd_proto::v1::denoiser_info::FamilyParams;
use sd_proto::v1::{FluxParams, KleinParams, SdParams, SdxlParams, ZImageParams};
use tch::Kind;

/// What the model's family changes in the pipeline, as diffusers'
/// pipelines have it, with the model's own defaults.
pub struct Profile {
    pub family: Family,
    /// The family's own parameters (the proto's `family_params`).
    pub params: FamilyParams,
    /// The guidance diffusers' pipeline for this family defaults to, or
    /// the model's own (`sdserve.json`).
    pub default_guidance: f32,
    /// The model's own step count (`sdserve.json`; 0: none, the gateway's).
    pub default_steps: u32,
    /// Prompts the model draws well (`sdserve.json`'s `example_prompts`).
    pub example_prompts: Vec<String>,
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
    /// Prompts it draws well (a page proposes the first).
    #[serde(default)]
    pub example_prompts: Vec<String>,
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
        anyhow::ensure!(
            d.example_prompts.len() <= 32 && d.example_prompts.iter().all(|p| p.len() <= 1000),
            "example_prompts: at most 32 prompts of at most 1000 bytes"
        );
        Ok(d)
    }
}

/// The components whose weights make a model's identity.
pub fn components(family: Family) -> &'static [Component] {
    match family {
        Family::Sd => &[Component::TextEncoder, Component::Unet, Component::Vae],
        Family::Sdxl => &[
            Component::TextEncoder,
            Component::TextEncoder2,
            Component::Unet,
            Component::Vae,
        ],
        Family::Flux => &[
            Component::TextEncoder,
            Component::TextEncoder2,
            Component::Transformer,
            Component::Vae,
        ],
        Family::Klein | Family::ZImage => &[
            Component::TextEncoder,
            Component::Transformer,
            Component::Vae,
        ],
    }
}

/// The most T5 tokens FLUX's pipelines take (`max_sequence_length`).
pub const FLUX_MAX_SEQUENCE_LENGTH: u32 = 512;

impl Profile {
    /// The profile of the model in `dir` whose network is `net`, with the
    /// model's own defaults over the family's.
    pub fn of(dir: &ModelDir, net: &Denoiser) -> anyhow::Result<Self> {
        let own = ModelDefaults::read(dir)?;
        let mut profile = Self::of_files(dir, net)?;
        if let Some(g) = own.default_guidance {
            profile.default_guidance = g;
        }
        if let Some(steps) = own.default_steps {
            profile.default_steps = steps;
        }
        profile.example_prompts = own.example_prompts;
        Ok(profile)
    }

    fn of_files(dir: &ModelDir, net: &Denoiser) -> anyhow::Result<Self> {
        let family = dir.family();
        let (params, default_guidance) = match family {
            Family::Sd => {
                anyhow::ensure!(
                    !net.takes_text_time(),
                    "unet/config.json: an SD pipeline whose UNet takes SDXL's added conditioning"
                );
                (FamilyParams::Sd(SdParams {}), 7.5)
            }
            Family::Sdxl => (FamilyParams::Sdxl(sdxl_params(dir, net)?), 5.0),
            // diffusers' FluxPipeline: guidance_scale 3.5 (schnell ignores it).
            Family::Flux => (
                FamilyParams::Flux(FluxParams {
                    pooled_dim: net.pooled_dim().ok_or_else(|| {
                        anyhow::anyhow!("a FLUX pipeline whose network is no FLUX transformer")
                    })? as u32,
                    max_sequence_length: FLUX_MAX_SEQUENCE_LENGTH,
                    guidance_distilled: net.guidance_input() == Some(GuidanceInput::Value),
                }),
                3.5,
            ),
            // diffusers' Flux2KleinPipeline: guidance_scale 4.0 (a distilled
            // model ignores it).
            Family::Klein => (
                FamilyParams::Klein(KleinParams {
                    text_layers: crate::text::KLEIN_TEXT_LAYERS
                        .iter()
                        .map(|&l| l as u32)
                        .collect(),
                    max_sequence_length: crate::text::KLEIN_MAX_SEQUENCE_LENGTH,
                    distilled: dir.is_distilled()?,
                }),
                4.0,
            ),
            // diffusers' ZImagePipeline: guidance_scale 5.0.
            Family::ZImage => (
                FamilyParams::Zimage(ZImageParams {
                    max_sequence_length: crate::text::QWEN_MAX_SEQUENCE_LENGTH,
                }),
                5.0,
            ),
        };
        // FLUX.1-dev's 28 steps (the pipeline's default); schnell is
        // distilled for 4.
        let default_steps = match &params {
            FamilyParams::Flux(p) if p.guidance_distilled => 28,
            FamilyParams::Flux(_) => 4,
            // The pipeline's 50; the distilled Klein models draw in 4.
            FamilyParams::Klein(p) if p.distilled => 4,
            FamilyParams::Klein(_) | FamilyParams::Zimage(_) => 50,
            FamilyParams::Sd(_) | FamilyParams::Sdxl(_) => 0,
        };
        Ok(Profile {
            family,
            params,
            default_guidance,
            default_steps,
            example_prompts: Vec::new(),
        })
    }
}

/// SDXL: original size, crop and target size; the refiner: original size,
/// crop and an aesthetic score. The rest of add_embedding's width is the
/// pooled embedding.
fn sdxl_params(dir: &ModelDir, net: &Denoiser) -> anyhow::Result<SdxlParams> {
    let (time_dim, input_dim) = net.text_time_dims().ok_or_else(|| {
        anyhow::anyhow!(
            "unet/config.json: an SDXL pipeline whose UNet takes no added conditioning \
             (addition_embed_type \"text_time\")"
        )
    })?;
    let requires_aesthetics = dir.requires_aesthetics_score()?;
    let n = if requires_aesthetics { 5 } else { 6 };
    let pooled_dim = input_dim - n * time_dim;
    anyhow::ensure!(
        pooled_dim > 0,
        "unet/config.json: projection_class_embeddings_input_dim {input_dim} leaves no room \
         for a pooled embedding beside {n} time ids of {time_dim}"
    );
    Ok(SdxlParams {
        pooled_dim: pooled_dim as u32,
        time_ids_len: n as u32,
        requires_aesthetics_score: requires_aesthetics,
        force_zeros_for_empty_prompt: dir.force_zeros_for_empty_prompt()?,
    })
}

/// diffusers' SDXL pipelines decode in fp32 when the VAE is in fp16 and
/// its config says `force_upcast` (SDXL's VAE overflows in fp16); the SD
/// 1.x/2.x pipelines never do.
pub fn vae_placement(placement: Placement, family: Family, force_upcast: bool) -> Placement {
    let upcasts = match family {
        Family::Sd => false,
        Family::Sdxl => force_upcast,
        // The FLUX pipelines decode in the VAE's own precision.
        Family::Flux | Family::Klein | Family::ZImage => false,
    };
    if upcasts && placement.kind == Kind::Half {
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
        assert_eq!(vae_placement(half, Family::Sdxl, true).kind, Kind::Float);
        assert_eq!(vae_placement(half, Family::Sdxl, false).kind, Kind::Half);
        assert_eq!(vae_placement(half, Family::Sd, true).kind, Kind::Half);
        let bf16 = Placement {
            kind: Kind::BFloat16,
            ..half
        };
        assert_eq!(vae_placement(bf16, Family::Sdxl, true).kind, Kind::BFloat16);
    }
}
