//! The VAE's keys: LDM's encoder and reversed decoder blocks, its 1×1
//! convolution attention flattened.

use super::*;

/// The LDM autoencoder under `prefix` in diffusers' AutoencoderKL names;
/// the decoder's `up.{i}` is `up_blocks.{n-1-i}`.
pub(super) fn vae(
    w: &Weights,
    keys: &[&str],
    prefix: &str,
    blocks: usize,
) -> HashMap<String, Alias> {
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
pub(super) fn vae_name(rest: &str, blocks: usize) -> Option<(String, bool)> {
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
