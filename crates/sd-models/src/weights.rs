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
    kind: Kind,
    dtype: String,
    shape: Vec<i64>,
    start: usize,
    end: usize,
}

/// One safetensors file, mapped, with the placement its tensors are loaded to.
pub struct Weights {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    tensors: HashMap<String, Info>,
    placement: Placement,
    used: RefCell<BTreeSet<String>>,
}

fn kind_of(dtype: &str) -> Option<Kind> {
    Some(match dtype {
        "F32" => Kind::Float,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "F64" => Kind::Double,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        _ => return None,
    })
}

impl Weights {
    pub fn open(path: &Path, placement: Placement) -> Result<Self> {
        let bad = |message: String| ModelError::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the file is opened read-only and mapped private; weights
        // files are not modified while a server runs (if one is, the model
        // must be reloaded anyway).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
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
        for (name, value) in header {
            if name == "__metadata__" {
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
                    kind,
                    dtype: raw.dtype,
                    shape: raw.shape,
                    start: data_start + start,
                    end: data_start + end,
                },
            );
        }
        Ok(Weights {
            path: path.to_path_buf(),
            map: Arc::new(map),
            tensors,
            placement,
            used: RefCell::new(BTreeSet::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// The mapping; models hold it so zero-copy CPU tensors stay valid.
    pub fn storage(&self) -> Arc<memmap2::Mmap> {
        self.map.clone()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
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
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        if info.shape != shape {
            return Err(ModelError::Shape {
                path: self.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: info.shape.clone(),
            });
        }
        if !matches!(
            info.kind,
            Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
        ) {
            return Err(ModelError::Dtype {
                path: self.path.clone(),
                name: name.to_string(),
                dtype: info.dtype.clone(),
            });
        }
        self.used.borrow_mut().insert(name.to_string());
        let bytes = &self.map[info.start..info.end];
        let Placement { device, kind } = self.placement;
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(info.kind.elt_size_in_bytes());
        let t = if device == tch::Device::Cpu && info.kind == kind && aligned && !bytes.is_empty() {
            // SAFETY: `bytes` lies within the mapping, is aligned for the element
            // type and holds exactly numel(shape) elements (checked in `open`).
            // Models keep `storage()` alive for as long as the tensor lives, and
            // weights are never written to.
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
}

impl<'a> Vb<'a> {
    pub fn root(weights: &'a Weights, prefix: &str) -> Self {
        Vb {
            weights,
            prefix: prefix.to_string(),
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
        }
    }

    pub fn get(&self, leaf: &str, shape: &[i64]) -> Result<Tensor> {
        self.weights.get(&self.name(leaf), shape)
    }

    pub fn contains(&self, leaf: &str) -> bool {
        self.weights.contains(&self.name(leaf))
    }
}
