//! LoRA files, resolved against a model's modules. The formats:
//! - kohya / AUTOMATIC1111: `lora_unet_…`, `lora_te_…` (SDXL: `lora_te1_`,
//!   `lora_te2_`), module paths with `.` → `_`, diffusers' or the original
//!   (SGM/LDM) block names; `.lora_down.weight`, `.lora_up.weight`,
//!   `.alpha` (scale alpha / rank; 1 without alpha); 4-d weights for
//!   convolutions;
//! - diffusers / PEFT: `unet.….lora_A.weight` / `.lora_B.weight`,
//!   `text_encoder[_2].[text_model.]…`; alpha from the safetensors metadata
//!   `lora_adapter_metadata` (`<network>.lora_alpha`, `.alpha_pattern`,
//!   `.use_rslora`), else alpha = rank.

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

/// kohya's names for a model's modules: the canonical path with `.` → `_`
/// after the network's own prefix, plus the original (LDM/SGM) block names
/// for the UNet.
pub struct KohyaNames {
    names: HashMap<String, String>,
}

impl KohyaNames {
    pub fn new(index: &ModuleIndex, layers_per_block: usize) -> Self {
        let mut names = HashMap::new();
        for path in index.modules.keys() {
            let Some((network, rest)) = path.split_once('.') else {
                continue;
            };
            let kohya = match network {
                "unet" => "lora_unet_",
                "text_encoder" => "lora_te_",
                "text_encoder_2" => "lora_te2_",
                _ => continue,
            };
            let under = |s: &str| s.replace('.', "_");
            match network {
                "unet" => {
                    names.insert(format!("{kohya}{}", under(rest)), path.clone());
                    for ldm in crate::single_file::unet_ldm_names(rest, layers_per_block) {
                        names.insert(format!("{kohya}{}", under(&ldm)), path.clone());
                    }
                }
                _ => {
                    names.insert(format!("{kohya}text_model_{}", under(rest)), path.clone());
                    if network == "text_encoder" {
                        // SDXL names the first encoder te1
                        names.insert(format!("lora_te1_text_model_{}", under(rest)), path.clone());
                    }
                }
            }
        }
        KohyaNames { names }
    }

    fn resolve(&self, stem: &str) -> Option<&String> {
        self.names.get(stem)
    }
}

/// The network a key belongs to (for skipping what another service holds),
/// and its canonical module path where the format names it directly.
fn network_of(stem: &str) -> Option<(&'static str, Option<String>)> {
    for (prefix, network) in [
        ("lora_unet_", "unet"),
        ("lora_te1_", "text_encoder"),
        ("lora_te2_", "text_encoder_2"),
        ("lora_te_", "text_encoder"),
    ] {
        if stem.starts_with(prefix) {
            return Some((network, None));
        }
    }
    for network in ["unet", "text_encoder_2", "text_encoder"] {
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
}

/// The model module a key's stem names: a diffusers/PEFT path the model
/// has, or a kohya stem resolved against its modules (None: neither).
fn module_of(
    direct: Option<String>,
    stem: &str,
    index: &ModuleIndex,
    kohya: &KohyaNames,
) -> Option<String> {
    match direct {
        Some(c) => index.modules.contains_key(&c).then_some(c),
        None => kohya.resolve(stem).cloned(),
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
        let held = index.networks();
        let peft = PeftAlphas::from_metadata(w.metadata("lora_adapter_metadata").as_deref());
        let mut modules: HashMap<String, (String, Parts)> = HashMap::new();
        let mut unknown = Vec::new();
        let mut stems = 0usize;
        for (key, _) in w.stored() {
            let Some((stem, part)) = split_key(key) else {
                unknown.push(key.to_string());
                continue;
            };
            let Some((network, direct)) = network_of(stem) else {
                unknown.push(key.to_string());
                continue;
            };
            stems += 1;
            if !held.iter().any(|h| h == network) {
                continue;
            }
            let Some(canonical) = module_of(direct, stem, index, kohya) else {
                unknown.push(key.to_string());
                continue;
            };
            let entry = modules.entry(canonical).or_insert_with(|| {
                (
                    network.to_string(),
                    Parts {
                        down: None,
                        up: None,
                        alpha: None,
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
        if stems == 0 {
            return Err(bad(
                path,
                "no LoRA weights in it (expected kohya `lora_unet_…`/`lora_te…` or diffusers \
                 `unet.….lora_A.weight` keys)",
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
            let (down, up) = fit(&w, &down_key, &up_key, shape, path)?;
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

fn owned(t: &Tensor) -> Result<Tensor> {
    let mut out = t.f_empty_like()?;
    out.f_copy_(t)?;
    Ok(out)
}

/// The down and up weights of a module, shaped for its kind.
fn fit(
    w: &Weights,
    down_key: &str,
    up_key: &str,
    shape: ModuleShape,
    path: &Path,
) -> Result<(Tensor, Tensor)> {
    let stored = |k: &str| w.stored_shape(k).map(<[i64]>::to_vec).unwrap_or_default();
    let (ds, us) = (stored(down_key), stored(up_key));
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
            let up = w.get(up_key, &us)?.reshape([shape.output, rank]);
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
            let up = w.get(up_key, &us)?.reshape([shape.output, rank, 1, 1]);
            Ok((down, up))
        }
    }
}

// SAFETY: an adapter's tensors are written once, at load, and only read
// afterwards (by forwards on any thread); libtorch allows concurrent reads
// of a tensor, and `apply` makes every intermediate tensor per call. The
// same reasoning as the networks' own `Sync`.
unsafe impl Sync for Adapter {}
