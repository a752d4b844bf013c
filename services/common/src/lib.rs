//! Shared by the text-encoder, denoiser and autoencoder services.

use std::path::PathBuf;
use std::sync::Arc;

use sd_models::{DeviceSpec, ModelError, Placement, Precision};
use sd_proto::v1::{Dtype, Tensor as WireTensor};
use tch::{Kind, Tensor};
use tokio::sync::Semaphore;
use tonic::Status;

/// Flags for the model a service loads and where it runs.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory in the diffusers layout.
    #[arg(long, env = "SD_MODEL")]
    pub model: PathBuf,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "SD_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
    /// Precision: fp32 (CPU), fp16 or bf16 (CUDA).
    #[arg(long, env = "SD_PRECISION", default_value = "fp32")]
    pub precision: Precision,
    /// Forward passes run at once (each uses libtorch's intra-op threads).
    #[arg(long, env = "SD_MODEL_CONCURRENCY", default_value_t = 1)]
    pub concurrency: usize,
    /// libtorch intra-op threads (0: libtorch's default, one per core).
    #[arg(long, env = "SD_TORCH_THREADS", default_value_t = 0)]
    pub torch_threads: i32,
}

impl ModelArgs {
    pub fn placement(&self) -> anyhow::Result<Placement> {
        if self.torch_threads > 0 {
            tch::set_num_threads(self.torch_threads);
        }
        Ok(Placement::new(self.device, self.precision)?)
    }
}

/// The one map from model errors to gRPC codes.
pub fn status(e: ModelError) -> Status {
    match e {
        ModelError::Input(m) => Status::invalid_argument(m),
        ModelError::Torch(m) => Status::internal(format!("model failure: {m}")),
        ModelError::Device(m) => Status::failed_precondition(m),
        e @ (ModelError::Io { .. }
        | ModelError::MissingFile { .. }
        | ModelError::Pickle { .. }
        | ModelError::Config { .. }
        | ModelError::Unsupported { .. }
        | ModelError::Safetensors { .. }
        | ModelError::MissingTensor { .. }
        | ModelError::Shape { .. }
        | ModelError::Dtype { .. }
        | ModelError::Tokenizer { .. }) => Status::failed_precondition(e.to_string()),
    }
}

/// A wire tensor as a CPU tch tensor (f32/f16/bf16 as sent), after checking
/// that its bytes fit its shape and dtype. `field` names it in errors.
pub fn from_wire(t: Option<&WireTensor>, field: &str) -> Result<Tensor, Status> {
    let t = t.ok_or_else(|| Status::invalid_argument(format!("{field} is missing")))?;
    sd_proto::wire::validate(t).map_err(|e| Status::invalid_argument(format!("{field}: {e}")))?;
    let kind = match Dtype::try_from(t.dtype) {
        Ok(Dtype::Float32) => Kind::Float,
        Ok(Dtype::Float16) => Kind::Half,
        Ok(Dtype::Bfloat16) => Kind::BFloat16,
        _ => {
            return Err(Status::invalid_argument(format!(
                "{field}: unsupported dtype {}",
                t.dtype
            )))
        }
    };
    Tensor::f_from_data_size(&t.data, &t.shape, kind)
        .map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

/// A tch tensor on the wire as `dtype` (unspecified: float32).
pub fn to_wire(t: &Tensor, dtype: Dtype) -> Result<WireTensor, Status> {
    let (kind, dtype) = match dtype {
        Dtype::Float16 => (Kind::Half, Dtype::Float16),
        Dtype::Bfloat16 => (Kind::BFloat16, Dtype::Bfloat16),
        Dtype::Float32 | Dtype::Unspecified => (Kind::Float, Dtype::Float32),
    };
    let t = t
        .f_to_device(tch::Device::Cpu)
        .and_then(|t| t.f_to_kind(kind))
        .and_then(|t| t.f_contiguous())
        .map_err(|e| Status::internal(e.to_string()))?;
    let numel = t.numel();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)
        .map_err(|e| Status::internal(e.to_string()))?;
    Ok(WireTensor {
        shape: t.size(),
        dtype: dtype as i32,
        data: data.into(),
    })
}

/// Runs model work on the blocking pool, at most `concurrency` at once.
#[derive(Clone)]
pub struct Worker {
    permits: Arc<Semaphore>,
}

impl Worker {
    pub fn new(concurrency: usize) -> Self {
        Worker {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let _permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        tokio::task::spawn_blocking(move || {
            let _guard = tch::no_grad_guard();
            f()
        })
        .await
        .map_err(|e| Status::internal(format!("model task failed: {e}")))?
    }
}

/// A short identity for a model directory's weights: a hash of the configs,
/// the safetensors headers and sizes, and samples of the data. Changes when
/// the weights do, without reading gigabytes at start.
pub fn model_id(dir: &sd_models::ModelDir, components: &[sd_models::Component]) -> String {
    use std::hash::{DefaultHasher, Hasher};
    use std::io::{Read, Seek, SeekFrom};
    let mut h = DefaultHasher::new();
    for c in components {
        if let Ok(cfg) = std::fs::read(dir.config_path(*c)) {
            h.write(&cfg);
        }
        if let Ok(path) = dir.weights_path(*c, false) {
            if let Ok(mut f) = std::fs::File::open(&path) {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                h.write_u64(len);
                let mut buf = vec![0u8; 1 << 16];
                for pos in [0, len / 3, len / 2, len.saturating_sub(1 << 16)] {
                    if f.seek(SeekFrom::Start(pos)).is_ok() {
                        let n = f.read(&mut buf).unwrap_or(0);
                        h.write(&buf[..n]);
                    }
                }
            }
        }
    }
    let name = dir
        .root()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    format!("{name}@{:016x}", h.finish())
}

/// Log a load and return how long it took.
pub fn timed_load<T>(what: &str, f: impl FnOnce() -> sd_models::Result<T>) -> anyhow::Result<T> {
    let start = std::time::Instant::now();
    let v = f().map_err(|e| anyhow::anyhow!("loading {what}: {e}"))?;
    tracing::info!(what, seconds = start.elapsed().as_secs_f64(), "loaded");
    Ok(v)
}
