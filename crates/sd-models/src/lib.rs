//! The networks of the served model families in tch, built from the
//! diffusers layout's `config.json` files and loaded from safetensors:
//!
//! - [`ClipTokenizer`] + [`ClipTextModel`]: prompt → 77 token embeddings;
//! - [`Denoiser`]: the denoising network of the model's [`Family`] (the
//!   [`UNet`] for SD and SDXL): noisy latents + timestep + conditioning →
//!   noise (or v);
//! - [`Vae`]: pixels ↔ latents.
//!
//! Each network is loaded (`load`) apart from being run (`forward`,
//! `encode`, `decode`); inputs are checked and libtorch failures come back as
//! [`ModelError`], never as a panic.

pub mod blocks;
pub mod clip;
pub mod clip_vision;
pub mod component;
pub mod config;
pub mod control;
pub mod denoiser;
pub mod device;
pub mod error;
pub mod flux;
pub mod flux2;
pub mod flux_controlnet;
pub mod ip_adapter;
pub mod layers;
pub mod lora;
pub mod model_dir;
pub mod modules;
pub mod qwen3;
pub mod single_file;
pub mod standard;
pub mod t5;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
pub mod zimage;

pub use clip::{ClipTextModel, Fix, XlOutput};
pub use control::{ControlBase, ControlNetwork, ControlResiduals};
pub use denoiser::{Conditioning, Denoiser, GuidanceInput, Layout};
pub use device::{DeviceSpec, Fp8, Placement, Precision};
pub use error::{ModelError, Result};
pub use flux::FluxTransformer;
pub use flux2::Flux2Transformer;
pub use flux_controlnet::{FluxControlNet, FluxResiduals};
pub use model_dir::{Component, Family, ModelDir};
pub use qwen3::Qwen3Encoder;
pub use t5::T5Encoder;
pub use tokenizer::{ClipTokenizer, QwenTokenizer, T5Tokenizer};
pub use unet::controlnet::ControlNet;
pub use unet::{Added, Residuals, UNet};
pub use vae::{LatentDist, Vae};
pub use weights::Weights;
pub use zimage::ZImageTransformer;
