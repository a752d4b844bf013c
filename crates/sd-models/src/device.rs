//! Devices and dtypes as users name them (`cpu`, `cuda`, `cuda:1`; `fp32`,
//! `fp16`, `bf16`), checked against what this libtorch can do.

use std::str::FromStr;
use std::sync::OnceLock;

use crate::error::{ModelError, Result};

/// Where the networks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(DeviceSpec::Cuda).map_err(|_| {
                    ModelError::Device(format!("`{s}`: expected cuda:N with N a GPU index"))
                }),
                None => Err(ModelError::Device(format!(
                    "`{s}`: expected cpu, cuda or cuda:N"
                ))),
            },
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// The tch device, after checking that it exists. For CUDA this loads
    /// `libtorch_cuda.so` first: the pip wheel's library is not linked into
    /// our binaries (nothing references it, so `--as-needed` drops it), and
    /// without it libtorch reports no GPU.
    pub fn resolve(self) -> Result<tch::Device> {
        match self {
            DeviceSpec::Cpu => Ok(tch::Device::Cpu),
            DeviceSpec::Cuda(n) => {
                load_cuda_backend()?;
                let count = tch::Cuda::device_count();
                if count == 0 {
                    return Err(ModelError::Device(format!(
                        "{self} requested but libtorch sees no CUDA GPU (no device, or no driver)"
                    )));
                }
                if n as i64 >= count {
                    return Err(ModelError::Device(format!(
                        "{self} requested but only {count} CUDA device(s) are visible"
                    )));
                }
                Ok(tch::Device::Cuda(n))
            }
        }
    }
}

fn load_cuda_backend() -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            // Found through the binary's rpath to the venv's torch/lib (see sd-build).
            // SAFETY: libtorch_cuda's initialisers only register the CUDA backend
            // with the already-loaded libtorch; nothing else runs on load.
            match unsafe { libloading::Library::new("libtorch_cuda.so") } {
                Ok(lib) => {
                    // Keep it loaded for the life of the process.
                    std::mem::forget(lib);
                    Ok(())
                }
                Err(e) => Err(format!(
                    "CUDA requested but this libtorch has no CUDA backend ({e}); \
                     the binaries need a CUDA build of the torch they were built against \
                     (torch 2.13 for `make build`, 2.11 for the GPU bundle)"
                )),
            }
        })
        .clone()
        .map_err(ModelError::Device)
}

/// The floating-point type the weights and activations use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl FromStr for Precision {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "fp32" | "f32" | "float32" => Ok(Precision::F32),
            "fp16" | "f16" | "float16" | "half" => Ok(Precision::F16),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(ModelError::Device(format!(
                "`{other}`: expected fp32, fp16 or bf16"
            ))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "fp32",
            Precision::F16 => "fp16",
            Precision::Bf16 => "bf16",
        })
    }
}

/// How a FLUX transformer's block weights are kept on the device: as
/// loaded (in the placement's precision), or in fp8 e4m3 with one scale
/// per tensor — half the memory of bf16 — computed either by upcasting each
/// layer's weight to the activations' precision (`Upcast`) or with scaled
/// fp8 matrix products, the activations quantized per call (`Scaled`:
/// Hopper's fp8 tensor cores on a GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fp8 {
    #[default]
    Off,
    Upcast,
    Scaled,
}

impl FromStr for Fp8 {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "none" | "no" => Ok(Fp8::Off),
            "upcast" => Ok(Fp8::Upcast),
            "scaled" => Ok(Fp8::Scaled),
            other => Err(ModelError::Device(format!(
                "`{other}`: expected off, upcast or scaled"
            ))),
        }
    }
}

impl std::fmt::Display for Fp8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fp8::Off => "off",
            Fp8::Upcast => "upcast",
            Fp8::Scaled => "scaled",
        })
    }
}

impl Precision {
    pub fn kind(self) -> tch::Kind {
        match self {
            Precision::F32 => tch::Kind::Float,
            Precision::F16 => tch::Kind::Half,
            Precision::Bf16 => tch::Kind::BFloat16,
        }
    }
}

/// Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16, as
/// /proc/cpuinfo lists them): oneDNN then runs bf16 convolutions and matrix
/// products at about twice fp32's speed; without, it converts and runs
/// them slower than fp32. None where /proc/cpuinfo cannot be read.
pub fn cpu_has_native_bf16() -> Option<bool> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    Some(
        info.lines()
            .filter(|l| l.starts_with("flags"))
            .flat_map(str::split_whitespace)
            .any(|f| f == "avx512_bf16" || f == "amx_bf16"),
    )
}

/// A device and a precision, checked together: fp16 is for GPUs (CPU
/// kernels for fp16 convolutions are slow or missing); bf16 runs on both.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    pub device: tch::Device,
    pub kind: tch::Kind,
}

impl Placement {
    pub fn cpu() -> Self {
        Placement {
            device: tch::Device::Cpu,
            kind: tch::Kind::Float,
        }
    }

    pub fn new(device: DeviceSpec, precision: Precision) -> Result<Self> {
        if device == DeviceSpec::Cpu && precision == Precision::F16 {
            return Err(ModelError::Device(format!(
                "{precision} on cpu is not supported (libtorch's CPU fp16 kernels are slow or missing); use fp32 or bf16 on cpu, fp16/bf16 on cuda"
            )));
        }
        Ok(Placement {
            device: device.resolve()?,
            kind: precision.kind(),
        })
    }
}
