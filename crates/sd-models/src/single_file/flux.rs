//! FLUX.1's transformer in Black Forest Labs' original layout (the
//! `flux1-dev.safetensors` people download, and the same keys under
//! `model.diffusion_model.` in ComfyUI's all-in-one files), served under
//! diffusers' `FluxTransformer2DModel` names: the fused `qkv` of each
//! double-stream attention split into q, k and v, each single block's fused
//! `linear1` split into q, k, v and the MLP's input, and the final
//! modulation's halves swapped (BFL: shift then scale; diffusers: scale
//! then shift), as diffusers' own conversion does.

use std::collections::{BTreeSet, HashMap};

use crate::error::{ModelError, Result};
use crate::weights::{Alias, Transform, Weights};

/// The prefix ComfyUI's all-in-one files keep the transformer under.
pub const COMFY_PREFIX: &str = "model.diffusion_model.";

/// Refuse a file whose fp8 weights need per-tensor scales (ComfyUI's
/// `fp8_scaled` files: `scaled_fp8`, `*.scale_weight`, …): upcast without
/// them, the weights would be wrong with no error.
pub fn refuse_scaled_fp8(w: &Weights) -> Result<()> {
    let scaled = w.stored().find(|(k, _)| {
        *k == "scaled_fp8"
            || k.ends_with(".scaled_fp8")
            || k.ends_with(".scale_weight")
            || k.ends_with(".weight_scale")
            || k.ends_with(".scale_input")
            || k.ends_with(".input_scale")
    });
    match scaled {
        Some((k, _)) => Err(ModelError::Unsupported {
            path: w.path().to_path_buf(),
            message: format!(
                "scaled fp8 weights (`{k}`: per-tensor scales) are not read; use a plain fp8 \
                 (float8_e4m3fn), bf16 or fp16 file"
            ),
        }),
        None => Ok(()),
    }
}

/// Where the BFL transformer's keys start in `w` (`""` or
/// [`COMFY_PREFIX`]), or None when the file is not in that layout.
pub fn bfl_prefix(w: &Weights) -> Option<&'static str> {
    ["", COMFY_PREFIX]
        .into_iter()
        .find(|p| w.contains(&format!("{p}double_blocks.0.img_attn.qkv.weight")))
}

/// Block indices present under `{prefix}{kind}.N.`.
fn indices(keys: &[&str], prefix: &str, kind: &str) -> BTreeSet<usize> {
    let head = format!("{prefix}{kind}.");
    keys.iter()
        .filter_map(|k| k.strip_prefix(&head))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect()
}

/// An alias table being built, with the prefix of the file's keys.
struct Table<'a> {
    prefix: &'a str,
    map: HashMap<String, Alias>,
}

impl Table<'_> {
    fn same(&mut self, ours: String, theirs: &str) {
        self.map
            .insert(ours, Alias::same(format!("{}{theirs}", self.prefix)));
    }

    /// `ours.{weight,bias}` from `theirs.{weight,bias}`.
    fn both(&mut self, ours: &str, theirs: &str) {
        for leaf in ["weight", "bias"] {
            self.same(format!("{ours}.{leaf}"), &format!("{theirs}.{leaf}"));
        }
    }

    /// `ours.{weight,bias}` as rows `start..start + len` of `theirs`.
    fn rows(&mut self, ours: &str, theirs: &str, start: i64, len: i64) {
        for leaf in ["weight", "bias"] {
            self.map.insert(
                format!("{ours}.{leaf}"),
                Alias {
                    source: format!("{}{theirs}.{leaf}", self.prefix),
                    transform: Transform::Rows { start, len },
                },
            );
        }
    }

    fn double_block(&mut self, n: usize, dim: i64) {
        let (o, t) = (
            format!("transformer_blocks.{n}"),
            format!("double_blocks.{n}"),
        );
        for (ours, theirs) in [
            ("norm1.linear", "img_mod.lin"),
            ("norm1_context.linear", "txt_mod.lin"),
            ("attn.to_out.0", "img_attn.proj"),
            ("attn.to_add_out", "txt_attn.proj"),
            ("ff.net.0.proj", "img_mlp.0"),
            ("ff.net.2", "img_mlp.2"),
            ("ff_context.net.0.proj", "txt_mlp.0"),
            ("ff_context.net.2", "txt_mlp.2"),
        ] {
            self.both(&format!("{o}.{ours}"), &format!("{t}.{theirs}"));
        }
        for (ours, theirs) in [
            ("norm_q", "img_attn.norm.query_norm"),
            ("norm_k", "img_attn.norm.key_norm"),
            ("norm_added_q", "txt_attn.norm.query_norm"),
            ("norm_added_k", "txt_attn.norm.key_norm"),
        ] {
            self.same(
                format!("{o}.attn.{ours}.weight"),
                &format!("{t}.{theirs}.scale"),
            );
        }
        for (stream, names) in [
            ("img_attn", ["to_q", "to_k", "to_v"]),
            ("txt_attn", ["add_q_proj", "add_k_proj", "add_v_proj"]),
        ] {
            for (i, name) in names.iter().enumerate() {
                self.rows(
                    &format!("{o}.attn.{name}"),
                    &format!("{t}.{stream}.qkv"),
                    i as i64 * dim,
                    dim,
                );
            }
        }
    }

    fn single_block(&mut self, n: usize, dim: i64) {
        let (o, t) = (
            format!("single_transformer_blocks.{n}"),
            format!("single_blocks.{n}"),
        );
        self.both(&format!("{o}.norm.linear"), &format!("{t}.modulation.lin"));
        self.both(&format!("{o}.proj_out"), &format!("{t}.linear2"));
        self.same(
            format!("{o}.attn.norm_q.weight"),
            &format!("{t}.norm.query_norm.scale"),
        );
        self.same(
            format!("{o}.attn.norm_k.weight"),
            &format!("{t}.norm.key_norm.scale"),
        );
        for (name, start, len) in [
            ("attn.to_q", 0, dim),
            ("attn.to_k", dim, dim),
            ("attn.to_v", 2 * dim, dim),
            ("proj_mlp", 3 * dim, 4 * dim),
        ] {
            self.rows(&format!("{o}.{name}"), &format!("{t}.linear1"), start, len);
        }
    }
}

/// The alias table for a BFL-layout transformer under `prefix`.
pub fn bfl_aliases(w: &Weights, prefix: &str) -> Result<HashMap<String, Alias>> {
    let keys: Vec<&str> = w.stored().map(|(k, _)| k).collect();
    let img_in = format!("{prefix}img_in.weight");
    let dim = match w.stored_shape(&img_in) {
        Some([d, _]) => *d,
        _ => {
            return Err(ModelError::Unsupported {
                path: w.path().to_path_buf(),
                message: format!("no `{img_in}`: not a FLUX transformer in BFL's layout"),
            })
        }
    };
    let mut t = Table {
        prefix,
        map: HashMap::new(),
    };
    t.both("x_embedder", "img_in");
    t.both("context_embedder", "txt_in");
    t.both("proj_out", "final_layer.linear");
    for (ours, theirs) in [
        ("timestep_embedder", "time_in"),
        ("guidance_embedder", "guidance_in"),
        ("text_embedder", "vector_in"),
    ] {
        t.both(
            &format!("time_text_embed.{ours}.linear_1"),
            &format!("{theirs}.in_layer"),
        );
        t.both(
            &format!("time_text_embed.{ours}.linear_2"),
            &format!("{theirs}.out_layer"),
        );
    }
    for n in indices(&keys, prefix, "double_blocks") {
        t.double_block(n, dim);
    }
    for n in indices(&keys, prefix, "single_blocks") {
        t.single_block(n, dim);
    }
    // The final modulation: BFL's (shift, scale) as diffusers' (scale, shift).
    for leaf in ["weight", "bias"] {
        t.map.insert(
            format!("norm_out.linear.{leaf}"),
            Alias {
                source: format!("{prefix}final_layer.adaLN_modulation.1.{leaf}"),
                transform: Transform::SwapHalves,
            },
        );
    }
    Ok(t.map)
}
