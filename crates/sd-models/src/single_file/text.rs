//! The text encoders' keys: transformers' CLIP (SD 1.x, SDXL's first)
//! as stored, OpenCLIP (SD 2.x, SDXL's second) with its fused q/k/v.

use super::*;

pub(super) fn text_encoder(
    w: &Weights,
    keys: &[&str],
    c: Component,
) -> Result<HashMap<String, Alias>> {
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
pub(super) fn clip(keys: &[&str], prefix: &str) -> HashMap<String, Alias> {
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
pub(super) fn open_clip(w: &Weights, keys: &[&str], prefix: &str) -> HashMap<String, Alias> {
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
