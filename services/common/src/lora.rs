//! The LoRA adapters a service applies: files in `--lora-dir`, read on
//! first use, fitted to the service's networks (the text encoders, or the
//! UNet) and kept in a cache bounded in bytes (least recently used out).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_models::lora::{Adapter, Applied, KohyaNames, ModuleIndex};
use sd_models::Placement;
use sd_proto::v1::{LoraInfo, LoraRef};
use sd_runtime::lru::ByteLru;
use sd_runtime::metrics::Metrics;

use crate::ServiceError;

/// A file's identity in the cache: name, length and modification time, so
/// a replaced file is read again.
type Key = (String, u64, u128);

pub struct LoraStore {
    dir: Option<PathBuf>,
    index: ModuleIndex,
    kohya: KohyaNames,
    placement: Placement,
    cache: Mutex<ByteLru<Key, Arc<Adapter>>>,
    /// Adapters found on disk in the last [`RECHECK`], by name: a
    /// generation names its adapters every step, and only this is looked at.
    recent: Mutex<HashMap<String, (Instant, Arc<Adapter>)>>,
    metrics: Arc<Metrics>,
    /// One gate per file being read: requests that name a new adapter at
    /// once wait for one read instead of each reading (and holding) it,
    /// and take its outcome — the adapter, or why it was refused.
    loading: Mutex<HashMap<Key, Gate>>,
    /// It serves a UNet (each adapter at its UNet scale), not text
    /// encoders (at its text encoder scale).
    unet: bool,
}

/// A read under way and, once done, its outcome (the refusal's message).
type Gate = Arc<Mutex<Option<Result<Arc<Adapter>, String>>>>;

/// How long a file found unchanged is not looked at again.
const RECHECK: Duration = Duration::from_secs(1);

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
        // The denoising network (a UNet, FLUX's transformer) takes the
        // adapters' UNet scale; the text encoders theirs.
        let unet = index
            .networks()
            .iter()
            .any(|n| n == "unet" || n == "transformer");
        Ok(LoraStore {
            unet,
            dir: args.lora_dir.clone(),
            index,
            kohya,
            placement,
            cache: Mutex::new(ByteLru::new(args.lora_cache_mb << 20)),
            recent: Mutex::new(HashMap::new()),
            loading: Mutex::new(HashMap::new()),
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
                let name = path.file_name()?.to_str()?.strip_suffix(".safetensors")?;
                // names a request cannot give (sd_proto::lora::check)
                if name.starts_with('.') || name.contains([':', '<', '>']) {
                    return None;
                }
                info(name, &path)
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// The listing of the adapters `refs` name (those in the folder), with
    /// no scan of the folder: what a check needs.
    pub fn infos(&self, refs: &[LoraRef]) -> Vec<LoraInfo> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        refs.iter()
            .filter_map(|r| info(&r.name, &dir.join(format!("{}.safetensors", r.name))))
            .collect()
    }

    /// The adapters `refs` name, at their scales (zero scales dropped),
    /// each loaded (or found in the cache) and fitted to the model; an
    /// error names the field (`loras[i].name`, `loras[i].scale`). Blocking:
    /// it may read files.
    pub fn resolve(&self, refs: &[LoraRef]) -> Result<Arc<[Applied]>, ServiceError> {
        check(refs)?;
        let adapters = refs
            .iter()
            .enumerate()
            .map(|(i, r)| self.adapter(&r.name, &format!("loras[{i}].name")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(applied(refs, adapters, self.unet))
    }

    /// As [`LoraStore::resolve`] when every adapter was found on disk in
    /// the last second — no file is touched, nothing blocks (what each step
    /// of a generation needs); None when one must be looked at again.
    pub fn resolve_recent(&self, refs: &[LoraRef]) -> Result<Option<Arc<[Applied]>>, ServiceError> {
        check(refs)?;
        let now = Instant::now();
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let adapters: Option<Vec<_>> = refs
            .iter()
            .map(|r| match recent.get(&r.name) {
                Some((at, a)) if now.duration_since(*at) < RECHECK => Some(a.clone()),
                _ => None,
            })
            .collect();
        Ok(adapters.map(|a| applied(refs, a, self.unet)))
    }

    /// Remember `adapter` as found on disk now (and forget what is stale).
    fn seen(&self, name: &str, adapter: &Arc<Adapter>) {
        let now = Instant::now();
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.retain(|_, (at, _)| now.duration_since(*at) < RECHECK);
        recent.insert(name.to_string(), (now, adapter.clone()));
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
        let key: Key = (name.to_string(), meta.len(), mtime_nanos(&meta));
        let cached = self.lock().get(&key);
        if let Some(a) = cached {
            self.metrics.cache_lookup("lora", true);
            self.seen(name, &a);
            return Ok(a);
        }
        self.metrics.cache_lookup("lora", false);
        // One read per file: wait for a read under way and take its
        // outcome (even one the cache could not keep, or a refusal).
        let gate = self
            .loading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let mut outcome = gate.lock().unwrap_or_else(|e| e.into_inner());
        // (The cache's lock is let go before a read takes it again.)
        let read_meanwhile = self.lock().get(&key);
        let done = match outcome.as_ref() {
            Some(done) => done.clone(),
            None => match read_meanwhile {
                // read by a gate that is gone by now
                Some(a) => Ok(a),
                None => {
                    let loaded = self.load(&path, name, key.clone());
                    *outcome = Some(loaded.clone());
                    let mut loading = self.loading.lock().unwrap_or_else(|e| e.into_inner());
                    if loading.get(&key).is_some_and(|g| Arc::ptr_eq(g, &gate)) {
                        loading.remove(&key);
                    }
                    loaded
                }
            },
        };
        drop(outcome);
        match done {
            Ok(a) => {
                self.seen(name, &a);
                Ok(a)
            }
            Err(message) => Err(ServiceError::invalid(field, message)),
        }
    }

    /// Read `path`, fit it to the model and cache it under `key`; a
    /// refusal's message.
    fn load(&self, path: &Path, name: &str, key: Key) -> Result<Arc<Adapter>, String> {
        let start = Instant::now();
        let adapter = Adapter::load(path, name, &self.index, &self.kohya, self.placement)
            .map_err(|e| format!("LoRA `{name}`: {e}"))?;
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
        drop(cache);
        Ok(adapter)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ByteLru<Key, Arc<Adapter>>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }
}

/// What a listing says of the LoRA file `name` at `path` (None: no such file).
fn info(name: &str, path: &Path) -> Option<LoraInfo> {
    let meta = std::fs::metadata(path).ok().filter(|m| m.is_file())?;
    Some(LoraInfo {
        name: name.to_string(),
        file_bytes: meta.len(),
        version: format!("{}-{}", meta.len(), mtime_nanos(&meta)),
    })
}

/// A file's modification time, nanoseconds since the epoch (0 unknown).
fn mtime_nanos(meta: &std::fs::Metadata) -> u128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

/// Each adapter at its request's scale for a UNet or for text encoders
/// (zero scales dropped).
fn applied(refs: &[LoraRef], adapters: Vec<Arc<Adapter>>, unet: bool) -> Arc<[Applied]> {
    refs.iter()
        .zip(adapters)
        .map(|(r, adapter)| {
            let scale = if unet {
                r.for_unet()
            } else {
                r.for_text_encoder()
            };
            (scale, adapter)
        })
        .filter(|(scale, _)| *scale != 0.0)
        .map(|(scale, adapter)| Applied {
            adapter,
            scale: f64::from(scale),
        })
        .collect()
}

/// The checks that need no file (`sd_proto::lora::check`), as a field violation.
pub fn check(refs: &[LoraRef]) -> Result<(), ServiceError> {
    sd_proto::lora::check(refs).map_err(|e| ServiceError::invalid(e.field, e.message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_models::lora::{ModuleKind, ModuleShape};

    /// A UNet-like index of `n` wide linear layers, and a PEFT file for them.
    fn fixture(dir: &Path, n: usize, width: i64, rank: i64) -> ModuleIndex {
        let mut index = ModuleIndex::default();
        let mut tensors = Vec::new();
        let f = (tch::Kind::Float, tch::Device::Cpu);
        for i in 0..n {
            let path = format!("unet.blocks.{i}.proj");
            index.modules.insert(
                path.clone(),
                ModuleShape {
                    kind: ModuleKind::Linear,
                    input: width,
                    output: width,
                },
            );
            tensors.push((
                format!("{path}.lora_A.weight"),
                tch::Tensor::randn([rank, width], f),
            ));
            tensors.push((
                format!("{path}.lora_B.weight"),
                tch::Tensor::randn([width, rank], f),
            ));
        }
        let named: Vec<(&str, &tch::Tensor)> =
            tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        tch::Tensor::write_safetensors(&named, dir.join("wide.safetensors")).unwrap();
        index
    }

    #[test]
    fn requests_naming_a_new_adapter_at_once_share_one_read() {
        let dir = std::env::temp_dir().join(format!("sd-lora-single-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let index = fixture(&dir, 40, 1024, 64);
        let args = LoraArgs {
            lora_dir: Some(dir.clone()),
            lora_cache_mb: 1024,
        };
        let store =
            LoraStore::new(&args, index, 2, Placement::cpu(), Metrics::new("test")).unwrap();
        let refs = [LoraRef {
            name: "wide".into(),
            scale: 1.0,
            unet_scale: None,
        }];
        let threads = 8;
        let start = std::sync::Barrier::new(threads);
        let sets: Vec<Arc<[Applied]>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        store.resolve(&refs).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let _ = std::fs::remove_dir_all(&dir);
        // Each read makes its own adapter: one read, one adapter for all.
        let first = &sets[0][0].adapter;
        assert_eq!(first.len(), 40);
        for set in &sets {
            assert!(
                Arc::ptr_eq(&set[0].adapter, first),
                "the file was read more than once"
            );
        }
    }

    #[test]
    fn requests_waiting_on_a_refused_file_get_the_refusal_naming_their_field() {
        let dir = std::env::temp_dir().join(format!("sd-lora-refused-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let index = fixture(&dir, 2, 64, 4);
        // The file names a module the model lacks.
        let f = (tch::Kind::Float, tch::Device::Cpu);
        let (a, b) = (
            tch::Tensor::zeros([4, 64], f),
            tch::Tensor::zeros([64, 4], f),
        );
        tch::Tensor::write_safetensors(
            &[
                ("unet.nowhere.lora_A.weight", &a),
                ("unet.nowhere.lora_B.weight", &b),
            ],
            dir.join("misfit.safetensors"),
        )
        .unwrap();
        let args = LoraArgs {
            lora_dir: Some(dir.clone()),
            lora_cache_mb: 1024,
        };
        let store =
            LoraStore::new(&args, index, 2, Placement::cpu(), Metrics::new("test")).unwrap();
        let refs = [
            LoraRef {
                name: "wide".into(),
                scale: 1.0,
                unet_scale: None,
            },
            LoraRef {
                name: "misfit".into(),
                scale: 1.0,
                unet_scale: None,
            },
        ];
        let start = std::sync::Barrier::new(4);
        let errors: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        match store.resolve(&refs) {
                            Ok(_) => "resolved".to_string(),
                            Err(e) => format!("{e:?}"),
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let _ = std::fs::remove_dir_all(&dir);
        for e in errors {
            assert!(e.contains("loras[1].name") && e.contains("misfit"), "{e}");
        }
    }
}
