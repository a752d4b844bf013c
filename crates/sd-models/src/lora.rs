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

/// One adapter's part in a plan: the rows that use it and at what scales.
struct Use {
    adapter: Arc<Adapter>,
    /// `(start, len, scale)`, rows in order, adjacent rows at one scale
    /// merged; a `len` of -1: every row, whatever the batch.
    segments: Vec<(i64, i64, f64)>,
    /// With several segments: each row's scale (0 where unused), made on
    /// the first forward's device, in fp32 (fp64 for fp64 inputs) so that
    /// a half-precision forward rounds a row's scale once, as the one-run
    /// path does, `[rows]`.
    row_scales: RefCell<Option<Tensor>>,
}

impl Use {
    fn new(adapter: Arc<Adapter>) -> Self {
        Use {
            adapter,
            segments: Vec::new(),
            row_scales: RefCell::new(None),
        }
    }

    fn add(&mut self, start: i64, len: i64, scale: f64) {
        if scale == 0.0 || len == 0 {
            return;
        }
        match self.segments.last_mut() {
            Some(last) if last.1 >= 0 && last.0 + last.1 == start && last.2 == scale => {
                last.1 += len;
            }
            _ => self.segments.push((start, len, scale)),
        }
    }

    /// Each row's scale on `like`'s device, `[batch]`.
    fn row_scales(&self, batch: i64, like: &Tensor) -> Result<Tensor> {
        let kind = if like.kind() == tch::Kind::Double {
            tch::Kind::Double
        } else {
            tch::Kind::Float
        };
        let mut cached = self.row_scales.borrow_mut();
        if let Some(t) = cached.as_ref() {
            if t.size()[0] == batch && t.device() == like.device() && t.kind() == kind {
                return Ok(t.shallow_clone());
            }
        }
        let mut v = vec![0f64; batch as usize];
        for &(start, len, scale) in &self.segments {
            for row in v.iter_mut().skip(start as usize).take(len as usize) {
                *row += scale;
            }
        }
        let t = Tensor::from_slice(&v)
            .f_to_kind(kind)?
            .f_to_device(like.device())?;
        *cached = Some(t.shallow_clone());
        Ok(t)
    }
}

/// Which rows of a forward use which adapters. Work is grouped by adapter:
/// per module, each adapter in the plan costs one low-rank product over
/// the rows that use it (all rows, scaled per row, where they are not one
/// run), however many requests share it.
#[derive(Default)]
pub struct Plan {
    /// None: every row, whatever the batch (one request's forwards).
    rows: Option<i64>,
    uses: Vec<Use>,
}

impl Plan {
    fn use_of(&mut self, adapter: &Arc<Adapter>) -> &mut Use {
        let at = match self
            .uses
            .iter()
            .position(|u| Arc::ptr_eq(&u.adapter, adapter))
        {
            Some(at) => at,
            None => {
                self.uses.push(Use::new(adapter.clone()));
                self.uses.len() - 1
            }
        };
        &mut self.uses[at]
    }

    fn pruned(mut self) -> Self {
        self.uses.retain(|u| !u.segments.is_empty());
        self
    }

    /// Every row of every forward run under it uses `set`.
    pub fn all(set: Arc<[Applied]>) -> Self {
        let mut plan = Plan::default();
        for a in set.iter() {
            plan.use_of(&a.adapter).add(0, -1, a.scale);
        }
        plan.pruned()
    }

    /// Per-row sets for a forward of `rows` rows.
    pub fn rows(rows: i64, spans: Vec<Span>) -> Self {
        let mut plan = Plan {
            rows: Some(rows),
            uses: Vec::new(),
        };
        for span in &spans {
            for a in span.set.iter() {
                plan.use_of(&a.adapter).add(span.start, span.len, a.scale);
            }
        }
        plan.pruned()
    }

    pub fn is_empty(&self) -> bool {
        self.uses.is_empty()
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

/// How the low-rank product is scaled: one factor, or one per row.
enum Factor {
    All(f64),
    Rows(Tensor),
}

/// `ys += factor · up(down(xs))` in place (`ys` may be a view of rows of
/// the base output). A linear layer's up projection and addition are one
/// `addmm_` where the rows can be seen as a matrix.
fn add_delta(
    ys: &mut Tensor,
    xs: &Tensor,
    d: &Delta,
    factor: &Factor,
    conv: Option<(i64, i64)>,
) -> Result<()> {
    let mut mid = match conv {
        None => xs.f_linear(&d.down, None::<Tensor>)?,
        Some((stride, padding)) => {
            xs.f_conv2d(&d.down, None::<Tensor>, [stride], [padding], [1], 1)?
        }
    };
    match factor {
        Factor::All(f) => {
            let _ = mid.f_mul_scalar_(*f)?;
        }
        Factor::Rows(r) => {
            let mut shape = vec![1i64; mid.dim()];
            shape[0] = -1;
            let _ = mid.f_mul_(&r.f_view(shape.as_slice())?)?;
        }
    }
    if conv.is_none() {
        let (out, rank) = (d.up.size()[0], d.up.size()[1]);
        if let (Ok(mut y2), Ok(m2)) = (ys.f_view([-1, out]), mid.f_view([-1, rank])) {
            let _ = y2.f_addmm_(&m2, &d.up.f_tr()?)?;
            return Ok(());
        }
        let _ = ys.f_add_(&mid.f_linear(&d.up, None::<Tensor>)?)?;
        return Ok(());
    }
    let out = mid.f_conv2d(&d.up, None::<Tensor>, [1], [0], [1], 1)?;
    let _ = ys.f_add_(&out)?;
    Ok(())
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
        for u in &plan.uses {
            let Some(d) = u.adapter.deltas.get(path) else {
                continue;
            };
            let done = || -> Result<()> {
                match u.segments.as_slice() {
                    &[(start, len, scale)] => {
                        let f = Factor::All(scale * d.scale);
                        if len < 0 || (start == 0 && len == batch) {
                            add_delta(&mut y.shallow_clone(), xs, d, &f, conv)
                        } else {
                            let x = xs.f_narrow(0, start, len)?;
                            let mut rows = y.f_narrow(0, start, len)?;
                            add_delta(&mut rows, &x, d, &f, conv)
                        }
                    }
                    _ => {
                        let r = u.row_scales(batch, xs)?;
                        let f = Factor::Rows(r.f_mul_scalar(d.scale)?);
                        add_delta(&mut y.shallow_clone(), xs, d, &f, conv)
                    }
                }
            };
            // Like a libtorch error in the base layer: a bug or a device
            // failure, which `guarded` turns into an error for the call.
            if let Err(e) = done() {
                panic!("LoRA {} on {path}: {e}", u.adapter.name);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    const F: (Kind, Device) = (Kind::Double, Device::Cpu);

    fn adapter(name: &str, path: &str, down: Tensor, up: Tensor, scale: f64) -> Arc<Adapter> {
        let mut deltas = HashMap::new();
        deltas.insert(path.to_string(), Delta { down, up, scale });
        Arc::new(Adapter {
            name: name.into(),
            deltas,
            bytes: 0,
        })
    }

    fn set(a: &Arc<Adapter>, scale: f64) -> Arc<[Applied]> {
        vec![Applied {
            adapter: a.clone(),
            scale,
        }]
        .into()
    }

    fn span(start: i64, len: i64, set: Arc<[Applied]>) -> Span {
        Span { start, len, set }
    }

    /// Rows 0-1 use `a` at 0.8, 2-3 nothing, 4-5 `a` at 0.4 and `b`, 6-7
    /// `b`: `a` is applied with per-row scales, `b` to one run of rows.
    fn mixed(a: &Arc<Adapter>, b: &Arc<Adapter>) -> (Plan, [Vec<(f64, f64)>; 8]) {
        let ab: Arc<[Applied]> = vec![
            Applied {
                adapter: a.clone(),
                scale: 0.4,
            },
            Applied {
                adapter: b.clone(),
                scale: 1.0,
            },
        ]
        .into();
        let none: Arc<[Applied]> = Vec::new().into();
        let plan = Plan::rows(
            8,
            vec![
                span(0, 1, set(a, 0.8)),
                span(1, 1, set(a, 0.8)),
                span(2, 2, none),
                span(4, 2, ab),
                span(6, 2, set(b, 1.0)),
            ],
        );
        // Each row's (scale of a, scale of b).
        let s = [
            vec![(0.8, 0.0)],
            vec![(0.8, 0.0)],
            vec![(0.0, 0.0)],
            vec![(0.0, 0.0)],
            vec![(0.4, 1.0)],
            vec![(0.4, 1.0)],
            vec![(0.0, 1.0)],
            vec![(0.0, 1.0)],
        ];
        (plan, s)
    }

    #[test]
    fn adjacent_rows_at_one_scale_are_one_segment_and_shared_adapters_one_use() {
        let a = adapter(
            "a",
            "m",
            Tensor::zeros([2, 3], F),
            Tensor::zeros([3, 2], F),
            1.0,
        );
        let b = adapter(
            "b",
            "m",
            Tensor::zeros([2, 3], F),
            Tensor::zeros([3, 2], F),
            1.0,
        );
        let (plan, _) = mixed(&a, &b);
        assert_eq!(plan.uses.len(), 2);
        assert_eq!(plan.uses[0].segments, vec![(0, 2, 0.8), (4, 2, 0.4)]);
        assert_eq!(plan.uses[1].segments, vec![(4, 4, 1.0)]);
        let uniform = Plan::rows(4, vec![span(0, 2, set(&a, 0.5)), span(2, 2, set(&a, 0.5))]);
        assert_eq!(uniform.uses[0].segments, vec![(0, 4, 0.5)]);
        let zero = Plan::rows(2, vec![span(0, 2, set(&a, 0.0))]);
        assert!(zero.is_empty());
    }

    #[test]
    fn each_row_gets_its_own_adapters_on_linear_layers() {
        tch::manual_seed(7);
        let (din, dout, rank) = (6, 5, 2);
        let w = Tensor::randn([dout, din], F);
        let a = adapter(
            "a",
            "m",
            Tensor::randn([rank, din], F),
            Tensor::randn([dout, rank], F),
            0.5,
        );
        let b = adapter(
            "b",
            "m",
            Tensor::randn([3, din], F),
            Tensor::randn([dout, 3], F),
            2.0,
        );
        let (plan, scales) = mixed(&a, &b);
        let xs = Tensor::randn([8, 4, din], F);
        let base = xs.linear(&w, None::<Tensor>);
        let got = with_plan(plan, || {
            apply("m", &xs, xs.linear(&w, None::<Tensor>), None)
        });
        let other = with_plan(Plan::rows(8, vec![span(0, 8, set(&a, 1.0))]), || {
            apply("not-m", &xs, xs.linear(&w, None::<Tensor>), None)
        });
        assert!(other.equal(&base), "a module an adapter lacks is untouched");
        let delta = |ad: &Arc<Adapter>, x: &Tensor| {
            let d = &ad.deltas["m"];
            x.linear(&d.down, None::<Tensor>)
                .linear(&d.up, None::<Tensor>)
                * d.scale
        };
        for (row, s) in scales.iter().enumerate() {
            let x = xs.get(row as i64);
            let want = base.get(row as i64) + delta(&a, &x) * s[0].0 + delta(&b, &x) * s[0].1;
            let diff = (got.get(row as i64) - &want).abs().max().double_value(&[]);
            assert!(diff < 1e-9, "row {row}: {diff}");
        }
        // Rows without adapters are the base output exactly.
        assert!(got.narrow(0, 2, 2).equal(&base.narrow(0, 2, 2)));
    }

    #[test]
    fn each_row_gets_its_own_adapters_on_convolutions() {
        tch::manual_seed(8);
        let (cin, cout, rank, k, stride, pad) = (3, 4, 2, 3, 2, 1);
        let w = Tensor::randn([cout, cin, k, k], F);
        let conv =
            |x: &Tensor, w: &Tensor, s: i64, p: i64| x.conv2d(w, None::<Tensor>, [s], [p], [1], 1);
        let a = adapter(
            "a",
            "m",
            Tensor::randn([rank, cin, k, k], F),
            Tensor::randn([cout, rank, 1, 1], F),
            0.5,
        );
        let b = adapter(
            "b",
            "m",
            Tensor::randn([rank, cin, k, k], F),
            Tensor::randn([cout, rank, 1, 1], F),
            1.0,
        );
        let (plan, scales) = mixed(&a, &b);
        let xs = Tensor::randn([8, cin, 7, 7], F);
        let base = conv(&xs, &w, stride, pad);
        let got = with_plan(plan, || {
            apply("m", &xs, conv(&xs, &w, stride, pad), Some((stride, pad)))
        });
        let delta = |ad: &Arc<Adapter>, x: &Tensor| {
            let d = &ad.deltas["m"];
            conv(&conv(x, &d.down, stride, pad), &d.up, 1, 0) * d.scale
        };
        for (row, s) in scales.iter().enumerate() {
            let x = xs.narrow(0, row as i64, 1);
            let want =
                base.narrow(0, row as i64, 1) + delta(&a, &x) * s[0].0 + delta(&b, &x) * s[0].1;
            let diff = (got.narrow(0, row as i64, 1) - &want)
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-9, "row {row}: {diff}");
        }
    }

    #[test]
    fn a_plan_for_every_row_applies_whatever_the_batch() {
        tch::manual_seed(9);
        let w = Tensor::randn([4, 3], F);
        let a = adapter(
            "a",
            "m",
            Tensor::randn([1, 3], F),
            Tensor::randn([4, 1], F),
            1.5,
        );
        for batch in [1, 3] {
            let xs = Tensor::randn([batch, 3], F);
            let got = with_plan(Plan::all(set(&a, 0.6)), || {
                apply("m", &xs, xs.linear(&w, None::<Tensor>), None)
            });
            let d = &a.deltas["m"];
            let want = xs.linear(&w, None::<Tensor>)
                + xs.linear(&d.down, None::<Tensor>)
                    .linear(&d.up, None::<Tensor>)
                    * (0.6 * 1.5);
            let diff = (got - want).abs().max().double_value(&[]);
            assert!(diff < 1e-9, "batch {batch}: {diff}");
        }
    }
}
