//! LoRA files, resolved against a model's modules. The formats:
//! - kohya / AUTOMATIC1111: `lora_unet_…`, `lora_te_…` (SDXL: `lora_te1_`,
//!   `lora_te2_`), module paths with `.` → `_`, diffusers' or the original
//!   (SGM/LDM) block names; `.lora_down.weight`, `.lora_up.weight`,
//!   `.alpha` (scale alpha / rank; 1 without alpha); 4-d weights for
//!   convolutions;
//! - diffusers / PEFT: `unet.….lora_A.weight` / `.lora_B.weight`,
//!   `transformer.…` (FLUX), `text_encoder[_2].[text_model.]…`; alpha from
//!   the safetensors metadata `lora_adapter_metadata` (`<network>.lora_alpha`,
//!   `.alpha_pattern`, `.use_rslora`), else alpha = rank;
//! - FLUX in Black Forest Labs' names: kohya's `lora_unet_double_blocks_0_…`
//!   and the dotted `diffusion_model.double_blocks.0.…` (ComfyUI,
//!   ai-toolkit); a fused `qkv` / `linear1` delta is split across the
//!   diffusers projections by rows of its up weight (the down weight is
//!   shared), as diffusers' own conversion does; kohya's T5 is `lora_te3_`.

use std::collections::HashMap;
use std::path::Path;

use tch::Tensor;

use crate::device::Placement;
use crate::error::{ModelError, Result};
use crate::modules::{ModuleIndex, ModuleKind, ModuleShape};
use crate::weights::Weights;

/// One module's low-rank delta.
pub struct Delta {
    /// (rank, in) or (rank, in, k, k)
    pub(super) down: Tensor,
    /// (out, rank) or (out, rank, 1, 1)
    pub(super) up: Tensor,
    /// alpha / rank (PEFT's rsLoRA: alpha / √rank).
    pub(super) scale: f64,
}

/// A LoRA file, resolved against a model's modules.
pub struct Adapter {
    pub name: String,
    pub(super) deltas: HashMap<String, Delta>,
    pub(super) bytes: usize,
}

impl Adapter {
    /// Modules this adapter changes.
    pub fn len(&self) -> usize {
        self.deltas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// Memory its tensors hold.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether it changes any module of `network` (`unet`, `text_encoder`, …).
    pub fn touches(&self, network: &str) -> bool {
        self.deltas
            .keys()
            .any(|k| k.split_once('.').is_some_and(|(n, _)| n == network))
    }
}

/// Errors while reading a LoRA file, each naming the file and what is wrong.
fn bad(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Unsupported {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// How a key names its module and which part of the delta it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

fn split_key(key: &str) -> Option<(&str, Part)> {
    for (suffix, part) in [
        (".lora_down.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".alpha", Part::Alpha),
    ] {
        if let Some(stem) = key.strip_suffix(suffix) {
            return Some((stem, part));
        }
    }
    None
}

/// Which rows of a (possibly fused) delta's up weight a module takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpRows {
    All,
    /// Rows `start..start + len` (one of a fused q/k/v or linear1).
    Rows {
        start: i64,
        len: i64,
    },
    /// The halves swapped (BFL's final modulation: shift, scale).
    Swapped,
}

/// kohya's names for a model's modules: the canonical path with `.` → `_`
/// after the network's own prefix, plus the original (LDM/SGM) block names
/// for the UNet, and BFL's names (fused projections split) for FLUX.
pub struct KohyaNames {
    names: HashMap<String, Vec<(String, UpRows)>>,
}

impl KohyaNames {
    pub fn new(index: &ModuleIndex, layers_per_block: usize) -> Self {
        let mut names: HashMap<String, Vec<(String, UpRows)>> = HashMap::new();
        let mut put = |stem: String, path: &String, rows: UpRows| {
            names.entry(stem).or_default().push((path.clone(), rows));
        };
        let under = |s: &str| s.replace('.', "_");
        for (path, shape) in &index.modules {
            let Some((network, rest)) = path.split_once('.') else {
                continue;
            };
            match network {
                "unet" => {
                    put(format!("lora_unet_{}", under(rest)), path, UpRows::All);
                    for ldm in crate::single_file::unet_ldm_names(rest, layers_per_block) {
                        put(format!("lora_unet_{}", under(&ldm)), path, UpRows::All);
                    }
                }
                "transformer" => {
                    put(format!("lora_unet_{}", under(rest)), path, UpRows::All);
                    if let Some((bfl, rows)) = bfl_name(rest, shape.output) {
                        put(format!("lora_unet_{}", under(&bfl)), path, rows);
                        put(format!("diffusion_model.{bfl}"), path, rows);
                    }
                }
                // FLUX's T5 (kohya's sd-scripts call it te3).
                "text_encoder_2" if rest.starts_with("encoder.block.") => {
                    put(format!("lora_te3_{}", under(rest)), path, UpRows::All);
                }
                "text_encoder" | "text_encoder_2" => {
                    let kohya = if network == "text_encoder" {
                        "lora_te_"
                    } else {
                        "lora_te2_"
                    };
                    put(
                        format!("{kohya}text_model_{}", under(rest)),
                        path,
                        UpRows::All,
                    );
                    if network == "text_encoder" {
                        // SDXL and FLUX name the first encoder te1
                        put(
                            format!("lora_te1_text_model_{}", under(rest)),
                            path,
                            UpRows::All,
                        );
                    }
                }
                _ => {}
            }
        }
        KohyaNames { names }
    }

    fn resolve(&self, stem: &str) -> Option<&[(String, UpRows)]> {
        self.names.get(stem).map(Vec::as_slice)
    }
}

/// BFL's name for a FLUX transformer module (its diffusers path `rest`,
/// `out` wide), and the rows of the fused projection it is.
fn bfl_name(rest: &str, out: i64) -> Option<(String, UpRows)> {
    let parts: Vec<&str> = rest.split('.').collect();
    let all = |s: String| Some((s, UpRows::All));
    let rows = |s: String, i: i64| {
        Some((
            s,
            UpRows::Rows {
                start: i * out,
                len: out,
            },
        ))
    };
    match parts.as_slice() {
        ["x_embedder"] => all("img_in".into()),
        ["context_embedder"] => all("txt_in".into()),
        ["proj_out"] => all("final_layer.linear".into()),
        ["norm_out", "linear"] => Some(("final_layer.adaLN_modulation.1".into(), UpRows::Swapped)),
        ["time_text_embed", emb, layer] => {
            let e = match *emb {
                "timestep_embedder" => "time_in",
                "guidance_embedder" => "guidance_in",
                "text_embedder" => "vector_in",
                _ => return None,
            };
            let l = match *layer {
                "linear_1" => "in_layer",
                "linear_2" => "out_layer",
                _ => return None,
            };
            all(format!("{e}.{l}"))
        }
        ["transformer_blocks", n, tail @ ..] => {
            let b = format!("double_blocks.{n}");
            match tail {
                ["norm1", "linear"] => all(format!("{b}.img_mod.lin")),
                ["norm1_context", "linear"] => all(format!("{b}.txt_mod.lin")),
                ["attn", "to_out", "0"] => all(format!("{b}.img_attn.proj")),
                ["attn", "to_add_out"] => all(format!("{b}.txt_attn.proj")),
                ["ff", "net", "0", "proj"] => all(format!("{b}.img_mlp.0")),
                ["ff", "net", "2"] => all(format!("{b}.img_mlp.2")),
                ["ff_context", "net", "0", "proj"] => all(format!("{b}.txt_mlp.0")),
                ["ff_context", "net", "2"] => all(format!("{b}.txt_mlp.2")),
                ["attn", p] => {
                    let i = [
                        "to_q",
                        "to_k",
                        "to_v",
                        "add_q_proj",
                        "add_k_proj",
                        "add_v_proj",
                    ]
                    .iter()
                    .position(|x| x == p)? as i64;
                    let stream = if i < 3 { "img_attn" } else { "txt_attn" };
                    rows(format!("{b}.{stream}.qkv"), i % 3)
                }
                _ => None,
            }
        }
        ["single_transformer_blocks", n, tail @ ..] => {
            let b = format!("single_blocks.{n}");
            match tail {
                ["norm", "linear"] => all(format!("{b}.modulation.lin")),
                ["proj_out"] => all(format!("{b}.linear2")),
                // q, k, v, then the MLP's input (4× as wide) in linear1.
                ["attn", p @ ("to_q" | "to_k" | "to_v")] => {
                    let i = ["to_q", "to_k", "to_v"].iter().position(|x| x == p)? as i64;
                    rows(format!("{b}.linear1"), i)
                }
                ["proj_mlp"] => Some((
                    format!("{b}.linear1"),
                    UpRows::Rows {
                        start: 3 * (out / 4),
                        len: out,
                    },
                )),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The network a key belongs to (for skipping what another service holds),
/// and its canonical module path where the format names it directly.
/// `denoiser`: the denoising network's name here (`unet`, or FLUX's
/// `transformer`), which kohya's `lora_unet_` and BFL's `diffusion_model.`
/// keys name whatever it is.
fn network_of(stem: &str, denoiser: &'static str) -> Option<(&'static str, Option<String>)> {
    for (prefix, network) in [
        ("lora_unet_", denoiser),
        ("diffusion_model.", denoiser),
        ("lora_te1_", "text_encoder"),
        ("lora_te2_", "text_encoder_2"),
        ("lora_te3_", "text_encoder_2"),
        ("lora_te_", "text_encoder"),
    ] {
        if stem.starts_with(prefix) {
            return Some((network, None));
        }
    }
    for network in ["unet", "transformer", "text_encoder_2", "text_encoder"] {
        if let Some(rest) = stem.strip_prefix(network).and_then(|r| r.strip_prefix('.')) {
            let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
            return Some((network, Some(format!("{network}.{rest}"))));
        }
    }
    None
}

/// PEFT's alphas from `lora_adapter_metadata`, per network.
#[derive(Default)]
struct PeftAlphas {
    by_network: HashMap<String, PeftNetwork>,
}

/// One network's adapter config: `lora_alpha`, `alpha_pattern`, `use_rslora`.
#[derive(Default)]
struct PeftNetwork {
    alpha: Option<f64>,
    patterns: Vec<(String, f64)>,
    rslora: bool,
}

impl PeftAlphas {
    fn from_metadata(meta: Option<&str>) -> Self {
        let mut out = PeftAlphas::default();
        let Some(v) = meta.and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok()) else {
            return out;
        };
        let Some(obj) = v.as_object() else {
            return out;
        };
        for (k, val) in obj {
            let Some((network, field)) = k.split_once('.') else {
                continue;
            };
            let entry = out.by_network.entry(network.to_string()).or_default();
            match field {
                "lora_alpha" => entry.alpha = val.as_f64(),
                "alpha_pattern" => {
                    if let Some(p) = val.as_object() {
                        entry.patterns = p
                            .iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                            .collect();
                    }
                }
                "use_rslora" => entry.rslora = val.as_bool().unwrap_or(false),
                _ => {}
            }
        }
        out
    }

    /// alpha / rank for module `rest` of `network` (PEFT's rule; alpha =
    /// rank where unsaid).
    fn scale(&self, network: &str, rest: &str, rank: i64) -> f64 {
        let r = rank as f64;
        let Some(n) = self.by_network.get(network) else {
            return 1.0;
        };
        let alpha = n
            .patterns
            .iter()
            .find(|(p, _)| rest == p || rest.ends_with(&format!(".{p}")))
            .map(|(_, a)| *a)
            .or(n.alpha)
            .unwrap_or(r);
        if n.rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

struct Parts {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
    /// The rows of the up weight this module takes.
    rows: UpRows,
}

/// The model modules a key's stem names: a diffusers/PEFT path the model
/// has, or a kohya/BFL stem resolved against its modules (several for a
/// fused projection; empty: neither).
fn modules_of(
    direct: Option<String>,
    stem: &str,
    index: &ModuleIndex,
    kohya: &KohyaNames,
) -> Vec<(String, UpRows)> {
    match direct {
        Some(c) if index.modules.contains_key(&c) => vec![(c, UpRows::All)],
        Some(_) => Vec::new(),
        None => kohya.resolve(stem).map(<[_]>::to_vec).unwrap_or_default(),
    }
}

impl Adapter {
    /// Read `path` as LoRA `name`, keeping the deltas for the networks in
    /// `index` (another service holds the rest); every key of those
    /// networks must name one of its modules with fitting shapes.
    pub fn load(
        path: &Path,
        name: &str,
        index: &ModuleIndex,
        kohya: &KohyaNames,
        placement: Placement,
    ) -> Result<Adapter> {
        let w = Weights::open(path, placement)?;
        let peft = PeftAlphas::from_metadata(w.metadata("lora_adapter_metadata").as_deref());
        let modules = modules_in(&w, path, index, kohya)?;
        let mut deltas = HashMap::new();
        let mut bytes = 0usize;
        for (canonical, (network, parts)) in modules {
            let (Some(down_key), Some(up_key)) = (parts.down, parts.up) else {
                return Err(bad(
                    path,
                    format!("`{canonical}`: a down (A) or up (B) weight is missing"),
                ));
            };
            let Some(&shape) = index.modules.get(&canonical) else {
                return Err(bad(path, format!("`{canonical}`: no such module")));
            };
            let (down, up) = fit(&w, (&down_key, &up_key, parts.rows), shape, path)?;
            // Copies: on a CPU the weights may be views of the file's map,
            // which goes when `w` does (and an adapter must not change if
            // its file is rewritten in place).
            let (down, up) = (owned(&down)?, owned(&up)?);
            let rank = down.size()[0];
            let scale = match parts.alpha {
                Some(k) => {
                    let a = w.get(&k, &[])?;
                    a.double_value(&[]) / rank as f64
                }
                None => {
                    let rest = canonical
                        .split_once('.')
                        .map(|(_, r)| r)
                        .unwrap_or(&canonical);
                    peft.scale(&network, rest, rank)
                }
            };
            bytes += (down.numel() + up.numel()) * down.kind().elt_size_in_bytes();
            deltas.insert(canonical, Delta { down, up, scale });
        }
        Ok(Adapter {
            name: name.to_string(),
            deltas,
            bytes,
        })
    }
}

/// Each module of the networks in `index` that a key of `w` names, with
/// the keys of its parts; every key of those networks must name one.
fn modules_in(
    w: &Weights,
    path: &Path,
    index: &ModuleIndex,
    kohya: &KohyaNames,
) -> Result<HashMap<String, (String, Parts)>> {
    let held = index.networks();
    let denoiser = if held.iter().any(|h| h == "transformer") {
        "transformer"
    } else {
        "unet"
    };
    let mut modules: HashMap<String, (String, Parts)> = HashMap::new();
    let mut unknown = Vec::new();
    let mut stems = 0usize;
    for (key, _) in w.stored() {
        let Some((stem, part)) = split_key(key) else {
            unknown.push(key.to_string());
            continue;
        };
        let Some((network, direct)) = network_of(stem, denoiser) else {
            unknown.push(key.to_string());
            continue;
        };
        stems += 1;
        // A key for the other kind of denoising network (a FLUX LoRA on a
        // UNet, an SD LoRA on FLUX) fits nothing here.
        let is_denoiser = |n: &str| n == "unet" || n == "transformer";
        let denoiser_held = held.iter().any(|h| is_denoiser(h));
        if denoiser_held && is_denoiser(network) && network != denoiser {
            unknown.push(key.to_string());
            continue;
        }
        if !held.iter().any(|h| h == network) {
            continue;
        }
        let targets = modules_of(direct, stem, index, kohya);
        if targets.is_empty() {
            unknown.push(key.to_string());
            continue;
        }
        for (canonical, rows) in targets {
            let entry = modules.entry(canonical).or_insert_with(|| {
                (
                    network.to_string(),
                    Parts {
                        down: None,
                        up: None,
                        alpha: None,
                        rows,
                    },
                )
            });
            let slot = match part {
                Part::Down => &mut entry.1.down,
                Part::Up => &mut entry.1.up,
                Part::Alpha => &mut entry.1.alpha,
            };
            *slot = Some(key.to_string());
        }
    }
    if stems == 0 {
        return Err(bad(
            path,
            "no LoRA weights in it (expected kohya `lora_unet_…`/`lora_te…` or diffusers \
             `unet.….lora_A.weight` / `transformer.….lora_A.weight` keys)",
        ));
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(bad(
            path,
            format!(
                "{} keys do not fit this model (no such module), e.g. `{}`",
                unknown.len(),
                unknown[0]
            ),
        ));
    }
    Ok(modules)
}

fn owned(t: &Tensor) -> Result<Tensor> {
    let mut out = t.f_empty_like()?;
    out.f_copy_(t)?;
    Ok(out)
}

/// The down and up weights of a module (its `rows` of the up weight),
/// shaped for its kind.
fn fit(
    w: &Weights,
    (down_key, up_key, rows): (&str, &str, UpRows),
    shape: ModuleShape,
    path: &Path,
) -> Result<(Tensor, Tensor)> {
    let stored = |k: &str| w.stored_shape(k).map(<[i64]>::to_vec).unwrap_or_default();
    let ds = stored(down_key);
    let mut us = stored(up_key);
    // A fused delta: this module's rows of it.
    let full_up = us.first().copied().unwrap_or(0);
    match rows {
        UpRows::All => {}
        UpRows::Rows { start, len } => {
            if us.is_empty() || start + len > full_up {
                return Err(bad(
                    path,
                    format!(
                        "`{up_key}` {us:?} has no rows {start}..{} to split",
                        start + len
                    ),
                ));
            }
            us[0] = len;
        }
        UpRows::Swapped => {
            if full_up % 2 != 0 {
                return Err(bad(path, format!("`{up_key}` {us:?}: odd rows to swap")));
            }
        }
    }
    let up_of = |t: Tensor| -> Result<Tensor> {
        Ok(match rows {
            UpRows::All => t,
            UpRows::Rows { start, len } => t.f_narrow(0, start, len)?,
            UpRows::Swapped => {
                let n = full_up / 2;
                Tensor::f_cat(&[t.f_narrow(0, n, n)?, t.f_narrow(0, 0, n)?], 0)?
            }
        })
    };
    let full_shape = |mut s: Vec<i64>| {
        if let Some(first) = s.first_mut() {
            *first = full_up;
        }
        s
    };
    let rank = *ds.first().unwrap_or(&0);
    let mismatch = || {
        bad(
            path,
            format!(
                "`{down_key}` {ds:?} / `{up_key}` {us:?} do not fit a module of {} → {} ({:?})",
                shape.input, shape.output, shape.kind
            ),
        )
    };
    if rank <= 0 || us.get(1) != Some(&rank) || us.first() != Some(&shape.output) {
        return Err(mismatch());
    }
    let ones = |s: &[i64]| s.iter().skip(2).all(|&d| d == 1);
    match shape.kind {
        ModuleKind::Linear => {
            // 2-d, or a 1×1 convolution's 4-d weights on a linear layer
            if ds.get(1) != Some(&shape.input) || !ones(&ds) || !ones(&us) {
                return Err(mismatch());
            }
            let down = w.get(down_key, &ds)?.reshape([rank, shape.input]);
            let up = up_of(w.get(up_key, &full_shape(us.clone()))?)?.reshape([shape.output, rank]);
            Ok((down, up))
        }
        ModuleKind::Conv { kernel, .. } => {
            let k = match ds.len() {
                2 => 1,
                4 if ds[2] == ds[3] => ds[2],
                _ => return Err(mismatch()),
            };
            if ds[1] != shape.input || !(k == kernel || k == 1 && kernel == 1) || !ones(&us) {
                return Err(mismatch());
            }
            let down = w.get(down_key, &ds)?.reshape([rank, shape.input, k, k]);
            let up =
                up_of(w.get(up_key, &full_shape(us.clone()))?)?.reshape([shape.output, rank, 1, 1]);
            Ok((down, up))
        }
    }
}

// SAFETY: an adapter's tensors are written once, at load, and only read
// afterwards (by forwards on any thread); libtorch allows concurrent reads
// of a tensor, and `apply` makes every intermediate tensor per call. The
// same reasoning as the networks' own `Sync`.
unsafe impl Sync for Adapter {}
