//! The LoRA adapters a service applies: files in `--lora-dir`, read on
//! first use, fitted to the service's networks (the text encoders, or the
//! UNet) and kept in a cache bounded in bytes (least recently used out).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sd_models::lora::{Adapter, Applied, KohyaNames, ModuleIndex};
use sd_models::Placement;
use sd_proto::v1::{LoraInfo, LoraRef};
use sd_runtime::lru::ByteLru;
use sd_runtime::metrics::Metrics;

use crate::ServiceError;

/// At most this many adapters per request.
pub const MAX_LORAS: usize = 8;
/// Scales outside ±this are refused (a typo, not a style).
pub const MAX_SCALE: f32 = 10.0;

/// A file's identity in the cache: name, length and modification time, so
/// a replaced file is read again.
type Key = (String, u64, u128);

pub struct LoraStore {
    dir: Option<PathBuf>,
    index: ModuleIndex,
    kohya: KohyaNames,
    placement: Placement,
    cache: Mutex<ByteLru<Key, Arc<Adapter>>>,
    metrics: Arc<Metrics>,
}

/// The `--lora-dir` flags of the services that apply LoRA.
#[derive(clap::Args, Debug, Clone)]
pub struct LoraArgs {
    /// Folder of LoRA files (NAME.safetensors; kohya/A1111 or
    /// diffusers/PEFT format) that requests may name.
    #[arg(long, env = "SD_LORA_DIR")]
    pub lora_dir: Option<PathBuf>,
    /// Memory for loaded adapters, MiB (least recently used out).
    #[arg(long, env = "SD_LORA_CACHE_MB", default_value_t = 1024)]
    pub lora_cache_mb: usize,
}

impl LoraStore {
    pub fn new(
        args: &LoraArgs,
        index: ModuleIndex,
        layers_per_block: usize,
        placement: Placement,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        if let Some(d) = &args.lora_dir {
            anyhow::ensure!(d.is_dir(), "--lora-dir {}: not a directory", d.display());
        }
        let kohya = KohyaNames::new(&index, layers_per_block);
        Ok(LoraStore {
            dir: args.lora_dir.clone(),
            index,
            kohya,
            placement,
            cache: Mutex::new(ByteLru::new(args.lora_cache_mb << 20)),
            metrics,
        })
    }

    /// Every `*.safetensors` in the folder, by name.
    pub fn list(&self) -> Result<Vec<LoraInfo>, ServiceError> {
        let Some(dir) = &self.dir else {
            return Ok(Vec::new());
        };
        let entries = std::fs::read_dir(dir)
            .map_err(|e| ServiceError::Task(format!("{}: {e}", dir.display())))?;
        let mut v: Vec<LoraInfo> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let path = e.path();
                let name = path
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".safetensors")?
                    .to_string();
                let meta = e.metadata().ok().filter(|m| m.is_file())?;
                (!name.starts_with('.')).then_some(LoraInfo {
                    name,
                    file_bytes: meta.len(),
                })
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// The adapters `refs` name, at their scales (zero scales dropped),
    /// each loaded (or found in the cache) and fitted to the model; an
    /// error names the field (`loras[i].name`, `loras[i].scale`). Blocking:
    /// it may read files.
    pub fn resolve(&self, refs: &[LoraRef]) -> Result<Arc<[Applied]>, ServiceError> {
        check(refs)?;
        let mut out = Vec::new();
        for (i, r) in refs.iter().enumerate() {
            let adapter = self.adapter(&r.name, &format!("loras[{i}].name"))?;
            if r.scale != 0.0 {
                out.push(Applied {
                    adapter,
                    scale: f64::from(r.scale),
                });
            }
        }
        Ok(out.into())
    }

    fn adapter(&self, name: &str, field: &str) -> Result<Arc<Adapter>, ServiceError> {
        let Some(dir) = &self.dir else {
            return Err(ServiceError::invalid(
                field,
                format_args!("unknown LoRA `{name}`: this server has no LoRA folder (--lora-dir)"),
            ));
        };
        let path = dir.join(format!("{name}.safetensors"));
        let meta = std::fs::metadata(&path)
            .ok()
            .filter(|m| m.is_file())
            .ok_or_else(|| {
                ServiceError::invalid(
                    field,
                    format_args!(
                        "unknown LoRA `{name}` (no {name}.safetensors in the LoRA folder)"
                    ),
                )
            })?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let key: Key = (name.to_string(), meta.len(), mtime);
        if let Some(a) = self.lock().get(&key) {
            self.metrics.cache_lookup("lora", true);
            return Ok(a);
        }
        self.metrics.cache_lookup("lora", false);
        let start = Instant::now();
        let adapter = Adapter::load(&path, name, &self.index, &self.kohya, self.placement)
            .map_err(|e| ServiceError::invalid(field, format_args!("LoRA `{name}`: {e}")))?;
        let seconds = start.elapsed().as_secs_f64();
        self.metrics.lora_load_seconds.observe(seconds);
        tracing::info!(
            lora = name,
            modules = adapter.len(),
            bytes = adapter.bytes(),
            seconds,
            "LoRA loaded"
        );
        let adapter = Arc::new(adapter);
        let mut cache = self.lock();
        cache.insert(key, adapter.clone(), adapter.bytes() + name.len());
        self.metrics.lora_cache_bytes.set(cache.bytes() as i64);
        Ok(adapter)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ByteLru<Key, Arc<Adapter>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }
}

/// The checks that need no file: count, names, scales, duplicates.
pub fn check(refs: &[LoraRef]) -> Result<(), ServiceError> {
    if refs.len() > MAX_LORAS {
        return Err(ServiceError::invalid(
            "loras",
            format_args!("{} given, at most {MAX_LORAS}", refs.len()),
        ));
    }
    let mut seen = HashSet::new();
    for (i, r) in refs.iter().enumerate() {
        let field = format!("loras[{i}].name");
        let n = &r.name;
        if n.is_empty()
            || n.len() > 128
            || n.starts_with('.')
            || n.contains(['/', '\\', '\0'])
            || n.chars().any(char::is_control)
        {
            return Err(ServiceError::invalid(
                field,
                format_args!(
                    "`{}` is not a LoRA name (a file name without .safetensors)",
                    n.escape_debug()
                ),
            ));
        }
        if !seen.insert(n.as_str()) {
            return Err(ServiceError::invalid(
                field,
                format_args!("`{n}` is named twice"),
            ));
        }
        if !r.scale.is_finite() || r.scale.abs() > MAX_SCALE {
            return Err(ServiceError::invalid(
                format!("loras[{i}].scale"),
                format_args!("{} given, -{MAX_SCALE}..={MAX_SCALE} allowed", r.scale),
            ));
        }
    }
    Ok(())
}
