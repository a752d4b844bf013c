//! Safetensors weights, memory-mapped.
//!
//! The header is parsed here (it is a length-prefixed JSON table), so every
//! error can name the file and the tensor. On CPU, a tensor whose stored dtype
//! is the one asked for is built over the mapped file without a copy; other
//! tensors are converted (and moved to the GPU) one at a time, so peak memory
//! stays near one copy of the weights.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::device::Placement;
use crate::error::{ModelError, Result};

#[derive(Debug, Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<i64>,
    data_offsets: [usize; 2],
}

#[derive(Debug)]
struct Info {
    /// Which of the mapped files holds it (0 but for sharded weights).
    file: usize,
    kind: Kind,
    dtype: String,
    shape: Vec<i64>,
    start: usize,
    end: usize,
}

/// How a tensor the networks ask for is made from one stored in the file
/// (a single-file checkpoint stores some differently from diffusers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// As stored.
    Same,
    /// Rows `start..start + len` of the stored tensor (one of q/k/v in a fused
    /// `in_proj_weight`).
    Rows { start: i64, len: i64 },
    /// The stored 2-d tensor transposed (OpenCLIP's `text_projection`).
    Transpose,
    /// A 1×1 convolution's `[out, in, 1, 1]` weight as a linear `[out, in]`.
    Flatten1x1,
    /// The two halves of the first axis swapped (BFL's final modulation:
    /// shift then scale, where diffusers has scale then shift).
    SwapHalves,
}

impl Transform {
    /// The shape this transform makes of a stored `shape` (None: it does not apply).
    fn shape(self, stored: &[i64]) -> Option<Vec<i64>> {
        match self {
            Transform::Same => Some(stored.to_vec()),
            Transform::Rows { start, len } => {
                let (&rows, rest) = stored.split_first()?;
                (start >= 0 && len > 0 && start + len <= rows).then(|| {
                    let mut s = vec![len];
                    s.extend_from_slice(rest);
                    s
                })
            }
            Transform::Transpose => match stored {
                [a, b] => Some(vec![*b, *a]),
                _ => None,
            },
            Transform::Flatten1x1 => match stored {
                [o, i, 1, 1] => Some(vec![*o, *i]),
                [o, i] => Some(vec![*o, *i]),
                _ => None,
            },
            Transform::SwapHalves => match stored.first() {
                Some(&n) if n % 2 == 0 => Some(stored.to_vec()),
                _ => None,
            },
        }
    }

    fn apply(self, t: Tensor) -> Result<Tensor> {
        Ok(match self {
            Transform::Same => t,
            Transform::Rows { start, len } => {
                // A copy: a view would keep the whole fused tensor alive
                // (a converted one three times over, once per q, k and v).
                let rows = t.f_narrow(0, start, len)?;
                let mut out = rows.f_empty_like()?;
                out.f_copy_(&rows)?;
                out
            }
            Transform::Transpose => t.f_tr()?.f_contiguous()?,
            Transform::Flatten1x1 => {
                let s = t.size();
                t.f_reshape([s[0], s[1]])?
            }
            Transform::SwapHalves => {
                let n = t.size()[0] / 2;
                Tensor::f_cat(&[t.f_narrow(0, n, n)?, t.f_narrow(0, 0, n)?], 0)?
            }
        })
    }
}

/// Where a tensor the networks ask for (a diffusers name) is in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias {
    pub source: String,
    pub transform: Transform,
}

impl Alias {
    pub fn same(source: impl Into<String>) -> Self {
        Alias {
            source: source.into(),
            transform: Transform::Same,
        }
    }
}

/// The mapped files of a network's weights; models hold it so zero-copy
/// CPU tensors stay valid.
pub type Storage = Arc<Vec<memmap2::Mmap>>;

/// One safetensors file — or the shards a `*.safetensors.index.json` lists —
/// mapped, with the placement its tensors are loaded to.
pub struct Weights {
    path: PathBuf,
    maps: Storage,
    tensors: HashMap<String, Info>,
    placement: Placement,
    used: RefCell<BTreeSet<String>>,
    /// For a file in another layout: the diffusers names the networks ask
    /// for, mapped to what is stored (None: the file is in diffusers' names).
    aliases: Option<HashMap<String, Alias>>,
    /// The network these weights are for (`unet`, `text_encoder`, …): its
    /// layers register under it for LoRA (empty: none).
    namespace: String,
    /// The LoRA-capable modules loaded from these weights.
    modules: RefCell<crate::modules::ModuleIndex>,
    /// The file's `__metadata__` strings.
    metadata: HashMap<String, String>,
    /// How linear layers in an fp8 scope keep their weights.
    fp8: crate::device::Fp8,
}

/// Whether `path` is a sharded checkpoint's index
/// (`*.safetensors.index.json`, or a variant's `*.safetensors.index.fp16.json`).
pub fn is_index(path: &Path) -> bool {
    let name = path.to_string_lossy();
    name.contains(".safetensors.index") && name.ends_with(".json")
}

fn kind_of(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "F64" => Kind::Double,
        // FLUX's most downloaded files: upcast to the placement at load.
        "F8_E4M3" => Kind::Float8e4m3fn,
        "F8_E5M2" => Kind::Float8e5m2,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        _ => return None,
    })
}

impl Weights {
    /// A safetensors file, or the shards of a `*.safetensors.index.json`
    /// (its `weight_map` names each tensor's file, beside the index).
    pub fn open(path: &Path, placement: Placement) -> Result<Self> {
        if is_index(path) {
            return Self::open_sharded(path, placement);
        }
        let (map, tensors, metadata) = Self::map_file(path, 0)?;
        Ok(Self::from_parts(
            path,
            vec![map],
            tensors,
            metadata,
            placement,
        ))
    }

    fn from_parts(
        path: &Path,
        maps: Vec<memmap2::Mmap>,
        tensors: HashMap<String, Info>,
        metadata: HashMap<String, String>,
        placement: Placement,
    ) -> Self {
        Weights {
            path: path.to_path_buf(),
            maps: Arc::new(maps),
            tensors,
            placement,
            used: RefCell::new(BTreeSet::new()),
            aliases: None,
            namespace: String::new(),
            modules: RefCell::new(Default::default()),
            metadata,
            fp8: crate::device::Fp8::Off,
        }
    }

    /// The shards an index lists, each mapped; every tensor must be in the
    /// shard the index names, and none in two.
    fn open_sharded(index: &Path, placement: Placement) -> Result<Self> {
        let bad = |message: String| ModelError::Safetensors {
            path: index.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
            path: index.to_path_buf(),
            source,
        })?;
        let parsed: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map = parsed
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no `weight_map` object".into()))?;
        let mut files: Vec<String> = Vec::new();
        let mut wanted: HashMap<&str, usize> = HashMap::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| bad(format!("`{name}`: the file is not a string")))?;
            // A shard beside the index, never a path elsewhere.
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(bad(format!("`{name}`: shard `{file}` is not a file name")));
            }
            let i = match files.iter().position(|f| f == file) {
                Some(i) => i,
                None => {
                    files.push(file.to_string());
                    files.len() - 1
                }
            };
            wanted.insert(name.as_str(), i);
        }
        let dir = index.parent().unwrap_or(Path::new("."));
        let (mut maps, mut tensors, mut metadata) = (Vec::new(), HashMap::new(), HashMap::new());
        for (i, file) in files.iter().enumerate() {
            let (m, t, meta) = Self::map_file(&dir.join(file), i)?;
            for (name, info) in t {
                if wanted.get(name.as_str()) != Some(&i) {
                    return Err(bad(format!(
                        "`{name}` is in {file}, which the index does not name for it"
                    )));
                }
                tensors.insert(name, info);
            }
            metadata.extend(meta);
            maps.push(m);
        }
        if let Some(name) = wanted.keys().find(|n| !tensors.contains_key(**n)) {
            return Err(bad(format!("`{name}` is in none of its shards")));
        }
        Ok(Self::from_parts(index, maps, tensors, metadata, placement))
    }

    /// One file mapped and its header read; its tensors marked as file `file`.
    #[allow(clippy::type_complexity)]
    fn map_file(
        path: &Path,
        file_index: usize,
    ) -> Result<(
        memmap2::Mmap,
        HashMap<String, Info>,
        HashMap<String, String>,
    )> {
        let bad = |message: String| ModelError::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: a mapped file is sound to read only while nobody changes
        // it. The map is private and read-only (MAP_PRIVATE, PROT_READ): we
        // never write through it, and it holds the inode it was made from.
        // What holds: a weights file replaced by writing a new file and
        // renaming it over the old path leaves this map on the old inode,
        // whose pages stay readable for as long as the map lives (the
        // `replacing_the_file_by_rename_*` test below). What does not hold:
        // pages of a private map that were never written are the file's own
        // page cache, so a file rewritten in place shows its new bytes to
        // tensors already loaded, and a file truncated in place makes any
        // read past its new end fault with SIGBUS, which kills the process.
        // Replace weights files by rename; never rewrite or truncate them in
        // place while a server has them open.
        let map =
            unsafe { memmap2::MmapOptions::new().map_copy_read_only(&file) }.map_err(|source| {
                ModelError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        if map.len() < 8 {
            return Err(bad(format!("{} bytes is too short", map.len())));
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&map[..8]);
        let header_len = u64::from_le_bytes(n) as usize;
        let data_start = 8usize
            .checked_add(header_len)
            .filter(|&e| e <= map.len())
            .ok_or_else(|| bad(format!("header length {header_len} overruns the file")))?;
        let header: HashMap<String, serde_json::Value> =
            serde_json::from_slice(&map[8..data_start]).map_err(|e| bad(e.to_string()))?;
        let data_len = map.len() - data_start;
        let mut tensors = HashMap::new();
        let mut metadata = HashMap::new();
        for (name, value) in header {
            if name == "__metadata__" {
                if let Some(o) = value.as_object() {
                    metadata = o
                        .iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect();
                }
                continue;
            }
            let raw: RawInfo =
                serde_json::from_value(value).map_err(|e| bad(format!("`{name}`: {e}")))?;
            let kind = kind_of(&raw.dtype)
                .ok_or_else(|| bad(format!("`{name}`: unsupported dtype {}", raw.dtype)))?;
            let [start, end] = raw.data_offsets;
            let numel: i64 = raw.shape.iter().product();
            let expected = numel as usize * kind.elt_size_in_bytes();
            if start > end || end > data_len || end - start != expected {
                return Err(bad(format!(
                    "`{name}`: data offsets {start}..{end} do not fit shape {:?} ({expected} bytes)",
                    raw.shape
                )));
            }
            tensors.insert(
                name,
                Info {
                    file: file_index,
                    kind,
                    dtype: raw.dtype,
                    shape: raw.shape,
                    start: data_start + start,
                    end: data_start + end,
                },
            );
        }
        Ok((map, tensors, metadata))
    }

    /// Register the layers loaded from these weights under `network` (for LoRA).
    pub fn with_namespace(mut self, network: &str) -> Self {
        self.namespace = network.to_string();
        self
    }

    /// These weights with the linear layers of their fp8 scopes (a FLUX
    /// transformer's blocks) kept as `fp8` says.
    pub fn with_fp8(mut self, fp8: crate::device::Fp8) -> Self {
        self.fp8 = fp8;
        self
    }

    /// A `__metadata__` string of the file.
    pub fn metadata(&self, key: &str) -> Option<String> {
        self.metadata.get(key).cloned()
    }

    /// The LoRA-capable modules loaded so far.
    pub fn module_index(&self) -> crate::modules::ModuleIndex {
        self.modules.borrow().clone()
    }

    /// A LoRA-capable layer at `prefix` (its canonical path, or None when
    /// these weights have no network name).
    pub(crate) fn register(
        &self,
        prefix: &str,
        shape: crate::modules::ModuleShape,
    ) -> Option<Arc<str>> {
        if self.namespace.is_empty() {
            return None;
        }
        // transformers' CLIP files have a `text_model.` level or not; LoRA
        // paths are the same either way.
        let rest = prefix.strip_prefix("text_model.").unwrap_or(prefix);
        let path = format!("{}.{rest}", self.namespace);
        self.modules
            .borrow_mut()
            .modules
            .insert(path.clone(), shape);
        Some(Arc::from(path))
    }

    /// The stored tensors' names and shapes.
    pub fn stored(&self) -> impl Iterator<Item = (&str, &[i64])> {
        self.tensors
            .iter()
            .map(|(k, i)| (k.as_str(), i.shape.as_slice()))
    }

    /// The shape of stored tensor `name`.
    pub fn stored_shape(&self, name: &str) -> Option<&[i64]> {
        self.tensors.get(name).map(|i| i.shape.as_slice())
    }

    /// The stored shape of the tensor a network asks for by `name`
    /// (through the aliases; a transformed alias's is the stored one's).
    pub fn shape_of(&self, name: &str) -> Option<&[i64]> {
        match &self.aliases {
            Some(a) => self.stored_shape(&a.get(name)?.source),
            None => self.stored_shape(name),
        }
    }

    /// Serve the networks' names through `aliases` (a single-file
    /// checkpoint's mapping); names without an alias are missing.
    pub fn with_aliases(mut self, aliases: HashMap<String, Alias>) -> Self {
        self.aliases = Some(aliases);
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The mappings; models hold them so zero-copy CPU tensors stay valid.
    pub fn storage(&self) -> Storage {
        self.maps.clone()
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.aliases {
            Some(a) => a
                .get(name)
                .is_some_and(|a| self.tensors.contains_key(&a.source)),
            None => self.tensors.contains_key(name),
        }
    }

    /// Values in the file, every tensor's elements together.
    pub fn parameter_count(&self) -> u64 {
        self.tensors
            .values()
            .map(|i| i.shape.iter().map(|&d| d.max(0) as u64).product::<u64>())
            .sum()
    }

    /// Names present in the file that no `get` asked for.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// The tensor `name`, checked to have `shape`, in the placement's dtype and device.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let same = Alias::same(name);
        let alias = match &self.aliases {
            Some(a) => a.get(name).ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?,
            None => &same,
        };
        // Errors name the stored tensor, and the network's name where they differ.
        let shown = if alias.source == name {
            name.to_string()
        } else {
            format!("{} (for {name})", alias.source)
        };
        let info = self
            .tensors
            .get(&alias.source)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                name: shown.clone(),
            })?;
        if alias.transform.shape(&info.shape).as_deref() != Some(shape) {
            return Err(ModelError::Shape {
                path: self.path.clone(),
                name: shown,
                expected: shape.to_vec(),
                actual: info.shape.clone(),
            });
        }
        let t = self.stored_tensor(&alias.source, info, &shown)?;
        alias.transform.apply(t)
    }

    fn stored_tensor(&self, name: &str, info: &Info, shown: &str) -> Result<Tensor> {
        let shape = info.shape.as_slice();
        if !matches!(
            info.kind,
            Kind::Float
                | Kind::Half
                | Kind::BFloat16
                | Kind::Double
                | Kind::Float8e4m3fn
                | Kind::Float8e5m2
        ) {
            return Err(ModelError::Dtype {
                path: self.path.clone(),
                name: shown.to_string(),
                dtype: info.dtype.clone(),
            });
        }
        self.used.borrow_mut().insert(name.to_string());
        let bytes = &self.maps[info.file][info.start..info.end];
        let Placement { device, kind } = self.placement;
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(info.kind.elt_size_in_bytes());
        let t = if device == tch::Device::Cpu && info.kind == kind && aligned && !bytes.is_empty() {
            // SAFETY: `bytes` lies within the mapping, is aligned for the element
            // type and holds exactly numel(shape) elements (checked in `open`).
            // Models keep `storage()` alive for as long as the tensor lives.
            // The mapping is read-only, and the networks never write to their
            // weights (an in-place op on this tensor would fault, not corrupt);
            // what the file itself may do underneath is stated in `open`.
            unsafe { Tensor::f_from_blob(bytes.as_ptr(), shape, &[], kind, device)? }
        } else {
            Tensor::f_from_data_size(bytes, shape, info.kind)?
                .f_to_kind(kind)?
                .f_to_device(device)?
        };
        Ok(t)
    }
}

/// A path into a `Weights`, as diffusers' module names nest (`down_blocks.0.resnets.1`).
#[derive(Clone)]
pub struct Vb<'a> {
    weights: &'a Weights,
    prefix: String,
    /// Linear layers under this path take the weights' fp8 storage.
    fp8: bool,
}

impl<'a> Vb<'a> {
    pub fn root(weights: &'a Weights, prefix: &str) -> Self {
        Vb {
            weights,
            prefix: prefix.to_string(),
            fp8: false,
        }
    }

    /// This path, its linear layers kept as the weights' `fp8` says (a
    /// FLUX transformer's blocks).
    pub fn fp8_scope(&self) -> Vb<'a> {
        Vb {
            fp8: true,
            ..self.clone()
        }
    }

    /// How linear layers here keep their weights.
    pub fn fp8(&self) -> crate::device::Fp8 {
        if self.fp8 {
            self.weights.fp8
        } else {
            crate::device::Fp8::Off
        }
    }

    pub fn name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.prefix)
        }
    }

    /// The path of a child module.
    pub fn pp(&self, child: impl std::fmt::Display) -> Vb<'a> {
        Vb {
            weights: self.weights,
            prefix: self.name(&child.to_string()),
            fp8: self.fp8,
        }
    }

    pub fn get(&self, leaf: &str, shape: &[i64]) -> Result<Tensor> {
        self.weights.get(&self.name(leaf), shape)
    }

    pub fn contains(&self, leaf: &str) -> bool {
        self.weights.contains(&self.name(leaf))
    }

    /// The names' prefix (a module's diffusers path).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Register this path as a LoRA-capable layer of `shape`.
    pub fn register(&self, shape: crate::modules::ModuleShape) -> Option<Arc<str>> {
        self.weights.register(&self.prefix, shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file holding one F32 tensor `w`, its data 8-byte aligned.
    fn write_safetensors(path: &Path, values: &[f32]) {
        let bytes = values.len() * 4;
        let mut header = format!(
            r#"{{"w":{{"dtype":"F32","shape":[{}],"data_offsets":[0,{bytes}]}}}}"#,
            values.len()
        );
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        std::fs::write(path, out).expect("write weights");
    }

    fn values(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t).expect("f32 values")
    }

    #[test]
    fn replacing_the_file_by_rename_leaves_loaded_tensors_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("model.safetensors");
        write_safetensors(&path, &[1.0, 2.0, 3.0, 4.0]);
        let weights = Weights::open(&path, Placement::cpu()).expect("open");
        let w = weights.get("w", &[4]).expect("get");
        let maps = weights.storage();
        let map = &maps[0];
        let (start, end) = (map.as_ptr() as usize, map.as_ptr() as usize + map.len());
        assert!(
            (start..end).contains(&(w.data_ptr() as usize)),
            "the tensor must be the zero-copy view over the mapping for this test to mean anything"
        );
        drop(weights);

        let next = dir.path().join("model.safetensors.new");
        write_safetensors(&next, &[9.0, 9.0, 9.0, 9.0]);
        std::fs::rename(&next, &path).expect("rename over");

        let reopened = Weights::open(&path, Placement::cpu()).expect("reopen");
        assert_eq!(values(&reopened.get("w", &[4]).expect("get")), [9.0; 4]);
        assert_eq!(values(&w), [1.0, 2.0, 3.0, 4.0]);
        drop(maps);
    }

    /// The case the SAFETY comment in `open` warns about: a private map is
    /// no snapshot; a file rewritten in place shows through.
    #[test]
    fn a_file_rewritten_in_place_shows_through_the_private_map() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("model.safetensors");
        write_safetensors(&path, &[1.0, 2.0, 3.0, 4.0]);
        let weights = Weights::open(&path, Placement::cpu()).expect("open");
        let w = weights.get("w", &[4]).expect("get");
        let next = dir.path().join("other.safetensors");
        write_safetensors(&next, &[9.0, 9.0, 9.0, 9.0]);
        std::fs::copy(&next, &path).expect("rewrite in place");
        assert_eq!(values(&w), [9.0; 4]);
    }
}
