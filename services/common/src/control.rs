//! ControlNets on a denoiser's calls: the folder they are read from
//! (`--controlnet-dir`), the controls a Predict names (checked in
//! [`crate::step::Step::decode`], resolved here: the network, and its hint
//! image's embedding — computed when the image is sent and held by the
//! stream in its place, so once per generation), and the residuals of one
//! batched forward: each ControlNet runs on the rows that use it, each row
//! at its own scale, and rows without control get none.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// A ControlNet loaded from the folder, with its identity and its cost.
pub struct Loaded {
    pub name: String,
    /// Its files' identity (sizes and modification times).
    pub version: String,
    pub net: ControlNet,
    /// Its forward's seconds over the UNet's at the same size and rows,
    /// measured when it was loaded (None: not measured).
    pub cost_ratio: Option<f64>,
    pub layout: &'static str,
    pub file_bytes: u64,
}

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

/// How to measure a loaded ControlNet against the UNet: seconds of the
/// UNet's own forward at `side` latents, one row, `tokens` text tokens.
pub type Measure = Box<dyn Fn(&ControlNet) -> Option<f64> + Send + Sync>;

/// The ControlNets of `--controlnet-dir`, loaded on first use and kept
/// (least recently used out past the memory bound).
pub struct ControlStore {
    dir: Option<PathBuf>,
    base: Option<UNetConfig>,
    placement: Placement,
    budget: u64,
    /// Loaded, by name, with when each was last used.
    loaded: Mutex<HashMap<String, (Instant, Arc<Loaded>)>>,
    /// One load at a time: requests naming a new ControlNet at once wait
    /// for one read of it.
    loading: Mutex<()>,
    measure: Option<Measure>,
    /// When each name was last found unchanged on disk.
    checked: Mutex<HashMap<String, Instant>>,
}

/// How long a ControlNet found unchanged on disk is not looked at again.
const RECHECK: Duration = Duration::from_secs(1);

impl ControlStore {
    /// The store for a UNet configured as `base` (None: the network takes
    /// no ControlNet — any named is refused).
    pub fn new(
        args: &ControlArgs,
        base: Option<UNetConfig>,
        placement: Placement,
        measure: Option<Measure>,
    ) -> anyhow::Result<Self> {
        if let Some(d) = &args.controlnet_dir {
            anyhow::ensure!(
                d.is_dir(),
                "--controlnet-dir {}: not a directory",
                d.display()
            );
        }
        Ok(ControlStore {
            dir: args.controlnet_dir.clone(),
            base,
            placement,
            budget: (args.controlnet_cache_mb as u64) << 20,
            loaded: Mutex::new(HashMap::new()),
            loading: Mutex::new(()),
            measure,
            checked: Mutex::new(HashMap::new()),
        })
    }

    /// Every ControlNet in the folder (loaded ones with their cost).
    pub fn list(&self) -> Result<Vec<ControlNetInfo>, ServiceError> {
        let Some(dir) = &self.dir else {
            return Ok(Vec::new());
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|e| ServiceError::Task(format!("{}: {e}", dir.display())))?;
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let stem = if e.path().is_dir() {
                    name
                } else {
                    name.strip_suffix(".safetensors")?.to_string()
                };
                (!stem.starts_with('.')).then_some(stem)
            })
            .collect();
        names.sort();
        names.dedup();
        Ok(names.iter().filter_map(|n| self.info(n)).collect())
    }

    /// What a listing says of `name` (None: not in the folder).
    pub fn info(&self, name: &str) -> Option<ControlNetInfo> {
        let (path, layout, file_bytes, version) = self.locate(name).ok()?;
        let loaded = self.lock().get(name).map(|(_, l)| l.clone());
        Some(ControlNetInfo {
            name: name.to_string(),
            layout: layout.to_string(),
            file_bytes,
            version: version.clone(),
            cost_ratio: loaded
                .filter(|l| l.version == version)
                .and_then(|l| l.cost_ratio)
                .unwrap_or(0.0),
            short_hash: short_hash(&path),
        })
    }

    /// Where `name` is: its path, layout, bytes and version; an error's
    /// message otherwise.
    fn locate(&self, name: &str) -> Result<(PathBuf, &'static str, u64, String), String> {
        let Some(dir) = &self.dir else {
            return Err(format!(
                "unknown ControlNet `{name}`: this server has no ControlNet folder (--controlnet-dir)"
            ));
        };
        if name.is_empty()
            || name.starts_with('.')
            || name.contains(['/', '\\'])
            || name.len() > 200
        {
            return Err(format!(
                "{} is not a ControlNet name",
                sd_proto::status::quote(name)
            ));
        }
        let folder = dir.join(name);
        if folder.is_dir() {
            let mut bytes = 0;
            let mut stamp = 0u128;
            for e in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
                if let Ok(m) = e.metadata() {
                    bytes += m.len();
                    stamp = stamp.max(mtime(&m));
                }
            }
            return Ok((folder, "folder", bytes, format!("{bytes}-{stamp}")));
        }
        for ext in ["pth", "ckpt", "bin", "pt"] {
            if dir.join(format!("{name}.{ext}")).is_file() {
                return Err(format!(
                    "ControlNet `{name}` is a pickle ({name}.{ext}): pickles can run arbitrary \
                     code and are refused; convert it to .safetensors"
                ));
            }
        }
        let file = dir.join(format!("{name}.safetensors"));
        match std::fs::metadata(&file) {
            Ok(m) if m.is_file() => {
                Ok((file, "file", m.len(), format!("{}-{}", m.len(), mtime(&m))))
            }
            _ => Err(format!(
                "unknown ControlNet `{name}` (no folder or .safetensors file of that name in \
                 the ControlNet folder)"
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Arc<Loaded>)>> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ControlNet `name` as loaded and checked within the last second,
    /// with no file touched (what each step needs); None: look again.
    pub fn recent(&self, name: &str) -> Option<Arc<Loaded>> {
        let fresh = self
            .checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .is_some_and(|at| at.elapsed() < RECHECK);
        if !fresh {
            return None;
        }
        let mut loaded = self.lock();
        let entry = loaded.get_mut(name)?;
        entry.0 = Instant::now();
        Some(entry.1.clone())
    }

    /// The ControlNet `name`, loaded (or found loaded, unchanged on disk);
    /// errors name `field`. Blocking: it may read files.
    pub fn get(&self, name: &str, field: &str) -> Result<Arc<Loaded>, ServiceError> {
        let Some(base) = &self.base else {
            return Err(ServiceError::invalid(
                field,
                "this model's network takes no ControlNet (SD 1.x/2.x and SDXL UNets do)",
            ));
        };
        let (path, layout, file_bytes, version) = self
            .locate(name)
            .map_err(|m| ServiceError::invalid(field, m))?;
        let found = |l: &Arc<Loaded>| {
            self.checked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_string(), Instant::now());
            l.clone()
        };
        if let Some((_, l)) = self.lock().get(name).filter(|(_, l)| l.version == version) {
            return Ok(found(l));
        }
        let _one = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, l)) = self.lock().get(name).filter(|(_, l)| l.version == version) {
            return Ok(found(l));
        }
        let start = Instant::now();
        let net = ControlNet::load(&path, base, self.placement)
            .map_err(|e| ServiceError::invalid(field, format_args!("ControlNet `{name}`: {e}")))?;
        let unet = base;
        if net.context_dim() != unet.context_dim()
            || net.takes_text_time() != unet.text_time().is_some()
        {
            return Err(ServiceError::invalid(
                field,
                format_args!(
                    "ControlNet `{name}` is for another model: it attends to {}-wide text{}, this \
                     UNet to {}-wide{}",
                    net.context_dim(),
                    if net.takes_text_time() {
                        " with SDXL's time ids"
                    } else {
                        ""
                    },
                    unet.context_dim(),
                    if unet.text_time().is_some() {
                        " with SDXL's time ids"
                    } else {
                        ""
                    },
                ),
            ));
        }
        let cost_ratio = self.measure.as_ref().and_then(|m| m(&net));
        let loaded = Arc::new(Loaded {
            name: name.to_string(),
            version,
            cost_ratio,
            layout,
            file_bytes,
            net,
        });
        tracing::info!(
            controlnet = name,
            parameters = loaded.net.parameters(),
            seconds = start.elapsed().as_secs_f64(),
            cost_ratio,
            "ControlNet loaded"
        );
        let mut map = self.lock();
        map.insert(name.to_string(), (Instant::now(), loaded.clone()));
        // Least recently used out past the budget; the new one stays.
        loop {
            let total: u64 = map.values().map(|(_, l)| l.net.bytes()).sum();
            if total <= self.budget || map.len() <= 1 {
                break;
            }
            let oldest = map
                .iter()
                .filter(|(n, _)| n.as_str() != name)
                .min_by_key(|(_, (at, _))| *at)
                .map(|(n, _)| n.clone());
            match oldest {
                Some(n) => map.remove(&n),
                None => break,
            };
        }
        drop(map);
        Ok(found(&loaded))
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }
}

/// AUTOMATIC1111's short model hash of the weights at `path` (a folder's
/// weights file): the first 8 hex digits of the SHA-256 of the 64 KiB at
/// 1 MiB (empty when unreadable).
fn short_hash(path: &Path) -> String {
    use sha2::Digest;
    use std::io::{Read, Seek};
    let file = if path.is_dir() {
        [
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.fp16.safetensors",
        ]
        .iter()
        .map(|n| path.join(n))
        .find(|p| p.is_file())
    } else {
        Some(path.to_path_buf())
    };
    let read = |p: &Path| -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(p)?;
        f.seek(std::io::SeekFrom::Start(0x10_0000))?;
        let mut buf = Vec::with_capacity(0x1_0000);
        f.take(0x1_0000).read_to_end(&mut buf)?;
        Ok(buf)
    };
    match file.as_deref().map(read) {
        Some(Ok(bytes)) => {
            let digest = sha2::Sha256::digest(&bytes);
            digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
        }
        _ => String::new(),
    }
}

fn mtime(m: &std::fs::Metadata) -> u128 {
    m.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
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
                let t = net.net.embed(&image).map_err(|e| {
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
        let r = net.net.forward(
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
