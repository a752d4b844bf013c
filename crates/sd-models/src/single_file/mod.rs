//! Single-file checkpoints: the whole pipeline in one `.safetensors` file in
//! the original CompVis/Stability layout, as community models are shared.
//!
//! Nothing is converted on disk: each network opens the file and is served
//! its tensors under diffusers' names through an alias table built here from
//! the file's keys (diffusers' own mapping, `loaders/single_file_utils.py`),
//! so the memory map is shared and each service touches only its part.
//!
//! | network | stored under | layout |
//! |---|---|---|
//! | UNet | `model.diffusion_model.` | LDM: `input_blocks`/`middle_block`/`output_blocks` |
//! | VAE | `first_stage_model.` (or `vae.`) | LDM: `encoder.down`, reversed `decoder.up`, 1×1-conv attention |
//! | text encoder (SD 1.x) | `cond_stage_model.transformer.` | transformers' CLIP |
//! | text encoder (SD 2.x) | `cond_stage_model.model.` | OpenCLIP, fused q/k/v |
//! | SDXL text encoders | `conditioner.embedders.0.transformer.`, `.1.model.` | CLIP, OpenCLIP |
//! | SDXL refiner text encoder | `conditioner.embedders.0.model.` | OpenCLIP |
//!
//! What diffusers ignores is never asked for: EMA copies (`model_ema.*`),
//! training buffers (`betas`, `alphas_cumprod`, …), `position_ids`,
//! `logit_scale`, the OpenCLIP block SD 2.x does not use.

use std::collections::HashMap;

use crate::component::Component;
use crate::error::{ModelError, Result};
use crate::weights::{Alias, Transform, Weights};

pub mod controlnet;
pub mod flux;
mod text;
mod unet;
mod vae;

use text::*;
pub use unet::unet_ldm_names;
use unet::*;
use vae::*;

pub const UNET_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];

/// The standard models a single file is recognised as, each served with its
/// shipped configs (whose `model_index.json` names its [`sd_proto::Family`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standard {
    /// SD 1.x: CLIP ViT-L/14, 768-wide cross-attention.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H/14, 1024-wide cross-attention; served with
    /// stable-diffusion-2-1's config (768², v-prediction) as diffusers does;
    /// a 512² epsilon model (2-base) needs `--config`.
    Sd2,
    /// SDXL base: CLIP ViT-L + OpenCLIP ViT-bigG.
    SdxlBase,
    /// SDXL refiner: OpenCLIP ViT-bigG only.
    SdxlRefiner,
    /// The inpainting checkpoints of SD 1.x, SD 2.x and SDXL: their base's
    /// configs with a 9-channel UNet input (the latents, a mask, the masked
    /// image's latents) and the inpainting pipeline's class; SD 2's as
    /// stable-diffusion-2-inpainting (512², epsilon).
    Sd1Inpaint,
    Sd2Inpaint,
    SdxlInpaint,
}

impl Standard {
    pub fn name(self) -> &'static str {
        match self {
            Standard::Sd1 => "sd-v1",
            Standard::Sd2 => "sd-v2",
            Standard::SdxlBase => "sdxl-base",
            Standard::SdxlRefiner => "sdxl-refiner",
            Standard::Sd1Inpaint => "sd-v1-inpaint",
            Standard::Sd2Inpaint => "sd-v2-inpaint",
            Standard::SdxlInpaint => "sdxl-inpaint",
        }
    }

    /// An inpainting standard: (its base, the pipeline class it is served as).
    pub fn inpaint_base(self) -> Option<(Standard, &'static str)> {
        match self {
            Standard::Sd1Inpaint => Some((Standard::Sd1, "StableDiffusionInpaintPipeline")),
            Standard::Sd2Inpaint => Some((Standard::Sd2, "StableDiffusionInpaintPipeline")),
            Standard::SdxlInpaint => Some((Standard::SdxlBase, "StableDiffusionXLInpaintPipeline")),
            _ => None,
        }
    }

    /// The inpainting standard of a base (None: the refiner has none).
    fn inpainting(self) -> Option<Standard> {
        match self {
            Standard::Sd1 => Some(Standard::Sd1Inpaint),
            Standard::Sd2 => Some(Standard::Sd2Inpaint),
            Standard::SdxlBase => Some(Standard::SdxlInpaint),
            _ => None,
        }
    }

    /// Infer the standard model from the file's keys and shapes: the text
    /// encoders' prefixes, and diffusers' marker keys
    /// (`infer_diffusers_model_type`) for files without a text encoder.
    pub fn infer(w: &Weights) -> Result<Standard> {
        let base = Standard::infer_base(w)?;
        let inpaint = "model.diffusion_model.input_blocks.0.0.weight";
        if w.stored_shape(inpaint)
            .is_some_and(|s| s.get(1) == Some(&9))
        {
            return base.inpainting().ok_or_else(|| ModelError::Unsupported {
                path: w.path().to_path_buf(),
                message: format!(
                    "a 9-channel (inpainting) UNet in a {} checkpoint",
                    base.name()
                ),
            });
        }
        Ok(base)
    }

    fn infer_base(w: &Weights) -> Result<Standard> {
        let v2 = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight";
        let unsupported = |message: String| ModelError::Unsupported {
            path: w.path().to_path_buf(),
            message,
        };
        let has = |prefix: &str| w.stored().any(|(k, _)| k.starts_with(prefix));
        if flux::bfl_prefix(w).is_some() {
            return Err(unsupported(
                "a FLUX checkpoint: serve it with --config naming a FLUX.1 model directory in the \
                 diffusers layout (its configs and tokenizers; its weights are not read), or serve \
                 the transformer alone with --transformer beside such a directory"
                    .into(),
            ));
        }
        // The text encoders tell the families apart (diffusers' marker keys
        // are one block of each, which a pruned or small file may lack).
        if has("conditioner.embedders.1.model.") {
            return Ok(Standard::SdxlBase);
        }
        if has("conditioner.embedders.0.model.") {
            return Ok(Standard::SdxlRefiner);
        }
        if has("cond_stage_model.model.")
            || w.stored_shape(v2).and_then(|s| s.last()) == Some(&1024)
        {
            return Ok(Standard::Sd2);
        }
        if has("cond_stage_model.transformer.")
            || w.contains("model.diffusion_model.output_blocks.11.0.skip_connection.weight")
        {
            return Ok(Standard::Sd1);
        }
        if !w.stored().any(|(k, _)| k.starts_with(UNET_PREFIX)) {
            return Err(unsupported(format!(
                "no `{UNET_PREFIX}*` tensors: not a Stable Diffusion single-file checkpoint \
                 (a LoRA, a VAE or a diffusers-layout file?)"
            )));
        }
        Err(unsupported(
            "the architecture is none of SD 1.x, SD 2.x, SDXL base or refiner; \
             pass --config with a diffusers model directory that describes it"
                .into(),
        ))
    }
}

/// The alias table serving component `c` from a single file, or an error
/// naming what the file lacks. `layers_per_block` is the UNet's (from its
/// config); `up_blocks` the VAE decoder's number of blocks.
pub fn aliases(w: &Weights, c: Component, layout: &Layout) -> Result<HashMap<String, Alias>> {
    let keys: Vec<&str> = w.stored().map(|(k, _)| k).collect();
    let map = match c {
        Component::Unet => unet(&keys, layout.layers_per_block),
        Component::Vae => {
            let prefix = VAE_PREFIXES
                .into_iter()
                .find(|p| keys.iter().any(|k| k.starts_with(p)))
                .unwrap_or(VAE_PREFIXES[0]);
            vae(w, &keys, prefix, layout.vae_blocks)
        }
        // ComfyUI's FLUX all-in-one: CLIP-L and T5 under `text_encoders.`.
        Component::TextEncoder if has_prefix(&keys, COMFY_CLIP_L) => clip(&keys, COMFY_CLIP_L),
        Component::TextEncoder2 if has_prefix(&keys, COMFY_T5) => stripped(&keys, COMFY_T5),
        Component::TextEncoder => text_encoder(w, &keys, c)?,
        Component::TextEncoder2 => text_encoder(w, &keys, c)?,
        Component::Transformer => match flux::bfl_prefix(w) {
            Some(prefix) => flux::bfl_aliases(w, prefix)?,
            None => HashMap::new(),
        },
    };
    if map.is_empty() {
        return Err(ModelError::Unsupported {
            path: w.path().to_path_buf(),
            message: format!("no tensors for the {} in this file", c.dir()),
        });
    }
    Ok(map)
}

/// ComfyUI's all-in-one FLUX files: where the text encoders are.
const COMFY_CLIP_L: &str = "text_encoders.clip_l.transformer.";
const COMFY_T5: &str = "text_encoders.t5xxl.transformer.";

fn has_prefix(keys: &[&str], prefix: &str) -> bool {
    keys.iter().any(|k| k.starts_with(prefix))
}

/// The tensors under `prefix`, served under the rest of their names.
fn stripped(keys: &[&str], prefix: &str) -> HashMap<String, Alias> {
    keys.iter()
        .filter_map(|k| Some((k.strip_prefix(prefix)?.to_string(), Alias::same(*k))))
        .collect()
}

/// What the mapping needs from the model's configs.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub layers_per_block: usize,
    pub vae_blocks: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_names_follow_the_ldm_numbering() {
        let per = 3; // layers_per_block 2
        let cases = [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.bias",
                "down_blocks.1.resnets.0.conv_shortcut.bias",
            ),
            (
                "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
                "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "middle_block.2.out_layers.3.weight",
                "mid_block.resnets.1.conv2.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.5.1.norm.weight",
                "up_blocks.1.attentions.2.norm.weight",
            ),
            (
                "output_blocks.11.0.emb_layers.1.weight",
                "up_blocks.3.resnets.2.time_emb_proj.weight",
            ),
            ("out.2.weight", "conv_out.weight"),
            ("label_emb.0.2.bias", "add_embedding.linear_2.bias"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(unet_name(ldm, per).as_deref(), Some(diffusers), "{ldm}");
        }
        assert_eq!(unet_name("betas", per), None);
    }

    #[test]
    fn ldm_module_names_invert_the_single_file_mapping() {
        for path in [
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.0.resnets.1.conv1",
            "down_blocks.2.resnets.0.conv_shortcut",
            "down_blocks.0.downsamplers.0.conv",
            "mid_block.attentions.0.proj_in",
            "mid_block.resnets.1.time_emb_proj",
            "up_blocks.3.resnets.2.conv2",
            "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.2",
            "up_blocks.0.upsamplers.0.conv",
            "time_embedding.linear_1",
            "add_embedding.linear_2",
        ] {
            let names = unet_ldm_names(path, 2);
            assert!(!names.is_empty(), "{path}");
            for ldm in names {
                assert_eq!(
                    unet_name(&format!("{ldm}.weight"), 3).as_deref(),
                    Some(format!("{path}.weight").as_str()),
                    "{path} → {ldm}"
                );
            }
        }
    }

    #[test]
    fn vae_names_reverse_the_decoder_and_mark_attention() {
        let cases = [
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                false,
            ),
            (
                "encoder.down.0.downsample.conv.bias",
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
                false,
            ),
            (
                "decoder.up.3.block.2.conv1.weight",
                "decoder.up_blocks.0.resnets.2.conv1.weight",
                false,
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                false,
            ),
            (
                "decoder.mid.attn_1.proj_out.weight",
                "decoder.mid_block.attentions.0.to_out.0.weight",
                true,
            ),
            (
                "encoder.mid.attn_1.norm.bias",
                "encoder.mid_block.attentions.0.group_norm.bias",
                false,
            ),
            (
                "encoder.norm_out.weight",
                "encoder.conv_norm_out.weight",
                false,
            ),
            ("post_quant_conv.bias", "post_quant_conv.bias", false),
        ];
        for (ldm, diffusers, attn) in cases {
            assert_eq!(
                vae_name(ldm, 4),
                Some((diffusers.to_string(), attn)),
                "{ldm}"
            );
        }
    }
}
