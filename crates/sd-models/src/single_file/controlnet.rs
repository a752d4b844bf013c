//! A ControlNet in its original layout (ControlNet 1.0/1.1, the SDXL
//! ControlNets as published): the UNet encoder's LDM names under
//! `control_model.`, with the hint embedding (`input_hint_block`), the
//! zero convolutions (`zero_convs`) and the mid block's (`middle_block_out`)
//! beside them — served under diffusers' `ControlNetModel` names.

use super::*;

/// diffusers' name → the stored tensor, for every tensor under `prefix`
/// (`control_model.`, or none as some conversions store them;
/// `layers_per_block` as the UNet's).
pub fn aliases(keys: &[String], prefix: &str, layers_per_block: usize) -> HashMap<String, Alias> {
    // The hint embedding's convolutions sit at even indices of a
    // Sequential (SiLUs between): the first is conv_in, the last conv_out.
    let hint_indices: Vec<usize> = keys
        .iter()
        .filter_map(|k| {
            let rest = k.strip_prefix(prefix)?.strip_prefix("input_hint_block.")?;
            rest.split_once('.')?.0.parse().ok()
        })
        .collect();
    let last_hint = hint_indices.iter().copied().max().unwrap_or(0);
    let mut m = HashMap::new();
    for k in keys {
        let Some(rest) = k.strip_prefix(prefix) else {
            continue;
        };
        if let Some(name) = name(rest, layers_per_block + 1, last_hint) {
            m.insert(name, Alias::same(k.as_str()));
        }
    }
    m
}

/// The diffusers name of `rest` (a key past `control_model.`).
fn name(rest: &str, per: usize, last_hint: usize) -> Option<String> {
    if let Some(s) = rest.strip_prefix("input_hint_block.") {
        let (i, leaf) = s.split_once('.')?;
        let i: usize = i.parse().ok()?;
        return Some(match i {
            0 => format!("controlnet_cond_embedding.conv_in.{leaf}"),
            i if i == last_hint => format!("controlnet_cond_embedding.conv_out.{leaf}"),
            i => format!("controlnet_cond_embedding.blocks.{}.{leaf}", i / 2 - 1),
        });
    }
    if let Some(s) = rest.strip_prefix("zero_convs.") {
        let (i, leaf) = s.split_once('.')?;
        let leaf = leaf.strip_prefix("0.")?;
        return Some(format!("controlnet_down_blocks.{i}.{leaf}"));
    }
    if let Some(leaf) = rest.strip_prefix("middle_block_out.0.") {
        return Some(format!("controlnet_mid_block.{leaf}"));
    }
    unet_name(rest, per)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_names_map_to_diffusers_names() {
        let keys: Vec<String> = [
            "control_model.input_hint_block.0.weight",
            "control_model.input_hint_block.2.bias",
            "control_model.input_hint_block.12.weight",
            "control_model.input_hint_block.14.weight",
            "control_model.zero_convs.3.0.weight",
            "control_model.middle_block_out.0.bias",
            "control_model.input_blocks.0.0.weight",
            "control_model.input_blocks.1.1.proj_in.weight",
            "control_model.input_blocks.3.0.op.weight",
            "control_model.middle_block.2.in_layers.2.weight",
            "control_model.time_embed.0.weight",
            "control_model.label_emb.0.0.weight",
            "model.diffusion_model.out.2.weight",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let m = aliases(&keys, "control_model.", 2);
        let want = [
            ("controlnet_cond_embedding.conv_in.weight", 0),
            ("controlnet_cond_embedding.blocks.0.bias", 1),
            ("controlnet_cond_embedding.blocks.5.weight", 2),
            ("controlnet_cond_embedding.conv_out.weight", 3),
            ("controlnet_down_blocks.3.weight", 4),
            ("controlnet_mid_block.bias", 5),
            ("conv_in.weight", 6),
            ("down_blocks.0.attentions.0.proj_in.weight", 7),
            ("down_blocks.0.downsamplers.0.conv.weight", 8),
            ("mid_block.resnets.1.conv1.weight", 9),
            ("time_embedding.linear_1.weight", 10),
            ("add_embedding.linear_1.weight", 11),
        ];
        for (name, i) in want {
            assert_eq!(
                m.get(name).map(|a| a.source.as_str()),
                Some(keys[i].as_str()),
                "{name}"
            );
        }
        assert_eq!(
            m.len(),
            want.len(),
            "the UNet's own tensors are not the ControlNet's"
        );
    }
}
