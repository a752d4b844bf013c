//! LoRA adapters, applied at run time per batch row.
//!
//! The base weights are never changed. A forward runs under a [`Plan`] that
//! says which rows of the batch use which adapters at which scales; every
//! `Linear` and `Conv2d` with a module path adds, for each adapter that
//! has a delta for it, `scale · (alpha / rank) · up(down(x))` to the rows
//! that use it — the base projection runs once for the whole batch. So
//! generations with different LoRA sets, different scales, or none share
//! one forward, and a row without adapters gets exactly the base output.
//!
//! Files (both formats people have):
//! - kohya / AUTOMATIC1111: `lora_unet_…`, `lora_te_…` (SDXL: `lora_te1_`,
//!   `lora_te2_`), module paths with `.` → `_`, diffusers' or the original
//!   (SGM/LDM) block names; `.lora_down.weight`, `.lora_up.weight`,
//!   `.alpha` (scale alpha / rank; 1 without alpha); 4-d weights for
//!   convolutions;
//! - diffusers / PEFT: `unet.….lora_A.weight` / `.lora_B.weight`,
//!   `text_encoder[_2].[text_model.]…`; alpha from the safetensors metadata
//!   `lora_adapter_metadata` (`<network>.lora_alpha`, `.alpha_pattern`,
//!   `.use_rslora`), else alpha = rank.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tch::Tensor;

use crate::device::Placement;
use crate::error::{ModelError, Result};
use crate::weights::Weights;

/// What a LoRA-capable module is: its path's network and shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    Linear,
    Conv {
        kernel: i64,
        stride: i64,
        padding: i64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleShape {
    pub kind: ModuleKind,
    pub input: i64,
    pub output: i64,
}

/// The LoRA-capable modules of a loaded network, by canonical path
/// (`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
/// `text_encoder.encoder.layers.0.self_attn.q_proj`).
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    pub modules: HashMap<String, ModuleShape>,
}

impl ModuleIndex {
    pub fn merge(&mut self, other: &ModuleIndex) {
        self.modules
            .extend(other.modules.iter().map(|(k, v)| (k.clone(), *v)));
    }

    /// The networks (path prefixes before the first `.`) present.
    pub fn networks(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .modules
            .keys()
            .filter_map(|k| k.split_once('.').map(|(n, _)| n.to_string()))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// One module's low-rank delta.
pub struct Delta {
    /// (rank, in) or (rank, in, k, k)
    down: Tensor,
    /// (out, rank) or (out, rank, 1, 1)
    up: Tensor,
    /// alpha / rank (PEFT's rsLoRA: alpha / √rank).
    scale: f64,
}

/// A LoRA file, resolved against a model's modules.
pub struct Adapter {
    pub name: String,
    deltas: HashMap<String, Delta>,
    bytes: usize,
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

/// An adapter at a request's scale.
#[derive(Clone)]
pub struct Applied {
    pub adapter: Arc<Adapter>,
    pub scale: f64,
}

/// Rows `start..start + len` of a forward's batch use `set`.
#[derive(Clone)]
pub struct Span {
    pub start: i64,
    pub len: i64,
    pub set: Arc<[Applied]>,
}

/// Which rows of a forward use which adapters.
#[derive(Clone, Default)]
pub struct Plan {
    /// None: every row, whatever the batch (one request's forwards).
    rows: Option<i64>,
    spans: Vec<Span>,
}

impl Plan {
    /// Every row of every forward run under it uses `set`.
    pub fn all(set: Arc<[Applied]>) -> Self {
        Plan {
            rows: None,
            spans: vec![Span {
                start: 0,
                len: -1,
                set,
            }],
        }
    }

    /// Per-row sets for a forward of `rows` rows.
    pub fn rows(rows: i64, spans: Vec<Span>) -> Self {
        Plan {
            rows: Some(rows),
            spans: spans.into_iter().filter(|s| !s.set.is_empty()).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.spans.iter().all(|s| s.set.is_empty())
    }
}

thread_local! {
    static PLAN: RefCell<Option<Plan>> = const { RefCell::new(None) };
}

/// Run `f` (forwards on this thread) under `plan`.
pub fn with_plan<T>(plan: Plan, f: impl FnOnce() -> T) -> T {
    struct Reset(Option<Plan>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let prev = self.0.take();
            PLAN.with(|p| *p.borrow_mut() = prev);
        }
    }
    if plan.is_empty() {
        return f();
    }
    let prev = PLAN.with(|p| p.borrow_mut().replace(plan));
    let _reset = Reset(prev);
    f()
}

/// Add the deltas of the current plan's adapters for module `path` to `y`,
/// the base output for input `xs`. `conv`: the base is a convolution with
/// this stride and padding.
pub fn apply(path: &str, xs: &Tensor, y: Tensor, conv: Option<(i64, i64)>) -> Tensor {
    PLAN.with(|p| {
        let p = p.borrow();
        let Some(plan) = p.as_ref() else {
            return y;
        };
        let batch = xs.size()[0];
        if let Some(rows) = plan.rows {
            // An invariant of the callers (the rows a plan was made for);
            // a mismatch is a bug, and `guarded` turns this into an error.
            assert_eq!(
                rows, batch,
                "LoRA plan for {rows} rows applied to a batch of {batch} ({path})"
            );
        }
        let mut y = y;
        for span in &plan.spans {
            let (start, len) = if span.len < 0 {
                (0, batch)
            } else {
                (span.start, span.len)
            };
            let mut total: Option<Tensor> = None;
            for a in span.set.iter() {
                let Some(d) = a.adapter.deltas.get(path) else {
                    continue;
                };
                let x = if len == batch {
                    xs.shallow_clone()
                } else {
                    xs.narrow(0, start, len)
                };
                let delta = match conv {
                    None => x
                        .linear(&d.down, None::<Tensor>)
                        .linear(&d.up, None::<Tensor>),
                    Some((stride, padding)) => x
                        .conv2d(&d.down, None::<Tensor>, [stride], [padding], [1], 1)
                        .conv2d(&d.up, None::<Tensor>, [1], [0], [1], 1),
                } * (a.scale * d.scale);
                total = Some(match total {
                    Some(t) => t + delta,
                    None => delta,
                });
            }
            if let Some(t) = total {
                if len == batch {
                    y += t;
                } else {
                    let mut rows = y.narrow(0, start, len);
                    let _ = rows.f_add_(&t);
                }
            }
        }
        y
    })
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
            let canonical = match direct {
                Some(c) => c,
                None => match kohya.resolve(stem) {
                    Some(c) => c.clone(),
                    None => {
                        unknown.push(key.to_string());
                        continue;
                    }
                },
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
            let shape = index.modules[&canonical];
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
