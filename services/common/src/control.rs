//! ControlNets on a denoiser's calls: the folder they are read from
//! (`--controlnet-dir`), the controls a Predict names (checked in
//! [`crate::step::Step::decode`], resolved here: the network, and its hint
//! image's embedding — computed when the image is sent and held by the
//! stream in its place, so once per generation), and the residuals of one
//! batched forward: each ControlNet runs on the rows that use it, each row
//! at its own scale, and rows without control get none.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sd_models::{
    Added, ControlBase, ControlNetwork, ControlResiduals, FluxResiduals, Placement, Residuals,
};
use sd_proto::v1::ControlNetInfo;
use tch::Tensor;

use crate::ServiceError;

/// Most ControlNets on one call.
pub const MAX_CONTROLS: usize = 8;

/// A1111's soft injection: residual i scaled by 0.825^(12 − i), for the
/// first 13 (the extension zips its 13 scales with the residuals: any
/// past them get none).
pub fn soft_factor(i: usize) -> f64 {
    if i < 13 {
        0.825f64.powi(12 - i as i32)
    } else {
        0.0
    }
}

/// A control as a Predict names it, checked: which ControlNet, its hint
/// (the image as sent, or the embedding the stream holds), its scales.
pub struct ControlSpec {
    pub name: String,
    /// `controls[i]`, for errors.
    pub field: String,
    pub hint: Hint,
    pub scale: f64,
    pub uncond_scale: f64,
    pub soft: bool,
    /// A union ControlNet's control type.
    pub mode: Option<i64>,
}

/// A control's hint as a step brings it.
pub enum Hint {
    /// The image as sent (1 or B, 3, H, W), values in 0..=1 — for FLUX,
    /// its latents (1 or B, C, h, w); to be embedded, then held under
    /// `keep` (its session tensor's id).
    Image {
        image: Tensor,
        keep: Option<String>,
        field: String,
    },
    /// Its embedding, held by the stream since the image was sent.
    Embedded(Tensor),
}

/// A control resolved: the network and the embedded hint.
pub struct Control {
    pub net: Arc<Loaded>,
    /// (1 or B, width, h, w); FLUX: (1 or B, tokens, dim)
    pub hint: Tensor,
    pub scale: f64,
    pub uncond_scale: f64,
    pub soft: bool,
    pub mode: Option<i64>,
}

impl Clone for Control {
    fn clone(&self) -> Self {
        Control {
            net: self.net.clone(),
            hint: self.hint.shallow_clone(),
            scale: self.scale,
            uncond_scale: self.uncond_scale,
            soft: self.soft,
            mode: self.mode,
        }
    }
}

/// A ControlNet loaded from the folder (its identity, its cost).
pub type Loaded = crate::folder::Loaded<ControlNetwork>;

impl crate::folder::Item for ControlNetwork {
    fn bytes(&self) -> u64 {
        ControlNetwork::bytes(self)
    }
}

/// The ControlNets of `--controlnet-dir`.
pub type ControlStore = crate::folder::Store<ControlNetwork>;

/// The `--controlnet-dir` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ControlArgs {
    /// Folder of ControlNets requests may name: for SD and SDXL, diffusers
    /// ControlNetModel folders and single `.safetensors` files (the
    /// original `control_model.*` layout, or diffusers' names); for FLUX.1,
    /// diffusers FluxControlNetModel folders; read again as it changes.
    #[arg(long, env = "SD_CONTROLNET_DIR")]
    pub controlnet_dir: Option<PathBuf>,
    /// Memory for loaded ControlNets, MiB (least recently used out; one is
    /// always kept).
    #[arg(long, env = "SD_CONTROLNET_CACHE_MB", default_value_t = 4096)]
    pub controlnet_cache_mb: usize,
}

/// How to measure a loaded ControlNet against the UNet: its forward's
/// seconds over the UNet's at the same size and rows.
pub type Measure = Box<dyn Fn(&ControlNetwork) -> Option<f64> + Send + Sync>;

/// The store of `--controlnet-dir` for the network configured as `base`
/// (None: the network takes no ControlNet, and any named is refused).
pub fn store(
    args: &ControlArgs,
    base: Option<ControlBase>,
    placement: Placement,
    measure: Option<Measure>,
) -> anyhow::Result<ControlStore> {
    let load: crate::folder::LoadFn<ControlNetwork> = match base {
        None => Err(
            "this model's network takes no ControlNet (SD 1.x/2.x and SDXL UNets and \
                     the FLUX.1 transformer do)",
        ),
        Some(base) => Ok(Box::new(move |path: &Path, name: &str| {
            let net = ControlNetwork::load(path, &base, placement)
                .map_err(|e| format!("ControlNet `{name}`: {e}"))?;
            fits(&net, &base)
                .map_err(|e| format!("ControlNet `{name}` is for another model: {e}"))?;
            let ratio = measure.as_ref().and_then(|m| m(&net));
            Ok((net, ratio))
        })),
    };
    crate::folder::Store::new(
        "ControlNet",
        args.controlnet_dir.clone(),
        args.controlnet_cache_mb,
        true,
        load,
    )
}

/// Whether a loaded ControlNet steers the network configured as `base`.
fn fits(net: &ControlNetwork, base: &ControlBase) -> Result<(), String> {
    match (net, base) {
        (ControlNetwork::Unet(net), ControlBase::Unet(base)) => {
            let with_ids = |yes: bool| if yes { " with SDXL's time ids" } else { "" };
            if net.context_dim() != base.context_dim()
                || net.takes_text_time() != base.text_time().is_some()
            {
                return Err(format!(
                    "it attends to {}-wide text{}, this UNet to {}-wide{}",
                    net.context_dim(),
                    with_ids(net.takes_text_time()),
                    base.context_dim(),
                    with_ids(base.text_time().is_some()),
                ));
            }
            Ok(())
        }
        (ControlNetwork::Flux(net), ControlBase::Flux(base)) => {
            let c = net.config();
            if c.guidance_embeds && !base.guidance_embeds {
                return Err(
                    "it takes a guidance value (made for FLUX.1-dev); this transformer \
                            takes none (schnell)"
                        .into(),
                );
            }
            let shape = |c: &sd_models::flux::FluxConfig| {
                (
                    c.in_channels,
                    c.inner_dim(),
                    c.joint_attention_dim,
                    c.pooled_projection_dim,
                )
            };
            if shape(c) != shape(base) {
                return Err(format!(
                    "(in channels, width, text width, pooled width) {:?}, the transformer's {:?}",
                    shape(c),
                    shape(base)
                ));
            }
            Ok(())
        }
        _ => Err("a ControlNet of another network family".into()),
    }
}

/// What a listing says of a ControlNet.
pub fn info(l: crate::folder::Listing<ControlNetwork>) -> ControlNetInfo {
    ControlNetInfo {
        union_modes: match &l.item {
            Some(n) => n.union_modes().unwrap_or(0).max(0) as u32,
            None => configured_union_modes(&l.path),
        },
        name: l.name,
        layout: l.layout.to_string(),
        file_bytes: l.file_bytes,
        version: l.version,
        cost_ratio: l.cost_ratio.unwrap_or(0.0),
        short_hash: l.short_hash,
    }
}

/// A FLUX ControlNet folder's `num_mode` as its config says, before it is
/// loaded (0: none, or not such a folder).
fn configured_union_modes(path: &Path) -> u32 {
    std::fs::read_to_string(path.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("num_mode")?.as_u64())
        .map_or(0, |n| n.min(u64::from(u32::MAX)) as u32)
}

/// A hint embedding to hold under a session tensor's id: (id, embedding,
/// field).
pub type Keep = (String, Tensor, String);

/// The controls of a decoded step, resolved: each network found (or
/// loaded), each sent image embedded; the embeddings to hold by the
/// stream in the images' place. Blocking when [`needs_blocking`].
pub fn resolve(
    specs: Vec<ControlSpec>,
    store: &ControlStore,
) -> Result<(Vec<Control>, Vec<Keep>), ServiceError> {
    let mut out = Vec::with_capacity(specs.len());
    let mut keeps = Vec::new();
    for spec in specs {
        let net = match store.recent(&spec.name) {
            Some(n) => n,
            None => store.get(&spec.name, &format!("{}.name", spec.field))?,
        };
        check_kind(&spec, &net.item)?;
        let hint = match spec.hint {
            Hint::Embedded(t) => t,
            Hint::Image { image, keep, field } => {
                let t = net.item.embed(&image).map_err(|e| {
                    ServiceError::invalid(&field, format_args!("ControlNet `{}`: {e}", spec.name))
                })?;
                if let Some(id) = keep {
                    keeps.push((id, t.shallow_clone(), field));
                }
                t
            }
        };
        out.push(Control {
            net,
            hint,
            scale: spec.scale,
            uncond_scale: spec.uncond_scale,
            soft: spec.soft,
            mode: spec.mode,
        });
    }
    Ok((out, keeps))
}

/// A control's options fit its network: a union's control type within
/// its types (and only a union's), soft injection only on a UNet's.
fn check_kind(spec: &ControlSpec, net: &ControlNetwork) -> Result<(), ServiceError> {
    let field = |f: &str| format!("{}.{f}", spec.field);
    match (net.union_modes(), spec.mode) {
        (Some(n), None) => Err(ServiceError::invalid(
            field("union_mode"),
            format_args!(
                "ControlNet `{}` is a union of {n} control types: name one (0..{n})",
                spec.name
            ),
        )),
        (Some(n), Some(m)) if !(0..n).contains(&m) => Err(ServiceError::invalid(
            field("union_mode"),
            format_args!("{m}: ControlNet `{}` has control types 0..{n}", spec.name),
        )),
        (None, Some(m)) => Err(ServiceError::invalid(
            field("union_mode"),
            format_args!("{m} given, but ControlNet `{}` is not a union", spec.name),
        )),
        _ if spec.soft && net.takes_latents() => Err(ServiceError::invalid(
            field("soft"),
            "soft injection (A1111's control modes) applies to UNet ControlNets, not FLUX's",
        )),
        _ => Ok(()),
    }
}

/// Whether resolving `specs` may block: a network not recently checked,
/// or an image to embed.
pub fn needs_blocking(specs: &[ControlSpec], store: &ControlStore) -> bool {
    specs
        .iter()
        .any(|s| matches!(s.hint, Hint::Image { .. }) || store.recent(&s.name).is_none())
}

/// One half's rows of a batched forward and the controls on them.
pub struct RowControls {
    pub start: i64,
    pub rows: i64,
    /// Each control and its scale on these rows (zero scales left out).
    pub controls: Vec<(Control, f64)>,
    /// FLUX: how many double- and single-block samples the call's
    /// ControlNets merge to — all of them, those at scale 0 too
    /// ([`merged_depth`]).
    pub depth: Option<(usize, usize)>,
    /// Which of the forward's calls these rows are, and whether they are
    /// its unconditional half.
    pub call: usize,
    pub uncond: bool,
}

/// How many samples of each kind (double, single) diffusers'
/// FLUX MultiControlNet keeps of `controls`, in unit order: the first's
/// count, then the smaller of it and each next one's — a ControlNet giving
/// none of a kind leaves it as it is, and a first giving none keeps none
/// (its `zip` over `None`). None: no FLUX ControlNet.
pub fn merged_depth(controls: &[Control]) -> Option<(usize, usize)> {
    let mut depths = controls.iter().filter_map(|c| match &*c.net.item {
        ControlNetwork::Flux(n) => Some((
            n.config().num_layers.max(0) as usize,
            n.config().num_single_layers.max(0) as usize,
        )),
        ControlNetwork::Unet(_) => None,
    });
    let first = depths.next()?;
    let merge = |m: usize, d: usize| if m > 0 && d > 0 { m.min(d) } else { m };
    Some(depths.fold(first, |m, d| (merge(m.0, d.0), merge(m.1, d.1))))
}

/// The network's inputs the ControlNets see, all rows.
pub struct ControlInputs<'a> {
    pub latents: &'a Tensor,
    pub timesteps: &'a Tensor,
    pub context: &'a Tensor,
    pub pooled: Option<&'a Tensor>,
    pub time_ids: Option<&'a Tensor>,
    /// FLUX: each row's call's conditional text and pooled embedding
    /// (diffusers runs a FLUX ControlNet on the prompt's alone, and its
    /// true-CFG negative pass reuses those samples), the guidance value
    /// its ControlNet may take, and the transformer's block counts
    /// (double, single).
    pub flux: Option<FluxInputs<'a>>,
}

/// What a FLUX ControlNet sees beyond the transformer's own inputs.
pub struct FluxInputs<'a> {
    /// Each half's first row and its call's conditional text (rows,
    /// tokens, dim) and pooled embedding (rows, pooled).
    pub cond: &'a [(i64, Tensor, Tensor)],
    /// The guidance value of every row's call (rows,).
    pub guidance: &'a Tensor,
    /// The transformer's double- and single-stream block counts.
    pub blocks: (usize, usize),
}

/// The summed residuals of every control on `halves` (None: no row is
/// controlled): each ControlNet runs once, on the rows that use it
/// (grouped by network), and adds its residuals to those rows, each row
/// at its scale (and A1111's soft factors where asked).
pub fn residuals(
    halves: &[RowControls],
    x: &ControlInputs,
) -> sd_models::Result<Option<ControlResiduals>> {
    // Networks in order of first use, with the rows that use them.
    let mut groups: Vec<(Arc<Loaded>, Vec<Entry>)> = Vec::new();
    for h in halves {
        for (c, scale) in &h.controls {
            let entry = (h.start, h.rows, c, *scale);
            match groups.iter_mut().find(|(n, _)| Arc::ptr_eq(n, &c.net)) {
                Some((_, v)) => v.push(entry),
                None => groups.push((c.net.clone(), vec![entry])),
            }
        }
    }
    if groups.is_empty() {
        return Ok(None);
    }
    match &x.flux {
        None => unet_residuals(&groups, x).map(|r| Some(ControlResiduals::Unet(r))),
        Some(f) => flux_residuals(halves, &groups, x, f).map(|r| Some(ControlResiduals::Flux(r))),
    }
}

/// One network's group: the rows that use it.
type Group<'a> = (Arc<Loaded>, Vec<Entry<'a>>);

/// The rows of a group as an index, and its entries' hints, one per row.
fn group_rows(entries: &[Entry], device: tch::Device) -> (Vec<i64>, Tensor, Tensor) {
    let rows: Vec<i64> = entries
        .iter()
        .flat_map(|(start, n, _, _)| *start..*start + *n)
        .collect();
    let index = Tensor::from_slice(&rows).to_device(device);
    let hints: Vec<Tensor> = entries
        .iter()
        .map(|(_, n, c, _)| {
            let mut size = c.hint.size();
            size[0] = *n;
            c.hint.expand(size, false)
        })
        .collect();
    (rows, index, Tensor::cat(&hints, 0))
}

fn mismatch(name: &str) -> sd_models::ModelError {
    sd_models::ModelError::Input(format!(
        "ControlNet `{name}` is for another network than this forward's"
    ))
}

fn unet_residuals(groups: &[Group], x: &ControlInputs) -> sd_models::Result<Residuals> {
    let total_rows = x.latents.size()[0];
    let mut sum: Option<Residuals> = None;
    for (net, entries) in groups {
        let ControlNetwork::Unet(item) = &*net.item else {
            return Err(mismatch(&net.name));
        };
        let (rows, index, hint) = group_rows(entries, x.latents.device());
        let pick = |t: &Tensor| t.index_select(0, &index.to_device(t.device()));
        let (pooled, time_ids) = (x.pooled.map(pick), x.time_ids.map(pick));
        let r = item.forward(
            &pick(x.latents),
            &pick(x.timesteps),
            &pick(x.context),
            Added {
                text_embeds: pooled.as_ref(),
                time_ids: time_ids.as_ref(),
                timestep_cond: None,
                control: None,
            },
            &hint,
        )?;
        let scales = row_scales(entries, rows.len(), r.down.len() + 1);
        let all: Vec<&Tensor> = r.down.iter().chain(std::iter::once(&r.mid)).collect();
        let acc = sum.get_or_insert_with(|| Residuals {
            down: r.down.iter().map(|t| zeros_for(t, total_rows)).collect(),
            mid: zeros_for(&r.mid, total_rows),
        });
        if acc.down.len() != r.down.len() {
            return Err(sd_models::ModelError::Input(format!(
                "ControlNet `{}` gives {} residuals, another on this forward {}",
                net.name,
                r.down.len(),
                acc.down.len()
            )));
        }
        let targets = acc.down.iter_mut().chain(std::iter::once(&mut acc.mid));
        for (k, (target, res)) in targets.zip(all).enumerate() {
            let s = scales
                .select(1, k as i64)
                .to_device(res.device())
                .to_kind(res.kind())
                .view([-1, 1, 1, 1]);
            if target.size()[1..] != res.size()[1..] {
                return Err(sd_models::ModelError::Input(format!(
                    "ControlNet `{}`: residual {k} {:?} does not match {:?}",
                    net.name,
                    res.size(),
                    target.size()
                )));
            }
            let _ = target.index_add_(0, &index.to_device(res.device()), &(res * s));
        }
    }
    sum.ok_or_else(|| sd_models::ModelError::Input("no ControlNet ran".into()))
}

/// FLUX: each ControlNet on its rows (with their calls' conditional text,
/// each row's control type), its samples summed into each row at its
/// scale. Several ControlNets on one call merge as diffusers'
/// MultiControlNet does: sample k of each summed, as many as the
/// shallowest gives. When the calls of one forward merge to different
/// counts, the samples are laid out one per transformer block instead.
fn flux_residuals(
    halves: &[RowControls],
    groups: &[Group],
    x: &ControlInputs,
    f: &FluxInputs,
) -> sd_models::Result<FluxResiduals> {
    // Each controlled half's merged sample counts.
    let merged: Vec<(i64, (usize, usize))> = halves
        .iter()
        .filter(|h| !h.controls.is_empty())
        .map(|h| (h.start, h.depth.unwrap_or((0, 0))))
        .collect();
    let common = merged
        .first()
        .map(|(_, m)| *m)
        .filter(|m| merged.iter().all(|(_, o)| o == m));
    let (slots_d, slots_s) = common.unwrap_or(f.blocks);
    let total_rows = x.latents.size()[0];
    let (mut double, mut single): (Vec<Tensor>, Vec<Tensor>) = (Vec::new(), Vec::new());
    let twins = twins(halves);
    for (net, entries) in &by_text_length(groups, f.cond) {
        let ControlNetwork::Flux(item) = &*net.item else {
            return Err(mismatch(&net.name));
        };
        // A true-CFG call's unconditional rows take its conditional rows'
        // samples (the same inputs): not run again.
        let entries: Vec<Entry> = entries
            .iter()
            .filter(|e| !twins.iter().any(|t| t.0 == e.0))
            .copied()
            .collect();
        if entries.is_empty() {
            continue;
        }
        let entries = &entries;
        let (_, index, hint) = group_rows(entries, x.latents.device());
        let pick = |t: &Tensor| t.index_select(0, &index.to_device(t.device()));
        // Each entry's call's conditional text and pooled embedding.
        let cond: Vec<&(i64, Tensor, Tensor)> = entries
            .iter()
            .filter_map(|(start, ..)| f.cond.iter().find(|c| c.0 == *start))
            .collect();
        let context = Tensor::cat(&cond.iter().map(|c| &c.1).collect::<Vec<_>>(), 0);
        let pooled = Tensor::cat(&cond.iter().map(|c| &c.2).collect::<Vec<_>>(), 0);
        let modes: Option<Tensor> = item.union_modes().map(|_| {
            let m: Vec<i64> = entries
                .iter()
                .flat_map(|(_, n, c, _)| std::iter::repeat_n(c.mode.unwrap_or(0), *n as usize))
                .collect();
            Tensor::from_slice(&m)
        });
        let guidance = pick(f.guidance);
        let r = item.forward(
            &pick(x.latents),
            &pick(x.timesteps),
            &context,
            Some(&pooled),
            item.takes_guidance().then_some(&guidance),
            &hint,
            modes.as_ref(),
        )?;
        let mut offset = 0;
        for (start, n, _, scale) in entries {
            let m = merged
                .iter()
                .find(|(s, _)| s == start)
                .map_or((0, 0), |(_, m)| *m);
            let add = |acc: &mut Vec<Tensor>, samples: &[Tensor], slots: usize, m: usize| {
                for (j, slot) in (0..slots).map(|j| (j, source(j, slots, m, common.is_some()))) {
                    let Some(sample) = slot.and_then(|k| samples.get(k)) else {
                        continue;
                    };
                    if acc.len() < slots {
                        acc.resize_with(slots, || zeros_for(sample, total_rows));
                    }
                    let mut rows = acc[j].narrow(0, *start, *n);
                    rows += sample.narrow(0, offset, *n) * *scale;
                }
            };
            add(&mut double, &r.double, slots_d, m.0);
            add(&mut single, &r.single, slots_s, m.1);
            offset += n;
        }
    }
    for (u, c, n) in twins {
        for t in double.iter_mut().chain(single.iter_mut()) {
            let from = t.narrow(0, c, n).copy();
            t.narrow(0, u, n).copy_(&from);
        }
    }
    Ok(FluxResiduals { double, single })
}

/// The unconditional halves whose call's conditional half is in the same
/// forward with the same ControlNets at the same scales: (its first row,
/// the conditional half's, rows). diffusers' true CFG gives the negative
/// pass the prompt's samples, which those rows would compute again.
fn twins(halves: &[RowControls]) -> Vec<(i64, i64, i64)> {
    let same = |a: &[(Control, f64)], b: &[(Control, f64)]| {
        a.len() == b.len()
            && a.iter().zip(b).all(|((x, s), (y, t))| {
                Arc::ptr_eq(&x.net, &y.net)
                    && s == t
                    && x.mode == y.mode
                    && x.hint.size() == y.hint.size()
            })
    };
    halves
        .iter()
        .filter(|h| h.uncond && !h.controls.is_empty())
        .filter_map(|h| {
            halves
                .iter()
                .find(|g| g.call == h.call && !g.uncond && same(&g.controls, &h.controls))
                .map(|g| (h.start, g.start, h.rows))
        })
        .collect()
}

/// Each group split by the length of its rows' conditional texts (one
/// ControlNet forward each).
fn by_text_length<'a>(groups: &[Group<'a>], cond: &[(i64, Tensor, Tensor)]) -> Vec<Group<'a>> {
    let mut out: Vec<(i64, Group)> = Vec::new();
    for (net, entries) in groups {
        for e in entries {
            let tokens = cond
                .iter()
                .find(|c| c.0 == e.0)
                .map_or(0, |c| c.1.size()[1]);
            match out
                .iter_mut()
                .find(|(t, (n, _))| *t == tokens && Arc::ptr_eq(n, net))
            {
                Some((_, (_, v))) => v.push(*e),
                None => out.push((tokens, (net.clone(), vec![*e]))),
            }
        }
    }
    out.into_iter().map(|(_, g)| g).collect()
}

/// Which of a ControlNet's samples goes to slot `j` of `slots`, its call
/// merging `m` samples: sample j itself when the forward's slots are the
/// merged samples, else (one slot per block) diffusers' interval rule.
fn source(j: usize, slots: usize, m: usize, merged: bool) -> Option<usize> {
    if m == 0 {
        return None;
    }
    if merged {
        return (j < m).then_some(j);
    }
    Some(j / slots.div_ceil(m).max(1))
}

/// Rows of one ControlNet's group: (first row, rows, the control, its
/// scale on them).
type Entry<'a> = (i64, i64, &'a Control, f64);
/// Each of `rows` rows' scale for each of `n_res` residuals, (rows, n_res):
/// its control's scale, times A1111's soft factor where asked.
fn row_scales(entries: &[Entry], rows: usize, n_res: usize) -> Tensor {
    let mut scales = vec![0f32; rows * n_res];
    let mut at = 0;
    for (_, n, c, scale) in entries {
        for _ in 0..*n {
            for k in 0..n_res {
                let factor = if c.soft { soft_factor(k) } else { 1.0 };
                scales[at * n_res + k] = (scale * factor) as f32;
            }
            at += 1;
        }
    }
    Tensor::from_slice(&scales).view([rows as i64, n_res as i64])
}

/// Zeros shaped as `t` past its rows, `rows` rows.
fn zeros_for(t: &Tensor, rows: i64) -> Tensor {
    let mut size = t.size();
    size[0] = rows;
    Tensor::zeros(size, (t.kind(), t.device()))
}
