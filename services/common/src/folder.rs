//! A folder of networks requests name (ControlNets, IP-Adapters): listed
//! as it is now, each loaded on first use and kept — looked at again on
//! disk at most once a second, read again when its files change — within a
//! memory bound (least recently used out; the newest always stays).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ServiceError;

/// What a store holds.
pub trait Item: Send + Sync + 'static {
    /// Bytes of its weights in memory.
    fn bytes(&self) -> u64;
}

/// A network loaded from the folder, with its identity and its cost.
pub struct Loaded<T> {
    pub name: String,
    /// Its files' identity (sizes and modification times).
    pub version: String,
    pub item: Arc<T>,
    /// Its forward's seconds over the UNet's at the same size and rows,
    /// measured when it was loaded (None: not measured).
    pub cost_ratio: Option<f64>,
    /// `folder` (diffusers) or `file`.
    pub layout: &'static str,
    pub file_bytes: u64,
}

/// What a listing says of one entry.
pub struct Listing<T> {
    pub name: String,
    pub layout: &'static str,
    pub file_bytes: u64,
    pub version: String,
    /// Known once loaded.
    pub cost_ratio: Option<f64>,
    /// AUTOMATIC1111's short hash of its weights file.
    pub short_hash: String,
    /// The network, when loaded from its current files.
    pub item: Option<Arc<T>>,
    /// Its folder or file.
    pub path: PathBuf,
}

/// How an entry at a path is loaded (and measured): the item and its cost
/// ratio, or why it is refused; Err: the network takes none of these.
pub type LoadFn<T> = Result<
    Box<dyn Fn(&Path, &str) -> Result<(T, Option<f64>), String> + Send + Sync>,
    &'static str,
>;

/// Entries loaded, by name, with when each was last used.
type Held<T> = HashMap<String, (Instant, Arc<Loaded<T>>)>;

pub struct Store<T> {
    /// What it holds, for messages ("ControlNet").
    what: &'static str,
    dir: Option<PathBuf>,
    /// Diffusers folders are entries (else `.safetensors` files alone).
    folders: bool,
    budget: u64,
    loaded: Mutex<Held<T>>,
    /// One load at a time: requests naming a new entry at once wait for
    /// one read of it.
    loading: Mutex<()>,
    load: LoadFn<T>,
    /// When each name was last found unchanged on disk.
    checked: Mutex<HashMap<String, Instant>>,
}

/// How long an entry found unchanged on disk is not looked at again.
const RECHECK: Duration = Duration::from_secs(1);

/// Extensions of pickled checkpoints, refused by name.
const PICKLES: [&str; 4] = ["pth", "ckpt", "bin", "pt"];

impl<T: Item> Store<T> {
    pub fn new(
        what: &'static str,
        dir: Option<PathBuf>,
        cache_mb: usize,
        folders: bool,
        load: LoadFn<T>,
    ) -> anyhow::Result<Self> {
        if let Some(d) = &dir {
            anyhow::ensure!(d.is_dir(), "{what} folder {}: not a directory", d.display());
        }
        Ok(Store {
            what,
            dir,
            folders,
            budget: (cache_mb as u64) << 20,
            loaded: Mutex::new(HashMap::new()),
            loading: Mutex::new(()),
            load,
            checked: Mutex::new(HashMap::new()),
        })
    }

    /// Every entry in the folder.
    pub fn list(&self) -> Result<Vec<Listing<T>>, ServiceError> {
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
                    self.folders.then_some(name)?
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
    pub fn info(&self, name: &str) -> Option<Listing<T>> {
        let (path, layout, file_bytes, version) = self.locate(name).ok()?;
        let loaded = self
            .lock()
            .get(name)
            .map(|(_, l)| l.clone())
            .filter(|l| l.version == version);
        Some(Listing {
            name: name.to_string(),
            layout,
            file_bytes,
            cost_ratio: loaded.as_ref().and_then(|l| l.cost_ratio),
            item: loaded.map(|l| l.item.clone()),
            version,
            short_hash: short_hash(&path),
            path,
        })
    }

    /// Where `name` is: its path, layout, bytes and version; a refusal's
    /// message otherwise.
    fn locate(&self, name: &str) -> Result<(PathBuf, &'static str, u64, String), String> {
        let what = self.what;
        let Some(dir) = &self.dir else {
            return Err(format!(
                "unknown {what} `{name}`: this server has no {what} folder"
            ));
        };
        if name.is_empty()
            || name.starts_with('.')
            || name.contains(['/', '\\'])
            || name.len() > 200
        {
            return Err(format!(
                "{} is not a {what} name",
                sd_proto::status::quote(name)
            ));
        }
        let folder = dir.join(name);
        if self.folders && folder.is_dir() {
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
        for ext in PICKLES {
            if dir.join(format!("{name}.{ext}")).is_file() {
                return Err(format!(
                    "{what} `{name}` is a pickle ({name}.{ext}): pickles can run arbitrary code \
                     and are refused; convert it to .safetensors"
                ));
            }
        }
        let file = dir.join(format!("{name}.safetensors"));
        match std::fs::metadata(&file) {
            Ok(m) if m.is_file() => {
                Ok((file, "file", m.len(), format!("{}-{}", m.len(), mtime(&m))))
            }
            _ => Err(format!(
                "unknown {what} `{name}` (nothing of that name in the {what} folder)"
            )),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held<T>> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `name` as loaded and checked within the last second, with no file
    /// touched (what each step needs); None: look again.
    pub fn recent(&self, name: &str) -> Option<Arc<Loaded<T>>> {
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

    /// `name`, loaded (or found loaded, unchanged on disk); errors name
    /// `field`. Blocking: it may read files.
    pub fn get(&self, name: &str, field: &str) -> Result<Arc<Loaded<T>>, ServiceError> {
        let load = self
            .load
            .as_ref()
            .map_err(|why| ServiceError::invalid(field, why))?;
        let (path, layout, file_bytes, version) = self
            .locate(name)
            .map_err(|m| ServiceError::invalid(field, m))?;
        let found = |l: &Arc<Loaded<T>>| {
            self.checked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(name.to_string(), Instant::now());
            l.clone()
        };
        let current = |held: &Held<T>| {
            held.get(name)
                .filter(|(_, l)| l.version == version)
                .map(|(_, l)| l.clone())
        };
        if let Some(l) = current(&self.lock()) {
            return Ok(found(&l));
        }
        let _one = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = current(&self.lock()) {
            return Ok(found(&l));
        }
        let start = Instant::now();
        let (item, cost_ratio) = load(&path, name).map_err(|m| ServiceError::invalid(field, m))?;
        let loaded = Arc::new(Loaded {
            name: name.to_string(),
            version,
            cost_ratio,
            layout,
            file_bytes,
            item: Arc::new(item),
        });
        tracing::info!(
            what = self.what,
            name,
            bytes = loaded.item.bytes(),
            seconds = start.elapsed().as_secs_f64(),
            cost_ratio,
            "loaded"
        );
        self.keep(name, &loaded);
        Ok(found(&loaded))
    }

    /// Hold `loaded`, the least recently used out past the budget.
    fn keep(&self, name: &str, loaded: &Arc<Loaded<T>>) {
        let mut map = self.lock();
        map.insert(name.to_string(), (Instant::now(), loaded.clone()));
        loop {
            let total: u64 = map.values().map(|(_, l)| l.item.bytes()).sum();
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
