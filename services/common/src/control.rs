//! ControlNets on a denoiser's calls: the folder they are read from
//! (`--controlnet-dir`), the controls a Predict names (checked in
//! [`crate::step::Step::decode`], resolved here: the network, and its hint
//! image's embedding — computed when the image is sent and held by the
//! stream in its place, so once per generation), and the residuals of one
//! batched forward: each ControlNet runs on the rows that use it, each row
//! at its own scale, and rows without control get none.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sd_models::config::UNetConfig;
use sd_models::{Added, ControlNet, Placement, Residuals};
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
}

/// A control's hint as a step brings it.
pub enum Hint {
    /// The image as sent (1 or B, 3, H, W), values in 0..=1; to be
    /// embedded, then held under `keep` (its session tensor's id).
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
    /// (1 or B, width, h, w)
    pub hint: Tensor,
    pub scale: f64,
    pub uncond_scale: f64,
    pub soft: bool,
}

impl Clone for Control {
    fn clone(&self) -> Self {
        Control {
            net: self.net.clone(),
            hint: self.hint.shallow_clone(),
            scale: self.scale,
            uncond_scale: self.uncond_scale,
            soft: self.soft,
        }
    }
}

/// A ControlNet loaded from the folder (its identity, its cost).
pub type Loaded = crate::folder::Loaded<ControlNet>;

impl crate::folder::Item for ControlNet {
    fn bytes(&self) -> u64 {
        ControlNet::bytes(self)
    }
}

/// The ControlNets of `--controlnet-dir`.
pub type ControlStore = crate::folder::Store<ControlNet>;

/// The `--controlnet-dir` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ControlArgs {
    /// Folder of ControlNets requests may name: diffusers ControlNetModel
    /// folders and single `.safetensors` files (the original
    /// `control_model.*` layout, or diffusers' names); read again as it
    /// changes.
    #[arg(long, env = "SD_CONTROLNET_DIR")]
    pub controlnet_dir: Option<PathBuf>,
    /// Memory for loaded ControlNets, MiB (least recently used out; one is
    /// always kept).
    #[arg(long, env = "SD_CONTROLNET_CACHE_MB", default_value_t = 4096)]
    pub controlnet_cache_mb: usize,
}

/// How to measure a loaded ControlNet against the UNet: its forward's
/// seconds over the UNet's at the same size and rows.
pub type Measure = Box<dyn Fn(&ControlNet) -> Option<f64> + Send + Sync>;

/// The store of `--controlnet-dir` for a UNet configured as `base` (None:
/// the network takes no ControlNet, and any named is refused).
pub fn store(
    args: &ControlArgs,
    base: Option<UNetConfig>,
    placement: Placement,
    measure: Option<Measure>,
) -> anyhow::Result<ControlStore> {
    let load: crate::folder::LoadFn<ControlNet> = match base {
        None => Err("this model's network takes no ControlNet (SD 1.x/2.x and SDXL UNets do)"),
        Some(base) => Ok(Box::new(move |path: &Path, name: &str| {
            let net = ControlNet::load(path, &base, placement)
                .map_err(|e| format!("ControlNet `{name}`: {e}"))?;
            let with_ids = |yes: bool| if yes { " with SDXL's time ids" } else { "" };
            if net.context_dim() != base.context_dim()
                || net.takes_text_time() != base.text_time().is_some()
            {
                return Err(format!(
                    "ControlNet `{name}` is for another model: it attends to {}-wide text{}, \
                     this UNet to {}-wide{}",
                    net.context_dim(),
                    with_ids(net.takes_text_time()),
                    base.context_dim(),
                    with_ids(base.text_time().is_some()),
                ));
            }
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

/// What a listing says of a ControlNet.
pub fn info(l: crate::folder::Listing) -> ControlNetInfo {
    ControlNetInfo {
        name: l.name,
        layout: l.layout.to_string(),
        file_bytes: l.file_bytes,
        version: l.version,
        cost_ratio: l.cost_ratio.unwrap_or(0.0),
        short_hash: l.short_hash,
    }
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
        });
    }
    Ok((out, keeps))
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
}

/// The network's inputs the ControlNets see, all rows.
pub struct ControlInputs<'a> {
    pub latents: &'a Tensor,
    pub timesteps: &'a Tensor,
    pub context: &'a Tensor,
    pub pooled: Option<&'a Tensor>,
    pub time_ids: Option<&'a Tensor>,
}

/// The summed residuals of every control on `halves` (None: no row is
/// controlled): each ControlNet runs once, on the rows that use it
/// (grouped by network), and adds its residuals to those rows, each row
/// at its scale (and A1111's soft factors where asked).
pub fn residuals(
    halves: &[RowControls],
    x: &ControlInputs,
) -> sd_models::Result<Option<Residuals>> {
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
    let total_rows = x.latents.size()[0];
    let mut sum: Option<Residuals> = None;
    for (net, entries) in &groups {
        let rows: Vec<i64> = entries
            .iter()
            .flat_map(|(start, n, _, _)| *start..*start + *n)
            .collect();
        let index = Tensor::from_slice(&rows).to_device(x.latents.device());
        let pick = |t: &Tensor| t.index_select(0, &index.to_device(t.device()));
        let hints: Vec<Tensor> = entries
            .iter()
            .map(|(_, n, c, _)| {
                let mut size = c.hint.size();
                size[0] = *n;
                c.hint.expand(size, false)
            })
            .collect();
        let hint = Tensor::cat(&hints, 0);
        let (pooled, time_ids) = (x.pooled.map(pick), x.time_ids.map(pick));
        let r = net.item.forward(
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
    Ok(sum)
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
