//! One error type for model loading and running.

use std::path::PathBuf;

/// Everything that can go wrong loading or running a network. Each variant
/// names the file and, where there is one, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: missing (expected in the diffusers layout)")]
    MissingFile { path: PathBuf },
    #[error(
        "{path}: pickle checkpoints (.bin/.ckpt/.pt) are refused, they can run arbitrary code; \
         only safetensors are loaded (convert the model, e.g. save_pretrained(safe_serialization=True))"
    )]
    Pickle { path: PathBuf },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Unsupported { path: PathBuf, message: String },
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<i64>,
        actual: Vec<i64>,
    },
    #[error("{path}: tensor `{name}` has dtype {dtype}, which is not a float type")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// A caller passed something the network cannot take (shape, dtype, range).
    #[error("invalid input: {0}")]
    Input(String),
    #[error("device: {0}")]
    Device(String),
    /// libtorch itself failed (out of memory, a kernel error).
    #[error("torch: {0}")]
    Torch(String),
}

impl From<tch::TchError> for ModelError {
    fn from(e: tch::TchError) -> Self {
        ModelError::Torch(e.to_string())
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Run a forward pass, turning a panic out of tch (its non-`f_` methods unwrap
/// libtorch errors, e.g. CUDA out of memory) into `ModelError::Torch`, so a
/// server never dies on one bad batch.
pub fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libtorch panicked".to_string());
            Err(ModelError::Torch(msg))
        }
    }
}
