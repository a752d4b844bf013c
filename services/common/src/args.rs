//! The flags every model service takes for its model: where it is, where
//! it runs, in what precision, with how many threads.

use std::path::PathBuf;

use sd_models::{DeviceSpec, Placement, Precision};
use sd_runtime::metrics::Metrics;

use crate::machine;

/// Flags for the model a service loads and where it runs.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model: a directory in the diffusers layout, or a single-file
    /// checkpoint (`.safetensors`, original CompVis/Stability layout) of SD
    /// 1.x, SD 2.x, SDXL base or refiner, recognised from its keys.
    #[arg(long, env = "SD_MODEL")]
    pub model: PathBuf,
    /// For a single-file checkpoint: a diffusers model directory whose
    /// configs, tokenizers and scheduler describe it (its weights are not
    /// read), in place of the recognised family's standard configs.
    #[arg(long, env = "SD_MODEL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "SD_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
    /// Precision: fp32 or bf16 on a CPU (bf16 about twice as fast where the
    /// CPU has AVX512-BF16 or AMX), fp16 or bf16 on CUDA.
    #[arg(long, env = "SD_PRECISION", default_value = "fp32")]
    pub precision: Precision,
    /// Forward passes run at once, each on its own thread with libtorch's
    /// intra-op threads (the denoiser: UNet workers, each taking batches).
    /// Unset: from the machine (see `machine`: one on a GPU; on a CPU one,
    /// or one per core for a denoiser with a small UNet).
    #[arg(long, env = "SD_MODEL_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Calls that may wait for a forward pass; beyond: RESOURCE_EXHAUSTED.
    #[arg(long, env = "SD_MODEL_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// libtorch intra-op threads per forward (0: from the machine — the
    /// cores this process may use, divided between the workers; at most 4
    /// on a GPU).
    #[arg(long, env = "SD_TORCH_THREADS", default_value_t = 0)]
    pub torch_threads: usize,
    /// libtorch inter-op threads (0: from the machine, 1: the services'
    /// eager forwards never use more).
    #[arg(long, env = "SD_INTEROP_THREADS", default_value_t = 0)]
    pub interop_threads: usize,
    /// Wait this long before loading (exercises start-up health in tests).
    #[arg(long, env = "SD_LOAD_DELAY_MS", default_value_t = 0, hide = true)]
    pub load_delay_ms: u64,
}

impl ModelArgs {
    /// The model to serve, as `--model` and `--config` name it.
    pub fn model_dir(&self) -> sd_models::Result<sd_models::ModelDir> {
        sd_models::ModelDir::open_with_config(&self.model, self.config.as_deref())
    }

    /// The placement to load to (after the optional start-up delay).
    pub fn placement(&self) -> anyhow::Result<Placement> {
        if self.load_delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(self.load_delay_ms));
        }
        let placement = Placement::new(self.device, self.precision)?;
        if placement.device == tch::Device::Cpu && self.precision == Precision::Bf16 {
            warn_without_native_bf16();
        }
        Ok(placement)
    }
}

impl ModelArgs {
    /// Workers and libtorch threads for `role` on this machine, the flags
    /// on top of [`machine::rule`].
    pub fn threads(&self, role: machine::Role) -> machine::Threads {
        let given = |n: usize| (n > 0).then_some(n);
        machine::choose(
            role,
            self.device,
            machine::available_cores(),
            machine::Overrides {
                workers: self.concurrency.and_then(given),
                intra_op: given(self.torch_threads),
                inter_op: given(self.interop_threads),
            },
        )
    }

    /// Choose the threads for `role`, set libtorch's to them and publish
    /// them (`sd_model_threads`); call once, before the first forward.
    pub fn apply_threads(&self, role: machine::Role, metrics: &Metrics) -> machine::Threads {
        let t = self.threads(role);
        metrics.set_threads("workers", t.workers);
        metrics.set_threads("intra_op", t.intra_op);
        metrics.set_threads("inter_op", t.inter_op);
        tch::set_num_threads(t.intra_op as i32);
        // libtorch refuses a second setting (or one after its pool
        // started); the first call per process is this one.
        if tch::get_num_interop_threads() != t.inter_op as i32 {
            tch::set_num_interop_threads(t.inter_op as i32);
        }
        tracing::info!(
            cores = machine::available_cores(),
            "{t} ({})",
            if self.concurrency.is_some() || self.torch_threads > 0 || self.interop_threads > 0 {
                "flags over the machine's rule"
            } else {
                "the machine's rule"
            }
        );
        t
    }
}

/// bf16 on a CPU without native bf16 runs (oneDNN converts to fp32 and
/// back), but slower than fp32: say so at start rather than refuse.
fn warn_without_native_bf16() {
    match sd_models::device::cpu_has_native_bf16() {
        Some(true) => tracing::info!("bf16 on a CPU with native bf16 (AVX512-BF16 or AMX)"),
        Some(false) => tracing::warn!(
            "bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo): it runs emulated, slower than fp32; use --precision fp32 here"
        ),
        None => tracing::warn!("bf16 on a CPU whose bf16 support is unknown (/proc/cpuinfo unreadable)"),
    }
}
