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
}

impl Standard {
    pub fn name(self) -> &'static str {
        match self {
            Standard::Sd1 => "sd-v1",
            Standard::Sd2 => "sd-v2",
            Standard::SdxlBase => "sdxl-base",
            Standard::SdxlRefiner => "sdxl-refiner",
        }
    }

    /// Infer the standard model from the file's keys and shapes: the text
    /// encoders' prefixes, and diffusers' marker keys
    /// (`infer_diffusers_model_type`) for files without a text encoder.
    pub fn infer(w: &Weights) -> Result<Standard> {
        let v2 = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight";
        let inpaint = "model.diffusion_model.input_blocks.0.0.weight";
        let unsupported = |message: String| ModelError::Unsupported {
            path: w.path().to_path_buf(),
            message,
        };
        if w.stored_shape(inpaint)
            .is_some_and(|s| s.get(1) == Some(&9))
        {
            return Err(unsupported(
                "an inpainting checkpoint (a 9-channel UNet input); inpainting models are not served"
                    .into(),
            ));
        }
        let has = |prefix: &str| w.stored().any(|(k, _)| k.starts_with(prefix));
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
        Component::TextEncoder => text_encoder(w, &keys, c)?,
        Component::TextEncoder2 => text_encoder(w, &keys, c)?,
    };
    if map.is_empty() {
        return Err(ModelError::Unsupported {
            path: w.path().to_path_buf(),
            message: format!("no tensors for the {} in this file", c.dir()),
        });
    }
    Ok(map)
}

/// What the mapping needs from the model's configs.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub layers_per_block: usize,
    pub vae_blocks: usize,
}

fn text_encoder(w: &Weights, keys: &[&str], c: Component) -> Result<HashMap<String, Alias>> {
    let candidates: &[&str] = match c {
        Component::TextEncoder => &[
            "cond_stage_model.transformer.",
            "conditioner.embedders.0.transformer.",
            "cond_stage_model.model.",
        ],
        _ => &[
            "conditioner.embedders.1.model.",
            "conditioner.embedders.0.model.",
        ],
    };
    let Some(prefix) = candidates
        .iter()
        .find(|p| keys.iter().any(|k| k.starts_with(*p)))
    else {
        return Err(ModelError::Unsupported {
            path: w.path().to_path_buf(),
            message: format!(
                "no text encoder for {} (looked for {})",
                c.dir(),
                candidates.join("*, ")
            ),
        });
    };
    Ok(if prefix.ends_with(".model.") {
        open_clip(w, keys, prefix)
    } else {
        clip(keys, prefix)
    })
}

/// transformers' CLIP layout under `prefix` (older files lack `text_model.`).
fn clip(keys: &[&str], prefix: &str) -> HashMap<String, Alias> {
    let mut m = HashMap::new();
    for k in keys {
        let Some(rest) = k.strip_prefix(prefix) else {
            continue;
        };
        let name = if rest.starts_with("text_model.") || rest.starts_with("text_projection") {
            rest.to_string()
        } else {
            format!("text_model.{rest}")
        };
        m.insert(name, Alias::same(*k));
    }
    m
}

/// OpenCLIP's text tower under `prefix`: fused q/k/v, `text_projection`
/// stored `[width, projection]`.
fn open_clip(w: &Weights, keys: &[&str], prefix: &str) -> HashMap<String, Alias> {
    let mut m = HashMap::new();
    let add = |m: &mut HashMap<String, Alias>, name: String, source: &str, t: Transform| {
        m.insert(
            name,
            Alias {
                source: source.to_string(),
                transform: t,
            },
        );
    };
    for k in keys {
        let Some(rest) = k.strip_prefix(prefix) else {
            continue;
        };
        let fixed = match rest {
            "token_embedding.weight" => Some("text_model.embeddings.token_embedding.weight"),
            "positional_embedding" => Some("text_model.embeddings.position_embedding.weight"),
            "ln_final.weight" => Some("text_model.final_layer_norm.weight"),
            "ln_final.bias" => Some("text_model.final_layer_norm.bias"),
            _ => None,
        };
        if let Some(name) = fixed {
            add(&mut m, name.to_string(), k, Transform::Same);
            continue;
        }
        if rest == "text_projection" {
            add(
                &mut m,
                "text_projection.weight".into(),
                k,
                Transform::Transpose,
            );
            continue;
        }
        let Some(block) = rest.strip_prefix("transformer.resblocks.") else {
            continue;
        };
        let Some((i, leaf)) = block.split_once('.') else {
            continue;
        };
        let layer = format!("text_model.encoder.layers.{i}");
        if let Some(which) = leaf.strip_prefix("attn.in_proj_") {
            // weight [3d, d] or bias [3d]: q, k, v in that order
            let Some(&rows) = w.stored_shape(k).and_then(|s| s.first()) else {
                continue;
            };
            let d = rows / 3;
            for (j, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                add(
                    &mut m,
                    format!("{layer}.self_attn.{p}.{which}"),
                    k,
                    Transform::Rows {
                        start: j as i64 * d,
                        len: d,
                    },
                );
            }
            continue;
        }
        let renamed = leaf
            .replacen("ln_1.", "layer_norm1.", 1)
            .replacen("ln_2.", "layer_norm2.", 1)
            .replacen("mlp.c_fc.", "mlp.fc1.", 1)
            .replacen("mlp.c_proj.", "mlp.fc2.", 1)
            .replacen("attn.out_proj.", "self_attn.out_proj.", 1);
        add(&mut m, format!("{layer}.{renamed}"), k, Transform::Same);
    }
    m
}

/// An LDM ResBlock's names in diffusers' ResnetBlock2D.
fn unet_resnet(leaf: &str) -> String {
    for (from, to) in [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ] {
        if let Some(rest) = leaf.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    leaf.to_string()
}

/// `input_blocks.{i}.{j}.…`, `middle_block.{j}.…`, `output_blocks.{i}.{j}.…`
/// to diffusers' `down_blocks`/`mid_block`/`up_blocks`, with
/// `layers_per_block` ResBlocks per level (+1 for the downsampler going
/// down, +1 ResBlock coming up).
fn unet(keys: &[&str], layers_per_block: usize) -> HashMap<String, Alias> {
    let mut m = HashMap::new();
    let per = layers_per_block + 1;
    for k in keys {
        let Some(rest) = k.strip_prefix(UNET_PREFIX) else {
            continue;
        };
        if let Some(name) = unet_name(rest, per) {
            m.insert(name, Alias::same(*k));
        }
    }
    m
}

fn split3(s: &str) -> Option<(usize, usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    let (j, leaf) = rest.split_once('.')?;
    Some((i.parse().ok()?, j.parse().ok()?, leaf))
}

fn unet_name(rest: &str, per: usize) -> Option<String> {
    for (from, to) in [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ] {
        if let Some(leaf) = rest.strip_prefix(from) {
            return Some(format!("{to}{leaf}"));
        }
    }
    if let Some(s) = rest.strip_prefix("input_blocks.") {
        let (i, j, leaf) = split3(s)?;
        let (block, layer) = ((i - 1) / per, (i - 1) % per);
        return Some(match (j, leaf.strip_prefix("op.")) {
            (0, Some(op)) => format!("down_blocks.{block}.downsamplers.0.conv.{op}"),
            (0, None) => format!("down_blocks.{block}.resnets.{layer}.{}", unet_resnet(leaf)),
            (1, _) => format!("down_blocks.{block}.attentions.{layer}.{leaf}"),
            _ => return None,
        });
    }
    if let Some(s) = rest.strip_prefix("middle_block.") {
        let (j, leaf) = s.split_once('.')?;
        return Some(match j {
            "0" => format!("mid_block.resnets.0.{}", unet_resnet(leaf)),
            "1" => format!("mid_block.attentions.0.{leaf}"),
            "2" => format!("mid_block.resnets.1.{}", unet_resnet(leaf)),
            _ => return None,
        });
    }
    if let Some(s) = rest.strip_prefix("output_blocks.") {
        let (i, j, leaf) = split3(s)?;
        let (block, layer) = (i / per, i % per);
        return Some(match (j, leaf.strip_prefix("conv.")) {
            (0, _) => format!("up_blocks.{block}.resnets.{layer}.{}", unet_resnet(leaf)),
            (1 | 2, Some(conv)) => format!("up_blocks.{block}.upsamplers.0.conv.{conv}"),
            (1, None) => format!("up_blocks.{block}.attentions.{layer}.{leaf}"),
            _ => return None,
        });
    }
    None
}

/// A UNet module's path in the original (LDM/SGM) numbering, for kohya
/// LoRA files that name blocks that way (`input_blocks_4_1_…`): the reverse
/// of [`unet_name`]. An upsampler is `.1.conv` after a block without
/// attention and `.2.conv` after one with: both are given.
pub fn unet_ldm_names(path: &str, layers_per_block: usize) -> Vec<String> {
    let per = layers_per_block + 1;
    let resnet = |leaf: &str| -> String {
        for (to, from) in [
            ("in_layers.0", "norm1"),
            ("in_layers.2", "conv1"),
            ("emb_layers.1", "time_emb_proj"),
            ("out_layers.0", "norm2"),
            ("out_layers.3", "conv2"),
            ("skip_connection", "conv_shortcut"),
        ] {
            if leaf == from {
                return to.to_string();
            }
            if let Some(rest) = leaf.strip_prefix(from).and_then(|r| r.strip_prefix('.')) {
                return format!("{to}.{rest}");
            }
        }
        leaf.to_string()
    };
    for (from, to) in [
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_in", "input_blocks.0.0"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ] {
        if path == from {
            return vec![to.to_string()];
        }
    }
    let parts: Vec<&str> = path.splitn(5, '.').collect();
    let num = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok());
    let tail = |i: usize| parts.get(i).copied().unwrap_or("");
    match (parts.first().copied(), parts.get(2).copied()) {
        (Some("down_blocks"), Some(kind)) => {
            let (Some(b), Some(l)) = (num(1), num(3)) else {
                return vec![];
            };
            match kind {
                "resnets" => vec![format!(
                    "input_blocks.{}.0.{}",
                    1 + b * per + l,
                    resnet(tail(4))
                )],
                "attentions" => vec![format!("input_blocks.{}.1.{}", 1 + b * per + l, tail(4))],
                "downsamplers" if tail(4) == "conv" => {
                    vec![format!(
                        "input_blocks.{}.0.op",
                        1 + b * per + layers_per_block
                    )]
                }
                _ => vec![],
            }
        }
        (Some("up_blocks"), Some(kind)) => {
            let (Some(b), Some(l)) = (num(1), num(3)) else {
                return vec![];
            };
            match kind {
                "resnets" => vec![format!(
                    "output_blocks.{}.0.{}",
                    b * per + l,
                    resnet(tail(4))
                )],
                "attentions" => vec![format!("output_blocks.{}.1.{}", b * per + l, tail(4))],
                "upsamplers" if tail(4) == "conv" => {
                    let i = b * per + layers_per_block;
                    vec![
                        format!("output_blocks.{i}.1.conv"),
                        format!("output_blocks.{i}.2.conv"),
                    ]
                }
                _ => vec![],
            }
        }
        (Some("mid_block"), Some(_)) => {
            let rest: Vec<&str> = path.splitn(4, '.').collect();
            let (Some(kind), Some(i), leaf) =
                (rest.get(1), rest.get(2), rest.get(3).copied().unwrap_or(""))
            else {
                return vec![];
            };
            match (*kind, *i) {
                ("resnets", "0") => vec![format!("middle_block.0.{}", resnet(leaf))],
                ("resnets", "1") => vec![format!("middle_block.2.{}", resnet(leaf))],
                ("attentions", "0") => vec![format!("middle_block.1.{leaf}")],
                _ => vec![],
            }
        }
        _ => vec![],
    }
}

/// The LDM autoencoder under `prefix` in diffusers' AutoencoderKL names;
/// the decoder's `up.{i}` is `up_blocks.{n-1-i}`.
fn vae(w: &Weights, keys: &[&str], prefix: &str, blocks: usize) -> HashMap<String, Alias> {
    let mut m = HashMap::new();
    for k in keys {
        let Some(rest) = k.strip_prefix(prefix) else {
            continue;
        };
        let Some((name, attn)) = vae_name(rest, blocks) else {
            continue;
        };
        let flatten =
            attn && rest.ends_with(".weight") && w.stored_shape(k).is_some_and(|s| s.len() == 4);
        m.insert(
            name,
            Alias {
                source: k.to_string(),
                transform: if flatten {
                    Transform::Flatten1x1
                } else {
                    Transform::Same
                },
            },
        );
    }
    m
}

/// The diffusers name of an LDM VAE key, and whether it is an attention
/// projection (a 1×1 convolution in the LDM file, linear in diffusers).
fn vae_name(rest: &str, blocks: usize) -> Option<(String, bool)> {
    let (side, tail) = rest.split_once('.')?;
    if !matches!(side, "encoder" | "decoder") {
        return matches!(side, "quant_conv" | "post_quant_conv").then(|| (rest.to_string(), false));
    }
    let resnet = |leaf: &str| leaf.replacen("nin_shortcut.", "conv_shortcut.", 1);
    let named = |s: String| Some((format!("{side}.{s}"), false));
    if let Some(leaf) = tail.strip_prefix("norm_out.") {
        return named(format!("conv_norm_out.{leaf}"));
    }
    if tail.starts_with("conv_in.") || tail.starts_with("conv_out.") {
        return named(tail.to_string());
    }
    if let Some(mid) = tail.strip_prefix("mid.") {
        if let Some(leaf) = mid.strip_prefix("block_1.") {
            return named(format!("mid_block.resnets.0.{}", resnet(leaf)));
        }
        if let Some(leaf) = mid.strip_prefix("block_2.") {
            return named(format!("mid_block.resnets.1.{}", resnet(leaf)));
        }
        let leaf = mid.strip_prefix("attn_1.")?;
        let (part, p) = leaf.split_once('.')?;
        let to = match part {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        return Some((
            format!("{side}.mid_block.attentions.0.{to}.{p}"),
            part != "norm",
        ));
    }
    let (level, block_tail) = match side {
        "encoder" => tail.strip_prefix("down.")?.split_once('.')?,
        _ => tail.strip_prefix("up.")?.split_once('.')?,
    };
    let level: usize = level.parse().ok()?;
    let (kind, blocks_name) = match side {
        "encoder" => (level, "down_blocks"),
        _ => (blocks.checked_sub(level + 1)?, "up_blocks"),
    };
    if let Some(s) = block_tail.strip_prefix("block.") {
        let (j, leaf) = s.split_once('.')?;
        return named(format!("{blocks_name}.{kind}.resnets.{j}.{}", resnet(leaf)));
    }
    for sampler in ["downsample.", "upsample."] {
        if let Some(leaf) = block_tail.strip_prefix(sampler) {
            let which = if sampler == "downsample." {
                "downsamplers"
            } else {
                "upsamplers"
            };
            return named(format!("{blocks_name}.{kind}.{which}.0.{leaf}"));
        }
    }
    None
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
