//! The UNet's keys: LDM's `input_blocks`/`middle_block`/`output_blocks`
//! to diffusers' names and back (kohya LoRA files use the original names).

use super::*;

/// An LDM ResBlock's names in diffusers' ResnetBlock2D.
pub(super) fn unet_resnet(leaf: &str) -> String {
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
pub(super) fn unet(keys: &[&str], layers_per_block: usize) -> HashMap<String, Alias> {
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

pub(super) fn split3(s: &str) -> Option<(usize, usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    let (j, leaf) = rest.split_once('.')?;
    Some((i.parse().ok()?, j.parse().ok()?, leaf))
}

pub(super) fn unet_name(rest: &str, per: usize) -> Option<String> {
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
